//! What the privileged tests share: a guard for the prerequisites, network
//! namespaces joined by veth pairs, commands run inside them, and a local
//! Kubernetes control plane with simulated nodes and pods ([`cluster`]).
//!
//! Every namespace and link is named after the test process, and removed on
//! drop, so a failed test leaves nothing behind and tests can run side by side.

pub mod agent;
pub mod capfile;
pub mod cluster;
pub mod frames;
pub mod fs_events;
pub mod netns;
pub mod tcpdump;
pub mod tools;

pub use agent::AgentProcess;
pub use netns::{Netns, VethPair};
pub use tcpdump::Tcpdump;

/// Checks that the test can use root, BPF and network namespaces.
///
/// In CI (`CI=true`) a missing prerequisite fails the test. On a developer
/// machine the test is skipped with a line that says so, and `false` tells
/// the caller to return.
#[must_use]
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "tcpdump", "tshark", "ping"]
        .iter()
        .filter(|t| !on_path(t))
        .copied()
        .collect::<Vec<_>>();
    let problem = match (root, tools.is_empty()) {
        (true, true) => return true,
        (false, _) => "needs root (CAP_BPF, CAP_NET_ADMIN, network namespaces)".to_string(),
        (true, false) => format!("needs {} on PATH (`make setup`)", tools.join(", ")),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: {problem}");
    }
    eprintln!("SKIPPED {test}: {problem} (this is a failure when CI=true)");
    false
}

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// A short name unique to this process and call: `<prefix><pid>x<n>`, short
/// enough for an interface name (15 bytes).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id());
    assert!(name.len() <= 15, "name {name} is too long for an interface");
    name
}

/// A binary of another package of the workspace, as cargo built it beside
/// the running test (`target/<profile>/<name>`); a test only gets its own
/// package's binaries from `CARGO_BIN_EXE_<name>`. `cargo test --workspace`
/// builds every package's binaries before it runs a test; to test one
/// package, build the other first (`cargo build -p <package>`). Panics
/// with that command when the binary is missing or older than a file in
/// `sources` (directories relative to the workspace root), so a test never
/// runs a stale build.
pub fn workspace_binary(name: &str, package: &str, sources: &[&str]) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("a test binary in target/<profile>/deps");
    let binary = profile_dir.join(name);
    let build = format!("cargo build -p {package}");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: run `{build}` first", binary.display()));
    let root = cluster::workspace_root();
    for dir in sources {
        if let Some((path, _)) = newest_file(&root.join(dir)).filter(|(_, t)| *t > built) {
            panic!(
                "{} is older than {}: run `{build}` first",
                binary.display(),
                path.display()
            );
        }
    }
    binary
}

/// The most recently modified file under `dir`.
fn newest_file(dir: &std::path::Path) -> Option<(std::path::PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(std::path::PathBuf, std::time::SystemTime)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (path, t))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.1 > n.1)
        {
            newest = Some(c);
        }
    }
    newest
}
