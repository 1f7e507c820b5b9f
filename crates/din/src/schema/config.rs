//! Serde configuration structs with defaults.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::Precision;
use crate::{Error, Result};

/// The whole run configuration: where the data is, how to read it, the feature
/// schema, the model and the training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data files (paths relative to the config file).
    #[serde(default)]
    pub data: DataConfig,
    /// How data files are laid out.
    #[serde(default)]
    pub input: InputConfig,
    /// The features.
    pub schema: Schema,
    /// The network.
    #[serde(default)]
    pub model: ModelConfig,
    /// Training hyper-parameters.
    #[serde(default)]
    pub train: TrainConfig,
}

/// Where the training and validation data are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training file.
    pub train: Option<PathBuf>,
    /// Separate validation file; exclusive with `validation_split`.
    pub validation: Option<PathBuf>,
    /// Fraction of the training file's rows held out for validation, taken
    /// from the end of the file without shuffling (as Keras' `validation_split`).
    pub validation_split: Option<f64>,
    /// Raw value of every dense id, per feature (`vocab.json` as `din prepare`
    /// writes it: `{"item_id": ["raw of id 1", "raw of id 2", ...], ...}`).
    /// `din train` copies it into the model directory, so that `din serve`
    /// takes requests in raw ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<PathBuf>,
    /// The item features' value for every item (`items.json` as `din
    /// prepare` writes it, the model directory's format), also for items the
    /// training and validation rows never show. Training checks the rows
    /// against it and completes it from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<PathBuf>,
    /// Skip malformed training and validation rows (counted, the first
    /// listed in the report and `history.json`) instead of stopping at the
    /// first; `din train --skip-bad-rows`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skip_bad_rows: bool,
    /// With `skip_bad_rows`: the largest fraction of a file's rows that may
    /// be malformed before the run stops anyway.
    #[serde(default = "default_bad_fraction", skip_serializing_if = "is_default_bad_fraction")]
    pub max_bad_rows_fraction: f64,
    /// Common features (architecture.md, trick 4): store the sequences of
    /// consecutive rows with the same user side (every sequence, and the
    /// `schema.user` column when there is one) once, and train on whole
    /// groups (`din train --group`). Grouped files
    /// (`input.layout = "grouped"`) are always read so.
    #[serde(default, skip_serializing_if = "is_false")]
    pub group: bool,
    /// Stream the training file instead of holding it in memory: read it
    /// in windows of about this many rows (whole row groups of a Parquet
    /// file, whole groups of grouped data), shuffle the rows within each
    /// window, and hold at most two windows at a time. Without it every
    /// row is held and the whole file is shuffled. The validation file is
    /// still read whole; `validation_split` needs the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_rows: Option<usize>,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn default_bad_fraction() -> f64 {
    0.01
}
fn is_default_bad_fraction(f: &f64) -> bool {
    *f == default_bad_fraction()
}

/// Layout of a delimited data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Field delimiter, one character (`"\t"` for the tutorial's file).
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Whether the first line names the columns.
    #[serde(default)]
    pub header: bool,
    /// Column names in file order, when there is no header. Columns that no
    /// feature uses are read and ignored.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Separator between the ids of a history (and the values of a dense
    /// feature of dimension > 1) inside one column.
    #[serde(default = "default_sequence_separator")]
    pub sequence_separator: String,
    /// Whether `"` quotes fields (so a quoted field may hold the delimiter).
    /// Off by default: a stray quote then cannot swallow delimiters or rows.
    #[serde(default)]
    pub quoting: bool,
    /// How rows are written: one sample per line, or one group per line.
    #[serde(default, skip_serializing_if = "is_flat")]
    pub layout: InputLayout,
    /// Grouped layout: separator between the candidates' values in one
    /// field (the label and the candidate side's features).
    #[serde(
        default = "default_candidate_separator",
        skip_serializing_if = "is_default_candidate_separator"
    )]
    pub candidate_separator: String,
    /// The file format: `auto` (by the file's extension: `.parquet` or
    /// `.pq` is Parquet, `.arrow`, `.arrows`, `.ipc` or `.feather` is Arrow
    /// IPC, anything else delimited text), or one of them by name.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub format: InputFormat,
}

/// A data file's format (see [`InputConfig::format`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// By the file's extension.
    #[default]
    Auto,
    /// Delimited text (the tutorial's TSV).
    Delimited,
    /// Parquet: one column per feature, histories as list columns or
    /// delimited strings.
    Parquet,
    /// Arrow IPC (file or stream format), columns as for Parquet.
    Arrow,
}

