//! Generation through any OpenAI-compatible HTTP server: `/v1/chat/completions`
//! for chat prompts, `/v1/completions` for text prompts.
//!
//! ```toml
//! base_url = "http://127.0.0.1:8080/v1"
//! model = "smollm2"
//! api_key_env = "OPENAI_API_KEY"   # optional: the *name* of the variable holding the key
//! concurrency = 4                  # requests in flight
//! timeout_s = 120                  # per HTTP request
//! max_retries = 5                  # on 408, 409, 429, 5xx and connection errors
//! backoff_ms = 500                 # first retry delay; doubles, with jitter; Retry-After wins
//! max_n = 0                        # cap on n per request (0: none; learned from 400s)
//! identity = "..."                 # optional: names the model in caches instead of the URL
//! tokenizer = "hf:Qwen/Qwen2.5-7B-Instruct"  # optional: counts tokens when the server sends no `usage`
//! ```
//!
//! Usage: each request's prompt and completion tokens are the server's
//! `usage`; a server that sends none has them counted with `tokenizer`
//! (a `tokenizer.json`, or a model source whose directory holds one) over
//! the prompt's text (a chat's message contents, without the template's
//! few tokens) and each choice's text, or left uncounted without one. The
//! prompt tokens the server served from its prompt cache come from
//! `usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM, llama.cpp,
//! `rir serve`) or llama.cpp's `timings.cache_n`, else stay unknown.
//!
//! `identity` is for servers whose address changes between starts of the
//! same model (`rir run` sets it for the engines it starts, `[serve]`, on a
//! free port each time): the model name, which keys the host's caches, is
//! then `openai:MODEL@IDENTITY` instead of `openai:MODEL@BASE_URL`.
//!
//! Scoring (`Generator::score`) uses the completions API with `echo`,
//! `logprobs` and `max_tokens` 0: the server returns the log-probability of
//! every prompt token, and the tokens from the continuation's first
//! character on are summed (`text_offset`: vLLM answers echo requests in
//! this shape too). Only text prompts can be scored this way (the chat API returns
//! no prompt log-probabilities); a server that does not echo them is an
//! error that says what it returned. `rir serve` answers these requests.
//!
//! The key is read from the environment when the plugin is created and is
//! sent only in the Authorization header: it is not logged, not part of the
//! model name (which keys the host's caches), and not in any error.

use std::sync::atomic::{AtomicU32, Ordering};

use rir_models::api::{self, ApiClient, ApiSettings, CallError};
use rir_sdk::{
    config, Completion, GenerationRequest, Generator, PluginError, PluginResult, Prompt,
    RequestUsage, Score, ScoreRequest, TokenLogprob,
};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    pub base_url: String,
    pub model: String,
    pub api_key_env: Option<String>,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    #[serde(default)]
    pub max_n: u32,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub tokenizer: Option<String>,
}

impl OpenAiConfig {
    fn api(&self) -> ApiSettings {
        ApiSettings {
            base_url: self.base_url.clone(),
            api_key_env: self.api_key_env.clone(),
            timeout_s: self.timeout_s,
            max_retries: self.max_retries,
            backoff_ms: self.backoff_ms,
        }
    }
}

