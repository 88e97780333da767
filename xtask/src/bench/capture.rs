//! The two capturers as the benchmark drives them: tcpdump writing a file,
//! and the agent binary with a capture started and stopped over REST.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use packet_capture_test_support::{AgentProcess, Netns};

use super::procstat;
use crate::util::output;

/// How long tcpdump may take to start, to catch up, or to exit.
const PATIENCE: Duration = Duration::from_secs(30);
/// Between two requests for tcpdump's counters while it catches up.
const COUNTER_POLL: Duration = Duration::from_millis(20);

/// What a capturer reports about itself at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Ended {
    /// The file it wrote.
    pub file: PathBuf,
    /// Packets it says it wrote.
    pub packets: u64,
    /// Packets it says it lost.
    pub dropped: u64,
    /// CPU seconds since `cpu_start`.
    pub cpu: f64,
    pub peak_rss: u64,
    /// RSS at the end of the run.
    pub rss: u64,
    pub map_memory: u64,
}

/// `tcpdump -i <iface> -w <file> -s <snaplen> -B <KiB> udp port <p>`.
pub struct Tcpdump {
    child: Child,
    stderr: Receiver<String>,
    file: PathBuf,
    cpu_start: f64,
}

impl Tcpdump {
    pub fn start(
        ns: &Netns,
        iface: &str,
        expression: &str,
        snaplen: u32,
        buffer_kib: u32,
        file: &Path,
    ) -> anyhow::Result<Self> {
        let mut child = ns
            .command("tcpdump")
            .args(["-i", iface, "-n", "-Z", "root", "-w"])
            .arg(file)
            .args(["-s", &snaplen.to_string(), "-B", &buffer_kib.to_string()])
            .arg(expression)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
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
            cpu_start: 0.0,
        };
        dump.wait_for_line(|l| l.contains("listening on"))
            .with_context(|| format!("tcpdump did not start listening on {iface}"))?;
        Ok(dump)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Marks the start of the measured window.
    pub fn mark(&mut self) -> anyhow::Result<()> {
        self.cpu_start = procstat::process_cpu(self.pid())?;
        Ok(())
    }

    fn wait_for_line(&mut self, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if want(&line) => return Ok(line),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => bail!("tcpdump said nothing in {PATIENCE:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("tcpdump exited"),
            }
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits until tcpdump has handled every packet its socket took
    /// (captured + dropped = received, from its SIGUSR1 report), then stops
    /// it with SIGINT and reads its final counters.
    pub fn finish(mut self) -> anyhow::Result<Ended> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.signal(libc::SIGUSR1);
            let line = self.wait_for_line(|l| l.contains("received by filter"))?;
            let c = Counts::parse(&[line.as_str()])?;
            if c.captured + c.dropped >= c.received || Instant::now() > deadline {
                break;
            }
            // No event tells when tcpdump has caught up (its ring retires a
            // block on a timer): ask again shortly.
            std::thread::sleep(COUNTER_POLL);
        }
        let cpu = procstat::process_cpu(self.pid())? - self.cpu_start;
        let peak_rss = procstat::peak_rss(self.pid())?;
        let rss = procstat::rss(self.pid())?;
        let map_memory = procstat::bpf_map_memory(self.pid())?;
        self.signal(libc::SIGINT);
        let mut lines = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => bail!("tcpdump did not exit on SIGINT"),
            }
        }
        let status = self.child.wait().context("waiting for tcpdump")?;
        if !status.success() {
            bail!("tcpdump exited with {status}: {}", lines.join("\n"));
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let counts = Counts::parse(&refs)
            .with_context(|| format!("tcpdump's final counters: {}", lines.join(" / ")))?;
        Ok(Ended {
            file: self.file.clone(),
            packets: counts.captured,
            dropped: counts.dropped,
            cpu,
            peak_rss,
            rss,
            map_memory,
        })
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

/// tcpdump's counters: one line on SIGUSR1, three lines at exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub captured: u64,
    pub received: u64,
    pub dropped: u64,
}

