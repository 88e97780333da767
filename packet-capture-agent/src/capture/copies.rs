//! Each packet once per node: a packet that crosses several interfaces of
//! the node (a pod's veth, a bridge, eth0) is recorded where it is seen
//! first, and its copies on the other interfaces are left out.
//!
//! Two sightings are the same packet when the parts of it that forwarding
//! leaves alone are equal (its [`identity`]) and the second one is at
//! another place (interface and direction) within [`WINDOW_NS`] of the
//! first. A packet seen again at the place where it was first seen is a
//! real repeat (a retransmission, a datagram an application sent twice) and
//! is kept; so is one seen again after the window.

use crate::writer::{Direction, Meta};

/// How long after a packet is seen a sighting at another place is taken
/// for a copy of it. Crossing a node takes microseconds.
pub const WINDOW_NS: u64 = 20_000_000;
/// Sightings remembered: sets of [`WAYS`], chosen by the identity.
const SETS: usize = 4096;
const WAYS: usize = 4;

/// The packets one capture has seen lately, in a table of fixed size
/// (16,384 sightings, 384 KiB, its pages taken as the traffic fills them):
/// a sighting replaces the oldest of its set. A copy is found unless four
/// other packets of its set came between it and the original, which
/// crossing a node leaves no time for; one that is not found is recorded,
/// never another packet dropped.
#[derive(Debug)]
pub struct Copies {
    /// Per sighting: the packet's identity, when, and where (the
    /// interface index and the direction, see [`place`]). An entry never
    /// written is a sighting in 1970, outside any packet's window.
    ids: Vec<u64>,
    at_ns: Vec<u64>,
    places: Vec<u64>,
}

impl Default for Copies {
    fn default() -> Self {
        // Zeroed vectors come from zeroed pages, touched only when used.
        Self {
            ids: vec![0; SETS * WAYS],
            at_ns: vec![0; SETS * WAYS],
            places: vec![0; SETS * WAYS],
        }
    }
}

fn place(meta: &Meta) -> u64 {
    u64::from(meta.ifindex) << 1 | u64::from(meta.direction == Direction::Out)
}

