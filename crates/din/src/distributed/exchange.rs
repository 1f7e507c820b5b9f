//! A training step's messages: the embedding rows a rank's part of the
//! batch needs, fetched from their owners, and their gradients sent back;
//! and the byte and time count of every message ([`Traffic`]).

use std::time::Instant;

use super::collective::{check_counts, Collective};
use super::shard::Owners;
use crate::data::Batch;
use crate::model::{Din, Embedding, EmbeddingGrads, Param, Role};
use crate::schema::Layout;
use crate::{Error, Result};

/// What a message carries, for [`Traffic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Embedding ids, sent to their owners.
    Ids,
    /// Embedding rows, sent by their owners.
    Rows,
    /// Embedding rows' gradients, sent to their owners.
    RowGradients,
    /// The dense gradients' all-reduce.
    Dense,
    /// The rest: the loss and fault flags of each step, the validation
    /// rows' ids and rows and the saved model's rows at each epoch end, the
    /// set-up (row counts, vocabulary, id counts).
    Other,
}

/// Bytes this rank sent to other ranks (a rank's part for itself not
/// counted), and seconds spent, by kind of message; with the steps run
/// and the seconds spent computing in them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Traffic {
    /// Training steps (batches) run.
    pub steps: u64,
    /// Bytes of ids sent to their owners.
    pub id_bytes: u64,
    /// Bytes of embedding rows sent to the ranks that asked for them.
    pub row_bytes: u64,
    /// Bytes of row gradients sent to their owners.
    pub row_gradient_bytes: u64,
    /// Bytes this rank sent in the dense gradients' all-reduce.
    pub dense_bytes: u64,
    /// Bytes of everything else (per-step flags, validation and saving at epoch ends, set-up).
    pub other_bytes: u64,
    /// Seconds in the id and row all-to-alls (including waiting for the
    /// slowest rank).
    pub rows_seconds: f64,
    /// Seconds in the row gradients' all-to-all.
    pub row_gradient_seconds: f64,
    /// Seconds in the dense all-reduce.
    pub dense_seconds: f64,
    /// Seconds in the other operations.
    pub other_seconds: f64,
    /// Seconds of the steps outside any operation: gathering the batch,
    /// forward, backward, the optimizer (summed over steps).
    pub compute_seconds: f64,
}

impl Traffic {
    /// Seconds in collective operations during the steps (all but `other`).
    pub fn step_comm_seconds(&self) -> f64 {
        self.rows_seconds + self.row_gradient_seconds + self.dense_seconds
    }

    /// Counts the ids and rows sent since `before` (e.g. to score the
    /// validation rows, outside the training steps) as other traffic.
    pub fn count_as_other_since(&mut self, before: &Traffic) {
        let ids = self.id_bytes - before.id_bytes;
        let rows = self.row_bytes - before.row_bytes;
        let seconds = self.rows_seconds - before.rows_seconds;
        self.id_bytes -= ids;
        self.row_bytes -= rows;
        self.rows_seconds -= seconds;
        self.other_bytes += ids + rows;
        self.other_seconds += seconds;
    }

    /// Bytes sent per step: ids, rows, row gradients, dense gradients.
    pub fn bytes_per_step(&self) -> [f64; 4] {
        let per = |b: u64| b as f64 / self.steps.max(1) as f64;
        [
            per(self.id_bytes),
            per(self.row_bytes),
            per(self.row_gradient_bytes),
            per(self.dense_bytes),
        ]
    }

    /// Every rank's traffic, in rank order (one all-gather).
    pub fn gather(&self, comm: &mut dyn Collective) -> Result<Vec<Traffic>> {
        let fields = [
            self.steps,
            self.id_bytes,
            self.row_bytes,
            self.row_gradient_bytes,
            self.dense_bytes,
            self.other_bytes,
            self.rows_seconds.to_bits(),
            self.row_gradient_seconds.to_bits(),
            self.dense_seconds.to_bits(),
            self.other_seconds.to_bits(),
            self.compute_seconds.to_bits(),
        ];
        let mut all = Vec::new();
        comm.all_gather_u64(&fields, &mut all)?;
        Ok(all
            .chunks_exact(fields.len())
            .map(|f| Traffic {
                steps: f[0],
                id_bytes: f[1],
                row_bytes: f[2],
                row_gradient_bytes: f[3],
                dense_bytes: f[4],
                other_bytes: f[5],
                rows_seconds: f64::from_bits(f[6]),
                row_gradient_seconds: f64::from_bits(f[7]),
                dense_seconds: f64::from_bits(f[8]),
                other_seconds: f64::from_bits(f[9]),
                compute_seconds: f64::from_bits(f[10]),
            })
            .collect())
    }

