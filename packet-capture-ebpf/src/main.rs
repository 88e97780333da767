//! TC classifiers that select packets for the capture agent.
//!
//! One program pair serves every capture: each capture owns a slot, and the
//! maps say which slots want which addresses and ports. A packet that matches
//! at least one slot is copied (up to the largest snaplen) into the ring
//! buffer with the mask of the slots it matched; the agent does the rest.
//! The programs never change what happens to a packet.
//!
//! A capture whose tcpdump filter the agent could translate has it run
//! here too, before a record is reserved: the filter is a program of its
//! own (see the agent's `kernel_filter`), reached by tail call from the
//! hook's program with the packet's state in per-CPU memory. A filter that
//! rejects the packet counts it and takes its capture out of the packet's
//! mask; it then goes back by tail call to the hook's resume program, or
//! ends the packet when no other capture wants it. The resume program runs
//! the next capture's filter, or writes the record.
//!
//! Diagnostics (aya-log) say what an operator needs when captures look
//! empty: that a program runs on an interface, frames too short to parse,
//! records lost. They are off unless the agent sets [`DIAGNOSTICS`], which
//! it does while its log level is DEBUG. Off, they cost the packets of a
//! running capture one load and one branch, and the others nothing. Every
//! line is logged from one place, at the end of a packet ([`diagnose`]):
//! the paths that find something to say only leave a note in per-CPU
//! memory, so the verifier walks the logging code once, not once for each
//! of the many paths that reach it.
#![no_std]
#![no_main]
// `#[classifier]` (aya-ebpf-macros 0.4) makes each program a safe public
// `extern "C"` function of the kernel's `*mut __sk_buff`, which it wraps in
// a `TcContext`: the lint fires on the generated code, not on ours.
#![allow(clippy::not_unsafe_ptr_arg_deref)]
// Inline assembly on the BPF target, for tail calls with constant indexes.
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_RINGBUF_HDR_SZ,
    },
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf,
        lpm_trie::Key,
    },
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use packet_capture_common::abi::{
    API_V4, API_V6, DEFAULT_RING_BYTES, DIRECTION_EGRESS, DIRECTION_INGRESS,
    FILTER_PROGRAM_ENTRIES, FilterState, HOST_TABLE_ENTRIES, LINK_ETHERNET, LINK_RAW_IP,
    LOOKUP_EXACT, LOOKUP_PREFIX, LOST_MASKS, MAX_PREFIXES, MAX_SLOTS, MAX_SNAPLEN, PORT_ENTRIES,
    RECORD_HEADER_LEN, RecordHeader, Settings, counter, filter_program, host_bit_set, host_bit_v4,
    host_bit_v6, host_entry_slots,
};

/// Neither pass nor drop: let the next program or filter decide, as if this
/// one were not there. (`TC_ACT_PIPE` would end a TCX chain and skip the
/// filters after it; `TC_ACT_UNSPEC` is TCX's "next".)
const TC_ACT_UNSPEC: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// IPv6 extension headers walked to find the transport header.
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// Smallest lengths of the headers parsed: what a frame must hold.
const ARP_LEN: usize = 28;
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;

/// What `DIAG_STATE` holds, per CPU, by index. The agent zeroes it all when
/// it switches diagnostics on.
mod diag {
    /// `bpf_ktime_get_ns` before which no other short frame is logged.
    pub const NEXT_SHORT_NS: u32 = 0;
    /// The same for lost records; 0 until the first packet after the
    /// switch, which takes the loss counters as they are then.
    pub const NEXT_LOST_NS: u32 = 1;
    /// The CPU's lost records (ring full, unreadable) already reported.
    pub const REPORTED_RING_FULL: u32 = 2;
    pub const REPORTED_UNREADABLE: u32 = 3;
    /// Bytes the headers of this packet needed when it was shorter, set
    /// by the parser and taken by [`super::diagnose`]; 0: none.
    pub const SHORT_NEEDED: u32 = 4;
    pub const ENTRIES: u32 = 5;
}
/// Lines of one kind (short frames, lost records) are logged at most
/// once a second per CPU: a flood says so, not once a packet.
const DIAG_INTERVAL_NS: u64 = 1_000_000_000;
/// Hooks remembered as having said that they run: an LRU map is
/// preallocated, and one that forgot a hook only has it say so again.
const HOOKS_SEEN_ENTRIES: u32 = 1024;

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Non-zero while the agent wants diagnostics (its log level is DEBUG).
/// A mutable global lives in the object's `.bss` map, which the agent
/// writes at any time; reading it is one load from an address the
/// verifier resolved, not a map lookup. (A `static mut` read with a
/// volatile load: the BPF backend cannot select an atomic load.)
#[unsafe(no_mangle)]
static mut DIAGNOSTICS: u64 = 0;

/// (ifindex, direction) of the hooks that have said they run since
/// diagnostics were switched on (the agent empties it then). LRU: an
/// interface that comes later still gets its line when the map is full.
#[map]
static HOOKS_SEEN: LruHashMap<u32, u8> = LruHashMap::with_max_entries(HOOKS_SEEN_ENTRIES, 0);

/// The diagnostics' per-CPU notes (see [`diag`]).
#[map]
static DIAG_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(diag::ENTRIES, 0);

