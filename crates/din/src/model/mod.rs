//! The DIN model: embeddings, the local activation unit, the DNN tower.
//!
//! Every layer is a small struct with a `forward` and an explicit `backward`;
//! matrix products go through [`linalg`] (the `gemm` crate). The model reads as
//! a pipeline: embed, attend, concatenate, MLP, logit.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod linalg;
pub mod linear;
pub mod mlp;
pub mod param;
#[cfg(test)]
pub(crate) mod testutil;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use activation::Activation;
pub use attention::{Attention, AttentionCache};
pub use embedding::{Embedding, SparseGrad};
pub use linear::Linear;
pub use mlp::{Mlp, MlpCache};
pub use param::{Module, Param, Role};

use crate::data::Batch;
use crate::schema::{Layout, ModelConfig};
use crate::Result;

/// Whether a forward pass trains (batch statistics, dropout) or infers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: Dice uses batch statistics, dropout is applied.
    Train,
    /// Inference: Dice uses its moving averages, no dropout.
    Infer,
}

/// The Deep Interest Network.
#[derive(Debug, Clone, PartialEq)]
pub struct Din {
    /// The resolved schema the model was built for.
    pub layout: Layout,
    /// One table per [`Layout::tables`] entry.
    pub embeddings: Vec<Embedding>,
    /// The local activation unit over the DIN pairs.
    pub attention: Attention,
    /// The DNN tower's hidden layers.
    pub dnn: Mlp,
    /// The final `[H, 1]` layer giving the logit.
    pub output: Linear,
}

/// Intermediate values of [`Din::forward`].
#[derive(Debug, Clone)]
pub struct DinCache {
    /// Queries, `[B, Dq]`.
    q: Vec<f32>,
    /// Keys of all real behaviours, `[N, Dq]`.
    keys: Vec<f32>,
    attention: AttentionCache,
    dnn: MlpCache,
}

impl DinCache {
    /// Attention weights of every real behaviour in the batch, `[N]`.
    pub fn attention_weights(&self) -> &[f32] {
        &self.attention.weights
    }
}

/// Sparse gradients of every embedding table.
pub type EmbeddingGrads = Vec<SparseGrad>;

