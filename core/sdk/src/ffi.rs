// abi_stable 0.11 macros emit impls inside consts; harmless, silenced.
#![allow(non_local_definitions)]
// The generated IndexFfi_TO has `len` (mirroring the trait); is_empty lives on api::Index.
#![allow(clippy::len_without_is_empty)]
//! The stable ABI between the host and plugins.
//!
//! Plugin authors never touch this module: they implement [`crate::api`] and
//! call [`crate::export_plugin!`]. Every type here is `#[repr(C)]` +
//! `StableAbi`, so abi_stable can check at load time that host and plugin agree
//! on every layout.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    sabi_trait,
    sabi_types::{RRef, VersionStrings},
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::error::FfiError;

/// The plugin ABI version, checked by abi_stable at load time: the host
/// refuses a plugin built for an older ABI (for 0.x, a lower minor), and
/// accepts a newer one only if every type layout it shares with the host is
/// compatible (abi_stable's prefix types may grow at the end). Bump the minor
/// on any change to this module.
///
/// 0.2.0: generators can score continuations (`GeneratorFfi::score`).
/// 0.3.0: `validate` checks a config or params table without loading anything.
/// 0.4.0: reward scores carry the query weight they used and a fallback count.
/// 0.5.0: text retrievers (`TextRetrieverFfi`: lexical search such as BM25).
/// 0.6.0: completions and scores carry the request's usage (`FfiUsage`);
///        `validate` answers "requirements" (the programs a job runs).
/// 0.7.0: generation can be cancelled mid-way (`GeneratorFfi::generate_with`).
/// 0.8.0: a retriever's corpus side may have its own fingerprint
///        (`FfiRetrieverInfo::corpus_fingerprint`: asymmetric encoders).
/// 0.9.0: a request's usage says how many prompt tokens came from the
///        backend's prefix cache (`FfiUsage::cached_tokens`).
/// 0.10.0: a training job may carry the index's passage vectors
///        (`FfiTrainJob::passage_vectors`).
pub const ABI_VERSION: &str = "0.10.0";

