//! The plugin kinds as plain Rust traits.
//!
//! A plugin author implements these with ordinary std types; the SDK converts to
//! and from the stable ABI ([`crate::ffi`]) and catches panics at the boundary.
//! The host calls plugins through the same traits (see [`crate::bridge`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::PluginResult;

/// A row-major f32 matrix: one embedding (or one query's scores) per row.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Embeddings {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Builds a matrix, checking that `data` holds `rows * dim` values.
    pub fn new(rows: usize, dim: usize, data: Vec<f32>) -> PluginResult<Self> {
        if rows.checked_mul(dim) != Some(data.len()) {
            return Err(crate::PluginError::input(format!(
                "matrix of {rows}x{dim} needs {} values, got {}",
                rows.saturating_mul(dim),
                data.len()
            )));
        }
        Ok(Self { rows, dim, data })
    }
    /// Stacks equal-length rows.
    pub fn from_rows(rows: &[Vec<f32>]) -> PluginResult<Self> {
        let dim = rows.first().map_or(0, Vec::len);
        let mut data = Vec::with_capacity(rows.len() * dim);
        for (i, r) in rows.iter().enumerate() {
            if r.len() != dim {
                return Err(crate::PluginError::input(format!(
                    "row {i} has {} values, row 0 has {dim}",
                    r.len()
                )));
            }
            data.extend_from_slice(r);
        }
        Ok(Self { rows: rows.len(), dim, data })
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// What a retriever (an encoder) tells the host about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieverInfo {
    /// Human-readable model name.
    pub model: String,
    /// Changes whenever the embeddings would change (weights, pooling, max
    /// length, ...). The host keys its embedding cache on it.
    pub fingerprint: String,
    /// The corpus side's fingerprint when it is not the query side's: an
    /// asymmetric encoder whose passage tower is another model (a query tower
    /// trained over a frozen passage tower keeps the base's corpus
    /// embeddings, cached once). `None`: `fingerprint` covers both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus_fingerprint: Option<String>,
    pub dim: usize,
    /// Longest input in tokens; longer inputs are truncated.
    pub max_length: usize,
    /// Whether embeddings come out L2-normalised.
    pub normalized: bool,
}

impl RetrieverInfo {
    /// The fingerprint of the corpus side's embeddings.
    pub fn corpus_fingerprint(&self) -> &str {
        self.corpus_fingerprint.as_deref().unwrap_or(&self.fingerprint)
    }
}

/// An encoder of queries and corpus texts into dense vectors.
pub trait Retriever: Send + Sync {
    fn info(&self) -> RetrieverInfo;
    /// Encodes queries; `instruction` (FlagEmbedding's
    /// `query_instruction_for_retrieval`) overrides the configured one when given.
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings>;
    /// Encodes corpus-side texts (documents, and the prefixed augmentations of
    /// Reinforced-IR, which inference encodes on the corpus side).
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings>;
}

/// One chat message (OpenAI roles: system, user, assistant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: "system".into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: "assistant".into(), content: content.into() }
    }
}

/// A chat conversation or a raw completion prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

/// One generation request, with OpenAI's sampling parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    /// Number of samples to draw for this prompt.
    pub n: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Return per-token log-probabilities when the backend can.
    pub logprobs: bool,
}

impl GenerationRequest {
    /// A greedy single-sample request.
    pub fn greedy(prompt: Prompt, max_tokens: u32) -> Self {
        Self { prompt, n: 1, temperature: 0.0, top_p: 1.0, max_tokens, stop: vec![], seed: None, logprobs: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
}

/// What one request cost, as the backend counted it: tokens read and
/// written (None where the backend cannot tell, e.g. a server that sends no
/// `usage`) and HTTP retries. A generation request's usage covers all its
/// `n` completions and rides on the first of them (the others carry None),
/// as OpenAI's `usage` covers all choices of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RequestUsage {
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    #[serde(default)]
    pub retries: u32,
    /// Of `prompt_tokens`, those the backend did not compute for this
    /// request but took from its prefix cache (OpenAI's and vLLM's
    /// `usage.prompt_tokens_details.cached_tokens`); None where it cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
}

/// One sampled text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    /// "stop", "length", ... as OpenAI reports it.
    pub finish_reason: String,
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// The request's usage, on its first completion only (see [`RequestUsage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RequestUsage>,
}

