//! The delimited reader: the tutorial's format, header files, ragged
//! histories, truncation, vocabularies and error messages.

mod common;
use std::io::Write;
use std::path::{Path, PathBuf};

use din::data::{apply_vocab, infer_vocab, read_dataset, ReadOptions};
use din::schema::Config;
use din::Error;

const REQUIRE: ReadOptions = ReadOptions::strict(true);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bundled() -> Config {
    Config::from_toml_file(&workspace().join("configs/movie_sample.toml")).expect("bundled config")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    p
}

#[test]
fn reads_the_tutorial_sample_with_ragged_histories() {
    let config = bundled();
    let layout = config.validate().expect("valid");
    let path = workspace().join("data/movie_sample.txt");
    let data = read_dataset(&path, &config, &layout, REQUIRE).expect("reads");
    assert_eq!(data.len(), 1380);
    // Row 1: 1 1 1 "186,0,...,0" 1 112 2 1
    assert_eq!(data.batch.sparse[0][0], 1);
    assert_eq!(data.batch.sparse[3][0], 112);
    assert_eq!(data.batch.sequences[0].row(0), &[186], "padding zeros are not stored");
    assert_eq!(data.batch.dense[0][0], 1.0);
    assert_eq!(data.batch.labels[0], 1.0);
    // The stored history length equals the hist_len column (which counts
    // beyond the 50 ids the file keeps) on every row.
    for r in 0..data.len() {
        assert_eq!(
            data.batch.sequences[0].row(r).len() as f32,
            data.batch.dense[0][r].min(50.0),
            "row {r}"
        );
    }
    let positives = data.batch.labels.iter().filter(|y| **y == 1.0).count();
    assert_eq!(positives, 230);
    assert_eq!(data.users.as_ref().map(|u| u.len()), Some(1380));
}

#[test]
fn keras_style_split_keeps_file_order() {
    let config = bundled();
    let layout = config.validate().expect("valid");
    let data = read_dataset(&workspace().join("data/movie_sample.txt"), &config, &layout, REQUIRE).expect("reads");
    let lines = data.lines.clone();
    let (train, valid) = data.split_tail(0.3);
    // floor(1380 * (1 - 0.3)) = floor(965.99999...) = 965, as Keras computes it.
    assert_eq!((train.len(), valid.len()), (965, 415));
    assert_eq!(valid.lines[0], lines[965]);
    assert_eq!(valid.lines[414], 1380);
}

fn tiny_config(extra_sequence: &str, header: bool) -> Config {
    let input = if header {
        "header = true\ndelimiter = \",\"\nsequence_separator = \"|\"".to_string()
    } else {
        "columns = [\"item\", \"hist\", \"label\"]".to_string()
    };
    Config::from_toml_str(&format!(
        r#"
[input]
{input}
[schema]
label = "label"
sparse = [{{ name = "item" }}]
sequence = [{{ name = "hist", shares_embedding_with = "item", max_len = 3 {extra_sequence} }}]
din_pairs = [{{ target = "item", history = "hist" }}]
"#
    ))
    .expect("parses")
}

#[test]
fn truncation_keeps_the_chosen_end() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write(dir.path(), "d.tsv", "9\t1,2,3,4,5\t1\n");
    for (extra, want) in [
        ("", vec![3, 4, 5]),                               // oldest first, keep recent
        (", truncation = \"keep_oldest\"", vec![1, 2, 3]), // oldest first, keep oldest
        (", order = \"recent_first\"", vec![1, 2, 3]),     // recent first, keep recent
        (
            ", order = \"recent_first\", truncation = \"keep_oldest\"",
            vec![3, 4, 5],
        ), // recent first, keep oldest
    ] {
        let config = tiny_config(extra, false);
        let layout = config.validate().expect("valid");
        let d = read_dataset(&p, &config, &layout, REQUIRE).expect("reads");
        assert_eq!(d.batch.sequences[0].row(0), want.as_slice(), "{extra}");
    }
}

