//! A BERT encoder forward for inference, written for speed on CPU.
//!
//! Same weights and the same maths as candle-transformers' `BertModel` (and
//! HF's `BertModel`), with three changes that matter on CPU: Q, K and V are one
//! fused projection (one large GEMM instead of three), the exact erf-GELU runs
//! as a vectorisable, parallel kernel instead of scalar libm `erff` (11% of
//! cycles before), and activations stay in one layout between layers.
//!
//! On CPU in f32, attention is one op per layer: each (sequence, head) is a
//! task on one thread, its Q·Kᵀ, masked softmax and ·V in its own scratch,
//! written into the head's columns of the output — instead of candle's
//! batched matmul, which splits every 256×256 product over the threads and
//! materialises the Q/K/V split, the scores and the transposed context. Each
//! bias is added inside the op after its product (attention; GELU; the
//! residual and LayerNorm) instead of a pass of its own, and GELU and the
//! norms write into their product's output (fresh, read once) rather than
//! a new, zeroed buffer. The kernels' loops are plain `for` loops: a
//! closure's `for_each` was compiled outside the AVX-512 copy of its
//! kernel (the softmax ran in SSE: 6.6% of cycles). Every value is computed in the
//! order the unfused ops computed it, so the embeddings did not change: the
//! whole SciFact corpus encoded before and after gave the same bytes
//! (docs/BENCHMARKS.md). `forward_with(.., false)` keeps candle's own ops
//! (GPU, half precision), which the test compares against.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
    /// The CPU f32 path: `Some` when the weights are f32 on CPU.
    fused: Option<FusedLayer>,
}

/// The products without their bias, which the ops after them add.
struct FusedLayer {
    qkv: Product,
    attention: Attention,
    attn_out: Product,
    attn_norm: BiasResidualNorm,
    inter: Product,
    /// `None` for activations other than exact GELU: those add the bias and
    /// activate on candle's ops.
    gelu: Option<BiasGelu>,
    out: Product,
    out_norm: BiasResidualNorm,
}

/// A fused layer's weight product `x·Wᵀ`: candle's f32 GEMM, or
/// `rir_models::bf16`'s AVX512-BF16 GEMM on a bf16 copy (`dtype = "bf16"`
/// on such a CPU: activations rounded to bf16 per product, sums in f32;
/// everything between the products stays f32).
enum Product {
    F32(Linear),
    Bf16(rir_models::bf16::Bf16Matrix),
}

impl Product {
    fn new(lin: &Linear, bf16: bool) -> Result<Self> {
        let w = lin.weight();
        if !bf16 {
            return Ok(Product::F32(Linear::new(w.clone(), None)));
        }
        let (n, k) = w.dims2()?;
        Ok(Product::Bf16(rir_models::bf16::Bf16Matrix::pack(&w.flatten_all()?.to_vec1()?, n, k)))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Product::F32(l) => l.forward(x),
            Product::Bf16(p) => {
                let mut dims = x.dims().to_vec();
                let k = *dims.last().unwrap_or(&1);
                let rows = x.elem_count() / k.max(1);
                let v = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                *dims.last_mut().unwrap() = p.n;
                Tensor::from_vec(p.matmul(&v, rows), dims, x.device())
            }
        }
    }
}

impl FusedLayer {
    fn new(l: &Layer, act: HiddenAct, heads: usize, head_dim: usize, bf16: bool) -> Result<Self> {
        let plain = |lin: &Linear| Product::new(lin, bf16);
        let bias = |lin: &Linear| -> Result<Vec<f32>> {
            match lin.bias() {
                Some(b) => b.to_vec1::<f32>(),
                None => Ok(vec![0f32; lin.weight().dim(0)?]),
            }
        };
        let norm = |lin: &Linear, n: &LayerNorm| -> Result<BiasResidualNorm> {
            Ok(BiasResidualNorm { bias: bias(lin)?, weight: n.weight.to_vec1()?, beta: n.bias.to_vec1()?, eps: n.eps })
        };
        Ok(Self {
            qkv: plain(&l.qkv)?,
            attention: Attention { heads, head_dim, bias: bias(&l.qkv)? },
            attn_out: plain(&l.attn_out)?,
            attn_norm: norm(&l.attn_out, &l.attn_norm)?,
            inter: plain(&l.inter)?,
            gelu: if act == HiddenAct::Gelu { Some(BiasGelu(bias(&l.inter)?)) } else { None },
            out: plain(&l.out)?,
            out_norm: norm(&l.out, &l.out_norm)?,
        })
    }
}

pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
}

fn linear(vb: &VarBuilder, i: usize, o: usize) -> Result<Linear> {
    candle_nn::linear(i, o, vb.clone())
}

/// LayerNorm with a vectorised, parallel CPU kernel for f32 (candle's fused
/// one reduces each row with scalar adds: 18% of cycles).
struct LayerNorm {
    inner: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &FastLayerNorm(self.eps))
        } else {
            self.inner.forward(x)
        }
    }
}

fn layer_norm(vb: VarBuilder, h: usize, eps: f64) -> Result<LayerNorm> {
    let weight = vb.get(h, "weight")?;
    let bias = vb.get(h, "bias")?;
    let inner = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps);
    Ok(LayerNorm { inner, weight, bias, eps: eps as f32 })
}

/// Sum with eight independent accumulators, so the loop vectorises.
#[inline(always)]
fn sum8(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

struct FastLayerNorm(f32);

impl candle_core::CustomOp3 for FastLayerNorm {
    fn name(&self) -> &'static str {
        "fast-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) else {
            candle_core::bail!("fast-layer-norm: f32 only")
        };
        let (Some((xa, xz)), Some((wa, wz)), Some((ba, bz))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("fast-layer-norm: contiguous inputs only")
        };
        let (x, w, b) = (&x[xa..xz], &w[wa..wz], &b[ba..bz]);
        let h = w.len();
        let eps = self.0;
        let mut out = x.to_vec();
        out.par_chunks_mut(h * 16).for_each(|o| norm_rows(o, w, b, eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The two inputs of a two-input op as contiguous f32 slices, or an error naming `op`.
fn f32_pair<'a>(op: &str, s1: &'a CpuStorage, l1: &Layout, s2: &'a CpuStorage, l2: &Layout) -> Result<(&'a [f32], &'a [f32])> {
    let (CpuStorage::F32(x), CpuStorage::F32(y)) = (s1, s2) else { candle_core::bail!("{op}: f32 only") };
    let (Some((xa, xz)), Some((ya, yz))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("{op}: contiguous inputs only")
    };
    Ok((&x[xa..xz], &y[ya..yz]))
}

rir_models::multiversion! {
    /// LayerNorm of each row of `o` (rows of `w.len()`), in place.
    fn norm_rows(o: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        for o in o.chunks_mut(w.len()) {
            norm_row(o, w, b, eps);
        }
    }
}

rir_models::multiversion! {
    /// `LayerNorm((y + bias) + r)` of each row of `y`, in place.
    fn bias_residual_norm_rows(y: &mut [f32], r: &[f32], bias: &[f32], weight: &[f32], beta: &[f32], eps: f32) {
        let h = bias.len();
        for (y, r) in y.chunks_mut(h).zip(r.chunks(h)) {
            for ((y, &r), &b) in y.iter_mut().zip(r).zip(bias) {
                *y = (*y + b) + r;
            }
            norm_row(y, weight, beta, eps);
        }
    }
}

/// LayerNorm of one row, in place.
#[inline(always)]
fn norm_row(o: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let h = o.len();
    let mean = sum8(o) / h as f32;
    for v in o.iter_mut() {
        *v -= mean;
    }
    let mut sq = [0f32; 8];
    for c in o.chunks_exact(8) {
        for i in 0..8 {
            sq[i] += c[i] * c[i];
        }
    }
    let mut tail = 0f32;
    for v in o.chunks_exact(8).remainder() {
        tail += v * v;
    }
    let inv = 1.0 / ((sq.iter().sum::<f32>() + tail) / h as f32 + eps).sqrt();
    for ((o, &w), &b) in o.iter_mut().zip(w).zip(b) {
        *o = *o * inv * w + b;
    }
}

/// `LayerNorm((y + bias) + residual)` over rows of `y` (`[.., h]`): the
/// output projection's bias, the residual and the norm in one pass.
struct BiasResidualNorm {
    bias: Vec<f32>,
    weight: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl candle_core::InplaceOp2 for BiasResidualNorm {
    fn name(&self) -> &'static str {
        "bias-residual-norm"
    }
    /// `s1` (the product's output) becomes the norm; `s2` is the residual.
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (CpuStorage::F32(y), CpuStorage::F32(r)) = (s1, s2) else { candle_core::bail!("bias-residual-norm: f32 only") };
        let (Some((ya, yz)), Some((ra, rz))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("bias-residual-norm: contiguous inputs only")
        };
        let (y, r) = (&mut y[ya..yz], &r[ra..rz]);
        let h = self.bias.len();
        if y.len() != r.len() || y.len() % h != 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("bias-residual-norm: shapes {:?} and {:?}, width {h}", l1.shape(), l2.shape());
        }
        y.par_chunks_mut(h * 16)
            .zip(r.par_chunks(h * 16))
            .for_each(|(y, r)| bias_residual_norm_rows(y, r, &self.bias, &self.weight, &self.beta, self.eps));
        Ok(())
    }
}

