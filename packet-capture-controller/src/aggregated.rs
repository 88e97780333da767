//! The aggregated API `pcap.packet.io/v1`: a capture's files and its live
//! packets from every node, for users who can reach nothing but the API
//! server (`kubectl pcap`, `kubectl get --raw`).
//!
//! The API server authenticates the user, checks that it may `get`
//! `captures/proxy` of this group (`proxy`: a subresource the API server
//! counts as long-running, so a stream or a large download is not cut at
//! its request timeout of a minute), and relays the
//! request here over TLS as a client of its front-proxy CA, naming the user
//! in headers (`X-Remote-User`, `X-Remote-Group`, `X-Remote-Extra-*`, as its
//! ConfigMap `kube-system/extension-apiserver-authentication` says). Only a
//! connection with such a certificate is believed. The user's own
//! permission then decides: `get` on `packetcaptureconfigs/files` named as
//! the capture (a SubjectAccessReview here, for a clear refusal at once),
//! and each agent asks again for the same user, since the controller calls
//! it as a relay (`packet_capture_common::crd::RELAY_VERB`): the controller's account reads nothing
//! by itself.
//!
//! - `GET captures/{name}/proxy/files`: every node's files of the capture;
//! - `GET captures/{name}/proxy/files/{node}/{file}`: one file, as stored;
//! - `GET captures/{name}/proxy/packets`: one live pcapng stream of what every
//!   node records from now on, interfaces named `node/iface`, until the
//!   capture ends everywhere. A reader slower than the capture loses
//!   packets (counted in `epb_dropcount`), never slowing the capture.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use packet_capture_common::aggregated::{
    CAPTURES, FileEntry, FileList, GROUP, NodeFiles, RELAY, VERSION,
};
use packet_capture_common::crd::{
    CaptureState, FILES_SUBRESOURCE, PLURAL, PacketCaptureConfig, RESOURCE, STREAM_CAPTURE_ID,
};
use packet_capture_common::pcapng;
use packet_capture_common::validate::capture_of;
use packet_capture_common::validators::Validators;
use packet_capture_proto::v1::{DownloadFileRequest, PacketBatch, PacketDirection};
use rustls::pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status, Streaming};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector;

use crate::agents::{AgentEndpoint, AgentPool, AgentTls, PoolSettings, TrustedCas};
use crate::config::Settings;
use crate::issuer::BUNDLE_KEY;
use crate::metrics::Metrics;
use crate::plan::capture_id;
use crate::webhook::{ClientCas, VerifiedClient};

/// Where the API server publishes how it calls aggregated APIs.
const AUTHENTICATION_CONFIG_MAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");
/// Agents asked at once when listing files or opening streams.
const FAN_OUT: usize = 16;
/// Batches of all nodes waiting for a live reader; beyond them the nodes'
/// streams wait, and the agents drop for this reader (and count it).
const MERGE_BATCHES: usize = 64;

/// The headers the API server names the user in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserHeaders {
    pub user: Vec<String>,
    pub uid: Vec<String>,
    pub group: Vec<String>,
    pub extra_prefix: Vec<String>,
}

impl UserHeaders {
    /// The user a request is for: the first user header present; its uid,
    /// groups and extras. The API server writes names as they are, UTF-8
    /// beyond ASCII too.
    fn user(&self, headers: &HeaderMap) -> Option<UserInfo> {
        let text =
            |v: &http::HeaderValue| std::str::from_utf8(v.as_bytes()).ok().map(str::to_owned);
        let first = |names: &[String]| {
            names
                .iter()
                .find_map(|h| headers.get(h.as_str()).and_then(text))
                .filter(|v| !v.is_empty())
        };
        let username = first(&self.user)?;
        let groups = self
            .group
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter().filter_map(text))
            .collect();
        let mut extra = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (name, value) in headers {
            let name = name.as_str();
            for prefix in &self.extra_prefix {
                let prefix = prefix.to_ascii_lowercase();
                if let Some(key) = name.strip_prefix(&prefix)
                    && let Some(value) = text(value)
                {
                    // The API server percent-encodes the key (RFC 3986).
                    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
                    extra.entry(key.into_owned()).or_default().push(value);
                }
            }
        }
        Some(UserInfo {
            username: Some(username),
            groups: Some(groups),
            extra: (!extra.is_empty()).then_some(extra),
            uid: first(&self.uid),
        })
    }
}

