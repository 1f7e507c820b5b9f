//! Finite-difference gradient checks of the whole model: every parameter
//! tensor and every touched embedding row, through BCE, the DNN, attention
//! pooling (none and softmax), Dice (batch statistics) and PReLU, with a
//! zero-length history in the batch.

mod common;

use din::model::{Din, Mode, Module};
use din::train::bce_with_logits;

/// Summed BCE (not the mean, so gradients are larger than f32 noise).
fn loss(model: &Din, batch: &din::data::Batch) -> f64 {
    let (logits, _) = model.forward(batch, Mode::Train, None);
    bce_with_logits(&logits, &batch.labels, &mut Vec::new()) * batch.rows as f64
}

fn set(model: &mut Din, name: &str, i: usize, v: f32) {
    model.visit_mut("", &mut |n, p| {
        if n == name {
            p.value[i] = v;
        }
    });
}

/// Compares analytic and central-difference gradients of every scalar. An
/// element whose estimates at eps and eps/2 disagree straddles a kink of
/// PReLU (where the derivative jumps) and is skipped; few may be.
fn check(attention: &str, normalization: &str, dnn: &str) {
    let config = common::config(attention, normalization, dnn);
    let layout = common::layout(&config);
    let batch = common::batch();
    let mut model = Din::new(&layout, &config.model, 5).expect("model");
    // Move PReLU/Dice slopes away from their initial values and scale up
    // embeddings so that every path carries signal.
    model.visit_mut("", &mut |name, p| {
        if name.ends_with("alpha") {
            p.value
                .iter_mut()
                .enumerate()
                .for_each(|(i, a)| *a = 0.1 + 0.05 * (i % 5) as f32);
        }
        if name.starts_with("embeddings") {
            p.value.iter_mut().for_each(|v| *v *= 10.0);
        }
    });
    let (logits, mut cache) = model.forward(&batch, Mode::Train, None);
    let mut dlogits = Vec::new();
    bce_with_logits(&logits, &batch.labels, &mut dlogits);
    dlogits.iter_mut().for_each(|d| *d *= batch.rows as f32);
    model.zero_grad();
    let emb = model.backward(&batch, &mut cache, &dlogits);

    // Every id the batch looks up, and no other, has a gradient row.
    for (t, g) in layout.tables.iter().enumerate().map(|(t, _)| t).zip(&emb) {
        let mut want = std::collections::BTreeSet::new();
        for (f, s) in layout.sparse.iter().enumerate() {
            if s.table == t {
                want.extend(batch.sparse[f].iter().copied());
            }
        }
        for (f, s) in layout.sequences.iter().enumerate() {
            if s.table == t {
                want.extend(batch.sequences[f].values.iter().copied());
            }
        }
        let got: std::collections::BTreeSet<u32> = g.ids.iter().copied().collect();
        assert_eq!(got, want, "table {t}");
    }
    // (name, index, analytic)
    let mut cases: Vec<(String, usize, f32)> = Vec::new();
    model.visit("", &mut |name, p| {
        if !p.grad.is_empty() {
            cases.extend(p.grad.iter().enumerate().map(|(i, g)| (name.clone(), i, *g)));
        }
    });
    for (t, g) in layout.tables.iter().zip(&emb) {
        for (k, &id) in g.ids.iter().enumerate() {
            for j in 0..g.dim {
                cases.push((
                    format!("embeddings.{}.weight", t.name),
                    id as usize * g.dim + j,
                    g.grads[k * g.dim + j],
                ));
            }
        }
    }
    let values = |m: &Din, name: &str, i: usize| {
        let mut v = f32::NAN;
        m.visit("", &mut |n, p| {
            if n == name {
                v = p.value[i];
            }
        });
        v
    };
    let fd = |name: &str, i: usize, eps: f32| {
        let mut m = model.clone();
        let v = values(&m, name, i);
        set(&mut m, name, i, v + eps);
        let plus = loss(&m, &batch);
        set(&mut m, name, i, v - eps);
        let minus = loss(&m, &batch);
        (plus - minus) / (2.0 * f64::from(eps))
    };
    let scale = cases.iter().fold(0.0f32, |m, c| m.max(c.2.abs())) as f64;
    let (mut skipped, mut checked) = (0, 0);
    let mut tensors_seen = std::collections::BTreeSet::new();
    for (name, i, analytic) in &cases {
        let (n1, n2) = (fd(name, *i, 2e-3), fd(name, *i, 1e-3));
        let tol = 2e-3 * scale + 1e-3;
        if (n1 - n2).abs() > tol {
            skipped += 1;
            continue;
        }
        checked += 1;
        tensors_seen.insert(name.clone());
        let err = (f64::from(*analytic) - n2).abs();
        assert!(
            err <= tol + 1e-2 * n2.abs(),
            "{attention}/{normalization}/{dnn}: {name}[{i}] analytic {analytic} vs numeric {n2} (scale {scale})"
        );
    }
    assert!(
        skipped * 50 <= cases.len(),
        "too many kinks: {skipped} of {}",
        cases.len()
    );
    assert!(checked > 300, "checked {checked}");
    // Every tensor with a gradient was checked, embeddings of every table included.
    for t in &layout.tables {
        assert!(
            tensors_seen.contains(&format!("embeddings.{}.weight", t.name)),
            "table {}",
            t.name
        );
    }
    assert!(tensors_seen.iter().any(|n| n.starts_with("attention.layers.0")));
    assert!(tensors_seen.iter().any(|n| n.starts_with("dnn.layers.1")));
    assert!(tensors_seen.contains("output.weight"));
}

#[test]
fn whole_model_prelu_no_normalisation() {
    check("prelu", "none", "prelu");
}

#[test]
fn whole_model_dice_softmax() {
    check("dice", "softmax", "dice");
}

#[test]
fn whole_model_sigmoid_attention_relu_free_dnn() {
    check("sigmoid", "none", "sigmoid");
}

#[test]
fn zero_length_history_pools_to_zero_and_still_trains_the_target() {
    let config = common::config("prelu", "softmax", "prelu");
    let layout = common::layout(&config);
    let batch = common::batch();
    let mut model = Din::new(&layout, &config.model, 1).expect("model");
    let (logits, mut cache) = model.forward(&batch, Mode::Train, None);
    assert!(logits.iter().all(|z| z.is_finite()));
    // Sample 2's history is empty: its target item (11) still gets a gradient via the DNN input.
    let emb = model.backward(&batch, &mut cache, &[0.1, 0.1, 0.1, 0.1]);
    let item_table = layout.sparse[1].table;
    assert!(emb[item_table].get(11).is_some_and(|g| g.iter().any(|v| *v != 0.0)));
    // Rows never looked up get no gradient (sparse updates).
    assert!(emb[item_table].get(0).is_none());
}
