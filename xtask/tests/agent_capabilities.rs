//! The agent's capabilities in the chart (`agent.capabilities` in
//! charts/packet-capture/values.yaml) are enough to load the agent's eBPF
//! programs and attach them to an interface, and the ones the eBPF backend
//! relies on are each needed: a child process of this test runs with exactly
//! a given capability set (setpriv, in its own network namespace) and does
//! what the agent does at start.

use std::path::Path;
use std::process::{Command, Output};

use packet_capture_agent::ebpf::{Kernel, LinkKind};
use packet_capture_test_support::{on_path, privileged};

/// The capability set a child runs with, as `CAP_A,CAP_B`.
const CHILD_CAPS: &str = "PACKET_CAPTURE_CHILD_CAPS";
const CHILD_TEST: &str = "child_loads_and_attaches";

/// Capability numbers (linux/capability.h) of the names the chart may use.
fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("no number for capability {other}"),
    }
}

fn chart_capabilities() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/packet-capture/values.yaml");
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    values["agent"]["capabilities"]
        .as_sequence()
        .expect("agent.capabilities in values.yaml")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_owned())
        .collect()
}

/// Runs [`CHILD_TEST`] in a new network namespace with exactly `caps`.
fn child(caps: &[&str]) -> Output {
    let bounding: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    let exe = std::env::current_exe().unwrap();
    Command::new("unshare")
        .args(["--net", "--", "setpriv"])
        .arg(format!("--bounding-set=-all{bounding}"))
        .args(["--inh-caps=-all", "--"])
        .arg(exe)
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .env(CHILD_CAPS, caps.join(","))
        .output()
        .expect("starting the child under unshare and setpriv")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What the agent does at start, with the capabilities it was given.
#[test]
#[ignore = "run by the tests below in a child process with reduced capabilities"]
fn child_loads_and_attaches() {
    let caps = std::env::var(CHILD_CAPS).expect("started by the parent test");
    // The process holds exactly the capabilities it was given.
    let want: u64 = caps
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| 1u64 << cap_number(c))
        .sum();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let have = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        have, want,
        "effective capabilities {have:#x}, expected {want:#x} ({caps})"
    );
    let (mut kernel, _ring) =
        Kernel::load(1 << 16).unwrap_or_else(|e| panic!("LOAD FAILED: {e:?}"));
    kernel
        .attach("lo", LinkKind::Loopback)
        .unwrap_or_else(|e| panic!("ATTACH FAILED: {e:?}"));
    assert_eq!(kernel.attached().collect::<Vec<_>>(), ["lo"]);
    println!("CHILD OK with {caps}");
}

fn ready(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    for tool in ["unshare", "setpriv"] {
        assert!(on_path(tool), "{test} needs {tool} (util-linux)");
    }
    true
}

#[test]
fn the_charts_capabilities_load_and_attach_the_programs() {
    if !ready("the_charts_capabilities_load_and_attach_the_programs") {
        return;
    }
    let caps = chart_capabilities();
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN"),
        "the agent must not need CAP_SYS_ADMIN"
    );
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let out = child(&caps);
    let log = text(&out);
    assert!(
        out.status.success() && log.contains("CHILD OK"),
        "with {caps:?}:\n{log}"
    );
}

#[test]
fn each_ebpf_capability_is_needed() {
    if !ready("each_ebpf_capability_is_needed") {
        return;
    }
    let caps = chart_capabilities();
    // NET_RAW is for the libpcap fallback; the eBPF backend needs the rest.
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
        let out = child(&fewer);
        let log = text(&out);
        assert!(
            !out.status.success(),
            "loaded and attached without {missing}:\n{log}"
        );
        assert!(
            (log.contains("LOAD FAILED") || log.contains("ATTACH FAILED"))
                && (log.contains("Operation not permitted") || log.contains("os error 1")),
            "without {missing} the child failed for another reason than a permission:\n{log}"
        );
    }
}
