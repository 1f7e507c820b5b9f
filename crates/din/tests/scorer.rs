//! Scoring requests in raw ids: the model directory's vocabulary and item
//! table, scores equal to `din predict` on the equivalent rows, explanations,
//! truncation, and every error path of a request.

mod common;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use din::checkpoint::{self, load_model, save_with_assets, Assets, ITEMS_FILE, VOCAB_FILE};
use din::data::{ItemTable, Vocabulary};
use din::prepare::{prepare, read_log, read_movielens, LogSpec, PrepareOptions};
use din::schema::Config;
use din::scorer::Scorer;
use din::train::{fit, load_training_data, Silent};
use din::Error;
use serde_json::{json, Map, Value};

/// A behaviour log: 30 users x 12 events over 40 items, each item in one
/// of 5 categories.
fn write_log(path: &Path) {
    let mut text = String::from("user,item,cate,ts\n");
    for u in 0..30u32 {
        for e in 0..12u32 {
            let item = (u * 7 + e * 11) % 40;
            let _ = writeln!(text, "u{u},i{item},c{},{}", item % 5, 1000 + e * 10 + u);
        }
    }
    std::fs::write(path, text).expect("write log");
}

/// Prepares `log` (max_len 6, so long histories are truncated), trains one
/// epoch of a small model and saves it with its vocabulary and item table.
fn trained(dir: &Path) -> (Scorer, PathBuf) {
    let log_path = dir.join("log.csv");
    write_log(&log_path);
    let spec = LogSpec::csv(log_path, "user", "item", "cate", "ts");
    let log = read_log(&spec, false).expect("log reads");
    let options = PrepareOptions {
        max_len: 6,
        // A user-id embedding, so that requests carry a raw user id too.
        user_feature: true,
        ..PrepareOptions::default()
    };
    let prepared = dir.join("prepared");
    prepare(&log, &options, &prepared).expect("prepare");
    train_prepared(&prepared, &dir.join("model"), &[])
}

