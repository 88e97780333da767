//! The eBPF backend: one ring-buffer reader thread serves every capture.
//!
//! The kernel marks each record with the slots it matched; the reader hands
//! the frame to each slot's sink. Slots are handed out least recently used
//! first, so a record still in flight for an ended capture cannot reach the
//! next one.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use packet_capture_common::abi::{
    DIRECTION_INGRESS, LINK_RAW_IP, MAX_SLOTS, RECORD_HEADER_LEN, RecordHeader, counter,
};

use super::backend::{Backend, BackendError, Ended, EndedTx, Running, Selection};
use super::poll::Waiter;
use super::ring::Ring;
use super::sink::{EndReason, Sink};
use crate::ebpf::{Kernel, LinkKind, SlotTargets, TcAttach};
use crate::filter::FilterPlace;
use crate::netlink::Link;
use crate::sync::{lock, spawn_essential};
use crate::writer::{Direction, Meta};

/// How long records may wait in the ring before the reader looks (the
/// programs only wake it for a full batch).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The reader's [`Waiter`] tokens.
const RING_READY: u64 = 1;
const WOKEN: u64 = 2;

/// Records the reader hands out before it looks at its commands again:
/// under a flood that refills the ring as fast as it is read, a start or a
/// stop waits for one batch, not for the flood to end.
const BATCH: usize = 4096;

enum Command {
    /// Install a sink; the reader answers on `installed` once it is in place.
    Add {
        slot: usize,
        sink: Box<Sink>,
        installed: SyncSender<()>,
    },
    /// End a capture once what the kernel selected for it has been read;
    /// the kernel no longer selects for its slot.
    Remove {
        slot: usize,
        reason: EndReason,
    },
    /// Forget a capture that never started, and its file; answers once
    /// the file is gone.
    Discard {
        slot: usize,
        discarded: SyncSender<()>,
    },
    Names(HashMap<u32, String>),
    Shutdown,
}

/// The reader's command queue, with an eventfd that wakes it at once.
struct Commands {
    queue: Sender<Command>,
    wake: OwnedFd,
}

impl Commands {
    fn send(&self, cmd: Command) {
        if self.queue.send(cmd).is_ok() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

/// What the backend and its captures' handles share.
struct Shared {
    kernel: Mutex<Kernel>,
    commands: Commands,
    /// Slots no capture holds, least recently used first.
    free: Mutex<VecDeque<usize>>,
    /// Whether captures' filters run in the kernel.
    kernel_filters: bool,
}

impl Shared {
    fn kernel(&self) -> MutexGuard<'_, Kernel> {
        lock(&self.kernel)
    }

    /// Makes the kernel stop selecting for `slot`; clearing a clear slot
    /// does nothing.
    fn deselect(&self, slot: usize) {
        if let Err(e) = self.kernel().clear_slot(slot) {
            tracing::error!(slot, error = %e, "clearing a capture slot");
        }
    }
}

pub struct EbpfBackend {
    shared: Arc<Shared>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EbpfBackend {
    /// Loads the programs with a ring of `ring_bytes` and starts the reader;
    /// interfaces get the programs as `tc_attach` says, and ended sinks are
    /// reported on `ended`.
    pub fn load(
        ring_bytes: u32,
        tc_attach: TcAttach,
        kernel_filters: bool,
        own_api: Option<std::net::SocketAddr>,
        ended: EndedTx,
    ) -> Result<Self, BackendError> {
        let (mut kernel, ring) = Kernel::load(ring_bytes)?;
        let ring = Ring::new(ring, ring_bytes).map_err(BackendError::Reader)?;
        kernel.set_tc_attach(tc_attach);
        kernel.set_own_api(own_api)?;
        for (program, verified, bytes) in kernel.program_sizes() {
            tracing::debug!(program, verified, bytes, "eBPF program loaded");
        }
        let (queue, rx) = std::sync::mpsc::channel();
        // SAFETY: eventfd(2) returns a new descriptor, owned right away.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(BackendError::Reader(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let woken = wake.try_clone().map_err(BackendError::Reader)?;
        let waiter = Waiter::new().map_err(BackendError::Reader)?;
        waiter
            .watch(ring.as_raw_fd(), RING_READY, true)
            .and_then(|()| waiter.watch(woken.as_raw_fd(), WOKEN, false))
            .map_err(BackendError::Reader)?;
        let shared = Arc::new(Shared {
            kernel: Mutex::new(kernel),
            commands: Commands { queue, wake },
            free: Mutex::new((0..MAX_SLOTS).collect()),
            kernel_filters,
        });
        // Finishing a capture (the rest of its file written and made
        // durable) may take a while on a busy disk: on a thread of its own,
        // so that the reader goes on with the other captures' records.
        let (finishing, to_finish) = std::sync::mpsc::channel::<(usize, Sink, EndReason)>();
        let finisher_shared = shared.clone();
        spawn_essential("capture-finisher".into(), move || {
            for (slot, sink, reason) in to_finish {
                // A capture that ended by itself (a limit, an error) is
                // still selected: the kernel stops first, so that neither
                // its records nor its losses go on growing while it is
                // finished. The slot is handed out again only once it is
                // reported ended, after this.
                finisher_shared.deselect(slot);
                let id = sink.id.clone();
                let finished = sink.finish(reason);
                let _ = ended.send(Ended { id, finished });
            }
        })
        .map_err(BackendError::Reader)?;
        let reader = spawn_essential("ring-reader".into(), move || {
            Reader::new(ring, rx, woken, waiter, finishing).run()
        })
        .map_err(BackendError::Reader)?;
        Ok(Self {
            shared,
            reader: Mutex::new(Some(reader)),
        })
    }
}

impl Backend for EbpfBackend {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.kernel().links().map(str::to_owned).collect();
        names.sort();
        names
    }

