//! The training loop on the bundled sample: learning, determinism, early
//! stopping, regularisation, config validation.

mod common;

use std::path::Path;

use din::model::SparseGrad;
use din::model::{Din, Module, Precision};
use din::schema::{ActivationKind, Config, EarlyStoppingConfig, Monitor, RegularizationConfig, RegularizationKind};
use din::train::{fit, load_training_data, regularize, Silent};

fn bundled() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml");
    let mut c = Config::from_toml_file(&path).expect("bundled config");
    // A smaller network keeps the test fast; the mathematics is the same.
    c.model.attention.hidden_units = vec![16, 8];
    c.model.dnn.hidden_units = vec![16];
    c.train.threads = 1;
    c
}

fn weights(model: &Din) -> Vec<u32> {
    let mut out = Vec::new();
    model.visit("", &mut |_, p| out.extend(p.value.iter().map(|v| v.to_bits())));
    out
}

#[test]
fn training_lowers_the_loss_and_reports_validation_metrics() {
    let mut config = bundled();
    config.train.epochs = 4;
    let data = load_training_data(&config).expect("data");
    assert_eq!(
        (data.train.len(), data.validation.as_ref().map(|v| v.len())),
        (965, Some(415))
    );
    let out = fit(&data, &mut Silent).expect("trains");
    assert_eq!(out.history.len(), 4);
    let first = out.history[0].train_loss;
    let last = out.history[3].train_loss;
    assert!(last < first, "train loss {first} -> {last}");
    let v = out.history[3].validation.expect("validation metrics");
    assert_eq!(v.n, 415);
    assert!(v.logloss.is_finite() && v.auc.is_some() && v.gauc.is_some());
}

#[test]
fn same_seed_and_threads_give_the_same_model_and_other_seeds_do_not() {
    let mut config = bundled();
    config.train.epochs = 1;
    config.model.dnn.dropout = 0.2;
    let data = load_training_data(&config).expect("data");
    let a = fit(&data, &mut Silent).expect("a");
    let b = fit(&data, &mut Silent).expect("b");
    assert_eq!(weights(&a.model), weights(&b.model));
    let mut other = data.clone();
    other.config.train.seed += 1;
    let c = fit(&other, &mut Silent).expect("c");
    assert_ne!(weights(&a.model), weights(&c.model));
}

#[test]
fn early_stopping_stops_and_can_restore_the_best_epoch() {
    let mut config = bundled();
    config.train.epochs = 30;
    config.train.learning_rate = 0.01; // overfits fast on 3 users
    config.train.early_stopping = Some(EarlyStoppingConfig {
        monitor: Monitor::ValLogloss,
        patience: 2,
        restore_best: true,
    });
    let data = load_training_data(&config).expect("data");
    let out = fit(&data, &mut Silent).expect("trains");
    assert!(out.stopped_early, "stopped before 30 epochs");
    let best = out.best_epoch.expect("best epoch");
    assert_eq!(out.history.len(), best + 2, "patience 2 after the best epoch");
    let best_logloss = out.history[best - 1].validation.expect("metrics").logloss;
    let restored = din::scorer::evaluate(
        &out.model,
        data.validation.as_ref().expect("validation"),
        config.train.eval_batch_size,
    );
    assert_eq!(restored.logloss, best_logloss, "the returned model is the best epoch's");
}

