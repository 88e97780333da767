//! Where one capture's packets go: its filter, its limits, its writer.
//!
//! A sink lives on the thread that reads packets and is called once per
//! packet that matched the capture's targets, without allocating.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

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
/// How long a capture keeps its latest packets (at most [`TAP_PACKETS`],
/// within [`TAP_BYTES`]) once its last live reader has gone, for a reader
/// whose stream broke off to come back for what it missed: longer than
/// `kubectl pcap stream` tries to open its stream again (63.5 s).
pub const REPLAY_FOR: Duration = Duration::from_secs(90);

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
    /// The latest packets, oldest first, kept while someone reads and for
    /// [`REPLAY_FOR`] after. Locked while a packet is kept and sent, and
    /// while a reader subscribes, so that a reader coming back gets each
    /// packet once: from here or from the channel.
    recent: Mutex<VecDeque<Arc<Tapped>>>,
    /// Until when (milliseconds from `since`) the packets are kept with no
    /// reader.
    keep_until: AtomicU64,
    since: Instant,
}

impl Shared {
    fn now(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }
}

/// The sink's end of its live readers' channel: sending never waits, a
/// slow reader loses. Whether anyone reads is an atomic the sink reads for
/// every packet, rather than the channel's count, which takes its lock.
pub struct Tap {
    sender: broadcast::Sender<Arc<Tapped>>,
    shared: Arc<Shared>,
    /// Bytes of the packets some reader has yet to take or drop, or that
    /// are kept in `recent`.
    held: Arc<AtomicUsize>,
    /// The number of the last packet recorded.
    recorded: u64,
    /// Whether `recent` may hold packets.
    keeping: bool,
}

/// Subscribes readers to a capture's [`Tap`] while its sink lives.
#[derive(Clone)]
pub struct TapHandle {
    sender: broadcast::WeakSender<Arc<Tapped>>,
    shared: Arc<Shared>,
}

impl Tap {
    pub fn new() -> (Self, TapHandle) {
        let (sender, _) = broadcast::channel(TAP_PACKETS);
        let shared = Arc::new(Shared {
            readers: AtomicUsize::new(0),
            recorded: AtomicU64::new(0),
            recent: Mutex::default(),
            keep_until: AtomicU64::new(0),
            since: Instant::now(),
        });
        let handle = TapHandle {
            sender: sender.downgrade(),
            shared: shared.clone(),
        };
        let tap = Self {
            sender,
            shared,
            held: Arc::default(),
            recorded: 0,
            keeping: false,
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
        lock(&self.shared.recent).clear();
        false
    }

    /// Hands the packet just recorded to the readers and keeps it, unless the readers hold
    /// [`TAP_BYTES`]: the packets kept for readers who come back make room
    /// first.
    fn offer(&self, meta: &Meta, interface: &str, data: &[u8]) {
        let bytes = data.len();
        let mut recent = lock(&self.shared.recent);
        while recent.len() >= TAP_PACKETS
            || (self.held.load(Ordering::Relaxed) + bytes > TAP_BYTES && !recent.is_empty())
        {
            recent.pop_front();
        }
        if self.held.load(Ordering::Relaxed) + bytes > TAP_BYTES {
            // Withheld: the readers count it by the numbers that follow.
            return;
        }
        self.held.fetch_add(bytes, Ordering::Relaxed);
        let packet = Arc::new(Tapped {
            number: self.recorded,
            meta: *meta,
            interface: interface.into(),
            data: data.into(),
            _held: HeldBytes {
                bytes,
                held: self.held.clone(),
            },
        });
        recent.push_back(packet.clone());
        // Fails only when no reader is there to take it.
        let _ = self.sender.send(packet);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The capture has ended: no reader can come back for these, and an
        // ended capture's handle is kept for its status.
        lock(&self.shared.recent).clear();
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
        let sender = self.sender.upgrade().ok_or(NoReader::Ended)?;
        self.shared
            .readers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < TAP_READERS).then_some(n + 1)
            })
            .map_err(|_| NoReader::Full)?;
        let recent = lock(&self.shared.recent);
        let packets = sender.subscribe();
        let recorded = self.shared.recorded.load(Ordering::Relaxed);
        let (replay, next) = match after {
            Some(after) => {
                let after = after.min(recorded);
                let replay = recent
                    .iter()
                    .filter(|p| p.number > after)
                    .cloned()
                    .collect();
                (replay, after + 1)
            }
            None => (VecDeque::new(), recorded + 1),
        };
        drop(recent);
        Ok(Reader {
            replay,
            packets,
            shared: self.shared.clone(),
            next,
            lost: 0,
        })
    }
}

