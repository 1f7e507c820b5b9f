//! `prepare`: protocols on hand-made logs, the no-leakage property on every
//! real fixture, malformed rows, determinism, and files the core reader takes.

mod common;

use std::path::{Path, PathBuf};

use common::shared;
use din::model::Module;
use din::prepare::{
    build_samples, prepare, read_log, read_movielens, Log, LogSpec, PrepareOptions, Protocol, SampleFormat, Samples,
};
use din::schema::{Config, Keep, Monitor};
use din::train::{fit, load_training_data, Silent};

fn log_spec(path: PathBuf) -> LogSpec {
    LogSpec {
        value: Some("rating".into()),
        ..LogSpec::csv(path, "user", "item", "cate", "ts")
    }
}

/// user a: x(c1,t10,r5) y(c2,t20,r2) z(c1,t20,r4) w(c3,t30,r5); user b: y(t5,r4) x(t7,r1) v(t100,r5).
const LOG: &str = "user,item,cate,ts,rating
a,x,c1,10,5
b,y,c2,5,4
a,y,c2,20,2
a,z,c1,20,4
b,x,c1,7,1
a,w,c3,30,5
b,v,c4,100,5
";

fn hand_log(dir: &Path) -> Log {
    let p = dir.join("log.csv");
    std::fs::write(&p, LOG).expect("write");
    read_log(&log_spec(p), false).expect("reads")
}

/// `text` (header user,item,cate,ts) written as `log.csv` in `dir`, read.
fn text_log(dir: &Path, text: &str) -> Log {
    let p = dir.join("log.csv");
    std::fs::write(&p, text).expect("write");
    read_log(&LogSpec::csv(p, "user", "item", "cate", "ts"), false).expect("reads")
}

/// 4 users with 6 behaviours each, 3 categories, written in `dir` and read.
fn four_users(dir: &Path) -> Log {
    let mut text = String::from("user,item,cate,ts\n");
    for u in 0..4 {
        for k in 0..6 {
            text.push_str(&format!("u{u},i{},c{},{}\n", u * 6 + k, k % 3, 100 + 10 * k));
        }
    }
    text_log(dir, &text)
}

/// The defaults without a validation split: train and test only, as the
/// tests below were written for.
fn no_valid() -> PrepareOptions {
    PrepareOptions {
        valid_per_user: 0,
        ..PrepareOptions::default()
    }
}

fn raw(samples: &Samples, field: &str, id: u32) -> String {
    samples.vocab.fields[field][id as usize - 1].clone()
}

fn items(samples: &Samples, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| raw(samples, "item_id", i)).collect()
}

/// Every history behaviour is strictly earlier than its sample, histories are
/// in time order and within max_len, and each user's validation samples are
/// not earlier than their training samples, nor their test samples earlier
/// than either.
fn assert_no_leakage(s: &Samples, max_len: usize) {
    let latest = |rows: &[&[din::prepare::Sample]]| {
        let mut last = std::collections::HashMap::new();
        for x in rows.iter().flat_map(|r| r.iter()) {
            let t = last.entry(x.user).or_insert(i64::MIN);
            *t = (*t).max(x.time);
        }
        last
    };
    for (i, x) in s.train.iter().chain(&s.valid).chain(&s.test).enumerate() {
        assert!(
            x.hist_times.iter().all(|&h| h < x.time),
            "sample {i}: history at or after {}",
            x.time
        );
        assert!(
            x.hist_times.windows(2).all(|w| w[0] <= w[1]),
            "sample {i}: history out of order"
        );
        assert!(x.hist_items.len() <= max_len && x.hist_items.len() == x.hist_categories.len());
    }
    let last_train = latest(&[&s.train]);
    for x in &s.valid {
        assert!(
            last_train.get(&x.user).is_none_or(|&t| t <= x.time),
            "validation sample before a training sample"
        );
    }
    let last_fit = latest(&[&s.train, &s.valid]);
    for x in &s.test {
        assert!(
            last_fit.get(&x.user).is_none_or(|&t| t <= x.time),
            "test sample before a training or validation sample"
        );
    }
}

#[test]
fn next_item_protocol_on_a_hand_made_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let s = build_samples(&log, &no_valid()).expect("samples");
    // User a (events sorted x@10, y@20, z@20, w@30): targets y, z (train), w (test);
    // user b (y@5, x@7, v@100): targets x (train), v (test). One negative each.
    assert_eq!(s.train.len(), 6);
    assert_eq!(s.test.len(), 4);
    let a_train: Vec<_> = s.train.iter().filter(|x| raw(&s, "user_id", x.user) == "a").collect();
    assert_eq!(items(&s, &[a_train[0].item]), ["y"]);
    assert_eq!(items(&s, &a_train[0].hist_items), ["x"]);
    // z shares y's timestamp: y is not in z's history (strictly earlier only).
    assert_eq!(items(&s, &[a_train[2].item]), ["z"]);
    assert_eq!(items(&s, &a_train[2].hist_items), ["x"]);
    let a_test = s
        .test
        .iter()
        .find(|x| raw(&s, "user_id", x.user) == "a" && x.label == 1)
        .expect("a's test");
    assert_eq!(items(&s, &[a_test.item]), ["w"]);
    assert_eq!(items(&s, &a_test.hist_items), ["x", "y", "z"]);
    // Negatives: label 0, an item the user never touched, with that item's own category.
    for (pos, neg) in s.train.iter().zip(s.train.iter().skip(1)).step_by(2) {
        assert_eq!((pos.label, neg.label), (1, 0));
        assert_eq!(neg.hist_items, pos.hist_items);
        let user = raw(&s, "user_id", neg.user);
        let touched: Vec<&str> = LOG
            .lines()
            .skip(1)
            .filter(|l| l.starts_with(&format!("{user},")))
            .map(|l| l.split(',').nth(1).unwrap_or(""))
            .collect();
        let neg_item = raw(&s, "item_id", neg.item);
        assert!(!touched.contains(&neg_item.as_str()), "{user} touched {neg_item}");
        let cate = LOG
            .lines()
            .find(|l| l.split(',').nth(1) == Some(neg_item.as_str()))
            .and_then(|l| l.split(',').nth(2));
        assert_eq!(Some(raw(&s, "cate_id", neg.category).as_str()), cate);
    }
    assert_no_leakage(&s, 50);
}

