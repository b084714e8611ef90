//! Running a Trainer plugin: the job in files, progress on a bar, the
//! report written next to the model.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use indicatif::ProgressBar;
use rir_sdk::{Progress, ProgressSink, TrainJob, TrainReport};

use crate::engine::encode::{EmbeddingCache, Side};
use crate::util::progress::bar as progress_bar;
use crate::error::HostError;
use crate::plugins::PluginHost;
use crate::plugins::registry::Kind;

/// A progress bar per stage the trainer reports (kept while the trainer
/// switches between them, e.g. training steps and held-out checks, so each
/// keeps its position and rate); `cancelled` turns true on Ctrl-C when the
/// caller wires it up.
pub struct BarSink {
    bars: Mutex<Vec<(String, ProgressBar)>>,
    /// On a terminal the bars share one `MultiProgress` so that two of them
    /// redraw as two lines instead of overwriting each other.
    multi: Option<indicatif::MultiProgress>,
    /// Set to stop the trainer at its next check (Ctrl-C).
    pub cancel: AtomicBool,
}

impl BarSink {
    /// A sink with no bar shown yet.
    pub fn new() -> Self {
        let multi = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(indicatif::MultiProgress::new);
        BarSink { bars: Mutex::new(Vec::new()), multi, cancel: AtomicBool::new(false) }
    }
}

impl Default for BarSink {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressSink for BarSink {
    fn report(&self, p: &Progress) {
        let Ok(mut bars) = self.bars.lock() else { return };
        let i = match bars.iter().position(|(stage, _)| stage == &p.stage) {
            Some(i) => i,
            None => {
                let bar = progress_bar(p.total as usize, &p.stage, "");
                if p.loss.is_none() && !p.message.is_empty() {
                    // A checkpoint (e.g. held-out checks every N steps): its
                    // position jumps, so a rate and ETA would be nonsense.
                    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len}") {
                        bar.set_style(style.progress_chars("=> "));
                    }
                }
                let bar = match &self.multi {
                    Some(m) => m.add(bar),
                    None => bar,
                };
                bars.push((p.stage.clone(), bar));
                bars.len() - 1
            }
        };
        if let Some((_, bar)) = bars.get(i) {
            bar.set_length(p.total);
            bar.set_position(p.done);
            let loss = p.loss.map(|l| format!("loss {l:.4} ")).unwrap_or_default();
            // "held-out held-out MRR@10 ..." when the message names its stage.
            let msg = p.message.strip_prefix(p.stage.as_str()).map(str::trim_start).unwrap_or(&p.message);
            bar.set_message(format!("{} {loss}{msg}", p.stage));
        }
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Runs `trainer` on `job` and writes `train_report.json` into the output
/// directory.
pub fn run(host: &PluginHost, trainer: &str, trainer_config: &str, job: &TrainJob) -> Result<TrainReport, HostError> {
    let t = host.load(trainer)?.trainer(trainer_config)?;
    let sink = BarSink::new();
    let report = t.train(job, &sink).map_err(|source| HostError::Plugin { plugin: trainer.into(), kind: Kind::Trainer, source })?;
    if let Ok(mut bars) = sink.bars.lock() {
        for (_, b) in bars.drain(..) {
            b.finish();
        }
    }
    let extra: serde_json::Value = serde_json::from_str(&report.extra_json).unwrap_or(serde_json::Value::Null);
    let mut v = serde_json::json!({
        "trainer": trainer, "base_model": job.base_model, "data_file": job.data_file,
        "model_dir": report.model_dir, "steps": report.steps, "seconds": report.seconds,
        "loss": report.loss, "extra": extra,
    });
    // Paths inside the output directory are kept relative to it: `rir run`
    // renames a finished stage's directory, which would leave them stale.
    relative_to(&mut v, &job.output_dir);
    crate::util::files::write_json(&job.output_dir.join("train_report.json"), &v)?;
    // Its curves beside it, as LLaMA-Factory's plot_loss draws them; a
    // plot that fails costs a warning, never the trained model.
    match crate::engine::plots::training_curves(&job.output_dir) {
        Ok(files) if !files.is_empty() => log::info!("training curves: {} files in {}", files.len(), job.output_dir.display()),
        Ok(_) => {}
        Err(e) => log::warn!("training curves not drawn: {e}"),
    }
    Ok(report)
}

/// The file a training step's passage vectors are written to (in the step's
/// directory, removed once the trainer is done).
pub const PASSAGE_VECTORS: &str = "passage_vectors.safetensors";

/// One line of a FlagEmbedding-style data file, as far as its passages go.
#[derive(serde::Deserialize)]
struct Passages {
    #[serde(default)]
    pos: Vec<String>,
    #[serde(default)]
    neg: Vec<String>,
}

/// Writes `retriever`'s corpus vectors of every distinct passage (`pos` and
/// `neg`) of the data file `data` to `path` (`rir_models::vectors`'s
/// format), taking them from `cache` where it has them and encoding the
/// rest (`batch` texts a call). These are the vectors the retriever's index
/// holds, which a trainer with a frozen passage tower trains against.
pub fn write_passage_vectors(retriever: &dyn rir_sdk::Retriever, cache: Option<&EmbeddingCache>, data: &Path, batch: usize, path: &Path) -> Result<usize, HostError> {
    let text = std::fs::read_to_string(data).map_err(|source| HostError::Io { path: data.to_owned(), source })?;
    let mut seen = std::collections::HashSet::new();
    let mut texts = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: Passages = serde_json::from_str(l).map_err(|source| HostError::Json { path: data.to_owned(), line: Some(i + 1), source })?;
        for t in p.pos.into_iter().chain(p.neg) {
            if seen.insert(t.clone()) {
                texts.push(t);
            }
        }
    }
    let step = || format!("passage vectors of {}", data.display());
    let (e, stats) = crate::engine::encode::encode(retriever, Side::Corpus, &texts, cache, batch, "passages").map_err(|e| HostError::step(step(), e))?;
    log::info!("passage vectors for the trainer: {} passages, {} from the embedding cache, {} encoded ({:.1} s)", stats.texts, stats.from_cache, stats.encoded, stats.seconds);
    rir_models::vectors::PassageVectors::new(&texts, e.dim, e.data).write(path).map_err(|e| HostError::step(step(), e))?;
    Ok(texts.len())
}

