//! The kernel/user-space ABI: map layouts and the ring-buffer record header.
//!
//! Every struct is `#[repr(C)]` with explicit padding so that the eBPF program
//! and the agent agree byte for byte.

/// Number of concurrent captures one attached program serves. A capture owns
/// one slot; a packet carries a bit mask of the slots that matched it.
pub const MAX_SLOTS: usize = 64;

/// Largest number of packet bytes the kernel copies into one record.
pub const MAX_SNAPLEN: u32 = 262_144;

/// Default snaplen, as tcpdump's.
pub const DEFAULT_SNAPLEN: u32 = MAX_SNAPLEN;

/// Size of the ring buffer shared by all captures, in bytes (a power of two
/// multiple of the page size). The agent sizes it at load time.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// Entries of the port map: one per port number.
pub const PORT_ENTRIES: u32 = 65_536;

/// Distinct prefixes of a family the address maps hold, every slot's
/// together. They can fill (64 slots of up to 1024 targets each): the
/// agent refuses a start or change past it before it writes anything.
pub const MAX_PREFIXES: u32 = 16_384;

/// Distinct slot masks whose losses are counted apart.
pub const LOST_MASKS: u32 = 4096;

/// Direction of a packet relative to the interface it was seen on.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// What the record's bytes start with.
pub const LINK_ETHERNET: u8 = 0;
/// The interface has no link-layer header (tun, wireguard, ipip): the bytes
/// start at the IP header.
pub const LINK_RAW_IP: u8 = 1;

/// Index into the per-CPU `COUNTERS` array.
pub mod counter {
    // Only losses are counted: a counter of every packet would cost each
    // packet a per-CPU update. How often the programs ran, the kernel
    // counts itself while its run statistics are on (`BPF_ENABLE_STATS`).
    /// Matched packets that could not be written to the ring buffer (full).
    pub const RING_LOST: u32 = 0;
    /// Matched packets whose bytes could not be read from the skb.
    pub const LOAD_FAILED: u32 = 1;
    /// Lost packets whose slot mask found no room in `LOST_BY_MASK`: in
    /// RING_LOST, but charged to no capture.
    pub const LOST_UNATTRIBUTED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Header of one ring-buffer record; `cap_len` packet bytes follow it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RecordHeader {
    /// Slots whose IP and port sets matched this packet.
    pub slot_mask: u64,
    /// `bpf_ktime_get_ns()` when the packet was seen (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    pub ifindex: u32,
    /// Length of the packet on the wire (`skb->len`).
    pub orig_len: u32,
    /// Bytes that follow this header.
    pub cap_len: u32,
    /// The VLAN tag the device took off the frame (`skb->vlan_tci`), valid
    /// when `vlan_present` is 1; the agent puts it back, as libpcap does.
    pub vlan_tci: u16,
    pub vlan_proto: u16,
    /// `skb->protocol` (the EtherType of what follows the link header), in
    /// host byte order: what a synthesized Ethernet header says for
    /// [`LINK_RAW_IP`] records.
    pub protocol: u16,
    pub vlan_present: u8,
    pub direction: u8,
    /// [`LINK_ETHERNET`] or [`LINK_RAW_IP`].
    pub link: u8,
    pub _pad: [u8; 3],
    /// Slots of `slot_mask` whose filter the kernel ran (and the packet
    /// passed): user space does not run it again.
    pub kernel_filtered: u64,
}

pub const RECORD_HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();

/// Capture-wide settings, one element of the `SETTINGS` array.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Settings {
    /// Slots that hold a running capture.
    pub active: u64,
    /// Active slots without IP targets: they match any address.
    pub any_ip: u64,
    /// Active slots without port targets: they match any port, and packets
    /// that carry none.
    pub any_port: u64,
    /// Slots whose targets must be the destination (packets to them).
    pub ingress_only: u64,
    /// Slots whose targets must be the source (packets from them).
    pub egress_only: u64,
    /// Slots whose filter runs in the kernel, by link type ([`LINK_ETHERNET`],
    /// [`LINK_RAW_IP`]): their program is in `FILTER_PROGRAMS` at
    /// [`filter_program`].
    pub kernel_filter: [u64; 2],
    /// A bit for each whole address some slot targets, at [`host_bit_v4`]
    /// or [`host_bit_v6`]: a packet whose address has its bit clear is
    /// targeted by no slot, and its hash lookup is skipped (most traffic
    /// on a node is not what a capture is after). Several addresses may
    /// share a bit: a set bit only means "look it up".
    pub host_bits: [u64; HOST_WORDS],
    /// Largest snaplen among the active slots: what the kernel copies.
    pub snaplen: u32,
    /// Wake the reader only when this many bytes come to wait in the ring
    /// (it also polls on a short timer), so a busy ring costs one wake-up
    /// per batch.
    pub wakeup_bytes: u32,
    /// The agent API's IPv6 address (with `api_family` [`API_V6`]).
    pub api_v6: [u8; 16],
    /// The agent API's IPv4 address (with `api_family` [`API_V4`]).
    pub api_v4: [u8; 4],
    /// The agent API's TCP port; 0: none. TCP to or from the API's address
    /// and port is never captured.
    pub api_port: u16,
    /// [`API_V4`], [`API_V6`], or 0 for none.
    pub api_family: u8,
    /// How addresses of each family are looked up: [`LOOKUP_NONE`],
    /// [`LOOKUP_EXACT`] or [`LOOKUP_PREFIX`].
    pub v4_lookup: u8,
    pub v6_lookup: u8,
    pub _pad: [u8; 2],
    /// The ring buffer's size in bytes.
    pub ring_bytes: u32,
}

