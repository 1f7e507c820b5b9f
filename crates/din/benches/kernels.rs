//! Criterion benchmarks of the compute kernels: the GEMM the model runs on,
//! the local activation unit's training step and inference, and a row-wise
//! activation. `cargo bench -p din --bench kernels`; whole-model numbers
//! come from `din bench run` (see docs/performance.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use din::model::linalg::matmul;
use din::model::{Activation, Attention, Mode};
use din::schema::{ActivationKind, AttentionConfig, Normalization, Pooling};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn values(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-0.1..0.1)).collect()
}

/// `samples` histories of length uniform in 1..=50 (the bench data's shape), dim `d`.
fn histories(samples: usize, d: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let mut offsets = vec![0u32];
    for _ in 0..samples {
        offsets.push(offsets[offsets.len() - 1] + rng.gen_range(1..=50));
    }
    let n = offsets[samples] as usize;
    (values(samples * d, rng), values(n * d, rng), offsets)
}

fn unit(d: usize, units: &[usize]) -> Attention {
    let config = AttentionConfig {
        pooling: Pooling::Attention,
        hidden_units: units.to_vec(),
        activation: ActivationKind::Prelu,
        normalization: Normalization::None,
    };
    Attention::new(d, &config, &mut ChaCha8Rng::seed_from_u64(1))
}

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for m in [256usize, 1024] {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (a, b) = (values(m * m, &mut rng), values(m * m, &mut rng));
        let mut out = vec![0.0; m * m];
        group.throughput(Throughput::Elements((2 * m * m * m) as u64)); // FLOPs
        group.bench_function(BenchmarkId::new("square", m), |bench| {
            bench.iter(|| matmul(m, m, m, &a, &b, &mut out, false))
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(20);
    for (d, units, batch) in [(16usize, vec![256usize, 128, 64], 256usize), (16, vec![80, 40], 1024)] {
        let name = format!("d{d}-{units:?}-b{batch}");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (q, keys, offsets) = histories(batch, d, &mut rng);
        let dpooled = values(batch * d, &mut rng);
        let mut att = unit(d, &units);
        group.throughput(Throughput::Elements(batch as u64)); // samples
        group.bench_function(BenchmarkId::new("train_step", &name), |bench| {
            bench.iter(|| {
                let (_, mut cache) = att.forward(&q, &keys, &offsets, Mode::Train);
                att.backward(&q, &keys, &mut cache, &dpooled)
            })
        });
        let (mut pooled, mut weights) = (Vec::new(), Vec::new());
        group.bench_function(BenchmarkId::new("infer", &name), |bench| {
            bench.iter(|| att.infer(&q, &keys, &offsets, None, &mut pooled, &mut weights))
        });
    }
    group.finish();
}

fn activation(c: &mut Criterion) {
    let mut group = c.benchmark_group("activation");
    let (rows, channels) = (4096, 256);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = values(rows * channels, &mut rng);
    let mut y = vec![0.0; rows * channels];
    let act = Activation::new(ActivationKind::Prelu, channels);
    let rowwise = act.rowwise(channels);
    let mut dalpha = vec![0.0; channels];
    group.throughput(Throughput::Elements((rows * channels) as u64));
    group.bench_function("prelu_forward", |bench| bench.iter(|| rowwise.apply_rows(&x, &mut y)));
    group.bench_function("prelu_backward", |bench| {
        bench.iter(|| rowwise.backward(&x, &mut y, &mut dalpha))
    });
    // Dice at inference, in place as the attention unit runs it, over the
    // tutorial's (80,40) widths: 80 and 40 are not whole multiples of the
    // main loop's 32 channels.
    // 512 rows (a training chunk's; at inference the unit runs blocks of a
    // few hundred rows), so that the data stays in L2 as it does there.
    let rows = 512;
    for channels in [80, 40] {
        let dice = Activation::new(ActivationKind::Dice, channels);
        let rowwise = dice.rowwise(channels);
        let bias = vec![0.0; channels];
        let x0 = values(rows * channels, &mut rng);
        let mut x = x0.clone();
        group.throughput(Throughput::Elements((rows * channels) as u64));
        group.bench_function(BenchmarkId::new("dice_infer_in_place", channels), |bench| {
            // From the same values each time: repeated, Dice would shrink
            // them to subnormals, which cost more.
            bench.iter(|| {
                x.copy_from_slice(&x0);
                rowwise.add_apply_in_place(&mut x, None, &bias)
            })
        });
    }
    // Dice in training, over 512 rows: the forward activation with the
    // batch's moments (keeping its sigmoids), and the two halves of its
    // backward pass (the first from those sigmoids; and from the scores'
    // gradient, as for the last hidden layer).
    for channels in [80, 40] {
        let dice = Activation::new(ActivationKind::Dice, channels);
        let (mean, var) = (values(channels, &mut rng), vec![0.01; channels]);
        let rowwise = dice.rowwise_with_moments(&mean, &var);
        let x = values(rows * channels, &mut rng);
        let dy = values(rows * channels, &mut rng);
        let (mut y, mut g, mut p) = (vec![0.0; rows * channels], dy.clone(), vec![0.0; rows * channels]);
        rowwise.dice_keeping_sigmoid(&x, &mut y, &mut p);
        let (mut dalpha, mut sums, mut dbias) = (vec![0.0; channels], vec![0.0; 2 * channels], vec![0.0; channels]);
        let (mean_gz, mean_gzz) = (values(channels, &mut rng), values(channels, &mut rng));
        group.throughput(Throughput::Elements((rows * channels) as u64));
        group.bench_function(BenchmarkId::new("dice_train_forward", channels), |bench| {
            bench.iter(|| rowwise.dice_keeping_sigmoid(&x, &mut y, &mut p))
        });
        group.bench_function(BenchmarkId::new("dice_backward_partial", channels), |bench| {
            bench.iter(|| {
                g.copy_from_slice(&p);
                rowwise.dice_backward_partial(&x, &dy, &mut g, &mut dalpha, &mut sums)
            })
        });
        let (ds, w, mut dw) = (values(rows, &mut rng), values(channels, &mut rng), vec![0.0; channels]);
        group.bench_function(BenchmarkId::new("dice_backward_scored", channels), |bench| {
            bench.iter(|| {
                g.copy_from_slice(&p);
                rowwise.dice_backward_partial_scored(&x, (&ds, &w), &mut g, &mut dw, &mut dalpha, &mut sums)
            })
        });
        group.bench_function(BenchmarkId::new("dice_backward_finish", channels), |bench| {
            bench.iter(|| {
                g.copy_from_slice(&dy);
                rowwise.dice_backward_finish(&x, &mut g, &mean_gz, &mean_gzz, &mut dbias)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, gemm, attention, activation);
criterion_main!(benches);