#[test]
fn rating_protocol_labels_by_threshold_and_keeps_only_earlier_positives() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let options = PrepareOptions {
        protocol: Protocol::Rating { threshold: 4.0 },
        ..no_valid()
    };
    let s = build_samples(&log, &options).expect("samples");
    // Every rating is a sample: a has 4 (3 train + 1 test), b has 3 (2 + 1).
    assert_eq!((s.train.len(), s.test.len()), (5, 2));
    let a_test = s.test.iter().find(|x| raw(&s, "user_id", x.user) == "a").expect("a");
    // w@30 rated 5: positive; history = earlier positives x(5) and z(4), not y(2).
    assert_eq!(a_test.label, 1);
    assert_eq!(items(&s, &a_test.hist_items), ["x", "z"]);
    let b_x = s
        .train
        .iter()
        .find(|x| raw(&s, "item_id", x.item) == "x" && raw(&s, "user_id", x.user) == "b")
        .expect("b x");
    assert_eq!(b_x.label, 0, "rating 1 < 4");
    assert_eq!(items(&s, &b_x.hist_items), ["y"]);
    assert_no_leakage(&s, 50);
}

#[test]
fn session_gap_cuts_histories_and_days_since_previous_is_measured() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("log.csv");
    // u: a@0, b@1 day, c@10 days, d@10 days + 1 hour.
    let text = "user,item,cate,ts,rating\nu,a,k,0,5\nu,b,k,86400,5\nu,c,k,864000,5\nu,d,k,867600,5\n";
    std::fs::write(&p, text).expect("write");
    let log = read_log(&log_spec(p), false).expect("reads");
    let options = PrepareOptions {
        session_gap_days: Some(2.0),
        days_since_prev: true,
        ..no_valid()
    };
    let s = build_samples(&log, &options).expect("samples");
    let pos: Vec<_> = s.train.iter().chain(&s.test).filter(|x| x.label == 1).collect();
    // b: same session as a; c: 9 days after b, a new session (empty history); d: with c only.
    assert_eq!(items(&s, &pos[0].hist_items), ["a"]);
    assert!(pos[1].hist_items.is_empty());
    assert_eq!(items(&s, &pos[2].hist_items), ["c"]);
    assert!((pos[0].days_since_prev - 1f32.ln_1p()).abs() < 1e-6, "one day: ln(2)");
    assert_eq!(pos[1].days_since_prev, -1.0, "no history");
    assert!((pos[2].days_since_prev - (1.0f32 / 24.0).ln_1p()).abs() < 1e-6);
    let without = build_samples(&log, &no_valid()).expect("samples");
    let last = without.test.iter().find(|x| x.label == 1).expect("test");
    assert_eq!(
        items(&without, &last.hist_items),
        ["a", "b", "c"],
        "no gap option: the whole past"
    );
}

#[test]
fn deterministic_for_a_seed_and_max_len_keeps_the_most_recent() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let a = build_samples(
        &log,
        &PrepareOptions {
            max_len: 2,
            ..no_valid()
        },
    )
    .expect("a");
    let b = build_samples(
        &log,
        &PrepareOptions {
            max_len: 2,
            ..no_valid()
        },
    )
    .expect("b");
    assert_eq!(a.train, b.train);
    assert_eq!(a.test, b.test);
    let a_test = a
        .test
        .iter()
        .find(|x| raw(&a, "user_id", x.user) == "a" && x.label == 1)
        .expect("a");
    assert_eq!(
        items(&a, &a_test.hist_items),
        ["y", "z"],
        "the 2 most recent of x, y, z"
    );
    assert_no_leakage(&a, 2);
}

#[test]
fn malformed_rows_are_errors_with_file_and_line_or_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("bad.csv");
    std::fs::write(
        &p,
        "user,item,cate,ts,rating\na,x,c,10,5\na,y,c,soon,5\na,z,c\n,w,c,40,5\na,v,c,50,5\n",
    )
    .expect("write");
    let err = read_log(&log_spec(p.clone()), false).expect_err("bad time").to_string();
    assert!(
        err.contains("bad.csv:3: column `ts`: not an integer timestamp: \"soon\""),
        "{err}"
    );
    let log = read_log(&log_spec(p), true).expect("skips");
    assert_eq!(log.events.len(), 2);
    assert_eq!(log.skipped.len(), 3, "{:?}", log.skipped);
    assert!(
        log.skipped[1].contains("bad.csv:4: expected 5 columns, found 3"),
        "{:?}",
        log.skipped
    );
    assert!(
        log.skipped[2].contains("bad.csv:5: column `user`: empty id"),
        "{:?}",
        log.skipped
    );
}

