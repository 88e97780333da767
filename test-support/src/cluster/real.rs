//! Real nodes: kubelet and containerd (with the CNI bridge plugin) in a
//! node's network namespace, and kube-proxy beside them, so that the pods of
//! the chart run from images as they do in a cluster. The cluster's
//! kube-scheduler starts with its first real node.
//!
//! Each real node keeps everything it makes under `<state>/nodes/<name>/`
//! (containerd's root and state, the kubelet's root, the pods' network
//! namespaces, certificates, configuration, the CNI configuration) and in
//! the cgroup `/<cgroup root>` of every hierarchy, so that a teardown, also
//! after a kill -9 of the process that made it, finds all of it: processes
//! by cgroup and by the paths in their command lines, mounts by path.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use super::pki::Pki;
use super::process::{Proc, Spawn};
use super::state::NodeRecord;
use super::{Error, Inner, Result, checked_output, write};

/// The image of every pod's sandbox, imported from the pause program built
/// with the control plane; kubelet and containerd never pull it.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The containerd namespace the CRI uses (and `ctr -n` imports into).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The taint a node carries until the node lifecycle controller (which this
/// cluster does not run: simulated nodes send no heartbeats) removes it.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The cgroup hierarchies of a cgroup v1 (hybrid) host, and the unified one.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A node run by kubelet and containerd.
pub struct RealNode {
    cluster: Arc<Inner>,
    record: NodeRecord,
    ip: IpAddr,
}

/// What a real node is made of on the host, from its record alone (so that
/// a teardown after a crash needs nothing else).
pub(super) struct Layout {
    pub dir: PathBuf,
    pub cgroup: String,
}

