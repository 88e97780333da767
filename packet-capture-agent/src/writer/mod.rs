//! Turning packets into bytes: pcap, pcapng, text lines.
//!
//! An [`Encoder`] appends whole records to a buffer; the caller decides when
//! the buffer reaches the file, so the file only ever holds whole records.

mod decode;
mod pcap;
mod pcapng;

use std::collections::HashMap;
use std::fmt::Write as _;

use packet_capture_common::crd::OutputFormat;

pub use decode::describe;
pub use pcap::whole_prefix as pcap_whole_prefix;
pub use pcapng::whole_prefix as pcapng_whole_prefix;

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

/// Encodes packets in one output format.
pub struct Encoder {
    format: OutputFormat,
    snaplen: u32,
    /// pcapng: interface index -> interface block id in this file.
    pcapng_ids: HashMap<u32, u32>,
}

impl Encoder {
    pub fn new(format: OutputFormat, snaplen: u32) -> Self {
        Self {
            format,
            snaplen,
            pcapng_ids: HashMap::new(),
        }
    }

    /// The bytes a file starts with.
    pub fn file_header(&self, out: &mut Vec<u8>) {
        match self.format {
            OutputFormat::Pcap => pcap::file_header(out, self.snaplen),
            OutputFormat::Pcapng => pcapng::section_header(out),
            OutputFormat::Text | OutputFormat::Stdout => {}
        }
    }

    /// Appends one packet's record.
    pub fn encode(
        &mut self,
        out: &mut Vec<u8>,
        meta: &Meta,
        data: &[u8],
        names: &impl InterfaceNames,
    ) {
        match self.format {
            OutputFormat::Pcap => pcap::record(out, meta, data),
            OutputFormat::Pcapng => {
                let next = self.pcapng_ids.len() as u32;
                let id = *self.pcapng_ids.entry(meta.ifindex).or_insert_with(|| {
                    pcapng::interface_description(out, names.name(meta.ifindex), self.snaplen);
                    next
                });
                pcapng::enhanced_packet(out, id, meta, data);
            }
            OutputFormat::Text => text_line(out, meta, data, names),
            OutputFormat::Stdout => {
                out.extend_from_slice(b"PACKET: ");
                text_line(out, meta, data, names);
            }
        }
    }
}

/// `<time> <interface> <In|Out> <what tcpdump -n would print>\n`, written
/// straight into `out` (no allocation per packet).
fn text_line(out: &mut Vec<u8>, meta: &Meta, data: &[u8], names: &impl InterfaceNames) {
    let dir = match meta.direction {
        Direction::In => "In ",
        Direction::Out => "Out",
    };
    let mut text = Utf8Sink(out);
    let _ = crate::civil::write_rfc3339(&mut text, meta.unix_ns);
    let _ = write!(text, " {} {dir} ", names.name(meta.ifindex));
    let _ = describe(&mut text, data, meta.orig_len);
    out.push(b'\n');
}

/// Text formatted into a byte buffer.
struct Utf8Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Utf8Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
