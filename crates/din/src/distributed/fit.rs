//! The distributed training loop: the single-process loop's batches, each
//! split over the ranks by where its rows live, on the single-process
//! pieces (model, loss, regulariser, optimizer, evaluation, early
//! stopping); only the embedding rows and the gradients travel.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

use super::collective::{all_reduce_sum, Collective, ReduceBuffers};
use super::exchange::{Kind, Meter, RowExchange, Traffic};
use super::save::{save_sharded, SaveTo};
use super::shard::{Owners, Shard};
use crate::checkpoint::EpochReport;
use crate::data::{Batch, Dataset};
use crate::metrics::Metrics;
use crate::model::{Din, DinCache, EmbeddingGrads, Mode, Module, SparseGrad};
use crate::schema::{EarlyStoppingConfig, Keep, Layout, Monitor, OnNonFinite};
use crate::threads::thread_pool;
use crate::train::loss::bce_with_logits_over;
use crate::train::optim::trained_densely;
use crate::train::{batch_bounds, non_finite_gradient, regularize, stream, EarlyStopping, Observer, Optimizer};
use crate::{Error, Result};

/// What [`fit_distributed`] returns on each rank.
#[derive(Debug, Clone)]
pub struct DistributedOutcome {
    /// This rank's part of the model the run ends with (the best epoch's
    /// under `train.keep = "best"`): the dense layers whole, of each table
    /// the rows this rank owns ([`Din::new_shard`]'s layout).
    /// [`gather_model`](super::gather_model) assembles it whole on rank 0;
    /// [`save_sharded`] writes it without assembling it.
    pub model: Din,
    /// The epochs' reports (validation metrics on rank 0 only).
    pub history: Vec<EpochReport>,
    /// The best epoch by the monitor, when there is validation data (rank 0 only).
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// The epoch whose weights `model` holds.
    pub model_epoch: usize,
    /// What this rank sent and how long it spent computing and communicating.
    pub traffic: Traffic,
}

