//! The capture engine: captures by id, their lifecycle and status, on the
//! eBPF backend or the libpcap fallback.

mod ebpf;
mod pcap;
pub mod sink;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use packet_capture_common::abi::DEFAULT_RING_BYTES;
use packet_capture_common::crd::{OutputFormat, STDOUT_OUTPUT_FILE};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::ebpf::{Kernel, LinkKind, SlotTargets};
use crate::files::CaptureDir;
use crate::filter::{Filter, selection_expression};
use crate::netlink::{LinkEvent, LinkWatcher};
use crate::writer::Encoder;
use sink::{Counters, Destination, EndReason, Sink};

/// Bytes the kernel copies at least when a capture has a filter, so that
/// filters looking past a small snaplen still see what they test.
const FILTER_LOOKAHEAD: u32 = 512;
/// Ended captures kept for status queries.
const ENDED_KEPT: usize = 256;
/// How often running captures publish their counters.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stop waits for the capture's file to be finished.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to capture, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Empty: any address.
    pub targets: Vec<IpNet>,
    /// Empty: any port.
    pub ports: Vec<u16>,
    pub duration: Duration,
    pub max_packets: u64,
    pub format: OutputFormat,
    pub filter: String,
    pub snaplen: u32,
}

#[derive(Debug, Clone)]
pub struct StartRequest {
    pub id: String,
    /// Used in file names.
    pub name: String,
    pub spec: CaptureSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Running,
    Completed,
    Failed,
    Stopped,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
    }
}

/// A capture as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureStatus {
    pub id: String,
    pub name: String,
    pub spec: CaptureSpec,
    pub state: State,
    pub packets: u64,
    pub dropped: u64,
    pub filtered: u64,
    pub output_file: String,
    pub file_size: u64,
    pub message: String,
    pub start_time: SystemTime,
    pub end_time: Option<SystemTime>,
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request is not valid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Another capture has this id.
    #[error("{0}")]
    Conflict(String),
    /// The node cannot run it now (all slots used, disk, backend).
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// eBPF, or libpcap when the programs cannot be loaded.
    Auto,
    Ebpf,
    Pcap,
}

pub struct EngineConfig {
    pub node_name: String,
    pub files: Arc<CaptureDir>,
    /// A capture file stops growing before it exceeds this.
    pub max_file_bytes: u64,
    pub backend: BackendChoice,
    /// Ring buffer shared by all captures (eBPF backend).
    pub ring_bytes: u32,
}

/// Engine-wide numbers for metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub ring_lost: u64,
    pub interfaces: usize,
    /// Bytes written to capture files since the agent started.
    pub bytes_written: u64,
}

/// A sink that ended, reported by a backend.
pub struct Ended {
    pub id: String,
    /// The eBPF slot it held.
    pub slot: Option<usize>,
    pub finished: sink::Finished,
}

enum Backend {
    Ebpf(Box<ebpf::EbpfBackend>),
    Pcap(pcap::PcapBackend),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Self::Ebpf(_) => "ebpf",
            Self::Pcap(_) => "pcap",
        }
    }
}

/// How a capture's kernel-side losses are read.
enum Loss {
    Slot { slot: usize, baseline: u64 },
    Socket(Arc<AtomicU64>),
}

struct Life {
    state: State,
    message: String,
    end_time: Option<SystemTime>,
    /// Losses frozen when the capture ended.
    dropped: Option<u64>,
    /// The finished file and its size.
    file: Option<(PathBuf, u64)>,
}

struct Capture {
    id: String,
    name: String,
    spec: CaptureSpec,
    start_time: SystemTime,
    /// Where the file will be once complete; None for stdout.
    output_file: Option<PathBuf>,
    counters: Arc<Counters>,
    loss: Loss,
    life: Mutex<Life>,
    status: watch::Sender<CaptureStatus>,
    timer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Inner {
    config: EngineConfig,
    /// The runtime the engine started on, for its timers.
    runtime: tokio::runtime::Handle,
    backend: Backend,
    captures: Mutex<BTreeMap<String, Arc<Capture>>>,
    maintain: std::sync::mpsc::Sender<()>,
    /// Bytes written to capture files, by every sink.
    bytes_written: Arc<AtomicU64>,
}

/// The capture engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Loads the backend, attaches to every interface, recovers files left
    /// by an interrupted run, and starts the background work.
    pub async fn start(config: EngineConfig) -> anyhow::Result<Self> {
        let recovered = config.files.recover()?;
        if !recovered.is_empty() {
            tracing::info!(files = recovered.len(), "recovered capture files");
        }
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let backend = load_backend(&config, ended_tx)?;
        tracing::info!(backend = backend.name(), "capture backend ready");
        let maintain = spawn_maintenance(config.files.clone())?;
        let inner = Arc::new(Inner {
            config,
            runtime: tokio::runtime::Handle::current(),
            backend,
            captures: Mutex::new(BTreeMap::new()),
            maintain,
            bytes_written: Arc::default(),
        });
        let engine = Self { inner };
        engine.watch_links().await?;
        tokio::spawn(engine.clone().follow_ended(ended_rx));
        tokio::spawn(engine.clone().publish_progress());
        Ok(engine)
    }

