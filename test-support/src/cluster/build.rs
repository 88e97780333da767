//! The control plane's binaries, built from Go modules and cached under the
//! user's cache directory, keyed by version.
//!
//! `k8s.io/kubernetes` is a Go module whose own go.mod points the `k8s.io/*`
//! staging modules at `./staging/...`, which only resolves inside its
//! repository. A small wrapper module requires it and replaces each staging
//! module with its published version (`v0.<minor>.<patch>`); the replace list
//! is read from kubernetes' own go.mod, so it follows the pinned version. The
//! same module builds etcd from `go.etcd.io/etcd/server/v3/etcdmain` at the
//! version kubernetes itself requires. Helm is `go install`ed on its own.
//!
//! A binary is built only when it is missing from the cache; a second run
//! neither builds nor needs the network.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Error, Result};

/// The Kubernetes version of kube-apiserver, kube-controller-manager and
/// kubectl (k8s-openapi's `v1_35` on the Rust side).
pub const KUBERNETES_VERSION: &str = "v1.35.4";
/// etcd: the version `k8s.io/kubernetes` at [`KUBERNETES_VERSION`] requires.
pub const ETCD_VERSION: &str = "v3.6.5";
/// Helm 3 built against the same Kubernetes minor.
pub const HELM_VERSION: &str = "v3.20.2";

/// The control plane, and what a real node runs (`--real-node`): kubelet,
/// the scheduler that places the chart's Deployment, and kube-proxy for
/// Service addresses such as the in-cluster `kubernetes` one.
const KUBERNETES_COMMANDS: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "kubelet",
    "kube-scheduler",
    "kube-proxy",
];
/// The sandbox ("pause") program of a real node's pods, compiled from the
/// C source in the kubernetes module (`build/pause/linux/pause.c`).
pub const PAUSE: &str = "pause";
const ETCD_MAIN: &str = "package main

import (
\t\"os\"

\t\"go.etcd.io/etcd/server/v3/etcdmain\"
)

func main() { etcdmain.Main(os.Args) }
";

/// The directory of cached binaries for the pinned versions.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Where the binaries are, built or not.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every binary and the version it must be built at.
    pub fn wanted() -> Vec<(&'static str, &'static str)> {
        KUBERNETES_COMMANDS
            .iter()
            .map(|c| (*c, KUBERNETES_VERSION))
            .chain([
                (PAUSE, KUBERNETES_VERSION),
                ("etcd", ETCD_VERSION),
                ("helm", HELM_VERSION),
            ])
            .collect()
    }

    /// An OCI archive of the pods' sandbox image ([`super::PAUSE_IMAGE`]):
    /// the pause program alone, as the upstream image is, made once next to
    /// the binaries (no registry is needed for a real node).
    pub fn pause_image(&self) -> Result<PathBuf> {
        let archive = self.dir.join(format!("pause-{KUBERNETES_VERSION}.oci.tar"));
        if archive.is_file() {
            return Ok(archive);
        }
        let layout = self.dir.join(".pause-image");
        let _ = fs::remove_dir_all(&layout);
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        let layer = layout.join("layer.tar");
        super::checked_output(
            Command::new("tar")
                .args(["--create", "--owner=0", "--group=0", "--numeric-owner"])
                .args(["--mtime=@0", "--mode=0755", "--file"])
                .arg(&layer)
                .arg("--directory")
                .arg(&self.dir)
                .arg(PAUSE),
        )?;
        let layer_bytes = fs::read(&layer).map_err(|e| Error::io(&layer, e))?;
        fs::remove_file(&layer).map_err(|e| Error::io(&layer, e))?;
        let layer = blob(&blobs, &layer_bytes)?;
        let config = serde_json::json!({
            "architecture": super::sim::arch(),
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [layer.0]},
        });
        let config = blob(&blobs, config.to_string().as_bytes())?;
        let descriptor = |media: &str, (digest, size): &(String, usize)| serde_json::json!({"mediaType": media, "digest": digest, "size": size});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
        });
        let manifest = blob(&blobs, manifest.to_string().as_bytes())?;
        let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
        entry["annotations"] = serde_json::json!({
            "io.containerd.image.name": super::PAUSE_IMAGE,
            "org.opencontainers.image.ref.name": super::PAUSE_IMAGE,
        });
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
        write(&layout.join("index.json"), &index.to_string())?;
        write(
            &layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let partial = archive.with_extension("tar.part");
        super::checked_output(
            Command::new("tar")
                .args(["--create", "--file"])
                .arg(&partial)
                .arg("--directory")
                .arg(&layout)
                .args(["oci-layout", "index.json", "blobs"]),
        )?;
        fs::rename(&partial, &archive).map_err(|e| Error::io(&archive, e))?;
        let _ = fs::remove_dir_all(&layout);
        Ok(archive)
    }

    fn missing(&self) -> Vec<&'static str> {
        Self::wanted()
            .into_iter()
            .filter(|(name, version)| {
                let stamp = fs::read_to_string(self.stamp(name)).unwrap_or_default();
                !self.path(name).is_file() || stamp.trim() != *version
            })
            .map(|(name, _)| name)
            .collect()
    }

    fn stamp(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.version"))
    }
}

