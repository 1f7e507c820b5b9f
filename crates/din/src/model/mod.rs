//! The DIN model: embeddings, the local activation unit, the DNN tower.
//!
//! Every layer is a small struct with a `forward` and an explicit `backward`;
//! matrix products go through [`linalg`] (the `gemm` crate). The model reads as
//! a pipeline: embed, attend, concatenate, MLP, logit.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod embedding;
pub(crate) mod fused_f32;
pub mod linalg;
pub mod linear;
pub mod mlp;
pub mod param;
#[cfg(test)]
pub(crate) mod testutil;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use activation::{Activation, Rowwise};
pub use attention::{Attention, AttentionCache, Histories};
pub use bf16::{Kernel, Precision};
pub use embedding::{Embedding, SparseGrad};
pub use linear::Linear;
pub use mlp::{Mlp, MlpCache};
pub use param::{Module, Param, Role};

use crate::data::Batch;
use crate::schema::{Layout, ModelConfig};
use crate::Result;

/// Keys gathered per task: a batch with fewer than twice as many
/// behaviours gathers them on the calling thread. Measured with `din bench
/// run` (tutorial model, about 6,400 behaviours per batch of 256): the
/// keys' gather took 0.014 s of an epoch on one thread, 0.009 s in blocks
/// on two. (Adding their gradients table by table on two threads was
/// slower than on one: 0.023 s against 0.020 s.)
const KEY_BLOCK: usize = 1024;

/// Samples per task of [`Din::train_step_into`]'s DNN when the attention
/// unit takes its two passes (Dice): the DNN and the loss over each block
/// of samples, the blocks in parallel. The tasks depend on the batch
/// alone.
const DNN_CHUNK: usize = 64;

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
    /// The DNN's hidden layers in bf16 when inference is (see [`bf16`]).
    pub(crate) dnn_bf16: bf16::Bf16State,
}

