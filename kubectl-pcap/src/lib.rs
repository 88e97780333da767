//! The parts of `kubectl pcap` that other code can use without a terminal:
//! the spec its flags make ([`spec`]), the aggregated API and what its
//! errors mean ([`api`]), the merge of many nodes' capture files into one
//! pcapng ([`merge`]), and its tables ([`show`]).

pub mod api;
pub mod merge;
pub mod show;
pub mod spec;
