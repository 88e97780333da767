//! The agents: found from the DaemonSet's pods, one cached gRPC client per
//! node, a bearer token re-read when its file changes, and calls that retry
//! with backoff.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use packet_capture_common::crd::{
    CaptureState, ON_BEHALF_OF_ENCODING, ON_BEHALF_OF_EXTRA, ON_BEHALF_OF_GROUP, ON_BEHALF_OF_UID,
    ON_BEHALF_OF_USER, PERCENT_ENCODED, is_plain_header_value, on_behalf_extra, percent_encode,
};
use packet_capture_proto::v1::agent_client::AgentClient;
use packet_capture_proto::v1::{
    Capture, DownloadFileRequest, FileChunk, FileInfo, GetCaptureRequest, ListCapturesRequest,
    ListFilesRequest, PacketBatch, SetTargetsRequest, StartCaptureRequest, StopCaptureRequest,
    StreamPacketsRequest, TargetPod, WatchCaptureRequest,
};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::backoff::Backoff;
use crate::config::{LabelSelector, Settings};
use crate::metrics::Metrics;
use crate::slots::{CallSlots, Priority};
use crate::targets::{internal_ip, pod_phase};

/// Whether a pod's Ready condition holds.
fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A client of one agent: its URI and the CAs it trusts, as built.
type Cached = (String, Option<String>, AgentClient<Channel>);

/// Where the agent of one node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// The node's name.
    pub node: String,
    /// The node's InternalIP (the key of `status.captureFiles`).
    pub node_ip: String,
    /// `https://<address>:<port>` (`http://` without TLS).
    pub uri: String,
}

/// The bearer token, read from a file and re-read when the file changes
/// (kubelet rotates projected service-account tokens in place).
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, String)>>,
}

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// The current token; `None` when the file does not exist or is empty.
    pub fn get(&self) -> Option<String> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified());
        let Ok(modified) = modified else {
            tracing::debug!(path = %self.path.display(), "no agent token file; calling without a token");
            return None;
        };
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, token)) = cached.as_ref()
            && *at == modified
        {
            return Some(token.clone());
        }
        match std::fs::read_to_string(&self.path) {
            Ok(t) if !t.trim().is_empty() => {
                let token = t.trim().to_string();
                *cached = Some((modified, token.clone()));
                Some(token)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "reading the agent token: {e}");
                None
            }
        }
    }
}

/// Largest answer taken from an agent: ListCaptures names every capture of
/// one resource a node holds (each generation's), each with up to 1024
/// targets and the names of their pods.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Whether a failed call is worth trying again.
pub fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Unauthenticated
            | Code::Cancelled
    )
}

/// The CA bundle (PEM) the controller trusts for the agents' serving
/// certificates; empty until the CA is known (see `agent_certs`).
#[derive(Debug)]
pub struct TrustedCas(tokio::sync::watch::Sender<Option<String>>);

impl Default for TrustedCas {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(None).0)
    }
}

impl TrustedCas {
    pub fn set(&self, bundle: String) {
        self.0.send_replace(Some(bundle));
    }

