//! `cargo xtask cross-check`: the arm64 images' binaries are cross-compiled
//! here with Debian's cross toolchain (there is no Docker engine to build the
//! images), and what comes out is checked: aarch64 executables, and the eBPF
//! object they embed is little-endian BPF (the kernel's byte order on both
//! amd64 and arm64).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};

use crate::util::{cargo, cargo_build, step, target_dir};

/// The Rust target of the arm64 images.
pub const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The binaries the images ship, each its package's: what is built for
/// [`TARGET`]. (kubectl-pcap runs on the user's machine, not in an image;
/// its release build for arm64 would add minutes of whole-program
/// optimisation to `make test`.)
pub const BINARIES: [&str; 2] = ["packet-capture-agent", "packet-capture-controller"];

/// How cargo, cc and pkg-config reach Debian's aarch64 toolchain and the
/// arm64 libpcap (`cargo xtask setup` installs both). The Dockerfile sets the
/// same variables.
pub const ENV: [(&str, &str); 4] = [
    (
        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
        "aarch64-linux-gnu-gcc",
    ),
    ("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc"),
    ("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar"),
    (
        "PKG_CONFIG_aarch64_unknown_linux_gnu",
        "aarch64-linux-gnu-pkg-config",
    ),
];

pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;
const EM_BPF: u16 = 247;

/// The parts of an ELF header that say what it runs on.
#[derive(Debug, PartialEq, Eq)]
pub struct ElfId {
    pub bits64: bool,
    pub little_endian: bool,
    pub machine: u16,
}

pub fn elf_id(path: &Path) -> anyhow::Result<ElfId> {
    let mut header = [0u8; 20];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("reading the ELF header of {}", path.display()))?;
    ensure!(
        header[..4] == *b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    let little_endian = header[5] == 1;
    let machine = [header[18], header[19]];
    Ok(ElfId {
        bits64: header[4] == 2,
        little_endian,
        machine: if little_endian {
            u16::from_le_bytes(machine)
        } else {
            u16::from_be_bytes(machine)
        },
    })
}

/// What a build produced for one target.
#[derive(Debug, Default)]
pub struct Built {
    /// Executable name -> path.
    pub executables: BTreeMap<String, PathBuf>,
    /// The eBPF object the agent embeds.
    pub ebpf_object: Option<PathBuf>,
}

/// One `cargo build --target <t>...` of [`BINARIES`] for each of `targets`
/// (Rust target triples), returned in their order: one cargo for all
/// targets, so that the single-threaded links of one target's binaries can
/// run beside the other's.
///
/// In a target directory of its own, `<target>/cross`: cargo locks a target
/// directory for the whole of a build, and `make test` runs this one, the
/// images' release build, beside the tests of the other.
pub fn build(release: bool, targets: &[&str]) -> anyhow::Result<Vec<Built>> {
    let mut cmd = cargo();
    cmd.env("CARGO_TARGET_DIR", target_dir()?.join("cross"))
        .arg("build")
        .args(BINARIES.iter().flat_map(|b| ["-p", b, "--bin", b]))
        .args(targets.iter().flat_map(|t| ["--target", t]))
        .envs(ENV);
    if release {
        cmd.arg("--release");
    }
    let messages = cargo_build(&mut cmd).with_context(|| {
        format!(
            "building for {}; `cargo xtask setup` installs the {TARGET} target, \
             gcc-aarch64-linux-gnu and libpcap0.8-dev:arm64",
            targets.join(", ")
        )
    })?;
    let mut built: Vec<Built> = targets.iter().map(|_| Built::default()).collect();
    // With `--target`, everything built for a target lies under
    // `<target dir>/<triple>/`.
    let built_for = |path: &str| {
        targets
            .iter()
            .position(|t| Path::new(path).components().any(|c| c.as_os_str() == *t))
    };
    for message in messages {
        match message["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) = (
                    message["target"]["name"].as_str(),
                    message["executable"].as_str(),
                ) && let Some(i) = built_for(exe)
                {
                    built[i].executables.insert(name.to_owned(), exe.into());
                }
            }
            Some("build-script-executed")
                if message["package_id"]
                    .as_str()
                    .is_some_and(|id| id.contains("packet-capture-agent")) =>
            {
                if let Some(dir) = message["out_dir"].as_str()
                    && let Some(i) = built_for(dir)
                {
                    built[i].ebpf_object = Some(Path::new(dir).join("packet-capture"));
                }
            }
            _ => {}
        }
    }
    Ok(built)
}

/// Checks that each of [`BINARIES`] was built as a 64-bit little-endian
/// executable for ELF machine `machine` (`name`), and that the eBPF object is
/// bpfel; returns what it checked, one line each.
pub fn verify(built: &Built, machine: u16, name: &str) -> anyhow::Result<Vec<String>> {
    let mut report = Vec::new();
    for bin in BINARIES {
        let path = built
            .executables
            .get(bin)
            .with_context(|| format!("cargo built no {bin} executable for {name}"))?;
        let id = elf_id(path)?;
        ensure!(
            id == ElfId {
                bits64: true,
                little_endian: true,
                machine
            },
            "{} is {id:?}, not a 64-bit little-endian {name} executable",
            path.display()
        );
        report.push(format!("{bin}: {name} ELF at {}", path.display()));
    }
    let object = built
        .ebpf_object
        .as_ref()
        .context("cargo did not report the agent's build script output (the eBPF object)")?;
    let id = elf_id(object)?;
    ensure!(
        id.machine == EM_BPF && id.little_endian,
        "{} is {id:?}, not little-endian BPF (bpfel)",
        object.display()
    );
    report.push(format!("eBPF object: bpfel ELF at {}", object.display()));
    Ok(report)
}

pub fn run(release: bool) -> anyhow::Result<()> {
    // One `Built` per target asked for.
    let built = build(release, &[TARGET])?.swap_remove(0);
    for line in verify(&built, EM_AARCH64, "aarch64")? {
        step(line);
    }
    step(format!("the arm64 binaries build for {TARGET}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_of_an_elf_file() {
        // The test binary itself: an x86-64 or aarch64 little-endian ELF.
        let me = std::env::current_exe().unwrap();
        let id = elf_id(&me).unwrap();
        assert!(id.bits64 && id.little_endian);
        let expected = if cfg!(target_arch = "x86_64") {
            EM_X86_64
        } else {
            EM_AARCH64
        };
        assert_eq!(id.machine, expected);
        assert!(
            elf_id(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("Cargo.toml")
                    .as_path()
            )
            .is_err()
        );
    }

    #[test]
    fn a_missing_or_foreign_binary_fails_the_check() {
        let err = verify(&Built::default(), EM_AARCH64, "aarch64").unwrap_err();
        assert!(err.to_string().contains("packet-capture-agent"), "{err}");

        let mut built = Built::default();
        for bin in BINARIES {
            built
                .executables
                .insert(bin.into(), std::env::current_exe().unwrap());
        }
        let err = verify(&built, EM_AARCH64, "aarch64").unwrap_err();
        assert!(
            err.to_string()
                .contains("not a 64-bit little-endian aarch64"),
            "{err}"
        );
    }
}
