//! DPO with LoRA through LLaMA-Factory: the job's data (LLaMA-Factory's
//! sharegpt "ranking" jsonl, as `rir rlrf-data` writes it) is copied next to
//! a `dataset_info.json`, a training config (`train.yaml`) and a merge config
//! (`export.yaml`) are written, and `llamafactory-cli train` then
//! `llamafactory-cli export` run (under `launcher`, e.g. `torchrun ...` or
//! `FORCE_TORCHRUN=1` in `env`, for several GPUs). Without llamafactory-cli
//! the files are still written and the job fails with a message saying how to
//! run them; `dry_run = true` writes them and stops without error.
//!
//! Job params (defaults are the Reinforced-IR authors' generator training:
//! their `llamafactory-cli train` command, DeepSpeed ZeRO stage 1):
//! ```toml
//! template = "llama3"          # LLaMA-Factory chat template of the base model
//! beta = 0.1                   # pref_beta (sigmoid loss)
//! lora_rank = 32
//! lora_alpha = 64
//! lora_target = "all"
//! learning_rate = 1e-5
//! epochs = 1.0
//! warmup_ratio = 0.0
//! per_device_batch = 4
//! grad_accum = 1
//! cutoff_len = 4096
//! bf16 = true
//! deepspeed_stage = 1          # ZeRO stage of the written ds_config.json (0: no DeepSpeed)
//! nproc_per_node = 0           # GPUs: 0 lets LLaMA-Factory use every visible one; N sets
//!                              # FORCE_TORCHRUN=1 and NPROC_PER_NODE=N
//! cli = "llamafactory-cli"     # or a full path
//! env = { FORCE_TORCHRUN = "1" }   # extra environment for the runs
//! dry_run = false
//! ```
//!
//! Output: `output_dir/adapter` (LLaMA-Factory's LoRA, PEFT format) and
//! `output_dir/merged` (the merged HF model; the report's `model_dir`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rir_sdk::{config, PluginError, PluginResult, Progress, ProgressSink, TrainJob, TrainReport, Trainer};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LfParams {
    #[serde(default = "d_template")]
    pub template: String,
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_rank")]
    pub lora_rank: u32,
    #[serde(default = "d_alpha")]
    pub lora_alpha: u32,
    #[serde(default = "d_target")]
    pub lora_target: String,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_one")]
    pub epochs: f64,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_batch")]
    pub per_device_batch: u32,
    #[serde(default = "d_accum")]
    pub grad_accum: u32,
    #[serde(default = "d_cutoff")]
    pub cutoff_len: u32,
    #[serde(default = "d_true")]
    pub bf16: bool,
    #[serde(default = "d_stage")]
    pub deepspeed_stage: u8,
    #[serde(default)]
    pub nproc_per_node: u32,
    #[serde(default = "d_cli")]
    pub cli: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub dry_run: bool,
}
fn d_template() -> String {
    "llama3".into()
}
fn d_beta() -> f64 {
    0.1
}
fn d_rank() -> u32 {
    32
}
fn d_alpha() -> u32 {
    64
}
fn d_target() -> String {
    "all".into()
}
fn d_lr() -> f64 {
    1e-5
}
fn d_one() -> f64 {
    1.0
}
fn d_warmup() -> f64 {
    0.0
}
fn d_batch() -> u32 {
    4
}
fn d_accum() -> u32 {
    1
}
fn d_cutoff() -> u32 {
    4096
}
fn d_stage() -> u8 {
    1
}
fn d_true() -> bool {
    true
}
fn d_cli() -> String {
    "llamafactory-cli".into()
}

/// The dataset name the configs use.
pub const DATASET: &str = "rir_dpo";

