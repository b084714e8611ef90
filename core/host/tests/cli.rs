//! The `rir` binary as a user runs it.

mod common;

use std::process::Command;

use common::*;

fn rir(args: &[&str]) -> (bool, String, String) {
    rir_env(args, &[])
}

/// `rir` with extra environment variables.
fn rir_env(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(args)
        .current_dir(root())
        .env_remove("RIR_REGISTRY")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn plugins_lists_the_example_plugin_as_built() {
    plugin_dir();
    let (ok, out, err) = rir(&["plugins"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.contains("example-hash")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("retriever") && line.contains("0.1.0") && line.contains("built"), "{line}");
}

#[test]
fn plugins_check_reports_library_and_kinds() {
    plugin_dir();
    let (ok, out, err) = rir(&["plugins", "check", "probe"]);
    assert!(ok, "{err}");
    assert!(out.contains("provides    retriever, generator, reward, trainer, index, text-retriever"), "{out}");
    assert!(out.contains("librir_plugin_probe"), "{out}");

    let (ok, _, err) = rir(&["plugins", "check", "prob"]);
    assert!(!ok);
    assert!(err.contains("unknown plugin 'prob'") && err.contains("did you mean 'probe'?"), "{err}");
}

#[test]
fn version_names_the_plugin_abi() {
    let (ok, out, _) = rir(&["--version"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("rir {} (plugin ABI {})", env!("CARGO_PKG_VERSION"), rir_sdk::ffi::ABI_VERSION));
}

/// `rir --registry FILE plugins` over a registry of this text.
fn plugins_with(registry: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, registry).unwrap();
    rir(&["--registry", reg.to_str().unwrap(), "plugins"])
}

#[test]
fn a_bad_registry_is_reported_with_its_line() {
    let (ok, _, err) = plugins_with("[plugins.x]\nkinds = [\"retriever\"]\ncrate = \"y\"\nlibary = \"z\"\n");
    assert!(!ok);
    assert!(err.contains("registry.toml:4:1: unknown field `libary`"), "{err}");
}

/// Every option of every command has help text (clap prints a bare flag
/// for one without a doc comment).
#[test]
fn every_option_has_help_text() {
    let commands: &[&[&str]] = &[
        &["run"], &["eval"], &["fuse"], &["rerank"], &["table"], &["queries"], &["rlrf-data"], &["rlgf-data"], &["train"], &["serve"],
        &["data", "list"], &["data", "fetch"], &["plugins", "check"], &["bench", "encode"], &["bench", "generate"], &["bench", "lexical"],
    ];
    for c in commands {
        let mut args = c.to_vec();
        args.push("--help");
        let (ok, out, err) = rir(&args);
        assert!(ok, "{c:?}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            let flag = t.starts_with("--") || t.starts_with('-') && t.chars().nth(1).is_some_and(|c| c.is_ascii_alphabetic());
            if flag || (t.starts_with('<') && l.starts_with("  ")) {
                // "--name <NAME>  Help" on one line, or (clap's layout when
                // some help is long) the help indented on the next line.
                let rest = t.split_whitespace().skip_while(|w| w.starts_with('-') || w.starts_with('<') || w.ends_with(',')).next();
                let indent = |s: &str| s.len() - s.trim_start().len();
                let below = lines.get(i + 1).is_some_and(|n| !n.trim().is_empty() && indent(n) > indent(l) && !n.trim_start().starts_with('-'));
                assert!(rest.is_some() || below, "{c:?}: no help for `{t}`");
            }
        }
    }
    let (_, out, _) = rir(&["bench", "--help"]);
    assert!(out.contains("generate") && out.contains("encode"), "{out}");
}

#[test]
fn plugins_exits_non_zero_when_a_registered_plugin_is_missing() {
    let (ok, out, err) = plugins_with("[plugins.ghost]\nkinds = [\"retriever\"]\ncrate = \"rir-plugin-ghost\"\n");
    assert!(!ok && out.contains("ghost") && err.contains("1 registered plugin(s) missing or refused"), "{out}{err}");
}

#[test]
fn stage_commands_validate_plugin_configs_before_any_work() {
    plugin_dir();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("x");
    // The dataset and the queries file do not exist: the config error must come first.
    let (ok, _, err) = rir(&[
        "rlrf-data", "--dataset", "no-such-dataset", "--queries", "/no/such/queries.jsonl",
        "--generator", "llama-generator", "--generator-config", "model = \"unused\"",
        "--retriever", "candle-encoder", "--retriever-config", "model = \"unused\"",
        "--reward", "retriever-reward", "--reward-config", "query_wieght = 0.8",
        "--output", o.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("--reward-config") && err.contains("query_wieght"), "{err}");
    assert!(!err.contains("no-such-dataset"), "{err}");
    let (ok, _, err) = rir(&[
        "train", "--trainer", "contrastive-trainer", "--base", "unused", "--data", "/no/such/distill.jsonl",
        "--output", o.to_str().unwrap(), "--params", "learning_rat = 1e-5",
    ]);
    assert!(!ok);
    assert!(err.contains("--params") && err.contains("learning_rat"), "{err}");
    let (ok, _, err) = rir(&["eval", "--dataset", "no-such-dataset", "--retriever", "candle-encoder", "--retriever-config", "modle = \"x\""]);
    assert!(!ok);
    assert!(err.contains("--retriever-config") && err.contains("modle"), "{err}");
    assert!(!o.exists(), "nothing written");
}

/// `rir bench lexical` reports speed and quality side by side: BM25's
/// SciFact figures are pyserini's (0.6789 / 0.9253), and a missing Anserini
/// jar is refused before any work.
#[test]
fn bench_lexical_reports_speed_and_parity() {
    let (ok, out, err) = rir(&["bench", "lexical", "--datasets", "scifact", "--repeat", "1", "--mirror", mirror().to_str().unwrap()]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("rir bm25")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("5183") && row.contains("0.6789") && row.contains("0.9253"), "{row}");
    let (ok, _, err) = rir(&["bench", "lexical", "--datasets", "scifact", "--anserini-jar", "/nonexistent/anserini.jar"]);
    assert!(!ok && err.contains("--anserini-jar: /nonexistent/anserini.jar is not a file"), "{err}");
}

/// `rir bench generate`'s sized prefill rows: prompts of the asked length
/// (counted by the model's own tokenizer, within 1%), one at a time and
/// batched, on rir and on llama.cpp over the same GGUF, with their ratio.
/// The sentence-transformers row's Python is checked before anything is
/// encoded or timed (the row itself needs torch: scripts/setup-bench-python,
/// run by hand; docs/BENCHMARKS.md has its figures).
#[test]
fn bench_encode_names_a_missing_sentence_transformers_python_first() {
    plugin_dir();
    let (ok, out, err) = rir(&["bench", "encode", "--sentence-transformers", "--bench-python", "/nonexistent/python"]);
    assert!(!ok, "{out}");
    assert!(err.contains("no Python at /nonexistent/python") && err.contains("scripts/setup-bench-python"), "{err}");
    assert!(!out.contains("GEMM peak"), "timed before the check: {out}");
    let (ok, _, err) = rir(&["bench", "encode", "--sentence-transformers", "--retriever", "example-hash", "--retriever-config", ""]);
    assert!(!ok);
    assert!(err.contains("compares with candle-encoder"), "{err}");
}

/// `--prefill-modes`: the sized prefill rows once per llama-generator
/// `prefill` setting, the same prompts each; a setting the plugin does not
/// know, or another generator, is refused before anything is timed. And
/// `rir bench encode --dtypes` takes f32 and bf16 only, checked first.
#[test]
fn bench_generate_compares_prefill_settings_and_checks_its_flags_first() {
    plugin_dir();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let (ok, out, err) = rir(&[
        "bench", "generate", "--threads", "2", "--max-tokens", "2", "--samples", "1", "--repeat", "1", "--no-llama-cpp",
        "--prefill-lengths", "64", "--prefill-batches", "2", "--prefill-prompts", "2", "--prefill-modes", "quantized,dense,bf16,auto",
        "--json", json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    for mode in ["quantized", "dense", "bf16", "auto"] {
        let engine = format!("rir llama-generator (prefill={mode})");
        let r = rows.iter().find(|r| r["engine"] == engine.as_str() && r["mode"] == "prefill 64x2").unwrap_or_else(|| panic!("no {engine} row: {out}"));
        assert!((126..=130).contains(&r["tokens"].as_u64().unwrap()), "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // RIR_BF16=off: what a CPU without AVX512-BF16 runs (dense), said once.
    let (ok, _, err) = rir_env(
        &[
            "bench", "generate", "--threads", "2", "--max-tokens", "1", "--samples", "1", "--repeat", "1", "--no-llama-cpp",
            "--prefill-lengths", "64", "--prefill-batches", "2", "--prefill-prompts", "2", "--prefill-modes", "bf16",
        ],
        &[("RIR_BF16", "off")],
    );
    assert!(ok, "{err}");
    assert!(err.contains("prefill = \"bf16\": RIR_BF16=off; prompts run on f32 copies"), "{err}");
    // `rir bench gemm`: both GEMMs per shape (the bf16 one where it runs),
    // a malformed shape refused before anything is timed.
    let (ok, out, err) = rir(&["bench", "gemm", "--shapes", "40x64x96,13x33x7", "--repeat", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("40 x 64 x 96") && out.contains("13 x 33 x 7"), "{out}");
    assert_eq!(out.contains("bf16 GEMM not run"), !rir_models::bf16::available(), "{out}");
    // The instructions' own rates, each where the CPU has it, positive.
    let line = out.lines().find(|l| l.starts_with("instruction peak, 1 thread")).unwrap_or_else(|| panic!("no instruction peak: {out}"));
    let rates: Vec<f64> = line.split("GFLOP/s").filter_map(|p| p.split_whitespace().last()?.parse().ok()).collect();
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let have = usize::from(avx512) + usize::from(rir_models::bf16::available());
    assert_eq!(rates.len(), have, "{line}");
    assert!(rates.iter().all(|&g| g > 0.1), "{line}");
    let (ok, out, err) = rir(&["bench", "gemm", "--shapes", "40x64x96,40x64"]);
    assert!(!ok && err.contains("--shapes") && err.contains("\"40x64\""), "{err}");
    assert!(!out.contains("40 x 64 x 96"), "{out}");
    let (ok, out, err) = rir(&["bench", "generate", "--no-llama-cpp", "--prefill-modes", "fast", "--prefill-lengths", "64", "--max-tokens", "1", "--samples", "1", "--repeat", "1"]);
    assert!(!ok && err.contains("--prefill-modes fast"), "{err}");
    assert!(!out.contains("prefill 64"), "{out}");
    let (ok, _, err) = rir(&["bench", "generate", "--generator", "openai-generator", "--prefill-modes", "bf16"]);
    assert!(!ok && err.contains("--prefill-modes") && err.contains("openai-generator"), "{err}");
    let (ok, out, err) = rir(&["bench", "encode", "--sentence-transformers", "--bench-python", "/bin/true", "--retriever", "candle-encoder", "--retriever-config", "model = \"x\"\ndtype = \"f16\""]);
    assert!(!ok && err.contains("dtype = \"f16\""), "{err}");
    assert!(!out.contains("GEMM peak"), "timed before the check: {out}");
    let (ok, out, err) = rir(&["bench", "encode", "--dtypes", "f16"]);
    assert!(!ok && err.contains("--dtypes") && err.contains("f16"), "{err}");
    assert!(!out.contains("GEMM peak"), "timed before the check: {out}");
}

#[test]
fn bench_generate_measures_sized_prefill_beside_llama_cpp() {
    plugin_dir();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let py = python();
    let (ok, out, err) = rir(&[
        "bench", "generate", "--threads", "1", "--max-tokens", "4", "--samples", "2", "--repeat", "1",
        "--prefill-lengths", "64", "--prefill-batches", "1,2", "--prefill-prompts", "2",
        "--shared-prefix", "64", "--shared-requests", "2",
        "--python", py.to_str().unwrap(), "--json", json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("prefill 64x2: rir / llama.cpp = "), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    for engine in ["rir llama-generator", "llama.cpp (xllamacpp)"] {
        for mode in ["prefill 64x1", "prefill 64x2"] {
            let r = rows.iter().find(|r| r["engine"] == engine && r["mode"] == mode).unwrap_or_else(|| panic!("no {engine} {mode} row: {v}"));
            let tokens = r["tokens"].as_u64().unwrap();
            // Two prompts of 64 tokens (llama.cpp may count a BOS more).
            assert!((126..=132).contains(&tokens), "{engine} {mode}: {tokens} tokens");
            assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
        }
    }
    assert!(v["ratios"]["prefill_64x1_vs_llama_cpp"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    // The prefix rows: each engine's own count of two prompts (a 64-token
    // opening and a question), cached or not, the same on both engines.
    let counts: Vec<u64> = ["cache off", "cache on"]
        .iter()
        .flat_map(|c| ["rir llama-generator", "llama.cpp (xllamacpp)"].map(|e| (e, format!("prefix 64+q x2 {c}"))))
        .map(|(e, mode)| rows.iter().find(|r| r["engine"] == e && r["mode"] == mode).unwrap_or_else(|| panic!("no {e} {mode} row: {v}"))["tokens"].as_u64().unwrap())
        .collect();
    assert!(counts[0] > 128 && counts.iter().all(|&n| n.abs_diff(counts[0]) <= 2), "{counts:?}");
}

/// `rir plot DIR` draws a trainer directory's curves again (the loss with
/// its trend, the others as logged); a directory without a trainer log is
/// an error that names it.
#[test]
fn plot_redraws_training_curves_and_names_a_directory_without_a_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rlrf-train-r1-abc");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("trainer_log.jsonl"), "{\"step\": 1, \"loss\": 0.69, \"accuracy\": 0.5}\n{\"step\": 2, \"loss\": 0.61, \"accuracy\": 0.75}\n").unwrap();
    let d = dir.to_str().unwrap();
    let (ok, _, err) = rir(&["plot", d]);
    assert!(ok, "{err}");
    for f in ["training_loss.svg", "training_loss.png", "training_accuracy.png"] {
        assert!(dir.join(f).metadata().is_ok_and(|m| m.len() > 1000), "{f}: {err}");
    }
    let svg = std::fs::read_to_string(dir.join("training_loss.svg")).unwrap();
    assert!(svg.contains("training loss of rlrf-train-r1-abc") && svg.contains("smoothed"), "title and trend");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = rir(&["plot", empty.to_str().unwrap()]);
    assert!(!ok && err.contains("empty") && err.contains("no trainer_log.jsonl"), "{err}");
}
