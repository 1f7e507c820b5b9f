//! Activations with their parameters: PReLU, Dice, ReLU, sigmoid.

use super::param::{Module, Param, Role};
use super::Mode;
use crate::schema::ActivationKind;

/// Dice's epsilon inside the square root of the variance.
pub const DICE_EPS: f32 = 1e-8;
/// Dice's moving-average momentum (as DeepCTR's BatchNormalization).
pub const DICE_MOMENTUM: f32 = 0.99;
/// PReLU's initial slope for negative inputs (Keras' default; the tutorial is Keras).
pub const PRELU_INIT: f32 = 0.0;

/// An element-wise activation over `[rows, channels]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    /// Which function.
    pub kind: ActivationKind,
    /// Per-channel slope (PReLU, Dice), `[channels]`.
    pub alpha: Option<Param>,
    /// Dice's moving mean, `[channels]`.
    pub running_mean: Option<Param>,
    /// Dice's moving variance, `[channels]`.
    pub running_var: Option<Param>,
}

/// What the backward pass of an activation needs besides its input.
#[derive(Debug, Clone, Default)]
pub struct ActivationCache {
    /// Dice: the mean used per channel (batch or moving).
    mean: Vec<f32>,
    /// Dice: the biased variance of the batch per channel (training only).
    batch_var: Vec<f32>,
    /// Dice: `1 / sqrt(var + eps)` per channel.
    inv_std: Vec<f32>,
    /// Dice: `sigmoid(z)` per element.
    p: Vec<f32>,
    /// Whether batch statistics were used.
    batch_stats: bool,
    /// Rows the statistics came from.
    rows: usize,
}

/// A row-wise activation ready to run over blocks of rows: its per-channel
/// parameters gathered once (see [`Activation::rowwise`]).
#[derive(Debug)]
pub struct Rowwise<'a> {
    kind: ActivationKind,
    channels: usize,
    alpha: &'a [f32],
    /// Dice: the moving mean per channel.
    mean: Vec<f32>,
    /// Dice: `1 / sqrt(moving var + eps)` per channel.
    inv_std: Vec<f32>,
    /// Dice at inference, per channel `[α, 1 - α, -inv_std, mean·inv_std]`
    /// (so that `-z` is one multiply-add), padded with zeros to a multiple
    /// of [`PAD`] channels (see [`Rowwise::dice_in_place`]).
    dice_params: [Vec<f32>; 4],
}

/// Defines a method of [`Rowwise`] that runs `body` (an `#[inline(always)]`
/// method with the same arguments, generic over `FMA`: whether `exp`'s
/// polynomial may use fused multiply-adds, and `WIDE`: whether Dice may
/// run on the AVX-512 loops of [`wide`]) in the widest build the CPU has
/// (see [`Build`]): the element-wise loops run on data already in L1/L2,
/// where vector width pays.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident(&self $(, $arg:ident: $ty:ty)*) => $body:ident;) => {
        $(#[$doc])*
        $vis fn $name(&self $(, $arg: $ty)*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn avx512(this: &Rowwise<'_> $(, $arg: $ty)*) {
                    this.$body::<true, true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2(this: &Rowwise<'_> $(, $arg: $ty)*) {
                    this.$body::<true, false>($($arg),*)
                }
                match widest_build() {
                    // SAFETY: the CPU has every feature `avx512` is compiled for.
                    Build::Avx512 => return unsafe { avx512(self $(, $arg)*) },
                    // SAFETY: the CPU has every feature `avx2` is compiled for.
                    Build::Avx2 => return unsafe { avx2(self $(, $arg)*) },
                    Build::Baseline => {}
                }
            }
            self.$body::<false, false>($($arg),*)
        }
    };
}

impl<'a> Rowwise<'a> {
    /// The row-wise activation over `channels` (Dice: with these per-channel
    /// moments; empty for the others).
    fn new(kind: ActivationKind, channels: usize, alpha: &'a [f32], mean: Vec<f32>, inv_std: Vec<f32>) -> Self {
        let padded = |v: Vec<f32>| {
            let mut p = v;
            p.resize(channels.next_multiple_of(PAD), 0.0);
            p
        };
        let dice_params = if kind == ActivationKind::Dice {
            [
                padded(alpha.to_vec()),
                padded(alpha.iter().map(|a| 1.0 - a).collect()),
                padded(inv_std.iter().map(|s| -s).collect()),
                padded(mean.iter().zip(&inv_std).map(|(m, s)| m * s).collect()),
            ]
        } else {
            Default::default()
        };
        Rowwise {
            kind,
            channels,
            alpha,
            mean,
            inv_std,
            dice_params,
        }
    }
}

