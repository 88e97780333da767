//! Merging the capture files of many nodes into one pcapng, as `mergecap`
//! does: packets in timestamp order, each with its interface.
//!
//! Each node is one sorted stream: its files are read one after another in
//! the order given (rotation names, `<capture>-<YYYYmmdd-HHMMSS>`, sort by
//! time), and the streams are merged by a k-way merge on the timestamp that
//! takes the earlier node on equal timestamps, so a node's own order is
//! never changed. Only one packet per node is held at a time; files are
//! streamed through their decompressor.
//!
//! What the output keeps:
//! - every interface of a node, as its own Interface Description Block
//!   named `<node>/<interface>`, with its link type, snaplen, timestamp
//!   resolution, description and other options; identical descriptions of a
//!   node (the same interface in each rotated file) share one block;
//! - a pcap file has no interface names: its one interface is named
//!   `<node>/<capture>`, the capture's name read from the file name with the
//!   rotation stamp and extensions removed (`<node>/<file stem>` for other
//!   names), so a node's rotated pcap files share it;
//! - each packet's options (direction and other `epb_flags`, comments,
//!   hashes, drop counts);
//! - the section comments of the inputs (what each node's capture is).
//!
//! Statistics, name resolution and custom blocks are left out: they belong
//! to one file's numbering of interfaces and place in time.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use packet_capture_common::validate::strip_compression;
use pcap_file::Endianness;
use pcap_file::pcap::{PcapReader, PcapTsResolution};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption, InterfaceTsResolution,
};
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriteError, PcapNgWriter};

/// The read buffer of each file being merged: it must hold the largest
/// block (the agents write at most 262144 bytes of a packet), and there is
/// one per node, so pcap-file's default of 8 MB would make a merge of many
/// nodes take gigabytes.
const READ_BUFFER: usize = 1 << 20;

/// One node's files, in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInput {
    pub node: String,
    /// pcap or pcapng, plain or compressed (`.gz`, `.zst`, by the name).
    pub files: Vec<PathBuf>,
}

/// What was merged of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: String,
    pub files: usize,
    pub packets: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("writing the merged file: {0}")]
    Write(#[source] PcapNgWriteError),
}

/// How a stored file is compressed, by its name, as the agents name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of(file_name: &str) -> Self {
        if file_name.ends_with(".gz") {
            Self::Gzip
        } else if file_name.ends_with(".zst") {
            Self::Zstd
        } else {
            Self::None
        }
    }
}

/// The name of a pcap file's one interface (without the node): the
/// capture's name from `<capture>-<YYYYmmdd-HHMMSS>[-<n>].<ext>[.gz|.zst]`,
/// or the file's stem.
pub fn pcap_interface_name(file_name: &str) -> &str {
    fn digits(s: &str, n: usize) -> bool {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
    }
    fn unstamped(s: &str) -> Option<&str> {
        let (s, time) = s.rsplit_once('-')?;
        let (name, date) = s.rsplit_once('-')?;
        (digits(date, 8) && digits(time, 6) && !name.is_empty()).then_some(name)
    }
    let name = strip_compression(file_name).unwrap_or(file_name);
    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    unstamped(stem)
        .or_else(|| {
            let (stamped, n) = stem.rsplit_once('-')?;
            let numbered = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
            numbered.then(|| unstamped(stamped)).flatten()
        })
        .unwrap_or(stem)
}

