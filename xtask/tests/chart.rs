//! The chart's promises, read from what `helm template` renders: least
//! privilege, the wiring between objects, what each value changes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_yaml::Value;
use xtask::chart::*;
use xtask::manifests::{FILES, NAMESPACE, generate};
use xtask::util::{helm, root};

/// The helm to test with; in CI a missing helm fails the test.
fn helm_or_fail() -> PathBuf {
    helm().expect("the chart tests need helm")
}

fn get<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(docs, kind, name).unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The entry named `name` of the list `list` (containers, env, volumes).
fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|l| l.iter().find(|e| e["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no {what} {name}"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    named(
        &workload["spec"]["template"]["spec"]["containers"],
        name,
        "container",
    )
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    named(&container["env"], name, "env")
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    named(
        &workload["spec"]["template"]["spec"]["volumes"],
        name,
        "volume",
    )
}

fn mount_path<'a>(container: &'a Value, volume: &str) -> &'a str {
    named(&container["volumeMounts"], volume, "mount of volume")["mountPath"]
        .as_str()
        .expect("a mountPath")
}

/// One thing a role allows: API group, resource, verb, and the names it is
/// limited to (empty: any).
type Grant = (String, String, String, Vec<String>);

fn rules(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let mut names: Vec<String> = strs(&rule["resourceNames"])
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.sort();
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                for verb in strs(&rule["verbs"]) {
                    out.insert((
                        group.to_owned(),
                        resource.to_owned(),
                        verb.to_owned(),
                        names.clone(),
                    ));
                }
            }
        }
    }
    out
}

/// Grants on any name.
fn grants(table: &[(&str, &[&str], &[&str])]) -> BTreeSet<Grant> {
    named_grants(
        &table
            .iter()
            .map(|(g, r, v)| (*g, *r, *v, &[][..]))
            .collect::<Vec<_>>(),
    )
}

/// API group, resources, verbs and the names they are limited to (empty: any).
type NamedRule<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

/// Grants limited to the names given (empty: any).
fn named_grants(table: &[NamedRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs, names) in table {
        let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        names.sort();
        for resource in *resources {
            for verb in *verbs {
                out.insert((
                    group.to_string(),
                    resource.to_string(),
                    verb.to_string(),
                    names.clone(),
                ));
            }
        }
    }
    out
}