fn default_concurrency() -> usize {
    4
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

pub struct OpenAiGenerator {
    model: String,
    /// What names the server in `model_name` (the URL unless `identity`).
    identity: String,
    client: ApiClient,
    concurrency: usize,
    /// Largest n the server accepted or was configured with (0: unknown).
    max_n: AtomicU32,
    /// Counts tokens when the server sends no `usage`.
    counter: Option<api::TokenCounter>,
}

impl OpenAiGenerator {
    /// The config, parsed and checked without contacting the server (what
    /// `validate` runs too): a permanent mistake fails here, not after retries.
    pub fn checked(config_toml: &str) -> PluginResult<OpenAiConfig> {
        let cfg: OpenAiConfig = config::parse(config_toml)?;
        api::check(&cfg.api())?;
        if cfg.concurrency == 0 {
            return Err(PluginError::config("concurrency must be at least 1"));
        }
        Ok(cfg)
    }

    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg = Self::checked(config_toml)?;
        let client = ApiClient::new(&cfg.api())?;
        let counter = cfg.tokenizer.as_deref().map(|t| api::TokenCounter::load(t, &rir_sdk::host().cache_dir)).transpose()?;
        Ok(Self {
            counter,
            identity: cfg.identity.unwrap_or_else(|| client.base().to_owned()),
            client,
            model: cfg.model,
            concurrency: cfg.concurrency,
            max_n: AtomicU32::new(cfg.max_n),
        })
    }

    fn body(&self, r: &GenerationRequest, n: u32, seed: Option<u64>) -> (String, Value) {
        let mut b = json!({
            "model": self.model, "n": n, "temperature": r.temperature, "top_p": r.top_p,
            "max_tokens": r.max_tokens,
        });
        if !r.stop.is_empty() {
            b["stop"] = json!(r.stop);
        }
        if let Some(s) = seed {
            b["seed"] = json!(s);
        }
        match &r.prompt {
            Prompt::Chat(m) => {
                b["messages"] = json!(m
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect::<Vec<_>>());
                if r.logprobs {
                    b["logprobs"] = json!(true);
                }
                ("chat/completions".into(), b)
            }
            Prompt::Text(t) => {
                b["prompt"] = json!(t);
                if r.logprobs {
                    b["logprobs"] = json!(1);
                }
                ("completions".into(), b)
            }
        }
    }

    /// All `r.n` completions for one request, splitting n when the server caps it.
    fn one(&self, r: &GenerationRequest) -> PluginResult<Vec<Completion>> {
        let mut out = Vec::with_capacity(r.n as usize);
        // Summed over the HTTP calls a split n takes; None once one lacks `usage`.
        let mut usage = RequestUsage { prompt_tokens: Some(0), completion_tokens: Some(0), retries: 0, cached_tokens: Some(0) };
        while out.len() < r.n as usize {
            let left = r.n - out.len() as u32;
            let cap = self.max_n.load(Ordering::Relaxed);
            let n = if cap > 0 { left.min(cap) } else { left };
            // Split requests get distinct seeds so they do not repeat each other.
            let seed = r.seed.map(|s| s + out.len() as u64);
            let (path, body) = self.body(r, n, seed);
            let (answer, retries) = self.client.post_counted(&path, &body);
            usage.retries += retries;
            match answer {
                Ok(v) => {
                    let choices = parse_choices(&v, &path, n)?;
                    let mut reported = reported_usage(&v);
                    if let Some(c) = &self.counter {
                        reported.prompt_tokens = reported.prompt_tokens.or_else(|| Some(c.count(&prompt_text(&r.prompt))));
                        reported.completion_tokens = reported.completion_tokens.or_else(|| Some(choices.iter().map(|x| c.count(&x.text)).sum()));
                    }
                    out.extend(choices);
                    usage.prompt_tokens = usage.prompt_tokens.zip(reported.prompt_tokens).map(|(a, b)| a + b);
                    usage.completion_tokens = usage.completion_tokens.zip(reported.completion_tokens).map(|(a, b)| a + b);
                    usage.cached_tokens = usage.cached_tokens.zip(reported.cached_tokens).map(|(a, b)| a + b);
                }
                // A 400 for n > 1: the server caps n (OpenAI's o-series, some engines).
                Err(CallError::Refused { status: 400, message: msg, .. }) if n > 1 => {
                    let new_cap = (n / 2).max(1);
                    rir_sdk::log::warn!(
                        "server refused n={n} ({msg}); asking for at most {new_cap} per request"
                    );
                    self.max_n.store(new_cap, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into_plugin_error()),
            }
        }
        if let Some(c) = out.first_mut() {
            c.usage = Some(usage);
        }
        Ok(out)
    }
}

/// A prompt's text as a tokenizer counts it: a chat's message contents.
fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    }
}

/// The response's `usage` (OpenAI, vLLM, llama.cpp's server and `rir serve`
/// send it); None for the counts a server leaves out. Cached prompt tokens:
/// `usage.prompt_tokens_details.cached_tokens` (OpenAI, vLLM, `rir serve`),
/// else llama.cpp's `timings.cache_n`.
fn reported_usage(v: &Value) -> RequestUsage {
    let count = |k: &str| v.pointer(k).and_then(Value::as_u64).map(|n| n as u32);
    RequestUsage {
        prompt_tokens: count("/usage/prompt_tokens"),
        completion_tokens: count("/usage/completion_tokens"),
        retries: 0,
        cached_tokens: count("/usage/prompt_tokens_details/cached_tokens").or_else(|| count("/timings/cache_n")),
    }
}

