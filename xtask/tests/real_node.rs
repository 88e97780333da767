//! Real nodes of the local control plane as users meet them: `cargo xtask
//! cluster up --real-node`, and `cluster down` after a crashed run.

use std::path::Path;
use std::process::Command;

use packet_capture_test_support::privileged;
use serde_json::{Value, json};

const WAIT: &str = "--timeout=180s";

/// Runs a command that must succeed; its stdout.
fn output(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&packet_capture_test_support::netns::run(cmd).stdout).into_owned()
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
