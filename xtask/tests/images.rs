//! `cargo xtask images` as a whole: both images built from the Dockerfile
//! with buildah for linux/amd64 and linux/arm64, what their OCI archives
//! hold, each binary answering `--version` in its image (arm64 under QEMU),
//! and `--load` into a containerd of the test's own.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use packet_capture_test_support::{on_path, unique_name};
use serde_json::Value;
use xtask::images::{self, Args, BASE_IMAGE, OciArchive};
use xtask::util::root;

/// Root and the tools (`make setup` installs them); in CI a missing one
/// fails the test, elsewhere it is skipped with a line that says so.
fn prerequisites(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let tools = [
        "buildah",
        "mmdebstrap",
        "qemu-aarch64-static",
        "containerd",
        "ctr",
    ];
    let missing: Vec<&str> = tools.into_iter().filter(|t| !on_path(t)).collect();
    let problem = match (is_root, missing.is_empty()) {
        (true, true) => return true,
        (false, _) => "needs root (buildah, mmdebstrap, binfmt_misc, containerd)".to_owned(),
        (true, false) => format!("needs {} on PATH (`make setup`)", missing.join(", ")),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: {problem}");
    }
    eprintln!("SKIPPED {test}: {problem} (this is a failure when CI=true)");
    false
}

#[test]
fn images_build_for_both_platforms_and_load_into_containerd() {
    if !prerequisites("images_build_for_both_platforms_and_load_into_containerd") {
        return;
    }
    let args = Args::default();
    assert_eq!(args.registry, "localhost/packet-capture");
    let built = images::build(&args).unwrap_or_else(|e| panic!("{e:#}"));
    let revision = String::from_utf8(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(root())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();

    let names: Vec<&str> = built.iter().map(|i| i.name.as_str()).collect();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        names,
        [
            format!("localhost/packet-capture/packet-capture-agent:{version}"),
            format!("localhost/packet-capture/packet-capture-controller:{version}"),
        ]
    );
    for image in &built {
        let binary = format!("packet-capture-{}", image.component);
        let archive = OciArchive::read(&image.archive).unwrap();
        let (name, index) = archive.image_index().unwrap();
        assert_eq!(name, image.name, "the archive's ref.name annotation");
        assert_eq!(
            index["mediaType"], "application/vnd.oci.image.index.v1+json",
            "{}: a multi-arch index",
            image.name
        );
        let mut platforms = BTreeSet::new();
        for entry in index["manifests"].as_array().unwrap() {
            let arch = entry["platform"]["architecture"].as_str().unwrap();
            assert_eq!(entry["platform"]["os"], "linux");
            platforms.insert(arch.to_owned());
            let manifest = archive.blob(entry["digest"].as_str().unwrap()).unwrap();
            let config = archive
                .blob(manifest["config"]["digest"].as_str().unwrap())
                .unwrap();
            let context = format!("{} for {arch}", image.name);
            assert_eq!(config["architecture"], arch, "{context}");
            assert_eq!(config["os"], "linux", "{context}");
            let c = &config["config"];
            let user = match image.component {
                "agent" => "0:0",
                _ => "65532:65532",
            };
            assert_eq!(c["User"], user, "{context}");
            assert_eq!(
                c["Entrypoint"],
                Value::from(vec![format!("/usr/local/bin/{binary}")]),
                "{context}"
            );
            let labels = &c["Labels"];
            assert_eq!(labels["org.opencontainers.image.title"], binary.as_str());
            assert_eq!(labels["org.opencontainers.image.version"], version);
            assert_eq!(
                labels["org.opencontainers.image.revision"],
                revision.trim(),
                "{context}"
            );
            assert_eq!(
                labels["org.opencontainers.image.source"],
                "https://github.com/packet-capture/packet-capture"
            );
            // The base, the runtime's packages, the binary.
            let layers = manifest["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 3, "{context}: {layers:?}");
            for layer in layers {
                let digest = layer["digest"].as_str().unwrap();
                assert_eq!(
                    archive.blob_size(digest).unwrap(),
                    layer["size"].as_u64().unwrap(),
                    "{context}: layer {digest} is in the archive"
                );
            }
        }
        assert_eq!(
            platforms,
            BTreeSet::from(["amd64".to_owned(), "arm64".to_owned()])
        );
        // What `build` ran in each image: the arm64 one under QEMU.
        let ran: BTreeSet<(String, String)> = image.versions.iter().cloned().collect();
        assert_eq!(
            ran,
            BTreeSet::from([
                ("linux/amd64".to_owned(), format!("{binary} {version}")),
                ("linux/arm64".to_owned(), format!("{binary} {version}")),
            ])
        );
    }
    let lines = images::describe(&built[0]).unwrap();
    assert!(
        lines.iter().any(|l| l.contains("linux/arm64:")),
        "{lines:?}"
    );

    let containerd = Containerd::start();
    images::load(&built, &containerd.socket()).unwrap();
    images::load_base(&containerd.socket()).unwrap();
    let listed = containerd.images();
    for name in names.into_iter().chain([BASE_IMAGE]) {
        assert!(listed.contains(name), "{name} not in {listed:?}");
    }
}

/// A containerd of the test's own (its root, state and socket in a
/// temporary directory, without the CRI), stopped and removed on drop.
struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = std::env::temp_dir().join(unique_name("pcctd"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
            ),
        )
        .unwrap();
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // containerd logs this line once it serves its socket.
        let mut log = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if log.read_line(&mut line).unwrap() == 0 {
                panic!("containerd exited before it was ready:\n{seen}");
            }
            seen.push_str(&line);
            if line.contains("containerd successfully booted") {
                break;
            }
        }
        // Keep reading, so that containerd never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = log.read_to_end(&mut Vec::new());
        });
        Containerd { dir, child }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn images(&self) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "ls", "-q"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts whatever containerd left mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = Command::new("umount").arg(m).status();
    }
}
