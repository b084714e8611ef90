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

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Tensor, Var, D};

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

/// `x @ wᵀ` for a frozen `w`, with a gradient for `x` only.
///
/// Why: candle's matmul backward always computes both operands' gradients,
/// so every frozen base matrix got a weight-sized gradient per micro-batch
/// (held in the gradient store until the backward pass ended: the size of
/// the model again, and a third of the backward's arithmetic), which LoRA
/// training never reads. Here the product is computed untracked and joined
/// to `x` by an op whose backward is `g @ w`. CPU only (the op's forward is
/// a copy of the product); other devices take candle's matmul.
fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() || !x.device().is_cpu() {
        return matmul_t(x, w);
    }
    let y = matmul_t(&x.detach(), w)?;
    x.apply_op2(&y, FrozenGrad { w: w.clone() })
}

struct FrozenGrad {
    w: Tensor,
}

impl CustomOp2 for FrozenGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    /// The product, computed untracked beforehand: copied as it is.
    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let Some((a, z)) = l2.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: contiguous product only")
        };
        let out = match s2 {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..z].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[a..z].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[a..z].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[a..z].to_vec()),
            _ => candle_core::bail!("frozen-linear: float tensors only"),
        };
        Ok((out, l2.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = *g.dims().last().unwrap_or(&1);
        let gx = g.reshape((g.elem_count() / n, n))?.matmul(&self.w)?.reshape(x.shape())?;
        Ok((Some(gx), None))
    }
}

/// Which forward pass: the base model (adapters off: DPO's reference), the
/// adapted model with gradients for the adapters, or the adapted model
/// without them (held-out evaluation: no autograd graph is kept).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pass {
    Base,
    Train,
    Eval,
}

impl TLinear {
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let y = frozen_linear(x, &self.w)?;
        let Some((a, b)) = &self.lora else { return Ok(y) };
        let (a, b) = match pass {
            Pass::Base => return Ok(y),
            Pass::Train => (a.as_tensor().clone(), b.as_tensor().clone()),
            Pass::Eval => (a.as_tensor().detach(), b.as_tensor().detach()),
        };
        y + (matmul_t(&matmul_t(x, &a)?, &b)? * self.scale)?
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
    /// Logit elements per slice of the output head (`head_chunk`).
    pub head_elems: usize,
}

