//! The status from the nodes' progress: phase, message, condition, times and
//! counters, with `captureFiles` keyed by node IP in the seed's shape.
//!
//! Phases: `Starting` until a node runs, `Running` while any node has not
//! ended, and once every node has ended `Completed` if none failed, else
//! `Failed` (the failed nodes are named in the message and in their entries;
//! the others keep their files and counts). A node the controller stopped
//! (`stopped`) has ended without failing; every way a capture can end
//! without being asked to is a failed node (see [`crate::node`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use packet_capture_common::crd::{
    CaptureState, NodeCapture, OutputFormat, PacketCaptureConfigSpec, PacketCaptureConfigStatus,
    Phase,
};

use crate::consts::READY_CONDITION;
use crate::node::NodeProgress;

/// Failed nodes the message names at most; the others are in their
/// `captureFiles` entries (the message and the condition stay a sentence
/// when thousands of nodes fail).
pub const MESSAGE_NODES: usize = 10;

/// Nodes `captureFiles` lists in full. A capture on more nodes lists only
/// the nodes that need attention (failed, or not ended past the duration),
/// at most this many, and counts all of them in `nodeStates`: each entry is
/// about 300 bytes, and an object of thousands would near the API server's
/// limit. The results ConfigMaps list every node.
pub const MAX_STATUS_NODES: usize = 100;

/// The message of a capture that completed everywhere (the seed's words).
pub const COMPLETED_MESSAGE: &str = "Packet capture completed on all nodes";

/// A phase with its message and the reason of the Ready condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub phase: Phase,
    pub reason: &'static str,
    pub message: String,
}

