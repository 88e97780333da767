//! A mock API server: each expected request is checked (method, path, query,
//! content type) and answered.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::Handle;

pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the controller made.
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

impl ApiServer {
    pub fn new(handle: Handle<Request<Body>, Response<Body>>) -> Self {
        Self(handle)
    }

    /// Takes the next request, checks its method and path (the part of the
    /// URI before `?`), and answers `status` with what `reply` makes of it.
    pub async fn answer(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        reply: impl FnOnce(&Seen) -> Value,
    ) -> Seen {
        let want = format!("{method} {path}");
        self.answer_if(&want, |m, p| (m, p) == (method, path), status, reply)
            .await
    }

    /// Like `answer`, for a request that `accept(method, path)` describes.
    pub async fn answer_if(
        &mut self,
        want: &str,
        accept: impl Fn(&str, &str) -> bool,
        status: u16,
        reply: impl FnOnce(&Seen) -> Value,
    ) -> Seen {
        let (req, send) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {want}, but the client is gone"));
        let seen = Seen {
            method: req.method().to_string(),
            uri: req.uri().to_string(),
            content_type: req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: {
                let bytes = req.into_body().collect_bytes().await.unwrap();
                if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                }
            },
        };
        let got_path = seen.uri.split('?').next().unwrap_or_default();
        assert!(
            accept(&seen.method, got_path),
            "expected {want}, got {} {} {}",
            seen.method,
            seen.uri,
            seen.body
        );
        let reply = reply(&seen);
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        seen
    }

    /// An Event about a cluster-scoped object (they go to `default`): a new
    /// one, or the next of a series (the same reason about the same objects
    /// again within minutes).
    pub async fn event(&mut self, reason: &str) -> Seen {
        const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
        let seen = self
            .answer_if(
                &format!("event {reason}"),
                |m, p| {
                    (m == "POST" && p == EVENTS)
                        || (m == "PATCH" && p.starts_with(&format!("{EVENTS}/")))
                },
                201,
                |seen| seen.body.clone(),
            )
            .await;
        assert_eq!(seen.body["reason"], reason, "event {}", seen.body);
        seen
    }

    /// A server-side apply of a PacketCaptureConfig's status by the controller.
    pub async fn status_apply(&mut self, name: &str, object: &Value) -> Seen {
        let path = format!("/apis/networking.packet.io/v1/packetcaptureconfigs/{name}/status");
        let seen = self
            .answer("PATCH", &path, 200, |seen| {
                let mut reply = object.clone();
                reply["status"] = seen.body["status"].clone();
                reply
            })
            .await;
        assert_applied_by_controller(&seen);
        seen
    }

    /// A JSON patch of the object's finalizers.
    pub async fn finalizer_patch(&mut self, name: &str, object: &Value) -> Seen {
        let path = format!("/apis/networking.packet.io/v1/packetcaptureconfigs/{name}");
        let seen = self.answer("PATCH", &path, 200, |_| object.clone()).await;
        assert_eq!(seen.content_type, "application/json-patch+json");
        seen
    }
}

/// Server-side apply with the controller's field manager, forced.
pub fn assert_applied_by_controller(seen: &Seen) {
    assert_eq!(
        seen.content_type, "application/apply-patch+yaml",
        "{}",
        seen.uri
    );
    assert!(
        seen.uri.contains("fieldManager=packet-capture-controller"),
        "{}",
        seen.uri
    );
    assert!(seen.uri.contains("force=true"), "{}", seen.uri);
}
