//! Checks that need a real kube-apiserver: the rendered chart and the
//! manifests pass server-side validation, each service account can do what it
//! needs and nothing more (`kubectl auth can-i`), and the Makefile's
//! operations work against the current context. Each takes the kubeconfig of
//! a disposable cluster and the tools' paths.

use packet_capture_test_support::cluster::{Cluster, Lifetime};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, bail, ensure};
use serde_yaml::Value;

use crate::chart::{NON_DEFAULT_VALUES, documents};
use crate::crdgen::CRD_PATHS;
use crate::examples::{self, EXAMPLES};
use crate::manifests::{CHART, FILES, NAMESPACE, RELEASE, SAMPLE, template};
use crate::util::{output, root};

/// A cluster to check against and the tools to do it with.
#[derive(Clone, Debug)]
pub struct Tools {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl Tools {
    /// kubectl for this cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig).current_dir(root());
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
        let mut cmd = self.kubectl();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all(input.as_bytes())?;
        }
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {cmd:?}"))
    }

    /// kubectl `args`, failing with its output unless it succeeds.
    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let out = self.run(args, stdin)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The group/versions the apiserver serves (`kubectl api-versions`).
fn served(t: &Tools) -> anyhow::Result<Vec<String>> {
    Ok(t.ok(&["api-versions"], None)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Splits documents into those whose API the server serves (as one YAML
/// stream) and the kinds it does not (cert-manager's and the Prometheus
/// Operator's, unless they are installed).
fn servable(docs: &[Value], served: &[String]) -> anyhow::Result<(String, Vec<String>)> {
    let mut yaml = String::new();
    let mut skipped = Vec::new();
    for doc in docs {
        let api = doc["apiVersion"]
            .as_str()
            .context("a document without apiVersion")?;
        if served.iter().any(|s| s == api) {
            yaml.push_str("---\n");
            yaml.push_str(&serde_yaml::to_string(doc)?);
        } else {
            skipped.push(format!("{} ({api})", doc["kind"].as_str().unwrap_or("?")));
        }
    }
    Ok((yaml, skipped))
}

/// Dry-runs the chart's bare Pods (`helm test`'s). A Pod is admitted only
/// once its service account exists, which a dry run of the same apply
/// never makes: the accounts (from `others`) are made for the dry run, and
/// deleted after it however it went.
fn dry_run_pods(
    t: &Tools,
    pods: &[Value],
    others: &[Value],
    served: &[String],
) -> anyhow::Result<()> {
    if pods.is_empty() {
        return Ok(());
    }
    let accounts: Vec<Value> = others
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .filter(|sa| {
            pods.iter().any(|p| {
                p["spec"]["serviceAccountName"] == sa["metadata"]["name"]
                    && p["metadata"]["namespace"] == sa["metadata"]["namespace"]
            })
        })
        .cloned()
        .collect();
    let (accounts, _) = servable(&accounts, served)?;
    let (pods, _) = servable(pods, served)?;
    t.ok(&["apply", "-f", "-"], Some(&accounts))?;
    let checked = t.ok(&["apply", "--dry-run=server", "-f", "-"], Some(&pods));
    t.ok(
        &["delete", "--ignore-not-found", "-f", "-"],
        Some(&accounts),
    )?;
    checked.map(drop)
}

/// Installs the CRD (for real: custom resources cannot be dry-run without it)
/// and waits until it is served.
pub fn install_crd(t: &Tools) -> anyhow::Result<()> {
    t.ok(&["apply", "--server-side", "-f", CRD_PATHS[0]], None)?;
    t.ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/packetcaptureconfigs.networking.packet.io",
        ],
        None,
    )?;
    Ok(())
}

/// `kubectl apply --dry-run=server` of the chart rendered with the default
/// and the non-default values, of every manifest in the README's order, of
/// the sample and of the examples. Returns the kinds left out because the
/// server does not serve their API.
pub fn validate_server_side(t: &Tools) -> anyhow::Result<Vec<String>> {
    install_crd(t)?;
    let served = served(t)?;
    let mut skipped = Vec::new();
    for (label, args, namespace) in [
        ("default values", &["--namespace", NAMESPACE][..], NAMESPACE),
        (
            "non-default values",
            &["-f", NON_DEFAULT_VALUES][..],
            "capture-system",
        ),
    ] {
        // Namespaced objects can only be dry-run into a namespace that exists.
        t.ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"
            )),
        )?;
        let docs = documents(&template(&t.helm, args)?)?;
        let (pods, others): (Vec<Value>, Vec<Value>) =
            docs.into_iter().partition(|d| d["kind"] == "Pod");
        let (yaml, left_out) = servable(&others, &served)?;
        t.ok(&["apply", "--dry-run=server", "-f", "-"], Some(&yaml))
            .with_context(|| format!("the chart with {label}"))?;
        skipped.extend(left_out);
        dry_run_pods(t, &pods, &others, &served)
            .with_context(|| format!("the chart's pods with {label}"))?;
    }
    for (_, file) in FILES {
        let docs = documents(&std::fs::read_to_string(root().join(file))?)?;
        let (yaml, left_out) = servable(&docs, &served)?;
        // A manifest of cert-manager's objects only has nothing left here.
        if !yaml.is_empty() {
            t.ok(&["apply", "--dry-run=server", "-f", "-"], Some(&yaml))
                .with_context(|| file.to_owned())?;
        }
        skipped.extend(left_out);
    }
    let mut captures = vec![root().join(SAMPLE)];
    captures.extend(EXAMPLES.map(examples::path));
    for path in &captures {
        let path = path.to_str().context("non-UTF-8 path")?;
        t.ok(&["apply", "--dry-run=server", "-f", path], None)?;
    }
    skipped.sort();
    skipped.dedup();
    Ok(skipped)
}