fn train_prepared(prepared: &Path, out: &Path, extra: &[&str]) -> (Scorer, PathBuf) {
    let mut sets: Vec<String> = [
        "model.attention.hidden_units=[8,4]",
        "model.dnn.hidden_units=[6]",
        "train.epochs=1",
        "train.batch_size=32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    let config = Config::from_toml_file_with(&prepared.join("config.toml"), &sets).expect("config");
    let data = load_training_data(&config).expect("data");
    let outcome = fit(&data, &mut Silent).expect("fit");
    save_with_assets(out, &data.config, &outcome.model, &data.assets, None).expect("save");
    (Scorer::load(out).expect("load"), prepared.to_path_buf())
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

/// The raw id of dense id `id` in table `table`.
fn raw(s: &Scorer, table: &str, id: u32) -> String {
    s.assets
        .vocab
        .as_ref()
        .expect("vocab")
        .raw(table, id)
        .expect("listed")
        .to_string()
}

/// For the first `rows` test rows: a request in raw ids with the row's user
/// and history and candidates = the row's item and `extra` more items, and
/// a file of the equivalent dense rows (the item table's categories) read
/// as `din predict` reads it. Asserts equal scores.
fn assert_requests_match_rows(s: &Scorer, prepared: &Path, rows: usize, extra: u32) {
    let test = s.read(&prepared.join("test.tsv"), true).expect("test rows");
    let l = &s.layout;
    let f = |name: &str| l.sparse.iter().position(|x| x.name == name).expect("feature");
    let (item_f, cate_f) = (f("item_id"), f("cate_id"));
    let hist = l
        .sequences
        .iter()
        .position(|x| x.name == "hist_item_id")
        .expect("history");
    let items = s.assets.items.as_ref().expect("item table");
    let profile: Vec<usize> = (0..l.sparse.len()).filter(|&i| i != item_f && i != cate_f).collect();
    let n_items = l.tables[l.sparse[item_f].table].vocab_size.expect("size") as u32 - 1;
    for r in 0..rows.min(test.len()) {
        let b = &test.batch;
        let history: Vec<u32> = b.sequences[hist].row(r).to_vec();
        let mut user = Map::new();
        for &p in &profile {
            let name = &l.sparse[p].name;
            user.insert(
                name.clone(),
                json!(raw(s, &l.tables[l.sparse[p].table].name, b.sparse[p][r])),
            );
        }
        let hist_raw: Vec<String> = history.iter().map(|&i| raw(s, "item_id", i)).collect();
        user.insert("hist_item_id".into(), json!(hist_raw));
        let cands: Vec<u32> = std::iter::once(b.sparse[item_f][r])
            .chain((0..extra).map(|k| 1 + (r as u32 * 5 + k * 3) % n_items))
            .collect();
        let candidates: Vec<Map<String, Value>> = cands
            .iter()
            .map(|&i| obj(json!({ "item_id": raw(s, "item_id", i) })))
            .collect();
        let scored = s.score(&user, &candidates, 0).expect("request scores");

        // The same rows in the prepared file format, dense ids.
        let header = std::fs::read_to_string(prepared.join("test.tsv")).expect("read");
        let header = header.lines().next().expect("header").to_string();
        let mut text = format!("{header}\n");
        for &i in &cands {
            let cate = items.value("cate_id", i).expect("known item");
            let hc: Vec<String> = history
                .iter()
                .map(|&h| items.value("cate_id", h).expect("known").to_string())
                .collect();
            let hi: Vec<String> = history.iter().map(|h| h.to_string()).collect();
            let cols: Vec<String> = header
                .split('\t')
                .map(|c| match c {
                    "item_id" => i.to_string(),
                    "cate_id" => cate.to_string(),
                    "hist_item_id" => hi.join(","),
                    "hist_cate_id" => hc.join(","),
                    "time" => "0".into(),
                    "label" => "0".into(),
                    // A profile feature, or the user column that only groups rows for GAUC.
                    other => l
                        .sparse
                        .iter()
                        .position(|x| x.name == other)
                        .map_or_else(|| "0".to_string(), |p| b.sparse[p][r].to_string()),
                })
                .collect();
            let _ = writeln!(text, "{}", cols.join("\t"));
        }
        let rows_path = prepared.join(format!("rows-{r}.tsv"));
        std::fs::write(&rows_path, text).expect("write rows");
        let data = s.read(&rows_path, false).expect("rows read");
        let expected = s.predict(&data, 1).expect("predict");
        assert_eq!(scored.scores.len(), expected.len());
        for (c, (a, e)) in scored.scores.iter().zip(&expected).enumerate() {
            assert!(
                (a - e).abs() <= 1e-6,
                "row {r}, candidate {c}: request {a}, din predict {e}"
            );
        }
    }
}

#[test]
fn raw_id_requests_score_like_din_predict_on_the_equivalent_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, prepared) = trained(dir.path());
    assert_requests_match_rows(&s, &prepared, 10, 40);
}

#[test]
fn movielens_raw_ids_score_like_din_predict_when_shared_data_is_present() {
    let Some(ml) = common::shared("ml-100k") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let log = read_movielens(&ml, false).expect("movielens reads");
    let prepared = dir.path().join("ml");
    prepare(&log, &PrepareOptions::default(), &prepared).expect("prepare");
    let (s, prepared) = train_prepared(&prepared, &dir.path().join("model"), &["train.batch_size=1024"]);
    // Raw MovieLens ids, as u.data writes them, map through vocab.json.
    assert!(s
        .assets
        .vocab
        .as_ref()
        .is_some_and(|v| v.id("item_id", "242").is_some()));
    assert_requests_match_rows(&s, &prepared, 5, 199);
}

