//! The eBPF backend's ring reader keeps serving starts and stops while a
//! flood refills the ring faster than it is read, and the capture of the
//! flood still accounts for every datagram: written or counted as dropped.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use packet_capture_agent::capture::{
    BackendChoice, CaptureSpec, CaptureStatus, Engine, EngineConfig, StartRequest,
};
use packet_capture_agent::files::{CaptureDir, Compression};
use packet_capture_common::abi::MAX_SLOTS;
use packet_capture_common::crd::{OutputFormat, TargetDirection};
use packet_capture_common::validate::{CaptureLimits, parse_target};
use packet_capture_test_support::capfile;
use packet_capture_test_support::netns::run;
use packet_capture_test_support::{Netns, VethPair, privileged};

const NODE: &str = "10.95.0.1";
const PEER: &str = "10.95.0.2";
const PORT: u16 = 7777;
/// Captures of the flood besides the one whose counts are checked.
const LOAD_CAPTURES: usize = 10;
/// "Not forever": far above what a start or a stop takes on a loaded
/// two-CPU machine, far below a hang.
const BOUND: Duration = Duration::from_secs(10);

/// Every UDP datagram that reached the UDP layer of `ns` (delivered,
/// refused for want of a socket, or in error), from `/proc/net/snmp`.
fn udp_received(ns: &Netns) -> u64 {
    let out = run(ns.command("cat").arg("/proc/net/snmp"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| ["InDatagrams", "NoPorts", "InErrors"].contains(name))
        .map(|(_, value)| value.parse::<u64>().unwrap())
        .sum()
}

/// UDP datagrams of 1200 bytes from `ns` to NODE:PORT, as fast as a socket
/// sends them, until `stop`; how many the socket took.
fn flood(ns: &Netns, stop: &AtomicBool) -> u64 {
    ns.enter();
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let payload = [0x5a_u8; 1200];
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        // A full socket buffer only delays us.
        if socket.send_to(&payload, (NODE, PORT)).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Stops the flood when dropped, also when the test fails: the scope that
/// holds the flood's thread waits for it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn request(id: &str, filter: &str, format: OutputFormat) -> StartRequest {
    StartRequest {
        id: id.into(),
        name: id.into(),
        spec: CaptureSpec {
            targets: vec![parse_target(PEER).unwrap()],
            ports: vec![PORT],
            duration: Duration::from_secs(600),
            max_packets: CaptureLimits::DEFAULT_MAX_PACKETS.into(),
            format,
            filter: filter.into(),
            // Headers only: the files of a flood stay small.
            snaplen: 64,
            direction: TargetDirection::Both,
            keep_copies: false,
            only_targets: false,
            pods: Vec::new(),
        },
    }
}

/// Waits until capture `id`'s status satisfies `done`; fails saying `what`
/// after 30 s.
fn wait_for(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    id: &str,
    what: &str,
    done: impl FnMut(&CaptureStatus) -> bool,
) -> CaptureStatus {
    let mut rx = engine.watch(id).unwrap();
    // The timer is made inside the runtime, which it needs.
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), rx.wait_for(done)).await })
        .unwrap_or_else(|_| panic!("{id}: {what}: {:?}", engine.get(id)))
        .unwrap()
        .clone()
}

#[test]
fn starts_and_stops_go_through_while_a_flood_keeps_the_reader_busy() {
    if !privileged("starts_and_stops_go_through_while_a_flood_keeps_the_reader_busy") {
        return;
    }
    let node = Netns::new("rln");
    let peer = Netns::new("rlp");
    let _veth = VethPair::new(
        &node,
        &[&format!("{NODE}/24")],
        &peer,
        &[&format!("{PEER}/24")],
    );
    let dir = tempfile::tempdir().unwrap();
    // On a thread of its own in the node's namespace, which the runtime's
    // threads (built there) inherit.
    std::thread::scope(|s| {
        s.spawn(|| {
            node.enter();
            under_flood(&node, &peer, dir.path());
        });
    });
}