    pub fn backend(&self) -> &'static str {
        self.inner.backend.name()
    }

    pub fn node_name(&self) -> &str {
        &self.inner.config.node_name
    }

    pub fn files(&self) -> &CaptureDir {
        &self.inner.config.files
    }

    pub fn interfaces(&self) -> Vec<String> {
        match &self.inner.backend {
            Backend::Ebpf(b) => b.interfaces(),
            Backend::Pcap(b) => b.interfaces(),
        }
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            ring_lost: match &self.inner.backend {
                Backend::Ebpf(b) => b.ring_lost(),
                Backend::Pcap(_) => 0,
            },
            interfaces: self.interfaces().len(),
            bytes_written: self.inner.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Starts a capture, or returns the one with the same id and request.
    pub fn start_capture(&self, req: StartRequest) -> Result<CaptureStatus, StartError> {
        let filter = if req.spec.filter.trim().is_empty() {
            None
        } else {
            Some(
                Filter::compile(&req.spec.filter)
                    .map_err(|e| StartError::Invalid(format!("filter: {e}")))?,
            )
        };
        let mut captures = self.inner.captures.lock().expect("captures");
        if let Some(existing) = captures.get(&req.id) {
            if existing.name == req.name && existing.spec == req.spec {
                return Ok(self.snapshot(existing));
            }
            return Err(StartError::Conflict(format!(
                "capture {:?} exists with a different name or spec",
                req.id
            )));
        }
        let spec = &req.spec;
        let start_time = SystemTime::now();
        let counters = Arc::new(Counters::default());
        let destination = match spec.format.extension() {
            None => Destination::Stdout(Vec::with_capacity(64 * 1024)),
            Some(ext) => {
                let secs = start_time
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                let output = self
                    .inner
                    .config
                    .files
                    .create(&req.name, ext, secs, self.inner.config.max_file_bytes)
                    .map_err(|e| {
                        StartError::Unavailable(format!("creating the capture file: {e}"))
                    })?;
                Destination::File(output)
            }
        };
        let output_file = match &destination {
            Destination::File(o) => Some(o.final_path().to_path_buf()),
            Destination::Stdout(_) => None,
        };
        let make_sink = |destination, filter| {
            Sink::new(
                req.id.clone(),
                self.inner.bytes_written.clone(),
                filter,
                spec.snaplen,
                spec.max_packets,
                Encoder::new(spec.format, spec.snaplen),
                destination,
                counters.clone(),
            )
        };
        let loss = match &self.inner.backend {
            Backend::Ebpf(b) => {
                let copy_len = if filter.is_some() {
                    spec.snaplen.max(FILTER_LOOKAHEAD)
                } else {
                    spec.snaplen
                };
                let targets = SlotTargets {
                    nets: spec.targets.clone(),
                    ports: spec.ports.clone(),
                    copy_len,
                };
                let (slot, baseline) = b
                    .add(targets, make_sink(destination, filter))
                    .map_err(StartError::Unavailable)?;
                Loss::Slot { slot, baseline }
            }
            Backend::Pcap(b) => {
                // The kernel selects by targets and ports (through VLAN tags,
                // as the eBPF programs do); the filter runs on the frames as
                // written, alike on both backends.
                let selection = pcap::Selection {
                    expression: selection_expression(&spec.targets, &spec.ports, ""),
                    snaplen: spec.snaplen.max(if filter.is_some() {
                        FILTER_LOOKAHEAD
                    } else {
                        0
                    }),
                };
                let drops = b
                    .start(&req.id, selection, make_sink(destination, filter))
                    .map_err(StartError::Unavailable)?;
                Loss::Socket(drops)
            }
        };
        let capture = Arc::new(Capture {
            id: req.id.clone(),
            name: req.name.clone(),
            spec: req.spec.clone(),
            start_time,
            output_file,
            counters,
            loss,
            life: Mutex::new(Life {
                state: State::Running,
                message: "capturing".into(),
                end_time: None,
                dropped: None,
                file: None,
            }),
            status: watch::Sender::new(placeholder_status(&req, start_time)),
            timer: Mutex::new(None),
        });
        let status = self.snapshot(&capture);
        capture.status.send_replace(status.clone());
        let engine = self.clone();
        let id = req.id.clone();
        let duration = spec.duration;
        *capture.timer.lock().expect("timer") = Some(self.inner.runtime.spawn(async move {
            tokio::time::sleep(duration).await;
            engine.end(&id, EndReason::Duration(duration.as_secs()));
        }));
        captures.insert(req.id.clone(), capture);
        prune_ended(&mut captures);
        tracing::info!(
            capture = req.id,
            name = req.name,
            format = %spec.format,
            targets = spec.targets.len(),
            ports = spec.ports.len(),
            filter = spec.filter,
            "capture started"
        );
        Ok(status)
    }

    /// Stops a running capture and waits until its file is finished.
    pub async fn stop_capture(&self, id: &str) -> Option<CaptureStatus> {
        let mut rx = self.watch(id)?;
        self.end(id, EndReason::Stopped);
        let _ = tokio::time::timeout(STOP_TIMEOUT, rx.wait_for(|s| s.state.is_final())).await;
        self.get(id)
    }

    /// Asks the backend to end a capture; the end arrives in `follow_ended`.
    fn end(&self, id: &str, reason: EndReason) {
        let Some(capture) = self.capture(id) else {
            return;
        };
        if capture.life.lock().expect("life").state.is_final() {
            return;
        }
        match (&self.inner.backend, &capture.loss) {
            (Backend::Ebpf(b), Loss::Slot { slot, .. }) => b.remove(*slot, reason),
            (Backend::Pcap(b), _) => b.stop(id, reason),
            (Backend::Ebpf(_), Loss::Socket(_)) => unreachable!("eBPF captures have slots"),
        }
    }

    pub fn get(&self, id: &str) -> Option<CaptureStatus> {
        self.capture(id).map(|c| self.snapshot(&c))
    }

    pub fn list(&self) -> Vec<CaptureStatus> {
        let captures: Vec<Arc<Capture>> = self
            .inner
            .captures
            .lock()
            .expect("captures")
            .values()
            .cloned()
            .collect();
        captures.iter().map(|c| self.snapshot(c)).collect()
    }

    /// The capture's status now and whenever it changes.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<CaptureStatus>> {
        self.capture(id).map(|c| c.status.subscribe())
    }

    /// Ends every running capture (their files are finished) and stops the
    /// backend, detaching the programs.
    pub async fn shutdown(&self) {
        let running: Vec<String> = self
            .list()
            .into_iter()
            .filter(|s| !s.state.is_final())
            .map(|s| s.id)
            .collect();
        let mut waits = Vec::new();
        for id in &running {
            if let Some(mut rx) = self.watch(id) {
                self.end(id, EndReason::Shutdown);
                waits.push(async move {
                    let _ = rx.wait_for(|s| s.state.is_final()).await;
                });
            }
        }
        let _ = tokio::time::timeout(STOP_TIMEOUT, futures::future::join_all(waits)).await;
        if let Backend::Ebpf(b) = &self.inner.backend {
            b.shutdown();
            b.kernel().detach_all();
        }
    }

    fn capture(&self, id: &str) -> Option<Arc<Capture>> {
        self.inner
            .captures
            .lock()
            .expect("captures")
            .get(id)
            .cloned()
    }

    fn snapshot(&self, c: &Capture) -> CaptureStatus {
        let life = c.life.lock().expect("life");
        let dropped = life.dropped.unwrap_or_else(|| self.lost_now(c));
        let (output_file, file_size) = match (&life.file, &c.output_file) {
            (Some((path, size)), _) => current_file(path, *size),
            (None, Some(path)) => (
                path.display().to_string(),
                c.counters.bytes.load(Ordering::Relaxed),
            ),
            (None, None) => (STDOUT_OUTPUT_FILE.to_owned(), 0),
        };
        CaptureStatus {
            id: c.id.clone(),
            name: c.name.clone(),
            spec: c.spec.clone(),
            state: life.state,
            packets: c.counters.packets.load(Ordering::Relaxed),
            dropped,
            filtered: c.counters.filtered.load(Ordering::Relaxed),
            output_file,
            file_size,
            message: life.message.clone(),
            start_time: c.start_time,
            end_time: life.end_time,
            node_name: self.inner.config.node_name.clone(),
        }
    }

    /// Packets the capture lost so far: in the kernel and in user space.
    fn lost_now(&self, c: &Capture) -> u64 {
        let kernel = match (&self.inner.backend, &c.loss) {
            (Backend::Ebpf(b), Loss::Slot { slot, baseline }) => b.lost(*slot, *baseline),
            (_, Loss::Socket(drops)) => drops.load(Ordering::Relaxed),
            (Backend::Pcap(_), Loss::Slot { .. }) => 0,
        };
        kernel + c.counters.dropped.load(Ordering::Relaxed)
    }

    async fn follow_ended(self, mut ended: mpsc::UnboundedReceiver<Ended>) {
        while let Some(e) = ended.recv().await {
            match &self.inner.backend {
                Backend::Ebpf(b) => {
                    if let Some(slot) = e.slot {
                        b.release(slot);
                    }
                }
                Backend::Pcap(b) => b.reap(&e.id),
            }
            let Some(capture) = self.capture(&e.id) else {
                continue;
            };
            if let Some(timer) = capture.timer.lock().expect("timer").take() {
                timer.abort();
            }
            let dropped = self.lost_now(&capture);
            let (state, message) = match &e.finished.reason {
                EndReason::MaxPackets(_) | EndReason::Duration(_) | EndReason::FileSize(_) => {
                    (State::Completed, e.finished.reason.message())
                }
                EndReason::Stopped | EndReason::Shutdown => {
                    (State::Stopped, e.finished.reason.message())
                }
                EndReason::Error(msg) => (State::Failed, msg.clone()),
            };
            {
                let mut life = capture.life.lock().expect("life");
                life.state = state;
                life.message = message;
                life.end_time = Some(SystemTime::now());
                life.dropped = Some(dropped);
                life.file = e.finished.file;
            }
            let status = self.snapshot(&capture);
            tracing::info!(
                capture = status.id,
                state = ?status.state,
                packets = status.packets,
                dropped = status.dropped,
                file = status.output_file,
                reason = status.message,
                "capture ended"
            );
            capture.status.send_replace(status);
            let _ = self.inner.maintain.send(());
        }
    }

    async fn publish_progress(self) {
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        loop {
            tick.tick().await;
            let running: Vec<Arc<Capture>> = self
                .inner
                .captures
                .lock()
                .expect("captures")
                .values()
                .filter(|c| !c.life.lock().expect("life").state.is_final())
                .cloned()
                .collect();
            for c in running {
                let status = self.snapshot(&c);
                c.status.send_if_modified(|old| {
                    let changed = *old != status;
                    *old = status.clone();
                    changed
                });
            }
        }
    }

    /// Follows the interfaces of the namespace on a thread of its own, and
    /// returns once every existing interface is attached.
    async fn watch_links(&self) -> anyhow::Result<()> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let engine = self.clone();
        let mut watcher = LinkWatcher::new()?;
        std::thread::Builder::new()
            .name("links".into())
            .spawn(move || {
                let mut names: HashMap<u32, String> = HashMap::new();
                let mut ready = Some(ready_tx);
                loop {
                    let events = match watcher.next_events() {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(error = %e, "reading interface changes stopped");
                            return;
                        }
                    };
                    for event in events {
                        match event {
                            LinkEvent::Up(link) => {
                                if names.get(&link.index) != Some(&link.name) {
                                    if let Some(old) = names.insert(link.index, link.name.clone()) {
                                        engine.link_gone(&old, link.index);
                                    }
                                    engine.link_up(&link);
                                }
                            }
                            LinkEvent::Gone(link) => {
                                names.remove(&link.index);
                                engine.link_gone(&link.name, link.index);
                            }
                            LinkEvent::DumpDone => {
                                if let Some(tx) = ready.take() {
                                    let _ = tx.send(());
                                }
                            }
                        }
                    }
                    match &engine.inner.backend {
                        Backend::Ebpf(b) => b.set_names(names.clone()),
                        Backend::Pcap(b) => b.set_names(names.clone()),
                    }
                }
            })?;
        ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("listing the network interfaces failed"))
    }

    fn link_up(&self, link: &crate::netlink::Link) {
        match &self.inner.backend {
            Backend::Ebpf(b) => match b.attach(&link.name, LinkKind::from_arphrd(link.arphrd)) {
                Ok(()) => tracing::info!(iface = link.name, "attached"),
                Err(e) => {
                    tracing::warn!(iface = link.name, error = %e, "cannot capture on this interface")
                }
            },
            Backend::Pcap(b) => {
                b.link_up(link.clone());
                tracing::info!(iface = link.name, "capturing with libpcap");
            }
        }
    }

    fn link_gone(&self, name: &str, index: u32) {
        match &self.inner.backend {
            Backend::Ebpf(b) => b.forget(name),
            Backend::Pcap(b) => b.link_gone(index),
        }
        tracing::info!(iface = name, "interface gone");
    }
}

