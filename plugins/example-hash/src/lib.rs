//! Example rir plugin: a feature-hashing bag-of-words retriever.
//!
//! Each lower-cased alphanumeric token is hashed (FNV-1a) into one of `dim`
//! buckets with a hash-derived sign, weighted by sublinear term frequency
//! (1 + ln tf), and the vector is L2-normalised. It is a real (if weak) lexical
//! retriever with no model files, which makes it a good template: copy this
//! crate, replace `encode`, keep the rest.
//!
//! It also shows the text-retriever kind (`HashText`): the same vectors,
//! but the plugin indexes the corpus itself (a file in the directory the
//! host gives it) and answers query texts, as BM25-like plugins do.

use std::collections::HashMap;

use std::path::Path;

use rir_sdk::{config, Embeddings, Hits, PluginError, PluginResult, ProgressSink, Retriever, RetrieverInfo, TextRetriever, TextRetrieverInfo};
use serde::Deserialize;

/// The plugin's config table (from an experiment TOML). Unknown keys are
/// refused so that a typo is an error, not a silently ignored setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashConfig {
    /// Number of hash buckets (the embedding dimension).
    pub dim: usize,
    /// Tokens beyond this many are ignored (the retriever's max_length).
    pub max_length: usize,
    /// Prepended to every query unless the caller passes its own instruction.
    pub query_instruction: String,
}

impl Default for HashConfig {
    fn default() -> Self {
        Self { dim: 1024, max_length: 512, query_instruction: String::new() }
    }
}

pub struct HashRetriever {
    cfg: HashConfig,
}

