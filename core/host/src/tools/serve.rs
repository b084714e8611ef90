//! `rir serve`: a Generator plugin behind an OpenAI-compatible HTTP API
//! (`/v1/chat/completions`, `/v1/completions`), a Retriever plugin behind
//! OpenAI's `/v1/embeddings` and Text Embeddings Inference's `/embed` and
//! `/info`, or both; `/v1/models` and `/health` always. A tuned generator
//! or retriever can so be used by other tools, and one machine's encoder by
//! the remote-encoder plugin on another.
//!
//! Embeddings are the retriever's corpus-side encoding of the text as sent
//! (no instruction added: a client that wants one prepends it, as with any
//! embedding server). `/embed` normalises unless `"normalize": false`.
//!
//! `/v1/completions` with `echo: true`, `logprobs` and `max_tokens: 0`
//! scores the prompt instead of continuing it (as vLLM and OpenAI's legacy
//! API do): every token with its log-probability (the first, which has no
//! context, as null) and its character offset, through `Generator::score`.
//!
//! Limits ([`Limits`]): a body over `max_body_bytes` is refused (413) before
//! it is read; `n`, `max_tokens` and the prompts per request are capped;
//! sampling values outside OpenAI's ranges, empty `messages` and unknown
//! roles are 400s in OpenAI's error shape; `stream: true` is refused (400:
//! generation is not incremental); when `workers + queue` requests are in
//! the house a new one gets 429 at once. Response ids are unique. A
//! generation whose client has gone (closed its connection) is cancelled:
//! a queued one never starts, a running one stops within a token
//! (generators that support it: `llama-generator`), so an abandoned `n = 16`
//! request does not hold a worker ([`ClientWatch`], Linux: TCP_INFO).

use std::io::Read as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rir_sdk::{Completion, GenerationRequest, Generator, Message, Prompt, Retriever, ScoreRequest};
use serde_json::{json, Value};

/// What one server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body read, bytes.
    pub max_body_bytes: usize,
    /// Largest `n` (completions per prompt).
    pub max_n: u32,
    /// Largest `max_tokens`.
    pub max_tokens: u32,
    /// Most prompts in one completions request.
    pub max_prompts: usize,
    /// Complete requests waiting for a generation worker; more get 429.
    pub queue: usize,
    /// Connections whose body is still being read (slow or stalled
    /// clients); more get 429, so they cannot starve the workers.
    pub max_readers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 1 << 20, max_n: 16, max_tokens: 4096, max_prompts: 64, queue: 16, max_readers: 64 }
    }
}

/// What one server serves: a generator, a retriever, or both.
#[derive(Clone, Copy)]
pub struct Backends<'a> {
    /// Answers `/v1/completions` and `/v1/chat/completions`.
    pub generator: Option<&'a dyn Generator>,
    /// Answers `/v1/embeddings`, `/embed` and `/info`.
    pub retriever: Option<&'a dyn Retriever>,
}

impl<'a> Backends<'a> {
    /// A generator alone.
    pub fn generator(g: &'a dyn Generator) -> Self {
        Backends { generator: Some(g), retriever: None }
    }
}

/// Serves a generator until the process is stopped, with `workers` request threads.
pub fn serve(generator: &dyn Generator, server: &tiny_http::Server, workers: usize) {
    serve_with(Backends::generator(generator), server, workers, Limits::default())
}

/// A request read, parsed and checked, waiting for a worker.
enum Job {
    Generate { chat: bool, reqs: Vec<GenerationRequest> },
    /// `echo` with `max_tokens` 0: score these prompts.
    Score { prompts: Vec<String> },
    /// `/v1/embeddings` (`tei` false) or `/embed`.
    Embed { texts: Vec<String>, tei: bool, normalize: bool },
}

