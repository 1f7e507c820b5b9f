//! `din train`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use din::checkpoint::{self, Assets};
use din::model::Din;
use din::schema::{Config, Keep, Monitor};
use din::train::{
    checkpoints, fit_with, load_training_data, Checkpoints, EpochReport, Observer, Resumable, TrainOutcome,
    TrainingData,
};
use indicatif::{ProgressBar, ProgressStyle};

use super::format_metrics;

/// The bundled config, relative to the repository root.
const BUNDLED_CONFIG: &str = "configs/movie_sample.toml";

/// Train a DIN model.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML config (schema, model, training). Default: the bundled tutorial config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Training file (overrides data.train).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation file (overrides data.validation and data.validation_split).
    #[arg(long, conflicts_with = "validation_split")]
    validation: Option<PathBuf>,
    /// Hold out the last fraction of the training rows for validation.
    #[arg(long)]
    validation_split: Option<f64>,
    /// Model directory to write (default: `runs/<config name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (0 = all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Which epoch's weights to save when there is validation data: the best
    /// by the monitored metric (default), or the last (train.keep).
    #[arg(long, value_enum)]
    keep: Option<KeepArg>,
    /// Skip malformed data rows (counted and listed) instead of stopping at
    /// the first, up to data.max_bad_rows_fraction (1%) of a file.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Common features: store the histories of consecutive rows with the
    /// same user side once, and train on whole groups, shuffled by group
    /// (data.group; grouped files are always read so).
    #[arg(long)]
    group: bool,
    /// Override a config value: `--set model.attention.hidden_units=[80,40]`,
    /// `--set model.attention.pooling=sum` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write a training checkpoint every N batches, besides one at each
    /// epoch end (train.checkpoint_every, default 1000; 0: epoch ends
    /// only). Checkpoints go to `<out>.checkpoints`, the newest
    /// train.keep_checkpoints (2) kept.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<usize>,
    /// Continue an interrupted run from its newest whole checkpoint: give
    /// the run's model directory (its --out), its checkpoints folder, or one
    /// checkpoint. The run goes on with its own config, data and threads,
    /// and ends with bitwise the model it would have ended with.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "config", "data", "validation", "validation_split", "out", "epochs", "batch_size",
        "learning_rate", "seed", "threads", "keep", "skip_bad_rows", "group", "set", "checkpoint_every",
    ])]
    resume: Option<PathBuf>,
    /// Data-parallel training over MPI: run as `mpirun -np N din train
    /// --distributed ...` (a din built with `--features mpi`). Each rank
    /// reads its part of the training file and owns every N-th embedding
    /// row; rank 0 writes the model directory. Not with Dice, grouped or
    /// streamed data or skipped bad rows; no checkpoints are written.
    /// Without the `mpi` feature it trains as one rank.
    #[arg(long, conflicts_with_all = ["resume", "checkpoint_every"])]
    distributed: bool,
    /// Print the history as JSON on stdout instead of a table.
    #[arg(long)]
    pub(super) json: bool,
}

/// `--keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KeepArg {
    /// The best epoch by the early-stopping monitor (val_logloss without early stopping).
    Best,
    /// The last epoch run.
    Last,
}

/// Finds the bundled config from the current folder, else from the source tree.
fn bundled_config() -> Result<PathBuf> {
    let here = PathBuf::from(BUNDLED_CONFIG);
    if here.is_file() {
        return Ok(here);
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(BUNDLED_CONFIG);
    if source.is_file() {
        return Ok(source);
    }
    bail!("no --config given and the bundled {BUNDLED_CONFIG} was not found; run from the repository root or pass --config")
}

/// Makes a command-line path absolute, so that the saved config.json still
/// finds the data from any folder.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn apply_overrides(config: &mut Config, args: &Args) {
    if let Some(p) = &args.data {
        config.data.train = Some(absolute(p));
    }
    if let Some(p) = &args.validation {
        config.data.validation = Some(absolute(p));
        config.data.validation_split = None;
    }
    if let Some(f) = args.validation_split {
        config.data.validation_split = Some(f);
        config.data.validation = None;
    }
    let t = &mut config.train;
    t.epochs = args.epochs.unwrap_or(t.epochs);
    t.batch_size = args.batch_size.unwrap_or(t.batch_size);
    t.learning_rate = args.learning_rate.unwrap_or(t.learning_rate);
    t.seed = args.seed.unwrap_or(t.seed);
    t.threads = args.threads.unwrap_or(t.threads);
    t.checkpoint_every = args.checkpoint_every.unwrap_or(t.checkpoint_every);
    if args.skip_bad_rows {
        config.data.skip_bad_rows = true;
    }
    if args.group {
        config.data.group = true;
    }
    match args.keep {
        Some(KeepArg::Best) => t.keep = Keep::Best,
        Some(KeepArg::Last) => t.keep = Keep::Last,
        None => {}
    }
}

