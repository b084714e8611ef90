//! Causal attention on the CPU straight from the KV cache buffers.
//!
//! Every (sequence, head, query) row is summed over its own keys only, in
//! one fixed order ([`attend_row_any`] is the definition), so a sequence
//! gets the same numbers alone or in any batch, from a prefix cache or
//! whole. [`attend_cpu`] computes exactly those numbers faster: the query
//! rows of one KV head and a few consecutive positions form a tile that
//! reads each key and value once (keys transposed into blocks of 16, so 16
//! scores fill one vector register) instead of once per query row, and the
//! kernels are compiled for AVX-512 and AVX2 and picked at run time. Only
//! additions and products are reordered across *different* scores, never
//! within one, so the results are bit for bit the row kernel's (tested).

use candle_core::{Result, Tensor};

use rir_models::kernels::{isa, Isa};

use crate::model::Shape;

/// A dot product in eight lanes (so it vectorizes), summed in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// One query row's attention over `keys` / `values` (rows of `d`), into
/// `o`: softmax of the scaled dot products, then the weighted sum of the
/// values, each summed over the keys in order. The definition every faster
/// path reproduces bit for bit.
#[inline(always)]
fn attend_row_any(q: &[f32], keys: &[f32], values: &[f32], scale: f32, o: &mut [f32]) {
    let d = q.len();
    let mut scores: Vec<f32> = keys.chunks_exact(d).map(|k| dot(k, q) * scale).collect();
    let sum = softmax_numerators(&mut scores);
    o.iter_mut().for_each(|v| *v = 0.0);
    for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
        let w = p / sum;
        for (ov, vv) in o.iter_mut().zip(v) {
            *ov += w * vv;
        }
    }
}

/// [`attend_row_any`] for a head size known at compile time: the same
/// operations in the same order (so the same numbers), with the output row
/// accumulated in a local array the compiler keeps in registers.
#[inline(always)]
fn attend_row<const D: usize>(q: &[f32], keys: &[f32], values: &[f32], scale: f32, o: &mut [f32]) {
    let q: &[f32; D] = q.try_into().expect("a row of the head size");
    let mut scores: Vec<f32> = keys.chunks_exact(D).map(|k| dot(k, q) * scale).collect();
    let sum = softmax_numerators(&mut scores);
    let mut acc = [0f32; D];
    for (p, v) in scores.iter().zip(values.chunks_exact(D)) {
        let w = p / sum;
        let v: &[f32; D] = v.try_into().expect("row");
        for i in 0..D {
            acc[i] += w * v[i];
        }
    }
    o.copy_from_slice(&acc);
}

/// [`attend_row`] for the usual head sizes, else [`attend_row_any`].
#[inline(always)]
fn attend_row_sized(q: &[f32], keys: &[f32], values: &[f32], scale: f32, o: &mut [f32]) {
    match q.len() {
        64 => attend_row::<64>(q, keys, values, scale, o),
        128 => attend_row::<128>(q, keys, values, scale, o),
        _ => attend_row_any(q, keys, values, scale, o),
    }
}

/// exp(x - max) in place; their sum, added in order.
#[inline]
pub(crate) fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    scores.iter_mut().for_each(|x| *x -= max);
    // `f32::exp`'s bits, several lanes at a time.
    rir_models::kernels::exp_in_place(scores);
    let mut sum = 0f32;
    for x in scores.iter() {
        sum += *x;
    }
    sum
}

/// Consecutive query positions per tile (with all of a KV head's query heads).
const TILE: usize = 8;
/// Keys per transposed block: 16 scores, one AVX-512 register.
const KB: usize = 16;

/// `f32`'s sum of nothing (what `Iterator::sum` starts from), the row
/// kernel's `tail` for head sizes that are a multiple of 8.
fn empty_sum() -> f32 {
    std::iter::empty::<f32>().sum()
}

