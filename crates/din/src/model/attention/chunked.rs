//! The chunk-parallel path of the local activation unit.
//!
//! The batch is cut into chunks of whole samples holding about
//! [`CHUNK_ROWS_TRAIN`] (training; with Dice's batch statistics, up to
//! [`CHUNK_ROWS_DICE`], see [`dice_chunk_rows`]) or [`CHUNK_ROWS_INFER`] behaviours. Rayon runs one task per chunk, and each task
//! uses single-threaded matrix products, so a chunk's activations stay in its
//! core's cache from one layer to the next; bias, activation, scoring,
//! normalisation and pooling are done in the same pass over the chunk.
//! Chunks depend on the batch alone and the per-chunk weight gradients are
//! summed in chunk order, so results do not depend on the number of threads.
//!
//! This path serves every configuration with attention pooling. Dice in
//! training normalises each hidden layer by its batch's own moments, which
//! couple all rows (see
//! [`Activation::is_rowwise`](crate::model::Activation::is_rowwise)), so
//! there a pass stops at each Dice layer's pre-activation: every chunk
//! computes its rows' moments, they are merged in chunk order, and the next
//! pass activates with them and goes on. Its backward pass stops there too:
//! Dice's gradient through the batch mean and variance needs the batch's
//! sums of the upstream gradients. What crosses such a barrier is what the
//! backward pass keeps anyway (each layer's pre-activation, or the gradient
//! in its output's place) plus a few floats per channel and chunk; the cost
//! is that the chunk's block is read back from memory after the barrier
//! instead of from L2. A Dice layer keeps its sigmoids in its output's
//! place, so that the backward pass need not compute them again, and the
//! output is recomputed from them where needed (see [`Shared::kept_width`]).
//!
//! Inference on AMX takes a fused form of the same pass
//! ([`Shared::forward_fused`]): every layer, the first included, on the
//! tiles, a block of 32 rows at a time, each layer's activations rounded
//! straight into the next product's operand.
//!
//! Training takes a third form where nothing couples a batch's samples
//! ([`Attention::train_step`]): each chunk's task runs the unit's forward
//! pass, hands the chunk's pooled histories to the rest of the model (the
//! DNN and the loss, over the chunk's samples), and runs the unit's
//! backward pass on the gradients it gets back, while the chunk's
//! activations are still in its core's cache; the batch's region of
//! activations (tens of MiB) is never made. The chunks and their sums are
//! those of the two passes.
//!
//! FP32 training on AVX-512 with PReLU or ReLU runs its hidden layers'
//! forward products and the backward `dy·W_lᵀ` on [`fused_f32`]: the bias
//! and activation (forward), or the activation's backward pass with the
//! bias and slope gradients (backward), are applied to each tile of the
//! product as it leaves the registers, with the weights packed once per
//! batch; the weight gradients `xᵀ·dy` stay on `gemm`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{softmax_in_place, Attention, AttentionCache, Histories, Path};
use crate::model::activation::ActivationCache;
use crate::model::activation::Moments;
use crate::model::bf16::{Bf16Matrix, Kernel};
use crate::model::fused_f32::{self, Bias, Panels};
use crate::model::linalg::{serial, Gemm};
use crate::model::mlp::Block;
use crate::model::mlp::MlpCache;
use crate::model::{dot, size_partials, split_pieces, Mode, Rowwise};
use crate::schema::{ActivationKind, Normalization};

/// Behaviours per training task, about: the chunk's activations (about
/// 3.6 KiB per behaviour for the tutorial's (256,128,64) unit) stay in a
/// core's L2. A training batch is cut into an even number of chunks of
/// about equal rows (at least this many, but for one chunk), which keeps
/// two threads equally busy to the end; the count depends on the batch
/// alone. Measured with `din bench run` (2 threads): 512 and larger train
/// at the same speed, 384 and 256 slower (more partial gradients).
pub(super) const CHUNK_ROWS_TRAIN: usize = 512;
/// The most behaviours per training task with Dice's batch statistics
/// (see [`dice_chunk_rows`]).
pub(super) const CHUNK_ROWS_DICE: usize = 2 * CHUNK_ROWS_TRAIN;
/// Bytes of a chunk's region that Dice's training passes aim at (see
/// [`dice_chunk_rows`]).
const DICE_CHUNK_BYTES: usize = 1_200_000;

/// Behaviours per training task with Dice's batch statistics, for region
/// rows of `row_width` floats: about [`DICE_CHUNK_BYTES`] of region per
/// chunk, from [`CHUNK_ROWS_TRAIN`] to [`CHUNK_ROWS_DICE`] rows. Dice's
/// passes ([`Attention::forward_chunked`], [`Attention::backward_chunked`])
/// read each chunk back from L3 and meet at a barrier six times a step, so
/// fewer, larger chunks pay while a pass's blocks still fit in L2.
/// Measured inside one process (batch 1024, 2 threads, 48 KiB L1d and
/// 2 MiB L2 per core), alternating builds, medians of five runs, step
/// time against 512 rows:
/// * (80,40) over 16-wide keys, 273 floats a row (1,024 rows here): 1,024
///   rows 0.96x and 0.95x (two runs), 2,048 rows 0.98x, 256 rows 1.08x;
/// * (256,128,64), 929 floats a row (512 rows here): 1,024 rows 1.06x,
///   256 rows 1.04x.
///
/// PReLU's one-pass step took the same time with 512 and 1,024 rows (0.99x).
fn dice_chunk_rows(row_width: usize) -> usize {
    (DICE_CHUNK_BYTES / (4 * row_width.max(1))).clamp(CHUNK_ROWS_TRAIN, CHUNK_ROWS_DICE)
}
/// Weights packed for a pass, or `None` where none were (an empty buffer).
fn packed<T>(v: &[T]) -> Option<&[T]> {
    Some(v).filter(|v| !v.is_empty())
}

/// Behaviours per inference task: nothing is kept between chunks, and
/// smaller chunks balance the two cores better on small requests
/// (1 x 200 latency 3.3 ms at 256 against 5.8 ms at 512).
pub(super) const CHUNK_ROWS_INFER: usize = 256;

thread_local! {
    /// Inference scratch of each worker thread: nothing is kept between
    /// chunks, so memory does not grow with the batch.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Fused AMX inference: each worker thread's packed operands, the
    /// first layer's (a chunk's) and a later layer's (a block's), reused
    /// from chunk to chunk.
    static OPERANDS: RefCell<[Vec<u32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Buffers of the chunked path, reused from one batch to the next.
#[derive(Debug, Clone, Default)]
pub(super) struct ChunkedState {
    /// First sample of each chunk, then the batch size.
    bounds: Vec<usize>,
    /// Where each sample's (query, behaviour) rows start, then their
    /// count, `[B + 1]`: the histories' offsets when every sample has its own.
    offsets: Vec<u32>,
    /// Where each sample's keys start in `keys`, `[B]`.
    key_at: Vec<u32>,
    /// Samples share histories (a grouped batch): a training pass computes
    /// each history's share of the first layer once (see [`Layout::kq`]).
    grouped: bool,
    /// The last pass kept what the backward pass needs, in [`Mode::Train`]:
    /// Dice layers were normalised by their batch's moments.
    train: bool,
    /// `Wq + Wd`, `[D, H1]`.
    wq: Vec<f32>,
    /// `[Wk - Wd; Wp]`, `[2D, H1]`: the first layer's weight on `[k, q*k]`.
    wkp: Vec<f32>,
    /// Training only: per behaviour, `[k, q*k]`, each hidden layer's
    /// pre-activation and output (or sigmoids), and the score's gradient
    /// (see [`Layout`]).
    region: Vec<f32>,
    /// `[B, H1]`: `q·Wq' + b1` in the forward pass, `Σ_t dpre1_t` in the backward pass.
    per_sample: Vec<f32>,
    /// Weight gradients of each chunk (laid out by `Layout::grad_offsets`).
    partial: Vec<Vec<f32>>,
    /// Dice in training: each chunk's moments of the layer whose pass
    /// just ended (forward), or its `Σ gz`, `Σ gz·z` (backward, `[2, H]`,
    /// summed row by row; the chunks' are added in f64).
    moments: Vec<Moments>,
    sums: Vec<Vec<f32>>,
    /// Dice in training: the batch moments each Dice layer was normalised
    /// with in the last training pass, for the backward pass and the
    /// moving averages.
    pub(super) batch_moments: Vec<BatchMoments>,
    /// Inference with shared histories: `k·(Wk - Wd)` of every history that
    /// two or more consecutive samples share, computed once for all of
    /// them, whichever chunks they fall in (`[rows, H1]`, history by history).
    shared_k1: Vec<f32>,
    /// Per sample: where its history's rows start in `shared_k1`, or
    /// `usize::MAX` when its history is its own.
    shared_at: Vec<usize>,
    /// Mixed-precision training: hidden layers `1..`'s weights `W_l` and
    /// their transposes in bf16, packed once per training pass for every
    /// chunk's `x·W_l` and `dy·W_lᵀ` (empty otherwise).
    packed: Vec<Bf16Matrix>,
    packed_t: Vec<Bf16Matrix>,
    /// FP32 training with fused products (see [`Shared::panels`]): each
    /// hidden layer's weights packed once per batch for the forward pass
    /// (layer 0: `[Wk'; Wp]`), and their transposes for the backward pass
    /// (empty otherwise).
    panels: Vec<Panels>,
    panels_t: Vec<Panels>,
}

/// One hidden layer's batch moments (Dice in training).
#[derive(Debug, Clone, Default)]
pub(super) struct BatchMoments {
    /// The hidden layer.
    pub layer: usize,
    /// Mean per channel.
    pub mean: Vec<f32>,
    /// Biased variance per channel.
    pub var: Vec<f32>,
    /// Rows they were taken over.
    pub rows: usize,
}

/// Where the values of one behaviour row live in a chunk's region: the chunk
/// stores `[k, q*k]` for all its rows, then each hidden layer's pre-activation
/// and output (a Dice layer in training: its sigmoids, see
/// [`Shared::kept_width`]), then the score gradients, each block `[rows, width]`.
/// It also places each layer's gradients in a chunk's gradient buffer.
struct Layout {
    d: usize,
    /// Floats per row of the first block: `[k, q*k]` (`2D`), or only
    /// `q*k` (`D`) when training on a grouped batch, whose keys' share of
    /// the first layer is computed once per history, not per row.
    kq: usize,
    widths: Vec<usize>,
    /// Start of each hidden layer's gradients in a chunk's gradient buffer,
    /// then of the score layer's, then the total length. Layer 0 holds
    /// `d[Wk'; Wp]` `[2D, H1]`, `dWq'` `[D, H1]`, `db1`, `dalpha1`; layer `l`
    /// holds `dW_l`, `db_l`, `dalpha_l`; the score layer `dw_out`, `db_out`.
    grad_offsets: Vec<usize>,
}

impl Layout {
    fn new(att: &Attention, compact: bool) -> Self {
        let d = att.dims().0;
        let widths: Vec<usize> = att.hidden().map(|b| b.linear.output_dim()).collect();
        let mut grad_offsets = vec![0];
        let mut width_in = 3 * d;
        for &h in &widths {
            grad_offsets.push(grad_offsets[grad_offsets.len() - 1] + width_in * h + 2 * h);
            width_in = h;
        }
        grad_offsets.push(grad_offsets[grad_offsets.len() - 1] + width_in + 1);
        Layout {
            d,
            kq: if compact { d } else { 2 * d },
            widths,
            grad_offsets,
        }
    }

    /// Zeroes a chunk's gradient buffer but for the weight gradients, which
    /// the chunk's backward pass writes, not adds to, once each (every
    /// layer's, whatever passes Dice splits it into).
    fn clear_sums(&self, g: &mut [f32]) {
        let mut width_in = 3 * self.d;
        for (l, &h) in self.widths.iter().enumerate() {
            g[self.grad_offsets[l] + width_in * h..self.grad_offsets[l + 1]].fill(0.0);
            width_in = h;
        }
        g[self.grad_offsets[self.widths.len()]..].fill(0.0);
    }

    /// Floats per behaviour row.
    fn row_width(&self) -> usize {
        self.kq + 2 * self.widths.iter().sum::<usize>() + 1
    }

    /// Offset (in floats, for a chunk of `n` rows) of hidden layer `l`'s
    /// pre-activation; its output follows at `+ n * widths[l]`.
    fn layer(&self, l: usize, n: usize) -> usize {
        n * (self.kq + 2 * self.widths[..l].iter().sum::<usize>())
    }
}

/// The last hidden layer as the score layer's backward pass
/// ([`Shared::backward_scores`]) finds it.
enum LastLayer<'x> {
    /// Its output (`[n, H]`), replaced by its gradient `dh_last`.
    Output(&'x mut [f32]),
    /// Dice in training: its pre-activation, and in its output's place
    /// the sigmoids, replaced by the first half of Dice's backward pass
    /// (`g`), which adds to the layer's slope gradient and leaves its sums
    /// (see [`Rowwise::dice_backward_partial_scored`]).
    Dice {
        pre: &'x [f32],
        g: &'x mut [f32],
        dalpha: &'x mut [f32],
        sums: &'x mut [f32],
    },
}

/// One chunk's samples and its share of a forward pass's buffers.
struct ChunkForward<'b> {
    s0: usize,
    s1: usize,
    region: &'b mut [f32],
    aq: &'b mut [f32],
    weights: &'b mut [f32],
    pooled: &'b mut [f32],
    moments: &'b mut Moments,
}

/// One chunk's samples and its share of a backward pass's buffers.
struct ChunkBackward<'b> {
    s0: usize,
    s1: usize,
    region: &'b mut [f32],
    ds: &'b mut [f32],
    grads: &'b mut [f32],
    dq: &'b mut [f32],
    dk: &'b mut [f32],
    sums: &'b mut [f32],
}

