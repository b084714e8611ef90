//! Experiments: one TOML names the datasets, the plugin for every role, the
//! stages' settings, the rounds and the variants to compare; `rir run`
//! executes the plan (queries → rlrf-data → rlrf-train → rlgf-data →
//! rlgf-train per round, then one evaluation per variant and dataset) and
//! prints the comparison table.
//!
//! Every stage's output lives in `OUTPUT/NAME/DATASET/STAGE-HASH/`, HASH
//! covering everything the stage reads (its settings, the plugins' names,
//! versions and configs, model fingerprints, the upstream stages' hashes).
//! A stage is built in a `.partial` directory renamed into place when it
//! succeeds, so an interrupted run (Ctrl-C or a kill) leaves no half-written
//! output, and a rerun reuses every finished stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::HostError;
use crate::plugins::PluginHost;
use crate::stages::queries::QueriesConfig;
use crate::plugins::registry::Kind;
use crate::stages::rlgf::RlgfDataConfig;
use crate::stages::rlrf::RlrfDataConfig;

/// A plugin and its config table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The plugin's registry name.
    pub plugin: String,
    /// Its config table.
    #[serde(default)]
    pub config: toml::Table,
    /// `[generator]` only: what a million tokens read and written cost (a
    /// hosted API's price), for the cost column of the run's summary and
    /// the dry run's estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<crate::engine::generate::Price>,
}

impl PluginSpec {
    /// A plugin with its config table (and no price).
    pub fn new(plugin: impl Into<String>, config: toml::Table) -> Self {
        Self { plugin: plugin.into(), config, price: None }
    }
}

/// A trainer plugin, its own config table and the job's hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainerSpec {
    /// The trainer plugin's registry name.
    pub plugin: String,
    /// Its own config table.
    #[serde(default)]
    pub config: toml::Table,
    /// The job's hyper-parameters (the trainer's schema).
    #[serde(default)]
    pub params: toml::Table,
}

/// `[rewards]`: the feedback of each loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewards {
    /// RLRF's: the retriever scores the generator's augmentations.
    #[serde(default = "d_rr")]
    pub retriever: PluginSpec,
    /// RLGF's: the generator scores (reranks) the retriever's candidates.
    #[serde(default = "d_gr")]
    pub generator: PluginSpec,
}
fn d_rr() -> PluginSpec {
    PluginSpec::new("retriever-reward", toml::Table::new())
}
fn d_gr() -> PluginSpec {
    PluginSpec::new("generator-reward", toml::Table::new())
}
impl Default for Rewards {
    fn default() -> Self {
        Rewards { retriever: d_rr(), generator: d_gr() }
    }
}

/// `[trainers]`: who trains each model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Trainers {
    /// RLRF's generator trainer (DPO).
    #[serde(default = "d_gt")]
    pub generator: TrainerSpec,
    /// RLGF's retriever trainer.
    #[serde(default = "d_rt")]
    pub retriever: TrainerSpec,
    /// The GPL-style peer's params for the retriever trainer (`[trainers.gpl]
    /// params`); default: the retriever's, with `loss = "infonce"`,
    /// `answer_weight = 0` and no `false_negative_margin` (its data has no
    /// answers and no teacher scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpl: Option<GplTrainer>,
}

/// `[trainers.gpl]`: the GPL-style peer's own hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GplTrainer {
    /// The retriever trainer's params for the peer (the whole table).
    pub params: toml::Table,
}

impl Trainers {
    /// The params the GPL-style peer trains with (see [`Trainers::gpl`]).
    pub fn gpl_params(&self) -> toml::Table {
        if let Some(g) = &self.gpl {
            return g.params.clone();
        }
        let mut params = self.retriever.params.clone();
        params.insert("loss".into(), toml::Value::String("infonce".into()));
        params.insert("answer_weight".into(), toml::Value::Float(0.0));
        params.remove("false_negative_margin");
        params
    }
}
fn d_gt() -> TrainerSpec {
    TrainerSpec { plugin: "dpo-trainer".into(), config: toml::Table::new(), params: toml::Table::new() }
}
fn d_rt() -> TrainerSpec {
    TrainerSpec { plugin: "contrastive-trainer".into(), config: toml::Table::new(), params: toml::Table::new() }
}
impl Default for Trainers {
    fn default() -> Self {
        Trainers { generator: d_gt(), retriever: d_rt(), gpl: None }
    }
}

/// `[stages]`: the data stages' settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stages {
    /// `[stages.queries]`.
    #[serde(default)]
    pub queries: QueriesConfig,
    /// `[stages.rlrf]`.
    #[serde(default)]
    pub rlrf: RlrfDataConfig,
    /// `[stages.rlgf]`.
    #[serde(default)]
    pub rlgf: RlgfDataConfig,
}

/// `[eval]`: how every variant is evaluated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Measures, ir-measures names.
    #[serde(default = "d_measures")]
    pub measures: Vec<String>,
    /// Results kept per query.
    #[serde(default = "d_k")]
    pub k: usize,
    /// w of the augmentation mix (`rir_sdk::method::QUERY_WEIGHT` by default).
    #[serde(default = "d_w")]
    pub query_weight: f64,
    /// Tokens per augmentation.
    #[serde(default = "d_aug")]
    pub augmentation_max_tokens: u32,
    /// The qrels split (default: the dataset's evaluation split).
    #[serde(default)]
    pub split: Option<String>,
    /// Significance level of the table's marks.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Multiple-comparison correction of the marks (every variant against the first).
    #[serde(default)]
    pub correction: crate::engine::report::Correction,
    // Options `rir eval` has as flags. Defaults are not serialized, so stage
    // keys made before these keys existed still hold.
    /// `flat` (exact) or `PLUGIN:FACTORY` (`faiss:HNSW32,Flat`).
    #[serde(default = "d_index", skip_serializing_if = "is_d_index")]
    pub index: String,
    /// `run` (trec_eval, BEIR) or `qrels` (trec_eval -c).
    #[serde(default = "d_averaging", skip_serializing_if = "is_d_averaging")]
    pub averaging: String,
    /// BEIR drops results whose doc id equals the query id.
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    pub ignore_identical_ids: bool,
    /// The retriever's query instruction (FlagEmbedding's), overriding its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_instruction: Option<String>,
    /// Texts per encoder call.
    #[serde(default = "crate::util::defaults::usize_of::<32>", skip_serializing_if = "crate::util::defaults::is_usize::<32>")]
    pub batch: usize,
    /// Augmentation requests per generator call.
    #[serde(default = "crate::util::defaults::usize_of::<8>", skip_serializing_if = "crate::util::defaults::is_usize::<8>")]
    pub generation_batch: usize,
}
fn d_index() -> String {
    "flat".into()
}
fn is_d_index(v: &String) -> bool {
    *v == d_index()
}
fn d_averaging() -> String {
    "run".into()
}
fn is_d_averaging(v: &String) -> bool {
    *v == d_averaging()
}
fn d_true() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}

fn d_measures() -> Vec<String> {
    ["nDCG@10", "R@100", "RR@10"].iter().map(|s| s.to_string()).collect()
}
fn d_k() -> usize {
    1000
}
fn d_w() -> f64 {
    rir_sdk::method::QUERY_WEIGHT
}
fn d_aug() -> u32 {
    300
}
fn d_alpha() -> f64 {
    0.05
}
impl Default for EvalSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Which generator augments queries in a variant.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GeneratorChoice {
    /// No augmentation: the retriever alone.
    #[default]
    None,
    /// The untuned generator (HyDE / Query2doc-style zero-shot augmentation).
    Base,
    /// The generator after RLRF of the variant's round.
    Rlrf,
}

/// Which retriever a variant evaluates.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RetrieverChoice {
    /// The experiment's retriever, untrained.
    #[default]
    Base,
    /// The retriever after RLGF of the variant's round.
    Rlgf,
    /// GPL/InPars-style: the retriever of the variant's round trained on the
    /// same pseudo queries and mined negatives, the source passage as the
    /// positive, no generator feedback and no answers (the trainer's InfoNCE loss).
    Gpl,
    /// The experiment's `[lexical]` text retriever (BM25 by default): the
    /// baseline every IR table has. With a generator, queries are expanded
    /// Query2doc-style.
    Lexical,
}

/// One row of the comparison table: a set of overrides of the base setup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// The row's name (checked: it becomes a file name).
    pub name: String,
    /// The generator that augments queries, if any.
    #[serde(default)]
    pub generator: GeneratorChoice,
    /// The retriever evaluated.
    #[serde(default)]
    pub retriever: RetrieverChoice,
    /// Which round's models (default: the last).
    #[serde(default)]
    pub round: Option<usize>,
    /// Overrides the experiment's `eval.query_weight`.
    #[serde(default)]
    pub query_weight: Option<f64>,
    /// A fusion of earlier variants' runs instead of a retriever of its own.
    #[serde(default)]
    pub fuse: Option<FuseSpec>,
    /// An earlier variant's run reranked instead of a retriever of its own.
    #[serde(default)]
    pub rerank: Option<RerankSpec>,
}

/// `rerank = { run = "BM25", depth = 100, generator = "rlrf" }`: a variant
/// whose run is an earlier variant's top `depth` scored again by
/// `[rewards.generator]` with the chosen generator (`rir rerank`'s options):
/// with `mode = "query_likelihood"` that is UPR reranking, and `rlrf`
/// against `base` shows whether RLRF's generator reranks better.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RerankSpec {
    /// The variant reranked (listed before this one).
    pub run: String,
    /// Results reranked (and kept) per query.
    #[serde(default = "d_rerank_depth")]
    pub depth: usize,
    /// Queries per reranker call.
    #[serde(default = "d_rerank_batch")]
    pub batch: usize,
    /// The generator that scores: `base` (default) or `rlrf` (the variant's round).
    #[serde(default = "d_rerank_gen")]
    pub generator: GeneratorChoice,
}
fn d_rerank_depth() -> usize {
    100
}
fn d_rerank_batch() -> usize {
    4
}
fn d_rerank_gen() -> GeneratorChoice {
    GeneratorChoice::Base
}

