//! Running an exported ONNX file in ONNX Runtime through
//! `tests/python/check_onnx.py` when `DIN_ONNX_PYTHON` names a Python that
//! has onnxruntime and onnx (`.ci/run` makes one). Shared by din's and the
//! `din` binary's tests (included with `#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use din::export::{FeedValues, OnnxFeed, ATTENTION, PROBABILITY};
use serde_json::{json, Value};

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

/// What ONNX Runtime gave: (probability `[B]`, attention `[B, T]`
/// flattened, T).
pub type Outputs = (Vec<f32>, Vec<f32>, usize);

/// Writes the case for `check_onnx.py` (the file, the feeds, the expected
/// outputs, flattened) and runs it with `python`: the ONNX checker, then
/// ONNX Runtime, whose outputs must match `outputs` to `tolerance`
/// (relative above 1). Fails with its report; returns what it computed.
pub fn check_in_onnxruntime(
    python: &Path,
    name: &str,
    bytes: &[u8],
    feeds: &[OnnxFeed],
    outputs: &[(&str, &[f32])],
    tolerance: f64,
) -> Outputs {
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
    let got: Value = serde_json::from_slice(&std::fs::read(dir.path().join("got.json")).unwrap()).unwrap();
    // Each output's values (exact: f32 written as f64) and shape.
    let values = |k: &str| -> (Vec<f32>, Vec<usize>) {
        let o = &got[k];
        let read = |f: &str| o[f].clone();
        (
            serde_json::from_value(read("data")).unwrap(),
            serde_json::from_value(read("shape")).unwrap(),
        )
    };
    let (p, p_shape) = values(PROBABILITY);
    let (a, a_shape) = values(ATTENTION);
    assert_eq!(p_shape, [feeds[0].shape[0]], "{PROBABILITY} is [batch]");
    assert_eq!(a_shape.len(), 2, "{ATTENTION} is [batch, T]");
    (p, a, a_shape[1])
}
