//! The agent binary with exactly the capabilities the chart gives it
//! (`agent.capabilities` in charts/packet-capture/values.yaml): it runs the
//! eBPF backend and captures. Without CAP_BPF or CAP_NET_ADMIN it cannot
//! load or attach the programs, says so, and captures with libpcap instead.

use std::path::Path;

use packet_capture_test_support::{AgentProcess, privileged};
use serde_json::json;

use crate::common::{AGENT, Node, RIGHT_IP, Rest};

/// What the chart's DaemonSet adds for `backend`: `agent.capabilities`,
/// and NET_RAW unless the backend is ebpf (the template's rule, which
/// xtask's chart test checks).
fn chart_capabilities(backend: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/packet-capture/values.yaml");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut caps: Vec<String> = values["agent"]["capabilities"]
        .as_sequence()
        .expect("agent.capabilities in values.yaml")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_owned())
        .collect();
    if backend != "ebpf" {
        caps.push("NET_RAW".into());
    }
    caps
}

/// The agent as root with no capability but `caps` (setpriv drops the rest
/// from the bounding set, so uid 0 cannot regain them).
fn agent_with(node: &Node, caps: &[&str]) -> AgentProcess {
    let bounding: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    let bounding = format!("--bounding-set=-all{bounding}");
    let dir = node.dir.path().to_str().unwrap();
    let args = [
        bounding.as_str(),
        "--inh-caps=-all",
        "--",
        AGENT,
        "--capture-dir",
        dir,
        "--ring-buffer-mb",
        "1",
        "--insecure-no-auth",
        "--insecure-plaintext",
    ];
    AgentProcess::spawn(&node.left, "setpriv", &args, &[])
}

/// Starts a capture of the peer's pings and returns it once it has
/// written four. Its filter reads at an offset that depends on the packet
/// (the TCP header's), which the kernel translation loads through X.
async fn capture_pings(agent: &AgentProcess, node: &Node, id: &str) -> serde_json::Value {
    let c = Rest::new(agent);
    let filter = "icmp or tcp[tcpflags] & tcp-syn != 0";
    let body = json!({"id": id, "targetIPs": [RIGHT_IP], "maxPackets": 4, "filter": filter});
    assert_eq!(c.post("/api/v1/captures", &body).await.status(), 201);
    node.ping(2);
    let done = c.ended(id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["packets"], 4, "{done}");
    done
}

#[tokio::test]
async fn the_charts_capabilities_run_the_ebpf_backend() {
    if !privileged("the_charts_capabilities_run_the_ebpf_backend") {
        return;
    }
    // Those of `agent.backend: ebpf`, without NET_RAW.
    let caps = chart_capabilities("ebpf");
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN" || c == "PERFMON"),
        "{caps:?}"
    );
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let node = Node::new();
    let agent = agent_with(&node, &caps);
    let health = Rest::new(&agent).json("/health").await;
    assert_eq!(health["backend"], "ebpf", "with {caps:?}: {}", agent.log());
    // The filter's translation loads with these capabilities too.
    let done = capture_pings(&agent, &node, "caps").await;
    assert_eq!(done["filter_path"], "kernel", "{done}");
}

#[tokio::test]
async fn without_bpf_or_net_admin_the_agent_falls_back_to_libpcap() {
    if !privileged("without_bpf_or_net_admin_the_agent_falls_back_to_libpcap") {
        return;
    }
    // Those of the default `agent.backend: auto`.
    let caps = chart_capabilities("auto");
    for missing in ["BPF", "NET_ADMIN"] {
        assert!(
            caps.iter().any(|c| c == missing),
            "the chart lacks {missing}"
        );
        let fewer: Vec<&str> = caps
            .iter()
            .map(String::as_str)
            .filter(|c| *c != missing)
            .collect();
        let node = Node::new();
        let agent = agent_with(&node, &fewer);
        let health = Rest::new(&agent).json("/health").await;
        assert_eq!(
            health["backend"],
            "pcap",
            "without {missing}: {}",
            agent.log()
        );
        assert!(
            agent.log().contains("capturing with libpcap instead")
                && agent.log().contains("Operation not permitted"),
            "without {missing} the agent says why it falls back:\n{}",
            agent.log()
        );
        capture_pings(&agent, &node, "fallback").await;
    }
}
