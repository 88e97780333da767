//! Turning packets into bytes: pcap and pcapng files framed by pcap-file,
//! text lines from etherparse's decoding.
//!
//! An [`Encoder`] appends whole records to a buffer; the caller decides when
//! the buffer reaches the file, so the file only ever holds whole records.
//!
//! pcap-file's `PcapWriter` and `PcapNgWriter` own the `Write` they write
//! to, while a capture appends each record to the output buffer it is handed
//! (and takes the record back if it would pass the file size limit). So the
//! encoder uses the pieces those writers are made of: pcap-file writes the
//! pcap file header, and the pcapng section header and interface blocks
//! through the [`PcapNgState`] a `PcapNgWriter` keeps (byte order, each
//! interface's name and timestamp resolution); it also finds the whole
//! records of a file cut short ([`pcap_whole_prefix`]). The record written
//! for every packet ([`pcap_record`], [`enhanced_packet`]) is written here:
//! pcap-file's encoders for it made the writers 13-30 % (pcap) and five
//! times (pcapng) slower, measured in docs/capture.md, "Writer throughput".

mod text;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use byteorder::LittleEndian;
use packet_capture_common::crd::OutputFormat;
use packet_capture_common::pcapng;
use pcap_file::pcap::{PcapHeader, PcapParser, PcapTsResolution};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption, InterfaceTsResolution,
};
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::{Block, PcapNgBlock, PcapNgParser, PcapNgState};
use pcap_file::{DataLink, Endianness};

pub use text::describe;

/// Direction of a packet relative to its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// What is known of a packet besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    pub ifindex: u32,
    pub direction: Direction,
    /// Length on the wire; the bytes given may be fewer (snaplen).
    pub orig_len: u32,
}

/// Interface names by index, for pcapng interface blocks and text lines.
pub trait InterfaceNames {
    fn name(&self, ifindex: u32) -> &str;
}

impl InterfaceNames for HashMap<u32, String> {
    fn name(&self, ifindex: u32) -> &str {
        self.get(&ifindex).map_or("?", String::as_str)
    }
}

/// A packet the format cannot hold: a time past 2106, which pcap's 32-bit
/// seconds cannot; nothing of it was written. (No payload, so that the
/// per-packet `Result` stays one byte.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("packet not written: pcap cannot hold a time past 2106")]
pub struct Unencodable;

/// Where a pcapng file comes from, as the file says it: in the section
/// header's comment and in each interface's description.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The node the interfaces are on.
    pub node: String,
    /// What the capture is (its name, its filter, the agent's version).
    pub comment: String,
    /// Who an interface belongs to (a target pod), if anyone.
    pub owners: Option<std::sync::Arc<dyn InterfaceOwners>>,
}

/// Says whose an interface is, for its description: `pod <ns>/<name>` for
/// the host end of a target pod's veth. Asked once per interface and file.
pub trait InterfaceOwners: Send + Sync + std::fmt::Debug {
    fn owner(&self, ifindex: u32) -> Option<String>;
}

/// Encodes packets in one output format.
pub struct Encoder {
    format: OutputFormat,
    snaplen: u32,
    origin: Origin,
    pcapng: Pcapng,
    /// Packets lost just before the next one, which says so (pcapng's
    /// `epb_dropcount`); only live streams lose packets this way.
    lost: u64,
    /// The next packet's number (pcapng's `epb_packetid`): live streams
    /// number their packets.
    number: Option<u64>,
}

/// What a pcapng file needs carried from block to block.
struct Pcapng {
    /// What pcap-file encodes each block with: the section's byte order and
    /// each interface's timestamp resolution.
    state: PcapNgState,
    /// Interface index -> interface block id in this file.
    ids: HashMap<u32, u32>,
}

/// pcap-file encodes the headers into a `Vec`, whose writes cannot fail,
/// from values it accepts (fixed ones, interface names far shorter than an
/// option's 64 KiB, and the comment cut to fit one), which it checks before
/// it writes anything.
const VEC_WRITES: &str = "writing to a Vec cannot fail";

/// Most bytes a pcapng option's value holds.
const MAX_OPTION_BYTES: usize = u16::MAX as usize;

/// Cuts `text` to what one pcapng option holds, at a character boundary,
/// and marks the cut.
fn fit_option(text: &mut String) {
    const CUT: &str = " …";
    if text.len() <= MAX_OPTION_BYTES {
        return;
    }
    let mut end = MAX_OPTION_BYTES - CUT.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(CUT);
}

