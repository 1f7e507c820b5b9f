//! The delimited reader: the tutorial's headerless TSV (columns named in the
//! config) and general files with a header row.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use super::{Batch, Dataset, Ragged};
use crate::schema::{Config, InputFormat, InputLayout, Layout, SequenceOrder, SequenceSlot, Truncation};
use crate::{Error, Result};

/// How strictly to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadOptions {
    /// Whether the label column must be present (training, evaluation) or
    /// may be absent (prediction; it is ignored when present).
    pub require_label: bool,
    /// Skip malformed rows (counted in [`Dataset::skipped`]) instead of
    /// stopping at the first, as long as they are at most this fraction of
    /// the file's rows. `None`: the first malformed row is the error.
    pub skip_bad_rows: Option<f64>,
}

impl ReadOptions {
    /// Strict reading: the first malformed row is an error.
    pub const fn strict(require_label: bool) -> ReadOptions {
        ReadOptions {
            require_label,
            skip_bad_rows: None,
        }
    }
}

/// How many rows [`read_dataset`] skipped as malformed, and the first ones.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SkippedRows {
    /// Rows skipped.
    pub count: usize,
    /// The first [`SkippedRows::KEPT`] of them: line number and the error.
    pub first: Vec<(u64, String)>,
}

impl SkippedRows {
    /// How many skipped rows are listed with their error.
    pub const KEPT: usize = 10;

    /// Refuses more skipped rows than `limit` (a fraction) of the `total`
    /// rows of `path`, naming the first.
    pub fn check_limit(&self, path: &Path, total: usize, limit: f64) -> Result<()> {
        if self.count > 0 && self.count as f64 > limit * total as f64 {
            let (line, first) = self.first.first().cloned().unwrap_or_default();
            return Err(Error::TooManyBadRows {
                path: path.to_path_buf(),
                skipped: self.count,
                total,
                limit,
                first: format!("line {line}: {first}"),
            });
        }
        Ok(())
    }
}

/// Where each schema column sits in the file.
struct ColumnMap {
    sparse: Vec<usize>,
    dense: Vec<usize>,
    sequences: Vec<usize>,
    label: Option<usize>,
    user: Option<usize>,
    width: usize,
}

/// Reads a delimited file into a [`Dataset`]. Ids are stored as written;
/// [`apply_vocab`](super::apply_vocab) checks them against the tables.
///
/// A grouped file (`input.layout = "grouped"`, one group per line) gives
/// one row per candidate, the line's sequences stored once for them; with
/// `data.group`, consecutive rows of a flat file with the same user side
/// (every sequence, and the user column) share theirs the same way (see
/// [`Batch::groups`]).
///
/// Errors name the file, the line, the column and the value: a row with the
/// wrong number of columns, a non-numeric id or value, a label other than 0
/// or 1, a history whose paired columns differ in length, or a file without
/// data rows.
///
/// Parquet and Arrow IPC files (`input.format`, or the file's extension)
/// are read by the columnar reader into the same rows (see the README).
pub fn read_dataset(path: &Path, config: &Config, layout: &Layout, options: ReadOptions) -> Result<Dataset> {
    read_part(path, config, layout, options, None)
}

/// Reads records `rows` of a data file (0-based, in file order; a
/// delimited file's header and blank lines are not records) as
/// [`read_dataset`] reads the whole file: one rank's shard of the training
/// file in distributed training. The records before `rows` are split into
/// fields (a delimited file) or skipped by record batch (Parquet, Arrow)
/// but not parsed; reading stops after the last. Line numbers in errors and
/// in [`Dataset::lines`] are the file's.
pub fn read_rows(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    rows: std::ops::Range<u64>,
) -> Result<Dataset> {
    read_part(path, config, layout, options, Some(rows))
}

/// Counts the records of a data file that [`read_rows`] numbers: a
/// delimited file's non-blank lines after the header, a Parquet file's rows
/// (from its metadata), an Arrow file's rows. Nothing is parsed.
pub fn count_rows(path: &Path, config: &Config) -> Result<u64> {
    match config.input.format.of(path) {
        InputFormat::Parquet | InputFormat::Arrow => super::columnar::count_rows(path, config),
        InputFormat::Delimited | InputFormat::Auto => {
            let mut reader = delimited_reader(path, config)?;
            let mut record = csv::StringRecord::new();
            let mut count = 0u64;
            while reader.read_record(&mut record).map_err(|e| csv_error(path, e))? {
                count += u64::from(!is_blank(&record));
            }
            Ok(count)
        }
    }
}