#[test]
fn header_files_map_columns_by_name_and_allow_extra_columns() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write(dir.path(), "d.csv", "label,unused,hist,item\n1,x,4|5,7\n0,y,,2\n");
    let config = tiny_config("", true);
    let mut layout = config.validate().expect("valid");
    let mut d = read_dataset(&p, &config, &layout, REQUIRE).expect("reads");
    assert_eq!(d.batch.sparse[0], vec![7, 2]);
    assert_eq!(d.batch.sequences[0].row(0), &[4, 5]);
    assert!(d.batch.sequences[0].row(1).is_empty());
    assert_eq!(d.batch.labels, vec![1.0, 0.0]);
    infer_vocab(&mut layout, &d).expect("small ids");
    assert_eq!(
        layout.tables[0].vocab_size,
        Some(8),
        "max id over item and hist (7) + 1"
    );
    apply_vocab(&layout, &mut d).expect("in vocabulary");
    // A file without the label column can be read for prediction.
    let p2 = write(dir.path(), "p.csv", "item,hist\n3,1|2\n");
    let d2 = read_dataset(&p2, &config, &layout, ReadOptions::strict(false)).expect("reads");
    assert!(d2.batch.labels.is_empty());
    let err = read_dataset(&p2, &config, &layout, REQUIRE).expect_err("label required");
    assert!(
        matches!(err, Error::MissingColumn { ref column, .. } if column == "label"),
        "{err}"
    );
}

#[test]
fn errors_name_file_line_column_and_value() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = tiny_config("", false);
    let layout = config.validate().expect("valid");
    let cases = [
        ("short", "1\t2\t0\n3\t1\n", "short:2: expected 3 columns, found 2"),
        (
            "nonnum",
            "1\t2\t0\nabc\t1\t1\n",
            "nonnum:2: column `item`: not a non-negative integer id: \"abc\"",
        ),
        (
            "badhist",
            "1\t2,x\t0\n",
            "badhist:1: column `hist`: not a non-negative integer id: \"x\"",
        ),
        (
            "label",
            "1\t2\t0.5\n",
            "label:1: column `label`: label must be 0 or 1: \"0.5\"",
        ),
        ("huge", "99999999999\t2\t0\n", "column `item`: id too large"),
    ];
    for (name, text, want) in cases {
        let p = write(dir.path(), name, text);
        let err = read_dataset(&p, &config, &layout, REQUIRE).expect_err(name).to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
    let empty = write(dir.path(), "empty", "");
    let err = read_dataset(&empty, &config, &layout, REQUIRE).expect_err("empty");
    assert!(matches!(err, Error::EmptyFile { .. }), "{err}");
    let err = read_dataset(&dir.path().join("absent.tsv"), &config, &layout, REQUIRE).expect_err("missing");
    assert!(
        err.to_string().contains("absent.tsv") && err.to_string().contains("cannot open"),
        "{err}"
    );
}

#[test]
fn out_of_vocabulary_ids_error_or_map_to_the_reserved_row() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write(dir.path(), "d.tsv", "1\t2\t0\n3\t4,9\t1\n");
    let mut config = tiny_config("", false);
    config.schema.sparse[0].vocab_size = Some(5);
    let layout = config.validate().expect("valid");
    let mut d = read_dataset(&p, &config, &layout, REQUIRE).expect("reads");
    let err = apply_vocab(&layout, &mut d).expect_err("9 >= 5").to_string();
    assert!(
        err.contains("d.tsv:2: column `hist`: id 9 is at or above the vocabulary size 5"),
        "{err}"
    );

    config.schema.sparse[0].oov = din::schema::Oov::Reserved;
    let layout = config.validate().expect("valid");
    assert_eq!(layout.tables[0].rows(), 6, "one reserved row");
    let mut d = read_dataset(&p, &config, &layout, REQUIRE).expect("reads");
    apply_vocab(&layout, &mut d).expect("reserved");
    assert_eq!(d.batch.sequences[0].row(1), &[4, 5], "9 maps to the reserved row 5");
}

#[test]
fn paired_histories_must_align() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::from_toml_str(
        r#"
[input]
columns = ["hist_items", "hist_cates", "item", "cate", "label"]
delimiter = ";"
sequence_separator = " "
[schema]
label = "label"
sparse = [{ name = "item" }, { name = "cate", embedding_dim = 4 }]
sequence = [
  { name = "hist_items", shares_embedding_with = "item" },
  { name = "hist_cates", shares_embedding_with = "cate" },
]
din_pairs = [{ target = "item", history = "hist_items" }, { target = "cate", history = "hist_cates" }]
"#,
    )
    .expect("parses");
    let layout = config.validate().expect("valid");
    assert_eq!(layout.query_dim(), 12, "item (8) and cate (4) concatenated");
    let p = write(dir.path(), "d.txt", "1 2 3;4 5;6;7;1\n");
    let err = read_dataset(&p, &config, &layout, REQUIRE)
        .expect_err("misaligned")
        .to_string();
    assert!(err.contains("d.txt:1") && err.contains("have 3 and 2 ids"), "{err}");
    // Same count of real ids, padding at different positions: item 7 would meet category 3.
    let p = write(dir.path(), "pad.txt", "5 0 7;2 3 0;6;7;1\n");
    let err = read_dataset(&p, &config, &layout, REQUIRE)
        .expect_err("padding misaligned")
        .to_string();
    assert!(
        err.contains("pad.txt:1") && err.contains("padding (0) at position 2"),
        "{err}"
    );
    // Aligned padding is fine and is dropped from both.
    let p = write(dir.path(), "ok.txt", "5 0 7;2 0 3;6;7;1\n");
    let d = read_dataset(&p, &config, &layout, REQUIRE).expect("aligned");
    assert_eq!(
        (d.batch.sequences[0].row(0), d.batch.sequences[1].row(0)),
        (&[5, 7][..], &[2, 3][..])
    );
}

