//! `din bench`: a synthetic data set at the scale of the tutorial's schema, and
//! measurements of training and inference speed, latency, memory and FLOP/s.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use din::checkpoint::{write_atomic, write_atomic_with};
use din::data::{infer_vocab, read_dataset, Batch, Dataset, ReadOptions};
use din::model::linalg::matmul;
use din::model::Din;
use din::schema::{Config, Layout};
use din::scorer::predict;
use din::scorer::Scorer;
use din::threads::thread_pool;
use din::train::{fit_with, load_training_data, Checkpoints, Observer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Benchmarks.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Write a synthetic data set (samples.tsv + config.toml) in the core reader's format.
    Gen(GenArgs),
    /// Measure training and inference on a data set written by `din bench gen`.
    Run(RunArgs),
    /// Read a config's training file only: rows, groups, the history ids
    /// stored, seconds, rows/s and the process's peak memory.
    Load(LoadArgs),
}

/// `din bench load`.
#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The config whose data.train is read (with its input section).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value, as `din train --set` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the measurements as JSON.
    #[arg(long)]
    json: bool,
}

/// `din bench gen`.
#[derive(Debug, clap::Args)]
struct GenArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Users (one history each).
    #[arg(long, default_value_t = 20_000)]
    users: u32,
    /// Items (the history shares the item embedding).
    #[arg(long, default_value_t = 100_000)]
    items: u32,
    /// Categories.
    #[arg(long, default_value_t = 1_000)]
    categories: u32,
    /// Longest history; lengths are uniform in 1..=max_len.
    #[arg(long, default_value_t = 50)]
    max_len: usize,
    /// Candidates per history.
    #[arg(long, default_value_t = 6)]
    candidates: usize,
    /// Write the grouped layout: one line per history with its candidates
    /// (`input.layout = "grouped"`), the same samples in the same order.
    #[arg(long)]
    grouped: bool,
    /// Seed.
    #[arg(long, default_value_t = 2024)]
    seed: u64,
}

/// `din bench run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Folder written by `din bench gen`.
    #[arg(long)]
    data: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Repetitions of the 1 user x 200 candidates latency measurement.
    #[arg(long, default_value_t = 200)]
    repetitions: usize,
    /// Data row (0-based) whose user and history the 1 x 200 request uses.
    #[arg(long, default_value_t = 0)]
    latency_row: usize,
    /// Also write that request as `din serve` JSON (dense ids) to this file,
    /// so that a load test sends exactly what was timed here.
    #[arg(long)]
    request_out: Option<PathBuf>,
    /// Config overrides, e.g. `--set "model.attention.hidden_units=[80,40]"`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write training checkpoints as `din train` does (every
    /// train.checkpoint_every batches and at each epoch end), into
    /// `<data>/bench.checkpoints`, to measure what they cost.
    #[arg(long)]
    checkpoints: bool,
    /// Print the measurements as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `din bench`.
pub fn run(args: Args) -> Result<()> {
    match args.command {
        BenchCommand::Gen(a) => generate(&a),
        BenchCommand::Run(a) => measure(&a),
        BenchCommand::Load(a) => load(&a),
    }
}

fn load(a: &LoadArgs) -> Result<()> {
    let config = Config::from_toml_file_with(&a.config, &a.set)?;
    let mut layout = config.validate()?;
    let path = config.data.train.clone().context("the config names no data.train")?;
    let start = Instant::now();
    let data = read_dataset(&path, &config, &layout, ReadOptions::strict(true))?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = peak_rss_mib();
    let ids: usize = data.batch.sequences.iter().map(|s| s.values.len()).sum();
    // The products an epoch of training on these rows computes, counted
    // from the config's model shapes.
    infer_vocab(&mut layout, &data)?;
    let model = Din::new(&layout, &config.model, 0)?;
    let (behaviours, keys) = pairs_and_keys(&data, &layout);
    let (flat, grouped) = train_flops(&model, &layout, data.len(), behaviours, keys);
    let report = serde_json::json!({
        "file": path,
        "file_bytes": std::fs::metadata(&path).map(|m| m.len()).ok(),
        "rows": data.len(),
        "groups": data.batch.group_count(),
        "history_ids_stored": ids,
        "seconds": seconds,
        "rows_per_second": data.len() as f64 / seconds.max(1e-9),
        "peak_rss_mib": peak,
        "behaviours": behaviours,
        "history_rows_stored": keys,
        "train_gflop_per_epoch_flat": flat / 1e9,
        "train_gflop_per_epoch_grouped": grouped / 1e9,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} rows in {} groups, {ids} history ids stored, read in {seconds:.2} s ({:.0} rows/s), peak RSS {}",
            path.display(),
            data.len(),
            data.batch.group_count(),
            data.len() as f64 / seconds.max(1e-9),
            peak.map_or("n/a".to_string(), |m| format!("{m:.1} MiB"))
        );
        println!("{}", products_line(flat, grouped, data.batch.group_count()));
    }
    Ok(())
}

