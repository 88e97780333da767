//! The embedded eBPF object loads on this kernel, attaches to both TC hooks
//! of a veth, sees real traffic, and leaves nothing behind when detached;
//! its diagnostics reach `tracing` with `LOG_LEVEL=DEBUG`, and only then.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use aya::sys::{Stats, enable_stats};
use ipnet::IpNet;
use packet_capture_agent::ebpf::{KERNEL_LOG_TARGET, Kernel, LinkKind, SlotTargets, prefix_masks};
use packet_capture_common::abi::{MAX_PREFIXES, counter};
use packet_capture_common::logging::LogLevel;
use packet_capture_test_support::{Netns, VethPair, netns::run, privileged};
use packet_socket::{PacketSocket, short_ipv4_frame};
use tc::tc_programs;

#[path = "api/common/tc.rs"]
mod tc;

#[path = "api/common/packet_socket.rs"]
mod packet_socket;

#[test]
fn loads_attaches_sees_traffic_and_detaches() {
    if !privileged("loads_attaches_sees_traffic_and_detaches") {
        return;
    }
    let (veth, _namespaces) = linked();

    let (mut kernel, _ring) = Kernel::load(1 << 20).expect("the verifier accepts the programs");
    // docs/capture.md records these; a change that bloats the programs shows here.
    for (name, verified, bytes) in kernel.program_sizes() {
        eprintln!("{name}: {verified} instructions verified, {bytes} bytes translated");
        assert!(
            verified > 0 && verified < 50_000,
            "{name}: {verified} verified instructions"
        );
    }
    kernel
        .attach(&veth.a, LinkKind::Ethernet)
        .expect("attach to the veth");
    assert_eq!(tc_programs(&veth.a), ["tc_ingress", "tc_egress"]);

    let _stats = enable_stats(Stats::RunTime).expect("the kernel's program run statistics");
    let before = kernel.program_runs();
    run(Command::new("ping").args(["-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"]));
    // Three requests out and three replies in, plus whatever ARP/ND the
    // kernel sent: at least six.
    let seen = kernel.program_runs() - before;
    assert!(seen >= 6, "the programs saw {seen} packets");

    kernel.detach(&veth.a);
    // A process another test forks in the meantime holds a copy of the link
    // until it execs; the link goes with the last copy.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tc_programs(&veth.a).is_empty() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(tc_programs(&veth.a), Vec::<String>::new());
}

/// Another program on the same hooks (here: a second agent) keeps seeing
/// every packet while ours is attached, and keeps its hooks and the existing
/// clsact qdisc when ours goes: the programs end with "next", never "pass".
#[test]
fn other_programs_on_the_hooks_are_left_alone() {
    if !privileged("other_programs_on_the_hooks_are_left_alone") {
        return;
    }
    let (veth, (here, _there)) = linked();
    run(here
        .command("tc")
        .args(["qdisc", "add", "dev", &veth.a, "clsact"]));

    let (mut ours, _r1) = Kernel::load(1 << 16).unwrap();
    let (mut theirs, _r2) = Kernel::load(1 << 16).unwrap();
    theirs.attach(&veth.a, LinkKind::Ethernet).unwrap();
    ours.attach(&veth.a, LinkKind::Ethernet).unwrap();
    assert_eq!(tc_programs(&veth.a).len(), 4);

    let _stats = enable_stats(Stats::RunTime).expect("the kernel's program run statistics");
    let (ours_before, theirs_before) = (ours.program_runs(), theirs.program_runs());
    run(Command::new("ping").args(["-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"]));
    let ours_seen = ours.program_runs() - ours_before;
    let theirs_seen = theirs.program_runs() - theirs_before;
    assert!(ours_seen >= 6, "ours saw {ours_seen}");
    assert_eq!(
        ours_seen, theirs_seen,
        "both programs see every packet, whatever the order"
    );

    drop(ours);
    assert_eq!(
        tc_programs(&veth.a),
        ["tc_ingress", "tc_egress"],
        "theirs stay attached"
    );
    let qdiscs = run(here.command("tc").args(["qdisc", "show", "dev", &veth.a]));
    assert!(
        String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "the clsact qdisc stays"
    );
}

/// What a `tracing` subscriber wrote, line by line, for a test to wait on.
#[derive(Clone, Default)]
struct Written(Arc<(Mutex<String>, Condvar)>);

