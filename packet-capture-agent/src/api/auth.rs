//! Who may call what: a bearer token checked with the cluster's TokenReview
//! (for this agent's audience), then a SubjectAccessReview for the verb the
//! call needs on `packetcaptureconfigs.networking.packet.io`. `/metrics`
//! takes a token for the cluster's own audience (what Prometheus sends) and
//! `get` on the non-resource URL `/metrics`. Verdicts on
//! tokens the cluster authenticated are kept for a short while so that a
//! busy caller costs two reviews per [`CACHE_TTL`] (a scraper per
//! [`SCRAPER_CACHE_TTL`]), not two per request.
//!
//! Whoever reaches the port can send tokens, so each step is bounded: an
//! `authorization` value over [`MAX_AUTHORIZATION_BYTES`] is refused unread;
//! the cache holds the tokens' SHA-256, never the tokens, [`CACHE_ENTRIES`]
//! at most (least recently used out first), and never a refused token; each
//! review gives up after [`REVIEW_TIMEOUT`]; and a source address whose
//! tokens were refused [`MAX_FAILURES`] times within [`FAILURE_WINDOW`] gets
//! 429 (gRPC `RESOURCE_EXHAUSTED`) without a review for [`BLOCK_FOR`]
//! (`FailureLimiter`, which remembers [`LIMITED_SOURCES`] addresses).

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use lru::LruCache;
use packet_capture_common::crd::{
    FILES_SUBRESOURCE, GROUP, ON_BEHALF_OF_ENCODING, ON_BEHALF_OF_EXTRA, ON_BEHALF_OF_GROUP,
    ON_BEHALF_OF_UID, ON_BEHALF_OF_USER, PERCENT_ENCODED, PLURAL, RELAY_VERB, RESOURCE,
    parse_on_behalf_extra, percent_decode,
};
use sha2::{Digest as _, Sha256};

use super::ApiError;
use crate::sync::lock;

/// How long a verdict is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// How long a scraper's token and its right to `/metrics` are reused:
/// longer than a scrape interval, so that every agent of a large cluster
/// does not ask the API server twice per scrape. A revoked right still
/// reads the metrics this long.
pub const SCRAPER_CACHE_TTL: Duration = Duration::from_secs(120);
/// Verdicts kept at most (callers are few: the controller and operators).
pub const CACHE_ENTRIES: usize = 1024;
/// The longest `authorization` header (gRPC: metadata) looked at. A
/// service account token is about 1 KiB.
pub const MAX_AUTHORIZATION_BYTES: usize = 8 * 1024;
/// How long a TokenReview or SubjectAccessReview may take.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Refused tokens from one source address within [`FAILURE_WINDOW`] after
/// which it is refused without a review. Above the few a client with a
/// stale token sends before it gives up.
pub const MAX_FAILURES: u32 = 32;
/// The window [`MAX_FAILURES`] is counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a source that reached [`MAX_FAILURES`] is refused.
pub const BLOCK_FOR: Duration = Duration::from_secs(60);
/// Source addresses the limiter remembers at most.
pub const LIMITED_SOURCES: usize = 4096;

/// What a permission is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// `packetcaptureconfigs.networking.packet.io`: the captures.
    Captures,
    /// `packetcaptureconfigs.networking.packet.io/files`: a capture's files.
    CaptureFiles,
    /// `pods` (core): whose traffic may be captured, verb `capture`.
    Pods,
    /// The non-resource URL [`METRICS_PATH`].
    Metrics,
}

/// Where the agent's metrics are served, and the non-resource URL a
/// scraper needs `get` on.
pub const METRICS_PATH: &str = "/metrics";

/// A permission a call needs, as a SubjectAccessReview asks it. `name`
/// `None` asks for every object (a rule without `resourceNames`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: Resource,
    pub name: Option<String>,
}

impl Permission {
    /// `verb` on every capture.
    pub fn captures(verb: &'static str) -> Self {
        Self {
            verb,
            resource: Resource::Captures,
            name: None,
        }
    }

    /// `verb` on the capture `name`.
    pub fn capture(verb: &'static str, name: &str) -> Self {
        Self {
            name: Some(name.to_owned()),
            ..Self::captures(verb)
        }
    }

    /// Reading the files of the capture `name`, or of every capture.
    pub fn files(name: Option<&str>) -> Self {
        Self {
            verb: "get",
            resource: Resource::CaptureFiles,
            name: name.map(str::to_owned),
        }
    }

    /// Reading for the users a call names ([`Authorizer::on_behalf`]).
    pub fn relay() -> Self {
        Self {
            verb: RELAY_VERB,
            ..Self::files(None)
        }
    }

    /// Whether the permission only reads.
    pub fn reads(&self) -> bool {
        matches!(self.verb, "get" | "list")
    }

    /// Reading the agent's metrics, which name its captures: `get` on the
    /// non-resource URL `/metrics`, as kube-rbac-proxy asks.
    pub fn metrics() -> Self {
        Self {
            verb: "get",
            resource: Resource::Metrics,
            name: None,
        }
    }

    /// Capturing any pod's or node's traffic: `capture` on pods in every
    /// namespace. The agent sees only addresses, not whose they are, so a
    /// capture started on it directly needs this; a PacketCaptureConfig's
    /// targets are checked one by one by the webhook.
    pub fn capture_traffic() -> Self {
        Self {
            verb: "capture",
            resource: Resource::Pods,
            name: None,
        }
    }

