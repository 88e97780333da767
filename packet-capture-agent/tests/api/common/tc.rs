//! What is attached to an interface's TC hooks, as the kernel reports it.

use aya::programs::{SchedClassifier, TcAttachType};

/// Names of the programs on the TCX hooks of `iface`, in the calling
/// thread's namespace (bpftool 7.1 predates TCX and does not list them).
pub fn tc_programs(iface: &str) -> Vec<String> {
    let iface = std::ffi::CString::new(iface).expect("an interface name");
    let mut names = Vec::new();
    for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, programs) = SchedClassifier::query_tcx(&iface, hook).expect("query TCX");
        names.extend(
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
        );
    }
    names
}
