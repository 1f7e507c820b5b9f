//! Training checkpoints: everything a run needs to continue after a crash,
//! so that a resumed run ends with bitwise the model an uninterrupted one
//! would (same seed, same thread count).
//!
//! A checkpoint is a folder `ckpt-<batches done, 10 digits>` in the
//! checkpoints folder, holding
//! - `state.safetensors`: the weights (`model.*`, with Dice's running
//!   statistics), the best epoch's weights when the run keeps them
//!   (`best.*`), the optimizer's moments (`optimizer.<param>.m`, `.v`, or
//!   `.accumulator`, whole tables for the lazily updated embeddings) and the
//!   epoch's shuffled row order (`order`, U32);
//! - `state.json`: the frozen config, where the run is (epoch, batch, the
//!   loss so far), the optimizer's step count, both random streams'
//!   positions, the early-stopping tracker, the history, fingerprints of
//!   the data files, and the fingerprint of `state.safetensors`.
//!
//! Each is written into a hidden staging folder, fsynced, and renamed into
//! place, so a crash leaves whole checkpoints only; the last
//! `train.keep_checkpoints` are kept.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::{EarlyStopping, Optimizer};
use crate::checkpoint::{
    f32_bytes, fill_params, fingerprint, push_params, sync_dir, tensor_file, write_files, EpochReport, RawTensor,
};
use crate::model::Din;
use crate::schema::{Config, TrainConfig};
use crate::{Error, Result};

/// The tensors file of a checkpoint.
pub const STATE_TENSORS: &str = "state.safetensors";
/// The JSON file of a checkpoint.
pub const STATE_JSON: &str = "state.json";
/// Version of the checkpoint format.
pub const CHECKPOINT_VERSION: u32 = 1;
/// The start of every checkpoint folder's name.
const PREFIX: &str = "ckpt-";

/// Where and how often a run writes checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoints {
    /// The checkpoints folder (created when needed).
    pub dir: PathBuf,
    /// Write one every this many training batches, and at each epoch end
    /// (0: at epoch ends only).
    pub every: usize,
    /// Keep the newest this many (at least 1).
    pub keep: usize,
}

impl Checkpoints {
    /// `train.checkpoint_every` and `train.keep_checkpoints` of `config`, in
    /// `dir`; `None` when `keep_checkpoints` is 0 (checkpoints off).
    pub fn from_config(dir: impl Into<PathBuf>, config: &TrainConfig) -> Option<Checkpoints> {
        (config.keep_checkpoints > 0).then(|| Checkpoints {
            dir: dir.into(),
            every: config.checkpoint_every,
            keep: config.keep_checkpoints,
        })
    }

    /// The checkpoints folder of the model directory `model_dir`: its
    /// sibling `<name>.checkpoints` (a save replaces the model directory
    /// as a whole, so checkpoints cannot live inside it).
    pub fn dir_for(model_dir: &Path) -> PathBuf {
        let name = model_dir.file_name().unwrap_or_default().to_string_lossy();
        model_dir.with_file_name(format!("{name}.checkpoints"))
    }
}

/// A data file as it was when the run started: a resumed run must read
/// the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// FNV-1a 64 of its contents.
    pub fingerprint: String,
}

impl DataFingerprint {
    /// Reads `path` through once.
    pub fn of(path: &Path) -> Result<DataFingerprint> {
        let mut reader = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        let mut h = crate::checkpoint::Fnv::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| Error::io(path, "cannot read", e))?;
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
            bytes += n as u64;
        }
        Ok(DataFingerprint {
            path: path.to_path_buf(),
            bytes,
            fingerprint: h.hex(),
        })
    }

    /// The training and validation files `config` reads.
    pub fn of_config(config: &Config) -> Result<Vec<DataFingerprint>> {
        config
            .data
            .train
            .iter()
            .chain(&config.data.validation)
            .map(|p| DataFingerprint::of(p))
            .collect()
    }
}