impl InputFormat {
    /// The format of `path`: this one, or for `Auto` the one its extension names.
    pub fn of(self, path: &std::path::Path) -> InputFormat {
        if self != InputFormat::Auto {
            return self;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => InputFormat::Parquet,
            "arrow" | "arrows" | "ipc" | "feather" => InputFormat::Arrow,
            _ => InputFormat::Delimited,
        }
    }
}

fn is_auto(f: &InputFormat) -> bool {
    *f == InputFormat::Auto
}

/// How a data file's lines map to samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputLayout {
    /// One sample per line.
    #[default]
    Flat,
    /// One group per line (a page view: one user side, several
    /// candidates). The columns are the flat layout's; the label holds one
    /// value per candidate, separated by `input.candidate_separator`
    /// (`1|0|0`), and so does every sparse or dense column that differs
    /// between the candidates (`112|38|151`); a column with one value is
    /// every candidate's. Sequences hold one history, the group's.
    Grouped,
}

fn is_flat(l: &InputLayout) -> bool {
    *l == InputLayout::Flat
}
fn default_candidate_separator() -> String {
    "|".into()
}
fn is_default_candidate_separator(s: &String) -> bool {
    *s == default_candidate_separator()
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            delimiter: default_delimiter(),
            header: false,
            columns: Vec::new(),
            sequence_separator: default_sequence_separator(),
            quoting: false,
            layout: InputLayout::Flat,
            candidate_separator: default_candidate_separator(),
            format: InputFormat::Auto,
        }
    }
}

fn default_delimiter() -> String {
    "\t".into()
}
fn default_sequence_separator() -> String {
    ",".into()
}

/// The features of a DIN model and how they are linked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Label column (0 or 1).
    pub label: String,
    /// Column identifying the user, used to group samples for GAUC.
    #[serde(default)]
    pub user: Option<String>,
    /// Embedding width of every table that does not set its own (8 when
    /// absent, as DeepCTR's and the tutorial's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_dim: Option<usize>,
    /// Categorical features with one id per sample.
    #[serde(default)]
    pub sparse: Vec<SparseFeature>,
    /// Numeric features.
    #[serde(default)]
    pub dense: Vec<DenseFeature>,
    /// Variable-length id sequences (behaviour histories).
    #[serde(default)]
    pub sequence: Vec<SequenceFeature>,
    /// Target / history pairs fed to the local activation unit. Several pairs
    /// are concatenated per position, e.g. (item, cate) with (hist_items, hist_cates).
    #[serde(default)]
    pub din_pairs: Vec<DinPair>,
}

/// A categorical feature with one id per sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseFeature {
    /// Column name.
    pub name: String,
    /// Number of ids (rows of the embedding table). Inferred from the training
    /// data as max id + 1 when absent, then frozen in the model directory.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Embedding width (8 when absent; a sharing feature takes its table's).
    #[serde(default)]
    pub embedding_dim: Option<usize>,
    /// What to do with an id at or above `vocab_size`.
    #[serde(default)]
    pub oov: Oov,
    /// Use another feature's embedding table instead of an own one.
    #[serde(default)]
    pub shares_embedding_with: Option<String>,
    /// This feature is a function of the item named here (e.g. `cate_id` of
    /// `item_id`): `din train` records item -> value from the training rows
    /// (refusing rows that contradict each other) in the model directory, and
    /// `din serve` fills this feature, and the history paired with it, from
    /// the item ids of a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_feature_of: Option<String>,
}

/// Embedding width used when a table's owner does not set one.
pub const DEFAULT_EMBEDDING_DIM: usize = 8;

/// Policy for ids at or above the vocabulary size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Oov {
    /// Reject the row with an error naming file, line and column.
    #[default]
    Error,
    /// Map it to one extra, zero-initialised row at index `vocab_size`.
    Reserved,
}

/// A numeric feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseFeature {
    /// Column name.
    pub name: String,
    /// Number of values (separated by `sequence_separator` when above 1).
    #[serde(default = "one")]
    pub dim: usize,
}

fn one() -> usize {
    1
}

/// A variable-length sequence of ids, such as a behaviour history. Id 0 is padding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceFeature {
    /// Column name.
    pub name: String,
    /// Longest history kept; longer ones are truncated by `truncation`.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// The feature whose embedding table this sequence uses (e.g. the target item).
    #[serde(default)]
    pub shares_embedding_with: Option<String>,
    /// Own table size when not sharing (inferred when absent).
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Own embedding width when not sharing.
    #[serde(default)]
    pub embedding_dim: Option<usize>,
    /// Own out-of-vocabulary policy when not sharing.
    #[serde(default)]
    pub oov: Oov,
    /// Order of the ids in the file.
    #[serde(default)]
    pub order: SequenceOrder,
    /// Which end to keep when a history is longer than `max_len`.
    #[serde(default)]
    pub truncation: Truncation,
}

