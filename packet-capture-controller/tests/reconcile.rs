//! Reconcile against a mock API server (every request checked in order) and
//! real gRPC agents served in-process: finalizer, status by server-side
//! apply, events, the results ConfigMap, retries, WatchCapture-driven
//! progress, restarts, spec changes and deletion.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use packet_capture_common::crd::{
    CaptureState, OutputFormat, PacketCaptureConfig, PacketCaptureConfigSpec,
    PacketCaptureConfigStatus, STDOUT_OUTPUT_FILE, STOP_REQUESTED, TargetDirection, stop_value,
};
use packet_capture_controller::controller::reconcile;
use packet_capture_controller::status::COMPLETED_MESSAGE;
use serde_json::Value;
use support::apiserver::Seen;
use support::*;

/// Runs one reconcile while the test answers its API requests.
fn spawn_reconcile(fx: &Fixture, pcc: &PacketCaptureConfig) -> tokio::task::JoinHandle<Action> {
    let (pcc, ctx) = (Arc::new(pcc.clone()), fx.ctx.clone());
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), reconcile(pcc, ctx))
            .await
            .expect("reconcile did not finish (an unanswered request?)")
            .expect("reconcile failed")
    })
}

fn json(pcc: &PacketCaptureConfig) -> Value {
    serde_json::to_value(pcc).unwrap()
}

/// The status the controller applied, and the object with it.
fn applied(
    pcc: &PacketCaptureConfig,
    seen: &Seen,
) -> (PacketCaptureConfigStatus, PacketCaptureConfig) {
    let status: PacketCaptureConfigStatus =
        serde_json::from_value(seen.body["status"].clone()).unwrap();
    assert_eq!(seen.body["apiVersion"], "networking.packet.io/v1");
    assert_eq!(seen.body["kind"], "PacketCaptureConfig");
    let mut next = pcc.clone();
    next.status = Some(status.clone());
    (status, next)
}

/// One reconcile that publishes `events` (in order), then applies the
/// status: the events, the status and the object with it. A generation's
/// first reconcile applies a Starting status before it calls the agents.
async fn reconcile_seen(
    fx: &mut Fixture,
    pcc: &PacketCaptureConfig,
    events: &[&str],
) -> (Vec<Seen>, PacketCaptureConfigStatus, PacketCaptureConfig) {
    let task = spawn_reconcile(fx, pcc);
    let observed = pcc.status.as_ref().and_then(|s| s.observed_generation);
    if observed != pcc.metadata.generation {
        let name = pcc.metadata.name.clone().unwrap();
        let seen = fx.api.status_apply(&name, &json(pcc)).await;
        let (starting, _) = applied(pcc, &seen);
        assert_eq!(
            starting.phase,
            Some(packet_capture_common::crd::Phase::Starting)
        );
        assert_eq!(starting.observed_generation, pcc.metadata.generation);
        assert_eq!(starting.start_time, None);
        assert!(
            !starting.capture_files.is_empty()
                && starting
                    .capture_files
                    .values()
                    .all(|e| e.status == CaptureState::Starting),
            "{starting:?}"
        );
    }
    let mut seen_events = Vec::new();
    for reason in events {
        seen_events.push(fx.api.event(reason).await);
    }
    let seen = fx
        .api
        .status_apply(&pcc.metadata.name.clone().unwrap(), &json(pcc))
        .await;
    task.await.unwrap();
    let (status, next) = applied(pcc, &seen);
    (seen_events, status, next)
}

/// Drives a fresh capture to Running: the node Started events (in node
/// order), then the status.
async fn start(
    fx: &mut Fixture,
    pcc: &PacketCaptureConfig,
    events: &[&str],
) -> (PacketCaptureConfigStatus, PacketCaptureConfig) {
    let (_, status, next) = reconcile_seen(fx, pcc, events).await;
    (status, next)
}

