//! Stage `rlrf-data` (DESIGN §1.2): preference pairs from retriever feedback.
//!
//! For each pseudo query the generator samples k augmentations; the reward
//! plugin scores them against the query alone (`raw`); a pair is kept when
//! `max(s) > raw` and `(max(s) − w·raw)·τ ≥ (min(s) − w·raw)`, with the best
//! augmentation chosen and the worst rejected. Outputs in the stage
//! directory:
//!
//! - `pairs.jsonl`: every kept pair with its scores (and the k candidates);
//! - `dpo.jsonl` + `dataset_info.json`: the same pairs in LLaMA-Factory's
//!   sharegpt "ranking" format, which the dpo-trainer and
//!   llamafactory-trainer both read;
//! - `rlrf.stats.json`: counts and mean scores.

use std::collections::HashMap;
use std::path::Path;

use rir_sdk::{GenerationRequest, Generator, Message, Prompt, Retriever, Reward, RewardContext, RewardItem};
use serde::{Deserialize, Serialize};

use crate::engine::data::Dataset;
use crate::error::HostError;
use crate::engine::generate::{generate_all, GenerationCache};
use crate::engine::prompts::{augmentation, Task};
use crate::util::files::{write_json, write_jsonl};
use crate::stages::queries::PseudoQuery;
use crate::stages::{Context, DataStage, Needs, Stage};

/// `[stages.rlrf]`: how rlrf-data samples augmentations and makes pairs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RlrfDataConfig {
    /// Augmentations sampled per query.
    #[serde(default = "d_k")]
    pub k: u32,
    /// Sampling temperature.
    #[serde(default = "d_temp")]
    pub temperature: f32,
    /// Nucleus sampling's p.
    #[serde(default = "d_top_p")]
    pub top_p: f32,
    /// Tokens per augmentation.
    #[serde(default = "d_max")]
    pub max_tokens: u32,
    /// τ of the pair rule.
    #[serde(default = "d_tau")]
    pub tau: f64,
    /// Seeds the sampling (each query's samples from seed + its index).
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Requests per generator call, and items per reward call.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Use only the first this many pseudo queries (0: all). The queries
    /// stage writes them in its seeded shuffled order, so these are a random
    /// sample: a CPU run can write queries for the whole corpus (what the
    /// retriever trains on) and make DPO pairs from a few hundred. Not
    /// serialized at 0, so stage keys made before it existed still hold.
    #[serde(default, skip_serializing_if = "crate::util::defaults::is_usize::<0>")]
    pub max_queries: usize,
}
fn d_k() -> u32 {
    5
}
fn d_temp() -> f32 {
    0.9
}
fn d_top_p() -> f32 {
    0.9
}
fn d_max() -> u32 {
    300
}
fn d_tau() -> f64 {
    0.95
}
fn d_seed() -> u64 {
    42
}
fn d_batch() -> usize {
    16
}

impl Default for RlrfDataConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// A kept preference pair with what decided it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreferencePair {
    /// The pseudo query's id.
    pub query_id: String,
    /// The pseudo query.
    pub query: String,
    /// Its source passage.
    pub passage_id: String,
    /// The augmentation prompt, as chat messages.
    pub prompt: Vec<Message>,
    /// The best-scored augmentation.
    pub chosen: String,
    /// The worst-scored augmentation.
    pub rejected: String,
    /// The reward's score of `chosen`.
    pub chosen_score: f64,
    /// The reward's score of `rejected`.
    pub rejected_score: f64,
    /// The reward's baseline (the query alone).
    pub raw_score: f64,
    /// All k augmentations.
    pub candidates: Vec<String>,
    /// Their scores.
    pub scores: Vec<f64>,
}

/// What rlrf-data did (`rlrf.stats.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RlrfStats {
    /// Queries augmented.
    pub queries: usize,
    /// Pairs kept.
    pub pairs: usize,
    /// No augmentation beat the query alone.
    pub no_gain: usize,
    /// Best and worst too close (the τ rule).
    pub too_close: usize,
    /// Fewer than two distinct augmentations.
    pub degenerate: usize,
    /// Mean baseline score.
    pub mean_raw: f64,
    /// Mean best augmentation score.
    pub mean_best: f64,
    /// Mean worst augmentation score.
    pub mean_worst: f64,
    /// Augmentations read from the generation cache.
    pub generations_from_cache: usize,
}

/// Why a query made no preference pair (counted in `RlrfStats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPair {
    /// No augmentation beat the query alone.
    NoGain,
    /// Best and worst too close (the τ rule).
    TooClose,
    /// Fewer than two distinct augmentations.
    Degenerate,
}

/// The pair rule; `Ok((best, worst))` when the scores make a pair.
pub fn pair_rule(raw: f64, scores: &[f64], w: f64, tau: f64) -> Result<(usize, usize), NoPair> {
    let best = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).ok_or(NoPair::Degenerate)?;
    let worst = (0..scores.len()).min_by(|&a, &b| scores[a].total_cmp(&scores[b])).ok_or(NoPair::Degenerate)?;
    if best == worst {
        return Err(NoPair::Degenerate);
    }
    if scores[best] <= raw {
        return Err(NoPair::NoGain);
    }
    if (scores[best] - w * raw) * tau < scores[worst] - w * raw {
        return Err(NoPair::TooClose);
    }
    Ok((best, worst))
}

