//! `cargo xtask bench filters`: what capturing costs for the packets it
//! does not keep, side by side with tcpdump, on the generator's flood at
//! its top rate: a filter that rejects every packet (in the kernel, and in
//! user space as before), a capture of another host, and the agent running
//! with no capture at all.
//!
//! A difference of a point or two in the sender's rate is what decides
//! these targets, and on a shared machine the rate drifts by more than that
//! between runs minutes apart. So each frame size gets one continuous
//! flood, measured in short slices: every capturer's slice lies between two
//! with nothing capturing, and its loss is against their mean.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::capture::{Agent, AgentCapture, AgentSettings, Tcpdump};
use super::generator::{self, Flood, Rate, Until};
use super::procstat::SystemCpu;
use super::topology::{self, SENDER_IP, Topology, UDP_PORT};
use super::{SNAPLEN, at_least_one, build_agent, replace_section};
use crate::util::step;

/// Nothing of a flood of 1442-byte frames passes it.
const REJECTING_FILTER: &str = "udp and greater 2000";
/// An address none of the flood's packets comes from or goes to.
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 99);
/// The agent's ring and tcpdump's buffer: the same memory.
const RING_MB: u32 = 2;
const SIZES: [usize; 2] = [60, 1442];
/// From a capturer's start to its slice's measurement.
const SETTLE: Duration = Duration::from_millis(500);
/// The rejected flood's frames.
const REJECTED_SIZE: usize = 1442;

const BEGIN: &str = "<!-- filters: written by cargo xtask bench filters -->";
const END: &str = "<!-- /filters -->";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per slice of the flood.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<u64>())]
    seconds: u64,
    /// Slices of each run; the report shows medians.
    #[arg(long, default_value_t = 9, value_parser = at_least_one::<usize>())]
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

/// One slice of a flood: a capturer, or nothing, beside it for a while.
#[derive(Debug, Clone, Copy)]
struct Slice {
    kind: Kind,
    size: usize,
    repetition: usize,
    /// What the generator sent per second.
    pps: f64,
    /// Frames it sent.
    sent: u64,
    /// The capturer's process CPU (user + system), seconds.
    capturer_cpu: Option<f64>,
    /// All CPUs' softirq time, seconds.
    softirq: f64,
    /// How much slower the generator sent than in the slices with nothing
    /// capturing just before and after, in percent.
    loss: Option<f64>,
}

/// What every slice needs.
struct Bench<'a> {
    args: &'a Args,
    topo: &'a Topology,
    binary: &'a Path,
    dir: PathBuf,
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => build_agent()?,
    };
    let topo = Topology::new()?;
    let flow = topo.flow()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generator_cpu = cores - 1;
    let bench = Bench {
        args: &args,
        topo: &topo,
        binary: &binary,
        dir: std::env::temp_dir().join(format!(
            "packet-capture-bench-filters-{}",
            std::process::id()
        )),
    };
    let mut slices = Vec::new();
    for size in SIZES {
        let kinds: Vec<Kind> = Kind::at(size, args.runs.as_deref())
            .into_iter()
            .filter(|k| *k != Kind::NoCapture)
            .collect();
        if kinds.is_empty() {
            continue;
        }
        step(format!(
            "{size} B: one flood for {} slices",
            1 + 2 * kinds.len() * args.repetitions
        ));
        let flood = Flood::default();
        let measured = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                topology::in_netns(&topo.sender, || {
                    generator::send(
                        &flow,
                        size,
                        Rate::Max,
                        Until::Stopped(&flood),
                        generator_cpu,
                    )
                })
            });
            let measured = bench.flood(&flood, &kinds, size);
            flood.stop();
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("the generator panicked"))?;
            // The generator's own failure says more than what it left the
            // slices to measure.
            sent??;
            measured
        })?;
        slices.extend(measured);
    }
    let _ = std::fs::remove_dir_all(&bench.dir);
    let section = markdown(&slices, &args);
    println!("{section}");
    if let Some(out) = &args.out {
        replace_section(out, &(BEGIN.into(), END.into()), &section)?;
        step(format!("wrote the filters section of {}", out.display()));
    }
    Ok(())
}

