//! The model directory: `config.json` (the resolved config), `model.safetensors`
//! (tensor names are field paths, e.g. `attention.layers.0.weight`),
//! `history.json` (per-epoch metrics) and, when the model has them,
//! `vocab.json` (raw value of every dense id) and `items.json` (the item
//! feature table). A save writes a whole new directory beside the old one
//! and swaps it in (see [`save_with_assets`]), so a crash at any point leaves
//! a complete model, never a half-written one or files from two saves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::data::{ItemTable, SkippedRows, Vocabulary};
use crate::metrics::Metrics;
use crate::model::{Din, Module};
use crate::schema::{Config, Layout};
use crate::{Error, Result};

/// The config file's name.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The training history's file name.
pub const HISTORY_FILE: &str = "history.json";
/// The raw values of the dense ids (see [`Vocabulary`]).
pub const VOCAB_FILE: &str = "vocab.json";
/// The item feature table (see [`ItemTable`]).
pub const ITEMS_FILE: &str = "items.json";
/// Version of the model-directory format: 2 adds `config_fingerprint`;
/// version 1 directories (without it) still load.
pub const FORMAT_VERSION: u32 = 2;

/// What `config.json` holds. Unknown fields are refused: a misspelt or
/// damaged `vocab_fingerprint` would otherwise load the model without its
/// vocabulary (a later format adds fields under a new `format_version`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// [`FORMAT_VERSION`] at save time.
    pub format_version: u32,
    /// The crate version that wrote it.
    pub din_version: String,
    /// FNV-1a 64 of `model.safetensors` as written with this config: loading
    /// refuses a weights file from another save (e.g. a crash between the two
    /// renames of a re-save) or a damaged one.
    pub weights_fingerprint: String,
    /// FNV-1a 64 of `vocab.json`, when the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_fingerprint: Option<String>,
    /// FNV-1a 64 of `items.json`, when the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items_fingerprint: Option<String>,
    /// FNV-1a 64 of `config` as compact JSON: a hand edit of the config
    /// (a pooling, a normalisation, a `max_len`) would load silently and
    /// change every score, so it is refused. Absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_fingerprint: Option<String>,
    /// The resolved configuration (vocabulary sizes frozen).
    pub config: Config,
}

/// What a model directory holds besides the weights, to take requests in
/// an application's raw ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assets {
    /// Raw value of every dense id, for the tables that have them.
    pub vocab: Option<Vocabulary>,
    /// Item features by item (when the schema has `item_feature_of`).
    pub items: Option<ItemTable>,
}

/// What one epoch did (a line of `history.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training BCE over the epoch's batches (without the penalty).
    pub train_loss: f64,
    /// Validation metrics after the epoch.
    pub validation: Option<Metrics>,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_second: f64,
    /// Batches skipped for a loss or gradient that was not finite
    /// (`train.on_non_finite = "skip_batch"`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_batches: usize,
    /// Malformed rows skipped while reading, by data file (with
    /// `data.skip_bad_rows`; in the first epoch's report only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_rows: BTreeMap<String, SkippedRows>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything [`load_model`] reads from a model directory.
#[derive(Debug, Clone)]
pub struct SavedModel {
    /// The resolved configuration.
    pub config: Config,
    /// Its schema.
    pub layout: Layout,
    /// The weights.
    pub model: Din,
    /// Vocabulary and item table.
    pub assets: Assets,
    /// `config.json` as read (fingerprints, versions).
    pub file: ModelFile,
}

/// Writes `model` and `config` (and `history` when given) into `dir`, creating it.
pub fn save(dir: &Path, config: &Config, model: &Din, history: Option<&[EpochReport]>) -> Result<()> {
    save_with_assets(dir, config, model, &Assets::default(), history)
}