    /// `spec` asking for this permission.
    fn asked_in(&self, spec: SubjectAccessReviewSpec) -> SubjectAccessReviewSpec {
        let verb = Some(self.verb.into());
        let (group, resource, subresource) = match self.resource {
            Resource::Captures => (GROUP, PLURAL, None),
            Resource::CaptureFiles => (GROUP, PLURAL, Some(FILES_SUBRESOURCE)),
            Resource::Pods => ("", "pods", None),
            Resource::Metrics => {
                return SubjectAccessReviewSpec {
                    non_resource_attributes: Some(NonResourceAttributes {
                        path: Some(METRICS_PATH.into()),
                        verb,
                    }),
                    ..spec
                };
            }
        };
        SubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                name: self.name.clone(),
                verb,
                ..Default::default()
            }),
            ..spec
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.resource {
            Resource::Captures => write!(f, "{} {RESOURCE}", self.verb)?,
            Resource::CaptureFiles => write!(f, "{} {RESOURCE}/{FILES_SUBRESOURCE}", self.verb)?,
            Resource::Pods => return write!(f, "{} pods in every namespace", self.verb),
            Resource::Metrics => return write!(f, "{} {METRICS_PATH}", self.verb),
        }
        match &self.name {
            Some(name) => write!(f, " named {name:?}"),
            None => Ok(()),
        }
    }
}

/// What a request needs before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: health, gRPC health and reflection.
    Open,
    /// A token the cluster authenticates for `Audience`; the handler then
    /// asks for the [`Permission`] of what it touches.
    Authenticated(Audience),
}

/// Whom a token must be meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Audience {
    /// This agent (`--token-audience`): the controller's and operators'
    /// calls. A token for it is of no use against the API server.
    Agent,
    /// The API server itself, as a pod's own service account token is:
    /// what a scraper such as Prometheus sends. Taken for `/metrics` only.
    Cluster,
}

const AGENT_CALL: Access = Access::Authenticated(Audience::Agent);

const AGENT_SERVICE: &str = "/packetcapture.v1.Agent/";

/// The one call of the Agent service open to everyone.
pub const AGENT_HEALTH: &str = "/packetcapture.v1.Agent/Health";

/// The methods of `packetcapture.v1.Agent` and what each needs.
const AGENT_METHODS: [(&str, Access); 10] = [
    ("Health", Access::Open),
    ("StartCapture", AGENT_CALL),
    ("StopCapture", AGENT_CALL),
    ("SetTargets", AGENT_CALL),
    ("GetCapture", AGENT_CALL),
    ("ListCaptures", AGENT_CALL),
    ("WatchCapture", AGENT_CALL),
    ("ListFiles", AGENT_CALL),
    ("DownloadFile", AGENT_CALL),
    ("StreamPackets", AGENT_CALL),
];

fn agent_method(path: &str) -> Option<(&'static str, Access)> {
    let method = path.strip_prefix(AGENT_SERVICE)?;
    Some(
        AGENT_METHODS
            .iter()
            .find(|(m, _)| *m == method)
            .copied()
            // Unknown methods of the service: closed, like the known ones.
            .unwrap_or(("unknown", AGENT_CALL)),
    )
}

/// What a request needs, from its path. The health endpoints, gRPC health
/// and reflection are open; the capture and file calls need a caller
/// authenticated for this agent, the metrics one authenticated for the
/// cluster.
pub fn access(path: &str) -> Access {
    if let Some((_, access)) = agent_method(path) {
        return access;
    }
    if path == "/api" || path.starts_with("/api/") {
        return AGENT_CALL;
    }
    if path == METRICS_PATH {
        return Access::Authenticated(Audience::Cluster);
    }
    Access::Open
}

/// Whether a request's body is a capture's spec or targets (a start, a
/// change of targets): the only bodies of up to
/// [`MAX_REQUEST_BYTES`](super::MAX_REQUEST_BYTES).
pub fn carries_spec(method: &http::Method, path: &str) -> bool {
    if let Some((call, _)) = agent_method(path) {
        return call == "StartCapture" || call == "SetTargets";
    }
    match path.strip_prefix("/api/v1/captures") {
        Some("") => method == http::Method::POST,
        Some(id) => id.ends_with("/targets") && method == http::Method::PUT,
        None => false,
    }
}

