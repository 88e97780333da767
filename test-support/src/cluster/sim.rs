//! Simulated nodes, pods and agents: the harness's kubelet.
//!
//! Objects are created and their status patched the way a kubelet does it
//! (field manager `kubelet`), and the network behind them is real. In a
//! [`Lifetime::Process`] cluster everything here is removed on drop; in a
//! detached one it stays until `cargo xtask cluster down`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::netns::command_in;

use super::network::Plan;
use super::pki::Pki;
use super::process::{Proc, Spawn};
use super::state::{NodeRecord, PodRecord};
use super::{
    AGENT_SERVICE_ACCOUNT, COMPONENT_NAMESPACE, Error, Inner, KUBERNETES_VERSION, Lifetime, Result,
    checked_output, command_output,
};

const FIELD_MANAGER: &str = "kubelet";
/// The images the Pod objects name (nothing pulls them).
const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
const AGENT_IMAGE: &str = "packet-capture-agent:dev";
/// The label the controller finds agent pods by.
pub const AGENT_LABEL: (&str, &str) = ("app", "packet-capture-agent");

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("a time serialises")
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// A simulated node: a network namespace on the node network and a Ready
/// Node object.
pub struct SimNode {
    cluster: Arc<Inner>,
    name: String,
    index: u8,
    netns: String,
}

impl SimNode {
    pub(super) async fn create(cluster: &Arc<Inner>, prefix: &str) -> Result<Self> {
        let record = cluster.add_node_network(prefix, false)?;
        let node = Self {
            cluster: Arc::clone(cluster),
            name: record.name.clone(),
            index: record.index,
            netns: record.netns.clone(),
        };
        // Dropping `node` removes what was made.
        node.register().await?;
        Ok(node)
    }