/// [`read_dataset`] of records `rows` only, when given.
fn read_part(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    rows: Option<std::ops::Range<u64>>,
) -> Result<Dataset> {
    let mut whole = None;
    let skipped = read_into(path, config, layout, options, None, rows, &mut |d| {
        whole = Some(d);
        Ok(true)
    })?;
    let mut data = whole.ok_or_else(|| Error::EmptyFile {
        path: path.to_path_buf(),
    })?;
    data.skipped = skipped.unwrap_or_default();
    Ok(data)
}

/// Where [`stream_dataset`] hands each window of rows: `Ok(false)` stops
/// the reading there.
pub type Sink<'s> = dyn FnMut(Dataset) -> Result<bool> + 's;

/// Reads a data file as [`read_dataset`] does, but in windows of about
/// `window_rows` rows handed to `sink` in file order instead of one
/// dataset: a window ends at the first row boundary at or after
/// `window_rows` rows that does not split a group, so memory is bounded by
/// a window (and, for Parquet, a record batch) whatever the file's size.
///
/// Returns the malformed rows skipped over the whole file (checked against
/// `skip_bad_rows`' limit at the end), or `None` when `sink` stopped the
/// reading. The windows' own [`Dataset::skipped`] are empty. GAUC's user
/// ids are numbered over the whole file. A file without rows is an error.
pub fn stream_dataset(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    window_rows: usize,
    sink: &mut Sink<'_>,
) -> Result<Option<SkippedRows>> {
    read_into(path, config, layout, options, Some(window_rows.max(1)), None, sink)
}

/// Reads `path` (records `rows` only, when given) in windows (`None`: one
/// window, the whole file) into `sink`.
fn read_into(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    window: Option<usize>,
    rows: Option<std::ops::Range<u64>>,
    sink: &mut Sink<'_>,
) -> Result<Option<SkippedRows>> {
    match config.input.format.of(path) {
        InputFormat::Parquet | InputFormat::Arrow => {
            super::columnar::read(path, config, layout, options, window, rows, sink)
        }
        InputFormat::Delimited | InputFormat::Auto => read_delimited(path, config, layout, options, window, rows, sink),
    }
}

/// The csv reader of a delimited file, as `config.input` describes it.
fn delimited_reader(path: &Path, config: &Config) -> Result<csv::Reader<BufReader<File>>> {
    let input = &config.input;
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open data file", e))?;
    Ok(csv::ReaderBuilder::new()
        .delimiter(input.delimiter_byte()?)
        .has_headers(input.header)
        .flexible(true)
        .quoting(input.quoting)
        .from_reader(BufReader::new(file)))
}

/// Whether a record is a blank line (skipped, and not counted as a record).
fn is_blank(record: &csv::StringRecord) -> bool {
    record.len() == 1 && record[0].trim().is_empty()
}

