//! FP32 products for the attention unit's training pass with the layer's
//! work fused in: each `6 x 64` tile of the result leaves the registers
//! through an epilogue that adds the bias and applies PReLU or ReLU
//! (forward), or applies the activation's backward pass and sums the bias
//! and slope gradients (backward), so that no separate pass reads the
//! product back. The weights are packed once per batch into panels of 64
//! columns ([`Panels`]) instead of once per product, and the other operand is
//! read in place. Long inner dimensions go in blocks of [`KC`], so that the
//! block of a panel that every strip of rows runs over stays in L1 (a
//! whole panel of a 256-wide layer is 64 KiB, more than L1 holds). Each
//! tile asks for the lines of the next strip's epilogue before it sums: a
//! training pass's buffers are tens of MiB, out of L2.
//!
//! Hand-written because no maintained crate offers what this needs: the
//! `gemm` crate the rest of the model uses runs its own kernels to the end
//! and repacks both operands on every call, with no hook between the sums
//! and the store. AVX-512 only ([`available`]); elsewhere the model keeps
//! the `gemm` products and the separate passes.
//!
//! Each output element is one chain of fused multiply-adds over the inner
//! dimension in order, as in `gemm`'s kernels (between blocks its sum is
//! stored and reloaded exactly); the epilogues do the
//! activations' arithmetic in the order of [`super::activation::Rowwise`],
//! and add the bias and slope gradients row by row, as it does.

#[cfg(target_arch = "x86_64")]
use super::activation::wide::{Channels, PartialSums};
use super::activation::Rowwise;

/// Columns per panel: four AVX-512 vectors.
pub(crate) const NR: usize = 64;
/// Rows per tile: 6 x 4 accumulators, 4 vectors of the panel and a
/// broadcast fill 29 of the 32 vector registers.
const MR: usize = 6;

/// Inner indices per block: a block of a panel (`KC x NR`, 32 KiB) stays
/// in L1 while every strip of rows runs over it; between blocks the sums
/// wait in the epilogue's [`Epilogue::partial`] (each element stays one
/// chain of fused multiply-adds, stored and reloaded exactly).
const KC: usize = 128;

/// Whether this CPU runs these products (AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[k, n]` matrix packed for [`product`]: panels of [`NR`] columns, each
/// `k` rows of its width rounded up to 16 (zero padded), panel after panel.
#[derive(Debug, Clone, Default)]
pub(crate) struct Panels {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl Panels {
    /// Packs `b[p, j] = b[p * rs + j * cs]`, `[k, n]`: `(n, 1)` for a
    /// row-major matrix, `(1, k)` for the transpose of a row-major `[n, k]`.
    ///
    /// # Panics
    /// If `b` is too short for the shape and strides.
    pub(crate) fn pack(&mut self, k: usize, n: usize, b: &[f32], (rs, cs): (usize, usize)) {
        assert!(
            k == 0 || n == 0 || (k - 1) * rs + (n - 1) * cs < b.len(),
            "packed matrix shape mismatch"
        );
        self.k = k;
        self.n = n;
        self.data.clear();
        for j0 in (0..n).step_by(NR) {
            let (w, start) = ((n - j0).min(NR), self.data.len());
            let pw = w.next_multiple_of(16);
            self.data.resize(start + k * pw, 0.0);
            let panel = &mut self.data[start..];
            if cs == 1 {
                for (p, row) in panel.chunks_exact_mut(pw).enumerate() {
                    row[..w].copy_from_slice(&b[p * rs + j0..p * rs + j0 + w]);
                }
            } else {
                // Column by column: each reads along `b`'s rows.
                for j in 0..w {
                    for p in 0..k {
                        panel[p * pw + j] = b[p * rs + (j0 + j) * cs];
                    }
                }
            }
        }
    }
}

/// What is added to each row of the product before the activation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bias<'a> {
    /// The same vector for every row, `[n]`.
    Columns(&'a [f32]),
    /// One vector per sample, `[samples, n]`: row `i` belongs to the sample
    /// `s` with `offsets[s] <= r0 + i < offsets[s + 1]`, whose vector is
    /// `rows[(s - s0) * n..]`.
    Samples {
        rows: &'a [f32],
        offsets: &'a [u32],
        s0: usize,
        r0: usize,
    },
}

/// The forward epilogue: `pre = acc + bias`, `out = max(pre, 0) + α·min(pre, 0)`
/// (`α = 0`: ReLU), both `[m, n]` row-major.
#[derive(Debug)]
pub(crate) struct Forward<'a> {
    /// Added to each row.
    pub bias: Bias<'a>,
    /// PReLU's slopes `[n]`; `None` for ReLU.
    pub alpha: Option<&'a [f32]>,
    /// The pre-activation, `[m, n]`.
    pub pre: &'a mut [f32],
    /// The activation, `[m, n]`.
    pub out: &'a mut [f32],
}

