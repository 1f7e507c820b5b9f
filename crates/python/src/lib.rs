//! `din._din`: the compiled core of the Python package `din`.
//!
//! One class, `Core`: a model with its configuration, built from the
//! config the Python layer writes out of DeepCTR-style feature columns (or
//! loaded from a model directory), that trains, predicts, evaluates and
//! saves through the `din` library — the same code `din train` runs, so the
//! same config and seed give the same weights. The Python layer
//! (`python/din/`) holds the Keras-like API, argument checks and progress
//! printing; no model arithmetic happens in Python.
//!
//! Training runs on a worker thread with the GIL released; the calling
//! thread waits for its events, calls the Python callback with them, and
//! checks for signals, so ctrl-c stops training between batches.

mod columns;
mod errors;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use din::checkpoint::{self, Assets, EpochReport};
use din::data::{apply_vocab, read_record_batches, Dataset, ReadOptions};
use din::metrics::{auc, gauc, Metrics};
use din::model::{Din, Module, Precision};
use din::schema::{Config, DataConfig, Layout, OptimizerKind};
use din::threads::thread_pool;
use din::train::{fit_continuing, training_data_from, Observer, Optimizer, Start, TrainOutcome};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use serde_json::json;

use errors::to_py;

/// Columns as the Python layer hands them over: `(name, array)`.
type Columns = Vec<(String, Py<PyAny>)>;

/// What `predict` returns: the probabilities, and with attention the
/// weights and their count per row (see [`Core::predict`]).
type Predicted<'py> = (
    Bound<'py, PyByteArray>,
    Option<(Bound<'py, PyByteArray>, Bound<'py, PyByteArray>)>,
);

/// A model, its configuration and what training carries from one `fit` to
/// the next.
#[pyclass(module = "din._din", name = "Core")]
struct Core {
    config: Config,
    layout: Layout,
    model: Din,
    assets: Assets,
    /// The optimizer after the last `fit` (its kind and learning rate with
    /// it), and where the random streams ended: a further `fit` goes on
    /// from them, as Keras' does.
    optimizer: Option<Optimizer>,
    optimizer_of: Option<(OptimizerKind, f32)>,
    rng_positions: [u128; 2],
    order: Vec<usize>,
    /// Every epoch trained, over all `fit` calls (saved as `history.json`).
    history: Vec<EpochReport>,
}

/// Parses and checks a config written by the Python layer.
fn parse_config(config_json: &str) -> PyResult<(Config, Layout)> {
    let config: Config =
        serde_json::from_str(config_json).map_err(|e| PyValueError::new_err(format!("invalid config: {e}")))?;
    let layout = config.validate().map_err(to_py)?;
    if let Some(t) = layout.tables.iter().find(|t| t.vocab_size.is_none()) {
        return Err(PyValueError::new_err(format!(
            "the embedding table `{}` needs a vocabulary_size",
            t.name
        )));
    }
    Ok((config, layout))
}

#[pymethods]
impl Core {
    /// A new model from a config (JSON), initialised from `train.seed`.
    #[new]
    fn new(config_json: &str) -> PyResult<Core> {
        let (config, layout) = parse_config(config_json)?;
        let model = Din::new(&layout, &config.model, config.train.seed).map_err(to_py)?;
        Ok(Core {
            config,
            layout,
            model,
            assets: Assets::default(),
            optimizer: None,
            optimizer_of: None,
            rng_positions: [0, 0],
            order: Vec::new(),
            history: Vec::new(),
        })
    }

    /// Loads a model directory written by `din train`, `din serve`'s
    /// versions or `save`.
    #[staticmethod]
    fn load(py: Python<'_>, dir: PathBuf) -> PyResult<Core> {
        let m = py.detach(|| checkpoint::load_model(&dir)).map_err(to_py)?;
        Ok(Core {
            config: m.config,
            layout: m.layout,
            model: m.model,
            assets: m.assets,
            optimizer: None,
            optimizer_of: None,
            rng_positions: [0, 0],
            order: Vec::new(),
            history: Vec::new(),
        })
    }

    /// Scores in `precision` ("fp32", "bf16" or "auto") from now on, kept
    /// in the config a save writes; returns what runs it on this CPU.
    fn set_precision(&mut self, precision: &str) -> PyResult<String> {
        let precision: Precision = precision.parse().map_err(PyValueError::new_err)?;
        self.config.model.precision = precision;
        let kernel = self.model.set_precision(precision);
        Ok(din::model::bf16::describe_choice(precision, kernel))
    }