/// IPv4 prefix -> slots whose targets contain it (the agent folds the slots
/// of every shorter prefix into each entry, so the longest match is enough).
/// One entry more than the agent fills ([`MAX_PREFIXES`]): before Linux
/// 6.13 a trie at its size refuses even an update in place.
#[map]
static IPV4: LpmTrie<[u8; 4], u64> =
    LpmTrie::with_max_entries(MAX_PREFIXES + 1, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static IPV6: LpmTrie<[u8; 16], u64> =
    LpmTrie::with_max_entries(MAX_PREFIXES + 1, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Whole addresses -> slots that target them: looked up instead of the
/// tries while no slot targets a network ([`LOOKUP_EXACT`]).
#[map]
static IPV4_HOSTS: HashMap<[u8; 4], u64> =
    HashMap::with_max_entries(MAX_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static IPV6_HOSTS: HashMap<[u8; 16], u64> =
    HashMap::with_max_entries(MAX_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Host bit -> one targeted IPv4 address with that bit and its slots
/// ([`host_entry_v4`]), looked up before `IPV4_HOSTS`: an array lookup the
/// verifier inlines costs a few instructions, the hash lookup a hash, a
/// bucket walk and a key compare. An address the entry does not hold (a
/// second one with the same bit, or an entry read while it changes) is
/// looked up in `IPV4_HOSTS`, which holds every one.
#[map]
static IPV4_HOST_TABLE: Array<[u64; 2]> =
    Array::with_max_entries(HOST_TABLE_ENTRIES, aya_ebpf::bindings::BPF_F_MMAPABLE);

/// Port number -> slots that target it.
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_ENTRIES, 0);

#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// The captures' filters and the hooks' resume programs (see
/// [`filter_program`] and `resume_program`), set by the agent.
#[map]
static FILTER_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(FILTER_PROGRAM_ENTRIES, 0);

/// The packet whose filters run now, on this CPU.
#[map]
static FILTER_STATE: PerCpuArray<FilterState> = PerCpuArray::with_max_entries(1, 0);

/// Packets each slot's filter rejected in the kernel (user space keeps a
/// baseline per capture, as for losses).
#[map]
static FILTERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SLOTS as u32, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Matched packets the ring buffer had no room for that several slots
/// wanted, by the mask of those slots (user space charges each slot its
/// share; a packet one slot alone wanted is in `LOST_BY_SLOT`). A map keyed
/// by mask keeps the program free of a per-slot loop. Not preallocated:
/// a few masks ever lose packets, and preallocation would hold every
/// entry's value once per CPU (megabytes on a large node) from load on.
#[map]
static LOST_BY_MASK: PerCpuHashMap<u64, u64> =
    PerCpuHashMap::with_max_entries(LOST_MASKS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Lost packets that one slot alone wanted, by slot: the common case of a
/// flood, counted with an array lookup the verifier inlines rather than a
/// hash lookup per packet.
#[map]
static LOST_BY_SLOT: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SLOTS as u32, 0);

/// What sets one program apart from the others, known when it is compiled.
trait Hook {
    /// The program's name: the target of its log records.
    const NAME: &'static str;
    const DIRECTION: u8;
    const LINK: u8;
}

struct Ingress;
struct Egress;
struct IngressL3;
struct EgressL3;

impl Hook for Ingress {
    const NAME: &'static str = "tc_ingress";
    const DIRECTION: u8 = DIRECTION_INGRESS;
    const LINK: u8 = LINK_ETHERNET;
}

impl Hook for Egress {
    const NAME: &'static str = "tc_egress";
    const DIRECTION: u8 = DIRECTION_EGRESS;
    const LINK: u8 = LINK_ETHERNET;
}

impl Hook for IngressL3 {
    const NAME: &'static str = "tc_ingress_l3";
    const DIRECTION: u8 = DIRECTION_INGRESS;
    const LINK: u8 = LINK_RAW_IP;
}

impl Hook for EgressL3 {
    const NAME: &'static str = "tc_egress_l3";
    const DIRECTION: u8 = DIRECTION_EGRESS;
    const LINK: u8 = LINK_RAW_IP;
}

// `#[classifier]` wraps each function in the program's entry point; the
// function itself must be inlined there, or each packet pays a BPF-to-BPF
// call into it (which LLVM leaves for the larger programs otherwise).
#[classifier]
#[inline(always)]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    capture::<Ingress>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn tc_egress(ctx: TcContext) -> i32 {
    capture::<Egress>(&ctx);
    TC_ACT_UNSPEC
}

/// For interfaces without a link-layer header (tun, wireguard, ipip).
#[classifier]
#[inline(always)]
pub fn tc_ingress_l3(ctx: TcContext) -> i32 {
    capture::<IngressL3>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn tc_egress_l3(ctx: TcContext) -> i32 {
    capture::<EgressL3>(&ctx);
    TC_ACT_UNSPEC
}

/// Where a capture's filter goes back to, one per hook program.
#[classifier]
#[inline(always)]
pub fn tc_ingress_resume(ctx: TcContext) -> i32 {
    resume::<Ingress>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn tc_egress_resume(ctx: TcContext) -> i32 {
    resume::<Egress>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn tc_ingress_l3_resume(ctx: TcContext) -> i32 {
    resume::<IngressL3>(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
#[inline(always)]
pub fn tc_egress_l3_resume(ctx: TcContext) -> i32 {
    resume::<EgressL3>(&ctx);
    TC_ACT_UNSPEC
}

/// Addresses and ports found in a packet.
struct Selectors {
    /// Slots whose IP targets match (or who have none).
    ip: u64,
    /// Source and destination ports, when the packet is the first (or only)
    /// fragment of TCP, UDP or SCTP; 0 for a destination port cut off.
    ports: Option<(u16, u16)>,
}

#[inline(always)]
fn capture<H: Hook>(ctx: &TcContext) {
    let Some(settings) = SETTINGS.get(0) else {
        return;
    };
    if settings.active == 0 {
        return;
    }
    let selectors = if H::LINK == LINK_ETHERNET {
        parse_ethernet(ctx, settings)
    } else {
        // Without a link header, skb->protocol says what the bytes are.
        let proto = u16::from_be(ctx.skb.protocol() as u16);
        parse_network(ctx, proto, 0, settings)
    };
    let port_match = match selectors.ports {
        // Without a capture of ports, nothing to look up.
        Some((src, dst)) if settings.any_port != settings.active => {
            settings.any_port | port_slots(src) | port_slots(dst)
        }
        _ => settings.any_port,
    };
    let mask = settings.active & selectors.ip & port_match;
    if mask != 0 {
        dispatch::<H>(ctx, mask, settings);
    }
    if diagnostics() {
        diagnose::<H>(ctx);
    }
}

/// Runs the kernel filters of the slots in `mask` that have one (by tail
/// call: the last resume program writes the record and diagnoses), or
/// writes the record now.
#[inline(always)]
fn dispatch<H: Hook>(ctx: &TcContext, mask: u64, settings: &Settings) {
    let filters = mask
        & if H::LINK == LINK_ETHERNET {
            settings.kernel_filter[LINK_ETHERNET as usize]
        } else {
            settings.kernel_filter[LINK_RAW_IP as usize]
        };
    // A tag the device took off the frame is not in the bytes the filter
    // reads (libpcap tests it where it was): user space decides, on the
    // frame with its tag put back.
    if filters != 0
        && !vlan_offloaded(ctx)
        && let Some(state) = FILTER_STATE.get_ptr_mut(0)
    {
        // SAFETY: per-CPU memory, only touched by programs on this CPU.
        unsafe {
            *state = FilterState {
                mask,
                pending: filters,
                filters,
            };
        }
        next_filter::<H>(ctx, state);
    }
    // No filter in the kernel for these slots (or it could not be reached).
    emit(ctx, mask, 0, H::DIRECTION, H::LINK, settings);
}

/// After a capture's filter (which took its slot out of the mask if it
/// rejected the packet): runs the next filter, or writes the record for
/// the slots that still want the packet.
#[inline(always)]
fn resume<H: Hook>(ctx: &TcContext) {
    let (Some(settings), Some(state)) = (SETTINGS.get(0), FILTER_STATE.get_ptr_mut(0)) else {
        return;
    };
    next_filter::<H>(ctx, state);
    // SAFETY: per-CPU memory, only touched by programs on this CPU.
    let (mask, filtered) = unsafe {
        let s = &*state;
        (s.mask, s.filters & !s.pending)
    };
    if mask != 0 {
        emit(ctx, mask, filtered, H::DIRECTION, H::LINK, settings);
    }
    // The packet's last program: the hook's diagnostics run here.
    if diagnostics() {
        diagnose::<H>(ctx);
    }
}

/// Filters one packet runs through in the kernel; those of the slots after
/// them run in user space.
const MAX_FILTERS_PER_PACKET: u32 = 16;

/// Tail-calls the filter of the next pending slot; returns only when none
/// is pending, [`MAX_FILTERS_PER_PACKET`] have run, or its program is gone
/// (a capture ending): that slot and the ones after it stay pending, and
/// are filtered in user space.
#[inline(always)]
fn next_filter<H: Hook>(ctx: &TcContext, state: *mut FilterState) {
    // SAFETY: per-CPU memory, only touched by programs on this CPU.
    let s = unsafe { &mut *state };
    let pending = s.pending;
    // Each filter costs two of the kernel's 33 tail calls per packet (out
    // and back): past MAX_FILTERS_PER_PACKET a filter's way back would
    // fail, and the packet with it.
    if pending == 0 || (s.filters & !pending).count_ones() >= MAX_FILTERS_PER_PACKET {
        return;
    }
    let bit = pending.isolate_lowest_one();
    s.pending = pending & !bit;
    // One call site per slot, each with its index a constant: the verifier
    // then sees one key per site and the JIT makes each a direct jump,
    // patched when the array changes. One site with the slot in a register
    // would be an indirect jump, which costs a retpoline where the kernel
    // mitigates Spectre v2 (twice per packet and filter, with the way back).
    const { assert!(MAX_SLOTS == 64, "by_slot! lists every slot") };
    macro_rules! by_slot {
        ($($slot:literal)+) => {
            $(if bit == 1 << $slot {
                tail_call::<H, $slot>(ctx);
            } else)+ {}
        };
    }
    by_slot!(
        0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
        32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61
        62 63
    );
    s.pending = pending;
}

/// Tail-calls `SLOT`'s filter for hook `H`, the index written into the
/// call's instructions (as libbpf's `bpf_tail_call_static`): as an operand
/// of its own, the compiler could merge the call sites into one that takes
/// the index from a register.
#[inline(always)]
fn tail_call<H: Hook, const SLOT: u32>(ctx: &TcContext) {
    // SAFETY: the programs in the array are our filters, which come back
    // to the resume program of this hook; a missing one returns here.
    unsafe {
        core::arch::asm!(
            "r3 = {index}",
            "call 12",
            index = const filter_program(SLOT, H::DIRECTION, H::LINK),
            inlateout("r1") ctx.as_ptr() => _,
            inlateout("r2") &raw const FILTER_PROGRAMS => _,
            lateout("r0") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
}

/// The index of the one bit set in `bit` (no count-trailing-zeros in BPF).
#[inline(always)]
fn bit_index(bit: u64) -> u32 {
    let mut index = 0;
    if bit & 0xffff_ffff_0000_0000 != 0 {
        index += 32;
    }
    if bit & 0xffff_0000_ffff_0000 != 0 {
        index += 16;
    }
    if bit & 0xff00_ff00_ff00_ff00 != 0 {
        index += 8;
    }
    if bit & 0xf0f0_f0f0_f0f0_f0f0 != 0 {
        index += 4;
    }
    if bit & 0xcccc_cccc_cccc_cccc != 0 {
        index += 2;
    }
    if bit & 0xaaaa_aaaa_aaaa_aaaa != 0 {
        index += 1;
    }
    index
}

/// The `__sk_buff` the program runs on.
#[inline(always)]
fn skb_of(ctx: &TcContext) -> *mut __sk_buff {
    ctx.as_ptr().cast()
}

#[inline(always)]
fn vlan_offloaded(ctx: &TcContext) -> bool {
    // SAFETY: the TC context points at a valid __sk_buff.
    unsafe { (*skb_of(ctx)).vlan_present != 0 }
}

/// What a record says besides the packet's bytes and the skb's fields.
#[derive(Clone, Copy)]
struct Record {
    mask: u64,
    kernel_filtered: u64,
    orig_len: u32,
    cap_len: u32,
    wakeup_bytes: u32,
    ring_bytes: u32,
    direction: u8,
    link: u8,
}

/// Copies the packet into the ring buffer behind a header.
///
/// The record is reserved in the ring at the smallest of a set of sizes
/// that holds it (`bpf_ringbuf_reserve` needs a size the verifier knows),
/// and the packet is copied once, from the skb straight into the ring. The
/// sizes fit common frames closely: 1536 tunnels' 1442-byte frames, 1600 full
/// 1514-byte Ethernet frames, 9088 jumbo frames, 65664 GSO/GRO super-frames.
#[inline(always)]
fn emit(
    ctx: &TcContext,
    mask: u64,
    kernel_filtered: u64,
    direction: u8,
    link: u8,
    settings: &Settings,
) {
    let orig_len = ctx.len();
    let mut cap_len = orig_len;
    if cap_len > settings.snaplen {
        cap_len = settings.snaplen;
    }
    if cap_len > MAX_SNAPLEN {
        cap_len = MAX_SNAPLEN;
    }
    if cap_len == 0 {
        return;
    }
    let record = Record {
        mask,
        kernel_filtered,
        orig_len,
        cap_len,
        wakeup_bytes: settings.wakeup_bytes,
        ring_bytes: settings.ring_bytes,
        direction,
        link,
    };
    let need = RECORD_HEADER_LEN as u32 + cap_len;
    macro_rules! by_size {
        ($($size:literal),+ $(,)?) => {
            'sized: {
                $(if need <= $size {
                    break 'sized emit_in::<$size>(ctx, &record);
                })+
                None
            }
        };
    }
    // The last holds a header and MAX_SNAPLEN bytes. Losses are counted
    // here, once for every size.
    let lost = by_size!(
        128, 256, 512, 1024, 1536, 1600, 2048, 4096, 9088, 16384, 32768, 65664, 131136, 262192,
    );
    if let Some(counter) = lost {
        count(counter);
        count_lost(mask);
    }
}

/// Reserves an `N`-byte record, writes the header and copies the packet
/// into it, and submits it; or says which counter the loss goes to.
#[inline(always)]
fn emit_in<const N: usize>(ctx: &TcContext, r: &Record) -> Option<u32> {
    let waiting_before = RECORDS.query(BPF_RB_AVAIL_DATA as u64);
    // A ring that has not the room refuses the reservation anyway; seeing
    // it from the bytes already waiting spares the ring's lock, which a
    // flood the reader cannot keep up with would take for every packet.
    if waiting_before + (BPF_RINGBUF_HDR_SZ as usize + N) as u64 >= u64::from(r.ring_bytes) {
        return Some(counter::RING_LOST);
    }
    let Some(mut entry) = RECORDS.reserve_bytes(N, 0) else {
        return Some(counter::RING_LOST);
    };
    let skb = skb_of(ctx);
    // SAFETY: the TC context points at a valid __sk_buff.
    let (ifindex, vlan_present, vlan_tci, vlan_proto, protocol) = unsafe {
        (
            (*skb).ifindex,
            (*skb).vlan_present as u8,
            (*skb).vlan_tci as u16,
            u16::from_be((*skb).vlan_proto as u16),
            u16::from_be((*skb).protocol as u16),
        )
    };
    let base = entry.as_mut_ptr();
    let header = base.cast::<RecordHeader>();
    // SAFETY: the reservation holds N >= 128 bytes, 8-aligned, so the
    // header fits; the copy is bounded by N - RECORD_HEADER_LEN below, which
    // the verifier checks too.
    let mut lost = None;
    let copied = unsafe {
        // One volatile store per field: LLVM would merge plain stores of
        // zeros into a memset, a byte loop whose variable pointer arithmetic
        // the verifier refuses without CAP_PERFMON.
        macro_rules! store {
            ($($field:ident = $value:expr),* $(,)?) => {
                $(core::ptr::addr_of_mut!((*header).$field).write_volatile($value);)*
            };
        }
        store!(
            slot_mask = r.mask,
            ktime_ns = bpf_ktime_get_ns(),
            ifindex = ifindex,
            orig_len = r.orig_len,
            cap_len = r.cap_len,
            vlan_tci = vlan_tci,
            vlan_proto = vlan_proto,
            protocol = protocol,
            vlan_present = vlan_present,
            direction = r.direction,
            link = r.link,
            kernel_filtered = r.kernel_filtered,
        );
        let pad = core::ptr::addr_of_mut!((*header)._pad).cast::<u8>();
        for i in 0..3 {
            pad.add(i).write_volatile(0);
        }
        let data = base.add(RECORD_HEADER_LEN);
        // The verifier must see 1..=N - RECORD_HEADER_LEN on the very
        // register passed to the helper. A volatile read keeps LLVM from
        // dropping the checks as redundant with the bucket choice, and a
        // volatile 8-byte round trip through the stack (which the verifier
        // follows, bounds and all) between the two checks keeps LLVM from
        // folding them into one subtract-and-compare that bounds another
        // register.
        let len = u64::from(core::ptr::read_volatile(&r.cap_len));
        if len > (N - RECORD_HEADER_LEN) as u64 {
            false
        } else {
            let mut spill: u64 = 0;
            core::ptr::write_volatile(&mut spill, len);
            let len = core::ptr::read_volatile(&spill);
            if len == 0 {
                false
            } else if bpf_skb_load_bytes(skb.cast(), 0, data.cast(), len as u32) != 0 {
                lost = Some(counter::LOAD_FAILED);
                false
            } else {
                true
            }
        }
    };
    // Batched wake-ups: only the reservation that takes the bytes waiting
    // past the batch size wakes the reader (the reader also polls on a short
    // timer). Waking on every record past it would raise an IRQ work
    // interrupt per packet while the reader lags, which costs more than the
    // copy. The reader sleeps only on an empty ring, and the bytes waiting
    // are read before and after this reservation, so among concurrent
    // reservations on several CPUs the one that crosses always sees it (a
    // neighbour may too: one spare wake-up, never a missed one).
    let wakeup = u64::from(r.wakeup_bytes);
    let waiting = RECORDS.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if waiting_before < wakeup && waiting >= wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    } as u64;
    if copied {
        entry.submit(flags);
    } else {
        entry.discard(flags);
    }
    lost
}

/// Bytes of the common frame, untagged IPv4 without options: the Ethernet
/// header, the IP header and the ports.
const COMMON_HEAD: usize = ETH_HLEN + IPV4_MIN_LEN + 4;

#[inline(always)]
fn parse_ethernet(ctx: &TcContext, settings: &Settings) -> Selectors {
    // The common frame is read in place: its head is nearly always in the
    // skb's linear area (the bytes from `data` to `data_end`), and loads at
    // constant offsets there cost less than a helper call, whose copy the
    // next loads would wait for. A head outside it, and every other frame,
    // goes through the helper, which reads any offset.
    let start = ctx.data();
    if start + COMMON_HEAD <= ctx.data_end() {
        // SAFETY: the frame's first COMMON_HEAD bytes are in the linear
        // area, as checked above (the verifier checks it too).
        let head = unsafe { &*(start as *const [u8; COMMON_HEAD]) };
        if head[12] == 0x08 && head[13] == 0x00 && head[ETH_HLEN] == 0x45 {
            // SAFETY: the IP header and the 4 bytes after it are in `head`.
            let (ip, after) = unsafe {
                let at = head.as_ptr().add(ETH_HLEN);
                (
                    &*at.cast::<[u8; IPV4_MIN_LEN]>(),
                    *at.add(IPV4_MIN_LEN).cast::<[u8; 4]>(),
                )
            };
            return ipv4_selectors(ctx, ip, ETH_HLEN, Some(after), settings);
        }
    }
    let mut offset = ETH_HLEN;
    let Ok(mut proto) = ctx.load::<u16>(12).map(u16::from_be) else {
        too_short(ETH_HLEN);
        return no_match(settings.any_ip);
    };
    // VLAN tags still in the frame (802.1ad outer, 802.1Q inner).
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Ok(inner) = ctx.load::<u16>(offset + 2).map(u16::from_be) else {
            too_short(offset + 4);
            return no_match(settings.any_ip);
        };
        proto = inner;
        offset += 4;
    }
    parse_network(ctx, proto, offset, settings)
}

#[inline(always)]
fn parse_network(ctx: &TcContext, proto: u16, offset: usize, settings: &Settings) -> Selectors {
    match proto {
        ETH_P_IP => parse_ipv4(ctx, offset, settings),
        ETH_P_IPV6 => parse_ipv6(ctx, offset, settings),
        // libpcap's `host`/`net` match ARP's sender and target addresses.
        ETH_P_ARP | ETH_P_RARP => {
            let Ok(spa) = ctx.load::<[u8; 4]>(offset + 14) else {
                too_short(offset + ARP_LEN);
                return no_match(settings.any_ip);
            };
            // As libpcap's `src host` and `dst host` do for ARP.
            let from = ipv4_slots(settings, spa);
            let Ok(tpa) = ctx.load::<[u8; 4]>(offset + 24) else {
                return source_only(settings, from, offset + ARP_LEN);
            };
            Selectors {
                ip: settings.any_ip | by_direction(settings, from, ipv4_slots(settings, tpa)),
                ports: None,
            }
        }
        _ => no_match(settings.any_ip),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize, settings: &Settings) -> Selectors {
    let Ok(header) = ctx.load::<[u8; IPV4_MIN_LEN]>(offset) else {
        let Ok(src) = ctx.load::<[u8; 4]>(offset + 12) else {
            too_short(offset + IPV4_MIN_LEN);
            return no_match(settings.any_ip);
        };
        return source_only(settings, ipv4_slots(settings, src), offset + IPV4_MIN_LEN);
    };
    ipv4_selectors(ctx, &header, offset, None, settings)
}

/// What an IPv4 packet at `offset` selects, given the first 20 bytes of its
/// header and, when the caller read them, the 4 bytes after those (its
/// ports, when the header has no options).
#[inline(always)]
fn ipv4_selectors(
    ctx: &TcContext,
    header: &[u8; IPV4_MIN_LEN],
    offset: usize,
    after: Option<[u8; 4]>,
    settings: &Settings,
) -> Selectors {
    // As libpcap's: the EtherType (or skb->protocol) says IPv4, whatever
    // the version field, and the transport header is where the header
    // length says, even inside the header.
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let protocol = header[9];
    let src = [header[12], header[13], header[14], header[15]];
    let dst = [header[16], header[17], header[18], header[19]];
    let ip = settings.any_ip
        | by_direction(
            settings,
            ipv4_slots(settings, src),
            ipv4_slots(settings, dst),
        );
    // Only the first fragment carries the transport header.
    let ports = match after {
        _ if frag & 0x1fff != 0 => None,
        Some(p) if header_len == IPV4_MIN_LEN => carries_ports(protocol).then(|| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }),
        _ => transport_ports(ctx, protocol, offset + header_len),
    };
    if protocol == IPPROTO_TCP
        && settings.api_family == API_V4
        && let Some((sport, dport)) = ports
        && own_api(
            settings.api_port,
            sport,
            dport,
            src == settings.api_v4,
            dst == settings.api_v4,
        )
    {
        return no_match(0);
    }
    Selectors { ip, ports }
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, offset: usize, settings: &Settings) -> Selectors {
    let Ok(header) = ctx.load::<[u8; IPV6_LEN]>(offset) else {
        let Ok(src) = ctx.load::<[u8; 16]>(offset + 8) else {
            too_short(offset + IPV6_LEN);
            return no_match(settings.any_ip);
        };
        return source_only(settings, ipv6_slots(settings, src), offset + IPV6_LEN);
    };
    let mut next = header[6];
    // SAFETY: both addresses are inside the 40-byte header.
    let (src, dst) = unsafe {
        (
            *header.as_ptr().add(8).cast::<[u8; 16]>(),
            *header.as_ptr().add(24).cast::<[u8; 16]>(),
        )
    };
    let ip = settings.any_ip
        | by_direction(
            settings,
            ipv6_slots(settings, src),
            ipv6_slots(settings, dst),
        );
    let mut at = offset + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let (Ok(n), Ok(len)) = (ctx.load::<u8>(at), ctx.load::<u8>(at + 1)) else {
                    too_short(at + 2);
                    return Selectors { ip, ports: None };
                };
                next = n;
                at += (usize::from(len) + 1) * 8;
            }
            IPPROTO_AH => {
                let (Ok(n), Ok(len)) = (ctx.load::<u8>(at), ctx.load::<u8>(at + 1)) else {
                    too_short(at + 2);
                    return Selectors { ip, ports: None };
                };
                next = n;
                at += (usize::from(len) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let (Ok(n), Ok(frag)) = (ctx.load::<u8>(at), ctx.load::<u16>(at + 2)) else {
                    too_short(at + 4);
                    return Selectors { ip, ports: None };
                };
                if u16::from_be(frag) & 0xfff8 != 0 {
                    return Selectors { ip, ports: None };
                }
                next = n;
                at += 8;
            }
            _ => break,
        }
    }
    let ports = transport_ports(ctx, next, at);
    if next == IPPROTO_TCP
        && settings.api_family == API_V6
        && let Some((sport, dport)) = ports
        && own_api(
            settings.api_port,
            sport,
            dport,
            src == settings.api_v6,
            dst == settings.api_v6,
        )
    {
        return no_match(0);
    }
    Selectors { ip, ports }
}

/// Whether a TCP segment is one of the agent's own API connections: to or
/// from its listening address and port. Those are never captured, whatever
/// the targets (a capture of the node or of the controller would otherwise
/// record the agent's traffic with its callers).
#[inline(always)]
fn own_api(api_port: u16, sport: u16, dport: u16, from_api: bool, to_api: bool) -> bool {
    (from_api && sport == api_port) || (to_api && dport == api_port)
}

/// Whether `protocol`'s header starts with source and destination ports.
#[inline(always)]
fn carries_ports(protocol: u8) -> bool {
    protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_SCTP
}

#[inline(always)]
fn transport_ports(ctx: &TcContext, protocol: u8, offset: usize) -> Option<(u16, u16)> {
    if !carries_ports(protocol) {
        return None;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(offset) else {
        too_short(offset + 4);
        // libpcap's `port` tests the source port first, so a frame cut
        // after it still matches by it. No capture selects port 0, which
        // stands for the destination port here.
        return ctx
            .load::<[u8; 2]>(offset)
            .ok()
            .map(|sport| (u16::from_be_bytes(sport), 0));
    };
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

/// The slots a packet matches by address, given the slots its source and
/// its destination match: a slot that wants packets to its targets only
/// (ingress) matches by the destination, one that wants packets from them
/// (egress) by the source.
#[inline(always)]
fn by_direction(settings: &Settings, from: u64, to: u64) -> u64 {
    (from & !settings.ingress_only) | (to & !settings.egress_only)
}

#[inline(always)]
fn no_match(any_ip: u64) -> Selectors {
    Selectors {
        ip: any_ip,
        ports: None,
    }
}

#[inline(always)]
fn ipv4_slots(settings: &Settings, addr: [u8; 4]) -> u64 {
    match settings.v4_lookup {
        LOOKUP_EXACT => {
            let bit = host_bit_v4(addr);
            if !host_bit_set(&settings.host_bits, bit) {
                return 0;
            }
            if let Some(entry) = IPV4_HOST_TABLE.get_ptr(bit) {
                // SAFETY: the entry is inside the map; each word is read
                // once, whole (the agent writes them with 8-byte stores).
                let words = unsafe {
                    [
                        core::ptr::read_volatile(entry.cast::<u64>()),
                        core::ptr::read_volatile(entry.cast::<u64>().add(1)),
                    ]
                };
                if let Some(slots) = host_entry_slots(addr, words) {
                    return slots;
                }
            }
            // SAFETY: a copy of the value is taken at once.
            unsafe { IPV4_HOSTS.get(&addr) }.copied().unwrap_or(0)
        }
        LOOKUP_PREFIX => IPV4.get(&Key::new(32, addr)).copied().unwrap_or(0),
        _ => 0,
    }
}

#[inline(always)]
fn ipv6_slots(settings: &Settings, addr: [u8; 16]) -> u64 {
    match settings.v6_lookup {
        LOOKUP_EXACT if !host_bit_set(&settings.host_bits, host_bit_v6(addr)) => 0,
        // SAFETY: a copy of the value is taken at once.
        LOOKUP_EXACT => unsafe { IPV6_HOSTS.get(&addr) }.copied().unwrap_or(0),
        LOOKUP_PREFIX => IPV6.get(&Key::new(128, addr)).copied().unwrap_or(0),
        _ => 0,
    }
}

#[inline(always)]
fn port_slots(port: u16) -> u64 {
    PORTS.get(u32::from(port)).copied().unwrap_or(0)
}

/// Logs what this packet had to say, and what the CPU's loss counters
/// say since the last line about them.
///
/// Every map lookup comes first, before any line: without CAP_PERFMON the
/// verifier refuses a map key written over a stack slot where a pointer was
/// spilled, and the logging code spills many. (The capabilities test loads
/// the programs with the chart's capabilities, which have no CAP_PERFMON.)
/// Inlined: as functions of their own (BPF subprograms) this code and the
/// lines cost the verifier twice the instructions of the whole program.
#[inline(always)]
fn diagnose<H: Hook>(ctx: &TcContext) {
    let (
        Some(short_needed),
        Some(next_short),
        Some(next_lost),
        Some(full_seen),
        Some(unreadable_seen),
        Some(full),
        Some(unreadable),
    ) = (
        DIAG_STATE.get_ptr_mut(diag::SHORT_NEEDED),
        DIAG_STATE.get_ptr_mut(diag::NEXT_SHORT_NS),
        DIAG_STATE.get_ptr_mut(diag::NEXT_LOST_NS),
        DIAG_STATE.get_ptr_mut(diag::REPORTED_RING_FULL),
        DIAG_STATE.get_ptr_mut(diag::REPORTED_UNREADABLE),
        COUNTERS.get_ptr(counter::RING_LOST),
        COUNTERS.get_ptr(counter::LOAD_FAILED),
    )
    else {
        return;
    };
    let hook = (ifindex(ctx) << 1) | u32::from(H::DIRECTION);
    // Looked up before inserting: an LRU insert takes a free element even
    // when the key is there, which would churn the map on every packet.
    // Only the CPU whose insert creates the entry says so.
    if HOOKS_SEEN.get_ptr(&hook).is_none()
        && HOOKS_SEEN.insert(&hook, &1, BPF_NOEXIST as u64).is_ok()
    {
        log_running::<H>(ctx);
    }
    // SAFETY: per-CPU values, only touched by programs on this CPU.
    unsafe {
        let short = core::mem::replace(&mut *short_needed, 0);
        if short != 0 && unless_too_soon(&mut *next_short) {
            log_too_short::<H>(ctx, short);
        }
        let (full, unreadable) = (*full, *unreadable);
        if *next_lost == 0 {
            // The first packet since diagnostics were switched on: what
            // was lost before is not news. (1: the next line may come at
            // once.)
            (*full_seen, *unreadable_seen, *next_lost) = (full, unreadable, 1);
        } else if (full, unreadable) != (*full_seen, *unreadable_seen)
            && unless_too_soon(&mut *next_lost)
        {
            log_lost::<H>(ctx, full - *full_seen, unreadable - *unreadable_seen);
            (*full_seen, *unreadable_seen) = (full, unreadable);
        }
    }
}

/// That the program runs on this interface: said once per hook, from the
/// first packet a running capture could see there.
#[inline(always)]
fn log_running<H: Hook>(ctx: &TcContext) {
    debug!(
        ctx,
        target: H::NAME,
        "ifindex={} program running: first packet since diagnostics were switched on",
        ifindex(ctx)
    );
}

#[inline(always)]
fn log_too_short<H: Hook>(ctx: &TcContext, needed: u64) {
    debug!(
        ctx,
        target: H::NAME,
        "ifindex={} frame too short to parse: {} bytes where its headers need {} (protocol 0x{:x})",
        ifindex(ctx),
        ctx.len(),
        needed,
        u16::from_be(ctx.skb.protocol() as u16)
    );
}

/// Losses belong to the ring buffer, not to an interface: the line names
/// none.
#[inline(always)]
fn log_lost<H: Hook>(ctx: &TcContext, ring_full: u64, unreadable: u64) {
    warn!(
        ctx,
        target: H::NAME,
        "records lost on this CPU since the last report: {} with the ring buffer full, {} unreadable",
        ring_full,
        unreadable
    );
}

/// Whether a line may be logged now, given the time `next` before which
/// none may; if so, the next waits [`DIAG_INTERVAL_NS`].
#[inline(always)]
fn unless_too_soon(next: &mut u64) -> bool {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now < *next {
        return false;
    }
    *next = now + DIAG_INTERVAL_NS;
    true
}

/// Whether the agent wants diagnostics now.
#[inline(always)]
fn diagnostics() -> bool {
    // SAFETY: an aligned u64 that only the agent writes, through the map;
    // a stale read only delays a switch by a packet.
    unsafe { core::ptr::read_volatile(&raw const DIAGNOSTICS) != 0 }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the TC context points at a valid __sk_buff.
    unsafe { (*skb_of(ctx)).ifindex }
}

/// What a frame cut inside its destination address (before `needed`
/// bytes) selects: the slots its source matches, `from`, as libpcap's
/// `host` tests the source first; no ports.
#[inline(always)]
fn source_only(settings: &Settings, from: u64, needed: usize) -> Selectors {
    too_short(needed);
    Selectors {
        ip: settings.any_ip | by_direction(settings, from, 0),
        ports: None,
    }
}

/// Notes, when diagnostics are on, that this frame ends before the
/// `needed` bytes of the headers that would give its addresses or ports,
/// so that it matches only by those it holds whole.
#[inline(always)]
fn too_short(needed: usize) {
    if diagnostics() {
        note_too_short(needed as u64);
    }
}

/// A function of its own (a BPF subprogram, with a stack frame of its own)
/// so that its map key is never written where the parser spilled a pointer
/// (see [`diagnose`]); it is a few instructions, cheap to verify at each of
/// its call sites.
#[inline(never)]
fn note_too_short(needed: u64) {
    if let Some(note) = DIAG_STATE.get_ptr_mut(diag::SHORT_NEEDED) {
        // SAFETY: a per-CPU value, only touched by programs on this CPU.
        unsafe { *note = needed };
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Records a lost packet under the slot, or the mask of the slots, that
/// wanted it.
#[inline(always)]
fn count_lost(mask: u64) {
    if mask & mask.wrapping_sub(1) == 0 {
        if let Some(c) = LOST_BY_SLOT.get_ptr_mut(bit_index(mask)) {
            // SAFETY: a per-CPU value is only touched by programs on this CPU.
            unsafe { *c += 1 };
        }
        return;
    }
    if let Some(c) = LOST_BY_MASK.get_ptr_mut(&mask) {
        // SAFETY: a per-CPU value is only touched by programs on this CPU.
        unsafe { *c += 1 };
        return;
    }
    // A new mask: this CPU starts at one, the others at zero. When the
    // map is full the loss still shows in RING_LOST, unattributed.
    if LOST_BY_MASK.insert(&mask, &1, 0).is_err() {
        count(counter::LOST_UNATTRIBUTED);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
