//! `cargo xtask demo` (`make demo`): the whole system on a local control
//! plane, installed in the README's order, and one capture followed from
//! start to end. Everything it starts is removed when it ends, fails or is
//! interrupted (Ctrl-C).

use std::net::{Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kube::Api;
use packet_capture_common::crd::PacketCaptureConfig;
use packet_capture_test_support::cluster::{
    AGENT_CA_CONFIG_MAP, AgentOptions, COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, Cluster,
    ClusterProcess, Lifetime, SimAgent,
};

use crate::cluster::{Running, up};
use crate::manifests::{FILES, SAMPLE};
use crate::util::{cargo, output, root, run, step, target_dir};

/// The demo's cluster (its state is `.cluster/demo/`).
const NAME: &str = "demo";
/// The pods: the two that manifests/sample-config.yaml names, on different
/// nodes, and a third one whose traffic nobody asked for. (name, node index)
const PODS: [(&str, usize); 3] = [("frontend", 0), ("backend", 1), ("cache", 1)];
const POD_NAMESPACE: &str = "default";
/// What manifests/sample-config.yaml creates.
const CAPTURE: &str = "sample-capture";
/// How many of the install's manifests ([`FILES`], in the README's order
/// after the CRD) the demo applies: the namespace, the RBAC and the
/// settings. The workloads are not applied (there is no kubelet); the demo
/// runs them.
const INSTALL: usize = 3;
const CRD: &str = "crd/packet_capture_config_crd.yaml";
const AUDIENCE: &str = "packet-capture-agent";
/// Longest wait for the capture to end.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run_demo() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user.
    if std::fs::metadata("/proc/self").map(|m| m.uid())? != 0 {
        bail!("the demo needs root: network namespaces, a bridge, BPF (sudo make demo)");
    }
    // With the profile xtask itself was built with.
    let binaries = build(!cfg!(debug_assertions))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            r = demo(&binaries) => r,
            signal = interrupted() => bail!("{signal}: stopped the demo and removed what it started"),
        }
    });
    // Whatever happened, the cluster's guards have run by now.
    if let Ok(Some(status)) = packet_capture_test_support::cluster::status(NAME) {
        bail!("the demo's cluster was not removed:\n{status}");
    }
    result
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

pub(crate) struct Binaries {
    pub agent: PathBuf,
    pub controller: PathBuf,
}

/// Builds the agent and the controller, optimized or not.
pub(crate) fn build(release: bool) -> anyhow::Result<Binaries> {
    step(format!(
        "building the agent and the controller (minutes the first time): \
         cargo build --quiet{} -p packet-capture-agent -p packet-capture-controller",
        if release { " --release" } else { "" }
    ));
    let mut cmd = cargo();
    // Quiet: the agent's build script reports its eBPF build as warnings,
    // and cargo repeats them on every build.
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "packet-capture-agent",
        "-p",
        "packet-capture-controller",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = target_dir()?.join(if release { "release" } else { "debug" });
    Ok(Binaries {
        agent: dir.join("packet-capture-agent"),
        controller: dir.join("packet-capture-controller"),
    })
}

/// Everything the demo started, dropped in this order (its field order):
/// the traffic, the controller, the agents, then the cluster with its pods
/// and nodes.
struct Demo {
    traffic: Option<tokio::process::Child>,
    controller: Option<ClusterProcess>,
    agents: Vec<SimAgent>,
    running: Running,
}

impl Demo {
    fn cluster(&self) -> &Cluster {
        &self.running.cluster
    }

    /// Runs kubectl as the admin, echoing the command line and its output.
    async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("$ kubectl {}", args.join(" "));
        let out = self.cluster().kubectl_async(args).await?;
        print!("{out}");
        Ok(out)
    }
}