/// `fuse = { runs = ["+RLGF", "BM25"], method = "rrf" }`: a variant whose
/// run fuses earlier variants' runs (`rir fuse`'s options).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FuseSpec {
    /// The variants fused (two or more, listed before this one).
    pub runs: Vec<String>,
    /// rrf, combsum, combmnz or wsum.
    #[serde(default = "d_fuse_method")]
    pub method: String,
    /// min-max, max, sum, zmuv or none.
    #[serde(default = "d_fuse_norm")]
    pub norm: String,
    /// wsum's weights, one per run.
    #[serde(default)]
    pub weights: Vec<f64>,
    /// RRF's rank constant.
    #[serde(default = "d_rrf_k")]
    pub rrf_k: f64,
    /// Runs over different queries: `union` (default), `intersection` or
    /// `same` (refused). Left out of the hash when the default.
    #[serde(default, skip_serializing_if = "is_union")]
    pub queries: crate::engine::fusion::QuerySet,
}
fn is_union(q: &crate::engine::fusion::QuerySet) -> bool {
    *q == crate::engine::fusion::QuerySet::Union
}
fn d_fuse_method() -> String {
    "rrf".into()
}
fn d_fuse_norm() -> String {
    "min-max".into()
}
fn d_rrf_k() -> f64 {
    60.0
}

impl FuseSpec {
    /// The method and normalisation, parsed.
    pub fn parsed(&self) -> Result<(crate::engine::fusion::Method, crate::engine::fusion::Norm), String> {
        let m = crate::engine::fusion::Method::parse(&self.method, Some(self.rrf_k), &self.weights)?;
        crate::engine::fusion::check(&m, self.runs.len()).map_err(|e| e.to_string())?;
        Ok((m, self.norm.parse()?))
    }
}

/// An experiment file: the models, the method's settings, the rounds and the
/// variants of the comparison table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Its name (checked: runs go to OUTPUT/NAME).
    pub name: String,
    /// BEIR dataset names or directories.
    pub datasets: Vec<String>,
    /// Local BEIR mirror (DIR/beir/NAME); relative to the experiment file.
    #[serde(default)]
    pub mirror: Option<PathBuf>,
    #[serde(default = "d_rounds")]
    /// Rounds of RLRF + RLGF, each starting from the last round's models.
    pub rounds: usize,
    /// The retriever to adapt.
    pub retriever: PluginSpec,
    /// The generator to adapt.
    pub generator: PluginSpec,
    /// `[serve]`: the generator's model is served by an engine rir starts
    /// per step (llama.cpp, vLLM or a command) and reached through the
    /// generator plugin (the openai-generator) at the engine's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<crate::engine::served::ServeSpec>,
    /// `[rewards]`.
    #[serde(default)]
    pub rewards: Rewards,
    /// `[trainers]`.
    #[serde(default)]
    pub trainers: Trainers,
    /// `[stages]`.
    #[serde(default)]
    pub stages: Stages,
    /// `[eval]`.
    #[serde(default)]
    pub eval: EvalSpec,
    /// `[lexical]`: the text retriever of `retriever = "lexical"` variants
    /// (default: the `bm25` plugin with its defaults, pyserini's settings).
    #[serde(default)]
    pub lexical: Option<PluginSpec>,
    /// `[[variants]]`: the table's rows, the first one the baseline.
    pub variants: Vec<Variant>,
    /// The file this was read from and its text, so later checks (the
    /// plugins' own validation) can name the line.
    #[serde(skip)]
    pub source: Option<(PathBuf, String)>,
}
fn d_rounds() -> usize {
    1
}

/// The quickstart experiment (`experiments/quickstart.toml`), embedded: what
/// `rir run` runs when it is given no file.
pub const QUICKSTART: &str = include_str!("../../../experiments/quickstart.toml");

/// [`QUICKSTART`], parsed and checked.
pub fn quickstart() -> Result<Experiment, HostError> {
    parse(QUICKSTART, Path::new("experiments/quickstart.toml"))
}

/// Reads an experiment; errors give the file, line and key, and suggest the
/// nearest valid key for a misspelt one.
pub fn load(path: &Path) -> Result<Experiment, HostError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Io { path: path.to_owned(), source })?;
    parse(&text, path)
}

/// An experiment built in code, put through the same checks as a file
/// (names, ranges, variants): it is written as TOML and parsed back, so an
/// error names the key as it would in a file called `<in code>`.
pub fn checked(exp: &Experiment) -> Result<Experiment, HostError> {
    let text = toml::to_string(exp).map_err(|e| HostError::Input(format!("<in code>: cannot write the experiment as TOML: {e}")))?;
    parse(&text, Path::new("<in code>"))
}

/// Parses experiment text and checks it (names, ranges, variants) before
/// any work; `path` is named in errors and anchors a relative `mirror`.
pub fn parse(text: &str, path: &Path) -> Result<Experiment, HostError> {
    let mut exp: Experiment = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        let mut msg = e.message().to_owned();
        // A wrong type ("invalid type: string, expected usize") names no key.
        if let Some(k) = e.span().and_then(|s| rir_sdk::config::key_at(text, s.start)).filter(|k| !msg.contains(&format!("`{k}`"))) {
            msg = format!("`{k}`: {msg}");
        }
        let hint = unknown_key_hint(&msg).map(|h| format!("; did you mean `{h}`?")).unwrap_or_default();
        HostError::Input(format!("{}:{line}:{col}: {msg}{hint}", path.display()))
    })?;
    let at = |m: String| HostError::Input(format!("{}: {m}", path.display()));
    // `file:line:col` of a key, found by toml's spanned parse.
    let key_at = |key: &[&str]| format!("{}:{}", path.display(), key_pos(text, key));
    let top_at = |k: &str, m: &str| HostError::Input(format!("{}: {m}", key_at(&[k])));
    if exp.datasets.is_empty() {
        return Err(top_at("datasets", "`datasets` is empty: name at least one dataset"));
    }
    if exp.variants.is_empty() {
        return Err(at("no [[variants]]".into()));
    }
    if exp.rounds == 0 {
        return Err(top_at("rounds", "`rounds` must be at least 1"));
    }
    // Names become directory and file names under --output: checked here,
    // with the line they are on, before any work.
    let named = |what: &str, name: &str, key: &[&str]| crate::util::paths::check_name(what, name).map_err(|m| HostError::Input(format!("{}: {m}", key_at(key))));
    named("experiment name", &exp.name, &["name"])?;
    // [eval] values, with the line of the key.
    let eval_err = |key: &'static str| move |m: String| HostError::Input(format!("{}: [eval] {m}", key_at(&["eval", key])));
    crate::stages::eval::check_k(exp.eval.k).map_err(eval_err("k"))?;
    // A price is the generator's: tokens are counted only for generation.
    let mut priced = vec![("retriever", &exp.retriever), ("rewards.retriever", &exp.rewards.retriever), ("rewards.generator", &exp.rewards.generator)];
    if let Some(l) = &exp.lexical {
        priced.push(("lexical", l));
    }
    for (table, spec) in priced {
        if spec.price.is_some() {
            let path: Vec<&str> = table.split('.').chain(["price"]).collect();
            return Err(HostError::Input(format!("{}: [{table}] price: only [generator] has a price (tokens are counted for generation)", key_at(&path))));
        }
    }
    if let Some(p) = exp.generator.price {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(p.input) && ok(p.output) && p.cached_input.is_none_or(ok)) {
            return Err(HostError::Input(format!(
                "{}: [generator] price: input, output and cached_input must be finite and not negative (per million tokens)",
                key_at(&["generator", "price"])
            )));
        }
    }
    crate::stages::eval::check_query_weight(exp.eval.query_weight).map_err(eval_err("query_weight"))?;
    if !(exp.eval.alpha > 0.0 && exp.eval.alpha < 1.0) {
        return Err(HostError::Input(format!("{}: [eval] alpha must be in (0, 1), got {}", key_at(&["eval", "alpha"]), exp.eval.alpha)));
    }
    crate::engine::metrics::parse_measures(&exp.eval.measures.join(",")).map_err(|m| HostError::Input(format!("{}: [eval] measures: {m}", key_at(&["eval", "measures"]))))?;
    exp.eval.index.parse::<crate::stages::eval::IndexChoice>().map_err(eval_err("index"))?;
    exp.eval.averaging.parse::<crate::engine::metrics::Averaging>().map_err(eval_err("averaging"))?;
    if exp.eval.batch == 0 || exp.eval.generation_batch == 0 {
        let key = if exp.eval.batch == 0 { "batch" } else { "generation_batch" };
        return Err(eval_err(key)(format!("{key} must be at least 1")));
    }
    if let Some(s) = &exp.serve {
        s.check().map_err(|m| HostError::Input(format!("{}: [serve] {m}", key_at(&["serve"]))))?;
        // llama.cpp serves GGUF files: the tuned generator must be one.
        let tuned = exp.variants.iter().any(|v| v.generator == GeneratorChoice::Rlrf || v.retriever == RetrieverChoice::Rlgf) || exp.rounds > 1;
        let format = exp.trainers.generator.params.get("merge_format").and_then(|v| v.as_str()).unwrap_or("hf");
        if s.engine == crate::engine::served::Engine::LlamaCpp && tuned && exp.trainers.generator.plugin == "dpo-trainer" && !format.starts_with("gguf") {
            return Err(HostError::Input(format!(
                "{}: [serve] engine = \"llama.cpp\" serves GGUF files, and the tuned generator would be an HF directory: set merge_format = \"gguf-q8_0\" in [trainers.generator] params (or serve with vllm)",
                key_at(&["serve", "engine"])
            )));
        }
    }
    if let Some(t) = &exp.stages.queries.prompt {
        crate::stages::queries::check_prompt(t).map_err(|m| HostError::Input(format!("{}: [stages.queries] {m}", key_at(&["stages", "queries", "prompt"]))))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, v) in exp.variants.iter().enumerate() {
        let i = i.to_string();
        let variant_at = |key: &str, m: String| HostError::Input(format!("{}: variant `{}`: {m}", key_at(&["variants", &i, key]), v.name));
        named("variant name", &v.name, &["variants", &i, "name"])?;
        if !names.insert(v.name.as_str()) {
            return Err(variant_at("name", "appears twice".into()));
        }
        if let Some(w) = v.query_weight {
            crate::stages::eval::check_query_weight(w).map_err(|m| variant_at("query_weight", m))?;
        }
        if v.round.is_some_and(|r| r == 0 || r > exp.rounds) {
            return Err(variant_at("round", format!("round must be in 1..={}", exp.rounds)));
        }
        if let Some(f) = &v.fuse {
            if f.runs.len() < 2 {
                return Err(variant_at("fuse", format!("fuse.runs needs two or more variants, got {}", f.runs.len())));
            }
            for r in &f.runs {
                if !names.contains(r.as_str()) || r == &v.name {
                    return Err(variant_at("fuse", format!("fuse.runs: `{r}` is not a variant listed before this one")));
                }
            }
            if v.generator != GeneratorChoice::None || v.retriever != RetrieverChoice::Base || v.query_weight.is_some() {
                return Err(variant_at("fuse", "a fused variant's run comes from fuse.runs: leave out generator, retriever and query_weight".into()));
            }
            f.parsed().map_err(|m| variant_at("fuse", m))?;
        }
        if let Some(rr) = &v.rerank {
            if v.fuse.is_some() {
                return Err(variant_at("rerank", "a variant either fuses or reranks: leave out one of fuse and rerank".into()));
            }
            if !names.contains(rr.run.as_str()) || rr.run == v.name {
                return Err(variant_at("rerank", format!("rerank.run: `{}` is not a variant listed before this one", rr.run)));
            }
            if v.generator != GeneratorChoice::None || v.retriever != RetrieverChoice::Base || v.query_weight.is_some() {
                return Err(variant_at("rerank", "a reranked variant's run comes from rerank.run: leave out generator, retriever and query_weight (rerank.generator chooses the scorer)".into()));
            }
            if rr.generator == GeneratorChoice::None {
                return Err(variant_at("rerank", "rerank.generator must be `base` or `rlrf`: [rewards.generator] scores with it".into()));
            }
            if rr.depth == 0 || rr.depth > 10_000 {
                return Err(variant_at("rerank", format!("rerank.depth must be in 1..=10000, got {}", rr.depth)));
            }
            if rr.batch == 0 {
                return Err(variant_at("rerank", "rerank.batch must be at least 1".into()));
            }
        }
    }
    if let (Some(m), Some(dir)) = (&exp.mirror, path.parent()) {
        if m.is_relative() {
            exp.mirror = Some(dir.join(m));
        }
    }
    exp.source = Some((path.to_owned(), text.to_owned()));
    Ok(exp)
}

