//! One scenario's world in the shared local control plane: a namespace,
//! simulated nodes each with a pod and a real agent (authenticating its
//! callers against the apiserver), and the real controller binary under its
//! service account. The controller sees only the world's captures and agents
//! (`--capture-selector` and `--agent-selector` on the world's label), so
//! worlds run side by side in one cluster.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::{
    CaptureState, LabelSelector, NodeCapture, PacketCaptureConfig, PacketCaptureConfigSpec,
    PacketCaptureConfigStatus, Phase, PodSelector,
};
use packet_capture_proto::v1::agent_client::AgentClient;
use packet_capture_proto::v1::{
    Capture, DownloadFileRequest, ListCapturesRequest, ListFilesRequest, WatchCaptureRequest,
};
use packet_capture_test_support::cluster::{
    AgentOptions, COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, Cluster, ClusterProcess,
    KUBERNETES_VERSION, SimAgent, SimNode, SimPod, TestNamespace, workspace_root,
};
use packet_capture_test_support::{unique_name, workspace_binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, MutexGuard, OnceCell};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The label that ties captures and agents to their world's controller.
pub const WORLD_LABEL: &str = "e2e.packet.io/world";

/// The pods of namespace `ns` that carry `labels`.
pub fn labelled(ns: &str, labels: &[(&str, &str)]) -> Option<PodSelector> {
    let selector = |pairs: &[(&str, &str)]| LabelSelector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    Some(PodSelector {
        labels: selector(labels),
        namespace_selector: Some(selector(&[("kubernetes.io/metadata.name", ns)])),
        ..Default::default()
    })
}
/// The audience of the controller's token for the agents.
pub const AUDIENCE: &str = "packet-capture-agent";
/// Longest wait for one status change.
const WAIT: Duration = Duration::from_secs(90);

/// What a world holds besides its controller.
#[derive(Clone, Copy)]
pub struct Setup {
    /// Nodes, each with an agent and one pod (`pod-<i>`).
    pub nodes: usize,
    /// Whether and how the controller serves the validating webhook (on a
    /// free port of the host).
    pub webhook: Certs,
    /// The controller's `--agent-wait-seconds`; `None`: its default.
    pub agent_wait_seconds: Option<u32>,
    /// Nodes whose agent's Pod is never marked Ready (as while a startup
    /// probe fails), so the controller never sees it Ready until the test
    /// marks it so with `SimAgent::set_ready`.
    pub unready_agents: &'static [usize],
}

/// Where the world's controller gets the webhook's certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Certs {
    /// No webhook (`--disable-webhook`).
    Off,
    /// A certificate for the host address from the cluster's CA, in
    /// `--webhook-cert-dir`.
    Dir,
    /// `--webhook-certs=cert-manager`, and no Secret yet: the test writes it
    /// as cert-manager would.
    CertManager,
    /// `--webhook-certs=self-managed`, under the RBAC the chart gives that
    /// mode, with the host address among the certificate's names.
    SelfManaged,
}

pub const TWO_NODES: Setup = Setup {
    nodes: 2,
    webhook: Certs::Off,
    agent_wait_seconds: None,
    unready_agents: &[],
};

/// The names the chart gives the webhook's Secrets and configuration, in
/// [`COMPONENT_NAMESPACE`]. The controller's RBAC allows these names alone,
/// so the worlds that use them take turns ([`CHART_NAMES`]).
pub const CERT_SECRET: &str = "packet-capture-webhook-tls";
pub const CA_SECRET: &str = "packet-capture-ca";
pub const WEBHOOK_CONFIGURATION: &str = "packet-capture-webhook";
/// Every world's controller admits this many captures per requester that
/// have not ended.
pub const MAX_PER_REQUESTER: u32 = 2;
static CHART_NAMES: Mutex<()> = Mutex::const_new(());
/// The aggregated API's APIService is one for the cluster: the worlds that
/// register it for their controller, and the worlds whose controller
/// fills in its caBundle (self-managed certificates), take turns.
pub static API_SERVICE_TURN: Mutex<()> = Mutex::const_new(());

