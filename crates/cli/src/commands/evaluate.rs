//! `din evaluate`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use din::scorer::Scorer;
use din::train::load_training_data;

use super::format_metrics;

/// Evaluate a saved model.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory written by `din train`.
    #[arg(long)]
    model: PathBuf,
    /// Labelled data in the model's input format. Default: the validation
    /// data the model was trained with (its data.validation, or the tail split).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Worker threads (0 = all cores; default: the training setting).
    #[arg(long)]
    threads: Option<usize>,
    /// Inference precision: fp32, bf16 (bf16 products with f32 sums; emulated,
    /// the same arithmetic but no faster, on a CPU without AVX512-BF16) or auto (bf16
    /// where the CPU's bf16 kernel is faster than fp32: AMX, or AVX512-BF16 that
    /// measures at least 1.5x fp32's FLOP/s). Default: the model's model.precision (fp32).
    #[arg(long)]
    precision: Option<din::model::Precision>,
    /// How the data file's lines map to samples (default: the model's
    /// input.layout): `flat`, one sample per line; `grouped`, one group of
    /// candidates per line.
    #[arg(long, value_enum)]
    layout: Option<super::LayoutArg>,
    /// Read --data in windows of about this many rows, holding one at a
    /// time (only each row's label, score and user are kept), for a file
    /// larger than memory (default: read it whole).
    #[arg(long)]
    window_rows: Option<usize>,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `din evaluate`.
pub fn run(args: Args) -> Result<()> {
    let mut scorer =
        Scorer::load(&args.model).with_context(|| format!("loading the model from {}", args.model.display()))?;
    super::apply_precision(&mut scorer, args.precision);
    if let Some(layout) = args.layout {
        scorer.config.input.layout = layout.into();
    }
    let threads = args.threads.unwrap_or(scorer.config.train.threads);
    let window = args.window_rows;
    anyhow::ensure!(window != Some(0), "--window-rows must be at least 1");
    let metrics = match (&args.data, window) {
        (Some(path), Some(window)) => scorer.evaluate_windows(path, window, threads)?,
        (Some(path), None) => scorer.evaluate(&scorer.read(path, true)?, threads)?,
        (None, _) => {
            let data = load_training_data(&scorer.config)?
                .validation
                .context("no --data given and the model's config has no validation data")?;
            scorer.evaluate(&data, threads)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
    } else {
        println!(
            "{}  (rows {}, positives {})",
            format_metrics("", &metrics),
            metrics.n,
            metrics.positives
        );
    }
    Ok(())
}
