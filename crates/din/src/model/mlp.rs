//! A stack of fully connected layers with activations and dropout.

use rand::Rng;
use rayon::prelude::*;

use super::activation::{Activation, ActivationCache};
use super::bf16::{Bf16Matrix, Kernel};
use super::fused_f32::{self, Bias, Panels};
use super::linalg::Gemm;
use super::linear::Linear;
use super::param::{Module, Param};
use super::Mode;
use crate::schema::ActivationKind;

/// One hidden layer: `act(x·W + b)`, then dropout in training.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The affine map.
    pub linear: Linear,
    /// The activation.
    pub activation: Activation,
    /// Dropout rate.
    pub dropout: f32,
}

/// Hidden layers, applied in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    /// The layers.
    pub blocks: Vec<Block>,
    /// What runs the layers' products in training: f32, or bf16 with f32
    /// sums (mixed precision, see [`crate::model::Din::set_training_precision`]).
    /// Inference ([`Mode::Infer`]) is not affected.
    pub(crate) products: Kernel,
}

/// The blocks' weights packed once per training step (see
/// [`Mlp::pack_panels`]): `W` and `Wᵀ` per block for [`fused_f32`]'s
/// products, or in bf16 for mixed-precision training's, or none.
#[derive(Debug, Clone, Default)]
pub(crate) struct MlpPanels {
    forward: Vec<Panels>,
    backward: Vec<Panels>,
    bf16: Vec<Bf16Matrix>,
    bf16_t: Vec<Bf16Matrix>,
}

/// Intermediate values of [`Mlp::forward`] kept for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct MlpCache {
    /// Input of each block, `[rows, in_i]`.
    inputs: Vec<Vec<f32>>,
    /// Pre-activation of each block, `[rows, out_i]`.
    pre: Vec<Vec<f32>>,
    /// Activation caches.
    activations: Vec<ActivationCache>,
    /// Dropout multipliers (empty when no dropout was applied).
    masks: Vec<Vec<f32>>,
    /// The MLP's output, `[rows, out_last]`.
    pub output: Vec<f32>,
}

impl Block {
    /// A block from `input` to `output` units.
    pub fn new(input: usize, output: usize, activation: ActivationKind, dropout: f32, rng: &mut impl Rng) -> Self {
        Block {
            linear: Linear::new(input, output, rng),
            activation: Activation::new(activation, output),
            dropout,
        }
    }
}

impl Mlp {
    /// Layers `input -> units[0] -> units[1] ...`.
    pub fn new(input: usize, units: &[usize], activation: ActivationKind, dropout: f32, rng: &mut impl Rng) -> Self {
        let mut blocks = Vec::with_capacity(units.len());
        let mut width = input;
        for &u in units {
            blocks.push(Block::new(width, u, activation, dropout, rng));
            width = u;
        }
        Mlp {
            blocks,
            products: Kernel::Fp32,
        }
    }

    /// Output width, given the input width.
    pub fn output_dim(&self, input: usize) -> usize {
        self.blocks.last().map_or(input, |b| b.linear.output_dim())
    }

    /// Runs every block on `x` (`[rows, in]`). `rng` drives dropout in training.
    pub fn forward(&self, x: Vec<f32>, rows: usize, mode: Mode, rng: Option<&mut dyn rand::RngCore>) -> MlpCache {
        let mut cache = MlpCache::default();
        let mut x = x;
        self.forward_into(&mut x, rows, mode, rng, &mut cache);
        cache
    }

