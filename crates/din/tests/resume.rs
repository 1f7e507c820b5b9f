//! Training checkpoints: a run resumed from any of its checkpoints ends with
//! bitwise the model of the uninterrupted run, for every optimizer, with
//! dropout, Dice statistics, shuffling and best-epoch tracking; a write
//! interrupted at any step leaves whole checkpoints only; damaged
//! checkpoints and changed data are refused with the file named.

use std::fs;
use std::path::{Path, PathBuf};

use din::model::{Din, Module};
use din::schema::{Config, EarlyStoppingConfig, Monitor, OptimizerKind};
use din::train::{checkpoints, fit, fit_with, load_training_data, Checkpoints, Observer, Silent, TrainOutcome};
use din::{Error, Result};

fn config(optimizer: OptimizerKind) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml");
    let mut c = Config::from_toml_file(&path).expect("bundled config");
    c.model.attention.hidden_units = vec![8];
    c.model.dnn.hidden_units = vec![8];
    c.model.dnn.activation = din::schema::ActivationKind::Dice;
    c.model.dnn.dropout = 0.3;
    c.train.optimizer = optimizer;
    c.train.threads = 2;
    c.train.epochs = 3;
    c.train.batch_size = 128;
    c.train.early_stopping = Some(EarlyStoppingConfig {
        monitor: Monitor::ValAuc,
        patience: 5,
        restore_best: true,
    });
    c
}

fn bits(model: &Din) -> Vec<u32> {
    let mut out = Vec::new();
    model.visit("", &mut |_, p| out.extend(p.value.iter().map(|v| v.to_bits())));
    out
}

fn policy(dir: &Path) -> Checkpoints {
    Checkpoints {
        dir: dir.to_path_buf(),
        every: 3,
        keep: 1000,
    }
}

/// The same outcome, timings aside.
fn assert_same(a: &TrainOutcome, b: &TrainOutcome, what: &str) {
    assert!(bits(&a.model) == bits(&b.model), "{what}: the final weights differ");
    assert_eq!(a.history.len(), b.history.len(), "{what}");
    for (x, y) in a.history.iter().zip(&b.history) {
        assert_eq!(
            x.train_loss.to_bits(),
            y.train_loss.to_bits(),
            "{what}: epoch {}",
            x.epoch
        );
        assert_eq!(x.validation, y.validation, "{what}: epoch {}", x.epoch);
    }
    assert_eq!(
        (a.best_epoch, a.model_epoch, a.stopped_early),
        (b.best_epoch, b.model_epoch, b.stopped_early),
        "{what}"
    );
}

/// Resumes from the checkpoint `from`, into a new checkpoints folder.
fn resume(from: &Path, into: &Path) -> TrainOutcome {
    let r = checkpoints::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    let data = load_training_data(&r.config).expect("data");
    fit_with(&data, Some(&policy(into)), Some(r), &mut Silent).expect("resumes")
}

#[test]
fn resuming_from_every_checkpoint_gives_the_uninterrupted_model_bitwise() {
    for optimizer in [OptimizerKind::Adam, OptimizerKind::Adagrad, OptimizerKind::Sgd] {
        let tmp = tempfile::tempdir().expect("tmp");
        let data = load_training_data(&config(optimizer)).expect("data");
        let plain = fit(&data, &mut Silent).expect("trains");
        let root = tmp.path().join("ckpt");
        let checked = fit_with(&data, Some(&policy(&root)), None, &mut Silent).expect("trains");
        assert_same(&plain, &checked, "checkpoints change nothing");
        let all = checkpoints::list(&root).expect("list");
        // 965 rows, 8 batches an epoch, 3 epochs: 7 mid-epoch checkpoints
        // (every 3 batches, none on an epoch's last) and 3 at epoch ends.
        let names: Vec<String> = all
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 10, "{names:?}");
        assert_eq!(names[0], "ckpt-0000000003");
        assert!(names.contains(&"ckpt-0000000008".to_string()), "{names:?}");
        for (k, ckpt) in all.iter().enumerate() {
            let out = resume(ckpt, &tmp.path().join(format!("again-{k}")));
            assert_same(&plain, &out, &format!("{optimizer:?} from {}", ckpt.display()));
        }
    }
}

