//! Mixed-precision training (`train.precision = "bf16"`, issue 12): every
//! product layout rounds both operands to bf16 and sums in f32; the
//! model's gradients stay within bf16's accuracy of FP32's; inference is
//! untouched; training goes through the config and stays deterministic.
//! Runs the emulation everywhere, and each bf16 kernel this CPU has.

mod common;

use din::model::bf16::{bf16_hardware, hardware_kernels, round_bf16};
use din::model::linalg::Gemm;
use din::model::{Din, Kernel, Mode, Module, Precision};
use din::train::bce_with_logits;
use rand::{Rng, SeedableRng};

/// Uniform in [-2, 2]: almost never a bf16 value.
fn rough(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-2.0..2.0)).collect()
}

/// Multiples of 1/8 in [-2, 2]: bf16 values.
fn exact(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-16i32..=16) as f32 / 8.0).collect()
}

/// `c = a · b` computed by each of `Gemm`'s layouts (`[m, k]`, `[k, n]`
/// row-major given; the other layouts get copies), split or serial, over
/// a `c` of zeros or (accumulating) of 0.5.
fn every_layout(gemm: Gemm, (m, k, n): (usize, usize, usize), a: &[f32], b: &[f32], check: impl Fn(&str, &[f32])) {
    let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [k, m]
    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
    let lda = k + 3;
    let wide: Vec<f32> = (0..m * lda)
        .map(|i| if i % lda < k { a[i / lda * k + i % lda] } else { 9.0 })
        .collect();
    for g in [gemm, gemm.serial()] {
        for accumulate in [false, true] {
            let start = if accumulate { 0.5 } else { 7.0 };
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut c = vec![start; m * n];
                f(&mut c);
                if accumulate {
                    c.iter_mut().for_each(|x| *x -= 0.5);
                }
                c
            };
            let tag = |layout: &str| format!("{layout} ({g:?}, accumulate {accumulate})");
            check(&tag("a·b"), &run(&|c| g.matmul(m, k, n, a, b, c, accumulate)));
            check(
                &tag("lda"),
                &run(&|c| g.matmul_lda(m, k, n, &wide, lda, b, c, accumulate)),
            );
            check(&tag("aᵀ·b"), &run(&|c| g.matmul_at_b(m, k, n, &at, b, c, accumulate)));
            check(&tag("a·bᵀ"), &run(&|c| g.matmul_a_bt(m, k, n, a, &bt, c, accumulate)));
        }
    }
}

/// `Σ_p x(a[i,p]) · x(b[p,j])` in f64, and `Σ_p |a[i,p] b[p,j]|`.
fn reference((m, k, n): (usize, usize, usize), a: &[f32], b: &[f32], x: impl Fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let (u, v) = (a[i * k + p], b[p * n + j]);
                c[i * n + j] += f64::from(x(u)) * f64::from(x(v));
                mag[i * n + j] += f64::from(u.abs()) * f64::from(v.abs());
            }
        }
    }
    (c, mag)
}

/// Each operand alone carries values bf16 cannot hold, so a product that
/// forgot to round either one is caught: its result differs from the
/// rounded operands' by many times the f32 summation error allowed.
#[test]
fn every_layout_rounds_both_operands_and_sums_in_f32() {
    // Past the kernels' tiles: 37 rows (AMX blocks of 32), 70 = 2·32 + 6
    // of k, 19 columns (one panel and a part).
    let dims = (37, 70, 19);
    let (m, k, n) = dims;
    let kernels: Vec<Kernel> = std::iter::once(Kernel::Emulated)
        .chain(hardware_kernels().iter().copied())
        .collect();
    for (which, a, b) in [
        ("a", rough(m * k, 1), exact(k * n, 2)),
        ("b", exact(m * k, 3), rough(k * n, 4)),
    ] {
        let (want, mag) = reference(dims, &a, &b, round_bf16);
        let (unrounded, _) = reference(dims, &a, &b, |x| x);
        let tol: Vec<f64> = mag.iter().map(|s| 1e-5 * s + 1e-6).collect();
        let effect = (0..m * n)
            .map(|i| (unrounded[i] - want[i]).abs() / tol[i])
            .fold(0.0, f64::max);
        assert!(
            effect > 10.0,
            "rounding {which} moves the product by {effect} tolerances"
        );
        for &kernel in &kernels {
            every_layout(Gemm::new(kernel), dims, &a, &b, |what, c| {
                for i in 0..m * n {
                    let err = (f64::from(c[i]) - want[i]).abs();
                    assert!(
                        err <= tol[i],
                        "{kernel:?}, rough {which}, {what}[{i}]: {} against {}",
                        c[i],
                        want[i]
                    );
                }
            });
        }
        // FP32 is the unrounded product.
        every_layout(Gemm::F32, dims, &a, &b, |what, c| {
            for i in 0..m * n {
                assert!((f64::from(c[i]) - unrounded[i]).abs() <= tol[i], "fp32 {what}[{i}]");
            }
        });
    }
}

