//! Errors as HTTP responses: a status and a JSON [`ErrorBody`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ErrorBody;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
    /// Seconds for the `Retry-After` header (load shedding).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, field: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: message.into(),
                field,
            },
            retry_after: None,
        }
    }

    /// 400, naming the field.
    pub fn bad_request(field: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, field, message)
    }

    /// 413: the body exceeds the limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!("the request body is larger than {limit} bytes (--max-body-bytes)"),
        )
    }

    /// 415: not JSON.
    pub fn not_json(found: Option<&HeaderValue>) -> ApiError {
        let found = found.and_then(|v| v.to_str().ok()).unwrap_or("none");
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            format!("send the body as JSON with Content-Type: application/json (found: {found})"),
        )
    }

    /// 503 with `Retry-After`: the compute queue is full.
    pub fn overloaded(queue: usize) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!("overloaded: {queue} scoring jobs are queued (--queue); retry later"),
            )
        }
    }

    /// 422: the model offered for reload was refused; the old one serves on.
    pub fn refused(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, None, message)
    }

    /// 404.
    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            None,
            format!("no route {path} (see GET /openapi.json)"),
        )
    }

    /// 405.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            "method not allowed on this route (see GET /openapi.json)",
        )
    }

    /// 500: a fault of the server, not of the request.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, None, message)
    }
}

impl From<din::Error> for ApiError {
    fn from(e: din::Error) -> ApiError {
        match e {
            din::Error::Request { field, reason } => {
                ApiError::bad_request(Some(field.clone()), format!("{field}: {reason}"))
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}