/// Grouped training (detected groups of 6 and 12 rows, shuffled by group,
/// batches of whole groups, so an epoch's batch count depends on its
/// order): checkpoints are numbered by the batches done, in order, and
/// resuming from any gives the uninterrupted model bitwise.
#[test]
fn grouped_runs_resume_bitwise_from_every_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(OptimizerKind::Adam);
    c.data.group = true;
    c.train.batch_size = 100;
    let data = load_training_data(&c).expect("data");
    assert!(data.train.batch.is_grouped());
    let plain = fit(&data, &mut Silent).expect("trains");
    let root = tmp.path().join("ckpt");
    let checked = fit_with(&data, Some(&policy(&root)), None, &mut Silent).expect("trains");
    assert_same(&plain, &checked, "checkpoints change nothing");
    let all = checkpoints::list(&root).expect("list");
    let done: Vec<u64> = all
        .iter()
        .map(|p| {
            p.file_name().unwrap().to_string_lossy()["ckpt-".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
    // Every 3 batches of the run, and each epoch's end.
    let mut ends = 0;
    for (p, &n) in all.iter().zip(&done) {
        let st = checkpoints::read(p).expect("reads").state;
        assert_eq!(st.batches_before + st.batches_done as u64, n, "{}", p.display());
        if st.epoch_done {
            ends += 1;
        } else {
            assert_eq!(n % 3, 0, "{done:?}");
        }
    }
    assert_eq!(ends, 3, "{done:?}");
    for (k, ckpt) in all.iter().enumerate() {
        let out = resume(ckpt, &tmp.path().join(format!("again-{k}")));
        assert_same(&plain, &out, &format!("grouped, from {}", ckpt.display()));
    }
}

/// Fails the write of checkpoint number `at` (counting from 1) at `step`.
struct Crash {
    at: usize,
    step: &'static str,
    seen: usize,
}

impl Observer for Crash {
    fn on_checkpoint_step(&mut self, step: &str) -> Result<()> {
        if step == "state.safetensors" {
            self.seen += 1;
        }
        if self.seen == self.at && step == self.step {
            return Err(Error::Training(format!("crash before {step}")));
        }
        Ok(())
    }
}

#[test]
fn a_checkpoint_write_interrupted_at_any_step_leaves_whole_checkpoints_to_resume_from() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = load_training_data(&config(OptimizerKind::Adam)).expect("data");
    let plain = fit(&data, &mut Silent).expect("trains");
    for (k, step) in ["state.safetensors", "state.json", "sync", "rename", "prune"]
        .into_iter()
        .enumerate()
    {
        let root = tmp.path().join(format!("crash-{k}"));
        let mut crash = Crash { at: 4, step, seen: 0 };
        let err = fit_with(&data, Some(&policy(&root)), None, &mut crash).expect_err("crashes");
        assert!(err.to_string().contains(step), "{err}");
        // Whole checkpoints only: every one reads back.
        let all = checkpoints::list(&root).expect("list");
        assert_eq!(all.len(), if step == "prune" { 4 } else { 3 }, "{step}: {all:?}");
        for c in &all {
            checkpoints::read(c).unwrap_or_else(|e| panic!("{step}: {e}"));
        }
        let (latest, damaged) = checkpoints::latest(&root).expect("reads").expect("one");
        assert!(damaged.is_empty());
        let out = resume(&latest.path, &root);
        assert_same(&plain, &out, step);
        // The staging folder of the crashed write is gone after the resumed run.
        let left: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{step}: {left:?}");
    }
}

/// A hand edit of a checkpoint's `state.json`.
type Edit = fn(&mut serde_json::Value);

fn newest(root: &Path) -> PathBuf {
    checkpoints::list(root).expect("list").pop().expect("one")
}

#[test]
fn damaged_checkpoints_are_refused_and_the_previous_one_is_used() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("ckpt");
    let data = load_training_data(&config(OptimizerKind::Adam)).expect("data");
    let mut crash = Crash {
        at: 6,
        step: "state.safetensors",
        seen: 0,
    };
    fit_with(&data, Some(&policy(&root)), None, &mut crash).expect_err("stops");
    let last = newest(&root);
    let tensors = last.join(checkpoints::STATE_TENSORS);
    let mut bytes = fs::read(&tensors).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    fs::write(&tensors, &bytes).expect("write");
    let (r, damaged) = checkpoints::latest(&root).expect("reads").expect("one");
    assert_ne!(r.path, last, "the damaged one is skipped");
    assert_eq!(damaged.len(), 1);
    let msg = damaged[0].to_string();
    assert!(msg.contains("state.safetensors") && msg.contains("damaged"), "{msg}");

    let cases: [(&str, Edit, &str); 4] = [
        (
            "version",
            |v| v["checkpoint_version"] = 99.into(),
            "checkpoint_version 99",
        ),
        ("position", |v| v["rng_positions"][1] = "x".into(), "rng_positions[1]"),
        (
            "best",
            |v| v["has_best"] = (!v["has_best"].as_bool().unwrap()).into(),
            "best.",
        ),
        (
            "config",
            |v| v["config"]["model"]["dnn"]["hidden_units"] = serde_json::json!([9]),
            "shape",
        ),
    ];
    for (what, edit, expected) in cases {
        let dir = tmp.path().join(what);
        fs::create_dir(&dir).expect("mkdir");
        for f in [checkpoints::STATE_TENSORS, checkpoints::STATE_JSON] {
            fs::copy(r.path.join(f), dir.join(f)).expect("copy");
        }
        let json = dir.join(checkpoints::STATE_JSON);
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&json).expect("read")).expect("json");
        edit(&mut v);
        fs::write(&json, serde_json::to_vec(&v).expect("json")).expect("write");
        let err = checkpoints::read(&dir).expect_err(what).to_string();
        assert!(err.contains(expected), "{what}: {err}");
    }
    fs::remove_file(r.path.join(checkpoints::STATE_TENSORS)).expect("rm");
    let err = checkpoints::read(&r.path).expect_err("missing").to_string();
    assert!(err.contains("state.safetensors"), "{err}");
}

