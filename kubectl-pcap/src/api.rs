//! Talking to the cluster: the controller's aggregated API
//! (`pcap.packet.io/v1`), and what the API server's refusals mean for the
//! user.
//!
//! The aggregated API is reached through the API server with the kube
//! client's raw requests, so the kubeconfig's credentials apply and the API
//! server checks `get` on `captures/proxy` before the controller checks
//! `packetcaptureconfigs/files` for the capture. The
//! functions that turn a response into a message take the error, not the
//! client, so they are tested without a cluster.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use futures::{AsyncBufRead, AsyncBufReadExt};
use kube::Client;
use kube::core::Status;
use packet_capture_common::aggregated::{
    API_SERVICE, GROUP, RELAY_SUBRESOURCE, VERSION, file_path, files_path, packets_path, segment,
};
pub use packet_capture_common::aggregated::{FileEntry, FileList, NodeFiles};
use packet_capture_common::crd::{
    FILES_SUBRESOURCE, GROUP as CRD_GROUP, PLURAL, RESOURCE, STREAM_CAPTURE_ID,
};
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::opt_common::CommonOption;
use pcap_file::pcapng::{Block, PcapNgParseError, PcapNgParser};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A response body, read as it arrives.
pub type ByteStream = Pin<Box<dyn AsyncBufRead + Send>>;

fn get(path: String, accept: &str) -> Result<http::Request<Vec<u8>>, kube::Error> {
    http::Request::get(path)
        .header(http::header::ACCEPT, accept)
        .body(Vec::new())
        .map_err(kube::Error::HttpError)
}

/// Lists each node's files of `capture`.
pub async fn list_files(client: &Client, capture: &str) -> Result<FileList, kube::Error> {
    client
        .request(get(files_path(capture), "application/json")?)
        .await
}

/// One stored file as it is read: its bytes as the node keeps them, and
/// its ETag, which names this version of it to go on with.
pub struct StoredFile {
    pub body: ByteStream,
    pub etag: Option<String>,
}

/// Opens one stored file.
pub async fn open_file(
    client: &Client,
    capture: &str,
    node: &str,
    file: &str,
) -> Result<StoredFile, kube::Error> {
    let answer = send(
        client,
        get(file_path(capture, node, file), "application/octet-stream")?,
    )
    .await?;
    Ok(StoredFile {
        etag: etag_of(&answer),
        body: body_of(answer),
    })
}

/// The ETag an answer names its file's version by, if any.
fn etag_of<B>(answer: &http::Response<B>) -> Option<String> {
    let etag = answer.headers().get(http::header::ETAG)?.to_str().ok()?;
    Some(etag.to_owned())
}

/// An answer's body, read as it comes.
fn body_of(answer: http::Response<kube::client::Body>) -> ByteStream {
    use futures::TryStreamExt as _;
    use http_body_util::BodyExt as _;
    let body = answer
        .into_body()
        .into_data_stream()
        .map_err(io::Error::other);
    Box::pin(body.into_async_read())
}

/// Sends `request`; an answer of 4xx or 5xx is an error, read as kube reads
/// those of its own requests: a Status, or its text.
async fn send(
    client: &Client,
    request: http::Request<Vec<u8>>,
) -> Result<http::Response<kube::client::Body>, kube::Error> {
    use http_body_util::BodyExt as _;
    let answer = client.send(request.map(Into::into)).await?;
    let status = answer.status();
    if status.is_client_error() || status.is_server_error() {
        let body = answer.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        let status = serde_json::from_str::<Status>(&text).unwrap_or_else(|_| {
            Status::failure(text.trim(), "Failed to parse error data").with_code(status.as_u16())
        });
        return Err(kube::Error::Api(status.boxed()));
    }
    Ok(answer)
}

/// Why a download that broke off could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The file is not stored under its name any more: its node has
    /// compressed it since (or removed it, past its limit of files).
    #[error("it is no longer there ({0})")]
    Gone(http::StatusCode),
    /// Nothing answered, or the API server, the controller or the agent
    /// could not answer now (a 5xx): asking again later may do.
    #[error("{0}")]
    Unavailable(String),
    /// Another file is stored under its name now: never appended.
    #[error(
        "another file of that name is there now (ETag {now}, not {was}): the bytes \
         downloaded are of the one before"
    )]
    Replaced { was: String, now: String },
    /// Any other answer than the part asked for: never appended.
    #[error(
        "asked for its bytes from {from} on, the API server answered {status} \
         (Content-Range {range:?}), not that part"
    )]
    NotThatPart {
        from: u64,
        status: http::StatusCode,
        range: String,
    },
}

