//! Model directory round trips: names pinned, bitwise-identical predictions,
//! Dice statistics kept, corrupt directories rejected.

mod common;

use din::checkpoint::{load, save, CONFIG_FILE, WEIGHTS_FILE};
use din::model::{Din, Mode, Module};
use din::train::{bce_with_logits, Optimizer};

/// A model trained for a few steps, so that nothing is at its initial value
/// (Dice moving averages included).
fn trained(attention: &str, dnn: &str) -> (din::schema::Config, Din) {
    let config = common::config(attention, "softmax", dnn);
    let layout = common::layout(&config);
    let batch = common::batch();
    let mut model = Din::new(&layout, &config.model, 3).expect("model");
    let mut opt = Optimizer::new(din::schema::OptimizerKind::Adam, 0.01, &model);
    for _ in 0..5 {
        let (logits, mut cache) = model.forward(&batch, Mode::Train, None);
        let mut d = Vec::new();
        bce_with_logits(&logits, &batch.labels, &mut d);
        model.zero_grad();
        let emb = model.backward(&batch, &mut cache, &d);
        opt.step(&mut model, &emb);
        model.update_statistics(&cache);
    }
    model.zero_grad(); // gradients are not saved
    (config, model)
}

#[test]
fn save_load_predict_is_bitwise_identical() {
    for (att, dnn) in [("dice", "dice"), ("prelu", "prelu")] {
        let (config, model) = trained(att, dnn);
        let dir = tempfile::tempdir().expect("tmp");
        save(dir.path(), &config, &model, None).expect("save");
        let (config2, _, loaded) = load(dir.path()).expect("load");
        assert_eq!(config2, config);
        assert_eq!(loaded, model, "every tensor, Dice statistics included, survives");
        let batch = common::batch();
        let (a, b) = (model.predict(&batch), loaded.predict(&batch));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn dice_statistics_switch_between_training_and_inference_and_are_saved() {
    let (config, model) = trained("dice", "dice");
    let mut stats = 0;
    model.visit("", &mut |name, p| {
        if name.ends_with("running_mean") {
            stats += 1;
            assert!(p.value.iter().any(|v| *v != 0.0), "{name} moved from its initial zeros");
        }
    });
    assert_eq!(stats, 4, "two attention and two DNN Dice layers");
    let batch = common::batch();
    let (train_logits, _) = model.forward(&batch, Mode::Train, None);
    let infer = model.forward(&batch, Mode::Infer, None).0;
    assert_ne!(
        train_logits, infer,
        "inference uses moving averages, not batch statistics"
    );
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, None).expect("save");
    let (_, _, loaded) = load(dir.path()).expect("load");
    assert_eq!(loaded.forward(&batch, Mode::Infer, None).0, infer);
}

#[test]
fn tensor_names_are_field_paths() {
    let (config, model) = trained("dice", "prelu");
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, None).expect("save");
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<&str> = st.names();
    names.sort();
    let want = [
        "attention.layers.0.activation.alpha",
        "attention.layers.0.activation.running_mean",
        "attention.layers.0.activation.running_var",
        "attention.layers.0.bias",
        "attention.layers.0.weight",
        "attention.layers.1.activation.alpha",
        "attention.layers.1.activation.running_mean",
        "attention.layers.1.activation.running_var",
        "attention.layers.1.bias",
        "attention.layers.1.weight",
        "attention.output.bias",
        "attention.output.weight",
        "dnn.layers.0.activation.alpha",
        "dnn.layers.0.bias",
        "dnn.layers.0.weight",
        "dnn.layers.1.activation.alpha",
        "dnn.layers.1.bias",
        "dnn.layers.1.weight",
        "embeddings.cate.weight",
        "embeddings.item.weight",
        "embeddings.tags.weight",
        "embeddings.user.weight",
        "output.bias",
        "output.weight",
    ];
    assert_eq!(names, want);
    // [q, k, q-k, q*k] with q = item (4) + cate (2) => 24 inputs, 6 units.
    assert_eq!(
        st.tensor("attention.layers.0.weight").expect("present").shape(),
        &[24, 6]
    );
    assert_eq!(st.tensor("embeddings.item.weight").expect("present").shape(), &[12, 4]);
}

#[test]
fn corrupt_or_mismatched_directories_are_rejected_with_the_file_named() {
    let (config, model) = trained("prelu", "prelu");
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, None).expect("save");
    // A config whose shapes disagree with the weights.
    let mut other = config.clone();
    other.model.dnn.hidden_units = vec![7, 3];
    let dir2 = tempfile::tempdir().expect("tmp");
    save(
        dir2.path(),
        &other,
        &Din::new(&common::layout(&other), &other.model, 0).expect("model"),
        None,
    )
    .expect("save");
    std::fs::copy(dir.path().join(WEIGHTS_FILE), dir2.path().join(WEIGHTS_FILE)).expect("copy");
    // Weights from another save: the fingerprint in config.json tells.
    let err = load(dir2.path()).expect_err("other save").to_string();
    assert!(err.contains("model.safetensors: does not match config.json"), "{err}");
    // Even with a matching fingerprint, shapes are checked against the config.
    let config_path = dir2.path().join(CONFIG_FILE);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).expect("read")).expect("json");
    let weights = std::fs::read(dir2.path().join(WEIGHTS_FILE)).expect("read");
    json["weights_fingerprint"] = serde_json::Value::String(din::checkpoint::fingerprint(&weights));
    std::fs::write(&config_path, serde_json::to_vec(&json).expect("json")).expect("write");
    let err = load(dir2.path()).expect_err("shape mismatch").to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("dnn.layers.0.weight") && err.contains("shape"),
        "{err}"
    );
    // Truncated weights.
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).expect("read");
    std::fs::write(dir.path().join(WEIGHTS_FILE), &bytes[..bytes.len() / 2]).expect("truncate");
    let err = load(dir.path()).expect_err("truncated").to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // No config.
    std::fs::remove_file(dir.path().join(CONFIG_FILE)).expect("rm");
    let err = load(dir.path()).expect_err("no config").to_string();
    assert!(err.contains("config.json") && err.contains("cannot read"), "{err}");
}

#[test]
fn saving_leaves_no_temporary_files() {
    let (config, model) = trained("prelu", "prelu");
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, Some(&[])).expect("save");
    save(dir.path(), &config, &model, Some(&[])).expect("overwrite");
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["config.json", "history.json", "model.safetensors"]);
}
