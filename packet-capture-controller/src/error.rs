//! The controller's error type.

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

    #[error("TLS certificate ({what}): {message}")]
    Certificate { what: String, message: String },

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

/// A write that lost a race: the object was created or changed by someone
/// else since it was read.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
