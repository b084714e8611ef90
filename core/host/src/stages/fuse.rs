//! `rir fuse`: run files → one fused run (RRF, CombSUM, CombMNZ, weighted
//! sum; [`crate::engine::fusion`]), evaluated on a dataset's qrels like any
//! run, so `rir table` compares it with the runs it came from.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use crate::engine::fusion::{self, Method, Norm, QuerySet};
use crate::engine::metrics::Run;
use crate::engine::{data, runfile};

use crate::stages::eval::{EvalError, EvalOutput, Judging};

/// What one fusion needs.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// The runs fused, in the order weights refer to.
    pub runs: Vec<PathBuf>,
    /// Score normalisation before combining.
    pub norm: Norm,
    /// How the runs are combined.
    pub method: Method,
    /// The queries fused when the runs' query sets differ.
    pub queries: QuerySet,
    /// Results kept per query.
    pub k: usize,
    /// The dataset that judges the fused run, and where it goes.
    pub judging: Judging,
}

/// Opens the dataset, then [`run_on`] (the options are checked first).
pub fn run(cache_dir: &std::path::Path, o: &FuseOptions) -> Result<EvalOutput, EvalError> {
    check(o)?;
    let ds = o.judging.open(cache_dir)?;
    fuse_on(&ds, o)
}

fn check(o: &FuseOptions) -> Result<(), EvalError> {
    o.judging.check()?;
    crate::stages::eval::check_k(o.k).map_err(EvalError::Invalid)?;
    if o.runs.len() < 2 {
        return Err(EvalError::Invalid(fusion::FusionError::TooFew(o.runs.len()).to_string()));
    }
    fusion::check(&o.method, o.runs.len()).map_err(|e| EvalError::Invalid(e.to_string()))
}

/// Reads the runs, fuses, evaluates on `ds`, writes the run file and results.
pub fn run_on(ds: &data::Dataset, o: &FuseOptions) -> Result<EvalOutput, EvalError> {
    check(o)?;
    fuse_on(ds, o)
}

fn fuse_on(ds: &data::Dataset, o: &FuseOptions) -> Result<EvalOutput, EvalError> {
    let t = Instant::now();
    let runs: Vec<Run> = o.runs.iter().map(|p| runfile::read(p)).collect::<Result<_, _>>()?;
    let refs: Vec<&Run> = runs.iter().collect();
    let missing = fusion::missing_queries(&refs);
    if o.queries != QuerySet::Same {
        for (run, n, first) in &missing {
            log::warn!("{} lacks {n} queries the other runs have ({}{}); fusing the {}", o.runs[run - 1].display(), first.join(", "), if *n > first.len() { ", …" } else { "" },
                if o.queries == QuerySet::Union { "union" } else { "intersection" });
        }
    }
    let fused = fusion::fuse(&refs, o.norm, &o.method, Some(o.k), o.queries).map_err(|e| match e {
        fusion::FusionError::DifferentQueries { run, detail } => {
            EvalError::Invalid(format!("{} and {} are over different queries: {detail}", o.runs[run - 1].display(), o.runs[0].display()))
        }
        e => EvalError::Invalid(e.to_string()),
    })?;
    let timings = [("fuse".to_owned(), t.elapsed().as_secs_f64())].into_iter().collect();
    let config = json!({
        "fusion": {"runs": o.runs, "norm": o.norm, "method": o.method, "queries": o.queries,
                   "missing_queries": missing.iter().map(|(run, n, _)| json!({"run": o.runs[run - 1], "queries": n})).collect::<Vec<_>>()},
        "k": o.k,
        "ignore_identical_ids": o.judging.ignore_identical_ids,
        "dataset": {"dir": ds.dir, "docs": ds.corpus.len(), "queries": ds.queries.len()},
        "experiment": o.judging.experiment,
    });
    o.judging.scoring().write(ds, &fused, timings, config)
}
