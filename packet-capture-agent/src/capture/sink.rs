//! Where one capture's packets go: its filter, its limits, its writer.
//!
//! A sink lives on the thread that reads packets and is called once per
//! packet that matched the capture's targets, without allocating.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::broadcast;

use super::copies::Copies;
use super::stdout::Lines;
use crate::files::{Full, Output};
use crate::filter::Filter;
use crate::writer::{Encoder, InterfaceNames, Meta};

/// Counters a capture publishes while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets written (or logged).
    pub packets: AtomicU64,
    /// Packets that matched the targets but not the filter, in user space.
    pub filtered: AtomicU64,
    /// Those the filter rejected in the kernel, once the capture ended
    /// (the backend counts them while it runs).
    pub filtered_in_kernel: AtomicU64,
    /// Packets lost in user space (a failed write).
    pub dropped: AtomicU64,
    /// Bytes of the capture file so far.
    pub bytes: AtomicU64,
}

/// Why a capture ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    MaxPackets(u64),
    Duration(u64),
    FileSize(u64),
    Stopped,
    Shutdown,
    Error(String),
}

impl EndReason {
    /// The sentence a status carries.
    pub fn message(&self) -> String {
        match self {
            Self::MaxPackets(n) => format!("reached maxPackets ({n})"),
            Self::Duration(s) => format!("duration of {s}s elapsed"),
            Self::FileSize(bytes) => format!(
                "stopped at the file size limit (MAX_CAPTURE_FILE_SIZE_MB, {} bytes)",
                bytes
            ),
            Self::Stopped => packet_capture_common::crd::STOPPED_BY_REQUEST.into(),
            Self::Shutdown => "stopped: the agent is shutting down".into(),
            Self::Error(e) => e.clone(),
        }
    }
}

/// A recorded packet, for live readers ([`crate::capture::Engine::stream`]).
#[derive(Debug)]
pub struct Tapped {
    pub meta: Meta,
    pub interface: Arc<str>,
    pub data: Box<[u8]>,
    /// Counts `data` against its tap's [`TAP_BYTES`] while it lives.
    _held: HeldBytes,
}

/// Packets held for live readers of one capture: a reader this far behind
/// loses the oldest, and is told how many.
pub const TAP_PACKETS: usize = 1024;
/// Bytes of packets held for the live readers of one capture (64-KiB
/// segmentation-offload frames would make [`TAP_PACKETS`] of them 64 MiB):
/// past it the next packets are withheld from every reader, and each is
/// told how many.
pub const TAP_BYTES: usize = 16 << 20;
/// Live readers of one capture at once. Each may hold its own encoded copy
/// of up to a batch in its connection's buffers, so their number, not the
/// tap, bounds what a reader that stops reading costs the agent's memory.
pub const TAP_READERS: usize = 8;

/// Why a capture has no new reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReader {
    /// The sink has ended.
    Ended,
    /// [`TAP_READERS`] read it already.
    Full,
}

/// The sink's end of its live readers' channel: sending never waits, a
/// slow reader loses. Whether anyone reads is an atomic the sink reads for
/// every packet, rather than the channel's count, which takes its lock.
pub struct Tap {
    sender: broadcast::Sender<Arc<Tapped>>,
    readers: Arc<AtomicUsize>,
    /// Bytes of the packets some reader has yet to take or drop.
    held: Arc<AtomicUsize>,
    /// Packets withheld for [`TAP_BYTES`], since the capture started.
    withheld: Arc<AtomicU64>,
}

/// Subscribes readers to a capture's [`Tap`] while its sink lives.
#[derive(Clone)]
pub struct TapHandle {
    sender: broadcast::WeakSender<Arc<Tapped>>,
    readers: Arc<AtomicUsize>,
    withheld: Arc<AtomicU64>,
}

impl Tap {
    pub fn new() -> (Self, TapHandle) {
        let (sender, _) = broadcast::channel(TAP_PACKETS);
        let readers = Arc::new(AtomicUsize::new(0));
        let withheld = Arc::new(AtomicU64::new(0));
        let handle = TapHandle {
            sender: sender.downgrade(),
            readers: readers.clone(),
            withheld: withheld.clone(),
        };
        let held = Arc::default();
        let tap = Self {
            sender,
            readers,
            held,
            withheld,
        };
        (tap, handle)
    }

