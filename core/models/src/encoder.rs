//! What every text-encoder plugin needs besides its model: tokenising into
//! length-sorted padded batches, pooling, normalising, reading
//! sentence-transformers' pooling settings, and a fingerprint of the model.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("unknown pooling {0:?} (use cls, mean or last_token)")]
    Pooling(String),
    #[error("{}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

/// How token states become one vector (FlagEmbedding's `pooling_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Cls,
    Mean,
    LastToken,
}

impl FromStr for Pooling {
    type Err = EncoderError;
    fn from_str(s: &str) -> Result<Self, EncoderError> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            "last_token" | "lasttoken" => Ok(Pooling::LastToken),
            _ => Err(EncoderError::Pooling(s.into())),
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::LastToken => "last_token",
        })
    }
}

/// Pooling and normalisation as a sentence-transformers model directory
/// declares them (`1_Pooling/config.json`, `modules.json`), if it does.
pub fn sentence_transformers_defaults(dir: &Path) -> (Option<Pooling>, Option<bool>) {
    let read = |p: PathBuf| std::fs::read(p).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let pooling = read(dir.join("1_Pooling/config.json")).and_then(|v| {
        let on = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        if on("pooling_mode_cls_token") {
            Some(Pooling::Cls)
        } else if on("pooling_mode_mean_tokens") {
            Some(Pooling::Mean)
        } else if on("pooling_mode_lasttoken") {
            Some(Pooling::LastToken)
        } else {
            None
        }
    });
    let normalize = read(dir.join("modules.json")).map(|v| {
        v.as_array().is_some_and(|mods| {
            mods.iter().any(|m| m.get("type").and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Normalize")))
        })
    });
    (pooling, normalize)
}

/// A model directory's `config.json` as `T` (candle's BERT config, for
/// instance); the error names the file and the type it did not fit.
pub fn model_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, String> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: not the config this model reads ({}): {e}", path.display(), std::any::type_name::<T>()))
}

/// `max_seq_length` from a sentence-transformers `sentence_bert_config.json`.
pub fn sentence_transformers_max_length(dir: &Path) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("sentence_bert_config.json")).ok()?).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

/// A padded batch of tokenised texts, rows in `indices` order.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Positions of these rows in the caller's text list.
    pub indices: Vec<usize>,
    pub rows: usize,
    /// Padded length (the longest row).
    pub len: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Real tokens in the batch (for tokens/s).
    pub tokens: usize,
}

/// A tokenizer set up for encoding: no fixed padding, truncation at `max_length`.
pub struct TextBatcher {
    tokenizer: Tokenizer,
    pad_id: u32,
    pub max_length: usize,
}

impl TextBatcher {
    pub fn load(path: &Path, max_length: usize) -> Result<Self, EncoderError> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
        let mut tokenizer = Tokenizer::from_file(&file)
            .map_err(|e| EncoderError::Model { path: file.clone(), reason: format!("cannot read tokenizer: {e}") })?;
        let pad_id = tokenizer.get_padding().map(|p| p.pad_id).unwrap_or(0);
        // Some tokenizer.json files pad to a fixed length (MiniLM's to 128):
        // padding is ours to do, per batch, to the longest row.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EncoderError::Tokenize(e.to_string()))?;
        Ok(Self { tokenizer, pad_id, max_length })
    }

    /// Tokenises `texts` and groups them, longest first, into batches of
    /// `batch_size` padded to their own longest row.
    pub fn batches(&self, texts: &[String], batch_size: usize) -> Result<Vec<Batch>, EncoderError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let enc = self.tokenizer.encode_batch(inputs, true).map_err(|e| EncoderError::Tokenize(e.to_string()))?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(enc[i].get_ids().len()));
        let mut out = Vec::new();
        for chunk in order.chunks(batch_size.max(1)) {
            let len = chunk.iter().map(|&i| enc[i].get_ids().len()).max().unwrap_or(0).max(1);
            let rows = chunk.len();
            let mut b = Batch {
                indices: chunk.to_vec(),
                rows,
                len,
                input_ids: vec![self.pad_id; rows * len],
                attention_mask: vec![0; rows * len],
                type_ids: vec![0; rows * len],
                tokens: 0,
            };
            for (r, &i) in chunk.iter().enumerate() {
                let e = &enc[i];
                let n = e.get_ids().len();
                b.input_ids[r * len..r * len + n].copy_from_slice(e.get_ids());
                b.type_ids[r * len..r * len + n].copy_from_slice(e.get_type_ids());
                b.attention_mask[r * len..r * len + n].iter_mut().for_each(|m| *m = 1);
                b.tokens += n;
            }
            out.push(b);
        }
        Ok(out)
    }
}