    /// The configuration, as JSON.
    fn config_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.config).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Forgets the optimizer's state (a new `compile`).
    fn reset_optimizer(&mut self) {
        self.optimizer = None;
        self.optimizer_of = None;
    }

    /// Every tensor's name and shape, in the model file's order.
    fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        self.model
            .visit("", &mut |name, p| out.push((name.to_string(), p.shape.clone())));
        out
    }

    /// Whether the model directory's vocabulary maps raw ids (then inputs
    /// are raw ids for those tables: strings or integers as written).
    fn has_vocabulary(&self) -> bool {
        self.assets.vocab.is_some()
    }

    /// Trains with `config_json`'s training settings (its schema and model
    /// must be this model's) on `x` (with the label column), validating on
    /// `validation` when given (else on `data.validation_split` of `x`).
    /// `on_event(kind, json)` is called on this thread for each event
    /// (`"batch"`, `"epoch"`); a true result stops training. With
    /// `outputs`, each epoch's event has the training AUC (and GAUC when
    /// the schema names the user) of the predictions made while training.
    /// Returns `{"interrupted": bool, "history": [...]}` as JSON.
    #[pyo3(signature = (config_json, x, validation, on_event, outputs))]
    fn fit(
        &mut self,
        py: Python<'_>,
        config_json: &str,
        x: Columns,
        validation: Option<Columns>,
        on_event: Py<PyAny>,
        outputs: bool,
    ) -> PyResult<String> {
        let (config, _) = parse_config(config_json)?;
        if config.schema != self.config.schema || config.model != self.config.model {
            return Err(PyValueError::new_err(
                "the features or layers of the config are not this model's",
            ));
        }
        // Training checks the ids against the tables itself.
        let train = self.read(py, &config, "x", &x, true, false)?;
        let validation = match validation {
            Some(v) => Some(self.read(py, &config, "validation_data", &v, true, false)?),
            None => None,
        };
        let data = py
            .detach(|| training_data_from(&config, train, validation))
            .map_err(to_py)?;
        let tc = &data.config.train;
        let optimizer = match (self.optimizer.take(), self.optimizer_of) {
            (Some(o), Some(of)) if of == (tc.optimizer, tc.learning_rate) => o,
            _ => Optimizer::new(tc.optimizer, tc.learning_rate, &self.model),
        };
        let start = Start {
            model: self.model.clone(),
            optimizer,
            rng_positions: self.rng_positions,
            order: std::mem::take(&mut self.order),
        };
        let users = outputs.then(|| data.train.user_ids().map(|u| u.into_owned())).flatten();
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel::<Event>();
        let (ack_tx, ack) = mpsc::channel::<()>();
        let (result, pending) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let mut w = Worker {
                    tx,
                    ack,
                    stop: &stop,
                    outputs,
                    users,
                    labels: Vec::new(),
                    probs: Vec::new(),
                    rows: Vec::new(),
                };
                fit_continuing(&data, start, &mut w)
            });
            let pending = relay(py, rx, &ack_tx, &on_event, &stop);
            let joined = py.detach(|| worker.join());
            (joined, pending)
        });
        let result = result.map_err(|_| PyRuntimeError::new_err("the training thread panicked"))?;
        match (result, pending) {
            (Ok(outcome), pending) => {
                let interrupted = outcome.interrupted;
                let history = serde_json::to_value(&outcome.history).unwrap_or_default();
                self.keep(outcome, &data.config, data.assets);
                match pending {
                    Some(e) => Err(e),
                    None => Ok(json!({ "interrupted": interrupted, "history": history }).to_string()),
                }
            }
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(to_py(e)),
        }
    }

    /// Click probabilities of `x`'s rows (f32 bytes), and with `attention`
    /// the attention weight of each kept behaviour of the first DIN pair's
    /// history (f32 bytes, row by row) and how many each row has (u32 bytes).
    /// Byte arrays, so that `numpy.frombuffer` gives writable arrays.
    #[pyo3(signature = (x, batch_size, threads, attention))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: Columns,
        batch_size: usize,
        threads: usize,
        attention: bool,
    ) -> PyResult<Predicted<'py>> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let data = self.read(py, &self.config, "x", &x, false, true)?;
        let pool = thread_pool(threads).map_err(to_py)?;
        let model = &self.model;
        if !attention {
            let probs = py.detach(|| pool.install(|| din::scorer::predict(model, &data, batch_size)));
            return Ok((PyByteArray::new(py, &f32_bytes(&probs)), None));
        }
        let Some(&(_, history)) = self.layout.pairs.first() else {
            return Err(PyValueError::new_err(
                "return_attention: the model has no target/history pair, so nothing is attended",
            ));
        };
        let (probs, weights, counts) = py.detach(|| {
            pool.install(|| {
                let (mut probs, mut weights) = (Vec::with_capacity(data.len()), Vec::new());
                let mut start = 0;
                while start < data.len() {
                    let end = (start + batch_size).min(data.len());
                    let (p, w) = model.predict_with_weights(&data.batch.slice(start, end));
                    probs.extend(p);
                    weights.extend(w);
                    start = end;
                }
                let counts: Vec<u32> = (0..data.len())
                    .map(|r| data.batch.history(history, r).len() as u32)
                    .collect();
                (probs, weights, counts)
            })
        });
        let counts: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        Ok((
            PyByteArray::new(py, &f32_bytes(&probs)),
            Some((
                PyByteArray::new(py, &f32_bytes(&weights)),
                PyByteArray::new(py, &counts),
            )),
        ))
    }

    /// Logloss, AUC and GAUC of `x`'s rows (with the label column), as JSON.
    fn evaluate(&self, py: Python<'_>, x: Columns, batch_size: usize, threads: usize) -> PyResult<String> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let data = self.read(py, &self.config, "x", &x, true, true)?;
        let pool = thread_pool(threads).map_err(to_py)?;
        let model = &self.model;
        let metrics = py.detach(|| pool.install(|| din::scorer::evaluate(model, &data, batch_size)));
        serde_json::to_string(&metrics).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Writes the model directory `dir` (atomically: the old one, if any,
    /// stays whole until the new one is complete).
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        // The rows trained on were arrays, not files: the saved config names none.
        let mut config = self.config.clone();
        config.data = DataConfig::default();
        let history = (!self.history.is_empty()).then_some(self.history.as_slice());
        py.detach(|| checkpoint::save_with_assets(&dir, &config, &self.model, &self.assets, history))
            .map_err(to_py)
    }
}

