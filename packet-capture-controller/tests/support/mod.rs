//! Test doubles: an in-process gRPC agent (`packetcapture.v1.Agent`) and a
//! tower-test API server that checks each request the controller makes.

#![allow(dead_code)]

pub mod agent;
pub mod apiserver;

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus, Pod, PodIP, PodSpec, PodStatus};
use kube::Client;
use kube::api::ObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store, store};
use kube::runtime::watcher;
use packet_capture_common::crd::{PacketCaptureConfig, PacketCaptureConfigSpec};
use packet_capture_controller::agents::{AgentPool, PoolSettings};
use packet_capture_controller::backoff::Backoff;
use packet_capture_controller::config::parse_selector;
use packet_capture_controller::consts::FINALIZER;
use packet_capture_controller::controller::{Context, Timing};
use packet_capture_controller::metrics::Metrics;
use packet_capture_controller::tracker::Tracker;

pub use agent::FakeAgent;
pub use apiserver::ApiServer;

pub const NS: &str = "kube-system";

pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().map(|s| s.to_string()),
            pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
            ..Default::default()
        }),
    }
}

pub fn agent_pod(node: &str, ip: &str) -> Pod {
    let mut p = pod(NS, &format!("agent-{node}"), node, &[ip]);
    p.metadata.labels = Some([("app".to_string(), "packet-capture-agent".to_string())].into());
    p.spec.as_mut().unwrap().host_network = Some(true);
    p
}

pub fn node(name: &str, ip: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    // The reader only stays ready while its writer lives.
    std::mem::forget(writer);
    reader
}

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
        let metrics = Arc::new(Metrics::new());
        let pool = AgentPool::new(
            pods.clone(),
            nodes.clone(),
            PoolSettings {
                namespace: NS.into(),
                selector: parse_selector("app=packet-capture-agent").unwrap(),
                port,
                token_file: "/nonexistent/token".into(),
                timeout: Duration::from_secs(5),
            },
            metrics.clone(),
        );
        let (tx, triggers) = mpsc::unbounded();
        let ctx = Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "packet-capture-controller".into(),
                    instance: Some("test".into()),
                },
            ),
            client,
            pods,
            nodes,
            agents: Arc::new(pool),
            tracker: Tracker::new(tx),
            metrics,
            namespace: NS.into(),
            timing: fast_timing(),
        });
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
