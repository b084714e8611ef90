//! Small numeric kernels the model plugins share.

/// erf for f32 as a rational polynomial on [-4, 4] (the approximation Eigen
/// and XLA use; beyond ±4 erf is ±1 in f32). Only multiplies, adds and one
/// divide, so loops over it vectorise.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_473_9e-2;
    p / q
}

/// The vector instruction set a [`multiversion!`] function runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    /// AVX-512F with AVX2 and FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// What the build targets (SSE2 on x86-64).
    Base,
}

/// The best [`Isa`] this CPU has (detected once).
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Base
    })
}

/// Defines a function whose body is compiled three times — for AVX-512,
/// for AVX2 and for the build's baseline — and runs the best copy the CPU
/// has. The same source in each copy, so the same IEEE operations in the
/// same order (Rust never fuses or reassociates float arithmetic): the
/// copies give the same bits, only wider registers. For element-wise loops
/// and row kernels that the baseline (SSE2) build runs 4 lanes wide.
/// Helpers the body calls should be `#[inline(always)]` to be compiled
/// into each copy.
///
/// A function generic over one type is written `fn name[T: Bounds](…)`.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident $([$t:ident: $($bound:tt)+])? ($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$t: $($bound)+>)? ($($arg: $ty),*) {
            #[inline(always)]
            fn inner $(<$t: $($bound)+>)? ($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512 $(<$t: $($bound)+>)? ($($arg: $ty),*) {
                inner $(::<$t>)? ($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2 $(<$t: $($bound)+>)? ($($arg: $ty),*) {
                inner $(::<$t>)? ($($arg),*)
            }
            match $crate::kernels::isa() {
                // SAFETY: `isa()` detected the features each copy is compiled for.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx512 => unsafe { avx512 $(::<$t>)? ($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx2 => unsafe { avx2 $(::<$t>)? ($($arg),*) },
                _ => inner $(::<$t>)? ($($arg),*),
            }
        }
    };
}

/// `exp` of every element in place, with the very bits of glibc's `expf`
/// (what `f32::exp` calls on Linux), computed 8 (AVX-512) or 4 (AVX2 + FMA)
/// lanes at a time: glibc's algorithm (ARM optimized-routines' `expf`:
/// x·32/ln 2 split into k + r, 2^(k/32) from a 32-entry table, a cubic in r,
/// all in f64) with the operations of its FMA build, which glibc picks on
/// every CPU these paths run on. Lanes below expf's underflow bound give 0 as
/// expf does; NaN, lanes above 88 and the few just above the bound go through
/// `f32::exp` itself. Checked against `f32::exp` over a sweep of every
/// exponent (tests below) and, once, over all 2³² floats. An attention row's
/// softmax spent most of its time in the scalar `expf` calls this replaces.
pub fn exp_in_place(xs: &mut [f32]) {
    match isa() {
        // SAFETY: `isa()` detected the features these are compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { expf::avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { expf::avx2(xs) },
        _ => xs.iter_mut().for_each(|x| *x = x.exp()),
    }
}

mod expf {
    /// 2^(i/32) as bits, less i·2⁵²/32 (added back from k's low bits).
    pub(super) const TAB: [u64; 32] = [
        0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
        0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
        0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13, 0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
        0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540,
    ];
    /// 32/ln 2 (0x1.71547652b82fep+5).
    pub(super) const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
    /// 1.5·2⁵²: adding it rounds to an integer (ties to even) in the low bits.
    pub(super) const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
    /// The cubic's coefficients, scaled by 1/32 per power.
    pub(super) const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
    pub(super) const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
    pub(super) const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
    /// Below this expf returns 0 (log 2⁻¹⁵⁰, 0x1.9fe368p6); from here to
    /// `LO` lanes go through `f32::exp`.
    pub(super) const UFLOW: f32 = -103.972_08;
    pub(super) const LO: f32 = -103.0;
    pub(super) const HI: f32 = 88.0;

    /// One lane as the vector paths compute it (for the tests).
    #[cfg(test)]
    pub(super) fn scalar(x: f32) -> f32 {
        let xd = x as f64;
        let k = INV_LN2_N.mul_add(xd, SHIFT);
        let ki = k.to_bits();
        let kd = k - SHIFT;
        let r = INV_LN2_N.mul_add(xd, -kd);
        let s = f64::from_bits(TAB[(ki % 32) as usize].wrapping_add(ki << 47));
        let z = C0.mul_add(r, C1);
        let y = C2.mul_add(r, 1.0);
        (z.mul_add(r * r, y) * s) as f32
    }

