//! The listener: TLS, HTTP/1.1 and HTTP/2 on one port, and the limits that
//! keep connections from holding the agent: how many at once, how many from
//! one address, how long a client may take to say something, and how long
//! a connection may sit with nothing in flight for an authorized caller.
//! Connections from the node's own address (the kubelet's probes run
//! `packet-capture-agent health` on the node) have slots of their own, so
//! that clients elsewhere cannot take them all and get the agent
//! restarted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::auth::{self, Access};

/// Connections served at once from other addresses than the node's own;
/// more are closed as they come, so a flood of idle connections cannot
/// take the agent's memory or its file descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once from the node's own address (the probes,
/// and processes on the host network).
pub const MAX_LOCAL_CONNECTIONS: usize = 16;
/// Connections one address may hold at once, so that a single client
/// cannot take every slot from the controller and the probes.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = MAX_CONNECTIONS / 8;
/// A client has this long for its TLS handshake, for the first bytes that
/// tell HTTP/1.1 from HTTP/2, and for each HTTP/1.1 request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must have arrived whole this long after its head: a
/// body sent a byte at a time would keep its request, and so its
/// connection, in flight for ever.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight for this long is closed (an
/// HTTP/2 connection answers keep-alive pings for ever otherwise). Clients
/// open a new one on their next call. An answer counts as in flight while
/// its body is sent only for an authorized caller: anyone's else could be
/// held unsent by a client that never reads (an HTTP/2 window of zero).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// What is still in flight when a connection closes has this long to end
/// before the connection is cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// gRPC streams at once on one HTTP/2 connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// What an HTTP/2 client sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves the router on the listener until `shutdown` completes; then stops
/// accepting and lets requests in progress finish. Over TLS when `tls` is
/// given. Each request knows its peer's address (the authorizer limits
/// refused tokens per address).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use tower::ServiceExt as _;

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let local_slots = Arc::new(tokio::sync::Semaphore::new(MAX_LOCAL_CONNECTIONS));
    let per_address = PerAddress::default();
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of descriptors and the like: wait a little
                    // rather than spin on the error.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let local = tcp.local_addr().is_ok_and(|a| a.ip() == peer.ip());
        let (pool, size) = if local {
            (&local_slots, MAX_LOCAL_CONNECTIONS)
        } else {
            (&slots, MAX_CONNECTIONS)
        };
        let Ok(slot) = pool.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refused: {size} connections {} already", if local { "from this node" } else { "from elsewhere" });
            continue;
        };
        let held = if local {
            None
        } else {
            let Some(held) = per_address.take(peer.ip()) else {
                tracing::debug!(%peer, "refused: {MAX_CONNECTIONS_PER_ADDRESS} connections from this address already");
                continue;
            };
            Some(held)
        };
        let activity = Activity::default();
        let service = {
            let (router, activity) = (router.clone(), activity.clone());
            tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                // In flight from its head to its answer, and to the end of
                // the answer's body when that is for an authorized caller:
                // a stream (a watch, a download) keeps its connection busy.
                let busy = activity.begin();
                let authenticated = auth::access(req.uri().path()) != Access::Open;
                req.extensions_mut().insert(ConnectInfo(peer));
                let req = req.map(|body| Deadline {
                    body,
                    expires: Box::pin(tokio::time::sleep(BODY_READ_TIMEOUT)),
                });
                let answer = router.clone().oneshot(req);
                async move {
                    let answer = answer.await?;
                    let authorized = authenticated && answer.status().is_success();
                    Ok::<_, Infallible>(answer.map(|body| {
                        if authorized {
                            Body::new(Tracked { body, _busy: busy })
                        } else {
                            body
                        }
                    }))
                }
            })
        };
        let service = hyper_util::service::TowerToHyperService::new(service);
        let (http, tls, mut stop) = (http.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let opened = async {
                let tcp = match tls {
                    None => Stream::Plain(tcp),
                    Some(tls) => Stream::Tls(Box::new(
                        tls.accept(tcp)
                            .await
                            .map_err(|e| format!("TLS handshake: {e}"))?,
                    )),
                };
                first_bytes(tcp).await
            };
            let served = match tokio::time::timeout(HEADER_READ_TIMEOUT, opened).await {
                Ok(Ok(stream)) => {
                    let connection =
                        http.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let mut connection = std::pin::pin!(connection);
                    // No request for IDLE_TIMEOUT, or the server stopping:
                    // the connection closes once what is in flight is done,
                    // and an HTTP/2 client is told so first (GOAWAY), so
                    // that it sends its next call on a new one.
                    let closing = async {
                        tokio::select! {
                            () = activity.idle_for(IDLE_TIMEOUT) => {}
                            _ = stop.wait_for(|stopping| *stopping) => {}
                        }
                    };
                    let mut closing = std::pin::pin!(closing);
                    let mut closed = false;
                    let cut = tokio::time::sleep(Duration::MAX);
                    let mut cut = std::pin::pin!(cut);
                    loop {
                        tokio::select! {
                            served = connection.as_mut() => break served,
                            () = &mut closing, if !closed => {
                                closed = true;
                                connection.as_mut().graceful_shutdown();
                                cut.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                            }
                            () = &mut cut => break Err(format!(
                                "still in flight {CLOSE_GRACE:?} after closing: cut"
                            ).into()),
                        }
                    }
                }
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(format!(
                    "no TLS handshake and first bytes within {HEADER_READ_TIMEOUT:?}"
                )
                .into()),
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "connection: {e}");
            }
            drop((slot, held));
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Each connection gives its slot back once it has closed.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
    let _ = local_slots.acquire_many(MAX_LOCAL_CONNECTIONS as u32).await;
    Ok(())
}