async fn demo(binaries: &Binaries) -> anyhow::Result<()> {
    let running = up(NAME, Lifetime::Process, 2, 0, 0).await?;
    let mut demo = Demo {
        traffic: None,
        controller: None,
        agents: Vec::new(),
        running,
    };
    for (pod, node) in PODS {
        let node = &demo.running.nodes[node];
        let pod = node.add_pod(POD_NAMESPACE, pod).await?;
        step(format!(
            "pod {POD_NAMESPACE}/{} at {} on {}",
            pod.name(),
            pod.ip(),
            node.name()
        ));
        demo.running.pods.push(pod);
    }

    step("installing as the README does: the CRD, the namespace, the RBAC, the settings");
    install(demo.cluster(), true).await?;

    step(
        "an agent on each node, as the DaemonSet runs it: host network, its pod's token, TLS on the node's address",
    );
    let options = AgentOptions::new(&binaries.agent);
    for node in &demo.running.nodes {
        let agent = node.launch_agent(&options).await?;
        step(format!(
            "agent on {} asked for its certificate; it serves https://{} once the controller signs it (log {})",
            node.name(),
            agent.endpoint(),
            relative(agent.log_path())
        ));
        demo.agents.push(agent);
    }

    step(
        "the controller, as the Deployment runs it: the controller service account, a token for the agents, the signer of their certificates",
    );
    let cmd = controller_command(demo.cluster(), &binaries.controller).await?;
    let controller = demo.cluster().start_process("controller", cmd)?;
    step(format!(
        "controller running (log {})",
        relative(controller.log_path())
    ));
    demo.controller = Some(controller);
    for agent in &mut demo.agents {
        agent.until_serving().await?;
    }
    step("every agent serves with the certificate the controller signed");

    step("the sample capture: the traffic of pods default/frontend and default/backend");
    let mut table = Table::watch(demo.cluster()).await?;
    demo.kubectl(&["apply", "-f", SAMPLE]).await?;
    let (from, to) = (&demo.running.pods[0], &demo.running.pods[1]);
    step(format!(
        "traffic: {} pings {} ({} on {} -> {} on {}) until the capture ends",
        from.name(),
        to.name(),
        from.ip(),
        from.node_name(),
        to.ip(),
        to.node_name()
    ));
    let mut ping = tokio::process::Command::from(from.command("ping"));
    ping.args(["-n", "-q", "-i", "0.2"])
        .arg(to.ip().to_string())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    demo.traffic = Some(ping.spawn().context("starting ping")?);

    step("kubectl get packetcaptureconfigs --watch, until the capture has ended");
    println!("$ kubectl get packetcaptureconfigs --watch");
    let phase = tokio::time::timeout(CAPTURE_TIMEOUT, table.until_ended())
        .await
        .with_context(|| format!("{CAPTURE} did not end within {CAPTURE_TIMEOUT:?}"))??;
    drop(table);
    demo.traffic = None;
    if phase != "Completed" {
        bail!(
            "{CAPTURE} ended {phase}; the controller's log is {}",
            demo.controller
                .as_ref()
                .map(|c| relative(c.log_path()))
                .unwrap_or_default()
        );
    }

    step("the status");
    let yaml = demo
        .cluster()
        .kubectl_async(&["get", "packetcaptureconfig", CAPTURE, "-o", "yaml"])
        .await?;
    println!("$ kubectl get packetcaptureconfig {CAPTURE} -o yaml");
    let status = yaml
        .find("\nstatus:")
        .map_or(yaml.as_str(), |at| &yaml[at + 1..]);
    print!("{status}");

    show_a_file(&demo).await?;

    step(
        "cleaning up: the capture (the controller removes its finalizer), the controller, the agents, the cluster",
    );
    demo.kubectl(&["delete", "packetcaptureconfig", CAPTURE])
        .await?;
    drop(demo);
    step("done: the cluster, its namespaces and processes are gone");
    Ok(())
}