/// `kubectl delete` of everything named [`CERT_SECRET`], [`CA_SECRET`] and
/// [`WEBHOOK_CONFIGURATION`], so that a world starts without them.
fn clear_chart_names(cluster: &Cluster) -> Result<(), String> {
    for args in [
        &[
            "delete",
            "secret",
            CERT_SECRET,
            CA_SECRET,
            "-n",
            COMPONENT_NAMESPACE,
            "--ignore-not-found",
        ][..],
        &[
            "delete",
            "validatingwebhookconfiguration,mutatingwebhookconfiguration",
            WEBHOOK_CONFIGURATION,
            "--ignore-not-found",
        ][..],
    ] {
        cluster
            .kubectl_run(args)
            .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))?;
    }
    Ok(())
}

/// Once per test binary, for self-managed certificates: the chart's RBAC
/// rendered as `helm install --set certManager.enabled=false` renders it
/// (the controller's own Secrets and its webhook configuration, by name).
/// It only adds to what [`install`] applied.
async fn install_self_managed_rbac(cluster: &Cluster) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            let mut helm = tokio::process::Command::from(cluster.helm());
            let out = helm
                .current_dir(workspace_root())
                .args(["template", "packet-capture", "charts/packet-capture"])
                .args(["--namespace", COMPONENT_NAMESPACE])
                .args(["--kube-version", KUBERNETES_VERSION])
                .args(["--set", "certManager.enabled=false"])
                .args(["--show-only", "templates/rbac.yaml"])
                .output()
                .await
                .expect("running helm template");
            assert!(
                out.status.success(),
                "helm template: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = cluster.dir().join("rbac-self-managed.yaml");
            std::fs::write(&path, &out.stdout).expect("writing the rendered RBAC");
            let path = path.display().to_string();
            cluster
                .kubectl_async(&["apply", "--server-side", "--force-conflicts", "-f", &path])
                .await
                .expect("applying the self-managed RBAC");
        })
        .await;
}

/// How a world's agents run: labelled with its id, for its controller.
fn agent_options(id: &str) -> AgentOptions {
    AgentOptions {
        labels: vec![(WORLD_LABEL.into(), id.to_owned())],
        ..AgentOptions::new(agent_binary())
    }
}

/// The agent binary (another package's, so not in `CARGO_BIN_EXE_*`).
fn agent_binary() -> PathBuf {
    workspace_binary(
        "packet-capture-agent",
        "packet-capture-agent",
        &[
            "packet-capture-agent/src",
            "packet-capture-ebpf/src",
            "packet-capture-common/src",
            "proto",
        ],
    )
}

/// Once per test binary, as `make deploy` begins: the CRD, the namespace
/// (the cluster made it already, for the components' service accounts),
/// then the RBAC (so the agents may review tokens and the controller may
/// act) and the settings ConfigMap (the controller reads AGENT_PORT from it).
async fn install(cluster: &Cluster) {
    static INSTALLED: OnceCell<()> = OnceCell::const_new();
    INSTALLED
        .get_or_init(|| async {
            cluster.install_crd().await.expect("installing the CRD");
            let manifests = [
                "manifests/00-namespace.yaml",
                "manifests/rbac.yaml",
                "manifests/config.yaml",
            ];
            cluster
                .apply(&manifests)
                .await
                .unwrap_or_else(|e| panic!("applying {manifests:?}: {e}"));
            // The account the tests read capture files with, as a person
            // would: the controller's own may not.
            for args in [
                &[
                    "create",
                    "serviceaccount",
                    READER,
                    "-n",
                    COMPONENT_NAMESPACE,
                ][..],
                &[
                    "create",
                    "clusterrolebinding",
                    READER,
                    "--clusterrole=packet-capture-viewer",
                    &format!("--serviceaccount={COMPONENT_NAMESPACE}:{READER}"),
                ],
                &[
                    "create",
                    "clusterrolebinding",
                    &format!("{READER}-beyond-ascii"),
                    "--clusterrole=packet-capture-viewer",
                    &format!("--user={READER_BEYOND_ASCII}"),
                ],
            ] {
                if let Err(e) = cluster.kubectl_async(args).await
                    && !e.to_string().contains("AlreadyExists")
                {
                    panic!("kubectl {args:?}: {e}");
                }
            }
        })
        .await;
}

