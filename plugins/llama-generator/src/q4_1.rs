//! Q4_1 × Q8_1 matrix multiplication with AVX2, as ggml does it.
//!
//! candle 0.11 only has a scalar Q4_1 dot product on x86 (measured: 18
//! tokens/s against llama.cpp's 125 on SmolLM2 Q4_1, one thread). This is
//! ggml's `ggml_vec_dot_q4_1_q8_1` AVX2 path: activations quantized to Q8_1
//! per 32-block (d and s rounded through f16 as ggml stores them), one pass
//! over each weight row for all activation rows, so a batch of sequences
//! reads the weights once.

use half::f16;

const QK: usize = 32;

/// ggml's block_q4_1: scale, minimum (f16), 32 nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
struct BlockQ41 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ41>() == 20);

/// An activation block: ggml's block_q8_1 with d and s widened to f32
/// (their values are still the f16-rounded ones).
#[derive(Clone, Copy)]
struct BlockQ81 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight matrix (n rows of k), kept in ggml's byte layout.
pub struct Q41Matrix {
    blocks: Vec<BlockQ41>,
    pub n: usize,
    pub k: usize,
}

/// Whether this CPU runs the kernel (AVX2 + FMA + F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q41Matrix {
    /// From the raw GGUF bytes of an (n, k) Q4_1 tensor.
    pub fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * k / QK * 20 {
            return None;
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|c| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&c[4..20]);
                BlockQ41 { d: u16::from_le_bytes([c[0], c[1]]), m: u16::from_le_bytes([c[2], c[3]]), qs }
            })
            .collect();
        Some(Self { blocks, n, k })
    }

    /// The weights as f32, (n, k) row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for b in &self.blocks {
            let (d, m) = (f16::from_bits(b.d).to_f32(), f16::from_bits(b.m).to_f32());
            out.extend(b.qs.iter().map(|q| d * (q & 15) as f32 + m));
            out.extend(b.qs.iter().map(|q| d * (q >> 4) as f32 + m));
        }
        out
    }

    /// `x` is (m, k) row-major; returns (m, n) row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let kb = self.k / QK;
        let xq: Vec<BlockQ81> = x.chunks_exact(QK).map(quantize_q8_1).collect();
        let mut out_t = vec![0f32; self.n * m];
        let rows = |first: usize, chunk: &mut [f32]| {
            for (r, dst) in chunk.chunks_exact_mut(m).enumerate() {
                let w = &self.blocks[(first + r) * kb..(first + r + 1) * kb];
                for (i, d) in dst.iter_mut().enumerate() {
                    // SAFETY: `available()` was checked before a Q41Matrix is used.
                    *d = unsafe { dot(w, &xq[i * kb..(i + 1) * kb]) };
                }
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
        let mut out = vec![0f32; m * self.n];
        for j in 0..self.n {
            for i in 0..m {
                out[i * self.n + j] = out_t[j * m + i];
            }
        }
        out
    }
}

/// ggml's quantize_row_q8_1: d = amax/127, q = round(x/d), s = d·Σq, with d
/// and s stored as f16.
fn quantize_q8_1(x: &[f32]) -> BlockQ81 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    BlockQ81 { d: f16::from_f32(d).to_f32(), s: f16::from_f32(sum as f32 * d).to_f32(), qs }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot(x: &[BlockQ41], y: &[BlockQ81]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (bx, by) in x.iter().zip(y) {
        // d and m of the weight block, both f16, converted together.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((bx.d as u32 | (bx.m as u32) << 16) as i32));
        let dx = _mm_cvtss_f32(dm);
        let mx = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
        summs += mx * by.s;
        let tmp = _mm_loadu_si128(bx.qs.as_ptr() as *const __m128i);
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp), low);
        let qy = _mm256_loadu_si256(by.qs.as_ptr() as *const __m256i);
        let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * by.d), _mm256_cvtepi32_ps(s32), acc);
    }
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h) + summs
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot(_: &[BlockQ41], _: &[BlockQ81]) -> f32 {
    unreachable!("Q41Matrix is only built where `available()`")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against a plain f32 evaluation of the same quantized values.
    #[test]
    fn matches_scalar_reference() {
        if !available() {
            return;
        }
        let (n, k, m) = (37, 128, 3);
        let mut s = 1u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut bytes = Vec::new();
        for _ in 0..n * k / QK {
            bytes.extend(f16::from_f32(0.01 + rnd().abs() * 0.1).to_bits().to_le_bytes());
            bytes.extend(f16::from_f32(rnd() * 0.5).to_bits().to_le_bytes());
            bytes.extend((0..16).map(|_| ((rnd() + 0.5) * 255.0) as u8));
        }
        let w = Q41Matrix::from_bytes(&bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rnd() * 4.0).collect();
        let got = w.matmul(&x, m);
        for i in 0..m {
            let xq: Vec<BlockQ81> = x[i * k..(i + 1) * k].chunks_exact(QK).map(quantize_q8_1).collect();
            for j in 0..n {
                let mut want = 0f64;
                for (b, (bx, by)) in w.blocks[j * (k / QK)..(j + 1) * (k / QK)].iter().zip(&xq).enumerate() {
                    let _ = b;
                    let (d, mn) = (f16::from_bits(bx.d).to_f32() as f64, f16::from_bits(bx.m).to_f32() as f64);
                    for e in 0..QK {
                        let q = if e < 16 { bx.qs[e] & 15 } else { bx.qs[e - 16] >> 4 } as f64;
                        want += d * q * by.d as f64 * by.qs[e] as f64;
                    }
                    want += mn * by.s as f64;
                }
                let g = got[i * n + j] as f64;
                assert!((g - want).abs() < 1e-3 * (1.0 + want.abs()), "({i},{j}) {g} vs {want}");
            }
        }
    }
}
