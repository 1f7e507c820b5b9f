//! Relative AUC improvement (RelaImpr) from the DIN paper.

/// RelaImpr of a model's AUC over a baseline's AUC, in percent, as defined
/// in Zhou et al. 2018 (Deep Interest Network, section 6.3):
///
/// `RelaImpr = ((AUC(model) - 0.5) / (AUC(baseline) - 0.5) - 1) × 100%`
///
/// A random guesser has AUC 0.5, so this measures the improvement of the
/// model's margin over random relative to the baseline's margin. It is `0`
/// when both AUCs are equal. A `baseline_auc` of exactly `0.5` divides by
/// zero (giving `±inf` or `NaN`).
pub fn rela_impr(auc: f64, baseline_auc: f64) -> f64 {
    ((auc - 0.5) / (baseline_auc - 0.5) - 1.0) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn improvement_over_baseline() {
        // (0.75 - 0.5) / (0.7 - 0.5) = 0.25 / 0.2 = 1.25; (1.25 - 1) * 100 = 25
        let got = rela_impr(0.75, 0.7);
        assert!((got - 25.0).abs() < 1e-9, "got {got}");
    }

    #[test]
    fn regression_is_negative() {
        // (0.6 - 0.5) / (0.7 - 0.5) = 0.1 / 0.2 = 0.5; (0.5 - 1) * 100 = -50
        let got = rela_impr(0.6, 0.7);
        assert!((got + 50.0).abs() < 1e-9, "got {got}");
    }

    #[test]
    fn equal_auc_is_zero() {
        // (x - 0.5) / (x - 0.5) = 1 exactly; (1 - 1) * 100 = 0
        assert_eq!(rela_impr(0.7312, 0.7312), 0.0);
    }
}