#[test]
fn the_model_directory_keeps_the_vocabulary_and_the_item_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, prepared) = trained(dir.path());
    let model_dir = dir.path().join("model");
    let prepared_vocab = Vocabulary::read(&prepared.join(VOCAB_FILE)).expect("prepared vocab");
    let saved = load_model(&model_dir).expect("loads");
    let vocab = saved.assets.vocab.as_ref().expect("vocab saved");
    for table in ["user_id", "item_id", "cate_id"] {
        assert_eq!(vocab.len(table), prepared_vocab.len(table), "{table}");
        for id in 1..=vocab.len(table) as u32 {
            assert_eq!(vocab.raw(table, id), prepared_vocab.raw(table, id));
        }
    }
    // Categories: the log's item i<k> is in category c<k % 5>.
    let items = saved.assets.items.as_ref().expect("items saved");
    for id in 1..=vocab.len("item_id") as u32 {
        let item: u32 = vocab.raw("item_id", id).expect("raw")[1..].parse().expect("number");
        let cate = items.value("cate_id", id).expect("every item has a category");
        assert_eq!(vocab.raw("cate_id", cate), Some(format!("c{}", item % 5).as_str()));
    }
    assert_eq!(saved.assets, s.assets);

    // Damaged or mismatched asset files are refused with the file named.
    let items_path = model_dir.join(ITEMS_FILE);
    let good = std::fs::read(&items_path).expect("read");
    std::fs::write(&items_path, String::from_utf8_lossy(&good).replacen("1", "2", 1)).expect("write");
    let err = load_model(&model_dir).expect_err("tampered items.json").to_string();
    assert!(
        err.contains("items.json") && err.contains("does not match config.json"),
        "{err}"
    );
    std::fs::remove_file(&items_path).expect("rm");
    let err = load_model(&model_dir).expect_err("missing items.json").to_string();
    assert!(err.contains("items.json") && err.contains("cannot read"), "{err}");
    std::fs::write(&items_path, good).expect("restore");
    std::fs::write(model_dir.join(VOCAB_FILE), b"{}").expect("write");
    let err = load_model(&model_dir).expect_err("replaced vocab").to_string();
    assert!(err.contains("vocab.json") && err.contains("does not match"), "{err}");

    // Saving without assets removes stale files of an earlier save.
    checkpoint::save(&model_dir, &s.config, &s.model, None).expect("save");
    assert!(!model_dir.join(VOCAB_FILE).exists() && !items_path.exists());
    let err = load_model(&model_dir)
        .expect_err("item features need items.json")
        .to_string();
    assert!(err.contains("no items.json"), "{err}");
}

#[test]
fn item_tables_are_checked_against_the_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _) = trained(dir.path());
    let path = Path::new("items.json");
    let good = s.assets.items.clone().expect("items");
    assert!(good.check(&s.layout, path).is_ok());
    let mut wrong_key = good.clone();
    wrong_key.features.get_mut("cate_id").expect("col").key = "user_id".into();
    let mut short = good.clone();
    short.features.get_mut("cate_id").expect("col").values.pop();
    let mut outside = good.clone();
    outside.features.get_mut("cate_id").expect("col").values[1] = Some(999);
    let mut extra = good.clone();
    extra
        .features
        .insert("user_id".into(), good.features["cate_id"].clone());
    let empty = ItemTable::default();
    for (table, expect) in [
        (wrong_key, "keyed by `user_id`"),
        (short, "items, table `item_id` has"),
        (outside, "value 999, outside its table"),
        (extra, "column `user_id` is not an item feature"),
        (empty, "no column for item feature `cate_id`"),
    ] {
        let err = table.check(&s.layout, path).expect_err(expect).to_string();
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn rows_that_give_an_item_two_categories_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("rows.tsv");
    std::fs::write(
        &data,
        "item\tcate\thist_item\thist_cate\tlabel\n1\t1\t2,3\t2,3\t1\n2\t2\t1\t1\t0\n3\t4\t1,2\t1,2\t1\n",
    )
    .expect("write");
    let config = format!(
        r#"
[data]
train = "{}"
[input]
header = true
[schema]
label = "label"
sparse = [{{ name = "item" }}, {{ name = "cate", item_feature_of = "item" }}]
sequence = [
  {{ name = "hist_item", shares_embedding_with = "item" }},
  {{ name = "hist_cate", shares_embedding_with = "cate" }},
]
din_pairs = [{{ target = "item", history = "hist_item" }}, {{ target = "cate", history = "hist_cate" }}]
"#,
        data.display()
    );
    let config = Config::from_toml_str(&config).expect("config");
    let err = load_training_data(&config)
        .expect_err("item 3 has cate 3 and 4")
        .to_string();
    assert!(
        err.contains("rows.tsv:4") && err.contains("item 3 has cate 4 here and 3 at") && err.contains("rows.tsv:2"),
        "{err}"
    );

    // Schema errors name the field.
    for (bad, expect) in [
        (
            r#"{ name = "cate", item_feature_of = "nope" }"#,
            "must name another sparse feature",
        ),
        (
            r#"{ name = "cate", item_feature_of = "cate" }"#,
            "cannot be a function of itself",
        ),
    ] {
        let text = config_text_with_cate(bad);
        let err = Config::from_toml_str(&text)
            .and_then(|c| c.validate())
            .expect_err(expect)
            .to_string();
        assert!(
            err.contains("schema.sparse[1].item_feature_of") && err.contains(expect),
            "{err}"
        );
    }
}