/// Sixteen f32 lanes, every operation lane by lane: IEEE products and sums
/// of single lanes, so the three implementations give the same bits. The
/// vector ones are explicit: left to itself, LLVM vectorizes these kernels
/// across the wrong loop (gathers and scatters, slower than the row kernel).
trait Lanes: Copy {
    /// SAFETY (all methods): the CPU has the implementation's instruction
    /// set; slices hold at least 16 elements (checked).
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(s: &[f32]) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn store(self, s: &mut [f32]);
}

/// Plain arrays (the baseline instruction set).
#[derive(Clone, Copy)]
struct V16([f32; KB]);

impl Lanes for V16 {
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        V16([x; KB])
    }
    #[inline(always)]
    unsafe fn load(s: &[f32]) -> Self {
        V16(s[..KB].try_into().expect("16 lanes"))
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        let mut r = self.0;
        for (x, y) in r.iter_mut().zip(o.0) {
            *x += y;
        }
        V16(r)
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        let mut r = self.0;
        for (x, y) in r.iter_mut().zip(o.0) {
            *x *= y;
        }
        V16(r)
    }
    #[inline(always)]
    unsafe fn store(self, s: &mut [f32]) {
        s[..KB].copy_from_slice(&self.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, KB};

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub(super) struct Z(__m512);

    impl Lanes for Z {
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Z(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(s: &[f32]) -> Self {
            unsafe { Z(_mm512_loadu_ps(s[..KB].as_ptr())) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Z(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Z(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn store(self, s: &mut [f32]) {
            unsafe { _mm512_storeu_ps(s[..KB].as_mut_ptr(), self.0) }
        }
    }

    /// Two AVX registers.
    #[derive(Clone, Copy)]
    pub(super) struct Y(__m256, __m256);

    impl Lanes for Y {
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Y(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(s: &[f32]) -> Self {
            let s = &s[..KB];
            unsafe { Y(_mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(s[8..].as_ptr())) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Y(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Y(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1)) }
        }
        #[inline(always)]
        unsafe fn store(self, s: &mut [f32]) {
            let s = &mut s[..KB];
            unsafe {
                _mm256_storeu_ps(s.as_mut_ptr(), self.0);
                _mm256_storeu_ps(s[8..].as_mut_ptr(), self.1);
            }
        }
    }
}

/// The scaled scores of one query against one block of `KB` transposed keys
/// (`kt[i * KB + j]` = key j's element i): per key, [`dot`]'s eight lanes
/// (element i goes to lane i % 8, lanes summed over the chunks in order),
/// then the lanes folded from `z` in order, the empty tail added, times
/// `scale` — [`dot`]'s operations, 16 keys at a time.
#[inline(always)]
unsafe fn block_scores<const D: usize, L: Lanes>(q: &[f32; D], kt: &[f32], z: f32, scale: f32, out: &mut [f32]) {
    let kt: &[f32] = &kt[..D * KB];
    unsafe {
        let mut lanes = [L::splat(0.0); 8];
        for c in 0..D / 8 {
            for (i, lane) in lanes.iter_mut().enumerate() {
                let row = L::load(&kt[(8 * c + i) * KB..]);
                *lane = lane.add(row.mul(L::splat(q[8 * c + i])));
            }
        }
        let mut s = L::splat(z);
        for lane in lanes {
            s = s.add(lane);
        }
        s.add(L::splat(z)).mul(L::splat(scale)).store(out);
    }
}

/// The weighted sums of `U` query rows over the value rows `values`:
/// row u takes the first `n[u]` values with weights `w[u]`, each output
/// element summed over the keys in order ([`attend_row_any`]'s second
/// loop); the value rows all of them use are read once for all.
#[inline(always)]
unsafe fn weighted_values<const D: usize, const U: usize, L: Lanes>(w: [&[f32]; U], n: [usize; U], values: &[f32], out: [&mut [f32]; U]) {
    unsafe {
        // D / KB chunks of a row (at most 8: head size 128).
        let mut acc = [[L::splat(0.0); 8]; U];
        let common = n.iter().copied().min().unwrap_or(0);
        let add = |acc: &mut [L; 8], wj: f32, v: &[f32]| {
            let wj = L::splat(wj);
            for (c, a) in acc.iter_mut().take(D / KB).enumerate() {
                *a = a.add(wj.mul(L::load(&v[c * KB..])));
            }
        };
        for (j, v) in values.chunks_exact(D).take(common).enumerate() {
            for u in 0..U {
                add(&mut acc[u], w[u][j], v);
            }
        }
        for u in 0..U {
            for (j, v) in values.chunks_exact(D).enumerate().take(n[u]).skip(common) {
                add(&mut acc[u], w[u][j], v);
            }
        }
        for (o, a) in out.into_iter().zip(&acc) {
            for (c, a) in a.iter().take(D / KB).enumerate() {
                a.store(&mut o[c * KB..]);
            }
        }
    }
}

/// Keys `first..end` of one (sequence, KV head), rows of `d`, transposed in
/// blocks of `KB` (`kt[(b * d + i) * KB + j]` = key b·KB + j's element i;
/// the last block's missing keys left as they are: `kt` comes zeroed). Plain
/// moves, on the baseline instruction set: AVX-512 would turn them into
/// scatters.
fn transpose_keys(keys: &[f32], d: usize, kt: &mut [f32]) {
    for (j, k) in keys.chunks_exact(d).enumerate() {
        let block = &mut kt[(j / KB) * d * KB..][..d * KB];
        for (i, &x) in k.iter().enumerate() {
            block[i * KB + j % KB] = x;
        }
    }
}

/// One tile's inputs: the query rows `qs` (all at one sequence and KV
/// head; row r at position `pos[r]`, its keys `first..=pos[r]`, so every
/// `pos[r] >= first`), `kt` those keys transposed ([`transpose_keys`]),
/// `values` the cache's value rows from `first` on.
struct Tile<'a> {
    qs: Vec<&'a [f32]>,
    pos: Vec<usize>,
    first: usize,
    kt: &'a [f32],
    values: &'a [f32],
    scale: f32,
}

/// One tile's attention, into `outs` (one row per query row).
#[inline(always)]
unsafe fn tile<const D: usize, L: Lanes>(t: &Tile<'_>, outs: &mut [&mut [f32]], w: &mut Vec<f32>) {
    let Tile { qs, pos, first, kt, values, scale } = t;
    let (first, scale) = (*first, *scale);
    let n: Vec<usize> = pos.iter().map(|&p| p + 1 - first).collect();
    let stride = n.iter().copied().max().unwrap_or(0).div_ceil(KB) * KB;
    w.clear();
    w.resize(qs.len() * stride, 0.0);
    let z = empty_sum();
    for (r, q) in qs.iter().enumerate() {
        let q: &[f32; D] = (*q).try_into().expect("a query row");
        let w = &mut w[r * stride..][..stride];
        for b in 0..n[r].div_ceil(KB) {
            unsafe { block_scores::<D, L>(q, &kt[b * D * KB..], z, scale, &mut w[b * KB..]) };
        }
        let w = &mut w[..n[r]];
        let sum = softmax_numerators(w);
        w.iter_mut().for_each(|p| *p /= sum);
    }
    // Four rows at a time share the value loads (their sums in registers).
    let ws: Vec<&[f32]> = w.chunks(stride).collect();
    let mut r = 0;
    while r < qs.len() {
        let m = (qs.len() - r).min(4);
        let (o, _) = outs[r..].split_at_mut(m);
        match o {
            [a, b, c, d] => unsafe { weighted_values::<D, 4, L>([ws[r], ws[r + 1], ws[r + 2], ws[r + 3]], [n[r], n[r + 1], n[r + 2], n[r + 3]], values, [a, b, c, d]) },
            [a, b, c] => unsafe { weighted_values::<D, 3, L>([ws[r], ws[r + 1], ws[r + 2]], [n[r], n[r + 1], n[r + 2]], values, [a, b, c]) },
            [a, b] => unsafe { weighted_values::<D, 2, L>([ws[r], ws[r + 1]], [n[r], n[r + 1]], values, [a, b]) },
            [a] => unsafe { weighted_values::<D, 1, L>([ws[r]], [n[r]], values, [a]) },
            _ => unreachable!(),
        }
        r += m;
    }
}

/// [`tile`] compiled for one instruction set with its lanes: the same
/// source, so the same operations in the same order.
macro_rules! isa_tile {
    ($name:ident, $lanes:ty, $($feat:literal),*) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature($(enable = $feat),*)]
        unsafe fn $name<const D: usize>(t: &Tile<'_>, outs: &mut [&mut [f32]], w: &mut Vec<f32>) {
            unsafe { tile::<D, $lanes>(t, outs, w) }
        }
    };
}
isa_tile!(tile_avx512, x86::Z, "avx512f", "avx2", "fma");
isa_tile!(tile_avx2, x86::Y, "avx2", "fma");

/// [`tile`] on `isa`'s lanes (a parameter, so the test can run each).
fn run_tile<const D: usize>(isa: Isa, t: &Tile<'_>, outs: &mut [&mut [f32]], w: &mut Vec<f32>) {
    match isa {
        // SAFETY: the caller passes an `isa` this CPU has (`isa()` or below it).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { tile_avx512::<D>(t, outs, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { tile_avx2::<D>(t, outs, w) },
        // SAFETY: plain arrays need no instruction set.
        _ => unsafe { tile::<D, V16>(t, outs, w) },
    }
}

rir_models::multiversion! {
    /// [`attend_row_sized`] on the best instruction set (decode steps, pad queries).
    fn run_row(q: &[f32], keys: &[f32], values: &[f32], scale: f32, o: &mut [f32]) {
        attend_row_sized(q, keys, values, scale, o)
    }
}

/// The output buffer, written by several workers at disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each tile writes only its own (sequence, position, head) rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The `d` elements from `i` on (a method, so closures capture the Sync
    /// wrapper rather than its raw field).
    ///
    /// SAFETY: the caller owns those elements for the borrow's life.
    unsafe fn row<'a>(self, i: usize, d: usize) -> &'a mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i), d) }
    }
}