/// `line:col` (1-based) of the deepest key of `path` written in the file
/// (the key itself, else the table holding it); `0:0` when none is.
fn key_pos(text: &str, path: &[&str]) -> String {
    let (line, col) = rir_sdk::config::key_offset(text, path).map_or((0, 0), |o| line_col(text, o));
    format!("{line}:{col}")
}

/// A plugin's verdict on one of the experiment's tables, as an error that
/// names the experiment file, the line and the key.
fn table_error(exp: &Experiment, table: &str, field: &str, e: HostError) -> HostError {
    let msg = e.to_string();
    // serde's "unknown field `x`, expected one of ...": point at `x`.
    let unknown = msg.split_once("unknown field `").and_then(|(_, r)| r.split_once('`')).map(|(k, _)| k.to_owned());
    let hint = msg.find("unknown field `").and_then(|i| unknown_key_hint(&msg[i..])).map(|h| format!("; did you mean `{h}`?")).unwrap_or_default();
    let key = unknown.clone().or_else(|| {
        // Messages of the form "invalid config: KEY: ..." name the key first.
        msg.split_once("invalid config: ").and_then(|(_, r)| r.split_once(':')).map(|(k, _)| k.trim().to_owned()).filter(|k| !k.contains(' '))
    });
    match &exp.source {
        Some((path, text)) => {
            let mut at: Vec<&str> = table.split('.').chain([field]).collect();
            at.extend(key.as_deref());
            HostError::Input(format!("{}:{}: [{table}] {field}: {msg}{hint}", path.display(), key_pos(text, &at)))
        }
        None => HostError::Input(format!("[{table}] {field}: {msg}{hint}")),
    }
}

/// Every plugin table of the experiment, checked by its plugin (the ABI's
/// `validate`, which loads no model) before any work starts.
pub fn validate_configs(host: &PluginHost, exp: &Experiment) -> Result<(), HostError> {
    use rir_sdk::ConfigOf;
    let tables: Vec<(&str, &str, &str, Kind, ConfigOf, String)> = vec![
        ("retriever", "config", &exp.retriever.plugin, Kind::Retriever, ConfigOf::Retriever, table_text(&exp.retriever.config)),
        ("generator", "config", &exp.generator.plugin, Kind::Generator, ConfigOf::Generator, served_placeholder(exp)),
        ("rewards.retriever", "config", &exp.rewards.retriever.plugin, Kind::Reward, ConfigOf::Reward, table_text(&exp.rewards.retriever.config)),
        ("rewards.generator", "config", &exp.rewards.generator.plugin, Kind::Reward, ConfigOf::Reward, table_text(&exp.rewards.generator.config)),
        ("trainers.generator", "config", &exp.trainers.generator.plugin, Kind::Trainer, ConfigOf::Trainer, table_text(&exp.trainers.generator.config)),
        ("trainers.generator", "params", &exp.trainers.generator.plugin, Kind::Trainer, ConfigOf::Params, table_text(&exp.trainers.generator.params)),
        ("trainers.retriever", "config", &exp.trainers.retriever.plugin, Kind::Trainer, ConfigOf::Trainer, table_text(&exp.trainers.retriever.config)),
        ("trainers.retriever", "params", &exp.trainers.retriever.plugin, Kind::Trainer, ConfigOf::Params, table_text(&exp.trainers.retriever.params)),
    ];
    let mut tables = tables;
    let lexical = exp.lexical_spec();
    if exp.uses_lexical() {
        tables.push(("lexical", "config", &lexical.plugin, Kind::TextRetriever, ConfigOf::TextRetriever, table_text(&lexical.config)));
    }
    if let Some(g) = &exp.trainers.gpl {
        tables.push(("trainers.gpl", "params", &exp.trainers.retriever.plugin, Kind::Trainer, ConfigOf::Params, table_text(&g.params)));
    }
    for (table, field, name, kind, what, text) in tables {
        let plugin = host.load(name)?;
        plugin.validate(kind, what, &text).map_err(|e| table_error(exp, table, field, e))?;
    }
    Ok(())
}

/// The generator's config text as the plugin will get it: with `[serve]`,
/// the engine's address (a placeholder here) and the cache identity added.
fn served_placeholder(exp: &Experiment) -> String {
    let mut t = exp.generator.config.clone();
    if exp.serve.is_some() {
        t.insert("base_url".into(), toml::Value::String("http://127.0.0.1:1/v1".into()));
        t.insert("identity".into(), toml::Value::String("served".into()));
    }
    table_text(&t)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// From serde's "unknown field `x`, expected one of `a`, `b`", the nearest
/// expected name.
fn unknown_key_hint(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    let (word, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    crate::util::suggest::nearest(word, expected)
}

impl Experiment {
    /// The text retriever `retriever = "lexical"` variants use.
    pub fn lexical_spec(&self) -> PluginSpec {
        self.lexical.clone().unwrap_or_else(|| PluginSpec::new("bm25", toml::Table::new()))
    }
    fn uses_lexical(&self) -> bool {
        self.variants.iter().any(|v| v.retriever == RetrieverChoice::Lexical) || self.mines_lexically()
    }
    /// Whether rlgf-data (and gpl-data) mine negatives with the text retriever.
    fn mines_lexically(&self) -> bool {
        self.stages.rlgf.miner == crate::stages::rlgf::Miner::Lexical
    }
}

/// Every plugin the experiment names exists in the registry with the kind
/// it is used as — checked before any work starts.
pub fn check_plugins(host: &PluginHost, exp: &Experiment) -> Result<(), HostError> {
    let lexical = exp.lexical_spec();
    let mut uses = vec![
        (&exp.retriever.plugin, Kind::Retriever),
        (&exp.generator.plugin, Kind::Generator),
        (&exp.rewards.retriever.plugin, Kind::Reward),
        (&exp.rewards.generator.plugin, Kind::Reward),
        (&exp.trainers.generator.plugin, Kind::Trainer),
        (&exp.trainers.retriever.plugin, Kind::Trainer),
    ];
    if exp.uses_lexical() {
        uses.push((&lexical.plugin, Kind::TextRetriever));
    }
    for (name, kind) in uses {
        let reg = host.registry.get(name)?;
        if !reg.entry.kinds.contains(&kind) {
            return Err(HostError::Input(format!("plugin `{name}` is used as a {kind} but registry.toml lists it as {:?}", reg.entry.kinds)));
        }
        host.load(name)?;
    }
    // An index plugin named by `[eval] index`: present, an index, its factory valid.
    if let Ok(crate::stages::eval::IndexChoice::Plugin { name, config }) = exp.eval.index.parse() {
        let check = || -> Result<(), HostError> {
            let reg = host.registry.get(&name)?;
            if !reg.entry.kinds.contains(&Kind::Index) {
                return Err(HostError::Input(format!("plugin `{name}` is not an index (registry.toml lists it as {:?})", reg.entry.kinds)));
            }
            host.load(&name)?.validate(Kind::Index, rir_sdk::ConfigOf::Index, &config).map(|_| ())
        };
        check().map_err(|e| table_error(exp, "eval", "index", e))?;
    }
    validate_configs(host, exp)
}

pub use crate::stages::Stage;

/// A content-addressed hash of a stage's inputs.
fn key(parts: &serde_json::Value) -> String {
    format!("{:x}", Sha256::digest(parts.to_string().as_bytes()))[..12].to_owned()
}

/// A config or params table as the TOML text a plugin is handed.
fn table_text(t: &toml::Table) -> String {
    toml::to_string(t).unwrap_or_default()
}

/// The TOML text of a config table with `model` replaced.
fn with_model(t: &toml::Table, model: Option<&Path>) -> String {
    let mut t = t.clone();
    if let Some(m) = model {
        t.insert("model".into(), toml::Value::String(m.display().to_string()));
    }
    table_text(&t)
}

/// How `run` goes about it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Runs go to OUTPUT/NAME.
    pub output: PathBuf,
    /// Print the plan with what is cached, run nothing.
    pub dry_run: bool,
    /// Run only this stage (its inputs must be finished).
    pub only: Option<Stage>,
    /// Recompute this stage and every later one.
    pub from: Option<Stage>,
    /// Read and write the embedding and generation caches.
    pub use_cache: bool,
}

/// One step of the plan and where its output is.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The stage.
    pub stage: Stage,
    /// The dataset it is for.
    pub dataset: String,
    /// Its round (0: before the rounds).
    pub round: usize,
    /// What the progress output calls it.
    pub label: String,
    /// Its output directory (STAGE-HASH).
    pub dir: PathBuf,
    /// Whether its output was already there.
    pub cached: bool,
    /// What the stage took when it ran (for a cached one, read from its stage.json).
    pub seconds: Option<f64>,
    /// Its peak resident memory in bytes (the process's high-water mark,
    /// reset when the stage started), where the OS reports it; read back
    /// from stage.json for a cached one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// The CPU time (user + system, all threads) it used, in seconds; over
    /// `seconds`, the cores it kept busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// What it asked of the generator (read back from stage.json for a
    /// cached one); None when it asked nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::engine::generate::GenerationUsage>,
    /// What that cost at `[generator] price`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// A dry run's estimate of what it will ask of the generator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<crate::stages::estimate::Estimate>,
}