impl std::io::Write for Written {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (text, changed) = &*self.0;
        text.lock().unwrap().push_str(&String::from_utf8_lossy(buf));
        changed.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Written {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

impl Written {
    /// Installs, for this thread, the agent's subscriber for `level` writing
    /// here (the kernel's log thread takes it over when the programs load).
    fn install(&self, level: LogLevel) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(level.filter())
            .with_writer(self.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The lines from the programs.
    fn kernel_lines(&self) -> Vec<String> {
        let text = self.0.0.lock().unwrap();
        text.lines()
            .filter(|l| l.contains(KERNEL_LOG_TARGET))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until a line from the programs contains every one of `parts`.
    fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (text, changed) = &*self.0;
        let mut guard = text.lock().unwrap();
        loop {
            if let Some(line) = guard
                .lines()
                .find(|l| l.contains(KERNEL_LOG_TARGET) && parts.iter().all(|p| l.contains(p)))
            {
                return line.to_owned();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no line with {parts:?} in:\n{guard}"));
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

/// Two network namespaces linked by a veth pair, 10.99.0.1 on this side
/// and 10.99.0.2 on the other, with the test's thread on this side: the
/// pair and the namespaces (this side first), which go when dropped.
fn linked() -> (VethPair, (Netns, Netns)) {
    let here = Netns::new("pcl");
    let there = Netns::new("pcr");
    let veth = VethPair::new(&here, &["10.99.0.1/24"], &there, &["10.99.0.2/24"]);
    here.enter();
    (veth, (here, there))
}

/// A capture slot that takes every packet whole.
fn everything() -> SlotTargets {
    SlotTargets {
        copy_len: 262_144,
        ..SlotTargets::default()
    }
}

/// With the agent's DEBUG filter the programs say where they run, which
/// frames are too short to parse and which records the ring had no room
/// for, each line with its program and interface; switched off, they say
/// nothing, and switched on again they start afresh, all without reloading.
#[test]
fn diagnostics_with_log_level_debug() {
    if !privileged("diagnostics_with_log_level_debug") {
        return;
    }
    let (veth, _namespaces) = linked();
    let written = Written::default();
    let _subscriber = written.install(LogLevel::Debug);

    // One page of ring, never read: it fills after a few records.
    let (mut kernel, _ring) = Kernel::load(4096).unwrap();
    assert!(kernel.diagnostics().unwrap(), "DEBUG switches them on");
    kernel.attach(&veth.a, LinkKind::Ethernet).unwrap();
    kernel.set_slot(0, everything()).unwrap();
    let iface = format!("iface=\"{}\"", veth.a);

    run(Command::new("ping").args(["-c", "2", "-i", "0.2", "-W", "2", "10.99.0.2"]));
    written.wait_for(&["program running", "program=\"tc_egress\"", &iface]);
    written.wait_for(&["program running", "program=\"tc_ingress\"", &iface]);

    let socket = PacketSocket::open(&veth.a, 0x0800);
    socket.send(&short_ipv4_frame(24));
    written.wait_for(&[
        "DEBUG",
        "frame too short to parse: 24 bytes where its headers need 34 (protocol 0x800)",
        "program=\"tc_egress\"",
        &iface,
    ]);

    // Frames until the ring is full and some are lost; the next frame on a
    // CPU that lost some reports them (a send runs the egress program on
    // the sending CPU).
    let lost_before = kernel.counter(counter::RING_LOST).unwrap();
    for _ in 0..200 {
        socket.send(&short_ipv4_frame(30));
    }
    assert!(kernel.counter(counter::RING_LOST).unwrap() > lost_before);
    let line = written.wait_for(&["WARN", "records lost on this CPU since the last report"]);
    assert!(
        !line.contains("iface="),
        "losses belong to no interface: {line}"
    );

    // Off: nothing, whatever happens. On again: the lines start afresh. The
    // ring of log records keeps their order, so once the line about the
    // frame sent after the switch is there, any line about the frame sent
    // before it would be there too.
    kernel.set_diagnostics(false).unwrap();
    assert!(!kernel.diagnostics().unwrap());
    socket.send(&short_ipv4_frame(25));
    kernel.set_diagnostics(true).unwrap();
    socket.send(&short_ipv4_frame(26));
    written.wait_for(&["frame too short to parse: 26 bytes"]);
    let lines = written.kernel_lines();
    // What an operator sees (docs/capture.md quotes these).
    for line in &lines {
        eprintln!("{line}");
    }
    assert!(
        !lines.iter().any(|l| l.contains("25 bytes")),
        "logged while off: {lines:#?}"
    );
    let running = lines
        .iter()
        .filter(|l| l.contains("program running") && l.contains("tc_egress"))
        .count();
    assert_eq!(running, 2, "the hook says again that it runs: {lines:#?}");
}

/// Losses several captures share are counted under the mask of their
/// slots. Once no held slot is in a mask its entry goes, so the map does not
/// fill over an agent's life; the losses of a slot still held stay.
#[test]
fn shared_losses_go_once_no_held_slot_is_in_them() {
    if !privileged("shared_losses_go_once_no_held_slot_is_in_them") {
        return;
    }
    let (veth, _namespaces) = linked();
    // One page of ring, never read: it fills after a few records.
    let (mut kernel, _ring) = Kernel::load(4096).unwrap();
    kernel.attach(&veth.a, LinkKind::Ethernet).unwrap();
    let socket = PacketSocket::open(&veth.a, 0x0800);
    let overflow = || {
        for _ in 0..200 {
            socket.send(&short_ipv4_frame(30));
        }
    };
    let lost = |kernel: &Kernel| -> Vec<u64> {
        (0..3).map(|slot| kernel.slot_lost(slot).unwrap()).collect()
    };
    // Slots 0, 1 and 2 lose packets together (mask 0b111), then 0 and 1
    // (0b011).
    for slot in 0..3 {
        kernel.set_slot(slot, everything()).unwrap();
    }
    overflow();
    kernel.clear_slot(2).unwrap();
    let all_three = kernel.slot_lost(2).unwrap();
    assert!(all_three > 0, "the ring never overflowed");
    overflow();
    kernel.clear_slot(0).unwrap();
    kernel.clear_slot(1).unwrap();
    let [zero, one, two] = lost(&kernel)[..] else {
        unreachable!()
    };
    assert!(zero > all_three, "no losses of slots 0 and 1 alone");
    assert_eq!((one, two), (zero, all_three));

    // Slot 2 still held: 0b111 stays, 0b011 goes.
    kernel.prune_lost(0b100);
    assert_eq!(lost(&kernel), [all_three; 3]);
    kernel.prune_lost(0b000);
    assert_eq!(lost(&kernel), [0; 3]);
}

/// Without DEBUG the programs keep quiet: no line even about records lost
/// (a warning, which the INFO filter would show), until a test switches
/// them on.
#[test]
fn no_diagnostics_without_log_level_debug() {
    if !privileged("no_diagnostics_without_log_level_debug") {
        return;
    }
    let (veth, _namespaces) = linked();
    let written = Written::default();
    let _subscriber = written.install(LogLevel::Info);

    let (mut kernel, _ring) = Kernel::load(4096).unwrap();
    assert!(!kernel.diagnostics().unwrap(), "off unless DEBUG");
    kernel.attach(&veth.a, LinkKind::Ethernet).unwrap();
    kernel.set_slot(0, everything()).unwrap();
    let socket = PacketSocket::open(&veth.a, 0x0800);
    for _ in 0..200 {
        socket.send(&short_ipv4_frame(24));
    }
    let lost = kernel.counter(counter::RING_LOST).unwrap();
    assert!(lost > 0, "the ring filled");

    // Switched on, the next losses are reported (from the second packet on
    // a CPU: the first takes the counters as they are): the first line.
    kernel.set_diagnostics(true).unwrap();
    for _ in 0..20 {
        socket.send(&short_ipv4_frame(24));
    }
    written.wait_for(&["records lost on this CPU since the last report"]);
    let lines = written.kernel_lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
}

/// An interface that takes the name of one whose departure was not heard
/// (rtnetlink drops news when its queue overflows) gets the programs, and
/// the old one's departure, heard late, leaves the new one attached.
#[test]
fn a_name_taken_by_a_new_interface_is_attached_again() {
    if !privileged("a_name_taken_by_a_new_interface_is_attached_again") {
        return;
    }
    let node = Netns::new("pcl");
    node.enter();
    let name = "pcreused";
    let create = || {
        run(Command::new("ip").args([
            "link", "add", name, "type", "veth", "peer", "name", "pcpeer",
        ]));
        let c_name = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name; the call only reads it.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(index, 0, "{name} exists");
        index
    };
    let (mut kernel, _ring) = Kernel::load(1 << 16).unwrap();
    kernel.set_slot(0, everything()).unwrap();
    let old = create();
    kernel.link_up(name, LinkKind::Ethernet, old).unwrap();
    assert_eq!(tc_programs(name), ["tc_ingress", "tc_egress"]);

    run(Command::new("ip").args(["link", "del", name]));
    let new = create();
    assert_ne!(old, new);
    kernel.link_up(name, LinkKind::Ethernet, new).unwrap();
    assert_eq!(
        tc_programs(name),
        ["tc_ingress", "tc_egress"],
        "the new one"
    );
    kernel.link_gone(name, old);
    assert_eq!(
        tc_programs(name),
        ["tc_ingress", "tc_egress"],
        "after the old one's departure"
    );
    assert_eq!(kernel.links().collect::<Vec<_>>(), [name]);
    kernel.link_gone(name, new);
    assert!(kernel.links().next().is_none());
}

/// The address maps hold `MAX_PREFIXES` entries. A retarget that keeps
/// them full fits (the old addresses go before the new come); one past
/// their size, or a new capture with no room, is refused and leaves the
/// maps as they were: nothing of it stays to select for the slot's next
/// capture.
#[test]
fn a_retarget_at_the_maps_size_fits_and_one_past_it_changes_nothing() {
    if !privileged("a_retarget_at_the_maps_size_fits_and_one_past_it_changes_nothing") {
        return;
    }
    let (mut kernel, _ring) = Kernel::load(1 << 16).unwrap();
    let hosts = |first: u32, count: u32| -> Vec<IpNet> {
        (first..first + count)
            .map(|i| IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))))
            .collect()
    };
    let only = |nets: &[IpNet]| SlotTargets {
        nets: nets.to_vec(),
        only_nets: true,
        ..everything()
    };
    let selecting = |slots: &[(usize, &[IpNet])]| prefix_masks(slots.iter().copied());
    let room = MAX_PREFIXES;
    let first = hosts(0, room - 256);
    let (second, third) = (hosts(room, 256), hosts(room + 256, 256));
    kernel.set_slot(0, only(&first)).unwrap();
    kernel
        .set_slot(1, only(&second))
        .expect("the maps' last 256 entries");
    kernel
        .set_slot(1, only(&third))
        .expect("256 other addresses in their place");
    let full = selecting(&[(0, &first), (1, &third)]);
    assert_holds(&kernel, &full);

    // Ten of the 256 go, twelve come: two past the maps' size, refused
    // before anything is written.
    let refused = kernel.set_slot(1, only(&hosts(room + 266, 258)));
    let e = refused.expect_err("more addresses than the maps hold");
    assert!(e.to_string().contains("IPV4"), "{e}");
    assert_holds(&kernel, &full);
    kernel
        .set_slot(2, only(&hosts(2 * room, 1)))
        .expect_err("no room for a new capture");
    assert_holds(&kernel, &full);

    // Slot 1 ends: exactly its room is free again for slot 2.
    kernel.clear_slot(1).unwrap();
    let fourth = hosts(2 * room, 256);
    kernel
        .set_slot(2, only(&fourth))
        .expect("the room slot 1 left");
    let now = selecting(&[(0, &first), (2, &fourth)]);
    assert_holds(&kernel, &now);
}

/// The address maps hold `expected` and nothing else, or the first
/// differences are named.
fn assert_holds(kernel: &Kernel, expected: &HashMap<IpNet, u64>) {
    let held = kernel.selected_prefixes().unwrap();
    let extra = held
        .iter()
        .filter(|&(net, mask)| expected.get(net) != Some(mask))
        .map(|(net, mask)| format!("{net} held for {mask:#b}"));
    let missing = expected
        .iter()
        .filter(|(net, _)| !held.contains_key(net))
        .map(|(net, mask)| format!("{net} missing for {mask:#b}"));
    let differences: Vec<String> = extra.chain(missing).take(8).collect();
    assert!(
        differences.is_empty(),
        "{} entries held, {} expected: {differences:?}",
        held.len(),
        expected.len()
    );
}
