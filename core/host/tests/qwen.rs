//! Qwen2 in rir-llama, against llama.cpp on the same GGUF
//! (Qwen2.5-Coder-0.5B-Instruct, mixed Q5_0/Q8_0/Q4_K/Q6_K, assembled from
//! six wheels of the package index and pinned by sha256): tokenisation on
//! real SciFact text, chat template, greedy agreement, next-token
//! distributions; and the HF export (what the DPO trainer writes) against
//! the GGUF it came from.

mod common;
#[path = "common/llama_cpp.rs"]
mod llama_cpp;

use common::*;
use rir::engine::data;
use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{Generator, Message, Prompt, ScoreRequest};
use serde_json::{json, Value};


use llama_cpp::post;

#[test]
fn qwen2_matches_llama_cpp_and_its_hf_export() {
    plugin_dir();
    let cache = temp_cache();
    let ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let local = LlamaGenerator::new(&format!("model = {QWEN05:?}")).unwrap();
    assert!(local.model_name().contains("Qwen"), "{}", local.model_name());
    let server = LlamaServer::start_with(QWEN05);

    // Tokenisation of real SciFact documents and awkward strings.
    let mut strings: Vec<String> = ds.corpus.iter().take(200).map(data::Doc::encoder_text).collect();
    strings.extend(
        ["12345 and 3.14159, 1e-9", "  leading spaces", "tabs\tand\nnewlines\n\n", "naïve café – “quotes” ✓ 中文", "<|im_start|>user\nhi<|im_end|>", "don't WON'T I'll", "x\r\n\r\ny"]
            .iter()
            .map(|s| s.to_string()),
    );
    let same = llama_cpp::same_tokens(&local, &server.base, &strings);
    eprintln!("qwen2 tokenisation: {same}/{} strings identical to llama.cpp's /tokenize", strings.len());
    assert_eq!(same, strings.len());
    llama_cpp::assert_same_template(&local, &server.base);

    // Greedy decoding of 16 tokens.
    let queries: Vec<String> = ds.queries.iter().take(10).map(|q| q.1.clone()).collect();
    let matches = llama_cpp::same_greedy(&local, &server.base, &queries);
    eprintln!("qwen2 greedy 16-token outputs identical to llama.cpp's: {matches}/{}", queries.len());
    assert!(matches * 2 > queries.len(), "only {matches}/{} greedy outputs match", queries.len());

    // Next-token distributions: llama.cpp's top 10 against ours (probabilities, cosine).
    let prompt = format!("Passage: {}\nQuestion:", ds.corpus[0].encoder_text().chars().take(600).collect::<String>());
    let v = post(&format!("{}/v1/completions", server.base), json!({"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 10}));
    // llama.cpp answers in the chat API's shape: logprobs.content[0].top_logprobs = [{token, logprob}].
    let top: Vec<(String, f64)> = v
        .pointer("/choices/0/logprobs/content/0/top_logprobs")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no top_logprobs: {v}"))
        .iter()
        .map(|t| (t["token"].as_str().unwrap().to_owned(), t["logprob"].as_f64().unwrap()))
        .collect();
    assert_eq!(top.len(), 10);
    let mut dot = (0.0, 0.0, 0.0);
    for (tok, lp) in &top {
        let theirs = lp.exp();
        let ours = local
            .score(&[ScoreRequest { prompt: Prompt::Text(prompt.clone()), continuation: tok.clone() }])
            .map(|s| if s[0].tokens.len() == 1 { s[0].logprob.exp() } else { 0.0 })
            .unwrap_or(0.0);
        dot = (dot.0 + ours * theirs, dot.1 + ours * ours, dot.2 + theirs * theirs);
    }
    let cos = dot.0 / (dot.1.sqrt() * dot.2.sqrt());
    eprintln!("qwen2 next-token top-10 probabilities, cosine with llama.cpp: {cos:.5}");
    assert!(cos > 0.99, "{cos}");
    drop(server);

    // The HF export (f32, Q/K/V biases) loads back and agrees with the GGUF.
    let dir = tempfile::tempdir().unwrap();
    rir_plugin_llama_generator::export_hf(&local.model, &local.assets, dir.path()).unwrap();
    let config: Value = serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2");
    let hf = LlamaGenerator::new(&format!("model = {:?}", dir.path().display().to_string())).unwrap();
    // A real query under UPR's prompt: ~20 tokens of real uncertainty. The
    // GGUF runs on int8-activation kernels, the export on dense f32.
    let r = ScoreRequest {
        prompt: Prompt::Chat(vec![Message::user(format!("Passage: {}\nPlease write a question based on this passage.", ds.corpus[0].encoder_text()))]),
        continuation: queries[0].clone(),
    };
    let (a, b) = (local.score(std::slice::from_ref(&r)).unwrap().remove(0), hf.score(&[r]).unwrap().remove(0));
    let worst = a.tokens.iter().zip(&b.tokens).map(|(x, y)| (x.logprob - y.logprob).abs()).fold(0f32, f32::max);
    eprintln!("qwen2 GGUF vs its HF export: {:.4} vs {:.4} over {} tokens, largest per-token difference {worst:.4}", a.logprob, b.logprob, a.tokens.len());
    assert_eq!(a.tokens.len(), b.tokens.len());
    assert!((a.logprob - b.logprob).abs() < 0.02 * a.logprob.abs() && worst < 0.15, "{} vs {}", a.logprob, b.logprob);
}