/// A JSON list of strings in the ConfigMap (the API server writes them so).
fn list(data: &std::collections::BTreeMap<String, String>, key: &str) -> Vec<String> {
    data.get(key)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// The front proxy's CAs and header names from the API server's ConfigMap.
pub fn front_proxy(config_map: &ConfigMap) -> Option<(ClientCas, UserHeaders)> {
    let data = config_map.data.as_ref()?;
    let pem = data.get("requestheader-client-ca-file")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return None;
    }
    let cas = ClientCas {
        roots: Arc::new(roots),
        allowed_names: list(data, "requestheader-allowed-names"),
    };
    let headers = UserHeaders {
        user: list(data, "requestheader-username-headers"),
        uid: list(data, "requestheader-uid-headers"),
        group: list(data, "requestheader-group-headers"),
        extra_prefix: list(data, "requestheader-extra-headers-prefix"),
    };
    Some((cas, headers))
}

/// Follows the API server's ConfigMap into `cas` (the server's client
/// certificate check) and `headers`. Without it (an API server without a
/// front proxy) the aggregated API refuses every request.
pub async fn follow_front_proxy(
    client: Client,
    cas: watch::Sender<Option<ClientCas>>,
    headers: watch::Sender<UserHeaders>,
) -> Infallible {
    let (namespace, name) = AUTHENTICATION_CONFIG_MAP;
    let api = Api::<ConfigMap>::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut changes = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    loop {
        match changes.next().await {
            Some(Ok(cm)) => match front_proxy(&cm) {
                Some((new_cas, new_headers)) => {
                    tracing::info!("aggregated API: the API server's front-proxy CA is known");
                    cas.send_replace(Some(new_cas));
                    headers.send_replace(new_headers);
                }
                None => tracing::warn!(
                    "aggregated API: {namespace}/{name} has no requestheader-client-ca-file: the API server relays nothing here"
                ),
            },
            Some(Err(e)) => tracing::warn!("aggregated API: watching {namespace}/{name}: {e}"),
            None => std::future::pending::<()>().await,
        }
    }
}

/// The agents as this replica's API reaches them: its own watches of the
/// agent pods and the nodes, and the agents' CAs from the ConfigMap the
/// leader publishes them in (every replica serves the API; only the leader
/// signs).
pub async fn agents(
    settings: &Settings,
    client: Client,
    metrics: Arc<Metrics>,
) -> crate::error::Result<Arc<AgentPool>> {
    let port = settings.agent_port(&client).await?;
    let (pods, pod_writer) = reflector::store();
    let agent_pods = watcher::Config::default().labels(&settings.agent_selector.to_string());
    let pod_stream = reflector::reflector(
        pod_writer,
        watcher(
            Api::<Pod>::namespaced(client.clone(), &settings.namespace),
            agent_pods,
        ),
    );
    let (nodes, node_writer) = reflector::store();
    let node_stream = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    );
    for (what, stream) in [
        (
            "agent pods",
            pod_stream.default_backoff().map_ok(|_| ()).boxed(),
        ),
        (
            "nodes",
            node_stream.default_backoff().map_ok(|_| ()).boxed(),
        ),
    ] {
        tokio::spawn(stream.for_each(move |e| async move {
            if let Err(e) = e {
                tracing::warn!("aggregated API: watching {what}: {e}");
            }
        }));
    }
    let tls = if settings.insecure_agent_plaintext {
        AgentTls::Plaintext
    } else {
        let trust = Arc::new(TrustedCas::default());
        tokio::spawn(follow_agent_cas(
            Api::namespaced(client.clone(), &settings.namespace),
            settings.agent_ca_config_map.clone(),
            trust.clone(),
        ));
        AgentTls::Verified(trust)
    };
    let pool = PoolSettings::new(settings, port, tls);
    Ok(Arc::new(AgentPool::new(pods, nodes, pool, metrics)))
}

