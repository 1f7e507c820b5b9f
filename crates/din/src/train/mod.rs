//! Training: data preparation, the loop, loss, optimizers, regularisation,
//! early stopping.

pub mod checkpoints;
pub mod early_stopping;
pub mod loss;
pub mod optim;
pub mod regularization;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use checkpoints::{Checkpoints, DataFingerprint, Resumable, TrainState};
pub use early_stopping::EarlyStopping;
pub use loss::bce_with_logits;
pub use optim::Optimizer;
pub use regularization::regularize;

use crate::checkpoint::Assets;
pub use crate::checkpoint::EpochReport;
use crate::data::{
    add_id_counts, apply_vocab, drop_out_of_vocabulary, id_counts, infer_vocab, read_dataset, stream_dataset, Batch,
    Dataset, ItemTable, LargestIds, ReadOptions, SkippedRows, Vocabulary,
};
use crate::model::{Din, DinCache, EmbeddingGrads, Mode, Module};
use crate::schema::{Config, EarlyStoppingConfig, Keep, Layout, Monitor, OnNonFinite};
use crate::scorer::evaluate;
use crate::threads::thread_pool;
use crate::{Error, Result};

/// Training and validation data, read and checked against a frozen vocabulary.
#[derive(Debug, Clone)]
pub struct TrainingData {
    /// The config with inferred vocabulary sizes written in.
    pub config: Config,
    /// The resolved schema (every vocabulary size known).
    pub layout: Layout,
    /// Training rows: all of them, or none when the file is streamed
    /// (`data.window_rows`, then see `stream`).
    pub train: Dataset,
    /// The training file read in windows, under `data.window_rows`.
    pub stream: Option<StreamedTrain>,
    /// Validation rows (a separate file or the tail of the training file).
    pub validation: Option<Dataset>,
    /// The vocabulary (`data.vocab`) and the item table derived from the
    /// training and validation rows, to be saved with the model.
    pub assets: Assets,
}

/// A training file streamed in windows (`data.window_rows`) instead of held:
/// what a first pass over it found. Each epoch reads it again.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamedTrain {
    /// The file.
    pub path: PathBuf,
    /// Rows per window (each window ends at a group boundary at or after it).
    pub window_rows: usize,
    /// Training rows in the file (malformed and out-of-vocabulary rows
    /// skipped under `data.skip_bad_rows` not counted).
    pub rows: usize,
    /// Windows the file is read in.
    pub windows: usize,
    /// Batches of an epoch: exact for flat data; for grouped data, those
    /// of the file order (a shuffle can pack groups differently).
    pub batches: usize,
    /// How often each id occurs in the file (the mini-batch-aware
    /// regulariser's counts).
    pub counts: Vec<Vec<u32>>,
    /// The rows skipped (`data.skip_bad_rows`).
    pub skipped: SkippedRows,
}

impl TrainingData {
    /// Training rows, held or streamed.
    pub fn train_rows(&self) -> usize {
        self.stream.as_ref().map_or(self.train.len(), |s| s.rows)
    }
}

/// Reads `config.data`: the training file, then the validation file or the
/// Keras-style tail split; infers missing vocabulary sizes from the training
/// rows and checks every id against them; reads `data.vocab` and records the
/// item features (`item_feature_of`) of every row.
pub fn load_training_data(config: &Config) -> Result<TrainingData> {
    let layout = config.validate()?;
    let train_path = config
        .data
        .train
        .clone()
        .ok_or_else(|| Error::config("data.train", "(none)", "name the training file"))?;
    if config.data.skip_bad_rows && !(0.0..=1.0).contains(&config.data.max_bad_rows_fraction) {
        return Err(Error::config(
            "data.max_bad_rows_fraction",
            config.data.max_bad_rows_fraction,
            "must be between 0 and 1",
        ));
    }
    let options = training_read_options(config);
    if let Some(window) = config.data.window_rows {
        return load_streamed(config, layout, &train_path, window, options);
    }
    let train = read_dataset(&train_path, config, &layout, options)?;
    let validation = match &config.data.validation {
        Some(path) => Some(read_dataset(path, config, &layout, options)?),
        None => None,
    };
    held(config, layout, train, validation, options)
}

/// [`load_training_data`] for rows already in memory (an application's
/// arrays, read with [`read_record_batches`](crate::data::read_record_batches),
/// as the Python module does) instead of `config.data`'s files: the same
/// validation split (`data.validation_split`, when `validation` is `None`),
/// vocabulary inference and checks, vocabulary and item table.
pub fn training_data_from(config: &Config, train: Dataset, validation: Option<Dataset>) -> Result<TrainingData> {
    let layout = config.validate()?;
    held(config, layout, train, validation, training_read_options(config))
}

