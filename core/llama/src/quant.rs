//! Q4_1 and Q8_0 matrix multiplication for x86 CPUs, computed as ggml does.
//!
//! candle 0.11 only has a scalar Q4_1 dot product on x86 (measured with
//! `rir bench generate`: 18 tokens/s against llama.cpp's 125 on SmolLM2 Q4_1,
//! one thread), and its Q8_0 kernel works one activation row at a time.
//! Activations are quantized to Q8_1 per 32-block (d and s rounded through
//! f16 as ggml stores them) and dotted with the weights in integers:
//!
//! - AVX-512 VNNI: two blocks per `vpdpbusd`, weights unpacked once and used
//!   for up to 8 activation rows, so sequences decoded together share both
//!   the weight reads and the unpacking;
//! - AVX2 (ggml's `ggml_vec_dot_q4_1_q8_1` and `ggml_vec_dot_q8_0_q8_0`):
//!   one block at a time, each weight block loaded (and unpacked) once for
//!   up to 4 activation rows, two weight rows per pass (each activation
//!   block loaded once for both), and Q4_1's minimum term computed for 8
//!   activation rows per vector; per (weight row, activation row) the
//!   operations and their order are the one-row kernel's. Zen 1 and other
//!   CPUs without AVX-512 land here; before this kernel had Q8_0, those
//!   CPUs ran every Q8_0 matrix (DPO-merged models, re-quantized Q5_0) on
//!   candle's row-at-a-time one.
//!
//! For VNNI every format is held as "unsigned codes × d + m": Q4_1 natively
//! (nibbles 0..15, minimum m); Q8_0 with its signed bytes offset by +128 and
//! m = −128·d, whose m-term then uses the exact activation sums (the offset
//! cancels a large term). The AVX2 kernel keeps Q8_0's signed bytes as they
//! are and multiplies |w| by sign(w)·y (`vpmaddubsw` wants one unsigned
//! side; |w| ≤ 128 and |y| ≤ 127 keep its 16-bit pair sums from saturating).
//! Structure-of-arrays: codes back to back, f16 scales and minimums in their
//! own arrays.

use half::f16;

const QK: usize = 32;

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kernel {
    Avx512Vnni,
    Avx2,
}