#[test]
fn written_files_train_directly() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let out = dir.path().join("prepared");
    let options = PrepareOptions {
        days_since_prev: true,
        history_times: true,
        ..no_valid()
    };
    let report = prepare(&log, &options, &out).expect("prepares");
    assert_eq!(
        (report.users, report.items, report.train_samples, report.test_samples),
        (2, 5, 6, 4)
    );
    assert_eq!(report.positives, 5);
    let config = Config::from_toml_file(&out.join("config.toml")).expect("config parses");
    let data = load_training_data(&config).expect("the core reader takes the files");
    assert_eq!(
        (data.train.len(), data.validation.as_ref().map(|v| v.len())),
        (6, Some(4))
    );
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("vocab.json")).expect("vocab")).expect("json");
    assert_eq!(vocab["user_id"], serde_json::json!(["a", "b"]), "dense id 1 = a, 2 = b");
}

fn check_fixture(log: &Log, options: &PrepareOptions) -> Samples {
    let s = build_samples(log, options).expect("samples");
    assert!(!s.train.is_empty() && !s.test.is_empty());
    assert_no_leakage(&s, options.max_len);
    s
}

#[test]
fn movielens_both_protocols_without_leakage() {
    let Some(dir) = shared("ml-100k") else { return };
    let log = read_movielens(&dir, false).expect("reads ml-100k");
    assert_eq!(log.events.len(), 100_000);
    let next = check_fixture(&log, &no_valid());
    // 943 users, each with >= 20 ratings: one test positive and negative each.
    assert_eq!(next.test.len(), 2 * 943);
    assert!(next.valid.is_empty());
    // The default split: the behaviour before each user's test one is validation.
    let split = check_fixture(&log, &PrepareOptions::default());
    assert_eq!((split.valid.len(), split.test.len()), (2 * 943, 2 * 943));
    assert_eq!(split.test, next.test, "the test samples do not depend on the split");
    assert_eq!(
        split.train.len() + split.valid.len() + split.test.len(),
        2 * (100_000 - 943)
    );
    assert_eq!(next.train.len() + next.test.len(), 2 * (100_000 - 943));
    let options = PrepareOptions {
        protocol: Protocol::Rating { threshold: 4.0 },
        test_per_user: 10,
        ..no_valid()
    };
    let rating = check_fixture(&log, &options);
    assert_eq!(rating.train.len() + rating.test.len(), 100_000);
    assert_eq!(rating.test.len(), 9_430, "the last 10 ratings of each of the 943 users");
    let with_positives: std::collections::HashSet<u32> =
        rating.test.iter().filter(|t| t.label == 1).map(|t| t.user).collect();
    assert!(with_positives.len() > 800, "most users have positives in test");
    // 55,375 of MovieLens-100K's ratings are 4 or 5.
    assert_eq!(
        rating.train.iter().chain(&rating.test).filter(|s| s.label == 1).count(),
        55_375
    );
    assert_eq!(rating.vocab.fields["cate_id"].len(), 19, "first genre of each movie");
}

#[test]
fn amazon_and_taobao_fixtures_without_leakage() {
    if let Some(p) = shared("fixtures/torchrechub_amazon_electronics_sample.csv") {
        let log = read_log(&LogSpec::amazon(p), false).expect("reads amazon");
        assert_eq!(log.events.len(), 100);
        check_fixture(&log, &no_valid());
    }
    if let Some(p) = shared("fixtures/taobao/UserBehavior_head.csv") {
        let log = read_log(&LogSpec::taobao(p), false).expect("reads taobao");
        assert_eq!(log.events.len(), 4321);
        let all = check_fixture(&log, &no_valid());
        let buys = PrepareOptions {
            history_behaviors: Some(vec!["cart".into(), "fav".into(), "buy".into()]),
            ..no_valid()
        };
        let some = check_fixture(&log, &buys);
        let mean =
            |s: &Samples| s.train.iter().map(|x| x.hist_items.len()).sum::<usize>() as f64 / s.train.len() as f64;
        assert!(mean(&some) < mean(&all), "only cart/fav/buy enter histories");
    }
}

#[test]
fn movielens_format_on_a_tiny_folder_with_a_bad_rating() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = |g: usize| {
        (0..19)
            .map(|i| if i == g { "1" } else { "0" })
            .collect::<Vec<_>>()
            .join("|")
    };
    let items = format!(
        "1|A (1995)|01-Jan-1995||url|{}\n2|B (1995)|01-Jan-1995||url|{}\n",
        flags(3),
        flags(7)
    );
    std::fs::write(dir.path().join("u.item"), items).expect("write");
    std::fs::write(
        dir.path().join("u.user"),
        "1|24|M|technician|85711\n2|53|F|other|94043\n",
    )
    .expect("write");
    let data = "1\t1\t5\t100\n1\t2\t3\t200\n2\t2\tfive\t300\n2\t1\t4\t400\n";
    std::fs::write(dir.path().join("u.data"), data).expect("write");
    let err = read_movielens(dir.path(), false).expect_err("bad rating").to_string();
    assert!(
        err.contains("u.data:3: column `rating`: not a number: \"five\""),
        "{err}"
    );
    let log = read_movielens(dir.path(), true).expect("skips");
    assert_eq!((log.events.len(), log.skipped.len()), (3, 1));
    assert_eq!(log.events[0].category, "3", "the first genre flag set");
    assert_eq!(log.events[0].profile, ["24", "M", "technician"]);
}

