//! The admission webhooks (HTTPS): `POST /mutate` and `POST /validate`.
//!
//! The mutating one records who asked for a capture: the annotation
//! [`REQUESTED_BY`] becomes the requesting user on a create or a change of
//! the spec, and stays what it was on any other update.
//!
//! The validating one applies what the CRD schema checks plus what a schema
//! cannot: the `filter` compiles with libpcap, the namespaces of
//! `podSelector.pods` exist, the requesting user may capture every target
//! ([`access`]: SubjectAccessReviews for the verb `capture` on pods), and
//! has fewer than `MAX_CAPTURES_PER_REQUESTER` other captures that have not
//! ended, on create and on an update that changes the spec. Every message
//! names its field; who was allowed what is logged and published as an
//! Event on the capture. The certificate both present is whatever
//! [`ServingCert`] holds at the handshake; `certs` keeps it there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt as _};
use packet_capture_common::crd::{
    AUTHORIZED_IN, PacketCaptureConfig, PacketCaptureConfigSpec, REQUESTED_BY,
};
use packet_capture_common::filter::FilterError;
use packet_capture_common::tls;
pub use packet_capture_common::tls::{ServingCert, certified_key};
use packet_capture_common::validate::CaptureLimits;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::access;
use crate::error::{Error, Result};
use crate::events::Events;

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
        problems.push(match e {
            // Nothing is known of this filter: the request may come again.
            FilterError::Busy(_) => format!("spec.filter: could not be checked now: {e}"),
            e => format!(
                "spec.filter: {:?} is not a valid tcpdump filter: {e}",
                spec.filter
            ),
        });
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

/// Namespaces of `podSelector.pods` that do not exist.
async fn missing_namespaces(client: &Client, spec: &PacketCaptureConfigSpec) -> Vec<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut problems = Vec::new();
    for (ns, i) in target_namespaces(spec) {
        let field = format!("spec.podSelector.pods[{i}].namespace");
        match namespaces.get_opt(&ns).await {
            Ok(Some(_)) => {}
            Ok(None) => problems.push(format!("{field}: namespace {ns:?} does not exist")),
            Err(e) => problems.push(format!("{field}: could not look up namespace {ns:?}: {e}")),
        }
    }
    problems
}

/// The webhook's checks, with what they need: the API server, the
/// cluster's limits, and where to record who was allowed what.
#[derive(Clone)]
pub struct Admission {
    client: Client,
    limits: CaptureLimits,
    /// Captures one requester may have that have not ended; 0: no limit.
    max_per_requester: u32,
    events: Arc<Events>,
}

/// Whether `spec` names targets whose meaning may change while it runs, so
/// that where its requester may capture is worth recording: an address in
/// `targetIPs` may pass to another pod, and a named pod may be recreated on
/// its node's network.
fn follows_what_may_change(spec: &PacketCaptureConfigSpec) -> bool {
    !spec.target_ips.is_empty()
        || spec
            .pod_selector
            .as_ref()
            .is_some_and(|s| !s.pods.is_empty())
}

/// Whether `req` asks for a capture: a create, or an update that changes
/// the spec (anything else captures nothing new).
fn asks_for_capture(req: &AdmissionRequest<DynamicObject>) -> bool {
    let spec = |o: &DynamicObject| o.data.get("spec").cloned();
    match req.operation {
        Operation::Create => true,
        Operation::Update => req.object.as_ref().map(spec) != req.old_object.as_ref().map(spec),
        _ => false,
    }
}

/// The value of `obj`'s annotation `key`, if any.
fn annotation<'o>(obj: &'o DynamicObject, key: &str) -> Option<&'o str> {
    obj.annotations().get(key).map(String::as_str)
}