/// Keeps `trust` at the CAs published in the ConfigMap `name`.
async fn follow_agent_cas(api: Api<ConfigMap>, name: String, trust: Arc<TrustedCas>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut changes = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    while let Some(change) = changes.next().await {
        match change {
            Ok(cm) => {
                if let Some(bundle) = cm.data.and_then(|mut d| d.remove(BUNDLE_KEY))
                    && trust.get().as_ref() != Some(&bundle)
                {
                    trust.set(bundle);
                }
            }
            Err(e) => tracing::warn!("aggregated API: watching the ConfigMap {name}: {e}"),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct Relay {
    pub client: Client,
    pub agents: Arc<AgentPool>,
    pub headers: watch::Receiver<UserHeaders>,
}

pub fn router(relay: Relay) -> Router {
    let base = format!("/apis/{GROUP}/{VERSION}");
    Router::new()
        .route("/apis", get(groups))
        .route(&format!("/apis/{GROUP}"), get(group))
        .route(&base, get(resources))
        .route(
            &format!("{base}/{CAPTURES}/{{name}}/{RELAY}/files"),
            get(files),
        )
        .route(
            &format!("{base}/{CAPTURES}/{{name}}/{RELAY}/files/{{node}}/{{file}}"),
            get(download),
        )
        .route(
            &format!("{base}/{CAPTURES}/{{name}}/{RELAY}/packets"),
            get(packets),
        )
        .layer(axum::middleware::from_fn(front_proxy_only))
        .with_state(relay)
}

/// A Kubernetes `Status` failure, as kubectl and client libraries show it.
#[derive(Debug)]
pub struct Failure {
    code: StatusCode,
    message: String,
    /// A refused range's `Content-Range`: the file's size.
    content_range: Option<header::HeaderValue>,
}

impl Failure {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            content_range: None,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let reason = match self.code {
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
            StatusCode::RANGE_NOT_SATISFIABLE => "RequestedRangeNotSatisfiable",
            _ => "InternalError",
        };
        let mut response = (
            self.code,
            Json(json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": self.message,
                "reason": reason,
                "code": self.code.as_u16(),
            })),
        )
            .into_response();
        if self.code == StatusCode::TOO_MANY_REQUESTS {
            // As the agents answer it: a live reader leaves when its
            // client goes.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        if let Some(range) = self.content_range {
            response.headers_mut().insert(header::CONTENT_RANGE, range);
        }
        response
    }
}

/// An agent's refusal as the API answers it.
fn from_agent(node: &str, status: &Status) -> Failure {
    let code = match status.code() {
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        // A capture with as many live readers as it takes.
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // A download's range beyond its file.
        Code::OutOfRange => StatusCode::RANGE_NOT_SATISFIABLE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Failure {
        content_range: agent_header(status.metadata(), &header::CONTENT_RANGE),
        ..Failure::new(code, format!("node {node}: {}", status.message()))
    }
}

/// The value of `name` that an agent's download answer carries in its
/// metadata, as the header of that name.
fn agent_header(
    metadata: &tonic::metadata::MetadataMap,
    name: &header::HeaderName,
) -> Option<header::HeaderValue> {
    let value = metadata.get(name.as_str())?.to_str().ok()?;
    header::HeaderValue::from_str(value).ok()
}

/// Nothing under `/apis` answers a connection the API server's front proxy
/// did not make.
async fn front_proxy_only(req: Request, next: axum::middleware::Next) -> Response {
    let verified = req
        .extensions()
        .get::<VerifiedClient>()
        .is_some_and(|v| v.0.is_some());
    if !verified {
        return Failure::new(
            StatusCode::UNAUTHORIZED,
            format!("{GROUP} is served through the Kubernetes API server only (no front-proxy client certificate)"),
        )
        .into_response();
    }
    next.run(req).await
}

async fn groups() -> Json<serde_json::Value> {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_object()]}))
}

fn group_object() -> serde_json::Value {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version], "preferredVersion": version})
}

async fn group() -> Json<serde_json::Value> {
    Json(group_object())
}

