//! The chunk-parallel path of the local activation unit.
//!
//! The batch is cut into chunks of whole samples holding about
//! [`CHUNK_ROWS_TRAIN`] (training) or [`CHUNK_ROWS_INFER`] behaviours. Rayon runs one task per chunk, and each task
//! uses single-threaded matrix products, so a chunk's activations stay in its
//! core's cache from one layer to the next; bias, activation, scoring,
//! normalisation and pooling are done in the same pass over the chunk.
//! Chunks depend on the batch alone and the per-chunk weight gradients are
//! summed in chunk order, so results do not depend on the number of threads.
//!
//! This path serves every configuration whose activations are row-wise in the
//! given mode (see [`Activation::is_rowwise`](crate::model::Activation::is_rowwise)):
//! all of them at inference, and all but Dice in training, whose batch
//! statistics couple the rows (that case takes the layer-by-layer path).

use std::cell::RefCell;

use rayon::prelude::*;

use super::{softmax_in_place, Attention};
use crate::model::linalg::serial;
use crate::model::mlp::Block;
use crate::model::{Mode, Rowwise};
use crate::schema::Normalization;

/// Behaviours per training task, about: the chunk's activations (about
/// 3.6 KiB per behaviour for the tutorial's (256,128,64) unit) stay in a
/// core's L2. Measured with `din bench run` (2 threads): 512 and larger
/// train at the same speed, 128 is 15% slower (more partial gradients).
pub(super) const CHUNK_ROWS_TRAIN: usize = 512;
/// Behaviours per inference task: nothing is kept between chunks, and
/// smaller chunks balance the two cores better on small requests
/// (1 x 200 latency 3.3 ms at 256 against 5.8 ms at 512).
pub(super) const CHUNK_ROWS_INFER: usize = 256;

thread_local! {
    /// Inference scratch of each worker thread: nothing is kept between
    /// chunks, so memory does not grow with the batch.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Buffers of the chunked path, reused from one batch to the next.
#[derive(Debug, Clone, Default)]
pub(super) struct ChunkedState {
    /// First sample of each chunk, then the batch size.
    bounds: Vec<usize>,
    /// The batch's history offsets, `[B + 1]`.
    offsets: Vec<u32>,
    /// `Wq + Wd`, `[D, H1]`.
    wq: Vec<f32>,
    /// `[Wk - Wd; Wp]`, `[2D, H1]`: the first layer's weight on `[k, q*k]`.
    wkp: Vec<f32>,
    /// Training only: per behaviour, `[k, q*k]`, each hidden layer's
    /// pre-activation and output, and the score's gradient (see [`Layout`]).
    region: Vec<f32>,
    /// `[B, H1]`: `q·Wq' + b1` in the forward pass, `Σ_t dpre1_t` in the backward pass.
    per_sample: Vec<f32>,
    /// Weight gradients of each chunk (laid out by `Layout::grad_offsets`).
    partial: Vec<Vec<f32>>,
    /// Inference with shared histories: `k·(Wk - Wd)` of every history that
    /// two or more consecutive samples share, computed once for all of
    /// them, whichever chunks they fall in (`[rows, H1]`, history by history).
    shared_k1: Vec<f32>,
    /// Per sample: where its history's rows start in `shared_k1`, or
    /// `usize::MAX` when its history is its own.
    shared_at: Vec<usize>,
}

/// Where the values of one behaviour row live in a chunk's region: the chunk
/// stores `[k, q*k]` for all its rows, then each hidden layer's pre-activation
/// and output, then the score gradients, each block `[rows, width]`.
/// It also places each layer's gradients in a chunk's gradient buffer.
struct Layout {
    d: usize,
    widths: Vec<usize>,
    /// Start of each hidden layer's gradients in a chunk's gradient buffer,
    /// then of the score layer's, then the total length. Layer 0 holds
    /// `d[Wk'; Wp]` `[2D, H1]`, `dWq'` `[D, H1]`, `db1`, `dalpha1`; layer `l`
    /// holds `dW_l`, `db_l`, `dalpha_l`; the score layer `dw_out`, `db_out`.
    grad_offsets: Vec<usize>,
}

impl Layout {
    fn new(att: &Attention) -> Self {
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
            widths,
            grad_offsets,
        }
    }

    /// Floats per behaviour row.
    fn row_width(&self) -> usize {
        2 * self.d + 2 * self.widths.iter().sum::<usize>() + 1
    }

    /// Offset (in floats, for a chunk of `n` rows) of hidden layer `l`'s
    /// pre-activation; its output follows at `+ n * widths[l]`.
    fn layer(&self, l: usize, n: usize) -> usize {
        n * (2 * self.d + 2 * self.widths[..l].iter().sum::<usize>())
    }
}

