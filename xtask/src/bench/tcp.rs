//! The TCP bulk run: iperf3 across the veth with segmentation and receive
//! offloads on, captured by tcpdump and the agent at once. Super-frames
//! (GSO/GRO, longer than the MTU) must appear in both files with their true
//! length on the wire, whole (captured length = original length), and the
//! two files must hold the same frames and bytes.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::capture::{Agent, AgentCapture, AgentSettings, Tcpdump};
use super::pcapfile::{self, Lengths};
use super::topology::{RECEIVER_IP, SENDER_IP, Topology};
use super::{Config, SNAPLEN};
use crate::util::output;

const IPERF_PORT: u16 = 5201;

#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub seconds: u64,
    /// iperf3's `-b`.
    pub bitrate: String,
    /// The agent's ring and tcpdump's buffer, in MiB (equal).
    pub buffer_mb: u32,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            seconds: 5,
            bitrate: "1G".into(),
            buffer_mb: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Side {
    pub lengths: Lengths,
    pub reported_drops: u64,
    pub valid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpResult {
    pub seconds: u64,
    pub bitrate: String,
    pub buffer_mb: u32,
    pub mtu: u32,
    pub offloads_sender: String,
    pub offloads_receiver: String,
    /// Payload bytes iperf3's receiver counted.
    pub iperf_bytes: u64,
    pub tcpdump: Side,
    pub agent: Side,
}

pub fn run(tcp: &TcpConfig, config: &Config, topo: &Topology) -> anyhow::Result<TcpResult> {
    super::step(format!(
        "TCP bulk run: iperf3 -b {} for {} s, offloads on",
        tcp.bitrate, tcp.seconds
    ));
    topo.offloads(true)?;
    let dir = config.work_dir.join("tcp");
    std::fs::create_dir_all(&dir)?;
    let mut server = topo
        .receiver
        .command("iperf3")
        .args(["-s", "-1", "--forceflush", "-B", &RECEIVER_IP.to_string()])
        .args(["-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut lines = BufReader::new(server.stdout.take().expect("piped")).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("Server listening") => break,
            Some(Ok(_)) => continue,
            _ => bail!("iperf3 -s did not start listening"),
        }
    }
    // The server's later output is not needed; keep its pipe drained.
    std::thread::spawn(move || lines.for_each(drop));
    let mut agent = Agent::start(
        &topo.receiver,
        &AgentSettings {
            ring_mb: tcp.buffer_mb,
            ..config.agent.clone()
        },
        &dir.join("agent"),
    )?;
    agent.start_capture(&AgentCapture {
        target_ip: SENDER_IP.to_string(),
        port: Some(IPERF_PORT),
        filter: String::new(),
        snaplen: SNAPLEN,
        duration_secs: tcp.seconds + 600,
    })?;
    let tcpdump = Tcpdump::start(
        &topo.receiver,
        &topo.receiver_if,
        &format!("tcp port {IPERF_PORT}"),
        SNAPLEN,
        tcp.buffer_mb * 1024,
        &dir.join("tcpdump.pcap"),
    )?;
    let report = output(
        topo.sender
            .command("iperf3")
            .args([
                "-c",
                &RECEIVER_IP.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
            ])
            .args(["-t", &tcp.seconds.to_string(), "-b", &tcp.bitrate, "-J"]),
    )?;
    let report: serde_json::Value = serde_json::from_str(&report).context("iperf3 -J output")?;
    let iperf_bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    server.wait().context("waiting for iperf3 -s")?;
    let agent_end = agent.finish()?;
    let tcpdump_end = tcpdump.finish()?;
    let mtu = topo.mtu()?;
    let side = |end: &super::capture::Ended| -> anyhow::Result<Side> {
        let tshark = super::tshark_reading(&end.file)?;
        let lengths = pcapfile::lengths(&end.file, mtu)?;
        let (valid, _) = super::tshark_verdict(tshark)?;
        Ok(Side {
            lengths,
            reported_drops: end.dropped,
            valid,
        })
    };
    let result = TcpResult {
        seconds: tcp.seconds,
        bitrate: tcp.bitrate.clone(),
        buffer_mb: tcp.buffer_mb,
        mtu,
        offloads_sender: topo.offload_state(false)?,
        offloads_receiver: topo.offload_state(true)?,
        iperf_bytes,
        tcpdump: side(&tcpdump_end)?,
        agent: side(&agent_end)?,
    };
    std::fs::remove_dir_all(&dir)?;
    Ok(result)
}