#[test]
fn mini_batch_aware_regularisation_scales_by_inverse_frequency() {
    let config = common::config("prelu", "none", "prelu");
    let layout = common::layout(&config);
    let mut model = Din::new(&layout, &config.model, 0).expect("model");
    let item = layout.sparse[1].table;
    let mut emb: Vec<SparseGrad> = model.embeddings.iter().map(|e| SparseGrad::new(e.dim())).collect();
    emb[item].add(3, &[0.0; 4]);
    emb[item].add(5, &[1.0; 4]);
    let mut counts: Vec<Vec<u32>> = layout.tables.iter().map(|t| vec![1; t.rows()]).collect();
    counts[item][3] = 4;
    counts[item][5] = 1;
    let cfg = RegularizationConfig {
        kind: RegularizationKind::MiniBatchAware,
        lambda: 0.5,
        dnn_lambda: None,
    };
    let before = model.clone();
    let penalty = regularize(&cfg, &mut model, &mut emb, &counts);
    let (w3, w5) = (before.embeddings[item].row(3), before.embeddings[item].row(5));
    let sq = |w: &[f32]| w.iter().map(|v| f64::from(v * v)).sum::<f64>();
    // Σ_j λ/n_j ||w_j||² = 0.5/4 ||w3||² + 0.5/1 ||w5||²
    let want = 0.125 * sq(w3) + 0.5 * sq(w5);
    assert!((penalty - want).abs() < 1e-9, "{penalty} vs {want}");
    for j in 0..4 {
        assert!((emb[item].get(3).expect("row 3")[j] - 2.0 * 0.125 * w3[j]).abs() < 1e-9);
        assert!((emb[item].get(5).expect("row 5")[j] - (1.0 + 2.0 * 0.5 * w5[j])).abs() < 1e-7);
    }
    assert_eq!(model, before, "MBA touches no dense gradient and no weight");

    // Plain L2 also regularises MLP weights.
    let cfg = RegularizationConfig {
        kind: RegularizationKind::L2,
        lambda: 0.5,
        dnn_lambda: None,
    };
    model.zero_grad();
    regularize(&cfg, &mut model, &mut emb, &counts);
    let w = &model.output.weight;
    assert!(
        w.grad.iter().zip(&w.value).all(|(g, v)| (g - v).abs() < 1e-6),
        "grad = 2 * 0.5 * w"
    );

    // dnn_lambda: the MLP weights take their own strength (DeepCTR's
    // l2_reg_dnn), the embedding rows keep lambda's.
    for (kind, lambda) in [(RegularizationKind::L2, 0.5), (RegularizationKind::MiniBatchAware, 0.5)] {
        let cfg = RegularizationConfig {
            kind,
            lambda,
            dnn_lambda: Some(0.25),
        };
        model.zero_grad();
        let mut emb: Vec<SparseGrad> = model.embeddings.iter().map(|e| SparseGrad::new(e.dim())).collect();
        emb[item].add(5, &[0.0; 4]);
        let penalty = regularize(&cfg, &mut model, &mut emb, &counts);
        let w = &model.output.weight;
        assert!(
            w.grad.iter().zip(&w.value).all(|(g, v)| (g - 0.5 * v).abs() < 1e-6),
            "{kind:?}: grad = 2 * 0.25 * w"
        );
        let w5 = model.embeddings[item].row(5);
        // counts[item][5] = 1: the same scale under both kinds.
        assert!((emb[item].get(5).expect("row 5")[0] - 2.0 * 0.5 * w5[0]).abs() < 1e-7);
        let mut weights = 0.0;
        model.visit("", &mut |_, p| {
            if p.role == din::model::Role::Weight {
                weights += p.value.iter().map(|v| f64::from(0.25 * v * v)).sum::<f64>();
            }
        });
        let want = weights + 0.5 * sq(w5);
        assert!(
            (penalty - want).abs() < 1e-6 * want.max(1.0),
            "{kind:?}: {penalty} vs {want}"
        );
    }
    // A negative dnn_lambda is refused, naming the field.
    let mut config = bundled();
    config.train.regularization.dnn_lambda = Some(-1.0);
    let err = config.validate().expect_err("negative").to_string();
    assert!(err.contains("train.regularization.dnn_lambda"), "{err}");
}

#[test]
fn regularised_training_runs_with_every_optimizer() {
    for (opt, reg) in [("adam", "mini_batch_aware"), ("adagrad", "l2"), ("sgd", "none")] {
        let mut config = bundled();
        config.train.epochs = 3;
        config.train.learning_rate = if opt == "adam" { 0.001 } else { 0.01 };
        config.train.optimizer = toml::Value::String(opt.into()).try_into().expect("optimizer");
        config.train.regularization = RegularizationConfig {
            kind: toml::Value::String(reg.into()).try_into().expect("kind"),
            lambda: 0.01,
            dnn_lambda: None,
        };
        let data = load_training_data(&config).expect("data");
        let out = fit(&data, &mut Silent).expect(opt);
        let losses: Vec<f64> = out.history.iter().map(|h| h.train_loss).collect();
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[2] < losses[0],
            "{opt}: {losses:?}"
        );
    }
}