/// Where a run is and everything it carries, at a batch boundary.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// The epoch in progress (1-based); when `epoch_done`, the last one completed.
    pub epoch: usize,
    /// Batches of `epoch` done.
    pub batches_done: usize,
    /// Whether `epoch` has been completed (validated, reported).
    pub epoch_done: bool,
    /// Whether the run has ended (all epochs, or stopped early).
    pub finished: bool,
    /// Whether early stopping ended it.
    pub stopped_early: bool,
    /// Sum of the epoch's batch losses so far.
    pub loss_sum: f64,
    /// Batches of the epoch skipped for a non-finite loss or gradient.
    pub skipped: usize,
    /// Seconds spent in the epoch before the checkpoint.
    pub seconds: f64,
    /// Word positions of the shuffle and dropout random streams.
    pub rng_positions: [u128; 2],
    /// The best-epoch tracker.
    pub tracker: Option<EarlyStopping>,
    /// The reports of the epochs completed.
    pub history: Vec<EpochReport>,
    /// The weights now.
    pub model: Din,
    /// The best epoch's weights (under `train.keep = "best"`).
    pub best_model: Option<Din>,
    /// The optimizer and its moments.
    pub optimizer: Optimizer,
    /// The epoch's row order (of groups, for grouped data: batches keep
    /// them whole); streaming (`data.window_rows`), the window's.
    pub order: Vec<usize>,
    /// Streaming: the window in progress (0-based, in file order); 0 when
    /// the file is held whole.
    pub window: usize,
    /// Batches of the window in progress done (`batches_done` when the
    /// file is held whole).
    pub window_batches_done: usize,
    /// Batches of the epochs before `epoch` (their number depends on the
    /// order when groups of different sizes fill them).
    pub batches_before: u64,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    checkpoint_version: u32,
    din_version: String,
    /// FNV-1a 64 of `state.safetensors`.
    tensors_fingerprint: String,
    data: Vec<DataFingerprint>,
    epoch: usize,
    batches_done: usize,
    /// Absent in checkpoints of before grouped training: then
    /// `(epoch - 1) * ceil(rows / batch_size)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batches_before: Option<u64>,
    /// Streaming only: the window in progress and its batches done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<[usize; 2]>,
    epoch_done: bool,
    finished: bool,
    stopped_early: bool,
    loss_sum: f64,
    skipped: usize,
    seconds: f64,
    optimizer_steps: u64,
    /// As decimal strings (JSON numbers lose precision past 2^53).
    rng_positions: [String; 2],
    tracker: Option<EarlyStopping>,
    history: Vec<EpochReport>,
    has_best: bool,
    config: Config,
}

/// A checkpoint read back: the run's frozen config, the state, and the
/// data fingerprints to check before continuing.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// The config the run was started with (vocabulary sizes frozen).
    pub config: Config,
    /// Where it was.
    pub state: TrainState,
    /// The data files as they were.
    pub data: Vec<DataFingerprint>,
    /// The checkpoint folder read.
    pub path: PathBuf,
}

impl Resumable {
    /// Refuses to continue on data other than the run's: files that
    /// changed since it started (`now`: their fingerprints as read for this
    /// run, in `config` order), or a row count its row order does not fit
    /// (`rows`: the training rows, or groups, held; `None` when streamed,
    /// checked against the window instead).
    pub(crate) fn check_data(&self, now: &[DataFingerprint], rows: Option<usize>) -> Result<()> {
        for (was, now) in self.data.iter().zip(now) {
            if now != was {
                return Err(Error::Checkpoint {
                    path: was.path.clone(),
                    reason: format!(
                        "changed since the run started ({} bytes, fingerprint {}; the checkpoint {} was made on {} bytes, fingerprint {}): a resumed run must read the same rows; restore the file or start a new run",
                        now.bytes,
                        now.fingerprint,
                        self.path.display(),
                        was.bytes,
                        was.fingerprint
                    ),
                });
            }
        }
        let n = self.state.order.len();
        if let Some(rows) = rows.filter(|&r| r != n) {
            return Err(Error::Checkpoint {
                path: self.path.join(STATE_TENSORS),
                reason: format!("its row order has {n} rows, the training data {rows}"),
            });
        }
        Ok(())
    }
}

/// The folder name of the checkpoint after `batches` training batches in all.
fn folder_name(batches: u64) -> String {
    format!("{PREFIX}{batches:010}")
}