fn load_backend(
    config: &EngineConfig,
    ended: mpsc::UnboundedSender<Ended>,
) -> anyhow::Result<Backend> {
    let ring_bytes = if config.ring_bytes == 0 {
        DEFAULT_RING_BYTES
    } else {
        config.ring_bytes
    };
    let ebpf = || -> anyhow::Result<Backend> {
        let (kernel, ring) = Kernel::load(ring_bytes)?;
        for (program, verified, bytes) in kernel.program_sizes() {
            tracing::debug!(program, verified, bytes, "eBPF program loaded");
        }
        let backend = ebpf::EbpfBackend::start(kernel, ring, ended.clone())?;
        Ok(Backend::Ebpf(Box::new(backend)))
    };
    let pcap = || Backend::Pcap(pcap::PcapBackend::new(ended.clone()));
    match config.backend {
        BackendChoice::Ebpf => ebpf(),
        BackendChoice::Pcap => Ok(pcap()),
        BackendChoice::Auto => ebpf().or_else(|e| {
            // The whole chain: the cause (a missing capability, a verifier
            // refusal) is at its end.
            tracing::warn!(
                error = format!("{e:#}"),
                "the eBPF programs cannot be loaded; capturing with libpcap instead"
            );
            Ok(pcap())
        }),
    }
}

