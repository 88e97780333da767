//! Where one capture's packets go: its filter, its limits, its writer.
//!
//! A sink lives on the thread that reads packets and is called once per
//! packet that matched the capture's targets, without allocating.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::copies::Copies;
use super::stdout::Lines;
use crate::files::{Full, Output};
use crate::filter::Filter;
use crate::sync::lock;
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
    /// Its number among the packets the capture recorded, from 1.
    pub number: u64,
    pub meta: Meta,
    pub interface: Arc<str>,
    pub data: Box<[u8]>,
    /// Counts it against its tap's [`TAP_BYTES`] while it lives.
    _held: HeldBytes,
}

/// Bytes of packets held for the live readers of one capture, each counted
/// with [`PACKET_OVERHEAD`]: the latest packets, which a reader this far
/// behind loses the oldest of, and what readers have taken but not yet
/// sent. Past it the next packets are withheld from every reader, and
/// each is told how many.
pub const TAP_BYTES: usize = 16 << 20;
/// What a held packet costs beside its bytes: the [`Tapped`], its `Arc`,
/// its place in the queue and the allocator's headers. Counted so that
/// small frames cannot hold many times [`TAP_BYTES`].
const PACKET_OVERHEAD: usize = 160;
/// Live readers of one capture at once. Each may hold its own encoded copy
/// of up to a batch in its connection's buffers, so their number, not the
/// tap, bounds what a reader that stops reading costs the agent's memory.
pub const TAP_READERS: usize = 8;
/// How long a capture keeps its latest packets (within [`TAP_BYTES`])
/// once its last live reader has gone, for a reader whose stream broke off
/// to come back for what it missed: longer than `kubectl pcap stream`
/// tries to open its stream again (63.5 s).
pub const REPLAY_FOR: Duration = Duration::from_secs(90);
/// Packets a reader takes from the queue at a time.
const READ_CHUNK: usize = 256;

/// Why a capture has no new reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReader {
    /// The sink has ended.
    Ended,
    /// [`TAP_READERS`] read it already.
    Full,
}

/// What a capture's sink and its live readers share.
struct Shared {
    readers: AtomicUsize,
    /// The number of the last packet recorded.
    recorded: AtomicU64,
    queue: Mutex<Queue>,
    /// Set by a reader about to wait for packets; the sink wakes the
    /// readers only then, not for every packet.
    waiting: AtomicBool,
    arrived: Notify,
    /// Until when (milliseconds from `since`) the packets are kept with no
    /// reader.
    keep_until: AtomicU64,
    since: Instant,
}

/// The packets every live reader reads from, each at its own place: while
/// someone reads and for [`REPLAY_FOR`] after, the latest within
/// [`TAP_BYTES`], oldest first, numbers rising.
#[derive(Default)]
struct Queue {
    packets: VecDeque<Arc<Tapped>>,
    /// The sink has ended: no more packets, and no new reader.
    ended: bool,
}

impl Shared {
    fn now(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        lock(&self.queue)
    }
}

/// The sink's end of its live readers' queue: it never waits for a
/// reader, a slow reader loses. Whether anyone reads is an atomic the sink
/// reads for every packet, rather than anything behind the queue's lock.
pub struct Tap {
    shared: Arc<Shared>,
    /// Bytes (with [`PACKET_OVERHEAD`]) of the packets queued or taken by
    /// a reader and not yet sent.
    held: Arc<AtomicUsize>,
    /// The number of the last packet recorded.
    recorded: u64,
    /// Whether the queue may hold packets.
    keeping: bool,
    /// The name of the interface of the last packet queued, shared by the
    /// packets that follow on it.
    interface: Option<Arc<str>>,
}

/// Subscribes readers to a capture's [`Tap`] while its sink lives.
#[derive(Clone)]
pub struct TapHandle {
    shared: Arc<Shared>,
}

impl Tap {
    pub fn new() -> (Self, TapHandle) {
        let shared = Arc::new(Shared {
            readers: AtomicUsize::new(0),
            recorded: AtomicU64::new(0),
            queue: Mutex::default(),
            waiting: AtomicBool::new(false),
            arrived: Notify::new(),
            keep_until: AtomicU64::new(0),
            since: Instant::now(),
        });
        let handle = TapHandle {
            shared: shared.clone(),
        };
        let tap = Self {
            shared,
            held: Arc::default(),
            recorded: 0,
            keeping: false,
            interface: None,
        };
        (tap, handle)
    }

