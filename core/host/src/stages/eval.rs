//! `rir eval`: dataset → encode (cached) → optional generator augmentation →
//! search → metrics → run file, results JSON and a table.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use rir_sdk::{Embeddings, GenerationRequest, Hits};
use serde_json::json;

use crate::engine::data;
use crate::engine::encode::{self, EmbeddingCache, Side};
use crate::engine::generate::{generate_all, GenerationCache};
use crate::engine::metrics::{self, Averaging, Measure, Run};
use crate::plugins::PluginHost;
use crate::engine::prompts;
use crate::engine::report::{Results, RESULTS_SCHEMA};
use crate::engine::runfile;

/// Where top-k search happens.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexChoice {
    /// The built-in exact inner-product search.
    Exact,
    /// An Index plugin with its config table (`faiss:SPEC` → plugin "faiss", `factory = SPEC`).
    Plugin {
        /// The index plugin's registry name.
        name: String,
        /// Its config table (TOML text).
        config: String,
    },
}

impl std::fmt::Display for IndexChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexChoice::Exact => f.write_str("flat"),
            IndexChoice::Plugin { name, config } => write!(f, "{name} ({config})"),
        }
    }
}

impl std::str::FromStr for IndexChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flat" | "exact" => Ok(IndexChoice::Exact),
            _ => match s.split_once(':') {
                Some((name, spec)) if !spec.is_empty() => Ok(IndexChoice::Plugin {
                    name: name.to_owned(),
                    config: format!("factory = {}", toml::Value::String(spec.to_owned())),
                }),
                _ => Err(format!("index {s:?}: use `flat`, or PLUGIN:FACTORY such as `faiss:HNSW32,Flat`")),
            },
        }
    }
}

/// Everything one evaluation needs (what `rir eval`'s flags and an
/// experiment's `[eval]` table become).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// A dataset name (fetched into the cache) or a BEIR directory.
    pub dataset: String,
    /// The qrels split (None: the dataset's evaluation split).
    pub split: Option<String>,
    /// A local BEIR mirror to fetch from.
    pub mirror: Option<PathBuf>,
    /// The retriever plugin's registry name.
    pub retriever: String,
    /// Its config table (TOML text).
    pub retriever_config: String,
    /// Overrides the retriever's own query instruction.
    pub query_instruction: Option<String>,
    /// A generator plugin that augments each query (None: plain queries).
    pub generator: Option<String>,
    /// Its config table (TOML text).
    pub generator_config: String,
    /// Weight of the query embedding in the augmentation mix (DESIGN §1.4).
    pub query_weight: f64,
    /// Tokens per augmentation.
    pub augmentation_max_tokens: u32,
    /// Where search happens.
    pub index: IndexChoice,
    /// Results kept per query.
    pub k: usize,
    /// The measures computed.
    pub measures: Vec<Measure>,
    /// Over which queries means are taken.
    pub averaging: Averaging,
    /// Drop results whose document id is the query's id (BEIR does).
    pub ignore_identical_ids: bool,
    /// Texts per plugin call.
    pub batch: usize,
    /// Augmentation requests per generator call.
    pub generation_batch: usize,
    /// Read and write the embedding and generation caches.
    pub use_cache: bool,
    /// The directory NAME.DATASET.{trec,json} go to.
    pub output: PathBuf,
    /// The run's name (checked: it becomes a file name).
    pub name: String,
    /// Where the run sits in an experiment (`{"name", "variant",
    /// "variant_index"}`), recorded so `rir table` can order runs as the
    /// experiment lists them, whatever order a shell glob gives the files.
    pub experiment: Option<serde_json::Value>,
}