/// What every chunk of one pass shares.
struct Shared<'a> {
    att: &'a Attention,
    /// Each hidden layer's activation, its per-channel parameters gathered
    /// once; a Dice layer in training gets its batch's moments when known.
    acts: Vec<Rowwise<'a>>,
    /// Per hidden layer: Dice in training, normalised by its batch's moments.
    batch_stats: Vec<bool>,
    /// Dice in training, backward: the batch means of `gz` and `gz·z` of
    /// the layer a pass resumes at (see [`Rowwise::dice_backward_finish`]).
    dice_means: (Vec<f32>, Vec<f32>),
    layout: &'a Layout,
    wq: &'a [f32],
    wkp: &'a [f32],
    offsets: &'a [u32],
    /// Where each sample's keys start, `[B]` (see [`ChunkedState::key_at`]).
    key_at: &'a [u32],
    q: &'a [f32],
    keys: &'a [f32],
    /// Inference only: `same_history[s]` when sample `s` has the same history
    /// as sample `s - 1` (architecture.md, trick 4).
    same_history: Option<&'a [bool]>,
    /// With `same_history`: the shared histories' first-layer term and where
    /// each sample's starts (see [`ChunkedState::shared_k1`]).
    shared_k1: &'a [f32],
    shared_at: &'a [usize],
    /// Training: keep each layer's pre-activation and output for the backward
    /// pass. Inference applies activations in place.
    keep: bool,
    /// Inference in bf16: hidden layers `1..` in bf16 (see [`super::super::bf16`]).
    bf16: Option<&'a [Bf16Matrix]>,
    /// The products of hidden layers `1..` in a training pass, forward and
    /// backward: f32, or bf16 in mixed-precision training.
    products: Gemm,
    /// Mixed-precision training's backward pass: hidden layers `1..`'s
    /// `W_lᵀ` in bf16 (see [`ChunkedState::packed_t`]).
    transposed: Option<&'a [Bf16Matrix]>,
    /// Inference on AMX: the first layer split and the hidden layers after
    /// it (see [`Attention::bf16_fused`]), for [`Shared::forward_fused`].
    fused: Option<(&'a Bf16Matrix, &'a [Bf16Matrix])>,
    /// FP32 training on AVX-512 with PReLU or ReLU in every hidden layer:
    /// the weights packed for [`fused_f32::product`], whose epilogues do
    /// the bias and activation (forward) and the activation's backward
    /// pass with the bias and slope gradients (backward). `None`: the
    /// `gemm` products and separate passes.
    panels: Option<&'a [Panels]>,
    panels_t: Option<&'a [Panels]>,
    /// The region is the task's own (see [`Attention::train_step`]): it
    /// keeps every output, as the scratch otherwise does.
    local: bool,
}

impl<'a> Shared<'a> {
    /// A pass keeping what the backward pass needs, without shared
    /// histories. Dice layers use batch statistics when `st.train` says so,
    /// with the moments of `st.batch_moments` where they are known.
    fn new(att: &'a Attention, layout: &'a Layout, st: &'a ChunkedState, q: &'a [f32], keys: &'a [f32]) -> Self {
        let acts = att
            .hidden()
            .enumerate()
            .map(|(l, b)| match st.batch_moments.iter().find(|m| m.layer == l) {
                Some(m) => b.activation.rowwise_with_moments(&m.mean, &m.var),
                None => b.activation.rowwise(b.linear.output_dim()),
            });
        Shared {
            att,
            acts: acts.collect(),
            batch_stats: att
                .hidden()
                .map(|b| st.train && !b.activation.is_rowwise(Mode::Train))
                .collect(),
            dice_means: Default::default(),
            layout,
            wq: &st.wq,
            wkp: &st.wkp,
            offsets: &st.offsets,
            key_at: &st.key_at,
            q,
            keys,
            same_history: None,
            shared_k1: &[],
            shared_at: &[],
            keep: true,
            bf16: None,
            products: Gemm::new(if st.train { att.rest.products } else { Kernel::Fp32 }).serial(),
            transposed: None,
            fused: None,
            panels: None,
            panels_t: None,
            local: false,
        }
    }

    /// Samples `s0..s1` and their behaviour rows.
    fn rows(&self, s0: usize, s1: usize) -> (usize, usize) {
        (self.offsets[s0] as usize, self.offsets[s1] as usize)
    }

    /// Where the keys of samples `s0..s1` lie in `keys` (their histories'
    /// rows; a grouped batch's chunks hold whole groups).
    fn key_range(&self, s0: usize, s1: usize) -> (usize, usize) {
        if s1 == s0 {
            return (0, 0);
        }
        let last = s1 - 1;
        let end = self.key_at[last] + self.offsets[last + 1] - self.offsets[last];
        (self.key_at[s0] as usize, end as usize)
    }

    /// Index in `keys` of the key of row `t` of sample `s`.
    fn key_index(&self, s: usize, t: usize) -> usize {
        self.key_at[s] as usize + t - self.offsets[s] as usize
    }