    /// Numbers a recorded packet; whether to [`Tap::offer`] it: while a
    /// reader reads or may come back.
    fn record(&mut self) -> bool {
        self.recorded += 1;
        // Relaxed, as the readers' count below: a packet recorded at the
        // very moment a reader comes may reach it or be counted lost to it.
        self.shared.recorded.store(self.recorded, Ordering::Relaxed);
        self.streamed()
    }

    /// Whether a reader reads, or may come back for what it missed.
    fn streamed(&mut self) -> bool {
        // Acquire: a count the last reader lowered comes with how long it
        // asked for the packets to be kept.
        if self.shared.readers.load(Ordering::Acquire) > 0 {
            self.keeping = true;
            return true;
        }
        if !self.keeping {
            return false;
        }
        if self.shared.now() < self.shared.keep_until.load(Ordering::Relaxed) {
            return true;
        }
        // No one came back in time.
        self.keeping = false;
        self.shared.queue().packets.clear();
        false
    }

    /// Queues the packet just recorded for the readers, unless what they
    /// hold besides the queue leaves no room for it within [`TAP_BYTES`]:
    /// the oldest queued packets make room first.
    fn offer(&mut self, meta: &Meta, interface: &str, data: &[u8]) {
        let cost = data.len() + PACKET_OVERHEAD;
        let interface = match &self.interface {
            Some(name) if **name == *interface => name.clone(),
            _ => self.interface.insert(interface.into()).clone(),
        };
        {
            let mut queue = self.shared.queue();
            while self.held.load(Ordering::Relaxed) + cost > TAP_BYTES {
                if queue.packets.pop_front().is_none() {
                    // Withheld: the readers count it by the numbers that
                    // follow.
                    return;
                }
            }
            self.held.fetch_add(cost, Ordering::Relaxed);
            queue.packets.push_back(Arc::new(Tapped {
                number: self.recorded,
                meta: *meta,
                interface,
                data: data.into(),
                _held: HeldBytes {
                    bytes: cost,
                    held: self.held.clone(),
                },
            }));
        }
        // A reader that found nothing set it before it looked, under the
        // queue's lock, so it is seen here after the packet it missed; the
        // swap (a locked instruction) only when it is.
        if self.shared.waiting.load(Ordering::Relaxed)
            && self.shared.waiting.swap(false, Ordering::AcqRel)
        {
            self.shared.arrived.notify_waiters();
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The capture has ended. Its readers take what is queued for them;
        // once none is left nothing is kept: no reader can come back for
        // it, and an ended capture's handle is kept for its status.
        {
            let mut queue = self.shared.queue();
            queue.ended = true;
            if self.shared.readers.load(Ordering::Relaxed) == 0 {
                queue.packets.clear();
            }
        }
        self.shared.arrived.notify_waiters();
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
    /// ended or has [`TAP_READERS`] already. A reader that comes back
    /// `after` the packet it last got gets first the packets after it that
    /// are still kept ([`REPLAY_FOR`]), and is told how many are not.
    pub fn subscribe(&self, after: Option<u64>) -> Result<Reader, NoReader> {
        let queue = self.shared.queue();
        if queue.ended {
            return Err(NoReader::Ended);
        }
        self.shared
            .readers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < TAP_READERS).then_some(n + 1)
            })
            .map_err(|_| NoReader::Full)?;
        let recorded = self.shared.recorded.load(Ordering::Relaxed);
        drop(queue);
        Ok(Reader {
            taken: VecDeque::new(),
            shared: self.shared.clone(),
            next: after.unwrap_or(recorded).min(recorded) + 1,
            lost: 0,
        })
    }
}

/// One live reader, counted while it lives; its packets end when the
/// capture does.
pub struct Reader {
    /// Packets taken from the queue, to be read before it.
    taken: VecDeque<Arc<Tapped>>,
    shared: Arc<Shared>,
    /// The number of the packet it is to get next.
    next: u64,
    /// Packets it will not get (it fell behind, they were withheld, or
    /// they were not kept), found since [`Reader::lost`] was last called.
    lost: u64,
}

/// Packets of a live stream, as they come, and how many the reader lost
/// just before the first of them (with no packets: after the last one).
pub struct Batch {
    pub packets: Vec<Arc<Tapped>>,
    pub lost: u64,
}

/// The capture has ended and its reader has taken every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended;

