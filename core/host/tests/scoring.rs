//! Scoring given continuations (`Generator::score`, teacher forcing) with
//! the real SmolLM2-135M: in llama-generator, through the plugin ABI, behind
//! `rir serve` read by openai-generator (completions with echo + logprobs),
//! and against llama.cpp's server, which must give a clear answer either way.

mod common;

use common::*;
use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{GenerationRequest, Generator, Message, Prompt, ScoreRequest};

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![Message::user(text)])
}

fn req(prompt: Prompt, continuation: &str) -> ScoreRequest {
    ScoreRequest { prompt, continuation: continuation.into() }
}

#[test]
fn scores_equal_the_log_probabilities_of_greedy_decoding() {
    // On the integer kernels both ways: equal. With the default dense
    // prefill, scores (prompt and continuation on f32 GEMMs) and decode
    // steps (integer kernels, activations rounded to 8 bits) differ a little.
    // bf16 prefill (where the CPU has it; dense's path elsewhere): products
    // of bf16-rounded operands, further from the integer decode steps.
    for (prefill, tol) in [("quantized", 2e-3f32), ("dense", 0.3), ("bf16", 0.5)] {
        scores_match_greedy_decoding(&format!("model = {SMOLLM:?}\nprefill = {prefill:?}"), tol);
    }
}

fn scores_match_greedy_decoding(config: &str, tol: f32) {
    let g = LlamaGenerator::new(config).unwrap();
    let prompts = [chat("What is the capital of France?"), chat("Name three colours.")];
    let reqs: Vec<GenerationRequest> = prompts
        .iter()
        .map(|p| GenerationRequest { logprobs: true, ..GenerationRequest::greedy(p.clone(), 10) })
        .collect();
    let out = g.generate(&reqs).unwrap();
    for (p, c) in prompts.iter().zip(&out) {
        let c = &c[0];
        let sampled = c.logprobs.as_ref().unwrap();
        // Tokens up to the end (a stop token is scored by generation, not part of the text).
        let n = if c.finish_reason == "stop" { sampled.len() - 1 } else { sampled.len() };
        let s = g.score(&[req(p.clone(), &c.text)]).unwrap().remove(0);
        assert_eq!(s.tokens.len(), n, "{:?} vs {:?}", s.tokens, sampled);
        for (a, b) in s.tokens.iter().zip(sampled) {
            assert_eq!(a.token, b.token);
            assert!((a.logprob - b.logprob).abs() < tol, "{config}: {a:?} vs {b:?}");
        }
        let sum: f64 = sampled[..n].iter().map(|t| t.logprob as f64).sum();
        assert!((s.logprob - sum).abs() < tol as f64 * n as f64, "{config}: {} vs {sum}", s.logprob);
        eprintln!("{:?}: logprob {:.4} over {} tokens", c.text, s.logprob, s.tokens.len());
    }
}

#[test]
fn scoring_is_batch_invariant_and_shares_prompts() {
    for prefill in ["quantized", "dense", "bf16"] {
        scoring_batch_invariant(&format!("model = {SMOLLM:?}\nmax_batch = 3\nprefill = {prefill:?}"));
    }
}

