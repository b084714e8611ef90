//! DPO (sigmoid loss) with LoRA adapters on a Llama model, on candle.
//!
//! The job's data file is LLaMA-Factory's DPO dataset in the sharegpt
//! "ranking" format, one JSON object per line (or one JSON array):
//! `{"conversations": [{"from": "system"|"human", "value": ...}, ...],
//!   "chosen": {"from": "gpt", "value": ...}, "rejected": {"from": "gpt", "value": ...}}`
//! — the file `rir`'s rlrf-data stage exports, so the same data trains here
//! or on a GPU cluster with the llamafactory-trainer.
//!
//! Parameters (the job's `params` table; defaults are Reinforced-IR's):
//! ```toml
//! beta = 0.1                    # DPO β
//! lora_rank = 32
//! lora_alpha = 64.0
//! target_modules = ["all-linear"]   # or q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
//! learning_rate = 1e-5
//! epochs = 1.0
//! warmup_ratio = 0.1            # linear warmup, then cosine decay to 0
//! grad_accum = 8                # pairs per optimiser step
//! weight_decay = 0.0            # AdamW
//! max_length = 512              # prompt + response tokens
//! max_prompt_length = 256       # longer prompts keep their end
//! seed = 42                     # adapter init and data order
//! eval_fraction = 0.1           # pairs held out (0: none); their loss/accuracy before, every
//!                               # `eval_steps` and after are reported, and the adapter with the
//!                               # lowest held-out loss is the one written (none better: the base)
//! eval_steps = 0                # 0: evaluate only before and after training
//! dtype = "f32"                 # f32 | bf16 (bf16 wants a GPU)
//! device = "cpu"                # cpu | cuda | cuda:N (`cuda` feature)
//! merge = true                  # also write the merged model
//! merge_format = "hf"           # hf | gguf-q8_0 | gguf-f16 (merged/model.gguf; needs a GGUF base)
//! pack = false                  # a pair in one row: the prompt once, no padding (below)
//! ```
//!
//! `pack = true` runs a pair as one row — prompt, chosen, rejected, the
//! rejected response masked from the chosen one and placed at the positions
//! it has after the prompt — instead of two right-padded rows that both
//! carry the prompt: the same log-probabilities and gradients (a test
//! checks them against the padded rows in f64), with the prompt's tokens
//! run once and no padding (a third less work on scifact-cpu's pairs, whose
//! prompts are as long as their responses). The numbers differ from the
//! padded rows' in the last bits (the rejected response's softmax sums run
//! over other columns), so it is off by default; the quickstart and
//! scifact-cpu set it (their tables were measured with it).
//!
//! Output (`output_dir`): `adapter/` (PEFT: adapter_model.safetensors,
//! adapter_config.json), `merged/` (an HF llama directory with the adapter
//! merged in, or with `merge_format = "gguf-…"` one `model.gguf` carrying
//! the base GGUF's metadata, which llama.cpp serves; the llama-generator
//! loads either; the report's `model_dir`),
//! and `trainer_log.jsonl` (one line per optimiser step: loss, reward
//! margin, preference accuracy, learning rate). Reference log-probabilities
//! are computed once, with the adapters off.
//!
//! Memory: each pair's gradients come from `TrainModel::logprob_grads`
//! (activation checkpointing: one layer's autograd graph alive at a time,
//! the output head in slices, no gradients for the frozen base weights);
//! held-out and reference passes keep no graph; the base model is loaded
//! again for the merge rather than kept. The quickstart's job peaks at
//! 1.37 GB, Qwen2.5 1.5B's at 9.27 GB (docs/BENCHMARKS.md, "Trainer memory").

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rir_llama::train::{dpo_loss, LoraSpec, Pass, TrainModel};
use rir_llama::prefs::{read_pairs, Pair};
use rir_llama::{Assets, Llama};
use rir_sdk::{config, PluginError, PluginResult, Progress, ProgressSink, TrainJob, TrainReport, Trainer};
use serde::Deserialize;

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct DpoParams {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default = "d_rank")]
    pub lora_rank: usize,
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "d_targets")]
    pub target_modules: Vec<String>,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_one")]
    pub epochs: f64,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_accum")]
    pub grad_accum: usize,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_len")]
    pub max_length: usize,
    #[serde(default = "d_plen")]
    pub max_prompt_length: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub eval_steps: usize,
    #[serde(default = "d_dtype")]
    pub dtype: String,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default = "d_true")]
    pub merge: bool,
    /// How the merged model is written: `hf` (an f32 HF directory) or
    /// `gguf-q8_0` / `gguf-f16` (`merged/model.gguf`, the base GGUF's
    /// metadata, what llama.cpp serves and the llama-generator maps
    /// without an f32 copy). GGUF needs a GGUF base.
    #[serde(default = "d_merge_format")]
    pub merge_format: String,
    #[serde(default)]
    pub pack: bool,
}
fn d_merge_format() -> String {
    "hf".into()
}
fn d_beta() -> f64 {
    0.1
}
fn d_rank() -> usize {
    32
}
fn d_alpha() -> f64 {
    64.0
}
fn d_targets() -> Vec<String> {
    vec!["all-linear".into()]
}
fn d_lr() -> f64 {
    1e-5
}
fn d_one() -> f64 {
    1.0
}
fn d_warmup() -> f64 {
    0.1
}
fn d_accum() -> usize {
    8
}
fn d_len() -> usize {
    512
}
fn d_plen() -> usize {
    256
}
fn d_seed() -> u64 {
    42
}
fn d_eval_fraction() -> f64 {
    0.1
}
fn d_dtype() -> String {
    "f32".into()
}
fn d_device() -> String {
    "cpu".into()
}
fn d_true() -> bool {
    true
}

