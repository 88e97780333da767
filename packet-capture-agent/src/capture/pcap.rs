//! The fallback backend, for nodes where the eBPF programs cannot load:
//! libpcap (AF_PACKET) on every interface, one thread per capture, with the
//! whole selection compiled to classic BPF and run by the kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Ended;
use super::sink::{EndReason, Sink};
use crate::filter::through_vlans;
use crate::netlink::Link;
use crate::writer::{Direction, Meta};

/// How long a capture thread waits for packets before it looks at its
/// commands again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Kernel buffer per socket, as tcpdump's default.
const BUFFER_BYTES: i32 = 2 << 20;

enum Command {
    Link(Link),
    LinkGone(u32),
    Names(HashMap<u32, String>),
    Stop(EndReason),
}

struct Running {
    commands: Sender<Command>,
    thread: std::thread::JoinHandle<()>,
}

/// What a capture's sockets select and keep.
#[derive(Clone)]
pub struct Selection {
    /// The tcpdump expression of the targets and ports.
    pub expression: String,
    pub snaplen: u32,
}

pub struct PcapBackend {
    links: Mutex<HashMap<u32, Link>>,
    names: Mutex<HashMap<u32, String>>,
    captures: Mutex<HashMap<String, Running>>,
    ended: tokio::sync::mpsc::UnboundedSender<Ended>,
}

struct Handle {
    ifindex: u32,
    name: String,
    direction: Direction,
    /// The link carries no Ethernet header (DLT_RAW): one is put in front.
    raw_ip: bool,
    cap: pcap::Capture<pcap::Active>,
    /// Packets read from the socket.
    read: u64,
}

impl Handle {
    /// Whether every packet the kernel queued on the socket has been read.
    fn caught_up(&mut self) -> bool {
        self.cap.stats().map_or(true, |s| {
            self.read >= u64::from(s.received.saturating_sub(s.dropped))
        })
    }
}

fn open(link: &Link, direction: Direction, selection: &Selection) -> Result<Handle, String> {
    let fail = |e: pcap::Error| format!("{} ({direction:?}): {e}", link.name);
    let cap = pcap::Capture::from_device(link.name.as_str())
        .map_err(fail)?
        .snaplen(selection.snaplen.min(i32::MAX as u32) as i32)
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
        other => {
            return Err(format!(
                "{}: link type {other:?} is not supported",
                link.name
            ));
        }
    };
    // Ethernet frames may carry VLAN tags; link-less packets cannot.
    let expression = if raw_ip {
        selection.expression.clone()
    } else {
        through_vlans(&selection.expression)
    };
    let mut cap = cap;
    cap.filter(&expression, true).map_err(fail)?;
    Ok(Handle {
        ifindex: link.index,
        name: link.name.clone(),
        direction,
        raw_ip,
        cap,
        read: 0,
    })
}

impl PcapBackend {
    pub fn new(ended: tokio::sync::mpsc::UnboundedSender<Ended>) -> Self {
        Self {
            links: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            captures: Mutex::new(HashMap::new()),
            ended,
        }
    }

    fn broadcast(&self, make: impl Fn() -> Command) {
        for running in self.captures.lock().expect("captures").values() {
            let _ = running.commands.send(make());
        }
    }

    pub fn link_up(&self, link: Link) {
        self.links
            .lock()
            .expect("links")
            .insert(link.index, link.clone());
        self.broadcast(|| Command::Link(link.clone()));
    }

    pub fn link_gone(&self, index: u32) {
        self.links.lock().expect("links").remove(&index);
        self.broadcast(|| Command::LinkGone(index));
    }

    pub fn set_names(&self, names: HashMap<u32, String>) {
        *self.names.lock().expect("names") = names.clone();
        self.broadcast(|| Command::Names(names.clone()));
    }

