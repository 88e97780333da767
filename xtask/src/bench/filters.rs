//! `cargo xtask bench filters`: what capturing costs for the packets it
//! does not keep, side by side with tcpdump, on the generator's flood at
//! its top rate: a filter that rejects every packet (in the kernel, and in
//! user space as before), a capture of another host, and the agent running
//! with no capture at all.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::capture::{Agent, AgentCapture, AgentSettings, Tcpdump};
use super::generator::{self, Rate};
use super::procstat::SystemCpu;
use super::topology::{self, SENDER_IP, Topology, UDP_PORT};
use super::{SNAPLEN, build_agent, replace_section};
use crate::util::step;

/// Nothing of a flood of 1442-byte frames passes it.
const REJECTING_FILTER: &str = "udp and greater 2000";
/// An address none of the flood's packets comes from or goes to.
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 99);
/// The agent's ring and tcpdump's buffer: the same memory.
const RING_MB: u32 = 2;
const SIZES: [usize; 2] = [60, 1442];
/// The rejected flood's frames.
const REJECTED_SIZE: usize = 1442;

const BEGIN: &str = "<!-- filters: written by cargo xtask bench filters -->";
const END: &str = "<!-- /filters -->";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Repetitions of each run; the report shows medians.
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// The agent binary; by default `cargo build --release -p
    /// packet-capture-agent` builds it.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Replace this benchmark's section of this report (docs/benchmarks.md).
    #[arg(long, conflicts_with = "runs")]
    out: Option<PathBuf>,
    /// Only these runs (always with the no-capture run the others are
    /// measured against), e.g. `--runs agent-other,agent-rejecting` to
    /// compare two paths or to profile one.
    #[arg(long, value_delimiter = ',', value_enum)]
    runs: Option<Vec<Kind>>,
}

/// What runs beside the flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// Nothing: the generator's own rate.
    NoCapture,
    /// The agent running with no capture (its programs loaded, attached
    /// to nothing).
    AgentIdle,
    /// A capture of [`OTHER_IP`].
    TcpdumpOther,
    AgentOther,
    /// The flood's packets selected, and [`REJECTING_FILTER`] on them.
    TcpdumpRejecting,
    AgentRejecting,
    AgentRejectingInUserSpace,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::NoCapture => "no capture, no agent",
            Self::AgentIdle => "agent running, no capture",
            Self::TcpdumpOther => "tcpdump `host OTHER`",
            Self::AgentOther => "agent, capture of OTHER",
            Self::TcpdumpRejecting => "tcpdump, rejecting filter",
            Self::AgentRejecting => "agent, rejecting filter in the kernel",
            Self::AgentRejectingInUserSpace => "agent, rejecting filter in user space",
        }
    }

    /// The runs at frames of `size` bytes.
    fn at(size: usize, only: Option<&[Kind]>) -> Vec<Self> {
        let mut kinds = vec![
            Self::NoCapture,
            Self::AgentIdle,
            Self::TcpdumpOther,
            Self::AgentOther,
        ];
        if size == REJECTED_SIZE {
            kinds.extend([
                Self::TcpdumpRejecting,
                Self::AgentRejecting,
                Self::AgentRejectingInUserSpace,
            ]);
        }
        if let Some(only) = only {
            kinds.retain(|k| *k == Self::NoCapture || only.contains(k));
            // Nothing chosen at this size: not even the baseline.
            if kinds == [Self::NoCapture] {
                kinds.clear();
            }
        }
        kinds
    }

    /// The agent's capture (none: the agent runs idle), and whether its
    /// filter runs in user space.
    fn agent(self) -> Option<(Option<AgentCapture>, bool)> {
        let capture = |target: Ipv4Addr, port, filter: &str| AgentCapture {
            target_ip: target.to_string(),
            port,
            filter: filter.into(),
            snaplen: SNAPLEN,
            duration_secs: 3600,
        };
        match self {
            Self::AgentIdle => Some((None, false)),
            Self::AgentOther => Some((Some(capture(OTHER_IP, None, "")), false)),
            Self::AgentRejecting | Self::AgentRejectingInUserSpace => Some((
                Some(capture(SENDER_IP, Some(UDP_PORT), REJECTING_FILTER)),
                self == Self::AgentRejectingInUserSpace,
            )),
            _ => None,
        }
    }

    /// tcpdump's expression: what the agent's capture selects.
    fn tcpdump(self) -> Option<String> {
        match self {
            Self::TcpdumpOther => Some(format!("host {OTHER_IP}")),
            Self::TcpdumpRejecting => Some(format!(
                "(host {SENDER_IP}) and (port {UDP_PORT}) and ({REJECTING_FILTER})"
            )),
            _ => None,
        }
    }
}

