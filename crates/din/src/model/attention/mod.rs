//! The local activation unit and attention pooling (DIN's core).
//!
//! For a candidate (query) `q` and each past behaviour (key) `k` of the same
//! sample, an MLP over `[q, k, q-k, q*k]` gives a score; the history is pooled
//! as `Σ_t w_t k_t` with `w = score` (the paper) or `softmax(score)`.
//!
//! The first layer is split exactly (architecture.md, trick 1): with
//! `W = [Wq; Wk; Wd; Wp]` acting on `[q, k, q-k, q*k]`,
//! `[q, k, q-k, q*k]·W = q·(Wq+Wd) + k·(Wk-Wd) + (q*k)·Wp`, so the query term
//! is computed once per sample rather than once per behaviour, and the
//! `[rows, 4D]` input is never built. Histories are ragged: only real
//! behaviours are computed (trick 2).
//!
//! Two implementations share these weights: the chunk-parallel path
//! (module `chunked`), used for attention pooling (Dice in training
//! included: its batch statistics are reduced over the chunks between
//! passes), and the layer-by-layer path below, used for sum pooling and
//! kept as the plain reference the tests check the chunked path against.

mod chunked;

use rand::Rng;

use super::activation::ActivationCache;
use super::bf16::{Bf16Matrix, Bf16State, Kernel, Precision};
use super::linalg::{matmul, matmul_a_bt, matmul_at_b};
use super::linear::Linear;
use super::mlp::{Block, Mlp, MlpCache};
use super::param::{Module, Param};
use super::Mode;
use crate::schema::{AttentionConfig, Normalization, Pooling};

/// The local activation unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// First hidden layer; its weight is `[4D, H1]` over `[q, k, q-k, q*k]`.
    pub first: Block,
    /// The remaining hidden layers.
    pub rest: Mlp,
    /// Score layer, `[H_last, 1]`.
    pub output: Linear,
    /// Score normalisation.
    pub normalization: Normalization,
    /// Attention or plain sum pooling.
    pub pooling: Pooling,
    /// The kernel of inference and the hidden layers' bf16 weights
    /// (see [`Attention::set_precision`]).
    bf16: Bf16State,
}

/// Which keys each sample's query attends over.
///
/// Every sample has its own history (`starts: None`: sample `s` owns
/// keys `offsets[s]..offsets[s + 1]`), or samples share them
/// (architecture.md, trick 4): consecutive samples of one group (a page
/// view's candidates) attend over one history stored once, whose share of
/// the first layer a training pass then computes once, and whose key
/// gradients it sums once.
#[derive(Debug, Clone, Copy)]
pub struct Histories<'a> {
    /// Where each history's keys start, then the number of keys, `[H + 1]`.
    pub offsets: &'a [u32],
    /// Where each history's samples start, then the number of samples
    /// (`[H + 1]`, increasing: each history's samples are consecutive).
    /// `None`: sample `s` has history `s`.
    pub starts: Option<&'a [u32]>,
}

impl<'a> Histories<'a> {
    /// Every sample with a history of its own.
    pub fn own(offsets: &'a [u32]) -> Self {
        Histories { offsets, starts: None }
    }

    /// Fills `rows` (`[B + 1]`: where each sample's (query, behaviour) rows
    /// start, then their count) and `key_at` (`[B]`: where each sample's
    /// keys start in `keys`).
    fn index(&self, rows: &mut Vec<u32>, key_at: &mut Vec<u32>) {
        rows.clear();
        key_at.clear();
        match self.starts {
            None => {
                rows.extend_from_slice(self.offsets);
                key_at.extend_from_slice(&self.offsets[..self.offsets.len() - 1]);
            }
            Some(starts) => {
                rows.push(0);
                for (h, w) in starts.windows(2).enumerate() {
                    let (k0, k1) = (self.offsets[h], self.offsets[h + 1]);
                    for _ in w[0]..w[1] {
                        key_at.push(k0);
                        rows.push(rows[rows.len() - 1] + (k1 - k0));
                    }
                }
            }
        }
    }
}

/// Which implementation filled an [`AttentionCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Path {
    /// Nothing yet.
    #[default]
    Empty,
    /// [`chunked`], with what the backward pass needs.
    Chunked,
    /// Layer by layer over the whole batch.
    Layered,
}

/// Intermediate values of [`Attention::forward`]. Its buffers are reused
/// when the same cache is passed to [`Attention::forward_into`] again.
#[derive(Debug, Clone, Default)]
pub struct AttentionCache {
    path: Path,
    chunked: chunked::ChunkedState,
    /// Sample of each behaviour row, `[N]`.
    owner: Vec<u32>,
    /// `Wq + Wd`, `[D, H1]`.
    wq: Vec<f32>,
    /// `Wk - Wd`, `[D, H1]`.
    wk: Vec<f32>,
    /// `q * k` per behaviour, `[N, D]`.
    qk: Vec<f32>,
    /// First layer pre-activation, `[N, H1]`.
    pre1: Vec<f32>,
    first_act: ActivationCache,
    rest: MlpCache,
    /// Attention weights after normalisation, one per (sample, behaviour)
    /// row, sample by sample (`[N]`).
    pub weights: Vec<f32>,
    /// The layer-by-layer path on shared histories: each sample's keys
    /// copied out (`[N, D]`), where each sample's rows start in them
    /// (`[B + 1]`) and where its keys start in the shared ones (`[B]`), to
    /// sum their gradients back.
    expanded: Option<(Vec<f32>, Vec<u32>, Vec<u32>)>,
}

impl Attention {
    /// A unit for queries and keys of width `dim`.
    pub fn new(dim: usize, config: &AttentionConfig, rng: &mut impl Rng) -> Self {
        let units = &config.hidden_units;
        let h1 = units.first().copied().unwrap_or(1);
        let first = Block::new(4 * dim, h1, config.activation, 0.0, rng);
        let rest = Mlp::new(h1, &units[1.min(units.len())..], config.activation, 0.0, rng);
        let output = Linear::new(rest.output_dim(h1), 1, rng);
        Attention {
            first,
            rest,
            output,
            normalization: config.normalization,
            pooling: config.pooling,
            bf16: Bf16State::default(),
        }
    }

    /// Infers with `precision` from now on (see [`super::bf16`]); returns
    /// the kernel it resolved to on this CPU. Training passes stay f32.
    /// The bf16 weights are made from the f32 ones at the next inference,
    /// and again after any change through [`Module::visit_mut`]; after
    /// writing the public weight fields directly, call this again.
    pub fn set_precision(&mut self, precision: Precision) -> Kernel {
        let kernel = precision.resolve();
        self.set_kernel(kernel);
        kernel
    }

