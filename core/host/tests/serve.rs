//! `rir serve` under a misbehaving client: limits, 4xx in OpenAI's error
//! shape, a bounded queue, unique ids, and a bounded load test (many
//! concurrent clients, stalled ones, malformed requests among good ones).
//! The probe plugin's generator (it echoes the prompt) keeps the test about
//! the server, not the model.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use rir::tools::serve::Limits;
use serde_json::{json, Value};

fn start(workers: usize, limits: Limits) -> SocketAddr {
    plugin_dir();
    let host: &'static rir::PluginHost = Box::leak(Box::new(host()));
    let g: &'static dyn rir_sdk::Generator = Box::leak(host.load("probe").unwrap().generator("").unwrap());
    let server: &'static tiny_http::Server = Box::leak(Box::new(tiny_http::Server::http("127.0.0.1:0").unwrap()));
    let addr = server.server_addr().to_ip().unwrap();
    std::thread::spawn(move || rir::tools::serve::serve_with(rir::tools::serve::Backends::generator(g), server, workers, limits));
    addr
}

fn chat(extra: Value) -> String {
    let mut b = json!({"model": "probe", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

fn is_openai_error(v: &Value) -> bool {
    v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string()
}

#[test]
fn client_mistakes_are_4xx_in_openai_shape() {
    let addr = start(2, Limits::default());
    let (status, v) = http(addr, "POST", "/v1/chat/completions", &chat(json!({})));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().map(|s| s.contains("hello")), Some(true), "{v}");
    for (extra, says) in [
        (json!({"n": 1000}), "`n` must be an integer in 1..=16"),
        (json!({"n": 0}), "`n` must be"),
        (json!({"max_tokens": 100000}), "`max_tokens` must be an integer in 1..=4096"),
        (json!({"temperature": -5}), "`temperature` must be in [0, 2]"),
        (json!({"top_p": 7}), "`top_p` must be in (0, 1]"),
        (json!({"messages": []}), "`messages` is empty"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "unknown role `wizard`"),
        (json!({"stream": true}), "`stream: true` is not supported"),
        (json!({"temperature": "hot"}), "`temperature` must be a number"),
    ] {
        let (status, v) = http(addr, "POST", "/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(is_openai_error(&v) && v["error"]["message"].as_str().unwrap().contains(says), "{extra}: {v}");
    }
    let (status, v) = http(addr, "POST", "/v1/completions", "[1, 2]");
    assert!(status == 400 && is_openai_error(&v), "{v}");
    let (status, v) = http(addr, "POST", "/v1/completions", "{not json");
    assert!(status == 400 && is_openai_error(&v), "{v}");
    let (status, v) = http(addr, "GET", "/v1/completions", "");
    assert!(status == 405 && is_openai_error(&v), "{v}");
    let (status, _) = http(addr, "GET", "/nowhere", "");
    assert_eq!(status, 404);

    // Ids are unique, also within one second.
    let ids: std::collections::BTreeSet<String> = (0..20)
        .map(|_| http(addr, "POST", "/v1/completions", &json!({"prompt": "x", "max_tokens": 4}).to_string()).1["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 20, "{ids:?}");
}

#[test]
fn a_huge_body_is_refused_before_it_is_read() {
    let addr = start(1, Limits::default());
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Announces 50 MB and sends only a little of it: the answer must not wait for the rest.
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{\"prompt\": \"", 50 << 20).unwrap();
    s.write_all(&vec![b'a'; 1 << 16]).unwrap();
    let (status, v) = read_response(&mut s);
    assert_eq!(status, 413, "{v}");
    assert!(is_openai_error(&v), "{v}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A chunked body (no length up front) is cut at the limit.
    let limits = Limits { max_body_bytes: 1000, ..Limits::default() };
    let addr = start(1, limits);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    // The server may answer and close once the limit is passed, before the
    // client has sent the rest: a broken pipe then is the refusal, not a failure.
    let mut body = String::new();
    for _ in 0..4 {
        body.push_str(&format!("200\r\n{}\r\n", "b".repeat(512)));
    }
    body.push_str("0\r\n\r\n");
    if let Err(e) = s.write_all(body.as_bytes()) {
        assert!(matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset), "{e}");
    }
    let (status, v) = read_response(&mut s);
    assert_eq!(status, 413, "{v}");
}

/// Stalled clients (headers sent, body never finished) hold reader threads,
/// not generation workers; when `max_readers` are held the next request is
/// answered 429 at once, and when they go the server answers again.
#[test]
fn stalled_clients_get_429_when_the_readers_are_full() {
    let addr = start(2, Limits { max_readers: 4, ..Limits::default() });
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            // Headers promise a body that never comes.
            write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n{{").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (status, v) = http(addr, "POST", "/v1/completions", &json!({"prompt": "x", "max_tokens": 4}).to_string());
    assert_eq!(status, 429, "{v}");
    assert!(is_openai_error(&v) && t.elapsed() < Duration::from_secs(2), "{v}");
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = http(addr, "POST", "/v1/completions", &json!({"prompt": "x", "max_tokens": 4}).to_string());
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not recover: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())).unwrap_or(0)
}

/// Memory follows what is in flight, not what went through: 192 bodies of
/// 900 kB (~170 MB in all, each refused after parsing) from 8 clients at a
/// time leave the process less than 80 MB larger; keeping them would not.
#[test]
fn memory_is_bounded_by_what_is_in_flight() {
    let addr = start(4, Limits::default());
    let _warm = http(addr, "GET", "/health", "");
    let rss0 = rss_kb();
    let body = json!({"prompt": "x".repeat(900_000), "n": 99}).to_string();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..24 {
                    let (status, v) = http(addr, "POST", "/v1/completions", &body);
                    assert!(status == 400 || status == 429, "{status} {v}");
                }
            });
        }
    });
    let rss1 = rss_kb();
    eprintln!("memory: RSS {rss0} -> {rss1} kB after 192 bodies of 900 kB");
    assert!(rss1 < rss0 + 80 * 1024, "RSS grew from {rss0} kB to {rss1} kB");
}