/// The best kernel this CPU runs, if any (`RIR_QUANT_KERNEL=avx2` forces the
/// AVX2 one, `none` candle's kernels, for comparison).
pub fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let vnni = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        let forced = std::env::var("RIR_QUANT_KERNEL").ok();
        if forced.as_deref() == Some("none") {
            return None;
        }
        match (vnni, avx2) {
            (true, _) if forced.as_deref() != Some("avx2") => Some(Kernel::Avx512Vnni),
            (_, true) => Some(Kernel::Avx2),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Format {
    /// 4-bit codes, two per byte (low nibbles are elements 0..16).
    Q4_1,
    /// 8-bit codes, offset to unsigned, stored in the activation pair layout.
    Q8_0,
}

/// A quantized weight matrix (n rows of k).
pub struct QMatrix {
    format: Format,
    qs: Vec<u8>,
    d: Vec<u16>,
    /// The minimums, f16, row-major (n × k/32).
    m: Vec<u16>,
    pub n: usize,
    pub k: usize,
    kernel: Kernel,
}

/// Quantized activations: Q8_1 values per row, in the order the kernel
/// reads. Several matrices of one input (q, k, v; gate, up) share one.
pub struct Act {
    rows: usize,
    k: usize,
    format: Format,
    kernel: Kernel,
    qs: Vec<i8>,
    d: Vec<f32>,
    /// d·Σq: rounded through f16 (Q4_1, as ggml) or exact (Q8_0).
    s: Vec<f32>,
    /// AVX2 Q4_1 with 8 rows or more: `s` block-major (`st[b * rows + i]`),
    /// so the m-term runs over 8 rows per vector (`msum8`).
    st: Vec<f32>,
    /// AVX-512 only: per row and block pair, the 16-lane scale pattern
    /// [d₀×4, d₁×4, d₀×4, d₁×4] matching vpdpbusd's lanes.
    dpat: Vec<f32>,
}

impl QMatrix {
    /// From the raw GGUF bytes of an (n, k) Q4_1 tensor (20-byte blocks:
    /// f16 d, f16 m, 16 nibble bytes) or Q8_0 tensor (34-byte blocks: f16 d,
    /// 32 signed bytes). None when no kernel applies.
    pub fn from_bytes(format: Format, bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        Self::with_kernel(format, bytes, n, k, kernel()?)
    }

    /// `from_bytes` for a given kernel (the tests run each one the CPU has).
    fn with_kernel(format: Format, bytes: &[u8], n: usize, k: usize, mut kernel: Kernel) -> Option<Self> {
        let size = match format {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        };
        if k % QK != 0 || bytes.len() != n * k / QK * size {
            return None;
        }
        if (k / QK) % 2 != 0 {
            kernel = Kernel::Avx2;
        }
        let blocks = n * k / QK;
        let (mut qs, mut d, mut m) = (Vec::with_capacity(blocks * size), Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        match format {
            Format::Q4_1 => {
                for c in bytes.chunks_exact(20) {
                    d.push(u16::from_le_bytes([c[0], c[1]]));
                    m.push(u16::from_le_bytes([c[2], c[3]]));
                    qs.extend_from_slice(&c[4..20]);
                }
            }
            Format::Q8_0 if kernel == Kernel::Avx2 => {
                for c in bytes.chunks_exact(34) {
                    d.push(u16::from_le_bytes([c[0], c[1]]));
                    qs.extend_from_slice(&c[2..34]);
                }
            }
            Format::Q8_0 => {
                for pair in bytes.chunks_exact(68) {
                    let (a, b) = pair.split_at(34);
                    for c in [a, b] {
                        let dv = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                        d.push(dv.to_bits());
                        m.push(f16::from_f32(-128.0 * dv.to_f32()).to_bits());
                    }
                    // Pair layout, as the activations: [a 0..16, b 0..16, a 16..32, b 16..32].
                    for part in [&a[2..18], &b[2..18], &a[18..34], &b[18..34]] {
                        qs.extend(part.iter().map(|v| v ^ 0x80));
                    }
                }
            }
        }
        Some(Self { format, qs, d, m, n, k, kernel })
    }

    /// The weights as f32, (n, k) row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        self.dequantize_rows(0..self.n, &mut out);
        out
    }

    /// The weights as f32, (k, n) row-major: the transpose of `dequantize`
    /// (the same values), what an f32 GEMM of activations (rows, k) takes.
    /// Weight rows go 16 at a time, so each write fills a cache line.
    pub fn dequantize_transposed(&self) -> Vec<f32> {
        const TILE: usize = 16;
        let (n, k) = (self.n, self.k);
        let mut out = vec![0f32; n * k];
        let mut tile = Vec::with_capacity(TILE * k);
        for j0 in (0..n).step_by(TILE) {
            let j1 = (j0 + TILE).min(n);
            tile.clear();
            self.dequantize_rows(j0..j1, &mut tile);
            for (kk, dst) in out.chunks_exact_mut(n).enumerate() {
                for (r, x) in dst[j0..j1].iter_mut().enumerate() {
                    *x = tile[r * k + kk];
                }
            }
        }
        out
    }

    /// Appends the weights of `rows` as f32, row-major (each row's blocks,
    /// codes and scales are contiguous in every layout).
    fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let blocks = self.k / QK;
        let codes = self.qs.len() / self.n;
        let qs = &self.qs[rows.start * codes..rows.end * codes];
        let ds = &self.d[rows.start * blocks..rows.end * blocks];
        match self.format {
            Format::Q4_1 => {
                let ms = &self.m[rows.start * blocks..rows.end * blocks];
                for (b, q) in qs.chunks_exact(16).enumerate() {
                    let (d, m) = (f16::from_bits(ds[b]).to_f32(), f16::from_bits(ms[b]).to_f32());
                    out.extend(q.iter().map(|q| d * (q & 15) as f32 + m));
                    out.extend(q.iter().map(|q| d * (q >> 4) as f32 + m));
                }
            }
            Format::Q8_0 if self.kernel == Kernel::Avx2 => {
                for (b, q) in qs.chunks_exact(QK).enumerate() {
                    let d = f16::from_bits(ds[b]).to_f32();
                    out.extend(q.iter().map(|v| d * (*v as i8) as f32));
                }
            }
            Format::Q8_0 => {
                // Block pairs (a row has an even number of blocks on this kernel).
                for (p, q) in qs.chunks_exact(64).enumerate() {
                    for (half, parts) in [[0, 32], [16, 48]].iter().enumerate() {
                        let d = f16::from_bits(ds[2 * p + half]).to_f32();
                        for start in parts {
                            out.extend(q[*start..start + 16].iter().map(|v| d * ((v ^ 0x80) as i8) as f32));
                        }
                    }
                }
            }
        }
    }

    /// Quantizes `rows` rows of `x` for this matrix (and any other of the
    /// same k, format and kernel).
    pub fn quantize(&self, x: &[f32], rows: usize) -> Act {
        let kb = self.k / QK;
        let vnni = self.kernel == Kernel::Avx512Vnni;
        let mut a = Act {
            rows,
            k: self.k,
            format: self.format,
            kernel: self.kernel,
            qs: vec![0; rows * self.k],
            d: Vec::with_capacity(rows * kb),
            s: Vec::with_capacity(rows * kb),
            dpat: Vec::with_capacity(if vnni { rows * kb * 8 } else { 0 }),
            st: Vec::new(),
        };
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            // SAFETY: any kernel implies AVX2 + FMA on this CPU.
            let (d, s, q) = unsafe { quantize_q8_1_fast(xb) };
            a.d.push(d);
            // The m-term's activation sums; AVX2's Q8_0 has no m-term.
            a.s.push(match (self.format, self.kernel) {
                (Format::Q4_1, _) => s,
                (Format::Q8_0, Kernel::Avx2) => 0.0,
                (Format::Q8_0, Kernel::Avx512Vnni) => d * q.iter().map(|v| *v as i32).sum::<i32>() as f32,
            });
            let (row, blk) = (b / kb, b % kb);
            let base = row * self.k;
            match self.kernel {
                Kernel::Avx2 => a.qs[base + blk * QK..base + (blk + 1) * QK].copy_from_slice(&q),
                Kernel::Avx512Vnni => {
                    // Pair layout: [b₀ 0..16, b₁ 0..16, b₀ 16..32, b₁ 16..32].
                    let p = base + (blk / 2) * 64 + (blk % 2) * 16;
                    a.qs[p..p + 16].copy_from_slice(&q[..16]);
                    a.qs[p + 32..p + 48].copy_from_slice(&q[16..]);
                }
            }
        }
        if self.kernel == Kernel::Avx2 && self.format == Format::Q4_1 && rows >= 8 {
            a.st = vec![0f32; rows * kb];
            for (i, srow) in a.s.chunks_exact(kb).enumerate() {
                for (b, v) in srow.iter().enumerate() {
                    a.st[b * rows + i] = *v;
                }
            }
        }
        if vnni {
            for d in a.d.chunks_exact(2) {
                for _ in 0..2 {
                    a.dpat.extend([d[0]; 4]);
                    a.dpat.extend([d[1]; 4]);
                }
            }
        }
        a
    }

    /// `x` is (m, k) row-major; returns (m, n) row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_quantized(&self.quantize(x, m))
    }

    /// Whether an `Act` made by `self` serves `other` too.
    pub fn shares_input(&self, other: &QMatrix) -> bool {
        self.k == other.k && self.format == other.format && self.kernel == other.kernel
    }

    /// (m, n) row-major from activations quantized by a matrix that
    /// `shares_input` with this one.
    pub fn matmul_quantized(&self, act: &Act) -> Vec<f32> {
        assert!(act.k == self.k && act.format == self.format && act.kernel == self.kernel, "activations quantized for another matrix");
        let (act, m) = (act, act.rows);
        let mut out_t = vec![0f32; self.n * m];
        // Output rows `first..` of the transposed result, for all activation rows.
        let rows = |first: usize, chunk: &mut [f32]| {
            if self.kernel == Kernel::Avx2 {
                // Two weight rows per pass: each activation block loaded
                // once for both (the activations outgrow L2 at long prompts).
                let last = first + chunk.len() / m - 1;
                let mut pairs = chunk.chunks_exact_mut(2 * m);
                for (r, dst) in pairs.by_ref().enumerate() {
                    let (d0, d1) = dst.split_at_mut(m);
                    // SAFETY: as below.
                    unsafe { self.rows_avx2(first + 2 * r, act, [d0, d1]) }
                }
                let rest = pairs.into_remainder();
                if !rest.is_empty() {
                    // SAFETY: as below.
                    unsafe { self.rows_avx2(last, act, [rest]) }
                }
                return;
            }
            for (r, dst) in chunk.chunks_exact_mut(m).enumerate() {
                // SAFETY: the kernel was detected on this CPU (`kernel()`),
                // and the slices have the lengths the kernels index.
                unsafe { self.row_vnni(first + r, act, dst) }
            }
        };
        // One thread: stay on the caller (a pool hand-off per matmul costs
        // more than the small decode matmuls themselves).
        if rayon::current_num_threads() <= 1 || self.n * m * self.k < 1 << 18 {
            rows(0, &mut out_t);
        } else {
            use rayon::prelude::*;
            const CH: usize = 64;
            out_t.par_chunks_mut(CH * m).enumerate().for_each(|(c, chunk)| rows(c * CH, chunk));
        }
        if m == 1 {
            return out_t;
        }
        // (n, m) -> (m, n) in 32×32 tiles: a plain double loop wrote with a
        // stride of n floats and took ~12% of prefill time (perf, judge prompts).
        let mut out = vec![0f32; m * self.n];
        const T: usize = 32;
        for j0 in (0..self.n).step_by(T) {
            for i0 in (0..m).step_by(T) {
                for j in j0..(j0 + T).min(self.n) {
                    for i in i0..(i0 + T).min(m) {
                        out[i * self.n + j] = out_t[j * m + i];
                    }
                }
            }
        }
        out
    }

    /// AVX2: `dst[i]` = Σ_b m_b · s_b, the minimum times the activation
    /// block sum (0 for Q8_0, which has no minimum), for every activation
    /// row; the dot products are added to it after, as before the kernel
    /// took several rows: the same numbers.
    unsafe fn mterm(&self, m: &[u16], a: &Act, dst: &mut [f32]) {
        if self.format == Format::Q8_0 {
            dst.fill(0.0);
            return;
        }
        let kb = self.k / QK;
        let mut i = 0;
        if !a.st.is_empty() {
            while i + 8 <= dst.len() {
                msum8(m, &a.st, a.rows, i, &mut dst[i..i + 8]);
                i += 8;
            }
        }
        for (i, out) in dst.iter_mut().enumerate().skip(i) {
            *out = msum(m, &a.s[i * kb..(i + 1) * kb]);
        }
    }

    /// AVX2: weight rows `j..j + W` against every activation row
    /// (`dst[w][i]`), up to 4 activation rows per kernel call; per (weight
    /// row, activation row) the operations and their order do not depend
    /// on W or on the grouping, so neither changes a number.
    unsafe fn rows_avx2<const W: usize>(&self, j: usize, a: &Act, mut dst: [&mut [f32]; W]) {
        let kb = self.k / QK;
        let bytes = match self.format {
            Format::Q4_1 => 16,
            Format::Q8_0 => 32,
        };
        let q8 = self.format == Format::Q8_0;
        let w: [(&[u8], &[u16]); W] = std::array::from_fn(|x| {
            let r = j + x;
            (&self.qs[r * kb * bytes..(r + 1) * kb * bytes], &self.d[r * kb..(r + 1) * kb])
        });
        for (x, out) in dst.iter_mut().enumerate() {
            // (AVX2's Q8_0 keeps no minimums.)
            self.mterm(self.m.get((j + x) * kb..(j + x + 1) * kb).unwrap_or(&[]), a, out);
        }
        let n = dst[0].len();
        let mut i = 0;
        while i < n {
            let t = (n - i).min(4);
            let (aq, ad) = (&a.qs[i * self.k..(i + t) * self.k], &a.d[i * kb..(i + t) * kb]);
            let mut parts = dst.iter_mut().map(|d| &mut d[i..i + t]);
            let o: [&mut [f32]; W] = std::array::from_fn(|_| parts.next().unwrap());
            macro_rules! go {
                ($r:literal) => {
                    if q8 {
                        dot_avx2::<W, $r, true>(w, aq, ad, o)
                    } else {
                        dot_avx2::<W, $r, false>(w, aq, ad, o)
                    }
                };
            }
            match t {
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
            i += t;
        }
    }

    /// AVX-512 VNNI: weight row `j` against every activation row: `dst[i]`.
    unsafe fn row_vnni(&self, j: usize, a: &Act, dst: &mut [f32]) {
        let kb = self.k / QK;
        let bytes = match self.format {
            Format::Q4_1 => 16,
            Format::Q8_0 => 32,
        };
        let m = self.m.get(j * kb..(j + 1) * kb).unwrap_or(&[]);
        let (qs, d) = (&self.qs[j * kb * bytes..(j + 1) * kb * bytes], &self.d[j * kb..(j + 1) * kb]);
        match self.kernel {
            Kernel::Avx2 => unreachable!("AVX2 runs rows_avx2"),
            Kernel::Avx512Vnni => {
                let mut i = 0;
                while i < dst.len() {
                    let t = (dst.len() - i).min(8);
                    let rows = i..i + t;
                    let (aq, ap) = (&a.qs[rows.start * self.k..rows.end * self.k], &a.dpat[rows.start * kb * 8..rows.end * kb * 8]);
                    let sr = &a.s[rows.start * kb..rows.end * kb];
                    let o = &mut dst[rows];
                    let q8 = self.format == Format::Q8_0;
                    macro_rules! go {
                        ($r:literal) => {
                            if q8 {
                                dot_vnni::<$r, true>(qs, d, m, aq, ap, sr, self.k, o)
                            } else {
                                dot_vnni::<$r, false>(qs, d, m, aq, ap, sr, self.k, o)
                            }
                        };
                    }
                    match t {
                        8 => go!(8),
                        7 => go!(7),
                        6 => go!(6),
                        5 => go!(5),
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                    i += t;
                }
            }
        }
    }
}

/// Σ_b f16(m_b) · s_b, eight at a time (the AVX2 kernel's m-term).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn msum(m: &[u16], s: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let full = m.len() / 8 * 8;
    for b in (0..full).step_by(8) {
        let mv = _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr().add(b) as *const __m128i));
        acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(s.as_ptr().add(b)), acc);
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    for b in full..m.len() {
        sum += _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(m[b] as i32))) * s[b];
    }
    sum
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn msum(_: &[u16], _: &[f32]) -> f32 {
    unreachable!("no quantized kernel off x86_64")
}

