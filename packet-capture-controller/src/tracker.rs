//! What the controller knows about the node captures it drives: one
//! `WatchCapture` task per node capture updates the node's progress and asks
//! for a reconcile of its `PacketCaptureConfig`, which writes the status.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use packet_capture_common::crd::PacketCaptureConfig;
use tokio::task::AbortHandle;
use tonic::Code;

use crate::agents::{AgentEndpoint, AgentPool};
use crate::backoff::Backoff;
use crate::node::NodeProgress;

/// How long a node that owes a sweep waits before it is tried again (see
/// [`Tracker::owed_sweeps`]); the capture is reconciled that often while
/// one is owed.
pub const OWED_SWEEP_RETRY: Duration = Duration::from_secs(15);

/// A node's progress, and the watch that follows it.
struct NodeTrack {
    progress: NodeProgress,
    /// The watch task's number (so a task that outlived its node cannot
    /// update a later one) and handle.
    watch: Option<(u64, AbortHandle)>,
}

impl Drop for NodeTrack {
    fn drop(&mut self) {
        self.unwatch();
    }
}

impl NodeTrack {
    fn unwatch(&mut self) {
        if let Some((_, task)) = self.watch.take() {
            task.abort();
        }
    }

    /// Changes the progress by `f`, unless the node has ended: it stays as
    /// it ended (what a reconcile decided or was answered on an earlier
    /// snapshot must not undo what the watch has recorded since), and its
    /// watch ends with it.
    fn change(&mut self, f: impl FnOnce(&mut NodeProgress)) {
        if !self.progress.state.is_final() {
            f(&mut self.progress);
        }
        if self.progress.state.is_final() {
            self.unwatch();
        }
    }
}

/// The nodes of one generation of a `PacketCaptureConfig`.
struct CrTrack {
    generation: i64,
    nodes: BTreeMap<String, NodeTrack>,
}

/// The node captures of every `PacketCaptureConfig`, by uid.
pub struct Tracker {
    inner: Mutex<HashMap<String, CrTrack>>,
    /// By uid, the nodes where stopping a capture failed (an agent that did
    /// not answer), each with when to try again: they are swept again until
    /// one succeeds, whatever generation the capture is at by then.
    owed: Mutex<HashMap<String, BTreeMap<String, Instant>>>,
    trigger: UnboundedSender<ObjectRef<PacketCaptureConfig>>,
    watches: AtomicU64,
    this: Weak<Tracker>,
}

impl Tracker {
    /// `trigger` receives the `PacketCaptureConfig` to reconcile whenever a
    /// node's progress changes.
    pub fn new(trigger: UnboundedSender<ObjectRef<PacketCaptureConfig>>) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            inner: Mutex::default(),
            owed: Mutex::default(),
            trigger,
            watches: AtomicU64::new(0),
            this: this.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CrTrack>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Whether a node capture of `uid` selects any of `ips` now, by
    /// address.
    pub fn captures_any(&self, uid: &str, ips: &[String]) -> bool {
        !ips.is_empty()
            && self.lock().get(uid).is_some_and(|t| {
                t.nodes.values().any(|n| {
                    n.progress
                        .targets
                        .iter()
                        .any(|t| ips.iter().any(|ip| crate::targets::names_address(t, ip)))
                })
            })
    }

    /// The nodes of any generation but `generation`.
    pub fn other_generations(&self, uid: &str, generation: i64) -> Vec<NodeProgress> {
        self.lock()
            .get(uid)
            .filter(|t| t.generation != generation)
            .map(|t| t.nodes.values().map(|n| n.progress.clone()).collect())
            .unwrap_or_default()
    }

    /// Forgets the nodes of any generation but `generation`, stopping their
    /// watches.
    pub fn forget_other_generations(&self, uid: &str, generation: i64) {
        let mut map = self.lock();
        if map.get(uid).is_some_and(|t| t.generation != generation) {
            map.remove(uid);
        }
    }