impl Bert {
    /// The model; `bf16_products`: the fused CPU f32 path multiplies on
    /// bf16 copies of the weights (`rir_models::bf16`; the caller checks
    /// the CPU has it).
    pub fn load(vb: VarBuilder, cfg: &Config, bf16_products: bool) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let e = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let part = |n: &str| -> Result<(Tensor, Tensor)> {
                    let s = a.pp("self").pp(n);
                    Ok((s.get((h, h), "weight")?, s.get(h, "bias")?))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let qkv = Linear::new(Tensor::cat(&[&q.0, &k.0, &v.0], 0)?, Some(Tensor::cat(&[&q.1, &k.1, &v.1], 0)?));
                let mut layer = Layer {
                    qkv,
                    attn_out: linear(&a.pp("output.dense"), h, h)?,
                    attn_norm: layer_norm(a.pp("output.LayerNorm"), h, eps)?,
                    inter: linear(&l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                    out: linear(&l.pp("output.dense"), cfg.intermediate_size, h)?,
                    out_norm: layer_norm(l.pp("output.LayerNorm"), h, eps)?,
                    fused: None,
                };
                if vb.dtype() == DType::F32 && vb.device().is_cpu() {
                    layer.fused = Some(FusedLayer::new(&layer, cfg.hidden_act, cfg.num_attention_heads, h / cfg.num_attention_heads, bf16_products)?);
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position: candle_nn::embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: candle_nn::embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            emb_norm: layer_norm(e.pp("LayerNorm"), h, eps)?,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// Token states `[batch, len, hidden]` for `ids`, `types` and `mask` (`[batch, len]`, u32).
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, types, mask, true)
    }

    /// [`Self::forward`]; `fused = false` runs every layer on candle's own
    /// ops (the path for GPUs and half precision), which tests compare against.
    fn forward_with(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, fused: bool) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let pos = Tensor::arange(0u32, l as u32, ids.device())?;
        let x = self.word.forward(ids)?.broadcast_add(&self.position.forward(&pos)?)?;
        let mut x = self.emb_norm.forward(&(x + self.token_type.forward(types)?)?)?;
        let dtype = x.dtype();
        let mask = mask.to_dtype(dtype)?;
        // Padded keys get the most negative value (HF uses finfo.min): softmax gives them 0.
        let bias = ((mask.ones_like()? - &mask)? * f32::MIN as f64)?.reshape((b, 1, 1, l))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let hd = self.heads * self.head_dim;
        for layer in &self.layers {
            if let (Some(f), true) = (&layer.fused, fused) {
                let ctx = f.qkv.forward(&x)?.apply_op2_no_bwd(&mask, &f.attention)?;
                // Each product's output is fresh and read once: the ops
                // after it write into it instead of a new buffer.
                let y = f.attn_out.forward(&ctx)?;
                y.inplace_op2(&x, &f.attn_norm)?;
                x = y;
                let inter = match &f.gelu {
                    Some(gelu) => {
                        let t = f.inter.forward(&x)?;
                        t.inplace_op1(gelu)?;
                        t
                    }
                    None => activation(&layer.inter.forward(&x)?, self.act)?,
                };
                let y = f.out.forward(&inter)?;
                y.inplace_op2(&x, &f.out_norm)?;
                x = y;
                continue;
            }
            let qkv = layer.qkv.forward(&x)?; // [b, l, 3h]
            let split = |i: usize| -> Result<Tensor> {
                qkv.narrow(D::Minus1, i * hd, hd)?.reshape((b, l, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            // Scale q (L×d) rather than the scores (L×L).
            let scores = (q * scale)?.matmul(&k.t()?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&bias)?)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, hd))?;
            x = layer.attn_norm.forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            let inter = activation(&layer.inter.forward(&x)?, self.act)?;
            x = layer.out_norm.forward(&(layer.out.forward(&inter)? + &x)?)?;
        }
        Ok(x)
    }
}

