//! `cargo xtask bench`: the agent against tcpdump on the same traffic.
//!
//! Two network namespaces joined by veth; a generator in the sender sends
//! numbered UDP frames to a socket in the receiver that never reads; on the
//! receiver's veth (ingress) nothing, tcpdump, the agent, or both capture
//! them. Each run counts what was offered (the interface's counters and the
//! generator's), what each capturer wrote (distinct sequence numbers in its
//! file), what it says it lost, and what it cost. `docs/benchmarks.md`
//! describes the method and holds a full run's results.

mod capture;
mod compress;
pub mod controller;
mod filters;
mod generator;
mod pcapfile;
mod procstat;
mod report;
mod stand_in;
mod tcp;
mod topology;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::util::{cargo, cargo_build, root, step};
use capture::{Agent, AgentCapture, AgentSettings, Ended, Tcpdump};
pub use generator::Rate;
use generator::{Sent, Until};
use procstat::SystemCpu;
use topology::{SENDER_IP, Topology, UDP_PORT};

/// What follows this line in the report is kept when it is written again.
const NOTES_MARKER: &str = "<!-- notes: kept when cargo xtask bench writes this file again -->";

/// Snaplen of both capturers: tcpdump's default, and the agent's.
pub const SNAPLEN: u32 = 262_144;

/// `cargo xtask bench [controller]`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    capture: Args,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// The controller driving one capture on many nodes of the local
    /// control plane, each running the real agent (as root).
    Controller(controller::Args),
    /// What capturing costs for the packets it does not keep (a rejecting
    /// filter, another host's capture, no capture), against tcpdump.
    Filters(filters::Args),
}

/// Runs the benchmark the command line asks for.
pub fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.what {
        Some(What::Controller(args)) => controller::run_cli(args),
        Some(What::Filters(args)) => filters::run_cli(args),
        None => run_cli(cli.capture),
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write the report (Markdown) here; the plots go beside it as
    /// bench-*.png.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A tiny scale: one paced rate and "max", both sizes, 1 s per run,
    /// one repetition.
    #[arg(long)]
    quick: bool,
    /// Seconds per run (default 10).
    #[arg(long, value_parser = at_least_one::<u64>())]
    seconds: Option<u64>,
    /// Repetitions of each run (default 3); the report shows medians.
    #[arg(long, value_parser = at_least_one::<usize>())]
    repetitions: Option<usize>,
    /// The agent binary; by default `cargo build --release -p
    /// packet-capture-agent` builds it.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Only these rates (frames/s, or `max`), e.g. `--rates 300000,max`.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    rates: Option<Vec<Rate>>,
    /// Only these frame sizes in bytes, e.g. `--sizes 1442`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(60..=1514))]
    sizes: Option<Vec<u16>>,
    /// Only these modes: none, tcpdump, agent, both.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    modes: Option<Vec<Mode>>,
    /// Skip the TCP bulk run and the compression timing.
    #[arg(long)]
    udp_only: bool,
    /// Read each agent capture's live packets (its REST stream, pcapng)
    /// while it runs, as `kubectl pcap stream` would, and count what the
    /// reader got.
    #[arg(long, conflicts_with = "from_json")]
    live_reader: bool,
    /// Run nothing: write the report (`--out`) again from the results a run
    /// saved (the `.json` beside its report).
    #[arg(long, requires = "out", conflicts_with_all = ["quick", "agent"])]
    from_json: Option<PathBuf>,
}

/// The parser of a count of seconds or repetitions, where zero would measure
/// nothing.
fn at_least_one<T>() -> clap::builder::RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
{
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    let pps = match s.strip_suffix('k') {
        Some(k) => k.parse::<u64>().map(|k| k * 1000),
        None => s.parse::<u64>(),
    };
    pps.ok()
        .filter(|&p| p > 0)
        .map(Rate::Pps)
        .ok_or_else(|| format!("{s:?} is not a rate (frames per second, 25k, or max)"))
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::ALL
        .into_iter()
        .find(|m| format!("{m:?}").eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("{s:?} is not a mode (none, tcpdump, agent, both)"))
}

