//! Parquet and Arrow IPC input: one column per feature, read record batch
//! by record batch into the rows the delimited reader makes.
//!
//! Column types, by the feature that reads them:
//! * sparse ids and the label: any integer column, or a string column of
//!   integers (a float column too, when every value is integral); the
//!   label is 0 or 1 (a boolean column is fine);
//! * dense values: a number column (dimension 1), or a list of `dim`
//!   numbers, or a string of `dim` numbers joined by
//!   `input.sequence_separator`;
//! * histories: a list column of integers (`list<int64>`, `large_list`,
//!   `fixed_size_list`), or a string of ids joined by
//!   `input.sequence_separator`; 0 is padding, a null list is an empty
//!   history;
//! * the user (for GAUC and groups): any integer or string column.
//!
//! A null id, label or value is an error naming the file, the row (1-based
//! over the file), the column and the problem; with `skip_bad_rows` such a
//! row is skipped as a malformed text line is. A missing column or a type
//! that cannot hold the feature is an error for the whole file.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::reader::{user_key, Builder, Row, Sink};
use super::{Dataset, ReadOptions, SkippedRows};
use crate::schema::{Config, InputFormat, InputLayout, Layout};
use crate::{Error, Result};

/// Rows per record batch asked of the Parquet reader.
const BATCH_ROWS: usize = 8192;

/// Reads a Parquet or Arrow IPC file (see the module docs) into `sink`, in
/// windows of about `window` rows (`None`: the whole file at once); only
/// rows `range` (0-based) when given: the record batches before it are
/// skipped unread (Parquet: the row groups before it are not decoded), and
/// the reading stops after it.
pub(super) fn read(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    window: Option<usize>,
    range: Option<std::ops::Range<u64>>,
    sink: &mut Sink<'_>,
) -> Result<Option<SkippedRows>> {
    if config.input.layout == InputLayout::Grouped {
        return Err(Error::config(
            "input.layout",
            "grouped",
            format!(
                "grouped lines are a delimited-text layout; {} is columnar: one sample per row, with data.group = true to store a user's consecutive rows once",
                path.display()
            ),
        ));
    }
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open data file", e))?;
    let names = wanted_columns(layout, options);
    let mut read_all =
        |columns: &[String],
         sizes: (usize, Vec<usize>),
         first_row: u64,
         batches: &mut dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>| {
            let rows = Rows {
                window,
                range: range.clone(),
                first_row,
            };
            read_batches(path, config, layout, options, rows, columns, sizes, batches, sink)
        };
    let names_of =
        |schema: &arrow_schema::Schema| -> Vec<String> { schema.fields().iter().map(|f| f.name().clone()).collect() };
    match config.input.format.of(path) {
        InputFormat::Parquet => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(path, e))?;
            let columns = names_of(builder.schema());
            let roots = roots(path, &columns, &names)?;
            let rows = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
            let sizes = (
                rows,
                history_values(layout, builder.parquet_schema(), builder.metadata()),
            );
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            // Row groups wholly before or after the range are not decoded;
            // the reader's row numbers start after those skipped.
            let (mut kept_groups, mut first_row) = (Vec::new(), 0u64);
            let mut at = 0u64;
            for (i, g) in builder.metadata().row_groups().iter().enumerate() {
                let n = u64::try_from(g.num_rows()).unwrap_or(0);
                let inside = range.as_ref().is_none_or(|r| at < r.end && at + n > r.start);
                if inside {
                    kept_groups.push(i);
                } else if kept_groups.is_empty() {
                    first_row += n;
                }
                at += n;
            }
            let mut batches = builder
                .with_row_groups(kept_groups)
                .with_projection(mask)
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| parquet_error(path, e))?;
            read_all(&columns, sizes, first_row, &mut batches)
        }
        _ => {
            let (schema, mut batches) = ipc_batches(path, file)?;
            let columns = names_of(&schema);
            roots(path, &columns, &names)?;
            read_all(&columns, (0, Vec::new()), 0, &mut batches)
        }
    }
}

/// An Arrow error reading `path`.
fn arrow_error(path: &Path, e: ArrowError) -> Error {
    Error::Csv {
        path: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the Arrow data: {e}"),
    }
}