#[test]
fn overrides_set_nested_keys_with_toml_or_bare_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml");
    let sets = [
        "model.attention.hidden_units=[80, 40]",
        "model.attention.pooling=sum",
        "train.learning_rate=0.01",
    ];
    let c = Config::from_toml_file_with(&path, &sets.map(String::from)).expect("overrides apply");
    assert_eq!(c.model.attention.hidden_units, vec![80, 40]);
    assert_eq!(c.model.attention.pooling, din::schema::Pooling::Sum);
    assert_eq!(c.train.learning_rate, 0.01);
    assert!(
        c.data.train.as_ref().is_some_and(|p| p.is_absolute()),
        "paths still resolve against the file"
    );
    let err = Config::from_toml_file_with(&path, &["model.attention.pooling=bogus".to_string()]).expect_err("bad");
    let err = err.to_string();
    assert!(
        err.contains("with --set model.attention.pooling=bogus") && err.contains("unknown variant `bogus`"),
        "{err}"
    );
    // A schema-wide embedding width; a feature's own width wins.
    let mut c = Config::from_toml_file_with(&path, &["schema.embedding_dim=32".to_string()]).expect("dim");
    c.schema.sparse.iter_mut().for_each(|f| f.embedding_dim = None);
    c.schema.sparse[0].embedding_dim = Some(4);
    let layout = c.validate().expect("valid");
    let dims: Vec<usize> = layout.tables.iter().map(|t| t.dim).collect();
    assert_eq!(dims[0], 4, "{dims:?}");
    assert!(dims[1..].iter().all(|&d| d == 32), "{dims:?}");
    let err = Config::from_toml_file_with(&path, &["train.epochs.x=1".to_string()]).expect_err("not a table");
    assert!(err.to_string().contains("`epochs` is not a table"), "{err}");
}

#[test]
fn invalid_configs_name_the_field_and_value() {
    let base = bundled();
    type Edit = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c.schema.sparse[0].embedding_dim = Some(0)),
            "schema.sparse[0].embedding_dim`: must be at least 1 (value: 0)",
        ),
        (
            Box::new(|c| {
                c.schema.sparse.iter_mut().for_each(|f| f.embedding_dim = None);
                c.schema.embedding_dim = Some(0);
            }),
            "schema.embedding_dim`: must be at least 1 (value: 0)",
        ),
        (
            Box::new(|c| c.train.learning_rate = -1.0),
            "train.learning_rate`: must be a positive number (value: -1)",
        ),
        (
            Box::new(|c| c.schema.din_pairs[0].target = "nope".into()),
            "schema.din_pairs[0].target`: is not a sparse feature (value: nope)",
        ),
        (
            Box::new(|c| c.schema.sequence[0].shares_embedding_with = Some("ghost".into())),
            "shares_embedding_with`: shares_embedding_with must name a feature",
        ),
        (
            Box::new(|c| c.data.validation_split = Some(1.5)),
            "data.validation_split`: must be in (0, 1) (value: 1.5)",
        ),
        (
            Box::new(|c| c.model.dnn.dropout = 1.0),
            "model.dnn.dropout`: must be in [0, 1) (value: 1)",
        ),
        (
            Box::new(|c| c.model.attention.hidden_units.clear()),
            "model.attention.hidden_units`",
        ),
        (
            Box::new(|c| c.schema.sparse[1].name = "user_id".into()),
            "duplicate feature name",
        ),
        (
            Box::new(|c| {
                c.data.validation_split = None;
                c.train.early_stopping = Some(EarlyStoppingConfig {
                    monitor: Monitor::ValAuc,
                    patience: 2,
                    restore_best: false,
                })
            }),
            "train.early_stopping`: needs validation data",
        ),
        (
            Box::new(|c| {
                c.schema.user = None;
                c.train.early_stopping = Some(EarlyStoppingConfig {
                    monitor: Monitor::ValGauc,
                    patience: 2,
                    restore_best: false,
                })
            }),
            "train.early_stopping.monitor`: GAUC needs schema.user",
        ),
        (
            Box::new(|c| c.input.sequence_separator = "\t".into()),
            "input.sequence_separator`: must differ",
        ),
    ];
    for (edit, want) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let err = c.validate().expect_err(want).to_string();
        assert!(err.contains(want), "{err}\n  wanted: {want}");
    }
    let err = Config::from_toml_str("[schema]\nlabel = 3\n")
        .expect_err("type")
        .to_string();
    assert!(
        err.contains("line 2, column 9: invalid type: integer `3`, expected a string"),
        "{err}"
    );
}