    /// The key of row `t` of sample `s`, `[D]`.
    fn key(&self, s: usize, t: usize) -> &'a [f32] {
        let d = self.layout.d;
        let i = self.key_index(s, t);
        &self.keys[i * d..(i + 1) * d]
    }

    /// `[k, q*k]` (or only `q*k`, see [`Layout::kq`]) for every behaviour
    /// of samples `s0..s1`, `[n, kq]`.
    fn fill_kq(&self, s0: usize, s1: usize, kq: &mut [f32]) {
        let (d, w) = (self.layout.d, self.layout.kq);
        let base = self.offsets[s0] as usize;
        for s in s0..s1 {
            let qs = &self.q[s * d..(s + 1) * d];
            for t in self.offsets[s] as usize..self.offsets[s + 1] as usize {
                let k = self.key(s, t);
                let row = &mut kq[(t - base) * w..(t - base + 1) * w];
                let (kpart, qk) = row.split_at_mut(w - d);
                kpart.copy_from_slice(&k[..w - d]);
                qk.iter_mut().zip(qs.iter().zip(k)).for_each(|(o, (a, b))| *o = a * b);
            }
        }
    }

    /// Forward pass of samples `s0..s1` from hidden layer `from` on: writes
    /// their attention weights (`[n]`), pooled histories (`[s1-s0, D]`) and
    /// fills `region`. With `same_history`, `k1` (at least `[n, H1]`) holds
    /// the history term; a pass that starts past a Dice layer in training
    /// puts that layer's output in `kept` (at least `[n, kept_width]`). A
    /// pass stops at the first layer from `from` on
    /// with batch statistics, after its pre-activation, and leaves its
    /// moments over these rows in `moments`; the pass that then starts at
    /// the next layer first activates it (`acts` holding the batch's moments).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        from: usize,
        s0: usize,
        s1: usize,
        region: &mut [f32],
        mut k1: &mut [f32],
        mut kept: &mut [f32],
        aq: &mut [f32],
        weights: &mut [f32],
        pooled: &mut [f32],
        moments: &mut Moments,
    ) {
        if let (0, Some(fused)) = (from, self.fused) {
            return self.forward_fused(s0, s1, fused, region, aq, weights, pooled);
        }
        let (d, att) = (self.layout.d, self.att);
        let (r0, r1) = self.rows(s0, s1);
        let n = r1 - r0;
        let (kq, mut rest) = region.split_at_mut(n * self.layout.kq);
        if from == 0 {
            self.fill_kq(s0, s1, kq);
            self.query_terms(s0, s1, aq);
        }

        let mut input: &[f32] = kq;
        let mut width_in = self.layout.kq;
        // The halves of the scratch for `in_scratch` (k1 serves only the
        // grouped and shared-history paths otherwise).
        let mut scratch: (&mut [f32], &mut [f32]) = match self.scratch_width() {
            0 => (&mut [], &mut []),
            w => std::mem::take(&mut k1).split_at_mut(n * w),
        };
        for (l, block) in att.hidden().enumerate() {
            let h = block.linear.output_dim();
            let (pre, tail) = std::mem::take(&mut rest).split_at_mut(n * h);
            let (out, tail) = tail.split_at_mut(n * h);
            rest = tail;
            if l + 1 < from {
                // Done by an earlier pass.
                (input, width_in) = (out, h);
                continue;
            }
            if l + 1 == from {
                // The layer an earlier pass stopped at, now that the batch's
                // moments are known: its output to `kept` for this pass's
                // product, its sigmoids to the output's slot for the
                // backward pass (see `Shared::kept_width`).
                let y = &mut std::mem::take(&mut kept)[..n * h];
                self.acts[l].dice_keeping_sigmoid(pre, y, out);
                (input, width_in) = (y, h);
                continue;
            }
            let act = &self.acts[l];
            let bias = &block.linear.bias.value;
            if let (0, Some(same)) = (l, self.same_history) {
                // Inference with common features: k_t·Wk' once per history,
                // shared by the samples (candidates) that follow with the same
                // history; the activation is applied in place.
                let (wk, wp) = self.wkp.split_at(d * h);
                if n > 0 {
                    serial::matmul_lda(n, d, h, &input[d..], 2 * d, wp, pre, false);
                    // (q*k)·Wp, [n, H1]
                }
                for s in s0..s1 {
                    let (t0, t1) = self.rows(s, s + 1);
                    let len = t1 - t0;
                    let hist: &[f32] = match self.shared_at.get(s) {
                        Some(&at) if at != usize::MAX => &self.shared_k1[at..at + len * h],
                        _ => {
                            if s == s0 || !same[s] {
                                let first = &input[(t0 - r0) * 2 * d..(t1 - r0) * 2 * d];
                                serial::matmul_lda(len, d, h, first, 2 * d, wk, &mut k1[..len * h], false);
                                // [len, H1]
                            }
                            &k1[..len * h]
                        }
                    };
                    let a = &aq[(s - s0) * h..(s - s0 + 1) * h];
                    act.add_apply_in_place(&mut pre[(t0 - r0) * h..(t1 - r0) * h], Some(hist), a);
                }
                input = pre;
            } else if l == 0 && self.layout.kq == d {
                // Training on a grouped batch: k_t·Wk' once per history row,
                // added to every sample of its group.
                // pre1_t = (q_b*k_t)·Wp + k_t·Wk' + (q_b·Wq' + b1)
                let (wk, wp) = self.wkp.split_at(d * h);
                serial::matmul(n, d, h, input, wp, pre, false); // [n, H1]
                let (k0, k1_end) = self.key_range(s0, s1);
                let k1 = &mut k1[..(k1_end - k0) * h];
                serial::matmul(k1_end - k0, d, h, &self.keys[k0 * d..k1_end * d], wk, k1, false); // [nk, H1]
                for s in s0..s1 {
                    let (t0, t1) = self.rows(s, s + 1);
                    let rows = (t0 - r0) * h..(t1 - r0) * h;
                    let kl = self.key_at[s] as usize - k0;
                    pre[rows.clone()]
                        .iter_mut()
                        .zip(&k1[kl * h..])
                        .for_each(|(p, k)| *p += k);
                    let a = &aq[(s - s0) * h..(s - s0 + 1) * h];
                    self.add_bias_apply(l, &mut pre[rows.clone()], a, &mut out[rows]);
                }
                input = out;
            } else if let (Some(panels), Some(alpha)) = (self.panels, act.as_prelu()) {
                // Fused: pre_l = input·W_l + bias (layer 0: + q_b·Wq', per
                // sample), out_l = act(pre_l), as each tile is summed.
                let (r0, aq) = (self.offsets[s0] as usize, &*aq);
                let bias = match l {
                    0 => Bias::Samples {
                        rows: aq,
                        offsets: self.offsets,
                        s0,
                        r0,
                    },
                    _ => Bias::Columns(bias),
                };
                // To the worker's scratch, where the backward pass
                // recomputes it (see `Shared::in_scratch`).
                let out = match (self.in_scratch(l), l) {
                    (true, 0) => &mut std::mem::take(&mut scratch.0)[..n * h],
                    (true, _) => &mut std::mem::take(&mut scratch.1)[..n * h],
                    (false, _) => out,
                };
                let epilogue = &mut fused_f32::Forward { bias, alpha, pre, out };
                fused_f32::product(n, input, width_in, &panels[l], epilogue); // [n, h]
                input = out;
            } else if l == 0 {
                // pre1_t = [k_t, q_b*k_t]·[Wk'; Wp] + (q_b·Wq' + b1)
                match self.panels {
                    Some(p) => fused_f32::product(n, input, 2 * d, &p[0], &mut fused_f32::Store { c: pre }),
                    None => serial::matmul(n, 2 * d, h, input, self.wkp, pre, false),
                } // [n, H1]
                for s in s0..s1 {
                    let (t0, t1) = self.rows(s, s + 1);
                    let rows = (t0 - r0) * h..(t1 - r0) * h;
                    let a = &aq[(s - s0) * h..(s - s0 + 1) * h];
                    if self.keep {
                        self.add_bias_apply(l, &mut pre[rows.clone()], a, &mut out[rows]);
                    } else {
                        act.add_apply_in_place(&mut pre[rows], None, a);
                    }
                }
                input = if self.keep { out } else { pre };
            } else {
                match self.bf16 {
                    Some(w) => w[l - 1].matmul(n, input, pre),
                    None => match self.panels {
                        Some(p) => fused_f32::product(n, input, width_in, &p[l], &mut fused_f32::Store { c: pre }),
                        None => self
                            .products
                            .matmul(n, width_in, h, input, &block.linear.weight.value, pre, false),
                    },
                } // [n, h]
                if self.keep {
                    self.add_bias_apply(l, pre, bias, out);
                    input = out;
                } else {
                    act.add_apply_in_place(pre, None, bias);
                    input = pre;
                }
            }
            if self.batch_stats[l] {
                moments.set(pre, h); // [n, h], bias added
                return;
            }
            width_in = h;
        }
        self.score_and_pool(s0, s1, input, width_in, weights, pooled);
    }

    /// `q·Wq' + b1` of samples `s0..s1`, `[s1 - s0, H1]`, into `aq`.
    fn query_terms(&self, s0: usize, s1: usize, aq: &mut [f32]) {
        let (d, h1) = (self.layout.d, self.layout.widths[0]);
        for a in aq.chunks_exact_mut(h1) {
            a.copy_from_slice(&self.att.first.linear.bias.value);
        }
        serial::matmul(s1 - s0, d, h1, &self.q[s0 * d..s1 * d], self.wq, aq, true);
        // [bc, H1]
    }

    /// The last hidden layer's output of samples `s0..s1` (`input`, rows of
    /// `width_in`) to scores, normalised into `weights`, pooled into `pooled`.
    fn score_and_pool(
        &self,
        s0: usize,
        s1: usize,
        input: &[f32],
        width_in: usize,
        weights: &mut [f32],
        pooled: &mut [f32],
    ) {
        let att = self.att;
        let (w_out, b_out) = (&att.output.weight.value, att.output.bias.value[0]);
        for (w, h) in weights.iter_mut().zip(input.chunks_exact(width_in)) {
            *w = dot(h, w_out) + b_out;
        }
        self.normalize_and_pool(s0, s1, weights, pooled);
    }

    /// The scores of samples `s0..s1` (`weights`, their rows') normalised,
    /// and their keys pooled by them into `pooled`.
    fn normalize_and_pool(&self, s0: usize, s1: usize, weights: &mut [f32], pooled: &mut [f32]) {
        let (d, att) = (self.layout.d, self.att);
        let (r0, _) = self.rows(s0, s1);
        pooled.iter_mut().for_each(|p| *p = 0.0);
        for s in s0..s1 {
            let (t0, t1) = self.rows(s, s + 1);
            let ws = &mut weights[t0 - r0..t1 - r0];
            if att.normalization == Normalization::Softmax {
                softmax_in_place(ws);
            }
            let p = &mut pooled[(s - s0) * d..(s - s0 + 1) * d];
            for (t, &w) in (t0..t1).zip(ws.iter()) {
                p.iter_mut().zip(self.key(s, t)).for_each(|(p, k)| *p += w * k);
            }
        }
    }

    /// Inference on AMX, samples `s0..s1` through every hidden layer, each
    /// product over an operand packed once: the first layer's rows split
    /// from `[q*k, k]` ([`Bf16Matrix::pack_split_row`]: the keys' share
    /// computed with the rest, not once per history), each later layer's
    /// rounded from the activations of the one before
    /// ([`Bf16Matrix::pack_prelu_rows`]). Rows go through all the layers a
    /// block of [`Bf16Matrix::packed_rows`]`(1)` at a time (samples may
    /// straddle blocks), so that a block's activations stay in L1 from one
    /// product to the next. `region` holds at least a block of `[max H]`.
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        s0: usize,
        s1: usize,
        (first, rest): (&Bf16Matrix, &[Bf16Matrix]),
        region: &mut [f32],
        aq: &mut [f32],
        weights: &mut [f32],
        pooled: &mut [f32],
    ) {
        let (d, att) = (self.layout.d, self.att);
        let (r0, r1) = self.rows(s0, s1);
        let n = r1 - r0;
        let (widths, h1) = (&self.layout.widths, self.layout.widths[0]);
        let last = widths.len() - 1;
        self.query_terms(s0, s1, aq);
        let block = Bf16Matrix::packed_rows(1);
        let (w_out, b_out) = (&att.output.weight.value, att.output.bias.value[0]);
        OPERANDS.with(|operands| {
            let [split, operand] = &mut *operands.borrow_mut();
            // The first layer's operand, for the whole chunk.
            let stride = first.packed_stride();
            let split = at_least(split, Bf16Matrix::packed_rows(n) * stride);
            for s in s0..s1 {
                let q = &self.q[s * d..(s + 1) * d];
                for t in self.offsets[s] as usize..self.offsets[s + 1] as usize {
                    first.pack_split_row(q, self.key(s, t), &mut split[(t - r0) * stride..][..stride]);
                }
            }
            let widest = rest.iter().map(|w| w.packed_stride()).max().unwrap_or(0);
            let operand = at_least(operand, block * widest);
            let tiles = first.tile_session();
            let mut s = s0; // the first sample with rows in this block
            for i0 in (0..n).step_by(block) {
                let m = block.min(n - i0);
                let mut pre = &mut region[..m * h1];
                first.matmul_packed(m, &split[i0 * stride..], pre, &tiles); // [m, H1]: (q*k)·Wp + k·Wk'
                while self.offsets[s + 1] as usize - r0 <= i0 {
                    s += 1;
                }
                // Each layer's product over the activations of the one
                // before; the first layer's bias is its sample's `q·Wq' + b1`.
                for (l, w) in rest.iter().enumerate() {
                    let (h_in, stride) = (widths[l], w.packed_stride());
                    let a = &mut operand[..block * stride];
                    if l == 0 {
                        for (a0, a1, sample) in self.sample_runs(s, r0, i0, m) {
                            let bias = &aq[(sample - s0) * h1..(sample - s0 + 1) * h1];
                            let (x, out) = (&mut pre[a0 * h_in..a1 * h_in], &mut a[a0 * stride..a1 * stride]);
                            pack_activated(w, &self.acts[0], x, bias, out);
                        }
                    } else {
                        let bias = &att.rest.blocks[l - 1].linear.bias.value;
                        pack_activated(w, &self.acts[l], pre, bias, &mut a[..m * stride]);
                    }
                    pre = &mut region[..m * widths[l + 1]];
                    w.matmul_packed(m, a, pre, &tiles); // [m, H]
                }
                if last == 0 {
                    for (a0, a1, sample) in self.sample_runs(s, r0, i0, m) {
                        let bias = &aq[(sample - s0) * h1..(sample - s0 + 1) * h1];
                        self.acts[0].add_apply_in_place(&mut pre[a0 * h1..a1 * h1], None, bias);
                    }
                } else {
                    self.acts[last].add_apply_in_place(pre, None, &att.rest.blocks[last - 1].linear.bias.value);
                }
                for (w, h) in weights[i0..i0 + m].iter_mut().zip(pre.chunks_exact(widths[last])) {
                    *w = dot(h, w_out) + b_out;
                }
            }
        });
        self.normalize_and_pool(s0, s1, weights, pooled);
    }

    /// FP32 training on the fused products: hidden layer `l`'s output
    /// goes to the worker's scratch (in L2), not to the chunk's region, for
    /// the first two layers that are not the last; the region keeps their
    /// pre-activations, from which the backward pass recomputes the outputs.
    /// A batch's region is tens of MiB, out of L2: this spares the forward
    /// pass the stores of those outputs there (1 KiB and 512 B a row for
    /// the (256,128,64) unit), and the backward pass reading them back.
    /// Layer 0 uses the scratch's first half, layer 1 its second
    /// (`[n, scratch_width]` each): layer 1 reads layer 0's output while it
    /// writes its own. Their output slots in the region go unused (the
    /// layout stays that of the other paths). Not in a whole training step
    /// ([`Shared::local`]), whose region is the task's own and stays in
    /// its core's cache: there the outputs stay in their slots, and the
    /// backward pass reads them instead of recomputing them (4-5% faster
    /// steps, measured inside one process, step by step).
    fn in_scratch(&self, l: usize) -> bool {
        !self.local
            && self.keep
            && l < 2
            && l + 1 < self.layout.widths.len()
            && (self.panels.is_some() || self.panels_t.is_some())
            && self.att.fuses_f32()
    }

    /// Floats per row of each half of the scratch for [`Shared::in_scratch`].
    fn scratch_width(&self) -> usize {
        (0..2)
            .filter(|&l| self.in_scratch(l))
            .map(|l| self.layout.widths[l])
            .max()
            .unwrap_or(0)
    }

    /// Floats per row of the worker's scratch for a Dice layer's output in
    /// training (the widest such layer; 0 without one): the pass that
    /// activates the layer once its batch's moments are known writes the
    /// output there, for its product, and the sigmoids it computed to the
    /// output's slot in the region, for the backward pass, which then
    /// need not compute them again: without its `exp` and division, the
    /// first half of Dice's backward pass runs about 1.7x as fast
    /// (criterion, 512 rows of 80 channels). The
    /// backward pass recomputes the output there from the pre-activation
    /// and the sigmoids (the same bits) where the next layer's weight
    /// gradient needs it, and takes the gradient reaching the output
    /// there too (see [`Shared::backward`]). The slots keep the sigmoids,
    /// not the outputs, so that the batch's region is not longer.
    fn kept_width(&self) -> usize {
        let widths = self.layout.widths.iter().zip(&self.batch_stats);
        widths.filter(|&(_, &b)| b).map(|(&w, _)| w).max().unwrap_or(0)
    }

    /// Rows `i0..i0 + m` of a chunk whose rows start at `r0`, split by
    /// sample from sample `s` (whose rows reach past `i0`) on: each run as
    /// `(first, end, sample)`, rows counted from `i0`.
    fn sample_runs(
        &self,
        s: usize,
        r0: usize,
        i0: usize,
        m: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (mut r, mut sample) = (i0, s);
        std::iter::from_fn(move || {
            (r < i0 + m).then(|| {
                let end = (self.offsets[sample + 1] as usize - r0).min(i0 + m);
                let run = (r - i0, end - i0, sample);
                (r, sample) = (end, sample + 1);
                run
            })
        })
    }

    /// `pre += bias` row by row, then, unless hidden layer `l` waits for its
    /// batch's moments, `out = act_l(pre)`.
    fn add_bias_apply(&self, l: usize, pre: &mut [f32], bias: &[f32], out: &mut [f32]) {
        if self.batch_stats[l] {
            for row in pre.chunks_exact_mut(bias.len()) {
                row.iter_mut().zip(bias).for_each(|(p, b)| *p += b);
            }
        } else {
            self.acts[l].add_bias_apply(pre, bias, out);
        }
    }

    /// Backward pass of samples `s0..s1` from their `dpooled` (`[bc, D]`):
    /// writes `dq` (`[bc, D]`) and `dk` (`[nk, D]`, the keys of
    /// [`Shared::key_range`]), writes the weight gradients into `grads`
    /// and adds the others (see [`Layout::clear_sums`]).
    /// Consumes `region` (it is reused for gradients). A grouped batch's
    /// history term needs `dk1` of at least `[nk, H1]`; Dice in training,
    /// `kept` of at least `[n, kept_width]` (see [`Shared::kept_width`]).
    ///
    /// A pass stops at the first layer with batch statistics it reaches,
    /// after the first half of its activation's backward pass, leaving its
    /// `Σ gz`, `Σ gz·z` over these rows in `sums` (`[2, H]`); the pass that
    /// then resumes at that layer (`resume`) finishes it with the batch's
    /// (`dice_means`) and goes on.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        resume: Option<usize>,
        s0: usize,
        s1: usize,
        region: &mut [f32],
        ds: &mut [f32],
        weights: &[f32],
        dpooled: &[f32],
        grads: &mut [f32],
        dq: &mut [f32],
        dk: &mut [f32],
        (dk1, kept): (&mut [f32], &mut [f32]),
        sums: &mut [f32],
    ) {
        let (d, lay) = (self.layout.d, self.layout);
        let (r0, r1) = self.rows(s0, s1);
        let n = r1 - r0;
        let (k0, k_end) = self.key_range(s0, s1);
        let layers = lay.widths.len();
        let score_at = lay.layer(layers, n);
        let (region, dscore) = region.split_at_mut(score_at);
        let offsets = &lay.grad_offsets;
        let top = match resume {
            Some(l) => l + 1,
            None => {
                let (last, h) = (layers - 1, lay.widths[layers - 1]);
                let (hidden, score_grads) = grads.split_at_mut(offsets[layers]);
                let (pre, out) = region[lay.layer(last, n)..].split_at_mut(n * h);
                let out = &mut out[..n * h];
                let dscore = &mut dscore[..n];
                if !self.batch_stats[last] {
                    let last = LastLayer::Output(out);
                    self.backward_scores(s0, s1, last, dscore, weights, dpooled, score_grads, dk);
                    layers
                } else {
                    // The sigmoids in the output's place; the layer's slope
                    // gradient ends its gradients. Then the pass stops.
                    let sums = &mut sums[..2 * h];
                    sums.iter_mut().for_each(|v| *v = 0.0);
                    let dalpha = &mut hidden[offsets[last + 1] - h..offsets[last + 1]];
                    let last = LastLayer::Dice {
                        pre,
                        g: out,
                        dalpha,
                        sums,
                    };
                    self.backward_scores(s0, s1, last, dscore, weights, dpooled, score_grads, dk);
                    return;
                }
            }
        };
        // Hidden layers, last to first; layer l's output slot (or with
        // `in_scratch`, its half of the scratch) holds dh_l on entry, or
        // dpre_l when the fused product of layer l + 1 wrote it; a Dice
        // layer's slot holds its sigmoids (and dh_l is in `kept`), or its
        // `g` in the pass that resumes at it.
        let mut fused_below = false;
        let scratch_width = self.scratch_width();
        for l in (0..top).rev() {
            let h = lay.widths[l];
            let at = lay.layer(l, n);
            let (below, here) = region.split_at_mut(at);
            let (pre, out) = here.split_at_mut(n * h);
            // With `in_scratch`, layers 0 and 1's dpre are in the scratch's
            // halves; else `dk1` serves the grouped path.
            let (mut scratch, dk1): ((&mut [f32], &mut [f32]), &mut [f32]) = match scratch_width {
                0 => ((&mut [], &mut []), &mut *dk1),
                w => (dk1.split_at_mut(n * w), &mut []),
            };
            let g: &mut [f32] = match (self.in_scratch(l), l) {
                (true, 0) => &mut std::mem::take(&mut scratch.0)[..n * h],
                (true, _) => &mut std::mem::take(&mut scratch.1)[..n * h],
                (false, _) => &mut out[..n * h],
            };
            let width_in = if l == 0 { lay.kq } else { lay.widths[l - 1] };
            let (earlier, input) = below.split_at_mut(at - n * width_in); // previous output, or [k, q*k]
            let (lower, gl) = grads.split_at_mut(offsets[l]);
            let gl = &mut gl[..offsets[l + 1] - offsets[l]];
            let (gw, gl) = gl.split_at_mut(if l == 0 { 3 * d * h } else { width_in * h });
            let (gb, ga) = gl.split_at_mut(h);
            if fused_below {
                // The product above already applied this layer's activation
                // backward and summed its bias and slope gradients.
            } else if resume == Some(l) {
                // g = dpre_l, and the bias gradient summed (the rows' loop
                // below is skipped).
                let (mean_gz, mean_gzz) = &self.dice_means;
                self.acts[l].dice_backward_finish(pre, g, mean_gz, mean_gzz, gb);
            } else if self.batch_stats[l] {
                // dh_l in `kept`, the sigmoids in g's place.
                let sums = &mut sums[..2 * h];
                sums.iter_mut().for_each(|v| *v = 0.0);
                self.acts[l].dice_backward_partial(pre, &kept[..n * h], g, ga, sums);
                return;
            } else {
                self.acts[l].backward(pre, g, ga); // g = dpre_l
            }
            if !fused_below && resume != Some(l) {
                for row in g.chunks_exact(h) {
                    gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
            }
            fused_below = false;
            if l == 0 && lay.kq == d {
                // Grouped: dk1_j = Σ dpre1_t over the rows of history row j.
                let nk = k_end - k0;
                let dk1 = &mut dk1[..nk * h];
                dk1.iter_mut().for_each(|v| *v = 0.0);
                for s in s0..s1 {
                    let (t0, t1) = self.rows(s, s + 1);
                    let kl = self.key_at[s] as usize - k0;
                    dk1[kl * h..(kl + t1 - t0) * h]
                        .iter_mut()
                        .zip(&g[(t0 - r0) * h..(t1 - r0) * h])
                        .for_each(|(a, b)| *a += b);
                }
                let (gwkp, gwq) = gw.split_at_mut(2 * d * h);
                let (gwk, gwp) = gwkp.split_at_mut(d * h);
                let (wk, wp) = self.wkp.split_at(d * h);
                serial::matmul_at_b(d, n, h, input, g, gwp, false); // dWp
                serial::matmul_at_b(d, nk, h, &self.keys[k0 * d..k_end * d], dk1, gwk, false); // dWk', once per history row
                self.per_sample_grads(s0, s1, g, ds, gwq, dq);
                serial::matmul_a_bt(n, h, d, g, wp, input, false); // d(q*k)
                serial::matmul_a_bt(nk, h, d, dk1, wk, dk, true); // dk += dk1·Wk'ᵀ
            } else if l == 0 {
                let (gwkp, gwq) = gw.split_at_mut(2 * d * h);
                serial::matmul_at_b(2 * d, n, h, input, g, gwkp, false); // d[Wk'; Wp]
                self.per_sample_grads(s0, s1, g, ds, gwq, dq);
                // d[k, q*k] = dpre_0·[Wk'; Wp]ᵀ
                match self.panels_t {
                    Some(p) => fused_f32::product(n, g, h, &p[0], &mut fused_f32::Store { c: input }),
                    None => serial::matmul_a_bt(n, h, 2 * d, g, self.wkp, input, false),
                }
            } else if let (Some(panels_t), Some(alpha)) = (self.panels_t, self.acts[l - 1].as_prelu()) {
                let pre_below = &earlier[at - 2 * n * width_in..];
                // With `in_scratch`, layer l-1's output is recomputed from its
                // pre-activation (as the forward epilogue computed it), into
                // its half of the scratch.
                let input = match (self.in_scratch(l - 1), l - 1) {
                    (false, _) => input,
                    (true, below) => {
                        let half = if below == 0 { &mut scratch.0 } else { &mut scratch.1 };
                        let x = &mut std::mem::take(half)[..n * width_in];
                        fused_f32::activate(pre_below, alpha, width_in, x);
                        x
                    }
                };
                self.products.matmul_at_b(width_in, n, h, input, g, gw, false); // dW_l

                // dh_{l-1} = g·W_lᵀ, through layer l-1's activation backward
                // into dpre_{l-1} (over its output), with its bias and slope
                // gradients.
                // Layer l-1's gradients end with its bias's and slopes'.
                let (dbias, dalpha) = lower[offsets[l] - 2 * width_in..].split_at_mut(width_in);
                // What layer l-1's weight gradient reads next: its input, or
                // with `in_scratch`, the pre-activation it is recomputed from.
                let below_in = if l == 1 { lay.kq } else { lay.widths[l - 2] };
                let skip = if l >= 2 && self.in_scratch(l - 2) {
                    n * below_in
                } else {
                    0
                };
                let next_end = at - 2 * n * width_in - skip;
                let next_input = &earlier[next_end - n * below_in..next_end];
                let epilogue = &mut fused_f32::Backward {
                    pre: pre_below,
                    alpha,
                    g: input,
                    dalpha,
                    dbias,
                    next: (next_input, below_in),
                };
                fused_f32::product(n, g, h, &panels_t[l], epilogue); // [n, width_in]
                fused_below = true;
            } else if self.batch_stats[l - 1] {
                // Layer l-1 is Dice in training: its slot holds the
                // sigmoids, from which its output is recomputed into `kept`.
                let pre_below = &earlier[at - 2 * n * width_in..at - n * width_in];
                let kept = &mut kept[..n * width_in];
                if let (Some(panels_t), None) = (self.panels_t, self.transposed) {
                    // dh_{l-1} = g·W_lᵀ, through the first half of Dice's
                    // backward pass (layer l-1 waits for its batch's sums),
                    // over the sigmoids, with layer l-1's output
                    // recomputed into `kept` on the way; then dW_l, and
                    // the pass stops.
                    let dalpha = &mut lower[offsets[l] - width_in..];
                    let sums = &mut sums[..2 * width_in];
                    sums.iter_mut().for_each(|v| *v = 0.0);
                    let epilogue = &mut fused_f32::DiceBackward {
                        act: &self.acts[l - 1],
                        pre: pre_below,
                        g: input,
                        out: kept,
                        dalpha,
                        sums,
                    };
                    fused_f32::product(n, g, h, &panels_t[l], epilogue); // [n, width_in]
                    self.products.matmul_at_b(width_in, n, h, kept, g, gw, false); // dW_l
                    return;
                }
                self.acts[l - 1].dice_from_sigmoid(pre_below, input, kept);
                self.products.matmul_at_b(width_in, n, h, kept, g, gw, false); // dW_l

                // dh_{l-1} into `kept`, for layer l-1's first half.
                self.input_gradient(l, n, g, kept);
            } else {
                self.products.matmul_at_b(width_in, n, h, input, g, gw, false); // dW_l
                self.input_gradient(l, n, g, input);
            }
        }
        // [k, q*k] (or q*k) -> k and q.
        let w = lay.kq;
        let dkq = &region[..n * w];
        for s in s0..s1 {
            let qs = &self.q[s * d..(s + 1) * d];
            let dqs = &mut dq[(s - s0) * d..(s - s0 + 1) * d];
            let (t0, t1) = self.rows(s, s + 1);
            for t in t0..t1 {
                let row = &dkq[(t - r0) * w..(t - r0 + 1) * w];
                let (dkpart, dqk) = row.split_at(w - d);
                let k = self.key(s, t);
                let kl = self.key_index(s, t) - k0;
                let dkt = &mut dk[kl * d..(kl + 1) * d];
                for j in 0..d {
                    if w == 2 * d {
                        dkt[j] += dkpart[j] + dqk[j] * qs[j];
                    } else {
                        dkt[j] += dqk[j] * qs[j];
                    }
                    dqs[j] += dqk[j] * k[j];
                }
            }
        }
    }

    /// `dh_{l-1} = g·W_lᵀ` (`[n, width of layer l-1]`) from hidden layer
    /// `l`'s `g` (`dpre_l`, `[n, width of l]`), `l >= 1`, into `dh`.
    fn input_gradient(&self, l: usize, n: usize, g: &[f32], dh: &mut [f32]) {
        let (h, width_in) = (self.layout.widths[l], self.layout.widths[l - 1]);
        match self.transposed {
            Some(wt) => wt[l - 1].matmul(n, g, dh),
            None => match self.panels_t {
                Some(p) => fused_f32::product(n, g, h, &p[l], &mut fused_f32::Store { c: dh }),
                None => {
                    let w = &self.att.rest.blocks[l - 1].linear.weight.value;
                    self.products.matmul_a_bt(n, h, width_in, g, w, dh, false)
                }
            },
        }
    }

    /// The backward pass's first steps over samples `s0..s1`: pooling
    /// (`dk = w·dpooled`, written over `dk`, and each row's score gradient
    /// `dscore`, `[n]`), normalisation, then the score layer (its gradients
    /// `score_grads`, `[dw_out, db_out]`, added to) back to the last hidden
    /// layer (see [`LastLayer`]).
    #[allow(clippy::too_many_arguments)]
    fn backward_scores(
        &self,
        s0: usize,
        s1: usize,
        last: LastLayer<'_>,
        dscore: &mut [f32],
        weights: &[f32],
        dpooled: &[f32],
        score_grads: &mut [f32],
        dk: &mut [f32],
    ) {
        let (d, att, lay) = (self.layout.d, self.att, self.layout);
        let r0 = self.rows(s0, s1).0;
        let k0 = self.key_range(s0, s1).0;
        dk.iter_mut().for_each(|v| *v = 0.0);
        // Pooling: pooled_b = Σ_t w_t k_t.
        for s in s0..s1 {
            let g = &dpooled[(s - s0) * d..(s - s0 + 1) * d];
            let (t0, t1) = self.rows(s, s + 1);
            for t in t0..t1 {
                let k = self.key(s, t);
                dscore[t - r0] = g.iter().zip(k).map(|(a, b)| a * b).sum();
                let w = weights[t - r0];
                let kl = self.key_index(s, t) - k0;
                dk[kl * d..(kl + 1) * d]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(o, g)| *o += w * g);
            }
            if att.normalization == Normalization::Softmax {
                let (w, g) = (&weights[t0 - r0..t1 - r0], &mut dscore[t0 - r0..t1 - r0]);
                let dot: f32 = w.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
                g.iter_mut().zip(w).for_each(|(g, w)| *g = w * (*g - dot));
            }
        }
        // Score layer: score_t = h_t·w_out + b_out.
        let h_last = lay.widths[lay.widths.len() - 1];
        let (gw, gb) = score_grads[..h_last + 1].split_at_mut(h_last);
        dscore.iter().for_each(|&g| gb[0] += g);
        let w_out = &att.output.weight.value;
        match last {
            LastLayer::Output(out) => {
                for (h, &g) in out.chunks_exact(h_last).zip(dscore.iter()) {
                    gw.iter_mut().zip(h).for_each(|(a, h)| *a += h * g);
                }
                for (h, &g) in out.chunks_exact_mut(h_last).zip(dscore.iter()) {
                    h.iter_mut().zip(w_out).for_each(|(h, w)| *h = g * w); // dh_last
                }
            }
            LastLayer::Dice { pre, g, dalpha, sums } => {
                let act = &self.acts[lay.widths.len() - 1];
                act.dice_backward_partial_scored(pre, (dscore, w_out), g, gw, dalpha, sums);
            }
        }
    }

    /// The once-per-sample query term's gradients: `ds_b = Σ_{t of b}
    /// dpre1_t` (`[bc, H1]`), then `dWq' += qᵀ·ds` and `dq = ds·Wq'ᵀ`.
    fn per_sample_grads(&self, s0: usize, s1: usize, g: &[f32], ds: &mut [f32], gwq: &mut [f32], dq: &mut [f32]) {
        let (d, h) = (self.layout.d, self.layout.widths[0]);
        let (r0, bc) = (self.offsets[s0] as usize, s1 - s0);
        for s in s0..s1 {
            let dsb = &mut ds[(s - s0) * h..(s - s0 + 1) * h];
            dsb.iter_mut().for_each(|v| *v = 0.0);
            let (t0, t1) = self.rows(s, s + 1);
            for row in g[(t0 - r0) * h..(t1 - r0) * h].chunks_exact(h) {
                dsb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
        serial::matmul_at_b(d, bc, h, &self.q[s0 * d..s1 * d], ds, gwq, false); // dWq'
        serial::matmul_a_bt(bc, h, d, ds, self.wq, dq, false); // [bc, D]
    }
}

/// Cuts samples into chunks (`bounds`: each chunk's first sample, then
/// the batch size; empty for an empty batch) from `offsets`, where each
/// sample's rows start (`[B + 1]`). Training (`even`): an even number of
/// chunks (but for one) of about `chunk_rows` rows or more each, each
/// closed at the first sample boundary past its share of the rows, so that
/// two threads stay equally busy to the end; with group `starts` (a
/// grouped training pass), only at group ends, so that a chunk sums its
/// histories' gradients whole. Inference: a chunk closes once it holds
/// `chunk_rows` rows. The chunks depend on the batch alone.
fn plan_chunks(offsets: &[u32], starts: Option<&[u32]>, even: bool, chunk_rows: usize, bounds: &mut Vec<usize>) {
    let b = offsets.len() - 1;
    let n = offsets[b] as usize;
    let chunks = n.div_ceil(chunk_rows).max(1);
    let chunks = chunks + chunks % 2 * usize::from(chunks > 1);
    bounds.clear();
    bounds.push(0);
    let mut next = 1; // the first group start after sample s
    for s in 0..b {
        let group_end = match starts {
            Some(starts) => {
                while starts[next] as usize <= s {
                    next += 1;
                }
                starts[next] as usize == s + 1
            }
            None => true,
        };
        let big = if even {
            offsets[s + 1] as usize * chunks >= n * bounds.len()
        } else {
            (offsets[s + 1] - offsets[bounds[bounds.len() - 1]]) as usize >= chunk_rows
        };
        if s + 1 == b || (big && group_end) {
            bounds.push(s + 1);
        }
    }
    if b == 0 {
        bounds.clear();
    }
}

/// Rows of `x` through `act` after adding `bias`, rounded into `w`'s packed
/// operand `out`: in one pass for ReLU and PReLU; the others activate `x`
/// in place first.
fn pack_activated(w: &Bf16Matrix, act: &Rowwise, x: &mut [f32], bias: &[f32], out: &mut [u32]) {
    match act.as_prelu() {
        Some(alpha) => w.pack_prelu_rows(x, bias, alpha, out),
        None => {
            act.add_apply_in_place(x, None, bias);
            let (k, stride) = (bias.len(), w.packed_stride());
            for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(stride)) {
                w.pack_row(row, o);
            }
        }
    }
}

