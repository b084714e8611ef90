//! The retrieval engine every stage runs on, in pipeline order: data →
//! encode (and generate) → search → metrics → significance → report.

pub mod data;
pub mod texts;
pub mod prompts;
pub mod encode;
pub mod generate;
pub mod served;
pub mod search;
pub mod lexical;
pub mod fusion;
pub mod metrics;
pub mod stats;
pub mod runfile;
pub mod report;
pub mod mteb;
pub mod plots;
