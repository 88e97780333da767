//! Authentication and authorization through the cluster's review APIs:
//! against a TokenReview / SubjectAccessReview endpoint the test serves,
//! which also checks what the agent asks (the audience, the verb per call,
//! the user as the TokenReview returned it), and against the local control
//! plane's kube-apiserver with real service-account tokens and the
//! project's RBAC.

use packet_capture_test_support::cluster::{
    AgentOptions, COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, Cluster,
};
use packet_capture_test_support::privileged;
use serde_json::Value;

use crate::common::apiserver::{FakeApiServer, Identity, Tokens, check_auth};
use crate::common::{AGENT, Node};

const AUDIENCE: &str = "packet-capture-agent";

fn identity(
    token: &'static str,
    username: &'static str,
    audience: &'static str,
    verbs: &'static [&'static str],
) -> Identity {
    Identity {
        token,
        username,
        uid: "0b7f6c1e-uid",
        groups: &["system:serviceaccounts", "system:authenticated"],
        audience,
        verbs,
    }
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
            identity(
                "writer-token",
                "system:serviceaccount:kube-system:packet-capture-controller",
                "packet-capture-agent",
                &["get", "update"],
            ),
            identity("reader-token", "reader", "packet-capture-agent", &["get"]),
            identity("nobody-token", "nobody", "packet-capture-agent", &[]),
            identity(
                "apiserver-token",
                "writer-elsewhere",
                "https://kubernetes.default.svc",
                &["get", "update"],
            ),
        ],
    );
    let config_dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(config_dir.path());
    let tokens = Tokens {
        writer: "writer-token".into(),
        reader: "reader-token".into(),
        nobody: "nobody-token".into(),
        wrong_audience: "apiserver-token".into(),
    };
    let agent = node.agent(&[], &[("KUBECONFIG", kubeconfig.to_str().unwrap())]);
    check_auth(&agent.url(), &tokens).await;
    drop(agent);

    let requests = server.requests();
    let reviews: Vec<&Value> = requests
        .iter()
        .filter(|(kind, _)| kind == "TokenReview")
        .map(|(_, body)| body)
        .collect();
    assert!(!reviews.is_empty());
    for r in &reviews {
        assert_eq!(
            r["spec"]["audiences"],
            serde_json::json!(["packet-capture-agent"]),
            "{r}"
        );
    }
    // Decisions are cached: one TokenReview per token and verb, though the
    // reader listed several times over REST and gRPC.
    let reviewed = |token: &str| {
        reviews
            .iter()
            .filter(|r| r["spec"]["token"] == token)
            .count()
    };
    assert_eq!(reviewed("reader-token"), 2, "one for get, one for update");
    assert_eq!(reviewed("writer-token"), 2);
    assert_eq!(reviewed("garbage"), 2);

    let access: Vec<&Value> = requests
        .iter()
        .filter(|(kind, _)| kind == "SubjectAccessReview")
        .map(|(_, body)| &body["spec"])
        .collect();
    let verbs_of = |user: &str| {
        let mut v: Vec<&str> = access
            .iter()
            .filter(|s| s["user"] == user)
            .map(|s| s["resourceAttributes"]["verb"].as_str().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(verbs_of("reader"), ["get", "update"]);
    assert_eq!(verbs_of("nobody"), ["get", "update"]);
    assert_eq!(
        verbs_of("system:serviceaccount:kube-system:packet-capture-controller"),
        ["get", "update"]
    );
    assert!(
        verbs_of("writer-elsewhere").is_empty(),
        "refused tokens get no access review"
    );
    for s in &access {
        let attrs = &s["resourceAttributes"];
        assert_eq!(attrs["group"], "networking.packet.io", "{s}");
        assert_eq!(attrs["resource"], "packetcaptureconfigs", "{s}");
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
}

/// Deletes a cluster-scoped binding on drop, even when the test fails.
struct Binding<'a>(&'a Cluster, String);

impl Drop for Binding<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl_run(&[
            "delete",
            "clusterrolebinding",
            &self.1,
            "--ignore-not-found",
        ]);
    }
}

/// The agent on a simulated node, with the agent service account's
/// kubeconfig and the project's RBAC, asks the real apiserver: the
/// controller's service account (allowed by manifests/rbac.yaml) starts and
/// stops, an account bound to packet-capture-viewer reads, an account
/// without a binding gets 403, no token and a token for the apiserver's
/// own audience get 401.
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
    let binding = Binding(cluster, format!("packet-capture-viewer-{}", ns.name()));
    cluster
        .kubectl_async(&[
            "create",
            "clusterrolebinding",
            &binding.1,
            "--clusterrole=packet-capture-viewer",
            &format!("--serviceaccount={}:reader", ns.name()),
        ])
        .await
        .expect("binding the viewer role");
    let controller = (COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT);
    let mut issued = Vec::new();
    for ((namespace, account), audiences) in [
        (controller, &[AUDIENCE][..]),
        ((ns.name(), "reader"), &[AUDIENCE]),
        ((ns.name(), "nobody"), &[AUDIENCE]),
        // The apiserver's own audience.
        (controller, &[]),
    ] {
        let token = cluster.token_for(namespace, account, audiences).await;
        issued.push(token.unwrap_or_else(|e| panic!("a token for {namespace}/{account}: {e}")));
    }
    let [writer, reader, nobody, wrong_audience] = <[String; 4]>::try_from(issued).unwrap();
    let tokens = Tokens {
        writer,
        reader,
        nobody,
        wrong_audience,
    };
    let node = cluster.add_node("auth").await.unwrap();
    let agent = node
        .start_agent(&AgentOptions::new(AGENT))
        .await
        .expect("the agent on a simulated node");
    check_auth(&agent.url(), &tokens).await;
    let log = agent.log();
    assert!(!log.contains("ERROR"), "{log}");
}
