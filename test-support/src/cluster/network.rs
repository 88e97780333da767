//! The node network and the pod networks, made with iproute2.
//!
//! A cluster owns a slot `s` and with it `10.(100+s).0.0/16` and
//! `fd70:s::/48`:
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | bridge `pcbr<s>` in the root namespace (the apiserver binds here) | `10.(100+s).0.1/24` | `fd70:s::1/64` |
//! | node `i` (1..=240): `eth0` in its namespace, on the bridge | `10.(100+s).0.(10+i)` | `fd70:s::(10+i)` |
//! | node `i`'s pod CIDR, bridge `cni0` in the node holds `.1` | `10.(100+s).i.0/24` | `fd70:s:i::/64` |
//! | pod `k` (2..=254) on node `i`: `eth0` in its namespace | `10.(100+s).i.k` | `fd70:s:i::k` |
//!
//! Both kinds of bridge have a link address of their own ([`Plan::bridge_mac`],
//! [`Plan::cni_mac`]). A Linux bridge given none takes the lowest of its
//! ports', and takes another when that port goes: the host and every node
//! (or every pod of a node) would go on sending to the departed one until
//! their neighbour entries went stale, half a minute and more, cut off from
//! the bridge's addresses meanwhile.
//!
//! Every node routes each other node's pod CIDR to that node's address, so
//! a packet from a pod on node A to a pod on node B leaves A's `eth0`,
//! crosses the bridge and enters B's `eth0`, as with a simple CNI. The root
//! namespace has the same routes, so the host (and a controller running
//! there) reaches nodes and pods.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use super::Result;

/// The Services' cluster IPs (the apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";

/// The addresses and names of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    slot: u8,
}

impl Plan {
    pub const SLOTS: u8 = 100;
    pub const MAX_NODES: u8 = 240;
    pub const FIRST_POD: u8 = 2;
    pub const LAST_POD: u8 = 254;

    pub fn new(slot: u8) -> Self {
        assert!(slot < Self::SLOTS, "cluster slot {slot} out of range");
        Self { slot }
    }

    fn octet(&self) -> u8 {
        100 + self.slot
    }

    pub fn bridge(&self) -> String {
        format!("pcbr{}", self.slot)
    }

    /// The link address of the node network's bridge: locally administered
    /// (`02:`), `70:63` for "pc", then the slot.
    fn bridge_mac(&self) -> String {
        format!("02:70:63:{:02x}:00:01", self.slot)
    }

    /// The link address of node `node`'s pod bridge.
    fn cni_mac(&self, node: u8) -> String {
        format!("02:70:63:{:02x}:{node:02x}:01", self.slot)
    }

