//! Data-parallel training over several processes (ranks) with sharded
//! embedding tables, as the industrial CTR systems split a model: the
//! dense layers replicated on every rank and their gradients all-reduced,
//! the embedding rows sharded (row `id` on rank `id % ranks`) and fetched,
//! and their gradients returned, with all-to-all messages.
//!
//! The library holds no transport: [`Collective`] is the handful of
//! collectives training needs (all-to-all with varying counts, all-gather),
//! [`Solo`] runs one process, [`in_process`] runs ranks as threads (for
//! tests), and `din train --distributed` implements it over MPI.
//!
//! * [`load_shard`]: each rank reads its contiguous part of the training
//!   file and agrees with the others on vocabulary sizes, the regulariser's
//!   id counts and the item table.
//! * [`fit_distributed`]: the training loop; the ranks end with the model
//!   [`fit`](crate::train::fit) trains on the same data, up to the order of
//!   float sums, sharded as they trained it.
//! * [`save_sharded`]: the sharded model as one model directory, written
//!   by rank 0 as the rows arrive, so that no rank holds the whole model
//!   (a vocabulary too large for one machine trains and saves);
//!   [`gather_model`] assembles it on rank 0 instead.
//! * [`Traffic`]: the bytes each rank sent, by kind, and the time spent in
//!   communication and in computation.

mod collective;
mod exchange;
mod fit;
mod save;
mod shard;

pub use collective::{
    all_reduce_sum, check_counts, in_process, segment_start, Collective, InProcess, ReduceBuffers, Solo,
};
pub use exchange::{Kind, Meter, RowExchange, Traffic};
pub use fit::{fit_distributed, DistributedOutcome};
pub use save::{gather_model, save_sharded, SaveTo};
pub use shard::{check_supported, load_shard, Owners, Shard};
