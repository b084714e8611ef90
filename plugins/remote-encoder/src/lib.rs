//! Dense encoding through a served embedding engine, so a corpus that
//! outgrows one machine is encoded by an engine cluster: the
//! OpenAI-compatible `POST {base_url}/embeddings` (vLLM, llama.cpp's server,
//! `rir serve`, hosted APIs) or Text Embeddings Inference's
//! `POST {base_url}/embed`.
//!
//! ```toml
//! base_url = "http://127.0.0.1:8080/v1"  # TEI: the server root, e.g. http://127.0.0.1:8080
//! api = "openai"                          # openai | tei
//! model = "nomic-embed-text-v1.5"         # sent as `model` (openai); names the model in caches
//! query_instruction = "search_query: "    # prepended to queries (a request's instruction wins)
//! document_instruction = "search_document: "  # prepended to corpus-side texts
//! normalize = true                        # L2-normalise here (servers differ in whether they do)
//! batch_size = 32                         # texts per request
//! concurrency = 4                         # requests in flight
//! dim = 0                                 # 0: learned from one request when the plugin is made
//! max_length = 512                        # what the engine truncates to (reported; the engine decides)
//! dimensions = 0                          # OpenAI's `dimensions` (Matryoshka models); 0: not sent
//! extra = { }                             # more JSON fields for every request body (vLLM's truncate_prompt_tokens)
//! api_key_env = "OPENAI_API_KEY"          # optional: the *name* of the variable holding the key
//! timeout_s = 120                         # per HTTP request
//! max_retries = 5                         # on 408, 409, 429, 5xx and connection errors
//! backoff_ms = 500                        # first retry delay; doubles, with jitter; Retry-After wins
//! identity = "..."                        # optional: names the server in caches instead of the URL
//! ```
//!
//! The host's embedding cache is keyed by the fingerprint, which holds the
//! API, the model, the document instruction, normalisation, `dimensions`,
//! `extra` and a hash of the server's URL (or of `identity`, for a server
//! whose address changes between starts of the same model) — never the URL
//! itself, which may carry credentials. The key is handled as the
//! openai-generator handles it (read once, redacted, sent only in the
//! Authorization header).

use rir_models::api::{self, ApiClient, ApiSettings, CallError};
use rir_models::encoder;
use rir_sdk::{config, Embeddings, PluginError, PluginResult, Retriever, RetrieverInfo};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Openai,
    Tei,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub base_url: String,
    #[serde(default = "default_api")]
    pub api: Api,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub query_instruction: String,
    #[serde(default)]
    pub document_instruction: String,
    #[serde(default = "yes")]
    pub normalize: bool,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub dim: usize,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub dimensions: usize,
    #[serde(default)]
    pub extra: Map<String, Value>,
    pub api_key_env: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    pub identity: Option<String>,
}

fn default_api() -> Api {
    Api::Openai
}
fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    32
}
fn default_concurrency() -> usize {
    4
}
fn default_max_length() -> usize {
    512
}
fn default_timeout() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> u64 {
    500
}

impl RemoteConfig {
    fn api_settings(&self) -> ApiSettings {
        ApiSettings {
            base_url: self.base_url.clone(),
            api_key_env: self.api_key_env.clone(),
            timeout_s: self.timeout_s,
            max_retries: self.max_retries,
            backoff_ms: self.backoff_ms,
        }
    }
}

pub struct RemoteEncoder {
    api: Api,
    model: String,
    client: ApiClient,
    query_instruction: String,
    document_instruction: String,
    normalize: bool,
    batch_size: usize,
    concurrency: usize,
    dimensions: usize,
    extra: Map<String, Value>,
    info: RetrieverInfo,
}

