//! Stage `queries` (DESIGN §1.1): pseudo queries for an unlabeled corpus.
//!
//! Passages are sampled (seeded) and cut to `max_chars`; for each, the
//! generator writes one query (or `per_passage` samples of one prompt) of a
//! length and style drawn with the weights below, then judges (a second call, temperature 0) whether the passage
//! answers it; only pairs judged "1" are kept. With `filter = true`, queries
//! that restate the instructions or refuse are dropped first and lead-ins
//! ("The scientific claim is:") stripped (`filter_query`). Output: `queries.jsonl`
//! (`{"_id", "text", "passage_id", "length", "style"}`, BEIR's query layout
//! plus the source) and `queries.stats.json`.

use std::path::Path;

use rir_sdk::{GenerationRequest, Generator, Message, Prompt};
use serde::{Deserialize, Serialize};

use crate::engine::data::Dataset;
use crate::error::HostError;
use crate::util::files::{read_jsonl, write_json, write_jsonl, Rng};
use crate::engine::generate::{generate_all, GenerationCache};
use crate::engine::prompts::Task;
use crate::stages::{Context, DataStage, Needs, Stage};

/// The stage's settings; every constant of the method is here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueriesConfig {
    /// Passages sampled (all of them when the corpus is smaller).
    #[serde(default = "d_passages")]
    pub passages: usize,
    /// Passages are cut to this many characters in the prompt.
    #[serde(default = "d_chars")]
    pub max_chars: usize,
    /// Seeds the passage sample, the instructions drawn and the sampling.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Length instructions and their weights.
    #[serde(default = "d_lengths")]
    pub lengths: Vec<(String, f64)>,
    /// Style instructions and their weights.
    #[serde(default = "d_styles")]
    pub styles: Vec<(String, f64)>,
    /// Sampling temperature of the query writer.
    #[serde(default = "d_temp")]
    pub temperature: f32,
    /// Nucleus sampling's p.
    #[serde(default = "d_top_p")]
    pub top_p: f32,
    /// Tokens per query.
    #[serde(default = "d_qmax")]
    pub max_tokens: u32,
    /// Keep only pairs the generator judges relevant (its 0/1 answer).
    #[serde(default = "d_true")]
    pub judge: bool,
    /// Requests per generator call.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Strip lead-ins ("The scientific claim is:", "1.", "10 to 15 words:")
    /// and drop queries that restate the instructions or refuse, before the
    /// judge sees them (see `filter_query`). Off by default: the quickstart's
    /// published table was made without it. Not serialized when off, so
    /// stage keys made before it existed still hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub filter: bool,
    /// Queries sampled per passage (GPL writes 3). The samples share one
    /// prompt, so its prefill is paid once; a sample that repeats an earlier
    /// one of its passage is dropped. Not serialized at 1, so stage keys made
    /// before it existed still hold.
    #[serde(default = "d_one", skip_serializing_if = "is_one")]
    pub per_passage: u32,
    /// The query-writing prompt as a minijinja template (the user message),
    /// instead of the method's. Variables: `passage` (title and text, cut to
    /// `max_chars`), `title`, `text` (the text alone, cut), `length`,
    /// `style`, `task`, `passage_type`, `query_type`. A stronger model
    /// follows a prompt that asks for what the test queries look like (e.g.
    /// a claim "in your own words", without the title it would copy); see
    /// docs/BENCHMARKS.md. Checked before any work; not serialized when
    /// unset, so stage keys made before it existed still hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

fn d_one() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

fn d_passages() -> usize {
    15_000
}
fn d_chars() -> usize {
    8_000
}
fn d_seed() -> u64 {
    42
}
fn d_lengths() -> Vec<(String, f64)> {
    [("less than 5 words", 2.0), ("5 to 10 words", 5.0), ("10 to 15 words", 4.0), ("at least 15 words", 1.0)]
        .iter()
        .map(|(s, w)| (s.to_string(), *w))
        .collect()
}
fn d_styles() -> Vec<(String, f64)> {
    [("plain and simple", 4.0), ("common and formal", 4.0), ("casual and informal", 2.0), ("professional and complex", 1.0)]
        .iter()
        .map(|(s, w)| (s.to_string(), *w))
        .collect()
}
fn d_temp() -> f32 {
    0.7
}
fn d_top_p() -> f32 {
    0.9
}
fn d_qmax() -> u32 {
    64
}
fn d_true() -> bool {
    true
}
fn d_batch() -> usize {
    16
}

