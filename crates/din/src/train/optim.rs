//! Optimizers: Adam, Adagrad, SGD. Dense parameters are updated every step;
//! embedding tables only on the rows a batch touched (lazy updates).

use crate::model::{Din, EmbeddingGrads, Module, Role};
use crate::schema::OptimizerKind;

/// Adam's first-moment decay.
pub const ADAM_BETA1: f32 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f32 = 0.999;
/// Epsilon of Adam and Adagrad (Keras' default).
pub const EPSILON: f32 = 1e-7;
/// Adagrad's initial accumulator (Keras' default).
pub const ADAGRAD_INIT: f32 = 0.1;

/// Per-tensor optimizer state.
#[derive(Debug, Clone, Default)]
struct Slots {
    /// Adam: first moment; Adagrad: accumulator.
    a: Vec<f32>,
    /// Adam: second moment.
    b: Vec<f32>,
}

/// An optimizer with its state, apart from the model (the model does not own it).
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    learning_rate: f32,
    step: u64,
    dense: Vec<Slots>,
    tables: Vec<Slots>,
}

impl Optimizer {
    /// State sized for `model`.
    pub fn new(kind: OptimizerKind, learning_rate: f32, model: &Din) -> Self {
        let slots = |n: usize| match kind {
            OptimizerKind::Adam => Slots {
                a: vec![0.0; n],
                b: vec![0.0; n],
            },
            OptimizerKind::Adagrad => Slots {
                a: vec![ADAGRAD_INIT; n],
                b: Vec::new(),
            },
            OptimizerKind::Sgd => Slots::default(),
        };
        let mut dense = Vec::new();
        model.visit("", &mut |_, p| {
            if trained_densely(p.role) {
                dense.push(slots(p.value.len()));
            }
        });
        let tables = model.embeddings.iter().map(|e| slots(e.weight.value.len())).collect();
        Optimizer {
            kind,
            learning_rate,
            step: 0,
            dense,
            tables,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update from the model's dense gradients and `emb` (touched rows only).
    pub fn step(&mut self, model: &mut Din, emb: &EmbeddingGrads) {
        self.step += 1;
        let (kind, lr) = (self.kind, self.learning_rate);
        let t = self.step as i32;
        // Keras' Adam: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t).
        let lr_t = match kind {
            OptimizerKind::Adam => lr * (1.0 - ADAM_BETA2.powi(t)).sqrt() / (1.0 - ADAM_BETA1.powi(t)),
            _ => lr,
        };
        let mut i = 0;
        let dense = &mut self.dense;
        model.visit_mut("", &mut |_, p| {
            if trained_densely(p.role) {
                update(kind, lr_t, &mut p.value, &p.grad, &mut dense[i], 0);
                i += 1;
            }
        });
        for ((table, g), s) in model.embeddings.iter_mut().zip(emb).zip(&mut self.tables) {
            let d = g.dim;
            for (&id, grad) in g.ids.iter().zip(g.grads.chunks_exact(d)) {
                let base = id as usize * d;
                update(kind, lr_t, &mut table.weight.value[base..base + d], grad, s, base);
            }
        }
    }
}

fn trained_densely(role: Role) -> bool {
    matches!(role, Role::Weight | Role::Bias | Role::Alpha)
}

/// Updates `w` from `g`; the state slots of `w[0]` are at `s.a[at]`, `s.b[at]`.
/// One call per tensor or embedding row, so that each loop is vectorised.
#[inline]
fn update(kind: OptimizerKind, lr: f32, w: &mut [f32], g: &[f32], s: &mut Slots, at: usize) {
    let n = w.len();
    match kind {
        OptimizerKind::Sgd => w.iter_mut().zip(g).for_each(|(w, g)| *w -= lr * g),
        OptimizerKind::Adagrad => {
            for ((w, &g), a) in w.iter_mut().zip(g).zip(&mut s.a[at..at + n]) {
                *a += g * g;
                *w -= lr * g / (a.sqrt() + EPSILON);
            }
        }
        OptimizerKind::Adam => {
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut s.a[at..at + n]).zip(&mut s.b[at..at + n]) {
                *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
                *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
                *w -= lr * *m / (v.sqrt() + EPSILON);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_updates_match_hand_computation() {
        // Adam, first step: m = 0.1 g, v = 0.001 g^2, lr_t = lr * sqrt(0.001) / 0.1,
        // so w -= lr * sqrt(0.001)/0.1 * 0.1 g / (sqrt(0.001) |g| + eps) ≈ lr * sign(g).
        let mut s = Slots {
            a: vec![0.0],
            b: vec![0.0],
        };
        let lr_t = 0.01 * (1.0f32 - ADAM_BETA2).sqrt() / (1.0 - ADAM_BETA1);
        let mut w = 1.0;
        update(
            OptimizerKind::Adam,
            lr_t,
            std::slice::from_mut(&mut w),
            &[0.5],
            &mut s,
            0,
        );
        assert!((w - (1.0 - 0.01)).abs() < 1e-5, "{w}");
        // Adagrad: acc = 0.1 + 0.25 = 0.35; w -= 0.1 * 0.5 / sqrt(0.35).
        let mut s = Slots {
            a: vec![ADAGRAD_INIT],
            b: vec![],
        };
        let mut w = 1.0;
        update(
            OptimizerKind::Adagrad,
            0.1,
            std::slice::from_mut(&mut w),
            &[0.5],
            &mut s,
            0,
        );
        assert!((w - (1.0 - 0.05 / 0.35f32.sqrt())).abs() < 1e-6, "{w}");
        // SGD: w -= 0.1 * 0.5.
        let mut w = 1.0;
        update(
            OptimizerKind::Sgd,
            0.1,
            std::slice::from_mut(&mut w),
            &[0.5],
            &mut Slots::default(),
            0,
        );
        assert!((w - 0.95).abs() < 1e-7);
    }
}