/// `msum` for 8 activation rows at once, row `i0 + l` in lane l (`st`:
/// the sums block-major, `rows` of them per block): each lane goes through
/// `msum`'s operations in its order — 8 partial sums (lane p of its
/// accumulator: blocks p, p + 8, …), folded as its horizontal sum folds
/// them, then the tail blocks one by one — so the numbers are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn msum8(m: &[u16], st: &[f32], rows: usize, i0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    // Macros, not closures: the intrinsics stay inlined in this function.
    macro_rules! f {
        ($b:expr) => {
            _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(m[$b] as i32))))
        };
    }
    macro_rules! s {
        ($b:expr) => {
            _mm256_loadu_ps(st.as_ptr().add($b * rows + i0))
        };
    }
    let full = m.len() / 8 * 8;
    let mut p = [_mm256_setzero_ps(); 8];
    for b in (0..full).step_by(8) {
        for (l, acc) in p.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(f!(b + l), s!(b + l), *acc);
        }
    }
    // msum's fold: h_l = p_l + p_{l+4}, then (h_0 + h_2) + (h_1 + h_3).
    let h: [__m256; 4] = std::array::from_fn(|l| _mm256_add_ps(p[l], p[l + 4]));
    let mut sum = _mm256_add_ps(_mm256_add_ps(h[0], h[2]), _mm256_add_ps(h[1], h[3]));
    for b in full..m.len() {
        sum = _mm256_add_ps(sum, _mm256_mul_ps(f!(b), s!(b)));
    }
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn msum8(_: &[u16], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("no quantized kernel off x86_64")
}