fn parse_choices(v: &Value, path: &str, n: u32) -> PluginResult<Vec<Completion>> {
    let bad = |what: &str| {
        PluginError::other(format!(
            "{path}: unexpected response ({what}): {}",
            v.to_string().chars().take(200).collect::<String>()
        ))
    };
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no choices"))?;
    if choices.len() != n as usize {
        return Err(bad(&format!("{} choices for n={n}", choices.len())));
    }
    let mut sorted: Vec<&Value> = choices.iter().collect();
    sorted.sort_by_key(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0));
    sorted
        .into_iter()
        .map(|c| {
            let text = c
                .pointer("/message/content")
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a choice without text"))?
                .to_owned();
            let finish_reason = c
                .get("finish_reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let logprobs = if let Some(content) =
                c.pointer("/logprobs/content").and_then(Value::as_array)
            {
                Some(
                    content
                        .iter()
                        .map(|t| TokenLogprob {
                            token: t
                                .get("token")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            logprob: t.get("logprob").and_then(Value::as_f64).unwrap_or(f64::NAN)
                                as f32,
                        })
                        .collect(),
                )
            } else if let (Some(toks), Some(lps)) = (
                c.pointer("/logprobs/tokens").and_then(Value::as_array),
                c.pointer("/logprobs/token_logprobs")
                    .and_then(Value::as_array),
            ) {
                Some(
                    toks.iter()
                        .zip(lps)
                        .map(|(t, l)| TokenLogprob {
                            token: t.as_str().unwrap_or("").to_owned(),
                            logprob: l.as_f64().unwrap_or(f64::NAN) as f32,
                        })
                        .collect(),
                )
            } else {
                None
            };
            Ok(Completion { text, finish_reason, logprobs, usage: None })
        })
        .collect()
}

/// The continuation's log-probabilities from an echoed completions response.
fn parse_echo(v: &Value, prompt: &str, continuation: &str) -> PluginResult<Score> {
    let bad = |what: &str| {
        PluginError::other(format!(
            "completions: the server returned no prompt log-probabilities ({what}); scoring needs `echo` with `logprobs` \
             and max_tokens 0 (vLLM and OpenAI-style servers, `rir serve`); it returned: {}",
            v.to_string().chars().take(200).collect::<String>()
        ))
    };
    let c = v.pointer("/choices/0").ok_or_else(|| bad("no choices"))?;
    let start = prompt.chars().count();
    let want = start + continuation.chars().count();
    let mut tokens = Vec::new();
    if let (Some(toks), Some(lps), Some(offs)) = (
        c.pointer("/logprobs/tokens").and_then(Value::as_array),
        c.pointer("/logprobs/token_logprobs").and_then(Value::as_array),
        c.pointer("/logprobs/text_offset").and_then(Value::as_array),
    ) {
        for ((t, l), o) in toks.iter().zip(lps).zip(offs) {
            let o = o.as_u64().ok_or_else(|| bad("a text_offset that is no number"))? as usize;
            // A token straddling the boundary belongs to the continuation.
            let end = o + t.as_str().map_or(0, |t| t.chars().count());
            if end > start && o < want {
                let lp = l.as_f64().ok_or_else(|| bad("a continuation token without a log-probability"))?;
                tokens.push(TokenLogprob { token: t.as_str().unwrap_or("").to_owned(), logprob: lp as f32 });
            }
        }
    } else {
        return Err(bad("no logprobs.tokens / token_logprobs / text_offset"));
    }
    if tokens.is_empty() {
        return Err(bad("no token at or after the continuation's offset"));
    }
    let usage = RequestUsage { completion_tokens: Some(0), ..reported_usage(v) };
    Ok(Score { logprob: tokens.iter().map(|t| t.logprob as f64).sum(), tokens, usage: Some(usage) })
}

impl OpenAiGenerator {
    fn score_one(&self, r: &ScoreRequest) -> PluginResult<Score> {
        let Prompt::Text(prompt) = &r.prompt else {
            return Err(PluginError::Unsupported(
                "scoring a chat prompt: the OpenAI API returns prompt log-probabilities for text prompts only \
                 (use the reward's text prompt format)"
                    .into(),
            ));
        };
        let body = json!({
            "model": self.model, "prompt": format!("{prompt}{}", r.continuation), "max_tokens": 0,
            "echo": true, "logprobs": 0, "temperature": 0.0,
        });
        let (answer, retries) = self.client.post_counted("completions", &body);
        match answer {
            Ok(v) => parse_echo(&v, prompt, &r.continuation).map(|mut s| {
                if let Some(u) = s.usage.as_mut() {
                    u.retries = retries;
                    if let (None, Some(c)) = (u.prompt_tokens, &self.counter) {
                        u.prompt_tokens = Some(c.count(&format!("{prompt}{}", r.continuation)));
                    }
                }
                s
            }),
            Err(e) => Err(e.into_plugin_error()),
        }
    }
}

