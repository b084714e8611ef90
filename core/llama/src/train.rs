//! A differentiable Llama forward with LoRA adapters, for training on candle.
//!
//! candle-nn's fused kernels (rms_norm, softmax_last_dim, rope) have no
//! backward pass, so this forward is built from plain tensor ops; it runs in
//! HF layout (half-split rope) on dense weights, whatever the source format,
//! and is checked against the inference forward in the tests. Base weights
//! are frozen tensors; only the LoRA matrices are `Var`s.
//!
//! LoRA as PEFT does it: `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, A initialised
//! uniform(±1/√in) (PEFT's kaiming-uniform with a = √5), B zero, so the
//! adapted model starts equal to the base.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var, D};

use crate::load::{permute_rows, LINEARS};
use crate::model::{Llama, Shape};

/// Which linear maps get adapters, and their rank and scale.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// HF module names (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// `all-linear` (PEFT's spelling) or a list of HF module names.
    pub fn targets_from(names: &[String]) -> std::result::Result<Vec<String>, String> {
        let all: Vec<String> = LINEARS.iter().map(|l| l.rsplit('.').next().unwrap_or(l).to_string()).collect();
        if names.iter().any(|n| n == "all-linear" || n == "all") {
            return Ok(all);
        }
        for n in names {
            if !all.contains(n) {
                return Err(format!("unknown LoRA target {n:?} (one of {}, or all-linear)", all.join(", ")));
            }
        }
        Ok(names.to_vec())
    }
}

pub struct TLinear {
    w: Tensor,
    lora: Option<(Var, Var)>,
    scale: f64,
}

/// `x @ wᵀ` over the last dimension, as one 2-D product: a broadcast
/// right-hand side would be copied out per batch row (measured: a quarter of
/// a DPO step zeroing fresh pages for copies of the output matrix).
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let y = x.reshape((x.elem_count() / k, k))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

impl TLinear {
    fn forward(&self, x: &Tensor, lora_on: bool) -> Result<Tensor> {
        let y = matmul_t(x, &self.w)?;
        match (&self.lora, lora_on) {
            (Some((a, b)), true) => {
                let d = matmul_t(&matmul_t(x, a.as_tensor())?, b.as_tensor())?;
                y + (d * self.scale)?
            }
            _ => Ok(y),
        }
    }
}

struct TLayer {
    lin: Vec<TLinear>,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// Q/K/V biases (Qwen2), frozen.
    bias: Option<[Tensor; 3]>,
}

pub struct TrainModel {
    embed: Tensor,
    layers: Vec<TLayer>,
    norm: Tensor,
    lm_head: Tensor,
    pub shape: Shape,
    cos: Tensor,
    sin: Tensor,
    pub lora: LoraSpec,
    pub dtype: DType,
    pub device: Device,
}

/// Deterministic uniform numbers in [−1, 1) (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax from differentiable ops; the max is a constant shift.
fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// HF's half-split rotation: x·cos + rotate_half(x)·sin.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