/// The JSON patch that makes each annotation `key` of `obj` the value
/// wanted (removed for `None`); `None` when all already are.
fn annotations_patch(
    obj: &DynamicObject,
    wants: &[(&str, Option<&str>)],
) -> Option<json_patch::Patch> {
    let mut has_annotations = obj.metadata.annotations.is_some();
    let mut ops = Vec::new();
    for &(key, want) in wants {
        if annotation(obj, key) == want {
            continue;
        }
        // JSON pointer escapes: `~` as `~0`, `/` as `~1`.
        let path = format!(
            "/metadata/annotations/{}",
            key.replace('~', "~0").replace('/', "~1")
        );
        ops.push(match want {
            None => json!({"op": "remove", "path": path}),
            Some(value) if has_annotations => json!({"op": "add", "path": path, "value": value}),
            Some(value) => {
                has_annotations = true;
                json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}})
            }
        });
    }
    (!ops.is_empty()).then(|| serde_json::from_value(json!(ops)).expect("a JSON patch"))
}

/// What the webhook found about one request.
#[derive(Debug, Default)]
pub struct Findings {
    /// Everything wrong, each naming its field; empty when allowed.
    pub problems: Vec<String>,
    /// The targets' verdict, when they were checked (a create, or an
    /// update that changes the spec).
    pub access: Option<access::Verdict>,
}

impl Admission {
    /// Events are reported by `identity` (this replica). No limit per
    /// requester until [`Self::with_max_per_requester`].
    pub fn new(client: Client, limits: CaptureLimits, identity: String) -> Self {
        Self {
            events: Arc::new(Events::new(client.clone(), identity)),
            client,
            limits,
            max_per_requester: 0,
        }
    }

    /// At most `max` captures per requester that have not ended (0: no
    /// limit).
    pub fn with_max_per_requester(self, max: u32) -> Self {
        Self {
            max_per_requester: max,
            ..self
        }
    }