    /// [`Mlp::forward`] reusing `cache`'s buffers. `x` is swapped into the
    /// cache and receives a spare buffer in exchange, so that a caller that
    /// fills the same `x` every step allocates nothing.
    pub fn forward_into(
        &self,
        x: &mut Vec<f32>,
        rows: usize,
        mode: Mode,
        rng: Option<&mut dyn rand::RngCore>,
        cache: &mut MlpCache,
    ) {
        let mut rng = rng;
        let layers = self.blocks.len();
        cache.inputs.resize_with(layers.max(1), Vec::new);
        cache.pre.resize_with(layers, Vec::new);
        cache.masks.resize_with(layers, Vec::new);
        cache.activations.clear();
        std::mem::swap(x, &mut cache.inputs[0]);
        if layers == 0 {
            cache.output.clear();
            cache.output.extend_from_slice(&cache.inputs[0]);
            return;
        }
        let gemm = Gemm::new(if mode == Mode::Train {
            self.products
        } else {
            Kernel::Fp32
        });
        for (i, b) in self.blocks.iter().enumerate() {
            b.linear.forward_with(gemm, &cache.inputs[i], rows, &mut cache.pre[i]); // [rows, out]
            let out = if i + 1 < layers {
                &mut cache.inputs[i + 1]
            } else {
                &mut cache.output
            };
            let ac = b.activation.forward(&cache.pre[i], rows, mode, out); // [rows, out]
            let mask = &mut cache.masks[i];
            mask.clear();
            if mode == Mode::Train && b.dropout > 0.0 {
                if let Some(rng) = rng.as_deref_mut() {
                    let keep = 1.0 - b.dropout;
                    mask.extend((0..out.len()).map(|_| if rng.gen::<f32>() < keep { 1.0 / keep } else { 0.0 }));
                    out.iter_mut().zip(mask.iter()).for_each(|(o, m)| *o *= m);
                }
            }
            cache.activations.push(ac);
        }
    }

    /// Each block's weight in bf16 for `kernel`, for [`Mlp::infer_bf16`].
    pub(crate) fn bf16_weights(&self, kernel: Kernel) -> Vec<Bf16Matrix> {
        let mut weights = Vec::new();
        self.bf16_weights_into(kernel, false, &mut weights);
        weights
    }

    /// Each block's weight in bf16 for `kernel` into `out` (one per
    /// block), `[in, out]`, or with `transposed` `[out, in]` (the backward
    /// pass's `dy·Wᵀ` in mixed-precision training), remade in the matrices
    /// `out` already holds: mixed-precision training packs them once per
    /// step.
    pub(crate) fn bf16_weights_into(&self, kernel: Kernel, transposed: bool, out: &mut Vec<Bf16Matrix>) {
        out.retain(|m| m.kernel() == kernel);
        out.truncate(self.blocks.len());
        out.resize_with(self.blocks.len(), || Bf16Matrix::empty(kernel));
        for (m, b) in out.iter_mut().zip(&self.blocks) {
            let (i, o, w) = (b.linear.input_dim(), b.linear.output_dim(), &b.linear.weight.value);
            match transposed {
                false => m.refill(i, o, w),
                true => m.refill_strided(o, i, w, (1, o)), // [out, in]
            }
        }
    }

    /// Inference with each block's weights in bf16 (`weights`, one per
    /// block; see [`super::bf16`]): `[rows, in]` to `[rows, out_last]`.
    pub(crate) fn infer_bf16(&self, x: Vec<f32>, rows: usize, weights: &[Bf16Matrix]) -> Vec<f32> {
        let mut x = x;
        let (mut pre, mut out) = (Vec::new(), Vec::new());
        for (b, w) in self.blocks.iter().zip(weights) {
            let o = b.linear.output_dim();
            pre.clear();
            pre.resize(rows * o, 0.0);
            w.matmul_parallel(rows, &x, &mut pre); // [rows, out]
            add_bias(&mut pre, &b.linear.bias.value);
            b.activation.forward(&pre, rows, Mode::Infer, &mut out);
            std::mem::swap(&mut x, &mut out);
        }
        x
    }

    /// Accumulates parameter gradients and returns `dx` (`[rows, in]`).
    pub fn backward(&mut self, cache: &MlpCache, rows: usize, dy: Vec<f32>) -> Vec<f32> {
        let mut g = dy;
        let mut dpre = Vec::new();
        self.backward_into(cache, rows, &mut g, &mut dpre);
        g
    }

    /// [`Mlp::backward`] in reused buffers: `g` holds `dy` on entry and `dx`
    /// on return; `scratch` is working space.
    pub fn backward_into(&mut self, cache: &MlpCache, rows: usize, g: &mut Vec<f32>, scratch: &mut Vec<f32>) {
        let gemm = Gemm::new(self.products);
        for (i, b) in self.blocks.iter_mut().enumerate().rev() {
            if !cache.masks[i].is_empty() {
                g.iter_mut().zip(&cache.masks[i]).for_each(|(g, m)| *g *= m);
            }
            b.activation
                .backward(&cache.pre[i], rows, &cache.activations[i], g, scratch);
            b.linear.backward_with(gemm, &cache.inputs[i], rows, scratch, Some(g));
        }
    }