impl Default for QueriesConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// One kept pseudo query.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PseudoQuery {
    /// Its id (`_id`, BEIR's field name).
    #[serde(rename = "_id")]
    pub id: String,
    /// The query.
    pub text: String,
    /// The passage it was written from (its positive).
    pub passage_id: String,
    /// The length instruction drawn for it.
    pub length: String,
    /// The style instruction drawn for it.
    pub style: String,
}

/// What the queries stage did (`queries.stats.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueriesStats {
    /// Passages sampled.
    pub sampled: usize,
    /// Queries written for each (`per_passage`).
    #[serde(default = "d_one")]
    pub per_passage: u32,
    /// Samples that repeated an earlier sample of the same passage.
    #[serde(default)]
    pub duplicates: usize,
    /// Empty completions.
    pub empty: usize,
    /// Queries the judge answered 0 for.
    pub judged_irrelevant: usize,
    /// Judge answers with no 0/1 in them (counted as irrelevant).
    pub judge_unparsed: usize,
    /// Dropped by the filter (`filter`): restated instructions, refusals,
    /// fewer than three words.
    #[serde(default)]
    pub filtered: usize,
    /// Queries written to queries.jsonl.
    pub kept: usize,
    /// kept / (sampled × per_passage): how much of what the generator
    /// writes the filter and the judge keep.
    #[serde(default)]
    pub keep_rate: f64,
    /// Completions read from the generation cache.
    pub from_cache: usize,
}

fn cut(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// The prompt that asks for one query a passage answers.
pub fn query_prompt(task: &Task, passage: &str, length: &str, style: &str) -> Prompt {
    Prompt::Chat(vec![Message::user(format!(
        "{task}\nRead the following {pt} and write one {qt} that it answers. The {qt} should be {length} and {style}. Reply with the {qt} only.\n\n{pt}: {passage}",
        task = task.task,
        pt = task.passage_type,
        qt = task.query_type,
    ))])
}

/// What a `prompt` template is rendered with.
#[derive(Serialize)]
struct PromptVars<'a> {
    passage: &'a str,
    title: &'a str,
    text: &'a str,
    length: &'a str,
    style: &'a str,
    task: &'a str,
    passage_type: &'a str,
    query_type: &'a str,
}

/// Compiles a `prompt` template (undefined variables an error) and checks
/// it before any work: it uses only the variables it is given and shows the
/// passage (`passage` or `text`).
fn compile_prompt(template: &str) -> Result<minijinja::Environment<'_>, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template("prompt", template).map_err(|e| format!("`prompt` is not a valid template: {e}"))?;
    let mark = "\u{1}PASSAGE\u{1}";
    let vars = PromptVars { passage: mark, title: "t", text: mark, length: "l", style: "s", task: "k", passage_type: "p", query_type: "q" };
    let out = env
        .get_template("prompt")
        .and_then(|t| t.render(&vars))
        .map_err(|e| format!("`prompt`: {e} (variables: passage, title, text, length, style, task, passage_type, query_type)"))?;
    if !out.contains(mark) {
        return Err("`prompt` never shows the passage: use {{ passage }} or {{ text }}".into());
    }
    Ok(env)
}

/// The checks of `compile_prompt` alone (the experiment file's, at parse).
pub fn check_prompt(template: &str) -> Result<(), String> {
    compile_prompt(template).map(drop)
}

/// The prompt that asks whether a passage answers a query (0/1).
pub fn judge_prompt(task: &Task, query: &str, passage: &str) -> Prompt {
    Prompt::Chat(vec![Message::user(format!(
        "{task}\nDoes the {pt} below answer the {qt}? Reply with 1 if it does and 0 if it does not, and nothing else.\n\n{qt}: {query}\n\n{pt}: {passage}",
        task = task.task,
        pt = task.passage_type,
        qt = task.query_type,
    ))])
}