/// Grows `v` to at least `len` elements (never shrinks: buffers are reused)
/// and returns its first `len`.
fn at_least<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

/// [`at_least`] for a buffer whose contents are dead between uses (the
/// training region): when too short it is replaced, not copied, by a
/// zeroed one (pages the allocator maps on first touch, by the pass that
/// writes them) an eighth longer than asked, so that the slightly larger
/// batches that follow fit. Growing it in place copied the old contents
/// and zeroed the new ones: 12 ms of the first batches' time for the
/// tutorial model's 24 MB region.
fn renewed_at_least(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        *v = Vec::new();
        *v = vec![0.0; len + len / 8];
    }
    &mut v[..len]
}

impl Attention {
    /// The hidden layers, first to last.
    pub(super) fn hidden(&self) -> impl Iterator<Item = &Block> {
        std::iter::once(&self.first).chain(self.rest.blocks.iter())
    }

    /// Whether training may run on [`fused_f32`]'s products: PReLU or ReLU
    /// in every hidden layer, on a CPU with AVX-512F.
    fn fuses_f32(&self) -> bool {
        self.hidden()
            .all(|b| matches!(b.activation.kind, ActivationKind::Prelu | ActivationKind::Relu))
            && fused_f32::available()
    }

    /// Whether the chunked path computes this unit: attention pooling (sum
    /// pooling needs no unit).
    pub(crate) fn chunkable(&self) -> bool {
        self.pooling == crate::schema::Pooling::Attention
    }

