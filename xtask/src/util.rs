//! Paths and process helpers shared by the tasks.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    packet_capture_test_support::cluster::workspace_root()
}

/// cargo, in the workspace root, without the variables `cargo run` set for
/// xtask itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): build scripts
/// that read them (ring's) would otherwise see them change between this
/// build and a plain `cargo build`, and each would rebuild what the other
/// built.
pub fn cargo() -> Command {
    const SET_BY_CARGO_RUN: [&str; 6] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "OUT_DIR",
    ];
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root());
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if SET_BY_CARGO_RUN.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// cargo's target directory: `$CARGO_TARGET_DIR`, else `target/` in the root.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let meta = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("cargo metadata output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// Runs `cmd`, a `cargo build`, with its diagnostics rendered on stderr, and
/// returns cargo's JSON messages (artifacts, build scripts).
pub fn cargo_build(cmd: &mut Command) -> anyhow::Result<Vec<serde_json::Value>> {
    cmd.arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    step(format!("{cmd:?}"));
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("cargo build failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Runs a command, inheriting stdio; fails naming the command.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails with its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints a step the way every task does.
pub fn step(msg: impl std::fmt::Display) {
    eprintln!("==> {msg}");
}

pub use packet_capture_test_support::cluster::build::HELM_VERSION;

/// The `helm` to use: `$HELM`, else the one built for the local control
/// plane (`cargo xtask setup` builds it).
pub fn helm() -> anyhow::Result<PathBuf> {
    if let Some(helm) = std::env::var_os("HELM").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(helm));
    }
    Ok(packet_capture_test_support::cluster::build::ensure()?.path("helm"))
}

/// Brings each generated file (path relative to the root, contents) up to
/// date; with `check`, fails naming the files that differ from `source` and
/// the `command` that regenerates them.
pub fn sync_generated<'a>(
    files: impl IntoIterator<Item = (&'a str, String)>,
    check: bool,
    source: &str,
    command: &str,
) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    for (rel, contents) in files {
        let path = root().join(rel);
        if std::fs::read_to_string(&path).is_ok_and(|current| current == contents) {
            continue;
        }
        if check {
            stale.push(rel);
        } else {
            std::fs::create_dir_all(path.parent().expect("a file is in a directory"))?;
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
            step(format!("wrote {rel}"));
        }
    }
    if !stale.is_empty() {
        bail!(
            "{} differ from {source}; run `{command}` and commit",
            stale.join(", ")
        );
    }
    if check {
        step(format!("up to date with {source}"));
    }
    Ok(())
}