impl Reader {
    /// The next packet taken, its number counted.
    fn next_taken(&mut self) -> Option<Arc<Tapped>> {
        let p = self.taken.pop_front()?;
        self.lost += p.number.saturating_sub(self.next);
        self.next = p.number + 1;
        Some(p)
    }

    /// Takes the queued packets from `next` on, up to [`READ_CHUNK`];
    /// whether there were any. When there were none and the sink has
    /// ended, counts the packets after the last one taken that never came.
    fn take(&mut self) -> Result<bool, Ended> {
        let queue = self.shared.queue();
        let from = queue.packets.partition_point(|p| p.number < self.next);
        self.taken
            .extend(queue.packets.range(from..).take(READ_CHUNK).cloned());
        if !self.taken.is_empty() {
            return Ok(true);
        }
        if !queue.ended {
            return Ok(false);
        }
        // The sink's last store came before it marked the queue ended.
        let last = self.shared.recorded.load(Ordering::Relaxed);
        self.lost += (last + 1).saturating_sub(self.next);
        self.next = self.next.max(last + 1);
        Err(Ended)
    }

    pub async fn recv(&mut self) -> Result<Arc<Tapped>, Ended> {
        loop {
            if let Some(p) = self.next_taken() {
                return Ok(p);
            }
            let shared = self.shared.clone();
            let arrived = shared.arrived.notified();
            let mut arrived = std::pin::pin!(arrived);
            arrived.as_mut().enable();
            // Before looking: a packet queued after the look finds it set.
            shared.waiting.store(true, Ordering::Release);
            if !self.take()? {
                arrived.await;
            }
        }
    }

    /// Whether a packet is there now, taking from the queue if need be.
    fn any_now(&mut self) -> Result<bool, Ended> {
        Ok(!self.taken.is_empty() || self.take()?)
    }

    /// The next packet if one is there now, whatever was lost before it.
    #[cfg(test)]
    fn try_recv(&mut self) -> Result<Option<Arc<Tapped>>, Ended> {
        Ok(if self.any_now()? {
            self.next_taken()
        } else {
            None
        })
    }

    /// The next packet if one is there now and follows the last one read,
    /// none lost between.
    fn try_recv_following(&mut self) -> Result<Option<Arc<Tapped>>, Ended> {
        let following =
            self.any_now()? && self.taken.front().is_some_and(|p| p.number == self.next);
        Ok(if following { self.next_taken() } else { None })
    }

    /// Waits for a packet, then takes those that follow it and are there
    /// now, up to `max_packets` or `max_bytes` of them. A packet after a
    /// gap opens the next batch, so that a batch's `lost` are the packets
    /// lost just before its first one; those lost after the last packet
    /// come in a batch of their own, with no packets. `None` once the
    /// capture has ended and all of that was told.
    pub async fn next_batch(&mut self, max_packets: usize, max_bytes: usize) -> Option<Batch> {
        let first = self.recv().await;
        let lost = self.lost();
        let Ok(first) = first else {
            return (lost > 0).then(|| Batch {
                packets: Vec::new(),
                lost,
            });
        };
        let mut bytes = first.data.len();
        let mut packets = vec![first];
        while packets.len() < max_packets && bytes < max_bytes {
            // The end, or a gap: the next batch tells what was lost.
            let Ok(Some(p)) = self.try_recv_following() else {
                break;
            };
            bytes += p.data.len();
            packets.push(p);
        }
        Some(Batch { packets, lost })
    }

