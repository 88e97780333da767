//! The capture engine against tcpdump, on real traffic between network
//! namespaces, on both backends: for every scenario our file must hold the
//! packets tcpdump captured with the equivalent expression, byte for byte.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use packet_capture_agent::capture::{
    BackendChoice, CaptureSpec, CaptureStatus, Engine, EngineConfig, SetTargetsError, StartError,
    StartRequest, TargetPod,
};
use packet_capture_agent::files::{CaptureDir, Compression};
use packet_capture_agent::filter::{selection_expression, through_vlans};
use packet_capture_common::abi::{MAX_SLOTS, host_bit_v4};
use packet_capture_common::crd::{CaptureState, OutputFormat, TargetDirection};
use packet_capture_common::validate::{CaptureLimits, parse_target};
use packet_capture_test_support::capfile::{self, Packet};
use packet_capture_test_support::frames::{self, ICMP, ICMP6, MAC_B, SCTP, SYN, Seeded, TCP, UDP};
use packet_capture_test_support::fs_events::Removal;
use packet_capture_test_support::netns::run;
use packet_capture_test_support::{Netns, Tcpdump, VethPair, privileged, unique_name};

const NODE_V4: &str = "10.99.0.1";
const PEER_V4: &str = "10.99.0.2";
const PEER_V6: &str = "fd99::2";
/// An address of the peer that no capture targets.
const OTHER_V4: &str = "10.98.0.2";

/// Two namespaces joined by a veth: the node (where the engine runs) and a
/// peer, each with IPv4 and IPv6 addresses.
struct Lab {
    node: Netns,
    peer: Netns,
    veth: VethPair,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        let node = Netns::new("pcn");
        let peer = Netns::new("pcp");
        let veth = VethPair::new(
            &node,
            &["10.99.0.1/24", "10.98.0.1/24", "fd99::1/64"],
            &peer,
            &["10.99.0.2/24", "10.98.0.2/24", "fd99::2/64"],
        );
        Self {
            node,
            peer,
            veth,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn captures(&self) -> PathBuf {
        self.dir.path().join("captures")
    }

    /// tcpdump on the node's veth with what `spec` selects and filters as
    /// its expression, writing a file of its own; and that expression.
    fn tcpdump_of(&self, spec: &CaptureSpec) -> (Tcpdump, String) {
        let expression =
            selection_expression(&spec.targets, &spec.ports, spec.direction, &spec.filter);
        let file = self.file(&format!("{}.pcap", unique_name("td")));
        let dump = Tcpdump::start(&self.node, &self.veth.a, &expression, spec.snaplen, &file);
        (dump, expression)
    }

    /// `ping` from the node.
    fn ping(&self, addr: &str, count: u32, size: u32) {
        run(self.node.command("ping").args([
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            "-s",
            &size.to_string(),
            addr,
        ]));
    }

    /// `count` pings from the node 10 ms apart, sent while the test goes
    /// on.
    fn ping_flood(&self, addr: &str, count: u32) -> std::process::Child {
        self.node
            .command("ping")
            .args(["-c", &count.to_string(), "-i", "0.01", "-W", "2", addr])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// A UDP datagram from the node to `addr:port` (nobody listens: the
    /// peer answers with ICMP port unreachable).
    fn udp(&self, addr: &str, port: u16) {
        let out = self
            .node
            .command("nc")
            .args(["-u", "-w", "1", "-q", "0", addr, &port.to_string()])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b"hello over udp\n")?;
                c.wait_with_output()
            })
            .expect("nc -u");
        assert!(
            out.status.success() || out.status.code() == Some(1),
            "{out:?}"
        );
    }

    /// A TCP connection from the node that the peer refuses (SYN, RST).
    fn tcp_refused(&self, addr: &str, port: u16) {
        let status = self
            .node
            .command("nc")
            .args(["-z", "-w", "2", addr, &port.to_string()])
            .status()
            .unwrap();
        assert!(!status.success(), "nothing listens on {addr}:{port}");
    }

    /// A whole TCP exchange: the peer listens, the node sends and closes.
    fn tcp_transfer(&self, addr: &str, port: u16) {
        let mut server = self
            .peer
            .command("nc")
            .args(["-l", "-N", &port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // The listener is up when a connection succeeds; retry until then.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut client = self
                .node
                .command("nc")
                .args(["-N", "-w", "2", addr, &port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                // A client that found no listener has exited: the write
                // fails, and the exit status below says to try again.
                let _ = client.stdin.take().unwrap().write_all(&[b'x'; 3000]);
            }
            if client.wait().unwrap().success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the peer never listened on {port}"
            );
        }
        server.wait().unwrap();
    }
}

/// Engine settings a scenario may change.
#[derive(Clone, Copy)]
struct Options {
    backend: BackendChoice,
    ring_bytes: u32,
    max_file_bytes: u64,
    max_running: usize,
    own_api: Option<std::net::SocketAddr>,
}

impl Options {
    fn with(backend: BackendChoice) -> Self {
        Self {
            backend,
            ring_bytes: 0,
            max_file_bytes: 64 << 20,
            max_running: MAX_SLOTS,
            own_api: None,
        }
    }
}

/// Runs `body` with an engine in the lab's node namespace, writing to
/// `<lab dir>/captures`.
fn with_engine(
    lab: &Lab,
    options: Options,
    body: impl FnOnce(&Engine, &tokio::runtime::Runtime) + Send,
) {
    let Options {
        backend,
        max_running,
        ring_bytes,
        max_file_bytes,
        own_api,
    } = options;
    // The engine's log, shown with a failing test's output: every thread
    // the test starts writes where the test's own output goes.
    static LOG: std::sync::Once = std::sync::Once::new();
    LOG.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_ansi(false)
            .with_env_filter("packet_capture_agent=info")
            .try_init();
    });
    std::thread::scope(|s| {
        s.spawn(|| {
            lab.node.enter();
            // Built after entering: the runtime's threads inherit the namespace.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let files =
                CaptureDir::new(lab.dir.path().join("captures"), 100, Compression::Gzip).unwrap();
            let engine = rt
                .block_on(Engine::start(EngineConfig {
                    node_name: "node-a".into(),
                    files: Arc::new(files),
                    max_file_bytes,
                    limits: CaptureLimits::default(),
                    max_running,
                    backend,
                    ring_bytes,
                    tc_attach: Default::default(),
                    kernel_filters: true,
                    own_api,
                }))
                .expect("engine starts");
            assert_eq!(
                engine.backend(),
                match backend {
                    BackendChoice::Pcap => "pcap",
                    _ => "ebpf",
                }
            );
            body(&engine, &rt);
            rt.block_on(engine.shutdown(Duration::from_secs(10)));
        })
        .join()
        .expect("engine thread");
    });
}

/// Waits until the engine follows `iface` (its programs attached there, or
/// its sockets opened), which it learns from netlink a moment after the
/// interface appears.
fn until_followed(engine: &Engine, iface: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !engine.interfaces().iter().any(|i| i == iface) {
        assert!(
            Instant::now() < deadline,
            "{iface} never attached: {:?}",
            engine.interfaces()
        );
        std::thread::yield_now();
    }
}

fn spec(targets: &[&str], ports: &[u16], filter: &str) -> CaptureSpec {
    CaptureSpec {
        targets: targets
            .iter()
            .map(|t| packet_capture_common::validate::parse_target(t).unwrap())
            .collect(),
        ports: ports.to_vec(),
        duration: Duration::from_secs(120),
        max_packets: 100_000,
        format: OutputFormat::Pcap,
        filter: filter.into(),
        snaplen: 262_144,
        direction: TargetDirection::Both,
        keep_copies: false,
        only_targets: false,
        pods: Vec::new(),
    }
}

fn start(engine: &Engine, spec: CaptureSpec) -> CaptureStatus {
    let id = unique_name("cap");
    engine
        .start_capture(StartRequest {
            id: id.clone(),
            name: id,
            spec,
        })
        .expect("capture starts")
}

fn stop(engine: &Engine, rt: &tokio::runtime::Runtime, id: &str) -> CaptureStatus {
    let status = rt
        .block_on(engine.stop_capture(id))
        .expect("capture exists");
    assert!(status.state.is_final(), "{status:?}");
    status
}

/// Sorted (length, bytes) of each packet: what two captures must share.
fn contents(packets: &[Packet]) -> Vec<(u32, Vec<u8>)> {
    let mut v: Vec<_> = packets
        .iter()
        .map(|p| (p.orig_len, p.data.clone()))
        .collect();
    v.sort();
    v
}

fn assert_same(ours: &[Packet], theirs: &[Packet], what: &str) {
    assert!(
        !theirs.is_empty(),
        "{what}: tcpdump saw nothing; the scenario sent nothing that matches"
    );
    assert_same_contents(&contents(ours), &contents(theirs), "tcpdump", what);
}

/// [`assert_same`] on [`contents`], which may be empty; `oracle` says whose
/// `b` is.
fn assert_same_contents(a: &[(u32, Vec<u8>)], b: &[(u32, Vec<u8>)], oracle: &str, what: &str) {
    if a != b {
        let describe = |set: &[(u32, Vec<u8>)], other: &[(u32, Vec<u8>)]| -> Vec<String> {
            set.iter()
                .filter(|p| !other.contains(p))
                .map(|(len, data)| {
                    let mut line = String::new();
                    let _ = packet_capture_agent::writer::describe(&mut line, data, *len);
                    line
                })
                .collect()
        };
        panic!(
            "{what}: we wrote {} packets, {oracle} {}\nonly in ours: {:#?}\nonly in {oracle}'s: {:#?}",
            a.len(),
            b.len(),
            describe(a, b),
            describe(b, a)
        );
    }
}

/// One scenario: tcpdump and a capture on the same traffic, compared.
fn compare(
    lab: &Lab,
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    spec: CaptureSpec,
    traffic: impl FnOnce(),
) {
    let expression = selection_expression(&spec.targets, &spec.ports, spec.direction, &spec.filter);
    compare_with(lab, engine, rt, spec, &expression, traffic);
}

/// [`compare`] with tcpdump running `expression`.
fn compare_with(
    lab: &Lab,
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    spec: CaptureSpec,
    expression: &str,
    traffic: impl FnOnce(),
) {
    let oracle = lab.file(&format!("{}.pcap", unique_name("td")));
    let dump = Tcpdump::start(&lab.node, &lab.veth.a, expression, spec.snaplen, &oracle);
    let status = start(engine, spec);
    traffic();
    let ended = stop(engine, rt, &status.id);
    let (theirs, counts) = dump.finish();
    assert_eq!(
        counts.dropped, 0,
        "tcpdump dropped packets; the comparison would be unfair"
    );
    let ours = capfile::read(Path::new(&ended.output_file));
    assert_same(&ours, &theirs, expression);
    assert_eq!(
        ended.packets as usize,
        ours.len(),
        "the status counts what the file holds"
    );
    assert_eq!(ended.dropped, 0);
    assert_eq!(
        capfile::tshark_count(Path::new(&ended.output_file)),
        ours.len()
    );
}

fn each_backend(test: &str, scenario: impl Fn(&Lab, &Engine, &tokio::runtime::Runtime) + Sync) {
    if !privileged(test) {
        return;
    }
    for backend in [BackendChoice::Ebpf, BackendChoice::Pcap] {
        let lab = Lab::new();
        with_engine(&lab, Options::with(backend), |engine, rt| {
            scenario(&lab, engine, rt)
        });
    }
}

