//! The agent API's TLS: a serving certificate for this node (its name and
//! address in the subject alternative names), kept current while serving.
//!
//! In a cluster the agent makes its own key, which never leaves the
//! process, and asks for a certificate with a CertificateSigningRequest for
//! the signer [`AGENT_SIGNER`]; the controller signs it with the chart's CA
//! once it has checked that the request comes from the agent pod of that
//! node. A new key and certificate are requested two thirds into the
//! certificate's life. Outside a cluster, or with a certificate of your
//! own, `--tls-cert-file`/`--tls-key-file` name PEM files, read again when
//! they change.

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, ResourceExt as _};
use packet_capture_common::crd::AGENT_SIGNER;
use packet_capture_common::tls::{ServingCert, certified_key};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::sign::CertifiedKey;

/// How long a certificate the agent asks for is valid (the signer may
/// shorten it).
pub const REQUESTED_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the agent waits for its request to be signed before it asks
/// again.
pub const SIGNING_WAIT: Duration = Duration::from_secs(120);
/// How often a request still waiting is read again: a watch that has
/// stalled (a connection lost without the client noticing) must not leave
/// the agent without a certificate until [`SIGNING_WAIT`] ends.
pub const REREAD: Duration = Duration::from_secs(10);
/// How often certificate files are looked at for a change.
pub const FILE_CHECK: Duration = Duration::from_secs(30);
/// The least time between two renewals: a certificate issued already two
/// thirds into its life (its CA, which caps it, about to expire) would
/// otherwise be asked for again at once, in a loop.
pub const RENEW_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// Where the serving certificate comes from.
pub enum Source {
    /// PEM files, read again when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// CertificateSigningRequests for this node.
    Cluster {
        client: kube::Client,
        node: String,
        addresses: Vec<IpAddr>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Files(String),
    #[error("the certificate signing request {name}: {message}")]
    Request { name: String, message: String },
    #[error("making a key and a request: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A certificate to present and when to replace it.
struct Current {
    key: CertifiedKey,
    renew_at: SystemTime,
}

/// When a certificate's replacement is due: two thirds into its life.
fn renew_at(cert_pem: &[u8]) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let validity = cert.validity();
    let from = validity.not_before.timestamp();
    let to = validity.not_after.timestamp();
    let at = from + (to - from) * 2 / 3;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).ok()?))
}

impl Source {
    /// The serving certificate, at start: an error when there is none yet
    /// to be had (bad files, a request the controller denied).
    async fn fetch(&self) -> Result<Current, TlsError> {
        match self {
            Self::Files { cert, key } => {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(|e| TlsError::Files(format!("{}: {e}", p.display())))
                };
                let (cert_pem, key_pem) = (read(cert)?, read(key)?);
                let key = certified_key(&cert_pem, &key_pem).map_err(TlsError::Files)?;
                Ok(Current {
                    key,
                    renew_at: SystemTime::now() + FILE_CHECK,
                })
            }
            Self::Cluster {
                client,
                node,
                addresses,
            } => request(client, node, addresses).await,
        }
    }
}

