//! The target pods of a capture, and which interfaces are theirs: the host
//! end of a pod's veth is the interface whose other end holds one of the
//! pod's addresses. pcapng interface blocks name the pod.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::CaptureSpec;
use crate::netlink::peer_addresses;
use crate::sync::lock;
use crate::writer::InterfaceOwners;

/// A pod among a capture's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPod {
    /// `namespace/name`.
    pub name: String,
    pub ips: Vec<IpAddr>,
}

/// The interfaces of a running capture's target pods, as its spec names
/// them (the last start or SetTargets).
#[derive(Debug)]
pub struct PodInterfaces(pub Arc<Mutex<CaptureSpec>>);

impl InterfaceOwners for PodInterfaces {
    fn owner(&self, ifindex: u32) -> Option<String> {
        let pods = lock(&self.0).pods.clone();
        if pods.is_empty() {
            return None;
        }
        let addresses = peer_addresses(ifindex)
            .map_err(
                |e| tracing::debug!(ifindex, error = %e, "reading the other end of an interface"),
            )
            .ok()?;
        pods.iter()
            .find(|p| p.ips.iter().any(|ip| addresses.contains(ip)))
            .map(|p| format!("pod {}", p.name))
    }
}
