//! Retrieval metrics computed exactly as trec_eval computes them.
//!
//! Names follow ir-measures (`nDCG@10`, `AP@100`, `R@100`, `P@10`, `RR@10`).
//! Ranking within a query follows trec_eval, not the run's rank column:
//! score descending, ties broken by document id descending (byte order).
//! A document is relevant when its grade is at least 1; nDCG's gain is the
//! grade itself (negative grades count as 0).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::engine::data::Qrels;

/// A run: query id → (doc id, score). Order does not matter.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// A measure family, named as ir-measures and pytrec_eval name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    /// Normalised discounted cumulative gain (trec_eval's gains: the judgement's grade).
    #[serde(rename = "nDCG")]
    Ndcg,
    /// Average precision.
    AP,
    /// Recall.
    R,
    /// Precision.
    P,
    /// Reciprocal rank of the first relevant result.
    RR,
}

/// A measure at a cutoff (`None`: the whole ranking; not allowed for P and R).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Measure {
    /// The family.
    pub family: Family,
    /// The cutoff k of `@k`; `None`: the whole ranking.
    pub cutoff: Option<usize>,
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.family {
            Family::Ndcg => "nDCG",
            Family::AP => "AP",
            Family::R => "R",
            Family::P => "P",
            Family::RR => "RR",
        };
        match self.cutoff {
            Some(k) => write!(f, "{name}@{k}"),
            None => f.write_str(name),
        }
    }
}

impl FromStr for Measure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, cutoff) = match s.split_once('@') {
            Some((n, k)) => {
                let k: usize = k.parse().map_err(|_| format!("measure {s:?}: cutoff {k:?} is not a positive integer"))?;
                if k == 0 {
                    return Err(format!("measure {s:?}: cutoff must be at least 1"));
                }
                (n, Some(k))
            }
            None => (s, None),
        };
        let family = match name.to_ascii_lowercase().as_str() {
            "ndcg" => Family::Ndcg,
            "ap" | "map" => Family::AP,
            "r" | "recall" => Family::R,
            "p" | "precision" => Family::P,
            "rr" | "mrr" => Family::RR,
            _ => return Err(format!("unknown measure {s:?} (use nDCG@k, AP@k, R@k, P@k, RR@k)")),
        };
        if cutoff.is_none() && matches!(family, Family::P | Family::R) {
            return Err(format!("measure {s:?} needs a cutoff, e.g. {s}@10"));
        }
        Ok(Measure { family, cutoff })
    }
}

impl Serialize for Measure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Measure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated measure list ("nDCG@10,R@100").
pub fn parse_measures(list: &str) -> Result<Vec<Measure>, String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect()
}

/// The default set printed by `rir eval`.
pub fn default_measures() -> Vec<Measure> {
    parse_measures("nDCG@10,R@100,AP@100,RR@10,P@10,R@1000").expect("valid")
}

/// Which queries an aggregate averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Averaging {
    /// Queries that are both judged and in the run (trec_eval's default,
    /// pytrec_eval, BEIR, ir-measures).
    #[default]
    Run,
    /// Every judged query; a query missing from the run scores 0 (trec_eval -c).
    Qrels,
}

impl FromStr for Averaging {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "run" => Ok(Averaging::Run),
            "qrels" => Ok(Averaging::Qrels),
            _ => Err(format!("averaging must be 'run' or 'qrels', not {s:?}")),
        }
    }
}

/// Per-query and mean values.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evaluation {
    /// The measures computed, in the order asked.
    pub measures: Vec<Measure>,
    /// Over which queries the means are taken.
    pub averaging: Averaging,
    /// Each query's values.
    pub per_query: BTreeMap<String, BTreeMap<Measure, f64>>,
    /// The means.
    pub aggregate: BTreeMap<Measure, f64>,
}

/// Sorts one query's results the way trec_eval does.
pub fn trec_order(results: &mut [(String, f64)]) {
    results.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.as_bytes().cmp(a.0.as_bytes())));
}

