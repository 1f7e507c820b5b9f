//! Area under the ROC curve via the Mann-Whitney rank statistic.

/// ROC AUC of `scores` against binary `labels`.
///
/// Computed as the Mann-Whitney U statistic normalised by the number of
/// positive/negative pairs: the fraction of (positive, negative) pairs in
/// which the positive has the higher score, with a tied pair counting 1/2.
/// This equals the rank-sum formulation in which tied scores receive their
/// average rank.
///
/// A label `> 0.5` is positive, anything else (including `NaN`) negative.
///
/// Scores are sorted in `O(n log n)` with [`f32::total_cmp`], so `NaN`
/// scores do not panic: a positive-signed `NaN` ranks above `+inf`, a
/// negative-signed one below `-inf`, and `NaN`s with identical bits tie.
/// `-0.0` and `+0.0` are treated as tied. Counts are accumulated in `f64`.
///
/// Returns `None` when there are no positives or no negatives (including
/// empty input), since AUC is undefined then.
///
/// # Panics
///
/// Panics if `labels.len() != scores.len()`.
pub fn auc(labels: &[f32], scores: &[f32]) -> Option<f64> {
    assert_eq!(
        labels.len(),
        scores.len(),
        "auc: labels and scores must have equal length"
    );
    // `s + 0.0` maps -0.0 to +0.0 (IEEE round-to-nearest), so that the two
    // zeros, which `total_cmp` orders, form a single tie group.
    let mut pairs: Vec<(f32, bool)> = scores.iter().zip(labels).map(|(&s, &y)| (s + 0.0, y > 0.5)).collect();
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));

    // Walk tie groups in ascending score order. Every positive in a group
    // beats all negatives in lower groups and ties with the group's own
    // negatives (worth 1/2 each).
    let mut negatives_below = 0.0_f64;
    let mut positives = 0.0_f64;
    let mut wins = 0.0_f64;
    for group in pairs.chunk_by(|a, b| a.0.total_cmp(&b.0).is_eq()) {
        let pos = group.iter().filter(|&&(_, is_pos)| is_pos).count() as f64;
        let neg = group.len() as f64 - pos;
        wins += pos * (negatives_below + 0.5 * neg);
        negatives_below += neg;
        positives += pos;
    }
    let negatives = negatives_below;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    Some(wins / (positives * negatives))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent O(n²) reference: count (positive, negative) pairs
    /// directly, 1 for a win, 1/2 for a tie.
    fn brute_force(labels: &[f32], scores: &[f32]) -> Option<f64> {
        let (mut wins, mut pairs) = (0.0_f64, 0.0_f64);
        for (i, &yi) in labels.iter().enumerate() {
            for (j, &yj) in labels.iter().enumerate() {
                if yi > 0.5 && yj <= 0.5 {
                    pairs += 1.0;
                    if scores[i] > scores[j] {
                        wins += 1.0;
                    } else if scores[i] == scores[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        (pairs > 0.0).then(|| wins / pairs)
    }

    #[test]
    fn perfect_ranking_is_one() {
        // Every positive (0.9, 0.8) above every negative (0.2, 0.1): 4/4 pairs.
        assert_eq!(auc(&[1.0, 1.0, 0.0, 0.0], &[0.9, 0.8, 0.2, 0.1]), Some(1.0));
    }

    #[test]
    fn reversed_ranking_is_zero() {
        // Every positive (0.1, 0.2) below every negative (0.8, 0.9): 0/4 pairs.
        assert_eq!(auc(&[1.0, 1.0, 0.0, 0.0], &[0.1, 0.2, 0.8, 0.9]), Some(0.0));
    }

    #[test]
    fn all_tied_is_one_half() {
        // 2 positives x 3 negatives = 6 pairs, all tied: 6 * 1/2 / 6 = 0.5.
        assert_eq!(auc(&[1.0, 0.0, 1.0, 0.0, 0.0], &[0.3; 5]), Some(0.5));
    }

    #[test]
    fn hand_computed_with_ties() {
        // labels [1,0,1,0,1], scores [0.9,0.9,0.5,0.1,0.3]
        // positives {0.9, 0.5, 0.3}, negatives {0.9, 0.1}; 3 x 2 = 6 pairs:
        //   (0.9, 0.9) tie 1/2   (0.9, 0.1) 1
        //   (0.5, 0.9) 0         (0.5, 0.1) 1
        //   (0.3, 0.9) 0         (0.3, 0.1) 1
        // total 3.5 / 6 = 7/12 = 0.58333...
        // Cross-check by ranks: ascending 0.1(-) r1, 0.3(+) r2, 0.5(+) r3,
        // 0.9/0.9 r4.5 each; positive rank sum 2 + 3 + 4.5 = 9.5;
        // U = 9.5 - 3*4/2 = 3.5. Same.
        let got = auc(&[1.0, 0.0, 1.0, 0.0, 1.0], &[0.9, 0.9, 0.5, 0.1, 0.3]).expect("both classes present");
        assert!((got - 7.0 / 12.0).abs() < 1e-15, "got {got}");
    }

    #[test]
    fn one_class_is_none() {
        assert_eq!(auc(&[1.0, 1.0, 1.0], &[0.1, 0.5, 0.9]), None);
        assert_eq!(auc(&[0.0, 0.0], &[0.1, 0.5]), None);
        assert_eq!(auc(&[], &[]), None);
    }

    #[test]
    fn signed_zeros_tie() {
        // One pair (+ at 0.0, - at -0.0); numerically equal, so a tie: 1/2.
        assert_eq!(auc(&[1.0, 0.0], &[0.0, -0.0]), Some(0.5));
        assert_eq!(auc(&[1.0, 0.0], &[-0.0, 0.0]), Some(0.5));
    }

    #[test]
    fn nan_scores_do_not_panic() {
        // A positive-signed quiet NaN sorts above every number under
        // total_cmp, so the positive at NaN beats the negative at 0.1: 1/1.
        let nan = f32::from_bits(0x7fc0_0000);
        assert!(nan.is_nan() && nan.is_sign_positive());
        assert_eq!(auc(&[1.0, 0.0], &[nan, 0.1]), Some(1.0));
        // Two identical NaNs tie: 1/2.
        assert_eq!(auc(&[1.0, 0.0], &[nan, nan]), Some(0.5));
    }

    #[test]
    fn matches_brute_force_on_pseudo_random_data_with_ties() {
        // Deterministic LCG; scores quantised to 8 levels to force many ties.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let n = 300;
        let mut labels = Vec::with_capacity(n);
        let mut scores = Vec::with_capacity(n);
        for _ in 0..n {
            let level = (next() % 8) as f32 / 8.0;
            // Positives skew to higher levels so AUC is away from 0.5.
            let pos = next() % 8 < 2 + (level * 5.0) as u32;
            labels.push(if pos { 1.0 } else { 0.0 });
            scores.push(level);
        }
        let fast = auc(&labels, &scores).expect("both classes present");
        let slow = brute_force(&labels, &scores).expect("both classes present");
        assert!((fast - slow).abs() < 1e-12, "fast {fast} vs slow {slow}");
        assert!(fast > 0.55, "test data should be informative, got {fast}");
    }

    #[test]
    #[should_panic(expected = "equal length")]
    fn length_mismatch_panics() {
        let _ = auc(&[1.0, 0.0], &[0.5]);
    }
}