impl Layout {
    pub fn of(cluster_dir: &Path, cluster: &str, node: &str) -> Self {
        Self {
            dir: cluster_dir.join("nodes").join(node),
            cgroup: format!("pc-{cluster}-{node}"),
        }
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Removes what the node left on the host: the processes in its cgroup
    /// (containers), containerd's shims (their command lines name the
    /// node's socket), every mount under its directory (container root
    /// file systems, pod volumes, pod network namespaces), its cgroups.
    pub fn remove(&self) {
        for pid in self.cgroup_pids().into_iter().chain(self.shim_pids()) {
            kill(pid);
        }
        unmount_below(&self.dir);
        for hierarchy in cgroup_hierarchies() {
            remove_cgroup_tree(&hierarchy.join(&self.cgroup));
        }
    }

    fn cgroup_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for hierarchy in cgroup_hierarchies() {
            collect_procs(&hierarchy.join(&self.cgroup), &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Processes whose command line names this node's directory: the shims
    /// containerd started (they outlive it) and anything else left running.
    fn shim_pids(&self) -> Vec<u32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    }
}

fn kill(pid: u32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Every mounted cgroup hierarchy (v1 controllers, named, and unified).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

fn collect_procs(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    for child in subdirectories(dir) {
        collect_procs(&child, pids);
    }
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes a cgroup and its children, deepest first; a cgroup empties once
/// its processes are gone, which after SIGKILL takes a moment.
fn remove_cgroup_tree(dir: &Path) {
    for child in subdirectories(dir) {
        remove_cgroup_tree(&child);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unmounts every mount point at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid C string; MNT_DETACH lets a busy mount go too.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(b as char);
                continue;
            }
            out.push(c);
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

impl RealNode {
    pub(super) async fn create(cluster: &Arc<Inner>, prefix: &str) -> Result<Self> {
        if !cluster.state().workloads {
            return Err(Error::Process(
                "real nodes need a cluster started with workload controllers \
                 (`cargo xtask cluster up --real-node`, Cluster::start_with_workloads)"
                    .into(),
            ));
        }
        let record = cluster.add_node_network(prefix, true)?;
        let ip = IpAddr::V4(cluster.plan.node_v4(record.index));
        let node = Self {
            cluster: Arc::clone(cluster),
            record,
            ip,
        };
        // Dropping `node` on an error below removes what was started.
        node.start().await?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn netns(&self) -> &str {
        &self.record.netns
    }

    /// containerd's socket, for `ctr --address` (images are imported into
    /// the [`CRI_NAMESPACE`] namespace).
    pub fn containerd_socket(&self) -> PathBuf {
        self.layout().containerd_socket()
    }

    /// Imports an OCI archive (one image or a multi-platform index) into
    /// the node's containerd, as `ctr -n k8s.io images import` does.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        import_image(&self.containerd_socket(), archive)
    }

    /// Gives an image of the node's containerd a second name, as a pull of
    /// the same image under that name would.
    pub fn tag_image(&self, from: &str, to: &str) -> Result<()> {
        checked_output(
            Command::new("ctr")
                .arg("--address")
                .arg(self.containerd_socket())
                .args(["-n", CRI_NAMESPACE, "images", "tag", "--force", from, to]),
        )
        .map(drop)
    }

    fn layout(&self) -> Layout {
        Layout::of(&self.cluster.dir, &self.cluster.name, self.name())
    }

    async fn start(&self) -> Result<()> {
        let layout = self.layout();
        let dir = &layout.dir;
        for sub in ["cni", "kubelet", "pki", "logs"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        create_cgroup(&layout.cgroup)?;
        let plan = self.cluster.plan;
        plan.route_services(self.netns())?;
        let pki = Pki::open(&self.cluster.dir.join("pki"));
        let server = self.cluster.state().server.clone();
        let name = self.name();
        let node_pki = dir.join("pki");
        pki.issue(
            &node_pki,
            "kubelet-client",
            "client",
            &format!("/O=system:nodes/CN=system:node:{name}"),
            None,
        )?;
        pki.issue(
            &node_pki,
            "kubelet-serving",
            "server",
            &format!("/CN={name}"),
            Some(&format!("IP:{},DNS:{name}", self.ip)),
        )?;
        pki.issue(
            &node_pki,
            "kube-proxy",
            "client",
            "/CN=system:kube-proxy",
            None,
        )?;
        let kubeconfig =
            |user: &str, cert: &str| pki.cert_kubeconfig_at(&server, user, &node_pki.join(cert));
        write(
            &dir.join("kubelet.kubeconfig"),
            &kubeconfig(&format!("system:node:{name}"), "kubelet-client"),
        )?;
        write(
            &dir.join("kube-proxy.kubeconfig"),
            &kubeconfig("system:kube-proxy", "kube-proxy"),
        )?;
        let pod_cidr = plan.pod_cidr_v4(self.record.index);
        let gateway = plan.pod_v4(self.record.index, 1);
        write(
            &dir.join("cni/10-pods.conflist"),
            &cni_config(&pod_cidr, &gateway.to_string()),
        )?;
        write(&dir.join("containerd.toml"), &containerd_config(dir))?;
        write(
            &dir.join("kubelet.yaml"),
            &kubelet_config(&layout, &pki.str("ca.crt"), self.ip, &pod_cidr),
        )?;
        write(
            &dir.join("kube-proxy.yaml"),
            &proxy_config(dir, name, self.ip, &plan.node_network_v4()),
        )?;

        let mut containerd = Command::new("containerd");
        containerd.arg("--config").arg(dir.join("containerd.toml"));
        self.spawn("containerd", containerd)?;
        self.wait_containerd().await?;
        let pause = self.cluster.binaries.pause_image()?;
        self.import_image(&pause)?;

        let binaries = &self.cluster.binaries;
        let mut kubelet = Command::new(binaries.path("kubelet"));
        kubelet
            .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
            .arg(format!(
                "--kubeconfig={}",
                dir.join("kubelet.kubeconfig").display()
            ))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={}", self.ip))
            .arg("--v=1");
        self.spawn("kubelet", kubelet)?;
        let mut proxy = Command::new(binaries.path("kube-proxy"));
        proxy
            .arg(format!(
                "--config={}",
                dir.join("kube-proxy.yaml").display()
            ))
            .arg("--v=1");
        self.spawn("kube-proxy", proxy)?;
        self.cluster.ensure_scheduler(&pki)?;
        self.wait_ready().await
    }

    /// Starts a process of this node in its network namespace (and only
    /// that: the mount namespace stays the host's, which kubelet and
    /// containerd need for cgroups and their files).
    fn spawn(&self, role: &str, cmd: Command) -> Result<()> {
        let log = self.layout().dir.join("logs").join(format!("{role}.log"));
        let child = Spawn {
            cmd,
            lifetime: self.cluster.lifetime,
            netns: Some(self.netns()),
            log: &log,
            pipe_stderr: false,
        }
        .start()?;
        let proc = Proc::of(&format!("{}/{role}", self.name()), &child);
        self.cluster.keep_child(proc, child);
        Ok(())
    }

    async fn wait_containerd(&self) -> Result<()> {
        let socket = self.containerd_socket();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "containerd of node {} did not answer on {} within 30s (see {})",
                    self.name(),
                    socket.display(),
                    self.layout().dir.join("logs/containerd.log").display()
                )));
            }
            // containerd offers no event for "serving"; its socket appears
            // before it answers.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the kubelet reports the node Ready, then lifts the
    /// not-ready taint as the node lifecycle controller would.
    async fn wait_ready(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.cluster.client()?);
        let ready = await_condition(nodes.clone(), self.name(), |n: Option<&Node>| {
            n.and_then(|n| n.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        let timeout = Duration::from_secs(120);
        match tokio::time::timeout(timeout, ready).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Error::Process(format!(
                    "watching node {}: {e}",
                    self.name()
                )));
            }
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "node {} was not Ready within {timeout:?} (see {})",
                    self.name(),
                    self.layout().dir.join("logs/kubelet.log").display()
                )));
            }
        }
        let node = nodes.get(self.name()).await?;
        let taints: Vec<_> = node
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.key != NOT_READY_TAINT)
            .collect();
        nodes
            .patch(
                self.name(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": taints}})),
            )
            .await?;
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if self.cluster.lifetime == super::Lifetime::Process {
            self.cluster.remove_node(&self.record);
        }
    }
}

