//! Retriever fine-tuning with FlagEmbedding (`FlagEmbedding.finetune.
//! embedder.encoder_only.base`) under torchrun: the multi-GPU path for
//! RLGF. The job's data is the rlgf-data stage's `distill.jsonl`, already in
//! FlagEmbedding's format (`query`, `pos`, `neg`, `pos_scores`,
//! `neg_scores`; the extra `answer` and id fields are ignored by it), trained
//! with knowledge distillation from the generator's order (KL loss,
//! temperature 0.02). FlagEmbedding has no query–answer InfoNCE term: the
//! contrastive-trainer plugin adds it on the CPU path.
//!
//! The command is written to `output_dir/train.sh` and run when `torchrun`
//! and FlagEmbedding are importable with `python`; otherwise the job fails
//! saying how to run the script (`dry_run = true` only writes it).
//!
//! Job params:
//! ```toml
//! nproc_per_node = 1
//! learning_rate = 1e-5
//! epochs = 1.0
//! batch_size = 2               # per device
//! group_size = 16              # train_group_size: 1 positive + 15 negatives
//! query_max_len = 64
//! passage_max_len = 256
//! temperature = 0.02
//! pooling = "cls"              # cls | mean | last_token
//! normalize = true
//! query_instruction = ""       # FlagEmbedding's query_instruction_for_retrieval
//! warmup_ratio = 0.1
//! fp16 = true
//! deepspeed_stage = 1          # ZeRO stage of the written ds_config.json (0: none), as the authors trained
//! gradient_checkpointing = true
//! python = "python"
//! torchrun = "torchrun"
//! dry_run = false
//! ```

use std::process::Command;
use std::time::Instant;

use rir_sdk::{config, PluginError, PluginResult, Progress, ProgressSink, TrainJob, TrainReport, Trainer};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct FeParams {
    #[serde(default = "d_one_u")]
    pub nproc_per_node: u32,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_one")]
    pub epochs: f64,
    #[serde(default = "d_batch")]
    pub batch_size: u32,
    #[serde(default = "d_group")]
    pub group_size: u32,
    #[serde(default = "d_qlen")]
    pub query_max_len: u32,
    #[serde(default = "d_plen")]
    pub passage_max_len: u32,
    #[serde(default = "d_temp")]
    pub temperature: f64,
    #[serde(default = "d_pool")]
    pub pooling: String,
    #[serde(default = "d_true")]
    pub normalize: bool,
    #[serde(default)]
    pub query_instruction: String,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_true")]
    pub fp16: bool,
    #[serde(default = "d_stage")]
    pub deepspeed_stage: u8,
    #[serde(default = "d_true")]
    pub gradient_checkpointing: bool,
    #[serde(default = "d_python")]
    pub python: String,
    #[serde(default = "d_torchrun")]
    pub torchrun: String,
    #[serde(default)]
    pub dry_run: bool,
}
fn d_one_u() -> u32 {
    1
}
fn d_stage() -> u8 {
    1
}
fn d_lr() -> f64 {
    1e-5
}
fn d_one() -> f64 {
    1.0
}
fn d_batch() -> u32 {
    2
}
fn d_group() -> u32 {
    16
}
fn d_qlen() -> u32 {
    64
}
fn d_plen() -> u32 {
    256
}
fn d_temp() -> f64 {
    0.02
}
fn d_pool() -> String {
    "cls".into()
}
fn d_true() -> bool {
    true
}
fn d_warmup() -> f64 {
    0.1
}
fn d_python() -> String {
    "python".into()
}
fn d_torchrun() -> String {
    "torchrun".into()
}

/// The module FlagEmbedding runs for encoder-only embedders.
pub const MODULE: &str = "FlagEmbedding.finetune.embedder.encoder_only.base";

/// FlagEmbedding's (and transformers') arguments for the job, `--name value`.
pub fn arguments(job: &TrainJob, p: &FeParams) -> Vec<(String, String)> {
    let s = |v: &dyn ToString| v.to_string();
    let mut args: Vec<(String, String)> = vec![
        ("model_name_or_path".into(), job.base_model.clone()),
        ("train_data".into(), job.data_file.display().to_string()),
        ("train_group_size".into(), s(&p.group_size)),
        ("query_max_len".into(), s(&p.query_max_len)),
        ("passage_max_len".into(), s(&p.passage_max_len)),
        ("query_instruction_for_retrieval".into(), p.query_instruction.clone()),
        ("query_instruction_format".into(), "{}{}".into()),
        ("knowledge_distillation".into(), "True".into()),
        ("kd_loss_type".into(), "kl_div".into()),
        ("temperature".into(), s(&p.temperature)),
        ("sentence_pooling_method".into(), p.pooling.clone()),
        ("normalize_embeddings".into(), if p.normalize { "True" } else { "False" }.into()),
        ("negatives_cross_device".into(), "True".into()),
        ("output_dir".into(), job.output_dir.join("model").display().to_string()),
        ("overwrite_output_dir".into(), "True".into()),
        ("learning_rate".into(), s(&p.learning_rate)),
        ("num_train_epochs".into(), s(&p.epochs)),
        ("per_device_train_batch_size".into(), s(&p.batch_size)),
        ("warmup_ratio".into(), s(&p.warmup_ratio)),
        ("dataloader_drop_last".into(), "True".into()),
        ("logging_steps".into(), "1".into()),
        ("save_strategy".into(), "no".into()),
        ("fp16".into(), if p.fp16 { "True" } else { "False" }.into()),
        ("report_to".into(), "none".into()),
        ("gradient_checkpointing".into(), if p.gradient_checkpointing { "True" } else { "False" }.into()),
    ];
    if p.deepspeed_stage > 0 {
        args.push(("deepspeed".into(), job.output_dir.join(DS_CONFIG).display().to_string()));
    }
    args
}

