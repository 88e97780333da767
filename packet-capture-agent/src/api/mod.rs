//! The agent API: gRPC (`packetcapture.v1.Agent`, the standard health
//! service, server reflection) and the REST shim, on one listener.
//!
//! Both transports go through [`Api`]: one conversion ([`convert`]), one
//! validation, one set of errors ([`ApiError`]). Authentication and request
//! counting sit in front of every route ([`gate`]).

pub mod auth;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod rest;
mod serve;

use std::collections::HashMap;
use std::io::{self, Seek as _};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use http::header;
use packet_capture_common::validators::{Validators, http_date};
use tokio::io::AsyncReadExt as _;

use crate::capture::{
    Batch, CaptureStatus, Engine, LiveStream, NoReader, Reader, SetTargetsError, TAP_READERS,
};
use crate::files::{self, FileEntry};
use auth::{Access, Audience, Permission};
pub use auth::{Authorizer, Caller};
use convert::{Unchecked, UncheckedTargets};
pub use error::ApiError;
use metrics::Metrics;
pub use serve::{
    CLOSE_GRACE, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS,
    MAX_LOCAL_CONNECTIONS, serve,
};

/// Bytes per chunk of a download, REST and gRPC.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Largest request body (REST) or Agent-service message (gRPC): a node's
/// share of a capture, `MAX_NODE_TARGETS` addresses and the names of their
/// pods, takes a few hundred KiB at most.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest message of the gRPC calls open to everyone (health, reflection,
/// the Agent service's Health).
pub const MAX_OPEN_MESSAGE_BYTES: usize = 64 * 1024;

/// What every request handler shares. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub engine: Engine,
    /// `None`: no authentication (`--insecure-no-auth`).
    pub auth: Option<Arc<Authorizer>>,
    pub metrics: Arc<Metrics>,
}

impl Api {
    pub fn new(engine: Engine, auth: Option<Authorizer>) -> Self {
        Self {
            metrics: Arc::new(Metrics::new(engine.clone())),
            engine,
            auth: auth.map(Arc::new),
        }
    }

    /// Whether `caller` has `permission`; everyone has every permission
    /// when authentication is off.
    pub async fn permit(&self, caller: &Caller, permission: &Permission) -> Result<(), ApiError> {
        match (caller, &self.auth) {
            (Caller::User(user), Some(_)) if !permission.reads() && user.relayed_by().is_some() => {
                Err(ApiError::Forbidden(format!(
                    "authorization: {permission}: calls relayed for {:?} by {:?} may only read",
                    user.name(),
                    user.relayed_by().unwrap_or_default()
                )))
            }
            (Caller::User(user), Some(auth)) => auth.authorize(user, permission).await,
            (Caller::Anyone, None) => Ok(()),
            (Caller::User(_), None) | (Caller::Anyone, Some(_)) => Err(ApiError::Unauthenticated(
                format!("authorization: {permission} needs an authenticated caller"),
            )),
        }
    }

    /// The capture `id` when `caller` may `verb` it (by its name). An id
    /// that is not there is reported only to a caller who may `verb` every
    /// capture: others learn nothing from asking.
    async fn capture(
        &self,
        caller: &Caller,
        verb: &'static str,
        id: &str,
    ) -> Result<CaptureStatus, ApiError> {
        match self.engine.get(id) {
            Some(status) => {
                self.permit(caller, &Permission::capture(verb, &status.name))
                    .await?;
                Ok(status)
            }
            None => {
                self.permit(caller, &Permission::captures(verb)).await?;
                Err(ApiError::capture_not_found(id))
            }
        }
    }

