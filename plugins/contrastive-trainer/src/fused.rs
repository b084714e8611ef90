//! Fused CPU kernels with their own backward passes for the training BERT:
//! LayerNorm, the exact (erf) GELU and the scaled, masked softmax of
//! attention.
//!
//! Why: built from candle's elementwise ops, each of these is five to eight
//! ops, every one a fresh tensor that autograd keeps until the backward pass
//! (the attention softmax alone kept five copies of the (b, heads, L, L)
//! scores) and a pass over memory of its own; profiles of a training step put
//! a third of its time in those ops and in the page faults of their fresh
//! buffers. Each op here is one parallel pass forward and one backward, and
//! keeps only its input and output for the backward pass.
//!
//! f32 and f64 (the gradient-check tests run in f64); inputs are made
//! contiguous first.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Rows handed to one rayon task.
const ROWS: usize = 16;

fn slice<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, z)) => Ok(&s[a..z]),
        None => candle_core::bail!("{what}: contiguous input only"),
    }
}

/// `f(a, b, ..)` over f32 or f64 storages of the same type.
macro_rules! by_dtype {
    ($what:expr, ($($s:ident),+), |$($x:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($x),)+) => { $body }
            ($(CpuStorage::F64($x),)+) => { $body }
            _ => candle_core::bail!("{}: f32 or f64 inputs of one type only", $what),
        }
    };
}

fn wrap<T: 'static>(v: Vec<T>) -> CpuStorage {
    let any: Box<dyn std::any::Any> = Box::new(v);
    match any.downcast::<Vec<f32>>() {
        Ok(v) => CpuStorage::F32(*v),
        Err(any) => CpuStorage::F64(*any.downcast::<Vec<f64>>().expect("f32 or f64")),
    }
}

/// Mean and 1/std of one row.
#[inline(always)]
fn moments<T: Float>(x: &[T], eps: T) -> (T, T) {
    let n = T::from(x.len()).unwrap_or_else(T::one);
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = x.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / n;
    (mean, T::one() / (var + eps).sqrt())
}

// ---------------------------------------------------------------- LayerNorm

/// y = (x − mean) / sqrt(var + eps) · w + b over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(w, b, LayerNorm(eps))
}

struct LayerNorm(f64);

fn ln_fwd<T: Float + Send + Sync>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(h * ROWS).zip(x.par_chunks(h * ROWS)).for_each(|(o, x)| ln_rows(o, x, w, b, eps));
    out
}

