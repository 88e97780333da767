//! End-to-end scenarios: the local control plane's real kube-apiserver with
//! the project's CRD, RBAC and ConfigMap applied as an install applies them,
//! real agents in simulated nodes authenticating every call (TokenReview and
//! SubjectAccessReview against the apiserver), the real controller binary
//! under its service account's kubeconfig with a token for the agents'
//! audience, and real traffic between simulated pods on different nodes.
//!
//! Each scenario runs in its own world (see `world.rs`) in the test binary's
//! shared cluster, so they run side by side. Every scenario that captures
//! downloads the files through the agents' DownloadFile and reads them with
//! tshark. Run as root (`cargo test -p packet-capture-controller --test
//! e2e`, after `cargo build -p packet-capture-agent`).

mod kubectl_pcap;
mod world;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, ResourceExt};
use packet_capture_common::crd::{
    AUTHORIZED_IN, CaptureState, OutputFormat, PacketCaptureConfig, PacketCaptureConfigSpec,
    PacketCaptureConfigStatus, Phase, PodRef, PodSelector, REQUESTED_BY, STDOUT_OUTPUT_FILE,
};
use packet_capture_controller::{issuer, pki};
use packet_capture_test_support::cluster::{COMPONENT_NAMESPACE, Cluster, SimPod};
use packet_capture_test_support::unique_name;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use world::{
    CA_SECRET, CERT_SECRET, Certs, MAX_PER_REQUESTER, Setup, TWO_NODES, WEBHOOK_CONFIGURATION,
    WORLD_LABEL, World, labelled,
};

const COMPLETED: &str = "Packet capture completed on all nodes";

const DAY: Duration = Duration::from_secs(24 * 3600);

fn pods_spec(pods: &[&SimPod]) -> Option<PodSelector> {
    Some(PodSelector {
        pods: pods
            .iter()
            .map(|p| PodRef {
                pod_name: p.name().to_string(),
                namespace: p.namespace().to_string(),
            })
            .collect(),
        ..Default::default()
    })
}

/// Packets a counted capture writes on each node: two pings and their
/// replies as they cross a node's three interfaces.
const PACKETS: u32 = 12;

/// A capture that ends on each node when it has written [`PACKETS`]
/// packets (the pings go on until then), so that nodes whose captures
/// start a little apart still capture the same pings.
fn counted() -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec {
        duration: 120,
        max_packets: PACKETS,
        ..Default::default()
    }
}

/// A capture that ends after `duration` seconds (not by its packet count).
fn lasting(duration: u32) -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec {
        duration,
        max_packets: 100_000,
        ..Default::default()
    }
}

/// A capture of both pods of a two-node world, for ten minutes, once it
/// runs on both nodes: its name and uid.
async fn capture_both_for_minutes(w: &World) -> (String, String) {
    let spec = PacketCaptureConfigSpec {
        pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
        ..lasting(600)
    };
    let (pcc, name) = w.start_capture(spec, 2).await;
    (name, World::uid(&pcc))
}

/// The /16 of an IPv4 address: a CIDR, not a known address, so it goes to
/// every node with an agent.
fn net16(ip: std::net::Ipv4Addr) -> String {
    let [a, b, ..] = ip.octets();
    format!("{a}.{b}.0.0/16")
}

/// The reasons of the Events about a resource.
async fn event_reasons(w: &World, uid: &str) -> Vec<String> {
    let events: Api<Event> = Api::all(w.client.clone());
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
        .await
        .expect("listing events");
    list.items.into_iter().filter_map(|e| e.reason).collect()
}

#[tokio::test]
async fn ip_capture_runs_on_all_nodes() {
    let Some(w) = World::start("ip_capture_runs_on_all_nodes", TWO_NODES).await else {
        return;
    };
    // The node network's /16 holds the controller's and the apiserver's
    // traffic with the agents too: the filter keeps the pings.
    let spec = PacketCaptureConfigSpec {
        target_ips: vec![net16(w.pods[0].ip())],
        filter: "icmp".into(),
        ..counted()
    };
    let (pcc, name) = w.start_capture(spec, 2).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.nodes, Some(2));
    assert_eq!(status.packets, Some(2 * u64::from(PACKETS)));
    assert_eq!(status.message.as_deref(), Some(COMPLETED));
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    w.assert_all_completed_with_pings(status).await;

    let results: Api<ConfigMap> = Api::namespaced(w.client.clone(), COMPONENT_NAMESPACE);
    let results = results
        .get(&format!("packet-capture-results-{name}"))
        .await
        .expect("the results ConfigMap");
    let data = results.data.unwrap();
    assert_eq!(
        (data["phase"].as_str(), data["nodes"].as_str()),
        ("Completed", "2")
    );
    let reasons = event_reasons(&w, &World::uid(&pcc)).await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "Started").count(),
        2,
        "{reasons:?}"
    );
    assert!(reasons.contains(&"Completed".to_string()), "{reasons:?}");
}

/// Nodes of the widest end-to-end capture.
const FIFTY: usize = 50;

/// A capture of the node network on fifty nodes, each with its real agent:
/// every node runs it once and completes; the status lists them all (below
/// the bound where it lists only the nodes that need attention), and the
/// controller wrote it far less often than the agents reported (counters
/// at most once a second, plus the transitions).
#[tokio::test]
async fn a_capture_on_fifty_nodes_starts_once_on_each_and_completes() {
    let setup = Setup {
        nodes: FIFTY,
        ..TWO_NODES
    };
    let Some(w) = World::start(
        "a_capture_on_fifty_nodes_starts_once_on_each_and_completes",
        setup,
    )
    .await
    else {
        return;
    };
    let duration = 10;
    let spec = PacketCaptureConfigSpec {
        target_ips: vec![net16(w.pods[0].ip())],
        filter: "icmp".into(),
        ..lasting(duration)
    };
    let (pcc, name) = w.start_capture(spec, FIFTY).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let status = done.status.unwrap();
    assert_eq!(status.nodes, Some(FIFTY as u32));
    assert_eq!(
        status.capture_files.len(),
        FIFTY,
        "every node, in the seed's shape"
    );
    assert_eq!(status.capture_files_omitted, None);
    assert_eq!(
        status.node_states,
        [("completed".to_string(), FIFTY as u32)].into()
    );
    let uid = World::uid(&pcc);
    for i in 0..FIFTY {
        let captures = w.captures_of(i, &uid).await;
        assert_eq!(captures.len(), 1, "node {i}: {captures:?}");
    }
    w.assert_pings_in(0, &w.entry(&status, 0).output_file, 0, 1)
        .await;
    let metrics = w.metrics_port_get("/metrics").await;
    let writes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("packet_capture_controller_status_writes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no status write count in {metrics}"));
    // Each node starting, running and completing is a transition; the
    // counters of fifty nodes reporting every second add one a second.
    let bound = 3 * FIFTY as u64 + u64::from(duration) + 10;
    assert!(writes <= bound, "{writes} status writes, more than {bound}");
}

#[tokio::test]
async fn pod_capture_runs_on_the_two_pods_nodes() {
    let Some(w) = World::start("pod_capture_runs_on_the_two_pods_nodes", TWO_NODES).await else {
        return;
    };
    let spec = PacketCaptureConfigSpec {
        pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
        ..counted()
    };
    let (_, name) = w.start_capture(spec, 2).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let per_node = w
        .assert_all_completed_with_pings(done.status.as_ref().unwrap())
        .await;
    let pod_ips: Vec<String> = w.pods.iter().map(|p| p.ip().to_string()).collect();
    for (i, packets) in per_node.iter().enumerate() {
        // Only the pods' traffic (IPv6 packets have no ip.src).
        let others: Vec<_> = packets
            .iter()
            .filter(|p| !p.src.is_empty())
            .filter(|p| !pod_ips.contains(&p.src) && !pod_ips.contains(&p.dst))
            .collect();
        assert!(others.is_empty(), "node {i}: {others:?}");
    }
}

#[tokio::test]
async fn combined_pods_and_addresses() {
    let Some(w) = World::start("combined_pods_and_addresses", TWO_NODES).await else {
        return;
    };
    // Pod 1's address is a known pod IP: it goes to pod 1's node only, and
    // pod 0 (both its addresses) to pod 0's node.
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0]]),
            target_ips: vec![w.pods[1].ip().to_string()],
            ..counted()
        })
        .await;
    let name = pcc.name_any();
    w.until_running_on(&name, 1, 2).await;
    let uid = World::uid(&pcc);
    let expected = [
        vec![w.pods[0].ip().to_string(), w.pods[0].ipv6().to_string()],
        vec![w.pods[1].ip().to_string()],
    ];
    for (i, want) in expected.iter().enumerate() {
        let captures = w.captures_of(i, &uid).await;
        assert_eq!(captures.len(), 1, "node {i}: {captures:?}");
        let mut targets = captures[0].spec.as_ref().unwrap().target_ips.clone();
        targets.sort();
        let mut want = want.clone();
        want.sort();
        assert_eq!(targets, want, "node {i}");
    }
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    w.assert_all_completed_with_pings(done.status.as_ref().unwrap())
        .await;
}

