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

use std::sync::Mutex;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use crate::prefix_cache::{PrefixCache, PrefixStats};

/// A weight matrix stored (out, in): quantized, or dense in any float dtype.
/// Q4_1 and Q8_0 go to this crate's x86 kernels where the CPU has them
/// (candle's Q4_1 is scalar); everything else to candle's QMatMul.
///
/// A `Quant` matrix may also hold its weights dequantized to f32, (in, out)
/// contiguous (`keep_dense`): prefill and scoring multiply hundreds of rows
/// at once, where an f32 GEMM beats the integer kernel, which is built for
/// the few rows of a decode step (it re-reads every activation block and
/// its scale for each weight row). Or it makes that copy for each product
/// and drops it ([`Dense::PerCall`]): the same numbers without the memory.
/// Or it keeps the weights packed to bf16 ([`Kept::Bf16`]) for the
/// AVX512-BF16 GEMM: other numbers, half the f32 copy's memory.
pub enum Linear {
    Candle(QMatMul),
    Quant(crate::quant::QMatrix, Option<Kept>),
}

/// The copy of a quantized matrix that prompts multiply (`keep_dense`).
pub enum Kept {
    /// f32, (in, out) contiguous, for the `gemm` crate (`prefill = "dense"`).
    F32(Tensor),
    /// bf16, packed for `rir_models::bf16`'s AVX512-BF16 GEMM (`prefill =
    /// "bf16"`): half the f32 copy's memory, 1.5-1.8x its products per second
    /// (`rir bench gemm`).
    Bf16(rir_models::bf16::Bf16Matrix),
}

/// Which arithmetic prompts (prefill) and scored continuations use for
/// `Quant` matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dense {
    /// The integer kernels, as decode steps.
    Off,
    /// A GEMM on the copies kept (`keep_dense`: f32; `keep_bf16`: bf16).
    Kept,
    /// An f32 GEMM on a copy made for each product and dropped after it
    /// (the same copy `keep_dense` makes, so the same numbers; ggml's BLAS
    /// backend multiplies prompts the same way). Costs the dequantization
    /// of the layer weights per forward pass over prompt positions (a
    /// prefill; a shared prefix's run and a scored continuation's are
    /// passes of their own), not their memory.
    PerCall,
}

impl Linear {
    pub fn dense(w: Tensor) -> Self {
        Linear::Candle(QMatMul::Tensor(w))
    }

    pub fn quantized(q: QTensor) -> Result<Self> {
        // candle's Q5_0/Q5_1 dot products are scalar (its K-quants and Q4_0
        // have AVX): those maps go to Q8_0 on this crate's kernels, which is
        // finer than 5 bits (a Q5 value moves by at most ~6% of its step).
        let q = match q.dtype() {
            GgmlDType::Q5_0 | GgmlDType::Q5_1 if q.device().is_cpu() && crate::quant::kernel().is_some() => {
                QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            }
            _ => q,
        };
        let format = match q.dtype() {
            GgmlDType::Q4_1 => Some(crate::quant::Format::Q4_1),
            GgmlDType::Q8_0 => Some(crate::quant::Format::Q8_0),
            _ => None,
        };
        if let (Some(f), true) = (format, q.device().is_cpu()) {
            let (n, k) = q.shape().dims2()?;
            if let Some(m) = crate::quant::QMatrix::from_bytes(f, &q.data()?, n, k) {
                return Ok(Linear::Quant(m, None));
            }
        }
        Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
    }

