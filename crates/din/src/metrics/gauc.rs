//! Group AUC: impression-weighted per-user AUC (DIN paper, eq. 5).

use super::auc::auc;

/// Group AUC as defined in Zhou et al. 2018 (Deep Interest Network, eq. 5):
///
/// `GAUC = Σ_u w_u · AUC_u / Σ_u w_u`
///
/// where `AUC_u` is the ROC AUC (see [`auc()`]) of the samples of user `u`
/// and the weight `w_u` is that user's number of impressions (samples).
/// `users[i]` is the user id of sample `i`.
///
/// Users whose samples are all of one class have no AUC and are skipped:
/// they contribute to neither the numerator nor the denominator.
///
/// Returns `None` when no user qualifies (including empty input).
///
/// The result is deterministic: users are processed in ascending id order,
/// independent of input order, and sums are accumulated in `f64`.
///
/// # Panics
///
/// Panics if `users`, `labels` and `scores` do not all have the same length.
pub fn gauc(users: &[u32], labels: &[f32], scores: &[f32]) -> Option<f64> {
    assert_eq!(
        users.len(),
        labels.len(),
        "gauc: users and labels must have equal length"
    );
    assert_eq!(
        labels.len(),
        scores.len(),
        "gauc: labels and scores must have equal length"
    );
    let mut order: Vec<usize> = (0..users.len()).collect();
    order.sort_by_key(|&i| users[i]); // stable: ties keep input order

    let mut user_labels: Vec<f32> = Vec::new();
    let mut user_scores: Vec<f32> = Vec::new();
    let mut weighted_sum = 0.0_f64;
    let mut total_weight = 0.0_f64;
    for group in order.chunk_by(|&a, &b| users[a] == users[b]) {
        user_labels.clear();
        user_scores.clear();
        user_labels.extend(group.iter().map(|&i| labels[i]));
        user_scores.extend(group.iter().map(|&i| scores[i]));
        if let Some(a) = auc(&user_labels, &user_scores) {
            let w = group.len() as f64;
            weighted_sum += w * a;
            total_weight += w;
        }
    }
    (total_weight > 0.0).then(|| weighted_sum / total_weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Three users, samples interleaved:
    //   user 10: labels [1,0,0],   scores [0.8,0.3,0.9]
    //   user 20: labels [1,0,1,0], scores [0.6,0.2,0.4,0.4]
    //   user 30: labels [0,0],     scores [0.5,0.1]
    const USERS: [u32; 9] = [20, 10, 30, 20, 10, 20, 30, 10, 20];
    const LABELS: [f32; 9] = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    const SCORES: [f32; 9] = [0.6, 0.8, 0.5, 0.2, 0.3, 0.4, 0.1, 0.9, 0.4];

    #[test]
    fn three_users_one_skipped_impression_weighted() {
        // user 10: positive 0.8 vs negatives {0.3, 0.9}: 1 + 0 = 1 of 2
        //          -> AUC 1/2, weight 3 impressions.
        // user 20: positives {0.6, 0.4} vs negatives {0.2, 0.4}:
        //          (0.6,0.2) 1, (0.6,0.4) 1, (0.4,0.2) 1, (0.4,0.4) 1/2
        //          -> 3.5 / 4 = 7/8, weight 4 impressions.
        // user 30: only negatives -> skipped (not in the denominator).
        // GAUC = (3 * 1/2 + 4 * 7/8) / (3 + 4) = (1.5 + 3.5) / 7 = 5/7
        //      = 0.714285714...
        // (Wrong variants: unweighted mean (1/2 + 7/8) / 2 = 0.6875;
        //  user 30 counted in the denominator: 5/9 = 0.5556.)
        let got = gauc(&USERS, &LABELS, &SCORES).expect("two users qualify");
        assert!((got - 5.0 / 7.0).abs() < 1e-12, "got {got}");
    }

    #[test]
    fn independent_of_input_order() {
        let expected = gauc(&USERS, &LABELS, &SCORES);
        // Reverse the samples: per-user groups are the same sets, so the
        // result must be bit-identical.
        let mut u = USERS;
        let mut l = LABELS;
        let mut s = SCORES;
        u.reverse();
        l.reverse();
        s.reverse();
        assert_eq!(gauc(&u, &l, &s), expected);
    }

    #[test]
    fn single_user_equals_plain_auc() {
        // labels [1,0,1,0,1], scores [0.9,0.9,0.5,0.1,0.3] -> 7/12 (see auc.rs).
        let labels = [1.0, 0.0, 1.0, 0.0, 1.0];
        let scores = [0.9, 0.9, 0.5, 0.1, 0.3];
        let got = gauc(&[7; 5], &labels, &scores).expect("one user qualifies");
        assert!((got - 7.0 / 12.0).abs() < 1e-15, "got {got}");
    }

    #[test]
    fn no_qualifying_user_is_none() {
        // user 1 only positives, user 2 only negatives.
        assert_eq!(gauc(&[1, 2, 1, 2], &[1.0, 0.0, 1.0, 0.0], &[0.1, 0.9, 0.2, 0.8]), None);
        assert_eq!(gauc(&[], &[], &[]), None);
    }

    #[test]
    #[should_panic(expected = "users and labels must have equal length")]
    fn length_mismatch_panics() {
        let _ = gauc(&[1, 2], &[1.0, 0.0, 1.0], &[0.5, 0.5, 0.5]);
    }
}
