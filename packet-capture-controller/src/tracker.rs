//! What the controller knows about the node captures it drives: one
//! `WatchCapture` task per node capture updates the node's progress and asks
//! for a reconcile of its `PacketCaptureConfig`, which writes the status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use packet_capture_common::crd::{
    NodeCapture, OutputFormat, PacketCaptureConfig, STDOUT_OUTPUT_FILE,
};
use packet_capture_proto::v1::{Capture, CaptureState};
use tokio::task::AbortHandle;
use tonic::Code;

use crate::agents::{AgentEndpoint, AgentPool, is_final};
use crate::backoff::Backoff;

/// A node capture's state, spelled as in `status.captureFiles[*].status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Starting,
    Running,
    Completed,
    Failed,
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Starting,
            Self::Running,
            Self::Completed,
            Self::Failed,
            Self::Stopped,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
    }

    fn from_agent(state: i32) -> Self {
        match CaptureState::try_from(state) {
            Ok(CaptureState::Running) => Self::Running,
            Ok(CaptureState::Completed) => Self::Completed,
            Ok(CaptureState::Failed) => Self::Failed,
            Ok(CaptureState::Stopped) => Self::Stopped,
            _ => Self::Starting,
        }
    }
}

/// One node's part of a capture.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgress {
    pub node: String,
    pub node_ip: String,
    pub capture_id: String,
    pub state: NodeState,
    pub packets: u64,
    pub dropped: u64,
    pub output_file: String,
    pub file_size: u64,
    pub message: Option<String>,
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    /// The node failed because its agent did not answer.
    pub unreachable: bool,
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> Option<Timestamp> {
    let t = t?;
    Timestamp::new(t.seconds, t.nanos).ok()
}

impl NodeProgress {
    pub fn new(ep_node: &str, node_ip: &str, capture_id: &str) -> Self {
        Self {
            node: ep_node.to_string(),
            node_ip: node_ip.to_string(),
            capture_id: capture_id.to_string(),
            state: NodeState::Starting,
            packets: 0,
            dropped: 0,
            output_file: String::new(),
            file_size: 0,
            message: None,
            start_time: None,
            end_time: None,
            unreachable: false,
        }
    }

    /// Marks the node failed (keeping what it captured).
    pub fn fail(&mut self, message: impl Into<String>, unreachable: bool) {
        self.state = NodeState::Failed;
        self.message = Some(message.into());
        self.unreachable = unreachable;
        self.end_time.get_or_insert_with(Timestamp::now);
    }

    /// Takes the agent's view of the capture.
    pub fn update(&mut self, c: &Capture) {
        self.state = NodeState::from_agent(c.state);
        self.packets = c.packets;
        self.dropped = c.dropped;
        self.output_file = c.output_file.clone();
        self.file_size = c.file_size;
        self.message = (!c.message.is_empty()).then(|| c.message.clone());
        if let Some(t) = timestamp(c.start_time.as_ref()) {
            self.start_time = Some(t);
        }
        if let Some(t) = timestamp(c.end_time.as_ref()) {
            self.end_time = Some(t);
        } else if self.state.is_final() {
            self.end_time.get_or_insert_with(Timestamp::now);
        }
    }

    /// What the status said about a node (after a controller restart).
    pub fn from_status(node_ip: &str, entry: &NodeCapture, capture_id: &str) -> Self {
        Self {
            node: entry.node.clone(),
            node_ip: node_ip.to_string(),
            capture_id: capture_id.to_string(),
            state: NodeState::parse(&entry.status).unwrap_or(NodeState::Starting),
            packets: entry.packets,
            dropped: entry.dropped,
            output_file: entry.output_file.clone(),
            file_size: entry.file_size,
            message: entry.message.clone(),
            start_time: None,
            end_time: None,
            unreachable: false,
        }
    }