/// Opens one stored file from byte `from` on, to go on with a download that
/// broke off: the answer must be that part (206, its `Content-Range`
/// starting at `from`), never the whole file again. With the `etag` the
/// download began with, the part comes only from that same file (an
/// `If-Range`). `None`: the file holds no byte from there on (416 for a
/// file of `from` bytes), so the download was whole when it broke off.
pub async fn open_file_from(
    client: &Client,
    capture: &str,
    node: &str,
    file: &str,
    from: u64,
    etag: Option<&str>,
) -> Result<Option<ByteStream>, ResumeError> {
    use http::StatusCode;

    let unavailable = |e: kube::Error| ResumeError::Unavailable(e.to_string());
    let mut request =
        get(file_path(capture, node, file), "application/octet-stream").map_err(unavailable)?;
    let headers = request.headers_mut();
    let range = format!("bytes={from}-");
    headers.insert(
        http::header::RANGE,
        range.parse().expect("digits are a header value"),
    );
    if let Some(etag) = etag.and_then(|e| e.parse().ok()) {
        headers.insert(http::header::IF_RANGE, etag);
    }
    let answer = client
        .send(request.map(Into::into))
        .await
        .map_err(unavailable)?;
    let status = answer.status();
    let range = answer
        .headers()
        .get(http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    match status {
        StatusCode::PARTIAL_CONTENT if range.starts_with(&format!("bytes {from}-")) => {}
        StatusCode::RANGE_NOT_SATISFIABLE if range == format!("bytes */{from}") => return Ok(None),
        StatusCode::NOT_FOUND => return Err(ResumeError::Gone(status)),
        s if s.is_server_error() => {
            return Err(ResumeError::Unavailable(format!(
                "the API server answered {s}"
            )));
        }
        StatusCode::OK
            if let (Some(was), Some(now)) = (etag, etag_of(&answer))
                && was != now =>
        {
            return Err(ResumeError::Replaced {
                was: was.to_owned(),
                now,
            });
        }
        _ => {
            return Err(ResumeError::NotThatPart {
                from,
                status,
                range,
            });
        }
    }
    Ok(Some(body_of(answer)))
}

/// A live stream, and the capture it streams as its
/// [`STREAM_CAPTURE_ID`] header names it (to go on where it broke off).
pub struct LiveStream {
    pub body: ByteStream,
    pub capture_id: Option<String>,
}

/// Opens the live pcapng stream of `capture`, which ends when the capture
/// has ended on every node. `resume`: the stream broke off, after these
/// blocks of that capture id; it goes on after each node's last packet.
pub async fn open_packets(
    client: &Client,
    capture: &str,
    resume: Option<(&str, &WholeBlocks)>,
) -> Result<LiveStream, kube::Error> {
    let mut path = packets_path(capture);
    if let Some((id, blocks)) = resume {
        path.push_str(&format!("?resume={}", segment(id)));
        for (node, number) in &blocks.after {
            path.push_str(&format!("&after={}:{number}", segment(node)));
        }
    }
    let answer = send(client, get(path, "application/x-pcapng")?).await?;
    let capture_id = answer
        .headers()
        .get(STREAM_CAPTURE_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok(LiveStream {
        body: body_of(answer),
        capture_id,
    })
}

/// What went wrong with a request to the aggregated API, for the user: a
/// refusal names the permission missing, a missing or unready API says so.
pub fn explain_access(err: &kube::Error, capture: &str) -> String {
    let kube::Error::Api(status) = err else {
        return format!("cannot reach the API server: {err}");
    };
    let message = status_message(status);
    match status.code {
        // The controller's own check names what is missing
        // (packetcaptureconfigs/files for the capture): as it is.
        403 if message.contains(PLURAL) => message,
        403 => format!(
            "{message}\n\
             needs RBAC: `get` on `{RELAY_SUBRESOURCE}` in API group `{GROUP}` (checked by the \
             API server), and in API group `{CRD_GROUP}` `get` on \
             `{PLURAL}/{FILES_SUBRESOURCE}` for capture {capture:?}, `list` on `{PLURAL}` and \
             `get` on capture {capture:?} (checked by the controller and the agents); the \
             ClusterRole packet-capture-viewer grants them"
        ),
        // The controller knows the group but not the capture.
        404 if message.contains(&format!("\"{capture}\"")) => message,
        // The controller answers, but could not ask the API server (its
        // access review, or the capture) or a node's agent: it runs, so the
        // hint would mislead.
        503 if ["asking whether ", "reading ", "node "]
            .iter()
            .any(|p| message.starts_with(p)) =>
        {
            message
        }
        404 | 503 => format!(
            "{message}\n\
             the aggregated API {GROUP}/{VERSION} is not available: it is not installed \
             (APIService {API_SERVICE}) or the controller that serves it is not running \
             (kubectl get apiservice {API_SERVICE})"
        ),
        _ => message,
    }
}

/// What went wrong with a request for `packetcaptureconfigs`, for the user:
/// the API server's or the webhook's message (which names the field), with
/// the RBAC verbs a refusal needs (`["list", "watch"]` for a watch).
pub fn explain_crd(err: &kube::Error, verbs: &[&str]) -> String {
    let kube::Error::Api(status) = err else {
        return format!("cannot reach the API server: {err}");
    };
    let message = status_message(status);
    let named = status.details.as_ref().is_some_and(|d| !d.name.is_empty());
    match status.code {
        403 => format!(
            "{message}\n\
             needs RBAC: `{}` on `{RESOURCE}` (cluster-scoped: a ClusterRole and a \
             ClusterRoleBinding)",
            verbs.join("` and `")
        ),
        404 if !named => format!(
            "{message}\n\
             the PacketCaptureConfig CRD ({RESOURCE}) is not installed in this cluster"
        ),
        _ => message,
    }
}

/// An error in a line: the API server's code and message, or what failed
/// on the way.
pub fn in_a_line(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!(
            "the API server answered {}: {}",
            status.code,
            status_message(status)
        ),
        other => other.to_string(),
    }
}

/// The status's message, or its reason and code when it has none.
fn status_message(status: &Status) -> String {
    if status.message.is_empty() {
        format!("{} ({})", status.reason, status.code)
    } else {
        status.message.clone()
    }
}

/// The pauses before each new try to go on after a connection broke off or
/// the API server was unavailable: 0.5 s, doubling each time, for
/// [`Backoff::TRIES`] tries (63.5 s in all: time for an API server or a
/// controller that restarts).
#[derive(Debug)]
pub struct Backoff {
    tried: u32,
    pause: Duration,
}

impl Backoff {
    pub const TRIES: u32 = 7;
    const FIRST_PAUSE: Duration = Duration::from_millis(500);

    /// The pause before the next try, or `None` once every try is spent.
    pub fn next_pause(&mut self) -> Option<Duration> {
        if self.tried == Self::TRIES {
            return None;
        }
        self.tried += 1;
        let pause = self.pause;
        self.pause *= 2;
        Some(pause)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            tried: 0,
            pause: Self::FIRST_PAUSE,
        }
    }
}