/// The backward epilogue, the product being `dy = ∂L/∂out` of a PReLU or
/// ReLU layer: `g = dy` where `pre > 0`, else `α·dy`; `dalpha += dy·min(pre, 0)`
/// and `dbias += g`, row by row.
#[derive(Debug)]
pub(crate) struct Backward<'a> {
    /// The layer's pre-activation, `[m, n]`.
    pub pre: &'a [f32],
    /// PReLU's slopes `[n]`; `None` for ReLU.
    pub alpha: Option<&'a [f32]>,
    /// Receives `g = ∂L/∂pre`, `[m, n]`.
    pub g: &'a mut [f32],
    /// PReLU's slope gradient `[n]`, added to (ignored for ReLU).
    pub dalpha: &'a mut [f32],
    /// The bias gradient `[n]`, added to.
    pub dbias: &'a mut [f32],
    /// What the product after this one reads, `[m, w]` row-major (with
    /// `w`), asked for into L2 row by row as the strips go (a hint: it may
    /// be empty).
    pub next: (&'a [f32], usize),
}

/// The backward epilogue, the product being `dy = ∂L/∂out` of a Dice
/// layer in training, normalised by its batch's moments: the first half
/// of Dice's backward pass, as [`Rowwise::dice_backward_partial`] (same
/// operations, same order per channel, so the same bits): `g` gets the
/// gradient with the moments held fixed, and `dalpha`, `Σ gz` and `Σ gz·z`
/// are added to row by row.
#[derive(Debug)]
pub(crate) struct DiceBackward<'a> {
    /// Dice with the batch's moments ([`crate::model::Activation::rowwise_with_moments`]).
    pub act: &'a Rowwise<'a>,
    /// The layer's pre-activation, `[m, n]`.
    pub pre: &'a [f32],
    /// The sigmoids of the forward pass
    /// ([`Rowwise::dice_keeping_sigmoid`]) on entry, then `g`, `[m, n]`.
    pub g: &'a mut [f32],
    /// Receives the layer's output, recomputed from the pre-activation and
    /// the sigmoids ([`Rowwise::dice_from_sigmoid`], the same bits), `[m,
    /// n]`; before, the sums between blocks of a long inner dimension
    /// ([`Epilogue::partial`]; `g` holds the sigmoids).
    pub out: &'a mut [f32],
    /// Dice's slope gradient `[n]`, added to.
    pub dalpha: &'a mut [f32],
    /// `Σ gz` then `Σ gz·z`, `[2, n]`, added to.
    pub sums: &'a mut [f32],
}

/// Plain `c = a·b`, `[m, n]` row-major (the DNN's input gradient in a
/// chunked training step, and the tests' reference for the sums).
#[derive(Debug)]
pub(crate) struct Store<'a> {
    /// The product.
    pub c: &'a mut [f32],
}

/// `out = max(pre, 0) + α·min(pre, 0)` (`α = 0`: ReLU) for `[m, n]`
/// row-major `pre`, with the forward epilogue's arithmetic (so its bits).
///
/// # Panics
/// If the CPU lacks AVX-512F, or `out` or the slopes are shorter than
/// `pre`'s rows need.
pub(crate) fn activate(pre: &[f32], alpha: Option<&[f32]>, n: usize, out: &mut [f32]) {
    assert!(available(), "the fused f32 products need AVX-512F");
    assert!(
        n > 0 && out.len() >= pre.len() && pre.len().is_multiple_of(n) && alpha.is_none_or(|a| a.len() >= n),
        "activate: [{}] by rows of {n} into [{}]",
        pre.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted); every row of `pre` and `out`
    // and the slopes hold `n` values (asserted), and the masks keep the
    // loads and stores inside them.
    unsafe {
        avx512::activate(pre, alpha, n, out)
    }
}

/// `a[m, k]` (row `i` at `a[i * lda..]`) times `b`, each tile of the
/// result handed to `epilogue`.
///
/// # Panics
/// If the CPU lacks AVX-512F, or a buffer is too short for the shapes (a
/// [`Bias::Samples`] not covering rows `r0..r0 + m`, or not sorted).
pub(crate) fn product<E: Epilogue>(m: usize, a: &[f32], lda: usize, b: &Panels, epilogue: &mut E) {
    let (k, n) = (b.k, b.n);
    assert!(available(), "the fused f32 products need AVX-512F");
    assert!(
        lda >= k && (m == 0 || (m - 1) * lda + k <= a.len()),
        "fused product: a is shorter than [{m}, {k}] with row stride {lda}"
    );
    epilogue.check(m, n);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F is present (asserted); `a` holds `m` rows of `k`
    // at stride `lda` (asserted), `b` holds its panels (built by `pack`),
    // and `check` asserted that the epilogue's buffers hold `[m, n]`.
    unsafe {
        avx512::product(m, k, n, a.as_ptr(), lda, b.data.as_ptr(), epilogue)
    }
}