impl RemoteEncoder {
    /// The config, parsed and checked without contacting the server.
    pub fn checked(config_toml: &str) -> PluginResult<RemoteConfig> {
        let cfg: RemoteConfig = config::parse(config_toml)?;
        api::check(&cfg.api_settings())?;
        if cfg.api == Api::Openai && cfg.model.is_empty() {
            return Err(PluginError::config("model: required for api = \"openai\" (the request's `model` field)"));
        }
        if cfg.batch_size == 0 {
            return Err(PluginError::config("batch_size must be at least 1"));
        }
        if cfg.concurrency == 0 {
            return Err(PluginError::config("concurrency must be at least 1"));
        }
        if cfg.api == Api::Tei && cfg.dimensions > 0 {
            return Err(PluginError::config("dimensions: TEI's /embed has no such field (api = \"tei\")"));
        }
        for k in ["input", "inputs", "model", "encoding_format"] {
            if cfg.extra.contains_key(k) {
                return Err(PluginError::config(format!("extra.{k}: set by the plugin, not by `extra`")));
            }
        }
        Ok(cfg)
    }

    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg = Self::checked(config_toml)?;
        let client = ApiClient::new(&cfg.api_settings())?;
        let server = cfg.identity.clone().unwrap_or_else(|| client.base().to_owned());
        let server_hash = format!("{:x}", Sha256::digest(server.as_bytes()));
        let extra = Value::Object(cfg.extra.clone()).to_string();
        let mut enc = Self {
            api: cfg.api,
            model: cfg.model.clone(),
            client,
            query_instruction: cfg.query_instruction,
            document_instruction: cfg.document_instruction.clone(),
            normalize: cfg.normalize,
            batch_size: cfg.batch_size,
            concurrency: cfg.concurrency,
            dimensions: cfg.dimensions,
            extra: cfg.extra,
            info: RetrieverInfo {
                model: if cfg.model.is_empty() { "tei".into() } else { cfg.model.clone() },
                fingerprint: String::new(),
                corpus_fingerprint: None,
                dim: cfg.dim,
                max_length: cfg.max_length,
                normalized: cfg.normalize,
            },
        };
        if enc.info.dim == 0 {
            enc.info.dim = enc.request(&["dimension probe".to_owned()])?[0].len();
            rir_sdk::log::info!("{}: {}-d embeddings (asked the server)", enc.info.model, enc.info.dim);
        }
        let settings = format!(
            "api={:?}/model={}/doc={:?}/norm={}/dimensions={}/extra={extra}/dim={}",
            enc.api, enc.model, cfg.document_instruction, enc.normalize, enc.dimensions, enc.info.dim
        );
        let h = format!("{:x}", Sha256::digest(format!("{settings}/{server_hash}").as_bytes()));
        enc.info.fingerprint = format!("remote-v1/{}/{}", enc.info.model, &h[..24]);
        Ok(enc)
    }

    /// One request's embeddings, in input order, as the server returned them.
    fn request(&self, texts: &[String]) -> PluginResult<Vec<Vec<f32>>> {
        let (path, mut body) = match self.api {
            Api::Openai => {
                let mut b = json!({"model": self.model, "input": texts, "encoding_format": "float"});
                if self.dimensions > 0 {
                    b["dimensions"] = json!(self.dimensions);
                }
                ("embeddings", b)
            }
            // `truncate`: TEI refuses inputs over its max length otherwise.
            Api::Tei => ("embed", json!({"inputs": texts, "truncate": true, "normalize": false})),
        };
        for (k, v) in &self.extra {
            body[k] = v.clone();
        }
        let v = self.client.post(path, &body).map_err(|e| match e {
            CallError::Refused { url, status, message } => PluginError::input(format!("{url}: HTTP {status}: {message}")),
            CallError::Failed(e) => e,
        })?;
        parse_embeddings(&v, self.api, texts.len(), path)
    }

    fn encode(&self, texts: &[String], instruction: &str) -> PluginResult<Embeddings> {
        let texts = encoder::with_instruction(texts, instruction);
        let batches: Vec<&[String]> = texts.chunks(self.batch_size).collect();
        let rows = api::pooled(self.concurrency, batches.len(), |i| self.request(batches[i]))?;
        let dim = self.info.dim;
        let mut data = Vec::with_capacity(texts.len() * dim);
        for row in rows.into_iter().flatten() {
            if row.len() != dim {
                return Err(PluginError::other(format!(
                    "the server returned a {}-d embedding; this encoder is {dim}-d (set `dim` to match, or leave it 0)",
                    row.len()
                )));
            }
            data.extend_from_slice(&row);
        }
        if self.normalize {
            encoder::l2_normalize(&mut data, dim);
        }
        Embeddings::new(texts.len(), dim, data)
    }
}

