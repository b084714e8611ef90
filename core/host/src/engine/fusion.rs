//! Rank fusion of runs, as ranx's `fuse` computes it: each run normalised
//! per query (over the documents it retrieved), then combined. A document
//! missing from a run adds nothing from it.
//!
//! - `rrf`: Σ 1/(k + rank), rank from 1 in each run's trec order (k = 60,
//!   Cormack et al. 2009); normalisation does not change it;
//! - `combsum`: Σ of normalised scores; `combmnz`: that times the number of
//!   runs that retrieved the document (Fox & Shaw 1993);
//! - `wsum`: Σ wᵢ · normalised score.
//!
//! Normalisations (ranx's names): `min-max` (s − min)/(max − min), `max`
//! s/max, `sum` (s − min)/Σ(s − min), `zmuv` (s − mean)/std (population
//! std), `none`;
//! denominators below 1e-9 are taken as 1e-9, as ranx does.
//!
//! Runs over different queries ([`QuerySet`]): ranx refuses them (`same`
//! here); `union` (the default) fuses every query any run has, a run
//! without a query adding nothing to it — what a text retriever's run needs,
//! as BM25 returns nothing for a query of terms the corpus lacks (15 of
//! NFCorpus's 323 test queries); `intersection` keeps the queries all have.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::engine::metrics::{trec_order, Run};

/// How scores are made comparable across runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Norm {
    /// (s − min) / (max − min).
    #[serde(rename = "min-max")]
    #[default]
    MinMax,
    /// s / max.
    #[serde(rename = "max")]
    Max,
    /// (s − min) / Σ (s − min).
    #[serde(rename = "sum")]
    Sum,
    /// (s − mean) / std (zero mean, unit variance).
    #[serde(rename = "zmuv")]
    Zmuv,
    /// Scores as they are.
    #[serde(rename = "none")]
    None,
}

impl FromStr for Norm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "min-max" | "minmax" => Norm::MinMax,
            "max" => Norm::Max,
            "sum" => Norm::Sum,
            "zmuv" | "z-score" | "zscore" => Norm::Zmuv,
            "none" => Norm::None,
            _ => return Err(format!("normalisation {s:?}: use min-max, max, sum, zmuv (z-score) or none")),
        })
    }
}

/// How the normalised runs are combined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "method", deny_unknown_fields)]
pub enum Method {
    /// Reciprocal rank fusion with constant `k`.
    Rrf {
        /// The rank offset (60 in the paper and in ranx).
        #[serde(default = "rrf_k")]
        k: f64,
    },
    /// Sum of the normalised scores.
    CombSum,
    /// The sum times the number of runs that retrieved the document.
    CombMnz,
    /// Weighted sum, one weight per run.
    WSum {
        /// The weights, in the order of the runs.
        weights: Vec<f64>,
    },
}

fn rrf_k() -> f64 {
    60.0
}

impl Method {
    /// Parses `rrf`, `combsum`, `combmnz` or `wsum` with its parameters.
    pub fn parse(name: &str, rrf_k: Option<f64>, weights: &[f64]) -> Result<Self, String> {
        Ok(match name {
            "rrf" => Method::Rrf { k: rrf_k.unwrap_or(60.0) },
            "combsum" | "comb_sum" => Method::CombSum,
            "combmnz" | "comb_mnz" => Method::CombMnz,
            "wsum" | "weighted" => Method::WSum { weights: weights.to_vec() },
            _ => return Err(format!("fusion method {name:?}: use rrf, combsum, combmnz or wsum")),
        })
    }
}

/// Which queries a fusion covers when the runs' query sets differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuerySet {
    /// Every query of any run (a run without it adds nothing).
    #[default]
    Union,
    /// Only the queries every run has.
    Intersection,
    /// The runs must have the same queries (ranx's rule), else an error.
    Same,
}

impl FromStr for QuerySet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "union" => QuerySet::Union,
            "intersection" => QuerySet::Intersection,
            "same" => QuerySet::Same,
            _ => return Err(format!("query set {s:?}: use union, intersection or same")),
        })
    }
}

/// Queries only some of the runs have: (1-based run, how many it lacks, the
/// first few), for every run that lacks any.
pub fn missing_queries(runs: &[&Run]) -> Vec<(usize, usize, Vec<String>)> {
    let all: std::collections::BTreeSet<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    runs.iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let lacks: Vec<String> = all.iter().filter(|q| !r.contains_key(q.as_str())).map(|q| (*q).clone()).collect();
            (!lacks.is_empty()).then(|| (i + 1, lacks.len(), lacks.into_iter().take(5).collect()))
        })
        .collect()
}

/// Why runs cannot be fused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FusionError {
    /// Fewer than two runs.
    #[error("fusion needs at least two runs, got {0}")]
    TooFew(usize),
    /// Runs over different query sets.
    #[error("run {run} and run 1 are over different queries: {detail}")]
    DifferentQueries {
        /// 1-based position of the run that differs from the first.
        run: usize,
        /// Which queries are only in one of them (the first few).
        detail: String,
    },
    /// A parameter out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Checks the method's parameters against `runs` runs.
