//! `cargo xtask bench controller`: the controller driving one capture on
//! many nodes of the local control plane: simulated nodes each running the
//! real agent, or (`--stand-ins N`) thousands of nodes whose agents are
//! stand-ins (see `stand_in`), to load the controller alone.
//!
//! A CIDR capture of the nodes' network goes to every node at once. The
//! run measures, from the apply on: when every node runs (as the status
//! says), each node's start (the agent's "capture started" log line, or the
//! stand-in's record), when the capture has completed; what the controller
//! wrote (status changes seen on a watch of the object, their largest
//! size, Events, requests the API server refused) and what it cost (CPU
//! seconds, peak RSS); and that no node started the generation twice, also
//! across a controller restart (`--restart`: killed once every node runs,
//! started again). `--out docs/benchmarks.md` replaces the report's section
//! for the kind of run.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::{PacketCaptureConfig, PacketCaptureConfigSpec, Phase};
use packet_capture_test_support::cluster::{
    AgentOptions, COMPONENT_NAMESPACE, Cluster, ClusterProcess, Lifetime, SimAgent,
};
use serde_json::json;

use super::stand_in::{self, StandIns};
use super::{procstat, replace_section};
use crate::cluster::up;
use crate::demo::{self, relative};
use crate::util::step;

/// The targets of the controller issue, for the report.
const RUNNING_WITHIN: Duration = Duration::from_secs(2);
const STAND_INS_RUNNING_WITHIN: Duration = Duration::from_secs(30);
const STAND_INS_PEAK_RSS: u64 = 512 << 20;

/// API requests in flight while the stand-ins' nodes and pods are made.
const MAKING_AT_ONCE: usize = 32;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated nodes, each with the real agent.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Instead: this many nodes whose agents are stand-ins (a load
    /// generator for the controller; no real agent, no traffic).
    #[arg(long)]
    stand_ins: Option<usize>,
    /// Kill the controller once every node runs and start it again.
    #[arg(long)]
    restart: bool,
    /// The controller's bound on agent calls in flight (its
    /// `--agent-concurrency`).
    #[arg(long, default_value_t = 64)]
    agent_concurrency: u16,
    /// Seconds the capture runs.
    #[arg(long, default_value_t = 20)]
    duration: u32,
    /// Replace this run's section of this report (docs/benchmarks.md).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Args {
    fn nodes(&self) -> usize {
        self.stand_ins.unwrap_or(self.nodes)
    }

    /// The report section's markers.
    fn markers(&self) -> (String, String) {
        let kind = if self.stand_ins.is_some() {
            "stand-ins"
        } else {
            "agents"
        };
        (
            format!("<!-- controller {kind}: written by cargo xtask bench controller -->"),
            format!("<!-- /controller {kind} -->"),
        )
    }
}

/// The nodes' agents.
enum Agents {
    Real(Vec<SimAgent>),
    StandIns(StandIns),
}

/// What one run measured.
#[derive(Debug)]
pub struct Measured {
    pub nodes: usize,
    /// From the apply until the status says every node runs.
    pub all_running: Duration,
    /// From the apply until each node's agent started (sorted).
    pub starts: Vec<Duration>,
    /// From the apply until the phase is Completed.
    pub completed: Duration,
    /// Status changes seen on a watch of the object, in all and while
    /// every node ran.
    pub status_writes: usize,
    pub running_writes: usize,
    pub running_for: Duration,
    pub events: usize,
    /// The largest status seen, as JSON.
    pub status_bytes: usize,
    pub controller_cpu: f64,
    pub controller_peak_rss: u64,
    /// Nodes whose agent started the capture more than once.
    pub started_twice: usize,
    /// Requests of the controller the API server refused for their size.
    pub refused_for_size: usize,
    /// Whether the controller was killed and started again mid-capture.
    pub restarted: bool,
}

