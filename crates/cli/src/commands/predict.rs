//! `din predict`.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use std::io::Write as _;

use din::checkpoint::{write_atomic, write_atomic_with};
use din::scorer::Scorer;

/// Score a file with a saved model.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory written by `din train`.
    #[arg(long)]
    model: PathBuf,
    /// Data in the model's input format (the label column may be absent when the file has a header).
    #[arg(long)]
    data: PathBuf,
    /// Output file: one click probability per input row, in input order.
    #[arg(long)]
    out: PathBuf,
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
    /// Read the file in windows of about this many rows, holding one at a
    /// time, for a file larger than memory (default: read it whole).
    #[arg(long)]
    window_rows: Option<usize>,
}

/// Runs `din predict`.
pub fn run(args: Args) -> Result<()> {
    let mut scorer =
        Scorer::load(&args.model).with_context(|| format!("loading the model from {}", args.model.display()))?;
    super::apply_precision(&mut scorer, args.precision);
    if let Some(layout) = args.layout {
        scorer.config.input.layout = layout.into();
    }
    let threads = args.threads.unwrap_or(scorer.config.train.threads);
    let n = match args.window_rows {
        None => {
            let data = scorer.read(&args.data, false)?;
            let probs = scorer.predict(&data, threads)?;
            let mut text = String::with_capacity(probs.len() * 12);
            for p in &probs {
                // `{}` prints the shortest decimal that parses back to the same f32.
                writeln!(text, "{p}")?;
            }
            write_atomic(&args.out, text.as_bytes())?;
            probs.len()
        }
        Some(window) => {
            anyhow::ensure!(window > 0, "--window-rows must be at least 1");
            // Each window's scores go straight to the (atomically replaced) output.
            let mut n = 0;
            let mut failed = None;
            write_atomic_with(&args.out, |out| {
                let scored = scorer.predict_windows(&args.data, false, window, threads, &mut |_, probs| {
                    for p in probs {
                        writeln!(out, "{p}").map_err(|e| din::Error::io(&args.out, "cannot write the scores", e))?;
                    }
                    n += probs.len();
                    Ok(())
                });
                scored.map_err(|e| {
                    failed = Some(e);
                    std::io::Error::other("scoring failed")
                })
            })
            .map_err(|e| {
                failed
                    .take()
                    .map_or_else(|| anyhow::Error::from(e), anyhow::Error::from)
            })?;
            n
        }
    };
    eprintln!("wrote {n} scores to {}", args.out.display());
    Ok(())
}
