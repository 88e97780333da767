//! Writer throughput: how fast each output format turns packets into bytes,
//! the way a capture's sink does it (one record per packet appended to the
//! output buffer, the buffer handed over at 256 KiB), without any I/O, and
//! how many heap allocations each packet costs.
//!
//! `cargo run --release -p packet-capture-agent --example writer_throughput`
//! (docs/capture.md has the numbers; on a busy machine, run the binary
//! under `chrt -f 50 taskset -c 1` so that other work does not move them).
//! Arguments: packets per run (default 2 000 000), runs (default 7) and the
//! formats (default `pcap,pcapng,text`); the best run of each case is
//! reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use packet_capture_agent::writer::{Direction, Encoder, Meta};
use packet_capture_common::crd::OutputFormat;

/// Counts allocations, so that a writer that allocates per packet shows.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; counting has no effect on it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What the sink's output buffer holds before it is written out.
const FLUSH_BYTES: usize = 256 * 1024;

/// A TCP/IPv4 Ethernet frame of `len` bytes (at least 54), so that the text
/// formats decode a real header chain.
fn tcp_frame(len: usize) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total = (len - 14) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0xc3, 0x50, 0x1f, 0x90, 0, 0, 0, 100, 0, 0, 0, 7]);
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(len, 0xab);
    f
}

struct Measured {
    packets_per_second: f64,
    bytes_per_second: f64,
    allocations_per_packet: f64,
}

fn run(format: OutputFormat, frame: &[u8], packets: u64) -> Measured {
    let names: HashMap<u32, String> = [(2, "eth0".to_string()), (3, "eth1".to_string())].into();
    let mut encoder = Encoder::new(format, 262_144);
    let mut buf = Vec::with_capacity(FLUSH_BYTES * 2);
    encoder.file_header(&mut buf);
    let mut produced = 0u64;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..packets {
        let meta = Meta {
            unix_ns: 1_764_000_000_000_000_000 + i * 1_000,
            ifindex: 2 + (i & 1) as u32,
            direction: if i & 2 == 0 {
                Direction::In
            } else {
                Direction::Out
            },
            orig_len: frame.len() as u32,
        };
        encoder
            .encode(&mut buf, &meta, black_box(frame), &names)
            .expect("every packet here is encodable");
        if buf.len() >= FLUSH_BYTES {
            produced += buf.len() as u64;
            black_box(&buf);
            buf.clear();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    produced += buf.len() as u64;
    Measured {
        packets_per_second: packets as f64 / elapsed,
        bytes_per_second: produced as f64 / elapsed,
        allocations_per_packet: allocations as f64 / packets as f64,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let packets: u64 = args
        .next()
        .map_or(2_000_000, |a| a.parse().expect("packets"));
    let runs: usize = args.next().map_or(7, |a| a.parse().expect("runs"));
    let formats: Vec<OutputFormat> = args
        .next()
        .unwrap_or_else(|| "pcap,pcapng,text".into())
        .split(',')
        .map(|f| serde_json::from_value(f.into()).expect("pcap, pcapng, text or stdout"))
        .collect();
    println!("| format | frame | Mpackets/s | MB/s out | allocations/packet |");
    println!("|---|---|---|---|---|");
    for format in formats {
        // The frame sizes of the capture benchmark (`cargo xtask bench`).
        for len in [60, 1442] {
            let frame = tcp_frame(len);
            // Text lines cost far more per packet; fewer keep the run short.
            let n = if matches!(format, OutputFormat::Text | OutputFormat::Stdout) {
                packets / 8
            } else {
                packets
            };
            let best = (0..runs)
                .map(|_| run(format, &frame, n))
                .max_by(|a, b| a.packets_per_second.total_cmp(&b.packets_per_second))
                .expect("at least one run");
            println!(
                "| {format:?} | {len} B | {:.2} | {:.0} | {:.2} |",
                best.packets_per_second / 1e6,
                best.bytes_per_second / 1e6,
                best.allocations_per_packet
            );
        }
    }
}
