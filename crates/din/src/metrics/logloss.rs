//! Mean binary cross-entropy (log loss).

/// Lower clipping bound for probabilities; the upper bound is `1 - EPS`.
///
/// Same value as Keras' default epsilon, so that a confidently wrong
/// prediction costs at most `-ln(1e-7) ≈ 16.118` instead of infinity.
pub const EPS: f64 = 1e-7;

/// Mean binary cross-entropy of predicted probabilities `probs` against
/// `labels`:
///
/// `-(1/n) Σ_i [ y_i ln p_i + (1 - y_i) ln(1 - p_i) ]`
///
/// with each `p_i` clipped to `[EPS, 1 - EPS]` (see [`EPS`]) and all
/// arithmetic done in `f64`. Labels are used as given (normally `0.0` or
/// `1.0`).
///
/// Returns `NaN` for empty input (the mean of zero terms is undefined).
/// A `NaN` probability propagates to a `NaN` result.
///
/// # Panics
///
/// Panics if `labels.len() != probs.len()`.
pub fn logloss(labels: &[f32], probs: &[f32]) -> f64 {
    assert_eq!(
        labels.len(),
        probs.len(),
        "logloss: labels and probs must have equal length"
    );
    if labels.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = labels
        .iter()
        .zip(probs)
        .map(|(&y, &p)| {
            let y = f64::from(y);
            let p = f64::from(p).clamp(EPS, 1.0 - EPS);
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_hand_computed_case() {
        // Probabilities exactly representable in f32.
        //   y=1, p=0.75: -ln(0.75) = ln(4/3) = 0.28768207245178090
        //   y=0, p=0.25: -ln(0.75) = ln(4/3) = 0.28768207245178090
        //   y=1, p=0.5 : -ln(0.5)  = ln 2    = 0.69314718055994531
        //   sum = 1.26851132546350711, mean = sum / 3 = 0.42283710848783570
        let got = logloss(&[1.0, 0.0, 1.0], &[0.75, 0.25, 0.5]);
        assert!((got - 0.422_837_108_487_835_7).abs() < 1e-12, "got {got}");
    }

    #[test]
    fn clips_confidently_wrong_predictions() {
        // y=1, p=0 -> p clipped to 1e-7: -ln(1e-7) = 7 ln 10 = 16.118095650958320
        let got = logloss(&[1.0], &[0.0]);
        assert!((got - 16.118_095_650_958_32).abs() < 1e-9, "got {got}");
        // y=0, p=1 -> p clipped to 1 - 1e-7: -ln(1 - (1 - 1e-7)) ≈ -ln(1e-7)
        // (1 - 1e-7 is inexact in f64; the relative error of 1e-7 is
        // ~1e-9, so the loss agrees with 16.11809565 to ~1e-9).
        let got = logloss(&[0.0], &[1.0]);
        assert!((got - 16.118_095_650_958_32).abs() < 1e-6, "got {got}");
    }

    #[test]
    fn clips_confidently_right_predictions() {
        // y=1, p=1 -> p clipped to 1 - 1e-7: -ln(1 - 1e-7) = 1e-7 + 1e-14/2 + ...
        //   ≈ 1.00000005e-7
        // y=0, p=0 -> p clipped to 1e-7: -ln(1 - 1e-7), same value.
        // mean of the two equal terms = 1.00000005e-7.
        let got = logloss(&[1.0, 0.0], &[1.0, 0.0]);
        assert!((got - 1.000_000_05e-7).abs() < 1e-15, "got {got}");
    }

    #[test]
    fn empty_input_is_nan() {
        assert!(logloss(&[], &[]).is_nan());
    }

    #[test]
    #[should_panic(expected = "equal length")]
    fn length_mismatch_panics() {
        let _ = logloss(&[1.0, 0.0], &[0.5]);
    }
}
