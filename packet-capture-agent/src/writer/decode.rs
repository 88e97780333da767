//! One line per packet, in the words `tcpdump -n` uses.
//!
//! The decoder reads only the bytes it is given (a snaplen may cut a packet
//! short) and says `[|proto]` where the bytes end, as tcpdump does.

use std::fmt::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// A bounds-checked view of packet bytes.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&self, at: usize) -> Option<u8> {
        self.0.get(at).copied()
    }
    fn u16(&self, at: usize) -> Option<u16> {
        Some(u16::from_be_bytes(self.0.get(at..at + 2)?.try_into().ok()?))
    }
    fn u32(&self, at: usize) -> Option<u32> {
        Some(u32::from_be_bytes(self.0.get(at..at + 4)?.try_into().ok()?))
    }
    fn v4(&self, at: usize) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::from(self.u32(at)?))
    }
    fn v6(&self, at: usize) -> Option<Ipv6Addr> {
        let b: [u8; 16] = self.0.get(at..at + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    }
}

/// Describes an Ethernet frame; `orig_len` is its length on the wire.
pub fn describe(out: &mut impl Write, frame: &[u8], orig_len: u32) -> fmt::Result {
    let b = Bytes(frame);
    let Some(mut ethertype) = b.u16(12) else {
        return write!(out, "[|ether], length {orig_len}");
    };
    let mut at = 14;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let (Some(tci), Some(inner)) = (b.u16(at), b.u16(at + 2)) else {
            return write!(out, "[|vlan], length {orig_len}");
        };
        write!(out, "vlan {}, ", tci & 0x0fff)?;
        ethertype = inner;
        at += 4;
    }
    match ethertype {
        ETH_P_IP => ipv4(out, &b, at),
        ETH_P_IPV6 => ipv6(out, &b, at),
        ETH_P_ARP => arp(out, &b, at, orig_len),
        other => write!(out, "ethertype 0x{other:04x}, length {orig_len}"),
    }
}

fn ipv4(out: &mut impl Write, b: &Bytes, at: usize) -> fmt::Result {
    let (Some(vihl), Some(total), Some(frag), Some(proto), Some(src), Some(dst)) = (
        b.u8(at),
        b.u16(at + 2),
        b.u16(at + 6),
        b.u8(at + 9),
        b.v4(at + 12),
        b.v4(at + 16),
    ) else {
        return out.write_str("IP [|ip]");
    };
    let header = usize::from(vihl & 0x0f) * 4;
    let payload = usize::from(total).saturating_sub(header);
    let offset = frag & 0x1fff;
    if offset != 0 {
        return write!(
            out,
            "IP {src} > {dst}: ip-proto-{proto} (frag offset {}), length {payload}",
            usize::from(offset) * 8
        );
    }
    transport(out, b, "IP", &src, &dst, proto, at + header, payload)
}

fn ipv6(out: &mut impl Write, b: &Bytes, at: usize) -> fmt::Result {
    let (Some(plen), Some(mut next), Some(src), Some(dst)) =
        (b.u16(at + 4), b.u8(at + 6), b.v6(at + 8), b.v6(at + 24))
    else {
        return out.write_str("IP6 [|ip6]");
    };
    let mut l4 = at + 40;
    let mut payload = usize::from(plen);
    // Extension headers, as the capture programs walk them.
    for _ in 0..8 {
        let step = match next {
            0 | 43 | 60 => b.u8(l4 + 1).map(|l| (usize::from(l) + 1) * 8),
            51 => b.u8(l4 + 1).map(|l| (usize::from(l) + 2) * 4),
            44 => {
                if b.u16(l4 + 2).is_some_and(|f| f & 0xfff8 != 0) {
                    return write!(out, "IP6 {src} > {dst}: frag, length {payload}");
                }
                Some(8)
            }
            _ => break,
        };
        let (Some(step), Some(n)) = (step, b.u8(l4)) else {
            return write!(out, "IP6 {src} > {dst}: [|ip6]");
        };
        next = n;
        l4 += step;
        payload = payload.saturating_sub(step);
    }
    transport(out, b, "IP6", &src, &dst, next, l4, payload)
}