impl<'a> Rowwise<'a> {
    /// ReLU and PReLU, which are `max(x, 0) + a·min(x, 0)`: `Some` of the
    /// per-channel slopes (`None`: ReLU, `a = 0`), so that a caller may
    /// apply them in its own loop ([`super::bf16::Bf16Matrix::pack_prelu_rows`]);
    /// `None` for the others.
    pub(crate) fn as_prelu(&self) -> Option<Option<&'a [f32]>> {
        match self.kind {
            ActivationKind::Relu => Some(None),
            ActivationKind::Prelu => Some(Some(self.alpha)),
            ActivationKind::Dice | ActivationKind::Sigmoid => None,
        }
    }

    /// The channels (the width of a row).
    pub(crate) fn channels(&self) -> usize {
        self.channels
    }

    /// Whether this is Dice.
    pub(crate) fn is_dice(&self) -> bool {
        self.kind == ActivationKind::Dice
    }

    /// Dice's moving mean and `1 / sqrt(moving var + eps)` per channel, as
    /// inference uses them (empty for the other activations).
    pub fn dice_statistics(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.inv_std)
    }

    /// Runs `f(x, y, j)` for every element, row by row, where `j` is the channel.
    /// Kept generic and inlined so that each activation's loop is vectorised.
    #[inline(always)]
    fn rows(&self, x: &[f32], y: &mut [f32], f: impl Fn(&mut f32, f32, usize)) {
        let c = self.channels;
        for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (j, (y, &x)) in yr.iter_mut().zip(xr).enumerate() {
                f(y, x, j);
            }
        }
    }

    /// `y = act(x)`, both `[rows, channels]`. `FMA`: whether `exp`'s
    /// polynomial uses fused multiply-adds (a library call per value
    /// outside a build with FMA); `WIDE`: whether Dice runs on the AVX-512
    /// loops, where the CPU has AVX-512 (see [`Rowwise::apply_rows`],
    /// which picks both for this CPU).
    #[inline(always)]
    pub fn apply<const FMA: bool, const WIDE: bool>(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), y.len());
        #[cfg(target_arch = "x86_64")]
        if WIDE && self.kind == ActivationKind::Dice && widest_build() == Build::Avx512 {
            // SAFETY: the CPU has AVX-512 (checked: this method is public).
            return unsafe { wide::dice(self, x, y) };
        }
        let alpha = self.alpha;
        match self.kind {
            // Branch-free forms: signs are unpredictable, and a mispredicted
            // branch per element costs more than the arithmetic.
            ActivationKind::Relu => self.rows(x, y, |y, x, _| *y = x.max(0.0)),
            ActivationKind::Sigmoid => self.rows(x, y, |y, x, _| *y = sigmoid::<FMA>(x)),
            // x if x > 0, else a·x (exactly).
            ActivationKind::Prelu => self.rows(x, y, |y, x, j| *y = x.max(0.0) + alpha[j] * x.min(0.0)),
            ActivationKind::Dice => {
                let c = self.channels;
                for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    yr.copy_from_slice(xr);
                    self.dice_in_place::<FMA, false>(yr, &mut []);
                }
            }
        }
    }

    /// Dice over one row, in place: `x = x·(α + (1-α)·sigmoid((x - mean)·inv_std))`
    /// per channel. The whole multiples of [`DICE_MAIN`] channels in one
    /// plain loop (whole iterations of the vectorised loop), then up to
    /// three blocks of [`LANES`] channels, written out rather than looped
    /// (each one vector), then the last few channels padded with zeros to a
    /// block (as the parameters are). A plain loop over the row left up to
    /// 31 channels of every row (16 of 80) to a scalar tail, `exp` and all;
    /// a loop over blocks of [`LANES`] channels was vectorised across the
    /// blocks once `exp` used fused multiply-adds (an 8 x 8 transpose in
    /// and out of every 64 values). The AVX-512 build runs [`wide`]'s loops
    /// instead.
    #[inline(always)]
    fn dice_in_place<const FMA: bool, const KEEP: bool>(&self, x: &mut [f32], p: &mut [f32]) {
        let n = x.len();
        let mut j = n - n % DICE_MAIN;
        self.dice_span::<FMA, KEEP>(&mut x[..j], 0, p);
        // At most three whole blocks: no loop, so each block is one vector.
        if j + LANES <= n {
            self.dice_whole_block::<FMA, KEEP>(x, j, p);
            j += LANES;
        }
        if j + LANES <= n {
            self.dice_whole_block::<FMA, KEEP>(x, j, p);
            j += LANES;
        }
        if j + LANES <= n {
            self.dice_whole_block::<FMA, KEEP>(x, j, p);
            j += LANES;
        }
        if j < n {
            let mut block = [0.0f32; LANES];
            block[..n - j].copy_from_slice(&x[j..]);
            let s = self.dice_block::<FMA>(&mut block, j);
            x[j..].copy_from_slice(&block[..n - j]);
            if KEEP {
                p[j..n].copy_from_slice(&s[..n - j]);
            }
        }
    }

    /// [`Rowwise::dice_block`] over the row's channels `j..j + LANES`
    /// (and with `KEEP`, their sigmoids into `p`).
    #[inline(always)]
    fn dice_whole_block<const FMA: bool, const KEEP: bool>(&self, x: &mut [f32], j: usize, p: &mut [f32]) {
        let s = self.dice_block::<FMA>((&mut x[j..j + LANES]).try_into().unwrap(), j);
        if KEEP {
            p[j..j + LANES].copy_from_slice(&s);
        }
    }

    /// Dice over `x`, channels `j0..j0 + x.len()`; with `KEEP`, each
    /// value's sigmoid into `p` (the row's, indexed by channel).
    #[inline(always)]
    fn dice_span<const FMA: bool, const KEEP: bool>(&self, x: &mut [f32], j0: usize, p: &mut [f32]) {
        let j1 = j0 + x.len();
        let [a, oma, ns, ms] = &self.dice_params;
        let params = a[j0..j1]
            .iter()
            .zip(&oma[j0..j1])
            .zip(ns[j0..j1].iter().zip(&ms[j0..j1]));
        if KEEP {
            for ((x, ((&a, &oma), (&ns, &ms))), p) in x.iter_mut().zip(params).zip(&mut p[j0..j1]) {
                *p = dice_sigmoid::<FMA>(*x, ns, ms);
                *x = dice_from_sigmoid::<FMA>(*x, a, oma, *p);
            }
        } else {
            for (x, ((&a, &oma), (&ns, &ms))) in x.iter_mut().zip(params) {
                *x = dice_inference::<FMA>(*x, a, oma, ns, ms);
            }
        }
    }

    /// Dice over one block, channels `j0..j0 + LANES` of the padded
    /// parameters, computed in a local array: LLVM vectorises it without
    /// asking whether the output overlaps the parameters. Returns the
    /// block's sigmoids (unused but by [`Rowwise::dice_keeping_sigmoid`]).
    #[inline(always)]
    fn dice_block<const FMA: bool>(&self, x: &mut [f32; LANES], j0: usize) -> [f32; LANES] {
        let [a, oma, ns, ms] = &self.dice_params;
        let (a, oma, ns, ms) = (
            &a[j0..j0 + LANES],
            &oma[j0..j0 + LANES],
            &ns[j0..j0 + LANES],
            &ms[j0..j0 + LANES],
        );
        // A loop, not `array::from_fn`: that is not always inlined, and
        // outside this build `mul_add` is a library call.
        let (mut y, mut s) = ([0.0; LANES], [0.0; LANES]);
        for i in 0..LANES {
            s[i] = dice_sigmoid::<FMA>(x[i], ns[i], ms[i]);
            y[i] = dice_from_sigmoid::<FMA>(x[i], a[i], oma[i], s[i]);
        }
        *x = y;
        s
    }

    multiversion! {
        /// Dice with a batch's moments in a training pass: `y = dice(x)`,
        /// the same bits as [`Rowwise::apply_rows`], and each value's
        /// sigmoid into `p` (all `[rows, channels]`), which the backward
        /// pass ([`Rowwise::dice_backward_partial`]) takes instead of
        /// computing it again, and from which [`Rowwise::dice_from_sigmoid`]
        /// gives `y` back. Dice only.
        pub fn dice_keeping_sigmoid(&self, x: &[f32], y: &mut [f32], p: &mut [f32]) => dice_keeping_sigmoid_body;
    }

    #[inline(always)]
    fn dice_keeping_sigmoid_body<const FMA: bool, const WIDE: bool>(&self, x: &[f32], y: &mut [f32], p: &mut [f32]) {
        assert_eq!(self.kind, ActivationKind::Dice, "the sigmoid kept is Dice's");
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: `WIDE` is only set by `multiversion!`'s AVX-512 build,
            // which runs only on CPUs with AVX-512.
            return unsafe { wide::dice_keeping_sigmoid(self, x, y, p) };
        }
        let c = self.channels;
        let rows = y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(p.chunks_exact_mut(c));
        for ((yr, xr), pr) in rows {
            yr.copy_from_slice(xr);
            self.dice_in_place::<FMA, true>(yr, pr);
        }
    }

    multiversion! {
        /// `y = dice(x)` again from the sigmoids that
        /// [`Rowwise::dice_keeping_sigmoid`] kept (`p`; all `[rows,
        /// channels]`): the same bits as that pass's `y`, at the cost of a
        /// multiply-add and two products per value. Dice only.
        pub fn dice_from_sigmoid(&self, x: &[f32], p: &[f32], y: &mut [f32]) => dice_from_sigmoid_body;
    }

    #[inline(always)]
    fn dice_from_sigmoid_body<const FMA: bool, const WIDE: bool>(&self, x: &[f32], p: &[f32], y: &mut [f32]) {
        assert_eq!(self.kind, ActivationKind::Dice, "the sigmoid kept is Dice's");
        let c = self.channels;
        let [a, oma, ..] = &self.dice_params;
        let (a, oma) = (&a[..c], &oma[..c]);
        let rows = y.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(p.chunks_exact(c));
        for ((yr, xr), pr) in rows {
            let params = a.iter().zip(oma);
            for ((y, (&x, &p)), (&a, &oma)) in yr.iter_mut().zip(xr.iter().zip(pr)).zip(params) {
                *y = dice_from_sigmoid::<FMA>(x, a, oma, p);
            }
        }
    }

    multiversion! {
        /// `x = act(x + extra + bias)` in place, row by row: `bias` is
        /// `[channels]`, `extra` (optional) is as long as `x`. The inference
        /// form, which keeps no pre-activation: one read and one write per value.
        pub fn add_apply_in_place(&self, x: &mut [f32], extra: Option<&[f32]>, bias: &[f32]) => add_apply_in_place_body;
    }

    #[inline(always)]
    fn add_apply_in_place_body<const FMA: bool, const WIDE: bool>(
        &self,
        x: &mut [f32],
        extra: Option<&[f32]>,
        bias: &[f32],
    ) {
        let c = self.channels;
        let alpha = self.alpha;
        if matches!(self.kind, ActivationKind::Prelu | ActivationKind::Relu) {
            // One pass: each sum activated while it is in a register (the
            // same operations, so the same bits, as the two passes below).
            for (r, xr) in x.chunks_exact_mut(c).enumerate() {
                let e = extra.map(|e| &e[r * c..(r + 1) * c]);
                match (self.kind, e) {
                    (ActivationKind::Relu, Some(e)) => {
                        (xr.iter_mut().zip(e).zip(bias)).for_each(|((x, e), b)| *x = (*x + (e + b)).max(0.0))
                    }
                    (ActivationKind::Relu, None) => xr.iter_mut().zip(bias).for_each(|(x, b)| *x = (*x + b).max(0.0)),
                    (_, Some(e)) => (xr.iter_mut().zip(e).zip(bias).zip(alpha)).for_each(|(((x, e), b), a)| {
                        let v = *x + (e + b);
                        *x = v.max(0.0) + a * v.min(0.0);
                    }),
                    (_, None) => (xr.iter_mut().zip(bias).zip(alpha)).for_each(|((x, b), a)| {
                        let v = *x + b;
                        *x = v.max(0.0) + a * v.min(0.0);
                    }),
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if WIDE && self.kind == ActivationKind::Dice {
            // SAFETY: `WIDE` is only set by `multiversion!`'s AVX-512 build,
            // which runs only on CPUs with AVX-512.
            return unsafe { wide::add_dice_in_place(self, x, extra, bias) };
        }
        for (r, xr) in x.chunks_exact_mut(c).enumerate() {
            match extra {
                Some(e) => xr
                    .iter_mut()
                    .zip(&e[r * c..(r + 1) * c])
                    .zip(bias)
                    .for_each(|((x, e), b)| *x += e + b),
                None => xr.iter_mut().zip(bias).for_each(|(x, b)| *x += b),
            }
            match self.kind {
                ActivationKind::Relu => xr.iter_mut().for_each(|x| *x = x.max(0.0)),
                ActivationKind::Sigmoid => xr.iter_mut().for_each(|x| *x = sigmoid::<FMA>(*x)),
                ActivationKind::Prelu => xr
                    .iter_mut()
                    .zip(alpha)
                    .for_each(|(x, a)| *x = x.max(0.0) + a * x.min(0.0)),
                ActivationKind::Dice => self.dice_in_place::<FMA, false>(xr, &mut []),
            }
        }
    }

    multiversion! {
        /// [`Rowwise::apply`] in the widest build the CPU has.
        pub fn apply_rows(&self, x: &[f32], y: &mut [f32]) => apply;
    }

    multiversion! {
        /// Dice with a batch's own moments ([`Activation::rowwise_with_moments`]),
        /// first half of the backward pass over some of the batch's rows, from
        /// `dy` and the input `x`. `g` holds the sigmoids of the forward pass
        /// ([`Rowwise::dice_keeping_sigmoid`]'s `p`) on entry and, on return,
        /// the gradient that the moments held fixed would give; the slope
        /// gradient is added to `dalpha`.
        /// `sums` (`[2, channels]`) gets `Σ gz` and `Σ gz·z` per channel over
        /// these rows (added row by row), where `z = (x - mean)·inv_std` and
        /// `gz = dy·(1-α)·x·p(1-p)` is the gradient reaching `z`: the mean and
        /// the variance depend on every row, so
        /// [`Rowwise::dice_backward_finish`] needs the whole batch's.
        pub fn dice_backward_partial(&self, x: &[f32], dy: &[f32], g: &mut [f32], dalpha: &mut [f32], sums: &mut [f32]) => dice_backward_partial_body;
    }

    multiversion! {
        /// Second half of [`Rowwise::dice_backward_partial`], once the batch's
        /// means of `gz` and `gz·z` (`[channels]` each) are known:
        /// `g -= inv_std·(mean_gz + z·mean_gzz)`, the part of `dx` that flows
        /// through the batch mean and variance; then adds `g` (now the
        /// gradient of the pre-activation) to `dbias` (`[channels]`), row by row.
        pub fn dice_backward_finish(&self, x: &[f32], g: &mut [f32], mean_gz: &[f32], mean_gzz: &[f32], dbias: &mut [f32]) => dice_backward_finish_body;
    }

    #[inline(always)]
    fn dice_backward_partial_body<const FMA: bool, const WIDE: bool>(
        &self,
        x: &[f32],
        dy: &[f32],
        g: &mut [f32],
        dalpha: &mut [f32],
        sums: &mut [f32],
    ) {
        let c = self.channels;
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: `WIDE` is only set by `multiversion!`'s AVX-512 build,
            // which runs only on CPUs with AVX-512.
            return unsafe { wide::dice_backward_partial(self, x, dy, g, dalpha, sums) };
        }
        let (sum_gz, sum_gzz) = sums.split_at_mut(c);
        // In blocks of LANES channels, as `dice_in_place`.
        let (ab, at) = self.alpha.as_chunks::<LANES>();
        let (mb, mt) = self.mean.as_chunks::<LANES>();
        let (sb, st) = self.inv_std.as_chunks::<LANES>();
        let (dab, dat) = dalpha.as_chunks_mut::<LANES>();
        let (gzb, gzt) = sum_gz.as_chunks_mut::<LANES>();
        let (gzzb, gzzt) = sum_gzz.as_chunks_mut::<LANES>();
        for ((gr, xr), dyr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(dy.chunks_exact(c)) {
            let (gb, gt) = gr.as_chunks_mut::<LANES>();
            let (xb, xt) = xr.as_chunks::<LANES>();
            let (dyb, dyt) = dyr.as_chunks::<LANES>();
            let params = ab.iter().zip(mb).zip(sb);
            let sums = dab.iter_mut().zip(gzb.iter_mut()).zip(gzzb.iter_mut());
            let values = gb.iter_mut().zip(xb.iter().zip(dyb));
            for (((g, (x, dy)), ((a, m), s)), ((da, sg), sgz)) in values.zip(params).zip(sums) {
                // In local arrays, as in `dice_in_place`.
                let (mut gv, mut dav, mut sgv, mut sgzv) = (*g, *da, *sg, *sgz);
                for i in 0..LANES {
                    dice_backward_lane(
                        &mut gv[i],
                        dy[i],
                        x[i],
                        a[i],
                        m[i],
                        s[i],
                        &mut dav[i],
                        &mut sgv[i],
                        &mut sgzv[i],
                    );
                }
                (*g, *da, *sg, *sgz) = (gv, dav, sgv, sgzv);
            }
            let params = at.iter().zip(mt).zip(st);
            let sums = dat.iter_mut().zip(gzt.iter_mut()).zip(gzzt.iter_mut());
            let values = gt.iter_mut().zip(xt.iter().zip(dyt));
            for (((g, (&x, &dy)), ((&a, &m), &s)), ((da, sg), sgz)) in values.zip(params).zip(sums) {
                dice_backward_lane(g, dy, x, a, m, s, da, sg, sgz);
            }
        }
    }

    multiversion! {
        /// [`Rowwise::dice_backward_partial`] of the last hidden layer,
        /// whose output `y` feeds a score per row (`score_r = y_r·w + b`),
        /// with the score layer's backward pass in the same pass over the
        /// rows. From `scores`, the scores' gradient `ds` (`[rows]`) and
        /// their weights `w` (`[channels]`), it adds `y_r·ds_r` to `dw`
        /// row by row (`y` recomputed from `x` and the sigmoids in `g`, as
        /// [`Rowwise::dice_from_sigmoid`] does) and takes `dy_r = ds_r·w`.
        /// The same bits as those three passes one after the other.
        pub fn dice_backward_partial_scored(&self, x: &[f32], scores: (&[f32], &[f32]), g: &mut [f32], dw: &mut [f32], dalpha: &mut [f32], sums: &mut [f32]) => dice_backward_partial_scored_body;
    }

    #[inline(always)]
    fn dice_backward_partial_scored_body<const FMA: bool, const WIDE: bool>(
        &self,
        x: &[f32],
        (ds, w): (&[f32], &[f32]),
        g: &mut [f32],
        dw: &mut [f32],
        dalpha: &mut [f32],
        sums: &mut [f32],
    ) {
        let c = self.channels;
        assert!(
            w.len() >= c && dw.len() >= c && dalpha.len() >= c && sums.len() >= 2 * c,
            "Dice's backward pass: weights or sums shorter than {c} channels"
        );
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: `WIDE` is only set by `multiversion!`'s AVX-512 build,
            // which runs only on CPUs with AVX-512.
            return unsafe { wide::dice_backward_partial_scored(self, x, ds, w, g, dw, dalpha, sums) };
        }
        let [a, oma, ..] = &self.dice_params;
        let (sum_gz, sum_gzz) = sums.split_at_mut(c);
        for ((gr, xr), &d) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(ds) {
            for j in 0..c {
                let y = dice_from_sigmoid::<FMA>(xr[j], a[j], oma[j], gr[j]);
                dw[j] += y * d;
                let (alpha, mean, inv_std) = (self.alpha[j], self.mean[j], self.inv_std[j]);
                dice_backward_lane(
                    &mut gr[j],
                    d * w[j],
                    xr[j],
                    alpha,
                    mean,
                    inv_std,
                    &mut dalpha[j],
                    &mut sum_gz[j],
                    &mut sum_gzz[j],
                );
            }
        }
    }

    #[inline(always)]
    fn dice_backward_finish_body<const FMA: bool, const WIDE: bool>(
        &self,
        x: &[f32],
        g: &mut [f32],
        mean_gz: &[f32],
        mean_gzz: &[f32],
        dbias: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: `WIDE` is only set by `multiversion!`'s AVX-512 build,
            // which runs only on CPUs with AVX-512.
            return unsafe { wide::dice_backward_finish(self, x, g, [mean_gz, mean_gzz], dbias) };
        }
        let c = self.channels;
        for (gr, xr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let params = self.mean.iter().zip(&self.inv_std).zip(mean_gz.iter().zip(mean_gzz));
            for (((g, &x), ((&m, &s), (&mg, &mgz))), db) in gr.iter_mut().zip(xr).zip(params).zip(dbias.iter_mut()) {
                let z = (x - m) * s;
                *g -= s * (mg + z * mgz);
                *db += *g;
            }
        }
    }

    /// `pre += bias` row by row (`bias` is `[channels]`), then `y = act(pre)`:
    /// one pass over the block instead of two.
    pub fn add_bias_apply(&self, pre: &mut [f32], bias: &[f32], y: &mut [f32]) {
        // Not built for AVX-512 as the two loops beside it are: with a separate
        // output this pass is bound by memory, and the wider build measured
        // slower (8.3% of training cycles against 6.6%).
        let c = self.channels;
        for (pr, yr) in pre.chunks_exact_mut(c).zip(y.chunks_exact_mut(c)) {
            pr.iter_mut().zip(bias).for_each(|(p, b)| *p += b);
            match self.kind {
                // `exp` per value: the wider builds pay, and give the bits
                // the other passes (built the same way) give.
                ActivationKind::Sigmoid | ActivationKind::Dice => self.apply_rows(pr, yr),
                ActivationKind::Relu | ActivationKind::Prelu => self.apply::<false, false>(pr, yr),
            }
        }
    }

    multiversion! {
        /// The backward pass of [`Rowwise::apply`], in place: `g` holds `dy` on
        /// entry and `dx` on return; the slope gradient is added to `dalpha`.
        pub fn backward(&self, x: &[f32], g: &mut [f32], dalpha: &mut [f32]) => backward_body;
    }

    #[inline(always)]
    fn backward_body<const FMA: bool, const WIDE: bool>(&self, x: &[f32], g: &mut [f32], dalpha: &mut [f32]) {
        debug_assert_eq!(x.len(), g.len());
        let c = self.channels;
        let (alpha, mean, inv_std) = (self.alpha, &self.mean[..], &self.inv_std[..]);
        match self.kind {
            ActivationKind::Relu => self.rows(x, g, |g, x, _| *g *= f32::from(u8::from(x > 0.0))),
            // sigmoid'(x) = s(1 - s), recomputed rather than kept from the forward pass.
            ActivationKind::Sigmoid => self.rows(x, g, |g, x, _| {
                let s = sigmoid::<FMA>(x);
                *g *= s * (1.0 - s)
            }),
            ActivationKind::Prelu => {
                for (gr, xr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    for (((g, &x), &a), da) in gr.iter_mut().zip(xr).zip(alpha).zip(dalpha.iter_mut()) {
                        *da += *g * x.min(0.0);
                        let pos = f32::from(u8::from(x > 0.0));
                        *g *= pos + (1.0 - pos) * a; // 1 if x > 0, else a
                    }
                }
            }
            ActivationKind::Dice => {
                for (gr, xr) in g.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    for j in 0..c {
                        let (x, dy) = (xr[j], gr[j]);
                        let p = sigmoid::<FMA>((x - mean[j]) * inv_std[j]);
                        dalpha[j] += dy * x * (1.0 - p);
                        // y = x(α + (1-α)p(z)), z = (x - mean)·inv_std with fixed moments.
                        gr[j] = dy * (alpha[j] + (1.0 - alpha[j]) * (p + x * p * (1.0 - p) * inv_std[j]));
                    }
                }
            }
        }
    }
}