/// [`serve`] with explicit backends and limits. Bodies are read on reader
/// threads (at most `max_readers`), so a client that stalls mid-body holds a
/// reader, never a worker; complete requests wait in a queue of `queue`.
pub fn serve_with(backends: Backends, server: &tiny_http::Server, workers: usize, limits: Limits) {
    let workers = workers.max(1);
    let readers = AtomicUsize::new(0);
    // Holds only the requests waiting: a full channel is the 429.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(tiny_http::Request, Job)>(limits.queue);
    let rx = std::sync::Mutex::new(rx);
    let busy = |what: &str| error(429, "rate_limit_error", format!("the server is busy ({what}); retry later"));
    let port = server.server_addr().to_ip().map(|a| a.port());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = rx.lock().expect("queue poisoned").recv();
                let Ok((req, job)) = next else { break };
                let watch = ClientWatch::new(req.remote_addr().copied(), port);
                let (status, body) = run(backends, job, &watch);
                if watch.gone() {
                    log::info!("client {:?} went away; its request was dropped", req.remote_addr());
                    continue;
                }
                respond(req, status, &body);
            });
        }
        while let Ok(req) = server.recv() {
            if readers.load(Ordering::SeqCst) >= limits.max_readers {
                let (status, body) = busy(&format!("{} connections still sending their request", limits.max_readers));
                respond(req, status, &body);
                continue;
            }
            readers.fetch_add(1, Ordering::SeqCst);
            let (tx, readers) = (tx.clone(), &readers);
            s.spawn(move || {
                let mut req = req;
                let job = read(backends, &mut req, &limits);
                readers.fetch_sub(1, Ordering::SeqCst);
                match job {
                    Err((status, body)) => respond(req, status, &body),
                    Ok(job) => match tx.try_send((req, job)) {
                        Ok(()) => {}
                        Err(std::sync::mpsc::TrySendError::Full((req, _))) => {
                            let (status, body) = busy(&format!("{workers} workers busy, queue of {} full", limits.queue));
                            respond(req, status, &body);
                        }
                        Err(std::sync::mpsc::TrySendError::Disconnected((req, _))) => {
                            respond(req, 503, &error(503, "server_error", "the server is shutting down").1)
                        }
                    },
                }
            });
        }
        drop(tx);
    });
}

fn respond(req: tiny_http::Request, status: u16, body: &Value) {
    let resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", "application/json").expect("header"));
    // A client that went away is not an error of the server's.
    let _ = req.respond(resp);
}

fn error(status: u16, kind: &str, message: impl std::fmt::Display) -> (u16, Value) {
    (status, json!({"error": {"message": message.to_string(), "type": kind, "param": Value::Null, "code": status}}))
}

/// A response id no other response of this process (or a restarted one
/// within the same second) shares.
fn next_id(kind: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{kind}-rir{:x}{:x}{:x}", nanos, std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Routes, reads and checks a request: `Ok(job)` for a generation,
/// scoring or embedding request to queue, `Err(answer)` for everything
/// answered at once (GETs, every client error), so a bad request never
/// waits in the queue.
fn read(b: Backends, req: &mut tiny_http::Request, limits: &Limits) -> Result<Job, (u16, Value)> {
    let path = req.url().split('?').next().unwrap_or("").trim_end_matches('/').to_owned();
    let generation = matches!(path.as_str(), "/v1/chat/completions" | "/v1/completions");
    let embedding = matches!(path.as_str(), "/v1/embeddings" | "/embed");
    match (req.method(), path.as_str()) {
        (tiny_http::Method::Get, "/health") => Err((200, json!({"status": "ok"}))),
        (tiny_http::Method::Get, "/v1/models") => {
            let mut data = Vec::new();
            if let Some(g) = b.generator {
                data.push(json!({"id": g.model_name(), "object": "model", "owned_by": "rir"}));
            }
            if let Some(r) = b.retriever {
                data.push(json!({"id": r.info().model, "object": "model", "owned_by": "rir"}));
            }
            Err((200, json!({"object": "list", "data": data})))
        }
        (tiny_http::Method::Get, "/info") if b.retriever.is_some() => {
            let info = b.retriever.expect("checked").info();
            Err((
                200,
                json!({"model_id": info.model, "model_type": {"embedding": {"pooling": "model"}}, "max_input_length": info.max_length,
                       "max_client_batch_size": limits.max_prompts, "dim": info.dim, "version": env!("CARGO_PKG_VERSION")}),
            ))
        }
        (tiny_http::Method::Post, _) if generation && b.generator.is_none() => {
            Err(error(404, "not_found", format!("no generator is served here (POST {path}): start rir serve with --generator")))
        }
        (tiny_http::Method::Post, _) if embedding && b.retriever.is_none() => {
            Err(error(404, "not_found", format!("no retriever is served here (POST {path}): start rir serve with --retriever")))
        }
        (tiny_http::Method::Post, _) if generation || embedding => {
            let body = json_body(req, limits)?;
            let bad = |m: String| error(400, "invalid_request_error", m);
            if embedding {
                return embed_request(&body, path == "/embed", limits).map_err(bad);
            }
            if body.get("stream").and_then(Value::as_bool) == Some(true) {
                return Err(error(400, "invalid_request_error", "`stream: true` is not supported: this server answers with whole completions"));
            }
            let chat = path.ends_with("chat/completions");
            if !chat && body.get("echo").and_then(Value::as_bool) == Some(true) {
                return echo_prompts(&body, limits).map(|prompts| Job::Score { prompts }).map_err(bad);
            }
            requests(&body, chat, limits).map(|reqs| Job::Generate { chat, reqs }).map_err(bad)
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/embed" | "/info" | "/v1/models" | "/health") => {
            Err(error(405, "invalid_request_error", format!("{} is not allowed on {path}", req.method())))
        }
        _ => Err(error(404, "not_found", format!("no route for {} {path}", req.method()))),
    }
}

/// The body as a JSON object, read up to the size limit.
fn json_body(req: &mut tiny_http::Request, limits: &Limits) -> Result<Value, (u16, Value)> {
    if req.body_length().is_some_and(|n| n > limits.max_body_bytes) {
        return Err(error(413, "invalid_request_error", format!("the body is over {} bytes", limits.max_body_bytes)));
    }
    // Read at most one byte past the limit (a chunked body has no length up front).
    let mut bytes = Vec::new();
    if let Err(e) = req.as_reader().take(limits.max_body_bytes as u64 + 1).read_to_end(&mut bytes) {
        return Err(error(400, "invalid_request_error", format!("reading the body: {e}")));
    }
    if bytes.len() > limits.max_body_bytes {
        return Err(error(413, "invalid_request_error", format!("the body is over {} bytes", limits.max_body_bytes)));
    }
    match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(error(400, "invalid_request_error", "the body must be a JSON object")),
        Err(e) => Err(error(400, "invalid_request_error", format!("body is not JSON: {e}"))),
    }
}