/// Intermediate values of [`Din::forward`]; pass the same cache to
/// [`Din::forward_into`] again to reuse its buffers.
#[derive(Debug, Clone, Default)]
pub struct DinCache {
    /// Queries, `[B, Dq]`.
    q: Vec<f32>,
    /// Keys of all real behaviours, `[N, Dq]`.
    keys: Vec<f32>,
    /// Pooled histories, `[B, Dq]`.
    pooled: Vec<f32>,
    /// The DNN input `[B, Din]` being built (then swapped into `dnn`).
    x: Vec<f32>,
    /// Gradient buffers of the DNN's backward pass.
    dx: Vec<f32>,
    dscratch: Vec<f32>,
    /// Gradient reaching the pooled histories, `[B, Dq]`.
    dpooled: Vec<f32>,
    attention: AttentionCache,
    dnn: MlpCache,
    /// Logits, `[B]`.
    logits: Vec<f32>,
    /// Gradients reaching the queries `[B, Dq]` and keys `[N, Dq]`.
    dq: Vec<f32>,
    dk: Vec<f32>,
    /// [`Din::train_step_into`]: its chunks' bounds, and each chunk's
    /// gradients of the DNN and output layer.
    bounds: Vec<usize>,
    partial: Vec<Vec<f32>>,
    dnn_panels: mlp::MlpPanels,
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
        Self::new_shard(layout, config, seed, 0, 1)
    }

    /// The model rank `rank` of `ranks` holds in distributed training: the
    /// dense layers as [`Din::new`] makes them, and of each embedding table
    /// only the rows it owns ([`Embedding::new_shard`]), each with the
    /// values it has in [`Din::new`]'s model.
    pub fn new_shard(layout: &Layout, config: &ModelConfig, seed: u64, rank: usize, ranks: usize) -> Result<Din> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let embeddings = layout
            .tables
            .iter()
            .map(|t| {
                let zero_from = t.vocab_size.unwrap_or(0);
                Embedding::new_shard(&t.name, t.rows(), t.dim, zero_from, &mut rng, rank, ranks)
            })
            .collect::<Result<_>>()?;
        check_layer_sizes(layout, config)?;
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
            dnn_bf16: Default::default(),
        })
    }

    /// Logits `[B]` for a batch, with what the backward pass needs.
    /// `rng` drives dropout in training.
    pub fn forward(&self, batch: &Batch, mode: Mode, rng: Option<&mut dyn rand::RngCore>) -> (Vec<f32>, DinCache) {
        let mut cache = DinCache::default();
        let logits = self.forward_into(batch, mode, rng, &mut cache).to_vec();
        (logits, cache)
    }

    /// [`Din::forward`] into a cache whose buffers are reused from batch to
    /// batch; returns the logits `[B]`.
    pub fn forward_into<'c>(
        &self,
        batch: &Batch,
        mode: Mode,
        rng: Option<&mut dyn rand::RngCore>,
        cache: &'c mut DinCache,
    ) -> &'c [f32] {
        let x = &mut cache.x;
        self.gather_inputs(batch, x, &mut cache.q, &mut cache.keys);
        self.attention.forward_histories_into(
            &cache.q,
            &cache.keys,
            self.histories(batch),
            mode,
            &mut cache.attention,
            &mut cache.pooled,
        ); // [B, Dq]
        self.finish_inputs(batch, &cache.pooled, &mut cache.x);
        self.dnn
            .forward_into(&mut cache.x, batch.rows, mode, rng, &mut cache.dnn); // [B, H]
        self.output.forward(&cache.dnn.output, batch.rows, &mut cache.logits); // [B, 1]
        &cache.logits
    }

    /// The batch's histories as the attention unit takes them: stored once
    /// per group of a grouped batch.
    fn histories<'b>(&self, batch: &'b Batch) -> Histories<'b> {
        Histories {
            offsets: &batch.sequences[self.layout.pairs[0].1].offsets,
            starts: batch.is_grouped().then_some(batch.groups.as_slice()),
        }
    }

    /// The DNN input `[B, Din]` without the pooled histories and unpaired
    /// sequences (see [`Din::finish_inputs`]), the queries `[B, Dq]` and the
    /// keys of all real behaviours `[N, Dq]`.
    fn gather_inputs(&self, batch: &Batch, x: &mut Vec<f32>, q: &mut Vec<f32>, keys: &mut Vec<f32>) {
        let l = &self.layout;
        let b = batch.rows;
        let width = l.dnn_input_dim();
        let dq = l.query_dim();
        x.clear();
        x.resize(b * width, 0.0); // [B, Din]
        let mut col = 0;
        // Sparse features: one embedding each (a group's, for the user side
        // of a grouped batch).
        for (f, slot) in l.sparse.iter().enumerate() {
            let table = &self.embeddings[slot.table];
            let dim = table.dim();
            batch.for_each_sparse(f, |r, id| {
                x[r * width + col..r * width + col + dim].copy_from_slice(table.row(id));
            });
            col += dim;
        }
        // Dense features as they are.
        for (f, (_, dim)) in l.dense.iter().enumerate() {
            for r in 0..b {
                x[r * width + col..r * width + col + dim].copy_from_slice(batch.dense_values(f, r));
            }
            col += dim;
        }
        // Attention: query = concatenated targets, keys = concatenated
        // histories per position (once per group of a grouped batch).
        let n = batch.sequences[l.pairs[0].1].values.len();
        q.clear();
        q.resize(b * dq, 0.0); // [B, Dq]
        keys.clear();
        keys.resize(n * dq, 0.0); // [N, Dq]
        let mut qcol = 0;
        for &(t, _) in &l.pairs {
            let table = &self.embeddings[l.sparse[t].table];
            let dim = table.dim();
            batch.for_each_sparse(t, |r, id| {
                q[r * dq + qcol..r * dq + qcol + dim].copy_from_slice(table.row(id));
            });
            qcol += dim;
        }
        // The keys, in blocks of rows over the pool: rows of large tables,
        // one per behaviour of the batch.
        let histories: Vec<(&[u32], &Embedding)> = l
            .pairs
            .iter()
            .map(|&(_, h)| (&batch.sequences[h].values[..], &self.embeddings[l.sequences[h].table]))
            .collect();
        let copy = |first: usize, block: &mut [f32]| {
            let mut qcol = 0;
            for &(ids, table) in &histories {
                let dim = table.dim();
                for (row, &id) in block.chunks_exact_mut(dq).zip(&ids[first..]) {
                    row[qcol..qcol + dim].copy_from_slice(table.row(id));
                }
                qcol += dim;
            }
        };
        if n >= 2 * KEY_BLOCK && dq > 0 {
            use rayon::prelude::*;
            keys.par_chunks_mut(KEY_BLOCK * dq)
                .enumerate()
                .for_each(|(b, block)| copy(b * KEY_BLOCK, block));
        } else {
            copy(0, keys);
        }
    }

    /// Writes the pooled histories `[B, Dq]` and the means of the unpaired
    /// sequences into the DNN input `x`.
    fn finish_inputs(&self, batch: &Batch, pooled: &[f32], x: &mut [f32]) {
        let (width, dq, col) = (
            self.layout.dnn_input_dim(),
            self.layout.query_dim(),
            self.pooled_column(),
        );
        for (row, p) in x.chunks_exact_mut(width).zip(pooled.chunks_exact(dq)) {
            row[col..col + dq].copy_from_slice(p);
        }
        self.write_unpaired(batch, x);
    }

    /// Where the pooled histories start in a row of the DNN input: after the
    /// sparse features' embeddings and the dense features.
    fn pooled_column(&self) -> usize {
        let l = &self.layout;
        l.sparse.iter().map(|s| self.embeddings[s.table].dim()).sum::<usize>()
            + l.dense.iter().map(|d| d.1).sum::<usize>()
    }

    /// Writes the means of the sequences outside the attention (zero if
    /// empty) into the DNN input `x`, after the pooled histories.
    fn write_unpaired(&self, batch: &Batch, x: &mut [f32]) {
        let l = &self.layout;
        let width = l.dnn_input_dim();
        let mut col = self.pooled_column() + l.query_dim();
        for s in l.unpaired_sequences() {
            let table = &self.embeddings[l.sequences[s].table];
            let dim = table.dim();
            for r in 0..batch.rows {
                let ids = batch.history(s, r);
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
    }

    /// Infers with `precision` from now on (see [`bf16`]: the hidden layers
    /// of the attention unit, after the first, and of the DNN in bf16);
    /// returns the kernel it resolved to on this CPU. Training passes stay
    /// f32. The bf16 weights are made at the next inference, and again after
    /// any change through [`Module::visit_mut`].
    pub fn set_precision(&mut self, precision: Precision) -> Kernel {
        let kernel = self.attention.set_precision(precision);
        self.dnn_bf16.set(kernel);
        kernel
    }

    /// The kernel inference runs on.
    pub fn kernel(&self) -> Kernel {
        self.attention.kernel()
    }

    /// Trains with `precision` from now on; returns the kernel it resolved
    /// to on this CPU. With `bf16` (mixed precision), the training passes
    /// multiply in bf16 where inference in bf16 does (the hidden layers of
    /// the attention unit after the first, and of the DNN), forward and
    /// backward: both operands of every such product (weights, activations,
    /// gradients) rounded to bf16, the sums in f32. Weights, gradients and
    /// the optimizer's state stay f32. Inference is not affected (see
    /// [`Din::set_precision`]).
    pub fn set_training_precision(&mut self, precision: Precision) -> Kernel {
        let kernel = precision.resolve();
        self.dnn.products = kernel;
        self.attention.rest.products = kernel;
        kernel
    }

    /// The kernel of the DNN's training products (see [`Din::set_training_precision`]; the
    /// attention unit's: [`Attention::training_kernel`]).
    pub fn training_kernel(&self) -> Kernel {
        self.dnn.products
    }

    /// Click probabilities `[B]` (inference mode). The attention unit keeps
    /// nothing for a backward pass, and consecutive samples with the same
    /// history (one request's candidates) share its history term.
    pub fn predict(&self, batch: &Batch) -> Vec<f32> {
        self.predict_with_weights(batch).0
    }

    /// [`Din::predict`], also returning the attention weight of every real
    /// behaviour of the batch (`[N]`, in the order of the paired histories'
    /// ids: sample by sample, position by position; the paper's Fig. 5).
    pub fn predict_with_weights(&self, batch: &Batch) -> (Vec<f32>, Vec<f32>) {
        let (mut x, mut q, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        self.gather_inputs(batch, &mut x, &mut q, &mut keys);
        // Candidates of one request follow each other with the same history.
        let same_history: Vec<bool> = (0..batch.rows)
            .map(|s| {
                s > 0
                    && (batch.group_of(s) == batch.group_of(s - 1)
                        || self
                            .layout
                            .pairs
                            .iter()
                            .all(|&(_, h)| batch.history(h, s) == batch.history(h, s - 1)))
            })
            .collect();
        let (mut pooled, mut weights) = (Vec::new(), Vec::new());
        self.attention.infer_histories(
            &q,
            &keys,
            self.histories(batch),
            Some(&same_history),
            &mut pooled,
            &mut weights,
        );
        self.finish_inputs(batch, &pooled, &mut x);
        let dnn = match self.dnn_bf16.layers(|kernel| self.dnn.bf16_weights(kernel)) {
            Some(weights) => self.dnn.infer_bf16(x, batch.rows, weights),
            None => self.dnn.forward(x, batch.rows, Mode::Infer, None).output,
        };
        let mut logits = Vec::new();
        self.output.forward(&dnn, batch.rows, &mut logits);
        let probs = logits.into_iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
        (probs, weights)
    }

    /// Back-propagates `dlogits` (`[B]`): accumulates dense parameter gradients
    /// in place and returns the embedding gradients of the touched rows.
    /// The cache's buffers are reused for gradients: it serves one backward pass.
    pub fn backward(&mut self, batch: &Batch, cache: &mut DinCache, dlogits: &[f32]) -> EmbeddingGrads {
        let mut grads = Vec::new();
        self.backward_into(batch, cache, dlogits, &mut grads);
        grads
    }

    /// [`Din::backward`] into reused embedding gradients (cleared first).
    pub fn backward_into(&mut self, batch: &Batch, cache: &mut DinCache, dlogits: &[f32], grads: &mut EmbeddingGrads) {
        let b = batch.rows;
        let mut dx = std::mem::take(&mut cache.dx);
        self.output.backward(&cache.dnn.output, b, dlogits, Some(&mut dx)); // [B, H]
        self.dnn.backward_into(&cache.dnn, b, &mut dx, &mut cache.dscratch); // [B, Din]
        let (width, dq_width, col) = (
            self.layout.dnn_input_dim(),
            self.layout.query_dim(),
            self.pooled_column(),
        );
        let mut dpooled = std::mem::take(&mut cache.dpooled);
        dpooled.clear();
        dpooled.resize(b * dq_width, 0.0);
        for (p, row) in dpooled.chunks_exact_mut(dq_width).zip(dx.chunks_exact(width)) {
            p.copy_from_slice(&row[col..col + dq_width]);
        }
        let (mut dq, mut dk) = (std::mem::take(&mut cache.dq), std::mem::take(&mut cache.dk));
        self.attention
            .backward_into(&cache.q, &cache.keys, &mut cache.attention, &dpooled, &mut dq, &mut dk);
        Self::embedding_grads(&self.layout, &self.embeddings, batch, [&dx, &dq, &dk], grads);
        (cache.dq, cache.dk, cache.dx, cache.dpooled) = (dq, dk, dx, dpooled);
    }

    /// The embedding gradients of a batch (`grads`, cleared first), from
    /// the gradients of the DNN input `dx` (`[B, Din]`), of the queries
    /// `dq` (`[B, Dq]`) and of the keys `dk` (`[N, Dq]`), for `embeddings`
    /// laid out by `l` (a model's fields, so that the rest of the model can
    /// be updated meanwhile).
    fn embedding_grads(
        l: &Layout,
        embeddings: &[Embedding],
        batch: &Batch,
        [dx, dq, dk]: [&[f32]; 3],
        grads: &mut EmbeddingGrads,
    ) {
        let b = batch.rows;
        let width = l.dnn_input_dim();
        let dq_width = l.query_dim();
        grads.resize_with(embeddings.len(), SparseGrad::default);
        for (g, e) in grads.iter_mut().zip(embeddings) {
            g.clear();
            g.dim = e.dim();
        }
        let mut col = 0;
        let mut sum = Vec::new();
        for (f, slot) in l.sparse.iter().enumerate() {
            let dim = embeddings[slot.table].dim();
            if batch.is_shared_sparse(f) {
                // A user feature of a grouped batch: its group's rows are
                // summed first and added to its row once.
                for (g, &id) in batch.sparse[f].iter().enumerate() {
                    sum.clear();
                    sum.resize(dim, 0.0f32);
                    for r in batch.group_rows(g) {
                        sum.iter_mut()
                            .zip(&dx[r * width + col..r * width + col + dim])
                            .for_each(|(a, d)| *a += d);
                    }
                    grads[slot.table].add(id, &sum);
                }
            } else {
                for (r, &id) in batch.sparse[f].iter().enumerate() {
                    grads[slot.table].add(id, &dx[r * width + col..r * width + col + dim]);
                }
            }
            col += dim;
        }
        col += l.dense.iter().map(|d| d.1).sum::<usize>() + dq_width;
        let mut qcol = 0;
        for &(t, h) in &l.pairs {
            let table = l.sparse[t].table;
            let dim = embeddings[table].dim();
            let g = &mut grads[table];
            batch.for_each_sparse(t, |r, id| {
                g.add(id, &dq[r * dq_width + qcol..r * dq_width + qcol + dim]);
            });
            let htable = l.sequences[h].table;
            grads[htable].add_rows(&batch.sequences[h].values, &dk[qcol..], dq_width);
            qcol += dim;
        }
        for s in l.unpaired_sequences() {
            let table = l.sequences[s].table;
            let dim = embeddings[table].dim();
            let mut g = vec![0.0f32; dim];
            for r in 0..b {
                let ids = batch.history(s, r);
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
    }

    /// Whether [`Din::train_step_into`] can train on `batch`: its samples
    /// each have their own history (not grouped), the history is pooled by
    /// the attention unit, and the DNN has no batch statistics or dropout
    /// (each sample's pass through it is then its own).
    pub fn steps_in_chunks(&self, batch: &Batch) -> bool {
        !batch.is_grouped() && self.attention.chunkable() && self.dnn.trains_by_rows()
    }

    /// A training step's forward and backward passes in one (see
    /// [`Din::steps_in_chunks`]): the batch is cut into chunks of samples,
    /// and one task per chunk runs the attention unit's forward pass over
    /// the chunk's behaviours, the DNN and the loss's gradient over its
    /// samples, and the unit's backward pass, while the chunk's activations
    /// are still in its core's cache (a batch's are tens of MiB); in
    /// mixed-precision training, on bf16 weights packed once per step. When
    /// the unit cannot run so (Dice's batch statistics, or in FP32 no
    /// AVX-512F for its fused products), it takes its two passes over the
    /// batch, and the DNN and the loss run in between, a task per block of
    /// samples.
    /// Returns the logits `[B]`; adds the dense parameters' gradients of
    /// the mean binary cross-entropy over the batch (call
    /// [`Din::zero_grad`] first) and writes the embedding gradients into
    /// `grads`. Each task's gradients are summed in task order: the
    /// results do not depend on the number of threads, and equal
    /// [`Din::forward_into`] then [`Din::backward_into`] with
    /// `bce_with_logits`'s gradient but for the order of those sums.
    pub fn train_step_into<'c>(
        &mut self,
        batch: &Batch,
        cache: &'c mut DinCache,
        grads: &mut EmbeddingGrads,
    ) -> &'c [f32] {
        let b = batch.rows;
        let (width, dqw, col) = (
            self.layout.dnn_input_dim(),
            self.layout.query_dim(),
            self.pooled_column(),
        );
        // The DNN's weights packed while the inputs are gathered.
        let (x, q, keys) = (&mut cache.x, &mut cache.q, &mut cache.keys);
        rayon::join(
            || self.dnn.pack_panels(&mut cache.dnn_panels),
            || {
                self.gather_inputs(batch, x, q, keys);
                self.write_unpaired(batch, x);
            },
        );
        // One pass over the unit's chunks, or (batch statistics in the
        // unit: Dice) its forward pass, the rest over chunks of samples,
        // then its backward pass.
        let one_pass = self.attention.steps_in_chunks();
        cache.bounds.clear();
        if one_pass {
            let offsets = &batch.sequences[self.layout.pairs[0].1].offsets;
            cache
                .bounds
                .extend_from_slice(self.attention.plan_step(offsets, &mut cache.attention));
        } else {
            self.attention.forward_histories_into(
                &cache.q,
                &cache.keys,
                self.histories(batch),
                Mode::Train,
                &mut cache.attention,
                &mut cache.pooled,
            ); // [B, Dq]
            cache.bounds.extend((0..b).step_by(DNN_CHUNK));
            cache.bounds.extend((b > 0).then_some(b));
        }
        let chunks = cache.bounds.len().saturating_sub(1);
        let h_last = self.output.input_dim();
        let dnn_len = self.dnn.grad_len();
        let grad_len = dnn_len + h_last + 1;
        size_partials(&mut cache.partial, chunks, grad_len);
        // Sized only: every chunk writes its rows.
        cache.logits.resize(b, 0.0);
        cache.dx.resize(b * width, 0.0);
        let samples = cache.bounds.windows(2).map(|w| w[1] - w[0]);
        let xs = split_pieces(&mut cache.x, samples.clone().map(|s| s * width));
        let dxs = split_pieces(&mut cache.dx, samples.clone().map(|s| s * width));
        let logits = split_pieces(&mut cache.logits, samples);
        let mut extras: Vec<StepChunk<'_>> = xs
            .into_iter()
            .zip(dxs)
            .zip(logits)
            .zip(cache.partial.iter_mut())
            .map(|(((x, dx), logits), grads)| StepChunk { x, dx, logits, grads })
            .collect();
        let (mut dq, mut dk) = (std::mem::take(&mut cache.dq), std::mem::take(&mut cache.dk));
        let (dnn, output, labels, panels) = (&self.dnn, &self.output, &batch.labels, &cache.dnn_panels);
        let middle = |c: &mut StepChunk<'_>, s0: usize, s1: usize, pooled: &[f32], dpooled: &mut [f32]| {
            let m = s1 - s0;
            c.grads.fill(0.0);
            for (row, p) in c.x.chunks_exact_mut(width).zip(pooled.chunks_exact(dqw)) {
                row[col..col + dqw].copy_from_slice(p);
            }
            STEP.with(|scratch| {
                let StepScratch { dnn: cache, dpre, g } = &mut *scratch.borrow_mut();
                // The DNN, [m, Din] -> [m, H]; the output layer, [H] -> 1,
                // and the mean binary cross-entropy's gradient (as
                // `bce_with_logits` computes it).
                let out = dnn.forward_rows(c.x, m, panels, cache);
                let (gd, go) = c.grads.split_at_mut(dnn_len);
                let (dw, db) = go.split_at_mut(h_last);
                let (w_out, b_out) = (&output.weight.value, output.bias.value[0]);
                g.resize(m * h_last, 0.0); // every row written below
                for (((z, h), &y), gr) in c
                    .logits
                    .iter_mut()
                    .zip(out.chunks_exact(h_last))
                    .zip(&labels[s0..s1])
                    .zip(g.chunks_exact_mut(h_last))
                {
                    *z = dot(h, w_out) + b_out;
                    let p = 1.0 / (1.0 + (-*z).exp());
                    let dz = (p - y) / b as f32;
                    dw.iter_mut().zip(h).for_each(|(a, h)| *a += h * dz);
                    db[0] += dz;
                    gr.iter_mut().zip(w_out).for_each(|(a, w)| *a = dz * w); // [H]
                }
                dnn.backward_rows(c.x, cache, m, panels, g, dpre, gd); // [m, Din]
                c.dx.copy_from_slice(g);
            });
            for (p, row) in dpooled.chunks_exact_mut(dqw).zip(c.dx.chunks_exact(width)) {
                p.copy_from_slice(&row[col..col + dqw]);
            }
        };
        if one_pass {
            self.attention.train_step(
                &cache.q,
                &cache.keys,
                &mut cache.attention,
                &mut cache.pooled,
                &mut dq,
                &mut dk,
                &mut extras,
                middle,
            );
        } else {
            use rayon::prelude::*;
            let mut dpooled = std::mem::take(&mut cache.dpooled);
            dpooled.clear();
            dpooled.resize(b * dqw, 0.0);
            let pooled = &cache.pooled;
            let samples = cache.bounds.windows(2).map(|w| (w[0], w[1]));
            let pieces = split_pieces(&mut dpooled, samples.clone().map(|(s0, s1)| (s1 - s0) * dqw));
            let mut parts: Vec<_> = extras.iter_mut().zip(pieces).zip(samples).collect();
            parts.par_iter_mut().for_each(|((c, dp), (s0, s1))| {
                middle(c, *s0, *s1, &pooled[*s0 * dqw..*s1 * dqw], dp);
            });
            drop(parts);
            self.attention
                .backward_into(&cache.q, &cache.keys, &mut cache.attention, &dpooled, &mut dq, &mut dk);
            cache.dpooled = dpooled;
        }
        drop(extras);
        // The chunks' weight gradients summed and added (in parallel
        // blocks), while one worker gathers the embedding gradients (one
        // pass over the batch's ids, in order).
        let (attention, dnn, output) = (&mut self.attention, &mut self.dnn, &mut self.output);
        let (partial, unit) = (&mut cache.partial, &mut cache.attention);
        rayon::join(
            || {
                if one_pass {
                    attention.finish_step(unit);
                }
                sum_in_order(partial, chunks);
                let total = &partial[0];
                dnn.add_grads(&total[..dnn_len]);
                let (dw, db) = total[dnn_len..].split_at(h_last);
                output.weight.grad.iter_mut().zip(dw).for_each(|(a, g)| *a += g);
                output.bias.grad[0] += db[0];
            },
            || Self::embedding_grads(&self.layout, &self.embeddings, batch, [&cache.dx, &dq, &dk], grads),
        );
        (cache.dq, cache.dk) = (dq, dk);
        // Nothing is kept for a backward pass, nor Dice statistics.
        cache.dnn = MlpCache::default();
        &cache.logits
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

/// `a·b` with 8 partial sums, so that it vectorises (a plain sum of f32 is
/// kept in order by the compiler and runs one element at a time).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Gives `partial` one gradient buffer of `len` per chunk (at least one),
/// reusing the buffers of the batch before. Each chunk's task clears its
/// own before it writes; with no chunks the one buffer is zeroed here, so
/// that the sums are zero.
pub(crate) fn size_partials(partial: &mut Vec<Vec<f32>>, chunks: usize, len: usize) {
    partial.resize_with(chunks.max(1), Vec::new);
    for p in partial.iter_mut() {
        p.resize(len, 0.0);
    }
    if chunks == 0 {
        partial[0].fill(0.0);
    }
}

/// Sums the first `count` of `partial` into `partial[0]`, element by
/// element in order whichever thread sums it (deterministic).
pub(crate) fn sum_in_order(partial: &mut [Vec<f32>], count: usize) {
    use rayon::prelude::*;
    const SPAN: usize = 4096;
    let (total, others) = partial.split_at_mut(1);
    let others = &others[..count.saturating_sub(1)];
    total[0].par_chunks_mut(SPAN).enumerate().for_each(|(i, t)| {
        for p in others {
            t.iter_mut().zip(&p[i * SPAN..]).for_each(|(a, b)| *a += b);
        }
    });
}

/// One chunk's share of [`Din::train_step_into`]'s batch buffers.
struct StepChunk<'a> {
    /// DNN input rows `[bc, Din]`.
    x: &'a mut [f32],
    /// Their gradients, `[bc, Din]`.
    dx: &'a mut [f32],
    /// Logits `[bc]`.
    logits: &'a mut [f32],
    /// Gradients of the DNN and the output layer, laid out as
    /// [`Mlp::grad_len`] says, then `dw_out`, `db_out`.
    grads: &'a mut [f32],
}

/// Working buffers of a [`Din::train_step_into`] task (each worker's own).
#[derive(Default)]
struct StepScratch {
    dnn: MlpCache,
    g: Vec<f32>,
    dpre: Vec<f32>,
}

thread_local! {
    static STEP: std::cell::RefCell<StepScratch> = std::cell::RefCell::new(StepScratch::default());
}

/// Splits `buf` into consecutive pieces of the given lengths.
pub(crate) fn split_pieces<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lens.map(|len| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        buf = tail;
        head
    })
    .collect()
}

