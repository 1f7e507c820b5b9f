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

    // The same pictures as PNG, their text drawn with the bundled font.
    ok(&din(cwd, ["plot", "--model", "m", "--out", "curves.png"]));
    let curves = Bitmap::read(&cwd.join("curves.png"));
    assert_eq!((curves.width, curves.height), (1000, 420));
    assert!(
        curves.count(0..40, |p| p[0] < 100 && p[1] < 100 && p[2] < 100) > 50,
        "the captions' text"
    );
    assert!(
        curves.count(40..420, |p| p != [255, 255, 255]) > 2000,
        "axes and curves"
    );
    ok(&explain("0", "attention.png"));
    let heat = Bitmap::read(&cwd.join("attention.png"));
    let n = history.len() as u32;
    assert_eq!(
        (heat.width, heat.height),
        ((160 + 36 * n).clamp(480, 2400), 140 + 34 * group as u32)
    );
    // The cells: red for positive weights, blue for negative (never grey).
    let tinted = heat.count(0..heat.height, |p| p[0] != p[2]);
    assert!(
        tinted > 500,
        "{tinted} tinted pixels: at least the largest weight's cell"
    );
    assert!(
        heat.count(0..30, |p| p[0] < 100 && p[1] < 100 && p[2] < 100) > 50,
        "the title's text"
    );
    let e = err(&din(cwd, ["plot", "--model", "m", "--out", "curves.jpg"]));
    assert!(e.contains("curves.jpg") && e.contains(".svg or .png"), "{e}");
    let e = err(&explain("999999", "a.svg"));
    assert!(e.contains("--row 999999") && e.contains("1380 data rows"), "{e}");
    let e = err(&din(cwd, ["plot", "--model", "nothing", "--out", "x.svg"]));
    assert!(e.contains("nothing"), "{e}");
}

/// A decoded 8-bit RGB PNG.
struct Bitmap {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Bitmap {
    fn read(path: &Path) -> Bitmap {
        let decoder = png::Decoder::new(std::fs::File::open(path).expect("png"));
        let mut reader = decoder.read_info().expect("a PNG");
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).expect("a frame");
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Rgb, png::BitDepth::Eight)
        );
        rgb.truncate(info.buffer_size());
        Bitmap {
            width: info.width,
            height: info.height,
            rgb,
        }
    }

    /// Pixels of the rows `rows` for which `f` holds.
    fn count(&self, rows: std::ops::Range<u32>, f: impl Fn([u8; 3]) -> bool) -> usize {
        let row = self.width as usize * 3;
        self.rgb[rows.start as usize * row..rows.end as usize * row]
            .chunks_exact(3)
            .filter(|p| f([p[0], p[1], p[2]]))
            .count()
    }
}
