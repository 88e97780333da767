//! The admission webhooks against a mock API server: libpcap judges the
//! filter (names refused before it sees them), target namespaces must
//! exist, the requesting user must be allowed to capture each target
//! (SubjectAccessReviews for `capture` on pods, per namespace or in every
//! namespace) and stay within the captures per requester, which the
//! mutating webhook records.

mod support;

use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionReview;
use packet_capture_common::crd::{AUTHORIZED_IN, REQUESTED_BY};
use packet_capture_common::validate::CaptureLimits;
use packet_capture_controller::webhook::Admission;
use serde_json::{Value, json};
use support::ApiServer;

fn admission_of(spec: Value) -> AdmissionReview<DynamicObject> {
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
                "metadata": {
                    "name": "cap",
                    "uid": "7d6c1f4e-cap",
                    // As the mutating webhook left it.
                    "annotations": {REQUESTED_BY: "alice"},
                },
                "spec": spec,
            },
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn mock() -> (Admission, ApiServer) {
    mock_with(CaptureLimits::default())
}

fn mock_with(limits: CaptureLimits) -> (Admission, ApiServer) {
    let (service, handle) = tower_test::mock::pair();
    let client = Client::new(service, "default");
    (
        Admission::new(client, limits, "webhook-test".into()),
        ApiServer::new(handle),
    )
}

fn verdict(r: &AdmissionReview<DynamicObject>) -> (bool, String) {
    let resp = r.response.as_ref().unwrap();
    assert_eq!(resp.uid, "req-1");
    (resp.allowed, resp.result.message.clone())
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn pod(ns: &str, name: &str, ip: &str, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"containers": [], "hostNetwork": host_network, "nodeName": "node-1"},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items})
}

/// One node, 192.168.1.10, with the pod CIDR 10.244.1.0/24.
fn nodes() -> Value {
    list(
        "NodeList",
        vec![json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
        })],
    )
}

/// Answers the next SubjectAccessReview with `allowed`, returning what
/// it asked.
async fn access_review(api: &mut ApiServer, allowed: bool) -> Value {
    let sar = api
        .answer(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            201,
            |seen| {
                let mut r = seen.body.clone();
                r["status"] = json!({"allowed": allowed});
                r
            },
        )
        .await;
    sar.body["spec"].clone()
}

#[tokio::test]
async fn a_good_spec_is_allowed_after_namespace_and_capture_checks() {
    let (admission, mut api) = mock();
    let task = tokio::spawn(async move {
        admission
            .review(admission_of(json!({
                "podSelector": {"pods": [
                    {"podName": "web", "namespace": "shop"},
                    {"podName": "db", "namespace": "shop"},
                ]},
                "filter": "tcp port 5432",
            })))
            .await
    });
    api.answer("GET", "/api/v1/namespaces/shop", 200, |_| namespace("shop"))
        .await;
    api.answer("GET", "/api/v1/namespaces/shop/pods/web", 200, |_| {
        pod("shop", "web", "10.244.1.5", false)
    })
    .await;
    api.answer("GET", "/api/v1/namespaces/shop/pods/db", 404, |_| {
        not_found("pods \"db\"")
    })
    .await;
    let sar = access_review(&mut api, true).await;
    assert_eq!(sar["user"], "alice");
    assert_eq!(sar["groups"], json!(["devs"]));
    assert_eq!(
        sar["resourceAttributes"],
        json!({"namespace": "shop", "verb": "capture", "group": "", "resource": "pods"})
    );
    assert_eq!(verdict(&task.await.unwrap()), (true, String::new()));
    // Who was allowed what, as an Event on the capture.
    let event = api
        .answer(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            201,
            |seen| seen.body.clone(),
        )
        .await;
    assert_eq!(event.body["reason"], "TargetsAuthorized");
    assert_eq!(event.body["regarding"]["name"], "cap");
    assert_eq!(
        event.body["note"],
        "user \"alice\" may capture pods in namespace \"shop\", which covers every target"
    );
}

