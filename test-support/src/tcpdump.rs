//! tcpdump as the oracle: it captures the same traffic with the equivalent
//! expression, and what it wrote is what a capture should hold.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::Netns;
use crate::capfile::{self, Packet};

/// How long tcpdump may take to start, to report or to exit.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running tcpdump writing to a file, with its stderr read line by line.
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
    /// The oracle: `tcpdump -i <iface> <expression>` in `ns` with `snaplen`,
    /// nanosecond timestamps, writing every packet to `file` as it comes;
    /// returns once it listens.
    pub fn start(ns: &Netns, iface: &str, expression: &str, snaplen: u32, file: &Path) -> Self {
        let snaplen = snaplen.to_string();
        let options = [
            "-U",
            "--immediate-mode",
            "-B",
            "65536",
            "--time-stamp-precision=nano",
            "-s",
            &snaplen,
        ];
        Self::spawn(ns, iface, &options, expression, file).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `tcpdump -i <iface> -n <options> -w <file> <expression>` in `ns`,
    /// once it says it listens.
    pub fn spawn(
        ns: &Netns,
        iface: &str,
        options: &[&str],
        expression: &str,
        file: &Path,
    ) -> Result<Self, String> {
        let mut child = ns
            .command("tcpdump")
            .args(["-i", iface, "-n"])
            .args(options)
            .arg("-w")
            .arg(file)
            .arg(expression)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting tcpdump: {e}"))?;
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
        match dump.wait_for_line(|l| l.contains("listening on")) {
            Some(_) => Ok(dump),
            None => Err(format!("tcpdump did not start listening on {iface}")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file it writes.
    pub fn file(&self) -> &Path {
        &self.file
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

    /// Asks tcpdump for its counters (SIGUSR1); `None` if it does not answer.
    pub fn counts(&mut self) -> Option<Counts> {
        self.signal(libc::SIGUSR1);
        let line = self.wait_for_line(|l| l.contains("packets received by filter"))?;
        Counts::parse(&[line.as_str()])
    }

    /// Stops it (SIGINT) and returns its final counters.
    pub fn stop(mut self) -> Result<Counts, String> {
        self.signal(libc::SIGINT);
        let mut lines = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err("tcpdump did not exit on SIGINT".into());
                }
            }
        }
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for tcpdump: {e}"))?;
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        match Counts::parse(&refs) {
            Some(counts) if status.success() => Ok(counts),
            _ => Err(format!(
                "tcpdump exited with {status}: {}",
                lines.join(" / ")
            )),
        }
    }

    /// Waits until tcpdump has written every packet its socket received,
    /// stops it, and returns what it wrote.
    pub fn finish(mut self) -> (Vec<Packet>, Counts) {
        let deadline = Instant::now() + PATIENCE;
        let counts = loop {
            let c = self
                .counts()
                .expect("tcpdump reports its counters on SIGUSR1");
            if c.captured == c.received || Instant::now() > deadline {
                break c;
            }
        };
        let file = self.file.clone();
        self.stop().unwrap_or_else(|e| panic!("{e}"));
        (capfile::read(&file), counts)
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Counts {
    /// From tcpdump's report: one line on SIGUSR1, three lines at exit
    /// ("6 packets captured", "12 packets received by filter", "0 packets
    /// dropped by kernel"); the last mention of each counts.
    pub fn parse(lines: &[&str]) -> Option<Self> {
        let find = |word: &str| lines.iter().rev().find_map(|l| number_before(l, word));
        Some(Self {
            captured: find("captured")?,
            received: find("received by filter")?,
            dropped: find("dropped by kernel")?,
        })
    }
}

fn number_before(line: &str, word: &str) -> Option<u64> {
    let at = line.find(word)?;
    line[..at]
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpdumps_counters() {
        let c = Counts::parse(&[
            "tcpdump: 6 packets captured, 12 packets received by filter, 3 packets dropped by kernel",
        ])
        .unwrap();
        assert_eq!(
            c,
            Counts {
                captured: 6,
                received: 12,
                dropped: 3
            }
        );
        let one = Counts::parse(&[
            "1 packet captured",
            "1 packet received by filter",
            "0 packets dropped by kernel",
        ])
        .unwrap();
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