/// Where a training job's passage vectors come from: `retriever`'s corpus
/// side (through `cache` where given), `batch` texts a call.
pub struct IndexVectors<'a> {
    /// The retriever whose index the trained query tower will search.
    pub retriever: &'a dyn rir_sdk::Retriever,
    /// Its embedding cache (None: every passage encoded now).
    pub cache: Option<&'a EmbeddingCache>,
    /// Texts per encode call for passages the cache lacks.
    pub batch: usize,
}

/// [`run`], with the job carrying `index`'s vectors of its data's passages
/// when given: written into `dir` (made if missing) first
/// ([`write_passage_vectors`]) and removed once the trainer is done (they
/// are derived, and as large as the data's passages).
pub fn run_with_index(host: &PluginHost, trainer: &str, trainer_config: &str, job: TrainJob, index: Option<IndexVectors<'_>>, dir: &Path) -> Result<TrainReport, HostError> {
    let Some(ix) = index else { return run(host, trainer, trainer_config, &job) };
    std::fs::create_dir_all(dir).map_err(|source| HostError::Io { path: dir.to_owned(), source })?;
    let path = dir.join(PASSAGE_VECTORS);
    write_passage_vectors(ix.retriever, ix.cache, &job.data_file, ix.batch, &path)?;
    let report = run(host, trainer, trainer_config, &TrainJob { passage_vectors: Some(path.clone()), ..job });
    let _ = std::fs::remove_file(&path);
    report
}

fn relative_to(v: &mut serde_json::Value, dir: &Path) {
    match v {
        serde_json::Value::String(s) => {
            if let Ok(rel) = Path::new(s.as_str()).strip_prefix(dir) {
                *s = rel.display().to_string();
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| relative_to(x, dir)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| relative_to(x, dir)),
        _ => {}
    }
}