/// Trains on `shard` (this rank's part, from [`load_shard`](super::load_shard))
/// with the other ranks of `comm`, for `train.epochs` epochs (fewer with
/// early stopping).
///
/// The batches are those of [`fit`](crate::train::fit): the same
/// shuffled order of all the training rows (every rank draws it from the
/// seed), cut into the same batches. Each rank computes on the rows of the
/// batch it holds: it fetches their embedding rows from their owners
/// (rank `id % ranks`), runs the forward and backward passes (the loss is
/// the mean over the whole batch; dropout draws each row's mask where the
/// single process draws it), sends the rows' gradients back to their owners
/// and sums the dense gradients with the other ranks in rank order. Each
/// owner sums the gradients of its rows, applies the regulariser (the
/// mini-batch-aware one with counts over the whole file) and the lazy
/// optimizer to them; every rank applies the same dense update. So the
/// ranks end with the model one process trains, up to the order of float
/// sums (and with one rank, bitwise that model).
///
/// At each epoch end rank 0 scores its validation rows, fetching their
/// embedding rows from their owners as training does, tracks the best
/// epoch and tells the other ranks whether to keep this epoch's model
/// (`train.keep = "best"`), to save and to stop. With `save_to` (on rank
/// 0; the other ranks follow rank 0) the model the run would end with is
/// saved there after every epoch by [`save_sharded`], so no rank ever
/// holds the whole model; then `observer.on_distributed_epoch` has the
/// report. No checkpoints are written.
pub fn fit_distributed(
    shard: &Shard,
    comm: &mut dyn Collective,
    observer: &mut dyn Observer,
    save_to: Option<&std::path::Path>,
) -> Result<DistributedOutcome> {
    let owners = shard.owners;
    if comm.ranks() != owners.ranks || comm.rank() != owners.rank {
        return Err(Error::Distributed(format!(
            "the shard is rank {} of {}, the communicator rank {} of {}",
            owners.rank,
            owners.ranks,
            comm.rank(),
            comm.ranks()
        )));
    }
    let data = &shard.data;
    let tc = &data.config.train;
    let layout = &data.layout;
    let pool = thread_pool(tc.threads)?;
    let mut meter = Meter::new(comm);
    let mut model = Din::new_shard(layout, &data.config.model, tc.seed, owners.rank, owners.ranks)?;
    model.set_training_precision(tc.precision);
    let mut optimizer = Optimizer::new(tc.optimizer, tc.learning_rate, &model);
    let (mut shuffle, mut dropout) = (stream(tc.seed, 1, 0), stream(tc.seed, 2, 0));
    let first = shard.first_row();
    let mine = first..first + data.train.len();
    let mut order: Vec<usize> = (0..shard.total_rows()).collect();
    let widths: Vec<usize> = (model.dnn.blocks.iter())
        .filter(|b| b.dropout > 0.0)
        .map(|b| b.linear.output_dim())
        .collect();
    let keep_best = tc.keep == Keep::Best || tc.early_stopping.as_ref().is_some_and(|c| c.restore_best);
    let mut tracker = (owners.rank == 0 && data.validation.is_some()).then(|| {
        EarlyStopping::new(tc.early_stopping.clone().unwrap_or(EarlyStoppingConfig {
            monitor: Monitor::ValLogloss,
            patience: usize::MAX,
            restore_best: false,
        }))
    });
    let mut step = Step {
        batch: Batch::default(),
        positions: Vec::new(),
        rows: Vec::new(),
        cache: DinCache::default(),
        dlogits: Vec::new(),
        work: Vec::new(),
        owned: model.embeddings.iter().map(|e| SparseGrad::new(e.dim())).collect(),
        exchange: RowExchange::default(),
        dense: Vec::new(),
        reduce: ReduceBuffers::default(),
        flags: Vec::new(),
    };
    let (mut history, mut best_model) = (Vec::new(), None::<Din>);
    let (mut model_epoch, mut best_kept) = (0, 0);
    let mut stopped_early = false;
    for epoch in 1..=tc.epochs {
        if tc.shuffle {
            order.shuffle(&mut shuffle);
        }
        let bounds = batch_bounds(&order, None, tc.batch_size);
        let n = bounds.len() - 1;
        let start = Instant::now();
        let (mut loss_sum, mut skipped) = (0.0f64, 0usize);
        for i in 0..n {
            let step_start = Instant::now();
            let comm_before = meter.traffic.step_comm_seconds() + meter.traffic.other_seconds;
            let units = &order[bounds[i]..bounds[i + 1]];
            step.positions.clear();
            step.rows.clear();
            for (p, &u) in units.iter().enumerate() {
                if mine.contains(&u) {
                    step.positions.push(p);
                    step.rows.push(u - first);
                }
            }
            data.train.batch.gather_into(&step.rows, &mut step.batch);
            let (loss, fault) = step.run(
                &mut model,
                layout,
                owners,
                &mut meter,
                &pool,
                (&mut dropout, &widths, units.len()),
                &tc.regularization,
                &shard.counts,
                &mut |model, emb| observer.on_gradients(epoch, i + 1, model, emb),
            )?;
            let done = i + 1;
            match fault {
                None => {
                    pool.install(|| optimizer.step(&mut model, &step.owned));
                    model.update_statistics(&step.cache);
                    loss_sum += loss;
                }
                Some(what) => match tc.on_non_finite {
                    OnNonFinite::Stop => {
                        return Err(Error::Training(format!(
                            "{what} at epoch {epoch}, batch {done} of {n}; lower train.learning_rate, check the data, or set train.on_non_finite = \"skip_batch\""
                        )))
                    }
                    OnNonFinite::SkipBatch => {
                        observer.on_skipped_batch(epoch, done, &what);
                        skipped += 1;
                    }
                },
            }
            observer.on_batch(epoch, done, n, loss_sum / (done - skipped).max(1) as f64);
            let t = &mut meter.traffic;
            t.steps += 1;
            let comm = t.step_comm_seconds() + t.other_seconds - comm_before;
            t.compute_seconds += (step_start.elapsed().as_secs_f64() - comm).max(0.0);
        }
        if skipped > 0 && skipped == n {
            return Err(Error::Training(format!(
                "every batch of epoch {epoch} had a loss or gradient that is not finite; nothing was learned"
            )));
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let before = meter.traffic.clone();
        let validation = evaluate_sharded(
            &mut model,
            data.validation.as_ref(),
            &data.train.batch,
            tc.eval_batch_size,
            layout,
            owners,
            &mut meter,
            &pool,
            &mut step.exchange,
        )?;
        meter.traffic.count_as_other_since(&before);
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / (n - skipped).max(1) as f64,
            validation,
            seconds: start.elapsed().as_secs_f64(),
            samples_per_second: order.len() as f64 / train_seconds.max(1e-9),
            skipped_batches: skipped,
            skipped_rows: Default::default(),
        };
        let (mut stop, mut improved) = (false, false);
        if let (Some(es), Some(v)) = (tracker.as_mut(), &report.validation) {
            improved = es.observe(epoch, v);
            stop = tc.early_stopping.is_some() && es.should_stop();
        }
        history.push(report);
        // Rank 0 decides whether to keep this epoch's model, to save and
        // to stop.
        let save = save_to.is_some();
        meter.kind(Kind::Other).all_gather_u64(
            &[u64::from(stop), u64::from(improved), u64::from(save)],
            &mut step.flags,
        )?;
        let [stop, improved, save] = [0, 1, 2].map(|k| step.flags.get(k) == Some(&1));
        if improved && keep_best {
            best_model = Some(model.clone());
            best_kept = epoch;
        }
        model_epoch = if best_model.is_some() { best_kept } else { epoch };
        if save {
            let to = save_to.map(|dir| SaveTo {
                dir,
                config: &data.config,
                assets: &data.assets,
                history: &history,
            });
            save_sharded(to, best_model.as_ref().unwrap_or(&model), layout, owners, &mut meter)?;
        }
        if let Some(report) = history.last() {
            observer.on_distributed_epoch(report)?;
        }
        if stop && epoch < tc.epochs {
            stopped_early = true;
            break;
        }
    }
    let best_epoch = tracker.as_ref().and_then(|e| e.best()).map(|b| b.0);
    Ok(DistributedOutcome {
        model: best_model.unwrap_or(model),
        history,
        best_epoch,
        stopped_early,
        model_epoch,
        traffic: meter.traffic,
    })
}

