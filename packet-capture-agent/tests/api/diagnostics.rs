//! The programs' diagnostics through the agent: with `LOG_LEVEL=DEBUG` its
//! log says where the programs run and which frames were too short to
//! parse, naming the program and the interface; at the default level it
//! says nothing of the kind.

use std::time::Duration;

use packet_capture_agent::ebpf::KERNEL_LOG_TARGET;
use packet_capture_test_support::{AgentProcess, privileged};
use serde_json::json;

use crate::common::{Node, Rest};

#[path = "common/packet_socket.rs"]
mod packet_socket;

const WAIT: Duration = Duration::from_secs(10);

/// Starts the agent on the eBPF backend with `envs`, starts a capture of
/// everything, and sends what the programs have something to say about: a
/// ping and a frame too short to parse, out of the agent's end of the veth.
async fn capture_with_traffic(node: &Node, envs: &[(&str, &str)]) -> AgentProcess {
    let mut all = vec![("CAPTURE_BACKEND", "ebpf")];
    all.extend_from_slice(envs);
    let agent = node.agent(&["--insecure-no-auth"], &all);
    let r = Rest::new(&agent)
        .post(
            "/api/v1/captures",
            &json!({"id": "diagnostics", "duration": 600, "outputFormat": "pcap"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    node.ping(2);
    packet_socket::PacketSocket::open(&node.veth.a, 0x0800)
        .send(&packet_socket::short_ipv4_frame(24));
    agent
}

#[tokio::test]
async fn log_level_debug_shows_what_the_programs_say() {
    if !privileged("log_level_debug_shows_what_the_programs_say") {
        return;
    }
    let node = Node::new();
    let agent = capture_with_traffic(&node, &[("LOG_LEVEL", "DEBUG")]).await;
    let on_veth = |program: &str| format!("program=\"{program}\" iface=\"{}\"", node.veth.a);
    for program in ["tc_ingress", "tc_egress"] {
        let line = agent
            .wait_for_log(&on_veth(program), WAIT)
            .unwrap_or_else(|| panic!("nothing from {program}:\n{}", agent.log()));
        assert!(line.contains(KERNEL_LOG_TARGET), "{line}");
    }
    let line = agent
        .wait_for_log("frame too short to parse: 24 bytes", WAIT)
        .unwrap_or_else(|| panic!("no short frame:\n{}", agent.log()));
    assert!(line.contains(&on_veth("tc_egress")), "{line}");
}

#[tokio::test]
async fn the_default_level_shows_nothing_from_the_programs() {
    if !privileged("the_default_level_shows_nothing_from_the_programs") {
        return;
    }
    let node = Node::new();
    let mut agent = capture_with_traffic(&node, &[]).await;
    // Stopped, the agent has written all it will.
    let status = agent.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let log = agent.log();
    assert!(log.contains("attached"), "{log}");
    assert!(!log.contains(KERNEL_LOG_TARGET), "{log}");
}