/// How a tile of the product leaves the registers (sealed to this module's
/// epilogues).
pub(crate) trait Epilogue: private::Sealed {
    /// Asserts that the epilogue's buffers hold an `[m, n]` product.
    fn check(&self, m: usize, n: usize);

    /// An `[m, n]` row-major buffer that holds the partial sums between
    /// blocks of the inner dimension, before `row` writes the tile's
    /// results (it may be one of the epilogue's outputs).
    fn partial(&mut self) -> *mut f32;

    /// Row `i` of the product, columns `j0..j0 + 16 * V` in `acc` (the
    /// last vector's valid lanes in `mask`).
    ///
    /// # Safety
    /// AVX-512F; `i < m`, `j0 + 16 * (V - 1) < n` and the lanes in `mask`
    /// lie inside `n` for the `[m, n]` that `check` accepted.
    #[cfg(target_arch = "x86_64")]
    unsafe fn row<const V: usize>(
        &mut self,
        n: usize,
        i: usize,
        j0: usize,
        acc: &[std::arch::x86_64::__m512; V],
        mask: u16,
    );

    /// Rows `i0..i0 + R` of the product, in order, as [`Epilogue::row`]
    /// each.
    ///
    /// # Safety
    /// As [`Epilogue::row`], for every row.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows<const R: usize, const V: usize>(
        &mut self,
        n: usize,
        i0: usize,
        j0: usize,
        acc: &[[std::arch::x86_64::__m512; V]; R],
        mask: u16,
    ) {
        for (r, acc) in acc.iter().enumerate() {
            self.row::<V>(n, i0 + r, j0, acc, mask);
        }
    }

    /// Asks for the memory that [`Epilogue::row`] will touch for row `i`,
    /// columns `j0..j0 + 16 * V` (a hint: nothing is read or written).
    #[cfg(target_arch = "x86_64")]
    fn prefetch<const V: usize>(&self, n: usize, i: usize, j0: usize);
}

/// Asks for the cache lines of `V` vectors from `p` on, into L1 (a hint:
/// nothing is read or written). For lines that are then written too: a
/// line no other core holds arrives exclusive, and the store needs nothing
/// more (`prefetchw` measured the same).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const V: usize>(p: *const f32) {
    for v in 0..V {
        crate::model::prefetch(p.wrapping_add(16 * v));
    }
}

/// The lanes of a vector that hold the first `count` of its 16 floats
/// (`1..=16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn first_lanes(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::Forward<'_> {}
    impl Sealed for super::Backward<'_> {}
    impl Sealed for super::Store<'_> {}
    impl Sealed for super::DiceBackward<'_> {}
}

impl Bias<'_> {
    /// The row addend of row `i`, `[n]`.
    #[inline(always)]
    fn row(&self, i: usize, n: usize) -> &[f32] {
        match *self {
            Bias::Columns(b) => b,
            Bias::Samples { rows, offsets, s0, r0 } => {
                // A search over the offsets from the chunk's first sample
                // on (a tile row at a time, so the cost is small).
                let r = (r0 + i) as u32;
                let s = s0 + offsets[s0..].partition_point(|&o| o <= r) - 1;
                &rows[(s - s0) * n..(s - s0 + 1) * n]
            }
        }
    }
}

/// The lanes of vector `v` of a row of `V` vectors: all of them but in the
/// last, whose lanes inside the product are `mask`.
#[inline(always)]
fn lanes<const V: usize>(v: usize, mask: u16) -> u16 {
    if v + 1 == V {
        mask
    } else {
        u16::MAX
    }
}

