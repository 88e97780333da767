//! The fallback backend, for nodes where the eBPF programs cannot load:
//! libpcap (AF_PACKET) on every interface, one thread per capture, with the
//! whole selection compiled to classic BPF and run by the kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::backend::{Backend, BackendError, Ended, EndedTx, Running, Selection};
use super::poll::wait_readable;
use super::sink::{EndReason, Sink};
use crate::filter::{FilterPlace, selection_expression, through_vlans, without_own_api};
use crate::netlink::Link;
use crate::sync::{lock, spawn_essential};
use crate::writer::{Direction, Meta};

/// How long a capture thread waits for packets before it looks at its
/// commands again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Kernel buffer per socket, as tcpdump's default.
const BUFFER_BYTES: i32 = 2 << 20;

/// Bytes read from one socket in one round at most: under a flood faster
/// than the thread, a round would otherwise never end, its commands (a
/// stop) would wait and its buffer grow. What is left is read next round,
/// so only then may packets of two sockets be written out of time order.
const ROUND_BYTES: usize = BUFFER_BYTES as usize;

enum Command {
    Link(Link),
    LinkGone(u32),
    Names(HashMap<u32, String>),
    /// New targets; the thread says on the channel when the sockets have
    /// them.
    Retarget(SocketFilter, std::sync::mpsc::SyncSender<()>),
    Stop(EndReason),
}

/// What a capture's sockets select and keep.
struct SocketFilter {
    /// The tcpdump expression of the targets and ports.
    expression: String,
    snaplen: u32,
}

/// An expression no packet matches (none is shorter than 0 bytes).
const NOTHING: &str = "less 0";

/// Most targets a capture's sockets select: libpcap's optimizer takes
/// seconds on each socket's expression past this many hosts (2.7 s at 256,
/// a minute at 1024), and past about 350 its program is longer than a
/// socket filter may be.
const MAX_TARGETS: usize = 256;

impl SocketFilter {
    fn new(
        selection: &Selection,
        own_api: Option<std::net::SocketAddr>,
    ) -> Result<Self, BackendError> {
        if selection.targets.len() > MAX_TARGETS {
            return Err(BackendError::TooManyTargets {
                count: selection.targets.len(),
                max: MAX_TARGETS,
            });
        }
        let mut expression = if !selection.any_address() && selection.targets.is_empty() {
            NOTHING.to_owned()
        } else {
            selection_expression(
                &selection.targets,
                &selection.ports,
                selection.direction,
                "",
            )
        };
        if let Some(api) = own_api {
            expression = without_own_api(&expression, api);
        }
        Ok(Self {
            expression,
            snaplen: selection.copy_len,
        })
    }

    /// The expression for a socket: Ethernet frames may carry VLAN tags,
    /// link-less packets cannot.
    fn for_link(&self, raw_ip: bool) -> String {
        if raw_ip {
            self.expression.clone()
        } else {
            through_vlans(&self.expression)
        }
    }
}

/// An interface a capture could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{iface} ({direction:?}): {source}")]
    Pcap {
        iface: String,
        direction: Direction,
        #[source]
        source: pcap::Error,
    },
    #[error("{iface}: link type {linktype:?} is not supported")]
    LinkType {
        iface: String,
        linktype: pcap::Linktype,
    },
}

pub struct PcapBackend {
    links: Mutex<HashMap<u32, Link>>,
    names: Mutex<HashMap<u32, String>>,
    /// The command queues of the capture threads. A thread that has ended
    /// dropped its end of the queue, and leaves the list at the next
    /// broadcast.
    captures: Mutex<Vec<Sender<Command>>>,
    ended: EndedTx,
    /// The agent API's address: its TCP is left out of every capture.
    own_api: Option<std::net::SocketAddr>,
}

struct Handle {
    ifindex: u32,
    name: String,
    direction: Direction,
    /// The link carries no Ethernet header (DLT_RAW): one is put in front.
    raw_ip: bool,
    cap: pcap::Capture<pcap::Active>,
    /// The last read emptied the socket's ring. The kernel's counts cannot
    /// tell this: they include the other direction's packets, which libpcap
    /// skips without handing them over.
    drained: bool,
}

