//! Streaming the training file (`data.window_rows`, issue 14): the windows
//! hold the file's rows in order and never split a group; the first pass
//! finds the held path's vocabulary, id counts and skipped rows; a window
//! as large as the file (or unshuffled windows of whole batches) trains the
//! held model bitwise; small windows shuffle within themselves,
//! reproducibly; a streamed run resumes bitwise from any checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use din::data::{id_counts, read_dataset, stream_dataset, Dataset, ReadOptions};
use din::model::{Din, Module};
use din::schema::{Config, Oov};
use din::scorer::Scorer;
use din::train::{checkpoints, fit, fit_with, load_training_data, Checkpoints, Silent, TrainOutcome};
use tempfile::TempDir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tutorial sample split as its config's `validation_split = 0.3`
/// does (the first 965 lines train), into two files in `dir`.
fn split_sample(dir: &Path) -> (PathBuf, PathBuf) {
    let text = fs::read_to_string(root().join("data/movie_sample.txt")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1380);
    let (train, valid) = (dir.join("train.tsv"), dir.join("valid.tsv"));
    fs::write(&train, lines[..965].join("\n") + "\n").unwrap();
    fs::write(&valid, lines[965..].join("\n") + "\n").unwrap();
    (train, valid)
}

/// The tutorial config on the split files, small and quick.
fn config(train: &Path, valid: &Path) -> Config {
    let mut c = Config::from_toml_file(&root().join("configs/movie_sample.toml")).unwrap();
    c.data.train = Some(train.to_path_buf());
    c.data.validation = Some(valid.to_path_buf());
    c.data.validation_split = None;
    c.model.attention.hidden_units = vec![8];
    c.model.dnn.hidden_units = vec![8];
    c.model.dnn.dropout = 0.2;
    c.train.threads = 2;
    c.train.epochs = 2;
    c.train.batch_size = 64;
    c.train.checkpoint_every = 0;
    c
}

fn streamed(c: &Config, window: usize) -> Config {
    let mut c = c.clone();
    c.data.window_rows = Some(window);
    c
}

fn bits(model: &Din) -> Vec<u32> {
    let mut out = Vec::new();
    model.visit("", &mut |_, p| out.extend(p.value.iter().map(|v| v.to_bits())));
    out
}

fn train(c: &Config) -> TrainOutcome {
    fit(&load_training_data(c).expect("data"), &mut Silent).expect("trains")
}

fn assert_same(a: &TrainOutcome, b: &TrainOutcome, what: &str) {
    assert!(bits(&a.model) == bits(&b.model), "{what}: the weights differ");
    let losses = |o: &TrainOutcome| o.history.iter().map(|h| h.train_loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(a), losses(b), "{what}: the epochs' losses");
    let val = |o: &TrainOutcome| o.history.iter().map(|h| h.validation).collect::<Vec<_>>();
    assert_eq!(val(a), val(b), "{what}: the validation metrics");
}

/// Every window of `path`, and what the reading returned.
fn windows(path: &Path, c: &Config, window: usize) -> (Vec<Dataset>, Option<din::data::SkippedRows>) {
    let layout = c.validate().unwrap();
    let mut out = Vec::new();
    let skipped = stream_dataset(path, c, &layout, ReadOptions::strict(true), window, &mut |w| {
        out.push(w);
        Ok(true)
    })
    .expect("streams");
    (out, skipped)
}

#[test]
fn windows_hold_the_files_rows_in_order() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let c = config(&train, &valid);
    let layout = c.validate().unwrap();
    let whole = read_dataset(&train, &c, &layout, ReadOptions::strict(true)).unwrap();
    for window in [1, 100, 256, 964, 965, 5000] {
        let (parts, skipped) = windows(&train, &c, window);
        assert_eq!(skipped, Some(Default::default()), "window {window}");
        assert_eq!(parts.len(), 965usize.div_ceil(window), "window {window}");
        for (k, p) in parts.iter().enumerate() {
            let want = if k + 1 < parts.len() { window } else { 965 - k * window };
            assert_eq!(p.len(), want, "window {window}, part {k}");
            let rows: Vec<usize> = (k * window..k * window + want).collect();
            let expected = whole.select(&rows);
            assert_eq!(p.batch, expected.batch, "window {window}, part {k}: the rows");
            assert_eq!(p.lines, expected.lines, "window {window}, part {k}: the line numbers");
            assert_eq!(
                p.users, expected.users,
                "window {window}, part {k}: GAUC's users, numbered over the file"
            );
        }
    }
    // A sink that stops ends the reading there.
    let mut seen = 0;
    let stopped = stream_dataset(&train, &c, &layout, ReadOptions::strict(true), 100, &mut |_| {
        seen += 1;
        Ok(seen < 3)
    })
    .unwrap();
    assert_eq!((stopped, seen), (None, 3));
}