/// Where a copy failed: reading the response, or writing the output (a
/// closed pipe is not an error of the transfer).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("writing: {0}")]
    Write(#[source] io::Error),
}

/// The most of one pcapng block a live stream holds back until the block
/// is whole: far more than a packet of the largest snaplen (262,144 bytes)
/// with its options; a stream that needs more is not pcapng.
const MAX_PARTIAL_BLOCK: usize = 16 << 20;
/// The type of a pcapng section header block.
const SECTION_HEADER: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// The option of an enhanced packet block that numbers it (pcapng's
/// `epb_packetid`): a live stream numbers each node's packets.
const EPB_PACKETID: u16 = 5;

/// Holds a live pcapng stream's bytes back until they make whole blocks,
/// so that what is written ends between two blocks however the stream
/// breaks off, and another stream's section can follow it; and keeps the
/// number of each node's last packet in them, for a stream that goes on
/// after them.
#[derive(Default)]
pub struct WholeBlocks {
    held: Vec<u8>,
    /// The section's parser, from its header block on.
    parser: Option<PcapNgParser>,
    /// Node -> the `epb_packetid` of its last packet (its interfaces are
    /// named `NODE/IFACE`).
    after: std::collections::BTreeMap<String, u64>,
    /// Packets the whole blocks say were lost before them
    /// (`epb_dropcount`).
    lost: u64,
}