    /// Packets this reader will not get, found since the last call.
    pub fn lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Before the count falls: a sink that finds no reader finds how
        // long to keep packets for one who comes back.
        let until = self.shared.now() + REPLAY_FOR.as_millis() as u64;
        self.shared.keep_until.store(until, Ordering::Relaxed);
        let mut queue = self.shared.queue();
        let last = self.shared.readers.fetch_sub(1, Ordering::Release) == 1;
        // The last reader of an ended capture: no one else can come.
        if last && queue.ended {
            queue.packets.clear();
        }
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
        if self.tap.record() {
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

    const META: Meta = Meta {
        unix_ns: 0,
        ifindex: 1,
        direction: Direction::In,
        orig_len: 0,
    };

    /// Records a packet as the sink does.
    fn record(tap: &mut Tap, frame: &[u8]) {
        if tap.record() {
            tap.offer(&META, "eth0", frame);
        }
    }

    /// The numbers of the packets `reader` has now.
    fn numbers(reader: &mut Reader) -> Vec<u64> {
        std::iter::from_fn(|| reader.try_recv().ok().flatten().map(|p| p.number)).collect()
    }

    /// A reader that falls behind by more than the tap holds loses the
    /// oldest packets; what readers have taken counts against TAP_BYTES
    /// too until they let go, and past it packets are withheld. Each loss
    /// is counted once: by the numbers that follow, or at the capture's
    /// end.
    #[test]
    fn a_slow_reader_holds_at_most_the_taps_bytes() {
        let (mut tap, handle) = Tap::new();
        let mut reader = handle.subscribe(None).unwrap();
        let frame = vec![0u8; 1 << 20];
        let fit = (TAP_BYTES / (frame.len() + PACKET_OVERHEAD)) as u64;
        for _ in 0..fit + 5 {
            record(&mut tap, &frame);
        }
        let first = reader.try_recv().unwrap().unwrap();
        assert_eq!(first.number, 6);
        assert_eq!(reader.lost(), 5);
        assert_eq!(reader.lost(), 0, "counted once");
        // It has taken the rest: no room for the next two.
        record(&mut tap, &frame);
        record(&mut tap, &frame);
        drop(first);
        assert_eq!(numbers(&mut reader), (7..=fit + 5).collect::<Vec<_>>());
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut reader), [fit + 8]);
        assert_eq!(reader.lost(), 2);
        drop(reader);

