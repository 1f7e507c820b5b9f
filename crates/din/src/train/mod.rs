//! Training: data preparation, the loop, loss, optimizers, regularisation,
//! early stopping.

pub mod early_stopping;
pub mod loss;
pub mod optim;
pub mod regularization;

use std::collections::BTreeMap;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use early_stopping::EarlyStopping;
pub use loss::bce_with_logits;
pub use optim::Optimizer;
pub use regularization::regularize;

use crate::checkpoint::Assets;
pub use crate::checkpoint::EpochReport;
use crate::data::{
    apply_vocab, id_counts, infer_vocab, read_dataset, Batch, Dataset, ItemTable, ReadOptions, SkippedRows, Vocabulary,
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
    /// Training rows.
    pub train: Dataset,
    /// Validation rows (a separate file or the tail of the training file).
    pub validation: Option<Dataset>,
    /// The vocabulary (`data.vocab`) and the item table derived from the
    /// training and validation rows, to be saved with the model.
    pub assets: Assets,
}

/// Reads `config.data`: the training file, then the validation file or the
/// Keras-style tail split; infers missing vocabulary sizes from the training
/// rows and checks every id against them; reads `data.vocab` and records the
/// item features (`item_feature_of`) of every row.
pub fn load_training_data(config: &Config) -> Result<TrainingData> {
    let mut layout = config.validate()?;
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
    let options = ReadOptions {
        require_label: true,
        skip_bad_rows: config.data.skip_bad_rows.then_some(config.data.max_bad_rows_fraction),
    };
    let mut train = read_dataset(&train_path, config, &layout, options)?;
    let mut validation = match (&config.data.validation, config.data.validation_split) {
        (Some(path), _) => Some(read_dataset(path, config, &layout, options)?),
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
    apply_vocab(&layout, &mut train)?;
    if let Some(v) = validation.as_mut() {
        apply_vocab(&layout, v)?;
    }
    let vocab = match &config.data.vocab {
        Some(path) => Some(Vocabulary::read(path)?.restricted_to(&layout)),
        None => None,
    };
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
    /// Between a batch's backward pass and its optimizer step: the dense
    /// gradients are in `model`'s parameters, the embedding rows' in
    /// `embeddings`. For inspection, clipping, or injecting faults in tests.
    fn on_gradients(&mut self, _epoch: usize, _batch: usize, _model: &mut Din, _embeddings: &mut EmbeddingGrads) {}
    /// A batch skipped under `train.on_non_finite = "skip_batch"`, and why
    /// (the tensor that was not finite).
    fn on_skipped_batch(&mut self, _epoch: usize, _batch: usize, _reason: &str) {}
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
}

/// Trains a model from scratch on `data` with `data.config.train`.
pub fn fit(data: &TrainingData, observer: &mut (dyn Observer + Send)) -> Result<TrainOutcome> {
    let tc = &data.config.train;
    thread_pool(tc.threads)?.install(|| {
        let model = Din::new(&data.layout, &data.config.model, tc.seed)?;
        fit_model(model, data, observer)
    })
}

/// The malformed rows skipped in each data file (with `data.skip_bad_rows`).
fn skipped_rows(data: &TrainingData) -> BTreeMap<String, SkippedRows> {
    std::iter::once(&data.train)
        .chain(data.validation.as_ref())
        .filter(|d| d.skipped.count > 0)
        .map(|d| (d.source.display().to_string(), d.skipped.clone()))
        .collect()
}

/// The first gradient that is not finite, named: a dense tensor, or an
/// embedding table's row.
fn non_finite_gradient(model: &Din, emb: &EmbeddingGrads, layout: &Layout) -> Option<String> {
    let mut found = None;
    model.visit("", &mut |name, p| {
        if found.is_none() {
            if let Some(i) = p.grad.iter().position(|g| !g.is_finite()) {
                found = Some(format!("the gradient of `{name}` is {} (element {i})", p.grad[i]));
            }
        }
    });
    if found.is_some() {
        return found;
    }
    emb.iter().enumerate().find_map(|(t, g)| {
        let k = g.grads.iter().position(|x| !x.is_finite())?;
        let row = g.ids.get(k / g.dim.max(1)).copied().unwrap_or(0);
        let table = layout.tables.get(t).map_or("?", |t| t.name.as_str());
        Some(format!(
            "the gradient of `embeddings.{table}.weight` row {row} is {}",
            g.grads[k]
        ))
    })
}

fn fit_model(mut model: Din, data: &TrainingData, observer: &mut (dyn Observer + Send)) -> Result<TrainOutcome> {
    let tc = &data.config.train;
    let mut optimizer = Optimizer::new(tc.optimizer, tc.learning_rate, &model);
    let counts = id_counts(&data.layout, &data.train);
    // Separate streams for shuffling and dropout, both from the one seed.
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(tc.seed);
    shuffle_rng.set_stream(1);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(tc.seed);
    dropout_rng.set_stream(2);
    // The best epoch is tracked whenever there is validation data; early
    // stopping only adds the patience.
    let monitor = tc.early_stopping.clone().unwrap_or(EarlyStoppingConfig {
        monitor: Monitor::ValLogloss,
        patience: usize::MAX,
        restore_best: false,
    });
    let mut tracker = data.validation.as_ref().map(|_| EarlyStopping::new(monitor));
    let keep_best = tc.keep == Keep::Best || tc.early_stopping.as_ref().is_some_and(|c| c.restore_best);
    let mut best_model: Option<Din> = None;
    let mut history = Vec::new();
    let mut stopped_early = false;
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut dlogits = Vec::new();
    // Buffers reused from step to step: no allocation in the steady state.
    let mut cache = DinCache::default();
    let mut batch = Batch::default();
    let mut emb = EmbeddingGrads::new();
    let n_batches = data.train.len().div_ceil(tc.batch_size);

    for epoch in 1..=tc.epochs {
        let start = Instant::now();
        if tc.shuffle {
            order.shuffle(&mut shuffle_rng);
        }
        let (mut loss_sum, mut skipped) = (0.0f64, 0usize);
        for (i, rows) in order.chunks(tc.batch_size).enumerate() {
            data.train.batch.gather_into(rows, &mut batch);
            let logits = model.forward_into(&batch, Mode::Train, Some(&mut dropout_rng), &mut cache);
            let loss = bce_with_logits(logits, &batch.labels, &mut dlogits);
            let mut fault = (!loss.is_finite()).then(|| format!("the loss is {loss} (the output logits)"));
            if fault.is_none() {
                model.zero_grad();
                model.backward_into(&batch, &mut cache, &dlogits, &mut emb);
                regularize(&tc.regularization, &mut model, &mut emb, &counts);
                observer.on_gradients(epoch, i + 1, &mut model, &mut emb);
                fault = non_finite_gradient(&model, &emb, &data.layout);
            }
            if let Some(what) = fault {
                let place = format!("epoch {epoch}, batch {} of {n_batches}", i + 1);
                match tc.on_non_finite {
                    OnNonFinite::Stop => {
                        return Err(Error::Training(format!(
                            "{what} at {place}; lower train.learning_rate, check the data, or set train.on_non_finite = \"skip_batch\" (the model directory keeps the last good epoch)"
                        )))
                    }
                    OnNonFinite::SkipBatch => {
                        observer.on_skipped_batch(epoch, i + 1, &what);
                        skipped += 1;
                        observer.on_batch(epoch, i + 1, n_batches, loss_sum / (i + 1 - skipped).max(1) as f64);
                        continue;
                    }
                }
            }
            optimizer.step(&mut model, &emb);
            model.update_statistics(&cache);
            loss_sum += loss;
            observer.on_batch(epoch, i + 1, n_batches, loss_sum / (i + 1 - skipped) as f64);
        }
        if skipped > 0 && skipped == n_batches {
            return Err(Error::Training(format!(
                "every batch of epoch {epoch} had a loss or gradient that is not finite; nothing was learned"
            )));
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let validation = data
            .validation
            .as_ref()
            .map(|v| evaluate(&model, v, tc.eval_batch_size));
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / (n_batches - skipped).max(1) as f64,
            validation,
            seconds: start.elapsed().as_secs_f64(),
            samples_per_second: data.train.len() as f64 / train_seconds.max(1e-9),
            skipped_batches: skipped,
            // Reported once, with the first epoch.
            skipped_rows: if epoch == 1 {
                skipped_rows(data)
            } else {
                BTreeMap::new()
            },
        };
        let mut stop = false;
        if let (Some(es), Some(v)) = (tracker.as_mut(), &report.validation) {
            if es.observe(epoch, v) && keep_best {
                best_model = Some(model.clone());
            }
            stop = tc.early_stopping.is_some() && es.should_stop();
        }
        observer.on_epoch(&report, best_model.as_ref().unwrap_or(&model))?;
        history.push(report);
        if stop && epoch < tc.epochs {
            stopped_early = true;
            break;
        }
    }
    let best_epoch = tracker.as_ref().and_then(|e| e.best()).map(|b| b.0);
    let model_epoch = match (&best_model, best_epoch) {
        (Some(_), Some(best)) => best,
        _ => history.len(),
    };
    Ok(TrainOutcome {
        model: best_model.unwrap_or(model),
        history,
        best_epoch,
        stopped_early,
        model_epoch,
    })
}