async fn resources() -> Json<serde_json::Value> {
    let resource = |name: String, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": false, "kind": "PacketCapture", "verbs": verbs});
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [resource(format!("{CAPTURES}/{RELAY}"), &["get"])],
    }))
}

/// The user the API server relayed the request for, and the capture, when
/// that user may read the capture's files.
async fn authorized(
    relay: &Relay,
    headers: &HeaderMap,
    name: &str,
) -> Result<(UserInfo, PacketCaptureConfig), Failure> {
    let user =
        relay.headers.borrow().user(headers).ok_or_else(|| {
            Failure::new(StatusCode::UNAUTHORIZED, "the API server named no user")
        })?;
    let who = user.username.clone().unwrap_or_default();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            extra: user.extra.clone(),
            uid: user.uid.clone(),
            resource_attributes: Some(ResourceAttributes {
                group: Some(packet_capture_common::crd::GROUP.into()),
                resource: Some(PLURAL.into()),
                subresource: Some(FILES_SUBRESOURCE.into()),
                name: Some(name.into()),
                verb: Some("get".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(relay.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("asking whether {who:?} may read the files: {e}"),
            )
        })?;
    if !answer.status.is_some_and(|s| s.allowed) {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            format!(
                "user {who:?} may not get {RESOURCE}/{FILES_SUBRESOURCE} named {name:?}: bind a role that allows it (packet-capture-viewer allows every capture's)"
            ),
        ));
    }
    let capture = Api::<PacketCaptureConfig>::all(relay.client.clone())
        .get_opt(name)
        .await
        .map_err(|e| {
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reading {name}: {e}"),
            )
        })?
        .ok_or_else(|| {
            Failure::new(
                StatusCode::NOT_FOUND,
                format!("{RESOURCE} {name:?} not found"),
            )
        })?;
    Ok((user, capture))
}

/// Whether the agent's file `file` is of capture `name`, as the agents
/// tell (`capture_of`).
pub fn is_file_of(file: &str, name: &str) -> bool {
    capture_of(file) == Some(name)
}

async fn files(
    State(relay): State<Relay>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<FileList>, Failure> {
    let (user, capture) = authorized(&relay, &headers, &name).await?;
    // Files written before this capture was created are an earlier
    // capture's of the same name.
    let since = capture
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_default();
    let endpoints: Vec<AgentEndpoint> = relay.agents.endpoints().into_values().collect();
    let nodes: Vec<NodeFiles> = futures::stream::iter(endpoints)
        .map(|ep| {
            let (relay, user, name) = (&relay, &user, &name);
            async move {
                let (files, error) = match relay.agents.files_for(&ep, user).await {
                    Ok(files) => (files, None),
                    Err(s) => (Vec::new(), Some(from_agent(&ep.node, &s).message)),
                };
                let files: Vec<FileEntry> = files
                    .into_iter()
                    .filter(|f| is_file_of(&f.name, name))
                    .filter(|f| f.modified.as_ref().is_none_or(|m| m.seconds >= since))
                    .map(|f| FileEntry {
                        modified: f.modified.and_then(|m| {
                            k8s_openapi::jiff::Timestamp::new(m.seconds, m.nanos)
                                .ok()
                                .map(|t| t.to_string())
                        }),
                        name: f.name,
                        size: f.size,
                    })
                    .collect();
                NodeFiles {
                    node: ep.node,
                    address: ep.node_ip,
                    files,
                    error,
                }
            }
        })
        .buffer_unordered(FAN_OUT)
        .filter(|n| std::future::ready(!n.files.is_empty() || n.error.is_some()))
        .collect()
        .await;
    let mut nodes = nodes;
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Json(FileList {
        capture: name,
        nodes,
    }))
}

