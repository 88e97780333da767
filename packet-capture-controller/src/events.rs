//! Events about `PacketCaptureConfig`s: a recorder that publishes them, and
//! remembers which it has announced so that an announcement goes out once
//! per generation however often reconcile runs.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use packet_capture_common::crd::PacketCaptureConfig;

use crate::consts::CONTROLLER_NAME;

/// What has been announced for one resource: its generation, and the keys.
struct Announced {
    generation: i64,
    keys: HashSet<String>,
}

/// Publishes the controller's Events.
pub struct Events {
    recorder: Recorder,
    /// By uid.
    announced: Mutex<HashMap<String, Announced>>,
}

impl Events {
    /// Events reported by `identity` (this replica) of the controller.
    pub fn new(client: Client, identity: String) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(identity),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            announced: Mutex::default(),
        }
    }

    /// Publishes an Event about `pcc`; one about a node's part has the Node
    /// as its related object, so each node's events are told apart rather
    /// than folded into a series. A failure is logged: an Event is never
    /// worth failing a reconcile for.
    pub async fn publish(
        &self,
        pcc: &PacketCaptureConfig,
        node: Option<&str>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
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
        if let Err(e) = self.recorder.publish(&ev, &pcc.object_ref(&())).await {
            tracing::warn!(name = %pcc.name_any(), reason, "publishing an event: {e}");
        }
    }

    /// Publishes an Event the first time `reason` (and `node`) is announced
    /// for the resource's generation.
    pub async fn announce(
        &self,
        pcc: &PacketCaptureConfig,
        node: Option<&str>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let key = format!("{reason}/{}", node.unwrap_or_default());
        let uid = pcc.uid().unwrap_or_default();
        let generation = pcc.metadata.generation.unwrap_or_default();
        if self.first(&uid, generation, key) {
            self.publish(pcc, node, type_, reason, note).await;
        }
    }

    /// True the first time `key` comes for this generation of `uid`; a new
    /// generation starts afresh.
    fn first(&self, uid: &str, generation: i64, key: String) -> bool {
        let mut announced = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let seen = announced
            .entry(uid.to_string())
            .or_insert_with(|| Announced {
                generation,
                keys: HashSet::new(),
            });
        if seen.generation != generation {
            *seen = Announced {
                generation,
                keys: HashSet::new(),
            };
        }
        seen.keys.insert(key)
    }

    /// Forgets a deleted resource's announcements.
    pub fn forget(&self, uid: &str) {
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Events {
        // The client is never called: only the bookkeeping is tested.
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        Events::new(Client::new(service, "default"), "test".into())
    }

    #[tokio::test]
    async fn announcements_are_made_once_per_generation() {
        let ev = events();
        assert!(ev.first("u", 1, "Started/n1".into()));
        assert!(!ev.first("u", 1, "Started/n1".into()));
        assert!(ev.first("u", 1, "Started/n2".into()));
        assert!(ev.first("v", 1, "Started/n1".into()));
        assert!(ev.first("u", 2, "Started/n1".into()), "a new generation");
        ev.forget("u");
        assert!(ev.first("u", 2, "Started/n1".into()), "forgotten");
    }
}