impl TrainModel {
    /// Dense copies of `model`'s weights (dequantized, HF layout) in `dtype`,
    /// with fresh adapters on `lora.targets`, initialised from `seed`.
    pub fn from_llama(model: &Llama, lora: LoraSpec, dtype: DType, seed: u64) -> Result<Self> {
        let s = model.shape.clone();
        let dev = model.device.clone();
        let mut rng = Rng(seed);
        let scale = lora.alpha / lora.rank as f64;
        let mut layers = Vec::with_capacity(s.n_layer);
        for l in &model.layers {
            let mut lin = Vec::with_capacity(7);
            for (j, w) in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down].into_iter().enumerate() {
                let mut w = w.dequantize(&dev)?;
                if s.interleaved_rope && j < 2 {
                    w = permute_rows(&w, if j == 0 { s.n_head } else { s.n_kv_head }, false)?;
                }
                let w = w.to_dtype(dtype)?;
                let name = LINEARS[j].rsplit('.').next().unwrap_or_default();
                let adapter = if lora.targets.iter().any(|t| t == name) {
                    let (out, inp) = w.dims2()?;
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> = (0..lora.rank * inp).map(|_| (rng.next() * bound) as f32).collect();
                    let a = Tensor::from_vec(a, (lora.rank, inp), &dev)?.to_dtype(dtype)?;
                    let b = Tensor::zeros((out, lora.rank), dtype, &dev)?;
                    Some((Var::from_tensor(&a)?, Var::from_tensor(&b)?))
                } else {
                    None
                };
                lin.push(TLinear { w, lora: adapter, scale });
            }
            let bias = match &l.qkv_bias {
                Some(b) => Some([b[0].to_dtype(dtype)?, b[1].to_dtype(dtype)?, b[2].to_dtype(dtype)?]),
                None => None,
            };
            layers.push(TLayer { lin, attn_norm: l.attn_norm.to_dtype(dtype)?, ffn_norm: l.ffn_norm.to_dtype(dtype)?, bias });
        }
        let half = s.head_dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1f32 / s.rope_theta.powf(2.0 * i as f32 / s.head_dim as f32)).collect();
        let inv = Tensor::new(inv, &dev)?.reshape((1, half))?;
        let pos = Tensor::arange(0u32, s.context as u32, &dev)?.to_dtype(DType::F32)?.reshape((s.context, 1))?;
        let f = pos.matmul(&inv)?;
        let f = Tensor::cat(&[&f, &f], 1)?;
        Ok(Self {
            embed: model.embed.to_dtype(dtype)?,
            layers,
            norm: model.norm.to_dtype(dtype)?,
            lm_head: model.output.dequantize(&dev)?.to_dtype(dtype)?,
            cos: f.cos()?.to_dtype(dtype)?,
            sin: f.sin()?.to_dtype(dtype)?,
            shape: s,
            lora,
            dtype,
            device: dev,
        })
    }

    /// The adapter parameters, in a fixed order.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.lin.iter().filter_map(|t| t.lora.as_ref()).flat_map(|(a, b)| [a.clone(), b.clone()]))
            .collect()
    }

    /// Hidden states after the final norm, (b, L, hidden), for right-padded
    /// `ids` (b, L): padding at the end never reaches earlier positions.
    pub fn hidden(&self, ids: &Tensor, lora_on: bool) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let s = &self.shape;
        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, s.hidden))?;
        let (cos, sin) = (self.cos.narrow(0, 0, l)?, self.sin.narrow(0, 0, l)?);
        let mask: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j > i { -1e9 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (l, l), &self.device)?.to_dtype(self.dtype)?;
        let rep = s.n_head / s.n_kv_head;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.attn_norm, s.eps)?;
            let heads = |t: Tensor, n: usize| t.reshape((b, l, n, s.head_dim))?.transpose(1, 2);
            let bias = |t: Tensor, i: usize| match &layer.bias {
                Some(b) => t.broadcast_add(&b[i]),
                None => Ok(t),
            };
            let q = heads(bias(layer.lin[0].forward(&x, lora_on)?, 0)?, s.n_head)?;
            let k = heads(bias(layer.lin[1].forward(&x, lora_on)?, 1)?, s.n_kv_head)?;
            let v = heads(bias(layer.lin[2].forward(&x, lora_on)?, 2)?, s.n_kv_head)?;
            let (q, k) = (rope(&q, &cos, &sin)?, rope(&k, &cos, &sin)?);
            let (k, v) = if rep > 1 {
                let r = |t: &Tensor| Tensor::cat(&vec![t; rep], 2)?.reshape((b, s.n_head, l, s.head_dim));
                (r(&k)?, r(&v)?)
            } else {
                (k, v)
            };
            let att = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let y = softmax(&att)?.matmul(&v.contiguous()?)?;
            let y = y.transpose(1, 2)?.reshape((b, l, s.n_head * s.head_dim))?;
            h = (h + layer.lin[3].forward(&y, lora_on)?)?;
            let x = rms_norm(&h, &layer.ffn_norm, s.eps)?;
            let g = layer.lin[4].forward(&x, lora_on)?.silu()?;
            let u = layer.lin[5].forward(&x, lora_on)?;
            h = (h + layer.lin[6].forward(&(g * u)?, lora_on)?)?;
        }
        rms_norm(&h, &self.norm, s.eps)
    }

    /// Logits for all positions, (b, L, vocab).
    pub fn logits(&self, ids: &Tensor, lora_on: bool) -> Result<Tensor> {
        matmul_t(&self.hidden(ids, lora_on)?, &self.lm_head)
    }

    /// Σ log p(ids[t+1] | ids[..=t]) over t ∈ [from−1, to−1) per row: the
    /// log-probability of the tokens `from..to` (a response after a prompt
    /// of `from` tokens). Rows are right-padded; `to[i]` is row i's length.
    pub fn sequence_logprobs(&self, ids: &Tensor, from: usize, to: &[usize], lora_on: bool) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        // Only the response positions need the vocabulary projection.
        let h = self.hidden(ids, lora_on)?.narrow(1, from - 1, l - from)?;
        // Half precisions are summed in f32; f32 and f64 stay as they are.
        let wide = if self.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let logits = matmul_t(&h.contiguous()?, &self.lm_head)?.to_dtype(wide)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
        let targets = ids.narrow(1, from, l - from)?.unsqueeze(2)?;
        let lp = (logits.gather(&targets.contiguous()?, 2)? - lse)?.squeeze(2)?;
        let mask: Vec<f32> =
            (0..b).flat_map(|i| (from..l).map(move |t| if t < to[i] { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (b, l - from), &self.device)?.to_dtype(wide)?;
        (lp * mask)?.sum(1)
    }

    /// The adapters under PEFT's names, in HF layout.
    pub fn adapter_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (j, lin) in l.lin.iter().enumerate() {
                if let Some((a, b)) = &lin.lora {
                    let p = format!("base_model.model.model.layers.{i}.{}", LINEARS[j]);
                    t.insert(format!("{p}.lora_A.weight"), a.as_tensor().to_dtype(DType::F32)?);
                    t.insert(format!("{p}.lora_B.weight"), b.as_tensor().to_dtype(DType::F32)?);
                }
            }
        }
        Ok(t)
    }

    /// Writes adapter_model.safetensors and adapter_config.json (PEFT's
    /// format; the llama-generator's `adapter` key and PEFT itself load it).
    pub fn save_adapter(&self, dir: &Path, base_model: &str) -> std::result::Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let t = self.adapter_tensors().map_err(|e| e.to_string())?;
        candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).map_err(|e| e.to_string())?;
        let cfg = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.lora.rank, "lora_alpha": self.lora.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": self.lora.targets, "fan_in_fan_out": false, "use_rslora": false,
            "inference_mode": true,
        });
        std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", dir.display()))
    }
}