/// The embeddings of one response: OpenAI's `{"data": [{"index", "embedding"}]}`
/// (put back in index order) or TEI's bare `[[...], ...]`.
fn parse_embeddings(v: &Value, api: Api, n: usize, path: &str) -> PluginResult<Vec<Vec<f32>>> {
    let bad = |what: &str| {
        PluginError::other(format!(
            "{path}: unexpected response ({what}): {}",
            v.to_string().chars().take(200).collect::<String>()
        ))
    };
    let vector = |e: &Value| -> PluginResult<Vec<f32>> {
        let a = e.as_array().ok_or_else(|| bad("an embedding that is not a list of numbers"))?;
        a.iter().map(|x| x.as_f64().map(|x| x as f32).ok_or_else(|| bad("a non-numeric value in an embedding"))).collect()
    };
    let out: Vec<Vec<f32>> = match api {
        Api::Openai => {
            let data = v.get("data").and_then(Value::as_array).ok_or_else(|| bad("no data"))?;
            let mut items: Vec<(u64, &Value)> = data
                .iter()
                .enumerate()
                .map(|(i, d)| (d.get("index").and_then(Value::as_u64).unwrap_or(i as u64), d))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            items
                .into_iter()
                .map(|(_, d)| vector(d.get("embedding").ok_or_else(|| bad("an item without an embedding"))?))
                .collect::<PluginResult<_>>()?
        }
        Api::Tei => v.as_array().ok_or_else(|| bad("not a list of embeddings"))?.iter().map(vector).collect::<PluginResult<_>>()?,
    };
    if out.len() != n {
        return Err(bad(&format!("{} embeddings for {n} inputs", out.len())));
    }
    Ok(out)
}

impl Retriever for RemoteEncoder {
    fn info(&self) -> RetrieverInfo {
        self.info.clone()
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        self.encode(texts, instruction.unwrap_or(&self.query_instruction))
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        self.encode(texts, &self.document_instruction)
    }
}

rir_sdk::export_plugin! {
    name: "remote-encoder",
    description: "Served embedding engines: OpenAI-compatible /v1/embeddings (vLLM, llama.cpp, hosted) and TEI's /embed",
    retriever: RemoteEncoder::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Retriever => RemoteEncoder::checked(text).map(drop),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_response_shapes_are_read_in_input_order() {
        let v = json!({"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}]});
        assert_eq!(parse_embeddings(&v, Api::Openai, 2, "embeddings").unwrap(), vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        let v = json!([[0.5, 0.5], [1.0, 2.0]]);
        assert_eq!(parse_embeddings(&v, Api::Tei, 2, "embed").unwrap()[1], vec![1.0, 2.0]);
        let e = parse_embeddings(&json!({"data": []}), Api::Openai, 1, "embeddings").unwrap_err().to_string();
        assert!(e.contains("0 embeddings for 1 inputs"), "{e}");
        let e = parse_embeddings(&json!({"object": "error"}), Api::Openai, 1, "embeddings").unwrap_err().to_string();
        assert!(e.contains("no data"), "{e}");
    }

    #[test]
    fn permanent_setup_mistakes_fail_without_contacting_the_server() {
        for (cfg, says) in [
            ("base_url = \"ftp://u:pw@h/v1\"\nmodel = \"m\"", "base_url: must start with http"),
            ("base_url = \"http://127.0.0.1:1/v1\"", "model: required"),
            ("base_url = \"http://127.0.0.1:1\"\napi = \"tei\"\ndimensions = 64", "dimensions: TEI"),
            ("base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nbatch_size = 0", "batch_size"),
            ("base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nextra = { input = 1 }", "extra.input"),
            ("base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\napi = \"cohere\"", "api"),
            ("base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nbatch = 3", "batch"),
        ] {
            let e = RemoteEncoder::checked(cfg).err().expect(cfg).to_string();
            assert!(e.contains(says) && !e.contains("pw@"), "{cfg}: {e}");
        }
    }
}