/// The builds of the element-wise loops: the baseline x86-64 (SSE2, 4
/// lanes), AVX2 with FMA (8 lanes) and AVX-512 (16 lanes), chosen at run
/// time. The AVX2 and AVX-512 builds do the same arithmetic (`exp`'s
/// polynomial in fused multiply-adds, reductions in the same order), so
/// they give the same bits; the baseline build, for CPUs without FMA,
/// rounds each product of `exp` and may differ in the last bit.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest build this CPU runs (detected once).
#[cfg(target_arch = "x86_64")]
fn widest_build() -> Build {
    use std::arch::is_x86_feature_detected as has;
    static BUILD: std::sync::OnceLock<Build> = std::sync::OnceLock::new();
    *BUILD.get_or_init(|| {
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("avx2") && has!("fma") {
            Build::Avx512
        } else if has!("avx2") && has!("fma") {
            Build::Avx2
        } else {
            Build::Baseline
        }
    })
}

/// Channels per block of Dice's loops (see [`Rowwise::dice_in_place`] and
/// [`Rowwise::dice_backward_partial`]): one AVX2 vector.
const LANES: usize = 8;

/// Dice's per-channel parameters are padded with zeros to a multiple of
/// this many channels: one AVX-512 vector (see [`wide`]).
const PAD: usize = 16;

/// Channels of [`Rowwise::dice_in_place`]'s main loop: a multiple of its
/// vectorised iteration (8 lanes unrolled 4 times).
const DICE_MAIN: usize = 32;

/// Dice: `x·(α + (1-α)·p)` with `p = sigmoid(z)`, `z = (x - mean)·inv_std`,
/// that is `p·x + (1-p)·α·x`, from `α`, `1 - α`, `-inv_std` and
/// `mean·inv_std` (`-z` in one multiply-add).
#[inline(always)]
fn dice_inference<const FMA: bool>(
    x: f32,
    alpha: f32,
    one_minus_alpha: f32,
    neg_inv_std: f32,
    mean_inv_std: f32,
) -> f32 {
    dice_from_sigmoid::<FMA>(
        x,
        alpha,
        one_minus_alpha,
        dice_sigmoid::<FMA>(x, neg_inv_std, mean_inv_std),
    )
}

/// Dice's `p = sigmoid(z)` from `-inv_std` and `mean·inv_std`.
#[inline(always)]
fn dice_sigmoid<const FMA: bool>(x: f32, neg_inv_std: f32, mean_inv_std: f32) -> f32 {
    let (p, two_n) = exp_parts::<FMA>(fmadd::<FMA>(x, neg_inv_std, mean_inv_std)); // e^-z = p·2^n
    1.0 / fmadd::<FMA>(p, two_n, 1.0)
}

/// Dice's `x(1-α)·p + xα` from its sigmoid `p`: the products wait on
/// nothing, so one step follows the division.
#[inline(always)]
fn dice_from_sigmoid<const FMA: bool>(x: f32, alpha: f32, one_minus_alpha: f32, p: f32) -> f32 {
    fmadd::<FMA>(x * one_minus_alpha, p, x * alpha)
}

/// One element of [`Rowwise::dice_backward_partial`]: `g` from the
/// forward pass's sigmoid `p` to the gradient with the moments held fixed
/// (from `dy`); `da`, `sum_gz`, `sum_gzz` added to.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dice_backward_lane(
    g: &mut f32,
    dy: f32,
    x: f32,
    alpha: f32,
    mean: f32,
    inv_std: f32,
    da: &mut f32,
    sum_gz: &mut f32,
    sum_gzz: &mut f32,
) {
    let p = *g;
    let z = (x - mean) * inv_std;
    *da += dy * x * (1.0 - p);
    let gz = dy * (1.0 - alpha) * x * p * (1.0 - p);
    *sum_gz += gz;
    *sum_gzz += gz * z;
    // y = x(α + (1-α)p(z)): dy·∂y/∂x with the moments fixed.
    *g = dy * (alpha + (1.0 - alpha) * p) + inv_std * gz;
}

#[inline(always)]
fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    let (p, two_n) = exp_parts::<FMA>(-x);
    // 1 + e^-x in one multiply-add: one rounding and one step fewer
    // before the division.
    1.0 / fmadd::<FMA>(p, two_n, 1.0)
}