/// Words of `Settings::host_bits`: 512 bits, one in 8 set with 64 target
/// addresses.
pub const HOST_WORDS: usize = 8;

/// The bit of `Settings::host_bits` of an IPv4 address.
#[inline(always)]
pub fn host_bit_v4(addr: [u8; 4]) -> u32 {
    host_bit(u32::from_le_bytes(addr))
}

/// The bit of `Settings::host_bits` of an IPv6 address: its four words
/// folded into one.
#[inline(always)]
pub fn host_bit_v6(addr: [u8; 16]) -> u32 {
    let word = |i: usize| u32::from_le_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    host_bit(word(0) ^ word(4) ^ word(8) ^ word(12))
}

/// Fibonacci hashing: the top bits of the product, which every bit of
/// the address moves.
#[inline(always)]
fn host_bit(word: u32) -> u32 {
    const BITS: u32 = (HOST_WORDS * 64).trailing_zeros();
    word.wrapping_mul(0x9e37_79b1) >> (32 - BITS)
}

/// Whether `host_bits` has the bit of an address set.
#[inline(always)]
pub fn host_bit_set(host_bits: &[u64; HOST_WORDS], bit: u32) -> bool {
    host_bits[bit as usize / 64 % HOST_WORDS] >> (bit % 64) & 1 != 0
}

/// Entries of `IPV4_HOST_TABLE`, one per host bit: the slots of one
/// targeted IPv4 address whose bit it is, read without a hash lookup. The
/// agent writes the table through a shared mapping, a word at a time, while
/// the programs read it.
pub const HOST_TABLE_ENTRIES: u32 = (HOST_WORDS * 64) as u32;

/// The two words of a host table entry that holds `addr` with `slots`.
/// Each word carries the whole address and half of the slots, so a reader
/// that gets one word from before a change and one from after it either
/// finds two different addresses, and takes the hash lookup, or the same
/// address with every slot's bit as it was at one moment or the other.
#[inline(always)]
pub fn host_entry_v4(addr: [u8; 4], slots: u64) -> [u64; 2] {
    let addr = u64::from(u32::from_ne_bytes(addr)) << 32;
    [addr | (slots & 0xffff_ffff), addr | (slots >> 32)]
}

/// A host table entry that holds no address: its words name different
/// ones, so it matches no packet.
pub const HOST_ENTRY_EMPTY: [u64; 2] = [0, 1 << 32];

/// The slots of `addr` in a host table entry, if the entry holds it.
#[inline(always)]
pub fn host_entry_slots(addr: [u8; 4], entry: [u64; 2]) -> Option<u64> {
    let addr = u64::from(u32::from_ne_bytes(addr));
    if entry[0] >> 32 == addr && entry[1] >> 32 == addr {
        Some((entry[0] & 0xffff_ffff) | (entry[1] << 32))
    } else {
        None
    }
}