/// The value of the controller's `--<flag>=` argument.
fn flag<'a>(deploy: &'a Value, flag: &str) -> Option<&'a str> {
    let prefix = format!("--{flag}=");
    strs(&container(deploy, "controller")["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix(&prefix))
}

fn labels_match(selector: &Value, labels: &Value) {
    let selector = selector.as_mapping().expect("a selector");
    assert!(!selector.is_empty(), "empty selector");
    for (k, v) in selector {
        assert_eq!(
            &labels[k], v,
            "label {k:?} of the selector is not on the pods"
        );
    }
}

#[test]
fn lint_is_clean_with_default_and_non_default_values() {
    let helm = helm_or_fail();
    // And each way of getting the webhook's certificate the defaults and
    // the non-default values leave out: self-managed, and none at all.
    for args in [
        &[][..],
        &["-f", NON_DEFAULT_VALUES][..],
        &["--set", "certManager.enabled=false"][..],
        &["--set", "webhook.enabled=false"][..],
    ] {
        let out = lint(&helm, args).unwrap_or_else(|e| panic!("helm lint {args:?}: {e}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

/// Kinds the chart renders that live outside any namespace.
/// The one namespaced object outside the release's namespace: the
/// controller's binding to the API server's role for its ConfigMap in
/// kube-system (how it names users of the aggregated API).
const AUTHENTICATION_READER: &str = "packet-capture-controller-authentication-reader";

/// Whether `doc` belongs in the release's namespace: anything namespaced
/// but [`AUTHENTICATION_READER`].
fn in_release_namespace(doc: &Value) -> bool {
    !cluster_scoped(doc["kind"].as_str().unwrap_or_default())
        && doc["metadata"]["name"] != AUTHENTICATION_READER
}

fn cluster_scoped(kind: &str) -> bool {
    kind.starts_with("Cluster")
        || kind.ends_with("WebhookConfiguration")
        || kind == "Namespace"
        || kind == "APIService"
}

#[test]
fn default_values_render_the_documented_install() {
    // As the README installs it: `--namespace packet-capture`.
    let docs = render(&helm_or_fail(), &["--namespace", NAMESPACE]).unwrap();
    assert!(
        find(&docs, "Namespace", NAMESPACE).is_none(),
        "helm install --create-namespace makes it"
    );
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap();
        if in_release_namespace(doc) {
            assert_eq!(
                doc["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
                "{kind}"
            );
        }
        let labels = &doc["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/name"].as_str(),
            Some("packet-capture"),
            "{kind}"
        );
        assert_eq!(
            labels["app.kubernetes.io/part-of"].as_str(),
            Some("packet-capture")
        );
    }

    let config = get(&docs, "ConfigMap", "packet-capture-config");
    let data = config["data"].as_mapping().unwrap();
    let want = [
        ("MAX_CAPTURE_FILES", "5"),
        ("MAX_CAPTURE_FILE_SIZE_MB", "10"),
        ("LOG_LEVEL", "INFO"),
        ("AGENT_PORT", "8080"),
        ("MAX_CAPTURE_DURATION", "86400"),
        ("MAX_CAPTURE_PACKETS", "10000000"),
        ("MAX_CONCURRENT_CAPTURES", "16"),
        ("MAX_CAPTURES_PER_REQUESTER", "10"),
    ];
    assert_eq!(data.len(), want.len(), "{data:?}");
    for (key, value) in want {
        assert_eq!(config["data"][key].as_str(), Some(value), "{key}");
    }

    // The controller: two replicas with leader election, locked down, a
    // token for the agents, and the webhook's certificate from
    // cert-manager's Secret, read through the API (no volume to wait for).
    let deploy = get(&docs, "Deployment", "packet-capture-controller");
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        Some("packet-capture-controller")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let c = container(deploy, "controller");
    assert_eq!(
        c["image"].as_str(),
        Some("ghcr.io/packet-capture/packet-capture-controller:0.1.0")
    );
    let args = strs(&c["args"]);
    for arg in [
        "--leader-election",
        "--agent-token-file=/var/run/secrets/packet-capture/token",
        "--webhook-certs=cert-manager",
        "--webhook-cert-secret=packet-capture-webhook-tls",
        "--webhook-port=8443",
        "--metrics-port=8081",
        "--config-map=packet-capture-config",
        "--agent-selector=app=packet-capture-agent",
    ] {
        assert!(args.contains(&arg), "controller args {args:?} lack {arg}");
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["envFrom"][0]["configMapRef"]["name"].as_str(),
        Some("packet-capture-config")
    );
    assert_eq!(
        env(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.namespace")
    );
    let token = &volume(deploy, "agent-token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"].as_str(), Some("packet-capture-agent"));
    assert_eq!(
        format!(
            "{}/{}",
            mount_path(c, "agent-token"),
            token["path"].as_str().unwrap()
        ),
        "/var/run/secrets/packet-capture/token"
    );
    assert!(!args.contains(&"--disable-webhook"), "{args:?}");
    let volumes = &deploy["spec"]["template"]["spec"]["volumes"];
    assert!(
        volumes
            .as_sequence()
            .unwrap()
            .iter()
            .all(|v| v["secret"].is_null()),
        "no Secret volume: {volumes:?}"
    );
    assert!(get(&docs, "PodDisruptionBudget", "packet-capture-controller").is_mapping());

    // The agent: every Linux node, host network, capabilities instead
    // of privileged, the capture directory from the host and nothing else
    // (the programs are not pinned: no bpffs).
    let ds = get(&docs, "DaemonSet", "packet-capture-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        Some("packet-capture-agent")
    );
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod["nodeSelector"]["kubernetes.io/os"].as_str(),
        Some("linux")
    );
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0]["operator"].as_str(), Some("Exists"));
    assert!(tolerations[0]["key"].is_null() && tolerations[0]["effect"].is_null());
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["app"].as_str(),
        Some("packet-capture-agent")
    );
    let a = container(ds, "agent");
    assert_eq!(
        a["image"].as_str(),
        Some("ghcr.io/packet-capture/packet-capture-agent:0.1.0")
    );
    let sc = &a["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(0));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strs(&sc["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "NET_RAW"]
    );
    assert_eq!(
        env(a, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    assert_eq!(
        env(a, "CAPTURE_DIR")["value"].as_str(),
        Some("/var/lib/packet-captures")
    );
    assert_eq!(
        a["envFrom"][0]["configMapRef"]["name"].as_str(),
        Some("packet-capture-config")
    );
    // The probes ask the agent on the port of its ConfigMap (AGENT_PORT),
    // whatever the chart rendered.
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            strs(&a[probe]["exec"]["command"]),
            ["packet-capture-agent", "health"],
            "{probe}"
        );
    }
    assert_eq!(a["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(
        volume(ds, "captures")["hostPath"]["path"].as_str(),
        Some("/var/lib/packet-captures")
    );
    assert_eq!(mount_path(a, "captures"), "/var/lib/packet-captures");
    let volumes = pod["volumes"].as_sequence().unwrap();
    assert!(
        volumes
            .iter()
            .all(|v| v["hostPath"]["path"].as_str() != Some("/sys/fs/bpf")),
        "the agent mounts no bpffs"
    );

    // The webhook: cert-manager issues the certificate and injects its CA.
    let vwc = get(
        &docs,
        "ValidatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    let hook = &vwc["webhooks"][0];
    assert_eq!(hook["failurePolicy"].as_str(), Some("Fail"));
    assert_eq!(strs(&hook["rules"][0]["operations"]), ["CREATE", "UPDATE"]);
    assert_eq!(
        strs(&hook["rules"][0]["resources"]),
        ["packetcaptureconfigs"]
    );
    assert_eq!(
        strs(&hook["rules"][0]["apiGroups"]),
        ["networking.packet.io"]
    );
    assert!(hook["clientConfig"]["caBundle"].is_null());
    assert_eq!(
        vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str(),
        Some(format!("{NAMESPACE}/packet-capture-webhook").as_str())
    );
    // The mutating webhook (the requester annotation): the same service,
    // rules, policy and CA, on /mutate.
    let mwc = get(
        &docs,
        "MutatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    let mutating = &mwc["webhooks"][0];
    assert_eq!(
        mutating["clientConfig"]["service"]["path"].as_str(),
        Some("/mutate")
    );
    for same in ["failurePolicy", "rules", "sideEffects", "timeoutSeconds"] {
        assert_eq!(mutating[same], hook[same], "{same}");
    }
    assert_eq!(
        mutating["clientConfig"]["service"]["name"],
        hook["clientConfig"]["service"]["name"]
    );
    assert_eq!(
        mwc["metadata"]["annotations"],
        vwc["metadata"]["annotations"]
    );
    assert!(get(&docs, "Issuer", "packet-capture-selfsigned")["spec"]["selfSigned"].is_mapping());
    assert!(find(&docs, "ServiceMonitor", "packet-capture-controller").is_none());
}

/// The objects refer to each other by name, port and label; each
/// reference must land.
fn assert_wired(docs: &[Value], ns: &str) {
    let deploy = get(docs, "Deployment", "packet-capture-controller");
    let ds = get(docs, "DaemonSet", "packet-capture-agent");
    let controller_pods = &deploy["spec"]["template"]["metadata"]["labels"];
    let agent_pods = &ds["spec"]["template"]["metadata"]["labels"];
    labels_match(&deploy["spec"]["selector"]["matchLabels"], controller_pods);
    labels_match(&ds["spec"]["selector"]["matchLabels"], agent_pods);
    let c = container(deploy, "controller");
    let port_names: Vec<&str> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for (svc, pods) in [
        ("packet-capture-controller-metrics", controller_pods),
        ("packet-capture-agent", agent_pods),
    ] {
        labels_match(&get(docs, "Service", svc)["spec"]["selector"], pods);
    }
    assert!(port_names.contains(&"http-metrics"));
    for sa in ["packet-capture-controller", "packet-capture-agent"] {
        assert!(find(docs, "ServiceAccount", sa).is_some(), "{sa}");
        let binding = get(docs, "ClusterRoleBinding", sa);
        assert_eq!(binding["subjects"][0]["name"].as_str(), Some(sa));
        assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some(ns));
        assert!(
            find(
                docs,
                "ClusterRole",
                binding["roleRef"]["name"].as_str().unwrap()
            )
            .is_some()
        );
    }
    let binding = get(docs, "RoleBinding", "packet-capture-controller");
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some(ns));
    assert!(find(docs, "Role", "packet-capture-controller").is_some());

    if let Some(vwc) = find(
        docs,
        "ValidatingWebhookConfiguration",
        "packet-capture-webhook",
    ) {
        let svc = get(docs, "Service", "packet-capture-webhook");
        labels_match(&svc["spec"]["selector"], controller_pods);
        let target = svc["spec"]["ports"][0]["targetPort"].as_str().unwrap();
        assert!(
            port_names.contains(&target),
            "webhook Service targets {target}"
        );
        let client = &vwc["webhooks"][0]["clientConfig"]["service"];
        assert_eq!(client["name"].as_str(), Some("packet-capture-webhook"));
        assert_eq!(client["namespace"].as_str(), Some(ns));
        assert_eq!(client["port"], svc["spec"]["ports"][0]["port"]);
        let mwc = get(
            docs,
            "MutatingWebhookConfiguration",
            "packet-capture-webhook",
        );
        let mutating = &mwc["webhooks"][0]["clientConfig"]["service"];
        for same in ["name", "namespace", "port"] {
            assert_eq!(mutating[same], client[same], "{same}");
        }
        let secret = flag(deploy, "webhook-cert-secret").expect("--webhook-cert-secret");
        let role = get(docs, "Role", "packet-capture-controller");
        // The CA is the webhook's too when the controller issues its
        // certificate.
        let ca = flag(deploy, "ca-secret")
            .filter(|_| flag(deploy, "webhook-certs") == Some("self-managed"));
        assert!(
            rules(role).contains(&(
                String::new(),
                "secrets".into(),
                "watch".into(),
                named_names(secret, ca)
            )),
            "the controller may not watch its certificate's Secret {secret}"
        );
        if let Some(cert) = find(docs, "Certificate", "packet-capture-webhook") {
            assert_eq!(cert["spec"]["secretName"].as_str(), Some(secret));
            assert!(
                strs(&cert["spec"]["dnsNames"])
                    .contains(&format!("packet-capture-webhook.{ns}.svc").as_str())
            );
            let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap();
            assert!(find(docs, "Issuer", issuer).is_some(), "no Issuer {issuer}");
            assert_eq!(
                vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str(),
                Some(format!("{ns}/packet-capture-webhook").as_str())
            );
            assert_eq!(flag(deploy, "webhook-certs"), Some("cert-manager"));
        } else if flag(deploy, "webhook-certs") == Some("self-managed") {
            // The controller fills in the caBundle of this configuration
            // with the CA it keeps, and issues for this Service.
            assert!(vwc["webhooks"][0]["clientConfig"]["caBundle"].is_null());
            assert_eq!(
                flag(deploy, "webhook-configuration"),
                vwc["metadata"]["name"].as_str()
            );
            assert_eq!(flag(deploy, "webhook-service"), client["name"].as_str());
            assert_eq!(flag(deploy, "ca-secret"), Some("packet-capture-ca"));
        } else {
            assert_eq!(flag(deploy, "webhook-certs"), Some("secret"));
            assert!(
                vwc["webhooks"][0]["clientConfig"]["caBundle"]
                    .as_str()
                    .is_some_and(|b| !b.is_empty())
            );
        }
    }
}

