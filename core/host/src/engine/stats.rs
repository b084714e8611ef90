//! Paired significance tests over per-query values.

/// Two-sided p-value of a paired t-test on `a - b`.
pub fn paired_t_test(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len();
    if n < 2 {
        return 1.0;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    if var == 0.0 {
        return if mean == 0.0 { 1.0 } else { 0.0 };
    }
    let t = mean / (var / n as f64).sqrt();
    let df = (n - 1) as f64;
    // P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2)
    incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
}

/// Two-sided p-value of a paired randomization (sign-flip) test on the mean
/// difference, with `iterations` random flips from a fixed seed.
pub fn randomization_test(a: &[f64], b: &[f64], iterations: usize, seed: u64) -> f64 {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    if d.is_empty() {
        return 1.0;
    }
    let observed = d.iter().sum::<f64>().abs();
    let mut state = seed | 1;
    let mut at_least = 0usize;
    for _ in 0..iterations {
        let mut s = 0.0;
        for (i, x) in d.iter().enumerate() {
            if i % 64 == 0 {
                // xorshift64*: 64 random signs per step
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
            }
            let bit = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> (i % 64)) & 1;
            s += if bit == 1 { *x } else { -*x };
        }
        // Small tolerance: sums in a different order can differ in the last bits.
        if s.abs() >= observed - 1e-12 {
            at_least += 1;
        }
    }
    (at_least + 1) as f64 / (iterations + 1) as f64
}

/// Regularised incomplete beta I_x(a, b) (Numerical Recipes' continued fraction).
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / guard(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz step for coefficient `aa`; returns the factor applied to h.
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 / guard(1.0 + aa * *d);
        *c = guard(1.0 + aa / *c);
        *d * *c
    };
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let del = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), &mut c, &mut d);
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Lanczos approximation of ln Γ(x), x > 0.
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut s = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        s += g / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_test_matches_the_t_distribution() {
        // Differences have mean -0.4 and sd 0.4 over 6 pairs: t = -2.4495, df = 5.
        // Two-sided p by numerical integration of the t density: 0.0579728.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.1, 2.5, 2.9, 4.8, 5.2, 6.9];
        let p = paired_t_test(&a, &b);
        assert!((p - 0.057_972_8).abs() < 1e-6, "{p}");
        assert_eq!(paired_t_test(&a, &a), 1.0);
    }

    #[test]
    fn randomization_agrees_in_direction() {
        let a: Vec<f64> = (0..40).map(|i| (i % 7) as f64 / 7.0 + 0.2).collect();
        let b: Vec<f64> = (0..40).map(|i| (i % 7) as f64 / 7.0).collect();
        assert!(randomization_test(&a, &b, 2000, 42) < 0.01);
        let noise: Vec<f64> = (0..40).map(|i| if i % 2 == 0 { 0.1 } else { -0.1 }).collect();
        let c: Vec<f64> = b.iter().zip(&noise).map(|(x, n)| x + n).collect();
        assert!(randomization_test(&c, &b, 2000, 42) > 0.5);
    }
}