    fn link_up(&self, link: &Link) {
        let Some(kind) = LinkKind::from_arphrd(link.arphrd) else {
            tracing::info!(
                iface = link.name,
                arphrd = link.arphrd,
                "not captured: its link-layer header is neither Ethernet nor none"
            );
            return;
        };
        match self.shared.kernel().link_up(&link.name, kind, link.index) {
            Ok(()) => tracing::info!(iface = link.name, "interface found"),
            Err(e) => {
                tracing::warn!(iface = link.name, error = %e, "cannot capture on this interface")
            }
        }
    }

    fn link_gone(&self, name: &str, index: u32) {
        self.shared.kernel().link_gone(name, index);
    }

    fn set_names(&self, names: HashMap<u32, String>) {
        self.shared.commands.send(Command::Names(names));
    }

    /// Takes a free slot, installs `sink` in the reader, then makes the
    /// kernel select for the slot.
    fn add(
        &self,
        _id: &str,
        selection: &Selection,
        sink: Sink,
    ) -> Result<Box<dyn Running>, BackendError> {
        let Some(slot) = lock(&self.shared.free).pop_front() else {
            sink.abandon();
            return Err(BackendError::Full(MAX_SLOTS));
        };
        // From here the handle owns the slot: any early return drops it,
        // which gives the slot back.
        let mut handle = SlotCapture {
            shared: self.shared.clone(),
            slot,
            baseline: 0,
            filtered_baseline: 0,
            filter_place: None,
        };
        // The filter goes into the kernel before the slot is active: its
        // first packets are filtered there too.
        if let Some(filter) = sink.filter() {
            handle.filter_place = Some(if self.shared.kernel_filters {
                self.shared.kernel().set_filter(slot, filter)
            } else {
                FilterPlace::UserSpace("--filters-in-user-space is set".into())
            });
        }
        // The sink is in place before the kernel selects anything for it,
        // so no record can reach the reader ahead of its sink.
        let (installed, done) = std::sync::mpsc::sync_channel(1);
        self.shared.commands.send(Command::Add {
            slot,
            sink: Box::new(sink),
            installed,
        });
        if done.recv().is_err() {
            return Err(BackendError::ReaderStopped);
        }
        let mut kernel = self.shared.kernel();
        handle.baseline = kernel.slot_lost(slot).unwrap_or(0);
        handle.filtered_baseline = kernel.slot_filtered(slot).unwrap_or(0);
        if let Err(e) = kernel.set_slot(slot, slot_targets(selection)) {
            drop(kernel);
            let (discarded, done) = std::sync::mpsc::sync_channel(1);
            self.shared
                .commands
                .send(Command::Discard { slot, discarded });
            // Once the reader has removed the file: nothing of the refused
            // capture is left (a reader that stopped ends the agent).
            let _ = done.recv();
            return Err(BackendError::of_maps(e));
        }
        Ok(Box::new(handle))
    }