impl Completion {
    /// A completion without logprobs or usage.
    pub fn text(text: impl Into<String>, finish_reason: impl Into<String>) -> Self {
        Self { text: text.into(), finish_reason: finish_reason.into(), logprobs: None, usage: None }
    }
}

/// One scoring request: how likely is `continuation` right after `prompt`?
/// (Teacher forcing: nothing is sampled.) A chat prompt is rendered with the
/// model's template and the assistant turn opened, so `continuation` is the
/// start of the assistant's reply; a text prompt is continued as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub prompt: Prompt,
    pub continuation: String,
}

/// The log-probability of a continuation: the sum over its tokens (natural
/// log), and each token's value in order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Score {
    pub logprob: f64,
    pub tokens: Vec<TokenLogprob>,
    /// The tokens read (prompt and continuation: `prompt_tokens`) and retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RequestUsage>,
}

impl Score {
    /// The mean per-token log-probability (0 for an empty continuation).
    pub fn mean(&self) -> f64 {
        if self.tokens.is_empty() {
            0.0
        } else {
            self.logprob / self.tokens.len() as f64
        }
    }
}

/// A text generator (an LLM behind a server or in-process).
pub trait Generator: Send + Sync {
    fn model_name(&self) -> String;
    /// Answers each request with exactly `n` completions, in request order.
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>>;
    /// [`Generator::generate`] that stops early with
    /// [`crate::PluginError::Cancelled`] once `progress.cancelled()` (a
    /// served request whose client went away). Generators that cannot stop
    /// mid-way keep this default, which checks only before starting.
    fn generate_with(&self, requests: &[GenerationRequest], progress: &dyn ProgressSink) -> PluginResult<Vec<Vec<Completion>>> {
        if progress.cancelled() {
            return Err(crate::PluginError::Cancelled);
        }
        self.generate(requests)
    }
    /// Scores each continuation under its prompt, in request order (UPR's
    /// query likelihood, the probability of "Yes" to a relevance question).
    /// Generators that cannot score keep this default.
    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        let _ = requests;
        Err(crate::PluginError::Unsupported("this generator cannot score continuations".into()))
    }
}

/// One thing to score: a query, the passage it came from (or the passage list
/// for a listwise judge), and the candidates to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardItem {
    pub query: String,
    /// The source passage (retriever feedback) or empty.
    pub reference: String,
    /// Augmentations (retriever feedback) or passages (generator feedback).
    pub candidates: Vec<String>,
}

/// Scores for one [`RewardItem`]: one per candidate, plus the baseline the
/// candidates compete against (e.g. the raw query–passage score), if any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardScores {
    /// The score the candidates compete against (retriever feedback: the
    /// raw query's score), if the reward has one.
    pub baseline: Option<f64>,
    /// One score per candidate, in the item's order.
    pub scores: Vec<f64>,
    /// The query weight w the scores were mixed with (retriever feedback:
    /// `w·e(q) + (1−w)·e(P+a)`), so that the host's pair rule uses the same
    /// w as the reward instead of a second copy of it.
    pub query_weight: Option<f64>,
    /// How many of the judge's answers for this item needed a fallback
    /// (generator feedback: a listwise answer with no usable permutation).
    pub fallbacks: u32,
}

/// The models a reward may consult: the ones the current stage runs with.
#[derive(Clone, Copy, Default)]
pub struct RewardContext<'a> {
    pub retriever: Option<&'a dyn Retriever>,
    pub generator: Option<&'a dyn Generator>,
}

/// Scores candidates using the retriever and/or generator it is handed.
pub trait Reward: Send + Sync {
    fn score(&self, ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>>;
}

/// A training job, spoken in files as LLaMA-Factory and FlagEmbedding do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// The model to start from (a directory, or a model source string).
    pub base_model: String,
    /// Training data (jsonl) in the format the trainer documents.
    pub data_file: PathBuf,
    /// Where the trained model goes; the trainer creates it.
    pub output_dir: PathBuf,
    /// Hyper-parameters as a TOML table (the trainer's own schema).
    pub params: String,
    /// The passage vectors an index holds for the data's passages, when the
    /// host has them: a safetensors file with `embeddings` (F32, passages ×
    /// dim) and `sha256` (U8, passages × 32: the SHA-256 of each passage's
    /// UTF-8 text), read and written by `rir_models::vectors`. A trainer
    /// that keeps the passage tower frozen trains the query tower against
    /// these (the vectors it will be searched against) instead of encoding
    /// the passages again; other trainers ignore it.
    #[serde(default)]
    pub passage_vectors: Option<PathBuf>,
}