impl Epilogue for Forward<'_> {
    fn partial(&mut self) -> *mut f32 {
        self.pre.as_mut_ptr()
    }

    fn check(&self, m: usize, n: usize) {
        assert!(
            self.pre.len() >= m * n && self.out.len() >= m * n,
            "fused product: outputs shorter than [{m}, {n}]"
        );
        assert!(
            self.alpha.is_none_or(|a| a.len() >= n),
            "fused product: slopes shorter than {n}"
        );
        match self.bias {
            Bias::Columns(b) => assert!(b.len() >= n, "fused product: bias shorter than {n}"),
            Bias::Samples { rows, offsets, s0, r0 } => {
                if m > 0 {
                    let last = (r0 + m - 1) as u32;
                    let s_end = offsets.partition_point(|&o| o <= last);
                    assert!(
                        offsets.windows(2).all(|w| w[0] <= w[1])
                            && s_end >= 1
                            && offsets.get(s0).is_some_and(|&o| o as usize <= r0)
                            && offsets.len() > s_end
                            && rows.len() >= (s_end - s0) * n,
                        "fused product: per-sample bias does not cover rows {r0}..{}",
                        r0 + m
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row<const V: usize>(
        &mut self,
        n: usize,
        i: usize,
        j0: usize,
        acc: &[std::arch::x86_64::__m512; V],
        mask: u16,
    ) {
        use std::arch::x86_64::*;
        let bias = self.bias.row(i, n).as_ptr();
        let (pre, out) = (self.pre.as_mut_ptr().add(i * n), self.out.as_mut_ptr().add(i * n));
        let zero = _mm512_setzero_ps();
        for (v, &acc) in acc.iter().enumerate() {
            let j = j0 + 16 * v;
            let m = lanes::<V>(v, mask);
            let x = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, bias.add(j)));
            _mm512_mask_storeu_ps(pre.add(j), m, x);
            // x if x > 0, else a·x, as `Rowwise::apply` computes it.
            let y = match self.alpha {
                Some(a) => {
                    let a = _mm512_maskz_loadu_ps(m, a.as_ptr().add(j));
                    _mm512_add_ps(_mm512_max_ps(x, zero), _mm512_mul_ps(a, _mm512_min_ps(x, zero)))
                }
                None => _mm512_max_ps(x, zero),
            };
            _mm512_mask_storeu_ps(out.add(j), m, y);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch<const V: usize>(&self, n: usize, i: usize, j0: usize) {
        prefetch_lines::<V>(self.pre.as_ptr().wrapping_add(i * n + j0));
        prefetch_lines::<V>(self.out.as_ptr().wrapping_add(i * n + j0));
    }
}

impl Epilogue for Backward<'_> {
    fn partial(&mut self) -> *mut f32 {
        self.g.as_mut_ptr()
    }

    /// As [`Epilogue::row`] row after row, with the slope and bias
    /// gradients of each column vector held in registers over the rows
    /// (the same additions in the same order).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows<const R: usize, const V: usize>(
        &mut self,
        n: usize,
        i0: usize,
        j0: usize,
        acc: &[[std::arch::x86_64::__m512; V]; R],
        mask: u16,
    ) {
        use std::arch::x86_64::*;
        let (one, zero) = (_mm512_set1_ps(1.0), _mm512_setzero_ps());
        for v in 0..V {
            let j = j0 + 16 * v;
            let m = lanes::<V>(v, mask);
            let (db_at, da_at) = (self.dbias.as_mut_ptr().add(j), self.dalpha.as_mut_ptr().add(j));
            let mut db = _mm512_maskz_loadu_ps(m, db_at);
            let (slopes, mut da) = match self.alpha {
                Some(a) => (
                    _mm512_maskz_loadu_ps(m, a.as_ptr().add(j)),
                    _mm512_maskz_loadu_ps(m, da_at),
                ),
                None => (zero, zero),
            };
            for (r, acc) in acc.iter().enumerate() {
                let at = (i0 + r) * n + j;
                let (x, dy) = (_mm512_maskz_loadu_ps(m, self.pre.as_ptr().add(at)), acc[v]);
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, zero);
                // As `Rowwise::backward`: the slope gradient from `dy`, then
                // `g = dy·1` where x > 0, else `dy·a` (ReLU: `dy·0`).
                if self.alpha.is_some() {
                    da = _mm512_add_ps(da, _mm512_mul_ps(dy, _mm512_min_ps(x, zero)));
                }
                let gv = _mm512_mul_ps(dy, _mm512_mask_blend_ps(pos, slopes, one));
                _mm512_mask_storeu_ps(self.g.as_mut_ptr().add(at), m, gv);
                db = _mm512_add_ps(db, gv);
            }
            if self.alpha.is_some() {
                _mm512_mask_storeu_ps(da_at, m, da);
            }
            _mm512_mask_storeu_ps(db_at, m, db);
        }
    }

    fn check(&self, m: usize, n: usize) {
        assert!(
            self.pre.len() >= m * n && self.g.len() >= m * n,
            "fused product: buffers shorter than [{m}, {n}]"
        );
        assert!(self.dbias.len() >= n, "fused product: bias gradient shorter than {n}");
        assert!(
            self.alpha.is_none_or(|a| a.len() >= n && self.dalpha.len() >= n),
            "fused product: slopes shorter than {n}"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row<const V: usize>(
        &mut self,
        n: usize,
        i: usize,
        j0: usize,
        acc: &[std::arch::x86_64::__m512; V],
        mask: u16,
    ) {
        self.rows::<1, V>(n, i, j0, &[*acc], mask);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch<const V: usize>(&self, n: usize, i: usize, j0: usize) {
        prefetch_lines::<V>(self.pre.as_ptr().wrapping_add(i * n + j0));
        prefetch_lines::<V>(self.g.as_ptr().wrapping_add(i * n + j0));
        // The next product's row `i`, its lines shared out over the panels.
        let (next, w) = self.next;
        if i * w < next.len() {
            let (lines, panels, panel) = (w.div_ceil(16), n.div_ceil(NR), j0 / NR);
            let row = next.as_ptr().wrapping_add(i * w);
            for line in panel * lines / panels..(panel + 1) * lines / panels {
                crate::model::prefetch_l2(row.wrapping_add(16 * line));
            }
        }
    }
}

impl Epilogue for DiceBackward<'_> {
    fn partial(&mut self) -> *mut f32 {
        // A tile's partial sums are read before its rows are written.
        self.out.as_mut_ptr()
    }

    /// As [`Epilogue::row`] row after row, with the slope gradient and the
    /// sums of each column vector held in registers over the rows (the
    /// same additions in the same order).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows<const R: usize, const V: usize>(
        &mut self,
        n: usize,
        i0: usize,
        j0: usize,
        acc: &[[std::arch::x86_64::__m512; V]; R],
        mask: u16,
    ) {
        use std::arch::x86_64::*;
        for v in 0..V {
            let j = j0 + 16 * v;
            let m = lanes::<V>(v, mask);
            let ch = Channels::load(self.act, j, m);
            let at_sums = PartialSums::at(self.dalpha, self.sums, n, j);
            let mut sums = at_sums.load(m);
            for (r, acc) in acc.iter().enumerate() {
                let at = (i0 + r) * n + j;
                let x = _mm512_maskz_loadu_ps(m, self.pre.as_ptr().add(at));
                let p = _mm512_maskz_loadu_ps(m, self.g.as_ptr().add(at));
                _mm512_mask_storeu_ps(self.out.as_mut_ptr().add(at), m, ch.output(x, p));
                let gv = ch.partial(acc[v], x, p, &mut sums);
                _mm512_mask_storeu_ps(self.g.as_mut_ptr().add(at), m, gv);
            }
            at_sums.store(m, sums);
        }
    }

    fn check(&self, m: usize, n: usize) {
        assert!(
            self.pre.len() >= m * n && self.g.len() >= m * n && self.out.len() >= m * n,
            "fused product: buffers shorter than [{m}, {n}]"
        );
        assert!(
            self.act.channels() == n && self.act.is_dice() && self.dalpha.len() >= n && self.sums.len() >= 2 * n,
            "fused product: Dice's parameters or sums are not {n} channels"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row<const V: usize>(
        &mut self,
        n: usize,
        i: usize,
        j0: usize,
        acc: &[std::arch::x86_64::__m512; V],
        mask: u16,
    ) {
        self.rows::<1, V>(n, i, j0, &[*acc], mask);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch<const V: usize>(&self, n: usize, i: usize, j0: usize) {
        prefetch_lines::<V>(self.pre.as_ptr().wrapping_add(i * n + j0));
        prefetch_lines::<V>(self.g.as_ptr().wrapping_add(i * n + j0));
    }
}

impl Epilogue for Store<'_> {
    fn partial(&mut self) -> *mut f32 {
        self.c.as_mut_ptr()
    }

    fn check(&self, m: usize, n: usize) {
        assert!(self.c.len() >= m * n, "fused product: c shorter than [{m}, {n}]");
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row<const V: usize>(
        &mut self,
        n: usize,
        i: usize,
        j0: usize,
        acc: &[std::arch::x86_64::__m512; V],
        mask: u16,
    ) {
        use std::arch::x86_64::*;
        let c = self.c.as_mut_ptr().add(i * n);
        for (v, &acc) in acc.iter().enumerate() {
            let m = lanes::<V>(v, mask);
            _mm512_mask_storeu_ps(c.add(j0 + 16 * v), m, acc);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch<const V: usize>(&self, n: usize, i: usize, j0: usize) {
        prefetch_lines::<V>(self.c.as_ptr().wrapping_add(i * n + j0));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{first_lanes, lanes, Epilogue, KC, MR, NR};

    /// See [`super::activate`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn activate(pre: &[f32], alpha: Option<&[f32]>, n: usize, out: &mut [f32]) {
        let zero = _mm512_setzero_ps();
        for (x, y) in pre.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            for j in (0..n).step_by(16) {
                let m = first_lanes(n - j);
                let x = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
                // As the forward epilogue.
                let v = match alpha {
                    Some(a) => {
                        let a = _mm512_maskz_loadu_ps(m, a.as_ptr().add(j));
                        _mm512_add_ps(_mm512_max_ps(x, zero), _mm512_mul_ps(a, _mm512_min_ps(x, zero)))
                    }
                    None => _mm512_max_ps(x, zero),
                };
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(j), m, v);
            }
        }
    }

    /// Rows `i0..i0 + R` of the product against one panel (`V` vectors
    /// wide), over inner indices `k0..k0 + k` (`a` and `b` at `k0`'s
    /// column and row). The sums start from zero when `first`, else from
    /// the partial sums that the previous block left in `e`'s
    /// [`Epilogue::partial`]; they leave through `e` when `last`, else
    /// into the partial sums.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const V: usize, E: Epilogue>(
        k: usize,
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        i0: usize,
        j0: usize,
        mask: u16,
        (first, last): (bool, bool),
        ahead: usize,
        e: &mut E,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if !first {
            let partial = e.partial();
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    let at = partial.add((i0 + r) * n + j0 + 16 * v);
                    *acc = _mm512_maskz_loadu_ps(lanes::<V>(v, mask), at);
                }
            }
        }
        // The next strip's lines of the epilogue's buffers: asked for now,
        // they arrive while this tile sums. The training pass's buffers are
        // out of L2 (a batch's activations are tens of MiB), and a tile's
        // stores would otherwise each wait for their line.
        for r in 0..ahead {
            e.prefetch::<V>(n, i0 + R + r, j0);
        }
        let mut bp = b;
        let mut ap = a;
        for _ in 0..k {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm512_loadu_ps(bp.add(16 * v));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ap.add(r * lda));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(x, bv, *acc);
                }
            }
            bp = bp.add(16 * V);
            ap = ap.add(1);
        }
        if last {
            e.rows::<R, V>(n, i0, j0, &acc, mask);
        } else {
            let partial = e.partial();
            for (r, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    let at = partial.add((i0 + r) * n + j0 + 16 * v);
                    _mm512_mask_storeu_ps(at, lanes::<V>(v, mask), acc);
                }
            }
        }
    }

    /// A strip of `r` rows against one panel of `v` vectors.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn strip<E: Epilogue>(
        r: usize,
        v: usize,
        k: usize,
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        i0: usize,
        j0: usize,
        mask: u16,
        ends: (bool, bool),
        ahead: usize,
        e: &mut E,
    ) {
        macro_rules! by_rows {
            ($v:literal) => {
                match r {
                    1 => tile::<1, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                    2 => tile::<2, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                    3 => tile::<3, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                    4 => tile::<4, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                    5 => tile::<5, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                    _ => tile::<MR, $v, E>(k, n, a, lda, b, i0, j0, mask, ends, ahead, e),
                }
            };
        }
        match v {
            1 => by_rows!(1),
            2 => by_rows!(2),
            3 => by_rows!(3),
            _ => by_rows!(4),
        }
    }

    /// The whole product, in blocks of [`KC`] inner indices (at most
    /// `KC + KC / 2` in one block); per block, panel by panel (the block's
    /// rows of the panel stay in L1), a strip of [`MR`] rows at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product<E: Epilogue>(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        e: &mut E,
    ) {
        let blocks = if k <= KC + KC / 2 { 1 } else { k.div_ceil(KC) };
        for blk in 0..blocks {
            let k0 = blk * KC;
            let kb = if blk + 1 == blocks { k - k0 } else { KC };
            let ends = (blk == 0, blk + 1 == blocks);
            for j0 in (0..n).step_by(NR) {
                let w = (n - j0).min(NR);
                let v = w.div_ceil(16);
                let mask = first_lanes(w - 16 * (v - 1));
                // Panels before this one are all NR wide; its rows are 16 v wide.
                let panel = b.add(j0 * k + k0 * 16 * v);
                for i0 in (0..m).step_by(MR) {
                    let r = (m - i0).min(MR);
                    let ahead = (m - i0 - r).min(MR);
                    strip(
                        r,
                        v,
                        kb,
                        n,
                        a.add(i0 * lda + k0),
                        lda,
                        panel,
                        i0,
                        j0,
                        mask,
                        ends,
                        ahead,
                        e,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linalg::serial;
    use crate::model::testutil::rand_vec;

    /// Successive [`rand_vec`]s, each from the next seed.
    struct Values(u64);

    impl Values {
        fn take(&mut self, n: usize) -> Vec<f32> {
            self.0 += 1;
            rand_vec(n, self.0)
        }
    }

    /// Whether the CPU lacks AVX-512F (the test then passes, saying so).
    fn skipped() -> bool {
        let skip = !available();
        if skip {
            eprintln!("skipped: no AVX-512F");
        }
        skip
    }

    /// `a [m, k]`, `b [k, n]` packed, and their plain product.
    fn plain_product(m: usize, k: usize, n: usize, values: &mut Values) -> (Vec<f32>, Panels, Vec<f32>) {
        let (a, b) = (values.take(m * k), values.take(k * n));
        let mut panels = Panels::default();
        panels.pack(k, n, &b, (n, 1));
        let mut c = vec![0.0; m * n];
        product(m, &a, k, &panels, &mut Store { c: &mut c });
        (a, panels, c)
    }

    /// Shapes with every row and column remainder, and widths the model
    /// uses; inner dimensions of one, two (256) and three (300) blocks.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (7, 3, 17),
        (13, 32, 256),
        (50, 256, 128),
        (37, 128, 64),
        (11, 40, 80),
        (6, 5, 200),
        (29, 64, 33),
        (9, 300, 70),
    ];

    /// Sums against an f64 reference (within a few ulps of k terms), and
    /// bit for bit one chain of fused multiply-adds per element over the
    /// inner dimension in order, whatever the blocks.
    #[test]
    fn products_match_a_reference_in_every_shape() {
        if skipped() {
            return;
        }
        let values = &mut Values(700);
        for (m, k, n) in SHAPES {
            let lda = k + 3;
            let a = values.take(m * lda);
            let b = values.take(k * n);
            let mut panels = Panels::default();
            panels.pack(k, n, &b, (n, 1));
            let mut c = vec![f32::NAN; m * n];
            product(m, &a, lda, &panels, &mut Store { c: &mut c });
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| f64::from(a[i * lda + p]) * f64::from(b[p * n + j]))
                        .sum();
                    let got = f64::from(c[i * n + j]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                    let chain = (0..k).fold(0.0f32, |acc, p| a[i * lda + p].mul_add(b[p * n + j], acc));
                    assert_eq!(
                        c[i * n + j].to_bits(),
                        chain.to_bits(),
                        "({m},{k},{n}) [{i},{j}]: not one chain"
                    );
                }
            }
            // The transpose's packing: b stored [n, k].
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            panels.pack(k, n, &bt, (1, k));
            let mut ct = vec![0.0; m * n];
            product(m, &a, lda, &panels, &mut Store { c: &mut ct });
            assert_eq!(c, ct, "({m},{k},{n}): the transposed packing gives the same product");
            // The same sums as the gemm crate's kernels where they run one
            // chain per element too (k up to its depth block).
            if k <= 64 {
                let mut g = vec![0.0; m * n];
                serial::matmul_lda(m, k, n, &a, lda, &b, &mut g, false);
                let same = c.iter().zip(&g).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "({m},{k},{n}): not the gemm crate's bits");
            }
        }
    }

    #[test]
    fn the_forward_epilogue_is_bias_then_prelu_or_relu() {
        if skipped() {
            return;
        }
        let values = &mut Values(800);
        for (m, k, n) in SHAPES {
            let (a, panels, c) = plain_product(m, k, n, values);
            let slopes = values.take(n);
            // Per-sample rows: samples of 0, 1, 2, ... rows from row 5 on.
            let mut offsets = vec![0u32, 5];
            while (*offsets.last().unwrap() as usize) < 5 + m {
                let len = offsets.len() as u32 - 2;
                offsets.push(offsets.last().unwrap() + len);
            }
            let per_sample = values.take((offsets.len() - 1) * n);
            let columns = values.take(n);
            for (bias, alpha) in [
                (Bias::Columns(&columns), Some(&slopes[..])),
                (Bias::Columns(&columns), None),
                (
                    Bias::Samples {
                        rows: &per_sample[n..],
                        offsets: &offsets,
                        s0: 1,
                        r0: 5,
                    },
                    Some(&slopes[..]),
                ),
            ] {
                let (mut pre, mut out) = (vec![0.0; m * n], vec![0.0; m * n]);
                product(
                    m,
                    &a,
                    k,
                    &panels,
                    &mut Forward {
                        bias,
                        alpha,
                        pre: &mut pre,
                        out: &mut out,
                    },
                );
                // The activation recomputed from the pre-activation, as the
                // training backward pass does: the epilogue's bits.
                let mut again = vec![f32::NAN; m * n];
                activate(&pre, alpha, n, &mut again);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&again), bits(&out), "activate ({m},{k},{n})");
                for i in 0..m {
                    let add = bias.row(i, n);
                    for j in 0..n {
                        let x = c[i * n + j] + add[j];
                        assert_eq!(pre[i * n + j].to_bits(), x.to_bits(), "pre ({m},{k},{n}) [{i},{j}]");
                        let a = alpha.map_or(0.0, |a| a[j]);
                        let y = x.max(0.0) + a * x.min(0.0);
                        assert_eq!(out[i * n + j], y, "out ({m},{k},{n}) [{i},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn the_dice_epilogue_is_the_first_half_of_dices_backward_pass_bit_for_bit() {
        if skipped() {
            return;
        }
        let values = &mut Values(950);
        for (m, k, n) in SHAPES {
            let (a, panels, dy) = plain_product(m, k, n, values);
            // Pre-activations of both signs and some far out (exp's clamps).
            let pre: Vec<f32> = values
                .take(m * n)
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 11 {
                    3 => v * 300.0,
                    _ => v * 3.1 + 0.013,
                })
                .collect();
            let mut dice = crate::model::Activation::new(crate::schema::ActivationKind::Dice, n);
            if let Some(p) = &mut dice.alpha {
                p.value = values.take(n);
            }
            let (mean, var) = (
                values.take(n),
                values.take(n).iter().map(|v| v.abs() + 0.1).collect::<Vec<_>>(),
            );
            let act = dice.rowwise_with_moments(&mean, &var);
            // The forward pass's output and sigmoids.
            let (mut y, mut sigmoids) = (vec![0.0; m * n], vec![0.0; m * n]);
            act.dice_keeping_sigmoid(&pre, &mut y, &mut sigmoids);
            let (da0, s0) = (values.take(n), values.take(2 * n));
            let (mut g, mut dalpha, mut sums) = (sigmoids.clone(), da0.clone(), s0.clone());
            let mut out = vec![f32::NAN; m * n];
            let epilogue = &mut DiceBackward {
                act: &act,
                pre: &pre,
                g: &mut g,
                out: &mut out,
                dalpha: &mut dalpha,
                sums: &mut sums,
            };
            product(m, &a, k, &panels, epilogue);
            // The product stored, then Dice's own pass over it.
            let (mut want, mut want_da, mut want_sums) = (sigmoids.clone(), da0.clone(), s0.clone());
            act.dice_backward_partial(&pre, &dy, &mut want, &mut want_da, &mut want_sums);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&y), "the output recomputed ({m},{k},{n})");
            assert_eq!(bits(&g), bits(&want), "g ({m},{k},{n})");
            assert_eq!(bits(&dalpha), bits(&want_da), "slope gradient ({m},{k},{n})");
            assert_eq!(bits(&sums), bits(&want_sums), "sums ({m},{k},{n})");
            assert!(g.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn the_backward_epilogue_is_the_activation_backward_and_the_sums() {
        if skipped() {
            return;
        }
        let values = &mut Values(900);
        for (m, k, n) in SHAPES {
            let (a, panels, dy) = plain_product(m, k, n, values);
            let pre = values.take(m * n);
            let slopes = values.take(n);
            for alpha in [Some(&slopes[..]), None] {
                let (da0, db0) = (values.take(n), values.take(n));
                let (mut g, mut dalpha, mut dbias) = (vec![0.0; m * n], da0.clone(), db0.clone());
                product(
                    m,
                    &a,
                    k,
                    &panels,
                    &mut Backward {
                        pre: &pre,
                        alpha,
                        g: &mut g,
                        dalpha: &mut dalpha,
                        dbias: &mut dbias,
                        next: (&a, k),
                    },
                );
                let (mut want_da, mut want_db) = (da0.clone(), db0.clone());
                for i in 0..m {
                    for j in 0..n {
                        let (x, d) = (pre[i * n + j], dy[i * n + j]);
                        let a = alpha.map_or(0.0, |a| a[j]);
                        let want = d * if x > 0.0 { 1.0 } else { a };
                        assert_eq!(g[i * n + j].to_bits(), want.to_bits(), "g ({m},{k},{n}) [{i},{j}]");
                        want_da[j] += d * x.min(0.0);
                        want_db[j] += want;
                    }
                }
                assert_eq!(dbias, want_db, "bias gradient ({m},{k},{n})");
                if alpha.is_some() {
                    assert_eq!(dalpha, want_da, "slope gradient ({m},{k},{n})");
                } else {
                    assert_eq!(dalpha, da0, "ReLU leaves the slope gradient alone");
                }
            }
        }
    }

    /// Zeros of both signs, infinities and widths with a partial last
    /// vector: PReLU's and ReLU's values.
    #[test]
    fn activate_is_prelu_or_relu() {
        if skipped() {
            return;
        }
        for n in [1, 16, 21, 40] {
            let special = [-0.0, 0.0, -1.5, 2.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-40];
            let pre: Vec<f32> = (0..3 * n)
                .map(|i| special[i % special.len()] * (1.0 + i as f32))
                .collect();
            let slopes = Values(1000).take(n);
            for alpha in [Some(&slopes[..]), None] {
                let mut out = vec![f32::NAN; 3 * n + 5];
                activate(&pre, alpha, n, &mut out);
                for (i, &x) in pre.iter().enumerate() {
                    let want = match alpha {
                        _ if x > 0.0 => x,
                        Some(a) => a[i % n] * x,
                        None => 0.0,
                    };
                    assert_eq!(out[i], want, "n {n}, [{i}] = {x}");
                }
                assert!(out[3 * n..].iter().all(|v| v.is_nan()), "nothing written past the rows");
            }
        }
    }

    #[test]
    #[should_panic(expected = "shorter")]
    fn short_outputs_are_refused() {
        if !available() {
            panic!("shorter (skipped: no AVX-512F)");
        }
        let mut panels = Panels::default();
        panels.pack(2, 3, &[0.0; 6], (3, 1));
        product(2, &[0.0; 4], 2, &panels, &mut Store { c: &mut [0.0; 5] });
    }
}