/// A pair as token ids: the prompt, then each response followed by EOS.
struct Encoded {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
}

fn encode(assets: &Assets, p: &Pair, max_len: usize, max_prompt: usize) -> PluginResult<Encoded> {
    let enc = |t: &str| -> PluginResult<Vec<u32>> {
        Ok(assets.tokenizer.encode(t, false).map_err(|e| PluginError::input(format!("tokenizer: {e}")))?.get_ids().to_vec())
    };
    let mut prompt = enc(&rir_llama::render_chat(assets, &p.messages)?)?;
    if prompt.len() > max_prompt {
        prompt.drain(..prompt.len() - max_prompt);
    }
    let eos = assets.eos_ids[0];
    let room = max_len.saturating_sub(prompt.len()).max(1);
    let resp = |t: &str| -> PluginResult<Vec<u32>> {
        let mut v = enc(t)?;
        v.push(eos);
        v.truncate(room);
        Ok(v)
    };
    Ok(Encoded { chosen: resp(&p.chosen)?, rejected: resp(&p.rejected)?, prompt })
}

/// The two sequences of a pair, right-padded into one (2, L) batch.
fn batch(e: &Encoded, dev: &Device) -> candle_core::Result<(Tensor, [usize; 2])> {
    let (c, r) = ([&e.prompt[..], &e.chosen[..]].concat(), [&e.prompt[..], &e.rejected[..]].concat());
    let l = c.len().max(r.len());
    let pad = |mut v: Vec<u32>| {
        v.resize(l, 0);
        v
    };
    let lens = [c.len(), r.len()];
    Ok((Tensor::new(vec![pad(c), pad(r)], dev)?, lens))
}

/// Log-probabilities of chosen and rejected, without gradients: the
/// policy's (`Pass::Eval`) or the reference's (`Pass::Base`); `pack`: as
/// one packed row.
fn logprobs(m: &TrainModel, e: &Encoded, pass: Pass, pack: bool) -> candle_core::Result<Tensor> {
    if pack {
        return m.pair_logprobs(&m.pack_pair(&e.prompt, &e.chosen, &e.rejected)?, pass);
    }
    let (ids, lens) = batch(e, &m.device)?;
    m.sequence_logprobs(&ids, e.prompt.len(), &lens, pass)
}

/// transformers' cosine schedule with linear warmup.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

pub struct DpoTrainer;

fn cerr(what: &'static str) -> impl Fn(candle_core::Error) -> PluginError {
    move |e| PluginError::other(format!("{what}: {e}"))
}

/// Loss, mean margin and accuracy (margin > 0) over `pairs`, no gradients.
fn evaluate(m: &TrainModel, pairs: &[Encoded], refs: &[Tensor], beta: f64, pack: bool) -> PluginResult<serde_json::Value> {
    if pairs.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    let (mut loss, mut margins) = (0.0, Vec::new());
    for (e, r) in pairs.iter().zip(refs) {
        let p = logprobs(m, e, Pass::Eval, pack).map_err(cerr("forward"))?;
        let out = dpo_loss(&p.get(0).map_err(cerr("eval"))?.unsqueeze(0).map_err(cerr("eval"))?, &p.get(1).map_err(cerr("eval"))?.unsqueeze(0).map_err(cerr("eval"))?, &r.get(0).map_err(cerr("eval"))?.unsqueeze(0).map_err(cerr("eval"))?, &r.get(1).map_err(cerr("eval"))?.unsqueeze(0).map_err(cerr("eval"))?, beta)
            .map_err(cerr("loss"))?;
        loss += out.loss.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(cerr("loss"))?;
        margins.extend(out.margins);
    }
    let n = pairs.len() as f64;
    Ok(serde_json::json!({
        "pairs": pairs.len(),
        "loss": loss / n,
        "reward_margin": margins.iter().map(|v| *v as f64).sum::<f64>() / n,
        "accuracy": margins.iter().filter(|v| **v > 0.0).count() as f64 / n,
    }))
}

