//! Vocabulary sizes: inferred from training data, then enforced.

use super::{Batch, Dataset, SkippedRows};
use crate::schema::{Layout, Oov};
use crate::{Error, Result};

/// Which rows the ids of a column belong to.
#[derive(Clone, Copy)]
enum Holder<'a> {
    /// One id per row.
    Row,
    /// One id per group (a grouped batch's user side).
    Group,
    /// Ragged: each row (or group) holds `offsets[i]..offsets[i + 1]`.
    Sequence(&'a [u32]),
}

/// Every (table, column name, ids, holder of each id) source in a dataset.
fn id_sources<'a>(
    layout: &'a Layout,
    data: &'a Dataset,
) -> impl Iterator<Item = (usize, &'a str, &'a [u32], Holder<'a>)> {
    let sparse = layout.sparse.iter().enumerate().map(move |(f, s)| {
        let holder = if data.batch.is_shared_sparse(f) {
            Holder::Group
        } else {
            Holder::Row
        };
        (s.table, s.name.as_str(), data.batch.sparse[f].as_slice(), holder)
    });
    let seqs = layout.sequences.iter().enumerate().map(move |(f, s)| {
        (
            s.table,
            s.name.as_str(),
            data.batch.sequences[f].values.as_slice(),
            Holder::Sequence(data.batch.sequences[f].offsets.as_slice()),
        )
    });
    sparse.chain(seqs)
}

/// Largest table (rows x dim floats, 4 GiB) that [`infer_vocab`] accepts; a
/// larger one usually means raw ids (hashes, timestamps) where dense ids were
/// expected. Set `vocab_size` explicitly to go beyond it.
pub const MAX_INFERRED_TABLE: usize = 1 << 30;

/// The rows holding the `i`-th value of a feature's ids: one row, or the
/// rows of the group (or of the group whose history) holds it.
fn rows_of(batch: &Batch, holder: Holder<'_>, i: usize) -> std::ops::Range<usize> {
    match holder {
        Holder::Row => i..i + 1,
        Holder::Group => batch.group_rows(i),
        Holder::Sequence(o) => batch.group_rows(o.partition_point(|&start| start as usize <= i) - 1),
    }
}

/// The first row holding the `i`-th value of a feature's ids.
fn row_of(batch: &Batch, holder: Holder<'_>, i: usize) -> usize {
    rows_of(batch, holder, i).start
}

/// Sets each table whose vocabulary size is not given to the largest id seen
/// in `train` (over every feature using the table) plus one. A table that
/// would exceed [`MAX_INFERRED_TABLE`] floats is an error naming where its
/// largest id is.
pub fn infer_vocab(layout: &mut Layout, train: &Dataset) -> Result<()> {
    let mut largest = LargestIds::new(layout);
    largest.add(layout, train);
    largest.infer(layout, &train.source)
}

/// The largest id of each table over the datasets added, and where it is:
/// [`infer_vocab`] over a file read in windows.
#[derive(Debug, Clone, PartialEq)]
pub struct LargestIds {
    /// Per table: (largest id, column, line).
    max: Vec<Option<(u32, String, u64)>>,
}

impl LargestIds {
    /// None seen yet, for `layout`'s tables.
    pub fn new(layout: &Layout) -> LargestIds {
        LargestIds {
            max: vec![None; layout.tables.len()],
        }
    }

    /// Takes in the ids of `data` (an earlier dataset's id is kept on a tie).
    pub fn add(&mut self, layout: &Layout, data: &Dataset) {
        for (t, name, ids, holder) in id_sources(layout, data) {
            if let Some((i, &m)) = ids.iter().enumerate().max_by_key(|(_, id)| **id) {
                if self.max[t].as_ref().is_none_or(|(best, _, _)| m > *best) {
                    let line = data
                        .lines
                        .get(row_of(&data.batch, holder, i))
                        .copied()
                        .map_or(0, u64::from);
                    self.max[t] = Some((m, name.to_string(), line));
                }
            }
        }
    }

    /// The largest id of each table so far (`None`: no id seen).
    pub fn largest(&self) -> Vec<Option<u32>> {
        self.max.iter().map(|m| m.as_ref().map(|(id, _, _)| *id)).collect()
    }

    /// Takes in another reader's largest ids (one per table, e.g. another
    /// rank's shard of the file), found in `column` of `where_`, line
    /// unknown.
    pub fn merge(&mut self, largest: &[Option<u32>], where_: &str) {
        for (mine, &theirs) in self.max.iter_mut().zip(largest) {
            if let Some(id) = theirs.filter(|&id| mine.as_ref().is_none_or(|(best, _, _)| id > *best)) {
                *mine = Some((id, where_.to_string(), 0));
            }
        }
    }

    /// Sets each table whose vocabulary size is not given to its largest id
    /// plus one (see [`infer_vocab`]; `path`: the file, for the error).
    pub fn infer(self, layout: &mut Layout, path: &std::path::Path) -> Result<()> {
        for (table, max) in layout.tables.iter_mut().zip(self.max) {
            if table.vocab_size.is_some() {
                continue;
            }
            let (id, column, line) = max.unwrap_or((0, table.name.clone(), 0));
            let size = id as usize + 1;
            if size.saturating_mul(table.dim) > MAX_INFERRED_TABLE {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line,
                    column,
                    value: id.to_string(),
                    reason: format!(
                        "this id would make embedding table `{}` {} x {} floats; ids must be dense (map raw ids with `din prepare`) or set vocab_size explicitly",
                        table.name, size, table.dim
                    ),
                });
            }
            table.vocab_size = Some(size);
        }
        Ok(())
    }
}