    /// Validates and starts a capture; `true` when it is new, `false` when
    /// the same capture was already there. Needs `update` on the capture's
    /// name and the cluster-wide [`Permission::capture_traffic`].
    pub async fn start(
        &self,
        caller: &Caller,
        req: Unchecked,
    ) -> Result<(CaptureStatus, bool), ApiError> {
        let req = req.validate()?;
        // The fixed permission first: its answer is cached per caller, so
        // names made up one per request cost a review each only to a
        // caller who may capture traffic anyway.
        self.permit(caller, &Permission::capture_traffic()).await?;
        self.permit(caller, &Permission::capture("update", &req.name))
            .await?;
        let existed = self.engine.get(&req.id).is_some();
        let status = self.engine.start_capture_async(req).await?;
        Ok((status, !existed))
    }

    /// Replaces a running capture's targets. Needs what [`Api::start`]
    /// needs.
    pub async fn set_targets(
        &self,
        caller: &Caller,
        id: &str,
        targets: UncheckedTargets,
    ) -> Result<CaptureStatus, ApiError> {
        let (targets, pods) = targets.validate()?;
        let capture = self.capture(caller, "update", id).await?;
        self.permit(caller, &Permission::capture_traffic()).await?;
        // A libpcap capture takes the targets at its thread's next round.
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.set_targets(&capture.id, targets, pods))
            .await
            .map_err(|e| ApiError::Internal(format!("setting the targets: {e}")))?
            .map_err(|e| match e {
                SetTargetsError::NotFound => ApiError::capture_not_found(id),
                SetTargetsError::Ended => ApiError::FailedPrecondition(format!(
                    "id: capture {id:?} has ended; its targets cannot change"
                )),
                SetTargetsError::Refused(e) => e.into(),
            })
    }

    pub async fn stop(&self, caller: &Caller, id: &str) -> Result<CaptureStatus, ApiError> {
        self.capture(caller, "update", id).await?;
        self.engine
            .stop_capture(id)
            .await
            .ok_or_else(|| ApiError::capture_not_found(id))
    }

    pub async fn get(&self, caller: &Caller, id: &str) -> Result<CaptureStatus, ApiError> {
        self.capture(caller, "get", id).await
    }

    /// A capture's status now and each change after, until it ends.
    pub async fn watch(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<tokio::sync::watch::Receiver<CaptureStatus>, ApiError> {
        self.capture(caller, "get", id).await?;
        self.engine
            .watch(id)
            .ok_or_else(|| ApiError::capture_not_found(id))
    }

    pub async fn list(
        &self,
        caller: &Caller,
        id_prefix: &str,
    ) -> Result<Vec<CaptureStatus>, ApiError> {
        self.permit(caller, &Permission::captures("list")).await?;
        Ok(self.engine.list(id_prefix))
    }

    /// The files `caller` may read: with `list` on captures (which shows
    /// they exist), the files of each capture whose files it may `get`.
    pub async fn files(&self, caller: &Caller) -> Result<Vec<FileEntry>, ApiError> {
        self.permit(caller, &Permission::captures("list")).await?;
        let files = self
            .engine
            .files()
            .list()
            .map_err(|e| ApiError::Internal(format!("listing the capture directory: {e}")))?;
        match self.permit(caller, &Permission::files(None)).await {
            Ok(()) => return Ok(files),
            Err(ApiError::Forbidden(_)) => {}
            Err(e) => return Err(e),
        }
        let mut readable = HashMap::new();
        let mut shown = Vec::new();
        for file in files {
            let Some(capture) = files::capture_of(&file.name) else {
                continue;
            };
            let allowed = match readable.get(capture) {
                Some(&allowed) => allowed,
                None => {
                    let allowed = match self.permit(caller, &Permission::files(Some(capture))).await
                    {
                        Ok(()) => true,
                        Err(ApiError::Forbidden(_)) => false,
                        Err(e) => return Err(e),
                    };
                    readable.insert(capture.to_owned(), allowed);
                    allowed
                }
            };
            if allowed {
                shown.push(file);
            }
        }
        Ok(shown)
    }

    /// A capture file's bytes in chunks, all of them or the part an HTTP
    /// `Range` value asks for ([`requested_part`]), and what they are, when
    /// `caller` may `get` the files of the file's capture (see
    /// [`files::capture_of`]). The request's conditions name the file as
    /// it is or not (its ETag or Last-Modified date, [`Validators`]), as
    /// RFC 9110 13.2.2 orders them: a copy that is still the file
    /// (`If-None-Match`, `If-Modified-Since`) gets no bytes
    /// ([`Sent::not_modified`]); beside an `If-Range` that names another
    /// version, the `Range` is ignored and the whole file sent.
    pub async fn download(
        &self,
        caller: &Caller,
        name: &str,
        asked: Conditions<'_>,
    ) -> Result<(impl Stream<Item = io::Result<Bytes>> + Send + 'static, Sent), ApiError> {
        if !files::valid_name(name) {
            return Err(files::FileError::BadName(name.to_owned()).into());
        }
        // A file that is not there, or of no capture this agent knows, is
        // reported only to a caller who may read every capture's files, as
        // with unknown capture ids: names made up one per request then
        // cost one review, whose answer is cached, not one each. A file
        // compressed since it was listed is its capture's even when the
        // agent has forgotten the capture: its reader is told 404, and
        // asks for the copy.
        let opened = self.engine.files().open(name);
        let capture = files::capture_of(name).filter(|capture| {
            opened.is_ok() || self.engine.knows_name(capture) || self.engine.files().holds(name)
        });
        self.permit(caller, &Permission::files(capture)).await?;
        let (mut file, meta) = match (capture, opened) {
            (Some(_), Ok(opened)) => opened,
            (None, Ok(_)) => return Err(files::FileError::NotFound(name.to_owned()).into()),
            (_, Err(e)) => return Err(e.into()),
        };
        let version = validators_of(&meta);
        let size = meta.len();
        let not_modified = version.not_modified(asked.if_none_match, asked.if_modified_since);
        let range = asked
            .range
            .filter(|_| !not_modified)
            .filter(|_| asked.if_range.is_none_or(|v| version.is_named_by(v)));
        let part = match range {
            Some(range) => requested_part(range, size)?,
            None => None,
        };
        let sent = Sent {
            size,
            part,
            not_modified,
            version,
        };
        let bytes = sent.bytes();
        file.seek(io::SeekFrom::Start(bytes.start))
            .map_err(|e| ApiError::Internal(format!("name: reading {name:?}: {e}")))?;
        let file = tokio::fs::File::from_std(file).take(bytes.end - bytes.start);
        Ok((chunks(file), sent))
    }
}