    /// Infers on `kernel`.
    ///
    /// # Panics
    /// If `kernel` is [`Kernel::Avx512Bf16`] and this CPU lacks it (see
    /// [`super::bf16::bf16_hardware`]).
    pub fn set_kernel(&mut self, kernel: Kernel) {
        super::bf16::assert_runs(kernel);
        self.bf16.set(kernel);
    }

    /// The kernel inference runs on.
    pub fn kernel(&self) -> Kernel {
        self.bf16.kernel()
    }

    /// The kernel of the training products of the hidden layers after the
    /// first (see [`crate::model::Din::set_training_precision`]).
    pub fn training_kernel(&self) -> Kernel {
        self.rest.products
    }

    /// With a bf16 kernel, the hidden layers after the first in bf16
    /// (`[H_l, H_l+1]` each), made from the weights the first time; on AMX
    /// followed by the first layer for the fused path (see
    /// [`Attention::bf16_fused`]).
    fn bf16_matrices(&self) -> Option<&[Bf16Matrix]> {
        self.bf16.layers(|kernel| {
            let mut layers = self.rest.bf16_weights(kernel);
            if kernel == Kernel::Amx {
                // On `x = [q*k, k]`: `[Wp; Wk - Wd]`, `[2D, H1]`, split.
                let (d, h1) = self.dims();
                let w = &self.first.linear.weight.value; // [4D, H1]: Wq, Wk, Wd, Wp
                let (wk, wd, wp) = (&w[d * h1..2 * d * h1], &w[2 * d * h1..3 * d * h1], &w[3 * d * h1..]);
                let mut x_weight = wp.to_vec();
                x_weight.extend(wk.iter().zip(wd).map(|(a, b)| a - b));
                let split = super::bf16::split_weights(&x_weight);
                layers.push(Bf16Matrix::new(6 * d, h1, &split, kernel));
            }
            layers
        })
    }

    /// With a bf16 kernel, the hidden layers after the first in bf16.
    fn bf16_layers(&self) -> Option<&[Bf16Matrix]> {
        self.bf16_matrices().map(|m| &m[..self.rest.blocks.len()])
    }

    /// AMX inference: the first layer on split operands (`[6D, H1]`, see
    /// [`super::bf16::split_weights`]: about 16 bits of its inputs and
    /// weights kept, against bf16's 8) and the hidden layers after it, for
    /// the fused path, where each layer's activations are rounded straight
    /// into the next product's operand.
    fn bf16_fused(&self) -> Option<(&Bf16Matrix, &[Bf16Matrix])> {
        let all = self.bf16_matrices()?;
        let r = self.rest.blocks.len();
        (all.len() == r + 1 && all[r].takes_packed()).then(|| (&all[r], &all[..r]))
    }

    fn dims(&self) -> (usize, usize) {
        let h1 = self.first.linear.output_dim();
        (self.first.linear.input_dim() / 4, h1)
    }

    /// Pools each sample's keys by their attention to its query, keeping
    /// what [`Attention::backward`] needs.
    ///
    /// `q`: `[B, D]`; `keys`: `[N, D]`, sample `b` owning rows
    /// `offsets[b]..offsets[b+1]`. Returns the pooled history `[B, D]`.
    pub fn forward(&self, q: &[f32], keys: &[f32], offsets: &[u32], mode: Mode) -> (Vec<f32>, AttentionCache) {
        let mut cache = AttentionCache::default();
        let mut pooled = Vec::new();
        self.forward_into(q, keys, offsets, mode, &mut cache, &mut pooled);
        (pooled, cache)
    }

    /// [`Attention::forward`] into reused buffers: `pooled` becomes `[B, D]`.
    pub fn forward_into(
        &self,
        q: &[f32],
        keys: &[f32],
        offsets: &[u32],
        mode: Mode,
        cache: &mut AttentionCache,
        pooled: &mut Vec<f32>,
    ) {
        self.forward_histories_into(q, keys, Histories::own(offsets), mode, cache, pooled);
    }

    /// [`Attention::forward_into`] over histories that samples may share:
    /// `keys` holds each history once (`[K, D]`); `pooled` becomes `[B, D]`.
    pub fn forward_histories_into(
        &self,
        q: &[f32],
        keys: &[f32],
        histories: Histories<'_>,
        mode: Mode,
        cache: &mut AttentionCache,
        pooled: &mut Vec<f32>,
    ) {
        if self.chunkable() {
            self.forward_chunked(
                q,
                keys,
                histories,
                true,
                mode,
                None,
                &mut cache.chunked,
                pooled,
                &mut cache.weights,
            );
            cache.path = Path::Chunked;
            // Nothing of an earlier layer-by-layer pass's statistics stays.
            cache.first_act = ActivationCache::default();
            cache.rest = MlpCache::default();
        } else {
            let mut chunked = std::mem::take(&mut cache.chunked);
            chunked.batch_moments.clear();
            let (p, c) = self.forward_layered_histories(q, keys, histories, mode);
            *pooled = p;
            *cache = AttentionCache { chunked, ..c };
        }
    }

    /// The layer-by-layer pass over possibly shared histories: they are
    /// copied out per sample (this path serves Dice in training and sum
    /// pooling, and computes every row's first layer whole).
    fn forward_layered_histories(
        &self,
        q: &[f32],
        keys: &[f32],
        histories: Histories<'_>,
        mode: Mode,
    ) -> (Vec<f32>, AttentionCache) {
        if histories.starts.is_none() {
            return self.forward_layered(q, keys, histories.offsets, mode);
        }
        let d = self.dims().0;
        let (mut rows, mut key_at) = (Vec::new(), Vec::new());
        histories.index(&mut rows, &mut key_at);
        let mut expanded = Vec::with_capacity(rows[rows.len() - 1] as usize * d);
        for s in 0..key_at.len() {
            let k0 = key_at[s] as usize;
            let len = (rows[s + 1] - rows[s]) as usize;
            expanded.extend_from_slice(&keys[k0 * d..(k0 + len) * d]);
        }
        let (pooled, mut cache) = self.forward_layered(q, &expanded, &rows, mode);
        cache.expanded = Some((expanded, rows, key_at));
        (pooled, cache)
    }

    /// Inference only: the pooled histories `[B, D]` and attention weights
    /// `[N]`, keeping nothing for a backward pass, so memory does not grow
    /// with the batch beyond its inputs and outputs.
    ///
    /// `same_history[s]` (`[B]`, optional) says that sample `s` has the same
    /// history as sample `s - 1`, as the candidates of one request do: the
    /// history's share of the first layer, `k·(Wk - Wd)`, is then computed
    /// once for them (architecture.md, trick 4; exact).
    pub fn infer(
        &self,
        q: &[f32],
        keys: &[f32],
        offsets: &[u32],
        same_history: Option<&[bool]>,
        pooled: &mut Vec<f32>,
        weights: &mut Vec<f32>,
    ) {
        self.infer_histories(q, keys, Histories::own(offsets), same_history, pooled, weights);
    }