/// [`save`] with a vocabulary and an item table. `config.json` holds the
/// fingerprint of every other file, so that a directory whose files come
/// from different saves is refused on loading.
///
/// The directory is replaced as a whole: every file is written and fsynced
/// into a new sibling directory, which then takes the place of the old one
/// (the old one is renamed aside first, and removed last). Whatever step a
/// crash interrupts, [`load_model`] finds a complete model, the old or the
/// new: in the one window where `dir` is absent, it loads the old one from
/// beside it, and the next save puts it back first. A `dir` holding
/// anything but model files is refused, never replaced.
pub fn save_with_assets(
    dir: &Path,
    config: &Config,
    model: &Din,
    assets: &Assets,
    history: Option<&[EpochReport]>,
) -> Result<()> {
    save_steps(dir, config, &mut Whole(model), assets, history, &mut |_| Ok(()))
}

/// Tensors handed to a save in pieces, for a model no one process holds
/// whole (distributed training's sharded tables, see
/// [`save_sharded`](crate::distributed::save_sharded)).
pub trait TensorStream {
    /// Every tensor's name and shape (F32), in any order.
    fn tensors(&self) -> Vec<(String, Vec<usize>)>;
    /// Hands `sink` the values of tensor `name`, in row-major order, in
    /// pieces of any size. Called once per tensor, in the file's order
    /// (sorted by name). An error from `sink` must stop it (it is passed
    /// on).
    fn write(&mut self, name: &str, sink: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>;
}

/// [`save_with_assets`] with the weights streamed: `weights` hands each
/// tensor over in pieces, written to `model.safetensors` as they come, so
/// the save holds no more than a piece. The file is byte for byte the one
/// [`save_with_assets`] writes for a model with those tensors.
pub fn save_streamed(
    dir: &Path,
    config: &Config,
    weights: &mut dyn TensorStream,
    assets: &Assets,
    history: Option<&[EpochReport]>,
) -> Result<()> {
    save_steps(dir, config, weights, assets, history, &mut |_| Ok(()))
}

/// A model held whole, as a [`TensorStream`].
struct Whole<'a>(&'a Din);

impl TensorStream for Whole<'_> {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        self.0
            .visit("", &mut |name, p| out.push((name.to_string(), p.shape.clone())));
        out
    }

    fn write(&mut self, name: &str, sink: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let mut result = Err(Error::Checkpoint {
            path: PathBuf::from(WEIGHTS_FILE),
            reason: format!("the model has no tensor `{name}`"),
        });
        self.0.visit("", &mut |n, p| {
            if n == name {
                result = sink(&p.value);
            }
        });
        result
    }
}