impl Core {
    /// Reads `columns` (the label among them when `labels`) into a dataset,
    /// checked against the tables when `vocab`; `source` names them in errors.
    fn read(
        &self,
        py: Python<'_>,
        config: &Config,
        source: &str,
        columns: &Columns,
        labels: bool,
        vocab: bool,
    ) -> PyResult<Dataset> {
        let batch = columns::record_batch(py, source, columns)?;
        let options = ReadOptions::strict(labels);
        let mut data =
            read_record_batches(Path::new(source), config, &self.layout, options, &[batch]).map_err(to_py)?;
        if vocab {
            apply_vocab(&self.layout, &mut data).map_err(to_py)?;
        }
        Ok(data)
    }

    /// Takes the weights, optimizer and random streams a `fit` ended with.
    fn keep(&mut self, outcome: TrainOutcome, config: &Config, assets: Assets) {
        self.optimizer_of = Some((config.train.optimizer, config.train.learning_rate));
        self.optimizer = outcome.optimizer;
        self.rng_positions = outcome.rng_positions;
        self.order = outcome.order;
        self.model = outcome.model;
        let before = self.history.len();
        self.history.extend(outcome.history.into_iter().map(|mut r| {
            r.epoch += before;
            r
        }));
        self.config.train = config.train.clone();
        self.config.data = config.data.clone();
        if assets.items.is_some() || assets.vocab.is_some() {
            self.assets = assets;
        }
    }
}

/// What the training thread tells the calling thread.
enum Event {
    /// A batch done: `(epoch, batches done, of, mean loss so far)`.
    Batch(usize, usize, usize, f64),
    /// An epoch done, as JSON.
    Epoch(String),
}

/// The training thread's observer: forwards progress, collects the
/// predictions made while training (for the epoch's training AUC), and
/// stops when asked.
struct Worker<'a> {
    tx: mpsc::Sender<Event>,
    /// The calling thread's answer to an epoch event: it has run the
    /// epoch's callbacks (which may have asked to stop).
    ack: mpsc::Receiver<()>,
    stop: &'a AtomicBool,
    outputs: bool,
    /// Each training row's user (for the training GAUC).
    users: Option<Vec<u32>>,
    labels: Vec<f32>,
    probs: Vec<f32>,
    rows: Vec<u32>,
}