    pub fn interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .links
            .lock()
            .expect("links")
            .values()
            .map(|l| l.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Opens sockets on every interface and starts the capture's thread.
    /// Returns the counter of packets the kernel dropped for it. Fails if no
    /// interface could be opened (no CAP_NET_RAW, or the selection does not
    /// compile), starting nothing.
    pub fn start(
        &self,
        id: &str,
        selection: Selection,
        sink: Sink,
    ) -> Result<Arc<AtomicU64>, String> {
        let links: Vec<Link> = self
            .links
            .lock()
            .expect("links")
            .values()
            .cloned()
            .collect();
        let mut handles = Vec::new();
        let mut errors = Vec::new();
        for link in &links {
            for direction in [Direction::In, Direction::Out] {
                match open(link, direction, &selection) {
                    Ok(h) => handles.push(h),
                    Err(e) => errors.push(e),
                }
            }
        }
        if handles.is_empty() {
            sink.abandon();
            return Err(format!(
                "libpcap could not open any interface: {}",
                if errors.is_empty() {
                    "there are none".to_string()
                } else {
                    errors.join("; ")
                }
            ));
        }
        for e in &errors {
            tracing::warn!(capture = id, error = %e, "interface left out of the capture");
        }
        let kernel_drops = Arc::new(AtomicU64::new(0));
        let (commands, rx) = std::sync::mpsc::channel();
        let worker = Worker {
            id: id.to_owned(),
            selection,
            handles,
            names: self.names.lock().expect("names").clone(),
            sink: Some(sink),
            commands: rx,
            ended: self.ended.clone(),
            kernel_drops: kernel_drops.clone(),
            closed_drops: 0,
            arena: Vec::new(),
            batch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("pcap-{id}"))
            .spawn(move || worker.run())
            .map_err(|e| format!("starting the capture thread: {e}"))?;
        self.captures
            .lock()
            .expect("captures")
            .insert(id.to_owned(), Running { commands, thread });
        Ok(kernel_drops)
    }

    /// Ends a capture; its thread reports through `ended`.
    pub fn stop(&self, id: &str, reason: EndReason) {
        if let Some(running) = self.captures.lock().expect("captures").get(id) {
            let _ = running.commands.send(Command::Stop(reason));
        }
    }

    /// Forgets a capture whose thread has ended.
    pub fn reap(&self, id: &str) {
        if let Some(running) = self.captures.lock().expect("captures").remove(id) {
            let _ = running.thread.join();
        }
    }
}

struct Worker {
    id: String,
    selection: Selection,
    handles: Vec<Handle>,
    names: HashMap<u32, String>,
    sink: Option<Sink>,
    commands: Receiver<Command>,
    ended: tokio::sync::mpsc::UnboundedSender<Ended>,
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
        super::wait_readable(&self.fds(), POLL_INTERVAL);
        if let Some(reason) = self.read_all() {
            return Some(Some(reason));
        }
        self.count_drops();
        loop {
            match self.commands.try_recv() {
                Ok(Command::Link(link)) => self.add_link(&link),
                Ok(Command::LinkGone(index)) => self.drop_link(index),
                Ok(Command::Names(names)) => self.names = names,
                Ok(Command::Stop(reason)) => return Some(Some(self.read_rest().unwrap_or(reason))),
                Err(TryRecvError::Empty) => return Some(None),
                Err(TryRecvError::Disconnected) => return None,
            }
        }
    }

    /// Reads until every socket has handed over what its kernel side
    /// queued: what arrived before the stop belongs to the capture.
    fn read_rest(&mut self) -> Option<EndReason> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(reason) = self.read_all() {
                return Some(reason);
            }
            if self.handles.iter_mut().all(Handle::caught_up)
                || std::time::Instant::now() > deadline
            {
                return None;
            }
            super::wait_readable(&self.fds(), Duration::from_millis(5));
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
            loop {
                let packet = match h.cap.next_packet() {
                    Ok(p) => p,
                    Err(pcap::Error::TimeoutExpired) => break,
                    Err(e) => {
                        tracing::debug!(iface = h.name, error = %e, "socket closed");
                        gone.push(i);
                        break;
                    }
                };
                h.read += 1;
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
            if let Some(reason) = sink.offer(&q.meta, &self.arena[q.range.clone()], &self.names) {
                return Some(reason);
            }
        }
        sink.flush().err()
    }

    fn add_link(&mut self, link: &Link) {
        if self.handles.iter().any(|h| h.ifindex == link.index) {
            return;
        }
        for direction in [Direction::In, Direction::Out] {
            match open(link, direction, &self.selection) {
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
                slot: None,
                finished: sink.finish(reason),
            });
        }
    }
}