#[test]
fn windows_of_grouped_data_end_between_groups() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    c.data.group = true;
    let layout = c.validate().unwrap();
    let whole = read_dataset(&train, &c, &layout, ReadOptions::strict(true)).unwrap();
    assert!(
        whole.batch.group_count() < whole.len(),
        "the sample has groups of several rows"
    );
    let (parts, _) = windows(&train, &c, 50);
    let mut starts = vec![0usize]; // of every group, over the file
    for p in &parts {
        assert!(p.batch.is_grouped());
        let base = starts.pop().unwrap();
        starts.extend(p.batch.groups.iter().map(|&g| base + g as usize));
        assert!(
            p.len() >= 50 || std::ptr::eq(p, parts.last().unwrap()),
            "only the last window is short"
        );
    }
    assert!(parts.len() > 5);
    let held: Vec<usize> = whole.batch.groups.iter().map(|&g| g as usize).collect();
    assert_eq!(starts, held, "the same groups as the file held whole");
}

#[test]
fn the_first_pass_finds_the_held_vocabulary_counts_and_skipped_rows() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    // Two malformed lines and one id outside a given vocabulary.
    let mut text = fs::read_to_string(&train).unwrap();
    text.push_str("1\tF\t1\tnot,ids\t3\t1\t1\t1\n");
    text.push_str("1\tF\t1\t1,2\t2\n");
    let good: Vec<&str> = text.lines().take(1).collect();
    let mut f: Vec<String> = good[0].split('\t').map(str::to_string).collect();
    f[1] = "999".into(); // gender
    text.push_str(&(f.join("\t") + "\n"));
    fs::write(&train, text).unwrap();
    let mut c = config(&train, &valid);
    c.data.skip_bad_rows = true;
    c.data.max_bad_rows_fraction = 0.01;
    // The item tables' sizes inferred, the others given (gender's 3).
    for f in c.schema.sparse.iter_mut().filter(|f| f.name.starts_with("movie")) {
        f.vocab_size = None;
    }
    let held = load_training_data(&c).expect("held");
    for window in [7, 300, 2000] {
        let s = load_training_data(&streamed(&c, window)).expect("streamed");
        let st = s.stream.as_ref().expect("streamed");
        assert_eq!(s.layout, held.layout, "window {window}: the vocabulary sizes");
        assert_eq!(
            s.config,
            streamed(&held.config, window),
            "window {window}: the frozen config"
        );
        assert_eq!(st.rows, 965, "window {window}");
        assert_eq!(st.rows, held.train.len());
        assert_eq!(
            st.counts,
            id_counts(&held.layout, &held.train),
            "window {window}: the id counts"
        );
        assert_eq!(st.skipped, held.train.skipped, "window {window}: the rows skipped");
        assert_eq!(st.skipped.count, 3);
        assert_eq!(st.batches, batches(965, window, 64), "window {window}");
        assert_eq!(s.validation, held.validation, "window {window}: the validation rows");
        assert_eq!(s.assets, held.assets, "window {window}");
        assert!(s.train.is_empty());
    }
    // Past the limit: the run stops, naming the first bad line.
    c.data.max_bad_rows_fraction = 0.002;
    let err = load_training_data(&streamed(&c, 100))
        .expect_err("too many")
        .to_string();
    let want = load_training_data(&c).expect_err("too many").to_string();
    assert_eq!(err, want);
    assert!(err.contains("line 966"), "{err}");
}

/// Batches of an epoch of `rows` rows in windows of `window`.
fn batches(rows: usize, window: usize, batch: usize) -> usize {
    let full = rows / window;
    full * window.div_ceil(batch) + (rows % window).div_ceil(batch)
}