impl Step {
    /// What the step table says: `cached`, `ran` (it has a time), `to run`
    /// (a dry run) or `not run` (after `--only`).
    pub fn status(&self, dry_run: bool) -> &'static str {
        if self.cached {
            "cached"
        } else if self.seconds.is_some() {
            "ran"
        } else if dry_run {
            "to run"
        } else {
            "not run"
        }
    }
}

/// What a finished run leaves: the steps and the results files.
pub struct RunOutput {
    /// The plan's steps, with what each did.
    pub steps: Vec<Step>,
    /// The variants' results files.
    pub results: Vec<PathBuf>,
    /// The comparison table as printed (None for a dry run or `--only`).
    pub table: Option<String>,
    /// OUTPUT/NAME.
    pub root: PathBuf,
    /// A dry run's steps (by label) that need a program not installed here,
    /// with what is missing and how to install it (a run stops before any
    /// work instead: [`missing_error`]'s message).
    pub missing: Vec<(String, String)>,
}

impl RunOutput {
    /// The dry run's missing programs as the error a run would give (None: nothing missing).
    pub fn missing_error(&self, exp: &Experiment) -> Option<HostError> {
        (!self.missing.is_empty()).then(|| missing_error(exp, &self.missing))
    }
}

/// The identity of a model in use: what it is and where its files are.
#[derive(Clone)]
struct Model {
    id: serde_json::Value,
    /// Overrides the plugin config's `model` (a trained model directory).
    path: Option<PathBuf>,
}

struct Runner<'a> {
    host: &'a PluginHost,
    opts: &'a RunOptions,
    /// `[generator] price`, for each stage's cost.
    price: Option<crate::engine::generate::Price>,
    steps: Vec<Step>,
    /// run.log; none for a dry run (it does no work to log).
    log: Option<std::fs::File>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io { path: path.to_owned(), source }
}

impl Runner<'_> {
    fn note(&mut self, line: &str) {
        use std::io::Write;
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{} {line}", log_stamp());
        }
        log::info!("{line}");
    }

    fn plugin_id(&self, name: &str, config: &toml::Table) -> Result<serde_json::Value, HostError> {
        let p = self.host.load(name)?;
        let mut id = serde_json::json!({"plugin": name, "version": p.version, "sha256": p.sha256, "config": config});
        let local = local_fingerprints(config)?;
        if !local.is_empty() {
            // Only then: ids (and so stage hashes) of index-pinned models stay as they were.
            id["files"] = serde_json::json!(local);
        }
        Ok(id)
    }

    /// Runs `work` into `dir` unless it is already there (or only plans it).
    fn ensure(
        &mut self,
        stage: Stage,
        dataset: &str,
        round: usize,
        label: String,
        dir: PathBuf,
        work: impl FnOnce(&Path) -> Result<(), HostError>,
    ) -> Result<PathBuf, HostError> {
        let forced = self.opts.from.is_some_and(|f| stage >= f) && self.opts.only.is_none_or(|o| o == stage);
        let selected = self.opts.only.is_none_or(|o| o == stage);
        let cached = dir.is_dir() && !forced;
        // `--only S`: the stages after S are not run (nor are they an error).
        let after_only = self.opts.only.is_some_and(|o| stage > o);
        let mut step = Step {
            stage,
            dataset: dataset.into(),
            round,
            label: label.clone(),
            dir: dir.clone(),
            cached,
            seconds: None,
            peak_rss_bytes: None,
            cpu_seconds: None,
            generation: None,
            cost: None,
            estimate: None,
        };
        if cached || self.opts.dry_run || after_only {
            if cached {
                self.note(&format!("{label}: cached in {}", dir.display()));
                // The time it took when it ran, so the manifest keeps it.
                let meta = std::fs::read(dir.join("stage.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .unwrap_or_default();
                step.seconds = meta["seconds"].as_f64();
                step.peak_rss_bytes = meta["peak_rss_bytes"].as_u64();
                step.cpu_seconds = meta["cpu_seconds"].as_f64();
                step.generation = serde_json::from_value(meta["generation"].clone()).ok();
                step.cost = meta["cost"].as_f64();
            }
            self.steps.push(step);
            return Ok(dir);
        }
        if !selected {
            return Err(HostError::Input(format!(
                "{label} has not run yet ({}); run without --only first",
                dir.display()
            )));
        }
        let partial = dir.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        eprintln!("== {label}");
        self.note(&format!("{label}: started in {}", partial.display()));
        let own_peak = crate::util::memory::next_stage();
        let t = Instant::now();
        let cpu_before = crate::util::memory::cpu_seconds();
        let spent_before = crate::engine::generate::ledger();
        if let Err(e) = work(&partial) {
            // The log says what failed and where, whatever the caller prints.
            self.note(&format!("{label}: failed in {}: {e}", partial.display()));
            return Err(e);
        }
        let secs = t.elapsed().as_secs_f64();
        // Without a reset the high-water mark is the process's: not recorded.
        let peak = crate::util::memory::peak_rss_bytes().filter(|_| own_peak);
        let cpu = cpu_before.zip(crate::util::memory::cpu_seconds()).map(|(a, b)| b - a);
        let mut meta = serde_json::json!({"stage": stage, "label": label, "seconds": secs});
        if let Some(p) = peak {
            meta["peak_rss_bytes"] = p.into();
        }
        if let Some(c) = cpu {
            meta["cpu_seconds"] = c.into();
        }
        let spent = crate::engine::generate::ledger().since(&spent_before);
        if !spent.is_empty() {
            meta["generation"] = serde_json::to_value(spent).unwrap_or_default();
            step.generation = Some(spent);
            if let Some(price) = self.price {
                let cost = price.cost(spent.prompt_tokens, spent.cached_tokens, spent.completion_tokens);
                meta["cost"] = cost.into();
                step.cost = Some(cost);
            }
            self.note(&format!(
                "{label}: generator: {} requests ({} from the cache), {} prompt ({} from the backend's prefix cache) and {} completion tokens{}, {} retries, {:.1} s",
                spent.requests,
                spent.cached,
                spent.prompt_tokens,
                spent.cached_tokens,
                spent.completion_tokens,
                if spent.uncounted > 0 { format!(" ({} requests uncounted)", spent.uncounted) } else { String::new() },
                spent.retries,
                spent.seconds
            ));
        }
        crate::util::files::write_json(&partial.join("stage.json"), &meta)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::rename(&partial, &dir).map_err(io(&dir))?;
        match peak {
            Some(p) => self.note(&format!("{label}: done in {secs:.1} s, peak RSS {:.2} GB", p as f64 / 1e9)),
            None => self.note(&format!("{label}: done in {secs:.1} s")),
        }
        remove_stale_partials(&dir, |m| self.note(m));
        step.seconds = Some(secs);
        step.peak_rss_bytes = peak;
        step.cpu_seconds = cpu;
        self.steps.push(step);
        Ok(dir)
    }
}

/// Once a stage finished, the `.partial` directories an interrupted run of
/// the same stage left with other settings (another hash) are removed: they
/// are never read and can be large (a DPO stage's is ~600 MB).
fn remove_stale_partials(done: &Path, mut note: impl FnMut(&str)) {
    let (Some(parent), Some(name)) = (done.parent(), done.file_name().map(|n| n.to_string_lossy().into_owned())) else { return };
    let Some((stem, _hash)) = name.rsplit_once('-') else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let stale = n.strip_suffix(".partial").and_then(|base| base.rsplit_once('-')).is_some_and(|(s, h)| s == stem && h.chars().all(|c| c.is_ascii_hexdigit()));
        if stale && e.path().is_dir() {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => note(&format!("removed a stale {}", e.path().display())),
                Err(err) => note(&format!("could not remove a stale {}: {err}", e.path().display())),
            }
        }
    }
}

