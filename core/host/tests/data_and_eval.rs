//! Datasets, run files and results files: real BEIR data from the mirror,
//! bad input with file:line errors, and `rir eval` / `rir table` end to end.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rir::engine::data::{self, DataError, Doc};
use rir::engine::runfile;

fn write_beir(dir: &std::path::Path, corpus: &str, queries: &str, qrels: &str) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(dir.join("corpus.jsonl"), corpus).unwrap();
    std::fs::write(dir.join("queries.jsonl"), queries).unwrap();
    std::fs::write(dir.join("qrels/test.tsv"), qrels).unwrap();
}

/// A qrels file on its own (what `rir.load_qrels` and `rir.evaluate` read
/// in Python): BEIR's TSV and TREC's space-separated qrels give the same
/// judgments, every one kept; a bad line is named.
#[test]
fn a_qrels_file_reads_as_beir_tsv_or_trec() {
    let dir = tempfile::tempdir().unwrap();
    let beir = dir.path().join("test.tsv");
    std::fs::write(&beir, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td9\t2\n").unwrap();
    let trec = dir.path().join("qrels.txt");
    std::fs::write(&trec, "q1 0 d1 1\nq1 0 d2 0\n\nq2 0 d9 2\n").unwrap();
    let a = data::read_qrels_file(&beir).unwrap();
    assert_eq!(a, data::read_qrels_file(&trec).unwrap());
    assert_eq!((a.len(), a["q1"]["d1"], a["q2"]["d9"]), (2, 1, 2));
    std::fs::write(&trec, "q1 0 d1 1\nq1 0 d2 x\n").unwrap();
    let e = data::read_qrels_file(&trec).unwrap_err().to_string();
    assert!(e.contains("qrels.txt:2: relevance \"x\" is not an integer"), "{e}");
    // The same SciFact judgments as the dataset loader keeps.
    let s = data::open("scifact", None, temp_cache().path(), Some(&mirror())).unwrap();
    let f = data::read_qrels_file(&mirror().join("beir/scifact/qrels/test.tsv")).unwrap();
    assert_eq!(f, s.qrels);
}

#[test]
fn real_beir_sets_load_with_their_published_counts() {
    let cache = temp_cache();
    let s = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    assert_eq!((s.corpus.len(), s.queries.len()), (5183, 300));
    assert_eq!(s.qrels.values().map(|d| d.len()).sum::<usize>(), 339);
    assert!(s.report.warnings().is_empty(), "{:?}", s.report);
    let n = data::open("nfcorpus", None, cache.path(), Some(&mirror())).unwrap();
    assert_eq!((n.corpus.len(), n.queries.len()), (3633, 323));
    assert_eq!(n.qrels.values().map(|d| d.len()).sum::<usize>(), 12334);
    // Cached now: opening without the mirror works, and `list` shows both.
    assert!(data::open("scifact", None, cache.path(), None).is_ok());
    let names: Vec<String> = data::list_cached(cache.path()).into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["nfcorpus", "scifact"]);
    // Encoder text is BEIR's title + " " + text, stripped.
    let d = Doc { id: "1".into(), title: "".into(), text: "body".into() };
    assert_eq!(d.encoder_text(), "body");
}

#[test]
fn malformed_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_beir(
        dir.path(),
        "{\"_id\": \"d1\", \"title\": \"t\", \"text\": \"x\"}\n{\"_id\": \"d2\", \"text\": \"y\"\n",
        "{\"_id\": \"q1\", \"text\": \"q\"}\n",
        "query-id\tcorpus-id\tscore\nq1\td1\t1\n",
    );
    let e = data::load_dir("t", dir.path(), "test").unwrap_err();
    assert!(matches!(e, DataError::Malformed { line: 2, .. }), "{e}");
    assert!(e.to_string().starts_with(&format!("{}:2: ", dir.path().join("corpus.jsonl").display())), "{e}");

    write_beir(dir.path(), "{\"_id\": \"d1\", \"text\": \"x\"}\n", "{\"_id\": [1], \"text\": \"q\"}\n", "q1\td1\t1\n");
    let e = data::load_dir("t", dir.path(), "test").unwrap_err().to_string();
    assert!(e.contains("queries.jsonl:1: `_id` must be a string or number"), "{e}");

    write_beir(dir.path(), "{\"_id\": \"d1\", \"text\": \"x\"}\n", "{\"_id\": \"q1\", \"text\": \"q\"}\n", "query-id\tcorpus-id\tscore\nq1\td1\n");
    let e = data::load_dir("t", dir.path(), "test").unwrap_err().to_string();
    assert!(e.contains("test.tsv:2: expected 3 columns (query-id corpus-id score) or 4 (qid 0 docid rel), found 2"), "{e}");

    write_beir(dir.path(), "{\"_id\": \"d1\", \"text\": \"x\"}\n", "{\"_id\": \"q1\", \"text\": \"q\"}\n", "q1\td1\thigh\n");
    let e = data::load_dir("t", dir.path(), "test").unwrap_err().to_string();
    assert!(e.contains("test.tsv:1: relevance \"high\" is not an integer"), "{e}");

    let e = data::load_dir("t", dir.path(), "dev").unwrap_err().to_string();
    assert!(e.contains("no qrels for split 'dev': expected") && e.contains("qrels/dev.tsv (qrels found: test)"), "{e}");
}