/// What a download asks beside the file's name: HTTP's `Range`, and the
/// conditions on the file's validators (none of them over gRPC but
/// `If-Range`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Conditions<'a> {
    pub range: Option<&'a str>,
    pub if_range: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub if_modified_since: Option<&'a str>,
}

/// What a download sends of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The file's size.
    pub size: u64,
    /// The bytes a `Range` asked for; `None`: the whole file.
    pub part: Option<std::ops::Range<u64>>,
    /// The asker's copy is still the file: no bytes (304 Not Modified).
    pub not_modified: bool,
    version: Validators,
}

impl Sent {
    fn bytes(&self) -> std::ops::Range<u64> {
        match &self.part {
            _ if self.not_modified => 0..0,
            Some(part) => part.clone(),
            None => 0..self.size,
        }
    }

    /// How many bytes are sent.
    pub fn content_length(&self) -> u64 {
        let bytes = self.bytes();
        bytes.end - bytes.start
    }

    /// The file's `etag` and `last-modified` (header names, as gRPC
    /// metadata keys are, in lower case), those it has.
    pub fn validators(&self) -> impl Iterator<Item = (&'static str, String)> {
        [
            ("etag", Some(self.version.etag.clone())),
            ("last-modified", self.version.last_modified()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }

    /// `Content-Range` of a part (RFC 9110 14.4).
    pub fn content_range(&self) -> Option<String> {
        let part = self.part.as_ref()?;
        Some(format!(
            "bytes {}-{}/{}",
            part.start,
            part.end - 1,
            self.size
        ))
    }
}

/// A file's validators as it is now. The ETag also changes when a file is
/// replaced by one of the same name (its inode), or by the same file
/// written again.
fn validators_of(meta: &std::fs::Metadata) -> Validators {
    use std::os::unix::fs::MetadataExt as _;
    Validators {
        etag: format!(
            "\"{:x}-{:x}-{:x}.{:x}\"",
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ),
        modified: meta.modified().ok().and_then(http_date),
    }
}

/// The part of a file of `size` bytes that an HTTP `Range` value asks for
/// (RFC 9110 14.1.2): one range of bytes, `bytes=FIRST-[LAST]` or
/// `bytes=-LAST_N`. Anything else (several ranges, another unit, a value
/// that does not parse) is ignored, as the RFC lets a server do: `None`,
/// the whole file. A range that holds no byte of the file is refused.
pub fn requested_part(range: &str, size: u64) -> Result<Option<std::ops::Range<u64>>, ApiError> {
    let Some((unit, spec)) = range.split_once('=') else {
        return Ok(None);
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    // Digits only: `parse` would take a sign.
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let wanted = match (number(first), number(last)) {
        // The last N bytes.
        (None, Some(n)) if first.is_empty() => {
            (n > 0 && size > 0).then(|| size.saturating_sub(n)..size)
        }
        (Some(first), None) if last.is_empty() => (first < size).then_some(first..size),
        (Some(first), Some(last)) if first <= last => {
            (first < size).then(|| first..last.saturating_add(1).min(size))
        }
        _ => return Ok(None),
    };
    wanted
        .map(Some)
        .ok_or_else(|| ApiError::RangeNotSatisfiable {
            message: format!("Range: {range:?} asks for none of the file's {size} bytes"),
            size,
        })
}

/// Packets a live reader gets at once, at most: one gRPC message or one
/// write of the REST stream.
const BATCH_PACKETS: usize = 256;
const BATCH_BYTES: usize = 256 * 1024;
/// Retry-After of a live stream refused for its capture's readers: one
/// leaves when its client goes.
const STREAM_RETRY_SECONDS: u64 = 5;

impl Api {
    /// The packets the running capture `id` records from now on, or from
    /// `after` its packet of that number on (a reader whose stream broke
    /// off), for `caller` if it may read the capture's files.
    pub async fn stream(
        &self,
        caller: &Caller,
        id: &str,
        after: Option<u64>,
    ) -> Result<LiveStream, ApiError> {
        let status = self.capture(caller, "get", id).await?;
        self.permit(caller, &Permission::files(Some(&status.name)))
            .await?;
        match self.engine.stream(id, after) {
            Some(Ok(stream)) => Ok(stream),
            Some(Err((NoReader::Ended, state))) => Err(ApiError::FailedPrecondition(format!(
                "id: capture {id:?} has ended ({state}); its packets are in its file"
            ))),
            Some(Err((NoReader::Full, _))) => Err(ApiError::RateLimited {
                message: format!(
                    "id: capture {id:?} has {TAP_READERS} live readers already, as many as it \
                     takes; try again when one has gone (its packets are in its file too)"
                ),
                retry_after: STREAM_RETRY_SECONDS,
            }),
            None => Err(ApiError::capture_not_found(id)),
        }
    }

    /// A live stream's packets in batches of what has gathered (waiting
    /// only when nothing has; see [`Reader::next_batch`]), until the
    /// capture ends. Losses are counted in the metrics too.
    pub fn batches(&self, packets: Reader) -> impl Stream<Item = Batch> + Send + 'static {
        let metrics = self.metrics.clone();
        futures::stream::unfold(packets, move |mut packets| {
            let metrics = metrics.clone();
            async move {
                let batch = packets.next_batch(BATCH_PACKETS, BATCH_BYTES).await?;
                metrics.stream_lost(batch.lost);
                Some((batch, packets))
            }
        })
    }
}

/// Reads a file in chunks of [`CHUNK_BYTES`] (the last one shorter).
fn chunks(
    file: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0; CHUNK_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]).await? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        Ok(Some((Bytes::from(buf), file)))
    })
}