/// Writes `weights` as a safetensors file at `path` (fsynced), tensor by
/// tensor as they come, and returns its [`fingerprint`].
///
/// The header is the `safetensors` crate's own [`Metadata`], built as
/// `safetensors::serialize` builds it (tensors sorted by name, all F32,
/// one `format` metadata key, padded with spaces to 8 bytes), so the file
/// is the one [`tensor_file`] makes; a test holds the two to the same bytes.
/// Hand-written because the crate only writes tensors it holds whole.
fn write_weights(path: &Path, dir: &Path, weights: &mut dyn TensorStream) -> Result<String> {
    let named = dir.join(WEIGHTS_FILE);
    let failed = |reason: String| Error::Checkpoint {
        path: named.clone(),
        reason,
    };
    let mut tensors = weights.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = (shape.iter().try_fold(4usize, |n, &d| n.checked_mul(d)))
            .ok_or_else(|| failed(format!("tensor `{name}` of shape {shape:?} is too large")))?;
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape: shape.clone(),
            data_offsets: (offset, offset + bytes),
        };
        infos.push((name.clone(), info));
        offset += bytes;
    }
    let info = HashMap::from([("format".to_string(), format!("din/{FORMAT_VERSION}"))]);
    let metadata = Metadata::new(Some(info), infos).map_err(|e| failed(e.to_string()))?;
    let mut header = serde_json::to_string(&metadata)
        .map_err(|e| failed(e.to_string()))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let io = |e| Error::io(&named, "cannot write (the previous files are left as they were)", e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    let mut fnv = Fnv::new();
    let mut put = |bytes: &[u8], out: &mut BufWriter<File>| -> Result<()> {
        fnv.write(bytes);
        out.write_all(bytes).map_err(io)
    };
    put(&(header.len() as u64).to_le_bytes(), &mut out)?;
    put(&header, &mut out)?;
    let mut bytes = Vec::new();
    for (name, shape) in &tensors {
        let want: usize = shape.iter().product();
        let mut got = 0usize;
        weights.write(name, &mut |values| {
            got += values.len();
            if got > want {
                return Err(failed(format!("tensor `{name}` was given more than its {want} values")));
            }
            bytes.clear();
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            put(&bytes, &mut out)
        })?;
        if got != want {
            return Err(failed(format!("tensor `{name}` was given {got} of its {want} values")));
        }
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(fnv.hex())
}

/// The files of a model directory (and the temporary files of their writes).
const MODEL_FILES: [&str; 5] = [CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE, VOCAB_FILE, ITEMS_FILE];

/// Where a save stages the new directory and puts the old one aside:
/// hidden siblings of `dir`.
fn siblings(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "a model directory needs a name (not `.`, `..` or `/`): give e.g. `runs/model`".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = dir.parent().unwrap_or(Path::new(""));
    Ok((
        parent.join(format!("{}{}", staging_prefix(&name), std::process::id())),
        parent.join(format!(".{name}.old")),
    ))
}

/// The start of the name of every staging folder of model directory `name`
/// (any process's).
fn staging_prefix(name: &str) -> String {
    format!(".{name}.new-")
}

/// The folder to fsync after renaming an entry of it.
pub(crate) fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "cannot sync folder", e))
}

/// A directory `save` may replace: absent, or holding only model files.
fn check_replaceable(dir: &Path) -> Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(dir, "cannot list the model directory", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "cannot list the model directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours =
            MODEL_FILES.contains(&name.as_str()) || MODEL_FILES.iter().any(|f| name.starts_with(&format!(".{f}.tmp-")));
        if !ours {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds `{name}`, which is not a model file: saving replaces the whole directory, so give --out an empty or new folder"
                ),
            });
        }
    }
    Ok(true)
}

