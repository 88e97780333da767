//! The admission webhook's checks against a mock API server: libpcap judges
//! the filter (names refused before it sees them), target namespaces must
//! exist, and the requesting user must be allowed to get pods there
//! (SubjectAccessReview).

mod support;

use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionReview;
use packet_capture_common::validate::CaptureLimits;
use packet_capture_controller::webhook::review;
use serde_json::{Value, json};
use support::ApiServer;

fn admission(spec: Value) -> AdmissionReview<DynamicObject> {
    serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "req-1",
            "kind": {"group": "networking.packet.io", "version": "v1", "kind": "PacketCaptureConfig"},
            "resource": {"group": "networking.packet.io", "version": "v1", "resource": "packetcaptureconfigs"},
            "name": "cap",
            "operation": "CREATE",
            "userInfo": {"username": "alice", "groups": ["devs"], "uid": "u-alice"},
            "object": {
                "apiVersion": "networking.packet.io/v1",
                "kind": "PacketCaptureConfig",
                "metadata": {"name": "cap"},
                "spec": spec,
            },
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn mock() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair();
    (Client::new(service, "default"), ApiServer::new(handle))
}

fn verdict(r: &AdmissionReview<DynamicObject>) -> (bool, String) {
    let resp = r.response.as_ref().unwrap();
    assert_eq!(resp.uid, "req-1");
    (resp.allowed, resp.result.message.clone())
}

#[tokio::test]
async fn a_good_spec_is_allowed_after_namespace_and_access_checks() {
    let (client, mut api) = mock();
    let task = tokio::spawn(async move {
        review(
            &client,
            &CaptureLimits::default(),
            admission(json!({
                "podSelector": {"pods": [
                    {"podName": "web", "namespace": "shop"},
                    {"podName": "db", "namespace": "shop"},
                ]},
                "filter": "tcp port 5432",
            })),
        )
        .await
    });
    api.answer(
        "GET",
        "/api/v1/namespaces/shop",
        200,
        |_| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    )
    .await;
    let sar = api
        .answer(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            201,
            |seen| {
                let mut r = seen.body.clone();
                r["status"] = json!({"allowed": true});
                r
            },
        )
        .await;
    assert_eq!(sar.body["spec"]["user"], "alice");
    assert_eq!(sar.body["spec"]["groups"], json!(["devs"]));
    assert_eq!(
        sar.body["spec"]["resourceAttributes"],
        json!({"namespace": "shop", "verb": "get", "group": "", "resource": "pods"})
    );
    assert_eq!(verdict(&task.await.unwrap()), (true, String::new()));
}

#[tokio::test]
async fn bad_filters_missing_namespaces_and_forbidden_ones_are_named() {
    let (client, mut api) = mock();
    let task = tokio::spawn(async move {
        review(
            &client,
            &CaptureLimits::default(),
            admission(json!({
                "targetIPs": ["10.0.0.0/33"],
                "podSelector": {"pods": [
                    {"podName": "web", "namespace": "gone"},
                    {"podName": "db", "namespace": "secret"},
                ]},
                "filter": "tcp port http-ish",
            })),
        )
        .await
    });
    api.answer("GET", "/api/v1/namespaces/gone", 404, |_| {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "namespaces \"gone\" not found"})
    })
    .await;
    api.answer(
        "GET",
        "/api/v1/namespaces/secret",
        200,
        |_| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "secret"}}),
    )
    .await;
    api.answer(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        201,
        |seen| {
            let mut r = seen.body.clone();
            r["status"] = json!({"allowed": false});
            r
        },
    )
    .await;
    let (allowed, message) = verdict(&task.await.unwrap());
    assert!(!allowed);
    let parts: Vec<&str> = message.split("; ").collect();
    assert!(
        parts[0].starts_with("spec.targetIPs[0]: \"10.0.0.0/33\""),
        "{message}"
    );
    assert!(
        parts[1].starts_with(
            "spec.filter: \"tcp port http-ish\" is not a valid tcpdump filter: \"http-ish\" is a service name"
        ),
        "{message}"
    );
    assert_eq!(
        parts[2],
        "spec.podSelector.pods[0].namespace: namespace \"gone\" does not exist"
    );
    assert_eq!(
        parts[3],
        "spec.podSelector.pods[1].namespace: user \"alice\" may not get pods in namespace \"secret\", so may not capture their traffic"
    );
}

#[tokio::test]
async fn an_object_that_does_not_parse_is_denied_with_the_field() {
    let (client, _api) = mock();
    let r = review(
        &client,
        &CaptureLimits::default(),
        admission(json!({"targetIPs": ["10.0.0.1"], "outputFormat": "json"})),
    )
    .await;
    let (allowed, message) = verdict(&r);
    assert!(!allowed);
    assert!(
        message.starts_with("spec: ") && message.contains("json"),
        "{message}"
    );
}

#[tokio::test]
async fn captures_over_the_clusters_limits_are_denied_with_the_key() {
    let (client, _api) = mock();
    let limits = CaptureLimits {
        max_duration: 600,
        max_packets: 5_000,
    };
    let over = review(
        &client,
        &limits,
        admission(json!({"targetIPs": ["10.0.0.1"], "duration": 601, "maxPackets": 5_001})),
    )
    .await;
    assert_eq!(
        verdict(&over),
        (
            false,
            "spec.duration: 601 is over this cluster's limit of 600 (MAX_CAPTURE_DURATION); \
             spec.maxPackets: 5001 is over this cluster's limit of 5000 (MAX_CAPTURE_PACKETS)"
                .to_string()
        )
    );
    let at = review(
        &client,
        &limits,
        admission(json!({"targetIPs": ["10.0.0.1"], "duration": 600, "maxPackets": 5_000})),
    )
    .await;
    assert_eq!(verdict(&at), (true, String::new()));
}

/// A client that connects and never starts its TLS handshake is dropped once
/// the handshake timeout has passed, so idle connections cannot pile up.
#[tokio::test]
async fn a_handshake_that_never_comes_is_cut_off() {
    use packet_capture_controller::webhook::{HANDSHAKE_TIMEOUT, ServingCert, WebhookServer};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt as _;

    let (client, _api) = mock();
    let server = WebhookServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(ServingCert::default()),
        client,
        CaptureLimits::default(),
    )
    .await
    .unwrap();
    let address = server.local_addr().unwrap();
    tokio::spawn(server.run());
    let mut idle = tokio::net::TcpStream::connect(address).await.unwrap();
    let connected = Instant::now();
    let mut read = Vec::new();
    let closed = tokio::time::timeout(
        HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        idle.read_to_end(&mut read),
    )
    .await;
    assert!(closed.is_ok(), "still open {:?} later", connected.elapsed());
    assert!(connected.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1));
}