/// Asks for a certificate for `node` and `addresses` with a new key, and
/// waits until it is signed (or denied).
async fn request(
    client: &kube::Client,
    node: &str,
    addresses: &[IpAddr],
) -> Result<Current, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node.to_owned()])?;
    params
        .subject_alt_names
        .extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("packet-capture-agent:{node}"));
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?.pem()?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("packet-capture-agent-{node}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr.into_bytes()),
            signer_name: AGENT_SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            expiration_seconds: Some(REQUESTED_LIFETIME.as_secs() as i32),
            ..Default::default()
        },
        status: None,
    };
    let created = api.create(&PostParams::default(), &object).await?;
    let name = created.name_any();
    tracing::info!(
        request = name,
        signer = AGENT_SIGNER,
        "asked for a serving certificate for {node} {addresses:?}"
    );
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    // A watch error (the API server busy, a connection cut) is waited
    // out: only a verdict or the end of SIGNING_WAIT ends the wait, which
    // a new request with a new key would only start again.
    let mut verdicts = std::pin::pin!(
        watcher(api.clone(), config)
            .default_backoff()
            .applied_objects()
            .filter_map(|event| {
                futures::future::ready(match event {
                    Ok(csr) => verdict(&csr).transpose(),
                    Err(e) => {
                        tracing::warn!(request = name, "watching the request: {e}");
                        None
                    }
                })
            })
    );
    let reread = async {
        loop {
            tokio::time::sleep(REREAD).await;
            match api.get(&name).await {
                Ok(csr) => {
                    if let Some(v) = verdict(&csr)? {
                        tracing::warn!(
                            request = name,
                            "the request was decided, and its watch had not said so: read again"
                        );
                        return Ok::<_, TlsError>(Some(v));
                    }
                }
                // The watch may still answer; the next read may too.
                Err(e) => tracing::debug!(request = name, "reading the request: {e}"),
            }
        }
    };
    let signed = async {
        tokio::select! {
            v = verdicts.next() => v.transpose(),
            v = reread => v,
        }
    };
    let cert = match tokio::time::timeout(SIGNING_WAIT, signed).await {
        Ok(Ok(Some(cert))) => cert,
        Ok(Ok(None)) => {
            return Err(TlsError::Request {
                name,
                message: "the watch ended".into(),
            });
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let message = format!(
                "not signed within {SIGNING_WAIT:?}: is the controller running? (kubectl get csr {name})"
            );
            return Err(TlsError::Request { name, message });
        }
    };
    let cert = cert.map_err(|message| TlsError::Request {
        name: name.clone(),
        message,
    })?;
    let certified =
        certified_key(&cert, key.serialize_pem().as_bytes()).map_err(|e| TlsError::Request {
            name: name.clone(),
            message: format!("the signed certificate: {e}"),
        })?;
    let renew = renew_at(&cert).unwrap_or_else(|| SystemTime::now() + REQUESTED_LIFETIME / 3);
    tracing::info!(request = name, "serving certificate signed");
    Ok(Current {
        key: certified,
        renew_at: renew,
    })
}

/// What a request's status says: `None` while pending, else the
/// certificate (PEM) or why there is none.
fn verdict(csr: &CertificateSigningRequest) -> Result<Option<Result<Vec<u8>, String>>, TlsError> {
    let Some(status) = &csr.status else {
        return Ok(None);
    };
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
    {
        let why = c.message.clone().or(c.reason.clone()).unwrap_or_default();
        return Ok(Some(Err(format!("{}: {why}", c.type_.to_lowercase()))));
    }
    Ok(status
        .certificate
        .as_ref()
        .filter(|c| !c.0.is_empty())
        .map(|c| Ok(c.0.clone())))
}

/// When a certificate just put in place is replaced: when it says, but a
/// requested one not before [`RENEW_AT_MOST_EVERY`].
fn next_renewal(files: bool, renew_at: SystemTime, now: SystemTime) -> SystemTime {
    if files {
        renew_at
    } else {
        renew_at.max(now + RENEW_AT_MOST_EVERY)
    }
}

