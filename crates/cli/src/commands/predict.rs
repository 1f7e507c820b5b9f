//! `din predict`.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use din::checkpoint::write_atomic;
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
    /// How the data file's lines map to samples (default: the model's
    /// input.layout): `flat`, one sample per line; `grouped`, one group of
    /// candidates per line.
    #[arg(long, value_enum)]
    layout: Option<super::LayoutArg>,
}

/// Runs `din predict`.
pub fn run(args: Args) -> Result<()> {
    let mut scorer =
        Scorer::load(&args.model).with_context(|| format!("loading the model from {}", args.model.display()))?;
    if let Some(layout) = args.layout {
        scorer.config.input.layout = layout.into();
    }
    let data = scorer.read(&args.data, false)?;
    let probs = scorer.predict(&data, args.threads.unwrap_or(scorer.config.train.threads))?;
    let mut text = String::with_capacity(probs.len() * 12);
    for p in &probs {
        // `{}` prints the shortest decimal that parses back to the same f32.
        writeln!(text, "{p}")?;
    }
    write_atomic(&args.out, text.as_bytes())?;
    eprintln!("wrote {} scores to {}", probs.len(), args.out.display());
    Ok(())
}
