//! The real `din serve` binary on a free loopback port: scores, reloads on
//! SIGHUP and on `POST /v1/reload`, refuses a broken version, and stops on
//! SIGTERM. Talks to 127.0.0.1 only; every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn din(cwd: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_din"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "din {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP/1.1 exchange; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("answer");
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let (_, payload) = text.split_once("\r\n\r\n").expect("headers end");
    (
        status,
        serde_json::from_str(payload).unwrap_or(Value::String(payload.to_string())),
    )
}

fn signal(child: &Child, sig: &str) {
    // bash's built-in kill: no procps needed.
    let ok = Command::new("bash")
        .args(["-c", &format!("kill {sig} {}", child.id())])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig}");
}

/// Polls `/readyz` until it reports `version` (at most 20 s).
fn wait_for_version(port: u16, version: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if http(port, "GET", "/readyz", None).1["model_version"] == json!(version) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("version {version} never served");
}

#[test]
fn serves_reloads_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path();
    din(
        work,
        &[
            "bench",
            "gen",
            "--out",
            "data",
            "--users",
            "60",
            "--items",
            "80",
            "--categories",
            "5",
            "--candidates",
            "3",
        ],
    );
    let train = |out: &str, seed: &str| {
        din(
            work,
            &[
                "train",
                "--config",
                "data/config.toml",
                "--out",
                out,
                "--epochs",
                "1",
                "--seed",
                seed,
                "--threads",
                "1",
                "--set",
                "model.attention.hidden_units=[8,4]",
                "--set",
                "model.dnn.hidden_units=[6]",
            ],
        )
    };
    train("versions/1", "1");
    let mut child = Command::new(env!("CARGO_BIN_EXE_din"))
        .args([
            "serve",
            "--model",
            "versions",
            "--addr",
            "127.0.0.1:0",
            "--threads",
            "1",
        ])
        .current_dir(work)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert!(line.contains("model version 1"), "{line}");

    // Dense ids (bench data has no vocabulary); categories from the item table.
    let request = json!({
        "user": { "user_id": 3, "hist_item_id": [5, 9, 12] },
        "candidates": [{ "item_id": 7 }, { "item_id": 70 }],
        "explain": 1
    });
    let (status, v1) = http(port, "POST", "/v1/score", Some(&request));
    assert_eq!(status, 200, "{v1}");
    assert_eq!(v1["model_version"], json!("1"));
    assert_eq!(v1["scores"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        v1["explanations"][0][0]["id"].as_u64().map(|i| [5, 9, 12].contains(&i)),
        Some(true)
    );
    let (status, bad) = http(
        port,
        "POST",
        "/v1/score",
        Some(&json!({ "user": {}, "candidates": [{ "item_id": 7 }] })),
    );
    assert_eq!(status, 400);
    assert_eq!(bad["field"], json!("candidates[0].user_id"));

    // A new version is picked up on SIGHUP.
    train("versions/2", "2");
    signal(&child, "-HUP");
    wait_for_version(port, "2");
    let (_, v2) = http(port, "POST", "/v1/score", Some(&request));
    assert_eq!(v2["model_version"], json!("2"));
    assert_ne!(v2["scores"], v1["scores"]);

    // A broken version 3 is refused; 2 serves on.
    std::fs::create_dir_all(work.join("versions/3")).expect("mkdir");
    std::fs::write(work.join("versions/3/config.json"), "{").expect("write");
    let (status, refused) = http(port, "POST", "/v1/reload", None);
    assert_eq!(status, 422, "{refused}");
    assert_eq!(http(port, "GET", "/readyz", None).1["model_version"], json!("2"));

    signal(&child, "-TERM");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("din serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after shutdown"
    );
}