    /// Whether [`Mlp::forward_rows`] and [`Mlp::backward_rows`] train these
    /// layers: every activation row-wise in training (no Dice), no
    /// dropout.
    pub(crate) fn trains_by_rows(&self) -> bool {
        self.blocks
            .iter()
            .all(|b| b.dropout == 0.0 && b.activation.is_rowwise(Mode::Train))
    }

    /// Floats of the gradient buffers of [`Mlp::backward_rows`]: per
    /// block, `dW` `[in, out]`, `db` `[out]`, then `dalpha` `[out]` with
    /// PReLU or Dice.
    pub(crate) fn grad_len(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.linear.weight.value.len() + Self::tail_len(b))
            .sum()
    }

    fn tail_len(b: &Block) -> usize {
        let o = b.linear.output_dim();
        o + b.activation.alpha.as_ref().map_or(0, |_| o)
    }

    /// Packs each block's weight `W` (`[in, out]`) and its transpose for
    /// [`Mlp::forward_rows`] and [`Mlp::backward_rows`]: in bf16 for
    /// mixed-precision training, else on [`fused_f32`] (AVX-512F, PReLU or
    /// ReLU in every block); leaves `panels` empty otherwise (the `gemm`
    /// products then serve).
    pub(crate) fn pack_panels(&self, panels: &mut MlpPanels) {
        let bf16 = self.products.is_bf16();
        if bf16 {
            rayon::join(
                || self.bf16_weights_into(self.products, false, &mut panels.bf16),
                || self.bf16_weights_into(self.products, true, &mut panels.bf16_t),
            );
        } else {
            panels.bf16.clear();
            panels.bf16_t.clear();
        }
        let fuses = !bf16
            && fused_f32::available()
            && self
                .blocks
                .iter()
                .all(|b| b.activation.rowwise(b.linear.output_dim()).as_prelu().is_some());
        let layers = if fuses { self.blocks.len() } else { 0 };
        panels.forward.resize_with(layers, Panels::default);
        panels.backward.resize_with(layers, Panels::default);
        // Each on its own task (copies).
        let blocks = &self.blocks;
        let shape = |l: usize| -> (usize, usize, &[f32]) {
            let b = &blocks[l].linear;
            (b.input_dim(), b.output_dim(), &b.weight.value)
        };
        rayon::join(
            || {
                panels.forward.par_iter_mut().enumerate().for_each(|(l, p)| {
                    let (i, o, w) = shape(l);
                    p.pack(i, o, w, (o, 1));
                })
            },
            || {
                panels.backward.par_iter_mut().enumerate().for_each(|(l, p)| {
                    let (i, o, w) = shape(l);
                    p.pack(o, i, w, (1, o)); // Wᵀ, [out, in]
                })
            },
        );
    }

    /// A training forward pass over some rows of a batch (`x`, `[rows,
    /// in]`; see [`Mlp::trains_by_rows`]) into `cache`, on the calling
    /// thread, on `panels` when [`Mlp::pack_panels`] packed any; returns
    /// the output `[rows, out_last]`. Row by row what [`Mlp::forward_into`]
    /// computes, but for the sums' rounding on `panels`.
    pub(crate) fn forward_rows<'c>(
        &self,
        x: &[f32],
        rows: usize,
        panels: &MlpPanels,
        cache: &'c mut MlpCache,
    ) -> &'c [f32] {
        let layers = self.blocks.len();
        cache.inputs.resize_with(layers.max(1), Vec::new);
        cache.pre.resize_with(layers, Vec::new);
        cache.masks.iter_mut().for_each(Vec::clear);
        cache.activations.clear();
        if layers == 0 {
            cache.output.clear();
            cache.output.extend_from_slice(x);
        }
        let gemm = Gemm::new(self.products).serial();
        for (l, b) in self.blocks.iter().enumerate() {
            let (o, pre) = (b.linear.output_dim(), &mut cache.pre[l]);
            let (before, after) = cache.inputs.split_at_mut(l + 1);
            let input: &[f32] = if l == 0 { x } else { &before[l] };
            let out = if l + 1 < layers {
                &mut after[0]
            } else {
                &mut cache.output
            };
            match (panels.forward.get(l), b.activation.rowwise(o).as_prelu()) {
                (Some(p), Some(alpha)) => {
                    // Sized only: the product writes every value.
                    pre.resize(rows * o, 0.0);
                    out.resize(rows * o, 0.0);
                    let bias = Bias::Columns(&b.linear.bias.value);
                    let epilogue = &mut fused_f32::Forward { bias, alpha, pre, out };
                    fused_f32::product(rows, input, b.linear.input_dim(), p, epilogue);
                    // [rows, out]
                }
                _ if !panels.bf16.is_empty() => {
                    // Mixed precision: `x·W` on the step's bf16 weights,
                    // then `+ b` (the same sum as `Linear::forward_with`'s
                    // `b + x·W`), then the activation.
                    pre.resize(rows * o, 0.0); // overwritten by the product
                    panels.bf16[l].matmul(rows, input, pre); // [rows, out]
                    add_bias(pre, &b.linear.bias.value);
                    b.activation.forward(pre, rows, Mode::Train, out); // [rows, out]
                }
                _ => {
                    b.linear.forward_with(gemm, input, rows, pre); // [rows, out]
                    b.activation.forward(pre, rows, Mode::Train, out); // [rows, out]
                }
            }
        }
        &cache.output
    }

    /// The backward pass of [`Mlp::forward_rows`] (the same `x` and
    /// `panels`): `g` holds `dy` on entry and `dx` on return (`dpre` is
    /// working space); the parameter gradients are added to `grads` (laid
    /// out as [`Mlp::grad_len`] says), not to the parameters.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward_rows(
        &self,
        x: &[f32],
        cache: &MlpCache,
        rows: usize,
        panels: &MlpPanels,
        g: &mut Vec<f32>,
        dpre: &mut Vec<f32>,
        grads: &mut [f32],
    ) {
        let gemm = Gemm::new(self.products).serial();
        let mut end = grads.len();
        // Whether `g` holds dpre of the block (the product above applied
        // its activation's backward pass and summed its bias and slope
        // gradients).
        let mut fused_below = false;
        for (l, b) in self.blocks.iter().enumerate().rev() {
            let (i, o) = (b.linear.input_dim(), b.linear.output_dim());
            let start = end - b.linear.weight.value.len() - Self::tail_len(b);
            let (lower, here) = grads[..end].split_at_mut(start);
            let (dw, tail) = here.split_at_mut(b.linear.weight.value.len());
            let (db, dalpha) = tail.split_at_mut(o);
            let input: &[f32] = if l == 0 { x } else { &cache.inputs[l] };
            if fused_below {
                std::mem::swap(g, dpre);
            } else {
                dpre.clear();
                dpre.extend_from_slice(g);
                b.activation.rowwise(o).backward(&cache.pre[l], dpre, dalpha); // dpre
                for row in dpre.chunks_exact(o) {
                    db.iter_mut().zip(row).for_each(|(a, d)| *a += d);
                }
            }
            gemm.matmul_at_b(i, rows, o, input, dpre, dw, true); // dW += inputᵀ·dpre, [in, out]
            g.resize(rows * i, 0.0); // every value written below
            let below = l.checked_sub(1).map(|k| &self.blocks[k]);
            let alpha_below = below.and_then(|k| k.activation.rowwise(i).as_prelu());
            fused_below = false;
            match (panels.backward.get(l), below, alpha_below) {
                (Some(p), Some(k), Some(alpha)) => {
                    // dx = dpre·Wᵀ through the block below's activation
                    // backward pass, with its bias and slope gradients.
                    let at = lower.len() - Self::tail_len(k);
                    let (dbias, dalpha) = lower[at..].split_at_mut(i);
                    let next: &[f32] = if l == 1 { x } else { &cache.inputs[l - 1] };
                    let epilogue = &mut fused_f32::Backward {
                        pre: &cache.pre[l - 1],
                        alpha,
                        g,
                        dalpha,
                        dbias,
                        next: (next, k.linear.input_dim()),
                    };
                    fused_f32::product(rows, dpre, o, p, epilogue); // [rows, in]
                    fused_below = true;
                }
                (Some(p), _, _) => fused_f32::product(rows, dpre, o, p, &mut fused_f32::Store { c: g }), // [rows, in]
                _ => match panels.bf16_t.get(l) {
                    Some(wt) => wt.matmul(rows, dpre, g), // [rows, in], on the step's bf16 Wᵀ
                    None => gemm.matmul_a_bt(rows, o, i, dpre, &b.linear.weight.value, g, false), // [rows, in]
                },
            }
            end = start;
        }
    }

    /// Adds gradients laid out as [`Mlp::grad_len`] says to the parameters.
    pub(crate) fn add_grads(&mut self, grads: &[f32]) {
        let mut at = 0;
        for b in &mut self.blocks {
            let o = b.linear.output_dim();
            let mut take = |dst: &mut [f32]| {
                dst.iter_mut().zip(&grads[at..]).for_each(|(a, g)| *a += g);
                at += dst.len();
            };
            take(&mut b.linear.weight.grad);
            take(&mut b.linear.bias.grad);
            if let Some(alpha) = &mut b.activation.alpha {
                take(&mut alpha.grad[..o]);
            }
        }
    }

    /// Folds training batch statistics into Dice's moving averages.
    pub fn update_statistics(&mut self, cache: &MlpCache) {
        for (b, c) in self.blocks.iter_mut().zip(&cache.activations) {
            b.activation.update_statistics(c);
        }
    }

    /// Visits the blocks' tensors as `{prefix}.{first_index + i}.*`.
    pub fn visit_from<'a>(&'a self, prefix: &str, first_index: usize, f: &mut dyn FnMut(String, &'a Param)) {
        for (i, b) in self.blocks.iter().enumerate() {
            b.visit(&format!("{prefix}.{}", first_index + i), f);
        }
    }

    /// Mutable [`Mlp::visit_from`].
    pub fn visit_from_mut(&mut self, prefix: &str, first_index: usize, f: &mut dyn FnMut(String, &mut Param)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_mut(&format!("{prefix}.{}", first_index + i), f);
        }
    }
}

