//! The bf16 hardware kernels (issue 12) on the CPU that runs the tests:
//! every kernel this CPU has (AMX, AVX512-BF16) against the bf16 product in
//! f64, in inference's form and in mixed-precision training's (every
//! layout), and a model scored on the preferred one against the emulation
//! and FP32. Without a test harness (`harness = false`): Linux grants the AMX
//! tile state only to a process whose threads' signal stacks are large
//! enough, so the kernels are detected here before any thread starts (as
//! the `din` binary does). Says `skipped` on a CPU without bf16
//! instructions; the kernels' scalar models are tested in the library.

mod common;

use din::model::bf16::{bf16_hardware, hardware_kernels, round_bf16, Bf16Matrix};
use din::model::linalg::Gemm;
use din::model::{Attention, Din, Kernel, Module, Precision, Role};
use din::schema::{ActivationKind, AttentionConfig, Normalization};
use rand::{Rng, SeedableRng};

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 + 0.5) * 0.754877 + seed as f32 * 0.29).sin() * 2.3)
        .collect()
}

/// Every element of `got` within the bound of summing `k` exact products
/// in f32 (`k u Σ|a_p w_p|`) of `bf16(a) · bf16(w)` computed in f64.
fn check_product(kernel: Kernel, m: usize, k: usize, n: usize) {
    let (a, w) = (values(m * k, 1), values(k * n, 2));
    let mut got = vec![f32::NAN; m * n + 33];
    Bf16Matrix::new(k, n, &w, kernel).matmul(m, &a, &mut got);
    let u = f64::from(f32::EPSILON) / 2.0;
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                let x = f64::from(round_bf16(a[i * k + p])) * f64::from(round_bf16(w[p * n + j]));
                want += x;
                abs += x.abs();
            }
            let g = f64::from(got[i * n + j]);
            assert!(
                (g - want).abs() <= k as f64 * u * abs * 1.01,
                "{kernel:?} {m}x{k}x{n}: [{i}, {j}] = {g}, want {want}"
            );
        }
    }
    assert!(
        got[m * n..].iter().all(|x| x.is_nan()),
        "{kernel:?} {m}x{k}x{n}: nothing written past c"
    );
}

/// Mixed-precision training's products on `kernel` in each layout (the
/// operands in place, transposed, or a block of a wider matrix),
/// overwriting and accumulating, against the emulation: each within the
/// f32 bound of the other's sums.
fn check_training_products(kernel: Kernel, m: usize, k: usize, n: usize) {
    let (a, b) = (values(m * k, 3), values(k * n, 4));
    let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [k, m]
    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
    let wide: Vec<f32> = (0..m * (k + 2))
        .map(|i| {
            if i % (k + 2) < k {
                a[i / (k + 2) * k + i % (k + 2)]
            } else {
                1e30
            }
        })
        .collect();
    let u = f64::from(f32::EPSILON) / 2.0;
    let bound: Vec<f64> = (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            let s: f64 = (0..k)
                .map(|p| f64::from(a[i * k + p].abs()) * f64::from(b[p * n + j].abs()))
                .sum();
            2.0 * (k as f64 + 1.0) * u * s * 1.01 + 1e-6
        })
        .collect();
    for accumulate in [false, true] {
        let products = |g: Gemm| -> Vec<Vec<f32>> {
            let run = |f: &dyn Fn(&mut [f32])| {
                let mut c = vec![if accumulate { 0.25 } else { f32::NAN }; m * n];
                f(&mut c);
                c
            };
            vec![
                run(&|c| g.matmul(m, k, n, &a, &b, c, accumulate)),
                run(&|c| g.matmul_lda(m, k, n, &wide, k + 2, &b, c, accumulate)),
                run(&|c| g.matmul_at_b(m, k, n, &at, &b, c, accumulate)),
                run(&|c| g.matmul_a_bt(m, k, n, &a, &bt, c, accumulate)),
                run(&|c| g.serial().matmul_at_b(m, k, n, &at, &b, c, accumulate)),
            ]
        };
        let (got, want) = (products(Gemm::new(kernel)), products(Gemm::new(Kernel::Emulated)));
        for (layout, (g, w)) in got.iter().zip(&want).enumerate() {
            for ij in 0..m * n {
                let err = (f64::from(g[ij]) - f64::from(w[ij])).abs();
                assert!(
                    err <= bound[ij],
                    "{kernel:?} training {m}x{k}x{n}, layout {layout}, accumulate {accumulate}: [{ij}] = {}, emulated {}",
                    g[ij],
                    w[ij]
                );
            }
        }
    }
}

