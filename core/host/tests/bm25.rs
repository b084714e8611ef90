//! The BM25 text-retriever plugin: parity with pyserini's published BEIR
//! "flat" numbers on SciFact and NFCorpus, its index cache, `rir eval` with
//! it, and the inputs that must not break it.

mod common;

use std::path::Path;

use common::*;
use rir::engine::report::Results;
use rir_sdk::{NoProgress, TextRetriever};

fn rir(args: &[&str], cache: &Path) -> (bool, String, String) {
    rir_in(args, Some(cache))
}

fn eval_bm25(dataset: &str, cache: &Path, out: &Path, extra: &[&str]) -> (Results, String) {
    let m = mirror();
    let mut a = vec!["eval", "--dataset", dataset, "--mirror", m.to_str().unwrap(), "--retriever", "bm25", "--output", out.to_str().unwrap(), "--name", "bm25"];
    a.extend_from_slice(extra);
    let (ok, stdout, err) = rir(&a, cache);
    assert!(ok, "{err}");
    (Results::read(&out.join(format!("bm25.{dataset}.json"))).unwrap(), stdout)
}

/// pyserini's BEIR (v1.0.0) "flat" BM25 reproduction: nDCG@10, R@100.
const PYSERINI: [(&str, f64, f64); 2] = [("scifact", 0.6789, 0.9253), ("nfcorpus", 0.3218, 0.2457)];

#[test]
fn bm25_matches_pyserini_on_scifact_and_nfcorpus_and_caches_its_index() {
    plugin_dir();
    let cache = temp_cache();
    for (ds, ndcg, recall) in PYSERINI {
        let out = tempfile::tempdir().unwrap();
        let (r, stdout) = eval_bm25(ds, cache.path(), out.path(), &[]);
        let got = |m: &str| r.evaluation.aggregate[&m.parse::<rir::engine::metrics::Measure>().unwrap()];
        eprintln!("{ds}: BM25 nDCG@10 {:.4} (pyserini {ndcg}), R@100 {:.4} (pyserini {recall}); timings {:?}", got("nDCG@10"), got("R@100"), r.timings);
        assert!((got("nDCG@10") - ndcg).abs() <= 0.005, "{ds}: nDCG@10 {} vs pyserini {ndcg}", got("nDCG@10"));
        assert!((got("R@100") - recall).abs() <= 0.005, "{ds}: R@100 {} vs pyserini {recall}", got("R@100"));
        assert!(stdout.contains("index built"), "{stdout}");
        assert_eq!(r.config["retriever"]["kind"], "text-retriever");

        // The second run opens the cached index and gives the same run file.
        let again = tempfile::tempdir().unwrap();
        let (r2, stdout) = eval_bm25(ds, cache.path(), again.path(), &[]);
        assert!(stdout.contains("index from cache"), "{stdout}");
        assert_eq!(r2.evaluation.per_query, r.evaluation.per_query);
        let trec = |d: &Path| std::fs::read_to_string(d.join(format!("bm25.{ds}.trec"))).unwrap();
        assert_eq!(trec(out.path()), trec(again.path()));
    }
    // Other settings are another index (and other numbers).
    let out = tempfile::tempdir().unwrap();
    let (r, stdout) = eval_bm25("scifact", cache.path(), out.path(), &["--retriever-config", "k1 = 1.2\nb = 0.75\nstemmer = \"none\""]);
    assert!(stdout.contains("index built"), "{stdout}");
    assert_ne!(r.evaluation.aggregate[&"nDCG@10".parse::<rir::engine::metrics::Measure>().unwrap()], 0.0);
    let indexes = std::fs::read_dir(cache.path().join("indexes")).unwrap().count();
    assert_eq!(indexes, 2, "one index directory per analyzer fingerprint");
}

#[test]
fn bm25_config_errors_name_the_key_before_any_work() {
    plugin_dir();
    let cache = temp_cache();
    let out = tempfile::tempdir().unwrap();
    let m = mirror();
    let base = ["eval", "--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--retriever", "bm25", "--output", out.path().to_str().unwrap()];
    for (cfg, want) in [("k2 = 1.0", "k2"), ("b = 1.5", "b must be in [0, 1]"), ("stopwords = \"english\"", "stopwords = \"english\""), ("stemmer = \"snowball\"", "stemmer")] {
        let mut a = base.to_vec();
        a.extend(["--retriever-config", cfg]);
        let (ok, _, err) = rir(&a, cache.path());
        assert!(!ok && err.contains(want) && err.contains("--retriever-config"), "{cfg}: {err}");
    }
    assert!(!cache.path().join("indexes").exists(), "nothing was indexed");
}

fn bm25(host: &rir::plugins::PluginHost) -> Box<dyn TextRetriever> {
    host.load("bm25").unwrap().text_retriever("").unwrap()
}

#[test]
fn bm25_gives_defined_results_for_awkward_input() {
    plugin_dir();
    let host = host();
    // An empty corpus: an index of nothing, every slot empty.
    let dir = tempfile::tempdir().unwrap();
    let mut r = bm25(&host);
    r.build(dir.path(), &[], &NoProgress).unwrap();
    assert_eq!(r.len(), 0);
    let h = r.search(&texts(&["anything"]), 3).unwrap();
    assert_eq!((h.ids, h.k), (vec![-1; 3], 3));

    // Stopword-only and empty queries match nothing; a very long document
    // and one of only punctuation index fine; ties go to the earlier document.
    let long = "protein ".repeat(200_000);
    let docs = texts(&["the cat sat", "cats and dogs", "... !!! ---", &long, "dogs and cats"]);
    let dir = tempfile::tempdir().unwrap();
    let mut r = bm25(&host);
    r.build(dir.path(), &docs, &NoProgress).unwrap();
    assert_eq!(r.len(), 5);
    let h = r.search(&texts(&["the and of", "", "cats", "protein"]), 5).unwrap();
    assert!(h.ids[..10].iter().all(|&i| i == -1), "{:?}", h.ids);
    let cats: Vec<i64> = h.ids[10..15].iter().copied().filter(|&i| i >= 0).collect();
    assert_eq!(cats, [0, 1, 4], "cat/cats stem alike; equal scores keep corpus order");
    assert_eq!(h.ids[15], 3);
    assert!(h.scores[15].is_finite() && h.scores[15] > 0.0);

    // Search before any index is a clear error, not a panic.
    let fresh = bm25(&host);
    let e = fresh.search(&texts(&["x"]), 1).unwrap_err().to_string();
    assert!(e.contains("no index is open"), "{e}");
    // An index directory that is not one is refused with its path.
    let mut r = bm25(&host);
    let e = r.open(Path::new("/nonexistent-index")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent-index") && e.contains("not an index"), "{e}");
}