rir_models::multiversion! {
    /// [`ln_fwd`] of the rows of `x` (rows of `w.len()`) into `o`.
    fn ln_rows[T: Float](o: &mut [T], x: &[T], w: &[T], b: &[T], eps: T) {
        let h = w.len();
        for (o, x) in o.chunks_mut(h).zip(x.chunks(h)) {
            let (mean, inv) = moments(x, eps);
            for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("fused-layer-norm", (s1, s2, s3), |x, w, b| {
            let (x, w, b) = (slice(x, l1, "layer-norm")?, slice(w, l2, "layer-norm")?, slice(b, l3, "layer-norm")?);
            wrap(ln_fwd(x, w, b, self.0))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX(self.0))?;
        let h = w.dim(0)?;
        let dwb = x.apply_op2_no_bwd(&g, &LayerNormGradWB(self.0))?;
        Ok((Some(dx), Some(dwb.narrow(0, 0, 1)?.reshape(h)?), Some(dwb.narrow(0, 1, 1)?.reshape(h)?)))
    }
}

/// dx = inv · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)), per row.
struct LayerNormGradX(f64);

fn ln_dx<T: Float + Send + Sync>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let n = T::from(h).unwrap_or_else(T::one);
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(h * ROWS).zip(x.par_chunks(h * ROWS)).zip(g.par_chunks(h * ROWS)).for_each(|((o, x), g)| ln_dx_rows(o, x, w, g, n, eps));
    out
}

rir_models::multiversion! {
    /// [`ln_dx`] of the rows of `x` and `g` (rows of `w.len()`) into `o`.
    fn ln_dx_rows[T: Float](o: &mut [T], x: &[T], w: &[T], g: &[T], n: T, eps: T) {
        let h = w.len();
        for ((o, x), g) in o.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
            let (mean, inv) = moments(x, eps);
            let (mut s1, mut s2) = (T::zero(), T::zero());
            for ((&v, &w), &g) in x.iter().zip(w).zip(g) {
                let gw = g * w;
                s1 = s1 + gw;
                s2 = s2 + gw * (v - mean) * inv;
            }
            let (m1, m2) = (s1 / n, s2 / n);
            for (((o, &v), &w), &g) in o.iter_mut().zip(x).zip(w).zip(g) {
                let xh = (v - mean) * inv;
                *o = inv * (g * w - m1 - xh * m2);
            }
        }
    }
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-x"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("fused-layer-norm-grad-x", (s1, s2, s3), |x, w, g| {
            wrap(ln_dx(slice(x, l1, "layer-norm grad")?, slice(w, l2, "layer-norm grad")?, slice(g, l3, "layer-norm grad")?, self.0))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// (2, h): Σ_rows g·x̂ (the weight's gradient) and Σ_rows g (the bias's).
struct LayerNormGradWB(f64);

fn ln_dwb<T: Float + Send + Sync>(x: &[T], g: &[T], h: usize, eps: f64) -> Vec<T> {
    let eps = T::from(eps).unwrap_or_else(T::zero);
    let partial = |(x, g): (&[T], &[T])| {
        let mut acc = vec![T::zero(); 2 * h];
        for (x, g) in x.chunks(h).zip(g.chunks(h)) {
            let (mean, inv) = moments(x, eps);
            for (j, (&v, &g)) in x.iter().zip(g).enumerate() {
                acc[j] = acc[j] + g * (v - mean) * inv;
                acc[h + j] = acc[h + j] + g;
            }
        }
        acc
    };
    // Fixed chunks summed in order: the same result for any thread count.
    let parts: Vec<Vec<T>> = x.par_chunks(h * ROWS * 4).zip(g.par_chunks(h * ROWS * 4)).map(partial).collect();
    let mut out = vec![T::zero(); 2 * h];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    out
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-wb"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = *l1.shape().dims().last().unwrap_or(&1);
        let out = by_dtype!("fused-layer-norm-grad-wb", (s1, s2), |x, g| {
            wrap(ln_dwb(slice(x, l1, "layer-norm grad")?, slice(g, l2, "layer-norm grad")?, h, self.0))
        });
        Ok((out, Shape::from((2, h))))
    }
}

// --------------------------------------------------------------------- GELU

/// The exact GELU, x · Φ(x) with Φ the standard normal CDF.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

trait Erf: Float {
    fn erf(self) -> Self;
}
impl Erf for f32 {
    #[inline(always)]
    fn erf(self) -> f32 {
        rir_models::kernels::erf_f32(self)
    }
}
impl Erf for f64 {
    #[inline(always)]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
}

#[inline(always)]
fn cdf<T: Erf>(x: T) -> T {
    let half = T::from(0.5).unwrap_or_else(T::one);
    half * (T::one() + (x * T::from(std::f64::consts::FRAC_1_SQRT_2).unwrap_or_else(T::one)).erf())
}

/// `f(o, x)` over chunks of `x` in parallel.
fn map1<T: Erf + Send + Sync>(x: &[T], f: impl Fn(&mut [T], &[T]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| f(o, x));
    out
}

