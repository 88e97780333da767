//! Authentication checks against a cluster's TokenReview and
//! SubjectAccessReview APIs. [`check_auth`] takes a kubeconfig and the
//! tokens of four callers, so it runs against any apiserver; [`FakeApiServer`]
//! is a small one the test serves itself, which records what the agent asks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use packet_capture_proto::v1 as pb;
use packet_capture_test_support::Netns;
use serde_json::{Value, json};

use packet_capture_proto::v1::agent_client::AgentClient;

use super::{Rest, channel, with_token};

/// The credential the agent itself must present to the fake apiserver.
pub const AGENT_CREDENTIAL: &str = "agent-credential";
/// The fake apiserver's own audience: a TokenReview naming none asks for it.
pub const APISERVER_AUDIENCE: &str = "https://kubernetes.default.svc";
/// A token whose review the fake apiserver fails (500), as a cluster in
/// trouble would.
pub const UNREVIEWABLE: &str = "unreviewable-token";

/// What the controller may do on the agents: read, start and stop any
/// capture, and capture any traffic (as manifests/rbac.yaml grants it).
pub const WRITER_RULES: &[&str] = &[
    "get packetcaptureconfigs",
    "list packetcaptureconfigs",
    "update packetcaptureconfigs",
    "capture pods",
];
/// packet-capture-viewer: read every capture and its files.
pub const READER_RULES: &[&str] = &[
    "get packetcaptureconfigs",
    "list packetcaptureconfigs",
    "get packetcaptureconfigs/files",
];
/// packet-capture-editor without `capture`: may change captures, may not
/// capture traffic by calling an agent.
pub const EDITOR_RULES: &[&str] = &[
    "get packetcaptureconfigs",
    "list packetcaptureconfigs",
    "update packetcaptureconfigs",
    "get packetcaptureconfigs/files",
];
/// May see which captures there are, and read the files of `auth-1` only.
pub const NAMED_READER_RULES: &[&str] = &[
    "list packetcaptureconfigs",
    "get packetcaptureconfigs:auth-1",
    "get packetcaptureconfigs/files:auth-1",
];

/// Callers for [`check_auth`].
pub struct Tokens {
    /// [`WRITER_RULES`].
    pub writer: String,
    /// [`READER_RULES`].
    pub reader: String,
    /// [`EDITOR_RULES`].
    pub editor: String,
    /// [`NAMED_READER_RULES`].
    pub named_reader: String,
    /// Authenticated, with no right on packetcaptureconfigs.
    pub nobody: String,
    /// Valid for the apiserver's audience only, with the writer's rights.
    pub wrong_audience: String,
    /// Valid for the apiserver's audience, allowed `get /metrics` only
    /// (packet-capture-metrics-reader), as Prometheus' own token is.
    pub scraper: String,
}