    /// The Node object, then its status, as a kubelet registers a node.
    async fn register(&self) -> Result<()> {
        let plan = self.cluster.plan;
        let nodes: Api<Node> = Api::all(self.cluster.client()?);
        let object: Node = serde_json::from_value(json!({
            "metadata": {
                "name": self.name,
                // No kubernetes.io/os: nothing runs a simulated node's pods,
                // and the chart's DaemonSet and Deployment select
                // `kubernetes.io/os: linux`, so beside real nodes their pods
                // go only where a kubelet starts them.
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/arch": arch(),
                    "beta.kubernetes.io/arch": arch(),
                },
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
            },
            "spec": {
                "podCIDR": plan.pod_cidr_v4(self.index),
                "podCIDRs": [plan.pod_cidr_v4(self.index), plan.pod_cidr_v6(self.index)],
            },
        }))
        .expect("a valid Node");
        nodes.create(&post_params(), &object).await?;
        let now = now();
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            json!({
                "type": kind, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            })
        };
        let resources = json!({
            "cpu": std::thread::available_parallelism().map_or(1, |n| n.get()).to_string(),
            "memory": format!("{}Ki", mem_total_kib()),
            "ephemeral-storage": "10Gi",
            "pods": "110",
        });
        let status = json!({
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.ip().to_string()},
                    {"type": "InternalIP", "address": self.ipv6().to_string()},
                    {"type": "Hostname", "address": self.name},
                ],
                "conditions": [
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                    condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                ],
                "capacity": resources,
                "allocatable": resources,
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": read_trimmed("/etc/machine-id"),
                    "systemUUID": read_trimmed("/proc/sys/kernel/random/boot_id"),
                    "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
                    "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"),
                    "osImage": os_image(),
                    "containerRuntimeVersion": "netns://simulated",
                    "kubeletVersion": KUBERNETES_VERSION,
                    "operatingSystem": "linux",
                    "architecture": arch(),
                },
            }
        });
        nodes
            .patch_status(&self.name, &patch_params(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's InternalIP (its address on the node network).
    pub fn ip(&self) -> Ipv4Addr {
        self.cluster.plan.node_v4(self.index)
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.cluster.plan.node_v6(self.index)
    }

    /// The node's pod CIDRs, IPv4 then IPv6.
    pub fn pod_cidrs(&self) -> [String; 2] {
        let plan = self.cluster.plan;
        [plan.pod_cidr_v4(self.index), plan.pod_cidr_v6(self.index)]
    }

    /// The node's network namespace (`eth0` on the node network, `cni0`
    /// towards its pods).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A command that runs in the node's network namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.netns, program)
    }

    /// A pod on this node in `namespace`: a network namespace linked to the
    /// node, and a Pod object Running and Ready with its IPs, labelled
    /// `app=<name>`.
    pub async fn add_pod(&self, namespace: &str, name: &str) -> Result<SimPod> {
        self.add_labelled_pod(namespace, name, &[("app", name)])
            .await
    }

    /// [`add_pod`](Self::add_pod) with these labels. Its addresses are the
    /// first free ones of the node: those of the last pod removed, if any
    /// (as a CNI hands them out again).
    pub async fn add_labelled_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<SimPod> {
        self.cluster.default_service_account(namespace).await?;
        let pod = SimPod::create(self, namespace, name)?;
        let pods: Api<Pod> = Api::namespaced(self.cluster.client()?, namespace);
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let object: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": self.name,
                "containers": [{"name": "main", "image": PAUSE_IMAGE}],
            },
        }))
        .expect("a valid Pod");
        pods.create(&post_params(), &object).await?;
        let ips = [pod.ip().to_string(), pod.ipv6().to_string()];
        let running = running_status(self, name, &ips, ("main", PAUSE_IMAGE), true);
        pods.patch_status(name, &patch_params(), &Patch::Merge(&running))
            .await?;
        Ok(pod)
    }

    /// [`launch_agent`](Self::launch_agent), then waits until it serves.
    /// With [`AgentTls::Signed`] a controller must be running to sign its
    /// certificate.
    pub async fn start_agent(&self, options: &AgentOptions) -> Result<SimAgent> {
        let mut agent = self.launch_agent(options).await?;
        agent.until_serving().await?;
        Ok(agent)
    }

    /// Starts the agent in this node's network namespace (as a hostNetwork
    /// DaemonSet pod would run) with its Pod in [`COMPONENT_NAMESPACE`],
    /// labelled `app=packet-capture-agent`; the Pod shows Running with the
    /// node's IP at once, and ready once [`SimAgent::until_serving`] has
    /// seen it serve.
    pub async fn launch_agent(&self, options: &AgentOptions) -> Result<SimAgent> {
        let inner = &self.cluster;
        let pod_name = format!("packet-capture-agent-{}", self.name);
        let capture_dir = inner.dir.join("captures").join(&self.name);
        std::fs::create_dir_all(&capture_dir).map_err(|e| Error::io(&capture_dir, e))?;
        let log = inner.dir.join(format!("logs/agent-{}.log", self.name));
        let pods: Api<Pod> = Api::namespaced(inner.client()?, COMPONENT_NAMESPACE);
        let mut labels = serde_json::Map::new();
        labels.insert(AGENT_LABEL.0.into(), AGENT_LABEL.1.into());
        for (k, v) in &options.labels {
            labels.insert(k.clone(), v.clone().into());
        }
        let object: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": pod_name,
                "namespace": COMPONENT_NAMESPACE,
                "labels": labels,
            },
            "spec": {
                "nodeName": self.name,
                "hostNetwork": true,
                "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                "containers": [{
                    "name": "agent",
                    "image": AGENT_IMAGE,
                    "ports": [{"name": "api", "containerPort": options.port, "hostPort": options.port, "protocol": "TCP"}],
                }],
            },
        }))
        .expect("a valid Pod");
        let created = pods.create(&post_params(), &object).await?;
        // The pod's own token, as the kubelet mounts it: the controller
        // signs the agent's serving certificate only for the node of the
        // pod the token names.
        let kubeconfig = inner
            .pod_kubeconfig(AGENT_SERVICE_ACCOUNT, &created)
            .await?;

        let mut cmd = Command::new(&options.binary);
        cmd.arg("--port")
            .arg(options.port.to_string())
            .arg("--capture-dir")
            .arg(&capture_dir)
            .arg("--node-name")
            .arg(&self.name)
            // As the DaemonSet sets it from status.hostIP: the agent listens
            // there, and its certificate names it.
            .arg("--node-ip")
            .arg(self.ip().to_string())
            .env("KUBECONFIG", &kubeconfig)
            .env("NO_COLOR", "1");
        if options.tls == AgentTls::ClusterCa {
            let certs = inner.dir.join("agent-tls").join(&self.name);
            let pki = Pki::open(&inner.dir.join("pki"));
            pki.serving(&certs, &[IpAddr::V4(self.ip())], &[])?;
            cmd.arg("--tls-cert-file")
                .arg(certs.join("tls.crt"))
                .arg("--tls-key-file")
                .arg(certs.join("tls.key"));
        }
        cmd.args(&options.args);
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        let process = ClusterProcess::spawn(
            inner,
            &format!("agent-{}", self.name),
            cmd,
            Some(&self.netns),
            log,
        );
        let process = match process {
            Ok(p) => p,
            Err(e) => {
                force_delete_pods(inner, COMPONENT_NAMESPACE, &[&pod_name]);
                return Err(e);
            }
        };
        let ips = [self.ip().to_string(), self.ipv6().to_string()];
        let status = |ready| running_status(self, &pod_name, &ips, ("agent", AGENT_IMAGE), ready);
        // Running once its container has started, as a kubelet shows it;
        // ready once it serves (`until_serving`).
        let started = status(false);
        let agent = SimAgent {
            pod: pod_name.clone(),
            pod_exists: true,
            process,
            endpoint: SocketAddr::new(IpAddr::V4(self.ip()), options.port),
            capture_dir,
            running: Some((pods.clone(), status(options.ready))),
            ready_timeout: options.ready_timeout,
        };
        pods.patch_status(&pod_name, &patch_params(), &Patch::Merge(&started))
            .await?;
        Ok(agent)
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if self.cluster.lifetime == Lifetime::Process {
            self.cluster.remove_node(&NodeRecord {
                name: self.name.clone(),
                index: self.index,
                netns: self.netns.clone(),
                real: false,
            });
        }
    }
}

