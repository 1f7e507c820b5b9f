//! ONNX export (issue 14): the exported inference graph, run by tract (and
//! by ONNX Runtime from Python when `DIN_ONNX_PYTHON` names a Python that
//! has it), gives what `Din::predict_with_weights` gives, for every
//! activation, normalisation and pooling, with padding, empty histories and
//! a mean-pooled sequence.

mod common;
#[path = "common/onnx.rs"]
mod onnx_support;

use din::data::Batch;
use din::export::{onnx_feeds, onnx_inputs, to_onnx, OnnxFeed, OnnxInputKind, ATTENTION, PROBABILITY};
use din::model::{Din, Module, Role};
use din::schema::{Config, Pooling};
use onnx_support::{check_in_onnxruntime, python, run_tract};
use rand::{Rng, SeedableRng};
use tract_onnx::prelude::Framework;

/// Gives every bias, slope and Dice statistic a random value (they start at
/// 0, 0 or 1), so that each of them shows in the output.
fn randomize(model: &mut Din, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    model.visit_mut("", &mut |name, p| match p.role {
        Role::Bias | Role::Alpha => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-0.5..0.5)),
        Role::Statistic if name.contains("var") => p.value.iter_mut().for_each(|v| *v = rng.gen_range(0.2..3.0)),
        Role::Statistic => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0)),
        _ => {}
    });
}

/// Checks the graph against din on `batch`: probabilities to `1e-5`,
/// attention weights to `1e-5` relative, and exactly 0 at padding. Returns
/// the feeds and din's outputs for the ONNX Runtime check.
fn check(name: &str, model: &Din, batch: &Batch, bytes: &[u8], extra: usize) -> (Vec<OnnxFeed>, Vec<f32>, Vec<f32>) {
    let (want_p, want_w) = model.predict_with_weights(batch);
    let feeds = onnx_feeds(model, batch, extra);
    let (p, a, t) = run_tract(bytes, &feeds);
    for (r, (x, y)) in p.iter().zip(&want_p).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5,
            "{name}: probability of row {r}: onnx {x}, din {y}"
        );
    }
    let h = model.layout.pairs[0].1;
    let mut k = 0;
    let mut want_a = vec![0.0f32; batch.rows * t];
    for r in 0..batch.rows {
        let len = batch.history(h, r).len();
        for i in 0..t {
            let x = a[r * t + i];
            if i < len {
                let y = want_w[k];
                want_a[r * t + i] = y;
                k += 1;
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{name}: attention of row {r} position {i}: onnx {x}, din {y}"
                );
            } else {
                assert_eq!(x, 0.0, "{name}: row {r} position {i} is padding");
            }
        }
    }
    assert_eq!(k, want_w.len(), "{name}: every behaviour's weight");
    (feeds, want_p, want_a)
}

fn model_for(config: &Config, seed: u64) -> Din {
    let layout = common::layout(config);
    let mut model = Din::new(&layout, &config.model, seed).unwrap();
    randomize(&mut model, seed + 100);
    model
}

#[test]
fn the_exported_graph_scores_like_din_for_every_activation_normalisation_and_pooling() {
    let python = python();
    let batch = common::batch(); // four samples, one with an empty history
    let cases = [
        ("prelu", "none", "prelu", Pooling::Attention),
        ("dice", "softmax", "dice", Pooling::Attention),
        ("dice", "none", "relu", Pooling::Attention),
        ("sigmoid", "softmax", "sigmoid", Pooling::Attention),
        ("relu", "none", "dice", Pooling::Attention),
        ("prelu", "none", "prelu", Pooling::Sum),
    ];
    for (i, (att, norm, dnn, pooling)) in cases.into_iter().enumerate() {
        let mut config = common::config(att, norm, dnn);
        config.model.attention.pooling = pooling;
        let name = format!("{att}/{norm}/{dnn}/{pooling:?}");
        let model = model_for(&config, i as u64);
        let bytes = to_onnx(&model, &[("din.case", &name)]).unwrap();
        // Exactly as long as the longest history, then with 3 padding
        // positions more: the lengths are dynamic.
        check(&name, &model, &batch, &bytes, 0);
        let (feeds, p, a) = check(&name, &model, &batch, &bytes, 3);
        if let Some(py) = &python {
            check_in_onnxruntime(py, &name, &bytes, &feeds, &[(PROBABILITY, &p), (ATTENTION, &a)], 1e-5);
        }
    }
}

#[test]
fn the_batch_is_dynamic_from_one_sample_to_many() {
    let config = common::config("dice", "softmax", "prelu");
    let model = model_for(&config, 7);
    let bytes = to_onnx(&model, &[]).unwrap();
    let base = common::batch();
    for rows in [vec![1], vec![2], vec![3, 0, 1, 2, 1, 0, 3, 3, 2]] {
        check(&format!("rows {rows:?}"), &model, &base.gather(&rows), &bytes, 1);
    }
}

#[test]
fn the_file_declares_its_inputs_outputs_opset_and_metadata() {
    let config = common::config("prelu", "none", "prelu");
    let model = model_for(&config, 1);
    let bytes = to_onnx(&model, &[("din.version", "abc")]).unwrap();
    let m = tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]).unwrap();
    assert_eq!(m.ir_version, din::export::IR_VERSION);
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(m.opset_import[0].version, din::export::OPSET);
    assert!(m
        .metadata_props
        .iter()
        .any(|p| p.key == "din.version" && p.value == "abc"));
    let g = m.graph.unwrap();
    let names: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        ["user", "item", "cate", "price", "hist_items", "hist_cates", "tags"],
        "sparse, dense, then sequences, each in schema order"
    );
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs, [PROBABILITY, ATTENTION]);
    let lens: Vec<String> = onnx_inputs(&model)
        .into_iter()
        .filter_map(|i| match i.kind {
            OnnxInputKind::Sequence { len } => Some(len),
            _ => None,
        })
        .collect();
    assert_eq!(lens, ["history_len", "history_len", "tags_len"]);
}
