//! The agent binary as a process in a network namespace: started, awaited
//! until it logs that it listens, stopped with a signal or killed on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::Netns;

/// How long an agent may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the agent has written to stderr so far, and whether it has exited.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
    /// Set while stderr is not read ([`AgentProcess::hold_log`]).
    held: bool,
}

#[derive(Default)]
struct SharedLog {
    log: Mutex<Log>,
    changed: Condvar,
}

/// A running agent. Killed (SIGKILL) on drop if it still runs.
pub struct AgentProcess {
    child: Child,
    log: Arc<SharedLog>,
    port: u16,
}

impl AgentProcess {
    /// Starts `binary` with `args` and `envs` inside `ns` and waits for the
    /// `listening on <addr>:<port>` line. Panics with the agent's output if
    /// it exits or does not get there in [`START_TIMEOUT`].
    pub fn spawn(ns: &Netns, binary: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::spawn_with_stdout(ns, binary, args, envs, Stdio::null())
    }

    /// [`spawn`](Self::spawn), with the agent's standard output (where
    /// `PACKET:` lines go) on `stdout`.
    pub fn spawn_with_stdout(
        ns: &Netns,
        binary: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        stdout: Stdio,
    ) -> Self {
        let mut cmd = ns.command(binary);
        cmd.args(args)
            .env_remove("KUBECONFIG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let mut agent = Self::start(cmd);
        let line = agent
            .wait_for_log("listening on ", START_TIMEOUT)
            .unwrap_or_else(|| {
                let status = agent.child.try_wait().ok().flatten();
                panic!(
                    "the agent did not start listening (exit status {status:?}); its log:\n{}",
                    agent.log()
                )
            });
        agent.port = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        agent
    }

    /// Runs `cmd` (stderr piped) and follows its stderr.
    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(SharedLog::default());
        let shared = log.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            loop {
                let log = shared.log.lock().expect("log");
                drop(shared.changed.wait_while(log, |l| l.held).expect("log"));
                let Some(Ok(line)) = lines.next() else { break };
                eprintln!("agent: {line}");
                shared.log.lock().expect("log").lines.push(line);
                shared.changed.notify_all();
            }
            shared.log.lock().expect("log").closed = true;
            shared.changed.notify_all();
        });
        Self {
            child,
            log,
            port: 0,
        }
    }

    /// The port the agent listens on (inside its namespace).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for a client inside the namespace.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        self.log.log.lock().expect("log").lines.join("\n")
    }

    /// Waits until a log line contains `needle` and returns that line; `None`
    /// if the agent's stderr closes or `timeout` passes first.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_lines(timeout, |lines| {
            lines.iter().find(|l| l.contains(needle)).cloned()
        })
    }

    /// Waits until `n` log lines contain every one of `needles`; false if
    /// the agent's stderr closes or `timeout` passes first.
    pub fn wait_for_log_lines(&self, needles: &[&str], n: usize, timeout: Duration) -> bool {
        self.wait_for_lines(timeout, |lines| {
            let matching = lines
                .iter()
                .filter(|l| needles.iter().all(|needle| l.contains(needle)));
            (matching.count() >= n).then_some(())
        })
        .is_some()
    }

    /// Waits, woken by each new line, until `found` finds something in the
    /// log's lines; `None` if the agent's stderr closes or `timeout` passes
    /// first.
    fn wait_for_lines<T>(
        &self,
        timeout: Duration,
        mut found: impl FnMut(&[String]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut log = self.log.log.lock().expect("log");
        loop {
            if let Some(t) = found(&log.lines) {
                return Some(t);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if log.closed {
                return None;
            }
            log = self.log.changed.wait_timeout(log, left).expect("log").0;
        }
    }

    /// Stops reading the agent's stderr until the guard is dropped, as a
    /// container runtime that stops reading the log pipe: once the pipe
    /// is full, the agent's writes to it block.
    pub fn hold_log(&self) -> HeldLog<'_> {
        self.log.log.lock().expect("log").held = true;
        HeldLog(&self.log)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill has no memory effects; the pid is our child's.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        self.child.wait().expect("waiting for the agent")
    }
}

/// The agent's stderr unread while it lives ([`AgentProcess::hold_log`]).
pub struct HeldLog<'a>(&'a SharedLog);

impl Drop for HeldLog<'_> {
    fn drop(&mut self) {
        self.0.log.lock().expect("log").held = false;
        self.0.changed.notify_all();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `binary` to its exit (for start-up failures) and returns the exit
/// status and its stderr.
pub fn run_to_exit(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String) {
    let out = Command::new(binary)
        .args(args)
        .env_remove("KUBECONFIG")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