    /// Folds the batch moments of the last chunked training pass into Dice's
    /// moving averages (nothing when it had none).
    pub(super) fn fold_chunked_statistics(&mut self, st: &ChunkedState) {
        for m in &st.batch_moments {
            let block = match m.layer {
                0 => Some(&mut self.first),
                l => self.rest.blocks.get_mut(l - 1),
            };
            if let Some(block) = block {
                block.activation.fold_statistics(&m.mean, &m.var, m.rows);
            }
        }
    }

    /// Fills `st.shared_k1` / `st.shared_at`: for each run of two or more
    /// consecutive samples with one history (a request's candidates, a page
    /// view's), that history's `k·(Wk - Wd)`, once, in parallel over runs.
    /// Needs `st.wkp`, `st.offsets` and `st.key_at` set.
    fn shared_history_terms(&self, b: usize, keys: &[f32], same_history: Option<&[bool]>, st: &mut ChunkedState) {
        let (d, h1) = self.dims();
        st.shared_at.clear();
        st.shared_k1.clear();
        let Some(same) = same_history else { return };
        let (offsets, key_at) = (&st.offsets, &st.key_at);
        st.shared_at.resize(b, usize::MAX);
        let mut runs: Vec<usize> = Vec::new(); // first sample of each shared run
        let mut total = 0;
        let mut s = 0;
        while s < b {
            let mut e = s + 1;
            while e < b && same[e] {
                e += 1;
            }
            if e - s >= 2 {
                st.shared_at[s..e].iter_mut().for_each(|a| *a = total);
                runs.push(s);
                total += (offsets[s + 1] - offsets[s]) as usize * h1;
            }
            s = e;
        }
        st.shared_k1.resize(total, 0.0);
        let wk = &st.wkp[..d * h1];
        let pieces = split_pieces(
            &mut st.shared_k1,
            runs.iter().map(|&s| (offsets[s + 1] - offsets[s]) as usize * h1),
        );
        runs.par_iter().zip(pieces).for_each(|(&s, out)| {
            let t0 = key_at[s] as usize;
            let t1 = t0 + (offsets[s + 1] - offsets[s]) as usize;
            if t1 > t0 {
                serial::matmul(t1 - t0, d, h1, &keys[t0 * d..t1 * d], wk, out, false);
                // [len, H1]
            }
        });
    }