fn under_flood(node: &Netns, peer: &Netns, dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = rt
        .block_on(Engine::start(EngineConfig {
            node_name: "node".into(),
            files: Arc::new(CaptureDir::new(dir, 100, Compression::Gzip).unwrap()),
            max_file_bytes: 1 << 30,
            limits: CaptureLimits::default(),
            max_running: MAX_SLOTS,
            backend: BackendChoice::Ebpf,
            ring_bytes: 8 << 20,
            tc_attach: Default::default(),
            kernel_filters: true,
            own_api: None,
        }))
        .expect("engine starts");
    let stop_flood = AtomicBool::new(false);
    std::thread::scope(|s| {
        let before = udp_received(node);
        let flood_id = "the-flood";
        engine
            .start_capture(request(
                flood_id,
                &format!("udp and dst port {PORT}"),
                OutputFormat::Pcap,
            ))
            .unwrap();
        // More captures of the same packets, as text (a decoded line per
        // packet): the kernel still writes each packet once, and the reader
        // hands it to every one of them, so it falls behind the flood
        // whatever the machine's speed.
        for i in 0..LOAD_CAPTURES {
            engine
                .start_capture(request(&format!("load-{i}"), "", OutputFormat::Text))
                .unwrap();
        }
        let flooding = Instant::now();
        let sender = s.spawn(|| flood(peer, &stop_flood));
        let stop = StopOnDrop(&stop_flood);
        // The ring overflows: the flood comes faster than the reader reads.
        wait_for(&engine, &rt, flood_id, "no record lost", |s| s.dropped > 0);

        // Started and stopped on a thread of their own: with a reader that
        // never comes back from the ring they would never return, and the
        // test must fail rather than hang (the flood stops when it fails).
        let lost_before = engine.get(flood_id).unwrap().dropped;
        let (started_tx, started_rx) = mpsc::channel();
        let (engine2, rt2) = (engine.clone(), &rt);
        let meanwhile = s.spawn(move || {
            let started = Instant::now();
            engine2
                .start_capture(request("meanwhile", "", OutputFormat::Pcap))
                .unwrap();
            let _ = started_tx.send(started.elapsed());
            // Stopped once it has part of the flood, and the ring has
            // overflowed again meanwhile: the reader was behind all along.
            wait_for(&engine2, rt2, "meanwhile", "nothing selected", |s| {
                s.packets + s.dropped > 0
            });
            wait_for(&engine2, rt2, flood_id, "no overflow", |s| {
                s.dropped > lost_before
            });
            let stopped = Instant::now();
            let status = rt2.block_on(engine2.stop_capture("meanwhile")).unwrap();
            (stopped.elapsed(), status)
        });
        let start_took = started_rx
            .recv_timeout(BOUND)
            .unwrap_or_else(|e| panic!("a start under the flood did not return: {e}"));
        let (stop_took, meanwhile) = meanwhile.join().unwrap();
        drop(stop);
        let sent = sender.join().unwrap();
        eprintln!(
            "under the flood: start took {start_took:?}, stop {stop_took:?}; \
             the flood sent {sent} datagrams in {:?}",
            flooding.elapsed()
        );
        assert!(stop_took < BOUND, "stop took {stop_took:?}");
        assert!(meanwhile.state.is_final(), "{meanwhile:?}");
        assert!(meanwhile.packets + meanwhile.dropped > 0, "{meanwhile:?}");
        assert_eq!(
            capfile::read(Path::new(&meanwhile.output_file)).len() as u64,
            meanwhile.packets
        );

        // Every datagram that reached the node passed the program first:
        // once the reader has caught up, the capture has each of them,
        // written or dropped.
        wait_for(&engine, &rt, flood_id, "datagrams unaccounted for", |s| {
            s.packets + s.dropped == udp_received(node) - before
        });
        let ended = rt.block_on(engine.stop_capture(flood_id)).unwrap();
        let received = udp_received(node) - before;
        eprintln!(
            "the flood's capture: {} written, {} dropped, of {received} received",
            ended.packets, ended.dropped
        );
        assert!(ended.state.is_final(), "{ended:?}");
        assert_eq!(ended.packets + ended.dropped, received, "{ended:?}");
        assert_eq!(
            capfile::read(Path::new(&ended.output_file)).len() as u64,
            ended.packets
        );
    });
    rt.block_on(engine.shutdown(Duration::from_secs(10)));
}
