//! Which nodes capture what: `podSelector` pods become their IPs on their
//! nodes; `targetIPs` go to every node with an agent, except a single address
//! that is a known pod IP or node InternalIP, which goes only to that node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use packet_capture_common::crd::{PacketCaptureConfigSpec, PodRef};
use packet_capture_common::validate::parse_target;

/// A target pod that cannot be captured (yet), and why, naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    pub pod: PodRef,
    pub reason: String,
}

impl std::fmt::Display for PodProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} {}",
            self.pod.namespace, self.pod.pod_name, self.reason
        )
    }
}

/// Per node name, the sorted target addresses and CIDRs to capture there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub nodes: BTreeMap<String, Vec<String>>,
    pub problems: Vec<PodProblem>,
}

/// Every IP of a pod (v4 and v6), from `status.podIPs`, else `status.podIP`.
pub fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .collect();
    if ips.is_empty()
        && let Some(ip) = &status.pod_ip
    {
        ips.push(ip.clone());
    }
    ips
}

/// The node's first InternalIP.
pub fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

fn all_internal_ips(node: &Node) -> impl Iterator<Item = &str> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

/// Resolves one pod reference to its node and IPs.
fn resolve_pod(pods: &Store<Pod>, r: &PodRef) -> Result<(String, Vec<String>), String> {
    let key = kube::runtime::reflector::ObjectRef::new(&r.pod_name).within(&r.namespace);
    let Some(pod) = pods.get(&key) else {
        return Err("not found".into());
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("is being deleted".into());
    }
    let phase = pod_phase(&pod);
    if phase != "Running" {
        return Err(format!("is {phase}, not Running"));
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Err("is not scheduled to a node".into());
    };
    let ips = pod_ips(&pod);
    if ips.is_empty() {
        return Err("has no IP address yet".into());
    }
    Ok((node, ips))
}

/// Computes the per-node targets of `spec`. `agent_nodes` are the nodes with
/// a running agent; pods on other nodes are still planned (their node then
/// fails with "no agent").
pub fn resolve(
    spec: &PacketCaptureConfigSpec,
    pods: &Store<Pod>,
    nodes: &Store<Node>,
    agent_nodes: &BTreeSet<String>,
) -> Targets {
    let mut out = Targets::default();
    let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let pod_refs = spec.pod_selector.iter().flat_map(|s| s.pods.iter());
    for r in pod_refs {
        match resolve_pod(pods, r) {
            Ok((node, ips)) => targets.entry(node).or_default().extend(ips),
            Err(reason) => out.problems.push(PodProblem {
                pod: r.clone(),
                reason,
            }),
        }
    }

    if !spec.target_ips.is_empty() {
        let owners = address_owners(pods, nodes);
        for entry in &spec.target_ips {
            // The webhook and the schema reject what does not parse; here an
            // entry that does not is matched as is on every node.
            let single = parse_target(entry)
                .ok()
                .filter(|net| net.prefix_len() == net.max_prefix_len())
                .map(|net| net.addr());
            match single.and_then(|ip| owners.get(&ip)) {
                Some(node) => {
                    targets
                        .entry(node.clone())
                        .or_default()
                        .insert(entry.clone());
                }
                None => {
                    for node in agent_nodes {
                        targets
                            .entry(node.clone())
                            .or_default()
                            .insert(entry.clone());
                    }
                }
            }
        }
    }
    out.nodes = targets
        .into_iter()
        .map(|(node, ips)| (node, ips.into_iter().collect()))
        .collect();
    out
}

/// Which node each known address lives on: node InternalIPs, and the IPs of
/// running, scheduled pods (a host-network pod's IP is its node's).
fn address_owners(pods: &Store<Pod>, nodes: &Store<Node>) -> HashMap<IpAddr, String> {
    let mut owners = HashMap::new();
    for pod in pods.state() {
        if pod_phase(&pod) != "Running" {
            continue;
        }
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        for ip in pod_ips(&pod) {
            if let Ok(ip) = ip.parse() {
                owners.insert(ip, node.clone());
            }
        }
    }
    for node in nodes.state() {
        let Some(name) = node.metadata.name.as_ref() else {
            continue;
        };
        for ip in all_internal_ips(&node) {
            if let Ok(ip) = ip.parse() {
                owners.insert(ip, name.clone());
            }
        }
    }
    owners
}

