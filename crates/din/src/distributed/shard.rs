//! Which rank owns which embedding row, and each rank's shard of the
//! training data.

use std::path::Path;

use super::collective::{segment_start, Collective};
use crate::checkpoint::Assets;
use crate::data::{add_id_counts, count_rows, read_dataset, read_rows, Dataset, ItemTable, LargestIds};
use crate::schema::{ActivationKind, Config, InputLayout, Layout, RegularizationKind};
use crate::train::{check_vocab, read_vocab, training_read_options, TrainingData};
use crate::{Error, Result};

/// Who owns an embedding row: row `id` of every table belongs to rank
/// `id % ranks`, where it is local row `id / ranks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    /// This rank.
    pub rank: usize,
    /// How many ranks share the tables.
    pub ranks: usize,
}

impl Owners {
    /// The rank that owns row `id`.
    pub fn owner(&self, id: u32) -> usize {
        id as usize % self.ranks
    }

    /// Row `id`'s row in its owner's shard.
    pub fn local(&self, id: u32) -> u32 {
        id / self.ranks as u32
    }

    /// The table row of this rank's local row `local`.
    pub fn global(&self, local: u32) -> u64 {
        u64::from(local) * self.ranks as u64 + self.rank as u64
    }

    /// How many of a table's `rows` rank `rank` owns.
    pub fn owned_by(&self, rank: usize, rows: usize) -> usize {
        rows.saturating_sub(rank).div_ceil(self.ranks)
    }
}

/// One rank's part of the data of distributed training.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The config (vocabulary sizes frozen, the same on every rank) and
    /// the rows: `train` holds this rank's training rows only; rank 0 also
    /// holds the validation rows and the assets (vocabulary, item table)
    /// saved with the model, the other ranks none.
    pub data: TrainingData,
    /// Which rank owns which row.
    pub owners: Owners,
    /// Training rows of each rank, in rank order: rank `r` holds rows
    /// `sum(rows[..r])..sum(rows[..=r])` of the training file, in file order.
    pub rows: Vec<usize>,
    /// The mini-batch-aware regulariser's counts of this rank's rows of
    /// each table (by local row), over the whole training file; empty
    /// without that regulariser.
    pub counts: Vec<Vec<u32>>,
}

impl Shard {
    /// The global index of this rank's first training row.
    pub fn first_row(&self) -> usize {
        self.rows[..self.owners.rank].iter().sum()
    }

    /// Training rows over all ranks.
    pub fn total_rows(&self) -> usize {
        self.rows.iter().sum()
    }
}

/// Refuses what distributed training does not do (yet), naming the
/// setting: streamed windows, grouped training, skipped bad rows, Dice.
pub fn check_supported(config: &Config) -> Result<()> {
    let refuse = |field: &str, value: String, reason: &str| Err(Error::config(field, value, reason));
    if let Some(w) = config.data.window_rows {
        return refuse(
            "data.window_rows",
            w.to_string(),
            "streamed training is not distributed: each rank holds its shard of the file; remove it (the shards divide the memory)",
        );
    }
    if config.data.group || config.input.layout == InputLayout::Grouped {
        return refuse(
            "data.group",
            "true".into(),
            "grouped training is not distributed (a group could straddle two ranks' shards); train on flat rows",
        );
    }
    if config.data.skip_bad_rows {
        return refuse(
            "data.skip_bad_rows",
            "true".into(),
            "is not distributed (the limit is over the whole file); fix or drop the bad rows first",
        );
    }
    for (field, kind) in [
        ("model.attention.activation", config.model.attention.activation),
        ("model.dnn.activation", config.model.dnn.activation),
    ] {
        if kind == ActivationKind::Dice {
            return refuse(
                field,
                "dice".into(),
                "Dice's batch statistics would be each rank's part of the batch, not the batch; distributed training takes prelu, relu or sigmoid",
            );
        }
    }
    Ok(())
}

