//! Encoding texts with a Retriever plugin, through an embedding cache keyed
//! by the model fingerprint and a hash of each text (and, for queries, the
//! instruction). A second run over the same texts encodes nothing; a run that
//! dies mid-way keeps every batch it finished.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rir_sdk::{Embeddings, PluginError, Retriever};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What encoding through the cache can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A cache file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The retriever plugin failed.
    #[error("retriever: {0}")]
    Plugin(#[from] PluginError),
    /// The retriever returned embeddings of the wrong shape.
    #[error("retriever returned {got} rows of dimension {dim} for {want} texts (its info says dimension {info_dim})")]
    Shape {
        /// Rows returned.
        got: usize,
        /// Their dimension.
        dim: usize,
        /// Rows asked for (one per text).
        want: usize,
        /// The dimension the retriever's info claims.
        info_dim: usize,
    },
}

/// Which encoder side, and for queries the instruction in force.
#[derive(Debug, Clone, PartialEq)]
pub enum Side<'a> {
    /// The query side, with the instruction in force (`None`: the retriever's own).
    Query(Option<&'a str>),
    /// The corpus side.
    Corpus,
}

impl Side<'_> {
    fn tag(&self) -> String {
        match self {
            Side::Query(i) => format!("q\u{1}{}", i.unwrap_or("\u{2}")),
            Side::Corpus => "c".into(),
        }
    }
    fn file(&self) -> &'static str {
        match self {
            Side::Query(_) => "queries.bin",
            Side::Corpus => "corpus.bin",
        }
    }
}

type Key = [u8; 16];

fn key(side_tag: &str, text: &str) -> Key {
    let mut h = Sha256::new();
    h.update(side_tag.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// On-disk cache for one encoder: append-only files of (16-byte key, dim
/// f32) records, one directory per fingerprint; a torn last record is ignored
/// on load.
pub struct EmbeddingCache {
    query_dir: PathBuf,
    /// The corpus side's: another directory when the encoder's corpus side has
    /// its own fingerprint (a query tower trained over the base's frozen
    /// passage tower reads the base's corpus embeddings).
    corpus_dir: PathBuf,
}

fn fingerprint_dir(cache_root: &Path, fingerprint: &str) -> PathBuf {
    let h = format!("{:x}", Sha256::digest(fingerprint.as_bytes()));
    cache_root.join("embeddings").join(&h[..24])
}

impl EmbeddingCache {
    /// The cache of the encoder `info` describes, under `cache_root/embeddings`.
    pub fn new(cache_root: &Path, info: &rir_sdk::RetrieverInfo) -> Self {
        Self { query_dir: fingerprint_dir(cache_root, &info.fingerprint), corpus_dir: fingerprint_dir(cache_root, info.corpus_fingerprint()) }
    }

    fn dir(&self, side: &Side<'_>) -> &Path {
        match side {
            Side::Query(_) => &self.query_dir,
            Side::Corpus => &self.corpus_dir,
        }
    }

    fn load(&self, side: &Side<'_>, dim: usize) -> Result<HashMap<Key, Vec<f32>>, EncodeError> {
        let path = self.dir(side).join(side.file());
        let mut map = HashMap::new();
        let mut bytes = Vec::new();
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(|source| EncodeError::Io { path: path.clone(), source })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
            Err(source) => return Err(EncodeError::Io { path, source }),
        }
        let rec = 16 + 4 * dim;
        for r in bytes.chunks_exact(rec) {
            let k: Key = r[..16].try_into().expect("16 bytes");
            let v = r[16..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            map.insert(k, v);
        }
        Ok(map)
    }

    fn append(&self, side: &Side<'_>, records: &[(Key, &[f32])]) -> Result<(), EncodeError> {
        let dir = self.dir(side);
        let path = dir.join(side.file());
        let err = |source| EncodeError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut buf = Vec::with_capacity(records.iter().map(|r| 16 + 4 * r.1.len()).sum());
        for (k, v) in records {
            buf.extend_from_slice(k);
            for x in *v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(err)?;
        // One write per batch: a crash can tear at most the last record.
        f.write_all(&buf).map_err(err)?;
        f.flush().map_err(err)
    }
}

/// What an encode call did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EncodeStats {
    /// Texts asked for.
    pub texts: usize,
    /// Of those, read from the cache.
    pub from_cache: usize,
    /// Of those, encoded now.
    pub encoded: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Encodes `texts` on `side`, reusing and filling `cache`.
pub fn encode(
    retriever: &dyn Retriever,
    side: Side<'_>,
    texts: &[String],
    cache: Option<&EmbeddingCache>,
    batch: usize,
    label: &str,
) -> Result<(Embeddings, EncodeStats), EncodeError> {
    let start = Instant::now();
    let dim = retriever.info().dim;
    let tag = side.tag();
    let keys: Vec<Key> = texts.iter().map(|t| key(&tag, t)).collect();
    let cached = match cache {
        Some(c) => c.load(&side, dim)?,
        None => HashMap::new(),
    };
    let mut out = vec![0f32; texts.len() * dim];
    let mut todo = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match cached.get(k) {
            Some(v) => out[i * dim..(i + 1) * dim].copy_from_slice(v),
            None => todo.push(i),
        }
    }
    let from_cache = texts.len() - todo.len();
    // Longest first: batches of similar length waste little on padding, and
    // the progress bar's ETA is pessimistic rather than optimistic.
    todo.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));

    let bar = crate::util::progress::bar(todo.len(), label, "texts");
    for chunk in todo.chunks(batch.max(1)) {
        let batch_texts: Vec<String> = chunk.iter().map(|&i| texts[i].clone()).collect();
        let e = match &side {
            Side::Query(instr) => retriever.encode_queries(&batch_texts, *instr)?,
            Side::Corpus => retriever.encode_corpus(&batch_texts)?,
        };
        if e.rows != chunk.len() || e.dim != dim {
            return Err(EncodeError::Shape { got: e.rows, dim: e.dim, want: chunk.len(), info_dim: dim });
        }
        let mut records = Vec::with_capacity(chunk.len());
        for (r, &i) in chunk.iter().enumerate() {
            out[i * dim..(i + 1) * dim].copy_from_slice(e.row(r));
            records.push((keys[i], e.row(r)));
        }
        if let Some(c) = cache {
            c.append(&side, &records)?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let stats = EncodeStats { texts: texts.len(), from_cache, encoded: todo.len(), seconds: start.elapsed().as_secs_f64() };
    Ok((Embeddings::new(texts.len(), dim, out)?, stats))
}

/// Reinforced-IR's inference mix (DESIGN §1.4): `w·e_query + (1−w)·e_corpus(aug)`,
/// no renormalisation.
pub fn mix(query: &Embeddings, augmentation: &Embeddings, query_weight: f32) -> Embeddings {
    assert_eq!((query.rows, query.dim), (augmentation.rows, augmentation.dim));
    let data = query
        .data
        .iter()
        .zip(&augmentation.data)
        .map(|(q, a)| query_weight * q + (1.0 - query_weight) * a)
        .collect();
    Embeddings { rows: query.rows, dim: query.dim, data }
}