#[tokio::test]
async fn bad_filters_missing_namespaces_and_forbidden_ones_are_named() {
    let (admission, mut api) = mock();
    let bad = admission.clone();
    let task = tokio::spawn(async move {
        bad.review(admission_of(json!({
            "targetIPs": ["10.0.0.0/33"],
            "podSelector": {"pods": [{"podName": "web", "namespace": "gone"}]},
            "filter": "tcp port http-ish",
        })))
        .await
    });
    // A spec wrong on its own is not looked into further: no request.
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
    assert_eq!(parts.len(), 2, "{message}");

    let task = tokio::spawn(async move {
        admission
            .review(admission_of(json!({
                "targetIPs": ["10.244.1.5", "0.0.0.0/0"],
                "podSelector": {"pods": [
                    {"podName": "web", "namespace": "gone"},
                    {"podName": "db", "namespace": "secret"},
                ]},
            })))
            .await
    });
    api.answer("GET", "/api/v1/namespaces/gone", 404, |_| {
        not_found("namespaces \"gone\"")
    })
    .await;
    api.answer("GET", "/api/v1/namespaces/secret", 200, |_| {
        namespace("secret")
    })
    .await;
    api.answer("GET", "/api/v1/namespaces/gone/pods/web", 404, |_| {
        not_found("pods \"web\"")
    })
    .await;
    api.answer("GET", "/api/v1/namespaces/secret/pods/db", 200, |_| {
        pod("secret", "db", "10.244.1.6", false)
    })
    .await;
    api.answer("GET", "/api/v1/nodes", 200, |_| nodes()).await;
    let on_node = api
        .answer("GET", "/api/v1/pods", 200, |_| {
            list("PodList", vec![pod("shop", "web", "10.244.1.5", false)])
        })
        .await;
    assert!(
        on_node.uri.contains("fieldSelector=spec.nodeName%3Dnode-1"),
        "the pods of the node whose pod CIDR holds the address: {}",
        on_node.uri
    );
    let cluster = access_review(&mut api, false).await;
    assert_eq!(
        cluster["resourceAttributes"],
        json!({"verb": "capture", "group": "", "resource": "pods"}),
        "every namespace"
    );
    for ns in ["gone", "secret", "shop"] {
        let sar = access_review(&mut api, ns == "shop").await;
        assert_eq!(sar["resourceAttributes"]["namespace"], ns);
    }
    let (allowed, message) = verdict(&task.await.unwrap());
    assert!(!allowed);
    assert_eq!(
        message.split("; ").collect::<Vec<_>>(),
        [
            "spec.podSelector.pods[0].namespace: namespace \"gone\" does not exist",
            "spec.targetIPs[1]: 0.0.0.0/0 covers 192.168.1.10, an address of node node-1, \
             so capturing it needs \"capture\" on pods in every namespace, which user \"alice\" does not have",
            "spec.podSelector.pods[0]: pod gone/web: user \"alice\" may not \"capture\" pods in namespace \"gone\"",
            "spec.podSelector.pods[1]: pod secret/db: user \"alice\" may not \"capture\" pods in namespace \"secret\"",
        ]
    );
}

#[tokio::test]
async fn pods_selected_by_labels_need_capture_where_they_may_be() {
    // In namespaces named by their name label: capture there.
    let (admission, mut api) = mock();
    let task = tokio::spawn(async move {
        admission
            .review(admission_of(json!({
                "podSelector": {
                    "matchLabels": {"app": "web"},
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                },
            })))
            .await
    });
    let sar = access_review(&mut api, true).await;
    assert_eq!(
        sar["resourceAttributes"],
        json!({"namespace": "shop", "verb": "capture", "group": "", "resource": "pods"})
    );
    assert_eq!(verdict(&task.await.unwrap()), (true, String::new()));

    // Anywhere (namespaces chosen by labels anyone may set): every namespace.
    let (admission, mut api) = mock();
    let task = tokio::spawn(async move {
        admission
            .review(admission_of(json!({
                "podSelector": {
                    "matchExpressions": [{"key": "app", "operator": "Exists"}],
                    "namespaceSelector": {"matchLabels": {"team": "shop"}},
                },
            })))
            .await
    });
    let sar = access_review(&mut api, false).await;
    assert_eq!(
        sar["resourceAttributes"],
        json!({"verb": "capture", "group": "", "resource": "pods"})
    );
    let (allowed, message) = verdict(&task.await.unwrap());
    assert!(!allowed);
    assert_eq!(
        message,
        "spec.podSelector: it selects pods by labels in any namespace, now or to come (name the \
         namespaces with namespaceSelector kubernetes.io/metadata.name In [...]), so capturing it \
         needs \"capture\" on pods in every namespace, which user \"alice\" does not have"
    );
}