impl HashRetriever {
    /// The constructor the host calls with the config table as TOML text.
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg: HashConfig = config::parse(config_toml)?;
        if cfg.dim == 0 {
            return Err(PluginError::config("dim must be at least 1"));
        }
        rir_sdk::log::debug!("hash retriever with dim {}", cfg.dim);
        Ok(Self { cfg })
    }

    fn encode(&self, texts: &[String], prefix: &str) -> PluginResult<Embeddings> {
        let dim = self.cfg.dim;
        let mut data = vec![0f32; texts.len() * dim];
        for (row, text) in data.chunks_mut(dim).zip(texts) {
            let mut tf: HashMap<u64, u32> = HashMap::new();
            let joined = format!("{prefix}{text}");
            let tokens = joined
                .split(|c: char| !c.is_alphanumeric())
                .filter(|t| !t.is_empty())
                .take(self.cfg.max_length);
            for tok in tokens {
                *tf.entry(fnv1a(&tok.to_lowercase())).or_default() += 1;
            }
            for (h, n) in tf {
                let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
                row[(h % dim as u64) as usize] += sign * (1.0 + (n as f32).ln());
            }
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Embeddings::new(texts.len(), dim, data)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Retriever for HashRetriever {
    fn info(&self) -> RetrieverInfo {
        RetrieverInfo {
            model: "feature-hashing bag of words".into(),
            fingerprint: format!("example-hash/v1/dim={}/max={}", self.cfg.dim, self.cfg.max_length),
            corpus_fingerprint: None,
            dim: self.cfg.dim,
            max_length: self.cfg.max_length,
            normalized: true,
        }
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        self.encode(texts, instruction.unwrap_or(&self.cfg.query_instruction))
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        self.encode(texts, "")
    }
}

/// The text-retriever kind: the corpus's hashed vectors kept in
/// `DIR/vectors.f32`, searched exhaustively by inner product.
pub struct HashText {
    enc: HashRetriever,
    docs: Option<Embeddings>,
}

impl HashText {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        Ok(Self { enc: HashRetriever::new(config_toml)?, docs: None })
    }
}

impl TextRetriever for HashText {
    fn info(&self) -> TextRetrieverInfo {
        // The fingerprint names everything that changes the index's contents.
        let i = self.enc.info();
        TextRetrieverInfo { model: i.model, fingerprint: format!("{}/text-v1", i.fingerprint) }
    }
    fn build(&mut self, dir: &Path, texts: &[String], progress: &dyn ProgressSink) -> PluginResult<()> {
        let docs = self.enc.encode_corpus(texts)?;
        let bytes: Vec<u8> = docs.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(dir.join("vectors.f32"), bytes)?;
        let n = texts.len() as u64;
        progress.report(&rir_sdk::Progress { stage: "index".into(), done: n, total: n, loss: None, message: String::new() });
        self.docs = Some(docs);
        Ok(())
    }
    fn open(&mut self, dir: &Path) -> PluginResult<()> {
        let path = dir.join("vectors.f32");
        let bytes = std::fs::read(&path)?;
        let dim = self.enc.cfg.dim;
        if bytes.len() % (4 * dim) != 0 {
            return Err(PluginError::input(format!("{}: {} bytes is not a whole number of {dim}-d vectors", path.display(), bytes.len())));
        }
        let data: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        self.docs = Some(Embeddings::new(data.len() / dim, dim, data)?);
        Ok(())
    }
    fn len(&self) -> usize {
        self.docs.as_ref().map_or(0, |d| d.rows)
    }
    fn search(&self, queries: &[String], k: usize) -> PluginResult<Hits> {
        let docs = self.docs.as_ref().ok_or_else(|| PluginError::input("search before build or open"))?;
        let q = self.enc.encode_queries(queries, None)?;
        let mut hits = Hits { queries: q.rows, k, ids: vec![-1; q.rows * k], scores: vec![f32::NEG_INFINITY; q.rows * k] };
        for i in 0..q.rows {
            let mut s: Vec<(f32, i64)> = (0..docs.rows).map(|j| (q.row(i).iter().zip(docs.row(j)).map(|(a, b)| a * b).sum(), j as i64)).collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (slot, (score, id)) in s.into_iter().take(k).enumerate() {
                hits.ids[i * k + slot] = id;
                hits.scores[i * k + slot] = score;
            }
        }
        Ok(hits)
    }
}

rir_sdk::export_plugin! {
    name: "example-hash",
    description: "Feature-hashing bag-of-words retriever (example plugin)",
    retriever: HashRetriever::new,
    text_retriever: HashText::new,
    // Refuses a typo before the host starts work; nothing is loaded.
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Retriever | rir_sdk::ConfigOf::TextRetriever => rir_sdk::config::check::<HashConfig>(text),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_words_score_higher() {
        let r = HashRetriever::new("dim = 256").unwrap();
        let q = r.encode_queries(&["protein folding".into()], None).unwrap();
        let d = r.encode_corpus(&["How proteins fold: protein folding kinetics".into(), "Tax law in Norway".into()]).unwrap();
        let dot = |i: usize| q.row(0).iter().zip(d.row(i)).map(|(a, b)| a * b).sum::<f32>();
        assert!(dot(0) > 0.3 && dot(1).abs() < 0.2, "{} {}", dot(0), dot(1));
    }

    #[test]
    fn the_text_kind_ranks_as_the_vectors_do_and_reopens_its_index() {
        let docs: Vec<String> = ["protein folding kinetics", "tax law", "folding chairs"].iter().map(|s| s.to_string()).collect();
        let dir = std::env::temp_dir().join(format!("example-hash-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut t = HashText::new("dim = 256").unwrap();
        t.build(&dir, &docs, &rir_sdk::NoProgress).unwrap();
        let mut reopened = HashText::new("dim = 256").unwrap();
        reopened.open(&dir).unwrap();
        let h = reopened.search(&["protein folding".into()], 2).unwrap();
        assert_eq!(h.ids, vec![0, 2]);
        assert_eq!(h, t.search(&["protein folding".into()], 2).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let e = HashRetriever::new("dimm = 3").err().unwrap().to_string();
        assert!(e.contains("dimm"), "{e}");
    }
}