impl WholeBlocks {
    /// Holds `chunk` after what it held; returns how many of the held
    /// bytes, from the first, now make whole blocks.
    fn hold(&mut self, chunk: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(chunk);
        let mut whole = 0;
        loop {
            let rest = &self.held[whole..];
            let not_pcapng = |why: String| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a pcapng stream: {why}"),
                )
            };
            // A section begins with its header block, whose type reads the
            // same in either byte order.
            if self.parser.is_none() && rest.len() >= 4 && rest[..4] != SECTION_HEADER {
                return Err(not_pcapng(format!("it begins with {:02x?}", &rest[..4])));
            }
            let parsed = match self.parser.as_mut() {
                Some(parser) => parser.next_block(rest).map(|(left, block)| {
                    if let Block::EnhancedPacket(packet) = &block {
                        self.lost += dropped_before(packet);
                        if let Some((node, number)) = numbered(parser, packet) {
                            // A node's name is allocated once, not per packet.
                            match self.after.get_mut(node) {
                                Some(last) => *last = number,
                                None => {
                                    self.after.insert(node.to_owned(), number);
                                }
                            }
                        }
                    }
                    (left, None)
                }),
                None => PcapNgParser::new(rest).map(|(left, parser)| (left, Some(parser))),
            };
            match parsed {
                Ok((left, section)) => {
                    whole = self.held.len() - left.len();
                    if section.is_some() {
                        self.parser = section;
                    }
                }
                Err(PcapNgParseError::IncompleteBuffer(needed, _))
                    if needed <= MAX_PARTIAL_BLOCK =>
                {
                    return Ok(whole);
                }
                Err(e) => return Err(not_pcapng(e.to_string())),
            }
        }
    }

    /// Forgets the part of a block it holds, which a stream that broke off
    /// never finished, and the section: the next stream begins its own.
    /// Returns how many bytes it dropped.
    pub fn break_off(&mut self) -> usize {
        self.parser = None;
        std::mem::take(&mut self.held).len()
    }

    /// Forgets the packets' numbers: they were another capture's (a new
    /// generation).
    pub fn forget_numbers(&mut self) {
        self.after.clear();
    }

    /// Packets the blocks written so far say were lost before them: the
    /// nodes' live readers fell behind, or no longer kept them for a
    /// stream that came back.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

/// A packet's `epb_dropcount`, 0 without one.
fn dropped_before(packet: &EnhancedPacketBlock<'_>) -> u64 {
    packet
        .options
        .iter()
        .map(|o| match o {
            EnhancedPacketOption::DropCount(n) => *n,
            _ => 0,
        })
        .sum()
}

/// The node and number of a live stream's packet, when it has them.
fn numbered<'p>(
    parser: &'p PcapNgParser,
    packet: &EnhancedPacketBlock<'_>,
) -> Option<(&'p str, u64)> {
    let number = packet.options.iter().find_map(|o| match o {
        EnhancedPacketOption::Common(CommonOption::Unknown(u)) if u.code == EPB_PACKETID => {
            let bytes: [u8; 8] = u.value.as_ref().try_into().ok()?;
            Some(match parser.section().endianness {
                pcap_file::Endianness::Big => u64::from_be_bytes(bytes),
                pcap_file::Endianness::Little => u64::from_le_bytes(bytes),
            })
        }
        _ => None,
    })?;
    let interface = parser.interfaces().get(packet.interface_id as usize)?;
    let (node, _) = crate::merge::if_name(interface)?.split_once('/')?;
    Some((node, number))
}