#[test]
fn ip_targets_v4_and_v6() {
    each_backend("ip_targets_v4_and_v6", |lab, engine, rt| {
        compare(lab, engine, rt, spec(&[PEER_V4, PEER_V6], &[], ""), || {
            lab.ping(PEER_V4, 3, 56);
            lab.ping(PEER_V6, 3, 56);
            lab.ping(OTHER_V4, 2, 56);
            lab.udp(PEER_V4, 5353);
            lab.tcp_refused(PEER_V6, 8080);
            lab.tcp_transfer(PEER_V4, 9090);
        });
    });
}

/// The agent's own API connections (TCP to or from its address and port)
/// are left out of every capture, in the kernel: a capture of that address
/// gets all its other traffic, as tcpdump shows it without them.
#[test]
fn the_agents_own_api_is_never_captured() {
    let test = "the_agents_own_api_is_never_captured";
    if !privileged(test) {
        return;
    }
    let api: std::net::SocketAddr = format!("{PEER_V4}:9191").parse().unwrap();
    for backend in [BackendChoice::Ebpf, BackendChoice::Pcap] {
        let lab = Lab::new();
        let options = Options {
            own_api: Some(api),
            ..Options::with(backend)
        };
        with_engine(&lab, options, |engine, rt| {
            let spec = spec(&[PEER_V4], &[], "");
            let selection = selection_expression(&spec.targets, &spec.ports, spec.direction, "");
            let expression = packet_capture_agent::filter::without_own_api(&selection, api);
            compare_with(&lab, engine, rt, spec, &expression, || {
                lab.tcp_transfer(PEER_V4, 9191);
                lab.tcp_transfer(PEER_V4, 9090);
                lab.ping(PEER_V4, 2, 56);
            });
        });
    }
}

#[test]
fn cidr_targets() {
    each_backend("cidr_targets", |lab, engine, rt| {
        compare(
            lab,
            engine,
            rt,
            spec(&["10.99.0.0/24", "fd99::/64"], &[], ""),
            || {
                lab.ping(PEER_V4, 2, 56);
                lab.ping(OTHER_V4, 2, 56);
                lab.ping(PEER_V6, 2, 56);
            },
        );
    });
}

#[test]
fn port_targets() {
    each_backend("port_targets", |lab, engine, rt| {
        compare(lab, engine, rt, spec(&[], &[8080, 53], ""), || {
            lab.tcp_refused(PEER_V4, 8080);
            lab.tcp_refused(PEER_V4, 8081);
            lab.udp(PEER_V4, 53);
            lab.udp(PEER_V6, 54);
            lab.ping(PEER_V4, 2, 56);
        });
    });
}

#[test]
fn custom_filter_combined_with_targets_and_ports() {
    each_backend(
        "custom_filter_combined_with_targets_and_ports",
        |lab, engine, rt| {
            compare(
                lab,
                engine,
                rt,
                spec(&[PEER_V4], &[8080, 9090], "tcp"),
                || {
                    lab.tcp_refused(PEER_V4, 8080);
                    lab.udp(PEER_V4, 8080);
                    lab.tcp_transfer(PEER_V4, 9090);
                    lab.tcp_refused(OTHER_V4, 8080);
                    lab.ping(PEER_V4, 2, 56);
                },
            );
            compare(
                lab,
                engine,
                rt,
                spec(&[PEER_V4, PEER_V6], &[], "icmp or icmp6"),
                || {
                    lab.ping(PEER_V4, 2, 56);
                    lab.ping(PEER_V6, 2, 56);
                    lab.udp(PEER_V4, 7);
                },
            );
        },
    );
}

/// On the eBPF backend a capture's filter runs in the kernel: what it
/// rejects is counted there and never reaches user space (the libpcap
/// backend runs it on what its sockets read). Either way the file is what
/// tcpdump writes with the same expression, the rejected packets are
/// counted, and the status says where the filter ran.
#[test]
fn filters_run_in_the_kernel() {
    each_backend("filters_run_in_the_kernel", |lab, engine, rt| {
        let s = spec(&[PEER_V4], &[], "udp and greater 1000");
        let filtered = selection_expression(&s.targets, &s.ports, s.direction, &s.filter);
        let selected = selection_expression(&s.targets, &s.ports, s.direction, "");
        let dumps = [&filtered, &selected].map(|expression| {
            let file = lab.file(&format!("{}.pcap", unique_name("td")));
            Tcpdump::start(&lab.node, &lab.veth.a, expression, s.snaplen, &file)
        });
        let status = start(engine, s);
        // Fewer than the libpcap backend's socket ring holds at once (its
        // frames are sized for 64 KiB offloaded packets: 2 MiB holds about
        // 30), so a busy machine cannot make it drop some.
        flood(&lab.node, PEER_V4, 7000, 20);
        lab.ping(PEER_V4, 3, 1400);
        lab.udp(PEER_V4, 7001);
        let ended = stop(engine, rt, &status.id);
        let [kept, all] = dumps.map(|d| {
            let (packets, counts) = d.finish();
            assert_eq!(counts.dropped, 0, "tcpdump dropped packets");
            packets
        });
        let ours = capfile::read(Path::new(&ended.output_file));
        assert_same(&ours, &kept, &filtered);
        assert!(ours.len() >= 20, "{} packets", ours.len());
        assert_eq!(ended.filtered as usize, all.len() - kept.len(), "{ended:?}");
        if engine.backend() == "ebpf" {
            assert_eq!(ended.filter_path, "kernel");
            assert_eq!(ended.filtered_in_kernel, ended.filtered, "{ended:?}");
        } else {
            assert!(ended.filter_path.starts_with("user space ("), "{ended:?}");
            assert_eq!(ended.filtered_in_kernel, 0);
        }
        let unfiltered = start(engine, spec(&[PEER_V4], &[], ""));
        assert_eq!(unfiltered.filter_path, "", "no filter, no path");
        stop(engine, rt, &unfiltered.id);
    });
}

/// Captures of the same address with different filters at once: on the
/// eBPF backend their filters run one after another on each packet, and
/// a packet one rejects still reaches those that keep it, whether the
/// rejecting one runs first or last, and one that every filter rejects is
/// counted by each. Each file is what tcpdump writes with that capture's
/// expression, and each capture counts what its own filter rejected.
#[test]
fn filters_of_captures_of_the_same_packets_each_decide_for_their_own() {
    each_backend(
        "filters_of_captures_of_the_same_packets_each_decide_for_their_own",
        |lab, engine, rt| {
            let (everything, _) = lab.tcpdump_of(&spec(&[PEER_V4], &[], ""));
            let mut captures = Vec::new();
            for filter in [
                "udp and greater 1000",
                "icmp and greater 1000",
                "udp",
                "tcp",
            ] {
                let s = spec(&[PEER_V4], &[], filter);
                let (dump, expression) = lab.tcpdump_of(&s);
                captures.push((dump, start(engine, s).id, expression));
            }
            flood(&lab.node, PEER_V4, 7000, 10);
            lab.ping(PEER_V4, 3, 1400);
            lab.udp(PEER_V4, 7001);
            lab.tcp_refused(PEER_V4, 8080);
            // Rejected by every filter.
            lab.ping(PEER_V4, 2, 56);
            let (all, _) = everything.finish();
            for (dump, id, expression) in captures {
                let ended = stop(engine, rt, &id);
                let (theirs, counts) = dump.finish();
                assert_eq!(counts.dropped, 0, "tcpdump dropped packets");
                let ours = capfile::read(Path::new(&ended.output_file));
                assert_same(&ours, &theirs, &expression);
                assert_eq!(
                    ended.filtered as usize,
                    all.len() - theirs.len(),
                    "{ended:?}"
                );
                if engine.backend() == "ebpf" {
                    assert_eq!(ended.filter_path, "kernel");
                }
            }
        },
    );
}

/// More captures with a filter on the same packets than the kernel's tail
/// calls allow filters for (each costs two of 33): the first 16 filter in
/// the kernel, the others in user space, and every capture gets every
/// packet its filter keeps.
#[test]
fn more_filtered_captures_of_a_packet_than_tail_calls_lose_nothing() {
    each_backend(
        "more_filtered_captures_of_a_packet_than_tail_calls_lose_nothing",
        |lab, engine, rt| {
            let s = spec(&[PEER_V4], &[], "udp or icmp");
            let (dump, expression) = lab.tcpdump_of(&s);
            let ids: Vec<String> = (0..20).map(|_| start(engine, s.clone()).id).collect();
            lab.udp(PEER_V4, 7001);
            lab.ping(PEER_V4, 3, 56);
            lab.tcp_refused(PEER_V4, 8080);
            let (theirs, counts) = dump.finish();
            assert_eq!(counts.dropped, 0, "tcpdump dropped packets");
            assert!(!theirs.is_empty());
            for id in ids {
                let ended = stop(engine, rt, &id);
                assert_eq!(ended.dropped, 0, "{ended:?}");
                let ours = capfile::read(Path::new(&ended.output_file));
                assert_same(&ours, &theirs, &expression);
            }
        },
    );
}

/// Three captures of the same targets at once, one per direction: each
/// gets what tcpdump's `host`, `dst host` or `src host` gets (ARP too), and
/// the directions split the packets between them.
#[test]
fn direction_keeps_packets_to_or_from_the_targets() {
    each_backend(
        "direction_keeps_packets_to_or_from_the_targets",
        |lab, engine, rt| {
            let mut dumps = Vec::new();
            for direction in TargetDirection::ALL {
                let s = CaptureSpec {
                    direction,
                    ..spec(&[PEER_V4, PEER_V6], &[], "")
                };
                let (dump, expression) = lab.tcpdump_of(&s);
                dumps.push((dump, start(engine, s).id, expression));
            }
            lab.ping(PEER_V4, 3, 56);
            lab.ping(PEER_V6, 2, 56);
            lab.ping(OTHER_V4, 2, 56);
            lab.udp(PEER_V4, 5353);
            lab.tcp_transfer(PEER_V4, 9090);
            let mut counts = Vec::new();
            for (dump, id, expression) in dumps {
                let ended = stop(engine, rt, &id);
                let (theirs, _) = dump.finish();
                let ours = capfile::read(Path::new(&ended.output_file));
                assert_same(&ours, &theirs, &expression);
                counts.push(ours.len());
            }
            let [both, ingress, egress] = counts[..] else {
                unreachable!()
            };
            assert!(ingress > 0 && egress > 0, "{counts:?}");
            assert_eq!(both, ingress + egress, "{counts:?}");
        },
    );
}

/// ICMP echo requests per destination and replies per source, of the
/// IPv4 frames in `packets`.
fn echoes(packets: &[Packet]) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let (mut requests, mut replies) = (HashMap::new(), HashMap::new());
    for p in packets {
        let d = &p.data;
        // Ethernet, IPv4 without options, ICMP.
        if d.len() < 35 || d[12..14] != [0x08, 0x00] || d[14] != 0x45 || d[23] != 1 {
            continue;
        }
        let addr = |at: usize| std::net::Ipv4Addr::new(d[at], d[at + 1], d[at + 2], d[at + 3]);
        match d[34] {
            8 => *requests.entry(addr(30).to_string()).or_default() += 1,
            0 => *replies.entry(addr(26).to_string()).or_default() += 1,
            _ => {}
        }
    }
    (requests, replies)
}

