//! Binary cross-entropy on logits.

/// Mean binary cross-entropy of `sigmoid(logits)` against `labels`, computed
/// stably as `max(z, 0) - z*y + ln(1 + exp(-|z|))`. Writes the gradient of the
/// mean with respect to each logit, `(sigmoid(z) - y) / B`, into `dlogits`.
pub fn bce_with_logits(logits: &[f32], labels: &[f32], dlogits: &mut Vec<f32>) -> f64 {
    bce_with_logits_over(logits, labels, logits.len(), dlogits)
}

/// [`bce_with_logits`] of a part of a batch of `n` samples (one rank's
/// rows in distributed training): the sum of the part's losses divided by
/// `n`, and the gradient of the whole batch's mean, `(sigmoid(z) - y) / n`.
/// The parts' values add up to the whole batch's.
pub fn bce_with_logits_over(logits: &[f32], labels: &[f32], n: usize, dlogits: &mut Vec<f32>) -> f64 {
    assert_eq!(logits.len(), labels.len(), "one label per logit");
    dlogits.clear();
    let mut total = 0.0f64;
    for (&z, &y) in logits.iter().zip(labels) {
        let (z64, y64) = (f64::from(z), f64::from(y));
        total += z64.max(0.0) - z64 * y64 + (-z64.abs()).exp().ln_1p();
        let p = 1.0 / (1.0 + (-z).exp());
        dlogits.push((p - y) / n as f32);
    }
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_textbook_formula_and_stays_finite() {
        let mut d = Vec::new();
        // -[y ln p + (1-y) ln(1-p)] with p = sigmoid(z):
        // z=0,y=1: ln 2 = 0.693147; z=2,y=0: -ln(1 - 0.880797) = 2.126928.
        let l = bce_with_logits(&[0.0, 2.0], &[1.0, 0.0], &mut d);
        assert!((l - (std::f64::consts::LN_2 + 2.126_928_0) / 2.0).abs() < 1e-6, "{l}");
        assert!((d[0] - (0.5 - 1.0) / 2.0).abs() < 1e-7 && (d[1] - 0.880_797_1 / 2.0).abs() < 1e-6);
        // Extreme logits: a naive log(sigmoid) would give inf or NaN.
        let l = bce_with_logits(&[100.0, -100.0], &[0.0, 1.0], &mut d);
        assert!((l - 100.0).abs() < 1e-9, "{l}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (z, y) = ([0.3f32, -1.2, 2.5], [1.0f32, 0.0, 0.0]);
        let mut d = Vec::new();
        bce_with_logits(&z, &y, &mut d);
        for i in 0..3 {
            let (mut zp, mut zm) = (z, z);
            zp[i] += 1e-3;
            zm[i] -= 1e-3;
            let num = (bce_with_logits(&zp, &y, &mut Vec::new()) - bce_with_logits(&zm, &y, &mut Vec::new())) / 2e-3;
            assert!((f64::from(d[i]) - num).abs() < 1e-4, "{i}: {} vs {num}", d[i]);
        }
    }
}