/// Reconciles an ended capture: ConfigMap, final event, status.
async fn finish(
    fx: &mut Fixture,
    pcc: &PacketCaptureConfig,
    events: &[&str],
) -> (PacketCaptureConfigStatus, Value) {
    let name = pcc.metadata.name.clone().unwrap();
    let task = spawn_reconcile(fx, pcc);
    // Node events come before the results, the final event after them.
    let (before, last) = events.split_at(events.len() - 1);
    for reason in before {
        fx.api.event(reason).await;
    }
    let cm = fx
        .api
        .answer(
            "PATCH",
            &format!("/api/v1/namespaces/{NS}/configmaps/packet-capture-results-{name}"),
            200,
            |seen| seen.body.clone(),
        )
        .await;
    support::apiserver::assert_applied_by_controller(&cm);
    fx.api.event(last[0]).await;
    let seen = fx.api.status_apply(&name, &json(pcc)).await;
    assert_eq!(task.await.unwrap(), Action::await_change());
    (applied(pcc, &seen).0, cm.body)
}

#[tokio::test]
async fn the_finalizer_is_added_first() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let mut pcc = pcc("fin", ip_spec(&["10.0.0.1"]));
    pcc.metadata.finalizers = None;
    let task = spawn_reconcile(&fx, &pcc);
    let seen = fx.api.finalizer_patch("fin", &json(&pcc)).await;
    assert_eq!(seen.body[1]["op"], "add");
    assert_eq!(seen.body[1]["path"], "/metadata/finalizers");
    assert_eq!(
        seen.body[1]["value"][0],
        "networking.packet.io/stop-captures"
    );
    assert_eq!(task.await.unwrap(), Action::await_change());
    assert!(
        fx.agent("n1").calls().is_empty(),
        "nothing starts before the finalizer"
    );
}

#[tokio::test]
async fn ip_capture_runs_on_every_agent_node_and_completes_when_all_are_done() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc("ips", ip_spec(&["10.0.0.1", "10.9.0.0/16"]));
    let (status, pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Running)
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.nodes, Some(2));
    assert_eq!(status.conditions[0].type_, "Ready");
    assert_eq!(status.conditions[0].status, "False");
    assert!(status.start_time.is_some());
    let keys: Vec<&String> = status.capture_files.keys().collect();
    assert_eq!(keys, ["127.0.0.2", "127.0.0.3"]);
    assert_eq!(status.capture_files["127.0.0.2"].node, "n1");
    assert_eq!(
        status.capture_files["127.0.0.2"].status,
        CaptureState::Running
    );

    let (req1, cap1) = fx.agent("n1").only_capture();
    let (req2, cap2) = fx.agent("n2").only_capture();
    assert_eq!(cap1.id, "uid-ips-g1");
    assert_eq!(cap1.id, cap2.id, "one id per generation");
    assert_eq!(req1.name, "ips");
    let spec = req1.spec.unwrap();
    assert_eq!(spec.target_ips, ["10.0.0.1", "10.9.0.0/16"]);
    assert_eq!((spec.duration_seconds, spec.max_packets), (60, 1000));
    assert_eq!(req2.spec.unwrap().target_ips, ["10.0.0.1", "10.9.0.0/16"]);

    // One node done: still Running.
    fx.agent("n1").complete(&cap1.id, 5);
    let uid = "uid-ips".to_string();
    while !fx.ctx.tracker.nodes(&uid, 1)["n1"].state.is_final() {
        futures::StreamExt::next(&mut fx.triggers).await;
    }
    let (status, pcc) = start(&mut fx, &pcc, &[]).await;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Running)
    );
    assert_eq!(
        status.capture_files["127.0.0.2"].status,
        CaptureState::Completed
    );
    assert_eq!(status.capture_files["127.0.0.2"].packets, 5);

    fx.agent("n2").complete(&cap2.id, 7);
    fx.until_nodes_end(&pcc).await;
    let (status, cm) = finish(&mut fx, &pcc, &["Completed"]).await;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Completed)
    );
    assert_eq!(status.message.as_deref(), Some(COMPLETED_MESSAGE));
    assert_eq!((status.packets, status.dropped), (Some(12), Some(0)));
    assert!(status.completion_time.is_some());
    assert_eq!(status.conditions[0].status, "True");
    let n2 = &status.capture_files["127.0.0.3"];
    assert_eq!(
        n2.output_file,
        "/var/lib/packet-captures/ips-20240101-000000.pcap"
    );
    assert_eq!(n2.file_size, 24 + 700);

    assert_eq!(cm["metadata"]["namespace"], NS);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "uid-ips");
    assert_eq!(
        cm["metadata"]["ownerReferences"][0]["kind"],
        "PacketCaptureConfig"
    );
    assert_eq!(cm["data"]["packets"], "12");
    assert_eq!(cm["data"]["phase"], "Completed");
    assert!(
        cm["data"]["files"]
            .as_str()
            .unwrap()
            .contains("127.0.0.3 n2 completed 7 0 724")
    );
    assert!(
        cm["data"]["spec.json"]
            .as_str()
            .unwrap()
            .contains("10.9.0.0/16")
    );

    // Done: a further reconcile changes nothing and calls no one.
    let mut done = pcc.clone();
    done.status = Some(status);
    let calls = fx.agent("n1").calls().len();
    assert_eq!(
        spawn_reconcile(&fx, &done).await.unwrap(),
        Action::await_change()
    );
    assert_eq!(fx.agent("n1").calls().len(), calls);
}