    /// Answers one mutating AdmissionReview. When it asks for a capture,
    /// the requesting user becomes the capture's requester, and where they
    /// may capture is recorded for its `targetIPs` and named pods
    /// ([`AUTHORIZED_IN`]; none without either). Any other update keeps
    /// what the capture had (an edit of either annotation is undone). It
    /// refuses only what it cannot find out now (an API error), which
    /// asking again may overcome; whether the targets are allowed is the
    /// validating webhook's to say.
    pub async fn mutate(
        &self,
        review: AdmissionReview<DynamicObject>,
    ) -> AdmissionReview<DynamicObject> {
        let req: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
        };
        let resp = AdmissionResponse::from(&req);
        let Some(obj) = &req.object else {
            return resp.into_review();
        };
        let (requester, authorized) = if asks_for_capture(&req) {
            let authorized = match parse(obj) {
                Ok(pcc) if follows_what_may_change(&pcc.spec) => {
                    match access::authorized_in(&self.client, &pcc.spec, &req.user_info).await {
                        Ok(granted) => Some(granted.to_string()),
                        Err(e) => {
                            return resp
                                .deny(format!(
                                    "metadata.annotations[{AUTHORIZED_IN}]: could not find out where the requester may capture: {e}"
                                ))
                                .into_review();
                        }
                    }
                }
                // Pods selected by labels are never host-network ones; a
                // spec that does not parse is refused by the validating
                // webhook.
                _ => None,
            };
            (req.user_info.username.clone(), authorized)
        } else {
            let old = req.old_object.as_ref();
            let kept = |key| old.and_then(|o| annotation(o, key)).map(String::from);
            (kept(REQUESTED_BY), kept(AUTHORIZED_IN))
        };
        let wants = [
            (REQUESTED_BY, requester.as_deref()),
            (AUTHORIZED_IN, authorized.as_deref()),
        ];
        match annotations_patch(obj, &wants) {
            None => resp.into_review(),
            Some(patch) => match resp.with_patch(patch) {
                Ok(r) => r.into_review(),
                Err(e) => AdmissionResponse::invalid(e.to_string()).into_review(),
            },
        }
    }

    /// Why `user` may not ask for one more capture than `name`: they have
    /// `max_per_requester` others that have not ended.
    async fn requester_problem(&self, user: &str, name: &str) -> Option<String> {
        let max = self.max_per_requester as usize;
        if max == 0 {
            return None;
        }
        let api: Api<PacketCaptureConfig> = Api::all(self.client.clone());
        let all = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                return Some(format!(
                    "metadata.annotations[{REQUESTED_BY}]: could not count the captures of {user:?}: {e}"
                ));
            }
        };
        let open: Vec<String> = all
            .iter()
            .filter(|p| {
                p.name_any() != name
                    && p.metadata.deletion_timestamp.is_none()
                    && p.annotations().get(REQUESTED_BY).map(String::as_str) == Some(user)
                    && !p
                        .status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(|ph| ph.is_final())
            })
            .map(|p| p.name_any())
            .collect();
        if open.len() < max {
            return None;
        }
        const SHOWN: usize = 5;
        let mut names = open[..open.len().min(SHOWN)].join(", ");
        if open.len() > SHOWN {
            names.push_str(&format!(" and {} more", open.len() - SHOWN));
        }
        Some(format!(
            "metadata.annotations[{REQUESTED_BY}]: user {user:?} already has {} captures that \
             have not ended ({names}), the most one requester may have \
             (MAX_CAPTURES_PER_REQUESTER={max}); delete one or wait for one to end",
            open.len()
        ))
    }

    /// Everything wrong with an admission request's object. A spec that is
    /// wrong on its own is not looked into further. An update that leaves
    /// the spec as it was captures nothing new and is not checked again
    /// (the controller's own updates, labels, finalizers, the stop
    /// annotation): a spec admitted under earlier limits, or while the
    /// webhook was off, must not keep its object from being stopped or its
    /// finalizer from being removed.
    pub async fn findings(&self, req: &AdmissionRequest<DynamicObject>) -> Findings {
        let mut found = Findings::default();
        if !asks_for_capture(req) {
            return found;
        }
        let Some(pcc) = &req.object else {
            found
                .problems
                .push("object: missing from the admission request".into());
            return found;
        };
        let pcc = match parse(pcc) {
            Ok(p) => p,
            Err(e) => {
                found.problems.push(e);
                return found;
            }
        };
        found.problems = spec_problems(&pcc.spec, &self.limits).await;
        if !found.problems.is_empty() {
            return found;
        }
        // The mutating webhook recorded the requester; a capture whose
        // annotation names someone else would be counted against them.
        let user = req.user_info.username.as_deref().unwrap_or_default();
        let recorded = pcc.annotations().get(REQUESTED_BY).map(String::as_str);
        if recorded != Some(user) {
            let recorded = recorded.map_or("missing".into(), |r| format!("{r:?}"));
            found.problems.push(format!(
                "metadata.annotations[{REQUESTED_BY}]: is {recorded}, not the requesting user \
                 {user:?}; the mutating webhook sets it (is the MutatingWebhookConfiguration \
                 packet-capture-webhook registered?)"
            ));
            return found;
        }
        found.problems = missing_namespaces(&self.client, &pcc.spec).await;
        found
            .problems
            .extend(self.requester_problem(user, &pcc.name_any()).await);
        let verdict = match access::authorize(&self.client, &pcc.spec, &req.user_info).await {
            Ok((_, v)) => v,
            Err(e) => {
                found.problems.push(format!("spec: {e}"));
                return found;
            }
        };
        found.problems.extend(verdict.problems.iter().cloned());
        found.access = Some(verdict);
        found
    }

    /// Answers one AdmissionReview. An allowed capture whose targets were
    /// checked gets an Event saying who was allowed to capture what (not
    /// for dry runs), published without holding up the answer.
    pub async fn review(
        &self,
        review: AdmissionReview<DynamicObject>,
    ) -> AdmissionReview<DynamicObject> {
        let req: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
        };
        let found = self.findings(&req).await;
        let resp = AdmissionResponse::from(&req);
        if !found.problems.is_empty() {
            tracing::info!(name = %req.name, "rejected: {}", found.problems.join("; "));
            return resp.deny(found.problems.join("; ")).into_review();
        }
        if let (Some(verdict), Some(obj), false) = (&found.access, &req.object, req.dry_run)
            && let Ok(pcc) = parse(obj)
        {
            let who = req
                .user_info
                .username
                .clone()
                .unwrap_or_else(|| "(anonymous)".into());
            let scopes: Vec<String> = verdict.granted.iter().map(ToString::to_string).collect();
            let note = format!(
                "user {who:?} may capture pods in {}, which covers every target",
                scopes.join(", ")
            );
            tracing::info!(name = %req.name, "{note}");
            let events = self.events.clone();
            tokio::spawn(async move {
                events
                    .publish(&pcc, None, EventType::Normal, "TargetsAuthorized", note)
                    .await;
            });
        }
        resp.into_review()
    }
}