/// What is captured in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    None,
    Tcpdump,
    Agent,
    Both,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::None, Mode::Tcpdump, Mode::Agent, Mode::Both];

    fn tcpdump(self) -> bool {
        matches!(self, Self::Tcpdump | Self::Both)
    }

    fn agent(self) -> bool {
        matches!(self, Self::Agent | Self::Both)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::None => "no capture",
            Self::Tcpdump => "tcpdump alone",
            Self::Agent => "agent alone",
            Self::Both => "both",
        }
    }
}

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub rates: Vec<Rate>,
    /// Frame sizes in bytes (without FCS).
    pub sizes: Vec<usize>,
    pub modes: Vec<Mode>,
    pub duration: Duration,
    pub repetitions: usize,
    pub agent: AgentSettings,
    /// tcpdump's `-B`, in KiB: the same memory as the agent's ring.
    pub tcpdump_buffer_kib: u32,
    /// The TCP bulk run, if any.
    pub tcp: Option<tcp::TcpConfig>,
    /// Time compressing a capture file the agent wrote.
    pub compression: bool,
    /// Where capture files go while a run is read back (tmpfs).
    pub work_dir: PathBuf,
}

impl Config {
    /// The full benchmark.
    pub fn full(agent: PathBuf) -> Self {
        Self {
            rates: vec![
                Rate::Pps(25_000),
                Rate::Pps(50_000),
                Rate::Pps(100_000),
                Rate::Pps(200_000),
                Rate::Pps(300_000),
                Rate::Max,
            ],
            sizes: vec![60, 1442],
            modes: Mode::ALL.to_vec(),
            duration: Duration::from_secs(10),
            repetitions: 3,
            agent: AgentSettings {
                binary: agent,
                ring_mb: 2,
                filters_in_user_space: false,
                live_reader: false,
            },
            tcpdump_buffer_kib: 2048,
            tcp: Some(tcp::TcpConfig::default()),
            compression: true,
            work_dir: default_work_dir(),
        }
    }

    /// `--quick`: one paced rate and "max", both sizes, 1 s, one repetition.
    pub fn quick(agent: PathBuf) -> Self {
        Self {
            rates: vec![Rate::Pps(50_000), Rate::Max],
            duration: Duration::from_secs(1),
            repetitions: 1,
            tcp: Some(tcp::TcpConfig {
                seconds: 1,
                ..Default::default()
            }),
            ..Self::full(agent)
        }
    }
}

fn default_work_dir() -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/packet-capture-bench-{}",
        std::process::id()
    ))
}

/// One capturer's results in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Distinct sequence numbers in its file.
    pub captured: u64,
    /// Records of the flow in its file.
    pub records: u64,
    /// Packets it says it wrote.
    pub reported_packets: u64,
    /// Packets it says it lost.
    pub reported_drops: u64,
    /// Offered minus captured.
    pub real_drops: i64,
    /// Its CPU seconds (user + system) over the run.
    pub cpu: f64,
    pub peak_rss: u64,
    /// RSS at the end of the run.
    pub rss: u64,
    pub map_memory: u64,
    /// Of `peak_rss`, the BPF maps' pages mapped into the process (counted
    /// in `map_memory` too). Runs recorded before it was measured have 0.
    #[serde(default)]
    pub maps_in_rss: u64,
    pub file_bytes: u64,
    /// Distinct sequence numbers a live reader got (`--live-reader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed: Option<u64>,
    /// `tshark -r` read the file without complaint.
    pub valid: bool,
    /// What tshark said when it did not.
    pub problem: Option<String>,
}

impl Measured {
    /// Reported minus real drops.
    pub fn drop_error(&self) -> i64 {
        self.reported_drops as i64 - self.real_drops
    }
}

