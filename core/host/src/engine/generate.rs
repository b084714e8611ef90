//! Calling a Generator plugin through a cache of completions (and of scores
//! of given continuations, in a sibling file), keyed by the plugin, its
//! config, the model name and the full request. Only successful batches are
//! written, so a failure never caches a partial result. [`Cached`] wraps a
//! generator so that what a Reward plugin asks of it goes through the cache
//! too (a rerun after a crash does not redo the teacher's calls).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use rir_sdk::{Completion, GenerationRequest, Generator, PluginError, PluginResult, Prompt, RequestUsage, Score, ScoreRequest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What generating through the cache can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A cache file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The generator plugin failed.
    #[error("generator: {0}")]
    Plugin(#[from] PluginError),
}

/// What generation cost, summed over every call through this module (a
/// stage's share is the difference of two [`ledger`] readings): requests
/// sent and answered from the cache, tokens as the backend counted them,
/// retries and seconds spent waiting for the generator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationUsage {
    /// Requests sent to the generator (a request for n samples counts once).
    pub requests: u64,
    /// Requests answered from the cache (nothing spent).
    pub cached: u64,
    /// Tokens read (prompts; for scoring, prompt and continuation).
    pub prompt_tokens: u64,
    /// Tokens written (every sample's).
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, those the backend took from its prefix cache
    /// (as it reported them; a backend that cannot tell adds none).
    #[serde(default)]
    pub cached_tokens: u64,
    /// Requests whose backend reported no token counts (a server without
    /// `usage`): the token sums leave them out.
    #[serde(default)]
    pub uncounted: u64,
    /// HTTP retries (rate limits, server errors).
    #[serde(default)]
    pub retries: u64,
    /// Wall-clock seconds inside generator calls.
    pub seconds: f64,
}

impl GenerationUsage {
    /// Nothing asked of a generator.
    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.cached == 0
    }

    /// What was spent since `earlier` (a reading of the same ledger).
    pub fn since(&self, earlier: &GenerationUsage) -> GenerationUsage {
        GenerationUsage {
            requests: self.requests - earlier.requests,
            cached: self.cached - earlier.cached,
            prompt_tokens: self.prompt_tokens - earlier.prompt_tokens,
            completion_tokens: self.completion_tokens - earlier.completion_tokens,
            cached_tokens: self.cached_tokens - earlier.cached_tokens,
            uncounted: self.uncounted - earlier.uncounted,
            retries: self.retries - earlier.retries,
            seconds: self.seconds - earlier.seconds,
        }
    }

    /// Adds `other` (summing stages for a total).
    pub fn add(&mut self, o: &GenerationUsage) {
        self.requests += o.requests;
        self.cached += o.cached;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cached_tokens += o.cached_tokens;
        self.uncounted += o.uncounted;
        self.retries += o.retries;
        self.seconds += o.seconds;
    }

    fn record(&mut self, u: Option<RequestUsage>) {
        self.requests += 1;
        match u {
            Some(u) => {
                self.retries += u64::from(u.retries);
                match (u.prompt_tokens, u.completion_tokens) {
                    (Some(p), Some(c)) => {
                        self.prompt_tokens += u64::from(p);
                        self.completion_tokens += u64::from(c);
                        self.cached_tokens += u64::from(u.cached_tokens.unwrap_or(0).min(p));
                    }
                    _ => self.uncounted += 1,
                }
            }
            None => self.uncounted += 1,
        }
    }
}

/// A price per million tokens read and written (a hosted API's), for the
/// cost column of `rir run`'s summary and the dry run's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt (input) tokens.
    pub input: f64,
    /// Per million completion (output) tokens.
    pub output: f64,
    /// Per million prompt tokens the server took from its prompt cache
    /// (OpenAI's "cached input"); `input` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
}

impl Price {
    /// What `prompt` tokens (`cached` of them from the server's prompt
    /// cache) and `completion` tokens cost.
    pub fn cost(&self, prompt: u64, cached: u64, completion: u64) -> f64 {
        let cached = cached.min(prompt);
        let fresh = (prompt - cached) as f64 * self.input;
        (fresh + cached as f64 * self.cached_input.unwrap_or(self.input) + completion as f64 * self.output) / 1e6
    }
}

static LEDGER: std::sync::Mutex<GenerationUsage> = std::sync::Mutex::new(GenerationUsage {
    requests: 0,
    cached: 0,
    prompt_tokens: 0,
    completion_tokens: 0,
    cached_tokens: 0,
    uncounted: 0,
    retries: 0,
    seconds: 0.0,
});

/// The process's generation usage so far.
pub fn ledger() -> GenerationUsage {
    *LEDGER.lock().unwrap_or_else(|e| e.into_inner())
}

/// The usage a generator reported for one answered request.
trait Usage {
    fn usage(&self) -> Option<RequestUsage>;
}
impl Usage for Vec<Completion> {
    fn usage(&self) -> Option<RequestUsage> {
        self.first().and_then(|c| c.usage)
    }
}
impl Usage for Score {
    fn usage(&self) -> Option<RequestUsage> {
        self.usage
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    key: String,
    completions: Vec<Completion>,
}

#[derive(Serialize, Deserialize)]
struct ScoreRecord {
    key: String,
    score: Score,
}

/// Completions and scores kept on disk per generator identity and request, so a rerun does not ask the generator again.
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

