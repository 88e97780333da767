//! `packetcapture.v1.Agent` over gRPC, with the REST shim's semantics.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use packet_capture_proto::v1 as pb;
use pb::agent_server::{Agent, AgentServer};
use tonic::{Request, Response, Status};

use super::convert::{Unchecked, UncheckedTargets};
use super::{Api, ApiError, Caller, Conditions, MAX_REQUEST_BYTES};

pub fn server(api: Api) -> AgentServer<AgentService> {
    AgentServer::new(AgentService { api }).max_decoding_message_size(MAX_REQUEST_BYTES)
}

pub struct AgentService {
    api: Api,
}

/// The caller the gate put in the request's extensions.
fn caller_of<T>(req: &Request<T>) -> Result<Caller, ApiError> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("authorization: no caller".into()))
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let engine = &self.api.engine;
        Ok(Response::new(pb::HealthResponse {
            backend: engine.backend().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interfaces: engine.interfaces(),
            node_name: engine.node_name().to_owned(),
        }))
    }

    async fn start_capture(
        &self,
        req: Request<pb::StartCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let caller = caller_of(&req)?;
        let req = Unchecked::try_from(req.into_inner()).map_err(ApiError::from)?;
        let (status, _) = self.api.start(&caller, req).await?;
        Ok(Response::new(status.into()))
    }

    async fn stop_capture(
        &self,
        req: Request<pb::StopCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let caller = caller_of(&req)?;
        let status = self.api.stop(&caller, &req.into_inner().id).await?;
        Ok(Response::new(status.into()))
    }

    async fn set_targets(
        &self,
        req: Request<pb::SetTargetsRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let caller = caller_of(&req)?;
        let req = req.into_inner();
        let targets = UncheckedTargets {
            target_ips: req.target_ips,
            pods: req.pods.into_iter().map(Into::into).collect(),
        };
        let status = self.api.set_targets(&caller, &req.id, targets).await?;
        Ok(Response::new(status.into()))
    }

    async fn get_capture(
        &self,
        req: Request<pb::GetCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let caller = caller_of(&req)?;
        let status = self.api.get(&caller, &req.into_inner().id).await?;
        Ok(Response::new(status.into()))
    }

    async fn list_captures(
        &self,
        req: Request<pb::ListCapturesRequest>,
    ) -> Result<Response<pb::ListCapturesResponse>, Status> {
        let caller = caller_of(&req)?;
        let captures = self.api.list(&caller, &req.get_ref().id_prefix).await?;
        Ok(Response::new(pb::ListCapturesResponse {
            captures: captures.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchCaptureStream = Streamed<pb::Capture>;

    async fn watch_capture(
        &self,
        req: Request<pb::WatchCaptureRequest>,
    ) -> Result<Response<Self::WatchCaptureStream>, Status> {
        let caller = caller_of(&req)?;
        let rx = self.api.watch(&caller, &req.into_inner().id).await?;
        // The status now, then each change; the final state ends the stream.
        let updates = futures::stream::unfold(Some((rx, true)), |state| async move {
            let (mut rx, first) = state?;
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let status = rx.borrow_and_update().clone();
            let next = (!status.state.is_final()).then_some((rx, false));
            Some((Ok(pb::Capture::from(status)), next))
        });
        Ok(Response::new(Box::pin(updates)))
    }

    async fn list_files(
        &self,
        req: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let files = self.api.files(&caller_of(&req)?).await?;
        Ok(Response::new(pb::ListFilesResponse {
            files: files.into_iter().map(Into::into).collect(),
        }))
    }

    type DownloadFileStream = Streamed<pb::FileChunk>;

    async fn download_file(
        &self,
        req: Request<pb::DownloadFileRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let caller = caller_of(&req)?;
        let pb::DownloadFileRequest {
            name,
            range,
            if_range,
        } = req.into_inner();
        fn given(v: &str) -> Option<&str> {
            (!v.is_empty()).then_some(v)
        }
        let asked = Conditions {
            range: given(&range),
            if_range: given(&if_range),
            ..Default::default()
        };
        let (chunks, sent) = self.api.download(&caller, &name, asked).await?;
        let chunks = chunks.map(move |c| match c {
            Ok(data) => Ok(pb::FileChunk {
                data: data.to_vec(),
            }),
            Err(e) => Err(Status::internal(format!("reading {name:?}: {e}"))),
        });
        let mut response = Response::new(Box::pin(chunks) as Self::DownloadFileStream);
        let metadata = response.metadata_mut();
        metadata.insert("file-size", sent.size.into());
        for (name, value) in sent.validators() {
            if let Ok(value) = value.parse() {
                metadata.insert(name, value);
            }
        }
        if let Some(range) = sent.content_range().and_then(|r| r.parse().ok()) {
            metadata.insert("content-range", range);
        }
        Ok(response)
    }

    type StreamPacketsStream = Streamed<pb::PacketBatch>;

    async fn stream_packets(
        &self,
        req: Request<pb::StreamPacketsRequest>,
    ) -> Result<Response<Self::StreamPacketsStream>, Status> {
        let caller = caller_of(&req)?;
        let req = req.into_inner();
        let live = self.api.stream(&caller, &req.id, req.after).await?;
        let batches = self
            .api
            .batches(live.packets)
            .map(|batch| Ok(pb::PacketBatch::from(batch)));
        Ok(Response::new(Box::pin(batches)))
    }
}
