//! One line per packet, in the words `tcpdump -n` uses, from etherparse's
//! decoding of the frame.
//!
//! A snaplen may cut a packet short: etherparse's lax slicing decodes the
//! layers that are whole, and the line says `[|proto]` where the bytes end,
//! as tcpdump does. Lengths come from the headers (what the packet had on
//! the wire), not from the bytes kept.

use std::fmt::{self, Display, Write};
use std::net::Ipv4Addr;

use etherparse::err::Layer;
use etherparse::{
    EtherType, Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, IpNumber, Ipv6ExtensionSlice,
    LaxIpPayloadSlice, LaxIpv4Slice, LaxIpv6Slice, LaxLinkExtSlice, LaxNetSlice, LaxSlicedPacket,
    TcpSlice, TransportSlice, UdpSlice, ip_number,
};

/// Describes an Ethernet frame; `orig_len` is its length on the wire.
pub fn describe(out: &mut impl Write, frame: &[u8], orig_len: u32) -> fmt::Result {
    let Ok(packet) = LaxSlicedPacket::from_ethernet(frame) else {
        return write!(out, "[|ether], length {orig_len}");
    };
    for ext in &packet.link_exts {
        if let LaxLinkExtSlice::Vlan(vlan) = ext {
            write!(out, "vlan {}, ", vlan.vlan_identifier().value())?;
        }
    }
    let stopped_at = packet.stop_err.as_ref().map(|(_, layer)| *layer);
    if stopped_at == Some(Layer::VlanHeader) {
        return write!(out, "[|vlan], length {orig_len}");
    }
    // The frame's bytes from the network header on: what follows the
    // Ethernet header and the VLAN tags.
    let network = packet.ether_payload();
    let network_at = frame.len() - network.as_ref().map_or(0, |p| p.payload.len());
    match &packet.net {
        Some(LaxNetSlice::Ipv4(ip)) => ipv4(out, &packet, ip, stopped_at),
        Some(LaxNetSlice::Ipv6(ip)) => ipv6(out, &packet, ip, stopped_at),
        Some(LaxNetSlice::Arp(arp)) => {
            let len = orig_len.saturating_sub(network_at as u32);
            let (spa, tpa) = (arp.sender_protocol_addr(), arp.target_protocol_addr());
            match arp.operation().0 {
                1 => write!(out, "ARP, Request who-has {} tell {}", Addr(tpa), Addr(spa))?,
                2 => write!(
                    out,
                    "ARP, Reply {} is-at {}",
                    Addr(spa),
                    Hex(arp.sender_hw_addr())
                )?,
                op => write!(out, "ARP, op {op}")?,
            }
            write!(out, ", length {len}")
        }
        None => match network.map(|p| p.ether_type) {
            Some(EtherType::IPV4) => out.write_str("IP [|ip]"),
            Some(EtherType::IPV6) => out.write_str("IP6 [|ip6]"),
            Some(EtherType::ARP) => write!(
                out,
                "ARP, [|arp], length {}",
                orig_len.saturating_sub(network_at as u32)
            ),
            Some(other) => write!(out, "ethertype 0x{:04x}, length {orig_len}", other.0),
            None => write!(out, "[|ether], length {orig_len}"),
        },
    }
}

fn ipv4(
    out: &mut impl Write,
    packet: &LaxSlicedPacket,
    ip: &LaxIpv4Slice,
    stopped_at: Option<Layer>,
) -> fmt::Result {
    let header = ip.header();
    let (src, dst) = (header.source_addr(), header.destination_addr());
    let len = usize::from(header.total_len()).saturating_sub(header.slice().len());
    let offset = header.fragments_offset().value();
    if offset != 0 {
        return write!(
            out,
            "IP {src} > {dst}: ip-proto-{} (frag offset {}), length {len}",
            header.protocol().0,
            usize::from(offset) * 8
        );
    }
    if stopped_at == Some(Layer::IpAuthHeader) {
        return write!(out, "IP {src} > {dst}: [|ip]");
    }
    transport(out, packet, "IP", src, dst, ip.payload(), len)
}

