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
///
/// Common features (architecture.md, trick 4): a *grouped* batch stores
/// what consecutive rows share (a page view's candidates share a user
/// side) once per group of rows: every sequence, and each sparse or dense
/// feature that is the same for all the rows of every group (`shared_*`).
/// Read columns through [`Batch::sparse_id`], [`Batch::dense_values`] and
/// [`Batch::history`], which serve both layouts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Ids of each sparse feature: `sparse[f][row]`, or `sparse[f][group]`
    /// when `shared_sparse[f]`.
    pub sparse: Vec<Vec<u32>>,
    /// Values of each dense feature: `dense[f][row * dim + j]`, or per
    /// group when `shared_dense[f]`.
    pub dense: Vec<Vec<f32>>,
    /// Ids of each sequence feature, ragged, without padding: one row per
    /// row, or per group in a grouped batch.
    pub sequences: Vec<Ragged>,
    /// Labels, 0 or 1, one per row (empty when the data has no label column).
    pub labels: Vec<f32>,
    /// Rows in the batch.
    pub rows: usize,
    /// A grouped batch: where each group's rows start, then `rows`
    /// (`[G + 1]`, increasing). Empty: every row is its own group.
    pub groups: Vec<u32>,
    /// A grouped batch: which sparse features hold one id per group.
    /// Missing entries are `false`.
    pub shared_sparse: Vec<bool>,
    /// A grouped batch: which dense features hold one value per group.
    pub shared_dense: Vec<bool>,
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

    /// Whether the rows are stored in groups that share their sequences.
    pub fn is_grouped(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Number of groups; the number of rows when the batch is not grouped.
    pub fn group_count(&self) -> usize {
        if self.is_grouped() {
            self.groups.len() - 1
        } else {
            self.rows
        }
    }

    /// The group of row `r` (`r` itself when the batch is not grouped): the
    /// row of every `sequences[f]` that holds row `r`'s sequence.
    pub fn group_of(&self, r: usize) -> usize {
        if self.is_grouped() {
            self.groups.partition_point(|&start| start as usize <= r) - 1
        } else {
            r
        }
    }

    /// The rows of group `g`.
    pub fn group_rows(&self, g: usize) -> std::ops::Range<usize> {
        if self.is_grouped() {
            self.groups[g] as usize..self.groups[g + 1] as usize
        } else {
            g..g + 1
        }
    }

    /// Row `r`'s ids of sequence feature `f`.
    pub fn history(&self, f: usize, r: usize) -> &[u32] {
        self.sequences[f].row(self.group_of(r))
    }

    /// Whether sparse feature `f` holds one id per group.
    pub fn is_shared_sparse(&self, f: usize) -> bool {
        self.is_grouped() && self.shared_sparse.get(f).copied().unwrap_or(false)
    }

    /// Whether dense feature `f` holds one value per group.
    pub fn is_shared_dense(&self, f: usize) -> bool {
        self.is_grouped() && self.shared_dense.get(f).copied().unwrap_or(false)
    }

    /// Row `r`'s id of sparse feature `f`.
    pub fn sparse_id(&self, f: usize, r: usize) -> u32 {
        if self.is_shared_sparse(f) {
            self.sparse[f][self.group_of(r)]
        } else {
            self.sparse[f][r]
        }
    }

    /// Calls `visit(row, id)` for every row's id of sparse feature `f`, in
    /// row order, without a search per row.
    pub fn for_each_sparse(&self, f: usize, mut visit: impl FnMut(usize, u32)) {
        if self.is_shared_sparse(f) {
            for (g, &id) in self.sparse[f].iter().enumerate() {
                self.group_rows(g).for_each(|r| visit(r, id));
            }
        } else {
            self.sparse[f].iter().enumerate().for_each(|(r, &id)| visit(r, id));
        }
    }

    /// Width of dense feature `f`.
    fn dense_dim(&self, f: usize) -> usize {
        let units = if self.is_shared_dense(f) {
            self.group_count()
        } else {
            self.rows
        };
        self.dense[f].len().checked_div(units).unwrap_or(0)
    }

    /// Row `r`'s values of dense feature `f`.
    pub fn dense_values(&self, f: usize, r: usize) -> &[f32] {
        let dim = self.dense_dim(f);
        let at = if self.is_shared_dense(f) { self.group_of(r) } else { r };
        &self.dense[f][at * dim..(at + 1) * dim]
    }

    /// The rows at `rows`, in that order.
    pub fn gather(&self, rows: &[usize]) -> Batch {
        let mut out = Batch::default();
        self.gather_into(rows, &mut out);
        out
    }

    /// [`Batch::gather`] into `out`, reusing its buffers.
    pub fn gather_into(&self, rows: &[usize], out: &mut Batch) {
        self.gather_groups_into(rows, out);
    }

    /// [`Batch::gather_into`], returning the source group of each of
    /// `out`'s groups (of each row when `self` is not grouped). A grouped
    /// batch stays grouped: consecutive gathered rows of one source group
    /// form a group of `out`, sharing one copy of what the source shares.
    pub fn gather_groups_into(&self, rows: &[usize], out: &mut Batch) -> Vec<usize> {
        let grouped = self.is_grouped();
        // The source group of each row, and of each kept group.
        let of_row: Vec<usize> = rows.iter().map(|&r| self.group_of(r)).collect();
        let mut kept: Vec<usize> = Vec::with_capacity(rows.len());
        out.groups.clear();
        for (i, &g) in of_row.iter().enumerate() {
            if !grouped || i == 0 || of_row[i - 1] != g {
                kept.push(g);
                if grouped {
                    out.groups.push(i as u32);
                }
            }
        }
        if grouped {
            out.groups.push(rows.len() as u32);
        }
        out.shared_sparse.clone_from(&self.shared_sparse);
        out.shared_dense.clone_from(&self.shared_dense);
        out.sparse.resize_with(self.sparse.len(), Vec::new);
        for (f, (o, c)) in out.sparse.iter_mut().zip(&self.sparse).enumerate() {
            o.clear();
            if self.is_shared_sparse(f) {
                o.extend(kept.iter().map(|&g| c[g]));
            } else {
                o.extend(rows.iter().map(|&r| c[r]));
            }
        }
        out.dense.resize_with(self.dense.len(), Vec::new);
        for f in 0..self.dense.len() {
            let (c, dim) = (&self.dense[f], self.dense_dim(f));
            let o = &mut out.dense[f];
            o.clear();
            let units: &[usize] = if self.is_shared_dense(f) { &kept } else { rows };
            for &u in units {
                o.extend_from_slice(&c[u * dim..(u + 1) * dim]);
            }
        }
        out.sequences.resize_with(self.sequences.len(), Ragged::new);
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
        kept
    }

    /// The same rows with every column held per row (not grouped).
    pub fn ungrouped(&self) -> Batch {
        if !self.is_grouped() {
            return self.clone();
        }
        let rows = 0..self.rows;
        Batch {
            sparse: (0..self.sparse.len())
                .map(|f| rows.clone().map(|r| self.sparse_id(f, r)).collect())
                .collect(),
            dense: (0..self.dense.len())
                .map(|f| {
                    rows.clone()
                        .flat_map(|r| self.dense_values(f, r).iter().copied())
                        .collect()
                })
                .collect(),
            sequences: (0..self.sequences.len())
                .map(|f| {
                    let mut out = Ragged::new();
                    rows.clone().for_each(|r| out.push(self.history(f, r)));
                    out
                })
                .collect(),
            labels: self.labels.clone(),
            rows: self.rows,
            ..Batch::default()
        }
    }

    /// Consecutive rows `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> Batch {
        let rows: Vec<usize> = (start..end).collect();
        self.gather(&rows)
    }
}
