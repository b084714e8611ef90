//! A bf16 GEMM for x86 CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel
//! Cooper Lake / Sapphire Rapids): `y = x·Wᵀ` with `W` packed once to bf16
//! and `x` rounded to bf16 (round to nearest even) per product, the products
//! summed in f32 by `vdpbf16ps`. That instruction does 32 multiply-adds per
//! 512-bit register where an f32 FMA does 16: `rir bench generate` measures
//! what it gives a prompt (docs/BENCHMARKS.md). bf16 keeps f32's range and 8
//! bits of mantissa — the precision of most LLM serving, and finer than the
//! 8-bit activations of llama.cpp's quantized kernels.
//!
//! Why its own kernel: the `gemm` crate (candle's CPU matmul) has no bf16
//! dot-product path; its f16/bf16 GEMMs widen to f32 first.
//!
//! Layout (BLIS-style): `W` (n, k) is stored in panels of [`NR`] output
//! columns, each panel k/2 steps of NR `u32`s — the pair of bf16 weights of
//! inputs 2t and 2t+1 for each column (the pair `vdpbf16ps` multiplies in a
//! lane). `x` is packed per product into panels of [`MR`] rows laid out the
//! same way, so the micro-kernel reads both operands front to back. Each
//! output element is summed in one order whatever the other rows are, so a
//! row's numbers do not depend on its batch.

/// Output columns per weight panel: two 16-lane f32 registers.
pub const NR: usize = 32;
/// Rows per micro-kernel call: 12 × 2 accumulators, 2 weight registers and
/// a broadcast fit AVX-512's 32 registers.
pub const MR: usize = 12;
/// Rows per task (a task's packed rows stay in L2 while it walks the panels).
const MC: usize = 96;

/// Whether the kernel runs here: the CPU has AVX-512 F and BF16, and
/// `RIR_BF16` is not `off`.
pub fn available() -> bool {
    unavailable().is_none()
}

/// Why the kernel does not run here, if it does not. `RIR_BF16=off`
/// computes on such a CPU what a CPU without AVX512-BF16 computes (the
/// callers' f32 paths), as `RIR_QUANT_KERNEL=avx2` does for the integer
/// kernels.
pub fn unavailable() -> Option<&'static str> {
    static WHY: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *WHY.get_or_init(|| {
        if std::env::var("RIR_BF16").is_ok_and(|v| v.eq_ignore_ascii_case("off")) {
            return Some("RIR_BF16=off");
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            return None;
        }
        Some("this CPU has no AVX512-BF16")
    })
}

/// Why the bf16 GEMM would not beat the f32 GEMM on this CPU, if it would
/// not: [`unavailable`]'s reasons, or a CPU other than AMD's. AMD's
/// AVX512-BF16 (Zen 4 and later) issues `vdpbf16ps` at an f32 FMA's rate,
/// twice its multiply-adds (`rir bench gemm`: 1.5–1.8× f32 on a Zen 4).
/// Intel's Xeons issue it once every two cycles where they issue two f32
/// FMAs a cycle — AMX is their bf16 engine, and a VM may not expose it —
/// so bf16 does half f32's multiply-adds: 0.45–0.74× the f32 GEMM on a
/// Xeon of family 6 model 207 (docs/BENCHMARKS.md, "Machine I"). Other vendors are unmeasured. Decided by the CPU's
/// vendor, not by timing, so a machine always picks the same numbers.
pub fn not_faster() -> Option<&'static str> {
    static WHY: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *WHY.get_or_init(|| {
        if let Some(why) = unavailable() {
            return Some(why);
        }
        if cpu_vendor() == "AuthenticAMD" {
            return None;
        }
        Some("this CPU's AVX512-BF16 is not measured faster than its f32 FMA (it is on AMD's Zen 4 only; Intel's Xeons do half f32's multiply-adds with it)")
    })
}

/// The CPUID vendor string ("AuthenticAMD", "GenuineIntel"; empty off x86-64).
pub fn cpu_vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

