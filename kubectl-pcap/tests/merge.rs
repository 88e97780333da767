//! The merge checked against Debian's `mergecap`: nodes' files written with
//! pcap-file (pcap in micro- and nanoseconds, pcapng with two interfaces,
//! gzip- and zstd-compressed, rotated files, interleaved and equal
//! timestamps) merge into the packets mergecap makes of the same files
//! decompressed, in the same order; tshark reads the interfaces as
//! `node/interface`. mergecap and tshark (Debian's wireshark-common and
//! tshark) must be installed: without them these tests fail.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kubectl_pcap::merge::{NodeInput, NodeSummary, if_name, merge};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapTsResolution, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption, InterfaceTsResolution,
};
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriter};
use pcap_file::{DataLink, Endianness};

/// 100 s and `ns` nanoseconds past the epoch.
fn at(ns: u32) -> Duration {
    Duration::new(100, ns)
}

/// A frame that says which node sent it and its place there (bytes 0 and
/// 1), `len` bytes long.
fn frame(node: u8, seq: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0] = node;
    f[1] = seq;
    // A local experimental EtherType, so tshark dissects nothing further.
    f[12] = 0x88;
    f[13] = 0xb5;
    f
}

fn pcap(path: &Path, resolution: PcapTsResolution, packets: &[(Duration, Vec<u8>)]) {
    let header = PcapHeader {
        ts_resolution: resolution,
        snaplen: 65535,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
    for (ts, data) in packets {
        w.write_packet(&PcapPacket::new(*ts, data.len() as u32 + 4, data.as_slice()).unwrap())
            .unwrap();
    }
    write_compressed(path, &w.into_inner());
}

fn interfaces() -> [InterfaceDescriptionBlock<'static>; 2] {
    [
        InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: 262144,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("eth0")),
                InterfaceDescriptionOption::IfTsResol(InterfaceTsResolution::NANO),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed("node worker-3")),
            ],
        },
        // No if_tsresol: microseconds, pcapng's default.
        InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: 128,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("veth-ab")),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                    "pod shop/web-0 on node worker-3",
                )),
            ],
        },
    ]
}

fn pcapng(path: &Path, packets: &[EnhancedPacketBlock<'static>]) {
    let section = SectionHeaderBlock {
        endianness: Endianness::Little,
        major_version: 1,
        minor_version: 0,
        section_length: -1,
        options: vec![SectionHeaderOption::Common(CommonOption::Comment(
            Cow::Borrowed("capture cap on node worker-3"),
        ))],
    };
    let mut w = PcapNgWriter::with_section_header(Vec::new(), section).unwrap();
    for idb in interfaces() {
        w.write_pcapng_block(idb).unwrap();
    }
    for p in packets {
        w.write_pcapng_block(p.clone()).unwrap();
    }
    write_compressed(path, &w.into_inner());
}

/// Writes `bytes` compressed as the name says.
fn write_compressed(path: &Path, bytes: &[u8]) {
    let file = File::create(path).unwrap();
    match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => {
            let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
            gz.write_all(bytes).unwrap();
            gz.finish().unwrap();
        }
        Some("zst") => zstd::stream::copy_encode(bytes, file, 3).unwrap(),
        _ => (&file).write_all(bytes).unwrap(),
    }
}

/// A plain copy of a file for mergecap.
fn decompressed(path: &Path, dir: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut bytes = Vec::new();
    let file = File::open(path).unwrap();
    let plain = match name.rsplit_once('.') {
        Some((stem, "gz")) => {
            flate2::read::GzDecoder::new(file)
                .read_to_end(&mut bytes)
                .unwrap();
            stem
        }
        Some((stem, "zst")) => {
            bytes = zstd::stream::decode_all(file).unwrap();
            stem
        }
        _ => {
            (&file).read_to_end(&mut bytes).unwrap();
            name
        }
    };
    // Nodes' files share names; mergecap's copies must not.
    let out = dir.join(format!(
        "{}-{plain}",
        path.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    ));
    std::fs::write(&out, bytes).unwrap();
    out
}

fn epb(
    interface_id: u32,
    timestamp: Duration,
    data: Vec<u8>,
    original_len: u32,
    options: Vec<EnhancedPacketOption<'static>>,
) -> EnhancedPacketBlock<'static> {
    EnhancedPacketBlock {
        interface_id,
        timestamp,
        original_len,
        data: Cow::Owned(data),
        options,
    }
}

/// What a merged file holds: its interfaces, its section's options, and
/// its packets.
struct Merged {
    section: Vec<SectionHeaderOption<'static>>,
    interfaces: Vec<InterfaceDescriptionBlock<'static>>,
    packets: Vec<EnhancedPacketBlock<'static>>,
}