/// Puts a certificate from `source` into `slot`, says so on `first`, and
/// keeps it current: replaced when due (files: when they changed), retried
/// with backoff on failure (before the first one the API is not served;
/// afterwards the one in place serves meanwhile). Returns only when the
/// files are unusable at start, a mistake to report rather than wait out.
pub async fn keep_current(
    source: Source,
    slot: Arc<ServingCert>,
    first: tokio::sync::oneshot::Sender<()>,
) -> Result<Infallible, TlsError> {
    let mut first = Some(first);
    let files = matches!(source, Source::Files { .. });
    let mut due = SystemTime::now();
    let mut stamp = None;
    let mut wait = Duration::from_secs(1);
    loop {
        let until = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(until).await;
        if files && slot.is_set() && file_stamp(&source) == stamp {
            due = SystemTime::now() + FILE_CHECK;
            continue;
        }
        let seen = file_stamp(&source);
        match source.fetch().await {
            Ok(next) => {
                if slot.is_set() {
                    tracing::info!("serving certificate replaced");
                }
                slot.set(next.key);
                if let Some(first) = first.take() {
                    let _ = first.send(());
                }
                due = next_renewal(files, next.renew_at, SystemTime::now());
                stamp = seen;
                wait = Duration::from_secs(1);
            }
            Err(e) if files && !slot.is_set() => return Err(e),
            Err(e) => {
                if slot.is_set() {
                    tracing::warn!(
                        "replacing the serving certificate: {e}; the current one serves meanwhile"
                    );
                } else {
                    tracing::warn!(
                        "no serving certificate yet (the API is served once there is one): {e}"
                    );
                }
                due = SystemTime::now() + wait;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The files' modification times, to see that they changed.
fn file_stamp(source: &Source) -> Option<(SystemTime, SystemTime)> {
    let Source::Files { cert, key } = source else {
        return None;
    };
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

/// The TLS configuration of the agent API: HTTP/2 (gRPC) and HTTP/1.1
/// (REST) on one port.
pub fn server_config(slot: Arc<ServingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    packet_capture_common::tls::server_config(slot, &[b"h2", b"http/1.1"], None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Json;
    use axum::extract::State;
    use axum::http::{StatusCode, Uri};
    use axum::routing::get;
    use serde_json::{Value, json};
    use std::sync::Mutex;

    const REQUESTS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";

    /// The request the agent created, as the API server stores it.
    type Stored = Arc<Mutex<Option<Value>>>;

    async fn create(
        State(stored): State<Stored>,
        Json(mut csr): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        csr["metadata"] = json!({"name": "packet-capture-agent-n1-x", "resourceVersion": "1"});
        *stored.lock().unwrap() = Some(csr.clone());
        (StatusCode::CREATED, Json(csr))
    }

    /// A list shows the request pending; a watch never says anything (a
    /// stalled connection).
    async fn list_or_watch(State(stored): State<Stored>, uri: Uri) -> Json<Value> {
        if uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("watch=")))
        {
            std::future::pending::<()>().await;
        }
        let item = stored.lock().unwrap().clone();
        Json(json!({
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequestList",
            "metadata": {"resourceVersion": "1"},
            "items": [item],
        }))
    }

    /// A read shows it signed by a CA of the test's own.
    async fn read(State(stored): State<Stored>) -> Json<Value> {
        let value = stored.lock().unwrap().clone().expect("created first");
        let mut csr: CertificateSigningRequest = serde_json::from_value(value).unwrap();
        let pem = String::from_utf8(csr.spec.request.0.clone()).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let cert = rcgen::CertificateSigningRequestParams::from_pem(&pem)
            .unwrap()
            .signed_by(&issuer)
            .unwrap();
        csr.status = Some(
            k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus {
                certificate: Some(ByteString(cert.pem().into_bytes())),
                conditions: None,
            },
        );
        Json(serde_json::to_value(csr).unwrap())
    }

    #[test]
    fn a_requested_certificate_already_due_is_not_asked_for_again_at_once() {
        let now = SystemTime::now();
        let past = now - Duration::from_secs(3600);
        let later = now + Duration::from_secs(7200);
        assert_eq!(next_renewal(false, past, now), now + RENEW_AT_MOST_EVERY);
        assert_eq!(next_renewal(false, later, now), later);
        assert_eq!(next_renewal(true, now + FILE_CHECK, now), now + FILE_CHECK);
    }

    #[tokio::test]
    async fn a_signature_its_watch_does_not_report_is_read() {
        let stored = Stored::default();
        let app = axum::Router::new()
            .route(REQUESTS, get(list_or_watch).post(create))
            .route(&format!("{REQUESTS}/{{name}}"), get(read))
            .with_state(stored);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let address: IpAddr = "10.0.0.7".parse().unwrap();
        let source = Source::Cluster {
            client,
            node: "n1".into(),
            addresses: vec![address],
        };
        // Read again after REREAD, well before SIGNING_WAIT.
        let current = tokio::time::timeout(REREAD * 2, source.fetch())
            .await
            .expect("the certificate, read once its watch had said nothing")
            .unwrap();
        assert!(current.renew_at > SystemTime::now());
    }
}
