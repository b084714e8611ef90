//! Generator feedback for RLGF (DESIGN §1.3). `mode` chooses how the
//! stage's generator judges a query's candidate passages:
//!
//! - `listwise` (the method as described): it reranks them as RankGPT
//!   prompts it, and each candidate scores 1/(rank+1) in its order.
//! - `query_likelihood` (UPR, Sachan et al. 2022): each passage scores the
//!   mean log-probability per token of the query given the passage, under
//!   UPR's prompt "Passage: … Please write a question based on this
//!   passage." — scoring, not generating, which small models do well.
//! - `yes_no`: each passage scores log p(Yes) − log(p(Yes) + p(No)) for a
//!   relevance question about it and the query.
//!
//! The pointwise modes need a generator that can score continuations
//! (`Generator::score`: llama-generator, or openai-generator against a
//! server that echoes prompt log-probabilities, with `prompt_format = "text"`).
//! An item whose teacher failed gets flat scores (all 0), which the RLGF
//! stage drops and counts: in listwise mode, when any of its windows had no
//! usable permutation.
//!
//! Passages are cut to `max_words` words. Lists longer than `window` are
//! reranked with RankGPT's sliding window: windows of `window` passages from
//! the bottom of the list up, moving by `step`, each window's order written
//! back before the next.
//!
//! The answer is parsed leniently: the numbers in it, in order, out-of-range
//! and repeated ones dropped, missing passages appended in their previous
//! order; an answer without a usable number keeps the window's order. Each
//! item's `fallbacks` is the number of its windows whose answer needed a
//! fallback (0: every answer was a clean permutation), so the stage can
//! count and report them; totals are also logged.
//!
//! ```toml
//! mode = "listwise"       # listwise | query_likelihood | yes_no
//! prompt_format = "chat"  # chat | text (pointwise prompts as plain text, for OpenAI servers)
//! window = 20
//! step = 10
//! max_words = 300
//! max_tokens = 120        # for the permutation answer
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use rir_sdk::{config, GenerationRequest, Generator, Message, PluginError, PluginResult, Prompt, Reward, RewardContext, RewardItem, RewardScores, ScoreRequest};
use serde::Deserialize;

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Listwise,
    QueryLikelihood,
    YesNo,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    #[default]
    Chat,
    Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorRewardConfig {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub prompt_format: PromptFormat,
    #[serde(default = "d_window")]
    pub window: usize,
    #[serde(default = "d_step")]
    pub step: usize,
    #[serde(default = "d_words")]
    pub max_words: usize,
    #[serde(default = "d_tokens")]
    pub max_tokens: u32,
}
fn d_window() -> usize {
    20
}
fn d_step() -> usize {
    10
}
fn d_words() -> usize {
    300
}
fn d_tokens() -> u32 {
    120
}

pub struct GeneratorReward {
    cfg: GeneratorRewardConfig,
    /// Answers that needed repair (no numbers, or not a full permutation).
    pub repaired: AtomicU64,
    pub unparsed: AtomicU64,
}

/// The numbers in `text` as a permutation of 0..n: 1-based labels in the
/// answer's order, invalid and repeated ones dropped, missing ones appended
/// in their current order. Returns the order and whether repair was needed
/// (`None`: no usable number at all).
pub fn parse_permutation(text: &str, n: usize) -> (Vec<usize>, Option<bool>) {
    let mut seen = vec![false; n];
    let mut order = Vec::with_capacity(n);
    let mut cur: Option<usize> = None;
    let mut flush = |cur: &mut Option<usize>, order: &mut Vec<usize>| {
        if let Some(v) = cur.take() {
            if v >= 1 && v <= n && !seen[v - 1] {
                seen[v - 1] = true;
                order.push(v - 1);
            }
        }
    };
    for c in text.chars() {
        match c.to_digit(10) {
            Some(d) => cur = Some(cur.unwrap_or(0).saturating_mul(10).saturating_add(d as usize)),
            None => flush(&mut cur, &mut order),
        }
    }
    flush(&mut cur, &mut order);
    let found = order.len();
    order.extend((0..n).filter(|i| !seen[*i]));
    let status = if found == 0 { None } else { Some(found < n) };
    (order, status)
}