/// Reads this rank's shard of `config.data.train` and agrees with the
/// other ranks on everything derived from the whole file.
///
/// Every rank counts the file's records (a Parquet file's from its
/// metadata) and reads its contiguous part of the training records
/// (`validation_split`: of the head), so the ranks' rows in rank order
/// are the file's rows in order. Vocabulary sizes are inferred from the
/// largest ids of all shards; the mini-batch-aware regulariser's counts
/// are summed from all shards at the ids' owners; the item table
/// (`item_feature_of`) is merged on rank 0. Rank 0 reads the validation
/// rows (a separate file, or the tail of the training file) and the
/// vocabulary.
pub fn load_shard(config: &Config, comm: &mut dyn Collective) -> Result<Shard> {
    check_supported(config)?;
    let mut layout = config.validate()?;
    let (rank, ranks) = (comm.rank(), comm.ranks());
    let owners = Owners { rank, ranks };
    let path = config
        .data
        .train
        .clone()
        .ok_or_else(|| Error::config("data.train", "(none)", "name the training file"))?;
    let options = training_read_options(config);
    // Records: the training ones, then the validation tail.
    let total = count_rows(&path, config)?;
    let cut = match config.data.validation_split {
        Some(fraction) if config.data.validation.is_none() => {
            let cut = ((total as f64) * (1.0 - fraction)).floor() as u64;
            if cut == 0 || cut >= total {
                return Err(Error::config(
                    "data.validation_split",
                    fraction,
                    format!("leaves an empty training or validation set from {total} rows"),
                ));
            }
            cut
        }
        _ => total,
    };
    let train_records = cut as usize;
    let range = segment_start(train_records, ranks, rank) as u64..segment_start(train_records, ranks, rank + 1) as u64;
    if range.is_empty() {
        return Err(Error::Distributed(format!(
            "{ranks} ranks for the {train_records} training rows of {}: rank {rank} would have none; use fewer ranks",
            path.display()
        )));
    }
    let mut train = read_rows(&path, config, &layout, options, range)?;
    let mut validation = match (rank, &config.data.validation) {
        (0, Some(v)) => Some(read_dataset(v, config, &layout, options)?),
        (0, None) if cut < total => Some(read_rows(&path, config, &layout, options, cut..total)?),
        _ => None,
    };
    let mut sizes = Vec::new();
    comm.all_gather_u64(&[train.len() as u64], &mut sizes)?;
    let rows: Vec<usize> = sizes.iter().map(|&n| n as usize).collect();
    infer_vocab_of_all(&mut layout, &train, &path, comm)?;
    for set in std::iter::once(&mut train).chain(validation.as_mut()) {
        check_vocab(&layout, set, options)?;
    }
    let items = merge_item_tables(config, &layout, &train, validation.as_ref(), comm)?;
    let counts = if config.train.regularization.kind == RegularizationKind::MiniBatchAware {
        owned_counts(&layout, &train, owners, comm)?
    } else {
        Vec::new()
    };
    let vocab = if rank == 0 { read_vocab(config, &layout)? } else { None };
    let mut config = config.clone();
    config.freeze_vocab(&layout);
    Ok(Shard {
        data: TrainingData {
            config,
            layout,
            train,
            stream: None,
            validation,
            assets: Assets { vocab, items },
        },
        owners,
        rows,
        counts,
    })
}

/// Infers the vocabulary sizes not given from the largest ids of every
/// rank's shard (the same sizes on every rank).
fn infer_vocab_of_all(layout: &mut Layout, train: &Dataset, path: &Path, comm: &mut dyn Collective) -> Result<()> {
    let mut largest = LargestIds::new(layout);
    largest.add(layout, train);
    // 0: none; id + 1 otherwise.
    let mine: Vec<u64> = largest
        .largest()
        .iter()
        .map(|m| m.map_or(0, |id| u64::from(id) + 1))
        .collect();
    let mut all = Vec::new();
    comm.all_gather_u64(&mine, &mut all)?;
    for (r, theirs) in all.chunks_exact(mine.len().max(1)).enumerate() {
        if r != comm.rank() {
            let ids: Vec<Option<u32>> = theirs.iter().map(|&v| v.checked_sub(1).map(|id| id as u32)).collect();
            largest.merge(&ids, &format!("rank {r}'s rows"));
        }
    }
    largest.infer(layout, path)
}

