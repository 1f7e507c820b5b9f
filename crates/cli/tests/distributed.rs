//! `din train --distributed`: as one rank it writes byte for byte the
//! model `din train` writes; under `mpirun` (a din built with the `mpi`
//! feature, OpenMPI installed) 2 and 3 ranks write the single process's
//! model up to the order of float sums, and `din evaluate` reads it as any
//! model directory. The MPI test prints `skipped` and passes where the
//! feature or `mpirun` is absent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use din::model::{Din, Module};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tutorial's model, smaller (attention (32,16)), with dropout and the
/// mini-batch-aware regulariser, one epoch of Adam on one thread per rank.
const SETTINGS: [&str; 14] = [
    "--epochs",
    "1",
    "--threads",
    "1",
    "--set",
    "model.attention.hidden_units=[32,16]",
    "--set",
    "model.dnn.dropout=0.25",
    "--set",
    "train.regularization.kind=\"mini_batch_aware\"",
    "--set",
    "train.regularization.lambda=0.01",
    "--keep",
    "last",
];

fn din_train(out: &Path, distributed: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_din"));
    cmd.arg("train")
        .arg("--config")
        .arg(root().join("configs/movie_sample.toml"))
        .arg("--out")
        .arg(out)
        .args(SETTINGS);
    if distributed {
        cmd.arg("--distributed");
    }
    root_may_run_mpi(&mut cmd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run din")
}

/// OpenMPI refuses to start as root (as CI runs) unless told it may.
fn root_may_run_mpi(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn model(dir: &Path) -> Din {
    din::checkpoint::load_model(dir).expect("a model directory").model
}

#[test]
fn one_rank_writes_byte_for_byte_the_model_of_din_train() {
    if cfg!(feature = "mpi") && which("mpirun").is_none() {
        // A din with MPI started outside mpirun is a singleton MPI job,
        // which OpenMPI starts only where its launcher is installed.
        eprintln!("skipped: built with the mpi feature but mpirun is absent");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("single"), dir.path().join("one-rank"));
    ok(&din_train(&a, false), "din train");
    let out = din_train(&b, true);
    ok(&out, "din train --distributed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("over 1 ranks"), "{text}");
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("model.safetensors");
    assert!(
        read(&a) == read(&b),
        "one rank wrote another model.safetensors than din train"
    );
}

/// `name` on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Largest difference between two models' tensors, relative to each
/// tensor's largest value in `b` (the tolerance of
/// crates/din/tests/distributed.rs, which explains it).
fn largest_difference(a: &Din, b: &Din) -> (f32, String) {
    let mut wb = Vec::new();
    b.visit("", &mut |n, p| wb.push((n, p.value.clone())));
    let mut worst = (0.0f32, String::new());
    let mut i = 0;
    a.visit("", &mut |name, p| {
        let y = &wb[i].1;
        i += 1;
        let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = p
            .value
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs() / scale)
            .fold(0.0f32, f32::max);
        if d > worst.0 {
            worst = (d, name);
        }
    });
    worst
}

#[test]
fn mpirun_with_2_and_3_ranks_writes_the_single_process_model() {
    if !cfg!(feature = "mpi") {
        eprintln!(
            "skipped: din was built without the mpi feature (cargo test -p din-cli --features mpi --test distributed)"
        );
        return;
    }
    let Some(mpirun) = which("mpirun") else {
        eprintln!("skipped: mpirun is absent (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("single");
    ok(&din_train(&single, false), "din train");
    let expected = model(&single);
    for n in [2, 3] {
        let out_dir = dir.path().join(format!("ranks{n}"));
        let mut train = Command::new(env!("CARGO_BIN_EXE_din"));
        train
            .arg("train")
            .arg("--config")
            .arg(root().join("configs/movie_sample.toml"));
        train.arg("--out").arg(&out_dir).args(SETTINGS).arg("--distributed");
        let mut cmd = Command::new(&mpirun);
        // Root in CI; more ranks than cores; no core binding on a shared machine.
        cmd.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-np",
            &n.to_string(),
        ])
        .arg(train.get_program())
        .args(train.get_args())
        .env_remove("RUST_LOG");
        let out = cmd.output().expect("run mpirun");
        ok(&out, &format!("mpirun -np {n} din train --distributed"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("over {n} ranks")), "{text}");
        // Rank 0 prints every rank's traffic.
        assert!(text.contains("dense B/step"), "{text}");
        let (d, name) = largest_difference(&model(&out_dir), &expected);
        eprintln!("{n} ranks over MPI: largest difference {d:e} of the tensor's scale, in {name}");
        assert!(d <= 1e-4, "{n} ranks: {name} differs by {d:e} of its scale");
        // One ordinary model directory: din evaluate reads it.
        let eval = Command::new(env!("CARGO_BIN_EXE_din"))
            .args(["evaluate", "--model"])
            .arg(&out_dir)
            .arg("--json")
            .output()
            .expect("din evaluate");
        ok(&eval, "din evaluate");
    }
}
