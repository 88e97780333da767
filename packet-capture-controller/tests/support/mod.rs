//! Test doubles: an in-process gRPC agent (`packetcapture.v1.Agent`) and a
//! tower-test API server that checks each request the controller makes.

#![allow(dead_code)]

pub mod agent;
pub mod apiserver;
#[path = "../../src/test_objects.rs"]
mod test_objects;

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::runtime::reflector::ObjectRef;
use packet_capture_common::crd::{PacketCaptureConfig, PacketCaptureConfigSpec};
use packet_capture_controller::agents::{AgentTls, PoolSettings};
use packet_capture_controller::backoff::Backoff;
use packet_capture_controller::config::Timing;
use packet_capture_controller::config::parse_selector;
use packet_capture_controller::consts::FINALIZER;
use packet_capture_controller::controller::{Context, ContextSettings};
use packet_capture_controller::metrics::Metrics;
use packet_capture_controller::targets::Caches;

pub use agent::FakeAgent;
pub use apiserver::ApiServer;

pub use test_objects::*;

/// A `PacketCaptureConfig` as the API server returns it, finalizer added.
pub fn pcc(name: &str, spec: PacketCaptureConfigSpec) -> PacketCaptureConfig {
    let mut p = PacketCaptureConfig::new(name, spec);
    p.metadata.uid = Some(format!("uid-{name}"));
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("1".into());
    p.metadata.finalizers = Some(vec![FINALIZER.into()]);
    p
}

pub fn ip_spec(ips: &[&str]) -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec {
        target_ips: ips.iter().map(|s| s.to_string()).collect(),
        duration: 60,
        ..Default::default()
    }
}

pub fn fast_timing() -> Timing {
    let quick = Backoff::new(Duration::from_millis(1), Duration::from_millis(4), 3);
    Timing {
        start: quick,
        stop: quick,
        watch: quick,
        grace: Duration::from_secs(60),
        agent_wait: Duration::from_secs(120),
        error_requeue: Duration::from_secs(1),
    }
}

/// A controller context on a mock API server, with agents on loopback
/// addresses 127.0.0.2, 127.0.0.3, ... (one port for all, as in a cluster).
pub struct Fixture {
    pub ctx: Arc<Context>,
    pub api: ApiServer,
    pub triggers: mpsc::UnboundedReceiver<ObjectRef<PacketCaptureConfig>>,
    pub agents: Vec<FakeAgent>,
    pub port: u16,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
}

/// A node of the fixture: its name, and whether an agent answers there.
pub struct NodeSpec {
    pub name: &'static str,
    pub agent: bool,
}

pub const fn up(name: &'static str) -> NodeSpec {
    NodeSpec { name, agent: true }
}

pub const fn down(name: &'static str) -> NodeSpec {
    NodeSpec { name, agent: false }
}

impl Fixture {
    pub async fn new(nodes: &[NodeSpec], extra_pods: Vec<Pod>) -> Self {
        let ips: Vec<String> = (0..nodes.len())
            .map(|i| format!("127.0.0.{}", i + 2))
            .collect();
        let (port, agents) = agent::serve_all(
            &nodes
                .iter()
                .zip(&ips)
                .filter(|(n, _)| n.agent)
                .map(|(n, ip)| (n.name, ip.as_str()))
                .collect::<Vec<_>>(),
        )
        .await;
        let mut pods = extra_pods;
        pods.extend(nodes.iter().zip(&ips).map(|(n, ip)| agent_pod(n.name, ip)));
        let node_objs = nodes
            .iter()
            .zip(&ips)
            .map(|(n, ip)| node(n.name, ip))
            .collect();
        Self::with(port, agents, pods, node_objs)
    }

    /// Another controller process with the same agents (a restart): fresh
    /// tracker and caches, a new API server mock.
    pub fn restarted(self) -> Self {
        Self::with(self.port, self.agents, self.pods, self.nodes)
    }

    fn with(port: u16, agents: Vec<FakeAgent>, pods: Vec<Pod>, nodes: Vec<Node>) -> Self {
        let (service, handle) = tower_test::mock::pair();
        let client = Client::new(service, "default");
        let (pod_list, node_list) = (pods.clone(), nodes.clone());
        let pods = store_of(pods);
        let nodes = store_of(nodes);
        let settings = ContextSettings {
            pool: PoolSettings {
                namespace: NS.into(),
                selector: parse_selector("app=packet-capture-agent").unwrap(),
                port,
                token_file: "/nonexistent/token".into(),
                timeout: Duration::from_secs(5),
                concurrency: 8,
                // The fake agents serve plain gRPC; TLS to real agents is
                // covered by the end-to-end tests.
                tls: AgentTls::Plaintext,
            },
            namespace: NS.into(),
            identity: "test".into(),
            timing: fast_timing(),
        };
        let caches = Caches {
            pods,
            nodes,
            namespaces: store_of(Vec::new()),
        };
        let (ctx, triggers) = Context::new(client, caches, settings, Arc::new(Metrics::new()));
        Self {
            ctx,
            api: ApiServer::new(handle),
            triggers,
            agents,
            port,
            pods: pod_list,
            nodes: node_list,
        }
    }

    pub fn agent(&self, node: &str) -> &FakeAgent {
        self.agents
            .iter()
            .find(|a| a.node() == node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// Waits (on the tracker's reconcile triggers) until every tracked node
    /// of `pcc` has ended.
    pub async fn until_nodes_end(&mut self, pcc: &PacketCaptureConfig) {
        use futures::StreamExt;
        let uid = pcc.metadata.uid.clone().unwrap();
        let generation = pcc.metadata.generation.unwrap();
        loop {
            let nodes = self.ctx.tracker.nodes(&uid, generation);
            if !nodes.is_empty() && nodes.values().all(|p| p.state.is_final()) {
                return;
            }
            self.triggers.next().await.expect("trigger channel closed");
        }
    }
}
