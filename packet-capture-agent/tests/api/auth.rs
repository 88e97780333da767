//! Authentication and authorization through the cluster's review APIs:
//! against a TokenReview / SubjectAccessReview endpoint the test serves,
//! which also checks what the agent asks (the audience, the verb per call,
//! the user as the TokenReview returned it), and against the local control
//! plane's kube-apiserver with real service-account tokens and the
//! project's RBAC.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use packet_capture_agent::api::auth::{
    BLOCK_FOR, CACHE_TTL, MAX_AUTHORIZATION_BYTES, MAX_FAILURES,
};
use packet_capture_proto::v1 as pb;
use packet_capture_test_support::agent::AgentProcess;
use packet_capture_test_support::cluster::{
    AgentOptions, AgentTls, COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, Cluster,
};
use packet_capture_test_support::privileged;
use serde_json::Value;

use crate::common::apiserver::{
    APISERVER_AUDIENCE, EDITOR_RULES, FakeApiServer, Identity, NAMED_READER_RULES, READER_RULES,
    Tokens, WRITER_RULES, check_auth,
};
use crate::common::{AGENT, Node, Rest, grpc_at, with_token};

const AUDIENCE: &str = "packet-capture-agent";
/// The controller's service account as the API server names it.
static CONTROLLER_USER: LazyLock<String> = LazyLock::new(|| {
    format!("system:serviceaccount:{COMPONENT_NAMESPACE}:{CONTROLLER_SERVICE_ACCOUNT}")
});

fn identity(
    token: &'static str,
    username: &'static str,
    audience: &'static str,
    rules: &'static [&'static str],
) -> Identity {
    Identity {
        token,
        username,
        uid: "0b7f6c1e-uid",
        groups: &["system:serviceaccounts", "system:authenticated"],
        audience,
        rules,
    }
}

/// The controller's token, which may do everything.
fn writer() -> Identity {
    identity(
        "writer-token",
        CONTROLLER_USER.as_str(),
        AUDIENCE,
        WRITER_RULES,
    )
}

/// A reader's token.
fn reader() -> Identity {
    identity("reader-token", "reader", AUDIENCE, READER_RULES)
}

/// An agent on `node` that asks `server` about every token, through a
/// kubeconfig written in `dir`.
fn agent_asking(node: &Node, server: &FakeApiServer, dir: &tempfile::TempDir) -> AgentProcess {
    let kubeconfig = server.kubeconfig(dir.path());
    node.agent(&[], &[("KUBECONFIG", kubeconfig.to_str().unwrap())])
}

