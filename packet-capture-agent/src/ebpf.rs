//! The eBPF programs from user space: loading them, attaching them to the TC
//! hooks of interfaces, keeping their maps in step with the captures, and
//! forwarding what they log (aya-log) to `tracing`.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::Link as _,
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use aya_log::EbpfLogger;
use ipnet::IpNet;
use packet_capture_common::abi::{
    API_V4, API_V6, DIRECTION_EGRESS, DIRECTION_INGRESS, HOST_ENTRY_EMPTY, HOST_TABLE_ENTRIES,
    HOST_WORDS, LINK_ETHERNET, LINK_RAW_IP, LOOKUP_EXACT, LOOKUP_NONE, LOOKUP_PREFIX, MAX_PREFIXES,
    MAX_SLOTS, Settings, filter_program, host_bit_v4, host_bit_v6, host_entry_v4, resume_program,
};

use crate::filter::{ClassicInsn, Filter, FilterPlace};
use crate::kernel_filter::{self, Access, Ending, Program};
use crate::mmap::Mapping;
use packet_capture_common::crd::TargetDirection;

/// The `tracing` target of what the programs log. Their lines are debug
/// (and lost records warnings), and the programs log only while the agent
/// logs this target at DEBUG: with `LOG_LEVEL=DEBUG`.
pub const KERNEL_LOG_TARGET: &str = "packet_capture_agent::ebpf::kernel";

/// The handle of every netlink tc filter the agent adds ("pcap" in ASCII).
/// With one of our programs' names, it tells a filter an earlier agent left
/// from another tool's program that happens to have the same name.
const FILTER_HANDLE: u32 = 0x7063_6170;

/// Every program's name, as netlink tc filters carry it.
const PROGRAMS: [&str; 4] = ["tc_ingress", "tc_egress", "tc_ingress_l3", "tc_egress_l3"];

/// The programs the captures' filters go back to, by (direction, link):
/// never attached, only reached by tail call.
const RESUME_PROGRAMS: [(&str, u8, u8); 4] = [
    ("tc_ingress_resume", DIRECTION_INGRESS, LINK_ETHERNET),
    ("tc_egress_resume", DIRECTION_EGRESS, LINK_ETHERNET),
    ("tc_ingress_l3_resume", DIRECTION_INGRESS, LINK_RAW_IP),
    ("tc_egress_l3_resume", DIRECTION_EGRESS, LINK_RAW_IP),
];

/// How the programs are attached to the TC hooks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), netlink filters before.
    #[default]
    Auto,
    /// TCX links, which close with the agent's process.
    Tcx,
    /// A clsact qdisc and netlink tc filters, which outlive the process
    /// unless it removes them.
    Netlink,
}

impl TcAttach {
    fn tcx(self) -> bool {
        match self {
            Self::Auto => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
            Self::Tcx => true,
            Self::Netlink => false,
        }
    }
}

