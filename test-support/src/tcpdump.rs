//! tcpdump as the oracle: it captures the same traffic with the equivalent
//! expression, and what it wrote is what a capture should hold.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::Netns;
use crate::capfile::{self, Packet};

/// How long tcpdump may take to start or to catch up.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running tcpdump writing to a file.
pub struct Tcpdump {
    child: Child,
    stderr: Receiver<String>,
    file: PathBuf,
}

/// tcpdump's counters, as it reports them on SIGUSR1 and at exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub captured: u64,
    pub received: u64,
    pub dropped: u64,
}

impl Tcpdump {
    /// Starts `tcpdump -i <iface> <expression>` in `ns` with `snaplen`,
    /// writing every packet to `file` as it comes, and returns once it
    /// listens.
    pub fn start(ns: &Netns, iface: &str, expression: &str, snaplen: u32, file: &Path) -> Self {
        let mut child = ns
            .command("tcpdump")
            .args(["-i", iface, "-n", "-U", "--immediate-mode", "-B", "65536"])
            .args([
                "--time-stamp-precision=nano",
                "-s",
                &snaplen.to_string(),
                "-w",
            ])
            .arg(file)
            .arg(expression)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut dump = Self {
            child,
            stderr: rx,
            file: file.to_path_buf(),
        };
        dump.wait_for_line(|l| l.contains("listening on"))
            .unwrap_or_else(|| panic!("tcpdump did not start listening on {iface}"));
        dump
    }

    fn wait_for_line(&mut self, want: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if want(&line) => return Some(line),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Asks tcpdump for its counters (SIGUSR1).
    pub fn counts(&mut self) -> Counts {
        self.signal(libc::SIGUSR1);
        let line = self
            .wait_for_line(|l| l.contains("packets received by filter"))
            .expect("tcpdump reports its counters on SIGUSR1");
        parse_counts(&line)
    }

    /// Waits until tcpdump has written every packet its socket received,
    /// stops it, and returns what it wrote.
    pub fn finish(mut self) -> (Vec<Packet>, Counts) {
        let deadline = Instant::now() + PATIENCE;
        let counts = loop {
            let c = self.counts();
            if c.captured == c.received || Instant::now() > deadline {
                break c;
            }
        };
        self.signal(libc::SIGINT);
        let status = self.child.wait().expect("waiting for tcpdump");
        assert!(status.success(), "tcpdump exited with {status}");
        (capfile::read(&self.file), counts)
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// "tcpdump: 6 packets captured, 12 packets received by filter, 0 packets dropped by kernel"
fn parse_counts(line: &str) -> Counts {
    let number_before = |word: &str| -> u64 {
        let at = line
            .find(word)
            .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
        line[..at]
            .split(|c: char| !c.is_ascii_digit())
            .rfind(|s| !s.is_empty())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before {word:?} in {line:?}"))
    };
    Counts {
        captured: number_before("captured"),
        received: number_before("received by filter"),
        dropped: number_before("dropped by kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpdumps_counters() {
        let c = parse_counts(
            "tcpdump: 6 packets captured, 12 packets received by filter, 3 packets dropped by kernel",
        );
        assert_eq!(
            c,
            Counts {
                captured: 6,
                received: 12,
                dropped: 3
            }
        );
        let one = parse_counts(
            "tcpdump: 1 packet captured, 1 packet received by filter, 0 packets dropped by kernel",
        );
        assert_eq!(
            one,
            Counts {
                captured: 1,
                received: 1,
                dropped: 0
            }
        );
    }
}
