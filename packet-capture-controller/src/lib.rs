//! The packet-capture controller: reconciles `PacketCaptureConfig`s into
//! captures on the nodes' agents, reports their progress in the status, and
//! serves the validating webhook.
//!
//! | module | role |
//! |---|---|
//! | [`controller`] | `reconcile` inside the finalizer, the `Controller` and its watches |
//! | [`targets`] | pods and addresses to a per-node list of target IPs |
//! | [`agents`] | agent discovery, one gRPC client per agent, bearer token, retries |
//! | [`tracker`] | one `WatchCapture` task per node capture, feeding the status |
//! | [`status`] | phase, message, conditions and counters from the nodes' progress |
//! | [`results`] | the results ConfigMap written when a capture ends |
//! | [`webhook`] | the validating admission webhook over TLS |
//! | [`leader`] | Lease-based leader election |
//! | [`metrics`] | Prometheus metrics and the `/metrics` `/healthz` `/readyz` server |

pub mod agents;
pub mod backoff;
pub mod config;
pub mod consts;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod results;
pub mod status;
pub mod targets;
#[cfg(test)]
mod test_objects;
pub mod tracker;
pub mod webhook;

use std::path::PathBuf;

/// Everything that can go wrong in the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    #[error("{kind} has no {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },

    #[error(
        "the PacketCaptureConfig CRD ({0}) is not installed: kubectl apply -f crd/packet_capture_config_crd.yaml"
    )]
    CrdMissing(&'static str),

    #[error("ConfigMap {config_map}: {key}: {message}")]
    Config {
        config_map: String,
        key: &'static str,
        message: String,
    },

    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("TLS certificate in {}: {message}", dir.display())]
    Certificate { dir: PathBuf, message: String },

    #[error("serving {what}: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("serialising {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("leader election lost: {0}")]
    LeadershipLost(String),
}

impl Error {
    /// A short, bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Self::MissingField { .. } => "missing_field",
            Self::CrdMissing(_) => "crd_missing",
            Self::Config { .. } => "config",
            Self::Io { .. } => "io",
            Self::Certificate { .. } => "certificate",
            Self::Serve { .. } => "serve",
            Self::Json { .. } => "json",
            Self::LeadershipLost(_) => "leadership",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs everything: health and metrics, the webhook (on every replica), and
/// the controller (on the leader only when leader election is on).
pub async fn run(settings: config::Settings) -> Result<()> {
    use std::net::{Ipv6Addr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let client = kube::Client::try_default().await?;
    controller::check_crd(&client).await?;
    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let health = metrics::serve(
        any(settings.metrics_port),
        metrics::Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    );
    let webhook = async {
        if settings.disable_webhook {
            tracing::info!("webhook disabled");
            return std::future::pending().await;
        }
        let server = webhook::WebhookServer::bind(
            any(settings.webhook_port),
            &settings.webhook_cert_dir,
            client.clone(),
        )
        .await?;
        ready.store(true, Ordering::Relaxed);
        server.run().await
    };
    if settings.disable_webhook {
        ready.store(true, Ordering::Relaxed);
    }
    let work = async {
        if !settings.leader_election {
            return controller::run(&settings, client.clone(), metrics.clone()).await;
        }
        let elector = leader::LeaderElector::new(
            client.clone(),
            &settings.namespace,
            consts::CONTROLLER_NAME,
            &settings.identity(),
            settings.lease_duration(),
        );
        elector.acquire().await;
        tokio::select! {
            r = controller::run(&settings, client.clone(), metrics.clone()) => {
                elector.release().await;
                r
            }
            lost = elector.hold() => Err(lost),
        }
    };
    tokio::select! {
        r = work => r,
        r = health => r,
        r = webhook => r,
    }
}
