//! The Reinforced-IR stages, in the order a round runs them: pseudo queries,
//! RLRF's preference data, RLGF's distillation data, training a model with a
//! Trainer plugin, and evaluation on a BEIR dataset.
//!
//! Each data stage is one type implementing [`DataStage`]: its config (serde,
//! unknown keys refused), what it reads ([`Needs`]), its outputs and `run`
//! over a [`Context`] of *loaded* plugins and caches. `rir run`'s plan
//! ([`crate::experiment`]) and the per-stage subcommands ([`cli`]) are both
//! built from these definitions; a new stage is one new file, its
//! [`Stage`] variant and one line in the plan.

pub mod cli;
pub mod queries;
pub mod rlrf;
pub mod rlgf;
pub mod train;
pub mod eval;
pub mod fuse;
pub mod rerank;
pub mod estimate;

use std::path::Path;

use rir_sdk::{Generator, Retriever, Reward, TextRetriever};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::engine::data::Dataset;
use crate::engine::encode::EmbeddingCache;
use crate::engine::generate::GenerationCache;
use crate::engine::prompts::Task;
use crate::error::HostError;
use crate::stages::queries::PseudoQuery;

/// The stages, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Stage {
    /// Pseudo queries from sampled passages (the base generator).
    Queries,
    /// RLRF's preference pairs (augmentations scored by the retriever).
    RlrfData,
    /// RLRF's DPO of the generator.
    RlrfTrain,
    /// RLGF's distillation data (candidates scored by the generator).
    RlgfData,
    /// RLGF's training of the retriever.
    RlgfTrain,
    /// Every variant evaluated.
    Eval,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 6] = [Stage::Queries, Stage::RlrfData, Stage::RlrfTrain, Stage::RlgfData, Stage::RlgfTrain, Stage::Eval];
    /// The name the CLI and messages use (`rlrf-data`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queries => "queries",
            Stage::RlrfData => "rlrf-data",
            Stage::RlrfTrain => "rlrf-train",
            Stage::RlgfData => "rlgf-data",
            Stage::RlgfTrain => "rlgf-train",
            Stage::Eval => "eval",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Stage::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Stage::ALL.iter().map(|x| x.as_str()).collect();
            let hint = crate::util::suggest::nearest(s, names.iter().copied()).map(|h| format!("; did you mean `{h}`?")).unwrap_or_default();
            format!("unknown stage `{s}` (one of {}){hint}", names.join(", "))
        })
    }
}

/// The data stages, in pipeline order (the ones with a [`DataStage`] type).
pub const DATA_STAGES: [Stage; 3] = [Stage::Queries, Stage::RlrfData, Stage::RlgfData];

/// `dispatch_data_stage!(stage, f(args..))` calls `f::<S>(args..)` with the
/// [`DataStage`] type `S` of `stage`: the one place that maps a data stage's
/// name to its type (the CLI and the experiment plan both go through it).
macro_rules! dispatch_data_stage {
    ($stage:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $stage {
            $crate::stages::Stage::Queries => $f::<$crate::stages::queries::Queries>($($arg),*),
            $crate::stages::Stage::RlrfData => $f::<$crate::stages::rlrf::RlrfData>($($arg),*),
            $crate::stages::Stage::RlgfData => $f::<$crate::stages::rlgf::RlgfData>($($arg),*),
            other => Err($crate::HostError::Input(format!("`{other}` is not a data stage"))),
        }
    };
}
pub(crate) use dispatch_data_stage;

/// A loaded generator and the generation cache its calls go through.
#[derive(Clone, Copy)]
pub struct GeneratorIn<'a> {
    /// The generator.
    pub model: &'a dyn Generator,
    /// Its generation cache (None: caches off).
    pub cache: Option<&'a GenerationCache>,
}

/// A loaded retriever and its embedding cache.
#[derive(Clone, Copy)]
pub struct RetrieverIn<'a> {
    /// The retriever.
    pub model: &'a dyn Retriever,
    /// Its embedding cache (None: caches off).
    pub cache: Option<&'a EmbeddingCache>,
}

/// A text retriever (BM25) with its corpus index open, and its plugin's
/// name for messages.
#[derive(Clone, Copy)]
pub struct TextRetrieverIn<'a> {
    /// The registry name.
    pub plugin: &'a str,
    /// The retriever, its index of the dataset's corpus open.
    pub model: &'a dyn TextRetriever,
}