fn default_max_len() -> usize {
    50
}

/// Order of a history's ids in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SequenceOrder {
    /// Oldest behaviour first (the DIN paper's Amazon files).
    #[default]
    OldestFirst,
    /// Most recent behaviour first (the tutorial's `movie_sample.txt`).
    RecentFirst,
}

/// Which behaviours to keep when a history exceeds `max_len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the `max_len` most recent behaviours.
    #[default]
    KeepRecent,
    /// Keep the `max_len` oldest behaviours.
    KeepOldest,
}

/// One target feature attended against one history feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DinPair {
    /// A sparse feature (the candidate), e.g. `movie_id`.
    pub target: String,
    /// A sequence feature (the behaviours), e.g. `hist_movie_id`.
    pub history: String,
}

/// The network's shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The local activation unit.
    #[serde(default)]
    pub attention: AttentionConfig,
    /// The DNN tower.
    #[serde(default)]
    pub dnn: DnnConfig,
    /// The precision of inference (`fp32`, `bf16` or `auto`; see
    /// [`crate::model::bf16`]): what a loaded model scores with unless a
    /// command's `--precision` says otherwise. Training has its own,
    /// `train.precision`.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
}

/// Activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationKind {
    /// Parametric ReLU, one slope per channel (initialised to 0, as Keras does).
    Prelu,
    /// Dice (the DIN paper): batch statistics in training, moving averages at inference.
    Dice,
    /// max(x, 0).
    Relu,
    /// 1 / (1 + exp(-x)).
    Sigmoid,
}

/// Normalisation of attention scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Raw scores (the paper: keeps the intensity of interest).
    #[default]
    None,
    /// Softmax over the real behaviours of each sample (the authors' released code).
    Softmax,
}

/// How the history is pooled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Weighted by the local activation unit (DIN).
    #[default]
    Attention,
    /// Plain sum of the behaviours' embeddings (the paper's base model;
    /// for ablations). The activation unit's tensors are kept but unused.
    Sum,
}

/// The local activation unit: an MLP over `[q, k, q-k, q*k]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// Attention pooling (DIN) or plain sum pooling.
    #[serde(default)]
    pub pooling: Pooling,
    /// Hidden layer widths (at least one).
    #[serde(default = "default_attention_units")]
    pub hidden_units: Vec<usize>,
    /// Hidden activation.
    #[serde(default = "default_activation")]
    pub activation: ActivationKind,
    /// Score normalisation.
    #[serde(default)]
    pub normalization: Normalization,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        AttentionConfig {
            pooling: Pooling::Attention,
            hidden_units: default_attention_units(),
            activation: default_activation(),
            normalization: Normalization::None,
        }
    }
}

fn default_attention_units() -> Vec<usize> {
    vec![256, 128, 64]
}
fn default_activation() -> ActivationKind {
    ActivationKind::Prelu
}

/// The DNN tower on top of the concatenated features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnnConfig {
    /// Hidden layer widths (may be empty: logistic regression on the features).
    #[serde(default = "default_dnn_units")]
    pub hidden_units: Vec<usize>,
    /// Hidden activation.
    #[serde(default = "default_activation")]
    pub activation: ActivationKind,
    /// Dropout rate after each hidden layer, in [0, 1).
    #[serde(default, serialize_with = "short_f32")]
    pub dropout: f32,
}

impl Default for DnnConfig {
    fn default() -> Self {
        DnnConfig {
            hidden_units: default_dnn_units(),
            activation: default_activation(),
            dropout: 0.0,
        }
    }
}

fn default_dnn_units() -> Vec<usize> {
    vec![200, 80]
}

/// Writes an f32 as the shortest decimal that reads back to it: `0.001`,
/// not `0.0010000000474974513`, which is what widening it to f64 prints in
/// a generated config.toml or config.json.
fn short_f32<S: serde::Serializer>(x: &f32, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(x.to_string().parse().unwrap_or(f64::from(*x)))
}

/// Optimizers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam (Keras defaults: beta1 0.9, beta2 0.999, epsilon 1e-7); lazy on embedding rows.
    #[default]
    Adam,
    /// Adagrad (initial accumulator 0.1, epsilon 1e-7).
    Adagrad,
    /// Plain stochastic gradient descent.
    Sgd,
}