impl Counts {
    pub fn parse(lines: &[&str]) -> anyhow::Result<Self> {
        let find = |word: &str| -> anyhow::Result<u64> {
            lines
                .iter()
                .rev()
                .find_map(|l| number_before(l, word))
                .with_context(|| format!("no {word:?} in tcpdump's report"))
        };
        Ok(Self {
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

/// The agent's settings for a run.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub binary: PathBuf,
    pub ring_mb: u32,
}

/// A capture to ask the agent for.
#[derive(Debug, Clone)]
pub struct AgentCapture {
    pub target_ip: String,
    pub port: u16,
    pub snaplen: u32,
    /// Longer than the run: the run stops it.
    pub duration_secs: u64,
}

/// The agent binary in the receiver's namespace, with one capture.
pub struct Agent {
    process: AgentProcess,
    ns_name: String,
    cpu_start: f64,
    id: String,
}

impl Agent {
    pub fn start(ns: &Netns, settings: &AgentSettings, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let binary = settings.binary.to_str().context("agent path")?.to_owned();
        let dir_arg = dir.to_str().context("capture dir")?.to_owned();
        let ring = settings.ring_mb.to_string();
        let process = AgentProcess::spawn(
            ns,
            &binary,
            &[
                "--insecure-no-auth",
                "--port",
                "0",
                "--bind-address",
                "127.0.0.1",
                "--capture-dir",
                &dir_arg,
                "--ring-buffer-mb",
                &ring,
                "--max-capture-file-size-mb",
                "1048576",
                "--backend",
                "ebpf",
                "--node-name",
                "bench",
            ],
            &[],
        );
        Ok(Self {
            process,
            ns_name: ns.name().to_owned(),
            cpu_start: 0.0,
            id: "bench".into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `curl` inside the agent's namespace; returns the JSON body.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.process.url());
        let mut cmd = packet_capture_test_support::netns::command_in(&self.ns_name, "curl");
        cmd.args(["-sS", "--fail-with-body", "-X", method, &url]);
        if let Some(body) = body {
            cmd.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let text = output(&mut cmd).with_context(|| format!("{method} {path}"))?;
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text}"))
    }

    /// `POST /api/v1/captures`.
    pub fn start_capture(&self, c: &AgentCapture) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "id": self.id,
            "targetIPs": [c.target_ip],
            "targetPorts": [c.port],
            "duration": c.duration_secs,
            "maxPackets": u32::MAX,
            "outputFormat": "pcap",
            "snaplen": c.snaplen,
        });
        let status = self.call("POST", "/api/v1/captures", Some(&body.to_string()))?;
        if status["status"] != "running" {
            bail!("the capture did not start: {status}");
        }
        Ok(())
    }

    /// Marks the start of the measured window.
    pub fn mark(&mut self) -> anyhow::Result<()> {
        self.cpu_start = procstat::process_cpu(self.pid())?;
        Ok(())
    }

    /// `DELETE /api/v1/captures/{id}` (it returns once the file is whole),
    /// then the agent's numbers, then SIGTERM.
    pub fn finish(mut self) -> anyhow::Result<Ended> {
        let status = self.call("DELETE", &format!("/api/v1/captures/{}", self.id), None)?;
        if status["status"] != "stopped" {
            bail!("the capture did not stop cleanly: {status}");
        }
        let cpu = procstat::process_cpu(self.pid())? - self.cpu_start;
        let peak_rss = procstat::peak_rss(self.pid())?;
        let rss = procstat::rss(self.pid())?;
        let map_memory = procstat::bpf_map_memory(self.pid())?;
        let number = |k: &str| {
            status[k]
                .as_u64()
                .with_context(|| format!("no {k} in {status}"))
        };
        let ended = Ended {
            file: PathBuf::from(status["output_file"].as_str().context("no output_file")?),
            packets: number("packets")?,
            dropped: number("dropped")?,
            cpu,
            peak_rss,
            rss,
            map_memory,
        };
        let exit = self.process.signal_and_wait(libc::SIGTERM);
        if !exit.success() {
            bail!("the agent exited with {exit}: {}", self.process.log());
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpdumps_reports() {
        let one = Counts::parse(&[
            "tcpdump: 6 packets captured, 12 packets received by filter, 3 packets dropped by kernel",
        ])
        .unwrap();
        assert_eq!((one.captured, one.received, one.dropped), (6, 12, 3));
        let three = Counts::parse(&[
            "1 packet captured",
            "1 packet received by filter",
            "0 packets dropped by kernel",
        ])
        .unwrap();
        assert_eq!((three.captured, three.received, three.dropped), (1, 1, 0));
    }
}
