//! A third-party plugin: a reward written against `rir-sdk` alone, built as
//! its own shared library and loaded by `rir` through registry.toml.
//!
//!     cargo build --release --example third_party_reward
//!
//! ```toml
//! # registry.toml
//! [plugins.overlap-reward]
//! kinds = ["reward"]
//! library = "target/release/examples/libthird_party_reward.so"
//! description = "Lexical retriever feedback: the passage's words an augmentation covers"
//! ```
//!
//! It is retriever feedback without a model: an augmentation scores the
//! share of its source passage's distinct words (lower-cased, `min_len`
//! characters or longer) that it contains, and the baseline is the query's
//! own share, so rlrf-data's pair rule prefers augmentations that restate
//! the passage's vocabulary. Use it as `[rewards.retriever] plugin =
//! "overlap-reward"`; copy this file into a crate of its own (see
//! plugins/example-hash) to ship it.

use std::collections::HashSet;

use rir_sdk::{config, PluginResult, Reward, RewardContext, RewardItem, RewardScores};
use serde::Deserialize;

/// The plugin's config table; unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlapConfig {
    /// Words shorter than this are not counted (stopword-ish).
    pub min_len: usize,
}

impl Default for OverlapConfig {
    fn default() -> Self {
        Self { min_len: 4 }
    }
}

/// The reward object the host creates from the config table.
pub struct OverlapReward {
    cfg: OverlapConfig,
}

impl OverlapReward {
    /// Parses and checks the config (what `validate` runs too).
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg: OverlapConfig = config::parse(config_toml)?;
        if cfg.min_len == 0 {
            return Err(rir_sdk::PluginError::config("min_len must be at least 1"));
        }
        Ok(Self { cfg })
    }

    fn words(&self, text: &str) -> HashSet<String> {
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| w.chars().count() >= self.cfg.min_len).map(str::to_lowercase).collect()
    }

    fn coverage(&self, passage: &HashSet<String>, text: &str) -> f64 {
        if passage.is_empty() {
            return 0.0;
        }
        let w = self.words(text);
        passage.iter().filter(|p| w.contains(*p)).count() as f64 / passage.len() as f64
    }
}

impl Reward for OverlapReward {
    fn score(&self, _ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        Ok(items
            .iter()
            .map(|item| {
                let passage = self.words(&item.reference);
                RewardScores {
                    baseline: Some(self.coverage(&passage, &item.query)),
                    scores: item.candidates.iter().map(|c| self.coverage(&passage, c)).collect(),
                    // Not a mix of embeddings: the pair rule's w = 0 (no query term).
                    query_weight: Some(0.0),
                    fallbacks: 0,
                }
            })
            .collect())
    }
}

rir_sdk::export_plugin! {
    name: "overlap-reward",
    description: "Lexical retriever feedback: the share of the passage's words an augmentation covers",
    reward: OverlapReward::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Reward => OverlapReward::new(text).map(drop),
        _ => Ok(()),
    },
}
