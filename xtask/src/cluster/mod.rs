//! `cargo xtask cluster up|down|status`: a local control plane with
//! simulated nodes and pods (see docs/local-cluster.md). The functions here
//! are what `cargo xtask demo` builds on.

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use packet_capture_test_support::cluster::{self, Cluster, Lifetime, RealNode, SimNode, SimPod};

use crate::util::step;

/// The name `cargo xtask cluster` uses unless told otherwise.
pub const DEFAULT_NAME: &str = "default";
/// Where `up --pods` puts its pods.
pub const POD_NAMESPACE: &str = "default";

#[derive(Subcommand)]
pub enum Command {
    /// Build (once) and start the control plane, add nodes and pods, and
    /// print `export KUBECONFIG=...` as the last line.
    Up(UpArgs),
    /// Stop the cluster and remove its namespaces, links and state.
    Down(NameArg),
    /// Say what runs.
    Status(NameArg),
}

#[derive(Args)]
pub struct NameArg {
    /// Which cluster (each has its own addresses, bridge and state).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
}

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Simulated nodes to add (node-1, node-2, ...).
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Simulated pods to add in the default namespace (pod-1, ...), spread
    /// over the nodes in turn.
    #[arg(long, default_value_t = 0)]
    pub pods: usize,
    /// Also a real node (real-1): kubelet, containerd with the CNI bridge
    /// and kube-proxy, with the scheduler and the workload controllers, so
    /// that Deployments and DaemonSets run pods from images
    /// (`cargo xtask images --load` imports ours).
    #[arg(long)]
    pub real_node: bool,
}

/// A started cluster with its nodes and pods (dropped in this order: the
/// pods, their nodes, the control plane).
pub struct Running {
    pub pods: Vec<SimPod>,
    pub nodes: Vec<SimNode>,
    pub real_nodes: Vec<RealNode>,
    pub cluster: Cluster,
}

/// Starts a cluster with `nodes` simulated nodes, `pods` pods in
/// [`POD_NAMESPACE`] spread over them in turn, and `real_nodes` real ones.
/// With [`Lifetime::Process`] it is removed when the caller drops it or
/// exits (the demo); with [`Lifetime::Detached`] it runs until [`down`].
pub async fn up(
    name: &str,
    lifetime: Lifetime,
    nodes: usize,
    pods: usize,
    real_nodes: usize,
) -> anyhow::Result<Running> {
    if pods > 0 && nodes == 0 {
        bail!("pods need at least one node");
    }
    step(format!(
        "starting the local control plane {name} (Kubernetes {})",
        cluster::KUBERNETES_VERSION
    ));
    let started = if real_nodes > 0 {
        Cluster::start_with_workloads(name, lifetime).await
    } else {
        Cluster::start(name, lifetime).await
    };
    let cluster = started.with_context(|| format!("starting the local control plane {name}"))?;
    step(format!("apiserver at {}", cluster.server()));
    let mut running = Running {
        cluster,
        nodes: Vec::new(),
        real_nodes: Vec::new(),
        pods: Vec::new(),
    };
    for _ in 0..nodes {
        let node = running.cluster.add_node("node").await?;
        step(format!("node {} at {}", node.name(), node.ip()));
        running.nodes.push(node);
    }
    for _ in 0..real_nodes {
        let node = running.cluster.add_real_node("real").await?;
        step(format!(
            "real node {} at {} (kubelet, containerd at {})",
            node.name(),
            node.ip(),
            node.containerd_socket().display()
        ));
        running.real_nodes.push(node);
    }
    for i in 0..pods {
        let node = &running.nodes[i % nodes];
        let pod = node
            .add_pod(POD_NAMESPACE, &format!("pod-{}", i + 1))
            .await?;
        step(format!(
            "pod {}/{} at {} on {} (ip netns exec {} ...)",
            POD_NAMESPACE,
            pod.name(),
            pod.ip(),
            node.name(),
            pod.netns()
        ));
        running.pods.push(pod);
    }
    Ok(running)
}

/// Stops the cluster `name` and removes everything it made.
pub fn down(name: &str) -> anyhow::Result<()> {
    if cluster::down(name)? {
        step(format!("cluster {name} stopped and removed"));
    } else {
        step(format!("no cluster named {name}"));
    }
    Ok(())
}

/// Prints what runs in the cluster `name`.
pub fn status(name: &str) -> anyhow::Result<()> {
    match cluster::status(name)? {
        Some(status) => print!("{status}"),
        None => println!("no cluster named {name} (`cargo xtask cluster up` starts one)"),
    }
    Ok(())
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => {
            let name = &args.name.name;
            if let Some(status) = cluster::status(name)? {
                if !status.running() {
                    bail!(
                        "cluster {name} was started but is not running; `cargo xtask cluster down --name {name}` removes it\n{status}"
                    );
                }
                step(format!("cluster {name} is already running"));
                eprint!("{status}");
                print_export(&status.kubeconfig());
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let running = runtime.block_on(up(
                name,
                Lifetime::Detached,
                args.nodes,
                args.pods,
                usize::from(args.real_node),
            ))?;
            step(format!(
                "kubectl and helm are in {}; `cargo xtask cluster down{}` stops it",
                running.cluster.bin_dir().display(),
                if name == DEFAULT_NAME {
                    String::new()
                } else {
                    format!(" --name {name}")
                }
            ));
            print_export(&running.cluster.kubeconfig());
            Ok(())
        }
        Command::Down(args) => down(&args.name),
        Command::Status(args) => status(&args.name),
    }
}

fn print_export(kubeconfig: &std::path::Path) {
    println!("export KUBECONFIG={}", kubeconfig.display());
}