#[test]
fn duplicates_and_dangling_judgments_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_beir(
        dir.path(),
        "{\"_id\": \"d1\", \"text\": \"x\"}\n{\"_id\": \"d1\", \"text\": \"again\"}\n{\"_id\": 7, \"text\": \"numeric id\"}\n",
        "{\"_id\": \"q1\", \"text\": \"q\"}\n{\"_id\": \"q1\", \"text\": \"dup\"}\n{\"_id\": \"q2\", \"text\": \"unjudged\"}\n",
        "q1\td1\t1\nq1\td9\t2\nq1\t7\t1\nq1\td1\t2\nq5\td1\t1\n",
    );
    let ds = data::load_dir("t", dir.path(), "test").unwrap();
    let r = &ds.report;
    assert_eq!((r.duplicate_doc_ids, r.duplicate_query_ids, r.qrels_unknown_query, r.qrels_unknown_doc, r.qrels_duplicate), (1, 1, 1, 1, 1));
    assert_eq!(r.warnings().len(), 5);
    assert_eq!(ds.corpus[0].text, "x", "first copy kept");
    assert_eq!(ds.corpus[1].id, "7", "numeric ids become strings");
    assert_eq!(ds.queries.len(), 1, "only judged queries are evaluated");
    assert_eq!(ds.qrels["q1"]["d1"], 2, "last repeated judgment kept");
}

#[test]
fn unknown_and_unfetched_datasets_say_what_to_do() {
    let cache = temp_cache();
    let e = data::open("scifcat", None, cache.path(), None).unwrap_err().to_string();
    assert!(e.contains("unknown dataset 'scifcat'") && e.contains("did you mean 'scifact'?"), "{e}");
    let e = data::open("arguana", None, cache.path(), None).unwrap_err().to_string();
    assert!(e.contains("rir data fetch arguana"), "{e}");
    let e = data::fetch("arguana", cache.path(), Some(&mirror()), false).unwrap_err().to_string();
    assert!(e.contains("has no dataset 'arguana'"), "{e}");
}