#[tokio::test]
async fn stdout_format_logs_packet_lines() {
    let Some(w) = World::start("stdout_format_logs_packet_lines", TWO_NODES).await else {
        return;
    };
    let spec = PacketCaptureConfigSpec {
        pod_selector: pods_spec(&[&w.pods[0]]),
        output_format: OutputFormat::Stdout,
        ..counted()
    };
    let (_, name) = w.start_capture(spec, 1).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let status = done.status.unwrap();
    assert_eq!(status.nodes, Some(1));
    let entry = w.entry(&status, 0);
    assert_eq!(
        (entry.output_file.as_str(), entry.file_size),
        (STDOUT_OUTPUT_FILE, 0)
    );
    assert_eq!(entry.packets, u64::from(PACKETS), "{entry:?}");
    let (a, b) = (w.pods[0].ip(), w.pods[1].ip());
    let log = w.agents[0].log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("PACKET: ")).collect();
    assert_eq!(lines.len(), PACKETS as usize, "{lines:#?}");
    for want in [
        format!("{a} > {b}: ICMP echo request"),
        format!("{b} > {a}: ICMP echo reply"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(&want)),
            "no {want:?} in {lines:#?}"
        );
    }
    assert!(
        !w.agents[1].log().contains("PACKET: "),
        "the other node captured"
    );
}

#[tokio::test]
async fn a_missing_pod_fails_naming_it() {
    let Some(w) = World::start("a_missing_pod_fails_naming_it", TWO_NODES).await else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                pods: vec![PodRef {
                    pod_name: "ghost".into(),
                    namespace: w.namespace.name().into(),
                }],
                ..Default::default()
            }),
            ..lasting(4)
        })
        .await;
    let failed = w.until_phase(&pcc.name_any(), Phase::Failed).await;
    assert_eq!(
        failed.status.unwrap().message,
        Some(format!("pod {}/ghost not found", w.namespace.name()))
    );
    let uid = World::uid(&pcc);
    for i in 0..2 {
        assert!(w.captures_of(i, &uid).await.is_empty(), "node {i} captures");
    }
    let reasons = event_reasons(&w, &uid).await;
    assert!(reasons.contains(&"PodNotFound".to_string()), "{reasons:?}");
}

/// A capture on two nodes during which `lose` takes node 1's agent away
/// (and returns its log, shown if the outcome is not the one expected):
/// the capture fails on node 1 only, for `reason`, and node 0 completes
/// with the pings. The world and the final status.
async fn lose_an_agent_mid_capture(
    test: &str,
    lose: impl FnOnce(&mut World) -> String,
    reason: &str,
) -> Option<(World, PacketCaptureConfigStatus)> {
    let mut w = World::start(test, TWO_NODES).await?;
    let spec = PacketCaptureConfigSpec {
        target_ips: vec![net16(w.pods[0].ip())],
        filter: "icmp".into(),
        ..counted()
    };
    let (pcc, name) = w.start_capture(spec, 2).await;
    let lost_log = lose(&mut w);
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Failed).await;
    drop(pinging);
    let status = done.status.unwrap();
    let lost = w.entry(&status, 1);
    assert_eq!(lost.status, CaptureState::Failed, "{lost:?}");
    let ok = w.entry(&status, 0);
    assert_eq!(ok.status, CaptureState::Completed, "{ok:?}");
    let message = status.message.as_deref().unwrap_or_default();
    assert!(
        message.contains("capture failed on 1 of 2 nodes") && message.contains("1 node completed"),
        "{message}"
    );
    assert_eq!(
        status.conditions[0].reason, reason,
        "{message}\nnode 1's agent's log:\n{lost_log}"
    );
    let reasons = event_reasons(&w, &World::uid(&pcc)).await;
    for r in [reason, "Failed"] {
        assert!(reasons.contains(&r.to_string()), "{reasons:?}");
    }
    w.assert_pings_in(0, &ok.output_file, 0, 1).await;
    Some((w, status))
}

#[tokio::test]
async fn an_agent_killed_mid_capture_fails_its_node_only() {
    let Some((w, status)) = lose_an_agent_mid_capture(
        "an_agent_killed_mid_capture_fails_its_node_only",
        |w| {
            w.agents[1].kill().expect("killing the agent");
            w.agents[1].log()
        },
        "AgentUnreachable",
    )
    .await
    else {
        return;
    };
    let why = w.entry(&status, 1).message.as_deref().unwrap_or_default();
    assert!(why.contains("lost contact with the agent"), "{why}");
}

#[tokio::test]
async fn an_agent_stopped_mid_capture_fails_its_node() {
    // SIGTERM, as when the agent's pod is deleted: the agent ends its
    // captures `stopped`, which the controller did not ask for.
    let Some((w, status)) = lose_an_agent_mid_capture(
        "an_agent_stopped_mid_capture_fails_its_node",
        |w| {
            let agent = w.agents.remove(1);
            let log = agent.log_path().to_owned();
            let exit = agent.stop().expect("stopping the agent");
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(
                exit.success(),
                "the agent did not stop cleanly: {exit}\n{log}"
            );
            log
        },
        "NodeFailed",
    )
    .await
    else {
        return;
    };
    let why = w.entry(&status, 1).message.as_deref().unwrap_or_default();
    let expected = format!(
        "the agent on node {} ended the capture without being asked",
        w.nodes[1].name()
    );
    assert!(why.starts_with(&expected), "{why}");
}

#[tokio::test]
async fn a_controller_restart_mid_capture_does_not_duplicate() {
    let Some(mut w) = World::start(
        "a_controller_restart_mid_capture_does_not_duplicate",
        TWO_NODES,
    )
    .await
    else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
            ..counted()
        })
        .await;
    let name = pcc.name_any();
    let uid = World::uid(&pcc);
    let running = w.until_running_on(&name, 1, 2).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..2 {
            ids.extend(w.captures_of(i, &uid).await.into_iter().map(|c| c.id));
        }
        ids
    };
    w.controller.kill();
    w.controller.restart();
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let status = done.status.unwrap();
    assert_eq!(status.start_time, running.status.unwrap().start_time);
    for (i, id) in ids.iter().enumerate() {
        let captures = w.captures_of(i, &uid).await;
        assert_eq!(captures.len(), 1, "node {i}: {captures:?}");
        assert_eq!(&captures[0].id, id, "node {i}");
        assert_eq!(captures[0].capture_state(), Ok(CaptureState::Completed));
    }
    w.assert_all_completed_with_pings(&status).await;
}

/// An agent that restarted while the controller was down has lost the
/// capture (its file ends where the old agent stopped): its node fails,
/// rather than a new capture being started there as if nothing happened.
#[tokio::test]
async fn an_agent_restarted_while_the_controller_was_down_fails_its_node() {
    let Some(mut w) = World::start(
        "an_agent_restarted_while_the_controller_was_down_fails_its_node",
        TWO_NODES,
    )
    .await
    else {
        return;
    };
    let (name, uid) = capture_both_for_minutes(&w).await;
    w.controller.kill();
    w.replace_agent(1).await;
    w.controller.restart();
    w.agents[1]
        .until_serving()
        .await
        .expect("the new agent serves");
    let ip1 = w.nodes[1].ip().to_string();
    let failed = w
        .until(&name, "node 1 failed", move |p| {
            p.status.as_ref().is_some_and(|s| {
                s.capture_files
                    .get(&ip1)
                    .is_some_and(|e| e.status == CaptureState::Failed)
            })
        })
        .await;
    let status = failed.status.unwrap();
    let why = w.entry(&status, 1).message.clone().unwrap_or_default();
    // Told by the new agent, or, had it not served in time, by the watch
    // giving up on it: either way the cut is reported.
    assert!(
        why.contains("no longer knows capture") || why.starts_with("lost contact"),
        "{why}"
    );
    assert_eq!(w.entry(&status, 0).status, CaptureState::Running);
    assert_eq!(status.phase, Some(Phase::Running));
    let restarted = w.captures_of(1, &uid).await;
    assert!(restarted.is_empty(), "started afresh: {restarted:?}");
}

