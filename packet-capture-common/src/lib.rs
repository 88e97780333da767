//! Types shared by the three sides of packet-capture.
//!
//! [`abi`] is the contract between the eBPF programs and the agent and is
//! `no_std`; everything else (the `PacketCaptureConfig` custom resource, its
//! validation, the capture spec the agent accepts) needs the `user` feature,
//! [`filter`] (libpcap) the `filter` feature, and [`tls`] the `tls` feature.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod abi;

#[cfg(feature = "user")]
pub mod aggregated;
#[cfg(feature = "user")]
pub mod crd;
#[cfg(feature = "filter")]
pub mod filter;
#[cfg(feature = "user")]
pub mod logging;
#[cfg(feature = "user")]
pub mod pcapng;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "user")]
pub mod validate;
#[cfg(feature = "user")]
pub mod validators;