/// Content fingerprints of the local paths a plugin config names (`model`,
/// `adapter`, `tokenizer`, ...: any top-level string naming an existing file
/// or directory), so a model retrained in place gets new stage hashes.
/// Index-pinned sources (`pypi:P==V`, `hf:ORG/NAME@REV`) are fixed by name.
fn local_fingerprints(config: &toml::Table) -> Result<BTreeMap<String, String>, HostError> {
    let mut out = BTreeMap::new();
    for (key, value) in config {
        let Some(spec) = value.as_str() else { continue };
        let Ok(rir_models::Source::Local(path)) = rir_models::Source::parse(spec) else { continue };
        if !path.exists() {
            continue;
        }
        let mut files = Vec::new();
        collect_files(&path, &mut files).map_err(io(&path))?;
        files.sort();
        let fp = rir_models::encoder::fingerprint(&files, "").map_err(|e| HostError::step(format!("{key} = {spec:?}"), e))?;
        out.insert(key.clone(), fp);
    }
    Ok(out)
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if p.is_file() {
        out.push(p.to_owned());
        return Ok(());
    }
    for e in std::fs::read_dir(p)? {
        let e = e?.path();
        let hidden = e.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden {
            collect_files(&e, out)?;
        }
    }
    Ok(())
}

/// UTC wall-clock time to the second, for the run log.
fn log_stamp() -> String {
    format!("[{}]", utc_now())
}

fn utc_now() -> String {
    jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default()
}

fn model_source(t: &toml::Table, role: &str) -> Result<String, HostError> {
    t.get("model")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| HostError::Input(format!("[{role}.config] needs a `model` (the trainers start from it)")))
}

/// What a step of the plan does, with everything it reads.
#[derive(Clone)]
enum Work {
    /// A data stage ([`crate::stages::DataStage`]) over the dataset, its
    /// config as the experiment's table holds it.
    /// `lexical`: the `[lexical]` text retriever is opened for it.
    Data { stage: Stage, config: serde_json::Value, queries: Option<PathBuf>, generator: Option<Model>, retriever: Option<Model>, reward: Option<PluginSpec>, lexical: bool },
    /// A trainer job: `base` trained on `data`, written to OUT/`into`.
    /// `index`: the retriever whose corpus vectors of the data's passages
    /// the job carries (`TrainJob::passage_vectors`), for a trainer that
    /// keeps the passage tower frozen.
    Train { trainer: PluginSpec, params: toml::Table, base: String, data: PathBuf, into: &'static str, index: Option<Model> },
    /// One variant evaluated.
    /// A fusion of earlier eval steps' run files.
    Fuse { variant: usize, inputs: Vec<PathBuf> },
    /// A variant reranking an earlier variant's run with a generator.
    Rerank { variant: usize, input: PathBuf, generator: Model },
    /// `lexical`: `retriever` is the `[lexical]` text retriever.
    Eval { variant: usize, retriever: Model, lexical: bool, generator: Option<Model>, query_weight: f64 },
}

/// One step of the plan: which stage, where its output goes, what makes it.
struct Planned {
    stage: Stage,
    /// Index into the experiment's datasets.
    dataset: usize,
    round: usize,
    label: String,
    dir: PathBuf,
    work: Work,
}

/// The whole plan of `exp`, in the order it runs: per dataset the queries,
/// then per round rlrf-data → rlrf-train → rlgf-data → rlgf-train (and the
/// GPL-style peer when a variant asks for it), then one eval per variant.
/// Every directory name is a hash of what the step reads (settings, plugin
/// ids, upstream hashes), so the plan is known before anything runs.
fn plan(exp: &Experiment, base_gen: &Model, base_ret: &Model, lexical: Option<&Model>, datasets: &[crate::engine::data::Dataset], root: &Path) -> Result<Vec<Planned>, HostError> {
    let mut plan = Vec::new();
    for (di, (dataset, ds)) in exp.datasets.iter().zip(datasets).enumerate() {
        // By the dataset's name: `dataset` may be a path.
        let droot = root.join(slug(&ds.name));
        let dn = ds.name.clone();
        let mut push = |stage: Stage, round: usize, label: String, dir: PathBuf, work: Work| {
            plan.push(Planned { stage, dataset: di, round, label: format!("{dn}: {label}"), dir: dir.clone(), work });
            dir
        };

        // Pseudo queries, once per dataset, from the base generator.
        let qkey = key(&serde_json::json!({"stage": "queries", "dataset": dataset, "generator": base_gen.id, "config": exp.stages.queries}));
        let qdir = push(Stage::Queries, 0, "queries".into(), droot.join(format!("queries-{qkey}")), Work::Data {
            stage: Stage::Queries,
            config: to_json(&exp.stages.queries),
            queries: None,
            generator: Some(base_gen.clone()),
            retriever: None,
            reward: None,
            lexical: false,
        });
        let qfile = qdir.join("queries.jsonl");

        let mut gens = vec![base_gen.clone()];
        let mut rets = vec![base_ret.clone()];
        let mut gpls: Vec<Model> = Vec::new();
        for round in 1..=exp.rounds {
            let (gp, rp) = (gens[round - 1].clone(), rets[round - 1].clone());
            let k = key(&serde_json::json!({"stage": "rlrf-data", "queries": qkey, "generator": gp.id, "retriever": rp.id,
                                             "reward": exp.rewards.retriever, "config": exp.stages.rlrf}));
            let rdir = push(Stage::RlrfData, round, format!("round {round}: rlrf-data"), droot.join(format!("rlrf-data-r{round}-{k}")), Work::Data {
                stage: Stage::RlrfData,
                config: to_json(&exp.stages.rlrf),
                queries: Some(qfile.clone()),
                generator: Some(gp.clone()),
                retriever: Some(rp.clone()),
                reward: Some(exp.rewards.retriever.clone()),
                lexical: false,
            });
            let gbase = match &gp.path {
                Some(p) => p.display().to_string(),
                None => model_source(&exp.generator.config, "generator")?,
            };
            let tk = key(&serde_json::json!({"stage": "rlrf-train", "data": k, "trainer": exp.trainers.generator, "base": gp.id}));
            let trainer = |t: &TrainerSpec| PluginSpec::new(t.plugin.clone(), t.config.clone());
            let tdir = push(Stage::RlrfTrain, round, format!("round {round}: rlrf-train"), droot.join(format!("rlrf-train-r{round}-{tk}")), Work::Train {
                trainer: trainer(&exp.trainers.generator),
                params: exp.trainers.generator.params.clone(),
                base: gbase,
                data: rdir.join("dpo.jsonl"),
                into: "",
                index: None,
            });
            let gnew = Model { id: serde_json::json!({"trained": tk}), path: Some(tdir.join("merged")) };

            // The text retriever that mines, when one does (absent otherwise: older hashes stay).
            let miner = if exp.mines_lexically() { Some(lexical.ok_or_else(|| HostError::Input("lexical mining without the text retriever's id".into()))?) } else { None };
            let mut kj = serde_json::json!({"stage": "rlgf-data", "queries": qkey, "generator": gnew.id, "retriever": rp.id,
                                             "reward": exp.rewards.generator, "config": exp.stages.rlgf});
            if let Some(m) = miner {
                kj["miner"] = m.id.clone();
            }
            let k = key(&kj);
            let gdir = push(Stage::RlgfData, round, format!("round {round}: rlgf-data"), droot.join(format!("rlgf-data-r{round}-{k}")), Work::Data {
                stage: Stage::RlgfData,
                config: to_json(&exp.stages.rlgf),
                queries: Some(qfile.clone()),
                generator: Some(gnew.clone()),
                retriever: Some(rp.clone()),
                reward: Some(exp.rewards.generator.clone()),
                lexical: miner.is_some(),
            });
            let rbase = match &rp.path {
                Some(p) => p.display().to_string(),
                None => model_source(&exp.retriever.config, "retriever")?,
            };
            let tk = key(&serde_json::json!({"stage": "rlgf-train", "data": k, "trainer": exp.trainers.retriever, "base": rp.id}));
            let rtdir = push(Stage::RlgfTrain, round, format!("round {round}: rlgf-train"), droot.join(format!("rlgf-train-r{round}-{tk}")), Work::Train {
                trainer: trainer(&exp.trainers.retriever),
                params: exp.trainers.retriever.params.clone(),
                base: rbase.clone(),
                data: gdir.join("distill.jsonl"),
                into: "model",
                index: Some(rp.clone()),
            });
            gens.push(gnew);
            rets.push(Model { id: serde_json::json!({"trained": tk}), path: Some(rtdir.join("model")) });

            // The GPL/InPars-style peer, only when a variant asks for it.
            if exp.variants.iter().any(|v| v.retriever == RetrieverChoice::Gpl) {
                let gcfg = exp.stages.rlgf.gpl();
                let mut kj = serde_json::json!({"stage": "gpl-data", "queries": qkey, "retriever": rp.id, "config": gcfg});
                if let Some(m) = miner {
                    kj["miner"] = m.id.clone();
                }
                let k = key(&kj);
                let gpdir = push(Stage::RlgfData, round, format!("round {round}: gpl-data"), droot.join(format!("gpl-data-r{round}-{k}")), Work::Data {
                    stage: Stage::RlgfData,
                    config: to_json(&gcfg),
                    queries: Some(qfile.clone()),
                    // Neither answers nor reranking: no generator, no reward.
                    generator: None,
                    retriever: Some(rp.clone()),
                    reward: None,
                    lexical: miner.is_some(),
                });
                let params = exp.trainers.gpl_params();
                let tk = key(&serde_json::json!({"stage": "gpl-train", "data": k, "trainer": exp.trainers.retriever.plugin, "config": exp.trainers.retriever.config, "params": params, "base": rp.id}));
                let gptdir = push(Stage::RlgfTrain, round, format!("round {round}: gpl-train"), droot.join(format!("gpl-train-r{round}-{tk}")), Work::Train {
                    trainer: trainer(&exp.trainers.retriever),
                    params,
                    base: rbase,
                    data: gpdir.join("distill.jsonl"),
                    into: "model",
                    index: Some(rp.clone()),
                });
                gpls.push(Model { id: serde_json::json!({"trained": tk}), path: Some(gptdir.join("model")) });
            }
        }

        // Each variant's run file, for the fused variants after it.
        let mut run_files: std::collections::HashMap<&str, PathBuf> = std::collections::HashMap::new();
        for (vi, v) in exp.variants.iter().enumerate() {
            let round = v.round.unwrap_or(exp.rounds);
            if let Some(f) = &v.fuse {
                let inputs: Vec<PathBuf> = f.runs.iter().map(|r| run_files[r.as_str()].clone()).collect();
                // Upstream steps by their hashed directory names (not paths: the hash must not depend on --output).
                let upstream: Vec<String> = inputs.iter().filter_map(|p| p.parent()?.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
                let k = key(&serde_json::json!({"stage": "fuse", "dataset": dataset, "variant": v.name, "inputs": upstream, "fuse": f, "eval": exp.eval}));
                let dir = push(Stage::Eval, round, format!("eval {}", v.name), droot.join(format!("eval-{}-{k}", slug(&v.name))), Work::Fuse { variant: vi, inputs });
                run_files.insert(v.name.as_str(), dir.join(format!("{}.{}.trec", v.name, ds.name)));
                continue;
            }
            if let Some(rr) = &v.rerank {
                let input = run_files[rr.run.as_str()].clone();
                let upstream = input.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
                let g = if rr.generator == GeneratorChoice::Rlrf { &gens[round] } else { &gens[0] };
                let k = key(&serde_json::json!({"stage": "rerank", "dataset": dataset, "variant": v.name, "input": upstream, "rerank": rr,
                                                 "generator": g.id, "reward": exp.rewards.generator, "eval": exp.eval}));
                let dir = push(Stage::Eval, round, format!("eval {}", v.name), droot.join(format!("eval-{}-{k}", slug(&v.name))), Work::Rerank { variant: vi, input, generator: g.clone() });
                run_files.insert(v.name.as_str(), dir.join(format!("{}.{}.trec", v.name, ds.name)));
                continue;
            }
            let ret = match v.retriever {
                RetrieverChoice::Base => &rets[0],
                RetrieverChoice::Rlgf => &rets[round],
                RetrieverChoice::Gpl => &gpls[round - 1],
                RetrieverChoice::Lexical => lexical.ok_or_else(|| HostError::Input("a lexical variant without its retriever's id".into()))?,
            };
            let gen = match v.generator {
                GeneratorChoice::None => None,
                GeneratorChoice::Base => Some(&gens[0]),
                GeneratorChoice::Rlrf => Some(&gens[round]),
            };
            let w = v.query_weight.unwrap_or(exp.eval.query_weight);
            let k = key(&serde_json::json!({"stage": "eval", "dataset": dataset, "variant": v.name, "retriever": ret.id,
                                             "generator": gen.map(|g| &g.id), "eval": exp.eval, "w": w}));
            let dir = push(Stage::Eval, round, format!("eval {}", v.name), droot.join(format!("eval-{}-{k}", slug(&v.name))), Work::Eval {
                variant: vi,
                retriever: ret.clone(),
                lexical: v.retriever == RetrieverChoice::Lexical,
                generator: gen.cloned(),
                query_weight: w,
            });
            run_files.insert(v.name.as_str(), dir.join(format!("{}.{}.trec", v.name, ds.name)));
        }
    }
    Ok(prune(plan))
}

impl Work {
    /// The paths this step reads (files or model directories of earlier steps).
    fn reads(&self) -> Vec<PathBuf> {
        let model = |m: &Model| m.path.clone();
        match self {
            Work::Data { queries, generator, retriever, .. } => queries.iter().cloned().chain(generator.iter().filter_map(model)).chain(retriever.iter().filter_map(model)).collect(),
            Work::Train { base, data, .. } => vec![PathBuf::from(base), data.clone()],
            Work::Fuse { inputs, .. } => inputs.clone(),
            Work::Rerank { input, generator, .. } => std::iter::once(input.clone()).chain(model(generator)).collect(),
            Work::Eval { retriever, generator, .. } => model(retriever).into_iter().chain(generator.iter().filter_map(model)).collect(),
        }
    }
}

/// Drops the steps no evaluation reads, directly or through later steps:
/// an experiment without RLGF variants does not mine, score or train a
/// retriever in its last round (an hour with a 1.5B teacher). The plan is
/// in run order, so one backward pass finds them.
fn prune(plan: Vec<Planned>) -> Vec<Planned> {
    let mut read: Vec<PathBuf> = Vec::new();
    let mut keep = vec![false; plan.len()];
    for (i, p) in plan.iter().enumerate().rev() {
        let evaluates = matches!(p.work, Work::Eval { .. } | Work::Fuse { .. } | Work::Rerank { .. });
        if evaluates || read.iter().any(|r| r.starts_with(&p.dir)) {
            keep[i] = true;
            read.extend(p.work.reads());
        }
    }
    plan.into_iter().zip(keep).filter_map(|(p, k)| k.then_some(p)).collect()
}

/// The models a finished run tuned for one dataset, last round: what
/// `rir run` wrote into OUTPUT/NAME/DATASET.
#[derive(Debug, Clone, PartialEq)]
pub struct TunedModels {
    /// Their round.
    pub round: usize,
    /// The RLRF-trained generator (rlrf-train-rN-HASH/merged).
    pub generator: PathBuf,
    /// The RLGF-trained retriever (rlgf-train-rN-HASH/model).
    pub retriever: PathBuf,
}

/// The last round's tuned models in a dataset directory of a finished run
/// (the directory names the plan gives the train stages; `.partial` ones,
/// unfinished, are skipped).
pub fn tuned_models(dataset_dir: &Path) -> Result<TunedModels, HostError> {
    let last = |stage: Stage, sub: &str| -> Result<(usize, PathBuf), HostError> {
        let prefix = format!("{}-r", stage.as_str());
        let mut dirs: Vec<(usize, PathBuf)> = std::fs::read_dir(dataset_dir)
            .map_err(io(dataset_dir))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let round = name.strip_prefix(&prefix)?.split('-').next()?.parse().ok()?;
                (!name.ends_with(".partial") && e.path().join(sub).exists()).then(|| (round, e.path().join(sub)))
            })
            .collect();
        dirs.sort();
        dirs.pop().ok_or_else(|| HostError::Input(format!("{}: no finished {stage} stage (is it a dataset directory of a finished run?)", dataset_dir.display())))
    };
    let (round, generator) = last(Stage::RlrfTrain, "merged")?;
    let (_, retriever) = last(Stage::RlgfTrain, "model")?;
    Ok(TunedModels { round, generator, retriever })
}