fn ipv6(
    out: &mut impl Write,
    packet: &LaxSlicedPacket,
    ip: &LaxIpv6Slice,
    stopped_at: Option<Layer>,
) -> fmt::Result {
    let header = ip.header();
    let (src, dst) = (header.source_addr(), header.destination_addr());
    let exts = ip.extensions();
    let len = usize::from(header.payload_length()).saturating_sub(exts.slice().len());
    let later_fragment = exts.clone().into_iter().any(
        |ext| matches!(ext, Ipv6ExtensionSlice::Fragment(f) if f.fragment_offset().value() != 0),
    );
    if later_fragment {
        return write!(out, "IP6 {src} > {dst}: frag, length {len}");
    }
    if stopped_at.is_some_and(|layer| !is_transport(layer)) {
        // The bytes end inside the extension headers.
        return write!(out, "IP6 {src} > {dst}: [|ip6]");
    }
    transport(out, packet, "IP6", src, dst, ip.payload(), len)
}

fn is_transport(layer: Layer) -> bool {
    matches!(
        layer,
        Layer::TcpHeader | Layer::UdpHeader | Layer::Icmpv4 | Layer::Icmpv6 | Layer::Igmp
    )
}

/// The transport header etherparse sliced, or for the first fragment of a
/// fragmented datagram (which etherparse leaves unsliced; later fragments
/// were told apart before) the one at the start of its payload, which
/// tcpdump decodes too.
fn sliced_transport<'a>(
    packet: &LaxSlicedPacket<'a>,
    payload: &LaxIpPayloadSlice<'a>,
) -> Option<TransportSlice<'a>> {
    if let Some(transport) = &packet.transport {
        return Some(transport.clone());
    }
    if !payload.fragmented {
        return None;
    }
    let bytes = payload.payload;
    match payload.ip_number {
        ip_number::TCP => TcpSlice::from_slice(bytes).ok().map(TransportSlice::Tcp),
        ip_number::UDP => UdpSlice::from_slice_lax(bytes)
            .ok()
            .map(TransportSlice::Udp),
        ip_number::ICMP => Icmpv4Slice::from_slice(bytes)
            .ok()
            .map(TransportSlice::Icmpv4),
        ip_number::IPV6_ICMP => Icmpv6Slice::from_slice(bytes)
            .ok()
            .map(TransportSlice::Icmpv6),
        _ => None,
    }
}