/// What the host hands a plugin when it loads it.
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct FfiHost {
    /// How many threads the plugin may use for compute.
    pub threads: u32,
    /// `log::LevelFilter` as a number: 0 off .. 5 trace.
    pub log_level: u8,
    /// Where plugin log records go: (level 1..5, target, message).
    pub log: extern "C" fn(u8, RStr<'_>, RStr<'_>),
    /// A directory the plugin may cache downloads and artefacts under.
    pub cache_dir: RString,
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiManifest {
    pub name: RString,
    pub version: RString,
    pub description: RString,
    pub kinds: RVec<RString>,
    /// The `rir-sdk` crate version the plugin was built against.
    pub sdk_version: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiMatrix {
    pub rows: u64,
    pub dim: u64,
    pub data: RVec<f32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiRetrieverInfo {
    pub model: RString,
    pub fingerprint: RString,
    pub corpus_fingerprint: ROption<RString>,
    pub dim: u64,
    pub max_length: u64,
    pub normalized: bool,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiTextRetrieverInfo {
    pub model: RString,
    pub fingerprint: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiMessage {
    pub role: RString,
    pub content: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiRequest {
    /// The chat messages; used when `text` is None.
    pub chat: RVec<FfiMessage>,
    /// A raw completion prompt.
    pub text: ROption<RString>,
    pub n: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: u32,
    pub stop: RVec<RString>,
    pub seed: ROption<u64>,
    pub logprobs: bool,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiLogprob {
    pub token: RString,
    pub logprob: f32,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct FfiUsage {
    pub prompt_tokens: ROption<u32>,
    pub completion_tokens: ROption<u32>,
    pub retries: u32,
    pub cached_tokens: ROption<u32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiCompletion {
    pub text: RString,
    pub finish_reason: RString,
    pub logprobs: ROption<RVec<FfiLogprob>>,
    pub usage: ROption<FfiUsage>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiScoreRequest {
    /// The chat messages; used when `text` is None.
    pub chat: RVec<FfiMessage>,
    pub text: ROption<RString>,
    pub continuation: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiScore {
    pub logprob: f64,
    pub tokens: RVec<FfiLogprob>,
    pub usage: ROption<FfiUsage>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiRewardItem {
    pub query: RString,
    pub reference: RString,
    pub candidates: RVec<RString>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiRewardScores {
    pub baseline: ROption<f64>,
    pub scores: RVec<f64>,
    pub query_weight: ROption<f64>,
    pub fallbacks: u32,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiTrainJob {
    pub base_model: RString,
    pub data_file: RString,
    pub output_dir: RString,
    pub params: RString,
    pub passage_vectors: ROption<RString>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiTrainReport {
    pub model_dir: RString,
    pub steps: u64,
    pub seconds: f64,
    pub loss: RVec<f64>,
    pub extra_json: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiProgress {
    pub stage: RString,
    pub done: u64,
    pub total: u64,
    pub loss: ROption<f64>,
    pub message: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiHits {
    pub queries: u64,
    pub k: u64,
    pub ids: RVec<i64>,
    pub scores: RVec<f32>,
}

/// FFI form of [`crate::api::Retriever`].
#[sabi_trait]
pub trait RetrieverFfi: Send + Sync {
    fn info(&self) -> RResult<FfiRetrieverInfo, FfiError>;
    fn encode_queries(
        &self,
        texts: RSlice<'_, RString>,
        instruction: ROption<RStr<'_>>,
    ) -> RResult<FfiMatrix, FfiError>;
    #[sabi(last_prefix_field)]
    fn encode_corpus(&self, texts: RSlice<'_, RString>) -> RResult<FfiMatrix, FfiError>;
}

/// FFI form of [`crate::api::Generator`].
#[sabi_trait]
pub trait GeneratorFfi: Send + Sync {
    fn model_name(&self) -> RResult<RString, FfiError>;
    fn generate(&self, requests: RSlice<'_, FfiRequest>) -> RResult<RVec<RVec<FfiCompletion>>, FfiError>;
    fn score(&self, requests: RSlice<'_, FfiScoreRequest>) -> RResult<RVec<FfiScore>, FfiError>;
    #[sabi(last_prefix_field)]
    fn generate_with(
        &self,
        requests: RSlice<'_, FfiRequest>,
        progress: ProgressFfi_TO<'_, RRef<'_, ()>>,
    ) -> RResult<RVec<RVec<FfiCompletion>>, FfiError>;
}

/// A borrowed retriever handed to a reward.
pub type RetrieverRef<'a> = RetrieverFfi_TO<'a, RRef<'a, ()>>;
/// A borrowed generator handed to a reward.
pub type GeneratorRef<'a> = GeneratorFfi_TO<'a, RRef<'a, ()>>;

/// FFI form of [`crate::api::Reward`].
#[sabi_trait]
pub trait RewardFfi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn score(
        &self,
        retriever: ROption<RetrieverRef<'_>>,
        generator: ROption<GeneratorRef<'_>>,
        items: RSlice<'_, FfiRewardItem>,
    ) -> RResult<RVec<FfiRewardScores>, FfiError>;
}

/// FFI form of [`crate::api::ProgressSink`] (implemented by the host).
#[sabi_trait]
pub trait ProgressFfi: Sync {
    fn report(&self, progress: &FfiProgress);
    #[sabi(last_prefix_field)]
    fn cancelled(&self) -> bool;
}

/// FFI form of [`crate::api::Trainer`].
#[sabi_trait]
pub trait TrainerFfi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn train(
        &self,
        job: &FfiTrainJob,
        progress: ProgressFfi_TO<'_, RRef<'_, ()>>,
    ) -> RResult<FfiTrainReport, FfiError>;
}

/// FFI form of [`crate::api::Index`].
#[sabi_trait]
pub trait IndexFfi: Send {
    fn dim(&self) -> u64;
    fn len(&self) -> u64;
    fn add(&mut self, data: RSlice<'_, f32>, rows: u64, dim: u64) -> RResult<(), FfiError>;
    fn search(&self, data: RSlice<'_, f32>, rows: u64, dim: u64, k: u64) -> RResult<FfiHits, FfiError>;
    fn save(&self, path: RStr<'_>) -> RResult<(), FfiError>;
    #[sabi(last_prefix_field)]
    fn load(&mut self, path: RStr<'_>) -> RResult<(), FfiError>;
}

/// FFI form of [`crate::api::TextRetriever`].
#[sabi_trait]
pub trait TextRetrieverFfi: Send + Sync {
    fn info(&self) -> RResult<FfiTextRetrieverInfo, FfiError>;
    fn build(
        &mut self,
        dir: RStr<'_>,
        texts: RSlice<'_, RString>,
        progress: ProgressFfi_TO<'_, RRef<'_, ()>>,
    ) -> RResult<(), FfiError>;
    fn open(&mut self, dir: RStr<'_>) -> RResult<(), FfiError>;
    fn len(&self) -> u64;
    #[sabi(last_prefix_field)]
    fn search(&self, queries: RSlice<'_, RString>, k: u64) -> RResult<FfiHits, FfiError>;
}

pub type RetrieverBox = RetrieverFfi_TO<'static, RBox<()>>;
pub type GeneratorBox = GeneratorFfi_TO<'static, RBox<()>>;
pub type RewardBox = RewardFfi_TO<'static, RBox<()>>;
pub type TrainerBox = TrainerFfi_TO<'static, RBox<()>>;
pub type IndexBox = IndexFfi_TO<'static, RBox<()>>;
pub type TextRetrieverBox = TextRetrieverFfi_TO<'static, RBox<()>>;

/// The root module every plugin library exports (through
/// [`crate::export_plugin!`]). Each constructor takes the plugin's TOML config
/// table as text; kinds the plugin does not provide return `Unsupported`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub manifest: extern "C" fn() -> FfiManifest,
    /// Called once, right after loading, before any constructor.
    pub init: extern "C" fn(host: &FfiHost) -> RResult<(), FfiError>,
    pub new_retriever: extern "C" fn(config: RStr<'_>) -> RResult<RetrieverBox, FfiError>,
    pub new_generator: extern "C" fn(config: RStr<'_>) -> RResult<GeneratorBox, FfiError>,
    pub new_reward: extern "C" fn(config: RStr<'_>) -> RResult<RewardBox, FfiError>,
    pub new_trainer: extern "C" fn(config: RStr<'_>) -> RResult<TrainerBox, FfiError>,
    pub new_index: extern "C" fn(config: RStr<'_>, dim: u64) -> RResult<IndexBox, FfiError>,
    pub new_text_retriever: extern "C" fn(config: RStr<'_>) -> RResult<TextRetrieverBox, FfiError>,
    /// Parses a table (`what`: a kind's config, or `"params"` for a
    /// trainer's job) and checks its values without loading models, so the
    /// host can refuse a typo before any work; `Unsupported` when the
    /// plugin cannot tell.
    #[sabi(last_prefix_field)]
    pub validate: extern "C" fn(what: RStr<'_>, text: RStr<'_>) -> RResult<(), FfiError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "rir_plugin";
    const NAME: &'static str = "rir plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(ABI_VERSION);
}