/// The DIN paper's Amazon Electronics format (PaddleRec's sample), if `../shared` is present.
#[test]
fn reads_the_amazon_fixture_when_shared_data_is_present() {
    let Some(path) = common::shared("fixtures/paddlerec_din_sample_data.txt") else {
        return;
    };
    let mut config = bundled();
    config.input.columns = vec![
        "hist_items".into(),
        "hist_cates".into(),
        "item".into(),
        "cate".into(),
        "label".into(),
    ];
    config.input.delimiter = ";".into();
    config.input.sequence_separator = " ".into();
    let text = r#"
label = "label"
sparse = [{ name = "item" }, { name = "cate" }]
sequence = [
  { name = "hist_items", shares_embedding_with = "item", max_len = 200 },
  { name = "hist_cates", shares_embedding_with = "cate", max_len = 200 },
]
din_pairs = [{ target = "item", history = "hist_items" }, { target = "cate", history = "hist_cates" }]
"#;
    config.schema = toml::from_str(text).expect("schema");
    let layout = config.validate().expect("valid");
    let data = read_dataset(&path, &config, &layout, REQUIRE).expect("reads");
    assert_eq!(data.len(), 100);
    assert_eq!(data.batch.labels.iter().filter(|y| **y == 1.0).count(), 48);
    assert_eq!(data.batch.sequences[0].row(0), &[3737, 19450]);
    assert_eq!(data.batch.sequences[1].row(0), &[288, 196]);
}

#[test]
fn header_problems_and_stray_quotes_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = tiny_config("", true);
    let layout = config.validate().expect("valid");
    let p = write(dir.path(), "dup.csv", "item,hist,item,label\n1,2,3,0\n");
    let err = read_dataset(&p, &config, &layout, REQUIRE)
        .expect_err("duplicate")
        .to_string();
    assert!(
        err.contains("dup.csv:1: column `item`") && err.contains("duplicate column name"),
        "{err}"
    );
    // Quoting is off by default: a stray quote is a value, not the start of a quoted field.
    let p = write(dir.path(), "q.csv", "item,hist,label\n\"1,2,0\n3,4,1\n");
    let err = read_dataset(&p, &config, &layout, REQUIRE)
        .expect_err("quote")
        .to_string();
    assert!(
        err.contains("q.csv:2: column `item`") && err.contains("\"\\\"1\""),
        "{err}"
    );
}

#[test]
fn predicting_needs_neither_label_nor_user_column() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = tiny_config("", true);
    config.schema.user = Some("uid".into());
    let layout = config.validate().expect("valid");
    let p = write(dir.path(), "p.csv", "item,hist\n3,1|2\n");
    let d = read_dataset(&p, &config, &layout, ReadOptions::strict(false)).expect("reads");
    assert!(d.users.is_none() && d.batch.labels.is_empty());
    let err = read_dataset(&p, &config, &layout, REQUIRE).expect_err("evaluation needs them");
    assert!(matches!(err, Error::MissingColumn { .. }), "{err}");
}

#[test]
fn inferring_a_huge_vocabulary_names_the_offending_id() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = write(dir.path(), "raw.tsv", "1\t2\t0\n4000000000\t3\t1\n");
    let config = tiny_config("", false);
    let mut layout = config.validate().expect("valid");
    let d = read_dataset(&p, &config, &layout, REQUIRE).expect("reads");
    let err = infer_vocab(&mut layout, &d).expect_err("too large").to_string();
    assert!(
        err.contains("raw.tsv:2: column `item`") && err.contains("4000000000") && err.contains("ids must be dense"),
        "{err}"
    );
    let mut config = tiny_config("", false);
    config.schema.sparse[0].vocab_size = Some(u32::MAX as usize);
    let err = config.validate().expect_err("32-bit ids").to_string();
    assert!(
        err.contains("schema.sparse[0].vocab_size") && err.contains("below 4294967295"),
        "{err}"
    );
}