/// `$XDG_CACHE_HOME/packet-capture` or `~/.cache/packet-capture`.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache"))
            .ok_or_else(|| Error::Build("neither XDG_CACHE_HOME nor HOME is set".into()))?,
    };
    Ok(base.join("packet-capture"))
}

/// The cached binaries, building the missing ones first (about ten minutes
/// on two cores the first time; nothing afterwards).
pub fn ensure() -> Result<Binaries> {
    let root = cache_root()?;
    let versioned = root.join(format!("k8s-{KUBERNETES_VERSION}"));
    let binaries = Binaries {
        dir: versioned.join("bin"),
    };
    if binaries.missing().is_empty() {
        return Ok(binaries);
    }
    fs::create_dir_all(&binaries.dir).map_err(|e| Error::io(&binaries.dir, e))?;
    // Two test binaries may start at once: one builds, the other waits.
    let lock_path = versioned.join(".build.lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    let missing = binaries.missing();
    if missing.is_empty() {
        return Ok(binaries);
    }
    let go = GoBuild::new(&root, &versioned)?;
    let started = Instant::now();
    if missing.iter().any(|m| *m != "helm") {
        go.kubernetes_and_etcd(&binaries)?;
    }
    if missing.contains(&"helm") {
        go.helm(&binaries)?;
    }
    step(format!(
        "control plane binaries ready in {} after {:.0?}",
        binaries.dir.display(),
        started.elapsed()
    ));
    Ok(binaries)
}

fn step(msg: String) {
    eprintln!("==> {msg}");
}

/// The Go toolchain with the module and build caches under the cache root.
struct GoBuild {
    go: PathBuf,
    cache: PathBuf,
    src: PathBuf,
    log: PathBuf,
}

impl GoBuild {
    fn new(root: &Path, versioned: &Path) -> Result<Self> {
        let go = find_go().ok_or_else(|| {
            Error::Build(
                "Go is needed to build the local control plane and was not found on PATH \
                 or in /usr/local/go/bin"
                    .into(),
            )
        })?;
        Ok(Self {
            go,
            cache: root.join("go"),
            src: versioned.join("src"),
            log: versioned.join("build.log"),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.go);
        cmd.args(args)
            .current_dir(&self.src)
            .env("GOMODCACHE", self.cache.join("mod"))
            .env("GOCACHE", self.cache.join("build"))
            .env("GOPATH", self.cache.join("path"))
            .env("GOTOOLCHAIN", "local")
            .env("GOWORK", "off")
            .env("GOFLAGS", "-buildvcs=false")
            .env("CGO_ENABLED", "0")
            .env_remove("GO111MODULE");
        cmd
    }

    /// Runs go, its output appended to the build log; returns stdout.
    fn run(&self, what: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(&self.log, e))?;
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd
            .stdin(Stdio::null())
            .stderr(log)
            .output()
            .map_err(|e| Error::io(&self.go, e))?;
        if !out.status.success() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            return Err(Error::Build(format!(
                "{what} failed ({}); the end of {}:\n{}",
                out.status,
                self.log.display(),
                tail(&log, 40)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kubernetes_and_etcd(&self, binaries: &Binaries) -> Result<()> {
        step(format!(
            "building {} {KUBERNETES_VERSION}, pause and etcd {ETCD_VERSION} from Go modules \
             (first time only: about fifteen minutes; log: {})",
            KUBERNETES_COMMANDS.join(", "),
            self.log.display()
        ));
        let etcd_dir = self.src.join("cmd/etcd");
        fs::create_dir_all(&etcd_dir).map_err(|e| Error::io(&etcd_dir, e))?;
        let go_mod = self.wrapper_go_mod()?;
        write(&self.src.join("go.mod"), &go_mod)?;
        write(&self.src.join("tools.go"), &tools_go())?;
        write(&etcd_dir.join("main.go"), ETCD_MAIN)?;
        self.run("go mod tidy", &["mod", "tidy"], &[])?;

        let out = self.src.join("out");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let ldflags = kubernetes_ldflags();
        let mut args = vec![
            "build".to_string(),
            "-trimpath".into(),
            format!("-ldflags={ldflags}"),
            "-o".into(),
            format!("{}/", out.display()),
        ];
        args.extend(
            KUBERNETES_COMMANDS
                .iter()
                .map(|c| format!("k8s.io/kubernetes/cmd/{c}")),
        );
        args.push("./cmd/etcd".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run("go build", &args, &[])?;
        for name in KUBERNETES_COMMANDS {
            install(&out, binaries, name, KUBERNETES_VERSION)?;
        }
        self.pause(&out)?;
        install(&out, binaries, PAUSE, KUBERNETES_VERSION)?;
        install(&out, binaries, "etcd", ETCD_VERSION)
    }

    /// The pause program, static, from the kubernetes module's own source.
    fn pause(&self, out: &Path) -> Result<()> {
        let dir = self.run(
            "go list k8s.io/kubernetes",
            &["list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
            &[],
        )?;
        let source = Path::new(dir.trim()).join("build/pause/linux/pause.c");
        let version = format!("-DVERSION={KUBERNETES_VERSION}");
        let output = Command::new("cc")
            .args(["-Os", "-static", "-Wall", &version, "-o"])
            .arg(out.join(PAUSE))
            .arg(&source)
            .output()
            .map_err(|e| Error::Build(format!("running cc for {}: {e}", source.display())))?;
        if !output.status.success() {
            return Err(Error::Build(format!(
                "compiling {} failed: {}",
                source.display(),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(())
    }

    /// The wrapper's go.mod: kubernetes and etcd at the pinned versions, and
    /// every staging module of kubernetes' go.mod at its published version.
    fn wrapper_go_mod(&self) -> Result<String> {
        fs::create_dir_all(&self.src).map_err(|e| Error::io(&self.src, e))?;
        // `go mod download` of an explicit version must not see a go.mod.
        let _ = fs::remove_file(self.src.join("go.mod"));
        let module = format!("k8s.io/kubernetes@{KUBERNETES_VERSION}");
        let json = self.run(
            "go mod download k8s.io/kubernetes",
            &["mod", "download", "-json", &module],
            &[],
        )?;
        let info: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| Error::Build(format!("go mod download -json printed {json:?}: {e}")))?;
        let go_mod_path = info["GoMod"]
            .as_str()
            .ok_or_else(|| Error::Build(format!("go mod download -json has no GoMod: {json}")))?;
        let upstream = fs::read_to_string(go_mod_path).map_err(|e| Error::io(go_mod_path, e))?;
        let staging = staging_modules(&upstream);
        if staging.is_empty() {
            return Err(Error::Build(format!(
                "{go_mod_path} replaces no k8s.io module with ./staging; the wrapper cannot be generated"
            )));
        }
        let go_line = upstream
            .lines()
            .find(|l| l.starts_with("go "))
            .unwrap_or("go 1.25.0");
        let published = staging_version(KUBERNETES_VERSION);
        let replaces: String = staging
            .iter()
            .map(|m| format!("\t{m} => {m} {published}\n"))
            .collect();
        Ok(format!(
            "// Generated by packet-capture-test-support from {module}'s go.mod.\n\
             module packet-capture.local/control-plane\n\n{go_line}\n\n\
             require (\n\tk8s.io/kubernetes {KUBERNETES_VERSION}\n\tgo.etcd.io/etcd/server/v3 {ETCD_VERSION}\n)\n\n\
             replace (\n{replaces})\n"
        ))
    }

    fn helm(&self, binaries: &Binaries) -> Result<()> {
        step(format!(
            "building helm {HELM_VERSION} from Go modules (first time only: a few minutes)"
        ));
        fs::create_dir_all(&self.src).map_err(|e| Error::io(&self.src, e))?;
        // `go install pkg@version` ignores the wrapper module; keep it out of
        // the way anyway so an unrelated go.mod cannot interfere.
        let out = self.src.join("out-helm");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let ldflags = format!("-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}");
        let package = format!("helm.sh/helm/v3/cmd/helm@{HELM_VERSION}");
        self.run(
            "go install helm",
            &[
                "install",
                "-trimpath",
                &format!("-ldflags={ldflags}"),
                &package,
            ],
            &[("GOBIN", &out)],
        )?;
        install(&out, binaries, "helm", HELM_VERSION)
    }
}

/// The oldest Go that builds [`KUBERNETES_VERSION`] (its go.mod's `go` line).
pub const MIN_GO: (u32, u32) = (1, 25);

/// The `go` command: on PATH, or where the official archive installs it.
pub fn find_go() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/local/go/bin")])
        .map(|dir| dir.join("go"))
        .find(|p| p.is_file())
}

/// `(major, minor)` of `go version` output such as `go version go1.26.8 linux/amd64`.
pub fn go_version(output: &str) -> Option<(u32, u32)> {
    let version = output.split_whitespace().nth(2)?.strip_prefix("go")?;
    let mut parts = version.split(['.', 'r', 'b']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The modules that kubernetes' go.mod replaces with `./staging/...`.
fn staging_modules(go_mod: &str) -> Vec<String> {
    let mut modules = Vec::new();
    for line in go_mod.lines() {
        let line = line.trim().trim_start_matches("replace").trim();
        let Some((from, to)) = line.split_once("=>") else {
            continue;
        };
        let from = from.split_whitespace().next().unwrap_or_default();
        if to.trim().starts_with("./staging/") && from.starts_with("k8s.io/") {
            modules.push(from.to_string());
        }
    }
    modules
}

/// `v1.35.4` -> `v0.35.4`, the version the staging modules are published at.
fn staging_version(kubernetes: &str) -> String {
    let rest = kubernetes.trim_start_matches("v1.");
    format!("v0.{rest}")
}

/// What `kubectl version` and the apiserver's `/version` report.
fn kubernetes_ldflags() -> String {
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or_default();
    let pkg = "k8s.io/component-base/version";
    let client_pkg = "k8s.io/client-go/pkg/version";
    let mut flags = vec!["-s".to_string(), "-w".to_string()];
    for p in [pkg, client_pkg] {
        flags.push(format!("-X {p}.gitVersion={KUBERNETES_VERSION}"));
        flags.push(format!("-X {p}.gitMajor=1"));
        flags.push(format!("-X {p}.gitMinor={minor}"));
        flags.push(format!("-X {p}.gitTreeState=clean"));
    }
    flags.join(" ")
}

fn tools_go() -> String {
    let imports: String = KUBERNETES_COMMANDS
        .iter()
        .map(|c| format!("\t_ \"k8s.io/kubernetes/cmd/{c}\"\n"))
        .collect();
    format!("//go:build tools\n\npackage tools\n\nimport (\n{imports})\n")
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Moves a built binary into the cache and records its version.
fn install(out: &Path, binaries: &Binaries, name: &str, version: &str) -> Result<()> {
    let from = out.join(name);
    let to = binaries.path(name);
    fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
    write(&binaries.stamp(name), version)
}

/// Writes `bytes` as a content-addressed blob; its digest and size.
fn blob(dir: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(&hex);
    fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// The last `n` lines of a log.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_replacements_are_read_from_both_forms() {
        let go_mod = "module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                      \tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n\
                      replace k8s.io/kubectl => ./staging/src/k8s.io/kubectl\n";
        assert_eq!(
            staging_modules(go_mod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kubectl"]
        );
        assert_eq!(staging_version("v1.35.4"), "v0.35.4");
    }

    #[test]
    fn go_versions_are_read() {
        assert_eq!(go_version("go version go1.26.8 linux/amd64"), Some((1, 26)));
        assert_eq!(
            go_version("go version go1.25rc1 linux/amd64"),
            Some((1, 25))
        );
        assert_eq!(go_version("go version go1.26 linux/amd64"), Some((1, 26)));
        assert_eq!(go_version("nonsense"), None);
    }
}
