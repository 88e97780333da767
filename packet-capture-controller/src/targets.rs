//! Which nodes capture what: `podSelector` pods (by name, and by labels
//! and namespace labels) become their IPs on their nodes; `targetIPs` go to
//! every node with an agent, except a single address that is a known pod IP
//! or node InternalIP, which goes only to that node; `nodeSelector` leaves
//! out the nodes whose labels do not match.
//!
//! Resolved again on every reconcile, so a running capture follows its pods
//! as they come, go and change labels.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use packet_capture_common::crd::{PacketCaptureConfigSpec, PodRef, PodSelector};
use packet_capture_common::validate::parse_target;

/// A target that cannot be captured (yet), and why: a pod (`pod ns/name`)
/// or a `targetIPs` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetProblem {
    pub target: String,
    pub reason: String,
}

impl TargetProblem {
    pub fn pod(pod: &PodRef, reason: String) -> Self {
        Self {
            target: format!("pod {}/{}", pod.namespace, pod.pod_name),
            reason,
        }
    }
}

impl std::fmt::Display for TargetProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.target, self.reason)
    }
}

/// Where a requester was found allowed to capture, as
/// [`AUTHORIZED_IN`](packet_capture_common::crd::AUTHORIZED_IN) records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Granted {
    Everywhere,
    Namespaces(BTreeSet<String>),
}

impl Granted {
    /// Reads the annotation's value (namespace names hold no commas).
    pub fn parse(value: &str) -> Self {
        if value.trim() == "*" {
            return Self::Everywhere;
        }
        Self::Namespaces(
            value
                .split(',')
                .map(str::trim)
                .filter(|ns| !ns.is_empty())
                .map(String::from)
                .collect(),
        )
    }
}

impl std::fmt::Display for Granted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Everywhere => f.write_str("*"),
            Self::Namespaces(ns) => {
                f.write_str(&ns.iter().map(String::as_str).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// Per node name, the sorted target addresses and CIDRs to capture there,
/// and the target pods there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub nodes: BTreeMap<String, Vec<String>>,
    /// The selected pods on each node, sorted by name.
    pub pods: BTreeMap<String, Vec<SelectedPod>>,
    pub problems: Vec<TargetProblem>,
}

/// A target pod on its node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SelectedPod {
    /// `namespace/name`.
    pub name: String,
    /// The addresses captured for it.
    pub ips: Vec<String>,
}

/// The caches targets are resolved against.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
}

impl Caches {
    fn node_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.nodes
            .get(&ObjectRef::new(name))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(&ObjectRef::new(name))
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        // Set by the API server on every namespace; also here for a
        // namespace the cache has not seen yet.
        labels
            .entry("kubernetes.io/metadata.name".into())
            .or_insert_with(|| name.to_owned());
        labels
    }
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

/// A pod's phase, `Unknown` while it has none.
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn pod_name(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// A pod's node and IPs if its traffic can be captured now: running, not
/// being deleted (its IP may already be free), scheduled, with an IP.
fn capturable(pod: &Pod) -> Result<(String, Vec<String>), String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("is being deleted".into());
    }
    let phase = pod_phase(pod);
    if phase != "Running" {
        return Err(format!("is {phase}, not Running"));
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Err("is not scheduled to a node".into());
    };
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return Err("has no IP address yet".into());
    }
    Ok((node, ips))
}

/// Whether the selector's labels (and namespace labels) select `pod`.
/// Host-network pods are never selected by labels: their address is their
/// node's, and capturing it would capture the node (name them instead).
pub fn selects_by_labels(selector: &PodSelector, pod: &Pod, caches: &Caches) -> bool {
    selector.by_labels()
        && !host_network(pod)
        && selector.labels.matches(pod.labels())
        && selector.namespace_selector.as_ref().is_none_or(|ns| {
            ns.matches(&caches.namespace_labels(&pod.namespace().unwrap_or_default()))
        })
}

