//! Minimal readers for pcap and pcapng files, to compare what two captures
//! hold packet by packet.

use std::io::Read;
use std::path::{Path, PathBuf};

/// One packet of a capture file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Packet {
    /// Length on the wire.
    pub orig_len: u32,
    /// The bytes kept.
    pub data: Vec<u8>,
    /// pcapng: the interface's name; pcap: empty.
    pub interface: String,
    /// pcapng: 1 inbound, 2 outbound, 0 unknown; pcap: 0.
    pub direction: u8,
    /// Nanoseconds since the epoch.
    pub time_ns: u64,
    /// pcap: the file's link type; pcapng: the interface's.
    pub link_type: u16,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The file a capture wrote, wherever it is now: the agent compresses
/// completed files (`.gz` or `.zst` appended) once a newer one exists, and
/// the compressed copy appears before the plain one goes.
pub fn locate(path: &Path) -> PathBuf {
    for suffix in ["", ".gz", ".zst"] {
        let mut candidate = path.as_os_str().to_owned();
        candidate.push(suffix);
        let candidate = PathBuf::from(candidate);
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("no capture file {} (plain or compressed)", path.display());
}

/// The bytes of a capture file, decompressed.
pub fn bytes(path: &Path) -> Vec<u8> {
    let path = locate(path);
    let file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut bytes = Vec::new();
    let read = match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => flate2::read::GzDecoder::new(file).read_to_end(&mut bytes),
        Some("zst") => zstd::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut bytes)),
        _ => (&file).read_to_end(&mut bytes),
    };
    read.unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes
}

/// Reads a little-endian pcap (micro- or nanosecond) or pcapng file,
/// compressed or not.
pub fn read(path: &Path) -> Vec<Packet> {
    let bytes = bytes(path);
    assert!(
        bytes.len() >= 24,
        "{} is too short for a capture file",
        path.display()
    );
    match u32_at(&bytes, 0) {
        0xa1b2_c3d4 => read_pcap(&bytes, 1_000),
        0xa1b2_3c4d => read_pcap(&bytes, 1),
        0x0a0d_0d0a => read_pcapng(&bytes),
        magic => panic!("{}: unknown magic {magic:#x}", path.display()),
    }
}

fn read_pcap(b: &[u8], ns_per_unit: u64) -> Vec<Packet> {
    let link_type = u32_at(b, 20) as u16;
    let mut at = 24;
    let mut packets = Vec::new();
    while at + 16 <= b.len() {
        let secs = u64::from(u32_at(b, at));
        let frac = u64::from(u32_at(b, at + 4));
        let cap = u32_at(b, at + 8) as usize;
        let orig_len = u32_at(b, at + 12);
        let data = b[at + 16..at + 16 + cap].to_vec();
        packets.push(Packet {
            orig_len,
            data,
            interface: String::new(),
            direction: 0,
            time_ns: secs * 1_000_000_000 + frac * ns_per_unit,
            link_type,
        });
        at += 16 + cap;
    }
    assert_eq!(at, b.len(), "trailing bytes in a pcap file");
    packets
}

fn read_pcapng(b: &[u8]) -> Vec<Packet> {
    let mut interfaces: Vec<(String, u16)> = Vec::new();
    let mut packets = Vec::new();
    let mut at = 0;
    while at + 12 <= b.len() {
        let kind = u32_at(b, at);
        let len = u32_at(b, at + 4) as usize;
        assert_eq!(
            u32_at(b, at + len - 4) as usize,
            len,
            "block length mismatch at {at}"
        );
        let body = &b[at + 8..at + len - 4];
        match kind {
            1 => {
                let link_type = u16_at(body, 0);
                let name = option(body, 8, 2)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                interfaces.push((name, link_type));
            }
            6 => {
                let iface = u32_at(body, 0) as usize;
                let time_ns = (u64::from(u32_at(body, 4)) << 32) | u64::from(u32_at(body, 8));
                let cap = u32_at(body, 12) as usize;
                let orig_len = u32_at(body, 16);
                let data = body[20..20 + cap].to_vec();
                let direction = option(body, 20 + cap.div_ceil(4) * 4, 2)
                    .map_or(0, |v| (u32_at(v, 0) & 3) as u8);
                let (interface, link_type) = interfaces[iface].clone();
                packets.push(Packet {
                    orig_len,
                    data,
                    interface,
                    direction,
                    time_ns,
                    link_type,
                });
            }
            _ => {}
        }
        at += len;
    }
    assert_eq!(at, b.len(), "trailing bytes in a pcapng file");
    packets
}

/// The value of option `code` among a block body's options from `at` on
/// (pcapng: code and length, 16 bits each, the value padded to 32 bits).
fn option(body: &[u8], mut at: usize, code: u16) -> Option<&[u8]> {
    while at + 4 <= body.len() {
        let this = u16_at(body, at);
        let len = usize::from(u16_at(body, at + 2));
        if this == 0 {
            break;
        }
        if this == code {
            return Some(&body[at + 4..at + 4 + len]);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

/// Checks that tshark reads the file without a complaint and returns how
/// many packets it counted. The bytes go through a pipe, so the agent may
/// compress the file meanwhile.
pub fn tshark_count(path: &Path) -> usize {
    // tshark warns about running as root; anything else is about the file.
    count_read_by(
        "tshark",
        &["-n", "-r", "-", "-T", "fields", "-e", "frame.number"],
        |l| l.contains("could be dangerous"),
        path,
    )
}

/// Checks that `tcpdump -r` reads a pcap file without a complaint and
/// returns how many packets it printed (through a pipe, as for tshark).
pub fn tcpdump_count(path: &Path) -> usize {
    // tcpdump names the file it reads on stderr; anything else is a problem.
    count_read_by(
        "tcpdump",
        &["-n", "-r", "-"],
        |l| l.starts_with("reading from file"),
        path,
    )
}

/// Feeds the file to `tool args` and returns how many lines it printed,
/// failing if it exits with an error or says anything on stderr besides
/// what `expected` accepts.
fn count_read_by(tool: &str, args: &[&str], expected: fn(&str) -> bool, path: &Path) -> usize {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let bytes = bytes(path);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {tool}: {e}"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(&bytes)
        .unwrap_or_else(|e| panic!("feeding {tool}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {tool}: {e}"));
    let complaints: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap_or("(not UTF-8)")
        .lines()
        .filter(|l| !expected(l))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "{tool} could not read {}: {}",
        path.display(),
        complaints.join("\n")
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}