pub fn check(method: &Method, runs: usize) -> Result<(), FusionError> {
    match method {
        Method::Rrf { k } if !(k.is_finite() && *k >= 0.0) => Err(FusionError::Invalid(format!("rrf k must be a finite number >= 0, got {k}"))),
        Method::WSum { weights } if weights.len() != runs => {
            Err(FusionError::Invalid(format!("wsum needs one weight per run: {} weights for {runs} runs", weights.len())))
        }
        Method::WSum { weights } if weights.iter().any(|w| !w.is_finite()) => Err(FusionError::Invalid(format!("wsum weights must be finite numbers, got {weights:?}"))),
        _ => Ok(()),
    }
}

fn differing(a: &Run, b: &Run) -> Option<String> {
    let only = |x: &Run, y: &Run| x.keys().filter(|q| !y.contains_key(*q)).cloned().collect::<Vec<_>>();
    let (ab, ba) = (only(a, b), only(b, a));
    if ab.is_empty() && ba.is_empty() {
        return None;
    }
    let show = |v: &[String]| {
        let head: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
        if v.len() > 5 { format!("{} (and {} more)", head.join(", "), v.len() - 5) } else { head.join(", ") }
    };
    let mut parts = Vec::new();
    if !ab.is_empty() {
        parts.push(format!("{} only in run 1 ({})", ab.len(), show(&ab)));
    }
    if !ba.is_empty() {
        parts.push(format!("{} only in the other ({})", ba.len(), show(&ba)));
    }
    Some(parts.join("; "))
}

fn normalise(results: &[(String, f64)], norm: Norm) -> Vec<(String, f64)> {
    let scores: Vec<f64> = results.iter().map(|r| r.1).collect();
    if scores.is_empty() {
        return Vec::new();
    }
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let f: Box<dyn Fn(f64) -> f64> = match norm {
        Norm::None => Box::new(|s| s),
        Norm::MinMax => {
            let d = (max - min).max(1e-9);
            Box::new(move |s| (s - min) / d)
        }
        Norm::Max => {
            let d = max.max(1e-9);
            Box::new(move |s| s / d)
        }
        Norm::Sum => {
            let d = (scores.iter().sum::<f64>() - min * scores.len() as f64).max(1e-9);
            Box::new(move |s| (s - min) / d)
        }
        Norm::Zmuv => {
            let n = scores.len() as f64;
            let mean = scores.iter().sum::<f64>() / n;
            let sd = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-9);
            Box::new(move |s| (s - mean) / sd)
        }
    };
    results.iter().map(|(d, s)| (d.clone(), f(*s))).collect()
}

