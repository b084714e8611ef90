//! What a plugin library exports: the root module, built by
//! [`crate::export_plugin!`], and the host context it receives at load time.

use std::path::PathBuf;
use std::sync::OnceLock;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RBox, RResult, RStr, RString, RVec},
};

use crate::api::{Generator, Index, Retriever, Reward, TextRetriever, Trainer};
use crate::bridge::{guard, GuardedGenerator, GuardedIndex, GuardedRetriever, GuardedReward, GuardedTextRetriever, GuardedTrainer, LAST_PANIC};
use crate::error::{FfiError, PluginError, PluginResult};
use crate::ffi::*;

/// What the host told this plugin library when it loaded it.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// Threads the plugin may use for compute (the host's budget).
    pub threads: usize,
    /// A directory for downloads and artefacts.
    pub cache_dir: PathBuf,
}

static HOST: OnceLock<HostInfo> = OnceLock::new();

/// The host context. Outside a loaded plugin (a plugin crate used as an rlib,
/// in its own unit tests) it falls back to all cores and `~/.cache/rir`.
pub fn host() -> &'static HostInfo {
    HOST.get_or_init(|| HostInfo {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cache_dir: std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/rir"))
            .unwrap_or_else(|| std::env::temp_dir().join("rir-cache")),
    })
}

/// Forwards this library's `log` records to the host's logger: each cdylib has
/// its own copy of the `log` globals, so without this plugin logs vanish.
struct HostLogger {
    sink: extern "C" fn(u8, RStr<'_>, RStr<'_>),
}
impl log::Log for HostLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level() && !crate::secret::is_wire_trace(m.level(), m.target())
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let msg = crate::secret::redact(&r.args().to_string()).into_owned();
            (self.sink)(r.level() as u8, RStr::from_str(r.target()), RStr::from_str(&msg));
        }
    }
    fn flush(&self) {}
}

fn level_filter(n: u8) -> log::LevelFilter {
    match n {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

#[doc(hidden)]
pub extern "C" fn init_plugin(h: &FfiHost) -> RResult<(), FfiError> {
    guard(|| {
        let info = HostInfo { threads: h.threads.max(1) as usize, cache_dir: PathBuf::from(h.cache_dir.as_str()) };
        let _ = HOST.set(info);
        if log::set_boxed_logger(Box::new(HostLogger { sink: h.log })).is_ok() {
            log::set_max_level(level_filter(h.log_level));
        }
        // Remember where a panic happened so the error the host sees names it.
        // This hook belongs to this library's copy of std only.
        std::panic::set_hook(Box::new(|p| {
            let msg = if let Some(s) = p.payload().downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = p.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "unknown panic payload".into()
            };
            let at = p.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            LAST_PANIC.with(|c| *c.borrow_mut() = Some(format!("{msg}{at}")));
        }));
        Ok(())
    })
}

#[doc(hidden)]
pub fn manifest(name: &str, version: &str, description: &str, kinds: &[&str]) -> FfiManifest {
    FfiManifest {
        name: name.into(),
        version: version.into(),
        description: description.into(),
        kinds: kinds.iter().map(|k| RString::from(*k)).collect::<RVec<_>>(),
        sdk_version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn unsupported<T>(kind: &str) -> RResult<T, FfiError> {
    RResult::RErr(PluginError::Unsupported(format!("this plugin does not provide a {kind}")).into())
}

#[doc(hidden)]
pub type Ctor<T> = fn(&str) -> PluginResult<T>;

#[doc(hidden)]
pub fn make_retriever<T: Retriever + 'static>(ctor: Option<Ctor<T>>, cfg: RStr<'_>) -> RResult<RetrieverBox, FfiError> {
    match ctor {
        None => unsupported("retriever"),
        Some(f) => guard(|| Ok(RetrieverFfi_TO::from_ptr(RBox::new(GuardedRetriever(f(cfg.as_str())?)), TD_Opaque))),
    }
}
#[doc(hidden)]
pub fn make_generator<T: Generator + 'static>(ctor: Option<Ctor<T>>, cfg: RStr<'_>) -> RResult<GeneratorBox, FfiError> {
    match ctor {
        None => unsupported("generator"),
        Some(f) => guard(|| Ok(GeneratorFfi_TO::from_ptr(RBox::new(GuardedGenerator(f(cfg.as_str())?)), TD_Opaque))),
    }
}
#[doc(hidden)]
pub fn make_reward<T: Reward + 'static>(ctor: Option<Ctor<T>>, cfg: RStr<'_>) -> RResult<RewardBox, FfiError> {
    match ctor {
        None => unsupported("reward"),
        Some(f) => guard(|| Ok(RewardFfi_TO::from_ptr(RBox::new(GuardedReward(f(cfg.as_str())?)), TD_Opaque))),
    }
}
#[doc(hidden)]
pub fn make_trainer<T: Trainer + 'static>(ctor: Option<Ctor<T>>, cfg: RStr<'_>) -> RResult<TrainerBox, FfiError> {
    match ctor {
        None => unsupported("trainer"),
        Some(f) => guard(|| Ok(TrainerFfi_TO::from_ptr(RBox::new(GuardedTrainer(f(cfg.as_str())?)), TD_Opaque))),
    }
}
#[doc(hidden)]
pub type IndexCtor<T> = fn(&str, usize) -> PluginResult<T>;
#[doc(hidden)]
pub fn make_index<T: Index + 'static>(ctor: Option<IndexCtor<T>>, cfg: RStr<'_>, dim: u64) -> RResult<IndexBox, FfiError> {
    match ctor {
        None => unsupported("index"),
        Some(f) => guard(|| Ok(IndexFfi_TO::from_ptr(RBox::new(GuardedIndex(f(cfg.as_str(), dim as usize)?)), TD_Opaque))),
    }
}