    pub fn get(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Returns once the CAs are known.
    pub async fn known(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in self: the wait ends only with a value.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// How the agents' API is reached.
#[derive(Debug, Clone)]
pub enum AgentTls {
    /// TLS, verifying the agent's certificate (for the node's address)
    /// with these CAs.
    Verified(Arc<TrustedCas>),
    /// Plain HTTP (`--insecure-agent-plaintext`, agents on loopback).
    Plaintext,
}

/// How the pool reaches agents.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub namespace: String,
    pub selector: LabelSelector,
    pub port: u16,
    pub token_file: PathBuf,
    pub timeout: Duration,
    /// Agent calls in flight at most (see [`CallSlots`]).
    pub concurrency: usize,
    pub tls: AgentTls,
}

impl PoolSettings {
    /// What the flags say, with the agents' `port` and how they are
    /// trusted.
    pub fn new(settings: &Settings, port: u16, tls: AgentTls) -> Self {
        Self {
            namespace: settings.namespace.clone(),
            selector: settings.agent_selector.clone(),
            port,
            token_file: settings.agent_token_file.clone(),
            timeout: settings.agent_timeout(),
            concurrency: settings.agent_concurrency.into(),
            tls,
        }
    }

    /// Where agents are looked for, as "no agent" messages say it.
    pub fn no_agent(&self) -> String {
        format!(
            "no running pod labelled {} in namespace {}",
            self.selector, self.namespace
        )
    }
}

/// The agents and a gRPC client for each.
pub struct AgentPool {
    pods: Store<Pod>,
    nodes: Store<Node>,
    settings: PoolSettings,
    token: TokenFile,
    clients: Mutex<HashMap<String, Cached>>,
    slots: CallSlots,
    metrics: Arc<Metrics>,
}

impl AgentPool {
    /// `pods` holds the agent pods (it may hold others: they are filtered by
    /// namespace and labels).
    pub fn new(
        pods: Store<Pod>,
        nodes: Store<Node>,
        settings: PoolSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let token = TokenFile::new(settings.token_file.clone());
        Self {
            pods,
            nodes,
            slots: CallSlots::new(settings.concurrency),
            settings,
            token,
            clients: Mutex::default(),
            metrics,
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Whether a pod is one of the agents.
    pub fn is_agent_pod(&self, pod: &Pod) -> bool {
        pod.metadata.namespace.as_deref() == Some(self.settings.namespace.as_str())
            && self.settings.selector.matches(pod.metadata.labels.as_ref())
    }

    /// The InternalIP of a node, else its name.
    pub fn node_ip(&self, node: &str) -> String {
        self.nodes
            .get(&ObjectRef::new(node))
            .and_then(|n| internal_ip(&n))
            .unwrap_or_else(|| node.to_string())
    }

    /// The agents of all nodes, keyed by node name: running, not deleting
    /// agent pods; host-network pods are reached at their pod IP, others at
    /// their node's InternalIP (the DaemonSet's hostPort).
    pub fn endpoints(&self) -> BTreeMap<String, AgentEndpoint> {
        let pods = self.live_agent_pods(|p| pod_phase(p) == "Running");
        let scheme = match self.settings.tls {
            AgentTls::Verified(_) => "https",
            AgentTls::Plaintext => "http",
        };
        let mut out = BTreeMap::new();
        for pod in pods {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
            let node_ip = self
                .nodes
                .get(&ObjectRef::new(&node))
                .and_then(|n| internal_ip(&n));
            let address = if host_network {
                pod_ip.clone().or_else(|| node_ip.clone())
            } else {
                node_ip.clone().or_else(|| pod_ip.clone())
            };
            let Some(address) = address else {
                continue;
            };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            out.insert(
                node.clone(),
                AgentEndpoint {
                    node_ip: node_ip.unwrap_or(address),
                    uri: format!("{scheme}://{host}:{}", self.settings.port),
                    node,
                },
            );
        }
        // Drop the clients of agents that are gone.
        self.lock_clients()
            .retain(|node, (uri, ..)| out.get(node).is_some_and(|e| e.uri == *uri));
        out
    }

    pub fn endpoint(&self, node: &str) -> Option<AgentEndpoint> {
        self.endpoints().remove(node)
    }

    /// The nodes whose agent is on its way but cannot take a capture yet,
    /// with why: the node's newest agent pod is Pending (an image pull, a
    /// node just joined, a rolling update), or Running but not Ready (its
    /// startup probe has not passed: it does not serve yet). Captures that
    /// run there already go on; new ones wait (see `plan`).
    pub fn unready(&self) -> BTreeMap<String, String> {
        let mut newest = BTreeMap::new();
        for pod in self.live_agent_pods(|_| true) {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                newest.insert(node, pod);
            }
        }
        newest
            .into_iter()
            .filter_map(|(node, pod)| {
                let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                let why = match pod_phase(&pod) {
                    "Pending" => format!("its pod {name} is Pending"),
                    "Running" if !ready(&pod) => format!("its pod {name} is not Ready yet"),
                    _ => return None,
                };
                Some((node, why))
            })
            .collect()
    }

    /// The agent pods that are not being deleted and pass `keep`, oldest
    /// first, so that a map filled from them keeps each node's newest (a
    /// DaemonSet rolling update runs two on a node for a while).
    fn live_agent_pods(&self, keep: impl Fn(&Pod) -> bool) -> Vec<Arc<Pod>> {
        let mut pods = self.pods.state_filter(|p| {
            self.is_agent_pod(p) && p.metadata.deletion_timestamp.is_none() && keep(p)
        });
        pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        pods
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached client of an agent, rebuilt when its address or the
    /// trusted CAs change.
    fn client(&self, ep: &AgentEndpoint) -> Result<AgentClient<Channel>, Status> {
        let trusted = match &self.settings.tls {
            AgentTls::Verified(cas) => Some(cas.get().ok_or_else(|| {
                Status::unavailable(
                    "the agents' CA is not known yet: their certificates cannot be verified",
                )
            })?),
            AgentTls::Plaintext => None,
        };
        let mut clients = self.lock_clients();
        if let Some((uri, cas, client)) = clients.get(&ep.node)
            && *uri == ep.uri
            && *cas == trusted
        {
            return Ok(client.clone());
        }
        let mut endpoint = Endpoint::from_shared(ep.uri.clone())
            .map_err(|e| Status::invalid_argument(format!("agent address {}: {e}", ep.uri)))?;
        if let Some(cas) = &trusted {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cas));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Status::internal(format!("TLS for {}: {e}", ep.uri)))?;
        }
        let channel = endpoint
            .connect_timeout(self.settings.timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(self.settings.timeout)
            .keep_alive_while_idle(true)
            .connect_lazy();
        let client = AgentClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES);
        clients.insert(ep.node.clone(), (ep.uri.clone(), trusted, client.clone()));
        Ok(client)
    }

    /// A request with the bearer token.
    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(token) = self.token.get() {
            match format!("Bearer {token}").parse() {
                Ok(v) => {
                    req.metadata_mut().insert("authorization", v);
                }
                Err(_) => tracing::warn!("the agent token is not a valid header value"),
            }
        }
        req
    }

