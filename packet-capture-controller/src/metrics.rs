//! Prometheus metrics, and the HTTP server for `/metrics`, `/healthz` and
//! `/readyz`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use packet_capture_common::crd::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    method: String,
    outcome: String,
}

type HistogramFamily = Family<CallLabel, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The controller's metrics (prefix `packet_capture_controller_`).
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    status_writes: Counter,
    failures: Family<ReasonLabel, Counter>,
    captures: Family<PhaseLabel, Gauge>,
    agent_calls: HistogramFamily,
    webhook_certificate: Gauge,
    phases: Mutex<HashMap<String, Phase>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("packet_capture_controller");
        let reconciles = Counter::default();
        let status_writes = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let captures = Family::<PhaseLabel, Gauge>::default();
        let agent_calls = HistogramFamily::new_with_constructor(call_histogram);
        let webhook_certificate = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciliations of PacketCaptureConfigs",
            reconciles.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes of PacketCaptureConfigs",
            status_writes.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciliations, by reason",
            failures.clone(),
        );
        registry.register(
            "captures",
            "PacketCaptureConfigs known to this controller, by phase",
            captures.clone(),
        );
        registry.register_with_unit(
            "agent_call_duration",
            "Latency of calls to the agents, by method and outcome",
            prometheus_client::registry::Unit::Seconds,
            agent_calls.clone(),
        );
        registry.register_with_unit(
            "webhook_certificate_expiration_timestamp",
            "End of the webhook's serving certificate (Unix time); 0 while it has none",
            prometheus_client::registry::Unit::Seconds,
            webhook_certificate.clone(),
        );
        let metrics = Self {
            registry,
            reconciles,
            status_writes,
            failures,
            captures,
            agent_calls,
            webhook_certificate,
            phases: Mutex::default(),
        };
        // Every phase is exported from the start, at 0.
        metrics.set_phase("", None);
        metrics
    }

    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    pub fn reconcile_failed(&self, err: &Error) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: err.metric_label().into(),
            })
            .inc();
    }

    /// Records the phase of a capture (`None` when it is gone).
    pub fn set_phase(&self, uid: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => phases.insert(uid.to_string(), p),
            None => phases.remove(uid),
        };
        let mut counts: HashMap<String, i64> = HashMap::new();
        for p in phases.values() {
            *counts.entry(format!("{p:?}")).or_default() += 1;
        }
        for phase in ["Starting", "Running", "Completed", "Failed"] {
            self.captures
                .get_or_create(&PhaseLabel {
                    phase: phase.into(),
                })
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }

    pub fn agent_call(&self, method: &str, ok: bool, elapsed: Duration) {
        self.agent_calls
            .get_or_create(&CallLabel {
                method: method.into(),
                outcome: if ok { "ok" } else { "error" }.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The end of the certificate the webhook presents (None: it has none).
    pub fn webhook_certificate(&self, not_after: Option<SystemTime>) {
        let seconds = not_after
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.webhook_certificate.set(seconds);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What each part of the process is doing, one line per part (e.g.
/// `webhook: waiting for Secret ...`), shown by `/readyz`.
#[derive(Debug, Default)]
pub struct Status(Mutex<BTreeMap<&'static str, String>>);

impl Status {
    pub fn set(&self, part: &'static str, line: impl Into<String>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(part, line.into());
    }

    pub fn get(&self, part: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(part)
            .cloned()
    }

    /// `part: line`, one per line.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(part, line)| format!("{part}: {line}\n"))
            .collect()
    }
}

/// What the health endpoints report.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

/// Ready as soon as the process serves: a replica that waits for the
/// webhook's certificate still reconciles captures, and keeping it out of
/// the Service would change nothing for the webhook (the API server's call
/// fails either way) while holding back rollouts and, through the
/// PodDisruptionBudget, node drains, for as long as the certificate is
/// missing. The body says what each part is doing.
async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    (StatusCode::OK, format!("ok\n{}", h.status.text()))
}

/// Serves the health endpoints until the process ends.
pub async fn serve(addr: SocketAddr, health: Health) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Serve {
            what: "metrics",
            source,
        })?;
    tracing::info!("metrics, /healthz and /readyz on http://{addr}");
    axum::serve(listener, router(health))
        .await
        .map_err(|source| Error::Serve {
            what: "metrics",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_per_capture() {
        let m = Metrics::new();
        m.set_phase("a", Some(Phase::Running));
        m.set_phase("b", Some(Phase::Running));
        m.set_phase("a", Some(Phase::Completed));
        m.reconciled();
        m.reconcile_failed(&Error::CrdMissing("x"));
        m.agent_call("StartCapture", true, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("packet_capture_controller_captures{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("packet_capture_controller_captures{phase=\"Completed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("packet_capture_controller_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "packet_capture_controller_reconcile_failures_total{reason=\"crd_missing\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("packet_capture_controller_agent_call_duration_seconds_count{method=\"StartCapture\",outcome=\"ok\"} 1"),
            "{text}"
        );
        m.set_phase("b", None);
        assert!(m.encode().contains("captures{phase=\"Running\"} 0"));
        let expiry = "packet_capture_controller_webhook_certificate_expiration_timestamp_seconds";
        assert!(m.encode().contains(&format!("{expiry} 0")));
        m.webhook_certificate(Some(UNIX_EPOCH + Duration::from_secs(1_893_456_000)));
        assert!(m.encode().contains(&format!("{expiry} 1893456000")));
    }

    #[test]
    fn the_status_has_a_line_per_part() {
        let s = Status::default();
        s.set("webhook", "waiting");
        s.set("controller", "leading");
        s.set("webhook", "serving");
        assert_eq!(s.text(), "controller: leading\nwebhook: serving\n");
        assert_eq!(s.get("webhook").as_deref(), Some("serving"));
    }
}
