//! Kill and resume: a real `din train` process is SIGKILLed at six points
//! (between checkpoints, during a checkpoint's writes, before the model
//! directory's save at an epoch end), then `din train --resume` finishes the
//! run; every resumed run's `model.safetensors` and `config.json` are
//! byte-identical to those of the uninterrupted run. One run is killed
//! twice: once fresh, once resumed.
//!
//! The points come from the hidden `DIN_TEST_PAUSE_AT` variable: the process
//! prints `paused at ...` there and sleeps until the test kills it.

#![cfg(unix)]

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

/// A small model with dropout and Dice (random and running state to
/// restore), 16 batches an epoch, a checkpoint every 5 batches and at each
/// epoch end: checkpoints 5, 10, 15, 16, 20, 25, 30, 32, 35, 40, 45, 48.
const TRAIN: [&str; 18] = [
    "train",
    "--threads",
    "2",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--checkpoint-every",
    "5",
    "--set",
    "model.attention.hidden_units=[16,8]",
    "--set",
    "model.dnn.hidden_units=[16]",
    "--set",
    "model.dnn.dropout=0.2",
    "--set",
    "model.dnn.activation=dice",
    "--keep",
];

fn din(cwd: &Path, args: &[OsString], pause: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_din"));
    cmd.args(args).current_dir(cwd).env_remove("RUST_LOG");
    match pause {
        Some(p) => cmd.env("DIN_TEST_PAUSE_AT", p),
        None => cmd.env_remove("DIN_TEST_PAUSE_AT"),
    };
    cmd
}

fn train_args(out: &str) -> Vec<OsString> {
    TRAIN
        .iter()
        .copied()
        .chain(["last", "--out", out])
        .map(OsString::from)
        .collect()
}

fn resume_args(dir: &str) -> Vec<OsString> {
    ["train", "--resume", dir].into_iter().map(OsString::from).collect()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `args` paused at `at`, waits for it to get there, and kills it
/// with SIGKILL.
fn kill_at(cwd: &Path, args: &[OsString], at: &str) {
    let mut child = din(cwd, args, Some(at))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn din");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    let paused = BufReader::new(stderr).lines().map_while(|l| l.ok()).any(|line| {
        seen.push(line.clone());
        line.starts_with("paused at")
    });
    // SIGKILL: nothing of the process runs after this.
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(paused, "{at}: the run never got there; stderr:\n{}", seen.join("\n"));
}

fn files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        fs::read(dir.join("model.safetensors")).expect("weights"),
        fs::read(dir.join("config.json")).expect("config"),
    )
}

#[test]
fn runs_killed_anywhere_resume_to_the_uninterrupted_model_byte_for_byte() {
    let tmp = TempDir::new().expect("tmp");
    let cwd = tmp.path();
    let out = din(cwd, &train_args("ref"), None).output().expect("run");
    assert_ok(&out, "the uninterrupted run");
    let reference = files(&cwd.join("ref"));

    let points = [
        ("batch:7", "between checkpoints 5 and 10"),
        (
            "checkpoint:2:state.json",
            "checkpoint 10: its tensors written, not its state",
        ),
        ("checkpoint:3:rename", "checkpoint 15: staged, not yet in place"),
        (
            "checkpoint:5:prune",
            "checkpoint 20: in place, the old ones not yet removed",
        ),
        ("epoch:2", "before the model directory's save after epoch 2"),
        (
            "checkpoint:12:state.safetensors",
            "the final epoch-end checkpoint, before a byte of it",
        ),
    ];
    for (k, (at, what)) in points.iter().enumerate() {
        let name = format!("k{k}");
        kill_at(cwd, &train_args(&name), at);
        let out = din(cwd, &resume_args(&name), None).output().expect("resume");
        assert_ok(&out, what);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("resuming "), "{what}: {text}");
        assert!(
            files(&cwd.join(&name)) == reference,
            "{what} ({at}): the resumed model differs"
        );
        let left: Vec<String> = fs::read_dir(cwd.join(format!("{name}.checkpoints")))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{what}: the last two checkpoints, no staging: {left:?}");
    }

    // Killed twice: fresh at batch 12, resumed and killed again at batch 37.
    kill_at(cwd, &train_args("twice"), "batch:12");
    kill_at(cwd, &resume_args("twice"), "batch:37");
    let out = din(cwd, &resume_args("twice.checkpoints"), None)
        .output()
        .expect("resume");
    assert_ok(&out, "killed twice");
    assert!(
        files(&cwd.join("twice")) == reference,
        "killed twice: the model differs"
    );
}

#[test]
fn resume_errors_name_the_folder_and_what_to_do() {
    let tmp = TempDir::new().expect("tmp");
    let cwd = tmp.path();
    let out = din(cwd, &resume_args("nothing"), None).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nothing.checkpoints") && err.contains("no checkpoint to resume from"),
        "{err}"
    );
    // The run's own config and data: overriding them is refused.
    let mut args = resume_args("nothing");
    args.extend(["--epochs", "5"].map(OsString::from));
    let out = din(cwd, &args, None).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--epochs"), "{err}");
    // An interrupted run is not silently replaced by a new one.
    kill_at(cwd, &train_args("m"), "batch:7");
    let out = din(cwd, &train_args("m"), None).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unfinished run") && err.contains("--resume m.checkpoints"),
        "{err}"
    );
}
