//! Finite-difference helpers for the gradient-check tests.

/// Deterministic values in [-1, 1) from a seed (a 64-bit LCG; tests only).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `Σ r_i y_i` in f64: a scalar loss whose gradient with respect to `y` is `r`.
pub fn dot(r: &[f32], y: &[f32]) -> f64 {
    assert_eq!(r.len(), y.len());
    r.iter().zip(y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
}

/// Central differences of `loss` with respect to every element of `x`.
pub fn numeric_grad(x: &[f32], eps: f32, mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xs[i];
            xs[i] = orig + eps;
            let plus = loss(&xs);
            xs[i] = orig - eps;
            let minus = loss(&xs);
            xs[i] = orig;
            (plus - minus) / (2.0 * f64::from(eps))
        })
        .collect()
}

/// Asserts `|analytic - numeric| <= 1e-3 + tol * max|numeric|` element-wise.
pub fn assert_close(name: &str, analytic: &[f32], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{name}: length");
    let scale = numeric.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        let err = (f64::from(*a) - n).abs();
        assert!(
            err <= 1e-3 + tol * scale,
            "{name}[{i}]: analytic {a} vs numeric {n} (scale {scale})"
        );
    }
    assert!(
        scale > 0.0 || analytic.iter().all(|a| *a == 0.0),
        "{name}: all-zero numeric gradient"
    );
}