impl Copies {
    /// Whether `frame`, seen as `meta` says, is a copy of a packet already
    /// seen elsewhere; if not, it is remembered as seen here.
    pub fn is_copy(&mut self, meta: &Meta, frame: &[u8]) -> bool {
        let Some(id) = identity(frame) else {
            return false;
        };
        let now = meta.unix_ns;
        let here = place(meta);
        let first = id as usize % SETS * WAYS;
        let set = first..first + WAYS;
        let seen = set.clone().find(|&i| self.ids[i] == id);
        if let Some(i) = seen
            && self.places[i] != here
            && now.saturating_sub(self.at_ns[i]) < WINDOW_NS
        {
            return true;
        }
        // A repeat renews its own sighting; a new packet takes the oldest.
        let slot =
            seen.unwrap_or_else(|| set.min_by_key(|&i| self.at_ns[i]).expect("a set has ways"));
        self.ids[slot] = id;
        self.at_ns[slot] = now;
        self.places[slot] = here;
        false
    }
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_VLAN: [u16; 2] = [0x8100, 0x88a8];

/// A hash of what forwarding does not change in an Ethernet frame's
/// packet, `None` for what is not IPv4, IPv6 or ARP:
///
/// - IPv4: the header but for the TOS, TTL and checksum (so the length,
///   the identification and fragment offset, the protocol, the addresses),
///   and the first 8 bytes after it (ports and sequence number, the UDP
///   length and checksum, ICMP's type, id and sequence; payload bytes for a
///   later fragment);
/// - IPv6: the fixed header but for the traffic class and hop limit, and
///   the 8 bytes after it (the transport header's start, or the first
///   extension header, whose fragment header holds the offset and id);
/// - ARP: the whole message.
///
/// The link header (MAC addresses, VLAN tags) is not part of it: a bridge
/// or a router rewrites it. Whatever the frame has of these bytes counts
/// (a short snaplen hashes fewer).
pub fn identity(frame: &[u8]) -> Option<u64> {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
    // Up to two VLAN tags still in the frame.
    for _ in 0..2 {
        if !ETHERTYPE_VLAN.contains(&ethertype) {
            break;
        }
        at += 4;
        ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
    }
    let packet = &frame[at + 2..];
    let mut hash = Mix::new(ethertype);
    match ethertype {
        ETHERTYPE_IPV4 => {
            let header_len = usize::from(packet.first()? & 0x0f) * 4;
            if packet.len() < 20 || header_len < 20 {
                return None;
            }
            hash.write(&packet[2..8]);
            hash.write(&packet[9..10]);
            hash.write(&packet[12..20]);
            hash.write(after(packet, header_len));
        }
        ETHERTYPE_IPV6 => {
            if packet.len() < 40 {
                return None;
            }
            // The version and flow label, without the traffic class.
            hash.write(&[packet[0] & 0xf0, packet[1] & 0x0f, packet[2], packet[3]]);
            hash.write(&packet[4..7]);
            hash.write(&packet[8..40]);
            hash.write(after(packet, 40));
        }
        ETHERTYPE_ARP => hash.write(packet.get(..28)?),
        _ => return None,
    }
    Some(hash.finish())
}

/// Up to 8 bytes of `packet` from `start`.
fn after(packet: &[u8], start: usize) -> &[u8] {
    let start = start.min(packet.len());
    &packet[start..packet.len().min(start + 8)]
}

/// The hash of an [`identity`]: 8 bytes at a time, each mixed in by a 64 ×
/// 64 → 128-bit multiply whose halves are folded together (as foldhash
/// does), and the length of every write at the end, so that bytes moved
/// from one write to the next change it. A few multiplies a packet, where
/// a byte at a time (FNV) took one per byte, each waiting for the last.
struct Mix {
    hash: u64,
    /// The writes' lengths, a byte each (none is over 32 bytes).
    lengths: u64,
}

/// 2^64 / φ, odd: its bits have no pattern.
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const FINAL_MULTIPLIER: u64 = 0xc2b2_ae3d_27d4_eb4f;

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    product as u64 ^ (product >> 64) as u64
}

impl Mix {
    /// Starts from the packet's kind (its EtherType), so that the same
    /// bytes of two kinds hash apart.
    fn new(kind: u16) -> Self {
        Self {
            hash: u64::from(kind),
            lengths: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.hash = folded_multiply(self.hash ^ u64::from_le_bytes(word), MULTIPLIER);
        }
        self.lengths = self.lengths << 8 | bytes.len() as u64;
    }

