//! The local Llama generator against llama.cpp on the same GGUF
//! (SmolLM2-135M-Instruct Q4_1): tokenisation, chat-template rendering and
//! greedy decoding.

mod common;
#[path = "common/llama_cpp.rs"]
mod llama_cpp;

use common::*;
use rir::engine::data;
use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{GenerationRequest, Message, Prompt};

fn texts() -> (Vec<String>, Vec<String>) {
    let cache = temp_cache();
    let ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let mut t: Vec<String> = ds.corpus.iter().take(250).map(data::Doc::encoder_text).collect();
    t.extend(
        [
            "12345 and 3.14159, 1e-9", "  leading spaces", "tabs\tand\nnewlines\n\n", "naïve café – “quotes” ✓ 中文",
            "<|im_start|>user\nhi<|im_end|>", "don't won't I'll we're", "",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    (t, ds.queries.iter().take(20).map(|q| q.1.clone()).collect())
}

#[test]
fn tokenizer_template_and_greedy_decoding_match_llama_cpp() {
    plugin_dir();
    let server = LlamaServer::start();
    let local = LlamaGenerator::new(&format!("model = {SMOLLM:?}")).unwrap();
    let (strings, queries) = texts();

    let same = llama_cpp::same_tokens(&local, &server.base, &strings);
    eprintln!("tokenisation: {same}/{} strings identical to llama.cpp's /tokenize", strings.len());
    assert_eq!(same, strings.len());
    llama_cpp::assert_same_template(&local, &server.base);

    // Greedy decoding of 16 tokens, through the loaded plugin library.
    let host = host();
    let g = host.load("llama-generator").unwrap().generator(&format!("model = {SMOLLM:?}")).unwrap();
    let matches = llama_cpp::same_greedy(g.as_ref(), &server.base, &queries);
    eprintln!("greedy 16-token outputs identical to llama.cpp's: {matches}/{}", queries.len());
    assert!(matches * 2 > queries.len(), "only {matches}/{} greedy outputs match", queries.len());
}

#[test]
fn sampling_stop_strings_and_bad_models() {
    plugin_dir();
    let g = LlamaGenerator::new(&format!("model = {SMOLLM:?}")).unwrap();
    let mut r = GenerationRequest::greedy(Prompt::Chat(vec![Message::user("Count from 1 to 20, comma separated.")]), 40);
    r.stop = vec!["5".into()];
    let out = rir_sdk::Generator::generate(&g, &[r.clone()]).unwrap();
    assert!(!out[0][0].text.contains('5') && out[0][0].finish_reason == "stop", "{:?}", out[0][0]);
    r.stop.clear();
    r.n = 3;
    r.temperature = 1.0;
    r.top_p = 0.95;
    r.seed = Some(1);
    r.max_tokens = 12;
    r.logprobs = true;
    let a = rir_sdk::Generator::generate(&g, &[r.clone()]).unwrap();
    let b = rir_sdk::Generator::generate(&g, &[r]).unwrap();
    assert_eq!(a, b, "seeded sampling is reproducible");
    assert_eq!(a[0].len(), 3);
    assert!(a[0][0].logprobs.as_ref().is_some_and(|l| !l.is_empty() && l.iter().all(|t| t.logprob <= 0.0)));

    let long = GenerationRequest::greedy(Prompt::Text("word ".repeat(9000)), 8);
    let e = rir_sdk::Generator::generate(&g, &[long]).unwrap_err().to_string();
    assert!(e.contains("context overflow") && e.contains("exceeds the model's context of 8192"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("x.gguf");
    std::fs::write(&fake, b"not a gguf").unwrap();
    let e = LlamaGenerator::new(&format!("model = {:?}", fake.display().to_string())).err().unwrap().to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
}
