//! The Llama forward pass used for generation: quantized (GGUF) or dense
//! (safetensors) weights behind one `Linear`, and a KV cache that lives
//! outside the model so several sequences decode together.
//!
//! Sequences of different lengths share a batch by left padding: row i has
//! `pads[i]` pad columns, its positions start at 0 after them, and an
//! additive mask hides the pad keys. The mask uses a large finite negative
//! rather than -inf so a row that is all padding stays finite (softmax of
//! equal values) and never poisons the cache with NaN.
//!
//! candle-transformers' quantized_llama keeps its cache inside the model and
//! cannot prefill a batch > 1 (its last-position slice is non-contiguous and
//! the quantized matmul rejects it); this file exists for those two reasons.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

/// A weight matrix stored (out, in): quantized, or dense in any float dtype.
/// Q4_1 goes to this crate's AVX2 kernel where the CPU has it (candle's is
/// scalar); everything else to candle's QMatMul.
pub enum Linear {
    Candle(QMatMul),
    Q41(crate::q4_1::Q41Matrix),
}

impl Linear {
    pub fn dense(w: Tensor) -> Self {
        Linear::Candle(QMatMul::Tensor(w))
    }

    pub fn quantized(q: QTensor) -> Result<Self> {
        if q.dtype() == GgmlDType::Q4_1 && q.device().is_cpu() && crate::q4_1::available() {
            let (n, k) = q.shape().dims2()?;
            if let Some(m) = crate::q4_1::Q41Matrix::from_bytes(&q.data()?, n, k) {
                return Ok(Linear::Q41(m));
            }
        }
        Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
    }

    /// The weights as an f32 (out, in) tensor.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.dequantize(device),
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.to_dtype(DType::F32),
            Linear::Q41(m) => Tensor::from_vec(m.dequantize(), (m.n, m.k), device),
        }
    }

    /// `x @ Wᵀ` over the last dimension, any leading dims.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / last.max(1);
        // Quantized matmuls need a contiguous 2-D left side.
        let flat = x.reshape((rows, last))?.contiguous()?;
        let y = match self {
            Linear::Candle(QMatMul::Tensor(w)) => flat.matmul(&w.t()?)?,
            Linear::Candle(q) => q.forward(&flat)?,
            Linear::Q41(m) => {
                let v = flat.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(m.matmul(&v, rows), (rows, m.n), x.device())?.to_dtype(x.dtype())?
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }
}

/// The shape of a Llama model, from GGUF metadata or an HF config.json.
#[derive(Clone, Debug)]
pub struct Shape {
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub eps: f64,
    pub rope_theta: f32,
    /// Positions the model was trained for.
    pub context: usize,
    /// GGUF stores Q/K rows permuted for interleaved rope (llama.cpp's
    /// layout); HF checkpoints use the half-split ("neox") rotation.
    pub interleaved_rope: bool,
}

pub struct Layer {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub attn_norm: Tensor,
    pub ffn_norm: Tensor,
}

pub struct Llama {
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub output: Linear,
    pub shape: Shape,
    /// Activation dtype (f32 for quantized weights).
    pub dtype: DType,
    pub device: Device,
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of every layer for a batch of sequences.
#[derive(Clone)]
pub struct KvCache {
    kv: Vec<(Tensor, Tensor)>,
    /// Left-pad columns per row.
    pub pads: Vec<usize>,
    /// Columns filled so far (pads included).
    pub len: usize,
}

impl KvCache {
    /// Keeps (and repeats) the given rows, in that order: used to fan one
    /// prefilled prompt out to its n samples and to drop finished sequences.
    pub fn select(&self, rows: &[usize]) -> Result<KvCache> {
        let device = self.kv.first().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &device)?;
        let kv = self
            .kv
            .iter()
            .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
            .collect::<Result<_>>()?;
        // Columns that are padding in every remaining row are dropped.
        let pads: Vec<usize> = rows.iter().map(|&r| self.pads[r]).collect();
        let common = pads.iter().copied().min().unwrap_or(0);
        let mut out = KvCache { kv, pads, len: self.len };
        if common > 0 {
            out.kv = out
                .kv
                .iter()
                .map(|(k, v)| Ok((k.narrow(2, common, self.len - common)?, v.narrow(2, common, self.len - common)?)))
                .collect::<Result<_>>()?;
            out.pads.iter_mut().for_each(|p| *p -= common);
            out.len -= common;
        }
        Ok(out)
    }
}

/// Mask value for hidden keys: finite, so all-hidden rows stay finite.
const HIDDEN: f32 = -1e30;

