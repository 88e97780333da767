//! pcapng: a section header, one interface block per interface seen (with
//! its name and nanosecond resolution), and enhanced packet blocks with the
//! direction in their flags.

use super::{Direction, Meta};

const SHB: u32 = 0x0a0d_0d0a;
const IDB: u32 = 0x0000_0001;
const EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1a2b_3c4d;
const LINKTYPE_ETHERNET: u16 = 1;
const OPT_END: u16 = 0;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;
const SHB_USERAPPL: u16 = 4;

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + pad4(value.len()), 0);
}

/// Writes a block: type, total length, `body`, total length again.
fn block(out: &mut Vec<u8>, kind: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    body(out);
    let total = (out.len() - start + 4) as u32;
    out[start + 4..start + 8].copy_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
}

pub fn section_header(out: &mut Vec<u8>) {
    block(out, SHB, |out| {
        out.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(-1i64).to_le_bytes()); // section length unknown
        option(
            out,
            SHB_USERAPPL,
            concat!("packet-capture ", env!("CARGO_PKG_VERSION")).as_bytes(),
        );
        option(out, OPT_END, &[]);
    });
}

pub fn interface_description(out: &mut Vec<u8>, name: &str, snaplen: u32) {
    block(out, IDB, |out| {
        out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&snaplen.to_le_bytes());
        option(out, IF_NAME, name.as_bytes());
        option(out, IF_TSRESOL, &[9]); // 10^-9 s
        option(out, OPT_END, &[]);
    });
}

pub fn enhanced_packet(out: &mut Vec<u8>, interface_id: u32, meta: &Meta, data: &[u8]) {
    block(out, EPB, |out| {
        out.extend_from_slice(&interface_id.to_le_bytes());
        out.extend_from_slice(&((meta.unix_ns >> 32) as u32).to_le_bytes());
        out.extend_from_slice(&(meta.unix_ns as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta.orig_len.to_le_bytes());
        out.extend_from_slice(data);
        out.resize(out.len() + pad4(data.len()), 0);
        let flags: u32 = match meta.direction {
            Direction::In => 1,
            Direction::Out => 2,
        };
        option(out, EPB_FLAGS, &flags.to_le_bytes());
        option(out, OPT_END, &[]);
    });
}

/// Length of the longest prefix of `file` made of whole blocks, or `None`
/// when the section header is not whole.
pub fn whole_prefix(file: &[u8]) -> Option<usize> {
    let block_len = |at: usize| -> Option<usize> {
        let len = u32::from_le_bytes(file.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        (len >= 12 && len.is_multiple_of(4) && at + len <= file.len()).then_some(len)
    };
    if file.get(..4)? != SHB.to_le_bytes() {
        return None;
    }
    let mut at = block_len(0)?;
    while let Some(len) = block_len(at) {
        at += len;
    }
    Some(at)
}
