//! The kernel runs a capture's tcpdump filter exactly as libpcap does: each
//! expression, compiled by libpcap and translated to eBPF, is loaded into
//! this kernel and run on every frame of a corpus (`BPF_PROG_TEST_RUN`), and
//! its verdict must equal `pcap_offline_filter`'s on the same frame, for
//! Ethernet frames and for frames that start at the IP header, with loads
//! read directly, directly at constant offsets only, and through
//! `bpf_skb_load_bytes`; then the same for expressions drawn at random
//! (from a fixed seed) on the corpus damaged.

use packet_capture_agent::filter::ClassicInsn;
use packet_capture_agent::kernel_filter::{Access, Ending, load_program, translate};
use packet_capture_test_support::frames::*;
use packet_capture_test_support::privileged;

#[repr(C)]
struct BpfProgram {
    len: u32,
    insns: *const ClassicInsn,
}

#[repr(C)]
struct PktHdr {
    ts: libc::timeval,
    caplen: u32,
    len: u32,
}

unsafe extern "C" {
    fn pcap_offline_filter(prog: *const BpfProgram, hdr: *const PktHdr, pkt: *const u8) -> i32;
}

/// libpcap's verdict on a whole frame.
fn libpcap_accepts(insns: &[ClassicInsn], frame: &[u8]) -> bool {
    let prog = BpfProgram {
        len: insns.len() as u32,
        insns: insns.as_ptr(),
    };
    let hdr = PktHdr {
        ts: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        caplen: frame.len() as u32,
        len: frame.len() as u32,
    };
    // SAFETY: the program and frame outlive the call; libpcap bounds every
    // load by caplen.
    unsafe { pcap_offline_filter(&prog, &hdr, frame.as_ptr()) != 0 }
}

const V4_A: [u8; 4] = [10, 0, 0, 1];
const V4_B: [u8; 4] = [10, 0, 1, 2];
const V4_C: [u8; 4] = [192, 168, 7, 9];
const V6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const V6_MCAST: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2];

