//! Whose traffic a PacketCaptureConfig's creator may capture.
//!
//! Capturing is reading: a capture of a pod is allowed only to a user with
//! the verb `capture` on `pods` in the pod's namespace (a dedicated verb, so
//! `get pods` is not enough), and anything that reaches beyond single pods
//! (a node's address, a hostNetwork pod, an address that is no pod's, any
//! range wider than one address) needs `capture` on `pods` in every
//! namespace. A range is judged by what it covers at any time, not only
//! now: a free address of a pod network is a future pod's, so only existing
//! pods' own addresses count as a namespace's.
//!
//! [`needs`] works out the permissions from the spec and what the cluster
//! holds, without calling anyone; [`check`] asks the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::{LabelOperator, LabelSelector, PacketCaptureConfigSpec};
use packet_capture_common::validate::parse_target;

use crate::targets::{Granted, pod_ips};

/// The verb on `pods` that allows capturing their traffic.
pub const CAPTURE_VERB: &str = "capture";

/// The permissions capturing a spec's targets needs, each with the field
/// that needs it and why.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    /// Namespace → (field, why), the first field reaching into it.
    pub namespaces: BTreeMap<String, (String, String)>,
    /// (field, why) of each target that needs every namespace.
    pub cluster: Vec<(String, String)>,
}

