//! An API server stand-in for the commands' tests: it answers each request
//! as it is told, in turn, and can break a body off as a connection does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncBufRead, TryStreamExt as _};
use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use tokio::io::AsyncWrite;

use crate::cluster::Cluster;

/// What the API server stand-in answers to a GET of `path` with these
/// `Range` and `If-Range` headers (or none): `status`, `headers` and
/// `body`, broken off with an error after `breaks_after` bytes.
#[derive(Clone)]
pub struct Answer {
    pub path: &'static str,
    pub range: Option<&'static str>,
    pub if_range: Option<&'static str>,
    pub status: StatusCode,
    pub headers: Vec<(http::HeaderName, String)>,
    pub body: Vec<u8>,
    pub breaks_after: Option<usize>,
}

impl From<(&'static str, StatusCode, Vec<u8>)> for Answer {
    fn from((path, status, body): (&'static str, StatusCode, Vec<u8>)) -> Self {
        Self {
            path,
            range: None,
            if_range: None,
            status,
            headers: Vec::new(),
            body,
            breaks_after: None,
        }
    }
}

/// A body that can break off, as a connection does.
pub type Served = http_body_util::channel::Channel<bytes::Bytes, std::io::Error>;

/// A cluster whose API server answers each path it is asked for with
/// the status and body given for it, and fails the test on any other; the task
/// returns the paths asked (with the queries of the aggregated API's), in
/// order, once the client is dropped. A
/// request given several answers gets them in turn, the last one from
/// then on.
pub fn api_server(
    answers: Vec<(&'static str, StatusCode, Vec<u8>)>,
) -> (Cluster, tokio::task::JoinHandle<Vec<String>>) {
    answering(answers.into_iter().map(Answer::from).collect())
}

/// [`api_server`] with whole [`Answer`]s.
pub fn answering(mut answers: Vec<Answer>) -> (Cluster, tokio::task::JoinHandle<Vec<String>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Served>>();
    let asked = tokio::spawn(async move {
        let mut asked = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            // The queries of the aggregated API's paths are the commands'
            // own; those kube adds to its lists and watches are not.
            let recorded = match request.uri().query() {
                Some(query) if path.starts_with("/apis/pcap.packet.io/") => {
                    format!("{path}?{query}")
                }
                _ => path.clone(),
            };
            let headers = request.headers();
            let header = |name| Some(headers.get(name)?.to_str().unwrap().to_owned());
            let (range, if_range) = (header(http::header::RANGE), header(http::header::IF_RANGE));
            let asks = |a: &Answer| {
                a.path == path
                    && a.range.map(str::to_owned) == range
                    && a.if_range.map(str::to_owned) == if_range
            };
            let Some(at) = answers.iter().position(asks) else {
                panic!("unexpected request {path} (Range {range:?}, If-Range {if_range:?})");
            };
            let answer = if answers[at + 1..].iter().any(asks) {
                answers.remove(at)
            } else {
                answers[at].clone()
            };
            let sent = answer.breaks_after.unwrap_or(answer.body.len());
            // Room for the one frame: the body is whole before it is read.
            let (mut tx, body) = Served::new(1);
            if sent > 0 {
                let data = bytes::Bytes::copy_from_slice(&answer.body[..sent]);
                tx.send_data(data).await.unwrap();
            }
            if answer.breaks_after.is_some() {
                tx.abort(std::io::Error::other("connection reset by peer"));
            }
            let mut response = Response::builder().status(answer.status);
            for (name, value) in &answer.headers {
                response = response.header(name, value);
            }
            send.send_response(response.body(body).unwrap());
            asked.push(recorded);
        }
        asked
    });
    let cluster = Cluster {
        client: Client::new(service, "default"),
        namespace: "default".into(),
    };
    (cluster, asked)
}

/// Records what was written and where each flush fell.
#[derive(Default)]
pub struct Recorder {
    pub data: Vec<u8>,
    pub flushed_at: Vec<usize>,
    pub broken: bool,
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.data.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let at = self.data.len();
        self.flushed_at.push(at);
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A response body that arrives in these parts.
pub fn chunks(parts: &[&'static [u8]]) -> impl AsyncBufRead + Unpin {
    futures::stream::iter(parts.iter().map(|p| Ok::<_, io::Error>(p.to_vec()))).into_async_read()
}

/// A pcapng section of `packets` packets, and where each of its
/// blocks ends.
pub fn section(packets: u8) -> (Vec<u8>, Vec<usize>) {
    use packet_capture_common::pcapng;
    let mut out = Vec::new();
    let mut ends = Vec::new();
    pcapng::section_header(&mut out, "test", "");
    ends.push(out.len());
    pcapng::interface_description(&mut out, "n1/eth0", "", 65535);
    ends.push(out.len());
    for i in 0..packets {
        let data = [i; 61];
        pcapng::enhanced_packet(
            &mut out,
            &pcapng::Packet {
                interface_id: 0,
                unix_ns: 1_700_000_000_000_000_000 + u64::from(i),
                inbound: Some(true),
                orig_len: 61,
                data: &data,
                lost: 0,
                number: Some(u64::from(i) + 1),
            },
        );
        ends.push(out.len());
    }
    (out, ends)
}
