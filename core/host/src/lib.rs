//! The rir host. Modules read in the order the pipeline runs:
//! plugins (registry, loading) → data → encode → search → metrics → report,
//! with `eval` tying them together; generation and prompts serve the
//! generator-augmented retrieval of Reinforced-IR.

pub mod error;
pub mod logging;
pub mod paths;
pub mod plugins;
pub mod registry;
pub mod suggest;
pub mod progress;
pub mod files;
pub mod defaults;

pub mod data;
pub mod encode;
pub mod generate;
pub mod prompts;
pub mod search;
pub mod metrics;
pub mod runfile;
pub mod stats;
pub mod report;
pub mod eval;
pub mod texts;
pub mod bench;
pub mod serve;
pub mod queries;
pub mod rlrf;
pub mod rlgf;
pub mod train;
pub mod experiment;

pub use error::HostError;
pub use plugins::{HostSettings, Plugin, PluginHost, Status};
pub use registry::{Kind, Registry};