        // One who comes later is not told of what was withheld before;
        // what is withheld at the end is counted at the end.
        let mut later = handle.subscribe(None).unwrap();
        for _ in 0..fit {
            record(&mut tap, &frame);
        }
        let holding = later.try_recv().unwrap().unwrap();
        assert_eq!(holding.number, fit + 9);
        record(&mut tap, &frame);
        record(&mut tap, &frame);
        drop(tap);
        drop(holding);
        assert_eq!(numbers(&mut later).len() as u64, fit - 1);
        assert_eq!(later.try_recv().err(), Some(Ended));
        assert_eq!(later.lost(), 2, "withheld at the end");
        assert_eq!(later.try_recv().err(), Some(Ended));
        assert_eq!(later.lost(), 0);
    }

    /// A batch's losses are those just before its first packet: a packet
    /// after a gap opens the next batch, and what was lost after the last
    /// packet comes alone, at the end.
    #[tokio::test]
    async fn a_batch_ends_before_a_gap() {
        let (mut tap, handle) = Tap::new();
        let mut reader = handle.subscribe(None).unwrap();
        let numbers = |b: &Batch| b.packets.iter().map(|p| p.number).collect::<Vec<_>>();
        for _ in 0..3 {
            record(&mut tap, &[1u8; 60]);
        }
        let first = reader.next_batch(2, usize::MAX).await.unwrap();
        assert_eq!((numbers(&first), first.lost), (vec![1, 2], 0));
        drop(first);
        // Packet 3 is the reader's already; those after it go before it
        // reads again.
        let big = vec![0u8; 1 << 20];
        let fit = (TAP_BYTES / (big.len() + PACKET_OVERHEAD)) as u64;
        for _ in 0..fit + 5 {
            record(&mut tap, &big);
        }
        let second = reader.next_batch(1000, usize::MAX).await.unwrap();
        assert_eq!((numbers(&second), second.lost), (vec![3], 0));
        let third = reader.next_batch(1000, usize::MAX).await.unwrap();
        let got = numbers(&third);
        assert!(third.lost > 0, "{got:?}");
        assert_eq!(got[0], 4 + third.lost, "lost just before it");
        assert_eq!(*got.last().unwrap(), fit + 8);
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
        drop((second, third));
        for _ in 0..fit {
            record(&mut tap, &big);
        }
        let holding = reader.next_batch(1000, usize::MAX).await.unwrap();
        assert_eq!((holding.packets.len() as u64, holding.lost), (fit, 0));
        // Withheld while the reader holds the tap's bytes: lost at the end.
        record(&mut tap, &big);
        record(&mut tap, &big);
        drop(tap);
        let tail = reader.next_batch(1000, usize::MAX).await.unwrap();
        assert_eq!((numbers(&tail), tail.lost), (vec![], 2));
        assert!(reader.next_batch(1000, usize::MAX).await.is_none());
    }

    /// Small frames do not fill the tap by their number: a burst of them
    /// waits for a reader that reads after it.
    #[test]
    fn a_burst_of_small_frames_waits_for_its_reader() {
        let (mut tap, handle) = Tap::new();
        let mut reader = handle.subscribe(None).unwrap();
        for _ in 0..20_000 {
            record(&mut tap, &[1u8; 60]);
        }
        assert_eq!(numbers(&mut reader), (1..=20_000).collect::<Vec<_>>());
        assert_eq!(reader.lost(), 0);
    }

    /// A reader waiting for packets wakes for the next one, and at the
    /// capture's end.
    #[tokio::test]
    async fn a_waiting_reader_wakes_for_a_packet_and_for_the_end() {
        let (mut tap, handle) = Tap::new();
        let mut reader = handle.subscribe(None).unwrap();
        let (first_tx, first) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn(async move {
            let _ = first_tx.send(reader.recv().await.map(|p| p.number));
            reader.recv().await.map(|p| p.number)
        });
        const WITHIN: Duration = Duration::from_secs(10);
        // The reader runs until it waits (one thread: it runs now).
        tokio::task::yield_now().await;
        record(&mut tap, &[1u8; 60]);
        let first = tokio::time::timeout(WITHIN, first).await;
        assert_eq!(first.expect("woken").unwrap(), Ok(1));
        drop(tap);
        let second = tokio::time::timeout(WITHIN, waiting).await;
        assert_eq!(second.expect("woken").unwrap(), Err(Ended));
    }

    /// A reader whose stream broke off comes back after the last packet it
    /// got: it gets each packet after it once, those still kept first,
    /// and is told how many are not kept any more.
    #[test]
    fn a_reader_that_comes_back_gets_what_it_missed() {
        let (mut tap, handle) = Tap::new();
        let frame = [7u8; 60];
        // Not kept before anyone reads.
        record(&mut tap, &frame);
        let mut first = handle.subscribe(None).unwrap();
        for _ in 0..3 {
            record(&mut tap, &frame);
        }
        assert_eq!(first.try_recv().unwrap().unwrap().number, 2);
        drop(first);
        record(&mut tap, &frame);
        let mut back = handle.subscribe(Some(2)).unwrap();
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut back), [3, 4, 5, 6]);
        assert_eq!(back.lost(), 0);
        drop(back);

        // Gone past what is kept: told how many it missed.
        let big = vec![0u8; 1 << 20];
        let fit = (TAP_BYTES / (big.len() + PACKET_OVERHEAD)) as u64;
        for _ in 0..fit + 10 {
            record(&mut tap, &big);
        }
        let mut late = handle.subscribe(Some(6)).unwrap();
        let got = numbers(&mut late);
        assert_eq!(got, (17..=fit + 16).collect::<Vec<_>>());
        assert_eq!(late.lost(), 10);
        // Asking after a packet not recorded yet: from now on.
        drop(late);
        let mut ahead = handle.subscribe(Some(1_000_000)).unwrap();
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut ahead), [fit + 17]);
        assert_eq!(ahead.lost(), 0);
        drop(ahead);

        // No one came back in time: nothing is kept.
        tap.shared.keep_until.store(0, Ordering::Relaxed);
        record(&mut tap, &frame);
        assert!(tap.shared.queue().packets.is_empty());
        let mut too_late = handle.subscribe(Some(fit + 17)).unwrap();
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut too_late), [fit + 19]);
        assert_eq!(too_late.lost(), 1);

        // A reader takes what was queued for it before the end; nothing is
        // kept once the last one has gone.
        record(&mut tap, &frame);
        drop(tap);
        assert_eq!(handle.shared.queue().packets.len(), 2);
        assert_eq!(numbers(&mut too_late), [fit + 20]);
        drop(too_late);
        assert!(handle.shared.queue().packets.is_empty());
        assert_eq!(
            handle.subscribe(Some(fit + 20)).err(),
            Some(NoReader::Ended)
        );
    }

    #[test]
    fn readers_are_counted_up_to_the_limit() {
        let (tap, handle) = Tap::new();
        let readers: Vec<Reader> = (0..TAP_READERS)
            .map(|_| handle.subscribe(None).unwrap())
            .collect();
        assert_eq!(handle.subscribe(None).err(), Some(NoReader::Full));
        drop(readers);
        assert_eq!(tap.shared.readers.load(Ordering::Relaxed), 0);
        let reader = handle.subscribe(None).unwrap();
        drop(tap);
        drop(reader);
        assert_eq!(handle.subscribe(None).err(), Some(NoReader::Ended));
    }
}