    fn log_level_changed(&self) {
        match self.shared.kernel().follow_log_level() {
            Ok(on) => tracing::info!(
                "eBPF programs' diagnostics {}",
                if on { "on" } else { "off" }
            ),
            Err(e) => tracing::warn!("switching the eBPF programs' diagnostics: {e}"),
        }
    }

    fn ring_lost(&self) -> u64 {
        self.shared
            .kernel()
            .counter(counter::RING_LOST)
            .unwrap_or(0)
    }

    /// Stops the reader (captures must have ended), waits for it, and
    /// detaches the programs from every interface.
    fn shutdown(&self) {
        self.shared.commands.send(Command::Shutdown);
        // Taken out first: the lock is not held while the reader finishes.
        let reader = lock(&self.reader).take();
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        self.shared.kernel().detach_all();
    }
}

fn slot_targets(selection: &Selection) -> SlotTargets {
    SlotTargets {
        nets: selection.targets.clone(),
        only_nets: selection.only_targets,
        ports: selection.ports.clone(),
        direction: selection.direction,
        copy_len: selection.copy_len,
    }
}

/// A capture's hold on its slot.
///
/// The slot goes back to the free list in one place only: when this handle
/// is dropped, which the engine does once the reader has reported the sink
/// ended (and `add` does on failure). By then the reader holds no sink for
/// the slot, so the next capture to get it starts clean.
struct SlotCapture {
    shared: Arc<Shared>,
    slot: usize,
    /// The slot's loss counter when the capture started.
    baseline: u64,
    /// The slot's count of packets its filter rejected, then.
    filtered_baseline: u64,
    filter_place: Option<FilterPlace>,
}

impl Running for SlotCapture {
    fn lost(&self) -> u64 {
        self.shared
            .kernel()
            .slot_lost(self.slot)
            .unwrap_or(self.baseline)
            .saturating_sub(self.baseline)
    }

    fn filter_place(&self) -> Option<FilterPlace> {
        self.filter_place.clone()
    }

    fn filtered_in_kernel(&self) -> u64 {
        self.shared
            .kernel()
            .slot_filtered(self.slot)
            .unwrap_or(self.filtered_baseline)
            .saturating_sub(self.filtered_baseline)
    }

    /// The maps change in place: an address in both the old and the new
    /// targets keeps its entry, so none of its packets is missed.
    fn retarget(&self, selection: &Selection) -> Result<(), BackendError> {
        let mut kernel = self.shared.kernel();
        // Asked to end, or ended by itself: a change of targets racing the
        // end must not make the slot select again.
        if !kernel.selects(self.slot) {
            return Err(BackendError::Ended);
        }
        kernel
            .set_slot(self.slot, slot_targets(selection))
            .map_err(BackendError::of_maps)
    }

    /// The kernel stops selecting first, then the reader finishes the sink
    /// after what is already in the ring.
    fn end(&self, reason: EndReason) {
        self.shared.deselect(self.slot);
        self.shared.commands.send(Command::Remove {
            slot: self.slot,
            reason,
        });
    }
}

impl Drop for SlotCapture {
    fn drop(&mut self) {
        // A sink still installed (a handle dropped while its capture runs)
        // is finished before the slot can be handed out again; the reader
        // takes commands in order, so this reaches it before any new Add.
        self.end(EndReason::Stopped);
        let mut free = lock(&self.shared.free);
        free.push_back(self.slot);
        // The losses only unheld slots share are nobody's now. Under the
        // free list's lock, so no capture takes a slot, and its baseline,
        // meanwhile.
        let held = free.iter().fold(u64::MAX, |held, slot| held & !(1 << slot));
        self.shared.kernel().prune_lost(held);
    }
}

/// A capture asked to end whose records may still be in the ring.
struct Ending {
    reason: EndReason,
    /// [`Ring::position`] past which none of them can be left.
    until: u64,
}

struct Reader {
    ring: Ring,
    commands: Receiver<Command>,
    /// Readable when commands wait.
    woken: OwnedFd,
    /// Sleeps until the ring has a batch, a command comes, or a while
    /// passes.
    waiter: Waiter,
    /// Where ended sinks go to be finished.
    finishing: Sender<(usize, Sink, EndReason)>,
    sinks: Vec<Option<Sink>>,
    /// By slot: the end asked for a sink still installed.
    ending: Vec<Option<Ending>>,
    names: HashMap<u32, String>,
    /// Where frames are rebuilt (a VLAN tag put back, an Ethernet header
    /// added), reused for every packet.
    frame: Vec<u8>,
}

impl Reader {
    fn new(
        ring: Ring,
        commands: Receiver<Command>,
        woken: OwnedFd,
        waiter: Waiter,
        finishing: Sender<(usize, Sink, EndReason)>,
    ) -> Self {
        Self {
            ring,
            commands,
            woken,
            waiter,
            finishing,
            sinks: (0..MAX_SLOTS).map(|_| None).collect(),
            ending: (0..MAX_SLOTS).map(|_| None).collect(),
            names: HashMap::new(),
            frame: Vec::with_capacity(packet_capture_common::abi::MAX_SNAPLEN as usize + 18),
        }
    }

