//! Parquet and Arrow IPC input (issue 14): the same rows as the delimited
//! file give the same dataset and train the same model bitwise; bad
//! columns and values are errors naming the row, the column and the value.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::types::Int64Type;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray, RecordBatch,
    StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use din::data::{read_dataset, Dataset, ReadOptions};
use din::model::Module;
use din::schema::Config;
use din::train::{fit, load_training_data, Silent};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tempfile::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The bundled tutorial config, reading `data`.
fn tutorial(data: &Path) -> Config {
    let mut c = Config::from_toml_file(&root().join("configs/movie_sample.toml")).unwrap();
    c.data.train = Some(data.to_path_buf());
    c
}

/// The tutorial sample's columns, as written in the file.
struct Sample {
    ints: Vec<(&'static str, Vec<i64>)>,
    hist: Vec<Vec<i64>>,
    hist_len: Vec<f32>,
    label: Vec<i64>,
}

fn sample() -> Sample {
    let text = std::fs::read_to_string(root().join("data/movie_sample.txt")).unwrap();
    let names = ["user_id", "gender", "age", "movie_id", "movie_type_id"];
    let cols = [0, 1, 2, 5, 6];
    let mut s = Sample {
        ints: names.iter().map(|n| (*n, Vec::new())).collect(),
        hist: Vec::new(),
        hist_len: Vec::new(),
        label: Vec::new(),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        for (k, &c) in cols.iter().enumerate() {
            s.ints[k].1.push(f[c].parse().unwrap());
        }
        s.hist.push(f[3].split(',').map(|v| v.parse().unwrap()).collect());
        s.hist_len.push(f[4].parse().unwrap());
        s.label.push(f[7].parse().unwrap());
    }
    s
}

/// The sample as a record batch: ids as int64, the history as
/// `list<int64>` (its 0 padding kept, as in the file) or as the file's
/// string, `hist_len` as float32, the label as int64.
fn record_batch(s: &Sample, history_as_string: bool) -> RecordBatch {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (name, v) in &s.ints {
        fields.push(Field::new(*name, DataType::Int64, false));
        arrays.push(Arc::new(Int64Array::from(v.clone())));
    }
    if history_as_string {
        let text: Vec<String> = s
            .hist
            .iter()
            .map(|h| h.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
            .collect();
        fields.push(Field::new("hist_movie_id", DataType::Utf8, false));
        arrays.push(Arc::new(StringArray::from(text)));
    } else {
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(
            s.hist
                .iter()
                .map(|h| Some(h.iter().map(|&v| Some(v)).collect::<Vec<_>>())),
        );
        fields.push(Field::new("hist_movie_id", list.data_type().clone(), true));
        arrays.push(Arc::new(list));
    }
    fields.push(Field::new("hist_len", DataType::Float32, false));
    arrays.push(Arc::new(Float32Array::from(s.hist_len.clone())));
    fields.push(Field::new("label", DataType::Int64, false));
    arrays.push(Arc::new(Int64Array::from(s.label.clone())));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

/// Writes `batch` as Parquet in row groups of `group_rows` rows.
fn write_parquet(path: &Path, batch: &RecordBatch, group_rows: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group_rows))
        .build();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn write_arrow(path: &Path, batch: &RecordBatch, stream: bool) {
    let f = File::create(path).unwrap();
    if stream {
        let mut w = arrow_ipc::writer::StreamWriter::try_new(f, &batch.schema()).unwrap();
        w.write(&batch.slice(0, 500)).unwrap();
        w.write(&batch.slice(500, batch.num_rows() - 500)).unwrap();
        w.finish().unwrap();
    } else {
        let mut w = arrow_ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
        w.write(batch).unwrap();
        w.finish().unwrap();
    }
}

fn read(path: &Path, config: &Config) -> din::Result<Dataset> {
    let layout = config.validate().unwrap();
    read_dataset(path, config, &layout, ReadOptions::strict(true))
}

/// Everything but the line numbers (a text file's count its header and
/// blank lines; a columnar file's are row numbers).
fn same_rows(a: &Dataset, b: &Dataset, what: &str) {
    assert_eq!(a.batch, b.batch, "{what}: the same columns");
    assert_eq!(a.users, b.users, "{what}: the same GAUC users");
    assert_eq!(a.len(), 1380, "{what}");
}

#[test]
fn parquet_and_arrow_files_give_the_delimited_files_rows() {
    let tmp = TempDir::new().unwrap();
    let tsv = root().join("data/movie_sample.txt");
    let config = tutorial(&tsv);
    let want = read(&tsv, &config).unwrap();
    let s = sample();
    for (name, history_as_string) in [("list", false), ("string", true)] {
        let batch = record_batch(&s, history_as_string);
        let p = tmp.path().join(format!("{name}.parquet"));
        write_parquet(&p, &batch, 300); // 5 row groups, the last short
        same_rows(
            &read(&p, &config).unwrap(),
            &want,
            &format!("parquet, history as {name}"),
        );
        for stream in [false, true] {
            let p = tmp.path().join(format!("{name}-{stream}.arrow"));
            write_arrow(&p, &batch, stream);
            same_rows(
                &read(&p, &config).unwrap(),
                &want,
                &format!("arrow (stream {stream}), history as {name}"),
            );
        }
    }
    // A fixed_size_list history (every row of the sample is padded to 50), in Arrow IPC.
    let fixed = {
        let b = record_batch(&s, false);
        let values = Int64Array::from(s.hist.iter().flatten().copied().collect::<Vec<_>>());
        let item = Arc::new(Field::new("item", DataType::Int64, false));
        let list = arrow_array::FixedSizeListArray::try_new(item, 50, Arc::new(values), None).unwrap();
        with_array(&b, "hist_movie_id", Arc::new(list))
    };
    for stream in [false, true] {
        let p = tmp.path().join(format!("fixed-{stream}.arrow"));
        write_arrow(&p, &fixed, stream);
        same_rows(
            &read(&p, &config).unwrap(),
            &want,
            &format!("arrow (stream {stream}), fixed_size_list history"),
        );
    }
    // The format may be named instead of guessed from the extension.
    let p = tmp.path().join("samples.bin");
    write_parquet(&p, &record_batch(&s, false), 1000);
    let mut named = config.clone();
    named.input.format = din::schema::InputFormat::Parquet;
    same_rows(&read(&p, &named).unwrap(), &want, "input.format = parquet");
    assert!(read(&p, &config).is_err(), "read as text by default, and refused");
}

#[test]
fn a_parquet_file_trains_the_delimited_files_model_bitwise() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("sample.parquet");
    write_parquet(&p, &record_batch(&sample(), false), 256);
    let mut weights = Vec::new();
    for data in [root().join("data/movie_sample.txt"), p] {
        let mut config = tutorial(&data);
        config.train.epochs = 2;
        config.train.threads = 1;
        config.train.checkpoint_every = 0;
        let training = load_training_data(&config).unwrap();
        let out = fit(&training, &mut Silent).unwrap();
        let mut w = Vec::new();
        out.model.visit("", &mut |name, p| w.push((name, p.value.clone())));
        weights.push(w);
    }
    assert!(weights[0] == weights[1], "the same weights, bit for bit");
}

/// The tutorial's columns with column `name` replaced by `array`.
fn with_column(name: &str, array: ArrayRef) -> RecordBatch {
    with_array(&record_batch(&sample(), false), name, array)
}

/// `b` with column `name` replaced by `array`.
fn with_array(b: &RecordBatch, name: &str, array: ArrayRef) -> RecordBatch {
    let schema = b.schema();
    let i = schema.index_of(name).unwrap();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut arrays = b.columns().to_vec();
    fields[i] = Field::new(name, array.data_type().clone(), true);
    arrays[i] = array;
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

fn error_of(batch: &RecordBatch, skip: Option<f64>) -> String {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("bad.parquet");
    write_parquet(&p, batch, 1000);
    let config = tutorial(&p);
    let layout = config.validate().unwrap();
    let options = ReadOptions {
        require_label: true,
        skip_bad_rows: skip,
    };
    match read_dataset(&p, &config, &layout, options) {
        Ok(d) => format!("ok: {} rows, {} skipped", d.len(), d.skipped.count),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_columns_and_values_are_named() {
    let n = 1380;
    let ids = |f: &dyn Fn(usize) -> Option<i64>| -> ArrayRef {
        Arc::new(Int64Array::from((0..n).map(f).collect::<Vec<_>>()))
    };
    // A null id in row 8 (1-based), a negative id, a fractional id.
    let e = error_of(
        &with_column("movie_id", ids(&|i| if i == 7 { None } else { Some(1) })),
        None,
    );
    assert!(e.contains(":8:") && e.contains("movie_id") && e.contains("null"), "{e}");
    let e = error_of(
        &with_column("gender", ids(&|i| Some(if i == 3 { -2 } else { 1 }))),
        None,
    );
    assert!(e.contains(":4:") && e.contains("gender") && e.contains("-2"), "{e}");
    let floats: ArrayRef = Arc::new(Float64Array::from(
        (0..n).map(|i| if i == 9 { 2.5 } else { 1.0 }).collect::<Vec<_>>(),
    ));
    let e = error_of(&with_column("age", floats), None);
    assert!(e.contains(":10:") && e.contains("age") && e.contains("2.5"), "{e}");
    // A null inside a history; a null history is an empty one.
    let hist = |null_at: usize, null_list: bool| -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>((0..n).map(
            |i| match (i == null_at, null_list) {
                (true, true) => None,
                (true, false) => Some(vec![Some(3), None]),
                _ => Some(vec![Some(5), Some(0)]),
            },
        )))
    };
    let e = error_of(&with_column("hist_movie_id", hist(4, false)), None);
    assert!(
        e.contains(":5:") && e.contains("hist_movie_id") && e.contains("null"),
        "{e}"
    );
    assert_eq!(
        error_of(&with_column("hist_movie_id", hist(4, true)), None),
        "ok: 1380 rows, 0 skipped"
    );
    // A negative id, and one past 32 bits, in a history of integers.
    let bad_hist = |v: i64| -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
            (0..n).map(|i| Some(if i == 6 { vec![Some(4), Some(v)] } else { vec![Some(5)] })),
        ))
    };
    let e = error_of(&with_column("hist_movie_id", bad_hist(-7)), None);
    assert!(
        e.contains(":7:") && e.contains("hist_movie_id") && e.contains("-7"),
        "{e}"
    );
    let e = error_of(&with_column("hist_movie_id", bad_hist(1 << 33)), None);
    assert!(e.contains(":7:") && e.contains("too large"), "{e}");
    assert_eq!(
        error_of(&with_column("hist_movie_id", bad_hist(3)), None),
        "ok: 1380 rows, 0 skipped"
    );
    // Labels: null, 2, a boolean column.
    let e = error_of(
        &with_column("label", ids(&|i| if i == 0 { None } else { Some(0) })),
        None,
    );
    assert!(e.contains(":1:") && e.contains("label"), "{e}");
    let e = error_of(&with_column("label", ids(&|i| Some(if i == 2 { 2 } else { 0 }))), None);
    assert!(e.contains(":3:") && e.contains("label must be 0 or 1"), "{e}");
    let bools: ArrayRef = Arc::new(BooleanArray::from((0..n).map(|i| i % 2 == 0).collect::<Vec<_>>()));
    assert_eq!(error_of(&with_column("label", bools), None), "ok: 1380 rows, 0 skipped");
    // A type that cannot hold ids; a list where one id is expected; a scalar history.
    let binary: ArrayRef = Arc::new(arrow_array::BinaryArray::from_iter_values(
        (0..n).map(|_| b"x".as_slice()),
    ));
    let e = error_of(&with_column("movie_id", binary), None);
    assert!(
        e.contains("movie_id") && e.contains("Binary") && e.contains("column type"),
        "{e}"
    );
    let e = error_of(&with_column("movie_id", hist(usize::MAX, false)), None);
    assert!(e.contains("movie_id") && e.contains("not a list"), "{e}");
    let e = error_of(
        &with_column("hist_movie_id", Arc::new(Int32Array::from(vec![1; n]))),
        None,
    );
    assert!(e.contains("hist_movie_id") && e.contains("list column"), "{e}");
    // A missing column names it and the file's columns.
    let b = record_batch(&sample(), false);
    let i = b.schema().index_of("movie_type_id").unwrap();
    let mut b2 = b.clone();
    b2.remove_column(i);
    let e = error_of(&b2, None);
    assert!(e.contains("movie_type_id") && e.contains("user_id,gender"), "{e}");
    // skip_bad_rows skips malformed rows as it does text lines.
    let e = error_of(
        &with_column("movie_id", ids(&|i| if i % 100 == 0 { None } else { Some(1) })),
        Some(0.05),
    );
    assert_eq!(e, "ok: 1366 rows, 14 skipped");
}