async fn download(
    State(relay): State<Relay>,
    Path((name, node, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let (user, _) = authorized(&relay, &headers, &name).await?;
    let not_found = || {
        Failure::new(
            StatusCode::NOT_FOUND,
            format!("no file {file:?} of {name:?} on node {node:?}"),
        )
    };
    if !is_file_of(&file, &name) {
        return Err(not_found());
    }
    let ep = relay.agents.endpoint(&node).ok_or_else(not_found)?;
    // Passed on for the agent to answer, as its own REST API does (a value
    // that is not text passed on as one that cannot parse).
    let value_of = |name| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let answer = relay
        .agents
        .download_for(
            &ep,
            DownloadFileRequest {
                name: file,
                range: value_of(header::RANGE).unwrap_or_default(),
                if_range: value_of(header::IF_RANGE).unwrap_or_default(),
            },
            &user,
        )
        .await
        .map_err(|s| from_agent(&node, &s))?;
    let content_range = agent_header(answer.metadata(), &header::CONTENT_RANGE);
    // The file's validators, for an If-Range that goes on with it.
    let validators: Vec<_> = [header::ETAG, header::LAST_MODIFIED]
        .into_iter()
        .filter_map(|name| Some((name.clone(), agent_header(answer.metadata(), &name)?)))
        .collect();
    // The asker's copy is still the file: 304, and the agent's answer is
    // dropped unread (RFC 9110 13.2.2 puts these conditions before the
    // range, which the agent was asked for before its validators were
    // known).
    let text = |name| answer.metadata().get(name).and_then(|v| v.to_str().ok());
    let file = Validators::from_headers(text("etag").unwrap_or_default(), text("last-modified"));
    let if_none_match = value_of(header::IF_NONE_MATCH);
    let if_modified_since = value_of(header::IF_MODIFIED_SINCE);
    if file.not_modified(if_none_match.as_deref(), if_modified_since.as_deref()) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().extend(validators);
        return Ok(response);
    }
    let size = answer
        .metadata()
        .get("file-size")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = answer
        .into_inner()
        .map_ok(|c| Bytes::from(c.data))
        .map_err(move |s| std::io::Error::other(format!("node {node}: {}", s.message())));
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::ACCEPT_RANGES, "bytes"),
        ],
        Body::from_stream(body),
    )
        .into_response();
    let length = match &content_range {
        Some(range) => part_length(range),
        None => size,
    };
    if let Some(length) = length {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(length));
    }
    response.headers_mut().extend(validators);
    if let Some(range) = content_range {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response.headers_mut().insert(header::CONTENT_RANGE, range);
    }
    Ok(response)
}

/// How many bytes a `Content-Range: bytes FIRST-LAST/SIZE` holds.
fn part_length(range: &header::HeaderValue) -> Option<u64> {
    let (first, last) = range
        .to_str()
        .ok()?
        .strip_prefix("bytes ")?
        .split_once('/')?
        .0
        .split_once('-')?;
    last.parse::<u64>()
        .ok()?
        .checked_sub(first.parse().ok()?)?
        .checked_add(1)
}

/// Where a reader whose stream broke off goes on: the capture it read
/// (`resume`, as its stream's [`STREAM_CAPTURE_ID`] header said; another
/// generation's numbers are not this one's) and, for each node, the
/// number (`epb_packetid`) of the last packet it got (`after=NODE:NUMBER`).
#[derive(Debug, Default, PartialEq)]
struct Resume {
    capture: String,
    after: BTreeMap<String, u64>,
}

impl Resume {
    fn from_query(query: Option<&str>) -> Result<Self, Failure> {
        let mut resume = Self::default();
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty());
        for pair in pairs {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            let bad = |why: &str| {
                Failure::new(StatusCode::BAD_REQUEST, format!("{key}={value:?}: {why}"))
            };
            match key {
                "resume" => resume.capture = value.into_owned(),
                "after" => {
                    let (node, number) = value
                        .rsplit_once(':')
                        .ok_or_else(|| bad("not NODE:NUMBER"))?;
                    let number = number
                        .parse()
                        .map_err(|_| bad("the number is not a whole number"))?;
                    resume.after.insert(node.to_owned(), number);
                }
                _ => return Err(bad("not a parameter of the stream (resume, after)")),
            }
        }
        Ok(resume)
    }
}