/// What a data stage runs over: the dataset and the loaded plugins it uses.
/// Fields a stage does not [need](Needs) may be `None`; asking for a
/// missing one is an error that names the stage.
pub struct Context<'a> {
    /// The dataset (its corpus; its queries and qrels are not read).
    pub dataset: &'a Dataset,
    /// The dataset's task wording for prompts.
    pub task: &'a Task,
    /// The pseudo queries of the queries stage (empty for that stage itself).
    pub queries: &'a [PseudoQuery],
    /// The generator.
    pub generator: Option<GeneratorIn<'a>>,
    /// The retriever.
    pub retriever: Option<RetrieverIn<'a>>,
    /// The reward (the feedback of the stage's loop).
    pub reward: Option<&'a dyn Reward>,
    /// A text retriever over the corpus, when the stage's config asks for
    /// one ([`DataStage::wants_text_retriever`]).
    pub text_retriever: Option<TextRetrieverIn<'a>>,
    /// Compute threads for host-side work (exact search).
    pub threads: usize,
}

impl<'a> Context<'a> {
    /// The generator, or an error naming `stage`.
    pub fn generator(&self, stage: Stage) -> Result<GeneratorIn<'a>, HostError> {
        self.generator.ok_or_else(|| HostError::Input(format!("{stage}: needs a generator")))
    }
    /// The retriever, or an error naming `stage`.
    pub fn retriever(&self, stage: Stage) -> Result<RetrieverIn<'a>, HostError> {
        self.retriever.ok_or_else(|| HostError::Input(format!("{stage}: needs a retriever")))
    }
    /// The text retriever, or an error naming `stage`.
    pub fn text_retriever(&self, stage: Stage) -> Result<TextRetrieverIn<'a>, HostError> {
        self.text_retriever.ok_or_else(|| HostError::Input(format!("{stage}: needs a text retriever")))
    }
    /// The reward, or an error naming `stage`.
    pub fn reward(&self, stage: Stage) -> Result<&'a dyn Reward, HostError> {
        self.reward.ok_or_else(|| HostError::Input(format!("{stage}: needs a reward plugin")))
    }
}

/// What a data stage reads besides the dataset; the CLI offers exactly
/// these flags and the plan loads exactly these plugins.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// queries.jsonl of the queries stage.
    pub queries: bool,
    /// What the generator is for (its flag's help text).
    pub generator: &'static str,
    /// What the retriever is for, if the stage uses one.
    pub retriever: Option<&'static str>,
    /// The reward plugin the stage uses by default and what it is for.
    pub reward: Option<(&'static str, &'static str)>,
    /// The text retriever the stage can use (loaded only when its config
    /// [asks](DataStage::wants_text_retriever)): the default and what for.
    pub text_retriever: Option<(&'static str, &'static str)>,
}

/// One data stage: its config, its inputs, its outputs and its work.
pub trait DataStage {
    /// Which stage this is.
    const STAGE: Stage;
    /// One line for `rir STAGE --help`.
    const ABOUT: &'static str;
    /// Its inputs.
    const NEEDS: Needs;
    /// The files it writes into its output directory.
    const OUTPUTS: &'static [&'static str];
    /// Its settings (`[stages.NAME]`, `--config`), unknown keys refused.
    type Config: Serialize + DeserializeOwned + Default + Clone;
    /// What it returns besides its stats (the examples written).
    type Output;
    /// What it counted (written as `*.stats.json`).
    type Stats: Serialize;
    /// Runs the stage over `ctx` into `out`.
    fn run(ctx: &Context<'_>, cfg: &Self::Config, out: &Path) -> Result<(Self::Output, Self::Stats), HostError>;
    /// Whether `cfg` makes the stage use a text retriever (its index is
    /// opened, or built, before the stage runs).
    fn wants_text_retriever(_cfg: &Self::Config) -> bool {
        false
    }
    /// The one-line summary `rir STAGE` prints.
    fn summary(stats: &Self::Stats) -> String;
    /// The config keys, for `--config`'s help: serde's own list, which
    /// `deny_unknown_fields` prints for a key that is not one of them.
    fn config_keys() -> String {
        match toml::from_str::<Self::Config>("__no_such_key__ = 0") {
            Err(e) => e.message().split_once("expected one of ").map_or(String::new(), |(_, keys)| keys.replace('`', "")),
            Ok(_) => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_are_the_config_types_own() {
        let keys = queries::Queries::config_keys();
        for k in ["passages", "max_chars", "filter", "judge"] {
            assert!(keys.split(", ").any(|x| x == k), "{k} in {keys}");
        }
        // Keys left out of serialisation when unchanged are listed too.
        assert!(rlgf::RlgfData::config_keys().split(", ").any(|x| x == "encode_batch"));
        assert!(rlrf::RlrfData::config_keys().split(", ").any(|x| x == "tau"));
    }
}
