//! Every metric agrees with pytrec_eval (trec_eval's C code) to 1e-6, per
//! query and on average, on the real SciFact and NFCorpus judgments, for a
//! real retrieval run, a random run and a run full of tied scores.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use rir::engine::data;
use rir::engine::metrics::{self, Averaging, Measure, Run};
use rir::engine::runfile;

fn measures() -> Vec<Measure> {
    metrics::parse_measures(
        "nDCG@1,nDCG@3,nDCG@5,nDCG@10,nDCG@100,nDCG@1000,AP@10,AP@100,AP@1000,R@1,R@10,R@100,R@1000,\
         P@1,P@5,P@10,P@100,RR@1,RR@10,RR@100,nDCG,AP,RR",
    )
    .unwrap()
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Random scores over random documents, with each query's judged documents
/// mixed in so that every measure sees hits at varied ranks.
fn random_run(ds: &data::Dataset, seed: u64, tied: bool) -> Run {
    let mut rng = Lcg(seed);
    let mut run = Run::new();
    for (qid, _) in &ds.queries {
        let mut docs: BTreeMap<String, f64> = BTreeMap::new();
        for _ in 0..150 {
            let d = &ds.corpus[(rng.next() as usize) % ds.corpus.len()].id;
            docs.insert(d.clone(), 0.0);
        }
        for d in ds.qrels[qid].keys() {
            if !rng.next().is_multiple_of(3) {
                docs.insert(d.clone(), 0.0);
            }
        }
        for s in docs.values_mut() {
            // Tied: three score levels only, so order inside a level is the
            // tie rule's alone. Otherwise: distinct-ish floats.
            *s = if tied { (rng.next() % 3) as f64 * 0.5 } else { (rng.next() % 100_000) as f64 / 1e5 };
        }
        run.insert(qid.clone(), docs.into_iter().collect());
    }
    // One query without results, to exercise averaging.
    let first = ds.queries[0].0.clone();
    run.remove(&first);
    run
}

fn hash_run(ds: &data::Dataset) -> Run {
    use rir_sdk::Retriever;
    let r = rir_plugin_example_hash::HashRetriever::new("dim = 512").unwrap();
    let docs: Vec<String> = ds.corpus.iter().map(data::Doc::encoder_text).collect();
    let qs: Vec<String> = ds.queries.iter().map(|q| q.1.clone()).collect();
    let c = r.encode_corpus(&docs).unwrap();
    let q = r.encode_queries(&qs, None).unwrap();
    let hits = rir::engine::search::exact_topk(&q, &c, 1000, 2);
    let mut run = Run::new();
    for (qi, (qid, _)) in ds.queries.iter().enumerate() {
        run.insert(
            qid.clone(),
            (0..hits.k).map(|s| (ds.corpus[hits.ids[qi * hits.k + s] as usize].id.clone(), hits.scores[qi * hits.k + s] as f64)).collect(),
        );
    }
    run
}

fn check(ds: &data::Dataset, run: &Run, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run_path = dir.path().join("run.trec");
    runfile::write(&run_path, run, "test").unwrap();
    // What we wrote reads back the same (ranks aside).
    let back = runfile::read(&run_path).unwrap();
    assert_eq!(back.len(), run.len());

    let out = dir.path().join("ref.json");
    let qrels_path = ds.dir.join("qrels").join(format!("{}.tsv", ds.split));
    let status = Command::new(python())
        .arg(root().join("tests/python/trec_eval_ref.py"))
        .args([&qrels_path, &run_path, &out])
        .status()
        .unwrap();
    assert!(status.success(), "reference script failed");
    let reference: BTreeMap<String, BTreeMap<String, f64>> =
        serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();

    let ms = measures();
    let ours = metrics::evaluate(&ds.qrels, &back, &ms, Averaging::Run, false);
    assert_eq!(ours.per_query.len(), reference.len(), "{label}: evaluated query sets differ");
    let mut checked = 0;
    for (q, vals) in &reference {
        for m in &ms {
            let want = vals[&m.to_string()];
            let got = ours.per_query[q][m];
            assert!((want - got).abs() <= 1e-6, "{label}: query {q} {m}: trec_eval {want}, rir {got}");
            checked += 1;
        }
    }
    for m in &ms {
        let mean = reference.values().map(|v| v[&m.to_string()]).sum::<f64>() / reference.len() as f64;
        assert!((mean - ours.aggregate[m]).abs() <= 1e-6, "{label}: mean {m}");
    }
    // trec_eval -c: judged queries missing from the run count as zeros.
    let all = metrics::evaluate(&ds.qrels, &back, &ms, Averaging::Qrels, false);
    assert_eq!(all.per_query.len(), ds.qrels.len());
    for m in &ms {
        let mean = reference.values().map(|v| v[&m.to_string()]).sum::<f64>() / ds.qrels.len() as f64;
        assert!((mean - all.aggregate[m]).abs() <= 1e-6, "{label}: qrels-averaged {m}");
    }
    eprintln!("{label}: {checked} per-query values agree with trec_eval");
}

#[test]
fn metrics_agree_with_trec_eval_on_scifact_and_nfcorpus() {
    let cache = temp_cache();
    for name in ["scifact", "nfcorpus"] {
        let ds = data::open(name, None, cache.path(), Some(&mirror())).unwrap();
        check(&ds, &hash_run(&ds), &format!("{name}/hash-retriever"));
        check(&ds, &random_run(&ds, 7, false), &format!("{name}/random"));
        check(&ds, &random_run(&ds, 11, true), &format!("{name}/tied"));
    }
}
