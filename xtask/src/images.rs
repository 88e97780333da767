//! `cargo xtask images`: the agent and controller images built here without
//! Docker, from the same Dockerfile as `make images`, with buildah.
//!
//! The binaries are built on the host (arm64 with `cargo xtask cross-check`'s
//! cross toolchain) and reach the Dockerfile through its `BINARIES=prebuilt`
//! stage; the runtime stages run as written, the arm64 ones under QEMU user
//! emulation. The base image, `debian:bookworm-slim`, is pulled when a
//! registry answers and otherwise made here with mmdebstrap. Each image ends
//! up as an OCI archive holding a multi-arch index, under
//! `<target>/images/packet-capture-<component>.oci.tar`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use packet_capture_test_support::cluster::import_image;
use packet_capture_test_support::{on_path, tools::cache_dir};

use crate::cross;
use crate::util::{output, root, run, step, target_dir};

/// The images, by the Dockerfile stage that builds each.
pub const COMPONENTS: [&str; 2] = ["agent", "controller"];

/// Where the images are named when `--registry` and `IMAGE_REGISTRY` are not
/// given: nothing is pushed from here.
pub const DEFAULT_REGISTRY: &str = "localhost/packet-capture";

/// The runtime stages' base, as the Dockerfile names it
/// (`FROM debian:${DEBIAN_RELEASE}-slim`, DEBIAN_RELEASE=bookworm) and as
/// buildah resolves that name.
pub const DEBIAN_RELEASE: &str = "bookworm";
pub const BASE_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Also import the images (and the base image the tests' pods run) into
    /// containerd's k8s.io namespace (the CRI's) of every real node of the
    /// local cluster `--cluster`, or of the containerd at
    /// `--containerd-address`.
    #[arg(long)]
    pub load: bool,
    /// The local cluster whose real nodes `--load` imports into
    /// (`cargo xtask cluster up --real-node`).
    #[arg(long, default_value = crate::cluster::DEFAULT_NAME)]
    pub cluster: String,
    /// A containerd socket to import into instead of the cluster's nodes,
    /// e.g. /run/containerd/containerd.sock.
    #[arg(long)]
    pub containerd_address: Option<PathBuf>,
    /// The platforms of each image.
    #[arg(long, value_delimiter = ',', default_value = "linux/amd64,linux/arm64")]
    pub platforms: Vec<String>,
    /// Images are <registry>/packet-capture-{agent,controller}:<tag>.
    #[arg(long, env = "IMAGE_REGISTRY", default_value = DEFAULT_REGISTRY)]
    pub registry: String,
    /// The image tag and the images' org.opencontainers.image.version.
    #[arg(long, env = "TAG", default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Only build the release binaries the images take, for each platform,
    /// into `<target>/images/bin/<arch>/`, and stop.
    #[arg(long, conflicts_with = "load")]
    pub binaries_only: bool,
    /// buildah's storage driver; `vfs` where overlay mounts are not allowed
    /// (slower, and it takes several times the disk space).
    #[arg(long, default_value = "overlay")]
    pub storage_driver: String,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            load: false,
            binaries_only: false,
            cluster: crate::cluster::DEFAULT_NAME.into(),
            containerd_address: None,
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
            registry: DEFAULT_REGISTRY.into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            storage_driver: "overlay".into(),
        }
    }
}

/// An architecture the images are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn from_platform(platform: &str) -> anyhow::Result<Arch> {
        match platform {
            "linux/amd64" => Ok(Arch::Amd64),
            "linux/arm64" | "linux/arm64/v8" => Ok(Arch::Arm64),
            _ => bail!("unsupported platform {platform}: linux/amd64 and linux/arm64 are"),
        }
    }

    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// Debian's and the OCI's name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    pub fn platform(self) -> String {
        format!("linux/{}", self.name())
    }

    /// QEMU's name (`qemu-<name>-static`, binfmt_misc's `qemu-<name>`).
    fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The Rust target its binaries are built for.
    fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => cross::TARGET,
        }
    }

    /// The ELF e_machine of its executables.
    fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => cross::EM_X86_64,
            Arch::Arm64 => cross::EM_AARCH64,
        }
    }
}