/// The names the controller's Secret rule is limited to: the certificate's
/// Secret, and the CA's when it keeps one.
fn named_names(secret: &str, ca: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = std::iter::once(secret)
        .chain(ca)
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

#[test]
fn objects_refer_to_each_other_correctly() {
    let helm = helm_or_fail();
    assert_wired(
        &render(&helm, &["--namespace", NAMESPACE]).unwrap(),
        NAMESPACE,
    );
    assert_wired(
        &render(&helm, &["-f", NON_DEFAULT_VALUES]).unwrap(),
        "capture-system",
    );
    assert_wired(
        &render(&helm, &["--set", "namespace=kube-system"]).unwrap(),
        "kube-system",
    );
    assert_wired(
        &render(
            &helm,
            &[
                "--namespace",
                NAMESPACE,
                "--set",
                "certManager.enabled=false",
            ],
        )
        .unwrap(),
        NAMESPACE,
    );
}

/// Every namespace `doc` names: its own and, wherever it refers to one,
/// its subjects', the Service it calls, the namespaces it selects, the
/// `<namespace>/<name>` of cert-manager's CA injection, and the namespace in
/// the webhook's DNS names.
fn namespaces_named(doc: &Value, out: &mut BTreeSet<String>) {
    match doc {
        Value::Mapping(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    (Some("namespace"), Value::String(ns)) => {
                        out.insert(ns.clone());
                    }
                    (Some("matchNames"), names) => {
                        out.extend(strs(names).into_iter().map(str::to_owned));
                    }
                    (Some("cert-manager.io/inject-ca-from"), Value::String(r)) => {
                        let (ns, _) = r.split_once('/').expect("<namespace>/<name>");
                        out.insert(ns.to_owned());
                    }
                    _ => namespaces_named(v, out),
                }
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| namespaces_named(v, out)),
        Value::String(s) => {
            if let Some(rest) = s.strip_prefix("packet-capture-webhook.") {
                out.insert(rest.split('.').next().unwrap_or_default().to_owned());
            }
        }
        _ => {}
    }
}

#[test]
fn every_namespaced_object_goes_to_the_release_namespace_or_the_one_named() {
    let helm = helm_or_fail();
    // Every optional object too: the Namespace, the ServiceMonitors, the
    // uninstall hook (helm template renders hooks), and the webhook's
    // certificate from cert-manager or from the controller.
    const ALL: [&str; 4] = [
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "createNamespace=true",
    ];
    for (args, want) in [
        // The release namespace, as the README installs it.
        (&["--namespace", NAMESPACE][..], NAMESPACE),
        // helm template's release namespace when none is given.
        (&[][..], "default"),
        // The seed's layout, either way.
        (&["--namespace", "kube-system"][..], "kube-system"),
        (&["--set", "namespace=kube-system"][..], "kube-system"),
        (
            &["--namespace", NAMESPACE, "--set", "namespace=kube-system"][..],
            "kube-system",
        ),
    ] {
        for certs in ["certManager.enabled=true", "certManager.enabled=false"] {
            let mut all = args.to_vec();
            all.extend(ALL);
            all.extend(["--set", certs]);
            let docs = render(&helm, &all).unwrap();
            let mut kinds = BTreeSet::new();
            let mut named = BTreeSet::new();
            for doc in &docs {
                let kind = doc["kind"].as_str().unwrap();
                let name = doc["metadata"]["name"].as_str().unwrap();
                if cluster_scoped(kind) {
                    assert!(doc["metadata"]["namespace"].is_null(), "{kind} {name}");
                } else if in_release_namespace(doc) {
                    assert_eq!(
                        doc["metadata"]["namespace"].as_str(),
                        Some(want),
                        "{kind} {name} with {all:?}"
                    );
                } else {
                    // Where the API server keeps the ConfigMap it reads.
                    assert_eq!(doc["metadata"]["namespace"], "kube-system");
                }
                if kind == "Namespace" {
                    named.insert(name.to_owned());
                }
                if name != AUTHENTICATION_READER {
                    namespaces_named(doc, &mut named);
                }
                kinds.insert(kind);
            }
            assert_eq!(named, BTreeSet::from([want.to_owned()]), "{all:?}");
            for kind in [
                "Namespace",
                "RoleBinding",
                "ClusterRoleBinding",
                "ServiceMonitor",
                "Job",
                "ValidatingWebhookConfiguration",
                "MutatingWebhookConfiguration",
            ] {
                assert!(kinds.contains(kind), "no {kind} with {all:?}");
            }
        }
    }
}