/// Applies the CRD (and waits until it is served), then the namespace, the
/// RBAC and the settings, as the README's kubectl install does; `echo`
/// prints each command.
pub(crate) async fn install(cluster: &Cluster, echo: bool) -> anyhow::Result<()> {
    let apply = |file: &'static str| async move {
        if echo {
            println!("$ kubectl apply -f {file}");
        }
        let out = cluster.kubectl_async(&["apply", "-f", file]).await?;
        if echo {
            print!("{out}");
        }
        anyhow::Ok(())
    };
    apply(CRD).await?;
    cluster
        .kubectl_async(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/packetcaptureconfigs.networking.packet.io",
        ])
        .await?;
    for (_, manifest) in &FILES[..INSTALL] {
        apply(manifest).await?;
    }
    Ok(())
}

/// The controller as the Deployment runs it: the controller service
/// account, a token for the agents, the signer of their certificates
/// (without the webhook, which needs a registration); more arguments may
/// follow.
pub(crate) async fn controller_command(
    cluster: &Cluster,
    binary: &Path,
) -> anyhow::Result<Command> {
    let token = cluster
        .token_for(COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, &[AUDIENCE])
        .await?;
    let token_file = cluster.dir().join("agent-token");
    std::fs::write(&token_file, &token)
        .with_context(|| format!("writing {}", token_file.display()))?;
    let mut cmd = Command::new(binary);
    cmd.env(
        "KUBECONFIG",
        cluster.service_account_kubeconfig(CONTROLLER_SERVICE_ACCOUNT),
    )
    .env("NO_COLOR", "1")
    // What the Deployment sets from the downward API: where its settings,
    // its agents and its results ConfigMaps are.
    .env("POD_NAMESPACE", COMPONENT_NAMESPACE)
    .arg("--agent-token-file")
    .arg(&token_file)
    .args(["--metrics-port", &free_port()?.to_string()])
    // The agents' CA that the cluster keeps as cert-manager would: the
    // controller signs each agent's certificate with it.
    .args(["--agent-ca", "secret"])
    // The webhook needs a certificate and a registration (cert-manager in
    // a real cluster); the CRD's schema still checks every spec.
    .arg("--disable-webhook");
    Ok(cmd)
}

/// `kubectl get packetcaptureconfigs --watch`: a table row at every change.
struct Table {
    child: tokio::process::Child,
    rows: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Kept open: kubectl would fail writing to a closed pipe.
    _errors: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
}

