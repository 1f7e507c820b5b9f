//! A loaded model that predicts and evaluates files.

use std::path::Path;

use crate::checkpoint;
use crate::data::{apply_vocab, read_dataset, Dataset, ReadOptions};
use crate::metrics::Metrics;
use crate::model::Din;
use crate::schema::{Config, Layout};
use crate::train::{self, thread_pool};
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
}

impl Scorer {
    /// Loads a model directory.
    pub fn load(dir: &Path) -> Result<Scorer> {
        let (config, layout, model) = checkpoint::load(dir)?;
        Ok(Scorer { config, layout, model })
    }

    /// Reads a data file in the model's input format, checking ids against
    /// the model's vocabulary. Labels are required when `require_label` is set.
    pub fn read(&self, path: &Path, require_label: bool) -> Result<Dataset> {
        let mut data = read_dataset(path, &self.config, &self.layout, ReadOptions { require_label })?;
        apply_vocab(&self.layout, &mut data)?;
        Ok(data)
    }

    /// Click probabilities, one per row, using `threads` workers (0 = all cores).
    pub fn predict(&self, data: &Dataset, threads: usize) -> Result<Vec<f32>> {
        let batch = self.config.train.eval_batch_size;
        Ok(thread_pool(threads)?.install(|| train::predict(&self.model, data, batch)))
    }

    /// Logloss, AUC and GAUC on labelled rows.
    pub fn evaluate(&self, data: &Dataset, threads: usize) -> Result<Metrics> {
        let probs = self.predict(data, threads)?;
        Ok(Metrics::compute(&data.batch.labels, &probs, data.users.as_deref()))
    }
}
