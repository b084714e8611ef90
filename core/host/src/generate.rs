//! Calling a Generator plugin through a cache of completions, keyed by the
//! plugin, its config, the model name and the full request. Only successful
//! batches are written, so a failure never caches a partial result.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use rir_sdk::{Completion, GenerationRequest, Generator, PluginError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("generator: {0}")]
    Plugin(#[from] PluginError),
}

#[derive(Serialize, Deserialize)]
struct Record {
    key: String,
    completions: Vec<Completion>,
}

pub struct GenerationCache {
    path: PathBuf,
    identity: String,
}

impl GenerationCache {
    /// `identity`: the plugin name, its config text and the model name.
    pub fn new(cache_root: &Path, identity: &str) -> Self {
        let h = format!("{:x}", Sha256::digest(identity.as_bytes()));
        Self { path: cache_root.join("generations").join(format!("{}.jsonl", &h[..24])), identity: identity.into() }
    }

    /// The cache of one generator in use: its plugin, config text and model
    /// name (which carries a fingerprint of the model's files where the
    /// plugin provides one) — every caller keys it the same way.
    pub fn for_generator(cache_root: &Path, plugin: &str, config: &str, generator: &dyn Generator) -> Self {
        Self::new(cache_root, &format!("{plugin}\n{config}\n{}", generator.model_name()))
    }

    fn key(&self, r: &GenerationRequest) -> String {
        let mut h = Sha256::new();
        h.update(self.identity.as_bytes());
        h.update(serde_json::to_vec(r).expect("serialisable"));
        format!("{:x}", h.finalize())
    }

    fn load(&self) -> HashMap<String, Vec<Completion>> {
        let mut map = HashMap::new();
        if let Ok(f) = std::fs::File::open(&self.path) {
            // A torn last line (a crash mid-write) fails to parse and is skipped.
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(r) = serde_json::from_str::<Record>(&line) {
                    map.insert(r.key, r.completions);
                }
            }
        }
        map
    }

    fn append(&self, records: &[Record]) -> Result<(), GenerateError> {
        let err = |source| GenerateError::Io { path: self.path.clone(), source };
        std::fs::create_dir_all(self.path.parent().expect("has parent")).map_err(err)?;
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).expect("serialisable");
            buf.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(err)?;
        f.write_all(&buf).map_err(err)
    }
}

/// Runs every request (in batches of `batch`), answering from the cache where it can.
pub fn generate_all(
    generator: &dyn Generator,
    requests: &[GenerationRequest],
    cache: Option<&GenerationCache>,
    batch: usize,
    label: &str,
) -> Result<(Vec<Vec<Completion>>, usize), GenerateError> {
    let cached = cache.map(GenerationCache::load).unwrap_or_default();
    let keys: Vec<String> = requests.iter().map(|r| cache.map(|c| c.key(r)).unwrap_or_default()).collect();
    let mut out: Vec<Option<Vec<Completion>>> = keys.iter().map(|k| cached.get(k).cloned()).collect();
    let todo: Vec<usize> = (0..requests.len()).filter(|&i| out[i].is_none()).collect();
    let bar = crate::progress::bar(todo.len(), label, "prompts");
    for chunk in todo.chunks(batch.max(1)) {
        let reqs: Vec<GenerationRequest> = chunk.iter().map(|&i| requests[i].clone()).collect();
        let got = generator.generate(&reqs)?;
        if let Some(c) = cache {
            let recs: Vec<Record> =
                chunk.iter().zip(&got).map(|(&i, g)| Record { key: keys[i].clone(), completions: g.clone() }).collect();
            c.append(&recs)?;
        }
        for (&i, g) in chunk.iter().zip(got) {
            out[i] = Some(g);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((out.into_iter().map(|o| o.expect("filled")).collect(), requests.len() - todo.len()))
}