/// Whether a pod is one of `spec`'s targets, by reference or by address.
pub fn spec_mentions_pod(spec: &PacketCaptureConfigSpec, pod: &Pod) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let by_ref = spec
        .pod_selector
        .iter()
        .flat_map(|s| s.pods.iter())
        .any(|r| r.namespace == ns && r.pod_name == name);
    by_ref
        || (!spec.target_ips.is_empty()
            && pod_ips(pod).iter().any(|ip| spec.target_ips.contains(ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::*;

    fn spec(ips: &[&str], pods: &[(&str, &str)]) -> PacketCaptureConfigSpec {
        spec_of(ips, pods)
    }

    fn fixture() -> (Store<Pod>, Store<Node>, BTreeSet<String>) {
        let pods = store_of(vec![
            pod("default", "web", "n1", &["10.1.1.5", "fd00:1::5"]),
            pod("shop", "db", "n2", &["10.1.2.7"]),
        ]);
        let nodes = store_of(vec![node("n1", "192.168.0.1"), node("n2", "192.168.0.2")]);
        let agents = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        (pods, nodes, agents)
    }

    fn nodes_of(resolved: &Targets) -> Vec<(&str, Vec<&str>)> {
        resolved
            .nodes
            .iter()
            .map(|(n, t)| (n.as_str(), t.iter().map(String::as_str).collect()))
            .collect()
    }

    #[test]
    fn pods_go_to_their_nodes_with_all_their_ips() {
        let (pods, nodes, agents) = fixture();
        let resolved = resolve(
            &spec(&[], &[("default", "web"), ("shop", "db")]),
            &pods,
            &nodes,
            &agents,
        );
        assert!(resolved.problems.is_empty());
        assert_eq!(
            nodes_of(&resolved),
            [
                ("n1", vec!["10.1.1.5", "fd00:1::5"]),
                ("n2", vec!["10.1.2.7"])
            ]
        );
    }

    #[test]
    fn addresses_go_everywhere_unless_a_pod_or_node_owns_them() {
        let (pods, nodes, agents) = fixture();
        let resolved = resolve(
            &spec(&["10.9.0.0/16", "10.1.2.7", "192.168.0.1"], &[]),
            &pods,
            &nodes,
            &agents,
        );
        assert_eq!(
            nodes_of(&resolved),
            [
                ("n1", vec!["10.9.0.0/16", "192.168.0.1"]),
                ("n2", vec!["10.1.2.7", "10.9.0.0/16"]),
                ("n3", vec!["10.9.0.0/16"]),
            ]
        );
    }

    #[test]
    fn combined_specs_merge_per_node() {
        let (pods, nodes, agents) = fixture();
        let resolved = resolve(
            &spec(&["172.16.0.9"], &[("default", "web")]),
            &pods,
            &nodes,
            &agents,
        );
        assert_eq!(
            nodes_of(&resolved),
            [
                ("n1", vec!["10.1.1.5", "172.16.0.9", "fd00:1::5"]),
                ("n2", vec!["172.16.0.9"]),
                ("n3", vec!["172.16.0.9"]),
            ]
        );
    }

    #[test]
    fn missing_and_not_running_pods_are_named() {
        let (pods, nodes, agents) = fixture();
        let pending = store_of(vec![{
            let mut p = pod("default", "late", "n1", &[]);
            p.status.as_mut().unwrap().phase = Some("Pending".into());
            p
        }]);
        let resolved = resolve(
            &spec(&[], &[("default", "gone"), ("default", "web")]),
            &pods,
            &nodes,
            &agents,
        );
        assert_eq!(resolved.problems.len(), 1);
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod default/gone not found"
        );
        assert_eq!(resolved.nodes.len(), 1);
        let resolved = resolve(
            &spec(&[], &[("default", "late")]),
            &pending,
            &nodes,
            &agents,
        );
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod default/late is Pending, not Running"
        );
    }

    #[test]
    fn pods_are_matched_by_reference_or_address() {
        let web = pod("default", "web", "n1", &["10.1.1.5"]);
        assert!(spec_mentions_pod(&spec(&[], &[("default", "web")]), &web));
        assert!(spec_mentions_pod(&spec(&["10.1.1.5"], &[]), &web));
        assert!(!spec_mentions_pod(
            &spec(&["10.1.1.6"], &[("shop", "web")]),
            &web
        ));
    }
}
