//! Inference: a loaded model that predicts and evaluates files, and scores
//! requests in an application's raw ids ([`Scorer::score`], what `din serve`
//! runs). Nothing here depends on training code.

mod request;

use std::path::Path;

pub use request::{Attended, Scored};

use crate::checkpoint::{self, Assets, ModelFile};
use crate::data::{apply_vocab, read_dataset, stream_dataset, Dataset, ReadOptions};
use crate::metrics::Metrics;
use crate::model::{Din, Kernel, Precision};
use crate::schema::{Config, Layout};
use crate::threads::thread_pool;
use crate::Result;

/// A trained model with the configuration it was trained with.
#[derive(Debug, Clone)]
pub struct Scorer {
    /// The resolved configuration.
    pub config: Config,
    /// The resolved schema.
    pub layout: Layout,
    /// The model.
    pub model: Din,
    /// The vocabulary and item table of the model directory.
    pub assets: Assets,
    /// `config.json` as read (format version, fingerprints).
    pub file: ModelFile,
}

impl Scorer {
    /// Loads a model directory (see [`checkpoint::load_model`]).
    pub fn load(dir: &Path) -> Result<Scorer> {
        let m = checkpoint::load_model(dir)?;
        Ok(Scorer {
            config: m.config,
            layout: m.layout,
            model: m.model,
            assets: m.assets,
            file: m.file,
        })
    }

    /// Scores with `precision` from now on (see [`crate::model::bf16`]);
    /// returns the kernel it resolved to on this CPU.
    pub fn set_precision(&mut self, precision: Precision) -> Kernel {
        self.config.model.precision = precision;
        self.model.set_precision(precision)
    }

    /// A scorer over a model in memory, not read from a directory (its
    /// `file` holds no fingerprints: `weights_fingerprint` is `unsaved`).
    pub fn new(config: Config, layout: Layout, model: Din, assets: Assets) -> Scorer {
        let file = ModelFile {
            format_version: checkpoint::FORMAT_VERSION,
            din_version: env!("CARGO_PKG_VERSION").to_string(),
            weights_fingerprint: "unsaved".to_string(),
            vocab_fingerprint: None,
            items_fingerprint: None,
            config_fingerprint: None,
            config: config.clone(),
        };
        Scorer {
            config,
            layout,
            model,
            assets,
            file,
        }
    }

    /// Reads a data file in the model's input format, checking ids against
    /// the model's vocabulary. Labels are required when `require_label` is set.
    pub fn read(&self, path: &Path, require_label: bool) -> Result<Dataset> {
        let mut data = read_dataset(path, &self.config, &self.layout, ReadOptions::strict(require_label))?;
        apply_vocab(&self.layout, &mut data)?;
        Ok(data)
    }

    /// Click probabilities, one per row, using `threads` workers (0 = all cores).
    pub fn predict(&self, data: &Dataset, threads: usize) -> Result<Vec<f32>> {
        let batch = self.config.train.eval_batch_size;
        Ok(thread_pool(threads)?.install(|| predict(&self.model, data, batch)))
    }

    /// Logloss, AUC and GAUC on labelled rows.
    pub fn evaluate(&self, data: &Dataset, threads: usize) -> Result<Metrics> {
        let probs = self.predict(data, threads)?;
        Ok(Metrics::compute(&data.batch.labels, &probs, data.user_ids().as_deref()))
    }

    /// [`Scorer::read`] and [`Scorer::predict`] for a file larger than
    /// memory: the file is read in windows of about `window_rows` rows
    /// (see [`stream_dataset`]), each scored and handed to `each` with its
    /// probabilities, in file order; only one window is held.
    pub fn predict_windows(
        &self,
        path: &Path,
        require_label: bool,
        window_rows: usize,
        threads: usize,
        each: &mut dyn FnMut(&Dataset, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let pool = thread_pool(threads)?;
        let batch = self.config.train.eval_batch_size;
        let options = ReadOptions::strict(require_label);
        stream_dataset(path, &self.config, &self.layout, options, window_rows, &mut |mut w| {
            apply_vocab(&self.layout, &mut w)?;
            let probs = pool.install(|| predict(&self.model, &w, batch));
            each(&w, &probs)?;
            Ok(true)
        })?;
        Ok(())
    }

    /// [`Scorer::evaluate`] on a file read in windows of about
    /// `window_rows` rows: the rows are not held, only each row's label,
    /// probability and user (12 bytes a row, what AUC and GAUC need).
    pub fn evaluate_windows(&self, path: &Path, window_rows: usize, threads: usize) -> Result<Metrics> {
        let (mut labels, mut probs, mut users) = (Vec::new(), Vec::new(), Some(Vec::new()));
        self.predict_windows(path, true, window_rows, threads, &mut |w, p| {
            labels.extend_from_slice(&w.batch.labels);
            probs.extend_from_slice(p);
            match (w.user_ids(), users.as_mut()) {
                (Some(u), Some(all)) => all.extend_from_slice(&u),
                _ => users = None,
            }
            Ok(())
        })?;
        Ok(Metrics::compute(&labels, &probs, users.as_deref()))
    }
}

/// Click probabilities for every row, `batch_size` rows at a time.
pub fn predict(model: &Din, data: &Dataset, batch_size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    let mut start = 0;
    while start < data.len() {
        let end = (start + batch_size).min(data.len());
        out.extend(model.predict(&data.batch.slice(start, end)));
        start = end;
    }
    out
}

/// Logloss, AUC and GAUC of `model` on `data` (which must have labels).
pub fn evaluate(model: &Din, data: &Dataset, batch_size: usize) -> Metrics {
    let probs = predict(model, data, batch_size);
    Metrics::compute(&data.batch.labels, &probs, data.user_ids().as_deref())
}