/// Writes `state` as a new checkpoint of `policy`, then removes all but the
/// newest `policy.keep`. `step` is called before each write step (a test
/// hook: an error from it stops the write there, as a crash would).
pub(crate) fn write(
    policy: &Checkpoints,
    config: &Config,
    streamed: bool,
    data: &[DataFingerprint],
    state: &TrainState,
    batches_total: u64,
    step: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<PathBuf> {
    let root = &policy.dir;
    fs::create_dir_all(root).map_err(|e| Error::io(root, "cannot create the checkpoints folder", e))?;
    let name = folder_name(batches_total);
    let target = root.join(&name);
    let staging = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let tensors_path = target.join(STATE_TENSORS);
    let mut tensors: Vec<RawTensor> = Vec::new();
    push_params(&mut tensors, "model.", &state.model);
    if let Some(best) = &state.best_model {
        push_params(&mut tensors, "best.", best);
    }
    for (name, values) in state.optimizer.state(&state.model) {
        tensors.push((
            format!("optimizer.{name}"),
            Dtype::F32,
            vec![values.len()],
            f32_bytes(values),
        ));
    }
    let order: Vec<u8> = state
        .order
        .iter()
        .map(|&i| u32::try_from(i))
        .collect::<std::result::Result<Vec<u32>, _>>()
        .map_err(|_| Error::Checkpoint {
            path: tensors_path.clone(),
            reason: "more than 2^32 training rows".into(),
        })?
        .iter()
        .flat_map(|i| i.to_le_bytes())
        .collect();
    tensors.push(("order".into(), Dtype::U32, vec![state.order.len()], order));
    let blob = tensor_file(&tensors, &tensors_path)?;
    let file = StateFile {
        checkpoint_version: CHECKPOINT_VERSION,
        din_version: env!("CARGO_PKG_VERSION").to_string(),
        tensors_fingerprint: fingerprint(&blob),
        data: data.to_vec(),
        epoch: state.epoch,
        batches_done: state.batches_done,
        batches_before: Some(state.batches_before),
        window: streamed.then_some([state.window, state.window_batches_done]),
        epoch_done: state.epoch_done,
        finished: state.finished,
        stopped_early: state.stopped_early,
        loss_sum: state.loss_sum,
        skipped: state.skipped,
        seconds: state.seconds,
        optimizer_steps: state.optimizer.steps(),
        rng_positions: state.rng_positions.map(|p| p.to_string()),
        tracker: state.tracker.clone(),
        history: state.history.clone(),
        has_best: state.best_model.is_some(),
        config: config.clone(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Checkpoint {
        path: target.join(STATE_JSON),
        reason: e.to_string(),
    })?;
    // A folder of this name left by an earlier life of the run (a damaged
    // checkpoint skipped on resuming) or a crashed write is replaced.
    for stale in [&staging, &target] {
        if stale.exists() {
            fs::remove_dir_all(stale).map_err(|e| Error::io(stale, "cannot remove an earlier checkpoint", e))?;
        }
    }
    fs::create_dir(&staging).map_err(|e| Error::io(&staging, "cannot create a checkpoint folder", e))?;
    let files = [(STATE_TENSORS, blob), (STATE_JSON, json)];
    let mut k = 0;
    let written = write_files(&staging, &target, &files, &mut || {
        let what = files.get(k).map_or("sync", |f| f.0);
        k += 1;
        step(what)
    })
    .and_then(|()| step("rename"))
    .and_then(|()| {
        fs::rename(&staging, &target).map_err(|e| Error::io(&target, "cannot move the checkpoint into place", e))
    })
    .and_then(|()| sync_dir(root));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    step("prune")?;
    prune(root, policy.keep.max(1))?;
    Ok(target)
}

/// The checkpoint folders in `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, "cannot list the checkpoints folder", e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(root, "cannot list the checkpoints folder", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let numbered = name
            .strip_prefix(PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if numbered && entry.path().is_dir() {
            found.push(entry.path());
        }
    }
    // Fixed-width numbers: the name order is the step order.
    found.sort();
    Ok(found)
}

/// Removes all but the newest `keep` checkpoints, and the staging folders
/// of crashed writes.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        fs::remove_dir_all(old).map_err(|e| Error::io(old, "cannot remove an old checkpoint", e))?;
    }
    if let Ok(entries) = fs::read_dir(root) {
        let mine = format!(".tmp-{}", std::process::id());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".{PREFIX}")) && !name.ends_with(&mine) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// Removes every checkpoint in `root` (a new run replacing a finished one).
pub fn clear(root: &Path) -> Result<()> {
    prune(root, 0)
}