/// An item seen with two categories gets its first one everywhere, so that
/// the generated config's `item_feature_of = "item_id"` holds and trains.
#[test]
fn an_item_keeps_its_first_category_and_conflicts_are_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = text_log(
        dir.path(),
        "user,item,cate,ts\na,x,c1,10\na,y,c2,20\nb,x,c9,5\nb,y,c2,30\na,z,c3,40\nb,z,c3,50\n",
    );
    let out = dir.path().join("out");
    let report = prepare(&log, &no_valid(), &out).expect("prepares");
    assert_eq!(report.category_conflicts, 1, "b's x in c9 after a's x in c1");
    let s = build_samples(&log, &no_valid()).expect("samples");
    let x = 1 + s.vocab.fields["item_id"].iter().position(|i| i == "x").expect("x") as u32;
    let c1 = 1 + s.vocab.fields["cate_id"].iter().position(|c| c == "c1").expect("c1") as u32;
    for sample in s.train.iter().chain(&s.test) {
        if sample.item == x {
            assert_eq!(sample.category, c1);
        }
        for (i, c) in sample.hist_items.iter().zip(&sample.hist_categories) {
            if *i == x {
                assert_eq!(*c, c1);
            }
        }
    }
    let config = Config::from_toml_file(&out.join("config.toml")).expect("config");
    let data = load_training_data(&config).expect("the item table has no conflict");
    let items = data.assets.items.expect("item table");
    assert_eq!(items.value("cate_id", x), Some(c1));
    assert!(data.assets.vocab.is_some_and(|v| v.id("item_id", "x") == Some(x)));
}

/// The generated config sets the embedding width once (so `--set
/// schema.embedding_dim=16` changes every table) and prints f32 values as
/// the numbers they are.
#[test]
fn generated_configs_set_the_width_once_and_print_round_numbers() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let out = dir.path().join("out");
    prepare(&log, &no_valid(), &out).expect("prepares");
    let text = std::fs::read_to_string(out.join("config.toml")).expect("config");
    assert!(text.contains("learning_rate = 0.001\n"), "{text}");
    assert!(text.contains("dropout = 0.0\n"), "{text}");
    // Its validation file is the test file: no epoch is chosen on it.
    assert!(text.contains("keep = \"last\"\n"), "{text}");
    assert_eq!(text.matches("embedding_dim").count(), 1, "{text}");
    let path = out.join("config.toml");
    let wide = Config::from_toml_file_with(&path, &["schema.embedding_dim=16".to_string()]).expect("config");
    let layout = wide.validate().expect("valid");
    assert!(layout.tables.iter().all(|t| t.dim == 16), "{:?}", layout.tables);
    // Round numbers read back to the same f32.
    let config = Config::from_toml_file(&path).expect("config");
    assert_eq!(config.train.learning_rate, 0.001f32);
    let json = serde_json::to_string(&config).expect("json");
    assert!(json.contains("\"learning_rate\":0.001,"), "{json}");
    let back: Config = serde_json::from_str(&json).expect("parses");
    assert_eq!(back, config);
}

/// Behaviours that share a user's earliest timestamp have no earlier
/// behaviour: their samples' histories are empty, and the report counts them.
#[test]
fn samples_left_with_an_empty_history_are_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = text_log(
        dir.path(),
        "user,item,cate,ts\na,x,c1,10\na,y,c2,10\na,z,c1,20\nb,w,c2,1\nb,v,c1,2\n",
    );
    let report = prepare(&log, &no_valid(), &dir.path().join("out")).expect("prepares");
    // a's y (tied with x) as a positive and its negative; every other sample has a history.
    assert_eq!(report.empty_histories, 2, "{report:?}");
    // Lengths, sorted: y 0, 0 (positive and negative), v 1, 1, z 2, 2; nearest
    // rank round(5q) gives p10 0, p25 0, median 1, p75 2, p90 2, max 2.
    assert_eq!(report.history_len_quantiles, [0, 0, 1, 2, 2, 2], "{report:?}");
    let s = build_samples(&log, &no_valid()).expect("samples");
    let empty = s
        .train
        .iter()
        .chain(&s.test)
        .filter(|x| x.hist_items.is_empty())
        .count();
    assert_eq!(empty, report.empty_histories);
}

/// `min_value` (`--min-rating`) keeps only the behaviours rated at least
/// that in the next-item protocol; items rated lower are still never
/// sampled as the user's negatives.
#[test]
fn next_item_with_a_minimum_rating_keeps_only_positive_behaviours() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let options = PrepareOptions {
        min_value: Some(4.0),
        ..no_valid()
    };
    let s = build_samples(&log, &options).expect("samples");
    let user_a = s.vocab.fields["user_id"].iter().position(|u| u == "a").expect("a") as u32 + 1;
    let positives: Vec<(String, Vec<String>)> = s
        .train
        .iter()
        .chain(&s.test)
        .filter(|x| x.label == 1)
        .map(|x| (raw(&s, "item_id", x.item), items(&s, &x.hist_items)))
        .collect();
    // a: x(5) z(4) w(5), y(2) dropped; b: y(4) v(5), x(1) dropped.
    let expected: Vec<(String, Vec<String>)> = vec![
        ("z".into(), vec!["x".into()]),
        ("w".into(), vec!["x".into(), "z".into()]),
        ("v".into(), vec!["y".into()]),
    ];
    let mut got = positives.clone();
    got.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got, want);
    for x in s.train.iter().chain(&s.test).filter(|x| x.label == 0) {
        let item = raw(&s, "item_id", x.item);
        if x.user == user_a {
            assert_eq!(item, "v", "a touched x, y, z, w");
        } else {
            assert!(item == "z" || item == "w", "b touched y, x, v: {item}");
        }
    }
    // The rating protocol has its own threshold.
    let wrong = PrepareOptions {
        protocol: Protocol::Rating { threshold: 4.0 },
        ..options
    };
    let err = build_samples(&log, &wrong).expect_err("not for rating").to_string();
    assert!(err.contains("min_value") && err.contains("next-item"), "{err}");
}

