//! What one reconcile does, decided without calling anyone: from the
//! resource, its targets and the agents as the caches show them, the
//! tracker's nodes and the previous status, which captures to start, stop,
//! adopt or forget, and which nodes fail. `act` carries the plan out and
//! `report` writes what came of it.
//!
//! Capture ids are derived from the uid and the generation, so a repeated
//! reconcile or a restarted controller plans the same starts, and the
//! agents' idempotent StartCapture makes them harmless. A node's targets
//! follow its pods in place (SetTargets), without a new capture.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use packet_capture_common::crd::{
    CaptureState, PacketCaptureConfig, PacketCaptureConfigSpec, PacketCaptureConfigStatus, Phase,
    STOP_REQUESTED, STOPPED_BY_REQUEST, stopped_generation,
};
use packet_capture_common::validate::parse_target;

use crate::agents::AgentEndpoint;
use crate::error::{Error, Result};
use crate::node::NodeProgress;
use crate::status::{self, Outcome};
use crate::targets::{SelectedPod, Targets};

/// How long to wait for news when no deadline is known or it has passed.
const IDLE_REQUEUE: Duration = Duration::from_secs(30);

/// The `PacketCaptureConfig` being reconciled, with its uid and generation.
#[derive(Debug, Clone, Copy)]
pub struct Resource<'a> {
    pub pcc: &'a PacketCaptureConfig,
    pub uid: &'a str,
    pub generation: i64,
}

impl<'a> Resource<'a> {
    pub fn new(pcc: &'a PacketCaptureConfig) -> Result<Self> {
        let uid = pcc.metadata.uid.as_deref().ok_or(Error::MissingField {
            kind: "PacketCaptureConfig",
            field: "metadata.uid",
        })?;
        Ok(Self {
            pcc,
            uid,
            generation: pcc.metadata.generation.unwrap_or_default(),
        })
    }

    pub fn name(&self) -> String {
        self.pcc.name_any()
    }

    pub fn spec(&self) -> &'a PacketCaptureConfigSpec {
        &self.pcc.spec
    }

    /// The status as the resource carries it (of any generation).
    pub fn previous(&self) -> Option<&'a PacketCaptureConfigStatus> {
        self.pcc.status.as_ref()
    }

    /// The status, if it describes this generation.
    pub fn same_generation(&self) -> Option<&'a PacketCaptureConfigStatus> {
        status::same_generation(self.previous(), self.generation)
    }

    /// Whether someone asked for this generation to end now
    /// ([`STOP_REQUESTED`], not one left from an earlier generation: see
    /// [`Self::stale_stop`]).
    pub fn stop_requested(&self) -> bool {
        self.pcc.annotations().contains_key(STOP_REQUESTED) && self.stale_stop().is_none()
    }

    /// The value of a stop annotation that predates this generation (it
    /// stopped an earlier one, and a spec change starts over): one that
    /// names an earlier generation, as `kubectl pcap stop` writes it, or
    /// one that names none (set by hand) while the status still describes
    /// an earlier generation, so it was there before the controller took
    /// this one up. It is removed, so it stays stale once this generation's
    /// status is written.
    pub fn stale_stop(&self) -> Option<&'a str> {
        let pcc: &'a PacketCaptureConfig = self.pcc;
        let value = pcc.annotations().get(STOP_REQUESTED)?;
        let stale = match stopped_generation(value) {
            Some(stopped) => stopped < self.generation,
            None => self.previous().is_some() && self.same_generation().is_none(),
        };
        stale.then_some(value.as_str())
    }
}

/// The agent capture id of a generation on a node, so a restart or a
/// repeated reconcile asks for the same capture. New targets on a node do
/// not make a new capture: its targets change in place (SetTargets).
pub fn capture_id(uid: &str, generation: i64) -> String {
    format!("{uid}-g{generation}")
}

/// The names of `pods`, as a node's progress lists them.
fn names(pods: &[SelectedPod]) -> Vec<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// Whether two target lists select the same addresses (the agent spells a
/// single address without its prefix length, and IPv6 canonically).
fn same_targets(a: &[String], b: &[String]) -> bool {
    let set = |l: &[String]| -> BTreeSet<String> {
        l.iter()
            .map(|t| parse_target(t).map_or_else(|_| t.clone(), |n| n.to_string()))
            .collect()
    };
    set(a) == set(b)
}

/// The prefix of every capture id of a `PacketCaptureConfig`.
pub fn capture_prefix(uid: &str) -> String {
    format!("{uid}-g")
}

/// Whether `status` counts nodes that neither its `captureFiles` nor
/// `known` (the tracker's nodes) name: beyond `MAX_STATUS_NODES` it lists
/// only the nodes that need attention, so after a controller restart the
/// others are known only to their agents, and every agent must be asked.
pub fn unnamed_nodes<'a>(
    status: &'a PacketCaptureConfigStatus,
    known: impl IntoIterator<Item = &'a str>,
) -> bool {
    let mut named: BTreeSet<&str> = known.into_iter().collect();
    named.extend(status.capture_files.values().map(|e| e.node.as_str()));
    status.nodes.is_some_and(|n| n as usize > named.len())
}

/// Whether the generation's node captures must be looked for on every
/// agent (ListCaptures) before it is planned: it has not ended and its
/// status counts nodes that neither the status nor the tracker names.
pub fn must_list(resource: &Resource, tracked: &BTreeMap<String, NodeProgress>) -> bool {
    resource.same_generation().is_some_and(|s| {
        !s.phase.is_some_and(Phase::is_final)
            && unnamed_nodes(s, tracked.keys().map(String::as_str))
    })
}

/// Whether the generation has started: nodes in the tracker, or in its
/// status (which may count nodes it does not list).
fn started(
    tracked: &BTreeMap<String, NodeProgress>,
    same: Option<&PacketCaptureConfigStatus>,
) -> bool {
    !tracked.is_empty()
        || same.is_some_and(|s| !s.capture_files.is_empty() || s.nodes.unwrap_or(0) > 0)
}

/// Whether every node the generation has had only waited for its agent,
/// which is no start: none ran, and the status has no start time.
fn only_waited(
    tracked: &BTreeMap<String, NodeProgress>,
    same: Option<&PacketCaptureConfigStatus>,
) -> bool {
    !tracked.is_empty()
        && tracked.values().all(|p| p.waiting_since.is_some())
        && same.is_none_or(|s| s.start_time.is_none())
}

/// A node whose agent is gone: its capture can neither be stopped nor
/// followed, so how it ended is unknown.
fn gone(mut p: NodeProgress, now: Timestamp) -> NodeProgress {
    let message = format!(
        "the agent on node {} went away before the capture ended (its pod is gone or not running)",
        p.node
    );
    p.fail(message, true, now);
    p
}

/// A node stopped by request (the stop annotation).
fn stopped(mut p: NodeProgress, now: Timestamp) -> NodeProgress {
    p.state = CaptureState::Stopped;
    p.message = Some(STOPPED_BY_REQUEST.into());
    p.end_time = Some(now);
    p
}