/// `a·b + c`: one fused multiply-add (one rounding) when `FMA`, else a
/// product and a sum. Only the builds compiled with FMA ask for it: without
/// the instruction, `mul_add` is a library call per value.
#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` as `(p, 2^n)`, `e^x = p·2^n` (callers that add to it do so in one
/// multiply-add), branch-free so that the activation loops calling it vectorise:
/// `f32::exp` is a libm call per element, which no loop vectorises (67% of
/// Dice inference's cycles went to it and to the scalar loop around it).
/// Hand-written because no maintained crate offers an inlinable scalar
/// `exp` that LLVM vectorises. Range reduction `x = n·ln 2 + r`, `|r| <=
/// ln 2 / 2` (ln 2 split in two parts, so `r` is exact), a degree-5
/// minimax polynomial for `e^r` (relative error 9.1e-8, under f32's
/// rounding; the Taylor polynomial needed degree 7) evaluated with fused
/// multiply-adds when `FMA` (see [`fmadd`]), and `2^n` built from its bits;
/// relative error within 2e-7 of `f32::exp` for `x` in [-87, 88] either
/// way (tested), which it clamps to (`e^-87` is about 1.6e-38, `e^88`
/// 1.65e38: a sigmoid saturates long before). NaN gives NaN.
#[inline(always)]
fn exp_parts<const FMA: bool>(x: f32) -> (f32, f32) {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = fmadd::<FMA>(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = fmadd::<FMA>(-n, LN2_LO, fmadd::<FMA>(-n, LN2_HI, x));
    let mut p = EXP_POLY[5];
    for &c in EXP_POLY[..5].iter().rev() {
        p = fmadd::<FMA>(p, r, c);
    }
    (p, two_to(t))
}

/// `2^n` from `t = n + ROUND` (see [`exp_parts`]). n is in [-126, 127]: 2^n is
/// a normal float. t's bits are those of 1.5·2^23 plus n, so 2^n's
/// exponent field (n + 127) is read from them with integer arithmetic:
/// `n as i32` is a saturating conversion, which the SSE2 build did one
/// lane at a time (a third of Dice inference's cycles there).
#[inline(always)]
fn two_to(t: f32) -> f32 {
    f32::from_bits(t.to_bits().wrapping_add(127u32.wrapping_sub(ROUND.to_bits())) << 23)
}

/// [`exp_parts`]'s range: `e^-87` is about 1.6e-38, `e^88` 1.65e38.
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with its low 12 bits zero, so that
/// n·LN2_HI is exact for |n| < 2^12.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5·2^23 rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// The minimax polynomial of e^r on [-ln 2 / 2, ln 2 / 2] with its
/// constant term 1 (relative error, Lawson's iteration), rounded to f32.
const EXP_POLY: [f32; 6] = [1.0, 0.999_999_7, 0.499_991_5, 0.166_676_36, 0.041_897_93, 0.008_290_315];

/// Dice's element-wise loops in AVX-512 intrinsics, 16 channels a vector,
/// for the AVX-512 build ([`Build::Avx512`]). Hand-written because LLVM
/// vectorised the scalar forms by 8 lanes there (the blocks of [`LANES`]),
/// or for widths that are not multiples of [`DICE_MAIN`] by 8 or fewer
/// (Dice over 40 channels ran at 0.4x its speed over 80). Each value takes
/// the operations of [`exp_parts`], [`dice_inference`] and
/// [`dice_backward_lane`] with fused multiply-adds, one for one and in
/// their order, and the per-channel sums are added row by row: the same
/// bits as the AVX2 build (tested).
#[cfg(target_arch = "x86_64")]
pub(crate) mod wide {
    use std::arch::x86_64::*;

    use super::{Rowwise, EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND};
    use crate::model::fused_f32::first_lanes;

    /// [`super::Moments::set`]'s two passes over `x` (`[rows, c]`) into
    /// `mean` and `m2` (`[c]` each, zeroed): per channel the same
    /// operations in the same order (f64 sums over the rows in order, then
    /// the mean, then `m2 += d·d` with `d·d` rounded first), so the same
    /// bits as the plain loops. Up to 64 channels at a time, their sums
    /// held in registers over all the rows. Written out because the
    /// compiled loops load and store every sum for every row: this runs
    /// Dice-attention training (`din bench run`, (80,40), batch 1024) about
    /// 5% faster.
    ///
    /// # Safety
    /// AVX-512F; `x` holds `rows * c` values, `mean` and `m2` `c` each.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn moments(x: &[f32], c: usize, rows: usize, mean: &mut [f64], m2: &mut [f64]) {
        if rows == 0 {
            return;
        }
        for j0 in (0..c).step_by(64) {
            let w = (c - j0).min(64);
            let mask = first_lanes(w - 16 * (w.div_ceil(16) - 1));
            let (x, mean, m2) = (x.as_ptr().add(j0), mean.as_mut_ptr().add(j0), m2.as_mut_ptr().add(j0));
            match w.div_ceil(16) {
                1 => moments_block::<1, 2>(x, c, rows, mask, mean, m2),
                2 => moments_block::<2, 4>(x, c, rows, mask, mean, m2),
                3 => moments_block::<3, 6>(x, c, rows, mask, mean, m2),
                _ => moments_block::<4, 8>(x, c, rows, mask, mean, m2),
            }
        }
    }

    /// [`moments`] of `V` vectors of channels (`H = 2 V` halves of 8 f64
    /// lanes), the last vector's lanes in `mask`.
    #[target_feature(enable = "avx512f")]
    unsafe fn moments_block<const V: usize, const H: usize>(
        x: *const f32,
        c: usize,
        rows: usize,
        mask: u16,
        mean: *mut f64,
        m2: *mut f64,
    ) {
        let lanes = |v: usize| if v + 1 == V { mask } else { u16::MAX };
        // Half `h` of the row: its 8 values in f64.
        let halves = |row: *const f32| {
            let mut out = [_mm512_setzero_pd(); H];
            for v in 0..V {
                let f = _mm512_maskz_loadu_ps(lanes(v), row.add(16 * v));
                out[2 * v] = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
                out[2 * v + 1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(f))));
            }
            out
        };
        let half_mask = |h: usize| (lanes(h / 2) >> (8 * (h % 2))) as __mmask8;
        let mut sum = [_mm512_setzero_pd(); H];
        for r in 0..rows {
            let v = halves(x.add(r * c));
            for h in 0..H {
                sum[h] = _mm512_add_pd(sum[h], v[h]);
            }
        }
        let n = _mm512_set1_pd(rows as f64);
        for (h, sum) in sum.iter_mut().enumerate() {
            *sum = _mm512_div_pd(*sum, n);
            _mm512_mask_storeu_pd(mean.add(8 * h), half_mask(h), *sum);
        }
        let mut dev = [_mm512_setzero_pd(); H];
        for r in 0..rows {
            let v = halves(x.add(r * c));
            for h in 0..H {
                let d = _mm512_sub_pd(v[h], sum[h]);
                dev[h] = _mm512_add_pd(dev[h], _mm512_mul_pd(d, d));
            }
        }
        for (h, dev) in dev.iter().enumerate() {
            _mm512_mask_storeu_pd(m2.add(8 * h), half_mask(h), *dev);
        }
    }

    /// Rows ahead that [`dice_backward_partial`] asks for.
    const AHEAD: usize = 8;

    /// [`super::exp_parts`] with fused multiply-adds.
    #[inline(always)]
    unsafe fn exp_parts(x: __m512) -> (__m512, __m512) {
        // `clamp`: `max(min, x)` and `min(max, x)` return `x` when it is NaN.
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_MAX), _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x));
        let round = _mm512_set1_ps(ROUND);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), round);
        let n = _mm512_sub_ps(t, round);
        // fma(-n, c, v) is -(n·c) + v, rounded once either way.
        let r = _mm512_fnmadd_ps(
            n,
            _mm512_set1_ps(LN2_LO),
            _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x),
        );
        let mut p = _mm512_set1_ps(EXP_POLY[5]);
        for &c in EXP_POLY[..5].iter().rev() {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        // `two_to`: the exponent field from t's bits.
        let shift = _mm512_set1_epi32(127u32.wrapping_sub(ROUND.to_bits()) as i32);
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_castps_si512(t), shift));
        (p, _mm512_castsi512_ps(two_n))
    }

    /// `1 / (1 + p·2^n)`: the sigmoid from `exp_parts(-z)`.
    #[inline(always)]
    unsafe fn reciprocal_one_plus((p, two_n): (__m512, __m512)) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        _mm512_div_ps(one, _mm512_fmadd_ps(p, two_n, one))
    }

    /// [`super::dice_inference`] on the vector of channels `j..j + 16`
    /// (`params`: [`Rowwise`]'s `dice_params`, padded to whole vectors):
    /// the values and their sigmoids.
    #[inline(always)]
    unsafe fn dice_vector([a, oma, ns, ms]: &[Vec<f32>; 4], xv: __m512, j: usize) -> (__m512, __m512) {
        let (av, omav) = (_mm512_loadu_ps(a.as_ptr().add(j)), _mm512_loadu_ps(oma.as_ptr().add(j)));
        let (nsv, msv) = (_mm512_loadu_ps(ns.as_ptr().add(j)), _mm512_loadu_ps(ms.as_ptr().add(j)));
        let s = reciprocal_one_plus(exp_parts(_mm512_fmadd_ps(xv, nsv, msv)));
        (_mm512_fmadd_ps(_mm512_mul_ps(xv, omav), s, _mm512_mul_ps(xv, av)), s)
    }

    /// Where [`activate_rows`] reads the values it activates: the vector of
    /// row `r`'s channels `j..` (lanes `m`; the others zero).
    trait Values {
        /// # Safety
        /// AVX-512F; row `r` and channels `j..` (lanes `m`) lie inside the values.
        unsafe fn load(&self, r: usize, j: usize, m: u16) -> __m512;
    }

    /// The values as they are (`[rows, c]` from a pointer).
    struct Plain(*const f32, usize);

    impl Values for Plain {
        #[inline(always)]
        unsafe fn load(&self, r: usize, j: usize, m: u16) -> __m512 {
            _mm512_maskz_loadu_ps(m, self.0.add(r * self.1 + j))
        }
    }

    /// The values plus `extra` (if any) plus `bias`, summed as
    /// [`Rowwise::add_apply_in_place`] sums them: `x + (e + b)`, or `x + b`.
    struct Summed {
        x: *const f32,
        extra: Option<*const f32>,
        bias: *const f32,
        c: usize,
    }

    impl Values for Summed {
        #[inline(always)]
        unsafe fn load(&self, r: usize, j: usize, m: u16) -> __m512 {
            let at = r * self.c + j;
            let x = _mm512_maskz_loadu_ps(m, self.x.add(at));
            let b = _mm512_maskz_loadu_ps(m, self.bias.add(j));
            match self.extra {
                Some(e) => _mm512_add_ps(x, _mm512_add_ps(_mm512_maskz_loadu_ps(m, e.add(at)), b)),
                None => _mm512_add_ps(x, b),
            }
        }
    }

    /// `y[r] = dice(values[r])` for `rows` rows of `rw.channels`, `y` at
    /// `y`; `values` may read from `y` (in place). With `KEEP`, each
    /// value's sigmoid goes to `p` (laid out as `y`).
    ///
    /// A row's last channels are one whole vector that overlaps the one
    /// before, read before anything of the row is written and written last
    /// (the overlap gets the same values twice): a masked store there would
    /// hold up the next row's loads from the same lines.
    #[inline(always)]
    unsafe fn activate_rows<const KEEP: bool>(
        rw: &Rowwise<'_>,
        values: &impl Values,
        rows: usize,
        y: *mut f32,
        p: *mut f32,
    ) {
        let c = rw.channels;
        let params = &rw.dice_params;
        let whole = c - c % 16;
        for r in 0..rows {
            let (yr, pr) = (y.add(r * c), p.wrapping_add(r * c));
            if c < 16 {
                let m = first_lanes(c);
                let (yv, s) = dice_vector(params, values.load(r, 0, m), 0);
                _mm512_mask_storeu_ps(yr, m, yv);
                if KEEP {
                    _mm512_mask_storeu_ps(pr, m, s);
                }
                continue;
            }
            let last = (whole < c).then(|| values.load(r, c - 16, u16::MAX));
            for j in (0..whole).step_by(16) {
                store::<KEEP>(
                    yr.add(j),
                    pr.wrapping_add(j),
                    dice_vector(params, values.load(r, j, u16::MAX), j),
                );
            }
            if let Some(v) = last {
                store::<KEEP>(yr.add(c - 16), pr.wrapping_add(c - 16), dice_vector(params, v, c - 16));
            }
        }
    }

    /// A whole vector of [`dice_vector`]'s values to `y`, and with `KEEP`
    /// its sigmoids to `p` (a function, not a closure: a closure does not
    /// get the caller's target features, so its intrinsics are not inlined).
    #[inline(always)]
    unsafe fn store<const KEEP: bool>(y: *mut f32, p: *mut f32, (yv, s): (__m512, __m512)) {
        _mm512_storeu_ps(y, yv);
        if KEEP {
            _mm512_storeu_ps(p, s);
        }
    }

    /// `x = dice(x + extra + bias)` in place, row by row, each sum
    /// activated while in a register (a separate pass's narrower stores
    /// would hold up the wide loads after them).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn add_dice_in_place(rw: &Rowwise<'_>, x: &mut [f32], extra: Option<&[f32]>, bias: &[f32]) {
        let c = rw.channels;
        assert!(
            bias.len() >= c && extra.is_none_or(|e| e.len() >= x.len()),
            "Dice: bias or addend shorter than the values"
        );
        if c == 0 {
            return;
        }
        let y = x.as_mut_ptr();
        let values = Summed {
            x: y,
            extra: extra.map(<[f32]>::as_ptr),
            bias: bias.as_ptr(),
            c,
        };
        activate_rows::<false>(rw, &values, x.len() / c, y, std::ptr::null_mut());
    }

    /// `y = dice(x)`, row by row (Dice at inference or with fixed moments).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn dice(rw: &Rowwise<'_>, x: &[f32], y: &mut [f32]) {
        let c = rw.channels;
        if c == 0 {
            return;
        }
        let rows = x.len().min(y.len()) / c;
        activate_rows::<false>(rw, &Plain(x.as_ptr(), c), rows, y.as_mut_ptr(), std::ptr::null_mut());
    }

    /// [`Rowwise::dice_keeping_sigmoid`]: `y = dice(x)` and the sigmoids
    /// into `p`, row by row.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn dice_keeping_sigmoid(rw: &Rowwise<'_>, x: &[f32], y: &mut [f32], p: &mut [f32]) {
        let c = rw.channels;
        if c == 0 {
            return;
        }
        let rows = x.len().min(y.len()).min(p.len()) / c;
        activate_rows::<true>(rw, &Plain(x.as_ptr(), c), rows, y.as_mut_ptr(), p.as_mut_ptr());
    }

    /// Asks for the lines of `x` and `g` at `at`, [`AHEAD`] rows of `c`
    /// on (the training passes' rows come from L3 or memory: their buffers
    /// are tens of MiB), if row `r + AHEAD` is one of the `rows`.
    #[inline(always)]
    unsafe fn prefetch_ahead(x: &[f32], g: &[f32], (r, rows): (usize, usize), at: usize, c: usize) {
        if r + AHEAD < rows {
            _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().add(at + AHEAD * c).cast());
            _mm_prefetch::<_MM_HINT_T0>(g.as_ptr().add(at + AHEAD * c).cast());
        }
    }

    /// [`Rowwise::dice_backward_partial`]: channel vector by channel
    /// vector, its rows in order, the slope gradient and the sums held in
    /// registers over the rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn dice_backward_partial(
        rw: &Rowwise<'_>,
        x: &[f32],
        dy: &[f32],
        g: &mut [f32],
        dalpha: &mut [f32],
        sums: &mut [f32],
    ) {
        let c = rw.channels;
        assert!(
            rw.alpha.len() >= c
                && rw.mean.len() >= c
                && rw.inv_std.len() >= c
                && dalpha.len() >= c
                && sums.len() >= 2 * c,
            "Dice's backward pass: parameters or sums shorter than {c} channels"
        );
        if c == 0 {
            return;
        }
        let rows = (x.len() / c).min(g.len() / c).min(dy.len() / c);
        for j in (0..c).step_by(16) {
            let m = first_lanes(c - j);
            let ch = Channels::load(rw, j, m);
            let at_sums = PartialSums::at(dalpha, sums, c, j);
            let mut acc = at_sums.load(m);
            for r in 0..rows {
                let at = r * c + j;
                prefetch_ahead(x, g, (r, rows), at, c);
                let dyv = _mm512_maskz_loadu_ps(m, dy.as_ptr().add(at));
                let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(at));
                let p = _mm512_maskz_loadu_ps(m, g.as_ptr().add(at));
                let gv = ch.partial(dyv, xv, p, &mut acc);
                _mm512_mask_storeu_ps(g.as_mut_ptr().add(at), m, gv);
            }
            at_sums.store(m, acc);
        }
    }

    /// [`Rowwise::dice_backward_partial_scored`]: channel vector by channel
    /// vector, its rows in order, the sums held in registers over the rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn dice_backward_partial_scored(
        rw: &Rowwise<'_>,
        x: &[f32],
        ds: &[f32],
        w: &[f32],
        g: &mut [f32],
        dw: &mut [f32],
        dalpha: &mut [f32],
        sums: &mut [f32],
    ) {
        let c = rw.channels;
        // (`w`, `dw`, `dalpha` and `sums`: checked by the caller.)
        assert!(
            rw.alpha.len() >= c && rw.mean.len() >= c && rw.inv_std.len() >= c,
            "Dice's backward pass: parameters shorter than {c} channels"
        );
        if c == 0 {
            return;
        }
        let rows = (x.len() / c).min(g.len() / c).min(ds.len());
        for j in (0..c).step_by(16) {
            let m = first_lanes(c - j);
            let ch = Channels::load(rw, j, m);
            let at_sums = PartialSums::at(dalpha, sums, c, j);
            let mut acc = at_sums.load(m);
            let wv = _mm512_maskz_loadu_ps(m, w.as_ptr().add(j));
            let mut dwv = _mm512_maskz_loadu_ps(m, dw.as_ptr().add(j));
            for r in 0..rows {
                let at = r * c + j;
                prefetch_ahead(x, g, (r, rows), at, c);
                let d = _mm512_set1_ps(*ds.get_unchecked(r));
                let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(at));
                let p = _mm512_maskz_loadu_ps(m, g.as_ptr().add(at));
                dwv = _mm512_add_ps(dwv, _mm512_mul_ps(ch.output(xv, p), d));
                let gv = ch.partial(_mm512_mul_ps(d, wv), xv, p, &mut acc);
                _mm512_mask_storeu_ps(g.as_mut_ptr().add(at), m, gv);
            }
            at_sums.store(m, acc);
            _mm512_mask_storeu_ps(dw.as_mut_ptr().add(j), m, dwv);
        }
    }

    /// Where the first backward half's sums of channels `j..` sit: the
    /// slope gradient in `dalpha` (`[c]`), `Σ gz` and `Σ gz·z` in the
    /// halves of `sums` (`[2, c]`); in the order of [`Channels::partial`]'s `acc`.
    pub(crate) struct PartialSums([*mut f32; 3]);

    impl PartialSums {
        /// Channels `j..` of `dalpha` and `sums` (callers check their lengths).
        #[inline(always)]
        pub(crate) unsafe fn at(dalpha: &mut [f32], sums: &mut [f32], c: usize, j: usize) -> Self {
            let s = sums.as_mut_ptr();
            PartialSums([dalpha.as_mut_ptr().add(j), s.add(j), s.add(c + j)])
        }

        /// The sums, lanes `m` (the others zero).
        #[inline(always)]
        pub(crate) unsafe fn load(&self, m: u16) -> [__m512; 3] {
            // Not `map`: a closure is not compiled with the caller's target
            // features, and its intrinsics would not be inlined.
            let [a, b, c] = self.0;
            [
                _mm512_maskz_loadu_ps(m, a),
                _mm512_maskz_loadu_ps(m, b),
                _mm512_maskz_loadu_ps(m, c),
            ]
        }

        /// Writes lanes `m` of `v` back.
        #[inline(always)]
        pub(crate) unsafe fn store(&self, m: u16, v: [__m512; 3]) {
            for (p, v) in self.0.into_iter().zip(v) {
                _mm512_mask_storeu_ps(p, m, v);
            }
        }
    }

    /// [`Rowwise::dice_backward_finish`]: channel vector by channel vector,
    /// its rows in order, the bias gradient held in a register over the rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn dice_backward_finish(
        rw: &Rowwise<'_>,
        x: &[f32],
        g: &mut [f32],
        [mean_gz, mean_gzz]: [&[f32]; 2],
        dbias: &mut [f32],
    ) {
        let c = rw.channels;
        assert!(
            rw.mean.len() >= c
                && rw.inv_std.len() >= c
                && mean_gz.len() >= c
                && mean_gzz.len() >= c
                && dbias.len() >= c,
            "Dice's backward pass: moments or sums shorter than {c} channels"
        );
        if c == 0 {
            return;
        }
        let rows = (x.len() / c).min(g.len() / c);
        for j in (0..c).step_by(16) {
            let m = first_lanes(c - j);
            let mean = _mm512_maskz_loadu_ps(m, rw.mean.as_ptr().add(j));
            let inv_std = _mm512_maskz_loadu_ps(m, rw.inv_std.as_ptr().add(j));
            let mg = _mm512_maskz_loadu_ps(m, mean_gz.as_ptr().add(j));
            let mgz = _mm512_maskz_loadu_ps(m, mean_gzz.as_ptr().add(j));
            let mut db = _mm512_maskz_loadu_ps(m, dbias.as_ptr().add(j));
            for r in 0..rows {
                let at = r * c + j;
                prefetch_ahead(x, g, (r, rows), at, c);
                let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(at));
                let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(at));
                // As the scalar form: z = (x - m)·s; g -= s·(mg + z·mgz).
                let z = _mm512_mul_ps(_mm512_sub_ps(xv, mean), inv_std);
                let gv = _mm512_sub_ps(gv, _mm512_mul_ps(inv_std, _mm512_add_ps(mg, _mm512_mul_ps(z, mgz))));
                db = _mm512_add_ps(db, gv);
                _mm512_mask_storeu_ps(g.as_mut_ptr().add(at), m, gv);
            }
            _mm512_mask_storeu_ps(dbias.as_mut_ptr().add(j), m, db);
        }
    }

    /// Dice's parameters of a vector of 16 channels, with the batch's moments.
    pub(crate) struct Channels {
        alpha: __m512,
        one_minus_alpha: __m512,
        mean: __m512,
        inv_std: __m512,
    }

    impl Channels {
        /// Channels `j..` of `rw`, `m`'s lanes (the others zero).
        #[inline(always)]
        pub(crate) unsafe fn load(rw: &Rowwise<'_>, j: usize, m: u16) -> Self {
            let alpha = _mm512_maskz_loadu_ps(m, rw.alpha.as_ptr().add(j));
            Channels {
                alpha,
                one_minus_alpha: _mm512_sub_ps(_mm512_set1_ps(1.0), alpha),
                mean: _mm512_maskz_loadu_ps(m, rw.mean.as_ptr().add(j)),
                inv_std: _mm512_maskz_loadu_ps(m, rw.inv_std.as_ptr().add(j)),
            }
        }

        /// Dice's output from the input `x` and its sigmoid `p`, as
        /// [`super::dice_from_sigmoid`] (and the forward pass) computes it.
        #[inline(always)]
        pub(crate) unsafe fn output(&self, x: __m512, p: __m512) -> __m512 {
            _mm512_fmadd_ps(_mm512_mul_ps(x, self.one_minus_alpha), p, _mm512_mul_ps(x, self.alpha))
        }

        /// [`super::dice_backward_lane`] on a vector, operation for
        /// operation: returns `g` from `dy`, the input `x` and its sigmoid
        /// `p`; adds to `acc`, `[dalpha, Σ gz, Σ gz·z]`.
        #[inline(always)]
        pub(crate) unsafe fn partial(&self, dy: __m512, x: __m512, p: __m512, acc: &mut [__m512; 3]) -> __m512 {
            let (a, oma, inv_std) = (self.alpha, self.one_minus_alpha, self.inv_std);
            let z = _mm512_mul_ps(_mm512_sub_ps(x, self.mean), inv_std);
            let omp = _mm512_sub_ps(_mm512_set1_ps(1.0), p);
            acc[0] = _mm512_add_ps(acc[0], _mm512_mul_ps(_mm512_mul_ps(dy, x), omp));
            let gz = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dy, oma), x), p), omp);
            acc[1] = _mm512_add_ps(acc[1], gz);
            acc[2] = _mm512_add_ps(acc[2], _mm512_mul_ps(gz, z));
            _mm512_add_ps(
                _mm512_mul_ps(dy, _mm512_add_ps(a, _mm512_mul_ps(oma, p))),
                _mm512_mul_ps(inv_std, gz),
            )
        }
    }
}