/// Compression and clean-up on a thread of the lowest priority: now, after
/// each capture ends, and every 60 seconds.
fn spawn_maintenance(files: Arc<CaptureDir>) -> std::io::Result<std::sync::mpsc::Sender<()>> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("files".into())
        .spawn(move || {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: changes this thread's policy only.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_IDLE");
            }
            loop {
                if let Err(e) = files.maintain() {
                    tracing::warn!(error = %e, "capture file maintenance");
                }
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    Ok(tx)
}

/// The file as it is now: compressed by maintenance, or as it was written.
fn current_file(path: &std::path::Path, size: u64) -> (String, u64) {
    if path.exists() {
        return (path.display().to_string(), size);
    }
    for ext in ["gz", "zst"] {
        let mut compressed = path.as_os_str().to_owned();
        compressed.push(format!(".{ext}"));
        let compressed = PathBuf::from(compressed);
        if let Ok(meta) = std::fs::metadata(&compressed) {
            return (compressed.display().to_string(), meta.len());
        }
    }
    (path.display().to_string(), size)
}

fn placeholder_status(req: &StartRequest, start_time: SystemTime) -> CaptureStatus {
    CaptureStatus {
        id: req.id.clone(),
        name: req.name.clone(),
        spec: req.spec.clone(),
        state: State::Starting,
        packets: 0,
        dropped: 0,
        filtered: 0,
        output_file: String::new(),
        file_size: 0,
        message: String::new(),
        start_time,
        end_time: None,
        node_name: String::new(),
    }
}

/// Keeps at most ENDED_KEPT ended captures, forgetting the oldest.
fn prune_ended(captures: &mut BTreeMap<String, Arc<Capture>>) {
    let mut ended: Vec<(SystemTime, String)> = captures
        .values()
        .filter_map(|c| {
            let life = c.life.lock().expect("life");
            life.state
                .is_final()
                .then(|| (life.end_time.unwrap_or(c.start_time), c.id.clone()))
        })
        .collect();
    if ended.len() <= ENDED_KEPT {
        return;
    }
    ended.sort();
    let excess = ended.len() - ENDED_KEPT;
    for (_, id) in ended.into_iter().take(excess) {
        captures.remove(&id);
    }
}

/// Waits until one of `fds` is readable or `timeout` passes.
pub(crate) fn wait_readable(fds: &[std::os::fd::RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfd of the length given.
    unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
}
