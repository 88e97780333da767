//! Reading pcap and pcapng files back (with pcap-file), to compare what two
//! captures hold packet by packet, and the checks that tshark and tcpdump
//! read them.

use std::io::Read;
use std::path::{Path, PathBuf};

use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};

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

/// Reads a pcap (micro- or nanosecond) or pcapng file, compressed or not,
/// with pcap-file: a reader nobody here wrote, so that a mistake of our
/// writers is not mirrored by a mistake of the tests.
pub fn read(path: &Path) -> Vec<Packet> {
    let bytes = bytes(path);
    let what = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match bytes.get(..4) {
        Some([0x0a, 0x0d, 0x0d, 0x0a]) => {
            read_pcapng(&bytes).unwrap_or_else(|e| panic!("{}", what(&e)))
        }
        _ => read_pcap(&bytes).unwrap_or_else(|e| panic!("{}", what(&e))),
    }
}

fn nanos(t: std::time::Duration) -> u64 {
    u64::try_from(t.as_nanos()).expect("a timestamp before 2554")
}

fn read_pcap(bytes: &[u8]) -> Result<Vec<Packet>, pcap_file::pcap::PcapReadError> {
    let mut reader = pcap_file::pcap::PcapReader::new(bytes)?;
    let link_type = u32::from(reader.header().datalink) as u16;
    let mut packets = Vec::new();
    while let Some(packet) = reader.next_packet() {
        let packet = packet?;
        packets.push(Packet {
            orig_len: packet.orig_len(),
            data: packet.data().to_vec(),
            interface: String::new(),
            direction: 0,
            time_ns: nanos(packet.timestamp()),
            link_type,
        });
    }
    Ok(packets)
}

fn read_pcapng(bytes: &[u8]) -> Result<Vec<Packet>, pcap_file::pcapng::PcapNgReadError> {
    use pcap_file::pcapng::blocks::Block;
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
    let mut reader = pcap_file::pcapng::PcapNgReader::new(bytes)?;
    let mut packets = Vec::new();
    while let Some(block) = reader.next_block() {
        let (block, state) = block?;
        let Block::EnhancedPacket(epb) = block else {
            continue;
        };
        let iface = &state.interfaces()[epb.interface_id as usize];
        let interface = if_name(iface).unwrap_or_default().to_owned();
        // epb_flags: the low two bits are the direction.
        let direction = epb
            .options
            .iter()
            .find_map(|o| match o {
                EnhancedPacketOption::Flags(f) => Some((f & 3) as u8),
                _ => None,
            })
            .unwrap_or(0);
        packets.push(Packet {
            orig_len: epb.original_len,
            data: epb.data.to_vec(),
            interface,
            direction,
            time_ns: nanos(epb.timestamp),
            link_type: u32::from(iface.linktype) as u16,
        });
    }
    Ok(packets)
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

/// An interface block's name (`if_name`), when it has one.
pub fn if_name<'a>(idb: &'a InterfaceDescriptionBlock<'_>) -> Option<&'a str> {
    idb.options.iter().find_map(|o| match o {
        InterfaceDescriptionOption::IfName(name) => Some(name.as_ref()),
        _ => None,
    })
}