impl Llama {
    pub fn new(
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        shape: Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = shape.head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| 1f32 / shape.rope_theta.powf(2.0 * i as f32 / shape.head_dim as f32)).collect();
        let inv = Tensor::new(inv, device)?.reshape((1, half))?;
        let pos = Tensor::arange(0u32, shape.context as u32, device)?.to_dtype(DType::F32)?.reshape((shape.context, 1))?;
        let freqs = pos.matmul(&inv)?;
        Ok(Self {
            embed,
            layers,
            norm,
            output,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            shape,
            dtype,
            device: device.clone(),
        })
    }

    /// Runs left-padded prompts through the model; returns the last
    /// position's logits (rows, vocab) in f32 and the cache.
    pub fn prefill(&self, prompts: &[&[u32]]) -> Result<(Tensor, KvCache)> {
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let ids: Vec<u32> = prompts.iter().flat_map(|p| std::iter::repeat_n(0u32, width - p.len()).chain(p.iter().copied())).collect();
        let mut cache = KvCache { kv: Vec::new(), pads, len: 0 };
        let ids = Tensor::new(ids, &self.device)?.reshape((prompts.len(), width))?;
        let logits = self.forward(&ids, &mut cache)?;
        Ok((logits, cache))
    }

    /// One new token per row; returns (rows, vocab) f32 logits.
    pub fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?.reshape((tokens.len(), 1))?;
        self.forward(&ids, cache)
    }

    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let start = cache.len;
        let total = start + l;
        let s = &self.shape;
        if total > s.context {
            candle_core::bail!("sequence of {total} positions exceeds the model's context of {}", s.context)
        }
        // Per-row positions (pads share position 0; they are masked anyway).
        let pos: Vec<u32> = (0..b)
            .flat_map(|i| {
                let pad = cache.pads[i];
                (start..total).map(move |c| c.saturating_sub(pad) as u32)
            })
            .collect();
        let pos = Tensor::new(pos, &self.device)?;
        let half = s.head_dim / 2;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, l, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, l, half))?;
        let mask = if l == 1 && cache.pads.iter().all(|&p| p == 0) {
            None
        } else {
            let mut m = vec![0f32; b * l * total];
            for i in 0..b {
                for t in 0..l {
                    let q = start + t;
                    for j in 0..total {
                        if j < cache.pads[i] || j > q {
                            m[(i * l + t) * total + j] = HIDDEN;
                        }
                    }
                }
            }
            Some(Tensor::new(m, &self.device)?.reshape((b, 1, l, total))?.to_dtype(self.dtype)?)
        };

        let mut h = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, s.hidden))?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let first = cache.kv.is_empty();
        for (li, layer) in self.layers.iter().enumerate() {
            let x = candle_nn::ops::rms_norm(&h, &layer.attn_norm, s.eps as f32)?;
            let heads = |t: Tensor, n: usize| t.reshape((b, l, n, s.head_dim))?.transpose(1, 2)?.contiguous();
            let q = heads(layer.wq.forward(&x)?, s.n_head)?;
            let k = heads(layer.wk.forward(&x)?, s.n_kv_head)?;
            let v = heads(layer.wv.forward(&x)?, s.n_kv_head)?;
            let (q, k) = if s.interleaved_rope {
                (candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?, candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?)
            } else {
                (candle_nn::rotary_emb::rope(&q, &cos, &sin)?, candle_nn::rotary_emb::rope(&k, &cos, &sin)?)
            };
            let (k, v) = if first {
                (k, v)
            } else {
                let (pk, pv) = &cache.kv[li];
                (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
            };
            if first {
                cache.kv.push((k.clone(), v.clone()));
            } else {
                cache.kv[li] = (k.clone(), v.clone());
            }
            let rep = s.n_head / s.n_kv_head;
            let (k, v) = if rep > 1 {
                let r = |t: &Tensor| {
                    Tensor::cat(&vec![t; rep], 2)?.reshape((b, s.n_kv_head * rep, total, s.head_dim))
                };
                (r(&k)?, r(&v)?)
            } else {
                (k, v)
            };
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &mask {
                att = att.broadcast_add(m)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, s.hidden))?;
            h = (h + layer.wo.forward(&y)?)?;
            let x = candle_nn::ops::rms_norm(&h, &layer.ffn_norm, s.eps as f32)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&x)?)?;
            h = (h + layer.down.forward(&(g * layer.up.forward(&x)?)?)?)?;
        }
        cache.len = total;
        let last = h.i((.., l - 1, ..))?.contiguous()?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, s.eps as f32)?;
        self.output.forward(&last)?.to_dtype(DType::F32)
    }
}