/// An image as built: its name, its OCI archive, and what its binary
/// answered to `--version` on each platform.
#[derive(Debug, Clone)]
pub struct Image {
    pub component: &'static str,
    pub name: String,
    pub archive: PathBuf,
    pub versions: Vec<(String, String)>,
}

/// buildah with this project's storage: under the cache directory, so the
/// base images and the layers of the runtime stage survive between runs.
pub struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
    driver: String,
}

impl Buildah {
    pub fn new(driver: &str) -> Buildah {
        Buildah {
            root: cache_dir().join("buildah").join(driver),
            runroot: PathBuf::from("/run/packet-capture/buildah").join(driver),
            driver: driver.to_owned(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", &self.driver]);
        cmd
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        output(self.cmd().args(args))
    }

    fn has_image(&self, name: &str) -> bool {
        self.run(&["inspect", "--type", "image", name]).is_ok()
    }
}

/// The architectures of `--platforms`.
fn architectures(args: &Args) -> anyhow::Result<Vec<Arch>> {
    let arches = args
        .platforms
        .iter()
        .map(|p| Arch::from_platform(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(!arches.is_empty(), "no platforms");
    Ok(arches)
}

/// Everything up to the archives; `run` adds the report and `--load`.
pub fn build(args: &Args) -> anyhow::Result<Vec<Image>> {
    let arches = architectures(args)?;
    prerequisites(&arches, args.load)?;
    for &arch in &arches {
        if arch != Arch::host() {
            binfmt(arch)?;
        }
    }
    let bin_dir = binaries(&arches)?;
    let buildah = Buildah::new(&args.storage_driver);
    let names = COMPONENTS.map(|c| format!("{}/packet-capture-{c}:{}", args.registry, args.tag));
    forget(&buildah, &[BASE_IMAGE, &names[0], &names[1]])?;
    let base_changed = base_images(&buildah, &arches)?;
    // The base image too, for pods of the tests (`load_base`).
    let base_archive = base_archive()?;
    if base_changed || !base_archive.exists() {
        push(&buildah, BASE_IMAGE, &base_archive)?;
    }
    let revision = output(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(root()),
    )
    .map(|r| r.trim().to_owned())
    .unwrap_or_else(|_| "unknown".into());
    let platforms = arches
        .iter()
        .map(|a| a.platform())
        .collect::<Vec<_>>()
        .join(",");
    // `buildah bud` of the Dockerfile, cached layer by layer in the storage.
    // `--tag <name>` or `--manifest <list>` names the result.
    let bud = |platforms: &str, target: &str, name: [&str; 2]| {
        let mut cmd = buildah.cmd();
        cmd.args(["bud", "--isolation", "chroot", "--layers", "--pull=false"])
            .args(["--platform", platforms, "--target", target])
            .args(name)
            .args(["--build-arg", "BINARIES=prebuilt"])
            .arg("--build-context")
            .arg(format!("bin={}", bin_dir.display()))
            .args(["--build-arg", &format!("VERSION={}", args.tag)])
            .args(["--build-arg", &format!("REVISION={revision}")])
            .arg("-f")
            .arg(root().join("Dockerfile"))
            .arg(root());
        cmd
    };
    // The runtime stage (the base and its apt-get layer) under a name, so
    // that it stays cached when `forget` drops what was built on it.
    for &arch in &arches {
        step(format!("the runtime stage for {}", arch.platform()));
        run(&mut bud(
            &arch.platform(),
            "runtime",
            ["--tag", &runtime(arch)],
        ))?;
    }
    let out = output_dir()?;
    let mut images = Vec::new();
    for (component, name) in COMPONENTS.into_iter().zip(names) {
        step(format!("building {name} for {platforms}"));
        run(&mut bud(&platforms, component, ["--manifest", &name]))?;
        let mut versions = Vec::new();
        for &arch in &arches {
            let version = run_version(&buildah, &name, component, arch)?;
            step(format!("{name} ({}): {version}", arch.platform()));
            versions.push((arch.platform(), version));
        }
        let archive = out.join(format!("packet-capture-{component}.oci.tar"));
        push(&buildah, &name, &archive)?;
        // buildah 1.28's `images` fails on a local list; the archive has it.
        buildah.run(&["manifest", "rm", &name])?;
        images.push(Image {
            component,
            name,
            archive,
            versions,
        });
    }
    let _ = buildah.run(&["manifest", "rm", BASE_IMAGE]);
    Ok(images)
}

/// Writes the manifest list `name` with its images to an OCI archive.
fn push(buildah: &Buildah, name: &str, archive: &Path) -> anyhow::Result<()> {
    if archive.exists() {
        fs::remove_file(archive)?;
    }
    buildah.run(&[
        "manifest",
        "push",
        "--all",
        "--quiet",
        name,
        &format!("oci-archive:{}:{name}", archive.display()),
    ])?;
    Ok(())
}

/// The runtime stages' base image as an archive (`build` writes it).
pub fn base_archive() -> anyhow::Result<PathBuf> {
    Ok(output_dir()?.join(format!("debian-{DEBIAN_RELEASE}-slim.oci.tar")))
}

/// `<target>/images`: the binaries (`bin/<arch>/`) and the archives.
fn output_dir() -> anyhow::Result<PathBuf> {
    Ok(target_dir()?.join("images"))
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    if args.binaries_only {
        return binaries(&architectures(&args)?).map(drop);
    }
    let start = Instant::now();
    let images = build(&args)?;
    for image in &images {
        for line in describe(image)? {
            println!("{line}");
        }
    }
    if args.load {
        for socket in load_targets(&args)? {
            load(&images, &socket)?;
            load_base(&socket)?;
        }
    }
    step(format!(
        "images built in {:.0} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The containerd sockets `--load` imports into.
fn load_targets(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(socket) = &args.containerd_address {
        return Ok(vec![socket.clone()]);
    }
    let name = &args.cluster;
    let status = packet_capture_test_support::cluster::status(name)?.with_context(|| {
        format!(
            "--load: there is no local cluster {name}; start one with \
             `cargo xtask cluster up --name {name} --real-node`, or name a containerd \
             with --containerd-address"
        )
    })?;
    ensure!(
        !status.containerd_sockets.is_empty(),
        "--load: the local cluster {name} has no real node (`cargo xtask cluster up --real-node`)"
    );
    Ok(status.containerd_sockets)
}

/// `ctr -n k8s.io images import` of each archive: the CRI then has the
/// images under their names (the node's platform is unpacked).
pub fn load(images: &[Image], containerd: &Path) -> anyhow::Result<()> {
    for image in images {
        step(format!(
            "importing {} into containerd at {}",
            image.name,
            containerd.display()
        ));
        import_image(containerd, &image.archive)?;
    }
    Ok(())
}

/// Imports the base image (`debian:bookworm-slim`, as `build` left it in
/// [`base_archive`]) like [`load`]: for pods that run it.
pub fn load_base(containerd: &Path) -> anyhow::Result<()> {
    let archive = base_archive()?;
    ensure!(
        archive.is_file(),
        "{} is missing: `cargo xtask images` writes it",
        archive.display()
    );
    load(
        &[Image {
            component: "base",
            name: BASE_IMAGE.into(),
            archive,
            versions: Vec::new(),
        }],
        containerd,
    )
}

fn prerequisites(arches: &[Arch], load: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "cargo xtask images runs as root (buildah's chroot builds, mmdebstrap, binfmt_misc)"
    );
    let mut tools = vec!["buildah".to_owned(), "mmdebstrap".to_owned()];
    for arch in arches.iter().filter(|&&a| a != Arch::host()) {
        tools.push(format!("qemu-{}-static", arch.qemu()));
    }
    if load {
        tools.push("ctr".to_owned());
    }
    let missing: Vec<String> = tools.into_iter().filter(|t| !on_path(t)).collect();
    ensure!(
        missing.is_empty(),
        "{} not found: `make setup` installs buildah, mmdebstrap, qemu-user-static and containerd",
        missing.join(", ")
    );
    Ok(())
}

/// The arm64 images' `RUN` steps and mmdebstrap's arm64 package scripts run
/// arm64 programs: the kernel hands them to qemu-<arch>-static once it is
/// registered with binfmt_misc, as qemu-user-static describes it in
/// /usr/share/binfmts (what `update-binfmts --enable` would register).
fn binfmt(arch: Arch) -> anyhow::Result<()> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let entry = dir.join(format!("qemu-{}", arch.qemu()));
    if fs::read_to_string(&entry).is_ok_and(|s| s.starts_with("enabled")) {
        return Ok(());
    }
    if !dir.join("register").exists() {
        step("mounting binfmt_misc on /proc/sys/fs/binfmt_misc");
        run(Command::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc"])
            .arg(dir))?;
    }
    if entry.exists() {
        step(format!("enabling {}", entry.display()));
        return fs::write(&entry, "1").with_context(|| format!("enabling {}", entry.display()));
    }
    let spec = Path::new("/usr/share/binfmts").join(format!("qemu-{}", arch.qemu()));
    let spec = fs::read_to_string(&spec)
        .with_context(|| format!("reading {} (qemu-user-static)", spec.display()))?;
    let field = |key: &str| {
        spec.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .with_context(|| format!("no {key} in qemu-user-static's binfmt description"))
    };
    let interpreter = field("interpreter")?;
    // F: the kernel opens the interpreter now, so it works inside the build's
    // chroot; P: argv[0] is kept (the -binfmt-P interpreter expects it).
    let line = format!(
        ":qemu-{}:M:{}:{}:{}:{interpreter}:FP",
        arch.qemu(),
        field("offset")?,
        field("magic")?,
        field("mask")?
    );
    step(format!(
        "registering qemu-{} with binfmt_misc: {} programs run under {interpreter}",
        arch.qemu(),
        arch.name()
    ));
    fs::write(dir.join("register"), line)
        .with_context(|| format!("registering qemu-{} with binfmt_misc", arch.qemu()))
}

/// Release builds of the agent and the controller for each of `arches`,
/// copied into `<target>/images/bin/<arch>/`; returns that `bin` directory
/// (the Dockerfile's `bin` context). The build of `cargo xtask cross-check
/// --release`, so that its arm64 build after this one has nothing left to
/// do.
fn binaries(arches: &[Arch]) -> anyhow::Result<PathBuf> {
    if let Some(foreign) = arches
        .iter()
        .find(|&&a| a != Arch::host() && a != Arch::Arm64)
    {
        bail!(
            "building for {} on this host is not supported",
            foreign.name()
        );
    }
    let targets: Vec<&str> = arches.iter().map(|a| a.rust_target()).collect();
    let built = cross::build(true, &targets)?;
    let bin_dir = output_dir()?.join("bin");
    for (&arch, built) in arches.iter().zip(built) {
        for line in cross::verify(&built, arch.elf_machine(), arch.qemu())? {
            step(line);
        }
        let dir = bin_dir.join(arch.name());
        fs::create_dir_all(&dir)?;
        for bin in cross::BINARIES {
            let path = &built.executables[bin];
            fs::copy(path, dir.join(bin))
                .with_context(|| format!("copying {} to {}", path.display(), dir.display()))?;
        }
        step(format!("{} binaries in {}", arch.name(), dir.display()));
    }
    Ok(bin_dir)
}

/// Drops cached images the build must not reuse, or that would pile up.
/// buildah 1.28 keys its cache of a LABEL step on the text before the build
/// arguments are substituted: a cached step would keep the version and
/// revision of the build that made it. So every cached image from the
/// `labelled` stage on goes (they carry the label; rebuilding them takes
/// seconds), and every unnamed one older than a day (the stages of earlier
/// binaries). The base and runtime images have names and stay.
fn forget(buildah: &Buildah, lists: &[&str]) -> anyhow::Result<()> {
    // buildah 1.28 cannot list images while a manifest list is stored; an
    // interrupted run can leave these.
    for list in lists {
        let _ = buildah.run(&["manifest", "rm", list]);
    }
    let list = |filter: &str| {
        buildah.run(&[
            "images",
            "--all",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Name}}",
            "--filter",
            filter,
        ])
    };
    let listed = list("label=org.opencontainers.image.revision")? + &list("until=24h")?;
    let mut unnamed: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, name)| name.trim() == "<none>")
        .map(|(id, _)| id)
        .collect();
    unnamed.sort_unstable();
    unnamed.dedup();
    if !unnamed.is_empty() {
        let mut rmi = vec!["rmi", "--force"];
        rmi.extend(&unnamed);
        buildah.run(&rmi)?;
    }
    Ok(())
}

/// The name of the runtime stage's image for one architecture.
fn runtime(arch: Arch) -> String {
    format!(
        "{DEFAULT_REGISTRY}/runtime:{DEBIAN_RELEASE}-{}",
        arch.name()
    )
}

/// The local image of `debian:bookworm-slim` for one architecture.
fn local_base(arch: Arch) -> String {
    format!(
        "localhost/packet-capture/debian:{DEBIAN_RELEASE}-slim-{}",
        arch.name()
    )
}

/// Makes `debian:bookworm-slim` resolve, for each platform, to an image in
/// the local storage: pulled when a registry answers, else made from a
/// Debian root file system. The name the Dockerfile uses becomes a local
/// manifest list of the per-architecture images. Returns whether an image
/// was pulled or made.
fn base_images(buildah: &Buildah, arches: &[Arch]) -> anyhow::Result<bool> {
    let mut changed = false;
    for &arch in arches {
        let local = local_base(arch);
        if buildah.has_image(&local) {
            continue;
        }
        let platform = arch.platform();
        let pulled = buildah.run(&[
            "pull",
            "--quiet",
            "--retry",
            "0",
            "--platform",
            &platform,
            BASE_IMAGE,
        ]);
        let id = match pulled {
            Ok(id) => id.trim().to_owned(),
            Err(e) => {
                step(format!(
                    "cannot pull {BASE_IMAGE} for {platform} ({}); making it here",
                    e.to_string().lines().last().unwrap_or_default().trim()
                ));
                import_rootfs(buildah, arch, &rootfs(arch)?)?
            }
        };
        buildah.run(&["tag", &id, &local])?;
        changed = true;
        step(format!("{local}: the {platform} {BASE_IMAGE}"));
    }
    let _ = buildah.run(&["manifest", "rm", BASE_IMAGE]);
    if buildah.has_image(BASE_IMAGE) {
        // A pulled image holds the name; the list takes it over.
        buildah.run(&["rmi", BASE_IMAGE])?;
    }
    buildah.run(&["manifest", "create", BASE_IMAGE])?;
    for &arch in arches {
        buildah.run(&[
            "manifest",
            "add",
            BASE_IMAGE,
            &format!("containers-storage:{}", local_base(arch)),
        ])?;
    }
    Ok(changed)
}

/// A Debian root file system like the official slim image's: minbase, no
/// documentation, apt's caches cleaned after each use. Cached per release
/// and architecture.
fn rootfs(arch: Arch) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("rootfs");
    let tar = dir.join(format!("debian-{DEBIAN_RELEASE}-{}.tar", arch.name()));
    if tar.is_file() {
        return Ok(tar);
    }
    fs::create_dir_all(&dir)?;
    // Written aside and renamed: an interrupted run leaves no tarball.
    let partial = dir.join(format!(
        "debian-{DEBIAN_RELEASE}-{}.partial.tar",
        arch.name()
    ));
    let _ = fs::remove_file(&partial);
    step(format!(
        "mmdebstrap: Debian {DEBIAN_RELEASE} for {} ({}; cached in {})",
        arch.name(),
        if arch == Arch::host() {
            "about a minute"
        } else {
            "a few minutes under QEMU"
        },
        tar.display()
    ));
    let mirror = "http://deb.debian.org/debian";
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--architectures={}", arch.name()))
        // bookworm's merged /usr without the usrmerge package (and perl).
        .arg("--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr")
        .args(SLIM_DPKG.iter().map(|p| format!("--dpkgopt={p}")))
        .arg(format!("--customize-hook={SLIM_APT}"))
        .arg(DEBIAN_RELEASE)
        .arg(&partial)
        .arg(format!("deb {mirror} {DEBIAN_RELEASE} main"))
        .arg(format!("deb {mirror} {DEBIAN_RELEASE}-updates main"))
        .arg(format!(
            "deb http://deb.debian.org/debian-security {DEBIAN_RELEASE}-security main"
        )))?;
    fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// What the slim images leave out of every package (dpkg keeps these in