/// What the cluster holds that decides whose an address is.
#[derive(Debug, Default)]
pub struct Holders {
    /// Each node's name and addresses.
    pub nodes: Vec<(String, Vec<IpAddr>)>,
    /// The pods of the targets: those named by `podSelector.pods` and those
    /// whose addresses are `targetIPs`.
    pub pods: Vec<Pod>,
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    pod_ips(pod)
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// The single address of `net`, if it covers exactly one.
fn single(net: &IpNet) -> Option<IpAddr> {
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

/// What capturing `spec`'s targets needs, given who holds which address.
pub fn needs(spec: &PacketCaptureConfigSpec, holders: &Holders) -> Needs {
    let mut out = Needs::default();
    let namespace = |out: &mut Needs, ns: &str, field: String, why: String| {
        out.namespaces.entry(ns.to_owned()).or_insert((field, why));
    };
    let selected = spec.pod_selector.iter().flat_map(|s| s.pods.iter());
    for (i, target) in selected.enumerate() {
        let field = format!("spec.podSelector.pods[{i}]");
        let name = format!("{}/{}", target.namespace, target.pod_name);
        let pod = holders.pods.iter().find(|p| {
            p.namespace().as_deref() == Some(target.namespace.as_str())
                && p.name_any() == target.pod_name
        });
        if pod.is_some_and(host_network) {
            out.cluster.push((
                field,
                format!("pod {name} uses its node's network, so its traffic is the node's"),
            ));
        } else {
            namespace(&mut out, &target.namespace, field, format!("pod {name}"));
        }
    }
    if let Some(selector) = spec.pod_selector.as_ref().filter(|s| s.by_labels()) {
        let field = "spec.podSelector".to_owned();
        match pinned_namespaces(selector.namespace_selector.as_ref()) {
            Some(names) => {
                for ns in names {
                    let why = format!("it selects pods by labels in namespace {ns}");
                    namespace(&mut out, &ns, field.clone(), why);
                }
            }
            None => out.cluster.push((
                field,
                format!(
                    "it selects pods by labels in any namespace, now or to come (name the namespaces with namespaceSelector {NAMESPACE_NAME} In [...])"
                ),
            )),
        }
    }
    for (i, target) in spec.target_ips.iter().enumerate() {
        let field = format!("spec.targetIPs[{i}]");
        // The CRD's schema and the webhook's validation refuse bad entries.
        let Ok(net) = parse_target(target) else {
            continue;
        };
        if let Some((node, addr)) = holders
            .nodes
            .iter()
            .find_map(|(node, addrs)| addrs.iter().find(|a| net.contains(*a)).map(|a| (node, a)))
        {
            out.cluster.push((
                field,
                format!("{target} covers {addr}, an address of node {node}"),
            ));
            continue;
        }
        let Some(addr) = single(&net) else {
            out.cluster.push((
                field,
                format!("{target} is a range, which covers addresses of no pod or of pods to come"),
            ));
            continue;
        };
        let pod = holders
            .pods
            .iter()
            .find(|p| !host_network(p) && pod_addresses(p).contains(&addr));
        match pod.and_then(|p| Some((p.namespace()?, p.name_any()))) {
            Some((ns, name)) => {
                let why = format!("{target} is the address of pod {ns}/{name}");
                namespace(&mut out, &ns, field, why);
            }
            None => out
                .cluster
                .push((field, format!("{target} is not the address of a pod"))),
        }
    }
    out
}

/// The label the API server gives every namespace: its name.
const NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The namespaces a namespace selector can ever select, when it names them
/// by [`NAMESPACE_NAME`] (which nobody can change); `None` when any
/// namespace may match, now or later.
fn pinned_namespaces(selector: Option<&LabelSelector>) -> Option<BTreeSet<String>> {
    let selector = selector?;
    let mut pinned: Option<BTreeSet<String>> = None;
    let mut narrow = |names: BTreeSet<String>| {
        pinned = Some(match pinned.take() {
            Some(p) => p.intersection(&names).cloned().collect(),
            None => names,
        });
    };
    if let Some(name) = selector.match_labels.get(NAMESPACE_NAME) {
        narrow(BTreeSet::from([name.clone()]));
    }
    for r in &selector.match_expressions {
        if r.key == NAMESPACE_NAME && r.operator == LabelOperator::In {
            narrow(r.values.iter().cloned().collect());
        }
    }
    pinned
}

/// Every address of a node, as its status lists them.
fn node_addresses(node: &Node) -> Vec<IpAddr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// Reads what [`needs`] must know about `spec`'s targets: every node's
/// addresses, the named pods, and the pods holding each single target
/// address (found on the node whose pod CIDR holds it, else by
/// `status.podIP`).
pub async fn holders(client: &Client, spec: &PacketCaptureConfigSpec) -> kube::Result<Holders> {
    let mut holders = Holders::default();
    let singles: Vec<IpAddr> = spec
        .target_ips
        .iter()
        .filter_map(|t| single(&parse_target(t).ok()?))
        .collect();
    let named = spec.pod_selector.iter().flat_map(|s| s.pods.iter());
    for target in named {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
        if let Some(pod) = pods.get_opt(&target.pod_name).await? {
            holders.pods.push(pod);
        }
    }
    if spec.target_ips.is_empty() {
        return Ok(holders);
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let pods: Api<Pod> = Api::all(client.clone());
    for addr in singles {
        let on_node = nodes.items.iter().find(|n| {
            n.spec
                .iter()
                .flat_map(|s| s.pod_cidrs.iter().flatten().chain(s.pod_cidr.iter()))
                .filter_map(|c| c.parse::<IpNet>().ok())
                .any(|c| c.contains(&addr))
        });
        let selector = match on_node {
            Some(node) => format!("spec.nodeName={}", node.name_any()),
            None => format!("status.podIP={addr}"),
        };
        let list = pods.list(&ListParams::default().fields(&selector)).await?;
        holders.pods.extend(
            list.items
                .into_iter()
                .filter(|p| pod_addresses(p).contains(&addr)),
        );
    }
    holders.nodes = nodes
        .items
        .iter()
        .map(|n| (n.name_any(), node_addresses(n)))
        .collect();
    Ok(holders)
}

/// Where a permission holds: one namespace or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    Cluster,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Namespace(ns) => write!(f, "namespace {ns:?}"),
            Self::Cluster => f.write_str("every namespace"),
        }
    }
}

/// Whether `user` may `capture` pods in `scope` (a SubjectAccessReview).
pub async fn may_capture(client: &Client, user: &UserInfo, scope: &Scope) -> kube::Result<bool> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                namespace: match scope {
                    Scope::Namespace(ns) => Some(ns.clone()),
                    Scope::Cluster => None,
                },
                verb: Some(CAPTURE_VERB.into()),
                group: Some(String::new()),
                resource: Some("pods".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Checks whether `user` may capture `spec`'s targets: [`holders`],
/// [`needs`] and [`check`] in one; the needs come with the verdict.
pub async fn authorize(
    client: &Client,
    spec: &PacketCaptureConfigSpec,
    user: &UserInfo,
) -> Result<(Needs, Verdict), String> {
    let holders = holders(client, spec)
        .await
        .map_err(|e| format!("could not look up the pods and nodes of the targets: {e}"))?;
    let needs = needs(spec, &holders);
    let verdict = check(client, user, &needs).await;
    Ok((needs, verdict))
}

/// The verdict on a spec's targets for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What is missing, each naming its field; empty when allowed.
    pub problems: Vec<String>,
    /// The scopes the user was found to hold, for the record.
    pub granted: Vec<Scope>,
    /// Some permission could not be checked (an API error).
    pub incomplete: bool,
}