/// The held (not streamed) training rows and the validation rows (`None`:
/// the tail split by `data.validation_split`, if any), checked against the
/// vocabulary sizes (inferred from the training rows where not given).
fn held(
    config: &Config,
    mut layout: Layout,
    mut train: Dataset,
    validation: Option<Dataset>,
    options: ReadOptions,
) -> Result<TrainingData> {
    let mut validation = match (validation, config.data.validation_split) {
        (Some(v), _) => Some(v),
        (None, Some(fraction)) => {
            let (head, tail) = train.split_tail(fraction);
            train = head;
            if train.is_empty() || tail.is_empty() {
                return Err(Error::config(
                    "data.validation_split",
                    fraction,
                    format!(
                        "leaves an empty training or validation set from {} rows",
                        train.len() + tail.len()
                    ),
                ));
            }
            Some(tail)
        }
        (None, None) => None,
    };
    infer_vocab(&mut layout, &train)?;
    for set in std::iter::once(&mut train).chain(validation.as_mut()) {
        check_vocab(&layout, set, options)?;
    }
    let vocab = read_vocab(config, &layout)?;
    let items = if layout.item_features.is_empty() {
        None
    } else {
        let sets: Vec<&Dataset> = std::iter::once(&train).chain(validation.as_ref()).collect();
        let known = match &config.data.items {
            Some(path) => Some((ItemTable::read(path, &layout)?, path.as_path())),
            None => None,
        };
        Some(ItemTable::derive_from(&layout, &sets, known)?)
    };
    let mut config = config.clone();
    config.freeze_vocab(&layout);
    Ok(TrainingData {
        config,
        layout,
        train,
        stream: None,
        validation,
        assets: Assets { vocab, items },
    })
}

/// Checks every id of `set` against the vocabulary sizes: an error, or
/// (`skip_bad_rows`) the rows dropped, within the file's limit.
pub(crate) fn check_vocab(layout: &Layout, set: &mut Dataset, options: ReadOptions) -> Result<()> {
    match options.skip_bad_rows {
        Some(limit) => drop_out_of_vocabulary(layout, set, limit),
        None => apply_vocab(layout, set),
    }
}

/// `data.vocab`, restricted to the tables of `layout`, when given.
pub(crate) fn read_vocab(config: &Config, layout: &Layout) -> Result<Option<Vocabulary>> {
    config
        .data
        .vocab
        .as_ref()
        .map(|p| Vocabulary::read(p).map(|v| v.restricted_to(layout)))
        .transpose()
}

