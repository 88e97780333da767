//! Who may call what: a bearer token checked with the cluster's TokenReview
//! (for this agent's audience), then a SubjectAccessReview for the verb the
//! call needs on `packetcaptureconfigs.networking.packet.io`. Decisions are
//! kept for a short while so that a busy caller costs two reviews per
//! [`CACHE_TTL`], not two per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use packet_capture_common::crd::{GROUP, PLURAL, RESOURCE};

use super::ApiError;
use crate::sync::lock;

/// How long a decision is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Decisions kept at most (tokens are large; callers are few).
pub const CACHE_ENTRIES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Reading captures and files.
    Get,
    /// Starting and stopping captures.
    Update,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Update => "update",
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Verb(Verb),
}

const AGENT_SERVICE: &str = "/packetcapture.v1.Agent/";

/// The methods of `packetcapture.v1.Agent` and what each needs.
const AGENT_METHODS: [(&str, Access); 8] = [
    ("Health", Access::Open),
    ("StartCapture", Access::Verb(Verb::Update)),
    ("StopCapture", Access::Verb(Verb::Update)),
    ("GetCapture", Access::Verb(Verb::Get)),
    ("ListCaptures", Access::Verb(Verb::Get)),
    ("WatchCapture", Access::Verb(Verb::Get)),
    ("ListFiles", Access::Verb(Verb::Get)),
    ("DownloadFile", Access::Verb(Verb::Get)),
];

fn agent_method(path: &str) -> Option<(&'static str, Access)> {
    let method = path.strip_prefix(AGENT_SERVICE)?;
    Some(
        AGENT_METHODS
            .iter()
            .find(|(m, _)| *m == method)
            .copied()
            // Unknown methods of the service: closed, like the known ones.
            .unwrap_or(("unknown", Access::Verb(Verb::Get))),
    )
}

/// What a request needs, from its method and path. The health and metrics
/// endpoints, gRPC health and reflection are open; the capture and file
/// calls need `update` (start, stop) or `get` (everything else).
pub fn access(method: &Method, path: &str) -> Access {
    if let Some((_, access)) = agent_method(path) {
        return access;
    }
    if path == "/api" || path.starts_with("/api/") {
        let changes = (*method == Method::POST && path == "/api/v1/captures")
            || (*method == Method::DELETE && path.starts_with("/api/v1/captures/"));
        return Access::Verb(if changes { Verb::Update } else { Verb::Get });
    }
    Access::Open
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

pub struct Authorizer {
    client: kube::Client,
    audience: String,
    cache: Mutex<HashMap<(String, Verb), (Instant, Decision)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client, audience: impl Into<String>) -> Self {
        Self {
            client,
            audience: audience.into(),
            cache: Mutex::new(HashMap::new()),
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

    /// Whether the bearer of `token` may do what `verb` covers.
    pub async fn authorize(&self, token: Option<&str>, verb: Verb) -> Decision {
        let token = token.ok_or_else(|| {
            ApiError::Unauthenticated(
                "authorization: a bearer token is required (authorization: Bearer <token>)".into(),
            )
        })?;
        let key = (token.to_owned(), verb);
        if let Some((at, decision)) = lock(&self.cache).get(&key)
            && at.elapsed() < CACHE_TTL
        {
            return decision.clone();
        }
        let decision = self.review(token, verb).await;
        // A cluster that could not answer is asked again next time.
        if !matches!(decision, Err(ApiError::Unavailable(_))) {
            let mut cache = lock(&self.cache);
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), decision.clone()));
        }
        decision
    }

    async fn review(&self, token: &str, verb: Verb) -> Decision {
        let unavailable = |what: &str, e: kube::Error| {
            tracing::warn!(error = %e, "{what} failed");
            ApiError::Unavailable(format!("authorization: the {what} failed: {e}"))
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let review = kube::Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("TokenReview", e))?;
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(ApiError::Unauthenticated(format!(
                "authorization: the token was refused: {why}"
            )));
        }
        // An authenticator that ignores audiences answers without them; the
        // token is then not known to be meant for this agent.
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(ApiError::Unauthenticated(format!(
                "authorization: the token is not for the audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(PLURAL.into()),
                    verb: Some(verb.as_str().into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let access = kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(|e| unavailable("SubjectAccessReview", e))?;
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
            "authorization: {username:?} may not {} {RESOURCE}{reason}",
            verb.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_call_needs() {
        let get = Access::Verb(Verb::Get);
        let update = Access::Verb(Verb::Update);
        for (method, path, want) in [
            (Method::GET, "/health", Access::Open),
            (Method::GET, "/metrics", Access::Open),
            (Method::POST, "/api/v1/captures", update),
            (Method::GET, "/api/v1/captures", get),
            (Method::GET, "/api/v1/captures/x", get),
            (Method::DELETE, "/api/v1/captures/x", update),
            (Method::GET, "/api/v1/files", get),
            (Method::GET, "/api/v1/files/x.pcap", get),
            (Method::PUT, "/api/v1/other", get),
            (Method::POST, "/packetcapture.v1.Agent/Health", Access::Open),
            (Method::POST, "/packetcapture.v1.Agent/StartCapture", update),
            (Method::POST, "/packetcapture.v1.Agent/StopCapture", update),
            (Method::POST, "/packetcapture.v1.Agent/WatchCapture", get),
            (Method::POST, "/packetcapture.v1.Agent/DownloadFile", get),
            (Method::POST, "/packetcapture.v1.Agent/Nope", get),
            (Method::POST, "/grpc.health.v1.Health/Check", Access::Open),
            (
                Method::POST,
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Access::Open,
            ),
        ] {
            assert_eq!(access(&method, path), want, "{method} {path}");
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
}
