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

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::writer::{Direction, Meta};

/// How long after a packet is seen a sighting at another place is taken
/// for a copy of it. Crossing a node takes microseconds.
pub const WINDOW_NS: u64 = 20_000_000;
/// Sightings remembered at most (the oldest are forgotten first).
const CAPACITY: usize = 16_384;

/// Where a packet was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    ifindex: u32,
    direction: Direction,
}

#[derive(Debug, Clone, Copy)]
struct Sighting {
    at_ns: u64,
    place: Place,
}

/// The packets one capture has seen lately. It grows with the traffic, up
/// to [`CAPACITY`] sightings (under a megabyte), and stays that size.
#[derive(Debug, Default)]
pub struct Copies {
    seen: HashMap<u64, Sighting, BuildHasherDefault<Prehashed>>,
    /// (when, identity) in the order sightings were recorded, to forget
    /// them; an entry whose sighting was renewed since is skipped.
    order: VecDeque<(u64, u64)>,
}

impl Copies {
    /// Whether `frame`, seen as `meta` says, is a copy of a packet already
    /// seen elsewhere; if not, it is remembered as seen here.
    pub fn is_copy(&mut self, meta: &Meta, frame: &[u8]) -> bool {
        let Some(id) = identity(frame) else {
            return false;
        };
        let now = meta.unix_ns;
        self.forget_before(now.saturating_sub(WINDOW_NS));
        let place = Place {
            ifindex: meta.ifindex,
            direction: meta.direction,
        };
        let sighting = Sighting { at_ns: now, place };
        match self.seen.entry(id) {
            Entry::Occupied(first)
                if first.get().place != place
                    && now.saturating_sub(first.get().at_ns) < WINDOW_NS =>
            {
                return true;
            }
            Entry::Occupied(mut first) => *first.get_mut() = sighting,
            Entry::Vacant(slot) => {
                slot.insert(sighting);
            }
        }
        self.order.push_back((now, id));
        false
    }

    /// Forgets the sightings from before `t`, and the oldest beyond
    /// [`CAPACITY`].
    fn forget_before(&mut self, t: u64) {
        while let Some(&(at, id)) = self.order.front() {
            if at >= t && self.order.len() < CAPACITY {
                break;
            }
            self.order.pop_front();
            if let Entry::Occupied(s) = self.seen.entry(id)
                && s.get().at_ns == at
            {
                s.remove();
            }
        }
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
    let mut hash = Fnv::default();
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
    Some(hash.0)
}

/// The map's hasher: an [`identity`] is a hash already, used as it is.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id;
    }
}

/// Up to 8 bytes of `packet` from `start`.
fn after(packet: &[u8], start: usize) -> &[u8] {
    let start = start.min(packet.len());
    &packet[start..packet.len().min(start + 8)]
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
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
    fn what_it_remembers_is_bounded() {
        let mut copies = Copies::default();
        for id in 0..(3 * CAPACITY) as u16 {
            copies.is_copy(&meta(0, 1, Direction::In), &udp4(1, 64, id, 0));
        }
        assert!(copies.seen.len() <= CAPACITY && copies.order.len() <= CAPACITY);
        copies.is_copy(&meta(100, 1, Direction::In), &udp4(1, 64, 0, 0));
        assert_eq!(copies.seen.len(), 1, "older than the window: forgotten");
    }
}