    /// The first layer's weight split for the chunked passes (`st.wq`,
    /// `st.wkp`): `[q, k, q-k, q*k]·W = q·(Wq + Wd) + [k, q*k]·[Wk - Wd; Wp]`.
    fn split_first_layer(&self, st: &mut ChunkedState) {
        let (d, h1) = self.dims();
        let w = &self.first.linear.weight.value; // [4D, H1]: Wq, Wk, Wd, Wp
        let (wq_, wk_, wd, wp) = (
            &w[..d * h1],
            &w[d * h1..2 * d * h1],
            &w[2 * d * h1..3 * d * h1],
            &w[3 * d * h1..],
        );
        st.wq.clear();
        st.wq.extend(wq_.iter().zip(wd).map(|(a, b)| a + b));
        st.wkp.clear();
        st.wkp.extend(wk_.iter().zip(wd).map(|(a, b)| a - b));
        st.wkp.extend_from_slice(wp);
    }

    /// Mixed-precision training (`train`, and bf16 products): hidden layers
    /// `1..`'s weights and their transposes in bf16, packed once for every
    /// chunk, forward and backward, into `st.packed` and `st.packed_t` (the
    /// emulation's products are those of `Gemm::matmul` and
    /// `Gemm::matmul_a_bt`, bit for bit); both empty otherwise.
    fn pack_bf16(&self, train: bool, st: &mut ChunkedState) {
        let products = self.rest.products;
        if train && products.is_bf16() {
            self.rest.bf16_weights_into(products, false, &mut st.packed);
            self.rest.bf16_weights_into(products, true, &mut st.packed_t);
        } else {
            st.packed.clear();
            st.packed_t.clear();
        }
    }

    /// FP32 training on [`fused_f32`] (`fuses`): every hidden layer's
    /// weights packed for the forward products (layer 0: `st.wkp`, after
    /// [`Attention::split_first_layer`]), and their transposes for the
    /// backward ones, into the buffers of the batch before; none
    /// otherwise.
    fn pack_panels(&self, fuses: bool, st: &mut ChunkedState) {
        let layers = if fuses { self.rest.blocks.len() + 1 } else { 0 };
        st.panels.resize_with(layers, Panels::default);
        st.panels_t.resize_with(layers, Panels::default);
        // Each layer's (and transpose's) on its own task: a copy, serial
        // otherwise while the other workers wait.
        let block = |l: usize| if l == 0 { &self.first } else { &self.rest.blocks[l - 1] };
        let width_in = |l: usize| {
            if l == 0 {
                2 * self.dims().0
            } else {
                block(l - 1).linear.output_dim()
            }
        };
        let weight = |l: usize| -> &[f32] {
            if l == 0 {
                &st.wkp
            } else {
                &block(l).linear.weight.value
            }
        };
        let (panels, panels_t) = (&mut st.panels, &mut st.panels_t);
        rayon::join(
            || {
                panels.par_iter_mut().enumerate().for_each(|(l, p)| {
                    let h = block(l).linear.output_dim();
                    p.pack(width_in(l), h, weight(l), (h, 1));
                })
            },
            || {
                panels_t.par_iter_mut().enumerate().for_each(|(l, p)| {
                    let h = block(l).linear.output_dim();
                    p.pack(h, width_in(l), weight(l), (1, h)); // W_lᵀ, [h, width_in]
                })
            },
        );
    }