fn open(link: &Link, direction: Direction, filter: &SocketFilter) -> Result<Handle, OpenError> {
    let fail = |source: pcap::Error| OpenError::Pcap {
        iface: link.name.clone(),
        direction,
        source,
    };
    let cap = pcap::Capture::from_device(link.name.as_str())
        .map_err(fail)?
        .snaplen(filter.snaplen.min(i32::MAX as u32) as i32)
        .promisc(false)
        .immediate_mode(true)
        .buffer_size(BUFFER_BYTES)
        .precision(pcap::Precision::Nano)
        .open()
        .map_err(fail)?
        .setnonblock()
        .map_err(fail)?;
    cap.direction(match direction {
        Direction::In => pcap::Direction::In,
        Direction::Out => pcap::Direction::Out,
    })
    .map_err(fail)?;
    let raw_ip = match cap.get_datalink() {
        pcap::Linktype::ETHERNET => false,
        pcap::Linktype(12 | 101) => true,
        linktype => {
            return Err(OpenError::LinkType {
                iface: link.name.clone(),
                linktype,
            });
        }
    };
    let mut cap = cap;
    cap.filter(&filter.for_link(raw_ip), true).map_err(fail)?;
    Ok(Handle {
        ifindex: link.index,
        name: link.name.clone(),
        direction,
        raw_ip,
        cap,
        drained: false,
    })
}

impl PcapBackend {
    pub fn new(own_api: Option<std::net::SocketAddr>, ended: EndedTx) -> Self {
        Self {
            links: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            captures: Mutex::new(Vec::new()),
            ended,
            own_api: own_api.filter(|a| !a.ip().is_unspecified()),
        }
    }

    fn broadcast(&self, make: impl Fn() -> Command) {
        lock(&self.captures).retain(|commands| commands.send(make()).is_ok());
    }
}

impl Backend for PcapBackend {
    fn name(&self) -> &'static str {
        "pcap"
    }

    fn interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.links).values().map(|l| l.name.clone()).collect();
        names.sort();
        names
    }

    fn link_up(&self, link: &Link) {
        lock(&self.links).insert(link.index, link.clone());
        self.broadcast(|| Command::Link(link.clone()));
        tracing::info!(iface = link.name, "capturing with libpcap");
    }

    fn link_gone(&self, _name: &str, index: u32) {
        lock(&self.links).remove(&index);
        self.broadcast(|| Command::LinkGone(index));
    }

    fn set_names(&self, names: HashMap<u32, String>) {
        *lock(&self.names) = names.clone();
        self.broadcast(|| Command::Names(names.clone()));
    }

    /// Opens sockets on every interface and starts the capture's thread.
    /// The kernel selects by targets and ports (through VLAN tags, as the
    /// eBPF programs do); the capture's filter runs on the frames as
    /// written, alike on both backends. Fails if no interface could be
    /// opened (no CAP_NET_RAW, or the selection does not compile).
    fn add(
        &self,
        id: &str,
        selection: &Selection,
        sink: Sink,
    ) -> Result<Box<dyn Running>, BackendError> {
        let filter = match SocketFilter::new(selection, self.own_api) {
            Ok(filter) => filter,
            Err(e) => {
                sink.abandon();
                return Err(e);
            }
        };
        let has_filter = sink.filter().is_some();
        let (commands, rx) = std::sync::mpsc::channel();
        // Listed before the interfaces are read: an interface that comes
        // later reaches the thread as a command, one that came earlier is
        // in the list (and one in both is opened once).
        lock(&self.captures).push(commands.clone());
        let links: Vec<Link> = lock(&self.links).values().cloned().collect();
        let mut handles = Vec::new();
        let mut errors = Vec::new();
        for link in &links {
            for direction in [Direction::In, Direction::Out] {
                match open(link, direction, &filter) {
                    Ok(h) => handles.push(h),
                    Err(e) => errors.push(e),
                }
            }
        }
        if handles.is_empty() {
            sink.abandon();
            return Err(BackendError::NoInterface(errors));
        }
        for e in &errors {
            tracing::warn!(capture = id, error = %e, "interface left out of the capture");
        }
        let kernel_drops = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            id: id.to_owned(),
            filter,
            handles,
            names: lock(&self.names).clone(),
            sink: Some(sink),
            commands: rx,
            ended: self.ended.clone(),
            kernel_drops: kernel_drops.clone(),
            closed_drops: 0,
            arena: Vec::new(),
            batch: Vec::new(),
        };
        let thread = spawn_essential(format!("pcap-{id}"), move || worker.run())
            .map_err(BackendError::Thread)?;
        Ok(Box::new(ThreadCapture {
            own_api: self.own_api,
            has_filter,
            commands,
            thread: Some(thread),
            kernel_drops,
        }))
    }

    /// Nothing to stop: each capture's thread ends with its capture.
    fn shutdown(&self) {}
}