impl Encoder {
    pub fn new(format: OutputFormat, snaplen: u32) -> Self {
        Self {
            format,
            snaplen,
            origin: Origin::default(),
            // Empty, and allocating nothing until a pcapng file starts.
            pcapng: Pcapng {
                state: PcapNgState::default(),
                ids: HashMap::new(),
            },
            lost: 0,
            number: None,
        }
    }

    /// `n` packets were lost before the next one: pcapng records it in the
    /// next packet's block.
    pub fn lost(&mut self, n: u64) {
        self.lost += n;
    }

    /// The next packet's number, which pcapng records in its block.
    pub fn number(&mut self, number: u64) {
        self.number = Some(number);
    }

    /// Names the capture in what a pcapng file says of itself. A comment
    /// longer than a pcapng option (the longest selections) is cut.
    pub fn with_origin(self, mut origin: Origin) -> Self {
        fit_option(&mut origin.comment);
        Self { origin, ..self }
    }

    /// The bytes a file starts with.
    pub fn file_header(&mut self, out: &mut Vec<u8>) {
        match self.format {
            OutputFormat::Pcap => {
                let header = PcapHeader {
                    version_major: 2,
                    version_minor: 4,
                    ts_correction: 0,
                    ts_accuracy: 0,
                    snaplen: self.snaplen,
                    datalink: DataLink::ETHERNET,
                    // What pcap_record writes in.
                    ts_resolution: PcapTsResolution::NanoSecond,
                    endianness: Endianness::Little,
                };
                header.write_to(out).expect(VEC_WRITES);
            }
            OutputFormat::Pcapng => {
                let section = SectionHeaderBlock {
                    // What enhanced_packet writes in.
                    endianness: Endianness::Little,
                    major_version: 1,
                    minor_version: 0,
                    // Unknown: the file is written as packets come.
                    section_length: -1,
                    options: [
                        Some(SectionHeaderOption::UserApplication(Cow::Borrowed(
                            concat!("packet-capture ", env!("CARGO_PKG_VERSION")),
                        ))),
                        (!self.origin.comment.is_empty()).then(|| {
                            SectionHeaderOption::Common(CommonOption::Comment(Cow::Borrowed(
                                &self.origin.comment,
                            )))
                        }),
                    ]
                    .into_iter()
                    .flatten()
                    .collect(),
                }
                .into_block();
                self.pcapng.write(out, &section).expect(VEC_WRITES);
                self.pcapng.ids.clear();
            }
            OutputFormat::Text | OutputFormat::Stdout | OutputFormat::Stream => {}
        }
    }

    /// Appends one packet's record; on an error nothing was appended.
    pub fn encode(
        &mut self,
        out: &mut Vec<u8>,
        meta: &Meta,
        data: &[u8],
        names: &impl InterfaceNames,
    ) -> Result<(), Unencodable> {
        match self.format {
            OutputFormat::Pcap => return pcap_record(out, meta, data),
            OutputFormat::Pcapng => {
                let id = match self.pcapng.ids.get(&meta.ifindex) {
                    Some(&id) => id,
                    None => self.pcapng.add_interface(
                        out,
                        meta.ifindex,
                        names,
                        self.snaplen,
                        &self.origin,
                    ),
                };
                let (lost, number) = (std::mem::take(&mut self.lost), self.number.take());
                enhanced_packet(out, id, meta, data, lost, number);
            }
            OutputFormat::Text => text_line(out, meta, data, names),
            OutputFormat::Stdout => {
                out.extend_from_slice(b"PACKET: ");
                text_line(out, meta, data, names);
            }
            // Nothing is written: the live readers get the packet itself.
            OutputFormat::Stream => {}
        }
        Ok(())
    }
}

impl Pcapng {
    /// Encodes `block` after the blocks before it, and keeps what later
    /// blocks depend on (an interface's resolution).
    fn write(
        &mut self,
        out: &mut Vec<u8>,
        block: &Block,
    ) -> Result<usize, pcap_file::pcapng::PcapNgWriteError> {
        let written = block.write_to::<LittleEndian, _>(&self.state, out)?;
        self.state.update_from_block(block);
        Ok(written)
    }

