//! Embedding tables and their sparse gradients.

use rand::Rng;

use super::param::{Param, Role};
use crate::{Error, Result};

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
    /// out-of-vocabulary row) start at zero. `name` is for the error when the
    /// table cannot be allocated.
    pub fn new(name: &str, rows: usize, dim: usize, zero_from: usize, rng: &mut impl Rng) -> Result<Self> {
        let len = rows.checked_mul(dim).filter(|n| n.checked_mul(4).is_some());
        let mut w: Vec<f32> = Vec::new();
        if len.is_none_or(|n| w.try_reserve_exact(n).is_err()) {
            return Err(Error::config(
                format!("embedding table `{name}`"),
                format!("{rows} x {dim}"),
                "cannot be allocated; lower its vocab_size or embedding_dim",
            ));
        }
        w.extend((0..rows * dim).map(|_| rng.gen_range(-EMBEDDING_INIT..EMBEDDING_INIT)));
        w[zero_from.min(rows) * dim..].iter_mut().for_each(|v| *v = 0.0);
        Ok(Embedding {
            weight: Param::new(w, vec![rows, dim], Role::Embedding),
        })
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
/// these rows are updated). Reusable: [`SparseGrad::clear`] forgets the rows
/// but keeps the buffers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseGrad {
    /// Row width.
    pub dim: usize,
    /// Touched rows, in order of first touch (deterministic).
    pub ids: Vec<u32>,
    /// Their gradients, `[ids.len(), dim]`.
    pub grads: Vec<f32>,
    /// Per table row: 1 + its position in `ids`, or 0 when untouched. A dense
    /// index (4 bytes per row, beside the table's `4 * dim`) instead of a
    /// hash map: the lookup is one load, and it is cleared row by row.
    slot: Vec<u32>,
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
        let i = id as usize;
        if i >= self.slot.len() {
            self.slot.resize(i + 1, 0);
        }
        if self.slot[i] == 0 {
            self.ids.push(id);
            self.grads.resize(self.grads.len() + d, 0.0);
            self.slot[i] = self.ids.len() as u32;
        }
        let s = self.slot[i] as usize - 1;
        self.grads[s * d..(s + 1) * d]
            .iter_mut()
            .zip(g)
            .for_each(|(a, b)| *a += b);
    }

    /// The gradient of row `id`, if touched.
    pub fn get(&self, id: u32) -> Option<&[f32]> {
        match self.slot.get(id as usize) {
            Some(&s) if s > 0 => Some(&self.grads[(s as usize - 1) * self.dim..s as usize * self.dim]),
            _ => None,
        }
    }

    /// Forgets every row, keeping the buffers.
    pub fn clear(&mut self) {
        for &id in &self.ids {
            self.slot[id as usize] = 0;
        }
        self.ids.clear();
        self.grads.clear();
    }
}