/// Tokens a judgement may take (its answer is a 0 or a 1).
pub const JUDGE_MAX_TOKENS: u32 = 4;

/// The first 0 or 1 in a judge's answer.
pub fn parse_judgement(text: &str) -> Option<bool> {
    text.chars().find(|c| *c == '0' || *c == '1').map(|c| c == '1')
}

/// A generated query, cleaned: first line, surrounding quotes and a
/// leading "Query:"-style label removed.
pub fn clean_query(text: &str, query_type: &str) -> String {
    let line = text.trim().lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let mut s = line;
    for label in [query_type, "query", "question", "claim"] {
        // `get`: a label length may fall inside a multi-byte character.
        let head = s.get(..label.len()).filter(|h| h.eq_ignore_ascii_case(label));
        if let Some(rest) = head.and_then(|_| s.get(label.len()..)).and_then(|r| r.strip_prefix(':')) {
            s = rest.trim();
            break;
        }
    }
    s.trim_matches(|c| c == '"' || c == '\'' || c == '“' || c == '”').trim().to_owned()
}

/// Words that mark a reply about the task rather than a query.
const REFUSALS: [&str; 9] =
    ["i'm ready", "i am ready", "i'll provide", "i will provide", "to address your request", "i cannot", "i can't", "as an ai", "word count"];

/// Starts with `prefix`, ignoring ASCII case; the rest.
fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len()).filter(|h| h.eq_ignore_ascii_case(prefix)).and_then(|_| s.get(prefix.len()..))
}

/// A small model's query with what is not the query removed, or None when
/// what is left is not a query: it restates the prompt's length or style
/// instruction ("5 to 10 words and plain and simple."), refuses or talks
/// about the task, or has fewer than three words. InPars and GPL filter
/// their generated queries too; this only looks at the text.
pub fn filter_query(text: &str, task: &Task, cfg: &QueriesConfig) -> Option<String> {
    let mut s = text.trim().to_owned();
    let qt = task.query_type.to_lowercase();
    let pt = task.passage_type.to_lowercase();
    // Lead-ins, in any order, until none is left.
    for _ in 0..4 {
        let before = s.clone();
        let mut t = s.as_str().trim_start();
        // List markers: "1.", "2)", "-", "*".
        let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if let Some(r) = t[digits..].strip_prefix(['.', ')']).filter(|_| digits > 0 && digits < 3) {
            t = r;
        } else if let Some(r) = t.strip_prefix(['-', '*', '•']) {
            t = r;
        }
        t = t.trim_start();
        // "The scientific claim is:", "This query that", "Here is the claim:".
        for det in ["the ", "this ", "a ", "my ", "our ", "here is the ", "here's the ", "here is a ", "here's a "] {
            let Some(r) = strip_ci(t, det) else { continue };
            let r = r.trim_start();
            let r = strip_ci(r, "rewritten ").unwrap_or(r).trim_start();
            if let Some(r) = [qt.as_str(), "query", "question", "claim"].iter().find_map(|l| strip_ci(r, l)) {
                let r = r.trim_start();
                let word_end = |x: &&str| !x.starts_with(|c: char| c.is_alphanumeric());
                let r = ["that", "is", "can be rewritten as", "would be", "reads", "answered"]
                    .iter()
                    .find_map(|v| strip_ci(r, v).filter(word_end))
                    .unwrap_or(r);
                t = r.trim_start().trim_start_matches(':');
                break;
            }
        }
        // A label: "Scientific claim:", "Query:", "Scientific paper abstract:".
        for label in [qt.as_str(), pt.as_str(), "query", "question", "claim", "answer", "title", "science"] {
            if let Some(r) = strip_ci(t, label).and_then(|r| r.trim_start().strip_prefix(':')) {
                t = r;
                break;
            }
        }
        // A length instruction echoed as a label: "10 to 15 words: ...".
        for (len, _) in &cfg.lengths {
            if let Some(r) = strip_ci(t, len) {
                if let Some(colon) = r.find(':').filter(|&c| c < 40) {
                    t = &r[colon + 1..];
                }
            }
        }
        s = t.trim().trim_matches(|c| c == '"' || c == '\'' || c == '“' || c == '”').trim().to_owned();
        if s == before {
            break;
        }
    }
    let lower = s.to_lowercase();
    let echoes = cfg.lengths.iter().chain(&cfg.styles).any(|(x, _)| lower.contains(&x.to_lowercase()))
        || lower.contains(&format!("{qt} is"))
        || REFUSALS.iter().any(|r| lower.contains(r));
    (s.split_whitespace().count() >= 3 && !echoes).then_some(s)
}

