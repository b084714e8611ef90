//! Test-only plugin: every kind, with switches that make it fail on purpose.
//!
//! - retriever: `[len(text), 1]` per text; the text "panic" panics, "error" errors.
//! - generator: echoes the prompt's last message, numbered per sample.
//! - reward: scores candidates by the dot product under the retriever it is handed.
//! - trainer: writes `output_dir/model.txt`, reports `steps` progress updates,
//!   stops when cancelled.
//! - index: exact inner-product search, saved as little-endian f32.
//! - text-retriever: a document's score is how many of the query's words it
//!   contains; the query "panic" panics, "error" errors, "bad-id" returns
//!   an id past the corpus.

use std::path::Path;

use rir_sdk::*;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Panic inside the constructor.
    pub panic_on_new: bool,
    /// Trainer steps.
    pub steps: u64,
    /// Panic inside `validate`.
    pub panic_on_validate: bool,
    /// A file the generator constructor appends a line to (counts loads).
    pub loads_file: Option<String>,
    /// A model name, unused: `rir run` asks every `[generator]` for one.
    pub model: Option<String>,
}

fn cfg(text: &str) -> PluginResult<ProbeConfig> {
    let c: ProbeConfig = config::parse(text)?;
    if c.panic_on_new {
        panic!("constructor asked to panic");
    }
    Ok(c)
}

pub struct Probe {
    cfg: ProbeConfig,
}

impl Probe {
    pub fn new(text: &str) -> PluginResult<Self> {
        Ok(Self { cfg: cfg(text)? })
    }

    /// `new`, noting the load in `loads_file` if one is named.
    pub fn new_generator(text: &str) -> PluginResult<Self> {
        let p = Self::new(text)?;
        if let Some(f) = &p.cfg.loads_file {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(f)?;
            writeln!(file, "loaded")?;
        }
        Ok(p)
    }
}

impl Retriever for Probe {
    fn info(&self) -> RetrieverInfo {
        RetrieverInfo {
            model: "probe".into(),
            // Reports the host's thread budget so tests can see it arrived.
            fingerprint: format!("probe/threads={}", host().threads),
            corpus_fingerprint: None,
            dim: 2,
            max_length: 8,
            normalized: false,
        }
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        let texts: Vec<String> = texts.iter().map(|t| format!("{}{t}", instruction.unwrap_or(""))).collect();
        self.encode_corpus(&texts)
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        log::info!("probe encoding {} texts", texts.len());
        let mut data = Vec::with_capacity(texts.len() * 2);
        for t in texts {
            match t.as_str() {
                "panic" => panic!("probe was asked to panic"),
                "error" => return Err(PluginError::input("probe was asked to fail")),
                _ => data.extend([t.chars().count() as f32, 1.0]),
            }
        }
        Embeddings::new(texts.len(), 2, data)
    }
}

impl Generator for Probe {
    fn model_name(&self) -> String {
        "probe-echo".into()
    }
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        Ok(requests
            .iter()
            .map(|r| {
                let last = match &r.prompt {
                    Prompt::Text(t) => t.clone(),
                    Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
                };
                (0..r.n)
                    .map(|i| Completion::text(format!("{last} #{i}"), "stop"))
                    .collect()
            })
            .collect())
    }
}

impl Reward for Probe {
    fn score(&self, ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        let r = ctx.retriever.ok_or_else(|| PluginError::input("the probe reward needs a retriever"))?;
        items
            .iter()
            .map(|it| {
                let q = r.encode_queries(std::slice::from_ref(&it.query), None)?;
                let c = r.encode_corpus(&it.candidates)?;
                let scores = (0..c.rows).map(|i| dot(q.row(0), c.row(i)) as f64).collect();
                Ok(RewardScores { scores, ..Default::default() })
            })
            .collect()
    }
}