/// Applies the examples for real, reads each back, deletes them.
pub fn apply_examples(t: &Tools) -> anyhow::Result<()> {
    install_crd(t)?;
    for name in EXAMPLES {
        let path = examples::path(name);
        t.ok(
            &["apply", "-f", path.to_str().context("non-UTF-8 path")?],
            None,
        )?;
        let spec = t.ok(
            &[
                "get",
                "packetcaptureconfig",
                name,
                "-o",
                "jsonpath={.spec.outputFormat}",
            ],
            None,
        )?;
        ensure!(!spec.is_empty(), "{name}: no outputFormat after apply");
        t.ok(
            &["delete", "packetcaptureconfig", name, "--wait=true"],
            None,
        )?;
    }
    Ok(())
}

/// One `kubectl auth can-i` question and the answer it must get.
pub struct Question {
    pub account: &'static str,
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// None: cluster-wide (or all namespaces for namespaced resources).
    pub namespace: Option<&'static str>,
    pub allowed: bool,
}

const fn q(
    account: &'static str,
    verb: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
    allowed: bool,
) -> Question {
    Question {
        account,
        verb,
        resource,
        subresource: None,
        namespace,
        allowed,
    }
}

const fn sub(mut question: Question, subresource: &'static str) -> Question {
    question.subresource = Some(subresource);
    question
}

const CTL: &str = "packet-capture-controller";
const AGENT: &str = "packet-capture-agent";
const PCC: &str = "packetcaptureconfigs.networking.packet.io";
const TOKENS: &str = "tokenreviews.authentication.k8s.io";
const ACCESS: &str = "subjectaccessreviews.authorization.k8s.io";
const LEASES: &str = "leases.coordination.k8s.io";
const CRDS: &str = "customresourcedefinitions.apiextensions.k8s.io";
const VWCS: &str = "validatingwebhookconfigurations.admissionregistration.k8s.io";
const MWCS: &str = "mutatingwebhookconfigurations.admissionregistration.k8s.io";
/// The webhook's certificate (cert-manager writes it with the default
/// values), and the controller's own CA (self-managed certificates only).
const CERT_SECRET: &str = "secrets/packet-capture-webhook-tls";
const CA_SECRET: &str = "secrets/packet-capture-ca";
/// The agents' CA that cert-manager keeps.
const AGENT_CA_SECRET: &str = "secrets/packet-capture-agent-ca";
const CSRS: &str = "certificatesigningrequests.certificates.k8s.io";
const SETTINGS: &str = "configmaps/packet-capture-config";
const AUTHENTICATION_CONFIG: &str = "configmaps/extension-apiserver-authentication";
const AGENT_CA_BUNDLE: &str = "configmaps/packet-capture-agent-ca";
const LEASE: &str = "leases.coordination.k8s.io/packet-capture-controller";
const WEBHOOK_CONFIGURATION: &str =
    "validatingwebhookconfigurations.admissionregistration.k8s.io/packet-capture-webhook";