/// One live reader, counted while it lives; its packets end when the
/// capture does.
pub struct Reader {
    /// Kept packets it came back for, to be read before the channel.
    replay: VecDeque<Arc<Tapped>>,
    packets: broadcast::Receiver<Arc<Tapped>>,
    shared: Arc<Shared>,
    /// The number of the packet it is to get next.
    next: u64,
    /// Packets it will not get (it fell behind, they were withheld, or
    /// they were not kept), found since [`Reader::lost`] was last called.
    lost: u64,
}

/// The capture has ended and its reader has taken every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended;

impl Reader {
    /// Counts the packets skipped before `p`.
    fn take(&mut self, p: Arc<Tapped>) -> Arc<Tapped> {
        self.lost += p.number.saturating_sub(self.next);
        self.next = self.next.max(p.number + 1);
        p
    }

    /// Counts the packets after the last one taken that never came.
    fn ended(&mut self) -> Ended {
        // The channel's close came after the sink's last store.
        let last = self.shared.recorded.load(Ordering::Relaxed);
        self.lost += (last + 1).saturating_sub(self.next);
        self.next = self.next.max(last + 1);
        Ended
    }

    pub async fn recv(&mut self) -> Result<Arc<Tapped>, Ended> {
        use broadcast::error::RecvError;
        if let Some(p) = self.replay.pop_front() {
            return Ok(self.take(p));
        }
        loop {
            match self.packets.recv().await {
                Ok(p) => return Ok(self.take(p)),
                // Counted by the numbers of the packets that follow.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(self.ended()),
            }
        }
    }

    /// The next packet if one is there now.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Tapped>>, Ended> {
        use broadcast::error::TryRecvError;
        if let Some(p) = self.replay.pop_front() {
            return Ok(Some(self.take(p)));
        }
        loop {
            match self.packets.try_recv() {
                Ok(p) => return Ok(Some(self.take(p))),
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Closed) => return Err(self.ended()),
            }
        }
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
        self.shared.readers.fetch_sub(1, Ordering::Release);
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

    /// A reader that takes nothing holds at most TAP_BYTES: the packets
    /// past them are withheld, and counted lost once a later one comes or
    /// the capture ends; once it has taken what it holds, packets come
    /// again.
    #[test]
    fn a_slow_reader_holds_at_most_the_taps_bytes() {
        let (mut tap, handle) = Tap::new();
        let mut reader = handle.subscribe(None).unwrap();
        let frame = vec![0u8; 1 << 20];
        let fit = TAP_BYTES / frame.len();
        for _ in 0..fit + 5 {
            record(&mut tap, &frame);
        }
        assert_eq!(numbers(&mut reader).len(), fit);
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut reader), [fit as u64 + 6]);
        assert_eq!(reader.lost(), 5);
        assert_eq!(reader.lost(), 0, "counted once");
        // One who comes later is not told of what was withheld before.
        let mut later = handle.subscribe(None).unwrap();
        for _ in 0..fit + 2 {
            record(&mut tap, &frame);
        }
        drop(tap);
        assert_eq!(numbers(&mut reader).len(), fit);
        assert_eq!(reader.try_recv().err(), Some(Ended));
        assert_eq!(reader.lost(), 2, "withheld at the end");
        let _ = numbers(&mut later);
        assert_eq!(later.try_recv().err(), Some(Ended));
        assert_eq!(later.lost(), 2);
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
        for _ in 0..TAP_PACKETS + 10 {
            record(&mut tap, &frame);
        }
        let mut late = handle.subscribe(Some(6)).unwrap();
        let got = numbers(&mut late);
        assert_eq!(got.len(), TAP_PACKETS);
        assert_eq!(got[0], 17);
        assert_eq!(late.lost(), 10);
        // Asking after a packet not recorded yet: from now on.
        drop(late);
        let mut ahead = handle.subscribe(Some(1_000_000)).unwrap();
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut ahead), [1041]);
        assert_eq!(ahead.lost(), 0);
        drop(ahead);

        // No one came back in time: nothing is kept.
        tap.shared.keep_until.store(0, Ordering::Relaxed);
        record(&mut tap, &frame);
        assert!(lock(&tap.shared.recent).is_empty());
        let mut too_late = handle.subscribe(Some(1041)).unwrap();
        record(&mut tap, &frame);
        assert_eq!(numbers(&mut too_late), [1043]);
        assert_eq!(too_late.lost(), 1);

        // Nothing is kept once the capture has ended.
        record(&mut tap, &frame);
        assert_eq!(lock(&handle.shared.recent).len(), 2);
        drop(tap);
        assert!(lock(&handle.shared.recent).is_empty());
        assert_eq!(handle.subscribe(Some(1043)).err(), Some(NoReader::Ended));
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
