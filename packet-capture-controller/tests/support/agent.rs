//! An in-process `packetcapture.v1.Agent` with the documented semantics
//! (idempotent StartCapture, WatchCapture ending after the final state),
//! whose captures the test ends, and which can be made to fail.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use packet_capture_proto::v1::agent_server::{Agent, AgentServer};
use packet_capture_proto::v1::{
    Capture, CaptureState, DownloadFileRequest, FileChunk, GetCaptureRequest, HealthRequest,
    HealthResponse, ListCapturesRequest, ListCapturesResponse, ListFilesRequest, ListFilesResponse,
    SetTargetsRequest, StartCaptureRequest, StopCaptureRequest, WatchCaptureRequest,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    captures: BTreeMap<String, (StartCaptureRequest, watch::Sender<Capture>)>,
    calls: Vec<String>,
    fail_starts: u32,
    /// What the failing starts answer.
    full: bool,
    down: bool,
}

/// A fake agent on one node.
#[derive(Clone)]
pub struct FakeAgent {
    node: String,
    state: Arc<Mutex<State>>,
    /// Flips to true when the agent "dies": open watches fail.
    dead: watch::Sender<bool>,
}

/// Whether the capture has ended (a state this build does not know has not).
fn ended(c: &Capture) -> bool {
    c.capture_state()
        .is_ok_and(packet_capture_common::crd::CaptureState::is_final)
}

/// Ends a capture `stopped`, unless it has ended.
fn stop(tx: &watch::Sender<Capture>, message: &str) {
    tx.send_if_modified(|c| {
        if ended(c) {
            return false;
        }
        c.state = CaptureState::Stopped as i32;
        c.message = message.into();
        c.end_time = Some(now());
        true
    });
}

fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