/// [`read_into`] for delimited text.
fn read_delimited(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    window: Option<usize>,
    range: Option<std::ops::Range<u64>>,
    sink: &mut Sink<'_>,
) -> Result<Option<SkippedRows>> {
    let input = &config.input;
    let file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    let mut reader = delimited_reader(path, config)?;
    let columns: Vec<String> = if input.header {
        let header = reader.headers().map_err(|e| csv_error(path, e))?;
        header.iter().map(|h| h.trim().to_string()).collect()
    } else {
        input.columns.clone()
    };
    if let Some((i, c)) = columns.iter().enumerate().find(|(i, c)| columns[..*i].contains(c)) {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: 1,
            column: c.clone(),
            value: c.clone(),
            reason: format!("duplicate column name in the header (column {})", i + 1),
        });
    }
    let map = ColumnMap::new(path, &columns, layout, options)?;
    let sep = input.separator_byte()? as char;
    let grouped_file = input.layout == InputLayout::Grouped;
    let candidates = if grouped_file {
        Some(input.candidate_separator_byte()? as char)
    } else {
        None
    };
    let group = grouped_file || config.data.group;
    let mut rows = Builder::new(path, layout, group, grouped_file, map.user.is_some());
    rows.window = window;
    let mut record = csv::StringRecord::new();
    let mut row = Row::new(layout);
    let pair_histories: Vec<usize> = layout.pairs.iter().map(|&(_, h)| h).collect();
    // A part of the file is not sized from the whole file's bytes.
    let whole = range.is_none();
    let range = range.unwrap_or(0..u64::MAX);
    let mut index = 0u64;

    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e)),
        }
        let line = record.position().map_or(0, |p| p.line());
        if is_blank(&record) {
            continue; // a blank line
        }
        index += 1;
        if index <= range.start {
            continue; // before the records asked for
        }
        if index > range.end {
            break;
        }
        // The row is parsed whole into `row` first, so that a malformed row
        // can be skipped without leaving a column half-filled.
        let parsed = parse_row(
            &record,
            line,
            path,
            &map,
            layout,
            options,
            sep,
            candidates,
            &pair_histories,
            &mut row,
        );
        match parsed {
            Ok(()) => {}
            Err(e @ (Error::RowLength { .. } | Error::Parse { .. })) if options.skip_bad_rows.is_some() => {
                rows.skip(line, &e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let field = |col: usize| record[col].trim();
        let user = map.user.map(field);
        if let (Some(u), Some(c)) = (user, candidates) {
            if u.contains(c) {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line,
                    column: layout.user.clone().unwrap_or_default(),
                    value: u.to_string(),
                    reason: format!("the user column is the group's, one value for all its candidates: it cannot hold the candidate separator {c:?}"),
                });
            }
        }
        rows.push(&row, user.map(user_key), line)?;
        if !rows.drain(sink)? {
            return Ok(None);
        }
        if rows.pushed() == RESERVE_AFTER && window.is_none() && whole {
            let read = record.position().map_or(0, |p| p.byte());
            rows.reserve_for_file(file_bytes, read);
        }
    }
    rows.finish(options, sink)
}

/// A 64-bit hash of a raw user value: GAUC's users and the groups' are
/// told apart by it (the same for every file format).
pub(super) fn user_key(raw: &str) -> u64 {
    let mut h = crate::checkpoint::Fnv::new();
    h.write(raw.as_bytes());
    h.value()
}

/// Parsed rows joining a [`Dataset`], whatever the file format: groups
/// detected (`data.group`, a grouped file), user ids numbered, line (or
/// row) numbers kept, malformed rows counted.
pub(super) struct Builder<'a> {
    path: &'a Path,
    layout: &'a Layout,
    /// Whether rows form groups (a grouped file, or `data.group`).
    group: bool,
    /// Whether each pushed row is a group of its own (a grouped line).
    grouped_file: bool,
    /// The previous group's user.
    last_user: Option<u64>,
    batch: Batch,
    /// Grouped: the columns stored once per group so far (each starts so,
    /// and holds one value per row from the first group whose rows differ).
    shared_sparse: Vec<bool>,
    shared_dense: Vec<bool>,
    /// Rows pushed (lines of a grouped file).
    row_count: usize,
    lines: Vec<u32>,
    users: Option<Vec<u32>>,
    /// Dense user ids for GAUC, keyed by a 64-bit hash of the raw value
    /// rather than the value itself: the map holds 12 bytes a user, not a
    /// string; two users would be merged only on a 64-bit collision.
    user_ids: HashMap<u64, u32>,
    skipped: SkippedRows,
    /// Streaming: hand the rows on in windows of about this many.
    pub(super) window: Option<usize>,
    /// Windows complete and not yet handed on.
    ready: VecDeque<Dataset>,
    /// Rows in the windows handed on or ready.
    flushed_rows: usize,
}

impl<'a> Builder<'a> {
    /// An empty dataset for `layout`'s columns; `with_users`: number users
    /// for GAUC.
    pub(super) fn new(path: &'a Path, layout: &'a Layout, group: bool, grouped_file: bool, with_users: bool) -> Self {
        Builder {
            path,
            layout,
            group,
            grouped_file,
            last_user: None,
            batch: empty_batch(layout),
            shared_sparse: vec![group; layout.sparse.len()],
            shared_dense: vec![group; layout.dense.len()],
            row_count: 0,
            lines: Vec::new(),
            users: with_users.then(Vec::new),
            user_ids: HashMap::new(),
            skipped: SkippedRows::default(),
            window: None,
            ready: VecDeque::new(),
            flushed_rows: 0,
        }
    }