/// One run: a frame size, a rate, a mode, a repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub size: usize,
    pub rate: String,
    #[serde(skip)]
    pub rate_kind: Rate,
    pub mode: Mode,
    pub repetition: usize,
    /// Frames the generator sent.
    pub generated: u64,
    /// Frames the kernel refused to the generator.
    pub refused: u64,
    /// The generator's rate (frames per second sent).
    pub sender_pps: f64,
    /// The receiver interface's rx_packets over the run.
    pub offered: u64,
    pub rx_dropped: u64,
    /// System-wide busy CPU seconds over the run, and softirq among them.
    pub system_busy: f64,
    pub system_softirq: f64,
    /// Seconds from the first frame to the last capturer done.
    pub wall: f64,
    pub tcpdump: Option<Measured>,
    pub agent: Option<Measured>,
}

/// The machine and the software the numbers came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Environment {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub commit: String,
    pub command: String,
    pub date: String,
    pub tcpdump: String,
    pub iperf3: String,
    pub load_before: String,
    pub load_after: String,
    pub generator_cpu: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub environment: Environment,
    pub duration_secs: f64,
    pub repetitions: usize,
    pub ring_mb: u32,
    pub tcpdump_buffer_kib: u32,
    pub runs: Vec<Run>,
    pub tcp: Option<tcp::TcpResult>,
    pub compression: Vec<compress::Compressed>,
}