impl Bench<'_> {
    /// The slices of one flood of `size`-byte frames: per repetition each
    /// of `kinds` in turn (the order rotated each time), each between two
    /// slices with nothing capturing, whose mean its rate is measured
    /// against.
    fn flood(&self, flood: &Flood, kinds: &[Kind], size: usize) -> anyhow::Result<Vec<Slice>> {
        // The flood reaches its pace before anything is measured.
        std::thread::sleep(Duration::from_secs(self.args.seconds));
        let mut slices = vec![self.slice(flood, Kind::NoCapture, size, 0)?];
        for repetition in 1..=self.args.repetitions {
            let mut order = kinds.to_vec();
            order.rotate_left(repetition % kinds.len());
            for kind in order {
                let mut slice = self.slice(flood, kind, size, repetition)?;
                let after = self.slice(flood, Kind::NoCapture, size, repetition)?;
                let before = slices.last().expect("a slice with nothing capturing");
                let baseline = (before.pps + after.pps) / 2.0;
                slice.loss = Some(100.0 * (1.0 - slice.pps / baseline.max(1.0)));
                step(format!(
                    "   {size} B, {}, repetition {repetition}: {:.0} pkt/s, rate loss {:.1}% (beside {:.0} and {:.0}), capturer CPU {:?} s",
                    kind.label(),
                    slice.pps,
                    slice.loss.unwrap_or_default(),
                    before.pps,
                    after.pps,
                    slice.capturer_cpu,
                ));
                slices.extend([slice, after]);
            }
        }
        Ok(slices)
    }

    /// Starts `kind`'s capturer beside the running flood, measures for
    /// `--seconds`, and stops it.
    fn slice(
        &self,
        flood: &Flood,
        kind: Kind,
        size: usize,
        repetition: usize,
    ) -> anyhow::Result<Slice> {
        let run_dir = self.dir.join(format!("{size}-{kind:?}-{repetition}"));
        std::fs::create_dir_all(&run_dir)?;
        let mut capturer = Capturer::start(self, kind, &run_dir)?;
        // Starting costs CPU (the agent loads its programs, tcpdump
        // compiles its filter and maps its ring) that is no part of
        // capturing: it passes before the slice is measured.
        std::thread::sleep(SETTLE);
        capturer.mark()?;
        let cpu_before = SystemCpu::read()?;
        let (sent_before, start) = (flood.sent(), Instant::now());
        std::thread::sleep(Duration::from_secs(self.args.seconds));
        let (sent, elapsed) = (flood.sent() - sent_before, start.elapsed());
        let system = SystemCpu::read()?.since(cpu_before);
        let capturer_cpu = capturer.cpu()?;
        capturer.stop()?;
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("{}", run_dir.display()))?;
        if sent == 0 {
            bail!("the generator sent nothing in a slice");
        }
        Ok(Slice {
            kind,
            size,
            repetition,
            pps: sent as f64 / elapsed.as_secs_f64(),
            sent,
            capturer_cpu,
            softirq: system.softirq,
            loss: None,
        })
    }
}

/// What runs beside the flood in a slice.
enum Capturer {
    Nothing,
    Agent { agent: Agent, capturing: bool },
    Tcpdump(Tcpdump),
}

impl Capturer {
    fn start(bench: &Bench, kind: Kind, dir: &Path) -> anyhow::Result<Self> {
        if let Some((capture, filters_in_user_space)) = kind.agent() {
            let settings = AgentSettings {
                binary: bench.binary.to_path_buf(),
                ring_mb: RING_MB,
                filters_in_user_space,
                live_reader: false,
            };
            let mut agent = Agent::start(&bench.topo.receiver, &settings, &dir.join("agent"))?;
            if let Some(c) = &capture {
                agent.start_capture(c)?;
            }
            return Ok(Self::Agent {
                agent,
                capturing: capture.is_some(),
            });
        }
        if let Some(expression) = kind.tcpdump() {
            return Ok(Self::Tcpdump(Tcpdump::start(
                &bench.topo.receiver,
                &bench.topo.receiver_if,
                &expression,
                SNAPLEN,
                RING_MB * 1024,
                &dir.join("tcpdump.pcap"),
            )?));
        }
        Ok(Self::Nothing)
    }