/// A pod's status as a kubelet writes it once its container runs, and
/// once it is `ready` too.
fn running_status(
    node: &SimNode,
    name: &str,
    ips: &[String],
    (container, image): (&str, &str),
    ready: bool,
) -> serde_json::Value {
    let now = now();
    let condition = |kind: &str, holds: bool| {
        let status = if holds { "True" } else { "False" };
        json!({"type": kind, "status": status, "lastTransitionTime": now})
    };
    json!({
        "status": {
            "phase": "Running",
            "conditions": [
                condition("PodReadyToStartContainers", true),
                condition("Initialized", true),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", true),
            ],
            "hostIP": node.ip().to_string(),
            "hostIPs": [{"ip": node.ip().to_string()}, {"ip": node.ipv6().to_string()}],
            "podIP": ips[0],
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": now,
            "containerStatuses": [{
                "name": container,
                "ready": ready,
                "started": ready,
                "restartCount": 0,
                "image": image,
                "imageID": "",
                "containerID": format!("netns://{}/{name}", node.netns),
                "state": {"running": {"startedAt": now}},
            }],
        }
    })
}

/// A simulated pod: a network namespace behind its node, and a Running
/// Pod object.
pub struct SimPod {
    cluster: Arc<Inner>,
    namespace: String,
    name: String,
    node: String,
    node_index: u8,
    node_netns: String,
    index: u8,
    netns: String,
}