impl FakeAgent {
    fn new(node: &str) -> Self {
        Self {
            node: node.into(),
            state: Arc::default(),
            dead: watch::channel(false).0,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The calls received, as `Method id`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The ids of the captures it holds, and their requests.
    pub fn captures(&self) -> BTreeMap<String, (StartCaptureRequest, Capture)> {
        self.lock()
            .captures
            .iter()
            .map(|(id, (req, tx))| (id.clone(), (req.clone(), tx.borrow().clone())))
            .collect()
    }

    /// The only capture, or a panic.
    pub fn only_capture(&self) -> (StartCaptureRequest, Capture) {
        let caps = self.captures();
        assert_eq!(
            caps.len(),
            1,
            "captures on {}: {:?}",
            self.node,
            caps.keys()
        );
        caps.into_values().next().unwrap()
    }

    /// The next `n` StartCapture calls fail with UNAVAILABLE.
    pub fn fail_starts(&self, n: u32) {
        self.lock().fail_starts = n;
    }

    /// Every StartCapture from now on fails as an agent that runs as many
    /// captures as it may does (RESOURCE_EXHAUSTED).
    pub fn be_full(&self) {
        let mut state = self.lock();
        state.fail_starts = u32::MAX;
        state.full = true;
    }

    /// Ends a capture as its duration would, with `packets` written.
    pub fn complete(&self, id: &str, packets: u64) {
        let state = self.lock();
        let (req, tx) = state.captures.get(id).expect("no such capture");
        let stdout = req
            .spec
            .as_ref()
            .is_some_and(|s| s.format() == Ok(packet_capture_common::crd::OutputFormat::Stdout));
        let ext = if stdout { "" } else { ".pcap" };
        let file = format!("/var/lib/packet-captures/{}-20240101-000000{ext}", req.name);
        tx.send_modify(|c| {
            c.state = CaptureState::Completed as i32;
            c.packets = packets;
            c.file_size = if ext.is_empty() {
                0
            } else {
                24 + packets * 100
            };
            c.output_file = file;
            c.message = "duration reached".into();
            c.end_time = Some(now());
        });
    }

    /// Reports a capture state value no build knows.
    pub fn report_state(&self, id: &str, state: i32) {
        let agent = self.lock();
        let (_, tx) = agent.captures.get(id).expect("no such capture");
        tx.send_modify(|c| c.state = state);
    }

    /// Shuts down as on SIGTERM: every unfinished capture ends `stopped`
    /// (which its watches report before they end), then the agent stops
    /// answering.
    pub fn shut_down(&self) {
        let mut state = self.lock();
        for (_, tx) in state.captures.values() {
            stop(tx, "stopped: the agent is shutting down");
        }
        state.down = true;
    }

    /// The agent stops answering: open watches fail, calls are UNAVAILABLE.
    pub fn kill(&self) {
        self.lock().down = true;
        self.dead.send_replace(true);
    }

    fn check_up(&self, call: String) -> Result<(), Status> {
        let mut state = self.lock();
        state.calls.push(call);
        if state.down {
            return Err(Status::unavailable("connection refused"));
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Capture, Status> {
        self.lock()
            .captures
            .get(id)
            .map(|(_, tx)| tx.borrow().clone())
            .ok_or_else(|| Status::not_found(format!("no capture {id}")))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for FakeAgent {
    type WatchCaptureStream = BoxStream<Capture>;
    type DownloadFileStream = BoxStream<FileChunk>;
    type StreamPacketsStream = BoxStream<packet_capture_proto::v1::PacketBatch>;

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            backend: "ebpf".into(),
            version: "test".into(),
            interfaces: vec!["eth0".into()],
            node_name: self.node.clone(),
        }))
    }

    async fn start_capture(
        &self,
        req: Request<StartCaptureRequest>,
    ) -> Result<Response<Capture>, Status> {
        let req = req.into_inner();
        self.check_up(format!("StartCapture {}", req.id))?;
        let mut state = self.lock();
        if state.fail_starts > 0 {
            state.fail_starts -= 1;
            return Err(if state.full {
                Status::resource_exhausted(
                    "this node runs 16 captures, its limit (MAX_CONCURRENT_CAPTURES)",
                )
            } else {
                Status::unavailable("not ready yet")
            });
        }
        if let Some((existing, tx)) = state.captures.get(&req.id) {
            if existing.spec != req.spec {
                return Err(Status::already_exists(format!(
                    "capture {} has another spec",
                    req.id
                )));
            }
            return Ok(Response::new(tx.borrow().clone()));
        }
        let capture = Capture {
            id: req.id.clone(),
            name: req.name.clone(),
            spec: req.spec.clone(),
            state: CaptureState::Running as i32,
            start_time: Some(now()),
            node_name: self.node.clone(),
            ..Default::default()
        };
        let (tx, _) = watch::channel(capture.clone());
        state.captures.insert(req.id.clone(), (req, tx));
        Ok(Response::new(capture))
    }

    async fn stop_capture(
        &self,
        req: Request<StopCaptureRequest>,
    ) -> Result<Response<Capture>, Status> {
        let id = req.into_inner().id;
        self.check_up(format!("StopCapture {id}"))?;
        let state = self.lock();
        let (_, tx) = state
            .captures
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no capture {id}")))?;
        stop(tx, "stopped by request");
        Ok(Response::new(tx.borrow().clone()))
    }

    async fn set_targets(
        &self,
        req: Request<SetTargetsRequest>,
    ) -> Result<Response<Capture>, Status> {
        let req = req.into_inner();
        self.check_up(format!("SetTargets {} {:?}", req.id, req.target_ips))?;
        let state = self.lock();
        let (_, tx) = state
            .captures
            .get(&req.id)
            .ok_or_else(|| Status::not_found(format!("no capture {}", req.id)))?;
        if ended(&tx.borrow()) {
            return Err(Status::failed_precondition("the capture has ended"));
        }
        tx.send_modify(|c| {
            if let Some(spec) = c.spec.as_mut() {
                spec.target_ips = req.target_ips.clone();
                spec.pods = req.pods.clone();
                spec.only_targets = true;
            }
        });
        Ok(Response::new(tx.borrow().clone()))
    }

    async fn get_capture(
        &self,
        req: Request<GetCaptureRequest>,
    ) -> Result<Response<Capture>, Status> {
        let id = req.into_inner().id;
        self.check_up(format!("GetCapture {id}"))?;
        self.get(&id).map(Response::new)
    }

    async fn list_captures(
        &self,
        req: Request<ListCapturesRequest>,
    ) -> Result<Response<ListCapturesResponse>, Status> {
        self.check_up("ListCaptures".into())?;
        let prefix = req.into_inner().id_prefix;
        Ok(Response::new(ListCapturesResponse {
            captures: self
                .captures()
                .into_values()
                .map(|(_, c)| c)
                .filter(|c| c.id.starts_with(&prefix))
                .collect(),
        }))
    }

    async fn watch_capture(
        &self,
        req: Request<WatchCaptureRequest>,
    ) -> Result<Response<Self::WatchCaptureStream>, Status> {
        let id = req.into_inner().id;
        self.check_up(format!("WatchCapture {id}"))?;
        let rx = {
            let state = self.lock();
            let (_, tx) = state
                .captures
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("no capture {id}")))?;
            tx.subscribe()
        };
        let dead = self.dead.subscribe();
        // The capture now, then on every change; ends after the final state,
        // or fails when the agent dies.
        let stream = futures::stream::unfold(
            (rx, dead, true, false),
            |(mut rx, mut dead, first, done)| async move {
                if done {
                    return None;
                }
                if !first {
                    let died = tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            false
                        }
                        _ = dead.wait_for(|d| *d) => true,
                    };
                    if died {
                        return Some((
                            Err(Status::unavailable("agent died")),
                            (rx, dead, false, true),
                        ));
                    }
                }
                let c = rx.borrow_and_update().clone();
                let fin = ended(&c);
                Some((Ok(c), (rx, dead, false, fin)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_files(
        &self,
        _: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        Ok(Response::new(ListFilesResponse::default()))
    }

    async fn download_file(
        &self,
        req: Request<DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        Err(Status::not_found(format!(
            "no file {}",
            req.into_inner().name
        )))
    }

    /// The fake captures nothing.
    async fn stream_packets(
        &self,
        req: Request<packet_capture_proto::v1::StreamPacketsRequest>,
    ) -> Result<Response<Self::StreamPacketsStream>, Status> {
        Err(Status::not_found(req.into_inner().id))
    }
}

/// Serves one fake agent per `(node, ip)`, all on one port.
pub async fn serve_all(nodes: &[(&str, &str)]) -> (u16, Vec<FakeAgent>) {
    'port: loop {
        // Any free port on the first address, then the same on the others.
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        drop(first);
        let mut listeners = Vec::new();
        for (_, ip) in nodes {
            match TcpListener::bind((*ip, port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => continue 'port,
            }
        }
        let mut agents = Vec::new();
        for ((node, _), listener) in nodes.iter().zip(listeners) {
            let agent = FakeAgent::new(node);
            let server = Server::builder()
                .add_service(AgentServer::new(agent.clone()))
                .serve_with_incoming(TcpIncoming::from(listener));
            tokio::spawn(server);
            agents.push(agent);
        }
        return (port, agents);
    }
}
