//! The agent with netlink tc filters (as on kernels before TCX, chosen here
//! with `--tc-attach netlink`): an idle agent attaches nothing; the clsact
//! qdisc it made goes with its filters, unless someone else's filter is on
//! it, and one it did not make stays; filters a killed agent left are
//! removed when the next one starts, so a capture then records each packet
//! once; an interface renamed during a capture keeps no qdisc of ours; the
//! last capture's end and SIGTERM leave no filter behind.

use std::path::Path;

use packet_capture_test_support::capfile;
use packet_capture_test_support::netns::run;
use packet_capture_test_support::{AgentProcess, Netns, VethPair, privileged};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_packet-capture-agent");

/// (program name, program id) of each BPF filter on `hook` (`ingress` or
/// `egress`) of `dev`, as `tc` lists them.
fn filters(ns: &Netns, dev: &str, hook: &str) -> Vec<(String, String)> {
    let out = run(ns.command("tc").args(["filter", "show", "dev", dev, hook]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key| {
                let at = words.iter().position(|w| *w == key)?;
                words.get(at + 1).map(|w| w.to_string())
            };
            Some((after("name")?, after("id")?))
        })
        .collect()
}

/// Whether `dev` has a clsact qdisc.
fn has_clsact(ns: &Netns, dev: &str) -> bool {
    let out = run(ns.command("tc").args(["qdisc", "show", "dev", dev]));
    String::from_utf8_lossy(&out.stdout).contains("qdisc clsact")
}

fn names(filters: &[(String, String)]) -> Vec<&str> {
    filters.iter().map(|(name, _)| name.as_str()).collect()
}

/// Renames `from` to `to` (a link must be down for that), and up again.
fn rename(ns: &Netns, from: &str, to: &str) {
    run(ns.command("ip").args(["link", "set", "dev", from, "down"]));
    run(ns
        .command("ip")
        .args(["link", "set", "dev", from, "name", to]));
    run(ns.command("ip").args(["link", "set", "dev", to, "up"]));
}

/// Waits until the agent has said `n` times that it found `iface` (it
/// says so once it has taken up the interface, and attached when a
/// capture runs).
fn until_found(agent: &AgentProcess, iface: &str, n: usize) {
    let named = format!("iface=\"{iface}\"");
    let found = ["interface found", named.as_str()];
    assert!(
        agent.wait_for_log_lines(&found, n, std::time::Duration::from_secs(10)),
        "the agent did not find {iface} {n} times:\n{}",
        agent.log()
    );
}

/// The agent's REST API, from a thread inside its namespace.
struct Rest {
    client: reqwest::Client,
    base: String,
}

impl Rest {
    fn new(agent: &AgentProcess) -> Self {
        Self {
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: agent.url(),
        }
    }

