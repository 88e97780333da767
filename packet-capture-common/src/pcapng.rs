//! The pcapng blocks written by hand: little-endian, nanosecond timestamps.
//!
//! The agent writes every packet's block with [`enhanced_packet`] (pcap-file's
//! block encoder made its writer five times slower, docs/capture.md "Writer
//! throughput"); the controller's live stream merged across nodes writes
//! all three kinds. Each block is `type, length, body, options, length`,
//! padded to 32 bits (draft-ietf-opsawg-pcapng).

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
const OPT_ENDOFOPT: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;
const EPB_DROPCOUNT: u16 = 4;
const EPB_PACKETID: u16 = 5;
/// The link type of every interface block: Ethernet.
pub const LINKTYPE_ETHERNET: u16 = 1;

/// One packet's block.
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    pub interface_id: u32,
    /// Nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    /// `Some(true)` inbound, `Some(false)` outbound (epb_flags).
    pub inbound: Option<bool>,
    /// Length on the wire; at least `data.len()` is written.
    pub orig_len: u32,
    pub data: &'a [u8],
    /// Packets lost just before this one (epb_dropcount), 0 for none.
    pub lost: u64,
    /// Its number among the packets of its capture on its node
    /// (epb_packetid): live streams give it, to go on after it when they
    /// break off.
    pub number: Option<u64>,
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Options as pcapng encodes them, ended by `opt_endofopt`.
struct Options(Vec<u8>);

impl Options {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn add(mut self, code: u16, value: &[u8]) -> Self {
        self.0.extend_from_slice(&code.to_le_bytes());
        self.0
            .extend_from_slice(&(value.len() as u16).to_le_bytes());
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(&[0; 3][..padding(value.len())]);
        self
    }

    /// Adds a text option, unless empty; longer than an option holds is cut.
    fn text(self, code: u16, value: &str) -> Self {
        match value.len() {
            0 => self,
            n => self.add(code, &value.as_bytes()[..n.min(u16::MAX as usize - 3)]),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&OPT_ENDOFOPT.to_le_bytes());
        self.0.extend_from_slice(&0u16.to_le_bytes());
        self.0
    }
}

fn block(out: &mut Vec<u8>, kind: u32, body: &[u8], options: Vec<u8>) {
    let total = (12 + body.len() + padding(body.len()) + options.len()) as u32;
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&[0; 3][..padding(body.len())]);
    out.extend_from_slice(&options);
    out.extend_from_slice(&total.to_le_bytes());
}

/// A section header of unknown length, naming the application and saying
/// what the section holds in its comment.
pub fn section_header(out: &mut Vec<u8>, application: &str, comment: &str) {
    let mut body = Vec::with_capacity(16);
    body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(-1i64).to_le_bytes());
    let options = Options::new()
        .text(OPT_COMMENT, comment)
        .text(SHB_USERAPPL, application)
        .finish();
    block(out, SHB, &body, options);
}

/// An Ethernet interface with nanosecond timestamps.
pub fn interface_description(out: &mut Vec<u8>, name: &str, description: &str, snaplen: u32) {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&snaplen.to_le_bytes());
    let options = Options::new()
        .text(IF_NAME, name)
        .text(IF_DESCRIPTION, description)
        .add(IF_TSRESOL, &[9])
        .finish();
    block(out, IDB, &body, options);
}

/// One packet's enhanced packet block, written straight into `out` (no
/// allocation besides `out`'s growth): it runs for every packet captured.
pub fn enhanced_packet(out: &mut Vec<u8>, p: &Packet<'_>) {
    let data = p.data;
    let pad = padding(data.len());
    let flags = p.inbound.map_or(0, |inbound| if inbound { 1 } else { 2 });
    let flags_len = if flags != 0 { 4 + 4 } else { 0 };
    let dropcount_len = if p.lost > 0 { 4 + 8 } else { 0 };
    let number_len = if p.number.is_some() { 4 + 8 } else { 0 };
    // Header, body, data and its padding, the options, end of options,
    // trailing length.
    let total = (8 + 20 + data.len() + pad + flags_len + dropcount_len + number_len + 4 + 4) as u32;
    out.reserve(total as usize);
    for word in [
        EPB,
        total,
        p.interface_id,
        (p.unix_ns >> 32) as u32,
        p.unix_ns as u32,
        data.len() as u32,
        p.orig_len.max(data.len() as u32),
    ] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(data);
    out.extend_from_slice(&[0; 3][..pad]);
    if flags != 0 {
        out.extend_from_slice(&EPB_FLAGS.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&(flags as u32).to_le_bytes());
    }
    if p.lost > 0 {
        out.extend_from_slice(&EPB_DROPCOUNT.to_le_bytes());
        out.extend_from_slice(&8u16.to_le_bytes());
        out.extend_from_slice(&p.lost.to_le_bytes());
    }
    if let Some(number) = p.number {
        out.extend_from_slice(&EPB_PACKETID.to_le_bytes());
        out.extend_from_slice(&8u16.to_le_bytes());
        out.extend_from_slice(&number.to_le_bytes());
    }
    out.extend_from_slice(&OPT_ENDOFOPT.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_and_padded() {
        let mut out = Vec::new();
        section_header(&mut out, "packet-capture", "a comment");
        interface_description(&mut out, "node-1/eth0", "pod a/b on node node-1", 262_144);
        enhanced_packet(
            &mut out,
            &Packet {
                interface_id: 0,
                unix_ns: 1_764_000_000_123_456_789,
                inbound: Some(false),
                orig_len: 60,
                data: &[0xab; 13],
                lost: 7,
                number: Some(42),
            },
        );
        // Walk the blocks: each length is a multiple of 4 and repeated at
        // its end, and together they are the whole output.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < out.len() {
            let word = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
            let len = word(at + 4) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(word(at + len - 4) as usize, len);
            kinds.push(word(at));
            at += len;
        }
        assert_eq!(at, out.len());
        assert_eq!(kinds, [SHB, IDB, EPB]);
    }
}