#[tokio::test]
async fn a_node_whose_agent_is_not_ready_yet_waits_for_it() {
    // Node 1's agent as a kubelet shows one whose startup probe has not
    // passed yet (a rollout, a node just joined).
    let setup = Setup {
        unready_agents: &[1],
        ..TWO_NODES
    };
    let Some(w) = World::start("a_node_whose_agent_is_not_ready_yet_waits_for_it", setup).await
    else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
            ..counted()
        })
        .await;
    let name = pcc.name_any();
    let (ip0, ip1) = (w.nodes[0].ip().to_string(), w.nodes[1].ip().to_string());
    let waiting = w
        .until(&name, "node 0 running and node 1 waiting", move |p| {
            p.status.as_ref().is_some_and(|s| {
                let state = |ip: &str| s.capture_files.get(ip).map(|e| e.status);
                state(&ip0) == Some(CaptureState::Running)
                    && state(&ip1) == Some(CaptureState::Starting)
            })
        })
        .await;
    let status = waiting.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Running));
    let why = w.entry(&status, 1).message.clone().unwrap_or_default();
    let expected = format!(
        "waiting for the agent on node {}: its pod {COMPONENT_NAMESPACE}/{} is not Ready yet",
        w.nodes[1].name(),
        w.agents[1].pod_name()
    );
    assert_eq!(why, expected);
    let message = status.message.unwrap_or_default();
    assert!(message.ends_with("1 waiting for its agent"), "{message}");
    let events: Api<Event> = Api::all(w.client.clone());
    let event = until_event(&events, &World::uid(&pcc), "Waiting").await;
    assert_eq!(event.message.as_deref(), Some(expected.as_str()));
    // Nothing runs there yet.
    assert!(w.captures_of(1, &World::uid(&pcc)).await.is_empty());

    w.agents[1]
        .set_ready(true)
        .await
        .expect("marking the agent ready");
    w.until_running_on(&name, 1, 2).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    w.assert_all_completed_with_pings(done.status.as_ref().unwrap())
        .await;
}

/// With `--agent-wait-seconds`, a node whose agent never becomes Ready
/// fails once that wait is over (far sooner than the default 120 s, and
/// than the world's wait), naming the agent's pod; the other node
/// completes with the pings.
#[tokio::test]
async fn a_node_whose_agent_stays_unready_fails_after_the_wait() {
    const AGENT_WAIT: u32 = 3;
    let setup = Setup {
        agent_wait_seconds: Some(AGENT_WAIT),
        unready_agents: &[1],
        ..TWO_NODES
    };
    let Some(w) = World::start(
        "a_node_whose_agent_stays_unready_fails_after_the_wait",
        setup,
    )
    .await
    else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
            ..counted()
        })
        .await;
    let name = pcc.name_any();
    let ip1 = w.nodes[1].ip().to_string();
    let failed = w
        .until(&name, "node 1 failed", move |p| {
            p.status.as_ref().is_some_and(|s| {
                s.capture_files.get(&ip1).map(|e| e.status) == Some(CaptureState::Failed)
            })
        })
        .await;
    let why = w
        .entry(failed.status.as_ref().unwrap(), 1)
        .message
        .clone()
        .unwrap_or_default();
    assert_eq!(
        why,
        format!(
            "the agent on node {} was not ready in time (waited {AGENT_WAIT}s): its pod {COMPONENT_NAMESPACE}/{} is not Ready yet",
            w.nodes[1].name(),
            w.agents[1].pod_name()
        )
    );
    assert!(w.captures_of(1, &World::uid(&pcc)).await.is_empty());
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Failed).await;
    drop(pinging);
    let status = done.status.unwrap();
    assert_eq!(
        status.conditions[0].reason, "AgentUnreachable",
        "{status:?}"
    );
    // The node's own Event says so too, as for any node that fails.
    let reasons = event_reasons(&w, &World::uid(&pcc)).await;
    assert!(
        reasons.contains(&"AgentUnreachable".to_string()),
        "{reasons:?}"
    );
    let node0 = w.entry(&status, 0);
    assert_eq!(node0.status, CaptureState::Completed, "{node0:?}");
}

#[tokio::test]
async fn deleting_mid_capture_stops_and_finalizes() {
    let Some(w) = World::start("deleting_mid_capture_stops_and_finalizes", TWO_NODES).await else {
        return;
    };
    let (name, uid) = capture_both_for_minutes(&w).await;
    w.ping(0, 1, 5).await;
    w.delete_capture(&name, &uid).await;
    for i in 0..2 {
        let captures = w.captures_of(i, &uid).await;
        assert_eq!(captures.len(), 1, "node {i}: {captures:?}");
        let c = &captures[0];
        assert_eq!(
            c.capture_state(),
            Ok(CaptureState::Stopped),
            "node {i}: {c:?}"
        );
        assert!(!c.output_file.is_empty() && c.file_size > 0, "{c:?}");
        w.assert_pings_in(i, &c.output_file, 0, 1).await;
    }
    let reasons = event_reasons(&w, &uid).await;
    assert!(reasons.contains(&"Stopped".to_string()), "{reasons:?}");
}

#[tokio::test]
async fn editing_the_spec_mid_capture_restarts_it() {
    let Some(w) = World::start("editing_the_spec_mid_capture_restarts_it", TWO_NODES).await else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0]]),
            ..lasting(600)
        })
        .await;
    let name = pcc.name_any();
    let uid = World::uid(&pcc);
    w.until_running_on(&name, 1, 1).await;
    // Both pods now, and a packet count instead of minutes.
    let both = pods_spec(&[&w.pods[0], &w.pods[1]]);
    let patch = json!({"spec": {"maxPackets": PACKETS, "podSelector": both}});
    w.api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("editing the spec");
    w.until_running_on(&name, 2, 2).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    let status = done.status.unwrap();
    assert_eq!(status.observed_generation, Some(2));
    let node0 = w.captures_of(0, &uid).await;
    assert_eq!(node0.len(), 2, "{node0:?}");
    let old = node0.iter().find(|c| c.id.ends_with("-g1")).unwrap();
    let new = node0.iter().find(|c| c.id.ends_with("-g2")).unwrap();
    assert_eq!(old.capture_state(), Ok(CaptureState::Stopped), "{old:?}");
    assert_eq!(new.capture_state(), Ok(CaptureState::Completed), "{new:?}");
    assert_eq!(new.spec.as_ref().unwrap().max_packets, PACKETS);
    let node1 = w.captures_of(1, &uid).await;
    assert_eq!(node1.len(), 1, "{node1:?}");
    assert!(node1[0].id.ends_with("-g2"), "{node1:?}");
    w.assert_all_completed_with_pings(&status).await;
}

/// A spec edit whose generation fails (a pod it names does not exist)
/// stops the earlier generation, also on the nodes the new one names: no
/// capture goes on that nothing follows.
#[tokio::test]
async fn an_edit_that_fails_stops_the_earlier_generation() {
    let Some(w) = World::start("an_edit_that_fails_stops_the_earlier_generation", TWO_NODES).await
    else {
        return;
    };
    let pcc = w
        .create(PacketCaptureConfigSpec {
            pod_selector: pods_spec(&[&w.pods[0]]),
            ..lasting(600)
        })
        .await;
    let name = pcc.name_any();
    let uid = World::uid(&pcc);
    w.until_running_on(&name, 1, 1).await;
    let mut with_ghost = pods_spec(&[&w.pods[0]]).unwrap();
    with_ghost.pods.push(PodRef {
        pod_name: "ghost".into(),
        namespace: w.pods[0].namespace().to_string(),
    });
    let patch = json!({"spec": {"podSelector": with_ghost}});
    w.api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("editing the spec");
    let failed = w
        .until(&name, "generation 2 failed", |p| {
            p.current_phase() == Some(Phase::Failed)
        })
        .await;
    let message = failed.status.unwrap().message.unwrap_or_default();
    assert!(message.contains("ghost"), "{message}");
    // The status is written after the nodes are cleared.
    let node0 = w.captures_of(0, &uid).await;
    assert_eq!(node0.len(), 1, "{node0:?}");
    assert_eq!(
        node0[0].capture_state(),
        Ok(CaptureState::Stopped),
        "{node0:?}"
    );
}