fn run_cli(args: Args) -> anyhow::Result<()> {
    if let Some(json) = &args.from_json {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let mut report: Report =
            serde_json::from_str(&text).with_context(|| format!("{}", json.display()))?;
        for run in &mut report.runs {
            run.rate_kind = parse_rate(&run.rate).map_err(anyhow::Error::msg)?;
        }
        return write_report(&report, args.out.as_deref());
    }
    let agent = match args.agent {
        Some(path) => path,
        None => build_agent()?,
    };
    let mut config = if args.quick {
        Config::quick(agent)
    } else {
        Config::full(agent)
    };
    if let Some(s) = args.seconds {
        config.duration = Duration::from_secs(s);
    }
    if let Some(r) = args.repetitions {
        config.repetitions = r;
    }
    if let Some(rates) = args.rates {
        config.rates = rates;
    }
    if let Some(sizes) = args.sizes {
        config.sizes = sizes.into_iter().map(usize::from).collect();
    }
    if let Some(modes) = args.modes {
        config.modes = modes;
    }
    config.agent.live_reader = args.live_reader;
    if args.udp_only {
        config.tcp = None;
        config.compression = false;
    }
    let command = std::iter::once("cargo xtask".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let report = run(&config, &command)?;
    write_report(&report, args.out.as_deref())
}

/// Writes the report, its plots and its results (JSON) beside `out`, or the
/// report to stdout.
fn write_report(report: &Report, out: Option<&Path>) -> anyhow::Result<()> {
    let Some(out) = out else {
        println!("{}", report::markdown(report, &[]));
        return Ok(());
    };
    let dir = out.parent().unwrap_or(Path::new("."));
    let plots = report::plots(report, dir)?;
    let mut text = report::markdown(report, &plots);
    // Notes written by hand below the marker survive a new run.
    if let Some(notes) = std::fs::read_to_string(out)
        .ok()
        .and_then(|old| old.find(NOTES_MARKER).map(|at| old[at..].to_owned()))
    {
        text.push('\n');
        text.push_str(&notes);
    }
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    let json = out.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    step(format!(
        "wrote {}, {} and {} plots",
        out.display(),
        json.display(),
        plots.len()
    ));
    println!("{}", report::targets_section(report));
    Ok(())
}

/// Builds the agent (`release`) and returns its path.
pub fn build_agent() -> anyhow::Result<PathBuf> {
    agent_executable(cargo().args([
        "build",
        "--release",
        "-p",
        "packet-capture-agent",
        "--bin",
        "packet-capture-agent",
    ]))
    .context("building the agent")
}

/// The agent's executable among what the cargo command `cmd` built (not
/// the test harness of its `main.rs`, which has the same target name).
fn agent_executable(cmd: &mut std::process::Command) -> anyhow::Result<PathBuf> {
    cargo_build(cmd)?
        .iter()
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["target"]["name"] == "packet-capture-agent"
                && m["profile"]["test"] == false
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not name the agent's executable")
}

/// Removes the work directory, whatever happens.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark and returns its results.
pub fn run(config: &Config, command: &str) -> anyhow::Result<Report> {
    let load_before = procstat::loadavg();
    // The commit as it is when the measurement starts.
    let started_env = environment();
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating {}", config.work_dir.display()))?;
    let work = WorkDir(config.work_dir.clone());
    let topo = Topology::new()?;
    let flow = topo.flow()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generator_cpu = cores - 1;
    let total = config.repetitions * config.sizes.len() * config.rates.len() * config.modes.len();
    let mut runs = Vec::with_capacity(total);
    let mut sample: Option<PathBuf> = None;
    let started = Instant::now();
    // Repetitions outermost, so that a passing disturbance touches one
    // repetition of many runs rather than every repetition of one.
    for repetition in 1..=config.repetitions {
        for &size in &config.sizes {
            for &rate in &config.rates {
                for &mode in &config.modes {
                    step(format!(
                        "[{}/{total}, {:.0}s] {size} B, {rate}, {}, repetition {repetition}",
                        runs.len() + 1,
                        started.elapsed().as_secs_f64(),
                        mode.label()
                    ));
                    // The agent's file of a paced run of the largest frames
                    // is kept to time compression on.
                    let keep = config.compression
                        && sample.is_none()
                        && mode == Mode::Agent
                        && Some(&size) == config.sizes.iter().max()
                        && rate != Rate::Max;
                    let (run, kept) = run_one(
                        config,
                        &topo,
                        &flow,
                        generator_cpu,
                        (size, rate, mode, repetition),
                        keep,
                    )?;
                    if kept.is_some() {
                        sample = kept;
                    }
                    log_run(&run);
                    runs.push(run);
                }
            }
        }
    }
    let tcp = match &config.tcp {
        Some(t) => Some(tcp::run(t, config, &topo)?),
        None => None,
    };
    let compression = match &sample {
        Some(path) => compress::measure(path)?,
        None => Vec::new(),
    };
    drop(topo);
    drop(work);
    let environment = Environment {
        load_before,
        load_after: procstat::loadavg(),
        command: command.to_owned(),
        generator_cpu,
        ..started_env
    };
    Ok(Report {
        environment,
        duration_secs: config.duration.as_secs_f64(),
        repetitions: config.repetitions,
        ring_mb: config.agent.ring_mb,
        tcpdump_buffer_kib: config.tcpdump_buffer_kib,
        runs,
        tcp,
        compression,
    })
}

fn log_run(run: &Run) {
    let describe = |name: &str, m: &Option<Measured>| {
        m.as_ref().map(|m| {
            let streamed = m
                .streamed
                .map(|s| format!(" streamed {s}"))
                .unwrap_or_default();
            format!(
                " {name}: captured {} real drops {} reported {} cpu {:.2}s{streamed}",
                m.captured, m.real_drops, m.reported_drops, m.cpu
            )
        })
    };
    step(format!(
        "   offered {} (generator {} at {:.0} pps), system busy {:.2}s{}{}",
        run.offered,
        run.generated,
        run.sender_pps,
        run.system_busy,
        describe("tcpdump", &run.tcpdump).unwrap_or_default(),
        describe("agent", &run.agent).unwrap_or_default(),
    ));
}

type RunKey = (usize, Rate, Mode, usize);

fn run_one(
    config: &Config,
    topo: &Topology,
    flow: &generator::Flow,
    generator_cpu: usize,
    (size, rate, mode, repetition): RunKey,
    keep_agent_file: bool,
) -> anyhow::Result<(Run, Option<PathBuf>)> {
    let dir = config
        .work_dir
        .join(format!("{size}-{rate}-{mode:?}-{repetition}"));
    std::fs::create_dir_all(&dir)?;
    let mut agent = if mode.agent() {
        let mut a = Agent::start(&topo.receiver, &config.agent, &dir.join("agent"))?;
        a.start_capture(&AgentCapture {
            target_ip: SENDER_IP.to_string(),
            port: Some(UDP_PORT),
            filter: String::new(),
            snaplen: SNAPLEN,
            duration_secs: config.duration.as_secs() + 600,
        })?;
        Some(a)
    } else {
        None
    };
    let mut tcpdump = if mode.tcpdump() {
        Some(Tcpdump::start(
            &topo.receiver,
            &topo.receiver_if,
            &format!("udp port {UDP_PORT}"),
            SNAPLEN,
            config.tcpdump_buffer_kib,
            &dir.join("tcpdump.pcap"),
        )?)
    } else {
        None
    };
    let before = topo.receiver_counters()?;
    if let Some(a) = agent.as_mut() {
        a.mark()?;
    }
    if let Some(t) = tcpdump.as_mut() {
        t.mark()?;
    }
    let cpu_before = SystemCpu::read()?;
    let start = Instant::now();
    let sent: Sent = topology::in_netns(&topo.sender, || {
        generator::send(
            flow,
            size,
            rate,
            Until::Elapsed(config.duration),
            generator_cpu,
        )
    })??;
    let after = topo.receiver_counters()?;
    let agent_end = agent.map(Agent::finish).transpose()?;
    let tcpdump_end = tcpdump.map(Tcpdump::finish).transpose()?;
    let system = SystemCpu::read()?.since(cpu_before);
    let wall = start.elapsed().as_secs_f64();
    let offered = after.rx_packets - before.rx_packets;
    let measure = |end: &Ended| measure(end, offered, sent.packets + sent.refused);
    let mut kept = None;
    let agent_measured = match &agent_end {
        Some(end) => {
            let m = measure(end)?;
            if keep_agent_file {
                let target = config.work_dir.join("compression-sample.pcap");
                std::fs::rename(&end.file, &target)?;
                kept = Some(target);
            }
            Some(m)
        }
        None => None,
    };
    let tcpdump_measured = tcpdump_end.as_ref().map(measure).transpose()?;
    std::fs::remove_dir_all(&dir)?;
    Ok((
        Run {
            size,
            rate: rate.to_string(),
            rate_kind: rate,
            mode,
            repetition,
            generated: sent.packets,
            refused: sent.refused,
            sender_pps: sent.pps(),
            offered,
            rx_dropped: after.rx_dropped - before.rx_dropped,
            system_busy: system.busy,
            system_softirq: system.softirq,
            wall,
            tcpdump: tcpdump_measured,
            agent: agent_measured,
        },
        kept,
    ))
}

/// Reads back what a capturer wrote: distinct sequence numbers (and tshark's
/// verdict, in parallel).
fn measure(end: &Ended, offered: u64, numbers: u64) -> anyhow::Result<Measured> {
    let tshark = tshark_reading(&end.file)?;
    let seq = pcapfile::sequences(&end.file, UDP_PORT, numbers)?;
    let (valid, problem) = tshark_verdict(tshark)?;
    let file_bytes = std::fs::metadata(&end.file)?.len();
    let streamed = match &end.streamed {
        Some(file) => Some(pcapfile::sequences(file, UDP_PORT, numbers)?.unique),
        None => None,
    };
    Ok(Measured {
        captured: seq.unique,
        records: seq.records,
        reported_packets: end.packets,
        reported_drops: end.dropped,
        real_drops: offered as i64 - seq.unique as i64,
        cpu: end.cpu,
        peak_rss: end.memory.peak_rss,
        rss: end.memory.rss,
        map_memory: end.memory.map_memory,
        maps_in_rss: end.memory.maps_in_rss,
        file_bytes,
        streamed,
        valid,
        problem,
    })
}

/// Starts `tshark -r <file>`, which reads it while the caller does other
/// work; [`tshark_verdict`] waits for its answer.
pub fn tshark_reading(file: &Path) -> anyhow::Result<std::process::Child> {
    Command::new("tshark")
        .args(["-n", "-q", "-r"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tshark")
}

/// Waits for `tshark -r`: valid when it exits 0 and says nothing but its
/// warning about running as root.
pub fn tshark_verdict(child: std::process::Child) -> anyhow::Result<(bool, Option<String>)> {
    let out = child.wait_with_output().context("waiting for tshark")?;
    let said: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("could be dangerous") && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let valid = out.status.success() && said.is_empty();
    Ok((valid, (!said.is_empty()).then(|| said.join(" "))))
}

fn environment() -> Environment {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let run = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .current_dir(root())
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    let mut commit = run("git", &["rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root())
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        commit.push_str(" (with uncommitted changes)");
    }
    Environment {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib,
        kernel: run("uname", &["-r"]),
        commit,
        date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        tcpdump: run("tcpdump", &["--version"]),
        iperf3: run("iperf3", &["--version"]),
        ..Default::default()
    }
}

/// Puts `section` in place of the report's section between the markers
/// (appended when it has none).
pub(super) fn replace_section(
    out: &Path,
    (begin, end): &(String, String),
    section: &str,
) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let new = match (old.find(begin.as_str()), old.find(end.as_str())) {
        (Some(a), Some(b)) if a < b => {
            let rest = old[b + end.len()..].trim_start_matches('\n');
            let gap = if rest.is_empty() { "" } else { "\n" };
            format!("{}{section}{gap}{rest}", &old[..a])
        }
        _ => format!("{old}\n{section}"),
    };
    std::fs::write(out, new).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `make test` runs the harness once at a tiny scale: one rate, one
    /// frame size, 1 s, one repetition, all four modes. A smoke check of
    /// the harness, not of timings.
    #[test]
    fn the_harness_runs_at_a_tiny_scale() {
        if !packet_capture_test_support::privileged("the_harness_runs_at_a_tiny_scale") {
            return;
        }
        // The agent as `cargo test --workspace` builds it: inside `make test`
        // that is done already, where `cargo build -p packet-capture-agent`
        // would compile its dependencies again, with other features.
        let agent = agent_executable(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "packet-capture-ebpf",
            "--no-run",
        ]))
        .expect("building the agent");
        let config = Config {
            rates: vec![Rate::Pps(5_000)],
            sizes: vec![200],
            duration: Duration::from_secs(1),
            repetitions: 1,
            tcp: None,
            compression: true,
            ..Config::full(agent)
        };
        let report = run(&config, "test").expect("the benchmark runs");
        assert_eq!(report.runs.len(), 4, "one run per mode");
        for run in &report.runs {
            assert!(run.offered > 0, "{run:?}");
            assert!(run.generated >= run.offered, "{run:?}");
            assert_eq!(run.tcpdump.is_some(), run.mode.tcpdump(), "{run:?}");
            assert_eq!(run.agent.is_some(), run.mode.agent(), "{run:?}");
            for m in run.tcpdump.iter().chain(&run.agent) {
                assert!(m.captured <= run.offered, "{run:?}");
                assert!(m.captured > 0, "{run:?}");
                assert!(m.valid, "tshark: {:?}", m.problem);
            }
            if let Some(a) = &run.agent {
                assert_eq!(
                    a.drop_error(),
                    0,
                    "the agent's drops are the real ones: {run:?}"
                );
                assert_eq!(a.reported_packets, a.records, "{run:?}");
                assert!(a.map_memory > 0 && a.peak_rss > 0, "{run:?}");
            }
        }
        assert_eq!(report.compression.len(), 2, "gzip and zstd timed");
        let plot_dir = std::env::temp_dir().join(format!("bench-plots-{}", std::process::id()));
        let plots = report::plots(&report, &plot_dir).expect("plots");
        let text = report::markdown(&report, &plots);
        for plot in &plots {
            let png = std::fs::read(plot_dir.join(plot)).expect("the plot exists");
            assert!(png.starts_with(b"\x89PNG"), "{plot} is a PNG");
        }
        let _ = std::fs::remove_dir_all(&plot_dir);
        for needle in ["| 200 B", "tcpdump alone", "agent alone", "Targets"] {
            assert!(
                text.contains(needle),
                "{needle:?} missing from the report:\n{text}"
            );
        }
    }
}
