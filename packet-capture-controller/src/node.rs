//! One node's part of a capture, and the rules that turn what its agent
//! reports (or fails to report) into the node's outcome.
//!
//! A node ends `completed` or `failed` as its agent says, `stopped` only when
//! the controller asked for the stop, and `failed` whenever the capture ended
//! in a way nobody asked for: the agent ended it on its own (it shut down or
//! restarted), forgot it, stopped answering, went away, or reported a state
//! this controller does not know.

use k8s_openapi::jiff::Timestamp;
use packet_capture_common::crd::{CaptureState, NodeCapture, OutputFormat, STOPPED_BY_REQUEST};
use packet_capture_proto::v1::Capture;

/// At most this many pod names per node in the status; the rest are
/// counted.
pub const MAX_LISTED_PODS: usize = 16;

/// One node's part of a capture.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgress {
    pub node: String,
    pub node_ip: String,
    pub capture_id: String,
    pub state: CaptureState,
    pub packets: u64,
    pub dropped: u64,
    pub filtered: u64,
    /// Where the capture's filter runs, as the agent says.
    pub filter_path: Option<String>,
    pub output_file: String,
    pub file_size: u64,
    pub message: Option<String>,
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    /// The node failed because its agent did not answer or is gone.
    pub unreachable: bool,
    /// The addresses the agent's capture selects, as it last reported them
    /// (unknown, so empty, until it has answered).
    pub targets: Vec<String>,
    /// The target pods on the node (`namespace/name`), as the agent last
    /// reported them (as planned until it has answered).
    pub pods: Vec<String>,
    /// Since when the node has been waiting for its agent to be ready: no
    /// capture runs there yet (see `plan`).
    pub waiting_since: Option<Timestamp>,
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<Timestamp> {
    let t = t?;
    Timestamp::new(t.seconds, t.nanos).ok()
}

impl NodeProgress {
    /// A node whose capture is about to be started.
    pub fn new(node: &str, node_ip: &str, capture_id: &str) -> Self {
        Self {
            node: node.to_string(),
            node_ip: node_ip.to_string(),
            capture_id: capture_id.to_string(),
            state: CaptureState::Starting,
            packets: 0,
            dropped: 0,
            filtered: 0,
            filter_path: None,
            output_file: String::new(),
            file_size: 0,
            message: None,
            start_time: None,
            end_time: None,
            unreachable: false,
            targets: Vec::new(),
            pods: Vec::new(),
            waiting_since: None,
        }
    }

    /// Marks the node failed (keeping what it captured).
    pub fn fail(&mut self, message: impl Into<String>, unreachable: bool, now: Timestamp) {
        self.state = CaptureState::Failed;
        self.message = Some(message.into());
        self.unreachable = unreachable;
        self.end_time.get_or_insert(now);
    }

    /// Takes the agent's counters, file and times, not its state. The
    /// agent's clock may be ahead of the controller's: no time is taken as
    /// later than `now`. A start, once known, stays.
    fn take_counts(&mut self, c: &Capture, now: Timestamp) {
        self.packets = c.packets;
        self.dropped = c.dropped;
        self.filtered = c.filtered;
        self.filter_path = (!c.filter_path.is_empty()).then(|| c.filter_path.clone());
        self.output_file = c.output_file.clone();
        self.file_size = c.file_size;
        self.message = (!c.message.is_empty()).then(|| c.message.clone());
        if self.start_time.is_none() {
            self.start_time = timestamp(c.start_time.as_ref()).map(|t| t.min(now));
        }
        if let Some(t) = timestamp(c.end_time.as_ref()) {
            self.end_time = Some(t.min(now));
        }
        if let Some(spec) = &c.spec {
            self.targets = spec.target_ips.clone();
            self.pods = spec
                .pods
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
        }
    }

    /// Takes the agent's view of a capture (a StartCapture answer or a
    /// WatchCapture message). `stopped` by request (the controller's, for
    /// a stop annotation) ends the node; otherwise the agent ended it on
    /// its own, as it does when it shuts down: the node fails, as it does
    /// on a state this build does not know.
    pub fn update(&mut self, c: &Capture, now: Timestamp) {
        self.take_counts(c, now);
        match c.capture_state() {
            Ok(CaptureState::Stopped) if c.message == STOPPED_BY_REQUEST => {
                self.state = CaptureState::Stopped;
            }
            Ok(CaptureState::Stopped) => {
                let said = self
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                self.fail(
                    format!(
                        "the agent on node {} ended the capture without being asked (it shut down or restarted){said}",
                        self.node
                    ),
                    false,
                    now,
                );
            }
            Ok(state) => self.state = state,
            Err(unknown) => self.fail(
                format!(
                    "the agent on node {} reported capture state {}, which this controller does not know",
                    self.node, unknown.value
                ),
                false,
                now,
            ),
        }
        if self.state.is_final() {
            self.end_time.get_or_insert(now);
        }
    }

