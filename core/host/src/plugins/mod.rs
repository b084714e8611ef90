//! Loading plugin libraries and creating plugin objects from them.
//!
//! Each library is opened with `lib_header_from_path(..).init_root_module()`:
//! abi_stable's `RootModule::load_from_file` caches one module per interface
//! type and would hand back the first plugin for every later load. A library is
//! loaded once per process (abi_stable never unloads), checked (sha256 pin,
//! ABI version and layout, declared kinds), then initialised with the host's
//! logging and thread budget.

pub mod registry;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use abi_stable::{
    library::{lib_header_from_path, LibraryError},
    std_types::{RStr, RString},
};
use rir_sdk::{
    bridge::{RemoteGenerator, RemoteIndex, RemoteRetriever, RemoteReward, RemoteTextRetriever, RemoteTrainer},
    error::FfiError,
    ffi::{FfiHost, PluginModRef, ABI_VERSION},
    Generator, Index, PluginError, Retriever, Reward, TextRetriever, Trainer,
};
use sha2::{Digest, Sha256};

use crate::error::HostError;
use crate::plugins::registry::{Kind, Registered, Registry};

/// What the host hands every plugin it loads.
#[derive(Debug, Clone)]
pub struct HostSettings {
    /// Compute threads a plugin may use.
    pub threads: usize,
    /// Directories searched for workspace-built plugin libraries, first match wins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Where plugins keep models and other downloads (`RIR_CACHE`, else ~/.cache/rir).
    pub cache_dir: PathBuf,
}

impl Default for HostSettings {
    fn default() -> Self {
        let mut plugin_dirs = Vec::new();
        if let Some(d) = std::env::var_os("RIR_PLUGIN_DIR") {
            plugin_dirs.extend(std::env::split_paths(&d));
        }
        // Next to the running binary (target/release/rir), and for test and
        // example binaries (target/release/{deps,examples}/x) the directory above.
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                plugin_dirs.push(dir.to_owned());
                if dir.ends_with("deps") || dir.ends_with("examples") {
                    plugin_dirs.extend(dir.parent().map(Path::to_owned));
                }
            }
        }
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            plugin_dirs,
            cache_dir: default_cache_dir(),
        }
    }
}

/// `RIR_CACHE`, else `~/.cache/rir`.
pub fn default_cache_dir() -> PathBuf {
    rir_models::default_cache()
}

/// A loaded, checked, initialised plugin library.
pub struct Plugin {
    /// Its registry name.
    pub name: String,
    /// The library file loaded.
    pub path: PathBuf,
    /// The library file's sha256 (part of stage hashes: a rebuilt plugin recomputes).
    pub sha256: String,
    /// The plugin crate's version.
    pub version: String,
    /// The rir-sdk version it was built with.
    pub sdk_version: String,
    /// Its own one-line description.
    pub description: String,
    /// Kinds the library itself says it provides.
    pub provides: Vec<String>,
    module: PluginModRef,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("path", &self.path).finish()
    }
}

/// An owned retriever object, callable through the plain SDK trait.
pub type RetrieverHandle = RemoteRetriever<'static, abi_stable::std_types::RBox<()>>;
/// An owned generator object, callable through the plain SDK trait.
pub type GeneratorHandle = RemoteGenerator<'static, abi_stable::std_types::RBox<()>>;
/// An owned reward object, callable through the plain SDK trait.
pub type RewardHandle = RemoteReward<'static, abi_stable::std_types::RBox<()>>;
/// An owned trainer object, callable through the plain SDK trait.
pub type TrainerHandle = RemoteTrainer<'static, abi_stable::std_types::RBox<()>>;

impl Plugin {
    fn provides(&self, kind: Kind) -> Result<(), HostError> {
        if self.provides.iter().any(|k| k == kind.as_str()) {
            Ok(())
        } else {
            Err(HostError::KindNotProvided { plugin: self.name.clone(), kind, provides: self.provides.clone() })
        }
    }

    fn wrap<T>(&self, kind: Kind, r: Result<T, PluginError>) -> Result<T, HostError> {
        r.map_err(|source| HostError::Plugin { plugin: self.name.clone(), kind, source })
    }