#[test]
fn lazy_adam_updates_only_touched_rows_with_the_global_step() {
    use din::schema::OptimizerKind;
    use din::train::Optimizer;
    let config = common::config("prelu", "none", "prelu");
    let layout = common::layout(&config);
    let mut model = Din::new(&layout, &config.model, 0).expect("model");
    let item = layout.sparse[1].table;
    let before = model.embeddings[item].weight.value.clone();
    let mut opt = Optimizer::new(OptimizerKind::Adam, 0.1, &model);
    let grads = |id: u32| -> Vec<SparseGrad> {
        let mut g: Vec<SparseGrad> = model_dims(&layout).into_iter().map(SparseGrad::new).collect();
        g[item].add(id, &[0.5, -0.5, 0.5, -0.5]);
        g
    };
    model.zero_grad();
    opt.step(&mut model, &grads(3)); // step 1 touches row 3
    opt.step(&mut model, &grads(5)); // step 2 touches row 5 only
    let after = &model.embeddings[item].weight.value;
    let d = 4;
    for row in 0..12 {
        let (b, a) = (&before[row * d..(row + 1) * d], &after[row * d..(row + 1) * d]);
        if row == 3 || row == 5 {
            // Row 5's first update uses step t = 2: lr_t = 0.1 * sqrt(1 - 0.999^2) / (1 - 0.9^2),
            // m = 0.1 g, v = 0.001 g^2, so the step is lr_t * 0.1 |g| / (sqrt(0.001) |g| + 1e-7).
            // Row 3's (t = 1) is 0.1 * sqrt(0.001) / 0.1 * 0.1 |g| / (sqrt(0.001)|g| + 1e-7) ~ 0.1.
            let t: i32 = if row == 5 { 2 } else { 1 };
            let lr_t = 0.1 * (1.0f64 - 0.999f64.powi(t)).sqrt() / (1.0 - 0.9f64.powi(t));
            let step = lr_t * 0.1 * 0.5 / (0.001f64.sqrt() * 0.5 + 1e-7);
            for j in 0..d {
                let want = f64::from(b[j]) - step * if j % 2 == 0 { 1.0 } else { -1.0 };
                assert!(
                    (f64::from(a[j]) - want).abs() < 1e-5,
                    "row {row}[{j}]: {} vs {want}",
                    a[j]
                );
            }
        } else {
            assert_eq!(a, b, "row {row} was not in any batch and must not move");
        }
    }
}

fn model_dims(layout: &din::schema::Layout) -> Vec<usize> {
    layout.tables.iter().map(|t| t.dim).collect()
}

/// PReLU, and Dice (whose batch statistics the chunked attention reduces
/// over its chunks between passes) with its moving averages.
#[test]
fn training_gives_the_same_model_for_any_thread_count() {
    let mut config = bundled();
    config.train.epochs = 1;
    config.train.batch_size = 256; // several attention chunks per batch
    config.model.attention.hidden_units = vec![64, 32]; // large enough for gemm's parallel path
    for (activation, precision) in [
        (ActivationKind::Prelu, Precision::Fp32),
        (ActivationKind::Dice, Precision::Fp32),
        (ActivationKind::Prelu, Precision::Bf16),
    ] {
        config.model.attention.activation = activation;
        config.train.precision = precision;
        let mut models = Vec::new();
        for threads in [1, 2, 3] {
            config.train.threads = threads;
            let data = load_training_data(&config).expect("data");
            models.push(weights(&fit(&data, &mut Silent).expect("fit").model));
        }
        for m in &models[1..] {
            assert!(
                m == &models[0],
                "{activation:?}/{precision}: the weights depend on the thread count"
            );
        }
    }
}

/// `train.precision = "bf16"` reaches the training passes (another model
/// than FP32's, from the same start and batches) and learns as FP32 does:
/// each epoch's training loss within 0.02 of FP32's.
#[test]
fn mixed_precision_training_learns_like_fp32() {
    let mut config = bundled();
    config.train.epochs = 3;
    let mut runs = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16] {
        config.train.precision = precision;
        let data = load_training_data(&config).expect("data");
        let out = fit(&data, &mut Silent).expect("fit");
        let losses: Vec<f64> = out.history.iter().map(|e| e.train_loss).collect();
        runs.push((weights(&out.model), losses));
    }
    assert!(runs[0].0 != runs[1].0, "bf16 products change the weights");
    let (fp32, bf16) = (&runs[0].1, &runs[1].1);
    assert!(bf16[2] < bf16[0], "bf16 learns: {bf16:?}");
    for (f, b) in fp32.iter().zip(bf16) {
        assert!((f - b).abs() < 0.02, "training loss fp32 {fp32:?}, bf16 {bf16:?}");
    }
}

#[test]
fn a_table_too_large_to_allocate_is_an_error_not_an_abort() {
    let mut config = common::config("prelu", "none", "prelu");
    config.schema.sparse[0].vocab_size = Some(4_000_000_000);
    config.schema.sparse[0].embedding_dim = Some(100_000);
    let layout = common::layout(&config);
    let err = Din::new(&layout, &config.model, 0).expect_err("1.6 PB").to_string();
    assert!(
        err.contains("embedding table `user`") && err.contains("cannot be allocated"),
        "{err}"
    );
}