/// The instruction-bound rates on the calling thread, GFLOP/s: (an f32
/// FMA `vfmadd231ps`, the bf16 dot product `vdpbf16ps`), each on 512-bit
/// registers, 12 independent accumulators, no memory traffic, `iters`
/// rounds of 12, best of 3; `None` where the CPU lacks the instruction. What each
/// GEMM could reach on one core at most: `rir bench gemm` prints them.
pub fn instruction_peaks(iters: usize) -> (Option<f64>, Option<f64>) {
    #[cfg(target_arch = "x86_64")]
    {
        // Best of 3: a shared VM's other tenants only ever slow a run down.
        let rate = |flops_per: f64, f: &dyn Fn() -> f32| {
            let best = (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    // (`f` ends in a memory clobber each round, so it ran here.)
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            12.0 * iters as f64 * flops_per / best / 1e9
        };
        let fma = is_x86_feature_detected!("avx512f").then(|| {
            // SAFETY: AVX-512 F was detected.
            rate(32.0, &|| unsafe { fma_loop(iters) })
        });
        let dot = available().then(|| {
            // SAFETY: `available()`: AVX-512 F and BF16.
            rate(64.0, &|| unsafe { dot_loop(iters) })
        });
        (fma, dot)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        (None, None)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    // Distinct, opaque starting values: twelve chains the compiler cannot
    // merge into one or fold away.
    let mut acc: [__m512; 12] = std::array::from_fn(|j| _mm512_set1_ps(std::hint::black_box(j as f32 * 0.01)));
    let (a, b) = (_mm512_set1_ps(std::hint::black_box(0.9999)), _mm512_set1_ps(std::hint::black_box(0.0001)));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
        // As if it touched memory: the loop is not a pure computation the
        // compiler may move out from between the two clock readings.
        std::arch::asm!("", options(nostack));
    }
    acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m512; 12] = std::array::from_fn(|j| _mm512_set1_ps(std::hint::black_box(j as f32 * 0.01)));
    // bf16 pairs (1, 1) and (2^-7, 2^-7).
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80)));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3c00_3c00)));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
        std::arch::asm!("", options(nostack));
    }
    acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
}

/// `x` rounded to bf16, to nearest, ties to even (NaN stays NaN).
/// Branch-free, so the loops over a row vectorise.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet = (b >> 16) | 0x40;
    (if b & 0x7fff_ffff > 0x7f80_0000 { quiet } else { rounded }) as u16
}

crate::multiversion! {
    /// `row` rounded to bf16 into `out` (as long).
    fn round_row(row: &[f32], out: &mut [u16]) {
        for (o, x) in out.iter_mut().zip(row) {
            *o = to_bf16(*x);
        }
    }
}

/// The f32 a bf16 stands for (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A weight matrix (n outputs × k inputs) packed to bf16 for [`Bf16Matrix::matmul`].
pub struct Bf16Matrix {
    pub n: usize,
    pub k: usize,
    /// Pairs of inputs (k rounded up to even, halved).
    kh: usize,
    data: Vec<u32>,
}

#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

