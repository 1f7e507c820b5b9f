//! The worker pool that training and scoring run on.

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