/// What a plan is made from.
pub struct Inputs<'a> {
    pub resource: Resource<'a>,
    /// Each node's targets, and the target pods that could not be resolved.
    pub targets: &'a Targets,
    /// The running agents, by node.
    pub agents: &'a BTreeMap<String, AgentEndpoint>,
    /// The nodes whose agent is on its way but cannot take a capture yet,
    /// with why ([`AgentPool::unready`](crate::agents::AgentPool::unready)):
    /// a new node capture there waits for it, up to `agent_wait`.
    pub unready: &'a BTreeMap<String, String>,
    /// The address that keys each target node's status entry.
    pub node_ips: &'a BTreeMap<String, String>,
    /// The tracker's nodes of this generation.
    pub tracked: &'a BTreeMap<String, NodeProgress>,
    /// The tracker's nodes of earlier generations.
    pub earlier: &'a [NodeProgress],
    /// Where agents are looked for, for "no agent" messages.
    pub no_agent: &'a str,
    /// How long after `startTime + duration` an unfinished node fails.
    pub grace: Duration,
    /// How long a node waits for its agent to be ready (and no longer than
    /// the capture's duration, once it runs elsewhere).
    pub agent_wait: Duration,
    pub now: Timestamp,
}

/// A node where every capture of the resource is to be stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clear {
    pub node: String,
    pub endpoint: Option<AgentEndpoint>,
}

/// A running node capture whose targets change, in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Retarget {
    pub progress: NodeProgress,
    pub endpoint: AgentEndpoint,
    /// What it selects from now on; empty: nothing (its pods are gone).
    pub targets: Vec<String>,
    /// The target pods on the node now.
    pub pods: Vec<SelectedPod>,
}

/// An unfinished node capture that ran before a controller restart, on a
/// node that is no longer a target or past the deadline: followed as the
/// status has it, without a start, so its agent says how it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Adopt {
    pub progress: NodeProgress,
    pub endpoint: AgentEndpoint,
}

/// A node capture to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// The node, its address and capture id, `starting`.
    pub progress: NodeProgress,
    pub endpoint: AgentEndpoint,
    pub targets: Vec<String>,
    /// The target pods on the node.
    pub pods: Vec<SelectedPod>,
    /// Stop the resource's other captures on the node first (earlier
    /// generations, or captures started before a controller restart).
    pub sweep: bool,
    /// Seconds to capture.
    pub duration: u32,
}

/// The node work of a generation under way.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Run {
    pub retargets: Vec<Retarget>,
    /// The generation's first nodes, all `starting`: written to the status
    /// before the agents are called (their retries can take a while).
    pub starting: Option<BTreeMap<String, NodeProgress>>,
    /// Node outcomes known without asking an agent: adopted from the
    /// status, failed for want of an agent, or past the deadline.
    pub record: Vec<NodeProgress>,
    /// Unfinished nodes the status lists but the tracker does not follow
    /// (a controller restart), asked of their agents rather than guessed.
    pub adopts: Vec<Adopt>,
    pub starts: Vec<Start>,
    /// When to look again if no agent reports anything (the deadline).
    pub requeue: Duration,
}

/// What follows the clearing of earlier generations.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The status says this generation has ended: nothing to do.
    Ended(Phase),
    /// The generation fails before anything started (`PodNotFound`,
    /// `NoPodsSelected`, `NoAgents`).
    Fail(Outcome),
    /// Node work, then the status from the tracker.
    Run(Run),
}

/// One reconcile's decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Drop the tracker's nodes of earlier generations (their watches end).
    pub forget_earlier: bool,
    /// Nodes that ran an earlier generation where this one neither runs
    /// nor starts now (those where it starts are swept before the start).
    pub clear: Vec<Clear>,
    /// A stop annotation from before this generation, to remove before
    /// anything acts (its value: a newer one is left in place).
    pub stale_stop: Option<String>,
    pub next: Next,
}

/// Decides one reconcile.
pub fn plan(i: &Inputs) -> Plan {
    if let Some(phase) = status::final_phase(i.resource.previous(), i.resource.generation) {
        return Plan {
            forget_earlier: false,
            clear: Vec::new(),
            stale_stop: None,
            next: Next::Ended(phase),
        };
    }
    if i.resource.stop_requested() {
        return stop(i);
    }
    let same = i.resource.same_generation();
    let earlier = earlier_nodes(i, same);
    let next = next(i, same);
    // Where this generation runs or starts now: a start sweeps its node
    // first, and a clear would stop this generation's capture too. Every
    // other node of an earlier one is cleared, targets included: one that
    // waits for its agent may never start, nor one of a generation that
    // fails.
    let this: BTreeSet<&str> = match &next {
        Next::Run(run) => run
            .starts
            .iter()
            .map(|s| &s.progress)
            .chain(run.adopts.iter().map(|a| &a.progress))
            .chain(i.tracked.values().filter(|p| p.waiting_since.is_none()))
            .map(|p| p.node.as_str())
            .collect(),
        Next::Ended(_) | Next::Fail(_) => BTreeSet::new(),
    };
    let clear = earlier
        .into_iter()
        .filter(|n| !this.contains(n))
        .map(|n| Clear {
            node: n.to_string(),
            endpoint: i.agents.get(n).cloned(),
        })
        .collect();
    Plan {
        forget_earlier: !i.earlier.is_empty(),
        clear,
        stale_stop: i.resource.stale_stop().map(String::from),
        next,
    }
}

/// The nodes where earlier generations may still run, in this process or
/// before it (`same`: the status, if it describes this generation).
fn earlier_nodes<'a>(
    i: &Inputs<'a>,
    same: Option<&PacketCaptureConfigStatus>,
) -> BTreeSet<&'a str> {
    let mut earlier: BTreeSet<&str> = i
        .earlier
        .iter()
        .filter(|p| !p.state.is_final())
        .map(|p| p.node.as_str())
        .collect();
    if same.is_none()
        && let Some(prev) = i.resource.previous()
    {
        earlier.extend(prev.capture_files.values().map(|e| e.node.as_str()));
        if unnamed_nodes(prev, i.earlier.iter().map(|p| p.node.as_str())) {
            earlier.extend(i.agents.keys().map(String::as_str));
        }
    }
    earlier
}