/// Where a test asks `din train` to stop and wait to be killed (the hidden
/// `DIN_TEST_PAUSE_AT` variable): `batch:N` after the N-th batch of the run,
/// `checkpoint:K:STEP` before step STEP (`state.safetensors`, `state.json`,
/// `sync`, `rename`, `prune`) of the K-th checkpoint write, `epoch:E`
/// before the model directory is saved at the end of epoch E. It prints
/// `paused at ...` on stderr and sleeps: the kill-and-resume tests SIGKILL
/// it there.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pause {
    Batch(usize),
    Checkpoint(usize, String),
    Epoch(usize),
}

impl Pause {
    const VAR: &'static str = "DIN_TEST_PAUSE_AT";

    fn from_env() -> Result<Option<Pause>> {
        let Ok(spec) = std::env::var(Self::VAR) else {
            return Ok(None);
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let n = |s: &str| s.parse::<usize>().ok();
        Ok(Some(match parts.as_slice() {
            ["batch", k] if n(k).is_some() => Pause::Batch(n(k).unwrap_or(0)),
            ["epoch", k] if n(k).is_some() => Pause::Epoch(n(k).unwrap_or(0)),
            ["checkpoint", k, step] if n(k).is_some() => Pause::Checkpoint(n(k).unwrap_or(0), step.to_string()),
            _ => bail!("{}={spec}: expected batch:N, epoch:E or checkpoint:K:STEP", Self::VAR),
        }))
    }

    fn wait_here(&self) -> ! {
        eprintln!("paused at {self:?}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Shows progress and saves the model after every epoch.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    out: PathBuf,
    config: Config,
    assets: Assets,
    history: Vec<EpochReport>,
    epochs: usize,
    json: bool,
    pause: Option<Pause>,
    checkpoints_written: usize,
}

impl Observer for Progress {
    fn on_batch(&mut self, epoch: usize, done: usize, total: usize, running_loss: f64) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total as u64);
            let style = ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} batches {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar
        });
        if self.pause == Some(Pause::Batch((epoch - 1) * total + done)) {
            bar.suspend(|| self.pause.as_ref().map(Pause::wait_here));
        }
        bar.set_position(done as u64);
        bar.set_message(format!("{epoch}/{}  loss {running_loss:.4}", self.epochs));
    }

    fn on_skipped_batch(&mut self, epoch: usize, batch: usize, reason: &str) {
        let line = format!("warning: skipped epoch {epoch}, batch {batch}: {reason}");
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn on_checkpoint_step(&mut self, step: &str) -> din::Result<()> {
        if step == din::train::checkpoints::STATE_TENSORS {
            self.checkpoints_written += 1;
        }
        if let Some(Pause::Checkpoint(k, at)) = &self.pause {
            if *k == self.checkpoints_written && at == step {
                self.pause.as_ref().map(Pause::wait_here);
            }
        }
        Ok(())
    }

    fn on_epoch(&mut self, report: &EpochReport, model: &Din) -> din::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.history.push(report.clone());
        if self.pause == Some(Pause::Epoch(report.epoch)) {
            self.pause.as_ref().map(Pause::wait_here);
        }
        checkpoint::save_with_assets(&self.out, &self.config, model, &self.assets, Some(&self.history))?;
        self.print_epoch(report);
        Ok(())
    }

    fn on_distributed_epoch(&mut self, report: &EpochReport) -> din::Result<()> {
        // fit_distributed has saved the model (sharded, streamed).
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.history.push(report.clone());
        self.print_epoch(report);
        Ok(())
    }
}