/// Checks every id against its table: an id at or above the vocabulary size
/// is an error (naming file, line, column and id) under `oov = "error"`, and is
/// mapped to the reserved row under `oov = "reserved"`.
pub fn apply_vocab(layout: &Layout, data: &mut Dataset) -> Result<()> {
    for (t, name, ids, offsets) in id_sources(layout, data) {
        let table = &layout.tables[t];
        let vocab = table.vocab_size.unwrap_or(0);
        if table.oov == Oov::Reserved {
            continue;
        }
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::OutOfVocabulary {
                path: data.source.clone(),
                line: u64::from(data.lines[row_of(&data.batch, offsets, i)]),
                column: name.to_string(),
                id: u64::from(id),
                vocab_size: vocab,
                table: table.name.clone(),
            });
        }
    }
    // Reserved tables: every id at or above the vocabulary maps to the extra row `vocab_size`.
    let reserved_row = |t: usize| {
        let table = &layout.tables[t];
        (table.oov == Oov::Reserved).then(|| table.vocab_size.unwrap_or(0) as u32)
    };
    for (f, slot) in layout.sparse.iter().enumerate() {
        if let Some(row) = reserved_row(slot.table) {
            data.batch.sparse[f].iter_mut().for_each(|id| *id = (*id).min(row));
        }
    }
    for (f, slot) in layout.sequences.iter().enumerate() {
        if let Some(row) = reserved_row(slot.table) {
            data.batch.sequences[f]
                .values
                .iter_mut()
                .for_each(|id| *id = (*id).min(row));
        }
    }
    Ok(())
}

/// [`apply_vocab`] for reading with `skip_bad_rows`: a row holding an id
/// outside its table (a table with `oov = "error"`) is dropped and counted
/// in `data.skipped` with its line and error, like a malformed row, as long
/// as the skipped rows stay within `limit` (a fraction) of the file's rows.
pub fn drop_out_of_vocabulary(layout: &Layout, data: &mut Dataset, limit: f64) -> Result<()> {
    let mut bad: std::collections::BTreeMap<usize, Error> = std::collections::BTreeMap::new();
    for (t, name, ids, offsets) in id_sources(layout, data) {
        let table = &layout.tables[t];
        if table.oov == Oov::Reserved {
            continue;
        }
        let vocab = table.vocab_size.unwrap_or(0);
        for (i, &id) in ids.iter().enumerate().filter(|(_, &id)| id as usize >= vocab) {
            // A shared history's bad id drops every row that shares it.
            for row in rows_of(&data.batch, offsets, i) {
                bad.entry(row).or_insert_with(|| Error::OutOfVocabulary {
                    path: data.source.clone(),
                    line: u64::from(data.lines[row]),
                    column: name.to_string(),
                    id: u64::from(id),
                    vocab_size: vocab,
                    table: table.name.clone(),
                });
            }
        }
    }
    if !bad.is_empty() {
        let kept: Vec<usize> = (0..data.len()).filter(|r| !bad.contains_key(r)).collect();
        let skipped = &mut data.skipped;
        // Counted in lines: a grouped line's candidates are one line.
        let lines = 1 + data.lines.windows(2).filter(|w| w[0] != w[1]).count();
        let total = lines + skipped.count;
        let mut bad_lines: Vec<(u64, String)> = bad
            .iter()
            .map(|(&r, e)| (u64::from(data.lines[r]), e.to_string()))
            .collect();
        bad_lines.dedup_by_key(|(line, _)| *line);
        skipped.count += bad_lines.len();
        skipped.first.extend(bad_lines);
        skipped.first.sort_by_key(|(line, _)| *line);
        skipped.first.truncate(SkippedRows::KEPT);
        skipped.check_limit(&data.source, total, limit)?;
        if kept.is_empty() {
            return Err(Error::EmptyFile {
                path: data.source.clone(),
            });
        }
        let picked = data.select(&kept);
        (data.batch, data.lines, data.users) = (picked.batch, picked.lines, picked.users);
    }
    apply_vocab(layout, data)
}

/// How often each id of each table occurs in `data` (the n_j of the paper's
/// mini-batch-aware regularisation), counted per sample: a history that a
/// group's rows share counts once for each of them. Call after [`apply_vocab`].
pub fn id_counts(layout: &Layout, data: &Dataset) -> Vec<Vec<u32>> {
    let mut counts: Vec<Vec<u32>> = layout.tables.iter().map(|t| vec![0; t.rows()]).collect();
    add_id_counts(layout, data, &mut counts);
    counts
}

/// Adds the [`id_counts`] of `data` to `counts` (one vector per table,
/// grown to hold the largest id seen; sum a file's windows so).
pub fn add_id_counts(layout: &Layout, data: &Dataset, counts: &mut [Vec<u32>]) {
    for (t, _, ids, holder) in id_sources(layout, data) {
        // Each id counts once per row that holds it.
        let mut add = |id: u32, rows: usize| {
            let c = &mut counts[t];
            if c.len() <= id as usize {
                c.resize(id as usize + 1, 0);
            }
            c[id as usize] = c[id as usize].saturating_add(rows as u32);
        };
        match holder {
            Holder::Row => ids.iter().for_each(|&id| add(id, 1)),
            Holder::Group => ids
                .iter()
                .enumerate()
                .for_each(|(g, &id)| add(id, data.batch.group_rows(g).len())),
            Holder::Sequence(o) => {
                for (h, w) in o.windows(2).enumerate() {
                    let rows = data.batch.group_rows(h).len();
                    ids[w[0] as usize..w[1] as usize].iter().for_each(|&id| add(id, rows));
                }
            }
        }
    }
}
