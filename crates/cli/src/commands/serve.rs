//! `din serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use din_server::{Limits, ServeConfig};

/// Serve a model over HTTP.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model directory written by `din train`, or a folder of numbered
    /// version folders (1/, 2/, ...): the highest complete one is served.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Async I/O threads (reading and writing sockets only).
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// Scoring jobs queued or running before new requests get 503.
    #[arg(long, default_value_t = Limits::default().queue)]
    queue: usize,
    /// Most candidates per request.
    #[arg(long, default_value_t = Limits::default().max_candidates)]
    max_candidates: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Inference precision: fp32, bf16 (bf16 products with f32 sums; emulated,
    /// the same arithmetic but no faster, on a CPU without AVX512-BF16) or auto (bf16
    /// where the CPU's bf16 kernel is faster than fp32: AMX, or AVX512-BF16 that
    /// measures at least 1.5x fp32's FLOP/s). Default: each model's model.precision (fp32).
    #[arg(long)]
    precision: Option<din::model::Precision>,
}

/// Runs `din serve` until SIGTERM or ctrl-c.
pub fn run(args: Args) -> Result<()> {
    let model = args.model.clone();
    din_server::serve(ServeConfig {
        model: args.model,
        addr: args.addr,
        threads: args.threads,
        io_threads: args.io_threads,
        limits: Limits {
            queue: args.queue,
            max_candidates: args.max_candidates,
            max_body_bytes: args.max_body_bytes,
        },
        precision: args.precision,
    })
    .with_context(|| format!("serving {}", model.display()))
}