#[test]
fn a_window_as_large_as_the_file_trains_the_held_model_bitwise() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    c.train.epochs = 1; // each epoch after the first reshuffles the held order in place
    assert!(c.train.shuffle);
    let held = self::train(&c);
    assert_same(&held, &self::train(&streamed(&c, 965)), "one window of 965 rows");
    assert_same(&held, &self::train(&streamed(&c, 100_000)), "one window");
}

#[test]
fn unshuffled_windows_of_whole_batches_train_the_held_model_bitwise() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    c.train.shuffle = false;
    let held = self::train(&c);
    for window in [64, 192] {
        assert_same(
            &held,
            &self::train(&streamed(&c, window)),
            &format!("windows of {window}"),
        );
    }
    // A window that is not a whole number of batches ends in a short batch.
    let short = self::train(&streamed(&c, 100));
    assert!(bits(&short.model) != bits(&held.model));
}

#[test]
fn small_windows_shuffle_within_each_reproducibly() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let c = config(&train, &valid);
    let a = self::train(&streamed(&c, 256));
    let b = self::train(&streamed(&c, 256));
    assert_same(&a, &b, "the same seed");
    let held = self::train(&c);
    assert!(
        bits(&a.model) != bits(&held.model),
        "a window's shuffle is not the file's"
    );
    let mut unshuffled = streamed(&c, 256);
    unshuffled.train.shuffle = false;
    assert!(
        bits(&self::train(&unshuffled).model) != bits(&a.model),
        "the windows are shuffled"
    );
    // Trained, not just run: as the held run, the training loss falls.
    let losses = |o: &TrainOutcome| o.history.iter().map(|h| h.train_loss).collect::<Vec<_>>();
    assert!(losses(&a)[1] < losses(&a)[0], "{:?}", losses(&a));
}

#[test]
fn a_streamed_run_resumes_bitwise_from_every_checkpoint() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    c.train.epochs = 3;
    let c = streamed(&c, 200); // 5 windows: 4 batches each, the last 3 (165 rows)
    let data = load_training_data(&c).expect("data");
    assert_eq!(data.stream.as_ref().unwrap().batches, 19);
    let plain = fit(&data, &mut Silent).expect("trains");
    let policy = |dir: PathBuf| Checkpoints {
        dir,
        every: 3,
        keep: 1000,
    };
    let root = tmp.path().join("ckpt");
    let checked = fit_with(&data, Some(&policy(root.clone())), None, &mut Silent).expect("trains");
    assert_same(&plain, &checked, "checkpoints change nothing");
    let all = checkpoints::list(&root).unwrap();
    // Every 3 batches of 57, and each epoch's end (batch 57 is both).
    assert_eq!(all.len(), 19 + 2, "{all:?}");
    let mut mid_window = 0;
    for (k, ckpt) in all.iter().enumerate() {
        let r = checkpoints::read(ckpt).unwrap();
        let s = &r.state;
        if !s.epoch_done {
            assert!(s.order.len() <= 200, "a checkpoint holds one window's order");
            mid_window += usize::from(!s.window_batches_done.is_multiple_of(4));
        }
        let data = load_training_data(&r.config).expect("data");
        let out = fit_with(
            &data,
            Some(&policy(tmp.path().join(format!("again-{k}")))),
            Some(r),
            &mut Silent,
        )
        .expect("resumes");
        assert_same(&plain, &out, &format!("from {}", ckpt.display()));
    }
    assert!(mid_window > 5, "resumed inside windows too");
}

#[test]
fn streaming_refuses_a_split_and_an_empty_window() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = streamed(&config(&train, &valid), 100);
    c.data.validation = None;
    c.data.validation_split = Some(0.3);
    let err = load_training_data(&c).expect_err("a split").to_string();
    assert!(
        err.contains("data.validation_split") && err.contains("data.window_rows"),
        "{err}"
    );
    let zero = streamed(&config(&train, &valid), 0);
    let err = load_training_data(&zero).expect_err("0 rows").to_string();
    assert!(err.contains("data.window_rows"), "{err}");
    // An id outside a given vocabulary is the held path's error.
    let mut c = streamed(&config(&train, &valid), 100);
    let gender = c.schema.sparse.iter().position(|f| f.name == "gender").unwrap();
    c.schema.sparse[gender].vocab_size = Some(2);
    c.schema.sparse[gender].oov = Oov::Error;
    let mut held = c.clone();
    held.data.window_rows = None;
    let want = load_training_data(&held).expect_err("out of vocabulary").to_string();
    assert_eq!(load_training_data(&c).expect_err("out of vocabulary").to_string(), want);
}

