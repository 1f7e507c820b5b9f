//! Columnar batches with ragged sequences.

/// A ragged array: row `r` holds `values[offsets[r]..offsets[r + 1]]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ragged {
    /// Row starts, `len() + 1` entries, starting with 0.
    pub offsets: Vec<u32>,
    /// All rows' values concatenated.
    pub values: Vec<u32>,
}

impl Ragged {
    /// An empty ragged array with no rows.
    pub fn new() -> Self {
        Ragged {
            offsets: vec![0],
            values: Vec::new(),
        }
    }

    /// Appends one row.
    pub fn push(&mut self, row: &[u32]) {
        self.values.extend_from_slice(row);
        self.offsets.push(self.values.len() as u32);
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[u32] {
        &self.values[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }
}

/// Columns of a set of samples, in the order of the schema's
/// [`Layout`](crate::schema::Layout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// One id per row for each sparse feature: `sparse[f][row]`.
    pub sparse: Vec<Vec<u32>>,
    /// Values of each dense feature: `dense[f][row * dim + j]`.
    pub dense: Vec<Vec<f32>>,
    /// Ids of each sequence feature, ragged, without padding.
    pub sequences: Vec<Ragged>,
    /// Labels, 0 or 1 (empty when the data has no label column).
    pub labels: Vec<f32>,
    /// Rows in the batch.
    pub rows: usize,
    /// Common features (architecture.md, trick 4): when not empty, the
    /// sequences are stored once per *group* of consecutive rows that share
    /// them (a page view's candidates), and `groups[r]` is row `r`'s index
    /// into every `sequences[f]`: non-decreasing, starting at 0, each group's
    /// rows consecutive. Empty: row `r`'s sequences are row `r` of each.
    pub groups: Vec<u32>,
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Whether the sequences are stored once per group of rows.
    pub fn is_grouped(&self) -> bool {
        !self.groups.is_empty()
    }

    /// The row of `sequences[f]` holding row `r`'s sequence.
    pub fn history_row(&self, r: usize) -> usize {
        if self.groups.is_empty() {
            r
        } else {
            self.groups[r] as usize
        }
    }

    /// Row `r`'s ids of sequence feature `f`.
    pub fn history(&self, f: usize, r: usize) -> &[u32] {
        self.sequences[f].row(self.history_row(r))
    }

    /// Number of groups (rows that share their sequences); the number of
    /// rows when the batch is not grouped.
    pub fn group_count(&self) -> usize {
        match self.groups.last() {
            Some(&g) => g as usize + 1,
            None => self.rows,
        }
    }

    /// Where each group's rows start, then the number of rows (`[G + 1]`).
    pub fn group_bounds(&self) -> Vec<usize> {
        let mut bounds = Vec::with_capacity(self.group_count() + 1);
        for r in 0..self.rows {
            if r == 0 || self.history_row(r) != self.history_row(r - 1) {
                bounds.push(r);
            }
        }
        bounds.push(self.rows);
        bounds
    }

    /// The rows at `rows`, in that order.
    pub fn gather(&self, rows: &[usize]) -> Batch {
        let mut out = Batch::default();
        self.gather_into(rows, &mut out);
        out
    }

    /// [`Batch::gather`] into `out`, reusing its buffers.
    pub fn gather_into(&self, rows: &[usize], out: &mut Batch) {
        out.sparse.resize_with(self.sparse.len(), Vec::new);
        for (o, c) in out.sparse.iter_mut().zip(&self.sparse) {
            o.clear();
            o.extend(rows.iter().map(|&r| c[r]));
        }
        out.dense.resize_with(self.dense.len(), Vec::new);
        for (o, c) in out.dense.iter_mut().zip(&self.dense) {
            let dim = c.len().checked_div(self.rows).unwrap_or(0);
            o.clear();
            for &r in rows {
                o.extend_from_slice(&c[r * dim..(r + 1) * dim]);
            }
        }
        out.sequences.resize_with(self.sequences.len(), Ragged::new);
        out.groups.clear();
        // A grouped batch stays grouped: consecutive gathered rows of one
        // source group share one copy of its sequences.
        let mut kept: Vec<usize> = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let h = self.history_row(r);
            if self.is_grouped() {
                if i == 0 || self.history_row(rows[i - 1]) != h {
                    kept.push(h);
                }
                out.groups.push(kept.len() as u32 - 1);
            } else {
                kept.push(h);
            }
        }
        for (o, s) in out.sequences.iter_mut().zip(&self.sequences) {
            o.offsets.clear();
            o.offsets.push(0);
            o.values.clear();
            for &h in &kept {
                o.push(s.row(h));
            }
        }
        out.labels.clear();
        if !self.labels.is_empty() {
            out.labels.extend(rows.iter().map(|&r| self.labels[r]));
        }
        out.rows = rows.len();
    }

    /// Consecutive rows `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> Batch {
        let rows: Vec<usize> = (start..end).collect();
        self.gather(&rows)
    }
}