impl Module for Block {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a Param)) {
        self.linear.visit(prefix, f);
        self.activation.visit(&format!("{prefix}.activation"), f);
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(String, &mut Param)) {
        self.linear.visit_mut(prefix, f);
        self.activation.visit_mut(&format!("{prefix}.activation"), f);
    }
}

/// `pre += bias` row by row (`pre` is `[rows, bias.len()]`): the bias after
/// a bf16 product, the same sum as [`Linear::forward_with`]'s `b + x·W`.
fn add_bias(pre: &mut [f32], bias: &[f32]) {
    for row in pre.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(p, b)| *p += b);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, dot, numeric_grad, rand_vec};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn gradients_match_finite_differences() {
        for kind in [ActivationKind::Dice, ActivationKind::Prelu, ActivationKind::Sigmoid] {
            let (rows, input) = (5, 4);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut mlp = Mlp::new(input, &[6, 3], kind, 0.0, &mut rng);
            let x = rand_vec(rows * input, 4);
            let r = rand_vec(rows * 3, 5);
            let loss = |m: &Mlp, x: &[f32]| dot(&r, &m.forward(x.to_vec(), rows, Mode::Train, None).output);
            let cache = mlp.forward(x.clone(), rows, Mode::Train, None);
            let dx = mlp.backward(&cache, rows, r.clone());
            assert_close(
                &format!("{kind:?} dx"),
                &dx,
                &numeric_grad(&x, 1e-3, |x| loss(&mlp, x)),
                2e-2,
            );
            let w0 = mlp.blocks[0].linear.weight.value.clone();
            let nw = numeric_grad(&w0, 1e-3, |w| {
                let mut m = mlp.clone();
                m.blocks[0].linear.weight.value = w.to_vec();
                loss(&m, &x)
            });
            assert_close(&format!("{kind:?} dW0"), &mlp.blocks[0].linear.weight.grad, &nw, 2e-2);
        }
    }

    /// Mixed-precision training: the forward product and both backward
    /// products of a layer take bf16 operands and sum in f32, each checked
    /// against an f64 sum of the rounded operands (PReLU with slope 1 is the
    /// identity, so each output is one product), and far from the
    /// unrounded one; inference stays f32.
    #[test]
    fn mixed_precision_rounds_every_product_of_training() {
        use super::super::bf16::round_bf16;
        let (rows, i, o) = (7, 12, 5);
        let mut mlp = Mlp::new(
            i,
            &[o],
            ActivationKind::Prelu,
            0.0,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(8),
        );
        mlp.visit_from_mut("m", 0, &mut |name, p| {
            if name.ends_with("alpha") {
                p.value.iter_mut().for_each(|a| *a = 1.0);
            }
        });
        mlp.blocks[0].linear.bias.value = rand_vec(o, 3);
        mlp.products = Kernel::Emulated;
        let (x, dy) = (rand_vec(rows * i, 1), rand_vec(rows * o, 2));
        let (w, b) = (
            mlp.blocks[0].linear.weight.value.clone(),
            mlp.blocks[0].linear.bias.value.clone(),
        );
        // Σ_p f(u(p)) f(v(p)) in f64, with f = bf16 rounding or the identity.
        let sum = |len: usize, u: &dyn Fn(usize) -> f32, v: &dyn Fn(usize) -> f32, round: bool| -> f64 {
            let f = |x: f32| f64::from(if round { round_bf16(x) } else { x });
            (0..len).map(|p| f(u(p)) * f(v(p))).sum()
        };
        let check = |what: &str, got: &[f32], want: &dyn Fn(usize, bool) -> f64| {
            let mut moved = 0.0f64;
            for (e, &g) in got.iter().enumerate() {
                let (rounded, plain) = (want(e, true), want(e, false));
                assert!(
                    (f64::from(g) - rounded).abs() <= 1e-5,
                    "{what}[{e}]: {g} against {rounded}"
                );
                moved = moved.max((rounded - plain).abs());
            }
            assert!(moved > 1e-3, "{what}: rounding moves it by {moved} only");
        };
        let cache = mlp.forward(x.clone(), rows, Mode::Train, None);
        let y = |e: usize, round: bool| {
            let (r, j) = (e / o, e % o);
            f64::from(b[j]) + sum(i, &|p| x[r * i + p], &|p| w[p * o + j], round)
        };
        check("y", &cache.output, &y);
        let inferred = mlp.forward(x.clone(), rows, Mode::Infer, None).output;
        for (e, v) in inferred.iter().enumerate() {
            assert!((f64::from(*v) - y(e, false)).abs() <= 1e-5, "inference is f32");
        }
        let dx = mlp.backward(&cache, rows, dy.clone());
        let dw = |e: usize, round: bool| sum(rows, &|r| x[r * i + e / o], &|r| dy[r * o + e % o], round);
        check("dW", &mlp.blocks[0].linear.weight.grad, &dw);
        let dxr = |e: usize, round: bool| sum(o, &|j| dy[(e / i) * o + j], &|j| w[(e % i) * o + j], round);
        check("dx", &dx, &dxr);
    }

    #[test]
    fn dropout_zeroes_and_rescales_in_training_only() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mlp = Mlp::new(4, &[64], ActivationKind::Sigmoid, 0.5, &mut rng);
        let x = rand_vec(2 * 4, 1);
        let plain = mlp.forward(x.clone(), 2, Mode::Infer, None).output;
        let mut drng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let dropped = mlp.forward(x, 2, Mode::Train, Some(&mut drng)).output;
        let zeros = dropped.iter().filter(|v| **v == 0.0).count();
        assert!(zeros > 20 && zeros < 108, "about half dropped, got {zeros} of 128");
        for (d, p) in dropped.iter().zip(&plain) {
            assert!(
                *d == 0.0 || (d - 2.0 * p).abs() < 1e-6,
                "kept units are scaled by 1/(1-p)"
            );
        }
    }
}