/// The attention unit on AMX, whose inference is fused (the first layer on
/// split operands, each later layer's activations rounded straight into
/// the next product's operand, rows a block at a time), against FP32 and
/// the emulation (first layer in f32, later layers' products in bf16), on
/// several chunks of samples whose histories are empty, short, long,
/// shared by neighbours or not, with every activation and odd widths.
/// With one hidden layer the split first layer is the only product off
/// f32, and must be near f32 (bf16 operands would err 100 times more).
fn check_fused_attention() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    // 160 samples: runs of one history, then histories of their own.
    let d = 11;
    let mut offsets = vec![0u32];
    let mut same = Vec::new();
    let mut len = 0;
    for s in 0..160 {
        let shared = s % 40 != 0 && s < 80;
        if !shared {
            len = [0, 1, 7, 50, 33, 16][s % 6];
        }
        same.push(shared && s > 0);
        offsets.push(offsets[s] + len);
    }
    let n = offsets[160] as usize;
    let q: Vec<f32> = (0..160 * d).map(|_| rng.gen_range(-1.5..1.5)).collect();
    // Each sample's keys; one marked as sharing its neighbour's history
    // has a copy of its keys.
    let mut keys: Vec<f32> = Vec::new();
    for s in 0..160 {
        let len = (offsets[s + 1] - offsets[s]) as usize * d;
        if same[s] {
            keys.extend_from_within(keys.len() - len..);
        } else {
            keys.extend((0..len).map(|_| rng.gen_range(-1.5f32..1.5)));
        }
    }
    let cases = [
        (ActivationKind::Prelu, vec![256, 128, 64], Normalization::None),
        (ActivationKind::Relu, vec![33, 17], Normalization::Softmax),
        (ActivationKind::Dice, vec![80, 40], Normalization::None),
        (ActivationKind::Sigmoid, vec![48, 31, 5], Normalization::Softmax),
        (ActivationKind::Prelu, vec![40], Normalization::None),
        (ActivationKind::Dice, vec![7], Normalization::Softmax),
    ];
    for (activation, hidden_units, normalization) in cases {
        let config = AttentionConfig {
            hidden_units: hidden_units.clone(),
            activation,
            normalization,
            ..AttentionConfig::default()
        };
        let mut att = Attention::new(d, &config, &mut rng);
        att.visit_mut("", &mut |name, p| match p.role {
            Role::Bias | Role::Alpha => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-0.5..0.5)),
            Role::Statistic if name.contains("var") => p.value.iter_mut().for_each(|v| *v = rng.gen_range(0.2..3.0)),
            Role::Statistic => p.value.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0)),
            _ => p.value.iter_mut().for_each(|v| *v *= 2.0),
        });
        let infer = |att: &Attention, kernel: Kernel, same: Option<&[bool]>| {
            let mut att = att.clone();
            att.set_kernel(kernel);
            let (mut pooled, mut weights) = (Vec::new(), Vec::new());
            att.infer(&q, &keys, &offsets, same, &mut pooled, &mut weights);
            (pooled, weights)
        };
        let (p32, w32) = infer(&att, Kernel::Fp32, Some(&same));
        let (pemu, wemu) = infer(&att, Kernel::Emulated, Some(&same));
        let (pamx, wamx) = infer(&att, Kernel::Amx, Some(&same));
        assert_eq!(
            infer(&att, Kernel::Amx, None),
            (pamx.clone(), wamx.clone()),
            "shared histories change nothing"
        );
        let worst = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
        };
        let scale = w32.iter().fold(1.0f32, |m, w| m.max(w.abs()));
        let (from32, fromemu, emu32) = (worst(&wamx, &w32), worst(&wamx, &wemu), worst(&wemu, &w32));
        println!(
            "{activation:?} {hidden_units:?} {normalization:?}: weights (scale {scale:.1}) from fp32 {from32:.2e}, \
             from the emulation {fromemu:.2e} (emulation from fp32 {emu32:.2e}); pooled from fp32 {:.2e}",
            worst(&pamx, &p32)
        );
        assert!(wamx.iter().all(|w| w.is_finite()) && wamx.len() == n);
        if hidden_units.len() == 1 {
            assert_eq!((&wemu, &pemu), (&w32, &p32), "one layer: the emulation is f32");
            assert!(from32 <= 3e-4 * scale, "split first layer near f32: {from32}");
        } else {
            assert!(from32 <= 3e-2 * scale, "bf16 near f32: {from32}");
            assert!(
                fromemu <= 3.0 * emu32 + 1e-4 * scale,
                "no further from the emulation than bf16 is from f32"
            );
        }
        assert!(from32 > 0.0, "the AMX path ran");
        // No behaviour at all, and a single one.
        let mut amx = att.clone();
        amx.set_kernel(Kernel::Amx);
        let (mut pooled, mut weights) = (Vec::new(), Vec::new());
        amx.infer(&q[..3 * d], &[], &[0, 0, 0, 0], None, &mut pooled, &mut weights);
        assert!(
            weights.is_empty() && pooled == vec![0.0; 3 * d],
            "empty histories pool to zero"
        );
        amx.infer(&q[..d], &keys[..d], &[0, 1], None, &mut pooled, &mut weights);
        let (mut p32, mut w32) = (Vec::new(), Vec::new());
        att.infer(&q[..d], &keys[..d], &[0, 1], None, &mut p32, &mut w32);
        assert!(worst(&weights, &w32) <= 3e-2 * scale && weights.len() == 1);
    }
}

