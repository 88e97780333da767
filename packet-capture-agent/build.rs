//! Builds the eBPF programs with the toolchain pinned in
//! `packet-capture-ebpf/rust-toolchain.toml` and leaves the object in OUT_DIR,
//! where `main` embeds it.

use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // Read at run time: the compiled build script is shared by every checkout
    // that uses the same target directory, so a path baked in at compile time
    // would build another checkout's programs.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../packet-capture-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = pinned_toolchain(
        &fs::read_to_string(&toolchain_file)
            .with_context(|| format!("reading {}", toolchain_file.display()))?,
    )
    .ok_or_else(|| anyhow!("no channel = \"...\" in {}", toolchain_file.display()))?;

    let root_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", ebpf_dir.display()))?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "packet-capture-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed; `make setup` installs the pinned toolchain, rust-src and bpf-linker",
    )
}

/// The `channel = "..."` value of a rust-toolchain.toml.
fn pinned_toolchain(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let value = line
            .trim()
            .strip_prefix("channel")?
            .trim()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}
