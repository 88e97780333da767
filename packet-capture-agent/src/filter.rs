//! tcpdump filter expressions, compiled by libpcap: run on captured frames
//! in user space, and handed to the kernel (see `kernel_filter`).

use std::fmt::Write as _;

use ipnet::IpNet;
use packet_capture_common::abi::LINK_RAW_IP;
use packet_capture_common::crd::TargetDirection;
pub use packet_capture_common::filter::FilterError;

/// One classic BPF instruction, as libpcap lays it out (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ClassicInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

unsafe extern "C" {
    /// libpcap's classic BPF interpreter (what `pcap_offline_filter`
    /// runs): runs `pc` on `buflen` bytes of a packet that was `wirelen`
    /// bytes long; non-zero means "accept".
    fn bpf_filter(pc: *const ClassicInsn, pkt: *const u8, wirelen: u32, buflen: u32) -> u32;
}

/// What libpcap on Linux calls interfaces whose frames start at the IP
/// header (tun, wireguard): `DLT_RAW` is 12 here (`Linktype::RAW`, 101, is
/// its number in files, which `pcap_compile` does not take).
const DLT_RAW: pcap::Linktype = pcap::Linktype(12);

/// Where a capture's filter runs, as its status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterPlace {
    /// In the kernel for frames of every link type: what it rejects never
    /// reaches user space.
    Kernel,
    /// In user space, for the frames and the reason given (the kernel
    /// runs it for the others).
    UserSpace(String),
}

impl FilterPlace {
    /// What the capture's status says: `kernel`, or `user space (why)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Kernel => "kernel".into(),
            Self::UserSpace(why) => format!("user space ({why})"),
        }
    }
}

/// A compiled tcpdump expression: for Ethernet frames (what user space
/// runs, on frames rebuilt with an Ethernet header), and for frames that
/// start at the IP header, if libpcap compiles it for those.
pub struct Filter {
    program: pcap::BpfProgram,
    raw_ip: Result<pcap::BpfProgram, FilterError>,
    expression: String,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("expression", &self.expression)
            .finish()
    }
}

impl Filter {
    /// Compiles `expression` as tcpdump would for an Ethernet interface
    /// (names refused, see `packet_capture_common::filter`). Blocks: async
    /// callers use [`Filter::compile_async`].
    pub fn compile(expression: &str) -> Result<Self, FilterError> {
        Ok(Self {
            program: packet_capture_common::filter::compile(expression)?,
            raw_ip: packet_capture_common::filter::compile_for(expression, DLT_RAW),
            expression: expression.to_owned(),
        })
    }

