//! `LOG_LEVEL` handling shared by the agent and the controller.
//!
//! The levels are the seed's: `DEBUG`, `INFO`, `WARNING`, `ERROR` (also
//! accepted in lower case, and `WARN`). Our own crates (targets starting with
//! `packet_capture`) log at the chosen level; third-party crates stay at
//! `WARN` unless the level is `DEBUG`, which shows everything.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber: human-readable lines on stderr, coloured
/// only on a terminal (not in `kubectl logs`).
///
/// Returns an error when a subscriber is already installed (a second call).
pub fn init(level: LogLevel) -> Result<(), String> {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(level.filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| e.to_string())
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
