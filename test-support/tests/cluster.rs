//! The local control plane against itself: a real kube-apiserver with the
//! committed CRD, simulated nodes and pods with real traffic, tokens, RBAC
//! and the controller-manager's garbage collection. Run as root.

use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, PostParams};
use kube::core::ApiResource;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Resource, ResourceExt};
use packet_capture_common::crd::{MAX_NAME_LEN, PacketCaptureConfig, PacketCaptureConfigSpec};
use packet_capture_test_support::cluster::{
    AGENT_SERVICE_ACCOUNT, COMPONENT_NAMESPACE, Cluster, Lifetime, SimNode,
};
use serde_json::{Value, json};

fn pcc_api(cluster: &Cluster) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<PacketCaptureConfig>(&());
    Api::all_with(cluster.client().unwrap(), &resource)
}

/// A PacketCaptureConfig with `spec` as given, untouched by the Rust types
/// (so defaults come from the server).
fn pcc(name: &str, spec: Value) -> DynamicObject {
    let resource = ApiResource::erase::<PacketCaptureConfig>(&());
    DynamicObject::new(name, &resource).data(json!({ "spec": spec }))
}

/// Whether the Rust side rejects `spec` too: serde (types, enums) or
/// `validate()` (what the webhook and the agent apply).
fn rust_rejects(spec: &Value) -> bool {
    serde_json::from_value::<PacketCaptureConfigSpec>(spec.clone())
        .map_or(true, |s| s.validate().is_err())
}