    /// Chunked forward pass (see the module documentation): writes the
    /// pooled histories `[B, D]` and the attention weights (`[R]`, one per
    /// (sample, behaviour) row). With `keep`, `st` keeps what
    /// [`Attention::backward_chunked`] needs; without, each worker thread
    /// computes its chunks in a scratch buffer of its own. `mode` says
    /// whether Dice normalises by the batch's moments (a kept training
    /// pass) or by its moving averages.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_chunked(
        &self,
        q: &[f32],
        keys: &[f32],
        histories: Histories<'_>,
        keep: bool,
        mode: Mode,
        same_history: Option<&[bool]>,
        st: &mut ChunkedState,
        pooled: &mut Vec<f32>,
        weights: &mut Vec<f32>,
    ) {
        let (d, h1) = self.dims();
        histories.index(&mut st.offsets, &mut st.key_at);
        st.grouped = histories.starts.is_some();
        let offsets = &st.offsets;
        let b = offsets.len() - 1;
        let n = offsets[b] as usize;
        let compact = keep && st.grouped;
        let layout = Layout::new(self, compact);
        self.split_first_layer(st);
        st.train = keep && mode == Mode::Train;
        let batch_stats = st.train && self.hidden().any(|b| !b.activation.is_rowwise(Mode::Train));
        let chunk_rows = match (keep, batch_stats) {
            (true, true) => dice_chunk_rows(layout.row_width()),
            (true, false) => CHUNK_ROWS_TRAIN,
            (false, _) => CHUNK_ROWS_INFER,
        };
        plan_chunks(
            &st.offsets,
            histories.starts.filter(|_| compact),
            keep,
            chunk_rows,
            &mut st.bounds,
        );
        pooled.clear();
        pooled.resize(b * d, 0.0);
        weights.clear();
        weights.resize(n, 0.0);
        // Fused AMX inference computes the keys' share with the rest.
        let fused = if keep { None } else { self.bf16_fused() };
        let same_history = if keep || fused.is_some() { None } else { same_history };
        self.shared_history_terms(b, keys, same_history, st);
        let width = layout.row_width();
        let mut region = std::mem::take(&mut st.region);
        let mut per_sample = std::mem::take(&mut st.per_sample);
        let mut moments = std::mem::take(&mut st.moments);
        st.batch_moments.clear();
        self.pack_bf16(st.train, st);
        let fuses = keep && !compact && !self.rest.products.is_bf16() && fused_f32::available();
        self.pack_panels(fuses, st);
        let mut batch_moments = Vec::new();
        let mut shared = Shared {
            same_history,
            shared_k1: &st.shared_k1,
            shared_at: &st.shared_at,
            keep,
            bf16: match keep {
                true => packed(&st.packed),
                false => self.bf16_layers(),
            },
            fused,
            panels: packed(&st.panels),
            ..Shared::new(self, &layout, st, q, keys)
        };
        let offsets = &st.offsets;
        let chunks: Vec<(usize, usize)> = st.bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let rows = |&(s0, s1): &(usize, usize)| (offsets[s1] - offsets[s0]) as usize;
        let regions = split_pieces(
            renewed_at_least(&mut region, if keep { n * width } else { 0 }),
            chunks.iter().map(|c| if keep { rows(c) * width } else { 0 }),
        );
        let aqs = split_pieces(
            at_least(&mut per_sample, b * h1),
            chunks.iter().map(|&(s0, s1)| (s1 - s0) * h1),
        );
        let weights = split_pieces(weights, chunks.iter().map(rows));
        let pooled = split_pieces(pooled, chunks.iter().map(|&(s0, s1)| (s1 - s0) * d));
        moments.resize_with(chunks.len(), Moments::default);
        let mut parts: Vec<ChunkForward<'_>> = chunks
            .iter()
            .zip(regions)
            .zip(aqs)
            .zip(weights)
            .zip(pooled)
            .zip(moments.iter_mut())
            .map(
                |(((((&(s0, s1), region), aq), weights), pooled), moments)| ChunkForward {
                    s0,
                    s1,
                    region,
                    aq,
                    weights,
                    pooled,
                    moments,
                },
            )
            .collect();
        // One pass, or with Dice in training one pass per Dice layer and one
        // to finish: each stops at a Dice layer's pre-activation, whose
        // moments are then merged in chunk order.
        let mut from = 0;
        loop {
            let pass = &shared;
            parts.par_iter_mut().for_each(|c| {
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let (s0, s1) = (c.s0, c.s1);
                    if keep {
                        // A grouped pass's history term, [nk, H1], or the
                        // outputs kept in the scratch (`in_scratch`).
                        let (k0, k1) = pass.key_range(s0, s1);
                        let n = (offsets[s1] - offsets[s0]) as usize;
                        let len = match compact {
                            true => (k1 - k0) * h1,
                            false => 2 * n * pass.scratch_width(),
                        };
                        let (k1, kept) = at_least(&mut scratch, len + n * pass.kept_width()).split_at_mut(len);
                        pass.forward(from, s0, s1, c.region, k1, kept, c.aq, c.weights, c.pooled, c.moments);
                    } else {
                        let n = (offsets[s1] - offsets[s0]) as usize;
                        let k1 = if pass.same_history.is_some() { n * h1 } else { 0 };
                        let (region, k1) = at_least(&mut scratch, n * width + k1).split_at_mut(n * width);
                        pass.forward(from, s0, s1, region, k1, &mut [], c.aq, c.weights, c.pooled, c.moments);
                    }
                });
            });
            let next = self
                .hidden()
                .enumerate()
                .skip(from)
                .find(|&(l, _)| shared.batch_stats[l]);
            let Some((l, block)) = next else { break };
            let mut total = Moments::default();
            for c in &parts {
                total.merge(c.moments);
            }
            let (mean, var) = total.mean_var();
            shared.acts[l] = block.activation.rowwise_with_moments(&mean, &var);
            batch_moments.push(BatchMoments {
                layer: l,
                mean,
                var,
                rows: total.rows(),
            });
            from = l + 1;
        }
        drop(parts);
        st.batch_moments = batch_moments;
        st.moments = moments;
        st.region = region;
        st.per_sample = per_sample;
    }

    /// Chunked backward pass after a training [`Attention::forward_chunked`];
    /// writes `dq` (`[B, D]`) and `dk` (one row per key).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_chunked(
        &mut self,
        q: &[f32],
        keys: &[f32],
        st: &mut ChunkedState,
        weights: &[f32],
        dpooled: &[f32],
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
    ) {
        let (d, h1) = self.dims();
        let layout = Layout::new(self, st.grouped);
        let offsets = &st.offsets;
        let b = offsets.len() - 1;
        let n = offsets[b] as usize;
        let width = layout.row_width();
        let grad_offsets = &layout.grad_offsets;
        let grad_len = grad_offsets[grad_offsets.len() - 1];
        let chunks: Vec<(usize, usize)> = st.bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let mut partial = std::mem::take(&mut st.partial);
        // Cleared by each chunk's task (in parallel, and just before the
        // chunk writes its gradients: `Layout::clear_sums`).
        size_partials(&mut partial, chunks.len(), grad_len);
        let mut region = std::mem::take(&mut st.region);
        let mut per_sample = std::mem::take(&mut st.per_sample);
        let mut sums = std::mem::take(&mut st.sums);
        let mut shared = Shared {
            transposed: packed(&st.packed_t),
            panels_t: packed(&st.panels_t),
            ..Shared::new(self, &layout, st, q, keys)
        };
        let key_ranges: Vec<(usize, usize)> = chunks.iter().map(|&(s0, s1)| shared.key_range(s0, s1)).collect();
        dq.clear();
        dq.resize(b * d, 0.0);
        // Not zeroed here: each chunk's backward pass zeroes its rows
        // (`Shared::backward_scores`), in parallel.
        dk.resize(keys.len(), 0.0);
        let rows = |&(s0, s1): &(usize, usize)| (offsets[s1] - offsets[s0]) as usize;
        let regions = split_pieces(&mut region[..n * width], chunks.iter().map(|c| rows(c) * width));
        let dss = split_pieces(&mut per_sample[..b * h1], chunks.iter().map(|&(s0, s1)| (s1 - s0) * h1));
        let dqs = split_pieces(dq, chunks.iter().map(|&(s0, s1)| (s1 - s0) * d));
        // Each chunk's keys follow the previous chunk's (whole groups).
        let dks = split_pieces(dk, key_ranges.iter().map(|&(k0, k1)| (k1 - k0) * d));
        let widest = layout.widths.iter().copied().max().unwrap_or(0);
        sums.resize_with(chunks.len(), Vec::new);
        let mut parts: Vec<ChunkBackward<'_>> = chunks
            .iter()
            .zip(regions)
            .zip(dss)
            .zip(partial.iter_mut())
            .zip(dqs)
            .zip(dks)
            .zip(sums.iter_mut())
            .map(|((((((&(s0, s1), region), ds), grads), dq), dk), sums)| ChunkBackward {
                s0,
                s1,
                region,
                ds,
                grads,
                dq,
                dk,
                sums: at_least(sums, 2 * widest),
            })
            .collect();
        // One pass, or with Dice in training one more per Dice layer: each
        // stops in a Dice layer's backward pass, whose sums over the rows are
        // then added in chunk order.
        let mut resume = None;
        loop {
            let pass = &shared;
            parts.par_iter_mut().for_each(|c| {
                let (s0, s1) = (c.s0, c.s1);
                let (r0, r1) = pass.rows(s0, s1);
                if resume.is_none() {
                    layout.clear_sums(c.grads);
                }
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    // A grouped pass's dk1, [nk, H1], or the outputs kept in
                    // the scratch and then their gradients (`in_scratch`).
                    // And a Dice layer's output or its gradient
                    // (`kept_width`).
                    let (k0, k1) = pass.key_range(s0, s1);
                    let len = match st.grouped {
                        true => (k1 - k0) * h1,
                        false => 2 * (r1 - r0) * pass.scratch_width(),
                    };
                    let (dk1, kept) = at_least(&mut scratch, len + (r1 - r0) * pass.kept_width()).split_at_mut(len);
                    pass.backward(
                        resume,
                        s0,
                        s1,
                        c.region,
                        c.ds,
                        &weights[r0..r1],
                        &dpooled[s0 * d..s1 * d],
                        c.grads,
                        c.dq,
                        c.dk,
                        (dk1, kept),
                        c.sums,
                    );
                });
            });
            let below = resume.unwrap_or(layout.widths.len());
            let Some(l) = (0..below).rev().find(|&l| shared.batch_stats[l]) else {
                break;
            };
            let h = layout.widths[l];
            let mut total = vec![0.0f64; 2 * h];
            for c in &parts {
                total
                    .iter_mut()
                    .zip(c.sums.iter())
                    .for_each(|(a, &b)| *a += f64::from(b));
            }
            let rows = n.max(1) as f64;
            let (sum_gz, sum_gzz) = total.split_at(h);
            shared.dice_means = (
                sum_gz.iter().map(|v| (v / rows) as f32).collect(),
                sum_gzz.iter().map(|v| (v / rows) as f32).collect(),
            );
            resume = Some(l);
        }
        drop(parts);
        st.sums = sums;
        st.partial = partial;
        st.region = region;
        st.per_sample = per_sample;
        self.add_chunk_grads(st);
    }

    /// Whether [`Attention::train_step`] can run this unit: attention
    /// pooling, and FP32 products on AVX-512F with PReLU or ReLU in every
    /// hidden layer, or mixed precision's bf16 products with no batch
    /// statistics (no Dice).
    pub(crate) fn steps_in_chunks(&self) -> bool {
        let bf16 = self.rest.products.is_bf16() && self.hidden().all(|b| b.activation.is_rowwise(Mode::Train));
        self.chunkable() && (bf16 || self.fuses_f32())
    }

    /// Cuts a training batch whose samples each have their own history
    /// (`offsets`, `[B + 1]`) into the chunks of [`Attention::train_step`]
    /// (kept in `cache`); returns their bounds (each chunk's first sample,
    /// then `B`).
    pub(crate) fn plan_step<'s>(&self, offsets: &[u32], cache: &'s mut AttentionCache) -> &'s [usize] {
        let st = &mut cache.chunked;
        Histories::own(offsets).index(&mut st.offsets, &mut st.key_at);
        st.grouped = false;
        plan_chunks(&st.offsets, None, true, CHUNK_ROWS_TRAIN, &mut st.bounds);
        &st.bounds
    }

    /// The unit's part of a whole training step over the chunks of
    /// [`Attention::plan_step`] with the same `cache`, one task per chunk:
    /// the unit's forward pass
    /// over the chunk's rows, then `middle(extra, s0, s1, pooled, dpooled)`
    /// (the rest of the model over samples `s0..s1`: from their pooled
    /// histories `[s1-s0, D]` to their gradients `dpooled`), then the
    /// unit's backward pass, while the chunk's activations are still in the
    /// core's cache. Writes the attention weights (`[N]`, into `cache`), the pooled
    /// histories (`[B, D]`), `dq` (`[B, D]`) and `dk` (`[N, D]`), and keeps
    /// each chunk's weight gradients in `cache` for
    /// [`Attention::finish_step`]. `extras` holds one value per chunk. The results do not
    /// depend on the number of threads; each chunk's are those of
    /// [`Attention::forward_chunked`] and [`Attention::backward_chunked`]
    /// over the same chunks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_step<E: Send>(
        &mut self,
        q: &[f32],
        keys: &[f32],
        cache: &mut AttentionCache,
        pooled: &mut Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        extras: &mut [E],
        middle: impl Fn(&mut E, usize, usize, &[f32], &mut [f32]) + Sync,
    ) {
        let (d, h1) = self.dims();
        let layout = Layout::new(self, false);
        // Nothing is left for a backward pass, nor of a layer-by-layer one.
        cache.path = Path::Empty;
        cache.first_act = ActivationCache::default();
        cache.rest = MlpCache::default();
        let (st, weights) = (&mut cache.chunked, &mut cache.weights);
        let b = st.offsets.len() - 1;
        let n = st.offsets[b] as usize;
        st.train = true;
        st.batch_moments.clear();
        self.split_first_layer(st);
        // Mixed precision: hidden layers `1..` on bf16 weights; FP32: every
        // layer on `fused_f32`.
        self.pack_bf16(true, st);
        self.pack_panels(!self.rest.products.is_bf16(), st);
        let width = layout.row_width();
        let grad_len = layout.grad_offsets[layout.grad_offsets.len() - 1];
        let chunks: Vec<(usize, usize)> = st.bounds.windows(2).map(|w| (w[0], w[1])).collect();
        assert_eq!(extras.len(), chunks.len(), "one extra per chunk");
        let mut partial = std::mem::take(&mut st.partial);
        size_partials(&mut partial, chunks.len(), grad_len);
        let mut per_sample = std::mem::take(&mut st.per_sample);
        pooled.clear();
        pooled.resize(b * d, 0.0);
        weights.clear();
        weights.resize(n, 0.0);
        dq.clear();
        dq.resize(b * d, 0.0);
        // Not zeroed here: each chunk's backward pass zeroes its rows
        // (`Shared::backward_scores`), in parallel.
        dk.resize(keys.len(), 0.0);
        let shared = Shared {
            bf16: packed(&st.packed),
            transposed: packed(&st.packed_t),
            panels: packed(&st.panels),
            panels_t: packed(&st.panels_t),
            local: true,
            ..Shared::new(self, &layout, st, q, keys)
        };
        let offsets = &st.offsets;
        let rows = |&(s0, s1): &(usize, usize)| (offsets[s1] - offsets[s0]) as usize;
        let samples = |&(s0, s1): &(usize, usize)| s1 - s0;
        let aqs = split_pieces(
            at_least(&mut per_sample, b * h1),
            chunks.iter().map(|c| samples(c) * h1),
        );
        let weights = split_pieces(weights, chunks.iter().map(rows));
        let pooled = split_pieces(pooled, chunks.iter().map(|c| samples(c) * d));
        let dqs = split_pieces(dq, chunks.iter().map(|c| samples(c) * d));
        let dks = split_pieces(dk, chunks.iter().map(|c| rows(c) * d));
        let mut parts: Vec<_> = chunks
            .iter()
            .zip(aqs)
            .zip(weights)
            .zip(pooled)
            .zip(dqs)
            .zip(dks)
            .zip(partial.iter_mut())
            .zip(extras.iter_mut())
            .map(|(((((((c, aq), w), p), dq), dk), g), e)| (*c, aq, w, p, dq, dk, g, e))
            .collect();
        let shared = &shared;
        let middle = &middle;
        parts
            .par_iter_mut()
            .for_each(|(c, aq, weights, pooled, dq, dk, grads, extra)| {
                let (s0, s1) = *c;
                let rows = rows(c);
                SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    // The chunk's region (nothing goes to `in_scratch`'s
                    // scratch: `local`), and its dpooled.
                    let buf = at_least(&mut scratch, rows * width + (s1 - s0) * d);
                    let (region, dpooled) = buf.split_at_mut(rows * width);
                    let mut moments = Moments::default();
                    shared.forward(0, s0, s1, region, &mut [], &mut [], aq, weights, pooled, &mut moments);
                    middle(extra, s0, s1, pooled, dpooled);
                    layout.clear_sums(grads);
                    shared.backward(
                        None,
                        s0,
                        s1,
                        region,
                        aq,
                        weights,
                        dpooled,
                        grads,
                        dq,
                        dk,
                        (&mut [], &mut []),
                        &mut [],
                    );
                });
            });
        drop(parts);
        st.partial = partial;
        st.per_sample = per_sample;
    }

    /// The end of [`Attention::train_step`] with the same `cache`: adds the
    /// weight gradients to the parameters, summed over the chunks in chunk
    /// order.
    pub(crate) fn finish_step(&mut self, cache: &mut AttentionCache) {
        self.add_chunk_grads(&mut cache.chunked);
    }

    /// Sums the chunks' gradients in `st.partial` (laid out as by
    /// `Layout::grad_offsets`, one buffer per chunk of `st.bounds`) in
    /// chunk order, and adds them to the parameters.
    fn add_chunk_grads(&mut self, st: &mut ChunkedState) {
        crate::model::sum_in_order(&mut st.partial, st.bounds.len().saturating_sub(1));
        let (g, offsets) = (&st.partial[0], &Layout::new(self, false).grad_offsets);
        let (d, h1) = self.dims();
        let add = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        // Layer 0: dWq = dWq', dWk = dWk', dWd = dWq' - dWk', dWp.
        let g0 = &g[offsets[0]..offsets[1]];
        let (dwk, rest) = g0.split_at(d * h1);
        let (dwp, rest) = rest.split_at(d * h1);
        let (dwq, rest) = rest.split_at(d * h1);
        let lin = &mut self.first.linear;
        let wg = &mut lin.weight.grad;
        add(&mut wg[..d * h1], dwq);
        add(&mut wg[d * h1..2 * d * h1], dwk);
        for ((a, q), k) in wg[2 * d * h1..3 * d * h1].iter_mut().zip(dwq).zip(dwk) {
            *a += q - k;
        }
        add(&mut wg[3 * d * h1..], dwp);
        add(&mut lin.bias.grad, &rest[..h1]);
        if let Some(a) = &mut self.first.activation.alpha {
            add(&mut a.grad, &rest[h1..2 * h1]);
        }
        for (i, block) in self.rest.blocks.iter_mut().enumerate() {
            let gl = &g[offsets[i + 1]..offsets[i + 2]];
            let (w, rest) = gl.split_at(block.linear.weight.grad.len());
            let h = block.linear.output_dim();
            add(&mut block.linear.weight.grad, w);
            add(&mut block.linear.bias.grad, &rest[..h]);
            if let Some(a) = &mut block.activation.alpha {
                add(&mut a.grad, &rest[h..2 * h]);
            }
        }
        let layers = offsets.len() - 2;
        let go = &g[offsets[layers]..offsets[layers + 1]];
        let h_last = go.len() - 1;
        add(&mut self.output.weight.grad, &go[..h_last]);
        self.output.bias.grad[0] += go[h_last];
    }
}