const CONFIG: &str = r#"# Written by `din bench gen`: the tutorial's model on synthetic data.
[data]
train = "samples.tsv"

[input]
header = true
LAYOUT
[schema]
label = "label"
user = "user_id"
sparse = [
  { name = "user_id", vocab_size = USERS },
  { name = "item_id", vocab_size = ITEMS },
  { name = "cate_id", vocab_size = CATES, item_feature_of = "item_id" },
]
sequence = [
  { name = "hist_item_id", shares_embedding_with = "item_id", max_len = MAXLEN },
  { name = "hist_cate_id", shares_embedding_with = "cate_id", max_len = MAXLEN },
]
din_pairs = [
  { target = "item_id", history = "hist_item_id" },
  { target = "cate_id", history = "hist_cate_id" },
]

[model.attention]
hidden_units = [256, 128, 64]
activation = "prelu"

[model.dnn]
hidden_units = [200, 80]
activation = "prelu"

[train]
epochs = 1
batch_size = 256
eval_batch_size = 4096
"#;

fn generate(a: &GenArgs) -> Result<()> {
    if a.users == 0 || a.items == 0 || a.categories == 0 || a.max_len == 0 || a.candidates == 0 {
        bail!("--users, --items, --categories, --max-len and --candidates must be at least 1");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let category: Vec<u32> = (0..=a.items).map(|_| rng.gen_range(1..=a.categories)).collect();
    let path = a.out.join("samples.tsv");
    let mut rows = 0usize;
    write_atomic_with(&path, |w| {
        writeln!(w, "user_id\titem_id\tcate_id\thist_item_id\thist_cate_id\tlabel")?;
        let (mut items, mut cates) = (String::new(), String::new());
        for user in 1..=a.users {
            let len = rng.gen_range(1..=a.max_len);
            let hist: Vec<u32> = (0..len).map(|_| rng.gen_range(1..=a.items)).collect();
            items.clear();
            cates.clear();
            for (i, &h) in hist.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(items, "{sep}{h}");
                let _ = write!(cates, "{sep}{}", category[h as usize]);
            }
            let mut group: Vec<(u32, u32, u8)> = Vec::with_capacity(a.candidates);
            for _ in 0..a.candidates {
                let item = rng.gen_range(1..=a.items);
                let cate = category[item as usize];
                // Learnable signal: clicks are likelier when the category is in the history.
                let seen = hist.iter().any(|&h| category[h as usize] == cate);
                let label = u8::from(rng.gen::<f32>() < if seen { 0.6 } else { 0.15 });
                group.push((item, cate, label));
                rows += 1;
            }
            if a.grouped {
                let join = |f: &dyn Fn(&(u32, u32, u8)) -> String| group.iter().map(f).collect::<Vec<_>>().join("|");
                let (i, c, l) = (
                    join(&|g| g.0.to_string()),
                    join(&|g| g.1.to_string()),
                    join(&|g| g.2.to_string()),
                );
                writeln!(w, "{user}\t{i}\t{c}\t{items}\t{cates}\t{l}")?;
            } else {
                for (item, cate, label) in group {
                    writeln!(w, "{user}\t{item}\t{cate}\t{items}\t{cates}\t{label}")?;
                }
            }
        }
        Ok(())
    })?;
    let config = CONFIG
        .replace("USERS", &(a.users + 1).to_string())
        .replace("ITEMS", &(a.items + 1).to_string())
        .replace("CATES", &(a.categories + 1).to_string())
        .replace("MAXLEN", &a.max_len.to_string())
        .replace("LAYOUT", if a.grouped { "layout = \"grouped\"\n" } else { "" });
    write_atomic(&a.out.join("config.toml"), config.as_bytes())?;
    println!("wrote {rows} samples to {} and config.toml", path.display());
    Ok(())
}

