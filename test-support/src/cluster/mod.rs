//! A real local Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, built from Go modules) with simulated nodes and
//! pods in network namespaces. The harness plays the kubelet: it creates
//! Node and Pod objects and patches their status, and runs the real agent in
//! a node's namespace.
//!
//! Tests share one control plane per test binary ([`Cluster::shared`]), each
//! in its own names. `cargo xtask cluster up` starts a detached one that
//! outlives the command ([`Lifetime::Detached`]).
//!
//! ```no_run
//! # async fn example() -> Result<(), packet_capture_test_support::cluster::Error> {
//! use packet_capture_test_support::cluster::Cluster;
//! let cluster = Cluster::shared().await;
//! let ns = cluster.namespace("ping").await?;
//! let (a, b) = (cluster.add_node("a").await?, cluster.add_node("b").await?);
//! let pa = a.add_pod(ns.name(), "pa").await?;
//! let pb = b.add_pod(ns.name(), "pb").await?;
//! pa.ping(pb.ip().into(), 1)?;
//! # Ok(()) }
//! ```

pub mod build;
mod control;
mod network;
mod pki;
mod process;
mod real;
mod sim;
mod state;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use tokio::sync::OnceCell;

pub use build::{Binaries, ETCD_VERSION, HELM_VERSION, KUBERNETES_VERSION};
pub use control::SERVICE_ACCOUNT_ISSUER;
pub use real::{CRI_NAMESPACE, PAUSE_IMAGE, RealNode, import_image};
pub use sim::{AgentOptions, AgentTls, ClusterProcess, SimAgent, SimNode, SimPod, TestNamespace};

use network::Plan;
use pki::Pki;
use process::Proc;
use state::State;

/// The namespace of the controller and the agents, and so of their service
/// accounts: the one the chart and the manifests install into by default
/// (`helm install --namespace packet-capture --create-namespace`). The
/// cluster creates it at start, as the install would, so that the
/// components' kubeconfigs exist before anything is installed.
pub const COMPONENT_NAMESPACE: &str = "packet-capture";
/// The service accounts that get a kubeconfig of their own.
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "packet-capture-controller";
/// Where a controller publishes the CAs of the agents' certificates (in
/// [`COMPONENT_NAMESPACE`]).
pub const AGENT_CA_CONFIG_MAP: &str = "packet-capture-agent-ca";
/// The agents' CA (in [`COMPONENT_NAMESPACE`]), made when the cluster starts.
pub const AGENT_CA_SECRET: &str = "packet-capture-agent-ca";
pub const AGENT_SERVICE_ACCOUNT: &str = "packet-capture-agent";
/// The Helm release name the README installs the chart as.
pub const HELM_RELEASE: &str = "packet-capture";
const COMPONENT_TOKEN_SECONDS: i64 = 365 * 24 * 3600;
const ADMIN_KUBECONFIG: &str = "admin.kubeconfig";
/// The role of the cluster's kube-scheduler in its state.
const SCHEDULER: &str = "kube-scheduler";

