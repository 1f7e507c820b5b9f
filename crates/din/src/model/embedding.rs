//! Embedding tables and their sparse gradients.

use std::collections::HashMap;

use rand::Rng;

use super::param::{Param, Role};

/// Initial embedding values are uniform in `[-EMBEDDING_INIT, EMBEDDING_INIT]` (Keras' default).
pub const EMBEDDING_INIT: f32 = 0.05;

/// A `[rows, dim]` lookup table.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The table, `[rows, dim]`.
    pub weight: Param,
}

impl Embedding {
    /// A table of `rows` random rows; rows from `zero_from` on (a reserved
    /// out-of-vocabulary row) start at zero.
    pub fn new(rows: usize, dim: usize, zero_from: usize, rng: &mut impl Rng) -> Self {
        let mut w: Vec<f32> = (0..rows * dim)
            .map(|_| rng.gen_range(-EMBEDDING_INIT..EMBEDDING_INIT))
            .collect();
        w[zero_from.min(rows) * dim..].iter_mut().for_each(|v| *v = 0.0);
        Embedding {
            weight: Param::new(w, vec![rows, dim], Role::Embedding),
        }
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.weight.shape[1]
    }

    /// Row `id`.
    pub fn row(&self, id: u32) -> &[f32] {
        let d = self.dim();
        &self.weight.value[id as usize * d..(id as usize + 1) * d]
    }
}

/// Gradients of the rows one batch touched (architecture.md, trick 3: only
/// these rows are updated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseGrad {
    /// Row width.
    pub dim: usize,
    /// Touched rows, in order of first touch (deterministic).
    pub ids: Vec<u32>,
    /// Their gradients, `[ids.len(), dim]`.
    pub grads: Vec<f32>,
    index: HashMap<u32, usize>,
}

impl SparseGrad {
    /// An empty gradient for rows of width `dim`.
    pub fn new(dim: usize) -> Self {
        SparseGrad {
            dim,
            ..Default::default()
        }
    }

    /// Adds `g` to row `id`'s gradient.
    pub fn add(&mut self, id: u32, g: &[f32]) {
        let d = self.dim;
        let slot = *self.index.entry(id).or_insert_with(|| {
            self.ids.push(id);
            self.grads.resize(self.grads.len() + d, 0.0);
            self.ids.len() - 1
        });
        self.grads[slot * d..(slot + 1) * d]
            .iter_mut()
            .zip(g)
            .for_each(|(a, b)| *a += b);
    }

    /// The gradient of row `id`, if touched.
    pub fn get(&self, id: u32) -> Option<&[f32]> {
        self.index
            .get(&id)
            .map(|&s| &self.grads[s * self.dim..(s + 1) * self.dim])
    }
}
