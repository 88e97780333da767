//! Authentication checks against a cluster's TokenReview and
//! SubjectAccessReview APIs. [`check_auth`] takes a kubeconfig and the
//! tokens of four callers, so it runs against any apiserver; [`FakeApiServer`]
//! is a small one the test serves itself, which records what the agent asks.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use http::{HeaderMap, StatusCode};
use packet_capture_proto::v1 as pb;
use packet_capture_test_support::Netns;
use serde_json::{Value, json};

use super::{Rest, grpc_at, with_token};

/// The credential the agent itself must present to the fake apiserver.
pub const AGENT_CREDENTIAL: &str = "agent-credential";

/// Callers for [`check_auth`].
pub struct Tokens {
    /// May `get` and `update` packetcaptureconfigs.
    pub writer: String,
    /// May `get` only.
    pub reader: String,
    /// Authenticated, with no right on packetcaptureconfigs.
    pub nobody: String,
    /// Valid for another audience only.
    pub wrong_audience: String,
}

/// Checks who may do what over REST and gRPC on the agent at `url` (which
/// authenticates with a cluster's review APIs): 401 without or with a
/// refused token, 403 without the right, success with it; health and
/// metrics open.
pub async fn check_auth(url: &str, tokens: &Tokens) {
    let rest = Rest::at(url);
    let body = json!({"id": "auth-1", "duration": 30, "targetIPs": ["10.77.0.2"]});
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
    // (caller, method, path, status), in order.
    let mut steps = vec![
        (None, get.clone(), "/health", 200),
        (None, get.clone(), "/metrics", 200),
    ];
    for (token, status) in [
        (None, 401),
        (Some("garbage"), 401),
        (Some(tokens.wrong_audience.as_str()), 401),
        (Some(tokens.nobody.as_str()), 403),
    ] {
        for (method, path) in [
            (get.clone(), captures),
            (get.clone(), files),
            (get.clone(), "/api/v1/files/x.pcap"),
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
        (reader, post.clone(), captures, 403),
        // The writer starts, reads and stops.
        (writer, post.clone(), captures, 201),
        (reader, get.clone(), capture, 200),
        (writer, get.clone(), capture, 200),
        (reader, delete.clone(), capture, 403),
        (writer, delete.clone(), capture, 200),
    ]);
    for (token, method, path, status) in steps {
        let mut req = rest.with_token(token).request(method.clone(), path);
        if method == post {
            req = req.json(&body);
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

    // gRPC: the same decisions as status codes.
    let mut c = grpc_at(url).await;
    let h = c.health(with_token(pb::HealthRequest {}, None)).await;
    assert!(h.is_ok(), "Health is open: {h:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let served = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("grpc.health.v1 is open")
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let list = |token: Option<&str>| with_token(pb::ListCapturesRequest {}, token);
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
        let download = with_token(
            pb::DownloadFileRequest {
                name: "x.pcap".into(),
            },
            token,
        );
        assert_eq!(c.download_file(download).await.unwrap_err().code(), code);
    }
    c.list_captures(list(reader)).await.expect("reader lists");
    assert_eq!(
        c.start_capture(start(reader)).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
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
    /// Verbs allowed on packetcaptureconfigs.networking.packet.io.
    pub verbs: &'static [&'static str],
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
    let audiences: Vec<&str> = body["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
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

async fn access_review(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    receive(&fake, &headers, "SubjectAccessReview", &body)?;
    let spec = &body["spec"];
    let attrs = &spec["resourceAttributes"];
    let allowed = fake.identities.iter().any(|i| {
        spec["user"] == i.username
            && attrs["group"] == "networking.packet.io"
            && attrs["resource"] == "packetcaptureconfigs"
            && i.verbs.iter().any(|v| attrs["verb"] == *v)
    });
    Ok(Json(json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "metadata": {},
        "spec": spec,
        "status": {"allowed": allowed, "reason": if allowed { "allowed by the test" } else { "" }},
    })))
}
