//! Comparisons of the local llama-generator with a llama.cpp server on the
//! same GGUF, shared by the SmolLM2 and Qwen2 tests. (Not in `common`: every
//! test binary includes that, and some link another plugin's rlib, which
//! cannot share a binary with llama-generator's.)
#![allow(dead_code)]

use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{GenerationRequest, Generator, Message, Prompt};
use serde_json::{json, Value};

pub fn post(url: &str, body: Value) -> Value {
    let text = ureq::post(url).send_json(body).unwrap().body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

/// How many `strings` tokenise identically (special tokens parsed as
/// llama.cpp parses them in prompts); differences are printed.
pub fn same_tokens(local: &LlamaGenerator, base: &str, strings: &[String]) -> usize {
    let mut same = 0;
    for s in strings {
        let theirs: Vec<u32> = post(&format!("{base}/tokenize"), json!({"content": s, "add_special": false, "parse_special": true}))["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let ours = local.encode(s).unwrap();
        if ours == theirs {
            same += 1;
        } else {
            eprintln!("tokenisation differs for {s:?}:\n ours   {ours:?}\n theirs {theirs:?}");
        }
    }
    same
}

/// The chat template renders as llama.cpp renders it.
pub fn assert_same_template(local: &LlamaGenerator, base: &str) {
    let msgs = vec![Message::system("Be brief."), Message::user("What is BM25?")];
    let theirs = post(
        &format!("{base}/apply-template"),
        json!({"messages": msgs.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()}),
    )["prompt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(local.render(&Prompt::Chat(msgs)).unwrap(), theirs);
}

/// How many greedy 16-token answers to "Write a short abstract for: Q" are
/// identical to llama.cpp's; differences are printed.
pub fn same_greedy(g: &dyn Generator, base: &str, queries: &[String]) -> usize {
    let ask = |q: &str| format!("Write a short abstract for: {q}");
    let reqs: Vec<GenerationRequest> = queries.iter().map(|q| GenerationRequest::greedy(Prompt::Chat(vec![Message::user(ask(q))]), 16)).collect();
    let ours = g.generate(&reqs).unwrap();
    let mut matches = 0;
    for (q, o) in queries.iter().zip(&ours) {
        let theirs = post(
            &format!("{base}/v1/chat/completions"),
            json!({"model": "smollm2", "messages": [{"role": "user", "content": ask(q)}], "max_tokens": 16, "temperature": 0.0}),
        )["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        if theirs == o[0].text {
            matches += 1;
        } else {
            eprintln!("greedy differs for {q:?}:\n ours   {:?}\n theirs {theirs:?}", o[0].text);
        }
    }
    matches
}