impl Din {
    /// A freshly initialised model. Every table's vocabulary size must be
    /// known; a table too large to allocate is an error.
    pub fn new(layout: &Layout, config: &ModelConfig, seed: u64) -> Result<Din> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let embeddings = layout
            .tables
            .iter()
            .map(|t| Embedding::new(&t.name, t.rows(), t.dim, t.vocab_size.unwrap_or(0), &mut rng))
            .collect::<Result<_>>()?;
        let attention = Attention::new(layout.query_dim(), &config.attention, &mut rng);
        let input = layout.dnn_input_dim();
        let dnn = Mlp::new(
            input,
            &config.dnn.hidden_units,
            config.dnn.activation,
            config.dnn.dropout,
            &mut rng,
        );
        let output = Linear::new(dnn.output_dim(input), 1, &mut rng);
        Ok(Din {
            layout: layout.clone(),
            embeddings,
            attention,
            dnn,
            output,
        })
    }

    /// Logits `[B]` for a batch, with what the backward pass needs.
    /// `rng` drives dropout in training.
    pub fn forward(&self, batch: &Batch, mode: Mode, rng: Option<&mut dyn rand::RngCore>) -> (Vec<f32>, DinCache) {
        let l = &self.layout;
        let b = batch.rows;
        let width = l.dnn_input_dim();
        let dq = l.query_dim();
        let mut x = vec![0.0f32; b * width]; // [B, Din]
        let mut col = 0;
        // Sparse features: one embedding each.
        for (f, slot) in l.sparse.iter().enumerate() {
            let table = &self.embeddings[slot.table];
            let dim = table.dim();
            for (r, &id) in batch.sparse[f].iter().enumerate() {
                x[r * width + col..r * width + col + dim].copy_from_slice(table.row(id));
            }
            col += dim;
        }
        // Dense features as they are.
        for (f, (_, dim)) in l.dense.iter().enumerate() {
            for r in 0..b {
                x[r * width + col..r * width + col + dim].copy_from_slice(&batch.dense[f][r * dim..(r + 1) * dim]);
            }
            col += dim;
        }
        // Attention: query = concatenated targets, keys = concatenated histories per position.
        let offsets = &batch.sequences[l.pairs[0].1].offsets;
        let n = offsets[b] as usize;
        let mut q = vec![0.0f32; b * dq]; // [B, Dq]
        let mut keys = vec![0.0f32; n * dq]; // [N, Dq]
        let mut qcol = 0;
        for &(t, h) in &l.pairs {
            let table = &self.embeddings[l.sparse[t].table];
            let dim = table.dim();
            for (r, &id) in batch.sparse[t].iter().enumerate() {
                q[r * dq + qcol..r * dq + qcol + dim].copy_from_slice(table.row(id));
            }
            let htable = &self.embeddings[l.sequences[h].table];
            for (i, &id) in batch.sequences[h].values.iter().enumerate() {
                keys[i * dq + qcol..i * dq + qcol + dim].copy_from_slice(htable.row(id));
            }
            qcol += dim;
        }
        let (pooled, attention) = self.attention.forward(&q, &keys, offsets, mode); // [B, Dq]
        for r in 0..b {
            x[r * width + col..r * width + col + dq].copy_from_slice(&pooled[r * dq..(r + 1) * dq]);
        }
        col += dq;
        // Sequences outside the attention: mean of their embeddings (zero if empty).
        for s in l.unpaired_sequences() {
            let table = &self.embeddings[l.sequences[s].table];
            let dim = table.dim();
            let seq = &batch.sequences[s];
            for r in 0..b {
                let ids = seq.row(r);
                let out = &mut x[r * width + col..r * width + col + dim];
                for &id in ids {
                    out.iter_mut().zip(table.row(id)).for_each(|(o, e)| *o += e);
                }
                if !ids.is_empty() {
                    let inv = 1.0 / ids.len() as f32;
                    out.iter_mut().for_each(|o| *o *= inv);
                }
            }
            col += dim;
        }
        debug_assert_eq!(col, width);
        let dnn = self.dnn.forward(x, b, mode, rng); // [B, H]
        let mut logits = Vec::new();
        self.output.forward(&dnn.output, b, &mut logits); // [B, 1]
        (
            logits,
            DinCache {
                q,
                keys,
                attention,
                dnn,
            },
        )
    }

    /// Click probabilities `[B]` (inference mode).
    pub fn predict(&self, batch: &Batch) -> Vec<f32> {
        let (logits, _) = self.forward(batch, Mode::Infer, None);
        logits.into_iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect()
    }

    /// Back-propagates `dlogits` (`[B]`): accumulates dense parameter gradients
    /// in place and returns the embedding gradients of the touched rows.
    pub fn backward(&mut self, batch: &Batch, cache: &DinCache, dlogits: &[f32]) -> EmbeddingGrads {
        let b = batch.rows;
        let mut dh = Vec::new();
        self.output.backward(&cache.dnn.output, b, dlogits, Some(&mut dh)); // [B, H]
        let dx = self.dnn.backward(&cache.dnn, b, dh); // [B, Din]
        let l = &self.layout;
        let width = l.dnn_input_dim();
        let dq_width = l.query_dim();
        let mut grads: EmbeddingGrads = self.embeddings.iter().map(|e| SparseGrad::new(e.dim())).collect();
        let mut col = 0;
        for (f, slot) in l.sparse.iter().enumerate() {
            let dim = self.embeddings[slot.table].dim();
            for (r, &id) in batch.sparse[f].iter().enumerate() {
                grads[slot.table].add(id, &dx[r * width + col..r * width + col + dim]);
            }
            col += dim;
        }
        col += l.dense.iter().map(|d| d.1).sum::<usize>();
        let mut dpooled = vec![0.0f32; b * dq_width];
        for r in 0..b {
            dpooled[r * dq_width..(r + 1) * dq_width].copy_from_slice(&dx[r * width + col..r * width + col + dq_width]);
        }
        col += dq_width;
        let (dq, dk) = self
            .attention
            .backward(&cache.q, &cache.keys, &cache.attention, &dpooled);
        let mut qcol = 0;
        for &(t, h) in &l.pairs {
            let table = l.sparse[t].table;
            let dim = self.embeddings[table].dim();
            for (r, &id) in batch.sparse[t].iter().enumerate() {
                grads[table].add(id, &dq[r * dq_width + qcol..r * dq_width + qcol + dim]);
            }
            let htable = l.sequences[h].table;
            for (i, &id) in batch.sequences[h].values.iter().enumerate() {
                grads[htable].add(id, &dk[i * dq_width + qcol..i * dq_width + qcol + dim]);
            }
            qcol += dim;
        }
        for s in l.unpaired_sequences() {
            let table = l.sequences[s].table;
            let dim = self.embeddings[table].dim();
            let seq = &batch.sequences[s];
            let mut g = vec![0.0f32; dim];
            for r in 0..b {
                let ids = seq.row(r);
                if ids.is_empty() {
                    continue;
                }
                let inv = 1.0 / ids.len() as f32;
                g.iter_mut()
                    .zip(&dx[r * width + col..r * width + col + dim])
                    .for_each(|(g, d)| *g = d * inv);
                for &id in ids {
                    grads[table].add(id, &g);
                }
            }
            col += dim;
        }
        grads
    }

    /// Folds a training batch's statistics into Dice's moving averages.
    pub fn update_statistics(&mut self, cache: &DinCache) {
        self.attention.update_statistics(&cache.attention);
        self.dnn.update_statistics(&cache.dnn);
    }

    /// Sets every dense gradient to zero.
    pub fn zero_grad(&mut self) {
        self.visit_mut("", &mut |_, p| p.zero_grad());
    }
}

impl Module for Din {
    /// Names: `embeddings.<table>.weight`, `attention.layers.<i>.{weight,bias}`,
    /// `attention.layers.<i>.activation.{alpha,running_mean,running_var}`,
    /// `attention.output.*`, `dnn.layers.<i>.*`, `output.*`. `prefix` is ignored.
    fn visit<'a>(&'a self, _prefix: &str, f: &mut dyn FnMut(String, &'a Param)) {
        for (t, e) in self.layout.tables.iter().zip(&self.embeddings) {
            f(format!("embeddings.{}.weight", t.name), &e.weight);
        }
        self.attention.visit("attention", f);
        self.dnn.visit_from("dnn.layers", 0, f);
        self.output.visit("output", f);
    }
    fn visit_mut(&mut self, _prefix: &str, f: &mut dyn FnMut(String, &mut Param)) {
        for (t, e) in self.layout.tables.iter().zip(&mut self.embeddings) {
            f(format!("embeddings.{}.weight", t.name), &mut e.weight);
        }
        self.attention.visit_mut("attention", f);
        self.dnn.visit_from_mut("dnn.layers", 0, f);
        self.output.visit_mut("output", f);
    }
}