    fn call<T>(&self, kind: Kind, r: abi_stable::std_types::RResult<T, FfiError>) -> Result<T, HostError> {
        self.wrap(kind, r.into_result().map_err(PluginError::from))
    }

    /// Creates the plugin's retriever from its config table (TOML text).
    pub fn retriever(&self, config: &str) -> Result<Box<dyn Retriever>, HostError> {
        self.provides(Kind::Retriever)?;
        let obj = self.call(Kind::Retriever, (self.module.new_retriever())(RStr::from_str(config)))?;
        Ok(Box::new(self.wrap(Kind::Retriever, RetrieverHandle::new(obj))?))
    }
    /// Creates the plugin's generator from its config table (TOML text).
    pub fn generator(&self, config: &str) -> Result<Box<dyn Generator>, HostError> {
        self.provides(Kind::Generator)?;
        let obj = self.call(Kind::Generator, (self.module.new_generator())(RStr::from_str(config)))?;
        Ok(Box::new(self.wrap(Kind::Generator, GeneratorHandle::new(obj))?))
    }
    /// Creates the plugin's reward from its config table (TOML text).
    pub fn reward(&self, config: &str) -> Result<Box<dyn Reward>, HostError> {
        self.provides(Kind::Reward)?;
        let obj = self.call(Kind::Reward, (self.module.new_reward())(RStr::from_str(config)))?;
        Ok(Box::new(RemoteReward(obj)))
    }
    /// Creates the plugin's trainer from its config table (TOML text).
    pub fn trainer(&self, config: &str) -> Result<Box<dyn Trainer>, HostError> {
        self.provides(Kind::Trainer)?;
        let obj = self.call(Kind::Trainer, (self.module.new_trainer())(RStr::from_str(config)))?;
        Ok(Box::new(RemoteTrainer(obj)))
    }
    /// Creates the plugin's index for `dim`-dimensional vectors from its config table.
    pub fn index(&self, config: &str, dim: usize) -> Result<Box<dyn Index>, HostError> {
        self.provides(Kind::Index)?;
        let obj = self.call(Kind::Index, (self.module.new_index())(RStr::from_str(config), dim as u64))?;
        Ok(Box::new(RemoteIndex(obj)))
    }

    /// Creates the plugin's text retriever from its config table (TOML text).
    pub fn text_retriever(&self, config: &str) -> Result<Box<dyn TextRetriever>, HostError> {
        self.provides(Kind::TextRetriever)?;
        let obj = self.call(Kind::TextRetriever, (self.module.new_text_retriever())(RStr::from_str(config)))?;
        Ok(Box::new(self.wrap(Kind::TextRetriever, RemoteTextRetriever::new(obj))?))
    }
    /// Whether the library says it provides `kind`.
    pub fn has(&self, kind: Kind) -> bool {
        self.provides.iter().any(|k| k == kind.as_str())
    }

