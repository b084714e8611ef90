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

/// Two documents, one judged query: the smallest dataset an eval runs on.
fn two_docs(dir: &Path) -> PathBuf {
    beir(dir, "{\"_id\": \"d1\", \"text\": \"bones and vitamin d\"}\n{\"_id\": \"d2\", \"text\": \"heart\"}\n", "{\"_id\": \"q1\", \"text\": \"vitamin d\"}\n", "q1\td1\t1\n")
}

#[test]
fn out_of_range_options_and_empty_data_are_refused() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let good = two_docs(&tmp.path().join("good"));
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

/// Mistakes in an experiment file are refused at parse, with the file and
/// the line of the key: `[eval]` values out of range, `rounds = 0`, an empty
/// `datasets`, a value of the wrong type (the key named), a variant's round
/// out of range or its name given twice.
#[test]
fn experiment_mistakes_name_line_and_key() {
    let p = Path::new("exp.toml");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    for (from, to, says) in [
        ("measures = [\"nDCG@10\", \"R@100\", \"RR@10\"]", "measures = [\"nDCG@abc\"]", "measures"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nk = 0", "k (results per query)"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nquery_weight = 7.0", "query_weight"),
        ("augmentation_max_tokens = 64", "augmentation_max_tokens = 64\nalpha = 5.0", "alpha must be in (0, 1)"),
        ("rounds = 1", "rounds = 0", "`rounds` must be at least 1"),
        ("datasets = [\"scifact\"]", "datasets = []", "`datasets` is empty"),
        ("passages = 120", "passages = \"many\"", "`passages`: invalid type: string \"many\", expected usize"),
        ("rounds = 1", "rounds = \"one\"", "`rounds`: invalid type"),
        ("name = \"+RLRF\"", "name = \"+RLRF\"\nround = 5", "variant `+RLRF`: round must be in 1..=1"),
        ("name = \"both\"", "name = \"base\"", "variant `base`: appears twice"),
        ("passages = 120", "passages = 120\nprompt = \"A claim of {{ lenght }} for {{ text }}\"", "[stages.queries] `prompt`"),
    ] {
        let bad = base.replacen(from, to, 1);
        assert_ne!(bad, base, "{from} is not in the quickstart");
        // The line the mistake is on: the last one the replacement wrote.
        let last = to.lines().last().unwrap();
        let line = bad.lines().enumerate().filter(|(_, l)| *l == last).last().unwrap().0 + 1;
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
    let cache = rir::engine::generate::GenerationCache::for_generator(tmp.path(), "probe", "", g.as_ref());
    let req = |t: &str| GenerationRequest::greedy(Prompt::Text(t.into()), 4);
    rir::engine::generate::generate_all(g.as_ref(), &[req("one")], Some(&cache), 8, "t").unwrap();
    let file = std::fs::read_dir(tmp.path().join("generations")).unwrap().flatten().next().unwrap().path();
    // A crash in the middle of the next write.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"key\": \"abc\", \"completions\": [{\"te");
    std::fs::write(&file, &text).unwrap();
    rir::engine::generate::generate_all(g.as_ref(), &[req("two")], Some(&cache), 8, "t").unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{lines:?}");
    // Both answers come back from the cache.
    let (_, from_cache) = rir::engine::generate::generate_all(g.as_ref(), &[req("one"), req("two")], Some(&cache), 8, "t").unwrap();
    assert_eq!(from_cache, 2);
}

/// A typo in any plugin table is refused by the plugin itself (the ABI's
/// `validate`, no model loaded) before the first stage, naming the
/// experiment file, the key's line and the key.
#[test]
fn plugin_tables_are_validated_before_any_work() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap();
    for (from, to, key, says) in [
        ("params = { beta = 0.1,", "params = { betta = 0.1,", "betta", "did you mean `beta`?"),
        ("config = { mode = \"query_likelihood\", max_words = 60 }", "config = { mode = \"query_likelihood\", max_words = 60, windw = 4 }", "windw", "did you mean `window`?"),
        ("eval_pool = \"all\" }", "eval_pool = \"all\", t_teacher = -1.0 }", "t_teacher", "must be a positive number"),
        ("config = { query_weight = 0.8 }", "config = { query_weight = 1.8 }", "query_weight", "is not in [0, 1]"),
        ("max_batch = 16 }", "max_batch = 0 }", "max_batch", "must be at least 1"),
    ] {
        let bad = base.replacen(from, to, 1);
        assert_ne!(bad, base, "{from} is not in the quickstart");
        let f = tmp.path().join("exp.toml");
        std::fs::write(&f, &bad).unwrap();
        let line = bad.lines().position(|l| l.contains(to)).unwrap() + 1;
        let col = bad.lines().nth(line - 1).unwrap().find(key).unwrap() + 1;
        let out = tmp.path().join("runs");
        let t = std::time::Instant::now();
        let (ok, log) = rir(&["run", f.to_str().unwrap(), "--mirror", mirror().to_str().unwrap(), "--output", out.to_str().unwrap(), "--dry-run"], &cache);
        assert!(!ok, "{to}: accepted\n{log}");
        assert!(log.contains(&format!("exp.toml:{line}:{col}:")) && log.contains(key) && log.contains(says), "{to}: {log}");
        // Refused up front: no model was downloaded, no stage directory made.
        assert!(t.elapsed().as_secs() < 30, "{to}: took {:?}", t.elapsed());
        assert!(!out.join("quickstart").exists(), "{to}: a stage ran");
    }
}