/// /etc/dpkg/dpkg.cfg.d/, so the Dockerfile's installs follow them too).
const SLIM_DPKG: [&str; 7] = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
];

/// The slim images' apt settings: no downloaded packages or caches left in
/// a layer, no translations fetched. (With them, mmdebstrap's own cleanup no
/// longer finds apt's caches: they go here.)
const SLIM_APT: &str = r#"rm -f "$1"/var/cache/apt/*.bin
cat > "$1/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' > "$1/etc/apt/apt.conf.d/docker-no-languages""#;

/// `FROM scratch`, the root file system, `CMD ["bash"]`: an image of `arch`
/// in the local storage. Returns its ID.
fn import_rootfs(buildah: &Buildah, arch: Arch, tar: &Path) -> anyhow::Result<String> {
    let container = buildah.run(&["from", "--arch", arch.name(), "scratch"])?;
    let container = container.trim();
    let result = (|| {
        buildah.run(&["add", container, &tar.display().to_string(), "/"])?;
        buildah.run(&[
            "config",
            "--os",
            "linux",
            "--arch",
            arch.name(),
            "--cmd",
            "bash",
            "--created-by",
            &format!("mmdebstrap --variant=minbase {DEBIAN_RELEASE} (debian:{DEBIAN_RELEASE}-slim made here)"),
            container,
        ])?;
        buildah.run(&["commit", "--quiet", container])
    })();
    let _ = buildah.run(&["rm", container]);
    Ok(result?.trim().to_owned())
}