    /// Adds `bytes` and `seconds` to `kind`.
    fn add(&mut self, kind: Kind, bytes: u64, seconds: f64) {
        let (b, s) = match kind {
            Kind::Ids => (&mut self.id_bytes, &mut self.rows_seconds),
            Kind::Rows => (&mut self.row_bytes, &mut self.rows_seconds),
            Kind::RowGradients => (&mut self.row_gradient_bytes, &mut self.row_gradient_seconds),
            Kind::Dense => (&mut self.dense_bytes, &mut self.dense_seconds),
            Kind::Other => (&mut self.other_bytes, &mut self.other_seconds),
        };
        *b += bytes;
        *s += seconds;
    }
}

/// A [`Collective`] that counts what passes through it into [`Traffic`],
/// under the kind set by [`Meter::kind`].
pub struct Meter<'c> {
    comm: &'c mut dyn Collective,
    kind: Kind,
    /// What has been counted.
    pub traffic: Traffic,
}

impl<'c> Meter<'c> {
    /// Counts the operations of `comm`.
    pub fn new(comm: &'c mut dyn Collective) -> Self {
        Meter {
            comm,
            kind: Kind::Other,
            traffic: Traffic::default(),
        }
    }

    /// Counts the following operations as `kind`.
    pub fn kind(&mut self, kind: Kind) -> &mut Self {
        self.kind = kind;
        self
    }

    /// Runs `op`, counting `bytes` and its time.
    fn timed<T>(&mut self, bytes: u64, op: impl FnOnce(&mut dyn Collective) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = op(&mut *self.comm)?;
        self.traffic.add(self.kind, bytes, start.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Bytes of an all-to-all's parts for other ranks.
    fn sent(&self, counts: &[usize], size: usize) -> u64 {
        let me = self.comm.rank();
        let values: usize = counts
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != me)
            .map(|(_, c)| c)
            .sum();
        (values * size) as u64
    }
}

impl Collective for Meter<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn ranks(&self) -> usize {
        self.comm.ranks()
    }
    fn all_to_all_u32(&mut self, s: &[u32], c: &[usize], r: &mut Vec<u32>, rc: &mut Vec<usize>) -> Result<()> {
        let bytes = self.sent(c, 4);
        self.timed(bytes, |comm| comm.all_to_all_u32(s, c, r, rc))
    }
    fn all_to_all_f32(&mut self, s: &[f32], c: &[usize], r: &mut Vec<f32>, rc: &mut Vec<usize>) -> Result<()> {
        let bytes = self.sent(c, 4);
        self.timed(bytes, |comm| comm.all_to_all_f32(s, c, r, rc))
    }
    fn all_gather_f32(&mut self, s: &[f32], c: &[usize], r: &mut Vec<f32>) -> Result<()> {
        let bytes = (s.len() * 4 * (self.ranks() - 1)) as u64;
        self.timed(bytes, |comm| comm.all_gather_f32(s, c, r))
    }
    fn all_gather_u64(&mut self, s: &[u64], r: &mut Vec<u64>) -> Result<()> {
        let bytes = (s.len() * 8 * (self.ranks() - 1)) as u64;
        self.timed(bytes, |comm| comm.all_gather_u64(s, r))
    }
}