#[tokio::test]
async fn an_update_that_keeps_the_spec_is_not_authorized_again() {
    let (admission, _api) = mock();
    let spec = json!({"targetIPs": ["0.0.0.0/0"]});
    let mut review = admission_of(spec.clone());
    let request = review.request.as_mut().unwrap();
    request.operation = kube::core::admission::Operation::Update;
    request.old_object = request.object.clone();
    // No request reaches the API server (the mock would never answer).
    assert_eq!(
        verdict(&admission.review(review).await),
        (true, String::new())
    );
}

/// A capture admitted under higher limits (or while the webhook was off)
/// can still be stopped and have its finalizer removed: updates that keep
/// its spec pass, while a change of that spec is judged by today's limits.
#[tokio::test]
async fn an_update_that_keeps_a_spec_over_todays_limits_is_allowed() {
    let (admission, _api) = mock_with(CaptureLimits {
        max_duration: 600,
        max_packets: 5_000,
    });
    let old_spec = json!({"targetIPs": ["10.0.0.1"], "duration": 7200, "filter": "port http"});
    let mut finalizer_removed = request_of(old_spec.clone(), "controller", None, None);
    let request = finalizer_removed.request.as_mut().unwrap();
    request.operation = kube::core::admission::Operation::Update;
    request.old_object = request.object.clone();
    if let Some(old) = request.old_object.as_mut() {
        old.metadata.finalizers = Some(vec![packet_capture_controller::consts::FINALIZER.into()]);
    }
    assert_eq!(
        verdict(&admission.review(finalizer_removed).await),
        (true, String::new())
    );

    let changed = request_of(
        json!({"targetIPs": ["10.0.0.1"], "duration": 7201}),
        "alice",
        Some(json!({REQUESTED_BY: "alice"})),
        Some((old_spec, "alice")),
    );
    assert_eq!(
        verdict(&admission.review(changed).await),
        (
            false,
            "spec.duration: 7201 is over this cluster's limit of 600 (MAX_CAPTURE_DURATION)"
                .to_string()
        )
    );
}

#[tokio::test]
async fn an_object_that_does_not_parse_is_denied_with_the_field() {
    let (admission, _api) = mock();
    let r = admission
        .review(admission_of(
            json!({"targetIPs": ["10.0.0.1"], "outputFormat": "json"}),
        ))
        .await;
    let (allowed, message) = verdict(&r);
    assert!(!allowed);
    assert!(
        message.starts_with("spec.outputFormat: ") && message.contains("json"),
        "{message}"
    );
    // Beyond what the field holds (the API server takes any integer for
    // the CRD's uint32 when its maximum is not in the schema).
    let r = admission
        .review(admission_of(
            json!({"targetIPs": ["10.0.0.1"], "duration": 4_294_967_296_u64}),
        ))
        .await;
    let (allowed, message) = verdict(&r);
    assert!(!allowed);
    assert!(
        message.starts_with("spec.duration: invalid value: integer `4294967296`"),
        "{message}"
    );
}

#[tokio::test]
async fn captures_over_the_clusters_limits_are_denied_with_the_key() {
    let (admission, _api) = mock_with(CaptureLimits {
        max_duration: 600,
        max_packets: 5_000,
    });
    let over = admission
        .review(admission_of(
            json!({"targetIPs": ["10.0.0.1"], "duration": 601, "maxPackets": 5_001}),
        ))
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
}

