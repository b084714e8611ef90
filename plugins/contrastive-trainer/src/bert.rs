//! A differentiable BERT forward (HF's BertModel maths): candle-nn's fused
//! LayerNorm and softmax have no backward pass, so LayerNorm, GELU and the
//! attention softmax are this crate's own fused ops with one (`fused.rs`),
//! the rest plain tensor ops. All
//! weights are `Var`s in a `VarMap` under HF's names, so the trained model
//! saves as a `model.safetensors` the candle encoder loads.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::Config;

struct Lin {
    w: Tensor,
    b: Tensor,
}

impl Lin {
    fn new(vb: &VarBuilder, i: usize, o: usize) -> Result<Self> {
        Ok(Lin { w: vb.get((o, i), "weight")?, b: vb.get(o, "bias")? })
    }
    fn detached(&self) -> Self {
        Lin { w: self.w.detach(), b: self.b.detach() }
    }
    /// x @ wᵀ + b over the last dimension, as one 2-D product.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&1);
        let y = x.reshape((x.elem_count() / k, k))?.matmul(&self.w.t()?)?.broadcast_add(&self.b)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.w.dim(0)?;
        y.reshape(out)
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    fn new(vb: &VarBuilder, h: usize, eps: f64) -> Result<Self> {
        Ok(Norm { w: vb.get(h, "weight")?, b: vb.get(h, "bias")?, eps })
    }
    fn detached(&self) -> Self {
        Norm { w: self.w.detach(), b: self.b.detach(), eps: self.eps }
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::layer_norm(x, &self.w, &self.b, self.eps)
    }
}

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    n1: Norm,
    inter: Lin,
    out: Lin,
    n2: Norm,
}

pub struct TrainBert {
    word: Tensor,
    pos: Tensor,
    tok: Tensor,
    norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    pub hidden: usize,
    /// Weight names carry this prefix in the checkpoint ("" or "bert.").
    pub prefix: String,
}

impl TrainBert {
    /// Creates the variables in `map` (under the checkpoint's names).
    pub fn new(map: &VarMap, cfg: &Config, prefix: &str, dtype: DType, dev: &Device) -> Result<Self> {
        let root = VarBuilder::from_varmap(map, dtype, dev);
        let vb = if prefix.is_empty() { root } else { root.pp(prefix.trim_end_matches('.')) };
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                q: Lin::new(&a.pp("self").pp("query"), h, h)?,
                k: Lin::new(&a.pp("self").pp("key"), h, h)?,
                v: Lin::new(&a.pp("self").pp("value"), h, h)?,
                o: Lin::new(&a.pp("output").pp("dense"), h, h)?,
                n1: Norm::new(&a.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
                inter: Lin::new(&l.pp("intermediate").pp("dense"), h, cfg.intermediate_size)?,
                out: Lin::new(&l.pp("output").pp("dense"), cfg.intermediate_size, h)?,
                n2: Norm::new(&l.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            });
        }
        Ok(TrainBert {
            word: e.pp("word_embeddings").get((cfg.vocab_size, h), "weight")?,
            pos: e.pp("position_embeddings").get((cfg.max_position_embeddings, h), "weight")?,
            tok: e.pp("token_type_embeddings").get((cfg.type_vocab_size, h), "weight")?,
            norm: Norm::new(&e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            prefix: prefix.to_owned(),
        })
    }

    /// The same weights outside autograd: a forward keeps no graph (and no
    /// activations). The tensors share storage with the variables, so an
    /// optimiser step changes them too: use it before training starts.
    pub fn detached(&self) -> TrainBert {
        TrainBert {
            word: self.word.detach(),
            pos: self.pos.detach(),
            tok: self.tok.detach(),
            norm: self.norm.detached(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer { q: l.q.detached(), k: l.k.detached(), v: l.v.detached(), o: l.o.detached(), n1: l.n1.detached(), inter: l.inter.detached(), out: l.out.detached(), n2: l.n2.detached() })
                .collect(),
            heads: self.heads,
            hidden: self.hidden,
            prefix: self.prefix.clone(),
        }
    }

    /// Last hidden states (b, L, h) for `ids` (b, L) with `mask` (b, L) of 1/0.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.hidden;
        let d = h / self.heads;
        let pos = Tensor::arange(0u32, l as u32, ids.device())?;
        let x = self.word.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, h))?;
        let x = x.broadcast_add(&self.pos.index_select(&pos, 0)?)?;
        let x = x.broadcast_add(&self.tok.narrow(0, 0, 1)?)?;
        let mut x = self.norm.forward(&x)?;
        // Additive mask: 0 for tokens, a large negative for padding.
        let add = ((mask.to_dtype(x.dtype())? - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?;
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers {
            let heads = |t: Tensor| t.reshape((b, l, self.heads, d))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (heads(layer.q.forward(&x)?)?, heads(layer.k.forward(&x)?)?, heads(layer.v.forward(&x)?)?);
            let p = crate::fused::masked_softmax(&q.matmul(&k.t()?.contiguous()?)?, &add, scale)?;
            let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
            x = layer.n1.forward(&(layer.o.forward(&ctx)? + &x)?)?;
            let f = layer.out.forward(&crate::fused::gelu(&layer.inter.forward(&x)?)?)?;
            x = layer.n2.forward(&(f + &x)?)?;
        }
        Ok(x)
    }
}

/// Pooled sentence embeddings (b, h): `mean` over real tokens or `cls`.
pub fn pool(hidden: &Tensor, mask: &Tensor, mean: bool) -> Result<Tensor> {
    if mean {
        let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
        hidden.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)
    } else {
        hidden.narrow(1, 0, 1)?.squeeze(1)
    }
}

pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
}
