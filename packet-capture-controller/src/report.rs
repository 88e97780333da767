//! Tells what came of a reconcile: the status (server-side apply, only when
//! it changed), the Events, the results ConfigMap of an ended generation,
//! and the phase metric.

use std::collections::BTreeMap;

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
use crate::status::{self, Outcome};

/// The reports of one reconcile of one resource.
pub struct Report<'a> {
    pub resource: Resource<'a>,
    pub client: &'a Client,
    pub events: &'a Events,
    pub metrics: &'a Metrics,
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
            self.resource.spec().output_format,
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
    /// the results ConfigMap (before the final status, so a final status
    /// always has its ConfigMap) and the final Event. Returns the phase.
    pub async fn progress(&self, nodes: &BTreeMap<String, NodeProgress>) -> Result<Phase> {
        let outcome = status::summarize(nodes);
        let new = self.status(nodes, &outcome);
        self.announce_nodes(nodes).await;
        if outcome.phase.is_final() {
            results::publish(self.client, self.resource.pcc, &new, self.namespace).await?;
            let (type_, reason) = if outcome.phase == Phase::Completed {
                (EventType::Normal, "Completed")
            } else {
                (EventType::Warning, "Failed")
            };
            self.announce(None, type_, reason, outcome.message.clone())
                .await;
        }
        self.patch(&new).await?;
        Ok(outcome.phase)
    }

    /// Events for nodes that started or failed, once each: the status tells
    /// what an earlier controller process announced already.
    async fn announce_nodes(&self, nodes: &BTreeMap<String, NodeProgress>) {
        let recorded = self.resource.same_generation().map(|s| &s.capture_files);
        for p in nodes.values() {
            let before = recorded.and_then(|r| r.get(&p.node_ip));
            let failed = p.state == CaptureState::Failed;
            if before.is_none() && !failed {
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

    /// A deleted resource: its `stopped` nodes, and those where the stop
    /// failed (node, why), which do not hold the deletion.
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
        self.metrics.set_phase(self.resource.uid, None);
    }
}
