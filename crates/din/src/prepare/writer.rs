//! Writes prepared samples in the core reader's format, with a config and a vocabulary.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder};
use arrow_array::{ArrayRef, Float32Array, Int64Array, Int8Array, RecordBatch};
use arrow_schema::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use serde::Serialize;

use super::samples::{build_samples, Sample, Samples};
use super::{Log, PrepareOptions, SampleFormat};
use crate::checkpoint::{write_atomic, write_atomic_with};
use crate::data::{ItemColumn, ItemTable};
use crate::schema::{
    Config, DataConfig, DenseFeature, DinPair, EarlyStoppingConfig, InputConfig, InputLayout, Keep, ModelConfig,
    Monitor, Oov, Schema, SequenceFeature, SequenceOrder, SparseFeature, TrainConfig, Truncation,
};
use crate::{Error, Result};

/// Batch size of a generated config with a validation split.
const GENERATED_BATCH_SIZE: usize = 256;
/// Epoch limit of a generated config with a validation split (early
/// stopping ends the run sooner).
const GENERATED_MAX_EPOCHS: usize = 20;

/// Training samples file.
pub const TRAIN_FILE: &str = "train.tsv";
/// Validation samples file (when [`PrepareOptions::valid_per_user`] > 0).
pub const VALID_FILE: &str = "valid.tsv";
/// Held-out samples file.
pub const TEST_FILE: &str = "test.tsv";
/// Generated config.
pub const CONFIG_FILE: &str = "config.toml";
/// Rows per row group of a Parquet sample file (see [`SampleFormat::Parquet`]).
pub const PARQUET_ROW_GROUP: usize = 65_536;
/// Raw values of the dense ids.
pub const VOCAB_FILE: &str = "vocab.json";
/// Every item's category (the model directory's item table format).
pub const ITEMS_FILE: &str = "items.json";

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrepareReport {
    /// Behaviours read.
    pub events: usize,
    /// Malformed rows skipped (with `skip_bad_rows`).
    pub skipped_rows: usize,
    /// Users with samples.
    pub users: usize,
    /// Distinct items.
    pub items: usize,
    /// Distinct categories.
    pub categories: usize,
    /// Behaviours whose item had been seen with another category (they are
    /// given the item's first category).
    pub category_conflicts: usize,
    /// Users left out for having fewer than two behaviours.
    pub short_users: usize,
    /// Behaviours dropped for a value below `min_value`.
    pub below_min_value: usize,
    /// Training samples.
    pub train_samples: usize,
    /// Validation samples (`valid.tsv`; 0 when none was written).
    pub valid_samples: usize,
    /// Test samples.
    pub test_samples: usize,
    /// Positive samples (all splits).
    pub positives: usize,
    /// Mean history length over all samples.
    pub mean_history_len: f64,
    /// History length over all samples at the 10th, 25th, 50th, 75th and
    /// 90th percentiles and the maximum (nearest rank).
    pub history_len_quantiles: [usize; 6],
    /// Samples with an empty history (e.g. a user's first behaviour, or
    /// behaviours that share the earliest timestamp: a history holds only
    /// strictly earlier ones).
    pub empty_histories: usize,
    /// The generated config.
    pub config: PathBuf,
    /// The generated config's validation file (`valid.tsv`, or `test.tsv`
    /// without a validation split).
    pub validation: PathBuf,
    /// Whether the config has a `user_id` embedding.
    pub user_feature: bool,
    /// The `din train` command that trains on these files.
    pub train_command: String,
    /// The `din evaluate` command that scores the trained model on the test file.
    pub evaluate_command: String,
}

/// Builds samples from `log` and writes `train.tsv`, `valid.tsv` (with a
/// validation split), `test.tsv`, `config.toml`, `vocab.json` and
/// `items.json` into `out_dir`.
pub fn prepare(log: &Log, options: &PrepareOptions, out_dir: &Path) -> Result<PrepareReport> {
    let samples = build_samples(log, options)?;
    write_prepared(log, &samples, options, out_dir)
}