/// A spec edit that leaves a node out stops its capture there. An agent
/// that does not answer then (stopped here with SIGSTOP) is told again once
/// it answers, rather than left capturing what the capture no longer asks
/// for until its duration ends.
#[tokio::test]
async fn a_stop_an_agent_missed_is_made_once_it_answers() {
    let Some(w) = World::start("a_stop_an_agent_missed_is_made_once_it_answers", TWO_NODES).await
    else {
        return;
    };
    let (name, uid) = capture_both_for_minutes(&w).await;
    let signal = |which: &str| {
        let sent = std::process::Command::new("kill")
            .args([which, &w.agents[1].pid().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {which}");
    };
    signal("-STOP");
    let patch = json!({"spec": {"podSelector": pods_spec(&[&w.pods[0]])}});
    w.api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("editing the spec");
    // The controller clears the earlier generation before it starts the
    // new one: node 0 running generation 2 means node 1's stop has failed.
    w.until_running_on(&name, 2, 1).await;
    signal("-CONT");
    let old = w
        .captures_of(1, &uid)
        .await
        .into_iter()
        .find(|c| c.id.ends_with("-g1"))
        .expect("node 1 keeps generation 1");
    let mut changes = w.watch_capture(1, &old.id).await;
    let ended = async {
        while let Some(c) = changes.message().await.expect("WatchCapture") {
            if c.capture_state().is_ok_and(|s| s.is_final()) {
                return c;
            }
        }
        panic!("WatchCapture of {} ended before the capture", old.id)
    };
    let ended = tokio::time::timeout(Duration::from_secs(60), ended)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "node 1 still runs generation 1 a minute after its agent answers again\n{}",
                w.controller.log()
            )
        });
    assert_eq!(
        ended.capture_state(),
        Ok(CaptureState::Stopped),
        "{ended:?}"
    );
    let done = w.until_running_on(&name, 2, 1).await;
    assert_eq!(done.status.unwrap().capture_files.len(), 1);
}

/// How soon a running capture must follow a pod that starts or stops
/// matching its selector: from the pod's address being known (or its
/// deletion) to the node's agent capturing the pods that match.
const FOLLOW_WITHIN: Duration = Duration::from_secs(2);

/// Waits until node `node`'s agent captures exactly `pods` for the
/// capture `uid`, failing unless that took at most [`FOLLOW_WITHIN`] from
/// `since`; then until the status lists them, with no bound but the
/// world's: a loaded apiserver may be slow to write and deliver it, and
/// the promise is about what is captured.
async fn until_following(
    w: &World,
    (name, uid): (&str, &str),
    node: usize,
    pods: Vec<String>,
    since: std::time::Instant,
) {
    let what = format!("pods {pods:?}");
    until_agent_captures(w, (uid, node), &what, (since, FOLLOW_WITHIN), |spec| {
        let on: Vec<String> = spec
            .pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        on == pods
    })
    .await;
    let ip = w.nodes[node].ip().to_string();
    w.until(
        name,
        &format!("node {node} capturing pods {pods:?} in the status"),
        move |p| {
            p.status.as_ref().is_some_and(|s| {
                s.capture_files
                    .get(&ip)
                    .is_some_and(|e| e.status == CaptureState::Running && e.pods == pods)
            })
        },
    )
    .await;
}

/// Waits until node `node`'s agent runs capture `uid` with only its
/// targets, and `selects` (`what`) of them, failing unless that took at
/// most `within` from `since`.
async fn until_agent_captures(
    w: &World,
    (uid, node): (&str, usize),
    what: &str,
    (since, within): (std::time::Instant, Duration),
    selects: impl Fn(&packet_capture_proto::v1::CaptureSpec) -> bool,
) {
    let deadline = since + within;
    let running =
        |c: &packet_capture_proto::v1::Capture| c.capture_state() == Ok(CaptureState::Running);
    let captured = |c: &packet_capture_proto::v1::Capture| {
        let spec = c.spec.clone().unwrap_or_default();
        running(c) && spec.only_targets && selects(&spec)
    };
    loop {
        let now = w.captures_of(node, uid).await;
        if now.iter().any(captured) {
            break;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "node {node}'s agent did not capture {what} within {within:?}: {now:?}"
        );
        match now.iter().find(|c| running(c)) {
            // A change of its targets comes as a change of its status.
            Some(c) => {
                let mut changes = w.watch_capture(node, &c.id).await;
                let _ = tokio::time::timeout(left, async {
                    while let Ok(Some(c)) = changes.message().await {
                        if captured(&c) {
                            return;
                        }
                    }
                })
                .await;
            }
            // An agent tells no one of a capture it is about to start: it
            // is asked again.
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A pod `other` in `ns` with `labels` on node 0, which the simulated CNI
/// gives `reused`, the address of the pod last removed there, pinged 4
/// times from pod 1.
async fn given_the_address(
    w: &World,
    ns: &str,
    labels: &[(&str, &str)],
    reused: std::net::Ipv4Addr,
) -> SimPod {
    let other = w.nodes[0]
        .add_labelled_pod(ns, "other", labels)
        .await
        .expect("pod other");
    assert_eq!(
        other.ip(),
        reused,
        "the simulated CNI hands the address out again"
    );
    ping_between(&w.pods[1], &other, 4).await;
    other
}

/// The ping requests to `ip` among `packets`.
fn pings_to(packets: &[world::Packet], ip: std::net::Ipv4Addr) -> usize {
    let ip = ip.to_string();
    packets
        .iter()
        .filter(|p| p.dst == ip && p.icmp_type == "8")
        .count()
}

/// Pings from `from` to `to` until `count` are answered (within 10 s: a
/// pod that got a departed pod's address is reached once the neighbours
/// have learnt its new link address).
async fn ping_between(from: &SimPod, to: &SimPod, count: u32) {
    let mut cmd = tokio::process::Command::from(from.command("ping"));
    let out = cmd
        .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-w", "10"])
        .arg(to.ip().to_string())
        .output()
        .await
        .expect("running ping");
    assert!(
        out.status.success(),
        "ping {} -> {}: {out:?}",
        from.name(),
        to.name()
    );
}

/// A capture selecting pods by labels follows them while it runs: a pod
/// that starts matching is captured on its node (a node that had no
/// capture starts one), one deleted stops being captured, and its address,
/// handed to a pod that does not match, is not captured. Every change
/// reaches the agents in place within [`FOLLOW_WITHIN`]. The pcapng files
/// name each pod's interface.
#[tokio::test]
async fn a_label_selector_follows_pods_as_they_come_and_go() {
    let Some(w) = World::start(
        "a_label_selector_follows_pods_as_they_come_and_go",
        TWO_NODES,
    )
    .await
    else {
        return;
    };
    let ns = w.namespace.name().to_string();
    let web = [("tier", "web")];
    let web_a = w.nodes[0]
        .add_labelled_pod(&ns, "web-a", &web)
        .await
        .expect("pod web-a");
    let spec = PacketCaptureConfigSpec {
        pod_selector: labelled(&ns, &web),
        output_format: OutputFormat::Pcapng,
        ..lasting(600)
    };
    let (pcc, name) = w.start_capture(spec, 1).await;
    let uid = World::uid(&pcc);
    until_following(
        &w,
        (&name, &uid),
        0,
        vec![format!("{ns}/web-a")],
        std::time::Instant::now(),
    )
    .await;
    ping_between(&w.pods[1], &web_a, 3).await;

    // Scaled up: a pod on the other node, timed from its address.
    let web_b = w.nodes[1]
        .add_labelled_pod(&ns, "web-b", &web)
        .await
        .expect("pod web-b");
    let since = std::time::Instant::now();
    until_following(&w, (&name, &uid), 1, vec![format!("{ns}/web-b")], since).await;
    ping_between(&w.pods[0], &web_b, 3).await;

    // Scaled down, and the address handed to a pod that does not match.
    let reused = web_a.ip();
    let since = std::time::Instant::now();
    drop(web_a);
    until_following(&w, (&name, &uid), 0, Vec::new(), since).await;
    let _other = given_the_address(&w, &ns, &[("tier", "db")], reused).await;

    w.delete_capture(&name, &uid).await;
    for (node, pod, ip, pings) in [(0, "web-a", reused, 3), (1, "web-b", web_b.ip(), 3)] {
        let captures = w.captures_of(node, &uid).await;
        assert_eq!(
            captures.len(),
            1,
            "one capture, retargeted in place: {captures:?}"
        );
        let file = &captures[0].output_file;
        let packets = w.packets_in(node, file).await;
        assert_eq!(
            pings_to(&packets, ip),
            pings,
            "node {node}: {pod}'s pings, and none of a pod that got its address later: {packets:?}"
        );
        let described = tshark_fields(&w.download(node, file).await, "frame.interface_description");
        let want = format!("pod {ns}/{pod} on node {}", w.nodes[node].name());
        assert!(described.contains(&want), "node {node}: {described:?}");
    }
}

/// The distinct values of one tshark field in a file.
fn tshark_fields(path: &std::path::Path, field: &str) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("tshark")
        .args(["-n", "-r"])
        .arg(path)
        .args(["-T", "fields", "-e", field])
        .output()
        .expect("running tshark");
    assert!(out.status.success(), "tshark: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs `kubectl delete <args> --ignore-not-found` on drop.
struct Deletes(&'static Cluster, Vec<Vec<String>>);

impl Drop for Deletes {
    fn drop(&mut self) {
        for args in &self.1 {
            let _ = self
                .0
                .kubectl()
                .arg("delete")
                .args(args)
                .arg("--ignore-not-found")
                .output();
        }
    }
}

/// `kubectl apply -f -` of `object`: whether it succeeded, and what it said.
async fn kubectl_apply(w: &World, object: &serde_json::Value) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::from(w.cluster.kubectl());
    let mut child = cmd
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting kubectl");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(object.to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The webhook registered as the chart registers it, but by URL on the host
/// (no Service routes here) and only for this world's objects; `ca_bundle`
/// None leaves the caBundle to the controller.
fn registration(
    w: &World,
    name: &str,
    ca_bundle: Option<Vec<u8>>,
) -> ValidatingWebhookConfiguration {
    let port = w.webhook.as_ref().expect("a world with the webhook").port;
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: "validate.packetcaptureconfigs.networking.packet.io".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            timeout_seconds: Some(10),
            client_config: WebhookClientConfig {
                url: Some(format!("https://{}:{port}/validate", w.cluster.host_ip())),
                ca_bundle: ca_bundle.map(ByteString),
                service: None,
            },
            object_selector: Some(
                serde_json::from_value(json!({"matchLabels": {WORLD_LABEL: w.id}})).unwrap(),
            ),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["networking.packet.io".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                resources: Some(vec!["packetcaptureconfigs".into()]),
                scope: Some("Cluster".into()),
            }]),
            ..Default::default()
        }]),
    }
}