    /// [`Attention::infer`] over histories that samples may share (see
    /// [`Histories`]); `same_history` as there.
    pub fn infer_histories(
        &self,
        q: &[f32],
        keys: &[f32],
        histories: Histories<'_>,
        same_history: Option<&[bool]>,
        pooled: &mut Vec<f32>,
        weights: &mut Vec<f32>,
    ) {
        if self.chunkable() {
            let mut st = chunked::ChunkedState::default();
            self.forward_chunked(
                q,
                keys,
                histories,
                false,
                Mode::Infer,
                same_history,
                &mut st,
                pooled,
                weights,
            );
        } else {
            let (p, c) = self.forward_layered_histories(q, keys, histories, Mode::Infer);
            *pooled = p;
            *weights = c.weights;
        }
    }

    /// The layer-by-layer forward pass over the whole batch.
    fn forward_layered(&self, q: &[f32], keys: &[f32], offsets: &[u32], mode: Mode) -> (Vec<f32>, AttentionCache) {
        let (d, h1) = self.dims();
        let b = offsets.len() - 1;
        let n = keys.len() / d.max(1);
        let mut owner = Vec::with_capacity(n);
        for s in 0..b {
            owner.extend(std::iter::repeat_n(s as u32, (offsets[s + 1] - offsets[s]) as usize));
        }
        if self.pooling == Pooling::Sum {
            let weights = vec![1.0; n];
            let pooled = pool(&owner, &weights, keys, b, d);
            return (
                pooled,
                AttentionCache {
                    path: Path::Layered,
                    owner,
                    weights,
                    ..AttentionCache::default()
                },
            );
        }
        let w = &self.first.linear.weight.value; // [4D, H1]
        let (wq_, wk_, wd, wp) = (
            &w[..d * h1],
            &w[d * h1..2 * d * h1],
            &w[2 * d * h1..3 * d * h1],
            &w[3 * d * h1..],
        );
        let wq: Vec<f32> = wq_.iter().zip(wd).map(|(a, b)| a + b).collect(); // [D, H1]
        let wk: Vec<f32> = wk_.iter().zip(wd).map(|(a, b)| a - b).collect(); // [D, H1]
        let mut aq = vec![0.0; b * h1];
        matmul(b, d, h1, q, &wq, &mut aq, false); // [B, H1], once per sample
        let mut qk = vec![0.0; n * d]; // [N, D]
        let mut pre1 = Vec::with_capacity(n * h1); // [N, H1]
        for (t, &s) in owner.iter().enumerate() {
            let (qs, ks) = (&q[s as usize * d..(s as usize + 1) * d], &keys[t * d..(t + 1) * d]);
            qk[t * d..(t + 1) * d]
                .iter_mut()
                .zip(qs.iter().zip(ks))
                .for_each(|(o, (a, b))| *o = a * b);
            let a = &aq[s as usize * h1..(s as usize + 1) * h1];
            pre1.extend(a.iter().zip(&self.first.linear.bias.value).map(|(a, b)| a + b));
        }
        matmul(n, d, h1, keys, &wk, &mut pre1, true); // += k·(Wk-Wd)
        matmul(n, d, h1, &qk, wp, &mut pre1, true); // += (q*k)·Wp
        let mut h1v = Vec::new();
        let first_act = self.first.activation.forward(&pre1, n, mode, &mut h1v); // [N, H1]
        let rest = self.rest.forward(h1v, n, mode, None); // [N, H_last]
        let mut scores = Vec::new();
        self.output.forward(&rest.output, n, &mut scores); // [N, 1]

        let mut weights = scores;
        if self.normalization == Normalization::Softmax {
            for s in 0..b {
                softmax_in_place(&mut weights[offsets[s] as usize..offsets[s + 1] as usize]);
            }
        }
        let pooled = pool(&owner, &weights, keys, b, d);
        let cache = AttentionCache {
            path: Path::Layered,
            chunked: chunked::ChunkedState::default(),
            owner,
            wq,
            wk,
            qk,
            pre1,
            first_act,
            rest,
            weights,
            expanded: None,
        };
        (pooled, cache)
    }