#[tokio::test]
async fn packet_capture_config_gets_defaults_and_the_server_rejects_bad_specs() {
    let Some(cluster) =
        Cluster::for_test("packet_capture_config_gets_defaults_and_the_server_rejects_bad_specs")
            .await
    else {
        return;
    };
    cluster.install_crd().await.unwrap();
    let api = pcc_api(cluster);

    let name = format!("defaults-{}", std::process::id());
    api.create(
        &PostParams::default(),
        &pcc(&name, json!({"targetIPs": ["10.0.0.1"]})),
    )
    .await
    .unwrap();
    let stored = api.get(&name).await.unwrap();
    let spec = &stored.data["spec"];
    assert_eq!(spec["duration"], 60, "{spec}");
    assert_eq!(spec["maxPackets"], 1000, "{spec}");
    assert_eq!(spec["outputFormat"], "pcap", "{spec}");
    assert_eq!(spec["filter"], "", "{spec}");
    // The typed view reads the same object.
    let typed: Api<PacketCaptureConfig> = Api::all(cluster.client().unwrap());
    let read = typed.get(&name).await.unwrap();
    assert_eq!(read.spec.target_ips, ["10.0.0.1"]);
    assert_eq!(read.spec.duration, 60);
    api.delete(&name, &DeleteParams::default()).await.unwrap();

    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let rejected = [
        (
            json!({}),
            "at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given",
        ),
        (
            json!({"podSelector": {"pods": []}}),
            "at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "targetPorts": [0]}),
            "should be greater than or equal to 1",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "targetPorts": [70000]}),
            "should be less than or equal to 65535",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "outputFormat": "json"}),
            "Unsupported value: \"json\"",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "duration": 0}),
            "spec.duration: Invalid value: 0: spec.duration in body should be greater than or equal to 1",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "maxPackets": 0}),
            "spec.maxPackets",
        ),
        // The server takes any integer for a uint32 format; one stored
        // beyond it would fail every typed list of captures.
        (
            json!({"targetIPs": ["10.0.0.1"], "duration": 4_294_967_296_u64}),
            "spec.duration in body should be less than or equal to 4294967295",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "maxPackets": 4_294_967_296_u64}),
            "spec.maxPackets in body should be less than or equal to 4294967295",
        ),
        (
            json!({"targetIPs": ["10.0.0.300"]}),
            "each entry must be an IP address or a CIDR without host bits",
        ),
        (
            json!({"targetIPs": ["10.0.0.1/24"]}),
            "each entry must be an IP address or a CIDR without host bits",
        ),
        (
            json!({"targetIPs": ["fd00::1/64"]}),
            "each entry must be an IP address or a CIDR without host bits",
        ),
        (
            json!({"targetIPs": ["::ffff:10.0.0.1"]}),
            "each entry must be an IP address or a CIDR without host bits",
        ),
        (
            json!({"targetIPs": ["10.0.0.0/08"]}),
            "each entry must be an IP address or a CIDR without host bits",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "filter": "tcp\u{0}"}),
            "spec.filter: Invalid value: \"tcp\\x00\": must not contain a NUL character",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "snaplen": 262145}),
            "spec.snaplen",
        ),
        (
            json!({"podSelector": {"pods": [{"podName": "Bad_Name", "namespace": "default"}]}}),
            "spec.podSelector.pods[0].podName",
        ),
        (
            json!({"podSelector": {"pods": [{"podName": "web", "namespace": "a.b"}]}}),
            "spec.podSelector.pods[0].namespace",
        ),
        (
            json!({"podSelector": {"matchLabels": {}}}),
            "at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
            "In and NotIn need values; Exists and DoesNotExist take none",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}}),
            "Unsupported value: \"Equals\"",
        ),
        (
            json!({"targetIPs": ["10.0.0.1"], "nodeSelector": {"matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["a"]}]}}),
            "In and NotIn need values; Exists and DoesNotExist take none",
        ),
    ];
    for (i, (spec, expected)) in rejected.iter().enumerate() {
        let obj = pcc(&format!("bad-{i}"), spec.clone());
        match api.create(&dry_run, &obj).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{spec}: {status:?}");
                assert!(
                    status.message.contains(expected),
                    "{spec}: expected {expected:?} in {:?}",
                    status.message
                );
            }
            other => panic!("{spec} was not rejected by the server: {other:?}"),
        }
        assert!(
            rust_rejects(spec),
            "{spec}: the server rejects it, Rust does not"
        );
    }

    // The agents' file names add a stamp and extensions to the name.
    let long_name = |len: usize| pcc(&"n".repeat(len), json!({"targetIPs": ["10.0.0.1"]}));
    match api.create(&dry_run, &long_name(MAX_NAME_LEN + 1)).await {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains(&format!(
                "metadata.name: must be at most {MAX_NAME_LEN} characters"
            )),
            "{status:?}"
        ),
        other => panic!(
            "a name of {} characters was accepted: {other:?}",
            MAX_NAME_LEN + 1
        ),
    }
    api.create(&dry_run, &long_name(MAX_NAME_LEN))
        .await
        .unwrap_or_else(|e| panic!("a name of {MAX_NAME_LEN} characters was refused: {e}"));

    let accepted = [
        json!({"targetIPs": ["10.0.0.0/24", "fd00::/64", "10.0.0.1", "fd00::1", "0.0.0.0/0"]}),
        json!({"targetIPs": ["FD00::/64", "fd00:0::/64", "10.0.0.1/32", "::/0"]}),
        json!({"targetIPs": ["192.168.1.10"], "targetPorts": [1, 80, 65535], "duration": 1, "maxPackets": 1}),
        json!({"targetIPs": ["10.0.0.1"], "duration": 4_294_967_295_u64, "maxPackets": 4_294_967_295_u64}),
        json!({"podSelector": {"pods": [{"podName": "web-0.x", "namespace": "default"}]}, "outputFormat": "pcapng"}),
        json!({"targetIPs": ["10.1.2.3"], "outputFormat": "stdout", "filter": "tcp port 80", "snaplen": 96}),
        json!({
            "podSelector": {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            },
            "nodeSelector": {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "Exists"}]},
            "direction": "ingress",
        }),
        json!({"podSelector": {"namespaceSelector": {}}}),
    ];
    for (i, spec) in accepted.iter().enumerate() {
        let obj = pcc(&format!("good-{i}"), spec.clone());
        if let Err(e) = api.create(&dry_run, &obj).await {
            panic!("{spec} was rejected by the server: {e}");
        }
        assert!(
            !rust_rejects(spec),
            "{spec}: the server accepts it, Rust does not"
        );
    }
}