/// LLaMA-Factory's sharegpt ranking row for a pair.
pub fn sharegpt_row(p: &PreferencePair) -> serde_json::Value {
    let turn = |m: &Message| {
        let from = match m.role.as_str() {
            "user" => "human",
            "assistant" => "gpt",
            other => other,
        };
        serde_json::json!({"from": from, "value": m.content})
    };
    let system: Vec<&Message> = p.prompt.iter().filter(|m| m.role == "system").collect();
    let mut row = serde_json::json!({
        "conversations": p.prompt.iter().filter(|m| m.role != "system").map(turn).collect::<Vec<_>>(),
        "chosen": {"from": "gpt", "value": p.chosen},
        "rejected": {"from": "gpt", "value": p.rejected},
    });
    if let Some(s) = system.first() {
        row["system"] = serde_json::json!(s.content);
    }
    row
}

/// dataset_info.json describing `dpo.jsonl` as LLaMA-Factory expects.
pub fn dataset_info(name: &str) -> serde_json::Value {
    serde_json::json!({
        name: {
            "file_name": "dpo.jsonl",
            "formatting": "sharegpt",
            "ranking": true,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"},
        }
    })
}

/// Stage rlrf-data: k augmentations per pseudo query, scored by the
/// reward; the pair rule keeps (best, worst) pairs for DPO. Writes
/// pairs.jsonl, dpo.jsonl (sharegpt), dataset_info.json and rlrf.stats.json.
pub struct RlrfData;