#[tokio::test]
async fn pods_are_captured_on_their_own_nodes_with_all_their_ips() {
    let pods = vec![
        pod("default", "web", "n1", &["10.1.0.5", "fd00::5"]),
        pod("shop", "db", "n2", &["10.2.0.7"]),
    ];
    let mut fx = Fixture::new(&[up("n1"), up("n2"), up("n3")], pods).await;
    let spec = PacketCaptureConfigSpec {
        pod_selector: selector(&[("default", "web"), ("shop", "db")]),
        target_ips: vec!["10.2.0.7".into(), "192.0.2.1".into()],
        target_ports: vec![80],
        direction: TargetDirection::Egress,
        keep_copies: true,
        ..Default::default()
    };
    let pcc = pcc("pods", spec);
    let (status, _) = start(&mut fx, &pcc, &["Started", "Started", "Started"]).await;
    assert_eq!(status.nodes, Some(3));
    let (r1, _) = fx.agent("n1").only_capture();
    let (r2, _) = fx.agent("n2").only_capture();
    let (r3, _) = fx.agent("n3").only_capture();
    // Pod IPs only on the pod's node; a foreign address everywhere; a known
    // pod IP in targetIPs only on that pod's node.
    assert_eq!(
        r1.spec.unwrap().target_ips,
        ["10.1.0.5", "192.0.2.1", "fd00::5"]
    );
    let s2 = r2.spec.unwrap();
    assert_eq!(s2.target_ips, ["10.2.0.7", "192.0.2.1"]);
    assert_eq!(s2.target_ports, [80]);
    assert_eq!(
        s2.direction,
        packet_capture_proto::v1::Direction::Egress as i32
    );
    assert!(s2.keep_copies);
    let s3 = r3.spec.unwrap();
    assert_eq!(s3.target_ips, ["192.0.2.1"]);
    assert!(s3.only_targets, "exactly what was resolved");
}

#[tokio::test]
async fn a_missing_pod_fails_the_capture_naming_it() {
    let mut fx = Fixture::new(
        &[up("n1")],
        vec![pod("default", "web", "n1", &["10.1.0.5"])],
    )
    .await;
    let spec = PacketCaptureConfigSpec {
        pod_selector: selector(&[("default", "web"), ("default", "ghost")]),
        ..Default::default()
    };
    let pcc = pcc("ghost", spec);
    let task = spawn_reconcile(&fx, &pcc);
    let ev = fx.api.event("PodNotFound").await;
    assert_eq!(ev.body["note"], "pod default/ghost not found");
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["regarding"]["name"], "ghost");
    fx.api.event("Failed").await;
    let seen = fx.api.status_apply("ghost", &json(&pcc)).await;
    assert_eq!(task.await.unwrap(), Action::await_change());
    let (status, _) = applied(&pcc, &seen);
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Failed)
    );
    assert_eq!(
        status.message.as_deref(),
        Some("pod default/ghost not found")
    );
    assert_eq!(status.conditions[0].reason, "PodNotFound");
    assert!(fx.agent("n1").calls().is_empty(), "nothing started");
}

#[tokio::test]
async fn failed_starts_are_retried_and_announced_once() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    fx.agent("n1").fail_starts(2);
    let pcc = pcc("retry", ip_spec(&["10.0.0.1"]));
    let (events, status, _) = reconcile_seen(&mut fx, &pcc, &["Retrying", "Started"]).await;
    let note = events[0].body["note"].as_str().unwrap();
    assert!(note.contains("node n1"), "{note}");
    assert_eq!(
        status.capture_files["127.0.0.2"].status,
        CaptureState::Running
    );
    let starts = fx
        .agent("n1")
        .calls()
        .iter()
        .filter(|c| c.starts_with("StartCapture"))
        .count();
    assert_eq!(starts, 3);
    assert_eq!(fx.agent("n1").captures().len(), 1);
}

