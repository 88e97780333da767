//! The eBPF programs from user space: loading them, attaching them to the TC
//! hooks of interfaces, and keeping their maps in step with the captures.

use std::collections::{HashMap, HashSet};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use ipnet::IpNet;
use packet_capture_common::abi::{MAX_SLOTS, Settings, counter};

/// The object `build.rs` compiled from `packet-capture-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/packet-capture"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
}

/// Which programs an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Frames start with an Ethernet header.
    Ethernet,
    /// Loopback: every packet leaves and comes back on the same interface;
    /// like libpcap, only the way in is captured, so each packet shows once.
    Loopback,
    /// No link-layer header: frames start at the IP header.
    RawIp,
}

impl LinkKind {
    /// From the interface's ARPHRD type: Ethernet, loopback and IEEE 802
    /// devices carry an Ethernet header; tun, wireguard, ipip, sit, gre and
    /// ppp devices do not.
    pub fn from_arphrd(arphrd: u16) -> Self {
        const ARPHRD_ETHER: u16 = 1;
        const ARPHRD_IEEE802: u16 = 6;
        const ARPHRD_LOOPBACK: u16 = 772;
        match arphrd {
            ARPHRD_ETHER | ARPHRD_IEEE802 => Self::Ethernet,
            ARPHRD_LOOPBACK => Self::Loopback,
            _ => Self::RawIp,
        }
    }

    /// The ingress program and, unless loopback, the egress one.
    fn programs(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Ethernet => ("tc_ingress", Some("tc_egress")),
            Self::Loopback => ("tc_ingress", None),
            Self::RawIp => ("tc_ingress_l3", Some("tc_egress_l3")),
        }
    }
}

/// What one capture slot selects in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotTargets {
    /// Addresses and networks; empty: any address.
    pub nets: Vec<IpNet>,
    /// Ports; empty: any port.
    pub ports: Vec<u16>,
    /// Bytes the kernel must copy for this slot.
    pub copy_len: u32,
}

struct Attachment {
    ingress: SchedClassifierLinkId,
    egress: Option<SchedClassifierLinkId>,
    kind: LinkKind,
}

impl Attachment {
    /// (program name, link) of each attached program.
    fn links(self) -> impl Iterator<Item = (&'static str, SchedClassifierLinkId)> {
        let (ingress, egress) = self.kind.programs();
        std::iter::once((ingress, self.ingress)).chain(egress.zip(self.egress))
    }
}

