//! A fully connected layer, `y = x·W + b`.

use rand::Rng;

use super::linalg::Gemm;
use super::param::{Module, Param, Role};

/// `y[rows, out] = x[rows, in] · weight[in, out] + bias[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[in, out]` (Keras layout).
    pub weight: Param,
    /// `[out]`.
    pub bias: Param,
}

impl Linear {
    /// Glorot-uniform weights (Keras' default), zero bias.
    pub fn new(input: usize, output: usize, rng: &mut impl Rng) -> Self {
        let limit = (6.0 / (input + output) as f32).sqrt();
        let w = (0..input * output).map(|_| rng.gen_range(-limit..limit)).collect();
        Linear {
            weight: Param::new(w, vec![input, output], Role::Weight),
            bias: Param::filled(0.0, vec![output], Role::Bias),
        }
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.weight.shape[0]
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        self.weight.shape[1]
    }

    /// `y = x·W + b`; `y` is resized to `[rows, out]`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        self.forward_with(Gemm::F32, x, rows, y);
    }

    /// [`Linear::forward`] with `gemm`'s products.
    pub fn forward_with(&self, gemm: Gemm, x: &[f32], rows: usize, y: &mut Vec<f32>) {
        let (i, o) = (self.input_dim(), self.output_dim());
        y.clear();
        y.reserve(rows * o);
        for _ in 0..rows {
            y.extend_from_slice(&self.bias.value); // [rows, out] = b
        }
        gemm.matmul(rows, i, o, x, &self.weight.value, y, true); // += x·W
    }

    /// Accumulates `dW += xᵀ·dy`, `db += Σ dy`, and writes `dx = dy·Wᵀ` when asked.
    pub fn backward(&mut self, x: &[f32], rows: usize, dy: &[f32], dx: Option<&mut Vec<f32>>) {
        self.backward_with(Gemm::F32, x, rows, dy, dx);
    }

    /// [`Linear::backward`] with `gemm`'s products.
    pub fn backward_with(&mut self, gemm: Gemm, x: &[f32], rows: usize, dy: &[f32], dx: Option<&mut Vec<f32>>) {
        let (i, o) = (self.input_dim(), self.output_dim());
        gemm.matmul_at_b(i, rows, o, x, dy, &mut self.weight.grad, true); // [in, out]
        for r in 0..rows {
            for (g, d) in self.bias.grad.iter_mut().zip(&dy[r * o..(r + 1) * o]) {
                *g += d;
            }
        }
        if let Some(dx) = dx {
            dx.clear();
            dx.resize(rows * i, 0.0);
            gemm.matmul_a_bt(rows, o, i, dy, &self.weight.value, dx, false); // [rows, in]
        }
    }
}

impl Module for Linear {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(String, &'a Param)) {
        f(format!("{prefix}.weight"), &self.weight);
        f(format!("{prefix}.bias"), &self.bias);
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(String, &mut Param)) {
        f(format!("{prefix}.weight"), &mut self.weight);
        f(format!("{prefix}.bias"), &mut self.bias);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, dot, numeric_grad, rand_vec};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn forward_matches_hand_computation() {
        let mut l = Linear::new(2, 1, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        l.weight.value = vec![2.0, -1.0];
        l.bias.value = vec![0.5];
        let mut y = Vec::new();
        l.forward(&[1.0, 3.0, 0.0, 1.0], 2, &mut y);
        // row 0: 1*2 + 3*(-1) + 0.5 = -0.5; row 1: 0*2 + 1*(-1) + 0.5 = -0.5
        assert_eq!(y, vec![-0.5, -0.5]);
    }

    /// `weight` is `[in, out]`, row-major (Keras' layout, the file's): set by
    /// name, element `i * out + j` connects input `i` to output `j`.
    #[test]
    fn the_weight_named_weight_is_in_by_out() {
        let mut l = Linear::new(3, 2, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        l.visit_mut("lin", &mut |name, p| match name.as_str() {
            "lin.weight" => {
                assert_eq!(p.shape, [3, 2]);
                p.value = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
            }
            "lin.bias" => p.value = vec![0.5, -0.5],
            other => panic!("unexpected tensor {other}"),
        });
        let mut y = Vec::new();
        l.forward(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, &mut y);
        assert_eq!(y, [1.5, 1.5, 3.5, 3.5, 5.5, 5.5]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (rows, i, o) = (5, 4, 3);
        let mut l = Linear::new(i, o, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        l.bias.value = rand_vec(o, 9);
        let x = rand_vec(rows * i, 2);
        let r = rand_vec(rows * o, 3);
        let loss = |l: &Linear, x: &[f32]| {
            let mut y = Vec::new();
            l.forward(x, rows, &mut y);
            dot(&r, &y)
        };
        let mut dx = Vec::new();
        l.backward(&x, rows, &r, Some(&mut dx));
        let nx = numeric_grad(&x, 1e-3, |x| loss(&l, x));
        assert_close("dx", &dx, &nx, 1e-2);
        let nw = numeric_grad(&l.weight.value, 1e-3, |w| {
            let mut m = l.clone();
            m.weight.value = w.to_vec();
            loss(&m, &x)
        });
        assert_close("dW", &l.weight.grad, &nw, 1e-2);
        let nb = numeric_grad(&l.bias.value, 1e-3, |b| {
            let mut m = l.clone();
            m.bias.value = b.to_vec();
            loss(&m, &x)
        });
        assert_close("db", &l.bias.grad, &nb, 1e-2);
    }
}