impl SimPod {
    fn create(node: &SimNode, namespace: &str, name: &str) -> Result<Self> {
        let inner = &node.cluster;
        let net = inner
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut netns = format!("pc-{}-{namespace}.{name}", inner.name);
        let mut index = 0;
        inner.record(|s| {
            index = (Plan::FIRST_POD..=Plan::LAST_POD)
                .find(|k| s.pods.iter().all(|p| p.node != node.name || p.index != *k))
                .unwrap_or(0);
            if netns.len() > 200 {
                netns = format!("pc-{}-{}-p{index}", inner.name, node.name);
            }
            if index != 0 {
                s.pods.push(PodRecord {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    node: node.name.clone(),
                    index,
                    netns: netns.clone(),
                });
            }
        });
        if index == 0 {
            return Err(Error::Network(format!(
                "node {} holds no more pods",
                node.name
            )));
        }
        let made = inner
            .plan
            .create_pod(node.index, &node.netns, index, &netns);
        drop(net);
        let pod = Self {
            cluster: Arc::clone(inner),
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.name.clone(),
            node_index: node.index,
            node_netns: node.netns.clone(),
            index,
            netns,
        };
        // On error, dropping `pod` removes what was made.
        made.map(|()| pod)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pod's IPv4 address (its `podIP`).
    pub fn ip(&self) -> Ipv4Addr {
        self.cluster.plan.pod_v4(self.node_index, self.index)
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.cluster.plan.pod_v6(self.node_index, self.index)
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A command that runs in the pod's network namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.netns, program)
    }

    /// Runs `args` in the pod; fails unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| Error::Process("exec needs a program".into()))?;
        checked_output(self.command(program).args(rest))
    }

    /// `count` pings to `to`, 0.2 s apart; fails if any goes unanswered.
    pub fn ping(&self, to: IpAddr, count: u32) -> Result<()> {
        let count = count.to_string();
        let to = to.to_string();
        self.exec(&["ping", "-n", "-c", &count, "-i", "0.2", "-W", "2", &to])
            .map(drop)
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        let inner = &self.cluster;
        if inner.lifetime == Lifetime::Detached {
            return;
        }
        force_delete_pods(inner, &self.namespace, &[&self.name]);
        let _net = inner
            .network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .plan
            .delete_pod(&self.node_netns, self.index, &self.netns);
        inner.record(|s| s.pods.retain(|p| p.netns != self.netns));
    }
}

/// Deletes pods at once (`--all` when `names` is empty): there is no kubelet
/// to confirm a graceful deletion.
fn force_delete_pods(inner: &Inner, namespace: &str, names: &[&str]) {
    let mut cmd = inner.kubectl();
    cmd.args([
        "delete",
        "pod",
        "-n",
        namespace,
        "--grace-period=0",
        "--force",
    ])
    .args(["--wait=false", "--ignore-not-found"]);
    if names.is_empty() {
        cmd.arg("--all");
    } else {
        cmd.args(names);
    }
    let _ = command_output(&mut cmd);
}

/// How to start an agent on a node.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The `packet-capture-agent` binary.
    pub binary: PathBuf,
    /// `--port` (AGENT_PORT).
    pub port: u16,
    /// More arguments, after the ones above.
    pub args: Vec<String>,
    /// Labels of its Pod besides `app=packet-capture-agent` (a controller's
    /// `--agent-selector` can then pick these agents out).
    pub labels: Vec<(String, String)>,
    pub env: Vec<(String, String)>,
    /// How long [`SimAgent::until_serving`] waits for `listening on <node
    /// IP>:<port>`.
    pub ready_timeout: Duration,
    /// Whose certificate the agent serves.
    pub tls: AgentTls,
    /// Whether [`SimAgent::until_serving`] marks its Pod Ready; false: it
    /// stays Running but not Ready, as while a startup probe fails, until
    /// [`SimAgent::set_ready`].
    pub ready: bool,
}

