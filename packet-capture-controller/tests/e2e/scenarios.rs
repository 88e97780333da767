//! End-to-end scenarios: a real kube-apiserver, real agents in simulated
//! nodes (network namespaces), the real controller binary, real traffic.
//!
//! Not yet a test target: it needs `packet_capture_test_support::cluster`
//! and the agent binary. To wire it, add to this crate's Cargo.toml
//!
//! ```toml
//! [[test]]
//! name = "e2e"
//! path = "tests/e2e/scenarios.rs"
//!
//! [dev-dependencies]
//! packet-capture-test-support.workspace = true
//! ```
//!
//! What it expects of the cluster module (as sketched in the contracts):
//! `Cluster::shared()`, `cluster.client()`, `cluster.kubeconfig()` (a path),
//! `cluster.add_node(name) -> SimNode` with `node.name()` and
//! `node.internal_ip()`, `node.add_pod(ns, name) -> SimPod` with `pod.ip()`
//! and `pod.exec(&[..]) -> std::process::Output`,
//! `node.start_agent(&[args]) -> SimAgent` (the real agent in the node's
//! namespace, a pod labelled app=packet-capture-agent in kube-system, on
//! `--port`) with `agent.kill()` (SIGKILL), and
//! `cluster.token_for(service_account, audience) -> String`. The controller
//! runs as a process in the host namespace, which reaches the nodes' IPs.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::{
    OutputFormat, PacketCaptureConfig, PacketCaptureConfigSpec, Phase, PodRef, PodSelector,
    STDOUT_OUTPUT_FILE,
};
use packet_capture_proto::v1::agent_client::AgentClient;
use packet_capture_proto::v1::{CaptureState, DownloadFileRequest, ListCapturesRequest};
use packet_capture_test_support::cluster::{Cluster, SimAgent, SimNode, SimPod};
use packet_capture_test_support::{privileged, unique_name};

const AGENT_PORT: u16 = 18080;
const AUDIENCE: &str = "packet-capture-agent";

/// The controller binary, run against the shared cluster.
struct ControllerProcess {
    child: Child,
}