    /// Ends the window in progress: its rows become a ready dataset and the
    /// columns start empty again (GAUC's user numbering goes on).
    fn flush(&mut self) {
        if self.batch.rows == 0 {
            return;
        }
        let mut batch = std::mem::replace(&mut self.batch, empty_batch(self.layout));
        // Streaming: the next window is likely the size of this one. Sized
        // so, its columns do not grow by doubling (which can leave twice a
        // window allocated at the peak).
        let more = |n: usize| if self.window.is_some() { n + n / 16 } else { 0 };
        let next = &mut self.batch;
        for (c, p) in next.sparse.iter_mut().zip(&batch.sparse) {
            c.reserve(more(p.len()));
        }
        for (c, p) in next.dense.iter_mut().zip(&batch.dense) {
            c.reserve(more(p.len()));
        }
        for (c, p) in next.sequences.iter_mut().zip(&batch.sequences) {
            c.values.reserve(more(p.values.len()));
            c.offsets.reserve(more(p.offsets.len()));
        }
        next.labels.reserve(more(batch.labels.len()));
        next.groups.reserve(more(batch.groups.len()));
        let lines_capacity = more(self.lines.len());
        let lines = std::mem::replace(&mut self.lines, Vec::with_capacity(lines_capacity));
        let users = match self.users.as_mut() {
            Some(u) => {
                let capacity = more(u.len());
                Some(std::mem::replace(u, Vec::with_capacity(capacity)))
            }
            None => None,
        };
        if self.group {
            batch.groups.push(batch.rows as u32);
            batch.shared_sparse = std::mem::replace(&mut self.shared_sparse, vec![true; self.layout.sparse.len()]);
            batch.shared_dense = std::mem::replace(&mut self.shared_dense, vec![true; self.layout.dense.len()]);
        }
        self.flushed_rows += batch.rows;
        self.ready.push_back(Dataset {
            source: self.path.to_path_buf(),
            lines,
            batch,
            users,
            skipped: SkippedRows::default(),
        });
    }