/// Reconciles a capture on n1 and n2 whose start fails on n2 (after the
/// retries) with the Event `reason`: n1 runs, n2 has failed. The note of
/// n2's Event, the status and the resource.
async fn n2_fails_to_start(
    fx: &mut Fixture,
    name: &str,
    reason: &str,
) -> (String, PacketCaptureConfigStatus, PacketCaptureConfig) {
    let pcc = pcc(name, ip_spec(&["10.0.0.1"]));
    let (events, status, pcc) = reconcile_seen(fx, &pcc, &["Retrying", "Started", reason]).await;
    assert_eq!(
        status.capture_files["127.0.0.3"].status,
        CaptureState::Failed
    );
    assert_eq!(
        status.capture_files["127.0.0.2"].status,
        CaptureState::Running
    );
    let note = events[2].body["note"].as_str().unwrap().to_owned();
    (note, status, pcc)
}

/// An agent that answers it has no room fails its node for that reason,
/// once the retries are spent: it is not an agent the controller cannot
/// reach.
#[tokio::test]
async fn a_node_whose_agent_has_no_room_fails_for_that() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    fx.agent("n2").be_full();
    let (note, _, _) = n2_fails_to_start(&mut fx, "full", "NodeFailed").await;
    assert!(
        note.starts_with(
            "node n2: agent on node n2 could not take the capture: this node runs 16 captures"
        ),
        "{note}"
    );
}

#[tokio::test]
async fn an_agent_that_never_answers_fails_only_its_node() {
    let mut fx = Fixture::new(&[up("n1"), down("n2")], vec![]).await;
    let (note, status, pcc) = n2_fails_to_start(&mut fx, "half", "AgentUnreachable").await;
    assert!(note.starts_with("node n2: agent on node n2"), "{note}");
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Running)
    );

    let (_, cap) = fx.agent("n1").only_capture();
    fx.agent("n1").complete(&cap.id, 3);
    fx.until_nodes_end(&pcc).await;
    let (status, cm) = finish(&mut fx, &pcc, &["Failed"]).await;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Failed)
    );
    let msg = status.message.unwrap();
    assert!(
        msg.starts_with("capture failed on 1 of 2 nodes (node n2: agent on node n2"),
        "{msg}"
    );
    assert!(msg.ends_with("; 1 node completed"), "{msg}");
    assert_eq!(status.conditions[0].reason, "AgentUnreachable");
    assert_eq!(status.capture_files["127.0.0.2"].packets, 3);
    assert_eq!(cm["data"]["phase"], "Failed");
}

/// A capture on n1 and n2 during which `lose` takes n2's agent away, and
/// n1 completes with 4 packets: the final status (after n2's Event
/// `reason` and the `Failed` one), the results ConfigMap, and the fixture.
async fn lose_n2_mid_capture(
    name: &str,
    lose: impl FnOnce(&FakeAgent),
    reason: &str,
) -> (PacketCaptureConfigStatus, Value, Fixture) {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc(name, ip_spec(&["10.0.0.1"]));
    let (_, pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    lose(fx.agent("n2"));
    let (_, cap) = fx.agent("n1").only_capture();
    fx.agent("n1").complete(&cap.id, 4);
    fx.until_nodes_end(&pcc).await;
    let (status, cm) = finish(&mut fx, &pcc, &[reason, "Failed"]).await;
    assert_eq!(
        status.capture_files["127.0.0.3"].status,
        CaptureState::Failed
    );
    assert_eq!(
        status.capture_files["127.0.0.2"].status,
        CaptureState::Completed
    );
    assert_eq!(status.packets, Some(4));
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Failed)
    );
    assert_eq!(status.conditions[0].reason, reason);
    assert_eq!(cm["data"]["phase"], "Failed");
    (status, cm, fx)
}