/// The record batches of an Arrow IPC file, file or stream format
/// (told apart by the file format's leading "ARROW1"), and their schema.
#[allow(clippy::type_complexity)]
fn ipc_batches(
    path: &Path,
    mut file: File,
) -> Result<(
    arrow_schema::SchemaRef,
    Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>>,
)> {
    let arrow = |e: ArrowError| arrow_error(path, e);
    let mut magic = [0u8; 6];
    let is_file = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, "cannot read data file", e))?;
    let file = BufReader::new(file);
    Ok(if is_file {
        let r = arrow_ipc::reader::FileReader::try_new(file, None).map_err(arrow)?;
        (r.schema(), Box::new(r))
    } else {
        let r = arrow_ipc::reader::StreamReader::try_new(file, None).map_err(arrow)?;
        (r.schema(), Box::new(r))
    })
}

/// The rows of a Parquet file (from its metadata) or an Arrow IPC file.
pub(super) fn count_rows(path: &Path, config: &Config) -> Result<u64> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open data file", e))?;
    if config.input.format.of(path) == InputFormat::Parquet {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_error(path, e))?;
        return Ok(u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0));
    }
    let mut rows = 0u64;
    for batch in ipc_batches(path, file)?.1 {
        rows += batch.map_err(|e| arrow_error(path, e))?.num_rows() as u64;
    }
    Ok(rows)
}

/// Reads record batches that are already in memory (an application's
/// arrays, e.g. those the Python module is given) into a [`Dataset`], as
/// the record batches of a Parquet or Arrow file named `source` would be
/// read: the columns the schema reads (by name; others are ignored), with
/// the types and checks of the module docs. Errors name `source`, the row
/// (1-based over all the batches), the column and the value. Ids are not
/// checked against the tables here ([`apply_vocab`](super::apply_vocab)
/// does that, as after [`read_dataset`](super::read_dataset)).
pub fn read_record_batches(
    source: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    batches: &[RecordBatch],
) -> Result<Dataset> {
    let columns: Vec<String> = batches.first().map_or_else(Vec::new, |b| {
        b.schema().fields().iter().map(|f| f.name().clone()).collect()
    });
    roots(source, &columns, &wanted_columns(layout, options))?;
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    let mut whole = None;
    let skipped = read_batches(
        source,
        config,
        layout,
        options,
        Rows {
            window: None,
            range: None,
            first_row: 0,
        },
        &columns,
        (rows, Vec::new()),
        &mut batches.iter().cloned().map(Ok),
        &mut |d| {
            whole = Some(d);
            Ok(true)
        },
    )?;
    let mut data = whole.ok_or_else(|| Error::EmptyFile {
        path: source.to_path_buf(),
    })?;
    data.skipped = skipped.unwrap_or_default();
    Ok(data)
}

/// Which rows [`read_batches`] reads, and how it hands them on.
struct Rows {
    /// Windows of about this many rows (`None`: one).
    window: Option<usize>,
    /// Only these rows (0-based over the file), when given.
    range: Option<std::ops::Range<u64>>,
    /// The file's row number of the first batch's first row (row groups
    /// skipped unread before it).
    first_row: u64,
}