/// IP packets (what raw-IP interfaces carry), by name.
fn ip_packets() -> Vec<(String, Vec<u8>)> {
    let payload: Vec<u8> = (0..200u16).map(|i| i as u8).collect();
    let flood = vec![0x5au8; 1442 - 14 - 20 - 8];
    let big = vec![0x33u8; 2100];
    let packets = vec![
        (
            "v4 tcp syn",
            ipv4(TCP, V4_A, V4_B, &tcp(40000, 80, SYN, &[])),
        ),
        (
            "v4 tcp syn-ack",
            ipv4(TCP, V4_B, V4_A, &tcp(80, 40000, SYN | ACK, &[])),
        ),
        (
            "v4 tcp psh data",
            ipv4(TCP, V4_A, V4_B, &tcp(40000, 443, PSH | ACK, &payload)),
        ),
        (
            "v4 tcp fin",
            ipv4(TCP, V4_A, V4_C, &tcp(22, 5000, FIN | ACK, &[])),
        ),
        (
            "v4 tcp rst",
            ipv4(TCP, V4_C, V4_A, &tcp(8080, 1023, RST, &[])),
        ),
        (
            "v4 udp dns",
            ipv4(UDP, V4_A, V4_C, &udp(5353, 53, &payload[..40])),
        ),
        (
            "v4 udp flood 1442",
            ipv4(UDP, V4_A, V4_B, &udp(9, 9, &flood)),
        ),
        ("v4 udp big", ipv4(UDP, V4_B, V4_A, &udp(4789, 6081, &big))),
        ("v4 icmp echo", ipv4(ICMP, V4_A, V4_B, &icmp(8, 0))),
        ("v4 icmp unreachable", ipv4(ICMP, V4_B, V4_A, &icmp(3, 1))),
        ("v4 sctp", ipv4(SCTP, V4_A, V4_B, &sctp(80, 9999))),
        (
            "v4 first fragment",
            ipv4_with(UDP, V4_A, V4_B, 0x2000, &[], &udp(1000, 53, &payload)),
        ),
        (
            "v4 later fragment",
            ipv4_with(UDP, V4_A, V4_B, 0x0010, &[], &payload[..64]),
        ),
        (
            "v4 options",
            ipv4_with(TCP, V4_A, V4_B, 0, &[1, 1, 1, 0], &tcp(1234, 80, SYN, &[])),
        ),
        (
            "v4 broadcast udp",
            ipv4(UDP, V4_A, [255; 4], &udp(68, 67, &payload[..30])),
        ),
        (
            "v4 multicast",
            ipv4(UDP, V4_A, [224, 0, 0, 251], &udp(5353, 5353, &[])),
        ),
        (
            "v6 tcp syn",
            ipv6(TCP, V6_A, V6_B, &tcp(40000, 80, SYN, &[])),
        ),
        (
            "v6 tcp data",
            ipv6(TCP, V6_B, V6_A, &tcp(443, 40001, ACK | PSH, &payload)),
        ),
        (
            "v6 udp",
            ipv6(UDP, V6_A, V6_B, &udp(53, 33333, &payload[..50])),
        ),
        ("v6 icmp6 echo", ipv6(ICMP6, V6_A, V6_B, &icmp(128, 0))),
        (
            "v6 neighbour solicitation",
            ipv6(ICMP6, V6_A, V6_MCAST, &icmp(135, 0)),
        ),
        (
            "v6 hop-by-hop then tcp",
            ipv6(0, V6_A, V6_B, &ext6(TCP, &tcp(1000, 80, SYN, &[]))),
        ),
        (
            "v6 routing and dstopts then udp",
            ipv6(
                43,
                V6_A,
                V6_B,
                &ext6(60, &ext6(UDP, &udp(7, 53, &[1, 2, 3]))),
            ),
        ),
        (
            "v6 first fragment",
            ipv6(
                44,
                V6_A,
                V6_B,
                &frag6(UDP, 0, true, &udp(999, 53, &payload)),
            ),
        ),
        (
            "v6 later fragment",
            ipv6(44, V6_A, V6_B, &frag6(UDP, 100, false, &payload[..40])),
        ),
        ("v6 sctp", ipv6(SCTP, V6_B, V6_A, &sctp(80, 9999))),
    ];
    packets
        .into_iter()
        .map(|(name, p)| (name.to_owned(), p))
        .collect()
}

