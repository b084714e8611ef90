//! What every stage shares: atomic file writes (a temporary file renamed
//! into place, so an interrupted stage never leaves a half-written output),
//! JSON lines in and out with errors naming file and line, and the seeded
//! RNG whose draws are the same on every machine.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::HostError;

/// One line's bytes as text, a trailing `\r` dropped; the error names the
/// column of the first byte that is not UTF-8.
pub fn utf8_line(mut bytes: Vec<u8>) -> Result<String, String> {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 (invalid byte at column {})", e.utf8_error().valid_up_to() + 1))
}

/// Writes JSON lines atomically (a temporary file renamed into place), so
/// an interrupted stage never leaves a half-written output.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), HostError> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r).map_err(|e| HostError::Json { path: path.to_owned(), line: None, source: e })?;
        buf.push(b'\n');
    }
    write_atomic(path, &buf)
}

/// Writes `v` as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), HostError> {
    let buf = serde_json::to_vec_pretty(v).map_err(|e| HostError::Json { path: path.to_owned(), line: None, source: e })?;
    write_atomic(path, &buf)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HostError> {
    let io = |source| HostError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        crate::util::paths::ensure_dir(dir).map_err(io)?;
    }
    let tmp: PathBuf = path.with_extension(format!("tmp{}", std::process::id()));
    replace_with(path, &tmp, |w| w.write_all(bytes)).map_err(io)
}

/// Writes through `fill` into `tmp` (buffered), then renames `tmp` over
/// `path`. On any failure — a full disk, a write error, a failed rename —
/// `tmp` is removed, so a failed write leaves neither half a file nor a
/// temporary one behind, and `path` keeps what it held before.
pub fn replace_with(path: &Path, tmp: &Path, fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>) -> std::io::Result<()> {
    let result = (|| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        fill(&mut w)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_data()?;
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Reads JSON lines (blank lines skipped); an error names the file and line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, HostError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Io { path: path.to_owned(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| HostError::Json { path: path.to_owned(), line: Some(i + 1), source: e }))
        .collect()
}

/// SplitMix64: small, seedable, the same everywhere.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1), from 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
    /// An index drawn with probability proportional to its weight.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut u = self.uniform() * total;
        for (i, w) in weights.iter().enumerate() {
            u -= w;
            if u < 0.0 {
                return i;
            }
        }
        weights.len() - 1
    }
}