#[tokio::test]
async fn an_agent_that_dies_mid_capture_fails_its_node_and_the_rest_complete() {
    let (status, _, _) = lose_n2_mid_capture("dies", FakeAgent::kill, "AgentUnreachable").await;
    let n2 = &status.capture_files["127.0.0.3"];
    assert!(
        n2.message
            .as_deref()
            .unwrap()
            .starts_with("lost contact with the agent on node n2"),
        "{n2:?}"
    );
}

#[tokio::test]
async fn an_agent_that_shuts_down_mid_capture_fails_its_node() {
    // As on SIGTERM: the agent ends its captures `stopped`, unasked.
    let (status, _, fx) = lose_n2_mid_capture("shutdown", FakeAgent::shut_down, "NodeFailed").await;
    assert_eq!(
        status.capture_files["127.0.0.3"].message.as_deref(),
        Some(
            "the agent on node n2 ended the capture without being asked (it shut down or restarted): stopped: the agent is shutting down"
        )
    );
    let calls = fx.agent("n2").calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("StopCapture")),
        "the controller asked for no stop: {calls:?}"
    );
}

#[tokio::test]
async fn a_state_the_controller_does_not_know_fails_the_node_naming_it() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let pcc = pcc("unknown", ip_spec(&["10.0.0.1"]));
    let (_, pcc) = start(&mut fx, &pcc, &["Started"]).await;
    let (_, cap) = fx.agent("n1").only_capture();
    fx.agent("n1").report_state(&cap.id, 42);
    fx.until_nodes_end(&pcc).await;
    let (status, _) = finish(&mut fx, &pcc, &["NodeFailed", "Failed"]).await;
    let n1 = &status.capture_files["127.0.0.2"];
    assert_eq!(n1.status, CaptureState::Failed);
    assert_eq!(
        n1.message.as_deref(),
        Some("the agent on node n1 reported capture state 42, which this controller does not know")
    );
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Failed)
    );
}

#[tokio::test]
async fn a_restarted_controller_adopts_the_running_capture_without_duplicates() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let pcc = pcc("again", ip_spec(&["10.0.0.1"]));
    let (_, pcc) = start(&mut fx, &pcc, &["Started"]).await;
    let (_, before) = fx.agent("n1").only_capture();

    let mut fx = fx.restarted();
    // Same status, nothing to tell the API server: no request at all.
    assert!(matches!(spawn_reconcile(&fx, &pcc).await.unwrap(), a if a != Action::await_change()));
    let (_, after) = fx.agent("n1").only_capture();
    assert_eq!(before.id, after.id);
    let calls = fx.agent("n1").calls();
    let count = |call: &str| calls.iter().filter(|c| c.starts_with(call)).count();
    // Followed again (its end below is learnt by the new watch), not
    // started again: an agent that had forgotten the capture says so
    // rather than start a new one.
    assert_eq!(count("StartCapture"), 1, "{calls:?}");

    fx.agent("n1").complete(&after.id, 2);
    fx.until_nodes_end(&pcc).await;
    let (status, _) = finish(&mut fx, &pcc, &["Completed"]).await;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Completed)
    );
    assert_eq!(status.packets, Some(2));
}

#[tokio::test]
async fn a_spec_change_stops_the_old_capture_and_starts_a_new_one() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let pcc = pcc("edit", ip_spec(&["10.0.0.1"]));
    let (_, mut pcc) = start(&mut fx, &pcc, &["Started"]).await;
    let (_, old) = fx.agent("n1").only_capture();

    pcc.spec.target_ips = vec!["10.0.0.2".into()];
    pcc.metadata.generation = Some(2);
    let (status, _) = start(&mut fx, &pcc, &["Started"]).await;
    assert_eq!(status.observed_generation, Some(2));
    let caps = fx.agent("n1").captures();
    assert_eq!(caps.len(), 2);
    assert_eq!(caps[&old.id].1.capture_state(), Ok(CaptureState::Stopped));
    let new = caps.values().find(|(_, c)| c.id != old.id).unwrap();
    assert_eq!(new.1.id, "uid-edit-g2");
    assert_eq!(new.0.spec.as_ref().unwrap().target_ips, ["10.0.0.2"]);
    assert_eq!(new.1.capture_state(), Ok(CaptureState::Running));
}

