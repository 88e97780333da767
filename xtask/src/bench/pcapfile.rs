//! Reading the capture files back: a streaming pcap reader (files reach
//! gigabytes), the unique sequence numbers of the generator's frames, and
//! the lengths of the TCP run's frames.

use std::fs::File;
use std::path::Path;

use anyhow::Context as _;

/// Calls `each(orig_len, data)` for every record of a pcap file (micro- or
/// nanosecond, either byte order) or of a pcapng file (a live reader's),
/// streamed with pcap-file; returns the file's snaplen (pcapng: its first
/// interface's).
pub fn for_each(path: &Path, mut each: impl FnMut(u32, &[u8])) -> anyhow::Result<u32> {
    use std::io::{Read as _, Seek as _};
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 4];
    let pcapng = file.read_exact(&mut magic).is_ok() && magic == [0x0a, 0x0d, 0x0d, 0x0a];
    file.rewind()?;
    let reading = || format!("reading {}", path.display());
    if pcapng {
        use pcap_file::pcapng::Block;
        let mut reader = pcap_file::pcapng::PcapNgReader::with_capacity(file, 1 << 20)
            .with_context(|| format!("{}: not a pcapng file", path.display()))?;
        let mut snaplen = None;
        while let Some(block) = reader.next_block() {
            match block.with_context(reading)?.0 {
                Block::InterfaceDescription(idb) => {
                    snaplen.get_or_insert(idb.snaplen);
                }
                Block::EnhancedPacket(epb) => each(epb.original_len, &epb.data),
                _ => {}
            }
        }
        return Ok(snaplen.unwrap_or(0));
    }
    let mut reader = pcap_file::pcap::PcapReader::with_capacity(file, 1 << 20)
        .with_context(|| format!("{}: not a pcap file", path.display()))?;
    let snaplen = reader.header().snaplen;
    while let Some(packet) = reader.next_packet() {
        let packet = packet.with_context(reading)?;
        each(packet.orig_len(), packet.data());
    }
    Ok(snaplen)
}

/// What a file holds of the generator's frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sequences {
    /// Records of the flow.
    pub records: u64,
    /// Distinct sequence numbers among them.
    pub unique: u64,
    /// Sequence numbers the generator never used (must be 0).
    pub out_of_range: u64,
}

/// Counts the distinct sequence numbers below `sent` in frames to `port`.
pub fn sequences(path: &Path, port: u16, sent: u64) -> anyhow::Result<Sequences> {
    let mut seen = vec![0u64; (sent as usize).div_ceil(64) + 1];
    let mut s = Sequences::default();
    for_each(path, |_, frame| {
        let Some(seq) = super::generator::sequence(frame, port) else {
            return;
        };
        s.records += 1;
        if seq >= sent {
            s.out_of_range += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if seen[word] & (1 << bit) == 0 {
            seen[word] |= 1 << bit;
            s.unique += 1;
        }
    })?;
    Ok(s)
}

/// The lengths of a TCP capture's frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lengths {
    pub frames: u64,
    /// Sum of the lengths on the wire.
    pub bytes: u64,
    /// Frames longer than the MTU plus the Ethernet header.
    pub super_frames: u64,
    pub max_len: u32,
    /// Frames whose captured length differs from the length on the wire.
    pub cut: u64,
}

pub fn lengths(path: &Path, mtu: u32) -> anyhow::Result<Lengths> {
    let mut l = Lengths::default();
    for_each(path, |orig, data| {
        l.frames += 1;
        l.bytes += u64::from(orig);
        if orig > mtu + 14 {
            l.super_frames += 1;
        }
        l.max_len = l.max_len.max(orig);
        if data.len() as u32 != orig {
            l.cut += 1;
        }
    })?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_sequence_numbers() {
        let flow = super::super::generator::Flow {
            iface: "x".into(),
            src_mac: [0; 6],
            dst_mac: [0; 6],
            src_ip: std::net::Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            dst_port: 7,
        };
        let template = super::super::generator::frame(&flow, 60, 0);
        let header = pcap_file::pcap::PcapHeader {
            ts_resolution: pcap_file::pcap::PcapTsResolution::NanoSecond,
            ..Default::default()
        };
        let mut writer = pcap_file::pcap::PcapWriter::with_header(Vec::new(), header).unwrap();
        for seq in [0u64, 1, 1, 5, 99] {
            let mut f = template.clone();
            f[42..50].copy_from_slice(&seq.to_be_bytes());
            let packet =
                pcap_file::pcap::PcapPacket::new(std::time::Duration::ZERO, 60, &f).unwrap();
            writer.write_packet(&packet).unwrap();
        }
        let file = writer.into_inner();
        let dir = std::env::temp_dir().join(format!("bench-seq-{}", std::process::id()));
        std::fs::write(&dir, &file).unwrap();
        let s = sequences(&dir, 7, 10).unwrap();
        let l = lengths(&dir, 1500).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!((s.records, s.unique, s.out_of_range), (5, 3, 1));
        assert_eq!((l.frames, l.bytes, l.cut, l.super_frames), (5, 300, 0, 0));
    }
}
