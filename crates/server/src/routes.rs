//! The handlers. Scoring runs on the compute pool: the I/O threads only read
//! the body, check its size and type, and take a place in the queue.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use crate::api::{ApiDoc, ErrorBody, Explanation, Health, ModelInfo, ReloadResponse, ScoreRequest, ScoreResponse};
use crate::error::ApiError;
use crate::state::{self, AppState, Loaded};
use crate::Limits;

/// Score candidates for a user.
#[utoipa::path(
    post,
    path = "/v1/score",
    request_body(content = ScoreRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "One probability per candidate, in order", body = ScoreResponse),
        (status = 400, description = "Malformed JSON, a missing or unknown field, a wrong type, an unknown id under oov = \"error\", too many candidates", body = ErrorBody),
        (status = 413, description = "The body exceeds --max-body-bytes", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 503, description = "The compute queue is full: retry after the Retry-After header's seconds", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait")))
    )
)]
pub async fn score(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE);
    let is_json = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::not_json(content_type));
    }
    let limit = st.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    if st.is_full() {
        return Err(ApiError::overloaded(st.limits.queue));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    let model = st.current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job_state = st.clone();
    let queued = st.submit(move |slot| {
        if tx.is_closed() {
            return; // the client has gone
        }
        let limits = &job_state.limits;
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| score_body(&model, &bytes, limits))).unwrap_or_else(|_| {
                Err(ApiError::internal(
                    "scoring failed unexpectedly (a bug; see the server log)",
                ))
            });
        if let Ok(r) = &result {
            job_state.metrics.candidates.inc_by(r.scores.len() as u64);
        }
        drop(slot);
        let _ = tx.send(result);
    });
    if !queued {
        return Err(ApiError::overloaded(st.limits.queue));
    }
    let response = rx
        .await
        .map_err(|_| ApiError::internal("the scoring job ended without an answer"))??;
    Ok(Json(response).into_response())
}

/// Parses, checks and scores one request body (on the compute pool).
pub fn score_body(model: &Loaded, bytes: &[u8], limits: &Limits) -> Result<ScoreResponse, ApiError> {
    // serde would also take a struct as a JSON array; only an object is meant.
    if bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'[')
    {
        return Err(ApiError::bad_request(
            None,
            "invalid request: the body must be a JSON object {\"user\": ..., \"candidates\": [...]}",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let request: ScoreRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // "." is the whole body; "?" an unknown place (e.g. a syntax error).
        let path = e.path().to_string();
        let path = path.trim_end_matches('?').trim_end_matches('.');
        let field = (!path.is_empty()).then(|| path.to_string());
        let message = match &field {
            Some(f) => format!("{f}: {}", e.inner()),
            None => format!("invalid request: {}", e.inner()),
        };
        ApiError::bad_request(field, message)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(None, format!("invalid request: {e}")))?;
    let n = request.candidates.len();
    if n > limits.max_candidates {
        return Err(ApiError::bad_request(
            Some("candidates".into()),
            format!(
                "candidates: {n} candidates; at most {} per request (--max-candidates)",
                limits.max_candidates
            ),
        ));
    }
    let explain = request.explain.unwrap_or(0) as usize;
    let scored = model.scorer.score(&request.user, &request.candidates, explain)?;
    let explanations = (explain > 0).then(|| {
        scored
            .explanations
            .into_iter()
            .map(|c| {
                c.into_iter()
                    .map(|a| Explanation {
                        position: a.position,
                        id: a.id,
                        weight: a.weight,
                    })
                    .collect()
            })
            .collect()
    });
    Ok(ScoreResponse {
        model_version: model.version.clone(),
        scores: scored.scores,
        explanations,
    })
}

/// What is being served: version, fingerprints, schema and config.
#[utoipa::path(get, path = "/v1/model", responses((status = 200, body = ModelInfo)))]
pub async fn model_info(State(st): State<Arc<AppState>>) -> Json<ModelInfo> {
    let m = st.current();
    let s = &m.scorer;
    let l = &s.layout;
    let vocab = s.assets.vocab.as_ref();
    Json(ModelInfo {
        version: m.version.clone(),
        directory: m.dir.display().to_string(),
        format_version: s.file.format_version,
        din_version: s.file.din_version.clone(),
        weights_fingerprint: s.file.weights_fingerprint.clone(),
        raw_ids: (l.tables.iter())
            .map(|t| (t.name.clone(), vocab.is_some_and(|v| v.has(&t.name))))
            .collect(),
        item_features: (l.item_features.iter())
            .map(|f| (l.sparse[f.feature].name.clone(), l.sparse[f.key].name.clone()))
            .collect(),
        max_len: l
            .sequences
            .iter()
            .map(|q| (q.name.clone(), q.max_len))
            .collect::<BTreeMap<_, _>>(),
        config: serde_json::to_value(&s.config).unwrap_or_default(),
    })
}

/// Load the model again (the highest complete version); the old one serves
/// on if the new one is refused.
#[utoipa::path(
    post,
    path = "/v1/reload",
    responses(
        (status = 200, description = "The new model serves", body = ReloadResponse),
        (status = 422, description = "The model directory was refused; the old model serves on", body = ErrorBody)
    )
)]
pub async fn reload(State(st): State<Arc<AppState>>) -> Result<Json<ReloadResponse>, ApiError> {
    reload_model(&st).await.map(Json)
}

/// Loads and checks the model that `--model` names now, then swaps it in.
pub async fn reload_model(st: &Arc<AppState>) -> Result<ReloadResponse, ApiError> {
    let _one_at_a_time = st.reloading.lock().await;
    let (source, precision) = (st.source.clone(), st.precision);
    let loaded = tokio::task::spawn_blocking(move || state::load(&source, precision))
        .await
        .map_err(|e| ApiError::internal(format!("the reload task failed: {e}")))?;
    match loaded {
        Ok(new) => {
            let version = new.version.clone();
            let dir = new.dir.clone();
            let old = st.swap(new);
            st.metrics.reloads.get_or_create(&outcome("ok")).inc();
            tracing::info!(version = %version, previous = %old.version, dir = %dir.display(), "model reloaded");
            Ok(ReloadResponse {
                model_version: version,
                previous_version: old.version.clone(),
            })
        }
        Err(e) => {
            st.metrics.reloads.get_or_create(&outcome("refused")).inc();
            let current = st.current().version.clone();
            tracing::error!(error = %e, serving = %current, "reload refused; the old model serves on");
            Err(ApiError::refused(format!("{e} (version {current} serves on)")))
        }
    }
}

fn outcome(result: &str) -> crate::metrics::Outcome {
    crate::metrics::Outcome {
        result: result.to_string(),
    }
}

/// Alive.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        model_version: None,
    })
}

/// A model is loaded and serving.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health)))]
pub async fn readyz(State(st): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ready".into(),
        model_version: Some(st.current().version.clone()),
    })
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.encode(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

/// Unknown routes: 404 as JSON.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

/// Known route, wrong method: 405 as JSON.
pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Counts each request by route and status and times it.
pub async fn track(State(st): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    st.metrics
        .observe(&route, status.as_u16(), start.elapsed().as_secs_f64());
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(route = %route, "500");
    } else {
        tracing::debug!(route = %route, status = status.as_u16(), "request");
    }
    response
}
