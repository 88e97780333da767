//! The API over TLS with a certificate from files: REST and gRPC verify the
//! agent's certificate with its CA, plain HTTP to the port gets no answer,
//! and the `health` subcommand (the probes) speaks TLS. Without a
//! certificate the port stays closed.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use packet_capture_proto::v1 as pb;
use packet_capture_test_support::cluster::{AgentOptions, Cluster};
use packet_capture_test_support::privileged;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

use crate::common::{AGENT, Node};

/// A CA (PEM) and a serving certificate and key it signed for 127.0.0.1
/// and `test-node`, written into `dir` as cert.pem and key.pem.
fn certificates(dir: &std::path::Path) -> String {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["test-node".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    ca_cert.pem()
}

#[tokio::test]
async fn the_api_is_served_over_tls_only() {
    if !privileged("the_api_is_served_over_tls_only") {
        return;
    }
    let node = Node::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let agent = node.agent(
        &[
            "--insecure-no-auth",
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let port = agent.port();
    let url = format!("https://127.0.0.1:{port}");

    // REST, verified with the CA.
    let rest = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .build()
        .unwrap();
    let health: serde_json::Value = rest
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("REST over TLS")
        .json()
        .await
        .unwrap();
    assert_eq!(health["node"], "test-node");
    // A client that does not trust the CA refuses the agent.
    let untrusting = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        untrusting
            .get(format!("{url}/health"))
            .send()
            .await
            .is_err()
    );

    // gRPC, verified with the CA, for the name in the certificate.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name("test-node");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("gRPC over TLS");
    let mut client = pb::agent_client::AgentClient::new(channel);
    let h = client
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.node_name, "test-node");

    // Plain HTTP to the port gets no HTTP answer: the port speaks TLS only.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP answered: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // The probes' subcommand speaks TLS with the same settings.
    let out = node
        .left
        .command(AGENT)
        .args(["--port", &port.to_string(), "--tls-cert-file"])
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("health")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "health: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("test-node"));
    let log = agent.log();
    assert!(!log.contains("INSECURE: --insecure-plaintext"), "{log}");
}

/// An agent that asks the cluster for its certificate opens its port only
/// once it has one: with no controller to sign the request, a client is
/// refused the connection (and tries again), never let in to a handshake
/// that fails.
#[tokio::test]
async fn without_its_certificate_the_port_stays_closed() {
    let Some(cluster) = Cluster::for_test("without_its_certificate_the_port_stays_closed").await
    else {
        return;
    };
    let node = cluster.add_node("nocert").await.unwrap();
    let mut agent = node
        .launch_agent(&AgentOptions::new(AGENT))
        .await
        .expect("the agent on a simulated node");
    agent
        .until_logged(
            "waiting for the serving certificate",
            Duration::from_secs(60),
        )
        .await
        .expect("the agent waiting for its certificate");
    let refused = tokio::net::TcpStream::connect(agent.endpoint())
        .await
        .expect_err("the port is closed without a certificate");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let log = agent.log();
    assert!(!log.contains("listening on"), "{log}");
}