impl Activation {
    /// A new activation over `channels`.
    pub fn new(kind: ActivationKind, channels: usize) -> Self {
        let (alpha, stats) = match kind {
            ActivationKind::Prelu => (Some(Param::filled(PRELU_INIT, vec![channels], Role::Alpha)), false),
            ActivationKind::Dice => (Some(Param::filled(0.0, vec![channels], Role::Alpha)), true),
            ActivationKind::Relu | ActivationKind::Sigmoid => (None, false),
        };
        Activation {
            kind,
            alpha,
            running_mean: stats.then(|| Param::filled(0.0, vec![channels], Role::Statistic)),
            running_var: stats.then(|| Param::filled(1.0, vec![channels], Role::Statistic)),
        }
    }

    /// Whether this activation treats every row on its own in `mode`, so that
    /// blocks of rows can be computed independently: everything except Dice in
    /// training, whose batch statistics couple all rows.
    pub fn is_rowwise(&self, mode: Mode) -> bool {
        !(self.kind == ActivationKind::Dice && mode == Mode::Train)
    }

    /// The row-wise form of this activation (see [`Activation::is_rowwise`]):
    /// its per-channel parameters gathered once, Dice with its moving averages.
    pub fn rowwise(&self, channels: usize) -> Rowwise<'_> {
        let alpha = self.alpha.as_ref().map_or(&[][..], |a| &a.value[..]);
        let (mean, inv_std) = if self.kind == ActivationKind::Dice {
            let mean = self
                .running_mean
                .as_ref()
                .map_or_else(|| vec![0.0; channels], |p| p.value.clone());
            let inv_std = self.running_var.as_ref().map_or_else(
                || vec![1.0 / (1.0 + DICE_EPS).sqrt(); channels],
                |p| p.value.iter().map(|v| 1.0 / (v + DICE_EPS).sqrt()).collect(),
            );
            (mean, inv_std)
        } else {
            (Vec::new(), Vec::new())
        };
        Rowwise::new(self.kind, channels, alpha, mean, inv_std)
    }

    /// The row-wise form of this activation with the given per-channel
    /// mean and biased variance (`[channels]` each) in place of Dice's
    /// moving averages: Dice in training once its batch's moments are known.
    pub fn rowwise_with_moments(&self, mean: &[f32], var: &[f32]) -> Rowwise<'_> {
        Rowwise::new(
            self.kind,
            mean.len(),
            self.alpha.as_ref().map_or(&[][..], |a| &a.value[..]),
            mean.to_vec(),
            var.iter().map(|v| 1.0 / (v + DICE_EPS).sqrt()).collect(),
        )
    }

    /// `y = act(x)` over `[rows, channels]`. Dice uses batch statistics in
    /// [`Mode::Train`] and the moving averages in [`Mode::Infer`].
    pub fn forward(&self, x: &[f32], rows: usize, mode: Mode, y: &mut Vec<f32>) -> ActivationCache {
        y.clear();
        y.resize(x.len(), 0.0);
        let mut cache = ActivationCache::default();
        if x.is_empty() {
            return cache;
        }
        let c = x.len() / rows;
        if self.is_rowwise(mode) {
            self.rowwise(c).apply_rows(x, y);
            return cache;
        }
        // Dice in training: normalise by the batch's own moments.
        cache.batch_stats = true;
        cache.rows = rows;
        let mut moments = Moments::default();
        moments.set(x, c);
        (cache.mean, cache.batch_var) = moments.mean_var();
        cache.inv_std = cache.batch_var.iter().map(|v| 1.0 / (v + DICE_EPS).sqrt()).collect();
        cache.p = vec![0.0; x.len()];
        let alpha = &self.alpha_values();
        for ((yr, xr), pr) in y
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(cache.p.chunks_exact_mut(c))
        {
            for j in 0..c {
                let p = sigmoid::<false>((xr[j] - cache.mean[j]) * cache.inv_std[j]);
                pr[j] = p;
                yr[j] = xr[j] * (alpha[j] + (1.0 - alpha[j]) * p); // p·x + (1-p)·α·x
            }
        }
        cache
    }

    /// Writes `dx` from `dy` and accumulates the slope gradient.
    pub fn backward(&mut self, x: &[f32], rows: usize, cache: &ActivationCache, dy: &[f32], dx: &mut Vec<f32>) {
        dx.clear();
        dx.extend_from_slice(dy);
        if x.is_empty() {
            return;
        }
        let c = x.len() / rows;
        let mut dalpha = vec![0.0f32; if self.alpha.is_some() { c } else { 0 }];
        if !cache.batch_stats {
            self.rowwise(c).backward(x, dx, &mut dalpha);
            self.add_alpha_grad(&dalpha);
            return;
        }
        // Dice with batch statistics.
        let alpha = self.alpha_values();
        // gz: gradient reaching z = (x - mean) * inv_std.
        let mut gz = vec![0.0f32; x.len()];
        for r in 0..rows {
            for j in 0..c {
                let i = r * c + j;
                let (xi, p, g) = (x[i], cache.p[i], dy[i]);
                dx[i] = g * (alpha[j] + (1.0 - alpha[j]) * p);
                dalpha[j] += g * xi * (1.0 - p);
                gz[i] = g * (1.0 - alpha[j]) * xi * p * (1.0 - p);
            }
        }
        // Batch-normalisation backward: the mean and variance depend on x.
        let n = rows as f32;
        let mut mean_gz = vec![0.0f32; c];
        let mut mean_gz_z = vec![0.0f32; c];
        for r in 0..rows {
            for j in 0..c {
                let i = r * c + j;
                let z = (x[i] - cache.mean[j]) * cache.inv_std[j];
                mean_gz[j] += gz[i] / n;
                mean_gz_z[j] += gz[i] * z / n;
            }
        }
        for r in 0..rows {
            for j in 0..c {
                let i = r * c + j;
                let z = (x[i] - cache.mean[j]) * cache.inv_std[j];
                dx[i] += cache.inv_std[j] * (gz[i] - mean_gz[j] - z * mean_gz_z[j]);
            }
        }
        self.add_alpha_grad(&dalpha);
    }

    /// Folds a training batch's statistics into Dice's moving averages.
    /// A one-row batch has zero variance and says nothing about the spread,
    /// so it leaves the averages alone.
    pub fn update_statistics(&mut self, cache: &ActivationCache) {
        if cache.batch_stats {
            self.fold_statistics(&cache.mean, &cache.batch_var, cache.rows);
        }
    }

    /// Folds a training batch's mean and biased variance (`[channels]`
    /// each, over `rows` rows) into Dice's moving averages; as
    /// [`Activation::update_statistics`], a batch of fewer than two rows
    /// leaves them alone.
    pub fn fold_statistics(&mut self, mean: &[f32], var: &[f32], rows: usize) {
        if rows < 2 {
            return;
        }
        for (stat, batch) in [(&mut self.running_mean, mean), (&mut self.running_var, var)] {
            if let Some(p) = stat {
                for (m, b) in p.value.iter_mut().zip(batch) {
                    *m = DICE_MOMENTUM * *m + (1.0 - DICE_MOMENTUM) * b;
                }
            }
        }
    }

    fn alpha_values(&self) -> Vec<f32> {
        self.alpha.as_ref().map(|a| a.value.clone()).unwrap_or_default()
    }

    fn add_alpha_grad(&mut self, d: &[f32]) {
        if let Some(a) = &mut self.alpha {
            a.grad.iter_mut().zip(d).for_each(|(g, d)| *g += d);
        }
    }
}