/// The DeepSpeed config the script names (written beside it).
pub const DS_CONFIG: &str = "ds_config.json";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// train.sh: the torchrun command.
pub fn script(job: &TrainJob, p: &FeParams) -> String {
    let mut cmd = format!("#!/bin/sh\nset -e\nexec {} --nproc_per_node {} -m {MODULE}", p.torchrun, p.nproc_per_node);
    for (k, v) in arguments(job, p) {
        cmd.push_str(&format!(" \\\n  --{k} {}", quote(&v)));
    }
    cmd.push('\n');
    cmd
}

pub struct FlagEmbeddingTrainer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

impl FlagEmbeddingTrainer {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let _: NoKeys = config::parse(config_toml)?;
        Ok(Self)
    }
}

impl Trainer for FlagEmbeddingTrainer {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        let p: FeParams = config::parse(&job.params)?;
        let t0 = Instant::now();
        std::fs::create_dir_all(&job.output_dir)?;
        if !job.data_file.is_file() {
            return Err(PluginError::input(format!("{}: no such training file", job.data_file.display())));
        }
        if p.deepspeed_stage > 3 {
            return Err(PluginError::config(format!("deepspeed_stage: {} (0 for none, or a ZeRO stage 1 | 2 | 3)", p.deepspeed_stage)));
        }
        if p.deepspeed_stage > 0 {
            std::fs::write(job.output_dir.join(DS_CONFIG), rir_sdk::launch::deepspeed_zero_config(p.deepspeed_stage))?;
        }
        let sh = job.output_dir.join("train.sh");
        std::fs::write(&sh, script(job, &p))?;
        let report = || TrainReport {
            model_dir: job.output_dir.join("model"),
            steps: 0,
            seconds: t0.elapsed().as_secs_f64(),
            loss: vec![],
            extra_json: serde_json::json!({"script": sh}).to_string(),
        };
        if p.dry_run {
            return Ok(report());
        }
        if missing(&p).is_some() {
            return Err(PluginError::Unsupported(format!(
                "FlagEmbedding and torchrun are not available here (pip install FlagEmbedding on a GPU machine); the command is written: sh {}",
                sh.display()
            )));
        }
        progress.report(&Progress { stage: "flagembedding".into(), done: 0, total: 1, loss: None, message: String::new() });
        let log = job.output_dir.join("train.log");
        let out = std::fs::File::create(&log)?;
        let status = Command::new("sh").arg(&sh).stdout(out.try_clone()?).stderr(out).status()?;
        if !status.success() {
            return Err(PluginError::other(format!("FlagEmbedding training failed ({status}); see {}", log.display())));
        }
        Ok(report())
    }
}

/// What of FlagEmbedding's stack is not here: its Python package (with
/// torch) and torchrun.
fn missing(p: &FeParams) -> Option<String> {
    let mut gone = Vec::new();
    if !Command::new(&p.python).args(["-c", "import FlagEmbedding, torch"]).output().is_ok_and(|o| o.status.success()) {
        gone.push(format!("FlagEmbedding and torch for `{}`", p.python));
    }
    if Command::new(&p.torchrun).arg("--help").output().is_err() {
        gone.push(format!("`{}`", p.torchrun));
    }
    (!gone.is_empty()).then(|| format!("{} {} not installed here (pip install FlagEmbedding, on a GPU machine)", gone.join(" and "), if gone.len() > 1 { "are" } else { "is" }))
}

/// What a job with these params runs that is not here (nothing for `dry_run`).
fn requirements(params: &str) -> PluginResult<()> {
    let p: FeParams = config::parse(params)?;
    match missing(&p) {
        Some(m) if !p.dry_run => Err(PluginError::resource(m)),
        _ => Ok(()),
    }
}

rir_sdk::export_plugin! {
    name: "flagembedding-trainer",
    description: "Retriever fine-tuning with FlagEmbedding under torchrun (knowledge distillation from the generator's order)",
    trainer: FlagEmbeddingTrainer::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Trainer => config::check::<NoKeys>(text),
        rir_sdk::ConfigOf::Params => config::check::<FeParams>(text),
        rir_sdk::ConfigOf::Requirements => requirements(text),
        _ => Ok(()),
    },
}
