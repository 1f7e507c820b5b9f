//! The model directory: `config.json` (the resolved config), `model.safetensors`
//! (tensor names are field paths, e.g. `attention.layers.0.weight`),
//! `history.json` (per-epoch metrics) and, when the model has them,
//! `vocab.json` (raw value of every dense id) and `items.json` (the item
//! feature table). Every file is written atomically: to a
//! temporary file in the same folder, fsynced, then renamed over the old one,
//! so a crash never leaves a half-written model.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::data::{ItemTable, Vocabulary};
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

/// What `config.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// [`save`] with a vocabulary and an item table. `config.json` is written
/// last and holds the fingerprint of every other file, so that a directory
/// whose files come from different saves is refused on loading.
pub fn save_with_assets(
    dir: &Path,
    config: &Config,
    model: &Din,
    assets: &Assets,
    history: Option<&[EpochReport]>,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, "cannot create model directory", e))?;
    let asset_fingerprint = |name: &str, bytes: Option<Vec<u8>>| -> Result<Option<String>> {
        let path = dir.join(name);
        match bytes {
            Some(b) => {
                write_atomic(&path, &b)?;
                Ok(Some(fingerprint(&b)))
            }
            None => {
                // A file left by an earlier save is not part of this model.
                if path.exists() {
                    fs::remove_file(&path).map_err(|e| Error::io(&path, "cannot remove stale file", e))?;
                }
                Ok(None)
            }
        }
    };
    let vocab_fingerprint = asset_fingerprint(VOCAB_FILE, assets.vocab.as_ref().map(Vocabulary::to_json))?;
    let items_json = match &assets.items {
        Some(items) => Some(serde_json::to_vec(items).map_err(|e| Error::Checkpoint {
            path: dir.join(ITEMS_FILE),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let items_fingerprint = asset_fingerprint(ITEMS_FILE, items_json)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    model.visit("", &mut |name, p| {
        let raw: Vec<u8> = p.value.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.push((name, p.shape.clone(), raw));
    });
    for (name, shape, raw) in &bytes {
        let view = TensorView::new(Dtype::F32, shape.clone(), raw).map_err(|e| Error::Checkpoint {
            path: weights_path.clone(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        views.push((name.clone(), view));
    }
    // One metadata key: a HashMap's order would make the header, and so the
    // file, differ between runs with the same weights.
    let info = HashMap::from([("format".to_string(), format!("din/{FORMAT_VERSION}"))]);
    let blob = safetensors::serialize(views, Some(info)).map_err(|e| Error::Checkpoint {
        path: weights_path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&weights_path, &blob)?;

    let file = ModelFile {
        format_version: FORMAT_VERSION,
        din_version: env!("CARGO_PKG_VERSION").to_string(),
        weights_fingerprint: fingerprint(&blob),
        vocab_fingerprint,
        items_fingerprint,
        config_fingerprint: Some(config_fingerprint(config)?),
        config: config.clone(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Checkpoint {
        path: dir.join(CONFIG_FILE),
        reason: e.to_string(),
    })?;
    write_atomic(&dir.join(CONFIG_FILE), &json)?;
    if let Some(h) = history {
        let json = serde_json::to_vec_pretty(h).map_err(|e| Error::Checkpoint {
            path: dir.join(HISTORY_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&dir.join(HISTORY_FILE), &json)?;
    }
    Ok(())
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
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read(&config_path).map_err(|e| Error::io(&config_path, "cannot read model config", e))?;
    let file: ModelFile = serde_json::from_slice(&text).map_err(|e| Error::ConfigSyntax {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    if !(1..=FORMAT_VERSION).contains(&file.format_version) {
        return Err(Error::Checkpoint {
            path: config_path,
            reason: format!(
                "format_version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                file.format_version
            ),
        });
    }
    let found = config_fingerprint(&file.config)?;
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
    let mut expected: BTreeMap<String, ()> = BTreeMap::new();
    let mut failure: Option<Error> = None;
    model.visit_mut("", &mut |name, p| {
        if failure.is_some() {
            return;
        }
        let fail = |reason: String| {
            Some(Error::Checkpoint {
                path: weights_path.clone(),
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
        expected.insert(name, ());
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(extra) = tensors.names().into_iter().find(|n| !expected.contains_key(*n)) {
        return Err(Error::Checkpoint {
            path: weights_path,
            reason: format!("tensor `{extra}` is not part of the model described by config.json"),
        });
    }
    let read_asset = |name: &str, expected: &Option<String>| -> Result<Option<Vec<u8>>> {
        let Some(expected) = expected else { return Ok(None) };
        let path = dir.join(name);
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

/// [`fingerprint`] of `config` as compact JSON.
fn config_fingerprint(config: &Config) -> Result<String> {
    let json = serde_json::to_vec(config).map_err(|e| Error::config("config", "", e.to_string()))?;
    Ok(fingerprint(&json))
}

/// FNV-1a, 64-bit, in hex. Hand-written (six lines) because it only has to
/// tell two saves apart, not resist an adversary; no dependency is needed.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
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
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
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