/// log(e^a + e^b), stably.
fn log_add(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

fn cut_words(text: &str, n: usize) -> String {
    text.split_whitespace().take(n).collect::<Vec<_>>().join(" ")
}

/// RankGPT's prompt, as one chat: the passages labelled `[1]`..`[n]`, then the
/// request for a permutation.
pub fn rank_prompt(query: &str, passages: &[String]) -> Prompt {
    let n = passages.len();
    let mut body = format!(
        "I will provide you with {n} passages, each indicated by a number identifier []. Rank the passages based on their relevance to the search query: {query}.\n\n"
    );
    for (i, p) in passages.iter().enumerate() {
        body.push_str(&format!("[{}] {p}\n", i + 1));
    }
    body.push_str(&format!(
        "\nSearch Query: {query}.\nRank the {n} passages above based on their relevance to the search query. All the passages should be included and listed using identifiers, in descending order of relevance. The output format should be [] > [], e.g., [2] > [1]. Only respond with the ranking results, do not say any word or explain."
    ));
    Prompt::Chat(vec![
        Message::system("You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."),
        Message::user(body),
    ])
}

/// UPR's prompt: the query is the continuation scored after it.
pub fn upr_prompt(passage: &str, format: PromptFormat) -> (Prompt, String) {
    let ask = format!("Passage: {passage}\nPlease write a question based on this passage.");
    match format {
        PromptFormat::Chat => (Prompt::Chat(vec![Message::user(ask)]), String::new()),
        PromptFormat::Text => (Prompt::Text(format!("{ask}\nQuestion:")), " ".into()),
    }
}

/// The relevance question whose answer "Yes" / "No" is scored.
pub fn yes_no_prompt(query: &str, passage: &str, format: PromptFormat) -> (Prompt, String) {
    let ask = format!(
        "Passage: {passage}\nQuery: {query}\nDoes the passage answer the query? Answer Yes or No."
    );
    match format {
        PromptFormat::Chat => (Prompt::Chat(vec![Message::user(ask)]), String::new()),
        PromptFormat::Text => (Prompt::Text(format!("{ask}\nAnswer:")), " ".into()),
    }
}

impl GeneratorReward {
    /// Pointwise scores of every item's candidates, one scoring call for all.
    fn pointwise(&self, g: &dyn Generator, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        let mut reqs = Vec::new();
        for item in items {
            for c in &item.candidates {
                let passage = cut_words(c, self.cfg.max_words);
                match self.cfg.mode {
                    Mode::QueryLikelihood => {
                        let (prompt, lead) = upr_prompt(&passage, self.cfg.prompt_format);
                        reqs.push(ScoreRequest { prompt, continuation: format!("{lead}{}", item.query.trim()) });
                    }
                    Mode::YesNo => {
                        let (prompt, lead) = yes_no_prompt(&item.query, &passage, self.cfg.prompt_format);
                        reqs.push(ScoreRequest { prompt: prompt.clone(), continuation: format!("{lead}Yes") });
                        reqs.push(ScoreRequest { prompt, continuation: format!("{lead}No") });
                    }
                    Mode::Listwise => unreachable!("listwise is not pointwise"),
                }
            }
        }
        let scores = g.score(&reqs)?;
        let mut it = scores.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let mut s = Vec::with_capacity(item.candidates.len());
            for _ in &item.candidates {
                let v = match self.cfg.mode {
                    Mode::QueryLikelihood => it.next().map(|x| x.mean()),
                    _ => match (it.next(), it.next()) {
                        (Some(y), Some(n)) => Some(y.logprob - log_add(y.logprob, n.logprob)),
                        _ => None,
                    },
                };
                s.push(v.ok_or_else(|| PluginError::other("the generator returned fewer scores than asked for"))?);
            }
            out.push(RewardScores { scores: s, ..Default::default() });
        }
        Ok(out)
    }

    /// The config, parsed and checked (what `validate` runs too).
    pub fn checked(config_toml: &str) -> PluginResult<GeneratorRewardConfig> {
        let cfg: GeneratorRewardConfig = config::parse(config_toml)?;
        if cfg.window < 2 || cfg.step == 0 || cfg.step > cfg.window {
            return Err(PluginError::config("window must be at least 2 and step in 1..=window"));
        }
        Ok(cfg)
    }

    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg = Self::checked(config_toml)?;
        Ok(Self { cfg, repaired: AtomicU64::new(0), unparsed: AtomicU64::new(0) })
    }

    /// The windows (start, end) RankGPT visits, bottom up.
    fn windows(&self, n: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut end = n;
        loop {
            let start = end.saturating_sub(self.cfg.window);
            out.push((start, end));
            if start == 0 {
                break;
            }
            end = end.saturating_sub(self.cfg.step);
        }
        out
    }
}

