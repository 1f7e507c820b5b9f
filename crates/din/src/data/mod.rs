//! Data: delimited readers into columnar datasets with ragged histories.
//!
//! A [`Dataset`] stores every column of a file, histories concatenated with
//! per-row offsets (no padding is stored, so none is computed on). A training
//! or inference step works on a [`Batch`], gathered from a dataset by row index.

mod batch;
mod columnar;
mod lookup;
mod reader;
mod vocab;

pub use batch::{Batch, Ragged};
pub use columnar::read_record_batches;
pub use lookup::{ItemColumn, ItemTable, Vocabulary};
pub use reader::{count_rows, kept_range, read_dataset, read_rows, stream_dataset, ReadOptions, Sink, SkippedRows};
pub use vocab::{
    add_id_counts, apply_vocab, drop_out_of_vocabulary, id_counts, infer_vocab, LargestIds, MAX_INFERRED_TABLE,
};

use std::path::PathBuf;

/// The rows of one file, column by column.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The file the rows came from (for error messages).
    pub source: PathBuf,
    /// 1-based line number of each row in `source`.
    pub lines: Vec<u32>,
    /// All columns used by the model.
    pub batch: Batch,
    /// Dense user ids for GAUC (when the schema names a user column): one
    /// per row, or one per group of a grouped batch (a group is one
    /// user's); [`Dataset::user_ids`] gives one per row either way.
    pub users: Option<Vec<u32>>,
    /// Malformed rows skipped while reading (with `skip_bad_rows`).
    pub skipped: SkippedRows,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits off the last `fraction` of the rows, in file order (Keras'
    /// `validation_split`: the first `floor(n * (1 - fraction))` rows stay).
    pub fn split_tail(self, fraction: f64) -> (Dataset, Dataset) {
        let n = self.len();
        let cut = ((n as f64) * (1.0 - fraction)).floor() as usize;
        let head: Vec<usize> = (0..cut).collect();
        let tail: Vec<usize> = (cut..n).collect();
        let mut head = self.select(&head);
        head.skipped = self.skipped.clone(); // the file's, counted once
        (head, self.select(&tail))
    }

    /// The rows at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Dataset {
        let mut batch = Batch::default();
        let kept = self.batch.gather_groups_into(rows, &mut batch);
        let users = self.users.as_ref().map(|u| {
            let units = if self.batch.is_grouped() { &kept } else { rows };
            units.iter().map(|&i| u[i]).collect()
        });
        Dataset {
            source: self.source.clone(),
            lines: rows.iter().map(|&r| self.lines[r]).collect(),
            batch,
            users,
            skipped: SkippedRows::default(),
        }
    }

    /// Each row's user id for GAUC (when the schema names a user column).
    pub fn user_ids(&self) -> Option<std::borrow::Cow<'_, [u32]>> {
        let users = self.users.as_ref()?;
        Some(if self.batch.is_grouped() {
            let mut out = Vec::with_capacity(self.len());
            for (g, &u) in users.iter().enumerate() {
                out.extend(self.batch.group_rows(g).map(|_| u));
            }
            std::borrow::Cow::Owned(out)
        } else {
            std::borrow::Cow::Borrowed(users.as_slice())
        })
    }
}
