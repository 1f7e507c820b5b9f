//! Optimizers: Adam, Adagrad, SGD. Dense parameters are updated every step;
//! embedding tables only on the rows a batch touched (lazy updates).

use crate::model::{Din, EmbeddingGrads, Module, Role, SparseGrad};
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

    /// Every state tensor, named after the parameter it belongs to
    /// (`<param>.m`, `<param>.v` for Adam, `<param>.accumulator` for
    /// Adagrad; SGD has none), for checkpoints. `model` is the model this
    /// optimizer was made for.
    pub fn state(&self, model: &Din) -> Vec<(String, &[f32])> {
        let slots = self.dense.iter().chain(&self.tables).map(|s| [&s.a, &s.b]);
        name_slots(self.kind, slot_params(model), slots)
            .map(|(name, v)| (name, v.as_slice()))
            .collect()
    }

    /// [`Optimizer::state`], mutably: the tensors to fill from a checkpoint.
    pub fn state_mut(&mut self, model: &Din) -> Vec<(String, &mut Vec<f32>)> {
        let (kind, params) = (self.kind, slot_params(model));
        let slots = self
            .dense
            .iter_mut()
            .chain(&mut self.tables)
            .map(|s| [&mut s.a, &mut s.b]);
        name_slots(kind, params, slots).collect()
    }

    /// Sets the number of steps taken (restored from a checkpoint; Adam's
    /// bias correction depends on it).
    pub fn set_steps(&mut self, steps: u64) {
        self.step = steps;
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
                let s = &mut dense[i];
                update_dense(kind, lr_t, &mut p.value, &p.grad, &mut s.a, &mut s.b);
                i += 1;
            }
        });
        for ((table, g), s) in model.embeddings.iter_mut().zip(emb).zip(&mut self.tables) {
            update_rows(kind, lr_t, &mut table.weight.value, g, s);
        }
    }
}

/// The parameters with optimizer state, in the order of `dense` then `tables`.
fn slot_params(model: &Din) -> Vec<String> {
    let (mut dense, mut tables) = (Vec::new(), Vec::new());
    model.visit("", &mut |name, p| {
        if trained_densely(p.role) {
            dense.push(name);
        } else if p.role == Role::Embedding {
            tables.push(name);
        }
    });
    dense.extend(tables);
    dense
}

/// Names each slot's two tensors after its parameter (`.m` and `.v` for
/// Adam, `.accumulator` for Adagrad), skipping the empty ones.
fn name_slots<T: std::ops::Deref<Target = Vec<f32>>>(
    kind: OptimizerKind,
    params: Vec<String>,
    slots: impl Iterator<Item = [T; 2]>,
) -> impl Iterator<Item = (String, T)> {
    let labels = match kind {
        OptimizerKind::Adagrad => ["accumulator", ""],
        _ => ["m", "v"],
    };
    params.into_iter().zip(slots).flat_map(move |(param, pair)| {
        pair.into_iter()
            .zip(labels)
            .filter(|(v, _)| !v.is_empty())
            .map(move |(v, label)| (format!("{param}.{label}"), v))
            .collect::<Vec<_>>()
    })
}

/// `rows[from..]` when the state exists, else nothing (SGD has no state).
fn state(v: &mut [f32], from: usize, len: usize) -> &mut [f32] {
    if v.is_empty() {
        &mut []
    } else {
        &mut v[from..from + len]
    }
}

/// [`update`] of a dense tensor; a large one in blocks over the pool (the
/// same arithmetic per element, so the same bits).
fn update_dense(kind: OptimizerKind, lr: f32, w: &mut [f32], g: &[f32], a: &mut [f32], b: &mut [f32]) {
    use rayon::prelude::*;
    if w.len() < 2 * DENSE_BLOCK {
        return update(kind, lr, w, g, a, b);
    }
    let parts = w.len().div_ceil(DENSE_BLOCK);
    let (a, b) = (pieces(a, DENSE_BLOCK, parts), pieces(b, DENSE_BLOCK, parts));
    w.par_chunks_mut(DENSE_BLOCK)
        .zip(g.par_chunks(DENSE_BLOCK))
        .zip(a)
        .zip(b)
        .for_each(|(((w, g), a), b)| update(kind, lr, w, g, a, b));
}

