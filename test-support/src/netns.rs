//! Network namespaces and veth pairs, made with iproute2.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command that runs inside the network namespace called `netns`.
pub fn command_in(netns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

/// A network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with `lo` up.
    pub fn new(prefix: &str) -> Self {
        let name = crate::unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        command_in(&self.name, program)
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Moves the calling thread into the namespace (and processes it starts
    /// after this). For tests whose own code must act inside it.
    pub fn enter(&self) {
        let file = File::open(format!("/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("opening netns {}: {e}", self.name));
        // SAFETY: setns on a valid namespace fd only changes this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair joining two namespaces, each end with an address.
pub struct VethPair {
    pub a: String,
    pub b: String,
}

impl VethPair {
    /// Links `ns_a` and `ns_b`; `addr_a`/`addr_b` are CIDRs such as
    /// `10.1.0.1/24` or `fd01::1/64` (IPv6 without duplicate address
    /// detection, so addresses are usable at once).
    pub fn new(ns_a: &Netns, addr_a: &[&str], ns_b: &Netns, addr_b: &[&str]) -> Self {
        let a = crate::unique_name("va");
        let b = crate::unique_name("vb");
        run(Command::new("ip").args([
            "link",
            "add",
            &a,
            "netns",
            ns_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            ns_b.name(),
        ]));
        for (ns, dev, addrs) in [(ns_a, &a, addr_a), (ns_b, &b, addr_b)] {
            for addr in addrs {
                if addr.contains(':') {
                    ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
                } else {
                    ns.ip(&["addr", "add", addr, "dev", dev]);
                }
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        Self { a, b }
    }
}