/// Whose serving certificate a simulated agent presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgentTls {
    /// One it asks the cluster for, as in a real cluster: a controller
    /// must run to sign it (its CA: [`Cluster::agent_ca`](super::Cluster::agent_ca)).
    #[default]
    Signed,
    /// One the test cluster's own CA signed, from files (for tests without
    /// a controller; the CA is what
    /// [`Cluster::serving_certificate`](super::Cluster::serving_certificate) returns).
    ClusterCa,
}

impl AgentOptions {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            port: 8080,
            args: Vec::new(),
            labels: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(60),
            tls: AgentTls::Signed,
            ready: true,
        }
    }
}

/// A process the cluster started and recorded in its state, so that the
/// cluster's teardown (or `cargo xtask cluster down`) stops it if its owner
/// does not. In a [`Lifetime::Process`] cluster it gets the parent-death
/// signal and is stopped on drop; in a detached one it runs in its own
/// session until `cluster down`.
pub struct ClusterProcess {
    cluster: Arc<Inner>,
    child: Option<Child>,
    proc: Proc,
    log: PathBuf,
}

impl ClusterProcess {
    /// Starts `cmd` (in `netns`, or on the host) with stdout and stderr
    /// appended to `log`, recorded under `role`.
    pub(super) fn spawn(
        cluster: &Arc<Inner>,
        role: &str,
        cmd: Command,
        netns: Option<&str>,
        log: PathBuf,
    ) -> Result<Self> {
        let child = Spawn {
            cmd,
            lifetime: cluster.lifetime,
            netns,
            log: &log,
            pipe_stderr: false,
        }
        .start()?;
        let proc = Proc::of(role, &child);
        cluster.record(|s| s.processes.push(proc.clone()));
        Ok(Self {
            cluster: Arc::clone(cluster),
            child: Some(child),
            proc,
            log,
        })
    }

