//! What a stage will ask of the generator, estimated from the plan before
//! anything is spent (`rir run --dry-run`): requests, tokens read and tokens
//! written at most. Counts come from the settings (passages, samples `k`,
//! `max_tokens`, the teacher's windows) and the dataset (corpus and query
//! lengths); texts are counted at 4 characters a token (English text under
//! the BPE vocabularies of Llama, Qwen and OpenAI models), plus a fixed
//! allowance for each prompt's instructions and chat template. Query counts
//! after the queries stage are its upper bound (every sampled passage kept),
//! so later stages are over- rather than under-estimated.

use serde::Serialize;

use crate::engine::data::Dataset;
use crate::stages::queries::QueriesConfig;
use crate::stages::rlgf::RlgfDataConfig;
use crate::stages::rlrf::RlrfDataConfig;

/// One stage's estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// Requests (a request for n samples counts once).
    pub requests: u64,
    /// Tokens read (prompts; for scoring, prompt and continuation).
    pub prompt_tokens: u64,
    /// Tokens written at most (every sample runs to `max_tokens`).
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Estimate {
    fn add_assign(&mut self, o: Estimate) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }
}

impl Estimate {
    /// Adds `n` requests of `prompt` tokens writing at most `completion` each.
    fn add(&mut self, n: u64, prompt: u64, completion: u64) {
        self.requests += n;
        self.prompt_tokens += n * prompt;
        self.completion_tokens += n * completion;
    }
}

/// Characters per token of English text under common BPE vocabularies.
const CHARS_PER_TOKEN: f64 = 4.0;
/// A prompt's instructions and chat template around the texts it carries.
const TEMPLATE_TOKENS: u64 = 60;

fn tokens(chars: f64) -> u64 {
    (chars / CHARS_PER_TOKEN).ceil() as u64
}

/// Mean tokens of a corpus passage as a prompt carries it (cut to
/// `max_chars`, or to `max_words` words at ~6 characters a word).
fn passage_tokens(ds: &Dataset, max_chars: Option<usize>, max_words: Option<usize>) -> u64 {
    if ds.corpus.is_empty() {
        return 0;
    }
    let total: f64 = ds
        .corpus
        .iter()
        .map(|d| {
            let n = d.title.chars().count() + 1 + d.text.chars().count();
            let n = max_chars.map_or(n, |m| n.min(m));
            max_words.map_or(n, |w| n.min(w * 6)) as f64
        })
        .sum();
    tokens(total / ds.corpus.len() as f64)
}

/// Mean tokens of the split's queries (a pseudo query is taken as long).
fn query_tokens(ds: &Dataset) -> u64 {
    if ds.queries.is_empty() {
        return 16;
    }
    tokens(ds.queries.iter().map(|(_, q)| q.chars().count() as f64).sum::<f64>() / ds.queries.len() as f64)
}

/// The pseudo queries the queries stage can keep at most.
pub fn max_queries(cfg: &QueriesConfig, ds: &Dataset) -> u64 {
    (cfg.passages.min(ds.corpus.len()) as u64) * u64::from(cfg.per_passage.max(1))
}

/// Stage `queries`: one request per query written, one more per judgement.
pub fn queries(cfg: &QueriesConfig, ds: &Dataset) -> Estimate {
    let mut e = Estimate::default();
    let n = max_queries(cfg, ds);
    let p = passage_tokens(ds, Some(cfg.max_chars), None);
    e.add(n, p + TEMPLATE_TOKENS, u64::from(cfg.max_tokens));
    if cfg.judge {
        // The judge reads the passage and the query.
        e.add(n, p + u64::from(cfg.max_tokens) + TEMPLATE_TOKENS, u64::from(crate::stages::queries::JUDGE_MAX_TOKENS));
    }
    e
}

/// Stage `rlrf-data`: `k` samples of an augmentation for each query.
pub fn rlrf_data(cfg: &RlrfDataConfig, queries: u64, ds: &Dataset) -> Estimate {
    let n = if cfg.max_queries > 0 { queries.min(cfg.max_queries as u64) } else { queries };
    let mut e = Estimate::default();
    e.add(n, query_tokens(ds) + TEMPLATE_TOKENS, u64::from(cfg.k) * u64::from(cfg.max_tokens));
    e
}

/// The generator-reward settings that decide the teacher's calls.
struct Teacher {
    mode: String,
    window: u64,
    step: u64,
    max_words: usize,
    max_tokens: u64,
}

impl Teacher {
    /// From the reward's config table, with the plugin's defaults.
    fn of(reward: &toml::Table) -> Teacher {
        let int = |k: &str, d: u64| reward.get(k).and_then(toml::Value::as_integer).map_or(d, |v| v.max(1) as u64);
        Teacher {
            mode: reward.get("mode").and_then(toml::Value::as_str).unwrap_or("listwise").to_owned(),
            window: int("window", 20),
            step: int("step", 10),
            max_words: int("max_words", 300) as usize,
            max_tokens: int("max_tokens", 120),
        }
    }
}