/// Computes the per-node targets of `spec`, whose requester was found
/// allowed to capture pods where `authorized` says (none recorded: the
/// webhook is off, or the capture predates the record). `agent_nodes` are
/// the nodes with a running agent; pods on other nodes are still planned
/// (their node then fails with "no agent").
pub fn resolve(
    spec: &PacketCaptureConfigSpec,
    authorized: Option<&Granted>,
    caches: &Caches,
    agent_nodes: &BTreeSet<String>,
) -> Targets {
    let allowed = |node: &str| {
        spec.node_selector
            .as_ref()
            .is_none_or(|s| s.matches(&caches.node_labels(node)))
    };
    let mut out = Targets::default();
    let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut pods: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let shared = shared_addresses(&caches.pods);
    if let Some(selector) = &spec.pod_selector {
        let mut selected: Vec<(String, String, Vec<String>)> = Vec::new();
        for r in &selector.pods {
            let key = ObjectRef::new(&r.pod_name).within(&r.namespace);
            let found = caches.pods.get(&key).ok_or_else(|| "not found".to_owned());
            match found.and_then(|pod| Ok((capturable(&pod)?, pod))) {
                Ok(((node, _), _)) if !allowed(&node) => out.problems.push(TargetProblem::pod(
                    r,
                    format!("is on node {node}, which spec.nodeSelector leaves out"),
                )),
                Ok(((node, _), pod)) if let Some(reason) = node_wide(&pod, &node, authorized) => {
                    out.problems.push(TargetProblem::pod(r, reason))
                }
                Ok(((node, ips), _)) => {
                    selected.push((node, format!("{}/{}", r.namespace, r.pod_name), ips))
                }
                Err(reason) => out.problems.push(TargetProblem::pod(r, reason)),
            }
        }
        if selector.by_labels() {
            for pod in caches.pods.state() {
                if !selects_by_labels(selector, &pod, caches) {
                    continue;
                }
                if let Ok((node, ips)) = capturable(&pod)
                    && allowed(&node)
                {
                    selected.push((node, pod_name(&pod), ips));
                }
            }
        }
        for (node, name, ips) in selected {
            // An address that another live pod also reports is not known to
            // be this pod's (one of them is stale): it is left out rather
            // than risk capturing a pod nobody selected.
            let own: Vec<String> = ips.into_iter().filter(|ip| !shared.contains(ip)).collect();
            targets
                .entry(node.clone())
                .or_default()
                .extend(own.iter().cloned());
            pods.entry(node).or_default().insert(name, own);
        }
    }

    if !spec.target_ips.is_empty() {
        let owners = address_owners(&caches.pods, &caches.nodes);
        let holders = match authorized {
            Some(Granted::Namespaces(_)) => address_holders(&caches.pods, &shared),
            _ => HashMap::new(),
        };
        for (i, entry) in spec.target_ips.iter().enumerate() {
            // The webhook and the schema reject what does not parse; here an
            // entry that does not is matched as is on every node.
            let single = single_address(entry);
            if let Some(Granted::Namespaces(namespaces)) = authorized
                && let Some(reason) = outside(single, namespaces, &holders)
            {
                out.problems.push(TargetProblem {
                    target: format!("spec.targetIPs[{i}] {entry}"),
                    reason,
                });
                continue;
            }
            let nodes: Vec<&String> = match single.and_then(|ip| owners.get(&ip)) {
                Some(node) => vec![node],
                None => agent_nodes.iter().collect(),
            };
            for node in nodes.into_iter().filter(|n| allowed(n)) {
                targets
                    .entry(node.clone())
                    .or_default()
                    .insert(entry.clone());
            }
        }
    }
    out.nodes = targets
        .into_iter()
        .map(|(node, ips)| (node, ips.into_iter().collect()))
        .collect();
    out.pods = pods
        .into_iter()
        .map(|(node, names)| {
            let list = names
                .into_iter()
                .map(|(name, ips)| SelectedPod { name, ips })
                .collect();
            (node, list)
        })
        .collect();
    out
}

