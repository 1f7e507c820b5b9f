//! `din export --onnx`: a saved model's inference graph as an ONNX file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use din::checkpoint::{load_model, write_atomic};
use din::export::{onnx_inputs, to_onnx, OnnxInputKind, ATTENTION, HISTORY_LEN, PROBABILITY};

/// Export a saved model.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write ONNX (opset 13, dynamic batch and history length; the only
    /// format so far).
    #[arg(long)]
    onnx: bool,
    /// Model directory written by `din train`.
    #[arg(long)]
    model: PathBuf,
    /// The file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `din export`.
pub fn run(args: Args) -> Result<()> {
    if !args.onnx {
        bail!("name the format to write: --onnx (the only one so far)");
    }
    let saved =
        load_model(&args.model).with_context(|| format!("cannot load the model in {}", args.model.display()))?;
    let f = &saved.file;
    let metadata = [
        ("din.version", f.din_version.as_str()),
        ("din.weights_fingerprint", f.weights_fingerprint.as_str()),
        ("din.vocab_fingerprint", f.vocab_fingerprint.as_deref().unwrap_or("")),
    ];
    let bytes = to_onnx(&saved.model, &metadata)?;
    write_atomic(&args.out, &bytes)?;
    println!(
        "wrote {} ({} bytes, ONNX opset {})",
        args.out.display(),
        bytes.len(),
        din::export::OPSET
    );
    let ids = if saved.assets.vocab.is_some() {
        "dense ids: map raw values with the model's vocab.json"
    } else {
        "ids as in the training data"
    };
    println!("inputs ({ids}; pad sequences with 0):");
    for input in onnx_inputs(&saved.model) {
        let shape = match input.kind {
            OnnxInputKind::Ids => "int64 [batch]".to_string(),
            OnnxInputKind::Dense(d) => format!("float [batch, {d}]"),
            OnnxInputKind::Sequence { len } => format!("int64 [batch, {len}]"),
        };
        println!("  {:<24} {shape}", input.name);
    }
    println!("outputs:\n  {PROBABILITY:<24} float [batch]\n  {ATTENTION:<24} float [batch, {HISTORY_LEN}]");
    Ok(())
}