impl Progress {
    /// The epoch's line, unless the output is JSON.
    fn print_epoch(&self, report: &EpochReport) {
        if !self.json {
            let val = report
                .validation
                .as_ref()
                .map(|m| format_metrics("val_", m))
                .unwrap_or_default();
            let skipped = match report.skipped_batches {
                0 => String::new(),
                n => format!("  skipped {n} batches (not finite)"),
            };
            println!(
                "epoch {:>3}/{}  train_loss {:.4}  {val}  ({:.1} s, {:.0} samples/s){skipped}",
                report.epoch, self.epochs, report.train_loss, report.seconds, report.samples_per_second
            );
        }
    }
}

/// The newest whole checkpoint for `--resume DIR`, and the run's model
/// directory.
fn find_checkpoint(dir: &Path) -> Result<(Resumable, PathBuf)> {
    let one = dir.join(checkpoints::STATE_JSON).is_file();
    let root = if one {
        dir.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else if dir
        .to_string_lossy()
        .trim_end_matches('/')
        .ends_with(CHECKPOINTS_SUFFIX)
    {
        dir.to_path_buf()
    } else {
        Checkpoints::dir_for(dir)
    };
    let root_name = root.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let Some(model_name) = root_name.strip_suffix(CHECKPOINTS_SUFFIX) else {
        bail!(
            "{}: not in a checkpoints folder (`<model dir>{CHECKPOINTS_SUFFIX}`); give the run's --out folder",
            dir.display()
        )
    };
    let out = root.with_file_name(model_name);
    if one {
        return Ok((checkpoints::read(dir)?, out));
    }
    let Some((found, damaged)) = checkpoints::latest(&root)? else {
        bail!(
            "{}: no checkpoint to resume from (the run stopped before writing its first one, or never ran); start it again without --resume",
            root.display()
        )
    };
    for e in damaged {
        eprintln!("warning: skipped a damaged checkpoint: {e}");
    }
    Ok((found, out))
}

/// The checkpoints folder's suffix after the model directory's name.
const CHECKPOINTS_SUFFIX: &str = ".checkpoints";

/// The config (file, `--set` and flags), the model directory, and where
/// the config came from.
pub(super) fn config_and_out(args: &Args) -> Result<(Config, PathBuf, String)> {
    let config_path = match &args.config {
        Some(p) => p.clone(),
        None => bundled_config()?,
    };
    let mut config = Config::from_toml_file_with(&config_path, &args.set)?;
    apply_overrides(&mut config, args);
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = config_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        PathBuf::from("runs").join(stem)
    });
    Ok((config, out, config_path.display().to_string()))
}

/// Runs `din train`.
pub fn run(args: Args) -> Result<()> {
    let pause = Pause::from_env()?;
    if args.distributed {
        return super::distributed::run(&args, pause);
    }
    let (data, out, resume, source) = match &args.resume {
        Some(dir) => {
            let (found, out) = find_checkpoint(dir)?;
            let data = load_training_data(&found.config)?;
            let source = found.path.display().to_string();
            (data, out, Some(found), source)
        }
        None => {
            let (config, out, source) = config_and_out(&args)?;
            (load_training_data(&config)?, out, None, source)
        }
    };
    let policy = Checkpoints::from_config(Checkpoints::dir_for(&out), &data.config.train);
    if !args.json {
        let val = data.validation.as_ref().map_or(0, |v| v.len());
        println!(
            "training on {} rows{}, validating on {val} rows ({source})",
            data.train_rows(),
            data.stream.as_ref().map_or(String::new(), |s| format!(
                " streamed in {} windows of about {} rows",
                s.windows, s.window_rows
            )),
        );
        let precision = data.config.train.precision;
        if !precision.is_fp32() {
            let kernel = match precision.resolve() {
                din::model::Kernel::Emulated => {
                    "bf16 emulated in f32 (this CPU has no AVX512-BF16 or AMX: the same arithmetic, slower than fp32)"
                        .to_string()
                }
                kernel => din::model::bf16::describe_choice(precision, kernel),
            };
            println!("training precision {precision}: {kernel}");
        }
        if let Some(r) = &resume {
            let s = &r.state;
            let n = data
                .stream
                .as_ref()
                .map_or(data.train.len().div_ceil(data.config.train.batch_size), |s| s.batches);
            let epochs = data.config.train.epochs;
            match (s.finished, s.epoch_done) {
                (true, _) => println!(
                    "resuming a run that had finished (epoch {} of {epochs}): saving its model",
                    s.epoch
                ),
                (false, true) => println!("resuming after epoch {} of {epochs}", s.epoch),
                (false, false) => println!(
                    "resuming in epoch {} of {epochs}, after batch {} of {n}",
                    s.epoch, s.batches_done
                ),
            }
        }
        let streamed = data.stream.as_ref().map(|s| (&s.path, &s.skipped));
        let held = std::iter::once(&data.train)
            .chain(data.validation.as_ref())
            .map(|d| (&d.source, &d.skipped));
        for (source, s) in streamed.into_iter().chain(held) {
            if s.count > 0 {
                let lines: Vec<String> = s.first.iter().map(|(l, _)| l.to_string()).collect();
                println!(
                    "skipped {} malformed rows of {} (lines {}{}); the first: {}",
                    s.count,
                    source.display(),
                    lines.join(", "),
                    if s.count > s.first.len() { ", ..." } else { "" },
                    s.first.first().map_or("", |(_, e)| e.as_str())
                );
            }
        }
    }
    let history = resume.as_ref().map(|r| r.state.history.clone()).unwrap_or_default();
    let mut progress = Progress::new(&out, &data, history, args.json, pause);
    let outcome = fit_with(&data, policy.as_ref(), resume, &mut progress)?;
    finish(&args, &data, &out, &outcome, None)
}