    /// The host's address on the node network.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), 0, 1)
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd70, self.slot.into(), 0, 0, 0, 0, 0, 1)
    }

    pub fn node_v4(&self, node: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), 0, 10 + node)
    }

    pub fn node_v6(&self, node: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd70,
            self.slot.into(),
            0,
            0,
            0,
            0,
            0,
            10 + u16::from(node),
        )
    }

    /// Every node's and every pod's IPv4 address.
    pub fn node_network_v4(&self) -> String {
        format!("10.{}.0.0/16", self.octet())
    }

    pub fn pod_cidr_v4(&self, node: u8) -> String {
        format!("10.{}.{node}.0/24", self.octet())
    }

    pub fn pod_cidr_v6(&self, node: u8) -> String {
        format!("fd70:{:x}:{node:x}::/64", self.slot)
    }

    pub fn pod_v4(&self, node: u8, pod: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet(), node, pod)
    }

    pub fn pod_v6(&self, node: u8, pod: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd70,
            self.slot.into(),
            node.into(),
            0,
            0,
            0,
            0,
            pod.into(),
        )
    }

    /// The root-namespace end of node `i`'s link to the bridge.
    fn uplink(&self, node: u8) -> String {
        format!("pc{}n{node}", self.slot)
    }

    /// Whether nothing on the host uses this slot's bridge or addresses.
    pub fn free_on_host(&self) -> bool {
        if std::path::Path::new("/sys/class/net")
            .join(self.bridge())
            .exists()
        {
            return false;
        }
        let prefix = format!("10.{}.", self.octet());
        let in_use = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&prefix))
                .unwrap_or(true)
        };
        !in_use(&["-4", "-o", "addr"]) && !in_use(&["-4", "route"])
    }

    /// The bridge of the node network, with the host's addresses on it.
    pub fn create_bridge(&self) -> Result<()> {
        let br = self.bridge();
        let mac = self.bridge_mac();
        ip(
            None,
            &["link", "add", &br, "address", &mac, "type", "bridge"],
        )?;
        ip(
            None,
            &[
                "addr",
                "add",
                &format!("{}/24", self.gateway_v4()),
                "dev",
                &br,
            ],
        )?;
        ip(
            None,
            &[
                "addr",
                "add",
                &format!("{}/64", self.gateway_v6()),
                "dev",
                &br,
                "nodad",
            ],
        )?;
        ip(None, &["link", "set", &br, "up"])
    }

    pub fn delete_bridge(&self) {
        let _ = ip(None, &["link", "del", &self.bridge()]);
    }

    /// Node `node`'s namespace, joined to the bridge, forwarding, with a
    /// `cni0` bridge for its pods and routes to every node in `others`.
    pub fn create_node(&self, node: u8, netns: &str, others: &[(u8, String)]) -> Result<()> {
        add_netns(netns)?;
        let ns = Some(netns);
        let uplink = self.uplink(node);
        ip(
            None,
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        ip(
            None,
            &["link", "set", &uplink, "master", &self.bridge(), "up"],
        )?;
        let v4 = format!("{}/24", self.node_v4(node));
        let v6 = format!("{}/64", self.node_v6(node));
        ip(ns, &["addr", "add", &v4, "dev", "eth0"])?;
        ip(ns, &["addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(ns, &["link", "set", "eth0", "up"])?;
        let mac = self.cni_mac(node);
        ip(
            ns,
            &["link", "add", "cni0", "address", &mac, "type", "bridge"],
        )?;
        let gw4 = format!("{}/24", self.pod_v4(node, 1));
        let gw6 = format!("{}/64", self.pod_v6(node, 1));
        ip(ns, &["addr", "add", &gw4, "dev", "cni0"])?;
        ip(ns, &["addr", "add", &gw6, "dev", "cni0", "nodad"])?;
        ip(ns, &["link", "set", "cni0", "up"])?;
        sysctl(
            netns,
            &["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"],
        )?;
        // The addresses may be a departed node's: the host and the other
        // nodes forget that node's link address (as they would on its
        // gratuitous ARP) rather than sending to it until the entry goes
        // stale.
        let (a4, a6) = (
            self.node_v4(node).to_string(),
            self.node_v6(node).to_string(),
        );
        for (other, other_ns) in others {
            self.route(Some(netns), *other)?;
            self.route(Some(other_ns), node)?;
            forget_neighbour(Some(other_ns), &a4, &a6)?;
        }
        forget_neighbour(None, &a4, &a6)?;
        self.route(None, node)
    }

    /// A route for the Services' addresses in a real node's namespace, to
    /// the host as a node's default route would: a connection from the node
    /// itself (a hostNetwork pod such as the agent reaching the `kubernetes`
    /// Service) needs one before kube-proxy's OUTPUT rules rewrite it.
    pub fn route_services(&self, netns: &str) -> Result<()> {
        let via = self.gateway_v4().to_string();
        ip(
            Some(netns),
            &["route", "replace", SERVICE_CIDR_V4, "via", &via],
        )
    }

    /// Removes node `node`: its namespace (and so its links) and the routes
    /// to its pods on the other nodes and the host.
    pub fn delete_node(&self, node: u8, netns: &str, others: &[(u8, String)]) {
        delete_netns(netns);
        for (_, other_ns) in others {
            self.unroute(Some(other_ns), node);
        }
        self.unroute(None, node);
        let _ = ip(None, &["link", "del", &self.uplink(node)]);
    }

    /// Pod `pod` on node `node`: a namespace linked to the node's `cni0`.
    pub fn create_pod(&self, node: u8, node_netns: &str, pod: u8, netns: &str) -> Result<()> {
        add_netns(netns)?;
        let host_end = pod_link(pod);
        ip(
            None,
            &[
                "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", &host_end,
                "netns", node_netns,
            ],
        )?;
        let node_ns = Some(node_netns);
        ip(node_ns, &["link", "set", &host_end, "master", "cni0", "up"])?;
        let ns = Some(netns);
        let v4 = format!("{}/24", self.pod_v4(node, pod));
        let v6 = format!("{}/64", self.pod_v6(node, pod));
        ip(ns, &["addr", "add", &v4, "dev", "eth0"])?;
        ip(ns, &["addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(ns, &["link", "set", "eth0", "up"])?;
        let gw4 = self.pod_v4(node, 1).to_string();
        let gw6 = self.pod_v6(node, 1).to_string();
        ip(ns, &["route", "add", "default", "via", &gw4])?;
        ip(ns, &["-6", "route", "add", "default", "via", &gw6])?;
        // The addresses may be a departed pod's: the node forgets that
        // pod's link address, as a CNI's gratuitous ARP makes it do, rather
        // than sending to it until the entry goes stale.
        let (a4, a6) = (
            self.pod_v4(node, pod).to_string(),
            self.pod_v6(node, pod).to_string(),
        );
        forget_neighbour(node_ns, &a4, &a6)
    }

    /// Removes pod `pod` of the node in `node_netns`: its link first, which
    /// goes at once, then its namespace. A namespace's links go only once
    /// nothing holds it (a process of the pod may still run), so without
    /// that the next pod given the same index could find the link's name
    /// taken.
    pub fn delete_pod(&self, node_netns: &str, pod: u8, netns: &str) {
        let _ = ip(Some(node_netns), &["link", "del", &pod_link(pod)]);
        delete_netns(netns);
    }

    fn route(&self, netns: Option<&str>, to: u8) -> Result<()> {
        let via4 = self.node_v4(to).to_string();
        let via6 = self.node_v6(to).to_string();
        ip(
            netns,
            &["route", "replace", &self.pod_cidr_v4(to), "via", &via4],
        )?;
        ip(
            netns,
            &[
                "-6",
                "route",
                "replace",
                &self.pod_cidr_v6(to),
                "via",
                &via6,
            ],
        )
    }

    fn unroute(&self, netns: Option<&str>, to: u8) {
        let _ = ip(netns, &["route", "del", &self.pod_cidr_v4(to)]);
        let _ = ip(netns, &["-6", "route", "del", &self.pod_cidr_v6(to)]);
    }
}

/// Drops the neighbour entries of an address pair in `netns`.
fn forget_neighbour(netns: Option<&str>, v4: &str, v6: &str) -> Result<()> {
    ip(netns, &["neigh", "flush", "to", v4])?;
    ip(netns, &["-6", "neigh", "flush", "to", v6])
}

/// The node's end of pod `pod`'s link.
fn pod_link(pod: u8) -> String {
    format!("veth{pod}")
}

fn add_netns(name: &str) -> Result<()> {
    ip(None, &["netns", "add", name])?;
    ip(Some(name), &["link", "set", "lo", "up"])
}

/// Sets each of `keys` (paths under /proc/sys) to 1 inside a namespace.
fn sysctl(netns: &str, keys: &[&str]) -> Result<()> {
    let script: String = keys
        .iter()
        .map(|k| format!("echo 1 > /proc/sys/{k} && "))
        .chain(["true".to_string()])
        .collect();
    run(Command::new("ip").args(["netns", "exec", netns, "sh", "-c", &script]))
}

/// `ip [-n netns] <args>`.
pub fn ip(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run(cmd.args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    super::checked_output(cmd).map(drop)
}

/// Deletes a network namespace, and so every link in it; a namespace that
/// is already gone is not an error (teardown runs after partial starts).
pub fn delete_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        let p = Plan::new(3);
        assert_eq!(p.bridge(), "pcbr3");
        assert_eq!(p.gateway_v4().to_string(), "10.103.0.1");
        assert_eq!(p.gateway_v6().to_string(), "fd70:3::1");
        assert_eq!(p.node_v4(2).to_string(), "10.103.0.12");
        assert_eq!(p.node_v6(2).to_string(), "fd70:3::c");
        assert_eq!(p.pod_cidr_v4(2), "10.103.2.0/24");
        assert_eq!(p.pod_cidr_v6(12), "fd70:3:c::/64");
        assert_eq!(p.pod_v4(2, 5).to_string(), "10.103.2.5");
        assert_eq!(p.pod_v6(12, 5).to_string(), "fd70:3:c::5");
        assert_eq!(p.bridge_mac(), "02:70:63:03:00:01");
        assert_eq!(p.cni_mac(240), "02:70:63:03:f0:01");
        assert!(p.uplink(240).len() <= 15);
        assert!(Plan::new(Plan::SLOTS - 1).uplink(Plan::MAX_NODES).len() <= 15);
    }
}