/// Causal attention on the CPU straight from the cache buffers: each (row,
/// head, query) sums over its own keys only (pads skipped) in a fixed order,
/// so a sequence gets the same numbers alone or in any batch, and small
/// decode steps skip GEMM dispatch. `q` is (b, heads, l, d) contiguous; the
/// buffers are (b, kv heads, cap, d) with columns `..start + l` filled.
pub(crate) fn attend_cpu(q: &Tensor, ck: &Tensor, cv: &Tensor, start: usize, pads: &[usize], s: &Shape) -> Result<Tensor> {
    use candle_core::Storage;
    let (b, nh, l, d) = q.dims4()?;
    let cap = ck.dim(2)?;
    let qv = q.flatten_all()?.to_vec1::<f32>()?;
    let (ks, kl) = ck.storage_and_layout();
    let (vs, vl) = cv.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else { candle_core::bail!("attend_cpu on a non-CPU tensor") };
    let kall = &kc.as_slice::<f32>()?[kl.start_offset()..];
    let vall = &vc.as_slice::<f32>()?[vl.start_offset()..];
    let mut out = vec![0f32; b * l * nh * d];
    attend_slices(isa(), &qv, kall, vall, &mut out, [b, nh, l, d], s.n_kv_head, cap, start, pads);
    drop((ks, vs));
    Tensor::from_vec(out, (b, l, nh * d), q.device())
}