/// `ctr -n k8s.io images import` of an OCI archive into the containerd at
/// `socket`: the CRI then has the image under its name (the host's
/// platform unpacked).
pub fn import_image(socket: &Path, archive: &Path) -> Result<()> {
    checked_output(
        Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(archive),
    )
    .map(drop)
}

/// The node's cgroup in every hierarchy (kubelet's `cgroupRoot` must
/// exist); cpuset needs its CPUs and memory nodes before it takes tasks.
fn create_cgroup(name: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hierarchy.join(file);
            if let Ok(value) = std::fs::read_to_string(&parent) {
                let own = dir.join(file);
                std::fs::write(&own, value.trim()).map_err(|e| Error::io(&own, e))?;
            }
        }
    }
    Ok(())
}

fn cni_config(pod_cidr: &str, gateway: &str) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"},
        ],
    })
    .to_string()
}

fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Pod network namespaces under the node's directory, where a teardown
  # finds them.
  netns_mounts_under_state_dir = true
  # Containers may not get a lower OOM score than containerd has: the host
  # may refuse lowering it, and a test node should not outlive the host's
  # processes anyway.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
    )
}

fn kubelet_config(layout: &Layout, ca: &str, ip: IpAddr, pod_cidr: &str) -> String {
    let d = layout.dir.display();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Hosts with cgroup v1 (such as this one, hybrid) are still supported when
# asked for.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
containerRuntimeEndpoint: unix://{d}/containerd.sock
address: {ip}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
tlsCertFile: {d}/pki/kubelet-serving.crt
tlsPrivateKeyFile: {d}/pki/kubelet-serving.key
readOnlyPort: 0
healthzPort: 0
failSwapOn: false
podCIDR: {pod_cidr}
resolvConf: /etc/resolv.conf
# A test node shares the host's disk: never evict or collect images for it.
evictionHard: {{"memory.available": "0%", "nodefs.available": "0%", "imagefs.available": "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
        cgroup = layout.cgroup,
    )
}

fn proxy_config(dir: &Path, name: &str, ip: IpAddr, cluster_cidr: &str) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
mode: iptables
hostnameOverride: {name}
clusterCIDR: {cluster_cidr}
bindAddress: {ip}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
# Leave the host's conntrack table size alone.
conntrack: {{maxPerCore: 0}}
"#,
        kubeconfig = dir.join("kube-proxy.kubeconfig").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn a_layout_is_derived_from_names_alone() {
        let l = Layout::of(Path::new("/s/c1"), "c1", "real-1");
        assert_eq!(l.dir, Path::new("/s/c1/nodes/real-1"));
        assert_eq!(l.cgroup, "pc-c1-real-1");
        assert_eq!(
            l.containerd_socket(),
            Path::new("/s/c1/nodes/real-1/containerd.sock")
        );
    }
}