/// Asks the CPU for the cache line at `p`, into L1 (a hint: no effect
/// elsewhere, and never a fault, whatever the address).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] into L2 only, leaving L1 to the data in use.
#[inline(always)]
pub(crate) fn prefetch_l2<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T1 }, T>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_hint<const HINT: i32, T>(p: *const T) {
    // SAFETY: a prefetch is a hint that never faults, whatever the address
    // (SSE, part of x86_64).
    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.cast()) }
}

/// Refuses, before anything is allocated, a model whose dense layers cannot
/// be: a width that overflows, or a weight matrix larger than the memory
/// the process can get (an allocation failure would abort the process,
/// not return an error). The embedding tables check themselves.
fn check_layer_sizes(layout: &Layout, config: &ModelConfig) -> Result<()> {
    fn sum(widths: impl Iterator<Item = usize>) -> Option<usize> {
        widths.into_iter().try_fold(0usize, usize::checked_add)
    }
    let dim = |s: &crate::schema::SparseSlot| layout.tables[s.table].dim;
    let query = sum(layout.pairs.iter().map(|&(s, _)| dim(&layout.sparse[s])));
    let unpaired = layout.unpaired_sequences();
    let dnn_input = [
        sum(layout.sparse.iter().map(dim)),
        sum(layout.dense.iter().map(|d| d.1)),
        query,
        sum(unpaired.iter().map(|&i| layout.tables[layout.sequences[i].table].dim)),
    ]
    .into_iter()
    .try_fold(0usize, |a, b| a.checked_add(b?));
    let chain = |field: &str, input: Option<usize>, units: &[usize]| -> Result<()> {
        let too_big = |what: String| crate::Error::config(field, format!("{units:?}"), what);
        let mut width = input.ok_or_else(|| too_big("the input width overflows".into()))?;
        for &next in units.iter().chain([&1]) {
            let fits = width
                .checked_mul(next)
                .and_then(|n| n.checked_mul(4))
                .is_some_and(|bytes| Vec::<u8>::new().try_reserve_exact(bytes).is_ok());
            if !fits {
                return Err(too_big(format!(
                    "a {width} x {next} weight matrix cannot be allocated; lower the widths or the embedding dimensions"
                )));
            }
            width = next;
        }
        Ok(())
    };
    chain(
        "model.attention.hidden_units",
        query.and_then(|q| q.checked_mul(4)),
        &config.attention.hidden_units,
    )?;
    chain("model.dnn.hidden_units", dnn_input, &config.dnn.hidden_units)
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
        // The weights may change: bf16 copies are made again when next used.
        self.dnn_bf16.invalidate();
        self.dnn.visit_from_mut("dnn.layers", 0, f);
        self.output.visit_mut("output", f);
    }
}