impl ControllerProcess {
    fn start(cluster: &Cluster, token_file: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_packet-capture-controller"))
            .env("KUBECONFIG", cluster.kubeconfig())
            .args(["--namespace", "kube-system", "--disable-webhook"])
            .args(["--agent-port", &AGENT_PORT.to_string()])
            .arg("--agent-token-file")
            .arg(token_file)
            .args(["--metrics-port", "0", "--log-level", "DEBUG"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the controller");
        Self { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster with two simulated nodes, an agent on each, a pod on each, and
/// the controller.
struct World {
    cluster: &'static Cluster,
    client: Client,
    nodes: Vec<SimNode>,
    agents: Vec<SimAgent>,
    pods: Vec<SimPod>,
    token: String,
    token_file: tempfile_path::TempPath,
    controller: ControllerProcess,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl World {
    async fn new() -> Self {
        let cluster = Cluster::shared();
        let client = cluster.client();
        let ns = unique_name("e2e");
        let mut nodes = Vec::new();
        let mut agents = Vec::new();
        let mut pods = Vec::new();
        for i in 0..2 {
            let node = cluster.add_node(&unique_name(&format!("n{i}")));
            agents.push(node.start_agent(&["--port", &AGENT_PORT.to_string()]));
            pods.push(node.add_pod(&ns, &format!("pod{i}")));
            nodes.push(node);
        }
        let token = cluster.token_for("packet-capture-controller", AUDIENCE);
        let path = std::env::temp_dir().join(unique_name("tok"));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(token.as_bytes()))
            .unwrap();
        let token_file = tempfile_path::TempPath(path);
        let controller = ControllerProcess::start(cluster, &token_file.0);
        Self {
            cluster,
            client,
            nodes,
            agents,
            pods,
            token,
            token_file,
            controller,
        }
    }

    fn api(&self) -> Api<PacketCaptureConfig> {
        Api::all(self.client.clone())
    }

    async fn create(&self, spec: PacketCaptureConfigSpec) -> PacketCaptureConfig {
        let pcc = PacketCaptureConfig::new(&unique_name("cap"), spec);
        self.api().create(&PostParams::default(), &pcc).await.unwrap()
    }

    /// Waits (on watch events) until the capture's status satisfies `cond`.
    async fn until(&self, name: &str, what: &str, cond: impl Fn(&PacketCaptureConfig) -> bool) -> PacketCaptureConfig {
        let wait = await_condition(self.api(), name, move |p: Option<&PacketCaptureConfig>| p.is_some_and(&cond));
        tokio::time::timeout(Duration::from_secs(180), wait)
            .await
            .unwrap_or_else(|_| panic!("{name}: timed out waiting for {what}"))
            .unwrap()
            .unwrap()
    }

    async fn until_phase(&self, name: &str, phase: Phase) -> PacketCaptureConfig {
        self.until(name, &format!("{phase:?}"), move |p| {
            p.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    fn ping(&self, from: usize, to: usize, count: u32) {
        let out = self.pods[from].exec(&["ping", "-c", &count.to_string(), "-i", "0.2", &self.pods[to].ip()]);
        assert!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stderr));
    }

    async fn agent(&self, node: usize) -> AgentClient<tonic::transport::Channel> {
        let uri = format!("http://{}:{AGENT_PORT}", self.nodes[node].internal_ip());
        AgentClient::connect(uri).await.unwrap()
    }

    fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
        r
    }

    /// The captures of a resource on a node.
    async fn captures_of(&self, node: usize, uid: &str) -> Vec<packet_capture_proto::v1::Capture> {
        let mut c = self.agent(node).await;
        let list = c.list_captures(self.authed(ListCapturesRequest {})).await.unwrap().into_inner();
        list.captures.into_iter().filter(|c| c.id.starts_with(uid)).collect()
    }

    /// Downloads a node's capture file and has tshark decode it: one line
    /// `src dst proto` per packet.
    async fn packets_in(&self, node: usize, output_file: &str) -> Vec<String> {
        let name = output_file.rsplit('/').next().unwrap().to_string();
        let mut c = self.agent(node).await;
        let mut stream = c
            .download_file(self.authed(DownloadFileRequest { name: name.clone() }))
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend(chunk.unwrap().data);
        }
        let path = std::env::temp_dir().join(format!("{}-{name}", unique_name("dl")));
        std::fs::write(&path, &bytes).unwrap();
        let out = Command::new("tshark")
            .args(["-n", "-r"])
            .arg(&path)
            .args(["-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e", "_ws.col.Protocol"])
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// Every node entry of the status has a file with ICMP between pod 0 and pod 1.
    async fn assert_files_have_the_pings(&self, pcc: &PacketCaptureConfig) {
        let status = pcc.status.as_ref().unwrap();
        let (a, b) = (self.pods[0].ip(), self.pods[1].ip());
        for (i, node) in self.nodes.iter().enumerate() {
            let entry = &status.capture_files[&node.internal_ip()];
            assert_eq!(entry.node, node.name());
            assert!(entry.file_size > 0, "{entry:?}");
            let lines = self.packets_in(i, &entry.output_file).await;
            assert!(entry.packets as usize >= lines.len().min(1));
            let icmp = lines
                .iter()
                .filter(|l| l.contains("ICMP") && l.contains(&a) && l.contains(&b))
                .count();
            assert!(icmp >= 2, "node {}: {lines:?}", node.name());
        }
    }
}

fn pods_spec(refs: &[&SimPod]) -> Option<PodSelector> {
    Some(PodSelector {
        pods: refs
            .iter()
            .map(|p| PodRef { pod_name: p.name().to_string(), namespace: p.namespace().to_string() })
            .collect(),
    })
}

fn short(duration: u32) -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec { duration, max_packets: 10_000, ..Default::default() }
}

/// The /16 holding an IPv4 address, as a CIDR (not a single known address,
/// so it goes to every node).
fn net16(ip: &str) -> String {
    let o: Vec<&str> = ip.split('.').collect();
    format!("{}.{}.0.0/16", o[0], o[1])
}

#[tokio::test]
async fn ip_capture_runs_on_all_nodes() {
    if !privileged("ip_capture_runs_on_all_nodes") {
        return;
    }
    let w = World::new().await;
    let pcc = w.create(PacketCaptureConfigSpec { target_ips: vec![net16(&w.pods[0].ip())], ..short(4) }).await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    assert_eq!(done.status.as_ref().unwrap().nodes, Some(2));
    w.assert_files_have_the_pings(&done).await;
    let cm: Api<ConfigMap> = Api::namespaced(w.client.clone(), "kube-system");
    let results = cm.get(&format!("packet-capture-results-{}", pcc.name_any())).await.unwrap();
    assert_eq!(results.data.unwrap()["phase"], "Completed");
}

#[tokio::test]
async fn pod_capture_runs_on_the_two_pods_nodes() {
    if !privileged("pod_capture_runs_on_the_two_pods_nodes") {
        return;
    }
    let w = World::new().await;
    let pcc = w
        .create(PacketCaptureConfigSpec { pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]), ..short(4) })
        .await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    w.assert_files_have_the_pings(&done).await;
}

#[tokio::test]
async fn combined_pods_and_addresses() {
    if !privileged("combined_pods_and_addresses") {
        return;
    }
    let w = World::new().await;
    // Pod 1's address is known: it goes to node 1 only, pod 0 to node 0.
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0]]),
            target_ips: vec![w.pods[1].ip()],
            ..short(4)
        })
        .await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    for (i, _) in w.nodes.iter().enumerate() {
        let caps = w.captures_of(i, &pcc.uid().unwrap()).await;
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].spec.as_ref().unwrap().target_ips, [w.pods[i].ip()]);
    }
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    w.assert_files_have_the_pings(&done).await;
}