/// Multiply-adds x 2 of one forward pass, counting only real behaviours.
fn forward_flops(model: &Din, layout: &Layout, samples: usize, behaviours: usize) -> f64 {
    let d = layout.query_dim() as f64;
    let att = &model.attention;
    let h1 = att.first.linear.output_dim() as f64;
    let mut per_behaviour = 2.0 * d * h1 * 2.0; // k·Wk' and (q*k)·Wp
    for b in &att.rest.blocks {
        per_behaviour += 2.0 * (b.linear.input_dim() * b.linear.output_dim()) as f64;
    }
    per_behaviour += 2.0 * att.output.input_dim() as f64;
    let mut per_sample = 2.0 * d * h1; // q·Wq', once per sample
    for b in &model.dnn.blocks {
        per_sample += 2.0 * (b.linear.input_dim() * b.linear.output_dim()) as f64;
    }
    per_sample += 2.0 * model.output.input_dim() as f64;
    per_behaviour * behaviours as f64 + per_sample * samples as f64
}

/// The (query, behaviour) rows of `data`, each row's history counted once
/// per row, and the history rows it stores (fewer when grouped).
fn pairs_and_keys(data: &Dataset, layout: &Layout) -> (usize, usize) {
    let h0 = layout.pairs[0].1;
    let pairs = (0..data.len()).map(|r| data.batch.history(h0, r).len()).sum();
    (pairs, data.batch.sequences[h0].values.len())
}

/// One line for people: an epoch's training products, flat and grouped.
fn products_line(flat: f64, grouped: f64, groups: usize) -> String {
    format!(
        "training products   {:>10.2} GFLOP per epoch flat, {:.2} in {groups} groups ({:.1}% fewer)",
        flat / 1e9,
        grouped / 1e9,
        100.0 * (1.0 - grouped / flat.max(1e-9))
    )
}

/// Multiply-adds x 2 of one training step's products over the data
/// (forward, and twice its products backward), flat: every sample's own
/// copy of its history. Grouped, the keys' share of the first attention
/// layer (`k·Wk'` forward, `dWk'` and `dk` backward) is computed once per
/// stored history row (`keys`) instead of once per (sample, behaviour) row.
fn train_flops(model: &Din, layout: &Layout, samples: usize, behaviours: usize, keys: usize) -> (f64, f64) {
    let flat = 3.0 * forward_flops(model, layout, samples, behaviours);
    let key_term = 2.0 * (layout.query_dim() * model.attention.first.linear.output_dim()) as f64;
    (flat, flat - 3.0 * key_term * behaviours.saturating_sub(keys) as f64)
}

