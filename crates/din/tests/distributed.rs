//! Distributed training (ranks as threads of this process): one rank
//! trains bitwise the single-process model, two and three ranks train it
//! up to the order of float sums, and what distributed training does not
//! do is refused by name.

use std::path::Path;

use din::checkpoint::{load_model, save_with_assets, WEIGHTS_FILE};
use din::distributed::{fit_distributed, gather_model, in_process, load_shard, DistributedOutcome, Solo};
use din::model::{Din, Module};
use din::schema::{Config, RegularizationKind};
use din::train::{fit, load_training_data, Silent, TrainOutcome};

/// The bundled tutorial config (965 training rows, 415 validation rows),
/// its data path made absolute, edited.
fn tutorial(edit: impl FnOnce(&mut Config)) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut config = Config::from_toml_file(&root.join("configs/movie_sample.toml")).expect("tutorial config");
    // A smaller attention unit keeps the test fast; dropout and the
    // mini-batch-aware regulariser are on, to check both.
    config.model.attention.hidden_units = vec![32, 16];
    config.model.dnn.dropout = 0.25;
    config.train.regularization.kind = RegularizationKind::MiniBatchAware;
    config.train.regularization.lambda = 0.01;
    config.train.threads = 1;
    edit(&mut config);
    config
}

fn single(config: &Config) -> TrainOutcome {
    let data = load_training_data(config).expect("data");
    fit(&data, &mut Silent).expect("single-process training")
}