    /// Takes the agent's answer to a start the controller sent at `sent`
    /// ([`NodeProgress::update`]). A node that had not started before
    /// starts within the call by the controller's clock, whatever the
    /// agent's says: the capture's deadline and the time left for nodes
    /// that start later are reckoned from it, and an agent whose clock is
    /// behind would otherwise end them all early.
    pub fn started(&mut self, c: &Capture, sent: Timestamp, now: Timestamp) {
        let known = self.start_time.is_some();
        self.update(c, now);
        if !known {
            // Not `clamp`: a wall clock stepped back between the two
            // readings must not panic.
            self.start_time = self.start_time.map(|t| t.max(sent).min(now));
        }
    }

    /// Takes an answer that may be older than what the node's watch has
    /// reported since (a SetTargets answer is recorded once every node's
    /// call has returned): its targets and pods always; its state,
    /// counters and file only if none of them is behind. A node that has
    /// ended stays as it ended.
    pub fn merge(&mut self, c: &Capture, now: Timestamp) {
        let mut answered = self.clone();
        answered.update(c, now);
        let behind = self.state.is_final()
            || (!answered.state.is_final()
                && ((self.state, answered.state)
                    == (CaptureState::Running, CaptureState::Starting)
                    || answered.packets < self.packets
                    || answered.dropped < self.dropped
                    || answered.filtered < self.filtered
                    || answered.file_size < self.file_size));
        if behind {
            self.targets = answered.targets;
            self.pods = answered.pods;
        } else {
            *self = answered;
        }
    }

    /// What the status said about a node (after a controller restart).
    pub fn from_status(node_ip: &str, entry: &NodeCapture, capture_id: &str) -> Self {
        Self {
            state: entry.status,
            packets: entry.packets,
            dropped: entry.dropped,
            filtered: entry.filtered,
            filter_path: entry.filter_path.clone(),
            output_file: entry.output_file.clone(),
            file_size: entry.file_size,
            message: entry.message.clone(),
            pods: entry.pods.clone(),
            ..Self::new(&entry.node, node_ip, capture_id)
        }
    }

    /// The node's entry in `status.captureFiles`.
    pub fn to_status(&self, format: OutputFormat) -> NodeCapture {
        let (output_file, file_size) = match format.no_file() {
            Some(note) => (note.to_string(), 0),
            None => (self.output_file.clone(), self.file_size),
        };
        NodeCapture {
            status: self.state,
            output_file,
            file_size,
            node: self.node.clone(),
            packets: self.packets,
            dropped: self.dropped,
            filtered: self.filtered,
            filter_path: self.filter_path.clone(),
            message: self.message.clone(),
            pods: listed(&self.pods),
        }
    }
}