#[test]
fn grouped_lines_are_refused_and_data_group_finds_groups_in_parquet() {
    let tmp = TempDir::new().unwrap();
    let p = tmp.path().join("sample.parquet");
    write_parquet(&p, &record_batch(&sample(), false), 256);
    let mut config = tutorial(&p);
    config.input.layout = din::schema::InputLayout::Grouped;
    let e = read(&p, &config).unwrap_err().to_string();
    assert!(e.contains("input.layout") && e.contains("data.group"), "{e}");
    let tsv = root().join("data/movie_sample.txt");
    let mut config = tutorial(&tsv);
    config.data.group = true;
    let want = read(&tsv, &config).unwrap();
    assert!(want.batch.is_grouped());
    same_rows(&read(&p, &config).unwrap(), &want, "grouped on reading");
}

#[test]
fn row_ranges_of_text_parquet_and_arrow_files_are_the_whole_files_rows() {
    // Distributed training's shards: records 0..460, 460..920, 920..1380
    // (Parquet row groups of 300: ranges inside and across groups; the
    // Arrow stream's record batches of 500 and 880), each the rows the
    // whole file holds there, with the file's line or row numbers.
    use din::data::{count_rows, read_rows};
    let tmp = TempDir::new().unwrap();
    let tsv = root().join("data/movie_sample.txt");
    let config = tutorial(&tsv);
    let layout = config.validate().unwrap();
    let batch = record_batch(&sample(), false);
    let (pq, arrow) = (tmp.path().join("s.parquet"), tmp.path().join("s.arrows"));
    write_parquet(&pq, &batch, 300);
    write_arrow(&arrow, &batch, true);
    for path in [tsv.clone(), pq, arrow] {
        let whole = read(&path, &config).unwrap();
        assert_eq!(count_rows(&path, &config).unwrap(), 1380, "{}", path.display());
        for (lo, hi) in [(0u64, 460u64), (460, 920), (920, 1380), (299, 301), (1379, 1380)] {
            let part = read_rows(&path, &config, &layout, ReadOptions::strict(true), lo..hi).unwrap();
            let rows: Vec<usize> = (lo as usize..hi as usize).collect();
            let want = whole.select(&rows);
            let what = format!("{} rows {lo}..{hi}", path.display());
            assert_eq!(part.batch, want.batch, "{what}");
            assert_eq!(part.lines, want.lines, "{what}: line numbers");
        }
    }
}