impl Measured {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.starts.len() as f64 - 1.0) * p).round() as usize;
        self.starts.get(i).copied().unwrap_or_default()
    }
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    ensure!(args.nodes() > 0, "--nodes, --stand-ins: at least one");
    let binaries = demo::build(true)?;
    // A socket per stand-in, and one per agent in the controller.
    raise_open_files()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let measured = runtime.block_on(run(&binaries, &args))?;
    let section = markdown(&measured, &args);
    println!("{section}");
    if let Some(out) = &args.out {
        replace_section(out, &args.markers(), &section)?;
        step(format!("wrote the controller section of {}", out.display()));
    }
    Ok(())
}

fn raise_open_files() -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit"
        );
        limit.rlim_cur = limit.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
            "setrlimit"
        );
    }
    Ok(())
}

async fn run(binaries: &demo::Binaries, args: &Args) -> anyhow::Result<Measured> {
    let n = args.nodes();
    let sim_nodes = if args.stand_ins.is_some() { 0 } else { n };
    let running = up("bench-controller", Lifetime::Process, sim_nodes, 0, 0).await?;
    let cluster = &running.cluster;
    demo::install(cluster, false).await?;
    let client = cluster.client()?;
    let (agents, cidr, mut extra) = match args.stand_ins {
        None => {
            step(format!("an agent on each of the {n} nodes"));
            let options = AgentOptions::new(&binaries.agent);
            let mut agents = Vec::new();
            for node in &running.nodes {
                agents.push(node.launch_agent(&options).await?);
            }
            let first = running.nodes[0].ip().octets();
            // The node network: an address of no pod or node alone, so
            // every node with an agent captures.
            let cidr = format!("{}.{}.0.0/16", first[0], first[1]);
            (Agents::Real(agents), cidr, Vec::new())
        }
        Some(count) => {
            let port = free_loopback_port()?;
            let stand_ins = StandIns::default();
            stand_ins.serve(count, port).await?;
            step(format!(
                "{count} stand-in agents on 127.1.0.0/16 port {port}; their nodes and pods"
            ));
            make_stand_in_objects(&client, count).await?;
            let extra = vec![
                "--insecure-agent-plaintext".to_string(),
                "--agent-port".into(),
                port.to_string(),
            ];
            (
                Agents::StandIns(stand_ins),
                "127.1.0.0/16".to_string(),
                extra,
            )
        }
    };
    extra.extend([
        "--agent-concurrency".to_string(),
        args.agent_concurrency.to_string(),
    ]);
    let mut controller = start_controller(cluster, binaries, &extra).await?;
    let mut agents = agents;
    if let Agents::Real(agents) = &mut agents {
        for agent in agents {
            agent.until_serving().await?;
        }
    }
    step("every agent serves");

    let api: Api<PacketCaptureConfig> = Api::all(client.clone());
    let spec = PacketCaptureConfigSpec {
        target_ips: vec![cidr],
        duration: args.duration,
        max_packets: 10_000_000,
        ..Default::default()
    };
    let name = "bench-controller";
    let watch = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    );
    let mut changes = Box::pin(watch);
    // The watch is open before the capture exists: it sees every change.
    let applied_at = SystemTime::now();
    let applied = Instant::now();
    let created = api
        .create(
            &PostParams::default(),
            &PacketCaptureConfig::new(name, spec),
        )
        .await
        .context("creating the capture")?;
    step(format!(
        "applied a capture of {} on {n} nodes for {}s",
        created.spec.target_ips[0], args.duration
    ));

    let mut last_status = None;
    let (mut writes, mut running_writes, mut status_bytes) = (0, 0, 0);
    let (mut all_running, mut running_since) = (None, None);
    let mut cpu = 0.0;
    let mut peak_rss = 0;
    let mut refused_for_size = 0;
    let mut restarted = false;
    let deadline = Duration::from_secs(u64::from(args.duration) + 600);
    let completed = loop {
        let event =
            tokio::time::timeout(deadline.saturating_sub(applied.elapsed()), changes.next())
                .await
                .context("the capture did not end in time")?
                .context("the watch ended")??;
        let watcher::Event::Apply(pcc) = event else {
            continue;
        };
        let Some(status) = pcc.status.clone() else {
            continue;
        };
        if last_status.as_ref() == Some(&status) {
            continue;
        }
        writes += 1;
        status_bytes = status_bytes.max(serde_json::to_vec(&status)?.len());
        let every_node_runs = status.node_states.get("running") == Some(&(n as u32));
        if every_node_runs {
            running_writes += 1;
            all_running.get_or_insert(applied.elapsed());
            running_since.get_or_insert(Instant::now());
            if args.restart && !restarted {
                step("every node runs: killing the controller and starting it again");
                (cpu, peak_rss, refused_for_size) = account(&mut controller, true)?;
                controller = start_controller(cluster, binaries, &extra).await?;
                restarted = true;
            }
        }
        if status.phase == Some(Phase::Failed) {
            bail!("the capture failed: {:?}", status.message);
        }
        let done = status.phase == Some(Phase::Completed);
        last_status = Some(status);
        if done {
            break applied.elapsed();
        }
    };
    let all_running = all_running.context("the status never showed every node running")?;
    let running_for = running_since
        .map(|since| since.elapsed())
        .unwrap_or_default();

    let events: Api<Event> = Api::namespaced(client, "default");
    let uid = created.uid().unwrap_or_default();
    let events = events
        .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await?
        .items
        .len();
    let (last_cpu, last_rss, last_refused) = account(&mut controller, false)?;

    let creations = match &agents {
        Agents::Real(agents) => agents
            .iter()
            .map(|a| capture_starts(&a.log()))
            .collect::<Vec<_>>(),
        Agents::StandIns(stand_ins) => stand_ins.creations(&format!("{uid}-g1")),
    };
    ensure!(
        creations.len() == n && creations.iter().all(|c| !c.is_empty()),
        "{} of {n} nodes started the capture",
        creations.iter().filter(|c| !c.is_empty()).count()
    );
    let started_twice = creations.iter().filter(|c| c.len() > 1).count();
    let mut starts: Vec<Duration> = creations
        .iter()
        .map(|c| c[0].duration_since(applied_at).unwrap_or_default())
        .collect();
    starts.sort();
    Ok(Measured {
        nodes: n,
        all_running,
        starts,
        completed,
        status_writes: writes,
        running_writes,
        running_for,
        events,
        status_bytes,
        controller_cpu: cpu + last_cpu,
        controller_peak_rss: peak_rss.max(last_rss),
        started_twice,
        refused_for_size: refused_for_size + last_refused,
        restarted,
    })
}