/// Checks a window read from `path` against the vocabulary: out-of-range
/// ids are an error, or (`skip_bad_rows`) their rows are dropped and
/// counted in `window.skipped` (the file-wide limit is checked by the
/// caller). `false` when no row is left.
fn check_window(layout: &Layout, window: &mut Dataset, options: ReadOptions) -> Result<bool> {
    match options.skip_bad_rows {
        None => apply_vocab(layout, window).map(|()| true),
        Some(_) => match drop_out_of_vocabulary(layout, window, 1.0) {
            Ok(()) => Ok(true),
            Err(Error::EmptyFile { .. }) => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// Adds `more` skipped rows to `all`, keeping the first by line.
fn merge_skipped(all: &mut SkippedRows, more: &SkippedRows) {
    all.count += more.count;
    all.first.extend(more.first.iter().cloned());
    all.first.sort_by_key(|(line, _)| *line);
    all.first.truncate(SkippedRows::KEPT);
}

/// The item table of a streamed training file, derived window by window
/// (each checked against the table so far), then from the validation rows.
struct StreamedItems {
    /// The table so far, and the file its values came from.
    table: Option<(ItemTable, PathBuf)>,
    path: PathBuf,
}

impl StreamedItems {
    /// Starting from `data.items` (`known`), if given, for the training file `path`.
    fn new(known: Option<&Path>, path: &Path, layout: &Layout) -> Result<StreamedItems> {
        let table = match known {
            Some(p) => Some((ItemTable::read(p, layout)?, p.to_path_buf())),
            None => None,
        };
        Ok(StreamedItems {
            table,
            path: path.to_path_buf(),
        })
    }

    /// Takes in a window's rows (a conflict with an earlier one is an error).
    fn add(&mut self, layout: &Layout, window: &Dataset) -> Result<()> {
        let derived = Self::derive(self.table.take(), layout, &[window])?;
        self.table = Some((derived, self.path.clone()));
        Ok(())
    }

    /// The table, completed from `sets` (the validation rows).
    fn finish(self, layout: &Layout, sets: &[&Dataset]) -> Result<ItemTable> {
        Self::derive(self.table, layout, sets)
    }

    /// `table` (if any) extended by the rows of `sets`.
    fn derive(table: Option<(ItemTable, PathBuf)>, layout: &Layout, sets: &[&Dataset]) -> Result<ItemTable> {
        let (known, from) = table.unzip();
        ItemTable::derive_from(layout, sets, known.zip(from.as_deref()))
    }
}

/// [`load_training_data`] under `data.window_rows`: a first pass over the
/// training file infers the vocabulary sizes, checks every id, counts rows,
/// skipped rows and ids, and derives the item table (in a second pass when
/// an item's table size is inferred); nothing of the file is kept but those.
fn load_streamed(
    config: &Config,
    mut layout: Layout,
    path: &Path,
    window_rows: usize,
    options: ReadOptions,
) -> Result<TrainingData> {
    // The tables whose size is given are checked in the first pass; the
    // others take their size from it (no id of theirs can be outside).
    let mut given = layout.clone();
    for t in given.tables.iter_mut().filter(|t| t.vocab_size.is_none()) {
        t.vocab_size = Some(u32::MAX as usize + 1);
        t.oov = crate::schema::Oov::Error;
    }
    let mut largest = LargestIds::new(&layout);
    let mut counts: Vec<Vec<u32>> = vec![Vec::new(); layout.tables.len()];
    // The item table, derived window by window: in the first pass when
    // every item's table size is given, else in a second.
    let mut items = match layout.item_features.is_empty() {
        true => None,
        false => Some(StreamedItems::new(config.data.items.as_deref(), path, &layout)?),
    };
    let items_in_first_pass =
        (layout.item_features.iter()).all(|f| layout.tables[layout.sparse[f.key].table].vocab_size.is_some());
    let (mut rows, mut windows, mut batches) = (0, 0, 0);
    let mut skipped = SkippedRows::default();
    let batch_size = config.train.batch_size;
    let read = stream_dataset(path, config, &layout, options, window_rows, &mut |mut w| {
        if check_window(&given, &mut w, options)? {
            if let Some(table) = items.as_mut().filter(|_| items_in_first_pass) {
                table.add(&given, &w)?;
            }
            largest.add(&layout, &w);
            add_id_counts(&given, &w, &mut counts);
            let groups = w.batch.is_grouped().then_some(w.batch.groups.as_slice());
            let order: Vec<usize> = (0..w.batch.group_count()).collect();
            batches += batch_bounds(&order, groups, batch_size).len() - 1;
            rows += w.len();
            windows += 1;
        }
        merge_skipped(&mut skipped, &w.skipped);
        Ok(true)
    })?;
    merge_skipped(&mut skipped, &read.unwrap_or_default());
    if let Some(limit) = options.skip_bad_rows {
        skipped.check_limit(path, rows + skipped.count, limit)?;
    }
    if rows == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    largest.infer(&mut layout, path)?;
    for (c, t) in counts.iter_mut().zip(&layout.tables) {
        c.resize(t.rows(), 0);
    }
    let mut validation = match &config.data.validation {
        Some(p) => Some(read_dataset(p, config, &layout, options)?),
        None => None,
    };
    if let Some(v) = validation.as_mut() {
        check_vocab(&layout, v, options)?;
    }
    let vocab = read_vocab(config, &layout)?;
    let items = match items {
        None => None,
        Some(mut table) => {
            if !items_in_first_pass {
                stream_dataset(path, config, &layout, options, window_rows, &mut |mut w| {
                    if check_window(&layout, &mut w, options)? {
                        table.add(&layout, &w)?;
                    }
                    Ok(true)
                })?;
            }
            let sets: Vec<&Dataset> = validation.iter().collect();
            Some(table.finish(&layout, &sets)?)
        }
    };
    let mut config = config.clone();
    config.freeze_vocab(&layout);
    let train = Dataset {
        source: path.to_path_buf(),
        lines: Vec::new(),
        batch: Batch::default(),
        users: None,
        skipped: SkippedRows::default(),
    };
    Ok(TrainingData {
        config,
        layout,
        train,
        stream: Some(StreamedTrain {
            path: path.to_path_buf(),
            window_rows,
            rows,
            windows,
            batches,
            counts,
            skipped,
        }),
        validation,
        assets: Assets { vocab, items },
    })
}

/// Receives progress during [`fit`]; the library itself prints nothing.
pub trait Observer {
    /// After each training batch: batches done out of the epoch's total, and
    /// the running mean loss.
    fn on_batch(&mut self, _epoch: usize, _done: usize, _total: usize, _running_loss: f64) {}
    /// After each epoch, with the model the run would end with if it ended
    /// now (the best epoch's so far under `train.keep = "best"`, else the
    /// current one), e.g. to save it.
    fn on_epoch(&mut self, _report: &EpochReport, _model: &Din) -> Result<()> {
        Ok(())
    }
    /// After each epoch of distributed training
    /// ([`fit_distributed`](crate::distributed::fit_distributed)), which
    /// holds the model sharded over the ranks and saves it itself: the
    /// epoch's report (its validation metrics on rank 0 only).
    fn on_distributed_epoch(&mut self, _report: &EpochReport) -> Result<()> {
        Ok(())
    }
    /// Between a batch's backward pass and its optimizer step: the dense
    /// gradients are in `model`'s parameters, the embedding rows' in
    /// `embeddings`. For inspection, clipping, or injecting faults in tests.
    fn on_gradients(&mut self, _epoch: usize, _batch: usize, _model: &mut Din, _embeddings: &mut EmbeddingGrads) {}
    /// A batch skipped under `train.on_non_finite = "skip_batch"`, and why
    /// (the tensor that was not finite).
    fn on_skipped_batch(&mut self, _epoch: usize, _batch: usize, _reason: &str) {}
    /// Before each step of writing a checkpoint: `state.safetensors`,
    /// `state.json` (each file), `sync`, `rename`, `prune`. An error stops
    /// the write there, as a crash would (for fault-injection tests).
    fn on_checkpoint_step(&mut self, _step: &str) -> Result<()> {
        Ok(())
    }
    /// After a checkpoint has been written, with its folder.
    fn on_checkpoint(&mut self, _path: &Path) {}
    /// After each training batch's forward pass: the rows of the batch
    /// (indices into the training rows, or into the window of a streamed
    /// file), their labels and the logits the model gave them while
    /// training (e.g. for the epoch's training AUC).
    fn on_outputs(&mut self, _epoch: usize, _rows: &[usize], _labels: &[f32], _logits: &[f32]) {}
    /// Asked after each batch and after each epoch's [`Observer::on_epoch`]:
    /// `false` stops training there. After a batch (e.g. on ctrl-c), [`fit`]
    /// returns the weights as they are, with [`TrainOutcome::interrupted`]
    /// set; after an epoch, the run ends as if that epoch were its last
    /// (Keras' `model.stop_training`).
    fn keep_going(&mut self) -> bool {
        true
    }
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// The result of [`fit`].
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The trained model (the best epoch's under `train.keep = "best"`).
    pub model: Din,
    /// One report per epoch run.
    pub history: Vec<EpochReport>,
    /// The best epoch by the monitor (`early_stopping.monitor`, else
    /// `val_logloss`), when there is validation data.
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// The epoch whose weights `model` holds.
    pub model_epoch: usize,
    /// Whether the observer stopped training between batches
    /// ([`Observer::keep_going`]); then `model` holds the weights after the
    /// last batch run, and `history` the epochs completed before it.
    pub interrupted: bool,
    /// The optimizer and its moments at the end: with `model`, what a
    /// further call to [`fit_continuing`] goes on from (`None` where no one
    /// process holds them all: distributed training's are sharded).
    pub optimizer: Option<Optimizer>,
    /// Where the shuffle and dropout random streams ended.
    pub rng_positions: [u128; 2],
    /// The last epoch's row order (each epoch shuffles the one before).
    pub order: Vec<usize>,
}

/// Where [`fit_continuing`] starts: the weights, optimizer state and random
/// streams of an earlier run (a second `fit` in Keras' sense).
#[derive(Debug, Clone)]
pub struct Start {
    /// The weights to train on from (built for the data's layout).
    pub model: Din,
    /// The optimizer and its moments.
    pub optimizer: Optimizer,
    /// Word positions of the shuffle and dropout random streams (`[0, 0]`
    /// for a run's first `fit`).
    pub rng_positions: [u128; 2],
    /// The row (or group) order the next epoch shuffles; when it does not
    /// fit the data (empty, for a first `fit`), the file order.
    pub order: Vec<usize>,
}

impl Start {
    /// A new run's start, as [`fit`] makes it: the model initialised from
    /// `train.seed`, the optimizer empty, the random streams at their start.
    pub fn new(data: &TrainingData) -> Result<Start> {
        let tc = &data.config.train;
        let model = Din::new(&data.layout, &data.config.model, tc.seed)?;
        Ok(Start {
            optimizer: Optimizer::new(tc.optimizer, tc.learning_rate, &model),
            model,
            rng_positions: [0, 0],
            order: Vec::new(),
        })
    }
}

/// Trains on `data` from `start` (without checkpoints) for
/// `train.epochs` more epochs, numbered from 1. With [`Start::new`] this is
/// [`fit`]; with the model, optimizer and random streams of an earlier
/// [`TrainOutcome`] it goes on where that run ended.
pub fn fit_continuing(data: &TrainingData, start: Start, observer: &mut (dyn Observer + Send)) -> Result<TrainOutcome> {
    if start.model.layout != data.layout {
        return Err(Error::Training(
            "the model to continue from was built for another schema or other vocabulary sizes than the data".into(),
        ));
    }
    thread_pool(data.config.train.threads)?.install(|| run(TrainState::new(data, start), data, None, observer))
}

/// Trains a model from scratch on `data` with `data.config.train`, without
/// checkpoints.
pub fn fit(data: &TrainingData, observer: &mut (dyn Observer + Send)) -> Result<TrainOutcome> {
    fit_with(data, None, None, observer)
}

/// [`fit`], writing checkpoints with `checkpoints` and, with `resume`,
/// continuing from one (read by [`checkpoints::latest`] or
/// [`checkpoints::read`] with the config it holds, and `data` loaded with
/// that config). A resumed run ends with bitwise the model of an
/// uninterrupted one, given the same thread count.
///
/// A fresh run with checkpoints first removes any earlier run's
/// checkpoints from the folder, and refuses to if that run is unfinished
/// (it is resumed, or its folder removed, by the user).
pub fn fit_with(
    data: &TrainingData,
    checkpoints: Option<&Checkpoints>,
    resume: Option<Resumable>,
    observer: &mut (dyn Observer + Send),
) -> Result<TrainOutcome> {
    let tc = &data.config.train;
    // Read once: recorded in the checkpoints, and checked on resuming.
    let fingerprints = match (checkpoints, &resume) {
        (None, None) => Vec::new(),
        _ => DataFingerprint::of_config(&data.config)?,
    };
    if let Some(r) = &resume {
        r.check_data(
            &fingerprints,
            data.stream.is_none().then(|| data.train.batch.group_count()),
        )?;
    } else if let Some(policy) = checkpoints {
        if let Some((earlier, _)) = checkpoints::latest(&policy.dir).ok().flatten() {
            if !earlier.state.finished {
                return Err(Error::Checkpoint {
                    path: policy.dir.clone(),
                    reason: format!(
                        "holds the checkpoints of an unfinished run (epoch {}, batch {}): continue it with `din train --resume {}`, or remove the folder to start over",
                        earlier.state.epoch,
                        earlier.state.batches_done,
                        policy.dir.display()
                    ),
                });
            }
        }
        checkpoints::clear(&policy.dir)?;
    }
    thread_pool(tc.threads)?.install(|| {
        let state = match resume {
            Some(r) => r.state,
            None => TrainState::new(data, Start::new(data)?),
        };
        run(state, data, checkpoints.map(|c| (c, fingerprints.as_slice())), observer)
    })
}

/// The malformed rows skipped in each data file (with `data.skip_bad_rows`).
fn skipped_rows(data: &TrainingData) -> BTreeMap<String, SkippedRows> {
    let streamed = data.stream.as_ref().map(|s| (&s.path, &s.skipped));
    let held = std::iter::once(&data.train)
        .chain(data.validation.as_ref())
        .map(|d| (&d.source, &d.skipped));
    streamed
        .into_iter()
        .chain(held)
        .filter(|(_, s)| s.count > 0)
        .map(|(p, s)| (p.display().to_string(), s.clone()))
        .collect()
}

/// The first gradient that is not finite, named: a dense tensor, or an
/// embedding table's row.
pub(crate) fn non_finite_gradient(model: &Din, emb: &EmbeddingGrads, layout: &Layout) -> Option<String> {
    let mut found = None;
    model.visit("", &mut |name, p| {
        if found.is_none() {
            if let Some(i) = first_non_finite(&p.grad) {
                found = Some(format!("the gradient of `{name}` is {} (element {i})", p.grad[i]));
            }
        }
    });
    if found.is_some() {
        return found;
    }
    emb.iter().enumerate().find_map(|(t, g)| {
        let k = first_non_finite(&g.grads)?;
        let row = g.ids.get(k / g.dim.max(1)).copied().unwrap_or(0);
        let table = layout.tables.get(t).map_or("?", |t| t.name.as_str());
        Some(format!(
            "the gradient of `embeddings.{table}.weight` row {row} is {}",
            g.grads[k]
        ))
    })
}

/// The index of the first infinite or NaN value of `v`. Blocks of 256 are
/// tested with a bit mask ORed over the block (the compiler vectorises it;
/// a search stopping at the first value does not), and only a block with
/// one is searched.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    v.chunks(256).enumerate().find_map(|(b, block)| {
        let any = block
            .iter()
            .fold(false, |any, x| any | ((x.to_bits() & EXPONENT) == EXPONENT));
        any.then(|| b * 256 + block.iter().position(|x| !x.is_finite()).unwrap_or(0))
    })
}

impl TrainState {
    /// A new run's state from `start`, before its first epoch, the rows in
    /// file order.
    fn new(data: &TrainingData, start: Start) -> TrainState {
        let tc = &data.config.train;
        // The best epoch is tracked whenever there is validation data; early
        // stopping only adds the patience.
        let monitor = tc.early_stopping.clone().unwrap_or(EarlyStoppingConfig {
            monitor: Monitor::ValLogloss,
            patience: usize::MAX,
            restore_best: false,
        });
        TrainState {
            epoch: 0,
            batches_done: 0,
            epoch_done: true,
            finished: false,
            stopped_early: false,
            loss_sum: 0.0,
            skipped: 0,
            seconds: 0.0,
            rng_positions: start.rng_positions,
            tracker: data.validation.as_ref().map(|_| EarlyStopping::new(monitor)),
            history: Vec::new(),
            optimizer: start.optimizer,
            model: start.model,
            best_model: None,
            // Groups, for grouped data: batches keep them whole (a streamed
            // file's windows each start their own order).
            order: match start.order.len() == data.train.batch.group_count() {
                true => start.order,
                false => (0..data.train.batch.group_count()).collect(),
            },
            batches_before: 0,
            window: 0,
            window_batches_done: 0,
        }
    }
}

/// Where each batch starts in `order`, then `order.len()`: `batch_size`
/// rows each, or (grouped data, `groups` holding where each group's rows
/// start) whole groups, as many as fit in `batch_size` rows; a group larger
/// than that is a batch of its own.
pub(crate) fn batch_bounds(order: &[usize], groups: Option<&[u32]>, batch_size: usize) -> Vec<usize> {
    let Some(g) = groups else {
        let mut b: Vec<usize> = (0..order.len()).step_by(batch_size.max(1)).collect();
        b.push(order.len());
        return b;
    };
    let mut bounds = vec![0];
    let mut filled = 0;
    for (i, &u) in order.iter().enumerate() {
        let size = (g[u + 1] - g[u]) as usize;
        if filled > 0 && filled + size > batch_size {
            bounds.push(i);
            filled = 0;
        }
        filled += size;
    }
    if bounds[bounds.len() - 1] != order.len() {
        bounds.push(order.len());
    }
    bounds
}

/// A training batch and the rows of the data set it holds.
#[derive(Default)]
struct Gathered {
    batch: Batch,
    rows: Vec<usize>,
}

impl Gathered {
    /// Gathers `units` of `window`: rows, or with grouped data whole groups.
    fn gather(&mut self, window: &Dataset, units: &[usize]) {
        self.rows.clear();
        self.rows.extend(units.iter().flat_map(|&u| window.batch.group_rows(u)));
        window.batch.gather_into(&self.rows, &mut self.batch);
    }
}

/// A random stream of the run: `stream` of `seed`, at `position`.
pub(crate) fn stream(seed: u64, stream: u64, position: u128) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos(position);
    rng
}