/// What can go wrong while starting or driving the local cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the control plane: {0}")]
    Build(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Process(String),
    #[error("network setup: {0}")]
    Network(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long the cluster's processes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Until the process that started them ends (tests, the demo): they get
    /// a parent-death signal, and everything is removed at exit, on drop, or
    /// by the next start after a crash.
    Process,
    /// Until `cargo xtask cluster down` (`cargo xtask cluster up`).
    Detached,
}

/// A running control plane and the nodes, pods and agents made on it.
pub struct Cluster {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    name: String,
    dir: PathBuf,
    plan: Plan,
    lifetime: Lifetime,
    binaries: Binaries,
    config: kube::Config,
    state: Mutex<State>,
    /// Held while links and routes change, which touches other nodes.
    network: Mutex<()>,
    children: Mutex<Vec<Child>>,
}

impl Cluster {
    /// The shared cluster for the test `test`, if it can run here: checks
    /// [`privileged`](crate::privileged) first (which fails the test in CI
    /// when root or a tool is missing, and skips it elsewhere).
    pub async fn for_test(test: &str) -> Option<&'static Cluster> {
        if !crate::privileged(test) {
            return None;
        }
        Some(Self::shared().await)
    }

    /// The control plane of this test binary, started by the first test that
    /// asks (which may wait for the first build) and shared by every test;
    /// removed when the process exits. Panics if it cannot start.
    pub async fn shared() -> &'static Cluster {
        static SHARED: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
        let started = SHARED
            .get_or_init(|| async {
                let name = format!("t{}", std::process::id());
                Cluster::start(&name, Lifetime::Process)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        match started {
            Ok(cluster) => cluster,
            Err(e) => panic!("the local control plane did not start: {e}"),
        }
    }

    /// Builds the binaries if needed (cached), then starts a control plane
    /// named `name` (unique among running clusters of this checkout).
    pub async fn start(name: &str, lifetime: Lifetime) -> Result<Self> {
        Self::start_with(name, lifetime, false).await
    }

    /// [`Cluster::start`] with the workload controllers (Deployments,
    /// ReplicaSets, DaemonSets, endpoints) running, as [`RealNode`]s need:
    /// on a cluster of simulated nodes alone their pods would never run.
    pub async fn start_with_workloads(name: &str, lifetime: Lifetime) -> Result<Self> {
        Self::start_with(name, lifetime, true).await
    }

    async fn start_with(name: &str, lifetime: Lifetime, workloads: bool) -> Result<Self> {
        let binaries = tokio::task::spawn_blocking(build::ensure)
            .await
            .map_err(|e| Error::Build(format!("the build task failed: {e}")))??;
        let detached = lifetime == Lifetime::Detached;
        let (dir, mut state) = {
            let lock = state::AllocationLock::take()?;
            state::allocate(&lock, &state::state_root(), name, detached)?
        };
        state.workloads = workloads;
        if !detached {
            state::remove_at_exit(&dir);
        }
        let mut boot = Boot {
            dir: dir.clone(),
            state,
            lifetime,
            binaries,
            children: Vec::new(),
        };
        match boot.run().await {
            Ok(config) => {
                let plan = boot.state.plan();
                let children = if detached {
                    Vec::new()
                } else {
                    std::mem::take(&mut boot.children)
                };
                Ok(Self {
                    inner: Arc::new(Inner {
                        name: name.to_string(),
                        dir,
                        plan,
                        lifetime,
                        binaries: boot.binaries,
                        config,
                        state: Mutex::new(boot.state),
                        network: Mutex::new(()),
                        children: Mutex::new(children),
                    }),
                })
            }
            Err(e) => {
                let state = State::load(&dir).unwrap_or(boot.state);
                state::teardown(&dir, &state, Duration::ZERO);
                state::forget_at_exit(&dir);
                Err(e)
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The state directory: kubeconfigs, `bin/`, `pki/`, `logs/`, `captures/`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The admin kubeconfig (group system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.inner.dir.join(ADMIN_KUBECONFIG)
    }

    /// The kubeconfig of a component's service account in [`COMPONENT_NAMESPACE`]
    /// ([`CONTROLLER_SERVICE_ACCOUNT`] or [`AGENT_SERVICE_ACCOUNT`]). The
    /// account has only the rights the project's RBAC manifests give it.
    pub fn service_account_kubeconfig(&self, service_account: &str) -> PathBuf {
        self.inner.service_account_kubeconfig(service_account)
    }

    /// The cached binaries this cluster runs.
    pub fn binaries(&self) -> &Binaries {
        &self.inner.binaries
    }

    /// kubectl, helm and the control plane's binaries.
    pub fn bin_dir(&self) -> PathBuf {
        self.inner.dir.join("bin")
    }

    /// `https://<host address>:<port>`.
    pub fn server(&self) -> String {
        self.inner.config.cluster_url.to_string()
    }

    /// The host's addresses on the node network (where the apiserver and
    /// a controller running outside the nodes are reached).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.inner.plan.gateway_v4()
    }

    pub fn host_ipv6(&self) -> Ipv6Addr {
        self.inner.plan.gateway_v6()
    }

    /// The admin's client configuration.
    pub fn config(&self) -> kube::Config {
        self.inner.config.clone()
    }

    /// An admin client; call inside a tokio runtime (it lives on it).
    pub fn client(&self) -> Result<kube::Client> {
        self.inner.client()
    }

    /// kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        self.inner.kubectl()
    }

    /// helm with the admin kubeconfig and its own cache and config dirs.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir().join("helm"));
        let home = self.inner.dir.join("helm");
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Runs kubectl with `args`; its stdout, or an error with its stderr.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String> {
        command_output(self.kubectl().args(args))
    }

    /// A node: a network namespace on the node network, and a Ready Node
    /// object named `<prefix>-<n>` with its InternalIPs and pod CIDRs.
    pub async fn add_node(&self, prefix: &str) -> Result<SimNode> {
        SimNode::create(&self.inner, prefix).await
    }

    /// A node run by kubelet, containerd and kube-proxy in a network
    /// namespace on the node network, registered and Ready, named
    /// `<prefix>-<n>`; the cluster must have been started with
    /// [`Cluster::start_with_workloads`].
    pub async fn add_real_node(&self, prefix: &str) -> Result<RealNode> {
        RealNode::create(&self.inner, prefix).await
    }

    /// A namespace `<prefix>-<pid>-<n>` with its `default` service account,
    /// deleted (with its pods) on drop.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let name = self
            .inner
            .unique_name(&format!("{prefix}-{}", std::process::id()));
        let namespaces: Api<Namespace> = Api::all(self.client()?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces.create(&PostParams::default(), &ns).await?;
        let guard = TestNamespace::new(&self.inner, name);
        self.inner.default_service_account(guard.name()).await?;
        Ok(guard)
    }

    /// Starts `cmd` on the host, outside the nodes (as the controller runs),
    /// with stdout and stderr appended to `logs/<role>.log`, as a process of
    /// this cluster: recorded in its state, stopped on drop or with the
    /// cluster, even when this process dies first.
    pub fn start_process(&self, role: &str, cmd: Command) -> Result<ClusterProcess> {
        let log = self.inner.dir.join(format!("logs/{role}.log"));
        let mut process = ClusterProcess::spawn(&self.inner, role, cmd, None, log)?;
        process.detach_if_detached();
        Ok(process)
    }

    /// A token of `namespace/service_account` (created if missing) for the
    /// given audiences (none: the apiserver's), from the TokenRequest API.
    pub async fn token_for(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
    ) -> Result<String> {
        self.inner
            .token_for(namespace, service_account, audiences, 3600)
            .await
    }

    /// A kubeconfig with nothing but the API server's address, the
    /// cluster's CA and a token of `service_account` for the API server:
    /// what a user of the cluster has. Written beside the cluster's files.
    pub async fn user_kubeconfig(&self, namespace: &str, service_account: &str) -> Result<PathBuf> {
        let token = self.token_for(namespace, service_account, &[]).await?;
        let dir = self.inner.dir.join("users");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let ca = Pki::open(&self.inner.dir.join("pki")).path("ca.crt");
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "user",
            "clusters": [{"name": "local", "cluster": {"server": self.server(), "certificate-authority": ca}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "user", "context": {"cluster": "local", "user": service_account}}],
        });
        let path = dir.join(format!("{namespace}-{service_account}.kubeconfig"));
        std::fs::write(&path, config.to_string()).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Applies the committed CRD (`crd/packet_capture_config_crd.yaml`) and
    /// waits until it is established. Idempotent.
    pub async fn install_crd(&self) -> Result<()> {
        self.apply(&["crd/packet_capture_config_crd.yaml"]).await?;
        self.kubectl_async(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/packetcaptureconfigs.networking.packet.io",
        ])
        .await
        .map(drop)
    }

    /// Applies files of the checkout (paths relative to the workspace root,
    /// e.g. `manifests/rbac.yaml`) with server-side apply, as an install
    /// would. Idempotent, and safe to run from several tests at once.
    pub async fn apply(&self, files: &[&str]) -> Result<()> {
        let root = workspace_root();
        let mut args = vec!["apply", "--server-side", "--force-conflicts"];
        let paths: Vec<String> = files
            .iter()
            .map(|f| root.join(f).display().to_string())
            .collect();
        for path in &paths {
            args.extend(["-f", path]);
        }
        self.kubectl_async(&args).await.map(drop)
    }

    /// Runs kubectl with `args` off the async runtime; its stdout.
    pub async fn kubectl_async(&self, args: &[&str]) -> Result<String> {
        let inner = Arc::clone(&self.inner);
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || command_output(inner.kubectl().args(&args)))
            .await
            .map_err(|e| Error::Process(format!("kubectl task: {e}")))?
    }

    /// `tls.crt` and `tls.key` in `dir`: a serving certificate for `ips`
    /// signed by the cluster's CA, which the apiserver can be told to trust
    /// (a webhook on the host address). Returns the CA certificate (PEM),
    /// a webhook configuration's `caBundle`.
    /// The CAs the controller publishes for the agents' certificates (the
    /// ConfigMap [`AGENT_CA_CONFIG_MAP`]), once a controller has published
    /// them; PEM.
    pub async fn agent_ca(&self, timeout: Duration) -> Result<String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client()?, COMPONENT_NAMESPACE);
        let published = await_condition(api, AGENT_CA_CONFIG_MAP, |cm: Option<&ConfigMap>| {
            cm.and_then(|c| c.data.as_ref()?.get("ca.crt")).is_some()
        });
        match tokio::time::timeout(timeout, published).await {
            Ok(Ok(Some(cm))) => Ok(cm
                .data
                .and_then(|mut d| d.remove("ca.crt"))
                .unwrap_or_default()),
            Ok(Ok(None)) => Err(Error::Process(format!("{AGENT_CA_CONFIG_MAP} went away"))),
            Ok(Err(e)) => Err(Error::Process(format!(
                "watching {AGENT_CA_CONFIG_MAP}: {e}"
            ))),
            Err(_) => Err(Error::Process(format!(
                "no controller published {AGENT_CA_CONFIG_MAP} within {timeout:?}"
            ))),
        }
    }

    /// A network namespace on the node network whose firewall lets out
    /// nothing but connections to the API server's address and port: where
    /// a user outside the cluster stands. At most four at once per cluster
    /// (the node network's addresses after the last node's).
    pub fn api_only_netns(&self) -> Result<crate::netns::Netns> {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        if n >= 4 {
            return Err(Error::Process("at most four API-only namespaces".into()));
        }
        let url = &self.inner.config.cluster_url;
        let host = url.host().map(|h| h.to_string()).unwrap_or_default();
        let port = url.port_u16().unwrap_or(443).to_string();
        let gateway = self.inner.plan.gateway_v4().octets();
        let address = format!(
            "{}.{}.{}.{}/24",
            gateway[0],
            gateway[1],
            gateway[2],
            11 + network::Plan::MAX_NODES + n
        );
        let ns = crate::netns::Netns::new("pcapi");
        let outer = crate::unique_name("vapi");
        let run = |cmd: &mut Command| crate::netns::run(cmd);
        run(Command::new("ip").args([
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]));
        run(Command::new("ip").args([
            "link",
            "set",
            &outer,
            "master",
            &self.inner.plan.bridge(),
            "up",
        ]));
        ns.ip(&["addr", "add", &address, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        for rule in [
            vec!["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
            vec![
                "-A", "OUTPUT", "-p", "tcp", "-d", &host, "--dport", &port, "-j", "ACCEPT",
            ],
            vec!["-A", "OUTPUT", "-j", "REJECT"],
        ] {
            run(ns.command("iptables").args(&rule));
        }
        Ok(ns)
    }

    pub fn serving_certificate(&self, dir: &Path, ips: &[IpAddr], dns: &[&str]) -> Result<Vec<u8>> {
        let pki = Pki::open(&self.inner.dir.join("pki"));
        pki.serving(dir, ips, dns)?;
        self.ca()
    }

    /// The cluster's CA (PEM): what signed the apiserver's certificate and
    /// [`Cluster::serving_certificate`]'s.
    pub fn ca(&self) -> Result<Vec<u8>> {
        let ca = Pki::open(&self.inner.dir.join("pki")).path("ca.crt");
        std::fs::read(&ca).map_err(|e| Error::io(&ca, e))
    }
}

impl Inner {
    fn client(&self) -> Result<kube::Client> {
        Ok(kube::Client::try_from(self.config.clone())?)
    }

    fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.dir.join("bin/kubectl"));
        cmd.env("KUBECONFIG", self.dir.join(ADMIN_KUBECONFIG));
        cmd
    }

    fn service_account_kubeconfig(&self, service_account: &str) -> PathBuf {
        self.dir.join(format!("{service_account}.kubeconfig"))
    }

    /// A kubeconfig for `pod` (in [`COMPONENT_NAMESPACE`]) as its service
    /// account, with a token bound to the pod, as the kubelet gives a pod:
    /// `<pod>.kubeconfig` in the cluster's directory.
    async fn pod_kubeconfig(&self, service_account: &str, pod: &Pod) -> Result<PathBuf> {
        let token = issue_token(
            self.client()?,
            COMPONENT_NAMESPACE,
            service_account,
            &[],
            COMPONENT_TOKEN_SECONDS,
            Some(pod),
        )
        .await?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let user = format!("system:serviceaccount:{COMPONENT_NAMESPACE}:{service_account}");
        let pki = Pki::open(&self.dir.join("pki"));
        let server = self.config.cluster_url.to_string();
        write(&path, &pki.token_kubeconfig(&server, &user, &token))?;
        Ok(path)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the state and writes it down.
    fn record(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state();
        change(&mut state);
        if let Err(e) = state.save(&self.dir) {
            eprintln!("warning: could not record the cluster state: {e}");
        }
    }

    /// A free node index and the network of a node named `<prefix>-<n>`:
    /// its namespace on the bridge, its pod bridge, the routes between it
    /// and every other node, recorded in the state.
    fn add_node_network(&self, prefix: &str, real: bool) -> Result<state::NodeRecord> {
        let name = self.unique_name(prefix);
        let netns = format!("pc-{}-{name}", self.name);
        let _net = self
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut record = None;
        let mut others = Vec::new();
        self.record(|s| {
            let free = (1..=Plan::MAX_NODES).find(|i| s.nodes.iter().all(|n| n.index != *i));
            others = s.nodes.iter().map(|n| (n.index, n.netns.clone())).collect();
            if let Some(index) = free {
                let node = state::NodeRecord {
                    name: name.clone(),
                    index,
                    netns: netns.clone(),
                    real,
                };
                s.nodes.push(node.clone());
                record = Some(node);
            }
        });
        let record = record.ok_or_else(|| {
            Error::Network(format!("a cluster holds at most {} nodes", Plan::MAX_NODES))
        })?;
        if let Err(e) = self.plan.create_node(record.index, &netns, &others) {
            drop(_net);
            self.remove_node(&record);
            return Err(e);
        }
        Ok(record)
    }

    /// Removes a node: its Node object, for a real node its processes and
    /// what they made, its network, and its record.
    fn remove_node(&self, node: &state::NodeRecord) {
        let _ = command_output(self.kubectl().args([
            "delete",
            "node",
            &node.name,
            "--wait=false",
            "--ignore-not-found",
        ]));
        if node.real {
            let prefix = format!("{}/", node.name);
            let mut stopped = Vec::new();
            self.record(|s| {
                stopped = s
                    .processes
                    .iter()
                    .filter(|p| p.role.starts_with(&prefix))
                    .cloned()
                    .collect();
                s.processes.retain(|p| !p.role.starts_with(&prefix));
            });
            // The kubelet first, so that it restarts nothing; then the rest.
            for p in stopped.iter().rev() {
                p.stop(Duration::from_secs(5));
            }
            real::Layout::of(&self.dir, &self.name, &node.name).remove();
        }
        let _net = self
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut others = Vec::new();
        self.record(|s| {
            s.nodes.retain(|n| n.index != node.index);
            others = s.nodes.iter().map(|n| (n.index, n.netns.clone())).collect();
        });
        self.plan.delete_node(node.index, &node.netns, &others);
    }

    /// Records a process started for the cluster (stopped with it, even
    /// after a crash of this process) and keeps its handle to reap it.
    fn keep_child(&self, proc: Proc, child: Child) {
        self.record(|s| s.processes.push(proc));
        if self.lifetime == Lifetime::Process {
            self.children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(child);
        }
    }

    /// Starts the cluster's kube-scheduler unless it runs: real nodes get
    /// the pods of Deployments and DaemonSets through it.
    fn ensure_scheduler(&self, pki: &Pki) -> Result<()> {
        if self
            .state()
            .processes
            .iter()
            .any(|p| p.role == SCHEDULER && p.alive())
        {
            return Ok(());
        }
        let server = self.state().server.clone();
        let kubeconfig = self.dir.join("kube-scheduler.kubeconfig");
        write(
            &kubeconfig,
            &pki.cert_kubeconfig(&server, "system:kube-scheduler", "scheduler"),
        )?;
        let starter = control::Starter {
            binaries: self.binaries.clone(),
            dir: self.dir.clone(),
            lifetime: self.lifetime,
        };
        let child = starter.scheduler(&kubeconfig)?;
        self.keep_child(Proc::of(SCHEDULER, &child), child);
        Ok(())
    }

    /// `<prefix>-<n>`, n counting up for the life of the cluster.
    fn unique_name(&self, prefix: &str) -> String {
        let mut n = 0;
        self.record(|s| {
            s.next_name += 1;
            n = s.next_name;
        });
        format!("{prefix}-{n}")
    }

    async fn default_service_account(&self, namespace: &str) -> Result<()> {
        default_service_account(
            self.client()?,
            namespace,
            Duration::from_secs(60),
            &self.dir,
        )
        .await
    }

    async fn token_for(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        seconds: i64,
    ) -> Result<String> {
        issue_token(
            self.client()?,
            namespace,
            service_account,
            audiences,
            seconds,
            None,
        )
        .await
    }
}

/// Waits until `namespace` has its `default` service account, which the
/// controller-manager makes (and the ServiceAccount admission of pods needs).
async fn default_service_account(
    client: kube::Client,
    namespace: &str,
    timeout: Duration,
    dir: &Path,
) -> Result<()> {
    let sas: Api<ServiceAccount> = Api::namespaced(client, namespace);
    let made = await_condition(sas, "default", |sa: Option<&ServiceAccount>| sa.is_some());
    match tokio::time::timeout(timeout, made).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::Process(format!(
            "watching for {namespace}/default: {e}"
        ))),
        Err(_) => Err(Error::Timeout(format!(
            "kube-controller-manager made no default service account in {namespace} within {timeout:?} \
             (see {})",
            dir.join("logs/kube-controller-manager.log").display()
        ))),
    }
}

