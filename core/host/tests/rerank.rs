//! `rir rerank`: BM25's top 3 for three SciFact queries rescored by the
//! generator's query likelihood (UPR, SmolLM2-135M through generator-reward):
//! each passage gets the reward's own score for it, the run keeps exactly the
//! reranked passages, a rerun is answered from the generation cache, and bad
//! runs are refused with the file and the id before a model loads.

mod common;

use std::path::Path;

use common::*;
use rir_sdk::{RewardContext, RewardItem};

const UPR: &str = "mode = \"query_likelihood\"\nmax_words = 40";

fn rir(args: &[&str], cache: &Path) -> (bool, String, String) {
    rir_in(args, Some(cache))
}

#[test]
fn rerank_scores_each_passage_with_the_reward_and_refuses_bad_runs() {
    plugin_dir();
    let cache = temp_cache();
    let dir = tempfile::tempdir().unwrap();
    let m = mirror();
    let (ms, o) = (m.to_str().unwrap(), dir.path().to_str().unwrap());
    let (ok, _, err) = rir(&["eval", "--dataset", "scifact", "--mirror", ms, "--retriever", "bm25", "--output", o, "--name", "bm25", "--k", "10"], cache.path());
    assert!(ok, "{err}");
    // Three queries, their top 10 each (depth 3 reranks the first 3).
    let full = rir::engine::runfile::read(&dir.path().join("bm25.scifact.trec")).unwrap();
    let small: rir::engine::metrics::Run = full.into_iter().take(3).collect();
    let run = dir.path().join("small.trec");
    rir::engine::runfile::write(&run, &small, "bm25").unwrap();

    let gcfg = format!("model = {SMOLLM:?}");
    let rerank = |run: &Path, name: &str, extra: &[&str]| {
        let mut a = vec!["rerank", run.to_str().unwrap(), "--dataset", "scifact", "--mirror", ms, "--generator", "llama-generator", "--generator-config", &gcfg,
                         "--reranker-config", UPR, "--depth", "3", "--output", o, "--name", name];
        a.extend_from_slice(extra);
        rir(&a, cache.path())
    };
    let (ok, stdout, err) = rerank(&run, "upr", &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("reranked 9 passages of 3 queries"), "{stdout}");
    let got = rir::engine::runfile::read(&dir.path().join("upr.scifact.trec")).unwrap();

    // The reward's own scores for the same passages, called directly.
    let ds = rir::engine::data::open("scifact", None, cache.path(), Some(&m)).unwrap();
    let host = host();
    let g = host.load("llama-generator").unwrap().generator(&gcfg).unwrap();
    let reward = host.load("generator-reward").unwrap().reward(UPR).unwrap();
    let ctx = RewardContext { retriever: None, generator: Some(g.as_ref()) };
    let text = |id: &str| ds.corpus.iter().find(|d| d.id == id).unwrap().encoder_text();
    assert_eq!(got.len(), 3);
    for (qid, results) in &small {
        let mut top = results.clone();
        rir::engine::metrics::trec_order(&mut top);
        top.truncate(3);
        let query = ds.queries.iter().find(|(id, _)| id == qid).unwrap().1.clone();
        let item = RewardItem { query, reference: String::new(), candidates: top.iter().map(|(d, _)| text(d)).collect() };
        let want = reward.score(&ctx, &[item]).unwrap().remove(0).scores;
        let mut reranked = got[qid].clone();
        assert_eq!(reranked.len(), 3, "{qid}: only the reranked depth is kept");
        for ((d, _), w) in top.iter().zip(&want) {
            let s = reranked.iter().find(|(x, _)| x == d).unwrap_or_else(|| panic!("{qid}: {d} missing")).1;
            // The run file holds scores as text: equal to its precision.
            assert!((s - w).abs() < 1e-4, "{qid} {d}: {s} vs {w}");
        }
        rir::engine::metrics::trec_order(&mut reranked);
        assert!(reranked.windows(2).all(|p| p[0].1 >= p[1].1));
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("upr.scifact.json")).unwrap()).unwrap();
    assert_eq!(results["config"]["rerank"]["scored"], 9);
    assert_eq!(results["config"]["rerank"]["depth"], 3);

    // Again: the scores come from the generation cache, the run is the same.
    let (ok, _, err) = rerank(&run, "upr2", &[]);
    assert!(ok, "{err}");
    let t = |n: &str| std::fs::read_to_string(dir.path().join(format!("{n}.scifact.trec"))).unwrap().replace("upr2", "upr");
    assert_eq!(t("upr"), t("upr2"));

    // Bad runs and options, refused before any model is loaded.
    let bad = dir.path().join("bad.trec");
    std::fs::write(&bad, "1 Q0 no-such-doc 1 1.0 x\n").unwrap();
    let (ok, _, err) = rerank(&bad, "bad", &[]);
    assert!(!ok && err.contains("bad.trec") && err.contains("no-such-doc"), "{err}");
    std::fs::write(&bad, "no-such-query Q0 4983 1 1.0 x\n").unwrap();
    let (ok, _, err) = rerank(&bad, "bad", &[]);
    assert!(!ok && err.contains("bad.trec") && err.contains("no-such-query"), "{err}");
    let (ok, _, err) = rerank(&run, "bad", &["--depth", "0"]);
    assert!(!ok && err.contains("--depth"), "{err}");
    let (ok, _, err) = rir(&["rerank", run.to_str().unwrap(), "--dataset", "scifact", "--mirror", ms, "--reranker-config", "mode = \"pairwise\"", "--output", o], cache.path());
    assert!(!ok && err.contains("--reranker-config") && err.contains("pairwise"), "{err}");
    assert!(!dir.path().join("bad.scifact.trec").exists());
}