impl DataStage for RlrfData {
    const STAGE: Stage = Stage::RlrfData;
    const ABOUT: &'static str = "Stage `rlrf-data`: k augmentations per pseudo query, scored by a reward, kept as DPO pairs";
    const NEEDS: Needs = Needs {
        queries: true,
        generator: "Generator plugin that writes the augmentations",
        retriever: Some("Retriever plugin the reward scores them with"),
        reward: Some(("retriever-reward", "Reward plugin (retriever feedback)")),
        text_retriever: None,
    };
    const OUTPUTS: &'static [&'static str] = &["pairs.jsonl", "dpo.jsonl", "dataset_info.json", "rlrf.stats.json"];
    type Config = RlrfDataConfig;
    type Output = Vec<PreferencePair>;
    type Stats = RlrfStats;

    fn run(ctx: &Context<'_>, cfg: &RlrfDataConfig, out: &Path) -> Result<(Vec<PreferencePair>, RlrfStats), HostError> {
        let (g, r, w) = (ctx.generator(Stage::RlrfData)?, ctx.retriever(Stage::RlrfData)?, ctx.reward(Stage::RlrfData)?);
        run(ctx.dataset, ctx.task, ctx.queries, g.model, g.cache, r.model, w, cfg, out)
    }

    fn summary(s: &RlrfStats) -> String {
        format!(
            "{} queries: {} pairs ({} without gain over the query alone, {} too close under tau, {} degenerate); mean raw {:.4}, best {:.4}, worst {:.4}",
            s.queries, s.pairs, s.no_gain, s.too_close, s.degenerate, s.mean_raw, s.mean_best, s.mean_worst
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    ds: &Dataset,
    task: &Task,
    queries: &[PseudoQuery],
    generator: &dyn Generator,
    cache: Option<&GenerationCache>,
    retriever: &dyn Retriever,
    reward: &dyn Reward,
    cfg: &RlrfDataConfig,
    out_dir: &Path,
) -> Result<(Vec<PreferencePair>, RlrfStats), HostError> {
    if cfg.k < 2 {
        return Err(HostError::Input("rlrf-data: k must be at least 2 (a pair needs two augmentations)".into()));
    }
    let queries = if cfg.max_queries > 0 { &queries[..cfg.max_queries.min(queries.len())] } else { queries };
    let by_id: HashMap<&str, usize> = ds.corpus.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
    let mut passages = Vec::with_capacity(queries.len());
    for q in queries {
        let i = by_id.get(q.passage_id.as_str()).ok_or_else(|| {
            HostError::Input(format!("rlrf-data: query {} names passage {} which is not in {}", q.id, q.passage_id, ds.name))
        })?;
        passages.push(ds.corpus[*i].encoder_text());
    }
    let prompts: Vec<Prompt> = queries.iter().map(|q| augmentation(task, &q.text)).collect();
    let reqs: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt: p.clone(),
            n: cfg.k,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            max_tokens: cfg.max_tokens,
            stop: vec![],
            seed: Some(cfg.seed.wrapping_add(i as u64 * cfg.k as u64)),
            logprobs: false,
        })
        .collect();
    let (gen, from_cache) = generate_all(generator, &reqs, cache, cfg.batch, "augment")
        .map_err(|e| HostError::step("rlrf-data", e))?;
    let items: Vec<RewardItem> = queries
        .iter()
        .zip(&passages)
        .zip(&gen)
        .map(|((q, p), g)| RewardItem {
            query: q.text.clone(),
            reference: p.clone(),
            candidates: g.iter().map(|c| c.text.trim().to_owned()).collect(),
        })
        .collect();
    let ctx = RewardContext { retriever: Some(retriever), generator: Some(generator) };
    let bar = crate::util::progress::bar(items.len(), "reward", "queries");
    let mut scored = Vec::with_capacity(items.len());
    for chunk in items.chunks(cfg.batch.max(1)) {
        let s = reward.score(&ctx, chunk).map_err(|e| HostError::step("rlrf-data: reward", e))?;
        if s.len() != chunk.len() {
            return Err(HostError::Input(format!("rlrf-data: the reward returned {} scores for {} items", s.len(), chunk.len())));
        }
        scored.extend(s);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let mut stats = RlrfStats { queries: queries.len(), generations_from_cache: from_cache, ..Default::default() };
    let mut pairs = Vec::new();
    for (((q, item), s), prompt) in queries.iter().zip(&items).zip(&scored).zip(&prompts) {
        let raw = s.baseline.unwrap_or(f64::NEG_INFINITY);
        let distinct = {
            let mut c: Vec<&String> = item.candidates.iter().filter(|c| !c.is_empty()).collect();
            c.sort();
            c.dedup();
            c.len()
        };
        let verdict = if distinct < 2 { Err(NoPair::Degenerate) } else { pair_rule(raw, &s.scores, s.query_weight.unwrap_or(rir_sdk::method::QUERY_WEIGHT), cfg.tau) };
        match verdict {
            Err(NoPair::NoGain) => stats.no_gain += 1,
            Err(NoPair::TooClose) => stats.too_close += 1,
            Err(NoPair::Degenerate) => stats.degenerate += 1,
            Ok((b, w)) if item.candidates[b] == item.candidates[w] => stats.degenerate += 1,
            Ok((b, w)) => {
                let Prompt::Chat(messages) = prompt else { unreachable!("augmentation prompts are chats") };
                pairs.push(PreferencePair {
                    query_id: q.id.clone(),
                    query: q.text.clone(),
                    passage_id: q.passage_id.clone(),
                    prompt: messages.clone(),
                    chosen: item.candidates[b].clone(),
                    rejected: item.candidates[w].clone(),
                    chosen_score: s.scores[b],
                    rejected_score: s.scores[w],
                    raw_score: raw,
                    candidates: item.candidates.clone(),
                    scores: s.scores.clone(),
                });
            }
        }
    }
    let n = scored.len().max(1) as f64;
    stats.mean_raw = scored.iter().filter_map(|s| s.baseline).sum::<f64>() / n;
    stats.mean_best = scored.iter().map(|s| s.scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max)).sum::<f64>() / n;
    stats.mean_worst = scored.iter().map(|s| s.scores.iter().cloned().fold(f64::INFINITY, f64::min)).sum::<f64>() / n;
    stats.pairs = pairs.len();
    write_jsonl(&out_dir.join("pairs.jsonl"), &pairs)?;
    write_jsonl(&out_dir.join("dpo.jsonl"), &pairs.iter().map(sharegpt_row).collect::<Vec<_>>())?;
    write_json(&out_dir.join("dataset_info.json"), &dataset_info("rir_rlrf"))?;
    write_json(&out_dir.join("rlrf.stats.json"), &stats)?;
    Ok((pairs, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_rule() {
        // Best beats raw and is far enough from the worst.
        assert_eq!(pair_rule(0.5, &[0.52, 0.60, 0.45], 0.8, 0.95), Ok((1, 2)));
        // Nothing beats the query alone.
        assert_eq!(pair_rule(0.7, &[0.52, 0.60, 0.45], 0.8, 0.95), Err(NoPair::NoGain));
        // Best is 0.105 over w·raw = 0.4; 0.95 of that (0.09975) < the worst's 0.102.
        assert_eq!(pair_rule(0.5, &[0.505, 0.502, 0.503], 0.8, 0.95), Err(NoPair::TooClose));
        assert_eq!(pair_rule(0.5, &[0.6], 0.8, 0.95), Err(NoPair::Degenerate));
    }

    #[test]
    fn sharegpt_rows_follow_llama_factory() {
        let p = PreferencePair {
            query_id: "q".into(),
            query: "q".into(),
            passage_id: "d".into(),
            prompt: vec![Message::system("sys"), Message::user("write")],
            chosen: "good".into(),
            rejected: "bad".into(),
            chosen_score: 1.0,
            rejected_score: 0.0,
            raw_score: 0.5,
            candidates: vec![],
            scores: vec![],
        };
        let r = sharegpt_row(&p);
        assert_eq!(r["conversations"][0]["from"], "human");
        assert_eq!(r["conversations"].as_array().unwrap().len(), 1);
        assert_eq!(r["system"], "sys");
        assert_eq!(r["chosen"]["from"], "gpt");
        assert_eq!(r["rejected"]["value"], "bad");
        assert_eq!(dataset_info("x")["x"]["ranking"], true);
    }
}