/// Registers the world's webhooks under `name` as the chart does: the
/// validating [`registration`] and a mutating one like it on `/mutate`
/// (the requester annotation). They are deleted when the returned guard
/// drops.
async fn register(w: &World, name: &str, ca_bundle: Option<Vec<u8>>) -> Deletes {
    let validating = registration(w, name, ca_bundle);
    let mut mutating = serde_json::to_value(&validating).unwrap();
    mutating["kind"] = "MutatingWebhookConfiguration".into();
    let hook = &mut mutating["webhooks"][0];
    hook["name"] = "requester.packetcaptureconfigs.networking.packet.io".into();
    let url = hook["clientConfig"]["url"]
        .as_str()
        .unwrap()
        .replace("/validate", "/mutate");
    hook["clientConfig"]["url"] = url.into();
    let mutating: MutatingWebhookConfiguration = serde_json::from_value(mutating).unwrap();
    let guard = Deletes(
        w.cluster,
        [
            "validatingwebhookconfiguration",
            "mutatingwebhookconfiguration",
        ]
        .map(|kind| vec![kind.to_string(), name.to_string()])
        .into(),
    );
    Api::<MutatingWebhookConfiguration>::all(w.client.clone())
        .create(&PostParams::default(), &mutating)
        .await
        .expect("registering the mutating webhook");
    Api::<ValidatingWebhookConfiguration>::all(w.client.clone())
        .create(&PostParams::default(), &validating)
        .await
        .expect("registering the webhook");
    guard
}

/// A PacketCaptureConfig of this world, as JSON.
fn object(w: &World, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "networking.packet.io/v1",
        "kind": "PacketCaptureConfig",
        "metadata": {"name": unique_name("hook"), "labels": {WORLD_LABEL: w.id}},
        "spec": spec,
    })
}

fn bad_filter(w: &World) -> serde_json::Value {
    object(
        w,
        json!({"targetIPs": ["10.0.0.1"], "filter": "tcp port eighty"}),
    )
}

/// What the API server says when the webhook denies [`bad_filter`].
const BAD_FILTER_DENIED: &str =
    "denied the request: spec.filter: \"tcp port eighty\" is not a valid tcpdump filter";

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

/// Registers the world's webhook (its own CA, from [`Certs::Dir`]) and
/// waits until the API server calls it.
async fn webhook_registered(w: &World) -> Deletes {
    let name = format!("packet-capture-webhook-{}", w.id);
    let ca = w.webhook.as_ref().and_then(|h| h.ca.clone());
    let registered = register(w, &name, ca).await;
    until_the_webhook_denies(w).await;
    registered
}