/// MovieLens 1M (`::`-separated .dat files) and the CSV releases (latest,
/// 20M, 25M) are read by the files present, like 100K; anything else is a
/// clear error.
#[test]
fn movielens_1m_and_csv_releases_are_detected_by_their_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let m1 = dir.path().join("ml-1m");
    std::fs::create_dir_all(&m1).expect("mkdir");
    std::fs::write(
        m1.join("movies.dat"),
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n",
    )
    .expect("write");
    std::fs::write(m1.join("users.dat"), "1::F::1::10::48067\n2::M::56::16::70072\n").expect("write");
    std::fs::write(
        m1.join("ratings.dat"),
        "1::1::5::978300760\n1::2::3::978302109\n2::2::x::978301968\n2::1::4::978300275\n",
    )
    .expect("write");
    let err = read_movielens(&m1, false).expect_err("bad rating").to_string();
    assert!(
        err.contains("ratings.dat:3: column `rating`: not a number: \"x\""),
        "{err}"
    );
    let log = read_movielens(&m1, true).expect("1M");
    assert_eq!((log.events.len(), log.skipped.len()), (3, 1));
    assert_eq!(log.events[0].category, "Animation", "the first genre");
    assert_eq!(log.profile_fields, ["age", "gender", "occupation"]);
    assert_eq!(log.events[0].profile, ["1", "F", "10"]);
    assert_eq!(log.events[0].value, Some(5.0));

    let latest = dir.path().join("ml-latest-small");
    std::fs::create_dir_all(&latest).expect("mkdir");
    std::fs::write(
        latest.join("movies.csv"),
        "movieId,title,genres\n1,\"American President, The (1995)\",Comedy|Drama|Romance\n2,Heat (1995),(no genres listed)\n",
    )
    .expect("write");
    std::fs::write(
        latest.join("ratings.csv"),
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n2,3,5.0,964982224\n2,1,4.5,964983815\n",
    )
    .expect("write");
    let err = read_movielens(&latest, false)
        .expect_err("movie 3 is unknown")
        .to_string();
    assert!(
        err.contains("ratings.csv:4: column `item`: not in movies.csv: \"3\""),
        "{err}"
    );
    let log = read_movielens(&latest, true).expect("latest");
    assert_eq!(log.events.len(), 3);
    assert_eq!(
        log.events[0].category, "Comedy",
        "a quoted title with a comma does not shift the columns"
    );
    assert_eq!(log.events[1].category, "(no genres listed)");
    assert!(log.profile_fields.is_empty() && log.events[0].profile.is_empty());
    assert_eq!(log.events[1].value, Some(3.5));
    // The samples build and the rating protocol has its values.
    let options = PrepareOptions {
        protocol: Protocol::Rating { threshold: 4.0 },
        test_per_user: 1,
        ..no_valid()
    };
    prepare(&log, &options, &dir.path().join("out")).expect("prepares");

    let err = read_movielens(dir.path(), false)
        .expect_err("no MovieLens files")
        .to_string();
    assert!(
        err.contains("not a MovieLens folder") && err.contains("ratings.csv"),
        "{err}"
    );
}