/// Creates `namespace` unless it exists.
/// The agents' CA in the Secret [`AGENT_CA_SECRET`] (tls.crt, tls.key,
/// ca.crt), as the chart has cert-manager keep it: a controller run with
/// `--agent-ca=secret` signs the agents' certificates with it.
async fn agent_ca_secret(client: kube::Client, dir: &Path) -> Result<()> {
    let ca = Pki::new_ca(dir, "/CN=packet-capture-local-agents-ca")?;
    let read = |file: &str| {
        let path = ca.path(file);
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    };
    let (crt, key) = (read("ca.crt")?, read("ca.key")?);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(AGENT_CA_SECRET.into()),
            ..Default::default()
        },
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(crt.clone())),
                ("tls.key".to_string(), ByteString(key)),
                ("ca.crt".to_string(), ByteString(crt)),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client, COMPONENT_NAMESPACE);
    match secrets.create(&PostParams::default(), &secret).await {
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

async fn create_namespace(client: kube::Client, namespace: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &ns).await {
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

/// A token of `namespace/service_account` (created if missing) from the
/// TokenRequest API.
async fn issue_token(
    client: kube::Client,
    namespace: &str,
    service_account: &str,
    audiences: &[&str],
    seconds: i64,
    bound_to: Option<&Pod>,
) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(client, namespace);
    // Marked as the chart's release would mark them, so that `helm install`
    // of the chart (release packet-capture) adopts the accounts the
    // component kubeconfigs were issued for instead of refusing them.
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(service_account.to_string()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "Helm".to_string(),
                )]
                .into(),
            ),
            annotations: Some(
                [
                    (
                        "meta.helm.sh/release-name".to_string(),
                        HELM_RELEASE.to_string(),
                    ),
                    (
                        "meta.helm.sh/release-namespace".to_string(),
                        namespace.to_string(),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    match sas.create(&PostParams::default(), &sa).await {
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        other => drop(other?),
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(seconds),
            // A pod's token names the pod (as the kubelet's projected
            // tokens do): the API server puts it in the user's `extra`.
            bound_object_ref: bound_to.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let issued = sas
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    issued
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Process(format!("no token issued for {namespace}/{service_account}")))
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Process {
            let state = self.state().clone();
            state::teardown(&self.dir, &state, Duration::ZERO);
            state::forget_at_exit(&self.dir);
            for child in self
                .children
                .get_mut()
                .map(std::mem::take)
                .unwrap_or_default()
            {
                reap(child);
            }
            state::remove_root_if_empty();
        }
    }
}

fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The workspace root: the parent of the running crate's directory (every
/// crate is one level below the root). Cargo sets `CARGO_MANIFEST_DIR` when
/// it runs a test or `cargo run`; it is read at run time because a binary
/// built in one checkout is reused by another that shares the target
/// directory, and a path fixed at compile time would name the first one.
pub fn workspace_root() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    crate_dir
        .parent()
        .expect("every crate lives in the workspace")
        .to_path_buf()
}