/// Evaluates `run` against `qrels`. With `ignore_identical_ids`, a result whose
/// doc id equals its query id is dropped first (BEIR's default).
pub fn evaluate(qrels: &Qrels, run: &Run, measures: &[Measure], averaging: Averaging, ignore_identical_ids: bool) -> Evaluation {
    let mut per_query = BTreeMap::new();
    for (qid, judged) in qrels {
        let ranking = match run.get(qid) {
            Some(r) => {
                let mut r: Vec<(String, f64)> =
                    r.iter().filter(|(d, _)| !(ignore_identical_ids && d == qid)).cloned().collect();
                trec_order(&mut r);
                r
            }
            None if averaging == Averaging::Qrels => Vec::new(),
            None => continue,
        };
        let values = measures.iter().map(|m| (*m, query_measure(*m, judged, &ranking))).collect();
        per_query.insert(qid.clone(), values);
    }
    let n = per_query.len().max(1) as f64;
    let aggregate = measures
        .iter()
        .map(|m| (*m, per_query.values().map(|v: &BTreeMap<Measure, f64>| v[m]).sum::<f64>() / n))
        .collect();
    Evaluation { measures: measures.to_vec(), averaging, per_query, aggregate }
}

/// One measure for one query; `ranking` is already in trec order.
pub fn query_measure(m: Measure, judged: &BTreeMap<String, i32>, ranking: &[(String, f64)]) -> f64 {
    let grade = |d: &str| judged.get(d).copied().unwrap_or(0);
    let num_rel = judged.values().filter(|&&g| g >= 1).count();
    let k = m.cutoff.unwrap_or(usize::MAX);
    let top = &ranking[..ranking.len().min(k)];
    match m.family {
        Family::P => top.iter().filter(|(d, _)| grade(d) >= 1).count() as f64 / k as f64,
        Family::R => {
            if num_rel == 0 {
                return 0.0;
            }
            top.iter().filter(|(d, _)| grade(d) >= 1).count() as f64 / num_rel as f64
        }
        Family::RR => top.iter().position(|(d, _)| grade(d) >= 1).map_or(0.0, |i| 1.0 / (i + 1) as f64),
        Family::AP => {
            if num_rel == 0 {
                return 0.0;
            }
            let mut hits = 0usize;
            let mut sum = 0.0;
            for (i, (d, _)) in top.iter().enumerate() {
                if grade(d) >= 1 {
                    hits += 1;
                    sum += hits as f64 / (i + 1) as f64;
                }
            }
            sum / num_rel as f64
        }
        Family::Ndcg => {
            let gain = |g: i32| g.max(0) as f64;
            let dcg: f64 = top.iter().enumerate().map(|(i, (d, _))| gain(grade(d)) / ((i + 2) as f64).log2()).sum();
            let mut ideal: Vec<i32> = judged.values().copied().filter(|&g| g > 0).collect();
            ideal.sort_unstable_by(|a, b| b.cmp(a));
            let idcg: f64 = ideal.iter().take(k).enumerate().map(|(i, &g)| gain(g) / ((i + 2) as f64).log2()).sum();
            if idcg > 0.0 {
                dcg / idcg
            } else {
                0.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qrels() -> BTreeMap<String, i32> {
        [("a", 2), ("b", 1), ("c", 0), ("z", 1)].into_iter().map(|(d, g)| (d.to_string(), g)).collect()
    }
    fn ranking(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        let mut r: Vec<(String, f64)> = v.iter().map(|(d, s)| (d.to_string(), *s)).collect();
        trec_order(&mut r);
        r
    }

    #[test]
    fn ties_break_by_doc_id_descending() {
        let r = ranking(&[("a", 1.0), ("c", 1.0), ("b", 2.0)]);
        assert_eq!(r.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["b", "c", "a"]);
    }

    #[test]
    fn hand_computed_values() {
        let r = ranking(&[("c", 3.0), ("a", 2.0), ("x", 1.5), ("b", 1.0)]);
        let m = |s: &str| query_measure(s.parse().unwrap(), &qrels(), &r);
        assert_eq!(m("P@2"), 0.5);
        assert_eq!(m("R@4"), 2.0 / 3.0);
        assert_eq!(m("RR@10"), 0.5);
        assert_eq!(m("RR@1"), 0.0);
        assert!((m("AP@10") - (0.5 + 0.5) / 3.0).abs() < 1e-12);
        let dcg = 2.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 2.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((m("nDCG@10") - dcg / idcg).abs() < 1e-12);
    }

    #[test]
    fn measure_names_round_trip_and_bad_names_are_explained() {
        for s in ["nDCG@10", "AP@100", "R@1000", "P@5", "RR@10", "AP", "nDCG"] {
            assert_eq!(s.parse::<Measure>().unwrap().to_string(), s);
        }
        assert!("R".parse::<Measure>().unwrap_err().contains("needs a cutoff"));
        assert!("MAPP@10".parse::<Measure>().unwrap_err().contains("unknown measure"));
        assert!("P@0".parse::<Measure>().unwrap_err().contains("at least 1"));
    }
}