/// Every record batch of `path` (named `columns`) into `sink`, as `rows`
/// says; with GAUC's users when the batches have the user column, and a
/// whole file's columns sized up front for `sizes` (rows, values per
/// history) when known.
#[allow(clippy::too_many_arguments)]
fn read_batches(
    path: &Path,
    config: &Config,
    layout: &Layout,
    options: ReadOptions,
    rows: Rows,
    columns: &[String],
    (count, history_values): (usize, Vec<usize>),
    batches: &mut dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>>,
    sink: &mut Sink<'_>,
) -> Result<Option<SkippedRows>> {
    let sep = config.input.separator_byte()? as char;
    let group = config.data.group;
    let mut reader = ColumnReader::new(path, layout, options, sep);
    reader.offset = rows.first_row;
    let with_users = layout.user.as_ref().is_some_and(|u| columns.contains(u));
    let mut out = Builder::new(path, layout, group, false, with_users);
    out.window = rows.window;
    if rows.window.is_none() && rows.range.is_none() {
        // Grouped rows store a group's history once: fewer values.
        out.reserve_rows(count, if group { &[] } else { &history_values });
    }
    let (start, end) = rows.range.as_ref().map_or((0, u64::MAX), |r| (r.start, r.end));
    for batch in batches {
        let batch = batch.map_err(|e| arrow_error(path, e))?;
        // The part of this record batch inside the range.
        let first = reader.offset;
        let (lo, hi) = (start.max(first), end.min(first + batch.num_rows() as u64));
        if lo >= hi {
            reader.offset += batch.num_rows() as u64;
            if first >= end {
                break;
            }
            continue;
        }
        let part = batch.slice((lo - first) as usize, (hi - lo) as usize);
        reader.offset = lo;
        reader.add(&part, &mut out)?;
        reader.offset = first + batch.num_rows() as u64;
        if !out.drain(sink)? {
            return Ok(None);
        }
    }
    out.finish(options, sink)
}

/// Per history, the values its Parquet column holds over the file (an
/// upper bound on the ids read: a leaf count, which counts an empty list
/// once, before truncation and padding are dropped); 0 for a history
/// without a column.
fn history_values(
    layout: &Layout,
    schema: &parquet::schema::types::SchemaDescriptor,
    metadata: &parquet::file::metadata::ParquetMetaData,
) -> Vec<usize> {
    layout
        .sequences
        .iter()
        .map(|s| {
            (0..schema.num_columns())
                .filter(|&c| schema.column(c).path().parts().first() == Some(&s.name))
                .flat_map(|c| metadata.row_groups().iter().map(move |g| g.column(c).num_values()))
                .map(|n| usize::try_from(n).unwrap_or(0))
                .sum()
        })
        .collect()
}

fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::Csv {
        path: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the Parquet file: {e}"),
    }
}

/// The columns the schema reads (the label and the user only when present
/// and needed, as for delimited files).
fn wanted_columns(layout: &Layout, options: ReadOptions) -> Vec<(String, bool)> {
    let mut names: Vec<(String, bool)> = layout.sparse.iter().map(|s| (s.name.clone(), true)).collect();
    names.extend(layout.dense.iter().map(|d| (d.0.clone(), true)));
    names.extend(layout.sequences.iter().map(|s| (s.name.clone(), true)));
    names.push((layout.label.clone(), options.require_label));
    if let Some(u) = &layout.user {
        names.push((u.clone(), options.require_label));
    }
    names
}