/// Runs a command; its output if it exits 0, else an error naming it with
/// what it printed.
pub(crate) fn checked_output(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd
        .output()
        .map_err(|e| Error::Process(format!("starting {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Process(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// Runs a command; its stdout, or an error naming it with what it printed.
fn command_output(cmd: &mut Command) -> Result<String> {
    checked_output(cmd).map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The steps of a start; on error the caller tears down what was recorded.
struct Boot {
    dir: PathBuf,
    state: State,
    lifetime: Lifetime,
    binaries: Binaries,
    children: Vec<Child>,
}

impl Boot {
    async fn run(&mut self) -> Result<kube::Config> {
        let plan = self.state.plan();
        plan.create_bridge()?;
        let ip = IpAddr::V4(plan.gateway_v4());
        let pki = Pki::generate(&self.dir.join("pki"), &[ip, IpAddr::V6(plan.gateway_v6())])?;
        self.link_binaries()?;
        let starter = control::Starter {
            binaries: self.binaries.clone(),
            dir: self.dir.clone(),
            lifetime: self.lifetime,
        };
        let (etcd, etcd_url) = starter.etcd()?;
        self.keep("etcd", etcd)?;

        let port = control::free_port(ip)?;
        let server = format!("https://{ip}:{port}");
        let admin = self.dir.join(ADMIN_KUBECONFIG);
        write(&admin, &pki.cert_kubeconfig(&server, "admin", "admin"))?;
        let kcm_config = self.dir.join("kube-controller-manager.kubeconfig");
        write(
            &kcm_config,
            &pki.cert_kubeconfig(
                &server,
                "system:kube-controller-manager",
                "controller-manager",
            ),
        )?;
        let apiserver = starter.apiserver(&pki, &etcd_url, ip, port)?;
        self.keep("kube-apiserver", apiserver)?;
        self.state.server = server.clone();
        self.state.save(&self.dir)?;

        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&admin)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let client = kube::Client::try_from(config.clone())?;
        self.wait_ready(&client).await?;

        let kcm = starter.controller_manager(&pki, &kcm_config, self.state.workloads)?;
        self.keep("kube-controller-manager", kcm)?;

        create_namespace(client.clone(), COMPONENT_NAMESPACE).await?;
        for sa in [CONTROLLER_SERVICE_ACCOUNT, AGENT_SERVICE_ACCOUNT] {
            let token = issue_token(
                client.clone(),
                COMPONENT_NAMESPACE,
                sa,
                &[],
                COMPONENT_TOKEN_SECONDS,
                None,
            )
            .await?;
            let path = self.dir.join(format!("{sa}.kubeconfig"));
            let user = format!("system:serviceaccount:{COMPONENT_NAMESPACE}:{sa}");
            write(&path, &pki.token_kubeconfig(&server, &user, &token))?;
        }
        agent_ca_secret(client.clone(), &self.dir.join("pki/agents")).await?;
        self.wait_controller_manager(&client).await?;
        Ok(config)
    }

    /// `bin/` beside the kubeconfig: links to the cached binaries.
    fn link_binaries(&self) -> Result<()> {
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| Error::io(&bin, e))?;
        for (name, _) in Binaries::wanted() {
            let link = bin.join(name);
            std::os::unix::fs::symlink(self.binaries.path(name), &link)
                .map_err(|e| Error::io(&link, e))?;
        }
        Ok(())
    }

    /// Records a started process (so a failed start stops it) and keeps it.
    fn keep(&mut self, role: &str, child: Child) -> Result<()> {
        self.state.processes.push(Proc::of(role, &child));
        self.children.push(child);
        self.state.save(&self.dir)
    }

    /// Fails with the end of its log if a process of the control plane died.
    fn check_alive(&mut self) -> Result<()> {
        for (i, child) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                let role = &self.state.processes[i].role;
                let log = self.dir.join(format!("logs/{role}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(Error::Process(format!(
                    "{role} exited ({status}); the end of {}:\n{}",
                    log.display(),
                    build::tail(&text, 30)
                )));
            }
        }
        Ok(())
    }

    /// Polls `/readyz` (the apiserver offers no event for it) until it
    /// answers `ok`, while checking that etcd and the apiserver still run.
    async fn wait_ready(&mut self, client: &kube::Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_alive()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::Timeout(format!(
            "kube-apiserver not ready within 120 s: {last} (see {})",
            self.dir.join("logs/kube-apiserver.log").display()
        )))
    }

    /// The controller-manager works once it gave `default` its service
    /// account; if it does not, a process that died says why.
    async fn wait_controller_manager(&mut self, client: &kube::Client) -> Result<()> {
        let made = default_service_account(
            client.clone(),
            "default",
            Duration::from_secs(90),
            &self.dir,
        )
        .await;
        if made.is_err() {
            self.check_alive()?;
        }
        made
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// What `cargo xtask cluster status` shows.
#[derive(Debug)]
pub struct Status {
    pub name: String,
    pub dir: PathBuf,
    pub server: String,
    pub detached: bool,
    /// The test process that owns it, and whether that still runs.
    pub owner: Option<(u32, bool)>,
    /// Role, pid, whether it still runs.
    pub processes: Vec<(String, u32, bool)>,
    /// Name, IPv4 address, namespace.
    pub nodes: Vec<(String, Ipv4Addr, String)>,
    /// namespace/name, node, IPv4 address, network namespace.
    pub pods: Vec<(String, String, Ipv4Addr, String)>,
    /// The containerd socket of each real node.
    pub containerd_sockets: Vec<PathBuf>,
}

impl Status {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join(ADMIN_KUBECONFIG)
    }

    pub fn running(&self) -> bool {
        !self.processes.is_empty() && self.processes.iter().all(|p| p.2)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.detached {
            "detached"
        } else {
            "owned by a test process"
        };
        writeln!(
            f,
            "cluster {} ({kind}), state in {}",
            self.name,
            self.dir.display()
        )?;
        writeln!(f, "  apiserver  {}", self.server)?;
        writeln!(f, "  kubeconfig {}", self.kubeconfig().display())?;
        for (role, pid, alive) in &self.processes {
            let how = if *alive { "running" } else { "NOT RUNNING" };
            writeln!(f, "  {role:<24} pid {pid:<8} {how}")?;
        }
        for (name, ip, netns) in &self.nodes {
            writeln!(f, "  node {name:<19} {ip:<15} netns {netns}")?;
        }
        for (pod, node, ip, netns) in &self.pods {
            writeln!(f, "  pod  {pod:<19} {ip:<15} on {node}, netns {netns}")?;
        }
        Ok(())
    }
}