/// An embedding request: OpenAI's `input` or TEI's `inputs`, a string or a
/// list of strings (token-id inputs are refused: the tokenizer is ours).
fn embed_request(b: &Value, tei: bool, limits: &Limits) -> Result<Job, String> {
    let key = if tei { "inputs" } else { "input" };
    let texts: Vec<String> = match b.get(key) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_owned).ok_or_else(|| format!("`{key}` items must be strings (token ids are not accepted)")))
            .collect::<Result<_, _>>()?,
        _ => return Err(format!("`{key}` (a string or list of strings) is required")),
    };
    if texts.is_empty() || texts.len() > limits.max_prompts {
        return Err(format!("`{key}` must hold 1..={} texts (got {})", limits.max_prompts, texts.len()));
    }
    if !tei {
        if let Some(f) = b.get("encoding_format").and_then(Value::as_str).filter(|f| *f != "float") {
            return Err(format!("`encoding_format` {f:?} is not supported: use \"float\""));
        }
        if b.get("dimensions").is_some_and(|d| !d.is_null()) {
            return Err("`dimensions` is not supported: this model's embeddings have one size".into());
        }
    }
    let normalize = if tei { b.get("normalize").and_then(Value::as_bool).unwrap_or(true) } else { false };
    Ok(Job::Embed { texts, tei, normalize })
}

/// Requests given up because their client left (for tests and logs).
pub static CANCELLED: AtomicU64 = AtomicU64::new(0);

/// Whether a request's client is still connected, asked by the generator
/// between tokens (as [`rir_sdk::ProgressSink::cancelled`]). tiny_http does
/// not hand out its sockets, so the watch finds the connection among this
/// process's own descriptors (the one whose local port is ours and whose
/// peer is the client) and asks the kernel its TCP state: CLOSE_WAIT (the
/// client closed) or CLOSE (reset) is gone. Looked up at most every
/// 200 ms; never "gone" where it cannot tell (not Linux, socket not found).
/// (Reading /proc/net/tcp instead costs milliseconds per look once a busy
/// server has thousands of TIME_WAIT entries, and is no snapshot.)
pub struct ClientWatch {
    peer: Option<std::net::SocketAddr>,
    port: Option<u16>,
    /// When the state was last read, whether the client was seen gone, and
    /// the descriptor found last time (checked again before it is trusted).
    last: std::sync::Mutex<(Option<std::time::Instant>, bool, Option<i32>)>,
}

