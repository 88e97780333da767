//! The packet-capture node agent.

pub mod ebpf;
