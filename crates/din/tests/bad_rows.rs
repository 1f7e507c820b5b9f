//! Malformed data rows: each kind is an error naming the file, the line,
//! the column and the value by default; with `skip_bad_rows` they are
//! skipped, counted and listed, the good rows read exactly as from a clean
//! file, and more than the allowed fraction stops the read.

mod common;

use std::path::Path;

use din::data::{read_dataset, Dataset, ReadOptions};
use din::Error;

/// A good row of `common::config`: user, item, cate, price (2 values),
/// hist_items, hist_cates, tags, label.
const GOOD: [&str; 8] = ["1", "3", "1", "0.5,-1", "1,2,4", "1,1,2", "1,2", "1"];

/// A row: `GOOD` with column `col` replaced by `value` (`None`: as is).
fn row(edit: Option<(usize, &str)>) -> String {
    let mut cols: Vec<String> = GOOD.iter().map(|s| s.to_string()).collect();
    if let Some((c, v)) = edit {
        cols[c] = v.to_string();
    }
    cols.join("\t")
}

/// Each kind of malformed row: the row, the column named, the words expected.
fn kinds() -> Vec<(String, &'static str, &'static str)> {
    let e = |c: usize, v: &str| row(Some((c, v)));
    vec![
        (GOOD[..7].join("\t"), "", "expected 8 columns, found 7"),
        (format!("{}\textra", row(None)), "", "expected 8 columns, found 9"),
        (e(0, "abc"), "user", "not a non-negative integer id"),
        (e(1, "-1"), "item", "not a non-negative integer id"),
        (e(1, "1.5"), "item", "not a non-negative integer id"),
        (e(1, "99999999999"), "item", "id too large"),
        (e(2, ""), "cate", "not a non-negative integer id"),
        (e(3, "x,1"), "price", "not a number"),
        (e(3, "NaN,1"), "price", "not a finite number"),
        (e(3, "inf,1"), "price", "not a finite number"),
        (e(3, "0.5"), "price", "expected 2 values"),
        (e(3, "1,2,3"), "price", "expected 2 values"),
        (e(3, ""), "price", "not a number"),
        (e(4, "1,x,4"), "hist_items", "not a non-negative integer id"),
        (e(4, "1,-2,4"), "hist_items", "not a non-negative integer id"),
        (e(4, "1,2"), "hist_cates", "have 2 and 3 ids"),
        (e(4, "1,0,4"), "hist_cates", "only one has padding (0) at position 2"),
        (e(6, "a"), "tags", "not a non-negative integer id"),
        (e(7, "2"), "label", "label must be 0 or 1"),
        (e(7, "yes"), "label", "label must be 0 or 1"),
        (e(7, ""), "label", "label must be 0 or 1"),
        (e(7, "-1"), "label", "label must be 0 or 1"),
        (e(7, "0.5"), "label", "label must be 0 or 1"),
    ]
}

fn read(path: &Path, skip: Option<f64>) -> din::Result<Dataset> {
    let config = common::config("prelu", "none", "prelu");
    let layout = common::layout(&config);
    let options = ReadOptions {
        require_label: true,
        skip_bad_rows: skip,
    };
    read_dataset(path, &config, &layout, options)
}

#[test]
fn every_kind_of_malformed_row_names_its_line_column_and_value() {
    let dir = tempfile::tempdir().expect("tmp");
    let kinds = kinds();
    assert!(kinds.len() >= 20);
    for (i, (bad, column, words)) in kinds.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.tsv"));
        std::fs::write(&path, format!("{}\n{}\n{}\n", row(None), bad, row(None))).expect("write");
        let err = match std::panic::catch_unwind(|| read(&path, None)) {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("kind {i} ({bad:?}) was read"),
            Err(_) => panic!("kind {i} ({bad:?}) panicked"),
        };
        let text = err.to_string();
        assert!(text.contains(&format!("bad{i}.tsv:2")), "kind {i}: {text}");
        assert!(text.contains(words), "kind {i}: {words:?} not in {text}");
        if !column.is_empty() {
            assert!(text.contains(&format!("column `{column}`")), "kind {i}: {text}");
            assert!(matches!(err, Error::Parse { line: 2, .. }), "kind {i}: {err:?}");
        } else {
            assert!(matches!(err, Error::RowLength { line: 2, .. }), "kind {i}: {err:?}");
        }
    }
}