/// Stopped by request: every node that runs the resource (any generation)
/// stops now and nothing starts; the nodes' watches report them stopped,
/// which completes the capture. Nodes the tracker does not follow (listed
/// by the status before a controller restart) are recorded as they ended,
/// or stopped; those whose agent is gone fail, as in [`next`]. A status
/// that counts nodes it does not name has every agent swept.
fn stop(i: &Inputs) -> Plan {
    let same = i.resource.same_generation();
    let id = capture_id(i.resource.uid, i.resource.generation);
    let mut run = Run {
        requeue: IDLE_REQUEUE,
        ..Run::default()
    };
    let mut nodes = earlier_nodes(i, same);
    // A stop that an agent keeps failing is no reason to wait past the
    // time every node should have ended anyway.
    let past = first_start(i, same).is_some_and(|start| i.now >= start + end_limit(i));
    for p in i.tracked.values().filter(|p| !p.state.is_final()) {
        if p.waiting_since.is_some() {
            // Nothing runs there to stop.
            run.record.push(stopped(p.clone(), i.now));
            continue;
        }
        nodes.insert(&p.node);
        if !i.agents.contains_key(&p.node) {
            run.record.push(gone(p.clone(), i.now));
        } else if past {
            let mut p = p.clone();
            p.fail(no_end(i), false, i.now);
            run.record.push(p);
        }
    }
    if let Some(s) = same {
        for (ip, entry) in &s.capture_files {
            nodes.insert(&entry.node);
            if i.tracked.contains_key(&entry.node) {
                continue;
            }
            let mut p = NodeProgress::from_status(ip, entry, &id);
            if !p.state.is_final() {
                if i.agents.contains_key(&p.node) {
                    // The clear below stops it.
                    p = stopped(p, i.now);
                } else {
                    p = gone(p, i.now);
                }
            }
            run.record.push(p);
        }
        if unnamed_nodes(s, i.tracked.keys().map(String::as_str)) {
            nodes.extend(i.agents.keys().map(String::as_str));
        }
    }
    let clear = nodes
        .into_iter()
        .map(|n| Clear {
            node: n.to_string(),
            endpoint: i.agents.get(n).cloned(),
        })
        .collect();
    Plan {
        forget_earlier: !i.earlier.is_empty(),
        clear,
        stale_stop: None,
        next: if started(i.tracked, same) && !only_waited(i.tracked, same) {
            Next::Run(run)
        } else {
            Next::Fail(Outcome::failed(
                "Stopped",
                format!("stopped by request ({STOP_REQUESTED}) before it started on any node"),
            ))
        },
    }
}

/// When the generation's first node started capturing.
fn first_start(i: &Inputs, same: Option<&PacketCaptureConfigStatus>) -> Option<Timestamp> {
    same.and_then(|s| s.start_time.as_ref().map(|t| t.0))
        .or_else(|| i.tracked.values().filter_map(|p| p.start_time).min())
}

/// How long after the first start every node should have ended: the
/// duration and the grace for the agents to report it.
fn end_limit(i: &Inputs) -> SignedDuration {
    SignedDuration::from_secs(i64::from(i.resource.spec().duration))
        + SignedDuration::try_from(i.grace).unwrap_or(SignedDuration::ZERO)
}

/// Why a node that has not ended by then fails.
fn no_end(i: &Inputs) -> String {
    format!(
        "no end reported by the agent within {}s of the start (duration {}s)",
        end_limit(i).as_secs(),
        i.resource.spec().duration
    )
}

fn next(i: &Inputs, same: Option<&PacketCaptureConfigStatus>) -> Next {
    let started = started(i.tracked, same);
    if !started {
        // A capture is a bounded act: it does not wait for its targets.
        if !i.targets.problems.is_empty() {
            let names: Vec<String> = i.targets.problems.iter().map(ToString::to_string).collect();
            return Next::Fail(Outcome::failed("PodNotFound", names.join("; ")));
        }
        let by_labels = i
            .resource
            .spec()
            .pod_selector
            .as_ref()
            .is_some_and(|s| s.by_labels());
        if i.targets.nodes.is_empty() && by_labels {
            let nodes = if i.resource.spec().node_selector.is_some() {
                " on the nodes spec.nodeSelector selects"
            } else {
                ""
            };
            return Next::Fail(Outcome::failed(
                "NoPodsSelected",
                format!("no running pod matches spec.podSelector{nodes}"),
            ));
        }
        if i.targets.nodes.is_empty() {
            // Agents elsewhere: the selector is what to change.
            let with_agents: BTreeSet<&String> = i.agents.keys().chain(i.unready.keys()).collect();
            let why = if i.resource.spec().node_selector.is_some() && !with_agents.is_empty() {
                format!(
                    "spec.nodeSelector leaves out the nodes the targets are on ({} nodes run one)",
                    with_agents.len()
                )
            } else {
                i.no_agent.to_string()
            };
            return Next::Fail(Outcome::failed(
                "NoAgents",
                format!("no agent to capture on: {why}"),
            ));
        }
    }
    let spec = i.resource.spec();
    let start_time = first_start(i, same);
    let limit = end_limit(i);
    let mut run = Run::default();
    let id = capture_id(i.resource.uid, i.resource.generation);
    let past = start_time.is_some_and(|start| i.now >= start + limit);

    // The status's entries of nodes the tracker does not follow (written
    // before a controller restart) are as much a record as the tracker's:
    // an ended node is kept as it ended; an unfinished one is followed
    // again (one still starting on a target node is started, idempotently,
    // below), or fails when its agent is gone.
    let mut untracked: BTreeMap<&str, NodeProgress> = BTreeMap::new();
    for (ip, entry) in same.iter().flat_map(|s| &s.capture_files) {
        if !i.tracked.contains_key(&entry.node) {
            untracked.insert(&entry.node, NodeProgress::from_status(ip, entry, &id));
        }
    }
    for (node, p) in &untracked {
        if p.state.is_final() {
            run.record.push(p.clone());
        } else if past || !i.targets.nodes.contains_key(*node) {
            match i.agents.get(*node) {
                // Its agent says how it is (it may have ended meanwhile);
                // past the deadline, the next pass fails it if not.
                Some(ep) => run.adopts.push(Adopt {
                    progress: p.clone(),
                    endpoint: ep.clone(),
                }),
                None => run.record.push(gone(p.clone(), i.now)),
            }
        }
    }

    if past {
        // The agents should have ended every node by now: those that have
        // not fail, and nothing more starts.
        for p in i.tracked.values().filter(|p| !p.state.is_final()) {
            let mut p = p.clone();
            if p.waiting_since.is_some() {
                let message = not_ready_in_time(&p, i);
                p.fail(message, true, i.now);
            } else {
                p.fail(no_end(i), false, i.now);
            }
            run.record.push(p);
        }
        run.requeue = IDLE_REQUEUE;
        return Next::Run(run);
    }

    // The nodes to start: (the node, starting; its targets and pods; sweep
    // first).
    let mut new_nodes: Vec<(NodeProgress, Vec<String>, Vec<SelectedPod>, bool)> = Vec::new();
    let no_pods = Vec::new();
    for (node, targets) in &i.targets.nodes {
        let ip = i.node_ips.get(node).map_or(node.as_str(), String::as_str);
        let pods = i.targets.pods.get(node).unwrap_or(&no_pods);
        match i.tracked.get(node) {
            // An ended node is not restarted; a waiting one is below.
            Some(p) if p.state.is_final() || p.waiting_since.is_some() => {}
            Some(p) => {
                if let Some(ep) = i.agents.get(node)
                    && (!same_targets(&p.targets, targets) || p.pods != names(pods))
                {
                    run.retargets.push(Retarget {
                        progress: p.clone(),
                        endpoint: ep.clone(),
                        targets: targets.clone(),
                        pods: pods.clone(),
                    });
                }
            }
            None => match untracked.get(node.as_str()) {
                // Ended before a controller restart: recorded above.
                Some(p) if p.state.is_final() => {}
                // Running before it: followed again. Its agent says how it
                // is now, or that it no longer knows the capture (it
                // restarted meanwhile), which fails the node: started
                // afresh, it would hide that the capture was cut. With no
                // running agent pod (a new one still Pending) the agent
                // that ran it is gone.
                Some(p) if p.state == CaptureState::Running => match i.agents.get(node) {
                    Some(ep) => run.adopts.push(Adopt {
                        progress: p.clone(),
                        endpoint: ep.clone(),
                    }),
                    None => run.record.push(gone(p.clone(), i.now)),
                },
                _ => {
                    let mut p = NodeProgress::new(node, ip, &id);
                    p.pods = names(pods);
                    new_nodes.push((p, targets.clone(), pods.clone(), true));
                }
            },
        }
    }
    for (node, p) in i.tracked {
        if p.waiting_since.is_some() && !p.state.is_final() {
            // Starts once its agent is ready, with the node's targets then
            // (none if its pods have left meanwhile, as a running node
            // whose pods left selects nothing).
            let pods = i.targets.pods.get(node).unwrap_or(&no_pods);
            let mut p = p.clone();
            p.pods = names(pods);
            let targets = i.targets.nodes.get(node).cloned().unwrap_or_default();
            new_nodes.push((p, targets, pods.clone(), true));
            continue;
        }
        if i.targets.nodes.contains_key(node) || p.state.is_final() {
            continue;
        }
        match i.agents.get(node) {
            // Its pods are gone from the node (for now): it selects nothing
            // until one comes back.
            Some(ep) => {
                if !p.targets.is_empty() || !p.pods.is_empty() {
                    run.retargets.push(Retarget {
                        progress: p.clone(),
                        endpoint: ep.clone(),
                        targets: Vec::new(),
                        pods: Vec::new(),
                    });
                }
            }
            None => run.record.push(gone(p.clone(), i.now)),
        }
    }

    // Full duration for the first nodes; what is left of it for nodes that
    // join later (a target pod that moved).
    let duration = match start_time {
        Some(start) if started => {
            let elapsed = i.now.duration_since(start).as_secs().max(0);
            u32::try_from((i64::from(spec.duration) - elapsed).max(1)).unwrap_or(1)
        }
        _ => spec.duration,
    };
    if !started && !new_nodes.is_empty() {
        run.starting = Some(
            new_nodes
                .iter()
                .map(|(p, ..)| (p.node.clone(), p.clone()))
                .collect(),
        );
    }
    // When the first node to wait for its agent gives up.
    let mut wait_ends: Option<Timestamp> = None;
    for (mut progress, targets, pods, sweep) in new_nodes {
        let node = progress.node.clone();
        match (i.agents.get(&node), i.unready.get(&node)) {
            (Some(ep), None) => {
                progress.waiting_since = None;
                progress.message = None;
                run.starts.push(Start {
                    progress,
                    endpoint: ep.clone(),
                    targets,
                    pods,
                    sweep,
                    duration,
                })
            }
            (_, Some(why)) => {
                let since = *progress.waiting_since.get_or_insert(i.now);
                let mut until = since + SignedDuration::try_from(i.agent_wait).unwrap_or_default();
                if started && let Some(start) = start_time {
                    until = until.min(start + SignedDuration::from_secs(i64::from(spec.duration)));
                }
                if i.now < until {
                    progress.message = Some(format!("waiting for the agent on node {node}: {why}"));
                    wait_ends = Some(wait_ends.map_or(until, |w| w.min(until)));
                } else {
                    let message = not_ready_in_time(&progress, i);
                    progress.fail(message, true, i.now);
                }
                run.record.push(progress);
            }
            (None, None) => {
                let message = format!("no agent on node {node}: {}", i.no_agent);
                progress.fail(message, true, i.now);
                run.record.push(progress);
            }
        }
    }

    // Nodes starting now start the clock if nothing has yet.
    let start = start_time.or((!run.starts.is_empty()).then_some(i.now));
    let deadline = start.map(|s| s + limit);
    run.requeue = [deadline, wait_ends]
        .into_iter()
        .flatten()
        .filter(|at| i.now < *at)
        .min()
        .and_then(|at| Duration::try_from(at.duration_since(i.now)).ok())
        .map_or(IDLE_REQUEUE, |d| d.max(Duration::from_secs(1)));
    Next::Run(run)
}