    fn score_key(&self, r: &ScoreRequest) -> String {
        let mut h = Sha256::new();
        h.update(self.identity.as_bytes());
        h.update(b"\nscore\n");
        h.update(serde_json::to_vec(r).expect("serialisable"));
        format!("{:x}", h.finalize())
    }

    fn scores_path(&self) -> PathBuf {
        self.path.with_extension("scores.jsonl")
    }

    fn load(&self) -> HashMap<String, Vec<Completion>> {
        read_records::<Record>(&self.path).into_iter().map(|r| (r.key, r.completions)).collect()
    }

    fn load_scores(&self) -> HashMap<String, Score> {
        read_records::<ScoreRecord>(&self.scores_path()).into_iter().map(|r| (r.key, r.score)).collect()
    }

    fn append<T: Serialize>(&self, path: &Path, records: &[T]) -> Result<(), GenerateError> {
        let err = |source| GenerateError::Io { path: path.to_owned(), source };
        std::fs::create_dir_all(path.parent().expect("has parent")).map_err(err)?;
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).expect("serialisable");
            buf.push(b'\n');
        }
        truncate_torn_tail(path).map_err(err)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        f.write_all(&buf).map_err(err)
    }
}

/// A crash mid-write leaves a last line without its newline: cut it off, so
/// the next append starts on a fresh line instead of gluing onto it (which
/// would lose the first new record as well).
fn truncate_torn_tail(path: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).write(true).open(path) else { return Ok(()) };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1))?;
    std::io::Read::read_exact(&mut f, &mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the last newline, reading back in blocks.
    let mut end = len;
    let mut keep = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        std::io::Read::read_exact(&mut f, &mut buf[..n])?;
        if let Some(p) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + p as u64 + 1;
            break;
        }
        end = start;
    }
    log::warn!("{}: dropping a torn last line ({} bytes) left by an interrupted write", path.display(), len - keep);
    f.set_len(keep)
}

/// Every record of a jsonl cache file; a torn last line (a crash mid-write)
/// fails to parse and is skipped.
fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    let Ok(f) = std::fs::File::open(path) else { return Vec::new() };
    BufReader::new(f).lines().map_while(Result::ok).filter_map(|l| serde_json::from_str(&l).ok()).collect()
}

/// Scores every request (in batches of `batch`), from the cache where it can.
pub fn score_all(
    generator: &dyn Generator,
    requests: &[ScoreRequest],
    cache: Option<&GenerationCache>,
    batch: usize,
) -> Result<Vec<Score>, GenerateError> {
    let cached = cache.map(GenerationCache::load_scores).unwrap_or_default();
    score_with(generator, requests, cache, &cached, batch)
}

fn score_with(
    generator: &dyn Generator,
    requests: &[ScoreRequest],
    cache: Option<&GenerationCache>,
    cached: &HashMap<String, Score>,
    batch: usize,
) -> Result<Vec<Score>, GenerateError> {
    let keys: Vec<String> = requests.iter().map(|r| cache.map(|c| c.score_key(r)).unwrap_or_default()).collect();
    let (out, _) = fill(requests, &keys, cached, batch, |reqs| {
        let got = generator.score(reqs)?;
        if got.len() != reqs.len() {
            return Err(GenerateError::Plugin(PluginError::other(format!("generator scored {} of {} requests", got.len(), reqs.len()))));
        }
        Ok(got)
    }, |recs| match cache {
        Some(c) => c.append(&c.scores_path(), &recs.iter().map(|(key, score)| ScoreRecord { key: key.clone(), score: score.clone() }).collect::<Vec<_>>()),
        None => Ok(()),
    }, |_| {})?;
    Ok(out)
}

/// The length of a request's text, to put requests of similar length in
/// one call.
trait TextLen {
    fn text_len(&self) -> usize;
}

fn prompt_len(p: &Prompt) -> usize {
    match p {
        Prompt::Text(t) => t.len(),
        Prompt::Chat(m) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
    }
}

impl TextLen for GenerationRequest {
    fn text_len(&self) -> usize {
        prompt_len(&self.prompt)
    }
}

impl TextLen for ScoreRequest {
    fn text_len(&self) -> usize {
        prompt_len(&self.prompt) + self.continuation.len()
    }
}