const NS: Option<&str> = Some(NAMESPACE);
const OTHER: Option<&str> = Some("default");
/// Where the chart used to install: the controller's rules on any name
/// (create ConfigMaps, Secrets, Leases) must not reach it.
const KUBE_SYSTEM: Option<&str> = Some("kube-system");

/// What each account may and may not do.
pub const QUESTIONS: &[Question] = &[
    q(CTL, "get", PCC, None, true),
    q(CTL, "list", PCC, None, true),
    q(CTL, "watch", PCC, None, true),
    q(CTL, "patch", PCC, None, true),
    q(CTL, "update", PCC, None, true),
    sub(q(CTL, "patch", PCC, None, true), "status"),
    sub(q(CTL, "update", PCC, None, false), "status"),
    sub(q(CTL, "update", PCC, None, true), "finalizers"),
    q(CTL, "create", PCC, None, false),
    q(CTL, "delete", PCC, None, false),
    q(CTL, "list", "pods", None, true),
    q(CTL, "watch", "pods", None, true),
    // Capturing any pod's traffic: the agents require it to start one.
    q(CTL, "capture", "pods", None, true),
    // Reading captured files is for people, not for the controller: it
    // only relays reads for the users the API server names (the agents
    // then decide by those users' permissions).
    sub(q(CTL, "get", PCC, None, false), "files"),
    sub(q(CTL, "relay", PCC, None, true), "files"),
    sub(q(AGENT, "relay", PCC, None, false), "files"),
    q(CTL, "get", "nodes", None, true),
    q(CTL, "create", "pods", OTHER, false),
    q(CTL, "delete", "pods", OTHER, false),
    q(CTL, "update", "nodes", None, false),
    q(CTL, "get", "namespaces", None, true),
    q(CTL, "list", "namespaces", None, true),
    q(CTL, "watch", "namespaces", None, true),
    q(CTL, "update", "namespaces", None, false),
    q(CTL, "create", "events", OTHER, true),
    q(CTL, "create", "events.events.k8s.io", OTHER, true),
    q(CTL, "create", TOKENS, None, false),
    q(CTL, "create", ACCESS, None, true),
    // Results ConfigMaps written by apply; its settings read by name only.
    q(CTL, "create", "configmaps", NS, true),
    q(CTL, "patch", "configmaps", NS, true),
    q(CTL, "get", "configmaps", NS, false),
    q(CTL, "delete", "configmaps", NS, false),
    q(CTL, "get", SETTINGS, NS, true),
    q(CTL, "watch", SETTINGS, NS, true),
    q(CTL, "get", "configmaps", OTHER, false),
    q(CTL, "create", "configmaps", KUBE_SYSTEM, false),
    q(CTL, "patch", "configmaps", KUBE_SYSTEM, false),
    // How the API server says who calls the aggregated API, by name (the
    // API server's own role for it); no other ConfigMap there.
    q(CTL, "get", AUTHENTICATION_CONFIG, KUBE_SYSTEM, true),
    q(CTL, "watch", AUTHENTICATION_CONFIG, KUBE_SYSTEM, true),
    q(CTL, "get", SETTINGS, KUBE_SYSTEM, false),
    // The agents' CA bundle, followed by every replica's aggregated API.
    q(CTL, "watch", AGENT_CA_BUNDLE, NS, true),
    q(CTL, "update", AGENT_CA_BUNDLE, NS, false),
    // Its Lease by name.
    q(CTL, "create", LEASES, NS, true),
    q(CTL, "update", LEASE, NS, true),
    q(CTL, "update", LEASES, NS, false),
    q(CTL, "delete", LEASE, NS, false),
    q(CTL, "get", LEASES, OTHER, false),
    q(CTL, "get", "secrets", NS, false),
    q(CTL, "list", "secrets", None, false),
    // The webhook's certificate by name only: read and watched, not written.
    q(CTL, "get", CERT_SECRET, NS, true),
    q(CTL, "list", CERT_SECRET, NS, true),
    q(CTL, "watch", CERT_SECRET, NS, true),
    q(CTL, "update", CERT_SECRET, NS, false),
    q(CTL, "delete", CERT_SECRET, NS, false),
    q(CTL, "get", CERT_SECRET, OTHER, false),
    // Its own CA by name, which signs the agents' certificates.
    q(CTL, "get", CA_SECRET, NS, true),
    q(CTL, "update", CA_SECRET, NS, true),
    q(CTL, "delete", CA_SECRET, NS, false),
    q(CTL, "get", AGENT_CA_SECRET, NS, true),
    q(CTL, "update", AGENT_CA_SECRET, NS, false),
    // The agents' certificate requests: read and decided, never made.
    q(CTL, "watch", CSRS, None, true),
    sub(q(CTL, "patch", CSRS, None, true), "approval"),
    sub(q(CTL, "patch", CSRS, None, true), "status"),
    sub(q(CTL, "update", CSRS, None, false), "approval"),
    q(CTL, "create", CSRS, None, false),
    q(CTL, "delete", CSRS, None, false),
    // Its own CA when missing (create cannot be limited to a name).
    q(CTL, "create", "secrets", NS, true),
    q(CTL, "create", "secrets", KUBE_SYSTEM, false),
    q(CTL, "create", LEASES, KUBE_SYSTEM, false),
    q(CTL, "get", WEBHOOK_CONFIGURATION, None, false),
    q(CTL, "patch", WEBHOOK_CONFIGURATION, None, false),
    q(CTL, "patch", VWCS, None, false),
    q(CTL, "patch", MWCS, None, false),
    q(CTL, "create", "deployments.apps", NS, false),
    q(CTL, "get", CRDS, None, false),
    q(AGENT, "create", TOKENS, None, true),
    q(AGENT, "create", ACCESS, None, true),
    q(AGENT, "get", "secrets", NS, false),
    q(AGENT, "list", "secrets", None, false),
    q(AGENT, "get", "pods", OTHER, false),
    q(AGENT, "list", "pods", None, false),
    q(AGENT, "get", "nodes", None, false),
    q(AGENT, "get", PCC, None, false),
    // Its own certificate request: made and watched, never decided.
    q(AGENT, "create", CSRS, None, true),
    q(AGENT, "watch", CSRS, None, true),
    sub(q(AGENT, "update", CSRS, None, false), "approval"),
    sub(q(AGENT, "update", CSRS, None, false), "status"),
    q(AGENT, "delete", CSRS, None, false),
    q(AGENT, "capture", "pods", None, false),
    sub(q(AGENT, "get", PCC, None, false), "files"),
    q(AGENT, "get", "configmaps", NS, false),
    // The settings ConfigMap by name, for LOG_LEVEL while the agents run.
    q(AGENT, "get", SETTINGS, NS, true),
    q(AGENT, "watch", SETTINGS, NS, true),
    q(AGENT, "update", SETTINGS, NS, false),
    q(AGENT, "get", SETTINGS, OTHER, false),
    q(AGENT, "create", "events", NS, false),
];