    /// The node's entry in `status.captureFiles`.
    pub fn to_status(&self, format: OutputFormat) -> NodeCapture {
        let (output_file, file_size) = if format == OutputFormat::Stdout {
            (STDOUT_OUTPUT_FILE.to_string(), 0)
        } else {
            (self.output_file.clone(), self.file_size)
        };
        NodeCapture {
            status: self.state.as_str().to_string(),
            output_file,
            file_size,
            node: self.node.clone(),
            packets: self.packets,
            dropped: self.dropped,
            message: self.message.clone(),
        }
    }
}

struct NodeTrack {
    progress: NodeProgress,
    task: Option<AbortHandle>,
}

impl Drop for NodeTrack {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct CrTrack {
    generation: i64,
    nodes: BTreeMap<String, NodeTrack>,
    announced: HashSet<String>,
}

/// The node captures of every `PacketCaptureConfig`, by uid.
pub struct Tracker {
    inner: Mutex<HashMap<String, CrTrack>>,
    trigger: UnboundedSender<ObjectRef<PacketCaptureConfig>>,
    this: Weak<Tracker>,
}

impl Tracker {
    /// `trigger` receives the `PacketCaptureConfig` to reconcile whenever a
    /// node's progress changes.
    pub fn new(trigger: UnboundedSender<ObjectRef<PacketCaptureConfig>>) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            inner: Mutex::default(),
            trigger,
            this: this.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CrTrack>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry<'a>(
        map: &'a mut HashMap<String, CrTrack>,
        uid: &str,
        generation: i64,
    ) -> &'a mut CrTrack {
        let track = map.entry(uid.to_string()).or_insert_with(|| CrTrack {
            generation,
            nodes: BTreeMap::new(),
            announced: HashSet::new(),
        });
        if track.generation != generation {
            *track = CrTrack {
                generation,
                nodes: BTreeMap::new(),
                announced: HashSet::new(),
            };
        }
        track
    }

    /// The nodes of `generation` (none if another generation is tracked).
    pub fn nodes(&self, uid: &str, generation: i64) -> BTreeMap<String, NodeProgress> {
        self.lock()
            .get(uid)
            .filter(|t| t.generation == generation)
            .map(|t| {
                t.nodes
                    .iter()
                    .map(|(n, track)| (n.clone(), track.progress.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets the nodes of any generation but `generation`, stopping their
    /// watches, and returns them.
    pub fn take_other_generations(&self, uid: &str, generation: i64) -> Vec<NodeProgress> {
        let mut map = self.lock();
        if map.get(uid).is_some_and(|t| t.generation != generation) {
            Self::drain(map.remove(uid))
        } else {
            Vec::new()
        }
    }

    /// The nodes of a removed track (their watches end as they drop).
    fn drain(track: Option<CrTrack>) -> Vec<NodeProgress> {
        track
            .map(|mut t| {
                std::mem::take(&mut t.nodes)
                    .into_values()
                    .map(|n| n.progress.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records a node's progress (replacing any earlier capture of the node,
    /// whose watch ends).
    pub fn set(&self, uid: &str, generation: i64, progress: NodeProgress) {
        let mut map = self.lock();
        let track = Self::entry(&mut map, uid, generation);
        match track.nodes.get_mut(&progress.node) {
            Some(n) if n.progress.capture_id == progress.capture_id => n.progress = progress,
            _ => {
                track.nodes.insert(
                    progress.node.clone(),
                    NodeTrack {
                        progress,
                        task: None,
                    },
                );
            }
        }
    }

    /// Forgets one node (its watch ends) and returns what was known.
    pub fn remove_node(&self, uid: &str, node: &str) -> Option<NodeProgress> {
        let mut map = self.lock();
        // Dropping the track ends its watch.
        let track = map.get_mut(uid)?.nodes.remove(node)?;
        Some(track.progress.clone())
    }

    /// Forgets a capture entirely (its watches end) and returns its nodes.
    pub fn forget(&self, uid: &str) -> Vec<NodeProgress> {
        let track = self.lock().remove(uid);
        Self::drain(track)
    }

    /// True the first time `key` is announced for this generation (so an
    /// Event is published once however often reconcile runs).
    pub fn announce(&self, uid: &str, generation: i64, key: &str) -> bool {
        let mut map = self.lock();
        Self::entry(&mut map, uid, generation)
            .announced
            .insert(key.to_string())
    }

    /// Follows a tracked node capture with `WatchCapture` until it ends.
    pub fn follow(
        &self,
        obj: ObjectRef<PacketCaptureConfig>,
        uid: &str,
        generation: i64,
        pool: Arc<AgentPool>,
        backoff: Backoff,
        ep: AgentEndpoint,
    ) {
        let mut map = self.lock();
        let Some(track) = map
            .get_mut(uid)
            .filter(|t| t.generation == generation)
            .and_then(|t| t.nodes.get_mut(&ep.node))
        else {
            return;
        };
        if track.task.is_some() || track.progress.state.is_final() {
            return;
        }
        let key = WatchKey {
            obj,
            uid: uid.to_string(),
            generation,
            node: ep.node.clone(),
            id: track.progress.capture_id.clone(),
        };
        let task = tokio::spawn(follow(self.this.clone(), pool, backoff, ep, key));
        track.task = Some(task.abort_handle());
    }

    /// Applies `f` to a node's progress if it still is the same capture, and
    /// asks for a reconcile.
    fn update(&self, key: &WatchKey, f: impl FnOnce(&mut NodeProgress)) {
        {
            let mut map = self.lock();
            let Some(track) = map
                .get_mut(&key.uid)
                .filter(|t| t.generation == key.generation)
                .and_then(|t| t.nodes.get_mut(&key.node))
                .filter(|n| n.progress.capture_id == key.id)
            else {
                return;
            };
            f(&mut track.progress);
            if track.progress.state.is_final() {
                track.task = None;
            }
        }
        // The receiver is gone only when the controller is shutting down.
        let _ = self.trigger.unbounded_send(key.obj.clone());
    }
}

struct WatchKey {
    obj: ObjectRef<PacketCaptureConfig>,
    uid: String,
    generation: i64,
    node: String,
    id: String,
}

/// The watch task: follows the capture, reconnecting with backoff; a node
/// whose agent stays unreachable, or forgot the capture, fails.
async fn follow(
    tracker: Weak<Tracker>,
    pool: Arc<AgentPool>,
    backoff: Backoff,
    ep: AgentEndpoint,
    key: WatchKey,
) {
    let mut failures = 0u32;
    loop {
        let last = match pool.watch(&ep, &key.id).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(c)) => {
                        failures = 0;
                        let Some(t) = tracker.upgrade() else { return };
                        t.update(&key, |p| p.update(&c));
                        if is_final(c.state) {
                            return;
                        }
                    }
                    Ok(None) => break "the watch ended before the capture did".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            },
            Err(s) if s.code() == Code::NotFound => {
                if let Some(t) = tracker.upgrade() {
                    t.update(&key, |p| {
                        p.fail(
                            format!(
                                "the agent on node {} no longer knows capture {} (did it restart?)",
                                ep.node, key.id
                            ),
                            false,
                        )
                    });
                }
                return;
            }
            Err(s) => s.message().to_string(),
        };
        if failures >= backoff.retries {
            if let Some(t) = tracker.upgrade() {
                t.update(&key, |p| {
                    p.fail(
                        format!(
                            "lost contact with the agent on node {} ({}): {last}",
                            ep.node, ep.uri
                        ),
                        true,
                    )
                });
            }
            return;
        }
        tracing::debug!(node = %ep.node, id = %key.id, "watch interrupted ({last}); reconnecting");
        tokio::time::sleep(backoff.delay(failures)).await;
        failures += 1;
    }
}