fn activation(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    match act {
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluApproximate => x.gelu(),
        HiddenAct::Relu => x.relu(),
    }
}

pub use rir_models::kernels::erf_f32;
use rir_models::kernels::exp_in_place;

/// Softmax of one row of scores over the keys whose mask is 1 (1 = token,
/// 0 = padding); padded keys get 0.
#[inline(always)]
fn masked_softmax_row(o: &mut [f32], mask: &[f32]) {
    let mut max = f32::NEG_INFINITY;
    for (&v, &k) in o.iter().zip(mask) {
        max = max.max(if k > 0.5 { v } else { f32::NEG_INFINITY });
    }
    // Padded keys at -inf, which exp takes to 0.
    for (o, &k) in o.iter_mut().zip(mask) {
        *o = if k > 0.5 { *o - max } else { f32::NEG_INFINITY };
    }
    // `f32::exp`'s bits, several lanes at a time.
    exp_in_place(o);
    let inv = 1.0 / sum8(o);
    for x in o.iter_mut() {
        *x *= inv;
    }
}

rir_models::multiversion! {
    /// One (sequence, head)'s Q, K and V (l×d each, side by side in `qkv`)
    /// from the sequence's fused projection `rows` (l × w): the bias added
    /// as candle's broadcast add would, then Q scaled as `q * scale`.
    fn head_qkv(rows: &[f32], bias: &[f32], dims: [usize; 4], scale: f32, qkv: &mut [f32]) {
        let [w, hd, h, d] = dims;
        let l = rows.len() / w;
        for (part, buf) in qkv.chunks_exact_mut(l * d).enumerate() {
            let at = part * hd + h * d;
            let bias = &bias[at..at + d];
            for (i, row) in buf.chunks_exact_mut(d).enumerate() {
                let src = &rows[i * w + at..i * w + at + d];
                for ((o, &y), &b) in row.iter_mut().zip(src).zip(bias) {
                    *o = y + b;
                }
            }
        }
        for v in qkv[..l * d].iter_mut() {
            *v *= scale;
        }
    }
}

rir_models::multiversion! {
    /// [`masked_softmax_row`] over each row of `p` (rows of the mask's length).
    fn softmax_rows(p: &mut [f32], m: &[f32]) {
        for row in p.chunks_exact_mut(m.len()) {
            masked_softmax_row(row, m);
        }
    }
}