/// The service account, bound to packet-capture-viewer, that the tests
/// download capture files with.
pub const READER: &str = "e2e-capture-reader";
/// A user, bound to packet-capture-viewer, whose name no header carries as
/// it is; the tests impersonate it.
pub const READER_BEYOND_ASCII: &str = "Zoë Ünicode";

/// A port nothing listens on now (the controller binds it on all addresses).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The controller binary under the controller service account's
/// kubeconfig, on the host, as a process of the cluster.
pub struct Controller {
    cluster: &'static Cluster,
    role: String,
    args: Vec<String>,
    process: Option<ClusterProcess>,
}

impl Controller {
    fn start(cluster: &'static Cluster, role: String, args: Vec<String>) -> Self {
        let mut c = Self {
            cluster,
            role,
            args,
            process: None,
        };
        c.restart();
        c
    }

    /// Starts it (again, after [`Controller::kill`]); it appends to its log.
    pub fn restart(&mut self) {
        assert!(self.process.is_none(), "the controller already runs");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_packet-capture-controller"));
        cmd.env(
            "KUBECONFIG",
            self.cluster
                .service_account_kubeconfig(CONTROLLER_SERVICE_ACCOUNT),
        )
        .env("NO_COLOR", "1")
        // As the Deployment sets it from the downward API.
        .env("POD_NAMESPACE", COMPONENT_NAMESPACE)
        .args(&self.args);
        let process = self
            .cluster
            .start_process(&self.role, cmd)
            .expect("starting the controller");
        self.process = Some(process);
    }

    /// SIGKILL, as a crash or an evicted pod: it cleans nothing up.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().expect("killing the controller");
        }
    }

    pub fn log(&self) -> String {
        let path = self.cluster.dir().join(format!("logs/{}.log", self.role));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Fails, with its log, if the controller has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.as_mut().and_then(ClusterProcess::exited) {
            panic!("the controller exited ({status}):\n{}", self.log());
        }
    }

    /// Waits until `addr` accepts connections (a listener offers no event to
    /// another process), failing early with the log if the controller exits.
    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "the controller does not listen on {addr}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `message` with `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("a header");
    r.metadata_mut().insert("authorization", value);
    r
}

/// A ping that runs until dropped.
pub struct Pinging(#[allow(dead_code)] tokio::process::Child);

/// A packet as tshark decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: String,
    pub dst: String,
    /// 8 echo request, 0 echo reply; empty for other packets.
    pub icmp_type: String,
}

/// Where a world's controller serves the webhook.
pub struct Webhook {
    pub port: u16,
    /// With [`Certs::Dir`]: the CA that signed its certificate (PEM), for
    /// the `caBundle`.
    pub ca: Option<Vec<u8>>,
}

pub struct World {
    pub cluster: &'static Cluster,
    pub client: Client,
    /// The value of [`WORLD_LABEL`] on its captures and agents.
    pub id: String,
    /// The controller's token for the agents.
    pub token: String,
    /// A packet-capture-viewer's token for the agents (files).
    pub reader_token: String,
    pub webhook: Option<Webhook>,
    /// The controller's `/metrics`, `/healthz` and `/readyz` port.
    pub metrics_port: u16,
    // Dropped in this order: the controller stops acting before the agents
    // stop, the agents before their nodes go.
    pub controller: Controller,
    pub agents: Vec<SimAgent>,
    pub pods: Vec<SimPod>,
    pub nodes: Vec<SimNode>,
    pub namespace: TestNamespace,
    /// Held while the world's controller may write the APIService (after
    /// the controller: released once it is gone).
    _api_service: Option<MutexGuard<'static, ()>>,
    /// Held while the world may use the chart's names (last: released when
    /// everything else is gone).
    chart_names: Option<MutexGuard<'static, ()>>,
}