/// Peak resident memory of this process in MiB (Linux), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn measure(a: &RunArgs) -> Result<()> {
    let path: &Path = &a.data.join("config.toml");
    let mut sets = a.set.clone();
    sets.push(format!("train.batch_size={}", a.batch_size));
    sets.push(format!("train.threads={}", a.threads));
    let config = Config::from_toml_file_with(path, &sets)?;
    let data = load_training_data(&config)?;
    anyhow::ensure!(
        data.stream.is_none(),
        "din bench run measures on the training rows held in memory: leave data.window_rows out"
    );
    let (behaviours, keys) = pairs_and_keys(&data.train, &data.layout);
    let n = data.train.len();

    let policy = a
        .checkpoints
        .then(|| Checkpoints::from_config(a.data.join("bench.checkpoints"), &data.config.train))
        .flatten();
    let mut counter = CheckpointCounter {
        written: 0,
        seconds: 0.0,
        since: Instant::now(),
    };
    let fit_start = Instant::now();
    let outcome = fit_with(&data, policy.as_ref(), None, &mut counter)?;
    // The whole run, checkpoint writes included.
    let train_seconds = fit_start.elapsed().as_secs_f64();
    let train_sps = outcome.history[0].samples_per_second;
    let mut model = outcome.model;
    // Inference in `model.precision` (`--set model.precision=bf16`).
    let kernel = model.set_precision(data.config.model.precision);
    let pool = thread_pool(a.threads)?;
    let flops_forward = forward_flops(&model, &data.layout, n, behaviours);
    let (flops_flat, flops_grouped) = train_flops(&model, &data.layout, n, behaviours, keys);

    let (infer_sps, latencies, gemm_gflops, candidates_per_second, json_latencies) = pool.install(|| {
        let start = Instant::now();
        let scores = predict(&model, &data.train, 4096);
        let infer = scores.len() as f64 / start.elapsed().as_secs_f64();
        // One user (row `latency_row`'s history) x 200 candidates.
        let one = latency_request(&data.train, &data.layout, a.latency_row)?;
        let timed = Instant::now();
        let mut lat: Vec<f64> = (0..a.repetitions.max(1))
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(model.predict(&one));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        // Back to back on all the pool's threads: what a server could reach.
        let candidates_per_second = (200 * lat.len()) as f64 / timed.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        // The same request as a `din serve` body, parsed and scored by the
        // Scorer that the server runs (everything but HTTP).
        let body = request_body(&one, &data.layout)?;
        if let Some(path) = &a.request_out {
            write_atomic(path, body.as_bytes())?;
        }
        let scorer = Scorer::new(
            data.config.clone(),
            data.layout.clone(),
            model.clone(),
            data.assets.clone(),
        );
        let mut json_lat: Vec<f64> = (0..a.repetitions.max(1))
            .map(|_| -> Result<f64> {
                let t = Instant::now();
                let v: serde_json::Value = serde_json::from_str(&body)?;
                let user = v["user"].as_object().cloned().unwrap_or_default();
                let candidates: Vec<_> = (v["candidates"].as_array().into_iter().flatten())
                    .filter_map(|c| c.as_object().cloned())
                    .collect();
                std::hint::black_box(scorer.score(&user, &candidates, 0)?);
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        json_lat.sort_by(f64::total_cmp);
        // The machine's FP32 GEMM peak through the same GEMM crate, 2048^3:
        // the best of 5, since a peak is what the machine can do when nothing
        // else interferes (the median would drop with any noise on a shared host).
        let m = 2048;
        let x: Vec<f32> = (0..m * m).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * m];
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                matmul(m, m, m, &x, &x, &mut c, false);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let gemm = 2.0 * (m * m * m) as f64 / best / 1e9;
        Ok::<_, anyhow::Error>((infer, lat, gemm, candidates_per_second, json_lat))
    })?;
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let history0 = data.train.batch.history(data.layout.pairs[0].1, a.latency_row).len();
    let latency_gflops = forward_flops(&model, &data.layout, 200, 200 * history0) / (p(0.5) / 1e3) / 1e9;
    // Training does the forward and about twice its products backward.
    let train_gflops = 3.0 * flops_forward / n as f64 * train_sps / 1e9;
    let infer_gflops = flops_forward / n as f64 * infer_sps / 1e9;
    let report = serde_json::json!({
        "threads": a.threads,
        "precision": din::model::bf16::describe_choice(data.config.model.precision, kernel),
        "batch_size": a.batch_size,
        "samples": n,
        "mean_history": behaviours as f64 / n as f64,
        "train_samples_per_second": train_sps,
        "train_seconds": train_seconds,
        "epochs": outcome.history.len(),
        "checkpoints_written": counter.written,
        "checkpoint_seconds": counter.seconds,
        "inference_samples_per_second_batch_4096": infer_sps,
        "latency_ms_1x200_median": p(0.5),
        "latency_ms_1x200_p99": p(0.99),
        "peak_rss_mib": peak_rss_mib(),
        "train_useful_gflops": train_gflops,
        "inference_useful_gflops": infer_gflops,
        "latency_history_length": history0,
        "latency_row": a.latency_row,
        "latency_ms_1x200_json_median": json_latencies[json_latencies.len() / 2],
        "latency_candidates_per_second_1x200": candidates_per_second,
        "latency_useful_gflops": latency_gflops,
        "gemm_peak_gflops": gemm_gflops,
        "avx512bf16_speedup": din::model::bf16::avx512bf16_speedup(),
        "groups": data.train.batch.group_count(),
        "train_gflop_per_epoch_flat": flops_flat / 1e9,
        "train_gflop_per_epoch_grouped": flops_grouped / 1e9,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "samples {n}, mean history {:.1}, {} threads, batch {}, inference {}",
            behaviours as f64 / n as f64,
            a.threads,
            a.batch_size,
            din::model::bf16::describe_choice(data.config.model.precision, kernel)
        );
        println!("training            {train_sps:>10.0} samples/s   {train_gflops:>6.1} useful GFLOP/s");
        println!(
            "training run        {train_seconds:>10.2} s ({} epochs, {} checkpoints written in {:.3} s)",
            outcome.history.len(),
            counter.written,
            counter.seconds
        );
        println!("inference (4096)    {infer_sps:>10.0} samples/s   {infer_gflops:>6.1} useful GFLOP/s");
        println!(
            "1 user x 200        {:>10.3} ms median   {:.3} ms p99 ({} runs, history {history0}, {latency_gflops:.1} useful GFLOP/s)",
            p(0.5),
            p(0.99),
            latencies.len()
        );
        println!("1 x 200 back to back {candidates_per_second:>9.0} candidates/s");
        println!(
            "1 x 200 from JSON   {:>10.3} ms median (the server's parsing and Scorer::score, no HTTP)",
            json_latencies[json_latencies.len() / 2]
        );
        println!("FP32 GEMM peak      {gemm_gflops:>10.1} GFLOP/s (2048^3, best of 5, same GEMM crate and threads)");
        if let Some(speedup) = din::model::bf16::avx512bf16_speedup() {
            println!("AVX512-BF16 peak    {speedup:>10.2}x FP32's (vdpbf16ps against vfmadd231ps, one core)");
        }
        println!(
            "{}",
            products_line(flops_flat, flops_grouped, data.train.batch.group_count())
        );
        if let Some(rss) = peak_rss_mib() {
            println!("peak RSS            {rss:>10.1} MiB");
        }
    }
    Ok(())
}