/// The waits before a TCX attach is tried again when the kernel still has
/// the program on the hook (EEXIST). A detached link goes only with the
/// last reference to its file, and a child process forked meanwhile holds
/// one until its exec closes it: the kernel then releases it. Without the
/// retries, a capture starting just after the last one ended could find an
/// interface without programs and see nothing there.
const TCX_REATTACH_WAITS: [Duration; 8] = [
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
    Duration::from_millis(80),
    Duration::from_millis(160),
    Duration::from_millis(320),
    Duration::from_millis(640),
];

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
    #[error("eBPF map {name}: duplicating its descriptor: {source}")]
    MapFd {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {name}: mapping it into memory: {source}")]
    MapMemory {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("reading the eBPF programs' logs: {0}")]
    Log(#[from] aya_log::Error),
    #[error("starting the eBPF log thread: {0}")]
    LogThread(#[source] std::io::Error),
    #[error("counting the CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error("eBPF program array FILTER_PROGRAMS: {0}")]
    ProgramArray(#[source] std::io::Error),
    #[error("eBPF map {map}: {wanted} prefixes wanted, it holds {MAX_PREFIXES}")]
    Full { map: &'static str, wanted: usize },
}

/// A capture's filters in the kernel, by link type, each as a program per
/// direction (see [`filter_program`]): held while they are in the program
/// array.
#[derive(Default)]
struct SlotFilters {
    programs: [Option<[Program; 2]>; 2],
}

/// The directions, in the order of [`SlotFilters`]' pairs.
const DIRECTIONS: [u8; 2] = [DIRECTION_INGRESS, DIRECTION_EGRESS];

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
    /// From the interface's ARPHRD type (`linux/if_arp.h`): Ethernet,
    /// loopback and IEEE 802 devices carry an Ethernet header; tun,
    /// wireguard, ipip, sit, gre and ppp devices none. `None` for the
    /// others (InfiniBand, CAN, 802.11 monitors, nlmon, ...), whose headers
    /// the programs do not read: their frames would be taken for IP.
    pub fn from_arphrd(arphrd: u16) -> Option<Self> {
        const ETHER: u16 = 1;
        const IEEE802: u16 = 6;
        const PPP: u16 = 512;
        const RAWIP: u16 = 519;
        const TUNNEL: u16 = 768;
        const TUNNEL6: u16 = 769;
        const LOOPBACK: u16 = 772;
        const SIT: u16 = 776;
        const IPGRE: u16 = 778;
        const IP6GRE: u16 = 823;
        const NONE: u16 = 0xfffe;
        match arphrd {
            ETHER | IEEE802 => Some(Self::Ethernet),
            LOOPBACK => Some(Self::Loopback),
            PPP | RAWIP | TUNNEL | TUNNEL6 | SIT | IPGRE | IP6GRE | NONE => Some(Self::RawIp),
            _ => None,
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
    /// Addresses and networks; empty: any address, unless `only_nets`.
    pub nets: Vec<IpNet>,
    /// Only `nets`: none selects nothing.
    pub only_nets: bool,
    /// Ports; empty: any port.
    pub ports: Vec<u16>,
    /// Whether an address in `nets` must be the destination, the source,
    /// or either.
    pub direction: TargetDirection,
    /// Bytes the kernel must copy for this slot.
    pub copy_len: u32,
}

struct Attachment {
    ingress: SchedClassifierLinkId,
    egress: Option<SchedClassifierLinkId>,
    kind: LinkKind,
    /// The interface's index when attached: if attaching made its clsact
    /// qdisc (netlink filters only, [`Kernel::clsact_made`]), the qdisc
    /// goes with the filters.
    index: Option<u32>,
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
    /// The interfaces captures are taken on by name, with their kind and
    /// the index of the interface that has the name now. The programs are
    /// attached to them only while a capture runs: an idle agent costs the
    /// packets nothing.
    links: HashMap<String, (LinkKind, u32)>,
    attached: HashMap<String, Attachment>,
    /// The interfaces (by index) whose clsact qdisc attaching made: a
    /// rename forgets the attachment under the old name, not who made the
    /// qdisc that the attachment under the new name finds.
    clsact_made: HashSet<u32>,
    settings: Array<MapData, Settings>,
    ipv4: LpmTrie<MapData, [u8; 4], u64>,
    ipv6: LpmTrie<MapData, [u8; 16], u64>,
    /// The whole addresses of the tries, for the hash lookups.
    ipv4_hosts: BpfHashMap<MapData, [u8; 4], u64>,
    ipv6_hosts: BpfHashMap<MapData, [u8; 16], u64>,
    ipv4_host_table: HostTable,
    ports: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    lost_by_mask: PerCpuHashMap<MapData, u64, u64>,
    lost_by_slot: PerCpuArray<MapData, u64>,
    /// The programs' `.bss`: `DIAGNOSTICS`, their only mutable global.
    diagnostics: Array<MapData, u64>,
    /// The hooks that have said they run, and the diagnostics' per-CPU
    /// notes: emptied when diagnostics are switched on.
    hooks_seen: BpfHashMap<MapData, u32, u8>,
    diag_state: PerCpuArray<MapData, u64>,
    /// The program array of the captures' filters (and the resume
    /// programs), and their per-CPU state: translated filters name both.
    filter_programs: MapData,
    filter_state: MapData,
    /// Second descriptors of `filtered` and of the diagnostics switch, which
    /// the filter programs name (aya's typed maps do not lend theirs).
    filtered_fd: OwnedFd,
    diagnostics_fd: OwnedFd,
    filters: HashMap<usize, SlotFilters>,
    /// Packets each slot's filter rejected in the kernel.
    filtered: PerCpuArray<MapData, u64>,
    /// Forwards the programs' log records while the kernel is loaded.
    _logs: KernelLogs,
    slots: HashMap<usize, SlotTargets>,
    /// What the maps hold now, so updates only touch what changed.
    prefixes: HashMap<IpNet, u64>,
    port_masks: HashMap<u16, u64>,
    ring_bytes: u32,
    /// Attach with TCX links rather than netlink filters.
    tcx: bool,
    /// The agent API's address: its TCP is never captured.
    own_api: Option<SocketAddr>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// The untyped map `name`, for what aya has no typed access to.
fn take_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, Error> {
    use aya::maps::Map;
    match ebpf.take_map(name).ok_or(Error::Missing(name))? {
        Map::ProgramArray(data)
        | Map::PerCpuArray(data)
        | Map::RingBuf(data)
        | Map::Array(data) => Ok(data),
        _ => Err(Error::Missing(name)),
    }
}

/// A descriptor of map `name` of its own.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, Error> {
    use aya::maps::Map;
    match ebpf.map(name).ok_or(Error::Missing(name))? {
        Map::Array(data) | Map::PerCpuArray(data) => data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| Error::MapFd { name, source }),
        _ => Err(Error::Missing(name)),
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl Kernel {
    /// Loads the programs (the verifier runs here) with a ring buffer of
    /// `ring_bytes` (a power of two, at least a page), and returns them with
    /// the ring buffer the reader takes.
    pub fn load(ring_bytes: u32) -> Result<(Self, MapData), Error> {
        // The programs read only the skb and its context: no CO-RE
        // relocation, so the loader never reads the kernel's BTF.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RECORDS", ring_bytes)
            .load(OBJECT)?;
        for name in PROGRAMS
            .into_iter()
            .chain(RESUME_PROGRAMS.map(|(name, ..)| name))
        {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let filter_programs = take_data(&mut ebpf, "FILTER_PROGRAMS")?;
        for (name, direction, link) in RESUME_PROGRAMS {
            let program = classifier(&mut ebpf, name)?;
            let fd = program
                .fd()
                .map_err(|source| Error::Program { name, source })?;
            kernel_filter::set_program_array(
                filter_programs.fd().as_fd(),
                resume_program(direction, link),
                Some(fd.as_fd()),
            )
            .map_err(Error::ProgramArray)?;
        }
        // The loader has dropped its parse of the object and the verifier's
        // logs: hand the freed heap back to the system rather than keep it
        // resident for the agent's lifetime.
        // SAFETY: malloc_trim only releases free memory of glibc's heap.
        unsafe { libc::malloc_trim(0) };
        let filtered_fd = map_fd(&ebpf, "FILTERED")?;
        let diagnostics_fd = map_fd(&ebpf, ".bss")?;
        let ring = take_data(&mut ebpf, "RECORDS")?;
        let mut kernel = Self {
            settings: take(&mut ebpf, "SETTINGS")?,
            ipv4: take(&mut ebpf, "IPV4")?,
            ipv6: take(&mut ebpf, "IPV6")?,
            ipv4_hosts: take(&mut ebpf, "IPV4_HOSTS")?,
            ipv6_hosts: take(&mut ebpf, "IPV6_HOSTS")?,
            ipv4_host_table: HostTable::new(take_data(&mut ebpf, "IPV4_HOST_TABLE")?)?,
            ports: take(&mut ebpf, "PORTS")?,
            counters: take(&mut ebpf, "COUNTERS")?,
            lost_by_mask: take(&mut ebpf, "LOST_BY_MASK")?,
            lost_by_slot: take(&mut ebpf, "LOST_BY_SLOT")?,
            diagnostics: take(&mut ebpf, ".bss")?,
            hooks_seen: take(&mut ebpf, "HOOKS_SEEN")?,
            diag_state: take(&mut ebpf, "DIAG_STATE")?,
            filter_programs,
            filter_state: take_data(&mut ebpf, "FILTER_STATE")?,
            filtered_fd,
            diagnostics_fd,
            filters: HashMap::new(),
            filtered: take(&mut ebpf, "FILTERED")?,
            _logs: KernelLogs::start(&mut ebpf)?,
            ebpf,
            links: HashMap::new(),
            attached: HashMap::new(),
            clsact_made: HashSet::new(),
            slots: HashMap::new(),
            prefixes: HashMap::new(),
            port_masks: HashMap::new(),
            ring_bytes,
            tcx: TcAttach::Auto.tcx(),
            own_api: None,
        };
        kernel.follow_log_level()?;
        Ok((kernel, ring))
    }

    /// Switches the programs' diagnostics on when this process logs
    /// [`KERNEL_LOG_TARGET`] at DEBUG, off otherwise (by the log filter of
    /// whoever calls: the agent's, or a test's); whether they are on now.
    pub fn follow_log_level(&mut self) -> Result<bool, Error> {
        let on = kernel_debug_enabled();
        if on != self.diagnostics()? {
            self.set_diagnostics(on)?;
        }
        Ok(on)
    }

    /// Switches the programs' diagnostics on or off, at once and for every
    /// interface, without reloading or detaching anything. Switched on, they
    /// start afresh: each hook says again that it runs, and losses count
    /// from then.
    pub fn set_diagnostics(&mut self, on: bool) -> Result<(), Error> {
        if on {
            let seen: Vec<u32> = self.hooks_seen.keys().filter_map(Result::ok).collect();
            for key in seen {
                // Gone already: an LRU entry the kernel evicted meanwhile.
                let _ = self.hooks_seen.remove(&key);
            }
            // The per-CPU notes of the programs, zero meaning "nothing yet".
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
            for index in 0..self.diag_state.len() {
                let zeros =
                    PerCpuValues::try_from(vec![0u64; cpus.get() as usize]).map_err(Error::Cpus)?;
                self.diag_state
                    .set(index, zeros, 0)
                    .map_err(map_err("DIAG_STATE"))?;
            }
        }
        self.diagnostics
            .set(0, &u64::from(on), 0)
            .map_err(map_err(".bss"))
    }

    /// Whether the programs' diagnostics are on.
    pub fn diagnostics(&self) -> Result<bool, Error> {
        Ok(self.diagnostics.get(&0, 0).map_err(map_err(".bss"))? != 0)
    }

    /// How later attachments are made ([`TcAttach::Auto`] after `load`).
    pub fn set_tc_attach(&mut self, mode: TcAttach) {
        self.tcx = mode.tcx();
    }

    /// The agent API's address, whose TCP the programs never capture
    /// (none after `load`; an unspecified address excludes nothing).
    pub fn set_own_api(&mut self, api: Option<SocketAddr>) -> Result<(), Error> {
        self.own_api = api.filter(|a| !a.ip().is_unspecified());
        self.write_settings()
    }

    /// Takes `iface` as one to capture on: attached at once while a capture
    /// runs, otherwise when the next one starts. Netlink filters an earlier
    /// agent left on it go now, whatever the attach mode (see
    /// [`remove_stale_filters`]).
    pub fn link_up(&mut self, iface: &str, kind: LinkKind, index: u32) -> Result<(), Error> {
        if let Some((_, was)) = self.links.insert(iface.to_owned(), (kind, index))
            && was != index
        {
            // A new interface with the name of one whose departure was not
            // heard yet (rtnetlink drops news when its queue overflows):
            // the old one's programs went with it.
            self.forget(iface);
        }
        remove_stale_filters(iface);
        if self.slots.is_empty() {
            return Ok(());
        }
        self.attach(iface, kind)
    }

    /// Forgets an interface that no longer exists, unless its name is
    /// another interface's by now.
    pub fn link_gone(&mut self, iface: &str, index: u32) {
        if self.links.get(iface).is_some_and(|&(_, now)| now == index) {
            self.links.remove(iface);
            self.forget(iface);
        }
        // Renamed, it keeps its qdisc; gone (or moved to another
        // namespace), the qdisc went with it.
        if !interface_exists(index) {
            self.clsact_made.remove(&index);
        }
    }

    /// The interfaces captures are taken on.
    pub fn links(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Attaches to every interface captures are taken on; one that refuses
    /// is left out, and says why.
    fn attach_links(&mut self) {
        let links: Vec<(String, LinkKind)> = self
            .links
            .iter()
            .map(|(name, &(kind, _))| (name.clone(), kind))
            .collect();
        for (iface, kind) in links {
            if let Err(e) = self.attach(&iface, kind) {
                let error = crate::capture::error_chain(&e);
                tracing::warn!(iface, error, "cannot capture on this interface");
            }
        }
        let mut attached: Vec<&str> = self.attached.keys().map(String::as_str).collect();
        attached.sort_unstable();
        tracing::info!(interfaces = ?attached, "eBPF programs attached");
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
        let tcx = self.tcx;
        let ifname = interface_cstr(iface).map_err(|source| Error::Program {
            name: ingress_name,
            source,
        })?;
        // Before TCX the hooks need a clsact qdisc; an existing one is
        // shared (and stays ours if attaching made it under an earlier name).
        let index = interface_index(iface).ok();
        match (!tcx).then(|| tc::qdisc_add_clsact(&ifname)) {
            Some(Ok(())) => self.clsact_made.extend(index),
            Some(Err(tc::TcError::NetlinkError(e))) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Some(Err(e)) => {
                return Err(Error::Program {
                    name: ingress_name,
                    source: e.into(),
                });
            }
            None => {}
        }
        let attach = |ebpf: &mut Ebpf, name: &'static str, hook, order: fn() -> LinkOrder| {
            let program = classifier(ebpf, name)?;
            let mut waits = TCX_REATTACH_WAITS.iter();
            loop {
                let options = if tcx {
                    tc::TcAttach::Tcx {
                        attach_type: hook,
                        order: order(),
                    }
                } else {
                    tc::TcAttach::Netlink {
                        parent: hook.into(),
                        options: NlOptions {
                            handle: FILTER_HANDLE.into(),
                            ..Default::default()
                        },
                    }
                };
                match program.attach(&ifname, options) {
                    Err(aya::programs::ProgramError::SyscallError(e))
                        if tcx
                            && e.io_error.raw_os_error() == Some(libc::EEXIST)
                            && let Some(wait) = waits.next() =>
                    {
                        std::thread::sleep(*wait);
                    }
                    result => return result.map_err(|source| Error::Program { name, source }),
                }
            }
        };
        let ebpf = &mut self.ebpf;
        let links = attach(ebpf, ingress_name, TcAttachType::Ingress, LinkOrder::first).and_then(
            |ingress| match egress_name
                .map(|name| attach(ebpf, name, TcAttachType::Egress, LinkOrder::last))
                .transpose()
            {
                Ok(egress) => Ok((ingress, egress)),
                Err(e) => {
                    let _ = classifier(ebpf, ingress_name).map(|p| p.detach(ingress));
                    Err(e)
                }
            },
        );
        let (ingress, egress) = match links {
            Ok(links) => links,
            Err(e) => {
                // Nothing half-attached: what failed leaves no qdisc of ours.
                self.release_own_clsact(iface, index);
                return Err(e);
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ingress,
                egress,
                kind,
                index,
            },
        );
        Ok(())
    }

    /// Detaches both programs from `iface`, and the clsact qdisc attaching
    /// made. An interface that is gone took its attachments with it; that
    /// is not an error.
    pub fn detach(&mut self, iface: &str) {
        let Some(a) = self.attached.remove(iface) else {
            return;
        };
        let index = a.index;
        for (name, link) in a.links() {
            if let Ok(program) = classifier(&mut self.ebpf, name)
                && let Err(e) = program.detach(link)
            {
                tracing::debug!(iface, program = name, error = %e, "detach");
            }
        }
        self.release_own_clsact(iface, index);
    }

    /// Deletes the clsact qdisc of `iface` (at `index`) if attaching made it.
    fn release_own_clsact(&mut self, iface: &str, index: Option<u32>) {
        if index.is_some_and(|i| self.clsact_made.remove(&i)) {
            release_clsact(iface);
        }
    }

    /// Forgets the attachments of an interface that no longer exists.
    fn forget(&mut self, iface: &str) {
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

    /// Makes `slot` select `targets`. The address and port maps are filled
    /// before the slot turns active, so it never sees a half-written set.
    ///
    /// The first slot to turn active attaches the programs, which are in
    /// place before it selects anything: its first packets are not missed.
    /// Whether `slot` selects packets (set, and not cleared since).
    pub fn selects(&self, slot: usize) -> bool {
        self.slots.contains_key(&slot)
    }

    pub fn set_slot(&mut self, slot: usize, targets: SlotTargets) -> Result<(), Error> {
        assert!(slot < MAX_SLOTS, "slot {slot} out of range");
        if self.slots.is_empty() {
            self.attach_links();
        }
        let before = self.slots.insert(slot, targets);
        if let Err(e) = self.sync_maps() {
            // Back to the targets the slot had (none for a new capture):
            // they fitted, and the removals come first.
            match before {
                Some(targets) => self.slots.insert(slot, targets),
                None => self.slots.remove(&slot),
            };
            if let Err(again) = self.sync_maps() {
                tracing::error!(slot, "the targets maps could not be restored: {again}");
            }
            if self.slots.is_empty() {
                self.detach_all();
            }
            // The lookups the maps held meanwhile may have changed.
            if let Err(again) = self.write_settings() {
                tracing::error!(slot, "the settings could not be restored: {again}");
            }
            return Err(e);
        }
        self.write_settings()
    }

    /// Stops `slot` from selecting anything: inactive first, then the maps
    /// and its filters. The last slot to go detaches the programs.
    pub fn clear_slot(&mut self, slot: usize) -> Result<(), Error> {
        if self.slots.remove(&slot).is_none() {
            return self.clear_filter(slot);
        }
        self.write_settings()?;
        if self.slots.is_empty() {
            self.detach_all();
            tracing::info!("eBPF programs detached: no capture runs");
        }
        // The slot is inactive already: its filters go even when the maps
        // could not all be put right (the next sync tries again).
        let synced = self.sync_maps();
        // Again, now that the maps say which lookups the slots left need.
        self.write_settings()?;
        self.clear_filter(slot)?;
        synced
    }

    /// Runs `filter` in the kernel for `slot`, for the frames of each link
    /// type it translates for; it takes effect with [`Kernel::set_slot`].
    /// Says where it runs: what does not translate or load runs in user
    /// space (the capture's sink always has the filter).
    pub fn set_filter(&mut self, slot: usize, filter: &Filter) -> FilterPlace {
        let mut filters = SlotFilters::default();
        let mut user_space = Vec::new();
        for (link, name) in [(LINK_ETHERNET, "Ethernet"), (LINK_RAW_IP, "raw IP")] {
            let loaded = filter
                .classic(link)
                .map_err(|e| e.to_string())
                .and_then(|classic| self.load_filter(slot, link, classic));
            match loaded {
                Ok(programs) => filters.programs[usize::from(link)] = Some(programs),
                Err(e) => user_space.push(format!("{name} frames: {e}")),
            }
        }
        self.filters.insert(slot, filters);
        if user_space.is_empty() {
            FilterPlace::Kernel
        } else {
            FilterPlace::UserSpace(user_space.join("; "))
        }
    }

    /// Loads `classic` as `slot`'s filter of `link` frames, one program for
    /// each direction's hook, in the fastest translation this process may
    /// load, and puts them in the program array.
    fn load_filter(
        &self,
        slot: usize,
        link: u8,
        classic: &[ClassicInsn],
    ) -> Result<[Program; 2], String> {
        let name = format!("filter_{slot}");
        let mut refused = None;
        let mut loaded = None;
        for access in Access::PREFERRED {
            let mut programs = Vec::new();
            for direction in DIRECTIONS {
                let ending = Ending::TailCall {
                    slot: slot as u32,
                    state: self.filter_state.fd().as_fd(),
                    programs: self.filter_programs.fd().as_fd(),
                    resume: resume_program(direction, link),
                    filtered: self.filtered_fd.as_fd(),
                    diagnostics: self.diagnostics_fd.as_fd(),
                };
                let insns =
                    kernel_filter::translate(classic, ending, access).map_err(|e| e.to_string())?;
                match kernel_filter::load_program(&insns, &name) {
                    Ok(program) => programs.push(program),
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
            if let Ok(pair) = <[Program; 2]>::try_from(programs) {
                loaded = Some(pair);
                break;
            }
        }
        let programs = loaded
            .ok_or_else(|| format!("the kernel refused it: {}", refused.expect("one attempt")))?;
        let array = self.filter_programs.fd().as_fd();
        for (direction, program) in DIRECTIONS.into_iter().zip(&programs) {
            let index = filter_program(slot as u32, direction, link);
            if let Err(e) = kernel_filter::set_program_array(array, index, Some(program.fd())) {
                // Neither direction's program stays behind in the array.
                let _ = self.remove_filter(slot, link);
                return Err(format!("FILTER_PROGRAMS: {e}"));
            }
        }
        Ok(programs)
    }

    /// Takes `slot`'s filters out of the kernel (after its settings no
    /// longer name them).
    fn clear_filter(&mut self, slot: usize) -> Result<(), Error> {
        let Some(filters) = self.filters.remove(&slot) else {
            return Ok(());
        };
        for (link, programs) in filters.programs.iter().enumerate() {
            if programs.is_some() {
                self.remove_filter(slot, link as u8)
                    .map_err(Error::ProgramArray)?;
            }
        }
        Ok(())
    }

    /// Empties `slot`'s entries for `link` frames in the program array, in
    /// both directions (the first error, once both were tried).
    fn remove_filter(&self, slot: usize, link: u8) -> std::io::Result<()> {
        let array = self.filter_programs.fd().as_fd();
        DIRECTIONS
            .map(|direction| {
                let index = filter_program(slot as u32, direction, link);
                kernel_filter::set_program_array(array, index, None)
            })
            .into_iter()
            .collect()
    }

    fn write_settings(&mut self) -> Result<(), Error> {
        let mut s = Settings {
            ring_bytes: self.ring_bytes,
            // A wake-up costs the receiving CPU an interrupt to itself and
            // one to the reader's CPU (on the benchmark's VM about 20 µs):
            // at a quarter of the ring it is a few nanoseconds a packet of
            // the default ring, and the reader still has three quarters of
            // the ring to wake up in (docs/capture.md).
            wakeup_bytes: self.ring_bytes / 4,
            ..Default::default()
        };
        if let Some(api) = self.own_api {
            s.api_port = api.port();
            match api.ip() {
                IpAddr::V4(v4) => {
                    s.api_v4 = v4.octets();
                    s.api_family = API_V4;
                }
                IpAddr::V6(v6) => {
                    s.api_v6 = v6.octets();
                    s.api_family = API_V6;
                }
            }
        }
        for (&slot, t) in &self.slots {
            let bit = 1u64 << slot;
            s.active |= bit;
            if t.nets.is_empty() && !t.only_nets {
                s.any_ip |= bit;
            }
            match t.direction {
                TargetDirection::Both => {}
                TargetDirection::Ingress => s.ingress_only |= bit,
                TargetDirection::Egress => s.egress_only |= bit,
            }
            if t.ports.is_empty() {
                s.any_port |= bit;
            }
            if let Some(filters) = self.filters.get(&slot) {
                for (link, program) in filters.programs.iter().enumerate() {
                    if program.is_some() {
                        s.kernel_filter[link] |= bit;
                    }
                }
            }
            s.snaplen = s.snaplen.max(t.copy_len);
        }
        (s.v4_lookup, s.v6_lookup) = lookups(self.prefixes.keys());
        s.host_bits = host_bits(self.prefixes.keys());
        self.settings.set(0, &s, 0).map_err(map_err("SETTINGS"))
    }

    /// Brings the LPM tries, the hosts maps and the port array in line with
    /// the slots. More prefixes than the maps hold are refused before
    /// anything is written; entries that go are removed before new ones are
    /// added, so a retarget needs no more room than the larger of its two
    /// sets. What the maps hold stays recorded entry by entry, so after a
    /// failure (the kernel out of memory) the next call puts right whatever
    /// this one left.
    fn sync_maps(&mut self) -> Result<(), Error> {
        let wanted = prefix_masks(self.slots.iter().map(|(&s, t)| (s, &t.nets[..])));
        // Refused before anything is written, and so the tries, one entry
        // larger, never reach their size.
        for (map, v4) in [("IPV4", true), ("IPV6", false)] {
            let count = wanted.keys().filter(|n| n.addr().is_ipv4() == v4).count();
            if count > MAX_PREFIXES as usize {
                return Err(Error::Full { map, wanted: count });
            }
        }
        let gone = self
            .prefixes
            .keys()
            .filter(|n| !wanted.contains_key(n))
            .map(|&net| (net, None));
        let changed = wanted
            .iter()
            .filter(|&(net, mask)| self.prefixes.get(net) != Some(mask))
            .map(|(&net, &mask)| (net, Some(mask)));
        // Removals first: the maps never hold more than what is wanted.
        let updates: Vec<(IpNet, Option<u64>)> = gone.chain(changed).collect();
        let mut result = Ok(());
        for (net, mask) in updates {
            let existed = self.prefixes.contains_key(&net);
            // A failure leaves the record as it was: a new entry that failed
            // is in neither map (`put_prefix`), and a changed or removed one
            // is written again by the next sync.
            result = self.put_prefix(&net, mask, existed);
            if result.is_err() {
                break;
            }
            match mask {
                Some(mask) => self.prefixes.insert(net, mask),
                None => self.prefixes.remove(&net),
            };
        }
        self.ipv4_host_table.sync(&self.prefixes);
        result?;

        let mut ports: HashMap<u16, u64> = HashMap::new();
        for (&slot, t) in &self.slots {
            for &p in &t.ports {
                *ports.entry(p).or_default() |= 1 << slot;
            }
        }
        let gone = self.port_masks.keys().filter(|p| !ports.contains_key(p));
        let changed = ports
            .iter()
            .filter(|&(port, mask)| self.port_masks.get(port) != Some(mask))
            .map(|(port, _)| port);
        let updates: Vec<u16> = gone.chain(changed).copied().collect();
        for port in updates {
            let mask = ports.get(&port).copied().unwrap_or(0);
            self.ports
                .set(u32::from(port), &mask, 0)
                .map_err(map_err("PORTS"))?;
            self.port_masks.insert(port, mask);
        }
        self.port_masks.retain(|_, &mut mask| mask != 0);
        Ok(())
    }

    /// Sets the slots of `net` in its family's trie (and hosts map, for a
    /// whole address), or removes it (`None`).
    fn put_prefix(&mut self, net: &IpNet, mask: Option<u64>, existed: bool) -> Result<(), Error> {
        match net {
            IpNet::V4(n) => put_prefix(
                &mut self.ipv4,
                &mut self.ipv4_hosts,
                n.addr().octets(),
                n.prefix_len(),
                mask,
                existed,
            )
            .map_err(map_err("IPV4")),
            IpNet::V6(n) => put_prefix(
                &mut self.ipv6,
                &mut self.ipv6_hosts,
                n.addr().octets(),
                n.prefix_len(),
                mask,
                existed,
            )
            .map_err(map_err("IPV6")),
        }
    }

    /// One of the programs' counters, summed over CPUs.
    pub fn counter(&self, index: u32) -> Result<u64, Error> {
        let values = self.counters.get(&index, 0).map_err(map_err("COUNTERS"))?;
        Ok(values.iter().sum())
    }

    /// How many times the programs have run, as the kernel counts it while
    /// its run statistics are on (`aya::sys::enable_stats`); tail calls
    /// are not runs of their own.
    pub fn program_runs(&self) -> u64 {
        self.ebpf
            .programs()
            .filter_map(|(_, program)| program.info().ok())
            .map(|info| info.run_count())
            .sum()
    }

    /// The prefixes the tries hold, read back from the kernel, with the
    /// slots each selects: what the programs look up.
    pub fn selected_prefixes(&self) -> Result<HashMap<IpNet, u64>, Error> {
        let mut out = HashMap::new();
        read_trie(&self.ipv4, &mut out).map_err(map_err("IPV4"))?;
        read_trie(&self.ipv6, &mut out).map_err(map_err("IPV6"))?;
        Ok(out)
    }

    /// Packets `slot`'s filter rejected in the kernel since the agent
    /// started (callers keep a baseline per capture).
    pub fn slot_filtered(&self, slot: usize) -> Result<u64, Error> {
        let values = self
            .filtered
            .get(&(slot as u32), 0)
            .map_err(map_err("FILTERED"))?;
        Ok(values.iter().sum())
    }

    /// Drops the losses counted under slot masks that no `held` slot is
    /// in. No capture reads them any more: a capture's count is what its
    /// slot's entries gained since its start, and a slot's entries go only
    /// once no capture holds it (after its last count was read). Without
    /// this the map, of
    /// [`LOST_MASKS`](packet_capture_common::abi::LOST_MASKS) entries,
    /// would fill over an agent's life, and the losses of new sets of
    /// captures would count in the ring's total only.
    pub fn prune_lost(&mut self, held: u64) {
        let unheld: Vec<u64> = self
            .lost_by_mask
            .keys()
            .filter_map(Result::ok)
            .filter(|mask| mask & held == 0)
            .collect();
        for mask in unheld {
            // Gone already is as good: nothing else removes entries.
            let _ = self.lost_by_mask.remove(&mask);
        }
    }

    /// Packets `slot` matched that the ring buffer had no room for, since
    /// the agent started (callers keep a baseline per capture).
    pub fn slot_lost(&self, slot: usize) -> Result<u64, Error> {
        let bit = 1u64 << slot;
        let alone = self
            .lost_by_slot
            .get(&(slot as u32), 0)
            .map_err(map_err("LOST_BY_SLOT"))?;
        let mut lost: u64 = alone.iter().sum();
        for entry in self.lost_by_mask.iter() {
            let (mask, values) = entry.map_err(map_err("LOST_BY_MASK"))?;
            if mask & bit != 0 {
                lost += values.iter().sum::<u64>();
            }
        }
        Ok(lost)
    }
}

/// [`Kernel::put_prefix`] for one family's maps (addresses of `N` bytes).
/// A new entry (`existed` false) that fails to go in is taken out of
/// both maps again; one that existed is left as it is, live.
fn put_prefix<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], u64>,
    hosts: &mut BpfHashMap<MapData, [u8; N], u64>,
    addr: [u8; N],
    prefix_len: u8,
    mask: Option<u64>,
    existed: bool,
) -> Result<(), aya::maps::MapError> {
    let key = Key::new(u32::from(prefix_len), addr);
    let whole = usize::from(prefix_len) == N * 8;
    let remove = |trie: &mut LpmTrie<MapData, [u8; N], u64>,
                  hosts: &mut BpfHashMap<MapData, [u8; N], u64>| {
        let from_trie = absent_is_removed(trie.remove(&key));
        let from_hosts = if whole {
            absent_is_removed(hosts.remove(&addr))
        } else {
            Ok(())
        };
        from_trie.and(from_hosts)
    };
    match mask {
        Some(mask) => {
            let inserted = trie.insert(&key, &mask, 0).and_then(|()| {
                if whole {
                    hosts.insert(&addr, &mask, 0)
                } else {
                    Ok(())
                }
            });
            if inserted.is_err() && !existed {
                // Not in one map and missing from the other: the entry
                // goes from both, and the caller records it as absent.
                let _ = remove(trie, hosts);
            }
            inserted
        }
        None => remove(trie, hosts),
    }
}

/// Adds what one family's trie holds to `out`.
fn read_trie<const N: usize>(
    trie: &LpmTrie<MapData, [u8; N], u64>,
    out: &mut HashMap<IpNet, u64>,
) -> Result<(), aya::maps::MapError>
where
    IpAddr: From<[u8; N]>,
{
    for entry in trie.iter() {
        let (key, mask) = entry?;
        let len = u8::try_from(key.prefix_len()).expect("a prefix length fits a byte");
        let net = IpNet::new(IpAddr::from(key.data()), len).expect("the trie's prefixes are valid");
        out.insert(net, mask);
    }
    Ok(())
}

/// A removal of an entry that is not there has done what it was for.
fn absent_is_removed(removed: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match removed {
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        removed => removed,
    }
}

/// How the programs look up each family's addresses, given every prefix
/// the maps hold: by hash while all are whole addresses, by trie once one
/// is a network.
fn lookups<'a>(prefixes: impl Iterator<Item = &'a IpNet>) -> (u8, u8) {
    let (mut v4, mut v6) = (LOOKUP_NONE, LOOKUP_NONE);
    for net in prefixes {
        let lookup = if net.prefix_len() == net.max_prefix_len() {
            LOOKUP_EXACT
        } else {
            LOOKUP_PREFIX
        };
        let family = if net.addr().is_ipv4() {
            &mut v4
        } else {
            &mut v6
        };
        *family = (*family).max(lookup);
    }
    (v4, v6)
}

/// `IPV4_HOST_TABLE`, written in place through a shared mapping: a word
/// at a time, with 8-byte stores the programs never see half done.
struct HostTable {
    words: Mapping,
}

impl HostTable {
    fn new(map: MapData) -> Result<Self, Error> {
        let len = HOST_TABLE_ENTRIES as usize * size_of::<[u64; 2]>();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let words =
            Mapping::new(map.fd().as_fd(), len, prot, 0).map_err(|source| Error::MapMemory {
                name: "IPV4_HOST_TABLE",
                source,
            })?;
        let mut table = Self { words };
        table.sync(&HashMap::new());
        Ok(table)
    }

    /// Gives each host bit the slots of the lowest targeted IPv4 address
    /// with that bit (the others are found in `IPV4_HOSTS`), and empties
    /// the rest; writes only the words that change.
    fn sync(&mut self, prefixes: &HashMap<IpNet, u64>) {
        let mut entries = [HOST_ENTRY_EMPTY; HOST_TABLE_ENTRIES as usize];
        let mut hosts: Vec<([u8; 4], u64)> = prefixes
            .iter()
            .filter_map(|(net, &slots)| match net {
                IpNet::V4(n) if n.prefix_len() == 32 => Some((n.addr().octets(), slots)),
                _ => None,
            })
            .collect();
        hosts.sort_unstable();
        for (addr, slots) in hosts.into_iter().rev() {
            entries[host_bit_v4(addr) as usize] = host_entry_v4(addr, slots);
        }
        for (i, word) in entries.into_iter().flatten().enumerate() {
            // SAFETY: inside the mapping (two words per entry), 8-aligned
            // (the mapping starts on a page), shared with the programs,
            // which only read it.
            let place = unsafe { &*self.words.at(i * 8).cast::<AtomicU64>() };
            if place.load(Ordering::Relaxed) != word {
                place.store(word, Ordering::Release);
            }
        }
    }
}

/// `Settings::host_bits` of the whole addresses among `prefixes`.
fn host_bits<'a>(prefixes: impl Iterator<Item = &'a IpNet>) -> [u64; HOST_WORDS] {
    let mut bits = [0; HOST_WORDS];
    for net in prefixes.filter(|n| n.prefix_len() == n.max_prefix_len()) {
        let bit = match net.addr() {
            IpAddr::V4(a) => host_bit_v4(a.octets()),
            IpAddr::V6(a) => host_bit_v6(a.octets()),
        };
        bits[bit as usize / 64] |= 1 << (bit % 64);
    }
    bits
}

/// Whether the subscriber current here logs the programs' DEBUG lines.
/// Asked of the subscriber itself: `tracing::enabled!` answers from caches
/// shared by every subscriber of the process, which threads with
/// subscribers of their own (tests) can leave stale for a moment.
fn kernel_debug_enabled() -> bool {
    use tracing::callsite::Callsite as _;
    let callsite = tracing::callsite! {
        name: "kernel diagnostics",
        kind: tracing::metadata::Kind::EVENT,
        target: KERNEL_LOG_TARGET,
        level: tracing::Level::DEBUG,
        fields: []
    };
    tracing::dispatcher::get_default(|d| d.enabled(callsite.metadata()))
}

/// The thread that forwards the programs' aya-log records to `tracing`,
/// stopped (after a last read) when dropped.
struct KernelLogs {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl KernelLogs {
    /// Takes the programs' log ring buffer. The thread logs through the
    /// subscriber that is current here, so a test's subscriber hears it.
    fn start(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, Forward)?;
        // SAFETY: eventfd(2) returns a new descriptor, owned right away.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(Error::LogThread(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        let stopped = stop.try_clone().map_err(Error::LogThread)?;
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let thread = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    loop {
                        let mut fds =
                            [logger.as_raw_fd(), stopped.as_raw_fd()].map(|fd| libc::pollfd {
                                fd,
                                events: libc::POLLIN,
                                revents: 0,
                            });
                        // SAFETY: a valid array of pollfd of the length given.
                        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                        logger.flush();
                        if fds[1].revents != 0 {
                            return;
                        }
                    }
                })
            })
            .map_err(Error::LogThread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for KernelLogs {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Turns an aya-log record into a `tracing` event: the record's target is
/// the program's name, and a message that starts with `ifindex=N ` (as the
/// programs write them) gets the interface's name.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let (ifindex, message) = split_ifindex(&text);
        let iface = ifindex.and_then(interface_name);
        let program = record.target();
        macro_rules! forward {
            ($level:expr) => {
                tracing::event!(
                    target: KERNEL_LOG_TARGET,
                    $level,
                    program,
                    iface = iface.as_deref(),
                    ifindex,
                    "{message}"
                )
            };
        }
        match record.level() {
            log::Level::Error => forward!(tracing::Level::ERROR),
            log::Level::Warn => forward!(tracing::Level::WARN),
            log::Level::Info => forward!(tracing::Level::INFO),
            log::Level::Debug => forward!(tracing::Level::DEBUG),
            log::Level::Trace => forward!(tracing::Level::TRACE),
        }
    }

    fn flush(&self) {}
}

/// `ifindex=N rest` as (N, rest); any other text as (None, text).
fn split_ifindex(text: &str) -> (Option<u32>, &str) {
    text.strip_prefix("ifindex=")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(n, rest)| Some((Some(n.parse().ok()?), rest)))
        .unwrap_or((None, text))
}

/// The name of interface `index` in this thread's network namespace (the
/// one the programs were attached in); `None` once it is gone.
fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// An interface's name as aya takes it (the kernel's names hold no NUL).
fn interface_cstr(iface: &str) -> Result<CString, aya::programs::ProgramError> {
    CString::new(iface).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e).into())
}

/// Removes the netlink tc filters of ours an earlier agent left on `iface`.
///
/// TCX links close with the process that made them; netlink filters stay
/// until someone deletes them. An agent killed before it could detach
/// (SIGKILL, the OOM killer) leaves its programs running on every packet,
/// copying what its captures selected into a ring nobody reads, one more
/// set after each such death. An agent is alone on its network namespace's
/// hooks (one per node), so a filter of ours it has not attached itself is
/// one of those. Failures are only logged: a filter left behind costs time
/// and memory, not correctness.
pub fn remove_stale_filters(iface: &str) {
    let Ok(ifname) = interface_cstr(iface) else {
        return;
    };
    for (hook, parent, label) in [
        (TcAttachType::Ingress, CLSACT_INGRESS, "ingress"),
        (TcAttachType::Egress, CLSACT_EGRESS, "egress"),
    ] {
        let filters = match tc_filters(iface, parent) {
            Ok(filters) => filters,
            Err(e) => {
                // The interface went meanwhile, or the agent lacks
                // CAP_NET_ADMIN: attaching fails too, and says so.
                tracing::debug!(iface, hook = label, error = %e, "listing tc filters");
                continue;
            }
        };
        let ours = filters.into_iter().filter_map(|f| {
            let program = f.program.filter(|p| PROGRAMS.contains(&p.as_str()))?;
            (f.handle == FILTER_HANDLE).then_some((f.priority, program))
        });
        for (priority, program) in ours {
            let handle = FILTER_HANDLE.into();
            let removed =
                match SchedClassifierLink::attached(&ifname, hook.into(), priority, handle, None) {
                    Ok(link) => link.detach().map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
            match removed {
                Ok(()) => tracing::info!(
                    iface,
                    hook = label,
                    program,
                    priority,
                    "removed a tc filter an earlier agent left attached"
                ),
                Err(error) => tracing::warn!(
                    iface,
                    hook = label,
                    program,
                    priority,
                    error,
                    "cannot remove a tc filter an earlier agent left attached"
                ),
            }
        }
    }
}

/// The clsact qdisc's ingress and egress hooks, as tc parents.
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;

/// A netlink tc filter, of any kind.
struct TcFilter {
    priority: u16,
    handle: u32,
    /// The name of the BPF program it runs; `None` for other kinds.
    program: Option<String>,
}

/// Whether an interface has `index` in this thread's network namespace.
fn interface_exists(index: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes the call may write.
    !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null()
}

/// The index of interface `iface` in this thread's network namespace.
fn interface_index(iface: &str) -> std::io::Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// Sends `message` on a new rtnetlink socket and passes each message of the
/// answer (type, payload) to `each`, until the dump is done or the request
/// acknowledged; a negative status in the answer is the error returned.
fn rtnetlink(
    message: netlink_packet_route::RouteNetlinkMessage,
    flags: u16,
    mut each: impl FnMut(u16, &[u8]),
) -> std::io::Result<()> {
    use netlink_packet_core::{
        NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkMessage,
    };

    let mut msg = NetlinkMessage::from(message);
    msg.header.flags = NLM_F_REQUEST | flags;
    msg.finalize();
    let mut bytes = vec![0; msg.buffer_len()];
    msg.serialize(&mut bytes);
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.send(&bytes, 0)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0)?;
        let mut rest = &buf[..];
        while let Ok(frame) = NetlinkBuffer::new_checked(rest) {
            match frame.message_type() {
                // Both start with the status: 0, or a negative errno. An
                // error message with status 0 is the acknowledgement.
                NLMSG_DONE | NLMSG_ERROR => {
                    let status = frame
                        .payload()
                        .first_chunk()
                        .map_or(0, |b| i32::from_ne_bytes(*b));
                    if status < 0 {
                        return Err(std::io::Error::from_raw_os_error(-status));
                    }
                    return Ok(());
                }
                other => each(other, frame.payload()),
            }
            // Messages are aligned to four bytes within a datagram.
            rest = rest
                .get((frame.length() as usize + 3) & !3..)
                .unwrap_or_default();
        }
    }
}

