//! Carries a [`Plan`](crate::plan::Plan) out: the gRPC calls to the agents
//! (through the [`AgentPool`], with its retries), their results recorded in
//! the [`Tracker`], and a `WatchCapture` follow for each node that started.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use packet_capture_proto::v1::{
    CaptureSpec, Direction, OutputFormat, StartCaptureRequest, TargetPod,
};
use tonic::{Code, Status};

use crate::agents::{AgentEndpoint, AgentPool, retryable};
use crate::backoff::Backoff;
use crate::config::Timing;
use crate::events::Events;
use crate::node::NodeProgress;
use crate::plan::{Adopt, Clear, Resource, Retarget, Start, capture_id, capture_prefix};
use crate::targets::SelectedPod;
use crate::tracker::Tracker;

/// The agent calls of one reconcile of one resource.
pub struct Act<'a> {
    pub resource: Resource<'a>,
    pub pool: &'a Arc<AgentPool>,
    pub tracker: &'a Tracker,
    pub events: &'a Events,
    pub timing: &'a Timing,
}

impl Act<'_> {
    /// Drops the tracker's nodes of earlier generations (their watches end).
    pub fn forget_earlier(&self) {
        self.tracker
            .forget_other_generations(self.resource.uid, self.resource.generation);
    }

    /// Stops every unfinished capture of the resource on each node, all
    /// nodes at once; for each node, how many it stopped, or why that
    /// failed.
    pub async fn clear(&self, nodes: &[Clear]) -> Vec<(String, Result<usize, String>)> {
        let prefix = capture_prefix(self.resource.uid);
        futures::future::join_all(nodes.iter().map(|c| {
            let prefix = &prefix;
            async move {
                let out = match &c.endpoint {
                    Some(ep) => self
                        .pool
                        .sweep(ep, prefix, None, &self.timing.stop)
                        .await
                        .map(|stopped| stopped.len())
                        .map_err(|e| {
                            let answer = match e.code() {
                                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                                    "did not answer"
                                }
                                _ => "refused the stop",
                            };
                            format!("agent at {} {answer}: {}", ep.uri, e.message())
                        }),
                    None => Err("no agent runs on the node".to_string()),
                };
                (c.node.clone(), out)
            }
        }))
        .await
    }

    /// Stops what each node in `plan.clear` should no longer run (see
    /// [`Act::clear`]), and again what the nodes where that failed before
    /// still run ([`Tracker::owed_sweeps`], those whose time has come, with
    /// one call each: a reconcile is not held up for long by an agent that
    /// still does not answer): there the captures of other generations,
    /// and this one's too unless it runs there now. A node whose agent did
    /// not answer owes it until one answers; a node with no agent pod at
    /// all owes nothing (its captures went with its agent).
    pub async fn clear_and_settle(
        &self,
        clear: &[Clear],
        agents: &BTreeMap<String, AgentEndpoint>,
        unready: &BTreeMap<String, String>,
    ) {
        let uid = self.resource.uid;
        let name = self.resource.name();
        let cleared: BTreeSet<&str> = clear.iter().map(|c| c.node.as_str()).collect();
        let failed: Vec<(String, String)> = self
            .clear(clear)
            .await
            .into_iter()
            .filter_map(|(node, out)| out.err().map(|why| (node, why)))
            .collect();
        for c in clear {
            self.tracker.settle_sweep(uid, &c.node);
        }
        for (node, why) in &failed {
            tracing::warn!(%name, %node, "stopping an earlier generation: {why}; trying again later");
            self.tracker.owe_sweep(uid, node);
        }
        let running = self.tracker.nodes(uid, self.resource.generation);
        let prefix = capture_prefix(uid);
        let once = Backoff {
            retries: 0,
            ..self.timing.stop
        };
        let due = self.tracker.due_sweeps(uid);
        futures::future::join_all(
            due.iter()
                .filter(|n| !cleared.contains(n.as_str()))
                .map(|node| {
                    let (prefix, name, once) = (&prefix, &name, &once);
                    let keep = running
                        .get(node)
                        .filter(|p| !p.state.is_final())
                        .map(|p| p.capture_id.as_str());
                    async move {
                        let Some(ep) = agents.get(node) else {
                            if !unready.contains_key(node) {
                                self.tracker.settle_sweep(uid, node);
                            }
                            return;
                        };
                        match self.pool.sweep(ep, prefix, keep, once).await {
                            Ok(stopped) => {
                                tracing::info!(%name, %node, "stopped {stopped:?}, which an earlier stop could not");
                                self.tracker.settle_sweep(uid, node);
                            }
                            Err(e) => {
                                tracing::warn!(%name, %node, "stopping an earlier generation: {}; trying again later", e.message())
                            }
                        }
                    }
                }),
        )
        .await;
    }

    /// Gives running node captures their new targets, all nodes at once.
    /// A node whose agent does not take them keeps its old ones, or those
    /// the new ones still name when it had no room for them (and the
    /// capture comes back within [`RETARGET_RETRY`] to try again: an
    /// address to leave out may be one its requester may no longer
    /// capture); its watch reports whatever else happens to it. Says
    /// whether every node took them.
    pub async fn retarget(&self, retargets: &[Retarget]) -> bool {
        let Resource {
            uid, generation, ..
        } = self.resource;
        let results = futures::future::join_all(retargets.iter().map(|r| async move {
            let id = &r.progress.capture_id;
            let out = self
                .pool
                .set_targets(
                    &r.endpoint,
                    id,
                    &r.targets,
                    &target_pods(&r.pods),
                    &self.timing.stop,
                )
                .await;
            (r, out)
        }))
        .await;
        let mut all_taken = true;
        for (r, out) in results {
            let node = &r.progress.node;
            match out {
                Ok(c) => {
                    tracing::info!(%node, targets = ?r.targets, "capture targets changed");
                    // Merged into what the tracker has now: the answer may
                    // have waited for other nodes' calls while the watch
                    // recorded more, even the end.
                    let id = &r.progress.capture_id;
                    self.tracker
                        .modify(uid, generation, node, id, |p| p.merge(&c, Timestamp::now()));
                }
                Err(e) => {
                    all_taken = false;
                    let note = format!(
                        "node {node} did not take the new targets ({}): it keeps its earlier ones, or those of them the new ones name; tried again",
                        e.message()
                    );
                    tracing::warn!(%node, capture = r.progress.capture_id, "{note}");
                    let pcc = self.resource.pcc;
                    self.events
                        .announce(pcc, Some(node), EventType::Warning, "TargetsKept", note)
                        .await;
                }
            }
        }
        all_taken
    }

    /// Records node outcomes decided without an agent call.
    pub fn record(&self, nodes: &[NodeProgress]) {
        for p in nodes {
            self.tracker
                .set(self.resource.uid, self.resource.generation, p.clone());
        }
    }

    /// Records a node capture and follows it (`WatchCapture`) until it
    /// ends.
    fn track(&self, progress: NodeProgress, ep: &AgentEndpoint) {
        let Resource {
            pcc,
            uid,
            generation,
        } = self.resource;
        self.tracker.set(uid, generation, progress);
        self.tracker.follow(
            ObjectRef::from_obj(pcc),
            uid,
            generation,
            self.pool.clone(),
            self.timing.watch,
            ep.clone(),
        );
    }

    /// Follows node captures that ran before a controller restart, as the
    /// status has them until their agents say more.
    pub fn adopt(&self, adopts: &[Adopt]) {
        for a in adopts {
            self.track(a.progress.clone(), &a.endpoint);
        }
    }

    /// Looks for the generation's node captures on every agent
    /// (ListCaptures, all at once) and follows those it finds: after a
    /// controller restart, a status beyond `MAX_STATUS_NODES` nodes names
    /// only some of them. An agent that does not answer is logged; its
    /// node is started again (idempotently) if it is a target.
    pub async fn adopt_listed(&self, agents: &BTreeMap<String, AgentEndpoint>) {
        let id = capture_id(self.resource.uid, self.resource.generation);
        let id = id.as_str();
        let listed = futures::future::join_all(
            agents
                .values()
                .map(|ep| async move { (ep, self.pool.list(ep, id, &self.timing.stop).await) }),
        )
        .await;
        for (ep, out) in listed {
            match out {
                Ok(captures) => {
                    if let Some(c) = captures.iter().find(|c| c.id == id) {
                        let mut p = NodeProgress::new(&ep.node, &ep.node_ip, id);
                        p.update(c, Timestamp::now());
                        self.track(p, ep);
                    }
                }
                Err(e) => tracing::warn!(node = %ep.node, "listing captures: {}", e.message()),
            }
        }
    }

    /// Starts the node captures, all at once; each node is recorded and
    /// followed as soon as its start has answered, not once every node has
    /// (a node whose start is retried would otherwise leave the others'
    /// progress unseen meanwhile).
    pub async fn start(&self, starts: &[Start]) {
        let mut answered: FuturesUnordered<_> = starts
            .iter()
            .map(|s| async move { (s, self.start_one(s).await) })
            .collect();
        while let Some((s, progress)) = answered.next().await {
            self.track(progress, &s.endpoint);
        }
    }

    /// Starts one node's capture (after sweeping the node if asked); the
    /// node as its agent answered.
    async fn start_one(&self, s: &Start) -> NodeProgress {
        let ep = &s.endpoint;
        let node = s.progress.node.as_str();
        if s.sweep {
            match self
                .pool
                .sweep(
                    ep,
                    &capture_prefix(self.resource.uid),
                    Some(&s.progress.capture_id),
                    &self.timing.stop,
                )
                .await
            {
                Ok(stopped) if !stopped.is_empty() => {
                    tracing::info!(%node, "stopped earlier captures {stopped:?}")
                }
                Ok(_) => {}
                // A first generation has no earlier one to stop: a
                // previous controller's start of it has this start's id.
                Err(e) if self.resource.generation <= 1 => {
                    tracing::warn!(%node, "listing earlier captures: {}", e.message());
                }
                Err(e) => {
                    tracing::warn!(%node, "listing earlier captures: {}; trying again later", e.message());
                    self.tracker.owe_sweep(self.resource.uid, node);
                }
            }
        }
        let req = StartCaptureRequest {
            id: s.progress.capture_id.clone(),
            name: self.resource.name(),
            spec: Some(capture_spec(self.resource, s)),
        };
        let pcc = self.resource.pcc;
        let sent = Timestamp::now();
        let result = self
            .pool
            .start(
                ep,
                req,
                &self.timing.start,
                |retry, delay, status: &Status| {
                    let note = format!(
                        "starting the capture on node {node} failed ({}); retrying in {:.1}s",
                        status.message(),
                        delay.as_secs_f64()
                    );
                    async move {
                        if retry == 0 {
                            self.events
                                .publish(pcc, Some(node), EventType::Warning, "Retrying", note)
                                .await;
                        }
                    }
                },
            )
            .await;
        let mut progress = s.progress.clone();
        let now = Timestamp::now();
        match result {
            Ok(c) => progress.started(&c, sent, now),
            // The agent answered, after the retries, that it cannot take
            // it now (it runs as many captures as it may, its address maps
            // have no room for the targets, or it refused too many
            // tokens): not an agent the controller cannot reach.
            Err(e) if e.code() == Code::ResourceExhausted => progress.fail(
                format!(
                    "agent on node {node} could not take the capture: {}",
                    e.message()
                ),
                false,
                now,
            ),
            Err(e) if retryable(&e) => progress.fail(
                format!(
                    "agent on node {node} ({}) unreachable: {}",
                    ep.uri,
                    e.message()
                ),
                true,
                now,
            ),
            Err(e) => progress.fail(
                format!("agent on node {node} refused the capture: {}", e.message()),
                false,
                now,
            ),
        }
        progress
    }
}

/// How soon a capture comes back to set targets a node did not take.
pub const RETARGET_RETRY: Duration = Duration::from_secs(10);

/// The target pods as the agent API spells them.
fn target_pods(pods: &[SelectedPod]) -> Vec<TargetPod> {
    pods.iter()
        .map(|p| {
            let (namespace, name) = p.name.split_once('/').unwrap_or(("", &p.name));
            TargetPod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                ips: p.ips.clone(),
            }
        })
        .collect()
}

/// What a node's agent is asked to capture.
fn capture_spec(resource: Resource, start: &Start) -> CaptureSpec {
    let spec = resource.spec();
    CaptureSpec {
        target_ips: start.targets.clone(),
        pods: target_pods(&start.pods),
        target_ports: spec.target_ports.iter().map(|&p| u32::from(p)).collect(),
        duration_seconds: start.duration,
        max_packets: spec.max_packets,
        output_format: OutputFormat::from(spec.output_format).into(),
        filter: spec.filter.clone(),
        snaplen: spec.snaplen.unwrap_or(0),
        direction: Direction::from(spec.direction).into(),
        keep_copies: spec.keep_copies,
        // What the controller resolved, even when that is nothing yet.
        only_targets: true,
    }
}