    /// Records a node's progress (replacing any earlier capture of the node,
    /// whose watch ends). A node of the same capture that has ended stays as
    /// it ended.
    pub fn set(&self, uid: &str, generation: i64, progress: NodeProgress) {
        let mut map = self.lock();
        let track = map.entry(uid.to_string()).or_insert_with(|| CrTrack {
            generation,
            nodes: BTreeMap::new(),
        });
        if track.generation != generation {
            *track = CrTrack {
                generation,
                nodes: BTreeMap::new(),
            };
        }
        match track.nodes.get_mut(&progress.node) {
            Some(n) if n.progress.capture_id == progress.capture_id => n.change(|p| *p = progress),
            _ => {
                track.nodes.insert(
                    progress.node.clone(),
                    NodeTrack {
                        progress,
                        watch: None,
                    },
                );
            }
        }
    }

    /// Changes a node's progress by `f` under the lock, if the node still
    /// runs `capture_id` in `generation`, so nothing its watch records
    /// meanwhile is lost; a node that has ended stays as it ended.
    pub fn modify(
        &self,
        uid: &str,
        generation: i64,
        node: &str,
        capture_id: &str,
        f: impl FnOnce(&mut NodeProgress),
    ) {
        let mut map = self.lock();
        if let Some(track) = map
            .get_mut(uid)
            .filter(|t| t.generation == generation)
            .and_then(|t| t.nodes.get_mut(node))
            .filter(|n| n.progress.capture_id == capture_id)
        {
            track.change(f);
        }
    }

    /// Forgets one node (its watch ends) and returns what was known.
    pub fn remove_node(&self, uid: &str, node: &str) -> Option<NodeProgress> {
        let mut map = self.lock();
        let track = map.get_mut(uid)?.nodes.remove(node)?;
        Some(track.progress.clone())
    }

    /// Records that `node` still runs a capture of `uid` it was told to
    /// stop (see [`Tracker::owed_sweeps`]), to be tried again after
    /// [`OWED_SWEEP_RETRY`].
    pub fn owe_sweep(&self, uid: &str, node: &str) {
        let mut owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        owed.entry(uid.to_string())
            .or_default()
            .insert(node.to_string(), Instant::now() + OWED_SWEEP_RETRY);
    }

    /// The owed nodes of `uid` whose time to try again has come; each is
    /// not due again for [`OWED_SWEEP_RETRY`], however the try goes.
    pub fn due_sweeps(&self, uid: &str) -> Vec<String> {
        let now = Instant::now();
        let mut owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(nodes) = owed.get_mut(uid) else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for (node, next) in nodes.iter_mut().filter(|(_, next)| **next <= now) {
            *next = now + OWED_SWEEP_RETRY;
            due.push(node.clone());
        }
        due
    }

    /// `node` runs no capture of `uid` it should not any more.
    pub fn settle_sweep(&self, uid: &str, node: &str) {
        let mut owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(nodes) = owed.get_mut(uid) {
            nodes.remove(node);
            if nodes.is_empty() {
                owed.remove(uid);
            }
        }
    }

