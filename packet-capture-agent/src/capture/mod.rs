//! The capture engine: captures by id, their lifecycle and status, on the
//! eBPF backend or the libpcap fallback.
//!
//! The engine never looks at which backend it runs on:
//!
//! - [`backend`]: what the engine asks of a backend, and the handle each
//!   running capture gets; `ebpf` (one ring-buffer reader for every capture)
//!   and `pcap` (a thread and sockets per capture) implement it.
//! - [`links`]: the thread that follows the interfaces for the backend.
//! - [`sink`]: one capture's filter, limits and writer, on the reading thread.
//! - `poll`: the wait both backends' reading threads share.

pub mod backend;
mod copies;
mod ebpf;
pub mod links;
mod pcap;
mod pods;
mod poll;
mod ring;
pub mod sink;
mod stdout;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use packet_capture_common::abi::DEFAULT_RING_BYTES;
use packet_capture_common::crd::{CaptureState, OutputFormat, TargetDirection};
use packet_capture_common::validate::CaptureLimits;
use tokio::sync::{mpsc, watch};

use crate::ebpf::TcAttach;
use crate::files::{CaptureDir, Maintenance};
use crate::filter::{Filter, selection_expression};
use crate::sync::lock;
use crate::writer::{Encoder, Origin};
use backend::{Backend, BackendError, Ended, Running, Selection};
use copies::Copies;
use links::LinksError;
use pods::PodInterfaces;
pub use sink::{Batch, NoReader, Reader, TAP_READERS, Tapped};
use sink::{Counters, Destination, EndReason, Sink, Tap, TapHandle};

pub use pcap::OpenError;
pub use pods::TargetPod;

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
    /// Empty: any address, unless `only_targets`.
    pub targets: Vec<IpNet>,
    /// Only `targets`, even when there are none (then nothing): the
    /// targets of a pod selector, which [`Engine::set_targets`] follows.
    pub only_targets: bool,
    /// The pods among the targets, to name their interfaces.
    pub pods: Vec<TargetPod>,
    /// Empty: any port.
    pub ports: Vec<u16>,
    pub duration: Duration,
    pub max_packets: u64,
    pub format: OutputFormat,
    pub filter: String,
    pub snaplen: u32,
    /// Packets to a target, from one, or both.
    pub direction: TargetDirection,
    /// Every copy of a packet (one per interface it crosses); false: the
    /// first.
    pub keep_copies: bool,
}

#[derive(Debug, Clone)]
pub struct StartRequest {
    pub id: String,
    /// Used in file names.
    pub name: String,
    pub spec: CaptureSpec,
}

/// A capture as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureStatus {
    pub id: String,
    pub name: String,
    pub spec: CaptureSpec,
    pub state: CaptureState,
    pub packets: u64,
    pub dropped: u64,
    pub filtered: u64,
    /// Of those, the packets the kernel rejected: they never reached user
    /// space.
    pub filtered_in_kernel: u64,
    /// Where the filter runs: `kernel`, `user space (why)`; empty without
    /// a filter.
    pub filter_path: String,
    pub output_file: String,
    pub file_size: u64,
    pub message: String,
    pub start_time: SystemTime,
    pub end_time: Option<SystemTime>,
    pub node_name: String,
}

/// A reader's view of a running capture ([`Engine::stream`]).
pub struct LiveStream {
    /// Ends when the capture does; a reader that falls behind by more
    /// than [`sink::TAP_BYTES`] is told how many it lost.
    pub packets: Reader,
    pub origin: Origin,
    pub snaplen: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request is not valid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Another capture has this id.
    #[error("{0}")]
    Conflict(String),
    /// The node cannot run it now (disk, backend, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The node runs as many captures as it may (MAX_CONCURRENT_CAPTURES),
    /// or has no room for their targets.
    #[error("{0}")]
    Full(String),
}

