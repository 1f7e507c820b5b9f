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
        for (o, s) in out.sequences.iter_mut().zip(&self.sequences) {
            o.offsets.clear();
            o.offsets.push(0);
            o.values.clear();
            for &r in rows {
                o.push(s.row(r));
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
