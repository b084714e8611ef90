//! `rir serve` with a real generator (SmolLM2 on llama-generator): a
//! generation whose client hangs up is cancelled. Its own test binary, so
//! the model's memory does not count in serve.rs's RSS checks.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use rir::tools::serve::Limits;
use serde_json::json;

/// A generation whose client hangs up is cancelled within a token: the
/// only worker is free again at once instead of decoding 3,000 tokens for
/// nobody (SmolLM2 counting greedily never stops early).
#[test]
fn a_generation_stops_when_its_client_goes_away() {
    plugin_dir();
    let host: &'static rir::PluginHost = Box::leak(Box::new(host()));
    let g: &'static dyn rir_sdk::Generator = Box::leak(host.load("llama-generator").unwrap().generator(&format!("model = {SMOLLM:?}")).unwrap());
    let server: &'static tiny_http::Server = Box::leak(Box::new(tiny_http::Server::http("127.0.0.1:0").unwrap()));
    let addr = server.server_addr().to_ip().unwrap();
    std::thread::spawn(move || rir::tools::serve::serve_with(rir::tools::serve::Backends::generator(g), server, 1, Limits::default()));
    let counting = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 3000, "temperature": 0}).to_string();
    // How fast this machine counts: a short run of the same request.
    let t = Instant::now();
    let short = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 60, "temperature": 0}).to_string();
    let (status, v) = http(addr, "POST", "/v1/completions", &short);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "counting runs to max_tokens: {v}");
    let per_token = t.elapsed().as_secs_f64() / 60.0;
    let before = rir::tools::serve::CANCELLED.load(std::sync::atomic::Ordering::Relaxed);
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{counting}", counting.len()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(s);
    // The next request waits only for the cancellation, not for 3,000 tokens.
    let t = Instant::now();
    let (status, v) = http(addr, "POST", "/v1/completions", &short);
    let waited = t.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{v}");
    assert!(rir::tools::serve::CANCELLED.load(std::sync::atomic::Ordering::Relaxed) > before, "the abandoned request was counted as cancelled");
    let full = per_token * 3000.0;
    eprintln!("abandoned request: the next one answered in {waited:.2} s (the 3,000 tokens would take ~{full:.0} s)");
    assert!(waited < full / 4.0, "waited {waited:.1} s; the abandoned request alone takes ~{full:.0} s");
}