    /// Takes the commands, then a batch of records, in turn: a busy ring
    /// delays a command by one batch at most.
    fn run(mut self) {
        let mut drained = Drained::Empty;
        loop {
            match drained {
                Drained::More => {}
                Drained::Writing => std::thread::yield_now(),
                // With captures running, records may wait in the ring
                // without a wake-up (they come in batches): look every
                // POLL_INTERVAL.
                Drained::Empty => {
                    let active = self.sinks.iter().any(Option::is_some);
                    let timeout = if active {
                        POLL_INTERVAL
                    } else {
                        Duration::from_secs(1)
                    };
                    if self.waiter.wait(timeout) & WOKEN != 0 {
                        let mut count = [0u8; 8];
                        // SAFETY: reading the eventfd's counter into 8
                        // bytes we own.
                        unsafe {
                            libc::read(
                                self.woken.as_raw_fd(),
                                count.as_mut_ptr().cast(),
                                count.len(),
                            )
                        };
                    }
                }
            }
            // Commands first: a sink must be in place before its records.
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            drained = self.drain();
            for slot in 0..MAX_SLOTS {
                let due = self.ending[slot]
                    .as_ref()
                    .is_some_and(|e| drained == Drained::Empty || self.ring.position() >= e.until);
                if due && let Some(e) = self.ending[slot].take() {
                    finish(&mut self.sinks, slot, &self.finishing, e.reason);
                }
                if let Some(sink) = self.sinks[slot].as_mut()
                    && let Err(reason) = sink.flush()
                {
                    finish(&mut self.sinks, slot, &self.finishing, reason);
                }
            }
        }
    }

    /// Returns false when the reader must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add {
                slot,
                sink,
                installed,
            } => {
                // A slot is handed out again only once its last sink has
                // ended and been reported, so an end still waiting here was
                // for that sink, which ended otherwise (a limit, an error).
                self.ending[slot] = None;
                self.sinks[slot] = Some(*sink);
                let _ = installed.send(());
            }
            Command::Remove { slot, reason } => {
                // What the kernel selected before the slot was cleared
                // belongs to the capture. It is all in the ring now, behind
                // at most a ring's worth of bytes: the sink ends once the
                // reader has read that much more, or found the ring empty,
                // while other captures go on starting and stopping.
                if self.sinks[slot].is_some() && self.ending[slot].is_none() {
                    self.ending[slot] = Some(Ending {
                        reason,
                        until: self.ring.position() + self.ring.bytes(),
                    });
                }
            }
            Command::Discard { slot, discarded } => {
                if let Some(sink) = self.sinks[slot].take() {
                    sink.abandon();
                }
                let _ = discarded.send(());
            }
            Command::Names(names) => self.names = names,
            Command::Shutdown => return false,
        }
        true
    }

    /// Hands at most [`BATCH`] records to their sinks; where that left the
    /// ring.
    fn drain(&mut self) -> Drained {
        let offset = realtime_offset_ns();
        for _ in 0..BATCH {
            let Some(item) = self.ring.next() else {
                return if self.ring.is_empty() {
                    Drained::Empty
                } else {
                    Drained::Writing
                };
            };
            if item.len() < RECORD_HEADER_LEN {
                continue;
            }
            // SAFETY: the programs write a RecordHeader at the start of
            // every record; read_unaligned copes with any alignment.
            let header: RecordHeader =
                unsafe { item.as_ptr().cast::<RecordHeader>().read_unaligned() };
            let end = (RECORD_HEADER_LEN + header.cap_len as usize).min(item.len());
            let data = &item[RECORD_HEADER_LEN..end];
            let (frame, orig_len) = rebuild(&header, data, &mut self.frame);
            let meta = Meta {
                unix_ns: header.ktime_ns.wrapping_add_signed(offset),
                ifindex: header.ifindex,
                direction: if header.direction == DIRECTION_INGRESS {
                    Direction::In
                } else {
                    Direction::Out
                },
                orig_len,
            };
            let mut mask = header.slot_mask;
            while mask != 0 {
                let slot = mask.trailing_zeros() as usize;
                let filtered_in_kernel = header.kernel_filtered & (1 << slot) != 0;
                mask &= mask - 1;
                if let Some(sink) = self.sinks[slot].as_mut()
                    && let Some(reason) = sink.offer(&meta, frame, &self.names, filtered_in_kernel)
                {
                    finish(&mut self.sinks, slot, &self.finishing, reason);
                }
            }
        }
        Drained::More
    }
}

