//! Training from arrays and in steps (what the Python module does):
//! `read_record_batches` + `training_data_from` read what the delimited
//! reader reads; `fit_continuing` from `Start::new` is `fit`, and two calls
//! of one epoch each are one call of two; an observer stops training
//! between batches and sees every training row's output once per epoch.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use din::data::{read_record_batches, Dataset, ReadOptions};
use din::model::{Din, Module};
use din::schema::{Config, Keep};
use din::train::{fit, fit_continuing, load_training_data, training_data_from, Observer, Silent, Start, TrainingData};

fn bundled(epochs: usize) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml");
    let mut c = Config::from_toml_file(&path).expect("bundled config");
    c.model.attention.hidden_units = vec![16, 8];
    c.model.dnn.hidden_units = vec![16];
    c.model.dnn.dropout = 0.2; // the dropout stream must continue too
    c.train.threads = 2;
    c.train.epochs = epochs;
    c.train.keep = Keep::Last; // compare the last epoch's weights
    c
}

/// Asserts bitwise equal weights, printing only how many differ.
fn assert_same(a: &Din, b: &Din, what: &str) {
    let (a, b) = (weights(a), weights(b));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(
        a.len() == b.len() && differ == 0,
        "{what}: {differ} of {} weights differ",
        a.len()
    );
}

fn weights(model: &Din) -> Vec<u32> {
    let mut out = Vec::new();
    model.visit("", &mut |_, p| out.extend(p.value.iter().map(|v| v.to_bits())));
    out
}