#[tokio::test]
async fn stdout_format_reports_the_seed_text() {
    if !privileged("stdout_format_reports_the_seed_text") {
        return;
    }
    let w = World::new().await;
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0]]),
            output_format: OutputFormat::Stdout,
            ..short(4)
        })
        .await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    let status = done.status.unwrap();
    let entry = &status.capture_files[&w.nodes[0].internal_ip()];
    assert_eq!((entry.output_file.as_str(), entry.file_size), (STDOUT_OUTPUT_FILE, 0));
    assert!(entry.packets >= 2, "{entry:?}");
}

#[tokio::test]
async fn a_missing_pod_fails_naming_it() {
    if !privileged("a_missing_pod_fails_naming_it") {
        return;
    }
    let w = World::new().await;
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector { pods: vec![PodRef { pod_name: "ghost".into(), namespace: "default".into() }] }),
            ..short(4)
        })
        .await;
    let failed = w.until_phase(&pcc.name_any(), Phase::Failed).await;
    assert_eq!(failed.status.unwrap().message.as_deref(), Some("pod default/ghost not found"));
}

#[tokio::test]
async fn an_agent_killed_mid_capture_fails_its_node_only() {
    if !privileged("an_agent_killed_mid_capture_fails_its_node_only") {
        return;
    }
    let w = World::new().await;
    let pcc = w.create(PacketCaptureConfigSpec { target_ips: vec![net16(&w.pods[0].ip())], ..short(8) }).await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    w.ping(0, 1, 5);
    w.agents[1].kill();
    let done = w.until_phase(&pcc.name_any(), Phase::Failed).await;
    let status = done.status.unwrap();
    assert_eq!(status.capture_files[&w.nodes[1].internal_ip()].status, "failed");
    let ok = &status.capture_files[&w.nodes[0].internal_ip()];
    assert_eq!(ok.status, "completed");
    let lines = w.packets_in(0, &ok.output_file).await;
    assert!(lines.iter().any(|l| l.contains("ICMP")), "{lines:?}");
}