/// Reads what tells HTTP/2 from HTTP/1.1: the HTTP/2 preface whole, or
/// bytes that leave it. hyper's own guess waits for them with no time
/// limit; this one runs under the caller's. The bytes read are given back
/// to whoever reads the stream next.
async fn first_bytes(mut stream: Stream) -> Result<Prefixed, String> {
    let mut read = Vec::with_capacity(H2_PREFACE.len());
    while read.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&read) {
        let mut chunk = [0; H2_PREFACE.len()];
        let wanted = H2_PREFACE.len() - read.len();
        match stream.read(&mut chunk[..wanted]).await {
            Ok(0) => return Err("closed before a request".into()),
            Ok(n) => read.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
    Ok(Prefixed {
        prefix: Bytes::from(read),
        stream,
    })
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Clone, Default)]
struct Activity {
    busy: Arc<AtomicUsize>,
    ended: Arc<Notify>,
}

impl Activity {
    fn begin(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Completes once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            // Made before the count is read, so that an end in between
            // still wakes it.
            let ended = self.ended.notified();
            if self.busy.load(Ordering::SeqCst) != 0 {
                ended.await;
            } else if tokio::time::timeout(idle, ended).await.is_err()
                // A request begun meanwhile that is still going.
                && self.busy.load(Ordering::SeqCst) == 0
            {
                return;
            }
        }
    }
}

/// One request in flight, until dropped.
struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that fails once [`BODY_READ_TIMEOUT`] has passed
/// before its end.
struct Deadline {
    body: hyper::body::Incoming,
    expires: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.expires.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "not whole within {BODY_READ_TIMEOUT:?} of the request's head"
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Connections held per client address.
#[derive(Clone, Default)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerAddress {
    /// One more connection from `ip`, or `None` when it holds its share.
    fn take(&self, ip: IpAddr) -> Option<Held> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), ip))
    }
}

/// A connection counted against its address, until dropped.
struct Held(PerAddress, IpAddr);

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// A client's connection, plain or TLS.
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// A stream whose first bytes were read already and are read again.
struct Prefixed {
    prefix: Bytes,
    stream: Stream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