impl ClientWatch {
    /// Watches the connection from `peer` to our `port`.
    pub fn new(peer: Option<std::net::SocketAddr>, port: Option<u16>) -> Self {
        ClientWatch { peer: peer.map(plain), port, last: std::sync::Mutex::new((None, false, None)) }
    }

    /// Whether the client has gone (sticky once seen).
    pub fn gone(&self) -> bool {
        let (Some(peer), Some(port)) = (self.peer, self.port) else { return false };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.1 || last.0.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(200)) {
            return last.1;
        }
        last.0 = Some(std::time::Instant::now());
        let fd = last.2.filter(|&fd| is_connection(fd, peer, port)).or_else(|| find_connection(peer, port));
        last.2 = fd;
        // 8 CLOSE_WAIT: the client sent FIN; 7 CLOSE: it reset.
        last.1 = fd.and_then(tcp_state).is_some_and(|s| s == 8 || s == 7);
        last.1
    }
}

impl rir_sdk::ProgressSink for ClientWatch {
    fn report(&self, _: &rir_sdk::Progress) {}
    fn cancelled(&self) -> bool {
        self.gone()
    }
}

/// An IPv4 client on a dual-stack socket (::ffff:a.b.c.d) as a.b.c.d.
fn plain(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a {
        std::net::SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(a, |v4| std::net::SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    }
}

/// This process's descriptor of the connection `peer` → our `port`.
fn find_connection(peer: std::net::SocketAddr, port: u16) -> Option<i32> {
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&fd| is_connection(fd, peer, port))
}

fn is_connection(fd: i32, peer: std::net::SocketAddr, port: u16) -> bool {
    sock_addr(fd, libc::getsockname).is_some_and(|a| a.port() == port) && sock_addr(fd, libc::getpeername).map(plain) == Some(peer)
}

