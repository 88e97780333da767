//! Two network namespaces, a sender and a receiver "node", joined by a veth
//! pair, and a UDP socket in the receiver that takes the traffic and never
//! reads it.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;

use anyhow::{Context as _, bail};
use packet_capture_test_support::{Netns, VethPair};

use super::generator::Flow;
use crate::util::output;

pub const SENDER_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 1);
pub const RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 2);
/// The UDP port the sink is bound to.
pub const UDP_PORT: u16 = 9000;

pub struct Topology {
    // Dropped last: the namespaces take their veth ends with them.
    pub sender: Netns,
    pub receiver: Netns,
    /// The sender's and the receiver's veth ends.
    pub sender_if: String,
    pub receiver_if: String,
    /// Bound in the receiver's namespace, never read.
    _sink: UdpSocket,
}

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        let sender = Netns::new("bs");
        let receiver = Netns::new("br");
        for ns in [&sender, &receiver] {
            // No IPv6 (router solicitations, MLD) on the links: the
            // receiver's counters then count the generator's frames only.
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let pair = VethPair::new(
            &sender,
            &[&format!("{SENDER_IP}/24")],
            &receiver,
            &[&format!("{RECEIVER_IP}/24")],
        );
        let sink = in_netns(&receiver, || {
            UdpSocket::bind((RECEIVER_IP, UDP_PORT)).context("binding the UDP sink")
        })??;
        Ok(Self {
            sender,
            receiver,
            sender_if: pair.a,
            receiver_if: pair.b,
            _sink: sink,
        })
    }

    /// The generator's flow: sender to the sink.
    pub fn flow(&self) -> anyhow::Result<Flow> {
        Ok(Flow {
            iface: self.sender_if.clone(),
            src_mac: mac(&self.sender, &self.sender_if)?,
            dst_mac: mac(&self.receiver, &self.receiver_if)?,
            src_ip: SENDER_IP,
            dst_ip: RECEIVER_IP,
            dst_port: UDP_PORT,
        })
    }

    /// The receiver interface's counters.
    pub fn receiver_counters(&self) -> anyhow::Result<IfCounters> {
        link_counters(&self.receiver, &self.receiver_if)
    }

    /// `ethtool -K` on both ends.
    pub fn offloads(&self, on: bool) -> anyhow::Result<()> {
        let v = if on { "on" } else { "off" };
        for (ns, dev) in [
            (&self.sender, &self.sender_if),
            (&self.receiver, &self.receiver_if),
        ] {
            output(
                ns.command("ethtool")
                    .args(["-K", dev, "tso", v, "gso", v, "gro", v]),
            )?;
        }
        Ok(())
    }

    /// The offload settings of an end, as `ethtool -k` shows them.
    pub fn offload_state(&self, receiver: bool) -> anyhow::Result<String> {
        let (ns, dev) = if receiver {
            (&self.receiver, &self.receiver_if)
        } else {
            (&self.sender, &self.sender_if)
        };
        let text = output(ns.command("ethtool").args(["-k", dev]))?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with("tcp-segmentation-offload")
                    || l.starts_with("generic-segmentation-offload")
                    || l.starts_with("generic-receive-offload")
            })
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(", "))
    }

    pub fn mtu(&self) -> anyhow::Result<u32> {
        let v = link_json(&self.receiver, &self.receiver_if)?;
        v["mtu"]
            .as_u64()
            .map(|m| m as u32)
            .context("no mtu in ip -j link")
    }
}

/// What an interface has received.
#[derive(Debug, Clone, Copy, Default)]
pub struct IfCounters {
    pub rx_packets: u64,
    pub rx_dropped: u64,
}

fn sysctl(ns: &Netns, key: &str, value: &str) -> anyhow::Result<()> {
    output(
        ns.command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]),
    )?;
    Ok(())
}

fn link_json(ns: &Netns, dev: &str) -> anyhow::Result<serde_json::Value> {
    let text =
        output(Command::new("ip").args(["-n", ns.name(), "-j", "-s", "link", "show", "dev", dev]))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("ip -j link output")?;
    v.get(0).cloned().context("ip -j link listed nothing")
}

fn link_counters(ns: &Netns, dev: &str) -> anyhow::Result<IfCounters> {
    let v = link_json(ns, dev)?;
    let rx = &v["stats64"]["rx"];
    Ok(IfCounters {
        rx_packets: rx["packets"]
            .as_u64()
            .context("no rx packets in ip -j -s link")?,
        rx_dropped: rx["dropped"].as_u64().unwrap_or(0),
    })
}

fn mac(ns: &Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let v = link_json(ns, dev)?;
    let text = v["address"].as_str().context("no address in ip -j link")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {text:?}"))?;
    match <[u8; 6]>::try_from(bytes) {
        Ok(m) => Ok(m),
        Err(_) => bail!("MAC address {text:?} is not 6 bytes"),
    }
}

/// Runs `f` on a thread that has entered `ns` (sockets it makes belong
/// there), and returns its result.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            f()
        })
        .join()
    })
    .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", ns.name()))
}