    /// Accumulates parameter gradients and returns `(dq [B, D], dkeys)`,
    /// one gradient row per row of `keys` (summed over the samples that
    /// share it).
    /// The cache's buffers are reused for gradients: it serves one backward pass.
    ///
    /// # Panics
    /// If `cache` does not come from a forward pass with these `q` and `keys`.
    pub fn backward(
        &mut self,
        q: &[f32],
        keys: &[f32],
        cache: &mut AttentionCache,
        dpooled: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut dq, mut dk) = (Vec::new(), Vec::new());
        self.backward_into(q, keys, cache, dpooled, &mut dq, &mut dk);
        (dq, dk)
    }

    /// [`Attention::backward`] into reused buffers.
    pub fn backward_into(
        &mut self,
        q: &[f32],
        keys: &[f32],
        cache: &mut AttentionCache,
        dpooled: &[f32],
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
    ) {
        match cache.path {
            Path::Chunked => {
                cache.path = Path::Empty;
                self.backward_chunked(q, keys, &mut cache.chunked, &cache.weights, dpooled, dq, dk);
            }
            Path::Layered => match cache.expanded.take() {
                None => (*dq, *dk) = self.backward_layered(q, keys, cache, dpooled),
                Some((expanded, rows, key_at)) => {
                    let d = self.dims().0;
                    let (dqs, dk_rows) = self.backward_layered(q, &expanded, cache, dpooled);
                    *dq = dqs;
                    dk.clear();
                    dk.resize(keys.len(), 0.0);
                    // Sum each shared key's gradient over its samples.
                    for (s, &k0) in key_at.iter().enumerate() {
                        let (t0, t1) = (rows[s] as usize * d, rows[s + 1] as usize * d);
                        let to = k0 as usize * d;
                        dk[to..to + t1 - t0]
                            .iter_mut()
                            .zip(&dk_rows[t0..t1])
                            .for_each(|(a, b)| *a += b);
                    }
                }
            },
            Path::Empty => panic!("Attention::backward needs the cache of a forward pass, used once"),
        }
    }

    fn backward_layered(
        &mut self,
        q: &[f32],
        keys: &[f32],
        cache: &AttentionCache,
        dpooled: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (d, h1) = self.dims();
        let b = q.len() / d.max(1);
        let n = cache.owner.len();

        // Pooling: pooled_b = Σ_t w_t k_t.
        let mut dk = vec![0.0; n * d]; // [N, D]
        let mut dw = vec![0.0; n]; // [N]
        for (t, &s) in cache.owner.iter().enumerate() {
            let g = &dpooled[s as usize * d..(s as usize + 1) * d];
            let k = &keys[t * d..(t + 1) * d];
            dw[t] = g.iter().zip(k).map(|(a, b)| a * b).sum();
            dk[t * d..(t + 1) * d]
                .iter_mut()
                .zip(g)
                .for_each(|(o, g)| *o = cache.weights[t] * g);
        }
        if self.pooling == Pooling::Sum {
            return (vec![0.0; b * d], dk); // the query does not enter a plain sum
        }
        // Normalisation.
        let mut dscore = dw;
        if self.normalization == Normalization::Softmax {
            let mut start = 0;
            while start < n {
                let s = cache.owner[start];
                let end = start + cache.owner[start..].iter().take_while(|&&o| o == s).count();
                let w = &cache.weights[start..end];
                let dot: f32 = w.iter().zip(&dscore[start..end]).map(|(a, b)| a * b).sum();
                for (g, wt) in dscore[start..end].iter_mut().zip(w) {
                    *g = wt * (*g - dot);
                }
                start = end;
            }
        }
        // Score MLP.
        let mut dh = Vec::new();
        self.output.backward(&cache.rest.output, n, &dscore, Some(&mut dh)); // [N, H_last]
        let dh1 = self.rest.backward(&cache.rest, n, dh); // [N, H1]
        let mut dpre1 = Vec::new();
        self.first
            .activation
            .backward(&cache.pre1, n, &cache.first_act, &dh1, &mut dpre1);

        // First layer, split: pre1_t = q_b·Wq' + k_t·Wk' + (q_b*k_t)·Wp + b1.
        let lin = &mut self.first.linear;
        for r in dpre1.chunks_exact(h1) {
            lin.bias.grad.iter_mut().zip(r).for_each(|(g, d)| *g += d);
        }
        let mut ds = vec![0.0; b * h1]; // [B, H1] = Σ_{t∈b} dpre1_t
        for (t, &s) in cache.owner.iter().enumerate() {
            ds[s as usize * h1..(s as usize + 1) * h1]
                .iter_mut()
                .zip(&dpre1[t * h1..(t + 1) * h1])
                .for_each(|(a, g)| *a += g);
        }
        let mut dwq = vec![0.0; d * h1];
        matmul_at_b(d, b, h1, q, &ds, &mut dwq, false); // [D, H1]
        let mut dwk = vec![0.0; d * h1];
        matmul_at_b(d, n, h1, keys, &dpre1, &mut dwk, false); // [D, H1]
        let grad = &mut lin.weight.grad;
        matmul_at_b(d, n, h1, &cache.qk, &dpre1, &mut grad[3 * d * h1..], true); // dWp
        for i in 0..d * h1 {
            grad[i] += dwq[i]; // dWq = dWq'
            grad[d * h1 + i] += dwk[i]; // dWk = dWk'
            grad[2 * d * h1 + i] += dwq[i] - dwk[i]; // dWd = dWq' - dWk'
        }
        let wp = &lin.weight.value[3 * d * h1..];
        let mut dq = vec![0.0; b * d];
        matmul_a_bt(b, h1, d, &ds, &cache.wq, &mut dq, false); // [B, D]
        matmul_a_bt(n, h1, d, &dpre1, &cache.wk, &mut dk, true); // [N, D]
        let mut gp = vec![0.0; n * d];
        matmul_a_bt(n, h1, d, &dpre1, wp, &mut gp, false); // [N, D] gradient reaching q*k
        for (t, &s) in cache.owner.iter().enumerate() {
            let (qs, ks) = (&q[s as usize * d..(s as usize + 1) * d], &keys[t * d..(t + 1) * d]);
            let g = &gp[t * d..(t + 1) * d];
            for j in 0..d {
                dk[t * d + j] += g[j] * qs[j];
                dq[s as usize * d + j] += g[j] * ks[j];
            }
        }
        (dq, dk)
    }

    /// Folds training batch statistics into Dice's moving averages.
    pub fn update_statistics(&mut self, cache: &AttentionCache) {
        self.fold_chunked_statistics(&cache.chunked);
        self.first.activation.update_statistics(&cache.first_act);
        self.rest.update_statistics(&cache.rest);
    }
}