/// Bounded load: 32 clients × 40 requests, a third of them malformed, with
/// four stalled clients holding connections; every good request is answered
/// (200, or 429 then retried) and every bad one 4xx.
/// The figures are printed (`-- --nocapture`) for docs/BENCHMARKS.md.
#[test]
fn stays_up_under_load_with_bad_clients() {
    let workers = 4;
    let addr = start(workers, Limits::default());
    let _warm = http(addr, "GET", "/health", "");
    let rss0 = rss_kb();
    let stalled: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n{{\"mess").unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    let (clients, each) = (32, 40);
    let results: Vec<(usize, usize, usize, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let (mut good, mut bad, mut busy, mut lat) = (0, 0, 0, Vec::new());
                    for i in 0..each {
                        let malformed = (c + i) % 3 == 0;
                        let body = if malformed {
                            ["{\"prompt\": ", "{\"prompt\": \"x\", \"n\": 99}", "{\"messages\": 3}"][i % 3].to_owned()
                        } else {
                            json!({"prompt": format!("client {c} request {i}"), "max_tokens": 8}).to_string()
                        };
                        loop {
                            let t0 = Instant::now();
                            let (status, v) = http(addr, "POST", "/v1/completions", &body);
                            if status == 429 {
                                busy += 1;
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                            lat.push(t0.elapsed().as_secs_f64());
                            if malformed {
                                assert!((400..500).contains(&status) && is_openai_error(&v), "{body}: {status} {v}");
                                bad += 1;
                            } else {
                                assert_eq!(status, 200, "{body}: {v}");
                                assert!(v["choices"][0]["text"].as_str().is_some_and(|t| t.contains(&format!("client {c} request {i}"))), "{v}");
                                good += 1;
                            }
                            break;
                        }
                    }
                    (good, bad, busy, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    drop(stalled);
    let (good, bad, busy): (usize, usize, usize) = results.iter().fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    let mut lat: Vec<f64> = results.into_iter().flat_map(|r| r.3).collect();
    lat.sort_by(f64::total_cmp);
    let rss1 = rss_kb();
    assert_eq!(good + bad, clients * each);
    assert_eq!(http(addr, "GET", "/health", "").0, 200, "still up");
    eprintln!(
        "load: {} requests ({good} good, {bad} malformed) from {clients} clients in {secs:.2} s = {:.0} requests/s; {busy} answered 429 and retried; latency p50 {:.1} ms, p99 {:.1} ms; RSS {rss0} -> {rss1} kB; {workers} workers, 4 stalled clients",
        good + bad,
        (good + bad) as f64 / secs,
        lat[lat.len() / 2] * 1e3,
        lat[lat.len() * 99 / 100] * 1e3,
    );
}

/// The kernel's view of a connection, as the server's watch reads it: open
/// while the client holds it, gone once the client closes.
#[test]
fn the_client_watch_sees_a_closed_connection() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_server_side, peer) = listener.accept().unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    let watch = || rir::tools::serve::ClientWatch::new(Some(peer), Some(port));
    assert!(!watch().gone(), "an open connection is not gone");
    drop(client);
    std::thread::sleep(Duration::from_millis(100));
    assert!(watch().gone(), "a closed one is");
    assert!(!rir::tools::serve::ClientWatch::new(None, Some(port)).gone(), "no peer known: never cancelled");
}