/// The filters under `parent` (a clsact hook) of `iface`; none when the
/// interface has no clsact qdisc.
fn tc_filters(iface: &str, parent: u32) -> std::io::Result<Vec<TcFilter>> {
    use netlink_packet_route::{RouteNetlinkMessage, tc::TcMessage};

    let mut request = TcMessage::default();
    request.header.index = interface_index(iface)? as i32;
    request.header.parent = parent.into();
    let mut filters = Vec::new();
    rtnetlink(
        RouteNetlinkMessage::GetTrafficFilter(request),
        netlink_packet_core::NLM_F_DUMP,
        |kind, payload| {
            if kind == libc::RTM_NEWTFILTER {
                filters.extend(tc_filter(payload));
            }
        },
    )?;
    Ok(filters)
}

/// A filter message's priority, handle and, for a BPF filter, program
/// name. Decoded attribute by attribute, so that one the crate does not
/// know (a newer kernel's) cannot hide the filter.
fn tc_filter(payload: &[u8]) -> Option<TcFilter> {
    use netlink_packet_core::{Emitable as _, NlasIterator, Parseable as _};
    use netlink_packet_route::tc::{TcFilterBpfOption, TcHeader};
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;

    let header = TcHeader::parse(payload).ok()?;
    let mut bpf = false;
    let mut name = None;
    for nla in NlasIterator::new(payload.get(header.buffer_len()..)?).flatten() {
        match nla.kind() {
            TCA_KIND => bpf = nla.value() == b"bpf\0",
            TCA_OPTIONS => {
                name = NlasIterator::new(nla.value()).flatten().find_map(|o| {
                    match TcFilterBpfOption::parse(&o) {
                        Ok(TcFilterBpfOption::ProgName(n)) => Some(n),
                        _ => None,
                    }
                })
            }
            _ => {}
        }
    }
    Some(TcFilter {
        // The priority is the upper half of `tcm_info`.
        priority: (header.info >> 16) as u16,
        handle: header.handle.into(),
        program: name.filter(|_| bpf),
    })
}

