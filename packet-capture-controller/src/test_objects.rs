//! Small builders for Pods, Nodes and ready caches as the API server and
//! reflectors give them; shared by the unit tests and `tests/support`.

#![allow(dead_code)]

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use kube::api::ObjectMeta;
use kube::runtime::reflector::{Store, store};
use kube::runtime::watcher;
use packet_capture_common::crd::{PacketCaptureConfigSpec, PodRef, PodSelector};

/// Where the agents and the settings live.
pub const NS: &str = "kube-system";

/// A running, ready, scheduled pod with these IPs.
pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("uid-{ns}-{name}")),
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
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A host-network agent pod of the DaemonSet on `node`.
pub fn agent_pod(node: &str, ip: &str) -> Pod {
    let mut p = pod(NS, &format!("agent-{node}"), node, &[ip]);
    p.metadata.labels = Some([("app".to_string(), "packet-capture-agent".to_string())].into());
    if let Some(spec) = p.spec.as_mut() {
        spec.host_network = Some(true);
    }
    p
}

/// `podSelector` of `(namespace, name)` pairs; none for no pairs.
pub fn selector(pods: &[(&str, &str)]) -> Option<PodSelector> {
    (!pods.is_empty()).then(|| PodSelector {
        pods: pods
            .iter()
            .map(|(ns, name)| PodRef {
                namespace: ns.to_string(),
                pod_name: name.to_string(),
            })
            .collect(),
        ..Default::default()
    })
}

/// A spec capturing `ips` and the pods `(namespace, name)`.
pub fn spec_of(ips: &[&str], pods: &[(&str, &str)]) -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec {
        target_ips: ips.iter().map(|s| s.to_string()).collect(),
        pod_selector: selector(pods),
        ..Default::default()
    }
}

/// A node with one InternalIP.
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

/// A ready cache holding `objects`.
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
    // The reader stays ready only while its writer lives.
    std::mem::forget(writer);
    reader
}
