//! LOG_LEVEL: DEBUG, INFO, WARNING or ERROR for our crates; the libraries we
//! build on (h2, hyper, tower, tonic, kube, aya, …) stay at WARN unless the
//! level is DEBUG.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(Self::Debug),
            "INFO" => Ok(Self::Info),
            "WARNING" | "WARN" => Ok(Self::Warning),
            "ERROR" => Ok(Self::Error),
            _ => Err(format!(
                "{s:?} is not a log level (DEBUG, INFO, WARNING or ERROR)"
            )),
        }
    }
}

impl LogLevel {
    /// The filter directives: our crates at the level, everything else at
    /// WARN (or everything at DEBUG).
    pub fn directives(self, our_crates: &[&str]) -> String {
        let ours = match self {
            Self::Debug => return "debug".into(),
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error => "error",
        };
        let mut d = String::from("warn");
        for krate in our_crates {
            d.push_str(&format!(",{krate}={ours}"));
        }
        d
    }

    /// Installs the global subscriber (logs go to stderr, coloured only on
    /// a terminal).
    pub fn init(self, our_crates: &[&str]) {
        use std::io::IsTerminal as _;
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(self.directives(our_crates)))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn third_party_crates_stay_at_warn_unless_debug() {
        assert_eq!(
            LogLevel::Info.directives(&["packet_capture_agent"]),
            "warn,packet_capture_agent=info"
        );
        assert_eq!(
            LogLevel::Error.directives(&["a", "b"]),
            "warn,a=error,b=error"
        );
        assert_eq!(LogLevel::Debug.directives(&["a"]), "debug");
        assert_eq!("warning".parse::<LogLevel>(), Ok(LogLevel::Warning));
    }
}