/// A capture's targets change while it runs: each address is captured
/// exactly while it is a target, a target kept across the changes loses
/// nothing (a ping flood to it runs through them), and no target at all
/// selects nothing.
#[test]
fn targets_change_in_place_without_a_gap() {
    each_backend(
        "targets_change_in_place_without_a_gap",
        |lab, engine, rt| {
            let id = start(engine, spec(&[PEER_V4], &[], "")).id;
            let set = |targets: &[&str]| {
                let nets = targets.iter().map(|t| parse_target(t).unwrap()).collect();
                let status = engine
                    .set_targets(&id, nets, Vec::new())
                    .expect("targets set");
                assert!(status.spec.only_targets, "{status:?}");
            };
            let mut flood = lab.ping_flood(PEER_V4, 300);
            lab.ping(OTHER_V4, 2, 56);
            set(&[PEER_V4, OTHER_V4]);
            lab.ping(OTHER_V4, 3, 56);
            set(&[PEER_V4]);
            lab.ping(OTHER_V4, 4, 56);
            assert!(flood.wait().unwrap().success(), "the flood went unanswered");
            set(&[]);
            lab.ping(PEER_V4, 2, 56);
            lab.ping(OTHER_V4, 2, 56);
            let ended = stop(engine, rt, &id);
            let (requests, replies) = echoes(&capfile::read(Path::new(&ended.output_file)));
            let want: HashMap<String, usize> =
                [(PEER_V4.to_string(), 300), (OTHER_V4.to_string(), 3)].into();
            assert_eq!((requests, replies), (want.clone(), want), "{ended:?}");
            let after = engine.set_targets(&id, Vec::new(), Vec::new());
            assert!(
                matches!(after, Err(SetTargetsError::Ended)),
                "an ended capture keeps its targets: {after:?}"
            );
        },
    );
}

/// Changes of targets, one after another, while a capture reaches its
/// packet limit: each is applied or refused as ended (none applied to a
/// capture that has ended, none failed otherwise), and the capture ends
/// with exactly its limit.
#[test]
fn a_change_of_targets_racing_the_captures_end_is_refused_as_ended() {
    each_backend(
        "a_change_of_targets_racing_the_captures_end_is_refused_as_ended",
        |lab, engine, rt| {
            let mut s = spec(&[PEER_V4], &[], "icmp");
            s.max_packets = 20;
            let id = start(engine, s).id;
            let targets = vec![parse_target(PEER_V4).unwrap()];
            let mut flood = lab.ping_flood(PEER_V4, 100);
            let refused = loop {
                if let Err(e) = engine.set_targets(&id, targets.clone(), Vec::new()) {
                    break e;
                }
            };
            assert!(flood.wait().unwrap().success(), "the flood went unanswered");
            assert!(
                matches!(refused, SetTargetsError::Ended),
                "a change racing the end: {refused:?}"
            );
            let ended = ended(engine, rt, &id);
            assert_eq!(ended.message, "reached maxPackets (20)", "{ended:?}");
            assert_eq!(capfile::read(Path::new(&ended.output_file)).len(), 20);
        },
    );
}

#[test]
fn overlapping_captures_each_get_their_packets() {
    each_backend(
        "overlapping_captures_each_get_their_packets",
        |lab, engine, rt| {
            let by_host = spec(&[PEER_V4], &[], "");
            let by_port = spec(&[], &[8080], "");
            let mut dumps = Vec::new();
            let mut ids = Vec::new();
            for s in [by_host, by_port] {
                dumps.push(lab.tcpdump_of(&s).0);
                ids.push(start(engine, s).id);
            }
            lab.tcp_refused(PEER_V4, 8080);
            lab.tcp_refused(PEER_V6, 8080);
            lab.ping(PEER_V4, 3, 56);
            for (dump, id) in dumps.into_iter().zip(ids) {
                let ended = stop(engine, rt, &id);
                let (theirs, _) = dump.finish();
                assert_same(&capfile::read(Path::new(&ended.output_file)), &theirs, &id);
            }
        },
    );
}

/// Two targeted addresses whose host bit is the same: the programs' host
/// table holds one of them, the other is found in the hash map, and when
/// the first capture ends the table holds the second while the first
/// address, no longer targeted, still shares its bit.
#[test]
fn addresses_sharing_a_host_bit_each_get_their_packets() {
    each_backend(
        "addresses_sharing_a_host_bit_each_get_their_packets",
        |lab, engine, rt| {
            // Addresses that differ in their last byte only never share a
            // bit: the second is in another /24, routed to the peer.
            let first = std::net::Ipv4Addr::new(10, 99, 0, 3);
            let second = (256..u32::from(u16::MAX))
                .map(|i| std::net::Ipv4Addr::from(u32::from(first) & 0xffff_0000 | i))
                .find(|a| host_bit_v4(a.octets()) == host_bit_v4(first.octets()))
                .expect("an address of 10.99.0.0/16 shares the bit of 10.99.0.3");
            let (first, second) = (first.to_string(), second.to_string());
            for addr in [&first, &second] {
                run(lab.peer.command("ip").args([
                    "addr",
                    "add",
                    &format!("{addr}/32"),
                    "dev",
                    &lab.veth.b,
                ]));
            }
            run(lab.node.command("ip").args([
                "route",
                "add",
                &format!("{second}/32"),
                "dev",
                &lab.veth.a,
            ]));
            let (dump_first, _) = lab.tcpdump_of(&spec(&[&first], &[], ""));
            let (dump_second, _) = lab.tcpdump_of(&spec(&[&second], &[], ""));
            let id_first = start(engine, spec(&[&first], &[], "")).id;
            let id_second = start(engine, spec(&[&second], &[], "")).id;
            lab.ping(&first, 3, 56);
            lab.ping(&second, 3, 56);
            lab.ping(PEER_V4, 2, 56);
            let ended = stop(engine, rt, &id_first);
            let (theirs, _) = dump_first.finish();
            assert_same(
                &capfile::read(Path::new(&ended.output_file)),
                &theirs,
                &first,
            );
            lab.ping(&first, 2, 56);
            lab.ping(&second, 3, 100);
            let ended = stop(engine, rt, &id_second);
            let (theirs, _) = dump_second.finish();
            assert!(theirs.len() >= 12, "tcpdump has all 6 echoes of {second}");
            assert_same(
                &capfile::read(Path::new(&ended.output_file)),
                &theirs,
                &second,
            );
        },
    );
}

#[test]
fn interfaces_created_after_start_are_captured() {
    each_backend(
        "interfaces_created_after_start_are_captured",
        |lab, engine, rt| {
            // The eBPF programs go on an interface that comes while a
            // capture runs before the interface is listed: a capture
            // already running gets all of its packets too. (libpcap's
            // sockets open on the capture's own thread, a moment later.)
            let running =
                (engine.backend() == "ebpf").then(|| start(engine, spec(&["10.97.0.2"], &[], "")));
            let late = VethPair::new(&lab.node, &["10.97.0.1/24"], &lab.peer, &["10.97.0.2/24"]);
            until_followed(engine, &late.a);
            let file = lab.file("late.pcap");
            let dump = Tcpdump::start(&lab.node, &late.a, "host 10.97.0.2", 262_144, &file);
            let status = start(engine, spec(&["10.97.0.2"], &[], ""));
            lab.ping("10.97.0.2", 3, 56);
            let ended = stop(engine, rt, &status.id);
            let running = running.map(|status| stop(engine, rt, &status.id));
            let (theirs, _) = dump.finish();
            assert_same(
                &capfile::read(Path::new(&ended.output_file)),
                &theirs,
                "late interface",
            );
            if let Some(ended) = running {
                assert_same(
                    &capfile::read(Path::new(&ended.output_file)),
                    &theirs,
                    "a capture running when the interface came",
                );
            }
            // And when it goes, the engine lets go of it.
            run(Command::new("ip").args(["-n", lab.node.name(), "link", "del", &late.a]));
            let deadline = Instant::now() + Duration::from_secs(10);
            while engine.interfaces().contains(&late.a) {
                assert!(Instant::now() < deadline, "{} still listed", late.a);
                std::thread::yield_now();
            }
        },
    );
}

#[test]
fn max_packets_is_exact() {
    each_backend("max_packets_is_exact", |lab, engine, rt| {
        let mut s = spec(&[PEER_V4], &[], "icmp");
        s.max_packets = 5;
        let status = start(engine, s);
        lab.ping(PEER_V4, 6, 56);
        let mut rx = engine.watch(&status.id).unwrap();
        let ended = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.state.is_final()))
                    .await
                    .map(|r| r.map(|s| s.clone()))
            })
            .expect("ends by itself")
            .unwrap();
        assert_eq!(ended.state, CaptureState::Completed, "{ended:?}");
        assert_eq!(ended.message, "reached maxPackets (5)");
        assert_eq!(ended.packets, 5);
        assert_eq!(capfile::read(Path::new(&ended.output_file)).len(), 5);
    });
}

/// Captures whose packet limit fills while they start (a limit of one on
/// a flooded address): each still ends as completed, with its one packet,
/// also when the programs the last one detached are still on the hooks.
#[test]
fn a_limit_filled_while_the_capture_starts_ends_it() {
    each_backend(
        "a_limit_filled_while_the_capture_starts_ends_it",
        |lab, engine, rt| {
            let sending = AtomicBool::new(true);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    lab.node.enter();
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    while sending.load(Ordering::Relaxed) {
                        let _ = socket.send_to(&[0x5a; 64], (PEER_V4, 7000));
                    }
                });
                // Children forked all the while: each holds the file of a
                // TCX link the engine detaches until its exec, so the next
                // capture's attach finds the programs still on the hooks.
                scope.spawn(|| {
                    while sending.load(Ordering::Relaxed) {
                        let _ = std::process::Command::new("true").status();
                    }
                });
                let starts = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    for _ in 0..50 {
                        let mut s = spec(&[PEER_V4], &[], "");
                        s.max_packets = 1;
                        let id = start(engine, s).id;
                        let status = ended(engine, rt, &id);
                        assert_eq!(
                            (status.state, status.packets),
                            (CaptureState::Completed, 1),
                            "{status:?}"
                        );
                    }
                }));
                sending.store(false, Ordering::Relaxed);
                if let Err(panic) = starts {
                    std::panic::resume_unwind(panic);
                }
            });
        },
    );
}

#[test]
fn duration_ends_the_capture_on_time() {
    each_backend("duration_ends_the_capture_on_time", |_lab, engine, rt| {
        let mut s = spec(&[PEER_V4], &[], "");
        s.duration = Duration::from_secs(1);
        let status = start(engine, s);
        let mut rx = engine.watch(&status.id).unwrap();
        let ended = rt
            .block_on(async { rx.wait_for(|s| s.state.is_final()).await.map(|s| s.clone()) })
            .unwrap();
        // From the capture's own start: what a loaded machine takes to
        // set it up comes before it.
        let took = ended
            .end_time
            .expect("an end time")
            .duration_since(status.start_time)
            .unwrap();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(2),
            "took {took:?}"
        );
        assert_eq!(ended.state, CaptureState::Completed);
        assert_eq!(ended.message, "duration of 1s elapsed");
        assert_eq!(capfile::tshark_count(Path::new(&ended.output_file)), 0);
    });
}