/// At most [`MAX_LISTED_PODS`] names, then how many more there are.
fn listed(pods: &[String]) -> Vec<String> {
    let mut out: Vec<String> = pods.iter().take(MAX_LISTED_PODS).cloned().collect();
    if pods.len() > MAX_LISTED_PODS {
        out.push(format!("and {} more", pods.len() - MAX_LISTED_PODS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_capture_common::crd::{STDOUT_OUTPUT_FILE, STREAM_OUTPUT_FILE};
    use packet_capture_proto::v1;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn report(state: i32, message: &str) -> Capture {
        Capture {
            id: "id".into(),
            state,
            packets: 5,
            file_size: 524,
            output_file: "/var/lib/packet-captures/x.pcap".into(),
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_start_is_reckoned_by_the_controllers_clock() {
        let at = |s: i64| {
            Some(prost_types::Timestamp {
                seconds: t(s).as_second(),
                nanos: 0,
            })
        };
        let running = |start: i64| Capture {
            start_time: at(start),
            ..report(v1::CaptureState::Running as i32, "")
        };
        // Sent at 10, answered at 11: an agent an hour behind, or ahead,
        // started within the call; one in step keeps its own time.
        for (agent, taken) in [(-3600, 10), (3600, 11), (10, 10)] {
            let mut p = NodeProgress::new("n1", "192.168.0.1", "id");
            p.started(&running(agent), t(10), t(11));
            assert_eq!(p.start_time, Some(t(taken)), "agent's clock at {agent}");
        }
        // Known already (a node followed again): kept.
        let mut p = NodeProgress::new("n1", "192.168.0.1", "id");
        p.start_time = Some(t(2));
        p.started(&running(-3600), t(10), t(11));
        assert_eq!(p.start_time, Some(t(2)));
        // A watch's report never moves it, nor takes an end from the future.
        p.update(
            &Capture {
                end_time: at(3600),
                ..running(5)
            },
            t(20),
        );
        assert_eq!((p.start_time, p.end_time), (Some(t(2)), Some(t(20))));
    }

    fn after(state: i32, message: &str) -> NodeProgress {
        let mut p = NodeProgress::new("n1", "192.168.0.1", "id");
        p.update(&report(state, message), t(9));
        p
    }

    #[test]
    fn the_agents_states_are_taken_as_they_are() {
        for (wire, state) in [
            (v1::CaptureState::Starting, CaptureState::Starting),
            (v1::CaptureState::Running, CaptureState::Running),
            (v1::CaptureState::Completed, CaptureState::Completed),
            (v1::CaptureState::Failed, CaptureState::Failed),
        ] {
            let p = after(wire as i32, "reached maxPackets (5)");
            assert_eq!(p.state, state);
            assert_eq!((p.packets, p.file_size), (5, 524));
            assert_eq!(p.message.as_deref(), Some("reached maxPackets (5)"));
            assert_eq!(p.end_time.is_some(), state.is_final(), "{state}");
        }
    }

    #[test]
    fn a_stop_nobody_asked_for_fails_the_node_saying_so() {
        let p = after(
            v1::CaptureState::Stopped as i32,
            "stopped: the agent is shutting down",
        );
        assert_eq!(p.state, CaptureState::Failed);
        assert!(!p.unreachable);
        assert_eq!(
            p.message.as_deref(),
            Some(
                "the agent on node n1 ended the capture without being asked (it shut down or restarted): stopped: the agent is shutting down"
            )
        );
        // What it wrote until then is kept.
        assert_eq!((p.packets, p.end_time), (5, Some(t(9))));
        let quiet = after(v1::CaptureState::Stopped as i32, "");
        assert!(
            quiet
                .message
                .as_deref()
                .unwrap()
                .ends_with("(it shut down or restarted)")
        );
    }

    #[test]
    fn an_unknown_state_fails_the_node_naming_the_value() {
        for value in [0, 42] {
            let p = after(value, "");
            assert_eq!(p.state, CaptureState::Failed);
            assert_eq!(
                p.message.unwrap(),
                format!(
                    "the agent on node n1 reported capture state {value}, which this controller does not know"
                )
            );
        }
    }

    #[test]
    fn an_older_answer_gives_only_its_targets_and_pods() {
        let answer = |state: v1::CaptureState, packets: u64, target: &str| Capture {
            state: state as i32,
            packets,
            file_size: packets * 100,
            spec: Some(v1::CaptureSpec {
                target_ips: vec![target.into()],
                pods: vec![v1::TargetPod {
                    namespace: "default".into(),
                    name: "web".into(),
                    ips: vec![target.into()],
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        // The watch recorded the end while the answer was on its way.
        let mut p = after(
            v1::CaptureState::Completed as i32,
            "duration of 60s elapsed",
        );
        p.merge(&answer(v1::CaptureState::Running, 3, "10.0.0.2"), t(8));
        assert_eq!((p.state, p.packets), (CaptureState::Completed, 5));
        assert_eq!(p.message.as_deref(), Some("duration of 60s elapsed"));
        assert_eq!(
            (p.targets, p.pods),
            (
                vec!["10.0.0.2".to_string()],
                vec!["default/web".to_string()]
            )
        );
        // Counters that went back are an older snapshot.
        let mut p = after(v1::CaptureState::Running as i32, "");
        p.merge(&answer(v1::CaptureState::Running, 3, "10.0.0.2"), t(8));
        assert_eq!(
            (p.state, p.packets, p.file_size),
            (CaptureState::Running, 5, 524)
        );
        assert_eq!(p.targets, ["10.0.0.2"]);
        // A newer answer is taken whole, an end included.
        p.merge(&answer(v1::CaptureState::Running, 9, "10.0.0.3"), t(10));
        assert_eq!((p.packets, p.file_size), (9, 900));
        p.merge(&answer(v1::CaptureState::Completed, 9, "10.0.0.3"), t(11));
        assert_eq!(p.state, CaptureState::Completed);
    }

    #[test]
    fn status_entries_go_both_ways() {
        let mut p = after(
            v1::CaptureState::Completed as i32,
            "duration of 60s elapsed",
        );
        p.dropped = 1;
        let entry = p.to_status(OutputFormat::Pcap);
        assert_eq!(entry.status, CaptureState::Completed);
        let back = NodeProgress::from_status("192.168.0.1", &entry, "id");
        assert_eq!(
            (back.state, back.packets, back.dropped, back.message),
            (p.state, 5, 1, p.message.clone())
        );
        for (format, note) in [
            (OutputFormat::Stdout, STDOUT_OUTPUT_FILE),
            (OutputFormat::Stream, STREAM_OUTPUT_FILE),
        ] {
            let entry = p.to_status(format);
            assert_eq!((entry.output_file.as_str(), entry.file_size), (note, 0));
        }
    }
}
