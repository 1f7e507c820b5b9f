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
}

impl Rowwise<'_> {
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

    /// `y = act(x)`, both `[rows, channels]`.
    #[inline(always)]
    pub fn apply(&self, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), y.len());
        let (alpha, mean, inv_std) = (self.alpha, &self.mean[..], &self.inv_std[..]);
        match self.kind {
            // Branch-free forms: signs are unpredictable, and a mispredicted
            // branch per element costs more than the arithmetic.
            ActivationKind::Relu => self.rows(x, y, |y, x, _| *y = x.max(0.0)),
            ActivationKind::Sigmoid => self.rows(x, y, |y, x, _| *y = sigmoid(x)),
            // x if x > 0, else a·x (exactly).
            ActivationKind::Prelu => self.rows(x, y, |y, x, j| *y = x.max(0.0) + alpha[j] * x.min(0.0)),
            ActivationKind::Dice => self.rows(x, y, |y, x, j| {
                let p = sigmoid((x - mean[j]) * inv_std[j]);
                *y = x * (alpha[j] + (1.0 - alpha[j]) * p); // p·x + (1-p)·α·x
            }),
        }
    }

    /// `x = act(x + extra + bias)` in place, row by row: `bias` is
    /// `[channels]`, `extra` (optional) is as long as `x`. The inference
    /// form, which keeps no pre-activation: one read and one write per value.
    pub fn add_apply_in_place(&self, x: &mut [f32], extra: Option<&[f32]>, bias: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has every feature `add_apply_in_place_avx512` is compiled for.
            return unsafe { self.add_apply_in_place_avx512(x, extra, bias) };
        }
        self.add_apply_in_place_body(x, extra, bias)
    }

    /// [`Rowwise::add_apply_in_place`] compiled for AVX-512: 16 lanes
    /// instead of SSE's 4 for a loop that runs on data in L1/L2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn add_apply_in_place_avx512(&self, x: &mut [f32], extra: Option<&[f32]>, bias: &[f32]) {
        self.add_apply_in_place_body(x, extra, bias)
    }

    #[inline(always)]
    fn add_apply_in_place_body(&self, x: &mut [f32], extra: Option<&[f32]>, bias: &[f32]) {
        let c = self.channels;
        let (alpha, mean, inv_std) = (self.alpha, &self.mean[..], &self.inv_std[..]);
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
                ActivationKind::Sigmoid => xr.iter_mut().for_each(|x| *x = sigmoid(*x)),
                ActivationKind::Prelu => xr
                    .iter_mut()
                    .zip(alpha)
                    .for_each(|(x, a)| *x = x.max(0.0) + a * x.min(0.0)),
                // Zipped, not indexed: a bounds check per element would keep
                // the loop scalar.
                ActivationKind::Dice => xr
                    .iter_mut()
                    .zip(mean)
                    .zip(inv_std)
                    .zip(alpha)
                    .for_each(|(((x, m), s), a)| {
                        let p = sigmoid((*x - m) * s);
                        *x *= a + (1.0 - a) * p;
                    }),
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
            self.apply(pr, yr);
        }
    }

    /// The backward pass of [`Rowwise::apply`], in place: `g` holds `dy` on
    /// entry and `dx` on return; the slope gradient is added to `dalpha`.
    pub fn backward(&self, x: &[f32], g: &mut [f32], dalpha: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has every feature `backward_avx512` is compiled for.
            return unsafe { self.backward_avx512(x, g, dalpha) };
        }
        self.backward_body(x, g, dalpha)
    }

    /// [`Rowwise::backward`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
    unsafe fn backward_avx512(&self, x: &[f32], g: &mut [f32], dalpha: &mut [f32]) {
        self.backward_body(x, g, dalpha)
    }

    #[inline(always)]
    fn backward_body(&self, x: &[f32], g: &mut [f32], dalpha: &mut [f32]) {
        debug_assert_eq!(x.len(), g.len());
        let c = self.channels;
        let (alpha, mean, inv_std) = (self.alpha, &self.mean[..], &self.inv_std[..]);
        match self.kind {
            ActivationKind::Relu => self.rows(x, g, |g, x, _| *g *= f32::from(u8::from(x > 0.0))),
            // sigmoid'(x) = s(1 - s), recomputed rather than kept from the forward pass.
            ActivationKind::Sigmoid => self.rows(x, g, |g, x, _| {
                let s = sigmoid(x);
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
                        let p = sigmoid((x - mean[j]) * inv_std[j]);
                        dalpha[j] += dy * x * (1.0 - p);
                        // y = x(α + (1-α)p(z)), z = (x - mean)·inv_std with fixed moments.
                        gr[j] = dy * (alpha[j] + (1.0 - alpha[j]) * (p + x * p * (1.0 - p) * inv_std[j]));
                    }
                }
            }
        }
    }
}