impl Progress {
    /// Progress of training on `data` into the model directory `out`.
    pub(super) fn new(
        out: &Path,
        data: &TrainingData,
        history: Vec<EpochReport>,
        json: bool,
        pause: Option<Pause>,
    ) -> Progress {
        Progress {
            bar: None,
            out: out.to_path_buf(),
            config: data.config.clone(),
            assets: data.assets.clone(),
            history,
            epochs: data.config.train.epochs,
            json,
            pause,
            checkpoints_written: 0,
        }
    }
}

/// Saves the trained model and prints how the run went (with `extra`'s
/// fields in the JSON document).
pub(super) fn finish(
    args: &Args,
    data: &TrainingData,
    out: &Path,
    outcome: &TrainOutcome,
    extra: Option<(&str, serde_json::Value)>,
) -> Result<()> {
    checkpoint::save_with_assets(out, &data.config, &outcome.model, &data.assets, Some(&outcome.history))
        .with_context(|| format!("saving the model to {}", out.display()))?;
    let run = Run {
        history: &outcome.history,
        best_epoch: outcome.best_epoch,
        stopped_early: outcome.stopped_early,
        model_epoch: outcome.model_epoch,
    };
    report(args, data, out, &run, extra)
}

/// How a training run ended, for [`report`].
pub(super) struct Run<'a> {
    pub(super) history: &'a [EpochReport],
    pub(super) best_epoch: Option<usize>,
    pub(super) stopped_early: bool,
    pub(super) model_epoch: usize,
}

/// Prints how the run went, the model being saved in `out` (with
/// `extra`'s fields in the JSON document).
pub(super) fn report(
    args: &Args,
    data: &TrainingData,
    out: &Path,
    outcome: &Run<'_>,
    extra: Option<(&str, serde_json::Value)>,
) -> Result<()> {
    if args.json {
        let mut doc = serde_json::json!({
            "model_dir": out,
            "history": outcome.history,
            "best_epoch": outcome.best_epoch,
            "stopped_early": outcome.stopped_early,
            "model_epoch": outcome.model_epoch,
        });
        if let (Some((key, value)), Some(map)) = (extra, doc.as_object_mut()) {
            map.insert(key.to_string(), value);
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let tc = &data.config.train;
        let monitor = tc.early_stopping.as_ref().map_or(Monitor::ValLogloss, |es| es.monitor);
        if let Some(best) = outcome.best_epoch {
            let value = outcome.history[best - 1]
                .validation
                .as_ref()
                .and_then(|m| din::train::EarlyStopping::value(monitor, m))
                .unwrap_or(f64::NAN);
            println!("best {} {value:.4} at epoch {best}", monitor.name());
        }
        if outcome.stopped_early {
            println!("stopped early after epoch {}", outcome.history.len());
        }
        let which = match outcome.best_epoch {
            Some(b) if tc.keep == Keep::Best && b == outcome.model_epoch => {
                format!(", the best by {}; --keep last saves the last", monitor.name())
            }
            Some(_) => ", the last".to_string(),
            None => String::new(),
        };
        println!(
            "saved model (epoch {}{which}) to {}",
            outcome.model_epoch,
            out.display()
        );
    }
    Ok(())
}