/// [`save_with_assets`], calling `step` before each write step (with its
/// number, from 0); an error from `step` stops the save there, as a crash
/// would, so tests can interrupt every step.
fn save_steps(
    dir: &Path,
    config: &Config,
    weights: &mut dyn TensorStream,
    assets: &Assets,
    history: Option<&[EpochReport]>,
    step: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<()> {
    let (staging, aside) = siblings(dir)?;
    let mut n = 0;
    let mut next = |n: &mut usize| {
        let r = step(*n);
        *n += 1;
        r
    };
    // An earlier save that crashed after putting the old directory aside
    // and before moving the new one in: the old one goes back first.
    if !dir.exists() && aside.join(CONFIG_FILE).exists() {
        fs::rename(&aside, dir).map_err(|e| Error::io(&aside, "cannot restore the model directory", e))?;
    }
    let existed = check_replaceable(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create the parent folder", e))?;
    }
    // Staging folders of saves that crashed (in any process).
    let stale_prefix = staging_prefix(&dir.file_name().unwrap_or_default().to_string_lossy());
    if let Ok(entries) = fs::read_dir(parent_of(dir)) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&stale_prefix) {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|e| Error::io(&path, "cannot remove a stale staging folder", e))?;
            }
        }
    }
    fs::create_dir(&staging).map_err(|e| Error::io(&staging, "cannot create model directory", e))?;
    let result = (|| {
        let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
        let vocab_json = assets.vocab.as_ref().map(Vocabulary::to_json);
        let items_json = match &assets.items {
            Some(items) => Some(serde_json::to_vec(items).map_err(|e| Error::Checkpoint {
                path: dir.join(ITEMS_FILE),
                reason: e.to_string(),
            })?),
            None => None,
        };
        next(&mut n)?;
        let weights_fingerprint = write_weights(&staging.join(WEIGHTS_FILE), dir, weights)?;
        let file = ModelFile {
            format_version: FORMAT_VERSION,
            din_version: env!("CARGO_PKG_VERSION").to_string(),
            weights_fingerprint,
            vocab_fingerprint: vocab_json.as_deref().map(fingerprint),
            items_fingerprint: items_json.as_deref().map(fingerprint),
            config_fingerprint: Some(config_fingerprint(config)?),
            config: config.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Checkpoint {
            path: dir.join(CONFIG_FILE),
            reason: e.to_string(),
        })?;
        files.extend(vocab_json.map(|b| (VOCAB_FILE, b)));
        files.extend(items_json.map(|b| (ITEMS_FILE, b)));
        if let Some(h) = history {
            let h = serde_json::to_vec_pretty(h).map_err(|e| Error::Checkpoint {
                path: dir.join(HISTORY_FILE),
                reason: e.to_string(),
            })?;
            files.push((HISTORY_FILE, h));
        }
        files.push((CONFIG_FILE, json));
        write_files(&staging, dir, &files, &mut || next(&mut n))
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    // The swap. Until the first rename the old directory is untouched;
    // between the two, it is complete beside `dir` (load_model reads it);
    // after the second, the new one is in place.
    next(&mut n)?;
    if existed {
        if aside.exists() {
            fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, "cannot remove the previous model", e))?;
        }
        fs::rename(dir, &aside).map_err(|e| Error::io(dir, "cannot move the previous model aside", e))?;
        next(&mut n)?;
    }
    fs::rename(&staging, dir).map_err(|e| Error::io(dir, "cannot move the new model in", e))?;
    next(&mut n)?;
    sync_dir(parent_of(dir))?;
    if existed {
        next(&mut n)?;
        fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, "cannot remove the previous model", e))?;
    }
    Ok(())
}