#[test]
fn packets_larger_than_snaplen_are_cut() {
    each_backend("packets_larger_than_snaplen_are_cut", |lab, engine, rt| {
        let mut s = spec(&[PEER_V4], &[], "");
        s.snaplen = 96;
        compare(lab, engine, rt, s, || lab.ping(PEER_V4, 3, 1200));
    });
}

#[test]
fn pcapng_and_text_files() {
    each_backend("pcapng_and_text_files", |lab, engine, rt| {
        let mut ng = spec(&[PEER_V4], &[], "icmp");
        ng.format = OutputFormat::Pcapng;
        // The peer, as a target pod: the node's end of the veth is its.
        ng.pods = vec![TargetPod {
            name: "lab/peer".into(),
            ips: vec![PEER_V4.parse().unwrap()],
        }];
        let mut text = spec(&[PEER_V4], &[], "icmp");
        text.format = OutputFormat::Text;
        let ng = start(engine, ng);
        let text = start(engine, text);
        lab.ping(PEER_V4, 3, 56);
        let ng = stop(engine, rt, &ng.id);
        let text = stop(engine, rt, &text.id);

        let packets = capfile::read(Path::new(&ng.output_file));
        assert_eq!(packets.len(), 6);
        assert_eq!(capfile::tshark_count(Path::new(&ng.output_file)), 6);
        assert!(
            packets.iter().all(|p| p.interface == lab.veth.a),
            "interface names"
        );
        let out = packets.iter().filter(|p| p.direction == 2).count();
        let inbound = packets.iter().filter(|p| p.direction == 1).count();
        assert_eq!(
            (out, inbound),
            (3, 3),
            "three requests out, three replies in"
        );
        // And as tshark reads the interface blocks and epb_flags.
        let rows = tshark_fields(
            Path::new(&ng.output_file),
            &["frame.interface_name", "frame.packet_flags_direction"],
        );
        let mut directions: Vec<u64> = rows
            .iter()
            .map(|row| {
                assert_eq!(row[0], [lab.veth.a.as_str()], "{rows:?}");
                number(&row[1][0])
            })
            .collect();
        directions.sort();
        assert_eq!(directions, [1, 1, 1, 2, 2, 2], "inbound 1, outbound 2");
        // Each interface is described with its node and, the veth whose
        // other end holds a target pod's address, with the pod; the section
        // says what the capture is.
        let rows = tshark_fields(Path::new(&ng.output_file), &["frame.interface_description"]);
        assert!(
            rows.iter()
                .all(|row| row[0] == ["pod lab/peer on node node-a"]),
            "{rows:?}"
        );
        // (The file may have been compressed meanwhile.)
        let plain = lab.file("plain.pcapng");
        std::fs::write(&plain, capfile::bytes(Path::new(&ng.output_file))).unwrap();
        let info = run(Command::new("capinfos").args(["-k", "-a"]).arg(&plain));
        let info = String::from_utf8_lossy(&info.stdout);
        let comment = format!(
            "capture {} on node node-a by packet-capture {}; filter: icmp; \
             selects: (host {PEER_V4}) and (icmp)",
            ng.name,
            env!("CARGO_PKG_VERSION")
        );
        assert!(info.contains(&comment), "{info}");

        let lines = String::from_utf8(capfile::bytes(Path::new(&text.output_file))).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(
            lines[0].contains(&format!(
                " {} Out IP {NODE_V4} > {PEER_V4}: ICMP echo request",
                lab.veth.a
            )),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(" In  IP 10.99.0.2 > 10.99.0.1: ICMP echo reply"),
            "{}",
            lines[1]
        );
    });
}

#[test]
fn the_status_names_the_file_as_it_is_on_disk_after_compression() {
    each_backend(
        "the_status_names_the_file_as_it_is_on_disk_after_compression",
        |lab, engine, rt| {
            let first = start(engine, spec(&[PEER_V4], &[], "icmp"));
            lab.ping(PEER_V4, 2, 56);
            let first = stop(engine, rt, &first.id);
            assert!(first.output_file.ends_with(".pcap"), "{first:?}");
            // Maintenance keeps the newest file plain: once a second capture
            // has ended, the first one is compressed, and the plain one
            // removed.
            let plain = Removal::watch(Path::new(&first.output_file)).unwrap();
            let second = start(engine, spec(&[PEER_V4], &[], "icmp"));
            stop(engine, rt, &second.id);
            assert!(
                plain.within(Duration::from_secs(20)).unwrap(),
                "never compressed: {:?}",
                engine.get(&first.id)
            );
            let now = engine.get(&first.id).expect("the capture is kept");
            assert_eq!(now.output_file, format!("{}.gz", first.output_file));
            assert!(!Path::new(&first.output_file).exists());
            let on_disk = std::fs::metadata(&now.output_file).unwrap().len();
            assert_eq!(now.file_size, on_disk, "the compressed size");
            assert_ne!(now.file_size, first.file_size);
            assert_eq!(
                capfile::read(Path::new(&now.output_file)).len() as u64,
                first.packets
            );
            let listed = engine.list("");
            let listed = listed.iter().find(|s| s.id == first.id).unwrap();
            assert_eq!(
                (&listed.output_file, listed.file_size),
                (&now.output_file, on_disk)
            );
        },
    );
}

#[test]
fn ebpf_slots_come_back_however_captures_end() {
    if !privileged("ebpf_slots_come_back_however_captures_end") {
        return;
    }
    let lab = Lab::new();
    // Above the slots, so that the backend is what refuses.
    let options = Options {
        max_running: MAX_SLOTS + 1,
        ..Options::with(BackendChoice::Ebpf)
    };
    with_engine(&lab, options, |engine, rt| {
        let fill = || -> Vec<String> {
            (0..MAX_SLOTS)
                .map(|_| start(engine, spec(&[OTHER_V4], &[], "")).id)
                .collect()
        };
        let refused = || {
            let id = unique_name("cap");
            let err = engine
                .start_capture(StartRequest {
                    id: id.clone(),
                    name: id,
                    spec: spec(&[OTHER_V4], &[], ""),
                })
                .expect_err("every slot is held");
            assert!(
                matches!(&err, StartError::Full(m) if m.contains("captures already")),
                "{err:?}"
            );
        };
        let held = fill();
        refused();
        // Stopped captures give their slots back.
        for id in &held {
            stop(engine, rt, id);
        }
        // So does one that ends by itself.
        let mut s = spec(&[PEER_V4], &[], "icmp");
        s.max_packets = 1;
        let own = start(engine, s);
        lab.ping(PEER_V4, 1, 56);
        assert_eq!(ended(engine, rt, &own.id).state, CaptureState::Completed);
        let held = fill();
        refused();
        for id in &held {
            stop(engine, rt, id);
        }
    });
}

#[test]
fn a_shutdown_ends_every_capture_started_before_it_and_refuses_the_rest() {
    each_backend(
        "a_shutdown_ends_every_capture_started_before_it_and_refuses_the_rest",
        |_, engine, rt| {
            let try_start = || {
                let id = unique_name("cap");
                engine.start_capture(StartRequest {
                    id: id.clone(),
                    name: id,
                    spec: spec(&[OTHER_V4], &[], ""),
                })
            };
            // Starts race the shutdown: each one accepted must be ended by
            // it, and once one is refused for it, all are.
            let accepted = std::thread::scope(|s| {
                let starter = s.spawn(|| {
                    let mut accepted = Vec::new();
                    loop {
                        match try_start() {
                            Ok(status) => accepted.push(status.id),
                            Err(StartError::Unavailable(m))
                                if m == "the agent is shutting down" =>
                            {
                                break accepted;
                            }
                            // Every slot is held: the next try waits for
                            // the shutdown.
                            Err(StartError::Full(_) | StartError::Unavailable(_)) => {
                                std::thread::yield_now()
                            }
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                });
                while engine.list("").is_empty() {
                    std::thread::yield_now();
                }
                rt.block_on(engine.shutdown(Duration::from_secs(10)));
                starter.join().expect("the starting thread")
            });
            assert!(!accepted.is_empty());
            for id in &accepted {
                let status = engine
                    .watch(id)
                    .expect("the capture is known")
                    .borrow()
                    .clone();
                assert_eq!(
                    (status.state, status.message.as_str()),
                    (CaptureState::Stopped, "stopped: the agent is shutting down"),
                    "{id}"
                );
            }
            let refused = try_start().expect_err("the engine has shut down");
            assert!(
                matches!(&refused, StartError::Unavailable(m) if m == "the agent is shutting down"),
                "{refused:?}"
            );
        },
    );
}

#[test]
fn ring_buffer_losses_are_counted_exactly() {
    if !privileged("ring_buffer_losses_are_counted_exactly") {
        return;
    }
    let lab = Lab::new();
    // A ring of two pages holds a handful of full-size packets: a burst must
    // overflow it, and every packet that did not fit must be counted.
    let options = Options {
        ring_bytes: 8192,
        ..Options::with(BackendChoice::Ebpf)
    };
    with_engine(&lab, options, |engine, rt| {
        // One capture's losses are counted by slot, those of packets that
        // several captures wanted by the captures' mask: both, in turn.
        let by_host = spec(&[PEER_V4], &[7777], "udp and dst port 7777");
        let by_port = spec(&[], &[7777], "udp");
        for specs in [vec![by_host.clone()], vec![by_host, by_port]] {
            // A snaplen that fits the datagrams keeps tcpdump's ring blocks
            // small, so tcpdump itself keeps up on a busy machine.
            let expression = "udp and dst port 7777";
            let oracle = lab.file(&format!("{}.pcap", unique_name("flood")));
            let dump = Tcpdump::start(&lab.node, &lab.veth.a, expression, 1514, &oracle);
            let ids: Vec<String> = specs
                .into_iter()
                .map(|mut s| {
                    s.snaplen = 1514;
                    start(engine, s).id
                })
                .collect();
            flood(&lab.peer, NODE_V4, 7777, 5_000);
            let ended: Vec<CaptureStatus> = ids.iter().map(|id| stop(engine, rt, id)).collect();
            let (theirs, counts) = dump.finish();
            assert_eq!(counts.dropped, 0, "tcpdump must see every packet");
            assert_eq!(theirs.len(), 5_000);
            for ended in &ended {
                let ours = capfile::read(Path::new(&ended.output_file));
                assert_eq!(ended.packets as usize, ours.len());
                assert!(
                    ended.dropped > 0,
                    "the ring never overflowed; the test proves nothing"
                );
                assert_eq!(
                    ended.dropped as usize,
                    theirs.len() - ours.len(),
                    "{}: dropped must be what tcpdump saw minus what we wrote",
                    ended.id
                );
            }
        }
    });
}

/// Sends `count` UDP datagrams of 1200 bytes as fast as one socket can.
fn flood(from: &Netns, to: &str, port: u16, count: usize) {
    std::thread::scope(|s| {
        s.spawn(|| {
            from.enter();
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let payload = [0x5a_u8; 1200];
            for _ in 0..count {
                // A full socket buffer only delays us; every datagram goes.
                while socket.send_to(&payload, (to, port)).is_err() {}
            }
        });
    });
}

/// Waits for a capture to end by itself.
fn ended(engine: &Engine, rt: &tokio::runtime::Runtime, id: &str) -> CaptureStatus {
    let mut rx = engine.watch(id).unwrap();
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.state.is_final()))
            .await
            .map(|s| s.map(|s| s.clone()).unwrap())
    });
    ended.unwrap_or_else(|_| {
        panic!(
            "the {} capture did not end by itself within 20 s: {:?}; interfaces {:?}",
            engine.backend(),
            engine.get(id),
            engine.interfaces()
        )
    })
}

