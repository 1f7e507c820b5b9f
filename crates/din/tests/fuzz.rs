//! Fuzzing of every parser a user's files reach: the tutorial TSV reader,
//! the delimited reader with a header, the TOML config parser and validator,
//! the model-directory loader, and `din prepare`'s log parsers (Amazon CSV,
//! Taobao, MovieLens-100K `u.data`).
//!
//! `cargo fuzz` needs nightly and AFL++ a C toolchain of its own, so this is
//! a mutational fuzzer on proptest (no coverage feedback): each case takes a
//! seed input (the corpus: files under `tests/fuzz/<target>/` and inputs
//! built here) and applies up to 8 random mutations (bit flips, byte sets,
//! inserted tokens from a per-target dictionary, deletions, duplications,
//! splices from another seed, truncation). None may panic, and each target
//! checks its own contract (a model directory that loads is exactly the
//! saved model; data that loads can be scored).
//!
//! `cargo test` replays the corpus and runs `DIN_FUZZ_CASES` (256) cases a
//! target; `DIN_FUZZ_SECONDS=600 cargo test --release --test fuzz -- TARGET`
//! runs one for ten minutes (`bench/fuzz.sh` runs them all) and prints the
//! executions. A failing input is written to `target/fuzz-failures/` to be
//! added to the corpus once fixed.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use din::checkpoint::{load_model, save_with_assets, SavedModel};
use din::data::Batch;
use din::model::{Din, Mode};
use din::prepare::{build_samples, read_log, read_movielens, write_prepared, LogSpec, PrepareOptions};
use din::schema::Config;
use din::train::load_training_data;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// One mutation of an input.
#[derive(Debug, Clone)]
enum Op {
    Flip(usize, u8),
    Set(usize, u8),
    Token(usize, usize),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Splice(usize, usize, usize, usize),
    Truncate(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let at = any::<usize>();
    prop_oneof![
        (at, 0u8..8).prop_map(|(p, b)| Op::Flip(p, b)),
        (at, any::<u8>()).prop_map(|(p, b)| Op::Set(p, b)),
        (at, any::<usize>()).prop_map(|(p, t)| Op::Token(p, t)),
        (at, 1usize..64).prop_map(|(p, n)| Op::Delete(p, n)),
        (at, 1usize..64).prop_map(|(p, n)| Op::Duplicate(p, n)),
        (any::<usize>(), at, 1usize..256, at).prop_map(|(s, f, n, p)| Op::Splice(s, f, n, p)),
        at.prop_map(Op::Truncate),
    ]
}

/// Tokens every target's inputs may gain: separators, numbers at the
/// edges of their types, non-finite values, odd bytes.
const COMMON: &[&str] = &[
    "\t",
    ",",
    "\n",
    "\r\n",
    ";",
    "|",
    "::",
    " ",
    "0",
    "1",
    "-1",
    "-0",
    "255",
    "256",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1e38",
    "3.5e38",
    "1e309",
    "-1e309",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "1.5",
    ".",
    "e",
    "\"",
    "'",
    "\\",
    "[",
    "]",
    "{",
    "}",
    "=",
    "\0",
    "\u{feff}",
    "é",
    "\u{1F600}",
    "\u{ff}",
];

/// Applies `ops` to `seeds[pick]`; `tokens` is the whole dictionary.
fn mutate(seeds: &[Vec<u8>], pick: usize, ops: &[Op], tokens: &[&str]) -> Vec<u8> {
    let mut v = seeds[pick % seeds.len()].clone();
    let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
    for op in ops {
        let n = v.len();
        match *op {
            Op::Flip(p, b) if n > 0 => v[p % n] ^= 1 << b,
            Op::Set(p, b) if n > 0 => v[p % n] = b,
            Op::Token(p, t) => {
                let tok = tokens[t % tokens.len()].as_bytes();
                let p = at(p, n);
                v.splice(p..p, tok.iter().copied());
            }
            Op::Delete(p, k) if n > 0 => {
                let p = p % n;
                v.drain(p..(p + k).min(n));
            }
            Op::Duplicate(p, k) if n > 0 => {
                let p = p % n;
                let piece: Vec<u8> = v[p..(p + k).min(n)].to_vec();
                v.splice(p..p, piece);
            }
            Op::Splice(s, f, k, p) => {
                let other = &seeds[s % seeds.len()];
                if !other.is_empty() {
                    let f = f % other.len();
                    let piece = &other[f..(f + k).min(other.len())];
                    let p = at(p, n);
                    v.splice(p..p, piece.iter().copied());
                }
            }
            Op::Truncate(p) => v.truncate(at(p, n)),
            _ => {}
        }
    }
    v
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz").join(target)
}

/// The committed corpus of `target`: seeds and inputs that once failed.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|p| fs::read(p).expect("corpus file")).collect()
}