/// What every chunk of one pass shares.
struct Shared<'a> {
    att: &'a Attention,
    /// Each hidden layer's activation, its per-channel parameters gathered once.
    acts: Vec<Rowwise<'a>>,
    layout: &'a Layout,
    wq: &'a [f32],
    wkp: &'a [f32],
    offsets: &'a [u32],
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
}

impl<'a> Shared<'a> {
    /// A training pass (keeping what the backward pass needs, no shared histories).
    fn new(
        att: &'a Attention,
        layout: &'a Layout,
        wq: &'a [f32],
        wkp: &'a [f32],
        offsets: &'a [u32],
        q: &'a [f32],
        keys: &'a [f32],
    ) -> Self {
        Shared {
            att,
            acts: att
                .hidden()
                .map(|b| b.activation.rowwise(b.linear.output_dim()))
                .collect(),
            layout,
            wq,
            wkp,
            offsets,
            q,
            keys,
            same_history: None,
            shared_k1: &[],
            shared_at: &[],
            keep: true,
        }
    }

    /// Samples `s0..s1` and their behaviour rows.
    fn rows(&self, s0: usize, s1: usize) -> (usize, usize) {
        (self.offsets[s0] as usize, self.offsets[s1] as usize)
    }

    /// `[k, q*k]` for every behaviour of samples `s0..s1`, `[n, 2D]`.
    fn fill_kq(&self, s0: usize, s1: usize, kq: &mut [f32]) {
        let d = self.layout.d;
        let base = self.offsets[s0] as usize;
        for s in s0..s1 {
            let qs = &self.q[s * d..(s + 1) * d];
            for t in self.offsets[s] as usize..self.offsets[s + 1] as usize {
                let k = &self.keys[t * d..(t + 1) * d];
                let row = &mut kq[(t - base) * 2 * d..(t - base + 1) * 2 * d];
                row[..d].copy_from_slice(k);
                row[d..]
                    .iter_mut()
                    .zip(qs.iter().zip(k))
                    .for_each(|(o, (a, b))| *o = a * b);
            }
        }
    }