    fn has_readers(&self) -> bool {
        self.readers.load(Ordering::Relaxed) > 0
    }

    /// Hands a packet to the readers, unless they hold [`TAP_BYTES`].
    fn offer(&self, meta: &Meta, interface: &str, data: &[u8]) {
        let bytes = data.len();
        if self.held.load(Ordering::Relaxed) + bytes > TAP_BYTES {
            self.withheld.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.held.fetch_add(bytes, Ordering::Relaxed);
        // Fails only when the last reader left in between; the packet's
        // bytes are given back as it is dropped.
        let _ = self.sender.send(Arc::new(Tapped {
            meta: *meta,
            interface: interface.into(),
            data: data.into(),
            _held: HeldBytes {
                bytes,
                held: self.held.clone(),
            },
        }));
    }
}

/// Bytes counted in a tap's `held` until dropped.
#[derive(Debug)]
struct HeldBytes {
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl TapHandle {
    /// A reader of the packets recorded from now on, unless the sink has
    /// ended or has [`TAP_READERS`] already.
    pub fn subscribe(&self) -> Result<Reader, NoReader> {
        let sender = self.sender.upgrade().ok_or(NoReader::Ended)?;
        self.readers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < TAP_READERS).then_some(n + 1)
            })
            .map_err(|_| NoReader::Full)?;
        Ok(Reader {
            packets: sender.subscribe(),
            readers: self.readers.clone(),
            withheld_seen: self.withheld.load(Ordering::Relaxed),
            withheld: self.withheld.clone(),
        })
    }
}

/// One live reader, counted while it lives; its packets end when the
/// capture does.
pub struct Reader {
    packets: broadcast::Receiver<Arc<Tapped>>,
    readers: Arc<AtomicUsize>,
    withheld: Arc<AtomicU64>,
    /// Of `withheld`, those already counted by this reader (or from before
    /// it came).
    withheld_seen: u64,
}

impl Reader {
    pub async fn recv(&mut self) -> Result<Arc<Tapped>, broadcast::error::RecvError> {
        self.packets.recv().await
    }

    pub fn try_recv(&mut self) -> Result<Arc<Tapped>, broadcast::error::TryRecvError> {
        self.packets.try_recv()
    }

    /// Packets withheld from this reader (for [`TAP_BYTES`]) since the
    /// last call.
    pub fn withheld(&mut self) -> u64 {
        let now = self.withheld.load(Ordering::Relaxed);
        let new = now - self.withheld_seen;
        self.withheld_seen = now;
        new
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a capture's end waits for its lines to reach the standard
/// output; a pipe that takes nothing for that long is not being read.
const STDOUT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Lines gathered before they are handed to the standard output's writer.
const STDOUT_CHUNK: usize = 256 * 1024;

pub enum Destination {
    File(Output),
    /// `PACKET:` lines on the agent's standard output, gathered in `buf`.
    Stdout {
        buf: Vec<u8>,
        out: Lines,
    },
    /// Nowhere but the live readers ([`Tap`]): `outputFormat: stream`.
    Live,
}

impl Destination {
    /// Lines on the agent's standard output.
    pub fn stdout() -> Self {
        Self::Stdout {
            buf: Vec::with_capacity(64 * 1024),
            out: Lines::stdout(),
        }
    }
}

/// What a sink leaves behind when it ends.
#[derive(Debug)]
pub struct Finished {
    pub reason: EndReason,
    /// The complete file and its size, for file captures.
    pub file: Option<(std::path::PathBuf, u64)>,
}

pub struct Sink {
    pub id: String,
    /// Bytes this agent has written to capture files, all captures together.
    written: Arc<AtomicU64>,
    filter: Option<Filter>,
    /// The packets seen lately, to leave out their copies on other
    /// interfaces; `None` keeps every copy.
    copies: Option<Copies>,
    snaplen: usize,
    max_packets: u64,
    encoder: Encoder,
    destination: Destination,
    counters: Arc<Counters>,
    /// Live readers ([`Tap`]).
    tap: Tap,
    packets: u64,
    /// Packets gathered in the output buffer, not yet in the file (or
    /// handed to the standard output's writer).
    buffered: u64,
    /// Whether a packet the encoder refused was logged (once per capture:
    /// the same cause would refuse every packet after it).
    refusal_logged: bool,
}

impl Sink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        written: Arc<AtomicU64>,
        filter: Option<Filter>,
        copies: Option<Copies>,
        snaplen: u32,
        max_packets: u64,
        mut encoder: Encoder,
        mut destination: Destination,
        counters: Arc<Counters>,
        tap: Tap,
    ) -> Self {
        if let Destination::File(output) = &mut destination {
            // A new, empty file always has room for its header.
            let _ = output.append_header(|b| encoder.file_header(b));
            counters.bytes.store(output.size(), Ordering::Relaxed);
        }
        Self {
            id,
            written,
            filter,
            copies,
            snaplen: snaplen as usize,
            max_packets,
            encoder,
            destination,
            counters,
            tap,
            packets: 0,
            buffered: 0,
            refusal_logged: false,
        }
    }

