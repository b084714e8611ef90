//! What rir promises about secrets and paths (docs/SECURITY.md), tried as a
//! hostile user would: an API key never reaches logs (at any verbosity),
//! caches, results or error messages; a name never writes outside --output.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;

const KEY: &str = "sk-SECRET-123-abcdef";

fn rir(args: &[&str], envs: &[(&str, &str)], cache: &Path) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rir"));
    c.args(args).current_dir(root()).env_remove("RIR_REGISTRY").env_remove("RUST_LOG").env("RIR_CACHE", cache);
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A tiny BEIR directory: three documents, two queries.
fn tiny_beir(dir: &Path) -> PathBuf {
    let d = dir.join("tiny");
    std::fs::create_dir_all(d.join("qrels")).unwrap();
    std::fs::write(
        d.join("corpus.jsonl"),
        concat!(
            r#"{"_id": "d1", "title": "Vitamin D", "text": "Vitamin D deficiency is linked to bone loss."}"#, "\n",
            r#"{"_id": "d2", "title": "Aspirin", "text": "Aspirin lowers the risk of heart attack."}"#, "\n",
            r#"{"_id": "d3", "title": "Sleep", "text": "Short sleep raises blood pressure."}"#, "\n",
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("queries.jsonl"),
        concat!(r#"{"_id": "q1", "text": "vitamin d and bones"}"#, "\n", r#"{"_id": "q2", "text": "aspirin heart"}"#, "\n"),
    )
    .unwrap();
    std::fs::write(d.join("qrels/test.tsv"), "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n").unwrap();
    d
}

/// An OpenAI-compatible chat server on loopback that answers every request
/// with one completion and records the request heads it saw.
fn chat_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(s.try_clone().unwrap());
                loop {
                    let (mut head, mut len) = (String::new(), 0usize);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    log.lock().unwrap().push(head);
                    let n = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["n"].as_u64()).unwrap_or(1);
                    let choices: Vec<String> = (0..n)
                        .map(|i| format!(r#"{{"index": {i}, "message": {{"role": "assistant", "content": "bone health and vitamins"}}, "finish_reason": "stop"}}"#))
                        .collect();
                    let b = format!(r#"{{"id": "x", "choices": [{}]}}"#, choices.join(","));
                    let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
                }
            });
        }
    });
    (base, seen)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) {
                hits.push(p);
            }
        }
    }
    hits
}

#[test]
fn the_api_key_never_reaches_logs_caches_results_or_errors() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_beir(tmp.path());
    let (cache, out) = (tmp.path().join("cache"), tmp.path().join("out"));
    let (base, seen) = chat_server();
    let gcfg = format!("base_url = \"{base}\"\nmodel = \"x\"\napi_key_env = \"MY_KEY\"");
    let (ok, log) = rir(
        &[
            "-vvv", "eval", "--dataset", data.to_str().unwrap(), "--retriever", "example-hash", "--generator", "openai-generator",
            "--generator-config", &gcfg, "--name", "leak", "--output", out.to_str().unwrap(),
        ],
        &[("MY_KEY", KEY)],
        &cache,
    );
    assert!(ok, "{log}");
    // The run really logged at trace level, and really sent the key.
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "no verbose logging happened: {log}");
    assert!(seen.lock().unwrap().iter().any(|h| h.contains(KEY)), "the key was not sent");
    assert!(!log.contains("SECRET"), "the key reached the log:\n{}", log.lines().filter(|l| l.contains("SECRET")).collect::<Vec<_>>().join("\n"));
    for dir in [&cache, &out] {
        assert!(files_containing(dir, "SECRET").is_empty(), "the key is in {:?}", files_containing(dir, "SECRET"));
    }

    // A secret written inline into a config is refused without quoting it.
    let (ok, log) = rir(
        &[
            "eval", "--dataset", data.to_str().unwrap(), "--retriever", "example-hash", "--generator", "openai-generator",
            "--generator-config", &format!("base_url = \"{base}\"\nmodel = \"x\"\napi_key = \"{KEY}\""), "--output", out.to_str().unwrap(),
        ],
        &[],
        &cache,
    );
    assert!(!ok);
    assert!(log.contains("api_key"), "{log}");
    assert!(!log.contains("SECRET"), "an inline key was echoed: {log}");
}

#[test]
fn eval_names_never_write_outside_the_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_beir(tmp.path());
    let out = tmp.path().join("a/b/out");
    for (name, says) in [("../../ESCAPED", "contains `/`"), ("", "--name is empty"), (".hidden", "must not start with"), ("a\\b", "contains `\\`")] {
        let (ok, log) = rir(
            &["eval", "--dataset", data.to_str().unwrap(), "--retriever", "example-hash", "--name", name, "--output", out.to_str().unwrap()],
            &[],
            &tmp.path().join("cache"),
        );
        assert!(!ok && log.contains(says), "--name {name:?}: {log}");
    }
    assert!(files_containing(tmp.path(), "ESCAPED").is_empty() && !tmp.path().join("a/ESCAPED.tiny.json").exists());
    assert!(!out.exists(), "nothing is written for a refused name");
}

#[test]
fn experiment_and_variant_names_never_write_outside_the_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("exp.toml");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    let bad = base.replacen("name = \"base\"", "name = \"../../../../PWNED\"", 1);
    assert_ne!(bad, base, "the quickstart's first variant is no longer named base");
    let line = bad.lines().position(|l| l.contains("PWNED")).unwrap() + 1;
    std::fs::write(&p, &bad).unwrap();
    let (ok, log) = rir(&["run", p.to_str().unwrap(), "--dry-run", "--output", tmp.path().join("out").to_str().unwrap()], &[], &tmp.path().join("cache"));
    assert!(!ok && log.contains(&format!("exp.toml:{line}:")) && log.contains("variant name"), "{log}");

    let bad = base.replacen("name = \"quickstart\"", "name = \"..\"", 1);
    assert_ne!(bad, base);
    let e = rir::experiment::parse(&bad, &p).unwrap_err().to_string();
    assert!(e.contains("experiment name") && e.contains("exp.toml:"), "{e}");
}

#[test]
fn dataset_names_never_leave_the_cache_or_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let mirror = tmp.path().join("m");
    tiny_beir(&mirror.join("beir"));
    let cache = tmp.path().join("c/cache");
    let (ok, log) = rir(&["data", "fetch", "../tiny", "--mirror", mirror.join("beir/x").to_str().unwrap()], &[], &cache);
    assert!(!ok && log.contains("contains `/`"), "{log}");
    assert!(!tmp.path().join("c/tiny").exists() && !cache.exists());
    // A dataset folder whose own name would be hidden gets a clean one.
    let hidden = tmp.path().join(".hidden-set");
    std::fs::rename(tiny_beir(tmp.path()), &hidden).unwrap();
    let ds = rir::engine::data::open(hidden.to_str().unwrap(), None, &cache, None).unwrap();
    assert_eq!(ds.name, "hidden-set");
}