/// A stage's config as the plan holds it.
fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Plans and runs the experiment; returns the steps and the results files.
pub fn run(host: &PluginHost, exp: &Experiment, opts: &RunOptions) -> Result<RunOutput, HostError> {
    check_plugins(host, exp)?;
    crate::stages::eval::forget_loaded_generators();
    let root = opts.output.join(&exp.name);
    crate::util::paths::ensure_dir(&root).map_err(io(&root))?;
    let log_path = root.join("run.log");
    let log = match opts.dry_run {
        true => None,
        false => Some(std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?),
    };
    let mut r = Runner { host, opts, price: exp.generator.price, steps: Vec::new(), log };
    r.note(&format!("run {} (dry run: {})", exp.name, opts.dry_run));
    let t_all = Instant::now();
    let cache = host.settings.cache_dir.clone();
    let datasets = exp
        .datasets
        .iter()
        .map(|d| crate::engine::data::open(d, exp.eval.split.as_deref(), &cache, exp.mirror.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let base_gen = Model { id: r.plugin_id(&exp.generator.plugin, &exp.generator.config)?, path: None };
    let base_ret = Model { id: r.plugin_id(&exp.retriever.plugin, &exp.retriever.config)?, path: None };
    let lexical = exp.lexical_spec();
    let lex = if exp.uses_lexical() { Some(Model { id: r.plugin_id(&lexical.plugin, &lexical.config)?, path: None }) } else { None };
    let steps = plan(exp, &base_gen, &base_ret, lex.as_ref(), &datasets, &root)?;
    // Programs the steps would run, before any work; a dry run lists them
    // with the plan (`RunOutput::missing`), a run stops here.
    let missing = missing_programs(host, exp, opts, &steps)?;
    if !missing.is_empty() && !opts.dry_run {
        let e = missing_error(exp, &missing);
        r.note(&e.to_string());
        return Err(e);
    }
    let mut results = Vec::new();
    for p in &steps {
        let ds = &datasets[p.dataset];
        let dir = r.ensure(p.stage, &exp.datasets[p.dataset], p.round, p.label.clone(), p.dir.clone(), |out| execute(host, exp, opts, (&exp.datasets[p.dataset], ds), &p.work, out))?;
        if opts.dry_run {
            if let Some(step) = r.steps.last_mut().filter(|s| !s.cached) {
                step.estimate = estimate(exp, &p.work, ds).filter(|e| e.requests > 0);
                step.cost = step.estimate.zip(exp.generator.price).map(|(e, price)| price.cost(e.prompt_tokens, 0, e.completion_tokens));
            }
        }
        if let Work::Eval { variant, .. } | Work::Fuse { variant, .. } | Work::Rerank { variant, .. } = &p.work {
            results.push(dir.join(format!("{}.{}.json", exp.variants[*variant].name, ds.name)));
        }
    }
    let table = if opts.dry_run || results.iter().any(|p| !p.is_file()) { None } else { Some(write_tables(exp, &results, &root)?) };
    // A dry run does no work: the manifest stays that of the last real run.
    if !opts.dry_run {
        // The ids the plan hashed (local model files fingerprinted once).
        let models = serde_json::json!({"generator": base_gen.id, "retriever": base_ret.id});
        write_manifest(host, exp, &models, &r.steps, &results, t_all.elapsed().as_secs_f64(), &root)?;
    }
    let steps = std::mem::take(&mut r.steps);
    Ok(RunOutput { steps, results, table, root, missing })
}

/// The programs planned steps would run that are not installed here: the
/// `[serve]` engine for every step that generates, and what each training
/// step's trainer plugin says it runs (`ConfigOf::Requirements`: LLaMA-Factory's
/// CLI, FlagEmbedding under torchrun). (step label, message) pairs, in plan
/// order; each distinct check runs once. A step whose output is there runs
/// nothing (unless `--from` may redo it) and is not checked.
fn missing_programs(host: &PluginHost, exp: &Experiment, opts: &RunOptions, plan: &[Planned]) -> Result<Vec<(String, String)>, HostError> {
    let serve = exp.serve.as_ref().and_then(|s| s.check_program().err()).map(|m| match &exp.source {
        Some((path, text)) => format!("{}:{}: [serve] {m}", path.display(), key_pos(text, &["serve", "engine"])),
        None => format!("[serve] {m}"),
    });
    let mut trainers: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for p in plan.iter().filter(|p| opts.from.is_some() || !p.dir.is_dir()) {
        let generates = matches!(&p.work, Work::Data { generator: Some(_), .. } | Work::Eval { generator: Some(_), .. } | Work::Rerank { .. });
        if let (true, Some(m)) = (generates, &serve) {
            out.push((p.label.clone(), m.clone()));
        }
        if let Work::Train { trainer, params, .. } = &p.work {
            let text = table_text(params);
            let key = (trainer.plugin.clone(), text.clone());
            if !trainers.contains_key(&key) {
                let m = match host.load(&trainer.plugin)?.validate(Kind::Trainer, rir_sdk::ConfigOf::Requirements, &text) {
                    Ok(_) => None,
                    Err(HostError::Plugin { source, .. }) => Some(format!("{}: {source}", trainer.plugin)),
                    Err(e) => return Err(e),
                };
                trainers.insert(key.clone(), m);
            }
            if let Some(m) = &trainers[&key] {
                out.push((p.label.clone(), m.clone()));
            }
        }
    }
    Ok(out)
}

/// The error for steps that need programs not installed here.
fn missing_error(exp: &Experiment, missing: &[(String, String)]) -> HostError {
    let what = exp.source.as_ref().map_or_else(|| exp.name.clone(), |(p, _)| p.display().to_string());
    let lines: Vec<String> = missing.iter().map(|(label, m)| format!("  {label}: {m}")).collect();
    HostError::Input(format!("{what}: {} planned step(s) need programs that are not installed here (nothing was run):\n{}", missing.len(), lines.join("\n")))
}

/// What a planned step will ask of the generator (see [`crate::stages::estimate`]).
fn estimate(exp: &Experiment, work: &Work, ds: &crate::engine::data::Dataset) -> Option<crate::stages::estimate::Estimate> {
    use crate::stages::estimate as est;
    let queries = est::max_queries(&exp.stages.queries, ds);
    match work {
        Work::Data { stage: Stage::Queries, .. } => Some(est::queries(&exp.stages.queries, ds)),
        Work::Data { stage: Stage::RlrfData, .. } => Some(est::rlrf_data(&exp.stages.rlrf, queries, ds)),
        Work::Data { stage: Stage::RlgfData, generator: Some(_), config, reward, .. } => {
            let cfg: crate::stages::rlgf::RlgfDataConfig = serde_json::from_value(config.clone()).ok()?;
            Some(est::rlgf_data(&cfg, reward.as_ref().map_or(&toml::Table::new(), |r| &r.config), queries, ds))
        }
        Work::Eval { generator: Some(_), .. } => Some(est::eval(exp.eval.augmentation_max_tokens, ds)),
        _ => None,
    }
}

/// Runs one planned step into `out`: loads what it reads, then the stage.
/// `dataset`: as the experiment names it, and opened.
fn execute(host: &PluginHost, exp: &Experiment, opts: &RunOptions, dataset: (&String, &crate::engine::data::Dataset), work: &Work, out: &Path) -> Result<(), HostError> {
    let (name, ds) = dataset;
    use crate::stages::{Context, DataStage, GeneratorIn, RetrieverIn};
    match work {
        Work::Data { stage, config, queries, generator, retriever, reward, lexical } => {
            let queries = queries.as_deref().map(crate::stages::queries::read).transpose()?.unwrap_or_default();
            let g = generator.as_ref().map(|m| r_generator(host, exp, m, out)).transpose()?;
            let gc = g.as_ref().and_then(|g| gcache_for(host, exp, opts, g));
            let ret = retriever.as_ref().map(|m| r_retriever(host, exp, m)).transpose()?;
            let ec = ret.as_ref().filter(|_| opts.use_cache).map(|r| crate::engine::encode::EmbeddingCache::new(&host.settings.cache_dir, &r.info()));
            let rw = reward.as_ref().map(|w| host.load(&w.plugin)?.reward(&table_text(&w.config))).transpose()?;
            let lex = exp.lexical_spec();
            let cache_root = opts.use_cache.then_some(host.settings.cache_dir.as_path());
            let tr = lexical.then(|| crate::engine::lexical::load_for(host, &lex.plugin, &table_text(&lex.config), ds, cache_root)).transpose()?;
            let task = crate::engine::prompts::task_for(&ds.name);
            let ctx = Context {
                dataset: ds,
                task: &task,
                queries: &queries,
                generator: g.as_ref().map(|g| GeneratorIn { model: g.g.as_ref(), cache: gc.as_ref() }),
                retriever: ret.as_deref().map(|model| RetrieverIn { model, cache: ec.as_ref() }),
                reward: rw.as_deref(),
                text_retriever: tr.as_deref().map(|model| crate::stages::TextRetrieverIn { plugin: &lex.plugin, model }),
                threads: host.settings.threads,
            };
            fn data<S: DataStage>(ctx: &Context<'_>, config: &serde_json::Value, out: &Path) -> Result<(), HostError> {
                let cfg: S::Config = serde_json::from_value(config.clone()).map_err(|e| HostError::Input(format!("[stages] {}: {e}", S::STAGE)))?;
                S::run(ctx, &cfg, out).map(|_| ())
            }
            let result = crate::stages::dispatch_data_stage!(*stage, data(&ctx, config, out));
            match (result, g) {
                (Err(e), Some(mut g)) => Err(g.explain(e)),
                (result, _) => result,
            }
        }
        Work::Train { trainer, params, base, data, into, index } => {
            // The index's vectors of the data's passages (from the embedding
            // cache where the mining stage left them), for a frozen passage tower.
            let r = index.as_ref().map(|m| r_retriever(host, exp, m)).transpose()?;
            let ec = r.as_ref().filter(|_| opts.use_cache).map(|r| crate::engine::encode::EmbeddingCache::new(&host.settings.cache_dir, &r.info()));
            let ix = r.as_deref().map(|retriever| crate::stages::train::IndexVectors { retriever, cache: ec.as_ref(), batch: exp.stages.rlgf.encode_batch });
            let job = rir_sdk::TrainJob { base_model: base.clone(), data_file: data.clone(), output_dir: out.join(into), params: table_text(params), passage_vectors: None };
            crate::stages::train::run_with_index(host, &trainer.plugin, &table_text(&trainer.config), job, ix, out).map(|_| ())
        }
        Work::Fuse { variant, inputs } => {
            let v = &exp.variants[*variant];
            let f = v.fuse.as_ref().ok_or_else(|| HostError::Input(format!("variant {} has no fuse table", v.name)))?;
            let (method, norm) = f.parsed().map_err(HostError::Input)?;
            let o = crate::stages::fuse::FuseOptions {
                runs: inputs.clone(),
                norm,
                method,
                queries: f.queries,
                k: exp.eval.k,
                judging: judging_for(exp, name, *variant, out)?,
            };
            crate::stages::fuse::run_on(ds, &o).map(|_| ()).map_err(|e| HostError::step(format!("eval {}", v.name), e))
        }
        Work::Rerank { variant, input, generator } => {
            let v = &exp.variants[*variant];
            let rr = v.rerank.as_ref().ok_or_else(|| HostError::Input(format!("variant {} has no rerank table", v.name)))?;
            let w = &exp.rewards.generator;
            let mut g = r_generator(host, exp, generator, out)?;
            let o = crate::stages::rerank::RerankOptions {
                run: input.clone(),
                depth: rr.depth,
                reranker: w.plugin.clone(),
                reranker_config: table_text(&w.config),
                generator: Some(exp.generator.plugin.clone()),
                generator_config: g.config.clone(),
                batch: rr.batch,
                use_cache: opts.use_cache,
                judging: judging_for(exp, name, *variant, out)?,
            };
            let reward = host.load(&w.plugin)?.reward(&o.reranker_config)?;
            let result = crate::stages::rerank::run_loaded(host, &o, ds, reward.as_ref(), Some(g.g.as_ref()));
            result.map(|_| ()).map_err(|e| g.explain(HostError::step(format!("eval {}", v.name), e)))
        }
        Work::Eval { variant, retriever, lexical, generator, query_weight } => {
            let v = &exp.variants[*variant];
            let mut step_gen = generator.as_ref().map(|m| r_generator(host, exp, m, out)).transpose()?;
            let lex = exp.lexical_spec();
            let (rname, rconfig) = match lexical {
                true => (lex.plugin.clone(), table_text(&lex.config)),
                false => (exp.retriever.plugin.clone(), with_model(&exp.retriever.config, retriever.path.as_deref())),
            };
            let o = crate::stages::eval::EvalOptions {
                dataset: name.clone(),
                split: exp.eval.split.clone(),
                mirror: exp.mirror.clone(),
                retriever: rname,
                retriever_config: rconfig,
                query_instruction: exp.eval.query_instruction.clone(),
                generator: generator.as_ref().map(|_| exp.generator.plugin.clone()),
                generator_config: step_gen.as_ref().map(|g| g.config.clone()).unwrap_or_default(),
                query_weight: *query_weight,
                augmentation_max_tokens: exp.eval.augmentation_max_tokens,
                index: exp.eval.index.parse().map_err(HostError::Input)?,
                k: exp.eval.k,
                measures: crate::engine::metrics::parse_measures(&exp.eval.measures.join(",")).map_err(HostError::Input)?,
                averaging: exp.eval.averaging.parse().map_err(HostError::Input)?,
                ignore_identical_ids: exp.eval.ignore_identical_ids,
                batch: exp.eval.batch,
                generation_batch: exp.eval.generation_batch,
                use_cache: opts.use_cache,
                output: out.to_owned(),
                name: v.name.clone(),
                experiment: Some(serde_json::json!({"name": exp.name, "variant": v.name, "variant_index": variant})),
            };
            use crate::stages::eval::FirstStage;
            let gen = step_gen.as_ref().map(|g| g.g.as_ref());
            let result = if *lexical {
                let mut tr = host.load(&o.retriever)?.text_retriever(&o.retriever_config)?;
                crate::stages::eval::run_loaded(host, &o, ds, FirstStage::Text(tr.as_mut()), gen)
            } else {
                let ret = r_retriever(host, exp, retriever)?;
                crate::stages::eval::run_loaded(host, &o, ds, FirstStage::Dense(ret.as_ref()), gen)
            };
            result.map(|_| ()).map_err(|e| {
                let e = HostError::step(format!("eval {}", v.name), e);
                match step_gen.as_mut() {
                    Some(g) => g.explain(e),
                    None => e,
                }
            })
        }
    }
}

/// How a fused or reranked variant's run is judged and written: the
/// experiment's `[eval]` settings, into `out` under the variant's name.
fn judging_for(exp: &Experiment, dataset: &str, variant: usize, out: &Path) -> Result<crate::stages::eval::Judging, HostError> {
    let v = &exp.variants[variant];
    Ok(crate::stages::eval::Judging {
        dataset: dataset.to_owned(),
        split: exp.eval.split.clone(),
        mirror: exp.mirror.clone(),
        measures: crate::engine::metrics::parse_measures(&exp.eval.measures.join(",")).map_err(HostError::Input)?,
        averaging: exp.eval.averaging.parse().map_err(HostError::Input)?,
        ignore_identical_ids: exp.eval.ignore_identical_ids,
        output: out.to_owned(),
        name: v.name.clone(),
        experiment: Some(serde_json::json!({"name": exp.name, "variant": v.name, "variant_index": variant})),
    })
}

/// A step's generator: the plugin loaded on the step's model and, with
/// `[serve]`, the engine serving that model (stopped when this drops, so
/// when the step ends or fails).
struct StepGenerator {
    g: Box<dyn rir_sdk::Generator>,
    /// The config text that names it in caches and results: without the
    /// engine's address, which changes with every start.
    config: String,
    engine: Option<crate::engine::served::ServedEngine>,
}

impl StepGenerator {
    /// A step's error, with the engine's exit and log tail when it died
    /// during the step (the generator's own error is a refused connection).
    fn explain(&mut self, e: HostError) -> HostError {
        match self.engine.as_mut().and_then(|en| en.exit_note()) {
            Some(note) => HostError::Input(format!("{e}\n{note}")),
            None => e,
        }
    }
}

fn r_generator(host: &PluginHost, exp: &Experiment, m: &Model, out: &Path) -> Result<StepGenerator, HostError> {
    let Some(spec) = &exp.serve else {
        let config = with_model(&exp.generator.config, m.path.as_deref());
        // Loaded at its first request when a step before loaded the same
        // model: a step whose every request is cached never loads it.
        let g = crate::stages::eval::generator_for(host, &exp.generator.plugin, &config, true)?;
        return Ok(StepGenerator { g, config, engine: None });
    };
    // The engine gets a local path: the tuned model's directory, or the
    // base model's source resolved (downloaded) into the cache.
    let model = match &m.path {
        Some(p) => p.clone(),
        None => {
            let source = model_source(&exp.generator.config, "generator")?;
            match rir_models::resolve(&source, &host.settings.cache_dir) {
                Ok(p) => p,
                // A name only the engine knows (vLLM's `ORG/NAME` from the Hub).
                Err(_) if !source.contains(':') && !Path::new(&source).exists() => PathBuf::from(source),
                Err(e) => return Err(HostError::Input(format!("[generator.config] model: {e}"))),
            }
        }
    };
    let plugin = host.load(&exp.generator.plugin)?;
    let served = spec.model_arg(&model)?;
    let mut t = exp.generator.config.clone();
    t.insert("model".into(), toml::Value::String(served.display().to_string()));
    t.insert("identity".into(), toml::Value::String(format!("served by {}", spec.engine.name())));
    let config = table_text(&t);
    let running = crate::engine::served::ServedEngine::start(spec, &served, &out.join("engine.log"))?;
    t.insert("base_url".into(), toml::Value::String(format!("{}/v1", running.base)));
    Ok(StepGenerator { g: plugin.generator(&table_text(&t))?, config, engine: Some(running) })
}
fn r_retriever(host: &PluginHost, exp: &Experiment, m: &Model) -> Result<Box<dyn rir_sdk::Retriever>, HostError> {
    host.load(&exp.retriever.plugin)?.retriever(&with_model(&exp.retriever.config, m.path.as_deref()))
}
fn gcache_for(host: &PluginHost, exp: &Experiment, opts: &RunOptions, g: &StepGenerator) -> Option<crate::engine::generate::GenerationCache> {
    opts.use_cache.then(|| crate::engine::generate::GenerationCache::for_generator(&host.settings.cache_dir, &exp.generator.plugin, &g.config, g.g.as_ref()))
}

/// The CPU's model name (Linux), for the manifest.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_default()
}

/// The SIMD extensions the kernels choose between.
fn simd_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            // bf16 products (llama-generator's prefill = "bf16", candle-encoder's dtype = "bf16").
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ] {
            if on {
                out.push(name);
            }
        }
    }
    out
}

fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The comparison of all variants across datasets, against the first
/// variant: printed form returned, md / latex / csv / json saved, and each
/// variant's results as MTEB TaskResult files under `mteb/`, and its plots
/// under `plots/`.
fn write_tables(exp: &Experiment, files: &[PathBuf], root: &Path) -> Result<String, HostError> {
    let results = files.iter().map(|p| crate::engine::report::Results::read(p)).collect::<Result<Vec<_>, _>>()?;
    let opts = crate::engine::report::TableOptions {
        baseline: exp.variants.first().map(|v| v.name.clone()),
        alpha: exp.eval.alpha,
        measures: crate::engine::metrics::parse_measures(&exp.eval.measures.join(",")).map_err(HostError::Input)?,
        show_delta: true,
        correction: exp.eval.correction,
        ..Default::default()
    };
    let cmp = crate::engine::report::compare(&results, &opts)?;
    for (ext, f) in [("md", "md"), ("tex", "latex"), ("csv", "csv"), ("json", "json")] {
        let fmt: crate::engine::report::Format = f.parse().map_err(HostError::Input)?;
        crate::util::files::write_atomic(&root.join(format!("table.{ext}")), crate::engine::report::render(&cmp, fmt, true).as_bytes())?;
    }
    // The same numbers as MTEB's results folder holds them (one model folder a variant).
    crate::engine::mteb::write(&results, &root.join("mteb"))?;
    // The variants as bars and each one's per-query difference from the
    // baseline; a plot that fails costs a warning, not the run.
    if let Some(m) = opts.measures.first() {
        if let Err(e) = crate::engine::plots::comparison(&results, opts.baseline.as_deref(), m, &root.join("plots")) {
            log::warn!("comparison plots not drawn: {e}");
        }
    }
    Ok(crate::engine::report::render(&cmp, crate::engine::report::Format::Terminal, true))
}

