//! Builds the eBPF programs with the toolchain pinned in
//! `packet-capture-ebpf/rust-toolchain.toml` and leaves the object in OUT_DIR,
//! where `main` embeds it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail, ensure};

/// The programs' package, and its binary: the object the agent embeds, under
/// the same name in OUT_DIR.
const PROGRAMS: &str = "packet-capture-ebpf";
const OBJECT: &str = "packet-capture";

fn main() -> anyhow::Result<()> {
    // Read at run time: the compiled build script is shared by every checkout
    // that uses the same target directory, so a path baked in at compile time
    // would build another checkout's programs.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .join("../packet-capture-ebpf")
        .canonicalize()
        .context("resolving ../packet-capture-ebpf")?;
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    // The build dependency on the programs' package covers its library; the
    // binaries are what is embedded.
    println!("cargo::rerun-if-changed={}", ebpf_dir.display());
    let toolchain = pinned_toolchain(
        &fs::read_to_string(&toolchain_file)
            .with_context(|| format!("reading {}", toolchain_file.display()))?,
    )
    .ok_or_else(|| anyhow!("no channel = \"...\" in {}", toolchain_file.display()))?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let built = build_programs(&ebpf_dir, &toolchain, &out_dir).context(
        "building the eBPF programs failed; `make setup` installs the pinned toolchain, rust-src and bpf-linker",
    )?;
    let object = out_dir.join(OBJECT);
    fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    strip_dwarf(&object)
}

/// `cargo build` of the programs for bpfel with the pinned toolchain;
/// returns the path of the linked object.
///
/// Its target directory is one per profile directory of the outer build
/// (`<target>/[<triple>/]<profile>/ebpf`), not one per OUT_DIR: every build of
/// the agent with other features, or for clippy, gets a new OUT_DIR, and in
/// its own target directory each would compile `core` for BPF again. cargo
/// locks the shared one while it builds.
fn build_programs(ebpf_dir: &Path, toolchain: &str, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN")?;
    ensure!(
        endian == "little",
        "the programs are built for bpfel, the byte order of the agent's targets; \
         this target is {endian}-endian"
    );
    // aya-ebpf's architecture-dependent definitions follow the machine the
    // agent runs on.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = out_dir
        .ancestors()
        .nth(3)
        .with_context(|| {
            format!(
                "OUT_DIR {} is not <profile>/build/<pkg>/out",
                out_dir.display()
            )
        })?
        .join("ebpf");
    let output = Command::new("rustup")
        .args(["run", toolchain, "cargo", "build", "--package", PROGRAMS])
        .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--message-format=json"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(ebpf_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler is not the pinned one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .context("running rustup (is it on PATH?)")?;
    // cargo's progress and the compiler's messages, shown by the outer cargo.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo::warning={line}");
    }
    if !output.status.success() {
        bail!("cargo build of {PROGRAMS} failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == OBJECT)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo named no {OBJECT} executable of {PROGRAMS}"))
}

/// Removes the DWARF sections from the object at `path`, keeping its BTF.
///
/// The programs are built with full debug information because the linker
/// makes their BTF (which the loader and the verifier use) from it; the
/// DWARF itself is more than 80 % of the object, which the agent embeds and
/// the loader reads through at start, where it would only cost memory.
fn strip_dwarf(path: &Path) -> anyhow::Result<()> {
    use object::build::elf::{Builder, SectionData};
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut elf = Builder::read(&*data).context("reading the eBPF object")?;
    for section in elf.sections.iter_mut() {
        if section.name.as_slice().starts_with(b".debug") {
            section.delete = true;
        }
    }
    // The relocations of what went, which name it in sh_info.
    let gone: Vec<_> = elf
        .sections
        .iter()
        .filter(|s| {
            s.sh_info_section
                .is_some_and(|target| elf.sections.get(target).delete)
        })
        .map(|s| s.id())
        .collect();
    for id in gone {
        elf.sections.get_mut(id).delete = true;
    }
    elf.delete_orphans();
    // The linker keeps section and symbol names in one table, which the
    // writer takes as the symbols'; section names get their own.
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = SectionData::SectionString;
    }
    let mut stripped = Vec::new();
    elf.write(&mut stripped)
        .context("writing the eBPF object without DWARF")?;
    fs::write(path, stripped).with_context(|| format!("writing {}", path.display()))
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
