//! The worker pool that training and scoring run on.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Most worker threads a pool may have: far more than any machine's cores,
/// and few enough that asking for a silly number fails at once instead of
/// hanging while the threads start.
pub const MAX_THREADS: usize = 1024;

/// A rayon pool with `threads` workers (0 = all cores).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    if threads > MAX_THREADS {
        return Err(Error::config(
            "threads",
            threads,
            format!("at most {MAX_THREADS} (0 = one per core)"),
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Training(format!("cannot start {threads} threads: {e}")))
}

/// How long a [`Spinners`] worker looks for jobs without finding one before
/// it goes back to rayon's sleep (OpenMP runtimes spin similarly before
/// they block: Intel's `KMP_BLOCKTIME` is 200 ms).
const SPIN_IDLE: Duration = Duration::from_millis(2);

/// Keeps the other workers of the current rayon pool looking for jobs
/// (spinning) while the calling worker runs the serial parts of a training
/// step, so that the step's next parallel pass starts on every core at
/// once. An idle rayon worker sleeps and is woken when a job comes; on the
/// 2-core VMs we measure on, the job then starts on the second core about
/// 35 µs later (and the wake call costs the first core about 10 µs), at
/// every parallel pass of every step. A spinning worker starts it within
/// a microsecond. Hand-written: rayon has no setting for how long its idle
/// workers spin.
///
/// A spinner stops [`SPIN_IDLE`] after the last job it ran, or once this
/// is dropped; [`Spinners::ensure`] restarts the missing ones.
#[derive(Debug)]
pub(crate) struct Spinners {
    /// Spinners wanted: the pool's workers but the calling one.
    wanted: usize,
    state: Arc<SpinState>,
}

/// What [`Spinners`] and their jobs share.
#[derive(Debug)]
struct SpinState {
    /// How long a spinner goes without a job before it stops.
    idle: Duration,
    stop: AtomicBool,
    /// Spinner jobs sent to workers other than the caller and not yet
    /// started.
    pending: AtomicUsize,
    /// Spinners spinning.
    running: AtomicUsize,
}

impl SpinState {
    fn new(idle: Duration) -> SpinState {
        SpinState {
            idle,
            stop: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        }
    }
}

thread_local! {
    /// This worker runs a spinner (another one it picks up while it
    /// spins returns at once).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

impl Spinners {
    /// Spinners for the current pool: none outside a pool, with one
    /// worker, or with more workers than cores. None runs before
    /// [`Spinners::ensure`].
    pub(crate) fn new() -> Spinners {
        Spinners::with_idle(SPIN_IDLE)
    }

    /// [`Spinners::new`] whose spinners stop after `idle` without a job.
    /// None either when the pool has more workers than the machine has
    /// cores: a spinner would then take a core from the worker it waits for.
    fn with_idle(idle: Duration) -> Spinners {
        let threads = rayon::current_num_threads();
        let wanted = match rayon::current_thread_index() {
            Some(_) if threads <= cores() => threads - 1,
            _ => 0,
        };
        Spinners {
            wanted,
            state: Arc::new(SpinState::new(idle)),
        }
    }

    /// Unless every other worker spins, sends each one a spinner job
    /// (rayon's broadcast: a job per worker, which no other worker takes)
    /// and waits, at most [`SPIN_IDLE`], until they have started (none is
    /// then left queued where it would wait for its worker to be free).
    pub(crate) fn ensure(&self) {
        let state = &self.state;
        if state.running.load(Ordering::Acquire) >= self.wanted {
            return;
        }
        if state.pending.load(Ordering::Acquire) == 0 {
            state.pending.store(self.wanted, Ordering::Release);
            let (state, caller) = (Arc::clone(state), rayon::current_thread_index());
            rayon::spawn_broadcast(move |_| spin(&state, caller));
        }
        let since = Instant::now();
        while state.pending.load(Ordering::Acquire) > 0 && since.elapsed() < SPIN_IDLE {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Spinners {
    /// Stops the spinners (each returns within the job it is running).
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
    }
}

/// The machine's cores (as the process may use them).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A spinner job: runs the pool's jobs as they come, until `state.stop`
/// or `state.idle` without one. Returns at once on the thread that sent
/// it, or on a worker that spins already.
fn spin(state: &SpinState, caller: Option<usize>) {
    if rayon::current_thread_index() == caller {
        return;
    }
    state.pending.fetch_sub(1, Ordering::AcqRel);
    if SPINNING.get() {
        return;
    }
    SPINNING.set(true);
    state.running.fetch_add(1, Ordering::AcqRel);
    let mut last = Instant::now();
    while !state.stop.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last = Instant::now(),
            Some(rayon::Yield::Idle) if last.elapsed() < state.idle => std::hint::spin_loop(),
            _ => break,
        }
    }
    state.running.fetch_sub(1, Ordering::AcqRel);
    SPINNING.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Waits up to 10 s for `done`.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let since = Instant::now();
        while !done() {
            if since.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    #[test]
    fn spinners_run_jobs_and_stop_when_dropped_or_idle() {
        let threads = cores().min(3);
        if threads < 2 {
            eprintln!("skipped: one core");
            return;
        }
        let pool = thread_pool(threads).expect("pool");
        pool.install(|| {
            let spinners = Spinners::with_idle(Duration::from_secs(60));
            let others = threads - 1;
            assert_eq!(spinners.wanted, others, "every worker but the caller");
            spinners.ensure();
            let state = Arc::clone(&spinners.state);
            let running = || state.running.load(Ordering::Acquire);
            assert!(eventually(|| running() == others), "the other workers spin");
            // Jobs still run, on the spinning workers too.
            let sum: u64 = (0..100_000u64).into_par_iter().map(|x| x * 2).sum();
            assert_eq!(sum, 99_999 * 100_000);
            // A second `ensure` sends nothing more.
            spinners.ensure();
            assert_eq!((running(), state.pending.load(Ordering::Acquire)), (others, 0));
            drop(spinners);
            assert!(eventually(|| running() == 0), "dropped spinners stop");
            // Idle spinners stop by themselves; `ensure` restarts them.
            let brief = Spinners::with_idle(Duration::from_millis(1));
            for _ in 0..3 {
                brief.ensure();
                assert!(
                    eventually(|| brief.state.pending.load(Ordering::Acquire) == 0),
                    "started"
                );
                assert!(
                    eventually(|| brief.state.running.load(Ordering::Acquire) == 0),
                    "stopped idle"
                );
            }
        });
    }

    #[test]
    fn no_spinners_outside_a_pool_with_one_worker_or_more_workers_than_cores() {
        let outside = Spinners::new();
        outside.ensure();
        assert_eq!(outside.wanted, 0);
        thread_pool(1).expect("pool").install(|| {
            let one = Spinners::new();
            one.ensure();
            assert_eq!((one.wanted, one.state.running.load(Ordering::Acquire)), (0, 0));
        });
        thread_pool(cores() + 1).expect("pool").install(|| {
            let many = Spinners::new();
            many.ensure();
            assert_eq!((many.wanted, many.state.pending.load(Ordering::Acquire)), (0, 0));
        });
    }

    #[test]
    fn a_spinner_job_returns_at_once_on_its_caller() {
        let state = SpinState::new(SPIN_IDLE);
        // Outside a pool the caller's index is `None`, as here.
        spin(&state, rayon::current_thread_index());
        assert_eq!(state.running.load(Ordering::Acquire), 0);
        assert_eq!(state.pending.load(Ordering::Acquire), 0);
    }
}