/// Counts the checkpoints a run writes and times them: from the batch (or
/// epoch end) that precedes each to the checkpoint in place, so the time
/// covers gathering the state, serialising and the fsynced writes.
struct CheckpointCounter {
    written: usize,
    seconds: f64,
    since: Instant,
}

impl Observer for CheckpointCounter {
    fn on_batch(&mut self, _epoch: usize, _done: usize, _total: usize, _running_loss: f64) {
        self.since = Instant::now();
    }
    fn on_epoch(&mut self, _report: &din::train::EpochReport, _model: &Din) -> din::Result<()> {
        self.since = Instant::now();
        Ok(())
    }
    fn on_checkpoint(&mut self, _path: &Path) {
        self.written += 1;
        self.seconds += self.since.elapsed().as_secs_f64();
    }
}

/// Row `row`'s user and history with 200 candidates: the targets (item and
/// category) of 200 rows drawn with a fixed seed, so that every candidate is
/// an item the data shows, with its own category.
fn latency_request(data: &Dataset, layout: &Layout, row: usize) -> Result<Batch> {
    if row >= data.len() {
        bail!("--latency-row {row}: the data has {} rows", data.len());
    }
    // Flat, as a request reaches the server.
    let mut one = data.batch.gather(&[row; 200]).ungrouped();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let picks: Vec<usize> = (0..200).map(|_| rng.gen_range(0..data.len())).collect();
    for &(t, _) in &layout.pairs {
        for (k, &p) in picks.iter().enumerate() {
            one.sparse[t][k] = data.batch.sparse_id(t, p);
        }
    }
    Ok(one)
}

/// The first row's user features and histories (except those filled
/// from the item table) and every row's candidate features as a
/// `POST /v1/score` body, in dense ids.
fn request_body(one: &Batch, layout: &Layout) -> Result<String> {
    use serde_json::{json, Map, Value};
    let targets: Vec<usize> = layout.pairs.iter().map(|&(t, _)| t).collect();
    let item_feature = |i: usize| layout.item_features.iter().any(|f| f.feature == i);
    let filled = |h: usize| {
        layout
            .item_features
            .iter()
            .any(|f| f.history.is_some_and(|(fh, _)| fh == h))
    };
    let mut user = Map::new();
    for (i, slot) in layout.sparse.iter().enumerate() {
        if !targets.contains(&i) && !item_feature(i) {
            user.insert(slot.name.clone(), json!(one.sparse[i][0]));
        }
    }
    for (f, (name, dim)) in layout.dense.iter().enumerate() {
        user.insert(name.clone(), json!(one.dense[f][..*dim]));
    }
    for (h, slot) in layout.sequences.iter().enumerate() {
        if !filled(h) {
            user.insert(slot.name.clone(), json!(one.history(h, 0)));
        }
    }
    let candidates: Vec<Value> = (0..one.rows)
        .map(|r| {
            let c: Map<String, Value> = targets
                .iter()
                .filter(|&&t| !item_feature(t))
                .map(|&t| (layout.sparse[t].name.clone(), json!(one.sparse[t][r])))
                .collect();
            Value::Object(c)
        })
        .collect();
    let body = json!({ "user": user, "candidates": candidates });
    Ok(serde_json::to_string(&body)?)
}