    /// Writes the interface block of an interface seen for the first time
    /// (interfaces may appear mid-capture), described as being on the
    /// origin's node and, when it is one, a target pod's; returns its id.
    #[cold]
    fn add_interface(
        &mut self,
        out: &mut Vec<u8>,
        ifindex: u32,
        names: &impl InterfaceNames,
        snaplen: u32,
        origin: &Origin,
    ) -> u32 {
        let mut options = vec![
            InterfaceDescriptionOption::IfName(Cow::Borrowed(names.name(ifindex))),
            // What enhanced_packet writes in.
            InterfaceDescriptionOption::IfTsResol(InterfaceTsResolution::NANO),
        ];
        let owner = origin.owners.as_ref().and_then(|o| o.owner(ifindex));
        let description = match (origin.node.as_str(), owner) {
            ("", None) => None,
            ("", Some(owner)) => Some(owner),
            (node, None) => Some(format!("node {node}")),
            (node, Some(owner)) => Some(format!("{owner} on node {node}")),
        };
        if let Some(d) = description {
            options.push(InterfaceDescriptionOption::IfDescription(Cow::Owned(d)));
        }
        let block = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen,
            options,
        }
        .into_block();
        self.write(out, &block).expect(VEC_WRITES);
        let id = self.ids.len() as u32;
        self.ids.insert(ifindex, id);
        id
    }
}

/// An enhanced packet block, little-endian with a nanosecond timestamp (as
/// the section header and the interface blocks say), with the direction in
/// epb_flags, the packets lost before it in epb_dropcount when any were,
/// and its number in epb_packetid when it has one.
///
/// Written by hand rather than by pcap-file's block encoder, which made the
/// pcapng writer five times slower (docs/capture.md, "Writer throughput"):
/// it encodes every block twice (once into `io::sink()` to learn its
/// length), writes each field through `io::Write`, converts the timestamp
/// through u128 arithmetic, and takes the options as a `Vec`. The tests read
/// these blocks back with pcap-file's reader and with tshark.
fn enhanced_packet(
    out: &mut Vec<u8>,
    interface_id: u32,
    meta: &Meta,
    data: &[u8],
    lost: u64,
    number: Option<u64>,
) {
    pcapng::enhanced_packet(
        out,
        &pcapng::Packet {
            interface_id,
            unix_ns: meta.unix_ns,
            inbound: Some(meta.direction == Direction::In),
            orig_len: meta.orig_len,
            data,
            lost,
            number,
        },
    );
}

/// One pcap record (little-endian, nanoseconds, as the file header says).
///
/// Written here rather than by pcap-file's record encoder
/// (`RawPcapPacket::write_to`), which made the pcap writer 30 % slower on
/// 60-byte frames and 13 % on 1442-byte ones (docs/capture.md, "Writer
/// throughput"): it writes each field through `io::Write` and returns a
/// `Result` as large as its error type. The tests read these records back
/// with pcap-file's reader, tcpdump and tshark.
fn pcap_record(out: &mut Vec<u8>, meta: &Meta, data: &[u8]) -> Result<(), Unencodable> {
    let Ok(secs) = u32::try_from(meta.unix_ns / 1_000_000_000) else {
        return Err(Unencodable);
    };
    let mut header = [[0u8; 4]; 4];
    for (field, word) in header.iter_mut().zip([
        secs,
        (meta.unix_ns % 1_000_000_000) as u32,
        data.len() as u32,
        // A record cannot hold more bytes than the packet had on the wire.
        meta.orig_len.max(data.len() as u32),
    ]) {
        *field = word.to_le_bytes();
    }
    out.reserve(size_of_val(&header) + data.len());
    out.extend_from_slice(header.as_flattened());
    out.extend_from_slice(data);
    Ok(())
}

/// Length of the longest prefix of a pcap `file` made of whole records (the
/// header included), or `None` when the header itself is not whole. A
/// record no writer of ours makes ends it too: a power loss can leave a
/// file's tail as zeros, which would read as empty packets of 1970.
pub fn pcap_whole_prefix(file: &[u8]) -> Option<usize> {
    let (mut rest, parser) = PcapParser::new(file).ok()?;
    let snaplen = parser.header().snaplen;
    while let Ok((after, record)) = parser.next_raw_packet(rest) {
        if record.orig_len == 0 || record.incl_len > record.orig_len || record.incl_len > snaplen {
            break;
        }
        rest = after;
    }
    Some(file.len() - rest.len())
}

/// Length of the longest prefix of a pcapng `file` made of whole blocks, or
/// `None` when the section header is not whole.
pub fn pcapng_whole_prefix(file: &[u8]) -> Option<usize> {
    let (mut rest, mut parser) = PcapNgParser::new(file).ok()?;
    while let Ok((after, _)) = parser.next_raw_block(rest) {
        rest = after;
    }
    Some(file.len() - rest.len())
}

