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
use din::model::{Din, Kernel, Module, Precision, Role};

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
    println!("ok: bf16 hardware kernels");
}