rir_models::multiversion! {
    /// x · Φ(x) of each element of `x`, into `o`.
    fn gelu_rows[T: Erf](o: &mut [T], x: &[T]) {
        o.iter_mut().zip(x).for_each(|(o, &v)| *o = v * cdf(v));
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => wrap(map1(slice(x, l, "gelu")?, gelu_rows)),
            CpuStorage::F64(x) => wrap(map1(slice(x, l, "gelu")?, gelu_rows)),
            _ => candle_core::bail!("fused-gelu: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// g · (Φ(x) + x · φ(x)).
struct GeluGrad;

fn gelu_dx<T: Erf + Send + Sync>(x: &[T], g: &[T]) -> Vec<T> {
    let c = T::from(1.0 / (2.0 * std::f64::consts::PI).sqrt()).unwrap_or_else(T::one);
    let half = T::from(0.5).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(4096).zip(x.par_chunks(4096)).zip(g.par_chunks(4096)).for_each(|((o, x), g)| gelu_dx_rows(o, x, g, c, half));
    out
}

rir_models::multiversion! {
    /// [`gelu_dx`] of each element, into `o`.
    fn gelu_dx_rows[T: Erf](o: &mut [T], x: &[T], g: &[T], c: T, half: T) {
        for ((o, &v), &g) in o.iter_mut().zip(x).zip(g) {
            *o = g * (cdf(v) + v * c * (-(v * v) * half).exp());
        }
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("fused-gelu-grad", (s1, s2), |x, g| wrap(gelu_dx(slice(x, l1, "gelu grad")?, slice(g, l2, "gelu grad")?)));
        Ok((out, l1.shape().clone()))
    }
}

// ------------------------------------------------------ attention softmax

/// softmax(s · scale + mask) over the last dimension, for attention scores
/// `s` (b, heads, L, L) and an additive key mask (b, 1, 1, L) (0 for tokens,
/// a large negative for padding). Only `s`'s gradient flows.
pub fn masked_softmax(s: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    s.contiguous()?.apply_op2(&mask.contiguous()?, MaskedSoftmax(scale))
}

struct MaskedSoftmax(f64);

fn softmax_fwd<T: Float + Send + Sync>(s: &[T], mask: &[T], dims: &[usize], scale: f64) -> Vec<T> {
    let (heads, l) = (dims[1], dims[3]);
    let scale = T::from(scale).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); s.len()];
    // One task per (batch row, head): its L rows share one mask row.
    out.par_chunks_mut(l * dims[2]).zip(s.par_chunks(l * dims[2])).enumerate().for_each(|(bh, (o, s))| {
        softmax_rows(o, s, &mask[(bh / heads) * l..(bh / heads + 1) * l], scale);
    });
    out
}

rir_models::multiversion! {
    /// [`softmax_fwd`] of each row of `s` (rows of the mask's length), into `o`.
    fn softmax_rows[T: Float](o: &mut [T], s: &[T], m: &[T], scale: T) {
        let l = m.len();
        for (o, s) in o.chunks_mut(l).zip(s.chunks(l)) {
            let mut max = T::neg_infinity();
            for ((o, &v), &m) in o.iter_mut().zip(s).zip(m) {
                *o = v * scale + m;
                max = max.max(*o);
            }
            let mut z = T::zero();
            for o in o.iter_mut() {
                *o = (*o - max).exp();
                z = z + *o;
            }
            let inv = T::one() / z;
            o.iter_mut().for_each(|o| *o = *o * inv);
        }
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims().to_vec();
        let (md, bad) = (l2.shape().dims(), dims.len() != 4);
        if bad || md != [dims[0], 1, 1, dims[3]] {
            candle_core::bail!("fused-masked-softmax: scores (b, heads, L, L) and mask (b, 1, 1, L), got {:?} and {md:?}", dims)
        }
        let out = by_dtype!("fused-masked-softmax", (s1, s2), |s, m| {
            wrap(softmax_fwd(slice(s, l1, "softmax")?, slice(m, l2, "softmax")?, &dims, self.0))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, _s: &Tensor, _mask: &Tensor, p: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(p.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad(self.0))?), None))
    }
}

/// ds = scale · p · (g − Σ g·p), per row.
struct SoftmaxGrad(f64);

fn softmax_ds<T: Float + Send + Sync>(p: &[T], g: &[T], l: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); p.len()];
    out.par_chunks_mut(l * ROWS).zip(p.par_chunks(l * ROWS)).zip(g.par_chunks(l * ROWS)).for_each(|((o, p), g)| softmax_ds_rows(o, p, g, l, scale));
    out
}

