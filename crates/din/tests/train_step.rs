//! `Din::train_step_into`, the training step that runs the forward and
//! backward passes chunk by chunk in one pass (or, with Dice in the
//! attention unit, the DNN and the loss chunk by chunk between the unit's
//! two passes), in FP32 and in mixed precision: the same logits and
//! gradients as `forward` then `backward` (but for the order of the
//! chunks' sums), bitwise the same whatever the number of threads, and
//! taken only by the models it serves.

mod common;

use din::data::{Batch, Ragged};
use din::model::{Din, EmbeddingGrads, Mode, Module, Precision};
use din::schema::Config;
use din::train::bce_with_logits;
use rand::{Rng, SeedableRng};

/// `samples` random samples for [`common::config`], with histories of 0 to
/// 40 behaviours (a few thousand rows: several chunks).
fn big_batch(samples: usize, seed: u64) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut seq = [Ragged::new(), Ragged::new(), Ragged::new()];
    for _ in 0..samples {
        let len = rng.gen_range(0..=40);
        let items: Vec<u32> = (0..len).map(|_| rng.gen_range(1..12)).collect();
        let cates: Vec<u32> = (0..len).map(|_| rng.gen_range(1..6)).collect();
        let tags: Vec<u32> = (0..rng.gen_range(0..4)).map(|_| rng.gen_range(1..7)).collect();
        seq[0].push(&items);
        seq[1].push(&cates);
        seq[2].push(&tags);
    }
    Batch {
        sparse: vec![
            (0..samples).map(|_| rng.gen_range(1..5)).collect(),
            (0..samples).map(|_| rng.gen_range(1..12)).collect(),
            (0..samples).map(|_| rng.gen_range(1..6)).collect(),
        ],
        dense: vec![(0..2 * samples).map(|_| rng.gen_range(-1.0..1.0)).collect()],
        sequences: seq.into(),
        labels: (0..samples).map(|_| f32::from(rng.gen_bool(0.4))).collect(),
        rows: samples,
        groups: Vec::new(),
        shared_sparse: Vec::new(),
        shared_dense: Vec::new(),
    }
}

/// A model with random weights (large embeddings, so that every layer's
/// inputs vary), training in `precision`.
fn model_in(config: &Config, seed: u64, precision: Precision) -> Din {
    let mut m = model(config, seed);
    m.set_training_precision(precision);
    m
}

fn model(config: &Config, seed: u64) -> Din {
    let layout = common::layout(config);
    let mut model = Din::new(&layout, &config.model, seed).expect("model");
    common::randomize(&mut model, seed);
    model.visit_mut("", &mut |name, p| {
        if name.starts_with("embeddings") {
            p.value.iter_mut().for_each(|v| *v *= 10.0);
        }
    });
    model
}

/// Logits, every dense gradient (by name) and the embedding gradients.
type Step = (Vec<f32>, Vec<(String, Vec<f32>)>, EmbeddingGrads);

fn dense_grads(model: &Din) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |name, p| {
        if !p.grad.is_empty() {
            out.push((name, p.grad.clone()));
        }
    });
    out
}

/// `forward`, the mean BCE's gradient, then `backward`.
fn two_passes(model: &mut Din, batch: &Batch) -> Step {
    let (logits, mut cache) = model.forward(batch, Mode::Train, None);
    let mut dlogits = Vec::new();
    bce_with_logits(&logits, &batch.labels, &mut dlogits);
    model.zero_grad();
    let emb = model.backward(batch, &mut cache, &dlogits);
    (logits, dense_grads(model), emb)
}

/// The chunked step, after one on another batch with the same buffers
/// (which must not leak into this step).
fn one_pass(model: &mut Din, batch: &Batch) -> Step {
    let (mut cache, mut emb) = (Default::default(), Vec::new());
    model.clone().train_step_into(&big_batch(120, 99), &mut cache, &mut emb);
    model.zero_grad();
    let logits = model.train_step_into(batch, &mut cache, &mut emb).to_vec();
    (logits, dense_grads(model), emb)
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 2e-5 * scale + 1e-7,
            "{what}[{i}]: {x} vs {y} (largest {scale})"
        );
    }
}