/// Stage `queries`: the base generator writes and judges one query for each
/// sampled passage.
pub struct Queries;

impl DataStage for Queries {
    const STAGE: Stage = Stage::Queries;
    const ABOUT: &'static str = "Stage `queries`: pseudo queries for a corpus, written by the generator and judged by it";
    const NEEDS: Needs = Needs { queries: false, generator: "Generator plugin that writes and judges the queries", retriever: None, reward: None, text_retriever: None };
    const OUTPUTS: &'static [&'static str] = &["queries.jsonl", "queries.stats.json"];
    type Config = QueriesConfig;
    type Output = Vec<PseudoQuery>;
    type Stats = QueriesStats;

    fn run(ctx: &Context<'_>, cfg: &QueriesConfig, out: &Path) -> Result<(Vec<PseudoQuery>, QueriesStats), HostError> {
        let g = ctx.generator(Stage::Queries)?;
        run(ctx.dataset, ctx.task, g.model, g.cache, cfg, out)
    }

    fn summary(s: &QueriesStats) -> String {
        format!(
            "{} passages sampled ({} queries each): {} queries kept, {} filtered out, {} judged irrelevant, {} unparsed judgements, {} empty, {} duplicates ({} generations from cache)",
            s.sampled, s.per_passage, s.kept, s.filtered, s.judged_irrelevant, s.judge_unparsed, s.empty, s.duplicates, s.from_cache
        )
    }
}