/// Regularisation kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegularizationKind {
    /// None.
    #[default]
    None,
    /// lambda * ||W||^2 on the MLP weight matrices and on the embedding rows of each batch.
    L2,
    /// The paper's mini-batch-aware regularisation (eq. 4): for each embedding
    /// row j in the batch, lambda / n_j * ||w_j||^2, n_j = the id's count in
    /// the training data.
    MiniBatchAware,
}

/// Regularisation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegularizationConfig {
    /// Which kind.
    #[serde(default)]
    pub kind: RegularizationKind,
    /// Strength.
    #[serde(default, serialize_with = "short_f32")]
    pub lambda: f32,
    /// Strength of L2 on the MLP weight matrices when it differs from the
    /// embeddings' (`lambda`), as DeepCTR's `l2_reg_dnn` next to its
    /// `l2_reg_embedding`. Absent: `lambda` under `l2`, none under
    /// `mini_batch_aware`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "short_f32_option"
    )]
    pub dnn_lambda: Option<f32>,
}

fn short_f32_option<S: serde::Serializer>(x: &Option<f32>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match x {
        Some(x) => short_f32(x, s),
        None => s.serialize_none(),
    }
}

/// Metric watched by early stopping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Validation logloss (lower is better).
    #[default]
    ValLogloss,
    /// Validation AUC (higher is better).
    ValAuc,
    /// Validation GAUC (higher is better).
    ValGauc,
}

impl Monitor {
    /// The name used in configs and reports (`val_logloss`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLogloss => "val_logloss",
            Monitor::ValAuc => "val_auc",
            Monitor::ValGauc => "val_gauc",
        }
    }
}

/// Stop when the monitored metric has not improved for `patience` epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// The metric.
    #[serde(default)]
    pub monitor: Monitor,
    /// Epochs without improvement before stopping (at least 1).
    #[serde(default = "default_patience")]
    pub patience: usize,
    /// Restore the weights of the best epoch before saving (what
    /// `train.keep = "best"`, the default, does anyway).
    #[serde(default)]
    pub restore_best: bool,
}

fn default_patience() -> usize {
    2
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Learning rate.
    #[serde(default = "default_lr", serialize_with = "short_f32")]
    pub learning_rate: f32,
    /// Samples per training step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Samples per inference batch (validation, evaluate, predict).
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// Passes over the training data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Seed for initialisation, shuffling and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Shuffle the training rows every epoch.
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Worker threads (0 = all cores). Same seed and threads give the same model.
    #[serde(default)]
    pub threads: usize,
    /// Regularisation.
    #[serde(default)]
    pub regularization: RegularizationConfig,
    /// Early stopping (off when absent).
    #[serde(default)]
    pub early_stopping: Option<EarlyStoppingConfig>,
    /// Which epoch's weights a run with validation data ends with (and
    /// saves): the best by `early_stopping.monitor` (`val_logloss` without
    /// early stopping), or the last.
    #[serde(default)]
    pub keep: Keep,
    /// What a NaN or infinite loss or gradient does: stop the run naming the
    /// tensor (the model directory keeps the last good epoch), or skip the
    /// batch and count it.
    #[serde(default)]
    pub on_non_finite: OnNonFinite,
    /// Write a training checkpoint every this many batches, and at each
    /// epoch end (0: at epoch ends only). See `din train --resume`.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// How many checkpoints to keep, newest first (0: write none).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// The precision of the training products: `fp32` (the default), or
    /// `bf16`, mixed precision: the products of the hidden layers (those
    /// bf16 inference runs in bf16) take bf16 operands and sum in f32,
    /// forward and backward, while weights, gradients and the optimizer's
    /// state stay f32. On the CPU's bf16 instructions where it has them,
    /// emulated (slower than fp32) where not; `auto` takes bf16 only where
    /// the CPU has them. Opt-in: see `docs/performance.md` for its quality.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
}

/// What training does with a batch whose loss or gradients are not finite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop with an error naming the tensor, the epoch and the batch.
    #[default]
    Stop,
    /// Leave the weights as they were before the batch, count it
    /// (`skipped_batches` in the report) and go on; an epoch that skips
    /// every batch stops the run.
    SkipBatch,
}