/// `v` in pieces of `len` for `parts` tasks; an empty `v` (SGD has no
/// state, Adagrad no second one) as `parts` empty pieces.
fn pieces(v: &mut [f32], len: usize, parts: usize) -> Vec<&mut [f32]> {
    if v.is_empty() {
        (0..parts).map(|_| &mut [][..]).collect()
    } else {
        v.chunks_mut(len).collect()
    }
}

/// Values per task of a dense tensor's update; smaller tensors are updated
/// on the calling thread. The tutorial model's dense update took 0.010 s
/// of a `din bench run` epoch on one thread.
const DENSE_BLOCK: usize = 4096;

/// Lazy update of the rows `g` touched. Large updates run in parallel over
/// contiguous ranges of the table: each range is a disjoint mutable slice of
/// the table and its state, and each task applies the touched rows that fall
/// in its range, in the order of `g.ids` (every row is updated once, by the
/// same arithmetic, so the result does not depend on the split).
fn update_rows(kind: OptimizerKind, lr: f32, table: &mut [f32], g: &SparseGrad, s: &mut Slots) {
    use rayon::prelude::*;
    let d = g.dim.max(1);
    let rows = table.len() / d;
    let parts = 4 * rayon::current_num_threads();
    if g.ids.len() * d < PARALLEL_ROW_UPDATE || parts <= 4 {
        for (&id, grad) in g.ids.iter().zip(g.grads.chunks_exact(d)) {
            let at = id as usize * d;
            update(
                kind,
                lr,
                &mut table[at..at + d],
                grad,
                state(&mut s.a, at, d),
                state(&mut s.b, at, d),
            );
        }
        return;
    }
    // Rows per range, then each range's touched rows (positions in
    // `g.ids`, in order), bucketed in one pass rather than every task
    // scanning all of them.
    let span = rows.div_ceil(parts).max(1);
    let mut starts = vec![0usize; parts + 1];
    for &id in &g.ids {
        starts[id as usize / span + 1] += 1;
    }
    for p in 0..parts {
        starts[p + 1] += starts[p];
    }
    let mut order = vec![0u32; g.ids.len()];
    let mut next = starts.clone();
    for (i, &id) in g.ids.iter().enumerate() {
        let p = id as usize / span;
        order[next[p]] = i as u32;
        next[p] += 1;
    }
    let (a, b) = (pieces(&mut s.a, span * d, parts), pieces(&mut s.b, span * d, parts));
    table
        .par_chunks_mut(span * d)
        .zip(a)
        .zip(b)
        .enumerate()
        .for_each(|(p, ((w, a), b))| {
            let first = p * span;
            let mine = &order[starts[p]..starts[p + 1]];
            for (j, &i) in mine.iter().enumerate() {
                // The rows are scattered over a large table: fetch the
                // row PREFETCH_AHEAD places on while this one is updated.
                if let Some(&ahead) = mine.get(j + PREFETCH_AHEAD) {
                    let at = (g.ids[ahead as usize] as usize - first) * d;
                    for v in [&*w, &*a, &*b] {
                        crate::model::prefetch(v.as_ptr().wrapping_add(at));
                    }
                }
                let i = i as usize;
                let at = (g.ids[i] as usize - first) * d;
                let grad = &g.grads[i * d..(i + 1) * d];
                update(kind, lr, &mut w[at..at + d], grad, state(a, at, d), state(b, at, d));
            }
        });
}

/// How many rows ahead a parallel row update prefetches. Measured on the
/// tutorial model (`din bench run`, about 6,400 of the 100,001 item rows
/// per batch): the optimizer step took 0.067 s of an epoch without, 0.061 s
/// with (6 and 16 rows ahead did the same).
const PREFETCH_AHEAD: usize = 8;

/// Touched embedding values from which the update is split over threads.
const PARALLEL_ROW_UPDATE: usize = 1 << 15;

pub(crate) fn trained_densely(role: Role) -> bool {
    matches!(role, Role::Weight | Role::Bias | Role::Alpha)
}