/// The stage's work; writes `out_dir/queries.jsonl` and `queries.stats.json`.
fn run(
    ds: &Dataset,
    task: &Task,
    generator: &dyn Generator,
    cache: Option<&GenerationCache>,
    cfg: &QueriesConfig,
    out_dir: &Path,
) -> Result<(Vec<PseudoQuery>, QueriesStats), HostError> {
    let mut rng = Rng(cfg.seed);
    let mut order: Vec<usize> = (0..ds.corpus.len()).collect();
    rng.shuffle(&mut order);
    order.truncate(cfg.passages.min(order.len()));
    let lw: Vec<f64> = cfg.lengths.iter().map(|l| l.1).collect();
    let sw: Vec<f64> = cfg.styles.iter().map(|s| s.1).collect();
    if lw.is_empty() || sw.is_empty() || lw.iter().chain(&sw).any(|w| *w < 0.0) {
        return Err(HostError::Input("queries: `lengths` and `styles` need non-negative weights".into()));
    }
    if cfg.per_passage == 0 {
        return Err(HostError::Input("queries: `per_passage` must be at least 1".into()));
    }
    let env = cfg.prompt.as_deref().map(compile_prompt).transpose().map_err(|m| HostError::Input(format!("queries: {m}")))?;
    let draws: Vec<(usize, usize, usize)> = order.iter().map(|&d| (d, rng.weighted(&lw), rng.weighted(&sw))).collect();
    let passages: Vec<String> = draws.iter().map(|(d, _, _)| cut(&ds.corpus[*d].encoder_text(), cfg.max_chars)).collect();
    let mut prompts = Vec::with_capacity(draws.len());
    for ((d, l, s), p) in draws.iter().zip(&passages) {
        let (length, style) = (cfg.lengths[*l].0.as_str(), cfg.styles[*s].0.as_str());
        prompts.push(match &env {
            None => query_prompt(task, p, length, style),
            Some(env) => {
                let doc = &ds.corpus[*d];
                let text = cut(&doc.text, cfg.max_chars);
                let vars = PromptVars { passage: p, title: &doc.title, text: &text, length, style, task: &task.task, passage_type: &task.passage_type, query_type: &task.query_type };
                let rendered = env.get_template("prompt").and_then(|t| t.render(&vars)).map_err(|e| HostError::Input(format!("queries: `prompt`: {e}")))?;
                Prompt::Chat(vec![Message::user(rendered)])
            }
        });
    }
    let reqs: Vec<GenerationRequest> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| GenerationRequest {
            prompt,
            n: cfg.per_passage,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            max_tokens: cfg.max_tokens,
            stop: vec![],
            seed: Some(cfg.seed.wrapping_add(i as u64)),
            logprobs: false,
        })
        .collect();
    let err = |e: crate::engine::generate::GenerateError| HostError::step("queries", e);
    let (gen, cached1) = generate_all(generator, &reqs, cache, cfg.batch, "queries").map_err(err)?;
    let mut stats = QueriesStats { sampled: draws.len(), per_passage: cfg.per_passage, from_cache: cached1, ..Default::default() };
    // One slot per (passage, sample): `owner[j]` is the passage's index in
    // `draws`, `ids[j]` the query id (pq{i}, or pq{i}.{s} with several).
    let mut owner = Vec::new();
    let mut ids = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    for (i, completions) in gen.iter().enumerate() {
        let mut seen: Vec<String> = Vec::new();
        for s in 0..cfg.per_passage as usize {
            let mut t = completions.get(s).map(|c| clean_query(&c.text, &task.query_type)).unwrap_or_default();
            if !t.is_empty() && seen.contains(&t) {
                stats.duplicates += 1;
                t.clear();
            } else if !t.is_empty() {
                seen.push(t.clone());
            } else {
                stats.empty += 1;
            }
            owner.push(i);
            ids.push(if cfg.per_passage == 1 { format!("pq{i}") } else { format!("pq{i}.{s}") });
            texts.push(t);
        }
    }
    if cfg.filter {
        for t in texts.iter_mut().filter(|t| !t.is_empty()) {
            match filter_query(t, task, cfg) {
                Some(f) => *t = f,
                None => {
                    stats.filtered += 1;
                    t.clear();
                }
            }
        }
    }
    let candidates: Vec<usize> = (0..texts.len()).filter(|&i| !texts[i].is_empty()).collect();
    let verdicts: Vec<bool> = if cfg.judge {
        let jreqs: Vec<GenerationRequest> = candidates
            .iter()
            .map(|&j| GenerationRequest::greedy(judge_prompt(task, &texts[j], &passages[owner[j]]), JUDGE_MAX_TOKENS))
            .collect();
        let (answers, cached2) = generate_all(generator, &jreqs, cache, cfg.batch, "judge").map_err(err)?;
        stats.from_cache += cached2;
        answers
            .iter()
            .map(|a| {
                let v = parse_judgement(a.first().map(|c| c.text.as_str()).unwrap_or(""));
                if v.is_none() {
                    stats.judge_unparsed += 1;
                }
                v.unwrap_or(false)
            })
            .collect()
    } else {
        vec![true; candidates.len()]
    };
    let mut kept = Vec::new();
    for (&j, ok) in candidates.iter().zip(&verdicts) {
        if !ok {
            stats.judged_irrelevant += 1;
            continue;
        }
        let (d, l, s) = draws[owner[j]];
        kept.push(PseudoQuery {
            id: ids[j].clone(),
            text: texts[j].clone(),
            passage_id: ds.corpus[d].id.clone(),
            length: cfg.lengths[l].0.clone(),
            style: cfg.styles[s].0.clone(),
        });
    }
    stats.judged_irrelevant -= stats.judge_unparsed.min(stats.judged_irrelevant);
    stats.kept = kept.len();
    let written = stats.sampled * cfg.per_passage as usize;
    stats.keep_rate = if written == 0 { 0.0 } else { stats.kept as f64 / written as f64 };
    write_jsonl(&out_dir.join("queries.jsonl"), &kept)?;
    write_json(&out_dir.join("queries.stats.json"), &stats)?;
    Ok((kept, stats))
}