/// Waits until the API server calls the world's webhook and it denies a
/// bad filter, naming the field. The API server picks a registration or a
/// new caBundle up from its informer, and the webhook may still wait for
/// its certificate; neither sends an event, so dry runs until then.
async fn until_the_webhook_denies(w: &World) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let typed: PacketCaptureConfig = serde_json::from_value(bad_filter(w)).unwrap();
    loop {
        match w.api().create(&dry_run(), &typed).await {
            Err(kube::Error::Api(s)) if s.message.contains(BAD_FILTER_DENIED) => return,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the webhook does not deny a bad filter: {other:?}\n{}",
                w.controller.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_webhook_rejects_bad_specs_naming_the_field() {
    let setup = Setup {
        nodes: 1,
        webhook: Certs::Dir,
        ..TWO_NODES
    };
    let Some(w) = World::start("the_webhook_rejects_bad_specs_naming_the_field", setup).await
    else {
        return;
    };
    let mut cleanup = webhook_registered(&w).await;

    let (ok, said) = kubectl_apply(&w, &bad_filter(&w)).await;
    assert!(!ok && said.contains(BAD_FILTER_DENIED), "{said}");

    let missing = format!("{}-gone", w.namespace.name());
    let (ok, said) = kubectl_apply(
        &w,
        &object(
            &w,
            json!({"podSelector": {"pods": [{"podName": "web", "namespace": missing}]}}),
        ),
    )
    .await;
    let expected =
        format!("spec.podSelector.pods[0].namespace: namespace \"{missing}\" does not exist");
    assert!(!ok && said.contains(&expected), "{said}");

    let good = object(
        &w,
        json!({"targetIPs": ["10.0.0.1"], "filter": "tcp port 80"}),
    );
    let (ok, said) = kubectl_apply(&w, &good).await;
    assert!(ok, "{said}");

    // Who may capture what: a user who may create captures (editor)
    // captures a pod only with "capture" on pods in its namespace, and a
    // node's address or a wide range only with it in every namespace.
    let ns = w.namespace.name();
    let Creator {
        api: as_creator,
        user,
        subject,
    } = creator(&w, &mut cleanup).await;
    let cluster_capturer = format!("packet-capture-capturer-{}", w.id);
    cleanup
        .1
        .push(vec!["clusterrolebinding".into(), cluster_capturer.clone()]);
    let pod = &w.pods[0];
    let spec_of = |targets: serde_json::Value| {
        let mut c: PacketCaptureConfig = serde_json::from_value(object(&w, targets)).unwrap();
        c.spec.duration = 5;
        c
    };
    let of_pod =
        spec_of(json!({"podSelector": {"pods": [{"podName": pod.name(), "namespace": ns}]}}));
    let of_pod_ip = spec_of(json!({"targetIPs": [pod.ip().to_string()]}));
    let node_ip = w.nodes[0].ip().to_string();
    let of_node = spec_of(json!({"targetIPs": [node_ip]}));
    let of_all = spec_of(json!({"targetIPs": ["0.0.0.0/0"]}));
    let pod_refused = format!(
        "spec.podSelector.pods[0]: pod {ns}/{}: user \"{user}\" may not \"capture\" pods in namespace \"{ns}\"",
        pod.name()
    );
    let everywhere = format!(
        "so capturing it needs \"capture\" on pods in every namespace, which user \"{user}\" does not have"
    );
    let node_refused = format!(
        "spec.targetIPs[0]: {node_ip} covers {node_ip}, an address of node {}, {everywhere}",
        w.nodes[0].name()
    );
    let all_refused = "spec.targetIPs[0]: 0.0.0.0/0 covers ";
    let refused = |capture: &PacketCaptureConfig, expected: &str| {
        let (as_creator, capture, expected) =
            (as_creator.clone(), capture.clone(), expected.to_owned());
        async move {
            match as_creator.create(&dry_run(), &capture).await {
                Err(kube::Error::Api(s)) => {
                    assert!(s.message.contains(&expected), "{expected}\n{s:?}")
                }
                other => panic!("{:?} allowed: {other:?}", capture.spec),
            }
        }
    };
    refused(&of_pod, &pod_refused).await;
    refused(
        &of_pod_ip,
        &pod_refused.replace(
            &format!("spec.podSelector.pods[0]: pod {ns}/{}", pod.name()),
            &format!(
                "spec.targetIPs[0]: {} is the address of pod {ns}/{}",
                pod.ip(),
                pod.name()
            ),
        ),
    )
    .await;
    // Seeing pods is not capturing them.
    w.cluster
        .kubectl_async(&[
            "create",
            "rolebinding",
            "creator-views",
            "-n",
            ns,
            "--clusterrole=view",
            &subject,
        ])
        .await
        .expect("letting the creator view the namespace");
    captures_in_its_namespace(&w, &subject).await;
    until_admitted(
        &as_creator,
        &of_pod,
        "capture in its namespace still refused",
    )
    .await;
    as_creator
        .create(&dry_run(), &of_pod_ip)
        .await
        .expect("the creator may capture its pod's address");
    refused(&of_node, &node_refused).await;
    refused(&of_all, all_refused).await;
    refused(&of_all, &everywhere).await;

    // Created for real: the capture records its requester (whatever the
    // creator wrote there), an Event says who was allowed what; an update
    // that widens the targets is checked again.
    let mut forged = of_pod.clone();
    forged.spec.duration = 600;
    forged
        .annotations_mut()
        .insert(REQUESTED_BY.into(), "someone-else".into());
    let created = as_creator
        .create(&PostParams::default(), &forged)
        .await
        .expect("the creator's capture of its pod");
    assert_eq!(created.annotations().get(REQUESTED_BY), Some(&user));
    let uid = World::uid(&created);
    let events: Api<Event> = Api::all(w.client.clone());
    let authorized = until_event(&events, &uid, "TargetsAuthorized").await;
    assert_eq!(
        authorized.message.as_deref(),
        Some(
            format!(
                "user \"{user}\" may capture pods in namespace \"{ns}\", which covers every target"
            )
            .as_str()
        ),
    );
    let widen = json!({"spec": {"targetIPs": ["0.0.0.0/0"], "podSelector": null}});
    match as_creator
        .patch(
            &created.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&widen),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert!(s.message.contains(all_refused), "{s:?}"),
        other => panic!("widened to every address: {other:?}"),
    }
    // An edit of the requester by someone else is undone.
    let relabel = json!({"metadata": {"annotations": {REQUESTED_BY: "someone-else"}}});
    let relabelled = w
        .api()
        .patch(
            &created.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&relabel),
        )
        .await
        .expect("an admin's edit of the annotations");
    assert_eq!(relabelled.annotations().get(REQUESTED_BY), Some(&user));

    // At most MAX_PER_REQUESTER captures that have not ended per requester:
    // one more is refused, naming them and the key, until one is gone.
    let mut others = Vec::new();
    for _ in 1..MAX_PER_REQUESTER {
        let mut other = of_pod.clone();
        other.metadata.name = Some(unique_name("hook"));
        other.spec.duration = 600;
        let other = as_creator
            .create(&PostParams::default(), &other)
            .await
            .expect("a capture within the creator's limit");
        others.push(other.name_any());
    }
    let mut one_more = of_pod.clone();
    one_more.metadata.name = Some(unique_name("hook"));
    let over =
        format!("user \"{user}\" already has {MAX_PER_REQUESTER} captures that have not ended");
    match as_creator.create(&PostParams::default(), &one_more).await {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains(&over), "{s:?}");
            assert!(s.message.contains(&created.name_any()), "{s:?}");
            let key = format!("(MAX_CAPTURES_PER_REQUESTER={MAX_PER_REQUESTER})");
            assert!(s.message.contains(&key), "{s:?}");
        }
        other => panic!("one capture over the limit created: {other:?}"),
    }
    // Someone else's captures do not count against the creator's.
    let (ok, said) = kubectl_apply(&w, &object(&w, json!({"targetIPs": ["10.0.0.2"]}))).await;
    assert!(ok, "{said}");
    as_creator
        .delete(&created.name_any(), &Default::default())
        .await
        .expect("the creator deletes its capture");
    as_creator
        .create(&dry_run(), &one_more)
        .await
        .expect("one more once a capture is gone");
    for name in others {
        as_creator
            .delete(&name, &Default::default())
            .await
            .expect("the creator deletes its captures");
    }

    w.cluster
        .kubectl_async(&[
            "create",
            "clusterrolebinding",
            &cluster_capturer,
            "--clusterrole=packet-capture-capturer",
            &subject,
        ])
        .await
        .expect("letting the creator capture everywhere");
    until_admitted(&as_creator, &of_all, "capture of 0.0.0.0/0 still refused").await;
    as_creator
        .create(&dry_run(), &of_node)
        .await
        .expect("the creator may capture a node's address");
    drop(cleanup);
}

/// A user who may create captures (packet-capture-editor) and, until
/// given more, capture nothing: the service account `creator` of the
/// world's namespace.
struct Creator {
    /// Captures as the creator.
    api: Api<PacketCaptureConfig>,
    user: String,
    /// `--serviceaccount=NS:creator`, for kubectl's bindings.
    subject: String,
}

/// Makes the world's [`Creator`]; its bindings go with `cleanup`.
async fn creator(w: &World, cleanup: &mut Deletes) -> Creator {
    let ns = w.namespace.name();
    let token = w
        .cluster
        .token_for(ns, "creator", &[])
        .await
        .expect("a token for the creator");
    let subject = format!("--serviceaccount={ns}:creator");
    let editor = format!("packet-capture-editor-{}", w.id);
    cleanup
        .1
        .push(vec!["clusterrolebinding".into(), editor.clone()]);
    w.cluster
        .kubectl_async(&[
            "create",
            "clusterrolebinding",
            &editor,
            "--clusterrole=packet-capture-editor",
            &subject,
        ])
        .await
        .expect("binding the editor role");
    let mut config = w.cluster.config();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Creator {
        api: Api::all(kube::Client::try_from(config).expect("a client for the creator")),
        user: format!("system:serviceaccount:{ns}:creator"),
        subject,
    }
}

/// Lets `subject` capture pods in the world's namespace.
async fn captures_in_its_namespace(w: &World, subject: &str) {
    w.cluster
        .kubectl_async(&[
            "create",
            "rolebinding",
            "creator-captures",
            "-n",
            w.namespace.name(),
            "--clusterrole=packet-capture-capturer",
            subject,
        ])
        .await
        .expect("letting the creator capture in the namespace");
}

/// A capture by a creator allowed to capture only in the world's
/// namespace, of the targets `spec` gives for pods there on node 0 (`web`,
/// then the `others`), admitted, recorded as allowed in that namespace
/// alone, and running on node 0.
struct InOneNamespace {
    /// The bindings; dropped first, before the world.
    cleanup: Deletes,
    ns: String,
    web: SimPod,
    others: Vec<SimPod>,
    name: String,
    uid: String,
}

async fn captured_in_one_namespace(
    test: &str,
    others: &[&str],
    spec: impl FnOnce(&str, &SimPod) -> serde_json::Value,
) -> Option<(InOneNamespace, World)> {
    let setup = Setup {
        webhook: Certs::Dir,
        ..TWO_NODES
    };
    let w = World::start(test, setup).await?;
    let mut cleanup = webhook_registered(&w).await;
    let ns = w.namespace.name().to_string();
    let creator = creator(&w, &mut cleanup).await;
    captures_in_its_namespace(&w, &creator.subject).await;
    let web = w.nodes[0].add_pod(&ns, "web").await.expect("pod web");
    let mut added = Vec::new();
    for other in others {
        added.push(w.nodes[0].add_pod(&ns, other).await.expect("another pod"));
    }
    let mut capture: PacketCaptureConfig =
        serde_json::from_value(object(&w, spec(&ns, &web))).unwrap();
    capture.spec.duration = 600;
    until_admitted(
        &creator.api,
        &capture,
        "capture in its namespace still refused",
    )
    .await;
    let created = creator
        .api
        .create(&PostParams::default(), &capture)
        .await
        .expect("the creator's capture in its namespace");
    assert_eq!(created.annotations().get(AUTHORIZED_IN), Some(&ns));
    let (name, uid) = (created.name_any(), World::uid(&created));
    w.until_running_on(&name, 1, 1).await;
    let one = InOneNamespace {
        cleanup,
        ns,
        web,
        others: added,
        name,
        uid,
    };
    Some((one, w))
}