/// One run.
#[derive(Debug, Clone, Copy)]
struct Measured {
    kind: usize,
    size: usize,
    /// What the generator sent, per second.
    pps: f64,
    /// Frames the receiver's interface took.
    offered: u64,
    /// The capturer's process CPU (user + system), seconds.
    capturer_cpu: Option<f64>,
    /// All CPUs' softirq time, seconds.
    softirq: f64,
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => build_agent(true)?,
    };
    let topo = Topology::new()?;
    let flow = topo.flow()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generator_cpu = cores - 1;
    let dir = std::env::temp_dir().join(format!(
        "packet-capture-bench-filters-{}",
        std::process::id()
    ));
    let mut runs = Vec::new();
    for repetition in 1..=args.repetitions {
        for size in SIZES {
            for kind in Kind::at(size, args.runs.as_deref()) {
                step(format!(
                    "{size} B, {}, repetition {repetition}",
                    kind.label()
                ));
                let m = run_one(
                    &args,
                    &topo,
                    &flow,
                    generator_cpu,
                    &binary,
                    kind,
                    size,
                    &dir,
                )?;
                step(format!(
                    "   {:.0} pkt/s, capturer CPU {:?} s, softirq {:.2} s",
                    m.pps, m.capturer_cpu, m.softirq
                ));
                runs.push(m);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let section = markdown(&runs, &args);
    println!("{section}");
    if let Some(out) = &args.out {
        replace_section(out, &(BEGIN.into(), END.into()), &section)?;
        step(format!("wrote the filters section of {}", out.display()));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    args: &Args,
    topo: &Topology,
    flow: &generator::Flow,
    generator_cpu: usize,
    binary: &std::path::Path,
    kind: Kind,
    size: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Measured> {
    let run_dir = dir.join(format!("{size}-{kind:?}"));
    std::fs::create_dir_all(&run_dir)?;
    let mut agent = match kind.agent() {
        Some((capture, filters_in_user_space)) => {
            let settings = AgentSettings {
                binary: binary.to_path_buf(),
                ring_mb: RING_MB,
                filters_in_user_space,
            };
            let agent = Agent::start(&topo.receiver, &settings, &run_dir.join("agent"))?;
            if let Some(c) = &capture {
                agent.start_capture(c)?;
            }
            Some((agent, capture.is_some()))
        }
        None => None,
    };
    let mut tcpdump = kind
        .tcpdump()
        .map(|expression| {
            Tcpdump::start(
                &topo.receiver,
                &topo.receiver_if,
                &expression,
                SNAPLEN,
                RING_MB * 1024,
                &run_dir.join("tcpdump.pcap"),
            )
        })
        .transpose()?;
    if let Some((a, _)) = agent.as_mut() {
        a.mark()?;
    }
    if let Some(t) = tcpdump.as_mut() {
        t.mark()?;
    }
    let before = topo.receiver_counters()?;
    let cpu_before = SystemCpu::read()?;
    let sent = topology::in_netns(&topo.sender, || {
        generator::send(
            flow,
            size,
            Rate::Max,
            Duration::from_secs(args.seconds),
            generator_cpu,
        )
    })??;
    let system = SystemCpu::read()?.since(cpu_before);
    let after = topo.receiver_counters()?;
    let capturer_cpu = match (agent, tcpdump) {
        (Some((agent, true)), _) => Some(agent.finish()?.cpu),
        (Some((agent, false)), _) => {
            let cpu = agent.cpu()?;
            agent.stop()?;
            Some(cpu)
        }
        (None, Some(t)) => Some(t.finish()?.cpu),
        (None, None) => None,
    };
    std::fs::remove_dir_all(&run_dir).with_context(|| format!("{}", run_dir.display()))?;
    Ok(Measured {
        kind: kind as usize,
        size,
        pps: sent.pps(),
        offered: after.rx_packets - before.rx_packets,
        capturer_cpu,
        softirq: system.softirq,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Medians of the runs of `kind` at `size`: (generator pkt/s, capturer CPU
/// per offered packet in ns, softirq per offered packet in ns).
fn medians(runs: &[Measured], kind: Kind, size: usize) -> (f64, Option<f64>, f64) {
    let of: Vec<&Measured> = runs
        .iter()
        .filter(|m| m.kind == kind as usize && m.size == size)
        .collect();
    let per_packet = |s: f64, m: &Measured| s * 1e9 / m.offered.max(1) as f64;
    (
        median(of.iter().map(|m| m.pps).collect()).unwrap_or(0.0),
        median(
            of.iter()
                .filter_map(|m| m.capturer_cpu.map(|c| per_packet(c, m)))
                .collect(),
        ),
        median(of.iter().map(|m| per_packet(m.softirq, m)).collect()).unwrap_or(0.0),
    )
}

/// How much slower the generator sent with `kind` than with nothing
/// capturing, in percent.
fn rate_loss(runs: &[Measured], size: usize, kind: Kind) -> f64 {
    let (base, ..) = medians(runs, Kind::NoCapture, size);
    let (pps, ..) = medians(runs, kind, size);
    100.0 * (1.0 - pps / base.max(1.0))
}

fn markdown(runs: &[Measured], args: &Args) -> String {
    let mut rows = vec![
        "| frames | run | generator (pkt/s) | rate loss | capturer CPU / offered packet | softirq / offered packet |".to_string(),
        "|---|---|---:|---:|---:|---:|".to_string(),
    ];
    for size in SIZES {
        for kind in Kind::at(size, args.runs.as_deref()) {
            let (pps, cpu, softirq) = medians(runs, kind, size);
            rows.push(format!(
                "| {size} B | {} | {pps:.0} | {} | {} | {softirq:.0} ns |",
                kind.label(),
                if kind == Kind::NoCapture {
                    "—".to_string()
                } else {
                    format!("{:.1}%", rate_loss(runs, size, kind))
                },
                cpu.map_or("—".into(), |c| format!("{c:.1} ns")),
            ));
        }
    }
    let judged = match args.runs {
        None => targets(runs),
        Some(_) => vec!["Targets are judged on a full run (without `--runs`).".to_string()],
    };
    // This section may be written apart from the full run, on another day
    // or machine: it names its own.
    let env = super::environment();
    format!(
        "{BEGIN}\n## What is not captured\n\n`cargo xtask bench filters --seconds {} --repetitions {}` \
         (commit `{}`, {}, {} cores, kernel {}, {}): \
         the generator's flood at its top rate, medians of {} runs of {} s. *Rate loss* is the \
         generator's rate against the same frames with nothing capturing (the capturers' work \
         runs in softirq on the sending CPU, so what they cost per packet slows the sender); \
         *capturer CPU* is the capturer's process CPU time (user + system) per offered packet; OTHER is \
         {OTHER_IP}, which no packet of the flood names. The agent's ring and tcpdump's buffer \
         are {RING_MB} MiB each.\n\n{}\n\n{}\n\n{END}\n",
        args.seconds,
        args.repetitions,
        env.commit,
        env.cpu_model,
        env.cores,
        env.kernel,
        env.date,
        args.repetitions,
        args.seconds,
        rows.join("\n"),
        judged.join("\n"),
    )
}

/// The lines of targets 4b to 4d, from a full run.
fn targets(runs: &[Measured]) -> Vec<String> {
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let loss = |size, kind| rate_loss(runs, size, kind);
    let (_, kernel_cpu, _) = medians(runs, Kind::AgentRejecting, REJECTED_SIZE);
    let (_, user_cpu, _) = medians(runs, Kind::AgentRejectingInUserSpace, REJECTED_SIZE);
    let (kernel_cpu, user_cpu) = (kernel_cpu.unwrap_or(0.0), user_cpu.unwrap_or(0.0));
    let share = 100.0 * kernel_cpu / user_cpu.max(f64::MIN_POSITIVE);
    let (agent_loss, tcpdump_loss) = (
        loss(REJECTED_SIZE, Kind::AgentRejecting),
        loss(REJECTED_SIZE, Kind::TcpdumpRejecting),
    );
    let mut targets = vec![format!(
        "- **4b** A filter that rejects the whole flood (`{REJECTING_FILTER}` on {REJECTED_SIZE}-byte frames): the agent's process CPU per offered packet is {kernel_cpu:.1} ns with the filter in the kernel, {user_cpu:.1} ns in user space: {share:.1}% (target < 5%: {}); rate loss {agent_loss:.1}% against tcpdump's {tcpdump_loss:.1}% with the same expression (target ≤: {}).",
        verdict(share < 5.0),
        verdict(agent_loss <= tcpdump_loss),
    )];
    for size in SIZES {
        let (agent, tcpdump) = (loss(size, Kind::AgentOther), loss(size, Kind::TcpdumpOther));
        targets.push(format!(
            "- **4c** Traffic no capture selects ({size} B; a capture of another host runs): rate loss {agent:.1}% against tcpdump's {tcpdump:.1}% with `host OTHER` (target ≤: {}).",
            verdict(agent <= tcpdump)
        ));
    }
    for size in SIZES {
        let idle = loss(size, Kind::AgentIdle);
        targets.push(format!(
            "- **4d** No capture, the agent running ({size} B): rate loss {idle:.1}% against no agent (target < 1%: {}).",
            verdict(idle < 1.0)
        ));
    }
    targets
}
