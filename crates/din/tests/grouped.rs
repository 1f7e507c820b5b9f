//! Common features (issue 13): samples that share a user side are stored
//! and computed once per group, and give the flat samples' results.

mod common;

use std::path::{Path, PathBuf};

use din::data::{read_dataset, Batch, Dataset, ReadOptions};
use din::model::{Din, DinCache, Mode, Module};
use din::schema::{Config, InputLayout};
use din::train::{fit, load_training_data, Observer, Silent};

/// `|a - b| <= tol * max(|b|, 1e-3)` element-wise, naming the first miss.
fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}

/// The batch of `common::batch` with its rows repeated as `rows` says, flat
/// (every row its own copy of everything) and grouped (consecutive copies
/// of one source row share one copy of their sequences, of the user
/// feature and of the dense feature; the targets stay per row).
fn repeated(rows: &[usize]) -> (Batch, Batch) {
    let base = common::batch();
    let flat = base.gather(rows);
    let mut grouped = flat.clone();
    grouped.groups.clear();
    let mut kept = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        if i == 0 || rows[i - 1] != r {
            kept.push(r);
            grouped.groups.push(i as u32);
        }
    }
    grouped.groups.push(rows.len() as u32);
    for (g, s) in grouped.sequences.iter_mut().zip(&base.sequences) {
        *g = din::data::Ragged::new();
        for &r in &kept {
            g.push(s.row(r));
        }
    }
    grouped.sparse[0] = kept.iter().map(|&r| base.sparse[0][r]).collect();
    grouped.dense[0] = kept
        .iter()
        .flat_map(|&r| base.dense[0][2 * r..2 * r + 2].to_vec())
        .collect();
    grouped.shared_sparse = vec![true, false, false];
    grouped.shared_dense = vec![true];
    assert_eq!(
        grouped.ungrouped(),
        flat,
        "the grouped batch holds the flat batch's rows"
    );
    (flat, grouped)
}

#[test]
fn a_grouped_batch_gives_the_flat_batchs_logits_and_gradients() {
    // Groups of 3, 1 (empty history), 2 and 4 rows.
    let rows = [0, 0, 0, 2, 1, 1, 3, 3, 3, 3];
    let (flat, grouped) = repeated(&rows);
    assert!(grouped.is_grouped() && grouped.group_count() == 4);
    assert_eq!(
        grouped.sequences[0].values.len(),
        3 + 5 + 2,
        "each history once (the second is empty)"
    );
    for (att, norm, dnn) in [
        ("prelu", "none", "prelu"),
        ("dice", "softmax", "dice"),
        ("sigmoid", "none", "relu"),
    ] {
        let config = common::config(att, norm, dnn);
        let layout = common::layout(&config);
        let name = format!("{att}/{norm}/{dnn}");
        let model = Din::new(&layout, &config.model, 3).unwrap();
        let (mut mf, mut mg) = (model.clone(), model.clone());
        let (mut cf, mut cg) = (DinCache::default(), DinCache::default());
        let lf = mf.forward_into(&flat, Mode::Train, None, &mut cf).to_vec();
        let lg = mg.forward_into(&grouped, Mode::Train, None, &mut cg).to_vec();
        close(&format!("{name} logits"), &lg, &lf, 1e-5);
        close(
            &format!("{name} predict"),
            &mg.predict(&grouped),
            &mf.predict(&flat),
            1e-5,
        );
        let dlogits: Vec<f32> = (0..rows.len()).map(|i| 0.3 - 0.1 * i as f32).collect();
        mf.zero_grad();
        mg.zero_grad();
        let ef = mf.backward(&flat, &mut cf, &dlogits);
        let eg = mg.backward(&grouped, &mut cg, &dlogits);
        let mut dense = Vec::new();
        mf.visit("", &mut |n, p| dense.push((n, p.grad.clone())));
        let mut i = 0;
        mg.visit("", &mut |n, p| {
            close(&format!("{name} {n}"), &p.grad, &dense[i].1, 1e-5);
            i += 1;
        });
        for (t, (a, b)) in eg.iter().zip(&ef).enumerate() {
            let mut ids = a.ids.clone();
            ids.sort_unstable();
            let mut want = b.ids.clone();
            want.sort_unstable();
            assert_eq!(ids, want, "{name} table {t}: touched rows");
            for id in ids {
                close(
                    &format!("{name} table {t} row {id}"),
                    a.get(id).unwrap(),
                    b.get(id).unwrap(),
                    1e-5,
                );
            }
        }
    }
}