/// Reads one checkpoint folder, checking its fingerprint, version, config,
/// and every tensor's name, dtype, shape and finiteness.
pub fn read(path: &Path) -> Result<Resumable> {
    let json_path = path.join(STATE_JSON);
    let text = fs::read(&json_path).map_err(|e| Error::io(&json_path, "cannot read the checkpoint", e))?;
    let file: StateFile = serde_json::from_slice(&text).map_err(|e| Error::ConfigSyntax {
        path: json_path.clone(),
        message: e.to_string(),
    })?;
    let bad = |path: &Path, reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    if file.checkpoint_version != CHECKPOINT_VERSION {
        return Err(bad(
            &json_path,
            format!(
                "checkpoint_version {} is not supported (this build reads {CHECKPOINT_VERSION})",
                file.checkpoint_version
            ),
        ));
    }
    let layout = file.config.validate()?;
    let tensors_path = path.join(STATE_TENSORS);
    let blob = fs::read(&tensors_path).map_err(|e| Error::io(&tensors_path, "cannot read the checkpoint", e))?;
    if fingerprint(&blob) != file.tensors_fingerprint {
        return Err(bad(
            &tensors_path,
            format!(
                "fingerprint {} does not match state.json's {}: the checkpoint is damaged",
                fingerprint(&blob),
                file.tensors_fingerprint
            ),
        ));
    }
    let tensors = SafeTensors::deserialize(&blob).map_err(|e| bad(&tensors_path, e.to_string()))?;
    let tc = &file.config.train;
    let fresh = || Din::new(&layout, &file.config.model, tc.seed);
    let mut model = fresh()?;
    let mut names = fill_params(&mut model, &tensors, "model.", &tensors_path)?;
    let best_model = if file.has_best {
        let mut best = fresh()?;
        names.extend(fill_params(&mut best, &tensors, "best.", &tensors_path)?);
        Some(best)
    } else {
        None
    };
    let mut optimizer = Optimizer::new(tc.optimizer, tc.learning_rate, &model);
    optimizer.set_steps(file.optimizer_steps);
    for (name, slot) in optimizer.state_mut(&model) {
        let name = format!("optimizer.{name}");
        let view = tensors
            .tensor(&name)
            .map_err(|_| bad(&tensors_path, format!("tensor `{name}`: missing")))?;
        if view.dtype() != Dtype::F32 || view.shape() != [slot.len()] {
            return Err(bad(
                &tensors_path,
                format!(
                    "tensor `{name}`: {:?} {:?}, expected F32 [{}]",
                    view.dtype(),
                    view.shape(),
                    slot.len()
                ),
            ));
        }
        for (v, b) in slot.iter_mut().zip(view.data().chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        names.push(name);
    }
    let view = tensors
        .tensor("order")
        .map_err(|_| bad(&tensors_path, "tensor `order`: missing".into()))?;
    if view.dtype() != Dtype::U32 || view.shape().len() != 1 {
        return Err(bad(
            &tensors_path,
            "tensor `order`: expected U32 of one dimension".into(),
        ));
    }
    let order: Vec<usize> = view
        .data()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let mut seen = vec![false; order.len()];
    for &i in &order {
        match seen.get_mut(i) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(bad(
                    &tensors_path,
                    format!("tensor `order`: row {i} is out of range or repeated"),
                ))
            }
        }
    }
    names.push("order".into());
    if let Some(extra) = tensors.names().into_iter().find(|n| !names.iter().any(|m| m == *n)) {
        return Err(bad(
            &tensors_path,
            format!("tensor `{extra}` does not belong in this checkpoint"),
        ));
    }
    let position = |i: usize| {
        file.rng_positions[i].parse::<u128>().map_err(|_| {
            bad(
                &json_path,
                format!("rng_positions[{i}] `{}` is not a number", file.rng_positions[i]),
            )
        })
    };
    let state = TrainState {
        epoch: file.epoch,
        batches_done: file.batches_done,
        epoch_done: file.epoch_done,
        finished: file.finished,
        stopped_early: file.stopped_early,
        loss_sum: file.loss_sum,
        skipped: file.skipped,
        seconds: file.seconds,
        rng_positions: [position(0)?, position(1)?],
        tracker: file.tracker,
        history: file.history,
        model,
        best_model,
        optimizer,
        batches_before: file.batches_before.unwrap_or_else(|| {
            let per_epoch = order.len().div_ceil(file.config.train.batch_size.max(1));
            (file.epoch.saturating_sub(1) * per_epoch) as u64
        }),
        order,
        window: file.window.map_or(0, |w| w[0]),
        window_batches_done: file.window.map_or(file.batches_done, |w| w[1]),
    };
    Ok(Resumable {
        config: file.config,
        state,
        data: file.data,
        path: path.to_path_buf(),
    })
}

/// The newest checkpoint in `root` that reads back whole, with the errors
/// of any newer ones that did not (each names its file and the damage).
/// `Ok(None)` when `root` holds no checkpoint.
pub fn latest(root: &Path) -> Result<Option<(Resumable, Vec<Error>)>> {
    let mut damaged = Vec::new();
    for path in list(root)?.into_iter().rev() {
        match read(&path) {
            Ok(r) => return Ok(Some((r, damaged))),
            Err(e) => damaged.push(e),
        }
    }
    match damaged.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(None),
    }
}