    /// Lanes outside [LO, HI] (NaN included) and not below UFLOW, whose
    /// results `f32::exp` gives.
    #[inline(always)]
    fn fix(xs: &mut [f32], x: &[f32], ok: i32) {
        for (i, (o, &x)) in xs.iter_mut().zip(x).enumerate() {
            if ok >> i & 1 == 0 {
                *o = x.exp();
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512(xs: &mut [f32]) {
        use std::arch::x86_64::*;
        let (inv, shift, one) = (_mm512_set1_pd(INV_LN2_N), _mm512_set1_pd(SHIFT), _mm512_set1_pd(1.0));
        let (c0, c1, c2) = (_mm512_set1_pd(C0), _mm512_set1_pd(C1), _mm512_set1_pd(C2));
        let (uflow, lo, hi) = (_mm256_set1_ps(UFLOW), _mm256_set1_ps(LO), _mm256_set1_ps(HI));
        let low5 = _mm512_set1_epi64(31);
        let mut chunks = xs.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            let x = _mm256_loadu_ps(c.as_ptr());
            let zero = _mm256_cmp_ps::<_CMP_LT_OQ>(x, uflow);
            let inside = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, lo), _mm256_cmp_ps::<_CMP_LE_OQ>(x, hi));
            let ok = _mm256_movemask_ps(_mm256_or_ps(inside, zero));
            let xd = _mm512_cvtps_pd(x);
            let k = _mm512_fmadd_pd(inv, xd, shift);
            let kd = _mm512_sub_pd(k, shift);
            let r = _mm512_fmsub_pd(inv, xd, kd);
            let ki = _mm512_castpd_si512(k);
            let t = _mm512_i64gather_epi64::<8>(_mm512_and_si512(ki, low5), TAB.as_ptr() as *const i64);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(c0, r, c1);
            let y = _mm512_fmadd_pd(c2, r, one);
            let y = _mm512_mul_pd(_mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y), s);
            let e = _mm256_andnot_ps(zero, _mm512_cvtpd_ps(y));
            let mut before = [0f32; 8];
            _mm256_storeu_ps(before.as_mut_ptr(), x);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            if ok != 0xFF {
                fix(c, &before, ok);
            }
        }
        chunks.into_remainder().iter_mut().for_each(|x| *x = x.exp());
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(xs: &mut [f32]) {
        use std::arch::x86_64::*;
        let (inv, shift, one) = (_mm256_set1_pd(INV_LN2_N), _mm256_set1_pd(SHIFT), _mm256_set1_pd(1.0));
        let (c0, c1, c2) = (_mm256_set1_pd(C0), _mm256_set1_pd(C1), _mm256_set1_pd(C2));
        let (uflow, lo, hi) = (_mm_set1_ps(UFLOW), _mm_set1_ps(LO), _mm_set1_ps(HI));
        let low5 = _mm256_set1_epi64x(31);
        let mut chunks = xs.chunks_exact_mut(4);
        for c in chunks.by_ref() {
            let x = _mm_loadu_ps(c.as_ptr());
            let zero = _mm_cmp_ps::<_CMP_LT_OQ>(x, uflow);
            let inside = _mm_and_ps(_mm_cmp_ps::<_CMP_GE_OQ>(x, lo), _mm_cmp_ps::<_CMP_LE_OQ>(x, hi));
            let ok = _mm_movemask_ps(_mm_or_ps(inside, zero));
            let xd = _mm256_cvtps_pd(x);
            let k = _mm256_fmadd_pd(inv, xd, shift);
            let kd = _mm256_sub_pd(k, shift);
            let r = _mm256_fmsub_pd(inv, xd, kd);
            let ki = _mm256_castpd_si256(k);
            let t = _mm256_i64gather_epi64::<8>(TAB.as_ptr() as *const i64, _mm256_and_si256(ki, low5));
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let z = _mm256_fmadd_pd(c0, r, c1);
            let y = _mm256_fmadd_pd(c2, r, one);
            let y = _mm256_mul_pd(_mm256_fmadd_pd(z, _mm256_mul_pd(r, r), y), s);
            let e = _mm_andnot_ps(zero, _mm256_cvtpd_ps(y));
            let mut before = [0f32; 4];
            _mm_storeu_ps(before.as_mut_ptr(), x);
            _mm_storeu_ps(c.as_mut_ptr(), e);
            if ok != 0xF {
                fix(c, &before, ok);
            }
        }
        chunks.into_remainder().iter_mut().for_each(|x| *x = x.exp());
    }
}

#[cfg(test)]
mod exp_tests {
    /// Every 251st float (all signs and exponents), and the edges.
    fn sweep() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=u32::MAX / 251).map(|i| f32::from_bits(i * 251)).collect();
        xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 88.0, 88.72284, 88.72285, -103.0, -103.27893, -103.97208, -103.97209, -104.0]);
        xs.extend((0..20_000).map(|i| -110.0 + i as f32 * 0.01));
        xs
    }

    fn same(got: &[f32], xs: &[f32], what: &str) {
        for (g, x) in got.iter().zip(xs) {
            let want = x.exp();
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{what}: exp({x:e}) = {g:e}, f32::exp gives {want:e}");
        }
    }

    /// The vector paths give f32::exp's bits (glibc's expf on Linux; other
    /// C libraries compute expf otherwise, so only there is this a claim).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
    fn exp_in_place_equals_glibc_expf() {
        let xs = sweep();
        let mut got = xs.clone();
        super::exp_in_place(&mut got);
        same(&got, &xs, "exp_in_place");
        // The algorithm itself, lane by lane, inside the vector range.
        let inside: Vec<f32> = xs.iter().copied().filter(|x| (-103.0..=88.0).contains(x)).collect();
        let one: Vec<f32> = inside.iter().map(|&x| super::expf::scalar(x)).collect();
        same(&one, &inside, "scalar");
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut v = xs.clone();
            // SAFETY: detected.
            unsafe { super::expf::avx512(&mut v) };
            same(&v, &xs, "avx512");
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut v = xs.clone();
            // SAFETY: detected.
            unsafe { super::expf::avx2(&mut v) };
            same(&v, &xs, "avx2");
        }
    }
}