    /// Hands the ready windows to `sink`; `false` when it stopped the reading.
    pub(super) fn drain(&mut self, sink: &mut Sink<'_>) -> Result<bool> {
        while let Some(window) = self.ready.pop_front() {
            if !sink(window)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Rows (or grouped lines) pushed so far.
    pub(super) fn pushed(&self) -> usize {
        self.row_count
    }

    /// Counts a malformed row skipped (`skip_bad_rows`), keeping the first errors.
    pub(super) fn skip(&mut self, line: u64, e: &Error) {
        self.skipped.count += 1;
        if self.skipped.first.len() < SkippedRows::KEPT {
            self.skipped.first.push((line, e.to_string()));
        }
    }

    /// Adds a parsed row (`user`: the [`user_key`] of its user column).
    pub(super) fn push(&mut self, row: &Row, user: Option<u64>, line: u64) -> Result<()> {
        let (layout, path) = (self.layout, self.path);
        let n = row.candidates;
        // Common features: the row joins the previous row's group when its
        // user side is the same (always a new group for a grouped line).
        let joins = self.group
            && !self.grouped_file
            && self.batch.rows > 0
            && user == self.last_user
            && (row.kept.iter().zip(&self.batch.sequences)).all(|(kept, s)| kept.as_slice() == s.row(s.rows() - 1));
        // Streaming: a full window ends before a row that starts a group.
        if !joins && self.window.is_some_and(|w| self.batch.rows >= w) {
            self.flush();
        }
        let batch = &mut self.batch;
        if self.group && !joins {
            self.last_user = user;
            batch.groups.push(batch.rows as u32);
        }
        let g = batch.groups.len().wrapping_sub(1); // the row's group
        for (f, ids) in row.sparse.iter().enumerate() {
            let col = &mut batch.sparse[f];
            if self.shared_sparse[f] {
                match (ids.len(), joins) {
                    (1, false) => {
                        col.push(ids[0]);
                        continue;
                    }
                    (1, true) if col[g] == ids[0] => continue,
                    // The rows of a group differ here: one id per row from now on.
                    _ => {
                        expand(col, 1, &batch.groups, batch.rows, self.lines.capacity());
                        self.shared_sparse[f] = false;
                    }
                }
            }
            col.extend((0..n).map(|c| ids[if ids.len() == 1 { 0 } else { c }]));
        }
        for (f, values) in row.dense.iter().enumerate() {
            let dim = layout.dense[f].1;
            let col = &mut batch.dense[f];
            if self.shared_dense[f] {
                let same = values.len() == dim;
                if same && !joins {
                    col.extend_from_slice(values);
                    continue;
                }
                if same && joins && col[g * dim..(g + 1) * dim] == values[..] {
                    continue;
                }
                expand(col, dim, &batch.groups, batch.rows, self.lines.capacity());
                self.shared_dense[f] = false;
            }
            for c in 0..n {
                let at = if values.len() == dim { 0 } else { c * dim };
                col.extend_from_slice(&values[at..at + dim]);
            }
        }
        for (f, slot) in layout.sequences.iter().enumerate() {
            if joins {
                break;
            }
            let kept = &row.kept[f];
            // Offsets are 32-bit: refuse a file whose histories would overflow them.
            if batch.sequences[f].values.len() + kept.len() > u32::MAX as usize {
                return Err(Error::Parse {
                    path: path.to_path_buf(),
                    line,
                    column: slot.name.clone(),
                    value: format!("{} more ids", kept.len()),
                    reason: "the file holds more than 4294967295 history ids in this column; split it".into(),
                });
            }
            batch.sequences[f].push(kept);
        }
        batch.labels.extend_from_slice(&row.labels);
        if let (Some(key), Some(users)) = (user, self.users.as_mut()) {
            let next = self.user_ids.len() as u32;
            let id = *self.user_ids.entry(key).or_insert(next);
            match (self.group, joins) {
                (false, _) => users.extend(std::iter::repeat_n(id, n)),
                (true, false) => users.push(id), // the group's
                (true, true) => {}
            }
        }
        // Line numbers are 32-bit, like the history offsets.
        let Ok(line32) = u32::try_from(line) else {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line,
                column: String::new(),
                value: String::new(),
                reason: "the file has more than 4294967295 lines; split it".into(),
            });
        };
        self.lines.extend(std::iter::repeat_n(line32, n));
        batch.rows += n;
        self.row_count += 1;
        Ok(())
    }

    /// Sizes the columns for `rows` more rows (a columnar file's count is
    /// known up front), and each history's values for at most
    /// `history_values[h]` more ids (a Parquet file's leaf value counts): a
    /// column that grew by doubling would hold up to twice its values.
    pub(super) fn reserve_rows(&mut self, rows: usize, history_values: &[usize]) {
        let b = &mut self.batch;
        for (s, &n) in b.sequences.iter_mut().zip(history_values) {
            s.values.reserve(n);
        }
        b.sparse.iter_mut().for_each(|c| c.reserve(rows));
        for (c, (_, dim)) in b.dense.iter_mut().zip(&self.layout.dense) {
            c.reserve(rows * dim);
        }
        b.sequences.iter_mut().for_each(|s| s.offsets.reserve(rows));
        b.labels.reserve(rows);
        self.lines.reserve(rows);
        if let Some(u) = self.users.as_mut() {
            u.reserve(rows);
        }
    }

    /// Sizes the columns for the whole file from its first `read` bytes.
    pub(super) fn reserve_for_file(&mut self, file_bytes: u64, read: u64) {
        reserve_for_file(&mut self.batch, &mut self.lines, self.users.as_mut(), file_bytes, read);
    }

    /// Hands the last window to `sink` and returns the rows skipped; an
    /// error for a file without rows or with more malformed rows than
    /// `options` allow.
    pub(super) fn finish(mut self, options: ReadOptions, sink: &mut Sink<'_>) -> Result<Option<SkippedRows>> {
        if let Some(limit) = options.skip_bad_rows {
            let rows = self.row_count;
            self.skipped.check_limit(self.path, rows + self.skipped.count, limit)?;
        }
        self.flush();
        if self.flushed_rows == 0 {
            return Err(Error::EmptyFile {
                path: self.path.to_path_buf(),
            });
        }
        Ok(self.drain(sink)?.then_some(self.skipped))
    }
}