    /// Marks the start of the measured window.
    fn mark(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Nothing => Ok(()),
            Self::Agent { agent, .. } => agent.mark(),
            Self::Tcpdump(t) => t.mark(),
        }
    }

    /// Process CPU seconds since the mark.
    fn cpu(&self) -> anyhow::Result<Option<f64>> {
        match self {
            Self::Nothing => Ok(None),
            Self::Agent { agent, .. } => agent.cpu().map(Some),
            Self::Tcpdump(t) => t.cpu().map(Some),
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Nothing => Ok(()),
            Self::Agent {
                agent,
                capturing: true,
            } => agent.finish().map(drop),
            Self::Agent {
                agent,
                capturing: false,
            } => agent.stop(),
            Self::Tcpdump(t) => t.stop(),
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn of(slices: &[Slice], kind: Kind, size: usize) -> impl Iterator<Item = &Slice> {
    slices
        .iter()
        .filter(move |s| s.kind == kind && s.size == size)
}

/// Medians of the slices of `kind` at `size`: (generator pkt/s, capturer
/// CPU per offered packet in ns, softirq per offered packet in ns).
fn medians(slices: &[Slice], kind: Kind, size: usize) -> (f64, Option<f64>, f64) {
    let per_packet = |seconds: f64, s: &Slice| seconds * 1e9 / s.sent.max(1) as f64;
    (
        median(of(slices, kind, size).map(|s| s.pps).collect()).unwrap_or(0.0),
        median(
            of(slices, kind, size)
                .filter_map(|s| s.capturer_cpu.map(|c| per_packet(c, s)))
                .collect(),
        ),
        median(
            of(slices, kind, size)
                .map(|s| per_packet(s.softirq, s))
                .collect(),
        )
        .unwrap_or(0.0),
    )
}

/// The median of `kind`'s rate losses at `size`, in percent.
fn rate_loss(slices: &[Slice], size: usize, kind: Kind) -> f64 {
    median(of(slices, kind, size).filter_map(|s| s.loss).collect()).unwrap_or(0.0)
}

/// In how many repetitions `agent` slowed the sender no more than
/// `tcpdump` did, of how many.
fn paired(slices: &[Slice], size: usize, agent: Kind, tcpdump: Kind) -> (usize, usize) {
    let pairs: Vec<(f64, f64)> = of(slices, agent, size)
        .filter_map(|a| {
            let t = of(slices, tcpdump, size).find(|t| t.repetition == a.repetition)?;
            Some((a.loss?, t.loss?))
        })
        .collect();
    (pairs.iter().filter(|(a, t)| a <= t).count(), pairs.len())
}

fn markdown(slices: &[Slice], args: &Args) -> String {
    let mut rows = vec![
        "| frames | run | generator (pkt/s) | rate loss | capturer CPU / offered packet | softirq / offered packet |".to_string(),
        "|---|---|---:|---:|---:|---:|".to_string(),
    ];
    for size in SIZES {
        for kind in Kind::at(size, args.runs.as_deref()) {
            let (pps, cpu, softirq) = medians(slices, kind, size);
            rows.push(format!(
                "| {size} B | {} | {pps:.0} | {} | {} | {softirq:.0} ns |",
                kind.label(),
                if kind == Kind::NoCapture {
                    "—".to_string()
                } else {
                    format!("{:.1}%", rate_loss(slices, size, kind))
                },
                cpu.map_or("—".into(), |c| format!("{c:.1} ns")),
            ));
        }
    }
    let judged = match args.runs {
        None => targets(slices),
        Some(_) => vec!["Targets are judged on a full run (without `--runs`).".to_string()],
    };
    // This section may be written apart from the full run, on another day
    // or machine: it names its own.
    let env = super::environment();
    format!(
        "{BEGIN}\n## What is not captured\n\n`cargo xtask bench filters --seconds {seconds} --repetitions {repetitions}` \
         (commit `{}`, {}, {} cores, kernel {}, {}): \
         the generator's flood at its top rate, one continuous flood per frame size, measured in \
         slices of {seconds} s. Each run below has {repetitions} slices, one per repetition, the runs \
         in turn (their order rotated each repetition), and every slice of a run lies between two \
         slices with nothing capturing. *Rate loss* is how much slower the generator sent in the \
         run's slice than the mean of those two (the capturers' work runs in softirq on the sending \
         CPU, so what they cost per packet slows the sender), the median over the repetitions; \
         *capturer CPU* is the capturer's process CPU time (user + system) per offered packet. \
         A capturer starts before its slice and stops after it: what starting costs is not measured. \
         OTHER is {OTHER_IP}, which no packet of the flood names. The agent's ring and tcpdump's \
         buffer are {RING_MB} MiB each.\n\n{}\n\n{}\n\n{END}\n",
        env.commit,
        env.cpu_model,
        env.cores,
        env.kernel,
        env.date,
        rows.join("\n"),
        judged.join("\n"),
        seconds = args.seconds,
        repetitions = args.repetitions,
    )
}

/// The lines of targets 4b to 4d, from a full run.
fn targets(slices: &[Slice]) -> Vec<String> {
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let loss = |size, kind| rate_loss(slices, size, kind);
    let (_, kernel_cpu, _) = medians(slices, Kind::AgentRejecting, REJECTED_SIZE);
    let (_, user_cpu, _) = medians(slices, Kind::AgentRejectingInUserSpace, REJECTED_SIZE);
    let (kernel_cpu, user_cpu) = (kernel_cpu.unwrap_or(0.0), user_cpu.unwrap_or(0.0));
    let share = 100.0 * kernel_cpu / user_cpu.max(f64::MIN_POSITIVE);
    let (agent_loss, tcpdump_loss) = (
        loss(REJECTED_SIZE, Kind::AgentRejecting),
        loss(REJECTED_SIZE, Kind::TcpdumpRejecting),
    );
    let (less, pairs) = paired(
        slices,
        REJECTED_SIZE,
        Kind::AgentRejecting,
        Kind::TcpdumpRejecting,
    );
    let mut targets = vec![format!(
        "- **4b** A filter that rejects the whole flood (`{REJECTING_FILTER}` on {REJECTED_SIZE}-byte frames): the agent's process CPU per offered packet is {kernel_cpu:.1} ns with the filter in the kernel, {user_cpu:.1} ns in user space: {share:.1}% (target < 5%: {}); rate loss {agent_loss:.1}% against tcpdump's {tcpdump_loss:.1}% with the same expression (target ≤: {}; no more than tcpdump's in {less} of {pairs} repetitions).",
        verdict(share < 5.0),
        verdict(agent_loss <= tcpdump_loss),
    )];
    for size in SIZES {
        let (agent, tcpdump) = (loss(size, Kind::AgentOther), loss(size, Kind::TcpdumpOther));
        let (less, pairs) = paired(slices, size, Kind::AgentOther, Kind::TcpdumpOther);
        targets.push(format!(
            "- **4c** Traffic no capture selects ({size} B; a capture of another host runs): rate loss {agent:.1}% against tcpdump's {tcpdump:.1}% with `host OTHER` (target ≤: {}; no more than tcpdump's in {less} of {pairs} repetitions).",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(kind: Kind, repetition: usize, loss: f64) -> Slice {
        Slice {
            kind,
            size: REJECTED_SIZE,
            repetition,
            pps: 100.0 - loss,
            sent: 1000,
            capturer_cpu: Some(1e-6),
            softirq: 0.0,
            loss: Some(loss),
        }
    }

    #[test]
    fn losses_are_medians_and_pairs_are_of_one_repetition() {
        let slices = [
            slice(Kind::AgentOther, 1, 3.0),
            slice(Kind::TcpdumpOther, 1, 5.0),
            slice(Kind::AgentOther, 2, 9.0),
            slice(Kind::TcpdumpOther, 2, 1.0),
            slice(Kind::AgentOther, 3, 2.0),
            slice(Kind::TcpdumpOther, 3, 2.0),
            // A repetition tcpdump has no slice in is no pair.
            slice(Kind::AgentOther, 4, 0.0),
        ];
        assert_eq!(rate_loss(&slices, REJECTED_SIZE, Kind::AgentOther), 3.0);
        assert_eq!(rate_loss(&slices, REJECTED_SIZE, Kind::TcpdumpOther), 2.0);
        assert_eq!(rate_loss(&slices, 60, Kind::AgentOther), 0.0);
        assert_eq!(
            paired(&slices, REJECTED_SIZE, Kind::AgentOther, Kind::TcpdumpOther),
            (2, 3)
        );
        let (_, cpu, _) = medians(&slices, Kind::AgentOther, REJECTED_SIZE);
        assert_eq!(cpu, Some(1.0));
    }
}