/// The loaded programs, their maps and their attachments. Dropping it
/// detaches every program (TCX links close with their file descriptors).
pub struct Kernel {
    ebpf: Ebpf,
    attached: HashMap<String, Attachment>,
    settings: Array<MapData, Settings>,
    ipv4: LpmTrie<MapData, [u8; 4], u64>,
    ipv6: LpmTrie<MapData, [u8; 16], u64>,
    ports: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    lost_by_mask: PerCpuHashMap<MapData, u64, u64>,
    slots: HashMap<usize, SlotTargets>,
    /// What the maps hold now, so updates only touch what changed.
    prefixes: HashMap<IpNet, u64>,
    port_masks: HashMap<u16, u64>,
    wakeup_bytes: u32,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Kernel {
    /// Loads the programs (the verifier runs here) with a ring buffer of
    /// `ring_bytes` (a power of two, at least a page), and returns them with
    /// the ring buffer the reader takes.
    pub fn load(ring_bytes: u32) -> Result<(Self, RingBuf<MapData>), Error> {
        // The programs read only the skb and its context, which need no
        // CO-RE relocation against the kernel's BTF.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries("RECORDS", ring_bytes)
            .load(OBJECT)?;
        for name in ["tc_ingress", "tc_egress", "tc_ingress_l3", "tc_egress_l3"] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        // `EbpfLoader::new` parsed the kernel's BTF (megabytes) and the
        // loader has dropped it: hand the freed heap back to the system
        // rather than keep it resident for the agent's lifetime.
        // SAFETY: malloc_trim only releases free memory of glibc's heap.
        unsafe { libc::malloc_trim(0) };
        let ring = take(&mut ebpf, "RECORDS")?;
        let kernel = Self {
            settings: take(&mut ebpf, "SETTINGS")?,
            ipv4: take(&mut ebpf, "IPV4")?,
            ipv6: take(&mut ebpf, "IPV6")?,
            ports: take(&mut ebpf, "PORTS")?,
            counters: take(&mut ebpf, "COUNTERS")?,
            lost_by_mask: take(&mut ebpf, "LOST_BY_MASK")?,
            ebpf,
            attached: HashMap::new(),
            slots: HashMap::new(),
            prefixes: HashMap::new(),
            port_masks: HashMap::new(),
            wakeup_bytes: ring_bytes / 16,
        };
        Ok((kernel, ring))
    }

    /// Attaches the program pair for `kind` to `iface`. Ingress goes first
    /// in the chain and egress last, where tcpdump's taps are, so both see
    /// what tcpdump sees; the programs never change a packet's fate.
    pub fn attach(&mut self, iface: &str, kind: LinkKind) -> Result<(), Error> {
        if self.attached.get(iface).is_some_and(|a| a.kind == kind) {
            return Ok(());
        }
        self.detach(iface);
        let (ingress_name, egress_name) = kind.programs();
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            // Before TCX the hooks need a clsact qdisc; an existing one is shared.
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(Error::Program {
                    name: ingress_name,
                    source: e.into(),
                });
            }
        }
        let attach = |ebpf: &mut Ebpf, name: &'static str, hook, order| {
            let program = classifier(ebpf, name)?;
            let result = if tcx {
                program.attach_with_options(iface, hook, TcAttachOptions::TcxOrder(order))
            } else {
                program.attach(iface, hook)
            };
            result.map_err(|source| Error::Program { name, source })
        };
        let ingress = attach(
            &mut self.ebpf,
            ingress_name,
            TcAttachType::Ingress,
            LinkOrder::first(),
        )?;
        let egress = match egress_name
            .map(|name| {
                attach(
                    &mut self.ebpf,
                    name,
                    TcAttachType::Egress,
                    LinkOrder::last(),
                )
            })
            .transpose()
        {
            Ok(link) => link,
            Err(e) => {
                // Nothing half-attached: undo the ingress side.
                let _ = classifier(&mut self.ebpf, ingress_name).map(|p| p.detach(ingress));
                return Err(e);
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ingress,
                egress,
                kind,
            },
        );
        Ok(())
    }

    /// Detaches both programs from `iface`. An interface that is gone took
    /// its attachments with it; that is not an error.
    pub fn detach(&mut self, iface: &str) {
        let Some(a) = self.attached.remove(iface) else {
            return;
        };
        for (name, link) in a.links() {
            if let Ok(program) = classifier(&mut self.ebpf, name)
                && let Err(e) = program.detach(link)
            {
                tracing::debug!(iface, program = name, error = %e, "detach");
            }
        }
    }

    /// Forgets the attachments of an interface that no longer exists.
    pub fn forget(&mut self, iface: &str) {
        if let Some(a) = self.attached.remove(iface) {
            for (name, link) in a.links() {
                if let Ok(program) = classifier(&mut self.ebpf, name) {
                    // The kernel has dropped the hook; this only closes our link.
                    let _ = program.take_link(link);
                }
            }
        }
    }

    /// (program, instructions the verifier processed, translated bytes) of
    /// each program, to keep an eye on what a change costs.
    pub fn program_sizes(&self) -> Vec<(String, u32, u32)> {
        let mut sizes: Vec<(String, u32, u32)> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((
                    name.to_owned(),
                    info.verified_instruction_count().unwrap_or(0),
                    info.size_translated().unwrap_or(0),
                ))
            })
            .collect();
        sizes.sort();
        sizes
    }

    /// Detaches from every interface (on older kernels the netlink filters
    /// would outlive the process otherwise).
    pub fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            self.detach(&name);
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Makes `slot` select `targets`. The address and port maps are filled
    /// before the slot turns active, so it never sees a half-written set.
    pub fn set_slot(&mut self, slot: usize, targets: SlotTargets) -> Result<(), Error> {
        assert!(slot < MAX_SLOTS, "slot {slot} out of range");
        self.slots.insert(slot, targets);
        self.sync_maps()?;
        self.write_settings()
    }

    /// Stops `slot` from selecting anything: inactive first, then the maps.
    pub fn clear_slot(&mut self, slot: usize) -> Result<(), Error> {
        if self.slots.remove(&slot).is_none() {
            return Ok(());
        }
        self.write_settings()?;
        self.sync_maps()
    }

    fn write_settings(&mut self) -> Result<(), Error> {
        let mut s = Settings {
            wakeup_bytes: self.wakeup_bytes,
            ..Default::default()
        };
        for (&slot, t) in &self.slots {
            let bit = 1u64 << slot;
            s.active |= bit;
            if t.nets.is_empty() {
                s.any_ip |= bit;
            }
            if t.ports.is_empty() {
                s.any_port |= bit;
            }
            s.snaplen = s.snaplen.max(t.copy_len);
        }
        self.settings.set(0, s, 0).map_err(map_err("SETTINGS"))
    }

    /// Brings the LPM tries and the port array in line with the slots.
    fn sync_maps(&mut self) -> Result<(), Error> {
        let prefixes = prefix_masks(self.slots.iter().map(|(&s, t)| (s, &t.nets[..])));
        for (net, &mask) in &prefixes {
            if self.prefixes.get(net) == Some(&mask) {
                continue;
            }
            match net {
                IpNet::V4(n) => self
                    .ipv4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        mask,
                        0,
                    )
                    .map_err(map_err("IPV4"))?,
                IpNet::V6(n) => self
                    .ipv6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        mask,
                        0,
                    )
                    .map_err(map_err("IPV6"))?,
            }
        }
        for net in self.prefixes.keys().filter(|n| !prefixes.contains_key(n)) {
            let removed = match net {
                IpNet::V4(n) => self
                    .ipv4
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
                IpNet::V6(n) => self
                    .ipv6
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
            };
            removed.map_err(map_err("IPV4/IPV6"))?;
        }
        self.prefixes = prefixes;

        let mut ports: HashMap<u16, u64> = HashMap::new();
        for (&slot, t) in &self.slots {
            for &p in &t.ports {
                *ports.entry(p).or_default() |= 1 << slot;
            }
        }
        for (&port, &mask) in &ports {
            if self.port_masks.get(&port) != Some(&mask) {
                self.ports
                    .set(u32::from(port), mask, 0)
                    .map_err(map_err("PORTS"))?;
            }
        }
        for &port in self.port_masks.keys().filter(|p| !ports.contains_key(p)) {
            self.ports
                .set(u32::from(port), 0, 0)
                .map_err(map_err("PORTS"))?;
        }
        self.port_masks = ports;
        Ok(())
    }

    /// One of the programs' counters, summed over CPUs.
    pub fn counter(&self, index: u32) -> Result<u64, Error> {
        let values = self.counters.get(&index, 0).map_err(map_err("COUNTERS"))?;
        Ok(values.iter().sum())
    }

    /// Packets the programs have looked at.
    pub fn packets_seen(&self) -> Result<u64, Error> {
        self.counter(counter::SEEN)
    }

    /// Packets `slot` matched that the ring buffer had no room for, since
    /// the agent started (callers keep a baseline per capture).
    pub fn slot_lost(&self, slot: usize) -> Result<u64, Error> {
        let bit = 1u64 << slot;
        let mut lost = 0;
        for entry in self.lost_by_mask.iter() {
            let (mask, values) = entry.map_err(map_err("LOST_BY_MASK"))?;
            if mask & bit != 0 {
                lost += values.iter().sum::<u64>();
            }
        }
        Ok(lost)
    }
}