/// The whole API as one router: REST routes, then the gRPC services added
/// to the same router, behind the gate.
pub fn router(api: Api) -> Router {
    let health = {
        let (reporter, service) = tonic_health::server::health_reporter();
        // Serving as long as the process runs: the engine is up before the
        // listener opens.
        drop(reporter);
        // Open to everyone, like reflection: small messages only.
        service.max_decoding_message_size(MAX_OPEN_MESSAGE_BYTES)
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(packet_capture_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 for current clients, v1alpha for older ones (grpcurl tries both).
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid")
        .max_decoding_message_size(MAX_OPEN_MESSAGE_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid")
        .max_decoding_message_size(MAX_OPEN_MESSAGE_BYTES);
    let routes = tonic::service::Routes::from(rest::routes().with_state(api.clone()))
        .add_service(grpc::server(api.clone()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    routes
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(api, gate))
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The body of a call open to everyone in a service whose other calls take
/// large messages (the Agent service's Health): no more than the open
/// services take, refused as they refuse it.
fn open_message(body: Body) -> Body {
    use http_body_util::BodyExt as _;
    // A unary call's body: the message after its 5-byte header.
    Body::new(
        http_body_util::Limited::new(body, MAX_OPEN_MESSAGE_BYTES + 5).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                tonic::Status::out_of_range(format!(
                    "the message is larger than {MAX_OPEN_MESSAGE_BYTES} bytes"
                ))
            } else {
                tonic::Status::from_error(e)
            }
        }),
    )
}

/// In front of every route: checks the caller's right to the call and
/// counts the request.
async fn gate(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    let grpc = is_grpc(&req);
    let path = req.uri().path().to_owned();
    let route = match req.extensions().get::<MatchedPath>() {
        Some(m) if grpc => auth::grpc_route(&path, m.as_str()),
        Some(m) => m.as_str().to_owned(),
        None => "unmatched".to_owned(),
    };
    if path == auth::AGENT_HEALTH {
        req = req.map(open_message);
    }
    let response = match (auth::access(&path), &api.auth) {
        (Access::Authenticated(audience), Some(authorizer)) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip());
            let user = match authorizer
                .authenticate(req.headers(), auth::source_address(peer), audience)
                .await
            {
                // Only the agent's own calls are relayed.
                Ok(user) if audience == Audience::Agent => {
                    authorizer.on_behalf(user, req.headers()).await
                }
                other => other,
            };
            // Any pod can have a token for this agent: a body of up to
            // MAX_REQUEST_BYTES (a capture's spec or targets) is read only
            // for a caller who may capture traffic, every other body is
            // cut at MAX_OPEN_MESSAGE_BYTES.
            let spec = auth::carries_spec(req.method(), &path);
            let user = match user {
                Ok(user) if spec => {
                    let caller = Caller::User(user);
                    api.permit(&caller, &Permission::capture_traffic())
                        .await
                        .map(|()| caller)
                }
                other => other.map(Caller::User),
            };
            match user {
                Ok(caller) => {
                    if !spec {
                        req = req.map(|body| {
                            Body::new(http_body_util::Limited::new(body, MAX_OPEN_MESSAGE_BYTES))
                        });
                    }
                    req.extensions_mut().insert(caller);
                    next.run(req).await
                }
                Err(e) => {
                    // A blocked source's requests are many: the block
                    // itself is logged once, when it starts.
                    if matches!(e, ApiError::RateLimited { .. }) {
                        tracing::debug!(path, error = %e, "request refused");
                    } else {
                        tracing::info!(path, error = %e, "request refused");
                    }
                    if grpc {
                        e.into_grpc_response()
                    } else {
                        e.into_response()
                    }
                }
            }
        }
        (_, None) => {
            req.extensions_mut().insert(Caller::Anyone);
            next.run(req).await
        }
        // Open routes get no caller: a handler that asks for one fails.
        (Access::Open, Some(_)) => next.run(req).await,
    };
    let code = if grpc {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned()
    } else {
        response.status().as_u16().to_string()
    };
    api.metrics
        .request(if grpc { "grpc" } else { "rest" }, route, code);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_one_range_of_bytes_of_the_file() {
        for (range, part) in [
            ("bytes=0-", Some(0..100)),
            ("bytes=10-", Some(10..100)),
            ("bytes=10-19", Some(10..20)),
            ("bytes=99-99", Some(99..100)),
            ("bytes=10-1000", Some(10..100)),
            ("bytes=-30", Some(70..100)),
            ("bytes=-1000", Some(0..100)),
            (" Bytes = 5 - 6 ", Some(5..7)),
            // Ignored: the whole file.
            ("bytes=0-1,5-6", None),
            ("items=0-1", None),
            ("bytes=5-4", None),
            ("bytes=-", None),
            ("bytes=a-", None),
            ("bytes=+1-", None),
            ("bytes=1", None),
            ("bytes", None),
            ("bytes=99999999999999999999-", None),
        ] {
            assert_eq!(requested_part(range, 100).unwrap(), part, "{range}");
        }
        for (range, size) in [
            ("bytes=100-", 100),
            ("bytes=100-200", 100),
            ("bytes=-0", 100),
            ("bytes=0-", 0),
            ("bytes=-5", 0),
        ] {
            let refused = requested_part(range, size).unwrap_err();
            assert_eq!(refused.status(), http::StatusCode::RANGE_NOT_SATISFIABLE);
            assert!(refused.to_string().starts_with("Range: "), "{refused}");
            assert_eq!(refused.content_range(), Some(format!("bytes */{size}")));
        }
    }

    /// A time HTTP cannot say is left out, never a panic; the ETag changes
    /// with the time and the size.
    #[test]
    fn a_version_of_any_file() {
        use std::time::{Duration, UNIX_EPOCH};
        let file = tempfile::NamedTempFile::new().unwrap();
        let version_at = |time| {
            file.as_file().set_modified(time).unwrap();
            validators_of(&file.as_file().metadata().unwrap())
        };
        let midnight = version_at(UNIX_EPOCH + Duration::from_secs(1_767_225_600));
        assert!(midnight.modified.is_some());
        let unwritable = [
            UNIX_EPOCH - Duration::from_secs(86_400),
            UNIX_EPOCH - Duration::from_secs(1),
        ]
        .map(version_at);
        for version in &unwritable {
            assert_eq!(version.last_modified(), None);
            assert_ne!(version.etag, midnight.etag);
        }
        assert_ne!(unwritable[0].etag, unwritable[1].etag);
        let later =
            version_at(UNIX_EPOCH + Duration::from_secs(1_767_225_600) + Duration::from_nanos(1));
        assert_ne!(later.etag, midnight.etag);
        std::fs::write(file.path(), b"x").unwrap();
        let grown = version_at(UNIX_EPOCH + Duration::from_secs(1_767_225_600));
        assert_ne!(grown.etag, midnight.etag);
    }

    #[test]
    fn a_part_says_which_bytes_it_holds() {
        let version = validators_of(&std::fs::metadata(env!("CARGO_MANIFEST_DIR")).unwrap());
        let whole = Sent {
            size: 100,
            part: None,
            not_modified: false,
            version: version.clone(),
        };
        assert_eq!((whole.content_length(), whole.content_range()), (100, None));
        let part = Sent {
            part: Some(10..20),
            ..whole.clone()
        };
        assert_eq!(
            (part.content_length(), part.content_range().as_deref()),
            (10, Some("bytes 10-19/100"))
        );
        let kept = Sent {
            not_modified: true,
            ..whole
        };
        assert_eq!((kept.content_length(), kept.content_range()), (0, None));
    }
}
