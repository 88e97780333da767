//! `cargo xtask setup`: installs what a fresh Debian machine lacks to build
//! and test the project, and skips what is there. Run as root (apt).

use std::process::Command;

use anyhow::{Context as _, bail};

use packet_capture_test_support::cluster::build;

use crate::util::{HELM_VERSION, output, root, run, step};

/// Debian packages, each with why it is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker links eBPF programs with LLVM 22"),
    (
        "libpcap-dev",
        "the agent compiles tcpdump filters and runs its fallback backend with libpcap",
    ),
    ("pkg-config", "finding libpcap"),
    ("iproute2", "network namespaces and veth pairs in tests"),
    ("iputils-ping", "traffic in tests"),
    ("tcpdump", "the oracle the capture tests compare against"),
    ("tshark", "reads every file the agent writes in tests"),
    (
        "wireshark-common",
        "mergecap, which `kubectl pcap fetch`'s merged files are checked against",
    ),
    ("bpftool", "inspecting loaded programs"),
    (
        "iperf3",
        "TCP bulk traffic in `cargo xtask bench` (GSO/GRO super-frames)",
    ),
    (
        "ethtool",
        "turning veth offloads on for the benchmark's TCP run",
    ),
    (
        "zstd",
        "checking zstd-compressed capture files (`zstd -t`) in the benchmark",
    ),
    (
        "fonts-dejavu-core",
        "the font of the benchmark's plots (docs/bench-*.png)",
    ),
    ("curl", "REST calls in tests and the README"),
    ("netcat-openbsd", "TCP and UDP traffic in tests"),
    ("openssl", "certificates of the local control plane"),
    (
        "gcc-aarch64-linux-gnu",
        "cross-linking the arm64 agent and controller (`cargo xtask cross-check`)",
    ),
    (
        "libc6-dev-arm64-cross",
        "the arm64 C library the cross-linker links against",
    ),
    (
        "libpcap0.8-dev:arm64",
        "libpcap for the arm64 agent and controller (needs the arm64 architecture in dpkg)",
    ),
    (
        "buildah",
        "builds the images from the Dockerfile without Docker (`cargo xtask images`)",
    ),
    (
        "mmdebstrap",
        "makes the images' Debian base here when no registry answers",
    ),
    (
        "arch-test",
        "mmdebstrap checks with it that arm64 programs run (under QEMU)",
    ),
    (
        "qemu-user-static",
        "runs arm64 programs: the arm64 images' RUN steps and their --version check",
    ),
    (
        "containerd",
        "the node's container runtime; `cargo xtask images --load` imports into it",
    ),
    ("runc", "the OCI runtime containerd starts containers with"),
    (
        "containernetworking-plugins",
        "pod networking (CNI) for the node's containerd",
    ),
];

/// The foreign architecture whose packages cross-compiling needs.
const FOREIGN_ARCH: &str = "arm64";

/// Rust targets besides the host's: the arm64 images' binaries.
const RUST_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu"];

const BPF_LINKER_VERSION: &str = "0.13";

pub fn install() -> anyhow::Result<()> {
    foreign_architecture()?;
    apt_packages()?;
    go_toolchain()?;
    // On a fresh machine the control plane's Go build is minutes of compiling
    // and the Rust toolchains are mostly downloads: they go side by side.
    let control_plane = std::thread::spawn(control_plane_binaries);
    let rust = rust_components()
        .and_then(|()| rust_targets())
        .and_then(|()| ebpf_toolchain())
        .and_then(|()| bpf_linker());
    let control_plane = control_plane
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    rust.and(control_plane)?;
    step("setup complete");
    Ok(())
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        step(format!("installing {p}: {why}"));
    }
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    apt(&["update", "-q"]).context("apt-get update failed (are you root?)")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args).with_context(|| format!("could not install {}", missing.join(" ")))?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!(
            "these packages are still missing after apt-get: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// `dpkg --add-architecture arm64`, so that apt can install arm64 libraries
/// next to the host's.
fn foreign_architecture() -> anyhow::Result<()> {
    let have = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if have.lines().any(|a| a.trim() == FOREIGN_ARCH) {
        return Ok(());
    }
    step(format!(
        "dpkg --add-architecture {FOREIGN_ARCH}: arm64 libraries for cross-compiling"
    ));
    run(Command::new("dpkg").args(["--add-architecture", FOREIGN_ARCH]))
        .context("dpkg --add-architecture failed (are you root?)")
}

fn rust_targets() -> anyhow::Result<()> {
    let have = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    for target in RUST_TARGETS {
        if have.lines().any(|l| l.trim() == *target) {
            continue;
        }
        step(format!(
            "rustup target add {target}: the arm64 images' binaries"
        ));
        run(Command::new("rustup").args(["target", "add", target]))
            .with_context(|| format!("could not add the {target} target"))?;
    }
    Ok(())
}

/// kube-apiserver, kube-controller-manager, kubectl, etcd and helm, built
/// from Go modules into the cache (minutes the first time, nothing after).
fn control_plane_binaries() -> anyhow::Result<()> {
    let binaries = build::ensure().context("could not build the local control plane's binaries")?;
    step(format!(
        "control plane binaries and helm {HELM_VERSION}: {}",
        binaries.dir().display()
    ));
    Ok(())
}

fn rust_components() -> anyhow::Result<()> {
    let have = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    for component in ["clippy", "rustfmt"] {
        if have.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        step(format!("rustup component add {component}"));
        run(Command::new("rustup").args(["component", "add", component]))
            .with_context(|| format!("could not install the {component} component"))?;
    }
    Ok(())
}

/// The toolchain pinned in packet-capture-ebpf/rust-toolchain.toml, with the
/// components it lists; rustup skips what is installed.
fn ebpf_toolchain() -> anyhow::Result<()> {
    step("eBPF toolchain pinned in packet-capture-ebpf/rust-toolchain.toml");
    run(Command::new("rustup")
        .args(["toolchain", "install"])
        .current_dir(root().join("packet-capture-ebpf"))
        // cargo sets RUSTUP_TOOLCHAIN for xtask; the file must decide.
        .env_remove("RUSTUP_TOOLCHAIN"))
    .context("could not install the pinned eBPF toolchain and its components")
}

fn bpf_linker() -> anyhow::Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.contains(&format!(" {BPF_LINKER_VERSION}.")) {
        step(format!("{}: present", current.trim()));
        return Ok(());
    }
    step(format!(
        "building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM 22 (a few minutes)"
    ));
    run(Command::new(env!("CARGO"))
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
    .context("could not build bpf-linker (needs llvm-22-dev)")
}

/// The local control plane (tests, `cargo xtask cluster`) is built from Go
/// modules on first use; setup only checks that a new enough Go is there
/// (Debian's golang is too old; the machine image ships a current one).
fn go_toolchain() -> anyhow::Result<()> {
    let (major, minor) = build::MIN_GO;
    let Some(go) = build::find_go() else {
        bail!(
            "Go {major}.{minor} or newer is needed to build the local control plane \
             (kube-apiserver, etcd) and was not found on PATH or in /usr/local/go/bin"
        );
    };
    let version = output(Command::new(&go).arg("version"))?;
    match build::go_version(&version) {
        Some(v) if v >= build::MIN_GO => {
            step(format!("{}: present", version.trim()));
            Ok(())
        }
        _ => bail!(
            "{} is too old: the local control plane needs Go {major}.{minor} or newer",
            version.trim()
        ),
    }
}