#[tokio::test]
async fn auth_against_a_token_review_endpoint() {
    if !privileged("auth_against_a_token_review_endpoint") {
        return;
    }
    let node = Node::new();
    let server = FakeApiServer::start(
        &node.left,
        vec![
            writer(),
            reader(),
            identity("editor-token", "editor", AUDIENCE, EDITOR_RULES),
            identity("named-token", "named", AUDIENCE, NAMED_READER_RULES),
            identity("nobody-token", "nobody", AUDIENCE, &[]),
            identity(
                "relayer-token",
                "relayer",
                AUDIENCE,
                &["relay packetcaptureconfigs/files"],
            ),
            identity(
                "apiserver-token",
                "writer-elsewhere",
                APISERVER_AUDIENCE,
                WRITER_RULES,
            ),
            identity(
                "scraper-token",
                "scraper",
                APISERVER_AUDIENCE,
                &["get /metrics"],
            ),
        ],
    );
    let config_dir = tempfile::tempdir().unwrap();
    let tokens = Tokens {
        writer: "writer-token".into(),
        reader: "reader-token".into(),
        editor: "editor-token".into(),
        named_reader: "named-token".into(),
        nobody: "nobody-token".into(),
        wrong_audience: "apiserver-token".into(),
        scraper: "scraper-token".into(),
    };
    let agent = agent_asking(&node, &server, &config_dir);
    check_auth(&agent.url(), None, &tokens).await;
    // Names made up one per request: refused after the permissions asked
    // for every capture, whose answers are cached, never one review each.
    let rest = Rest::trusting(&agent.url(), None);
    for n in 0..5 {
        for token in ["named-token", "nobody-token"] {
            let file = format!("/api/v1/files/made-up-{n}-20240101-000000.pcap");
            let r = rest.with_token(Some(token)).get(&file).await;
            assert_eq!(r.status(), 403, "{file} with {token}");
            let start = serde_json::json!({"id": format!("made-up-{n}"), "duration": 30, "targetIPs": ["10.77.0.2"]});
            let r = rest
                .with_token(Some(token))
                .post("/api/v1/captures", &start)
                .await;
            assert_eq!(r.status(), 403, "made-up-{n} with {token}");
        }
    }
    drop(agent);

    let requests = server.requests();
    let reviews: Vec<&Value> = requests
        .iter()
        .filter(|(kind, _)| kind == "TokenReview")
        .map(|(_, body)| body)
        .collect();
    assert!(!reviews.is_empty());
    // Tokens are reviewed for the agent's audience, but for /metrics,
    // where the apiserver's own is asked for (by naming none).
    let agents = serde_json::json!([AUDIENCE]);
    for r in &reviews {
        let audiences = &r["spec"]["audiences"];
        assert!(audiences == &agents || audiences.is_null(), "{r}");
    }
    // Users of accepted tokens are cached: one TokenReview per token and
    // audience, though each called many times over REST and gRPC. A
    // refused token is not: one review per request.
    let reviewed = |token: &str, audiences: &Value| {
        reviews
            .iter()
            .filter(|r| r["spec"]["token"] == token && &r["spec"]["audiences"] == audiences)
            .count()
    };
    for token in [
        "reader-token",
        "writer-token",
        "editor-token",
        "named-token",
    ] {
        assert_eq!(reviewed(token, &agents), 1, "{token}");
    }
    // 5 REST and 3 gRPC calls, and /metrics once.
    assert_eq!(reviewed("garbage", &agents), 8);
    assert_eq!(reviewed("garbage", &Value::Null), 1);
    for token in ["apiserver-token", "scraper-token"] {
        assert_eq!(reviewed(token, &Value::Null), 1, "{token}");
    }

    let access: Vec<&Value> = requests
        .iter()
        .filter(|(kind, _)| kind == "SubjectAccessReview")
        .map(|(_, body)| &body["spec"])
        .collect();
    // What each user was asked for: "<verb> <resource>[/<sub>][:<name>]".
    let asked = |user: &str| {
        let mut v: Vec<String> = access
            .iter()
            .filter(|s| s["user"] == user)
            .map(|s| {
                let url = &s["nonResourceAttributes"];
                if !url.is_null() {
                    let (verb, path) = (url["verb"].as_str(), url["path"].as_str());
                    return format!("{} {}", verb.unwrap(), path.unwrap());
                }
                let a = &s["resourceAttributes"];
                let sub = a["subresource"]
                    .as_str()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default();
                let name = a["name"]
                    .as_str()
                    .map(|n| format!(":{n}"))
                    .unwrap_or_default();
                format!(
                    "{} {}{sub}{name}",
                    a["verb"].as_str().unwrap(),
                    a["resource"].as_str().unwrap()
                )
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(
        asked("named"),
        [
            "capture pods",
            "get packetcaptureconfigs/files",
            "get packetcaptureconfigs/files:auth-1",
            "get packetcaptureconfigs/files:auth-3",
            "get packetcaptureconfigs:auth-1",
            "list packetcaptureconfigs",
        ]
    );
    assert_eq!(
        asked("nobody"),
        [
            "capture pods",
            "get packetcaptureconfigs/files",
            "get packetcaptureconfigs/files:auth-1",
            "list packetcaptureconfigs",
            "update packetcaptureconfigs",
        ]
    );
    assert!(
        asked("editor").contains(&"capture pods".to_owned()),
        "{:?}",
        asked("editor")
    );
    // Refused for the agent, it is asked only what /metrics needs.
    assert_eq!(asked("writer-elsewhere"), ["get /metrics"]);
    assert_eq!(asked("scraper"), ["get /metrics"]);
    for s in &access {
        assert_eq!(s["uid"], "0b7f6c1e-uid", "{s}");
        assert_eq!(
            s["groups"],
            serde_json::json!(["system:serviceaccounts", "system:authenticated"]),
            "{s}"
        );
        assert_eq!(
            s["extra"]["authentication.kubernetes.io/credential-id"],
            serde_json::json!(["JTI=0b7f6c1e-uid"]),
            "{s}"
        );
    }
    // A file compressed since it was listed, of a capture this agent does
    // not know (it ran before the agent started): whom it concerns is told
    // 404 for the listed name, and gets the copy.
    let agent = agent_asking(&node, &server, &config_dir);
    let rest = Rest::trusting(&agent.url(), None);
    let listed = "auth-1-20240101-000000.pcap";
    std::fs::write(node.dir.path().join(format!("{listed}.gz")), b"a copy").unwrap();
    for (token, plain, copy) in [
        ("named-token", 404, 200),
        ("reader-token", 404, 200),
        ("nobody-token", 403, 403),
    ] {
        let r = rest.with_token(Some(token));
        assert_eq!(
            r.get(&format!("/api/v1/files/{listed}")).await.status(),
            plain,
            "{token}"
        );
        assert_eq!(
            r.get(&format!("/api/v1/files/{listed}.gz")).await.status(),
            copy,
            "{token}"
        );
    }
    check_relayed_extra(&rest, &server, &format!("/api/v1/files/{listed}.gz")).await;
}

/// A relayed call is decided for the whole user the relay names: its
/// `extra` too, as the API server gave it to the relay (an authorizer
/// other than RBAC may decide by it). A malformed one is refused.
async fn check_relayed_extra(rest: &Rest, server: &FakeApiServer, path: &str) {
    use packet_capture_common::crd::{ON_BEHALF_OF_EXTRA, ON_BEHALF_OF_USER, on_behalf_extra};
    let relayed = |extra: &[String]| {
        let mut req = rest
            .with_token(Some("relayer-token"))
            .request(reqwest::Method::GET, path)
            .header(ON_BEHALF_OF_USER, "reader");
        for e in extra {
            req = req.header(ON_BEHALF_OF_EXTRA, e);
        }
        req.send()
    };
    let extra = [
        on_behalf_extra("scopes.example.com/files", "read ✓"),
        on_behalf_extra("scopes.example.com/files", "a=b"),
        on_behalf_extra("team", "net"),
    ];
    assert_eq!(relayed(&extra).await.unwrap().status(), 200);
    let reviews = server.requests();
    let asked = reviews
        .iter()
        .rev()
        .find(|(kind, body)| kind == "SubjectAccessReview" && body["spec"]["user"] == "reader")
        .expect("the relayed user's review");
    assert_eq!(
        asked.1["spec"]["extra"],
        serde_json::json!({"scopes.example.com/files": ["read ✓", "a=b"], "team": ["net"]}),
        "{}",
        asked.1
    );
    let r = relayed(&["no-equals-sign".to_owned()]).await.unwrap();
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert!(
        err["error"].as_str().unwrap().contains(ON_BEHALF_OF_EXTRA),
        "{err}"
    );
}

/// Deletes a cluster-scoped object (kind, name) on drop, even when the
/// test fails.
struct Cleanup<'a>(&'a Cluster, Vec<String>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let mut args = vec!["delete"];
        args.extend(self.1.iter().map(String::as_str));
        args.push("--ignore-not-found");
        let _ = self.0.kubectl_run(&args);
    }
}

/// The agent on a simulated node, with the agent service account's
/// kubeconfig and the project's RBAC, asks the real apiserver: the
/// controller's service account (allowed by manifests/rbac.yaml) starts and
/// stops; an account bound to packet-capture-viewer reads everything; one
/// bound to packet-capture-editor stops but may not start (no `capture`);
/// one allowed the files of `auth-1` by name sees and downloads those only;
/// an account without a binding gets 403; no token and a token for the
/// apiserver's own audience get 401, but on `/metrics`, which an account
/// bound to packet-capture-metrics-reader reads with such a token.
#[tokio::test]
async fn auth_against_the_local_control_plane() {
    let Some(cluster) = Cluster::for_test("auth_against_the_local_control_plane").await else {
        return;
    };
    cluster
        .apply(&["manifests/rbac.yaml"])
        .await
        .expect("applying manifests/rbac.yaml");
    let ns = cluster.namespace("auth").await.unwrap();
    // The named reader: which captures there are, and the files of auth-1.
    let named_role = format!("packet-capture-auth-1-files-{}", ns.name());
    let role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": named_role},
        "rules": [
            {"apiGroups": ["networking.packet.io"], "resources": ["packetcaptureconfigs"], "verbs": ["list"]},
            {"apiGroups": ["networking.packet.io"], "resources": ["packetcaptureconfigs", "packetcaptureconfigs/files"], "resourceNames": ["auth-1"], "verbs": ["get"]},
        ],
    });
    let role_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(role_file.path(), role.to_string()).unwrap();
    cluster
        .kubectl_async(&["apply", "-f", role_file.path().to_str().unwrap()])
        .await
        .expect("the named reader's role");
    let _named_role = Cleanup(cluster, vec!["clusterrole".into(), named_role.clone()]);
    let mut bindings = Vec::new();
    for (role, account) in [
        ("packet-capture-viewer", "reader"),
        ("packet-capture-editor", "editor"),
        (named_role.as_str(), "named"),
        ("packet-capture-metrics-reader", "scraper"),
    ] {
        let binding = format!("{role}-{}-{account}", ns.name());
        cluster
            .kubectl_async(&[
                "create",
                "clusterrolebinding",
                &binding,
                &format!("--clusterrole={role}"),
                &format!("--serviceaccount={}:{account}", ns.name()),
            ])
            .await
            .unwrap_or_else(|e| panic!("binding {role}: {e}"));
        bindings.push(Cleanup(cluster, vec!["clusterrolebinding".into(), binding]));
    }
    let token = async |namespace: &str, account: &str, audiences: &[&str]| {
        let token = cluster.token_for(namespace, account, audiences).await;
        token.unwrap_or_else(|e| panic!("a token for {namespace}/{account}: {e}"))
    };
    let (system, controller) = (COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT);
    let tokens = Tokens {
        writer: token(system, controller, &[AUDIENCE]).await,
        reader: token(ns.name(), "reader", &[AUDIENCE]).await,
        editor: token(ns.name(), "editor", &[AUDIENCE]).await,
        named_reader: token(ns.name(), "named", &[AUDIENCE]).await,
        nobody: token(ns.name(), "nobody", &[AUDIENCE]).await,
        // The apiserver's own audience.
        wrong_audience: token(system, controller, &[]).await,
        scraper: token(ns.name(), "scraper", &[]).await,
    };
    let node = cluster.add_node("auth").await.unwrap();
    // No controller signs certificates here: the agent serves one the
    // test cluster's CA signed.
    let options = AgentOptions {
        tls: AgentTls::ClusterCa,
        ..AgentOptions::new(AGENT)
    };
    let agent = node
        .start_agent(&options)
        .await
        .expect("the agent on a simulated node");
    let ca = cluster.ca().expect("the cluster's CA");
    check_auth(&agent.url(), Some(&ca), &tokens).await;
    check_relay(&agent.url(), &ca, &tokens, ns.name()).await;
    let log = agent.log();
    assert!(!log.contains("ERROR"), "{log}");
}