/// For every prefix of every slot, the slots whose networks contain it: the
/// longest-prefix match in the kernel then yields every slot that wants an
/// address, not only the one with the most specific network.
pub fn prefix_masks<'a>(slots: impl Iterator<Item = (usize, &'a [IpNet])>) -> HashMap<IpNet, u64> {
    let mut own: HashMap<IpNet, u64> = HashMap::new();
    for (slot, nets) in slots {
        for net in nets {
            *own.entry(net.trunc()).or_default() |= 1 << slot;
        }
    }
    let all: HashSet<IpNet> = own.keys().copied().collect();
    all.into_iter()
        .map(|net| {
            let mut mask = 0;
            let mut ancestor = Some(net);
            while let Some(a) = ancestor {
                mask |= own.get(&a).copied().unwrap_or(0);
                ancestor = a.supernet();
            }
            (net, mask)
        })
        .collect()
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn longer_prefixes_carry_the_slots_of_shorter_ones() {
        let a = nets(&["10.0.0.0/8", "fd00::/16"]);
        let b = nets(&["10.1.0.0/16"]);
        let c = nets(&["10.1.2.3/32", "192.168.0.0/24"]);
        let masks = prefix_masks([(0, &a[..]), (1, &b[..]), (5, &c[..])].into_iter());
        let get = |s: &str| masks[&s.parse::<IpNet>().unwrap()];
        assert_eq!(get("10.0.0.0/8"), 0b1);
        assert_eq!(get("10.1.0.0/16"), 0b11);
        assert_eq!(get("10.1.2.3/32"), 0b100011);
        assert_eq!(get("192.168.0.0/24"), 0b100000);
        assert_eq!(get("fd00::/16"), 0b1);
        assert_eq!(masks.len(), 5);
    }

    #[test]
    fn link_kinds() {
        assert_eq!(LinkKind::from_arphrd(1), LinkKind::Ethernet);
        assert_eq!(LinkKind::from_arphrd(772), LinkKind::Loopback);
        assert_eq!(LinkKind::from_arphrd(65534), LinkKind::RawIp);
        assert_eq!(LinkKind::from_arphrd(768), LinkKind::RawIp);
    }
}
