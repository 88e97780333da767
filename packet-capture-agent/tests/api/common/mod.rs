//! What the agent's API tests share: an agent in a namespace with a peer to
//! ping, HTTP and gRPC clients, raw HTTP for paths a URL library would
//! normalise, tshark as the oracle for files, and a TokenReview /
//! SubjectAccessReview endpoint for the authentication tests.
#![allow(dead_code)]

pub mod apiserver;
pub mod tc;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use packet_capture_proto::v1::agent_client::AgentClient;
use packet_capture_test_support::{AgentProcess, Netns, VethPair, netns::run};
use tonic::transport::Channel;

pub const AGENT: &str = env!("CARGO_BIN_EXE_packet-capture-agent");
pub const LEFT_IP: &str = "10.77.0.1";
pub const RIGHT_IP: &str = "10.77.0.2";

/// Two namespaces joined by a veth pair: the agent runs in `left`, and the
/// test's thread is moved into `left` too, so that its sockets reach the
/// agent on 127.0.0.1.
pub struct Node {
    pub left: Netns,
    pub right: Netns,
    pub veth: VethPair,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Self {
        let left = Netns::new("apl");
        let right = Netns::new("apr");
        let veth = VethPair::new(
            &left,
            &[&format!("{LEFT_IP}/24")],
            &right,
            &[&format!("{RIGHT_IP}/24")],
        );
        left.enter();
        Self {
            left,
            right,
            veth,
            dir: tempfile::tempdir().expect("a capture directory"),
        }
    }

    /// The agent with the test's capture directory and `args` (e.g.
    /// `--insecure-no-auth`), and `envs`; on 127.0.0.1, over plain HTTP
    /// unless `args` give TLS certificate files.
    pub fn agent(&self, args: &[&str], envs: &[(&str, &str)]) -> AgentProcess {
        self.agent_with_stdout(args, envs, std::process::Stdio::null())
    }

    /// [`agent`](Self::agent), with its standard output on `stdout`.
    pub fn agent_with_stdout(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
        stdout: std::process::Stdio,
    ) -> AgentProcess {
        let dir = self.dir.path().to_str().expect("a UTF-8 path");
        let mut all = vec![
            "--capture-dir",
            dir,
            "--node-name",
            "test-node",
            "--ring-buffer-mb",
            "1",
        ];
        // Plain HTTP on 127.0.0.1 unless the test serves TLS.
        if !args.iter().any(|a| a.starts_with("--tls-")) {
            all.push("--insecure-plaintext");
        }
        all.extend_from_slice(args);
        AgentProcess::spawn_with_stdout(&self.left, AGENT, &all, envs, stdout)
    }

    /// `count` pings from left to right, 0.1 s apart, all answered.
    pub fn ping(&self, count: u32) {
        run(self.left.command("ping").args([
            "-c",
            &count.to_string(),
            "-i",
            "0.1",
            "-W",
            "2",
            RIGHT_IP,
        ]));
    }
}

pub fn http() -> reqwest::Client {
    http_trusting(None)
}

/// An HTTP client that trusts only `ca` (PEM) for HTTPS, when given.
pub fn http_trusting(ca: Option<&[u8]>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder().no_proxy();
    if let Some(ca) = ca {
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca).expect("a PEM CA"));
    }
    builder.build().expect("an HTTP client")
}

/// One caller of an agent's REST API (with a bearer token or without).
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Rest {
    pub fn new(agent: &AgentProcess) -> Self {
        Self::at(&agent.url())
    }

    /// The API of the agent at `url` (`http://<address>:<port>`).
    pub fn at(url: &str) -> Self {
        Self::trusting(url, None)
    }

    /// The API of the agent at `url`, over HTTPS verified with `ca` when
    /// given.
    pub fn trusting(url: &str, ca: Option<&[u8]>) -> Self {
        Self {
            client: http_trusting(ca),
            base: url.to_owned(),
            token: None,
        }
    }

    /// The same API as the bearer of `token`.
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::DELETE, path)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GET `path`, expecting a 200 with JSON.
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        json_of(r).await
    }

    /// Polls the capture until it has ended (the REST API has no push).
    pub async fn ended(&self, id: &str) -> serde_json::Value {
        let path = format!("/api/v1/captures/{id}");
        eventually(
            &format!("{id} to end"),
            Duration::from_secs(20),
            async || {
                let s = self.json(&path).await;
                (s["status"] != "running" && s["status"] != "starting").then_some(s)
            },
        )
        .await
    }
}

/// The JSON body of a response that must be JSON.
pub async fn json_of(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        r.headers()["content-type"],
        "application/json",
        "a JSON response"
    );
    r.json().await.unwrap()
}

pub async fn grpc(agent: &AgentProcess) -> AgentClient<Channel> {
    grpc_at(&agent.url()).await
}

pub async fn grpc_at(url: &str) -> AgentClient<Channel> {
    AgentClient::new(channel(url, None).await)
}

/// A gRPC channel to `url`, over TLS verified with `ca` when given.
pub async fn channel(url: &str, ca: Option<&[u8]>) -> Channel {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("a URI");
    if let Some(ca) = ca {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).expect("TLS settings");
    }
    endpoint
        .connect()
        .await
        .expect("connecting to the agent over gRPC")
}

/// A file downloaded over gRPC, chunk by chunk.
pub async fn grpc_download(client: &mut AgentClient<Channel>, name: &str) -> Vec<Vec<u8>> {
    let stream = client
        .download_file(packet_capture_proto::v1::DownloadFileRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    chunks_of(stream).await
}

/// A download's chunks, read to its end.
pub async fn chunks_of(
    mut stream: tonic::Streaming<packet_capture_proto::v1::FileChunk>,
) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks.push(chunk.data);
    }
    chunks
}

/// A gRPC request with `authorization: Bearer <token>` when there is one.
pub fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("a header value"),
        );
    }
    req
}

/// A raw HTTP/1.1 GET of `path` exactly as written (no normalisation):
/// status, headers (lowercase names), body.
pub fn raw_get(port: u16, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the agent");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).expect("reading the response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head, response[split + 4..].to_vec())
}

/// Packets tshark reads from `file`, one line of `fields` each.
pub fn tshark(file: &Path, fields: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-n", "-r"]).arg(file).args(["-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = run(&mut cmd);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls `check` until it returns `Some`, for conditions with no event to
/// await (the REST API has no push); panics after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
