//! `din`: prepare, train, evaluate, predict and serve with the Deep Interest Network.
//!
//! `main` only parses, sets up logging, dispatches to a command and reports
//! the error chain once (exit code 2 on any error).

mod commands;
#[cfg(feature = "mpi")]
mod mpi_comm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates large per-batch buffers; glibc's allocator returns them
/// to the OS and page-faults them back in every step (a quarter of training
/// cycles in `perf`). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Deep Interest Network (Zhou et al., KDD 2018) for click-through-rate prediction.
#[derive(Debug, Parser)]
#[command(name = "din", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model; with no arguments, the tutorial model on the bundled sample.
    Train(commands::train::Args),
    /// Compute logloss, AUC and GAUC of a saved model on labelled data.
    Evaluate(commands::evaluate::Args),
    /// Write click probabilities of a saved model for every row of a file.
    Predict(commands::predict::Args),
    /// Turn a raw behaviour log into DIN samples, a config and a vocabulary.
    Prepare(commands::prepare::Args),
    /// Generate synthetic data and measure speed, latency and memory.
    Bench(commands::bench::Args),
    /// Serve a saved model over HTTP (scores in raw ids, hot reload, metrics).
    Serve(commands::serve::Args),
    /// Write a saved model's inference graph as ONNX (for ONNX Runtime, Triton, ...).
    Export(commands::export::Args),
    /// Draw a model's training curves (history.json) as SVG.
    Plot(commands::plot::PlotArgs),
    /// Draw the attention weights of one sample's history against its candidates as SVG.
    Explain(commands::plot::ExplainArgs),
}

/// Rust ignores SIGPIPE, so a `println!` into a closed pipe (`din predict
/// ... | head`) panics with "Broken pipe". A command-line tool should stop
/// quietly instead, as `cat` does: restore the default action. Not for the
/// server, whose socket writes must see EPIPE as an error, not die of it.
#[cfg(unix)]
fn die_quietly_on_closed_pipe() {
    // SAFETY: called once at start-up, before any thread exists; setting a
    // signal's disposition to its default has no other precondition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn die_quietly_on_closed_pipe() {}

/// Turns transparent huge pages off for this process, unless
/// `DIN_ALLOW_THP=1`. mimalloc asks for them on its arenas, and when it
/// hands freed memory back to the kernel (as it does between training
/// steps) the next touch faults in and zeroes a whole 2 MiB page. On the
/// 2-vCPU Xeon of docs/performance.md this made speed swing from run to
/// run: in 3 alternated rounds with THP, training ran at 7.6-9.0k samples/s
/// and batch-4096 inference at 24-65k; without, 25.5-26.7k and 146-154k.
/// The working sets are small, so 4 KiB pages cost nothing measurable.
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    if std::env::var_os("DIN_ALLOW_THP").is_some_and(|v| v == "1") {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process's memory
    // map; it fails harmlessly on kernels without it.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    // Before any thread starts: Linux grants AMX's tile state only then
    // (see din::model::bf16).
    din::model::bf16::bf16_hardware();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        die_quietly_on_closed_pipe();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Evaluate(args) => commands::evaluate::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Prepare(args) => commands::prepare::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Plot(args) => commands::plot::plot(args),
        Command::Explain(args) => commands::plot::explain(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