/// getsockname / getpeername of `fd` as a SocketAddr (None: not an inet socket).
fn sock_addr(
    fd: i32,
    get: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32,
) -> Option<std::net::SocketAddr> {
    // SAFETY: a zeroed sockaddr_storage is valid, and the kernel writes at
    // most `len` bytes into it; a stale or foreign fd only fails the call.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { get(fd, (&raw mut ss).cast(), &mut len) } != 0 {
        return None;
    }
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
            Some(std::net::SocketAddr::new(std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const ss).cast()) };
            Some(std::net::SocketAddr::new(std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// The kernel's TCP state of a socket (TCP_INFO's `tcpi_state`).
#[cfg(target_os = "linux")]
fn tcp_state(fd: i32) -> Option<u8> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    (rc == 0).then_some(info.tcpi_state)
}

#[cfg(not(target_os = "linux"))]
fn tcp_state(_: i32) -> Option<u8> {
    None
}

/// Runs a checked request on its backend; a generation stops when `watch`
/// sees its client gone (then the answer is never sent).
fn run(b: Backends, job: Job, watch: &ClientWatch) -> (u16, Value) {
    if watch.gone() {
        CANCELLED.fetch_add(1, Ordering::Relaxed);
        return error(499, "client_closed", "the client closed the connection");
    }
    match job {
        Job::Embed { texts, tei, normalize } => embed(b.retriever.expect("routed only when served"), &texts, tei, normalize),
        Job::Score { prompts } => echo(b.generator.expect("routed only when served"), &prompts),
        Job::Generate { chat, reqs } => {
            let g = b.generator.expect("routed only when served");
            match g.generate_with(&reqs, watch) {
                Ok(out) => (200, response(g, chat, &reqs, out)),
                Err(rir_sdk::PluginError::Cancelled) => {
                    CANCELLED.fetch_add(1, Ordering::Relaxed);
                    error(499, "client_closed", "the client closed the connection")
                }
                Err(e @ rir_sdk::PluginError::Input(_)) => error(400, "invalid_request_error", e),
                Err(e) => error(500, "server_error", e),
            }
        }
    }
}

/// An embedding request's answer, in OpenAI's or TEI's shape.
fn embed(r: &dyn Retriever, texts: &[String], tei: bool, normalize: bool) -> (u16, Value) {
    let e = match r.encode_corpus(texts) {
        Ok(e) => e,
        Err(e @ rir_sdk::PluginError::Input(_)) => return error(400, "invalid_request_error", e),
        Err(e) => return error(500, "server_error", e),
    };
    let mut e = e;
    if normalize {
        rir_models::encoder::l2_normalize(&mut e.data, e.dim);
    }
    let rows: Vec<&[f32]> = (0..e.rows).map(|i| e.row(i)).collect();
    if tei {
        return (200, json!(rows));
    }
    let data: Vec<Value> =
        rows.into_iter().enumerate().map(|(index, v)| json!({"object": "embedding", "index": index, "embedding": v})).collect();
    (200, json!({"object": "list", "data": data, "model": r.info().model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
}

/// OpenAI request JSON → generation requests (a completions prompt may be a
/// list); values outside OpenAI's ranges or this server's caps are refused.
fn requests(b: &Value, chat: bool, limits: &Limits) -> Result<Vec<GenerationRequest>, String> {
    let num = |k: &str, d: f64| -> Result<f64, String> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_f64().ok_or_else(|| format!("`{k}` must be a number")),
        }
    };
    let stop = match b.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(|s| s.as_str().map(str::to_owned).ok_or("`stop` must hold strings")).collect::<Result<_, _>>()?,
        _ => return Err("`stop` must be a string or a list of strings".into()),
    };
    let logprobs = match b.get("logprobs") {
        Some(Value::Bool(x)) => *x,
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0) > 0,
        _ => false,
    };
    let (n, temperature, top_p, max_tokens) = (num("n", 1.0)?, num("temperature", 1.0)?, num("top_p", 1.0)?, num("max_tokens", 256.0)?);
    if !(n >= 1.0 && n <= limits.max_n as f64 && n.fract() == 0.0) {
        return Err(format!("`n` must be an integer in 1..={} (got {n})", limits.max_n));
    }
    if !(0.0..=2.0).contains(&temperature) {
        return Err(format!("`temperature` must be in [0, 2] (got {temperature})"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("`top_p` must be in (0, 1] (got {top_p})"));
    }
    if !(max_tokens >= 1.0 && max_tokens <= limits.max_tokens as f64 && max_tokens.fract() == 0.0) {
        return Err(format!("`max_tokens` must be an integer in 1..={} (got {max_tokens})", limits.max_tokens));
    }
    if stop.len() > 4 {
        return Err("`stop` may hold at most 4 sequences".into());
    }
    let base = GenerationRequest {
        prompt: Prompt::Text(String::new()),
        n: n as u32,
        temperature: temperature as f32,
        top_p: top_p as f32,
        max_tokens: max_tokens as u32,
        stop,
        seed: b.get("seed").and_then(Value::as_u64),
        logprobs,
    };
    if chat {
        let msgs = b.get("messages").and_then(Value::as_array).ok_or("`messages` (a list) is required")?;
        if msgs.is_empty() {
            return Err("`messages` is empty: send at least one message".into());
        }
        let messages = msgs
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).ok_or("every message needs a `role`")?;
                if !matches!(role, "system" | "user" | "assistant" | "developer") {
                    return Err(format!("unknown role `{role}` (system, developer, user or assistant)"));
                }
                let content = m.get("content").and_then(Value::as_str).ok_or("every message needs string `content`")?;
                Ok(Message { role: if role == "developer" { "system".into() } else { role.into() }, content: content.into() })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(vec![GenerationRequest { prompt: Prompt::Chat(messages), ..base }])
    } else {
        let prompts = text_prompts(b, limits)?;
        Ok(prompts.into_iter().map(|p| GenerationRequest { prompt: Prompt::Text(p), ..base.clone() }).collect())
    }
}

/// A completions request's `prompt`: a string or a list of strings.
fn text_prompts(b: &Value, limits: &Limits) -> Result<Vec<String>, String> {
    let p: Vec<String> = match b.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(|p| p.as_str().map(str::to_owned).ok_or_else(|| "`prompt` items must be strings".to_owned())).collect::<Result<_, _>>()?,
        _ => return Err("`prompt` (a string or list of strings) is required".into()),
    };
    if p.is_empty() || p.len() > limits.max_prompts {
        return Err(format!("`prompt` must hold 1..={} prompts (got {})", limits.max_prompts, p.len()));
    }
    Ok(p)
}