async fn packets(
    State(relay): State<Relay>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let (user, capture) = authorized(&relay, &headers, &name).await?;
    let resume = Resume::from_query(query.as_deref())?;
    let id = capture_id(
        &capture.uid().unwrap_or_default(),
        capture.metadata.generation.unwrap_or_default(),
    );
    let after = Arc::new(if resume.capture == id {
        resume.after
    } else {
        BTreeMap::new()
    });
    let endpoints: Vec<AgentEndpoint> = relay.agents.endpoints().into_values().collect();
    let opened: Vec<_> = futures::stream::iter(endpoints)
        .map(|ep| {
            let (relay, user, id) = (&relay, &user, &id);
            let after = after.get(&ep.node).copied();
            async move {
                let opened = relay.agents.packets_for(&ep, id, after, user).await;
                (ep.node, opened)
            }
        })
        .buffer_unordered(FAN_OUT)
        .collect()
        .await;
    let mut streams = Vec::new();
    for (node, opened) in opened {
        match opened {
            Ok(stream) => streams.push((node, stream)),
            // Not capturing there, or no longer.
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {}
            // Refused, or the capture has all the live readers it takes
            // there: the stream would lack that node's packets.
            Err(s) if matches!(s.code(), Code::PermissionDenied | Code::ResourceExhausted) => {
                return Err(from_agent(&node, &s));
            }
            Err(s) => tracing::warn!(%node, capture = %name, "live packets: {}", s.message()),
        }
    }
    if streams.is_empty() {
        let phase = capture
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "not started".into());
        let files = match capture.spec.output_format.no_file() {
            None => format!("its files: kubectl pcap fetch {name}"),
            Some(_) => format!(
                "it writes no files (outputFormat: {})",
                capture.spec.output_format
            ),
        };
        return Err(Failure::new(
            StatusCode::CONFLICT,
            format!("capture {name:?} is not running on any node ({phase}); {files}"),
        ));
    }
    let snaplen = capture
        .spec
        .snaplen
        .unwrap_or(packet_capture_common::abi::MAX_SNAPLEN);
    let (sender, batches) = mpsc::channel::<(Arc<str>, PacketBatch)>(MERGE_BATCHES);
    // A uid and a generation: always a header value.
    let id_header = header::HeaderValue::try_from(id.as_str()).ok();
    tokio::spawn(follow_nodes(
        relay, user, capture, id, after, streams, sender,
    ));
    let mut merge = Merge::new(&name, snaplen);
    let header = merge.header();
    let body = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(header)) })
        .chain(
            tokio_stream_of(batches)
                .map(move |(node, batch)| Ok(Bytes::from(merge.batch(&node, &batch)))),
        );
    let mut response = (
        [(header::CONTENT_TYPE, "application/x-pcapng")],
        Body::from_stream(body),
    )
        .into_response();
    if let Some(id) = id_header {
        response.headers_mut().insert(STREAM_CAPTURE_ID, id);
    }
    Ok(response)
}

/// Where the live packets of each node go, to be merged.
type Batches = mpsc::Sender<(Arc<str>, PacketBatch)>;

