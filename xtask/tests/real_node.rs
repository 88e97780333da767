//! The chart as users run it: the images built here, `helm install` onto a
//! real node (kubelet, containerd, kube-proxy) of the local control plane,
//! the controller and the agents as real pods, a capture of two real pods
//! end to end, then the operations of a running installation (upgrade, an
//! agent restarted mid-capture, uninstall with a capture running) and the
//! kubectl install without cert-manager.

use std::path::Path;
use std::process::Command;

use packet_capture_test_support::cluster::{
    COMPONENT_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT, Cluster, Lifetime, RealNode,
};
use packet_capture_test_support::{capfile, privileged, workspace_binary};
use serde_json::{Value, json};
use xtask::images::{self, Image};
use xtask::util::root;

const RELEASE: &str = "packet-capture";
const NS: &str = COMPONENT_NAMESPACE;
/// Where the test's own pods run.
const APP_NS: &str = "default";
const WAIT: &str = "--timeout=180s";

/// A started cluster with one real node and the images in its containerd.
struct World {
    node: RealNode,
    cluster: Cluster,
    images: Vec<Image>,
}

impl World {
    async fn start(name: &str) -> Self {
        let images = tokio::task::spawn_blocking(|| images::build(&images::Args::default()))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("building the images: {e:#}"));
        let cluster = Cluster::start_with_workloads(name, Lifetime::Process)
            .await
            .unwrap_or_else(|e| panic!("the local control plane did not start: {e}"));
        let node = cluster
            .add_real_node("real")
            .await
            .unwrap_or_else(|e| panic!("the real node did not start: {e}"));
        images::load(&images, &node.containerd_socket()).unwrap();
        images::load_base(&node.containerd_socket()).unwrap();
        Self {
            node,
            cluster,
            images,
        }
    }

    /// kubectl with the admin kubeconfig; fails the test unless it succeeds.
    fn kubectl(&self, args: &[&str]) -> String {
        output(self.cluster.kubectl().args(args).current_dir(root()))
    }

    /// kubectl with `stdin` as its standard input; its output, whatever
    /// its exit status.
    fn kubectl_piped(&self, args: &[&str], stdin: &Value) -> std::process::Output {
        use std::io::Write as _;
        let mut child = self
            .cluster
            .kubectl()
            .args(args)
            .current_dir(root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn apply(&self, object: &Value) {
        let out = self.kubectl_piped(&["apply", "-f", "-"], object);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// helm on the release's namespace, as the README installs it.
    fn helm(&self, args: &[&str]) -> String {
        output(
            self.cluster
                .helm()
                .args(args)
                .args(["--namespace", NS])
                .current_dir(root()),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    /// The registry the images were built for (`<registry>/<name>:<tag>`).
    fn registry(&self) -> String {
        let name = &self.images[0].name;
        let repo = name.rsplit_once(':').map_or(name.as_str(), |(r, _)| r);
        repo.rsplit_once('/').map_or("", |(r, _)| r).to_string()
    }

    /// Waits until the controller and the agents run and are Ready, and
    /// the API server admits a capture (a registered webhook answers
    /// through its Service once the node routes the Service to the new
    /// pod, which may lag its readiness).
    fn wait_installed(&self) {
        self.kubectl(&[
            "rollout",
            "status",
            "-n",
            NS,
            "deployment/packet-capture-controller",
            WAIT,
        ]);
        self.kubectl(&[
            "rollout",
            "status",
            "-n",
            NS,
            "daemonset/packet-capture-agent",
            WAIT,
        ]);
        let probe = json!({
            "apiVersion": "networking.packet.io/v1",
            "kind": "PacketCaptureConfig",
            "metadata": {"name": "admission-probe"},
            "spec": {"targetIPs": ["10.0.0.1"]},
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let out = self.kubectl_piped(&["apply", "--dry-run=server", "-f", "-"], &probe);
            if out.status.success() {
                return;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("failed calling webhook") && std::time::Instant::now() < deadline,
                "a capture is not admitted: {stderr}"
            );
        }
    }

    /// A pod of the base image on the real node running `script`.
    fn pod(&self, name: &str, script: &str) -> String {
        self.apply(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": APP_NS, "labels": {"app": name}},
            "spec": {
                "nodeName": self.node.name(),
                "terminationGracePeriodSeconds": 0,
                "containers": [{
                    "name": name,
                    "image": images::BASE_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["bash", "-c", script],
                }],
            },
        }));
        self.kubectl(&[
            "wait",
            "-n",
            APP_NS,
            "--for=condition=Ready",
            &format!("pod/{name}"),
            WAIT,
        ]);
        self.kubectl(&[
            "get",
            "pod",
            "-n",
            APP_NS,
            name,
            "-o",
            "jsonpath={.status.podIP}",
        ])
    }

    fn capture(&self, name: &str, max_packets: u32, duration: u32) {
        self.apply(&json!({
            "apiVersion": "networking.packet.io/v1",
            "kind": "PacketCaptureConfig",
            "metadata": {"name": name},
            "spec": {
                "podSelector": {"pods": [
                    {"podName": "client", "namespace": APP_NS},
                    {"podName": "server", "namespace": APP_NS},
                ]},
                "duration": duration,
                "maxPackets": max_packets,
                "outputFormat": "pcapng",
                "filter": "tcp",
            },
        }));
    }

    /// The capture once its phase is `phase`; on a timeout the test fails
    /// with the capture and the components' logs, which say why.
    fn wait_phase(&self, capture: &str, phase: &str) -> Value {
        let waited = self
            .cluster
            .kubectl()
            .args([
                "wait",
                &format!("--for=jsonpath={{.status.phase}}={phase}"),
                &format!("packetcaptureconfig/{capture}"),
                WAIT,
            ])
            .output()
            .unwrap();
        let now = self.json(&["get", "packetcaptureconfig", capture]);
        if !waited.status.success() {
            let logs = |app: &str| {
                let out = self
                    .cluster
                    .kubectl()
                    .args(["logs", "-n", NS, "-l", &format!("app={app}"), "--tail=40"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            panic!(
                "{capture} did not reach {phase}: {}\n{now:#}\ncontroller:\n{}\nagent:\n{}",
                String::from_utf8_lossy(&waited.stderr),
                logs("packet-capture-controller"),
                logs("packet-capture-agent"),
            );
        }
        now
    }

    /// A file of this node's agent, downloaded through its API by an
    /// account bound to packet-capture-viewer, as the README shows; the
    /// controller's own account may not read files.
    async fn download(&self, file_name: &str, to: &Path) {
        let url = format!("https://{}:8080/api/v1/files/{file_name}", self.node.ip());
        let client = self.agent_client().await;
        let controller = self
            .cluster
            .token_for(NS, CONTROLLER_SERVICE_ACCOUNT, &["packet-capture-agent"])
            .await
            .unwrap();
        let refused = client
            .get(&url)
            .bearer_auth(controller)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "GET {url} as the controller");
        self.cluster
            .kubectl_async(&[
                "create",
                "clusterrolebinding",
                "capture-reader",
                "--clusterrole=packet-capture-viewer",
                "--serviceaccount=default:capture-reader",
            ])
            .await
            .unwrap();
        let token = self
            .cluster
            .token_for("default", "capture-reader", &["packet-capture-agent"])
            .await
            .unwrap();
        // A new binding reaches the API server's authorizer a moment later,
        // and the agent keeps a refusal for its cache's lifetime (30 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let response = loop {
            let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
            if response.status() != 403 || std::time::Instant::now() > deadline {
                break response;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        };
        assert_eq!(response.status(), 200, "GET {url}");
        std::fs::write(to, response.bytes().await.unwrap()).unwrap();
    }

    /// `kubectl pcap fetch capture -o to` as the reader [`download`] made
    /// (bound to packet-capture-viewer), with nothing but the API server.
    async fn fetch(&self, capture: &str, to: &Path) {
        let kubeconfig = self
            .cluster
            .user_kubeconfig("default", "capture-reader")
            .await
            .unwrap();
        // Available once the controller has filled in its caBundle.
        self.kubectl(&[
            "wait",
            "--for=condition=Available",
            "apiservice/v1.pcap.packet.io",
            WAIT,
        ]);
        let plugin = workspace_binary(
            "kubectl-pcap",
            "kubectl-pcap",
            &["kubectl-pcap/src", "packet-capture-common/src"],
        );
        output(
            Command::new(plugin)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["fetch", capture, "-o"])
                .arg(to),
        );
    }

    /// The CAs the controller publishes for the agents' certificates (PEM).
    async fn agent_ca(&self) -> String {
        self.cluster
            .agent_ca(std::time::Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An HTTPS client that trusts only the agents' CAs.
    async fn agent_client(&self) -> reqwest::Client {
        let ca = self.agent_ca().await;
        reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// `kubectl logs -f` of a pod in the release's namespace.
    fn follow_logs(&self, pod: &str) -> Logs {
        let mut child = self
            .cluster
            .kubectl()
            .args(["logs", "-f", "-n", NS, pod])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Logs {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The uids of the controller's and the agents' pods, leaving out those
    /// being deleted.
    fn component_pods(&self) -> Vec<String> {
        let pods = self.json(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app in (packet-capture-controller,packet-capture-agent)",
        ]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| p["metadata"]["uid"].as_str().unwrap().to_string())
            .collect()
    }

    /// The agent pod's name on the real node.
    fn agent_pod(&self) -> String {
        self.kubectl(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app=packet-capture-agent",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
    }
}

/// A pod's log as it is written.
struct Logs {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Logs {
    /// Reads on until a line contains `needle`; fails the test with what
    /// was read when none does within a minute.
    fn until(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command that must succeed; its stdout.
fn output(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&packet_capture_test_support::netns::run(cmd).stdout).into_owned()
}

/// The pod's containers' security contexts are the chart's: no privilege,
/// capabilities only, a read-only root file system.
fn assert_least_privilege(pod: &Value, capabilities: &[&str]) {
    for c in pod["spec"]["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "{sc}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
        let added: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(added, capabilities, "{sc}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_on_a_real_node_captures_real_pods() {
    if !privileged("helm_install_on_a_real_node_captures_real_pods") {
        return;
    }
    let world = World::start(&format!("rn{}", std::process::id())).await;
    let registry = world.registry();

    // Installed as the README says, without cert-manager: into a namespace
    // of its own (the cluster made it already, for the service accounts
    // the simulated components use, so --create-namespace finds it).
    world.helm(&[
        "install",
        RELEASE,
        "charts/packet-capture",
        "--create-namespace",
        "--set",
        &format!("image.registry={registry}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "certManager.enabled=false",
    ]);
    world.wait_installed();

    let pods = world.json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app=packet-capture-controller",
    ]);
    let controllers = pods["items"].as_array().unwrap();
    assert_eq!(controllers.len(), 2, "two controller replicas");
    for pod in controllers {
        assert_least_privilege(pod, &[]);
    }
    let lease = world.json(&["get", "lease", "-n", NS, "packet-capture-controller"]);
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        controllers
            .iter()
            .any(|p| p["metadata"]["name"].as_str() == Some(holder)),
        "the lease is held by {holder:?}, not one of the controller pods"
    );
    let agent = world.json(&["get", "pod", "-n", NS, &world.agent_pod()]);
    assert_least_privilege(&agent, &["BPF", "NET_ADMIN", "NET_RAW"]);

    // The agent loaded its eBPF programs inside the container; checked as
    // the README's troubleshooting does, from inside, without curl.
    let health = world.kubectl(&[
        "exec",
        "-n",
        NS,
        &world.agent_pod(),
        "--",
        "packet-capture-agent",
        "health",
    ]);
    let health: Value = serde_json::from_str(health.trim()).unwrap();
    assert_eq!(health["backend"], "ebpf", "{health}");
    assert_eq!(health["node"], world.node.name(), "{health}");

    // `helm test` leaves alone a capture of its capture's name that it did
    // not make, and fails saying so.
    let theirs = json!({
        "apiVersion": "networking.packet.io/v1",
        "kind": "PacketCaptureConfig",
        "metadata": {"name": "packet-capture-test"},
        "spec": {"targetIPs": ["10.0.0.1"], "duration": 600},
    });
    world.apply(&theirs);
    let refused = world
        .cluster
        .helm()
        .args(["test", RELEASE, "--logs", WAIT, "--namespace", NS])
        .current_dir(root())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("that this check did not make"), "{said}");
    let kept = world.json(&["get", "packetcaptureconfig", "packet-capture-test"]);
    assert!(kept["metadata"]["deletionTimestamp"].is_null(), "{kept}");
    world.kubectl(&["delete", "packetcaptureconfig", "packet-capture-test"]);

    // `helm test`: the node's agent is ready, and a pod of the release
    // captures its own traffic end to end and reads its file back through
    // the aggregated API. Its capture and its access are gone afterwards;
    // its pod stays, for its log.
    let tested = world.helm(&["test", RELEASE, "--logs", WAIT]);
    for line in [
        "every node's agent is ready nodes=1",
        "read through the API server",
        "check passed",
    ] {
        assert!(tested.contains(line), "no {line:?} in:\n{tested}");
    }
    let left = world.kubectl(&[
        "get",
        "packetcaptureconfigs,clusterroles,clusterrolebindings",
        "-o",
        "name",
    ]);
    assert!(!left.contains("packet-capture-test"), "{left}");
    let left = world.kubectl(&[
        "get",
        "serviceaccounts,roles,rolebindings",
        "-n",
        NS,
        "-o",
        "name",
    ]);
    assert!(!left.contains("packet-capture-test"), "{left}");

    // Two real pods, the client connecting to the server until the capture
    // has its packets (a closed port: each try is a SYN and a RST).
    let server = world.pod("server", "exec sleep infinity");
    let client = world.pod(
        "client",
        &format!("while true; do (exec 3<>/dev/tcp/{server}/7) 2>/dev/null; sleep 0.1; done"),
    );
    world.capture("pods", 20, 120);
    let done = world.wait_phase("pods", "Completed");
    let entry = only_node(&done);
    assert_eq!(entry["status"], "completed", "{done}");
    assert_eq!(entry["node"], world.node.name(), "{done}");
    let file = entry["output_file"].as_str().unwrap();
    let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join(file_name);
    world.download(file_name, &local).await;
    assert_eq!(capfile::read(&local).len(), 20, "{done}");
    // The same packets through the API server alone, as `kubectl pcap
    // fetch` gets them for the same reader from the controller's
    // aggregated API (the chart's APIService, the caBundle the controller
    // filled in), and as mergecap merges the node's file.
    let merged = dir.path().join("fetched.pcapng");
    world.fetch("pods", &merged).await;
    let expected = dir.path().join("mergecap.pcapng");
    output(
        Command::new("mergecap")
            .arg("-w")
            .arg(&expected)
            .arg(&local),
    );
    let key = |p: &capfile::Packet| (p.time_ns, p.data.clone(), p.orig_len);
    let fetched: Vec<_> = capfile::read(&merged).iter().map(key).collect();
    assert_eq!(
        fetched,
        capfile::read(&expected).iter().map(key).collect::<Vec<_>>()
    );
    for packet in capfile::read(&merged) {
        assert!(
            packet
                .interface
                .starts_with(&format!("{}/", world.node.name())),
            "interface {:?} is not named node/iface",
            packet.interface
        );
    }
    let addresses = tshark_addresses(&local);
    assert_eq!(addresses.len(), 20);
    for (src, dst) in &addresses {
        let between = (src == &client && dst == &server) || (src == &server && dst == &client);
        assert!(
            between,
            "{src} -> {dst} is not between {client} and {server}"
        );
    }

    // The agent's port speaks TLS only, with a certificate for the node
    // that the agents' CA signed: grpcurl verifies it with the published
    // CA, and a pod on the node that speaks plain HTTP gets no answer. The
    // agent listens on the node's address and nowhere else.
    let node_ip = world.node.ip().to_string();
    let ca_file = dir.path().join("agents-ca.crt");
    std::fs::write(&ca_file, world.agent_ca().await).unwrap();
    let grpcurl = output(
        Command::new(packet_capture_test_support::tools::grpcurl())
            .arg("-cacert")
            .arg(&ca_file)
            .arg(format!("{node_ip}:8080"))
            .arg("packetcapture.v1.Agent/Health"),
    );
    let grpc_health: Value = serde_json::from_str(&grpcurl).unwrap();
    assert_eq!(grpc_health["nodeName"], world.node.name(), "{grpcurl}");
    let probe = world.pod(
        "scanner",
        &format!(
            "exec 3<>/dev/tcp/{node_ip}/8080; printf 'GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; \
             head -c 5 <&3 > /tmp/answer; echo done > /tmp/asked; exec sleep infinity"
        ),
    );
    assert!(!probe.is_empty());
    let answer = world.kubectl(&[
        "exec",
        "-n",
        APP_NS,
        "scanner",
        "--",
        "bash",
        "-c",
        "while [ ! -e /tmp/asked ]; do sleep 0.1; done; cat /tmp/answer",
    ]);
    assert!(
        !answer.starts_with("HTTP/"),
        "plain HTTP on the agent's port was answered: {answer:?}"
    );
    let listening =
        output(Command::new("ip").args(["netns", "exec", world.node.netns(), "ss", "-Hltnp"]));
    let agent_sockets: Vec<&str> = listening
        .lines()
        .filter(|l| l.contains("packet-captur"))
        .collect();
    assert_eq!(agent_sockets.len(), 1, "{listening}");
    assert!(
        agent_sockets[0].contains(&format!("{node_ip}:8080")),
        "{listening}"
    );

    // The webhook, served with the controller's own certificate through its
    // Service, refuses a bad spec with the field named.
    let refused = world.kubectl_piped(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "networking.packet.io/v1",
            "kind": "PacketCaptureConfig",
            "metadata": {"name": "bad"},
            "spec": {"targetIPs": ["10.0.0.1"], "filter": "tcp port eighty"},
        }),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a bad filter was accepted");
    assert!(
        stderr.contains("denied the request: spec.filter"),
        "{stderr}"
    );

    // Day 2: the logs of the agents, as the README's troubleshooting reads them.
    let logs = world.kubectl(&[
        "logs",
        "-n",
        NS,
        "-l",
        "app=packet-capture-agent",
        "--tail=-1",
    ]);
    assert!(logs.contains("listening on"), "{logs}");
    world.kubectl(&["delete", "packetcaptureconfig", "pods"]);

    // An agent restarted mid-capture (a rollout, a crash): its node fails
    // and says why; the capture is never reported as a success.
    world.capture("restarted", 1_000_000, 600);
    world.wait_phase("restarted", "Running");

    // LOG_LEVEL=DEBUG edited in the ConfigMap reaches the running agent and
    // its eBPF programs without a restart or a reload of the capture.
    let agent_uid = world.kubectl(&[
        "get",
        "pod",
        "-n",
        NS,
        &world.agent_pod(),
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let mut logs = world.follow_logs(&world.agent_pod());
    let leader = world.json(&["get", "lease", "-n", NS, "packet-capture-controller"]);
    let leader = leader["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let mut controller_logs = world.follow_logs(&leader);
    world.kubectl(&[
        "patch",
        "configmap",
        "-n",
        NS,
        "packet-capture-config",
        "--type=merge",
        "-p",
        r#"{"data":{"LOG_LEVEL":"DEBUG"}}"#,
    ]);
    logs.until("eBPF programs' diagnostics on");
    logs.until("program running: first packet since diagnostics were switched on");
    // The controller follows the same key.
    controller_logs.until("log level DEBUG (LOG_LEVEL of ConfigMap");
    let now = world.json(&["get", "pod", "-n", NS, &world.agent_pod()]);
    assert_eq!(now["metadata"]["uid"], agent_uid.as_str());
    assert_eq!(now["status"]["containerStatuses"][0]["restartCount"], 0);
    assert_eq!(
        world.json(&["get", "packetcaptureconfig", "restarted"])["status"]["phase"],
        "Running"
    );
    drop((logs, controller_logs));
    world.kubectl(&["delete", "pod", "-n", NS, &world.agent_pod(), "--wait=true"]);
    let failed = world.wait_phase("restarted", "Failed");
    let entry = only_node(&failed);
    assert_eq!(entry["status"], "failed", "{failed}");
    let message = entry["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("without being asked") || message.contains("no longer knows"),
        "{message}"
    );
    world.wait_installed();
    world.kubectl(&["delete", "packetcaptureconfig", "restarted"]);

    // `helm upgrade` of the log level, which the pods follow while they
    // run, keeps them (and their captures); a setting read at start rolls
    // them.
    let upgrade = |setting: &str| {
        world.helm(&[
            "upgrade",
            RELEASE,
            "charts/packet-capture",
            "--reuse-values",
            "--set",
            setting,
        ]);
        world.wait_installed();
    };
    let before = world.component_pods();
    upgrade("config.logLevel=DEBUG");
    assert_eq!(
        world.component_pods(),
        before,
        "a new log level replaced pods"
    );
    upgrade("config.maxCaptureDuration=43200");
    let after = world.component_pods();
    for uid in &before {
        assert!(
            !after.contains(uid),
            "pod {uid} was not replaced by the upgrade"
        );
    }

    // `helm uninstall` with a capture running leaves nothing stuck on the
    // finalizer: the hook deletes the capture while the controller runs.
    world.capture("running", 1_000_000, 600);
    world.wait_phase("running", "Running");
    world.helm(&["uninstall", RELEASE, "--wait", WAIT]);
    let left = world.kubectl(&["get", "packetcaptureconfigs", "-o", "name"]);
    assert_eq!(left.trim(), "", "captures left after uninstall");
    let workloads = world.kubectl(&["get", "deployments,daemonsets,jobs", "-n", NS, "-o", "name"]);
    assert_eq!(workloads.trim(), "", "left after uninstall");

    // The kubectl install without cert-manager (no webhook.yaml), with the
    // images under the names the manifests use, and the Makefile's
    // operations on it.
    for image in &world.images {
        let manifest_name = image.name.replacen(&registry, "ghcr.io/packet-capture", 1);
        world.node.tag_image(&image.name, &manifest_name).unwrap();
    }
    let make = |target: &str| {
        output(
            Command::new("make")
                .current_dir(root())
                .args(["--no-print-directory", target])
                .arg(format!(
                    "KUBECTL={}",
                    world.cluster.bin_dir().join("kubectl").display()
                ))
                .env("KUBECONFIG", world.cluster.kubeconfig()),
        )
    };
    let deployed = make("deploy");
    assert!(
        deployed.contains("cert-manager is not installed"),
        "{deployed}"
    );
    world.wait_installed();
    world.capture("kubectl", 10, 120);
    world.wait_phase("kubectl", "Completed");
    let status = make("status");
    assert!(
        status.contains("packet-capture-agent") && status.contains("kubectl"),
        "{status}"
    );
    assert!(make("logs-controller").contains("controller starting"));
    assert!(make("logs-agent").contains("listening on"));
    make("restart");
    world.wait_installed();
    make("destroy");
    let left = world.kubectl(&["get", "crd", "-o", "name"]);
    assert!(!left.contains("packetcaptureconfigs"), "{left}");
}

/// The one `status.captureFiles` entry of a capture on the real node.
fn only_node(capture: &Value) -> Value {
    let entries = capture["status"]["captureFiles"].as_object().unwrap();
    assert_eq!(entries.len(), 1, "{capture}");
    entries.values().next().unwrap().clone()
}

/// The IPv4 source and destination of every packet of a capture file, as
/// tshark reads them.
fn tshark_addresses(file: &Path) -> Vec<(String, String)> {
    let fields = output(
        Command::new("tshark")
            .args(["-n", "-r"])
            .arg(file)
            .args(["-T", "fields", "-e", "ip.src", "-e", "ip.dst"]),
    );
    fields
        .lines()
        .map(|l| {
            let (src, dst) = l.split_once('\t').unwrap_or((l, ""));
            (src.to_string(), dst.to_string())
        })
        .collect()
}

/// `cargo xtask cluster up --real-node`, a pod on the real node, then every
/// process of the cluster killed with SIGKILL (a crashed run: the
/// containers and containerd's shims live on): `cluster down` removes every
/// container, mount, cgroup, namespace and process all the same.
#[test]
fn cluster_down_removes_a_real_node_after_a_kill_9() {
    if !privileged("cluster_down_removes_a_real_node_after_a_kill_9") {
        return;
    }
    let name = format!("rk{}", std::process::id());
    let xtask = env!("CARGO_BIN_EXE_xtask");
    let up = output(Command::new(xtask).args([
        "cluster",
        "up",
        "--name",
        &name,
        "--nodes",
        "1",
        "--real-node",
    ]));
    let kubeconfig = up
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("export KUBECONFIG="))
        .unwrap_or_else(|| panic!("no export line: {up}"))
        .to_string();
    let dir = Path::new(&kubeconfig).parent().unwrap().to_path_buf();
    let kubectl = |args: &[&str]| {
        output(
            Command::new(dir.join("bin/kubectl"))
                .env("KUBECONFIG", &kubeconfig)
                .args(args),
        )
    };
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    let node = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["real"] == true)
        .unwrap_or_else(|| panic!("no real node in {state}"));
    let node_name = node["name"].as_str().unwrap().to_string();
    let netns = node["netns"].as_str().unwrap().to_string();
    kubectl(&[
        "run",
        "sleeper",
        "--image=registry.k8s.io/pause:3.10",
        "--image-pull-policy=Never",
        &format!("--overrides={}", json!({"spec": {"nodeName": node_name}})),
    ]);
    kubectl(&["wait", "--for=condition=Ready", "pod/sleeper", WAIT]);
    let node_dir = dir.join("nodes").join(&node_name);
    let cgroup = format!("pc-{name}-{node_name}");
    assert!(
        !mounts_below(&node_dir).is_empty(),
        "the pod mounted nothing"
    );
    assert!(!processes_naming(&node_dir).is_empty(), "no shim runs");

    // The crash: every recorded process at once, no clean-up.
    for p in state["processes"].as_array().unwrap() {
        let pid = p["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill has no memory effects; these are the cluster's.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    output(Command::new(xtask).args(["cluster", "down", "--name", &name]));

    assert!(!dir.exists(), "{} is left", dir.display());
    assert_eq!(mounts_below(&node_dir), Vec::<String>::new());
    assert_eq!(processes_naming(&node_dir), Vec::<u32>::new());
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "{netns} is left"
    );
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let left = hierarchy.unwrap().path().join(&cgroup);
        assert!(!left.exists(), "{} is left", left.display());
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(String::from)
        .collect()
}

fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}