#[tokio::test]
async fn stdout_captures_report_the_seed_text_and_no_size() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let spec = PacketCaptureConfigSpec {
        output_format: OutputFormat::Stdout,
        ..ip_spec(&["10.0.0.1"])
    };
    let pcc = pcc("out", spec);
    let (_, pcc) = start(&mut fx, &pcc, &["Started"]).await;
    let (req, cap) = fx.agent("n1").only_capture();
    assert_eq!(
        req.spec.unwrap().output_format,
        packet_capture_proto::v1::OutputFormat::Stdout as i32
    );
    fx.agent("n1").complete(&cap.id, 9);
    fx.until_nodes_end(&pcc).await;
    let (status, _) = finish(&mut fx, &pcc, &["Completed"]).await;
    let e = &status.capture_files["127.0.0.2"];
    assert_eq!(
        (e.output_file.as_str(), e.file_size, e.packets),
        (STDOUT_OUTPUT_FILE, 0, 9)
    );
}

#[tokio::test]
async fn deleting_stops_the_captures_then_releases_the_finalizer() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc("bye", ip_spec(&["10.0.0.1"]));
    let (_, mut pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    pcc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));

    let task = spawn_reconcile(&fx, &pcc);
    let ev = fx.api.event("Stopped").await;
    assert_eq!(
        ev.body["note"],
        "capture stopped on 2 node(s) before deletion"
    );
    let seen = fx.api.finalizer_patch("bye", &json(&pcc)).await;
    assert_eq!(seen.body[1]["op"], "remove");
    task.await.unwrap();
    for node in ["n1", "n2"] {
        let (_, c) = fx.agent(node).only_capture();
        assert_eq!(c.capture_state(), Ok(CaptureState::Stopped), "{node}");
    }
}

/// A capture that ended stops nothing when deleted, so no Event says it
/// did.
#[tokio::test]
async fn deleting_an_ended_capture_says_nothing_of_stopping() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc("done", ip_spec(&["10.0.0.1"]));
    let (_, mut pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    for node in ["n1", "n2"] {
        let (_, cap) = fx.agent(node).only_capture();
        fx.agent(node).complete(&cap.id, 3);
    }
    fx.until_nodes_end(&pcc).await;
    let (status, _) = finish(&mut fx, &pcc, &["Completed"]).await;
    pcc.status = Some(status);
    pcc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));

    let task = spawn_reconcile(&fx, &pcc);
    // The finalizer goes next: no Stopped before it.
    fx.api.finalizer_patch("done", &json(&pcc)).await;
    task.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_agent_does_not_block_deletion() {
    let mut fx = Fixture::new(&[up("n1"), down("n2")], vec![]).await;
    let pcc = pcc("stuck", ip_spec(&["10.0.0.1"]));
    let (_, _, mut pcc) =
        reconcile_seen(&mut fx, &pcc, &["Retrying", "Started", "AgentUnreachable"]).await;
    pcc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));

    let task = spawn_reconcile(&fx, &pcc);
    let ev = fx.api.event("StopFailed").await;
    let note = ev.body["note"].as_str().unwrap();
    assert!(
        note.starts_with("could not stop the capture on node n2"),
        "{note}"
    );
    assert!(note.ends_with("deleting anyway"), "{note}");
    fx.api.event("Stopped").await;
    fx.api.finalizer_patch("stuck", &json(&pcc)).await;
    task.await.unwrap();
    let (_, c) = fx.agent("n1").only_capture();
    assert_eq!(c.capture_state(), Ok(CaptureState::Stopped));
}

/// Leaves `node` out of the status's `captureFiles` while still counting
/// it, as a status beyond `MAX_STATUS_NODES` nodes does.
fn leave_out(pcc: &mut PacketCaptureConfig, node: &str) {
    let status = pcc.status.as_mut().unwrap();
    status.capture_files.retain(|_, e| e.node != node);
    status.capture_files_omitted = Some(1);
}

#[tokio::test]
async fn deleting_after_a_restart_stops_the_nodes_the_status_does_not_name() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc("wide", ip_spec(&["10.0.0.1"]));
    let (_, mut pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    leave_out(&mut pcc, "n2");
    let mut fx = fx.restarted();
    pcc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));

    let task = spawn_reconcile(&fx, &pcc);
    fx.api.event("Stopped").await;
    fx.api.finalizer_patch("wide", &json(&pcc)).await;
    task.await.unwrap();
    for node in ["n1", "n2"] {
        let (_, c) = fx.agent(node).only_capture();
        assert_eq!(c.capture_state(), Ok(CaptureState::Stopped), "{node}");
    }
}