impl Observer for Worker<'_> {
    fn on_batch(&mut self, epoch: usize, done: usize, total: usize, running_loss: f64) {
        let _ = self.tx.send(Event::Batch(epoch, done, total, running_loss));
    }

    fn on_outputs(&mut self, _epoch: usize, rows: &[usize], labels: &[f32], logits: &[f32]) {
        if self.outputs {
            self.labels.extend_from_slice(labels);
            self.probs.extend(logits.iter().map(|z| 1.0 / (1.0 + (-z).exp())));
            self.rows.extend(rows.iter().map(|&r| r as u32));
        }
    }

    fn on_epoch(&mut self, report: &EpochReport, _model: &Din) -> din::Result<()> {
        let (train_auc, train_gauc) = if self.outputs {
            let users = self
                .users
                .as_ref()
                .map(|u| self.rows.iter().map(|&r| u[r as usize]).collect::<Vec<u32>>());
            let a = auc(&self.labels, &self.probs);
            let g = users.and_then(|u| gauc(&u, &self.labels, &self.probs));
            (a, g)
        } else {
            (None, None)
        };
        self.labels.clear();
        self.probs.clear();
        self.rows.clear();
        let validation: Option<&Metrics> = report.validation.as_ref();
        let event = json!({
            "epoch": report.epoch,
            "loss": report.train_loss,
            "auc": train_auc,
            "gauc": train_gauc,
            "validation": validation,
            "seconds": report.seconds,
            "samples_per_second": report.samples_per_second,
            "skipped_batches": report.skipped_batches,
        });
        // Keras runs the epoch's callbacks before the next epoch starts.
        if self.tx.send(Event::Epoch(event.to_string())).is_ok() && self.ack.recv().is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn keep_going(&mut self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// Hands the training thread's events to `on_event` on this thread until
/// training ends, checking for signals between them; each epoch event is
/// answered on `ack` once handled. A Python exception (ctrl-c's
/// `KeyboardInterrupt`, or one raised by `on_event`) or a true result of
/// `on_event` stops training (after the batch in progress, or at the end of
/// the epoch whose event asked it); the exception is returned, to be raised
/// once the model is kept.
fn relay(
    py: Python<'_>,
    mut rx: mpsc::Receiver<Event>,
    ack: &mpsc::Sender<()>,
    on_event: &Py<PyAny>,
    stop: &AtomicBool,
) -> Option<PyErr> {
    let mut pending: Option<PyErr> = None;
    loop {
        let (first, back) = py.detach(move || (rx.recv_timeout(Duration::from_millis(50)), rx));
        rx = back;
        let mut events = match first {
            Ok(e) => vec![e],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => return pending,
        };
        events.extend(rx.try_iter());
        // Of a run of batch events, only the last is shown.
        let mut shown: Vec<Event> = Vec::with_capacity(events.len());
        for e in events {
            if let (Some(Event::Batch(..)), Event::Batch(..)) = (shown.last(), &e) {
                shown.pop();
            }
            shown.push(e);
        }
        for e in shown {
            let epoch = matches!(e, Event::Epoch(_));
            if pending.is_some() {
                if epoch {
                    let _ = ack.send(());
                }
                continue;
            }
            let (kind, payload) = match e {
                Event::Batch(epoch, done, total, loss) => (
                    "batch",
                    json!({ "epoch": epoch, "done": done, "total": total, "loss": loss }).to_string(),
                ),
                Event::Epoch(json) => ("epoch", json),
            };
            match on_event.call1(py, (kind, payload)).and_then(|r| r.is_truthy(py)) {
                Ok(true) => stop.store(true, Ordering::Relaxed),
                Ok(false) => {}
                Err(e) => {
                    pending = Some(e);
                    stop.store(true, Ordering::Relaxed);
                }
            }
            if epoch {
                let _ = ack.send(());
            }
        }
        if pending.is_none() {
            if let Err(e) = py.check_signals() {
                pending = Some(e);
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Little-endian bytes of `values` (for `numpy.frombuffer`).
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The version of the din library this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The number of cores (what `threads = 0` uses).
#[pyfunction]
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[pymodule]
fn _din(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(cores, m)?)?;
    Ok(())
}
