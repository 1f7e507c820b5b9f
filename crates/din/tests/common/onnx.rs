//! Running an exported ONNX file: in tract, and in ONNX Runtime through
//! `tests/python/check_onnx.py` when `DIN_ONNX_PYTHON` names a Python that
//! has onnxruntime and onnx (`.ci/run` makes one). Shared by din's and the
//! `din` binary's tests (included with `#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use din::export::{FeedValues, OnnxFeed, PROBABILITY};
use serde_json::{json, Value};
use tract_onnx::prelude::*;

/// Runs the ONNX bytes on `feeds` with tract: (probability `[B]`,
/// attention `[B, T]` flattened, T).
pub fn run_tract(bytes: &[u8], feeds: &[OnnxFeed]) -> (Vec<f32>, Vec<f32>, usize) {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .expect("tract reads the file")
        .into_optimized()
        .expect("tract optimises the graph")
        .into_runnable()
        .expect("tract plans the graph");
    let inputs: TVec<TValue> = feeds
        .iter()
        .map(|f| match &f.values {
            FeedValues::Ids(v) => Tensor::from_shape(&f.shape, v).unwrap().into_tvalue(),
            FeedValues::Floats(v) => Tensor::from_shape(&f.shape, v).unwrap().into_tvalue(),
        })
        .collect();
    let out = model.run(inputs).expect("tract runs the graph");
    let p = out[0].to_plain_array_view::<f32>().unwrap();
    let a = out[1].to_plain_array_view::<f32>().unwrap();
    assert_eq!(p.shape(), &[feeds[0].shape[0]], "{PROBABILITY} is [batch]");
    let t = a.shape()[1];
    (p.iter().copied().collect(), a.iter().copied().collect(), t)
}

/// `DIN_ONNX_PYTHON`, or `None` with a `skipped` line.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("DIN_ONNX_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("skipped: the ONNX Runtime check (set DIN_ONNX_PYTHON to a Python with onnxruntime and onnx; .ci/run does)");
            None
        }
    }
}

/// Writes the case for `check_onnx.py` (the file, the feeds, the expected
/// outputs, flattened) and runs it with `python`; fails with its report.
pub fn check_in_onnxruntime(
    python: &Path,
    name: &str,
    bytes: &[u8],
    feeds: &[OnnxFeed],
    outputs: &[(&str, &[f32])],
    tolerance: f64,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.onnx"), bytes).unwrap();
    let inputs: serde_json::Map<String, Value> = feeds
        .iter()
        .map(|f| {
            let v = match &f.values {
                FeedValues::Ids(v) => json!({"dtype": "int64", "shape": f.shape, "data": v}),
                FeedValues::Floats(v) => json!({"dtype": "float32", "shape": f.shape, "data": v}),
            };
            (f.name.clone(), v)
        })
        .collect();
    let outputs: serde_json::Map<String, Value> = outputs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let case = json!({"name": name, "inputs": inputs, "outputs": outputs, "tolerance": tolerance});
    std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/check_onnx.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .expect("cannot run DIN_ONNX_PYTHON");
    assert!(
        out.status.success(),
        "{name}: the onnxruntime check failed\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
}