/// Checks who may do what over REST and gRPC on the agent at `url` (which
/// authenticates with a cluster's review APIs): 401 without or with a
/// refused token, 403 without the right, success with it; health open,
/// metrics for a token of the apiserver's audience allowed `get /metrics`;
/// files only to whom may read their capture's.
pub async fn check_auth(url: &str, ca: Option<&[u8]>, tokens: &Tokens) {
    let rest = Rest::trusting(url, ca);
    let body = |id: &str| json!({"id": id, "duration": 30, "targetIPs": ["10.77.0.2"]});
    let (get, post, delete) = (
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    );
    let (captures, capture, files) = (
        "/api/v1/captures",
        "/api/v1/captures/auth-1",
        "/api/v1/files",
    );
    let reader = Some(tokens.reader.as_str());
    let writer = Some(tokens.writer.as_str());
    let editor = Some(tokens.editor.as_str());
    let named = Some(tokens.named_reader.as_str());
    let wrong_audience = Some(tokens.wrong_audience.as_str());
    let scraper = Some(tokens.scraper.as_str());
    // (caller, method, path, status), in order. The metrics name the
    // captures: for a token of the apiserver's audience (what Prometheus
    // sends) that may `get /metrics`. Its users are remembered apart: the
    // same tokens are refused for the capture calls below.
    let mut steps = vec![
        (None, get.clone(), "/health", 200),
        (None, get.clone(), "/metrics", 401),
        (Some("garbage"), get.clone(), "/metrics", 401),
        (reader, get.clone(), "/metrics", 401),
        (wrong_audience, get.clone(), "/metrics", 403),
        (scraper, get.clone(), "/metrics", 200),
        (scraper, get.clone(), captures, 401),
    ];
    for (token, status) in [
        (None, 401),
        (Some("garbage"), 401),
        (wrong_audience, 401),
        (Some(tokens.nobody.as_str()), 403),
    ] {
        for (method, path) in [
            (get.clone(), captures),
            (get.clone(), files),
            (get.clone(), "/api/v1/files/auth-1-20240101-000000.pcap"),
            (delete.clone(), capture),
            (post.clone(), captures),
        ] {
            steps.push((token, method, path, status));
        }
    }
    steps.extend([
        // The reader reads, and may not change anything.
        (reader, get.clone(), captures, 200),
        (reader, get.clone(), files, 200),
        // Known for the agent's audience, still not for the metrics.
        (reader, get.clone(), "/metrics", 401),
        (reader, post.clone(), captures, 403),
        // Changing captures is not capturing traffic.
        (editor, post.clone(), captures, 403),
        // The writer starts, reads and stops.
        (writer, post.clone(), captures, 201),
        (reader, get.clone(), capture, 200),
        (writer, get.clone(), capture, 200),
        (named, get.clone(), capture, 200),
        (reader, delete.clone(), capture, 403),
        (editor, delete.clone(), capture, 200),
    ]);
    for (token, method, path, status) in steps {
        let mut req = rest.with_token(token).request(method.clone(), path);
        if method == post {
            req = req.json(&body("auth-1"));
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{method} {path} with {token:?}");
        if status == 401 {
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
        }
        if status == 401 || status == 403 {
            let err: Value = r.json().await.unwrap();
            let message = err["error"].as_str().unwrap();
            assert!(message.starts_with("authorization: "), "{err}");
        }
    }
    let r = rest
        .with_token(editor)
        .post(captures, &body("auth-1"))
        .await;
    let err: Value = r.json().await.unwrap();
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .ends_with("may not capture pods in every namespace"),
        "the refusal names the permission: {err}"
    );

    // Files belong to their capture: a second capture's file is listed and
    // served only to whom may read that capture's files.
    let started = rest
        .with_token(writer)
        .post(captures, &body("auth-3"))
        .await;
    assert_eq!(started.status(), 201);
    let stopped = rest
        .with_token(writer)
        .delete("/api/v1/captures/auth-3")
        .await;
    assert_eq!(stopped.status(), 200);
    let listed = async |token: Option<&str>| {
        let r = rest.with_token(token).get(files).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        let mut names: Vec<String> = body["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    // Maintenance compresses every file but the newest once auth-3 ended;
    // names are stable once auth-1's is compressed.
    let all = super::eventually(
        "auth-1's file compressed",
        Duration::from_secs(30),
        async || {
            let names = listed(reader).await;
            names
                .iter()
                .any(|n| n.starts_with("auth-1-") && (n.ends_with(".gz") || n.ends_with(".zst")))
                .then_some(names)
        },
    )
    .await;
    let of = |capture: &str| {
        all.iter()
            .find(|n| n.starts_with(&format!("{capture}-")))
            .unwrap_or_else(|| panic!("a file of {capture} in {all:?}"))
            .clone()
    };
    let (first, third) = (of("auth-1"), of("auth-3"));
    assert_eq!(listed(named).await, std::slice::from_ref(&first));
    for (token, file, status) in [
        (named, &first, 200),
        (named, &third, 403),
        (reader, &third, 200),
        (editor, &first, 200),
    ] {
        let r = rest
            .with_token(token)
            .get(&format!("/api/v1/files/{file}"))
            .await;
        assert_eq!(r.status(), status, "{file} with {token:?}");
        if status == 403 {
            let err: Value = r.json().await.unwrap();
            assert_eq!(
                err["error"].as_str().unwrap().split(" may not ").nth(1),
                Some("get packetcaptureconfigs.networking.packet.io/files named \"auth-3\""),
                "{err}"
            );
        }
    }

    // gRPC: the same decisions as status codes.
    let mut c = AgentClient::new(channel(url, ca).await);
    let h = c.health(with_token(pb::HealthRequest {}, None)).await;
    assert!(h.is_ok(), "Health is open: {h:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(url, ca).await);
    let served = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("grpc.health.v1 is open")
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let list = |token: Option<&str>| with_token(pb::ListCapturesRequest::default(), token);
    let start = |token: Option<&str>| {
        with_token(
            pb::StartCaptureRequest {
                id: "auth-2".into(),
                name: String::new(),
                spec: Some(pb::CaptureSpec {
                    duration_seconds: 30,
                    max_packets: 10,
                    ..Default::default()
                }),
            },
            token,
        )
    };
    let download = |name: &str, token: Option<&str>| {
        with_token(
            pb::DownloadFileRequest {
                name: name.to_owned(),
                ..Default::default()
            },
            token,
        )
    };
    for (token, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some("garbage"), tonic::Code::Unauthenticated),
        (
            Some(tokens.wrong_audience.as_str()),
            tonic::Code::Unauthenticated,
        ),
        (Some(tokens.nobody.as_str()), tonic::Code::PermissionDenied),
    ] {
        assert_eq!(c.list_captures(list(token)).await.unwrap_err().code(), code);
        assert_eq!(
            c.start_capture(start(token)).await.unwrap_err().code(),
            code
        );
        assert_eq!(
            c.download_file(download(&first, token))
                .await
                .unwrap_err()
                .code(),
            code
        );
    }
    assert_eq!(
        c.download_file(download(&third, named))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    let mut chunks = c
        .download_file(download(&first, named))
        .await
        .expect("the named reader downloads its capture's file")
        .into_inner();
    assert!(chunks.message().await.unwrap().is_some());
    let files = c
        .list_files(with_token(pb::ListFilesRequest {}, named))
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(
        files.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&first)
    );
    c.list_captures(list(reader)).await.expect("reader lists");
    for token in [reader, editor] {
        assert_eq!(
            c.start_capture(start(token)).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
    c.start_capture(start(writer)).await.expect("writer starts");
    let stop = with_token(
        pb::StopCaptureRequest {
            id: "auth-2".into(),
        },
        writer,
    );
    c.stop_capture(stop).await.expect("writer stops");
}

/// An identity the fake apiserver knows.
pub struct Identity {
    pub token: &'static str,
    pub username: &'static str,
    pub uid: &'static str,
    pub groups: &'static [&'static str],
    pub audience: &'static str,
    /// What it may do, as RBAC would allow it: `"<verb> <resource>[/<subresource>][:<name>]"`
    /// or `"<verb> <path>"`, e.g. `"capture pods"`,
    /// `"get packetcaptureconfigs/files:auth-1"`, `"get /metrics"`.
    pub rules: &'static [&'static str],
}

#[derive(Clone)]
struct Fake {
    identities: Arc<Vec<Identity>>,
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

/// TokenReview and SubjectAccessReview on 127.0.0.1 inside a namespace,
/// answering as the apiserver does, recording each review it gets.
pub struct FakeApiServer {
    port: u16,
    fake: Fake,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    pub fn start(ns: &Netns, identities: Vec<Identity>) -> Self {
        let fake = Fake {
            identities: Arc::new(identities),
            requests: Arc::default(),
        };
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = fake.clone();
        let ns_name = ns.name().to_owned();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
            // SAFETY: setns on a valid namespace fd only changes this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let app = axum::Router::new()
                    .route(
                        "/apis/authentication.k8s.io/v1/tokenreviews",
                        post(token_review),
                    )
                    .route(
                        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                        post(access_review),
                    )
                    .with_state(served);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let port = port_rx.recv().expect("the fake apiserver's port");
        Self {
            port,
            fake,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Writes a kubeconfig for it into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\n\
                 users:\n- name: agent\n  user:\n    token: {AGENT_CREDENTIAL}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
                self.port
            ),
        )
        .unwrap();
        path
    }

    /// `(kind, body)` of each review received, in order.
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.fake.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Refuses callers without the agent's credential (as the apiserver
/// would), and records the review.
fn receive(fake: &Fake, headers: &HeaderMap, kind: &str, body: &Value) -> Result<(), StatusCode> {
    let expected = format!("Bearer {AGENT_CREDENTIAL}");
    if headers
        .get("authorization")
        .is_none_or(|v| v.as_bytes() != expected.as_bytes())
    {
        return Err(StatusCode::UNAUTHORIZED);
    }
    fake.requests
        .lock()
        .unwrap()
        .push((kind.to_owned(), body.clone()));
    Ok(())
}

async fn token_review(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    receive(&fake, &headers, "TokenReview", &body)?;
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    if token == UNREVIEWABLE {
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let audiences: Vec<&str> = body["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_else(|| vec![APISERVER_AUDIENCE]);
    let status = match fake.identities.iter().find(|i| i.token == token) {
        Some(i) if audiences.contains(&i.audience) => json!({
            "authenticated": true,
            "audiences": [i.audience],
            "user": {
                "username": i.username,
                "uid": i.uid,
                "groups": i.groups,
                "extra": {"authentication.kubernetes.io/credential-id": [format!("JTI={}", i.uid)]},
            },
        }),
        Some(_) => {
            json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    Ok(Json(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": body["spec"],
        "status": status,
    })))
}

/// Whether `rule` (see [`Identity::rules`]) allows what a
/// SubjectAccessReview's `spec` asks, as RBAC decides: a rule without a
/// name allows every name, one with a name only that name; a rule of a
/// path (`"get /metrics"`) allows that non-resource URL.
fn allows(rule: &str, spec: &Value) -> bool {
    let (verb, what) = rule.split_once(' ').unwrap();
    if what.starts_with('/') {
        let url = &spec["nonResourceAttributes"];
        return url["verb"] == verb && url["path"] == what;
    }
    let attrs = &spec["resourceAttributes"];
    let (what, name) = match what.split_once(':') {
        Some((what, name)) => (what, Some(name)),
        None => (what, None),
    };
    let (resource, subresource) = match what.split_once('/') {
        Some((r, s)) => (r, s),
        None => (what, ""),
    };
    let group = if resource == "pods" {
        ""
    } else {
        "networking.packet.io"
    };
    attrs["verb"] == verb
        && attrs["group"].as_str().unwrap_or_default() == group
        && attrs["resource"] == resource
        && attrs["subresource"].as_str().unwrap_or_default() == subresource
        && name.is_none_or(|n| attrs["name"] == n)
}

async fn access_review(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    receive(&fake, &headers, "SubjectAccessReview", &body)?;
    let spec = &body["spec"];
    let allowed = fake
        .identities
        .iter()
        .any(|i| spec["user"] == i.username && i.rules.iter().any(|rule| allows(rule, spec)));
    Ok(Json(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "metadata": {},
        "spec": spec,
        "status": {"allowed": allowed, "reason": if allowed { "allowed by the test" } else { "" }},
    })))
}
