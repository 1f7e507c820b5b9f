//! `Din::predict` shares the history term between neighbouring rows with the
//! same histories (one request's candidates): it must equal
//! sigmoid(forward(Infer)) whatever the neighbours look like, in particular
//! when neighbouring histories have equal lengths but other ids.

mod common;

use din::data::{Batch, Ragged};
use din::model::{Din, Mode, Module};

fn ragged(rows: &[Vec<u32>]) -> Ragged {
    let mut r = Ragged::new();
    for row in rows {
        r.push(row);
    }
    r
}

/// Eight rows for `common::config`: rows 0-2 share one history (item and
/// category ids), row 3 has the same length with other item ids, row 4 the
/// same item ids with other categories, rows 5-6 share another history,
/// row 7 is empty after an empty one (row 6 is not).
fn batch() -> Batch {
    let h = vec![1, 2, 4];
    let hc = vec![1, 1, 2];
    let items = vec![
        h.clone(),
        h.clone(),
        h.clone(),
        vec![5, 6, 7],
        h.clone(),
        vec![9, 3],
        vec![9, 3],
        vec![],
    ];
    let cates = vec![
        hc.clone(),
        hc.clone(),
        hc.clone(),
        hc.clone(),
        vec![3, 4, 5],
        vec![2, 2],
        vec![2, 2],
        vec![],
    ];
    Batch {
        sparse: vec![
            vec![1, 1, 1, 1, 1, 2, 2, 3],
            vec![3, 7, 11, 3, 3, 5, 8, 2],
            vec![1, 2, 5, 1, 1, 4, 3, 2],
        ],
        dense: vec![(0..16).map(|i| (i as f32 * 0.37).sin()).collect()],
        sequences: vec![
            ragged(&items),
            ragged(&cates),
            ragged(&[
                vec![1, 2],
                vec![1, 2],
                vec![1, 2],
                vec![1, 2],
                vec![1, 2],
                vec![6],
                vec![6],
                vec![],
            ]),
        ],
        labels: vec![0.0; 8],
        rows: 8,
        groups: Vec::new(),
        shared_sparse: Vec::new(),
        shared_dense: Vec::new(),
    }
}

#[test]
fn predict_equals_the_sigmoid_of_forward_whatever_the_neighbours() {
    for (attention, normalization, dnn) in [("prelu", "none", "prelu"), ("dice", "softmax", "dice")] {
        let config = common::config(attention, normalization, dnn);
        let layout = common::layout(&config);
        let mut model = Din::new(&layout, &config.model, 11).expect("model");
        // Larger embeddings and non-zero slopes, so that other ids give
        // clearly other scores.
        model.visit_mut("", &mut |name, p| {
            if name.starts_with("embeddings") {
                p.value.iter_mut().for_each(|v| *v *= 8.0);
            }
            if name.ends_with("alpha") {
                p.value
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, a)| *a = 0.1 + 0.05 * (i % 5) as f32);
            }
        });
        let batch = batch();
        let (logits, _) = model.forward(&batch, Mode::Infer, None);
        let want: Vec<f32> = logits.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
        let got = model.predict(&batch);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-5,
                "{attention}/{normalization}: row {r}: predict {g}, forward {w}"
            );
        }
        // The rows differ among themselves: the check above can tell them apart.
        assert!(
            (want[3] - want[0]).abs() > 1e-3 && (want[4] - want[0]).abs() > 1e-3,
            "{want:?}"
        );
        // Each row alone (no neighbour to share with) scores the same.
        for (r, &w) in want.iter().enumerate() {
            let one = model.predict(&batch.gather(&[r]));
            assert!((one[0] - w).abs() < 1e-5, "row {r} alone: {} vs {w}", one[0]);
        }
    }
}