    fn finish(&self) -> u64 {
        folded_multiply(self.hash ^ self.lengths, FINAL_MULTIPLIER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn meta(at_ms: u64, ifindex: u32, direction: Direction) -> Meta {
        Meta {
            unix_ns: at_ms * MS,
            ifindex,
            direction,
            orig_len: 0,
        }
    }

    /// An Ethernet frame holding an IPv4 UDP datagram with TTL `ttl`,
    /// identification `id` and fragment field `frag`.
    fn udp4(mac: u8, ttl: u8, id: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![mac; 12];
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[0x45, 0, 0, 32]);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[ttl, 17, mac, mac]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 12, 0xab, 0xcd, 1, 2, 3, 4]);
        f
    }

    fn udp6(mac: u8, hop_limit: u8, tclass: u8) -> Vec<u8> {
        let mut f = vec![mac; 12];
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60 | tclass >> 4, tclass << 4 | 0x1, 0x23, 0x45]);
        f.extend_from_slice(&[0, 12, 17, hop_limit]);
        f.extend_from_slice(&[0xfd; 16]);
        f.extend_from_slice(&[0xfe; 16]);
        f.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 12, 0xab, 0xcd, 1, 2, 3, 4]);
        f
    }

    #[test]
    fn forwarding_keeps_the_identity_and_the_packet_does_not() {
        let sent = udp4(1, 64, 7, 0x4000);
        // Another hop: new MACs, TTL and checksum.
        assert_eq!(identity(&sent), identity(&udp4(2, 63, 7, 0x4000)));
        // Another datagram, another fragment.
        assert_ne!(identity(&sent), identity(&udp4(1, 64, 8, 0x4000)));
        assert_ne!(identity(&sent), identity(&udp4(1, 64, 7, 0x2000 | 185)));
        assert_eq!(identity(&udp6(1, 64, 0)), identity(&udp6(2, 63, 0xb8)));
        let mut tagged = udp4(2, 63, 7, 0x4000);
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        assert_eq!(identity(&sent), identity(&tagged));
        let mut arp = vec![0; 12];
        arp.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        arp.extend_from_slice(&[0; 28]);
        assert!(identity(&arp).is_some());
        assert!(identity(&arp[..30]).is_none(), "a cut ARP message");
        let mut lldp = vec![0; 12];
        lldp.extend_from_slice(&0x88ccu16.to_be_bytes());
        lldp.extend_from_slice(&[0; 40]);
        assert_eq!(identity(&lldp), None);
        assert_eq!(identity(&[0; 10]), None);
    }

    #[test]
    fn packets_that_differ_in_one_field_never_share_an_identity() {
        // A sender's datagrams: the identification counts up and wraps,
        // the source port moves on at each wrap.
        let mut seen = std::collections::HashSet::new();
        for n in 0..200_000u32 {
            let mut frame = udp4(1, 64, n as u16, 0x4000);
            frame[34..36].copy_from_slice(&((n >> 16) as u16).to_be_bytes());
            assert!(seen.insert(identity(&frame).unwrap()), "datagram {n}");
        }
        // A frame cut inside the bytes after the IP header, where what is
        // cut off is zeros: only the lengths tell them apart.
        let mut whole = udp4(1, 64, 7, 0x4000);
        whole[40..42].fill(0);
        assert_ne!(identity(&whole), identity(&whole[..40]));
    }

    #[test]
    fn a_packet_is_kept_where_it_is_first_seen() {
        let mut copies = Copies::default();
        let (veth, eth0) = (5, 2);
        let packet = udp4(1, 64, 7, 0x4000);
        assert!(!copies.is_copy(&meta(0, veth, Direction::In), &packet));
        assert!(copies.is_copy(&meta(0, eth0, Direction::Out), &udp4(2, 63, 7, 0x4000)));
        // Sent again from the pod: a repeat, and its copy.
        assert!(!copies.is_copy(&meta(1, veth, Direction::In), &packet));
        assert!(copies.is_copy(&meta(1, eth0, Direction::Out), &packet));
        // The same interface the other way is another place.
        assert!(copies.is_copy(&meta(2, veth, Direction::Out), &packet));
        // After the window a sighting anywhere is a new packet.
        assert!(!copies.is_copy(&meta(40, eth0, Direction::Out), &packet));
        // Other packets are not copies of it.
        assert!(!copies.is_copy(&meta(40, veth, Direction::In), &udp4(1, 64, 8, 0x4000)));
    }

    #[test]
    fn a_copy_is_found_behind_other_packets_and_what_is_remembered_is_bounded() {
        let (veth, eth0) = (5, 2);
        let packet = udp4(1, 64, 7, 0x4000);
        let others = |n: u32| (0..n).map(|id| udp4(1, 64, 1000 + id as u16, (id >> 16) as u16));

        let mut copies = Copies::default();
        assert!(!copies.is_copy(&meta(0, veth, Direction::In), &packet));
        for other in others(64) {
            copies.is_copy(&meta(0, veth, Direction::In), &other);
        }
        assert!(copies.is_copy(&meta(1, eth0, Direction::Out), &packet));
        assert!(!copies.is_copy(&meta(25, eth0, Direction::Out), &packet));

        // Behind more packets than the table holds, the original is
        // forgotten: its copy is recorded as a packet of its own.
        let mut copies = Copies::default();
        assert!(!copies.is_copy(&meta(0, veth, Direction::In), &packet));
        for other in others((2 * SETS * WAYS) as u32) {
            copies.is_copy(&meta(0, veth, Direction::In), &other);
        }
        assert!(!copies.is_copy(&meta(1, eth0, Direction::Out), &packet));
    }
}
