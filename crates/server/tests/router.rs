//! Every endpoint and error path of the router, in process (`oneshot`).

mod common;

use std::sync::mpsc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use din_server::{router, Limits};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

async fn call(app: &Router, method: Method, uri: &str, content_type: Option<&str>, body: impl Into<Body>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let response = app
        .clone()
        .oneshot(req.body(body.into()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn score(app: &Router, body: &Value) -> Answer {
    call(
        app,
        Method::POST,
        "/v1/score",
        Some("application/json"),
        body.to_string(),
    )
    .await
}

fn map(v: &Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

#[tokio::test]
async fn scores_match_the_library_and_carry_the_model_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, _) = common::state(dir.path(), Limits::default());
    let app = router(state.clone());
    let mut body = common::request(20);
    body["explain"] = json!(2);
    let a = score(&app, &body).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let v = a.json();
    let model = state.current();
    assert_eq!(v["model_version"], json!(model.version));
    let candidates: Vec<Map<String, Value>> = body["candidates"].as_array().expect("list").iter().map(map).collect();
    let direct = model.scorer.score(&map(&body["user"]), &candidates, 2).expect("scores");
    let served: Vec<f32> = v["scores"]
        .as_array()
        .expect("scores")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect();
    assert_eq!(served, direct.scores, "JSON carries every f32 exactly");
    let e = v["explanations"].as_array().expect("explanations");
    assert_eq!(e.len(), 20);
    assert_eq!(e[0].as_array().expect("list").len(), 2);
    assert_eq!(e[0][0]["position"], json!(direct.explanations[0][0].position));
    assert_eq!(e[0][0]["id"], direct.explanations[0][0].id);
    // Without `explain` there is no explanations field.
    let plain = score(&app, &common::request(3)).await.json();
    assert!(plain.get("explanations").is_none());
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_candidates: 5,
        ..Limits::default()
    };
    let (state, _) = common::state(dir.path(), limits);
    let app = router(state);
    let good = common::request(2);
    let with = |path: &[&str], v: Value| {
        let mut b = good.clone();
        let mut at = &mut b;
        for p in &path[..path.len() - 1] {
            at = match p.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*p],
            };
        }
        let last = path[path.len() - 1];
        match last.parse::<usize>() {
            Ok(i) => at[i] = v,
            Err(_) => at[last] = v,
        }
        b
    };
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("{".into(), None, "EOF"),
        ("[]".into(), None, "must be a JSON object"),
        ("3".into(), None, "invalid type"),
        ("{}".into(), None, "missing field `user`"),
        (good.to_string() + "x", None, "trailing characters"),
        (
            json!({"user": {}, "candidates": [], "extra": 1}).to_string(),
            Some("extra"),
            "unknown field `extra`",
        ),
        (with(&["user"], json!([1])).to_string(), Some("user"), "invalid type"),
        (
            with(&["candidates"], json!({})).to_string(),
            Some("candidates"),
            "invalid type",
        ),
        (
            with(&["candidates", "1"], json!(3)).to_string(),
            Some("candidates[1]"),
            "invalid type",
        ),
        (
            with(&["explain"], json!(-1)).to_string(),
            Some("explain"),
            "invalid value",
        ),
        (
            with(&["explain"], json!("2")).to_string(),
            Some("explain"),
            "invalid type",
        ),
        (
            common::request(6).to_string(),
            Some("candidates"),
            "at most 5 per request",
        ),
        (
            with(&["candidates"], json!([])).to_string(),
            Some("candidates"),
            "at least one candidate",
        ),
        (
            with(&["candidates", "0", "item_id"], json!("nope")).to_string(),
            Some("candidates[0].item_id"),
            "unknown value \"nope\"",
        ),
        (
            with(&["candidates", "0", "item_id"], json!(true)).to_string(),
            Some("candidates[0].item_id"),
            "expected a raw id",
        ),
        (
            with(&["user", "hist_item_id"], json!(["i1", 2.5])).to_string(),
            Some("user.hist_item_id[1]"),
            "expected a raw id",
        ),
        (
            with(&["user", "age"], json!(3)).to_string(),
            Some("user.age"),
            "not a feature of this model",
        ),
        (
            with(&["user", "user_id"], json!(null)).to_string(),
            Some("user.user_id"),
            "expected a raw id",
        ),
    ];
    for (body, field, message) in cases {
        let a = call(&app, Method::POST, "/v1/score", Some("application/json"), body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.text);
        let v = a.json();
        assert_eq!(v["field"].as_str(), field, "{body}: {}", a.text);
        let error = v["error"].as_str().expect("message");
        assert!(error.contains(message), "{body}: {error}");
    }
}

