//! The two capturers as the benchmark drives them: tcpdump writing a file,
//! and the agent binary with a capture started and stopped over REST.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use packet_capture_test_support::{AgentProcess, Netns};

use super::procstat;
use crate::util::output;

/// How long tcpdump may take to catch up.
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
    /// What a live reader of the agent's capture got, as it wrote it.
    pub streamed: Option<PathBuf>,
    /// CPU seconds since `cpu_start`.
    pub cpu: f64,
    pub memory: procstat::Memory,
}

/// `tcpdump -i <iface> -w <file> -s <snaplen> -B <KiB> <expression>`.
pub struct Tcpdump {
    dump: packet_capture_test_support::Tcpdump,
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
        let (snaplen, buffer_kib) = (snaplen.to_string(), buffer_kib.to_string());
        let options = ["-Z", "root", "-s", &snaplen, "-B", &buffer_kib];
        let dump =
            packet_capture_test_support::Tcpdump::spawn(ns, iface, &options, expression, file)
                .map_err(anyhow::Error::msg)?;
        Ok(Self {
            dump,
            cpu_start: 0.0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.dump.pid()
    }

    /// Marks the start of the measured window.
    pub fn mark(&mut self) -> anyhow::Result<()> {
        self.cpu_start = procstat::process_cpu(self.pid())?;
        Ok(())
    }

    /// CPU seconds since [`Tcpdump::mark`].
    pub fn cpu(&self) -> anyhow::Result<f64> {
        Ok(procstat::process_cpu(self.pid())? - self.cpu_start)
    }

    /// SIGINT, and its final report.
    pub fn stop(self) -> anyhow::Result<()> {
        self.dump.stop().map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// Waits until tcpdump has handled every packet its socket took
    /// (captured + dropped = received, from its SIGUSR1 report), then stops
    /// it with SIGINT and reads its final counters.
    pub fn finish(mut self) -> anyhow::Result<Ended> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let c = self
                .dump
                .counts()
                .context("tcpdump did not report its counters on SIGUSR1")?;
            if c.captured + c.dropped >= c.received || Instant::now() > deadline {
                break;
            }
            // No event tells when tcpdump has caught up (its ring retires a
            // block on a timer): ask again shortly.
            std::thread::sleep(COUNTER_POLL);
        }
        let cpu = self.cpu()?;
        let memory = procstat::Memory::of(self.pid())?;
        let file = self.dump.file().to_path_buf();
        let counts = self.dump.stop().map_err(anyhow::Error::msg)?;
        Ok(Ended {
            file,
            packets: counts.captured,
            dropped: counts.dropped,
            streamed: None,
            cpu,
            memory,
        })
    }
}

/// The agent's settings for a run.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub binary: PathBuf,
    pub ring_mb: u32,
    /// `--filters-in-user-space`: the filter runs after the ring, as
    /// before the kernel ran it.
    pub filters_in_user_space: bool,
    /// A reader of the capture's live packets (REST, pcapng) for as long
    /// as it runs, as `kubectl pcap stream` would be.
    pub live_reader: bool,
}

/// A capture to ask the agent for.
#[derive(Debug, Clone)]
pub struct AgentCapture {
    pub target_ip: String,
    /// None: any port.
    pub port: Option<u16>,
    /// A tcpdump expression; empty: none.
    pub filter: String,
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
    /// Where a live reader writes, when the settings ask for one.
    stream_file: Option<PathBuf>,
    reader: Option<LiveReader>,
}

/// `curl` reading `GET /api/v1/captures/{id}/packets` into a file.
struct LiveReader {
    curl: std::process::Child,
    _headers: std::io::BufReader<std::process::ChildStdout>,
    file: PathBuf,
}