/// Rank 0's validation metrics of the sharded model (`None` elsewhere, or
/// without validation rows): rank 0 scores its validation rows in batches
/// of `batch_size`, fetching their rows from their owners as training
/// does; the other ranks serve rows (and fetch none) for as many rounds.
/// The probabilities are those [`evaluate`](crate::scorer::evaluate)
/// computes on the whole model, bit for bit.
#[allow(clippy::too_many_arguments)]
fn evaluate_sharded(
    model: &mut Din,
    validation: Option<&Dataset>,
    template: &Batch,
    batch_size: usize,
    layout: &Layout,
    owners: Owners,
    meter: &mut Meter<'_>,
    pool: &rayon::ThreadPool,
    exchange: &mut RowExchange,
) -> Result<Option<Metrics>> {
    let len = validation.map_or(0, Dataset::len);
    let batch_size = batch_size.max(1);
    let mut rounds = Vec::new();
    meter
        .kind(Kind::Other)
        .all_gather_u64(&[len.div_ceil(batch_size) as u64], &mut rounds)?;
    let rounds = rounds.iter().copied().max().unwrap_or(0) as usize;
    let mut probs = Vec::with_capacity(len);
    for k in 0..rounds {
        let (lo, hi) = ((k * batch_size).min(len), ((k + 1) * batch_size).min(len));
        let mut batch = match validation {
            Some(v) => v.batch.slice(lo, hi),
            None => template.slice(0, 0),
        };
        exchange.fetch(&mut batch, layout, model, owners, meter)?;
        if batch.rows > 0 {
            // The model computes on the fetched rows.
            std::mem::swap(&mut model.embeddings, &mut exchange.fetched);
            probs.extend(pool.install(|| model.predict(&batch)));
            std::mem::swap(&mut model.embeddings, &mut exchange.fetched);
        }
    }
    Ok(validation.map(|v| Metrics::compute(&v.batch.labels, &probs, v.user_ids().as_deref())))
}