#[test]
fn the_manifests_make_their_namespace_first_and_install_into_it() {
    let files = generate(&helm_or_fail()).unwrap();
    let (first, text) = &files[0];
    assert_eq!(*first, FILES[0].1);
    let docs = documents(text).unwrap();
    assert_eq!(docs.len(), 1, "{first}");
    let ns = get(&docs, "Namespace", NAMESPACE);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged"),
        "the agent's namespace must admit it where Pod Security is enforced"
    );
    for (file, text) in &files[1..] {
        for doc in documents(text).unwrap() {
            let kind = doc["kind"].as_str().unwrap();
            assert!(kind != "Namespace", "{file}");
            if in_release_namespace(&doc) {
                assert_eq!(
                    doc["metadata"]["namespace"].as_str(),
                    Some(NAMESPACE),
                    "{file}: {kind}"
                );
            }
        }
    }
    // kubectl applies a directory in the order of its file names.
    let first_name = first.strip_prefix("manifests/").unwrap();
    for entry in std::fs::read_dir(root().join("manifests")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.as_str() >= first_name,
            "manifests/{name} sorts before {first}: `kubectl apply -f manifests/` would apply it first"
        );
    }
}

#[test]
fn non_default_values_are_honoured() {
    let docs = render(&helm_or_fail(), &["-f", NON_DEFAULT_VALUES]).unwrap();
    let config = get(&docs, "ConfigMap", "packet-capture-config");
    for (key, value) in [
        ("MAX_CAPTURE_FILES", "20"),
        ("MAX_CAPTURE_FILE_SIZE_MB", "100"),
        ("LOG_LEVEL", "DEBUG"),
        ("AGENT_PORT", "9090"),
        ("MAX_CAPTURE_DURATION", "3600"),
        ("MAX_CAPTURE_PACKETS", "50000"),
        ("MAX_CONCURRENT_CAPTURES", "4"),
        ("MAX_CAPTURES_PER_REQUESTER", "3"),
    ] {
        assert_eq!(config["data"][key].as_str(), Some(value), "{key}");
    }
    assert_eq!(
        config["metadata"]["namespace"].as_str(),
        Some("capture-system")
    );
    assert!(
        get(&docs, "Namespace", "capture-system")["metadata"]["labels"]
            ["pod-security.kubernetes.io/enforce"]
            .is_string()
    );

    let deploy = get(&docs, "Deployment", "packet-capture-controller");
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(1));
    let c = container(deploy, "controller");
    assert_eq!(
        c["image"].as_str(),
        Some("registry.example.com/net/packet-capture-controller:v9.9.9-controller")
    );
    assert_eq!(c["imagePullPolicy"].as_str(), Some("Always"));
    let args = strs(&c["args"]);
    assert!(!args.contains(&"--leader-election"), "{args:?}");
    assert!(args.contains(&"--metrics-port=9091") && args.contains(&"--webhook-port=9443"));
    assert!(args.contains(&"--log-format=json"));
    assert_eq!(flag(deploy, "webhook-cert-secret"), Some("my-webhook-tls"));
    assert_eq!(flag(deploy, "webhook-certs"), Some("secret"));
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["imagePullSecrets"][0]["name"].as_str(), Some("regcred"));
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-cluster-critical")
    );
    assert!(
        pod["affinity"]["nodeAffinity"].is_mapping()
            && pod["affinity"]["podAntiAffinity"].is_null()
    );
    assert!(find(&docs, "PodDisruptionBudget", "packet-capture-controller").is_none());
    assert_eq!(
        volume(deploy, "agent-token")["projected"]["sources"][0]["serviceAccountToken"]["audience"]
            .as_str(),
        Some("captures.example.com")
    );

    let ds = get(&docs, "DaemonSet", "packet-capture-agent");
    let a = container(ds, "agent");
    assert_eq!(
        a["image"].as_str(),
        Some("registry.example.com/net/packet-capture-agent:v9.9.9")
    );
    let sc = &a["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(true));
    assert!(sc["capabilities"].is_null() && sc["allowPrivilegeEscalation"].is_null());
    assert_eq!(sc["seccompProfile"]["type"].as_str(), Some("Unconfined"));
    for (name, value) in [
        ("CAPTURE_DIR", "/data/packet-captures"),
        ("CAPTURE_BACKEND", "ebpf"),
        ("COMPRESSION", "zstd"),
        ("TOKEN_AUDIENCE", "captures.example.com"),
    ] {
        assert_eq!(env(a, name)["value"].as_str(), Some(value), "{name}");
    }
    assert_eq!(strs(&a["args"]), ["--max-capture-files=20"]);
    assert_eq!(a["ports"][0]["containerPort"].as_u64(), Some(9090));
    assert_eq!(
        config["data"]["AGENT_PORT"].as_str(),
        Some("9090"),
        "the probes read the port from here"
    );
    assert_eq!(
        volume(ds, "captures")["hostPath"]["path"].as_str(),
        Some("/data/packet-captures")
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"][0]["key"].as_str(), Some("dedicated"));
    assert_eq!(pod["terminationGracePeriodSeconds"].as_u64(), Some(30));

    let vwc = get(
        &docs,
        "ValidatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    let hook = &vwc["webhooks"][0];
    assert_eq!(hook["failurePolicy"].as_str(), Some("Ignore"));
    assert_eq!(hook["timeoutSeconds"].as_u64(), Some(5));
    assert_eq!(
        hook["clientConfig"]["service"]["path"].as_str(),
        Some("/validate")
    );
    assert!(
        hook["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| b.starts_with("LS0t"))
    );
    assert!(vwc["metadata"]["annotations"].is_null());
    let mwc = get(
        &docs,
        "MutatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    let mutating = &mwc["webhooks"][0];
    for same in ["failurePolicy", "timeoutSeconds"] {
        assert_eq!(mutating[same], hook[same], "{same}");
    }
    assert_eq!(
        mutating["clientConfig"]["caBundle"],
        hook["clientConfig"]["caBundle"]
    );
    assert!(find(&docs, "Certificate", "packet-capture-webhook").is_none());
    assert!(find(&docs, "ClusterRole", "packet-capture-viewer").is_none());
    for name in ["packet-capture-controller", "packet-capture-agent"] {
        let sm = get(&docs, "ServiceMonitor", name);
        assert_eq!(
            sm["metadata"]["labels"]["release"].as_str(),
            Some("prometheus")
        );
        assert_eq!(sm["spec"]["endpoints"][0]["interval"].as_str(), Some("15s"));
    }
}

#[test]
fn disabling_the_webhook_drops_its_objects() {
    let docs = render(&helm_or_fail(), &["--set", "webhook.enabled=false"]).unwrap();
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        assert!(
            !docs.iter().any(|d| d["kind"].as_str() == Some(kind)),
            "{kind} rendered"
        );
    }
    // cert-manager's objects are the agents' CA only.
    for kind in ["Certificate", "Issuer"] {
        let names: Vec<&str> = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n.starts_with("packet-capture-agent-ca")),
            "{kind}: {names:?}"
        );
    }
    assert!(find(&docs, "Service", "packet-capture-webhook").is_none());
    // The controller is told, so it serves no webhook and says so, rather
    // than waiting for a certificate nobody issues.
    let deploy = get(&docs, "Deployment", "packet-capture-controller");
    let c = container(deploy, "controller");
    let args = strs(&c["args"]);
    assert!(args.contains(&"--disable-webhook"), "{args:?}");
    assert!(flag(deploy, "webhook-certs").is_none(), "{args:?}");
    let ports: Vec<&str> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(ports, ["http-metrics"]);
    // And it may touch no Secret but the agents' CAs, and no webhook
    // configuration.
    let granted: Vec<Grant> = rules(get(&docs, "Role", "packet-capture-controller"))
        .into_iter()
        .chain(rules(get(
            &docs,
            "ClusterRole",
            "packet-capture-controller",
        )))
        .filter(|(_, r, _, _)| r == "secrets" || r.ends_with("webhookconfigurations"))
        .filter(|(_, _, verb, names)| {
            // The agents' CA: cert-manager's, and the controller's own
            // (created when missing).
            let agents_ca = if names.is_empty() {
                verb == "create"
            } else {
                names
                    .iter()
                    .all(|n| n == "packet-capture-ca" || n == "packet-capture-agent-ca")
            };
            !agents_ca
        })
        .collect();
    assert!(granted.is_empty(), "{granted:?}");
}

#[test]
fn without_cert_manager_or_a_ca_bundle_the_controller_issues_the_certificate() {
    let docs = render(&helm_or_fail(), &["--set", "certManager.enabled=false"]).unwrap();
    for kind in ["Certificate", "Issuer"] {
        assert!(
            !docs.iter().any(|d| d["kind"].as_str() == Some(kind)),
            "{kind} rendered"
        );
    }
    let deploy = get(&docs, "Deployment", "packet-capture-controller");
    assert_eq!(flag(deploy, "webhook-certs"), Some("self-managed"));
    assert_eq!(
        flag(deploy, "webhook-cert-secret"),
        Some("packet-capture-webhook-tls")
    );
    let vwc = get(
        &docs,
        "ValidatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    assert!(vwc["metadata"]["annotations"].is_null());
    assert!(vwc["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    let mwc = get(
        &docs,
        "MutatingWebhookConfiguration",
        "packet-capture-webhook",
    );
    assert!(mwc["metadata"]["annotations"].is_null());
    assert!(mwc["webhooks"][0]["clientConfig"]["caBundle"].is_null());
    const NAMES: &[&str] = &["packet-capture-webhook-tls", "packet-capture-ca"];
    let in_namespace = rules(get(&docs, "Role", "packet-capture-controller"));
    let secrets: BTreeSet<Grant> = in_namespace
        .into_iter()
        .filter(|(_, r, _, _)| r == "secrets")
        .collect();
    // Read, watch and replace by name; create, which Kubernetes cannot
    // limit by name, unnamed; never delete, patch or list them all.
    assert_eq!(
        secrets,
        named_grants(&[
            ("", &["secrets"], &["get", "list", "watch", "update"], NAMES),
            ("", &["secrets"], &["create"], &[]),
            // The same CA signs the agents' certificates.
            ("", &["secrets"], &["get", "update"], &["packet-capture-ca"]),
        ])
    );
    let cluster: BTreeSet<Grant> = rules(get(&docs, "ClusterRole", "packet-capture-controller"))
        .into_iter()
        .filter(|(_, r, _, _)| r.ends_with("webhookconfigurations"))
        .collect();
    assert_eq!(
        cluster,
        named_grants(&[(
            "admissionregistration.k8s.io",
            &[
                "validatingwebhookconfigurations",
                "mutatingwebhookconfigurations",
            ],
            &["get", "list", "watch", "patch"],
            &["packet-capture-webhook"],
        )])
    );
    // The aggregated API's APIService: its caBundle too, by name.
    let api_service: BTreeSet<Grant> =
        rules(get(&docs, "ClusterRole", "packet-capture-controller"))
            .into_iter()
            .filter(|(_, r, _, _)| r == "apiservices")
            .collect();
    assert_eq!(
        api_service,
        named_grants(&[(
            "apiregistration.k8s.io",
            &["apiservices"],
            &["get", "list", "watch", "patch"],
            &["v1.pcap.packet.io"],
        )])
    );
    let apis = get(&docs, "APIService", "v1.pcap.packet.io");
    assert!(apis["spec"]["caBundle"].is_null());
    assert_eq!(apis["spec"]["service"]["name"], "packet-capture-webhook");
}

#[test]
fn contradictory_values_fail_with_a_clear_message() {
    let helm = helm_or_fail();
    let err = render(&helm, &["--set", "controller.leaderElection=false"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("controller.replicas > 1 needs controller.leaderElection"),
        "{err:#}"
    );
    let err = render(&helm, &["--set", "controller.replicas=0"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("controller.replicas: 0 with webhook.enabled"),
        "{err:#}"
    );
    render(
        &helm,
        &[
            "--set",
            "controller.replicas=0",
            "--set",
            "webhook.enabled=false",
        ],
    )
    .expect("no controller and no webhook");
    // values.schema.json names the value and what it may be.
    for (set, names) in [
        ("webhook.failurePolicy=Maybe", "/webhook/failurePolicy"),
        // PEM where its base64 belongs.
        (
            "webhook.caBundle=-----BEGIN CERTIFICATE-----",
            "/webhook/caBundle",
        ),
        (
            "webhook.certSecretName=Webhook_TLS",
            "/webhook/certSecretName",
        ),
        ("config.logLevel=TRACE", "/config/logLevel"),
        ("agent.backend=xdp", "/agent/backend"),
    ] {
        let err = render(&helm, &["--set", set]).unwrap_err();
        assert!(format!("{err:#}").contains(names), "{set}: {err:#}");
    }
}

#[test]
fn each_account_gets_exactly_the_access_it_uses() {
    let docs = render(&helm_or_fail(), &[]).unwrap();
    const PCC: &str = "networking.packet.io";
    let controller: &[(&str, &[&str], &[&str])] = &[
        (
            PCC,
            &["packetcaptureconfigs"],
            &["get", "list", "watch", "patch", "update"],
        ),
        (
            PCC,
            &["packetcaptureconfigs/status"],
            // Server-side apply only.
            &["patch"],
        ),
        (PCC, &["packetcaptureconfigs/finalizers"], &["update"]),
        // Reads relayed for users by the aggregated API.
        (PCC, &["packetcaptureconfigs/files"], &["relay"]),
        ("", &["pods", "nodes"], &["get", "list", "watch"]),
        ("", &["pods"], &["capture"]),
        ("", &["namespaces"], &["get", "list", "watch"]),
        ("", &["events"], &["create", "patch"]),
        ("events.k8s.io", &["events"], &["create", "patch"]),
        (
            "authorization.k8s.io",
            &["subjectaccessreviews"],
            &["create"],
        ),
        // The agents' certificate requests, decided and signed.
        (
            "certificates.k8s.io",
            &["certificatesigningrequests"],
            &["get", "list", "watch"],
        ),
        (
            "certificates.k8s.io",
            &[
                "certificatesigningrequests/approval",
                "certificatesigningrequests/status",
            ],
            &["patch"],
        ),
    ];
    // As the signer of the agents' certificates only.
    let signer = named_grants(&[(
        "certificates.k8s.io",
        &["signers"],
        &["approve", "sign"],
        &["networking.packet.io/agent-serving"],
    )]);
    assert_eq!(
        rules(get(&docs, "ClusterRole", "packet-capture-controller")),
        &grants(controller) | &signer
    );
    // The results ConfigMaps (any name: create and apply), the Lease's
    // first creation.
    let in_namespace: &[(&str, &[&str], &[&str])] = &[
        ("", &["configmaps"], &["create", "patch"]),
        ("coordination.k8s.io", &["leases"], &["create"]),
        // Its own CA, until cert-manager's is there (create cannot be
        // limited to a name).
        ("", &["secrets"], &["create"]),
    ];
    // By name: its settings, its Lease, cert-manager's Secrets (the
    // webhook's certificate read and watched, the agents' CA read; never
    // written), its own CA and the agents' CA bundle it publishes.
    let named = named_grants(&[
        (
            "",
            &["configmaps"],
            &["get", "list", "watch"],
            &["packet-capture-config"],
        ),
        (
            "",
            &["configmaps"],
            &["get", "list", "watch"],
            &["packet-capture-agent-ca"],
        ),
        ("", &["secrets"], &["get"], &["packet-capture-agent-ca"]),
        ("", &["secrets"], &["get", "update"], &["packet-capture-ca"]),
        (
            "coordination.k8s.io",
            &["leases"],
            &["get", "update"],
            &["packet-capture-controller"],
        ),
        (
            "",
            &["secrets"],
            &["get", "list", "watch"],
            &["packet-capture-webhook-tls"],
        ),
    ]);
    assert_eq!(
        rules(get(&docs, "Role", "packet-capture-controller")),
        &grants(in_namespace) | &named
    );
    let agent: &[(&str, &[&str], &[&str])] = &[
        ("authentication.k8s.io", &["tokenreviews"], &["create"]),
        (
            "authorization.k8s.io",
            &["subjectaccessreviews"],
            &["create"],
        ),
        // Its serving certificate's request, watched until signed.
        (
            "certificates.k8s.io",
            &["certificatesigningrequests"],
            &["create", "get", "list", "watch"],
        ),
    ];
    assert_eq!(
        rules(get(&docs, "ClusterRole", "packet-capture-agent")),
        grants(agent)
    );
    // The settings ConfigMap by name, for LOG_LEVEL while the agents run.
    assert_eq!(
        rules(get(&docs, "Role", "packet-capture-agent")),
        named_grants(&[(
            "",
            &["configmaps"],
            &["get", "list", "watch"],
            &["packet-capture-config"],
        )])
    );
    // The roles for people: reading captures and every capture's files;
    // also changing captures; capturing pods' traffic, apart.
    // The same files and live packets through the API server.
    const PCAP: (&str, &[&str], &[&str]) = ("pcap.packet.io", &["captures/proxy"], &["get"]);
    let viewer: &[(&str, &[&str], &[&str])] = &[
        (PCC, &["packetcaptureconfigs"], &["get", "list", "watch"]),
        (PCC, &["packetcaptureconfigs/files"], &["get"]),
        PCAP,
    ];
    assert_eq!(
        rules(get(&docs, "ClusterRole", "packet-capture-viewer")),
        grants(viewer)
    );
    let editor: &[(&str, &[&str], &[&str])] = &[
        (
            PCC,
            &["packetcaptureconfigs"],
            &[
                "get",
                "list",
                "watch",
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
            ],
        ),
        (PCC, &["packetcaptureconfigs/files"], &["get"]),
        PCAP,
    ];
    assert_eq!(
        rules(get(&docs, "ClusterRole", "packet-capture-editor")),
        grants(editor)
    );
    assert_eq!(
        rules(get(&docs, "ClusterRole", "packet-capture-capturer")),
        grants(&[("", &["pods"], &["capture"])])
    );
    // The controller reads how the API server names users (for the
    // aggregated API) with the API server's own role for that ConfigMap.
    let reader = get(&docs, "RoleBinding", AUTHENTICATION_READER);
    assert_eq!(reader["metadata"]["namespace"], "kube-system");
    assert_eq!(
        reader["roleRef"]["name"],
        "extension-apiserver-authentication-reader"
    );
    // No account is bound to anything else, and nothing uses a wildcard.
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap();
        if (kind == "ClusterRoleBinding" || kind == "RoleBinding") && doc != reader {
            assert_eq!(doc["roleRef"]["name"], doc["metadata"]["name"], "{kind}");
        }
        if kind == "ClusterRole" || kind == "Role" {
            for (g, r, v, _) in rules(doc) {
                assert!(g != "*" && r != "*" && v != "*", "{kind} grants a wildcard");
            }
        }
    }
}

#[test]
fn net_raw_only_for_the_libpcap_backend() {
    let helm = helm_or_fail();
    for (backend, expected) in [
        ("auto", &["BPF", "NET_ADMIN", "NET_RAW"][..]),
        ("pcap", &["BPF", "NET_ADMIN", "NET_RAW"][..]),
        ("ebpf", &["BPF", "NET_ADMIN"][..]),
    ] {
        let docs = render(&helm, &["--set", &format!("agent.backend={backend}")]).unwrap();
        let agent = container(get(&docs, "DaemonSet", "packet-capture-agent"), "agent");
        assert_eq!(
            strs(&agent["securityContext"]["capabilities"]["add"]),
            expected,
            "backend {backend}"
        );
    }
}

#[test]
fn uninstall_deletes_the_captures_first() {
    let helm = helm_or_fail();
    let docs = render(&helm, &[]).unwrap();
    let job = get(&docs, "Job", "packet-capture-uninstall");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"].as_str(),
        Some("pre-delete")
    );
    let c = container(job, "delete-captures");
    assert_eq!(
        strs(&c["args"]),
        ["delete-captures", "--timeout-seconds=60"]
    );
    assert_eq!(
        c["image"].as_str(),
        container(
            get(&docs, "Deployment", "packet-capture-controller"),
            "controller"
        )["image"]
            .as_str()
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        Some("packet-capture-uninstall")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    // Its account may do to captures what the job does, and nothing else.
    let role = get(&docs, "ClusterRole", "packet-capture-uninstall");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(strs(&rules[0]["resources"]), ["packetcaptureconfigs"]);
    assert_eq!(
        strs(&rules[0]["verbs"]),
        ["get", "list", "watch", "delete", "patch"]
    );
    assert_hook(
        &docs,
        "packet-capture-uninstall",
        "pre-delete",
        &["ServiceAccount", "ClusterRole", "ClusterRoleBinding"],
        ("Job", "before-hook-creation,hook-succeeded"),
    );
    let off = render(&helm, &["--set", "uninstall.deleteCaptures=false"]).unwrap();
    assert!(find(&off, "Job", "packet-capture-uninstall").is_none());
}

/// Every object named `name` of `access` and `run` is a `hook` of Helm's.
/// The account and its access (`access`) are gone however it ends; what
/// runs, `run` (its kind and deletion policy), is kept at least after a
/// failure, for its log, until the hook runs again.
fn assert_hook(docs: &[Value], name: &str, hook: &str, access: &[&str], run: (&str, &str)) {
    const GONE: &str = "before-hook-creation,hook-succeeded,hook-failed";
    let kinds = access.iter().map(|kind| (*kind, GONE));
    for (kind, policy) in kinds.chain([run]) {
        let annotations = &get(docs, kind, name)["metadata"]["annotations"];
        assert_eq!(annotations["helm.sh/hook"].as_str(), Some(hook), "{kind}");
        assert_eq!(
            annotations["helm.sh/hook-delete-policy"].as_str(),
            Some(policy),
            "{kind}"
        );
    }
}

#[test]
fn helm_test_checks_the_agents_and_captures_its_own_pod_with_access_to_that_alone() {
    let helm = helm_or_fail();
    const TEST: &str = "packet-capture-test";
    const PCC: &str = "networking.packet.io";
    for webhook in [true, false] {
        let docs = render(&helm, &["--set", &format!("webhook.enabled={webhook}")]).unwrap();
        let pod = get(&docs, "Pod", TEST);
        let spec = &pod["spec"];
        let c = named(&spec["containers"], "check-install", "container");
        let mut args = vec!["check-install", "--timeout-seconds=60"];
        if webhook {
            args.push("--fetch");
        }
        assert_eq!(strs(&c["args"]), args);
        let controller = get(&docs, "Deployment", "packet-capture-controller");
        assert_eq!(c["image"], container(controller, "controller")["image"]);
        for (name, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("NODE_NAME", "spec.nodeName"),
        ] {
            assert_eq!(
                env(c, name)["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                Some(field)
            );
        }
        // It runs where an agent runs, which captures it.
        let agent_daemonset = get(&docs, "DaemonSet", "packet-capture-agent");
        let agent = &agent_daemonset["spec"]["template"]["spec"];
        assert_eq!(spec["nodeSelector"], agent["nodeSelector"]);
        assert_eq!(spec["tolerations"], agent["tolerations"]);
        assert_eq!(spec["serviceAccountName"].as_str(), Some(TEST));
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true)
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
        // Its own capture, by name wherever RBAC can name it; its file
        // through the aggregated API when there is one; capturing pods in
        // its own namespace only; reading the agents' DaemonSet.
        let mut own = vec![
            (PCC, &["packetcaptureconfigs"][..], &["create"][..], &[][..]),
            (
                PCC,
                &["packetcaptureconfigs"],
                &["get", "list", "watch", "delete"],
                &[TEST][..],
            ),
        ];
        if webhook {
            own.push(("pcap.packet.io", &["captures/proxy"], &["get"], &[TEST]));
            own.push((PCC, &["packetcaptureconfigs/files"], &["get"], &[TEST]));
        }
        assert_eq!(rules(get(&docs, "ClusterRole", TEST)), named_grants(&own));
        let role = get(&docs, "Role", TEST);
        assert_eq!(role["metadata"]["namespace"], pod["metadata"]["namespace"]);
        assert_eq!(
            rules(role),
            named_grants(&[
                ("", &["pods"], &["capture"], &[]),
                ("", &["pods"], &["get", "list", "watch"], &[TEST]),
                (
                    "apps",
                    &["daemonsets"],
                    &["get", "list", "watch"],
                    &[agent_daemonset["metadata"]["name"].as_str().unwrap()],
                ),
            ])
        );
        assert_hook(
            &docs,
            TEST,
            "test",
            &[
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ],
            // Kept after success too: `helm test --logs` reads its log
            // after the hooks' deletion.
            ("Pod", "before-hook-creation"),
        );
    }
    let docs = render(&helm, &["--set", "test.timeoutSeconds=300"]).unwrap();
    let c = named(
        &get(&docs, "Pod", TEST)["spec"]["containers"],
        "check-install",
        "container",
    );
    assert!(strs(&c["args"]).contains(&"--timeout-seconds=300"));
}

/// The webhooks' condition, as each configuration must carry it.
fn assert_skips_captures_being_deleted(docs: &[Value], source: &str) {
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        let conditions =
            &get(docs, kind, "packet-capture-webhook")["webhooks"][0]["matchConditions"];
        let conditions = conditions
            .as_sequence()
            .unwrap_or_else(|| panic!("{source}: {kind} has no matchConditions"));
        assert_eq!(conditions.len(), 1, "{source}: {kind}");
        assert_eq!(
            conditions[0]["expression"].as_str(),
            Some("!has(object.metadata.deletionTimestamp)"),
            "{source}: {kind}"
        );
    }
}

#[test]
fn the_webhooks_let_captures_being_deleted_through() {
    // The uninstall job removes the finalizer of a capture the controller
    // did not finish, an UPDATE; with the controller down and
    // failurePolicy Fail, a webhook called for it would refuse it, and
    // `helm uninstall` would fail with the capture stuck.
    let helm = helm_or_fail();
    for args in [
        &[][..],
        &["-f", NON_DEFAULT_VALUES][..],
        &["--set", "certManager.enabled=false"][..],
    ] {
        let docs = render(&helm, args).unwrap();
        assert_skips_captures_being_deleted(&docs, &format!("helm template {args:?}"));
    }
    let files = generate(&helm).unwrap();
    let (file, text) = files
        .iter()
        .find(|(f, _)| *f == "manifests/webhook.yaml")
        .expect("manifests/webhook.yaml is generated");
    assert_skips_captures_being_deleted(&documents(text).unwrap(), file);
}

/// The `checksum/config` annotations of the agents' and the controller's
/// pods.
fn config_checksums(docs: &[Value]) -> (String, String) {
    let checksum = |kind, name| {
        get(docs, kind, name)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} {name} has no checksum/config"))
            .to_owned()
    };
    (
        checksum("DaemonSet", "packet-capture-agent"),
        checksum("Deployment", "packet-capture-controller"),
    )
}

#[test]
fn only_the_settings_a_component_reads_at_start_roll_its_pods() {
    let helm = helm_or_fail();
    let (agent, controller) = config_checksums(&render(&helm, &[]).unwrap());
    // Whether the agents' and the controller's pods roll. LOG_LEVEL is
    // applied while they run, and rolling the agents would fail every
    // capture running on them.
    for (set, agents_roll, controller_rolls) in [
        ("config.logLevel=DEBUG", false, false),
        ("config.maxCaptureFiles=7", true, false),
        ("config.maxCaptureFileSizeMb=20", true, false),
        ("config.maxConcurrentCaptures=8", true, false),
        ("config.maxCapturesPerRequester=3", false, true),
        ("config.maxCaptureDuration=3600", true, true),
        ("config.maxCapturePackets=5000", true, true),
        ("config.agentPort=9090", true, true),
    ] {
        let docs = render(&helm, &["--set", set]).unwrap();
        let (a, c) = config_checksums(&docs);
        assert_eq!(a != agent, agents_roll, "agents with {set}");
        assert_eq!(c != controller, controller_rolls, "controller with {set}");
    }
}

#[test]
fn prometheus_scrapes_the_agents_over_tls_with_their_ca() {
    let docs = render(&helm_or_fail(), &["--set", "serviceMonitor.enabled=true"]).unwrap();
    let agent = &get(&docs, "ServiceMonitor", "packet-capture-agent")["spec"]["endpoints"][0];
    assert_eq!(agent["scheme"].as_str(), Some("https"));
    // The agents' /metrics takes the scraper's own token.
    assert_eq!(
        agent["bearerTokenFile"].as_str(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    let ca = &agent["tlsConfig"]["ca"]["configMap"];
    assert_eq!(ca["key"].as_str(), Some("ca.crt"));
    // The ConfigMap the controller publishes the agents' CA in, in the
    // ServiceMonitor's namespace.
    let name = ca["name"].as_str().unwrap();
    assert_eq!(name, "packet-capture-agent-ca");
    assert!(
        rules(get(&docs, "Role", "packet-capture-controller")).contains(&(
            String::new(),
            "configmaps".into(),
            "get".into(),
            vec![name.to_owned()]
        )),
        "the controller does not publish {name}"
    );
    assert_eq!(
        agent["port"],
        get(&docs, "Service", "packet-capture-agent")["spec"]["ports"][0]["name"]
    );
    // The controller serves /metrics in plain HTTP (its probes read it so).
    let controller =
        &get(&docs, "ServiceMonitor", "packet-capture-controller")["spec"]["endpoints"][0];
    assert!(controller["scheme"].is_null() && controller["tlsConfig"].is_null());
}

#[test]
fn metrics_readers_are_bound_to_get_metrics_only() {
    let helm = helm_or_fail();
    let docs = render(&helm, &[]).unwrap();
    let role = get(&docs, "ClusterRole", "packet-capture-metrics-reader");
    let want: Value =
        serde_yaml::from_str("[{nonResourceURLs: [/metrics], verbs: [get]}]").unwrap();
    assert_eq!(role["rules"], want);
    assert!(find(&docs, "ClusterRoleBinding", "packet-capture-metrics-reader").is_none());

    let docs = render(
        &helm,
        &[
            "--set",
            "rbac.metricsReaders[0].kind=ServiceAccount",
            "--set",
            "rbac.metricsReaders[0].name=prometheus-k8s",
            "--set",
            "rbac.metricsReaders[0].namespace=monitoring",
        ],
    )
    .unwrap();
    let binding = get(&docs, "ClusterRoleBinding", "packet-capture-metrics-reader");
    assert_eq!(
        binding["roleRef"]["name"].as_str(),
        Some("packet-capture-metrics-reader")
    );
    let want: Value = serde_yaml::from_str(
        "[{kind: ServiceAccount, name: prometheus-k8s, namespace: monitoring}]",
    )
    .unwrap();
    assert_eq!(binding["subjects"], want);

    // A service account is nobody without its namespace.
    let err = render(
        &helm,
        &[
            "--set",
            "rbac.metricsReaders[0].kind=ServiceAccount",
            "--set",
            "rbac.metricsReaders[0].name=prometheus-k8s",
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains("/rbac/metricsReaders/0"), "{err}");
}

#[test]
fn config_values_are_held_to_what_the_binaries_accept() {
    let helm = helm_or_fail();
    // One past each limit the agent or the controller refuses at start.
    for (set, names) in [
        (
            "config.maxCaptureFileSizeMb=1048577",
            "/config/maxCaptureFileSizeMb",
        ),
        (
            "config.maxCaptureFileSizeMb=0",
            "/config/maxCaptureFileSizeMb",
        ),
        ("config.maxCaptureFiles=0", "/config/maxCaptureFiles"),
        (
            "config.maxConcurrentCaptures=65",
            "/config/maxConcurrentCaptures",
        ),
        ("config.agentPort=65536", "/config/agentPort"),
        (
            "config.maxCaptureDuration=4294967296",
            "/config/maxCaptureDuration",
        ),
        ("config.maxCapturePackets=0", "/config/maxCapturePackets"),
        (
            "config.maxCapturesPerRequester=-1",
            "/config/maxCapturesPerRequester",
        ),
    ] {
        let err = render(&helm, &["--set", set]).unwrap_err();
        assert!(format!("{err:#}").contains(names), "{set}: {err:#}");
    }
    // The largest values, from a values file (whose numbers reach the
    // templates as floats), are written as the integers the binaries parse.
    let mut values = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(
        &mut values,
        b"config:\n  maxCaptureFiles: 1000000\n  maxCaptureFileSizeMb: 1048576\n  agentPort: 65535\n  \
          maxCaptureDuration: 4294967295\n  maxCapturePackets: 4294967295\n  \
          maxConcurrentCaptures: 64\n  maxCapturesPerRequester: 4294967295\n",
    )
    .unwrap();
    let docs = render(&helm, &["-f", values.path().to_str().unwrap()]).unwrap();
    let config = get(&docs, "ConfigMap", "packet-capture-config");
    for (key, value) in [
        ("MAX_CAPTURE_FILES", "1000000"),
        ("MAX_CAPTURE_FILE_SIZE_MB", "1048576"),
        ("AGENT_PORT", "65535"),
        ("MAX_CAPTURE_DURATION", "4294967295"),
        ("MAX_CAPTURE_PACKETS", "4294967295"),
        ("MAX_CONCURRENT_CAPTURES", "64"),
        ("MAX_CAPTURES_PER_REQUESTER", "4294967295"),
    ] {
        assert_eq!(config["data"][key].as_str(), Some(value), "{key}");
    }
}

/// A pod template carries nothing of the chart's own version: a chart
/// upgrade alone would otherwise roll every agent, and an agent's restart
/// fails the captures running on its node.
#[test]
fn a_new_chart_version_alone_rolls_no_pod() {
    let docs = render(&helm_or_fail(), &["--namespace", NAMESPACE]).unwrap();
    for (kind, name) in [
        ("DaemonSet", "packet-capture-agent"),
        ("Deployment", "packet-capture-controller"),
    ] {
        let workload = get(&docs, kind, name);
        assert!(
            workload["metadata"]["labels"]["helm.sh/chart"].is_string(),
            "{kind} {name} itself names its chart"
        );
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(
            labels["helm.sh/chart"].is_null(),
            "{kind} {name}: {labels:?}"
        );
    }
}