/// Summed BCE's gradients of every tensor and embedding row, and the logits.
fn gradients(model: &mut Din, batch: &din::data::Batch) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let (logits, mut cache) = model.forward(batch, Mode::Train, None);
    let mut dlogits = Vec::new();
    bce_with_logits(&logits, &batch.labels, &mut dlogits);
    dlogits.iter_mut().for_each(|d| *d *= batch.rows as f32);
    model.zero_grad();
    let emb = model.backward(batch, &mut cache, &dlogits);
    let mut grads = Vec::new();
    model.visit("", &mut |name, p| {
        if !p.grad.is_empty() {
            grads.push((name, p.grad.clone()));
        }
    });
    for (t, g) in emb.iter().enumerate() {
        grads.push((format!("embedding rows of table {t}"), g.grads.clone()));
    }
    (logits, grads)
}

fn norm(v: impl Iterator<Item = f32>) -> f64 {
    v.map(|x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// The bf16 products move every gradient by about bf16's precision and no
/// more: each tensor's gradient within 6% (relative, in norm; measured:
/// 0.01% to 4%, the most in the attention unit's last layers, whose
/// gradients are 1000 times smaller than the DNN's) of FP32's, the logits
/// within 1e-2, and the hidden layers' gradients not bitwise FP32's (the
/// products did run in bf16). 1e-5 absolute allows for a gradient that is
/// zero but for rounding (the score bias under softmax).
#[test]
fn mixed_precision_gradients_are_within_bf16_accuracy_of_fp32() {
    let mut rows = vec![0, 1, 2, 3];
    rows.extend((0..40).map(|i| i % 4));
    let batch = common::batch().gather(&rows);
    for (att, norm_kind, dnn) in [("prelu", "none", "prelu"), ("dice", "softmax", "dice")] {
        let mut config = common::config(att, norm_kind, dnn);
        config.model.attention.hidden_units = vec![24, 16, 8];
        config.model.dnn.hidden_units = vec![32, 16];
        let layout = common::layout(&config);
        let mut fp32 = Din::new(&layout, &config.model, 11).expect("model");
        common::randomize(&mut fp32, 12);
        let mut bf16 = fp32.clone();
        let kernel = bf16.set_training_precision(Precision::Bf16);
        assert_eq!(kernel, bf16_hardware().unwrap_or(Kernel::Emulated));
        assert_eq!((bf16.training_kernel(), fp32.training_kernel()), (kernel, Kernel::Fp32));
        assert_eq!(bf16.attention.training_kernel(), kernel, "the attention unit's too");
        let (lf, gf) = gradients(&mut fp32, &batch);
        let (lb, gb) = gradients(&mut bf16, &batch);
        let worst = lf.iter().zip(&lb).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst <= 1e-2 && lf != lb, "{att}/{dnn}: logits moved by {worst}");
        assert_eq!(gf.len(), gb.len());
        for ((name, f), (_, b)) in gf.iter().zip(&gb) {
            let diff = norm(f.iter().zip(b).map(|(x, y)| x - y));
            let scale = norm(f.iter().copied());
            assert!(
                diff <= 0.06 * scale + 1e-5,
                "{att}/{dnn}: {name}: off by {diff} against a norm of {scale}"
            );
            if (name.starts_with("dnn.") && name.ends_with("weight")) || name == "attention.layers.1.weight" {
                assert!(f != b, "{att}/{dnn}: {name} is bitwise FP32's");
            }
        }
    }
}

/// Training precision leaves scoring alone: the same probabilities, bit
/// for bit, and an inference forward pass in [`Mode::Infer`] too.
#[test]
fn mixed_precision_leaves_inference_bit_for_bit() {
    let config = common::config("dice", "softmax", "prelu");
    let layout = common::layout(&config);
    let mut fp32 = Din::new(&layout, &config.model, 3).expect("model");
    common::randomize(&mut fp32, 4);
    let mut bf16 = fp32.clone();
    bf16.set_training_precision(Precision::Bf16);
    let batch = common::batch();
    assert_eq!(fp32.predict(&batch), bf16.predict(&batch));
    assert_eq!(
        fp32.forward(&batch, Mode::Infer, None).0,
        bf16.forward(&batch, Mode::Infer, None).0
    );
    assert_ne!(
        fp32.forward(&batch, Mode::Train, None).0,
        bf16.forward(&batch, Mode::Train, None).0,
        "training passes do change"
    );
}
