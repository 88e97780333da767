//! The embedded eBPF object loads on this kernel, attaches to both TC hooks
//! of a veth, sees real traffic, and leaves nothing behind when detached.

use std::process::Command;

use packet_capture_agent::ebpf::{Kernel, LinkKind};
use packet_capture_test_support::{Netns, VethPair, netns::run, privileged};
use tc::tc_programs;

#[path = "api/common/tc.rs"]
mod tc;

#[test]
fn loads_attaches_sees_traffic_and_detaches() {
    if !privileged("loads_attaches_sees_traffic_and_detaches") {
        return;
    }
    let left = Netns::new("pcl");
    let right = Netns::new("pcr");
    let veth = VethPair::new(&left, &["10.99.0.1/24"], &right, &["10.99.0.2/24"]);
    left.enter();

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

    let before = kernel.packets_seen().unwrap();
    run(Command::new("ping").args(["-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"]));
    // Three requests out and three replies in, plus whatever ARP/ND the
    // kernel sent: at least six.
    let seen = kernel.packets_seen().unwrap() - before;
    assert!(seen >= 6, "the programs saw {seen} packets");

    kernel.detach(&veth.a);
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
    let left = Netns::new("pcl");
    let right = Netns::new("pcr");
    let veth = VethPair::new(&left, &["10.99.0.1/24"], &right, &["10.99.0.2/24"]);
    run(left
        .command("tc")
        .args(["qdisc", "add", "dev", &veth.a, "clsact"]));
    left.enter();

    let (mut ours, _r1) = Kernel::load(1 << 16).unwrap();
    let (mut theirs, _r2) = Kernel::load(1 << 16).unwrap();
    theirs.attach(&veth.a, LinkKind::Ethernet).unwrap();
    ours.attach(&veth.a, LinkKind::Ethernet).unwrap();
    assert_eq!(tc_programs(&veth.a).len(), 4);

    let (ours_before, theirs_before) =
        (ours.packets_seen().unwrap(), theirs.packets_seen().unwrap());
    run(Command::new("ping").args(["-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"]));
    let ours_seen = ours.packets_seen().unwrap() - ours_before;
    let theirs_seen = theirs.packets_seen().unwrap() - theirs_before;
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
    let qdiscs = run(left.command("tc").args(["qdisc", "show", "dev", &veth.a]));
    assert!(
        String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
        "the clsact qdisc stays"
    );
}
