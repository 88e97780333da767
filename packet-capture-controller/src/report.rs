//! Tells what came of a reconcile: the status (server-side apply, only when
//! it changed, and counter updates at most once a second), the Events, the
//! results ConfigMaps of an ended generation, and the phase metric.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource as _};
use packet_capture_common::crd::{
    CaptureState, PacketCaptureConfig, PacketCaptureConfigStatus, Phase,
};

use crate::consts::FIELD_MANAGER;
use crate::error::Result;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::node::NodeProgress;
use crate::plan::Resource;
use crate::results;
use crate::status::{self, MAX_STATUS_NODES, Outcome};

/// How often a running capture's status may be written for its counters
/// alone (a transition is written at once): with an agent reporting each
/// node about once a second, a capture on many nodes would otherwise be
/// written many times a second.
pub const COUNTER_WRITES_EVERY: Duration = Duration::from_secs(1);

/// When each capture's status was last written, by uid.
#[derive(Debug, Default)]
pub struct StatusWrites(Mutex<HashMap<String, Instant>>);

impl StatusWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long until a counter update of `uid` may be written; `None`:
    /// now.
    fn wait(&self, uid: &str) -> Option<Duration> {
        let last = *self.lock().get(uid)?;
        COUNTER_WRITES_EVERY.checked_sub(last.elapsed())
    }

    fn written(&self, uid: &str) {
        self.lock().insert(uid.to_owned(), Instant::now());
    }

    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }
}

/// The reports of one reconcile of one resource.
pub struct Report<'a> {
    pub resource: Resource<'a>,
    pub client: &'a Client,
    pub events: &'a Events,
    pub metrics: &'a Metrics,
    pub writes: &'a StatusWrites,
    /// Where the results ConfigMaps go.
    pub namespace: &'a str,
}

impl Report<'_> {
    fn status(
        &self,
        nodes: &BTreeMap<String, NodeProgress>,
        outcome: &Outcome,
    ) -> PacketCaptureConfigStatus {
        status::build(
            self.resource.previous(),
            self.resource.generation,
            nodes,
            self.resource.spec(),
            outcome,
            Timestamp::now(),
        )
    }

    async fn patch(&self, new: &PacketCaptureConfigStatus) -> Result<()> {
        self.metrics.set_phase(self.resource.uid, new.phase);
        if self.resource.previous() == Some(new) {
            return Ok(());
        }
        let api: Api<PacketCaptureConfig> = Api::all(self.client.clone());
        let body = serde_json::json!({
            "apiVersion": PacketCaptureConfig::api_version(&()),
            "kind": PacketCaptureConfig::kind(&()),
            "status": new,
        });
        api.patch_status(
            &self.resource.name(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
        self.metrics.status_written();
        self.writes.written(self.resource.uid);
        Ok(())
    }

    async fn announce(&self, node: Option<&str>, type_: EventType, reason: &str, note: String) {
        self.events
            .announce(self.resource.pcc, node, type_, reason, note)
            .await;
    }

    /// A generation whose status says it has ended.
    pub fn ended(&self, phase: Phase) {
        self.metrics.set_phase(self.resource.uid, Some(phase));
    }

    /// A generation that failed before anything started.
    pub async fn failed_before_start(&self, outcome: &Outcome) -> Result<()> {
        let new = self.status(&BTreeMap::new(), outcome);
        let message = &outcome.message;
        self.announce(None, EventType::Warning, outcome.reason, message.clone())
            .await;
        self.announce(None, EventType::Warning, "Failed", message.clone())
            .await;
        self.patch(&new).await
    }

    /// The generation's first nodes, before their agents are called.
    pub async fn starting(&self, nodes: &BTreeMap<String, NodeProgress>) -> Result<()> {
        self.patch(&self.status(nodes, &status::summarize(nodes)))
            .await
    }

    /// The nodes' progress: their Events, and once every node has ended
    /// the results ConfigMaps (before the final status, so a final status
    /// always has its ConfigMaps) and the final Event. Returns the phase,
    /// and when to look again if news of counters alone waits its turn
    /// ([`COUNTER_WRITES_EVERY`]).
    pub async fn progress(
        &self,
        nodes: &BTreeMap<String, NodeProgress>,
    ) -> Result<(Phase, Option<Duration>)> {
        let outcome = status::summarize(nodes);
        let new = self.status(nodes, &outcome);
        self.announce_nodes(nodes).await;
        if status::only_counters_moved(self.resource.previous(), &new)
            && let Some(wait) = self.writes.wait(self.resource.uid)
        {
            self.metrics.set_phase(self.resource.uid, new.phase);
            return Ok((outcome.phase, Some(wait)));
        }
        if outcome.phase.is_final() {
            let every = status::entries(nodes, self.resource.spec().output_format);
            results::publish(self.client, self.resource.pcc, &new, &every, self.namespace).await?;
            let (type_, reason) = if outcome.phase == Phase::Completed {
                (EventType::Normal, "Completed")
            } else {
                (EventType::Warning, "Failed")
            };
            self.announce(None, type_, reason, outcome.message.clone())
                .await;
        }
        self.patch(&new).await?;
        Ok((outcome.phase, None))
    }

    /// Events for nodes that wait for their agent, started or failed, once
    /// each: the status tells what an earlier controller process announced
    /// already. Beyond [`MAX_STATUS_NODES`] nodes one `Started` tells of
    /// them all (thousands of Events would tell nobody anything), once the
    /// first runs.
    async fn announce_nodes(&self, nodes: &BTreeMap<String, NodeProgress>) {
        let same = self.resource.same_generation();
        let recorded = same.map(|s| &s.capture_files);
        if nodes.len() > MAX_STATUS_NODES {
            let running = nodes
                .values()
                .filter(|p| p.state == CaptureState::Running)
                .count();
            let started_before = same.is_some_and(|s| s.start_time.is_some());
            if running > 0 && !started_before {
                let note = format!("capturing on {running} of {} nodes", nodes.len());
                self.announce(None, EventType::Normal, "Started", note)
                    .await;
            }
        }
        for p in nodes.values() {
            let before = recorded.and_then(|r| r.get(&p.node_ip));
            let failed = p.state == CaptureState::Failed;
            // A node that failed after waiting is told as failed, below.
            if p.waiting_since.is_some() && !p.state.is_final() {
                let note = p.message.clone().unwrap_or_default();
                self.announce(Some(&p.node), EventType::Normal, "Waiting", note)
                    .await;
                continue;
            }
            // A node listed as starting may have waited for its agent.
            let new = before.is_none_or(|e| e.status == CaptureState::Starting);
            if nodes.len() <= MAX_STATUS_NODES && new && !failed {
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
            if failed && before.is_none_or(|e| e.status != CaptureState::Failed) {
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

    /// A deleted resource: how many nodes had captures to stop and stopped
    /// them, and those where the stop failed (node, why), which do not hold
    /// the deletion.
    pub async fn deleted(&self, stopped: usize, failures: &[(String, String)]) {
        let pcc = self.resource.pcc;
        for (node, why) in failures {
            self.events
                .publish(
                    pcc,
                    Some(node),
                    EventType::Warning,
                    "StopFailed",
                    format!("could not stop the capture on node {node} ({why}); deleting anyway"),
                )
                .await;
        }
        if stopped > 0 {
            self.events
                .publish(
                    pcc,
                    None,
                    EventType::Normal,
                    "Stopped",
                    format!("capture stopped on {stopped} node(s) before deletion"),
                )
                .await;
        }
        self.events.forget(self.resource.uid);
        self.writes.forget(self.resource.uid);
        self.metrics.set_phase(self.resource.uid, None);
    }
}