/// The item table of every rank's rows (and rank 0's validation rows),
/// merged on rank 0 in rank order; `None` on the other ranks, or without
/// item features. Each rank checks its rows against `data.items` and
/// against each other (naming the line); rank 0 refuses two ranks that
/// give one item two values.
fn merge_item_tables(
    config: &Config,
    layout: &Layout,
    train: &Dataset,
    validation: Option<&Dataset>,
    comm: &mut dyn Collective,
) -> Result<Option<ItemTable>> {
    if layout.item_features.is_empty() {
        return Ok(None);
    }
    let known = match &config.data.items {
        Some(path) => Some((ItemTable::read(path, layout)?, path.as_path())),
        None => None,
    };
    let sets: Vec<&Dataset> = std::iter::once(train).chain(validation).collect();
    let mut table = ItemTable::derive_from(layout, &sets, known)?;
    // Each feature's values in layout order, u32::MAX for none, to rank 0.
    let names: Vec<String> = (layout.item_features.iter())
        .map(|f| layout.sparse[f.feature].name.clone())
        .collect();
    let mut send = Vec::new();
    for name in &names {
        let values = table.features.get(name).map_or(&[][..], |c| c.values.as_slice());
        send.extend(values.iter().map(|v| v.unwrap_or(u32::MAX)));
    }
    let mut counts = vec![0; comm.ranks()];
    counts[0] = send.len();
    let (mut recv, mut recv_counts) = (Vec::new(), Vec::new());
    comm.all_to_all_u32(&send, &counts, &mut recv, &mut recv_counts)?;
    if comm.rank() != 0 {
        return Ok(None);
    }
    let mut at = 0;
    for (r, &n) in recv_counts.iter().enumerate() {
        let theirs = &recv[at..at + n];
        at += n;
        let mut offset = 0;
        for name in &names {
            let Some(col) = table.features.get_mut(name) else {
                continue;
            };
            let len = col.values.len();
            let part = theirs.get(offset..offset + len).ok_or_else(|| {
                Error::Distributed(format!(
                    "rank {r} sent an item table of {n} values, not {len} per feature"
                ))
            })?;
            offset += len;
            for (item, (slot, &v)) in col.values.iter_mut().zip(part).enumerate() {
                match (*slot, v) {
                    (_, u32::MAX) => {}
                    (None, v) => *slot = Some(v),
                    (Some(old), v) if old != v => {
                        return Err(Error::Distributed(format!(
                            "`{name}` is an item feature of `{}` (item_feature_of), but item {item} has {name} {v} in rank {r}'s rows and {old} in rank 0's or an earlier rank's; fix the data or remove item_feature_of",
                            col.key
                        )))
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(Some(table))
}

/// The mini-batch-aware regulariser's counts of this rank's rows, by
/// local row: each rank counts its shard's ids and sends each count to
/// the id's owner, which adds them up.
fn owned_counts(layout: &Layout, train: &Dataset, owners: Owners, comm: &mut dyn Collective) -> Result<Vec<Vec<u32>>> {
    let mut counts: Vec<Vec<u32>> = vec![Vec::new(); layout.tables.len()];
    add_id_counts(layout, train, &mut counts);
    // To each owner, per table: how many pairs, then (id, count) pairs.
    let n = owners.ranks;
    let mut send = Vec::new();
    let mut send_counts = Vec::with_capacity(n);
    for owner in 0..n {
        let before = send.len();
        for table in &counts {
            let at = send.len();
            send.push(0);
            let mut pairs = 0u32;
            for id in (owner..table.len()).step_by(n) {
                if table[id] > 0 {
                    send.extend([id as u32, table[id]]);
                    pairs += 1;
                }
            }
            send[at] = pairs;
        }
        send_counts.push(send.len() - before);
    }
    drop(counts);
    let (mut recv, mut recv_counts) = (Vec::new(), Vec::new());
    comm.all_to_all_u32(&send, &send_counts, &mut recv, &mut recv_counts)?;
    let mut owned: Vec<Vec<u32>> = (layout.tables.iter())
        .map(|t| vec![0; owners.owned_by(owners.rank, t.rows())])
        .collect();
    let bad = || Error::Distributed("a rank sent malformed id counts".into());
    let mut at = 0;
    for _ in 0..n {
        for table in owned.iter_mut() {
            let pairs = *recv.get(at).ok_or_else(bad)? as usize;
            let list = recv.get(at + 1..at + 1 + 2 * pairs).ok_or_else(bad)?;
            for pair in list.chunks_exact(2) {
                if owners.owner(pair[0]) != owners.rank {
                    return Err(bad());
                }
                let slot = table.get_mut(owners.local(pair[0]) as usize).ok_or_else(bad)?;
                *slot = slot.saturating_add(pair[1]);
            }
            at += 1 + 2 * pairs;
        }
    }
    Ok(owned)
}