/// The rows one rank's part of a batch needs: fetched from their owners
/// before the forward pass, their gradients sent back after the backward
/// pass. Buffers are reused from step to step.
///
/// Messages, per pair of ranks, in table order: the ids (a count, then the
/// ids, per table), the rows (in the ids' order), the rows' gradients (in
/// the same order, so without ids).
#[derive(Debug, Default)]
pub struct RowExchange {
    /// Per table: the distinct ids of the part, sorted by (owner, id).
    wanted: Vec<Vec<u32>>,
    /// Per table: where each owner's ids start in `wanted` (`ranks + 1`).
    starts: Vec<Vec<usize>>,
    /// The fetched rows: per table, `[wanted.len(), dim]`, row `k` being
    /// id `wanted[k]`. The model computes on these, with the batch's ids
    /// renumbered to `k`.
    pub fetched: Vec<Embedding>,
    /// The ids other ranks asked this one for, and how many from each.
    asked: Vec<u32>,
    asked_counts: Vec<usize>,
    send_ids: Vec<u32>,
    send_rows: Vec<f32>,
    counts: Vec<usize>,
    recv_rows: Vec<f32>,
    recv_counts: Vec<usize>,
}

impl RowExchange {
    /// Renumbers the ids of `batch` (this rank's part of a batch) to rows
    /// of [`RowExchange::fetched`] and fetches those rows from their
    /// owners, serving the rows other ranks ask of `model` (this rank's
    /// shard) meanwhile.
    pub fn fetch(
        &mut self,
        batch: &mut Batch,
        layout: &Layout,
        model: &Din,
        owners: Owners,
        comm: &mut Meter<'_>,
    ) -> Result<()> {
        let n = owners.ranks;
        let tables = layout.tables.len();
        self.wanted.resize_with(tables, Vec::new);
        self.starts.resize_with(tables, Vec::new);
        for w in &mut self.wanted {
            w.clear();
        }
        let key = |id: u32| (id as usize % n, id);
        for (f, slot) in layout.sparse.iter().enumerate() {
            self.wanted[slot.table].extend_from_slice(&batch.sparse[f]);
        }
        for (s, slot) in layout.sequences.iter().enumerate() {
            self.wanted[slot.table].extend_from_slice(&batch.sequences[s].values);
        }
        for (w, starts) in self.wanted.iter_mut().zip(&mut self.starts) {
            w.sort_unstable_by_key(|&id| key(id));
            w.dedup();
            starts.clear();
            starts.extend((0..=n).map(|o| w.partition_point(|&id| key(id).0 < o)));
        }
        // Renumber: each id to its place in `wanted`.
        let renumber = |ids: &mut [u32], wanted: &[u32]| {
            for id in ids {
                // Present: `wanted` holds every id of the batch.
                *id = wanted.binary_search_by_key(&key(*id), |&w| key(w)).unwrap_or(0) as u32;
            }
        };
        for (f, slot) in layout.sparse.iter().enumerate() {
            renumber(&mut batch.sparse[f], &self.wanted[slot.table]);
        }
        for (s, slot) in layout.sequences.iter().enumerate() {
            renumber(&mut batch.sequences[s].values, &self.wanted[slot.table]);
        }
        // The ids, owner by owner.
        self.send_ids.clear();
        self.counts.clear();
        for o in 0..n {
            let before = self.send_ids.len();
            for (w, starts) in self.wanted.iter().zip(&self.starts) {
                let ids = &w[starts[o]..starts[o + 1]];
                self.send_ids.push(ids.len() as u32);
                self.send_ids.extend_from_slice(ids);
            }
            self.counts.push(self.send_ids.len() - before);
        }
        comm.kind(Kind::Ids)
            .all_to_all_u32(&self.send_ids, &self.counts, &mut self.asked, &mut self.asked_counts)?;
        // Serve: the rows asked for, in the order asked.
        self.send_rows.clear();
        self.counts.clear();
        let mut at = 0;
        for &len in &self.asked_counts {
            let before = self.send_rows.len();
            let end = at + len;
            for table in &model.embeddings {
                let (count, ids) = asked_ids(&self.asked, at, end)?;
                for &id in ids {
                    let local = owners.local(id) as usize;
                    if owners.owner(id) != owners.rank || local >= table.weight.shape[0] {
                        return Err(Error::Distributed(format!(
                            "rank {} was asked for row {id}, which it does not own",
                            owners.rank
                        )));
                    }
                    self.send_rows.extend_from_slice(table.row(local as u32));
                }
                at += 1 + count;
            }
            if at != end {
                return Err(Error::Distributed(
                    "a rank asked for rows of more tables than the model has".into(),
                ));
            }
            self.counts.push(self.send_rows.len() - before);
        }
        comm.kind(Kind::Rows).all_to_all_f32(
            &self.send_rows,
            &self.counts,
            &mut self.recv_rows,
            &mut self.recv_counts,
        )?;
        // The fetched tables, owner by owner.
        self.fetched.resize_with(tables, || Embedding {
            weight: Param::new(Vec::new(), vec![0, 0], Role::Embedding),
        });
        for ((e, w), t) in self.fetched.iter_mut().zip(&self.wanted).zip(&model.embeddings) {
            let dim = t.dim();
            e.weight.value.clear();
            e.weight.value.reserve(w.len() * dim);
            e.weight.shape = vec![w.len(), dim];
        }
        let mut at = 0;
        for (o, &len) in self.recv_counts.iter().enumerate() {
            let mut part = &self.recv_rows[at..at + len];
            for ((e, starts), t) in self.fetched.iter_mut().zip(&self.starts).zip(&model.embeddings) {
                let values = (starts[o + 1] - starts[o]) * t.dim();
                let (these, rest) = part
                    .split_at_checked(values)
                    .ok_or_else(|| Error::Distributed(format!("rank {o} sent fewer rows than asked")))?;
                e.weight.value.extend_from_slice(these);
                part = rest;
            }
            if !part.is_empty() {
                return Err(Error::Distributed(format!("rank {o} sent more rows than asked")));
            }
            at += len;
        }
        Ok(())
    }