    /// Forward pass of samples `s0..s1`: writes their attention weights
    /// (`[n]`), pooled histories (`[s1-s0, D]`) and fills `region`. With
    /// `same_history`, `k1` (at least `[n, H1]`) holds the history term.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        s0: usize,
        s1: usize,
        region: &mut [f32],
        k1: &mut [f32],
        aq: &mut [f32],
        weights: &mut [f32],
        pooled: &mut [f32],
    ) {
        let (d, att) = (self.layout.d, self.att);
        let (r0, r1) = self.rows(s0, s1);
        let (n, bc) = (r1 - r0, s1 - s0);
        let (kq, mut rest) = region.split_at_mut(n * 2 * d);
        self.fill_kq(s0, s1, kq);
        // q·Wq' + b1, once per sample.
        let h1 = self.layout.widths[0];
        for a in aq.chunks_exact_mut(h1) {
            a.copy_from_slice(&att.first.linear.bias.value);
        }
        serial::matmul(bc, d, h1, &self.q[s0 * d..s1 * d], self.wq, aq, true); // [bc, H1]

        let mut input: &[f32] = kq;
        let mut width_in = 2 * d;
        for (l, block) in att.hidden().enumerate() {
            let h = block.linear.output_dim();
            let (pre, tail) = std::mem::take(&mut rest).split_at_mut(n * h);
            let (out, tail) = tail.split_at_mut(n * h);
            rest = tail;
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
            } else if l == 0 {
                // pre1_t = [k_t, q_b*k_t]·[Wk'; Wp] + (q_b·Wq' + b1)
                serial::matmul(n, 2 * d, h, input, self.wkp, pre, false); // [n, H1]
                for s in s0..s1 {
                    let (t0, t1) = self.rows(s, s + 1);
                    let rows = (t0 - r0) * h..(t1 - r0) * h;
                    let a = &aq[(s - s0) * h..(s - s0 + 1) * h];
                    if self.keep {
                        act.add_bias_apply(&mut pre[rows.clone()], a, &mut out[rows]);
                    } else {
                        act.add_apply_in_place(&mut pre[rows], None, a);
                    }
                }
                input = if self.keep { out } else { pre };
            } else {
                serial::matmul(n, width_in, h, input, &block.linear.weight.value, pre, false); // [n, h]
                if self.keep {
                    act.add_bias_apply(pre, bias, out);
                    input = out;
                } else {
                    act.add_apply_in_place(pre, None, bias);
                    input = pre;
                }
            }
            width_in = h;
        }
        // Scores, normalisation, pooling.
        let (w_out, b_out) = (&att.output.weight.value, att.output.bias.value[0]);
        for (w, h) in weights.iter_mut().zip(input.chunks_exact(width_in)) {
            *w = dot(h, w_out) + b_out;
        }
        pooled.iter_mut().for_each(|p| *p = 0.0);
        for s in s0..s1 {
            let (t0, t1) = self.rows(s, s + 1);
            let ws = &mut weights[t0 - r0..t1 - r0];
            if att.normalization == Normalization::Softmax {
                softmax_in_place(ws);
            }
            let p = &mut pooled[(s - s0) * d..(s - s0 + 1) * d];
            for (t, &w) in (t0..t1).zip(ws.iter()) {
                p.iter_mut()
                    .zip(&self.keys[t * d..(t + 1) * d])
                    .for_each(|(p, k)| *p += w * k);
            }
        }
    }

    /// Backward pass of samples `s0..s1` from their `dpooled` (`[bc, D]`):
    /// writes `dq` (`[bc, D]`) and `dk` (`[n, D]`), adds the weight
    /// gradients to `grads`. Consumes `region` (it is reused for gradients).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        s0: usize,
        s1: usize,
        region: &mut [f32],
        ds: &mut [f32],
        weights: &[f32],
        dpooled: &[f32],
        grads: &mut [f32],
        dq: &mut [f32],
        dk: &mut [f32],
    ) {
        let (d, att, lay) = (self.layout.d, self.att, self.layout);
        let (r0, r1) = self.rows(s0, s1);
        let (n, bc) = (r1 - r0, s1 - s0);
        let layers = lay.widths.len();
        let score_at = lay.layer(layers, n);
        let (region, dscore) = region.split_at_mut(score_at);
        let dscore = &mut dscore[..n];
        // Pooling: pooled_b = Σ_t w_t k_t.
        for s in s0..s1 {
            let g = &dpooled[(s - s0) * d..(s - s0 + 1) * d];
            let (t0, t1) = self.rows(s, s + 1);
            for t in t0..t1 {
                let k = &self.keys[t * d..(t + 1) * d];
                dscore[t - r0] = g.iter().zip(k).map(|(a, b)| a * b).sum();
                let w = weights[t - r0];
                dk[(t - r0) * d..(t - r0 + 1) * d]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(o, g)| *o = w * g);
            }
            if att.normalization == Normalization::Softmax {
                let (w, g) = (&weights[t0 - r0..t1 - r0], &mut dscore[t0 - r0..t1 - r0]);
                let dot: f32 = w.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
                g.iter_mut().zip(w).for_each(|(g, w)| *g = w * (*g - dot));
            }
        }
        // Score layer: score_t = h_t·w_out + b_out.
        let offsets = &lay.grad_offsets;
        let h_last = lay.widths[layers - 1];
        let out_last = &mut region[lay.layer(layers - 1, n) + n * h_last..];
        {
            let (gw, gb) = grads[offsets[layers]..offsets[layers] + h_last + 1].split_at_mut(h_last);
            for (h, &g) in out_last.chunks_exact(h_last).zip(dscore.iter()) {
                gw.iter_mut().zip(h).for_each(|(a, h)| *a += h * g);
                gb[0] += g;
            }
            let w_out = &att.output.weight.value;
            for (h, &g) in out_last.chunks_exact_mut(h_last).zip(dscore.iter()) {
                h.iter_mut().zip(w_out).for_each(|(h, w)| *h = g * w); // dh_last
            }
        }
        // Hidden layers, last to first; layer l's output slot holds dh_l on entry.
        for l in (0..layers).rev() {
            let block = if l == 0 { &att.first } else { &att.rest.blocks[l - 1] };
            let h = lay.widths[l];
            let at = lay.layer(l, n);
            let (below, here) = region.split_at_mut(at);
            let (pre, out) = here.split_at_mut(n * h);
            let g = &mut out[..n * h];
            let width_in = if l == 0 { 2 * d } else { lay.widths[l - 1] };
            let input = &mut below[at - n * width_in..]; // previous output, or [k, q*k]
            let o = offsets[l];
            let gl = &mut grads[o..offsets[l + 1]];
            let (gw, gl) = gl.split_at_mut(if l == 0 { 3 * d * h } else { width_in * h });
            let (gb, ga) = gl.split_at_mut(h);
            self.acts[l].backward(pre, g, ga); // g = dpre_l
            for row in g.chunks_exact(h) {
                gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            if l == 0 {
                let (gwkp, gwq) = gw.split_at_mut(2 * d * h);
                serial::matmul_at_b(2 * d, n, h, input, g, gwkp, true); // d[Wk'; Wp]
                                                                        // ds_b = Σ_{t of b} dpre1_t, for the once-per-sample q term.
                for s in s0..s1 {
                    let dsb = &mut ds[(s - s0) * h..(s - s0 + 1) * h];
                    dsb.iter_mut().for_each(|v| *v = 0.0);
                    let (t0, t1) = self.rows(s, s + 1);
                    for row in g[(t0 - r0) * h..(t1 - r0) * h].chunks_exact(h) {
                        dsb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                    }
                }
                serial::matmul_at_b(d, bc, h, &self.q[s0 * d..s1 * d], ds, gwq, true); // dWq'
                serial::matmul_a_bt(bc, h, d, ds, self.wq, dq, false); // [bc, D]
                serial::matmul_a_bt(n, h, 2 * d, g, self.wkp, input, false); // d[k, q*k]
            } else {
                serial::matmul_at_b(width_in, n, h, input, g, gw, true); // dW_l
                serial::matmul_a_bt(n, h, width_in, g, &block.linear.weight.value, input, false);
                // dh_{l-1}
            }
        }
        // [k, q*k] -> k and q.
        let dkq = &region[..n * 2 * d];
        for s in s0..s1 {
            let qs = &self.q[s * d..(s + 1) * d];
            let dqs = &mut dq[(s - s0) * d..(s - s0 + 1) * d];
            let (t0, t1) = self.rows(s, s + 1);
            for t in t0..t1 {
                let row = &dkq[(t - r0) * 2 * d..(t - r0 + 1) * 2 * d];
                let k = &self.keys[t * d..(t + 1) * d];
                let dkt = &mut dk[(t - r0) * d..(t - r0 + 1) * d];
                for j in 0..d {
                    dkt[j] += row[j] + row[d + j] * qs[j];
                    dqs[j] += row[d + j] * k[j];
                }
            }
        }
    }
}