/// The label a gRPC request is counted under: the method for the Agent
/// service (a bounded set), the matched service route otherwise.
pub fn grpc_route(path: &str, matched: &str) -> String {
    match agent_method(path) {
        Some((method, _)) => format!("{AGENT_SERVICE}{method}"),
        None => matched.to_owned(),
    }
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

type Decision = Result<(), ApiError>;

/// A token's cache key: its SHA-256, so that the cache keeps no credential.
type TokenHash = [u8; 32];

fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Entries that expire the time given with each after it was put, at
/// most `capacity` of them (the least recently used goes first).
struct TtlCache<K: Hash + Eq, V> {
    entries: LruCache<K, (Instant, V)>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let (expires, value) = self.entries.get(key)?;
        if now < *expires {
            return Some(value.clone());
        }
        self.entries.pop(key);
        None
    }

    fn put(&mut self, key: K, value: V, now: Instant, ttl: Duration) {
        self.entries.put(key, (now + ttl, value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// One source address's record: refusals in the current window, reviews
/// under way, and the end of its block.
#[derive(Debug, Clone, Copy)]
struct Strikes {
    since: Instant,
    failures: u32,
    reviewing: u32,
    blocked_until: Option<Instant>,
}

/// Refused tokens per source address. A source gets at most
/// `max_failures` reviews that could fail per `window` (reviews under way
/// count, so that concurrent requests cannot overshoot); once that many were
/// refused it waits `block`. The addresses seen least recently are
/// forgotten beyond `capacity`.
struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    block: Duration,
    sources: Mutex<LruCache<IpAddr, Strikes>>,
}

impl FailureLimiter {
    fn new(max_failures: u32, window: Duration, block: Duration, capacity: usize) -> Self {
        Self {
            max_failures: max_failures.max(1),
            window,
            block,
            sources: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// A review for `source` may start now (and counts as under way until
    /// [`Self::end`]), or the time until one may.
    fn admit(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut sources = lock(&self.sources);
        let s = sources.get_or_insert_mut(source, || Strikes {
            since: now,
            failures: 0,
            reviewing: 0,
            blocked_until: None,
        });
        if let Some(until) = s.blocked_until {
            if now < until {
                return Err(until - now);
            }
            s.blocked_until = None;
            s.since = now;
            s.failures = 0;
        }
        if now.saturating_duration_since(s.since) >= self.window {
            s.since = now;
            s.failures = 0;
        }
        if s.failures + s.reviewing >= self.max_failures {
            // The reviews under way may each be refused: wait for them.
            return Err(Duration::from_secs(1));
        }
        s.reviewing += 1;
        Ok(())
    }

    /// A review admitted for `source` ended; `refused`: the cluster refused
    /// the token. True when this refusal starts a block.
    fn end(&self, source: IpAddr, refused: bool, now: Instant) -> bool {
        let mut sources = lock(&self.sources);
        // Forgotten meanwhile (capacity): nothing to count against.
        let Some(s) = sources.peek_mut(&source) else {
            return false;
        };
        s.reviewing = s.reviewing.saturating_sub(1);
        if !refused || s.blocked_until.is_some() {
            return false;
        }
        if now.saturating_duration_since(s.since) >= self.window {
            s.since = now;
            s.failures = 0;
        }
        s.failures += 1;
        if s.failures < self.max_failures {
            return false;
        }
        s.blocked_until = Some(now + self.block);
        true
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        lock(&self.sources).len()
    }
}

/// A review counted as under way for its source until it ends, or until
/// the request is dropped half way (the client went away).
struct Admitted<'a> {
    limiter: &'a FailureLimiter,
    source: IpAddr,
    ended: bool,
}

impl Admitted<'_> {
    fn end(mut self, refused: bool) -> bool {
        self.ended = true;
        self.limiter.end(self.source, refused, Instant::now())
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        // Given up half way counts as refused: else a client that cancels
        // each request once its review has started (an HTTP/2 reset) would
        // have tokens reviewed without limit.
        if !self.ended {
            self.limiter.end(self.source, true, Instant::now());
        }
    }
}

/// The address a request came from, for the limiter: IPv4-mapped IPv6
/// addresses as IPv4; unknown (no connection information) as `::`.
pub fn source_address(peer: Option<IpAddr>) -> IpAddr {
    peer.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |ip| ip.to_canonical())
}

/// A caller the cluster authenticated: who, and (as the caches' key) the
/// SHA-256 of the token.
#[derive(Debug)]
pub struct User {
    token: TokenHash,
    info: UserInfo,
    /// The caller who relays this user's call, if the call is relayed.
    relayed_by: Option<String>,
}

impl User {
    pub fn name(&self) -> &str {
        self.info.username.as_deref().unwrap_or("(unnamed)")
    }

    pub fn relayed_by(&self) -> Option<&str> {
        self.relayed_by.as_deref()
    }
}

/// Who calls: a user the cluster authenticated, or anyone when the agent
/// runs without authentication (`--insecure-no-auth`). Put in each
/// authenticated request's extensions by the gate.
#[derive(Debug, Clone)]
pub enum Caller {
    Anyone,
    User(Arc<User>),
}

pub struct Authorizer {
    client: kube::Client,
    audience: String,
    /// Users of the tokens the cluster authenticated, by the audience
    /// they were authenticated for.
    users: Mutex<TtlCache<(Audience, TokenHash), Arc<User>>>,
    /// Verdicts on permissions of authenticated users.
    verdicts: Mutex<TtlCache<(TokenHash, Permission), Decision>>,
    limiter: FailureLimiter,
}

impl Authorizer {
    pub fn new(client: kube::Client, audience: impl Into<String>) -> Self {
        Self {
            client,
            audience: audience.into(),
            users: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
            verdicts: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
            limiter: FailureLimiter::new(MAX_FAILURES, FAILURE_WINDOW, BLOCK_FOR, LIMITED_SOURCES),
        }
    }

    /// With the Kubernetes access kube-rs infers (KUBECONFIG, in-cluster).
    pub async fn infer(audience: impl Into<String>) -> Result<Self, kube::Error> {
        Ok(Self::new(kube::Client::try_default().await?, audience))
    }

    /// The client it asks the API server with.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The user of the request's token (from `headers`, sent from
    /// `source`, see [`source_address`]), as the cluster authenticates it
    /// for `audience`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        source: IpAddr,
        audience: Audience,
    ) -> Result<Arc<User>, ApiError> {
        if let Some(value) = headers.get(header::AUTHORIZATION)
            && value.len() > MAX_AUTHORIZATION_BYTES
        {
            return Err(ApiError::Unauthenticated(format!(
                "authorization: the header is {} bytes long, at most {MAX_AUTHORIZATION_BYTES} are accepted",
                value.len()
            )));
        }
        let token = bearer_token(headers).ok_or_else(|| {
            ApiError::Unauthenticated(
                "authorization: a bearer token is required (authorization: Bearer <token>)".into(),
            )
        })?;
        let hash = token_hash(token);
        // A token the cluster accepted is answered from the cache, also
        // while its source is blocked for others' refused tokens.
        if let Some(user) = lock(&self.users).get(&(audience, hash), Instant::now()) {
            return Ok(user);
        }
        let admitted = match self.limiter.admit(source, Instant::now()) {
            Ok(()) => Admitted {
                limiter: &self.limiter,
                source,
                ended: false,
            },
            Err(wait) => {
                let retry_after = wait.as_secs().max(1);
                return Err(ApiError::RateLimited {
                    message: format!(
                        "authorization: too many refused tokens from {source}; try again in {retry_after} s"
                    ),
                    retry_after,
                });
            }
        };
        let reviewed = self.token_review(token, audience).await;
        // Users of tokens the cluster authenticated are kept; a refused
        // token is not (it would let anyone fill the cache), nor is a
        // cluster that could not answer (asked again next time).
        let reviewed = reviewed.map(|info| {
            let user = Arc::new(User {
                token: hash,
                info,
                relayed_by: None,
            });
            let ttl = match audience {
                Audience::Agent => CACHE_TTL,
                Audience::Cluster => SCRAPER_CACHE_TTL,
            };
            lock(&self.users).put((audience, hash), user.clone(), Instant::now(), ttl);
            user
        });
        if admitted.end(matches!(reviewed, Err(ApiError::Unauthenticated(_)))) {
            tracing::warn!(
                %source,
                "{MAX_FAILURES} tokens from this address were refused within {FAILURE_WINDOW:?}: \
                 refusing its unknown tokens without a review for {BLOCK_FOR:?}"
            );
        }
        reviewed
    }

    /// The user a relayed call is for, when the request names one in the
    /// `ON_BEHALF_OF_*` headers and `caller` may relay
    /// ([`Permission::relay`]); else `caller` itself. Everything the call
    /// does is then decided by that user's permissions.
    pub async fn on_behalf(
        &self,
        caller: Arc<User>,
        headers: &HeaderMap,
    ) -> Result<Arc<User>, ApiError> {
        let Some(name) = headers.get(ON_BEHALF_OF_USER) else {
            return Ok(caller);
        };
        let encoded = match headers.get(ON_BEHALF_OF_ENCODING) {
            None => false,
            Some(v) if v == PERCENT_ENCODED => true,
            Some(_) => {
                return Err(ApiError::Invalid(format!(
                    "{ON_BEHALF_OF_ENCODING}: not {PERCENT_ENCODED:?}"
                )));
            }
        };
        let header_text = |v: &http::HeaderValue, header: &str| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::Invalid(format!("{header}: not a valid header value")))
        };
        // The user's names, as the controller wrote them (`extra` is always
        // percent-encoded, key and value apart).
        let text = |v: &http::HeaderValue, header: &str| {
            let v = header_text(v, header)?;
            if !encoded {
                return Ok(v);
            }
            percent_decode(&v)
                .ok_or_else(|| ApiError::Invalid(format!("{header}: not percent-encoded UTF-8")))
        };
        let name = text(name, ON_BEHALF_OF_USER)?;
        if name.is_empty() {
            return Err(ApiError::Invalid(format!("{ON_BEHALF_OF_USER}: empty")));
        }
        self.authorize(&caller, &Permission::relay()).await?;
        let groups = headers
            .get_all(ON_BEHALF_OF_GROUP)
            .iter()
            .map(|v| text(v, ON_BEHALF_OF_GROUP))
            .collect::<Result<Vec<_>, _>>()?;
        let uid = headers
            .get(ON_BEHALF_OF_UID)
            .map(|v| text(v, ON_BEHALF_OF_UID))
            .transpose()?;
        let mut extra = BTreeMap::<String, Vec<String>>::new();
        for header in headers.get_all(ON_BEHALF_OF_EXTRA) {
            let (key, value) = parse_on_behalf_extra(&header_text(header, ON_BEHALF_OF_EXTRA)?)
                .ok_or_else(|| {
                    ApiError::Invalid(format!(
                        "{ON_BEHALF_OF_EXTRA}: not KEY=VALUE of percent-encoded UTF-8"
                    ))
                })?;
            extra.entry(key).or_default().push(value);
        }
        let key = relayed_key(&caller.token, &name, uid.as_deref(), &groups, &extra);
        Ok(Arc::new(User {
            token: key,
            info: UserInfo {
                username: Some(name),
                groups: Some(groups),
                uid,
                extra: (!extra.is_empty()).then_some(extra),
            },
            relayed_by: Some(caller.name().to_owned()),
        }))
    }

    /// Whether `user` has `permission` (a SubjectAccessReview; verdicts
    /// are kept for [`CACHE_TTL`]).
    pub async fn authorize(&self, user: &User, permission: &Permission) -> Decision {
        let key = (user.token, permission.clone());
        if let Some(decision) = lock(&self.verdicts).get(&key, Instant::now()) {
            return decision;
        }
        let decision = self.access_review(user, permission).await;
        let ttl = match (&decision, permission.resource) {
            (Ok(()), Resource::Metrics) => Some(SCRAPER_CACHE_TTL),
            (Ok(()) | Err(ApiError::Forbidden(_)), _) => Some(CACHE_TTL),
            _ => None,
        };
        if let Some(ttl) = ttl {
            lock(&self.verdicts).put(key, decision.clone(), Instant::now(), ttl);
        }
        decision
    }

    /// Creates `object` (a review) with the API server, within
    /// [`REVIEW_TIMEOUT`].
    async fn create<K>(&self, what: &str, object: &K) -> Result<K, ApiError>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let api = kube::Api::<K>::all(self.client.clone());
        match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), object)).await
        {
            Ok(Ok(created)) => Ok(created),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "{what} failed");
                Err(ApiError::Unavailable(format!(
                    "authorization: the {what} failed: {e}"
                )))
            }
            Err(_) => {
                tracing::warn!("{what} took longer than {REVIEW_TIMEOUT:?}");
                Err(ApiError::Unavailable(format!(
                    "authorization: the {what} took longer than {REVIEW_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn token_review(&self, token: &str, audience: Audience) -> Result<UserInfo, ApiError> {
        let audiences = match audience {
            Audience::Agent => Some(vec![self.audience.clone()]),
            // Left out, the API server reviews for its own audiences.
            Audience::Cluster => None,
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences,
            },
            ..Default::default()
        };
        let review = self.create("TokenReview", &review).await?;
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(ApiError::Unauthenticated(format!(
                "authorization: the token was refused: {why}"
            )));
        }
        // An authenticator that ignores audiences answers without them; the
        // token is then not known to be meant for this agent.
        if audience == Audience::Agent
            && !status
                .audiences
                .unwrap_or_default()
                .contains(&self.audience)
        {
            return Err(ApiError::Unauthenticated(format!(
                "authorization: the token is not for the audience {:?}",
                self.audience
            )));
        }
        Ok(status.user.unwrap_or_default())
    }

    async fn access_review(&self, user: &User, permission: &Permission) -> Decision {
        let info = &user.info;
        let access = SubjectAccessReview {
            spec: permission.asked_in(SubjectAccessReviewSpec {
                user: info.username.clone(),
                groups: info.groups.clone(),
                uid: info.uid.clone(),
                extra: info.extra.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let access = self.create("SubjectAccessReview", &access).await?;
        let status = access.status.unwrap_or_default();
        if status.allowed {
            return Ok(());
        }
        let reason = status
            .reason
            .filter(|r| !r.is_empty())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        Err(ApiError::Forbidden(format!(
            "authorization: {:?} may not {permission}{reason}",
            user.name()
        )))
    }
}

/// What a relayed user's verdicts are cached under: the relaying token and
/// each part of the user, tagged with what it is, so that a uid and a group
/// of the same text make different users.
fn relayed_key(
    relaying: &[u8; 32],
    name: &str,
    uid: Option<&str>,
    groups: &[String],
    extra: &BTreeMap<String, Vec<String>>,
) -> [u8; 32] {
    let mut key = Sha256::new();
    key.update(relaying);
    let extra = extra.iter().flat_map(|(k, values)| {
        std::iter::once((b'k', k.as_str())).chain(values.iter().map(|v| (b'v', v.as_str())))
    });
    let parts = std::iter::once((b'n', name))
        .chain(uid.map(|u| (b'u', u)))
        .chain(groups.iter().map(|g| (b'g', g.as_str())))
        .chain(extra);
    for (tag, part) in parts {
        key.update([tag]);
        key.update((part.len() as u64).to_le_bytes());
        key.update(part.as_bytes());
    }
    key.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_users_differ_by_each_part() {
        let key = |uid: Option<&str>, groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            relayed_key(&[7; 32], "alice", uid, &groups, &BTreeMap::new())
        };
        assert_ne!(key(Some("g"), &[]), key(None, &["g"]));
        let extra = |pairs: &[(&str, &[&str])]| {
            let extra = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|v| v.to_string()).collect()))
                .collect();
            relayed_key(&[7; 32], "alice", None, &[], &extra)
        };
        assert_ne!(extra(&[]), extra(&[("a", &[])]));
        assert_ne!(extra(&[("a", &["b"])]), extra(&[("ab", &[])]));
        assert_ne!(
            extra(&[("a", &["b", "c"])]),
            extra(&[("a", &["b"]), ("c", &[])])
        );
        assert_ne!(extra(&[("g", &[])]), key(None, &["g"]));
        assert_ne!(key(None, &["a", "b"]), key(None, &["ab"]));
        assert_eq!(key(Some("u"), &["g"]), key(Some("u"), &["g"]));
        assert_ne!(
            relayed_key(&[1; 32], "alice", None, &[], &BTreeMap::new()),
            relayed_key(&[2; 32], "alice", None, &[], &BTreeMap::new())
        );
    }

    /// Every method of the service has its row, so its calls are counted
    /// under its name, not `unknown`.
    #[test]
    fn every_method_of_the_proto_is_listed() {
        let proto = include_str!("../../../proto/packetcapture/v1/agent.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        assert!(!methods.is_empty());
        for method in &methods {
            assert!(
                AGENT_METHODS.iter().any(|(m, _)| m == method),
                "{method} is not in AGENT_METHODS"
            );
        }
        assert_eq!(methods.len(), AGENT_METHODS.len());
    }

    #[test]
    fn what_each_call_needs() {
        use Access::Open as O;
        const A: Access = AGENT_CALL;
        for (path, want) in [
            ("/health", O),
            ("/metrics", Access::Authenticated(Audience::Cluster)),
            ("/metrics/x", O),
            ("/api/v1/captures", A),
            ("/api/v1/captures/x", A),
            ("/api/v1/files", A),
            ("/api/v1/files/x.pcap", A),
            ("/api/v1/other", A),
            ("/api", A),
            ("/packetcapture.v1.Agent/Health", O),
            ("/packetcapture.v1.Agent/StartCapture", A),
            ("/packetcapture.v1.Agent/StopCapture", A),
            ("/packetcapture.v1.Agent/WatchCapture", A),
            ("/packetcapture.v1.Agent/DownloadFile", A),
            ("/packetcapture.v1.Agent/Nope", A),
            ("/grpc.health.v1.Health/Check", O),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                O,
            ),
        ] {
            assert_eq!(access(path), want, "{path}");
        }
    }

    #[test]
    fn permissions_ask_what_rbac_rules_name() {
        let attrs = |p: &Permission| serde_json::to_value(p.asked_in(Default::default())).unwrap();
        for (permission, sar, said) in [
            (
                Permission::captures("list"),
                serde_json::json!({"resourceAttributes": {"group": "networking.packet.io", "resource": "packetcaptureconfigs", "verb": "list"}}),
                "list packetcaptureconfigs.networking.packet.io",
            ),
            (
                Permission::capture("update", "web"),
                serde_json::json!({"resourceAttributes": {"group": "networking.packet.io", "resource": "packetcaptureconfigs", "verb": "update", "name": "web"}}),
                "update packetcaptureconfigs.networking.packet.io named \"web\"",
            ),
            (
                Permission::files(Some("web")),
                serde_json::json!({"resourceAttributes": {"group": "networking.packet.io", "resource": "packetcaptureconfigs", "subresource": "files", "verb": "get", "name": "web"}}),
                "get packetcaptureconfigs.networking.packet.io/files named \"web\"",
            ),
            (
                Permission::files(None),
                serde_json::json!({"resourceAttributes": {"group": "networking.packet.io", "resource": "packetcaptureconfigs", "subresource": "files", "verb": "get"}}),
                "get packetcaptureconfigs.networking.packet.io/files",
            ),
            (
                Permission::capture_traffic(),
                serde_json::json!({"resourceAttributes": {"group": "", "resource": "pods", "verb": "capture"}}),
                "capture pods in every namespace",
            ),
            (
                Permission::metrics(),
                serde_json::json!({"nonResourceAttributes": {"path": "/metrics", "verb": "get"}}),
                "get /metrics",
            ),
        ] {
            assert_eq!(attrs(&permission), sar, "{said}");
            assert_eq!(permission.to_string(), said);
        }
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn grpc_routes_are_a_bounded_set() {
        assert_eq!(
            grpc_route(
                "/packetcapture.v1.Agent/ListFiles",
                "/packetcapture.v1.Agent/{*rest}"
            ),
            "/packetcapture.v1.Agent/ListFiles"
        );
        assert_eq!(
            grpc_route(
                "/packetcapture.v1.Agent/x1234",
                "/packetcapture.v1.Agent/{*rest}"
            ),
            "/packetcapture.v1.Agent/unknown"
        );
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn tokens_are_keyed_by_their_sha256() {
        assert_eq!(
            token_hash("abc"),
            [
                0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
                0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
                0xf2, 0x00, 0x15, 0xad
            ]
        );
    }

    #[test]
    fn verdicts_expire_and_the_least_recently_used_goes_first() {
        enum Op {
            Put(&'static str, &'static str, u64),
            /// Expected to be there, or not.
            Get(&'static str, &'static str, u64, bool),
        }
        use Op::{Get, Put};
        let (g, u) = ("get", "update");
        // A cache of two verdicts reused for 30 s.
        for (what, script) in [
            (
                "reused within the TTL",
                vec![Put("a", g, 0), Get("a", g, 29, true)],
            ),
            (
                "not at the TTL",
                vec![Put("a", g, 0), Get("a", g, 30, false)],
            ),
            (
                "an expired verdict is dropped",
                vec![
                    Put("a", g, 0),
                    Get("a", g, 31, false),
                    Get("a", g, 1, false),
                ],
            ),
            (
                "verbs are apart",
                vec![Put("a", g, 0), Get("a", u, 1, false)],
            ),
            (
                "tokens are apart",
                vec![Put("a", g, 0), Get("b", g, 1, false)],
            ),
            (
                "full: the least recently used goes",
                vec![
                    Put("a", g, 0),
                    Put("b", g, 1),
                    Get("a", g, 2, true),
                    Put("c", g, 3),
                    Get("b", g, 4, false),
                    Get("a", g, 4, true),
                    Get("c", g, 4, true),
                ],
            ),
        ] {
            let t0 = Instant::now();
            let mut cache = TtlCache::new(2);
            for (i, op) in script.into_iter().enumerate() {
                match op {
                    Put(token, verb, t) => cache.put(
                        (token_hash(token), verb),
                        (),
                        at(t0, t),
                        Duration::from_secs(30),
                    ),
                    Get(token, verb, t, there) => assert_eq!(
                        cache.get(&(token_hash(token), verb), at(t0, t)).is_some(),
                        there,
                        "{what}: step {i}"
                    ),
                }
                assert!(cache.len() <= 2, "{what}");
            }
        }
    }

    #[test]
    fn refused_tokens_are_limited_per_source() {
        enum Op {
            /// Source, time, and Ok or the seconds to wait.
            Admit(u8, u64, Result<(), u64>),
            /// Source, refused, time, and whether a block starts.
            End(u8, bool, u64, bool),
        }
        use Op::{Admit, End};
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        // At most 3 refusals per 10 s, then 20 s of waiting; 2 sources.
        for (what, script) in [
            (
                "refusals up to the limit, then a wait until the block ends",
                vec![
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 1, Ok(())),
                    End(1, true, 1, false),
                    Admit(1, 2, Ok(())),
                    End(1, true, 2, true),
                    Admit(1, 3, Err(19)),
                    Admit(1, 21, Err(1)),
                    Admit(1, 22, Ok(())),
                ],
            ),
            (
                "accepted tokens do not count",
                vec![
                    Admit(1, 0, Ok(())),
                    End(1, false, 0, false),
                    Admit(1, 1, Ok(())),
                    End(1, false, 1, false),
                    Admit(1, 2, Ok(())),
                    End(1, false, 2, false),
                    Admit(1, 3, Ok(())),
                ],
            ),
            (
                "refusals of an earlier window are forgotten",
                vec![
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 1, Ok(())),
                    End(1, true, 1, false),
                    Admit(1, 11, Ok(())),
                    End(1, true, 11, false),
                    Admit(1, 12, Ok(())),
                    End(1, true, 12, false),
                    Admit(1, 13, Ok(())),
                    End(1, true, 13, true),
                ],
            ),
            (
                "reviews under way count",
                vec![
                    Admit(1, 0, Ok(())),
                    Admit(1, 0, Ok(())),
                    Admit(1, 0, Ok(())),
                    Admit(1, 0, Err(1)),
                    End(1, false, 1, false),
                    Admit(1, 1, Ok(())),
                ],
            ),
            (
                "sources are apart",
                vec![
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, true),
                    Admit(1, 1, Err(19)),
                    Admit(2, 1, Ok(())),
                ],
            ),
            (
                "beyond the capacity the least recently seen source is forgotten",
                vec![
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, false),
                    Admit(1, 0, Ok(())),
                    End(1, true, 0, true),
                    Admit(2, 1, Ok(())),
                    Admit(3, 1, Ok(())),
                    Admit(1, 1, Ok(())),
                    // 1 ended a review of the record that was forgotten.
                    End(1, true, 1, false),
                ],
            ),
        ] {
            let t0 = Instant::now();
            let limiter =
                FailureLimiter::new(3, Duration::from_secs(10), Duration::from_secs(20), 2);
            for (i, op) in script.into_iter().enumerate() {
                match op {
                    Admit(n, t, want) => assert_eq!(
                        limiter.admit(ip(n), at(t0, t)).map_err(|d| d.as_secs()),
                        want,
                        "{what}: step {i}"
                    ),
                    End(n, refused, t, blocks) => assert_eq!(
                        limiter.end(ip(n), refused, at(t0, t)),
                        blocks,
                        "{what}: step {i}"
                    ),
                }
                assert!(limiter.sources() <= 2, "{what}");
            }
        }
    }

    #[test]
    fn sources_are_canonical() {
        for (peer, want) in [
            (Some("10.1.2.3"), "10.1.2.3"),
            (Some("::ffff:10.1.2.3"), "10.1.2.3"),
            (Some("fd00::1"), "fd00::1"),
            (None, "::"),
        ] {
            let peer = peer.map(|p| p.parse::<IpAddr>().unwrap());
            assert_eq!(source_address(peer).to_string(), want, "{peer:?}");
        }
    }

    /// A cluster whose TokenReview authenticates the tokens `good-*` (user
    /// "u", audience "agent") and whose SubjectAccessReview allows `get`
    /// only; it counts the reviews. With `hang` it never answers.
    fn cluster(hang: bool) -> (kube::Client, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let reviews = Arc::new(AtomicUsize::new(0));
        let counted = reviews.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let counted = counted.clone();
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                let path = req.uri().path().to_owned();
                let body = req.into_body().collect_bytes().await.unwrap();
                let mut answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                answer["status"] = if path.ends_with("/tokenreviews") {
                    let token = answer["spec"]["token"].as_str().unwrap_or_default();
                    if token.starts_with("good-") {
                        serde_json::json!({"authenticated": true, "audiences": ["agent"], "user": {"username": "u"}})
                    } else {
                        serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
                    }
                } else {
                    serde_json::json!({"allowed": answer["spec"]["resourceAttributes"]["verb"] == "get"})
                };
                let answer = serde_json::to_vec(&answer).unwrap();
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(201)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(kube::client::Body::from(answer))
                        .unwrap(),
                )
            }
        });
        (kube::Client::new(service, "default"), reviews)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn reviews(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Authenticates `token`, dropping who it is.
    async fn authenticate(authorizer: &Authorizer, token: &str, source: IpAddr) -> Decision {
        authorizer
            .authenticate(&bearer(token), source, Audience::Agent)
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn users_are_remembered_per_audience() {
        let (client, counter) = cluster(false);
        let authorizer = Authorizer::new(client, "agent");
        let source = IpAddr::from([10, 0, 0, 1]);
        for (audience, reviewed) in [
            (Audience::Cluster, 1),
            (Audience::Cluster, 1),
            (Audience::Agent, 2),
            (Audience::Agent, 2),
            (Audience::Cluster, 2),
        ] {
            let user = authorizer
                .authenticate(&bearer("good-1"), source, audience)
                .await;
            assert!(user.is_ok(), "{audience:?}");
            assert_eq!(reviews(&counter), reviewed, "{audience:?}");
        }
    }

    #[tokio::test]
    async fn a_header_over_8_kib_is_refused_unread() {
        let (client, counter) = cluster(false);
        let authorizer = Authorizer::new(client, "agent");
        let source = IpAddr::from([10, 0, 0, 1]);
        let token = |header_len: usize| format!("good-{}", "x".repeat(header_len - 12));
        let at_limit = authenticate(&authorizer, &token(MAX_AUTHORIZATION_BYTES), source).await;
        assert_eq!(at_limit, Ok(()));
        assert_eq!(reviews(&counter), 1);
        let over = authenticate(&authorizer, &token(MAX_AUTHORIZATION_BYTES + 1), source).await;
        assert_eq!(
            over,
            Err(ApiError::Unauthenticated(
                "authorization: the header is 8193 bytes long, at most 8192 are accepted".into()
            ))
        );
        assert_eq!(reviews(&counter), 1, "no review");
        assert_eq!(lock(&authorizer.users).len(), 1, "nothing cached");
    }

    #[tokio::test]
    async fn refused_tokens_are_not_cached_and_block_their_source() {
        let (client, counter) = cluster(false);
        let authorizer = Authorizer::new(client, "agent");
        let (attacker, other) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        // Known before: its user is cached.
        assert_eq!(
            authenticate(&authorizer, "good-known", attacker).await,
            Ok(())
        );
        for i in 0..MAX_FAILURES {
            let d = authenticate(&authorizer, &format!("bogus-{i}"), attacker).await;
            assert!(matches!(d, Err(ApiError::Unauthenticated(_))), "{i}: {d:?}");
        }
        let reviewed = reviews(&counter);
        assert_eq!(reviewed, 1 + MAX_FAILURES as usize);
        assert_eq!(lock(&authorizer.users).len(), 1, "refusals are not cached");
        for token in ["bogus-again", "good-new"] {
            let d = authenticate(&authorizer, token, attacker).await;
            let Err(ApiError::RateLimited {
                message,
                retry_after,
            }) = d
            else {
                panic!("{token}: {d:?}");
            };
            assert_eq!(
                message,
                format!(
                    "authorization: too many refused tokens from 10.0.0.1; try again in {retry_after} s"
                )
            );
            assert!((BLOCK_FOR.as_secs() - 5..=BLOCK_FOR.as_secs()).contains(&retry_after));
        }
        assert_eq!(reviews(&counter), reviewed, "no review while blocked");
        assert_eq!(
            authenticate(&authorizer, "good-known", attacker).await,
            Ok(()),
            "a cached token still passes"
        );
        assert!(matches!(
            authenticate(&authorizer, "bogus-x", other).await,
            Err(ApiError::Unauthenticated(_))
        ));
        assert_eq!(
            reviews(&counter),
            reviewed + 1,
            "other sources are reviewed"
        );
    }

    #[tokio::test]
    async fn users_and_verdicts_are_cached() {
        let (client, counter) = cluster(false);
        let authorizer = Authorizer::new(client, "agent");
        let source = IpAddr::from([10, 0, 0, 1]);
        let denied = |p: &str| {
            Err(ApiError::Forbidden(format!(
                "authorization: \"u\" may not {p}"
            )))
        };
        let (get, update, files) = (
            Permission::captures("get"),
            Permission::capture("update", "web"),
            Permission::files(Some("web")),
        );
        for (permission, want, reviewed) in [
            (&get, Ok(()), 2),
            (&get, Ok(()), 2),
            (
                &update,
                denied("update packetcaptureconfigs.networking.packet.io named \"web\""),
                3,
            ),
            (
                &update,
                denied("update packetcaptureconfigs.networking.packet.io named \"web\""),
                3,
            ),
            (&files, Ok(()), 4),
        ] {
            let user = authorizer
                .authenticate(&bearer("good-1"), source, Audience::Agent)
                .await
                .unwrap();
            let d = authorizer.authorize(&user, permission).await;
            assert_eq!(d, want, "{permission}");
            assert_eq!(
                reviews(&counter),
                reviewed,
                "{permission}: one TokenReview, then SubjectAccessReviews"
            );
        }
        assert_eq!(lock(&authorizer.users).len(), 1);
        assert_eq!(lock(&authorizer.verdicts).len(), 3);
    }

    #[test]
    fn a_review_given_up_half_way_counts_as_refused() {
        let limiter = FailureLimiter::new(2, Duration::from_secs(60), Duration::from_secs(60), 8);
        let source = IpAddr::from([10, 0, 0, 1]);
        for _ in 0..2 {
            limiter.admit(source, Instant::now()).unwrap();
            drop(Admitted {
                limiter: &limiter,
                source,
                ended: false,
            });
        }
        assert!(limiter.admit(source, Instant::now()).is_err(), "blocked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_that_does_not_answer_is_unavailable() {
        let (client, _) = cluster(true);
        let authorizer = Authorizer::new(client, "agent");
        let source = IpAddr::from([10, 0, 0, 1]);
        let started = tokio::time::Instant::now();
        let d = authenticate(&authorizer, "good-1", source).await;
        assert_eq!(
            d,
            Err(ApiError::Unavailable(
                "authorization: the TokenReview took longer than 5s".into()
            ))
        );
        assert_eq!(started.elapsed(), REVIEW_TIMEOUT);
        assert_eq!(lock(&authorizer.users).len(), 0, "not cached");
        assert_eq!(
            authorizer.limiter.admit(source, Instant::now()),
            Ok(()),
            "not counted as refused, and no longer under way"
        );
    }
}