/// Merges `nodes` into one pcapng written to `out`, whose section says
/// `comment` (what was merged) besides the inputs' section comments.
/// Returns `out` (to be flushed and synced by the caller) and what each
/// node contributed, in the order of `nodes`.
pub fn merge<W: Write>(
    nodes: Vec<NodeInput>,
    comment: &str,
    out: W,
) -> Result<(W, Vec<NodeSummary>), MergeError> {
    let mut inputs: Vec<Input> = nodes.into_iter().map(Input::new).collect();
    // The section header comes first, so every node's first file is opened
    // before anything is written, for its section comment.
    let mut comments: Vec<String> = Vec::new();
    for input in &mut inputs {
        input.open_next()?;
        for c in input.current.iter().flat_map(|f| f.section_comments()) {
            if !comments.contains(&c) {
                comments.push(c);
            }
        }
    }
    let section = SectionHeaderBlock {
        endianness: Endianness::native(),
        major_version: 1,
        minor_version: 0,
        section_length: -1,
        options: std::iter::once(SectionHeaderOption::UserApplication(Cow::Borrowed(
            concat!("kubectl-pcap ", env!("CARGO_PKG_VERSION")),
        )))
        .chain(
            std::iter::once(comment.to_string())
                .filter(|c| !c.is_empty())
                .chain(comments)
                .map(|c| SectionHeaderOption::Common(CommonOption::Comment(Cow::Owned(c)))),
        )
        .collect(),
    };
    let mut writer = PcapNgWriter::with_section_header(out, section).map_err(MergeError::Write)?;

    let mut heads: Vec<Option<EnhancedPacketBlock<'static>>> = Vec::with_capacity(inputs.len());
    let mut order = BinaryHeap::new();
    for (i, input) in inputs.iter_mut().enumerate() {
        let head = input.next_packet(&mut writer)?;
        if let Some(p) = &head {
            order.push(Reverse((p.timestamp, i)));
        }
        heads.push(head);
    }
    // The smallest (timestamp, node index) first: on equal timestamps the
    // earlier node, and each node's packets in their own order.
    while let Some(Reverse((_, i))) = order.pop() {
        // Every queued node has its head waiting.
        let Some(packet) = heads[i].take() else {
            continue;
        };
        writer
            .write_pcapng_block(packet)
            .map_err(MergeError::Write)?;
        inputs[i].summary.packets += 1;
        heads[i] = inputs[i].next_packet(&mut writer)?;
        if let Some(p) = &heads[i] {
            order.push(Reverse((p.timestamp, i)));
        }
    }
    let summaries = inputs.into_iter().map(|i| i.summary).collect();
    Ok((writer.into_inner(), summaries))
}

/// A node's stream of packets, file after file.
struct Input {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<OpenFile>,
    summary: NodeSummary,
}

impl Input {
    fn new(node: NodeInput) -> Self {
        Self {
            summary: NodeSummary {
                node: node.node,
                files: node.files.len(),
                packets: 0,
            },
            files: node.files.into_iter(),
            current: None,
        }
    }

    /// Opens the next file, if any.
    fn open_next(&mut self) -> Result<(), MergeError> {
        self.current = self.files.next().map(|p| OpenFile::open(&p)).transpose()?;
        Ok(())
    }

    /// The node's next packet, its interface renumbered in the output
    /// (where its description is written when first seen).
    fn next_packet<W: Write>(
        &mut self,
        out: &mut PcapNgWriter<W>,
    ) -> Result<Option<EnhancedPacketBlock<'static>>, MergeError> {
        loop {
            let Some(file) = &mut self.current else {
                return Ok(None);
            };
            if let Some(packet) = file.next_packet(&self.summary.node, out)? {
                return Ok(Some(packet));
            }
            self.open_next()?;
        }
    }
}

struct OpenFile {
    path: PathBuf,
    reader: Reader,
    /// Output interface id of each interface of the file's current section
    /// (for pcap, of its one interface, once it is written).
    ids: Vec<u32>,
}

enum Reader {
    Pcap(PcapReader<Box<dyn Read + Send>>),
    Pcapng(PcapNgReader<Box<dyn Read + Send>>),
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
    [0x4d, 0x3c, 0xb2, 0xa1],
];

