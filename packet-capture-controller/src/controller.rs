//! The reconciler: `PacketCaptureConfig` → captures on the agents → status.
//!
//! Every pass recomputes the per-node plan from the cached pods, nodes and
//! agent pods, starts what is missing (idempotently: the capture id is
//! derived from the uid, the generation and the node's targets), stops what
//! is no longer wanted, and writes the status from what the `WatchCapture`
//! tasks of the [`Tracker`] report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use packet_capture_common::crd::{
    OutputFormat, PacketCaptureConfig, PacketCaptureConfigStatus, Phase,
};
use packet_capture_proto::v1::{CaptureSpec, StartCaptureRequest};
use tonic::Status;

use crate::agents::{AgentEndpoint, AgentPool, PoolSettings, retryable};
use crate::backoff::Backoff;
use crate::config::Settings;
use crate::consts::{CONTROLLER_NAME, FIELD_MANAGER, FINALIZER};
use crate::metrics::Metrics;
use crate::status::{self, Outcome};
use crate::targets::{self, Plan};
use crate::tracker::{NodeProgress, NodeState, Tracker};
use crate::{Error, Result, results};

/// Retry and time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// StartCapture (and GetCapture) calls.
    pub start: Backoff,
    /// StopCapture and ListCaptures calls (also on delete).
    pub stop: Backoff,
    /// Reconnecting a broken WatchCapture stream.
    pub watch: Backoff,
    /// How long after `startTime + duration` a node that has not ended fails.
    pub grace: Duration,
    /// Requeue after a failed reconcile.
    pub error_requeue: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            start: Backoff::new(Duration::from_millis(500), Duration::from_secs(8), 5),
            stop: Backoff::new(Duration::from_millis(500), Duration::from_secs(4), 3),
            watch: Backoff::new(Duration::from_secs(1), Duration::from_secs(10), 5),
            grace: Duration::from_secs(60),
            error_requeue: Duration::from_secs(10),
        }
    }
}

/// Everything reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// All pods (targets and agents).
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub agents: Arc<AgentPool>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    /// Where the results ConfigMaps go.
    pub namespace: String,
    pub timing: Timing,
}

/// What a [`Context`] is made of besides the client and caches.
pub struct ContextSettings {
    pub pool: PoolSettings,
    /// Where the results ConfigMaps go.
    pub namespace: String,
    /// This replica's name in Events.
    pub identity: String,
    pub timing: Timing,
}

impl Context {
    /// A context, and the reconcile requests its tracker makes (for
    /// `Controller::reconcile_on`).
    pub fn new(
        client: Client,
        pods: Store<Pod>,
        nodes: Store<Node>,
        settings: ContextSettings,
        metrics: Arc<Metrics>,
    ) -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<ObjectRef<PacketCaptureConfig>>,
    ) {
        let agents = Arc::new(AgentPool::new(
            pods.clone(),
            nodes.clone(),
            settings.pool,
            metrics.clone(),
        ));
        let (trigger, triggers) = mpsc::unbounded();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: Some(settings.identity),
            },
        );
        let ctx = Self {
            client,
            recorder,
            pods,
            nodes,
            agents,
            tracker: Tracker::new(trigger),
            metrics,
            namespace: settings.namespace,
            timing: settings.timing,
        };
        (Arc::new(ctx), triggers)
    }
}

/// The agent capture id of one node: uid, generation and a stable hash of
/// the node's targets, so a restart or a repeated reconcile asks for the
/// same capture, and new targets on a node make a new capture.
pub fn capture_id(uid: &str, generation: i64, targets: &[String]) -> String {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in targets.join(",").bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{uid}-g{generation}-{:08x}", hash as u32)
}

/// The prefix of every capture id of a `PacketCaptureConfig`.
pub fn capture_prefix(uid: &str) -> String {
    format!("{uid}-g")
}

/// Whether the status says the current generation has ended.
pub fn is_done(pcc: &PacketCaptureConfig) -> bool {
    let generation = pcc.metadata.generation.unwrap_or_default();
    status::same_generation(pcc.status.as_ref(), generation)
        .and_then(|s| s.phase)
        .is_some_and(Phase::is_final)
}

