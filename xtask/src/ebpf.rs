//! `cargo xtask build-ebpf`: the agent's build script builds the object; this
//! runs it and reports where the object is.

use anyhow::{Context as _, bail};

use crate::util::{cargo, output, step};

pub fn build() -> anyhow::Result<()> {
    step("building packet-capture-agent's build script (compiles the eBPF programs)");
    let out = output(cargo().args([
        "build",
        "--release",
        "--package",
        "packet-capture-agent",
        "--lib",
        "--message-format=json",
    ]))?;
    // cargo's build-script-executed message names the agent's OUT_DIR, where
    // the build script leaves the object.
    let out_dir = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains("packet-capture-agent"))
        })
        .find_map(|m| m["out_dir"].as_str().map(str::to_owned))
        .context("cargo did not report the agent's OUT_DIR")?;
    let object = std::path::Path::new(&out_dir).join("packet-capture");
    let size = std::fs::metadata(&object)
        .with_context(|| format!("no eBPF object at {}", object.display()))?
        .len();
    if size == 0 {
        bail!("{} is empty", object.display());
    }
    println!("{} {size} bytes", object.display());
    Ok(())
}