#[tokio::test]
async fn both_committed_crd_copies_pass_a_server_dry_run() {
    let Some(cluster) = Cluster::for_test("both_committed_crd_copies_pass_a_server_dry_run").await
    else {
        return;
    };
    let root = packet_capture_test_support::cluster::workspace_root();
    for path in [
        "crd/packet_capture_config_crd.yaml",
        "charts/packet-capture/crds/packet_capture_config_crd.yaml",
    ] {
        let file = root.join(path);
        let out = cluster
            .kubectl_run(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            out.contains("packetcaptureconfigs.networking.packet.io"),
            "{out}"
        );
    }
}

#[tokio::test]
async fn nodes_and_pods_look_as_a_kubelet_makes_them() {
    let Some(cluster) = Cluster::for_test("nodes_and_pods_look_as_a_kubelet_makes_them").await
    else {
        return;
    };
    let ns = cluster.namespace("kubelet").await.unwrap();
    let node = cluster.add_node("look").await.unwrap();
    let pod = node.add_pod(ns.name(), "web").await.unwrap();
    let client = cluster.client().unwrap();

    let object = Api::<Node>::all(client.clone())
        .get(node.name())
        .await
        .unwrap();
    let status = object.status.clone().unwrap();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready.status, "True");
    let internal: Vec<&str> = status
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
        .collect();
    assert_eq!(internal, [node.ip().to_string(), node.ipv6().to_string()]);
    let spec = object.spec.clone().unwrap();
    assert_eq!(spec.pod_cidrs.unwrap(), node.pod_cidrs());
    let info = status.node_info.unwrap();
    assert_eq!(
        info.kubelet_version,
        packet_capture_test_support::cluster::KUBERNETES_VERSION
    );
    assert_eq!(object.labels()["kubernetes.io/hostname"], node.name());
    assert!(
        object
            .managed_fields()
            .iter()
            .any(|f| f.manager.as_deref() == Some("kubelet")
                && f.subresource.as_deref() == Some("status")),
        "{:?}",
        object.managed_fields()
    );

    let object = Api::<Pod>::namespaced(client, ns.name())
        .get("web")
        .await
        .unwrap();
    let spec = object.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(node.name()));
    let status = object.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip, Some(pod.ip().to_string()));
    let pod_ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .collect();
    assert_eq!(pod_ips, [pod.ip().to_string(), pod.ipv6().to_string()]);
    assert_eq!(status.host_ip, Some(node.ip().to_string()));
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready.status, "True");

    // The pod's address is the one its namespace holds.
    let addrs = pod.exec(&["ip", "-o", "addr", "show", "eth0"]).unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains(&format!("{}/24", pod.ip())), "{addrs}");
    assert!(addrs.contains(&format!("{}/64", pod.ipv6())), "{addrs}");
}

/// tcpdump in a node's namespace, printing one line per packet.
struct Tcpdump {
    child: Child,
}

impl Tcpdump {
    /// Starts capturing `count` packets matching `filter` on `iface` of
    /// `node`, and returns once tcpdump says it listens.
    fn start(node: &SimNode, iface: &str, count: usize, filter: &str) -> Self {
        let mut child = node
            .command("tcpdump")
            .args(["-l", "-n", "-i", iface, "-c", &count.to_string()])
            .args(filter.split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = stderr.read_line(&mut line).unwrap();
            assert!(n > 0, "tcpdump ended before listening");
            if line.contains("listening on") {
                break;
            }
        }
        Self { child }
    }

    /// What it printed once it has seen its packets (or after `timeout`).
    fn finish(mut self, timeout: Duration) -> String {
        let mut stdout = self.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        let text = match rx.recv_timeout(timeout) {
            Ok(text) => text,
            Err(_) => {
                let _ = self.child.kill();
                rx.recv().unwrap_or_default()
            }
        };
        let _ = self.child.wait();
        text
    }
}