/// The pods that may hold an address (not finished, not host-network) by
/// each address only they report: who holds a `targetIPs` address now, as
/// namespace and `namespace/name`. A pod still starting or being deleted
/// holds its address until it is gone.
fn address_holders(
    pods: &Store<Pod>,
    shared: &BTreeSet<String>,
) -> HashMap<IpAddr, (String, String)> {
    let mut out = HashMap::new();
    for pod in pods.state() {
        if !may_hold_address(&pod) {
            continue;
        }
        for ip in pod_ips(&pod).iter().filter(|ip| !shared.contains(*ip)) {
            if let Ok(ip) = ip.parse() {
                out.insert(ip, (pod.namespace().unwrap_or_default(), pod_name(&pod)));
            }
        }
    }
    out
}

/// Why a `targetIPs` entry (`single`, if it is one address) is left out
/// for a requester found allowed to capture pods only in `namespaces`: it
/// was admitted as the address of a pod there, and is captured only while
/// a pod there (not finished) holds it, never once the cluster has given
/// it to a pod of another namespace.
fn outside(
    single: Option<IpAddr>,
    namespaces: &BTreeSet<String>,
    holders: &HashMap<IpAddr, (String, String)>,
) -> Option<String> {
    let within = namespaces
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let Some(ip) = single else {
        return Some(format!(
            "is a range, and the requester was authorized to capture pods only in namespaces {within}"
        ));
    };
    match holders.get(&ip) {
        Some((ns, _)) if namespaces.contains(ns) => None,
        Some((_, pod)) => Some(format!(
            "is now the address of pod {pod}, outside the namespaces the requester was authorized to capture pods in ({within}): left out"
        )),
        None => Some(format!(
            "is no pod's address now (or not one pod's alone), and the requester was authorized to capture only pods' addresses (in {within}): left out"
        )),
    }
}

/// Why a named pod on `node` is left out for a requester found allowed to
/// capture pods only in some namespaces: it is on its node's network now
/// (recreated so after admission, where capturing it needed every
/// namespace), and its address would capture the whole node.
fn node_wide(pod: &Pod, node: &str, authorized: Option<&Granted>) -> Option<String> {
    match authorized {
        Some(only @ Granted::Namespaces(_)) if host_network(pod) => Some(format!(
            "is on the host network of node {node} now, and the requester was authorized to capture pods only in namespaces {only}: left out"
        )),
        _ => None,
    }
}