/// Installs the CRD, applies the manifests' namespace and
/// manifests/rbac.yaml and asks every [`QUESTIONS`] entry (the server must
/// authorize with RBAC); returns the answers that were wrong (empty when all
/// are right).
pub fn check_rbac(t: &Tools) -> anyhow::Result<Vec<String>> {
    // Without the CRD, kubectl cannot map packetcaptureconfigs to its group
    // and every answer about it is "no".
    install_crd(t)?;
    // FILES is in install order: the namespace, then the RBAC.
    for (_, file) in &FILES[..2] {
        t.ok(&["apply", "-f", file], None)?;
    }
    let mut wrong = Vec::new();
    for question in QUESTIONS {
        let user = format!(
            "--as=system:serviceaccount:{NAMESPACE}:{}",
            question.account
        );
        let mut args = vec![
            "auth",
            "can-i",
            question.verb,
            question.resource,
            user.as_str(),
        ];
        let subresource;
        if let Some(s) = question.subresource {
            subresource = format!("--subresource={s}");
            args.push(&subresource);
        }
        let namespace;
        match question.namespace {
            Some(ns) => {
                namespace = format!("--namespace={ns}");
                args.push(&namespace);
            }
            None => args.push("--all-namespaces"),
        }
        let out = t.run(&args, None)?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let allowed = match answer.as_str() {
            "yes" => true,
            "no" => false,
            _ => bail!(
                "kubectl {} answered {answer:?}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        if allowed != question.allowed {
            wrong.push(format!(
                "{} {} {}{} in {}: {answer}, expected {}",
                question.account,
                question.verb,
                question.resource,
                question
                    .subresource
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                question.namespace.unwrap_or("all namespaces"),
                if question.allowed { "yes" } else { "no" }
            ));
        }
    }
    Ok(wrong)
}

/// `make <target>` against the cluster, with `KUBECTL` set to the tool.
pub fn make(t: &Tools, target: &str) -> anyhow::Result<String> {
    let out = Command::new("make")
        .current_dir(root())
        .arg("--no-print-directory")
        .arg(target)
        .arg(format!("KUBECTL={}", t.kubectl.display()))
        .env("KUBECONFIG", &t.kubeconfig)
        .output()
        .with_context(|| format!("starting make {target}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "make {target} failed:\n{text}");
    Ok(text)
}

fn exists(t: &Tools, resource: &str, namespaced: bool) -> anyhow::Result<bool> {
    let mut args = vec!["get", resource, "--ignore-not-found", "-o", "name"];
    if namespaced {
        args.extend(["-n", NAMESPACE]);
    }
    Ok(!t.ok(&args, None)?.trim().is_empty())
}

/// `make deploy`, `status`, `restart` and `destroy` against the cluster.
/// `logs-controller` and `logs-agent` read container logs from a kubelet,
/// which a control plane without kubelets does not have.
pub fn check_make_targets(t: &Tools) -> anyhow::Result<()> {
    let deployed = make(t, "deploy")?;
    ensure!(
        deployed.contains("daemonset.apps/packet-capture-agent"),
        "make deploy did not apply the agent:\n{deployed}"
    );
    for (resource, namespaced) in [
        ("crd/packetcaptureconfigs.networking.packet.io", false),
        ("deployment/packet-capture-controller", true),
        ("daemonset/packet-capture-agent", true),
        ("configmap/packet-capture-config", true),
        ("clusterrole/packet-capture-agent", false),
    ] {
        ensure!(
            exists(t, resource, namespaced)?,
            "make deploy did not create {resource}"
        );
    }
    t.ok(&["apply", "-f", SAMPLE], None)?;

    let status = make(t, "status")?;
    for want in [
        "packet-capture-controller",
        "packet-capture-agent",
        "sample-capture",
    ] {
        ensure!(
            status.contains(want),
            "make status does not show {want}:\n{status}"
        );
    }

    make(t, "restart")?;
    for workload in [
        "deployment/packet-capture-controller",
        "daemonset/packet-capture-agent",
    ] {
        let restarted = t.ok(
            &[
                "get",
                workload,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}",
            ],
            None,
        )?;
        ensure!(
            !restarted.trim().is_empty(),
            "make restart did not restart {workload}"
        );
    }

    make(t, "destroy")?;
    for (resource, namespaced) in [
        ("deployment/packet-capture-controller", true),
        ("daemonset/packet-capture-agent", true),
        ("configmap/packet-capture-config", true),
        ("serviceaccount/packet-capture-agent", true),
        ("clusterrole/packet-capture-controller", false),
        ("crd/packetcaptureconfigs.networking.packet.io", false),
        (&format!("namespace/{NAMESPACE}"), false),
    ] {
        ensure!(
            !exists(t, resource, namespaced)?,
            "make destroy left {resource}"
        );
    }
    // A second destroy finds nothing to delete and still succeeds.
    make(t, "destroy")?;
    Ok(())
}

/// The README's Helm install, then its uninstall: `helm install` (the webhook
/// and cert-manager's objects only when cert-manager's API is served), a capture applied, `helm
/// uninstall`, the CRD deleted by hand as the README says.
pub fn check_helm_install(t: &Tools) -> anyhow::Result<()> {
    let helm = |args: &[&str]| {
        output(
            Command::new(&t.helm)
                .current_dir(root())
                .env("KUBECONFIG", &t.kubeconfig)
                .args(args),
        )
    };
    let cert_manager = served(t)?.iter().any(|v| v.starts_with("cert-manager.io/"));
    let webhook = format!("webhook.enabled={cert_manager}");
    let with_cert_manager = format!("certManager.enabled={cert_manager}");
    let notes = helm(&[
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        &webhook,
        "--set",
        &with_cert_manager,
    ])?;
    ensure!(
        notes.contains("STATUS: deployed") && notes.contains("kubectl get pcc"),
        "helm install printed no NOTES:\n{notes}"
    );
    ensure!(
        notes.contains(&format!("installed in namespace {NAMESPACE}.")),
        "helm install did not install into its release namespace:\n{notes}"
    );
    for (resource, namespaced) in [
        ("crd/packetcaptureconfigs.networking.packet.io", false),
        ("deployment/packet-capture-controller", true),
        ("daemonset/packet-capture-agent", true),
        ("configmap/packet-capture-config", true),
    ] {
        ensure!(
            exists(t, resource, namespaced)?,
            "helm install did not create {resource}"
        );
    }
    t.ok(&["apply", "-f", SAMPLE], None)?;
    t.ok(&["delete", "pcc", "--all", "--wait=true"], None)?;
    // This cluster has no node that runs pods, so the pre-delete hook's
    // Job (which deletes the captures, none here) would never finish; the
    // hook is rendered and checked in tests/chart.rs.
    helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--wait",
        "--no-hooks",
    ])?;
    ensure!(
        !exists(t, "deployment/packet-capture-controller", true)?,
        "helm uninstall left the controller"
    );
    t.ok(
        &["delete", "crd", "packetcaptureconfigs.networking.packet.io"],
        None,
    )?;
    Ok(())
}

/// The local control plane's kubeconfig and tools, or None (after saying
/// why) when the test cannot run here; in CI that fails the test.
pub fn test_tools(test: &str) -> Option<Tools> {
    let cluster = runtime().block_on(Cluster::for_test(test))?;
    Some(Tools::of(cluster))
}

/// A control plane of the test's own, for checks that need a cluster
/// nobody else has touched, with its tools; None as for [`test_tools`].
pub fn fresh_cluster(test: &str) -> Option<(Cluster, Tools)> {
    if !packet_capture_test_support::privileged(test) {
        return None;
    }
    let name = format!("f{}", std::process::id());
    let cluster = runtime()
        .block_on(Cluster::start(&name, Lifetime::Process))
        .unwrap_or_else(|e| panic!("{test}: the local control plane did not start: {e}"));
    let tools = Tools::of(&cluster);
    Some((cluster, tools))
}

/// The runtime the control planes' clients live on: the process's.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Runtime::new().expect("a tokio runtime"))
}

impl Tools {
    fn of(cluster: &Cluster) -> Self {
        Self {
            kubeconfig: cluster.kubeconfig(),
            kubectl: cluster.bin_dir().join("kubectl"),
            helm: cluster.bin_dir().join("helm"),
        }
    }
}