#[test]
fn vlan_tags_are_kept_as_libpcap_shows_them() {
    each_backend(
        "vlan_tags_are_kept_as_libpcap_shows_them",
        |lab, engine, rt| {
            // The kernel takes the outer tag off received frames before TC sees
            // them; the capture must put it back, and find IP behind the rest.
            for (target, tags, expression) in [
                (
                    "10.96.0.2",
                    &[(0x8100, 100)][..],
                    "vlan 100 and host 10.96.0.2",
                ),
                (
                    "10.95.0.2",
                    &[(0x88a8, 200), (0x8100, 300)][..],
                    "vlan 200 and vlan 300 and host 10.95.0.2",
                ),
            ] {
                let oracle = lab.file(&format!("{}.pcap", unique_name("td")));
                let dump = Tcpdump::start(&lab.node, &lab.veth.a, expression, 262_144, &oracle);
                let status = start(engine, spec(&[target], &[], ""));
                let frame = tagged_udp(tags, target.parse().unwrap(), "10.0.0.1".parse().unwrap());
                send_frames(&lab.peer, &lab.veth.b, std::iter::repeat_n(&frame[..], 5));
                let ended = stop(engine, rt, &status.id);
                let (theirs, _) = dump.finish();
                assert_eq!(theirs.len(), 5, "{expression}");
                assert_same(
                    &capfile::read(Path::new(&ended.output_file)),
                    &theirs,
                    expression,
                );
            }
        },
    );
}

/// Targets, ports and directions select what libpcap's expression for them
/// selects (through VLAN tags) on frames made to probe the parser: TCP, UDP
/// and SCTP between the lab's and other addresses, ICMP, GRE, IPv4
/// options, first and later fragments, IPv6 fragment headers, 802.1Q and
/// 802.1ad tags, ARP and RARP, version and header-length fields that lie,
/// padding, and frames cut short inside each header (a frame cut after its
/// source address or port matches by it, as libpcap's `host` and `port`
/// test the source first), sent into the node and out of it, and their IP
/// packets into a tun (no link header). 32 random captures from a fixed
/// seed, eight at a time, in pcap, pcapng and text, keeping copies or not,
/// each compared with `pcap_offline_filter` on the frames sent, target by
/// target and port by port (text: a line for each), and the files read by
/// tshark.
/// On eBPF only: the libpcap backend selects with libpcap itself, and its
/// sockets' rings have room for few frames on interfaces with offloads
/// (libpcap gives each frame 64 KiB there), fewer than this burst of 318
/// (it counts what it drops).
#[test]
fn crafted_frames_are_selected_as_libpcap_selects_them() {
    if !privileged("crafted_frames_are_selected_as_libpcap_selects_them") {
        return;
    }
    let lab = Lab::new();
    with_engine(&lab, Options::with(BackendChoice::Ebpf), |engine, rt| {
        let tun = open_tun(&lab.node, "pcprobe0");
        // What arrives on the tun goes no further than the hooks, so that
        // the node answers none of it (it would, to its own addresses): no
        // IPv6 there, and IPv4 only from where the node's routes lead back
        // through it, which is nowhere.
        for setting in [
            "net.ipv6.conf.pcprobe0.disable_ipv6=1",
            "net.ipv4.conf.pcprobe0.rp_filter=1",
        ] {
            run(lab.node.command("sysctl").args(["-q", "-w", setting]));
        }
        until_followed(engine, "pcprobe0");
        let mut n = Seeded(0x5eed_cafe);
        let mut expected_some = 0;
        for round in 0..4 {
            let probing = probing_frames(&mut n);
            let specs: Vec<CaptureSpec> = (0..8).map(|_| probing_spec(&mut n)).collect();
            let started: Vec<CaptureStatus> =
                specs.iter().map(|s| start(engine, s.clone())).collect();
            // Into the node (its ingress hook), out of it (egress), again
            // in, and into a tun (no link header: the frames as the capture
            // writes them, behind the Ethernet header it puts in front).
            let frames = match round {
                0 | 2 => {
                    send_frames(&lab.peer, &lab.veth.b, probing.iter().map(Vec::as_slice));
                    probing
                }
                1 => {
                    send_frames(&lab.node, &lab.veth.a, probing.iter().map(Vec::as_slice));
                    probing
                }
                _ => write_packets(&tun, &probing),
            };
            for (spec, status) in specs.iter().zip(started) {
                let ended = stop(engine, rt, &status.id);
                let (expression, theirs) = libpcap_selects(spec, &frames, round == 3);
                expected_some += usize::from(!theirs.is_empty());
                let file = Path::new(&ended.output_file);
                if spec.format == OutputFormat::Text {
                    let text = String::from_utf8(capfile::bytes(file)).unwrap();
                    assert_eq!(text.lines().count(), theirs.len(), "{expression}: {text}");
                    continue;
                }
                let ours = contents(&capfile::read(file));
                assert_same_contents(&ours, &theirs, "libpcap", &expression);
                assert_eq!(capfile::tshark_count(file), theirs.len(), "{expression}");
            }
        }
        assert!(
            expected_some >= 20,
            "only {expected_some} of 32 captures select anything"
        );
    });
}

/// What [`crafted_frames_are_selected_as_libpcap_selects_them`] sends: to
/// [`frames::MAC_B`], so that the node answers none of it.
fn probing_frames(n: &mut Seeded) -> Vec<Vec<u8>> {
    const V4: [[u8; 4]; 4] = [
        [10, 99, 0, 1],
        [10, 99, 0, 2],
        [10, 98, 0, 2],
        [192, 168, 5, 5],
    ];
    const V6: [[u8; 16]; 3] = [
        [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd,
        ],
    ];
    let v4 = |payload: &[u8]| frames::ethernet(MAC_B, 0x0800, payload);
    let v6 = |payload: &[u8]| frames::ethernet(MAC_B, 0x86dd, payload);
    let cut = |mut frame: Vec<u8>, at: usize| {
        frame.truncate(at);
        frame
    };
    let mut out = Vec::new();
    for src in V4 {
        for dst in V4.into_iter().filter(|d| *d != src) {
            let l4 = transports(n);
            for (proto, l4) in &l4 {
                out.push(v4(&frames::ipv4(*proto, src, dst, l4)));
            }
            let (proto, l4) = &l4[n.below(3)];
            let packet = frames::ipv4(*proto, src, dst, l4);
            out.push(v4(&frames::ipv4_with(
                *proto,
                src,
                dst,
                0,
                &[1, 1, 1, 0],
                l4,
            )));
            out.push(v4(&frames::ipv4_with(*proto, src, dst, 0x2000, &[], l4)));
            out.push(v4(&frames::ipv4_with(*proto, src, dst, 0x0003, &[], l4)));
            out.push(v4(&frames::ipv4(ICMP, src, dst, &frames::icmp(8, 0))));
            out.push(v4(&frames::ipv4(47, src, dst, &[0; 8])));
            out.push(frames::tagged(&[(0x8100, 100)], 0x0800, &packet));
            out.push(frames::tagged(
                &[(0x88a8, 7), (0x8100, 200)],
                0x0800,
                &packet,
            ));
            // Padding after the IP packet.
            out.push([v4(&packet), vec![0; 10]].concat());
            // A version field of 6, and a header length of 16 bytes.
            for first in [0x65, 0x44] {
                let mut lying = packet.clone();
                lying[0] = first;
                out.push(v4(&lying));
            }
            // Cut inside the source address, inside the destination
            // address, inside the ports (past options too, and behind a tag).
            out.push(cut(v4(&packet), 14 + 14 + n.below(6)));
            out.push(cut(v4(&packet), 14 + 20 + 1 + n.below(3)));
            let options = frames::ipv4_with(*proto, src, dst, 0, &[1, 1, 1, 0], l4);
            out.push(cut(v4(&options), 14 + 24 + 1 + n.below(3)));
            let tagged = frames::tagged(&[(0x8100, 100)], 0x0800, &packet);
            out.push(cut(tagged, 18 + 20 + 1 + n.below(3)));
            let arp = frames::arp(1, src, dst);
            out.push(frames::ethernet(MAC_B, 0x0806, &arp));
            out.push(frames::ethernet(MAC_B, 0x8035, &arp));
            out.push(frames::tagged(&[(0x8100, 100)], 0x0806, &arp));
            out.push(cut(frames::ethernet(MAC_B, 0x0806, &arp), 14 + 20));
        }
    }
    for src in V6 {
        for dst in V6.into_iter().filter(|d| *d != src) {
            let l4 = transports(n);
            for (proto, l4) in &l4 {
                out.push(v6(&frames::ipv6(*proto, src, dst, l4)));
            }
            let (proto, l4) = &l4[n.below(3)];
            let packet = frames::ipv6(*proto, src, dst, l4);
            out.push(v6(&frames::ipv6(ICMP6, src, dst, &frames::icmp(128, 0))));
            out.push(frames::tagged(&[(0x8100, 100)], 0x86dd, &packet));
            out.push(frames::tagged(
                &[(0x88a8, 7), (0x8100, 200)],
                0x86dd,
                &packet,
            ));
            out.push(v6(&frames::ipv6(
                44,
                src,
                dst,
                &frames::frag6(*proto, 1, false, l4),
            )));
            let mut lying = packet.clone();
            lying[0] = 0x40;
            out.push(v6(&lying));
            // Cut before the source address, after it (libpcap reads a
            // prefix's words only, so a cut inside an address can match a
            // short prefix there and not here), inside the ports.
            out.push(cut(v6(&packet), 14 + 1 + n.below(11)));
            out.push(cut(v6(&packet), 14 + 24 + n.below(4)));
            out.push(cut(v6(&packet), 14 + 40 + 1 + n.below(3)));
        }
    }
    out
}