#[tokio::test]
async fn pod_traffic_to_another_node_crosses_both_nodes() {
    let Some(cluster) = Cluster::for_test("pod_traffic_to_another_node_crosses_both_nodes").await
    else {
        return;
    };
    let ns = cluster.namespace("traffic").await.unwrap();
    let node_a = cluster.add_node("a").await.unwrap();
    let node_b = cluster.add_node("b").await.unwrap();
    let pod_a = node_a.add_pod(ns.name(), "client").await.unwrap();
    let pod_b = node_b.add_pod(ns.name(), "server").await.unwrap();

    for (src, dst) in [
        (IpAddr::from(pod_a.ip()), IpAddr::from(pod_b.ip())),
        (pod_a.ipv6().into(), pod_b.ipv6().into()),
    ] {
        let proto = if src.is_ipv4() { "icmp" } else { "icmp6" };
        // 3 requests and 3 replies, on each node's link to the node network.
        let filter = format!("{proto} and host {src} and host {dst}");
        let on_a = Tcpdump::start(&node_a, "eth0", 6, &filter);
        let on_b = Tcpdump::start(&node_b, "eth0", 6, &filter);
        pod_a.ping(dst, 3).unwrap();
        for (node, seen) in [
            (&node_a, on_a.finish(Duration::from_secs(10))),
            (&node_b, on_b.finish(Duration::from_secs(10))),
        ] {
            let requests = seen.lines().filter(|l| l.contains("echo request")).count();
            let replies = seen.lines().filter(|l| l.contains("echo reply")).count();
            assert_eq!((requests, replies), (3, 3), "on {}: {seen}", node.name());
            assert!(
                seen.contains(&format!("{src} > {dst}")),
                "on {}: {seen}",
                node.name()
            );
        }
    }

    // TCP both ways through the nodes, and the host reaches both pods.
    let mut server = pod_b
        .command("nc")
        .args(["-l", "-N", "-p", "5000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&pod_b.command("ss"), 5000);
    let mut client = pod_a
        .command("nc")
        .args(["-N", &pod_b.ip().to_string(), "5000"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello across nodes\n")
        .unwrap();
    assert!(client.wait().unwrap().success());
    let mut got = String::new();
    server
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut got)
        .unwrap();
    server.wait().unwrap();
    assert_eq!(got, "hello across nodes\n");

    pod_a.ping(cluster.host_ip().into(), 1).unwrap();
    let out = Command::new("ping")
        .args(["-n", "-c", "1", "-W", "2", &pod_b.ip().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "the host cannot reach a pod: {out:?}");
}

/// A node or a pod that goes leaves the others' way to their bridge's
/// addresses as it was: the host (on the node network's bridge) and a pod's
/// gateway (its node's `cni0`). A bridge that took its link address from
/// its lowest port would take another when that port went, and the others
/// would go on sending to the departed one while their neighbour entries
/// stayed reachable.
#[tokio::test]
async fn the_host_and_a_pods_gateway_stay_reachable_when_a_node_or_pod_goes() {
    let Some(cluster) =
        Cluster::for_test("the_host_and_a_pods_gateway_stay_reachable_when_a_node_or_pod_goes")
            .await
    else {
        return;
    };
    let ns = cluster.namespace("leaving").await.unwrap();
    let stays = cluster.add_node("stays").await.unwrap();
    let leaves = cluster.add_node("leaves").await.unwrap();
    let pod = stays.add_pod(ns.name(), "stays").await.unwrap();
    let other = stays.add_pod(ns.name(), "leaves").await.unwrap();
    // The ports of those that go get the lowest link address there is.
    lowest_link_address(None, leaves.netns());
    lowest_link_address(Some(stays.netns()), other.netns());
    let gateways: [IpAddr; 2] = [gateway(pod.ip()).into(), gateway_v6(pod.ipv6()).into()];
    let host: [IpAddr; 2] = [cluster.host_ip().into(), cluster.host_ipv6().into()];
    let node_pings = |to: IpAddr| {
        let out = stays
            .command("ping")
            .args(["-n", "-c", "1", "-W", "2", &to.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node {} to {to}: {out:?}",
            stays.name()
        );
    };
    // Their neighbour entries are fresh.
    for to in host {
        node_pings(to);
    }
    for to in gateways {
        pod.ping(to, 1).unwrap();
    }
    drop(leaves);
    drop(other);
    for to in host {
        node_pings(to);
    }
    for to in gateways {
        pod.ping(to, 1)
            .unwrap_or_else(|e| panic!("pod {} to its gateway {to}: {e}", pod.name()));
    }
}

/// Gives the far end of `eth0` in `netns` (a port of a bridge in
/// `bridge_netns`, the host's when `None`) the lowest unicast link address.
fn lowest_link_address(bridge_netns: Option<&str>, netns: &str) {
    let ip = |ns: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new("ip");
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        let out = cmd.args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let eth0 = ip(Some(netns), &["-j", "link", "show", "dev", "eth0"]);
    let peer = eth0[0]["link_index"].as_u64().expect("eth0 is a veth");
    let links = ip(bridge_netns, &["-j", "link", "show"]);
    let port = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["ifindex"].as_u64() == Some(peer))
        .and_then(|l| l["ifname"].as_str())
        .expect("the far end of eth0")
        .to_owned();
    ip(
        bridge_netns,
        &["link", "set", "dev", &port, "address", "02:00:00:00:00:01"],
    );
}

/// A pod's gateway: `.1` of its /24 and `::1` of its /64.
fn gateway(pod: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
    let [a, b, c, _] = pod.octets();
    std::net::Ipv4Addr::new(a, b, c, 1)
}

fn gateway_v6(pod: std::net::Ipv6Addr) -> std::net::Ipv6Addr {
    let mut segments = pod.segments();
    segments[4..].copy_from_slice(&[0, 0, 0, 1]);
    std::net::Ipv6Addr::from(segments)
}

/// Polls `ss` until something listens on TCP `port` (a listener offers no
/// event to another process).
fn wait_listening(ss: &Command, port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = Command::new(ss.get_program());
        cmd.args(ss.get_args())
            .args(["-Hltn", &format!("sport = :{port}")]);
        let out = cmd.output().unwrap();
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn tokens_pass_token_review_only_for_their_audience() {
    let Some(cluster) = Cluster::for_test("tokens_pass_token_review_only_for_their_audience").await
    else {
        return;
    };
    let ns = cluster.namespace("tokens").await.unwrap();
    let token = cluster
        .token_for(ns.name(), "caller", &["packet-capture-agent"])
        .await
        .unwrap();
    let reviews: Api<TokenReview> = Api::all(cluster.client().unwrap());
    let review = |audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..Default::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("packet-capture-agent"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(ok.authenticated, Some(true), "{ok:?}");
    assert_eq!(
        ok.user.unwrap().username.unwrap(),
        format!("system:serviceaccount:{}:caller", ns.name())
    );
    assert_eq!(ok.audiences.unwrap(), ["packet-capture-agent"]);

    let wrong = reviews
        .create(&PostParams::default(), &review("someone-else"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_ne!(wrong.authenticated, Some(true), "{wrong:?}");
}

#[tokio::test]
async fn component_kubeconfigs_are_their_service_accounts_under_rbac() {
    let Some(cluster) =
        Cluster::for_test("component_kubeconfigs_are_their_service_accounts_under_rbac").await
    else {
        return;
    };
    let path = cluster.service_account_kubeconfig(AGENT_SERVICE_ACCOUNT);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let me = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap();
    let user = me.status.unwrap().user_info.unwrap();
    assert_eq!(
        user.username.unwrap(),
        format!("system:serviceaccount:{COMPONENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}")
    );
    // RBAC: nothing granted it secrets.
    match Api::<Secret>::all(client).list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("listing secrets was not forbidden: {other:?}"),
    }
    // kubectl beside the admin kubeconfig works too.
    let version = cluster.kubectl_run(&["version", "-o", "json"]).unwrap();
    let version: Value = serde_json::from_str(&version).unwrap();
    assert_eq!(
        version["serverVersion"]["gitVersion"], "v1.35.4",
        "{version}"
    );
    assert_eq!(
        version["clientVersion"]["gitVersion"], "v1.35.4",
        "{version}"
    );
    // So is helm, for the chart's tests.
    let helm = cluster
        .helm()
        .args(["version", "--short"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&helm.stdout).starts_with("v3.20"),
        "{helm:?}"
    );
}

#[tokio::test]
async fn owned_objects_are_collected_and_deleted_namespaces_emptied() {
    let Some(cluster) =
        Cluster::for_test("owned_objects_are_collected_and_deleted_namespaces_emptied").await
    else {
        return;
    };
    cluster.install_crd().await.unwrap();
    let client = cluster.client().unwrap();
    let ns = cluster.namespace("gc").await.unwrap();

    // A ConfigMap owned by a (cluster-scoped) PacketCaptureConfig, as the
    // controller makes its results ConfigMap.
    let owners: Api<PacketCaptureConfig> = Api::all(client.clone());
    let owner = PacketCaptureConfig::new(
        &format!("gc-owner-{}", std::process::id()),
        PacketCaptureConfigSpec {
            target_ips: vec!["10.0.0.1".into()],
            ..Default::default()
        },
    );
    let owner = owners.create(&PostParams::default(), &owner).await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let owned = ConfigMap {
        metadata: ObjectMeta {
            name: Some("results".into()),
            owner_references: Some(vec![owner.controller_owner_ref(&()).unwrap()]),
            ..Default::default()
        },
        ..Default::default()
    };
    let owned = maps.create(&PostParams::default(), &owned).await.unwrap();
    owners
        .delete(&owner.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&maps, "results", owned.uid().unwrap()).await;

    // Between namespaced objects too.
    let parent = maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("parent".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let child = ConfigMap {
        metadata: ObjectMeta {
            name: Some("child".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "parent".into(),
                uid: parent.uid().unwrap(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };
    let child = maps.create(&PostParams::default(), &child).await.unwrap();
    maps.delete("parent", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_deleted(&maps, "child", child.uid().unwrap()).await;

    // The namespace controller empties and removes a deleted namespace.
    let namespaces: Api<Namespace> = Api::all(client);
    let doomed = namespaces.get(ns.name()).await.unwrap();
    namespaces
        .delete(ns.name(), &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&namespaces, ns.name(), doomed.uid().unwrap()).await;
}

/// Waits (on a watch) until the object `name` with `uid` is gone.
async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: String)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let gone = await_condition(api.clone(), name, conditions::is_deleted(&uid));
    tokio::time::timeout(Duration::from_secs(120), gone)
        .await
        .unwrap_or_else(|_| panic!("{name} was not deleted within 120 s"))
        .unwrap();
}

#[tokio::test]
async fn a_second_cluster_runs_beside_the_shared_one_and_leaves_nothing_behind() {
    let Some(shared) =
        Cluster::for_test("a_second_cluster_runs_beside_the_shared_one_and_leaves_nothing_behind")
            .await
    else {
        return;
    };
    let second = Cluster::start(&format!("second-{}", std::process::id()), Lifetime::Process)
        .await
        .unwrap();
    assert_ne!(second.server(), shared.server());
    assert_ne!(second.host_ip(), shared.host_ip());
    let node = second.add_node("n").await.unwrap();
    let nodes: Api<Node> = Api::all(second.client().unwrap());
    assert!(nodes.get(node.name()).await.is_ok());
    // The shared cluster does not see the second one's node.
    let shared_nodes: Api<Node> = Api::all(shared.client().unwrap());
    assert!(shared_nodes.get_opt(node.name()).await.unwrap().is_none());

    let dir = second.dir().to_path_buf();
    let netns = node.netns().to_string();
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    let state: Value = serde_json::from_str(&state).unwrap();
    let pids: Vec<u64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{state}");
    drop(node);
    drop(second);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !std::path::Path::new("/run/netns").join(&netns).exists(),
        "{netns} is left"
    );
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie about to be reaped.
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "process {pid} still runs: {stat}"
        );
    }
    // The shared cluster still answers.
    assert!(shared_nodes.list(&Default::default()).await.is_ok());
}