impl World {
    /// The world for `test`, or `None` when the test cannot run here (no
    /// root or tools, outside CI).
    pub async fn start(test: &str, setup: Setup) -> Option<Self> {
        let cluster = Cluster::for_test(test).await?;
        install(cluster).await;
        let chart_names = match setup.webhook {
            Certs::CertManager | Certs::SelfManaged => {
                let guard = CHART_NAMES.lock().await;
                clear_chart_names(cluster).expect("removing what an earlier world left");
                Some(guard)
            }
            Certs::Off | Certs::Dir => None,
        };
        let api_service = match setup.webhook {
            Certs::SelfManaged => Some(API_SERVICE_TURN.lock().await),
            _ => None,
        };
        if setup.webhook == Certs::SelfManaged {
            install_self_managed_rbac(cluster).await;
        }
        let client = cluster.client().expect("an admin client");
        let id = unique_name("w");
        let dir = cluster.dir().join("e2e").join(&id);
        std::fs::create_dir_all(&dir).expect("the world's directory");
        let namespace = cluster.namespace("e2e").await.expect("a namespace");
        let options = agent_options(&id);
        let (mut nodes, mut pods, mut agents) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..setup.nodes {
            let node = cluster.add_node("e2e").await.expect("a node");
            let pod = node.add_pod(namespace.name(), &format!("pod-{i}")).await;
            pods.push(pod.expect("a pod"));
            let options = AgentOptions {
                ready: !setup.unready_agents.contains(&i),
                ..options.clone()
            };
            agents.push(node.launch_agent(&options).await.expect("an agent"));
            nodes.push(node);
        }

        // The controller's projected token for the agents, and its own
        // service account's kubeconfig for the API.
        let token = cluster
            .token_for(COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, &[AUDIENCE])
            .await
            .expect("the controller's token for the agents");
        let token_file = dir.join("agent-token");
        std::fs::write(&token_file, &token).expect("writing the token");
        let reader_token = cluster
            .token_for(COMPONENT_NAMESPACE, READER, &[AUDIENCE])
            .await
            .expect("a token of the reader");
        let selector = format!("{WORLD_LABEL}={id}");
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            "--capture-selector".into(),
            selector.clone(),
            "--agent-selector".into(),
            format!("app=packet-capture-agent,{selector}"),
            "--agent-token-file".into(),
            token_file.display().to_string(),
            "--metrics-port".into(),
            metrics_port.to_string(),
            "--identity".into(),
            id.clone(),
            // The agents' certificates are signed with the controller's own
            // CA (packet-capture-ca), which every world's RBAC allows, with
            // cert-manager's rules or with the self-managed ones.
            "--agent-ca".into(),
            "self-managed".into(),
            "--max-captures-per-requester".into(),
            MAX_PER_REQUESTER.to_string(),
            "--log-level".into(),
            "DEBUG".into(),
        ];
        if let Some(seconds) = setup.agent_wait_seconds {
            args.extend(["--agent-wait-seconds".into(), seconds.to_string()]);
        }
        let port = free_port();
        let webhook_args = |mode: &str| {
            ["--webhook-port", &port.to_string(), "--webhook-certs", mode].map(String::from)
        };
        let webhook = match setup.webhook {
            Certs::Off => {
                args.push("--disable-webhook".into());
                None
            }
            Certs::Dir => {
                let certs = dir.join("webhook");
                let ca = cluster
                    .serving_certificate(
                        &certs,
                        &[IpAddr::V4(cluster.host_ip())],
                        // The Service the aggregated API is registered with.
                        &[&format!("packet-capture-webhook.{COMPONENT_NAMESPACE}.svc")],
                    )
                    .expect("the webhook's certificate");
                args.extend(webhook_args("dir"));
                args.extend(["--webhook-cert-dir".into(), certs.display().to_string()]);
                Some(Webhook { port, ca: Some(ca) })
            }
            Certs::CertManager => {
                args.extend(webhook_args("cert-manager"));
                Some(Webhook { port, ca: None })
            }
            Certs::SelfManaged => {
                args.extend(webhook_args("self-managed"));
                // Registered by URL on the host address (no Service routes
                // here), so that is a name of the certificate too.
                args.extend([
                    "--webhook-extra-names".into(),
                    cluster.host_ip().to_string(),
                ]);
                Some(Webhook { port, ca: None })
            }
        };
        let mut controller = Controller::start(cluster, format!("controller-{id}"), args);
        // Serving metrics, it has passed its start-up checks: one that
        // exits fails here with its log rather than as agents left unsigned.
        controller.wait_listening(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            metrics_port,
        ));
        if let Some(hook) = &webhook {
            controller.wait_listening(SocketAddr::new(IpAddr::V4(cluster.host_ip()), hook.port));
        }
        // The agents serve once the controller has signed their certificates.
        let mut unserved = None;
        for agent in &mut agents {
            if let Err(e) = agent.until_serving().await {
                unserved = Some(e);
                break;
            }
        }
        if let Some(e) = unserved {
            controller.assert_running();
            print_logs(&id, &controller, &agents);
            print_requests(&client, &nodes).await;
            panic!("an agent serving: {e}");
        }
        Some(Self {
            cluster,
            client,
            id,
            token,
            reader_token,
            webhook,
            metrics_port,
            controller,
            agents,
            pods,
            nodes,
            namespace,
            _api_service: api_service,
            chart_names,
        })
    }

    /// Replaces node `node`'s agent with a new process and Pod, as when
    /// its Pod is deleted and the DaemonSet makes another: the new agent
    /// knows none of the old one's captures. Returns once it is launched;
    /// it serves once the controller has signed its certificate
    /// (`SimAgent::until_serving`).
    pub async fn replace_agent(&mut self, node: usize) {
        let old = self.agents.remove(node);
        let exit = old.stop().expect("stopping the agent");
        assert!(exit.success(), "the agent did not stop cleanly: {exit}");
        let agent = self.nodes[node]
            .launch_agent(&agent_options(&self.id))
            .await
            .expect("a new agent");
        self.agents.insert(node, agent);
    }

    /// The controller's `/readyz` (status line and body).
    pub async fn readyz(&self) -> String {
        self.metrics_port_get("/readyz").await
    }

    /// A GET of `path` on the controller's metrics port: the status line,
    /// the headers and the body.
    pub async fn metrics_port_get(&self, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect((Ipv6Addr::LOCALHOST, self.metrics_port))
            .await
            .expect("connecting to the controller's metrics port");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("asking {path}: {e}"));
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .unwrap_or_else(|e| panic!("reading {path}: {e}"));
        answer
    }

    pub fn api(&self) -> Api<PacketCaptureConfig> {
        Api::all(self.client.clone())
    }

    /// A capture of this world (labelled for its controller).
    pub fn capture(&self, spec: PacketCaptureConfigSpec) -> PacketCaptureConfig {
        let mut pcc = PacketCaptureConfig::new(&unique_name("cap"), spec);
        pcc.metadata.labels = Some([(WORLD_LABEL.to_string(), self.id.clone())].into());
        pcc
    }

    pub async fn create(&self, spec: PacketCaptureConfigSpec) -> PacketCaptureConfig {
        self.api()
            .create(&PostParams::default(), &self.capture(spec))
            .await
            .expect("creating the PacketCaptureConfig")
    }

    /// Waits (on watch events) until the resource satisfies `cond`.
    pub async fn until(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(&PacketCaptureConfig) -> bool + Send + 'static,
    ) -> PacketCaptureConfig {
        let wait = await_condition(self.api(), name, move |p: Option<&PacketCaptureConfig>| {
            p.is_some_and(&cond)
        });
        match tokio::time::timeout(WAIT, wait).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => panic!("{name} is gone while waiting for {what}"),
            Ok(Err(e)) => panic!("watching {name}: {e}"),
            Err(_) => {
                let now = self.api().get_opt(name).await.ok().flatten();
                panic!(
                    "{name}: no {what} within {WAIT:?}; status: {:#?}",
                    now.and_then(|p| p.status)
                )
            }
        }
    }

    pub async fn until_phase(&self, name: &str, phase: Phase) -> PacketCaptureConfig {
        self.until(name, &format!("phase {phase:?}"), move |p| {
            p.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    /// Waits until the status of `generation` shows the capture running on
    /// `nodes` nodes (so traffic from now on is captured everywhere).
    pub async fn until_running_on(
        &self,
        name: &str,
        generation: i64,
        nodes: usize,
    ) -> PacketCaptureConfig {
        self.until(
            name,
            &format!("generation {generation} running on {nodes} nodes"),
            move |p| {
                p.status.as_ref().is_some_and(|s| {
                    s.observed_generation == Some(generation)
                        && s.capture_files.len() == nodes
                        && s.capture_files
                            .values()
                            .all(|e| e.status == CaptureState::Running)
                })
            },
        )
        .await
    }

    /// `count` pings from pod `from` to pod `to`, all answered.
    pub async fn ping(&self, from: usize, to: usize, count: u32) {
        let mut cmd = tokio::process::Command::from(self.pods[from].command("ping"));
        let out = cmd
            .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "2"])
            .arg(self.pods[to].ip().to_string())
            .output()
            .await
            .expect("running ping");
        assert!(
            out.status.success(),
            "ping from pod {from} to pod {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A gRPC client of node `node`'s agent, at the address the controller
    /// uses, verifying its certificate with the CAs the controller
    /// publishes.
    pub async fn agent(&self, node: usize) -> AgentClient<Channel> {
        let ca = self
            .cluster
            .agent_ca(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.controller.log()));
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        let endpoint = Endpoint::from_shared(format!("https://{}", self.agents[node].endpoint()))
            .expect("an agent URI")
            .tls_config(tls)
            .expect("TLS for the agent");
        AgentClient::new(endpoint.connect().await.expect("connecting to the agent"))
    }

    /// A request with the controller's token.
    pub fn authed<T>(&self, message: T) -> tonic::Request<T> {
        with_token(message, &self.token)
    }

    /// A request with the reader's token (capture files).
    pub fn as_reader<T>(&self, message: T) -> tonic::Request<T> {
        with_token(message, &self.reader_token)
    }

    /// The captures of a resource (by uid) on a node's agent.
    pub async fn captures_of(&self, node: usize, uid: &str) -> Vec<Capture> {
        let list = self
            .agent(node)
            .await
            .list_captures(self.authed(ListCapturesRequest {
                id_prefix: uid.into(),
            }))
            .await
            .expect("ListCaptures")
            .into_inner();
        list.captures
    }

    /// Capture `id` as `node`'s agent has it, now and at each change
    /// (WatchCapture).
    pub async fn watch_capture(&self, node: usize, id: &str) -> tonic::Streaming<Capture> {
        self.agent(node)
            .await
            .watch_capture(self.authed(WatchCaptureRequest { id: id.into() }))
            .await
            .expect("WatchCapture")
            .into_inner()
    }

    /// The names of the files `node`'s agent lists (ListFiles).
    pub async fn files_on(&self, node: usize) -> Vec<String> {
        self.agent(node)
            .await
            .list_files(self.as_reader(ListFilesRequest {}))
            .await
            .expect("ListFiles")
            .into_inner()
            .files
            .into_iter()
            .map(|f| f.name)
            .collect()
    }

    /// Downloads the file a capture wrote on `node` (or its compressed
    /// copy) through DownloadFile; where it is now.
    pub async fn download(&self, node: usize, output_file: &str) -> PathBuf {
        let name = Path::new(output_file)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("no file name in {output_file:?}"));
        let files = self.files_on(node).await;
        let file = files
            .iter()
            .find(|f| *f == name || f.starts_with(&format!("{name}.")))
            .unwrap_or_else(|| panic!("node {node} lists no {name}: {files:?}"))
            .clone();
        let mut stream = self
            .agent(node)
            .await
            .download_file(self.as_reader(DownloadFileRequest {
                name: file.clone(),
                ..Default::default()
            }))
            .await
            .expect("DownloadFile")
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend(chunk.expect("a chunk of the file").data);
        }
        let path = self
            .cluster
            .dir()
            .join("e2e")
            .join(&self.id)
            .join(format!("node{node}-{file}"));
        std::fs::write(&path, &bytes).expect("writing the download");
        path
    }

    /// [`download`](Self::download)s a capture's file and decodes its
    /// packets with tshark.
    pub async fn packets_in(&self, node: usize, output_file: &str) -> Vec<Packet> {
        let path = self.download(node, output_file).await;
        let out = Command::new("tshark")
            .args(["-n", "-r"])
            .arg(&path)
            .args(["-T", "fields", "-E", "separator=,"])
            .args(["-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type"])
            .output()
            .expect("running tshark");
        assert!(
            out.status.success(),
            "tshark cannot read {} of node {node}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let mut f = l.split(',').map(str::to_string);
                let mut next = || f.next().unwrap_or_default();
                Packet {
                    src: next(),
                    dst: next(),
                    icmp_type: next(),
                }
            })
            .collect()
    }

    /// The file of a capture on `node` holds an echo request from pod `a`
    /// to pod `b` and its reply; returns all its packets.
    pub async fn assert_pings_in(
        &self,
        node: usize,
        output_file: &str,
        a: usize,
        b: usize,
    ) -> Vec<Packet> {
        let packets = self.packets_in(node, output_file).await;
        let (a, b) = (self.pods[a].ip().to_string(), self.pods[b].ip().to_string());
        let has = |src: &str, dst: &str, icmp: &str| {
            packets
                .iter()
                .any(|p| p.src == src && p.dst == dst && p.icmp_type == icmp)
        };
        assert!(
            has(&a, &b, "8") && has(&b, &a, "0"),
            "node {node}: no echo request {a} > {b} and reply in {output_file}: {packets:?}"
        );
        packets
    }

    /// Creates the capture and waits until it runs on `nodes` nodes; the
    /// created resource and its name.
    pub async fn start_capture(
        &self,
        spec: PacketCaptureConfigSpec,
        nodes: usize,
    ) -> (PacketCaptureConfig, String) {
        let pcc = self.create(spec).await;
        let name = pcc.name_any();
        self.until_running_on(&name, 1, nodes).await;
        (pcc, name)
    }

    /// Pod `from` pings pod `to` every 0.2 s until the guard drops.
    pub fn pinging(&self, from: usize, to: usize) -> Pinging {
        let mut cmd = tokio::process::Command::from(self.pods[from].command("ping"));
        let child = cmd
            .args(["-n", "-q", "-i", "0.2"])
            .arg(self.pods[to].ip().to_string())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting ping");
        Pinging(child)
    }

    /// Node `node`'s entry in the status.
    pub fn entry<'s>(&self, status: &'s PacketCaptureConfigStatus, node: usize) -> &'s NodeCapture {
        let ip = self.nodes[node].ip().to_string();
        status
            .capture_files
            .get(&ip)
            .unwrap_or_else(|| panic!("no entry for node {node} ({ip}) in {status:#?}"))
    }

    /// Every node's capture completed, and its file holds pod 0's pings
    /// of pod 1 and their replies; the packets of each node.
    pub async fn assert_all_completed_with_pings(
        &self,
        status: &PacketCaptureConfigStatus,
    ) -> Vec<Vec<Packet>> {
        let mut all = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let entry = self.entry(status, i);
            assert_eq!(
                (entry.node.as_str(), entry.status),
                (node.name(), CaptureState::Completed),
                "{entry:?}"
            );
            assert!(entry.file_size > 0 && entry.packets > 0, "{entry:?}");
            all.push(self.assert_pings_in(i, &entry.output_file, 0, 1).await);
        }
        all
    }

    /// Deletes capture `name` and waits until it is gone (its finalizer
    /// released once the agents stopped it).
    pub async fn delete_capture(&self, name: &str, uid: &str) {
        self.api()
            .delete(name, &DeleteParams::default())
            .await
            .expect("deleting the capture");
        let gone = await_condition(self.api(), name, conditions::is_deleted(uid));
        tokio::time::timeout(Duration::from_secs(60), gone)
            .await
            .expect("the finalizer was not removed within 60 s")
            .expect("watching the deletion");
    }

    /// The uid of a resource.
    pub fn uid(pcc: &PacketCaptureConfig) -> String {
        pcc.uid().expect("a stored resource has a uid")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.chart_names.is_some() {
            // The controller first: a self-managed one would issue again
            // what is deleted under it.
            self.controller.kill();
            if let Err(e) = clear_chart_names(self.cluster) {
                eprintln!("world {}: {e}", self.id);
            }
        }
        if std::thread::panicking() {
            print_logs(&self.id, &self.controller, &self.agents);
        }
    }
}