/// Trains `config` on `ranks` ranks (threads), saving into `out` when
/// given, and gathers the model on rank 0: each rank's outcome and (rank
/// 0) the whole model.
fn ranks_saving(
    config: &Config,
    ranks: usize,
    out: Option<&Path>,
) -> Vec<din::Result<(DistributedOutcome, Option<Din>)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = in_process(ranks)
            .into_iter()
            .map(|mut comm| {
                s.spawn(move || {
                    let shard = load_shard(config, &mut comm)?;
                    let save_to = out.filter(|_| shard.owners.rank == 0);
                    let got = fit_distributed(&shard, &mut comm, &mut Silent, save_to)?;
                    let whole = gather_model(&got.model, &shard.data.layout, shard.owners, &mut comm)?;
                    Ok((got, whole))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

fn ranks(config: &Config, n: usize) -> Vec<din::Result<(DistributedOutcome, Option<Din>)>> {
    ranks_saving(config, n, None)
}

/// Rank 0's whole model, after checking that every rank succeeded, and
/// every rank's outcome.
fn rank0(results: Vec<din::Result<(DistributedOutcome, Option<Din>)>>) -> (Din, Vec<DistributedOutcome>) {
    let mut all = Vec::new();
    let mut whole = None;
    for (r, result) in results.into_iter().enumerate() {
        let (outcome, model) = result.expect("every rank trains");
        assert_eq!(model.is_some(), r == 0, "only rank 0 gathers the model");
        whole = whole.or(model);
        all.push(outcome);
    }
    (whole.expect("rank 0 holds the model"), all)
}

fn weights(model: &Din) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit("", &mut |n, p| out.push((n, p.value.clone())));
    out
}

/// The largest difference between two models' tensors, each relative to
/// the tensor's largest value in `b`, and the tensor where it is.
fn largest_difference(a: &Din, b: &Din) -> (f32, String) {
    let mut worst = (0.0f32, String::new());
    for ((name, x), (_, y)) in weights(a).iter().zip(weights(b)) {
        assert_eq!(x.len(), y.len(), "{name}: shapes");
        let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs() / scale)
            .fold(0.0f32, f32::max);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

#[test]
fn one_rank_trains_bitwise_the_single_process_model() {
    // Two shuffled epochs, with dropout and the mini-batch-aware regulariser:
    // the whole distributed path (ids renumbered to fetched rows, rows
    // fetched and gradients returned, the shard's lazy Adam, the
    // regulariser's counts, the dropout stream by row) with one rank does
    // exactly the single-process arithmetic.
    let config = tutorial(|c| c.train.epochs = 2);
    let expected = single(&config);
    let shard = load_shard(&config, &mut Solo).expect("shard");
    assert_eq!(shard.data.train.len(), 965);
    let dir = tempfile::tempdir().expect("tmp");
    let got = fit_distributed(&shard, &mut Solo, &mut Silent, Some(&dir.path().join("m"))).expect("one rank");
    let model = gather_model(&got.model, &shard.data.layout, shard.owners, &mut Solo)
        .expect("gather")
        .expect("rank 0");
    assert!(weights(&model) == weights(&expected.model), "one rank differs from fit");
    // The model directory it saved (streamed) is the one fit's model saves
    // to, byte for byte.
    save_with_assets(
        &dir.path().join("single"),
        &shard.data.config,
        &expected.model,
        &shard.data.assets,
        Some(&expected.history),
    )
    .expect("save");
    let file = |d: &str| std::fs::read(dir.path().join(d).join(WEIGHTS_FILE)).expect("weights");
    assert!(file("m") == file("single"), "the saved weights differ");
    assert_eq!(got.model_epoch, expected.model_epoch);
    for (g, e) in got.history.iter().zip(&expected.history) {
        assert_eq!(g.train_loss.to_bits(), e.train_loss.to_bits(), "epoch {} loss", g.epoch);
        assert_eq!(g.validation, e.validation, "epoch {} validation", g.epoch);
    }
    // One rank sends nothing to another.
    let t = &got.traffic;
    assert_eq!(t.steps, 2 * 16);
    assert_eq!(
        (t.id_bytes, t.row_bytes, t.row_gradient_bytes, t.dense_bytes),
        (0, 0, 0, 0)
    );
}

#[test]
fn two_and_three_ranks_train_the_single_process_model() {
    // One epoch, 16 Adam steps: the ranks sum the rows' and dense gradients
    // in another order than one process (and each rank's GEMMs have fewer
    // rows), so the models agree to rounding. Measured: see TOLERANCE.
    // Over more epochs Adam, which divides each step by the gradient's own
    // size, turns the rounding of near-zero gradients into whole steps (as
    // grouped training's test finds); the SGD test below runs 3 epochs.
    let config = tutorial(|c| c.train.epochs = 1);
    let expected = single(&config);
    for n in [2, 3] {
        let (model, all) = rank0(ranks(&config, n));
        let (d, name) = largest_difference(&model, &expected.model);
        eprintln!("{n} ranks, Adam, 1 epoch: largest difference {d:e} of the tensor's scale, in {name}");
        assert!(d <= TOLERANCE, "{n} ranks: {name} differs by {d:e} of its scale");
        let (g, e) = (&all[0].history[0], &expected.history[0]);
        assert!(
            (g.train_loss - e.train_loss).abs() < 1e-5,
            "{n} ranks: loss {} vs {}",
            g.train_loss,
            e.train_loss
        );
        let (gv, ev) = (g.validation.as_ref().expect("val"), e.validation.as_ref().expect("val"));
        assert!(
            (gv.logloss - ev.logloss).abs() < 1e-5,
            "{n} ranks: val logloss {} vs {}",
            gv.logloss,
            ev.logloss
        );
        // Every rank reports the same training loss, and sent ids, rows,
        // row gradients and dense gradients.
        for o in &all {
            assert_eq!(o.history[0].train_loss.to_bits(), g.train_loss.to_bits());
            let t = &o.traffic;
            assert!(
                t.id_bytes > 0 && t.row_bytes > 0 && t.row_gradient_bytes > 0 && t.dense_bytes > 0,
                "{t:?}"
            );
            // Rows and their gradients travel the same way.
            assert_eq!(t.steps, 16);
        }
        let rows: u64 = all.iter().map(|o| o.traffic.row_bytes).sum();
        let grads: u64 = all.iter().map(|o| o.traffic.row_gradient_bytes).sum();
        assert_eq!(rows, grads, "{n} ranks: every fetched row's gradient goes back");
    }
}

/// Largest difference between the ranks' model and the single process's,
/// relative to each tensor's largest value. Measured (AMD EPYC, AVX2):
/// 2.1e-6 (2 ranks) and 1.6e-6 (3 ranks) after one epoch of Adam; SGD over
/// 3 epochs 4.5e-7 and 9.2e-7.
/// Float sums in another order differ by a few units in the last place
/// (1.2e-7 each); the bound leaves room for other machines' GEMM kernels.
const TOLERANCE: f32 = 1e-4;

#[test]
fn sgd_over_three_epochs_stays_within_rounding() {
    let config = tutorial(|c| {
        c.train.epochs = 3;
        c.train.optimizer = din::schema::OptimizerKind::Sgd;
        c.train.learning_rate = 0.05;
    });
    let expected = single(&config);
    for n in [2, 3] {
        let (model, all) = rank0(ranks(&config, n));
        let (d, name) = largest_difference(&model, &expected.model);
        eprintln!("{n} ranks, SGD, 3 epochs: largest difference {d:e} of the tensor's scale, in {name}");
        assert!(d <= TOLERANCE, "{n} ranks: {name} differs by {d:e} of its scale");
        assert!(
            all.iter().all(|o| o.model_epoch == expected.model_epoch),
            "the same best epoch"
        );
    }
}

#[test]
fn the_ranks_save_the_best_epochs_model_without_gathering_it() {
    // keep = "best" over 4 epochs on 3 ranks: the model directory rank 0
    // writes as the rows stream in holds the model the ranks kept (the
    // best epoch's, which every rank holds its part of), with the
    // validation history of every epoch.
    let config = tutorial(|c| {
        c.train.epochs = 4;
        c.train.keep = din::schema::Keep::Best;
        c.train.learning_rate = 0.01;
    });
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("model");
    let (model, all) = rank0(ranks_saving(&config, 3, Some(&out)));
    let saved = load_model(&out).expect("the saved model loads");
    assert!(
        weights(&saved.model) == weights(&model),
        "the saved model is not the ranks' model"
    );
    let best = all[0].best_epoch.expect("a best epoch");
    assert!(
        all.iter().all(|o| o.model_epoch == best),
        "every rank kept the best epoch's model"
    );
    let history: Vec<din::checkpoint::EpochReport> =
        serde_json::from_slice(&std::fs::read(out.join("history.json")).expect("history")).expect("json");
    assert_eq!(history.len(), 4);
    assert!(history.iter().all(|h| h.validation.is_some()));
    let expected = single(&config);
    assert_eq!(
        best,
        expected.best_epoch.expect("best"),
        "the single process's best epoch"
    );
}

#[test]
fn vocabulary_sizes_inferred_from_every_shard_are_the_single_process_ones() {
    // Sizes left to inference: the largest id over all shards, not one's
    // (every row trains: user 3 is only in the tutorial's validation rows).
    let config = tutorial(|c| {
        for s in &mut c.schema.sparse {
            s.vocab_size = None;
        }
        c.data.validation_split = None;
        c.train.epochs = 1;
    });
    let data = load_training_data(&config).expect("data");
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = in_process(3)
            .into_iter()
            .map(|mut comm| {
                let config = &config;
                s.spawn(move || load_shard(config, &mut comm).map(|sh| sh.data.layout))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank")).collect::<Vec<_>>()
    });
    for layout in results {
        assert_eq!(layout.expect("shard"), data.layout);
    }
}

#[test]
fn what_distributed_training_does_not_do_is_refused_by_name() {
    let refused = |edit: fn(&mut Config), field: &str| {
        let config = tutorial(edit);
        let err = load_shard(&config, &mut Solo).expect_err("refused").to_string();
        assert!(err.contains(field), "{field}: {err}");
    };
    refused(
        |c| c.model.dnn.activation = din::schema::ActivationKind::Dice,
        "model.dnn.activation",
    );
    refused(
        |c| c.model.attention.activation = din::schema::ActivationKind::Dice,
        "model.attention.activation",
    );
    refused(|c| c.data.window_rows = Some(100), "data.window_rows");
    refused(|c| c.data.group = true, "data.group");
    refused(|c| c.data.skip_bad_rows = true, "data.skip_bad_rows");
}

#[test]
fn more_ranks_than_rows_and_a_failing_rank_are_errors_not_hangs() {
    // A file of 3 rows for 4 ranks.
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lines: Vec<String> = std::fs::read_to_string(root.join("data/movie_sample.txt"))
        .expect("sample")
        .lines()
        .take(3)
        .map(String::from)
        .collect();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, lines.join("\n")).expect("write");
    let config = tutorial(|c| {
        c.data.validation_split = None;
    });
    let mut config = config;
    config.data.train = Some(small.clone());
    let results = ranks(&config, 4);
    let errors: Vec<String> = results.into_iter().map(|r| r.expect_err("fails").to_string()).collect();
    assert!(errors[0].contains("rank 0 would have none"), "{errors:?}");
    // A bad row in the second half of the file: rank 1 stops with the
    // file's line number, rank 0 with an error (not a deadlock).
    let mut bad = lines.clone();
    bad[2] = bad[2].replacen('\t', "\tx", 1);
    std::fs::write(&small, bad.join("\n")).expect("write");
    let results = ranks(&config, 2);
    let rank1 = results[1].as_ref().expect_err("rank 1 reads the bad row").to_string();
    assert!(rank1.contains("small.txt:3"), "{rank1}");
    assert!(results[0].is_err(), "rank 0 stops too");
}