/// Passes a node's live packets on until its capture ends there or the
/// client has gone.
async fn forward(sender: Batches, node: Arc<str>, mut stream: Streaming<PacketBatch>) {
    loop {
        // A client that has gone frees the agent's reader at once, not at
        // the node's next batch.
        let message = tokio::select! {
            () = sender.closed() => return,
            message = stream.message() => message,
        };
        match message {
            Ok(Some(batch)) => {
                if sender.send((node.clone(), batch)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(s) => {
                tracing::info!(%node, "live packets ended: {}", s.message());
                return;
            }
        }
    }
}

/// Passes on the live packets of the nodes `streams` come from, and of the
/// nodes that start capturing after the stream opened (a selected pod that
/// came later, a node slower to start) as the capture's status names them
/// running. The stream ends when every node's packets have, unless the
/// status names a running node not taken in yet, or when the client has
/// gone. The status is followed until the capture has ended or its spec
/// changed (another generation is another capture on the agents).
async fn follow_nodes(
    relay: Relay,
    user: UserInfo,
    capture: PacketCaptureConfig,
    id: String,
    after: Arc<BTreeMap<String, u64>>,
    streams: Vec<(String, Streaming<PacketBatch>)>,
    sender: Batches,
) {
    let name = capture.name_any();
    let mut nodes = tokio::task::JoinSet::new();
    let mut attached = std::collections::BTreeSet::new();
    for (node, stream) in streams {
        nodes.spawn(forward(sender.clone(), node.as_str().into(), stream));
        attached.insert(node);
    }
    let api = Api::<PacketCaptureConfig>::all(relay.client.clone());
    let mut changes = std::pin::pin!(watcher::watch_object(api, &name).default_backoff());
    let mut watching = true;
    // Whether the status has been read since the stream opened: a node may
    // have started between the read the stream opened with and the watch.
    let mut read = false;
    // Running nodes the status names that are not taken in yet.
    let mut pending = Vec::new();
    loop {
        let change = tokio::select! {
            () = sender.closed() => return,
            change = changes.next(), if watching => {
                // A watch does not end; were it to, nothing more comes.
                watching &= change.is_some();
                change
            }
            Some(_) = nodes.join_next() => None,
        };
        match change {
            Some(Ok(Some(pcc))) => {
                read = true;
                if pcc.uid() != capture.uid()
                    || pcc.metadata.generation != capture.metadata.generation
                {
                    watching = false;
                } else if let Some(phase) = pcc.current_phase() {
                    watching = !phase.is_final();
                    pending = pcc
                        .status
                        .unwrap_or_default()
                        .capture_files
                        .into_values()
                        .filter(|n| {
                            n.status == CaptureState::Running && !attached.contains(&n.node)
                        })
                        .map(|n| n.node)
                        .collect();
                }
            }
            // Deleted: its captures end on the agents.
            Some(Ok(None)) => {
                read = true;
                watching = false;
            }
            Some(Err(e)) => {
                tracing::debug!(capture = %name, "watching for nodes to take into its live packets: {e}");
            }
            None => {}
        }
        if !pending.is_empty() {
            let endpoints = relay.agents.endpoints();
            for node in std::mem::take(&mut pending) {
                // An agent this replica does not see yet: the next status
                // tries again.
                let Some(ep) = endpoints.get(&node) else {
                    pending.push(node);
                    continue;
                };
                let after = after.get(&node).copied();
                match relay.agents.packets_for(ep, &id, after, &user).await {
                    Ok(stream) => {
                        nodes.spawn(forward(sender.clone(), node.as_str().into(), stream));
                        attached.insert(node);
                    }
                    // Not known there yet: the next status tries again.
                    Err(s) if s.code() == Code::NotFound => pending.push(node),
                    // Ended there meanwhile.
                    Err(s) if s.code() == Code::FailedPrecondition => {}
                    Err(s) => {
                        tracing::warn!(%node, capture = %name, "live packets: {}", s.message())
                    }
                }
            }
        }
        if nodes.is_empty() && (!watching || (read && pending.is_empty())) {
            return;
        }
    }
}

fn tokio_stream_of<T: Send + 'static>(
    mut receiver: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// The live stream of several nodes as one pcapng section: one interface
/// block per node and interface, as they first appear.
pub struct Merge {
    comment: String,
    snaplen: u32,
    interfaces: HashMap<(Arc<str>, String), u32>,
}

impl Merge {
    pub fn new(capture: &str, snaplen: u32) -> Self {
        Self {
            comment: format!("live packets of capture {capture}, every node"),
            snaplen,
            interfaces: HashMap::new(),
        }
    }

    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        pcapng::section_header(
            &mut out,
            concat!("packet-capture ", env!("CARGO_PKG_VERSION")),
            &self.comment,
        );
        out
    }

    /// The blocks of one node's batch.
    pub fn batch(&mut self, node: &Arc<str>, batch: &PacketBatch) -> Vec<u8> {
        let mut out = Vec::new();
        let mut lost = batch.lost;
        for packet in &batch.packets {
            let key = (node.clone(), packet.interface.clone());
            let next = self.interfaces.len() as u32;
            let id = *self.interfaces.entry(key).or_insert_with(|| {
                pcapng::interface_description(
                    &mut out,
                    &format!("{node}/{}", packet.interface),
                    &format!("node {node}"),
                    self.snaplen,
                );
                next
            });
            pcapng::enhanced_packet(
                &mut out,
                &pcapng::Packet {
                    interface_id: id,
                    unix_ns: packet.unix_nanos,
                    inbound: match packet.direction() {
                        PacketDirection::In => Some(true),
                        PacketDirection::Out => Some(false),
                        PacketDirection::Unspecified => None,
                    },
                    orig_len: packet.original_length,
                    data: &packet.data,
                    lost: std::mem::take(&mut lost),
                    // 0 from an agent that does not number them.
                    number: (packet.number > 0).then_some(packet.number),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader coming back names the capture it read and the last packet
    /// of each node; anything else is refused, naming the parameter.
    #[test]
    fn a_stream_goes_on_after_the_packets_it_names() {
        assert_eq!(Resume::from_query(None).unwrap(), Resume::default());
        let resume =
            Resume::from_query(Some("resume=u-1-g2&after=node-a:7&after=node%2Db:0")).unwrap();
        assert_eq!(resume.capture, "u-1-g2");
        assert_eq!(
            resume.after,
            BTreeMap::from([("node-a".into(), 7), ("node-b".into(), 0)])
        );
        for (query, problem) in [
            ("after=node-a", "after=\"node-a\": not NODE:NUMBER"),
            (
                "after=node-a:-1",
                "after=\"node-a:-1\": the number is not a whole number",
            ),
            (
                "since=5",
                "since=\"5\": not a parameter of the stream (resume, after)",
            ),
        ] {
            let refused = Resume::from_query(Some(query)).unwrap_err();
            assert_eq!(refused.code, StatusCode::BAD_REQUEST);
            assert_eq!(refused.message, problem);
        }
    }

    #[test]
    fn files_belong_to_the_capture_named_before_their_stamp() {
        assert!(is_file_of("web-20260101-120000.pcapng", "web"));
        assert!(is_file_of("web-20260101-120000.pcap.gz", "web"));
        assert!(is_file_of("web-20260101-120000-2.pcap", "web"));
        assert!(!is_file_of("web-api-20260101-120000.pcap", "web"));
        assert!(!is_file_of("webb-20260101-120000.pcap", "web"));
        assert!(!is_file_of("web-2026010-120000.pcap", "web"));
        assert!(!is_file_of(
            "web-20260101-120000-20260301-101010.pcap",
            "web"
        ));
        assert!(is_file_of(
            "web-20260101-120000-20260301-101010.pcap",
            "web-20260101-120000"
        ));
        assert!(!is_file_of("web-20260101-120000-.pcap", "web"));
        assert!(!is_file_of(
            "web-20260101-120000.x-20260301-101010.pcap",
            "web"
        ));
    }

    #[test]
    fn the_user_comes_from_the_configured_headers() {
        let names = UserHeaders {
            user: vec!["X-Remote-User".into()],
            uid: vec!["X-Remote-Uid".into()],
            group: vec!["X-Remote-Group".into()],
            extra_prefix: vec!["X-Remote-Extra-".into()],
        };
        // As the API server writes them: UTF-8 bytes, not only ASCII.
        let raw = |s: &str| http::HeaderValue::from_bytes(s.as_bytes()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-remote-user", raw("jörg"));
        headers.insert("x-remote-uid", raw("ü-42"));
        headers.append("x-remote-group", raw("équipe"));
        headers.append("x-remote-group", raw("system:authenticated"));
        headers.append("x-remote-extra-scopes%2fa", raw("x é"));
        let user = names.user(&headers).unwrap();
        assert_eq!(user.username.as_deref(), Some("jörg"));
        assert_eq!(user.uid.as_deref(), Some("ü-42"));
        assert_eq!(user.groups.unwrap(), ["équipe", "system:authenticated"]);
        assert_eq!(user.extra.unwrap()["scopes/a"], ["x é"]);
        assert!(names.user(&HeaderMap::new()).is_none());
        headers.remove("x-remote-uid");
        assert_eq!(names.user(&headers).unwrap().uid, None);
    }
}