/// Writes the untagged IP packets of `frames` to `tun`, each arriving on
/// it; returns them as the capture writes them: behind an Ethernet header
/// of zero addresses and the EtherType the packet's version field says (as
/// the tun device takes it).
fn write_packets(tun: &std::os::fd::OwnedFd, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut written = Vec::new();
    for frame in frames {
        if !matches!(frame[12..14], [0x08, 0x00] | [0x86, 0xdd]) {
            continue;
        }
        let packet = &frame[14..];
        // SAFETY: writing bytes we own to a descriptor we own.
        let n = unsafe { libc::write(tun.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(
            n as usize,
            packet.len(),
            "{}",
            std::io::Error::last_os_error()
        );
        let ethertype: u16 = if packet[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
        written.push([&[0; 12][..], &ethertype.to_be_bytes(), packet].concat());
    }
    written
}

/// A TCP SYN, a UDP datagram and an SCTP header, between ports drawn from
/// those [`probing_spec`] names, each with its protocol number.
fn transports(n: &mut Seeded) -> [(u8, Vec<u8>); 3] {
    let (sport, dport) = (*n.pick(&PROBED_PORTS), *n.pick(&PROBED_PORTS));
    [
        (TCP, frames::tcp(sport, dport, SYN, &[])),
        (UDP, frames::udp(sport, dport, b"data")),
        (SCTP, frames::sctp(sport, dport)),
    ]
}

/// The ports of the probing frames and captures.
const PROBED_PORTS: [u16; 4] = [53, 80, 443, 40000];

/// A capture of 0 to 2 targets (addresses and CIDRs, some holding none of
/// the frames' addresses), 0 to 2 ports, a direction and a filter.
fn probing_spec(n: &mut Seeded) -> CaptureSpec {
    let pool = [
        "10.99.0.1",
        "10.99.0.2",
        "10.98.0.2",
        "192.168.5.5",
        "10.99.0.0/24",
        "10.0.0.0/8",
        "10.99.0.2/31",
        "192.168.0.0/16",
        "fd99::1",
        "fd99::2",
        "2001:db8::abcd",
        "fd99::/64",
        "2001:db8::/32",
        "fd99::/127",
    ];
    let filters = [
        "",
        "",
        "",
        "tcp",
        "udp",
        "not sctp",
        "ip6",
        "ip",
        "vlan",
        "arp",
        "greater 60",
        "less 70",
        "tcp[13] & 2 != 0",
        "ip[6:2] & 0x1fff != 0",
        "ip[0] & 0xf != 5",
        "ether[12:2] == 0x8100",
        "icmp or icmp6",
        "udp[8:2] == 0x6461",
    ];
    let mut targets = Vec::new();
    for _ in 0..n.below(3) {
        let t = *n.pick(&pool);
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    let mut ports = Vec::new();
    for _ in 0..n.below(3) {
        let p = *n.pick(&PROBED_PORTS);
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    if targets.is_empty() && ports.is_empty() {
        targets.push("10.99.0.0/24");
    }
    let mut spec = spec(&targets, &ports, n.pick(&filters));
    spec.format = *n.pick(&[OutputFormat::Pcap, OutputFormat::Pcapng, OutputFormat::Text]);
    // Each frame passes one place once: copies kept or not, the same.
    spec.keep_copies = n.below(2) == 1;
    if !targets.is_empty() {
        spec.direction = *n.pick(&[
            TargetDirection::Both,
            TargetDirection::Ingress,
            TargetDirection::Egress,
        ]);
    }
    spec
}

/// What libpcap selects of `frames` for `spec` ([`contents`] of them), and
/// the expression that says it: a frame selected by one of the targets and
/// one of the ports (through VLAN tags), each decided by a program of its
/// own, and by the filter on the frame as written (one expression cannot
/// say both: `vlan` moves what follows it). One program for all the
/// targets would give up at its first load past a cut frame's end, so
/// that whether a frame cut inside its destination address matches by its
/// source would depend on the order of the targets.
/// With `raw_ip`, `frames` are packets of an interface without a link
/// header behind the Ethernet header the capture puts in front, and the
/// filter runs on the packet, as tcpdump's does there, where libpcap
/// compiles it for raw IP (`DLT_RAW`, 12 on Linux).
fn libpcap_selects(
    spec: &CaptureSpec,
    frames: &[Vec<u8>],
    raw_ip: bool,
) -> (String, Vec<(u32, Vec<u8>)>) {
    let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).unwrap();
    let compile = |expression: &str| dead.compile(expression, true).unwrap();
    // Each target's and each port's program; none: any.
    let any_of = |expressions: Vec<String>| -> Vec<pcap::BpfProgram> {
        expressions
            .iter()
            .map(|e| compile(&through_vlans(e)))
            .collect()
    };
    let targets = any_of(
        spec.targets
            .iter()
            .map(|t| selection_expression(&[*t], &[], spec.direction, ""))
            .collect(),
    );
    let ports = any_of(
        spec.ports
            .iter()
            .map(|p| selection_expression(&[], &[*p], spec.direction, ""))
            .collect(),
    );
    let filter = compile(&spec.filter);
    let raw_filter = raw_ip
        .then(|| {
            let dead = pcap::Capture::dead(pcap::Linktype(12)).unwrap();
            dead.compile(&spec.filter, true).ok()
        })
        .flatten();
    let filtered = |frame: &[u8]| match &raw_filter {
        Some(program) => program.filter(&frame[14..]),
        None => filter.filter(frame),
    };
    let one_of = |programs: &[pcap::BpfProgram], frame: &[u8]| {
        programs.is_empty() || programs.iter().any(|p| p.filter(frame))
    };
    let mut selected: Vec<(u32, Vec<u8>)> = frames
        .iter()
        .filter(|f| one_of(&targets, f) && one_of(&ports, f) && filtered(f))
        .map(|f| (f.len() as u32, f.clone()))
        .collect();
    selected.sort();
    let selection = selection_expression(&spec.targets, &spec.ports, spec.direction, "");
    (
        format!("{selection} (through VLAN tags), then {:?}", spec.filter),
        selected,
    )
}

/// An Ethernet frame with VLAN `tags` (TPID, VID) around a UDP datagram.
fn tagged_udp(tags: &[(u16, u16)], src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    for &(tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let payload = b"tagged";
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend(ip);
    f.extend_from_slice(&[0x30, 0x39, 0, 9]);
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Sends `frames` out of `iface` in `ns` with a packet socket, in order.
fn send_frames<'a>(ns: &Netns, iface: &str, frames: impl IntoIterator<Item = &'a [u8]> + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let name = std::ffi::CString::new(iface).unwrap();
            // SAFETY: plain libc calls on values we own.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr());
                assert!(ifindex > 0, "no {iface}");
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(
                    fd >= 0,
                    "packet socket: {}",
                    std::io::Error::last_os_error()
                );
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                addr.sll_halen = 6;
                for frame in frames {
                    let n = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&raw const addr).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(
                        n as usize,
                        frame.len(),
                        "{}",
                        std::io::Error::last_os_error()
                    );
                }
                libc::close(fd);
            }
        });
    });
}