/// The buffers of a step, reused from step to step.
struct Step {
    /// This rank's rows of the batch, their ids renumbered to fetched rows.
    batch: Batch,
    /// Where each of them sits in the batch.
    positions: Vec<usize>,
    /// Their rows in this rank's shard.
    rows: Vec<usize>,
    cache: DinCache,
    dlogits: Vec<f32>,
    /// Gradients of the fetched rows.
    work: EmbeddingGrads,
    /// Gradients of this rank's own rows (by local row), summed over ranks.
    owned: EmbeddingGrads,
    exchange: RowExchange,
    /// The dense gradients, flat, for the all-reduce.
    dense: Vec<f32>,
    reduce: ReduceBuffers,
    flags: Vec<u64>,
}

impl Step {
    /// Computes the batch's gradients on every rank: this rank's rows'
    /// forward and backward passes, the row gradients summed at their
    /// owners (then regularised there), the dense ones summed everywhere.
    /// Returns the batch's loss and what was not finite, if anything (the
    /// same on every rank).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        model: &mut Din,
        layout: &Layout,
        owners: Owners,
        meter: &mut Meter<'_>,
        pool: &rayon::ThreadPool,
        (dropout, widths, batch_rows): (&mut ChaCha8Rng, &[usize], usize),
        regularization: &crate::schema::RegularizationConfig,
        counts: &[Vec<u32>],
        on_gradients: &mut dyn FnMut(&mut Din, &mut EmbeddingGrads),
    ) -> Result<(f64, Option<String>)> {
        self.exchange.fetch(&mut self.batch, layout, model, owners, meter)?;
        // The model computes on the fetched rows.
        std::mem::swap(&mut model.embeddings, &mut self.exchange.fetched);
        let mut rng = RowsRng::new(dropout, widths, batch_rows, &self.positions);
        let (batch, cache, dlogits, work) = (&self.batch, &mut self.cache, &mut self.dlogits, &mut self.work);
        let loss = pool.install(|| {
            model.zero_grad();
            if batch.rows == 0 {
                work.resize_with(model.embeddings.len(), SparseGrad::default);
                for (g, e) in work.iter_mut().zip(&model.embeddings) {
                    g.clear();
                    g.dim = e.dim();
                }
                return 0.0;
            }
            let logits = model.forward_into(batch, Mode::Train, Some(&mut rng), cache);
            let loss = bce_with_logits_over(logits, &batch.labels, batch_rows, dlogits);
            model.backward_into(batch, cache, dlogits, work);
            loss
        });
        rng.finish();
        std::mem::swap(&mut model.embeddings, &mut self.exchange.fetched);
        self.exchange
            .return_gradients(&self.work, &mut self.owned, owners, meter)?;
        self.dense.clear();
        model.visit("", &mut |_, p| {
            if trained_densely(p.role) {
                self.dense.extend_from_slice(&p.grad);
            }
        });
        all_reduce_sum(meter.kind(Kind::Dense), &mut self.dense, &mut self.reduce)?;
        let mut at = 0;
        model.visit_mut("", &mut |_, p| {
            if trained_densely(p.role) {
                let len = p.grad.len();
                p.grad.copy_from_slice(&self.dense[at..at + len]);
                at += len;
            }
        });
        regularize(regularization, model, &mut self.owned, counts);
        on_gradients(model, &mut self.owned);
        let fault =
            non_finite_gradient(model, &Vec::new(), layout).or_else(|| non_finite_row(&self.owned, layout, owners));
        // Every rank learns the loss and whether any rank found a fault.
        meter
            .kind(Kind::Other)
            .all_gather_u64(&[loss.to_bits(), u64::from(fault.is_some())], &mut self.flags)?;
        let total: f64 = self.flags.chunks_exact(2).map(|f| f64::from_bits(f[0])).sum();
        let elsewhere = (self.flags.chunks_exact(2).position(|f| f[1] != 0))
            .map(|r| format!("a gradient on rank {r} is not finite"));
        let fault = match total.is_finite() {
            false => Some(format!("the loss is {total} (the output logits)")),
            true => fault.or(elsewhere),
        };
        Ok((total, fault))
    }
}