/// What a failed test shows of a world: the controller's warnings and the
/// ends of its log and of each agent's.
/// The nodes' certificate requests as the API server has them: whether and
/// when each was approved, signed or refused, and by whom (its managed
/// fields), for an agent that got no certificate.
async fn print_requests(client: &Client, nodes: &[SimNode]) {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let list = match api.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(e) => return eprintln!("--- listing certificate requests: {e} ---"),
    };
    for csr in list.items {
        let name = csr.name_any();
        let node = nodes
            .iter()
            .find(|n| name.starts_with(&format!("packet-capture-agent-{}-", n.name())));
        if node.is_none() {
            continue;
        }
        let status = csr.status.unwrap_or_default();
        let conditions: Vec<String> = status
            .conditions
            .iter()
            .flatten()
            .map(|c| {
                let at = c.last_update_time.as_ref().map(|t| t.0.to_string());
                format!("{} {:?} at {}", c.type_, c.reason, at.unwrap_or_default())
            })
            .collect();
        let writers: Vec<String> = csr
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|m| {
                format!(
                    "{} {} {} at {}",
                    m.manager.as_deref().unwrap_or("?"),
                    m.operation.as_deref().unwrap_or("?"),
                    m.subresource.as_deref().unwrap_or("-"),
                    m.time.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
                )
            })
            .collect();
        let created = csr.metadata.creation_timestamp.map(|t| t.0.to_string());
        eprintln!(
            "--- certificate request {name} (created {}): signed: {}; conditions: {conditions:?}; written by: {writers:?} ---",
            created.unwrap_or_default(),
            status.certificate.is_some_and(|c| !c.0.is_empty()),
        );
    }
}

fn print_logs(id: &str, controller: &Controller, agents: &[SimAgent]) {
    let log = controller.log();
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| {
            [" WARN ", " ERROR ", "agent call failed", "stopped earlier"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    eprintln!(
        "--- world {id}: the controller's warnings and failed agent calls ---\n{}",
        tail(&notable.join("\n"), 40)
    );
    eprintln!(
        "--- world {id}: the controller's log (end) ---\n{}",
        tail(&log, 30)
    );
    for agent in agents {
        eprintln!(
            "--- the agent {} (end of {}) ---\n{}",
            agent.pod_name(),
            agent.log_path().display(),
            tail(&agent.log(), 30)
        );
    }
}