impl From<BackendError> for StartError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Full(_) | BackendError::MapsFull(_) => Self::Full(e.to_string()),
            BackendError::TooManyTargets { .. } => Self::Invalid(e.to_string()),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetTargetsError {
    #[error("no such capture")]
    NotFound,
    #[error("the capture has ended")]
    Ended,
    /// The backend did not take the targets, as a start would have been
    /// refused (without room for them, the capture keeps those of its old
    /// ones the new list covers; otherwise all its old ones).
    #[error(transparent)]
    Refused(StartError),
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("recovering the capture directory: {0}")]
    Recover(#[source] std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("starting the file maintenance thread: {0}")]
    Maintenance(#[source] std::io::Error),
    #[error(transparent)]
    Links(#[from] LinksError),
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
    /// The ceilings of each capture's duration and packet count.
    pub limits: CaptureLimits,
    /// Captures running at once; a start beyond it is refused.
    pub max_running: usize,
    pub backend: BackendChoice,
    /// Ring buffer shared by all captures (eBPF backend).
    pub ring_bytes: u32,
    /// How the eBPF programs are attached to the interfaces.
    pub tc_attach: TcAttach,
    /// Whether the eBPF backend runs the captures' filters in the kernel
    /// (`--filters-in-user-space` turns it off, to measure the difference).
    pub kernel_filters: bool,
    /// The agent API's address: TCP to or from it is never captured.
    pub own_api: Option<std::net::SocketAddr>,
}

/// Engine-wide numbers for metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub ring_lost: u64,
    pub interfaces: usize,
    /// Bytes written to capture files since the agent started.
    pub bytes_written: u64,
}

struct Life {
    state: CaptureState,
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
    /// As started, with the targets of the last [`Engine::set_targets`];
    /// the file's interface descriptions read its pods.
    spec: Arc<Mutex<CaptureSpec>>,
    start_time: SystemTime,
    /// Where the file will be once complete; None for stdout.
    output_file: Option<PathBuf>,
    counters: Arc<Counters>,
    /// Live readers subscribe here while the sink, which holds the tap,
    /// lives: its end ends their streams.
    tap: TapHandle,
    /// What its pcapng file says of where it comes from; live streams say
    /// the same.
    origin: Origin,
    snaplen: u32,
    /// Where its filter runs ([`CaptureStatus::filter_path`]).
    filter_path: String,
    /// The backend's handle while the capture runs. Dropped once the end is
    /// recorded, which is when the backend takes back what the capture held.
    running: Mutex<Option<Box<dyn Running>>>,
    life: Mutex<Life>,
    status: watch::Sender<CaptureStatus>,
    timer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Inner {
    config: EngineConfig,
    /// The runtime the engine started on, for its timers.
    runtime: tokio::runtime::Handle,
    backend: Arc<dyn Backend>,
    captures: Mutex<BTreeMap<String, Arc<Capture>>>,
    /// Ids of captures being started: their file is being made and the
    /// backend set up without the `captures` lock held (those can block).
    /// Taken only while holding `captures`.
    starting: Mutex<BTreeSet<String>>,
    /// Ends of captures still starting: a busy interface can fill a small
    /// packet limit before the start has registered its capture. The start
    /// takes its capture's end from here once it has. Taken only while
    /// holding `captures`.
    early_ends: Mutex<Vec<Ended>>,
    /// Set once the engine shuts down, from when starts are refused. A
    /// start holds it read from its first check to its capture's
    /// registration, so the shutdown, which takes it to write, waits for
    /// the starts under way and then finds each of their captures.
    stopping: RwLock<bool>,
    maintenance: Maintenance,
    /// Bytes written to capture files, by every sink.
    bytes_written: Arc<AtomicU64>,
}

/// A pcapng file's section comment: the capture, its node, the agent, the
/// filter, and all it selects as a tcpdump expression.
fn describe_capture(name: &str, node: &str, spec: &CaptureSpec) -> String {
    let filter = spec.filter.trim();
    let selects = selection_expression(&spec.targets, &spec.ports, spec.direction, filter);
    format!(
        "capture {name} on node {node} by packet-capture {}; filter: {}; selects: {}",
        env!("CARGO_PKG_VERSION"),
        if filter.is_empty() { "none" } else { filter },
        if selects.is_empty() {
            "everything"
        } else {
            &selects
        },
    )
}

/// What a capture keeps of `old` when the targets it was given, `wanted`,
/// were refused: only the old targets `wanted` covers, and the pods of
/// `wanted` among them.
fn kept_of(old: &CaptureSpec, wanted: &CaptureSpec) -> CaptureSpec {
    let targets: Vec<IpNet> = old
        .targets
        .iter()
        .filter(|t| wanted.targets.iter().any(|w| w.contains(*t)))
        .copied()
        .collect();
    let pods = wanted
        .pods
        .iter()
        .filter(|p| {
            p.ips
                .iter()
                .any(|ip| targets.iter().any(|t| t.contains(ip)))
        })
        .cloned()
        .collect();
    CaptureSpec {
        targets,
        only_targets: true,
        pods,
        ..old.clone()
    }
}

fn has_filter(req: &StartRequest) -> bool {
    !req.spec.filter.trim().is_empty()
}

/// What the kernel selects for `spec`, and how much of each packet it
/// copies: the snaplen, or more when the filter may look further.
fn selection(spec: &CaptureSpec) -> Selection {
    Selection {
        targets: spec.targets.clone(),
        only_targets: spec.only_targets,
        ports: spec.ports.clone(),
        direction: spec.direction,
        copy_len: if spec.filter.trim().is_empty() {
            spec.snaplen
        } else {
            spec.snaplen.max(FILTER_LOOKAHEAD)
        },
    }
}

fn filter_error(e: crate::filter::FilterError) -> StartError {
    match e {
        // Other captures' filters held every compile slot: the node is
        // busy, the request may be fine (callers retry Unavailable).
        crate::filter::FilterError::Busy(_) => StartError::Unavailable(format!("filter: {e}")),
        e => StartError::Invalid(format!("filter: {e}")),
    }
}

/// An id in [`Inner::starting`], taken out when the start has ended, either
/// way: [`Reservation::release`] once the capture is in `captures`, or on
/// drop when the start failed. Either way with the end its capture met
/// while starting, so that none waits for a later start under the id.
struct Reservation<'a> {
    inner: &'a Inner,
    id: &'a str,
    released: bool,
}

impl Reservation<'_> {
    /// The end the capture met while it was starting, if any. `_captures`
    /// is the held lock under which `starting` and `early_ends` change.
    fn release(mut self, _captures: &MutexGuard<BTreeMap<String, Arc<Capture>>>) -> Option<Ended> {
        self.released = true;
        self.take()
    }

    fn take(&self) -> Option<Ended> {
        lock(&self.inner.starting).remove(self.id);
        let mut early = lock(&self.inner.early_ends);
        let at = early.iter().position(|e| e.id == self.id);
        at.map(|at| early.swap_remove(at))
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.released {
            let _captures = lock(&self.inner.captures);
            self.take();
        }
    }
}

