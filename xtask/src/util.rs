//! Paths and process helpers shared by the tasks.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The workspace root (xtask's parent).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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

/// `$XDG_CACHE_HOME/packet-capture` or `~/.cache/packet-capture`: where
/// built tools are kept between runs.
pub fn cache_root() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .context("neither XDG_CACHE_HOME nor HOME is set")?,
    };
    Ok(base.join("packet-capture"))
}

/// The Helm version `cargo xtask setup` builds; `cargo xtask manifests`
/// renders the committed manifests with it.
pub const HELM_VERSION: &str = "v3.20.2";

/// Where `cargo xtask setup` installs Helm.
pub fn cached_helm() -> anyhow::Result<PathBuf> {
    Ok(cache_root()?
        .join(format!("helm-{HELM_VERSION}"))
        .join("helm"))
}

/// The `helm` to use: `$HELM`, else `helm` on PATH, else the one
/// `cargo xtask setup` built.
pub fn helm() -> anyhow::Result<PathBuf> {
    if let Some(helm) = std::env::var_os("HELM").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(helm));
    }
    if let Some(helm) = on_path("helm") {
        return Ok(helm);
    }
    let cached = cached_helm()?;
    if cached.is_file() {
        return Ok(cached);
    }
    bail!(
        "helm not found: set HELM, put helm on PATH, or run `cargo xtask setup` (builds Helm {HELM_VERSION} into {})",
        cached.display()
    )
}

/// The executable `tool` on PATH, if any.
pub fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
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
