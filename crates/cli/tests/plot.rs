//! `din plot` and `din explain` on a model trained on the bundled sample:
//! the pictures hold what they should (every epoch, the saved epoch, the
//! candidates with their scores, the clicked one, one cell per behaviour),
//! and bad requests are refused with the flag named.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

fn din<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(cwd: &Path, args: I) -> Output {
    Command::new(env!("CARGO_BIN_EXE_din"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("din")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pictures_of_training_and_attention() {
    let tmp = TempDir::new().expect("tmp");
    let cwd = tmp.path();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/movie_sample.txt");
    ok(&din(
        cwd,
        [
            "train",
            "--epochs",
            "3",
            "--threads",
            "1",
            "--out",
            "m",
            "--set",
            "model.attention.hidden_units=[8]",
            "--set",
            "model.dnn.hidden_units=[8]",
        ],
    ));
    let said = ok(&din(cwd, ["plot", "--model", "m", "--out", "curves.svg"]));
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cwd.join("m/history.json")).expect("history")).expect("json");
    let best = history
        .as_array()
        .expect("array")
        .iter()
        .min_by(|a, b| {
            let v = |r: &serde_json::Value| r["validation"]["logloss"].as_f64().expect("logloss");
            v(a).total_cmp(&v(b))
        })
        .expect("epochs")["epoch"]
        .as_u64()
        .expect("epoch");
    assert!(said.contains(&format!("saved epoch {best}")), "{said}");
    let svg = std::fs::read_to_string(cwd.join("curves.svg")).expect("svg");
    assert!(svg.starts_with("<svg"), "an SVG");
    for text in [
        "train loss",
        "validation logloss",
        "validation AUC",
        "validation GAUC",
        &format!("saved (epoch {best})"),
    ] {
        assert!(svg.contains(text), "curves.svg lacks `{text}`");
    }
    // Every epoch is a point on each of the four curves.
    assert_eq!(svg.matches("<circle").count(), 4 * 3);

    // Row 0 of the sample: its history with its candidates (the rows after
    // it with the same history).
    let explain = |row: &str, out: &str| {
        let data = sample.to_str().expect("path");
        din(
            cwd,
            ["explain", "--model", "m", "--data", data, "--row", row, "--out", out],
        )
    };
    let said = ok(&explain("0", "attention.svg"));
    let text = std::fs::read_to_string(&sample).expect("sample");
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let history: Vec<&str> = lines[0][3].split(',').filter(|id| *id != "0").collect();
    let group = lines.iter().take_while(|l| l[3] == lines[0][3]).count().min(8);
    assert!(
        said.contains(&format!("{group} candidates over {} behaviours", history.len())),
        "{said}"
    );
    let svg = std::fs::read_to_string(cwd.join("attention.svg")).expect("svg");
    assert_eq!(
        svg.matches("<rect").count() - 1,
        group * history.len(),
        "one cell per pair"
    );
    for line in &lines[..group] {
        assert!(
            svg.contains(&format!("{} (p ", line[5])),
            "candidate {} is labelled",
            line[5]
        );
    }
    assert_eq!(
        svg.matches(", clicked").count(),
        lines[..group].iter().filter(|l| l[7] == "1").count()
    );

    let e = err(&din(cwd, ["plot", "--model", "m", "--out", "curves.png"]));
    assert!(e.contains("curves.png") && e.contains(".svg"), "{e}");
    let e = err(&explain("999999", "a.svg"));
    assert!(e.contains("--row 999999") && e.contains("1380 data rows"), "{e}");
    let e = err(&din(cwd, ["plot", "--model", "nothing", "--out", "x.svg"]));
    assert!(e.contains("nothing"), "{e}");
}