/// Stage `rlgf-data`: answers (`answer_max_tokens`) for each query and the
/// teacher's judgement of each taught query's candidates (the positive and
/// `negatives` mined passages).
pub fn rlgf_data(cfg: &RlgfDataConfig, reward: &toml::Table, queries: u64, ds: &Dataset) -> Estimate {
    let mut e = Estimate::default();
    let q = query_tokens(ds);
    if cfg.answer_max_tokens > 0 {
        e.add(queries, q + TEMPLATE_TOKENS, u64::from(cfg.answer_max_tokens));
    }
    if cfg.no_rerank {
        return e;
    }
    let taught = if cfg.teacher_queries > 0 { queries.min(cfg.teacher_queries as u64) } else { queries };
    let t = Teacher::of(reward);
    let candidates = cfg.negatives as u64 + 1;
    let p = passage_tokens(ds, None, Some(t.max_words));
    match t.mode.as_str() {
        // One scoring request per candidate: the passage and the query read, nothing written.
        "query_likelihood" | "yes_no" => e.add(taught * candidates, p + q + TEMPLATE_TOKENS, 0),
        // RankGPT's sliding windows, each answered with a permutation.
        _ => {
            let windows = if candidates <= t.window { 1 } else { (candidates - t.window).div_ceil(t.step) + 1 };
            e.add(taught * windows, t.window.min(candidates) * p + q + TEMPLATE_TOKENS, t.max_tokens);
        }
    }
    e
}

/// An eval with augmentation: one greedy augmentation per test query.
pub fn eval(max_tokens: u32, ds: &Dataset) -> Estimate {
    let mut e = Estimate::default();
    e.add(ds.queries.len() as u64, query_tokens(ds) + TEMPLATE_TOKENS, u64::from(max_tokens));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(docs: &[&str], queries: &[&str]) -> Dataset {
        let corpus = docs.iter().enumerate().map(|(i, t)| crate::engine::data::Doc { id: i.to_string(), title: String::new(), text: t.to_string() }).collect();
        Dataset {
            name: "t".into(),
            dir: "t".into(),
            split: "test".into(),
            corpus,
            queries: queries.iter().enumerate().map(|(i, q)| (i.to_string(), q.to_string())).collect(),
            qrels: Default::default(),
            report: Default::default(),
        }
    }

    /// The counts follow the settings: passages × per_passage queries, the
    /// judge's second call, k samples, the teacher's windows or candidates.
    #[test]
    fn counts_follow_the_settings() {
        // Passages of 399 characters (" " + 398) → 100 tokens; queries of 40 → 10.
        let (doc, query) = ("x".repeat(398), "q".repeat(40));
        let ds = dataset(&[doc.as_str(); 10], &[query.as_str(); 3]);
        let mut qc = QueriesConfig::default();
        qc.passages = 6;
        qc.per_passage = 2;
        qc.max_tokens = 32;
        qc.max_chars = 1000;
        qc.judge = false;
        let e = queries(&qc, &ds);
        assert_eq!(e, Estimate { requests: 12, prompt_tokens: 12 * (100 + TEMPLATE_TOKENS), completion_tokens: 12 * 32 });
        qc.judge = true;
        assert_eq!(queries(&qc, &ds).requests, 24);
        // More passages than the corpus has: the corpus bounds them.
        qc.passages = 1000;
        assert_eq!(max_queries(&qc, &ds), 20);

        let mut rc = RlrfDataConfig::default();
        rc.k = 5;
        rc.max_tokens = 64;
        let e = rlrf_data(&rc, 12, &ds);
        assert_eq!((e.requests, e.completion_tokens), (12, 12 * 5 * 64));

        let mut gc = RlgfDataConfig::default();
        gc.negatives = 3;
        gc.answer_max_tokens = 0;
        gc.no_rerank = false;
        gc.teacher_queries = 4;
        let pointwise: toml::Table = toml::from_str("mode = \"query_likelihood\"\nmax_words = 60").unwrap();
        let e = rlgf_data(&gc, &pointwise, 12, &ds);
        assert_eq!((e.requests, e.completion_tokens), (16, 0));
        // Listwise, 30 candidates in windows of 20 stepping 10: 2 windows a query.
        gc.negatives = 29;
        let e = rlgf_data(&gc, &toml::Table::new(), 12, &ds);
        assert_eq!((e.requests, e.completion_tokens), (8, 8 * 120));
        gc.no_rerank = true;
        assert_eq!(rlgf_data(&gc, &toml::Table::new(), 12, &ds), Estimate::default());

        assert_eq!(eval(64, &ds), Estimate { requests: 3, prompt_tokens: 3 * (10 + TEMPLATE_TOKENS), completion_tokens: 3 * 64 });
    }
}