/// The random streams of a run: shuffling and dropout, both from the one seed.
struct Streams {
    shuffle: ChaCha8Rng,
    dropout: ChaCha8Rng,
}

/// What the training loop works with: its inputs, and the buffers reused
/// from step to step (no allocation in the steady state).
struct Loop<'a> {
    data: &'a TrainingData,
    checkpoints: Option<(&'a Checkpoints, &'a [DataFingerprint])>,
    /// The regulariser's id counts.
    counts: &'a [Vec<u32>],
    dlogits: Vec<f32>,
    cache: DinCache,
    emb: EmbeddingGrads,
    /// The batch that trains, and the next one, gathered meanwhile.
    current: Gathered,
    next: Gathered,
    rng: Streams,
}

impl Loop<'_> {
    /// Writes a checkpoint of `s`, when the run writes them.
    fn save(&self, s: &mut TrainState, observer: &mut (dyn Observer + Send)) -> Result<()> {
        let Some((policy, fingerprints)) = self.checkpoints else {
            return Ok(());
        };
        s.rng_positions = [self.rng.shuffle.get_word_pos(), self.rng.dropout.get_word_pos()];
        let done = s.batches_before + s.batches_done as u64;
        let streamed = self.data.stream.is_some();
        let path = checkpoints::write(
            policy,
            &self.data.config,
            streamed,
            fingerprints,
            s,
            done,
            &mut |step| observer.on_checkpoint_step(step),
        )?;
        observer.on_checkpoint(&path);
        Ok(())
    }

    /// Runs the batches of `window` (the training rows held, or one window
    /// of a streamed file) in `s.order` from `s.window_batches_done` on.
    /// `epoch_batches`: a streamed epoch's batches (for progress); `None`
    /// when the window is the whole epoch. `false` when the observer
    /// stopped training ([`Observer::keep_going`]).
    fn window(
        &mut self,
        s: &mut TrainState,
        window: &Dataset,
        epoch_batches: Option<usize>,
        start: Instant,
        observer: &mut (dyn Observer + Send),
    ) -> Result<bool> {
        let data = self.data;
        let tc = &data.config.train;
        let every = self.checkpoints.map_or(0, |c| c.0.every);
        // Grouped data: where each group's rows start; batches take whole groups.
        let groups = window.batch.is_grouped().then_some(window.batch.groups.as_slice());
        let bounds = batch_bounds(&s.order, groups, tc.batch_size);
        let n = bounds.len() - 1;
        let (total, last) = (epoch_batches.unwrap_or(n), epoch_batches.is_none());
        let epoch = s.epoch;
        let spinners = crate::threads::Spinners::new();
        // Batch `i`'s units of `s.order`.
        let units = |i: usize| bounds[i]..bounds[i + 1];
        if s.window_batches_done < n {
            self.current.gather(window, &s.order[units(s.window_batches_done)]);
        }
        for i in s.window_batches_done..n {
            spinners.ensure();
            let Gathered { batch, rows } = &self.current;
            let (cache, emb) = (&mut self.cache, &mut self.emb);
            let model = &mut s.model;
            // One pass chunk by chunk where the model allows it, else the
            // forward pass, then (with a finite loss) the backward pass.
            let whole = model.steps_in_chunks(batch);
            let logits = if whole {
                model.zero_grad();
                model.train_step_into(batch, cache, emb)
            } else {
                model.forward_into(batch, Mode::Train, Some(&mut self.rng.dropout), cache)
            };
            observer.on_outputs(epoch, rows, &batch.labels, logits);
            let loss = bce_with_logits(logits, &batch.labels, &mut self.dlogits);
            let mut fault = (!loss.is_finite()).then(|| format!("the loss is {loss} (the output logits)"));
            s.window_batches_done = i + 1;
            s.batches_done += 1;
            let done = s.batches_done;
            // The next batch is gathered on another worker while this
            // one's gradients are finished, checked and applied: the
            // gather waits on memory (rows anywhere in the data set), and
            // the optimizer's step has serial parts, which it fills.
            let (optimizer, loss_sum, dlogits) = (&mut s.optimizer, &mut s.loss_sum, &self.dlogits);
            let next = &mut self.next;
            let next_units = (i + 1 < n).then(|| &s.order[units(i + 1)]);
            rayon::join(
                || {
                    if fault.is_none() {
                        if !whole {
                            model.zero_grad();
                            model.backward_into(batch, cache, dlogits, emb);
                        }
                        regularize(&tc.regularization, model, emb, self.counts);
                        observer.on_gradients(epoch, done, model, emb);
                        fault = non_finite_gradient(model, emb, &data.layout);
                    }
                    if fault.is_none() {
                        optimizer.step(model, emb);
                        model.update_statistics(cache);
                        *loss_sum += loss;
                    }
                },
                || {
                    if let Some(units) = next_units {
                        next.gather(window, units);
                    }
                },
            );
            std::mem::swap(&mut self.current, &mut self.next);
            if let Some(what) = fault {
                let place = format!("epoch {epoch}, batch {done} of {}", total.max(done));
                match tc.on_non_finite {
                    OnNonFinite::Stop => {
                        return Err(Error::Training(format!(
                            "{what} at {place}; lower train.learning_rate, check the data, or set train.on_non_finite = \"skip_batch\" (the model directory keeps the last good epoch, the checkpoints folder the last good checkpoint)"
                        )))
                    }
                    OnNonFinite::SkipBatch => {
                        observer.on_skipped_batch(epoch, done, &what);
                        s.skipped += 1;
                    }
                }
            }
            observer.on_batch(
                epoch,
                done,
                total.max(done),
                s.loss_sum / (done - s.skipped).max(1) as f64,
            );
            // The epoch's last batch is followed by the epoch-end checkpoint
            // (which, streaming, replaces one written here).
            if every > 0 && (s.batches_before + done as u64).is_multiple_of(every as u64) && !(last && i + 1 == n) {
                s.seconds = start.elapsed().as_secs_f64();
                self.save(s, observer)?;
            }
            if !observer.keep_going() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One epoch of a streamed training file from `s.window` on: a reader
    /// thread reads the next window while one trains, each window's rows
    /// shuffled on their own. `false` when the observer stopped training.
    fn streamed_epoch(
        &mut self,
        s: &mut TrainState,
        stream: &StreamedTrain,
        start: Instant,
        observer: &mut (dyn Observer + Send),
    ) -> Result<bool> {
        let data = self.data;
        let options = training_read_options(&data.config);
        std::thread::scope(|scope| -> Result<bool> {
            // A rendezvous: the reader builds the next window while this one
            // trains, and hands it over when asked (two windows at most).
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Dataset>>(0);
            scope.spawn(move || {
                let read = stream_dataset(
                    &stream.path,
                    &data.config,
                    &data.layout,
                    options,
                    stream.window_rows,
                    &mut |w| Ok(tx.send(Ok(w)).is_ok()),
                );
                if let Err(e) = read {
                    let _ = tx.send(Err(e));
                }
            });
            let mut index = 0;
            for window in rx {
                let mut window = window?;
                if !check_window(&data.layout, &mut window, options)? {
                    continue;
                }
                if index < s.window {
                    index += 1; // done before the checkpoint resumed from
                    continue;
                }
                let units = window.batch.group_count();
                if s.window_batches_done == 0 {
                    s.order.clear();
                    s.order.extend(0..units);
                    if data.config.train.shuffle {
                        s.order.shuffle(&mut self.rng.shuffle);
                    }
                } else if s.order.len() != units {
                    return Err(Error::Checkpoint {
                        path: stream.path.clone(),
                        reason: format!(
                            "window {} holds {units} rows (or groups), the checkpoint's order {}: the file or data.window_rows is not the run's",
                            index + 1,
                            s.order.len()
                        ),
                    });
                }
                if !self.window(s, &window, Some(stream.batches), start, observer)? {
                    return Ok(false);
                }
                index += 1;
                s.window = index;
                s.window_batches_done = 0;
            }
            Ok(true)
        })
    }
}

/// How the training and validation files are read.
pub(crate) fn training_read_options(config: &Config) -> ReadOptions {
    ReadOptions {
        require_label: true,
        skip_bad_rows: config.data.skip_bad_rows.then_some(config.data.max_bad_rows_fraction),
    }
}

/// The training loop from `s` on, writing checkpoints when given a policy
/// (with the data fingerprints to record).
fn run(
    mut s: TrainState,
    data: &TrainingData,
    checkpoints: Option<(&Checkpoints, &[DataFingerprint])>,
    observer: &mut (dyn Observer + Send),
) -> Result<TrainOutcome> {
    let tc = &data.config.train;
    let held_counts;
    let counts = match &data.stream {
        Some(stream) => stream.counts.as_slice(),
        None => {
            held_counts = id_counts(&data.layout, &data.train);
            held_counts.as_slice()
        }
    };
    let keep_best = tc.keep == Keep::Best || tc.early_stopping.as_ref().is_some_and(|c| c.restore_best);
    // Not saved with the model: a resumed run takes it from the config.
    s.model.set_training_precision(tc.precision);
    let mut lp = Loop {
        data,
        checkpoints,
        counts,
        dlogits: Vec::new(),
        cache: DinCache::default(),
        emb: EmbeddingGrads::new(),
        current: Gathered::default(),
        next: Gathered::default(),
        // Separate streams for shuffling and dropout, both from the one seed.
        rng: Streams {
            shuffle: stream(tc.seed, 1, s.rng_positions[0]),
            dropout: stream(tc.seed, 2, s.rng_positions[1]),
        },
    };

    while !s.finished {
        if s.epoch_done {
            if s.epoch == tc.epochs {
                s.finished = true;
                break;
            }
            s.batches_before += s.batches_done as u64;
            s.epoch += 1;
            s.epoch_done = false;
            (s.batches_done, s.loss_sum, s.skipped, s.seconds) = (0, 0.0, 0, 0.0);
            (s.window, s.window_batches_done) = (0, 0);
            if tc.shuffle && data.stream.is_none() {
                s.order.shuffle(&mut lp.rng.shuffle);
            }
        }
        let epoch = s.epoch;
        let start = Instant::now()
            .checked_sub(Duration::from_secs_f64(s.seconds))
            .unwrap_or_else(Instant::now);
        let went_on = match &data.stream {
            Some(stream) => lp.streamed_epoch(&mut s, stream, start, observer)?,
            None => lp.window(&mut s, &data.train, None, start, observer)?,
        };
        if !went_on {
            return Ok(TrainOutcome {
                model_epoch: s.history.len(),
                history: s.history,
                best_epoch: s.tracker.as_ref().and_then(|e| e.best()).map(|b| b.0),
                stopped_early: false,
                interrupted: true,
                rng_positions: [lp.rng.shuffle.get_word_pos(), lp.rng.dropout.get_word_pos()],
                optimizer: Some(s.optimizer),
                model: s.model,
                order: s.order,
            });
        }
        let n_batches = s.batches_done;
        if s.skipped > 0 && s.skipped == n_batches {
            return Err(Error::Training(format!(
                "every batch of epoch {epoch} had a loss or gradient that is not finite; nothing was learned"
            )));
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let validation = data
            .validation
            .as_ref()
            .map(|v| evaluate(&s.model, v, tc.eval_batch_size));
        let report = EpochReport {
            epoch,
            train_loss: s.loss_sum / (n_batches - s.skipped).max(1) as f64,
            validation,
            seconds: start.elapsed().as_secs_f64(),
            samples_per_second: data.train_rows() as f64 / train_seconds.max(1e-9),
            skipped_batches: s.skipped,
            // Reported once, with the first epoch.
            skipped_rows: if epoch == 1 {
                skipped_rows(data)
            } else {
                BTreeMap::new()
            },
        };
        let mut stop = false;
        if let (Some(es), Some(v)) = (s.tracker.as_mut(), &report.validation) {
            if es.observe(epoch, v) && keep_best {
                s.best_model = Some(s.model.clone());
            }
            stop = tc.early_stopping.is_some() && es.should_stop();
        }
        observer.on_epoch(&report, s.best_model.as_ref().unwrap_or(&s.model))?;
        s.history.push(report);
        s.epoch_done = true;
        s.seconds = start.elapsed().as_secs_f64();
        if stop && epoch < tc.epochs {
            s.stopped_early = true;
        }
        s.finished = s.stopped_early || epoch == tc.epochs || !observer.keep_going();
        lp.save(&mut s, observer)?;
    }
    let best_epoch = s.tracker.as_ref().and_then(|e| e.best()).map(|b| b.0);
    let model_epoch = match (&s.best_model, best_epoch) {
        (Some(_), Some(best)) => best,
        _ => s.history.len(),
    };
    Ok(TrainOutcome {
        model: s.best_model.unwrap_or(s.model),
        history: s.history,
        best_epoch,
        stopped_early: s.stopped_early,
        model_epoch,
        interrupted: false,
        optimizer: Some(s.optimizer),
        rng_positions: [lp.rng.shuffle.get_word_pos(), lp.rng.dropout.get_word_pos()],
        order: s.order,
    })
}

#[cfg(test)]
mod tests {
    use super::{batch_bounds, first_non_finite};

    #[test]
    fn the_first_non_finite_value_is_found_anywhere() {
        let finite = [0.0, -0.0, 1.0, -3.0e38, f32::MAX, f32::MIN_POSITIVE, 1e-45];
        let base: Vec<f32> = (0..1000).map(|i| finite[i % finite.len()]).collect();
        assert_eq!(first_non_finite(&base), None);
        assert_eq!(first_non_finite(&[]), None);
        for at in [0, 1, 255, 256, 257, 511, 999] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
                let mut v = base.clone();
                v[at] = bad;
                if at + 3 < v.len() {
                    v[at + 3] = f32::NAN; // a later one does not count
                }
                assert_eq!(first_non_finite(&v), Some(at), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn flat_batches_are_batch_size_rows() {
        let order: Vec<usize> = (0..10).rev().collect();
        assert_eq!(batch_bounds(&order, None, 4), vec![0, 4, 8, 10]);
        assert_eq!(batch_bounds(&[], None, 4), vec![0]);
    }

    #[test]
    fn grouped_batches_take_whole_groups_that_fit() {
        // Groups of 3, 2, 5, 1 and 4 rows.
        let starts = [0, 3, 5, 10, 11, 15];
        // In order: 3+2 | 5 | 1+4 (a 6th row would not fit in 5).
        assert_eq!(batch_bounds(&[0, 1, 2, 3, 4], Some(&starts), 5), vec![0, 2, 3, 5]);
        // A group larger than the batch is a batch of its own.
        assert_eq!(batch_bounds(&[3, 2, 0], Some(&starts), 4), vec![0, 1, 2, 3]);
        // Groups of one row: the flat batches.
        let ones: Vec<u32> = (0..=10).collect();
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(batch_bounds(&order, Some(&ones), 4), batch_bounds(&order, None, 4));
        assert_eq!(batch_bounds(&[], Some(&ones), 4), vec![0]);
    }
}
