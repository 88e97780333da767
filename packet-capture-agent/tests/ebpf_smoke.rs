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