/// The bundled sample's columns as one record batch, typed as a Python
/// user's numpy arrays would be: int64 ids, a padded `[N, 50]` history, a
/// float32 dense column and int64 labels.
fn sample_batch(config: &Config) -> RecordBatch {
    let path = config.data.train.clone().expect("train file");
    let text = std::fs::read_to_string(path).expect("sample");
    let mut cols: Vec<Vec<i64>> = vec![Vec::new(); 6];
    let (mut hist, mut len) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        for (c, i) in [0, 1, 2, 5, 6, 7].iter().enumerate() {
            cols[c].push(f[*i].trim().parse().expect("id"));
        }
        hist.extend(f[3].split(',').map(|v| v.trim().parse::<i64>().expect("hist id")));
        len.push(f[4].trim().parse::<f32>().expect("hist_len"));
    }
    let names = ["user_id", "gender", "age", "movie_id", "movie_type_id", "label"];
    let mut fields: Vec<Field> = names.iter().map(|n| Field::new(*n, DataType::Int64, false)).collect();
    let mut arrays: Vec<ArrayRef> = cols
        .into_iter()
        .map(|c| Arc::new(Int64Array::from(c)) as ArrayRef)
        .collect();
    let item = Arc::new(Field::new_list_field(DataType::Int64, false));
    let hist = FixedSizeListArray::try_new(item, 50, Arc::new(Int64Array::from(hist)), None).expect("history");
    fields.push(Field::new("hist_movie_id", hist.data_type().clone(), false));
    arrays.push(Arc::new(hist));
    fields.push(Field::new("hist_len", DataType::Float32, false));
    arrays.push(Arc::new(Float32Array::from(len)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("batch")
}

fn from_arrays(config: &Config) -> TrainingData {
    let batch = sample_batch(config);
    let rows: Dataset = read_record_batches(
        Path::new("x"),
        config,
        &config.validate().expect("valid"),
        ReadOptions::strict(true),
        &[batch],
    )
    .expect("reads");
    training_data_from(config, rows, None).expect("data")
}

#[test]
fn arrays_read_as_the_file_does_and_train_the_same_model() {
    let config = bundled(2);
    let file = load_training_data(&config).expect("file");
    let arrays = from_arrays(&config);
    for (a, b) in [
        (&file.train, &arrays.train),
        (
            file.validation.as_ref().expect("v"),
            arrays.validation.as_ref().expect("v"),
        ),
    ] {
        assert_eq!(a.batch, b.batch);
        assert_eq!(a.user_ids(), b.user_ids());
    }
    assert_eq!(file.layout, arrays.layout);
    let (a, b) = (
        fit(&file, &mut Silent).expect("file"),
        fit(&arrays, &mut Silent).expect("arrays"),
    );
    assert_same(&a.model, &b.model, "file and arrays");
}

#[test]
fn record_batch_errors_name_the_source_row_and_column() {
    let config = bundled(1);
    let layout = config.validate().expect("valid");
    let batch = sample_batch(&config);
    // A missing column.
    let fewer = batch.project(&[0, 1, 2, 3, 4, 5, 6]).expect("projection");
    let err = read_record_batches(Path::new("x"), &config, &layout, ReadOptions::strict(true), &[fewer])
        .expect_err("no hist_len")
        .to_string();
    assert!(err.contains("x") && err.contains("hist_len"), "{err}");
    // A negative id in row 3 (line 4).
    let mut ids: Vec<i64> = (0..batch.num_rows() as i64).map(|i| i % 4).collect();
    ids[3] = -2;
    let mut arrays = batch.columns().to_vec();
    arrays[0] = Arc::new(Int64Array::from(ids));
    let bad = RecordBatch::try_new(batch.schema(), arrays).expect("batch");
    let err = read_record_batches(Path::new("x"), &config, &layout, ReadOptions::strict(true), &[bad])
        .expect_err("negative id")
        .to_string();
    assert!(
        err.contains("x:4") && err.contains("user_id") && err.contains("-2"),
        "{err}"
    );
}

#[test]
fn continuing_from_a_new_start_is_fit_and_two_steps_are_one_run() {
    let two = bundled(2);
    let data = from_arrays(&two);
    let once = fit(&data, &mut Silent).expect("fit");
    let same = fit_continuing(&data, Start::new(&data).expect("start"), &mut Silent).expect("continuing");
    assert_same(&once.model, &same.model, "fit_continuing from Start::new");

    let one = bundled(1);
    let data1 = from_arrays(&one);
    let first = fit_continuing(&data1, Start::new(&data1).expect("start"), &mut Silent).expect("epoch 1");
    assert_eq!(first.history.len(), 1);
    let start = Start {
        model: first.model,
        optimizer: first.optimizer.expect("fit's optimizer"),
        rng_positions: first.rng_positions,
        order: first.order,
    };
    let second = fit_continuing(&data1, start, &mut Silent).expect("epoch 2");
    assert_same(&second.model, &once.model, "two calls of one epoch, one call of two");
    assert_eq!(
        second.history[0].train_loss.to_bits(),
        once.history[1].train_loss.to_bits()
    );
}

#[test]
fn a_model_for_another_layout_is_refused() {
    let data = from_arrays(&bundled(1));
    let mut other = bundled(1);
    other.schema.sparse[0].embedding_dim = Some(4);
    let other_data = from_arrays(&other);
    let start = Start::new(&other_data).expect("start");
    let err = fit_continuing(&data, start, &mut Silent)
        .expect_err("other layout")
        .to_string();
    assert!(err.contains("another schema"), "{err}");
}

/// Stops after `after` batches; records the rows it was shown.
struct StopAfter {
    after: usize,
    batches: usize,
    rows: Vec<usize>,
    labels_ok: bool,
    labels: Vec<f32>,
}

impl Observer for StopAfter {
    fn on_batch(&mut self, _epoch: usize, _done: usize, _total: usize, _loss: f64) {
        self.batches += 1;
    }
    fn on_outputs(&mut self, _epoch: usize, rows: &[usize], labels: &[f32], logits: &[f32]) {
        self.labels_ok &= rows.len() == labels.len() && labels.len() == logits.len();
        self.labels_ok &= rows.iter().zip(labels).all(|(&r, &y)| self.labels[r] == y);
        self.labels_ok &= logits.iter().all(|z| z.is_finite());
        self.rows.extend_from_slice(rows);
    }
    fn keep_going(&mut self) -> bool {
        self.batches < self.after
    }
}

#[test]
fn an_observer_sees_each_row_once_an_epoch_and_can_stop_between_batches() {
    let data = from_arrays(&bundled(3));
    let n = data.train.len();
    let batches_per_epoch = n.div_ceil(data.config.train.batch_size);
    let mut all = StopAfter {
        after: usize::MAX,
        batches: 0,
        rows: Vec::new(),
        labels_ok: true,
        labels: data.train.batch.labels.clone(),
    };
    let out = fit(&data, &mut all).expect("fit");
    assert!(!out.interrupted && all.labels_ok);
    assert_eq!(all.batches, 3 * batches_per_epoch);
    for epoch in all.rows.chunks(n) {
        let mut seen = epoch.to_vec();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "every row once an epoch");
    }

    let initial = Start::new(&data).expect("start").model;
    let stop_at = batches_per_epoch + 2; // inside the second epoch
    let mut early = StopAfter {
        after: stop_at,
        batches: 0,
        rows: Vec::new(),
        labels_ok: true,
        labels: data.train.batch.labels.clone(),
    };
    let out = fit(&data, &mut early).expect("stopped");
    assert!(out.interrupted, "reported as interrupted");
    assert_eq!(early.batches, stop_at, "stopped right after the batch it asked to");
    assert_eq!(out.history.len(), 1, "the first epoch completed, the second did not");
    assert_ne!(
        weights(&out.model),
        weights(&initial),
        "keeps the weights trained so far"
    );
    assert_eq!(out.optimizer.expect("fit's optimizer").steps() as usize, stop_at);
}

/// Asks to stop once it has seen the end of epoch `at`.
struct StopAtEpochEnd {
    at: usize,
    ended: usize,
    asked_in_epoch: bool,
}

impl Observer for StopAtEpochEnd {
    fn on_epoch(&mut self, report: &din::train::EpochReport, _model: &Din) -> din::Result<()> {
        self.ended = report.epoch;
        Ok(())
    }
    fn on_batch(&mut self, epoch: usize, _done: usize, _total: usize, _loss: f64) {
        self.asked_in_epoch |= epoch > self.at;
    }
    fn keep_going(&mut self) -> bool {
        self.ended < self.at
    }
}

#[test]
fn asked_to_stop_at_an_epoch_end_the_run_ends_there_whole() {
    let data = from_arrays(&bundled(4));
    let mut stop = StopAtEpochEnd {
        at: 2,
        ended: 0,
        asked_in_epoch: false,
    };
    let out = fit(&data, &mut stop).expect("fit");
    assert!(!out.interrupted, "a normal end, not an interruption");
    assert_eq!(out.history.len(), 2);
    assert!(!stop.asked_in_epoch, "no batch of epoch 3 ran");
    let two = fit(&from_arrays(&bundled(2)), &mut Silent).expect("two epochs");
    assert_same(&out.model, &two.model, "stopped after epoch 2 of 4, and 2 of 2");
}
