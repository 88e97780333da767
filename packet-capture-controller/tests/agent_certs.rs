//! The agents' certificate requests against a mock API server: a request
//! approved but left unsigned (its approver stopped between its two writes)
//! is signed without a second approval, one approved elsewhere that fails
//! the checks is failed rather than denied, and a decision cut short by an
//! API error is made again on the request as it is then.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt as _};
use packet_capture_common::crd::AGENT_SIGNER;
use packet_capture_controller::agent_certs::{CaSource, Settings, settle};
use packet_capture_controller::pki::{self, Lifetimes, Name};
use rcgen::{CertificateParams, KeyPair, SanType};
use serde_json::{Value, json};
use support::{ApiServer, NS, agent_pod, node};

const REQUESTS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
const NODE: &str = "node-1";
const NODE_IP: &str = "10.0.0.1";

fn settings() -> Settings {
    Settings {
        namespace: NS.into(),
        service_account: "packet-capture-agent".into(),
        ca: CaSource::SelfManaged {
            secret: "packet-capture-ca".into(),
        },
        bundle_config_map: "packet-capture-agent-ca".into(),
    }
}

/// The request the agent of [`NODE`] makes, from `pod`'s token, with the
/// conditions of `decided` (types) already set.
fn request(pod: &Pod, decided: &[&str]) -> CertificateSigningRequest {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![
        SanType::DnsName(NODE.try_into().unwrap()),
        SanType::IpAddress(NODE_IP.parse().unwrap()),
    ];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let extra = BTreeMap::from([
        (
            "authentication.kubernetes.io/pod-name".to_string(),
            vec![pod.name_any()],
        ),
        (
            "authentication.kubernetes.io/pod-uid".to_string(),
            vec![pod.uid().unwrap()],
        ),
    ]);
    let conditions = decided
        .iter()
        .map(|type_| CertificateSigningRequestCondition {
            type_: type_.to_string(),
            status: "True".into(),
            ..Default::default()
        })
        .collect();
    CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("agent-{NODE}-csr")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: AGENT_SIGNER.into(),
            username: Some(format!("system:serviceaccount:{NS}:packet-capture-agent")),
            extra: Some(extra),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        status: Some(CertificateSigningRequestStatus {
            conditions: Some(conditions),
            certificate: None,
        }),
    }
}

/// Runs [`settle`] on `csr` while the test answers its API requests; the
/// returned handle ends once it has settled.
fn spawn_settle(csr: &CertificateSigningRequest) -> (ApiServer, tokio::task::JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair();
    let client = Client::new(service, "default");
    let authority = pki::next_authority(
        None,
        "packet-capture-ca",
        SystemTime::now(),
        &Lifetimes::default(),
    )
    .unwrap();
    let csr = csr.clone();
    let task = tokio::spawn(async move { settle(&client, &settings(), &authority, csr).await });
    (ApiServer::new(handle), task)
}

/// Answers the controller's reads of the requesting pod and of its node.
async fn answer_checks(api: &mut ApiServer, pod: &Pod) {
    let pod_path = format!("/api/v1/namespaces/{NS}/pods/{}", pod.name_any());
    api.answer("GET", &pod_path, 200, |_| json!(pod)).await;
    let node_path = format!("/api/v1/nodes/{NODE}");
    api.answer("GET", &node_path, 200, |_| json!(node(NODE, NODE_IP)))
        .await;
}

/// Answers a write of the request's `subresource` with the request as the
/// write leaves it; returns the status written.
async fn answer_write(
    api: &mut ApiServer,
    csr: &CertificateSigningRequest,
    subresource: &str,
    status: u16,
) -> Value {
    let path = format!("{REQUESTS}/{}/{subresource}", csr.name_any());
    let seen = api
        .answer("PATCH", &path, status, |seen| {
            if status != 200 {
                return api_error(status, "Timeout");
            }
            let mut written = json!(csr);
            written["status"] = seen.body["status"].clone();
            written
        })
        .await;
    support::apiserver::assert_applied_by_controller(&seen);
    seen.body["status"].clone()
}