rir_models::multiversion! {
    /// [`softmax_ds`] of each row (of `l`), into `o`.
    fn softmax_ds_rows[T: Float](o: &mut [T], p: &[T], g: &[T], l: usize, scale: T) {
        for ((o, p), g) in o.chunks_mut(l).zip(p.chunks(l)).zip(g.chunks(l)) {
            let dot = p.iter().zip(g).fold(T::zero(), |a, (&p, &g)| a + p * g);
            for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                *o = scale * p * (g - dot);
            }
        }
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let l = *l1.shape().dims().last().unwrap_or(&1);
        let out = by_dtype!("fused-masked-softmax-grad", (s1, s2), |p, g| wrap(softmax_ds(slice(p, l1, "softmax grad")?, slice(g, l2, "softmax grad")?, l, self.0)));
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    fn rnd(shape: &[usize], seed: u64) -> Tensor {
        let mut s = seed;
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d: f64 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < tol, "max |difference| {d}");
    }

    /// Each fused op and its gradients equal the same maths built from
    /// candle's plain ops (f64, so the comparison is tight).
    #[test]
    fn fused_ops_equal_plain_ops_forward_and_backward() {
        // LayerNorm.
        let (x, w, b) = (Var::from_tensor(&rnd(&[3, 5, 8], 1)).unwrap(), Var::from_tensor(&rnd(&[8], 2)).unwrap(), Var::from_tensor(&rnd(&[8], 3)).unwrap());
        let plain = |x: &Tensor| {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_div(&(var + 1e-12).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
        };
        let up = rnd(&[3, 5, 8], 4);
        let (yf, yp) = (super::layer_norm(&x, &w, &b, 1e-12).unwrap(), plain(&x));
        close(&yf, &yp, 1e-12);
        let (gf, gp) = ((yf * &up).unwrap().sum_all().unwrap().backward().unwrap(), (yp * &up).unwrap().sum_all().unwrap().backward().unwrap());
        for v in [&x, &w, &b] {
            close(gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap(), 1e-10);
        }
        // GELU (exact erf).
        let x = Var::from_tensor(&rnd(&[4, 7], 5)).unwrap();
        let up = rnd(&[4, 7], 6);
        // candle's f64 erf is an approximation (within ~3e-7 of libm's).
        let (yf, yp) = (super::gelu(&x).unwrap(), x.gelu_erf().unwrap());
        close(&yf, &yp, 1e-6);
        let (gf, gp) = ((yf * &up).unwrap().sum_all().unwrap().backward().unwrap(), (yp * &up).unwrap().sum_all().unwrap().backward().unwrap());
        close(gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap(), 1e-6);
        // Scaled, masked softmax: the second row has two padded keys.
        let s = Var::from_tensor(&rnd(&[2, 3, 4, 4], 7)).unwrap();
        let mask = Tensor::from_vec(vec![0f64, 0., 0., 0., 0., 0., -1e9, -1e9], (2, 1, 1, 4), &Device::Cpu).unwrap();
        let up = rnd(&[2, 3, 4, 4], 8);
        let yf = super::masked_softmax(&s, &mask, 0.5).unwrap();
        let att = (s.as_tensor() * 0.5).unwrap().broadcast_add(&mask).unwrap();
        let e = att.broadcast_sub(&att.max_keepdim(D::Minus1).unwrap().detach()).unwrap().exp().unwrap();
        let yp = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        close(&yf, &yp, 1e-12);
        let (gf, gp) = ((yf * &up).unwrap().sum_all().unwrap().backward().unwrap(), (yp * &up).unwrap().sum_all().unwrap().backward().unwrap());
        close(gf.get(s.as_tensor()).unwrap(), gp.get(s.as_tensor()).unwrap(), 1e-10);
        // f32 runs the same kernels (erf by the rational approximation).
        let x32 = rnd(&[2, 9], 9).to_dtype(DType::F32).unwrap();
        close(&super::gelu(&x32).unwrap().to_dtype(DType::F64).unwrap(), &x32.gelu_erf().unwrap().to_dtype(DType::F64).unwrap(), 1e-5);
    }
}