/// One YAML scalar: strings quoted as JSON (valid YAML), numbers and booleans bare.
fn yaml(entries: &[(&str, serde_json::Value)]) -> String {
    entries.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

/// train.yaml for `llamafactory-cli train`.
pub fn train_yaml(job: &TrainJob, p: &LfParams, dataset_dir: &Path) -> String {
    use serde_json::json;
    let mut entries = vec![
        ("model_name_or_path", json!(job.base_model)),
        ("trust_remote_code", json!(true)),
        ("stage", json!("dpo")),
        ("do_train", json!(true)),
        ("finetuning_type", json!("lora")),
        ("lora_rank", json!(p.lora_rank)),
        ("lora_alpha", json!(p.lora_alpha)),
        ("lora_target", json!(p.lora_target)),
        ("pref_beta", json!(p.beta)),
        ("pref_loss", json!("sigmoid")),
        ("dataset", json!(DATASET)),
        ("dataset_dir", json!(dataset_dir)),
        ("template", json!(p.template)),
        ("cutoff_len", json!(p.cutoff_len)),
        ("overwrite_cache", json!(true)),
        ("output_dir", json!(job.output_dir.join("adapter"))),
        ("logging_steps", json!(1)),
        ("save_strategy", json!("no")),
        ("plot_loss", json!(true)),
        ("overwrite_output_dir", json!(true)),
        ("report_to", json!("none")),
        ("per_device_train_batch_size", json!(p.per_device_batch)),
        ("gradient_accumulation_steps", json!(p.grad_accum)),
        ("learning_rate", json!(p.learning_rate)),
        ("num_train_epochs", json!(p.epochs)),
        ("lr_scheduler_type", json!("cosine")),
        ("warmup_ratio", json!(p.warmup_ratio)),
        ("bf16", json!(p.bf16)),
    ];
    if p.deepspeed_stage > 0 {
        entries.push(("deepspeed", json!(job.output_dir.join(DS_CONFIG))));
    }
    yaml(&entries)
}

/// The DeepSpeed config train.yaml names (written beside it).
pub const DS_CONFIG: &str = "ds_config.json";

/// export.yaml for `llamafactory-cli export` (merge the adapter).
pub fn export_yaml(job: &TrainJob, p: &LfParams) -> String {
    use serde_json::json;
    yaml(&[
        ("model_name_or_path", json!(job.base_model)),
        ("adapter_name_or_path", json!(job.output_dir.join("adapter"))),
        ("template", json!(p.template)),
        ("finetuning_type", json!("lora")),
        ("trust_remote_code", json!(true)),
        ("export_dir", json!(job.output_dir.join("merged"))),
        ("export_size", json!(5)),
        ("export_device", json!("cpu")),
        ("export_legacy_format", json!(false)),
    ])
}

/// dataset_info.json entry for the sharegpt ranking data.
pub fn dataset_info() -> serde_json::Value {
    serde_json::json!({
        DATASET: {
            "file_name": "dpo.jsonl",
            "formatting": "sharegpt",
            "ranking": true,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"},
        }
    })
}

/// Writes data, dataset_info.json, train.yaml and export.yaml under the
/// output directory.
pub fn write_files(job: &TrainJob, p: &LfParams) -> PluginResult<()> {
    let data_dir = job.output_dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    std::fs::copy(&job.data_file, data_dir.join("dpo.jsonl"))
        .map_err(|e| PluginError::input(format!("{}: {e}", job.data_file.display())))?;
    std::fs::write(data_dir.join("dataset_info.json"), serde_json::to_string_pretty(&dataset_info()).unwrap_or_default())?;
    std::fs::write(job.output_dir.join("train.yaml"), train_yaml(job, p, &data_dir))?;
    std::fs::write(job.output_dir.join("export.yaml"), export_yaml(job, p))?;
    if p.deepspeed_stage > 0 {
        std::fs::write(job.output_dir.join(DS_CONFIG), rir_sdk::launch::deepspeed_zero_config(p.deepspeed_stage))?;
    }
    Ok(())
}

/// The environment of the `llamafactory-cli` runs: `env`, and for
/// `nproc_per_node` N > 0 LLaMA-Factory's own torchrun switches.
pub fn run_env(p: &LfParams) -> BTreeMap<String, String> {
    let mut env = p.env.clone();
    if p.nproc_per_node > 0 {
        env.insert("FORCE_TORCHRUN".into(), "1".into());
        env.insert("NPROC_PER_NODE".into(), p.nproc_per_node.to_string());
    }
    env
}

/// Whether `cli` can be started.
fn available(cli: &str) -> bool {
    Command::new(cli).arg("version").output().is_ok()
}

/// What a job with these params runs that is not here (nothing for `dry_run`).
fn requirements(params: &str) -> PluginResult<()> {
    let p: LfParams = config::parse(params)?;
    if p.dry_run || available(&p.cli) {
        return Ok(());
    }
    Err(PluginError::resource(format!("`{}` is not installed here (pip install llamafactory, on a GPU machine)", p.cli)))
}

pub struct LlamaFactoryTrainer;

impl LlamaFactoryTrainer {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let _: NoKeys = config::parse(config_toml)?;
        Ok(Self)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

impl Trainer for LlamaFactoryTrainer {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        let p: LfParams = config::parse(&job.params)?;
        if p.deepspeed_stage > 3 {
            return Err(PluginError::config(format!("deepspeed_stage: {} (0 for none, or a ZeRO stage 1 | 2 | 3)", p.deepspeed_stage)));
        }
        let t0 = Instant::now();
        write_files(job, &p)?;
        let report = |steps: u64, extra: serde_json::Value| TrainReport {
            model_dir: job.output_dir.join("merged"),
            steps,
            seconds: t0.elapsed().as_secs_f64(),
            loss: vec![],
            extra_json: extra.to_string(),
        };
        if p.dry_run {
            return Ok(report(0, serde_json::json!({"dry_run": true, "train_yaml": job.output_dir.join("train.yaml"), "env": run_env(&p)})));
        }
        if !available(&p.cli) {
            return Err(PluginError::Unsupported(format!(
                "{} is not installed here (pip install llamafactory on a GPU machine); the configs are written: run `{} train {}` then `{} export {}`",
                p.cli,
                p.cli,
                job.output_dir.join("train.yaml").display(),
                p.cli,
                job.output_dir.join("export.yaml").display()
            )));
        }
        for (i, (what, file)) in [("train", "train.yaml"), ("export", "export.yaml")].iter().enumerate() {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            progress.report(&Progress { stage: format!("llamafactory {what}"), done: i as u64, total: 2, loss: None, message: String::new() });
            let log = job.output_dir.join(format!("{what}.log"));
            let out = std::fs::File::create(&log)?;
            let status = Command::new(&p.cli)
                .arg(what)
                .arg(job.output_dir.join(file))
                .envs(run_env(&p))
                .stdout(out.try_clone()?)
                .stderr(out)
                .status()
                .map_err(|e| PluginError::resource(format!("{}: {e}", p.cli)))?;
            if !status.success() {
                return Err(PluginError::other(format!("`{} {what}` failed ({status}); see {}", p.cli, log.display())));
            }
        }
        // LLaMA-Factory's trainer_log.jsonl carries the per-step loss.
        let mut loss = Vec::new();
        if let Ok(text) = std::fs::read_to_string(job.output_dir.join("adapter/trainer_log.jsonl")) {
            for line in text.lines() {
                if let Some(l) = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["loss"].as_f64()) {
                    loss.push(l);
                }
            }
        }
        let mut r = report(loss.len() as u64, serde_json::json!({"adapter_dir": job.output_dir.join("adapter")}));
        r.loss = loss;
        Ok(r)
    }
}

rir_sdk::export_plugin! {
    name: "llamafactory-trainer",
    description: "DPO+LoRA via LLaMA-Factory (llamafactory-cli train, then export); for large models on GPUs",
    trainer: LlamaFactoryTrainer::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Trainer => config::check::<NoKeys>(text),
        rir_sdk::ConfigOf::Params => config::check::<LfParams>(text),
        rir_sdk::ConfigOf::Requirements => requirements(text),
        _ => Ok(()),
    },
}