/// The capture `obj` holds, or what is wrong with it, naming the field
/// (`spec.duration: invalid value: …`).
fn parse(obj: &DynamicObject) -> std::result::Result<PacketCaptureConfig, String> {
    let value = serde_json::to_value(obj).map_err(|e| format!("object: {e}"))?;
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

async fn validate(
    State(admission): State<Admission>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(admission.review(body).await)
}

async fn mutate(
    State(admission): State<Admission>,
    Json(body): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    Json(admission.mutate(body).await)
}

pub fn router(admission: Admission) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .with_state(admission)
}

/// Connections the webhook serves at once (the API server keeps a few open);
/// more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// A client has this long for its TLS handshake, and then for each request
/// head, so idle or slow connections do not hold a slot for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CAs whose client certificates the server accepts, and the names
/// such a certificate may carry: the API server's front proxy, which calls
/// the aggregated API as a client of these CAs and says who the user is in
/// headers (only a connection it made may be believed).
#[derive(Debug, Clone)]
pub struct ClientCas {
    pub roots: Arc<rustls::RootCertStore>,
    /// Common names accepted; empty: any certificate the CAs signed.
    pub allowed_names: Vec<String>,
}

/// In each request's extensions: the common name of the client certificate
/// of its connection, when [`ClientCas`] signed it and allows the name.
#[derive(Debug, Clone, Default)]
pub struct VerifiedClient(pub Option<String>);

/// The bound HTTPS server of the webhooks and the aggregated API.
pub struct WebhookServer {
    listener: TcpListener,
    certs: Arc<ServingCert>,
    router: Router,
    clients: watch::Receiver<Option<ClientCas>>,
}

impl WebhookServer {
    /// Binds `addr`; the certificate comes from `certs` at each handshake,
    /// client certificates are checked against what `clients` holds then.
    pub async fn bind(
        addr: SocketAddr,
        certs: Arc<ServingCert>,
        router: Router,
        clients: watch::Receiver<Option<ClientCas>>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Serve {
                what: "webhook",
                source,
            })?;
        Ok(Self {
            listener,
            certs,
            router,
            clients,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    fn acceptor(&self, clients: Option<&ClientCas>) -> Result<TlsAcceptor> {
        let config = tls::server_config(
            self.certs.clone(),
            &[b"http/1.1"],
            clients.map(|c| c.roots.clone()),
        )
        .map_err(|e| Error::Certificate {
            what: "TLS configuration".into(),
            message: e.to_string(),
        })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Serves until the process ends.
    pub async fn run(mut self) -> Result<()> {
        tracing::info!(
            "webhook on https://{}/validate and /mutate",
            self.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut clients = self.clients.borrow_and_update().clone();
        let mut acceptor = self.acceptor(clients.as_ref())?;
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
            if self.clients.has_changed().unwrap_or(false) {
                clients = self.clients.borrow_and_update().clone();
                acceptor = self.acceptor(clients.as_ref())?;
            }
            let (acceptor, clients, router) =
                (acceptor.clone(), clients.clone(), self.router.clone());
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
                let verified = VerifiedClient(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|cert| common_name(cert))
                        .filter(|name| {
                            clients.as_ref().is_some_and(|c| {
                                c.allowed_names.is_empty() || c.allowed_names.contains(name)
                            })
                        }),
                );
                let service = TowerToHyperService::new(router.map_request(
                    move |mut req: http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(verified.clone());
                        req
                    },
                ));
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

/// The subject common name of a DER certificate.
fn common_name(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(name)
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