/// No slot targets an address of the family: nothing to look up.
pub const LOOKUP_NONE: u8 = 0;
/// The slots target whole addresses only (/32, /128): a hash lookup
/// (`IPV4_HOSTS`, `IPV6_HOSTS`), cheaper than the trie's.
pub const LOOKUP_EXACT: u8 = 1;
/// Some slot targets a network: the longest-prefix-match trie.
pub const LOOKUP_PREFIX: u8 = 2;

/// Entries of the `FILTER_PROGRAMS` program array: a filter per slot, hook
/// direction and link type, then the resume program of each hook.
pub const FILTER_PROGRAM_ENTRIES: u32 = MAX_SLOTS as u32 * HOOKS + HOOKS;

/// Hooks: a direction (ingress, egress) and a link type each.
pub const HOOKS: u32 = 4;

/// A hook's place among the [`HOOKS`].
pub const fn hook_index(direction: u8, link: u8) -> u32 {
    direction as u32 * 2 + link as u32
}

/// Index of a slot's filter for the hook of `direction` and `link` in
/// `FILTER_PROGRAMS`. Each hook has its own copy of a filter, whose tail
/// call back to the hook's resume program has a constant index.
pub const fn filter_program(slot: u32, direction: u8, link: u8) -> u32 {
    slot * HOOKS + hook_index(direction, link)
}

/// Index of the resume program of a hook in `FILTER_PROGRAMS`.
pub const fn resume_program(direction: u8, link: u8) -> u32 {
    MAX_SLOTS as u32 * HOOKS + hook_index(direction, link)
}

/// Where a packet stands while the captures' filters run in the kernel,
/// one tail call after another: one per CPU (a TC program runs to its end,
/// tail calls included, on one CPU before the next packet's starts there).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FilterState {
    /// Slots that still want the packet: a filter that rejects it clears
    /// its own bit.
    pub mask: u64,
    /// Slots whose filter has yet to run (with the bit of one whose program
    /// could not be reached put back).
    pub pending: u64,
    /// Slots that had a filter to run when the packet arrived; those of
    /// them no longer pending ran theirs.
    pub filters: u64,
}

/// `Settings::api_family` of an IPv4 API address.
pub const API_V4: u8 = 4;
/// `Settings::api_family` of an IPv6 API address.
pub const API_V6: u8 = 6;

/// Key of the IPv4 LPM trie (`prefix_len` counts bits of `addr`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Ipv4Key {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// Key of the IPv6 LPM trie.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Ipv6Key {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::FilterState {}
    unsafe impl aya::Pod for super::Ipv4Key {}
    unsafe impl aya::Pod for super::Ipv6Key {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(RECORD_HEADER_LEN, 48);
        assert_eq!(core::mem::size_of::<Settings>(), 160);
        assert_eq!(core::mem::size_of::<FilterState>(), 24);
        assert_eq!(core::mem::size_of::<Ipv4Key>(), 8);
        assert_eq!(core::mem::size_of::<Ipv6Key>(), 20);
    }

    #[test]
    fn host_entries_match_their_address_and_torn_reads_mix_no_two() {
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let before = host_entry_v4(a, 0x8000_0001_0000_0003);
        let after = host_entry_v4(a, 0x0000_0001_0000_0000);
        let other = host_entry_v4(b, u64::MAX);
        assert_eq!(host_entry_slots(a, before), Some(0x8000_0001_0000_0003));
        assert_eq!(host_entry_slots(b, before), None);
        assert_eq!(host_entry_slots(b, other), Some(u64::MAX));
        for addr in [[0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], a] {
            assert_eq!(host_entry_slots(addr, HOST_ENTRY_EMPTY), None);
        }
        // A word of one address and a word of another: neither matches.
        for entry in [[before[0], other[1]], [other[0], before[1]]] {
            assert_eq!(host_entry_slots(a, entry), None);
            assert_eq!(host_entry_slots(b, entry), None);
        }
        // Two states of one address: each half of the slots from one.
        assert_eq!(
            host_entry_slots(a, [before[0], after[1]]),
            Some(0x0000_0001_0000_0003)
        );
        assert_eq!(
            host_entry_slots(a, [after[0], before[1]]),
            Some(0x8000_0001_0000_0000)
        );
    }
}