/// Deletes the clsact qdisc the agent made on `iface`, unless a filter of
/// anyone's is on it now (deleting the qdisc would delete that too).
/// Failures are only logged: an empty clsact qdisc costs a branch per
/// packet, not correctness.
fn release_clsact(iface: &str) {
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};

    let in_use = [CLSACT_INGRESS, CLSACT_EGRESS]
        .into_iter()
        .map(|parent| tc_filters(iface, parent).map(|f| !f.is_empty()))
        .try_fold(false, |any, used| used.map(|used| any || used));
    let deleted = in_use.and_then(|in_use| {
        if in_use {
            tracing::debug!(iface, "the clsact qdisc stays: it holds filters of others");
            return Ok(());
        }
        let mut request = TcMessage::default();
        request.header.index = interface_index(iface)? as i32;
        request.header.parent = TcHandle::CLSACT;
        request.header.handle = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: 0,
        };
        request.attributes.push(TcAttribute::Kind("clsact".into()));
        rtnetlink(
            RouteNetlinkMessage::DelQueueDiscipline(request),
            netlink_packet_core::NLM_F_ACK,
            |_, _| {},
        )
    });
    if let Err(e) = deleted {
        // Gone with its interface, or removed by someone else.
        tracing::debug!(iface, error = %e, "deleting the clsact qdisc");
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
    fn whole_addresses_are_looked_up_by_hash_until_a_network_comes() {
        let of = |s: &[&str]| lookups(nets(s).iter());
        assert_eq!(of(&[]), (LOOKUP_NONE, LOOKUP_NONE));
        assert_eq!(
            of(&["10.0.0.1/32", "10.0.0.2/32"]),
            (LOOKUP_EXACT, LOOKUP_NONE)
        );
        assert_eq!(
            of(&["10.0.0.1/32", "10.1.0.0/16", "fd00::1/128"]),
            (LOOKUP_PREFIX, LOOKUP_EXACT)
        );
        assert_eq!(of(&["fd00::/64"]), (LOOKUP_NONE, LOOKUP_PREFIX));
    }

    #[test]
    fn host_bits_hold_every_targeted_address_and_few_others() {
        use packet_capture_common::abi::host_bit_set;
        let targets: Vec<IpNet> = (0..64u32)
            .map(|i| format!("10.244.{}.{}/32", i / 8, i % 8 * 3 + 2))
            .chain((0..4).map(|i| format!("fd00::{i:x}/128")))
            .chain(["10.1.0.0/16".to_owned()])
            .map(|n| n.parse().unwrap())
            .collect();
        let bits = host_bits(targets.iter());
        for net in &targets[..68] {
            let bit = match net.addr() {
                IpAddr::V4(a) => host_bit_v4(a.octets()),
                IpAddr::V6(a) => host_bit_v6(a.octets()),
            };
            assert!(host_bit_set(&bits, bit), "{net}");
        }
        // A network sets no bit: its family is looked up in the trie.
        let set: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert!(set <= 68, "{set} bits");
        // The next addresses of the same pod range mostly find theirs clear.
        let others = (0..256u32)
            .map(|i| std::net::Ipv4Addr::new(10, 244, 9, i as u8))
            .filter(|a| host_bit_set(&bits, host_bit_v4(a.octets())))
            .count();
        assert!(others < 96, "{others} of 256 other addresses share a bit");
    }

    #[test]
    fn kernel_messages_name_their_interface() {
        assert_eq!(
            split_ifindex("ifindex=7 program running"),
            (Some(7), "program running")
        );
        assert_eq!(split_ifindex("ifindex=x y"), (None, "ifindex=x y"));
        assert_eq!(split_ifindex("no index"), (None, "no index"));
        assert_eq!(interface_name(1).as_deref(), Some("lo"));
        assert_eq!(interface_name(u32::MAX), None);
    }

    #[test]
    fn link_kinds() {
        assert_eq!(LinkKind::from_arphrd(1), Some(LinkKind::Ethernet));
        assert_eq!(LinkKind::from_arphrd(772), Some(LinkKind::Loopback));
        assert_eq!(LinkKind::from_arphrd(65534), Some(LinkKind::RawIp));
        assert_eq!(LinkKind::from_arphrd(768), Some(LinkKind::RawIp));
        // InfiniBand, CAN, nlmon: headers of their own.
        for arphrd in [32, 280, 824] {
            assert_eq!(LinkKind::from_arphrd(arphrd), None, "{arphrd}");
        }
    }
}