    /// A detached cluster's process is left to its own session.
    pub(super) fn detach_if_detached(&mut self) {
        if self.cluster.lifetime == Lifetime::Detached {
            self.child = None;
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How it exited, once it has; `None` while it runs (and for a process
    /// that is not a child of this one).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then waits up to 10 s for it to exit (SIGKILL after that);
    /// returns how it exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.end(Duration::from_secs(10))
    }

    /// SIGKILL, as a crash: it cleans nothing up. Returns how it exited.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.end(Duration::ZERO)
    }

    /// Ends the process (SIGTERM with `grace`, then SIGKILL; no grace: at
    /// once) and forgets it.
    fn end(&mut self, grace: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| {
            Error::Process(format!(
                "{} (pid {}) is not a running child of this process",
                self.proc.role, self.proc.pid
            ))
        })?;
        self.proc.stop(grace);
        let status = child
            .wait()
            .map_err(|e| Error::Process(format!("waiting for {}: {e}", self.proc.role)));
        self.cluster
            .record(|s| s.processes.retain(|p| *p != self.proc));
        status
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// An agent process on a simulated node, and its Pod object.
pub struct SimAgent {
    pod: String,
    /// Until `stop` or drop deletes it.
    pod_exists: bool,
    process: ClusterProcess,
    endpoint: SocketAddr,
    capture_dir: PathBuf,
    /// Its Pod's status once the agent serves (Ready unless
    /// [`AgentOptions::ready`] is false), patched in then.
    running: Option<(Api<Pod>, serde_json::Value)>,
    ready_timeout: Duration,
}

impl SimAgent {
    /// Waits until the agent serves, which it says once it has its
    /// certificate (up to [`AgentOptions::ready_timeout`]), then marks its
    /// Pod ready (unless [`AgentOptions::ready`] is false), as a kubelet
    /// does once the startup probe passes.
    pub async fn until_serving(&mut self) -> Result<()> {
        let Some((pods, status)) = self.running.take() else {
            return Ok(());
        };
        let endpoint = self.endpoint;
        let marker = format!("listening on {endpoint}");
        self.until_logged(&marker, self.ready_timeout).await?;
        pods.patch_status(&self.pod, &patch_params(), &Patch::Merge(&status))
            .await?;
        self.process.detach_if_detached();
        Ok(())
    }

    /// `<node IP>:<port>`, where the controller reaches it.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// `https://<node IP>:<port>` for REST calls (the agent serves TLS;
    /// see [`AgentTls`] for whose CA signed its certificate).
    pub fn url(&self) -> String {
        format!("https://{}", self.endpoint)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn pod_name(&self) -> &str {
        &self.pod
    }

    /// The agent's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Its `--capture-dir`.
    pub fn capture_dir(&self) -> &Path {
        &self.capture_dir
    }

    /// Polls the log (a log file offers no event) until a line contains
    /// `marker`, failing early if the agent exits.
    pub async fn until_logged(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if strip_ansi(&self.log()).contains(marker) {
                return Ok(());
            }
            if let Some(status) = self.process.exited() {
                return Err(Error::Process(format!(
                    "the agent exited ({status}) before it logged {marker:?}; its log:\n{}",
                    super::build::tail(&self.log(), 30)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "the agent did not log {marker:?} within {timeout:?}; its log:\n{}",
                    super::build::tail(&self.log(), 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits up to 10 s for the agent to finish its files and
    /// exit (SIGKILL after that); returns how it exited. Its Pod goes too.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let status = self.process.stop();
        self.delete_pod();
        status
    }

    /// SIGKILL, as when the agent crashes or is OOM-killed: it finishes
    /// nothing, and its Pod stays as it was (no kubelet notices), so the
    /// agent just stops answering. Returns how it exited.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process.kill()
    }

    /// Sets its Pod's Ready condition, as a kubelet does when a probe
    /// passes or fails: a controller takes a Running agent that is not
    /// Ready for one still starting up.
    pub async fn set_ready(&self, ready: bool) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.process.cluster.client()?, COMPONENT_NAMESPACE);
        let status = if ready { "True" } else { "False" };
        let conditions: Vec<serde_json::Value> = ["Ready", "ContainersReady"]
            .iter()
            .map(|kind| json!({"type": kind, "status": status, "lastTransitionTime": now()}))
            .collect();
        // Strategic merge: the conditions are merged by type.
        let patch = json!({"status": {"conditions": conditions}});
        pods.patch_status(&self.pod, &patch_params(), &Patch::Strategic(&patch))
            .await?;
        Ok(())
    }

    fn delete_pod(&mut self) {
        if std::mem::take(&mut self.pod_exists) {
            force_delete_pods(&self.process.cluster, COMPONENT_NAMESPACE, &[&self.pod]);
        }
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        if self.process.cluster.lifetime == Lifetime::Detached {
            return;
        }
        let _ = self.process.end(Duration::from_secs(10));
        self.delete_pod();
    }
}

/// A namespace for one test, deleted with its pods on drop.
pub struct TestNamespace {
    cluster: Arc<Inner>,
    name: String,
}

impl TestNamespace {
    pub(super) fn new(cluster: &Arc<Inner>, name: String) -> Self {
        Self {
            cluster: Arc::clone(cluster),
            name,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let inner = &self.cluster;
        if inner.lifetime == Lifetime::Detached {
            return;
        }
        force_delete_pods(inner, &self.name, &[]);
        let _ = command_output(inner.kubectl().args([
            "delete",
            "namespace",
            &self.name,
            "--wait=false",
            "--ignore-not-found",
        ]));
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    read_trimmed("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

fn mem_total_kib() -> u64 {
    read_trimmed("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn colour_codes_do_not_hide_the_listening_line() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m listening on 0.0.0.0:8080";
        assert!(strip_ansi(line).ends_with("INFO listening on 0.0.0.0:8080"));
    }
}