impl Agent {
    pub fn start(ns: &Netns, settings: &AgentSettings, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let binary = settings.binary.to_str().context("agent path")?.to_owned();
        let dir_arg = dir.to_str().context("capture dir")?.to_owned();
        let ring = settings.ring_mb.to_string();
        let user_space: &[&str] = if settings.filters_in_user_space {
            &["--filters-in-user-space"]
        } else {
            &[]
        };
        let process = AgentProcess::spawn(
            ns,
            &binary,
            &[
                user_space,
                &[
                    "--insecure-no-auth",
                    "--insecure-plaintext",
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
                    // The capture is stopped by the harness, never by a count.
                    "--max-capture-packets",
                    "4294967295",
                    "--backend",
                    "ebpf",
                    "--node-name",
                    "bench",
                ],
            ]
            .concat(),
            &[],
        );
        Ok(Self {
            process,
            ns_name: ns.name().to_owned(),
            cpu_start: 0.0,
            id: "bench".into(),
            stream_file: settings.live_reader.then(|| dir.join("live.pcapng")),
            reader: None,
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

    /// `POST /api/v1/captures`, and the live reader once the capture runs.
    pub fn start_capture(&mut self, c: &AgentCapture) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "id": self.id,
            "targetIPs": [c.target_ip],
            "targetPorts": c.port.into_iter().collect::<Vec<_>>(),
            "filter": c.filter,
            "duration": c.duration_secs,
            "maxPackets": u32::MAX,
            "outputFormat": "pcap",
            "snaplen": c.snaplen,
        });
        let status = self.call("POST", "/api/v1/captures", Some(&body.to_string()))?;
        if status["status"] != "running" {
            bail!("the capture did not start: {status}");
        }
        if let Some(file) = &self.stream_file {
            self.reader = Some(self.read_live(file)?);
        }
        Ok(())
    }

    /// Starts reading the capture's live packets into `file`; returns once
    /// the agent has answered, and so has taken the reader in: every packet
    /// from then on is the reader's.
    fn read_live(&self, file: &Path) -> anyhow::Result<LiveReader> {
        use std::io::BufRead as _;
        let url = format!("{}/api/v1/captures/{}/packets", self.process.url(), self.id);
        let mut curl = packet_capture_test_support::netns::command_in(&self.ns_name, "curl")
            .args(["-sS", "--fail", "--no-buffer", "--dump-header", "-", "-o"])
            .arg(file)
            .arg(&url)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting curl for the live packets")?;
        // The headers come once the agent has taken the reader in; curl's
        // output stays open until it exits, so that it can write them all.
        let mut headers = std::io::BufReader::new(curl.stdout.take().context("curl's output")?);
        let mut status = String::new();
        headers
            .read_line(&mut status)
            .context("reading the live packets' status line")?;
        if !status.contains(" 200") {
            let _ = curl.kill();
            let _ = curl.wait();
            bail!("GET {url}: {}", status.trim_end());
        }
        let mut line = String::new();
        while headers.read_line(&mut line)? > 0 && !line.trim().is_empty() {
            line.clear();
        }
        Ok(LiveReader {
            curl,
            _headers: headers,
            file: file.to_owned(),
        })
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
        // The stream ends with the capture.
        let streamed = match self.reader.take() {
            Some(mut reader) => {
                let exit = reader.curl.wait()?;
                if !exit.success() {
                    bail!("the live reader exited with {exit}");
                }
                Some(reader.file)
            }
            None => None,
        };
        let cpu = self.cpu()?;
        let memory = procstat::Memory::of(self.pid())?;
        let number = |k: &str| {
            status[k]
                .as_u64()
                .with_context(|| format!("no {k} in {status}"))
        };
        let ended = Ended {
            file: PathBuf::from(status["output_file"].as_str().context("no output_file")?),
            packets: number("packets")?,
            dropped: number("dropped")?,
            streamed,
            cpu,
            memory,
        };
        self.stop()?;
        Ok(ended)
    }

    /// CPU seconds since [`Agent::mark`].
    pub fn cpu(&self) -> anyhow::Result<f64> {
        Ok(procstat::process_cpu(self.pid())? - self.cpu_start)
    }

    /// SIGTERM, and a clean exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let exit = self.process.signal_and_wait(libc::SIGTERM);
        if !exit.success() {
            bail!("the agent exited with {exit}: {}", self.process.log());
        }
        Ok(())
    }
}