/// The state of the cluster called `name` in this checkout, if there is one.
pub fn status(name: &str) -> Result<Option<Status>> {
    let dir = state::state_root().join(name);
    if !dir.exists() {
        return Ok(None);
    }
    let state = State::load(&dir)?;
    let plan = state.plan();
    let node_ip = |node: &str| {
        state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map_or(0, |n| n.index)
    };
    Ok(Some(Status {
        name: state.name.clone(),
        server: state.server.clone(),
        detached: state.detached,
        owner: state.owner.as_ref().map(|o| (o.pid, o.alive())),
        processes: state
            .processes
            .iter()
            .map(|p| (p.role.clone(), p.pid, p.alive()))
            .collect(),
        nodes: state
            .nodes
            .iter()
            .map(|n| (n.name.clone(), plan.node_v4(n.index), n.netns.clone()))
            .collect(),
        pods: state
            .pods
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    p.node.clone(),
                    plan.pod_v4(node_ip(&p.node), p.index),
                    p.netns.clone(),
                )
            })
            .collect(),
        containerd_sockets: state
            .nodes
            .iter()
            .filter(|n| n.real)
            .map(|n| real::Layout::of(&dir, &state.name, &n.name).containerd_socket())
            .collect(),
        dir,
    }))
}

/// Stops the cluster called `name` and removes its namespaces, links and
/// state; `false` if there was none.
pub fn down(name: &str) -> Result<bool> {
    let dir = state::state_root().join(name);
    if !dir.exists() {
        return Ok(false);
    }
    match State::load(&dir) {
        Ok(state) => state::teardown(&dir, &state, Duration::from_secs(10)),
        Err(_) => std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?,
    }
    state::remove_root_if_empty();
    Ok(true)
}
