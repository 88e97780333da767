//! `LOG_LEVEL` handling shared by the agent and the controller.
//!
//! The levels are the seed's: `DEBUG`, `INFO`, `WARNING`, `ERROR` (also
//! accepted in lower case, and `WARN`). Our own crates (targets starting with
//! `packet_capture`) log at the chosen level; third-party crates stay at
//! `WARN` unless the level is `DEBUG`, which shows everything.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::{EnvFilter, Registry, reload};

/// The value of `LOG_LEVEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warning,
    Error,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error => "error",
        }
    }

    /// The filter this level stands for: ours at the level, others at WARN
    /// (or at DEBUG too when the level is DEBUG).
    pub fn filter(self) -> EnvFilter {
        let spec = match self {
            Self::Debug => "debug".to_string(),
            Self::Error => "error".to_string(),
            other => format!("warn,packet_capture={}", other.directive()),
        };
        EnvFilter::new(spec)
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(Self::Debug),
            "INFO" => Ok(Self::Info),
            "WARNING" | "WARN" => Ok(Self::Warning),
            "ERROR" => Ok(Self::Error),
            _ => Err(format!(
                "LOG_LEVEL: {s:?} is not a log level (DEBUG, INFO, WARNING or ERROR)"
            )),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Debug => "DEBUG",
            Self::Info => "INFO",
            Self::Warning => "WARNING",
            Self::Error => "ERROR",
        })
    }
}

/// The level of the running process, which [`LogControl::set`] changes
/// without a restart.
#[derive(Clone)]
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
    level: Arc<Mutex<LogLevel>>,
}

impl LogControl {
    pub fn level(&self) -> LogLevel {
        *self.level.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Switches to `level`; `false` when it already was the level.
    pub fn set(&self, level: LogLevel) -> Result<bool, String> {
        let mut current = self.level.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == level {
            return Ok(false);
        }
        self.filter
            .reload(level.filter())
            .map_err(|e| format!("LOG_LEVEL {level}: {e}"))?;
        *current = level;
        Ok(true)
    }
}

/// Installs the global subscriber: human-readable lines on stderr, coloured
/// only on a terminal (not in `kubectl logs`), at a level that can change
/// while the process runs.
///
/// Returns an error when a subscriber is already installed (a second call).
pub fn init(level: LogLevel) -> Result<LogControl, String> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = reload::Layer::new(level.filter());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LogControl {
        filter: handle,
        level: Arc::new(Mutex::new(level)),
    })
}

/// Follows `LOG_LEVEL` in the ConfigMap `namespace/name` for as long as the
/// process runs: each change is applied at once, then `changed` is called
/// (the agent switches its eBPF programs' diagnostics there). A missing key
/// or ConfigMap leaves the level as it is; a bad value is logged, naming the
/// key, and ignored. Errors of the watch are retried with a backoff.
#[cfg(feature = "follow")]
pub async fn follow_config_map(
    client: kube::Client,
    namespace: &str,
    name: &str,
    control: LogControl,
    changed: impl Fn(LogLevel),
) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt as _, watcher};

    let api = kube::Api::<ConfigMap>::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut failing = false;
    while let Some(event) = events.next().await {
        let map = match event {
            Ok(watcher::Event::Apply(map) | watcher::Event::InitApply(map)) => map,
            Ok(_) => continue,
            Err(e) => {
                // Once per outage, not on every retry.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(
                        "watching ConfigMap {namespace}/{name} for LOG_LEVEL (retrying; \
                         until then a change needs a restart): {e}"
                    );
                }
                continue;
            }
        };
        failing = false;
        let Some(value) = map.data.as_ref().and_then(|d| d.get("LOG_LEVEL")) else {
            continue;
        };
        match value.parse::<LogLevel>() {
            Ok(level) => match control.set(level) {
                Ok(true) => {
                    tracing::info!("log level {level} (LOG_LEVEL of ConfigMap {namespace}/{name})");
                    changed(level);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("{e}"),
            },
            Err(e) => tracing::warn!(
                "ConfigMap {namespace}/{name}: {e}; the level stays {}",
                control.level()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_levels() {
        assert_eq!("DEBUG".parse(), Ok(LogLevel::Debug));
        assert_eq!("info".parse(), Ok(LogLevel::Info));
        assert_eq!("WARNING".parse(), Ok(LogLevel::Warning));
        assert_eq!("WARN".parse(), Ok(LogLevel::Warning));
        assert_eq!("ERROR".parse(), Ok(LogLevel::Error));
        let err = "LOUD".parse::<LogLevel>().unwrap_err();
        assert!(err.starts_with("LOG_LEVEL: \"LOUD\""), "{err}");
    }

    #[test]
    fn third_party_crates_stay_at_warn_unless_debug() {
        assert_eq!(
            LogLevel::Info.filter().to_string(),
            "packet_capture=info,warn"
        );
        assert_eq!(
            LogLevel::Warning.filter().to_string(),
            "packet_capture=warn,warn"
        );
        assert_eq!(LogLevel::Debug.filter().to_string(), "debug");
        assert_eq!(LogLevel::Error.filter().to_string(), "error");
    }
}