/// What follows the IP header(s); `len` is the length of the IP payload
/// (after any extension headers) on the wire.
fn transport(
    out: &mut impl Write,
    packet: &LaxSlicedPacket,
    family: &str,
    src: impl Display,
    dst: impl Display,
    payload: &LaxIpPayloadSlice,
    len: usize,
) -> fmt::Result {
    let sliced = sliced_transport(packet, payload);
    match (payload.ip_number, sliced) {
        (_, Some(TransportSlice::Tcp(tcp))) => {
            let (sp, dp) = (tcp.source_port(), tcp.destination_port());
            write!(out, "{family} {src}.{sp} > {dst}.{dp}: Flags [")?;
            for (set, c) in [
                (tcp.fin(), 'F'),
                (tcp.syn(), 'S'),
                (tcp.rst(), 'R'),
                (tcp.psh(), 'P'),
                (tcp.ack(), '.'),
                (tcp.urg(), 'U'),
                (tcp.ece(), 'E'),
                (tcp.cwr(), 'W'),
            ] {
                if set {
                    out.write_char(c)?;
                }
            }
            write!(out, "], seq {}", tcp.sequence_number())?;
            if tcp.ack() {
                write!(out, ", ack {}", tcp.acknowledgment_number())?;
            }
            let data = len.saturating_sub(usize::from(tcp.data_offset()) * 4);
            write!(out, ", win {}, length {data}", tcp.window_size())
        }
        (_, Some(TransportSlice::Udp(udp))) => write!(
            out,
            "{family} {src}.{} > {dst}.{}: UDP, length {}",
            udp.source_port(),
            udp.destination_port(),
            len.saturating_sub(8)
        ),
        (_, Some(TransportSlice::Icmpv4(icmp))) => {
            let (name, echo) = match icmp.icmp_type() {
                Icmpv4Type::EchoReply(echo) => ("echo reply", Some(echo)),
                Icmpv4Type::EchoRequest(echo) => ("echo request", Some(echo)),
                Icmpv4Type::DestinationUnreachable(_) => ("destination unreachable", None),
                Icmpv4Type::TimeExceeded(_) => ("time exceeded", None),
                _ => ("", None),
            };
            write!(out, "{family} {src} > {dst}: ICMP ")?;
            icmp_rest(out, name, icmp.type_u8(), echo, len)
        }
        (_, Some(TransportSlice::Icmpv6(icmp))) => {
            let (name, echo) = match icmp.icmp_type() {
                Icmpv6Type::DestinationUnreachable(_) => ("destination unreachable", None),
                Icmpv6Type::TimeExceeded(_) => ("time exceeded", None),
                Icmpv6Type::EchoRequest(echo) => ("echo request", Some(echo)),
                Icmpv6Type::EchoReply(echo) => ("echo reply", Some(echo)),
                Icmpv6Type::RouterSolicitation => ("router solicitation", None),
                Icmpv6Type::RouterAdvertisement(_) => ("router advertisement", None),
                Icmpv6Type::NeighborSolicitation => ("neighbor solicitation", None),
                Icmpv6Type::NeighborAdvertisement(_) => ("neighbor advertisement", None),
                _ => ("", None),
            };
            write!(out, "{family} {src} > {dst}: ICMP6, ")?;
            icmp_rest(out, name, icmp.type_u8(), echo, len)
        }
        (ip_number::SCTP, _) => match payload.payload.get(..4) {
            // etherparse has no SCTP header; its common header starts with
            // the source and destination ports, which is all a line shows.
            Some(ports) => write!(
                out,
                "{family} {src}.{} > {dst}.{}: sctp, length {len}",
                u16::from_be_bytes([ports[0], ports[1]]),
                u16::from_be_bytes([ports[2], ports[3]])
            ),
            None => write!(out, "{family} {src} > {dst}: [|sctp]"),
        },
        (ip_number::TCP, _) => write!(out, "{family} {src} > {dst}: [|tcp]"),
        (ip_number::UDP, _) => write!(out, "{family} {src} > {dst}: [|udp]"),
        (ip_number::ICMP | ip_number::IPV6_ICMP, _) => {
            write!(out, "{family} {src} > {dst}: [|icmp]")
        }
        (IpNumber(other), _) => write!(out, "{family} {src} > {dst}: ip-proto-{other} {len}"),
    }
}

/// `<name>[, id <id>, seq <seq>], length <len>`, or `type <n>` for a type
/// without a name here.
fn icmp_rest(
    out: &mut impl Write,
    name: &str,
    kind: u8,
    echo: Option<etherparse::IcmpEchoHeader>,
    len: usize,
) -> fmt::Result {
    if name.is_empty() {
        write!(out, "type {kind}")?;
    } else {
        out.write_str(name)?;
    }
    if let Some(echo) = echo {
        write!(out, ", id {}, seq {}", echo.id, echo.seq)?;
    }
    write!(out, ", length {len}")
}

/// A protocol address: dotted for IPv4 (4 bytes), else hex.
struct Addr<'a>(&'a [u8]);

impl Display for Addr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match <[u8; 4]>::try_from(self.0) {
            Ok(v4) => Ipv4Addr::from(v4).fmt(f),
            Err(_) => Hex(self.0).fmt(f),
        }
    }
}

/// Bytes as `aa:bb:cc`, as tcpdump shows hardware addresses.
struct Hex<'a>(&'a [u8]);

