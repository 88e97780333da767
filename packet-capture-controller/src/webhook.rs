//! The validating admission webhook (`POST /validate`, HTTPS).
//!
//! It applies what the CRD schema checks plus what a schema cannot: the
//! `filter` compiles with libpcap, the namespaces of `podSelector.pods`
//! exist, and the requesting user may `get` pods in each of them (a
//! SubjectAccessReview), so a capture cannot reach traffic its creator cannot
//! see. Every message names its field. The certificate (`tls.crt`,
//! `tls.key`, e.g. a cert-manager Secret mounted as a volume) is reloaded
//! when its files change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// What is wrong with a spec on its own: the common validation and the filter.
pub fn spec_problems(spec: &PacketCaptureConfigSpec) -> Vec<String> {
    let mut problems: Vec<String> = match spec.validate() {
        Ok(()) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    };
    if !spec.filter.trim().is_empty()
        && !problems.iter().any(|p| p.starts_with("spec.filter"))
        && let Err(e) = packet_capture_common::filter::compile(&spec.filter)
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
    let mut problems = spec_problems(&pcc.spec);
    problems.extend(namespace_problems(client, &pcc.spec, &req.user_info).await);
    problems
}

/// Answers one AdmissionReview.
pub async fn review(
    client: &Client,
    review: AdmissionReview<DynamicObject>,
) -> AdmissionReview<DynamicObject> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let problems = review_problems(client, &req).await;
    let resp = AdmissionResponse::from(&req);
    if problems.is_empty() {
        resp.into_review()
    } else {
        tracing::info!(name = %req.name, "rejected: {}", problems.join("; "));
        resp.deny(problems.join("; ")).into_review()
    }
}

async fn validate(
    State(client): State<Client>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(review(&client, body).await)
}

pub fn router(client: Client) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .with_state(client)
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

/// The webhook's certificate, re-read when `tls.crt` or `tls.key` change.
#[derive(Debug)]
pub struct CertReloader {
    dir: PathBuf,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

impl CertReloader {
    /// Loads the certificate; fails if it cannot be read.
    pub fn load(dir: &Path) -> Result<Self> {
        let stamp = Self::stamp(dir);
        let key = Self::read(dir).map_err(|message| Error::Certificate {
            dir: dir.to_path_buf(),
            message,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            current: Mutex::new((stamp, Arc::new(key))),
        })
    }

    fn stamp(dir: &Path) -> Stamp {
        let m = |f: &str| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        };
        (m("tls.crt"), m("tls.key"))
    }

    fn read(dir: &Path) -> Result<CertifiedKey, String> {
        let crt = std::fs::read(dir.join("tls.crt")).map_err(|e| format!("tls.crt: {e}"))?;
        let key = std::fs::read(dir.join("tls.key")).map_err(|e| format!("tls.key: {e}"))?;
        let chain = CertificateDer::pem_slice_iter(&crt)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("tls.crt: {e}"))?;
        if chain.is_empty() {
            return Err("tls.crt: no certificate in the file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("tls.key: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("tls.key: {e}"))?;
        Ok(CertifiedKey::new(chain, signer))
    }

    /// The certificate to present, reloading it first if its files changed
    /// (a broken new certificate is reported and the old one kept).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = Self::stamp(&self.dir);
        if stamp != current.0 {
            match Self::read(&self.dir) {
                Ok(key) => {
                    tracing::info!(dir = %self.dir.display(), "webhook certificate reloaded");
                    *current = (stamp, Arc::new(key));
                }
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "keeping the old webhook certificate: {e}");
                    current.0 = stamp;
                }
            }
        }
        current.1.clone()
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The bound webhook server.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
}

impl WebhookServer {
    /// Loads the certificate from `cert_dir` and binds `addr`.
    pub async fn bind(addr: SocketAddr, cert_dir: &Path, client: Client) -> Result<Self> {
        let certs = Arc::new(CertReloader::load(cert_dir)?);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate {
            dir: cert_dir.to_path_buf(),
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
            router: router(client),
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
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("webhook accept: {e}");
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let service = TowerToHyperService::new(self.router.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, "webhook TLS handshake: {e}");
                        return;
                    }
                };
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, "webhook connection: {e}");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpcap_judges_the_filter() {
        let spec = PacketCaptureConfigSpec {
            target_ips: vec!["10.0.0.1".into()],
            filter: "tcp and (port 80".into(),
            ..Default::default()
        };
        let p = spec_problems(&spec);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("spec.filter: \"tcp and (port 80\" is not a valid tcpdump filter"),
            "{p:?}"
        );
    }

    #[test]
    fn the_common_validation_applies() {
        let spec = PacketCaptureConfigSpec {
            target_ips: vec!["10.0.0.300".into()],
            duration: 0,
            ..Default::default()
        };
        let p = spec_problems(&spec);
        assert!(p[0].starts_with("spec.targetIPs[0]"), "{p:?}");
        assert_eq!(p[1], "spec.duration: must be at least 1, got 0");
    }
}
