//! The rir host, as a library (the `rir` binary is a thin layer over it).
//! Its folders read as the pipeline does:
//!
//! - [`plugins`]: the registry and loading plugins through the stable ABI;
//! - [`engine`]: what every stage uses: BEIR data, encoding and generation
//!   through their caches, prompts, exact search, metrics, significance
//!   tests, run files and comparison tables;
//! - [`stages`]: the Reinforced-IR stages (pseudo queries, RLRF data, RLGF
//!   data, training, evaluation);
//! - [`experiment`]: `rir run`'s plan over those stages, cached by content;
//! - [`model`]: a Reinforced-IR model in code (retriever + optional
//!   generator) for one's own texts: `encode_queries`, `encode_corpus`,
//!   similarity and search;
//! - [`tools`]: serving a generator over HTTP and the benchmarks;
//! - [`util`]: logging, progress, paths, files and serde defaults.

#![warn(missing_docs)]

pub mod error;
pub mod util;
pub mod plugins;
pub mod engine;
pub mod stages;
pub mod experiment;
pub mod model;
pub mod tools;

pub use error::HostError;
pub use plugins::registry::{Kind, Registry};
pub use plugins::{HostSettings, Plugin, PluginHost, Status};
