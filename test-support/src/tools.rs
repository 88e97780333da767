//! Tools the tests use as oracles that are not Debian packages, built once
//! from the Go module proxy into the user's cache directory.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// grpcurl's version; its binary is cached per version.
pub const GRPCURL_VERSION: &str = "v1.9.4";

/// `~/.cache/packet-capture` (or `$XDG_CACHE_HOME/packet-capture`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    base.join("packet-capture")
}

/// The grpcurl binary, built with `go install` on first use (a few minutes
/// once; later calls find it in the cache). Panics if Go is missing or the
/// build fails: tests that use it are meant to fail then, not skip.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let cache = cache_dir();
        let bin_dir = cache.join(format!("grpcurl-{GRPCURL_VERSION}"));
        let bin = bin_dir.join("grpcurl");
        if bin.is_file() {
            return bin;
        }
        let go = ["/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .filter(|_| !crate::on_path("go"))
            .unwrap_or_else(|| PathBuf::from("go"));
        let out = Command::new(&go)
            .args([
                "install",
                &format!("github.com/fullstorydev/grpcurl/cmd/grpcurl@{GRPCURL_VERSION}"),
            ])
            .env("GOBIN", &bin_dir)
            .env("GOMODCACHE", cache.join("go/mod"))
            .env("GOCACHE", cache.join("go/build"))
            .output()
            .unwrap_or_else(|e| panic!("running {} (needed to build grpcurl): {e}", go.display()));
        assert!(
            out.status.success() && bin.is_file(),
            "building grpcurl {GRPCURL_VERSION} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
    .clone()
}