#[test]
fn run_files_round_trip_and_reject_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.trec");
    let mut run = rir::engine::metrics::Run::new();
    run.insert("q1".into(), vec![("a".into(), 0.5), ("b".into(), 1.5), ("c".into(), 0.5)]);
    runfile::write(&p, &run, "tag").unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "q1 Q0 b 1 1.5 tag\nq1 Q0 c 2 0.5 tag\nq1 Q0 a 3 0.5 tag\n");
    assert_eq!(runfile::read(&p).unwrap()["q1"].len(), 3);
    for (text, want) in [
        ("q1 Q0 a 1 0.5\n", ":1: expected 6 columns"),
        ("q1 Q0 a x 0.5 t\n", ":1: rank \"x\" is not an integer"),
        ("q1 Q0 a 1 0.5 t\nq1 Q0 b 2 nan t\n", ":2: score \"nan\" is not finite"),
        ("q1 Q0 a 1 0.5 t\nq1 Q0 a 2 0.4 t\n", ":2: document a appears twice for query q1"),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = runfile::read(&p).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

fn rir(args: &[&str], cache: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(args)
        .current_dir(root())
        .env("RIR_CACHE", cache)
        .env_remove("RIR_REGISTRY")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn eval_writes_run_and_results_then_reuses_the_cache_and_table_compares() {
    plugin_dir();
    let cache = temp_cache();
    let out = tempfile::tempdir().unwrap();
    let m = mirror();
    let o = out.path().to_str().unwrap();
    let base = ["eval", "--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--retriever", "example-hash", "--output", o];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        rir(&a, cache.path())
    };
    let (ok, stdout, err) = run(&["--retriever-config", "dim = 1024", "--name", "hash1024"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("nDCG@10") && stdout.contains("R@100"), "{stdout}");
    assert!(stdout.contains("encoded 5183 documents (0 from cache)"), "{stdout}");
    let (ok, stdout, err) = run(&["--retriever-config", "dim = 1024", "--name", "hash1024"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("encoded 0 documents (5183 from cache) and 0 queries (300 from cache)"), "{stdout}");
    let (ok, _, err) = run(&["--retriever-config", "dim = 32", "--name", "hash32", "--index", "faiss:Flat"]);
    assert!(ok, "{err}");

    let results = |n: &str| out.path().join(format!("{n}.scifact.json")).to_str().unwrap().to_owned();
    let trec = std::fs::read_to_string(out.path().join("hash1024.scifact.trec")).unwrap();
    assert_eq!(trec.lines().count(), 300 * 1000);
    let r = rir::engine::report::Results::read(std::path::Path::new(&results("hash1024"))).unwrap();
    assert_eq!(r.evaluation.per_query.len(), 300);
    assert!(r.timings.contains_key("encode_corpus"));

    let (ok, table, err) = rir(&["table", &results("hash1024"), &results("hash32"), "--format", "md"], cache.path());
    assert!(ok, "{err}");
    assert!(table.contains("| hash1024 |") && table.contains("**"), "{table}");
    // dim 32 collides heavily: far worse, and both tests say so.
    let line = table.lines().find(|l| l.starts_with("| hash32 |")).unwrap();
    assert!(line.contains("ᵗʳ"), "{table}");
    assert!(table.contains("(Holm–Bonferroni-corrected over 1 comparison)"), "{table}");
    let (ok, table, err) = rir(&["table", &results("hash1024"), &results("hash32"), "--correction", "bonferroni"], cache.path());
    assert!(ok && table.contains("Bonferroni-corrected"), "{err}");
    let (ok, _, err) = rir(&["table", &results("hash1024"), &results("hash32"), "--correction", "sidak"], cache.path());
    assert!(!ok && err.contains("holm | bonferroni | none"), "{err}");
    for fmt in ["latex", "csv", "json", "terminal"] {
        let (ok, _, err) = rir(&["table", &results("hash1024"), &results("hash32"), "--format", fmt], cache.path());
        assert!(ok, "{fmt}: {err}");
    }
    let (ok, _, err) = rir(&["table", &results("hash1024"), "--baseline", "nope"], cache.path());
    assert!(!ok && err.contains("baseline 'nope' is not one of the runs (hash1024)"), "{err}");
    let bad = out.path().join("hash1024.scifact.trec");
    let (ok, _, err) = rir(&["table", bad.to_str().unwrap()], cache.path());
    assert!(!ok && err.contains("not a rir results file"), "{err}");
    let (ok, _, err) = run(&["--measures", "nDCG@10,MRR@x"]);
    assert!(!ok && err.contains("cutoff \"x\""), "{err}");
}

/// Serves `body` for every request on a loopback port, `requests` times.
fn serve(body: Vec<u8>, requests: usize) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_download_that_fails_its_md5_is_discarded() {
    // A real zip in BEIR's layout, but not the published archive: its md5 differs.
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("scifact/corpus.jsonl", opts).unwrap();
    std::io::Write::write_all(&mut zip, b"{\"_id\": \"d\", \"text\": \"t\"}\n").unwrap();
    let bytes = zip.finish().unwrap().into_inner();
    let url = serve(bytes, 1);
    let cache = temp_cache();
    let out = Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(["data", "fetch", "scifact"])
        .env("RIR_CACHE", cache.path())
        .env("RIR_BEIR_URL", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{url}/scifact.zip: md5 mismatch: expected 5f7d1de60b170fc8027bb7898e2efca1")), "{err}");
    assert!(err.contains("the download was discarded"), "{err}");
    assert!(data::list_cached(cache.path()).is_empty(), "nothing may be cached after a failed fetch");
}

/// In one experiment run (as `rir run`'s "both" after "+RLRF"), an eval
/// whose augmentations are all cached does not load the generator again;
/// one with a new query does, at its first request; an eval outside a run
/// always loads it.
#[test]
fn a_generator_whose_augmentations_are_cached_is_not_loaded_again() {
    plugin_dir();
    let cache = temp_cache();
    let out = tempfile::tempdir().unwrap();
    let loads = out.path().join("loads.txt");
    let mut settings = settings();
    settings.cache_dir = cache.path().to_owned();
    let host = rir::PluginHost::new(rir::Registry::load(&root().join("registry.toml")).unwrap(), settings);
    let data = mini_scifact_of(out.path(), "mini", 40);
    let opts = |name: &str, dataset: &Path| rir::stages::eval::EvalOptions {
        dataset: dataset.to_string_lossy().into_owned(),
        split: None,
        mirror: None,
        retriever: "example-hash".into(),
        retriever_config: String::new(),
        query_instruction: None,
        generator: Some("probe".into()),
        generator_config: format!("loads_file = {:?}", loads.to_string_lossy()),
        query_weight: 0.8,
        augmentation_max_tokens: 16,
        index: "flat".parse().unwrap(),
        k: 100,
        measures: rir::engine::metrics::parse_measures("nDCG@10").unwrap(),
        averaging: "qrels".parse().unwrap(),
        ignore_identical_ids: true,
        batch: 32,
        generation_batch: 8,
        use_cache: true,
        output: out.path().to_owned(),
        name: name.into(),
        experiment: Some(serde_json::json!({"name": "t"})),
    };
    let count = || std::fs::read_to_string(&loads).map(|s| s.lines().count()).unwrap_or(0);
    rir::stages::eval::run(&host, &opts("a", &data)).unwrap();
    assert_eq!(count(), 1);
    rir::stages::eval::run(&host, &opts("b", &data)).unwrap();
    assert_eq!(count(), 1, "every augmentation was cached: no load");
    let read = |n: &str| rir::engine::report::Results::read(&out.path().join(format!("{n}.mini.json"))).unwrap();
    let (a, b) = (read("a"), read("b"));
    assert_eq!(a.config["generator"]["model"], b.config["generator"]["model"]);
    assert_eq!(b.config["generator"]["from_cache"].as_u64(), Some(b.evaluation.per_query.len() as u64));
    assert_eq!(a.evaluation.aggregate, b.evaluation.aggregate);
    // A query the cache has not seen: the generator is loaded for it.
    let first_id = b.evaluation.per_query.keys().next().unwrap().clone();
    let queries = data.join("queries.jsonl");
    let text: Vec<String> = std::fs::read_to_string(&queries)
        .unwrap()
        .lines()
        .map(|l| {
            let mut q: serde_json::Value = serde_json::from_str(l).unwrap();
            if q["_id"].as_str() == Some(first_id.as_str()) {
                q["text"] = format!("Unseen: {}", q["text"].as_str().unwrap()).into();
            }
            q.to_string()
        })
        .collect();
    std::fs::write(&queries, text.join("\n") + "\n").unwrap();
    rir::stages::eval::run(&host, &opts("c", &data)).unwrap();
    assert_eq!(count(), 2, "query {first_id} was new: the generator loaded for it");
    // Outside a run (a library call), the generator is loaded every time.
    rir::stages::eval::run(&host, &rir::stages::eval::EvalOptions { experiment: None, ..opts("d", &data) }).unwrap();
    assert_eq!(count(), 3, "an eval outside a run loads its generator");
}

#[test]
fn generator_augmented_eval_mixes_and_caches_generations() {
    plugin_dir();
    let cache = temp_cache();
    let out = tempfile::tempdir().unwrap();
    let m = mirror();
    let args = [
        "eval", "--dataset", "scifact", "--mirror", m.to_str().unwrap(), "--retriever", "example-hash",
        "--generator", "probe", "--output", out.path().to_str().unwrap(), "--name", "aug", "--measures", "nDCG@10",
    ];
    let (ok, _, err) = rir(&args, cache.path());
    assert!(ok, "{err}");
    let read = || rir::engine::report::Results::read(&out.path().join("aug.scifact.json")).unwrap();
    let first = read();
    let g = &first.config["generator"];
    assert_eq!((g["plugin"].as_str(), g["query_weight"].as_f64(), g["from_cache"].as_u64()), (Some("probe"), Some(0.8), Some(0)));
    assert!(first.timings.contains_key("generate"));
    let (ok, _, err) = rir(&args, cache.path());
    assert!(ok, "{err}");
    let second = read();
    assert_eq!(second.config["generator"]["from_cache"].as_u64(), Some(300));
    assert_eq!(first.evaluation.aggregate, second.evaluation.aggregate);
}