    /// The capture's filter, which the backend may run in the kernel too.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }

    /// Takes one packet (which passed the filter already if
    /// `filtered_in_kernel`); returns why the capture must end, if it must.
    pub fn offer(
        &mut self,
        meta: &Meta,
        frame: &[u8],
        names: &impl InterfaceNames,
        filtered_in_kernel: bool,
    ) -> Option<EndReason> {
        if !filtered_in_kernel
            && let Some(filter) = &self.filter
            && !filter.matches(frame, meta.orig_len)
        {
            self.counters.filtered.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // Among the packets the filter keeps: a copy of one that matched at
        // another interface is left out.
        if let Some(copies) = &mut self.copies
            && copies.is_copy(meta, frame)
        {
            return None;
        }
        let kept = &frame[..frame.len().min(self.snaplen)];
        let encoded = match &mut self.destination {
            Destination::File(output) => {
                let encoder = &mut self.encoder;
                let mut encoded = Ok(());
                if output.append(|b| encoded = encoder.encode(b, meta, kept, names)) == Err(Full) {
                    return Some(EndReason::FileSize(output.size()));
                }
                self.counters.bytes.store(output.size(), Ordering::Relaxed);
                encoded
            }
            Destination::Stdout { buf, .. } => self.encoder.encode(buf, meta, kept, names),
            Destination::Live => Ok(()),
        };
        if let Err(e) = encoded {
            // Nothing of the packet was written: it is lost, and counted so.
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.refusal_logged {
                self.refusal_logged = true;
                tracing::warn!(capture = %self.id, "{e}");
            }
            return None;
        }
        self.buffered += 1;
        self.packets += 1;
        // Added, not stored: the standard output's writer takes back the
        // packets of lines it fails to write.
        self.counters.packets.fetch_add(1, Ordering::Relaxed);
        if self.tap.has_readers() {
            self.tap.offer(meta, names.name(meta.ifindex), kept);
        }
        if self.packets >= self.max_packets {
            return Some(EndReason::MaxPackets(self.max_packets));
        }
        match &self.destination {
            Destination::File(output) if output.wants_flush() => self.flush().err(),
            // Handed over in chunks well under what may wait, however
            // many packets a backend offers between flushes.
            Destination::Stdout { buf, .. } if buf.len() >= STDOUT_CHUNK => self.flush().err(),
            _ => None,
        }
    }

    /// Writes what has gathered. A failed write loses the buffered packets
    /// (counted as dropped) and ends the capture; the file keeps its whole
    /// records. Lines the standard output has no room for lose their
    /// packets too, but the capture goes on.
    pub fn flush(&mut self) -> Result<(), EndReason> {
        match &mut self.destination {
            Destination::File(output) => match output.flush_counted() {
                Ok(bytes) => {
                    self.written.fetch_add(bytes, Ordering::Relaxed);
                    self.buffered = 0;
                    Ok(())
                }
                Err(e) => {
                    let kept = if output.lacks_header() {
                        "not even its header fit: the file is removed"
                    } else {
                        "the file ends at the last whole packet"
                    };
                    let message = format!("writing {}: {e}; {kept}", output.final_path().display());
                    self.lose_buffered();
                    Err(EndReason::Error(message))
                }
            },
            Destination::Stdout { buf, out } => {
                if !buf.is_empty() {
                    // The next lines are likely as many as these.
                    let lines = std::mem::replace(buf, Vec::with_capacity(buf.len()));
                    match out.send(lines, self.buffered, &self.counters) {
                        Ok(()) => self.buffered = 0,
                        Err(refused) => {
                            *buf = refused;
                            buf.clear();
                            self.lose_buffered();
                        }
                    }
                }
                Ok(())
            }
            Destination::Live => {
                self.buffered = 0;
                Ok(())
            }
        }
    }

    fn lose_buffered(&mut self) {
        self.packets -= self.buffered;
        self.counters
            .packets
            .fetch_sub(self.buffered, Ordering::Relaxed);
        self.counters
            .dropped
            .fetch_add(self.buffered, Ordering::Relaxed);
        self.buffered = 0;
    }

    /// Drops a capture that never started, with its unfinished file.
    pub fn abandon(self) {
        if let Destination::File(output) = self.destination {
            output.abandon();
        }
    }

    /// Ends the capture: the rest is written and the file gets its name.
    pub fn finish(mut self, reason: EndReason) -> Finished {
        let reason = match self.flush() {
            Err(e) if !matches!(reason, EndReason::Error(_)) => e,
            _ => reason,
        };
        match self.destination {
            Destination::File(output) => {
                let path = output.final_path().to_path_buf();
                // The failed write that left it so has said the file goes.
                let headerless = output.lacks_header();
                match output.commit() {
                    Ok((path, size)) => {
                        self.counters.bytes.store(size, Ordering::Relaxed);
                        Finished {
                            reason,
                            file: Some((path, size)),
                        }
                    }
                    Err(e) => Finished {
                        reason: match reason {
                            EndReason::Error(_) if headerless => reason,
                            EndReason::Error(first) => EndReason::Error(format!(
                                "{first}; then finishing {}: {e}",
                                path.display()
                            )),
                            _ => EndReason::Error(format!("finishing {}: {e}", path.display())),
                        },
                        file: None,
                    },
                }
            }
            Destination::Stdout { out, .. } => {
                // The end is told after the capture's lines, unless the
                // standard output is not being read.
                out.written(STDOUT_WAIT);
                Finished { reason, file: None }
            }
            Destination::Live => Finished { reason, file: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::Direction;

    /// A reader that takes nothing holds at most TAP_BYTES: the packets
    /// past them are withheld and counted, and once it has taken what it
    /// holds, packets come again.
    #[test]
    fn a_slow_reader_holds_at_most_the_taps_bytes() {
        let (tap, handle) = Tap::new();
        let mut reader = handle.subscribe().unwrap();
        let meta = Meta {
            unix_ns: 0,
            ifindex: 1,
            direction: Direction::In,
            orig_len: 0,
        };
        let frame = vec![0u8; 1 << 20];
        let fit = TAP_BYTES / frame.len();
        for _ in 0..fit + 5 {
            tap.offer(&meta, "eth0", &frame);
        }
        assert_eq!(reader.withheld(), 5);
        assert_eq!(reader.withheld(), 0, "counted once");
        let mut taken = 0;
        while reader.try_recv().is_ok() {
            taken += 1;
        }
        assert_eq!(taken, fit);
        tap.offer(&meta, "eth0", &frame);
        assert!(reader.try_recv().is_ok());
        assert_eq!(reader.withheld(), 0);
        // One who comes later is not told of what was withheld before.
        assert_eq!(handle.subscribe().unwrap().withheld(), 0);
    }

    #[test]
    fn readers_are_counted_up_to_the_limit() {
        let (tap, handle) = Tap::new();
        let readers: Vec<Reader> = (0..TAP_READERS)
            .map(|_| handle.subscribe().unwrap())
            .collect();
        assert_eq!(handle.subscribe().err(), Some(NoReader::Full));
        drop(readers);
        assert!(!tap.has_readers());
        let reader = handle.subscribe().unwrap();
        drop(tap);
        drop(reader);
        assert_eq!(handle.subscribe().err(), Some(NoReader::Ended));
    }
}
