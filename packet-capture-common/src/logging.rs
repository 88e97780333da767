//! `LOG_LEVEL` handling shared by the agent and the controller.
//!
//! The levels are the seed's: `DEBUG`, `INFO`, `WARNING`, `ERROR` (also
//! accepted in lower case, and `WARN`). Our own crates (targets starting with
//! `packet_capture`) log at the chosen level; third-party crates stay at
//! `WARN` unless the level is `DEBUG`, which shows everything.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

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
/// while the process runs. The lines are written by a thread of their own
/// ([`Spool`]); the [`Flushed`] guard waits for them when dropped.
///
/// Returns an error when a subscriber is already installed (a second call).
pub fn init(level: LogLevel) -> Result<(LogControl, Flushed), String> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = reload::Layer::new(level.filter());
    let stderr = STDERR.get_or_init(|| Spool::spawn(std::io::stderr(), LOG_QUEUE_BYTES));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(stderr.clone())
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init()
        .map_err(|e| e.to_string())?;
    let control = LogControl {
        filter: handle,
        level: Arc::new(Mutex::new(level)),
    };
    Ok((control, Flushed))
}

/// The most bytes of log lines waiting for standard error.
pub const LOG_QUEUE_BYTES: usize = 1 << 20;

/// How long the process's end waits for its log lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

static STDERR: OnceLock<Spool> = OnceLock::new();

/// Waits, at most a second, until the log lines logged so far are written:
/// for an exit that skips destructors.
pub fn flush() {
    if let Some(stderr) = STDERR.get() {
        stderr.written(FLUSH_WAIT);
    }
}

/// Calls [`flush`] when dropped, at the end of `main`.
#[must_use = "the log lines are flushed when it is dropped"]
pub struct Flushed;

impl Drop for Flushed {
    fn drop(&mut self) {
        flush();
    }
}

/// Log lines on their way to an output, written by a thread of their own.
///
/// The log pipe belongs to the container runtime. When it stops reading, a
/// write blocks, and a thread that logged would stall with it: the agent's
/// ring reader, the API's workers. So at most a bounded number of bytes
/// wait; the lines past them are dropped, and where they were the output
/// says how many.
#[derive(Clone)]
struct Spool(Arc<SpoolShared>);

struct SpoolShared {
    queue: Mutex<Queue>,
    /// Signalled when lines are queued and when a batch is written.
    changed: Condvar,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    /// Bytes queued or being written.
    bytes: usize,
    /// Whether the writer holds a batch it has not finished writing.
    writing: bool,
}

enum Entry {
    Line(Vec<u8>),
    /// So many lines did not fit, here.
    Dropped(u64),
}

impl Spool {
    /// Starts a thread that writes to `out`, holding at most `limit` bytes.
    fn spawn(out: impl Write + Send + 'static, limit: usize) -> Self {
        let shared = Arc::new(SpoolShared {
            queue: Mutex::default(),
            changed: Condvar::new(),
            limit,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.write_out(out))
            .expect("spawning the thread that writes log lines");
        Self(shared)
    }

    /// Queues one line (or what one event wrote), unless it does not fit.
    fn push(&self, line: &[u8]) {
        let mut queue = self.0.lock();
        if queue.bytes + line.len() > self.0.limit {
            match queue.entries.back_mut() {
                Some(Entry::Dropped(n)) => *n += 1,
                _ => queue.entries.push_back(Entry::Dropped(1)),
            }
        } else {
            queue.bytes += line.len();
            queue.entries.push_back(Entry::Line(line.to_vec()));
        }
        drop(queue);
        self.0.changed.notify_all();
    }

    /// Waits, at most `wait`, until everything queued is written; returns
    /// whether it was.
    fn written(&self, wait: Duration) -> bool {
        let queue = self.0.lock();
        let (queue, timeout) = self
            .0
            .changed
            .wait_timeout_while(queue, wait, |q| q.writing || !q.entries.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        drop(queue);
        !timeout.timed_out()
    }
}

impl SpoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes batches of what is queued for as long as the process runs.
    /// Write errors are ignored: there is nowhere left to report them.
    fn write_out(&self, out: impl Write) {
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
        let mut queue = self.lock();
        loop {
            queue = self
                .changed
                .wait_while(queue, |q| q.entries.is_empty())
                .unwrap_or_else(PoisonError::into_inner);
            let batch = std::mem::take(&mut queue.entries);
            queue.writing = true;
            drop(queue);
            let mut bytes = 0;
            for entry in batch {
                match entry {
                    Entry::Line(line) => {
                        bytes += line.len();
                        let _ = out.write_all(&line);
                    }
                    Entry::Dropped(n) => {
                        let _ = dropped_notice(&mut out, n, self.limit);
                    }
                }
            }
            let _ = out.flush();
            queue = self.lock();
            queue.bytes -= bytes;
            queue.writing = false;
            self.changed.notify_all();
        }
    }
}

/// The line that stands for `n` lines dropped, in the format of the others.
fn dropped_notice(out: &mut impl Write, n: u64, limit: usize) -> std::io::Result<()> {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
    let mut now = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut now));
    writeln!(
        out,
        "{now}  WARN packet_capture::logging: {n} log lines were dropped here: \
         the log was not being read ({limit} bytes of lines waited)"
    )
}

/// One event's writer: the fmt layer writes each event whole, at once.
impl Write for &Spool {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Spool {
    type Writer = &'a Spool;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
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

    /// An output nobody reads stalls no one who logs: the lines past the
    /// limit are dropped, and once the output is read it says how many,
    /// where they were.
    #[test]
    fn an_output_nobody_reads_loses_lines_not_the_loggers() {
        use std::io::BufRead as _;
        // Far more than the pipe (64 KiB), the writer's buffer (64 KiB)
        // and the queue hold.
        const LINES: usize = 5000;
        let line = |i: usize| format!("line {i:05} {}", "x".repeat(100));
        let (unread, pipe) = std::io::pipe().unwrap();
        let spool = Spool::spawn(pipe, 16 * 1024);
        let logger = spool.clone();
        let (done, logged) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..LINES {
                (&logger)
                    .write_all(format!("{}\n", line(i)).as_bytes())
                    .unwrap();
            }
            let _ = done.send(());
        });
        // Bounded, so that a logger that waits fails the test, not hangs it.
        logged
            .recv_timeout(Duration::from_secs(60))
            .expect("a logger waited for the output");

        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(unread)
                .lines()
                .map(Result::unwrap)
                .take_while(|l| l != "last")
                .collect::<Vec<_>>()
        });
        assert!(
            spool.written(Duration::from_secs(60)),
            "the queue drains once read"
        );
        (&spool).write_all(b"last\n").unwrap();
        let out = reader.join().unwrap();
        let (mut next, mut notices) = (0, 0);
        for l in &out {
            match l.split_once("  WARN packet_capture::logging: ") {
                Some((_, notice)) => {
                    notices += 1;
                    let n: usize = notice.split(' ').next().unwrap().parse().unwrap();
                    assert!(notice.ends_with("(16384 bytes of lines waited)"), "{l}");
                    next += n;
                }
                None => {
                    assert_eq!(
                        l,
                        &line(next),
                        "lines in order, a notice where some were dropped"
                    );
                    next += 1;
                }
            }
        }
        assert_eq!(next, LINES, "every line written or counted");
        // A writer slower than the logger drops lines before the pipe is
        // full too: a notice for each run of them.
        assert!(notices > 0, "lines were dropped");
    }

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