/// Reconciles one `PacketCaptureConfig`, inside the finalizer.
pub async fn reconcile(pcc: Arc<PacketCaptureConfig>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled();
    // Until the caches are filled every pod would look missing.
    let _ = ctx.pods.wait_until_ready().await;
    let _ = ctx.nodes.wait_until_ready().await;
    let api: Api<PacketCaptureConfig> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, pcc, |event| async {
        match event {
            Finalizer::Apply(pcc) => Pass::new(&pcc, &ctx)?.apply().await,
            Finalizer::Cleanup(pcc) => Pass::new(&pcc, &ctx)?.cleanup().await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Logs and counts a failed reconcile, and tries again later.
pub fn error_policy(pcc: Arc<PacketCaptureConfig>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %pcc.name_any(), "reconcile failed: {err}");
    ctx.metrics.reconcile_failed(err);
    Action::requeue(ctx.timing.error_requeue)
}

/// A node to start a capture on.
struct Start {
    node: String,
    targets: Vec<String>,
    id: String,
    /// Stop other captures of this resource on the node first.
    sweep: bool,
}

/// One reconcile of one object.
struct Pass<'a> {
    pcc: &'a PacketCaptureConfig,
    ctx: &'a Context,
    uid: String,
    generation: i64,
    name: String,
    reference: ObjectReference,
}

impl<'a> Pass<'a> {
    fn new(pcc: &'a PacketCaptureConfig, ctx: &'a Context) -> Result<Self> {
        let uid = pcc.uid().ok_or(Error::MissingField {
            kind: "PacketCaptureConfig",
            field: "metadata.uid",
        })?;
        Ok(Self {
            pcc,
            ctx,
            uid,
            generation: pcc.metadata.generation.unwrap_or_default(),
            name: pcc.name_any(),
            reference: pcc.object_ref(&()),
        })
    }

    fn prev(&self) -> Option<&'a PacketCaptureConfigStatus> {
        self.pcc.status.as_ref()
    }

    fn same(&self) -> Option<&'a PacketCaptureConfigStatus> {
        status::same_generation(self.prev(), self.generation)
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.node_event(None, type_, reason, note).await;
    }

    /// An event about one node's part (the Node is the related object, so
    /// each node's events are told apart rather than folded into a series).
    async fn node_event(&self, node: Option<&str>, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Capture".into(),
            secondary: node.map(|n| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(n.into()),
                ..Default::default()
            }),
        };
        if let Err(e) = self.ctx.recorder.publish(&ev, &self.reference).await {
            tracing::warn!(name = %self.name, reason, "publishing an event: {e}");
        }
    }

    /// Publishes an event once per generation (and node).
    async fn announce(&self, node: Option<&str>, type_: EventType, reason: &str, note: String) {
        let key = format!("{reason}/{}", node.unwrap_or_default());
        if self.ctx.tracker.announce(&self.uid, self.generation, &key) {
            self.node_event(node, type_, reason, note).await;
        }
    }

    async fn patch_status(&self, new: &PacketCaptureConfigStatus) -> Result<()> {
        self.ctx.metrics.set_phase(&self.uid, new.phase);
        if self.prev() == Some(new) {
            return Ok(());
        }
        let api: Api<PacketCaptureConfig> = Api::all(self.ctx.client.clone());
        let body = serde_json::json!({
            "apiVersion": PacketCaptureConfig::api_version(&()),
            "kind": PacketCaptureConfig::kind(&()),
            "status": new,
        });
        api.patch_status(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
        Ok(())
    }

    fn status_for(
        &self,
        nodes: &BTreeMap<String, NodeProgress>,
        outcome: &Outcome,
    ) -> PacketCaptureConfigStatus {
        status::build(
            self.prev(),
            self.generation,
            nodes,
            self.pcc.spec.output_format,
            outcome,
            Timestamp::now(),
        )
    }

    /// Fails the generation before anything started.
    async fn fail_before_start(&self, reason: &'static str, message: String) -> Result<Action> {
        let outcome = Outcome::failed(reason, message.clone());
        let new = self.status_for(&BTreeMap::new(), &outcome);
        self.announce(None, EventType::Warning, reason, message.clone())
            .await;
        self.announce(None, EventType::Warning, "Failed", message)
            .await;
        self.patch_status(&new).await?;
        Ok(Action::await_change())
    }

    async fn apply(&self) -> Result<Action> {
        if let Some(phase) = self.same().and_then(|s| s.phase).filter(|p| p.is_final()) {
            self.ctx.metrics.set_phase(&self.uid, Some(phase));
            return Ok(Action::await_change());
        }
        let tracker = &self.ctx.tracker;
        let agents = &self.ctx.agents;

        // What earlier generations ran, in this process or before it.
        let mut old_nodes: BTreeSet<String> = tracker
            .take_other_generations(&self.uid, self.generation)
            .into_iter()
            .filter(|p| !p.state.is_final())
            .map(|p| p.node)
            .collect();
        if self.same().is_none()
            && let Some(prev) = self.prev()
        {
            old_nodes.extend(prev.capture_files.values().map(|e| e.node.clone()));
        }

        let endpoints = agents.endpoints();
        let plan: Plan = targets::resolve(
            &self.pcc.spec,
            &self.ctx.pods,
            &self.ctx.nodes,
            &endpoints.keys().cloned().collect(),
        );
        // Nodes in the new plan are swept before their start.
        let to_clear: Vec<String> = old_nodes
            .into_iter()
            .filter(|n| !plan.nodes.contains_key(n))
            .collect();
        self.clear_nodes(&to_clear, &endpoints).await;

        let tracked = tracker.nodes(&self.uid, self.generation);
        let recorded = self.same().map(|s| &s.capture_files);
        let started = !tracked.is_empty() || recorded.is_some_and(|r| !r.is_empty());
        if !started {
            if !plan.problems.is_empty() {
                let names: Vec<String> = plan.problems.iter().map(ToString::to_string).collect();
                return self
                    .fail_before_start("PodNotFound", names.join("; "))
                    .await;
            }
            if plan.nodes.is_empty() {
                let s = agents.settings();
                return self
                    .fail_before_start(
                        "NoAgents",
                        format!(
                            "no agent to capture on: no running pod labelled {} in namespace {}",
                            s.selector, s.namespace
                        ),
                    )
                    .await;
            }
        } else if !plan.problems.is_empty() {
            tracing::info!(name = %self.name, "targets gone during the capture: {:?}", plan.problems);
        }

        let mut starts = Vec::new();
        for (node, node_targets) in &plan.nodes {
            let id = capture_id(&self.uid, self.generation, node_targets);
            match tracked.get(node) {
                Some(p) if p.capture_id == id || p.state.is_final() => {}
                Some(p) => {
                    // New targets on this node: end the old capture first.
                    self.stop_node(p, endpoints.get(node), "its targets changed")
                        .await;
                    starts.push(Start {
                        node: node.clone(),
                        targets: node_targets.clone(),
                        id,
                        sweep: false,
                    });
                }
                None => {
                    let ip = agents.node_ip(node);
                    match recorded.and_then(|r| r.get(&ip)) {
                        // Ended before a controller restart: keep it as it was.
                        Some(entry)
                            if NodeState::parse(&entry.status).is_some_and(NodeState::is_final) =>
                        {
                            tracker.set(
                                &self.uid,
                                self.generation,
                                NodeProgress::from_status(&ip, entry, &id),
                            );
                        }
                        _ => starts.push(Start {
                            node: node.clone(),
                            targets: node_targets.clone(),
                            id,
                            sweep: true,
                        }),
                    }
                }
            }
        }
        for (node, p) in &tracked {
            if !plan.nodes.contains_key(node) && !p.state.is_final() {
                self.stop_node(p, endpoints.get(node), "it is no longer a target")
                    .await;
            }
        }

        if !started && !starts.is_empty() {
            // Say that the capture is being started before the agents are
            // called (with their retries, that can take a while).
            let pending: BTreeMap<String, NodeProgress> = starts
                .iter()
                .map(|s| {
                    let ip = endpoints
                        .get(&s.node)
                        .map_or_else(|| agents.node_ip(&s.node), |e| e.node_ip.clone());
                    (s.node.clone(), NodeProgress::new(&s.node, &ip, &s.id))
                })
                .collect();
            let outcome = status::summarize(&pending);
            self.patch_status(&self.status_for(&pending, &outcome))
                .await?;
        }

        let duration = self.duration_for_new_nodes(started, &tracked);
        // Each node is followed as soon as its start has answered, not once
        // every node has (a node whose start is retried would otherwise
        // leave the others' progress unseen meanwhile).
        let mut progress: futures::stream::FuturesUnordered<_> = starts
            .iter()
            .map(|s| self.start_node(s, endpoints.get(&s.node), duration))
            .collect();
        while let Some(p) = progress.next().await {
            let node = p.node.clone();
            tracker.set(&self.uid, self.generation, p);
            if let Some(ep) = endpoints.get(&node) {
                tracker.follow(
                    ObjectRef::from_obj(self.pcc),
                    &self.uid,
                    self.generation,
                    agents.clone(),
                    self.ctx.timing.watch,
                    ep.clone(),
                );
            }
        }

        let requeue = self.enforce_deadline();
        let nodes = tracker.nodes(&self.uid, self.generation);
        let outcome = status::summarize(&nodes);
        let new = self.status_for(&nodes, &outcome);
        self.announce_nodes(&nodes).await;
        if outcome.phase.is_final() {
            results::publish(&self.ctx.client, self.pcc, &new, &self.ctx.namespace).await?;
            let (type_, reason) = if outcome.phase == Phase::Completed {
                (EventType::Normal, "Completed")
            } else {
                (EventType::Warning, "Failed")
            };
            self.announce(None, type_, reason, outcome.message.clone())
                .await;
        }
        self.patch_status(&new).await?;
        Ok(if outcome.phase.is_final() {
            Action::await_change()
        } else {
            Action::requeue(requeue)
        })
    }

    /// Full duration for the first nodes; what is left of it for nodes that
    /// join later (a target pod that moved).
    fn duration_for_new_nodes(
        &self,
        started: bool,
        tracked: &BTreeMap<String, NodeProgress>,
    ) -> u32 {
        let full = self.pcc.spec.duration;
        if !started {
            return full;
        }
        let Some(start) = self.start_time(tracked) else {
            return full;
        };
        let elapsed = Timestamp::now().duration_since(start).as_secs().max(0);
        let left = i64::from(full) - elapsed;
        u32::try_from(left.max(1)).unwrap_or(1)
    }

    fn start_time(&self, tracked: &BTreeMap<String, NodeProgress>) -> Option<Timestamp> {
        self.same()
            .and_then(|s| s.start_time.as_ref().map(|t| t.0))
            .or_else(|| tracked.values().filter_map(|p| p.start_time).min())
    }

    /// Nodes that have not ended by `startTime + duration + grace` fail;
    /// returns when to look again.
    fn enforce_deadline(&self) -> Duration {
        let tracked = self.ctx.tracker.nodes(&self.uid, self.generation);
        let Some(start) = self.start_time(&tracked) else {
            return Duration::from_secs(30);
        };
        let limit = SignedDuration::from_secs(i64::from(self.pcc.spec.duration))
            + SignedDuration::try_from(self.ctx.timing.grace).unwrap_or(SignedDuration::ZERO);
        let deadline = start + limit;
        let now = Timestamp::now();
        if now < deadline {
            return Duration::try_from(deadline.duration_since(now))
                .unwrap_or(Duration::from_secs(30))
                .max(Duration::from_secs(1));
        }
        for mut p in tracked.into_values().filter(|p| !p.state.is_final()) {
            p.fail(
                format!(
                    "no end reported by the agent within {}s of the start (duration {}s)",
                    limit.as_secs(),
                    self.pcc.spec.duration
                ),
                false,
            );
            self.ctx.tracker.set(&self.uid, self.generation, p);
        }
        Duration::from_secs(30)
    }

    fn capture_spec(&self, targets: &[String], duration: u32) -> CaptureSpec {
        use packet_capture_proto::v1::OutputFormat as Proto;
        let spec = &self.pcc.spec;
        CaptureSpec {
            target_ips: targets.to_vec(),
            target_ports: spec.target_ports.iter().map(|&p| u32::from(p)).collect(),
            duration_seconds: duration,
            max_packets: spec.max_packets,
            output_format: match spec.output_format {
                OutputFormat::Pcap => Proto::Pcap,
                OutputFormat::Pcapng => Proto::Pcapng,
                OutputFormat::Text => Proto::Text,
                OutputFormat::Stdout => Proto::Stdout,
            } as i32,
            filter: spec.filter.clone(),
            snaplen: spec.snaplen.unwrap_or(0),
        }
    }

    async fn start_node(
        &self,
        s: &Start,
        ep: Option<&AgentEndpoint>,
        duration: u32,
    ) -> NodeProgress {
        let agents = &self.ctx.agents;
        let node_ip = ep.map_or_else(|| agents.node_ip(&s.node), |e| e.node_ip.clone());
        let mut progress = NodeProgress::new(&s.node, &node_ip, &s.id);
        let Some(ep) = ep else {
            let set = agents.settings();
            progress.fail(
                format!(
                    "no agent on node {}: no running pod labelled {} in namespace {}",
                    s.node, set.selector, set.namespace
                ),
                true,
            );
            return progress;
        };
        let timing = &self.ctx.timing;
        if s.sweep {
            match agents
                .sweep(ep, &capture_prefix(&self.uid), Some(&s.id), &timing.stop)
                .await
            {
                Ok(stopped) if !stopped.is_empty() => {
                    tracing::info!(node = %s.node, "stopped earlier captures {stopped:?}")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %s.node, "listing earlier captures: {}", e.message())
                }
            }
        }
        let req = StartCaptureRequest {
            id: s.id.clone(),
            name: self.name.clone(),
            spec: Some(self.capture_spec(&s.targets, duration)),
        };
        let node = s.node.as_str();
        let result = agents
            .start(ep, req, &timing.start, |retry, delay, status: &Status| {
                let note = format!(
                    "starting the capture on node {node} failed ({}); retrying in {:.1}s",
                    status.message(),
                    delay.as_secs_f64()
                );
                async move {
                    if retry == 0 {
                        self.node_event(Some(node), EventType::Warning, "Retrying", note)
                            .await;
                    }
                }
            })
            .await;
        match result {
            Ok(c) => progress.update(&c),
            Err(e) if retryable(&e) => progress.fail(
                format!(
                    "agent on node {node} ({}) unreachable: {}",
                    ep.uri,
                    e.message()
                ),
                true,
            ),
            Err(e) => progress.fail(
                format!("agent on node {node} refused the capture: {}", e.message()),
                false,
            ),
        }
        progress
    }

    /// Stops a node's capture that is no longer wanted.
    async fn stop_node(&self, p: &NodeProgress, ep: Option<&AgentEndpoint>, why: &str) {
        let mut ended = self
            .ctx
            .tracker
            .remove_node(&self.uid, &p.node)
            .unwrap_or_else(|| p.clone());
        if let Some(ep) = ep {
            match self
                .ctx
                .agents
                .stop(ep, &p.capture_id, &self.ctx.timing.stop)
                .await
            {
                Ok(c) => ended.update(&c),
                Err(e) => {
                    tracing::warn!(node = %p.node, "stopping {}: {}", p.capture_id, e.message())
                }
            }
        }
        ended.state = NodeState::Stopped;
        ended.message = Some(format!("stopped because {why}"));
        self.ctx.tracker.set(&self.uid, self.generation, ended);
    }

    /// Stops every capture of this resource on `nodes`; returns the
    /// failures as (node, message).
    async fn clear_nodes(
        &self,
        nodes: &[String],
        endpoints: &BTreeMap<String, AgentEndpoint>,
    ) -> Vec<(String, String)> {
        let prefix = capture_prefix(&self.uid);
        let results = futures::future::join_all(nodes.iter().map(|node| {
            let prefix = &prefix;
            async move {
                let out = match endpoints.get(node) {
                    Some(ep) => self
                        .ctx
                        .agents
                        .sweep(ep, prefix, None, &self.ctx.timing.stop)
                        .await
                        .map_err(|e| {
                            format!("agent at {} did not answer: {}", ep.uri, e.message())
                        }),
                    None => Err("no agent runs on the node".to_string()),
                };
                (node.clone(), out)
            }
        }))
        .await;
        results
            .into_iter()
            .filter_map(|(node, r)| r.err().map(|e| (node, e)))
            .collect()
    }

    /// Events for nodes that started or failed (once each).
    async fn announce_nodes(&self, nodes: &BTreeMap<String, NodeProgress>) {
        let recorded = self.same().map(|s| &s.capture_files);
        for p in nodes.values() {
            let before = recorded.and_then(|r| r.get(&p.node_ip));
            if before.is_none() && p.state != NodeState::Failed {
                self.announce(
                    Some(&p.node),
                    EventType::Normal,
                    "Started",
                    format!(
                        "capturing on node {} ({}) as {}",
                        p.node, p.node_ip, p.capture_id
                    ),
                )
                .await;
            }
            if p.state == NodeState::Failed && before.is_none_or(|e| e.status != "failed") {
                let reason = if p.unreachable {
                    "AgentUnreachable"
                } else {
                    "NodeFailed"
                };
                let note = format!(
                    "node {}: {}",
                    p.node,
                    p.message.as_deref().unwrap_or("the capture failed")
                );
                self.announce(Some(&p.node), EventType::Warning, reason, note)
                    .await;
            }
        }
    }

    /// On delete: stop the capture on every node that ran it, then let the
    /// finalizer go (an agent that does not answer gets an Event, and does
    /// not hold the deletion).
    async fn cleanup(&self) -> Result<Action> {
        let mut nodes: BTreeSet<String> = self
            .ctx
            .tracker
            .forget(&self.uid)
            .into_iter()
            .map(|p| p.node)
            .collect();
        if let Some(prev) = self.prev() {
            nodes.extend(prev.capture_files.values().map(|e| e.node.clone()));
        }
        let nodes: Vec<String> = nodes.into_iter().collect();
        let endpoints = self.ctx.agents.endpoints();
        let failures = self.clear_nodes(&nodes, &endpoints).await;
        for (node, why) in &failures {
            self.node_event(
                Some(node),
                EventType::Warning,
                "StopFailed",
                format!("could not stop the capture on node {node} ({why}); deleting anyway"),
            )
            .await;
        }
        if nodes.len() > failures.len() {
            self.event(
                EventType::Normal,
                "Stopped",
                format!(
                    "capture stopped on {} node(s) before deletion",
                    nodes.len() - failures.len()
                ),
            )
            .await;
        }
        self.ctx.metrics.set_phase(&self.uid, None);
        Ok(Action::await_change())
    }
}