/// Writes and fsyncs `files` into the new folder `staging`, then fsyncs
/// the folder, calling `step` before each file and before the folder sync.
/// Errors name each file as it will be called in `dir`, its final place.
pub(crate) fn write_files(
    staging: &Path,
    dir: &Path,
    files: &[(&str, Vec<u8>)],
    step: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    for (name, bytes) in files {
        step()?;
        let failed = |e| {
            Error::io(
                dir.join(name),
                "cannot write (the previous files are left as they were)",
                e,
            )
        };
        let mut f = File::create(staging.join(name)).map_err(failed)?;
        f.write_all(bytes).and_then(|()| f.sync_all()).map_err(failed)?;
    }
    step()?;
    sync_dir(staging)
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub(crate) type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Appends every tensor of `model` to `out`, named `<prefix><name>`.
pub(crate) fn push_params(out: &mut Vec<RawTensor>, prefix: &str, model: &Din) {
    model.visit("", &mut |name, p| {
        out.push((
            format!("{prefix}{name}"),
            Dtype::F32,
            p.shape.clone(),
            f32_bytes(&p.value),
        ));
    });
}

/// Little-endian bytes of `values`.
pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file of `tensors`, in their order (`path` names it in errors).
pub(crate) fn tensor_file(tensors: &[RawTensor], path: &Path) -> Result<Vec<u8>> {
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, dtype, shape, raw) in tensors {
        let view = TensorView::new(*dtype, shape.clone(), raw).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        views.push((name.clone(), view));
    }
    // One metadata key: a HashMap's order would make the header, and so the
    // file, differ between runs with the same weights.
    let info = HashMap::from([("format".to_string(), format!("din/{FORMAT_VERSION}"))]);
    safetensors::serialize(views, Some(info)).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Fills every tensor of `model` from `tensors[<prefix><name>]`: each must
/// be present, F32, of the model's exact shape and finite. Returns the
/// names read, so the caller can refuse extra tensors.
pub(crate) fn fill_params(
    model: &mut Din,
    tensors: &SafeTensors<'_>,
    prefix: &str,
    path: &Path,
) -> Result<Vec<String>> {
    let mut read = Vec::new();
    let mut failure: Option<Error> = None;
    model.visit_mut("", &mut |name, p| {
        if failure.is_some() {
            return;
        }
        let name = format!("{prefix}{name}");
        let fail = |reason: String| {
            Some(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {reason}"),
            })
        };
        match tensors.tensor(&name) {
            Err(_) => failure = fail("missing".into()),
            Ok(view) if view.dtype() != Dtype::F32 => failure = fail(format!("dtype {:?}, expected F32", view.dtype())),
            Ok(view) if view.shape() != p.shape.as_slice() => {
                failure = fail(format!(
                    "shape {:?}, expected {:?} from config.json",
                    view.shape(),
                    p.shape
                ))
            }
            Ok(view) => {
                for (v, b) in p.value.iter_mut().zip(view.data().chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                // A weight that is not finite turns every score into NaN.
                if let Some(i) = p.value.iter().position(|v| !v.is_finite()) {
                    failure = fail(format!("holds a NaN or infinite value ({} at element {i})", p.value[i]));
                }
            }
        }
        read.push(name);
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(read),
    }
}

/// Reads a model directory written by [`save`]. Every tensor the config's
/// model needs must be present with its exact shape, and no other.
pub fn load(dir: &Path) -> Result<(Config, Layout, Din)> {
    let m = load_model(dir)?;
    Ok((m.config, m.layout, m.model))
}

/// Reads a whole model directory: [`load`], then the vocabulary and the item
/// table that `config.json` lists, each checked against its fingerprint and
/// against the schema.
pub fn load_model(dir: &Path) -> Result<SavedModel> {
    // A save that crashed between its two renames leaves the previous model
    // complete beside `dir` (see `save_with_assets`).
    let dir = match siblings(dir) {
        Ok((_, aside)) if !dir.exists() && aside.join(CONFIG_FILE).exists() => aside,
        _ => dir.to_path_buf(),
    };
    let dir = dir.as_path();
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read(&config_path).map_err(|e| Error::io(&config_path, "cannot read model config", e))?;
    let syntax = |e: serde_json::Error| Error::ConfigSyntax {
        path: config_path.clone(),
        message: e.to_string(),
    };
    let raw: serde_json::Value = serde_json::from_slice(&text).map_err(syntax)?;
    let written_config = raw.get("config").map(value_fingerprint);
    let file: ModelFile = serde_json::from_value(raw).map_err(syntax)?;
    if !(1..=FORMAT_VERSION).contains(&file.format_version) {
        return Err(Error::Checkpoint {
            path: config_path,
            reason: format!(
                "format_version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                file.format_version
            ),
        });
    }
    let found = written_config.unwrap_or_default();
    match &file.config_fingerprint {
        Some(expected) if *expected != found => {
            return Err(Error::Checkpoint {
                path: config_path,
                reason: format!(
                    "its `config` does not match its config_fingerprint (fingerprint {found}, expected {expected}): it was edited after saving; retrain, or restore the saved file"
                ),
            })
        }
        None if file.format_version >= 2 => {
            return Err(Error::Checkpoint {
                path: config_path,
                reason: format!("format_version {} requires config_fingerprint", file.format_version),
            })
        }
        _ => {}
    }
    let config = file.config.clone();
    let layout = config.validate()?;
    if let Some(t) = layout.tables.iter().find(|t| t.vocab_size.is_none()) {
        return Err(Error::Checkpoint {
            path: config_path,
            reason: format!("embedding table `{}` has no vocab_size", t.name),
        });
    }
    let mut model = Din::new(&layout, &config.model, 0)?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let blob = fs::read(&weights_path).map_err(|e| Error::io(&weights_path, "cannot read model weights", e))?;
    if fingerprint(&blob) != file.weights_fingerprint {
        return Err(Error::Checkpoint {
            path: weights_path,
            reason: format!(
                "does not match config.json (fingerprint {}, config.json expects {}): the two files come from different saves, or the weights are damaged",
                fingerprint(&blob),
                file.weights_fingerprint
            ),
        });
    }
    let tensors = SafeTensors::deserialize(&blob).map_err(|e| Error::Checkpoint {
        path: weights_path.clone(),
        reason: e.to_string(),
    })?;
    let expected: BTreeSet<String> = fill_params(&mut model, &tensors, "", &weights_path)?
        .into_iter()
        .collect();
    if let Some(extra) = tensors.names().into_iter().find(|n| !expected.contains(*n)) {
        return Err(Error::Checkpoint {
            path: weights_path,
            reason: format!("tensor `{extra}` is not part of the model described by config.json"),
        });
    }
    // A loaded model scores in the precision its config asks for.
    model.set_precision(config.model.precision);
    let read_asset = |name: &str, expected: &Option<String>| -> Result<Option<Vec<u8>>> {
        let path = dir.join(name);
        let Some(expected) = expected else {
            // A file the save wrote whose fingerprint line is gone.
            if path.exists() {
                return Err(Error::Checkpoint {
                    path: config_path.clone(),
                    reason: format!(
                        "does not list {name}, which the directory holds: config.json is damaged or from another save"
                    ),
                });
            }
            return Ok(None);
        };
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, "cannot read (config.json lists it)", e))?;
        if &fingerprint(&bytes) != expected {
            return Err(Error::Checkpoint {
                path,
                reason: format!(
                    "does not match config.json (fingerprint {}, config.json expects {expected}): the files come from different saves, or this one is damaged",
                    fingerprint(&bytes)
                ),
            });
        }
        Ok(Some(bytes))
    };
    let vocab = match read_asset(VOCAB_FILE, &file.vocab_fingerprint)? {
        Some(bytes) => {
            let path = dir.join(VOCAB_FILE);
            let fields = serde_json::from_slice(&bytes).map_err(|e| Error::ConfigSyntax {
                path: path.clone(),
                message: e.to_string(),
            })?;
            Some(Vocabulary::from_fields(&path, fields)?)
        }
        None => None,
    };
    let items_path = dir.join(ITEMS_FILE);
    let items: Option<ItemTable> = match read_asset(ITEMS_FILE, &file.items_fingerprint)? {
        Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| Error::ConfigSyntax {
            path: items_path.clone(),
            message: e.to_string(),
        })?),
        None => None,
    };
    match &items {
        Some(t) => t.check(&layout, &items_path)?,
        None if !layout.item_features.is_empty() => {
            return Err(Error::Checkpoint {
                path: config_path,
                reason: format!("the schema has item features but the directory has no {ITEMS_FILE}"),
            })
        }
        None => {}
    }
    Ok(SavedModel {
        config,
        layout,
        model,
        assets: Assets { vocab, items },
        file,
    })
}