/// `pooled_b = Σ_{t of b} w_t k_t`, `[B, D]`.
fn pool(owner: &[u32], weights: &[f32], keys: &[f32], b: usize, d: usize) -> Vec<f32> {
    let mut pooled = vec![0.0; b * d];
    for (t, &s) in owner.iter().enumerate() {
        let wt = weights[t];
        pooled[s as usize * d..(s as usize + 1) * d]
            .iter_mut()
            .zip(&keys[t * d..(t + 1) * d])
            .for_each(|(p, k)| *p += wt * k);
    }
    pooled
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

impl Module for Attention {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a Param)) {
        self.first.visit(&format!("{prefix}.layers.0"), f);
        self.rest.visit_from(&format!("{prefix}.layers"), 1, f);
        self.output.visit(&format!("{prefix}.output"), f);
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(String, &mut Param)) {
        // The weights may change: bf16 copies are made again when next used.
        self.bf16.invalidate();
        self.first.visit_mut(&format!("{prefix}.layers.0"), f);
        self.rest.visit_from_mut(&format!("{prefix}.layers"), 1, f);
        self.output.visit_mut(&format!("{prefix}.output"), f);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, dot, numeric_grad, rand_vec};
    use super::*;
    use crate::schema::ActivationKind;
    use rand::SeedableRng;

    /// Offsets of `samples` histories, sample `s` holding `(s * step) %
    /// modulo` behaviours (zero-length ones included).
    fn ragged_offsets(samples: u32, step: u32, modulo: u32) -> Vec<u32> {
        let mut offsets = vec![0u32];
        for s in 0..samples {
            offsets.push(offsets[offsets.len() - 1] + (s * step) % modulo);
        }
        offsets
    }

    /// An attention unit over `d`-wide keys with attention pooling, its
    /// weights drawn from `seed`.
    fn unit(
        d: usize,
        hidden: &[usize],
        activation: ActivationKind,
        normalization: Normalization,
        seed: u64,
    ) -> Attention {
        let config = AttentionConfig {
            pooling: Pooling::Attention,
            hidden_units: hidden.to_vec(),
            activation,
            normalization,
        };
        Attention::new(d, &config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// The split first layer equals the textbook MLP over `[q, k, q-k, q*k]`.
    #[test]
    fn split_first_layer_equals_concatenated_input() {
        let d = 3;
        let att = unit(d, &[5], ActivationKind::Sigmoid, Normalization::None, 1);
        let q = rand_vec(d, 2);
        let keys = rand_vec(2 * d, 3);
        let (pooled, cache) = att.forward(&q, &keys, &[0, 2], Mode::Infer);
        for t in 0..2 {
            let k = &keys[t * d..(t + 1) * d];
            let x: Vec<f32> = q
                .iter()
                .chain(k)
                .copied()
                .chain(q.iter().zip(k).map(|(a, b)| a - b))
                .chain(q.iter().zip(k).map(|(a, b)| a * b))
                .collect();
            let mut pre = Vec::new();
            att.first.linear.forward(&x, 1, &mut pre);
            let mut h = Vec::new();
            att.first.activation.forward(&pre, 1, Mode::Infer, &mut h);
            let mut s = Vec::new();
            att.output.forward(&h, 1, &mut s);
            assert!(
                (s[0] - cache.weights[t]).abs() < 1e-5,
                "score {t}: {} vs {}",
                s[0],
                cache.weights[t]
            );
        }
        let want: Vec<f32> = (0..d)
            .map(|j| cache.weights[0] * keys[j] + cache.weights[1] * keys[d + j])
            .collect();
        assert_close(
            "pooled",
            &pooled,
            &want.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            1e-5,
        );
    }

    fn check(activation: ActivationKind, normalization: Normalization, mode: Mode) {
        let d = 4;
        let mut att = unit(d, &[6, 5], activation, normalization, 11);
        // Sample 1 has an empty history.
        let offsets = [0u32, 3, 3, 5];
        let q = rand_vec(3 * d, 12);
        let keys = rand_vec(5 * d, 13);
        let r = rand_vec(3 * d, 14);
        let loss = |a: &Attention, q: &[f32], k: &[f32]| dot(&r, &a.forward(q, k, &offsets, mode).0);
        let (pooled, mut cache) = att.forward(&q, &keys, &offsets, mode);
        assert!(
            pooled[d..2 * d].iter().all(|v| *v == 0.0),
            "an empty history pools to zero"
        );
        let (dq, dk) = att.backward(&q, &keys, &mut cache, &r);
        let name = format!("{activation:?}/{normalization:?}/{mode:?}");
        assert_close(
            &format!("{name} dq"),
            &dq,
            &numeric_grad(&q, 1e-3, |q| loss(&att, q, &keys)),
            2e-2,
        );
        assert_close(
            &format!("{name} dk"),
            &dk,
            &numeric_grad(&keys, 1e-3, |k| loss(&att, &q, k)),
            2e-2,
        );
        let w = att.first.linear.weight.value.clone();
        let nw = numeric_grad(&w, 1e-3, |w| {
            let mut a = att.clone();
            a.first.linear.weight.value = w.to_vec();
            loss(&a, &q, &keys)
        });
        assert_close(&format!("{name} dW1"), &att.first.linear.weight.grad, &nw, 2e-2);
        let nb = numeric_grad(&att.output.weight.value.clone(), 1e-3, |w| {
            let mut a = att.clone();
            a.output.weight.value = w.to_vec();
            loss(&a, &q, &keys)
        });
        assert_close(&format!("{name} dWout"), &att.output.weight.grad, &nb, 2e-2);
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (act, norm, mode) in [
            (ActivationKind::Sigmoid, Normalization::None, Mode::Train),
            (ActivationKind::Sigmoid, Normalization::Softmax, Mode::Train),
            (ActivationKind::Dice, Normalization::None, Mode::Train),
            (ActivationKind::Dice, Normalization::Softmax, Mode::Infer),
            (ActivationKind::Prelu, Normalization::Softmax, Mode::Train),
        ] {
            check(act, norm, mode);
        }
    }

    #[test]
    fn sum_pooling_adds_the_keys_and_passes_gradients_straight_through() {
        let config = AttentionConfig {
            pooling: Pooling::Sum,
            ..AttentionConfig::default()
        };
        let mut att = Attention::new(2, &config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        let keys = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (pooled, mut cache) = att.forward(&[0.5, 0.5, 0.1, 0.1], &keys, &[0, 2, 3], Mode::Train);
        assert_eq!(pooled, vec![4.0, 6.0, 5.0, 6.0]);
        let (dq, dk) = att.backward(&[0.5, 0.5, 0.1, 0.1], &keys, &mut cache, &[1.0, -1.0, 2.0, 3.0]);
        assert_eq!(dq, vec![0.0; 4]);
        assert_eq!(dk, vec![1.0, -1.0, 1.0, -1.0, 2.0, 3.0]);
        assert!(
            att.first.linear.weight.grad.iter().all(|g| *g == 0.0),
            "the unit is not used"
        );
    }

    /// The chunked path (several chunks, uneven and empty histories) and the
    /// layer-by-layer path compute the same values and gradients.
    /// Shared histories (a grouped batch) give the flat batch's pooled
    /// histories, weights and gradients, each shared key's gradient being
    /// the sum of its copies', on every path: chunked (row-wise
    /// activations, and Dice in training with its batch statistics over
    /// the pairs), and sum pooling.
    #[test]
    fn shared_histories_equal_their_copies() {
        let d = 4;
        // 80 groups of 1..=7 samples over histories of 0..=30 behaviours:
        // several training chunks (Dice's too), a chunk holding whole groups.
        let (mut hist_offsets, mut groups, mut flat_offsets) = (vec![0u32], Vec::new(), vec![0u32]);
        for g in 0..80u32 {
            let len = (g * 11) % 31;
            hist_offsets.push(hist_offsets[hist_offsets.len() - 1] + len);
            for _ in 0..1 + (g * 5) % 7 {
                groups.push(g);
                flat_offsets.push(flat_offsets[flat_offsets.len() - 1] + len);
            }
        }
        let b = groups.len();
        let keys = rand_vec(hist_offsets[80] as usize * d, 41);
        let mut flat_keys = Vec::new();
        for &g in &groups {
            flat_keys.extend_from_slice(
                &keys[hist_offsets[g as usize] as usize * d..hist_offsets[g as usize + 1] as usize * d],
            );
        }
        assert!(flat_keys.len() / d > 2 * chunked::CHUNK_ROWS_DICE);
        let q = rand_vec(b * d, 42);
        let dpooled = rand_vec(b * d, 43);
        let mut starts: Vec<u32> = (0..groups.len())
            .filter(|&s| s == 0 || groups[s] != groups[s - 1])
            .map(|s| s as u32)
            .collect();
        starts.push(groups.len() as u32);
        let histories = Histories {
            offsets: &hist_offsets,
            starts: Some(&starts),
        };
        for (activation, normalization, pooling) in [
            (ActivationKind::Prelu, Normalization::None, Pooling::Attention),
            (ActivationKind::Sigmoid, Normalization::Softmax, Pooling::Attention),
            (ActivationKind::Dice, Normalization::None, Pooling::Attention),
            (ActivationKind::Prelu, Normalization::None, Pooling::Sum),
        ] {
            let config = AttentionConfig {
                pooling,
                hidden_units: vec![12, 6],
                activation,
                normalization,
            };
            let mut grouped = Attention::new(d, &config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
            let mut flat = grouped.clone();
            let name = format!("{activation:?}/{normalization:?}/{pooling:?}");
            let close = |what: &str, a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                assert_eq!(a.len(), b.len(), "{name} {what}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!((x - y).abs() <= 1e-5 * scale + 1e-6, "{name} {what}[{i}]: {x} vs {y}");
                }
            };
            let (mut p_g, mut c_g) = (Vec::new(), AttentionCache::default());
            grouped.forward_histories_into(&q, &keys, histories, Mode::Train, &mut c_g, &mut p_g);
            let (p_f, mut c_f) = flat.forward(&q, &flat_keys, &flat_offsets, Mode::Train);
            close("pooled", &p_g, &p_f);
            close("weights", &c_g.weights, &c_f.weights);
            let (mut p_inf, mut w_inf) = (Vec::new(), Vec::new());
            grouped.infer_histories(&q, &keys, histories, None, &mut p_inf, &mut w_inf);
            let (mut p_finf, mut w_finf) = (Vec::new(), Vec::new());
            flat.infer(&q, &flat_keys, &flat_offsets, None, &mut p_finf, &mut w_finf);
            close("inferred pooled", &p_inf, &p_finf);
            close("inferred weights", &w_inf, &w_finf);
            let (dq_g, dk_g) = grouped.backward(&q, &keys, &mut c_g, &dpooled);
            let (dq_f, dk_f) = flat.backward(&q, &flat_keys, &mut c_f, &dpooled);
            close("dq", &dq_g, &dq_f);
            let mut dk_sum = vec![0.0f32; keys.len()];
            for (s, &g) in groups.iter().enumerate() {
                let (k0, f0) = (hist_offsets[g as usize] as usize, flat_offsets[s] as usize);
                let len = flat_offsets[s + 1] as usize - f0;
                for i in 0..len * d {
                    dk_sum[k0 * d + i] += dk_f[f0 * d + i];
                }
            }
            close("dk", &dk_g, &dk_sum);
            let mut grads = Vec::new();
            flat.visit("att", &mut |name, p| grads.push((name, p.grad.clone())));
            let mut i = 0;
            grouped.visit("att", &mut |tensor, p| {
                close(&tensor, &p.grad, &grads[i].1);
                i += 1;
            });
        }
    }

    /// The chunked path (with Dice in training, passes that stop at each
    /// Dice layer for the batch's moments and, backward, for its sums) and
    /// the layer-by-layer one compute the same pooled histories, weights,
    /// gradients and moving averages.
    #[test]
    fn chunked_and_layered_paths_agree() {
        let d = 4;
        // 150 samples of 0..=40 behaviours: about 3,000 rows, several
        // chunks (Dice's too).
        let offsets = ragged_offsets(150, 7, 41);
        let (b, n) = (offsets.len() - 1, offsets[offsets.len() - 1] as usize);
        assert!(n > 2 * chunked::CHUNK_ROWS_DICE, "{n} rows");
        let q = rand_vec(b * d, 21);
        let keys = rand_vec(n * d, 22);
        let dpooled = rand_vec(b * d, 23);
        for (activation, normalization, units) in [
            (ActivationKind::Prelu, Normalization::None, &[12, 6, 5][..]),
            (ActivationKind::Prelu, Normalization::None, &[9]),
            (ActivationKind::Sigmoid, Normalization::Softmax, &[12, 6, 5]),
            (ActivationKind::Relu, Normalization::None, &[12, 6, 5]),
            (ActivationKind::Relu, Normalization::Softmax, &[20, 17]),
            (ActivationKind::Prelu, Normalization::Softmax, &[100, 70, 33]),
            (ActivationKind::Dice, Normalization::None, &[12, 6, 5]),
            (ActivationKind::Dice, Normalization::Softmax, &[12, 6, 5]),
        ] {
            let mut fast = unit(d, units, activation, normalization, 31);
            fast.visit_mut("att", &mut |name, p| {
                if name.ends_with("alpha") {
                    p.value.iter_mut().enumerate().for_each(|(i, v)| *v = 0.05 * i as f32);
                }
                if name.ends_with("running_mean") {
                    p.value
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = 0.1 - 0.02 * i as f32);
                }
            });
            let mut slow = fast.clone();
            let name = format!("{activation:?}/{normalization:?}/{units:?}");
            let close = |what: &str, a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                assert_eq!(a.len(), b.len(), "{name} {what}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!((x - y).abs() <= 1e-5 * scale + 1e-6, "{name} {what}[{i}]: {x} vs {y}");
                }
            };
            let (p_fast, mut c_fast) = fast.forward(&q, &keys, &offsets, Mode::Train);
            assert_eq!(c_fast.path, Path::Chunked, "{name}");
            let (p_slow, c_slow) = slow.forward_layered(&q, &keys, &offsets, Mode::Train);
            close("pooled", &p_fast, &p_slow);
            close("weights", &c_fast.weights, &c_slow.weights);
            let (mut p_inf, mut w_inf) = (Vec::new(), Vec::new());
            fast.infer(&q, &keys, &offsets, None, &mut p_inf, &mut w_inf);
            // Dice infers with its moving averages, not the batch's moments.
            let (p_slow_inf, c_slow_inf) = slow.forward_layered(&q, &keys, &offsets, Mode::Infer);
            close("inferred pooled", &p_inf, &p_slow_inf);
            close("inferred weights", &w_inf, &c_slow_inf.weights);
            if activation != ActivationKind::Dice {
                assert_eq!(p_slow_inf, p_slow, "{name}: row-wise, the modes agree");
            }
            let (dq_fast, dk_fast) = fast.backward(&q, &keys, &mut c_fast, &dpooled);
            let (dq_slow, dk_slow) = slow.backward_layered(&q, &keys, &c_slow, &dpooled);
            close("dq", &dq_fast, &dq_slow);
            close("dk", &dk_fast, &dk_slow);
            fast.update_statistics(&c_fast);
            slow.update_statistics(&c_slow);
            let mut grads = Vec::new();
            slow.visit("att", &mut |name, p| {
                grads.push((name, p.value.clone(), p.grad.clone()))
            });
            let mut i = 0;
            fast.visit("att", &mut |tensor, p| {
                assert_eq!(tensor, grads[i].0);
                close(&tensor, &p.grad, &grads[i].2);
                // Dice's moving averages moved by the same batch moments.
                close(&format!("{tensor} value"), &p.value, &grads[i].1);
                i += 1;
            });
            if activation == ActivationKind::Dice {
                let mean = fast.first.activation.running_mean.as_ref().map(|p| p.value[0]);
                assert_ne!(mean, Some(0.1), "{name}: the moving mean moved");
            }
        }
    }

    /// Mixed-precision training in the chunked path: its passes match the
    /// layer-by-layer path's (whose bf16 products are the MLP's, tested
    /// against rounded operands in `mlp.rs`) to 1e-5 in norm (measured: at
    /// most 2.5e-6), while they are further than 1e-4 from FP32's
    /// (measured: 5e-4 to 6e-2): the chunks did multiply hidden layers
    /// `1..` in bf16, forward (`x·W_l`) and backward (`xᵀ·dy` for `dW_l`,
    /// `dy·W_lᵀ` for the layers below).
    #[test]
    fn mixed_precision_chunked_training_matches_the_layered_path() {
        let d = 4;
        let offsets = ragged_offsets(70, 7, 41);
        let (b, n) = (offsets.len() - 1, offsets[offsets.len() - 1] as usize);
        assert!(n > 2 * chunked::CHUNK_ROWS_TRAIN, "{n} rows");
        let (q, keys, dpooled) = (rand_vec(b * d, 41), rand_vec(n * d, 42), rand_vec(b * d, 43));
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let rel = |a: &[f32], b: &[f32]| {
            let diff = norm(&mut a.iter().zip(b).map(|(x, y)| f64::from(x - y)));
            diff / norm(&mut b.iter().map(|&y| f64::from(y))).max(1e-30)
        };
        for (activation, normalization) in [
            (ActivationKind::Prelu, Normalization::None),
            (ActivationKind::Dice, Normalization::Softmax),
        ] {
            let mut fp32 = unit(d, &[16, 12, 8], activation, normalization, 44);
            let mut fast = fp32.clone();
            fast.rest.products = Kernel::Emulated;
            let mut slow = fast.clone();
            let (p_fast, mut c_fast) = fast.forward(&q, &keys, &offsets, Mode::Train);
            assert_eq!(c_fast.path, Path::Chunked);
            let (p_slow, c_slow) = slow.forward_layered(&q, &keys, &offsets, Mode::Train);
            let (p32, mut c32) = fp32.forward(&q, &keys, &offsets, Mode::Train);
            let (dq_fast, dk_fast) = fast.backward(&q, &keys, &mut c_fast, &dpooled);
            let (dq_slow, dk_slow) = slow.backward_layered(&q, &keys, &c_slow, &dpooled);
            let (dq32, dk32) = fp32.backward(&q, &keys, &mut c32, &dpooled);
            let mut tensors = vec![
                ("pooled".to_string(), p_fast, p_slow, p32),
                ("dq".to_string(), dq_fast, dq_slow, dq32),
                ("dk".to_string(), dk_fast, dk_slow, dk32),
            ];
            let grads = |att: &Attention| {
                let mut g = Vec::new();
                att.visit("att", &mut |name, p| {
                    if !p.grad.is_empty() {
                        g.push((name, p.grad.clone()))
                    }
                });
                g
            };
            for (((name, f), (_, s)), (_, x)) in grads(&fast).into_iter().zip(grads(&slow)).zip(grads(&fp32)) {
                tensors.push((name, f, s, x));
            }
            for (name, fast, slow, fp32) in &tensors {
                // The score bias's gradient, the sum of the score gradients,
                // is zero but for rounding under softmax.
                if name.ends_with("output.bias") {
                    continue;
                }
                let (to_layered, to_fp32) = (rel(fast, slow), rel(fast, fp32));
                assert!(
                    to_layered <= 1e-5,
                    "{activation:?} {name}: {to_layered} from the layered path"
                );
                assert!(to_fp32 >= 1e-4, "{activation:?} {name}: only {to_fp32} from fp32");
            }
        }
    }

    /// Dice in training through several chunks: the gradients through the
    /// batch mean and variance (of every row, so of every key and query)
    /// match central differences of the pooled histories.
    #[test]
    fn dice_batch_statistics_across_chunks_match_finite_differences() {
        let d = 2;
        // 130 samples of 0..=36 behaviours: about 2,300 rows, two chunks.
        let offsets = ragged_offsets(130, 13, 37);
        let (b, n) = (offsets.len() - 1, offsets[offsets.len() - 1] as usize);
        assert!(n > 2 * chunked::CHUNK_ROWS_DICE, "{n} rows");
        let q = rand_vec(b * d, 51);
        let keys = rand_vec(n * d, 52);
        let r = rand_vec(b * d, 53);
        for normalization in [Normalization::None, Normalization::Softmax] {
            let mut att = unit(d, &[5, 3], ActivationKind::Dice, normalization, 54);
            att.visit_mut("att", &mut |name, p| {
                if name.ends_with("alpha") {
                    p.value
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = 0.2 - 0.1 * i as f32);
                }
                if name.ends_with("bias") {
                    p.value.iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f32);
                }
            });
            let loss = |a: &Attention, q: &[f32], k: &[f32]| dot(&r, &a.forward(q, k, &offsets, Mode::Train).0);
            let (_, mut cache) = att.forward(&q, &keys, &offsets, Mode::Train);
            assert_eq!(cache.chunked.batch_moments.len(), 2, "both layers took batch moments");
            assert_eq!(cache.chunked.batch_moments[0].rows, n);
            let (dq, dk) = att.backward(&q, &keys, &mut cache, &r);
            let name = format!("Dice/{normalization:?}");
            let eps = 2e-3;
            assert_close(
                &format!("{name} dq"),
                &dq,
                &numeric_grad(&q, eps, |q| loss(&att, q, &keys)),
                1e-2,
            );
            assert_close(
                &format!("{name} dk"),
                &dk,
                &numeric_grad(&keys, eps, |k| loss(&att, &q, k)),
                1e-2,
            );
            let mut tensors = Vec::new();
            att.visit("att", &mut |tensor, p| {
                if !p.grad.is_empty() {
                    tensors.push((tensor, p.value.clone(), p.grad.clone()));
                }
            });
            assert_eq!(
                tensors.len(),
                8,
                "two layers' weight, bias and alpha, the score layer's two"
            );
            for (tensor, value, grad) in tensors {
                let numeric = numeric_grad(&value, eps, |v| {
                    let mut a = att.clone();
                    a.visit_mut("att", &mut |t, p| {
                        if t == tensor {
                            p.value = v.to_vec();
                        }
                    });
                    loss(&a, &q, &keys)
                });
                assert_close(&format!("{name} {tensor}"), &grad, &numeric, 1e-2);
            }
        }
    }

    /// Chunks are reduced in chunk order, never in the order threads finish
    /// them: the pooled histories, weights, gradients and Dice's moving
    /// averages are bitwise the same with 1, 2 and 3 threads, Dice in
    /// training (passes with batch-wide reductions between them) included.
    #[test]
    fn chunked_training_is_bitwise_the_same_for_any_thread_count() {
        let d = 4;
        let offsets = ragged_offsets(400, 7, 41);
        let (b, n) = (offsets.len() - 1, offsets[offsets.len() - 1] as usize);
        assert!(n > 6 * chunked::CHUNK_ROWS_DICE, "{n} rows: several chunks a thread");
        let q = rand_vec(b * d, 61);
        let keys = rand_vec(n * d, 62);
        let dpooled = rand_vec(b * d, 63);
        for (activation, normalization, products) in [
            (ActivationKind::Dice, Normalization::None, Kernel::Fp32),
            (ActivationKind::Dice, Normalization::Softmax, Kernel::Fp32),
            (ActivationKind::Prelu, Normalization::None, Kernel::Fp32),
            // Mixed-precision training.
            (ActivationKind::Prelu, Normalization::None, Kernel::Emulated),
            (ActivationKind::Dice, Normalization::Softmax, Kernel::Emulated),
        ] {
            let runs: Vec<Vec<u32>> = [1, 2, 3]
                .into_iter()
                .map(|threads| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("a thread pool");
                    let mut att = unit(d, &[16, 8], activation, normalization, 64);
                    att.rest.products = products;
                    let mut bits: Vec<u32> = Vec::new();
                    pool.install(|| {
                        let (pooled, mut cache) = att.forward(&q, &keys, &offsets, Mode::Train);
                        let (dq, dk) = att.backward(&q, &keys, &mut cache, &dpooled);
                        att.update_statistics(&cache);
                        for v in [&pooled, &cache.weights, &dq, &dk] {
                            bits.extend(v.iter().map(|x| x.to_bits()));
                        }
                    });
                    att.visit("att", &mut |_, p| {
                        bits.extend(p.value.iter().chain(&p.grad).map(|x| x.to_bits()));
                    });
                    bits
                })
                .collect();
            assert!(runs[0].len() > 2 * n, "{}", runs[0].len());
            assert!(
                runs[1..].iter().all(|r| r == &runs[0]),
                "{activation:?}/{normalization:?}/{products:?}: the result depends on the thread count"
            );
        }
    }

    /// Sharing the history term between candidates with the same history
    /// (the common-feature trick) changes nothing but the rounding.
    #[test]
    fn shared_histories_give_the_same_scores() {
        let d = 3;
        // Users with histories of 0..=45 behaviours and 1..=7 candidates each.
        let (mut offsets, mut keys, mut same) = (vec![0u32], Vec::new(), Vec::new());
        for user in 0..40usize {
            let history = rand_vec((user * 13 % 46) * d, 100 + user as u64);
            for c in 0..1 + user % 7 {
                keys.extend_from_slice(&history);
                offsets.push(offsets[offsets.len() - 1] + (history.len() / d) as u32);
                same.push(c > 0);
            }
        }
        let b = offsets.len() - 1;
        assert!(offsets[b] as usize > 4 * chunked::CHUNK_ROWS_INFER, "several chunks");
        let q = rand_vec(b * d, 7);
        for activation in [ActivationKind::Prelu, ActivationKind::Dice] {
            let mut att = unit(d, &[10, 4], activation, Normalization::Softmax, 8);
            att.visit_mut("att", &mut |name, p| {
                if name.ends_with("alpha") || name.ends_with("running_mean") {
                    p.value
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = 0.1 + 0.01 * i as f32);
                }
            });
            let (mut p0, mut w0, mut p1, mut w1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            att.infer(&q, &keys, &offsets, None, &mut p0, &mut w0);
            att.infer(&q, &keys, &offsets, Some(&same), &mut p1, &mut w1);
            let (p2, c2) = att.forward_layered(&q, &keys, &offsets, Mode::Infer);
            for (what, a, b) in [
                ("shared pooled", &p1, &p0),
                ("shared weights", &w1, &w0),
                ("pooled", &p0, &p2),
                ("weights", &w0, &c2.weights),
            ] {
                for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "{activation:?} {what}[{i}]: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "used once")]
    fn a_cache_serves_one_backward_pass() {
        let mut att = Attention::new(
            2,
            &AttentionConfig::default(),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(5),
        );
        let (q, keys) = (rand_vec(2, 1), rand_vec(4, 2));
        let (_, mut cache) = att.forward(&q, &keys, &[0, 2], Mode::Train);
        att.backward(&q, &keys, &mut cache, &[1.0, 1.0]);
        att.backward(&q, &keys, &mut cache, &[1.0, 1.0]);
    }

    /// Scores far outside exp's range (e^1000 overflows, e^-1000 is 0): the
    /// max subtraction keeps the softmax finite and exact.
    #[test]
    fn softmax_is_exact_for_scores_exp_cannot_hold() {
        let e = std::f64::consts::E;
        let (lo, hi) = ((1.0 / (1.0 + e)) as f32, (e / (1.0 + e)) as f32);
        for base in [1000.0f32, -1001.0, 0.0] {
            let mut x = [base, base + 1.0];
            softmax_in_place(&mut x);
            assert!((x[0] - lo).abs() < 1e-6 && (x[1] - hi).abs() < 1e-6, "{base}: {x:?}");
        }
        let mut one = [88.9f32];
        softmax_in_place(&mut one);
        assert_eq!(one, [1.0]);
    }

    #[test]
    fn softmax_weights_sum_to_one_per_sample() {
        let att = unit(2, &[4], ActivationKind::Prelu, Normalization::Softmax, 5);
        let (_, cache) = att.forward(&rand_vec(4, 1), &rand_vec(8, 2), &[0, 1, 4], Mode::Infer);
        assert!((cache.weights[0] - 1.0).abs() < 1e-6);
        assert!((cache.weights[1..].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