/// Empty columns for `layout`.
fn empty_batch(layout: &Layout) -> Batch {
    Batch {
        sparse: vec![Vec::new(); layout.sparse.len()],
        dense: vec![Vec::new(); layout.dense.len()],
        sequences: vec![Ragged::new(); layout.sequences.len()],
        labels: Vec::new(),
        rows: 0,
        groups: Vec::new(),
        shared_sparse: Vec::new(),
        shared_dense: Vec::new(),
    }
}

/// Turns a column holding `dim` values per group into one holding them per
/// row: group `g` (rows `starts[g]..starts[g + 1]`, the last ending at
/// `rows`) repeated once per row, with room for `capacity_rows` rows.
fn expand<T: Copy>(col: &mut Vec<T>, dim: usize, starts: &[u32], rows: usize, capacity_rows: usize) {
    let mut out = Vec::with_capacity(capacity_rows.max(rows) * dim);
    for (g, &start) in starts.iter().enumerate() {
        let end = starts.get(g + 1).map_or(rows, |&e| e as usize);
        for _ in start as usize..end {
            out.extend_from_slice(&col[g * dim..(g + 1) * dim]);
        }
    }
    *col = out;
}

/// Lines read before the columns are sized for the whole file.
const RESERVE_AFTER: usize = 1024;

/// Sizes every column for the whole file, estimated from its first
/// bytes (`bytes_read`) with a margin, so that the
/// columns do not grow by doubling: each doubling copies the column and
/// leaves the old buffer to the allocator, which can hold twice the data's
/// memory at the peak. Capacity never written to is address space only,
/// not resident memory; a column that outgrows the estimate grows as usual.
fn reserve_for_file(
    batch: &mut Batch,
    lines: &mut Vec<u32>,
    users: Option<&mut Vec<u32>>,
    file_bytes: u64,
    bytes_read: u64,
) {
    if bytes_read == 0 || file_bytes <= bytes_read {
        return;
    }
    // 1.5 x the estimated total, over the part still to read.
    let scale = 1.5 * file_bytes as f64 / bytes_read as f64;
    let more = |have: usize| (have as f64 * scale) as usize - have;
    for c in &mut batch.sparse {
        c.reserve(more(c.len()));
    }
    for c in &mut batch.dense {
        c.reserve(more(c.len()));
    }
    for s in &mut batch.sequences {
        s.values.reserve(more(s.values.len()));
        s.offsets.reserve(more(s.offsets.len()));
    }
    batch.labels.reserve(more(batch.labels.len()));
    batch.groups.reserve(more(batch.groups.len()));
    lines.reserve(more(lines.len()));
    if let Some(u) = users {
        u.reserve(more(u.len()));
    }
}

/// One line's parsed columns, before they join the batch: one value per
/// column, or (a grouped line) one per candidate.
pub(super) struct Row {
    /// Per sparse feature: one id, or one per candidate.
    pub(super) sparse: Vec<Vec<u32>>,
    /// Per dense feature: `dim` values, or `dim` per candidate.
    pub(super) dense: Vec<Vec<f32>>,
    /// Per sequence: the ids as written, padding (0) included.
    pub(super) raw: Vec<Vec<u32>>,
    /// Per sequence: the ids kept (padding dropped, truncated to `max_len`).
    kept: Vec<Vec<u32>>,
    /// One label per candidate (none when not required).
    pub(super) labels: Vec<f32>,
    /// Samples on the line: 1, or a grouped line's candidates.
    pub(super) candidates: usize,
}

impl Row {
    /// An empty row for `layout`'s columns.
    pub(super) fn new(layout: &Layout) -> Row {
        Row {
            sparse: vec![Vec::new(); layout.sparse.len()],
            dense: vec![Vec::new(); layout.dense.len()],
            raw: vec![Vec::new(); layout.sequences.len()],
            kept: vec![Vec::new(); layout.sequences.len()],
            labels: Vec::new(),
            candidates: 1,
        }
    }