    /// The nodes where a capture of `uid` was to be stopped and could not
    /// be.
    pub fn owed_sweeps(&self, uid: &str) -> BTreeSet<String> {
        let owed = self.owed.lock().unwrap_or_else(|e| e.into_inner());
        owed.get(uid)
            .map(|nodes| nodes.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a capture entirely (its watches end, and the sweeps it was
    /// owed: see [`Tracker::owed_sweeps`]) and returns its nodes.
    pub fn forget(&self, uid: &str) -> Vec<NodeProgress> {
        self.owed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        let track = self.lock().remove(uid);
        track
            .map(|mut t| {
                std::mem::take(&mut t.nodes)
                    .into_values()
                    .map(|n| n.progress.clone())
                    .collect()
            })
            .unwrap_or_default()
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
        if track.watch.is_some() || track.progress.state.is_final() {
            return;
        }
        let key = WatchKey {
            obj,
            uid: uid.to_string(),
            generation,
            node: ep.node.clone(),
            id: track.progress.capture_id.clone(),
            watch: self.watches.fetch_add(1, Ordering::Relaxed),
        };
        let number = key.watch;
        let task = tokio::spawn(follow(self.this.clone(), pool, backoff, ep, key));
        track.watch = Some((number, task.abort_handle()));
    }

    /// Applies `f` to a node's progress if the node is still followed by
    /// this watch, and asks for a reconcile; whether the watch goes on (the
    /// node is still followed and has not ended).
    fn update(&self, key: &WatchKey, f: impl FnOnce(&mut NodeProgress)) -> bool {
        let go_on = {
            let mut map = self.lock();
            let Some(track) = map
                .get_mut(&key.uid)
                .filter(|t| t.generation == key.generation)
                .and_then(|t| t.nodes.get_mut(&key.node))
                .filter(|n| n.watch.as_ref().is_some_and(|(w, _)| *w == key.watch))
            else {
                return false;
            };
            f(&mut track.progress);
            let go_on = !track.progress.state.is_final();
            if !go_on {
                // The task ends by itself: nothing to abort.
                track.watch = None;
            }
            go_on
        };
        // The receiver is gone only when the controller is shutting down.
        let _ = self.trigger.unbounded_send(key.obj.clone());
        go_on
    }
}

struct WatchKey {
    obj: ObjectRef<PacketCaptureConfig>,
    uid: String,
    generation: i64,
    node: String,
    /// The capture id.
    id: String,
    /// The watch's number.
    watch: u64,
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
    // Updates the node, if the tracker is still there; whether to go on.
    let update =
        |f: &dyn Fn(&mut NodeProgress)| tracker.upgrade().is_some_and(|t| t.update(&key, |p| f(p)));
    let mut failures = 0u32;
    loop {
        let last = match pool.watch(&ep, &key.id).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(c)) => {
                        failures = 0;
                        if !update(&|p| p.update(&c, Timestamp::now())) {
                            return;
                        }
                    }
                    Ok(None) => break "the watch ended before the capture did".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            },
            Err(s) if s.code() == Code::NotFound => {
                update(&|p| {
                    p.fail(
                        format!(
                            "the agent on node {} no longer knows capture {} (did it restart?)",
                            ep.node, key.id
                        ),
                        false,
                        Timestamp::now(),
                    )
                });
                return;
            }
            Err(s) => s.message().to_string(),
        };
        if failures >= backoff.retries {
            update(&|p| {
                p.fail(
                    format!(
                        "lost contact with the agent on node {} ({}): {last}",
                        ep.node, ep.uri
                    ),
                    true,
                    Timestamp::now(),
                )
            });
            return;
        }
        tracing::debug!(node = %ep.node, id = %key.id, "watch interrupted ({last}); reconnecting");
        tokio::time::sleep(backoff.delay(failures)).await;
        failures += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_capture_common::crd::CaptureState;

    fn tracker() -> Arc<Tracker> {
        Tracker::new(futures::channel::mpsc::unbounded().0)
    }

    fn node(state: CaptureState, packets: u64) -> NodeProgress {
        let mut p = NodeProgress::new("n1", "192.168.0.1", "u-g1");
        p.state = state;
        p.packets = packets;
        p
    }

    #[test]
    fn a_node_that_has_ended_stays_as_it_ended() {
        let t = tracker();
        t.set("u", 1, node(CaptureState::Running, 3));
        t.set("u", 1, node(CaptureState::Completed, 5));
        // A decision or an answer taken from an earlier snapshot.
        t.set("u", 1, node(CaptureState::Running, 3));
        t.set("u", 1, node(CaptureState::Failed, 3));
        let p = &t.nodes("u", 1)["n1"];
        assert_eq!((p.state, p.packets), (CaptureState::Completed, 5));
        // Another capture on the node (a new generation) replaces it.
        t.set("u", 2, node(CaptureState::Running, 0));
        assert_eq!(t.nodes("u", 2)["n1"].state, CaptureState::Running);
    }
}
