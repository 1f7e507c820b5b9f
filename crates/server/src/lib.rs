//! # din-server: `din serve`, the HTTP scoring service
//!
//! A thin front end over [`din::scorer::Scorer`] and the model-directory
//! loader: axum on a small tokio runtime for I/O, scoring on a rayon pool
//! sized to the cores behind a bounded queue (a full queue answers 503 with
//! `Retry-After` at once), versioned model folders with hot reload
//! (`POST /v1/reload` or SIGHUP: the new model is loaded and checked, then
//! swapped in; requests in flight finish on the model they started with),
//! Prometheus metrics and an OpenAPI document generated from the types.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/score` | one user and candidates in raw ids -> one probability per candidate (+ attention explanations) |
//! | `GET /v1/model` | version, fingerprints, schema, config |
//! | `POST /v1/reload` | load the highest complete version again |
//! | `GET /healthz`, `GET /readyz` | alive; a model is loaded |
//! | `GET /metrics` | Prometheus text |
//! | `GET /openapi.json` | the OpenAPI 3 document |
#![deny(missing_docs)]

pub mod api;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

pub use state::AppState;

/// Limits on requests and on the compute queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Scoring jobs in the compute pool (running or waiting) before new
    /// requests are shed with 503.
    pub queue: usize,
    /// Most candidates in one request.
    pub max_candidates: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            queue: 64,
            max_candidates: 2000,
            max_body_bytes: 4 << 20,
        }
    }
}

/// How to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// A model directory, or a folder of numbered version folders.
    pub model: PathBuf,
    /// Where to listen (port 0: any free port; the bound address is printed).
    pub addr: SocketAddr,
    /// Compute threads (0 = one per core).
    pub threads: usize,
    /// Async I/O threads.
    pub io_threads: usize,
    /// Request and queue limits.
    pub limits: Limits,
    /// Inference precision for every model served (`None`: each model's
    /// `model.precision`).
    pub precision: Option<din::model::Precision>,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model could not be found or loaded.
    #[error("{message}")]
    Model {
        /// What is wrong, naming the file.
        message: String,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The runtime, the pool or the listener failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A bad setting.
    #[error("{0}")]
    Config(String),
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/score", post(routes::score))
        .route("/v1/model", get(routes::model_info))
        .route("/v1/reload", post(routes::reload))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), routes::track))
        .with_state(state)
}

/// Loads the model and starts the compute pool (no socket yet).
pub fn build_state(config: &ServeConfig) -> Result<Arc<AppState>, ServeError> {
    let l = &config.limits;
    if l.queue == 0 || l.max_candidates == 0 || l.max_body_bytes == 0 {
        return Err(ServeError::Config(
            "--queue, --max-candidates and --max-body-bytes must be at least 1".into(),
        ));
    }
    let loaded = state::load(&config.model, config.precision)?;
    let pool = din::threads::thread_pool(config.threads).map_err(|e| ServeError::Config(e.to_string()))?;
    Ok(Arc::new(AppState::new(
        loaded,
        config.model.clone(),
        config.precision,
        pool,
        config.limits,
    )))
}

/// Serves until SIGTERM or ctrl-c, then stops accepting and finishes the
/// requests in flight. Blocks; builds its own runtime. Prints the bound
/// address on standard output once listening.
pub fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let state = build_state(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads.max(1))
        .thread_name("din-io")
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            what: "cannot start the I/O runtime",
            source,
        })?;
    runtime.block_on(run(state, config.addr))
}

async fn run(state: Arc<AppState>, addr: SocketAddr) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Io {
        what: "cannot read the bound address",
        source,
    })?;
    // Signal handlers go in before the address is printed: a signal sent
    // as soon as the server says it listens must not find the default action.
    spawn_reload_on_hangup(state.clone());
    let shutdown = shutdown_signal()?;
    let current = state.current();
    println!(
        "din serve: listening on http://{bound} (model version {}, {})",
        current.version,
        current.dir.display()
    );
    tracing::info!(addr = %bound, version = %current.version, "listening");
    drop(current);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Io {
            what: "the server failed",
            source,
        })?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_hangup(state: Arc<AppState>) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the model");
                    // The outcome is logged by reload_model.
                    let _ = routes::reload_model(&state).await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /v1/reload"),
    }
}

#[cfg(not(unix))]
fn spawn_reload_on_hangup(_state: Arc<AppState>) {}

/// A future that resolves on ctrl-c or SIGTERM; the handlers are installed now.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ServeError> {
    #[cfg(unix)]
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|source| ServeError::Io {
            what: "cannot listen for SIGTERM",
            source,
        })?;
    let ctrl_c = tokio::signal::ctrl_c();
    Ok(async move {
        #[cfg(unix)]
        let term = term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        tracing::info!("shutting down: finishing the requests in flight");
    })
}