fn scoring_batch_invariant(config: &str) {
    let g = LlamaGenerator::new(config).unwrap();
    let passage = "Passage: Vitamin D deficiency is associated with reduced bone mineral density in older adults.\nPlease write a question based on this passage.";
    let yes_no = chat("Passage: Aspirin lowers the risk of heart attack.\nQuery: does aspirin prevent heart attacks?\nDoes the passage answer the query? Answer Yes or No.");
    let reqs = vec![
        req(chat(passage), "Does vitamin D deficiency affect bone density?"),
        req(chat(passage), "What is the boiling point of water?"),
        req(yes_no.clone(), "Yes"),
        req(yes_no, "No"),
        req(Prompt::Text("The capital of France is".into()), " Paris"),
        req(Prompt::Text(String::new()), "The capital of France is Paris"),
    ];
    let together = g.score(&reqs).unwrap();
    for (r, t) in reqs.iter().zip(&together) {
        let alone = g.score(std::slice::from_ref(r)).unwrap().remove(0);
        assert_eq!(alone.tokens.len(), t.tokens.len());
        assert!((alone.logprob - t.logprob).abs() < 1e-4, "{r:?}: {} alone, {} in a batch", alone.logprob, t.logprob);
        assert!(t.logprob < 0.0 && t.tokens.iter().all(|x| x.logprob <= 0.0));
    }
    // Query likelihood prefers the query the passage answers.
    assert!(together[0].mean() > together[1].mean(), "{} vs {}", together[0].mean(), together[1].mean());
    // One-token continuations are single tokens; an empty prompt's first token has no context.
    assert_eq!(together[2].tokens.len(), 1);
    assert_eq!(together[5].tokens[0].logprob, 0.0);
    // Errors name the request.
    let e = g.score(&[req(chat("hi"), "")]).unwrap_err().to_string();
    assert!(e.contains("score request 0") && e.contains("no tokens"), "{e}");
}