impl Generator for OpenAiGenerator {
    fn model_name(&self) -> String {
        format!("openai:{}@{}", self.model, self.identity)
    }

    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        api::pooled(self.concurrency, requests.len(), |i| self.score_one(&requests[i]))
    }

    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        api::pooled(self.concurrency, requests.len(), |i| self.one(&requests[i]))
    }
}

rir_sdk::export_plugin! {
    name: "openai-generator",
    description: "Any OpenAI-compatible server: chat and completions, retries, n-splitting",
    generator: OpenAiGenerator::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Generator => OpenAiGenerator::checked(text).map(drop),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::{parse_echo, reported_usage, OpenAiGenerator};
    use rir_sdk::RequestUsage;

    #[test]
    fn usage_is_read_as_the_server_reports_it() {
        let v = serde_json::json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}});
        assert_eq!(reported_usage(&v), RequestUsage { prompt_tokens: Some(12), completion_tokens: Some(30), ..Default::default() });
        // Cached prompt tokens as OpenAI and vLLM report them, and as llama.cpp's server does.
        let v = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}});
        assert_eq!(reported_usage(&v).cached_tokens, Some(8));
        let v = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 3}, "timings": {"cache_n": 5, "prompt_n": 7}});
        assert_eq!(reported_usage(&v).cached_tokens, Some(5));
        // A server without `usage` leaves the counts unknown, not zero.
        assert_eq!(reported_usage(&serde_json::json!({"choices": []})), RequestUsage::default());
        // Echo scoring (max_tokens 0): what was read, nothing written.
        let v = serde_json::json!({"choices": [{"logprobs": {"tokens": ["Q", " a"], "token_logprobs": [null, -1.0], "text_offset": [0, 1]}}],
                                   "usage": {"prompt_tokens": 2, "completion_tokens": 0}});
        assert_eq!(parse_echo(&v, "Q", " a").unwrap().usage, Some(RequestUsage { prompt_tokens: Some(2), completion_tokens: Some(0), ..Default::default() }));
    }

    #[test]
    fn permanent_setup_mistakes_fail_at_once() {
        let t = std::time::Instant::now();
        for (cfg, says) in [
            ("base_url = \"ftp://user:pw@host/v1\"\nmodel = \"m\"", "base_url: must start with http:// or https://"),
            ("base_url = \"localhost:8000/v1\"\nmodel = \"m\"", "base_url: must start with http:// or https://"),
            ("base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\nconcurrency = 0", "concurrency must be at least 1"),
        ] {
            let e = OpenAiGenerator::new(cfg).err().expect(cfg).to_string();
            assert!(e.contains(says) && !e.contains("pw@"), "{cfg}: {e}");
        }
        assert!(t.elapsed().as_secs() < 2, "no retries: {:?}", t.elapsed());
        assert!(OpenAiGenerator::checked("base_url = \"HTTPS://api.example.com/v1\"\nmodel = \"m\"").is_ok());
    }

    #[test]
    fn echoed_prompt_logprobs_are_split_at_the_continuation() {
        // OpenAI's legacy shape (what `rir serve` writes): the prompt "Q:" then " a b".
        let v = serde_json::json!({"choices": [{"logprobs": {
            "tokens": ["Q", ":", " a", " b"], "token_logprobs": [null, -1.0, -2.0, -0.5], "text_offset": [0, 1, 2, 4]}}]});
        let s = parse_echo(&v, "Q:", " a b").unwrap();
        assert_eq!(s.tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(), [" a", " b"]);
        assert_eq!(s.logprob, -2.5);
        // A token straddling the boundary belongs to the continuation.
        let v = serde_json::json!({"choices": [{"logprobs": {
            "tokens": ["Q", ":a", " b"], "token_logprobs": [null, -1.5, -0.5], "text_offset": [0, 1, 3]}}]});
        assert_eq!(parse_echo(&v, "Q:", "a b").unwrap().logprob, -2.0);
        // No logprob for a continuation token is an error, not a silent zero.
        let v = serde_json::json!({"choices": [{"logprobs": {"tokens": ["Q", " a"], "token_logprobs": [null, null], "text_offset": [0, 1]}}]});
        assert!(parse_echo(&v, "Q", " a").unwrap_err().to_string().contains("without a log-probability"));
        // A server that does not echo says what it returned.
        let v = serde_json::json!({"choices": [{"text": ".", "logprobs": null}]});
        let e = parse_echo(&v, "Q:", " a").unwrap_err().to_string();
        assert!(e.contains("no prompt log-probabilities") && e.contains("it returned"), "{e}");
    }
}