impl OpenFile {
    /// Opens a file through its decompressor and tells pcap from pcapng by
    /// the first bytes.
    fn open(path: &Path) -> Result<Self, MergeError> {
        let open_error = |source| MergeError::Open {
            path: path.to_path_buf(),
            source,
        };
        let read_error = |message: String| MergeError::Read {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(open_error)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mut bytes: Box<dyn Read + Send> = match Compression::of(name) {
            Compression::None => Box::new(file),
            Compression::Gzip => {
                Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(file)))
            }
            Compression::Zstd => Box::new(zstd::Decoder::new(file).map_err(open_error)?),
        };
        let mut magic = [0u8; 4];
        bytes.read_exact(&mut magic).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => read_error("empty: not a pcap or pcapng file".into()),
            _ => open_error(e),
        })?;
        let bytes: Box<dyn Read + Send> = Box::new(io::Cursor::new(magic).chain(bytes));
        let reader = if magic == PCAPNG_MAGIC {
            Reader::Pcapng(
                PcapNgReader::with_capacity(bytes, READ_BUFFER)
                    .map_err(|e| read_error(chain(&e)))?,
            )
        } else if PCAP_MAGICS.contains(&magic) {
            Reader::Pcap(
                PcapReader::with_capacity(bytes, READ_BUFFER).map_err(|e| read_error(chain(&e)))?,
            )
        } else {
            return Err(read_error(format!(
                "not a pcap or pcapng file (it starts with {magic:02x?})"
            )));
        };
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            ids: Vec::new(),
        })
    }

    fn section_comments(&self) -> Vec<String> {
        let Reader::Pcapng(r) = &self.reader else {
            return Vec::new();
        };
        r.section()
            .options
            .iter()
            .filter_map(|o| match o {
                SectionHeaderOption::Common(CommonOption::Comment(c)) => Some(c.to_string()),
                _ => None,
            })
            .collect()
    }

    fn next_packet<W: Write>(
        &mut self,
        node: &str,
        out: &mut PcapNgWriter<W>,
    ) -> Result<Option<EnhancedPacketBlock<'static>>, MergeError> {
        let read_error = |message: String| MergeError::Read {
            path: self.path.clone(),
            message,
        };
        match &mut self.reader {
            Reader::Pcap(reader) => {
                if self.ids.is_empty() {
                    let header = reader.header();
                    let resolution = match header.ts_resolution {
                        PcapTsResolution::MicroSecond => InterfaceTsResolution::MICRO,
                        PcapTsResolution::NanoSecond => InterfaceTsResolution::NANO,
                    };
                    let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    let idb = InterfaceDescriptionBlock {
                        linktype: header.datalink,
                        snaplen: header.snaplen,
                        options: vec![
                            InterfaceDescriptionOption::IfName(Cow::Owned(format!(
                                "{node}/{}",
                                pcap_interface_name(name)
                            ))),
                            InterfaceDescriptionOption::IfTsResol(resolution),
                        ],
                    };
                    self.ids.push(output_interface(out, idb)?);
                }
                let Some(packet) = reader.next_packet() else {
                    return Ok(None);
                };
                let packet = packet.map_err(|e| read_error(chain(&e)))?;
                Ok(Some(EnhancedPacketBlock {
                    interface_id: self.ids[0],
                    timestamp: packet.timestamp(),
                    original_len: packet.orig_len(),
                    data: Cow::Owned(packet.data().to_vec()),
                    options: Vec::new(),
                }))
            }
            Reader::Pcapng(reader) => {
                while let Some(block) = reader.next_block() {
                    let (block, _) = block.map_err(|e| read_error(chain(&e)))?;
                    match block {
                        // A new section numbers its interfaces from 0 again.
                        Block::SectionHeader(_) => self.ids.clear(),
                        Block::InterfaceDescription(idb) => {
                            let idb = named(idb.into_owned(), node, self.ids.len());
                            self.ids.push(output_interface(out, idb)?);
                        }
                        Block::EnhancedPacket(epb) => {
                            let Some(&interface_id) = self.ids.get(epb.interface_id as usize)
                            else {
                                return Err(read_error(format!(
                                    "a packet of interface {} that was not described",
                                    epb.interface_id
                                )));
                            };
                            return Ok(Some(EnhancedPacketBlock {
                                interface_id,
                                ..epb.into_owned()
                            }));
                        }
                        Block::Packet(_) | Block::SimplePacket(_) => {
                            return Err(read_error(
                                "holds obsolete or simple packet blocks, which carry no \
                                 interface or timestamp to merge by; only enhanced packet \
                                 blocks are merged"
                                    .into(),
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(None)
            }
        }
    }
}

/// `idb` with its name prefixed by the node (`<node>/if<id>` when it has
/// none).
fn named(
    mut idb: InterfaceDescriptionBlock<'static>,
    node: &str,
    id: usize,
) -> InterfaceDescriptionBlock<'static> {
    let name = if_name(&idb)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("if{id}"));
    idb.options
        .retain(|o| !matches!(o, InterfaceDescriptionOption::IfName(_)));
    idb.options.insert(
        0,
        InterfaceDescriptionOption::IfName(Cow::Owned(format!("{node}/{name}"))),
    );
    idb
}

/// The output id of `idb`: that of an identical description already
/// written, or of `idb` written now.
fn output_interface<W: Write>(
    out: &mut PcapNgWriter<W>,
    idb: InterfaceDescriptionBlock<'static>,
) -> Result<u32, MergeError> {
    if let Some(id) = out.interfaces().iter().position(|i| *i == idb) {
        return Ok(id as u32);
    }
    out.write_pcapng_block(idb).map_err(MergeError::Write)?;
    Ok(out.interfaces().len() as u32 - 1)
}

/// An error and its causes, `a: b: c`: pcap-file's I/O errors say what
/// was being read and leave the cause to their source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// An interface block's name (`if_name`), when it has one.
pub fn if_name<'a>(idb: &'a InterfaceDescriptionBlock<'_>) -> Option<&'a str> {
    idb.options.iter().find_map(|o| match o {
        InterfaceDescriptionOption::IfName(name) => Some(name.as_ref()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_interfaces_are_named_by_the_capture() {
        for (file, want) in [
            ("web-20250101-120000.pcap", "web"),
            ("web-20250101-120000.pcap.gz", "web"),
            ("web-20250101-120000.pcap.zst", "web"),
            ("my-cap-20250101-120000-2.pcap", "my-cap"),
            ("trace.pcap", "trace"),
            ("web-2025-120000.pcap", "web-2025-120000"),
        ] {
            assert_eq!(pcap_interface_name(file), want, "{file}");
        }
    }

    #[test]
    fn compression_is_told_by_the_name() {
        assert_eq!(Compression::of("a.pcap.gz"), Compression::Gzip);
        assert_eq!(Compression::of("a.pcapng.zst"), Compression::Zstd);
        assert_eq!(Compression::of("a.pcapng"), Compression::None);
    }

    #[test]
    fn a_file_that_is_not_a_capture_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("web-20250101-120000.txt");
        std::fs::write(&text, "2025-01-01T12:00:00Z eth0 In 10.0.0.1 > 10.0.0.2\n").unwrap();
        let err = merge(
            vec![NodeInput {
                node: "n1".into(),
                files: vec![text],
            }],
            "",
            Vec::new(),
        )
        .unwrap_err();
        let m = err.to_string();
        assert!(m.contains("web-20250101-120000.txt"), "{m}");
        assert!(m.contains("not a pcap or pcapng file"), "{m}");
    }

    #[test]
    fn no_files_make_a_section_with_no_packets() {
        let (out, summary) = merge(
            vec![NodeInput {
                node: "n1".into(),
                files: vec![],
            }],
            "capture web",
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            summary,
            [NodeSummary {
                node: "n1".into(),
                files: 0,
                packets: 0
            }]
        );
        let mut reader = PcapNgReader::new(&out[..]).unwrap();
        assert!(
            reader
                .section()
                .options
                .contains(&SectionHeaderOption::Common(CommonOption::Comment(
                    Cow::Borrowed("capture web")
                )))
        );
        assert!(reader.next_block().is_none());
    }
}