impl Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ":" };
            write!(f, "{sep}{byte:02x}")?;
        }
        Ok(())
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

    const IP: u16 = 0x0800;

    #[test]
    fn tcp_syn_ack_like_tcpdump() {
        let mut tcp = vec![0x1f, 0x90, 0xc3, 0x50];
        tcp.extend_from_slice(&100u32.to_be_bytes());
        tcp.extend_from_slice(&7u32.to_be_bytes());
        tcp.extend_from_slice(&[0x50, 0x12, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(
            line(&eth(IP, &ipv4(6, &tcp))),
            "IP 10.0.0.1.8080 > 10.0.0.2.50000: Flags [S.], seq 100, ack 7, win 65535, length 0"
        );
    }

    #[test]
    fn udp_icmp_arp_sctp_and_others() {
        let udp = [0, 53, 0x30, 0x39, 0, 12, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            line(&eth(IP, &ipv4(17, &udp))),
            "IP 10.0.0.1.53 > 10.0.0.2.12345: UDP, length 4"
        );
        let icmp = [8, 0, 0, 0, 0, 9, 0, 1, 0xaa, 0xbb];
        assert_eq!(
            line(&eth(IP, &ipv4(1, &icmp))),
            "IP 10.0.0.1 > 10.0.0.2: ICMP echo request, id 9, seq 1, length 10"
        );
        let redirect = [5, 1, 0, 0, 10, 0, 0, 9];
        assert_eq!(
            line(&eth(IP, &ipv4(1, &redirect))),
            "IP 10.0.0.1 > 10.0.0.2: ICMP type 5, length 8"
        );
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1];
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[10, 0, 0, 2]);
        assert_eq!(
            line(&eth(0x0806, &arp)),
            "ARP, Request who-has 10.0.0.2 tell 10.0.0.1, length 28"
        );
        arp[7] = 2;
        assert_eq!(
            line(&eth(0x0806, &arp)),
            "ARP, Reply 10.0.0.1 is-at 02:00:00:00:00:01, length 28"
        );
        let sctp = [0x0b, 0x59, 0x0b, 0x5a, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            line(&eth(IP, &ipv4(132, &sctp))),
            "IP 10.0.0.1.2905 > 10.0.0.2.2906: sctp, length 12"
        );
        assert_eq!(
            line(&eth(IP, &ipv4(47, &[0; 4]))),
            "IP 10.0.0.1 > 10.0.0.2: ip-proto-47 4"
        );
        assert_eq!(line(&eth(0x88cc, &[0; 10])), "ethertype 0x88cc, length 24");
    }

    #[test]
    fn vlan_tags_and_fragments() {
        let udp = [0, 53, 0x30, 0x39, 0, 12, 0, 0, 1, 2, 3, 4];
        let mut tagged = vec![0, 100, 0x81, 0x00, 0, 200, 0x08, 0x00];
        tagged.extend(ipv4(17, &udp));
        assert_eq!(
            line(&eth(0x88a8, &tagged)),
            "vlan 100, vlan 200, IP 10.0.0.1.53 > 10.0.0.2.12345: UDP, length 4"
        );
        // A later fragment: offset 185 * 8 bytes, no transport header.
        let mut later = ipv4(17, &[0; 16]);
        later[6..8].copy_from_slice(&185u16.to_be_bytes());
        assert_eq!(
            line(&eth(IP, &later)),
            "IP 10.0.0.1 > 10.0.0.2: ip-proto-17 (frag offset 1480), length 16"
        );
        // The first fragment (more fragments, offset 0) still shows its ports.
        let mut first = ipv4(17, &udp);
        first[6] = 0x20;
        assert_eq!(
            line(&eth(IP, &first)),
            "IP 10.0.0.1.53 > 10.0.0.2.12345: UDP, length 4"
        );
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let mut ip6 = vec![0x60, 0, 0, 0];
        // Hop-by-hop (8 bytes) then ICMPv6 echo request (8 bytes).
        ip6.extend_from_slice(&16u16.to_be_bytes());
        ip6.extend_from_slice(&[0, 64]);
        ip6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip6.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip6.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
        ip6.extend_from_slice(&[128, 0, 0, 0, 0, 7, 0, 3]);
        let frame = eth(0x86dd, &ip6);
        assert_eq!(
            line(&frame),
            "IP6 fd00::1 > fd00::2: ICMP6, echo request, id 7, seq 3, length 8"
        );
        assert_eq!(line(&frame[..14 + 44]), "IP6 fd00::1 > fd00::2: [|ip6]");
    }

    #[test]
    fn truncated_frames_say_where_they_end() {
        let frame = eth(IP, &ipv4(6, &[0x1f, 0x90, 0xc3, 0x50, 0, 0]));
        assert_eq!(line(&frame), "IP 10.0.0.1 > 10.0.0.2: [|tcp]");
        assert_eq!(line(&frame[..20]), "IP [|ip]");
        assert_eq!(line(&frame[..5]), "[|ether], length 5");
        assert_eq!(
            line(&eth(0x8100, &[0, 1])),
            "[|vlan], length 16",
            "a tag cut short"
        );
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&[0; 4]);
        assert_eq!(line(&eth(0x0806, &arp)), "ARP, [|arp], length 12");
    }
}