    /// One unary call, with the timeout and the latency metric.
    async fn unary<T, R, F, Fut>(
        &self,
        ep: &AgentEndpoint,
        method: &'static str,
        msg: T,
        call: F,
    ) -> Result<R, Status>
    where
        F: FnOnce(AgentClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        self.call_for(ep, method, self.request(msg), call).await
    }

    /// A call that reads for `user` (the agent checks `user`'s permissions:
    /// see `RELAY_VERB`); the timeout covers the opening of a stream only.
    async fn relayed<T, R, F, Fut>(
        &self,
        ep: &AgentEndpoint,
        method: &'static str,
        msg: T,
        user: &UserInfo,
        call: F,
    ) -> Result<R, Status>
    where
        F: FnOnce(AgentClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut req = self.request(msg);
        on_behalf_of(user, req.metadata_mut());
        self.call_for(ep, method, req, call).await
    }

    /// Lists the agent's files that `user` may read.
    pub async fn files_for(
        &self,
        ep: &AgentEndpoint,
        user: &UserInfo,
    ) -> Result<Vec<FileInfo>, Status> {
        self.relayed(
            ep,
            "ListFiles",
            ListFilesRequest {},
            user,
            |mut c, r| async move { c.list_files(r).await },
        )
        .await
        .map(|r| r.files)
    }

    /// Opens the download of a file, for `user`.
    pub async fn download_for(
        &self,
        ep: &AgentEndpoint,
        req: DownloadFileRequest,
        user: &UserInfo,
    ) -> Result<Response<Streaming<FileChunk>>, Status> {
        // The response whole: its metadata says which bytes it holds.
        self.relayed(ep, "DownloadFile", req, user, |mut c, r| async move {
            c.download_file(r).await.map(Response::new)
        })
        .await
    }

    /// Opens the live packets of capture `id`, for `user`.
    pub async fn packets_for(
        &self,
        ep: &AgentEndpoint,
        id: &str,
        after: Option<u64>,
        user: &UserInfo,
    ) -> Result<Streaming<PacketBatch>, Status> {
        let req = StreamPacketsRequest {
            id: id.into(),
            after,
        };
        self.relayed(ep, "StreamPackets", req, user, |mut c, r| async move {
            c.stream_packets(r).await
        })
        .await
    }

