//! What the engine asks of a capture backend: follow the interfaces, run a
//! capture into its sink, and hand back a handle that owns the capture's
//! loss counter and its end.
//!
//! A backend reports every sink that ended, whatever the reason, as an
//! [`Ended`] on the channel it was built with; the engine then drops the
//! capture's [`Running`] handle, which is when the backend takes back what
//! the capture held (its eBPF slot, its thread).

use std::collections::HashMap;

use ipnet::IpNet;
use packet_capture_common::crd::TargetDirection;

use super::sink::{EndReason, Finished, Sink};
use crate::filter::FilterPlace;
use crate::netlink::Link;

/// What a capture selects in the kernel and how much of each packet the
/// kernel must hand over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Empty: any address, unless `only_targets`.
    pub targets: Vec<IpNet>,
    /// Only `targets`: none selects nothing.
    pub only_targets: bool,
    /// Empty: any port.
    pub ports: Vec<u16>,
    /// Whether a target must be the destination, the source, or either.
    pub direction: TargetDirection,
    /// Bytes of each packet to copy: the snaplen, or more when the capture
    /// has a filter that may look further.
    pub copy_len: u32,
}

impl Selection {
    /// Whether the capture selects every address.
    pub fn any_address(&self) -> bool {
        self.targets.is_empty() && !self.only_targets
    }
}

/// A sink that ended, reported by a backend.
pub struct Ended {
    pub id: String,
    pub finished: Finished,
}

/// Where a backend reports ended sinks.
pub type EndedTx = tokio::sync::mpsc::UnboundedSender<Ended>;

/// A way of capturing: the engine holds one behind this trait and never
/// asks which it is.
pub trait Backend: Send + Sync {
    /// `ebpf` or `pcap`, as the API and the metrics report it.
    fn name(&self) -> &'static str;

    /// The interfaces being captured on, sorted.
    fn interfaces(&self) -> Vec<String>;

    /// An interface appeared, or one of its index got a new name or type.
    fn link_up(&self, link: &Link);

    /// An interface went away.
    fn link_gone(&self, name: &str, index: u32);

    /// Every interface's name by index, for the formats that name them.
    fn set_names(&self, names: HashMap<u32, String>);

    /// Starts capturing what `selection` selects into `sink`. On failure
    /// nothing runs and the sink's unfinished file is gone.
    fn add(
        &self,
        id: &str,
        selection: &Selection,
        sink: Sink,
    ) -> Result<Box<dyn Running>, BackendError>;

    /// The log level changed: kernel-side diagnostics follow it (on at
    /// DEBUG) without reloading anything.
    fn log_level_changed(&self) {}

    /// Matched records the kernel had no room for, all captures together.
    fn ring_lost(&self) -> u64 {
        0
    }

    /// Stops the backend once every capture has ended, and lets go of the
    /// interfaces.
    fn shutdown(&self);
}

/// One running capture, as its backend holds it. Dropping the handle ends
/// the capture if it still runs and gives back what it held; the engine
/// drops it once the capture's [`Ended`] has arrived.
pub trait Running: Send + Sync {
    /// Packets the kernel lost for this capture since it started.
    fn lost(&self) -> u64;

    /// Where the capture's filter runs; `None` without a filter.
    fn filter_place(&self) -> Option<FilterPlace>;

    /// Packets the capture's filter rejected in the kernel (the sink
    /// counts those it rejects itself).
    fn filtered_in_kernel(&self) -> u64 {
        0
    }

    /// Makes the capture select `selection` from now on, without a gap for
    /// what both the old and the new selection select.
    fn retarget(&self, selection: &Selection) -> Result<(), BackendError>;

    /// Asks the capture to end: what the kernel selected before is written,
    /// then the sink is finished and reported as [`Ended`].
    fn end(&self, reason: EndReason);
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The programs did not load (the message says which and why).
    #[error(transparent)]
    Load(#[from] crate::ebpf::Error),
    #[error("the agent runs {0} captures already")]
    Full(usize),
    #[error("the ring-buffer reader has stopped")]
    ReaderStopped,
    #[error("programming the kernel maps: {0}")]
    Maps(#[source] crate::ebpf::Error),
    #[error(
        "the node's address maps have no room for these targets: {0} (every \
         capture's distinct prefixes together)"
    )]
    MapsFull(crate::ebpf::Error),
    #[error("targetIPs: {count} entries, the libpcap backend takes at most {max}")]
    TooManyTargets { count: usize, max: usize },
    #[error("libpcap could not open any interface: {}", join(.0))]
    NoInterface(Vec<super::pcap::OpenError>),
    #[error("starting the ring-buffer reader: {0}")]
    Reader(#[source] std::io::Error),
    #[error("starting the capture thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The capture no longer selects packets: it is ending.
    #[error("the capture has ended")]
    Ended,
}

impl BackendError {
    /// The error of programming the maps, telling full ones apart.
    pub fn of_maps(e: crate::ebpf::Error) -> Self {
        match e {
            crate::ebpf::Error::Full { .. } => Self::MapsFull(e),
            e => Self::Maps(e),
        }
    }
}

fn join(errors: &[super::pcap::OpenError]) -> String {
    if errors.is_empty() {
        return "there are none".to_owned();
    }
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