/// The default split: each user's sample before the test one is validation;
/// the generated config validates on it, stops early and keeps the best
/// epoch, has no user-id embedding unless asked, and the report names the
/// commands to run next. Turning the split off removes a stale valid.tsv.
#[test]
fn the_default_split_validates_on_its_own_samples_and_stops_early() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let s = build_samples(&log, &PrepareOptions::default()).expect("samples");
    assert_no_leakage(&s, 50);
    // a: targets y (train), z (validation), w (test); b: x (validation), v (test).
    let targets = |rows: &[din::prepare::Sample]| {
        let mut v: Vec<(String, String)> = rows
            .iter()
            .filter(|x| x.label == 1)
            .map(|x| (raw(&s, "user_id", x.user), raw(&s, "item_id", x.item)))
            .collect();
        v.sort();
        v
    };
    let pair = |u: &str, i: &str| (u.to_string(), i.to_string());
    assert_eq!(targets(&s.train), [pair("a", "y")]);
    assert_eq!(targets(&s.valid), [pair("a", "z"), pair("b", "x")]);
    assert_eq!(targets(&s.test), [pair("a", "w"), pair("b", "v")]);

    let out = dir.path().join("out dir");
    let report = prepare(&log, &PrepareOptions::default(), &out).expect("prepares");
    assert_eq!(
        (report.train_samples, report.valid_samples, report.test_samples),
        (2, 4, 4)
    );
    let config = Config::from_toml_file(&out.join("config.toml")).expect("config");
    assert_eq!(config.data.validation.as_deref(), Some(out.join("valid.tsv").as_path()));
    assert_eq!(config.train.keep, Keep::Best);
    let stop = config.train.early_stopping.as_ref().expect("early stopping");
    assert_eq!(
        (stop.monitor, stop.patience, stop.restore_best),
        (Monitor::ValLogloss, 2, true)
    );
    assert!(config.train.epochs > 3 && config.train.batch_size == 256);
    assert_eq!(
        config.schema.user.as_deref(),
        Some("user_id"),
        "GAUC still groups by user"
    );
    assert!(
        !config.schema.sparse.iter().any(|f| f.name == "user_id"),
        "no user-id embedding by default"
    );
    assert!(!report.user_feature);
    let data = load_training_data(&config).expect("the core reader takes the files");
    assert_eq!(
        (data.train.len(), data.validation.as_ref().map(|v| v.len())),
        (2, Some(4))
    );
    // items.json gives every item its category, also w and v, which only
    // the test file shows: the model's item table covers the vocabulary.
    assert_eq!(config.data.items.as_deref(), Some(out.join("items.json").as_path()));
    let table = data.assets.items.as_ref().expect("item table");
    for item in ["x", "y", "z", "w", "v"] {
        let id = s.vocab.fields["item_id"]
            .iter()
            .position(|r| r == item)
            .expect("listed") as u32
            + 1;
        let cate = table.value("cate_id", id).expect("every item has a category");
        let expect = LOG
            .lines()
            .find(|l| l.split(',').nth(1) == Some(item))
            .and_then(|l| l.split(',').nth(2));
        assert_eq!(Some(raw(&s, "cate_id", cate).as_str()), expect, "{item}");
    }
    // Rows that contradict items.json are refused, naming it.
    let items_path = out.join("items.json");
    let good = std::fs::read_to_string(&items_path).expect("items");
    let mut bad: serde_json::Value = serde_json::from_str(&good).expect("json");
    let y = s.vocab.fields["item_id"].iter().position(|r| r == "y").expect("y") + 1;
    let other = if bad["features"]["cate_id"]["values"][y] == 1 {
        2
    } else {
        1
    };
    bad["features"]["cate_id"]["values"][y] = serde_json::json!(other);
    std::fs::write(&items_path, bad.to_string()).expect("write");
    let err = load_training_data(&config)
        .expect_err("a contradicting row")
        .to_string();
    assert!(err.contains("items.json") && err.contains("item_feature_of"), "{err}");
    // So is a table of another length.
    bad["features"]["cate_id"]["values"] = serde_json::json!([0, 1]);
    std::fs::write(&items_path, bad.to_string()).expect("write");
    let err = load_training_data(&config).expect_err("a short table").to_string();
    assert!(err.contains("items.json") && err.contains("has 2 items"), "{err}");
    std::fs::write(&items_path, good).expect("write");
    // The commands to run next, with the path quoted for the shell.
    let quoted = |p: &Path| format!("'{}'", p.display());
    assert_eq!(
        report.train_command,
        format!(
            "din train --config {} --out {}",
            quoted(&out.join("config.toml")),
            quoted(&out.join("model"))
        )
    );
    assert_eq!(
        report.evaluate_command,
        format!(
            "din evaluate --model {} --data {}",
            quoted(&out.join("model")),
            quoted(&out.join("test.tsv"))
        )
    );

    let with_user = PrepareOptions {
        user_feature: true,
        ..PrepareOptions::default()
    };
    let report = prepare(&log, &with_user, &out).expect("prepares");
    assert!(report.user_feature);
    let config = Config::from_toml_file(&out.join("config.toml")).expect("config");
    assert!(config.schema.sparse.iter().any(|f| f.name == "user_id"));

    prepare(&log, &no_valid(), &out).expect("prepares");
    assert!(!out.join("valid.tsv").exists(), "a stale validation file is removed");
    let config = Config::from_toml_file(&out.join("config.toml")).expect("config");
    assert_eq!(config.data.validation.as_deref(), Some(out.join("test.tsv").as_path()));
    assert_eq!((config.train.keep, config.train.early_stopping), (Keep::Last, None));
}

/// Users with one behaviour and behaviours below --min-rating are counted.
#[test]
fn users_too_short_and_dropped_behaviours_are_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = hand_log(dir.path());
    let s = build_samples(&log, &PrepareOptions::default()).expect("samples");
    assert_eq!((s.short_users, s.below_min_value), (0, 0));
    let options = PrepareOptions {
        min_value: Some(4.0),
        ..PrepareOptions::default()
    };
    // a keeps x, z, w (y rated 2 is dropped); b keeps y and v (x rated 1 is dropped).
    let s = build_samples(&log, &options).expect("samples");
    assert_eq!((s.short_users, s.below_min_value), (0, 2));
    let options = PrepareOptions {
        min_value: Some(5.0),
        ..PrepareOptions::default()
    };
    // a keeps x and w; b keeps only v, too few to predict anything.
    let s = build_samples(&log, &options).expect("samples");
    assert_eq!((s.short_users, s.below_min_value, s.users), (1, 4, 1));
    let report = prepare(&log, &options, &dir.path().join("out")).expect("prepares");
    assert_eq!((report.short_users, report.below_min_value), (1, 4));
}