/// Writes already built samples (see [`prepare`]).
pub fn write_prepared(log: &Log, samples: &Samples, options: &PrepareOptions, out_dir: &Path) -> Result<PrepareReport> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, "cannot create output folder", e))?;
    let header = header(samples, options);
    let with_valid = !samples.valid.is_empty();
    let format = options.format;
    let mut files = vec![
        (format.file("train"), &samples.train),
        (format.file("test"), &samples.test),
    ];
    if with_valid {
        files.push((format.file("valid"), &samples.valid));
    } else {
        // A validation file from an earlier run would not match these samples.
        remove_stale(&out_dir.join(format.file("valid")))?;
    }
    for (name, rows) in files {
        let path = out_dir.join(name);
        match format {
            SampleFormat::Tsv => write_atomic_with(&path, |w| {
                writeln!(w, "{}", header.join("\t"))?;
                // One sample per line, or one run sharing a user side.
                let lines: Box<dyn Iterator<Item = &[Sample]>> = if options.grouped {
                    Box::new(groups(rows))
                } else {
                    Box::new(rows.chunks(1))
                };
                for group in lines {
                    write_group(w, group, options)?;
                }
                Ok(())
            })?,
            SampleFormat::Parquet => write_atomic_with(&path, |w| {
                write_parquet(w, &header, samples.profile_fields.len(), rows, options)
            })?,
        }
    }
    let vocab = serde_json::to_vec(&samples.vocab.fields).map_err(|e| Error::Checkpoint {
        path: out_dir.join(VOCAB_FILE),
        reason: e.to_string(),
    })?;
    write_atomic(&out_dir.join(VOCAB_FILE), &vocab)?;
    // The category of every item, also of those only the test file shows, so
    // that the model directory's item table covers the whole vocabulary.
    let items = ItemTable {
        features: [(
            "cate_id".to_string(),
            ItemColumn {
                key: "item_id".into(),
                values: samples.item_categories.iter().map(|&c| Some(c)).collect(),
            },
        )]
        .into(),
    };
    let items = serde_json::to_vec(&items).map_err(|e| Error::Checkpoint {
        path: out_dir.join(ITEMS_FILE),
        reason: e.to_string(),
    })?;
    write_atomic(&out_dir.join(ITEMS_FILE), &items)?;
    let config = config(samples, options, with_valid);
    let text = toml::to_string_pretty(&config).map_err(|e| Error::Checkpoint {
        path: out_dir.join(CONFIG_FILE),
        reason: e.to_string(),
    })?;
    let banner = if with_valid {
        "# Written by `din prepare`. Paths are relative to this file.\n\
         # Validation is valid.tsv (each user's samples just before the test ones): training\n\
         # stops when val_logloss has not improved for 2 epochs and keeps the best epoch.\n\
         # test.tsv is for `din evaluate --data test.tsv` once, at the end.\n"
    } else {
        "# Written by `din prepare`. Paths are relative to this file.\n\
         # train.keep = \"last\": the validation file is the test file, and picking the best epoch\n\
         # on it would pick on the test set.\n"
    };
    let config_path = out_dir.join(CONFIG_FILE);
    write_atomic(&config_path, format!("{banner}{text}").as_bytes())?;

    let all = samples.train.iter().chain(&samples.valid).chain(&samples.test);
    let n = samples.train.len() + samples.valid.len() + samples.test.len();
    let hist: usize = all.clone().map(|s| s.hist_items.len()).sum();
    let model_dir = out_dir.join("model");
    Ok(PrepareReport {
        events: log.events.len(),
        skipped_rows: log.skipped.len(),
        users: samples.users,
        items: samples.vocab.fields.get("item_id").map_or(0, Vec::len),
        categories: samples.vocab.fields.get("cate_id").map_or(0, Vec::len),
        category_conflicts: samples.category_conflicts,
        short_users: samples.short_users,
        below_min_value: samples.below_min_value,
        train_samples: samples.train.len(),
        valid_samples: samples.valid.len(),
        test_samples: samples.test.len(),
        positives: all.clone().filter(|s| s.label == 1).count(),
        mean_history_len: if n == 0 { 0.0 } else { hist as f64 / n as f64 },
        history_len_quantiles: {
            let mut lens: Vec<usize> = all.clone().map(|s| s.hist_items.len()).collect();
            lens.sort_unstable();
            let at = |q: f64| {
                lens.get(((lens.len().max(1) - 1) as f64 * q).round() as usize)
                    .copied()
                    .unwrap_or(0)
            };
            [at(0.1), at(0.25), at(0.5), at(0.75), at(0.9), at(1.0)]
        },
        empty_histories: all.filter(|s| s.hist_items.is_empty()).count(),
        validation: out_dir.join(format.file(if with_valid { "valid" } else { "test" })),
        user_feature: options.user_feature,
        train_command: format!(
            "din train --config {} --out {}",
            shell_word(&config_path),
            shell_word(&model_dir)
        ),
        evaluate_command: format!(
            "din evaluate --model {} --data {}",
            shell_word(&model_dir),
            shell_word(&out_dir.join(format.file("test")))
        ),
        config: config_path,
    })
}