/// Which epoch's weights training ends with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// The best epoch by the monitored validation metric.
    #[default]
    Best,
    /// The last epoch run.
    Last,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::Adam,
            learning_rate: default_lr(),
            batch_size: default_batch_size(),
            eval_batch_size: default_eval_batch_size(),
            epochs: default_epochs(),
            seed: default_seed(),
            shuffle: true,
            threads: 0,
            regularization: RegularizationConfig::default(),
            early_stopping: None,
            keep: Keep::Best,
            on_non_finite: OnNonFinite::Stop,
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep_checkpoints(),
            precision: Precision::Fp32,
        }
    }
}

fn default_lr() -> f32 {
    0.001
}
fn default_batch_size() -> usize {
    64
}
fn default_eval_batch_size() -> usize {
    1024
}
fn default_epochs() -> usize {
    10
}
fn default_checkpoint_every() -> usize {
    1000
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_seed() -> u64 {
    2024
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Parses a TOML config. Relative data paths are resolved against the
    /// file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        Config::from_toml_file_with(path, &[])
    }

    /// Like [`Config::from_toml_file`], with `key=value` overrides applied
    /// first: `key` is a dotted path (`model.attention.hidden_units`), `value`
    /// is TOML (`[80, 40]`, `0.01`, `true`, `"sum"`) or a bare string (`sum`).
    pub fn from_toml_file_with(path: &Path, overrides: &[String]) -> Result<Config> {
        let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read config", e))?;
        if !overrides.is_empty() {
            let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::ConfigSyntax {
                path: path.to_path_buf(),
                message: e.message().trim().to_string(),
            })?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            text = toml::to_string(&table).map_err(|e| Error::config("--set", overrides.join(" "), e.to_string()))?;
        }
        let mut config = Config::from_toml_str(&text).map_err(|e| match e {
            Error::ConfigSyntax { message, .. } if overrides.is_empty() => Error::ConfigSyntax {
                path: path.to_path_buf(),
                message,
            },
            // Line numbers would point into the rewritten text: name the overrides instead.
            Error::ConfigSyntax { message, .. } => Error::ConfigSyntax {
                path: PathBuf::from(format!("{} with --set {}", path.display(), overrides.join(" "))),
                message: message.split_once(": ").map_or(message.clone(), |(_, m)| m.to_string()),
            },
            other => other,
        })?;
        // A bare file name has the empty parent, which `absolute` rejects: use ".".
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        config.data.resolve_relative_to(&base);
        Ok(config)
    }

    /// Parses a TOML config from a string (paths stay as written).
    pub fn from_toml_str(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| {
            // One line: "line L, column C: message" (toml's own text spans several).
            let position = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            Error::ConfigSyntax {
                path: PathBuf::from("<config>"),
                message: format!("{}{}", position.unwrap_or_default(), e.message().trim()),
            }
        })
    }
}

/// Sets one dotted key of a TOML table from `key=value`.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| Error::config("--set", assignment, "expected key=value, e.g. train.epochs=3"))?;
    let (key, raw) = (key.trim(), raw.trim());
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Error::config("--set", assignment, "empty key"))?;
    let mut node = table;
    for part in parts {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| Error::config("--set", assignment, format!("`{part}` is not a table")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: None,
            validation: None,
            validation_split: None,
            vocab: None,
            items: None,
            skip_bad_rows: false,
            max_bad_rows_fraction: default_bad_fraction(),
            group: false,
            window_rows: None,
        }
    }
}

impl DataConfig {
    /// Makes relative paths relative to `base`.
    pub fn resolve_relative_to(&mut self, base: &Path) {
        for p in [&mut self.train, &mut self.validation, &mut self.vocab, &mut self.items]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

impl InputConfig {
    /// The delimiter as one byte.
    pub fn delimiter_byte(&self) -> Result<u8> {
        single_byte("input.delimiter", &self.delimiter)
    }

    /// The sequence separator as one byte.
    pub fn separator_byte(&self) -> Result<u8> {
        single_byte("input.sequence_separator", &self.sequence_separator)
    }

    /// The candidate separator as one byte, distinct from the delimiter and
    /// the sequence separator.
    pub fn candidate_separator_byte(&self) -> Result<u8> {
        let c = single_byte("input.candidate_separator", &self.candidate_separator)?;
        if c == self.delimiter_byte()? || c == self.separator_byte()? {
            return Err(Error::config(
                "input.candidate_separator",
                format!("{:?}", self.candidate_separator),
                "must differ from input.delimiter and input.sequence_separator",
            ));
        }
        Ok(c)
    }
}

pub(crate) fn single_byte(field: &str, s: &str) -> Result<u8> {
    match s.as_bytes() {
        [b] => Ok(*b),
        _ => Err(Error::config(
            field,
            format!("{s:?}"),
            "must be exactly one ASCII character",
        )),
    }
}