impl Outcome {
    pub fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            phase: Phase::Failed,
            reason,
            message: message.into(),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The phase the nodes add up to (the rule above).
pub fn summarize(nodes: &BTreeMap<String, NodeProgress>) -> Outcome {
    let n = nodes.len();
    let count = |s: CaptureState| nodes.values().filter(|p| p.state == s).count();
    let running = count(CaptureState::Running);
    let ended = nodes.values().filter(|p| p.state.is_final()).count();
    if n == 0 {
        return Outcome {
            phase: Phase::Starting,
            reason: "Starting",
            message: "resolving the targets".into(),
        };
    }
    if ended < n {
        let mut message = if running > 0 {
            format!("capturing on {running} of {n} node{}", plural(n))
        } else {
            format!("starting the capture on {n} node{}", plural(n))
        };
        let waiting = nodes
            .values()
            .filter(|p| p.waiting_since.is_some() && !p.state.is_final())
            .count();
        if waiting > 0 {
            let whose = if waiting == 1 {
                "its agent"
            } else {
                "their agents"
            };
            message.push_str(&format!(", {waiting} waiting for {whose}"));
        }
        if ended > 0 {
            message.push_str(&format!(", {ended} ended"));
        }
        let (phase, reason) = if running > 0 || ended > 0 {
            (Phase::Running, "Running")
        } else {
            (Phase::Starting, "Starting")
        };
        return Outcome {
            phase,
            reason,
            message,
        };
    }
    let failed: Vec<&NodeProgress> = nodes
        .values()
        .filter(|p| p.state == CaptureState::Failed)
        .collect();
    if failed.is_empty() {
        return Outcome {
            phase: Phase::Completed,
            reason: "Completed",
            message: COMPLETED_MESSAGE.into(),
        };
    }
    let mut reasons: Vec<String> = failed
        .iter()
        .take(MESSAGE_NODES)
        .map(|p| {
            format!(
                "node {}: {}",
                p.node,
                p.message.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    if failed.len() > MESSAGE_NODES {
        reasons.push(format!(
            "and {} more, in captureFiles",
            failed.len() - MESSAGE_NODES
        ));
    }
    let reason = if failed.iter().all(|p| p.unreachable) {
        "AgentUnreachable"
    } else {
        "NodeFailed"
    };
    Outcome::failed(
        reason,
        format!(
            "capture failed on {} of {n} node{} ({}); {} node{} completed",
            failed.len(),
            plural(n),
            reasons.join("; "),
            n - failed.len(),
            plural(n - failed.len()),
        ),
    )
}

/// The final phase of `generation`, if the status says it has ended.
pub fn final_phase(prev: Option<&PacketCaptureConfigStatus>, generation: i64) -> Option<Phase> {
    same_generation(prev, generation)
        .and_then(|s| s.phase)
        .filter(|p| p.is_final())
}

/// The previous status, if it describes `generation`.
pub fn same_generation(
    prev: Option<&PacketCaptureConfigStatus>,
    generation: i64,
) -> Option<&PacketCaptureConfigStatus> {
    prev.filter(|s| s.observed_generation == Some(generation))
}

fn ready_condition(
    prev: Option<&PacketCaptureConfigStatus>,
    generation: i64,
    outcome: &Outcome,
    now: Timestamp,
) -> Condition {
    let status = if outcome.phase == Phase::Completed {
        "True"
    } else {
        "False"
    };
    let since = prev
        .into_iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == READY_CONDITION && c.status == status && c.reason == outcome.reason)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: READY_CONDITION.into(),
        status: status.into(),
        reason: outcome.reason.into(),
        message: outcome.message.clone(),
        observed_generation: Some(generation),
        last_transition_time: since,
    }
}

/// Every node's `captureFiles` entry, keyed by its address.
pub fn entries(
    nodes: &BTreeMap<String, NodeProgress>,
    format: OutputFormat,
) -> BTreeMap<String, NodeCapture> {
    nodes
        .values()
        .map(|p| (p.node_ip.clone(), p.to_status(format)))
        .collect()
}

/// Whether `new` differs from `prev` only in its counters (packets, drops,
/// file sizes and names): such news is written at most once a second,
/// while a transition (a phase, a node's state or message, the nodes
/// themselves) is written at once.
pub fn only_counters_moved(
    prev: Option<&PacketCaptureConfigStatus>,
    new: &PacketCaptureConfigStatus,
) -> bool {
    let Some(prev) = prev else {
        return false;
    };
    let without_counters = |s: &PacketCaptureConfigStatus| {
        let mut s = s.clone();
        s.packets = None;
        s.dropped = None;
        for e in s.capture_files.values_mut() {
            (e.packets, e.dropped, e.filtered, e.file_size) = (0, 0, 0, 0);
            e.output_file.clear();
        }
        s
    };
    without_counters(prev) == without_counters(new)
}

/// The whole status of `generation`.
pub fn build(
    prev: Option<&PacketCaptureConfigStatus>,
    generation: i64,
    nodes: &BTreeMap<String, NodeProgress>,
    spec: &PacketCaptureConfigSpec,
    outcome: &Outcome,
    now: Timestamp,
) -> PacketCaptureConfigStatus {
    let same = same_generation(prev, generation);
    // Set once a node has started capturing: a node that failed before it
    // could (no agent, a start refused) starts the duration of no other.
    // (A node stopped or failed before it started has no start time.)
    let began =
        |p: &NodeProgress| matches!(p.state, CaptureState::Running | CaptureState::Completed);
    let start_time = same
        .and_then(|s| s.start_time.clone())
        .or_else(|| nodes.values().filter_map(|p| p.start_time).min().map(Time))
        .or_else(|| nodes.values().any(began).then_some(Time(now)));
    let completion_time = if outcome.phase.is_final() {
        same.filter(|s| s.phase.is_some_and(Phase::is_final))
            .and_then(|s| s.completion_time.clone())
            .or_else(|| nodes.values().filter_map(|p| p.end_time).max().map(Time))
            .or(Some(Time(now)))
    } else {
        None
    };
    let capture_files = if nodes.len() <= MAX_STATUS_NODES {
        entries(nodes, spec.output_format)
    } else {
        let deadline = start_time
            .as_ref()
            .map(|t| t.0 + SignedDuration::from_secs(spec.duration.into()));
        let late = |p: &NodeProgress| !p.state.is_final() && deadline.is_some_and(|d| now > d);
        nodes
            .values()
            .filter(|p| p.state == CaptureState::Failed || late(p))
            .take(MAX_STATUS_NODES)
            .map(|p| (p.node_ip.clone(), p.to_status(spec.output_format)))
            .collect()
    };
    let mut node_states = BTreeMap::new();
    for p in nodes.values() {
        *node_states.entry(p.state.to_string()).or_default() += 1;
    }
    let omitted = nodes.len() - capture_files.len();
    PacketCaptureConfigStatus {
        phase: Some(outcome.phase),
        message: Some(outcome.message.clone()),
        observed_generation: Some(generation),
        conditions: vec![ready_condition(prev, generation, outcome, now)],
        start_time,
        completion_time,
        nodes: Some(nodes.len() as u32),
        packets: Some(nodes.values().map(|p| p.packets).sum()),
        dropped: Some(nodes.values().map(|p| p.dropped).sum()),
        capture_files,
        node_states,
        capture_files_omitted: (omitted > 0).then_some(omitted as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_capture_common::crd::STDOUT_OUTPUT_FILE;

    fn node(name: &str, state: CaptureState, packets: u64) -> (String, NodeProgress) {
        let mut p = NodeProgress::new(name, &format!("192.168.0.{}", name.len()), "id");
        p.state = state;
        p.packets = packets;
        p.output_file = format!("/var/lib/packet-captures/x-{name}.pcap");
        p.file_size = 100;
        (name.to_string(), p)
    }

    fn nodes(list: &[(&str, CaptureState)]) -> BTreeMap<String, NodeProgress> {
        list.iter().map(|(n, s)| node(n, *s, 5)).collect()
    }

    #[test]
    fn phases_follow_the_nodes() {
        use CaptureState::*;
        let phase = |l: &[(&str, CaptureState)]| summarize(&nodes(l)).phase;
        assert_eq!(phase(&[("a", Starting), ("bb", Starting)]), Phase::Starting);
        assert_eq!(phase(&[("a", Running), ("bb", Starting)]), Phase::Running);
        assert_eq!(phase(&[("a", Completed), ("bb", Running)]), Phase::Running);
        assert_eq!(
            phase(&[("a", Completed), ("bb", Stopped)]),
            Phase::Completed
        );
        let o = summarize(&nodes(&[("a", Completed), ("bb", Failed)]));
        assert_eq!(o.phase, Phase::Failed);
        assert_eq!(o.reason, "NodeFailed");
        assert_eq!(
            o.message,
            "capture failed on 1 of 2 nodes (node bb: failed); 1 node completed"
        );
        assert_eq!(
            summarize(&nodes(&[("a", Completed)])).message,
            COMPLETED_MESSAGE
        );
        let mut waiting = nodes(&[("a", Running), ("bb", Starting)]);
        waiting.get_mut("bb").unwrap().waiting_since = Some(Timestamp::now());
        assert_eq!(
            summarize(&waiting).message,
            "capturing on 1 of 2 nodes, 1 waiting for its agent"
        );
    }

    #[test]
    fn the_message_names_a_bounded_number_of_failed_nodes() {
        let many: Vec<(String, NodeProgress)> = (0..5_000)
            .map(|i| node(&format!("n{i:04}"), CaptureState::Failed, 0))
            .collect();
        let outcome = summarize(&many.into_iter().collect());
        assert_eq!(outcome.phase, Phase::Failed);
        assert_eq!(outcome.message.matches("node n").count(), MESSAGE_NODES);
        assert!(
            outcome
                .message
                .contains("; and 4990 more, in captureFiles); 0 nodes completed"),
            "{}",
            outcome.message
        );
        assert!(outcome.message.len() < 2_000, "{}", outcome.message.len());
    }

    #[test]
    fn a_failed_node_fails_the_capture_once_every_node_has_ended() {
        use CaptureState::*;
        let phase = |l: &[(&str, CaptureState)]| summarize(&nodes(l)).phase;
        // Decided when the last node ends; until then the others go on.
        assert_eq!(phase(&[("a", Failed), ("bb", Running)]), Phase::Running);
        assert_eq!(phase(&[("a", Failed), ("bb", Starting)]), Phase::Running);
        assert_eq!(phase(&[("a", Failed), ("bb", Stopped)]), Phase::Failed);
        assert_eq!(phase(&[("a", Failed), ("bb", Failed)]), Phase::Failed);
        // Stopped by the controller: ended, not failed.
        assert_eq!(phase(&[("a", Stopped), ("bb", Stopped)]), Phase::Completed);
        let unreachable = {
            let mut n = nodes(&[("a", Failed), ("bb", Completed)]);
            n.get_mut("a").unwrap().unreachable = true;
            summarize(&n)
        };
        assert_eq!(
            (unreachable.phase, unreachable.reason),
            (Phase::Failed, "AgentUnreachable")
        );
    }

    #[test]
    fn status_has_the_seed_shape_and_totals() {
        use CaptureState::*;
        let n = nodes(&[("a", Completed), ("bb", Completed)]);
        let o = summarize(&n);
        let now = Timestamp::now();
        let s = build(None, 3, &n, &spec(OutputFormat::Pcap), &o, now);
        assert_eq!(s.phase, Some(Phase::Completed));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.nodes, Some(2));
        assert_eq!(s.packets, Some(10));
        assert_eq!(s.completion_time, Some(Time(now)));
        let entry = &s.capture_files["192.168.0.1"];
        assert_eq!(entry.status, CaptureState::Completed);
        assert_eq!(entry.node, "a");
        assert_eq!(entry.file_size, 100);
        assert_eq!(s.conditions[0].status, "True");
        let json = serde_json::to_value(&s).unwrap();
        let e = &json["captureFiles"]["192.168.0.2"];
        assert_eq!(e["output_file"], "/var/lib/packet-captures/x-bb.pcap");
        assert_eq!(e["file_size"], 100);

        let stdout = build(None, 3, &n, &spec(OutputFormat::Stdout), &o, now);
        let e = &stdout.capture_files["192.168.0.1"];
        assert_eq!(
            (e.output_file.as_str(), e.file_size),
            (STDOUT_OUTPUT_FILE, 0)
        );
    }

    #[test]
    fn times_and_transitions_are_kept_across_reconciles() {
        use CaptureState::*;
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let n = nodes(&[("a", Running)]);
        let pcap = spec(OutputFormat::Pcap);
        let first = build(None, 1, &n, &pcap, &summarize(&n), t0);
        let again = build(Some(&first), 1, &n, &pcap, &summarize(&n), t1);
        assert_eq!(again.start_time, Some(Time(t0)));
        assert_eq!(again.conditions[0].last_transition_time, Time(t0));
        // A new generation starts afresh.
        let next = build(Some(&first), 2, &n, &pcap, &summarize(&n), t1);
        assert_eq!(next.start_time, Some(Time(t1)));

        // A node that failed before it started (no agent) starts no
        // clock: a node still waiting for its agent gets the whole
        // duration once it starts.
        let n = nodes(&[("a", Failed), ("bb", Starting)]);
        let waiting = build(None, 1, &n, &pcap, &summarize(&n), t0);
        assert_eq!(waiting.start_time, None);
        let n = nodes(&[("a", Failed), ("bb", Running)]);
        let running = build(Some(&waiting), 1, &n, &pcap, &summarize(&n), t1);
        assert_eq!(running.start_time, Some(Time(t1)));
        // Nor does one stopped by request before it started.
        let n = nodes(&[("a", Stopped)]);
        let stopped = build(None, 1, &n, &pcap, &summarize(&n), t0);
        assert_eq!(stopped.start_time, None);
    }

    fn spec(output_format: OutputFormat) -> PacketCaptureConfigSpec {
        PacketCaptureConfigSpec {
            output_format,
            duration: 60,
            ..Default::default()
        }
    }

    #[test]
    fn a_large_capture_lists_the_nodes_that_need_attention_and_counts_all() {
        use CaptureState::*;
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let n: BTreeMap<String, NodeProgress> = (0..250)
            .map(|i| {
                let name = format!("n{i}");
                let mut p =
                    NodeProgress::new(&name, &format!("10.0.{}.{}", i / 250, i % 250), "id");
                p.state = if i < 3 { Failed } else { Running };
                p.start_time = Some(t0);
                (name, p)
            })
            .collect();
        let pcap = spec(OutputFormat::Pcap);
        let o = summarize(&n);
        let s = build(None, 1, &n, &pcap, &o, t0 + SignedDuration::from_secs(10));
        assert_eq!(s.capture_files.len(), 3, "the failed nodes");
        assert_eq!(s.capture_files_omitted, Some(247));
        assert_eq!(
            s.node_states,
            BTreeMap::from([("failed".into(), 3), ("running".into(), 247)])
        );
        assert_eq!(s.nodes, Some(250));
        // Past the duration, the nodes still running need attention too,
        // up to the bound.
        let late = build(
            Some(&s),
            1,
            &n,
            &pcap,
            &o,
            t0 + SignedDuration::from_secs(61),
        );
        assert_eq!(late.capture_files.len(), MAX_STATUS_NODES);
        // At the bound, every node is listed, in the seed's shape.
        let n: BTreeMap<String, NodeProgress> = n.into_iter().take(MAX_STATUS_NODES).collect();
        let small = build(None, 1, &n, &pcap, &summarize(&n), t0);
        assert_eq!(small.capture_files.len(), MAX_STATUS_NODES);
        assert_eq!(small.capture_files_omitted, None);
    }

    #[test]
    fn counters_are_not_transitions() {
        use CaptureState::*;
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let pcap = spec(OutputFormat::Pcap);
        let mut n = nodes(&[("a", Running), ("bb", Running)]);
        let first = build(None, 1, &n, &pcap, &summarize(&n), t0);
        assert!(!only_counters_moved(None, &first));
        n.get_mut("a").unwrap().packets += 10;
        n.get_mut("a").unwrap().file_size += 1000;
        let more = build(Some(&first), 1, &n, &pcap, &summarize(&n), t0);
        assert!(only_counters_moved(Some(&first), &more));
        n.get_mut("bb").unwrap().state = Completed;
        let ended = build(Some(&more), 1, &n, &pcap, &summarize(&n), t0);
        assert!(!only_counters_moved(Some(&more), &ended));
    }
}