/// Runs the component's binary in its image for `arch` with `--version`
/// (under qemu-<arch>-static for a foreign architecture, with the image's
/// root as the library prefix: the binaries link libpcap dynamically).
pub fn run_version(
    buildah: &Buildah,
    image: &str,
    component: &str,
    arch: Arch,
) -> anyhow::Result<String> {
    let container = buildah.run(&[
        "from",
        "--pull=never",
        "--quiet",
        "--platform",
        &arch.platform(),
        image,
    ])?;
    let container = container.trim();
    let result = (|| {
        let rootfs = PathBuf::from(buildah.run(&["mount", container])?.trim());
        let binary = rootfs.join(format!("usr/local/bin/packet-capture-{component}"));
        let id = cross::elf_id(&binary)?;
        ensure!(
            id.machine == arch.elf_machine(),
            "{} in the {} image is for ELF machine {}",
            binary.display(),
            arch.name(),
            id.machine
        );
        let mut cmd = if arch == Arch::host() {
            let mut cmd = Command::new("chroot");
            cmd.arg(&rootfs)
                .arg(format!("/usr/local/bin/packet-capture-{component}"));
            cmd
        } else {
            let mut cmd = Command::new(format!("qemu-{}-static", arch.qemu()));
            cmd.arg("-L").arg(&rootfs).arg(&binary);
            cmd
        };
        let version = output(cmd.arg("--version"))?;
        Ok(version.trim().to_owned())
    })();
    let _ = buildah.run(&["umount", container]);
    let _ = buildah.run(&["rm", container]);
    result
}