/// Multi-head self-attention from the fused projection's product `[b, l,
/// 3·heads·d]` (Q, K, V side by side, before their `bias`) and the mask
/// `[b, l]` to the context `[b, l, heads·d]`. One task per sequence and head,
/// each on one thread with its own scratch: the head's Q (biased, scaled), K
/// and V (biased) copied out, the l×l scores, their masked softmax in place,
/// then ·V written into the head's columns of the output.
struct Attention {
    heads: usize,
    head_dim: usize,
    bias: Vec<f32>,
}

/// The output buffer, written by tasks at disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only its own (sequence, head) block of columns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `i` places in (a method, so closures capture the Sync
    /// wrapper rather than its raw field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qkv, mask) = f32_pair(self.name(), s1, l1, s2, l2)?;
        let (b, l, w) = l1.shape().dims3()?;
        let (heads, d) = (self.heads, self.head_dim);
        let hd = heads * d;
        if w != 3 * hd || mask.len() != b * l || self.bias.len() != w {
            candle_core::bail!("fused-attention: shapes {:?} and {:?} for {heads} heads of {d}", l1.shape(), l2.shape());
        }
        // As candle's `q * scale` rounds it: the f64 scale cast to f32.
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let mut out = vec![0f32; b * l * hd];
        let dst = OutPtr(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each_init(
            || (vec![0f32; 3 * l * d], vec![0f32; l * l]),
            |(qkv_h, p), t| {
                let (s, h) = (t / heads, t % heads);
                let rows = &qkv[s * l * w..(s + 1) * l * w];
                head_qkv(rows, &self.bias, [w, hd, h, d], scale, qkv_h);
                let (q, kv) = qkv_h.split_at_mut(l * d);
                let (k, v) = kv.split_at_mut(l * d);
                // SAFETY: q, k and v are l×d and p l×l, row-major; Kᵀ's (c, j)
                // is k[j·d + c]; the output block (s, ·, h·d..h·d + d) belongs
                // to this task alone.
                unsafe {
                    gemm::gemm(
                        l, l, d,
                        p.as_mut_ptr(), 1, l as isize, false,
                        q.as_ptr(), 1, d as isize,
                        k.as_ptr(), d as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
                let m = &mask[s * l..(s + 1) * l];
                softmax_rows(p, m);
                unsafe {
                    gemm::gemm(
                        l, d, l,
                        dst.at(s * l * hd + h * d), 1, hd as isize, false,
                        p.as_ptr(), 1, l as isize,
                        v.as_ptr(), 1, d as isize,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, l, hd))))
    }
}

/// `gelu(y + bias)` (exact erf GELU) over rows of `y`: the intermediate
/// projection's bias added in the activation's pass.
struct BiasGelu(Vec<f32>);

rir_models::multiversion! {
    /// `gelu(y + bias)` of each row of `y` (rows of the bias's length), in place.
    fn bias_gelu_rows(y: &mut [f32], bias: &[f32]) {
        for y in y.chunks_mut(bias.len()) {
            for (y, &b) in y.iter_mut().zip(bias) {
                let v = *y + b;
                *y = 0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

impl candle_core::InplaceOp1 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("bias-gelu: f32 only") };
        let Some((a, z)) = layout.contiguous_offsets() else { candle_core::bail!("bias-gelu: contiguous input only") };
        let n = self.0.len();
        if layout.shape().dims().last() != Some(&n) {
            candle_core::bail!("bias-gelu: shape {:?}, bias of {n}", layout.shape());
        }
        data[a..z].par_chunks_mut(n * 8).for_each(|y| bias_gelu_rows(y, &self.0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_erf_matches_libm() {
        let mut worst = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 / 10_000.0;
            let want = libm_erf(x as f64);
            worst = worst.max((super::erf_f32(x) as f64 - want).abs());
        }
        // A few f32 ulps near ±1; libm's erff is within one.
        assert!(worst < 1e-6, "max |error| {worst}");
    }

    // erf via its series / continued fraction in f64, as the reference.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.5 series converges well for |x| < 3; beyond, erfc's continued fraction.
        if x.abs() < 3.0 {
            let mut sum = x;
            let mut term = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            x.signum() * (1.0 - erfc)
        }
    }
    /// A small random BERT: the CPU f32 path (fused attention, bias epilogues)
    /// against candle's plain ops, with padding in the batch.
    #[test]
    fn fused_path_matches_candle_ops() {
        use candle_core::{Device, Tensor};
        let cfg: super::Config = serde_json::from_str(
            r#"{"vocab_size": 50, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
                "max_position_embeddings": 32, "type_vocab_size": 2, "initializer_range": 0.02,
                "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": null, "model_type": "bert"}"#,
        )
        .unwrap();
        let dev = Device::Cpu;
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rand = |shape: &[usize], base: f32, scale: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    base + scale * (((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
                })
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut ts = std::collections::HashMap::new();
        ts.insert("embeddings.word_embeddings.weight".to_string(), rand(&[cfg.vocab_size, h], 0.0, 1.0));
        ts.insert("embeddings.position_embeddings.weight".to_string(), rand(&[cfg.max_position_embeddings, h], 0.0, 0.5));
        ts.insert("embeddings.token_type_embeddings.weight".to_string(), rand(&[2, h], 0.0, 0.5));
        ts.insert("embeddings.LayerNorm.weight".to_string(), rand(&[h], 1.0, 0.1));
        ts.insert("embeddings.LayerNorm.bias".to_string(), rand(&[h], 0.0, 0.1));
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            for n in ["query", "key", "value"] {
                ts.insert(format!("{p}.attention.self.{n}.weight"), rand(&[h, h], 0.0, 0.3));
                ts.insert(format!("{p}.attention.self.{n}.bias"), rand(&[h], 0.0, 0.1));
            }
            for (n, o, i_) in [("attention.output.dense", h, h), ("intermediate.dense", i, h), ("output.dense", h, i)] {
                ts.insert(format!("{p}.{n}.weight"), rand(&[o, i_], 0.0, 0.2));
                ts.insert(format!("{p}.{n}.bias"), rand(&[o], 0.0, 0.1));
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                ts.insert(format!("{p}.{n}.weight"), rand(&[h], 1.0, 0.1));
                ts.insert(format!("{p}.{n}.bias"), rand(&[h], 0.0, 0.1));
            }
        }
        let vb = candle_nn::VarBuilder::from_tensors(ts, candle_core::DType::F32, &dev);
        let model = super::Bert::load(vb, &cfg, false).unwrap();
        assert!(model.layers.iter().all(|l| l.fused.is_some()));
        // Three rows of 13 positions: whole, 9 tokens, 1 token.
        let (b, l) = (3usize, 13usize);
        let lens = [13usize, 9, 1];
        let ids: Vec<u32> = (0..b * l).map(|k| if k % l < lens[k / l] { 1 + (k * 7 % 49) as u32 } else { 0 }).collect();
        let mask: Vec<u32> = (0..b * l).map(|k| u32::from(k % l < lens[k / l])).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
        let types = ids.zeros_like().unwrap();
        let mask = Tensor::from_vec(mask, (b, l), &dev).unwrap();
        let fused: Vec<f32> = model.forward_with(&ids, &types, &mask, true).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let plain: Vec<f32> = model.forward_with(&ids, &types, &mask, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(fused.len(), b * l * h);
        let worst = fused.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // candle's softmax and GELU sum in another order: a few f32 ulps of LayerNorm-scaled values.
        assert!(worst < 1e-4, "max |fused - plain| = {worst}");
        // And not zero: the two calls took different paths (a flag ignored would pass the bound).
        assert!(worst > 0.0, "the fused and plain paths gave the same bits: was the fused path run?");
        assert!(fused.iter().all(|v| v.is_finite()));
    }
}