#[test]
fn skipped_rows_are_counted_listed_and_leave_the_good_rows_as_they_were() {
    let dir = tempfile::tempdir().expect("tmp");
    let kinds = kinds();
    // 1000 good rows (varied), the bad ones spread among them.
    let good: Vec<String> = (0..1000)
        .map(|i| {
            let r = row(Some((1, &(1 + i % 11).to_string())));
            let label = if i % 3 == 0 { "0" } else { "1" };
            format!("{}{label}", &r[..r.len() - 1])
        })
        .collect();
    let mut text = String::new();
    let mut bad_lines = Vec::new();
    let mut line = 0;
    for (i, g) in good.iter().enumerate() {
        if i % 100 == 50 && i / 100 < kinds.len() {
            // up to 10 bad rows, 1% of the file
            text.push_str(&kinds[i / 100].0);
            text.push('\n');
            line += 1;
            bad_lines.push(line);
        }
        text.push_str(g);
        text.push('\n');
        line += 1;
    }
    let clean = dir.path().join("clean.tsv");
    std::fs::write(&clean, good.join("\n") + "\n").expect("write");
    let dirty = dir.path().join("dirty.tsv");
    std::fs::write(&dirty, &text).expect("write");

    let err = read(&dirty, None)
        .map(|_| ())
        .expect_err("strict by default")
        .to_string();
    assert!(err.contains(&format!("dirty.tsv:{}", bad_lines[0])), "{err}");

    let want = read(&clean, None).expect("clean");
    let got = read(&dirty, Some(0.01)).expect("within 1%");
    assert_eq!(got.batch, want.batch, "the good rows, exactly");
    assert_eq!(got.skipped.count, bad_lines.len());
    let listed: Vec<u64> = got.skipped.first.iter().map(|(l, _)| *l).collect();
    assert_eq!(listed, bad_lines.iter().take(10).map(|&l| l as u64).collect::<Vec<_>>());
    assert!(
        got.skipped.first[0].1.contains("expected 8 columns"),
        "{:?}",
        got.skipped.first
    );

    // Over the limit: 10 bad rows of 1010 is more than 0.5%.
    let err = read(&dirty, Some(0.005)).map(|_| ()).expect_err("too many").to_string();
    assert!(
        err.contains("dirty.tsv") && err.contains("10 of 1010 rows are malformed") && err.contains("0.005"),
        "{err}"
    );
    // Only bad rows: an error, not an empty data set.
    let all_bad = dir.path().join("all_bad.tsv");
    std::fs::write(&all_bad, format!("{}\n", kinds[2].0)).expect("write");
    assert!(read(&all_bad, Some(1.0)).is_err());
}

/// Ids outside their table (`oov = "error"`) are found after reading; with
/// skipping they drop their rows like malformed ones, counted and listed
/// with the column and the id, within the same limit.
#[test]
fn rows_with_ids_outside_the_vocabulary_are_skipped_with_the_others() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = common::config("prelu", "none", "prelu");
    let layout = common::layout(&config);
    let clean_rows: Vec<String> = (0..40).map(|_| row(None)).collect();
    let mut dirty_rows = clean_rows.clone();
    dirty_rows.insert(5, row(Some((1, "999"))));
    dirty_rows.insert(20, row(Some((4, "1,999,4"))));
    dirty_rows.insert(30, GOOD[..7].join("\t"));
    let write = |name: &str, rows: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, rows.join("\n") + "\n").expect("write");
        p
    };
    let (clean, dirty) = (write("clean.tsv", &clean_rows), write("dirty.tsv", &dirty_rows));
    let mut got = read(&dirty, Some(0.1)).expect("reads");
    assert_eq!(
        (got.len(), got.skipped.count),
        (42, 1),
        "the short row is skipped by the reader"
    );
    let strict = din::data::apply_vocab(&layout, &mut got.clone())
        .expect_err("999")
        .to_string();
    assert!(strict.contains("dirty.tsv:6") && strict.contains("999"), "{strict}");
    din::data::drop_out_of_vocabulary(&layout, &mut got, 0.1).expect("skips");
    let want = read(&clean, None).expect("clean");
    assert_eq!(got.batch, want.batch, "exactly the clean rows");
    assert_eq!(got.len(), 40);
    assert_eq!(got.skipped.count, 3);
    let lines: Vec<u64> = got.skipped.first.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [6, 21, 31]);
    assert!(got.skipped.first[0].1.contains("item") && got.skipped.first[0].1.contains("999"));
    assert!(
        got.skipped.first[1].1.contains("hist_items"),
        "{:?}",
        got.skipped.first[1]
    );
    assert_eq!(got.lines.len(), 40);
    assert!(!got.lines.contains(&6) && !got.lines.contains(&21));
    // 3 of 43 is more than 5%.
    let mut again = read(&dirty, Some(0.05)).expect("reads");
    let err = din::data::drop_out_of_vocabulary(&layout, &mut again, 0.05)
        .expect_err("too many")
        .to_string();
    assert!(err.contains("dirty.tsv") && err.contains("3 of 43"), "{err}");
}
