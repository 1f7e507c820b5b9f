//! A small trained model with a vocabulary and an item table, in raw ids.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use din::checkpoint::save_with_assets;
use din::model::Precision;
use din::prepare::{prepare, read_log, LogSpec, PrepareOptions};
use din::schema::Config;
use din::train::{fit, load_training_data, Silent};
use din_server::{build_state, AppState, Limits, ServeConfig};
use serde_json::{json, Value};

/// Prepares a log of 30 users over 40 items (item `i<k>` in category
/// `c<k % 5>`, users `u0`..`u29`), trains one epoch of a small model with
/// `seed` and saves it to `out`.
pub fn train_model(work: &Path, out: &Path, seed: u64) {
    std::fs::create_dir_all(work).expect("work folder");
    let log_path = work.join("log.csv");
    let mut text = String::from("user,item,cate,ts\n");
    for u in 0..30u32 {
        for e in 0..12u32 {
            let item = (u * 7 + e * 11) % 40;
            let _ = writeln!(text, "u{u},i{item},c{},{}", item % 5, 1000 + e * 10 + u);
        }
    }
    std::fs::write(&log_path, text).expect("write log");
    let spec = LogSpec::csv(log_path, "user", "item", "cate", "ts");
    let log = read_log(&spec, false).expect("log reads");
    let prepared = work.join("prepared");
    let options = PrepareOptions {
        max_len: 8,
        // A user-id embedding, so that requests carry a raw user id too.
        user_feature: true,
        ..PrepareOptions::default()
    };
    prepare(&log, &options, &prepared).expect("prepare");
    let sets = [
        "model.attention.hidden_units=[8,4]".to_string(),
        "model.dnn.hidden_units=[6]".to_string(),
        "train.epochs=1".to_string(),
        format!("train.seed={seed}"),
    ];
    let config = Config::from_toml_file_with(&prepared.join("config.toml"), &sets).expect("config");
    let data = load_training_data(&config).expect("data");
    let outcome = fit(&data, &mut Silent).expect("fit");
    save_with_assets(out, &data.config, &outcome.model, &data.assets, None).expect("save");
}

/// A trained model in `dir/model` and the server state over it.
pub fn state(dir: &Path, limits: Limits) -> (Arc<AppState>, PathBuf) {
    let model = dir.join("model");
    train_model(dir, &model, 1);
    (state_over(&model, limits), model)
}

/// Server state over the model (or version folder) `model`.
pub fn state_over(model: &Path, limits: Limits) -> Arc<AppState> {
    state_with_precision(model, limits, None)
}

/// [`state_over`] scoring in `precision` (`din serve --precision`).
pub fn state_with_precision(model: &Path, limits: Limits, precision: Option<Precision>) -> Arc<AppState> {
    build_state(&ServeConfig {
        model: model.to_path_buf(),
        addr: "127.0.0.1:0".parse().expect("addr"),
        threads: 2,
        io_threads: 1,
        limits,
        precision,
    })
    .expect("state")
}

/// A valid request: user `u3` with history i1, i8, i15 and `n` candidates.
pub fn request(n: usize) -> Value {
    let candidates: Vec<Value> = (0..n).map(|i| json!({ "item_id": format!("i{}", i % 40) })).collect();
    json!({
        "user": { "user_id": "u3", "hist_item_id": ["i1", "i8", "i15"] },
        "candidates": candidates,
    })
}