/// `quantize_q8_1` compiled for AVX2 (its rounding becomes one instruction).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_q8_1_fast(x: &[f32]) -> (f32, f32, [i8; QK]) {
    quantize_q8_1(x)
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_q8_1_fast(x: &[f32]) -> (f32, f32, [i8; QK]) {
    quantize_q8_1(x)
}

/// ggml's quantize_row_q8_1: d = amax/127, q = x/d rounded half to even (as
/// its AVX code does), s = d·Σq, with d and s stored as f16.
#[inline(always)]
fn quantize_q8_1(x: &[f32]) -> (f32, f32, [i8; QK]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    (f16::from_f32(d).to_f32(), f16::from_f32(sum as f32 * d).to_f32(), qs)
}

/// R activation rows (`yq`, `yd`: R rows of k codes and k/32 scales)
/// against W weight rows, one block at a time: each weight block loaded
/// (and unpacked) once for all R, each activation block once for all W;
/// `out[w][r] +=` their sum. Per (w, r) the operations are those of ggml's
/// one-row kernels, in the same order, so neither W nor R changes a number.
/// `Q8`: 32 signed code bytes a block (Q8_0), else 16 bytes of nibbles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const W: usize, const R: usize, const Q8: bool>(w: [(&[u8], &[u16]); W], yq: &[i8], yd: &[f32], out: [&mut [f32]; W]) {
    use std::arch::x86_64::*;
    let (kb, k) = (w[0].1.len(), w[0].1.len() * QK);
    let mut acc = [[_mm256_setzero_ps(); R]; W];
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for b in 0..kb {
        let mut dx = [0f32; W];
        // The unsigned side of vpmaddubsw, and (Q8) the signs to move onto y.
        let mut qx = [(low, low); W];
        for x in 0..W {
            let (qs, d) = w[x];
            dx[x] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d[b] as i32)));
            qx[x] = if Q8 {
                let v = _mm256_loadu_si256(qs.as_ptr().add(b * QK) as *const __m256i);
                (_mm256_sign_epi8(v, v), v)
            } else {
                let tmp = _mm_loadu_si128(qs.as_ptr().add(b * 16) as *const __m128i);
                // Low nibbles are elements 0..16, high nibbles 16..32.
                (_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp), low), low)
            };
        }
        for r in 0..R {
            let y = _mm256_loadu_si256(yq.as_ptr().add(r * k + b * QK) as *const __m256i);
            let yb = yd[r * kb + b];
            for x in 0..W {
                let (q, sign) = qx[x];
                let yx = if Q8 { _mm256_sign_epi8(y, sign) } else { y };
                let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q, yx), ones);
                acc[x][r] = _mm256_fmadd_ps(_mm256_set1_ps(dx[x] * yb), _mm256_cvtepi32_ps(s32), acc[x][r]);
            }
        }
    }
    for (acc, out) in acc.iter().zip(out) {
        for r in 0..R {
            let h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps::<1>(acc[r]));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            out[r] += _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        }
    }
}