/// The bundled tutorial config, its data path made absolute.
fn tutorial(edit: impl FnOnce(&mut Config)) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut config = Config::from_toml_file(&root.join("configs/movie_sample.toml")).unwrap();
    edit(&mut config);
    config
}

fn weights(model: &Din) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |n, p| out.push((n, p.value.clone())));
    out
}

#[test]
fn grouped_training_gives_the_flat_model_on_the_same_sample_order() {
    // The tutorial's sample shows each history with 6 candidates; batches
    // of 60 rows are 10 whole groups in both runs.
    let dir = tempfile::tempdir().unwrap();
    let grouped_path = grouped_file(dir.path());
    let run = |group: bool, activation: &str| {
        let config = tutorial(|c| {
            if group {
                c.data.train = Some(grouped_path.clone());
                c.input.layout = InputLayout::Grouped;
            }
            c.train.shuffle = false;
            c.train.batch_size = 60;
            // One epoch (17 Adam steps): the two runs agree to rounding
            // (8.6e-7 of each tensor's scale, measured on AVX-512). Over
            // more epochs Adam, which scales each step by the gradient's
            // own size, turns the rounding of near-zero gradients (the
            // flat and grouped GEMMs differ in shape, so in blocking) into
            // whole steps: 2e-2 after 3 epochs there, not a difference of
            // the two computations.
            c.train.epochs = 1;
            c.train.threads = 1;
            c.model.attention.activation = serde_json::from_value(serde_json::json!(activation)).unwrap();
        });
        let data = load_training_data(&config).unwrap();
        assert_eq!(data.train.batch.is_grouped(), group);
        let outcome = fit(&data, &mut Silent).unwrap();
        (data, outcome)
    };
    for activation in ["prelu", "dice"] {
        let (flat_data, flat) = run(false, activation);
        let (grouped_data, grouped) = run(true, activation);
        assert_eq!(grouped_data.train.len(), flat_data.train.len());
        // 965 rows (floor(0.7 * 1380)): 160 groups of 6 and one of 5.
        assert!(
            grouped_data.train.batch.group_count() == 161 && grouped_data.train.len() == 965,
            "{activation}: {} groups of {} rows",
            grouped_data.train.batch.group_count(),
            grouped_data.train.len()
        );
        for ((name, g), (_, f)) in weights(&grouped.model).iter().zip(weights(&flat.model)) {
            close(&format!("{activation} {name}"), g, &f, 1e-4);
        }
        for (g, f) in grouped.history.iter().zip(&flat.history) {
            assert!(
                (g.train_loss - f.train_loss).abs() < 1e-5,
                "{activation} epoch {}: {} vs {}",
                g.epoch,
                g.train_loss,
                f.train_loss
            );
            let (gv, fv) = (g.validation.as_ref().unwrap(), f.validation.as_ref().unwrap());
            assert!((gv.logloss - fv.logloss).abs() < 1e-5, "{activation} val logloss");
        }
    }
}

/// Records the rows each batch trained on, and whether their labels were
/// the data set's.
struct Rows {
    labels: Vec<f32>,
    seen: Vec<Vec<usize>>,
    labels_ok: bool,
}

impl Observer for Rows {
    fn on_outputs(&mut self, _epoch: usize, rows: &[usize], labels: &[f32], logits: &[f32]) {
        self.labels_ok &= rows.len() == labels.len() && labels.len() == logits.len();
        self.labels_ok &= rows.iter().zip(labels).all(|(&r, &y)| self.labels[r] == y);
        self.seen.push(rows.to_vec());
    }
}

