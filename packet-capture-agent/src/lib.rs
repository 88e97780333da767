//! The packet-capture node agent: captures packets on this node's
//! interfaces with eBPF (or libpcap) and serves the agent API.

pub mod api;
pub mod capture;
pub mod config;
pub mod ebpf;
pub mod files;
pub mod filter;
pub mod kernel_filter;
mod mmap;
pub mod netlink;
pub mod sync;
pub mod tls;
pub mod writer;