fn read(path: &Path) -> Merged {
    let mut reader = PcapNgReader::new(File::open(path).unwrap()).unwrap();
    let section = reader.section().options.clone();
    let mut packets = Vec::new();
    while let Some(block) = reader.next_block() {
        if let (Block::EnhancedPacket(p), _) = block.unwrap() {
            packets.push(p.into_owned());
        }
    }
    Merged {
        section,
        interfaces: reader.interfaces().to_vec(),
        packets,
    }
}

/// Runs a Wireshark tool, failing the test when it is not installed.
fn tool(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!("running {name} (Debian: apt-get install wireshark-common tshark): {e}")
    });
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Inputs {
    _dir: tempfile::TempDir,
    nodes: Vec<NodeInput>,
    /// What was written to worker-3's files, in order.
    worker3: Vec<EnhancedPacketBlock<'static>>,
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = |n: &str| {
        let d = dir.path().join(n);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (w1, w2, w3) = (
        node_dir("worker-1"),
        node_dir("worker-2"),
        node_dir("worker-3"),
    );

    // worker-1: microsecond pcap, rotated; the older file gzip-compressed.
    // The newer file starts at the time the older one ends.
    let w1_old = w1.join("cap-20250101-120000.pcap.gz");
    pcap(
        &w1_old,
        PcapTsResolution::MicroSecond,
        &[
            (at(1_000), frame(1, 0, 60)),
            (at(3_000), frame(1, 1, 60)),
            (at(5_000), frame(1, 2, 60)),
        ],
    );
    let w1_new = w1.join("cap-20250101-120100.pcap");
    pcap(
        &w1_new,
        PcapTsResolution::MicroSecond,
        &[(at(5_000), frame(1, 3, 60)), (at(9_000), frame(1, 4, 80))],
    );

    // worker-2: nanosecond pcap, plain.
    let w2_file = w2.join("cap-20250101-120000.pcap");
    pcap(
        &w2_file,
        PcapTsResolution::NanoSecond,
        &[
            (at(1_000), frame(2, 0, 60)),
            (at(2_500), frame(2, 1, 60)),
            (at(5_000), frame(2, 2, 60)),
            (at(8_123), frame(2, 3, 60)),
        ],
    );

    // worker-3: pcapng with two interfaces, zstd-compressed, then a
    // rotated plain file with the same interfaces.
    let inbound = EnhancedPacketOption::Flags(1);
    let outbound = EnhancedPacketOption::Flags(2);
    let first = vec![
        epb(0, at(1_000), frame(3, 0, 60), 60, vec![inbound.clone()]),
        epb(1, at(4_000), frame(3, 1, 128), 1500, vec![outbound.clone()]),
        epb(0, at(6_789), frame(3, 2, 60), 60, vec![inbound.clone()]),
        epb(
            1,
            at(7_000),
            frame(3, 3, 64),
            64,
            vec![
                outbound.clone(),
                EnhancedPacketOption::Common(CommonOption::Comment(Cow::Borrowed(
                    "retransmission",
                ))),
            ],
        ),
        epb(0, at(9_000), frame(3, 4, 60), 60, vec![inbound.clone()]),
    ];
    let w3_old = w3.join("cap-20250101-120000.pcapng.zst");
    pcapng(&w3_old, &first);
    let second = vec![epb(1, at(10_000), frame(3, 5, 60), 60, vec![inbound])];
    let w3_new = w3.join("cap-20250101-120100.pcapng");
    pcapng(&w3_new, &second);

    Inputs {
        nodes: vec![
            NodeInput {
                node: "worker-1".into(),
                files: vec![w1_old, w1_new],
            },
            NodeInput {
                node: "worker-2".into(),
                files: vec![w2_file],
            },
            NodeInput {
                node: "worker-3".into(),
                files: vec![w3_old, w3_new],
            },
        ],
        worker3: first.into_iter().chain(second).collect(),
        _dir: dir,
    }
}

#[test]
fn the_merge_orders_packets_as_mergecap_does() {
    let inputs = inputs();
    let out_dir = tempfile::tempdir().unwrap();
    let merged_path = out_dir.path().join("merged.pcapng");
    let (file, summaries) = merge(
        inputs.nodes.clone(),
        "capture cap",
        File::create(&merged_path).unwrap(),
    )
    .unwrap();
    drop(file);
    assert_eq!(
        summaries,
        [
            NodeSummary {
                node: "worker-1".into(),
                files: 2,
                packets: 5
            },
            NodeSummary {
                node: "worker-2".into(),
                files: 1,
                packets: 4
            },
            NodeSummary {
                node: "worker-3".into(),
                files: 2,
                packets: 6
            },
        ]
    );

    // mergecap 4.0 takes the later file first on equal timestamps (its
    // is_earlier() holds for equal times), even the later of one node's
    // files; given the files in reverse, its ties fall as the merge's
    // (the earlier node first, a node's files in order).
    let plain: Vec<PathBuf> = inputs
        .nodes
        .iter()
        .flat_map(|n| &n.files)
        .rev()
        .map(|f| decompressed(f, out_dir.path()))
        .collect();
    let reference = out_dir.path().join("mergecap.pcapng");
    let mut args = vec!["-w".as_ref(), reference.as_os_str()];
    args.extend(plain.iter().map(|p| p.as_os_str()));
    tool("mergecap", &args);

    let ours = read(&merged_path);
    let theirs = read(&reference);
    let key = |p: &EnhancedPacketBlock| (p.timestamp, p.data.to_vec(), p.original_len);
    let ours_keys: Vec<_> = ours.packets.iter().map(key).collect();
    let theirs_keys: Vec<_> = theirs.packets.iter().map(key).collect();
    assert_eq!(ours_keys.len(), 15);
    assert_eq!(ours_keys, theirs_keys);

    // The three packets at the same time, in node order; the microsecond
    // and nanosecond times kept exactly.
    let first: Vec<(u8, Duration)> = ours.packets[..3]
        .iter()
        .map(|p| (p.data[0], p.timestamp))
        .collect();
    assert_eq!(first, [(1, at(1_000)), (2, at(1_000)), (3, at(1_000))]);
    assert!(ours.packets.iter().any(|p| p.timestamp == at(8_123)));
    assert!(ours.packets.iter().any(|p| p.timestamp == at(6_789)));
}

#[test]
fn interfaces_are_named_by_node_and_keep_their_description() {
    let inputs = inputs();
    let out_dir = tempfile::tempdir().unwrap();
    let merged_path = out_dir.path().join("merged.pcapng");
    merge(
        inputs.nodes.clone(),
        "capture cap",
        File::create(&merged_path).unwrap(),
    )
    .unwrap();
    let merged = read(&merged_path);

    // One block per interface of each node, however many files.
    let names: Vec<String> = merged
        .interfaces
        .iter()
        .map(|i| if_name(i).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "worker-1/cap",
            "worker-2/cap",
            "worker-3/eth0",
            "worker-3/veth-ab"
        ]
    );
    let [eth0, veth] = interfaces();
    let described = |i: usize| {
        let idb = &merged.interfaces[i];
        (
            idb.linktype,
            idb.snaplen,
            idb.ts_resolution(),
            idb.options[1..].to_vec(),
        )
    };
    assert_eq!(
        described(2),
        (
            DataLink::ETHERNET,
            262144,
            InterfaceTsResolution::NANO,
            eth0.options[1..].to_vec()
        )
    );
    assert_eq!(
        described(3),
        (
            DataLink::RAW,
            128,
            InterfaceTsResolution::MICRO,
            veth.options[1..].to_vec()
        )
    );
    assert_eq!(
        merged.interfaces[0].ts_resolution(),
        InterfaceTsResolution::MICRO
    );
    assert_eq!(
        merged.interfaces[1].ts_resolution(),
        InterfaceTsResolution::NANO
    );
    assert_eq!(
        (merged.interfaces[0].linktype, merged.interfaces[0].snaplen),
        (DataLink::ETHERNET, 65535)
    );

    // Each packet on its node's interface, with its flags and comments.
    let per_packet: Vec<String> = merged
        .packets
        .iter()
        .map(|p| names[p.interface_id as usize].clone())
        .collect();
    for (p, name) in merged.packets.iter().zip(&per_packet) {
        assert!(
            name.starts_with(&format!("worker-{}/", p.data[0])),
            "packet {:?} on {name}",
            &p.data[..2]
        );
    }
    let worker3: Vec<_> = merged.packets.iter().filter(|p| p.data[0] == 3).collect();
    assert_eq!(worker3.len(), inputs.worker3.len());
    for (got, sent) in worker3.iter().zip(&inputs.worker3) {
        assert_eq!(got.options, sent.options);
        assert_eq!(got.data, sent.data);
        assert_eq!(
            names[got.interface_id as usize],
            ["worker-3/eth0", "worker-3/veth-ab"][sent.interface_id as usize]
        );
    }

    // The section says what was merged and what each node's capture was.
    let comments: Vec<&str> = merged
        .section
        .iter()
        .filter_map(|o| match o {
            SectionHeaderOption::Common(CommonOption::Comment(c)) => Some(c.as_ref()),
            _ => None,
        })
        .collect();
    assert_eq!(comments, ["capture cap", "capture cap on node worker-3"]);

    // tshark reads the same names, packet by packet.
    let tshark = tool(
        "tshark",
        &[
            "-r".as_ref(),
            merged_path.as_os_str(),
            "-T".as_ref(),
            "fields".as_ref(),
            "-e".as_ref(),
            "frame.interface_name".as_ref(),
        ],
    );
    let seen: Vec<&str> = tshark.lines().collect();
    assert_eq!(seen, per_packet);
}