/// What a finished training job reports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainReport {
    pub model_dir: PathBuf,
    pub steps: u64,
    pub seconds: f64,
    /// Training loss per optimiser step.
    pub loss: Vec<f64>,
    /// Any further per-run figures, as a JSON object.
    pub extra_json: String,
}

/// One progress update from a long-running plugin call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Progress {
    pub stage: String,
    pub done: u64,
    pub total: u64,
    pub loss: Option<f64>,
    pub message: String,
}

/// Where a plugin sends progress; also tells it when to stop.
pub trait ProgressSink: Sync {
    fn report(&self, progress: &Progress);
    fn cancelled(&self) -> bool {
        false
    }
}

/// A sink that discards everything.
pub struct NoProgress;
impl ProgressSink for NoProgress {
    fn report(&self, _: &Progress) {}
}

/// Trains a model from a data file into a new model directory.
pub trait Trainer: Send + Sync {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport>;
}

/// Top-k results for a batch of queries: `k` slots per query, row-major;
/// unused slots have id -1 and score -inf (faiss's convention).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hits {
    pub queries: usize,
    pub k: usize,
    pub ids: Vec<i64>,
    pub scores: Vec<f32>,
}

/// A vector index over inner products; ids are insertion order from 0.
pub trait Index: Send {
    fn dim(&self) -> usize;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn add(&mut self, vectors: &Embeddings) -> PluginResult<()>;
    fn search(&self, queries: &Embeddings, k: usize) -> PluginResult<Hits>;
    fn save(&self, path: &std::path::Path) -> PluginResult<()>;
    /// Replaces the contents with an index saved by [`Index::save`].
    fn load(&mut self, path: &std::path::Path) -> PluginResult<()>;
}

/// What a text retriever tells the host about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextRetrieverInfo {
    /// Human-readable model and settings ("BM25 k1=0.9 b=0.4, english/porter").
    pub model: String,
    /// Changes whenever the index or its scores would change (analyzer,
    /// parameters, index format). The host keys its index cache on it.
    pub fingerprint: String,
}

/// A retriever that searches texts itself (BM25 and other lexical models):
/// it builds its own index over a corpus and answers query texts with hits.
/// Hit ids are positions in the indexed corpus, as with [`Index`].
pub trait TextRetriever: Send + Sync {
    fn info(&self) -> TextRetrieverInfo;
    /// Indexes `texts` into the empty directory `dir` and keeps the index
    /// open for search. The host caches `dir` by corpus and fingerprint.
    fn build(&mut self, dir: &std::path::Path, texts: &[String], progress: &dyn ProgressSink) -> PluginResult<()>;
    /// Opens an index that [`TextRetriever::build`] wrote into `dir`.
    fn open(&mut self, dir: &std::path::Path) -> PluginResult<()>;
    /// Documents in the open index (0 before build or open).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `k` best documents for each query text (fewer slots filled when
    /// fewer documents match: id -1, score -inf).
    fn search(&self, queries: &[String], k: usize) -> PluginResult<Hits>;
}

/// Which table a plugin's `validate` is handed: the config of one of its
/// kinds, or a trainer job's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOf {
    Retriever,
    Generator,
    Reward,
    Trainer,
    Index,
    TextRetriever,
    /// A trainer job's `params` table.
    Params,
    /// A trainer job's `params` table, asked whether the programs the job
    /// would run (LLaMA-Factory's CLI, torchrun, a Python package) are
    /// installed here: `Err(PluginError::Resource)` naming each missing one
    /// and how to install it. Plugins that run nothing outside keep the
    /// default `Ok`. `rir run` asks before any work (a dry run lists them).
    Requirements,
}

impl ConfigOf {
    /// The name that crosses the ABI.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigOf::Retriever => "retriever",
            ConfigOf::Generator => "generator",
            ConfigOf::Reward => "reward",
            ConfigOf::Trainer => "trainer",
            ConfigOf::Index => "index",
            ConfigOf::TextRetriever => "text-retriever",
            ConfigOf::Params => "params",
            ConfigOf::Requirements => "requirements",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [ConfigOf::Retriever, ConfigOf::Generator, ConfigOf::Reward, ConfigOf::Trainer, ConfigOf::Index, ConfigOf::TextRetriever, ConfigOf::Params, ConfigOf::Requirements]
            .into_iter().find(|c| c.as_str() == s)
    }
}
