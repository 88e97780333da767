//! Stand-ins for agents: a load generator for the controller, not an
//! agent. One process serves the agent's gRPC API on many loopback
//! addresses, one per simulated node, and answers as an agent would: a
//! capture runs for its duration, then completes. It captures nothing. It
//! remembers when it created each node's capture, so that the benchmark can
//! tell how fast a capture reached every node and whether any node's
//! capture was started twice.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt as _};
use packet_capture_proto::v1 as pb;
use pb::agent_server::{Agent, AgentServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The address of stand-in `i` (127.1.0.0/16, on loopback).
pub fn address(i: usize) -> IpAddr {
    IpAddr::from([127, 1, (i / 256) as u8, (i % 256) as u8])
}

/// What the stand-ins have been asked, by node address.
#[derive(Default)]
struct Books {
    captures: HashMap<(IpAddr, String), watch::Sender<pb::Capture>>,
    /// When each node's captures were created (a second entry for the same
    /// id would be a capture started twice).
    created: HashMap<(IpAddr, String), Vec<SystemTime>>,
}

#[derive(Clone, Default)]
pub struct StandIns(Arc<Mutex<Books>>);

impl StandIns {
    fn books(&self) -> MutexGuard<'_, Books> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `count` stand-ins on `port`, until the runtime ends.
    pub async fn serve(&self, count: usize, port: u16) -> anyhow::Result<()> {
        let mut incoming = Vec::new();
        for i in 0..count {
            let listener = TcpListener::bind(SocketAddr::new(address(i), port)).await?;
            incoming.push(Box::pin(futures::stream::unfold(
                listener,
                |l| async move { Some((l.accept().await.map(|(s, _)| s), l)) },
            )));
        }
        let incoming = futures::stream::select_all(incoming);
        let service = AgentServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        Ok(())
    }

    /// Node `at`'s capture `id`.
    fn capture(&self, at: IpAddr, id: String) -> Result<watch::Sender<pb::Capture>, Status> {
        self.books()
            .captures
            .get(&(at, id.clone()))
            .cloned()
            .ok_or_else(|| Status::not_found(id))
    }

    /// When each node's capture `id` was created, first creation first.
    pub fn creations(&self, id: &str) -> Vec<Vec<SystemTime>> {
        let books = self.books();
        books
            .created
            .iter()
            .filter(|((_, i), _)| i == id)
            .map(|(_, times)| times.clone())
            .collect()
    }
}

/// The node a call is for: the address it came in on.
fn node<T>(req: &Request<T>) -> Result<IpAddr, Status> {
    req.local_addr()
        .map(|a| a.ip())
        .ok_or_else(|| Status::internal("no local address"))
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for StandIns {
    type WatchCaptureStream = Streamed<pb::Capture>;
    type DownloadFileStream = Streamed<pb::FileChunk>;
    type StreamPacketsStream = Streamed<pb::PacketBatch>;

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            backend: "stand-in".into(),
            node_name: node(&req)?.to_string(),
            ..Default::default()
        }))
    }

    async fn start_capture(
        &self,
        req: Request<pb::StartCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let at = node(&req)?;
        let req = req.into_inner();
        let key = (at, req.id.clone());
        let mut books = self.books();
        if let Some(existing) = books.captures.get(&key) {
            return Ok(Response::new(existing.borrow().clone()));
        }
        let duration = req.spec.as_ref().map_or(1, |s| s.duration_seconds);
        let capture = pb::Capture {
            id: req.id.clone(),
            name: req.name.clone(),
            spec: req.spec,
            state: pb::CaptureState::Running.into(),
            output_file: format!("/var/lib/packet-captures/{}.pcap", req.name),
            start_time: Some(now()),
            node_name: at.to_string(),
            ..Default::default()
        };
        let (tx, _) = watch::channel(capture.clone());
        let ends = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(duration.into())).await;
            ends.send_modify(|c| {
                if c.state == pb::CaptureState::Running as i32 {
                    c.state = pb::CaptureState::Completed.into();
                    c.message = format!("duration of {duration}s elapsed");
                    c.end_time = Some(now());
                }
            });
        });
        books.captures.insert(key.clone(), tx);
        books
            .created
            .entry(key)
            .or_default()
            .push(SystemTime::now());
        Ok(Response::new(capture))
    }

    async fn set_targets(
        &self,
        req: Request<pb::SetTargetsRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let at = node(&req)?;
        let req = req.into_inner();
        let tx = self.capture(at, req.id)?;
        tx.send_modify(|c| {
            if let Some(spec) = c.spec.as_mut() {
                spec.target_ips = req.target_ips;
                spec.pods = req.pods;
                spec.only_targets = true;
            }
        });
        Ok(Response::new(tx.borrow().clone()))
    }

    async fn stop_capture(
        &self,
        req: Request<pb::StopCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let tx = self.capture(node(&req)?, req.into_inner().id)?;
        tx.send_modify(|c| {
            if c.state == pb::CaptureState::Running as i32 {
                c.state = pb::CaptureState::Stopped.into();
                c.message = packet_capture_common::crd::STOPPED_BY_REQUEST.into();
                c.end_time = Some(now());
            }
        });
        Ok(Response::new(tx.borrow().clone()))
    }

    async fn get_capture(
        &self,
        req: Request<pb::GetCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let tx = self.capture(node(&req)?, req.into_inner().id)?;
        Ok(Response::new(tx.borrow().clone()))
    }

    async fn list_captures(
        &self,
        req: Request<pb::ListCapturesRequest>,
    ) -> Result<Response<pb::ListCapturesResponse>, Status> {
        let at = node(&req)?;
        let prefix = &req.get_ref().id_prefix;
        let captures = self
            .books()
            .captures
            .iter()
            .filter(|((ip, id), _)| *ip == at && id.starts_with(prefix.as_str()))
            .map(|(_, tx)| tx.borrow().clone())
            .collect();
        Ok(Response::new(pb::ListCapturesResponse { captures }))
    }

    async fn watch_capture(
        &self,
        req: Request<pb::WatchCaptureRequest>,
    ) -> Result<Response<Self::WatchCaptureStream>, Status> {
        let rx = self.capture(node(&req)?, req.into_inner().id)?.subscribe();
        // The capture now, then each change; the final state ends it.
        let updates = futures::stream::unfold(Some((rx, true)), |state| async move {
            let (mut rx, first) = state?;
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let c = rx.borrow_and_update().clone();
            let running = c.state == pb::CaptureState::Running as i32;
            Some((Ok(c), running.then_some((rx, false))))
        });
        Ok(Response::new(updates.boxed()))
    }

    async fn list_files(
        &self,
        _: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        Ok(Response::new(pb::ListFilesResponse::default()))
    }

    async fn download_file(
        &self,
        req: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        Err(Status::not_found(req.into_inner().name))
    }

    /// Stand-ins capture nothing.
    async fn stream_packets(
        &self,
        req: Request<pb::StreamPacketsRequest>,
    ) -> Result<Response<Self::StreamPacketsStream>, Status> {
        Err(Status::not_found(req.into_inner().id))
    }
}