/// The captures a pod change concerns: all unfinished ones for an agent
/// pod, else those that name the pod or its IPs.
pub fn affected(
    store: &Store<PacketCaptureConfig>,
    agents: &AgentPool,
    pod: &Pod,
) -> Vec<ObjectRef<PacketCaptureConfig>> {
    let agent = agents.is_agent_pod(pod);
    store
        .state()
        .iter()
        .filter(|p| !is_done(p))
        .filter(|p| agent || targets::spec_mentions_pod(&p.spec, pod))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// Fails unless the CRD is installed.
pub async fn check_crd(client: &Client) -> Result<()> {
    let api: Api<PacketCaptureConfig> = Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err(Error::CrdMissing(packet_capture_common::crd::RESOURCE))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(settings: &Settings, client: Client, metrics: Arc<Metrics>) -> Result<()> {
    let port = settings.agent_port(&client).await?;
    let (pods, pod_writer) = reflector::store();
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let (nodes, node_writer) = reflector::store();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(node_stream.for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!("watching nodes: {e}");
        }
    }));

    let settings_for_ctx = ContextSettings {
        pool: PoolSettings {
            namespace: settings.namespace.clone(),
            selector: settings.agent_selector.clone(),
            port,
            token_file: settings.agent_token_file.clone(),
            timeout: settings.agent_timeout(),
        },
        namespace: settings.namespace.clone(),
        identity: settings.identity(),
        timing: Timing::default(),
    };
    let (ctx, triggers) = Context::new(client.clone(), pods, nodes, settings_for_ctx, metrics);
    let agents = ctx.agents.clone();
    tracing::info!(agent_port = port, namespace = %settings.namespace, "controller starting");
    let mut watched = watcher::Config::default();
    if let Some(selector) = &settings.capture_selector {
        tracing::info!(%selector, "only PacketCaptureConfigs with these labels");
        watched = watched.labels(&selector.to_string());
    }
    let controller = Controller::new(Api::<PacketCaptureConfig>::all(client), watched);
    let store = controller.store();
    controller
        .watches_stream(pod_stream, move |pod| affected(&store, &agents, &pod))
        .reconcile_on(triggers)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!("reconcile: {e}"),
            }
        })
        .await;
    Ok(())
}