#[tokio::test]
async fn size_type_and_route_errors_are_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        max_body_bytes: 200,
        ..Limits::default()
    };
    let (state, _) = common::state(dir.path(), limits);
    let app = router(state);
    let big = common::request(30).to_string();
    assert!(big.len() > 200);
    let a = call(&app, Method::POST, "/v1/score", Some("application/json"), big.clone()).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.json()["error"]
        .as_str()
        .expect("message")
        .contains("larger than 200 bytes"));
    // With a Content-Length header the body is not even read.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/score")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big))
        .expect("request");
    let response = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let small = common::request(1).to_string();
    for ct in [None, Some("text/plain"), Some("application/jsonx")] {
        let a = call(&app, Method::POST, "/v1/score", ct, small.clone()).await;
        assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert!(a.json()["error"]
            .as_str()
            .expect("message")
            .contains("application/json"));
    }
    let a = call(
        &app,
        Method::POST,
        "/v1/score",
        Some("application/json; charset=utf-8"),
        small,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = call(&app, Method::GET, "/nope", None, Body::empty()).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.json()["error"].as_str().expect("message").contains("/nope"));
    let a = call(&app, Method::GET, "/v1/score", None, Body::empty()).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a.json()["error"].is_string());
}

#[tokio::test]
async fn a_full_queue_sheds_requests_with_503_and_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = Limits {
        queue: 1,
        ..Limits::default()
    };
    let (state, _) = common::state(dir.path(), limits);
    let app = router(state.clone());
    // Occupy the one place in the queue with a job that waits.
    let (release, wait) = mpsc::channel::<()>();
    assert!(state.submit(move |_slot| {
        let _ = wait.recv();
    }));
    assert!(!state.submit(|_| {}), "the queue holds one job");
    let a = score(&app, &common::request(2)).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert!(a.json()["error"].as_str().expect("message").contains("overloaded"));
    let metrics = call(&app, Method::GET, "/metrics", None, Body::empty()).await.text;
    assert!(metrics.contains("din_queue_depth 1"), "{metrics}");
    release.send(()).expect("release");
    // The place comes back once the job is done.
    for _ in 0..200 {
        let a = score(&app, &common::request(2)).await;
        if a.status == StatusCode::OK {
            let metrics = call(&app, Method::GET, "/metrics", None, Body::empty()).await.text;
            assert!(metrics.contains("din_queue_depth 0"), "{metrics}");
            assert!(
                metrics.contains(r#"din_requests_total{route="/v1/score",status="503"}"#),
                "{metrics}"
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the queue never drained");
}

#[tokio::test]
async fn health_model_metrics_and_openapi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, model_dir) = common::state(dir.path(), Limits::default());
    let app = router(state.clone());
    let a = call(&app, Method::GET, "/healthz", None, Body::empty()).await;
    assert_eq!((a.status, a.json()["status"].clone()), (StatusCode::OK, json!("ok")));
    let a = call(&app, Method::GET, "/readyz", None, Body::empty()).await;
    let version = state.current().version.clone();
    assert_eq!(a.json()["model_version"], json!(version));
    let v = call(&app, Method::GET, "/v1/model", None, Body::empty()).await.json();
    assert_eq!(v["version"], json!(version));
    assert_eq!(
        v["weights_fingerprint"],
        json!(version),
        "a plain model directory's version is its fingerprint"
    );
    assert_eq!(v["directory"], json!(model_dir.display().to_string()));
    assert_eq!(v["item_features"], json!({"cate_id": "item_id"}));
    assert_eq!(v["raw_ids"]["item_id"], json!(true));
    assert_eq!(v["max_len"]["hist_item_id"], json!(8));
    assert_eq!(v["config"]["schema"]["label"], json!("label"));

    score(&app, &common::request(7)).await;
    let m = call(&app, Method::GET, "/metrics", None, Body::empty()).await;
    assert!(m.headers[header::CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain"));
    for needle in [
        r#"din_requests_total{route="/v1/score",status="200"} 1"#.to_string(),
        r#"din_request_duration_seconds_count{route="/v1/score",status="200"} 1"#.to_string(),
        "din_candidates_scored_total 7".to_string(),
        format!(r#"din_model_version{{version="{version}"}} 1"#),
        "din_queue_depth 0".to_string(),
    ] {
        assert!(m.text.contains(&needle), "{needle} not in\n{}", m.text);
    }

    let doc = call(&app, Method::GET, "/openapi.json", None, Body::empty())
        .await
        .json();
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    for path in [
        "/v1/score",
        "/v1/model",
        "/v1/reload",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    let schemas = &doc["components"]["schemas"];
    for s in ["ScoreRequest", "ScoreResponse", "ErrorBody", "Explanation", "ModelInfo"] {
        assert!(schemas[s].is_object(), "{s} documented");
    }
    assert!(doc["paths"]["/v1/score"]["post"]["responses"]["503"].is_object());
}

#[tokio::test]
async fn reload_serves_the_highest_version_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let versions = dir.path().join("versions");
    common::train_model(&dir.path().join("w1"), &versions.join("1"), 1);
    std::fs::create_dir_all(versions.join("7-not-a-version")).expect("mkdir");
    std::fs::create_dir_all(versions.join("9")).expect("an incomplete version: no config.json yet");
    let state = common::state_over(&versions, Limits::default());
    let app = router(state.clone());
    assert_eq!(state.current().version, "1");
    let before = score(&app, &common::request(5)).await.json();
    assert_eq!(before["model_version"], json!("1"));

    // A request that started on version 1 keeps it through the swap.
    let in_flight = state.current();
    common::train_model(&dir.path().join("w2"), &versions.join("2"), 2);
    let a = call(&app, Method::POST, "/v1/reload", None, Body::empty()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.json(), json!({"model_version": "2", "previous_version": "1"}));
    assert_eq!(in_flight.version, "1");
    let after = score(&app, &common::request(5)).await.json();
    assert_eq!(after["model_version"], json!("2"));
    assert_ne!(after["scores"], before["scores"], "another seed, other scores");

    // A broken version 3 is refused; version 2 serves on.
    std::fs::create_dir_all(versions.join("3")).expect("mkdir");
    std::fs::copy(versions.join("2/config.json"), versions.join("3/config.json")).expect("copy");
    std::fs::write(versions.join("3/model.safetensors"), b"not weights").expect("write");
    let a = call(&app, Method::POST, "/v1/reload", None, Body::empty()).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.text);
    let error = a.json()["error"].as_str().expect("message").to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("version 2 serves on"),
        "{error}"
    );
    let still = score(&app, &common::request(5)).await.json();
    assert_eq!(still["model_version"], json!("2"));
    assert_eq!(still["scores"], after["scores"]);
    let m = call(&app, Method::GET, "/metrics", None, Body::empty()).await.text;
    assert!(m.contains(r#"din_model_reloads_total{result="ok"} 1"#), "{m}");
    assert!(m.contains(r#"din_model_reloads_total{result="refused"} 1"#), "{m}");

    // Non-finite weights are refused too.
    std::fs::remove_dir_all(versions.join("3")).expect("rm");
    let saved = din::checkpoint::load_model(&versions.join("2")).expect("loads");
    let mut model = saved.model.clone();
    {
        use din::model::Module;
        model.visit_mut("", &mut |name, p| {
            if name == "output.bias" {
                p.value[0] = f32::NAN;
            }
        });
    }
    din::checkpoint::save_with_assets(&versions.join("4"), &saved.config, &model, &saved.assets, None).expect("save");
    let a = call(&app, Method::POST, "/v1/reload", None, Body::empty()).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.json()["error"]
        .as_str()
        .expect("message")
        .contains("`output.bias`: holds a NaN"));
    assert_eq!(state.current().version, "2");
}

#[tokio::test]
async fn a_precision_applies_to_every_model_served() {
    use din::model::Precision;
    let dir = tempfile::tempdir().expect("tempdir");
    let versions = dir.path().join("versions");
    common::train_model(&dir.path().join("w1"), &versions.join("1"), 1);
    let fp32 = common::state_over(&versions, Limits::default());
    let bf16 = common::state_with_precision(&versions, Limits::default(), Some(Precision::Bf16));
    assert!(!fp32.current().scorer.model.kernel().is_bf16());
    assert!(bf16.current().scorer.model.kernel().is_bf16());
    let scores = |v: Value| -> Vec<f64> {
        v["scores"]
            .as_array()
            .expect("scores")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    };
    let body = common::request(30);
    let a = scores(score(&router(fp32.clone()), &body).await.json());
    let b = scores(score(&router(bf16.clone()), &body).await.json());
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-2, "bf16 against fp32: {worst}");
    // A reloaded model scores in the same precision.
    common::train_model(&dir.path().join("w2"), &versions.join("2"), 2);
    let app = router(bf16.clone());
    let r = call(&app, Method::POST, "/v1/reload", None, Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(bf16.current().version, "2");
    assert!(bf16.current().scorer.model.kernel().is_bf16());
}