/// Where a batch left the ring.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// Records are left: read on at once.
    More,
    /// Empty: sleep until the programs' next wake-up.
    Empty,
    /// Stopped at a record another CPU is still writing, submitted in a
    /// moment with no wake-up to say so: look again at once.
    Writing,
}

/// Hands the sink in `slot`, if there is one, to the finisher, which
/// finishes it and reports it ended.
fn finish(
    sinks: &mut [Option<Sink>],
    slot: usize,
    finishing: &Sender<(usize, Sink, EndReason)>,
    reason: EndReason,
) {
    if let Some(sink) = sinks[slot].take() {
        let _ = finishing.send((slot, sink, reason));
    }
}

/// The frame as libpcap would show it: the VLAN tag the device took off put
/// back, and an Ethernet header in front of link-less (raw IP) packets.
fn rebuild<'a>(header: &RecordHeader, data: &'a [u8], buf: &'a mut Vec<u8>) -> (&'a [u8], u32) {
    if header.link == LINK_RAW_IP {
        buf.clear();
        buf.extend_from_slice(&[0; 12]);
        buf.extend_from_slice(&header.protocol.to_be_bytes());
        buf.extend_from_slice(data);
        return (buf, header.orig_len + 14);
    }
    if header.vlan_present != 0 && data.len() >= 12 {
        buf.clear();
        buf.extend_from_slice(&data[..12]);
        buf.extend_from_slice(&header.vlan_proto.to_be_bytes());
        buf.extend_from_slice(&header.vlan_tci.to_be_bytes());
        buf.extend_from_slice(&data[12..]);
        return (buf, header.orig_len + 4);
    }
    (data, header.orig_len)
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, to turn `bpf_ktime_get_ns` into
/// wall-clock time (read per batch, so clock steps are followed).
fn realtime_offset_ns() -> i64 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we pass.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_get_their_vlan_tag_and_link_header_back() {
        let data: Vec<u8> = (0..20).collect();
        let mut buf = Vec::new();
        let tagged = RecordHeader {
            vlan_present: 1,
            vlan_proto: 0x8100,
            vlan_tci: 0x0064,
            orig_len: 100,
            ..Default::default()
        };
        let (frame, len) = rebuild(&tagged, &data, &mut buf);
        assert_eq!(len, 104);
        assert_eq!(&frame[..12], &data[..12]);
        assert_eq!(&frame[12..16], &[0x81, 0x00, 0x00, 0x64]);
        assert_eq!(&frame[16..], &data[12..]);

        let raw = RecordHeader {
            link: LINK_RAW_IP,
            protocol: 0x86dd,
            orig_len: 20,
            ..Default::default()
        };
        let (frame, len) = rebuild(&raw, &data, &mut buf);
        assert_eq!(len, 34);
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        assert_eq!(&frame[14..], &data[..]);
    }
}