impl Table {
    /// Starts the watch, and returns once kubectl watches (it logs its
    /// requests at -v=6), so that it sees every change from then on.
    async fn watch(cluster: &Cluster) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::from(cluster.kubectl());
        cmd.args(["get", "packetcaptureconfigs", "--watch", "-v=6"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting kubectl get --watch")?;
        let stderr = child.stderr.take().context("kubectl's stderr")?;
        let mut errors = tokio::io::BufReader::new(stderr).lines();
        let watching = async {
            while let Some(line) = errors.next_line().await? {
                if line.contains("watch=true") && line.contains("200 OK") {
                    return Ok(());
                }
            }
            bail!("kubectl get --watch ended before it watched")
        };
        tokio::time::timeout(Duration::from_secs(30), watching)
            .await
            .context("kubectl get --watch did not start watching within 30 s")??;
        let stdout = child.stdout.take().context("kubectl's stdout")?;
        Ok(Self {
            child,
            rows: tokio::io::BufReader::new(stdout).lines(),
            _errors: errors,
        })
    }

    /// Prints the rows (leaving out those that differ only in AGE) until
    /// the capture has ended; its final phase.
    async fn until_ended(&mut self) -> anyhow::Result<String> {
        let mut last = String::new();
        while let Some(row) = self.rows.next_line().await? {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let key = fields[..fields.len().saturating_sub(1)].join(" ");
            if key != last {
                println!("{row}");
                last = key;
            }
            if let Some(phase) = fields
                .get(1)
                .filter(|p| ["Completed", "Failed"].contains(p))
            {
                return Ok(phase.to_string());
            }
        }
        bail!("kubectl get --watch ended: {:?}", self.child.wait().await)
    }
}

/// Downloads the first node's file through its agent's REST API, with a
/// token as an operator would get one, and summarises it with tshark.
/// The account the demo downloads with: it may read captures and their
/// files (packet-capture-viewer), nothing else.
const READER: &str = "capture-reader";

async fn show_a_file(demo: &Demo) -> anyhow::Result<()> {
    let api: Api<PacketCaptureConfig> = Api::all(demo.cluster().client()?);
    let status = api.get(CAPTURE).await?.status.unwrap_or_default();
    let node = &demo.running.nodes[0];
    let entry = status
        .capture_files
        .get(&node.ip().to_string())
        .with_context(|| format!("no file from {} in the status", node.name()))?;
    let name = Path::new(&entry.output_file)
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("no file name in {:?}", entry.output_file))?
        .to_string();
    step(format!(
        "{name}, downloaded from the agent on {} by an account bound to packet-capture-viewer",
        node.name()
    ));
    let reader = format!("--serviceaccount=default:{READER}");
    for args in [
        &["create", "serviceaccount", READER, "-n", "default"][..],
        &[
            "create",
            "clusterrolebinding",
            READER,
            "--clusterrole=packet-capture-viewer",
            &reader,
        ],
    ] {
        println!("$ kubectl {}", args.join(" "));
        demo.cluster().kubectl_async(args).await?;
    }
    let token_args = [
        "create",
        "token",
        READER,
        "-n",
        "default",
        "--audience",
        AUDIENCE,
    ];
    println!("$ TOKEN=$(kubectl {})", token_args.join(" "));
    let token = demo.cluster().kubectl_async(&token_args).await?;
    // The agents serve TLS with certificates the controller signed; the
    // CAs to trust are published in a ConfigMap.
    println!(
        "$ kubectl -n {COMPONENT_NAMESPACE} get configmap {AGENT_CA_CONFIG_MAP} -o jsonpath='{{.data.ca\\.crt}}' > agents-ca.crt"
    );
    let ca = demo.cluster().agent_ca(Duration::from_secs(60)).await?;
    let ca_file = demo.cluster().dir().join("agents-ca.crt");
    std::fs::write(&ca_file, ca).with_context(|| format!("writing {}", ca_file.display()))?;
    let url = format!("{}/api/v1/files/{name}", demo.agents[0].url());
    let file = demo.cluster().dir().join(&name);
    println!(
        "$ curl -sf --cacert agents-ca.crt -H \"authorization: Bearer $TOKEN\" {url} -o {name}"
    );
    let header = format!("authorization: Bearer {}", token.trim());
    let mut curl = tokio::process::Command::new("curl");
    curl.args(["-sSf", "--cacert"])
        .arg(&ca_file)
        .args(["-H", &header, &url, "-o"])
        .arg(&file);
    let out = curl.output().await.context("running curl")?;
    if !out.status.success() {
        bail!(
            "downloading {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Wireshark's columns, with where each packet was seen and which way.
    let columns = r#"gui.column.format:"No.","%m","Time","%t","Interface","%Cus:frame.interface_name","Direction","%Cus:frame.packet_flags_direction","Source","%s","Destination","%d","Protocol","%p","Info","%i""#;
    println!("$ tshark -n -r {name} -o '{columns}'");
    let path = file.clone();
    let summary = tokio::task::spawn_blocking(move || {
        output(
            Command::new("tshark")
                .args(["-n", "-r"])
                .arg(&path)
                .args(["-o", columns]),
        )
    })
    .await??;
    let lines: Vec<&str> = summary.lines().collect();
    for line in lines.iter().take(8) {
        println!("{line}");
    }
    if lines.len() > 8 {
        println!(
            "... {} packets in all (each once, where the node first saw it; keepCopies: true records it at the pod's veth, the cni0 bridge and eth0 too)",
            lines.len()
        );
    }
    Ok(())
}

/// A port nothing listens on now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))?
        .local_addr()?
        .port())
}

/// `path` relative to the checkout, when it is inside it.
pub(crate) fn relative(path: &Path) -> String {
    let root = root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}
