//! Damaged model directories: each kind of damage is refused by the one
//! loader every front end uses (`checkpoint::load_model`), with an error
//! naming the file and what is wrong; none panics, none loads as another
//! model.

use std::fs;
use std::path::{Path, PathBuf};

use din::checkpoint::{fingerprint, load_model, save_with_assets, CONFIG_FILE, ITEMS_FILE, VOCAB_FILE, WEIGHTS_FILE};
use din::model::Din;
use din::prepare::{prepare, read_log, LogSpec, PrepareOptions};
use din::schema::Config;
use din::train::load_training_data;
use serde_json::{json, Value};

/// A saved model with a vocabulary and an item table, and its config.json.
fn saved(dir: &Path) -> (PathBuf, Value) {
    let log = dir.join("log.csv");
    let mut text = String::from("user_id,item_id,category_id,timestamp\n");
    for u in 0..6 {
        for e in 0..5 {
            text.push_str(&format!(
                "u{u},i{},c{},{}\n",
                (u * 3 + e) % 9,
                (u * 3 + e) % 9 % 4,
                10 * e
            ));
        }
    }
    fs::write(&log, text).expect("write");
    let log = read_log(
        &LogSpec::csv(log, "user_id", "item_id", "category_id", "timestamp"),
        false,
    )
    .expect("log");
    let prepared = dir.join("prepared");
    prepare(&log, &PrepareOptions::default(), &prepared).expect("prepare");
    let config = Config::from_toml_file(&prepared.join("config.toml")).expect("config");
    let data = load_training_data(&config).expect("data");
    let model = Din::new(&data.layout, &data.config.model, 1).expect("model");
    let out = dir.join("model");
    save_with_assets(&out, &data.config, &model, &data.assets, None).expect("save");
    let json = serde_json::from_slice(&fs::read(out.join(CONFIG_FILE)).expect("read")).expect("json");
    (out, json)
}

/// Rewrites config.json with `doc`, its fingerprints recomputed so that
/// only the damage under test remains (when `refresh`).
fn write_config(dir: &Path, mut doc: Value, refresh: bool) {
    if refresh {
        let fp = |name: &str| fingerprint(&fs::read(dir.join(name)).unwrap_or_default());
        doc["weights_fingerprint"] = json!(fp(WEIGHTS_FILE));
        doc["vocab_fingerprint"] = json!(fp(VOCAB_FILE));
        doc["items_fingerprint"] = json!(fp(ITEMS_FILE));
    }
    fs::write(dir.join(CONFIG_FILE), serde_json::to_vec_pretty(&doc).expect("json")).expect("write");
}

/// A tensor as stored: name, shape, bytes, dtype.
type Stored = (String, Vec<usize>, Vec<u8>, safetensors::Dtype);