/// The shared loop of the cached calls: answers from `cached` where the key
/// is there, the rest through `call` in chunks of `batch`, each chunk's
/// results handed to `write` (the cache file) as soon as they arrive.
/// Chunks hold requests of similar length (sorted by text length, ties in
/// request order): a local generator pads a batch's prompts to the longest
/// and runs a prefix they share once, so mixed lengths waste work (v10's
/// first try: 16 random passages a call, ~30% padding and no shared
/// prefix). Each request's result does not depend on its batch.
/// Returns the results in request order and how many came from the cache.
fn fill<R: Clone + TextLen, O: Clone + Usage>(
    requests: &[R],
    keys: &[String],
    cached: &HashMap<String, O>,
    batch: usize,
    mut call: impl FnMut(&[R]) -> Result<Vec<O>, GenerateError>,
    mut write: impl FnMut(&[(String, O)]) -> Result<(), GenerateError>,
    mut done: impl FnMut(usize),
) -> Result<(Vec<O>, usize), GenerateError> {
    let mut out: Vec<Option<O>> = keys.iter().map(|k| cached.get(k).cloned()).collect();
    let mut todo: Vec<usize> = (0..requests.len()).filter(|&i| out[i].is_none()).collect();
    todo.sort_by_key(|&i| requests[i].text_len());
    LEDGER.lock().unwrap_or_else(|e| e.into_inner()).cached += (requests.len() - todo.len()) as u64;
    for chunk in todo.chunks(batch.max(1)) {
        let reqs: Vec<R> = chunk.iter().map(|&i| requests[i].clone()).collect();
        let t = std::time::Instant::now();
        let got = call(&reqs)?;
        {
            let mut l = LEDGER.lock().unwrap_or_else(|e| e.into_inner());
            l.seconds += t.elapsed().as_secs_f64();
            for o in &got {
                l.record(o.usage());
            }
        }
        let recs: Vec<(String, O)> = chunk.iter().zip(&got).map(|(&i, o)| (keys[i].clone(), o.clone())).collect();
        write(&recs)?;
        for (&i, o) in chunk.iter().zip(got) {
            out[i] = Some(o);
        }
        done(chunk.len());
    }
    Ok((out.into_iter().map(|o| o.expect("filled")).collect(), requests.len() - todo.len()))
}

fn write_completions(cache: Option<&GenerationCache>, recs: &[(String, Vec<Completion>)]) -> Result<(), GenerateError> {
    match cache {
        Some(c) => c.append(&c.path, &recs.iter().map(|(key, completions)| Record { key: key.clone(), completions: completions.clone() }).collect::<Vec<_>>()),
        None => Ok(()),
    }
}

/// A generator whose completions and scores go through a cache: what the
/// host hands a Reward plugin, so the teacher's calls are cached like the
/// stage's own.
pub struct Cached<'a> {
    inner: &'a dyn Generator,
    cache: Option<&'a GenerationCache>,
    /// The cache files, read once on first use and kept up to date.
    memo: std::sync::Mutex<Option<(HashMap<String, Vec<Completion>>, HashMap<String, Score>)>>,
}

impl<'a> Cached<'a> {
    /// `inner`, answering from `cache` (when given) before asking the generator.
    pub fn new(inner: &'a dyn Generator, cache: Option<&'a GenerationCache>) -> Self {
        Self { inner, cache, memo: std::sync::Mutex::new(None) }
    }

    fn with_memo<T>(&self, f: impl FnOnce(&mut (HashMap<String, Vec<Completion>>, HashMap<String, Score>)) -> T) -> T {
        let mut m = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        let memo = m.get_or_insert_with(|| match self.cache {
            Some(c) => (c.load(), c.load_scores()),
            None => Default::default(),
        });
        f(memo)
    }
}

impl Generator for Cached<'_> {
    fn model_name(&self) -> String {
        self.inner.model_name()
    }
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        let out = self.with_memo(|(done, _)| generate_quiet(self.inner, requests, self.cache, done)).map_err(plugin_error)?;
        if let Some(c) = self.cache {
            self.with_memo(|(done, _)| {
                for (r, o) in requests.iter().zip(&out) {
                    done.insert(c.key(r), o.clone());
                }
            });
        }
        Ok(out)
    }
    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        let out = self.with_memo(|(_, done)| score_with(self.inner, requests, self.cache, done, requests.len().max(1))).map_err(plugin_error)?;
        if let Some(c) = self.cache {
            self.with_memo(|(_, done)| {
                for (r, s) in requests.iter().zip(&out) {
                    done.insert(c.score_key(r), s.clone());
                }
            });
        }
        Ok(out)
    }
}

fn plugin_error(e: GenerateError) -> PluginError {
    match e {
        GenerateError::Plugin(p) => p,
        other => PluginError::other(other),
    }
}

/// `generate_all` as one batch, without a progress bar (the caller has one).
fn generate_quiet(
    g: &dyn Generator,
    requests: &[GenerationRequest],
    cache: Option<&GenerationCache>,
    cached: &HashMap<String, Vec<Completion>>,
) -> Result<Vec<Vec<Completion>>, GenerateError> {
    let keys: Vec<String> = requests.iter().map(|r| cache.map(|c| c.key(r)).unwrap_or_default()).collect();
    let (out, _) = fill(requests, &keys, cached, requests.len(), |r| Ok(g.generate(r)?), |recs| write_completions(cache, recs), |_| {})?;
    Ok(out)
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
    let todo = keys.iter().filter(|k| !cached.contains_key(*k)).count();
    let bar = crate::util::progress::bar(todo, label, "prompts");
    let out = fill(requests, &keys, &cached, batch, |r| Ok(generator.generate(r)?), |recs| write_completions(cache, recs), |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(out)
}