#[tokio::test]
async fn a_controller_restarted_after_the_deadline_keeps_every_node_asking_the_agents() {
    let mut fx = Fixture::new(&[up("n1"), up("n2")], vec![]).await;
    let pcc = pcc("late", ip_spec(&["10.0.0.1"]));
    let (_, mut pcc) = start(&mut fx, &pcc, &["Started", "Started"]).await;
    // n2 completed while the controller was down, and its status entry is
    // left out; n1 never ends.
    let (_, cap) = fx.agent("n2").only_capture();
    fx.agent("n2").complete(&cap.id, 5);
    leave_out(&mut pcc, "n2");
    // Back after the deadline (duration 60 s, grace 60 s).
    pcc.status.as_mut().unwrap().start_time =
        Some(Time(Timestamp::now() - SignedDuration::from_secs(200)));
    let mut fx = fx.restarted();

    // (n2's Started Event: the restarted controller cannot tell it was
    // announced, as it can for a node the status lists.)
    let (status, _) = finish(&mut fx, &pcc, &["NodeFailed", "Started", "Failed"]).await;
    assert_eq!(status.nodes, Some(2));
    let n1 = &status.capture_files["127.0.0.2"];
    assert_eq!(n1.status, CaptureState::Failed);
    assert!(
        n1.message
            .as_deref()
            .unwrap()
            .starts_with("no end reported by the agent within 120s"),
        "{n1:?}"
    );
    let n2 = &status.capture_files["127.0.0.3"];
    assert_eq!((n2.status, n2.packets), (CaptureState::Completed, 5));
    for node in ["n1", "n2"] {
        let calls = fx.agent(node).calls();
        let starts = calls
            .iter()
            .filter(|c| c.starts_with("StartCapture"))
            .count();
        assert_eq!(starts, 1, "nothing starts past the deadline: {calls:?}");
    }
}

#[tokio::test]
async fn a_stop_annotation_from_before_a_spec_change_is_removed_and_the_new_generation_runs() {
    let mut fx = Fixture::new(&[up("n1")], vec![]).await;
    let pcc = pcc("again", ip_spec(&["10.0.0.1"]));
    let (_, pcc) = start(&mut fx, &pcc, &["Started"]).await;
    let (_, cap) = fx.agent("n1").only_capture();
    fx.agent("n1").complete(&cap.id, 1);
    fx.until_nodes_end(&pcc).await;
    let (status, _) = finish(&mut fx, &pcc, &["Completed"]).await;
    let mut pcc = pcc.clone();
    pcc.status = Some(status);

    // Stopped during generation 1 (as `kubectl pcap stop` writes it), then
    // the spec is edited.
    let asked = &stop_value(1, "2024-01-01T00:00:00Z");
    pcc.metadata.annotations = Some([(STOP_REQUESTED.to_string(), asked.to_string())].into());
    pcc.spec.target_ips = vec!["10.0.0.2".into()];
    pcc.metadata.generation = Some(2);
    let task = spawn_reconcile(&fx, &pcc);
    let patch = fx
        .api
        .answer(
            "PATCH",
            "/apis/networking.packet.io/v1/packetcaptureconfigs/again",
            200,
            |_| json(&pcc),
        )
        .await;
    assert_eq!(patch.content_type, "application/json-patch+json");
    let path = "/metadata/annotations/networking.packet.io~1stop-requested";
    assert_eq!(
        patch.body,
        serde_json::json!([
            {"op": "test", "path": path, "value": asked},
            {"op": "remove", "path": path},
        ]),
        "only the value seen is removed"
    );
    let starting = fx.api.status_apply("again", &json(&pcc)).await;
    assert_eq!(applied(&pcc, &starting).0.observed_generation, Some(2));
    fx.api.event("Started").await;
    let seen = fx.api.status_apply("again", &json(&pcc)).await;
    task.await.unwrap();
    let status = applied(&pcc, &seen).0;
    assert_eq!(
        status.phase,
        Some(packet_capture_common::crd::Phase::Running)
    );
    let caps = fx.agent("n1").captures();
    let new = caps.values().find(|(_, c)| c.id == "uid-again-g2").unwrap();
    assert_eq!(new.1.capture_state(), Ok(CaptureState::Running));
}