/// A safetensors file of `tensors`.
fn safetensors_of(tensors: Vec<Stored>) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// The weights file's tensors, to rebuild variants of it.
fn tensors(dir: &Path) -> Vec<Stored> {
    let bytes = fs::read(dir.join(WEIGHTS_FILE)).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid");
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec(), t.dtype()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

type Damage = Box<dyn Fn(&Path, &Value)>;

#[test]
fn every_kind_of_damage_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (pristine, doc) = saved(tmp.path());
    load_model(&pristine).expect("the undamaged model loads");
    let set = |f: fn(&mut Value)| -> Damage {
        Box::new(move |d: &Path, doc: &Value| {
            let mut doc = doc.clone();
            f(&mut doc);
            write_config(d, doc, false);
        })
    };
    // A file's content replaced, the fingerprints in config.json refreshed,
    // so that only what the content itself is can be refused.
    // config.json without one of its top-level fields.
    let without = |key: &'static str| -> Damage {
        Box::new(move |d: &Path, doc: &Value| {
            let mut doc = doc.clone();
            doc.as_object_mut().map(|o| o.remove(key));
            write_config(d, doc, false);
        })
    };
    let replaced = |name: &'static str, content: &'static [u8]| -> Damage {
        Box::new(move |d: &Path, doc: &Value| {
            fs::write(d.join(name), content).expect("write");
            write_config(d, doc.clone(), true);
        })
    };
    // items.json edited as JSON, fingerprints refreshed.
    let items = |f: fn(&mut Value)| -> Damage {
        Box::new(move |d: &Path, doc: &Value| {
            let mut j: Value = serde_json::from_slice(&fs::read(d.join(ITEMS_FILE)).expect("read")).expect("json");
            f(&mut j);
            fs::write(d.join(ITEMS_FILE), j.to_string()).expect("write");
            write_config(d, doc.clone(), true);
        })
    };
    let weights = |f: fn(&mut Vec<Stored>)| -> Damage {
        Box::new(move |d: &Path, doc: &Value| {
            let mut t = tensors(d);
            f(&mut t);
            fs::write(d.join(WEIGHTS_FILE), safetensors_of(t)).expect("write");
            write_config(d, doc.clone(), true);
        })
    };
    let bytes = |name: &'static str, f: fn(&mut Vec<u8>)| -> Damage {
        Box::new(move |d: &Path, _| {
            let mut b = fs::read(d.join(name)).expect("read");
            f(&mut b);
            fs::write(d.join(name), b).expect("write");
        })
    };
    let cases: Vec<(&str, Damage, Vec<&str>)> = vec![
        (
            "no config.json",
            Box::new(|d, _| fs::remove_file(d.join(CONFIG_FILE)).expect("rm")),
            vec!["config.json", "cannot read"],
        ),
        (
            "empty config.json",
            bytes(CONFIG_FILE, |b| b.clear()),
            vec!["config.json", "invalid config"],
        ),
        (
            "config.json not JSON",
            bytes(CONFIG_FILE, |b| b.splice(0..1, *b"<").for_each(drop)),
            vec!["config.json", "invalid config"],
        ),
        (
            "truncated config.json",
            bytes(CONFIG_FILE, |b| b.truncate(b.len() / 2)),
            vec!["config.json", "invalid config"],
        ),
        (
            "config.json without its config",
            without("config"),
            vec!["config.json", "missing field `config`"],
        ),
        (
            "format version 0",
            set(|d| d["format_version"] = json!(0)),
            vec!["config.json", "format_version 0 is not supported"],
        ),
        (
            "a future format version",
            set(|d| d["format_version"] = json!(99)),
            vec!["config.json", "format_version 99 is not supported"],
        ),
        (
            "a format version that is not a number",
            set(|d| d["format_version"] = json!("2")),
            vec!["config.json", "invalid config"],
        ),
        (
            "config edited: pooling",
            set(|d| d["config"]["model"]["attention"]["pooling"] = json!("sum")),
            vec!["config.json", "edited after saving"],
        ),
        (
            "config edited: max_len",
            set(|d| d["config"]["schema"]["sequence"][0]["max_len"] = json!(3)),
            vec!["config.json", "edited after saving"],
        ),
        (
            "config fingerprint removed",
            without("config_fingerprint"),
            vec!["config.json", "requires config_fingerprint"],
        ),
        (
            // Found by the model-directory fuzz target: the key lost a
            // letter, and the model loaded without its vocabulary.
            "vocab fingerprint key misspelt",
            set(|d| {
                let o = d.as_object_mut().expect("object");
                let v = o.remove("vocab_fingerprint").expect("there");
                o.insert("ocab_fingerprint".into(), v);
            }),
            vec!["config.json", "unknown field `ocab_fingerprint`"],
        ),
        (
            "vocab fingerprint removed, vocab.json still there",
            without("vocab_fingerprint"),
            vec!["config.json", "does not list vocab.json"],
        ),
        (
            "items fingerprint removed, items.json still there",
            without("items_fingerprint"),
            vec!["config.json", "does not list items.json"],
        ),
        (
            "no weights",
            Box::new(|d, _| fs::remove_file(d.join(WEIGHTS_FILE)).expect("rm")),
            vec!["model.safetensors", "cannot read"],
        ),
        (
            "weights a folder",
            Box::new(|d, _| {
                fs::remove_file(d.join(WEIGHTS_FILE)).expect("rm");
                fs::create_dir(d.join(WEIGHTS_FILE)).expect("mkdir");
            }),
            vec!["model.safetensors", "cannot read"],
        ),
        (
            "empty weights",
            bytes(WEIGHTS_FILE, |b| b.clear()),
            vec!["model.safetensors", "does not match config.json"],
        ),
        (
            "truncated weights",
            bytes(WEIGHTS_FILE, |b| b.truncate(b.len() - 7)),
            vec!["model.safetensors", "does not match config.json"],
        ),
        (
            "one bit flipped in the data",
            bytes(WEIGHTS_FILE, |b| {
                let n = b.len() - 3;
                b[n] ^= 0x10;
            }),
            vec!["model.safetensors", "does not match config.json"],
        ),
        (
            "one bit flipped in the header",
            bytes(WEIGHTS_FILE, |b| b[12] ^= 0x01),
            vec!["model.safetensors", "does not match config.json"],
        ),
        (
            "a header that is not safetensors (fingerprint matched)",
            replaced(WEIGHTS_FILE, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk"),
            vec!["model.safetensors"],
        ),
        (
            "a tensor missing",
            weights(|t| {
                t.retain(|x| x.0 != "output.bias");
            }),
            vec!["model.safetensors", "`output.bias`: missing"],
        ),
        (
            "an extra tensor",
            weights(|t| t.push(("extra.weight".into(), vec![1], vec![0; 4], safetensors::Dtype::F32))),
            vec!["model.safetensors", "`extra.weight` is not part of the model"],
        ),
        (
            "a wrong shape",
            weights(|t| {
                let x = t.iter_mut().find(|x| x.0 == "output.weight").expect("there");
                x.1 = vec![1, x.1[0]];
            }),
            vec!["model.safetensors", "`output.weight`: shape"],
        ),
        (
            "a wrong dtype",
            weights(|t| {
                let x = t.iter_mut().find(|x| x.0 == "output.bias").expect("there");
                x.3 = safetensors::Dtype::I32;
            }),
            vec!["model.safetensors", "`output.bias`: dtype"],
        ),
        (
            "two tensors' names swapped",
            weights(|t| {
                let i = t.iter().position(|x| x.0 == "dnn.layers.0.bias").expect("b");
                let j = t.iter().position(|x| x.0 == "dnn.layers.0.weight").expect("w");
                let n = t[i].0.clone();
                t[i].0 = t[j].0.clone();
                t[j].0 = n;
            }),
            vec!["model.safetensors", "shape"],
        ),
        (
            "a NaN weight",
            weights(|t| {
                let x = t.iter_mut().find(|x| x.0 == "output.bias").expect("there");
                x.2 = f32::NAN.to_le_bytes().to_vec();
            }),
            vec!["model.safetensors", "`output.bias`: holds a NaN"],
        ),
        (
            "an infinite weight",
            weights(|t| {
                let x = t.iter_mut().find(|x| x.0 == "output.weight").expect("there");
                x.2[..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
            }),
            vec!["model.safetensors", "holds a NaN or infinite value"],
        ),
        (
            "weights from another save",
            Box::new(|d, doc| {
                let mut t = tensors(d);
                t.iter_mut()
                    .for_each(|x| x.2.iter_mut().for_each(|b| *b = b.wrapping_add(1)));
                fs::write(d.join(WEIGHTS_FILE), safetensors_of(t)).expect("write");
                write_config(d, doc.clone(), false);
            }),
            vec!["model.safetensors", "different saves"],
        ),
        (
            "no vocab.json",
            Box::new(|d, _| fs::remove_file(d.join(VOCAB_FILE)).expect("rm")),
            vec!["vocab.json", "cannot read"],
        ),
        (
            "vocab.json changed",
            bytes(VOCAB_FILE, |b| {
                let i = b.iter().position(|&c| c == b'i').expect("a raw item");
                b[i] = b'v';
            }),
            vec!["vocab.json", "does not match config.json"],
        ),
        (
            "vocab.json not JSON (fingerprint matched)",
            replaced(VOCAB_FILE, b"[1,"),
            vec!["vocab.json"],
        ),
        (
            "no items.json",
            Box::new(|d, _| fs::remove_file(d.join(ITEMS_FILE)).expect("rm")),
            vec!["items.json", "cannot read"],
        ),
        (
            "items.json changed",
            bytes(ITEMS_FILE, |b| b.push(b' ')),
            vec!["items.json", "does not match config.json"],
        ),
        (
            "items.json too short (fingerprint matched)",
            items(|j| j["features"]["cate_id"]["values"] = json!([0, 1])),
            vec!["items.json", "has 2 items"],
        ),
        (
            "items.json with a category outside its table (fingerprint matched)",
            items(|j| j["features"]["cate_id"]["values"][1] = json!(999)),
            vec!["items.json", "outside its table"],
        ),
    ];
    assert!(cases.len() >= 20);
    for (what, damage, needles) in cases {
        let dir = tmp.path().join("case");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).expect("mkdir");
        for e in fs::read_dir(&pristine).expect("ls") {
            let e = e.expect("entry");
            fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
        }
        damage(&dir, &doc);
        let err = match std::panic::catch_unwind(|| load_model(&dir).map(|_| ())) {
            Ok(Ok(())) => panic!("{what}: loaded"),
            Ok(Err(e)) => e.to_string(),
            Err(_) => panic!("{what}: panicked"),
        };
        for n in needles {
            assert!(err.contains(n), "{what}: {n:?} not in {err:?}");
        }
    }
    // Not a directory at all.
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").expect("write");
    let err = load_model(&file).map(|_| ()).expect_err("a file").to_string();
    assert!(err.contains("config.json") && err.contains("cannot read"), "{err}");
}
