//! Retriever feedback for RLRF (DESIGN §1.2): for a query q, its source
//! passage d and augmentations a₁..a_k, with the retriever E in use,
//!
//! - baseline `raw = e_q(q)·e_c(d)`,
//! - `s_i = (w·e_q(q) + (1−w)·e_c(P + a_i))·e_c(d)`,
//!
//! where `e_q` is the query-side encoding (with the retriever's query
//! instruction), `e_c` the corpus side, P the prefix inference uses, and w
//! the query weight. The augmentation is encoded on the corpus side because
//! inference encodes it there.
//!
//! w is reported with the scores (`RewardScores::query_weight`), so the
//! host's pair rule uses the reward's w; the defaults of w and P are
//! `rir_sdk::method`'s.
//!
//! ```toml
//! query_weight = 0.8
//! prefix = "Generate the topic about this passage: "
//! query_instruction = "..."   # optional; default: the retriever's own
//! ```

use rir_sdk::{config, PluginError, PluginResult, Reward, RewardContext, RewardItem, RewardScores};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrieverRewardConfig {
    #[serde(default = "d_w")]
    pub query_weight: f32,
    #[serde(default = "d_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub query_instruction: Option<String>,
}
fn d_w() -> f32 {
    rir_sdk::method::QUERY_WEIGHT as f32
}
fn d_prefix() -> String {
    rir_sdk::method::AUGMENTATION_PREFIX.into()
}

pub struct RetrieverReward {
    cfg: RetrieverRewardConfig,
}

impl RetrieverReward {
    /// The config, parsed and checked (what `validate` runs too).
    pub fn checked(config_toml: &str) -> PluginResult<RetrieverRewardConfig> {
        let cfg: RetrieverRewardConfig = config::parse(config_toml)?;
        if !(0.0..=1.0).contains(&cfg.query_weight) {
            return Err(PluginError::config(format!("query_weight: {} is not in [0, 1]", cfg.query_weight)));
        }
        Ok(cfg)
    }

    pub fn new(config_toml: &str) -> PluginResult<Self> {
        Ok(Self { cfg: Self::checked(config_toml)? })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

impl Reward for RetrieverReward {
    fn score(&self, ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let r = ctx.retriever.ok_or_else(|| PluginError::config("retriever-reward needs the stage's retriever"))?;
        let queries: Vec<String> = items.iter().map(|i| i.query.clone()).collect();
        let passages: Vec<String> = items.iter().map(|i| i.reference.clone()).collect();
        let augs: Vec<String> = items.iter().flat_map(|i| i.candidates.iter().map(|c| format!("{}{c}", self.cfg.prefix))).collect();
        let instr = self.cfg.query_instruction.as_deref();
        let eq = r.encode_queries(&queries, instr)?;
        let ed = r.encode_corpus(&passages)?;
        let ea = if augs.is_empty() { None } else { Some(r.encode_corpus(&augs)?) };
        let w = self.cfg.query_weight as f64;
        let mut at = 0;
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let (q, d) = (eq.row(i), ed.row(i));
                let raw = dot(q, d);
                let scores = (0..item.candidates.len())
                    .map(|_| {
                        let a = ea.as_ref().map(|e| e.row(at)).unwrap_or(&[]);
                        at += 1;
                        w * raw + (1.0 - w) * dot(a, d)
                    })
                    .collect();
                // w goes back with the scores: the host's pair rule reads it.
                RewardScores { baseline: Some(raw), scores, query_weight: Some(w), fallbacks: 0 }
            })
            .collect())
    }
}

rir_sdk::export_plugin! {
    name: "retriever-reward",
    description: "Reinforced-IR retriever feedback: (w·e_q(q) + (1−w)·e_c(P + a))·e_c(d) against e_q(q)·e_c(d)",
    reward: RetrieverReward::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Reward => RetrieverReward::checked(text).map(drop),
        _ => Ok(()),
    },
}