/// Pools token states `hidden[rows, len, dim]` into `rows x dim`, honouring the mask.
pub fn pool(hidden: &[f32], b: &Batch, dim: usize, pooling: Pooling) -> Vec<f32> {
    let mut out = vec![0f32; b.rows * dim];
    for r in 0..b.rows {
        let dst = &mut out[r * dim..(r + 1) * dim];
        let state = |t: usize| &hidden[(r * b.len + t) * dim..(r * b.len + t + 1) * dim];
        let mask = &b.attention_mask[r * b.len..(r + 1) * b.len];
        match pooling {
            Pooling::Cls => dst.copy_from_slice(state(0)),
            Pooling::LastToken => {
                let last = mask.iter().rposition(|&m| m == 1).unwrap_or(0);
                dst.copy_from_slice(state(last));
            }
            Pooling::Mean => {
                let mut n = 0f32;
                for (t, &m) in mask.iter().enumerate() {
                    if m == 1 {
                        dst.iter_mut().zip(state(t)).for_each(|(d, s)| *d += s);
                        n += 1.0;
                    }
                }
                dst.iter_mut().for_each(|d| *d /= n.max(1.0));
            }
        }
    }
    out
}

/// Normalises (if asked) a batch's pooled rows and writes each to its place
/// in `out` (rows of the caller's text order).
pub fn scatter_rows(out: &mut [f32], mut pooled: Vec<f32>, b: &Batch, dim: usize, normalize: bool) {
    if normalize {
        l2_normalize(&mut pooled, dim);
    }
    for (r, &i) in b.indices.iter().enumerate() {
        out[i * dim..(i + 1) * dim].copy_from_slice(&pooled[r * dim..(r + 1) * dim]);
    }
}

/// Texts with the query instruction prepended; borrowed unchanged when there is none.
pub fn with_instruction<'a>(texts: &'a [String], instruction: &str) -> std::borrow::Cow<'a, [String]> {
    if instruction.is_empty() {
        std::borrow::Cow::Borrowed(texts)
    } else {
        std::borrow::Cow::Owned(texts.iter().map(|t| format!("{instruction}{t}")).collect())
    }
}

/// L2-normalises each row in place (rows of zeros stay zero).
pub fn l2_normalize(data: &mut [f32], dim: usize) {
    for row in data.chunks_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
}

/// A short fingerprint of model files plus settings: each file's size and a
/// hash of its first and last 4 MiB plus 64 blocks of 64 KiB spread evenly
/// between (whole small files), so it is cheap on multi-gigabyte weights yet
/// changes when a file is replaced or fine-tuning rewrites weights anywhere
/// in it (a merged LoRA leaves the embedding at the head of the file as it was).
pub fn fingerprint(files: &[PathBuf], settings: &str) -> Result<String, EncoderError> {
    use std::io::{Read, Seek, SeekFrom};
    const EDGE: u64 = 4 << 20;
    let mut h = Sha256::new();
    for f in files {
        let io = |e: std::io::Error| EncoderError::Model { path: f.clone(), reason: e.to_string() };
        let mut file = std::fs::File::open(f).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        h.update(size.to_le_bytes());
        let mut buf = Vec::new();
        if size <= 2 * EDGE {
            file.read_to_end(&mut buf).map_err(io)?;
        } else {
            buf.resize(EDGE as usize, 0);
            file.read_exact(&mut buf).map_err(io)?;
            h.update(&buf);
            let mut block = vec![0u8; 64 << 10];
            for i in 1..64u64 {
                file.seek(SeekFrom::Start(size / 64 * i)).map_err(io)?;
                file.read_exact(&mut block).map_err(io)?;
                h.update(&block);
            }
            file.seek(SeekFrom::End(-(EDGE as i64))).map_err(io)?;
            file.read_exact(&mut buf).map_err(io)?;
        }
        h.update(&buf);
    }
    h.update(settings.as_bytes());
    Ok(format!("{:x}", h.finalize())[..16].to_owned())
}

#[cfg(test)]
mod tests {
    /// A change in the middle of a large file (where a merged adapter
    /// rewrites weights) changes the fingerprint; the same bytes do not.
    #[test]
    fn fingerprint_sees_changes_inside_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("model.safetensors");
        let mut bytes = vec![7u8; 40 << 20];
        std::fs::write(&f, &bytes).unwrap();
        let a = super::fingerprint(std::slice::from_ref(&f), "").unwrap();
        assert_eq!(a, super::fingerprint(std::slice::from_ref(&f), "").unwrap());
        // 1 MiB of new weights around the middle.
        bytes[(20 << 20)..(21 << 20)].iter_mut().for_each(|b| *b = 9);
        std::fs::write(&f, &bytes).unwrap();
        assert_ne!(a, super::fingerprint(std::slice::from_ref(&f), "").unwrap());
    }
}
