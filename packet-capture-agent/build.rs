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
    )?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    strip_dwarf(&Path::new(&out_dir).join("packet-capture"))
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