/// Found by the config fuzz target: small tables of huge rows passed the
/// table check, and the DNN's first weight matrix (its input is every
/// embedding's width) aborted the process when it could not be allocated.
#[test]
fn dense_layers_too_large_to_allocate_are_an_error_not_an_abort() {
    let mut config = common::config("prelu", "none", "prelu");
    config.schema.sparse[0].vocab_size = Some(1);
    config.schema.sparse[0].embedding_dim = Some(1 << 20);
    config.model.dnn.hidden_units = vec![1 << 26];
    let layout = common::layout(&config);
    let err = Din::new(&layout, &config.model, 0).expect_err("256 TB").to_string();
    assert!(
        err.contains("model.dnn.hidden_units") && err.contains("cannot be allocated"),
        "{err}"
    );
    let mut config = common::config("prelu", "none", "prelu");
    config.model.attention.hidden_units = vec![usize::MAX / 2, 4];
    let layout = common::layout(&config);
    let err = Din::new(&layout, &config.model, 0).expect_err("overflow").to_string();
    assert!(err.contains("model.attention.hidden_units"), "{err}");
}

/// Injects a NaN into one gradient of one batch: the dense tensor `tensor`
/// (element 0), or row `row` of embedding table 0.
struct Inject {
    at: (usize, usize),
    tensor: Option<&'static str>,
    skipped: Vec<(usize, usize, String)>,
}

impl din::train::Observer for Inject {
    fn on_gradients(
        &mut self,
        epoch: usize,
        batch: usize,
        model: &mut Din,
        embeddings: &mut din::model::EmbeddingGrads,
    ) {
        if (epoch, batch) != self.at {
            return;
        }
        match self.tensor {
            Some(tensor) => model.visit_mut("", &mut |name, p| {
                if name == tensor {
                    p.grad[0] = f32::NAN;
                }
            }),
            None => embeddings[0].grads[0] = f32::INFINITY,
        }
    }
    fn on_skipped_batch(&mut self, epoch: usize, batch: usize, reason: &str) {
        self.skipped.push((epoch, batch, reason.to_string()));
    }
}

/// A NaN in a gradient is caught in the step where it appears and named;
/// by default the run stops there, and with `skip_batch` that batch leaves
/// the weights as they were and is counted.
#[test]
fn a_non_finite_gradient_is_named_and_stops_or_skips_the_batch() {
    let mut config = bundled();
    config.train.epochs = 2;
    let data = load_training_data(&config).expect("data");
    let table = data.layout.tables[0].name.clone();
    for (tensor, named) in [
        (
            Some("dnn.layers.0.weight"),
            "the gradient of `dnn.layers.0.weight` is NaN (element 0)".to_string(),
        ),
        (None, format!("the gradient of `embeddings.{table}.weight` row")),
    ] {
        let mut inject = Inject {
            at: (2, 3),
            tensor,
            skipped: Vec::new(),
        };
        let err = fit(&data, &mut inject).map(|_| ()).expect_err("stops").to_string();
        assert!(
            err.contains(&named) && err.contains("at epoch 2, batch 3 of 16"),
            "{err}"
        );

        let mut skip = data.clone();
        skip.config.train.on_non_finite = din::schema::OnNonFinite::SkipBatch;
        let mut inject = Inject {
            at: (2, 3),
            tensor,
            skipped: Vec::new(),
        };
        let out = fit(&skip, &mut inject).expect("skips and goes on");
        assert_eq!(inject.skipped.len(), 1);
        assert_eq!((inject.skipped[0].0, inject.skipped[0].1), (2, 3));
        assert!(inject.skipped[0].2.contains(&named), "{:?}", inject.skipped);
        assert_eq!(
            out.history.iter().map(|h| h.skipped_batches).collect::<Vec<_>>(),
            [0, 1]
        );
        let mut finite = true;
        out.model
            .visit("", &mut |_, p| finite &= p.value.iter().all(|v| v.is_finite()));
        assert!(finite, "the skipped batch did not touch the weights");
        // Epoch 1 is the same as without the fault, bit for bit.
        let clean = fit(&data, &mut Silent).expect("clean");
        assert_eq!(
            out.history[0].train_loss.to_bits(),
            clean.history[0].train_loss.to_bits()
        );
        assert_ne!(
            out.history[1].train_loss.to_bits(),
            clean.history[1].train_loss.to_bits(),
            "one batch fewer in epoch 2"
        );
    }
}