#[test]
fn a_run_refuses_changed_data_and_a_new_run_refuses_to_replace_an_unfinished_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("rows.txt");
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/movie_sample.txt");
    fs::copy(&bundled, &file).expect("copy");
    let mut c = config(OptimizerKind::Adam);
    c.data.train = Some(file.clone());
    let root = tmp.path().join("ckpt");
    let data = load_training_data(&c).expect("data");
    let mut crash = Crash {
        at: 2,
        step: "state.safetensors",
        seen: 0,
    };
    fit_with(&data, Some(&policy(&root)), None, &mut crash).expect_err("stops");
    let err = fit_with(&data, Some(&policy(&root)), None, &mut Silent)
        .expect_err("unfinished")
        .to_string();
    assert!(err.contains("unfinished run") && err.contains("--resume"), "{err}");

    let mut text = fs::read_to_string(&file).expect("read");
    text = text.replacen("\t1\n", "\t0\n", 1);
    fs::write(&file, text).expect("write");
    let (r, _) = checkpoints::latest(&root).expect("reads").expect("one");
    let data = load_training_data(&r.config).expect("data");
    let err = fit_with(&data, Some(&policy(&root)), Some(r), &mut Silent)
        .expect_err("changed")
        .to_string();
    assert!(
        err.contains("rows.txt") && err.contains("changed since the run started"),
        "{err}"
    );

    // A finished run's checkpoints are replaced by a new run's.
    fs::copy(&bundled, &file).expect("restore");
    let (r, _) = checkpoints::latest(&root).expect("reads").expect("one");
    let data = load_training_data(&r.config).expect("data");
    fit_with(&data, Some(&policy(&root)), Some(r), &mut Silent).expect("finishes");
    let before = checkpoints::list(&root).expect("list").len();
    assert!(before > 0);
    let mut short = c.clone();
    short.train.epochs = 1;
    let data = load_training_data(&short).expect("data");
    fit_with(&data, Some(&policy(&root)), None, &mut Silent).expect("a new run");
    let names: Vec<PathBuf> = checkpoints::list(&root).expect("list");
    assert_eq!(names.len(), 3, "only the new run's: {names:?}");
}