/// Reads a queries.jsonl written by this stage; errors name file and line.
pub fn read(path: &Path) -> Result<Vec<PseudoQuery>, HostError> {
    read_jsonl(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_draws_follow_the_weights() {
        let mut r = Rng(1);
        let w = [2.0, 5.0, 4.0, 1.0];
        let mut c = [0usize; 4];
        for _ in 0..60_000 {
            c[r.weighted(&w)] += 1;
        }
        for i in 0..4 {
            let p = w[i] / 12.0;
            assert!((c[i] as f64 / 60_000.0 - p).abs() < 0.01, "{i}: {c:?}");
        }
    }

    #[test]
    fn judgements_and_queries_are_parsed_leniently() {
        assert_eq!(parse_judgement("1"), Some(true));
        assert_eq!(parse_judgement(" Answer: 0."), Some(false));
        assert_eq!(parse_judgement("yes"), None);
        assert_eq!(clean_query("Scientific claim: \"Vitamin C cures colds.\"\nExtra", "scientific claim"), "Vitamin C cures colds.");
        assert_eq!(clean_query("  \n Query: what is bm25?", "question"), "what is bm25?");
        // Labels never cut a multi-byte character.
        assert_eq!(clean_query("ROR-γ (Src-11) is overexpressed", "query"), "ROR-γ (Src-11) is overexpressed");
    }

    #[test]
    fn the_filter_strips_lead_ins_and_drops_restated_instructions() {
        let task = crate::engine::prompts::task_for("scifact");
        let cfg = QueriesConfig { filter: true, ..Default::default() };
        let f = |t: &str| filter_query(t, &task, &cfg);
        // What SmolLM2-135M wrote for SciFact passages (queries stage, 2026-12-02).
        assert_eq!(f("1. Orai1/CRACM1 is a primary component of the store-operated calcium channels.").as_deref(),
                   Some("Orai1/CRACM1 is a primary component of the store-operated calcium channels."));
        assert_eq!(f("The scientific claim that the study examines husbands' involvement during childbirth").as_deref(),
                   Some("the study examines husbands' involvement during childbirth"));
        assert_eq!(f("This scientific claim is: \"Distant axonal patterns are not enough to determine the origin\"").as_deref(),
                   Some("Distant axonal patterns are not enough to determine the origin"));
        assert_eq!(f("10 to 15 words: Cineradiography of Monkey Lip-Smashing Reveals Putative Precursors of Speech").as_deref(),
                   Some("Cineradiography of Monkey Lip-Smashing Reveals Putative Precursors of Speech"));
        assert_eq!(f("Science: Targeted blockade of TGF-β inhibits lung cancer growth").as_deref(), Some("Targeted blockade of TGF-β inhibits lung cancer growth"));
        for junk in [
            "5 to 10 words and plain and simple.",
            "This scientific claim can be rewritten as:",
            "The scientific claim is:",
            "to answer the scientific claim is 10 to 15 words and informal.",
            "I'm ready to help you with the abstract.",
            "To address your request, I'll provide a professional and complex scientific claim",
            "Vitamin D.",
        ] {
            assert_eq!(f(junk), None, "{junk}");
        }
        // A multi-byte character where a label would end is no problem.
        assert_eq!(f("ROR-γ (Src-11) is overexpressed in cancer").as_deref(), Some("ROR-γ (Src-11) is overexpressed in cancer"));
    }

    #[test]
    fn prompt_templates_are_checked_before_any_work() {
        assert_eq!(check_prompt("Write a {{ query_type }} of {{ length }} for this {{ passage_type }}: {{ text }}"), Ok(()));
        assert_eq!(check_prompt("{{ task }} {{ title }} {{ passage }} {{ style }}"), Ok(()));
        let e = check_prompt("Claim for {{ passage }} in {{ lenght }}").unwrap_err();
        assert!(e.contains("lenght") || e.contains("undefined"), "{e}");
        assert!(e.contains("variables: passage, title, text"), "{e}");
        let e = check_prompt("Claim for {{ passage }").unwrap_err();
        assert!(e.contains("not a valid template"), "{e}");
        let e = check_prompt("Write a claim about {{ title }}").unwrap_err();
        assert!(e.contains("never shows the passage"), "{e}");
        // Unset, the stage key is what it was before the setting existed.
        assert!(!toml::to_string(&QueriesConfig::default()).unwrap().contains("prompt"));
    }
}