/// `<time> <interface> <In|Out> <what tcpdump -n would print>\n`, written
/// straight into `out` (no allocation per packet).
fn text_line(out: &mut Vec<u8>, meta: &Meta, data: &[u8], names: &impl InterfaceNames) {
    let dir = match meta.direction {
        Direction::In => "In ",
        Direction::Out => "Out",
    };
    let mut text = Utf8Sink(out);
    let _ = write_rfc3339(&mut text, meta.unix_ns);
    let _ = write!(text, " {} {dir} ", names.name(meta.ifindex));
    let _ = describe(&mut text, data, meta.orig_len);
    out.push(b'\n');
}

/// RFC 3339 in UTC with nanoseconds, `2026-11-26T05:03:31.123456789Z`: the
/// time of text lines and of the API's timestamps.
pub fn write_rfc3339(out: &mut impl std::fmt::Write, unix_ns: u64) -> std::fmt::Result {
    // Any u64 of nanoseconds (up to 2554) is within time's range.
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ns))
        .map_err(|_| std::fmt::Error)?;
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// Text formatted into a byte buffer.
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::PcapNgReader;
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption as Epo;
    use std::time::Duration;

    fn names() -> HashMap<u32, String> {
        [(2, "eth0".to_string()), (7, "veth-late".to_string())].into()
    }

    fn meta(unix_ns: u64, ifindex: u32, direction: Direction, orig_len: u32) -> Meta {
        Meta {
            unix_ns,
            ifindex,
            direction,
            orig_len,
        }
    }

    /// A file of `format` holding `packets`, header first.
    fn file(format: OutputFormat, packets: &[(Meta, &[u8])]) -> Vec<u8> {
        let mut encoder = Encoder::new(format, 1000);
        let mut out = Vec::new();
        encoder.file_header(&mut out);
        for (meta, data) in packets {
            encoder.encode(&mut out, meta, data, &names()).unwrap();
        }
        out
    }

    const T: u64 = 1_764_000_000_123_456_789;

    #[test]
    fn pcap_has_nanosecond_times_and_the_snaplen() {
        let frame = [0xabu8; 60];
        let bytes = file(
            OutputFormat::Pcap,
            &[(meta(T, 2, Direction::In, 1514), &frame[..])],
        );
        // The nanosecond magic, little-endian, as libpcap writes it.
        assert_eq!(bytes[..4], [0x4d, 0x3c, 0xb2, 0xa1]);
        let mut reader = pcap_file::pcap::PcapReader::new(&bytes[..]).unwrap();
        assert_eq!(reader.header().snaplen, 1000);
        assert_eq!(reader.header().datalink, DataLink::ETHERNET);
        let packet = reader.next_packet().unwrap().unwrap();
        assert_eq!(packet.timestamp(), Duration::from_nanos(T));
        assert_eq!((packet.orig_len(), packet.data()), (1514, &frame[..]));
        assert!(reader.next_packet().is_none());
    }

    #[test]
    fn pcapng_names_interfaces_as_they_appear_with_directions() {
        let (a, b) = ([1u8; 61], [2u8; 64]);
        let bytes = file(
            OutputFormat::Pcapng,
            &[
                (meta(T, 2, Direction::In, 61), &a[..]),
                (meta(T + 1, 2, Direction::Out, 100), &b[..]),
                // An interface seen for the first time mid-capture.
                (meta(T + 2, 7, Direction::Out, 61), &a[..]),
                (meta(T + 3, 2, Direction::In, 64), &b[..]),
            ],
        );
        let mut reader = PcapNgReader::new(&bytes[..]).unwrap();
        let mut seen = Vec::new();
        let mut blocks = Vec::new();
        while let Some(block) = reader.next_block() {
            let (block, state) = block.unwrap();
            blocks.push(match &block {
                Block::InterfaceDescription(_) => "IDB",
                Block::EnhancedPacket(_) => "EPB",
                _ => "other",
            });
            if let Block::EnhancedPacket(epb) = block {
                let iface = &state.interfaces()[epb.interface_id as usize];
                assert_eq!(iface.ts_resolution(), InterfaceTsResolution::NANO);
                let name = iface.options.iter().find_map(|o| match o {
                    InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                    _ => None,
                });
                let flags = epb.options.iter().find_map(|o| match o {
                    Epo::Flags(f) => Some(*f),
                    _ => None,
                });
                seen.push((
                    name.unwrap(),
                    flags.unwrap(),
                    epb.timestamp,
                    epb.original_len,
                ));
            }
        }
        assert_eq!(blocks, ["IDB", "EPB", "EPB", "IDB", "EPB", "EPB"]);
        let at = |n| Duration::from_nanos(T + n);
        assert_eq!(
            seen,
            [
                ("eth0".to_string(), 1, at(0), 61),
                ("eth0".to_string(), 2, at(1), 100),
                ("veth-late".to_string(), 2, at(2), 61),
                ("eth0".to_string(), 1, at(3), 64),
            ]
        );
        let section = reader.section();
        assert_eq!(section.endianness, Endianness::Little);
        assert_eq!(
            section.options,
            [SectionHeaderOption::UserApplication(
                concat!("packet-capture ", env!("CARGO_PKG_VERSION")).into()
            )]
        );
    }

    #[test]
    fn a_comment_longer_than_an_option_is_cut_to_fit_it() {
        // The cut at the option's size falls inside a three-byte character.
        let comment = "é".repeat(11) + &"€".repeat(30_000);
        let mut encoder = Encoder::new(OutputFormat::Pcapng, 1000).with_origin(Origin {
            comment: comment.clone(),
            ..Origin::default()
        });
        let mut bytes = Vec::new();
        encoder.file_header(&mut bytes);
        let reader = PcapNgReader::new(&bytes[..]).unwrap();
        let kept = reader
            .section()
            .options
            .iter()
            .find_map(|o| match o {
                SectionHeaderOption::Common(CommonOption::Comment(c)) => Some(c.to_string()),
                _ => None,
            })
            .expect("the comment");
        let cut = kept.strip_suffix(" …").expect("marked as cut");
        assert!(comment.starts_with(cut));
        assert!(kept.len() <= MAX_OPTION_BYTES && kept.len() > MAX_OPTION_BYTES - 4);
    }

    #[test]
    fn whole_prefixes_end_at_the_last_whole_record() {
        let frame = [0u8; 60];
        let packets = [
            (meta(T, 2, Direction::In, 60), &frame[..]),
            (meta(T + 1, 2, Direction::Out, 60), &frame[..]),
        ];
        for (format, whole_prefix) in [
            (
                OutputFormat::Pcap,
                pcap_whole_prefix as fn(&[u8]) -> Option<usize>,
            ),
            (OutputFormat::Pcapng, pcapng_whole_prefix),
        ] {
            let one = file(format, &packets[..1]).len();
            let two = file(format, &packets);
            assert_eq!(whole_prefix(&two), Some(two.len()), "{format:?}");
            assert_eq!(whole_prefix(&two[..two.len() - 1]), Some(one), "{format:?}");
            assert_eq!(whole_prefix(&two[..10]), None, "{format:?}: a cut header");
            // Zeros where a power loss left the tail unwritten.
            let mut zeroed = two.clone();
            zeroed.truncate(one);
            zeroed.resize(one + 4096, 0);
            assert_eq!(
                whole_prefix(&zeroed),
                Some(one),
                "{format:?}: a zeroed tail"
            );
        }
    }

    #[test]
    fn a_packet_pcap_cannot_hold_is_refused_whole() {
        let mut encoder = Encoder::new(OutputFormat::Pcap, 1000);
        let mut out = Vec::new();
        encoder.file_header(&mut out);
        let header = out.len();
        // 2107: past pcap's 32-bit seconds.
        let late = meta(4_360_000_000 * 1_000_000_000, 2, Direction::In, 60);
        assert!(encoder.encode(&mut out, &late, &[0; 60], &names()).is_err());
        assert_eq!(out.len(), header, "nothing of it was written");
    }

    #[test]
    fn text_lines_have_the_utc_time_the_interface_and_the_direction() {
        let mut s = String::new();
        write_rfc3339(&mut s, 1_701_441_022_000_000_123).unwrap();
        assert_eq!(s, "2023-12-01T14:30:22.000000123Z");
        let arp_reply = [
            [0xff; 6].as_slice(),
            &[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2],
            &[2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2],
        ]
        .concat();
        let lines = file(
            OutputFormat::Stdout,
            &[(meta(T, 7, Direction::Out, 60), &arp_reply)],
        );
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "PACKET: 2025-11-24T16:00:00.123456789Z veth-late Out \
             ARP, Reply 10.0.0.1 is-at 02:00:00:00:00:01, length 46\n"
        );
    }
}