/// [`Moments::set`]'s two passes over the rows of `x` (`[rows, c]`) into
/// `mean` and `m2` (`[c]` each, zeroed), as plain loops: the sums in f64
/// over the rows in order, the mean, then `m2 += d·d`.
fn plain_moments(x: &[f32], c: usize, mean: &mut [f64], m2: &mut [f64]) {
    let rows = (x.len() / c) as f64;
    for xr in x.chunks_exact(c) {
        mean.iter_mut().zip(xr).for_each(|(s, &v)| *s += f64::from(v));
    }
    mean.iter_mut().for_each(|s| *s /= rows);
    for xr in x.chunks_exact(c) {
        for ((m2, &m), &v) in m2.iter_mut().zip(&*mean).zip(xr) {
            let d = f64::from(v) - m;
            *m2 += d * d;
        }
    }
}

/// Per-channel moments of a block of rows: the row count, the mean and the
/// sum of squared deviations from it, in f64. A batch cut into chunks gets
/// its moments by merging its chunks' in chunk order, so they do not depend
/// on how the chunks were spread over threads.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Moments {
    rows: usize,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    /// Sets these to the moments of `x` (`[rows, channels]`): its mean,
    /// then the squared deviations from it, each pass in row order.
    /// Reuses the buffers.
    pub fn set(&mut self, x: &[f32], channels: usize) {
        let c = channels;
        self.rows = x.len().checked_div(c).unwrap_or(0);
        self.mean.clear();
        self.mean.resize(c, 0.0);
        self.m2.clear();
        self.m2.resize(c, 0.0);
        if self.rows == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(widest_build(), Build::Avx512) {
            // SAFETY: the CPU has AVX-512F; `x` holds `rows` rows of `c`,
            // and `mean` and `m2` `c` values each.
            return unsafe { wide::moments(x, c, self.rows, &mut self.mean, &mut self.m2) };
        }
        plain_moments(x, c, &mut self.mean, &mut self.m2);
    }

    /// Adds `other`'s rows (the pairwise update of Chan, Golub and LeVeque:
    /// no cancellation between large sums of squares).
    pub fn merge(&mut self, other: &Moments) {
        if other.rows == 0 {
            return;
        }
        if self.rows == 0 {
            self.clone_from(other);
            return;
        }
        let (na, nb) = (self.rows as f64, other.rows as f64);
        let n = na + nb;
        for (((ma, m2a), &mb), &m2b) in self.mean.iter_mut().zip(&mut self.m2).zip(&other.mean).zip(&other.m2) {
            let delta = mb - *ma;
            *ma += delta * nb / n;
            *m2a += m2b + delta * delta * na * nb / n;
        }
        self.rows += other.rows;
    }

    /// Rows seen.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The mean and the biased variance per channel, in f32.
    pub fn mean_var(&self) -> (Vec<f32>, Vec<f32>) {
        let rows = self.rows.max(1) as f64;
        (
            self.mean.iter().map(|&m| m as f32).collect(),
            self.m2.iter().map(|&s| (s / rows) as f32).collect(),
        )
    }
}