#[test]
fn streamed_prediction_and_evaluation_equal_the_held_ones() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    c.train.epochs = 1;
    c.train.eval_batch_size = 64;
    let data = load_training_data(&c).expect("data");
    let model = fit(&data, &mut Silent).expect("trains").model;
    let scorer = Scorer::new(data.config.clone(), data.layout.clone(), model, data.assets.clone());
    let held = scorer.read(&valid, true).unwrap();
    let want = scorer.predict(&held, 2).unwrap();
    let want_metrics = scorer.evaluate(&held, 2).unwrap();
    for window in [1, 37, 64, 192, 415, 10_000] {
        let mut got = Vec::new();
        let mut windows = 0;
        scorer
            .predict_windows(&valid, true, window, 2, &mut |w, p| {
                assert_eq!(w.len(), p.len());
                got.extend_from_slice(p);
                windows += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(windows, 415usize.div_ceil(window), "window {window}");
        let m = scorer.evaluate_windows(&valid, window, 2).unwrap();
        if window % 64 == 0 || window >= 415 {
            // The same batches of eval_batch_size rows: the same bits.
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "window {window}: the scores, bit for bit");
            assert_eq!(m, want_metrics, "window {window}: the metrics");
        } else {
            // Other batch sizes round a few scores differently in the last bit.
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6, "window {window}: {worst}");
            assert!(
                (m.logloss - want_metrics.logloss).abs() < 1e-6,
                "window {window}: {m:?}"
            );
            assert_eq!((m.n, m.positives), (want_metrics.n, want_metrics.positives));
        }
    }
    // An error inside a window stops the reading with it.
    let err = scorer
        .predict_windows(&valid, true, 100, 2, &mut |_, _| {
            Err(din::Error::Training("stop".into()))
        })
        .expect_err("stops");
    assert!(err.to_string().contains("stop"), "{err}");
}

/// The item table (`item_feature_of`) of a streamed file is the held one:
/// derived in the first pass when the item's table size is given, in a
/// second when it is inferred; a row contradicting an earlier window's is
/// refused as the held path refuses it.
#[test]
fn a_streamed_file_gives_the_held_item_table() {
    let tmp = TempDir::new().unwrap();
    let (train, valid) = split_sample(tmp.path());
    let mut c = config(&train, &valid);
    let ty = c.schema.sparse.iter().position(|f| f.name == "movie_type_id").unwrap();
    c.schema.sparse[ty].item_feature_of = Some("movie_id".into());
    for inferred in [false, true] {
        if inferred {
            for f in c.schema.sparse.iter_mut().filter(|f| f.name.starts_with("movie")) {
                f.vocab_size = None;
            }
        }
        let held = load_training_data(&c).expect("held");
        assert!(held.assets.items.is_some());
        for window in [50, 5000] {
            let s = load_training_data(&streamed(&c, window)).expect("streamed");
            assert_eq!(s.assets, held.assets, "inferred sizes {inferred}, window {window}");
            assert_eq!(s.layout, held.layout);
        }
    }
    // Line 900 gives movie 112 (type 2 on line 1) another type.
    let text = fs::read_to_string(&train).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut f: Vec<String> = lines[899].split('\t').map(str::to_string).collect();
    (f[5], f[6]) = ("112".into(), "7".into());
    lines[899] = f.join("\t");
    fs::write(&train, lines.join("\n") + "\n").unwrap();
    let err = load_training_data(&streamed(&c, 100))
        .expect_err("a conflict")
        .to_string();
    assert!(
        err.contains("train.tsv:900") && err.contains("movie_type_id 7 here and 2"),
        "{err}"
    );
    assert!(load_training_data(&c).is_err());
}