/// A capture's thread. Dropping the handle stops the capture if it still
/// runs and waits for the thread to exit.
struct ThreadCapture {
    own_api: Option<std::net::SocketAddr>,
    /// Whether the capture has a filter (run on the frames read).
    has_filter: bool,
    commands: Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Packets the kernel dropped on the capture's sockets.
    kernel_drops: Arc<AtomicU64>,
}

impl Running for ThreadCapture {
    fn lost(&self) -> u64 {
        self.kernel_drops.load(Ordering::Relaxed)
    }

    /// The sockets' kernel filter selects the targets and ports; the
    /// capture's filter runs on what they deliver.
    fn filter_place(&self) -> Option<FilterPlace> {
        self.has_filter.then(|| {
            FilterPlace::UserSpace(
                "the libpcap backend runs it on the frames its sockets read".into(),
            )
        })
    }

    /// Returns once the capture's thread has given every socket the new
    /// filter (at its next round, within [`POLL_INTERVAL`]). A thread that
    /// is gone, or ends first (a stop queued before, maxPackets reached on
    /// the packets read first), refuses it as ended.
    fn retarget(&self, selection: &Selection) -> Result<(), BackendError> {
        let filter = SocketFilter::new(selection, self.own_api)?;
        let (done, applied) = std::sync::mpsc::sync_channel(1);
        self.commands
            .send(Command::Retarget(filter, done))
            .map_err(|_| BackendError::Ended)?;
        applied.recv().map_err(|_| BackendError::Ended)
    }

    fn end(&self, reason: EndReason) {
        let _ = self.commands.send(Command::Stop(reason));
    }
}

impl Drop for ThreadCapture {
    fn drop(&mut self) {
        // The engine drops the handle once the thread has reported the end,
        // so the stop finds the queue closed and the join only waits for the
        // thread's last steps; a handle dropped earlier stops the capture.
        self.end(EndReason::Stopped);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    id: String,
    filter: SocketFilter,
    handles: Vec<Handle>,
    names: HashMap<u32, String>,
    sink: Option<Sink>,
    commands: Receiver<Command>,
    ended: EndedTx,
    kernel_drops: Arc<AtomicU64>,
    /// Drops of sockets already closed.
    closed_drops: u64,
    /// One round's packets, copied out of the sockets to be put in order.
    arena: Vec<u8>,
    batch: Vec<Queued>,
}

/// A packet of the current round: its metadata and its bytes in the arena.
struct Queued {
    meta: Meta,
    range: std::ops::Range<usize>,
}

impl Worker {
    fn run(mut self) {
        while let Some(reason) = self.step() {
            if let Some(reason) = reason {
                self.end(reason);
                return;
            }
        }
        self.end(EndReason::Stopped);
    }

    /// One round: wait, read every socket, obey commands. `None` when the
    /// command channel is gone; `Some(Some(reason))` when the capture ends.
    fn step(&mut self) -> Option<Option<EndReason>> {
        wait_readable(&self.fds(), POLL_INTERVAL);
        if let Some(reason) = self.read_all() {
            return Some(Some(reason));
        }
        self.count_drops();
        loop {
            match self.commands.try_recv() {
                Ok(Command::Link(link)) => self.add_link(&link),
                Ok(Command::LinkGone(index)) => self.drop_link(index),
                Ok(Command::Names(names)) => self.names = names,
                Ok(Command::Retarget(filter, done)) => {
                    // A capture that ends before its sockets take the new
                    // filter leaves `done` unanswered: the change is refused.
                    if let Some(reason) = self.retarget(filter) {
                        return Some(Some(reason));
                    }
                    let _ = done.send(());
                }
                Ok(Command::Stop(reason)) => return Some(Some(self.read_rest().unwrap_or(reason))),
                Err(TryRecvError::Empty) => return Some(None),
                Err(TryRecvError::Disconnected) => return None,
            }
        }
    }