fn main() {
    // First, before any thread exists (see the module's docs).
    let preferred = bf16_hardware();
    let kernels = hardware_kernels();
    let Some(preferred) = preferred else {
        println!("skipped: this CPU has no AVX512-BF16 or AMX");
        return;
    };
    println!("bf16 kernels on this CPU: {kernels:?}; preferred {preferred:?}");
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (16, 32, 16),
        (31, 33, 47),
        (32, 64, 64),
        (33, 256, 128),
        (100, 128, 64),
        (64, 16, 256),
        (257, 200, 80),
        (5, 999, 3),
    ];
    for &kernel in kernels {
        for (m, k, n) in shapes {
            check_product(kernel, m, k, n);
        }
        println!("ok: {kernel:?} products on {} shapes", shapes.len());
        for (m, k, n) in shapes {
            check_training_products(kernel, m, k, n);
        }
        println!(
            "ok: {kernel:?} training products in every layout on {} shapes",
            shapes.len()
        );
    }

    // A model in bf16 on the preferred kernel, against the emulation and
    // FP32, on a batch of four samples and 30 candidates of one user.
    let base = common::batch();
    let mut rows = vec![0, 1, 2, 3];
    rows.extend(std::iter::repeat_n(1, 30));
    let batch = base.gather(&rows);
    for (att, dnn, units) in [("prelu", "prelu", vec![256, 128, 64]), ("dice", "dice", vec![80, 40])] {
        let mut config = common::config(att, "none", dnn);
        config.model.attention.hidden_units = units.clone();
        let mut m = Din::new(&common::layout(&config), &config.model, 11).unwrap();
        common::randomize(&mut m, 12);
        m.visit_mut("", &mut |_, p| {
            if matches!(p.role, Role::Weight | Role::Embedding) {
                p.value.iter_mut().for_each(|v| *v *= 3.0);
            }
        });
        let p32 = m.predict(&batch);
        assert_eq!(m.set_precision(Precision::Bf16), preferred);
        let p16 = m.predict(&batch);
        m.attention.set_kernel(Kernel::Emulated);
        let emulated = m.predict(&batch);
        let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let (d32, demu) = (worst(&p32, &p16), worst(&emulated, &p16));
        println!("{att}/{dnn}/{units:?} on {preferred:?}: {d32:.2e} from fp32, {demu:.2e} from the emulation");
        assert!(d32 <= 1e-2 && d32 > 0.0, "bf16 within 1e-2 of fp32, and used");
        assert!(
            demu <= 1e-4,
            "the hardware against the emulation (the DNN is on the hardware in both)"
        );
    }
    if kernels.contains(&Kernel::Amx) {
        check_fused_attention();
        println!("ok: fused AMX attention");
    }
    println!("ok: bf16 hardware kernels");
}