impl Bf16Matrix {
    /// Packs `w`, (n, k) row-major (a linear map stored (out, in)).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "bf16 pack: {n} x {k} weights expected");
        let kh = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kh * NR];
        let at = |r: usize, c: usize| if r < n && c < k { w[r * k + c] } else { 0.0 };
        for p in 0..panels {
            let panel = &mut data[p * kh * NR..(p + 1) * kh * NR];
            for t in 0..kh {
                for j in 0..NR {
                    let r = p * NR + j;
                    panel[t * NR + j] = pair(at(r, 2 * t), at(r, 2 * t + 1));
                }
            }
        }
        Self { n, k, kh, data }
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The packed weights back as f32 (n, k): each the bf16 it was rounded to.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            let (p, j) = (r / NR, r % NR);
            for c in 0..self.k {
                let v = self.data[p * self.kh * NR + (c / 2) * NR + j];
                w[r * self.k + c] = from_bf16(if c % 2 == 0 { v as u16 } else { (v >> 16) as u16 });
            }
        }
        w
    }

    /// `x·Wᵀ` for `x` (m, k) row-major: (m, n) row-major. Panics where the
    /// CPU lacks the kernel ([`available`]); callers check first.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(available(), "bf16 GEMM: {}", unavailable().unwrap_or_default());
        assert_eq!(x.len(), m * self.k, "bf16 matmul: {m} x {} input expected", self.k);
        let mut y = vec![0f32; m * self.n];
        if m == 0 || self.n == 0 {
            return y;
        }
        let panels = self.n.div_ceil(NR);
        let chunks = m.div_ceil(MC);
        // Enough tasks to keep every thread busy when few rows come (a
        // prefix's remainder, a short prompt): split the panels too.
        let threads = rayon::current_num_threads().max(1);
        let splits = (2 * threads).div_ceil(chunks).clamp(1, panels);
        let per = panels.div_ceil(splits);
        let out = SendPtr(y.as_mut_ptr());
        let n = self.n;
        use rayon::prelude::*;
        (0..chunks * splits).into_par_iter().for_each(|task| {
            let (c, s) = (task / splits, task % splits);
            let rows = c * MC..((c + 1) * MC).min(m);
            let packed = self.pack_rows(x, rows.clone());
            let out = &out;
            for p in s * per..((s + 1) * per).min(panels) {
                let cols = (n - p * NR).min(NR);
                for (i, r0) in rows.clone().step_by(MR).enumerate() {
                    let r = (rows.end - r0).min(MR);
                    let a = &packed[i * self.kh * MR..(i + 1) * self.kh * MR];
                    let b = &self.data[p * self.kh * NR..(p + 1) * self.kh * NR];
                    // SAFETY: `available()` was checked; the task writes rows
                    // r0..r0+r of columns p·NR..p·NR+cols only, which no other
                    // task writes, inside `y` (m × n).
                    unsafe { kernel(a, b, self.kh, r, out.0.add(r0 * n + p * NR), n, cols) }
                }
            }
        });
        y
    }

    /// Rows `rows` of `x` as bf16 pairs in panels of MR rows: panel i, step
    /// t, row j at `(i·kh + t)·MR + j`; rows past the end are zero.
    fn pack_rows(&self, x: &[f32], rows: std::ops::Range<usize>) -> Vec<u32> {
        let (k, kh) = (self.k, self.kh);
        let n_panels = rows.len().div_ceil(MR);
        let mut a = vec![0u32; n_panels * kh * MR];
        // The row in bf16 first (vector lanes), then its pairs into the panel.
        let mut half = vec![0u16; 2 * kh];
        for (ri, r) in rows.enumerate() {
            let (i, j) = (ri / MR, ri % MR);
            round_row(&x[r * k..(r + 1) * k], &mut half[..k]);
            let dst = &mut a[i * kh * MR..(i + 1) * kh * MR];
            for (t, p) in half.chunks_exact(2).enumerate() {
                dst[t * MR + j] = p[0] as u32 | (p[1] as u32) << 16;
            }
        }
        a
    }
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint parts of the buffer (see `matmul`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// `rows` (≤ MR) rows of an A panel times one B panel into `c` (row stride
/// `ldc`), `cols` (≤ NR) columns written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(a: &[u32], b: &[u32], kh: usize, rows: usize, c: *mut f32, ldc: usize, cols: usize) {
    // A const row count per call, so the accumulators stay in registers.
    macro_rules! go {
        ($($r:literal)*) => {
            match rows {
                $($r => micro::<$r>(a, b, kh, c, ldc, cols),)*
                _ => unreachable!("rows {rows} > MR"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &[u32], _: &[u32], _: usize, _: usize, _: *mut f32, _: usize, _: usize) {
    unreachable!("bf16 GEMM needs x86-64")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn micro<const R: usize>(a: &[u32], b: &[u32], kh: usize, c: *mut f32, ldc: usize, cols: usize) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= kh * MR && b.len() >= kh * NR);
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    for t in 0..kh {
        // SAFETY: t < kh and the panels hold kh·MR and kh·NR values.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(t * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(t * NR + 16) as *const _));
        for j in 0..R {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*pa.add(t * MR + j) as i32));
            lo[j] = _mm512_dpbf16_ps(lo[j], x, b0);
            hi[j] = _mm512_dpbf16_ps(hi[j], x, b1);
        }
    }
    let m0: __mmask16 = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
    let m1: __mmask16 = if cols >= 32 { 0xffff } else if cols > 16 { (1u32 << (cols - 16)) as u16 - 1 } else { 0 };
    for j in 0..R {
        let row = c.add(j * ldc);
        _mm512_mask_storeu_ps(row, m0, lo[j]);
        if m1 != 0 {
            _mm512_mask_storeu_ps(row.add(16), m1, hi[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    /// Every shape edge (rows not a multiple of MR or MC, columns not of NR,
    /// odd k) against the same products summed in f64 from the bf16 values,
    /// and rows independent of their batch.
    #[test]
    fn matmul_matches_bf16_products_summed_exactly_and_rows_do_not_depend_on_the_batch() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut seed = 7u64;
        for &(m, n, k) in &[(1, 1, 1), (5, 33, 7), (13, 64, 576), (97, 70, 65), (200, 192, 1536), (12, 32, 2)] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let p = Bf16Matrix::pack(&w, n, k);
            let wb = p.unpack();
            for (a, b) in w.iter().zip(&wb) {
                assert_eq!(*b, from_bf16(to_bf16(*a)));
            }
            let y = p.matmul(&x, m);
            for r in 0..m {
                for c in 0..n {
                    let exact: f64 = (0..k).map(|i| from_bf16(to_bf16(x[r * k + i])) as f64 * wb[c * k + i] as f64).sum();
                    let mag: f64 = (0..k).map(|i| (x[r * k + i] * wb[c * k + i]).abs() as f64).sum();
                    let got = y[r * n + c] as f64;
                    assert!((got - exact).abs() <= 1e-5 * mag + 1e-6, "({m},{n},{k}) [{r},{c}]: {got} vs {exact}");
                }
            }
            // The last row alone gives the same bits as in the batch.
            let last = p.matmul(&x[(m - 1) * k..], 1);
            assert_eq!(last, y[(m - 1) * n..].to_vec(), "({m},{n},{k})");
        }
    }
}
