//! TREC run files: `qid Q0 docid rank score tag`, one result per line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::engine::metrics::{trec_order, Run};

/// A run file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    /// A line that is not `qid Q0 docid rank score tag`.
    #[error("{}:{line}: {reason}", path.display())]
    Malformed {
        /// The run file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// Writes `run` in trec order with ranks from 1; written to a temporary file
/// and renamed, so a crash never leaves a truncated run behind.
pub fn write(path: &Path, run: &Run, tag: &str) -> Result<(), RunFileError> {
    let err = |source| RunFileError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("trec.partial");
    crate::util::files::replace_with(path, &tmp, |w| {
        for (qid, results) in run {
            let mut r = results.clone();
            trec_order(&mut r);
            for (i, (doc, score)) in r.iter().enumerate() {
                writeln!(w, "{qid} Q0 {doc} {} {score} {tag}", i + 1)?;
            }
        }
        Ok(())
    })
    .map_err(err)
}

/// Reads a run file. Whitespace-separated, six columns; the rank column is
/// read but, as in trec_eval, ordering comes from the scores.
pub fn read(path: &Path) -> Result<Run, RunFileError> {
    let f = std::fs::File::open(path).map_err(|source| RunFileError::Io { path: path.to_owned(), source })?;
    let mut run = Run::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| RunFileError::Io { path: path.to_owned(), source })?;
        let bad = |reason: String| RunFileError::Malformed { path: path.to_owned(), line: i + 1, reason };
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 6 {
            return Err(bad(format!("expected 6 columns (qid Q0 docid rank score tag), found {}", cols.len())));
        }
        cols[3].parse::<i64>().map_err(|_| bad(format!("rank {:?} is not an integer", cols[3])))?;
        let score: f64 = cols[4].parse().map_err(|_| bad(format!("score {:?} is not a number", cols[4])))?;
        if !score.is_finite() {
            return Err(bad(format!("score {:?} is not finite", cols[4])));
        }
        if !seen.insert((cols[0].to_owned(), cols[2].to_owned())) {
            return Err(bad(format!("document {} appears twice for query {}", cols[2], cols[0])));
        }
        run.entry(cols[0].to_owned()).or_default().push((cols[2].to_owned(), score));
    }
    Ok(run)
}