/// Ethernet frames, by name: each IP packet plain, VLAN-tagged and
/// double-tagged, ARP, other EtherTypes, and frames cut short.
fn ethernet_frames(packets: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut frames = Vec::new();
    for (name, p) in packets {
        let ethertype = if p[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
        frames.push((name.clone(), ethernet(MAC_B, ethertype, p)));
        if name.contains("tcp") || name.contains("udp dns") || name.contains("icmp6") {
            frames.push((
                format!("802.1Q 100 {name}"),
                tagged(&[(0x8100, 100)], ethertype, p),
            ));
            frames.push((
                format!("802.1ad 7 / 802.1Q 200 {name}"),
                tagged(&[(0x88a8, 7), (0x8100, 200)], ethertype, p),
            ));
        }
    }
    let whole = frames.clone();
    for (name, frame) in whole.iter().step_by(2) {
        // The kernel's test run refuses an untagged IP frame cut inside
        // its IP header (the TC hooks never see one: the device drops it).
        let shortest = match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => 34,
            0x86dd => 54,
            _ => 15,
        };
        for cut in [15, 20, 30, 38, 42, 50, 58, 66] {
            if cut >= shortest && cut < frame.len() {
                frames.push((format!("{name} cut to {cut}"), frame[..cut].to_vec()));
            }
        }
    }
    frames.push((
        "arp request".into(),
        ethernet([0xff; 6], 0x0806, &arp(1, V4_A, V4_B)),
    ));
    frames.push((
        "arp reply".into(),
        ethernet(MAC_A, 0x0806, &arp(2, V4_B, V4_A)),
    ));
    frames.push((
        "802.1Q arp".into(),
        tagged(&[(0x8100, 100)], 0x0806, &arp(1, V4_C, V4_A)),
    ));
    frames.push((
        "lldp".into(),
        ethernet([0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc, &[0; 46]),
    ));
    frames.push(("ethernet only".into(), ethernet(MAC_B, 0x0800, &[])));
    frames
}

/// The protocol primitives both the chosen and the random expressions
/// start from.
const PROTOCOLS: [&str; 10] = [
    "tcp", "udp", "icmp", "icmp6", "ip", "ip6", "arp", "sctp", "vlan", "vlan 100",
];

/// Expressions chosen for what they exercise, then combinations of
/// primitives with `not`, `and` and `or`.
fn expressions() -> Vec<String> {
    let hand_picked = [
        "vlan 200",
        "vlan and tcp",
        "vlan 100 and tcp port 80",
        "vlan and vlan 200 and ip",
        "vlan and vlan and udp port 53",
        "ether proto 0x0800",
        "ether proto 0x86dd",
        "ether proto 0x88cc",
        "ether host 02:00:00:00:00:0a",
        "ether dst 02:00:00:00:00:0b",
        "ether broadcast",
        "ether multicast",
        "ether[0] & 1 != 0",
        "ip broadcast",
        "ip multicast",
        "ip6 multicast",
        "host 10.0.0.1",
        "src host 10.0.0.1",
        "dst host 10.0.1.2",
        "host fd00::1",
        "dst host fd00::2",
        "net 10.0.0.0/16",
        "net 10.0.0.0/24",
        "src net 192.168.0.0/16",
        "dst net 10.0.1.0/24",
        "net fd00::/64",
        "net fd00::/127",
        "port 80",
        "src port 40000",
        "dst port 53",
        "tcp port 443",
        "udp port 53",
        "portrange 1-1023",
        "tcp portrange 8000-8100",
        "udp dst portrange 50-60",
        "sctp port 80",
        "greater 1000",
        "less 100",
        "greater 2000",
        "udp and greater 2000",
        "len >= 1442",
        "len == 60",
        "tcp[13] & 2 != 0",
        "tcp[13] == 0x12",
        "tcp[tcpflags] & tcp-syn != 0",
        "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0",
        "tcp[tcpflags] & tcp-rst != 0",
        "tcp[tcpflags] == tcp-syn",
        "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)",
        "tcp[12] >> 4 > 5",
        "tcp[0:2] == 80 or tcp[2:2] == 80",
        "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x00010203",
        "ip[6:2] & 0x1fff != 0",
        "ip[6] & 0x20 != 0",
        "ip[0] & 0xf != 5",
        "ip[8] == 64",
        "ip[2:2] > 500",
        "ip[9] == 17",
        "ip6[6] == 58",
        "ip6[40] == 128",
        "icmp[icmptype] == icmp-echo",
        "icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply",
        "icmp6[icmp6type] == icmp6-neighborsolicit",
        "icmp6 and ip6[40] == 135",
        "udp[8:2] == 0x0001",
        "udp[4:2] > 100",
        "ip proto 17",
        "ip6 proto 58",
        "ip protochain 6",
        "ip6 protochain 6",
        "ip6 protochain 17",
        "proto 132",
        "ip and not tcp",
        "not ip and not ip6",
        "not arp",
        "tcp and (port 80 or port 443) and not icmp",
        "(tcp or udp) and not port 22",
        "host 10.0.0.1 and (tcp[tcpflags] & tcp-syn != 0)",
        "(src net 10.0.0.0/8 and dst port 80) or (ip6 and udp)",
        "not (host 10.0.0.1 or host fd00::1)",
        "arp or (icmp and not vlan)",
        "ether[12:2] == 0x0800 and ip[9] == 6",
        "ip[0] << ip[1] != 0",
        "tcp[0] >> tcp[1] == 0",
        "ip[2:2] / 2 > 100",
        "ip[2:2] % 7 == 3",
        "ip[2:2] - 20 > 28",
        "ip[2:2] * 3 > 1000",
        "ip[8] ^ 0xff == 191",
        "ip[1] | 3 == 3",
        "ether[len - 1] == 0x33",
        // Past a load instruction's 16-bit signed offset.
        "udp or ether[40000] == 0",
        "tcp or ip6[65000:2] != 1",
        "ip[2:2] / ip[1] > 0",
    ];
    let primitives = [
        "tcp",
        "udp",
        "icmp",
        "ip6",
        "arp",
        "vlan",
        "port 80",
        "port 53",
        "host 10.0.0.1",
        "host fd00::2",
        "net 10.0.0.0/16",
        "greater 500",
        "less 80",
        "tcp[tcpflags] & tcp-syn != 0",
        "ip[6:2] & 0x3fff != 0",
        "portrange 1000-50000",
        "ether broadcast",
        "icmp6",
    ];
    let mut all: Vec<String> = std::iter::once("")
        .chain(PROTOCOLS)
        .chain(hand_picked)
        .map(String::from)
        .collect();
    for p in primitives {
        all.push(format!("not {p}"));
    }
    for (i, a) in primitives.iter().enumerate() {
        for b in &primitives[i + 1..] {
            all.push(format!("{a} and {b}"));
            all.push(format!("{a} or not {b}"));
        }
    }
    for (i, a) in primitives.iter().enumerate().step_by(3) {
        let b = primitives[(i + 5) % primitives.len()];
        let c = primitives[(i + 11) % primitives.len()];
        all.push(format!("({a} or {b}) and not {c}"));
        all.push(format!("not ({a} and {b}) or {c}"));
    }
    all
}

/// What running `expressions` on the corpus found.
#[derive(Default)]
struct Comparison {
    compiled: usize,
    raw_ip_compiled: usize,
    compared: usize,
    mismatches: Vec<String>,
    /// (expression, libpcap's verdict) for every verdict seen.
    verdicts: std::collections::HashSet<(String, bool)>,
    untranslatable: std::collections::BTreeSet<String>,
}

impl Comparison {
    /// Each expression libpcap compiles, for Ethernet `frames` and raw-IP
    /// `packets`, in each access translation, run by the kernel and by
    /// libpcap on every frame.
    fn run(
        expressions: &[String],
        frames: &[(String, Vec<u8>)],
        packets: &[(String, Vec<u8>)],
    ) -> Self {
        let mut c = Comparison::default();
        for expression in expressions {
            let ethernet = match packet_capture_agent::filter::Filter::compile(expression) {
                Ok(filter) => filter,
                // Combinations such as `tcp and udp`, which the agent refuses.
                Err(e) if e.to_string().contains("rejects all packets") => continue,
                Err(e) => panic!("{expression:?}: {e}"),
            };
            c.compiled += 1;
            for (link, corpus) in [(0u8, frames), (1u8, packets)] {
                let Ok(classic) = ethernet.classic(link) else {
                    continue;
                };
                c.raw_ip_compiled += usize::from(link == 1);
                for access in [Access::Direct, Access::ConstantOffsets, Access::Helper] {
                    let insns = match translate(classic, Ending::Return, access) {
                        Ok(insns) => insns,
                        Err(e) => {
                            c.untranslatable.insert(format!("{expression:?}: {e}"));
                            continue;
                        }
                    };
                    let program = load_program(&insns, "filter_test")
                        .unwrap_or_else(|e| panic!("{expression:?} ({access:?}): {e}"));
                    for (name, frame) in corpus {
                        let kernel = program.test_run(frame).unwrap_or_else(|e| {
                            panic!("BPF_PROG_TEST_RUN on {name} ({} bytes): {e}", frame.len())
                        }) != 0;
                        let libpcap = libpcap_accepts(classic, frame);
                        c.compared += 1;
                        c.verdicts.insert((expression.clone(), libpcap));
                        if kernel != libpcap {
                            c.mismatches.push(format!(
                                "{expression:?} on {name} (link {link}, {access:?}): kernel {kernel}, libpcap {libpcap}"
                            ));
                        }
                    }
                }
            }
        }
        c
    }

    /// Says in the test's output what was compared.
    fn report(&self, expressions: &str, frames: &str, frame_count: usize, packet_count: usize) {
        eprintln!(
            "{} {expressions} ({} also for raw IP), {frame_count} {frames}, {packet_count} IP packets: {} verdicts compared",
            self.compiled, self.raw_ip_compiled, self.compared
        );
    }

    /// Fails on any verdict that differs, and on any expression the kernel
    /// cannot run but libpcap's `protochain` loops.
    fn assert_agreed(&self) {
        let unexpected: Vec<&String> = self
            .untranslatable
            .iter()
            .filter(|e| !e.contains("protochain"))
            .collect();
        assert!(
            unexpected.is_empty(),
            "no kernel translation: {unexpected:#?}"
        );
        assert!(
            self.mismatches.is_empty(),
            "{} verdicts differ:\n{}",
            self.mismatches.len(),
            self.mismatches
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// How many expressions both accepted and rejected a frame.
    fn both_ways(&self, expressions: &[String]) -> usize {
        expressions
            .iter()
            .filter(|e| {
                self.verdicts.contains(&((*e).clone(), true))
                    && self.verdicts.contains(&((*e).clone(), false))
            })
            .count()
    }
}

/// The kernel's test run needs more than an Ethernet header.
fn runnable(corpus: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    corpus.into_iter().filter(|(_, f)| f.len() > 14).collect()
}

#[test]
fn kernel_verdicts_equal_libpcaps() {
    if !privileged("kernel_verdicts_equal_libpcaps") {
        return;
    }
    let packets = ip_packets();
    let frames = runnable(ethernet_frames(&packets));
    let packets = runnable(packets);
    let expressions = expressions();
    assert!(
        expressions.len() >= 300,
        "{} expressions",
        expressions.len()
    );
    let c = Comparison::run(&expressions, &frames, &packets);
    assert!(c.compiled >= 300, "{} expressions compiled", c.compiled);
    c.report(
        "expressions",
        "Ethernet frames",
        frames.len(),
        packets.len(),
    );
    c.assert_agreed();
    assert!(!c.untranslatable.is_empty(), "protochain jumps back");
    // The corpus must make most expressions both accept and reject
    // something, or the comparison proves little.
    let both = c.both_ways(&expressions);
    assert!(
        both * 10 >= c.compiled * 8,
        "only {both} of {} expressions both accept and reject a frame of the corpus",
        c.compiled
    );
}

/// An arithmetic expression of packet bytes, `len` and constants, as deep
/// as `depth` allows: divisions by zero, shifts by 32 or more, loads past
/// the end and at offsets a load instruction cannot hold.
fn random_value(n: &mut Seeded, depth: u32) -> String {
    let constants = [
        "0",
        "1",
        "2",
        "5",
        "31",
        "32",
        "33",
        "255",
        "256",
        "0xffff",
        "0xffffffff",
        "1442",
    ];
    let offsets = [
        "0", "1", "2", "6", "8", "9", "12", "13", "14", "20", "40", "54", "1500", "2100", "40000",
        "65535",
    ];
    match n.below(if depth >= 2 { 3 } else { 5 }) {
        0 => n.pick(&constants).to_string(),
        1 => "len".to_string(),
        2 => format!(
            "{}[{}:{}]",
            n.pick(&["ether", "ip", "ip6", "tcp", "udp", "icmp", "icmp6"]),
            n.pick(&offsets),
            n.pick(&["1", "2", "4"])
        ),
        3 => format!(
            "{}[{}]",
            n.pick(&["ether", "ip", "tcp", "udp"]),
            random_value(n, depth + 1)
        ),
        _ => format!(
            "({} {} {})",
            random_value(n, depth + 1),
            n.pick(&["+", "-", "*", "/", "%", "&", "|", "^", "<<", ">>"]),
            random_value(n, depth + 1)
        ),
    }
}

/// A filter of primitives and comparisons joined by `not`, `and`, `or`.
fn random_expression(n: &mut Seeded, depth: u32) -> String {
    let others = [
        "mpls",
        "pppoes",
        "ip proto 17",
        "port 80",
        "port 53",
        "src port 40000",
        "dst portrange 50-600",
        "host 10.0.0.1",
        "dst host 192.168.7.9",
        "host fd00::1",
        "net 10.0.0.0/8",
        "net fd00::/64",
        "ether host 02:00:00:00:00:0a",
        "ether broadcast",
        "ip multicast",
        "ip6 multicast",
        "greater 100",
        "less 60",
        "greater 1442",
        "llc",
        "stp",
        "tcp[tcpflags] & tcp-syn != 0",
        "icmp[icmptype] == icmp-echo",
        "ip[6:2] & 0x1fff != 0",
        "ip6[6] == 44",
        "arp net 10.0.0.0/24",
    ];
    let primitives: Vec<&str> = PROTOCOLS.into_iter().chain(others).collect();
    match n.below(if depth >= 2 { 2 } else { 5 }) {
        0 => n.pick(&primitives).to_string(),
        1 => format!(
            "{} {} {}",
            random_value(n, 0),
            n.pick(&["==", "!=", ">", "<", ">=", "<="]),
            random_value(n, 0)
        ),
        2 => format!("not {}", random_expression(n, depth + 1)),
        op => format!(
            "({} {} {})",
            random_expression(n, depth + 1),
            if op == 3 { "and" } else { "or" },
            random_expression(n, depth + 1)
        ),
    }
}

/// The corpus with bytes of each frame's headers changed, and cut short,
/// as far as the kernel's test run takes such frames.
fn damaged(corpus: &[(String, Vec<u8>)], n: &mut Seeded) -> Vec<(String, Vec<u8>)> {
    let everything = packet_capture_agent::filter::Filter::compile("").unwrap();
    let accepts_all = translate(
        everything.classic(0).unwrap(),
        Ending::Return,
        Access::Helper,
    );
    let accepts_all = load_program(&accepts_all.unwrap(), "filter_probe").unwrap();
    let mut out = Vec::new();
    for (name, frame) in corpus {
        for i in 0..4 {
            let mut f = frame.clone();
            for _ in 0..=n.below(4) {
                let at = n.below(f.len().min(80));
                f[at] = n.below(256) as u8;
            }
            if i % 2 == 1 {
                f.truncate(15 + n.below(f.len() - 14));
            }
            if accepts_all.test_run(&f).is_ok() {
                out.push((format!("{name}, damaged {i}"), f));
            }
        }
    }
    out
}

#[test]
fn random_filters_on_damaged_frames_agree_too() {
    if !privileged("random_filters_on_damaged_frames_agree_too") {
        return;
    }
    let mut n = Seeded(0x9e37_79b9_7f4a_7c15);
    let packets = runnable(ip_packets());
    let frames = runnable(ethernet_frames(&packets));
    let frames = damaged(&frames, &mut n);
    let packets = damaged(&packets, &mut n);
    // Those libpcap compiles (it refuses a constant shift by 32 or more,
    // and the agent those that reject every packet).
    let expressions: Vec<String> = std::iter::repeat_with(|| random_expression(&mut n, 0))
        .filter(|e| packet_capture_agent::filter::Filter::compile(e).is_ok())
        .take(500)
        .collect();
    let c = Comparison::run(&expressions, &frames, &packets);
    c.report(
        "random expressions compiled",
        "damaged Ethernet frames",
        frames.len(),
        packets.len(),
    );
    c.assert_agreed();
    let both = c.both_ways(&expressions);
    assert!(
        both * 2 >= c.compiled,
        "only {both} of {} expressions both accept and reject a frame",
        c.compiled
    );
}