/// The first of this rank's row gradients that is not finite, named by
/// its table and row.
fn non_finite_row(owned: &EmbeddingGrads, layout: &Layout, owners: Owners) -> Option<String> {
    owned.iter().enumerate().find_map(|(t, g)| {
        let k = g.grads.iter().position(|x| !x.is_finite())?;
        let local = g.ids.get(k / g.dim.max(1)).copied().unwrap_or(0);
        let table = layout.tables.get(t).map_or("?", |t| t.name.as_str());
        Some(format!(
            "the gradient of `embeddings.{table}.weight` row {} is {}",
            owners.global(local),
            g.grads[k]
        ))
    })
}

/// The dropout stream as one rank's rows of a batch draw from it: the
/// single process draws, per dropout layer of width `h`, the batch's
/// `[rows, h]` mask row by row; a rank holding the rows at `positions` of
/// the batch gets, for each, the words the single process drew for that
/// row, and [`RowsRng::finish`] leaves the stream where the whole batch
/// leaves it.
struct RowsRng<'a> {
    rng: &'a mut ChaCha8Rng,
    /// The stream's position at the batch's start.
    start: u128,
    /// Widths of the dropout layers, in forward order.
    widths: &'a [usize],
    /// Rows in the whole batch.
    rows: usize,
    positions: &'a [usize],
    /// The layer, row (index into `positions`) and column drawn next.
    layer: usize,
    row: usize,
    column: usize,
    /// Words of the layers before `layer`.
    base: u128,
}

impl<'a> RowsRng<'a> {
    fn new(rng: &'a mut ChaCha8Rng, widths: &'a [usize], rows: usize, positions: &'a [usize]) -> Self {
        RowsRng {
            start: rng.get_word_pos(),
            rng,
            widths,
            rows,
            positions,
            layer: 0,
            row: 0,
            column: 0,
            base: 0,
        }
    }

    /// Moves the stream past the whole batch's masks.
    fn finish(self) {
        let words: usize = self.widths.iter().map(|h| h * self.rows).sum();
        self.rng.set_word_pos(self.start + words as u128);
    }
}

impl RngCore for RowsRng<'_> {
    fn next_u32(&mut self) -> u32 {
        while let Some(&h) = self.widths.get(self.layer) {
            if self.row >= self.positions.len() || h == 0 {
                self.base += (self.rows * h) as u128;
                (self.layer, self.row, self.column) = (self.layer + 1, 0, 0);
                continue;
            }
            let word = self.start + self.base + (self.positions[self.row] * h + self.column) as u128;
            if self.rng.get_word_pos() != word {
                self.rng.set_word_pos(word);
            }
            self.column += 1;
            if self.column == h {
                (self.row, self.column) = (self.row + 1, 0);
            }
            return self.rng.next_u32();
        }
        // Past the masks planned for (a model drawing more): the stream as is.
        self.rng.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        let low = u64::from(self.next_u32());
        (u64::from(self.next_u32()) << 32) | low
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(4) {
            let word = self.next_u32().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Two ranks' rows draw, between them, the words one process draws for
    /// the whole batch, and leave the stream where it does.
    #[test]
    fn each_row_draws_the_single_process_dropout_words() {
        let (widths, rows) = ([3usize, 0, 2], 5usize);
        let mut whole = ChaCha8Rng::seed_from_u64(7);
        whole.set_word_pos(11);
        let expected: Vec<Vec<u32>> = widths
            .iter()
            .map(|&h| (0..rows * h).map(|_| whole.gen::<u32>()).collect())
            .collect();
        let after = whole.next_u32();
        for positions in [vec![0usize, 2, 3], vec![1, 4]] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            rng.set_word_pos(11);
            let mut r = RowsRng::new(&mut rng, &widths, rows, &positions);
            for (layer, &h) in widths.iter().enumerate() {
                for &p in &positions {
                    for c in 0..h {
                        assert_eq!(
                            r.next_u32(),
                            expected[layer][p * h + c],
                            "layer {layer} row {p} column {c}"
                        );
                    }
                }
            }
            r.finish();
            assert_eq!(rng.next_u32(), after);
        }
    }
}
