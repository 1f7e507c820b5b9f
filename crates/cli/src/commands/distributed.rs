//! `din train --distributed`: data-parallel training, over MPI when din
//! is built with the `mpi` feature (under `mpirun`), else as one rank.

use anyhow::Result;
use din::distributed::{fit_distributed, load_shard, Collective, Traffic};
use din::train::Silent;

use super::train::{config_and_out, report, Args, Pause, Progress, Run};

/// Runs `din train --distributed` on every rank of the MPI job.
#[cfg(feature = "mpi")]
pub(super) fn run(args: &Args, pause: Option<Pause>) -> Result<()> {
    use anyhow::Context;
    // Funneled: only this thread calls MPI; rayon's workers compute.
    let (universe, _) =
        mpi::initialize_with_threading(mpi::Threading::Funneled).context("MPI was already initialised")?;
    let mut comm = crate::mpi_comm::MpiCollective::new(universe.world());
    if let Err(e) = train(args, pause, &mut comm) {
        // The other ranks may wait in a collective: end them all.
        eprintln!("error: rank {}: {e:#}", comm.rank());
        comm.abort(2);
    }
    Ok(())
}

/// Without the `mpi` feature: one rank, in this process.
#[cfg(not(feature = "mpi"))]
pub(super) fn run(args: &Args, pause: Option<Pause>) -> Result<()> {
    if !args.json {
        eprintln!(
            "note: this din was built without the `mpi` feature: training as one rank (build with `cargo build --release -p din-cli --features mpi` and run under mpirun for more)"
        );
    }
    train(args, pause, &mut din::distributed::Solo)
}

/// Reads this rank's shard, trains with the other ranks, and on rank 0
/// saves the model and prints the run and every rank's traffic.
fn train(args: &Args, pause: Option<Pause>, comm: &mut dyn Collective) -> Result<()> {
    let (config, out, source) = config_and_out(args)?;
    let shard = load_shard(&config, comm)?;
    let root = comm.rank() == 0;
    let data = &shard.data;
    if root && !args.json {
        let val = data.validation.as_ref().map_or(0, |v| v.len());
        println!(
            "training on {} rows over {} ranks ({} each), validating on {val} rows ({source})",
            shard.total_rows(),
            comm.ranks(),
            shard.rows.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        );
    }
    // fit_distributed saves the model after every epoch, streamed from
    // the ranks: no rank holds it whole.
    let got = if root {
        let mut progress = Progress::new(&out, data, Vec::new(), args.json, pause);
        fit_distributed(&shard, comm, &mut progress, Some(&out))?
    } else {
        fit_distributed(&shard, comm, &mut Silent, None)?
    };
    let traffic = got.traffic.gather(comm)?;
    if !root {
        return Ok(());
    }
    if !args.json {
        print_traffic(&traffic);
    }
    let value = serde_json::to_value(&traffic)?;
    let run = Run {
        history: &got.history,
        best_epoch: got.best_epoch,
        stopped_early: got.stopped_early,
        model_epoch: got.model_epoch,
    };
    report(args, data, &out, &run, Some(("traffic", value)))
}

/// Per rank: bytes sent per step by kind, and seconds in communication
/// and in computation.
fn print_traffic(traffic: &[Traffic]) {
    println!("rank  steps  ids B/step  rows B/step  row grads B/step  dense B/step  comm s  compute s");
    for (r, t) in traffic.iter().enumerate() {
        let [ids, rows, grads, dense] = t.bytes_per_step();
        println!(
            "{r:>4}  {:>5}  {ids:>10.0}  {rows:>11.0}  {grads:>16.0}  {dense:>12.0}  {:>6.2}  {:>9.2}",
            t.steps,
            t.step_comm_seconds(),
            t.compute_seconds
        );
    }
}