/// `negatives: N`: each positive is followed by N distinct negatives the
/// user never touched, sharing its history (a page view's candidates), as
/// many groups as the default's pairs; a user who touched nearly every
/// item gets as many as there are; 0 and the rating protocol are refused.
#[test]
fn several_negatives_per_positive_share_its_history() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut text = String::from("user,item,cate,ts\n");
    for u in 0..4 {
        for k in 0..6 {
            text.push_str(&format!("u{u},i{},c{},{}\n", u * 6 + k, k % 3, 100 + k));
        }
    }
    // A user who touched all but two of the 26 items.
    for k in 0..24 {
        text.push_str(&format!("greedy,i{k},c{},{}\n", k % 3, 200 + k));
    }
    text.push_str("other,i24,c0,1\nother,i25,c1,2\n");
    let log = text_log(dir.path(), &text);
    let one = build_samples(&log, &no_valid()).expect("samples");
    let five = build_samples(
        &log,
        &PrepareOptions {
            negatives: 5,
            ..no_valid()
        },
    )
    .expect("samples");
    let touched = |user: u32| -> std::collections::HashSet<String> {
        let name = raw(&five, "user_id", user);
        text.lines()
            .filter(|l| l.split(',').next() == Some(name.as_str()))
            .map(|l| l.split(',').nth(1).expect("item").to_string())
            .collect()
    };
    let mut groups = 0;
    for set in [&five.train, &five.test] {
        let mut i = 0;
        while i < set.len() {
            let pos = &set[i];
            assert_eq!(pos.label, 1, "a group starts with its positive");
            let negs: Vec<_> = set[i + 1..].iter().take_while(|s| s.label == 0).collect();
            let greedy = raw(&five, "user_id", pos.user) == "greedy";
            assert_eq!(
                negs.len(),
                if greedy { 2 } else { 5 },
                "{}",
                raw(&five, "user_id", pos.user)
            );
            let mut seen = std::collections::HashSet::new();
            for n in &negs {
                assert_eq!((n.user, &n.hist_items, n.time), (pos.user, &pos.hist_items, pos.time));
                assert!(seen.insert(n.item), "distinct negatives");
                assert!(
                    !touched(pos.user).contains(&raw(&five, "item_id", n.item)),
                    "never touched"
                );
                assert_eq!(n.category, five.item_categories[n.item as usize]);
            }
            i += 1 + negs.len();
            groups += 1;
        }
    }
    assert_eq!(groups, one.train.len() / 2 + one.test.len() / 2);
    for (n, protocol, expected) in [
        (0, Protocol::NextItem, "at least 1"),
        (3, Protocol::Rating { threshold: 4.0 }, "next-item protocol"),
    ] {
        let options = PrepareOptions {
            negatives: n,
            protocol,
            ..no_valid()
        };
        let err = build_samples(&log, &options).expect_err("refused").to_string();
        assert!(err.contains("negatives") && err.contains(expected), "{err}");
    }
}

/// `grouped: true` writes one line per run of samples sharing a user side
/// (a positive and its negatives); read back, the files give the flat
/// files' samples in the same order, each history stored once per group,
/// and the generated config says so.
#[test]
fn grouped_files_hold_the_flat_files_samples_one_line_per_group() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = four_users(dir.path());
    let (flat_dir, grouped_dir) = (dir.path().join("flat"), dir.path().join("grouped"));
    let options = PrepareOptions {
        negatives: 3,
        ..PrepareOptions::default()
    };
    prepare(&log, &options, &flat_dir).expect("flat");
    prepare(
        &log,
        &PrepareOptions {
            grouped: true,
            ..options
        },
        &grouped_dir,
    )
    .expect("grouped");
    let flat = load_training_data(&Config::from_toml_file(&flat_dir.join("config.toml")).unwrap()).unwrap();
    let grouped_config = Config::from_toml_file(&grouped_dir.join("config.toml")).unwrap();
    assert_eq!(grouped_config.input.layout, din::schema::InputLayout::Grouped);
    let grouped = load_training_data(&grouped_config).unwrap();
    for (f, g) in [
        (&flat.train, &grouped.train),
        (flat.validation.as_ref().unwrap(), grouped.validation.as_ref().unwrap()),
    ] {
        assert!(!f.batch.is_grouped() && g.batch.is_grouped());
        assert_eq!(
            (g.batch.sparse.clone(), g.batch.labels.clone()),
            (f.batch.sparse.clone(), f.batch.labels.clone())
        );
        for h in 0..2 {
            for r in 0..f.len() {
                assert_eq!(g.batch.history(h, r), f.batch.history(h, r), "row {r}");
            }
        }
        // A positive and its 3 negatives per line.
        assert_eq!(g.batch.group_count() * 4, g.len());
    }
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(
        lines(&flat_dir.join("train.tsv")) - 1,
        4 * (lines(&grouped_dir.join("train.tsv")) - 1)
    );
}

/// A MovieLens-100K-format folder (u.data, u.item, u.user) of `users`
/// users rating 14 of 40 movies each, made up deterministically.
fn tiny_movielens(dir: &Path, users: u32) {
    let flags = |g: u32| {
        (0..19)
            .map(|i| if i == g { "1" } else { "0" })
            .collect::<Vec<_>>()
            .join("|")
    };
    let items: String = (1..=40)
        .map(|i| format!("{i}|M{i} (1995)|01-Jan-1995||url|{}\n", flags(i % 7)))
        .collect();
    std::fs::write(dir.join("u.item"), items).expect("write");
    let people: String = (1..=users)
        .map(|u| {
            format!(
                "{u}|{}|{}|job{}|00000\n",
                18 + u % 40,
                ["M", "F"][u as usize % 2],
                u % 5
            )
        })
        .collect();
    std::fs::write(dir.join("u.user"), people).expect("write");
    let mut ratings = String::new();
    for u in 1..=users {
        for k in 0..14 {
            let item = (u * 7 + k * 3) % 40 + 1;
            let rating = (u + k * k) % 5 + 1;
            ratings.push_str(&format!("{u}\t{item}\t{rating}\t{}\n", 1000 + 60 * k + u));
        }
    }
    std::fs::write(dir.join("u.data"), ratings).expect("write");
}

/// Weights after `epochs` of the config at `path`, in parameter order.
fn trained_weights(path: &Path, epochs: usize) -> Vec<(String, Vec<f32>)> {
    let mut config = Config::from_toml_file(path).expect("config");
    config.train.epochs = epochs;
    config.train.threads = 1;
    config.train.checkpoint_every = 0;
    let data = load_training_data(&config).expect("loads");
    let out = fit(&data, &mut Silent).expect("trains");
    let mut w = Vec::new();
    out.model.visit("", &mut |name, p| w.push((name, p.value.clone())));
    w
}