async fn start_controller(
    cluster: &Cluster,
    binaries: &demo::Binaries,
    extra: &[String],
) -> anyhow::Result<ClusterProcess> {
    let mut cmd = demo::controller_command(cluster, &binaries.controller).await?;
    cmd.args(extra);
    let controller = cluster.start_process("controller", cmd)?;
    step(format!(
        "controller running (log {})",
        relative(controller.log_path())
    ));
    Ok(controller)
}

/// The controller's CPU seconds, peak RSS and requests refused for their
/// size so far; with `kill`, then kills it.
fn account(controller: &mut ClusterProcess, kill: bool) -> anyhow::Result<(f64, u64, usize)> {
    let pid = controller.pid();
    let cpu = procstat::process_cpu(pid)?;
    let rss = procstat::peak_rss(pid)?;
    let refused = controller
        .log()
        .lines()
        // kube's API error names the code; a bare "413" is in timestamps.
        .filter(|l| l.contains("code: 413") || l.to_ascii_lowercase().contains("too large"))
        .count();
    if kill {
        controller.kill()?;
    }
    Ok((cpu, rss, refused))
}

fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((stand_in::address(0), 0))?;
    Ok(listener.local_addr()?.port())
}

/// A Node and an agent Pod (host network, Running and Ready) for each
/// stand-in.
async fn make_stand_in_objects(client: &Client, count: usize) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), COMPONENT_NAMESPACE);
    let made = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let (nodes, pods) = (nodes.clone(), pods.clone());
            async move {
                let name = format!("stand-in-{i:05}");
                let ip = stand_in::address(i).to_string();
                let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                nodes.create(&PostParams::default(), &node).await?;
                let addresses =
                    json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&addresses))
                    .await?;
                let pod_name = format!("agent-{name}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": pod_name, "labels": {"app": "packet-capture-agent"}},
                    "spec": {
                        "nodeName": name,
                        "hostNetwork": true,
                        "containers": [{"name": "agent", "image": "stand-in"}],
                    },
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                // Ready too: the controller starts captures on ready agents.
                let running = json!({"status": {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                }});
                pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&running))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(MAKING_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    step(format!(
        "{count} nodes and agent pods made in {:.1} s",
        made.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// When an agent's log says a capture started.
fn capture_starts(log: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains("capture started"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<Timestamp>().ok())
        .map(SystemTime::from)
        .collect()
}

fn markdown(m: &Measured, args: &Args) -> String {
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let per_second = m.running_writes as f64 / m.running_for.as_secs_f64().max(1.0);
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let (begin, end) = args.markers();
    let (what, command, running_within) = match args.stand_ins {
        None => (
            format!(
                "{} simulated nodes, each with the real agent (eBPF)",
                m.nodes
            ),
            format!("--nodes {}", m.nodes),
            RUNNING_WITHIN,
        ),
        Some(n) => (
            format!(
                "{n} nodes whose agents are stand-ins (one process answering the agent API on \
                 127.1.0.0/16 as agents would, capturing nothing: a load generator for the \
                 controller)"
            ),
            format!("--stand-ins {n}"),
            STAND_INS_RUNNING_WITHIN,
        ),
    };
    let restart = if args.restart { " --restart" } else { "" };
    let concurrency = args.agent_concurrency;
    let mut rows = vec![
        format!(
            "| apply → every node running (status) | {} (target ≤ {}: {}) |",
            secs(m.all_running),
            secs(running_within),
            verdict(m.all_running <= running_within)
        ),
        format!(
            "| apply → a node's capture started: p50 / p99 / max | {} / {} / {} |",
            secs(m.percentile(0.5)),
            secs(m.percentile(0.99)),
            secs(m.starts.last().copied().unwrap_or_default())
        ),
        format!("| apply → Completed | {} |", secs(m.completed)),
        format!(
            "| status writes per capture | {}, {} of them in the {} every node ran ({per_second:.2}/s; target ≤ 1/s plus transitions: {}) |",
            m.status_writes,
            m.running_writes,
            secs(m.running_for),
            verdict(per_second <= 1.0 + 2.0 / m.running_for.as_secs_f64().max(1.0))
        ),
        format!("| Events per capture | {} |", m.events),
        format!("| largest status | {} bytes |", m.status_bytes),
        format!(
            "| API requests refused for their size | {} |",
            m.refused_for_size
        ),
        format!("| controller CPU | {:.2} s |", m.controller_cpu),
        format!(
            "| controller peak RSS | {:.1} MiB{} |",
            m.controller_peak_rss as f64 / (1 << 20) as f64,
            if args.stand_ins.is_some() {
                format!(
                    " (target < 512 MiB: {})",
                    verdict(m.controller_peak_rss < STAND_INS_PEAK_RSS)
                )
            } else {
                String::new()
            }
        ),
        format!(
            "| nodes that started the generation twice{} | {} |",
            if m.restarted {
                ", across a controller restart once every node ran"
            } else {
                ""
            },
            m.started_twice
        ),
    ];
    rows.insert(0, "| measure | value |\n|---|---|".to_string());
    format!(
        "{begin}\n## Controller: {nodes} nodes{kind}\n\n\
         `cargo xtask bench controller {command}{restart} --duration {duration} \
         --agent-concurrency {concurrency}` on the local control plane: {what}; one capture of \
         the nodes' network (a CIDR: every node) for {duration} s, created with the API. The \
         controller calls at most {concurrency} agents at once, stops and reads before starts: \
         the spread of the start times is that queue.\n\n{rows}\n\n{end}\n",
        nodes = m.nodes,
        kind = if args.stand_ins.is_some() {
            " (stand-ins)"
        } else {
            ""
        },
        duration = args.duration,
        rows = rows.join("\n"),
    )
}