/// Copies a response body to `to` chunk by chunk as it arrives; returns
/// the bytes read. A `live` stream is written as its blocks are whole, and
/// flushed after each chunk, so a reader downstream sees each packet as it
/// comes; one that ends inside a block broke off (`UnexpectedEof`), and
/// what it held of the block stays held.
pub async fn copy_chunks<W: AsyncWrite + Unpin>(
    mut from: impl AsyncBufRead + Unpin,
    to: &mut W,
    mut live: Option<&mut WholeBlocks>,
) -> Result<u64, CopyError> {
    let mut total = 0u64;
    loop {
        let chunk = from.fill_buf().await.map_err(CopyError::Read)?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        match live.as_deref_mut() {
            None => to.write_all(chunk).await.map_err(CopyError::Write)?,
            Some(blocks) => {
                let whole = blocks.hold(chunk).map_err(CopyError::Read)?;
                to.write_all(&blocks.held[..whole])
                    .await
                    .map_err(CopyError::Write)?;
                blocks.held.drain(..whole);
                to.flush().await.map_err(CopyError::Write)?;
            }
        }
        from.consume_unpin(n);
        total += n as u64;
    }
    to.flush().await.map_err(CopyError::Write)?;
    if let Some(blocks) = live.filter(|b| !b.held.is_empty()) {
        return Err(CopyError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stream ended {} bytes into a block", blocks.held.len()),
        )));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(Status::failure(message, reason).with_code(code).boxed())
    }

    #[test]
    fn a_file_list_reads_with_and_without_errors() {
        let list: FileList = serde_json::from_str(
            r#"{"capture":"web","nodes":[
                {"node":"worker-1","address":"10.0.1.100","files":[
                    {"name":"web-20250101-120000.pcapng.gz","size":123,"modified":"2025-01-01T12:01:00Z"}]},
                {"node":"worker-2","address":"10.0.1.101","error":"agent unreachable"}]}"#,
        )
        .unwrap();
        assert_eq!(list.capture, "web");
        assert_eq!(list.nodes[0].files[0].size, 123);
        assert_eq!(list.nodes[0].error, None);
        assert!(list.nodes[1].files.is_empty());
        assert_eq!(list.nodes[1].error.as_deref(), Some("agent unreachable"));
    }

    #[test]
    fn refusals_name_the_permission() {
        let server = api_error(
            403,
            "Forbidden",
            r#"captures.pcap.packet.io "web" is forbidden: User "alice" cannot get resource "captures/proxy" in API group "pcap.packet.io" at the cluster scope"#,
        );
        let m = explain_access(&server, "web");
        assert!(
            m.starts_with("captures.pcap.packet.io \"web\" is forbidden"),
            "{m}"
        );
        assert!(
            m.contains("`get` on `captures/proxy` in API group `pcap.packet.io`"),
            "{m}"
        );
        assert!(m.contains("`packetcaptureconfigs/files`"), "{m}");

        let controller = api_error(
            403,
            "Forbidden",
            r#"User "alice" may not get packetcaptureconfigs/files "web" in networking.packet.io"#,
        );
        assert_eq!(
            explain_access(&controller, "web"),
            r#"User "alice" may not get packetcaptureconfigs/files "web" in networking.packet.io"#
        );

        let crd = api_error(
            403,
            "Forbidden",
            "packetcaptureconfigs.networking.packet.io is forbidden: User \"alice\" cannot create resource",
        );
        let m = explain_crd(&crd, &["create"]);
        assert!(
            m.contains("needs RBAC: `create` on `packetcaptureconfigs.networking.packet.io`"),
            "{m}"
        );
        let m = explain_crd(&crd, &["list", "watch"]);
        assert!(m.contains("needs RBAC: `list` and `watch` on"), "{m}");
    }

    #[test]
    fn a_missing_api_is_told_apart_from_a_missing_capture() {
        for (code, message) in [
            (503, "service unavailable"),
            (404, "the server could not find the requested resource"),
        ] {
            let m = explain_access(&api_error(code, "", message), "web");
            assert!(m.starts_with(message), "{m}");
            assert!(m.contains("not installed"), "{m}");
            assert!(m.contains("not running"), "{m}");
        }
        let missing = api_error(404, "NotFound", r#"capture "web" not found"#);
        assert_eq!(
            explain_access(&missing, "web"),
            r#"capture "web" not found"#
        );
        // The controller runs, but could not ask the API server.
        for message in [
            r#"asking whether "alice" may read the files: connection reset"#,
            "reading web: connection reset",
            "node n2: the agent did not answer: connection refused",
        ] {
            let m = explain_access(&api_error(503, "", message), "web");
            assert_eq!(m, message);
        }

        let no_crd = api_error(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        assert!(explain_crd(&no_crd, &["get"]).contains("CRD"));
        let named: Status = serde_json::from_str(
            r#"{"kind":"Status","status":"Failure","code":404,"reason":"NotFound",
                "message":"packetcaptureconfigs.networking.packet.io \"web\" not found",
                "details":{"name":"web","group":"networking.packet.io","kind":"packetcaptureconfigs"}}"#,
        )
        .unwrap();
        assert_eq!(
            explain_crd(&kube::Error::Api(named.boxed()), &["get"]),
            r#"packetcaptureconfigs.networking.packet.io "web" not found"#
        );
    }

    #[test]
    fn webhook_refusals_are_shown_as_they_are() {
        let m = r#"admission webhook "validate.networking.packet.io" denied the request: spec.targetIPs[0]: "x" is not an IP address or CIDR"#;
        assert_eq!(
            explain_crd(&api_error(400, "BadRequest", m), &["create"]),
            m
        );
    }

    /// A client whose API server answers the one request it gets with
    /// `status` and `body`, after checking the request's path.
    fn answering(path: &'static str, status: StatusCode, body: &'static str) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::GET);
            assert_eq!(request.uri().path(), path);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(body.as_bytes().to_vec()))
                    .unwrap(),
            );
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn files_are_listed_and_refusals_come_back_as_statuses() {
        let client = answering(
            "/apis/pcap.packet.io/v1/captures/web/proxy/files",
            StatusCode::OK,
            r#"{"capture":"web","nodes":[{"node":"n1","address":"10.0.0.1","files":[]}]}"#,
        );
        let list = list_files(&client, "web").await.unwrap();
        assert_eq!(list.nodes[0].node, "n1");

        let client = answering(
            "/apis/pcap.packet.io/v1/captures/web/proxy/files",
            StatusCode::FORBIDDEN,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"captures.pcap.packet.io \"web\" is forbidden: User \"bob\" cannot get resource \"captures/proxy\" in API group \"pcap.packet.io\"","reason":"Forbidden","code":403}"#,
        );
        let err = list_files(&client, "web").await.unwrap_err();
        let m = explain_access(&err, "web");
        assert!(m.contains("User \"bob\""), "{m}");
        assert!(m.contains("needs RBAC: `get` on `captures/proxy`"), "{m}");

        let client = answering(
            "/apis/pcap.packet.io/v1/captures/web/proxy/packets",
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable\n",
        );
        let Err(err) = open_packets(&client, "web", None).await else {
            panic!("a 503 was taken for a stream");
        };
        assert!(explain_access(&err, "web").contains("not available"));
    }

    /// The drop counts of the whole blocks written add up; the block a
    /// stream broke off inside is neither written nor counted.
    #[tokio::test]
    async fn the_packets_lost_before_whole_blocks_are_counted() {
        use packet_capture_common::pcapng;
        let mut section = Vec::new();
        pcapng::section_header(&mut section, "test", "");
        pcapng::interface_description(&mut section, "n1/eth0", "", 65535);
        let mut ends = Vec::new();
        for (number, lost) in [(1, 0), (5, 3), (6, 0), (9, 2)] {
            pcapng::enhanced_packet(
                &mut section,
                &pcapng::Packet {
                    interface_id: 0,
                    unix_ns: 0,
                    inbound: None,
                    orig_len: 1,
                    data: &[0],
                    lost,
                    number: Some(number),
                },
            );
            ends.push(section.len());
        }
        let mut blocks = WholeBlocks::default();
        let mut out = Vec::new();
        let broken = futures::io::Cursor::new(section[..ends[3] - 1].to_vec());
        let copied = copy_chunks(broken, &mut out, Some(&mut blocks)).await;
        assert!(
            matches!(copied, Err(CopyError::Read(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        assert_eq!(out, &section[..ends[2]]);
        assert_eq!(blocks.lost(), 3);
        assert_eq!(blocks.after, [("n1".to_owned(), 6)].into());
    }

    #[tokio::test]
    async fn a_file_is_read_as_it_is_stored() {
        let client = answering(
            "/apis/pcap.packet.io/v1/captures/web/proxy/files/n1/web-20250101-120000.pcap.gz",
            StatusCode::OK,
            "\x1f\u{8b}bytes",
        );
        let body = open_file(&client, "web", "n1", "web-20250101-120000.pcap.gz")
            .await
            .unwrap()
            .body;
        let mut out = Vec::new();
        copy_chunks(body, &mut out, None).await.unwrap();
        assert_eq!(out, "\x1f\u{8b}bytes".as_bytes());
    }
}