    /// `call` with a prepared request, the timeout and the latency metric.
    async fn call_for<T, R, F, Fut>(
        &self,
        ep: &AgentEndpoint,
        method: &'static str,
        req: Request<T>,
        call: F,
    ) -> Result<R, Status>
    where
        F: FnOnce(AgentClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let client = self.client(ep)?;
        // Held for the call only, not while a retry waits; the timeout
        // starts once the call has its slot.
        let priority = if method == "StartCapture" {
            Priority::Start
        } else {
            Priority::Urgent
        };
        let _slot = self.slots.acquire(priority).await;
        let started = tokio::time::Instant::now();
        let out = match tokio::time::timeout(self.settings.timeout, call(client, req)).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.settings.timeout
            ))),
        };
        self.metrics
            .agent_call(method, out.is_ok(), started.elapsed());
        if let Err(s) = &out {
            tracing::debug!(node = %ep.node, method, "agent call failed: {}", s.message());
        }
        out
    }

    /// Starts a capture, retrying transient failures. An existing capture
    /// with the same id (started earlier, perhaps with a different remaining
    /// duration) is returned as it is.
    pub async fn start<R>(
        &self,
        ep: &AgentEndpoint,
        req: StartCaptureRequest,
        backoff: &Backoff,
        on_retry: impl FnMut(u32, Duration, &Status) -> R,
    ) -> Result<Capture, Status>
    where
        R: Future<Output = ()>,
    {
        let id = req.id.clone();
        let out = backoff
            .retry(
                || {
                    self.unary(ep, "StartCapture", req.clone(), |mut c, r| async move {
                        c.start_capture(r).await
                    })
                },
                retryable,
                on_retry,
            )
            .await;
        match out {
            Err(s) if s.code() == Code::AlreadyExists => self.get(ep, &id, backoff).await,
            other => other,
        }
    }

    /// A unary call retried with `backoff` on transient failures.
    async fn retrying<T, R, F, Fut>(
        &self,
        ep: &AgentEndpoint,
        method: &'static str,
        msg: T,
        backoff: &Backoff,
        call: F,
    ) -> Result<R, Status>
    where
        T: Clone,
        F: Fn(AgentClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        backoff
            .retry(
                || self.unary(ep, method, msg.clone(), &call),
                retryable,
                |_, _, _| async {},
            )
            .await
    }

    pub async fn get(
        &self,
        ep: &AgentEndpoint,
        id: &str,
        backoff: &Backoff,
    ) -> Result<Capture, Status> {
        let req = GetCaptureRequest { id: id.into() };
        self.retrying(ep, "GetCapture", req, backoff, |mut c, r| async move {
            c.get_capture(r).await
        })
        .await
    }

    pub async fn set_targets(
        &self,
        ep: &AgentEndpoint,
        id: &str,
        targets: &[String],
        pods: &[TargetPod],
        backoff: &Backoff,
    ) -> Result<Capture, Status> {
        let req = SetTargetsRequest {
            id: id.into(),
            target_ips: targets.to_vec(),
            pods: pods.to_vec(),
        };
        self.retrying(ep, "SetTargets", req, backoff, |mut c, r| async move {
            c.set_targets(r).await
        })
        .await
    }

    pub async fn stop(
        &self,
        ep: &AgentEndpoint,
        id: &str,
        backoff: &Backoff,
    ) -> Result<Capture, Status> {
        let req = StopCaptureRequest { id: id.into() };
        self.retrying(ep, "StopCapture", req, backoff, |mut c, r| async move {
            c.stop_capture(r).await
        })
        .await
    }

    /// The agent's captures whose id starts with `id_prefix`.
    pub async fn list(
        &self,
        ep: &AgentEndpoint,
        id_prefix: &str,
        backoff: &Backoff,
    ) -> Result<Vec<Capture>, Status> {
        let req = ListCapturesRequest {
            id_prefix: id_prefix.into(),
        };
        self.retrying(ep, "ListCaptures", req, backoff, |mut c, r| async move {
            c.list_captures(r).await
        })
        .await
        .map(|r| r.captures)
    }

    /// Stops every unfinished capture on the agent whose id starts with
    /// `prefix`, except `keep`; returns the ids it stopped.
    pub async fn sweep(
        &self,
        ep: &AgentEndpoint,
        prefix: &str,
        keep: Option<&str>,
        backoff: &Backoff,
    ) -> Result<Vec<String>, Status> {
        let mut stopped = Vec::new();
        for c in self.list(ep, prefix, backoff).await? {
            // A state this build does not know is taken as unfinished: stopping
            // a capture that has ended does no harm.
            let ended = c.capture_state().is_ok_and(CaptureState::is_final);
            // The prefix again: an agent of an earlier version lists all.
            if c.id.starts_with(prefix) && Some(c.id.as_str()) != keep && !ended {
                match self.stop(ep, &c.id, backoff).await {
                    Ok(_) => stopped.push(c.id),
                    // Ended or forgotten meanwhile: nothing to stop.
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => return Err(s),
                }
            }
        }
        Ok(stopped)
    }

    /// Opens a `WatchCapture` stream (the timeout covers the opening only).
    pub async fn watch(&self, ep: &AgentEndpoint, id: &str) -> Result<Streaming<Capture>, Status> {
        let req = WatchCaptureRequest { id: id.into() };
        self.unary(ep, "WatchCapture", req, |mut c, r| async move {
            c.watch_capture(r).await
        })
        .await
    }
}

