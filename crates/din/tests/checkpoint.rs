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

/// What the file holds under each name is the model's tensor as the model
/// uses it: the same shape and the same f32 values, little-endian, in the
/// same (row-major, `[in, out]` for weights) order. Together with the
/// layers' own tests of what a named tensor means, this pins the on-disk
/// layout: a save and a load that both transposed, or both swapped two
/// tensors, would fail here.
#[test]
fn the_file_holds_each_tensor_as_the_model_uses_it() {
    let (config, model) = trained("dice", "dice");
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, None).expect("save");
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut seen = 0;
    model.visit("", &mut |name, p| {
        let t = st.tensor(&name).expect("present");
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), p.shape.as_slice(), "{name}");
        let raw: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(
            raw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            p.value.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{name}"
        );
        seen += 1;
    });
    assert_eq!(seen, st.names().len());
    // Non-square weights, so that a transposition could not pass unnoticed.
    let w = st.tensor("dnn.layers.1.weight").expect("present");
    assert_eq!(w.shape(), &[5, 3], "[in, out]: 5 inputs, 3 units");
    // Dice's variance is positive, its mean has moved from 0 (the two differ).
    let var = st.tensor("dnn.layers.0.activation.running_var").expect("present");
    assert!(var
        .data()
        .chunks_exact(4)
        .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) > 0.0));
}

/// `config.json` is covered too: a hand edit of the config that would load
/// and change every score is refused, and so are weights that are not
/// finite, a wrong format version, and a version-2 file without the config
/// fingerprint. A version-1 file (before the fingerprint) still loads.
#[test]
fn edited_configs_non_finite_weights_and_unknown_versions_are_refused() {
    let (config, model) = trained("prelu", "prelu");
    let dir = tempfile::tempdir().expect("tmp");
    save(dir.path(), &config, &model, None).expect("save");
    let config_path = dir.path().join(CONFIG_FILE);
    let saved = std::fs::read(&config_path).expect("read");
    let json: serde_json::Value = serde_json::from_slice(&saved).expect("json");
    let load_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        edit(&mut j);
        std::fs::write(&config_path, serde_json::to_vec_pretty(&j).expect("json")).expect("write");
        load(dir.path()).map(|_| ()).map_err(|e| e.to_string())
    };
    // Edits that keep every tensor's shape, so only the fingerprint can tell.
    type Edit<'a> = (&'a str, &'a dyn Fn(&mut serde_json::Value));
    let edits: [Edit; 4] = [
        ("normalization", &|j| {
            j["config"]["model"]["attention"]["normalization"] = "none".into()
        }),
        ("pooling", &|j| {
            j["config"]["model"]["attention"]["pooling"] = "sum".into()
        }),
        ("max_len", &|j| {
            j["config"]["schema"]["sequence"][0]["max_len"] = 2.into()
        }),
        ("activation", &|j| {
            j["config"]["model"]["dnn"]["activation"] = "sigmoid".into()
        }),
    ];
    for (what, edit) in edits {
        let err = load_with(edit).expect_err(what);
        assert!(
            err.contains("config.json") && err.contains("edited after saving"),
            "{what}: {err}"
        );
    }
    // A config written before a field existed (so without it) loads: the
    // fingerprint covers the config as written, not as this build reads it.
    load_with(&|j| {
        j["config"]["train"].as_object_mut().map(|o| o.remove("on_non_finite"));
        j["config_fingerprint"] = din::checkpoint::fingerprint(j["config"].to_string().as_bytes()).into();
    })
    .expect("an older config without a newer field");
    // Reformatting alone (the same config) is fine.
    load_with(&|_| {}).expect("the same config, pretty-printed again");

    let err = load_with(&|j| j["format_version"] = 3.into()).expect_err("future version");
    assert!(err.contains("format_version 3 is not supported"), "{err}");
    let err = load_with(&|j| {
        j.as_object_mut().map(|o| o.remove("config_fingerprint"));
    })
    .expect_err("version 2 without the fingerprint");
    assert!(err.contains("requires config_fingerprint"), "{err}");
    load_with(&|j| {
        j["format_version"] = 1.into();
        j.as_object_mut().map(|o| o.remove("config_fingerprint"));
    })
    .expect("a version-1 directory loads");

    // A NaN or an infinity in any tensor (with a matching fingerprint, as a
    // diverged run would save it).
    for (tensor, bad) in [("output.bias", f32::NAN), ("dnn.layers.1.weight", f32::INFINITY)] {
        let mut broken = model.clone();
        broken.visit_mut("", &mut |name, p| {
            if name == tensor {
                if let Some(last) = p.value.last_mut() {
                    *last = bad;
                }
            }
        });
        let dir = tempfile::tempdir().expect("tmp");
        save(dir.path(), &config, &broken, None).expect("save");
        let err = load(dir.path()).map(|_| ()).expect_err("not finite").to_string();
        assert!(
            err.contains("model.safetensors") && err.contains(&format!("`{tensor}`: holds a NaN or infinite value")),
            "{err}"
        );
    }
}
