//! Example rir plugin: a feature-hashing bag-of-words retriever.
//!
//! Each lower-cased alphanumeric token is hashed (FNV-1a) into one of `dim`
//! buckets with a hash-derived sign, weighted by sublinear term frequency
//! (1 + ln tf), and the vector is L2-normalised. It is a real (if weak) lexical
//! retriever with no model files, which makes it a good template: copy this
//! crate, replace `encode`, keep the rest.

use std::collections::HashMap;

use rir_sdk::{config, Embeddings, PluginError, PluginResult, Retriever, RetrieverInfo};
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

rir_sdk::export_plugin! {
    name: "example-hash",
    description: "Feature-hashing bag-of-words retriever (example plugin)",
    retriever: HashRetriever::new,
    // Refuses a typo before the host starts work; nothing is loaded.
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Retriever => rir_sdk::config::check::<HashConfig>(text),
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
    fn unknown_key_is_refused_by_name() {
        let e = HashRetriever::new("dimm = 3").err().unwrap().to_string();
        assert!(e.contains("dimm"), "{e}");
    }
}