#[test]
fn grouped_training_shows_each_batch_its_own_rows_whole_groups_each_row_once_an_epoch() {
    // Shuffled groups; each batch is gathered while the one before it
    // trains, so the observer must be shown the rows of the batch that
    // trained, not of the next one.
    let dir = tempfile::tempdir().unwrap();
    let config = tutorial(|c| {
        c.data.train = Some(grouped_file(dir.path()));
        c.input.layout = InputLayout::Grouped;
        c.train.batch_size = 60;
        c.train.epochs = 2;
    });
    let data = load_training_data(&config).unwrap();
    let batch = &data.train.batch;
    let mut rows = Rows {
        labels: batch.labels.clone(),
        seen: Vec::new(),
        labels_ok: true,
    };
    fit(&data, &mut rows).unwrap();
    assert!(rows.labels_ok, "each batch's labels are its rows'");
    let n = data.train.len();
    let (mut epoch, mut distinct) = (Vec::new(), std::collections::BTreeSet::new());
    for seen in &rows.seen {
        // Whole groups, their rows in order.
        let groups: std::collections::BTreeSet<usize> = seen.iter().map(|&r| batch.group_of(r)).collect();
        for g in groups {
            let rows_of: Vec<usize> = seen.iter().copied().filter(|&r| batch.group_of(r) == g).collect();
            assert_eq!(
                rows_of,
                batch.group_rows(g).collect::<Vec<_>>(),
                "group {g} whole, in order"
            );
        }
        epoch.extend_from_slice(seen);
        distinct.insert(seen.clone());
        if epoch.len() == n {
            epoch.sort_unstable();
            assert_eq!(epoch, (0..n).collect::<Vec<_>>(), "every row once an epoch");
            epoch.clear();
        }
    }
    assert!(epoch.is_empty(), "whole epochs");
    assert_eq!(distinct.len(), rows.seen.len(), "no batch shown twice");
}

/// The tutorial's rows written one group per line (the grouped layout).
fn grouped_file(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("data/movie_sample.txt")).unwrap();
    let mut out = String::new();
    let mut group: Vec<Vec<&str>> = Vec::new();
    let flush = |group: &mut Vec<Vec<&str>>, out: &mut String| {
        if group.is_empty() {
            return;
        }
        // user_id gender age hist_movie_id hist_len | movie_id movie_type_id label
        let first = &group[0];
        let joined = |c: usize| group.iter().map(|r| r[c]).collect::<Vec<_>>().join("|");
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            first[0],
            first[1],
            first[2],
            first[3],
            first[4],
            joined(5),
            joined(6),
            joined(7)
        ));
        group.clear();
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        if group.first().is_some_and(|g| g[..5] != fields[..5]) {
            flush(&mut group, &mut out);
        }
        group.push(fields);
    }
    flush(&mut group, &mut out);
    let path = dir.join("grouped.tsv");
    std::fs::write(&path, out).unwrap();
    path
}

fn read(config: &Config, path: &Path) -> din::Result<Dataset> {
    let layout = config.validate().unwrap();
    read_dataset(path, config, &layout, ReadOptions::strict(true))
}

#[test]
fn a_grouped_file_reads_as_its_flat_rows_in_a_fraction_of_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let grouped_path = grouped_file(dir.path());
    let flat_config = tutorial(|_| {});
    let flat_path = flat_config.data.train.clone().unwrap();
    let flat = read(&flat_config, &flat_path).unwrap();
    let grouped_config = tutorial(|c| c.input.layout = InputLayout::Grouped);
    let grouped = read(&grouped_config, &grouped_path).unwrap();
    let detected = read(&tutorial(|c| c.data.group = true), &flat_path).unwrap();
    assert!(!flat.batch.is_grouped());
    // 230 runs of 6 rows with one user side; 150 runs of one (user, history)
    // (`cut -f1,4 data/movie_sample.txt | uniq | wc -l`): consecutive runs
    // that differ only in gender or age share their history.
    for (what, d, groups) in [("grouped file", &grouped, 230), ("detected groups", &detected, 150)] {
        assert!(d.batch.is_grouped(), "{what}");
        assert_eq!(d.len(), flat.len(), "{what}: rows");
        assert_eq!(d.batch.ungrouped(), flat.batch, "{what}");
        assert_eq!(d.user_ids(), flat.user_ids(), "{what}");
        assert_eq!(d.batch.group_count(), groups, "{what}");
        assert_eq!(d.batch.sequences[0].rows(), groups, "{what}: each history once");
    }
    // The user side once per group: user, gender, age and hist_len in the
    // grouped file; the user (part of the key) in detected groups, whose
    // runs of one user and history can differ in gender or age.
    assert_eq!(grouped.batch.shared_sparse, [true, true, true, false, false]);
    assert_eq!(grouped.batch.shared_dense, [true]);
    assert_eq!(grouped.batch.sparse[0].len(), 230);
    assert!(detected.batch.shared_sparse[0] && !detected.batch.shared_sparse[3]);
    assert_eq!(grouped.users.as_ref().map(Vec::len), Some(230), "a user id per group");
    // Each row is back at its flat row when gathered whole, grouped or not.
    let all: Vec<usize> = (0..flat.len()).collect();
    assert_eq!(grouped.batch.gather(&all).groups, grouped.batch.groups);
    let bytes = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        bytes(&flat_path) > 3 * bytes(&grouped_path),
        "{} vs {} bytes",
        bytes(&flat_path),
        bytes(&grouped_path)
    );
    // Lines of a grouped file are its groups.
    assert_eq!(grouped.lines[0..6], [1; 6]);
    assert_eq!(grouped.lines[6], 2);
}

