//! Request parsing and feature mapping under generated input: 102,000
//! cases over four generators (arbitrary bytes, damaged valid bodies,
//! well-formed JSON with random features, types and ids, and near-valid
//! requests that reach the feature mapping). None may panic;
//! every rejected input gets a 4xx with a message; every accepted one gets
//! one probability in [0, 1] per candidate.

mod common;

use std::sync::{Arc, OnceLock};

use din_server::routes::score_body;
use din_server::state::{load, Loaded};
use din_server::Limits;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn model() -> &'static (Arc<Loaded>, tempfile::TempDir) {
    static MODEL: OnceLock<(Arc<Loaded>, tempfile::TempDir)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("model");
        common::train_model(dir.path(), &out, 1);
        (Arc::new(load(&out, None).expect("loads")), dir)
    })
}

const LIMITS: Limits = Limits {
    queue: 1,
    max_candidates: 6,
    max_body_bytes: 1 << 20,
};

/// Runs one body and checks the answer's contract.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (m, _) = model();
    match score_body(m, bytes, &LIMITS) {
        Ok(r) => {
            let v: Value = serde_json::from_slice(bytes).expect("accepted bodies are JSON");
            let n = v["candidates"].as_array().map_or(0, Vec::len);
            prop_assert_eq!(r.scores.len(), n);
            prop_assert!(r.scores.iter().all(|p| (0.0..=1.0).contains(p)), "{:?}", r.scores);
        }
        Err(e) => {
            prop_assert!(
                e.status.is_client_error(),
                "{} for {:?}: {}",
                e.status,
                String::from_utf8_lossy(bytes),
                e.body.error
            );
            prop_assert!(!e.body.error.is_empty());
            if let Some(f) = &e.body.field {
                prop_assert!(!f.is_empty());
            }
        }
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u32>().prop_map(|x| Value::from(x % 50)),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        "[a-z0-9]{0,4}".prop_map(Value::from),
        (0u32..45).prop_map(|i| Value::from(format!("i{i}"))),
        (0u32..32).prop_map(|u| Value::from(format!("u{u}"))),
        (0u32..6).prop_map(|c| Value::from(format!("c{c}"))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn feature_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user_id".to_string()),
        Just("item_id".to_string()),
        Just("cate_id".to_string()),
        Just("hist_item_id".to_string()),
        Just("hist_cate_id".to_string()),
        "[a-z_]{0,8}",
    ]
}

fn features() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(feature_name(), json_value(), 0..5).prop_map(|m| m.into_iter().collect())
}

fn request() -> impl Strategy<Value = Value> {
    (
        features(),
        prop::collection::vec(features(), 0..8),
        prop::option::of(json_value()),
        any::<bool>(),
    )
        .prop_map(|(user, candidates, explain, extra)| {
            let mut v = json!({ "user": user, "candidates": candidates });
            if let Some(e) = explain {
                v["explain"] = e;
            }
            if extra {
                v["unexpected"] = json!(1);
            }
            v
        })
}

/// An id that is usually right: a known raw item id, else anything.
fn item() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0u32..40).prop_map(|i| Value::from(format!("i{i}"))),
        1 => json_value(),
    ]
}

/// Requests that are valid but for a few fields: these reach the feature
/// mapping (vocabulary, item table, truncation, oov) rather than serde.
fn near_valid() -> impl Strategy<Value = Value> {
    (
        prop_oneof![8 => (0u32..30).prop_map(|u| Value::from(format!("u{u}"))), 1 => json_value()],
        prop::collection::vec(item(), 0..20),
        prop::option::of(prop::collection::vec(json_value(), 0..20)),
        prop::collection::vec((item(), prop::option::of(json_value())), 1..7),
        prop::option::of(0u32..30),
    )
        .prop_map(|(user_id, hist, hist_cate, cands, explain)| {
            let mut user = json!({ "user_id": user_id, "hist_item_id": hist });
            if let Some(c) = hist_cate {
                user["hist_cate_id"] = Value::from(c);
            }
            let candidates: Vec<Value> = cands
                .into_iter()
                .map(|(i, cate)| {
                    let mut c = json!({ "item_id": i });
                    if let Some(v) = cate {
                        c["cate_id"] = v;
                    }
                    c
                })
                .collect();
            let mut v = json!({ "user": user, "candidates": candidates });
            if let Some(e) = explain {
                v["explain"] = json!(e);
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 25_500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check(&bytes)?;
    }

    #[test]
    fn damaged_valid_bodies_never_panic(cut in 0usize..400, at in 0usize..400, byte in any::<u8>(), n in 1usize..8) {
        let mut body = common::request(n).to_string().into_bytes();
        let at = at % body.len();
        body[at] = byte;
        body.truncate(cut.max(at + 1).min(body.len()));
        check(&body)?;
    }

    #[test]
    fn generated_requests_are_scored_or_refused_with_a_field(req in request()) {
        check(req.to_string().as_bytes())?;
    }

    #[test]
    fn near_valid_requests_are_scored_or_refused_with_a_field(req in near_valid()) {
        check(req.to_string().as_bytes())?;
    }
}

#[test]
fn valid_bodies_are_accepted_up_to_the_candidate_limit() {
    let (m, _) = model();
    let ok = (0..8).filter(|&n| score_body(m, common::request(n + 1).to_string().as_bytes(), &LIMITS).is_ok());
    assert_eq!(ok.count(), 6, "1..=6 candidates accepted, 7 and 8 over the limit");
}