/// A client that connects and never starts its TLS handshake is dropped once
/// the handshake timeout has passed, so idle connections cannot pile up.
#[tokio::test]
async fn a_handshake_that_never_comes_is_cut_off() {
    use packet_capture_controller::webhook::{HANDSHAKE_TIMEOUT, ServingCert, WebhookServer};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt as _;

    let (admission, _api) = mock();
    let (_cas, clients) = tokio::sync::watch::channel(None);
    let server = WebhookServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(ServingCert::default()),
        packet_capture_controller::webhook::router(admission),
        clients,
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

/// The request of [`admission_of`] as `user`, an update from `old_spec`
/// (with `old_requester`) when given.
fn request_of(
    spec: Value,
    user: &str,
    annotations: Option<Value>,
    old: Option<(Value, &str)>,
) -> AdmissionReview<DynamicObject> {
    let mut review = serde_json::to_value(admission_of(spec)).unwrap();
    let request = &mut review["request"];
    request["userInfo"]["username"] = user.into();
    match annotations {
        Some(a) => request["object"]["metadata"]["annotations"] = a,
        None => {
            request["object"]["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("annotations");
        }
    }
    if let Some((old_spec, old_requester)) = old {
        request["operation"] = "UPDATE".into();
        let mut old = request["object"].clone();
        old["spec"] = old_spec;
        old["metadata"]["annotations"] =
            json!({REQUESTED_BY: old_requester, AUTHORIZED_IN: "shop"});
        request["oldObject"] = old;
    }
    serde_json::from_value(review).unwrap()
}

/// The object after the mutating webhook's patch, from a task: a request
/// that asks for a capture is authorized meanwhile, with API calls the
/// test answers.
fn mutated(
    admission: &Admission,
    review: AdmissionReview<DynamicObject>,
) -> tokio::task::JoinHandle<Value> {
    let admission = admission.clone();
    tokio::spawn(async move {
        let mut object =
            serde_json::to_value(review.request.as_ref().unwrap().object.clone()).unwrap();
        let answer = admission.mutate(review).await;
        let resp = answer.response.unwrap();
        assert!(resp.allowed);
        if let Some(patch) = &resp.patch {
            let patch: json_patch::Patch = serde_json::from_slice(patch).unwrap();
            json_patch::patch(&mut object, &patch).unwrap();
        }
        object
    })
}

/// Answers what authorizing `targetIPs: [10.244.1.5]` asks: the nodes,
/// the pods of node-1 (whose pod CIDR holds it: shop/web), whether the
/// user may capture in namespace shop, then in every namespace.
async fn authorize_shop_web(api: &mut ApiServer, in_shop: bool, everywhere: bool) {
    api.answer("GET", "/api/v1/nodes", 200, |_| nodes()).await;
    api.answer("GET", "/api/v1/pods", 200, |_| {
        list("PodList", vec![pod("shop", "web", "10.244.1.5", false)])
    })
    .await;
    let sar = access_review(api, in_shop).await;
    assert_eq!(sar["resourceAttributes"]["namespace"], "shop");
    let sar = access_review(api, everywhere).await;
    assert_eq!(sar["resourceAttributes"].get("namespace"), None);
}

#[tokio::test]
async fn the_requester_and_where_they_may_capture_are_recorded_when_they_ask() {
    let (admission, mut api) = mock();
    let spec = json!({"targetIPs": ["10.244.1.5"]});
    let wider = json!({"targetIPs": ["10.0.0.0/24"]});
    let annotation = |object: &Value, key: &str| {
        object["metadata"]["annotations"][key]
            .as_str()
            .map(String::from)
    };
    // A create: the requesting user, and the namespaces they were found
    // allowed to capture the targets in, with or without other
    // annotations, and whatever the creator wrote there.
    for annotations in [
        None,
        Some(json!({"team": "net"})),
        Some(json!({REQUESTED_BY: "bob", AUTHORIZED_IN: "*"})),
    ] {
        let task = mutated(
            &admission,
            request_of(spec.clone(), "alice", annotations.clone(), None),
        );
        authorize_shop_web(&mut api, true, false).await;
        let object = task.await.unwrap();
        assert_eq!(
            annotation(&object, REQUESTED_BY).as_deref(),
            Some("alice"),
            "{annotations:?}"
        );
        assert_eq!(annotation(&object, AUTHORIZED_IN).as_deref(), Some("shop"));
        if annotations.is_some_and(|a| a.get("team").is_some()) {
            assert_eq!(object["metadata"]["annotations"]["team"], "net");
        }
    }
    // Not allowed there: nothing is recorded as allowed (the validating
    // webhook refuses the capture). Allowed everywhere: everywhere, though
    // the targets did not need it.
    for (in_shop, everywhere, recorded) in [(false, false, ""), (true, true, "*")] {
        let task = mutated(&admission, request_of(spec.clone(), "alice", None, None));
        authorize_shop_web(&mut api, in_shop, everywhere).await;
        let object = task.await.unwrap();
        assert_eq!(
            annotation(&object, AUTHORIZED_IN).as_deref(),
            Some(recorded)
        );
    }
    // A named pod may be recreated on its node's network: where its
    // requester may capture is recorded too (the pod, then shop, then
    // every namespace).
    let by_name = json!({"podSelector": {"pods": [{"podName": "web", "namespace": "shop"}]}});
    let task = mutated(&admission, request_of(by_name, "alice", None, None));
    api.answer("GET", "/api/v1/namespaces/shop/pods/web", 200, |_| {
        pod("shop", "web", "10.244.1.5", false)
    })
    .await;
    let sar = access_review(&mut api, true).await;
    assert_eq!(sar["resourceAttributes"]["namespace"], "shop");
    let sar = access_review(&mut api, false).await;
    assert_eq!(sar["resourceAttributes"].get("namespace"), None);
    let object = task.await.unwrap();
    assert_eq!(annotation(&object, REQUESTED_BY).as_deref(), Some("alice"));
    assert_eq!(annotation(&object, AUTHORIZED_IN).as_deref(), Some("shop"));
    // Pods selected by labels are never host-network ones, and no address
    // is followed: nothing is asked or recorded.
    let by_labels = json!({"podSelector": {"matchLabels": {"app": "web"}}});
    let object = mutated(&admission, request_of(by_labels, "alice", None, None))
        .await
        .unwrap();
    assert_eq!(annotation(&object, REQUESTED_BY).as_deref(), Some("alice"));
    assert_eq!(annotation(&object, AUTHORIZED_IN), None);
    // What cannot be found out now is refused, to be asked again.
    let admission_now = admission.clone();
    let review = request_of(spec.clone(), "alice", None, None);
    let task = tokio::spawn(async move { admission_now.mutate(review).await });
    api.answer("GET", "/api/v1/nodes", 500, |_| {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500})
    })
    .await;
    let resp = task.await.unwrap().response.unwrap();
    assert!(!resp.allowed);
    assert!(
        resp.result.message.starts_with(&format!(
            "metadata.annotations[{AUTHORIZED_IN}]: could not find out where the requester may capture: could not look up the pods and nodes of the targets"
        )),
        "{}",
        resp.result.message
    );
    // An update that keeps the spec keeps both, even when it removes or
    // rewrites them: nothing is asked.
    for annotations in [
        None,
        Some(json!({REQUESTED_BY: "carol", AUTHORIZED_IN: "*"})),
        Some(json!({})),
    ] {
        let update = request_of(
            spec.clone(),
            "carol",
            annotations,
            Some((spec.clone(), "alice")),
        );
        let object = mutated(&admission, update).await.unwrap();
        assert_eq!(annotation(&object, REQUESTED_BY).as_deref(), Some("alice"));
        assert_eq!(annotation(&object, AUTHORIZED_IN).as_deref(), Some("shop"));
    }
    // One that changes the spec asks for a new capture: its user requests
    // it, allowed everywhere for a range.
    let update = request_of(
        wider,
        "carol",
        Some(json!({REQUESTED_BY: "alice", AUTHORIZED_IN: "shop"})),
        Some((spec, "alice")),
    );
    let task = mutated(&admission, update);
    api.answer("GET", "/api/v1/nodes", 200, |_| nodes()).await;
    let sar = access_review(&mut api, true).await;
    assert_eq!(sar["user"], "carol");
    assert_eq!(sar["resourceAttributes"].get("namespace"), None);
    let object = task.await.unwrap();
    assert_eq!(annotation(&object, REQUESTED_BY).as_deref(), Some("carol"));
    assert_eq!(annotation(&object, AUTHORIZED_IN).as_deref(), Some("*"));
}