/// Whether this CPU runs the AVX-512 builds of the element-wise loops (the
/// standard library caches the detection).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") && has!("avx2") && has!("fma")
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x`, branch-free so that the activation loops calling it vectorise:
/// `f32::exp` is a libm call per element, which no loop vectorises (67% of
/// Dice inference's cycles went to it and to the scalar loop around it).
/// Hand-written because no maintained crate offers an inlinable scalar
/// `exp` that LLVM vectorises. Range reduction `x = n·ln 2 + r`, `|r| <=
/// ln 2 / 2` (ln 2 split in two parts, so `r` is exact), a degree-7 Taylor
/// polynomial for `e^r` (truncation below 6e-9) and `2^n` built from its
/// bits; relative error within 2e-7 of `f32::exp` for `x` in [-87, 88]
/// (tested), which it clamps to (`e^-87` is about 1.6e-38, `e^88` 1.65e38:
/// a sigmoid saturates long before). NaN gives NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with its low 12 bits zero, so that
    // n·LN2_HI is exact for |n| < 2^12.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is in [-126, 127]: 2^n is a normal float.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
        Rowwise {
            kind: self.kind,
            channels,
            alpha,
            mean,
            inv_std,
        }
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
            self.rowwise(c).apply(x, y);
            return cache;
        }
        // Dice in training: normalise by the batch's own moments.
        cache.batch_stats = true;
        cache.rows = rows;
        let (mean, var) = column_moments(x, rows, c);
        cache.mean = mean;
        cache.batch_var = var;
        cache.inv_std = cache.batch_var.iter().map(|v| 1.0 / (v + DICE_EPS).sqrt()).collect();
        cache.p = vec![0.0; x.len()];
        let alpha = &self.alpha_values();
        for ((yr, xr), pr) in y
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(cache.p.chunks_exact_mut(c))
        {
            for j in 0..c {
                let p = sigmoid((xr[j] - cache.mean[j]) * cache.inv_std[j]);
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
        if !cache.batch_stats || cache.rows < 2 {
            return;
        }
        for (stat, batch) in [
            (&mut self.running_mean, &cache.mean),
            (&mut self.running_var, &cache.batch_var),
        ] {
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

/// Per-column mean and biased variance of `[rows, c]`, accumulated in f64.
fn column_moments(x: &[f32], rows: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let mut sum = vec![0.0f64; c];
    for xr in x.chunks_exact(c) {
        sum.iter_mut().zip(xr).for_each(|(s, &v)| *s += f64::from(v));
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let mut sq = vec![0.0f64; c];
    for xr in x.chunks_exact(c) {
        for j in 0..c {
            let d = f64::from(xr[j]) - mean[j];
            sq[j] += d * d;
        }
    }
    (
        mean.iter().map(|&m| m as f32).collect(),
        sq.iter().map(|&s| (s / rows as f64) as f32).collect(),
    )
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
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "relative error {worst:e}");
        for x in [0.0f32, 1.0, -1.0, 0.5, 1e-8, -1e-8] {
            assert!((super::exp(x) - x.exp()).abs() <= 1.2e-7 * x.exp(), "{x}");
        }
        assert!(super::exp(-1000.0) > 0.0 && super::exp(-1000.0) < 1e-37);
        assert!(super::exp(1000.0).is_finite() && super::exp(1000.0) > 1e38);
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(
            (super::sigmoid(-200.0), super::sigmoid(200.0)),
            (super::sigmoid(-88.0), 1.0)
        );
        assert!(super::sigmoid(-200.0) < 1e-37);
        assert!(super::sigmoid(f32::NAN).is_nan());
    }

    use super::super::testutil::{assert_close, dot, numeric_grad, rand_vec};
    use super::*;

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
