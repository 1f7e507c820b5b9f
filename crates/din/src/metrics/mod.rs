//! Evaluation metrics for click-through-rate prediction.
//!
//! One concept per file:
//!
//! * [`logloss()`]: mean binary cross-entropy with clipped probabilities;
//! * [`auc()`]: ROC AUC via the Mann-Whitney rank statistic (ties count 1/2);
//! * [`gauc()`]: impression-weighted per-user AUC (DIN paper, eq. 5);
//! * [`rela_impr()`]: relative AUC improvement over a baseline (DIN paper).
//!
//! [`Metrics`] bundles the per-dataset numbers reported after an evaluation
//! pass. All accumulation is done in `f64`.
//!
//! Labels are expected to be `0.0` or `1.0`; everywhere a hard class is
//! needed, a label `> 0.5` counts as positive.

pub mod auc;
pub mod gauc;
pub mod logloss;
pub mod relaimpr;

pub use auc::auc;
pub use gauc::gauc;
pub use logloss::logloss;
pub use relaimpr::rela_impr;

/// Summary metrics of one evaluation pass over a dataset.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Number of samples (impressions) evaluated.
    pub n: usize,
    /// Number of positive samples (label `> 0.5`).
    pub positives: usize,
    /// Mean binary cross-entropy, see [`logloss()`]; `NaN` when `n == 0`.
    pub logloss: f64,
    /// ROC AUC, see [`auc()`]; `None` when the data has a single class.
    pub auc: Option<f64>,
    /// Group AUC, see [`gauc()`]; `None` when no user ids were given or
    /// when no user has both positive and negative samples.
    pub gauc: Option<f64>,
}

impl Metrics {
    /// Computes all metrics for predicted click probabilities `probs`
    /// against `labels`, with per-user GAUC when `users` is given.
    ///
    /// `users[i]` is the user id of sample `i`.
    ///
    /// # Panics
    ///
    /// Panics if `labels`, `probs` and (when given) `users` do not all have
    /// the same length.
    pub fn compute(labels: &[f32], probs: &[f32], users: Option<&[u32]>) -> Metrics {
        assert_eq!(
            labels.len(),
            probs.len(),
            "Metrics::compute: labels and probs must have equal length"
        );
        if let Some(u) = users {
            assert_eq!(
                u.len(),
                labels.len(),
                "Metrics::compute: users and labels must have equal length"
            );
        }
        Metrics {
            n: labels.len(),
            positives: labels.iter().filter(|&&y| y > 0.5).count(),
            logloss: logloss(labels, probs),
            auc: auc(labels, probs),
            gauc: users.and_then(|u| gauc(u, labels, probs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Same data as the GAUC test in gauc.rs, see there for the per-user
    // hand computation.
    //   user 10: labels [1,0,0],   scores [0.8,0.3,0.9] -> AUC 1/2, 3 imps
    //   user 20: labels [1,0,1,0], scores [0.6,0.2,0.4,0.4] -> AUC 7/8, 4 imps
    //   user 30: labels [0,0],     scores [0.5,0.1] -> one class, skipped
    const USERS: [u32; 9] = [20, 10, 30, 20, 10, 20, 30, 10, 20];
    const LABELS: [f32; 9] = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    const PROBS: [f32; 9] = [0.6, 0.8, 0.5, 0.2, 0.3, 0.4, 0.1, 0.9, 0.4];

    #[test]
    fn compute_matches_individual_functions() {
        let m = Metrics::compute(&LABELS, &PROBS, Some(&USERS));
        // Positives counted by hand: indices 0, 1, 5 -> 3 of 9.
        assert_eq!(m.n, 9);
        assert_eq!(m.positives, 3);
        assert_eq!(m.logloss, logloss(&LABELS, &PROBS));
        assert_eq!(m.auc, auc(&LABELS, &PROBS));
        assert_eq!(m.gauc, gauc(&USERS, &LABELS, &PROBS));
        // GAUC = (3 * 1/2 + 4 * 7/8) / (3 + 4) = 5/7 (hand-computed in gauc.rs).
        let g = m.gauc.expect("two users qualify");
        assert!((g - 5.0 / 7.0).abs() < 1e-12, "gauc = {g}");
        // Global AUC by hand: positives {0.6, 0.8, 0.4}, negatives
        // {0.5, 0.2, 0.3, 0.1, 0.9, 0.4}.
        //   0.6 beats 0.5,0.2,0.3,0.1,0.4, loses to 0.9  -> 5
        //   0.8 beats 0.5,0.2,0.3,0.1,0.4, loses to 0.9  -> 5
        //   0.4 beats 0.2,0.3,0.1, ties 0.4              -> 3.5
        // total 13.5 / (3 * 6) = 3/4.
        let a = m.auc.expect("both classes present");
        assert!((a - 0.75).abs() < 1e-12, "auc = {a}");
    }

    #[test]
    fn compute_without_users_has_no_gauc() {
        let m = Metrics::compute(&LABELS, &PROBS, None);
        assert_eq!(m.gauc, None);
        assert!(m.auc.is_some());
        assert_eq!(m.n, 9);
    }

    #[test]
    fn compute_on_empty_input() {
        let m = Metrics::compute(&[], &[], Some(&[]));
        assert_eq!(m.n, 0);
        assert_eq!(m.positives, 0);
        assert!(m.logloss.is_nan());
        assert_eq!(m.auc, None);
        assert_eq!(m.gauc, None);
    }

    #[test]
    #[should_panic(expected = "users and labels must have equal length")]
    fn compute_panics_on_user_length_mismatch() {
        let _ = Metrics::compute(&LABELS, &PROBS, Some(&USERS[..8]));
    }
}