/// A path as one shell word: quoted when it holds anything but plain characters.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, "cannot remove the stale file", e)),
    }
}

fn header(samples: &Samples, options: &PrepareOptions) -> Vec<String> {
    let mut h = vec!["user_id".to_string()];
    h.extend(samples.profile_fields.iter().cloned());
    h.extend(["item_id", "cate_id", "hist_item_id", "hist_cate_id"].map(String::from));
    if options.days_since_prev {
        h.push("days_since_prev".into());
    }
    h.push("time".into());
    if options.history_times {
        h.push("hist_time".into());
    }
    h.push("label".into());
    h
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// Runs of consecutive samples with the same user side: everything but
/// the candidate (item, category) and the label.
fn groups(rows: &[Sample]) -> impl Iterator<Item = &[Sample]> {
    let same = |a: &Sample, b: &Sample| {
        a.user == b.user
            && a.profile == b.profile
            && a.hist_items == b.hist_items
            && a.hist_categories == b.hist_categories
            && a.hist_times == b.hist_times
            && a.time == b.time
            && a.days_since_prev.to_bits() == b.days_since_prev.to_bits()
    };
    rows.chunk_by(move |a, b| same(a, b))
}

/// One line: a sample, or (grouped layout) a run of samples sharing their
/// user side, whose items, categories and labels are joined by `|`.
fn write_group(w: &mut impl Write, group: &[Sample], options: &PrepareOptions) -> std::io::Result<()> {
    let s = &group[0];
    let candidates = |f: &dyn Fn(&Sample) -> String| group.iter().map(f).collect::<Vec<_>>().join("|");
    write!(w, "{}", s.user)?;
    for p in &s.profile {
        write!(w, "\t{p}")?;
    }
    write!(
        w,
        "\t{}\t{}\t{}\t{}",
        candidates(&|s| s.item.to_string()),
        candidates(&|s| s.category.to_string()),
        join(&s.hist_items),
        join(&s.hist_categories)
    )?;
    if options.days_since_prev {
        write!(w, "\t{}", s.days_since_prev)?;
    }
    write!(w, "\t{}", s.time)?;
    if options.history_times {
        write!(w, "\t{}", join(&s.hist_times))?;
    }
    writeln!(w, "\t{}", candidates(&|s| s.label.to_string()))
}

/// A Parquet sample file: the columns of the text header, in its order
/// (int64 ids and times, `list<int64>` histories, a float32
/// `days_since_prev`, an int8 label), one sample per row, row groups of
/// [`PARQUET_ROW_GROUP`] rows built and written one at a time.
fn write_parquet(
    w: &mut BufWriter<File>,
    header: &[String],
    profiles: usize,
    rows: &[Sample],
    options: &PrepareOptions,
) -> std::io::Result<()> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP))
        .set_created_by(format!("din {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut chunks = rows.chunks(PARQUET_ROW_GROUP);
    // An empty split still gets a file with the columns (and no row group).
    let first = record_batch(header, profiles, chunks.next().unwrap_or(&[]), options)?;
    let mut writer = ArrowWriter::try_new(w, first.schema(), Some(props)).map_err(std::io::Error::other)?;
    for batch in std::iter::once(Ok(first)).chain(chunks.map(|c| record_batch(header, profiles, c, options))) {
        let batch = batch?;
        if batch.num_rows() > 0 {
            writer.write(&batch).map_err(std::io::Error::other)?;
            // One row group per chunk, however the writer counts bytes.
            writer.flush().map_err(std::io::Error::other)?;
        }
    }
    writer.close().map_err(std::io::Error::other)?;
    Ok(())
}

/// The Parquet columns of `chunk`, named by `header`.
fn record_batch(
    header: &[String],
    profiles: usize,
    chunk: &[Sample],
    options: &PrepareOptions,
) -> std::io::Result<RecordBatch> {
    let ints = |f: &dyn Fn(&Sample) -> i64| -> ArrayRef { Arc::new(Int64Array::from_iter_values(chunk.iter().map(f))) };
    let lists = |f: &dyn Fn(&Sample, &mut Int64Builder)| -> ArrayRef {
        let mut b = ListBuilder::new(Int64Builder::new()).with_field(Field::new("item", DataType::Int64, false));
        for s in chunk {
            f(s, b.values());
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let mut columns: Vec<ArrayRef> = vec![ints(&|s| s.user.into())];
    for p in 0..profiles {
        columns.push(ints(&|s| s.profile[p].into()));
    }
    columns.push(ints(&|s| s.item.into()));
    columns.push(ints(&|s| s.category.into()));
    columns.push(lists(&|s, b| {
        b.extend(s.hist_items.iter().map(|&v| Some(i64::from(v))))
    }));
    columns.push(lists(&|s, b| {
        b.extend(s.hist_categories.iter().map(|&v| Some(i64::from(v))))
    }));
    if options.days_since_prev {
        columns.push(Arc::new(Float32Array::from_iter_values(
            chunk.iter().map(|s| s.days_since_prev),
        )));
    }
    columns.push(ints(&|s| s.time));
    if options.history_times {
        columns.push(lists(&|s, b| b.append_slice(&s.hist_times)));
    }
    columns.push(Arc::new(Int8Array::from_iter_values(
        chunk.iter().map(|s| s.label as i8),
    )));
    debug_assert_eq!(columns.len(), header.len());
    RecordBatch::try_from_iter(header.iter().cloned().zip(columns)).map_err(std::io::Error::other)
}

/// The config for the written files: the tutorial's model, vocabulary
/// sizes frozen; with a validation file, early stopping on it and the best
/// epoch kept, else the test file as validation and the last epoch kept.
fn config(samples: &Samples, options: &PrepareOptions, with_valid: bool) -> Config {
    let grouped_rows = options.grouped && options.format == SampleFormat::Parquet;
    let size = |field: &str| samples.vocab.fields.get(field).map_or(1, |v| v.len() + 1);
    let sparse = |name: &str| SparseFeature {
        name: name.to_string(),
        vocab_size: Some(size(name)),
        // Set once for the schema, so that `--set schema.embedding_dim=16` changes it.
        embedding_dim: None,
        oov: Oov::Error,
        shares_embedding_with: None,
        // The category is a function of the item (see `build_samples`).
        item_feature_of: (name == "cate_id").then(|| "item_id".to_string()),
    };
    let mut sparse_features = Vec::new();
    if options.user_feature {
        sparse_features.push(sparse("user_id"));
    }
    sparse_features.extend(samples.profile_fields.iter().map(|f| sparse(f)));
    sparse_features.extend([sparse("item_id"), sparse("cate_id")]);
    let sequence = |name: &str, owner: &str| SequenceFeature {
        name: name.to_string(),
        max_len: options.max_len,
        shares_embedding_with: Some(owner.to_string()),
        vocab_size: None,
        embedding_dim: None,
        oov: Oov::Error,
        order: SequenceOrder::OldestFirst,
        truncation: Truncation::KeepRecent,
    };
    let dense = if options.days_since_prev {
        vec![DenseFeature {
            name: "days_since_prev".into(),
            dim: 1,
        }]
    } else {
        Vec::new()
    };
    Config {
        data: DataConfig {
            train: Some(PathBuf::from(options.format.file("train"))),
            validation: Some(PathBuf::from(options.format.file(if with_valid {
                "valid"
            } else {
                "test"
            }))),
            validation_split: None,
            vocab: Some(PathBuf::from(VOCAB_FILE)),
            items: Some(PathBuf::from(ITEMS_FILE)),
            // Parquet holds one sample per row; runs sharing a user side are
            // found when read and stored once, as grouped lines are.
            group: grouped_rows,
            ..DataConfig::default()
        },
        input: InputConfig {
            header: true,
            layout: if options.grouped && !grouped_rows {
                InputLayout::Grouped
            } else {
                InputLayout::Flat
            },
            ..InputConfig::default()
        },
        schema: Schema {
            label: "label".into(),
            user: Some("user_id".into()),
            embedding_dim: Some(options.embedding_dim),
            sparse: sparse_features,
            dense,
            sequence: vec![sequence("hist_item_id", "item_id"), sequence("hist_cate_id", "cate_id")],
            din_pairs: vec![
                DinPair {
                    target: "item_id".into(),
                    history: "hist_item_id".into(),
                },
                DinPair {
                    target: "cate_id".into(),
                    history: "hist_cate_id".into(),
                },
            ],
        },
        model: ModelConfig::default(),
        train: if with_valid {
            TrainConfig {
                batch_size: GENERATED_BATCH_SIZE,
                epochs: GENERATED_MAX_EPOCHS,
                early_stopping: Some(EarlyStoppingConfig {
                    monitor: Monitor::ValLogloss,
                    patience: 2,
                    restore_best: true,
                }),
                keep: Keep::Best,
                ..TrainConfig::default()
            }
        } else {
            // The validation file is the test file: choosing the best epoch on
            // it would choose on the test set, so the last epoch is kept.
            TrainConfig {
                keep: Keep::Last,
                ..TrainConfig::default()
            }
        },
    }
}