    /// The weights as an f32 (out, in) tensor.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.dequantize(device),
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.to_dtype(DType::F32),
            Linear::Quant(m, _) => Tensor::from_vec(m.dequantize(), (m.n, m.k), device),
        }
    }

    /// Keeps an f32 copy of a quantized matrix for `dense` forwards (no-op
    /// for other kinds); returns whether one was made.
    pub fn keep_dense(&mut self) -> Result<bool> {
        match self {
            Linear::Quant(m, d @ None) => {
                *d = Some(Kept::F32(dense_copy(m)?));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Keeps a bf16 copy of a quantized matrix (its f32 weights rounded to
    /// nearest) for `dense` forwards on the bf16 GEMM (no-op for other
    /// kinds); returns whether one was made.
    pub fn keep_bf16(&mut self) -> Result<bool> {
        match self {
            Linear::Quant(m, d @ None) => {
                *d = Some(Kept::Bf16(rir_models::bf16::Bf16Matrix::pack(&m.dequantize(), m.n, m.k)));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// `x @ Wᵀ` for several matrices of the same input; the quantized kernels
    /// quantize the input once for all of them. `dense`: an f32 GEMM where
    /// it applies (see [`Linear::forward_with`]).
    pub fn forward_many(ls: &[&Linear], x: &Tensor, dense: Dense) -> Result<Vec<Tensor>> {
        let integer = |l: &&Linear| match l {
            Linear::Quant(_, kept) => dense == Dense::Off || (dense == Dense::Kept && kept.is_none()),
            _ => false,
        };
        let shared = match ls {
            [Linear::Quant(first, _), rest @ ..] if ls.iter().any(integer) => {
                rest.iter().all(|l| matches!(l, Linear::Quant(o, _) if first.shares_input(o))).then_some(first)
            }
            _ => None,
        };
        let Some(first) = shared else { return ls.iter().map(|l| l.forward_with(x, dense)).collect() };
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / last.max(1);
        let v = x.reshape((rows, last))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let act = first.quantize(&v, rows);
        ls.iter()
            .map(|l| {
                let Linear::Quant(m, _) = l else { unreachable!() };
                let mut out = dims.clone();
                *out.last_mut().unwrap() = m.n;
                Tensor::from_vec(m.matmul_quantized(&act), out, x.device())?.to_dtype(x.dtype())
            })
            .collect()
    }

    /// `x @ Wᵀ` over the last dimension, any leading dims.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Dense::Off)
    }

    /// `forward`; a `Quant` matrix through an f32 GEMM on its kept copy
    /// (`Dense::Kept`, where one is kept) or on one made now (`Dense::PerCall`).
    pub fn forward_with(&self, x: &Tensor, dense: Dense) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / last.max(1);
        // Quantized matmuls need a contiguous 2-D left side.
        let flat = x.reshape((rows, last))?.contiguous()?;
        let y = match self {
            Linear::Candle(QMatMul::Tensor(w)) => flat.matmul(&w.t()?)?,
            Linear::Candle(q) => q.forward(&flat)?,
            Linear::Quant(_, Some(Kept::Bf16(p))) if dense == Dense::Kept => {
                // Each row is summed alone: no lone-row special case needed.
                let v = flat.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(p.matmul(&v, rows), (rows, p.n), x.device())?.to_dtype(x.dtype())?
            }
            Linear::Quant(m, kept) if dense == Dense::PerCall || (dense == Dense::Kept && kept.is_some()) => {
                let made;
                let w = match kept {
                    Some(Kept::F32(w)) => w,
                    _ => {
                        made = dense_copy(m)?;
                        &made
                    }
                };
                // One row would take the GEMM crate's matrix-vector path (another
                // summation order): two keep a lone row's numbers as in a batch.
                let f = flat.to_dtype(DType::F32)?;
                let y = if rows == 1 { Tensor::cat(&[&f, &f], 0)?.matmul(w)?.narrow(0, 0, 1)? } else { f.matmul(w)? };
                y.to_dtype(x.dtype())?
            }
            Linear::Quant(m, _) => {
                let v = flat.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(m.matmul(&v, rows), (rows, m.n), x.device())?.to_dtype(x.dtype())?
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }
}

/// A quantized matrix's weights in f32, (in, out) contiguous: what the
/// dense paths multiply (one function, so kept and per-call copies agree bit
/// for bit).
fn dense_copy(m: &crate::quant::QMatrix) -> Result<Tensor> {
    Tensor::from_vec(m.dequantize_transposed(), (m.k, m.n), &Device::Cpu)
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
    /// Q, K and V biases (Qwen2); Llama has none.
    pub qkv_bias: Option<[Tensor; 3]>,
}

impl Layer {
    /// Adds the Q/K/V biases (if any) to the projections' outputs.
    pub fn biased(&self, qkv: [Tensor; 3]) -> Result<[Tensor; 3]> {
        match &self.qkv_bias {
            None => Ok(qkv),
            Some([bq, bk, bv]) => {
                let [q, k, v] = qkv;
                Ok([q.broadcast_add(bq)?, k.broadcast_add(bk)?, v.broadcast_add(bv)?])
            }
        }
    }
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
    /// The output head is the token embedding (tied; GGUF files without
    /// `output.weight`): the trainer then shares the embedding's f32 copy.
    pub tied_output: bool,
    /// How prompts multiply the layers' quantized matrices (`dense_prefill`).
    dense: Dense,
    /// Whether `prefill` runs a prefix its prompts share once, and starts
    /// from a kept prefix (on unless turned off; the numbers are the same
    /// either way).
    pub share_prefix: bool,
    /// Prompt prefixes kept across calls ([`Llama::set_prefix_cache`]; off
    /// unless given a budget).
    prefix_cache: Mutex<PrefixCache>,
    cos: Tensor,
    sin: Tensor,
}

/// Keys and values of every layer for a batch of sequences, in buffers with
/// room to grow (written in place: no copy of the whole cache per token).
/// Not `Clone`: clones would share the buffers being written.
pub struct KvCache {
    kv: Vec<(Tensor, Tensor)>,
    /// Left-pad columns per row.
    pub pads: Vec<usize>,
    /// Columns filled so far (pads included).
    pub len: usize,
    /// Columns allocated.
    cap: usize,
}

impl KvCache {
    /// Keeps (and repeats) the given rows, in that order: used to fan one
    /// prefilled prompt out to its n samples and to drop finished sequences.
    pub fn select(&self, rows: &[usize]) -> Result<KvCache> {
        let device = self.kv.first().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &device)?;
        // Columns that are padding in every remaining row are dropped.
        let pads: Vec<usize> = rows.iter().map(|&r| self.pads[r]).collect();
        let common = pads.iter().copied().min().unwrap_or(0);
        let take = |t: &Tensor| -> Result<Tensor> {
            let t = t.index_select(&idx, 0)?;
            if common > 0 { t.narrow(2, common, self.cap - common)?.contiguous() } else { Ok(t) }
        };
        let kv = self.kv.iter().map(|(k, v)| Ok((take(k)?, take(v)?))).collect::<Result<_>>()?;
        Ok(KvCache { kv, pads: pads.iter().map(|p| p - common).collect(), len: self.len - common, cap: self.cap - common })
    }

    /// Makes room for `need` columns (doubling, at most `limit`).
    fn reserve(&mut self, need: usize, limit: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let cap = need.max(self.cap * 2).max(need + 64).min(limit.max(need));
        let len = self.len;
        let grow = |t: &Tensor| -> Result<Tensor> {
            let (b, h, _, d) = t.dims4()?;
            let n = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
            if len > 0 {
                n.slice_set(&t.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            Ok(n)
        };
        for kv in self.kv.iter_mut() {
            *kv = (grow(&kv.0)?, grow(&kv.1)?);
        }
        self.cap = cap;
        Ok(())
    }

    /// Writes layer `li`'s new keys and values at column `len`; returns the
    /// filled part (views) including them.
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        if li == self.kv.len() {
            let (b, h, _, d) = k.dims4()?;
            let z = || Tensor::zeros((b, h, self.cap, d), k.dtype(), k.device());
            self.kv.push((z()?, z()?));
        }
        let (ck, cv) = &self.kv[li];
        ck.slice_set(k, 2, self.len)?;
        cv.slice_set(v, 2, self.len)?;
        Ok((ck.narrow(2, 0, self.len + l)?, cv.narrow(2, 0, self.len + l)?))
    }
}

/// Tokens a prefix run once must save before [`Llama::prefill`] shares it.
const MIN_SHARED_SAVING: usize = 16;

/// Positions the prefix cache must hold of a prompt before it is used, and
/// the shortest prefix kept.
const MIN_CACHED: usize = 16;

/// The longest prefix of `prompts` that can run once for all of them: the
/// longest they share, at most the longest prompt less one token (the
/// shared run does not give the last position's logits); 0 if none.
fn runnable_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else { return 0 };
    let mut p = first.len();
    for q in rest {
        p = p.min(first.iter().zip(q.iter()).take_while(|(a, b)| a == b).count());
    }
    let max = prompts.iter().map(|q| q.len()).max().unwrap_or(0);
    p.min(max.saturating_sub(1))
}

/// Positions saved by running the prefix `p` once for `prompts` rather
/// than in every row. In the left-padded batch the shared run ends at
/// column p (the longest prompt has no pad): row i, with max - len_i pads,
/// takes p - (max - len_i) of its positions from it, or none when its pads
/// reach that column; the prefix runs once.
fn batch_saving(prompts: &[&[u32]], p: usize) -> usize {
    let max = prompts.iter().map(|q| q.len()).max().unwrap_or(0);
    let reused: usize = prompts.iter().map(|q| p.saturating_sub(max - q.len())).sum();
    reused.saturating_sub(p)
}

/// The length of the prefix [`Llama::prefill`] runs once for a batch of
/// `prompts` with nothing cached ([`runnable_prefix`]), if sharing it saves
/// at least [`MIN_SHARED_SAVING`] token positions.
pub fn shared_prefix(prompts: &[&[u32]]) -> Option<usize> {
    if prompts.len() < 2 {
        return None;
    }
    let p = runnable_prefix(prompts);
    (p > 0 && batch_saving(prompts, p) >= MIN_SHARED_SAVING).then_some(p)
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
            tied_output: false,
            dense: Dense::Off,
            share_prefix: true,
            prefix_cache: Mutex::new(PrefixCache::new(0)),
        })
    }

    /// Keeps f32 copies of the layers' quantized (Q4_1 / Q8_0) matrices and
    /// runs prompts (prefill) and scored continuations (`extend`) on them:
    /// several times the memory of those weights, for faster prefill. Decode
    /// steps and the output head stay on the integer kernels. Results do
    /// not depend on the batch: a GEMM row is summed in one order whatever
    /// the other rows. Returns how many matrices got a copy.
    pub fn dense_prefill(&mut self) -> Result<usize> {
        if !self.device.is_cpu() {
            return Ok(0);
        }
        self.keep_copies(Linear::keep_dense)
    }

    /// Gives every layer matrix a kept copy by `keep` and switches prompts
    /// to them; returns how many got one.
    fn keep_copies(&mut self, keep: fn(&mut Linear) -> Result<bool>) -> Result<usize> {
        let mut n = 0;
        for l in self.layers.iter_mut() {
            for lin in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.gate, &mut l.up, &mut l.down] {
                n += keep(lin)? as usize;
            }
        }
        self.dense = if n > 0 { Dense::Kept } else { Dense::Off };
        // Prompts now run on other arithmetic: kept prefixes are stale.
        self.clear_prefix_cache();
        Ok(n)
    }

    /// As [`Llama::dense_prefill`], on bf16 copies and the AVX512-BF16 GEMM
    /// (`rir_models::bf16`): half the memory of the f32 copies and 1.3-1.5x
    /// their prompt tokens/s, with activations and weights rounded to bf16
    /// (products summed in f32). Returns 0 and changes nothing where the CPU
    /// lacks AVX512-BF16 (`rir_models::bf16::available`) or the model is
    /// not on the CPU.
    pub fn bf16_prefill(&mut self) -> Result<usize> {
        if !self.device.is_cpu() || !rir_models::bf16::available() {
            return Ok(0);
        }
        self.keep_copies(Linear::keep_bf16)
    }

    /// [`Llama::dense_prefill`]'s arithmetic, bit for bit, without keeping
    /// the copies: each product dequantizes its matrix, multiplies and drops
    /// it ([`Dense::PerCall`]). For a memory budget that cannot hold the f32
    /// weights; each forward pass over prompt positions pays their
    /// dequantization. Returns how many
    /// matrices it applies to.
    pub fn dense_prefill_per_call(&mut self) -> Result<usize> {
        if !self.device.is_cpu() {
            return Ok(0);
        }
        let n = self
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .filter(|lin| matches!(lin, Linear::Quant(..)))
            .count();
        self.dense = if n > 0 { Dense::PerCall } else { Dense::Off };
        self.clear_prefix_cache();
        Ok(n)
    }

    /// Keeps up to `bytes` of prompt prefixes' keys and values across calls
    /// of [`Llama::prefill`] (0: none).
    pub fn set_prefix_cache(&self, bytes: usize) {
        self.prefix_lock().set_budget(bytes);
    }

    /// Drops the kept prefixes: call it after changing the weights.
    pub fn clear_prefix_cache(&self) {
        self.prefix_lock().clear();
    }

    pub fn prefix_cache_stats(&self) -> PrefixStats {
        self.prefix_lock().stats()
    }

    fn prefix_lock(&self) -> std::sync::MutexGuard<'_, PrefixCache> {
        // The cache is consistent after any panic (entries are whole or absent).
        self.prefix_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs left-padded prompts through the model; returns the last
    /// position's logits (rows, vocab) in f32 and the cache. A prefix the
    /// prompts share (a chat template, a task instruction) is run once
    /// ([`shared_prefix`]), and starts from the prefix cache's keys and
    /// values where an earlier call kept them ([`Llama::set_prefix_cache`]);
    /// the numbers are those of running each prompt whole.
    pub fn prefill(&self, prompts: &[&[u32]]) -> Result<(Tensor, KvCache)> {
        self.prefill_counted(prompts).map(|(logits, cache, _)| (logits, cache))
    }

    /// [`Llama::prefill`], also returning each prompt's positions whose keys
    /// and values came from the prefix cache (earlier calls), as a server
    /// reports `cached_tokens`; a prefix shared within this batch is run in
    /// this call and not counted.
    pub fn prefill_counted(&self, prompts: &[&[u32]]) -> Result<(Tensor, KvCache, Vec<usize>)> {
        let none = |(logits, cache)| (logits, cache, vec![0; prompts.len()]);
        if !self.share_prefix || prompts.is_empty() {
            return self.prefill_whole(prompts).map(none);
        }
        let p = runnable_prefix(prompts);
        let (caching, cached) = {
            let c = self.prefix_lock();
            (c.budget() > 0, if c.budget() > 0 && p >= MIN_CACHED { c.peek(&prompts[0][..p], MIN_CACHED) } else { 0 })
        };
        if prompts.len() == 1 && cached > 0 {
            return self.prefill_continued(prompts[0]);
        }
        if p > 0 && (batch_saving(prompts, p) >= MIN_SHARED_SAVING || cached > 0) {
            return self.prefill_shared(prompts, p);
        }
        let (logits, cache) = self.prefill_whole(prompts)?;
        // A lone prompt is kept (all but its last position) for the calls
        // that follow: a served conversation, the same instruction again.
        if caching && prompts.len() == 1 && p >= MIN_CACHED {
            self.prefix_lock().insert(&prompts[0][..p], &cache.kv)?;
        }
        Ok(none((logits, cache)))
    }

    /// One prompt whose opening the prefix cache holds: the rest of it is
    /// run on the cached keys and values in one pass (which gives the last
    /// position's logits), and the prompt less its last position is kept.
    fn prefill_continued(&self, prompt: &[u32]) -> Result<(Tensor, KvCache, Vec<usize>)> {
        let keep = prompt.len() - 1;
        let Some((m, kv)) = self.prefix_lock().lookup(&prompt[..keep], MIN_CACHED)? else {
            return self.prefill_whole(&[prompt]).map(|(logits, cache)| (logits, cache, vec![0]));
        };
        let (h, cache) = self.resume(kv, m, prompt)?;
        let l = h.dim(1)?;
        let logits = self.head(&h.i((.., l - 1, ..))?.contiguous()?)?;
        self.prefix_lock().insert(&prompt[..keep], &cache.kv)?;
        Ok((logits, cache, vec![m]))
    }

    /// Runs `tokens[m..]` as one row after the cached keys and values `kv`
    /// of `tokens[..m]`; returns their hidden states and the cache. The
    /// cached views are only read: the first append grows the cache into
    /// new buffers (it has room for m positions only).
    fn resume(&self, kv: Vec<(Tensor, Tensor)>, m: usize, tokens: &[u32]) -> Result<(Tensor, KvCache)> {
        let mut cache = KvCache { kv, pads: vec![0], len: m, cap: m };
        let ids = Tensor::new(&tokens[m..], &self.device)?.reshape((1, tokens.len() - m))?;
        let h = self.hidden(&ids, &mut cache, true)?;
        Ok((h, cache))
    }

    /// The keys and values of `tokens` as one row, (1, heads, ≥ len, d) per
    /// layer: from the prefix cache as far as it holds them, the rest run
    /// (and kept there for later calls); and how many positions the cache held.
    fn prefix_kv(&self, tokens: &[u32]) -> Result<(Vec<(Tensor, Tensor)>, usize)> {
        let hit = {
            let mut c = self.prefix_lock();
            if c.budget() > 0 { c.lookup(tokens, MIN_CACHED)? } else { None }
        };
        // Nothing cached: resumed from an empty cache (no output head: only
        // the keys and values are needed).
        let (m, kv) = hit.unwrap_or_default();
        if m == tokens.len() {
            return Ok((kv, m));
        }
        let kv = self.resume(kv, m, tokens)?.1.kv;
        self.prefix_lock().insert(tokens, &kv)?;
        Ok((kv, m))
    }

    /// [`Llama::prefill`] without sharing a prefix: every prompt whole.
    pub fn prefill_whole(&self, prompts: &[&[u32]]) -> Result<(Tensor, KvCache)> {
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let ids: Vec<u32> = prompts.iter().flat_map(|p| std::iter::repeat_n(0u32, width - p.len()).chain(p.iter().copied())).collect();
        let mut cache = KvCache { kv: Vec::new(), pads, len: 0, cap: 0 };
        let ids = Tensor::new(ids, &self.device)?.reshape((prompts.len(), width))?;
        let logits = self.forward(&ids, &mut cache, true)?;
        Ok((logits, cache))
    }

    /// Prefill with the first `p` tokens, which every prompt shares, run
    /// once. Rows stay left-padded as in [`Llama::prefill_whole`]: with c = p
    /// (the column where the longest prompt's shared part ends), row i's
    /// first `c - pads[i]` tokens (all within the shared prefix) get their
    /// keys and values copied from the one run of the prefix — none, for a
    /// short prompt whose pads reach column c — and every row's columns
    /// from c on go through the model together. A
    /// position's numbers depend only on the tokens up to it (causal
    /// attention, summed over its own keys in order; every matrix product
    /// sums a row alone), so they are those of the whole prompt: the test
    /// `prefill_shares_a_prefix_bit_for_bit` checks it.
    fn prefill_shared(&self, prompts: &[&[u32]], p: usize) -> Result<(Tensor, KvCache, Vec<usize>)> {
        let width = prompts.iter().map(|q| q.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|q| width - q.len()).collect();
        // The longest prompt has no pad: the shared run ends at column p.
        let c = p;
        let (prefix, hit) = self.prefix_kv(&prompts[0][..p])?;
        // Row i takes the prefix's first c - pads[i] positions, of which the cache held `hit`.
        let cached = pads.iter().map(|&pad| c.saturating_sub(pad).min(hit)).collect();
        let kv = prefix
            .iter()
            .map(|(k, v)| {
                let rows = |t: &Tensor| -> Result<Tensor> {
                    let (_, h, _, d) = t.dims4()?;
                    let parts = pads
                        .iter()
                        .map(|&pad| {
                            // A row whose pads reach column c takes nothing from the prefix.
                            if pad >= c {
                                return Tensor::zeros((1, h, c, d), t.dtype(), t.device());
                            }
                            let own = t.narrow(2, 0, c - pad)?;
                            if pad == 0 { Ok(own) } else { Tensor::cat(&[&Tensor::zeros((1, h, pad, d), t.dtype(), t.device())?, &own], 2) }
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?.contiguous()
                };
                Ok((rows(k)?, rows(v)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cache = KvCache { kv, pads: pads.clone(), len: c, cap: c };
        // Columns c.. of each row: its remaining pads, then its tokens.
        let ids: Vec<u32> = prompts.iter().zip(&pads).flat_map(|(q, &pad)| (c..width).map(move |col| if col < pad { 0 } else { q[col - pad] })).collect();
        let ids = Tensor::new(ids, &self.device)?.reshape((prompts.len(), width - c))?;
        let logits = self.forward(&ids, &mut cache, true)?;
        Ok((logits, cache, cached))
    }

    /// One new token per row; returns (rows, vocab) f32 logits.
    pub fn step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?.reshape((tokens.len(), 1))?;
        self.forward(&ids, cache, false)
    }

    /// Appends `tokens` (the same count per row) to the cache and returns the
    /// logits at every one of their positions, (rows, len, vocab) in f32:
    /// teacher forcing, for scoring a continuation after a prefilled prompt.
    pub fn extend(&self, tokens: &[&[u32]], cache: &mut KvCache) -> Result<Tensor> {
        let l = tokens.first().map_or(0, |t| t.len());
        if l == 0 || tokens.iter().any(|t| t.len() != l) {
            candle_core::bail!("extend needs rows of one non-zero length")
        }
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let ids = Tensor::new(ids, &self.device)?.reshape((tokens.len(), l))?;
        let h = self.hidden(&ids, cache, true)?;
        self.head(&h)
    }

    /// The last position's logits, (rows, vocab) in f32.
    fn forward(&self, ids: &Tensor, cache: &mut KvCache, dense: bool) -> Result<Tensor> {
        let h = self.hidden(ids, cache, dense)?;
        let l = h.dim(1)?;
        self.head(&h.i((.., l - 1, ..))?.contiguous()?)
    }

    /// Final norm and output projection over the last dimension, in f32.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(h, &self.norm, self.shape.eps as f32)?;
        self.output.forward(&x)?.to_dtype(DType::F32)
    }

    /// The hidden states after the last layer, (rows, len, hidden).
    /// `dense`: on the f32 copies, if kept (prompts and continuations; decode
    /// steps stay on the integer kernels).
    fn hidden(&self, ids: &Tensor, cache: &mut KvCache, dense: bool) -> Result<Tensor> {
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
        let cpu_attention = self.device.is_cpu() && self.dtype == DType::F32;
        let mask = if cpu_attention || (l == 1 && cache.pads.iter().all(|&p| p == 0)) {
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

        let dense = if dense { self.dense } else { Dense::Off };
        // Left pads among the new positions (a batch of prompts of different
        // lengths) are left out of every per-position step: the norms and
        // matrix products run on the real positions only, which are scattered
        // back (pads get a copy of a real row, never read: attention skips
        // pad keys and pad queries are dropped) for RoPE and attention.
        // Every product sums a row alone, so the numbers are unchanged; one
        // real row is left padded (single-row products take other paths).
        let (real, spread) = if cache.pads.iter().all(|&p| p <= start) {
            // No pads among the new positions (decode steps, scoring, equal lengths).
            (None, None)
        } else {
            let (mut real, mut spread) = (Vec::with_capacity(b * l), vec![0u32; b * l]);
            for i in 0..b {
                let pads = cache.pads[i].saturating_sub(start).min(l);
                // A pad copies its row's first real position.
                let copy = if pads < l { real.len() as u32 } else { 0 };
                for t in 0..l {
                    if t < pads {
                        spread[i * l + t] = copy;
                    } else {
                        spread[i * l + t] = real.len() as u32;
                        real.push((i * l + t) as u32);
                    }
                }
            }
            if real.len() >= 2 && real.len() < b * l {
                (Some(Tensor::new(real, &self.device)?), Some(Tensor::new(spread, &self.device)?))
            } else {
                (None, None)
            }
        };
        // (rows, ·) over the real positions -> (b, l, ·), and back.
        let expand = |t: Tensor| -> Result<Tensor> {
            let t = match &spread { Some(sp) => t.index_select(sp, 0)?, None => t };
            let w = t.dim(t.rank() - 1)?;
            t.reshape((b, l, w))
        };
        let reals = |t: &Tensor| -> Result<Tensor> {
            let w = t.dim(t.rank() - 1)?;
            let t = t.reshape((b * l, w))?;
            match &real { Some(r) => t.index_select(r, 0), None => Ok(t) }
        };
        let mut h = match &real {
            Some(r) => self.embed.index_select(&ids.flatten_all()?.index_select(r, 0)?, 0)?,
            None => self.embed.index_select(&ids.flatten_all()?, 0)?,
        };
        cache.reserve(total, s.context)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let x = candle_nn::ops::rms_norm(&h, &layer.attn_norm, s.eps as f32)?;
            let heads = |t: Tensor, n: usize| expand(t)?.reshape((b, l, n, s.head_dim))?.transpose(1, 2)?.contiguous();
            let [q, k, v]: [Tensor; 3] = layer.biased(
                Linear::forward_many(&[&layer.wq, &layer.wk, &layer.wv], &x, dense)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("q/k/v".into()))?,
            )?;
            let (q, k, v) = (heads(q, s.n_head)?, heads(k, s.n_kv_head)?, heads(v, s.n_kv_head)?);
            let (q, k) = if s.interleaved_rope {
                (crate::rope::rope_i(&q, &cos, &sin)?, crate::rope::rope_i(&k, &cos, &sin)?)
            } else {
                (candle_nn::rotary_emb::rope(&q, &cos, &sin)?, candle_nn::rotary_emb::rope(&k, &cos, &sin)?)
            };
            let (k, v) = cache.append(li, &k, &v)?;
            let y = if cpu_attention {
                let (ck, cv) = &cache.kv[li];
                crate::attention::attend_cpu(&q, ck, cv, start, &cache.pads, s)?
            } else {
                self.attend(&q, &k, &v, mask.as_ref(), l, total)?
            };
            h = (h + layer.wo.forward_with(&reals(&y)?, dense)?)?;
            let x = candle_nn::ops::rms_norm(&h, &layer.ffn_norm, s.eps as f32)?;
            let [g, u]: [Tensor; 2] = Linear::forward_many(&[&layer.gate, &layer.up], &x, dense)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate/up".into()))?;
            h = (h + layer.down.forward_with(&(candle_nn::ops::silu(&g)? * u)?, dense)?)?;
        }
        cache.len = total;
        expand(h)
    }

    /// Attention with candle ops (GPU, or non-f32 activations).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, l: usize, total: usize) -> Result<Tensor> {
        let s = &self.shape;
        let b = q.dim(0)?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        // Grouped-query attention without copying K/V per head: the
        // `rep` query heads of one KV head become extra query rows.
        let rep = s.n_head / s.n_kv_head;
        let q = q.reshape((b, s.n_kv_head, rep * l, s.head_dim))?;
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            att = att.reshape((b, s.n_kv_head, rep, l, total))?.broadcast_add(&m.unsqueeze(1)?)?.reshape((b, s.n_kv_head, rep * l, total))?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v)?.reshape((b, s.n_head, l, s.head_dim))?.transpose(1, 2)?.reshape((b, l, s.n_head * s.head_dim))
    }
}