#[test]
fn detected_groups_need_the_same_user_and_every_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.tsv");
    // Rows 1-2 share user and history; row 3 has another user, row 4 another history.
    std::fs::write(
        &path,
        "1\t1\t1\t5,6\t2\t7\t1\t1\n1\t1\t1\t5,6\t2\t8\t1\t0\n2\t1\t1\t5,6\t2\t7\t1\t0\n2\t1\t1\t5\t1\t9\t2\t1\n",
    )
    .unwrap();
    let config = tutorial(|c| c.data.group = true);
    let d = read(&config, &path).unwrap();
    assert_eq!(d.batch.groups, vec![0, 2, 3, 4]);
    assert_eq!(d.batch.history(0, 3), &[5]);
}

#[test]
fn malformed_grouped_lines_name_the_line_the_column_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = tutorial(|c| c.input.layout = InputLayout::Grouped);
    let cases = [
        // three movies, two types
        (
            "1\t1\t1\t5,6\t2\t7|8|9\t1|2\t1|0|0\n",
            "movie_type_id",
            "holds 2 candidates",
        ),
        // two labels for three candidates
        ("1\t1\t1\t5,6\t2\t7|8|9\t1\t1|0\n", "label", "holds 2 candidates"),
        // one label for three candidates
        ("1\t1\t1\t5,6\t2\t7|8|9\t1\t1\n", "label", "one label per candidate (3)"),
        // a history per candidate
        (
            "1\t1\t1\t5,6|7\t2\t7|8\t1\t1|0\n",
            "hist_movie_id",
            "cannot hold the candidate separator",
        ),
        // a bad id among the candidates
        (
            "1\t1\t1\t5,6\t2\t7|x\t1\t1|0\n",
            "movie_id",
            "not a non-negative integer",
        ),
    ];
    for (i, (text, column, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.tsv"));
        std::fs::write(&path, format!("1\t1\t1\t5\t1\t7\t1\t1\n{text}")).unwrap();
        let e = read(&config, &path).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{}:2", path.display())) && e.contains(column) && e.contains(reason),
            "case {i}: {e}"
        );
    }
    // The candidate separator must differ from the other separators.
    let mut bad = config.clone();
    bad.input.candidate_separator = ",".into();
    let e = read(&bad, &dir.path().join("bad0.tsv")).unwrap_err().to_string();
    assert!(e.contains("input.candidate_separator"), "{e}");
}

#[test]
fn a_column_shared_so_far_turns_per_row_where_a_group_differs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grouped.tsv");
    // Line 1 gives one movie type for both candidates, line 2 one each;
    // gender is one per line throughout.
    std::fs::write(&path, "1\t1\t1\t5,6\t2\t7|8\t1\t1|0\n2\t2\t1\t5\t1\t9|10\t1|2\t1|0\n").unwrap();
    let config = tutorial(|c| c.input.layout = InputLayout::Grouped);
    let d = read(&config, &path).unwrap();
    assert_eq!(d.batch.groups, vec![0, 2, 4]);
    assert_eq!(d.batch.shared_sparse, [true, true, true, false, false]);
    assert_eq!(d.batch.sparse[1], [1, 2], "gender, once per group");
    assert_eq!(
        d.batch.sparse[4],
        [1, 1, 1, 2],
        "movie type, once per row from line 2 on"
    );
    assert_eq!(d.batch.sparse[3], [7, 8, 9, 10]);
    assert_eq!(d.lines, [1, 1, 2, 2]);
    // The same in a flat file with detected groups: gender turns per row
    // where a run of one user and history changes it.
    let flat = dir.path().join("flat.tsv");
    std::fs::write(
        &flat,
        "1\t1\t1\t5\t1\t7\t1\t1\n1\t1\t1\t5\t1\t8\t1\t0\n1\t2\t1\t5\t1\t9\t2\t1\n",
    )
    .unwrap();
    let d = read(&tutorial(|c| c.data.group = true), &flat).unwrap();
    assert_eq!(d.batch.groups, vec![0, 3]);
    assert_eq!(d.batch.shared_sparse, [true, false, true, false, false]);
    assert_eq!(d.batch.sparse[1], [1, 1, 2]);
}
