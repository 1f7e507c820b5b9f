//! The request and response bodies, and the OpenAPI document generated from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{OpenApi, ToSchema};

/// `POST /v1/score`: one user and the candidates to rank for them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "user": {"user_id": "196", "hist_item_id": ["242", "302", "377"]},
    "candidates": [{"item_id": "51"}, {"item_id": "346"}],
    "explain": 2
}))]
pub struct ScoreRequest {
    /// The user's features, by feature name: sparse features as raw ids
    /// (strings or integers), dense features as numbers (or lists of
    /// numbers), histories as lists of raw ids in the order the model's
    /// data files list them. A history paired with an item feature (the
    /// category) is filled from the item history and may be left out.
    #[schema(value_type = Object)]
    pub user: Map<String, Value>,
    /// The candidates, each with its own features (at least the item id;
    /// item features such as the category are filled from the model's item
    /// table). A feature missing here is taken from `user`.
    #[schema(value_type = Vec<Object>)]
    pub candidates: Vec<Map<String, Value>>,
    /// Return, per candidate, this many history entries with the largest
    /// attention weights (0 or absent: none).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub explain: Option<u32>,
}

/// The scores of one request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreResponse {
    /// The version of the model that scored the request.
    pub model_version: String,
    /// Click probability of each candidate, in request order.
    pub scores: Vec<f32>,
    /// Per candidate (when `explain` was given): the most attended history
    /// entries, largest weight first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanations: Option<Vec<Vec<Explanation>>>,
}

/// One history entry and its attention weight (the DIN paper's Fig. 5).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Explanation {
    /// Index of the entry in the request's history list.
    pub position: usize,
    /// The entry's id as the request gave it.
    #[schema(value_type = Object)]
    pub id: Value,
    /// Its attention weight.
    pub weight: f32,
}

/// Every error: a message and, for a bad request, the field it is about.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// The request field at fault, e.g. `candidates[3].item_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready` (a model is loaded).
    pub status: String,
    /// The version being served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// `GET /v1/model`: what is being served.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    /// The version: the number of its version folder, or the weights
    /// fingerprint when `--model` names a model directory itself.
    pub version: String,
    /// The model directory.
    pub directory: String,
    /// The model-directory format version.
    pub format_version: u32,
    /// The din version that wrote it.
    pub din_version: String,
    /// FNV-1a 64 of `model.safetensors`.
    pub weights_fingerprint: String,
    /// Whether ids are raw values (the model has a vocabulary), per embedding table.
    pub raw_ids: BTreeMap<String, bool>,
    /// Item features filled from the item table: feature -> the item it follows from.
    pub item_features: BTreeMap<String, String>,
    /// Longest history the model reads, per history feature.
    pub max_len: BTreeMap<String, usize>,
    /// The resolved config (schema, model, training).
    #[schema(value_type = Object)]
    pub config: Value,
}

/// `POST /v1/reload`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReloadResponse {
    /// The version served now.
    pub model_version: String,
    /// The version served before.
    pub previous_version: String,
}

/// The OpenAPI 3 document served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "din serve",
        description = "Scores candidates for a user with a Deep Interest Network model: the user side once per request, raw ids, attention weights on request."
    ),
    paths(
        crate::routes::score,
        crate::routes::model_info,
        crate::routes::reload,
        crate::routes::healthz,
        crate::routes::readyz,
        crate::routes::metrics,
        crate::routes::openapi
    ),
    components(schemas(
        ScoreRequest,
        ScoreResponse,
        Explanation,
        ErrorBody,
        Health,
        ModelInfo,
        ReloadResponse
    ))
)]
pub struct ApiDoc;