/// Updates `w` from `g` with its state `a` (Adam's first moment, Adagrad's
/// accumulator) and `b` (Adam's second moment), each as long as `w` when the
/// optimizer has it. One call per tensor or embedding row, so that each loop
/// is vectorised.
#[inline]
fn update(kind: OptimizerKind, lr: f32, w: &mut [f32], g: &[f32], a: &mut [f32], b: &mut [f32]) {
    match kind {
        OptimizerKind::Sgd => w.iter_mut().zip(g).for_each(|(w, g)| *w -= lr * g),
        OptimizerKind::Adagrad => {
            for ((w, &g), a) in w.iter_mut().zip(g).zip(a) {
                *a += g * g;
                *w -= lr * g / (a.sqrt() + EPSILON);
            }
        }
        OptimizerKind::Adam => {
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(a).zip(b) {
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

    /// The parallel row update gives bitwise the serial one, for every optimizer.
    #[test]
    fn parallel_row_updates_equal_serial_ones() {
        use rand::{Rng, SeedableRng};
        let (rows, d) = (50_000usize, 4usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let table: Vec<f32> = (0..rows * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut g = SparseGrad::new(d);
        for _ in 0..30_000 {
            let id = rng.gen_range(0..rows as u32);
            let grad: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            g.add(id, &grad);
        }
        assert!(g.ids.len() * d >= PARALLEL_ROW_UPDATE);
        for kind in [OptimizerKind::Adam, OptimizerKind::Adagrad, OptimizerKind::Sgd] {
            let run = |threads: usize| {
                let mut w = table.clone();
                let mut s = Slots {
                    a: if kind == OptimizerKind::Sgd {
                        vec![]
                    } else {
                        vec![0.1; rows * d]
                    },
                    b: if kind == OptimizerKind::Adam {
                        vec![0.2; rows * d]
                    } else {
                        vec![]
                    },
                };
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                pool.install(|| update_rows(kind, 0.01, &mut w, &g, &mut s));
                (w, s.a, s.b)
            };
            let serial = run(1);
            assert!(serial.0 != table, "{kind:?} updated something");
            assert!(run(3) == serial, "{kind:?}: parallel differs from serial");
        }
    }

    /// A large dense tensor's update in blocks gives bitwise the update in
    /// one piece, for every optimizer.
    #[test]
    fn dense_updates_in_blocks_equal_one_piece() {
        use rand::{Rng, SeedableRng};
        let n = 3 * DENSE_BLOCK + 17;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (w0, g, a0, b0) = (draw(n), draw(n), draw(n), draw(n));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
        for kind in [OptimizerKind::Adam, OptimizerKind::Adagrad, OptimizerKind::Sgd] {
            let state = |v: &Vec<f32>, has: bool| {
                if has {
                    v.iter().map(|x| x.abs()).collect()
                } else {
                    vec![]
                }
            };
            let (a0, b0) = (
                state(&a0, kind != OptimizerKind::Sgd),
                state(&b0, kind == OptimizerKind::Adam),
            );
            let (mut w1, mut a1, mut b1) = (w0.clone(), a0.clone(), b0.clone());
            update(kind, 0.01, &mut w1, &g, &mut a1, &mut b1);
            let (mut w2, mut a2, mut b2) = (w0.clone(), a0.clone(), b0.clone());
            pool.install(|| update_dense(kind, 0.01, &mut w2, &g, &mut a2, &mut b2));
            assert!(w1 != w0, "{kind:?} updated something");
            assert!((w1, a1, b1) == (w2, a2, b2), "{kind:?}: blocks differ from one piece");
        }
    }

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
            &mut s.a,
            &mut s.b,
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
            &mut s.a,
            &mut s.b,
        );
        assert!((w - (1.0 - 0.05 / 0.35f32.sqrt())).abs() < 1e-6, "{w}");
        // SGD: w -= 0.1 * 0.5.
        let mut w = 1.0;
        update(
            OptimizerKind::Sgd,
            0.1,
            std::slice::from_mut(&mut w),
            &[0.5],
            &mut [],
            &mut [],
        );
        assert!((w - 0.95).abs() < 1e-7);
    }
}