    /// Sends the gradients of the fetched rows (`work`, by fetched row) to
    /// their owners and sums what this rank receives into `owned` (by
    /// local row), the senders' contributions in rank order.
    pub fn return_gradients(
        &mut self,
        work: &EmbeddingGrads,
        owned: &mut EmbeddingGrads,
        owners: Owners,
        comm: &mut Meter<'_>,
    ) -> Result<()> {
        let n = owners.ranks;
        self.send_rows.clear();
        self.counts.clear();
        for o in 0..n {
            let before = self.send_rows.len();
            for (g, starts) in work.iter().zip(&self.starts) {
                for k in starts[o]..starts[o + 1] {
                    let row = g.get(k as u32).ok_or_else(|| {
                        Error::Distributed(format!("no gradient for fetched row {k} (a row the batch holds)"))
                    })?;
                    self.send_rows.extend_from_slice(row);
                }
            }
            self.counts.push(self.send_rows.len() - before);
        }
        check_counts(self.send_rows.len(), &self.counts, n)?;
        comm.kind(Kind::RowGradients).all_to_all_f32(
            &self.send_rows,
            &self.counts,
            &mut self.recv_rows,
            &mut self.recv_counts,
        )?;
        for g in owned.iter_mut() {
            g.clear();
        }
        let (mut at, mut grads) = (0, 0);
        for &len in &self.asked_counts {
            let end = at + len;
            for g in owned.iter_mut() {
                let (count, ids) = asked_ids(&self.asked, at, end)?;
                let d = g.dim;
                let part = self
                    .recv_rows
                    .get(grads..grads + count * d)
                    .ok_or_else(|| Error::Distributed("a rank sent fewer row gradients than it asked rows".into()))?;
                for (&id, row) in ids.iter().zip(part.chunks_exact(d.max(1))) {
                    g.add(owners.local(id), row);
                }
                grads += count * d;
                at += 1 + count;
            }
        }
        if grads != self.recv_rows.len() {
            return Err(Error::Distributed(
                "a rank sent more row gradients than it asked rows".into(),
            ));
        }
        Ok(())
    }
}

/// The ids of one table in a request: its count at `asked[at]`, then the
/// ids, all before `end`.
fn asked_ids(asked: &[u32], at: usize, end: usize) -> Result<(usize, &[u32])> {
    let bad = || Error::Distributed("a rank sent a malformed request for rows".into());
    let count = *asked.get(at).filter(|_| at < end).ok_or_else(bad)? as usize;
    let ids = asked
        .get(at + 1..at + 1 + count)
        .filter(|_| at + 1 + count <= end)
        .ok_or_else(bad)?;
    Ok((count, ids))
}