/// Whether `pod` may hold an address of its own: not finished, not on its
/// node's network.
fn may_hold_address(pod: &Pod) -> bool {
    !host_network(pod) && !matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// Addresses that more than one pod that may hold an address (not
/// finished, not host-network) reports.
fn shared_addresses(pods: &Store<Pod>) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for pod in pods.state() {
        if !may_hold_address(&pod) {
            continue;
        }
        for ip in pod_ips(&pod) {
            *seen.entry(ip).or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(ip, _)| ip)
        .collect()
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

/// Whether a pod is one of `spec`'s targets: by name, by labels, or by
/// address.
pub fn spec_mentions_pod(spec: &PacketCaptureConfigSpec, pod: &Pod, caches: &Caches) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let by_name = spec
        .pod_selector
        .iter()
        .flat_map(|s| s.pods.iter())
        .any(|r| r.namespace == ns && r.pod_name == name);
    let by_labels = spec
        .pod_selector
        .as_ref()
        .is_some_and(|s| selects_by_labels(s, pod, caches));
    by_name
        || by_labels
        || pod_ips(pod)
            .iter()
            .any(|ip| spec.target_ips.iter().any(|t| names_address(t, ip)))
}

/// Whether the target `entry` is the single address `ip`, however each is
/// written (`10.1.1.5/32`, an IPv6 address in any case or with zeros).
pub fn names_address(entry: &str, ip: &str) -> bool {
    single_address(entry).is_some_and(|single| ip.parse() == Ok(single))
}

/// The one address a target entry names, if it names one (`10.1.1.5`,
/// `10.1.1.5/32`), not a range.
fn single_address(entry: &str) -> Option<IpAddr> {
    parse_target(entry)
        .ok()
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| net.addr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use packet_capture_common::crd::LabelSelector;

    /// Resolves as for a capture with no [`Granted`] recorded.
    fn resolve(
        spec: &PacketCaptureConfigSpec,
        caches: &Caches,
        agents: &BTreeSet<String>,
    ) -> Targets {
        super::resolve(spec, None, caches, agents)
    }

    fn spec(ips: &[&str], pods: &[(&str, &str)]) -> PacketCaptureConfigSpec {
        spec_of(ips, pods)
    }

    fn caches(pods: Vec<Pod>) -> Caches {
        let mut n1 = node("n1", "192.168.0.1");
        n1.metadata.labels = Some([("zone".to_string(), "a".to_string())].into());
        let mut shop = Namespace::default();
        shop.metadata.name = Some("shop".into());
        shop.metadata.labels = Some([("team".to_string(), "shop".to_string())].into());
        Caches {
            pods: store_of(pods),
            nodes: store_of(vec![n1, node("n2", "192.168.0.2")]),
            namespaces: store_of(vec![shop]),
        }
    }

    fn fixture() -> (Caches, BTreeSet<String>) {
        let caches = caches(vec![
            pod("default", "web", "n1", &["10.1.1.5", "fd00:1::5"]),
            pod("shop", "db", "n2", &["10.1.2.7"]),
        ]);
        let agents = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        (caches, agents)
    }

    fn labelled(ns: &str, name: &str, node: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
        let mut p = pod(ns, name, node, &[ip]);
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
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
        let (caches, agents) = fixture();
        let resolved = resolve(
            &spec(&[], &[("default", "web"), ("shop", "db")]),
            &caches,
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
        let (caches, agents) = fixture();
        let resolved = resolve(
            &spec(&["10.9.0.0/16", "10.1.2.7", "192.168.0.1"], &[]),
            &caches,
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
        let (caches, agents) = fixture();
        let resolved = resolve(
            &spec(&["172.16.0.9"], &[("default", "web")]),
            &caches,
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
        let (caches_now, agents) = fixture();
        let pending = caches(vec![{
            let mut p = pod("default", "late", "n1", &[]);
            p.status.as_mut().unwrap().phase = Some("Pending".into());
            p
        }]);
        let resolved = resolve(
            &spec(&[], &[("default", "gone"), ("default", "web")]),
            &caches_now,
            &agents,
        );
        assert_eq!(resolved.problems.len(), 1);
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod default/gone not found"
        );
        assert_eq!(resolved.nodes.len(), 1);
        let resolved = resolve(&spec(&[], &[("default", "late")]), &pending, &agents);
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod default/late is Pending, not Running"
        );
    }

    #[test]
    fn pods_are_matched_by_reference_labels_or_address() {
        let (caches, _) = fixture();
        let web = labelled("default", "web", "n1", "10.1.1.5", &[("app", "web")]);
        assert!(spec_mentions_pod(
            &spec(&[], &[("default", "web")]),
            &web,
            &caches
        ));
        assert!(spec_mentions_pod(&spec(&["10.1.1.5"], &[]), &web, &caches));
        assert!(spec_mentions_pod(
            &spec(&["10.1.1.5/32"], &[]),
            &web,
            &caches
        ));
        let web6 = labelled("default", "web", "n1", "fd00:1::5", &[]);
        assert!(spec_mentions_pod(
            &spec(&["FD00:1:0::5"], &[]),
            &web6,
            &caches
        ));
        assert!(spec_mentions_pod(
            &by_labels(&[("app", "web")], None),
            &web,
            &caches
        ));
        assert!(!spec_mentions_pod(
            &spec(&["10.1.1.6"], &[("shop", "web")]),
            &web,
            &caches
        ));
        assert!(!spec_mentions_pod(
            &by_labels(&[("app", "db")], None),
            &web,
            &caches
        ));
    }

    fn by_labels(
        labels: &[(&str, &str)],
        namespaces: Option<LabelSelector>,
    ) -> PacketCaptureConfigSpec {
        PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                labels: LabelSelector {
                    match_labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                },
                namespace_selector: namespaces,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn labels_select_running_pods_of_the_selected_namespaces_and_nodes() {
        let gone = {
            let mut p = labelled("default", "web-old", "n2", "10.1.2.9", &[("app", "web")]);
            p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            p
        };
        let host = {
            let mut p = labelled(
                "default",
                "web-host",
                "n2",
                "192.168.0.2",
                &[("app", "web")],
            );
            p.spec.as_mut().unwrap().host_network = Some(true);
            p
        };
        let caches = caches(vec![
            labelled("default", "web-1", "n1", "10.1.1.5", &[("app", "web")]),
            labelled("shop", "web-2", "n2", "10.1.2.7", &[("app", "web")]),
            labelled("shop", "db", "n2", "10.1.2.8", &[("app", "db")]),
            gone,
            host,
        ]);
        let agents = ["n1", "n2"].iter().map(|s| s.to_string()).collect();
        let web = by_labels(&[("app", "web")], None);
        let resolved = resolve(&web, &caches, &agents);
        assert_eq!(
            nodes_of(&resolved),
            [("n1", vec!["10.1.1.5"]), ("n2", vec!["10.1.2.7"])]
        );
        let selected = |name: &str, ip: &str| SelectedPod {
            name: name.into(),
            ips: vec![ip.into()],
        };
        assert_eq!(
            resolved.pods,
            BTreeMap::from([
                (
                    "n1".to_string(),
                    vec![selected("default/web-1", "10.1.1.5")]
                ),
                ("n2".to_string(), vec![selected("shop/web-2", "10.1.2.7")]),
            ])
        );
        let team = LabelSelector {
            match_labels: [("team".to_string(), "shop".to_string())].into(),
            ..Default::default()
        };
        let in_shop = resolve(&by_labels(&[("app", "web")], Some(team)), &caches, &agents);
        assert_eq!(nodes_of(&in_shop), [("n2", vec!["10.1.2.7"])]);
        let by_name = LabelSelector {
            match_labels: [(
                "kubernetes.io/metadata.name".to_string(),
                "default".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        let in_default = resolve(&by_labels(&[], Some(by_name)), &caches, &agents);
        assert_eq!(nodes_of(&in_default), [("n1", vec!["10.1.1.5"])]);

        let zone_a = PacketCaptureConfigSpec {
            node_selector: Some(LabelSelector {
                match_labels: [("zone".to_string(), "a".to_string())].into(),
                ..Default::default()
            }),
            ..web.clone()
        };
        assert_eq!(
            nodes_of(&resolve(&zone_a, &caches, &agents)),
            [("n1", vec!["10.1.1.5"])]
        );
        let cidr_in_zone_a = PacketCaptureConfigSpec {
            target_ips: vec!["10.9.0.0/16".into()],
            pod_selector: None,
            ..zone_a
        };
        assert_eq!(
            nodes_of(&resolve(&cidr_in_zone_a, &caches, &agents)),
            [("n1", vec!["10.9.0.0/16"])]
        );
    }

    #[test]
    fn an_address_two_pods_report_is_left_out() {
        // web-1 was deleted and its address given to web-3 before the
        // cache saw the deletion: neither pod is known to hold it.
        let caches = caches(vec![
            labelled("default", "web-1", "n1", "10.1.1.5", &[("app", "web")]),
            labelled("default", "other", "n1", "10.1.1.5", &[("app", "other")]),
            labelled("default", "web-2", "n1", "10.1.1.6", &[("app", "web")]),
        ]);
        let agents = ["n1"].iter().map(|s| s.to_string()).collect();
        let resolved = resolve(&by_labels(&[("app", "web")], None), &caches, &agents);
        assert_eq!(nodes_of(&resolved), [("n1", vec!["10.1.1.6"])]);
    }

    #[test]
    fn a_named_pod_on_a_node_left_out_is_a_problem() {
        let (caches, agents) = fixture();
        let spec = PacketCaptureConfigSpec {
            node_selector: Some(LabelSelector {
                match_labels: [("zone".to_string(), "a".to_string())].into(),
                ..Default::default()
            }),
            ..spec(&[], &[("shop", "db")])
        };
        let resolved = resolve(&spec, &caches, &agents);
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod shop/db is on node n2, which spec.nodeSelector leaves out"
        );
    }

    #[test]
    fn a_requester_allowed_in_some_namespaces_captures_addresses_of_pods_there_only() {
        let (caches, agents) = fixture();
        let ips = ["10.1.1.5", "10.1.2.7", "10.1.9.9", "10.1.0.0/16"];
        let in_default = Granted::parse("default");
        let resolved = super::resolve(&spec(&ips, &[]), Some(&in_default), &caches, &agents);
        assert_eq!(nodes_of(&resolved), [("n1", vec!["10.1.1.5"])]);
        let problems: Vec<String> = resolved.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "spec.targetIPs[1] 10.1.2.7 is now the address of pod shop/db, outside the namespaces the requester was authorized to capture pods in (default): left out",
                "spec.targetIPs[2] 10.1.9.9 is no pod's address now (or not one pod's alone), and the requester was authorized to capture only pods' addresses (in default): left out",
                "spec.targetIPs[3] 10.1.0.0/16 is a range, and the requester was authorized to capture pods only in namespaces default",
            ]
        );
        // Allowed everywhere, or nothing recorded: every entry, as before.
        for authorized in [Some(&Granted::parse("*")), None] {
            let resolved = super::resolve(&spec(&ips, &[]), authorized, &caches, &agents);
            assert!(resolved.problems.is_empty(), "{:?}", resolved.problems);
            assert_eq!(
                resolved.nodes["n1"],
                ["10.1.0.0/16", "10.1.1.5", "10.1.9.9"]
            );
        }
    }

    #[test]
    fn a_named_pod_now_on_the_host_network_needs_a_requester_allowed_everywhere() {
        let mut db = pod("shop", "db", "n2", &["192.168.0.2"]);
        db.spec.as_mut().unwrap().host_network = Some(true);
        let caches = caches(vec![db, pod("default", "web", "n1", &["10.1.1.5"])]);
        let agents = ["n1", "n2"].iter().map(|s| s.to_string()).collect();
        let named = spec(&[], &[("shop", "db"), ("default", "web")]);
        let in_both = Granted::parse("default,shop");
        let resolved = super::resolve(&named, Some(&in_both), &caches, &agents);
        assert_eq!(nodes_of(&resolved), [("n1", vec!["10.1.1.5"])]);
        assert_eq!(
            resolved.problems[0].to_string(),
            "pod shop/db is on the host network of node n2 now, and the requester was authorized to capture pods only in namespaces default,shop: left out"
        );
        // Allowed everywhere (as the webhook requires for a host-network
        // pod), or nothing recorded: the node's address, as before.
        for authorized in [Some(&Granted::Everywhere), None] {
            let resolved = super::resolve(&named, authorized, &caches, &agents);
            assert!(resolved.problems.is_empty(), "{:?}", resolved.problems);
            assert_eq!(
                nodes_of(&resolved),
                [("n1", vec!["10.1.1.5"]), ("n2", vec!["192.168.0.2"])]
            );
        }
    }

    #[test]
    fn granted_scopes_round_trip_through_their_annotation() {
        let some = Granted::Namespaces(["shop".into(), "default".into()].into());
        assert_eq!(some.to_string(), "default,shop");
        assert_eq!(Granted::parse("default, shop"), some);
        assert_eq!(Granted::Everywhere.to_string(), "*");
        assert_eq!(Granted::parse("*"), Granted::Everywhere);
        assert_eq!(Granted::parse(""), Granted::Namespaces(BTreeSet::new()));
    }
}