/// The small files of an OCI archive (index.json and the manifests and
/// configs it points to) and the size of every file in it.
pub struct OciArchive {
    files: BTreeMap<String, Vec<u8>>,
    sizes: BTreeMap<String, u64>,
}

impl OciArchive {
    /// Reads the archive's tar headers, keeping files up to 1 MiB.
    pub fn read(path: &Path) -> anyhow::Result<OciArchive> {
        const SMALL: u64 = 1 << 20;
        let mut tar = BufReader::new(
            File::open(path).with_context(|| format!("opening {}", path.display()))?,
        );
        let mut archive = OciArchive {
            files: BTreeMap::new(),
            sizes: BTreeMap::new(),
        };
        let mut header = [0u8; 512];
        loop {
            tar.read_exact(&mut header)
                .with_context(|| format!("reading {}", path.display()))?;
            if header.iter().all(|&b| b == 0) {
                break;
            }
            let text = |range: std::ops::Range<usize>| {
                let field = &header[range];
                let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
                String::from_utf8_lossy(&field[..end]).into_owned()
            };
            let (prefix, name) = (text(345..500), text(0..100));
            let name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let name = name.trim_start_matches("./").to_owned();
            let size = u64::from_str_radix(text(124..136).trim(), 8)
                .with_context(|| format!("the size of {name} in {}", path.display()))?;
            let padded = size.div_ceil(512) * 512;
            if matches!(header[156], b'0' | 0) && size <= SMALL {
                let mut data = vec![0; size as usize];
                tar.read_exact(&mut data)?;
                tar.seek_relative((padded - size) as i64)?;
                archive.files.insert(name.clone(), data);
            } else {
                tar.seek_relative(padded as i64)?;
            }
            archive.sizes.insert(name, size);
        }
        Ok(archive)
    }