/// Deletes `pod`, then waits until node 0's agent captures only the
/// addresses `left` for the capture `uid`: within a generous bound, since
/// what matters is that the address has gone before the next pod can get
/// it.
async fn until_gone(w: &World, pod: SimPod, uid: &str, left: &[String]) {
    let since = std::time::Instant::now();
    drop(pod);
    let within = Duration::from_secs(30);
    let what = format!("only {left:?}");
    let mut left = left.to_vec();
    left.sort();
    until_agent_captures(w, (uid, 0), &what, (since, within), |spec| {
        let mut now = spec.target_ips.clone();
        now.sort();
        now == left
    })
    .await;
}

/// Someone allowed to capture only in one namespace captures a pod's
/// address there while a pod there holds it: once the pod is gone its
/// address is left out (the mutating webhook recorded where the creator
/// may capture), and the pod of another namespace the cluster gives it to
/// next is not captured.
#[tokio::test]
async fn a_pod_address_given_to_another_namespace_is_not_captured() {
    let Some((one, w)) = captured_in_one_namespace(
        "a_pod_address_given_to_another_namespace_is_not_captured",
        &[],
        |_, web| json!({"targetIPs": [web.ip().to_string()]}),
    )
    .await
    else {
        return;
    };
    let reused = one.web.ip();
    ping_between(&w.pods[1], &one.web, 3).await;
    until_gone(&w, one.web, &one.uid, &[]).await;
    let elsewhere = w.cluster.namespace("e2e").await.expect("another namespace");
    let _other = given_the_address(&w, elsewhere.name(), &[], reused).await;

    w.delete_capture(&one.name, &one.uid).await;
    let captures = w.captures_of(0, &one.uid).await;
    assert_eq!(captures.len(), 1, "one capture: {captures:?}");
    let packets = w.packets_in(0, &captures[0].output_file).await;
    assert_eq!(
        pings_to(&packets, reused),
        3,
        "web's pings, and none of the pod of another namespace that got its address: {packets:?}"
    );
    drop(one.cleanup);
}

/// Someone allowed to capture only in one namespace names two pods there;
/// one is recreated on its node's network while the capture runs. Its
/// address is then the node's, which capturing needs every namespace for
/// (the webhook's rule at admission): it is left out, and once the other
/// pod is gone too, the node's agent captures no address at all (not its
/// node's).
#[tokio::test]
async fn a_named_pod_recreated_on_the_host_network_is_left_out() {
    let Some((mut one, w)) = captured_in_one_namespace(
        "a_named_pod_recreated_on_the_host_network_is_left_out",
        &["db"],
        |ns, _| {
            let pods = ["web", "db"].map(|pod| json!({"podName": pod, "namespace": ns}));
            json!({"podSelector": {"pods": pods}})
        },
    )
    .await
    else {
        return;
    };
    let db = one.others.remove(0);
    let db_addresses = vec![db.ip().to_string(), db.ipv6().to_string()];
    until_gone(&w, one.web, &one.uid, &db_addresses).await;
    let node = &w.nodes[0];
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &one.ns);
    let on_host: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": one.ns},
        "spec": {
            "nodeName": node.name(),
            "hostNetwork": true,
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &on_host)
        .await
        .expect("web again, on the host network");
    let address = node.ip().to_string();
    let running = json!({"status": {
        "phase": "Running",
        "hostIP": address,
        "podIP": address,
        "podIPs": [{"ip": address}],
    }});
    pods.patch_status("web", &PatchParams::default(), &Patch::Merge(&running))
        .await
        .expect("web running with its node's address");

    // The controller sees the pods in the order they changed: by the time
    // db's departure reaches the agent, web on the host network has been
    // resolved too.
    until_gone(&w, db, &one.uid, &[]).await;
    let left_out = format!(
        "pod {}/web\", reason: \"is on the host network of node {} now",
        one.ns,
        node.name()
    );
    assert!(
        w.controller.log().contains(&left_out),
        "{}",
        w.controller.log()
    );

    w.delete_capture(&one.name, &one.uid).await;
    pods.delete("web", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("web deleted");
    drop(one.cleanup);
}