/// Why a node that waited for its agent fails: the agent was not ready
/// within `agent_wait` or the capture's duration, whichever ended first.
fn not_ready_in_time(p: &NodeProgress, i: &Inputs) -> String {
    let waited = p
        .waiting_since
        .map_or(0, |since| i.now.duration_since(since).as_secs().max(0));
    let why = i.unready.get(&p.node).map_or(i.no_agent, String::as_str);
    format!(
        "the agent on node {} was not ready in time (waited {waited}s): {why}",
        p.node
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use packet_capture_common::crd::{CaptureState, OutputFormat, PodRef};

    use crate::targets::TargetProblem;

    use CaptureState::{Completed, Failed, Running, Starting};

    const UID: &str = "u";
    /// The generation reconciled; the earlier one is 1.
    const GENERATION: i64 = 2;
    const NO_AGENT: &str =
        "no running pod labelled app=packet-capture-agent in namespace kube-system";
    const TARGET: &[&str] = &["10.0.0.1"];
    const OTHER: &[&str] = &["10.0.0.9"];
    /// How long a node waits for its agent in these cases.
    const AGENT_WAIT: Duration = Duration::from_secs(90);
    /// What `kubectl pcap stop` writes for this generation.
    const STOP_VALUE: &str = "generation 2, 2023-11-14T22:14:00Z";
    /// What it wrote for the generation before.
    const STOP_EARLIER: &str = "generation 1, 2023-11-14T22:14:00Z";
    /// A value set by hand, naming no generation.
    const STOP_BY_HAND: &str = "2023-11-14T22:14:00Z";

    fn t0() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    fn at(seconds: i64) -> Timestamp {
        t0() + SignedDuration::from_secs(seconds)
    }

    fn ip(node: &str) -> String {
        format!("192.168.0.{}", &node[1..])
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A node of `generation` capturing `targets`, started at t0 unless
    /// still starting.
    fn progress(
        node: &str,
        generation: i64,
        state: CaptureState,
        targets: &[&str],
    ) -> NodeProgress {
        let id = capture_id(UID, generation);
        let mut p = NodeProgress::new(node, &ip(node), &id);
        p.targets = strings(targets);
        p.state = state;
        p.start_time = (state != Starting).then(t0);
        p
    }

    /// What the resource's status says: nothing, an earlier generation's
    /// nodes, or this generation's phase and nodes.
    #[derive(Clone, Copy)]
    enum Was {
        Nothing,
        Earlier(&'static [&'static str]),
        Same(Phase, &'static [(&'static str, CaptureState)]),
    }

    struct Case {
        name: &'static str,
        /// Target nodes, each capturing [`TARGET`].
        targets: &'static [&'static str],
        /// Target pods that cannot be resolved.
        missing: &'static [&'static str],
        /// Nodes with a running agent.
        agents: &'static [&'static str],
        /// Nodes whose agent pod is on its way (Pending, or not Ready).
        unready: &'static [&'static str],
        /// This generation's nodes in the tracker, with their targets.
        tracked: &'static [(&'static str, CaptureState, &'static [&'static str])],
        /// This generation's nodes in the tracker that wait for their agent,
        /// since t0 plus these seconds.
        waiting: &'static [(&'static str, i64)],
        /// Earlier generations' nodes in the tracker.
        earlier: &'static [(&'static str, CaptureState)],
        status: Was,
        /// Nodes the status counts but does not list (`captureFilesOmitted`:
        /// beyond `MAX_STATUS_NODES` it lists only failed or late nodes).
        unnamed: u32,
        /// Seconds since t0 (the start, when anything started).
        now: i64,
        /// The stop annotation's value, if the resource carries it.
        stop: Option<&'static str>,
        /// The spec has a `nodeSelector`.
        node_selector: bool,
        want: Want,
    }

    const CASE: Case = Case {
        name: "",
        targets: &[],
        missing: &[],
        agents: &[],
        unready: &[],
        tracked: &[],
        waiting: &[],
        earlier: &[],
        status: Was::Nothing,
        unnamed: 0,
        now: 0,
        stop: None,
        node_selector: false,
        want: WANT,
    };

    /// A plan, spelled for comparison.
    #[derive(Debug, PartialEq)]
    struct Want {
        next: &'static str,
        forget: bool,
        clear: &'static [&'static str],
        retargets: &'static [&'static str],
        starting: &'static [&'static str],
        record: &'static [&'static str],
        adopts: &'static [&'static str],
        starts: &'static [&'static str],
        requeue: u64,
        /// The value of a stop annotation to remove as stale.
        stale_stop: Option<&'static str>,
    }

    const WANT: Want = Want {
        next: "run",
        forget: false,
        clear: &[],
        retargets: &[],
        starting: &[],
        record: &[],
        adopts: &[],
        starts: &[],
        requeue: 0,
        stale_stop: None,
    };

    /// The plan's spelling: owned, as [`Want`]'s fields read.
    #[derive(Debug, PartialEq)]
    struct Got {
        next: String,
        forget: bool,
        clear: Vec<String>,
        retargets: Vec<String>,
        starting: Vec<String>,
        record: Vec<String>,
        adopts: Vec<String>,
        starts: Vec<String>,
        requeue: u64,
        stale_stop: Option<String>,
    }

    impl Got {
        fn of(plan: Plan) -> Self {
            let mut got = Got {
                next: String::new(),
                forget: plan.forget_earlier,
                clear: plan.clear.iter().map(|c| c.node.clone()).collect(),
                retargets: Vec::new(),
                starting: Vec::new(),
                record: Vec::new(),
                adopts: Vec::new(),
                starts: Vec::new(),
                requeue: 0,
                stale_stop: plan.stale_stop,
            };
            match plan.next {
                Next::Ended(phase) => got.next = format!("ended {phase:?}"),
                Next::Fail(o) => got.next = format!("fail {}: {}", o.reason, o.message),
                Next::Run(run) => {
                    got.next = "run".into();
                    got.retargets = run
                        .retargets
                        .iter()
                        .map(|r| match &r.targets[..] {
                            [] => format!("{} -> nothing", r.progress.node),
                            t => format!("{} -> {}", r.progress.node, t.join(",")),
                        })
                        .collect();
                    got.starting = run.starting.into_iter().flatten().map(|(n, _)| n).collect();
                    got.record = run
                        .record
                        .iter()
                        .map(|p| match &p.message {
                            Some(m) => format!("{} {}: {m}", p.node, p.state),
                            None => format!("{} {}", p.node, p.state),
                        })
                        .collect();
                    got.adopts = run.adopts.iter().map(|a| a.progress.node.clone()).collect();
                    got.starts = run
                        .starts
                        .iter()
                        .map(|s| {
                            let sweep = if s.sweep { " sweep" } else { "" };
                            format!("{} {}s{sweep}", s.progress.node, s.duration)
                        })
                        .collect();
                    got.requeue = run.requeue.as_secs();
                }
            }
            got
        }

        fn want(w: &Want) -> Self {
            let own = |l: &[&str]| strings(l);
            Got {
                next: w.next.to_string(),
                forget: w.forget,
                clear: own(w.clear),
                retargets: own(w.retargets),
                starting: own(w.starting),
                record: own(w.record),
                adopts: own(w.adopts),
                starts: own(w.starts),
                requeue: w.requeue,
                stale_stop: w.stale_stop.map(String::from),
            }
        }
    }

    fn resource_of(case: &Case) -> PacketCaptureConfig {
        let mut pcc = PacketCaptureConfig::new(
            "cap",
            PacketCaptureConfigSpec {
                target_ips: strings(TARGET),
                duration: 60,
                output_format: OutputFormat::Pcap,
                ..Default::default()
            },
        );
        pcc.metadata.uid = Some(UID.into());
        pcc.metadata.generation = Some(GENERATION);
        if case.node_selector {
            pcc.spec.node_selector = Some(packet_capture_common::crd::LabelSelector {
                match_labels: [("zone".to_string(), "a".to_string())].into(),
                ..Default::default()
            });
        }
        if let Some(value) = case.stop {
            pcc.metadata.annotations =
                Some([(STOP_REQUESTED.to_string(), value.to_string())].into());
        }
        let entry = |node: &str, state| {
            let p = progress(node, 1, state, TARGET);
            (p.node_ip.clone(), p.to_status(OutputFormat::Pcap))
        };
        let counted = |listed: usize| {
            let omitted = case.unnamed;
            (
                Some(listed as u32 + omitted),
                (omitted > 0).then_some(omitted),
            )
        };
        pcc.status = match case.status {
            Was::Nothing => None,
            Was::Earlier(nodes) => Some(PacketCaptureConfigStatus {
                observed_generation: Some(GENERATION - 1),
                phase: Some(Phase::Running),
                capture_files: nodes.iter().map(|n| entry(n, Running)).collect(),
                nodes: counted(nodes.len()).0,
                capture_files_omitted: counted(nodes.len()).1,
                ..Default::default()
            }),
            Was::Same(phase, nodes) => Some(PacketCaptureConfigStatus {
                observed_generation: Some(GENERATION),
                phase: Some(phase),
                start_time: Some(Time(t0())),
                capture_files: nodes.iter().map(|(n, s)| entry(n, *s)).collect(),
                nodes: counted(nodes.len()).0,
                capture_files_omitted: counted(nodes.len()).1,
                ..Default::default()
            }),
        };
        pcc
    }

    fn run(case: &Case) -> Got {
        let pcc = resource_of(case);
        let targets = Targets {
            nodes: case
                .targets
                .iter()
                .map(|n| (n.to_string(), strings(TARGET)))
                .collect(),
            pods: BTreeMap::new(),
            problems: case
                .missing
                .iter()
                .map(|name| {
                    let pod = PodRef {
                        pod_name: name.to_string(),
                        namespace: "default".into(),
                    };
                    TargetProblem::pod(&pod, "not found".into())
                })
                .collect(),
        };
        let agents = case
            .agents
            .iter()
            .map(|n| {
                let ep = AgentEndpoint {
                    node: n.to_string(),
                    node_ip: ip(n),
                    uri: format!("http://{}:8080", ip(n)),
                };
                (n.to_string(), ep)
            })
            .collect();
        let node_ips = case
            .targets
            .iter()
            .map(|n| (n.to_string(), ip(n)))
            .collect();
        let unready = case
            .unready
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    format!("its pod kube-system/agent-{n} is Pending"),
                )
            })
            .collect();
        let waiting = case.waiting.iter().map(|(n, since)| {
            let mut p = progress(n, GENERATION, Starting, &[]);
            p.waiting_since = Some(at(*since));
            (n.to_string(), p)
        });
        let tracked = case
            .tracked
            .iter()
            .map(|(n, s, t)| (n.to_string(), progress(n, GENERATION, *s, t)))
            .chain(waiting)
            .collect();
        let earlier: Vec<NodeProgress> = case
            .earlier
            .iter()
            .map(|(n, s)| progress(n, 1, *s, TARGET))
            .collect();
        let plan = plan(&Inputs {
            resource: Resource::new(&pcc).unwrap(),
            targets: &targets,
            agents: &agents,
            unready: &unready,
            node_ips: &node_ips,
            tracked: &tracked,
            earlier: &earlier,
            no_agent: NO_AGENT,
            grace: Duration::from_secs(60),
            agent_wait: AGENT_WAIT,
            now: at(case.now),
        });
        Got::of(plan)
    }

    #[test]
    fn every_branch_plans_as_documented() {
        let cases = [
            Case {
                name: "the first pass starts every node, announcing them as starting",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                want: Want {
                    starting: &["n1", "n2"],
                    starts: &["n1 60s sweep", "n2 60s sweep"],
                    requeue: 120,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a repeated pass with the same tracker starts nothing",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET), ("n2", Starting, TARGET)],
                now: 10,
                want: Want {
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "new targets on a node change its capture in place",
                targets: &["n1"],
                agents: &["n1"],
                tracked: &[("n1", Running, OTHER)],
                now: 10,
                want: Want {
                    retargets: &["n1 -> 10.0.0.1"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node whose capture ended is not restarted, even with new targets",
                targets: &["n1"],
                agents: &["n1"],
                tracked: &[("n1", Completed, OTHER)],
                now: 10,
                want: Want {
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node that is no longer a target goes on selecting nothing, until its pods come back",
                targets: &["n1"],
                agents: &["n1", "n2", "n3"],
                tracked: &[
                    ("n1", Running, TARGET),
                    ("n2", Running, TARGET),
                    ("n3", Running, &[]),
                ],
                now: 10,
                want: Want {
                    retargets: &["n2 -> nothing"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node whose agent went away mid-capture fails",
                targets: &["n1"],
                agents: &["n1"],
                tracked: &[("n1", Running, TARGET), ("n2", Running, TARGET)],
                now: 10,
                want: Want {
                    record: &[
                        "n2 failed: the agent on node n2 went away before the capture ended (its pod is gone or not running)",
                    ],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "after a controller restart, nodes that had ended are adopted, not started",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                status: Was::Same(Phase::Running, &[("n1", Completed), ("n2", Failed)]),
                now: 10,
                want: Want {
                    record: &["n1 completed", "n2 failed"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "after a controller restart, running nodes are followed again, not started; starting ones are started (idempotently)",
                targets: &["n1", "n2", "n3"],
                agents: &["n1", "n2", "n3"],
                status: Was::Same(
                    Phase::Running,
                    &[("n1", Completed), ("n2", Running), ("n3", Starting)],
                ),
                now: 10,
                want: Want {
                    record: &["n1 completed"],
                    adopts: &["n2"],
                    starts: &["n3 50s sweep"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "after a controller restart, a running node whose agent pod is new (Pending) failed: the agent that ran it is gone",
                targets: &["n1", "n2"],
                agents: &["n2"],
                unready: &["n1"],
                status: Was::Same(Phase::Running, &[("n1", Running), ("n2", Running)]),
                now: 10,
                want: Want {
                    record: &[
                        "n1 failed: the agent on node n1 went away before the capture ended (its pod is gone or not running)",
                    ],
                    adopts: &["n2"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a new generation forgets the old one and clears its nodes that have no part in the new",
                targets: &["n1", "n2"],
                agents: &["n1", "n2", "n3"],
                earlier: &[("n1", Running), ("n3", Running), ("n4", Completed)],
                status: Was::Earlier(&["n1", "n3", "n5"]),
                want: Want {
                    forget: true,
                    clear: &["n3", "n5"],
                    starting: &["n1", "n2"],
                    starts: &["n1 60s sweep", "n2 60s sweep"],
                    requeue: 120,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a missing pod fails the generation before anything starts",
                targets: &["n1"],
                missing: &["ghost", "gone"],
                agents: &["n1"],
                want: Want {
                    next: "fail PodNotFound: pod default/ghost not found; pod default/gone not found",
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a new generation that fails clears every node of the earlier one, its targets too",
                targets: &["n1", "n2"],
                missing: &["ghost"],
                agents: &["n1", "n2"],
                earlier: &[("n1", Running), ("n2", Running)],
                want: Want {
                    next: "fail PodNotFound: pod default/ghost not found",
                    forget: true,
                    clear: &["n1", "n2"],
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a target node of a new generation that waits for its agent is cleared of the earlier one (it may never start)",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                unready: &["n2"],
                earlier: &[("n1", Running), ("n2", Running)],
                want: Want {
                    forget: true,
                    clear: &["n2"],
                    starting: &["n1", "n2"],
                    record: &[
                        "n2 starting: waiting for the agent on node n2: its pod kube-system/agent-n2 is Pending",
                    ],
                    starts: &["n1 60s sweep"],
                    requeue: 90,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "no agent at all fails the generation, after clearing the earlier one",
                earlier: &[("n1", Running)],
                want: Want {
                    next: "fail NoAgents: no agent to capture on: no running pod labelled app=packet-capture-agent in namespace kube-system",
                    forget: true,
                    clear: &["n1"],
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a nodeSelector that leaves out every node with an agent says so",
                agents: &["n1", "n2"],
                unready: &["n3"],
                node_selector: true,
                want: Want {
                    next: "fail NoAgents: no agent to capture on: spec.nodeSelector leaves out the nodes the targets are on (3 nodes run one)",
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a target pod gone once the capture runs changes nothing",
                targets: &["n1"],
                missing: &["web"],
                agents: &["n1"],
                tracked: &[("n1", Running, TARGET)],
                now: 10,
                want: Want {
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node that joins late gets what is left of the duration",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET)],
                now: 20,
                want: Want {
                    starts: &["n2 40s sweep"],
                    requeue: 100,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node that joins after the duration gets a second",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET)],
                now: 90,
                want: Want {
                    starts: &["n2 1s sweep"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a target node without an agent fails; the others start",
                targets: &["n1", "n2"],
                agents: &["n1"],
                want: Want {
                    starting: &["n1", "n2"],
                    record: &[
                        "n2 failed: no agent on node n2: no running pod labelled app=packet-capture-agent in namespace kube-system",
                    ],
                    starts: &["n1 60s sweep"],
                    requeue: 120,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a target node whose agent is on its way waits; the others start",
                targets: &["n1", "n2"],
                agents: &["n1"],
                unready: &["n2"],
                want: Want {
                    starting: &["n1", "n2"],
                    record: &[
                        "n2 starting: waiting for the agent on node n2: its pod kube-system/agent-n2 is Pending",
                    ],
                    starts: &["n1 60s sweep"],
                    requeue: 90,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "an agent that runs but is not ready yet is waited for too",
                targets: &["n1"],
                agents: &["n1"],
                unready: &["n1"],
                want: Want {
                    starting: &["n1"],
                    record: &[
                        "n1 starting: waiting for the agent on node n1: its pod kube-system/agent-n1 is Pending",
                    ],
                    requeue: 90,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a waiting node starts once its agent is ready, for what is left of the duration",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 0)],
                now: 10,
                want: Want {
                    starts: &["n2 50s sweep"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "the first node to start after waiting gets the whole duration",
                targets: &["n1"],
                agents: &["n1"],
                waiting: &[("n1", 0)],
                now: 10,
                want: Want {
                    starts: &["n1 60s sweep"],
                    requeue: 120,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a waiting node whose pods have left starts all the same, selecting nothing",
                targets: &["n1"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 0)],
                now: 10,
                want: Want {
                    starts: &["n2 50s sweep"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a node waits for its agent no longer than the agent wait",
                targets: &["n1"],
                unready: &["n1"],
                waiting: &[("n1", 0)],
                now: 90,
                want: Want {
                    record: &[
                        "n1 failed: the agent on node n1 was not ready in time (waited 90s): its pod kube-system/agent-n1 is Pending",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "while the capture runs elsewhere, a node waits until its duration is over",
                targets: &["n1", "n2"],
                agents: &["n1"],
                unready: &["n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 30)],
                now: 50,
                want: Want {
                    record: &[
                        "n2 starting: waiting for the agent on node n2: its pod kube-system/agent-n2 is Pending",
                    ],
                    requeue: 10,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "and fails when it is",
                targets: &["n1", "n2"],
                agents: &["n1"],
                unready: &["n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 30)],
                now: 60,
                want: Want {
                    record: &[
                        "n2 failed: the agent on node n2 was not ready in time (waited 30s): its pod kube-system/agent-n2 is Pending",
                    ],
                    requeue: 60,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a waiting node whose agent pod is gone fails",
                targets: &["n1"],
                waiting: &[("n1", 0)],
                now: 10,
                want: Want {
                    record: &[
                        "n1 failed: no agent on node n1: no running pod labelled app=packet-capture-agent in namespace kube-system",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "past the deadline a node still waiting for its agent fails for that",
                targets: &["n1", "n2"],
                agents: &["n1"],
                unready: &["n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 0)],
                now: 121,
                want: Want {
                    record: &[
                        "n1 failed: no end reported by the agent within 120s of the start (duration 60s)",
                        "n2 failed: the agent on node n2 was not ready in time (waited 121s): its pod kube-system/agent-n2 is Pending",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request stops a waiting node without calling its agent",
                targets: &["n1", "n2"],
                agents: &["n1"],
                unready: &["n2"],
                tracked: &[("n1", Running, TARGET)],
                waiting: &[("n2", 0)],
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    clear: &["n1"],
                    record: &["n2 stopped: stopped by request"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "past the deadline unfinished nodes fail and nothing starts",
                targets: &["n1", "n2", "n3"],
                agents: &["n1", "n2", "n3"],
                tracked: &[("n1", Running, TARGET), ("n2", Completed, TARGET)],
                now: 121,
                want: Want {
                    record: &[
                        "n1 failed: no end reported by the agent within 120s of the start (duration 60s)",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request stops every node and starts none, not even a new target",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                tracked: &[("n1", Running, TARGET)],
                status: Was::Same(Phase::Running, &[("n1", Running)]),
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    clear: &["n1"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request still unanswered past the deadline fails the node, as without a stop",
                targets: &["n1"],
                agents: &["n1"],
                tracked: &[("n1", Running, TARGET)],
                status: Was::Same(Phase::Running, &[("n1", Running)]),
                stop: Some(STOP_VALUE),
                now: 121,
                want: Want {
                    clear: &["n1"],
                    record: &[
                        "n1 failed: no end reported by the agent within 120s of the start (duration 60s)",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request records a node the tracker does not follow as stopped, and fails one whose agent is gone",
                targets: &["n1", "n2"],
                agents: &["n1"],
                tracked: &[("n2", Running, TARGET)],
                earlier: &[("n3", Running)],
                status: Was::Same(Phase::Running, &[("n1", Running), ("n2", Running)]),
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    forget: true,
                    clear: &["n1", "n2", "n3"],
                    record: &[
                        "n2 failed: the agent on node n2 went away before the capture ended (its pod is gone or not running)",
                        "n1 stopped: stopped by request",
                    ],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request while every node waits for its agent ends the capture as stopped before it started",
                targets: &["n1", "n2"],
                unready: &["n1", "n2"],
                waiting: &[("n1", 0), ("n2", 0)],
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    next: "fail Stopped: stopped by request (networking.packet.io/stop-requested) before it started on any node",
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request before any node started ends the capture",
                targets: &["n1"],
                agents: &["n1"],
                stop: Some(STOP_VALUE),
                want: Want {
                    next: "fail Stopped: stopped by request (networking.packet.io/stop-requested) before it started on any node",
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "past the deadline after a controller restart, the status's nodes stay: ended ones as they were, the others asked of their agent or failed",
                targets: &["n1", "n2", "n3", "n4"],
                agents: &["n1", "n2", "n3"],
                status: Was::Same(
                    Phase::Running,
                    &[
                        ("n1", Completed),
                        ("n2", Failed),
                        ("n3", Running),
                        ("n4", Running),
                    ],
                ),
                now: 121,
                want: Want {
                    record: &[
                        "n1 completed",
                        "n2 failed",
                        "n4 failed: the agent on node n4 went away before the capture ended (its pod is gone or not running)",
                    ],
                    adopts: &["n3"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "after a controller restart, the status's nodes that are no longer targets stay: ended ones as they were, the others followed or failed",
                targets: &["n1"],
                agents: &["n1", "n2", "n3"],
                status: Was::Same(
                    Phase::Running,
                    &[
                        ("n1", Running),
                        ("n2", Running),
                        ("n3", Completed),
                        ("n4", Running),
                    ],
                ),
                now: 10,
                want: Want {
                    record: &[
                        "n3 completed",
                        "n4 failed: the agent on node n4 went away before the capture ended (its pod is gone or not running)",
                    ],
                    adopts: &["n2", "n1"],
                    requeue: 110,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a new generation after a controller restart clears every agent when the old status counts nodes it does not name",
                targets: &["n1"],
                agents: &["n1", "n2", "n3"],
                status: Was::Earlier(&["n2"]),
                unnamed: 150,
                want: Want {
                    clear: &["n2", "n3"],
                    starting: &["n1"],
                    starts: &["n1 60s sweep"],
                    requeue: 120,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request clears every agent when the status counts nodes neither it nor the tracker names",
                targets: &["n1"],
                agents: &["n1", "n2", "n3"],
                status: Was::Same(Phase::Running, &[("n4", Failed)]),
                unnamed: 150,
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    clear: &["n1", "n2", "n3", "n4"],
                    record: &["n4 failed"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop request after a controller restart keeps ended nodes as they were",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                status: Was::Same(Phase::Running, &[("n1", Completed), ("n2", Running)]),
                stop: Some(STOP_VALUE),
                now: 10,
                want: Want {
                    clear: &["n1", "n2"],
                    record: &["n1 completed", "n2 stopped: stopped by request"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop annotation from before a spec change is dropped, and the new generation starts",
                targets: &["n1"],
                agents: &["n1"],
                status: Was::Earlier(&["n1"]),
                stop: Some(STOP_EARLIER),
                want: Want {
                    starting: &["n1"],
                    starts: &["n1 60s sweep"],
                    requeue: 120,
                    stale_stop: Some(STOP_EARLIER),
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop annotation set by hand while the status is an earlier generation's is taken for that one's",
                targets: &["n1"],
                agents: &["n1"],
                status: Was::Earlier(&["n1"]),
                stop: Some(STOP_BY_HAND),
                want: Want {
                    starting: &["n1"],
                    starts: &["n1 60s sweep"],
                    requeue: 120,
                    stale_stop: Some(STOP_BY_HAND),
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop of this generation asked before its status was written stops the earlier one's nodes and starts nothing",
                targets: &["n1", "n2"],
                agents: &["n1", "n2"],
                status: Was::Earlier(&["n1", "n3"]),
                stop: Some(STOP_VALUE),
                want: Want {
                    next: "fail Stopped: stopped by request (networking.packet.io/stop-requested) before it started on any node",
                    clear: &["n1", "n3"],
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop of this generation while it runs is no stale one",
                targets: &["n1"],
                agents: &["n1"],
                tracked: &[("n1", Running, TARGET)],
                status: Was::Same(Phase::Running, &[("n1", Running)]),
                stop: Some(STOP_VALUE),
                want: Want {
                    clear: &["n1"],
                    requeue: 30,
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "a stop annotation on a generation that has not written its status yet, with no earlier one, is honoured",
                targets: &["n1"],
                agents: &["n1"],
                stop: Some(STOP_VALUE),
                want: Want {
                    next: "fail Stopped: stopped by request (networking.packet.io/stop-requested) before it started on any node",
                    ..WANT
                },
                ..CASE
            },
            Case {
                name: "an ended generation plans nothing",
                targets: &["n1"],
                agents: &["n1"],
                earlier: &[("n2", Running)],
                status: Was::Same(Phase::Completed, &[("n1", Completed)]),
                want: Want {
                    next: "ended Completed",
                    ..WANT
                },
                ..CASE
            },
        ];
        // Every case that differs, not just the first.
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|case| {
                let (got, want) = (run(case), Got::want(&case.want));
                (got != want).then(|| format!("{}:\n  got  {got:?}\n  want {want:?}", case.name))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn starts_carry_the_node_its_address_and_its_capture() {
        let case = Case {
            targets: &["n1"],
            agents: &["n1"],
            ..CASE
        };
        let pcc = resource_of(&case);
        let targets = Targets {
            nodes: BTreeMap::from([("n1".to_string(), strings(TARGET))]),
            pods: BTreeMap::from([(
                "n1".to_string(),
                vec![SelectedPod {
                    name: "default/web".into(),
                    ips: strings(TARGET),
                }],
            )]),
            problems: Vec::new(),
        };
        let ep = AgentEndpoint {
            node: "n1".into(),
            node_ip: ip("n1"),
            uri: "http://192.168.0.1:8080".into(),
        };
        let agents = BTreeMap::from([("n1".to_string(), ep.clone())]);
        let plan = plan(&Inputs {
            resource: Resource::new(&pcc).unwrap(),
            targets: &targets,
            agents: &agents,
            unready: &BTreeMap::new(),
            node_ips: &BTreeMap::from([("n1".to_string(), ip("n1"))]),
            tracked: &BTreeMap::new(),
            earlier: &[],
            no_agent: NO_AGENT,
            grace: Duration::from_secs(60),
            agent_wait: AGENT_WAIT,
            now: t0(),
        });
        let Next::Run(run) = plan.next else {
            panic!("{plan:?}")
        };
        let start = &run.starts[0];
        assert_eq!(start.endpoint, ep);
        assert_eq!(start.targets, strings(TARGET));
        let mut starting = NodeProgress::new("n1", "192.168.0.1", &capture_id(UID, 2));
        starting.pods = strings(&["default/web"]);
        assert_eq!(start.progress, starting);
        assert_eq!(run.starting.unwrap()["n1"], start.progress);
    }

    #[test]
    fn agents_are_listed_only_for_nodes_neither_the_status_nor_the_tracker_names() {
        let case = |status, unnamed| Case {
            status,
            unnamed,
            ..CASE
        };
        let must = |case: &Case, tracked: &[&str]| {
            let pcc = resource_of(case);
            let tracked: BTreeMap<String, NodeProgress> = tracked
                .iter()
                .map(|n| (n.to_string(), progress(n, GENERATION, Running, TARGET)))
                .collect();
            must_list(&Resource::new(&pcc).unwrap(), &tracked)
        };
        let wide = case(Was::Same(Phase::Running, &[("n1", Failed)]), 2);
        assert!(must(&wide, &[]), "after a restart");
        assert!(must(&wide, &["n1", "n2"]), "one still unknown");
        assert!(!must(&wide, &["n2", "n3"]), "the tracker knows the rest");
        let listed = case(Was::Same(Phase::Running, &[("n1", Running)]), 0);
        assert!(!must(&listed, &[]), "the status names every node");
        let ended = case(Was::Same(Phase::Completed, &[("n1", Completed)]), 2);
        assert!(!must(&ended, &[]), "an ended generation");
        let earlier = case(Was::Earlier(&["n1"]), 2);
        assert!(!must(&earlier, &[]), "another generation's status");
    }

    #[test]
    fn capture_ids_follow_uid_and_generation() {
        let a = capture_id("u", 1);
        assert!(a.starts_with(&capture_prefix("u")), "{a}");
        assert_eq!(a, "u-g1");
        assert_ne!(a, capture_id("u", 2));
    }

    #[test]
    fn targets_compare_as_addresses() {
        let same = |a: &[&str], b: &[&str]| same_targets(&strings(a), &strings(b));
        assert!(same(
            &["10.0.0.1", "fd00:0::1"],
            &["fd00::1", "10.0.0.1/32"]
        ));
        assert!(same(&[], &[]));
        assert!(!same(&["10.0.0.1"], &["10.0.0.2"]));
        assert!(!same(&["10.0.0.0/24"], &[]));
    }
}