    /// Has the plugin parse and check a table (`what`: a kind's config or a
    /// trainer's params) without loading anything. `Ok(false)`: the plugin
    /// cannot validate (an older or minimal plugin); its mistakes show when
    /// the object is made.
    pub fn validate(&self, kind: Kind, what: rir_sdk::ConfigOf, text: &str) -> Result<bool, HostError> {
        self.provides(kind)?;
        match self.call(kind, (self.module.validate())(RStr::from_str(what.as_str()), RStr::from_str(text))) {
            Ok(()) => Ok(true),
            Err(HostError::Plugin { source: PluginError::Unsupported(_), .. }) => {
                log::debug!("plugin `{}` cannot validate its {} table", self.name, what.as_str());
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Where a registered plugin's library is (or would be), and every path tried.
pub fn locate(reg: &Registry, p: &Registered, settings: &HostSettings) -> (Option<PathBuf>, Vec<PathBuf>) {
    if let Some(lib) = &p.entry.library {
        let path = if lib.is_absolute() { lib.clone() } else { reg.base_dir().join(lib) };
        return (path.is_file().then(|| path.clone()), vec![path]);
    }
    let crate_name = p.entry.crate_name.as_deref().unwrap_or(&p.name);
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let base = reg.base_dir();
    let mut dirs = settings.plugin_dirs.clone();
    dirs.push(base.join("target/release"));
    dirs.push(base.join("target/debug"));
    let tried: Vec<PathBuf> = dirs.iter().map(|d| d.join(&file)).collect();
    (tried.iter().find(|p| p.is_file()).cloned(), tried)
}

/// What to do about a missing library: the command that builds a workspace
/// plugin, or where an explicitly registered library was expected.
pub fn build_hint(p: &Registered) -> String {
    match &p.entry.crate_name {
        Some(_) => "build it with `cargo build --release --workspace`".into(),
        None => "registry.toml names this library explicitly (`library = …`): build the plugin with its own build, or fix the path".into(),
    }
}

/// A file's sha256 in lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// abi_stable's layout errors run to hundreds of lines; keep the first that says something.
fn abi_message(e: &LibraryError) -> String {
    match e {
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "host expects plugin ABI {expected_version}, library was built for {actual_version} (rebuild it against this rir-sdk)"
        ),
        LibraryError::AbiInstability(_) => format!(
            "type layouts differ from the host's (rebuild it against rir-sdk with ABI {ABI_VERSION}): {}",
            summarize_layout_error(&e.to_string())
        ),
        // A shared library without rir's root symbol: abi_stable's message
        // ends in the symbol name's NUL and reads "Could load symbol".
        LibraryError::GetSymbolError { .. } => {
            "not an rir plugin (no root module symbol: build it with rir_sdk::export_plugin!)".into()
        }
        _ => e.to_string().replace('\0', "").lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "),
    }
}

/// Boils abi_stable's layout report down to the type that differs and how:
/// "FfiHost: incompatible type size (expected 48, found 56); ...".
fn summarize_layout_error(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let mut ty = None;
    let mut problems = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        // The type is the one whose layout is printed just before the first error.
        if *l == "Layout of expected type:" && problems.is_empty() {
            ty = lines[i + 1..].iter().find_map(|l| l.strip_prefix("type:"));
        }
        if let Some(what) = l.strip_prefix("Error:") {
            let after = |tag: &str| {
                lines[i..].iter().position(|x| *x == tag).and_then(|p| lines.get(i + p + 1)).copied().unwrap_or("?")
            };
            problems.push(format!("{what} (expected {}, found {})", after("Expected:"), after("Found:")));
        }
    }
    if problems.is_empty() {
        return lines.iter().find(|l| !l.is_empty()).copied().unwrap_or("layout mismatch").to_owned();
    }
    format!("{}: {}", ty.unwrap_or("a plugin type"), problems.join("; "))
}

extern "C" fn host_log(level: u8, target: RStr<'_>, msg: RStr<'_>) {
    // Never unwind back into the plugin.
    let _ = std::panic::catch_unwind(|| {
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        log::log!(target: "rir::plugin", level, "[{}] {}", target.as_str(), msg.as_str());
    });
}

/// Loads plugins on demand and keeps each library loaded once.
pub struct PluginHost {
    /// The registry plugins are looked up in.
    pub registry: Registry,
    /// What every loaded plugin is handed.
    pub settings: HostSettings,
    loaded: Mutex<HashMap<String, Arc<Plugin>>>,
}

impl PluginHost {
    /// A host over `registry`; nothing is loaded until asked for.
    pub fn new(registry: Registry, settings: HostSettings) -> Self {
        Self { registry, settings, loaded: Mutex::new(HashMap::new()) }
    }

    /// A host as the `rir` command and the Python package make one:
    /// `registry_file` (else `$RIR_REGISTRY`, else the nearest registry.toml up
    /// from the working directory), `plugin_dirs` searched before the
    /// default ones, `threads` (else all cores).
    pub fn discover(registry_file: Option<std::path::PathBuf>, plugin_dirs: &[std::path::PathBuf], threads: Option<usize>) -> Result<Self, HostError> {
        let path = registry_file.or_else(registry::discover).ok_or(HostError::Registry(registry::RegistryError::NotFound))?;
        let mut settings = HostSettings::default();
        settings.plugin_dirs.splice(0..0, plugin_dirs.iter().cloned());
        if let Some(t) = threads {
            settings.threads = t.max(1);
        }
        Ok(Self::new(Registry::load(&path)?, settings))
    }

    /// Loads (once) and checks the named plugin.
    pub fn load(&self, name: &str) -> Result<Arc<Plugin>, HostError> {
        if let Some(p) = self.loaded.lock().expect("plugin table poisoned").get(name) {
            return Ok(p.clone());
        }
        let reg = self.registry.get(name)?;
        let plugin = Arc::new(self.open(reg)?);
        self.loaded.lock().expect("plugin table poisoned").insert(name.to_owned(), plugin.clone());
        Ok(plugin)
    }

    fn open(&self, reg: &Registered) -> Result<Plugin, HostError> {
        let name = reg.name.clone();
        let (path, tried) = locate(&self.registry, reg, &self.settings);
        let path = path.ok_or_else(|| HostError::LibraryMissing { plugin: name.clone(), tried, build: build_hint(reg) })?;
        let sha256 = sha256_file(&path)
            .map_err(|e| HostError::Open { plugin: name.clone(), path: path.clone(), message: e.to_string() })?;
        if let Some(pin) = &reg.entry.sha256 {
            if !pin.eq_ignore_ascii_case(&sha256) {
                return Err(HostError::Sha256Mismatch { plugin: name, path, expected: pin.to_lowercase(), found: sha256 });
            }
        }
        let header = lib_header_from_path(&path)
            .map_err(|e| HostError::Open { plugin: name.clone(), path: path.clone(), message: abi_message(&e) })?;
        let module = header
            .init_root_module::<PluginModRef>()
            .map_err(|e| HostError::Abi { plugin: name.clone(), path: path.clone(), message: abi_message(&e) })?;

        let host = FfiHost {
            threads: self.settings.threads.max(1) as u32,
            log_level: log::max_level() as u8,
            log: host_log,
            cache_dir: RString::from(self.settings.cache_dir.to_string_lossy().as_ref()),
        };
        (module.init())(&host)
            .into_result()
            .map_err(|e| HostError::Plugin { plugin: name.clone(), kind: reg.entry.kinds[0], source: e.into() })?;

        let m = (module.manifest())();
        let provides: Vec<String> = m.kinds.iter().map(|k| k.to_string()).collect();
        for kind in &reg.entry.kinds {
            if !provides.iter().any(|k| k == kind.as_str()) {
                return Err(HostError::KindMismatch { plugin: name, kind: *kind, provides });
            }
        }
        if m.name.as_str() != name {
            log::debug!("plugin '{name}' calls itself '{}'", m.name);
        }
        Ok(Plugin {
            name,
            path,
            sha256,
            version: m.version.into(),
            sdk_version: m.sdk_version.into(),
            description: m.description.into(),
            provides,
            module,
        })
    }
}

/// A plugin's state as `rir plugins` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Loaded and checked; no pin.
    Built,
    /// Loaded, checked, and its sha256 matches the pin.
    PinnedOk,
    /// No library at any of the places looked.
    Missing,
    /// A library is there but refused: sha256, ABI or kinds; the message says which.
    Mismatch(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Built => "built",
            Status::PinnedOk => "pinned-ok",
            Status::Missing => "missing",
            Status::Mismatch(_) => "mismatch",
        })
    }
}

impl PluginHost {
    /// Loads the named plugin and classifies the outcome.
    pub fn status(&self, name: &str) -> (Status, Option<Arc<Plugin>>, Option<HostError>) {
        match self.load(name) {
            Ok(p) => {
                let pinned = self.registry.plugins.get(name).is_some_and(|r| r.entry.sha256.is_some());
                (if pinned { Status::PinnedOk } else { Status::Built }, Some(p), None)
            }
            Err(e @ HostError::LibraryMissing { .. }) => (Status::Missing, None, Some(e)),
            Err(e) => (Status::Mismatch(e.to_string()), None, Some(e)),
        }
    }
}