fn config_text_with_cate(cate: &str) -> String {
    format!(
        r#"
[input]
columns = ["item", "cate", "hist_item", "label"]
[schema]
label = "label"
sparse = [{{ name = "item" }}, {cate}]
sequence = [{{ name = "hist_item", shares_embedding_with = "item" }}]
din_pairs = [{{ target = "item", history = "hist_item" }}]
"#
    )
}

/// A request for `s` with a history of `n` items (raw ids of dense 1..=n).
fn request(s: &Scorer, n: u32) -> (Map<String, Value>, Vec<Map<String, Value>>) {
    let hist: Vec<String> = (1..=n).map(|i| raw(s, "item_id", i)).collect();
    let user = obj(json!({ "user_id": raw(s, "user_id", 1), "hist_item_id": hist }));
    let candidates = (1..=3)
        .map(|i| obj(json!({ "item_id": raw(s, "item_id", i) })))
        .collect();
    (user, candidates)
}

#[test]
fn explanations_are_the_most_attended_entries_of_the_kept_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _) = trained(dir.path());
    // 9 entries, max_len 6, oldest first: positions 3..9 are kept.
    let (user, candidates) = request(&s, 9);
    let enc = s.encode(&user, &candidates).expect("encodes");
    assert_eq!(enc.positions, vec![3, 4, 5, 6, 7, 8]);
    let (_, weights) = s.model.predict_with_weights(&enc.batch);
    let scored = s.score(&user, &candidates, 4).expect("scores");
    assert_eq!(scored.explanations.len(), 3);
    for (c, e) in scored.explanations.iter().enumerate() {
        let w = &weights[c * 6..(c + 1) * 6];
        let mut sorted: Vec<f32> = w.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(e.len(), 4);
        for (k, a) in e.iter().enumerate() {
            assert_eq!(a.weight, sorted[k], "candidate {c}, rank {k}");
            assert_eq!(a.weight, w[a.position - 3]);
            assert_eq!(a.id, user["hist_item_id"][a.position]);
        }
    }
    // Asking for more than the history holds returns all of it.
    let all = s.score(&user, &candidates, 100).expect("scores");
    assert!(all.explanations.iter().all(|e| e.len() == 6));
    // An empty history scores and explains nothing.
    let mut empty = user.clone();
    empty.insert("hist_item_id".into(), json!([]));
    let none = s.score(&empty, &candidates, 3).expect("scores");
    assert!(none.explanations.iter().all(Vec::is_empty) && none.scores.iter().all(|p| p.is_finite()));
}