/// Fuses `runs` over the queries `queries` chooses; each query's result
/// list comes back in trec order, cut to `depth` documents when given.
pub fn fuse(runs: &[&Run], norm: Norm, method: &Method, depth: Option<usize>, queries: QuerySet) -> Result<Run, FusionError> {
    if runs.len() < 2 {
        return Err(FusionError::TooFew(runs.len()));
    }
    check(method, runs.len())?;
    if queries == QuerySet::Same {
        for (i, r) in runs.iter().enumerate().skip(1) {
            if let Some(detail) = differing(runs[0], r) {
                return Err(FusionError::DifferentQueries { run: i + 1, detail });
            }
        }
    }
    let qids: std::collections::BTreeSet<&String> = match queries {
        QuerySet::Intersection => runs[0].keys().filter(|q| runs.iter().all(|r| r.contains_key(q.as_str()))).collect(),
        _ => runs.iter().flat_map(|r| r.keys()).collect(),
    };
    let empty: Vec<(String, f64)> = Vec::new();
    let mut out = Run::new();
    for qid in qids {
        // doc → (combined score, runs that retrieved it)
        let mut acc: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        let lists: Vec<Vec<(String, f64)>> = runs
            .iter()
            .map(|r| {
                let mut l = r.get(qid.as_str()).unwrap_or(&empty).clone();
                trec_order(&mut l);
                l
            })
            .collect();
        // RRF reads ranks only: normalising would not change them.
        let normed: Vec<Vec<(String, f64)>> = match method {
            Method::Rrf { .. } => lists,
            _ => lists.iter().map(|l| normalise(l, norm)).collect(),
        };
        for (ri, list) in normed.iter().enumerate() {
            for (rank, (doc, s)) in list.iter().enumerate() {
                let v = match method {
                    Method::Rrf { k } => 1.0 / (k + rank as f64 + 1.0),
                    Method::CombSum | Method::CombMnz => *s,
                    Method::WSum { weights } => weights[ri] * s,
                };
                let e = acc.entry(doc.as_str()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        let mut fused: Vec<(String, f64)> = acc
            .into_iter()
            .map(|(d, (s, n))| (d.to_owned(), if matches!(method, Method::CombMnz) { s * n as f64 } else { s }))
            .collect();
        trec_order(&mut fused);
        if let Some(depth) = depth {
            fused.truncate(depth);
        }
        out.insert(qid.to_owned(), fused);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rows: &[(&str, &[(&str, f64)])]) -> Run {
        rows.iter().map(|(q, r)| (q.to_string(), r.iter().map(|(d, s)| (d.to_string(), *s)).collect())).collect()
    }

    #[test]
    fn rrf_sums_reciprocal_ranks() {
        let a = run(&[("q", &[("d1", 9.0), ("d2", 5.0)])]);
        let b = run(&[("q", &[("d2", 0.9), ("d3", 0.1)])]);
        let f = fuse(&[&a, &b], Norm::MinMax, &Method::Rrf { k: 60.0 }, None, QuerySet::Same).unwrap();
        let got: BTreeMap<_, _> = f["q"].iter().cloned().collect();
        assert!((got["d2"] - (1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-15);
        assert!((got["d1"] - 1.0 / 61.0).abs() < 1e-15);
        assert_eq!(f["q"][0].0, "d2");
    }

    #[test]
    fn combmnz_multiplies_by_the_runs_that_retrieved() {
        let a = run(&[("q", &[("d1", 3.0), ("d2", 1.0), ("d3", 2.0)])]);
        let b = run(&[("q", &[("d1", 1.0), ("d4", 0.0)])]);
        let f = fuse(&[&a, &b], Norm::MinMax, &Method::CombMnz, None, QuerySet::Same).unwrap();
        let got: BTreeMap<_, _> = f["q"].iter().cloned().collect();
        assert_eq!(got["d1"], (1.0 + 1.0) * 2.0);
        assert_eq!(got["d3"], 0.5);
        assert_eq!(got["d4"], 0.0);
    }

    #[test]
    fn zmuv_and_wsum_weights() {
        let a = run(&[("q", &[("d1", 2.0), ("d2", 0.0)])]);
        let b = run(&[("q", &[("d1", 0.0), ("d2", 4.0)])]);
        let f = fuse(&[&a, &b], Norm::Zmuv, &Method::WSum { weights: vec![0.75, 0.25] }, None, QuerySet::Same).unwrap();
        let got: BTreeMap<_, _> = f["q"].iter().cloned().collect();
        assert!((got["d1"] - (0.75 - 0.25)).abs() < 1e-12 && (got["d2"] - (-0.75 + 0.25)).abs() < 1e-12, "{got:?}");
    }

    #[test]
    fn bad_input_is_refused_with_what_is_wrong() {
        let a = run(&[("q1", &[("d", 1.0)]), ("q2", &[("d", 1.0)])]);
        let b = run(&[("q1", &[("d", 1.0)]), ("q3", &[("d", 1.0)])]);
        let e = fuse(&[&a, &b], Norm::MinMax, &Method::CombSum, None, QuerySet::Same).unwrap_err();
        assert_eq!(e.to_string(), "run 2 and run 1 are over different queries: 1 only in run 1 (q2); 1 only in the other (q3)");
        // The union fuses each query from the runs that have it; the intersection drops q2 and q3.
        let u = fuse(&[&a, &b], Norm::MinMax, &Method::Rrf { k: 60.0 }, None, QuerySet::Union).unwrap();
        assert_eq!(u.keys().collect::<Vec<_>>(), ["q1", "q2", "q3"]);
        assert_eq!(u["q2"], vec![("d".to_owned(), 1.0 / 61.0)]);
        assert_eq!(u["q1"], vec![("d".to_owned(), 2.0 / 61.0)]);
        let i = fuse(&[&a, &b], Norm::MinMax, &Method::CombSum, None, QuerySet::Intersection).unwrap();
        assert_eq!(i.keys().collect::<Vec<_>>(), ["q1"]);
        assert_eq!(missing_queries(&[&a, &b]), vec![(1, 1, vec!["q3".to_owned()]), (2, 1, vec!["q2".to_owned()])]);
        assert_eq!(fuse(&[&a], Norm::MinMax, &Method::CombSum, None, QuerySet::Same).unwrap_err(), FusionError::TooFew(1));
        let e = fuse(&[&a, &a], Norm::MinMax, &Method::WSum { weights: vec![1.0] }, None, QuerySet::Same).unwrap_err();
        assert!(e.to_string().contains("one weight per run"), "{e}");
        assert!("l2".parse::<Norm>().is_err() && Method::parse("borda", None, &[]).is_err());
        // A query no run retrieved anything for fuses to an empty list.
        let empty = run(&[("q", &[])]);
        assert!(fuse(&[&empty, &empty], Norm::MinMax, &Method::Rrf { k: 60.0 }, None, QuerySet::Same).unwrap()["q"].is_empty());
    }
}