/// Names `user` in the `ON_BEHALF_OF_*` headers of a relayed call: its
/// names as they are when a header carries each as it is, else all of them
/// percent-encoded (`ON_BEHALF_OF_ENCODING`).
fn on_behalf_of(user: &UserInfo, metadata: &mut MetadataMap) {
    let name = user.username.as_deref().unwrap_or_default();
    let groups = user.groups.iter().flatten().map(String::as_str);
    let encoded = !std::iter::once(name)
        .chain(groups.clone())
        .chain(user.uid.as_deref())
        .all(is_plain_header_value);
    let value = |text: &str| -> MetadataValue<Ascii> {
        let text = if encoded {
            percent_encode(text)
        } else {
            text.to_owned()
        };
        text.parse()
            .expect("a plain header value, or percent-encoded one")
    };
    if encoded {
        metadata.insert(
            ON_BEHALF_OF_ENCODING,
            MetadataValue::from_static(PERCENT_ENCODED),
        );
    }
    metadata.insert(ON_BEHALF_OF_USER, value(name));
    for group in groups {
        metadata.append(ON_BEHALF_OF_GROUP, value(group));
    }
    if let Some(uid) = &user.uid {
        metadata.insert(ON_BEHALF_OF_UID, value(uid));
    }
    for (key, values) in user.extra.iter().flatten() {
        for v in values {
            let header = on_behalf_extra(key, v);
            metadata.append(ON_BEHALF_OF_EXTRA, header.parse().expect("percent-encoded"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::{agent_pod, node, pod, store_of};
    use packet_capture_common::crd::parse_on_behalf_extra;
    use std::io::Write;

    /// Every value of `key` in `metadata`.
    fn values<'a>(metadata: &'a MetadataMap, key: &str) -> Vec<&'a str> {
        metadata
            .get_all(key)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    /// The whole user goes with a relayed call, `extra` with keys and
    /// values of any text, so that the agent asks for the same user the API
    /// server authenticated.
    #[test]
    fn a_relayed_call_names_the_whole_user() {
        let user = UserInfo {
            username: Some("alice".into()),
            groups: Some(vec!["team".into(), "system:authenticated".into()]),
            uid: Some("42".into()),
            extra: Some(
                [
                    (
                        "scopes/a".to_owned(),
                        vec!["x y".to_owned(), "é".to_owned()],
                    ),
                    ("b".to_owned(), vec![]),
                ]
                .into(),
            ),
        };
        let mut metadata = MetadataMap::new();
        on_behalf_of(&user, &mut metadata);
        let all = |key| values(&metadata, key);
        assert_eq!(all(ON_BEHALF_OF_USER), ["alice"]);
        assert_eq!(all(ON_BEHALF_OF_GROUP), ["team", "system:authenticated"]);
        assert_eq!(all(ON_BEHALF_OF_UID), ["42"]);
        let extra: Vec<_> = all(ON_BEHALF_OF_EXTRA)
            .into_iter()
            .map(|h| parse_on_behalf_extra(h).unwrap())
            .collect();
        assert_eq!(
            extra,
            [
                ("scopes/a".into(), "x y".into()),
                ("scopes/a".into(), "é".into())
            ]
        );
        assert!(metadata.get(ON_BEHALF_OF_ENCODING).is_none());
    }

    /// A user one of whose names a header cannot carry as it is goes with
    /// all of them percent-encoded, and says so.
    #[test]
    fn a_relayed_call_for_a_name_beyond_ascii_encodes_it() {
        let user = UserInfo {
            username: Some("alice".into()),
            groups: Some(vec!["équipe".into(), "system:authenticated".into()]),
            uid: Some("42".into()),
            extra: None,
        };
        let mut metadata = MetadataMap::new();
        on_behalf_of(&user, &mut metadata);
        let all = |key| values(&metadata, key);
        assert_eq!(all(ON_BEHALF_OF_ENCODING), [PERCENT_ENCODED]);
        assert_eq!(all(ON_BEHALF_OF_USER), ["alice"]);
        assert_eq!(
            all(ON_BEHALF_OF_GROUP),
            ["%C3%A9quipe", "system%3Aauthenticated"]
        );
        assert_eq!(all(ON_BEHALF_OF_UID), ["42"]);
    }

    fn settings(token_file: PathBuf) -> PoolSettings {
        PoolSettings {
            namespace: "kube-system".into(),
            selector: crate::config::parse_selector("app=packet-capture-agent").unwrap(),
            port: 8080,
            token_file,
            timeout: Duration::from_secs(1),
            concurrency: 4,
            tls: AgentTls::Plaintext,
        }
    }

    #[test]
    fn agents_are_found_from_their_pods_and_nodes() {
        let pods = store_of(vec![
            agent_pod("n1", "192.168.0.1"),
            {
                let mut p = agent_pod("n2", "10.244.2.9");
                p.spec.as_mut().unwrap().host_network = Some(false);
                p
            },
            pod("kube-system", "other", "n3", &["10.244.3.3"]),
            {
                let mut p = agent_pod("n3", "fd00::3");
                p.status.as_mut().unwrap().phase = Some("Pending".into());
                p
            },
            agent_pod("n4", "fd00::4"),
        ]);
        let nodes = store_of(vec![node("n1", "192.168.0.1"), node("n2", "192.168.0.2")]);
        let pool = AgentPool::new(pods, nodes, settings("/nonexistent".into()), Arc::default());
        let eps = pool.endpoints();
        assert_eq!(eps.keys().collect::<Vec<_>>(), ["n1", "n2", "n4"]);
        assert_eq!(eps["n1"].uri, "http://192.168.0.1:8080");
        assert_eq!(eps["n2"].uri, "http://192.168.0.2:8080");
        assert_eq!(eps["n2"].node_ip, "192.168.0.2");
        assert_eq!(eps["n4"].uri, "http://[fd00::4]:8080");
        assert_eq!(eps["n4"].node_ip, "fd00::4");
        assert_eq!(pool.node_ip("n1"), "192.168.0.1");
        assert_eq!(pool.node_ip("n9"), "n9");
    }

    #[test]
    fn agents_on_their_way_are_told_apart_from_ready_ones() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use k8s_openapi::jiff::Timestamp;
        let named = |node: &str, name: &str, created: i64| {
            let mut p = agent_pod(node, "192.168.0.9");
            p.metadata.name = Some(name.into());
            p.metadata.creation_timestamp = Some(Time(
                Timestamp::from_second(1_700_000_000 + created).unwrap(),
            ));
            p
        };
        let pending = |mut p: Pod| {
            p.status.as_mut().unwrap().phase = Some("Pending".into());
            p
        };
        let unready = |mut p: Pod| {
            p.status.as_mut().unwrap().conditions = None;
            p
        };
        let pods = store_of(vec![
            named("n1", "ready", 0),
            pending(named("n2", "pulling", 0)),
            unready(named("n3", "probing", 0)),
            // A rolling update: the old pod serves until the new one is
            // ready, and new captures wait for the new one.
            named("n4", "old", 0),
            pending(named("n4", "new", 1)),
            // A pod being deleted is no agent on its way.
            {
                let mut p = pending(named("n5", "deleting", 0));
                p.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
                p
            },
            {
                let mut p = named("n6", "crashed", 0);
                p.status.as_mut().unwrap().phase = Some("Failed".into());
                p
            },
        ]);
        let pool = AgentPool::new(
            pods,
            store_of(vec![]),
            settings("/nonexistent".into()),
            Arc::default(),
        );
        let unready = pool.unready();
        assert_eq!(
            unready,
            BTreeMap::from([
                ("n2".into(), "its pod kube-system/pulling is Pending".into()),
                (
                    "n3".into(),
                    "its pod kube-system/probing is not Ready yet".into()
                ),
                ("n4".into(), "its pod kube-system/new is Pending".into()),
            ])
        );
        let endpoints = pool.endpoints();
        assert_eq!(endpoints.keys().collect::<Vec<_>>(), ["n1", "n3", "n4"]);
    }

    #[test]
    fn the_token_is_reread_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("pcc-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let token = TokenFile::new(&path);
        assert_eq!(token.get(), None);
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(token.get().as_deref(), Some("first"));
        // Rotation writes a new file; make its mtime differ for coarse clocks.
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"second").unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        drop(f);
        assert_eq!(token.get().as_deref(), Some("second"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