/// The capture engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Loads the backend, attaches to every interface, recovers files left
    /// by an interrupted run, and starts the background work.
    pub async fn start(config: EngineConfig) -> Result<Self, EngineError> {
        let recovered = config.files.recover().map_err(EngineError::Recover)?;
        if !recovered.is_empty() {
            tracing::info!(files = recovered.len(), "recovered capture files");
        }
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let backend = load_backend(&config, ended_tx)?;
        tracing::info!(backend = backend.name(), "capture backend ready");
        let maintenance = config
            .files
            .spawn_maintenance()
            .map_err(EngineError::Maintenance)?;
        links::follow(backend.clone()).await?;
        let inner = Arc::new(Inner {
            config,
            runtime: tokio::runtime::Handle::current(),
            backend,
            captures: Mutex::new(BTreeMap::new()),
            starting: Mutex::new(BTreeSet::new()),
            early_ends: Mutex::default(),
            stopping: RwLock::new(false),
            maintenance,
            bytes_written: Arc::default(),
        });
        let engine = Self { inner };
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
        self.inner.backend.interfaces()
    }

    /// The process's log level changed (see `logging::follow_config_map`).
    pub fn log_level_changed(&self) {
        self.inner.backend.log_level_changed();
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            ring_lost: self.inner.backend.ring_lost(),
            interfaces: self.interfaces().len(),
            bytes_written: self.inner.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Starts a capture, or returns the one with the same id and request.
    /// Compiles the filter on the calling thread: async code uses
    /// [`Engine::start_capture_async`].
    pub fn start_capture(&self, req: StartRequest) -> Result<CaptureStatus, StartError> {
        let filter = if has_filter(&req) {
            Some(Filter::compile(&req.spec.filter).map_err(filter_error)?)
        } else {
            None
        };
        self.start_filtered(req, filter)
    }

    /// [`Engine::start_capture`] with the filter compiled on tokio's
    /// blocking pool, within a time limit, and the start itself there too:
    /// loading a filter's programs (the kernel's verifier) and attaching to
    /// every interface may take a while, which the API's other requests
    /// must not wait behind.
    pub async fn start_capture_async(
        &self,
        req: StartRequest,
    ) -> Result<CaptureStatus, StartError> {
        let filter = if has_filter(&req) {
            Some(
                Filter::compile_async(&req.spec.filter)
                    .await
                    .map_err(filter_error)?,
            )
        } else {
            None
        };
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.start_filtered(req, filter))
            .await
            .map_err(|e| StartError::Unavailable(format!("starting the capture: {e}")))?
    }

    fn start_filtered(
        &self,
        req: StartRequest,
        filter: Option<Filter>,
    ) -> Result<CaptureStatus, StartError> {
        let spec = &req.spec;
        let config = &self.inner.config;
        let stopping = self
            .inner
            .stopping
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let reserved = {
            let captures = lock(&self.inner.captures);
            if let Some(existing) = captures.get(&req.id) {
                if existing.name == req.name && *lock(&existing.spec) == req.spec {
                    // Not under the lock every request takes: a snapshot
                    // asks the backend for the capture's losses.
                    let existing = existing.clone();
                    drop(captures);
                    return Ok(self.snapshot(&existing));
                }
                return Err(StartError::Conflict(format!(
                    "capture {:?} exists with a different name or spec",
                    req.id
                )));
            }
            if *stopping {
                return Err(StartError::Unavailable("the agent is shutting down".into()));
            }
            // After the one that exists: a controller that restarts adopts
            // a capture started under limits lowered since.
            config
                .limits
                .check("", spec.duration.as_secs(), spec.max_packets)
                .map_err(|e| StartError::Invalid(e.to_string()))?;
            let mut starting = lock(&self.inner.starting);
            if starting.contains(&req.id) {
                return Err(StartError::Unavailable(format!(
                    "capture {:?} is being started by another request",
                    req.id
                )));
            }
            let running = starting.len()
                + captures
                    .values()
                    .filter(|c| lock(&c.life).state == CaptureState::Running)
                    .count();
            if running >= config.max_running {
                return Err(StartError::Full(format!(
                    "this node runs {running} captures, its limit (MAX_CONCURRENT_CAPTURES)"
                )));
            }
            starting.insert(req.id.clone());
            Reservation {
                inner: &self.inner,
                id: &req.id,
                released: false,
            }
        };
        let start_time = SystemTime::now();
        let counters = Arc::new(Counters::default());
        let destination = match (spec.format, spec.format.extension()) {
            (OutputFormat::Stream, _) => Destination::Live,
            (_, None) => Destination::stdout(),
            (_, Some(ext)) => {
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
            Destination::Stdout { .. } | Destination::Live => None,
        };
        let selection = selection(spec);
        let live_spec = Arc::new(Mutex::new(req.spec.clone()));
        let origin = Origin {
            node: self.inner.config.node_name.clone(),
            comment: describe_capture(&req.name, &self.inner.config.node_name, spec),
            owners: Some(Arc::new(PodInterfaces(live_spec.clone()))),
        };
        let (tap, tap_handle) = Tap::new();
        let sink = Sink::new(
            req.id.clone(),
            self.inner.bytes_written.clone(),
            filter,
            (!spec.keep_copies).then(Copies::default),
            spec.snaplen,
            spec.max_packets,
            Encoder::new(spec.format, spec.snaplen).with_origin(origin.clone()),
            destination,
            counters.clone(),
            tap,
        );
        let running = self.inner.backend.add(&req.id, &selection, sink)?;
        let capture = Arc::new(Capture {
            id: req.id.clone(),
            name: req.name.clone(),
            spec: live_spec,
            start_time,
            output_file,
            counters,
            tap: tap_handle,
            origin,
            snaplen: spec.snaplen,
            filter_path: running
                .filter_place()
                .map(|p| p.describe())
                .unwrap_or_default(),
            running: Mutex::new(Some(running)),
            life: Mutex::new(Life {
                state: CaptureState::Running,
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
        *lock(&capture.timer) = Some(self.inner.runtime.spawn(async move {
            tokio::time::sleep(duration).await;
            engine.end(&id, EndReason::Duration(duration.as_secs()));
        }));
        let mut captures = lock(&self.inner.captures);
        captures.insert(req.id.clone(), capture.clone());
        // Under the same lock, so that no start counts it twice.
        let early_end = reserved.release(&captures);
        prune_ended(&mut captures);
        drop(captures);
        drop(stopping);
        let status = match early_end {
            Some(end) => {
                self.record_end(&capture, end);
                capture.status.borrow().clone()
            }
            None => status,
        };
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

    /// Makes a running capture select `targets` (and only them) from now
    /// on, in place: its file, counters and other targets go on. `pods`
    /// are the target pods among them. Targets the backend refuses for lack
    /// of room (its maps, or the libpcap backend's limit) still take away
    /// what they leave out: the capture keeps only those of its old targets
    /// the new ones cover.
    pub fn set_targets(
        &self,
        id: &str,
        targets: Vec<IpNet>,
        pods: Vec<TargetPod>,
    ) -> Result<CaptureStatus, SetTargetsError> {
        let capture = self.capture(id).ok_or(SetTargetsError::NotFound)?;
        let refused = {
            // Under the handle's lock, as `end` is: a capture that ended is
            // not made to select again.
            let running = lock(&capture.running);
            let running = match running.as_ref() {
                Some(r) if !lock(&capture.life).state.is_final() => r,
                _ => return Err(SetTargetsError::Ended),
            };
            let old = lock(&capture.spec).clone();
            let wanted = CaptureSpec {
                targets,
                only_targets: true,
                pods,
                ..old.clone()
            };
            match running.retarget(&selection(&wanted)) {
                Ok(()) => {
                    tracing::info!(
                        capture = id,
                        targets = wanted.targets.len(),
                        "capture targets set"
                    );
                    *lock(&capture.spec) = wanted;
                    None
                }
                Err(BackendError::Ended) => return Err(SetTargetsError::Ended),
                // Refused before the backend changed anything: what the
                // capture keeps is fewer than it holds, so it fits.
                Err(e @ (BackendError::MapsFull(_) | BackendError::TooManyTargets { .. })) => {
                    let kept = kept_of(&old, &wanted);
                    if kept != old {
                        match running.retarget(&selection(&kept)) {
                            Ok(()) => {
                                tracing::info!(
                                    capture = id,
                                    targets = kept.targets.len(),
                                    "capture targets narrowed to those still wanted: {e}"
                                );
                                *lock(&capture.spec) = kept;
                            }
                            Err(again) => tracing::error!(
                                capture = id,
                                "the targets the change leaves out could not be taken out: {again}"
                            ),
                        }
                    }
                    Some(e)
                }
                Err(e) => Some(e),
            }
        };
        let status = self.snapshot(&capture);
        // Never over an end recorded meanwhile, and after a refusal only
        // if the capture narrowed.
        capture.status.send_if_modified(|current| {
            let publish =
                !current.state.is_final() && (refused.is_none() || current.spec != status.spec);
            if publish {
                *current = status.clone();
            }
            publish
        });
        match refused {
            None => Ok(status),
            Some(e) => Err(SetTargetsError::Refused(e.into())),
        }
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
        if lock(&capture.life).state.is_final() {
            return;
        }
        if let Some(running) = lock(&capture.running).as_ref() {
            running.end(reason);
        }
    }

    pub fn get(&self, id: &str) -> Option<CaptureStatus> {
        self.capture(id).map(|c| self.snapshot(&c))
    }

    /// The captures whose id starts with `id_prefix`, by id.
    pub fn list(&self, id_prefix: &str) -> Vec<CaptureStatus> {
        let captures: Vec<Arc<Capture>> = lock(&self.inner.captures)
            .range(id_prefix.to_owned()..)
            .take_while(|(id, _)| id.starts_with(id_prefix))
            .map(|(_, c)| c.clone())
            .collect();
        captures.iter().map(|c| self.snapshot(c)).collect()
    }

    /// Whether a capture named `name` runs or ran here (and is still kept).
    pub fn knows_name(&self, name: &str) -> bool {
        lock(&self.inner.captures).values().any(|c| c.name == name)
    }

    /// The packets the running capture `id` records from now on (or from
    /// `after` its packet of that number, as far as they are kept: see
    /// [`sink::REPLAY_FOR`]), and how to describe them; `None` when there
    /// is no such capture, `Some(Err)` when it has ended (with its state)
    /// or has all the readers it takes.
    pub fn stream(
        &self,
        id: &str,
        after: Option<u64>,
    ) -> Option<Result<LiveStream, (NoReader, CaptureState)>> {
        let capture = self.capture(id)?;
        let state = lock(&capture.life).state;
        let subscribed = if state.is_final() {
            Err(NoReader::Ended)
        } else {
            capture.tap.subscribe(after)
        };
        Some(
            subscribed
                .map(|packets| LiveStream {
                    packets,
                    origin: capture.origin.clone(),
                    snaplen: capture.snaplen,
                })
                .map_err(|no| (no, state)),
        )
    }

    /// The capture's status now and whenever it changes.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<CaptureStatus>> {
        self.capture(id).map(|c| c.status.subscribe())
    }

    /// Refuses new captures, ends every running one (their files are
    /// finished), waiting at most `within` for them, and then stops the
    /// backend, detaching the programs, however the captures fared, and
    /// the replacing of files by their compressed copies.
    pub async fn shutdown(&self, within: Duration) {
        // Waits for the starts under way, which are short and never wait
        // on the runtime.
        *self
            .inner
            .stopping
            .write()
            .unwrap_or_else(PoisonError::into_inner) = true;
        let running: Vec<String> = self
            .list("")
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
        if tokio::time::timeout(within, futures::future::join_all(waits))
            .await
            .is_err()
        {
            tracing::warn!("captures did not finish in time");
        }
        self.inner.backend.shutdown();
        self.inner.maintenance.stop();
    }

    fn capture(&self, id: &str) -> Option<Arc<Capture>> {
        lock(&self.inner.captures).get(id).cloned()
    }

    fn snapshot(&self, c: &Capture) -> CaptureStatus {
        // The backend is asked before `life` is locked: starts lock `life`
        // while they hold `captures`, and must not wait on the backend. An
        // end recorded meanwhile has frozen the losses, and those win.
        let lost = self.lost_now(c);
        let (filtered_in_kernel, filtered) = self.filtered_now(c);
        let life = lock(&c.life);
        let dropped = life.dropped.unwrap_or(lost);
        let (output_file, file_size) = match (&life.file, &c.output_file) {
            (Some((path, size)), _) => {
                let (path, size) = self.inner.config.files.current(path, *size);
                (path.display().to_string(), size)
            }
            (None, Some(path)) => (
                path.display().to_string(),
                c.counters.bytes.load(Ordering::Relaxed),
            ),
            (None, None) => {
                let format = lock(&c.spec).format;
                (format.no_file().unwrap_or_default().to_owned(), 0)
            }
        };
        CaptureStatus {
            id: c.id.clone(),
            name: c.name.clone(),
            spec: lock(&c.spec).clone(),
            state: life.state,
            packets: c.counters.packets.load(Ordering::Relaxed),
            dropped,
            filtered,
            filtered_in_kernel,
            filter_path: c.filter_path.clone(),
            output_file,
            file_size,
            message: life.message.clone(),
            start_time: c.start_time,
            end_time: life.end_time,
            node_name: self.inner.config.node_name.clone(),
        }
    }

    /// Packets the capture's filter rejected so far in the kernel (the
    /// backend's count until the capture ends, when
    /// [`Engine::follow_ended`] keeps it), and in all.
    fn filtered_now(&self, c: &Capture) -> (u64, u64) {
        let running = lock(&c.running);
        let kernel = match running.as_ref() {
            Some(r) => r.filtered_in_kernel(),
            None => c.counters.filtered_in_kernel.load(Ordering::Relaxed),
        };
        (kernel, kernel + c.counters.filtered.load(Ordering::Relaxed))
    }

    /// Packets the capture lost so far: in the kernel and in user space.
    fn lost_now(&self, c: &Capture) -> u64 {
        let kernel = lock(&c.running).as_ref().map_or(0, |r| r.lost());
        kernel + c.counters.dropped.load(Ordering::Relaxed)
    }

    async fn follow_ended(self, mut ended: mpsc::UnboundedReceiver<Ended>) {
        while let Some(e) = ended.recv().await {
            let capture = {
                let captures = lock(&self.inner.captures);
                match captures.get(&e.id) {
                    Some(c) => c.clone(),
                    None => {
                        if lock(&self.inner.starting).contains(&e.id) {
                            lock(&self.inner.early_ends).push(e);
                        }
                        continue;
                    }
                }
            };
            self.record_end(&capture, e);
        }
    }

    /// Records how `capture` ended and gives back what it held.
    fn record_end(&self, capture: &Capture, e: Ended) {
        if let Some(timer) = lock(&capture.timer).take() {
            timer.abort();
        }
        let dropped = self.lost_now(capture);
        let (state, message) = match &e.finished.reason {
            EndReason::MaxPackets(_) | EndReason::Duration(_) | EndReason::FileSize(_) => {
                (CaptureState::Completed, e.finished.reason.message())
            }
            EndReason::Stopped | EndReason::Shutdown => {
                (CaptureState::Stopped, e.finished.reason.message())
            }
            EndReason::Error(msg) => (CaptureState::Failed, msg.clone()),
        };
        {
            let mut life = lock(&capture.life);
            life.state = state;
            life.message = message;
            life.end_time = Some(SystemTime::now());
            life.dropped = Some(dropped);
            life.file = e.finished.file;
        }
        // The losses are frozen above; now the backend takes back what
        // the capture held (for eBPF, its slot), outside the lock.
        let running = {
            let mut running = lock(&capture.running);
            if let Some(r) = running.as_ref() {
                let kernel = r.filtered_in_kernel();
                capture
                    .counters
                    .filtered_in_kernel
                    .store(kernel, Ordering::Relaxed);
            }
            running.take()
        };
        drop(running);
        let status = self.snapshot(capture);
        tracing::info!(
            capture = status.id,
            state = %status.state,
            packets = status.packets,
            dropped = status.dropped,
            file = status.output_file,
            reason = status.message,
            "capture ended"
        );
        capture.status.send_replace(status);
        self.inner.maintenance.poke();
    }

    async fn publish_progress(self) {
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        loop {
            tick.tick().await;
            let running: Vec<Arc<Capture>> = lock(&self.inner.captures)
                .values()
                .filter(|c| !lock(&c.life).state.is_final())
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
}

fn load_backend(
    config: &EngineConfig,
    ended: backend::EndedTx,
) -> Result<Arc<dyn Backend>, BackendError> {
    let ring_bytes = if config.ring_bytes == 0 {
        DEFAULT_RING_BYTES
    } else {
        config.ring_bytes
    };
    let ebpf = || -> Result<Arc<dyn Backend>, BackendError> {
        Ok(Arc::new(ebpf::EbpfBackend::load(
            ring_bytes,
            config.tc_attach,
            config.kernel_filters,
            config.own_api,
            ended.clone(),
        )?))
    };
    let pcap =
        || -> Arc<dyn Backend> { Arc::new(pcap::PcapBackend::new(config.own_api, ended.clone())) };
    match config.backend {
        BackendChoice::Ebpf => ebpf(),
        BackendChoice::Pcap => Ok(pcap()),
        BackendChoice::Auto => ebpf().or_else(|e| {
            // The whole chain: the cause (a missing capability, a verifier
            // refusal) is at its end.
            tracing::warn!(
                error = error_chain(&e),
                "the eBPF programs cannot be loaded; capturing with libpcap instead"
            );
            Ok(pcap())
        }),
    }
}

/// An error and its causes on one line, each cause once: errors here often
/// repeat their source's words in their own message.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

fn placeholder_status(req: &StartRequest, start_time: SystemTime) -> CaptureStatus {
    CaptureStatus {
        id: req.id.clone(),
        name: req.name.clone(),
        spec: req.spec.clone(),
        state: CaptureState::Starting,
        packets: 0,
        dropped: 0,
        filtered: 0,
        filtered_in_kernel: 0,
        filter_path: String::new(),
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
            let life = lock(&c.life);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: &[&str], pods: &[(&str, &[&str])]) -> CaptureSpec {
        CaptureSpec {
            targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
            only_targets: false,
            pods: pods
                .iter()
                .map(|(name, ips)| TargetPod {
                    name: (*name).to_owned(),
                    ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
                })
                .collect(),
            ports: vec![80],
            duration: Duration::from_secs(60),
            max_packets: 10,
            format: OutputFormat::Pcapng,
            filter: "tcp".into(),
            snaplen: 96,
            direction: TargetDirection::Both,
            keep_copies: false,
        }
    }

    #[test]
    fn a_refused_change_keeps_the_old_targets_it_covers_and_their_new_pods() {
        let old = spec(
            &["10.0.0.1/32", "10.0.0.9/32", "fd00::1/128"],
            &[
                ("shop/a", &["10.0.0.1", "fd00::1"]),
                ("shop/b", &["10.0.0.9"]),
            ],
        );
        let wanted = spec(
            &["10.0.0.0/29", "fd00::2/128"],
            &[("shop/a2", &["10.0.0.1"]), ("shop/c", &["fd00::2"])],
        );
        let kept = kept_of(&old, &wanted);
        assert_eq!(kept.targets, ["10.0.0.1/32".parse::<IpNet>().unwrap()]);
        assert!(kept.only_targets, "an empty list would select everything");
        let names: Vec<&str> = kept.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["shop/a2"], "the pods as the change names them");
        assert_eq!((kept.ports, kept.filter), (old.ports, old.filter));

        // A capture of every address keeps none.
        let kept = kept_of(&spec(&[], &[]), &wanted);
        assert!(kept.targets.is_empty() && kept.only_targets);
    }
}