/// What an evaluation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The dataset cannot be fetched or read.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// Loading or calling a plugin failed.
    #[error(transparent)]
    Host(#[from] crate::HostError),
    /// Encoding (or its cache) failed.
    #[error(transparent)]
    Encode(#[from] encode::EncodeError),
    /// Augmenting (or its cache) failed.
    #[error(transparent)]
    Generate(#[from] crate::engine::generate::GenerateError),
    /// The index plugin failed.
    #[error("index plugin '{plugin}': {source}")]
    Index {
        /// Its registry name.
        plugin: String,
        /// Its error.
        #[source]
        source: rir_sdk::PluginError,
    },
    /// The run file cannot be written.
    #[error(transparent)]
    RunFile(#[from] runfile::RunFileError),
    /// The results file cannot be written.
    #[error(transparent)]
    Report(#[from] crate::engine::report::ReportError),
    /// A file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A name or option refused before any work.
    #[error("{0}")]
    Invalid(String),
}

/// Numeric options that would give wrong numbers silently: refused with the range.
pub fn check_k(k: usize) -> Result<(), String> {
    if k == 0 {
        return Err("k (results per query) must be at least 1".into());
    }
    Ok(())
}

/// The query's share of the augmentation mix: a number in [0, 1].
pub fn check_query_weight(w: f64) -> Result<(), String> {
    if !w.is_finite() || !(0.0..=1.0).contains(&w) {
        return Err(format!("query_weight must be a number in [0, 1] (the query's share of the mix), got {w}"));
    }
    Ok(())
}

/// What `run` produced, with where it wrote it.
pub struct EvalOutput {
    /// The measured results.
    pub results: Results,
    /// The TREC run file written.
    pub run_file: PathBuf,
    /// The results JSON written.
    pub results_file: PathBuf,
}

/// The options that would give wrong numbers or paths, refused before any work.
fn check(o: &EvalOptions) -> Result<(), EvalError> {
    // The name becomes NAME.DATASET.{trec,json} inside `output`.
    crate::util::paths::check_name("--name", &o.name).map_err(EvalError::Invalid)?;
    check_k(o.k).and(check_query_weight(o.query_weight)).map_err(EvalError::Invalid)?;
    for (key, v) in [("batch", o.batch), ("generation_batch", o.generation_batch)] {
        if v == 0 {
            return Err(EvalError::Invalid(format!("{key} must be at least 1")));
        }
    }
    Ok(())
}

/// What produces the first-stage ranking.
pub enum FirstStage<'a> {
    /// An encoder: corpus and queries embedded (cached), then searched with the chosen index.
    Dense(&'a dyn rir_sdk::Retriever),
    /// A text retriever (BM25...) that indexes the corpus itself (the index is cached).
    Text(&'a mut dyn rir_sdk::TextRetriever),
}

/// Loads the dataset and plugins, encodes (augmenting queries when a
/// generator is given), searches, evaluates, and writes the run and results.
/// A retriever plugin that provides the `text-retriever` kind (BM25) is
/// searched with texts instead.
pub fn run(host: &PluginHost, o: &EvalOptions) -> Result<EvalOutput, EvalError> {
    check(o)?;
    let t = Instant::now();
    let ds = data::open(&o.dataset, o.split.as_deref(), &host.settings.cache_dir, o.mirror.as_deref())?;
    for w in ds.report.warnings() {
        log::warn!("{}: {w}", ds.dir.display());
    }
    let mut timings = BTreeMap::new();
    timings.insert("load".to_owned(), t.elapsed().as_secs_f64());
    let plugin = host.load(&o.retriever)?;
    let generator = o.generator.as_ref().map(|g| generator_for(host, g, &o.generator_config, o.experiment.is_some())).transpose()?;
    if is_text_retriever(&plugin) {
        let mut tr = plugin.text_retriever(&o.retriever_config)?;
        return evaluate(host, o, &ds, FirstStage::Text(tr.as_mut()), generator.as_deref(), timings);
    }
    let retriever = plugin.retriever(&o.retriever_config)?;
    evaluate(host, o, &ds, FirstStage::Dense(retriever.as_ref()), generator.as_deref(), timings)
}

/// Model names of the generators the current experiment run has loaded, by
/// (plugin, config): a step of the same generator later in the run
/// (`rir run`'s "both" after "+RLRF") then finds its augmentations in the
/// generation cache without loading the model — v9's "both" spent 64 s and
/// 14.5 GB loading a generator it never called (and so did v11's, 60 s and
/// 14.7 GB, before `rir run`'s steps came through here too). Kept to one run
/// ([`forget_loaded_generators`] at its start) and to its steps: a model
/// file rewritten between two loads under the same config (a library user
/// retraining into the same directory) must not keep its old name.
static LOADED_NAMES: std::sync::Mutex<BTreeMap<(String, String), String>> = std::sync::Mutex::new(BTreeMap::new());

/// Starts a new experiment run's record of loaded generators.
pub fn forget_loaded_generators() {
    if let Ok(mut m) = LOADED_NAMES.lock() {
        m.clear();
    }
}

/// The generator of an eval or of a `rir run` step: loaded now, or — when a
/// step of this experiment run loaded the same plugin and config before — a
/// [`LazyGenerator`] that loads it only if some augmentation is not cached.
pub(crate) fn generator_for(host: &PluginHost, name: &str, config: &str, in_run: bool) -> Result<Box<dyn rir_sdk::Generator>, crate::HostError> {
    let plugin = host.load(name)?;
    if !in_run {
        return Ok(plugin.generator(config)?);
    }
    let key = (name.to_owned(), config.to_owned());
    if let Some(model) = LOADED_NAMES.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(Box::new(LazyGenerator { plugin, config: config.to_owned(), model, loaded: std::sync::OnceLock::new() }));
    }
    let g = plugin.generator(config)?;
    if let Ok(mut m) = LOADED_NAMES.lock() {
        m.insert(key, g.model_name());
    }
    Ok(g)
}

/// A generator whose model name is known (the same plugin and config
/// loaded earlier in this process), loaded at its first request.
struct LazyGenerator {
    plugin: std::sync::Arc<crate::plugins::Plugin>,
    config: String,
    model: String,
    loaded: std::sync::OnceLock<Result<Box<dyn rir_sdk::Generator>, String>>,
}

impl LazyGenerator {
    fn get(&self) -> rir_sdk::PluginResult<&dyn rir_sdk::Generator> {
        match self.loaded.get_or_init(|| {
            log::info!("loading the generator: an augmentation is not in the cache");
            self.plugin.generator(&self.config).map_err(|e| e.to_string())
        }) {
            Ok(g) => Ok(g.as_ref()),
            Err(e) => Err(rir_sdk::PluginError::other(e.clone())),
        }
    }
}

impl rir_sdk::Generator for LazyGenerator {
    fn model_name(&self) -> String {
        self.model.clone()
    }
    fn generate(&self, requests: &[GenerationRequest]) -> rir_sdk::PluginResult<Vec<Vec<rir_sdk::Completion>>> {
        self.get()?.generate(requests)
    }
    fn generate_with(&self, requests: &[GenerationRequest], progress: &dyn rir_sdk::ProgressSink) -> rir_sdk::PluginResult<Vec<Vec<rir_sdk::Completion>>> {
        self.get()?.generate_with(requests, progress)
    }
    fn score(&self, requests: &[rir_sdk::ScoreRequest]) -> rir_sdk::PluginResult<Vec<rir_sdk::Score>> {
        self.get()?.score(requests)
    }
}

/// Whether a plugin is used through its text-retriever kind (it provides
/// that kind and no encoder).
pub fn is_text_retriever(p: &crate::plugins::Plugin) -> bool {
    use crate::plugins::registry::Kind;
    p.has(Kind::TextRetriever) && !p.has(Kind::Retriever)
}

/// [`run`] with the dataset open and the models loaded (what `rir run`
/// does for each variant): `o`'s plugin names and configs are only
/// recorded in the results (and name the generation cache).
pub fn run_loaded(
    host: &PluginHost,
    o: &EvalOptions,
    ds: &data::Dataset,
    first: FirstStage<'_>,
    generator: Option<&dyn rir_sdk::Generator>,
) -> Result<EvalOutput, EvalError> {
    check(o)?;
    evaluate(host, o, ds, first, generator, BTreeMap::new())
}

/// The evaluation itself; `timings` holds what the caller already timed.
fn evaluate(
    host: &PluginHost,
    o: &EvalOptions,
    ds: &data::Dataset,
    first: FirstStage<'_>,
    generator: Option<&dyn rir_sdk::Generator>,
    mut timings: BTreeMap<String, f64>,
) -> Result<EvalOutput, EvalError> {
    let cache_root = host.settings.cache_dir.clone();
    let doc_texts: Vec<String> = ds.corpus.iter().map(data::Doc::encoder_text).collect();
    let query_texts: Vec<String> = ds.queries.iter().map(|(_, t)| t.clone()).collect();
    let gname = o.generator.as_deref().unwrap_or_default();
    let gen_json = |generator: &dyn rir_sdk::Generator, from_cache: usize, how: &str| {
        json!({
            "plugin": gname, "config": o.generator_config, "model": generator.model_name(),
            "query_weight": o.query_weight, "max_tokens": o.augmentation_max_tokens,
            "prefix": prompts::AUGMENTATION_PREFIX, "from_cache": from_cache, "query_side": how,
        })
    };

    let (hits, retriever_json, encode_json, generation) = match first {
        FirstStage::Dense(retriever) => {
            let info = retriever.info();
            let cache = o.use_cache.then(|| EmbeddingCache::new(&cache_root, &info));
            let (corpus, corpus_stats) = encode::encode(retriever, Side::Corpus, &doc_texts, cache.as_ref(), o.batch, "corpus")?;
            timings.insert("encode_corpus".to_owned(), corpus_stats.seconds);
            let side = Side::Query(o.query_instruction.as_deref());
            let (mut queries, query_stats) = encode::encode(retriever, side, &query_texts, cache.as_ref(), o.batch, "queries")?;
            timings.insert("encode_queries".to_owned(), query_stats.seconds);
            let mut generation = serde_json::Value::Null;
            if let Some(generator) = generator {
                let t = Instant::now();
                let task = prompts::task_for(&ds.name);
                let gcache = o.use_cache.then(|| GenerationCache::for_generator(&cache_root, gname, &o.generator_config, generator));
                let ask = AugmentRequest::greedy(o.augmentation_max_tokens);
                let a = augment_queries(retriever, &queries, generator, gcache.as_ref(), &task, &query_texts, &ask, o.query_weight, cache.as_ref(), o.batch, o.generation_batch)?;
                timings.insert("generate".to_owned(), t.elapsed().as_secs_f64());
                queries = a.embeddings;
                generation = gen_json(generator, a.from_cache, "embedding mix");
            }
            let t = Instant::now();
            let hits = search(host, &o.index, &queries, &corpus, o.k)?;
            timings.insert("search".to_owned(), t.elapsed().as_secs_f64());
            let rj = json!({"plugin": o.retriever, "config": o.retriever_config, "info": info, "query_instruction": o.query_instruction});
            (hits, rj, json!({"corpus": corpus_stats, "queries": query_stats}), generation)
        }
        FirstStage::Text(retriever) => {
            let t = Instant::now();
            let cached = crate::engine::lexical::open_or_build(&o.retriever, retriever, &doc_texts, o.use_cache.then_some(cache_root.as_path()))?;
            timings.insert("index".to_owned(), t.elapsed().as_secs_f64());
            let mut lexical_queries = query_texts.clone();
            let mut generation = serde_json::Value::Null;
            if let Some(generator) = generator {
                let t = Instant::now();
                let task = prompts::task_for(&ds.name);
                let gcache = o.use_cache.then(|| GenerationCache::for_generator(&cache_root, gname, &o.generator_config, generator));
                let (augmentations, from_cache) = augmentations(generator, gcache.as_ref(), &task, &query_texts, &AugmentRequest::greedy(o.augmentation_max_tokens), o.generation_batch)?;
                timings.insert("generate".to_owned(), t.elapsed().as_secs_f64());
                lexical_queries = query_texts.iter().zip(&augmentations).map(|(q, a)| crate::engine::lexical::query2doc(q, a)).collect();
                generation = gen_json(generator, from_cache, "query2doc");
            }
            let t = Instant::now();
            let hits = crate::engine::lexical::search(&o.retriever, retriever, &lexical_queries, o.k, o.batch)?;
            timings.insert("search".to_owned(), t.elapsed().as_secs_f64());
            let rj = json!({"plugin": o.retriever, "config": o.retriever_config, "info": retriever.info(), "kind": "text-retriever"});
            (hits, rj, json!({"index_from_cache": cached}), generation)
        }
    };

    let run = crate::engine::search::hits_to_run(ds, &hits);
    let config = json!({
        "retriever": retriever_json,
        "generator": generation,
        "index": o.index.to_string(),
        "k": o.k,
        "ignore_identical_ids": o.ignore_identical_ids,
        "dataset": {"dir": ds.dir, "docs": ds.corpus.len(), "queries": ds.queries.len(),
                    "load_report": ds.report},
        "encode": encode_json,
        "threads": host.settings.threads,
        "experiment": o.experiment,
    });
    let out = Scoring { measures: &o.measures, averaging: o.averaging, ignore_identical_ids: o.ignore_identical_ids, output: &o.output, name: &o.name };
    out.write(ds, &run, timings, config)
}

/// The dataset that judges a run made from other runs, how, and where it
/// goes: what `rir fuse` and `rir rerank` share (and write through
/// [`Scoring`], as `rir eval` does).
#[derive(Debug, Clone)]
pub struct Judging {
    /// The dataset whose qrels judge the run (name or BEIR directory).
    pub dataset: String,
    /// The qrels split (None: the dataset's evaluation split).
    pub split: Option<String>,
    /// A local BEIR mirror.
    pub mirror: Option<PathBuf>,
    /// The measures computed.
    pub measures: Vec<Measure>,
    /// Over which queries means are taken.
    pub averaging: Averaging,
    /// Drop results whose document id is the query's id.
    pub ignore_identical_ids: bool,
    /// Where NAME.DATASET.{trec,json} go.
    pub output: PathBuf,
    /// The run's name (checked: it becomes a file name).
    pub name: String,
    /// Where the run sits in an experiment, as for `rir eval`.
    pub experiment: Option<serde_json::Value>,
}

impl Judging {
    /// Refuses a name that would leave the output directory.
    pub fn check(&self) -> Result<(), EvalError> {
        crate::util::paths::check_name("--name", &self.name).map_err(EvalError::Invalid)
    }
    /// Opens (fetches) the dataset.
    pub fn open(&self, cache_dir: &std::path::Path) -> Result<data::Dataset, EvalError> {
        Ok(data::open(&self.dataset, self.split.as_deref(), cache_dir, self.mirror.as_deref())?)
    }
    /// The writer of the judged run.
    pub fn scoring(&self) -> Scoring<'_> {
        Scoring { measures: &self.measures, averaging: self.averaging, ignore_identical_ids: self.ignore_identical_ids, output: &self.output, name: &self.name }
    }
}

/// How a finished run is judged and where it is written: what `rir eval`,
/// `rir fuse` and `rir rerank` share.
pub struct Scoring<'a> {
    /// The measures computed.
    pub measures: &'a [Measure],
    /// Over which queries means are taken.
    pub averaging: Averaging,
    /// Drop results whose document id is the query's id.
    pub ignore_identical_ids: bool,
    /// The directory NAME.DATASET.{trec,json} go to.
    pub output: &'a std::path::Path,
    /// The run's name (checked by the caller: it becomes a file name).
    pub name: &'a str,
}

impl Scoring<'_> {
    /// Evaluates `run` on `ds`'s qrels and writes the run file and the
    /// results JSON (`config` is recorded as is; `timings` gains `evaluate`).
    pub fn write(&self, ds: &data::Dataset, run: &Run, mut timings: BTreeMap<String, f64>, config: serde_json::Value) -> Result<EvalOutput, EvalError> {
        let t = Instant::now();
        let evaluation = metrics::evaluate(&ds.qrels, run, self.measures, self.averaging, self.ignore_identical_ids);
        timings.insert("evaluate".to_owned(), t.elapsed().as_secs_f64());
        crate::util::paths::ensure_dir(self.output).map_err(|source| EvalError::Io { path: self.output.to_owned(), source })?;
        let run_file = self.output.join(format!("{}.{}.trec", self.name, ds.name));
        runfile::write(&run_file, run, self.name)?;
        let results = Results {
            schema: RESULTS_SCHEMA.into(),
            name: self.name.to_owned(),
            dataset: ds.name.clone(),
            split: ds.split.clone(),
            evaluation,
            timings,
            config,
            rir_version: env!("CARGO_PKG_VERSION").into(),
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let results_file = self.output.join(format!("{}.{}.json", self.name, ds.name));
        results.write(&results_file)?;
        Ok(EvalOutput { results, run_file, results_file })
    }
}

/// Queries augmented by a generator, as Reinforced-IR encodes them.
pub struct Augmented {
    /// w·e(query) + (1−w)·e_corpus(prefix + augmentation), one row a query.
    pub embeddings: Embeddings,
    /// The generator's augmentations (trimmed, without the prefix).
    pub augmentations: Vec<String>,
    /// Augmentations read from the generation cache.
    pub from_cache: usize,
}

/// Reinforced-IR's query side with a generator (DESIGN §1.4): each query's
/// augmentation (the `task`'s prompt, greedy, `max_tokens`), encoded on the
/// corpus side after the fixed prefix and mixed with the query's own
/// embedding `query_emb` by `query_weight`. Both caches are used when given;
/// `batch` texts per encoder call, `generation_batch` requests per generator call.
#[allow(clippy::too_many_arguments)]
pub fn augment_queries(
    retriever: &dyn rir_sdk::Retriever,
    query_emb: &Embeddings,
    generator: &dyn rir_sdk::Generator,
    gcache: Option<&GenerationCache>,
    task: &prompts::Task,
    queries: &[String],
    ask: &AugmentRequest,
    query_weight: f64,
    cache: Option<&EmbeddingCache>,
    batch: usize,
    generation_batch: usize,
) -> Result<Augmented, EvalError> {
    let (augmentations, from_cache) = augmentations(generator, gcache, task, queries, ask, generation_batch)?;
    let prefixed: Vec<String> = augmentations.iter().map(|a| format!("{}{a}", prompts::AUGMENTATION_PREFIX)).collect();
    let (aug_emb, _) = encode::encode(retriever, Side::Corpus, &prefixed, cache, batch, "augment-enc")?;
    Ok(Augmented { embeddings: encode::mix(query_emb, &aug_emb, query_weight as f32), augmentations, from_cache })
}

/// How each query's augmentation is asked for. The method's (and every
/// stage's) is [`AugmentRequest::greedy`]: the chat prompt, temperature 0.
/// The seed's `model_type = "llm"` (a base model without a chat template)
/// sends the same text as a plain completion prompt instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentRequest {
    /// Tokens per augmentation.
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// A chat prompt (the generator's template applies) or plain text.
    pub chat: bool,
}

impl AugmentRequest {
    /// Greedy, through the chat template: what the method's stages ask.
    pub fn greedy(max_tokens: u32) -> Self {
        Self { max_tokens, temperature: 0.0, chat: true }
    }

    fn request(&self, task: &prompts::Task, query: &str) -> GenerationRequest {
        let mut prompt = prompts::augmentation(task, query);
        if !self.chat {
            if let rir_sdk::Prompt::Chat(m) = &prompt {
                prompt = rir_sdk::Prompt::Text(format!("{}\n", m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")));
            }
        }
        let mut r = GenerationRequest::greedy(prompt, self.max_tokens);
        if self.temperature > 0.0 {
            // Sampled, but seeded: the same call gives the same augmentation
            // (and the generation cache stays truthful).
            r.temperature = self.temperature;
            r.seed = Some(0);
        }
        r
    }
}

/// The generator's augmentation of each query (as `ask` says; trimmed),
/// and how many came from the cache.
fn augmentations(
    generator: &dyn rir_sdk::Generator,
    gcache: Option<&GenerationCache>,
    task: &prompts::Task,
    queries: &[String],
    ask: &AugmentRequest,
    generation_batch: usize,
) -> Result<(Vec<String>, usize), EvalError> {
    let requests: Vec<GenerationRequest> = queries.iter().map(|q| ask.request(task, q)).collect();
    let (completions, from_cache) = generate_all(generator, &requests, gcache, generation_batch.max(1), "augment")?;
    Ok((completions.iter().map(|c| c.first().map_or("", |c| c.text.trim()).to_owned()).collect(), from_cache))
}

/// Top-k with the chosen index.
pub fn search(host: &PluginHost, index: &IndexChoice, queries: &Embeddings, corpus: &Embeddings, k: usize) -> Result<Hits, EvalError> {
    match index {
        IndexChoice::Exact => Ok(crate::engine::search::exact_topk(queries, corpus, k, host.settings.threads)),
        IndexChoice::Plugin { name, config } => {
            let err = |source| EvalError::Index { plugin: name.clone(), source };
            let mut idx = host.load(name)?.index(config, corpus.dim)?;
            idx.add(corpus).map_err(err)?;
            idx.search(queries, k.min(corpus.rows)).map_err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AugmentRequest;
    use rir_sdk::Prompt;

    /// The method's request is greedy chat; the seed's `llm` model type gets
    /// the same words as plain text; a temperature samples with a fixed seed.
    #[test]
    fn augment_requests_follow_the_model_type_and_temperature() {
        let task = crate::engine::prompts::task_for("scifact");
        let chat = AugmentRequest::greedy(64).request(&task, "q?");
        assert!(matches!(&chat.prompt, Prompt::Chat(m) if m.len() == 1 && m[0].content.ends_with("q?")));
        assert_eq!((chat.temperature, chat.seed, chat.max_tokens), (0.0, None, 64));
        let text = AugmentRequest { chat: false, ..AugmentRequest::greedy(64) }.request(&task, "q?");
        let Prompt::Chat(m) = &chat.prompt else { unreachable!() };
        assert_eq!(text.prompt, Prompt::Text(format!("{}\n", m[0].content)));
        let hot = AugmentRequest { temperature: 0.7, ..AugmentRequest::greedy(64) }.request(&task, "q?");
        assert_eq!((hot.temperature, hot.seed), (0.7, Some(0)));
    }
}
