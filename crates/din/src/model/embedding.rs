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
        Self::new_shard(name, rows, dim, zero_from, rng, 0, 1)
    }

    /// The shard of [`Embedding::new`]'s table that rank `rank` of `ranks`
    /// owns in distributed training: rows `rank`, `rank + ranks`, ... of
    /// the whole table, as local rows 0, 1, ... (row `id` is local row
    /// `id / ranks` of rank `id % ranks`). `rng` draws the whole table's
    /// values, so each row starts as it would in the whole table and `rng`
    /// ends where [`Embedding::new`] leaves it.
    pub fn new_shard(
        name: &str,
        rows: usize,
        dim: usize,
        zero_from: usize,
        rng: &mut impl Rng,
        rank: usize,
        ranks: usize,
    ) -> Result<Self> {
        let owned = rows.saturating_sub(rank).div_ceil(ranks.max(1));
        let len = owned.checked_mul(dim).filter(|n| n.checked_mul(4).is_some());
        let mut w: Vec<f32> = Vec::new();
        if rows.checked_mul(dim).is_none() || len.is_none_or(|n| w.try_reserve_exact(n).is_err()) {
            return Err(Error::config(
                format!("embedding table `{name}`"),
                format!("{rows} x {dim}"),
                "cannot be allocated; lower its vocab_size or embedding_dim",
            ));
        }
        if ranks <= 1 {
            w.extend((0..rows * dim).map(|_| rng.gen_range(-EMBEDDING_INIT..EMBEDDING_INIT)));
        } else {
            for row in 0..rows {
                let keep = row % ranks == rank;
                for _ in 0..dim {
                    let v = rng.gen_range(-EMBEDDING_INIT..EMBEDDING_INIT);
                    if keep {
                        w.push(v);
                    }
                }
            }
        }
        // Rows from `zero_from` on, in local rows: the first owned row at or after it.
        let first_zero = zero_from.min(rows).saturating_sub(rank).div_ceil(ranks.max(1));
        w[first_zero * dim..].iter_mut().for_each(|v| *v = 0.0);
        Ok(Embedding {
            weight: Param::new(w, vec![owned, dim], Role::Embedding),
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

    /// [`SparseGrad::add`] of `g[i * stride..][..dim]` to row `ids[i]`, for
    /// every `i` in order, with the slots and rows of the ids a little
    /// further on asked for from memory meanwhile (the ids of a batch's
    /// histories land anywhere in the table).
    pub fn add_rows(&mut self, ids: &[u32], g: &[f32], stride: usize) {
        /// Ids between asking for a row's gradient and adding to it; its
        /// slot is asked for twice as far ahead.
        const AHEAD: usize = 8;
        let d = self.dim;
        for (i, &id) in ids.iter().enumerate() {
            if let Some(&next) = ids.get(i + 2 * AHEAD) {
                crate::model::prefetch(self.slot.as_ptr().wrapping_add(next as usize));
            }
            if let Some(&s) = ids.get(i + AHEAD).and_then(|&next| self.slot.get(next as usize)) {
                if s > 0 {
                    crate::model::prefetch(self.grads.as_ptr().wrapping_add((s as usize - 1) * d));
                }
            }
            self.add(id, &g[i * stride..i * stride + d]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::rand_vec;

    /// Rows added with `add_rows` (strided, ids repeated, ids that grow the
    /// slot index, more ids than the look-ahead) are those of `add` in
    /// order, bit for bit.
    #[test]
    fn add_rows_is_add_in_order() {
        let (dim, stride) = (3, 5);
        for n in [0, 1, 7, 40] {
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % 23 + i / 10 * 1000).collect();
            let g = rand_vec(n * stride + dim, n as u64);
            let (mut by_rows, mut one_by_one) = (SparseGrad::new(dim), SparseGrad::new(dim));
            by_rows.add(5, &g[..dim]);
            one_by_one.add(5, &g[..dim]);
            by_rows.add_rows(&ids, &g[1..], stride);
            for (i, &id) in ids.iter().enumerate() {
                one_by_one.add(id, &g[1 + i * stride..1 + i * stride + dim]);
            }
            assert_eq!(by_rows.ids, one_by_one.ids, "{n} ids");
            let bits = |s: &SparseGrad| s.grads.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&by_rows), bits(&one_by_one), "{n} ids");
            assert!(ids.iter().all(|&id| by_rows.get(id).is_some()));
        }
    }
}