/// [`fingerprint`] of `config` as compact JSON with sorted keys.
fn config_fingerprint(config: &Config) -> Result<String> {
    let value = serde_json::to_value(config).map_err(|e| Error::config("config", "", e.to_string()))?;
    Ok(value_fingerprint(&value))
}

/// [`fingerprint`] of a JSON value as compact JSON with sorted keys: of the
/// `config` as written, so that a later version's new fields (with their
/// defaults) do not count as an edit.
fn value_fingerprint(value: &serde_json::Value) -> String {
    fingerprint(value.to_string().as_bytes())
}

/// FNV-1a, 64-bit, in hex. Hand-written (six lines) because it only has to
/// tell two saves apart, not resist an adversary; no dependency is needed.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h = Fnv::new();
    h.write(bytes);
    h.hex()
}

/// [`fingerprint`] fed in pieces, for files read in chunks.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Fnv {
    /// The FNV-1a 64 offset basis.
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    /// Adds `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
    /// The hash so far, in hex.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Streams a file to `path` atomically: `fill` writes into a buffered
/// temporary file in the same folder, which is fsynced and renamed over
/// `path` only if `fill` succeeds. A crash leaves either the old file or the
/// new one, never a half-written one.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, "cannot write", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml_str(
            r#"
[input]
columns = ["item", "hist", "label"]
[schema]
label = "label"
sparse = [{ name = "item", vocab_size = 6, embedding_dim = 2 }]
sequence = [{ name = "hist", shares_embedding_with = "item", max_len = 3 }]
din_pairs = [{ target = "item", history = "hist" }]
[model.attention]
hidden_units = [3]
[model.dnn]
hidden_units = [3]
"#,
        )
        .expect("config")
    }

    fn model(seed: u64) -> Din {
        let c = config();
        Din::new(&c.validate().expect("valid"), &c.model, seed).expect("model")
    }

    fn history(epoch: usize) -> Vec<EpochReport> {
        vec![EpochReport {
            epoch,
            train_loss: 0.5,
            validation: None,
            seconds: 1.0,
            samples_per_second: 10.0,
            skipped_batches: 0,
            skipped_rows: BTreeMap::new(),
        }]
    }

    /// A save interrupted at every one of its steps (as a crash would: the
    /// files stay as they are) leaves a directory that loads as the old
    /// model or the new one, never an error or a mix; the next save then
    /// succeeds and loads as its own model.
    #[test]
    fn a_save_interrupted_at_any_step_leaves_a_loadable_model() {
        let (old, new, newer) = (model(1), model(2), model(3));
        assert!(old != new && new != newer);
        let c = config();
        let mut steps = 0;
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("m");
        save_with_assets(&dir, &c, &old, &Assets::default(), Some(&history(1))).expect("first save");
        save_steps(
            &dir,
            &c,
            &mut Whole(&new),
            &Assets::default(),
            Some(&history(2)),
            &mut |k| {
                steps = steps.max(k + 1);
                Ok(())
            },
        )
        .expect("an uninterrupted save");
        assert_eq!(load_model(&dir).expect("loads").model, new);
        assert!(steps >= 7, "{steps} steps");
        for stop in 0..steps {
            let tmp = tempfile::tempdir().expect("tmp");
            let dir = tmp.path().join("m");
            save_with_assets(&dir, &c, &old, &Assets::default(), Some(&history(1))).expect("first save");
            let crash = save_steps(
                &dir,
                &c,
                &mut Whole(&new),
                &Assets::default(),
                Some(&history(2)),
                &mut |k| {
                    if k == stop {
                        Err(Error::config("test", k, "crash"))
                    } else {
                        Ok(())
                    }
                },
            );
            assert!(crash.is_err(), "step {stop}");
            let loaded = load_model(&dir).unwrap_or_else(|e| panic!("after a crash at step {stop}: {e}"));
            assert!(loaded.model == old || loaded.model == new, "step {stop}: a mix");
            // The history matches the weights it came with.
            let h: Vec<EpochReport> = serde_json::from_slice(
                &fs::read(if dir.exists() {
                    dir.join(HISTORY_FILE)
                } else {
                    siblings(&dir).expect("names").1.join(HISTORY_FILE)
                })
                .expect("history"),
            )
            .expect("json");
            assert_eq!(h[0].epoch, if loaded.model == old { 1 } else { 2 }, "step {stop}");
            // What a real crash in staging would leave (the error path above
            // removes its own staging folder).
            fs::create_dir(tmp.path().join(".m.new-4000000000")).expect("mkdir");
            save_with_assets(&dir, &c, &newer, &Assets::default(), None).expect("the next save");
            assert_eq!(load_model(&dir).expect("loads").model, newer, "step {stop}");
            let mut left: Vec<String> = fs::read_dir(tmp.path())
                .expect("ls")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            assert_eq!(left, ["m"], "step {stop}: nothing left beside the model");
            assert!(
                !dir.join(HISTORY_FILE).exists(),
                "a save without history drops the old one"
            );
        }
    }

    /// A model handed over in pieces of `piece` values (the last tensor
    /// `short` values short).
    struct Pieces<'a> {
        model: &'a Din,
        piece: usize,
        short: usize,
    }

    impl TensorStream for Pieces<'_> {
        fn tensors(&self) -> Vec<(String, Vec<usize>)> {
            // In reverse: the file's order is by name, whatever the order given.
            let mut all = Whole(self.model).tensors();
            all.reverse();
            all
        }

        fn write(&mut self, name: &str, sink: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
            let last = self.tensors().iter().map(|t| t.0.clone()).max().expect("tensors");
            let (piece, short) = (self.piece, if name == last { self.short } else { 0 });
            Whole(self.model).write(name, &mut |values| {
                for part in values[..values.len() - short].chunks(piece) {
                    sink(part)?;
                }
                Ok(())
            })
        }
    }

    /// `model.safetensors` is the `safetensors` crate's own serialisation
    /// of the model's tensors, byte for byte, however the values arrive;
    /// a stream that gives a tensor too few values fails the save, naming
    /// the tensor, and leaves the previous model.
    #[test]
    fn streamed_weights_are_the_safetensors_crates_bytes() {
        let (c, m) = (config(), model(4));
        let mut tensors = Vec::new();
        push_params(&mut tensors, "", &m);
        let expected = tensor_file(&tensors, Path::new("x")).expect("serialize");
        let tmp = tempfile::tempdir().expect("tmp");
        for piece in [1, 3, 1000, usize::MAX] {
            let dir = tmp.path().join(format!("m{piece}"));
            let mut stream = Pieces {
                model: &m,
                piece,
                short: 0,
            };
            save_streamed(&dir, &c, &mut stream, &Assets::default(), None).expect("save");
            let bytes = fs::read(dir.join(WEIGHTS_FILE)).expect("read");
            assert!(bytes == expected, "pieces of {piece}: the bytes differ");
            let loaded = load_model(&dir).expect("loads");
            assert_eq!(loaded.model, m);
            assert_eq!(loaded.file.weights_fingerprint, fingerprint(&expected));
        }
        let dir = tmp.path().join("m3");
        let mut short = Pieces {
            model: &m,
            piece: 3,
            short: 1,
        };
        let err = save_streamed(&dir, &c, &mut short, &Assets::default(), None)
            .expect_err("a value short")
            .to_string();
        let last = Whole(&m).tensors().into_iter().map(|t| t.0).max().expect("tensors");
        assert!(
            err.contains(&format!("tensor `{last}`")) && err.contains("was given"),
            "{err}"
        );
        assert_eq!(load_model(&dir).expect("the previous model").model, m);
    }

    /// Saving replaces the whole directory, so a folder holding anything
    /// but model files is refused, and left as it was.
    #[test]
    fn a_folder_with_other_files_is_never_replaced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("runs");
        fs::create_dir_all(dir.join("other-run")).expect("mkdir");
        fs::write(dir.join("notes.txt"), "mine").expect("write");
        let err = save(&dir, &config(), &model(1), None).expect_err("refused").to_string();
        assert!(err.contains("runs") && err.contains("not a model file"), "{err}");
        assert_eq!(fs::read_to_string(dir.join("notes.txt")).expect("kept"), "mine");
        assert!(dir.join("other-run").is_dir());
        let err = save(Path::new("."), &config(), &model(1), None)
            .expect_err("no name")
            .to_string();
        assert!(err.contains("needs a name"), "{err}");
    }
}
