//! Passage vectors handed to a trainer (`rir_sdk::TrainJob::passage_vectors`):
//! one safetensors file with `embeddings` (F32, rows × dim) and `sha256` (U8,
//! rows × 32, the SHA-256 of each passage's UTF-8 text). Rows are found by
//! their text's hash, so the file does not depend on the order of the data
//! and stays small (32 bytes a passage beside its vector) at any scale;
//! Python reads it with `safetensors.numpy.load_file`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum VectorsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
}

/// The SHA-256 a passage's row is found by.
pub fn text_key(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Passage vectors, by their text's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct PassageVectors {
    pub dim: usize,
    /// Row-major, `rows() × dim`.
    pub data: Vec<f32>,
    index: HashMap<[u8; 32], usize>,
}

impl PassageVectors {
    /// `texts[i]`'s vector is `data[i*dim..(i+1)*dim]`; a repeated text keeps
    /// its first row.
    pub fn new(texts: &[String], dim: usize, data: Vec<f32>) -> Self {
        assert_eq!(texts.len() * dim, data.len(), "one row of `dim` values per text");
        let mut index = HashMap::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            index.entry(text_key(t)).or_insert(i);
        }
        Self { dim, data, index }
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// The vector of `text`, if the file has it.
    pub fn get(&self, text: &str) -> Option<&[f32]> {
        self.index.get(&text_key(text)).map(|&i| &self.data[i * self.dim..(i + 1) * self.dim])
    }

    /// Writes the file (its distinct rows only).
    pub fn write(&self, path: &Path) -> Result<(), VectorsError> {
        let mut rows: Vec<(&[u8; 32], usize)> = self.index.iter().map(|(k, &i)| (k, i)).collect();
        rows.sort_by_key(|&(_, i)| i);
        let keys: Vec<u8> = rows.iter().flat_map(|(k, _)| k.iter().copied()).collect();
        let emb: Vec<u8> = rows.iter().flat_map(|&(_, i)| self.data[i * self.dim..(i + 1) * self.dim].iter().flat_map(|x| x.to_le_bytes())).collect();
        let format = |reason: String| VectorsError::Format { path: path.to_owned(), reason };
        let tensors = [
            ("embeddings", TensorView::new(Dtype::F32, vec![rows.len(), self.dim], &emb).map_err(|e| format(e.to_string()))?),
            ("sha256", TensorView::new(Dtype::U8, vec![rows.len(), 32], &keys).map_err(|e| format(e.to_string()))?),
        ];
        safetensors::serialize_to_file(tensors, None, path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => VectorsError::Io { path: path.to_owned(), source },
            e => format(e.to_string()),
        })
    }

    /// Reads a file [`PassageVectors::write`] (or Python) wrote.
    pub fn read(path: &Path) -> Result<Self, VectorsError> {
        let bytes = std::fs::read(path).map_err(|source| VectorsError::Io { path: path.to_owned(), source })?;
        let format = |reason: String| VectorsError::Format { path: path.to_owned(), reason };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format(format!("not a safetensors file: {e}")))?;
        let emb = st.tensor("embeddings").map_err(|e| format(format!("`embeddings`: {e}")))?;
        let keys = st.tensor("sha256").map_err(|e| format(format!("`sha256`: {e}")))?;
        let (&[rows, dim], &[krows, 32]) = (emb.shape(), keys.shape()) else {
            return Err(format(format!("want `embeddings` [rows, dim] and `sha256` [rows, 32], found {:?} and {:?}", emb.shape(), keys.shape())));
        };
        if emb.dtype() != Dtype::F32 || keys.dtype() != Dtype::U8 || rows != krows {
            return Err(format(format!(
                "want `embeddings` F32 and `sha256` U8 with one row per passage, found {:?} {:?} and {:?} {:?}",
                emb.dtype(),
                emb.shape(),
                keys.dtype(),
                keys.shape()
            )));
        }
        let data: Vec<f32> = emb.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut index = HashMap::with_capacity(rows);
        for (i, k) in keys.data().chunks_exact(32).enumerate() {
            index.entry(k.try_into().expect("32 bytes")).or_insert(i);
        }
        Ok(Self { dim, data, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_the_same_bits_by_text() {
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = ["a passage", "another", "a passage", "ünïcode"].iter().map(|s| s.to_string()).collect();
        // Values whose bits a decimal round trip could change.
        let data: Vec<f32> = (0..8).map(|i| f32::from_bits(0x3DCC_CCCD + i * 7919)).collect();
        let v = PassageVectors::new(&texts, 2, data.clone());
        let path = dir.path().join("v.safetensors");
        v.write(&path).unwrap();
        let r = PassageVectors::read(&path).unwrap();
        assert_eq!(r.rows(), 3, "the repeated text is written once");
        assert_eq!(r.get("a passage").unwrap(), &data[0..2], "the first row of a repeated text");
        assert_eq!(r.get("another").unwrap(), &data[2..4]);
        assert_eq!(r.get("ünïcode").unwrap(), &data[6..8]);
        assert!(r.get("absent").is_none());
    }

    #[test]
    fn a_wrong_file_names_itself_and_what_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = PassageVectors::read(&path).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors") && e.contains("not a safetensors file"), "{e}");
        let only = [("embeddings", TensorView::new(Dtype::F32, vec![1, 1], &[0u8; 4]).unwrap())];
        safetensors::serialize_to_file(only, None, &path).unwrap();
        let e = PassageVectors::read(&path).unwrap_err().to_string();
        assert!(e.contains("`sha256`"), "{e}");
        let e = PassageVectors::read(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