/// `models`: the base generator's and retriever's ids (plugin, version,
/// sha256, config, content fingerprints of local model paths).
fn write_manifest(
    host: &PluginHost,
    exp: &Experiment,
    models: &serde_json::Value,
    steps: &[Step],
    results: &[PathBuf],
    seconds: f64,
    root: &Path,
) -> Result<(), HostError> {
    let mut plugins = BTreeMap::new();
    for name in [&exp.retriever.plugin, &exp.generator.plugin, &exp.rewards.retriever.plugin, &exp.rewards.generator.plugin, &exp.trainers.generator.plugin, &exp.trainers.retriever.plugin] {
        if let Ok(p) = host.load(name) {
            plugins.insert(name.clone(), serde_json::json!({"version": p.version, "sha256": p.sha256, "library": p.path}));
        }
    }
    let git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let machine = serde_json::json!({
        "os": std::env::consts::OS, "arch": std::env::consts::ARCH,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "threads": host.settings.threads,
        "hostname": std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_owned()).unwrap_or_default(),
        // The numbers depend on these: the plugins' CPU kernels (quantized
        // dot products, the gemm micro-kernels) pick their code path by them.
        "cpu": cpu_model(),
        "simd": simd_features(),
    });
    // The run's peak: the largest of the steps run in this process. Each
    // step resets the kernel's high-water mark, so an outside measure
    // (`/usr/bin/time`, getrusage) sees only the peak since the last step.
    let peak = steps.iter().filter(|s| !s.cached).filter_map(|s| s.peak_rss_bytes).max();
    // What every step (cached ones as they were when they ran) asked of the generator.
    let mut generation = crate::engine::generate::GenerationUsage::default();
    for g in steps.iter().filter_map(|s| s.generation.as_ref()) {
        generation.add(g);
    }
    let cost: Option<f64> = exp.generator.price.map(|_| steps.iter().filter_map(|s| s.cost).sum());
    let v = serde_json::json!({
        "experiment": exp, "plugins": plugins, "models": models, "git_commit": git, "machine": machine,
        "rir_version": env!("CARGO_PKG_VERSION"), "finished": utc_now(), "steps": steps, "results": results, "seconds": seconds,
        "peak_rss_bytes": peak, "generation": generation, "cost": cost,
    });
    crate::util::files::write_json(&root.join("manifest.json"), &v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn stale_partials_of_the_same_stage_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for n in ["eval-base-aaaa11112222.partial", "eval-base-bbbb33334444", "eval-other-cccc55556666.partial", "eval-base_x-dddd77778888.partial"] {
            std::fs::create_dir_all(d.join(n)).unwrap();
        }
        let mut notes = Vec::new();
        super::remove_stale_partials(&d.join("eval-base-bbbb33334444"), |m| notes.push(m.to_owned()));
        assert!(!d.join("eval-base-aaaa11112222.partial").exists(), "{notes:?}");
        for kept in ["eval-base-bbbb33334444", "eval-other-cccc55556666.partial", "eval-base_x-dddd77778888.partial"] {
            assert!(d.join(kept).exists(), "{kept}");
        }
        assert_eq!(notes.len(), 1);
    }
}