/// The indices of the wanted columns that `columns` has; a required one
/// that is missing is an error.
fn roots(path: &Path, columns: &[String], names: &[(String, bool)]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (name, required) in names {
        match columns.iter().position(|c| c == name) {
            Some(i) => out.push(i),
            None if *required => {
                return Err(Error::MissingColumn {
                    path: path.to_path_buf(),
                    column: name.clone(),
                    header: columns.join(","),
                })
            }
            None => {}
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// One value as read: a number, a null, or text that is not a number.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Num(f64),
    Null,
    Text(String),
}

/// A column of one record batch: one cell per row, or a list of values per
/// row, stored flat: row `r`'s are `values[offsets[r]..offsets[r + 1]]`
/// (`valid[r]` false: a null list, when `valid` is not empty).
enum Column {
    Scalars(Vec<Cell>),
    Lists {
        values: Values,
        offsets: Vec<usize>,
        valid: Vec<bool>,
    },
}

/// The values of a list column: cells, or (a column of integers, none null
/// or outside 0..=u32::MAX, the usual history) the ids themselves, read
/// without a cell per value.
enum Values {
    Cells(Vec<Cell>),
    Ids(Vec<u32>),
}

impl Column {
    /// Row `r`'s list: its values, or `None` for a null list (or a scalar column).
    fn list(&self, r: usize) -> Option<(&Values, std::ops::Range<usize>)> {
        match self {
            Column::Scalars(_) => None,
            Column::Lists { values, offsets, valid } => {
                (valid.is_empty() || valid[r]).then(|| (values, offsets[r]..offsets[r + 1]))
            }
        }
    }
}

/// Reads the record batches of one file into a [`Builder`].
struct ColumnReader<'a> {
    path: &'a Path,
    layout: &'a Layout,
    options: ReadOptions,
    sep: char,
    row: Row,
    pair_histories: Vec<usize>,
    /// Rows read before this record batch.
    offset: u64,
}

impl<'a> ColumnReader<'a> {
    fn new(path: &'a Path, layout: &'a Layout, options: ReadOptions, sep: char) -> Self {
        ColumnReader {
            path,
            layout,
            options,
            sep,
            row: Row::new(layout),
            pair_histories: layout.pairs.iter().map(|&(_, h)| h).collect(),
            offset: 0,
        }
    }

    /// The column `name` of `batch` as cells; `split`: whether a string
    /// column holds several values joined by the separator. A type that
    /// cannot hold numbers is an error naming the column and the type.
    fn column(&self, batch: &RecordBatch, name: &str, split: bool) -> Result<Option<Column>> {
        let Some(a) = batch.column_by_name(name) else {
            return Ok(None);
        };
        let bad_type = |dt: &DataType| Error::Parse {
            path: self.path.to_path_buf(),
            line: self.offset + 1,
            column: name.to_string(),
            value: format!("{dt}"),
            reason: "this column type cannot hold din's values (want integers, floats, strings, or a list of them)"
                .into(),
        };
        if let Some(cells) = scalars(a.as_ref()) {
            if split && matches!(a.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                let (mut values, mut offsets, mut valid) = (Vec::new(), vec![0], Vec::with_capacity(cells.len()));
                for c in cells {
                    valid.push(c != Cell::Null);
                    match c {
                        Cell::Null => {}
                        Cell::Num(x) => values.push(Cell::Num(x)),
                        Cell::Text(t) => values.extend(
                            t.split(self.sep)
                                .map(str::trim)
                                .filter(|p| !p.is_empty())
                                .map(|p| p.parse::<f64>().map_or_else(|_| Cell::Text(p.to_string()), Cell::Num)),
                        ),
                    }
                    offsets.push(values.len());
                }
                return Ok(Some(Column::Lists {
                    values: Values::Cells(values),
                    offsets,
                    valid,
                }));
            }
            return Ok(Some(Column::Scalars(cells)));
        }
        let (values, offsets): (&dyn Array, Vec<usize>) = match a.data_type() {
            DataType::List(_) => {
                let l = a.as_list::<i32>();
                (
                    l.values().as_ref(),
                    l.value_offsets().iter().map(|&o| o as usize).collect(),
                )
            }
            DataType::LargeList(_) => {
                let l = a.as_list::<i64>();
                (
                    l.values().as_ref(),
                    l.value_offsets().iter().map(|&o| o as usize).collect(),
                )
            }
            DataType::FixedSizeList(_, n) => {
                let l = a.as_fixed_size_list();
                let (n, start) = (*n as usize, l.value_offset_at(0));
                (l.values().as_ref(), (0..=a.len()).map(|i| start + i * n).collect())
            }
            dt => return Err(bad_type(dt)),
        };
        // Offsets relative to the child values used (a sliced list starts
        // past the child's first value).
        let (first, last) = (offsets[0], offsets[offsets.len() - 1]);
        let child = values.slice(first, last - first);
        let values = match ids(child.as_ref()) {
            Some(ids) => Values::Ids(ids),
            None => Values::Cells(scalars(child.as_ref()).ok_or_else(|| bad_type(a.data_type()))?),
        };
        let valid = match a.null_count() {
            0 => Vec::new(),
            _ => (0..a.len()).map(|i| !a.is_null(i)).collect(),
        };
        let offsets = offsets.iter().map(|&o| o - first).collect();
        Ok(Some(Column::Lists { values, offsets, valid }))
    }

    /// Adds every row of `batch`.
    fn add(&mut self, batch: &RecordBatch, rows: &mut Builder<'_>) -> Result<()> {
        let l = self.layout;
        let need = |c: Option<Column>, name: &str| {
            c.ok_or_else(|| Error::MissingColumn {
                path: self.path.to_path_buf(),
                column: name.to_string(),
                header: batch
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            })
        };
        let mut sparse = Vec::with_capacity(l.sparse.len());
        for s in &l.sparse {
            sparse.push(need(self.column(batch, &s.name, false)?, &s.name)?);
        }
        let mut dense = Vec::with_capacity(l.dense.len());
        for (name, dim) in &l.dense {
            dense.push(need(self.column(batch, name, *dim > 1)?, name)?);
        }
        let mut sequences = Vec::with_capacity(l.sequences.len());
        for s in &l.sequences {
            sequences.push(need(self.column(batch, &s.name, true)?, &s.name)?);
        }
        let label = if self.options.require_label {
            Some(need(self.column(batch, &l.label, false)?, &l.label)?)
        } else {
            None
        };
        let users = match &l.user {
            Some(u) => batch
                .column_by_name(u)
                .map(|a| user_keys(a.as_ref()))
                .transpose()
                .map_err(|dt| Error::Parse {
                    path: self.path.to_path_buf(),
                    line: self.offset + 1,
                    column: u.clone(),
                    value: dt,
                    reason: "a user column must hold integers or strings".into(),
                })?,
            None => None,
        };
        for r in 0..batch.num_rows() {
            let line = self.offset + r as u64 + 1;
            match self.parse(r, line, &sparse, &dense, &sequences, label.as_ref()) {
                Ok(()) => {}
                Err(e @ Error::Parse { .. }) if self.options.skip_bad_rows.is_some() => {
                    rows.skip(line, &e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let user = match (&users, &l.user) {
                (Some(u), Some(name)) => match u[r] {
                    Some(key) => Some(key),
                    None => {
                        let e = Error::Parse {
                            path: self.path.to_path_buf(),
                            line,
                            column: name.clone(),
                            value: "null".into(),
                            reason: "a null user (GAUC and groups need every row's user)".into(),
                        };
                        if self.options.skip_bad_rows.is_none() {
                            return Err(e);
                        }
                        rows.skip(line, &e);
                        continue;
                    }
                },
                _ => None,
            };
            rows.push(&self.row, user, line)?;
        }
        self.offset += batch.num_rows() as u64;
        Ok(())
    }

    /// Parses row `r` of the batch's columns into `self.row`.
    fn parse(
        &mut self,
        r: usize,
        line: u64,
        sparse: &[Column],
        dense: &[Column],
        sequences: &[Column],
        label: Option<&Column>,
    ) -> Result<()> {
        let (l, path) = (self.layout, self.path);
        let bad = |column: &str, value: &Cell, reason: &str| Error::Parse {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
            value: match value {
                Cell::Num(x) => x.to_string(),
                Cell::Null => "null".into(),
                Cell::Text(t) => t.clone(),
            },
            reason: reason.to_string(),
        };
        let row = &mut self.row;
        row.candidates = 1;
        for (f, c) in sparse.iter().enumerate() {
            let name = &l.sparse[f].name;
            let Column::Scalars(cells) = c else {
                return Err(bad(
                    name,
                    &Cell::Text("a list".into()),
                    "a sparse feature holds one id per row, not a list",
                ));
            };
            let id = as_id(&cells[r]).map_err(|reason| bad(name, &cells[r], reason))?;
            row.sparse[f].clear();
            row.sparse[f].push(id);
        }
        for (f, c) in dense.iter().enumerate() {
            let (name, dim) = (&l.dense[f].0, l.dense[f].1);
            let out = &mut row.dense[f];
            out.clear();
            let cells: &[Cell] = match (c, c.list(r)) {
                (Column::Scalars(cells), _) => std::slice::from_ref(&cells[r]),
                (_, Some((Values::Cells(cells), range))) => &cells[range],
                (_, Some((Values::Ids(ids), range))) => {
                    // Integers of at most 32 bits: exact in f64, rounded once to f32.
                    out.extend(ids[range].iter().map(|&v| f64::from(v) as f32));
                    &[]
                }
                (_, None) => return Err(bad(name, &Cell::Null, "a dense value may not be null")),
            };
            for cell in cells {
                let x = match cell {
                    Cell::Num(x) if x.is_finite() => *x as f32,
                    Cell::Num(_) => return Err(bad(name, cell, "not a finite number")),
                    Cell::Null => return Err(bad(name, cell, "a dense value may not be null")),
                    Cell::Text(_) => return Err(bad(name, cell, "not a number")),
                };
                out.push(x);
            }
            if out.len() != dim {
                let reason = format!("expected {dim} values, found {}", out.len());
                return Err(bad(name, &Cell::Num(out.len() as f64), &reason));
            }
        }
        for (f, c) in sequences.iter().enumerate() {
            let name = &l.sequences[f].name;
            if let Column::Scalars(_) = c {
                return Err(bad(
                    name,
                    &Cell::Text("a scalar column".into()),
                    "a history is a list column or a string of ids joined by input.sequence_separator",
                ));
            }
            let raw = &mut row.raw[f];
            raw.clear();
            match c.list(r) {
                None => {} // a null list: an empty history
                Some((Values::Ids(ids), range)) => raw.extend_from_slice(&ids[range]),
                Some((Values::Cells(cells), range)) => {
                    for cell in &cells[range] {
                        raw.push(as_id(cell).map_err(|reason| bad(name, cell, reason))?);
                    }
                }
            }
        }
        row.keep_histories(l, &self.pair_histories, |h, reason| {
            bad(
                &l.sequences[h].name,
                &Cell::Text(format!("{} ids", row_len(sequences, h, r))),
                reason,
            )
        })?;
        let row = &mut self.row;
        row.labels.clear();
        if let Some(c) = label {
            let Column::Scalars(cells) = c else {
                return Err(bad(
                    &l.label,
                    &Cell::Text("a list".into()),
                    "the label holds one value per row",
                ));
            };
            match &cells[r] {
                Cell::Num(y) if *y == 0.0 || *y == 1.0 => row.labels.push(*y as f32),
                cell => return Err(bad(&l.label, cell, "label must be 0 or 1")),
            }
        }
        Ok(())
    }
}

/// The number of ids of row `r` of sequence column `h`.
fn row_len(sequences: &[Column], h: usize, r: usize) -> usize {
    match &sequences[h] {
        c @ Column::Lists { .. } => c.list(r).map_or(0, |(_, range)| range.len()),
        Column::Scalars(_) => 1,
    }
}

/// An id: a non-negative integer that fits in 32 bits.
fn as_id(cell: &Cell) -> std::result::Result<u32, &'static str> {
    match cell {
        Cell::Num(x) if *x >= 0.0 && x.fract() == 0.0 && *x <= f64::from(u32::MAX) => Ok(*x as u32),
        Cell::Num(x) if *x > f64::from(u32::MAX) && x.fract() == 0.0 => Err("id too large (at most 4294967295)"),
        Cell::Num(_) | Cell::Text(_) => Err("not a non-negative integer id"),
        Cell::Null => Err("a null id (a history's padding is 0; a missing value needs an id of its own)"),
    }
}

/// The values of an integer column as ids, when every one is one (not null,
/// in 0..=u32::MAX); `None` otherwise (then read as cells, which name the
/// bad value).
fn ids(a: &dyn Array) -> Option<Vec<u32>> {
    fn convert<T: arrow_array::ArrowPrimitiveType>(a: &dyn Array) -> Option<Vec<u32>>
    where
        T::Native: TryInto<u32>,
    {
        let p = a.as_primitive::<T>();
        p.values().iter().map(|&v| v.try_into().ok()).collect()
    }
    if a.null_count() > 0 {
        return None;
    }
    match a.data_type() {
        DataType::Int8 => convert::<Int8Type>(a),
        DataType::Int16 => convert::<Int16Type>(a),
        DataType::Int32 => convert::<Int32Type>(a),
        DataType::Int64 => convert::<Int64Type>(a),
        DataType::UInt8 => convert::<UInt8Type>(a),
        DataType::UInt16 => convert::<UInt16Type>(a),
        DataType::UInt32 => convert::<UInt32Type>(a),
        DataType::UInt64 => convert::<UInt64Type>(a),
        _ => None,
    }
}

/// The values of a column of numbers, booleans or strings (strings parsed
/// as numbers where they are numbers); `None` for any other type.
fn scalars(a: &dyn Array) -> Option<Vec<Cell>> {
    fn prim<T: arrow_array::ArrowPrimitiveType>(a: &dyn Array, f: impl Fn(T::Native) -> f64) -> Vec<Cell> {
        let p = a.as_primitive::<T>();
        (0..p.len())
            .map(|i| {
                if p.is_null(i) {
                    Cell::Null
                } else {
                    Cell::Num(f(p.value(i)))
                }
            })
            .collect()
    }
    let text = |s: Option<&str>| match s {
        None => Cell::Null,
        Some(t) => t
            .trim()
            .parse::<f64>()
            .map_or_else(|_| Cell::Text(t.to_string()), Cell::Num),
    };
    Some(match a.data_type() {
        DataType::Int8 => prim::<Int8Type>(a, f64::from),
        DataType::Int16 => prim::<Int16Type>(a, f64::from),
        DataType::Int32 => prim::<Int32Type>(a, f64::from),
        DataType::Int64 => prim::<Int64Type>(a, |v| v as f64),
        DataType::UInt8 => prim::<UInt8Type>(a, f64::from),
        DataType::UInt16 => prim::<UInt16Type>(a, f64::from),
        DataType::UInt32 => prim::<UInt32Type>(a, f64::from),
        DataType::UInt64 => prim::<UInt64Type>(a, |v| v as f64),
        DataType::Float32 => prim::<Float32Type>(a, f64::from),
        DataType::Float64 => prim::<Float64Type>(a, |v| v),
        DataType::Boolean => {
            let b = a.as_boolean();
            (0..b.len())
                .map(|i| {
                    if b.is_null(i) {
                        Cell::Null
                    } else {
                        Cell::Num(f64::from(u8::from(b.value(i))))
                    }
                })
                .collect()
        }
        DataType::Utf8 => a.as_string::<i32>().iter().map(text).collect(),
        DataType::LargeUtf8 => a.as_string::<i64>().iter().map(text).collect(),
        DataType::Utf8View => a.as_string_view().iter().map(text).collect(),
        _ => return None,
    })
}

/// The [`user_key`] of each row's user (`None` for a null), hashing the
/// value as text so that a Parquet file and a delimited one with the same
/// users give the same GAUC groups; `Err(type)` for a column of another type.
fn user_keys(a: &dyn Array) -> std::result::Result<Vec<Option<u64>>, String> {
    fn ints<T: arrow_array::ArrowPrimitiveType>(a: &dyn Array) -> Vec<Option<u64>>
    where
        T::Native: std::fmt::Display,
    {
        use std::fmt::Write;
        let mut text = String::new(); // one buffer for the whole column
        a.as_primitive::<T>()
            .iter()
            .map(|v| {
                v.map(|v| {
                    text.clear();
                    let _ = write!(text, "{v}");
                    user_key(&text)
                })
            })
            .collect()
    }
    Ok(match a.data_type() {
        DataType::Int8 => ints::<Int8Type>(a),
        DataType::Int16 => ints::<Int16Type>(a),
        DataType::Int32 => ints::<Int32Type>(a),
        DataType::Int64 => ints::<Int64Type>(a),
        DataType::UInt8 => ints::<UInt8Type>(a),
        DataType::UInt16 => ints::<UInt16Type>(a),
        DataType::UInt32 => ints::<UInt32Type>(a),
        DataType::UInt64 => ints::<UInt64Type>(a),
        DataType::Utf8 => a
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(|s| user_key(s.trim())))
            .collect(),
        DataType::LargeUtf8 => a
            .as_string::<i64>()
            .iter()
            .map(|v| v.map(|s| user_key(s.trim())))
            .collect(),
        DataType::Utf8View => a
            .as_string_view()
            .iter()
            .map(|v| v.map(|s| user_key(s.trim())))
            .collect(),
        dt => return Err(format!("{dt}")),
    })
}
