//! The validating admission webhook (`POST /validate`, HTTPS).
//!
//! It applies what the CRD schema checks plus what a schema cannot: the
//! `filter` compiles with libpcap, the namespaces of `podSelector.pods`
//! exist, and the requesting user may `get` pods in each of them (a
//! SubjectAccessReview), so a capture cannot reach traffic its creator cannot
//! see. Every message names its field. The certificate it presents is
//! whatever [`ServingCert`] holds at the handshake; `certs` keeps it there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, Client};
use packet_capture_common::crd::{PacketCaptureConfig, PacketCaptureConfigSpec};
use packet_capture_common::validate::CaptureLimits;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// What is wrong with a spec on its own: the common validation and the
/// filter (compiled off the async threads, within a time limit; names
/// refused before libpcap sees them).
pub async fn spec_problems(spec: &PacketCaptureConfigSpec, limits: &CaptureLimits) -> Vec<String> {
    let checks = [
        spec.validate(),
        limits.check("spec", spec.duration.into(), spec.max_packets.into()),
    ];
    let mut problems: Vec<String> = checks
        .iter()
        .filter_map(|c| c.as_ref().err())
        .flat_map(|errors| errors.0.iter().map(ToString::to_string))
        .collect();
    if !spec.filter.trim().is_empty()
        && !problems.iter().any(|p| p.starts_with("spec.filter"))
        && let Err(e) = packet_capture_common::filter::compile_async(&spec.filter).await
    {
        problems.push(format!(
            "spec.filter: {:?} is not a valid tcpdump filter: {e}",
            spec.filter
        ));
    }
    problems
}

/// The namespaces of `podSelector.pods`, each with its first index.
fn target_namespaces(spec: &PacketCaptureConfigSpec) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (i, pod) in spec
        .pod_selector
        .iter()
        .flat_map(|s| s.pods.iter())
        .enumerate()
    {
        out.entry(pod.namespace.clone()).or_insert(i);
    }
    out
}

/// Namespaces that do not exist, or whose pods `user` may not get.
pub async fn namespace_problems(
    client: &Client,
    spec: &PacketCaptureConfigSpec,
    user: &UserInfo,
) -> Vec<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let who = user.username.as_deref().unwrap_or("(anonymous)");
    let mut problems = Vec::new();
    for (ns, i) in target_namespaces(spec) {
        let field = format!("spec.podSelector.pods[{i}].namespace");
        match namespaces.get_opt(&ns).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                problems.push(format!("{field}: namespace {ns:?} does not exist"));
                continue;
            }
            Err(e) => {
                problems.push(format!("{field}: could not look up namespace {ns:?}: {e}"));
                continue;
            }
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.clone()),
                    verb: Some("get".into()),
                    group: Some(String::new()),
                    resource: Some("pods".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match reviews.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => problems.push(format!(
                "{field}: user {who:?} may not get pods in namespace {ns:?}, so may not capture their traffic"
            )),
            Err(e) => problems.push(format!(
                "{field}: could not check whether user {who:?} may get pods in namespace {ns:?}: {e}"
            )),
        }
    }
    problems
}

/// Everything wrong with an admission request's object.
pub async fn review_problems(
    client: &Client,
    limits: &CaptureLimits,
    req: &AdmissionRequest<DynamicObject>,
) -> Vec<String> {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Vec::new();
    }
    let Some(obj) = &req.object else {
        return vec!["object: missing from the admission request".into()];
    };
    let pcc: PacketCaptureConfig = match serde_json::to_value(obj).and_then(serde_json::from_value)
    {
        Ok(p) => p,
        Err(e) => return vec![format!("spec: {e}")],
    };
    let mut problems = spec_problems(&pcc.spec, limits).await;
    problems.extend(namespace_problems(client, &pcc.spec, &req.user_info).await);
    problems
}

/// Answers one AdmissionReview.
pub async fn review(
    client: &Client,
    limits: &CaptureLimits,
    review: AdmissionReview<DynamicObject>,
) -> AdmissionReview<DynamicObject> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let problems = review_problems(client, limits, &req).await;
    let resp = AdmissionResponse::from(&req);
    if problems.is_empty() {
        resp.into_review()
    } else {
        tracing::info!(name = %req.name, "rejected: {}", problems.join("; "));
        resp.deny(problems.join("; ")).into_review()
    }
}

async fn validate(
    State((client, limits)): State<(Client, CaptureLimits)>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(review(&client, &limits, body).await)
}