/// Calls relayed for a user (the controller's aggregated API): decided by
/// the user's permissions, only by a caller that may `relay`, and only
/// reads.
async fn check_relay(url: &str, ca: &[u8], tokens: &Tokens, namespace: &str) {
    use packet_capture_common::crd::{
        ON_BEHALF_OF_ENCODING, ON_BEHALF_OF_GROUP, ON_BEHALF_OF_USER, PERCENT_ENCODED,
        percent_encode,
    };
    let rest = Rest::trusting(url, Some(ca));
    let files = rest
        .with_token(Some(&tokens.reader))
        .get("/api/v1/files")
        .await
        .json::<Value>()
        .await
        .unwrap();
    let file = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .find(|n| n.starts_with("auth-1-"))
        .expect("a file of auth-1")
        .to_owned();
    let account = |name: &str| format!("system:serviceaccount:{namespace}:{name}");
    let relayed = |token: &str, user: &str, method: reqwest::Method, path: &str| {
        rest.with_token(Some(token))
            .request(method, path)
            .header(ON_BEHALF_OF_USER, user)
            .header(ON_BEHALF_OF_GROUP, "system:serviceaccounts")
            .header(ON_BEHALF_OF_GROUP, "system:authenticated")
            .send()
    };
    let download = format!("/api/v1/files/{file}");
    let get = reqwest::Method::GET;
    // The controller relays for the reader: the reader's permission decides.
    let r = relayed(&tokens.writer, &account("reader"), get.clone(), &download)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.bytes().await.unwrap().is_empty());
    // For an account without the permission: refused, naming that account.
    let r = relayed(&tokens.writer, &account("nobody"), get.clone(), &download)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let err: Value = r.json().await.unwrap();
    assert!(
        err["error"].as_str().unwrap().contains(&account("nobody")),
        "{err}"
    );
    // Names a header cannot carry as they are come percent-encoded, and
    // say so: the reader's name so encoded is the reader.
    let encoded = |user: String, encoding: &str| {
        rest.with_token(Some(&tokens.writer))
            .request(get.clone(), &download)
            .header(ON_BEHALF_OF_ENCODING, encoding)
            .header(ON_BEHALF_OF_USER, user)
            .header(ON_BEHALF_OF_GROUP, percent_encode("system:authenticated"))
            .send()
    };
    let r = encoded(percent_encode(&account("reader")), PERCENT_ENCODED)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A name beyond ASCII that may not read is refused, named as it is.
    let r = encoded(percent_encode("jörg"), PERCENT_ENCODED)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("jörg"), "{err}");
    // Read as it is (by an agent that knows no encoding), an encoded name
    // is no one's.
    let r = relayed(
        &tokens.writer,
        &percent_encode(&account("reader")),
        get.clone(),
        &download,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    // An encoding other than percent, or a name that is not
    // percent-encoded UTF-8, is refused, naming the header.
    for (user, encoding, header) in [
        ("%C3", PERCENT_ENCODED, ON_BEHALF_OF_USER),
        ("reader", "base64", ON_BEHALF_OF_ENCODING),
    ] {
        let r = encoded(user.into(), encoding).await.unwrap();
        assert_eq!(r.status(), 400, "{user} {encoding}");
        let err: Value = r.json().await.unwrap();
        assert!(err["error"].as_str().unwrap().contains(header), "{err}");
    }
    // A caller that may read but not relay cannot speak for others.
    let r = relayed(&tokens.reader, &account("editor"), get.clone(), &download)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let err: Value = r.json().await.unwrap();
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("relay packetcaptureconfigs.networking.packet.io/files"),
        "{err}"
    );
    // Relayed calls only read, whoever they are for.
    let r = relayed(
        &tokens.writer,
        &account("editor"),
        reqwest::Method::DELETE,
        "/api/v1/captures/auth-1",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let err: Value = r.json().await.unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("may only read"),
        "{err}"
    );
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// 10,000 requests with distinct bogus tokens of 4 KiB each, 8 at a time:
/// the agent reviews and refuses (401) the first [`MAX_FAILURES`], then
/// refuses the rest from that address without a TokenReview (429 with
/// Retry-After; gRPC RESOURCE_EXHAUSTED), keeps none of them (its RSS grows
/// by less than 20 MiB), keeps answering /health, and still lets in a caller
/// whose token it accepted before. A header over 8 KiB is refused (401)
/// without a review.
#[tokio::test]
async fn a_flood_of_bogus_tokens_costs_neither_memory_nor_reviews() {
    if !privileged("a_flood_of_bogus_tokens_costs_neither_memory_nor_reviews") {
        return;
    }
    let node = Node::new();
    let server = FakeApiServer::start(&node.left, vec![writer()]);
    let config_dir = tempfile::tempdir().unwrap();
    let agent = agent_asking(&node, &server, &config_dir);
    let rest = Rest::at(&agent.url());
    let writer = rest.with_token(Some("writer-token"));
    assert_eq!(writer.get("/api/v1/captures").await.status(), 200);
    let token_reviews = || {
        server
            .requests()
            .iter()
            .filter(|(kind, _)| kind == "TokenReview")
            .count()
    };
    assert_eq!(token_reviews(), 1);
    let before = rss(agent.pid());

    const REQUESTS: usize = 10_000;
    let started = Instant::now();
    let flooding = std::cell::Cell::new(true);
    // /health answered all along.
    let health = async {
        let mut answered = 0;
        while flooding.get() {
            assert_eq!(rest.get("/health").await.status(), 200);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answered
    };
    let flood = async {
        let statuses: Vec<(u16, Option<String>, String)> = futures::stream::iter(0..REQUESTS)
            .map(|i| {
                let caller = rest.with_token(Some(&format!("bogus-{i:05}-{}", "x".repeat(4096))));
                async move {
                    let r = caller.get("/api/v1/captures").await;
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().await.unwrap();
                    (
                        status,
                        retry_after,
                        body["error"].as_str().unwrap().to_owned(),
                    )
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        flooding.set(false);
        statuses
    };
    let (statuses, health_checks) = tokio::join!(flood, health);
    let elapsed = started.elapsed();
    assert!(health_checks > 0);
    let grown = rss(agent.pid()).saturating_sub(before);
    eprintln!(
        "{REQUESTS} bogus tokens in {elapsed:?}; RSS grew by {} KiB; {} TokenReviews",
        grown / 1024,
        token_reviews() - 1
    );
    // Not a speed check: the writer's verdict, cached before the flood,
    // must still be cached for the checks below.
    assert!(
        elapsed < CACHE_TTL - Duration::from_secs(5),
        "{REQUESTS} refusals took {elapsed:?}"
    );
    assert!(grown < 20 << 20, "RSS grew by {grown} bytes");

    let refused = statuses.iter().filter(|(s, ..)| *s == 401).count();
    let limited: Vec<_> = statuses.iter().filter(|(s, ..)| *s == 429).collect();
    assert_eq!(refused + limited.len(), REQUESTS, "401 or 429 only");
    // The block outlasts the flood: the reviews are the first refusals.
    assert!(elapsed < BLOCK_FOR);
    assert_eq!(refused, MAX_FAILURES as usize);
    assert_eq!(token_reviews(), 1 + MAX_FAILURES as usize);
    for (status, retry_after, error) in &statuses {
        if *status == 401 {
            assert_eq!(
                error,
                "authorization: the token was refused: invalid bearer token"
            );
        } else {
            let seconds: u64 = retry_after.as_deref().unwrap().parse().unwrap();
            assert!((1..=BLOCK_FOR.as_secs()).contains(&seconds), "{seconds}");
            assert!(
                error.starts_with(
                    "authorization: too many refused tokens from 127.0.0.1; try again in "
                ),
                "{error}"
            );
        }
    }

    // Still blocked: no review, over REST and gRPC. The header limit comes
    // first; a token accepted before the flood still works.
    let huge = "x".repeat(MAX_AUTHORIZATION_BYTES);
    let r = rest.with_token(Some(&huge)).get("/api/v1/captures").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        format!(
            "authorization: the header is {} bytes long, at most {MAX_AUTHORIZATION_BYTES} are accepted",
            MAX_AUTHORIZATION_BYTES + 7
        )
    );
    assert_eq!(writer.get("/api/v1/captures").await.status(), 200);
    let mut c = grpc_at(&agent.url()).await;
    let list = |token: &str| with_token(pb::ListCapturesRequest::default(), Some(token));
    let code = |r: Result<tonic::Response<pb::ListCapturesResponse>, tonic::Status>| {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    };
    assert_eq!(
        code(c.list_captures(list("bogus-grpc")).await),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(
        code(c.list_captures(list(&huge)).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(c.list_captures(list("writer-token")).await),
        tonic::Code::Ok
    );
    assert_eq!(token_reviews(), 1 + MAX_FAILURES as usize);
    assert_eq!(rest.get("/health").await.status(), 200);
    let log = agent.log();
    assert_eq!(
        log.matches("refusing its unknown tokens without a review")
            .count(),
        1,
        "{log}"
    );
}

/// What a request's head and the first bytes of its body get: the status
/// and the body of the answer. The rest of the body is never sent.
fn head_only(port: u16, head: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Past the agent's own limits: no answer by then is a failure.
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(b"{\"id\":").unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the answer's end (the agent closes after an error on a body it
    // did not read) or its JSON body is whole.
    while let Ok(n @ 1..) = s.read(&mut buf) {
        answer.extend_from_slice(&buf[..n]);
        if answer.ends_with(b"}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

/// Any pod can have a token for the agent's audience: a body of up to
/// 1 MiB (a start's spec, new targets) is read only for a caller who may
/// capture traffic, a call's other bodies are cut at 64 KiB, and a body
/// must be whole within 10 s of its head.
#[tokio::test]
async fn bodies_are_read_only_for_whom_they_concern_and_only_so_long() {
    if !privileged("bodies_are_read_only_for_whom_they_concern_and_only_so_long") {
        return;
    }
    let node = Node::new();
    let server = FakeApiServer::start(&node.left, vec![writer(), reader()]);
    let config_dir = tempfile::tempdir().unwrap();
    let agent = agent_asking(&node, &server, &config_dir);
    let head = |method: &str, path: &str, token: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        )
    };

    // Refused on its head, its body unread.
    for (method, path) in [
        ("POST", "/api/v1/captures"),
        ("PUT", "/api/v1/captures/auth-1/targets"),
    ] {
        let (status, answer) = head_only(agent.port(), &head(method, path, "reader-token"));
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(answer.contains("authorization: "), "{answer}");
    }
    // Read for a caller who may capture, but not waited for past 10 s.
    let started = Instant::now();
    let (status, answer) = head_only(
        agent.port(),
        &head("POST", "/api/v1/captures", "writer-token"),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("body: "), "{answer}");
    assert!(answer.contains("not whole within 10s"), "{answer}");
    assert!(started.elapsed() >= Duration::from_secs(10), "{answer}");

    // A read's message over 64 KiB is cut, even for a caller it concerns.
    let mut c = grpc_at(&agent.url()).await;
    let big = pb::ListCapturesRequest {
        id_prefix: "x".repeat(100 * 1024),
    };
    let err = c
        .list_captures(with_token(big, Some("writer-token")))
        .await
        .expect_err("a 100 KiB message is cut");
    assert!(err.message().contains("length limit"), "{err:?}");
    let small = pb::ListCapturesRequest {
        id_prefix: "x".repeat(1024),
    };
    c.list_captures(with_token(small, Some("writer-token")))
        .await
        .expect("a small message is read");
}