#[test]
fn scores_cross_the_plugin_boundary_and_rir_serve_answers_echo_requests() {
    plugin_dir();
    let host = host();
    let remote = host.load("llama-generator").unwrap().generator(&format!("model = {SMOLLM:?}")).unwrap();
    let local = LlamaGenerator::new(&format!("model = {SMOLLM:?}")).unwrap();
    let prompt = Prompt::Text("Passage: Short sleep raises blood pressure in adults.\nQuestion:".into());
    let r = req(prompt.clone(), " does short sleep raise blood pressure?");
    let direct = local.score(std::slice::from_ref(&r)).unwrap().remove(0);
    let via_abi = remote.score(std::slice::from_ref(&r)).unwrap().remove(0);
    assert_eq!(direct, via_abi);

    // rir serve over the plugin, read by openai-generator.
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
    let served: &'static dyn Generator = Box::leak(remote);
    let server: &'static tiny_http::Server = Box::leak(Box::new(server));
    std::thread::spawn(move || rir::tools::serve::serve(served, server, 2));
    // Through the host (two plugin rlibs cannot link into one test binary).
    let client = host.load("openai-generator").unwrap().generator(&format!("base_url = \"{base}\"\nmodel = \"smollm2\"")).unwrap();
    let over_http = client.score(std::slice::from_ref(&r)).unwrap().remove(0);
    assert_eq!(over_http.tokens.len(), direct.tokens.len(), "{:?} vs {:?}", over_http.tokens, direct.tokens);
    assert!((over_http.logprob - direct.logprob).abs() < 1e-2, "{} over HTTP, {} direct", over_http.logprob, direct.logprob);
    // Usage: the tokens read, counted by the plugin, reported by rir serve
    // and read back by the client (the joined text may split differently at the seam).
    let read = |s: &rir_sdk::Score| s.usage.and_then(|u| u.prompt_tokens).unwrap();
    let want = local.encode(&local.render(&r.prompt).unwrap()).unwrap().len() + local.encode(&r.continuation).unwrap().len();
    assert_eq!(read(&direct) as usize, want);
    assert!(read(&over_http).abs_diff(read(&direct)) <= 2, "{} over HTTP, {} direct", read(&over_http), read(&direct));
    // Generation: a request's usage on its first completion — its prompt's
    // tokens and every sample's (the end-of-sequence token included, as
    // each carries a logprob), the same in-process and over HTTP.
    let mut g = GenerationRequest::greedy(Prompt::Text("The capital of France is".into()), 6);
    g.logprobs = true;
    g.n = 2;
    let out = local.generate(std::slice::from_ref(&g)).unwrap().remove(0);
    let u = out[0].usage.unwrap();
    assert!(out[1].usage.is_none(), "{:?}", out[1]);
    assert_eq!(u.prompt_tokens.unwrap() as usize, local.encode("The capital of France is").unwrap().len());
    assert_eq!(u.completion_tokens.unwrap() as usize, out.iter().map(|c| c.logprobs.as_ref().unwrap().len()).sum::<usize>());
    let http = client.generate(std::slice::from_ref(&g)).unwrap().remove(0);
    assert_eq!(http[0].usage, Some(u), "rir serve reports the plugin's counts");
    // The prefix cache's share, as OpenAI's `prompt_tokens_details.cached_tokens`:
    // none the first time a long prompt is seen, all but its last position
    // the second time; in-process, over HTTP and in rir serve's JSON.
    let long = GenerationRequest::greedy(
        Prompt::Text("Passage: Short sleep duration was associated with higher systolic blood pressure in a cohort of 4,810 adults followed for eight years.\nQuestion:".into()),
        4,
    );
    let served_usage = || client.generate(std::slice::from_ref(&long)).unwrap()[0][0].usage.unwrap();
    let (first, again) = (served_usage(), served_usage());
    let n = first.prompt_tokens.unwrap();
    assert!(n > 16, "{first:?}");
    assert_eq!((first.cached_tokens, again.cached_tokens, again.prompt_tokens), (Some(0), Some(n - 1), Some(n)));
    let local_usage = || local.generate(std::slice::from_ref(&long)).unwrap()[0][0].usage.unwrap();
    assert_eq!((local_usage(), local_usage()), (first, again), "in-process as over HTTP");
    let raw: serde_json::Value = ureq::post(&format!("{base}/completions"))
        .send_json(serde_json::json!({"prompt": "Passage: Short sleep duration was associated with higher systolic blood pressure in a cohort of 4,810 adults followed for eight years.\nQuestion:", "max_tokens": 2}))
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(raw["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(u64::from(n) - 1), "{raw}");
    // A chat prompt cannot be scored through the completions API.
    let e = client.score(&[req(chat("hi"), "there")]).unwrap_err().to_string();
    assert!(e.contains("text prompts only"), "{e}");
    // echo with max_tokens > 0 is refused with OpenAI's error shape.
    let resp = ureq::post(&format!("{base}/completions"))
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(serde_json::json!({"prompt": "a b", "echo": true, "max_tokens": 5}))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[test]
fn a_llama_cpp_server_is_used_or_refused_clearly() {
    plugin_dir();
    let server = LlamaServer::start();
    let client = host()
        .load("openai-generator")
        .unwrap()
        .generator(&format!("base_url = \"{}/v1\"\nmodel = \"smollm2\"\nmax_retries = 0", server.base))
        .unwrap();
    let r = req(Prompt::Text("The capital of France is".into()), " Paris");
    match client.score(std::slice::from_ref(&r)) {
        Ok(mut s) => {
            let s = s.remove(0);
            let local = LlamaGenerator::new(&format!("model = {SMOLLM:?}")).unwrap().score(&[r]).unwrap().remove(0);
            eprintln!("llama.cpp scored: {} (rir: {})", s.logprob, local.logprob);
            assert!((s.logprob - local.logprob).abs() < 0.1, "{} vs {}", s.logprob, local.logprob);
        }
        Err(e) => {
            let e = e.to_string();
            eprintln!("llama.cpp refused scoring: {e}");
            assert!(e.contains("no prompt log-probabilities") && e.contains("it returned"), "the error does not say what was asked or returned: {e}");
        }
    }
    // llama.cpp's prompt cache, read from its `usage.prompt_tokens_details`:
    // nothing the first time, most of the prompt when it comes again.
    let long = GenerationRequest::greedy(
        Prompt::Text("Passage: Short sleep duration was associated with higher systolic blood pressure in a cohort of 4,810 adults followed for eight years.\nQuestion:".into()),
        2,
    );
    let usage = || client.generate(std::slice::from_ref(&long)).unwrap()[0][0].usage.unwrap();
    let (first, again) = (usage(), usage());
    eprintln!("llama.cpp usage: {first:?}, then {again:?}");
    assert_eq!(first.cached_tokens, Some(0), "{first:?}");
    assert!(again.cached_tokens.unwrap() > 16 && again.cached_tokens < again.prompt_tokens, "{again:?}");
}