#[tokio::test]
async fn a_controller_restart_mid_capture_does_not_duplicate() {
    if !privileged("a_controller_restart_mid_capture_does_not_duplicate") {
        return;
    }
    let mut w = World::new().await;
    let pcc = w.create(PacketCaptureConfigSpec { pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]), ..short(8) }).await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    w.controller.kill();
    w.controller = ControllerProcess::start(w.cluster, &w.token_file.0);
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    for i in 0..2 {
        assert_eq!(w.captures_of(i, &pcc.uid().unwrap()).await.len(), 1, "node {i}");
    }
    w.assert_files_have_the_pings(&done).await;
}

#[tokio::test]
async fn deleting_mid_capture_stops_and_finalizes() {
    if !privileged("deleting_mid_capture_stops_and_finalizes") {
        return;
    }
    let w = World::new().await;
    let pcc = w.create(PacketCaptureConfigSpec { pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]), ..short(300) }).await;
    let running = w
        .until(&pcc.name_any(), "packets on both nodes", |p| {
            p.status.as_ref().is_some_and(|s| s.phase == Some(Phase::Running))
        })
        .await;
    w.ping(0, 1, 5);
    let uid = running.uid().unwrap();
    w.api().delete(&pcc.name_any(), &DeleteParams::default()).await.unwrap();
    let gone = await_condition(w.api(), &pcc.name_any(), conditions::is_deleted(&uid));
    tokio::time::timeout(Duration::from_secs(60), gone).await.unwrap().unwrap();
    for i in 0..2 {
        let caps = w.captures_of(i, &uid).await;
        assert_eq!(caps.len(), 1);
        assert_eq!(caps[0].state, CaptureState::Stopped as i32, "node {i}");
        let lines = w.packets_in(i, &caps[0].output_file).await;
        assert!(lines.iter().any(|l| l.contains("ICMP")), "node {i}: {lines:?}");
    }
}

#[tokio::test]
async fn editing_the_spec_mid_capture_restarts_it() {
    if !privileged("editing_the_spec_mid_capture_restarts_it") {
        return;
    }
    let w = World::new().await;
    let pcc = w.create(PacketCaptureConfigSpec { pod_selector: pods_spec(&[&w.pods[0]]), ..short(300) }).await;
    w.until_phase(&pcc.name_any(), Phase::Running).await;
    let patch = serde_json::json!({"spec": {"duration": 4, "targetPorts": []}});
    w.api().patch(&pcc.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let running2 = w
        .until(&pcc.name_any(), "generation 2 running", |p| {
            p.status.as_ref().is_some_and(|s| s.observed_generation == Some(2) && s.phase == Some(Phase::Running))
        })
        .await;
    w.ping(0, 1, 5);
    let done = w.until_phase(&pcc.name_any(), Phase::Completed).await;
    assert_eq!(done.status.as_ref().unwrap().observed_generation, Some(2));
    let caps = w.captures_of(0, &running2.uid().unwrap()).await;
    assert_eq!(caps.len(), 2);
    let old = caps.iter().find(|c| c.id.contains("-g1-")).unwrap();
    let new = caps.iter().find(|c| c.id.contains("-g2-")).unwrap();
    assert_eq!(old.state, CaptureState::Stopped as i32);
    assert_eq!(new.state, CaptureState::Completed as i32);
    let entry = &done.status.unwrap().capture_files[&w.nodes[0].internal_ip()];
    let lines = w.packets_in(0, &entry.output_file).await;
    assert!(lines.iter().any(|l| l.contains("ICMP")), "{lines:?}");
}