#[test]
fn parquet_output_holds_the_text_files_samples_and_trains_the_same_model_bitwise() {
    let dir = tempfile::tempdir().expect("tmp");
    tiny_movielens(dir.path(), 30);
    let log = read_movielens(dir.path(), false).expect("reads");
    let options = PrepareOptions {
        protocol: Protocol::Rating { threshold: 4.0 },
        test_per_user: 3,
        valid_per_user: 2,
        user_feature: true,
        days_since_prev: true,
        history_times: true,
        ..PrepareOptions::default()
    };
    let (tsv, pq) = (dir.path().join("tsv"), dir.path().join("pq"));
    let text = prepare(&log, &options, &tsv).expect("tsv");
    let parquet = prepare(
        &log,
        &PrepareOptions {
            format: SampleFormat::Parquet,
            ..options.clone()
        },
        &pq,
    )
    .expect("parquet");
    assert_eq!(parquet.validation, pq.join("valid.parquet"));
    assert!(
        parquet.evaluate_command.ends_with("test.parquet"),
        "{}",
        parquet.evaluate_command
    );
    assert_eq!(
        (parquet.train_samples, parquet.valid_samples, parquet.test_samples),
        (text.train_samples, text.valid_samples, text.test_samples)
    );
    for split in ["train", "valid", "test"] {
        let bytes = std::fs::read(pq.join(format!("{split}.parquet"))).expect("written");
        assert!(
            bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"),
            "{split}: a Parquet file"
        );
        assert!(!pq.join(format!("{split}.tsv")).exists());
    }
    let config = Config::from_toml_file(&pq.join("config.toml")).expect("config");
    assert_eq!(config.data.train.as_deref(), Some(pq.join("train.parquet").as_path()));
    // The profile columns (age, gender, occupation) and every other column
    // read back as the text file's.
    let (a, b) = (
        load_training_data(&Config::from_toml_file(&tsv.join("config.toml")).unwrap()).unwrap(),
        load_training_data(&config).unwrap(),
    );
    assert_eq!(a.train.batch, b.train.batch, "the same training columns");
    assert_eq!(a.train.users, b.train.users, "the same GAUC users");
    assert_eq!(
        a.validation.as_ref().unwrap().batch,
        b.validation.as_ref().unwrap().batch
    );
    assert!(a.train.len() > 200, "{}", a.train.len());
    assert!(
        trained_weights(&tsv.join("config.toml"), 2) == trained_weights(&pq.join("config.toml"), 2),
        "the same weights, bit for bit"
    );
}

#[test]
fn grouped_parquet_output_is_one_sample_per_row_grouped_on_reading() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = four_users(dir.path());
    let options = PrepareOptions {
        negatives: 3,
        grouped: true,
        ..PrepareOptions::default()
    };
    let (tsv, pq) = (dir.path().join("tsv"), dir.path().join("pq"));
    prepare(&log, &options, &tsv).expect("grouped text");
    prepare(
        &log,
        &PrepareOptions {
            format: SampleFormat::Parquet,
            ..options
        },
        &pq,
    )
    .expect("grouped parquet");
    let config = Config::from_toml_file(&pq.join("config.toml")).unwrap();
    assert_eq!(config.input.layout, din::schema::InputLayout::Flat);
    assert!(config.data.group, "grouped on reading");
    let (g, p) = (
        load_training_data(&Config::from_toml_file(&tsv.join("config.toml")).unwrap()).unwrap(),
        load_training_data(&config).unwrap(),
    );
    assert!(p.train.batch.is_grouped());
    assert_eq!(p.train.batch, g.train.batch, "the grouped text file's batch");
    assert_eq!(p.train.batch.group_count() * 4, p.train.len());
}

#[test]
fn parquet_output_of_many_rows_is_written_in_row_groups_and_an_empty_split_has_the_columns() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().expect("tmp");
    // 70,000 users with 3 behaviours each: more training samples than a row group.
    let mut text = String::from("user,item,cate,ts\n");
    for u in 0..70_000 {
        for k in 0..3 {
            text.push_str(&format!("u{u},i{},c{},{}\n", (u + k) % 500, k, 10 + k));
        }
    }
    let log = text_log(dir.path(), &text);
    let out = dir.path().join("pq");
    let report = prepare(
        &log,
        &PrepareOptions {
            format: SampleFormat::Parquet,
            ..no_valid()
        },
        &out,
    )
    .expect("prepares");
    let n = report.train_samples;
    assert!(n > 65_536, "{n}");
    let reader = SerializedFileReader::new(std::fs::File::open(out.join("train.parquet")).unwrap()).unwrap();
    let groups: Vec<i64> = reader.metadata().row_groups().iter().map(|g| g.num_rows()).collect();
    let mut want = vec![65_536; n / 65_536];
    want.push((n % 65_536) as i64);
    assert_eq!(groups, want, "row groups of 65,536 rows");
    // Everything held out as test: an empty training file.
    let all_test = dir.path().join("all_test");
    let report = prepare(
        &log,
        &PrepareOptions {
            format: SampleFormat::Parquet,
            test_per_user: 10,
            ..no_valid()
        },
        &all_test,
    )
    .expect("prepares");
    assert_eq!(report.train_samples, 0);
    let reader = SerializedFileReader::new(std::fs::File::open(all_test.join("train.parquet")).unwrap()).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.path().parts()[0].clone())
        .collect();
    assert_eq!(
        columns,
        [
            "user_id",
            "item_id",
            "cate_id",
            "hist_item_id",
            "hist_cate_id",
            "time",
            "label"
        ]
    );
}
