//! ONNX export (issue 14): the exported inference graph, run by ONNX
//! Runtime from Python when `DIN_ONNX_PYTHON` names a Python that has it
//! (`.ci/run` makes one; the check says `skipped` otherwise), gives what
//! `Din::predict_with_weights` gives, for every activation, normalisation
//! and pooling, with padding, empty histories and a mean-pooled sequence;
//! and the file declares what it should (read with din's own protobuf
//! types, everywhere).

use std::path::Path;

mod common;
#[path = "common/onnx.rs"]
mod onnx_support;
/// The ONNX messages din writes with, read back here.
#[allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]
#[path = "../src/export/pb.rs"]
mod pb;

use din::data::Batch;
use din::export::{onnx_feeds, onnx_inputs, to_onnx, OnnxInputKind, ATTENTION, PROBABILITY};
use din::model::Din;
use din::schema::{Config, Pooling};
use onnx_support::{check_in_onnxruntime, python};
use prost::Message;

/// Checks the graph in ONNX Runtime against din on `batch`, fed with
/// `extra` padding positions past the longest history: probabilities to
/// `1e-5`, attention weights to `1e-5` relative, and exactly 0 at padding.
fn check(python: &Path, name: &str, model: &Din, batch: &Batch, bytes: &[u8], extra: usize) {
    let (want_p, want_w) = model.predict_with_weights(batch);
    let feeds = onnx_feeds(model, batch, extra);
    let (p, a, t) = check_in_onnxruntime(python, name, bytes, &feeds, &[(PROBABILITY, &want_p)], 1e-5);
    assert_eq!(p.len(), want_p.len(), "{name}: a probability per row");
    for (r, (x, y)) in p.iter().zip(&want_p).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5,
            "{name}: probability of row {r}: onnx {x}, din {y}"
        );
    }
    let h = model.layout.pairs[0].1;
    let mut k = 0;
    assert_eq!(a.len(), batch.rows * t, "{name}: {ATTENTION} is [batch, T]");
    for r in 0..batch.rows {
        let len = batch.history(h, r).len();
        for i in 0..t {
            let x = a[r * t + i];
            if i < len {
                let y = want_w[k];
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
}

fn model_for(config: &Config, seed: u64) -> Din {
    let layout = common::layout(config);
    let mut model = Din::new(&layout, &config.model, seed).unwrap();
    common::randomize(&mut model, seed + 100);
    model
}

#[test]
fn the_exported_graph_scores_like_din_for_every_activation_normalisation_and_pooling() {
    let python = python();
    let batch = common::batch(); // four samples, one with an empty history
    let mut checked = 0;
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
        if let Some(py) = &python {
            // Exactly as long as the longest history, then with 3 padding
            // positions more: the lengths are dynamic.
            check(py, &name, &model, &batch, &bytes, 0);
            check(py, &name, &model, &batch, &bytes, 3);
            checked += 1;
        }
    }
    assert!(python.is_none() || checked == 6);
}

#[test]
fn the_batch_is_dynamic_from_one_sample_to_many() {
    let config = common::config("dice", "softmax", "prelu");
    let model = model_for(&config, 7);
    let bytes = to_onnx(&model, &[]).unwrap();
    let Some(py) = python() else { return };
    let base = common::batch();
    for rows in [vec![1], vec![2], vec![3, 0, 1, 2, 1, 0, 3, 3, 2]] {
        check(&py, &format!("rows {rows:?}"), &model, &base.gather(&rows), &bytes, 1);
    }
}

#[test]
fn the_file_declares_its_inputs_outputs_opset_and_metadata() {
    let config = common::config("prelu", "none", "prelu");
    let model = model_for(&config, 1);
    let bytes = to_onnx(&model, &[("din.version", "abc")]).unwrap();
    let m = pb::ModelProto::decode(&bytes[..]).unwrap();
    assert_eq!(m.ir_version, Some(din::export::IR_VERSION));
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(m.opset_import[0].version, Some(din::export::OPSET));
    assert!(m
        .metadata_props
        .iter()
        .any(|p| p.key.as_deref() == Some("din.version") && p.value.as_deref() == Some("abc")));
    let g = m.graph.unwrap();
    let names: Vec<&str> = g.input.iter().map(|i| i.name.as_deref().unwrap_or("")).collect();
    assert_eq!(
        names,
        ["user", "item", "cate", "price", "hist_items", "hist_cates", "tags"],
        "sparse, dense, then sequences, each in schema order"
    );
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_deref().unwrap_or("")).collect();
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