#[allow(clippy::too_many_arguments)]
fn transport(
    out: &mut impl Write,
    b: &Bytes,
    family: &str,
    src: &dyn fmt::Display,
    dst: &dyn fmt::Display,
    proto: u8,
    at: usize,
    len: usize,
) -> fmt::Result {
    let ports = || Some((b.u16(at)?, b.u16(at + 2)?));
    match proto {
        6 => {
            let Some((sp, dp)) = ports() else {
                return write!(out, "{family} {src} > {dst}: [|tcp]");
            };
            let (Some(seq), Some(ack), Some(off_flags), Some(win)) =
                (b.u32(at + 4), b.u32(at + 8), b.u16(at + 12), b.u16(at + 14))
            else {
                return write!(out, "{family} {src}.{sp} > {dst}.{dp}: [|tcp]");
            };
            let data = len.saturating_sub(usize::from(off_flags >> 12) * 4);
            write!(out, "{family} {src}.{sp} > {dst}.{dp}: Flags [")?;
            for (bit, c) in [
                (0x01, 'F'),
                (0x02, 'S'),
                (0x04, 'R'),
                (0x08, 'P'),
                (0x10, '.'),
                (0x20, 'U'),
                (0x40, 'E'),
                (0x80, 'W'),
            ] {
                if off_flags & bit != 0 {
                    out.write_char(c)?;
                }
            }
            write!(out, "], seq {seq}")?;
            if off_flags & 0x10 != 0 {
                write!(out, ", ack {ack}")?;
            }
            write!(out, ", win {win}, length {data}")
        }
        17 => match ports() {
            Some((sp, dp)) => write!(
                out,
                "{family} {src}.{sp} > {dst}.{dp}: UDP, length {}",
                len.saturating_sub(8)
            ),
            None => write!(out, "{family} {src} > {dst}: [|udp]"),
        },
        132 => match ports() {
            Some((sp, dp)) => write!(out, "{family} {src}.{sp} > {dst}.{dp}: sctp, length {len}"),
            None => write!(out, "{family} {src} > {dst}: [|sctp]"),
        },
        1 | 58 => {
            let name = match (proto, b.u8(at)) {
                (1, Some(0)) => "echo reply",
                (1, Some(3)) => "destination unreachable",
                (1, Some(8)) => "echo request",
                (1, Some(11)) => "time exceeded",
                (58, Some(1)) => "destination unreachable",
                (58, Some(3)) => "time exceeded",
                (58, Some(128)) => "echo request",
                (58, Some(129)) => "echo reply",
                (58, Some(133)) => "router solicitation",
                (58, Some(134)) => "router advertisement",
                (58, Some(135)) => "neighbor solicitation",
                (58, Some(136)) => "neighbor advertisement",
                (_, Some(_)) => "type",
                (_, None) => return write!(out, "{family} {src} > {dst}: [|icmp]"),
            };
            let label = if proto == 1 { "ICMP" } else { "ICMP6," };
            write!(out, "{family} {src} > {dst}: {label} {name}")?;
            if name == "type" {
                write!(out, " {}", b.u8(at).unwrap_or_default())?;
            }
            let echo = matches!((proto, b.u8(at)), (1, Some(0 | 8)) | (58, Some(128 | 129)));
            if echo && let (Some(id), Some(seq)) = (b.u16(at + 4), b.u16(at + 6)) {
                write!(out, ", id {id}, seq {seq}")?;
            }
            write!(out, ", length {len}")
        }
        other => write!(out, "{family} {src} > {dst}: ip-proto-{other} {len}"),
    }
}

fn arp(out: &mut impl Write, b: &Bytes, at: usize, orig_len: u32) -> fmt::Result {
    let len = orig_len.saturating_sub(at as u32);
    let (Some(op), Some(sha), Some(spa), Some(tpa)) = (
        b.u16(at + 6),
        b.0.get(at + 8..at + 14),
        b.v4(at + 14),
        b.v4(at + 24),
    ) else {
        return write!(out, "ARP, [|arp], length {len}");
    };
    match op {
        1 => write!(out, "ARP, Request who-has {tpa} tell {spa}, length {len}"),
        2 => {
            write!(out, "ARP, Reply {spa} is-at ")?;
            for (i, byte) in sha.iter().enumerate() {
                let sep = if i == 0 { "" } else { ":" };
                write!(out, "{sep}{byte:02x}")?;
            }
            write!(out, ", length {len}")
        }
        other => write!(out, "ARP, op {other}, length {len}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(frame: &[u8]) -> String {
        let mut s = String::new();
        describe(&mut s, frame, frame.len() as u32).unwrap();
        s
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        ip.extend_from_slice(l4);
        ip
    }

    #[test]
    fn tcp_syn_ack_like_tcpdump() {
        let mut tcp = vec![0x1f, 0x90, 0xc3, 0x50];
        tcp.extend_from_slice(&100u32.to_be_bytes());
        tcp.extend_from_slice(&7u32.to_be_bytes());
        tcp.extend_from_slice(&[0x50, 0x12, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(
            line(&eth(ETH_P_IP, &ipv4(6, &tcp))),
            "IP 10.0.0.1.8080 > 10.0.0.2.50000: Flags [S.], seq 100, ack 7, win 65535, length 0"
        );
    }

    #[test]
    fn udp_icmp_arp_and_others() {
        let udp = [0, 53, 0x30, 0x39, 0, 12, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            line(&eth(ETH_P_IP, &ipv4(17, &udp))),
            "IP 10.0.0.1.53 > 10.0.0.2.12345: UDP, length 4"
        );
        let icmp = [8, 0, 0, 0, 0, 9, 0, 1, 0xaa, 0xbb];
        assert_eq!(
            line(&eth(ETH_P_IP, &ipv4(1, &icmp))),
            "IP 10.0.0.1 > 10.0.0.2: ICMP echo request, id 9, seq 1, length 10"
        );
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1];
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 0, 0, 2]);
        assert_eq!(
            line(&eth(ETH_P_ARP, &arp)),
            "ARP, Request who-has 10.0.0.2 tell 10.0.0.1, length 28"
        );
        assert_eq!(line(&eth(0x88cc, &[0; 10])), "ethertype 0x88cc, length 24");
    }

    #[test]
    fn truncated_frames_say_where_they_end() {
        let frame = eth(ETH_P_IP, &ipv4(6, &[0x1f, 0x90, 0xc3, 0x50, 0, 0]));
        assert_eq!(line(&frame), "IP 10.0.0.1.8080 > 10.0.0.2.50000: [|tcp]");
        assert_eq!(line(&frame[..20]), "IP [|ip]");
        assert_eq!(line(&frame[..5]), "[|ether], length 5");
    }
}