#[test]
fn one_step_equals_forward_then_backward() {
    // FP32: PReLU and ReLU run on the fused products (with AVX-512F); a
    // sigmoid DNN on `gemm`'s; Dice in the unit takes its two passes
    // around the chunked DNN. Mixed precision: every product on the step's
    // bf16 weights (on whichever bf16 kernel this CPU runs), the same
    // operands rounded the same way as `forward` and `backward` round them.
    let (fp32, bf16) = (Precision::Fp32, Precision::Bf16);
    for (attention, normalization, dnn, precision) in [
        ("prelu", "none", "prelu", fp32),
        ("relu", "softmax", "relu", fp32),
        ("prelu", "none", "sigmoid", fp32),
        ("dice", "softmax", "prelu", fp32),
        ("dice", "none", "relu", fp32),
        ("prelu", "none", "prelu", bf16),
        ("relu", "softmax", "sigmoid", bf16),
        ("dice", "none", "prelu", bf16),
    ] {
        let config = common::config(attention, normalization, dnn);
        for (b, batch) in [common::batch(), big_batch(150, 3)].iter().enumerate() {
            let what = format!("{attention}/{normalization}/{dnn} in {precision:?}, batch {b}");
            let mut m = model_in(&config, 7, precision);
            assert!(m.steps_in_chunks(batch), "{what}: steps in chunks");
            let (logits, dense, emb) = two_passes(&mut m.clone(), batch);
            let (logits2, dense2, emb2) = one_pass(&mut m, batch);
            assert_close(&format!("{what}: logits"), &logits, &logits2);
            assert_eq!(dense.len(), dense2.len());
            for ((name, g), (name2, g2)) in dense.iter().zip(&dense2) {
                assert_eq!(name, name2);
                assert!(g.iter().any(|v| *v != 0.0), "{what}: {name} has a gradient");
                assert_close(&format!("{what}: {name}"), g, g2);
            }
            for (t, (g, g2)) in emb.iter().zip(&emb2).enumerate() {
                assert_eq!(g.ids, g2.ids, "{what}: table {t}'s rows, in order");
                assert_close(&format!("{what}: table {t}"), &g.grads, &g2.grads);
            }
        }
    }
}

/// 400 samples, about 8,000 rows: several chunks a thread, with Dice's
/// larger chunks too; FP32 and mixed precision.
#[test]
fn one_step_does_not_depend_on_the_threads() {
    for (attention, precision) in [
        ("prelu", Precision::Fp32),
        ("dice", Precision::Fp32),
        ("prelu", Precision::Bf16),
        ("dice", Precision::Bf16),
    ] {
        let config = common::config(attention, "none", "prelu");
        threads_agree(&model_in(&config, 3, precision), &big_batch(400, 11));
    }
}

/// Bitwise the same step on 1, 2 and 3 threads.
fn threads_agree(base: &Din, batch: &Batch) {
    let run = |threads: usize| {
        let pool = din::threads::thread_pool(threads).expect("pool");
        pool.install(|| {
            let mut m = base.clone();
            let (logits, dense, emb) = one_pass(&mut m, batch);
            let emb: Vec<(Vec<u32>, Vec<u32>)> = emb
                .iter()
                .map(|g| (g.ids.clone(), g.grads.iter().map(|v| v.to_bits()).collect()))
                .collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            let dense: Vec<(String, Vec<u32>)> = dense.iter().map(|(n, g)| (n.clone(), bits(g))).collect();
            (bits(&logits), dense, emb)
        })
    };
    let one = run(1);
    assert!(one.1.iter().all(|(_, g)| g.iter().any(|&v| v != 0)));
    assert_eq!(one, run(2), "2 threads");
    assert_eq!(one, run(3), "3 threads");
}

#[test]
fn only_models_whose_dnn_sees_each_sample_alone_step_in_chunks() {
    let batch = common::batch();
    let steps = |attention: &str, dnn: &str, edit: &dyn Fn(&mut Config)| {
        let mut config = common::config(attention, "none", dnn);
        edit(&mut config);
        model(&config, 1).steps_in_chunks(&batch)
    };
    assert!(steps("prelu", "prelu", &|_| {}));
    assert!(steps("dice", "relu", &|_| {}));
    // Dice's batch statistics in the DNN couple the samples.
    assert!(!steps("prelu", "dice", &|_| {}));
    // So does dropout's draw, in batch order.
    assert!(!steps("prelu", "prelu", &|c| c.model.dnn.dropout = 0.5));
    // Sum pooling has no unit.
    assert!(!steps("prelu", "prelu", &|c| c.model.attention.pooling =
        din::schema::Pooling::Sum));
    // Mixed precision steps so too, but for Dice in the DNN.
    let bf16 = |attention: &str, dnn: &str| {
        model_in(&common::config(attention, "none", dnn), 1, Precision::Bf16).steps_in_chunks(&batch)
    };
    assert!(bf16("prelu", "prelu") && bf16("dice", "sigmoid"));
    assert!(!bf16("prelu", "dice"));
    // A grouped batch shares each history among its samples.
    let mut grouped = batch.clone();
    grouped.groups = vec![0, 2, 4];
    assert!(!model(&common::config("prelu", "none", "prelu"), 1).steps_in_chunks(&grouped));
}