impl Reward for GeneratorReward {
    fn score(&self, ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let g = ctx.generator.ok_or_else(|| PluginError::config("generator-reward needs the stage's generator"))?;
        if self.cfg.mode != Mode::Listwise {
            return self.pointwise(g, items);
        }
        let cut: Vec<Vec<String>> = items.iter().map(|i| i.candidates.iter().map(|c| cut_words(c, self.cfg.max_words)).collect()).collect();
        // Current order of each item, refined window by window; all items'
        // windows of one pass go to the generator together.
        let mut orders: Vec<Vec<usize>> = items.iter().map(|i| (0..i.candidates.len()).collect()).collect();
        let mut fallbacks = vec![0u32; items.len()];
        let mut unusable = vec![false; items.len()];
        let passes = items.iter().map(|i| self.windows(i.candidates.len()).len()).max().unwrap_or(0);
        for pass in 0..passes {
            let mut reqs = Vec::new();
            let mut slots = Vec::new();
            for (k, item) in items.iter().enumerate() {
                let w = self.windows(item.candidates.len());
                let Some(&(s, e)) = w.get(pass) else { continue };
                if e - s < 2 {
                    continue;
                }
                let passages: Vec<String> = orders[k][s..e].iter().map(|&i| cut[k][i].clone()).collect();
                reqs.push(GenerationRequest::greedy(rank_prompt(&item.query, &passages), self.cfg.max_tokens));
                slots.push((k, s, e));
            }
            if reqs.is_empty() {
                continue;
            }
            let answers = g.generate(&reqs)?;
            for ((k, s, e), a) in slots.into_iter().zip(answers) {
                let text = a.first().map(|c| c.text.as_str()).unwrap_or("");
                let (perm, status) = parse_permutation(text, e - s);
                match status {
                    None => {
                        self.unparsed.fetch_add(1, Ordering::Relaxed);
                        fallbacks[k] += 1;
                        unusable[k] = true;
                    }
                    Some(true) => {
                        self.repaired.fetch_add(1, Ordering::Relaxed);
                        fallbacks[k] += 1;
                    }
                    Some(false) => {}
                }
                let window: Vec<usize> = perm.iter().map(|&p| orders[k][s + p]).collect();
                orders[k][s..e].copy_from_slice(&window);
            }
        }
        rir_sdk::log::info!(
            "generator-reward: {} answers repaired, {} without a usable permutation (order kept)",
            self.repaired.load(Ordering::Relaxed),
            self.unparsed.load(Ordering::Relaxed)
        );
        Ok(orders
            .into_iter()
            .zip(fallbacks)
            .zip(unusable)
            .map(|((o, f), failed)| {
                let mut scores = vec![0.0; o.len()];
                // A window without a usable answer: no teacher signal (flat).
                if !failed {
                    for (rank, &i) in o.iter().enumerate() {
                        scores[i] = 1.0 / (rank as f64 + 1.0);
                    }
                }
                RewardScores { scores, fallbacks: f, ..Default::default() }
            })
            .collect())
    }
}

rir_sdk::export_plugin! {
    name: "generator-reward",
    description: "Reinforced-IR generator feedback: RankGPT-style listwise reranking by the stage's generator, scores 1/(rank+1)",
    reward: GeneratorReward::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Reward => GeneratorReward::checked(text).map(drop),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_parsed_leniently() {
        assert_eq!(parse_permutation("[2] > [1] > [3]", 3), (vec![1, 0, 2], Some(false)));
        // Repeats, out-of-range labels and missing passages.
        assert_eq!(parse_permutation("[3] > [3] > [9] > [1]", 4), (vec![2, 0, 1, 3], Some(true)));
        assert_eq!(parse_permutation("I cannot rank these.", 3), (vec![0, 1, 2], None));
        assert_eq!(parse_permutation("[10] > [2]", 12).0[..2], [9, 1]);
    }

    #[test]
    fn sliding_windows_cover_the_list_bottom_up() {
        let r = GeneratorReward::new("window = 4\nstep = 2").unwrap();
        assert_eq!(r.windows(8), vec![(4, 8), (2, 6), (0, 4)]);
        assert_eq!(r.windows(3), vec![(0, 3)]);
        assert!(GeneratorReward::new("window = 4\nstep = 5").is_err());
    }
}