/// Positions per call from which the keys are transposed and tiled; fewer
/// (decode steps) go row by row on the cache as it is.
const MIN_TILED: usize = 4;

/// [`attend_cpu`] on slices: `qv` (b, nh, l, d), `kall` / `vall` (b, kv,
/// cap, d), into `out` (b, l, nh, d); tiles on `isa`'s lanes (one the CPU has).
#[allow(clippy::too_many_arguments)]
fn attend_slices(isa: Isa, qv: &[f32], kall: &[f32], vall: &[f32], out: &mut [f32], [b, nh, l, d]: [usize; 4], n_kv: usize, cap: usize, start: usize, pads: &[usize]) {
    use rayon::prelude::*;
    let rep = nh / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let parallel = rayon::current_num_threads() > 1;
    let tiled = l >= MIN_TILED && matches!(d, 64 | 128);
    // Each (sequence, KV head)'s keys from its first real one, transposed
    // once for all its tiles.
    let end = start + l;
    let spans: Vec<usize> = (0..b * n_kv).map(|i| if tiled { (end - pads[i / n_kv].min(end)).div_ceil(KB) * KB * d } else { 0 }).collect();
    let offsets: Vec<usize> = spans.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
    let mut kt = vec![0f32; spans.iter().sum()];
    if tiled {
        let mut parts = Vec::with_capacity(b * n_kv);
        let mut rest = kt.as_mut_slice();
        for &n in &spans {
            let (part, tail) = rest.split_at_mut(n);
            parts.push(part);
            rest = tail;
        }
        let transpose = |(i, part): (usize, &mut &mut [f32])| {
            let first = pads[i / n_kv].min(end);
            let base = i * cap * d;
            transpose_keys(&kall[base + first * d..base + end * d], d, part);
        };
        if parallel {
            parts.par_iter_mut().enumerate().for_each(transpose);
        } else {
            parts.iter_mut().enumerate().for_each(transpose);
        }
    }
    let tiles = l.div_ceil(TILE);
    let dst = OutPtr(out.as_mut_ptr());
    // One task per (sequence, KV head, tile of positions).
    let task = |idx: usize, w: &mut Vec<f32>| {
        let (bi, rest) = (idx / (n_kv * tiles), idx % (n_kv * tiles));
        let (kvh, ti) = (rest / tiles, rest % tiles);
        let base = (bi * n_kv + kvh) * cap * d;
        let (t0, t1) = (ti * TILE, ((ti + 1) * TILE).min(l));
        let out_at = |h: usize, t: usize| ((bi * l + t) * nh + h) * d;
        let q_at = |h: usize, t: usize| &qv[((bi * nh + h) * l + t) * d..][..d];
        let first = pads[bi];
        if !tiled || start + t0 < first {
            // Decode steps, pad queries (their own key only), an unusual
            // head size: row by row.
            for h in kvh * rep..(kvh + 1) * rep {
                for t in t0..t1 {
                    let c = start + t;
                    let f = first.min(c);
                    let (keys, values) = (&kall[base + f * d..base + (c + 1) * d], &vall[base + f * d..base + (c + 1) * d]);
                    // SAFETY: this task owns row (bi, t, h).
                    run_row(q_at(h, t), keys, values, scale, unsafe { dst.row(out_at(h, t), d) });
                }
            }
            return;
        }
        let mut qs = Vec::with_capacity(rep * (t1 - t0));
        let mut pos = Vec::with_capacity(rep * (t1 - t0));
        let mut outs: Vec<&mut [f32]> = Vec::with_capacity(rep * (t1 - t0));
        for h in kvh * rep..(kvh + 1) * rep {
            for t in t0..t1 {
                qs.push(q_at(h, t));
                pos.push(start + t);
                // SAFETY: this task owns row (bi, t, h).
                outs.push(unsafe { dst.row(out_at(h, t), d) });
            }
        }
        let i = bi * n_kv + kvh;
        let kt = &kt[offsets[i]..offsets[i] + spans[i]];
        let values = &vall[base + first * d..base + end * d];
        let t = Tile { qs, pos, first, kt, values, scale };
        match d {
            64 => run_tile::<64>(isa, &t, &mut outs, w),
            _ => run_tile::<128>(isa, &t, &mut outs, w),
        }
    };
    let n_tasks = b * n_kv * tiles;
    if parallel && n_tasks > 1 {
        (0..n_tasks).into_par_iter().for_each_init(Vec::new, |w, i| task(i, w));
    } else {
        let mut w = Vec::new();
        (0..n_tasks).for_each(|i| task(i, &mut w));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        }
    }

    /// The definition, one row at a time on the baseline instruction set.
    #[allow(clippy::too_many_arguments)]
    fn reference(qv: &[f32], kall: &[f32], vall: &[f32], [b, nh, l, d]: [usize; 4], n_kv: usize, cap: usize, start: usize, pads: &[usize]) -> Vec<f32> {
        let rep = nh / n_kv;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; b * l * nh * d];
        for bi in 0..b {
            for h in 0..nh {
                for t in 0..l {
                    let c = start + t;
                    let f = pads[bi].min(c);
                    let base = (bi * n_kv + h / rep) * cap * d;
                    let q = &qv[((bi * nh + h) * l + t) * d..][..d];
                    let o = &mut out[((bi * l + t) * nh + h) * d..][..d];
                    attend_row_any(q, &kall[base + f * d..base + (c + 1) * d], &vall[base + f * d..base + (c + 1) * d], scale, o);
                }
            }
        }
        out
    }

    /// Tiles (on this CPU's best kernels, and on each instruction set it
    /// has) give the row-by-row definition's numbers bit for bit: prefill
    /// from 0 and after cached positions, pads reaching into the new
    /// positions, decode steps, tile and block edges, head sizes 64, 128
    /// and an odd one.
    #[test]
    fn tiles_match_the_row_definition_bit_for_bit() {
        let mut rnd = rng(0x2545_f491_4f6c_dd1d);
        let cases: &[(usize, usize, usize, usize, usize, &[usize])] = &[
            // (d, heads, kv heads, start, l, pads)
            (64, 9, 3, 0, 37, &[0, 5, 36]),
            (64, 9, 3, 3, 21, &[0, 7]),
            (64, 9, 3, 40, 1, &[0, 12, 41]),
            (128, 4, 2, 0, 17, &[2]),
            (128, 4, 4, 16, 16, &[0, 0]),
            (64, 2, 1, 0, 200, &[0, 150]),
            (40, 4, 2, 5, 11, &[0, 9]),
            // Qwen2.5-0.5B's grouping: 14 query heads over 2 KV heads.
            (64, 14, 2, 9, 30, &[3, 0]),
        ];
        for &(d, nh, n_kv, start, l, pads) in cases {
            let b = pads.len();
            let cap = start + l + 3;
            let qv: Vec<f32> = (0..b * nh * l * d).map(|_| rnd()).collect();
            let kall: Vec<f32> = (0..b * n_kv * cap * d).map(|_| rnd()).collect();
            let vall: Vec<f32> = (0..b * n_kv * cap * d).map(|_| rnd()).collect();
            let want = reference(&qv, &kall, &vall, [b, nh, l, d], n_kv, cap, start, pads);
            assert!(want.iter().any(|v| *v != 0.0));
            // Every instruction set this CPU has, through the whole path.
            let best = isa();
            for isa in [Isa::Base, Isa::Avx2, Isa::Avx512] {
                if (isa == Isa::Avx512 && best != Isa::Avx512) || (isa == Isa::Avx2 && best == Isa::Base) {
                    continue;
                }
                let mut got = vec![f32::NAN; want.len()];
                attend_slices(isa, &qv, &kall, &vall, &mut got, [b, nh, l, d], n_kv, cap, start, pads);
                assert!(
                    got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{isa:?}: d {d}, heads {nh}/{n_kv}, start {start}, l {l}, pads {pads:?}"
                );
            }
        }
    }
}