/// A tun device in `ns` whose other end answers ICMP echo requests.
struct TunResponder {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TunResponder {
    fn start(ns: &Netns, name: &str, addr: &str) -> Self {
        use std::os::fd::AsRawFd;
        let fd = open_tun(ns, name);
        ns.ip(&["addr", "add", addr, "dev", name]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                wait_readable(fd.as_raw_fd());
                // SAFETY: reading into a buffer we own.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let packet = &mut buf[..n as usize];
                if let Some(reply) = echo_reply(packet) {
                    // SAFETY: writing bytes we own.
                    unsafe { libc::write(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// A tun device `name` in `ns` (IP packets, no link header and no packet
/// information), up: a packet written to the descriptor arrives on it, one
/// it sends is read from it. It goes when the descriptor is closed.
fn open_tun(ns: &Netns, name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            // SAFETY: open(2) of the tun device; the fd is owned at once.
            let fd =
                unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(
                fd >= 0,
                "open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is new and ours.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut ifreq = [0u8; 40];
            ifreq[..name.len()].copy_from_slice(name.as_bytes());
            ifreq[16..18].copy_from_slice(&(0x0001u16 | 0x1000).to_ne_bytes()); // IFF_TUN | IFF_NO_PI
            // SAFETY: TUNSETIFF with a valid ifreq.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), 0x4004_54ca, ifreq.as_mut_ptr()) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            fd
        })
        .join()
        .expect("tun device made")
    });
    ns.ip(&["link", "set", name, "up"]);
    fd
}

impl Drop for TunResponder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 100) };
}

/// The echo reply to an IPv4 ICMP echo request, or None.
fn echo_reply(request: &[u8]) -> Option<Vec<u8>> {
    let ihl = usize::from(request.first()? & 0x0f) * 4;
    if request.first()? >> 4 != 4 || *request.get(9)? != 1 || *request.get(ihl)? != 8 {
        return None;
    }
    let mut reply = request.to_vec();
    let (src, dst) = (request[12..16].to_vec(), request[16..20].to_vec());
    reply[12..16].copy_from_slice(&dst);
    reply[16..20].copy_from_slice(&src);
    reply[ihl] = 0;
    reply[ihl + 2..ihl + 4].copy_from_slice(&[0, 0]);
    let sum = checksum(&reply[ihl..]);
    reply[ihl + 2..ihl + 4].copy_from_slice(&sum.to_be_bytes());
    Some(reply)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn link_less_interfaces_get_an_ethernet_header() {
    each_backend(
        "link_less_interfaces_get_an_ethernet_header",
        |lab, engine, rt| {
            let _tun = TunResponder::start(&lab.node, "pctun0", "10.94.0.1/24");
            until_followed(engine, "pctun0");
            let oracle = lab.file("tun.pcap");
            let dump = Tcpdump::start(&lab.node, "pctun0", "host 10.94.0.2", 262_144, &oracle);
            let status = start(engine, spec(&["10.94.0.2"], &[], ""));
            lab.ping("10.94.0.2", 3, 56);
            let ended = stop(engine, rt, &status.id);
            let (theirs, _) = dump.finish();
            assert_eq!(theirs.len(), 6);
            assert!(
                theirs.iter().all(|p| p.link_type == 101),
                "tcpdump sees raw IP on a tun"
            );
            let ours = capfile::read(Path::new(&ended.output_file));
            assert_eq!(
                capfile::tshark_count(Path::new(&ended.output_file)),
                ours.len()
            );
            // Ours: the same IP packets behind an Ethernet header that says IPv4.
            let unwrapped: Vec<Packet> = ours
                .iter()
                .map(|p| {
                    assert_eq!(
                        &p.data[..14],
                        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00]
                    );
                    Packet {
                        orig_len: p.orig_len - 14,
                        data: p.data[14..].to_vec(),
                        ..p.clone()
                    }
                })
                .collect();
            assert_same(&unwrapped, &theirs, "tun");
        },
    );
}

#[test]
fn the_file_size_limit_stops_before_it_is_exceeded() {
    if !privileged("the_file_size_limit_stops_before_it_is_exceeded") {
        return;
    }
    for backend in [BackendChoice::Ebpf, BackendChoice::Pcap] {
        let lab = Lab::new();
        let options = Options {
            max_file_bytes: 5000,
            ..Options::with(backend)
        };
        with_engine(&lab, options, |engine, rt| {
            let status = start(engine, spec(&[PEER_V4], &[], "icmp"));
            lab.ping(PEER_V4, 5, 1000);
            let ended = ended(engine, rt, &status.id);
            assert_eq!(ended.state, CaptureState::Completed, "{ended:?}");
            assert!(
                ended.message.contains("MAX_CAPTURE_FILE_SIZE_MB"),
                "{}",
                ended.message
            );
            let size = std::fs::metadata(capfile::locate(Path::new(&ended.output_file)))
                .unwrap()
                .len();
            assert!(size <= 5000 && size > 5000 - 1100, "{size} bytes");
            assert_eq!(ended.file_size, size);
            let packets = capfile::tshark_count(Path::new(&ended.output_file));
            assert_eq!(packets as u64, ended.packets);
            assert_eq!(
                packets, 4,
                "24 + 4 x 1058 bytes fit in 5000, a fifth does not"
            );
        });
    }
}

#[test]
fn a_full_disk_fails_the_capture_and_keeps_the_file_readable() {
    if !privileged("a_full_disk_fails_the_capture_and_keeps_the_file_readable") {
        return;
    }
    let lab = Lab::new();
    std::fs::create_dir_all(lab.captures()).unwrap();
    let mount = lab.captures();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=384k", "tmpfs"])
        .arg(&mount));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    with_engine(&lab, Options::with(BackendChoice::Ebpf), |engine, rt| {
        let status = start(engine, spec(&[PEER_V4], &[7777], ""));
        flood(&lab.peer, NODE_V4, 7777, 2_000);
        let ended = stop(engine, rt, &status.id);
        assert_eq!(ended.state, CaptureState::Failed, "{ended:?}");
        assert!(
            ended.message.contains("No space left on device"),
            "{}",
            ended.message
        );
        let in_file = capfile::tshark_count(Path::new(&ended.output_file));
        assert_eq!(
            in_file as u64, ended.packets,
            "the status counts what the file holds"
        );
        assert!(in_file > 0 && ended.dropped > 0, "{ended:?}");

        // Full before a capture starts: not even the header fits, and no
        // empty file is left under a capture file's name.
        let filler = mount.join(".filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let err = loop {
            if let Err(e) = std::io::Write::write_all(&mut file, &[0; 4096]) {
                break e;
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
        let status = start(engine, spec(&[PEER_V4], &[7777], ""));
        flood(&lab.peer, NODE_V4, 7777, 100);
        let ended = stop(engine, rt, &status.id);
        assert_eq!(ended.state, CaptureState::Failed, "{ended:?}");
        assert!(
            ended.message.contains("No space left on device")
                && ended.message.contains("the file is removed"),
            "{}",
            ended.message
        );
        let mut left: Vec<String> = std::fs::read_dir(&mount)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let second = Path::new(&status.output_file).file_name();
        assert!(
            left.iter()
                .all(|name| Some(std::ffi::OsStr::new(name)) != second),
            "{left:?}"
        );
        assert_eq!(
            left.len(),
            2,
            "the first capture's file and the filler: {left:?}"
        );
    });
}

/// `tshark -T fields` on a capture file (fed through a pipe, as the agent may
/// compress the file meanwhile), without reassembly, so that each frame is
/// decoded alone: per frame, per field, every occurrence (an ICMP error
/// carries the headers of the packet it is about after its own).
fn tshark_fields(path: &Path, fields: &[&str]) -> Vec<Vec<Vec<String>>> {
    use std::io::Write;
    let mut command = Command::new("tshark");
    command.args([
        "-n",
        "-r",
        "-",
        "-o",
        "ip.defragment:FALSE",
        "-o",
        "ipv6.defragment:FALSE",
        "-T",
        "fields",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
        "-E",
        "separator=/t",
    ]);
    for field in fields {
        command.args(["-e", field]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting tshark");
    let bytes = capfile::bytes(path);
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tshark could not read {}",
        path.display()
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let row: Vec<Vec<String>> = line
                .split('\t')
                .map(|cell| {
                    cell.split(',')
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .collect();
            assert_eq!(row.len(), fields.len(), "{line}");
            row
        })
        .collect()
}

/// A number as tshark prints it, decimal or `0x` hex.
fn number(value: &str) -> u64 {
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    }
    .unwrap_or_else(|e| panic!("{value:?}: {e}"))
}

/// The fields of one frame that the text line shows, as tshark decodes them.
const LINE_FIELDS: [&str; 39] = [
    "frame.len",
    "ieee8021ad.id",
    "vlan.id",
    "eth.type",
    "arp.opcode",
    "arp.src.proto_ipv4",
    "arp.dst.proto_ipv4",
    "arp.src.hw_mac",
    "ip.src",
    "ip.dst",
    "ip.len",
    "ip.hdr_len",
    "ip.proto",
    "ip.frag_offset",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.plen",
    "ipv6.hopopts.len_oct",
    "ipv6.dstopts.len_oct",
    "ipv6.routing.len_oct",
    "ipv6.fraghdr.offset",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.seq_raw",
    "tcp.ack_raw",
    "tcp.window_size_value",
    "tcp.len",
    "tcp.flags",
    "udp.srcport",
    "udp.dstport",
    "udp.length",
    "sctp.srcport",
    "sctp.dstport",
    "icmp.type",
    "icmp.ident",
    "icmp.seq",
    "icmpv6.type",
    "icmpv6.echo.identifier",
    "icmpv6.echo.sequence_number",
];

/// One frame's fields by name: the first occurrence (the outermost header)
/// and all of them.
struct Frame<'a> {
    row: &'a [Vec<String>],
}

impl Frame<'_> {
    fn all(&self, field: &str) -> &[String] {
        let at = LINE_FIELDS.iter().position(|f| *f == field).expect(field);
        &self.row[at]
    }
    fn first(&self, field: &str) -> Option<&str> {
        self.all(field).first().map(String::as_str)
    }
    fn num(&self, field: &str) -> Option<u64> {
        self.first(field).map(number)
    }
}

/// The line tcpdump -n would print (our layout), built from tshark's fields
/// alone.
fn line_from_tshark(f: &Frame) -> String {
    let mut line = String::new();
    // tshark names an 802.1ad (outer) tag apart from 802.1Q ones.
    let tags = [f.all("ieee8021ad.id"), f.all("vlan.id")].concat();
    for id in &tags {
        line += &format!("vlan {id}, ");
    }
    let network_at = 14 + 4 * tags.len() as u64;
    let frame_len = f.num("frame.len").unwrap();
    if let Some(op) = f.num("arp.opcode") {
        let (spa, tpa) = (
            f.first("arp.src.proto_ipv4").unwrap(),
            f.first("arp.dst.proto_ipv4").unwrap(),
        );
        let len = frame_len - network_at;
        line += &match op {
            1 => format!("ARP, Request who-has {tpa} tell {spa}, length {len}"),
            2 => format!(
                "ARP, Reply {spa} is-at {}, length {len}",
                f.first("arp.src.hw_mac").unwrap()
            ),
            _ => format!("ARP, op {op}, length {len}"),
        };
        return line;
    }
    let (family, src, dst, len) = if let Some(src) = f.first("ip.src") {
        let len = f.num("ip.len").unwrap() - f.num("ip.hdr_len").unwrap();
        let dst = f.first("ip.dst").unwrap();
        // tshark gives it in 8-byte units, tcpdump in bytes.
        let offset = f.num("ip.frag_offset").unwrap_or(0) * 8;
        if offset != 0 {
            let proto = f.num("ip.proto").unwrap();
            line +=
                &format!("IP {src} > {dst}: ip-proto-{proto} (frag offset {offset}), length {len}");
            return line;
        }
        ("IP", src, dst, len)
    } else if let Some(src) = f.first("ipv6.src") {
        let fragment = f.num("ipv6.fraghdr.offset");
        let extensions: u64 = [
            "ipv6.hopopts.len_oct",
            "ipv6.dstopts.len_oct",
            "ipv6.routing.len_oct",
        ]
        .iter()
        .filter_map(|e| f.num(e))
        .sum::<u64>()
            + if fragment.is_some() { 8 } else { 0 };
        let len = f.num("ipv6.plen").unwrap() - extensions;
        let dst = f.first("ipv6.dst").unwrap();
        if fragment.is_some_and(|o| o != 0) {
            line += &format!("IP6 {src} > {dst}: frag, length {len}");
            return line;
        }
        ("IP6", src, dst, len)
    } else {
        let ethertype = f.all("eth.type").last().map(|t| number(t)).unwrap();
        line += &format!("ethertype 0x{ethertype:04x}, length {frame_len}");
        return line;
    };
    line += &if let Some(kind) = f.num("icmp.type") {
        let name = match kind {
            0 => "echo reply".to_string(),
            3 => "destination unreachable".to_string(),
            8 => "echo request".to_string(),
            11 => "time exceeded".to_string(),
            other => format!("type {other}"),
        };
        let echo = match kind {
            0 | 8 => format!(
                ", id {}, seq {}",
                f.num("icmp.ident").unwrap(),
                f.num("icmp.seq").unwrap()
            ),
            _ => String::new(),
        };
        format!("{family} {src} > {dst}: ICMP {name}{echo}, length {len}")
    } else if let Some(kind) = f.num("icmpv6.type") {
        let name = match kind {
            1 => "destination unreachable".to_string(),
            3 => "time exceeded".to_string(),
            128 => "echo request".to_string(),
            129 => "echo reply".to_string(),
            133 => "router solicitation".to_string(),
            134 => "router advertisement".to_string(),
            135 => "neighbor solicitation".to_string(),
            136 => "neighbor advertisement".to_string(),
            other => format!("type {other}"),
        };
        let echo = match kind {
            128 | 129 => format!(
                ", id {}, seq {}",
                f.num("icmpv6.echo.identifier").unwrap(),
                f.num("icmpv6.echo.sequence_number").unwrap()
            ),
            _ => String::new(),
        };
        format!("{family} {src} > {dst}: ICMP6, {name}{echo}, length {len}")
    } else if let Some(sp) = f.first("tcp.srcport") {
        let flags = f.num("tcp.flags").unwrap();
        // tcpdump's letters for the flag bits, lowest first.
        let letters: String = "FSRP.UEW"
            .chars()
            .enumerate()
            .filter(|(bit, _)| flags & (1 << bit) != 0)
            .map(|(_, c)| c)
            .collect();
        let ack = if flags & 0x10 != 0 {
            format!(", ack {}", f.num("tcp.ack_raw").unwrap())
        } else {
            String::new()
        };
        format!(
            "{family} {src}.{sp} > {dst}.{}: Flags [{letters}], seq {}{ack}, win {}, length {}",
            f.first("tcp.dstport").unwrap(),
            f.num("tcp.seq_raw").unwrap(),
            f.num("tcp.window_size_value").unwrap(),
            f.num("tcp.len").unwrap()
        )
    } else if let Some(sp) = f.first("udp.srcport") {
        format!(
            "{family} {src}.{sp} > {dst}.{}: UDP, length {}",
            f.first("udp.dstport").unwrap(),
            f.num("udp.length").unwrap() - 8
        )
    } else if let Some(sp) = f.first("sctp.srcport") {
        format!(
            "{family} {src}.{sp} > {dst}.{}: sctp, length {len}",
            f.first("sctp.dstport").unwrap()
        )
    } else {
        format!("{family} {src} > {dst}: (no transport tshark decodes)")
    };
    line
}

/// Frames the lab's traffic lacks, from the peer to everyone, addressed to
/// hosts past the node (which forwards nothing) so that it answers none of
/// them: SCTP INITs in both families (this kernel has no SCTP), UDP behind
/// IPv6 destination-options and routing headers, an ICMP time exceeded, one
/// and two VLAN tags (it has no 8021q either), and an EtherType that nothing
/// decodes.
fn crafted_frames() -> Vec<Vec<u8>> {
    use etherparse::icmpv4::TimeExceededCode;
    use etherparse::{
        Icmpv4Type, IpHeaders, IpNumber, Ipv6Extensions, Ipv6Header, Ipv6RawExtHeader,
        Ipv6RoutingExtensions, PacketBuilder,
    };
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const EVERYONE: [u8; 6] = [0xff; 6];
    let (v4_src, v4_dst) = ([10, 99, 0, 2], [10, 97, 0, 9]);
    let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let (v6_src, v6_dst) = (v6(PEER_V6), v6("fd97::9"));
    let eth = || PacketBuilder::ethernet2(PEER_MAC, EVERYONE);
    // SCTP's common header (ports 2905 > 2906, verification tag, checksum)
    // and an INIT chunk.
    let mut sctp = vec![0x0b, 0x59, 0x0b, 0x5a, 0, 0, 0, 0, 0, 0, 0, 0];
    sctp.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    let mut frames = vec![Vec::new(); 4];
    eth()
        .ipv4(v4_src, v4_dst, 64)
        .write(&mut frames[0], IpNumber::SCTP, &sctp)
        .unwrap();
    eth()
        .ipv6(v6_src, v6_dst, 64)
        .write(&mut frames[1], IpNumber::SCTP, &sctp)
        .unwrap();
    let extensions = Ipv6Extensions {
        // A PadN option.
        destination_options: Some(
            Ipv6RawExtHeader::new_raw(IpNumber::UDP, &[1, 4, 0, 0, 0, 0]).unwrap(),
        ),
        // Type 0, no segment left.
        routing: Some(Ipv6RoutingExtensions {
            routing: Ipv6RawExtHeader::new_raw(IpNumber::UDP, &[0, 0, 0, 0, 0, 0]).unwrap(),
            final_destination_options: None,
        }),
        ..Default::default()
    };
    let header = Ipv6Header {
        source: v6_src,
        destination: v6_dst,
        hop_limit: 64,
        ..Default::default()
    };
    eth()
        .ip(IpHeaders::Ipv6(header, extensions))
        .udp(5353, 5354)
        .write(&mut frames[2], b"behind extension headers")
        .unwrap();
    // About a UDP datagram whose TTL ran out on its way.
    let mut about = Vec::new();
    PacketBuilder::ipv4(v4_dst, v4_src, 1)
        .udp(40000, 33434)
        .write(&mut about, &[])
        .unwrap();
    eth()
        .ipv4(v4_src, v4_dst, 64)
        .icmpv4(Icmpv4Type::TimeExceeded(
            TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut frames[3], &about)
        .unwrap();
    for tags in [&[(0x8100, 42)][..], &[(0x88a8, 200), (0x8100, 300)]] {
        frames.push(tagged_udp(
            tags,
            "10.97.0.9".parse().unwrap(),
            "10.99.0.2".parse().unwrap(),
        ));
    }
    let mut unknown = [EVERYONE, PEER_MAC].concat();
    unknown.extend_from_slice(&0x88b5u16.to_be_bytes());
    unknown.resize(60, 0);
    frames.push(unknown);
    frames
}

#[test]
fn text_lines_agree_with_tshark() {
    if !privileged("text_lines_agree_with_tshark") {
        return;
    }
    let lab = Lab::new();
    let corpus = lab.file("corpus.pcap");
    let dump = Tcpdump::start(&lab.node, &lab.veth.a, "", 262_144, &corpus);
    // A new address: the node joins its solicited-node group with an MLD
    // report (behind a hop-by-hop header) and checks it is unique (neighbor
    // solicitation).
    lab.node
        .ip(&["addr", "add", "fd99::10/64", "dev", &lab.veth.a]);
    lab.ping(PEER_V4, 2, 56);
    lab.ping(PEER_V6, 2, 56);
    // Fragments: IPv4 ones, and IPv6 fragment headers.
    lab.ping(PEER_V4, 1, 3000);
    lab.ping(PEER_V6, 1, 3000);
    // UDP that the peer answers with port unreachable, in both families.
    lab.udp(PEER_V4, 9);
    lab.udp(PEER_V6, 9);
    lab.tcp_transfer(PEER_V4, 8080);
    lab.tcp_refused(PEER_V6, 8081);
    // What the lab does not send by itself, addressed past the node so
    // that it answers none of it.
    let frames = crafted_frames();
    send_frames(&lab.peer, &lab.veth.b, frames.iter().map(Vec::as_slice));
    let (packets, _) = dump.finish();

    let rows = tshark_fields(&corpus, &LINE_FIELDS);
    assert_eq!(
        rows.len(),
        packets.len(),
        "tshark and pcap-file count the same frames"
    );
    let mut mismatches = Vec::new();
    let mut lines = Vec::new();
    for (i, (packet, row)) in packets.iter().zip(&rows).enumerate() {
        let mut ours = String::new();
        packet_capture_agent::writer::describe(&mut ours, &packet.data, packet.orig_len).unwrap();
        let frame = Frame { row };
        let theirs = line_from_tshark(&frame);
        if ours != theirs {
            mismatches.push(format!(
                "frame {}:\n  ours:   {ours}\n  tshark: {theirs}",
                i + 1
            ));
        }
        lines.push(ours);
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // The corpus has what the decoder must get right.
    for kind in [
        "vlan 42, ",
        "ARP, Request who-has",
        "ARP, Reply",
        "ICMP echo request, id",
        "ICMP destination unreachable",
        "ICMP time exceeded",
        "(frag offset",
        "ICMP6, echo reply, id",
        "ICMP6, neighbor solicitation",
        "ICMP6, destination unreachable",
        "ICMP6, type 143",
        ": frag, length",
        "Flags [S]",
        "Flags [S.]",
        "Flags [P.]",
        "Flags [R.]",
        "UDP, length",
        "IP 10.99.0.2.2905 > 10.97.0.9.2906: sctp",
        "IP6 fd99::2.2905 > fd97::9.2906: sctp",
        "IP6 fd99::2.5353 > fd97::9.5354: UDP",
        "vlan 200, vlan 300, IP",
        "ethertype 0x88b5",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(kind)),
            "no {kind:?} in the corpus:\n{}",
            lines.join("\n")
        );
    }
}

/// The node routes between the lab's peer and a second peer (10.97.0.2),
/// so what passes through crosses two of its interfaces. Returns the
/// second peer and its link.
fn through_the_node(lab: &Lab) -> (Netns, VethPair) {
    let far = Netns::new("pcf");
    let link = VethPair::new(&lab.node, &["10.97.0.1/24"], &far, &["10.97.0.2/24"]);
    run(lab
        .node
        .command("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"]));
    lab.peer
        .ip(&["route", "add", "10.97.0.0/24", "via", NODE_V4]);
    far.ip(&["route", "add", "10.99.0.0/24", "via", "10.97.0.1"]);
    (far, link)
}