/// The API server's answer to a request that failed with `code`.
fn api_error(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code})
}

/// Answers the controller's read of the request with `now`, what it is now.
async fn answer_read(api: &mut ApiServer, now: &CertificateSigningRequest) {
    let path = format!("{REQUESTS}/{}", now.name_any());
    api.answer("GET", &path, 200, |_| json!(now)).await;
}

/// The names of the certificate in a written status.
fn certificate_names(status: &Value) -> Vec<Name> {
    let encoded: ByteString = serde_json::from_value(status["certificate"].clone()).unwrap();
    let pem = String::from_utf8(encoded.0).unwrap();
    pki::inspect(&pem).unwrap().names
}

fn condition_types(status: &Value) -> Vec<&str> {
    status["conditions"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["type"].as_str()).collect())
        .unwrap_or_default()
}

async fn settled(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("settle made a request nobody answered")
        .unwrap();
}

fn signed_names() -> Vec<Name> {
    let mut names = vec![Name::Dns(NODE.into()), Name::Ip(NODE_IP.parse().unwrap())];
    names.sort();
    names
}

#[tokio::test]
async fn an_approved_request_left_unsigned_is_signed_without_a_second_approval() {
    let pod = agent_pod(NODE, NODE_IP);
    let csr = request(&pod, &["Approved"]);
    let (mut api, task) = spawn_settle(&csr);
    // An approved request may be older than the controller's own signature:
    // it is read again first.
    answer_read(&mut api, &csr).await;
    answer_checks(&mut api, &pod).await;
    let status = answer_write(&mut api, &csr, "status", 200).await;
    assert_eq!(certificate_names(&status), signed_names());
    assert_eq!(condition_types(&status), Vec::<&str>::new());
    settled(task).await;
}

#[tokio::test]
async fn an_approved_request_that_fails_the_checks_is_failed_not_denied() {
    let pod = agent_pod(NODE, NODE_IP);
    let mut replaced = pod.clone();
    replaced.metadata.uid = Some("another-uid".into());
    let csr = request(&pod, &["Approved"]);
    let (mut api, task) = spawn_settle(&csr);
    answer_read(&mut api, &csr).await;
    answer_checks(&mut api, &replaced).await;
    let status = answer_write(&mut api, &csr, "status", 200).await;
    assert_eq!(condition_types(&status), ["Failed"]);
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("has been replaced"),
        "{status}"
    );
    assert_eq!(status["certificate"], Value::Null);
    settled(task).await;
}

#[tokio::test]
async fn a_decision_cut_short_by_an_api_error_is_made_again() {
    let pod = agent_pod(NODE, NODE_IP);
    let csr = request(&pod, &[]);
    let (mut api, task) = spawn_settle(&csr);
    answer_checks(&mut api, &pod).await;
    answer_write(&mut api, &csr, "approval", 504).await;
    // Read again, still undecided: checked and written again.
    answer_read(&mut api, &csr).await;
    answer_checks(&mut api, &pod).await;
    let approval = answer_write(&mut api, &csr, "approval", 200).await;
    assert_eq!(condition_types(&approval), ["Approved"]);
    let status = answer_write(&mut api, &csr, "status", 200).await;
    assert_eq!(certificate_names(&status), signed_names());
    settled(task).await;
}

#[tokio::test]
async fn a_request_deleted_or_decided_meanwhile_is_left_alone() {
    let pod = agent_pod(NODE, NODE_IP);
    let csr = request(&pod, &[]);
    let path = format!("{REQUESTS}/{}", csr.name_any());
    for now in [None, Some(request(&pod, &["Denied"]))] {
        let (mut api, task) = spawn_settle(&csr);
        answer_checks(&mut api, &pod).await;
        answer_write(&mut api, &csr, "approval", 500).await;
        match &now {
            Some(decided) => answer_read(&mut api, decided).await,
            None => {
                api.answer("GET", &path, 404, |_| api_error(404, "NotFound"))
                    .await;
            }
        }
        settled(task).await;
    }
}