    /// Checks that the histories of the attention unit (`pair_histories`)
    /// are aligned per position (same length, padding at the same
    /// positions: before padding is dropped and before truncation), then
    /// keeps each sequence's real ids, truncated to its `max_len`.
    /// `bad(h, reason)` is the error for sequence `h`.
    pub(super) fn keep_histories(
        &mut self,
        layout: &Layout,
        pair_histories: &[usize],
        bad: impl Fn(usize, &str) -> Error,
    ) -> Result<()> {
        if let Some(&first) = pair_histories.first() {
            for &h in &pair_histories[1..] {
                let (a, b) = (&self.raw[first], &self.raw[h]);
                let (na, nb) = (&layout.sequences[first].name, &layout.sequences[h].name);
                if a.len() != b.len() {
                    let reason = format!(
                        "histories `{na}` and `{nb}` are aligned per position but have {} and {} ids",
                        a.len(),
                        b.len()
                    );
                    return Err(bad(h, &reason));
                }
                if let Some(p) = a.iter().zip(b).position(|(x, y)| (*x == 0) != (*y == 0)) {
                    let reason = format!(
                        "histories `{na}` and `{nb}` are aligned per position but only one has padding (0) at position {}",
                        p + 1
                    );
                    return Err(bad(h, &reason));
                }
            }
        }
        for ((kept, raw), slot) in self.kept.iter_mut().zip(&self.raw).zip(&layout.sequences) {
            kept.clear();
            kept.extend(raw.iter().copied().filter(|&id| id != 0)); // 0 is padding: not stored
            let range = kept_range(slot, kept.len());
            kept.truncate(range.end);
            kept.drain(..range.start);
        }
        Ok(())
    }
}

/// The values of a field: the whole field, or (a grouped line, `split`
/// being the candidate separator) one per candidate.
fn pieces(v: &str, split: Option<char>) -> impl Iterator<Item = &str> {
    let mut all = Some(v);
    let mut parts = split.map(|c| v.split(c));
    std::iter::from_fn(move || match &mut parts {
        Some(p) => p.next().map(str::trim),
        None => all.take(),
    })
}