/// R activation rows against one weight row, two blocks per step; `Q8`
/// reads 64 code bytes per pair as they are, otherwise 32 bytes of nibbles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_vnni<const R: usize, const Q8: bool>(
    qs: &[u8],
    d: &[u16],
    m: &[u16],
    aq: &[i8],
    ap: &[f32],
    s: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let pairs = d.len() / 2;
    let low = _mm256_set1_epi8(0x0F);
    // Lanes 0-3 and 8-11 take block 0's scale, 4-7 and 12-15 block 1's.
    let pat = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    let mut acc = [_mm512_setzero_ps(); R];
    for p in 0..pairs {
        let w = if Q8 {
            _mm512_loadu_si512(qs.as_ptr().add(p * 64) as *const _)
        } else {
            let v = _mm256_loadu_si256(qs.as_ptr().add(p * 32) as *const __m256i);
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        };
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((d[2 * p] as u32 | (d[2 * p + 1] as u32) << 16) as i32));
        let dx = _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(dd));
        for r in 0..R {
            let at = (r * pairs + p) * 16;
            let y = _mm512_loadu_si512(aq.as_ptr().add(r * k + p * 64) as *const _);
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, y);
            let sc = _mm512_mul_ps(dx, _mm512_loadu_ps(ap.as_ptr().add(at)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r]);
        }
    }
    // Σ_b m_b · s_b, sixteen blocks at a time into the same lanes (they
    // are all summed at the end anyway); the last group masked.
    let kb = d.len();
    for b in (0..kb).step_by(16) {
        let mask: u16 = if kb - b >= 16 { 0xFFFF } else { (1u16 << (kb - b)) - 1 };
        let mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m.as_ptr().add(b) as *const i16));
        for r in 0..R {
            acc[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, s.as_ptr().add(r * kb + b)), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2<const W: usize, const R: usize, const Q8: bool>(_: [(&[u8], &[u16]); W], _: &[i8], _: &[f32], _: [&mut [f32]; W]) {
    unreachable!("no quantized kernel off x86_64")
}
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_vnni<const R: usize, const Q8: bool>(_: &[u8], _: &[u16], _: &[u16], _: &[i8], _: &[f32], _: &[f32], _: usize, _: &mut [f32]) {
    unreachable!("no Q4_1 kernel off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    /// Each kernel against a plain f64 evaluation of the same quantized
    /// values (dequantized weights · quantized activations), 1..=11 rows
    /// (the AVX2 kernel's groups of 4 and their remainders; VNNI's of 8).
    fn check(format: Format, bytes: &[u8], n: usize, k: usize, kern: Kernel) {
        let mut rnd = lcg(7);
        let x: Vec<f32> = (0..11 * k).map(|_| rnd() * 4.0).collect();
        let w = QMatrix::with_kernel(format, bytes, n, k, kern).unwrap();
        let deq = w.dequantize();
        for m in 1..=11 {
            let got = w.matmul(&x[..m * k], m);
            for i in 0..m {
                for j in 0..n {
                    let mut want = 0f64;
                    for (b, xb) in x[i * k..(i + 1) * k].chunks_exact(QK).enumerate() {
                        let (d, _, q) = quantize_q8_1(xb);
                        for e in 0..QK {
                            want += deq[j * k + b * QK + e] as f64 * d as f64 * q[e] as f64;
                        }
                    }
                    let g = got[i * n + j] as f64;
                    assert!((g - want).abs() < 2e-3 * (1.0 + want.abs()), "{format:?} {kern:?} m={m} ({i},{j}) {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn kernels_match_scalar_reference() {
        let Some(best) = kernel() else { return };
        // k = 96: an odd number of blocks (VNNI takes pairs, so AVX2 runs those).
        for (n, k) in [(37, 128), (5, 96)] {
            let mut rnd = lcg(1);
            let mut q41 = Vec::new();
            for _ in 0..n * k / QK {
                q41.extend(f16::from_f32(0.01 + rnd().abs() * 0.1).to_bits().to_le_bytes());
                q41.extend(f16::from_f32(rnd() * 0.5).to_bits().to_le_bytes());
                q41.extend((0..16).map(|_| ((rnd() + 0.5) * 255.0) as u8));
            }
            let mut q80 = Vec::new();
            for b in 0..n * k / QK {
                q80.extend(f16::from_f32(0.01 + rnd().abs() * 0.1).to_bits().to_le_bytes());
                // -128 (never written by ggml's quantizer, but a valid byte)
                // once a block: |w| = 128 must not saturate vpmaddubsw.
                q80.extend((0..32).map(|e| if e == b % 32 { 0x80 } else { (rnd() * 255.0) as i8 as u8 }));
            }
            // Each layout dequantizes to the GGUF block's values, in order.
            let want: Vec<f32> = q80
                .chunks_exact(34)
                .flat_map(|c| {
                    let d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    c[2..].iter().map(move |v| d * (*v as i8) as f32)
                })
                .collect();
            let kernels = if best == Kernel::Avx2 { vec![best] } else { vec![Kernel::Avx2, best] };
            for kern in kernels {
                assert_eq!(QMatrix::with_kernel(Format::Q8_0, &q80, n, k, kern).unwrap().dequantize(), want, "{kern:?}");
                // The transposed copy (n = 37: two tiles of 16 and a rest) holds the same values.
                for (format, bytes) in [(Format::Q4_1, &q41), (Format::Q8_0, &q80)] {
                    let m = QMatrix::with_kernel(format, bytes, n, k, kern).unwrap();
                    let (rows, cols) = (m.dequantize(), m.dequantize_transposed());
                    let t: Vec<f32> = (0..k).flat_map(|kk| (0..n).map(move |j| (j, kk))).map(|(j, kk)| rows[j * k + kk]).collect();
                    assert_eq!(cols, t, "{kern:?} {format:?}");
                }
                check(Format::Q4_1, &q41, n, k, kern);
                check(Format::Q8_0, &q80, n, k, kern);
            }
        }
    }

    /// Several activation rows at once give each row the numbers it gets
    /// alone, for both formats (Q4_1's numbers on AVX2 machines are those
    /// of the one-row kernel this replaced, which ran each row alone); and
    /// weight rows in pairs (`dot_avx2` with W = 2) with the m-term 8 rows at a time
    /// (`msum8`) give those of one weight row alone. 19 blocks: `msum`'s
    /// 8-wide part and a tail; 19 rows: two groups of 8 and a remainder;
    /// 9 weight rows: pairs and one left over.
    #[test]
    fn avx2_rows_are_batch_invariant() {
        if kernel().is_none() {
            return;
        }
        let (n, k, rows) = (9, 19 * QK, 19);
        let mut rnd = lcg(3);
        let (mut q41, mut q80) = (Vec::new(), Vec::new());
        for _ in 0..n * k / QK {
            q41.extend(f16::from_f32(0.01 + rnd().abs() * 0.1).to_bits().to_le_bytes());
            q41.extend(f16::from_f32(rnd() * 0.5).to_bits().to_le_bytes());
            q41.extend((0..16).map(|_| ((rnd() + 0.5) * 255.0) as u8));
            q80.extend(f16::from_f32(0.01 + rnd().abs() * 0.1).to_bits().to_le_bytes());
            q80.extend((0..32).map(|_| (rnd() * 255.0) as i8 as u8));
        }
        let x: Vec<f32> = (0..rows * k).map(|_| rnd() * 3.0).collect();
        for (format, bytes, size) in [(Format::Q4_1, &q41, 20), (Format::Q8_0, &q80, 34)] {
            let w = QMatrix::with_kernel(format, bytes, n, k, Kernel::Avx2).unwrap();
            let all = w.matmul(&x, rows);
            for i in 0..rows {
                let one = w.matmul(&x[i * k..(i + 1) * k], 1);
                assert_eq!(one, all[i * n..(i + 1) * n], "{format:?} row {i}");
            }
            let per_row = k / QK * size;
            for j in 0..n {
                let alone = QMatrix::with_kernel(format, &bytes[j * per_row..(j + 1) * per_row], 1, k, Kernel::Avx2).unwrap();
                let got = alone.matmul(&x, rows);
                let want: Vec<f32> = (0..rows).map(|i| all[i * n + j]).collect();
                assert_eq!(got, want, "{format:?} weight row {j}");
            }
        }
    }
}