/// The prompts of a scoring request (`echo` with `max_tokens` 0).
fn echo_prompts(b: &Value, limits: &Limits) -> Result<Vec<String>, String> {
    if b.get("max_tokens").and_then(Value::as_u64).unwrap_or(16) != 0 {
        return Err("`echo` is supported with `max_tokens: 0` only (scoring the prompt)".into());
    }
    let prompts = text_prompts(b, limits)?;
    if prompts.iter().any(String::is_empty) {
        return Err("an empty `prompt` has no tokens to score".into());
    }
    Ok(prompts)
}

/// A scoring request's answer: each prompt's tokens with their
/// log-probabilities and character offsets.
fn echo(g: &dyn Generator, prompts: &[String]) -> (u16, Value) {
    // The whole prompt is the continuation of an empty one.
    let reqs: Vec<ScoreRequest> = prompts.iter().map(|p| ScoreRequest { prompt: Prompt::Text(String::new()), continuation: p.clone() }).collect();
    let scores = match g.score(&reqs) {
        Ok(s) => s,
        Err(e @ rir_sdk::PluginError::Unsupported(_)) => return error(400, "invalid_request_error", e),
        Err(e) => return error(500, "server_error", e),
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let usage = usage_json(scores.iter().map(|s| s.usage));
    let choices: Vec<Value> = prompts
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(index, (p, s))| {
            let mut offsets = Vec::with_capacity(s.tokens.len());
            let mut at = 0usize;
            for t in &s.tokens {
                offsets.push(at);
                at += t.token.chars().count();
            }
            let lps: Vec<Value> = s.tokens.iter().enumerate().map(|(i, t)| if i == 0 { Value::Null } else { json!(t.logprob) }).collect();
            json!({"index": index, "text": p, "finish_reason": "length",
                   "logprobs": {"tokens": s.tokens.iter().map(|t| &t.token).collect::<Vec<_>>(), "token_logprobs": lps,
                                "text_offset": offsets, "top_logprobs": Value::Null}})
        })
        .collect();
    let mut v = json!({"id": next_id("cmpl"), "object": "text_completion", "created": created, "model": g.model_name(), "choices": choices});
    if let Some(u) = usage {
        v["usage"] = u;
    }
    (200, v)
}

/// OpenAI's `usage` object for requests' usages (None when the generator
/// did not count every one of them: no usage rather than a wrong one), with
/// `prompt_tokens_details.cached_tokens` when the generator told them all.
fn usage_json(usages: impl Iterator<Item = Option<rir_sdk::RequestUsage>>) -> Option<Value> {
    let (mut p, mut c, mut cached) = (0u64, 0u64, Some(0u64));
    for u in usages {
        let u = u?;
        p += u64::from(u.prompt_tokens?);
        c += u64::from(u.completion_tokens?);
        cached = cached.zip(u.cached_tokens).map(|(a, b)| a + u64::from(b));
    }
    let mut v = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    if let Some(n) = cached {
        v["prompt_tokens_details"] = json!({"cached_tokens": n});
    }
    Some(v)
}

fn response(g: &dyn Generator, chat: bool, reqs: &[GenerationRequest], out: Vec<Vec<Completion>>) -> Value {
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Each request's usage rides on its first completion.
    let usage = usage_json(out.iter().map(|v| v.first().and_then(|c| c.usage)));
    let mut choices = Vec::new();
    for (c, r) in out.into_iter().flatten().zip(reqs.iter().flat_map(|r| std::iter::repeat_n(r, r.n as usize))) {
        let index = choices.len();
        let lp = c.logprobs.filter(|_| r.logprobs);
        choices.push(if chat {
            json!({"index": index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                   "logprobs": lp.map(|l| json!({"content": l.iter().map(|t| json!({"token": t.token, "logprob": t.logprob})).collect::<Vec<_>>()}))})
        } else {
            json!({"index": index, "text": c.text, "finish_reason": c.finish_reason,
                   "logprobs": lp.map(|l| json!({"tokens": l.iter().map(|t| &t.token).collect::<Vec<_>>(),
                                                 "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>()}))})
        });
    }
    let mut v = json!({
        "id": next_id(if chat { "chatcmpl" } else { "cmpl" }),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": g.model_name(),
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}