/// Per-forward constants shared by the layers.
struct Ctx {
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

/// A DPO pair in one row: the prompt once, then the chosen and the rejected
/// response, each at the positions it has right after the prompt and
/// attending to the prompt and itself only (the rejected response is
/// masked from the chosen one). The same log-probabilities as the two
/// right-padded rows, for the prompt's tokens once instead of twice and no
/// padding.
pub struct PackedPair {
    ids: Tensor,
    positions: Tensor,
    mask: Tensor,
    /// Positions whose next-token log-probability counts, the tokens there,
    /// and which response each belongs to (one-hot pairs, chosen first).
    at: Vec<u32>,
    targets: Vec<u32>,
    onehot: Vec<f32>,
}

/// A gradient store with no parameter in it (candle has no public
/// constructor; an untracked scalar's backward holds only that scalar).
pub fn empty_grads(dev: &Device) -> Result<GradStore> {
    Tensor::zeros((), DType::F32, dev)?.backward()
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
            // A tied head is the embedding's f32 copy (the exact weights; the
            // inference head may be requantized), not a second copy of it.
            lm_head: if model.tied_output { model.embed.to_dtype(dtype)? } else { model.output.dequantize(&dev)?.to_dtype(dtype)? },
            cos: f.cos()?.to_dtype(dtype)?,
            sin: f.sin()?.to_dtype(dtype)?,
            shape: s,
            lora,
            dtype,
            device: dev,
            head_elems: 8 << 20,
        })
    }

    /// The adapter parameters, in a fixed order.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.lin.iter().filter_map(|t| t.lora.as_ref()).flat_map(|(a, b)| [a.clone(), b.clone()]))
            .collect()
    }

    /// The token embeddings of `ids` (b, L): the first layer's input.
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, self.shape.hidden))
    }

    /// What every layer of a forward over L positions shares: rope tables
    /// and the causal mask.
    fn context(&self, l: usize) -> Result<Ctx> {
        let mask: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j > i { -1e9 } else { 0.0 })).collect();
        Ok(Ctx {
            cos: self.cos.narrow(0, 0, l)?,
            sin: self.sin.narrow(0, 0, l)?,
            mask: Tensor::from_vec(mask, (l, l), &self.device)?.to_dtype(self.dtype)?,
        })
    }

    /// One decoder layer: its input `h` (b, L, hidden) to its output.
    fn layer(&self, layer: &TLayer, h: &Tensor, ctx: &Ctx, pass: Pass) -> Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let s = &self.shape;
        let rep = s.n_head / s.n_kv_head;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let x = rms_norm(h, &layer.attn_norm, s.eps)?;
        let heads = |t: Tensor, n: usize| t.reshape((b, l, n, s.head_dim))?.transpose(1, 2);
        let bias = |t: Tensor, i: usize| match &layer.bias {
            Some(b) => t.broadcast_add(&b[i]),
            None => Ok(t),
        };
        let q = heads(bias(layer.lin[0].forward(&x, pass)?, 0)?, s.n_head)?;
        let k = heads(bias(layer.lin[1].forward(&x, pass)?, 1)?, s.n_kv_head)?;
        let v = heads(bias(layer.lin[2].forward(&x, pass)?, 2)?, s.n_kv_head)?;
        let (q, k) = (rope(&q, &ctx.cos, &ctx.sin)?, rope(&k, &ctx.cos, &ctx.sin)?);
        let (k, v) = if rep > 1 {
            let r = |t: &Tensor| Tensor::cat(&vec![t; rep], 2)?.reshape((b, s.n_head, l, s.head_dim));
            (r(&k)?, r(&v)?)
        } else {
            (k, v)
        };
        let att = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&ctx.mask)?;
        let y = softmax(&att)?.matmul(&v.contiguous()?)?;
        let y = y.transpose(1, 2)?.reshape((b, l, s.n_head * s.head_dim))?;
        let h = (h + layer.lin[3].forward(&y, pass)?)?;
        let x = rms_norm(&h, &layer.ffn_norm, s.eps)?;
        let g = layer.lin[4].forward(&x, pass)?.silu()?;
        let u = layer.lin[5].forward(&x, pass)?;
        h + layer.lin[6].forward(&(g * u)?, pass)?
    }

    /// The last layer's output (before the final norm), (b, L, hidden),
    /// for right-padded `ids` (b, L): padding at the end never reaches
    /// earlier positions.
    fn trunk(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        let ctx = self.context(ids.dim(1)?)?;
        let mut h = self.embed_ids(ids)?;
        for layer in &self.layers {
            h = self.layer(layer, &h, &ctx, pass)?;
        }
        Ok(h)
    }

    /// Hidden states after the final norm, (b, L, hidden).
    pub fn hidden(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        rms_norm(&self.trunk(ids, pass)?, &self.norm, self.shape.eps)
    }

    /// Logits for all positions, (b, L, vocab).
    pub fn logits(&self, ids: &Tensor, pass: Pass) -> Result<Tensor> {
        matmul_t(&self.hidden(ids, pass)?, &self.lm_head)
    }

    /// Positions per slice of the output head: a slice's logits (b × n ×
    /// vocab) stay near 32 MB in f32 (151,936-word vocabularies made one
    /// (2, 256, vocab) tensor 300 MB, and autograd kept five of them).
    fn head_chunk(&self, b: usize) -> usize {
        (self.head_elems / (b.max(1) * self.lm_head.dim(0).unwrap_or(1).max(1))).max(1)
    }

    /// Σ log p over a slice of positions: `h` (b, n, hidden) are the last
    /// layer's outputs (before the final norm) at positions t, `targets`
    /// (b, n) the tokens at t + 1 and `keep` (b, n) 1 where they count.
    fn slice_logprobs(&self, h: &Tensor, targets: &Tensor, keep: &Tensor) -> Result<Tensor> {
        let lp = self.position_logprobs(h, targets)?;
        (lp.clone() * keep.to_dtype(lp.dtype())?)?.sum(1)
    }

    /// log p(targets) at each position of `h` (b, n, hidden), (b, n), in
    /// f32 (f64 for f64 models).
    fn position_logprobs(&self, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let wide = self.wide();
        let h = rms_norm(h, &self.norm, self.shape.eps)?;
        let logits = frozen_linear(&h.contiguous()?, &self.lm_head)?.to_dtype(wide)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
        (logits.gather(&targets.unsqueeze(2)?.contiguous()?, 2)? - lse)?.squeeze(2)
    }

    /// The response positions `from − 1 .. L − 1` in head-sized slices:
    /// (start, length, targets, keep) with `to[i]` row i's length.
    fn head_slices(&self, ids: &Tensor, from: usize, to: &[usize]) -> Result<Vec<(usize, usize, Tensor, Tensor)>> {
        let (b, l) = ids.dims2()?;
        let chunk = self.head_chunk(b);
        let mut out = Vec::new();
        let mut t = from - 1;
        while t < l - 1 {
            let n = chunk.min(l - 1 - t);
            let keep: Vec<f32> = (0..b).flat_map(|i| (t + 1..t + 1 + n).map(move |u| if u < to[i] { 1.0 } else { 0.0 })).collect();
            let keep = Tensor::from_vec(keep, (b, n), &self.device)?;
            out.push((t, n, ids.narrow(1, t + 1, n)?, keep));
            t += n;
        }
        Ok(out)
    }

    /// Σ log p(ids[t+1] | ids[..=t]) over t ∈ [from−1, to−1) per row: the
    /// log-probability of the tokens `from..to` (a response after a prompt
    /// of `from` tokens). Rows are right-padded; `to[i]` is row i's length.
    /// With `Pass::Train` the whole forward stays in the autograd graph;
    /// training goes through `logprob_grads`, which keeps one layer's.
    pub fn sequence_logprobs(&self, ids: &Tensor, from: usize, to: &[usize], pass: Pass) -> Result<Tensor> {
        self.head_logprobs(&self.trunk(ids, pass)?, &self.head_slices(ids, from, to)?)
    }

    /// Σ over the head's slices of `slice_logprobs`, for the last layer's
    /// output `h` (b, L, hidden).
    fn head_logprobs(&self, h: &Tensor, slices: &[(usize, usize, Tensor, Tensor)]) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (t, n, targets, keep) in slices {
            let lp = self.slice_logprobs(&h.narrow(1, *t, *n)?, targets, keep)?;
            sum = Some(match sum {
                None => lp,
                Some(s) => (s + lp)?,
            });
        }
        sum.ok_or_else(|| candle_core::Error::Msg("no response tokens".into()))
    }

    /// The policy's response log-probabilities (as `sequence_logprobs`),
    /// the loss `loss_of` makes of them, and that loss's gradients for the
    /// adapters — by activation checkpointing: a forward pass without
    /// autograd keeps only each layer's input, and the backward pass
    /// recomputes one layer at a time under autograd, chaining the gradient
    /// of its input into the layer below. Why: the whole graph of a
    /// (2, 256) batch held ~100 MB per layer of SmolLM2 (3 GB in all, most
    /// of a DPO step's peak); one layer's is what is alive now. Costs one
    /// more forward pass. `loss_of` receives the log-probabilities (b,) as
    /// an autograd leaf and returns a scalar.
    pub fn logprob_grads(
        &self,
        ids: &Tensor,
        from: usize,
        to: &[usize],
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, GradStore)> {
        let ctx = self.context(ids.dim(1)?)?;
        self.checkpointed(ids, &ctx, |last| {
            let slices = self.head_slices(ids, from, to)?;
            let lp = self.head_logprobs(last, &slices)?;
            let (loss, coef) = self.loss_and_coef(&lp, loss_of)?;
            // The head, slice by slice: the gradient of the last layer's output.
            let (b, l, hdim) = last.dims3()?;
            let mut parts = Vec::with_capacity(slices.len() + 2);
            let first = from - 1;
            if first > 0 {
                parts.push(Tensor::zeros((b, first, hdim), self.dtype, &self.device)?);
            }
            for (t, n, targets, keep) in &slices {
                let x = Var::from_tensor(&last.narrow(1, *t, *n)?)?;
                let s = (self.slice_logprobs(x.as_tensor(), targets, keep)? * &coef)?.sum_all()?;
                let g = s.backward()?;
                parts.push(g.get(x.as_tensor()).cloned().unwrap_or(x.as_tensor().zeros_like()?));
            }
            let done = first + slices.iter().map(|s| s.1).sum::<usize>();
            if done < l {
                parts.push(Tensor::zeros((b, l - done, hdim), self.dtype, &self.device)?);
            }
            Ok((lp, loss, Tensor::cat(&parts, 1)?))
        })
    }

    /// The forward without a graph and the layer-by-layer backward of
    /// `logprob_grads`, for any layout: `head` gets the last layer's output
    /// and returns the log-probabilities, the loss and the loss's gradient
    /// with respect to that output.
    fn checkpointed(
        &self,
        ids: &Tensor,
        ctx: &Ctx,
        head: impl FnOnce(&Tensor) -> Result<(Tensor, Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor, GradStore)> {
        // Forward without a graph, keeping every layer's input.
        let mut inputs = vec![self.embed_ids(ids)?];
        for layer in &self.layers {
            let next = self.layer(layer, &inputs[inputs.len() - 1], ctx, Pass::Eval)?;
            inputs.push(next);
        }
        let last = inputs.pop().ok_or_else(|| candle_core::Error::Msg("no layers".into()))?;
        let (lp, loss, mut grad) = head(&last)?;
        drop(last);
        // The layers, top down, each recomputed under autograd.
        let mut store = empty_grads(&self.device)?;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = inputs.pop().ok_or_else(|| candle_core::Error::Msg("checkpoint".into()))?;
            // The embeddings are frozen: layer 0's input needs no gradient.
            let x = if i > 0 { Some(Var::from_tensor(&input)?) } else { None };
            let out = self.layer(layer, x.as_ref().map_or(&input, |v| v.as_tensor()), ctx, Pass::Train)?;
            let g = (out * &grad)?.sum_all()?.backward()?;
            for lin in &layer.lin {
                if let Some((a, b)) = &lin.lora {
                    for v in [a, b] {
                        if let Some(gv) = g.get(v.as_tensor()) {
                            store.insert(v.as_tensor(), gv.clone());
                        }
                    }
                }
            }
            if let Some(x) = &x {
                grad = g.get(x.as_tensor()).cloned().unwrap_or(input.zeros_like()?);
            }
        }
        Ok((lp, loss, store))
    }

    /// A preference pair in one row (see [`PackedPair`]).
    pub fn pack_pair(&self, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Result<PackedPair> {
        let (p, c, r) = (prompt.len(), chosen.len(), rejected.len());
        if p == 0 || c == 0 || r == 0 {
            candle_core::bail!("a packed pair needs a prompt and two non-empty responses")
        }
        let l = p + c + r;
        let ids: Vec<u32> = prompt.iter().chain(chosen).chain(rejected).copied().collect();
        let positions: Vec<u32> = (0..p + c).chain(p..p + r).map(|x| x as u32).collect();
        // Causal, and the rejected response does not see the chosen one.
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i || (i >= p + c && (p..p + c).contains(&j)) { -1e9 } else { 0.0 }))
            .collect();
        // Chosen token k is predicted at p - 1 + k; rejected token k at
        // p - 1 (k = 0, the prompt's last position) or p + c + k - 1.
        let at: Vec<u32> = (0..c).map(|k| p - 1 + k).chain((0..r).map(|k| if k == 0 { p - 1 } else { p + c + k - 1 })).map(|x| x as u32).collect();
        let targets: Vec<u32> = chosen.iter().chain(rejected).copied().collect();
        let onehot: Vec<f32> = (0..c + r).flat_map(|i| if i < c { [1.0, 0.0] } else { [0.0, 1.0] }).collect();
        Ok(PackedPair {
            ids: Tensor::from_vec(ids, (1, l), &self.device)?,
            positions: Tensor::from_vec(positions, l, &self.device)?,
            mask: Tensor::from_vec(mask, (l, l), &self.device)?.to_dtype(self.dtype)?,
            at,
            targets,
            onehot,
        })
    }

    fn packed_context(&self, pair: &PackedPair) -> Result<Ctx> {
        Ok(Ctx { cos: self.cos.index_select(&pair.positions, 0)?, sin: self.sin.index_select(&pair.positions, 0)?, mask: pair.mask.clone() })
    }

    /// The head over a packed pair's scored positions, in slices of the
    /// head's size: (positions, targets, one-hot (n, 2) of chosen/rejected).
    fn packed_slices(&self, pair: &PackedPair) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
        let (chunk, wide) = (self.head_chunk(1), self.wide());
        let n = pair.at.len();
        (0..n)
            .step_by(chunk)
            .map(|s| {
                let e = (s + chunk).min(n);
                Ok((
                    Tensor::new(&pair.at[s..e], &self.device)?,
                    Tensor::new(&pair.targets[s..e], &self.device)?.unsqueeze(0)?,
                    Tensor::from_vec(pair.onehot[2 * s..2 * e].to_vec(), (e - s, 2), &self.device)?.to_dtype(wide)?,
                ))
            })
            .collect()
    }

    /// (chosen, rejected) log-probabilities of a slice of a packed pair.
    fn packed_slice_logprobs(&self, last: &Tensor, (at, targets, onehot): &(Tensor, Tensor, Tensor)) -> Result<Tensor> {
        let lp = self.position_logprobs(&last.index_select(at, 1)?, targets)?;
        lp.matmul(onehot)?.squeeze(0)
    }

    /// Σ log p of the chosen and the rejected response of a packed pair,
    /// (2,), as `sequence_logprobs` gives them for the two rows of the
    /// padded batch (to rounding: the rejected row's softmax sums run over
    /// its keys at other columns).
    pub fn pair_logprobs(&self, pair: &PackedPair, pass: Pass) -> Result<Tensor> {
        let ctx = self.packed_context(pair)?;
        let mut h = self.embed_ids(&pair.ids)?;
        for layer in &self.layers {
            h = self.layer(layer, &h, &ctx, pass)?;
        }
        self.packed_logprobs(&h, &self.packed_slices(pair)?)
    }

    /// (chosen, rejected) log-probabilities summed over a packed pair's slices.
    fn packed_logprobs(&self, last: &Tensor, slices: &[(Tensor, Tensor, Tensor)]) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for s in slices {
            let lp = self.packed_slice_logprobs(last, s)?;
            sum = Some(match sum {
                None => lp,
                Some(t) => (t + lp)?,
            });
        }
        sum.ok_or_else(|| candle_core::Error::Msg("no response tokens".into()))
    }

    /// The loss of `lp` and dLoss/dlp in the head's precision, from the
    /// (small) loss graph alone.
    fn loss_and_coef(&self, lp: &Tensor, loss_of: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
        let leaf = Var::from_tensor(lp)?;
        let loss = loss_of(leaf.as_tensor())?;
        let dlp = loss.backward()?.get(leaf.as_tensor()).cloned().unwrap_or(lp.zeros_like()?);
        Ok((loss, dlp.to_dtype(self.wide())?))
    }

    /// Half precisions are summed in f32; f32 and f64 stay as they are.
    fn wide(&self) -> DType {
        if self.dtype == DType::F64 { DType::F64 } else { DType::F32 }
    }

    /// `logprob_grads` for a packed pair: (chosen, rejected) log-probs, the
    /// loss and the adapters' gradients, by the same checkpointing.
    pub fn pair_logprob_grads(&self, pair: &PackedPair, loss_of: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor, GradStore)> {
        let ctx = self.packed_context(pair)?;
        self.checkpointed(&pair.ids, &ctx, |last| {
            let slices = self.packed_slices(pair)?;
            let lp = self.packed_logprobs(last, &slices)?;
            let (loss, coef) = self.loss_and_coef(&lp, loss_of)?;
            // The head slice by slice; each slice's gradient lands at its positions.
            let mut grad = last.zeros_like()?;
            for s in &slices {
                let x = Var::from_tensor(last)?;
                let v = (self.packed_slice_logprobs(x.as_tensor(), s)? * &coef)?.sum_all()?;
                if let Some(g) = v.backward()?.get(x.as_tensor()) {
                    grad = (grad + g)?;
                }
            }
            Ok((lp, loss, grad))
        })
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
        let pc = m.sequence_logprobs(&c, 3, &[6, 4], Pass::Train).unwrap();
        let pr = m.sequence_logprobs(&r, 3, &[5, 6], Pass::Train).unwrap();
        let rc = m.sequence_logprobs(&c, 3, &[6, 4], Pass::Base).unwrap().detach();
        let rr = m.sequence_logprobs(&r, 3, &[5, 6], Pass::Base).unwrap().detach();
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

    /// A packed pair gives the padded rows' log-probabilities, loss and
    /// adapter gradients (f64: to rounding).
    #[test]
    fn packed_pairs_equal_padded_rows() {
        let base = tiny(DType::F64);
        let spec = LoraSpec { rank: 2, alpha: 4.0, targets: LoraSpec::targets_from(&["all-linear".into()]).unwrap() };
        let mut m = TrainModel::from_llama(&base, spec, DType::F64, 5).unwrap();
        // Head slices of three positions: a pair's 9 scored positions take three.
        m.head_elems = 3 * 11;
        let mut rng = Rng(4);
        for v in m.vars() {
            let vals: Vec<f64> = (0..v.elem_count()).map(|_| rng.next() * 0.3).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let (prompt, chosen, rejected) = ([1u32, 2, 3], [4u32, 5, 6, 3, 2, 1], [9u32, 8, 7]);
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 3, 2, 1], [1, 2, 3, 9, 8, 7, 0, 0, 0]], &dev).unwrap();
        let to = [9, 6];
        let pair = m.pack_pair(&prompt, &chosen, &rejected).unwrap();
        for pass in [Pass::Base, Pass::Eval] {
            let a: Vec<f64> = m.sequence_logprobs(&ids, 3, &to, pass).unwrap().to_vec1().unwrap();
            let b: Vec<f64> = m.pair_logprobs(&pair, pass).unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-10), "{a:?} vs {b:?}");
        }
        let refs = m.sequence_logprobs(&ids, 3, &to, Pass::Base).unwrap();
        let loss_of = |lp: &Tensor| Ok(dpo_loss(&lp.narrow(0, 0, 1)?, &lp.narrow(0, 1, 1)?, &refs.narrow(0, 0, 1)?, &refs.narrow(0, 1, 1)?, 0.5)?.loss);
        let (_, lw, gw) = m.logprob_grads(&ids, 3, &to, loss_of).unwrap();
        let (_, lp, gp) = m.pair_logprob_grads(&pair, loss_of).unwrap();
        let (lw, lp): (f64, f64) = (lw.to_scalar().unwrap(), lp.to_scalar().unwrap());
        assert!((lw - lp).abs() < 1e-12, "{lw} vs {lp}");
        for (i, v) in m.vars().iter().enumerate() {
            let w: Vec<f64> = gw.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let c: Vec<f64> = gp.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let scale = w.iter().fold(0f64, |a, x| a.max(x.abs()));
            assert!(scale > 0.0, "var {i}: no gradient");
            for (x, y) in w.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-10 * scale.max(1.0), "var {i}: padded {x} vs packed {y}");
            }
        }
    }

    /// The checkpointed gradients (one layer's graph at a time, the head in
    /// slices) equal the whole graph's, for every adapter matrix.
    #[test]
    fn checkpointed_gradients_equal_whole_graph() {
        let base = tiny(DType::F64);
        let spec = LoraSpec { rank: 2, alpha: 4.0, targets: LoraSpec::targets_from(&["all-linear".into()]).unwrap() };
        let mut m = TrainModel::from_llama(&base, spec, DType::F64, 3).unwrap();
        // Slices of two positions: the 7 response positions take four.
        m.head_elems = 4 * 11 * 2;
        let mut rng = Rng(9);
        for v in m.vars() {
            let vals: Vec<f64> = (0..v.elem_count()).map(|_| rng.next() * 0.3).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        // Rows: chosen 0, chosen 1, rejected 0, rejected 1 after a 2-token prompt.
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 2, 4, 5, 6, 3, 2, 1, 9], [1, 2, 7, 0, 0, 0, 0, 0, 0], [1, 2, 8, 9, 0, 0, 0, 0, 0], [1, 2, 10, 4, 2, 5, 5, 6, 7]], &dev).unwrap();
        let to = [9, 3, 4, 9];
        let refs = m.sequence_logprobs(&ids, 2, &to, Pass::Base).unwrap();
        let loss_of = |lp: &Tensor| {
            let (c, r) = (lp.narrow(0, 0, 2)?, lp.narrow(0, 2, 2)?);
            Ok(dpo_loss(&c, &r, &refs.narrow(0, 0, 2)?, &refs.narrow(0, 2, 2)?, 0.5)?.loss)
        };
        let whole = loss_of(&m.sequence_logprobs(&ids, 2, &to, Pass::Train).unwrap()).unwrap();
        let gw = whole.backward().unwrap();
        let (lp, loss, gc) = m.logprob_grads(&ids, 2, &to, loss_of).unwrap();
        let eval = m.sequence_logprobs(&ids, 2, &to, Pass::Eval).unwrap();
        let (a, b): (Vec<f64>, Vec<f64>) = (lp.to_vec1().unwrap(), eval.to_vec1().unwrap());
        assert_eq!(a, b, "log-probabilities");
        let (lw, lc): (f64, f64) = (whole.to_scalar().unwrap(), loss.to_scalar().unwrap());
        assert!((lw - lc).abs() < 1e-12, "{lw} vs {lc}");
        for (i, v) in m.vars().iter().enumerate() {
            let w: Vec<f64> = gw.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let c: Vec<f64> = gc.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let scale = w.iter().fold(0f64, |a, x| a.max(x.abs()));
            assert!(scale > 0.0, "var {i}: no gradient");
            for (x, y) in w.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-10 * scale.max(1.0), "var {i}: whole graph {x} vs checkpointed {y}");
            }
        }
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
        let train = m.logits(&ids_t, Pass::Train).unwrap().squeeze(0).unwrap();
        let (inf, _) = base.prefill(&[&ids]).unwrap();
        let a: Vec<f32> = train.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = inf.get(0).unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}