/// An IPv4 packet from the peer to the far peer with identification `id`
/// and the don't-fragment bit; the kernel fills in the header checksum.
fn ipv4_packet(id: u16, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, protocol, 0, 0]);
    p.extend_from_slice(&[10, 99, 0, 2, 10, 97, 0, 2]);
    p.extend_from_slice(payload);
    p
}

/// Sends each packet twice, byte for byte, from the peer: a raw socket
/// (IP_HDRINCL) so that nothing differs between the two.
fn send_twice(peer: &Netns, packets: &[Vec<u8>]) {
    std::thread::scope(|s| {
        s.spawn(|| {
            peer.enter();
            // SAFETY: plain socket calls on a descriptor this thread owns;
            // the address and buffers outlive the calls.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
                assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes([10, 97, 0, 2]),
                    },
                    sin_zero: [0; 8],
                };
                for packet in packets {
                    for _ in 0..2 {
                        let sent = libc::sendto(
                            fd,
                            packet.as_ptr().cast(),
                            packet.len(),
                            0,
                            std::ptr::from_ref(&to).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        );
                        assert_eq!(
                            sent,
                            packet.len() as isize,
                            "{}",
                            std::io::Error::last_os_error()
                        );
                    }
                }
                libc::close(fd);
            }
        });
    });
}

/// What a test packet is, from its Ethernet and IPv4 headers.
fn kind(p: &Packet) -> &'static str {
    let d = &p.data;
    if d.len() < 38 || d[12..14] != [0x08, 0x00] {
        return "other";
    }
    let fragment = u16::from_be_bytes([d[20], d[21]]) & 0x3fff != 0;
    let dport = u16::from_be_bytes([d[36], d[37]]);
    match (fragment, d[23], d[34]) {
        (true, ..) => "fragment",
        (false, 1, 8) => "echo request",
        (false, 1, 0) => "echo reply",
        (false, 17, _) if dport == 5555 => "datagram",
        (false, 6, _) if dport == 7777 => "syn",
        _ => "other",
    }
}

/// A capture of traffic routed through the node, once by default and with
/// every copy: pings are recorded once each, at the interface where they
/// enter the node, and twice with `keepCopies`; real repeats (a datagram
/// sent twice, a TCP segment sent again, both byte for byte) and each
/// fragment of a fragmented datagram are all kept.
#[test]
fn each_packet_is_recorded_once_where_it_is_first_seen() {
    let test = "each_packet_is_recorded_once_where_it_is_first_seen";
    if !privileged(test) {
        return;
    }
    for backend in [BackendChoice::Ebpf, BackendChoice::Pcap] {
        let lab = Lab::new();
        let (_far, link) = through_the_node(&lab);
        with_engine(&lab, Options::with(backend), |engine, rt| {
            let [once, every] = [false, true].map(|keep_copies| {
                let s = CaptureSpec {
                    format: OutputFormat::Pcapng,
                    keep_copies,
                    ..spec(&["10.97.0.2"], &[], "")
                };
                start(engine, s).id
            });
            run(lab
                .peer
                .command("ping")
                .args(["-c", "3", "-i", "0.05", "-W", "2", "10.97.0.2"]));
            run(lab.peer.command("ping").args([
                "-c",
                "2",
                "-i",
                "0.05",
                "-W",
                "2",
                "-s",
                "3000",
                "10.97.0.2",
            ]));
            let datagram = ipv4_packet(
                0x1111,
                17,
                &[0x9c, 0x40, 0x15, 0xb3, 0, 12, 0, 0, 1, 2, 3, 4],
            );
            let syn = ipv4_packet(
                0x2222,
                6,
                &[
                    0x9c, 0x41, 0x1e, 0x61, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 4, 0, 0, 0, 0, 0,
                ],
            );
            send_twice(&lab.peer, &[datagram, syn]);
            let read = |id: &str| {
                let ended = stop(engine, rt, id);
                capfile::read(Path::new(&ended.output_file))
            };
            let (once, every) = (read(&once), read(&every));
            let count =
                |packets: &[Packet], k: &str| packets.iter().filter(|p| kind(p) == k).count();
            for (k, n) in [
                ("echo request", 3),
                ("echo reply", 3),
                // 3000 bytes of ICMP in 1500-byte packets: 3 fragments each
                // way, twice.
                ("fragment", 12),
                ("datagram", 2),
                ("syn", 2),
            ] {
                assert_eq!(count(&once, k), n, "{backend:?}: {k} once");
                assert_eq!(count(&every, k), 2 * n, "{backend:?}: {k} with every copy");
            }
            // Once: where each packet enters the node. (libpcap's sockets
            // are read one after the other, so with that backend the copy
            // kept is the one read first, not always the one seen first.)
            for p in once.iter().filter(|_| backend == BackendChoice::Ebpf) {
                let entered = match kind(p) {
                    "echo reply" => &link.a,
                    "other" => continue,
                    // The way out of the far peer is fragmented too.
                    "fragment" if p.data[26..30] == [10, 97, 0, 2] => &link.a,
                    _ => &lab.veth.a,
                };
                assert_eq!(
                    (&p.interface, p.direction),
                    (entered, 1),
                    "{backend:?}: {}",
                    kind(p)
                );
            }
            // The repeats are the same bytes from the IP header on.
            for k in ["datagram", "syn"] {
                let sent: Vec<&[u8]> = once
                    .iter()
                    .filter(|p| kind(p) == k)
                    .map(|p| &p.data[14..])
                    .collect();
                assert_eq!(sent[0], sent[1], "{backend:?}: {k}");
            }
        });
    }
}
