//! Results as MTEB writes them, so leaderboards and scripts built on MTEB's
//! results folder read rir's numbers: one `TaskResult` JSON per (run,
//! dataset) at `DIR/<run>/no_revision_available/<Task>.json` (MTEB's layout
//! `results/<model>/<revision>/<Task>.json`; "no_revision_available" is what
//! MTEB writes for a model without a revision).
//!
//! The fields are those of `mteb.load_results.task_results.TaskResult`
//! (dataset_revision, task_name, mteb_version, scores, evaluation_time,
//! kg_co2_emissions); each split's entry holds `main_score` (nDCG@10, the
//! main score MTEB gives every BEIR task, or the first measure when nDCG@10
//! was not computed), `hf_subset` "default", `languages` ["eng-Latn"] and
//! the measures under MTEB's names (`ndcg_at_10`, `recall_at_100`,
//! `map_at_100`, `precision_at_10`, `mrr_at_10`), rounded to 6 places as
//! MTEB rounds them. `mteb_version` is null (MTEB did not compute them);
//! `dataset_revision` says the data came from BEIR's zip, not from the
//! Hugging Face revision MTEB pins.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::engine::metrics::{Family, Measure};
use crate::engine::report::Results;
use crate::error::HostError;

/// MTEB's name for a BEIR dataset (`scifact` → `SciFact`); names MTEB does
/// not have are kept.
pub fn task_name(dataset: &str) -> String {
    let known = [
        ("arguana", "ArguAna"),
        ("climate-fever", "ClimateFEVER"),
        ("dbpedia-entity", "DBPedia"),
        ("fever", "FEVER"),
        ("fiqa", "FiQA2018"),
        ("hotpotqa", "HotpotQA"),
        ("msmarco", "MSMARCO"),
        ("nfcorpus", "NFCorpus"),
        ("nq", "NQ"),
        ("quora", "QuoraRetrieval"),
        ("scidocs", "SCIDOCS"),
        ("scifact", "SciFact"),
        ("trec-covid", "TRECCOVID"),
        ("webis-touche2020", "Touche2020"),
    ];
    known.iter().find(|(b, _)| *b == dataset).map_or_else(|| dataset.to_owned(), |(_, m)| (*m).to_owned())
}

/// MTEB's key for a measure: `nDCG@10` → `ndcg_at_10`, `AP@100` →
/// `map_at_100`, `R@100` → `recall_at_100`, `P@10` → `precision_at_10`,
/// `RR@10` → `mrr_at_10` (without a cutoff: `ndcg`, `map`, `mrr`).
pub fn metric_key(m: &Measure) -> String {
    let family = match m.family {
        Family::Ndcg => "ndcg",
        Family::AP => "map",
        Family::R => "recall",
        Family::P => "precision",
        Family::RR => "mrr",
    };
    match m.cutoff {
        Some(k) => format!("{family}_at_{k}"),
        None => family.to_owned(),
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// The `TaskResult` of one results file.
pub fn task_result(r: &Results) -> Value {
    let ev = &r.evaluation;
    let ndcg10 = Measure { family: Family::Ndcg, cutoff: Some(10) };
    let main = if ev.aggregate.contains_key(&ndcg10) { Some(ndcg10) } else { ev.measures.first().copied() };
    let mut scores = Map::new();
    scores.insert("hf_subset".into(), json!("default"));
    scores.insert("languages".into(), json!(["eng-Latn"]));
    scores.insert("main_score".into(), main.and_then(|m| ev.aggregate.get(&m)).map_or(Value::Null, |v| json!(round6(*v))));
    for m in &ev.measures {
        if let Some(v) = ev.aggregate.get(m) {
            scores.insert(metric_key(m), json!(round6(*v)));
        }
    }
    let seconds: f64 = r.timings.values().sum();
    json!({
        "dataset_revision": format!("BEIR zip ({} split), not MTEB's Hugging Face revision", r.split),
        "task_name": task_name(&r.dataset),
        "mteb_version": Value::Null,
        "scores": { r.split.clone(): [Value::Object(scores)] },
        "evaluation_time": seconds,
        "kg_co2_emissions": Value::Null,
    })
}

/// Writes every results file's `TaskResult` under `dir` (MTEB's layout,
/// the run's name as the model's); returns the files written. A run name
/// that cannot be a folder name is refused before anything is written.
pub fn write(results: &[Results], dir: &Path) -> Result<Vec<PathBuf>, HostError> {
    for r in results {
        crate::util::paths::check_name("run name", &r.name).map_err(|e| HostError::Input(format!("MTEB results: {e}")))?;
    }
    let mut written = Vec::with_capacity(results.len());
    for r in results {
        let path = dir.join(&r.name).join("no_revision_available").join(format!("{}.json", crate::util::paths::sanitize(&task_name(&r.dataset))));
        let text = serde_json::to_string_pretty(&task_result(r)).expect("json values serialize");
        crate::util::files::write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_follow_mteb() {
        assert_eq!(task_name("scifact"), "SciFact");
        assert_eq!(task_name("fiqa"), "FiQA2018");
        assert_eq!(task_name("my-corpus"), "my-corpus");
        for (m, k) in [("nDCG@10", "ndcg_at_10"), ("AP@100", "map_at_100"), ("R@100", "recall_at_100"), ("P@10", "precision_at_10"), ("RR@10", "mrr_at_10"), ("nDCG", "ndcg")] {
            assert_eq!(metric_key(&m.parse().unwrap()), k);
        }
    }
}