    /// A JSON file of the archive (`index.json`).
    pub fn json(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let data = self
            .files
            .get(name)
            .with_context(|| format!("the archive has no {name}"))?;
        serde_json::from_slice(data).with_context(|| format!("parsing {name}"))
    }

    /// A JSON blob by its digest (`sha256:<hex>`).
    pub fn blob(&self, digest: &str) -> anyhow::Result<serde_json::Value> {
        self.json(&blob_path(digest)?)
    }

    /// The size of a blob as stored.
    pub fn blob_size(&self, digest: &str) -> anyhow::Result<u64> {
        let path = blob_path(digest)?;
        self.sizes
            .get(&path)
            .copied()
            .with_context(|| format!("the archive has no {path}"))
    }

    /// The image index the archive's index.json points to, with its name.
    pub fn image_index(&self) -> anyhow::Result<(String, serde_json::Value)> {
        let index = self.json("index.json")?;
        let [entry] = index["manifests"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        else {
            bail!("index.json holds {} entries, not one", index["manifests"]);
        };
        let name = entry["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let digest = entry["digest"].as_str().unwrap_or_default();
        Ok((name, self.blob(digest)?))
    }
}

fn blob_path(digest: &str) -> anyhow::Result<String> {
    let (algorithm, hex) = digest
        .split_once(':')
        .with_context(|| format!("{digest:?} is not a digest"))?;
    Ok(format!("blobs/{algorithm}/{hex}"))
}

/// Size and layers of each platform's image in an archive, one line each.
pub fn describe(image: &Image) -> anyhow::Result<Vec<String>> {
    let archive = OciArchive::read(&image.archive)?;
    let (_, index) = archive.image_index()?;
    let mut lines = vec![format!(
        "{} -> {} ({})",
        image.name,
        image.archive.display(),
        mib(fs::metadata(&image.archive)?.len())
    )];
    for entry in index["manifests"].as_array().into_iter().flatten() {
        let platform = format!(
            "{}/{}",
            entry["platform"]["os"].as_str().unwrap_or("?"),
            entry["platform"]["architecture"].as_str().unwrap_or("?")
        );
        let manifest = archive.blob(entry["digest"].as_str().unwrap_or_default())?;
        let config = archive.blob(manifest["config"]["digest"].as_str().unwrap_or_default())?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let total: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
        lines.push(format!(
            "  {platform}: {} compressed, {} layers",
            mib(total),
            layers.len()
        ));
        // The history entries that made a layer, in the layers' order.
        let made = config["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["empty_layer"].as_bool() != Some(true))
            .map(|h| h["created_by"].as_str().unwrap_or_default().to_owned());
        let mut made = made.chain(std::iter::repeat(String::new()));
        for layer in &layers {
            let by = made.next().unwrap_or_default();
            let by = by.trim_start_matches("/bin/sh -c ").replace("#(nop) ", "");
            let by: String = by.chars().take(72).collect();
            lines.push(format!(
                "    {:>10}  {by}",
                mib(layer["size"].as_u64().unwrap_or_default())
            ));
        }
    }
    Ok(lines)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_image_is_the_one_the_dockerfile_names() {
        let dockerfile = fs::read_to_string(root().join("Dockerfile")).unwrap();
        assert!(dockerfile.contains(&format!("ARG DEBIAN_RELEASE={DEBIAN_RELEASE}\n")));
        assert!(dockerfile.contains("FROM debian:${DEBIAN_RELEASE}-slim AS runtime\n"));
        assert_eq!(
            BASE_IMAGE,
            format!("docker.io/library/debian:{DEBIAN_RELEASE}-slim")
        );
        for component in COMPONENTS {
            assert!(dockerfile.contains(&format!("\nFROM labelled AS {component}\n")));
        }
        assert!(dockerfile.contains("\nFROM ${BINARIES} AS binaries\n"));
    }

    #[test]
    fn platforms_map_to_architectures() {
        assert_eq!(Arch::from_platform("linux/amd64").unwrap(), Arch::Amd64);
        assert_eq!(Arch::from_platform("linux/arm64").unwrap(), Arch::Arm64);
        assert!(Arch::from_platform("linux/s390x").is_err());
        assert_eq!(Arch::Arm64.platform(), "linux/arm64");
    }
}