#[test]
fn every_bad_request_is_an_error_naming_its_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _) = trained(dir.path());
    let (user, candidates) = request(&s, 3);
    let with_user = |k: &str, v: Value| {
        let mut u = user.clone();
        u.insert(k.into(), v);
        u
    };
    let without_user = |k: &str| {
        let mut u = user.clone();
        u.remove(k);
        u
    };
    let cand = |v: Value| vec![obj(v)];
    type Case<'a> = (Map<String, Value>, Vec<Map<String, Value>>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (user.clone(), vec![], "candidates", "at least one candidate"),
        (
            with_user("price", json!(1)),
            candidates.clone(),
            "user.price",
            "not a feature of this model",
        ),
        (
            user.clone(),
            cand(json!({"item_id": "i1", "hist_item_id": []})),
            "candidates[0].hist_item_id",
            "belongs to the user",
        ),
        (
            user.clone(),
            cand(json!({"item_id": "i1", "x": 1})),
            "candidates[0].x",
            "not a feature",
        ),
        (
            user.clone(),
            cand(json!({"item_id": "no such item"})),
            "candidates[0].item_id",
            "unknown value \"no such item\"",
        ),
        (
            user.clone(),
            cand(json!({"item_id": 1.5})),
            "candidates[0].item_id",
            "expected a raw id",
        ),
        (
            user.clone(),
            cand(json!({"item_id": [1]})),
            "candidates[0].item_id",
            "expected a raw id",
        ),
        (user.clone(), cand(json!({})), "candidates[0].item_id", "missing"),
        (
            without_user("user_id"),
            candidates.clone(),
            "candidates[0].user_id",
            "missing",
        ),
        (
            without_user("hist_item_id"),
            candidates.clone(),
            "user.hist_item_id",
            "missing",
        ),
        (
            with_user("hist_item_id", json!("i1")),
            candidates.clone(),
            "user.hist_item_id",
            "expected a list of ids",
        ),
        (
            with_user("hist_item_id", json!(["i1", null])),
            candidates.clone(),
            "user.hist_item_id[1]",
            "expected a raw id",
        ),
        (
            with_user("hist_item_id", json!(["i1", "zz"])),
            candidates.clone(),
            "user.hist_item_id[1]",
            "unknown value",
        ),
        (
            with_user("hist_cate_id", json!(["c1"])),
            candidates.clone(),
            "user.hist_cate_id",
            "has 1 ids but `hist_item_id` has 3",
        ),
        (
            with_user("user_id", json!({"a": 1})),
            candidates.clone(),
            "user.user_id",
            "expected a raw id",
        ),
    ];
    for (u, c, field, reason) in cases {
        match s.score(&u, &c, 0) {
            Err(Error::Request { field: f, reason: r }) => {
                assert_eq!(f, field, "{r}");
                assert!(r.contains(reason), "{field}: {r}");
            }
            other => panic!("{field}: expected a request error, got {other:?}"),
        }
    }
    // Explicit categories that agree with the item table are accepted.
    let cates: Vec<String> = (1..=3u32)
        .map(|i| {
            raw(
                &s,
                "cate_id",
                s.assets
                    .items
                    .as_ref()
                    .and_then(|t| t.value("cate_id", i))
                    .expect("known"),
            )
        })
        .collect();
    let explicit = with_user("hist_cate_id", json!(cates));
    let a = s.score(&explicit, &candidates, 0).expect("explicit");
    let b = s.score(&user, &candidates, 0).expect("filled");
    assert_eq!(a, b);
}