/// Parses one record into `row` (with its labels, when required).
#[allow(clippy::too_many_arguments)]
fn parse_row(
    record: &csv::StringRecord,
    line: u64,
    path: &Path,
    map: &ColumnMap,
    layout: &Layout,
    options: ReadOptions,
    sep: char,
    candidates: Option<char>,
    pair_histories: &[usize],
    row: &mut Row,
) -> Result<()> {
    if record.len() != map.width {
        return Err(Error::RowLength {
            path: path.to_path_buf(),
            line,
            expected: map.width,
            found: record.len(),
        });
    }
    let field = |col: usize| record[col].trim();
    let bad = |name: &str, value: &str, reason: &str| Error::Parse {
        path: path.to_path_buf(),
        line,
        column: name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    // A grouped line's candidates: the most values any column holds.
    let count = |col: usize| candidates.map_or(1, |c| field(col).split(c).count());
    let label_col = map.label.filter(|_| options.require_label);
    let n = map
        .sparse
        .iter()
        .chain(&map.dense)
        .chain(&label_col)
        .map(|&col| count(col))
        .max()
        .unwrap_or(1);
    let per_candidate = |name: &str, col: usize| -> Result<()> {
        match count(col) {
            1 => Ok(()),
            k if k == n => Ok(()),
            k => Err(bad(
                name,
                field(col),
                &format!("holds {k} candidates' values, but another column of the line holds {n}: give one value for all, or one per candidate"),
            )),
        }
    };
    row.candidates = n;
    for (f, &col) in map.sparse.iter().enumerate() {
        let name = &layout.sparse[f].name;
        per_candidate(name, col)?;
        let out = &mut row.sparse[f];
        out.clear();
        for v in pieces(field(col), candidates) {
            out.push(parse_id(v).map_err(|r| bad(name, v, r))?);
        }
    }
    for (f, &col) in map.dense.iter().enumerate() {
        let (name, dim) = (&layout.dense[f].0, layout.dense[f].1);
        per_candidate(name, col)?;
        let out = &mut row.dense[f];
        out.clear();
        for v in pieces(field(col), candidates) {
            let before = out.len();
            for piece in v.split(sep) {
                let x: f32 = piece.trim().parse().map_err(|_| bad(name, v, "not a number"))?;
                if !x.is_finite() {
                    return Err(bad(name, v, "not a finite number"));
                }
                out.push(x);
            }
            if out.len() - before != dim {
                return Err(bad(
                    name,
                    v,
                    &format!(
                        "expected {dim} values separated by {sep:?}, found {}",
                        out.len() - before
                    ),
                ));
            }
        }
    }
    for (f, &col) in map.sequences.iter().enumerate() {
        let slot = &layout.sequences[f];
        let v = field(col);
        if let Some(c) = candidates.filter(|&c| v.contains(c)) {
            return Err(bad(
                &slot.name,
                v,
                &format!("a grouped line's history is the group's, one for all its candidates: it cannot hold the candidate separator {c:?}"),
            ));
        }
        let raw = &mut row.raw[f];
        raw.clear();
        for piece in v.split(sep) {
            let piece = piece.trim();
            if !piece.is_empty() {
                raw.push(parse_id(piece).map_err(|r| bad(&slot.name, piece, r))?);
            }
        }
    }
    row.keep_histories(layout, pair_histories, |h, reason| {
        bad(&layout.sequences[h].name, field(map.sequences[h]), reason)
    })?;
    row.labels.clear();
    if let Some(col) = label_col {
        if count(col) != n {
            per_candidate(&layout.label, col)?;
            return Err(bad(
                &layout.label,
                field(col),
                &format!("a grouped line needs one label per candidate ({n})"),
            ));
        }
        for v in pieces(field(col), candidates) {
            let y: f32 = v.parse().map_err(|_| bad(&layout.label, v, "label must be 0 or 1"))?;
            if y != 0.0 && y != 1.0 {
                return Err(bad(&layout.label, v, "label must be 0 or 1"));
            }
            row.labels.push(y);
        }
    }
    Ok(())
}

impl ColumnMap {
    fn new(path: &Path, columns: &[String], layout: &Layout, options: ReadOptions) -> Result<ColumnMap> {
        let find = |name: &str| -> Result<usize> {
            columns
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| Error::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.to_string(),
                    header: columns.join(","),
                })
        };
        let label = if options.require_label {
            Some(find(&layout.label)?)
        } else {
            columns.iter().position(|c| c == &layout.label)
        };
        Ok(ColumnMap {
            sparse: layout.sparse.iter().map(|s| find(&s.name)).collect::<Result<_>>()?,
            dense: layout.dense.iter().map(|d| find(&d.0)).collect::<Result<_>>()?,
            sequences: layout.sequences.iter().map(|s| find(&s.name)).collect::<Result<_>>()?,
            label,
            // GAUC's user column is needed for evaluation only.
            user: match (&layout.user, options.require_label) {
                (Some(u), true) => Some(find(u)?),
                (Some(u), false) => columns.iter().position(|c| c == u),
                (None, _) => None,
            },
            width: columns.len(),
        })
    }
}

fn parse_id(v: &str) -> std::result::Result<u32, &'static str> {
    let id: u64 = v.parse().map_err(|_| "not a non-negative integer id")?;
    u32::try_from(id).map_err(|_| "id too large (at most 4294967295)")
}

/// The positions of a history of `len` ids that are kept: at most
/// `max_len`, at the end that `truncation` names (the file's `order` says
/// which end is recent).
pub fn kept_range(slot: &SequenceSlot, len: usize) -> std::ops::Range<usize> {
    if len <= slot.max_len {
        return 0..len;
    }
    let keep_front = matches!(
        (slot.order, slot.truncation),
        (SequenceOrder::RecentFirst, Truncation::KeepRecent) | (SequenceOrder::OldestFirst, Truncation::KeepOldest)
    );
    if keep_front {
        0..slot.max_len
    } else {
        len - slot.max_len..len
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map_or(0, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => Error::io(path, "cannot read data file", source),
        csv::ErrorKind::Utf8 { err, .. } => Error::Csv {
            path: path.to_path_buf(),
            line,
            message: format!("column {} is not valid UTF-8", err.field() + 1),
        },
        other => Error::Csv {
            path: path.to_path_buf(),
            line,
            message: format!("{other:?}"),
        },
    }
}
