//! Prometheus metrics (`GET /metrics`, text format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// The matched route, e.g. `/v1/score`.
    pub route: String,
    /// The HTTP status code.
    pub status: u16,
}

/// Labels of the model gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Version {
    /// The served model's version.
    pub version: String,
}

/// Labels of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok` or `refused`.
    pub result: String,
}

/// The server's metrics and the registry that prints them.
pub struct Metrics {
    registry: Registry,
    /// Requests by route and status.
    pub requests: Family<RouteStatus, Counter>,
    /// Request latency by route and status, in seconds (by status, so that
    /// the latency of accepted requests can be told from fast 503s).
    pub latency: Family<RouteStatus, Histogram>,
    /// Jobs in the compute pool, running or waiting.
    pub queue_depth: Gauge,
    /// Candidates scored.
    pub candidates: Counter,
    /// 1 for the version being served.
    pub model: Family<Version, Gauge>,
    /// Model reloads by outcome.
    pub reloads: Family<Outcome, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `din` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("din");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        let latency = Family::<RouteStatus, Histogram>::new_with_constructor(|| {
            // 0.25 ms to about 5 s in steps of 1.5x.
            Histogram::new(exponential_buckets(0.000_25, 1.5, 25))
        });
        registry.register(
            "request_duration_seconds",
            "Time from request to response, by route and status",
            latency.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Scoring jobs in the compute pool, running or waiting",
            queue_depth.clone(),
        );
        let candidates = Counter::default();
        registry.register("candidates_scored", "Candidates scored", candidates.clone());
        let model = Family::<Version, Gauge>::default();
        registry.register("model_version", "1 for the model version being served", model.clone());
        let reloads = Family::<Outcome, Counter>::default();
        registry.register("model_reloads", "Model reloads by result", reloads.clone());
        Metrics {
            registry,
            requests,
            latency,
            queue_depth,
            candidates,
            model,
            reloads,
        }
    }

    /// Marks `version` as the one served.
    pub fn set_model(&self, version: &str) {
        self.model.clear();
        self.model
            .get_or_create(&Version {
                version: version.to_string(),
            })
            .set(1);
    }

    /// Records one answered request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let labels = RouteStatus {
            route: route.to_string(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