#[tokio::test]
async fn a_requester_other_than_the_user_is_refused() {
    let (admission, _api) = mock();
    let review = request_of(
        json!({"targetIPs": ["10.0.0.1"]}),
        "alice",
        Some(json!({REQUESTED_BY: "bob"})),
        None,
    );
    let (allowed, message) = verdict(&admission.review(review).await);
    assert!(!allowed);
    assert_eq!(
        message,
        format!(
            "metadata.annotations[{REQUESTED_BY}]: is \"bob\", not the requesting user \"alice\"; \
             the mutating webhook sets it (is the MutatingWebhookConfiguration packet-capture-webhook registered?)"
        )
    );
}

/// A capture named `name` requested by `who`, in `phase` (None: no status
/// yet), being deleted or not.
fn capture(name: &str, who: &str, phase: Option<&str>, deleting: bool) -> Value {
    let mut c = json!({
        "apiVersion": "networking.packet.io/v1", "kind": "PacketCaptureConfig",
        "metadata": {"name": name, "annotations": {REQUESTED_BY: who}},
        "spec": {"targetIPs": ["10.0.0.1"]},
    });
    if let Some(phase) = phase {
        c["status"] = json!({"phase": phase});
    }
    if deleting {
        c["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
        c["metadata"]["finalizers"] = json!(["networking.packet.io/finalizer"]);
    }
    c
}

#[tokio::test]
async fn one_capture_over_the_requesters_limit_is_refused_naming_them() {
    for (limit, allowed) in [(2, false), (3, true)] {
        let (admission, mut api) = mock();
        let admission = admission.with_max_per_requester(limit);
        let task = tokio::spawn(async move {
            admission
                .review(admission_of(
                    json!({"podSelector": {"pods": [{"podName": "web", "namespace": "shop"}]}}),
                ))
                .await
        });
        api.answer("GET", "/api/v1/namespaces/shop", 200, |_| namespace("shop"))
            .await;
        // Counted: alice's captures that have not ended, other than this one.
        api.answer(
            "GET",
            "/apis/networking.packet.io/v1/packetcaptureconfigs",
            200,
            |_| {
                list(
                    "PacketCaptureConfigList",
                    vec![
                        capture("new", "alice", None, false),
                        capture("running", "alice", Some("Running"), false),
                        capture("done", "alice", Some("Completed"), false),
                        capture("failed", "alice", Some("Failed"), false),
                        capture("gone", "alice", Some("Running"), true),
                        capture("bobs", "bob", Some("Running"), false),
                        capture("cap", "alice", Some("Running"), false),
                    ],
                )
            },
        )
        .await;
        api.answer("GET", "/api/v1/namespaces/shop/pods/web", 200, |_| {
            pod("shop", "web", "10.244.1.5", false)
        })
        .await;
        access_review(&mut api, true).await;
        let (was_allowed, message) = verdict(&task.await.unwrap());
        assert_eq!(was_allowed, allowed, "{message}");
        if !allowed {
            assert_eq!(
                message,
                format!(
                    "metadata.annotations[{REQUESTED_BY}]: user \"alice\" already has 2 captures that \
                     have not ended (new, running), the most one requester may have \
                     (MAX_CAPTURES_PER_REQUESTER=2); delete one or wait for one to end"
                )
            );
        }
    }
}
