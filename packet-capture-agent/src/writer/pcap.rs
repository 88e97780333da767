//! The classic pcap format with nanosecond timestamps.

use super::Meta;

/// Magic number of nanosecond-resolution pcap files.
const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;
/// Bytes before each record's data.
pub const RECORD_HEADER_LEN: usize = 16;
pub const FILE_HEADER_LEN: usize = 24;

pub fn file_header(out: &mut Vec<u8>, snaplen: u32) {
    out.extend_from_slice(&MAGIC_NANOS.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes()); // thiszone
    out.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
    out.extend_from_slice(&snaplen.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
}

pub fn record(out: &mut Vec<u8>, meta: &Meta, data: &[u8]) {
    let secs = (meta.unix_ns / 1_000_000_000) as u32;
    let nanos = (meta.unix_ns % 1_000_000_000) as u32;
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta.orig_len.to_le_bytes());
    out.extend_from_slice(data);
}

/// Length of the longest prefix of `file` made of whole records (the header
/// included), or `None` when the header itself is not whole or not ours.
pub fn whole_prefix(file: &[u8]) -> Option<usize> {
    if file.len() < FILE_HEADER_LEN || file[..4] != MAGIC_NANOS.to_le_bytes() {
        return None;
    }
    let mut at = FILE_HEADER_LEN;
    while let Some(header) = file.get(at..at + RECORD_HEADER_LEN) {
        let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        let end = at + RECORD_HEADER_LEN + len;
        if end > file.len() {
            break;
        }
        at = end;
    }
    Some(at)
}
