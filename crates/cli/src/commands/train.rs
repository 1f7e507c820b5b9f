//! `din train`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use din::checkpoint::{self, Assets};
use din::model::Din;
use din::schema::{Config, Keep, Monitor};
use din::train::{fit, load_training_data, EpochReport, Observer};
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
    /// Override a config value: `--set model.attention.hidden_units=[80,40]`,
    /// `--set model.attention.pooling=sum` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the history as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
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
    if args.skip_bad_rows {
        config.data.skip_bad_rows = true;
    }
    match args.keep {
        Some(KeepArg::Best) => t.keep = Keep::Best,
        Some(KeepArg::Last) => t.keep = Keep::Last,
        None => {}
    }
}

/// Shows progress and saves the model after every epoch.
struct Progress {
    bar: Option<ProgressBar>,
    out: PathBuf,
    config: Config,
    assets: Assets,
    history: Vec<EpochReport>,
    epochs: usize,
    json: bool,
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

    fn on_epoch(&mut self, report: &EpochReport, model: &Din) -> din::Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.history.push(report.clone());
        checkpoint::save_with_assets(&self.out, &self.config, model, &self.assets, Some(&self.history))?;
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
        Ok(())
    }
}

/// Runs `din train`.
pub fn run(args: Args) -> Result<()> {
    let config_path = match &args.config {
        Some(p) => p.clone(),
        None => bundled_config()?,
    };
    let mut config = Config::from_toml_file_with(&config_path, &args.set)?;
    apply_overrides(&mut config, &args);
    let data = load_training_data(&config)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let stem = config_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        PathBuf::from("runs").join(stem)
    });
    if !args.json {
        let val = data.validation.as_ref().map_or(0, |v| v.len());
        println!(
            "training on {} rows, validating on {val} rows ({})",
            data.train.len(),
            config_path.display()
        );
        for set in std::iter::once(&data.train).chain(data.validation.as_ref()) {
            let s = &set.skipped;
            if s.count > 0 {
                let lines: Vec<String> = s.first.iter().map(|(l, _)| l.to_string()).collect();
                println!(
                    "skipped {} malformed rows of {} (lines {}{}); the first: {}",
                    s.count,
                    set.source.display(),
                    lines.join(", "),
                    if s.count > s.first.len() { ", ..." } else { "" },
                    s.first.first().map_or("", |(_, e)| e.as_str())
                );
            }
        }
    }
    let mut progress = Progress {
        bar: None,
        out: out.clone(),
        config: data.config.clone(),
        assets: data.assets.clone(),
        history: Vec::new(),
        epochs: data.config.train.epochs,
        json: args.json,
    };
    let outcome = fit(&data, &mut progress)?;
    checkpoint::save_with_assets(&out, &data.config, &outcome.model, &data.assets, Some(&outcome.history))
        .with_context(|| format!("saving the model to {}", out.display()))?;
    if args.json {
        let doc = serde_json::json!({
            "model_dir": out,
            "history": outcome.history,
            "best_epoch": outcome.best_epoch,
            "stopped_early": outcome.stopped_early,
            "model_epoch": outcome.model_epoch,
        });
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
