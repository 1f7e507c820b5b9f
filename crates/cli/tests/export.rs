//! `din export --onnx`: a model trained by `din train` and exported gives,
//! in ONNX Runtime (when `DIN_ONNX_PYTHON` is set; `skipped` otherwise),
//! the scores `din predict` writes for the same rows; and the command's
//! errors.

#[path = "../../din/tests/common/onnx.rs"]
mod onnx_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use din::export::{onnx_feeds, PROBABILITY};
use din::scorer::Scorer;
use tempfile::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn din(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_din"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run the din binary")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Trains the tutorial model (2 epochs, with `set` overrides), exports it,
/// predicts the bundled sample, and checks the ONNX file's probabilities
/// against `din predict`'s to 1e-5.
fn trained_export_scores_like_predict(set: &[&str]) {
    let tmp = TempDir::new().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let config = root().join("configs/movie_sample.toml");
    let sample = root().join("data/movie_sample.txt");
    let model = p("model");
    let mut train = vec!["train", "--config", config.to_str().unwrap(), "--out", &model];
    train.extend(["--epochs", "2", "--threads", "1", "--checkpoint-every", "0"]);
    for s in set {
        train.extend(["--set", s]);
    }
    ok(&din(tmp.path(), &train));
    let said = ok(&din(
        tmp.path(),
        &["export", "--onnx", "--model", &p("model"), "--out", &p("model.onnx")],
    ));
    assert!(
        said.contains("hist_movie_id") && said.contains("int64 [batch, history_len]"),
        "{said}"
    );
    ok(&din(
        tmp.path(),
        &[
            "predict",
            "--model",
            &p("model"),
            "--data",
            sample.to_str().unwrap(),
            "--out",
            &p("scores.txt"),
        ],
    ));
    let want: Vec<f32> = std::fs::read_to_string(p("scores.txt"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let bytes = std::fs::read(p("model.onnx")).unwrap();
    assert!(bytes.len() > 1000, "the file holds the model: {} bytes", bytes.len());
    let Some(py) = onnx_support::python() else { return };
    // The rows as din's reader gives them (dense ids, histories without
    // their padding, truncated), fed padded as a DeepCTR user would.
    let scorer = Scorer::load(Path::new(&p("model"))).unwrap();
    let data = scorer.read(&sample, false).unwrap();
    let feeds = onnx_feeds(&scorer.model, &data.batch, 0);
    let name = format!("din export of the tutorial model {set:?}");
    let (got, _, _) = onnx_support::check_in_onnxruntime(&py, &name, &bytes, &feeds, &[(PROBABILITY, &want)], 1e-5);
    assert_eq!(got.len(), want.len());
    for (r, (x, y)) in got.iter().zip(&want).enumerate() {
        assert!((x - y).abs() <= 1e-5, "{set:?}: row {r}: onnx {x}, din predict {y}");
    }
}

#[test]
fn an_exported_tutorial_model_scores_the_sample_like_din_predict() {
    trained_export_scores_like_predict(&[]);
}

#[test]
fn an_exported_dice_model_with_softmax_scores_like_din_predict() {
    // Dice's moving averages after two epochs of training, and the masked softmax.
    trained_export_scores_like_predict(&[
        "model.attention.activation=dice",
        "model.dnn.activation=dice",
        "model.attention.normalization=softmax",
    ]);
}

#[test]
fn export_errors_name_the_problem() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("no-model");
    let out = din(
        tmp.path(),
        &[
            "export",
            "--onnx",
            "--model",
            missing.to_str().unwrap(),
            "--out",
            "x.onnx",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-model") && err.contains("config.json"), "{err}");
    assert!(!tmp.path().join("x.onnx").exists(), "nothing written");
    let out = din(
        tmp.path(),
        &["export", "--model", missing.to_str().unwrap(), "--out", "x.onnx"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--onnx"));
}