fn escaped(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(2000) {
        let _ = write!(s, "{}", std::ascii::escape_default(b));
    }
    s
}

/// Replays `seeds`, then runs mutated cases: `DIN_FUZZ_SECONDS` seconds'
/// worth, or `DIN_FUZZ_CASES` (256) of them. `check` returns an error for a
/// broken contract; a panic is a failure too.
fn fuzz(target: &str, mut seeds: Vec<Vec<u8>>, tokens: &[&str], check: impl Fn(&[u8]) -> Result<(), String>) {
    seeds.extend(corpus(target));
    assert!(!seeds.is_empty(), "{target}: no seeds");
    for (i, s) in seeds.iter().enumerate() {
        check(s).unwrap_or_else(|e| panic!("{target}: corpus input {i} ({}): {e}", escaped(s)));
    }
    let seconds: Option<u64> = std::env::var("DIN_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok());
    let cases: u32 = std::env::var("DIN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let strategy = (any::<usize>(), proptest::collection::vec(op(), 1..8));
    let dictionary: Vec<&str> = COMMON.iter().chain(tokens).copied().collect();
    let (start, mut executions, mut round) = (Instant::now(), 0u64, 0u64);
    loop {
        let per_round = if deadline.is_some() { 2000 } else { cases };
        let config = RunnerConfig {
            cases: per_round,
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..RunnerConfig::default()
        };
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&round.to_le_bytes());
        seed[8..16].copy_from_slice(&(target.len() as u64 * 7919).to_le_bytes());
        let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        let result = runner.run(&strategy, |(pick, ops)| {
            let input = mutate(&seeds, pick, &ops, &dictionary);
            check(&input).map_err(|e| TestCaseError::fail(format!("{e}\ninput: {}", escaped(&input))))
        });
        if let Err(e) = result {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
            let _ = fs::create_dir_all(&dir);
            let path = dir.join(format!("{target}-{round}.txt"));
            let _ = fs::write(&path, format!("{e}"));
            panic!("{target}: {e}\n(written to {})", path.display());
        }
        executions += u64::from(per_round);
        round += 1;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    eprintln!(
        "fuzz {target}: {executions} executions in {:.0} s, {} corpus inputs, no failure",
        start.elapsed().as_secs_f64(),
        seeds.len()
    );
}

/// A fresh folder per case, removed with it.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Reads `bytes` as the training file of `config` (strict, then skipping
/// bad rows) through the real training path, and scores what loads.
fn load_and_score(config: &Config, bytes: &[u8]) -> Result<(), String> {
    let dir = scratch();
    let file = dir.path().join("rows.txt");
    fs::write(&file, bytes).map_err(|e| e.to_string())?;
    for skip in [false, true] {
        let mut c = config.clone();
        c.data.train = Some(file.clone());
        c.data.validation = None;
        c.data.validation_split = None;
        c.data.skip_bad_rows = skip;
        c.data.max_bad_rows_fraction = 0.5;
        match load_training_data(&c) {
            Ok(data) => {
                let n = data.train.len();
                let lines = bytes.split(|&b| b == b'\n').count();
                if n > lines {
                    return Err(format!("{n} rows from {lines} lines"));
                }
                if n <= 64 {
                    let model = Din::new(&data.layout, &data.config.model, 1).map_err(|e| e.to_string())?;
                    let rows: Vec<usize> = (0..n).collect();
                    let mut batch = Batch::default();
                    data.train.batch.gather_into(&rows, &mut batch);
                    let p = model.predict(&batch);
                    if p.len() != n {
                        return Err(format!("{} scores for {n} rows", p.len()));
                    }
                    let (logits, _) = model.forward(&batch, Mode::Train, None);
                    if logits.len() != n {
                        return Err(format!("{} logits for {n} rows", logits.len()));
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if msg.is_empty() {
                    return Err("an empty error message".into());
                }
            }
        }
    }
    Ok(())
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn small(config: &mut Config) {
    config.model.attention.hidden_units = vec![4];
    config.model.dnn.hidden_units = vec![4];
}

#[test]
fn fuzz_tutorial_tsv_reader() {
    let mut config = Config::from_toml_file(&repo("configs/movie_sample.toml")).expect("config");
    small(&mut config);
    let text = fs::read_to_string(repo("data/movie_sample.txt")).expect("sample");
    let lines: Vec<&str> = text.lines().collect();
    let seeds = vec![
        lines[..8].join("\n").into_bytes(),
        lines[400..403].join("\n").into_bytes(),
        format!("{}\n", lines[1000]).into_bytes(),
    ];
    let tokens = ["\t0\t", ",0,", "\t\t", ",,", "\t1\n", "\t0\n"];
    fuzz("tsv", seeds, &tokens, |b| load_and_score(&config, b));
}

const CSV_CONFIG: &str = r#"
[input]
delimiter = ","
header = true
sequence_separator = "|"
[schema]
label = "label"
user = "user"
[[schema.sparse]]
name = "item"
[[schema.sparse]]
name = "cate"
item_feature_of = "item"
[[schema.dense]]
name = "price"
dim = 2
[[schema.sequence]]
name = "hist_item"
shares_embedding_with = "item"
max_len = 4
[[schema.sequence]]
name = "hist_cate"
shares_embedding_with = "cate"
max_len = 4
[[schema.din_pairs]]
target = "item"
history = "hist_item"
[[schema.din_pairs]]
target = "cate"
history = "hist_cate"
"#;

#[test]
fn fuzz_delimited_reader_with_header() {
    let mut config = Config::from_toml_str(CSV_CONFIG).expect("config");
    small(&mut config);
    let seeds = vec![
        b"user,item,cate,price,hist_item,hist_cate,label\n7,3,1,0.5|2,1|2,4|1,1\n7,4,2,1|1,3|1,1|4,0\n8,1,4,0|0,,,0\n"
            .to_vec(),
        b"label,hist_cate,hist_item,price,cate,item,user,extra\n1,1,2,3|4,1,5,9,x\n".to_vec(),
    ];
    let tokens = [
        "user",
        "item",
        "cate",
        "price",
        "hist_item",
        "hist_cate",
        "label",
        "|",
        "0|0",
        ",,",
    ];
    fuzz("csv", seeds, &tokens, |b| load_and_score(&config, b));
}

#[test]
fn fuzz_config_parser_and_validator() {
    let seeds = vec![
        fs::read(repo("configs/movie_sample.toml")).expect("config"),
        CSV_CONFIG.as_bytes().to_vec(),
    ];
    let tokens = [
        "vocab_size = ",
        "embedding_dim = ",
        "max_len = ",
        "dim = ",
        "hidden_units = ",
        "[]",
        "[0]",
        "[4294967296]",
        "\n[[schema.sparse]]\nname = \"item\"\n",
        "\n[[schema.sequence]]\nname = \"h\"\n",
        "\n[[schema.din_pairs]]\ntarget = \"item\"\nhistory = \"h\"\n",
        "shares_embedding_with = \"item\"",
        "item_feature_of = \"cate\"",
        "oov = \"reserved\"",
        "normalization = \"softmax\"",
        "pooling = \"sum\"",
        "activation = \"dice\"",
        "dropout = 1.0",
        "batch_size = 0",
        "epochs = 0",
        "validation_split = 1.0",
        "threads = 100000",
        "learning_rate = -1",
        "\n[train.early_stopping]\npatience = 0\n",
        "label = \"user_id\"",
        "user = \"nobody\"",
        "delimiter = \"\"",
    ];
    fuzz("config", seeds, &tokens, |b| {
        let text = String::from_utf8_lossy(b);
        let Ok(config) = Config::from_toml_str(&text) else {
            return Ok(());
        };
        let Ok(layout) = config.validate() else { return Ok(()) };
        // A model of a valid config is built, or refused with an error,
        // never an abort: small ones are built, and hopeless ones (past
        // 2^40 values) must be refused at once; the sizes between would
        // only be slow.
        let params = parameters(&layout, &config);
        if !(5_000_000..=1 << 40).contains(&params) {
            match Din::new(&layout, &config.model, 1) {
                Err(e) if e.to_string().is_empty() => return Err("an empty error".into()),
                Ok(_) if params > 1 << 40 => return Err(format!("{params} parameters allocated")),
                _ => {}
            }
        }
        Ok(())
    });
}

/// The model's parameter count, in u128 so that nothing overflows.
fn parameters(layout: &din::schema::Layout, config: &Config) -> u128 {
    let dim = |t: usize| layout.tables[t].dim as u128;
    let tables: u128 = layout.tables.iter().map(|t| t.rows() as u128 * t.dim as u128).sum();
    let query: u128 = layout.pairs.iter().map(|&(s, _)| dim(layout.sparse[s].table)).sum();
    let dnn_input: u128 = layout.sparse.iter().map(|s| dim(s.table)).sum::<u128>()
        + layout.dense.iter().map(|d| d.1 as u128).sum::<u128>()
        + query
        + layout
            .unpaired_sequences()
            .iter()
            .map(|&i| dim(layout.sequences[i].table))
            .sum::<u128>();
    let chain = |mut width: u128, units: &[usize]| {
        let mut n = 0u128;
        for &u in units.iter().chain([&1]) {
            n += width * u as u128;
            width = u as u128;
        }
        n
    };
    tables + chain(4 * query, &config.model.attention.hidden_units) + chain(dnn_input, &config.model.dnn.hidden_units)
}

/// A saved model with a vocabulary and an item table, and its files.
fn saved_model() -> (SavedModel, Vec<(&'static str, Vec<u8>)>, tempfile::TempDir) {
    let tmp = scratch();
    let log = tmp.path().join("log.csv");
    let mut text = String::from("user_id,item_id,time,cate_id\n");
    for u in 0..6 {
        for k in 0..6 {
            let _ = writeln!(text, "u{u},i{},{},c{}", (u * 3 + k) % 9, 1000 + k, (u + k) % 3);
        }
    }
    fs::write(&log, text).expect("log");
    let events = read_log(&LogSpec::amazon(log), false).expect("log");
    let prepared = tmp.path().join("prepared");
    din::prepare::prepare(&events, &PrepareOptions::default(), &prepared).expect("prepare");
    let mut config = Config::from_toml_file(&prepared.join("config.toml")).expect("config");
    small(&mut config);
    let data = load_training_data(&config).expect("data");
    let model = Din::new(&data.layout, &data.config.model, 5).expect("model");
    let dir = tmp.path().join("model");
    save_with_assets(&dir, &data.config, &model, &data.assets, Some(&[])).expect("save");
    let saved = load_model(&dir).expect("loads");
    let names = [
        "config.json",
        "model.safetensors",
        "history.json",
        "vocab.json",
        "items.json",
    ];
    let files = names.map(|n| (n, fs::read(dir.join(n)).expect(n))).to_vec();
    (saved, files, tmp)
}

#[test]
fn fuzz_model_directory_loader() {
    let (saved, files, _tmp) = saved_model();
    // A seed is a file index byte, then that file's bytes.
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .enumerate()
        .map(|(i, (_, b))| std::iter::once(i as u8).chain(b.iter().copied()).collect())
        .collect();
    let tokens = [
        "\"format_version\": 1",
        "0000000000000000",
        "F32",
        "U8",
        "[1,1]",
        "null",
        "true",
        "\"\"",
    ];
    fuzz("model_dir", seeds, &tokens, |b| {
        let Some((&which, bytes)) = b.split_first() else {
            return Ok(());
        };
        let dir = scratch();
        let model_dir = dir.path().join("m");
        fs::create_dir(&model_dir).map_err(|e| e.to_string())?;
        let which = usize::from(which) % files.len();
        for (i, (name, original)) in files.iter().enumerate() {
            let content = if i == which { bytes } else { original.as_slice() };
            fs::write(model_dir.join(name), content).map_err(|e| e.to_string())?;
        }
        match load_model(&model_dir) {
            Ok(m) => {
                if m.model != saved.model || m.config != saved.config || m.assets != saved.assets {
                    return Err(format!("{} changed and a different model loaded", files[which].0));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(dir.path().to_string_lossy().as_ref()) {
                    return Err(format!("the error does not name the file: {msg}"));
                }
            }
        }
        Ok(())
    });
}

/// `din prepare` on `bytes` as a log of the format that `format` picks.
fn prepare_log(format: u8, bytes: &[u8]) -> Result<(), String> {
    let dir = scratch();
    let read = |skip: bool| -> Result<din::Result<din::prepare::Log>, String> {
        match format % 3 {
            0 => {
                let p = dir.path().join("amazon.csv");
                fs::write(&p, bytes).map_err(|e| e.to_string())?;
                Ok(read_log(&LogSpec::amazon(p), skip))
            }
            1 => {
                let p = dir.path().join("taobao.csv");
                fs::write(&p, bytes).map_err(|e| e.to_string())?;
                Ok(read_log(&LogSpec::taobao(p), skip))
            }
            _ => {
                let ml = dir.path().join("ml");
                fs::create_dir_all(&ml).map_err(|e| e.to_string())?;
                fs::write(ml.join("u.data"), bytes).map_err(|e| e.to_string())?;
                fs::write(
                ml.join("u.item"),
                "1|A (1995)|01-Jan-1995||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n2|B (1996)|01-Jan-1996||http://y|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n",
            )
            .map_err(|e| e.to_string())?;
                fs::write(ml.join("u.user"), "1|24|M|technician|85711\n2|53|F|other|94043\n")
                    .map_err(|e| e.to_string())?;
                Ok(read_movielens(&ml, skip))
            }
        }
    };
    for skip in [false, true] {
        let log: Result<din::prepare::Log, String> = read(skip)?.map_err(|e| e.to_string());
        let Ok(log) = log else { continue };
        if log.events.len() > 3000 {
            continue;
        }
        for options in [
            PrepareOptions::default(),
            PrepareOptions {
                protocol: din::prepare::Protocol::Rating { threshold: 4.0 },
                session_gap_days: Some(0.5),
                days_since_prev: true,
                min_value: Some(3.0),
                test_per_user: 2,
                ..PrepareOptions::default()
            },
        ] {
            if let Ok(samples) = build_samples(&log, &options) {
                let out = dir.path().join("out");
                if write_prepared(&log, &samples, &options, &out).is_ok() {
                    // What prepare writes, training reads.
                    let config = Config::from_toml_file(&out.join("config.toml")).map_err(|e| e.to_string())?;
                    if let Err(e) = load_training_data(&config) {
                        if !matches!(e, din::Error::EmptyFile { .. }) {
                            return Err(format!("prepare wrote files training refuses: {e}"));
                        }
                    }
                }
                let _ = fs::remove_dir_all(&out);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_prepare_log_parsers() {
    let mut amazon = String::from("user_id,item_id,time,cate_id\n");
    let mut taobao = String::new();
    let mut ml = String::new();
    for u in 1..=3 {
        for k in 0..5 {
            let _ = writeln!(
                amazon,
                "A{u},B{},{},Cat{}",
                (u + k) % 4,
                1_300_000_000 + 86_400 * k,
                k % 2
            );
            let behavior = ["pv", "cart", "fav", "buy"][k % 4];
            let _ = writeln!(
                taobao,
                "{u},{},{},{behavior},{}",
                10 + k,
                k % 3,
                1_511_000_000 + 3600 * k
            );
            let _ = writeln!(
                ml,
                "{}\t{}\t{}\t{}",
                u % 2 + 1,
                k % 2 + 1,
                1 + (u + k) % 5,
                880_000_000 + k
            );
        }
    }
    let seeds = vec![
        std::iter::once(0).chain(amazon.bytes()).collect(),
        std::iter::once(1).chain(taobao.bytes()).collect(),
        std::iter::once(2).chain(ml.bytes()).collect(),
    ];
    let tokens = [
        "user_id",
        "item_id",
        "time",
        "cate_id",
        "pv",
        "buy",
        "cart",
        "fav",
        "1511000000",
        "\t5\t",
    ];
    fuzz("prepare", seeds, &tokens, |b| match b.split_first() {
        Some((&format, rest)) => prepare_log(format, rest),
        None => Ok(()),
    });
}