pub fn router(client: Client, limits: CaptureLimits) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .with_state((client, limits))
}

/// The certificate the webhook presents. Empty until a source (see
/// `certs`) provides one: a TLS handshake before that fails, which the API
/// server counts as a failed call (the webhook's `failurePolicy` decides).
#[derive(Debug, Default)]
pub struct ServingCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ServingCert {
    /// Presents `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(key));
    }

    pub fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The key to present from `tls.crt` (the certificate, then any chain) and
/// `tls.key`, both PEM; refused when the key is not the certificate's (as a
/// Secret volume caught between two versions can have it).
pub fn certified_key(crt: &[u8], key: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt: no certificate in it".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key: {e}"))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| format!("tls.crt and tls.key: {e}"))
}

/// Connections the webhook serves at once (the API server keeps a few open);
/// more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// A client has this long for its TLS handshake, and then for each request
/// head, so idle or slow connections do not hold a slot for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound webhook server.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
}

impl WebhookServer {
    /// Binds `addr`; the certificate comes from `certs` at each handshake.
    pub async fn bind(
        addr: SocketAddr,
        certs: Arc<ServingCert>,
        client: Client,
        limits: CaptureLimits,
    ) -> Result<Self> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate {
            what: "TLS configuration".into(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(certs);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Serve {
                what: "webhook",
                source,
            })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            router: router(client, limits),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the process ends.
    pub async fn run(self) -> Result<()> {
        tracing::info!(
            "webhook on https://{}/validate",
            self.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // The semaphore is never closed.
            let slot = slots.clone().acquire_owned().await.ok();
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather
                    // than spin on the error.
                    tracing::warn!("webhook accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let service = TowerToHyperService::new(self.router.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "webhook TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake: not done within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                };
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, "webhook connection: {e}");
                }
                drop(slot);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_presented_only_when_the_key_is_the_certificates() {
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let ca = crate::pki::new_ca("test-ca", now, day).unwrap();
        let names = ["webhook.example".parse().unwrap()];
        let a = crate::pki::issue(&ca, &names, now, day).unwrap();
        let b = crate::pki::issue(&ca, &names, now, day).unwrap();
        let slot = ServingCert::default();
        assert!(!slot.is_set());
        slot.set(certified_key(a.cert.as_bytes(), a.key.as_bytes()).unwrap());
        assert!(slot.is_set());
        let err = certified_key(a.cert.as_bytes(), b.key.as_bytes()).unwrap_err();
        assert!(err.starts_with("tls.crt and tls.key: "), "{err}");
        let err = certified_key(b"", a.key.as_bytes()).unwrap_err();
        assert_eq!(err, "tls.crt: no certificate in it");
    }

    #[tokio::test]
    async fn libpcap_judges_the_filter() {
        // (filter, the problem or its start)
        for (filter, want) in [
            ("tcp port 5432", None),
            ("ip proto \\tcp and host 10.0.0.1", None),
            (
                "tcp and (port 80",
                Some("spec.filter: \"tcp and (port 80\" is not a valid tcpdump filter: "),
            ),
            (
                "host db.example.com",
                Some(
                    "spec.filter: \"host db.example.com\" is not a valid tcpdump filter: \"db.example.com\" is a host name, \
                     which libpcap would resolve (DNS, /etc/hosts): use an IP address or a CIDR",
                ),
            ),
            (
                "tcp port 80 or http",
                Some(
                    "spec.filter: \"tcp port 80 or http\" is not a valid tcpdump filter: \"http\" is a service name, \
                     which libpcap would look up in /etc/services: use the port number",
                ),
            ),
        ] {
            let spec = PacketCaptureConfigSpec {
                target_ips: vec!["10.0.0.1".into()],
                filter: filter.into(),
                ..Default::default()
            };
            let p = spec_problems(&spec, &CaptureLimits::default()).await;
            match want {
                None => assert!(p.is_empty(), "{filter:?}: {p:?}"),
                Some(want) => assert!(p.len() == 1 && p[0].starts_with(want), "{filter:?}: {p:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_common_validation_applies() {
        let spec = PacketCaptureConfigSpec {
            target_ips: vec!["10.0.0.300".into()],
            duration: 0,
            ..Default::default()
        };
        let p = spec_problems(&spec, &CaptureLimits::default()).await;
        assert!(p[0].starts_with("spec.targetIPs[0]"), "{p:?}");
        assert_eq!(p[1], "spec.duration: must be at least 1, got 0");
    }
}