    async fn start(&self, id: &str) {
        let r = self
            .client
            .post(format!("{}/api/v1/captures", self.base))
            .json(&json!({"id": id, "duration": 600, "outputFormat": "pcap", "filter": "icmp"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    async fn stop(&self, id: &str) -> Value {
        let r = self
            .client
            .delete(format!("{}/api/v1/captures/{id}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

/// The ICMP types tshark reads in a capture file, in order.
fn icmp_types(file: &Path) -> Vec<String> {
    let out = run(std::process::Command::new("tshark")
        .arg("-r")
        .arg(capfile::locate(file))
        .args(["-T", "fields", "-e", "icmp.type"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn filters_a_killed_agent_left_are_removed_and_none_outlive_the_captures() {
    if !privileged("filters_a_killed_agent_left_are_removed_and_none_outlive_the_captures") {
        return;
    }
    let node = Netns::new("tnn");
    let peer = Netns::new("tnp");
    let veth = VethPair::new(&node, &["10.96.0.1/24"], &peer, &["10.96.0.2/24"]);
    // The test's sockets reach the agent on 127.0.0.1 of its namespace.
    node.enter();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--insecure-no-auth",
        "--insecure-plaintext",
        "--capture-dir",
        dir.path().to_str().unwrap(),
        "--ring-buffer-mb",
        "1",
        "--tc-attach",
        "netlink",
    ];
    // Each hook of the veth and loopback's way in, one filter each.
    let ours = || {
        [
            filters(&node, &veth.a, "ingress"),
            filters(&node, &veth.a, "egress"),
            filters(&node, "lo", "ingress"),
        ]
    };
    let expected = [vec!["tc_ingress"], vec!["tc_egress"], vec!["tc_ingress"]];

    let none = || [vec![], vec![], vec![]];

    // Someone else's clsact qdisc on loopback, without filters yet.
    run(node
        .command("tc")
        .args(["qdisc", "add", "dev", "lo", "clsact"]));
    let mut first = AgentProcess::spawn(&node, AGENT, &args, &[]);
    assert_eq!(ours(), none(), "an idle agent attaches nothing");
    assert!(!has_clsact(&node, &veth.a), "an idle agent makes no qdisc");

    // The qdisc the agent made goes with its filters; the other one stays.
    let rest = Rest::new(&first);
    rest.start("made").await;
    assert!(has_clsact(&node, &veth.a));
    rest.stop("made").await;
    assert_eq!(ours(), none());
    assert!(!has_clsact(&node, &veth.a), "the agent's own qdisc is gone");
    assert!(has_clsact(&node, "lo"), "someone else's qdisc stays");

    // Renamed while a capture runs: the qdisc the agent made under the old
    // name goes with its filters under the new one.
    rest.start("renamed").await;
    assert!(has_clsact(&node, &veth.a));
    let renamed = "tnrenamed";
    rename(&node, &veth.a, renamed);
    until_found(&first, renamed, 1);
    assert_eq!(
        [
            filters(&node, renamed, "ingress"),
            filters(&node, renamed, "egress")
        ]
        .each_ref()
        .map(|f| names(f)),
        [["tc_ingress"], ["tc_egress"]],
        "one filter on each hook under the new name"
    );
    rest.stop("renamed").await;
    assert!(filters(&node, renamed, "ingress").is_empty());
    assert!(filters(&node, renamed, "egress").is_empty());
    assert!(!has_clsact(&node, renamed), "the agent's own qdisc is gone");
    rename(&node, renamed, &veth.a);
    until_found(&first, &veth.a, 2);

    // A filter someone else put on the agent's qdisc keeps it there.
    rest.start("shared").await;
    let foreign = ["dev", &veth.a, "egress", "protocol", "all", "prio", "1"];
    let u32_match = ["u32", "match", "u32", "0", "0", "flowid", "1:1"];
    run(node
        .command("tc")
        .args(["filter", "add"])
        .args(foreign)
        .args(u32_match));
    rest.stop("shared").await;
    assert_eq!(ours(), none());
    assert!(
        has_clsact(&node, &veth.a),
        "the qdisc holds another's filter"
    );
    let out = run(node
        .command("tc")
        .args(["filter", "show"])
        .args(&foreign[..3]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("u32"),
        "the other filter stays"
    );
    run(node.command("tc").args(["filter", "del"]).args(foreign));

    // A capture runs when the agent dies: its slot stays active in the
    // programs it leaves behind.
    Rest::new(&first).start("before-kill").await;
    let attached = ours();
    assert_eq!(attached.each_ref().map(|f| names(f)), expected);
    first.signal_and_wait(libc::SIGKILL);
    let left = ours();
    assert_eq!(left, attached, "the filters outlive a killed agent");

    // The next agent removes them as it finds the interfaces, capture or not.
    let mut second = AgentProcess::spawn(&node, AGENT, &args, &[]);
    assert_eq!(ours(), none(), "the killed agent's filters are gone");
    let log = second.log();
    for (iface, hook) in [
        (veth.a.as_str(), "ingress"),
        (veth.a.as_str(), "egress"),
        ("lo", "ingress"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("removed a tc filter")
                && l.contains(&format!("iface=\"{iface}\""))
                && l.contains(&format!("hook=\"{hook}\""))),
            "no removal logged for {iface} {hook}:\n{log}"
        );
    }
    let rest = Rest::new(&second);
    rest.start("after-restart").await;
    let now = ours();
    assert_eq!(now.each_ref().map(|f| names(f)), expected, "one copy each");
    for (before, after) in left.iter().zip(&now) {
        assert_ne!(before[0].1, after[0].1, "a program of the new agent");
    }
    // Each packet once: five echo requests out, five replies in.
    run(node
        .command("ping")
        .args(["-c", "5", "-i", "0.1", "-W", "2", "10.96.0.2"]));
    let status = rest.stop("after-restart").await;
    assert_eq!(status["status"], "stopped", "{status}");
    assert_eq!(status["packets"], 10, "{status}");
    let file = Path::new(status["output_file"].as_str().unwrap());
    let mut types = icmp_types(file);
    types.sort();
    assert_eq!(
        types,
        ["0"; 5].into_iter().chain(["8"; 5]).collect::<Vec<_>>()
    );
    assert_eq!(ours(), none(), "the last capture's end detaches");

    // SIGTERM while a capture runs detaches too.
    rest.start("at-exit").await;
    assert_eq!(ours().each_ref().map(|f| names(f)), expected);
    let exit = second.signal_and_wait(libc::SIGTERM);
    assert_eq!(exit.code(), Some(0), "{}", second.log());
    assert_eq!(ours(), none(), "SIGTERM leaves no filter");
}