    /// Reads until every socket's ring is empty, for at most a second
    /// under a flood: what arrived before the stop belongs to the capture.
    fn read_rest(&mut self) -> Option<EndReason> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(reason) = self.read_all() {
                return Some(reason);
            }
            if self.handles.iter().all(|h| h.drained) || std::time::Instant::now() > deadline {
                return None;
            }
            wait_readable(&self.fds(), Duration::from_millis(5));
        }
    }

    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.handles
            .iter()
            .map(|h| std::os::fd::AsRawFd::as_raw_fd(&h.cap))
            .collect()
    }

    /// Reads what every socket holds and hands it to the sink in time
    /// order (each socket sees one interface and one direction).
    fn read_all(&mut self) -> Option<EndReason> {
        self.batch.clear();
        self.arena.clear();
        let mut gone = Vec::new();
        for (i, h) in self.handles.iter_mut().enumerate() {
            let round_start = self.arena.len();
            h.drained = false;
            while self.arena.len() - round_start < ROUND_BYTES {
                let packet = match h.cap.next_packet() {
                    Ok(p) => p,
                    Err(pcap::Error::TimeoutExpired) => {
                        h.drained = true;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(iface = h.name, error = %e, "socket closed");
                        gone.push(i);
                        break;
                    }
                };
                let start = self.arena.len();
                let mut orig_len = packet.header.len;
                if h.raw_ip {
                    // No link header on this interface: put an Ethernet one in front.
                    let ethertype: u16 = match packet.data.first().map(|b| b >> 4) {
                        Some(6) => 0x86dd,
                        _ => 0x0800,
                    };
                    self.arena.extend_from_slice(&[0; 12]);
                    self.arena.extend_from_slice(&ethertype.to_be_bytes());
                    orig_len += 14;
                }
                self.arena.extend_from_slice(packet.data);
                let ts = packet.header.ts;
                self.batch.push(Queued {
                    meta: Meta {
                        // With nanosecond precision libpcap puts nanoseconds in tv_usec.
                        unix_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_usec as u64,
                        ifindex: h.ifindex,
                        direction: h.direction,
                        orig_len,
                    },
                    range: start..self.arena.len(),
                });
            }
        }
        for i in gone.into_iter().rev() {
            self.close(i);
        }
        let sink = self.sink.as_mut()?;
        self.batch.sort_by_key(|q| q.meta.unix_ns);
        for q in &self.batch {
            let frame = &self.arena[q.range.clone()];
            if let Some(reason) = sink.offer(&q.meta, frame, &self.names, false) {
                return Some(reason);
            }
        }
        sink.flush().err()
    }

    /// Reads what the sockets hold first (libpcap drops what is queued on
    /// a socket when its filter changes), then gives each the new filter;
    /// interfaces opened later get it too.
    fn retarget(&mut self, filter: SocketFilter) -> Option<EndReason> {
        if let Some(reason) = self.read_all() {
            return Some(reason);
        }
        for h in &mut self.handles {
            if let Err(e) = h.cap.filter(&filter.for_link(h.raw_ip), true) {
                tracing::warn!(capture = self.id, iface = h.name, error = %e, "setting the new targets");
            }
        }
        self.filter = filter;
        None
    }

    fn add_link(&mut self, link: &Link) {
        if self.handles.iter().any(|h| h.ifindex == link.index) {
            return;
        }
        for direction in [Direction::In, Direction::Out] {
            match open(link, direction, &self.filter) {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    tracing::warn!(capture = self.id, error = %e, "interface left out of the capture")
                }
            }
        }
    }

    fn drop_link(&mut self, index: u32) {
        while let Some(i) = self.handles.iter().position(|h| h.ifindex == index) {
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let mut h = self.handles.swap_remove(i);
        self.closed_drops += h.cap.stats().map_or(0, |s| u64::from(s.dropped));
    }

    fn count_drops(&mut self) {
        let open: u64 = self
            .handles
            .iter_mut()
            .map(|h| h.cap.stats().map_or(0, |s| u64::from(s.dropped)))
            .sum();
        self.kernel_drops
            .store(self.closed_drops + open, Ordering::Relaxed);
    }

    fn end(mut self, reason: EndReason) {
        self.count_drops();
        if let Some(sink) = self.sink.take() {
            let _ = self.ended.send(Ended {
                id: self.id.clone(),
                finished: sink.finish(reason),
            });
        }
    }
}