/// Where `user` may capture, for a capture of `spec`'s `targetIPs` and
/// named pods to record: every namespace, or the namespaces its targets
/// need that they may capture in. An error when that cannot be found out
/// now.
pub async fn authorized_in(
    client: &Client,
    spec: &PacketCaptureConfigSpec,
    user: &UserInfo,
) -> Result<Granted, String> {
    let (needs, verdict) = authorize(client, spec, user).await?;
    if verdict.incomplete {
        return Err(verdict.problems.join("; "));
    }
    let mut namespaces = BTreeSet::new();
    for scope in verdict.granted {
        match scope {
            Scope::Cluster => return Ok(Granted::Everywhere),
            Scope::Namespace(ns) => namespaces.insert(ns),
        };
    }
    // Someone who may capture everywhere follows addresses wherever they
    // go, even when these targets did not need it (then it was not asked).
    if needs.cluster.is_empty() {
        match may_capture(client, user, &Scope::Cluster).await {
            Ok(true) => return Ok(Granted::Everywhere),
            Ok(false) => {}
            Err(e) => {
                return Err(format!(
                    "could not check whether the user may capture pods in every namespace: {e}"
                ));
            }
        }
    }
    Ok(Granted::Namespaces(namespaces))
}

/// Checks `needs` against `user`'s permissions. With the cluster-wide
/// permission every namespace is covered, so it is asked first when
/// anything needs it.
pub async fn check(client: &Client, user: &UserInfo, needs: &Needs) -> Verdict {
    let who = user.username.as_deref().unwrap_or("(anonymous)");
    let mut verdict = Verdict {
        problems: Vec::new(),
        granted: Vec::new(),
        incomplete: false,
    };
    if !needs.cluster.is_empty() {
        match may_capture(client, user, &Scope::Cluster).await {
            Ok(true) => {
                verdict.granted.push(Scope::Cluster);
                return verdict;
            }
            Ok(false) => {
                for (field, why) in &needs.cluster {
                    verdict.problems.push(format!(
                        "{field}: {why}, so capturing it needs \"capture\" on pods in every namespace, which user {who:?} does not have"
                    ));
                }
            }
            Err(e) => {
                verdict.incomplete = true;
                for (field, _) in &needs.cluster {
                    verdict.problems.push(format!(
                        "{field}: could not check whether user {who:?} may capture pods in every namespace: {e}"
                    ));
                }
            }
        }
    }
    for (ns, (field, why)) in &needs.namespaces {
        let scope = Scope::Namespace(ns.clone());
        match may_capture(client, user, &scope).await {
            Ok(true) => verdict.granted.push(scope),
            Ok(false) => verdict.problems.push(format!(
                "{field}: {why}: user {who:?} may not \"capture\" pods in namespace {ns:?}"
            )),
            Err(e) => {
                verdict.incomplete = true;
                verdict.problems.push(format!(
                    "{field}: could not check whether user {who:?} may capture pods in namespace {ns:?}: {e}"
                ));
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::spec_of;
    use packet_capture_common::crd::{LabelRequirement, PodSelector};

    fn pod(ns: &str, name: &str, ips: &[&str], host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"containers": [], "hostNetwork": host_network},
            "status": {"podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    fn spec(pods: &[(&str, &str)], ips: &[&str]) -> PacketCaptureConfigSpec {
        spec_of(ips, pods)
    }

    #[test]
    fn each_target_needs_its_namespace_or_the_cluster() {
        let holders = Holders {
            nodes: vec![(
                "node-1".into(),
                vec!["192.168.1.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            )],
            pods: vec![
                pod("team-a", "web", &["10.244.1.5", "fd10::5"], false),
                pod("team-b", "db", &["10.244.1.6"], false),
                pod("kube-system", "proxy", &["192.168.1.10"], true),
            ],
        };
        let ns = |pairs: &[(&str, &str, &str)]| {
            pairs
                .iter()
                .map(|(ns, field, why)| (ns.to_string(), (field.to_string(), why.to_string())))
                .collect::<BTreeMap<_, _>>()
        };
        let cluster = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(f, w)| (f.to_string(), w.to_string()))
                .collect::<Vec<_>>()
        };
        for (what, spec, want) in [
            (
                "a named pod: its namespace",
                spec(&[("team-a", "web")], &[]),
                Needs {
                    namespaces: ns(&[("team-a", "spec.podSelector.pods[0]", "pod team-a/web")]),
                    cluster: vec![],
                },
            ),
            (
                "a pod not there yet: its namespace",
                spec(&[("team-c", "later")], &[]),
                Needs {
                    namespaces: ns(&[("team-c", "spec.podSelector.pods[0]", "pod team-c/later")]),
                    cluster: vec![],
                },
            ),
            (
                "a hostNetwork pod: the cluster",
                spec(&[("kube-system", "proxy")], &[]),
                Needs {
                    namespaces: BTreeMap::new(),
                    cluster: cluster(&[(
                        "spec.podSelector.pods[0]",
                        "pod kube-system/proxy uses its node's network, so its traffic is the node's",
                    )]),
                },
            ),
            (
                "pods' own addresses, v4 and v6: their namespaces",
                spec(&[], &["10.244.1.5", "fd10::5", "10.244.1.6"]),
                Needs {
                    namespaces: ns(&[
                        (
                            "team-a",
                            "spec.targetIPs[0]",
                            "10.244.1.5 is the address of pod team-a/web",
                        ),
                        (
                            "team-b",
                            "spec.targetIPs[2]",
                            "10.244.1.6 is the address of pod team-b/db",
                        ),
                    ]),
                    cluster: vec![],
                },
            ),
            (
                "a node's address, a range over it, everything: the cluster",
                spec(
                    &[],
                    &["192.168.1.10", "192.168.1.0/24", "0.0.0.0/0", "::/0"],
                ),
                Needs {
                    namespaces: BTreeMap::new(),
                    cluster: cluster(&[
                        (
                            "spec.targetIPs[0]",
                            "192.168.1.10 covers 192.168.1.10, an address of node node-1",
                        ),
                        (
                            "spec.targetIPs[1]",
                            "192.168.1.0/24 covers 192.168.1.10, an address of node node-1",
                        ),
                        (
                            "spec.targetIPs[2]",
                            "0.0.0.0/0 covers 192.168.1.10, an address of node node-1",
                        ),
                        (
                            "spec.targetIPs[3]",
                            "::/0 covers fd00::10, an address of node node-1",
                        ),
                    ]),
                },
            ),
            (
                "a range of pod addresses, a free address, an outside one: the cluster",
                spec(&[], &["10.244.1.0/30", "10.244.1.99", "8.8.8.8"]),
                Needs {
                    namespaces: BTreeMap::new(),
                    cluster: cluster(&[
                        (
                            "spec.targetIPs[0]",
                            "10.244.1.0/30 is a range, which covers addresses of no pod or of pods to come",
                        ),
                        (
                            "spec.targetIPs[1]",
                            "10.244.1.99 is not the address of a pod",
                        ),
                        ("spec.targetIPs[2]", "8.8.8.8 is not the address of a pod"),
                    ]),
                },
            ),
            (
                "the first field reaching a namespace is named",
                spec(&[("team-a", "web")], &["10.244.1.5"]),
                Needs {
                    namespaces: ns(&[("team-a", "spec.podSelector.pods[0]", "pod team-a/web")]),
                    cluster: vec![],
                },
            ),
            (
                "labels in namespaces named by their name label: those namespaces",
                labels(Some(LabelSelector {
                    match_labels: [(NAMESPACE_NAME.to_string(), "team-a".to_string())].into(),
                    match_expressions: vec![LabelRequirement {
                        key: NAMESPACE_NAME.into(),
                        operator: LabelOperator::In,
                        values: vec!["team-a".into(), "team-b".into()],
                    }],
                })),
                Needs {
                    namespaces: ns(&[(
                        "team-a",
                        "spec.podSelector",
                        "it selects pods by labels in namespace team-a",
                    )]),
                    cluster: vec![],
                },
            ),
            (
                "labels in any namespace, or in namespaces chosen by other labels: the cluster",
                labels(Some(LabelSelector {
                    match_labels: [("team".to_string(), "a".to_string())].into(),
                    ..Default::default()
                })),
                Needs {
                    namespaces: BTreeMap::new(),
                    cluster: cluster(&[(
                        "spec.podSelector",
                        "it selects pods by labels in any namespace, now or to come (name the namespaces with namespaceSelector kubernetes.io/metadata.name In [...])",
                    )]),
                },
            ),
        ] {
            assert_eq!(needs(&spec, &holders), want, "{what}");
        }
        assert_eq!(needs(&labels(None), &holders).cluster.len(), 1);
    }

    fn labels(namespaces: Option<LabelSelector>) -> PacketCaptureConfigSpec {
        PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                labels: LabelSelector {
                    match_labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                },
                namespace_selector: namespaces,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