/// `a·b` with 8 partial sums, so that it vectorises (a plain sum of f32 is
/// kept in order by the compiler and runs one element at a time).
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_pieces<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lens.map(|len| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        buf = tail;
        head
    })
    .collect()
}

/// Grows `v` to at least `len` elements (never shrinks: buffers are reused)
/// and returns its first `len`.
fn at_least(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

impl Attention {
    /// The hidden layers, first to last.
    pub(super) fn hidden(&self) -> impl Iterator<Item = &Block> {
        std::iter::once(&self.first).chain(self.rest.blocks.iter())
    }

    /// Whether the chunked path computes this unit in `mode`.
    pub(super) fn chunkable(&self, mode: Mode) -> bool {
        self.pooling == crate::schema::Pooling::Attention && self.hidden().all(|b| b.activation.is_rowwise(mode))
    }

    /// Fills `st.shared_k1` / `st.shared_at`: for each run of two or more
    /// consecutive samples with one history (a request's candidates, a page
    /// view's), that history's `k·(Wk - Wd)`, once, in parallel over runs.
    /// Needs `st.wkp` set.
    fn shared_history_terms(
        &self,
        b: usize,
        keys: &[f32],
        offsets: &[u32],
        same_history: Option<&[bool]>,
        st: &mut ChunkedState,
    ) {
        let (d, h1) = self.dims();
        st.shared_at.clear();
        st.shared_k1.clear();
        let Some(same) = same_history else { return };
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
            let (t0, t1) = (offsets[s] as usize, offsets[s + 1] as usize);
            if t1 > t0 {
                serial::matmul(t1 - t0, d, h1, &keys[t0 * d..t1 * d], wk, out, false);
                // [len, H1]
            }
        });
    }

    /// Chunked forward pass (see the module documentation): writes the
    /// pooled histories `[B, D]` and the attention weights `[N]`. With `keep`,
    /// `st` keeps what [`Attention::backward_chunked`] needs; without, each
    /// worker thread computes its chunks in a scratch buffer of its own.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_chunked(
        &self,
        q: &[f32],
        keys: &[f32],
        offsets: &[u32],
        keep: bool,
        same_history: Option<&[bool]>,
        st: &mut ChunkedState,
        pooled: &mut Vec<f32>,
        weights: &mut Vec<f32>,
    ) {
        let (d, h1) = self.dims();
        let b = offsets.len() - 1;
        let n = offsets[b] as usize;
        let layout = Layout::new(self);
        // The split first layer's weights.
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
        st.offsets.clear();
        st.offsets.extend_from_slice(offsets);
        let chunk_rows = if keep { CHUNK_ROWS_TRAIN } else { CHUNK_ROWS_INFER };
        st.bounds.clear();
        st.bounds.push(0);
        for s in 0..b {
            if (offsets[s + 1] - offsets[st.bounds[st.bounds.len() - 1]]) as usize >= chunk_rows || s + 1 == b {
                st.bounds.push(s + 1);
            }
        }
        if b == 0 {
            st.bounds.clear();
        }
        pooled.clear();
        pooled.resize(b * d, 0.0);
        weights.clear();
        weights.resize(n, 0.0);
        let same_history = if keep { None } else { same_history };
        self.shared_history_terms(b, keys, offsets, same_history, st);
        let width = layout.row_width();
        let region = at_least(&mut st.region, if keep { n * width } else { 0 });
        let per_sample = at_least(&mut st.per_sample, b * h1);
        let shared = Shared {
            same_history,
            shared_k1: &st.shared_k1,
            shared_at: &st.shared_at,
            keep,
            ..Shared::new(self, &layout, &st.wq, &st.wkp, offsets, q, keys)
        };
        let chunks: Vec<(usize, usize)> = st.bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let rows = |&(s0, s1): &(usize, usize)| (offsets[s1] - offsets[s0]) as usize;
        let regions = split_pieces(region, chunks.iter().map(|c| if keep { rows(c) * width } else { 0 }));
        let aqs = split_pieces(per_sample, chunks.iter().map(|&(s0, s1)| (s1 - s0) * h1));
        let weights = split_pieces(weights, chunks.iter().map(rows));
        let pooled = split_pieces(pooled, chunks.iter().map(|&(s0, s1)| (s1 - s0) * d));
        chunks
            .into_par_iter()
            .zip(regions)
            .zip(aqs)
            .zip(weights)
            .zip(pooled)
            .for_each(|(((((s0, s1), region), aq), weights), pooled)| {
                if keep {
                    shared.forward(s0, s1, region, &mut [], aq, weights, pooled);
                } else {
                    SCRATCH.with(|scratch| {
                        let mut scratch = scratch.borrow_mut();
                        let n = (offsets[s1] - offsets[s0]) as usize;
                        let k1 = if shared.same_history.is_some() { n * h1 } else { 0 };
                        let (region, k1) = at_least(&mut scratch, n * width + k1).split_at_mut(n * width);
                        shared.forward(s0, s1, region, k1, aq, weights, pooled);
                    });
                }
            });
    }

    /// Chunked backward pass after a training [`Attention::forward_chunked`];
    /// writes `dq` (`[B, D]`) and `dk` (`[N, D]`).
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
        let layout = Layout::new(self);
        let offsets = &st.offsets;
        let b = offsets.len() - 1;
        let n = offsets[b] as usize;
        let width = layout.row_width();
        let grad_offsets = &layout.grad_offsets;
        let grad_len = grad_offsets[grad_offsets.len() - 1];
        let chunks: Vec<(usize, usize)> = st.bounds.windows(2).map(|w| (w[0], w[1])).collect();
        st.partial.resize_with(chunks.len().max(1), Vec::new);
        for p in &mut st.partial {
            p.clear();
            p.resize(grad_len, 0.0);
        }
        dq.clear();
        dq.resize(b * d, 0.0);
        dk.clear();
        dk.resize(n * d, 0.0);
        let rows = |&(s0, s1): &(usize, usize)| (offsets[s1] - offsets[s0]) as usize;
        let regions = split_pieces(&mut st.region[..n * width], chunks.iter().map(|c| rows(c) * width));
        let dss = split_pieces(
            &mut st.per_sample[..b * h1],
            chunks.iter().map(|&(s0, s1)| (s1 - s0) * h1),
        );
        let dqs = split_pieces(dq, chunks.iter().map(|&(s0, s1)| (s1 - s0) * d));
        let dks = split_pieces(dk, chunks.iter().map(|c| rows(c) * d));
        let shared = Shared::new(self, &layout, &st.wq, &st.wkp, offsets, q, keys);
        chunks
            .par_iter()
            .zip(regions)
            .zip(dss)
            .zip(st.partial.par_iter_mut())
            .zip(dqs)
            .zip(dks)
            .for_each(|(((((&(s0, s1), region), ds), grads), dq), dk)| {
                let (r0, r1) = shared.rows(s0, s1);
                shared.backward(
                    s0,
                    s1,
                    region,
                    ds,
                    &weights[r0..r1],
                    &dpooled[s0 * d..s1 * d],
                    grads,
                    dq,
                    dk,
                );
            });
        // Sum the chunks in order (deterministic), then add to the parameters.
        let (total, others) = st.partial.split_at_mut(1);
        let total = &mut total[0];
        for p in others.iter().take(chunks.len().saturating_sub(1)) {
            total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        self.add_chunk_grads(total, grad_offsets);
    }

    /// Adds gradients laid out as by `Layout::grad_offsets` to the parameters.
    fn add_chunk_grads(&mut self, g: &[f32], offsets: &[usize]) {
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
