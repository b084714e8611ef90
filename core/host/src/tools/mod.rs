//! Beside the pipeline: a generator behind an OpenAI-compatible HTTP API
//! (`rir serve`) and the benchmarks (`rir bench`).

pub mod bench;
pub mod serve;