/// A plugin whose `validate` panics is an error, not a crash; a plugin
/// without `validate` is accepted (its constructor checks later).
#[test]
fn a_panicking_validate_is_contained() {
    plugin_dir();
    let host = host();
    let probe = host.load("probe").unwrap();
    let e = probe.validate(rir::plugins::registry::Kind::Retriever, rir_sdk::ConfigOf::Retriever, "panic_on_validate = true").unwrap_err().to_string();
    assert!(e.contains("validate asked to panic"), "{e}");
    assert!(probe.validate(rir::plugins::registry::Kind::Retriever, rir_sdk::ConfigOf::Retriever, "steps = 3").unwrap());
    let e = probe.validate(rir::plugins::registry::Kind::Retriever, rir_sdk::ConfigOf::Retriever, "stepz = 3").unwrap_err().to_string();
    assert!(e.contains("unknown field `stepz`"), "{e}");
}

/// Messages that name what is wrong: the line of a non-UTF-8 document, the
/// qrels file that was expected, an output path that is a file.
#[test]
fn data_and_output_mistakes_name_the_file_and_line() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let ds = beir(&tmp.path().join("d"), "{\"_id\": \"d1\", \"text\": \"ok\"}\n{\"_id\": \"d2\", \"text\": \"bad \u{1}\"}\n", "{\"_id\": \"q1\", \"text\": \"x\"}\n", "q1\td1\t1\n");
    let mut bytes = std::fs::read(ds.join("corpus.jsonl")).unwrap();
    let at = bytes.iter().position(|&b| b == 1).unwrap();
    bytes[at] = 0xff;
    std::fs::write(ds.join("corpus.jsonl"), bytes).unwrap();
    let out = tmp.path().join("out");
    let eval = |d: &Path, o: &Path| rir(&["eval", "--dataset", d.to_str().unwrap(), "--retriever", "example-hash", "--output", o.to_str().unwrap()], &cache);
    let (ok, log) = eval(&ds, &out);
    assert!(!ok && log.contains("corpus.jsonl:2: not UTF-8 (invalid byte at column"), "{log}");

    std::fs::write(ds.join("corpus.jsonl"), "{\"_id\": \"d1\", \"text\": \"ok\"}\n").unwrap();
    std::fs::remove_file(ds.join("qrels/test.tsv")).unwrap();
    let (ok, log) = eval(&ds, &out);
    assert!(!ok && log.contains("expected") && log.contains("qrels/test.tsv"), "{log}");
    std::fs::write(ds.join("qrels/test.tsv"), "q1\td1\t1\n").unwrap();

    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (ok, log) = eval(&ds, &file);
    assert!(!ok && log.contains("is a file, not a directory") && !log.contains("os error 17"), "{log}");
    let (ok, log) = eval(&ds, &file.join("sub"));
    assert!(!ok && log.contains("a-file is a file, not a directory"), "{log}");
}

#[test]
fn eval_table_options_are_checked_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    // The quickstart sets generation_batch itself; the cases below add their own.
    let base = std::fs::read_to_string(root().join("experiments/quickstart.toml")).unwrap().replace("generation_batch = 32\n", "");
    for (extra, want) in [("index = \"annoy\"", "[eval] index"), ("averaging = \"mean\"", "[eval] averaging"), ("generation_batch = 0", "generation_batch must be at least 1")] {
        let text = base.replacen("[eval]\n", &format!("[eval]\n{extra}\n"), 1);
        assert_ne!(text, base, "quickstart.toml has an [eval] table");
        let p = dir.path().join("e.toml");
        std::fs::write(&p, &text).unwrap();
        let line = text.lines().position(|l| l == extra).unwrap() + 1;
        let e = rir::experiment::load(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(&format!("e.toml:{line}:")), "{extra}: {e}");
    }
    // An index plugin that is not registered: refused by the plugin check, before any stage.
    plugin_dir();
    let text = base.replacen("[eval]\n", "[eval]\nindex = \"annoy:HNSW\"\n", 1);
    let p = dir.path().join("e.toml");
    std::fs::write(&p, &text).unwrap();
    let exp = rir::experiment::load(&p).unwrap();
    let e = rir::experiment::check_plugins(&host(), &exp).unwrap_err().to_string();
    assert!(e.contains("[eval] index") && e.contains("annoy"), "{e}");
}

/// A full disk while a result is written (simulated with /dev/full behind
/// the temporary file's name): a clear error naming the file and the
/// cause, no temporary file or half a run left behind, and the earlier
/// result in place untouched.
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_partial_file() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let ds = two_docs(&tmp.path().join("tiny"));
    let out = tmp.path().join("out");
    let args = ["eval", "--dataset", ds.to_str().unwrap(), "--retriever", "example-hash", "--name", "x", "--output", out.to_str().unwrap()];
    let (ok, log) = rir(&args, &cache);
    assert!(ok, "{log}");
    let run = out.join("x.tiny.trec");
    let before = std::fs::read(&run).unwrap();
    std::os::unix::fs::symlink("/dev/full", out.join("x.tiny.trec.partial")).unwrap();
    let (ok, log) = rir(&args, &cache);
    assert!(!ok, "{log}");
    assert!(log.contains(&format!("{}: No space left on device", run.display())), "{log}");
    assert!(!out.join("x.tiny.trec.partial").exists() && std::fs::symlink_metadata(out.join("x.tiny.trec.partial")).is_err(), "the temporary file is removed");
    assert_eq!(std::fs::read(&run).unwrap(), before, "the earlier run file is untouched");
}