impl Trainer for DpoTrainer {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        init_threads();
        // On a pool thread candle's parallel ops run in place instead of
        // being handed to a worker one by one.
        rayon::scope(|_| self.run(job, progress))
    }
}

/// The job's params, parsed and checked before anything loads (what
/// `validate` runs too).
pub fn checked_params(text: &str) -> PluginResult<DpoParams> {
    let p: DpoParams = config::parse(text)?;
    if p.grad_accum == 0 || p.lora_rank == 0 || p.epochs <= 0.0 {
        return Err(PluginError::config("grad_accum, lora_rank and epochs must be positive"));
    }
    LoraSpec::targets_from(&p.target_modules).map_err(|e| PluginError::config(format!("target_modules: {e}")))?;
    if p.dtype != "f32" && p.dtype != "bf16" {
        return Err(PluginError::config(format!("dtype: {:?} (f32 | bf16)", p.dtype)));
    }
    rir_models::device_ordinal(&p.device).map_err(PluginError::config)?;
    gguf_type(&p.merge_format)?;
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(p.learning_rate) || !positive(p.beta) {
        return Err(PluginError::config(format!("learning_rate ({}) and beta ({}) must be positive numbers", p.learning_rate, p.beta)));
    }
    Ok(p)
}

/// `merge_format`: None for an HF directory, else the GGUF weight type.
fn gguf_type(format: &str) -> PluginResult<Option<rir_llama::GgufType>> {
    match format {
        "hf" => Ok(None),
        "gguf-q8_0" => Ok(Some(rir_llama::GgufType::Q8_0)),
        "gguf-f16" => Ok(Some(rir_llama::GgufType::F16)),
        other => Err(PluginError::config(format!("merge_format: {other:?} (hf | gguf-q8_0 | gguf-f16)"))),
    }
}