impl Module for Activation {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a Param)) {
        let tensors = [
            ("alpha", &self.alpha),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ];
        for (name, p) in tensors {
            if let Some(p) = p {
                f(format!("{prefix}.{name}"), p);
            }
        }
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(String, &mut Param)) {
        let tensors = [
            ("alpha", &mut self.alpha),
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
        ];
        for (name, p) in tensors {
            if let Some(p) = p {
                f(format!("{prefix}.{name}"), p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_2e_7_of_std_exp_and_saturates() {
        fn check<const FMA: bool>() {
            let exp = |x: f32| {
                let (p, two_n) = super::exp_parts::<FMA>(x);
                p * two_n
            };
            let sigmoid = super::sigmoid::<FMA>;
            let mut worst = 0f64;
            for i in 0..=2_000_000 {
                let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
                let (got, want) = (exp(x) as f64, (x as f64).exp());
                worst = worst.max((got - want).abs() / want);
            }
            assert!(worst < 2e-7, "FMA {FMA}: relative error {worst:e}");
            for x in [0.0f32, 1.0, -1.0, 0.5, 1e-8, -1e-8] {
                assert!((exp(x) - x.exp()).abs() <= 1.2e-7 * x.exp(), "FMA {FMA}: {x}");
            }
            assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
            assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
            assert!(exp(f32::NAN).is_nan());
            assert_eq!((sigmoid(-200.0), sigmoid(200.0)), (sigmoid(-88.0), 1.0));
            assert!(sigmoid(-200.0) < 1e-37);
            assert!(sigmoid(f32::NAN).is_nan());
        }
        check::<false>();
        check::<true>();
    }

    use super::super::testutil::{assert_close, dot, numeric_grad, rand_vec};
    use super::*;

    /// A block's moments: the plain loops' bits in whichever build this
    /// CPU runs, for widths below, at and past a vector and a block of 64
    /// channels, channels far from zero, and a partial last row (ignored);
    /// and the exact values where they are known.
    #[test]
    fn moments_give_the_plain_loops_bits_and_known_values() {
        for (i, c) in [1usize, 7, 8, 15, 16, 17, 40, 63, 64, 65, 80, 128, 129, 200]
            .into_iter()
            .enumerate()
        {
            for rows in [0usize, 1, 2, 7, 301] {
                let noise = rand_vec(rows * c + c - 1, (100 * i + rows) as u64);
                let x: Vec<f32> = noise
                    .iter()
                    .enumerate()
                    .map(|(k, &v)| v * (1 + k % 5) as f32 + [0.0, 1e3, -3e4, 0.5][k % c % 4])
                    .collect();
                let mut got = Moments::default();
                got.set(&x, c);
                let (mut mean, mut m2) = (vec![0.0; c], vec![0.0; c]);
                if rows > 0 {
                    plain_moments(&x[..rows * c], c, &mut mean, &mut m2);
                }
                assert_eq!(got.rows, rows, "{c} channels");
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.mean), bits(&mean), "mean, {c} channels, {rows} rows");
                assert_eq!(bits(&got.m2), bits(&m2), "m2, {c} channels, {rows} rows");
            }
            // Channel j of row r is 1000 j + r: mean 1000 j + (n - 1) / 2,
            // m2 = n (n² - 1) / 12, exactly.
            let n = 301usize;
            let x: Vec<f32> = (0..n * c).map(|k| (1000 * (k % c) + k / c) as f32).collect();
            let mut got = Moments::default();
            got.set(&x, c);
            for j in 0..c {
                assert_eq!(
                    got.mean[j],
                    1000.0 * j as f64 + (n - 1) as f64 / 2.0,
                    "channel {j} of {c}"
                );
                assert_eq!(got.m2[j], (n * (n * n - 1)) as f64 / 12.0, "channel {j} of {c}");
            }
        }
    }

    fn check(kind: ActivationKind, mode: Mode) {
        let (rows, c) = (6, 3);
        let mut act = Activation::new(kind, c);
        if let Some(a) = &mut act.alpha {
            a.value = vec![0.1, 0.3, -0.2];
        }
        if let Some(m) = &mut act.running_mean {
            m.value = vec![0.1, -0.2, 0.05];
        }
        if let Some(v) = &mut act.running_var {
            v.value = vec![0.5, 1.5, 0.8];
        }
        // Keep inputs away from PReLU/ReLU's kink at 0, where finite differences are undefined.
        let x: Vec<f32> = rand_vec(rows * c, 7)
            .iter()
            .map(|v| if v.abs() < 0.05 { v + 0.1 } else { *v })
            .collect();
        let r = rand_vec(rows * c, 8);
        let loss = |a: &Activation, x: &[f32]| {
            let mut y = Vec::new();
            a.forward(x, rows, mode, &mut y);
            dot(&r, &y)
        };
        let mut y = Vec::new();
        let cache = act.forward(&x, rows, mode, &mut y);
        let mut dx = Vec::new();
        act.backward(&x, rows, &cache, &r, &mut dx);
        let nx = numeric_grad(&x, 1e-3, |x| loss(&act, x));
        assert_close(&format!("{kind:?} {mode:?} dx"), &dx, &nx, 1e-2);
        if let Some(alpha) = &act.alpha {
            let na = numeric_grad(&alpha.value, 1e-3, |a| {
                let mut m = act.clone();
                if let Some(p) = &mut m.alpha {
                    p.value = a.to_vec();
                }
                loss(&m, &x)
            });
            assert_close(&format!("{kind:?} {mode:?} dalpha"), &alpha.grad, &na, 1e-2);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for kind in [
            ActivationKind::Prelu,
            ActivationKind::Dice,
            ActivationKind::Relu,
            ActivationKind::Sigmoid,
        ] {
            for mode in [Mode::Train, Mode::Infer] {
                check(kind, mode);
            }
        }
    }

    #[test]
    fn adding_in_place_is_the_sums_then_the_activation_bit_for_bit() {
        // 2 rows of 37 channels: blocks of 16 and 8 lanes and a remainder;
        // values of both signs, so that both PReLU slopes count.
        let (rows, c) = (2, 37);
        for kind in [
            ActivationKind::Prelu,
            ActivationKind::Dice,
            ActivationKind::Relu,
            ActivationKind::Sigmoid,
        ] {
            let mut act = Activation::new(kind, c);
            if let Some(a) = &mut act.alpha {
                a.value = rand_vec(c, 3);
            }
            let rw = act.rowwise(c);
            // Full mantissas (rand_vec's are short), so that the order of
            // the sums shows in the last bit.
            let full = |n, seed| -> Vec<f32> { rand_vec(n, seed).iter().map(|v| v * 3.1 + 0.013).collect() };
            let (x, e, b) = (full(rows * c, 4), full(rows * c, 5), full(c, 6));
            for extra in [None, Some(&e[..])] {
                let sums: Vec<f32> = (0..rows * c)
                    .map(|i| x[i] + extra.map_or(b[i % c], |e| e[i] + b[i % c]))
                    .collect();
                let mut want = vec![0.0; rows * c];
                rw.apply_rows(&sums, &mut want);
                let mut got = x.clone();
                rw.add_apply_in_place(&mut got, extra, &b);
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{kind:?}, extra {}: {got:?} vs {want:?}",
                    extra.is_some()
                );
                assert!(want.iter().any(|&w| w > 0.0) && sums.iter().any(|&s| s < 0.0));
            }
        }
    }

    /// Dice's AVX-512 loops ([`wide`]) give the AVX2 build's bits: the
    /// activation with moving averages and with a batch's moments, in place
    /// with the sums, keeping its sigmoids and from them, and both halves
    /// of the backward pass; widths below,
    /// at and past a vector, values out to `exp`'s clamps, zeros and NaN.
    #[test]
    fn dice_gives_the_same_bits_in_the_avx2_and_avx512_builds() {
        #[cfg(target_arch = "x86_64")]
        {
            if widest_build() != Build::Avx512 {
                eprintln!("skipped: no AVX-512");
                return;
            }
            /// `$wide` and `$avx2`: `$body` compiled for the AVX-512 build
            /// (`WIDE`) and for the AVX2 build.
            macro_rules! both_builds {
                ($wide:ident, $avx2:ident, $body:ident($($arg:ident: $ty:ty),*)) => {
                    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                    unsafe fn $wide(rw: &Rowwise<'_>, $($arg: $ty),*) {
                        rw.$body::<true, true>($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn $avx2(rw: &Rowwise<'_>, $($arg: $ty),*) {
                        rw.$body::<true, false>($($arg),*)
                    }
                };
            }
            both_builds!(apply_wide, apply_avx2, apply(x: &[f32], y: &mut [f32]));
            both_builds!(add_wide, add_avx2, add_apply_in_place_body(x: &mut [f32], e: Option<&[f32]>, b: &[f32]));
            both_builds!(keep_wide, keep_avx2, dice_keeping_sigmoid_body(x: &[f32], y: &mut [f32], p: &mut [f32]));
            both_builds!(output_wide, output_avx2, dice_from_sigmoid_body(x: &[f32], p: &[f32], y: &mut [f32]));
            both_builds!(
                partial_wide,
                partial_avx2,
                dice_backward_partial_body(x: &[f32], dy: &[f32], g: &mut [f32], da: &mut [f32], s: &mut [f32])
            );
            both_builds!(
                scored_wide,
                scored_avx2,
                dice_backward_partial_scored_body(
                    x: &[f32],
                    scores: (&[f32], &[f32]),
                    g: &mut [f32],
                    dw: &mut [f32],
                    da: &mut [f32],
                    s: &mut [f32]
                )
            );
            both_builds!(
                finish_wide,
                finish_avx2,
                dice_backward_finish_body(x: &[f32], g: &mut [f32], mg: &[f32], mgz: &[f32], db: &mut [f32])
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let rows = 7;
            for c in [1, 5, 16, 37, 40, 80] {
                let full = |n, seed| -> Vec<f32> { rand_vec(n, seed).iter().map(|v| v * 3.1 + 0.013).collect() };
                let mut x = full(rows * c, 11);
                // exp's clamps both ways, a zero and a NaN.
                x[0] = 500.0;
                x[rows * c / 2] = -500.0;
                x[rows * c - 1] = 0.0;
                let with_nan = {
                    let mut v = x.clone();
                    v[rows * c / 3] = f32::NAN;
                    v
                };
                let mut act = Activation::new(ActivationKind::Dice, c);
                if let Some(a) = &mut act.alpha {
                    a.value = rand_vec(c, 12);
                }
                if let Some(m) = &mut act.running_mean {
                    m.value = rand_vec(c, 13);
                }
                if let Some(v) = &mut act.running_var {
                    v.value = rand_vec(c, 14).iter().map(|v| v.abs() + 0.05).collect();
                }
                let (mean, var) = (
                    rand_vec(c, 15),
                    rand_vec(c, 16).iter().map(|v| v.abs() + 0.05).collect::<Vec<_>>(),
                );
                let moving = act.rowwise(c);
                let batch = act.rowwise_with_moments(&mean, &var);
                let (e, b) = (full(rows * c, 17), full(c, 18));
                for (name, rw) in [("moving", &moving), ("batch", &batch)] {
                    for input in [&x, &with_nan] {
                        let (mut y1, mut y2) = (vec![0.0; rows * c], vec![0.0; rows * c]);
                        // SAFETY: the CPU has AVX-512 (checked above) and so AVX2 and FMA.
                        unsafe { (apply_wide(rw, input, &mut y1), apply_avx2(rw, input, &mut y2)) };
                        assert_eq!(bits(&y1), bits(&y2), "apply, {c} channels, {name}");
                        // The training pass's form: the same values, and
                        // the sigmoids, from which both builds give them back.
                        let (mut k1, mut k2) = (vec![0.0; rows * c], vec![0.0; rows * c]);
                        let (mut p1, mut p2) = (vec![0.0; rows * c], vec![0.0; rows * c]);
                        // SAFETY: as above.
                        unsafe {
                            (
                                keep_wide(rw, input, &mut k1, &mut p1),
                                keep_avx2(rw, input, &mut k2, &mut p2),
                            )
                        };
                        assert_eq!(
                            (bits(&k1), bits(&k2)),
                            (bits(&y1), bits(&y1)),
                            "kept, {c} channels, {name}"
                        );
                        assert_eq!(bits(&p1), bits(&p2), "sigmoids, {c} channels, {name}");
                        let (mut o1, mut o2) = (vec![0.0; rows * c], vec![0.0; rows * c]);
                        // SAFETY: as above.
                        unsafe {
                            (
                                output_wide(rw, input, &p1, &mut o1),
                                output_avx2(rw, input, &p1, &mut o2),
                            )
                        };
                        assert_eq!(
                            (bits(&o1), bits(&o2)),
                            (bits(&y1), bits(&y1)),
                            "output, {c} channels, {name}"
                        );
                        for extra in [None, Some(&e[..])] {
                            let (mut x1, mut x2) = (input.clone(), input.clone());
                            // SAFETY: as above.
                            unsafe { (add_wide(rw, &mut x1, extra, &b), add_avx2(rw, &mut x2, extra, &b)) };
                            assert_eq!(bits(&x1), bits(&x2), "in place, {c} channels, {name}");
                        }
                    }
                }
                let dy = full(rows * c, 19);
                let (mut y, mut sigmoids) = (vec![0.0; rows * c], vec![0.0; rows * c]);
                batch.dice_keeping_sigmoid(&x, &mut y, &mut sigmoids);
                let (da0, s0, db0) = (full(c, 20), full(2 * c, 21), full(c, 22));
                let (mut g1, mut da1, mut s1) = (sigmoids.clone(), da0.clone(), s0.clone());
                let (mut g2, mut da2, mut s2) = (sigmoids.clone(), da0.clone(), s0.clone());
                // SAFETY: as above.
                unsafe {
                    partial_wide(&batch, &x, &dy, &mut g1, &mut da1, &mut s1);
                    partial_avx2(&batch, &x, &dy, &mut g2, &mut da2, &mut s2);
                }
                assert_eq!(bits(&g1), bits(&g2), "backward, {c} channels");
                assert_eq!(bits(&da1), bits(&da2), "slope gradient, {c} channels");
                assert_eq!(bits(&s1), bits(&s2), "sums, {c} channels");
                assert!(g1.iter().all(|v| v.is_finite()) && g1 != dy && g1 != sigmoids);
                let (ds, w, dw0) = (full(rows, 25), full(c, 26), full(c, 27));
                let (mut h1, mut dw1, mut ha1, mut hs1) = (sigmoids.clone(), dw0.clone(), da0.clone(), s0.clone());
                let (mut h2, mut dw2, mut ha2, mut hs2) = (sigmoids.clone(), dw0.clone(), da0.clone(), s0.clone());
                // SAFETY: as above.
                unsafe {
                    scored_wide(&batch, &x, (&ds, &w), &mut h1, &mut dw1, &mut ha1, &mut hs1);
                    scored_avx2(&batch, &x, (&ds, &w), &mut h2, &mut dw2, &mut ha2, &mut hs2);
                }
                assert_eq!(bits(&h1), bits(&h2), "backward from scores, {c} channels");
                assert_eq!(bits(&dw1), bits(&dw2), "score weights' gradient, {c} channels");
                assert_eq!(
                    (bits(&ha1), bits(&hs1)),
                    (bits(&ha2), bits(&hs2)),
                    "slopes and sums, {c} channels"
                );
                let (mg, mgz) = (full(c, 23), full(c, 24));
                let (mut db1, mut db2) = (db0.clone(), db0.clone());
                // SAFETY: as above.
                unsafe {
                    finish_wide(&batch, &x, &mut g1, &mg, &mgz, &mut db1);
                    finish_avx2(&batch, &x, &mut g2, &mg, &mgz, &mut db2);
                }
                assert_eq!(bits(&g1), bits(&g2), "finish, {c} channels");
                assert_eq!(bits(&db1), bits(&db2), "bias gradient, {c} channels");
                assert_ne!(db1, db0);
            }
        }
    }

    /// A Dice activation of `c` channels with random slopes (`rand_vec`
    /// from `seed`), and batch moments from `values` (seeds `seed + 1` and
    /// `seed + 2`; variances made positive).
    fn dice_with_moments(
        c: usize,
        seed: u64,
        values: impl Fn(usize, u64) -> Vec<f32>,
    ) -> (Activation, Vec<f32>, Vec<f32>) {
        let mut act = Activation::new(ActivationKind::Dice, c);
        if let Some(a) = &mut act.alpha {
            a.value = rand_vec(c, seed);
        }
        let mean = values(c, seed + 1);
        let var = values(c, seed + 2).iter().map(|v| v.abs() + 0.05).collect();
        (act, mean, var)
    }

    /// The sigmoids that Dice's training pass keeps are those of its
    /// inputs' normalised values (against `f64`), its output is
    /// `x·(α + (1-α)·p)` of them, and the output recomputed from them has
    /// the same bits, in whichever build this CPU runs.
    #[test]
    fn dice_keeps_the_sigmoids_it_weighs_by() {
        let (rows, c) = (5, 37);
        let (act, mean, var) = dice_with_moments(c, 31, rand_vec);
        let rw = act.rowwise_with_moments(&mean, &var);
        let x: Vec<f32> = rand_vec(rows * c, 34).iter().map(|v| v * 6.0).collect();
        let (mut y, mut p, mut again) = (vec![0.0; rows * c], vec![0.0; rows * c], vec![0.0; rows * c]);
        rw.dice_keeping_sigmoid(&x, &mut y, &mut p);
        rw.dice_from_sigmoid(&x, &p, &mut again);
        let alpha = &act.alpha.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        for (i, ((&x, &y), &p)) in x.iter().zip(&y).zip(&p).enumerate() {
            let j = i % c;
            let z = (f64::from(x) - f64::from(mean[j])) / (f64::from(var[j]) + f64::from(DICE_EPS)).sqrt();
            let want_p = 1.0 / (1.0 + (-z).exp());
            assert!((f64::from(p) - want_p).abs() < 1e-6, "[{i}]: sigmoid {p} vs {want_p}");
            let a = f64::from(alpha[j]);
            let want_y = f64::from(x) * (a + (1.0 - a) * f64::from(p));
            assert!(
                (f64::from(y) - want_y).abs() < 1e-5 * (1.0 + want_y.abs()),
                "[{i}]: {y} vs {want_y}"
            );
            assert_eq!(again[i].to_bits(), y.to_bits(), "[{i}]: recomputed");
        }
        let mut applied = vec![0.0; rows * c];
        rw.apply_rows(&x, &mut applied);
        assert!(applied.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(p.iter().any(|&v| v < 0.2) && p.iter().any(|&v| v > 0.8));
    }

    /// Dice's backward pass from the scores' gradient is the score layer's
    /// (the output recomputed from the sigmoids, the weight gradient
    /// summed row by row, `dy = ds·w`) then the first half of Dice's,
    /// bit for bit.
    #[test]
    fn the_backward_pass_from_scores_is_the_score_layer_then_dices() {
        let (rows, c) = (9, 37);
        let full = |n, seed| -> Vec<f32> { rand_vec(n, seed).iter().map(|v| v * 3.1 + 0.013).collect() };
        let (act, mean, var) = dice_with_moments(c, 41, full);
        let rw = act.rowwise_with_moments(&mean, &var);
        let x = full(rows * c, 44);
        let (mut y, mut sigmoids) = (vec![0.0; rows * c], vec![0.0; rows * c]);
        rw.dice_keeping_sigmoid(&x, &mut y, &mut sigmoids);
        let (ds, w, dw0, da0, s0) = (full(rows, 45), full(c, 46), full(c, 47), full(c, 48), full(2 * c, 49));
        let (mut g, mut dw, mut da, mut sums) = (sigmoids.clone(), dw0.clone(), da0.clone(), s0.clone());
        rw.dice_backward_partial_scored(&x, (&ds, &w), &mut g, &mut dw, &mut da, &mut sums);
        // The passes one after the other.
        let mut want_dw = dw0;
        let mut dy = vec![0.0; rows * c];
        for r in 0..rows {
            for j in 0..c {
                want_dw[j] += y[r * c + j] * ds[r];
                dy[r * c + j] = ds[r] * w[j];
            }
        }
        let (mut want_g, mut want_da, mut want_sums) = (sigmoids.clone(), da0, s0);
        rw.dice_backward_partial(&x, &dy, &mut want_g, &mut want_da, &mut want_sums);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dw), bits(&want_dw), "score weights' gradient");
        assert_eq!(bits(&g), bits(&want_g), "g");
        assert_eq!(
            (bits(&da), bits(&sums)),
            (bits(&want_da), bits(&want_sums)),
            "slopes and sums"
        );
        assert!(g.iter().zip(&sigmoids).all(|(a, b)| a != b));
    }

    #[test]
    fn prelu_values() {
        let mut act = Activation::new(ActivationKind::Prelu, 2);
        assert_eq!(act.alpha.as_ref().map(|a| a.value.clone()), Some(vec![PRELU_INIT; 2]));
        if let Some(a) = &mut act.alpha {
            a.value = vec![0.25, 0.5];
        }
        let mut y = Vec::new();
        act.forward(&[-2.0, 3.0, -4.0, -1.0], 2, Mode::Infer, &mut y);
        // Per-channel slopes: channel 0 uses 0.25, channel 1 uses 0.5.
        assert_eq!(y, vec![-0.5, 3.0, -1.0, -0.5]);
    }

    /// The tensors named `running_mean` and `running_var` (what the file
    /// holds under those names) are used as the mean and the variance.
    #[test]
    fn dice_tensors_hold_what_their_names_say() {
        let mut act = Activation::new(ActivationKind::Dice, 1);
        act.visit_mut("d", &mut |name, p| match name.as_str() {
            "d.alpha" => p.value = vec![0.0],
            "d.running_mean" => p.value = vec![2.0],
            "d.running_var" => p.value = vec![4.0],
            other => panic!("unexpected tensor {other}"),
        });
        let mut y = Vec::new();
        act.forward(&[3.0], 1, Mode::Infer, &mut y);
        let z = (3.0 - 2.0) / (4.0f32 + DICE_EPS).sqrt();
        assert!((y[0] - 3.0 / (1.0 + (-z).exp())).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn dice_uses_batch_statistics_in_training_and_moving_averages_at_inference() {
        let mut act = Activation::new(ActivationKind::Dice, 1);
        // alpha = 0: y = x * sigmoid((x - mean) / sqrt(var + eps)).
        let x = [1.0f32, 3.0];
        let mut y = Vec::new();
        let cache = act.forward(&x, 2, Mode::Train, &mut y);
        // Batch mean 2, variance 1: z = -1, +1.
        let s = |z: f32| 1.0 / (1.0 + (-z).exp());
        assert!((y[0] - 1.0 * s(-1.0)).abs() < 1e-6 && (y[1] - 3.0 * s(1.0)).abs() < 1e-6);
        act.update_statistics(&cache);
        // Moving averages start at (0, 1): 0.99*0 + 0.01*2 = 0.02; 0.99*1 + 0.01*1 = 1.
        let m = act.running_mean.as_ref().map(|p| p.value[0]);
        let v = act.running_var.as_ref().map(|p| p.value[0]);
        assert!((m.unwrap_or(f32::NAN) - 0.02).abs() < 1e-7 && (v.unwrap_or(f32::NAN) - 1.0).abs() < 1e-6);
        act.forward(&x, 2, Mode::Infer, &mut y);
        let z0 = (1.0 - 0.02) / (1.0f32 + DICE_EPS).sqrt();
        assert!(
            (y[0] - s(z0)).abs() < 1e-6,
            "inference uses the moving averages, not the batch"
        );
    }
}