    /// [`Filter::compile`] on tokio's blocking pool, within
    /// `packet_capture_common::filter::COMPILE_TIMEOUT`.
    pub async fn compile_async(expression: &str) -> Result<Self, FilterError> {
        let program = packet_capture_common::filter::compile_async(expression).await?;
        let raw_ip = packet_capture_common::filter::compile_async_for(expression, DLT_RAW).await;
        // Busy says nothing of the expression: not a reason to run it in
        // user space on raw-IP interfaces.
        if let Err(e @ FilterError::Busy(_)) = raw_ip {
            return Err(e);
        }
        Ok(Self {
            program,
            raw_ip,
            expression: expression.to_owned(),
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The classic program for frames of `link` (`LINK_ETHERNET`,
    /// `LINK_RAW_IP`), or why libpcap has none.
    pub fn classic(&self, link: u8) -> Result<&[ClassicInsn], &FilterError> {
        if link == LINK_RAW_IP {
            self.raw_ip.as_ref().map(instructions)
        } else {
            Ok(instructions(&self.program))
        }
    }

    /// Whether the frame passes; `data` may be shorter than `wire_len`.
    pub fn matches(&self, data: &[u8], wire_len: u32) -> bool {
        run_classic(instructions(&self.program), data, wire_len)
    }
}

fn instructions(program: &pcap::BpfProgram) -> &[ClassicInsn] {
    let insns = program.get_instructions();
    // SAFETY: pcap::BpfInstruction is a transparent `struct bpf_insn`, laid
    // out as ClassicInsn, and lives as long as the program.
    unsafe { std::slice::from_raw_parts(insns.as_ptr().cast::<ClassicInsn>(), insns.len()) }
}

/// Runs a classic program with libpcap's interpreter (as
/// `pcap_offline_filter` does); `data` may be shorter than `wire_len`. An
/// empty program accepts everything.
pub fn run_classic(insns: &[ClassicInsn], data: &[u8], wire_len: u32) -> bool {
    if insns.is_empty() {
        return true;
    }
    // SAFETY: the program outlives the call, and bpf_filter checks every
    // load against `buflen`.
    unsafe { bpf_filter(insns.as_ptr(), data.as_ptr(), wire_len, data.len() as u32) != 0 }
}

/// The tcpdump expression that selects what a capture asks for:
/// `(host a or net b) and (port x or port y) and (filter)`, each part left
/// out when it is empty; `dst host`, `dst net` for packets to the targets
/// (ingress), `src ...` for packets from them (egress).
pub fn selection_expression(
    targets: &[IpNet],
    ports: &[u16],
    direction: TargetDirection,
    filter: &str,
) -> String {
    let mut parts = Vec::new();
    if !targets.is_empty() {
        let qualifier = match direction {
            TargetDirection::Both => "",
            TargetDirection::Ingress => "dst ",
            TargetDirection::Egress => "src ",
        };
        let mut hosts = String::new();
        for (i, net) in targets.iter().enumerate() {
            let sep = if i == 0 { "" } else { " or " };
            if net.prefix_len() == net.max_prefix_len() {
                let _ = write!(hosts, "{sep}{qualifier}host {}", net.addr());
            } else {
                let _ = write!(hosts, "{sep}{qualifier}net {net}");
            }
        }
        parts.push(format!("({hosts})"));
    }
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(|p| format!("port {p}")).collect();
        parts.push(format!("({})", list.join(" or ")));
    }
    if !filter.trim().is_empty() {
        parts.push(format!("({filter})"));
    }
    parts.join(" and ")
}

/// `expression` (empty: everything) without the TCP of the agent's own API
/// at `api`, as the eBPF programs leave it out.
pub fn without_own_api(expression: &str, api: std::net::SocketAddr) -> String {
    let (ip, port) = (api.ip(), api.port());
    let own = format!(
        "not (tcp and ((src host {ip} and src port {port}) or (dst host {ip} and dst port {port})))"
    );
    if expression.trim().is_empty() {
        own
    } else {
        format!("({expression}) and {own}")
    }
}

/// `expression` for frames with up to two VLAN tags too, as the eBPF
/// programs match targets through tags: libpcap only looks past a tag after
/// `vlan`, which shifts the offsets of what follows.
pub fn through_vlans(expression: &str) -> String {
    if expression.trim().is_empty() {
        return String::new();
    }
    format!("({expression}) or (vlan and (({expression}) or (vlan and ({expression}))))")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_carry_libpcaps_message() {
        let err = Filter::compile("tcp and and").unwrap_err().to_string();
        assert!(err.contains("syntax error"), "{err}");
        let err = Filter::compile("port 99999").unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn runs_on_frames_with_the_wire_length() {
        let mut frame = vec![0u8; 60];
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[14] = 0x45;
        frame[23] = 17; // UDP
        let udp = Filter::compile("udp").unwrap();
        let tcp = Filter::compile("tcp").unwrap();
        assert!(udp.matches(&frame, 60));
        assert!(!tcp.matches(&frame, 60));
        let long = Filter::compile("greater 1000").unwrap();
        assert!(
            long.matches(&frame, 1500),
            "uses the wire length, not the bytes kept"
        );
        assert!(!long.matches(&frame, 60));
        assert!(Filter::compile("").unwrap().matches(&frame, 60));
    }

    #[test]
    fn selection_expressions() {
        let targets: Vec<IpNet> = ["10.0.0.1/32", "10.1.0.0/16", "fd00::1/128"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            selection_expression(&targets, &[80, 443], TargetDirection::Both, "tcp"),
            "(host 10.0.0.1 or net 10.1.0.0/16 or host fd00::1) and (port 80 or port 443) and (tcp)"
        );
        assert_eq!(
            selection_expression(&targets[..2], &[], TargetDirection::Ingress, ""),
            "(dst host 10.0.0.1 or dst net 10.1.0.0/16)"
        );
        assert_eq!(
            selection_expression(&targets[2..], &[], TargetDirection::Egress, ""),
            "(src host fd00::1)"
        );
        assert_eq!(
            selection_expression(&[], &[], TargetDirection::Egress, " "),
            ""
        );
        for direction in TargetDirection::ALL {
            let e = selection_expression(&targets, &[53], direction, "udp");
            Filter::compile(&e).expect("libpcap accepts what we generate");
            Filter::compile(&through_vlans(&e)).expect("and its VLAN form");
        }
        assert_eq!(through_vlans(""), "");
    }
}