/// DPO's sigmoid loss and its figures for one batch of pairs: policy and
/// reference log-probabilities of the chosen and rejected responses.
pub struct DpoOut {
    pub loss: Tensor,
    /// β·((π_c − ref_c) − (π_r − ref_r)) per pair.
    pub margins: Vec<f32>,
}

/// −log σ(β·((π_c − ref_c) − (π_r − ref_r))), averaged over pairs, computed
/// as softplus(−z) = max(−z, 0) + log(1 + e^−|z|).
pub fn dpo_loss(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor, beta: f64) -> Result<DpoOut> {
    let z = (((pc - rc)? - (pr - rr)?)? * beta)?;
    let nz = z.neg()?;
    let softplus = (nz.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(DpoOut { loss: softplus.mean_all()?, margins: z.to_dtype(DType::F32)?.to_vec1()? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Linear;

    /// A tiny random llama (2 layers, GQA 4:2 heads) in f64.
    fn tiny(dtype: DType) -> Llama {
        let dev = Device::Cpu;
        let mut rng = Rng(5);
        let mut t = |shape: (usize, usize), s: f64| {
            let v: Vec<f64> = (0..shape.0 * shape.1).map(|_| rng.next() * s).collect();
            Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap()
        };
        let (h, kv, inter, vocab) = (16, 8, 24, 11);
        let shape = Shape {
            n_layer: 2, hidden: h, n_head: 4, n_kv_head: 2, head_dim: 4, eps: 1e-6,
            rope_theta: 10_000.0, context: 32, interleaved_rope: false,
        };
        let layers = (0..2)
            .map(|_| crate::model::Layer {
                wq: Linear::dense(t((h, h), 0.5)),
                wk: Linear::dense(t((kv, h), 0.5)),
                wv: Linear::dense(t((kv, h), 0.5)),
                wo: Linear::dense(t((h, h), 0.5)),
                gate: Linear::dense(t((inter, h), 0.5)),
                up: Linear::dense(t((inter, h), 0.5)),
                down: Linear::dense(t((h, inter), 0.5)),
                attn_norm: (t((1, h), 0.2) + 1.0).unwrap().squeeze(0).unwrap(),
                ffn_norm: (t((1, h), 0.2) + 1.0).unwrap().squeeze(0).unwrap(),
                qkv_bias: Some([t((1, h), 0.3).squeeze(0).unwrap(), t((1, kv), 0.3).squeeze(0).unwrap(), t((1, kv), 0.3).squeeze(0).unwrap()]),
            })
            .collect();
        let norm = (t((1, h), 0.2) + 1.0).unwrap().squeeze(0).unwrap();
        Llama::new(t((vocab, h), 1.0), layers, norm, Linear::dense(t((vocab, h), 1.0)), shape, dtype, &dev).unwrap()
    }

    fn loss_of(m: &TrainModel) -> Tensor {
        let dev = Device::Cpu;
        // Two pairs sharing a 3-token prompt; rows right-padded.
        let c = Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [1, 2, 3, 7, 0, 0]], &dev).unwrap();
        let r = Tensor::new(&[[1u32, 2, 3, 8, 9, 0], [1, 2, 3, 10, 4, 2]], &dev).unwrap();
        let pc = m.sequence_logprobs(&c, 3, &[6, 4], true).unwrap();
        let pr = m.sequence_logprobs(&r, 3, &[5, 6], true).unwrap();
        let rc = m.sequence_logprobs(&c, 3, &[6, 4], false).unwrap().detach();
        let rr = m.sequence_logprobs(&r, 3, &[5, 6], false).unwrap().detach();
        dpo_loss(&pc, &pr, &rc, &rr, 0.5).unwrap().loss
    }

    /// Autograd gradients of the LoRA+DPO loss against central finite
    /// differences, on every adapter matrix (B made nonzero first, so A's
    /// gradient is too).
    #[test]
    fn lora_dpo_gradients_match_finite_differences() {
        let base = tiny(DType::F64);
        let spec = LoraSpec { rank: 2, alpha: 4.0, targets: LoraSpec::targets_from(&["all-linear".into()]).unwrap() };
        let m = TrainModel::from_llama(&base, spec, DType::F64, 3).unwrap();
        let mut rng = Rng(9);
        for v in m.vars() {
            let n = v.elem_count();
            let vals: Vec<f64> = (0..n).map(|_| rng.next() * 0.3).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let loss = loss_of(&m);
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (vi, v) in m.vars().iter().enumerate() {
            let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let x0: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for idx in [0, x0.len() / 2, x0.len() - 1] {
                let eps = 1e-5;
                let at = |delta: f64| {
                    let mut x = x0.clone();
                    x[idx] += delta;
                    v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l: f64 = loss_of(&m).to_scalar().unwrap();
                    l
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                v.set(&Tensor::from_vec(x0.clone(), v.shape(), &Device::Cpu).unwrap()).unwrap();
                let err = (fd - g[idx]).abs();
                assert!(err <= 1e-6 + 1e-4 * fd.abs(), "var {vi} [{idx}]: autograd {} vs finite difference {fd}", g[idx]);
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * 7 * 2 * 3);
    }

    /// With B = 0 the adapted forward equals the base, and the training
    /// forward equals the inference forward.
    #[test]
    fn training_forward_matches_inference_forward() {
        let base = tiny(DType::F32);
        let spec = LoraSpec { rank: 2, alpha: 4.0, targets: vec!["q_proj".into(), "down_proj".into()] };
        let m = TrainModel::from_llama(&base, spec, DType::F32, 3).unwrap();
        let ids = [1u32, 5, 2, 9, 3];
        let ids_t = Tensor::new(&[ids], &Device::Cpu).unwrap();
        let train = m.logits(&ids_t, true).unwrap().squeeze(0).unwrap();
        let (inf, _) = base.prefill(&[&ids]).unwrap();
        let a: Vec<f32> = train.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = inf.get(0).unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}