/// Dry runs of `capture` until the API server admits it: a new binding
/// takes a moment to reach the authorizer, and says nothing when it has.
async fn until_admitted(api: &Api<PacketCaptureConfig>, capture: &PacketCaptureConfig, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = api.create(&dry_run(), capture).await {
        assert!(std::time::Instant::now() < deadline, "{what}: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Event with `reason` about the object `uid`, once there (watched).
async fn until_event(events: &Api<Event>, uid: &str, reason: &str) -> Event {
    use futures::TryStreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    let config =
        kube::runtime::watcher::Config::default().fields(&format!("involvedObject.uid={uid}"));
    let mut matching = std::pin::pin!(
        kube::runtime::watcher(events.clone(), config)
            .applied_objects()
            .try_filter(|e| futures::future::ready(e.reason.as_deref() == Some(reason)))
    );
    let found = matching.try_next();
    match tokio::time::timeout(Duration::from_secs(30), found).await {
        Ok(Ok(Some(event))) => event,
        other => panic!("no {reason} Event for {uid}: {other:?}"),
    }
}

/// A Secret's key as text.
fn secret_text(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("no {key} in {:?}", secret.metadata.name));
    String::from_utf8(bytes.0.clone()).expect("PEM is text")
}

/// Waits (on watch events) until the caBundle of [`WEBHOOK_CONFIGURATION`]
/// satisfies `cond`; returns it.
async fn until_ca_bundle(
    w: &World,
    what: &str,
    cond: impl Fn(&str) -> bool + Send + 'static,
) -> String {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(w.client.clone());
    let bundle_of = |c: &ValidatingWebhookConfiguration| {
        let hook = c.webhooks.as_ref()?.first()?;
        let bytes = hook.client_config.ca_bundle.as_ref()?;
        String::from_utf8(bytes.0.clone()).ok()
    };
    let wait = await_condition(
        api,
        WEBHOOK_CONFIGURATION,
        move |c: Option<&ValidatingWebhookConfiguration>| {
            c.and_then(bundle_of).is_some_and(|b| cond(&b))
        },
    );
    match tokio::time::timeout(Duration::from_secs(60), wait).await {
        Ok(Ok(Some(c))) => bundle_of(&c).expect("a caBundle"),
        other => panic!("no caBundle {what}: {other:?}\n{}", w.controller.log()),
    }
}

/// The certificate the world's webhook presents to a client that trusts
/// only `roots` (PEM) and checks the host address against its names.
async fn presented_certificate(w: &World, roots: &str) -> Result<Vec<u8>, String> {
    let mut store = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(roots.as_bytes()) {
        store
            .add(der.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(store)
    .with_no_client_auth();
    let host = IpAddr::V4(w.cluster.host_ip());
    let port = w.webhook.as_ref().expect("a world with the webhook").port;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(host.into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap_or_default();
    presented
        .first()
        .map(|c| c.to_vec())
        .ok_or_else(|| "no certificate presented".into())
}

#[tokio::test]
async fn self_managed_certificates_are_issued_trusted_renewed_and_kept_trusted() {
    let setup = Setup {
        nodes: 0,
        webhook: Certs::SelfManaged,
        ..TWO_NODES
    };
    let Some(mut w) = World::start(
        "self_managed_certificates_are_issued_trusted_renewed_and_kept_trusted",
        setup,
    )
    .await
    else {
        return;
    };
    // The configuration as the chart installs it in this mode: no caBundle.
    let _registered = register(&w, WEBHOOK_CONFIGURATION, None).await;
    let bundle = until_ca_bundle(&w, "filled in", |b| !b.is_empty()).await;

    // The CA and the certificate it issued, in the chart's Secrets.
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), COMPONENT_NAMESPACE);
    let ca = secrets.get(CA_SECRET).await.expect("the CA's Secret");
    assert!(pki::inspect(&secret_text(&ca, "tls.crt")).unwrap().is_ca);
    assert_eq!(bundle, secret_text(&ca, "ca.crt"), "the bundle is the CA's");
    // Issued once the API server trusts its CA.
    let issued = await_condition(secrets.clone(), CERT_SECRET, |s: Option<&Secret>| {
        s.is_some()
    });
    let cert = tokio::time::timeout(Duration::from_secs(30), issued)
        .await
        .expect("the certificate's Secret within 30 s")
        .expect("watching the certificate's Secret")
        .expect("the certificate's Secret");
    // The mutating webhook's configuration trusts the same CA.
    let mutating = Api::<MutatingWebhookConfiguration>::all(w.client.clone())
        .get(WEBHOOK_CONFIGURATION)
        .await
        .expect("the MutatingWebhookConfiguration");
    let hooks = mutating.webhooks.unwrap_or_default();
    let mutating_bundle = hooks[0]
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.clone());
    assert_eq!(mutating_bundle, Some(bundle.clone().into_bytes()));
    let mut names = pki::service_names("packet-capture-webhook", COMPONENT_NAMESPACE);
    names.push(pki::Name::Ip(IpAddr::V4(w.cluster.host_ip())));
    names.sort();
    assert_eq!(
        pki::inspect(&secret_text(&cert, "tls.crt")).unwrap().names,
        names
    );
    let pair = issuer::keyed_cert(&cert).expect("tls.crt and tls.key");
    let now = SystemTime::now();
    assert!(
        matches!(
            pki::leaf_due(Some(&pair), &bundle, &names, now, DAY),
            pki::Due::At(_)
        ),
        "the certificate is not signed by the bundle's CA"
    );

    // The API server trusts it and calls the webhook.
    until_the_webhook_denies(&w).await;
    let (ok, said) = kubectl_apply(&w, &bad_filter(&w)).await;
    assert!(!ok && said.contains(BAD_FILTER_DENIED), "{said}");

    // A caBundle something resets is filled in again.
    let stranger = pki::new_ca("someone-else", now, DAY).unwrap();
    let reset = json!({"webhooks": [{
        "name": "validate.packetcaptureconfigs.networking.packet.io",
        "clientConfig": {"caBundle": ByteString(stranger.cert.into_bytes())},
    }]});
    Api::<ValidatingWebhookConfiguration>::all(w.client.clone())
        .patch(
            WEBHOOK_CONFIGURATION,
            &PatchParams::default(),
            &Patch::Strategic(reset),
        )
        .await
        .expect("resetting the caBundle");
    let want = bundle.clone();
    let refilled = until_ca_bundle(&w, "filled in again", move |b| b == want).await;
    assert_eq!(refilled, bundle);

    // A certificate close to its end (here: one day left, as if issued
    // 364 days ago) is renewed, and the webhook presents the new one.
    let authority = issuer::keyed_cert(&ca).expect("the CA's tls.crt and tls.key");
    let old = pki::issue(&authority, &names, now - 364 * DAY, 365 * DAY).unwrap();
    let old_data = json!({"data": {
        "tls.crt": ByteString(old.cert.clone().into_bytes()),
        "tls.key": ByteString(old.key.clone().into_bytes()),
    }});
    secrets
        .patch(
            CERT_SECRET,
            &PatchParams::default(),
            &Patch::Merge(old_data),
        )
        .await
        .expect("putting an old certificate in place");
    let renewed = await_condition(secrets.clone(), CERT_SECRET, move |s: Option<&Secret>| {
        s.and_then(|s| pki::inspect(&secret_text(s, "tls.crt")).ok())
            .is_some_and(|i| i.not_after > now + 300 * DAY)
    });
    let renewed = match tokio::time::timeout(Duration::from_secs(60), renewed).await {
        Ok(Ok(Some(s))) => secret_text(&s, "tls.crt"),
        other => panic!("not renewed: {other:?}\n{}", w.controller.log()),
    };
    let want = CertificateDer::from_pem_slice(renewed.as_bytes())
        .unwrap()
        .to_vec();
    // Another process presents it: no event to wait for, so handshakes
    // until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let presented = presented_certificate(&w, &bundle).await;
        if presented.as_ref() == Ok(&want) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate is not presented: {presented:?}\n{}",
            w.controller.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_the_webhook_denies(&w).await;
    w.controller.assert_running();
    // Its watches of the Secrets and the configuration, which the RBAC
    // allows by name only, never failed.
    let log = w.controller.log();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("watching ")).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[tokio::test]
async fn without_its_certificate_the_controller_runs_and_serves_once_it_appears() {
    let setup = Setup {
        nodes: 2,
        webhook: Certs::CertManager,
        ..TWO_NODES
    };
    let Some(mut w) = World::start(
        "without_its_certificate_the_controller_runs_and_serves_once_it_appears",
        setup,
    )
    .await
    else {
        return;
    };
    // It says what it waits for, in /readyz (ready: the pod stays in its
    // Service and rollouts go on) and in its log.
    let waiting = format!("there is no Secret {COMPONENT_NAMESPACE}/{CERT_SECRET}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let readyz = loop {
        let readyz = w.readyz().await;
        if readyz.contains(&waiting) {
            break readyz;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz does not say what the webhook waits for: {readyz}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        readyz.starts_with("HTTP/1.0 200") || readyz.starts_with("HTTP/1.1 200"),
        "{readyz}"
    );
    assert!(readyz.contains("webhook: not serving yet"), "{readyz}");
    assert!(
        w.controller.log().contains(&waiting),
        "{}",
        w.controller.log()
    );

    // And it reconciles meanwhile: a capture runs to its end.
    let spec = PacketCaptureConfigSpec {
        pod_selector: pods_spec(&[&w.pods[0], &w.pods[1]]),
        ..counted()
    };
    let (_, name) = w.start_capture(spec, 2).await;
    let pinging = w.pinging(0, 1);
    let done = w.until_phase(&name, Phase::Completed).await;
    drop(pinging);
    w.assert_all_completed_with_pings(done.status.as_ref().unwrap())
        .await;
    w.controller.assert_running();

    // cert-manager writes the Secret (here a certificate for the host
    // address from the cluster's CA): the webhook serves from then on.
    let dir = w.cluster.dir().join("e2e").join(&w.id).join("issued");
    let ca = w
        .cluster
        .serving_certificate(&dir, &[IpAddr::V4(w.cluster.host_ip())], &[])
        .expect("a serving certificate");
    let read = |f: &str| ByteString(std::fs::read(dir.join(f)).expect("the issued files"));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CERT_SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".into(), read("tls.crt")),
                ("tls.key".into(), read("tls.key")),
            ]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(w.client.clone(), COMPONENT_NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .expect("writing the Secret as cert-manager would");
    let registration_name = format!("packet-capture-webhook-{}", w.id);
    let _registered = register(&w, &registration_name, Some(ca)).await;
    until_the_webhook_denies(&w).await;
    let serving = format!(
        "webhook: serving, with the certificate from Secret {COMPONENT_NAMESPACE}/{CERT_SECRET}"
    );
    let readyz = w.readyz().await;
    assert!(readyz.contains(&serving), "{readyz}");
}

#[tokio::test]
async fn replicas_issuing_at_once_agree_on_one_ca_and_one_certificate() {
    let test = "replicas_issuing_at_once_agree_on_one_ca_and_one_certificate";
    let Some(cluster) = Cluster::for_test(test).await else {
        return;
    };
    // Fresh Secrets in a namespace of the test's own, as several replicas
    // starting together find them; an admin client (the RBAC is the other
    // scenarios' business).
    let namespace = cluster.namespace("issuer").await.expect("a namespace");
    let client = cluster.client().expect("an admin client");
    let ca_secret = unique_name("ca");
    let cert_secret = unique_name("tls");
    let names = pki::service_names("packet-capture-webhook", namespace.name());
    let replica = || async {
        let issuer = issuer::Issuer::new(
            client.clone(),
            namespace.name(),
            &ca_secret,
            pki::Lifetimes::default(),
        );
        let now = SystemTime::now();
        let (authority, ca) = issuer.authority(now).await.expect("the CA");
        let cert = issuer
            .certificate(&authority, &cert_secret, &names, now)
            .await
            .expect("the certificate");
        (authority, ca.written.is_some(), cert.written.is_some())
    };
    let results = futures::future::join_all((0..4).map(|_| replica())).await;
    let first = &results[0].0;
    assert!(
        results.iter().all(|(a, _, _)| a == first),
        "the replicas ended with different CAs"
    );
    let wrote = |pick: fn(&(pki::Authority, bool, bool)) -> bool| {
        results.iter().filter(|r| pick(r)).count()
    };
    assert_eq!(wrote(|r| r.1), 1, "one replica creates the CA");
    assert_eq!(wrote(|r| r.2), 1, "one replica issues the certificate");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace.name());
    let stored = secrets
        .get(&cert_secret)
        .await
        .expect("the certificate's Secret");
    let pair = issuer::keyed_cert(&stored).expect("tls.crt and tls.key");
    assert!(matches!(
        pki::leaf_due(Some(&pair), &first.bundle, &names, SystemTime::now(), DAY),
        pki::Due::At(_)
    ));
}
