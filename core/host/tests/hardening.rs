//! Mistakes that used to give wrong numbers with exit 0, or lose data:
//! out-of-range options, empty datasets, a torn generation-cache line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rir_sdk::{GenerationRequest, Prompt};

fn rir(args: &[&str], cache: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rir")).args(args).current_dir(root()).env_remove("RIR_REGISTRY").env("RIR_CACHE", cache).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn beir(dir: &Path, corpus: &str, queries: &str, qrels: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(dir.join("queries.jsonl"), queries).unwrap();
    std::fs::write(dir.join("qrels/test.tsv"), qrels).unwrap();
    dir.to_owned()
}

#[test]
fn out_of_range_options_and_empty_data_are_refused() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let good = beir(
        &tmp.path().join("good"),
        "{\"_id\": \"d1\", \"text\": \"bones and vitamin d\"}\n{\"_id\": \"d2\", \"text\": \"heart\"}\n",
        "{\"_id\": \"q1\", \"text\": \"vitamin d\"}\n",
        "q1\td1\t1\n",
    );
    let out = tmp.path().join("out");
    let eval = |extra: &[&str]| {
        let mut a = vec!["eval", "--dataset", good.to_str().unwrap(), "--retriever", "example-hash", "--output", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        rir(&a, &cache)
    };
    for (extra, says) in [
        (&["--k", "0"][..], "k (results per query) must be at least 1"),
        (&["--query-weight", "NaN"], "query_weight must be a number in [0, 1]"),
        (&["--query-weight", "7"], "query_weight must be a number in [0, 1]"),
    ] {
        let (ok, log) = eval(extra);
        assert!(!ok && log.contains(says), "{extra:?}: {log}");
    }
    assert!(!out.exists(), "nothing is written for refused options");
    let (ok, log) = eval(&[]);
    assert!(ok, "{log}");

    let empty = beir(&tmp.path().join("empty"), "", "{\"_id\": \"q1\", \"text\": \"x\"}\n", "q1\td1\t1\n");
    let (ok, log) = rir(&["eval", "--dataset", empty.to_str().unwrap(), "--retriever", "example-hash", "--output", out.to_str().unwrap()], &cache);
    assert!(!ok && log.contains("corpus.jsonl: the corpus has no documents"), "{log}");
    let unjudged = beir(&tmp.path().join("unjudged"), "{\"_id\": \"d1\", \"text\": \"a\"}\n", "{\"_id\": \"q9\", \"text\": \"x\"}\n", "q1\td1\t1\n");
    let (ok, log) = rir(&["eval", "--dataset", unjudged.to_str().unwrap(), "--retriever", "example-hash", "--output", out.to_str().unwrap()], &cache);
    assert!(!ok && log.contains("queries.jsonl: no query has judgments"), "{log}");

    let results = std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).unwrap();
    let (ok, log) = rir(&["table", results.to_str().unwrap(), "--alpha", "5"], &cache);
    assert!(!ok && log.contains("--alpha must be in (0, 1)"), "{log}");
}

#[test]
fn experiment_eval_values_are_checked_with_their_line() {
    let p = Path::new("exp.toml");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    for (from, to, says) in [
        ("measures = [\"nDCG@10\", \"R@100\", \"RR@10\"]", "measures = [\"nDCG@abc\"]", "measures"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nk = 0", "k (results per query)"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nquery_weight = 7.0", "query_weight"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nalpha = 5.0", "alpha must be in (0, 1)"),
    ] {
        let bad = base.replacen(from, to, 1);
        assert_ne!(bad, base, "{from} is not in the quickstart");
        let key = to.lines().last().unwrap().split([' ', '=']).next().unwrap();
        let eval_at = bad.lines().position(|l| l == "[eval]").unwrap();
        let line = bad.lines().enumerate().skip(eval_at).find(|(_, l)| l.starts_with(key)).unwrap().0 + 1;
        let e = rir::experiment::parse(&bad, p).unwrap_err().to_string();
        assert!(e.contains(&format!("exp.toml:{line}:")) && e.contains(says), "{to}: {e}");
    }
}

#[test]
fn a_torn_cache_line_is_cut_off_and_loses_nothing_else() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let host = host();
    let g = host.load("probe").unwrap().generator("").unwrap();
    let cache = rir::generate::GenerationCache::for_generator(tmp.path(), "probe", "", g.as_ref());
    let req = |t: &str| GenerationRequest::greedy(Prompt::Text(t.into()), 4);
    rir::generate::generate_all(g.as_ref(), &[req("one")], Some(&cache), 8, "t").unwrap();
    let file = std::fs::read_dir(tmp.path().join("generations")).unwrap().flatten().next().unwrap().path();
    // A crash in the middle of the next write.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"key\": \"abc\", \"completions\": [{\"te");
    std::fs::write(&file, &text).unwrap();
    rir::generate::generate_all(g.as_ref(), &[req("two")], Some(&cache), 8, "t").unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{lines:?}");
    // Both answers come back from the cache.
    let (_, from_cache) = rir::generate::generate_all(g.as_ref(), &[req("one"), req("two")], Some(&cache), 8, "t").unwrap();
    assert_eq!(from_cache, 2);
}