#[test]
fn dense_ids_and_the_oov_policy_without_a_vocabulary() {
    // The tutorial's config: no vocabulary, so ids are dense; categories given.
    let config = Config::from_toml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml"))
        .expect("bundled config");
    let mut layout = config.validate().expect("valid");
    for t in &mut layout.tables {
        t.vocab_size = Some(10);
    }
    let mut config = config.clone();
    config.freeze_vocab(&layout);
    let model = din::model::Din::new(&layout, &config.model, 1).expect("model");
    let mut s = Scorer::new(config, layout.clone(), model, Assets::default());
    let names: Vec<String> = s.layout.sparse.iter().map(|x| x.name.clone()).collect();
    let mut user = Map::new();
    for n in &names {
        user.insert(n.clone(), json!(1));
    }
    user.insert("hist_len".into(), json!(3));
    for q in &s.layout.sequences {
        // 0 is padding and is dropped, as in a data file.
        user.insert(q.name.clone(), json!([2, 0, "3"]));
    }
    let item = s.layout.sparse[s.layout.pairs[0].0].name.clone();
    let cands = vec![obj(json!({ item.clone(): 9 })), obj(json!({ item.clone(): "4" }))];
    let enc = s.encode(&user, &cands).expect("dense ids");
    assert_eq!(enc.positions, vec![0, 2]);
    assert_eq!(enc.batch.sparse[s.layout.pairs[0].0], vec![9, 4]);
    let bad = vec![obj(json!({ item.clone(): 10 }))];
    let err = s
        .encode(&user, &bad)
        .expect_err("10 is outside a table of 10")
        .to_string();
    assert!(err.contains("at or above the vocabulary size 10"), "{err}");
    let neg = vec![obj(json!({ item.clone(): -1 }))];
    let err = s.encode(&user, &neg).expect_err("negative").to_string();
    assert!(err.contains("expected a dense id"), "{err}");
    // Dense values: a number or a list of `dim` finite numbers, per candidate or per user.
    for (v, expect) in [
        (json!(1e39), "not a finite 32-bit number"),
        (json!([1, 2]), "expected 1 number(s)"),
        (json!("3"), "expected a number"),
    ] {
        let mut u = user.clone();
        u.insert("hist_len".into(), v);
        let err = s.encode(&u, &cands).expect_err(expect).to_string();
        assert!(err.contains("user.hist_len") && err.contains(expect), "{err}");
    }
    let per_candidate = vec![obj(json!({ item.clone(): 9, "hist_len": [7.5] }))];
    let enc = s.encode(&user, &per_candidate).expect("per candidate");
    assert_eq!(enc.batch.dense[0], vec![7.5]);
    // Under oov = "reserved" unknown ids share the reserved row.
    let t = s.layout.sparse[s.layout.pairs[0].0].table;
    s.layout.tables[t].oov = din::schema::Oov::Reserved;
    let enc = s.encode(&user, &bad).expect("reserved");
    assert_eq!(enc.batch.sparse[s.layout.pairs[0].0], vec![10]);
}

/// A model without a user-id embedding (what `din prepare` generates by
/// default) still takes the user column (`schema.user`) in `user`, and
/// ignores it; any other unknown field is refused.
#[test]
fn the_user_column_is_accepted_when_it_is_not_a_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("log.csv");
    write_log(&log_path);
    let log = read_log(&LogSpec::csv(log_path, "user", "item", "cate", "ts"), false).expect("log reads");
    let prepared = dir.path().join("prepared");
    prepare(&log, &PrepareOptions::default(), &prepared).expect("prepare");
    let (s, _) = train_prepared(&prepared, &dir.path().join("model"), &[]);
    assert!(!s.layout.sparse.iter().any(|f| f.name == "user_id"));
    assert_eq!(s.layout.user.as_deref(), Some("user_id"));
    let history = json!([raw(&s, "item_id", 1), raw(&s, "item_id", 2)]);
    let candidates = vec![obj(json!({"item_id": raw(&s, "item_id", 3)}))];
    let without = obj(json!({ "hist_item_id": history }));
    let with = obj(json!({ "user_id": "u1", "hist_item_id": history }));
    let a = s.score(&without, &candidates, 0).expect("scores");
    let b = s.score(&with, &candidates, 0).expect("the user column is accepted");
    assert_eq!(a.scores, b.scores);
    let typo = obj(json!({ "user": "u1", "hist_item_id": history }));
    let err = s.score(&typo, &candidates, 0).expect_err("unknown field").to_string();
    assert!(err.contains("user.user") && err.contains("not a feature"), "{err}");
}