impl DpoTrainer {
    fn run(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        let p = checked_params(&job.params)?;
        let targets = LoraSpec::targets_from(&p.target_modules).map_err(|e| PluginError::config(format!("target_modules: {e}")))?;
        let dtype = if p.dtype == "bf16" { DType::BF16 } else { DType::F32 };
        let device = match rir_models::device_ordinal(&p.device).map_err(PluginError::config)? {
            None => Device::Cpu,
            Some(n) => Device::new_cuda(n).map_err(cerr("CUDA device"))?,
        };
        let pairs = read_pairs(&job.data_file)?;
        if pairs.is_empty() {
            return Err(PluginError::input(format!("{}: no preference pairs", job.data_file.display())));
        }
        // Base model: GGUF (dequantized) or HF directory.
        let src = rir_models::resolve(&job.base_model, &rir_sdk::host().cache_dir).map_err(PluginError::resource)?;
        let (path, hf) = rir_llama::model_file(&src)?;
        let (base, assets): (Llama, Assets) = rir_llama::load_model(&path, hf, DType::F32, &device)?;
        let gguf = gguf_type(&p.merge_format)?;
        if p.merge && gguf.is_some() && assets.gguf_metadata.is_none() {
            // Refused before training, not after it.
            return Err(PluginError::config(format!(
                "merge_format = {:?} needs a GGUF base (its tokenizer metadata); {} is an HF directory (use merge_format = \"hf\")",
                p.merge_format,
                path.display()
            )));
        }
        let spec = LoraSpec { rank: p.lora_rank, alpha: p.lora_alpha, targets };
        let model = TrainModel::from_llama(&base, spec, dtype, p.seed).map_err(cerr("building the trainable model"))?;
        // The training model holds its own dense copies; the (quantized)
        // base is loaded again for the merge, not kept through training.
        drop(base);

        // Seeded shuffle (Fisher–Yates on SplitMix64), then the held-out split.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        let mut s = p.seed;
        for i in (1..order.len()).rev() {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            order.swap(i, ((z ^ (z >> 31)) % (i as u64 + 1)) as usize);
        }
        let enc: Vec<Encoded> =
            order.iter().map(|&i| encode(&assets, &pairs[i], p.max_length, p.max_prompt_length)).collect::<PluginResult<_>>()?;
        let n_eval = ((pairs.len() as f64) * p.eval_fraction.clamp(0.0, 0.9)).round() as usize;
        let (eval, train) = enc.split_at(n_eval);
        if train.is_empty() {
            return Err(PluginError::config("eval_fraction leaves no pairs to train on"));
        }
        let t0 = Instant::now();
        // Reference log-probabilities, once, adapters off.
        let mut refs = Vec::with_capacity(enc.len());
        for (i, e) in enc.iter().enumerate() {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            refs.push(logprobs(&model, e, Pass::Base, p.pack).map_err(cerr("reference forward"))?);
            progress.report(&Progress { stage: "reference log-probs".into(), done: i as u64 + 1, total: enc.len() as u64, loss: None, message: String::new() });
        }
        let (eval_refs, train_refs) = refs.split_at(n_eval);
        let before = evaluate(&model, eval, eval_refs, p.beta, p.pack)?;
        // The adapter with the lowest held-out loss so far (step, loss, weights).
        let vars_now = model.vars();
        let snapshot = || -> PluginResult<Vec<Tensor>> { vars_now.iter().map(|v| v.as_tensor().copy().map_err(cerr("checkpoint"))).collect() };
        let held_loss = |v: &serde_json::Value| v["loss"].as_f64();
        let mut history = vec![serde_json::json!({"step": 0, "eval": before})];
        let mut best: Option<(usize, f64, Vec<Tensor>)> = held_loss(&before).map(|l| Ok::<_, PluginError>((0, l, snapshot()?))).transpose()?;

        let micro = ((train.len() as f64) * p.epochs).ceil() as usize;
        let total = micro.div_ceil(p.grad_accum);
        let warmup = ((total as f64) * p.warmup_ratio).ceil() as usize;
        let vars = model.vars();
        let mut opt = AdamW::new(vars.clone(), ParamsAdamW { lr: p.learning_rate, weight_decay: p.weight_decay, ..Default::default() })
            .map_err(cerr("optimizer"))?;
        std::fs::create_dir_all(&job.output_dir)?;
        let log_path = job.output_dir.join("trainer_log.jsonl");
        let mut log = String::new();
        let (mut losses, mut tokens) = (Vec::new(), 0usize);
        let train_start = Instant::now();
        for step in 0..total {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            let lr = lr_at(step, total, warmup, p.learning_rate);
            opt.set_learning_rate(lr);
            let first = step * p.grad_accum;
            let last = micro.min(first + p.grad_accum);
            let mut acc: Option<candle_core::backprop::GradStore> = None;
            let (mut step_loss, mut margins) = (0.0, Vec::new());
            for m in first..last {
                let i = m % train.len();
                let e = &train[i];
                // Both sequences' tokens (the prompt twice), packed or not, so tokens/s compares.
                tokens += 2 * e.prompt.len() + e.chosen.len() + e.rejected.len();
                let r = &train_refs[i];
                let g = |t: &Tensor, j: usize| t.get(j).and_then(|x| x.unsqueeze(0));
                let n_micro = (last - first) as f64;
                let mut pair_margins = Vec::new();
                let loss_of = |pol: &Tensor| {
                    let out = dpo_loss(&g(pol, 0)?, &g(pol, 1)?, &g(r, 0)?, &g(r, 1)?, p.beta)?;
                    pair_margins = out.margins;
                    out.loss.to_dtype(DType::F32)? / n_micro
                };
                // One layer's graph at a time (activation checkpointing).
                let (_, scaled, grads) = if p.pack {
                    let pair = model.pack_pair(&e.prompt, &e.chosen, &e.rejected).map_err(cerr("batch"))?;
                    model.pair_logprob_grads(&pair, loss_of)
                } else {
                    let (ids, lens) = batch(e, &model.device).map_err(cerr("batch"))?;
                    model.logprob_grads(&ids, e.prompt.len(), &lens, loss_of)
                }
                .map_err(cerr("forward/backward"))?;
                step_loss += scaled.to_scalar::<f32>().map_err(cerr("loss"))? as f64;
                margins.extend(pair_margins);
                acc = Some(match acc {
                    None => grads,
                    Some(mut a) => {
                        for v in &vars {
                            if let Some(gv) = grads.get(v.as_tensor()) {
                                let sum = match a.get(v.as_tensor()) {
                                    Some(prev) => (prev + gv).map_err(cerr("gradients"))?,
                                    None => gv.clone(),
                                };
                                a.insert(v.as_tensor(), sum);
                            }
                        }
                        a
                    }
                });
            }
            if let Some(a) = &acc {
                opt.step(a).map_err(cerr("optimizer step"))?;
            }
            let margin = margins.iter().map(|v| *v as f64).sum::<f64>() / margins.len().max(1) as f64;
            let accuracy = margins.iter().filter(|v| **v > 0.0).count() as f64 / margins.len().max(1) as f64;
            losses.push(step_loss);
            log.push_str(&format!(
                "{}\n",
                serde_json::json!({"step": step + 1, "loss": step_loss, "reward_margin": margin, "accuracy": accuracy, "learning_rate": lr})
            ));
            progress.report(&Progress {
                stage: "dpo".into(),
                done: step as u64 + 1,
                total: total as u64,
                loss: Some(step_loss),
                message: format!("margin {margin:.4} acc {accuracy:.2} lr {lr:.2e}"),
            });
            if !eval.is_empty() && p.eval_steps > 0 && (step + 1) % p.eval_steps == 0 && step + 1 < total {
                let e = evaluate(&model, eval, eval_refs, p.beta, p.pack)?;
                log.push_str(&format!("{}\n", serde_json::json!({"step": step + 1, "eval": e})));
                if let Some(l) = held_loss(&e).filter(|l| best.as_ref().is_none_or(|b| *l < b.1)) {
                    best = Some((step + 1, l, snapshot()?));
                }
                history.push(serde_json::json!({"step": step + 1, "eval": e}));
            }
            std::fs::write(&log_path, &log)?;
        }
        let train_secs = train_start.elapsed().as_secs_f64();
        let after = evaluate(&model, eval, eval_refs, p.beta, p.pack)?;
        history.push(serde_json::json!({"step": total, "eval": after}));
        // Keep the best checkpoint by the held-out loss.
        let best_step = match best {
            Some((step, l, weights)) if held_loss(&after).is_none_or(|a| l < a) => {
                for (v, w) in vars_now.iter().zip(weights) {
                    v.set(&w).map_err(cerr("restoring the best checkpoint"))?;
                }
                step
            }
            _ => total,
        };

        let adapter = job.output_dir.join("adapter");
        model.save_adapter(&adapter, &job.base_model).map_err(PluginError::other)?;
        let model_dir = if p.merge {
            drop(model);
            let (mut merged, _) = rir_llama::load_model(&path, hf, DType::F32, &device)?;
            rir_llama::merge_lora(&mut merged, &adapter)?;
            let dir = job.output_dir.join("merged");
            match gguf {
                None => rir_llama::export_hf(&merged, &assets, &dir)?,
                Some(ty) => rir_llama::export_gguf(&merged, &assets, &dir.join("model.gguf"), ty)?,
            }
            dir
        } else {
            adapter.clone()
        };
        let extra = serde_json::json!({
            "adapter_dir": adapter,
            "train_pairs": train.len(),
            "eval_before": before,
            "eval_after": after,
            "held_out": {"history": history, "best_step": best_step, "metric": "DPO loss on the held-out pairs (lower is better)"},
            "optimizer_steps": total,
            "train_seconds": train_secs,
            "steps_per_s": total as f64 / train_secs,
            "tokens_per_s": tokens as f64 / train_secs,
            "params": job.params,
        });
        Ok(TrainReport {
            model_dir,
            steps: total as u64,
            seconds: t0.elapsed().as_secs_f64(),
            loss: losses,
            extra_json: extra.to_string(),
        })
    }
}

/// candle sizes its CPU thread pools from these variables at first use.
fn init_threads() {
    rir_models::init_threads_once(rir_sdk::host().threads, true);
}

impl DpoTrainer {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        // Everything is per job (`params`); the plugin table takes no keys.
        let _: NoKeys = config::parse(config_toml)?;
        Ok(DpoTrainer)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

rir_sdk::export_plugin! {
    name: "dpo-trainer",
    description: "DPO (sigmoid loss) with LoRA adapters on Llama models, on candle; PEFT adapter + merged model",
    trainer: DpoTrainer::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Trainer => config::check::<NoKeys>(text),
        rir_sdk::ConfigOf::Params => checked_params(text).map(drop),
        _ => Ok(()),
    },
}