impl Trainer for Probe {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        let mut loss = Vec::new();
        for step in 1..=self.cfg.steps {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            let l = 1.0 / step as f64;
            loss.push(l);
            progress.report(&Progress { stage: "train".into(), done: step, total: self.cfg.steps, loss: Some(l), message: String::new() });
        }
        std::fs::create_dir_all(&job.output_dir)?;
        std::fs::write(job.output_dir.join("model.txt"), format!("trained from {}", job.base_model))?;
        // What crossed the boundary besides the base (the host's tests read it).
        let extra = serde_json::json!({ "passage_vectors": job.passage_vectors }).to_string();
        Ok(TrainReport { model_dir: job.output_dir.clone(), steps: self.cfg.steps, seconds: 0.0, loss, extra_json: extra })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub struct FlatIndex {
    dim: usize,
    data: Vec<f32>,
}

impl FlatIndex {
    pub fn new(text: &str, dim: usize) -> PluginResult<Self> {
        cfg(text)?;
        Ok(Self { dim, data: Vec::new() })
    }
}

impl Index for FlatIndex {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    fn add(&mut self, v: &Embeddings) -> PluginResult<()> {
        if v.dim != self.dim {
            return Err(PluginError::input(format!("index has dim {}, vectors have {}", self.dim, v.dim)));
        }
        self.data.extend_from_slice(&v.data);
        Ok(())
    }
    fn search(&self, q: &Embeddings, k: usize) -> PluginResult<Hits> {
        let mut hits = Hits { queries: q.rows, k, ids: vec![-1; q.rows * k], scores: vec![f32::NEG_INFINITY; q.rows * k] };
        for i in 0..q.rows {
            let mut s: Vec<(f32, i64)> =
                self.data.chunks(self.dim).enumerate().map(|(j, d)| (dot(q.row(i), d), j as i64)).collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (slot, (score, id)) in s.into_iter().take(k).enumerate() {
                hits.ids[i * k + slot] = id;
                hits.scores[i * k + slot] = score;
            }
        }
        Ok(hits)
    }
    fn save(&self, path: &Path) -> PluginResult<()> {
        let bytes: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(std::fs::write(path, bytes)?)
    }
    fn load(&mut self, path: &Path) -> PluginResult<()> {
        let bytes = std::fs::read(path)?;
        self.data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(())
    }
}

/// Whitespace words, scored by overlap; the index is the texts in one file.
pub struct WordOverlap {
    docs: Vec<String>,
}

impl WordOverlap {
    pub fn new(text: &str) -> PluginResult<Self> {
        cfg(text)?;
        Ok(Self { docs: Vec::new() })
    }
}

impl TextRetriever for WordOverlap {
    fn info(&self) -> TextRetrieverInfo {
        TextRetrieverInfo { model: "probe word overlap".into(), fingerprint: "probe-overlap-v1".into() }
    }
    fn build(&mut self, dir: &Path, texts: &[String], progress: &dyn ProgressSink) -> PluginResult<()> {
        std::fs::write(dir.join("docs.json"), serde_json::to_vec(texts).map_err(|e| PluginError::Other(e.to_string()))?)?;
        progress.report(&Progress { stage: "index".into(), done: texts.len() as u64, total: texts.len() as u64, loss: None, message: String::new() });
        self.docs = texts.to_vec();
        Ok(())
    }
    fn open(&mut self, dir: &Path) -> PluginResult<()> {
        self.docs = serde_json::from_slice(&std::fs::read(dir.join("docs.json"))?).map_err(|e| PluginError::Other(e.to_string()))?;
        Ok(())
    }
    fn len(&self) -> usize {
        self.docs.len()
    }
    fn search(&self, queries: &[String], k: usize) -> PluginResult<Hits> {
        let mut hits = Hits { queries: queries.len(), k, ids: vec![-1; queries.len() * k], scores: vec![f32::NEG_INFINITY; queries.len() * k] };
        for (i, q) in queries.iter().enumerate() {
            match q.as_str() {
                "panic" => panic!("probe text retriever was asked to panic"),
                "error" => return Err(PluginError::input("probe text retriever was asked to fail")),
                "bad-id" if k > 0 => {
                    hits.ids[i * k] = self.docs.len() as i64;
                    hits.scores[i * k] = 1.0;
                    continue;
                }
                _ => {}
            }
            let words: Vec<&str> = q.split_whitespace().collect();
            let mut s: Vec<(f32, i64)> = self
                .docs
                .iter()
                .enumerate()
                .map(|(j, d)| (d.split_whitespace().filter(|w| words.contains(w)).count() as f32, j as i64))
                .filter(|(s, _)| *s > 0.0)
                .collect();
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
    name: "probe",
    description: "Test plugin: every kind, failing on request",
    retriever: Probe::new,
    generator: Probe::new_generator,
    reward: Probe::new,
    trainer: Probe::new,
    index: FlatIndex::new,
    text_retriever: WordOverlap::new,
    validate: |_, text| {
        let c: ProbeConfig = config::parse(text)?;
        if c.panic_on_validate {
            panic!("validate asked to panic");
        }
        Ok(())
    },
}