#[doc(hidden)]
pub fn make_text_retriever<T: TextRetriever + 'static>(ctor: Option<Ctor<T>>, cfg: RStr<'_>) -> RResult<TextRetrieverBox, FfiError> {
    match ctor {
        None => unsupported("text-retriever"),
        Some(f) => guard(|| Ok(TextRetrieverFfi_TO::from_ptr(RBox::new(GuardedTextRetriever(f(cfg.as_str())?)), TD_Opaque))),
    }
}

/// A plugin's config check: the table `what` names, as TOML text.
pub type Validator = fn(crate::api::ConfigOf, &str) -> PluginResult<()>;

#[doc(hidden)]
pub fn run_validate(f: Option<Validator>, what: RStr<'_>, text: RStr<'_>) -> RResult<(), FfiError> {
    guard(|| {
        let Some(f) = f else { return Err(PluginError::Unsupported("this plugin does not validate its configs".into())) };
        let what = crate::api::ConfigOf::parse(what.as_str()).ok_or_else(|| PluginError::input(format!("unknown table kind `{}`", what.as_str())))?;
        f(what, text.as_str())
    })
}

/// A placeholder type for kinds a plugin does not provide.
#[doc(hidden)]
pub enum Never {}
macro_rules! never_impls {
    () => {
        impl Retriever for Never {
            fn info(&self) -> crate::api::RetrieverInfo { match *self {} }
            fn encode_queries(&self, _: &[String], _: Option<&str>) -> PluginResult<crate::api::Embeddings> { match *self {} }
            fn encode_corpus(&self, _: &[String]) -> PluginResult<crate::api::Embeddings> { match *self {} }
        }
        impl Generator for Never {
            fn model_name(&self) -> String { match *self {} }
            fn generate(&self, _: &[crate::api::GenerationRequest]) -> PluginResult<Vec<Vec<crate::api::Completion>>> { match *self {} }
        }
        impl Reward for Never {
            fn score(&self, _: &crate::api::RewardContext<'_>, _: &[crate::api::RewardItem]) -> PluginResult<Vec<crate::api::RewardScores>> { match *self {} }
        }
        impl Trainer for Never {
            fn train(&self, _: &crate::api::TrainJob, _: &dyn crate::api::ProgressSink) -> PluginResult<crate::api::TrainReport> { match *self {} }
        }
        impl Index for Never {
            fn dim(&self) -> usize { match *self {} }
            fn len(&self) -> usize { match *self {} }
            fn add(&mut self, _: &crate::api::Embeddings) -> PluginResult<()> { match *self {} }
            fn search(&self, _: &crate::api::Embeddings, _: usize) -> PluginResult<crate::api::Hits> { match *self {} }
            fn save(&self, _: &std::path::Path) -> PluginResult<()> { match *self {} }
            fn load(&mut self, _: &std::path::Path) -> PluginResult<()> { match *self {} }
        }
        impl TextRetriever for Never {
            fn info(&self) -> crate::api::TextRetrieverInfo { match *self {} }
            fn build(&mut self, _: &std::path::Path, _: &[String], _: &dyn crate::api::ProgressSink) -> PluginResult<()> { match *self {} }
            fn open(&mut self, _: &std::path::Path) -> PluginResult<()> { match *self {} }
            fn len(&self) -> usize { match *self {} }
            fn search(&self, _: &[String], _: usize) -> PluginResult<crate::api::Hits> { match *self {} }
        }
    };
}
never_impls!();

/// The symbol abi_stable's loader looks up (what `#[export_root_module]` would
/// emit). Spelled out so plugin crates need no direct abi_stable dependency;
/// a test checks it against abi_stable's own constant.
#[doc(hidden)]
pub const ROOT_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

/// Exports a plugin library. Name each kind the plugin provides with its
/// constructor; a constructor takes the plugin's TOML config table as text
/// (index constructors also take the vector dimension). `validate`
/// (optional, last) parses a table without loading anything, so the host
/// can refuse a typo before the work that would precede the constructor.
///
/// ```ignore
/// rir_sdk::export_plugin! {
///     name: "my-encoder",
///     description: "A dense encoder",
///     retriever: MyEncoder::new,
///     validate: |what, text| match what {
///         rir_sdk::ConfigOf::Retriever => rir_sdk::config::check::<MyConfig>(text),
///         _ => Ok(()),
///     },
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        description: $desc:expr
        $(, retriever: $retriever:expr)?
        $(, generator: $generator:expr)?
        $(, reward: $reward:expr)?
        $(, trainer: $trainer:expr)?
        $(, index: $index:expr)?
        $(, text_retriever: $text_retriever:expr)?
        $(, validate: $validate:expr)?
        $(,)?
    ) => {
        const _: () = {
            use $crate::abi_stable::std_types::{RResult, RStr};
            use $crate::ffi::*;
            use $crate::error::FfiError;
            use $crate::export as ex;

            extern "C" fn manifest() -> FfiManifest {
                let mut kinds: Vec<&str> = Vec::new();
                $( let _ = $retriever; kinds.push("retriever"); )?
                $( let _ = $generator; kinds.push("generator"); )?
                $( let _ = $reward; kinds.push("reward"); )?
                $( let _ = $trainer; kinds.push("trainer"); )?
                $( let _ = $index; kinds.push("index"); )?
                $( let _ = $text_retriever; kinds.push("text-retriever"); )?
                ex::manifest($name, env!("CARGO_PKG_VERSION"), $desc, &kinds)
            }
            extern "C" fn new_retriever(c: RStr<'_>) -> RResult<RetrieverBox, FfiError> {
                $crate::__rir_ctor!(make_retriever, c $(, $retriever)?)
            }
            extern "C" fn new_generator(c: RStr<'_>) -> RResult<GeneratorBox, FfiError> {
                $crate::__rir_ctor!(make_generator, c $(, $generator)?)
            }
            extern "C" fn new_reward(c: RStr<'_>) -> RResult<RewardBox, FfiError> {
                $crate::__rir_ctor!(make_reward, c $(, $reward)?)
            }
            extern "C" fn new_trainer(c: RStr<'_>) -> RResult<TrainerBox, FfiError> {
                $crate::__rir_ctor!(make_trainer, c $(, $trainer)?)
            }
            extern "C" fn new_index(c: RStr<'_>, dim: u64) -> RResult<IndexBox, FfiError> {
                $crate::__rir_index_ctor!(c, dim $(, $index)?)
            }
            extern "C" fn new_text_retriever(c: RStr<'_>) -> RResult<TextRetrieverBox, FfiError> {
                $crate::__rir_ctor!(make_text_retriever, c $(, $text_retriever)?)
            }
            extern "C" fn validate(what: RStr<'_>, text: RStr<'_>) -> RResult<(), FfiError> {
                $crate::__rir_validate!(what, text $(, $validate)?)
            }
            fn root() -> PluginModRef {
                use $crate::abi_stable::prefix_type::PrefixTypeTrait;
                PluginMod {
                    manifest,
                    init: ex::init_plugin,
                    new_retriever,
                    new_generator,
                    new_reward,
                    new_trainer,
                    new_index,
                    new_text_retriever,
                    validate,
                }
                .leak_into_prefix()
            }
            extern "C" fn erased_root() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(root)
            }
            // What `#[export_root_module]` emits, with paths through the SDK.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static ROOT: $crate::abi_stable::library::LibHeader = unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<PluginModRef>(
                    erased_root,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __rir_ctor {
    ($make:ident, $c:expr) => {
        $crate::export::$make(None::<$crate::export::Ctor<$crate::export::Never>>, $c)
    };
    ($make:ident, $c:expr, $f:expr) => {
        $crate::export::$make(Some($f as $crate::export::Ctor<_>), $c)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __rir_validate {
    ($w:expr, $t:expr) => {
        $crate::export::run_validate(None, $w, $t)
    };
    ($w:expr, $t:expr, $f:expr) => {
        $crate::export::run_validate(Some($f as $crate::export::Validator), $w, $t)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __rir_index_ctor {
    ($c:expr, $dim:expr) => {
        $crate::export::make_index(None::<$crate::export::IndexCtor<$crate::export::Never>>, $c, $dim)
    };
    ($c:expr, $dim:expr, $f:expr) => {
        $crate::export::make_index(Some($f as $crate::export::IndexCtor<_>), $c, $dim)
    };
}
