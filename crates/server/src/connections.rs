//! The server's accept loop: at most `server.max_connections` open at once.
//!
//! Why a bound: every connection may hold memory the byte budget of requests
//! ([`crate::uploads`]) never sees — up to its HTTP/2 window of data the server has not read
//! yet (`server.http2_window_bytes`), and a few KiB for each of its open streams — so without one a client that
//! opens connections in a loop grows the server until the kernel kills it, jobs and all. A
//! connection beyond the bound is closed as soon as it is accepted: its client gets
//! UNAVAILABLE at once, which gRPC clients retry with backoff, instead of hanging in the
//! kernel's backlog until its deadline. Operators see `s3net_connections` against
//! `s3net_connections_limit`, `s3net_connections_refused_total`, and a warning in the log
//! (at most one every [`WARN_EVERY`], counting the ones it did not log).
//!
//! A bound on connections makes idle ones a way to shut others out, so a connection must also
//! say something within `server.handshake_timeout_s`: its first [`GREETING_BYTES`] bytes (an
//! HTTP/2 client's connection preface; a TLS client's ClientHello is longer, and tonic's TLS
//! handshake has the same timeout). A port scanner's or a stuck client's silent socket is
//! closed then, instead of holding its place for ever.
//!
//! Nor may a connection hold its place for ever once it has said hello: one with no call open
//! for `server.max_connection_idle_s` is closed (its client connects again for its next call,
//! as gRPC clients do on their own). HTTP/2 pings keep an idle connection alive, so the clock
//! counts calls, not bytes: each call is counted open on its connection ([`Tracked`], by the
//! client's address, which no two open connections share) until its response has been sent
//! or dropped, and the connection's reader, woken when its last call ends, closes it once the
//! time is up. Never within [`READ_GRACE`] of its last bytes: a call whose first bytes have
//! been read may not have reached its handler, and so its count, yet.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::server::NamedService;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// The shortest time between two warnings about refused connections (or failed accepts).
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a connection must have sent within the handshake timeout: the length of HTTP/2's
/// connection preface, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".
pub const GREETING_BYTES: usize = 24;

/// How long the accept loop pauses after an error that is not about one connection (out of
/// file descriptors, say): accepting again at once would spin on the same error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How long after a connection's last bytes arrived it is not closed for idleness, whatever
/// its calls: a call whose first bytes were read may not have reached its handler yet (hyper
/// runs it on a task of its own, which counts it when first polled: microseconds later, or a
/// few milliseconds on a loaded machine). Short, since every byte restarts it, a keepalive
/// ping's answer too (server pings are at least a second apart).
pub const READ_GRACE: Duration = Duration::from_millis(250);

/// The open connections, counted against their bound. Cloned into the metrics, which read it
/// when scraped.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a new connection has to send its first [`GREETING_BYTES`] bytes.
    handshake: Duration,
    /// How long a connection may have no call open (None: for ever).
    idle: Option<Duration>,
    /// Each open connection's calls, by the client's address.
    live: Live,
}

/// Each open connection's [`Activity`], by the client's address (no two open connections share
/// one).
type Live = Arc<Mutex<HashMap<SocketAddr, Arc<Activity>>>>;

/// What a connection's reader and its calls share.
#[derive(Debug)]
struct Activity {
    /// Calls open now.
    open: AtomicUsize,
    /// When the last call ended (or the connection opened).
    idle_since: Mutex<Instant>,
    /// The reader, to wake when the last call ends: it then starts the idle clock.
    reader: Mutex<Option<Waker>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A call counted open on its connection until this is dropped (with the call's response).
#[derive(Debug)]
pub struct OpenCall(Arc<Activity>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        // The time first: a reader that sees no call open must see when the last one ended,
        // not a time from before it (which could close the connection under the response's
        // last frames).
        *lock(&self.0.idle_since) = Instant::now();
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(reader) = lock(&self.0.reader).take() {
                reader.wake();
            }
        }
    }
}

impl ConnectionLimit {
    pub fn new(max: usize, handshake: Duration) -> ConnectionLimit {
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            handshake,
            idle: None,
            live: Arc::default(),
        }
    }

    /// Closes connections with no call open for `idle` (`server.max_connection_idle_s`; None:
    /// never). Calls are counted only on services wrapped in [`Tracked`].
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> ConnectionLimit {
        self.idle = idle;
        self
    }

    /// Counts a call open on the connection from `peer` until the returned value is dropped;
    /// None when no idle timeout is set or the connection is not (or no longer) known.
    pub fn call_opened(&self, peer: SocketAddr) -> Option<OpenCall> {
        self.idle?;
        let activity = lock(&self.live).get(&peer)?.clone();
        activity.open.fetch_add(1, Ordering::AcqRel);
        Some(OpenCall(activity))
    }

    /// `server.max_connections`.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// An accepted connection, holding its place under the bound until it is dropped (when the
/// server is done with it, whichever side closed it).
pub struct Admitted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the connection has sent its first bytes: how many more, and by when.
    greeting: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    /// With an idle timeout: the timeout, its clock, the calls it watches, when bytes last
    /// arrived, and where this connection is listed (left when it is dropped).
    idle: Option<IdleClock>,
}

struct IdleClock {
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    activity: Arc<Activity>,
    last_read: Instant,
    live: Live,
}

impl IdleClock {
    fn new(timeout: Duration, peer: SocketAddr, live: &Live) -> IdleClock {
        let now = Instant::now();
        let activity = Arc::new(Activity { open: AtomicUsize::new(0), idle_since: Mutex::new(now), reader: Mutex::new(None) });
        lock(live).insert(peer, activity.clone());
        IdleClock {
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            activity,
            last_read: now,
            live: live.clone(),
        }
    }

    /// Whether the connection has had no call open for its timeout (and no bytes for
    /// [`READ_GRACE`]); else arranges to be polled again when that may have changed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        // Registered before the count is read: a call ending after the read wakes this.
        *lock(&self.activity.reader) = Some(cx.waker().clone());
        if self.activity.open.load(Ordering::Acquire) > 0 {
            return false;
        }
        let since = *lock(&self.activity.idle_since);
        let deadline = tokio::time::Instant::from_std((since + self.timeout).max(self.last_read + READ_GRACE));
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl Drop for IdleClock {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        // Only its own entry: a new connection from the same address may have replaced it.
        live.retain(|_, a| !Arc::ptr_eq(a, &self.activity));
    }
}

/// [`incoming`]'s connections through the TLS handshake of `tls` (the configuration in force
/// when each arrives, see [`crate::tls`]), many at once so that a slow client holds up no
/// other: the TLS streams as their handshakes finish. A handshake that fails or times out
/// drops its connection, and with it its place under `server.max_connections`; it is counted
/// by its [`HandshakeFailure`] (`s3net_tls_handshakes_failed_total`), and one a client's
/// or this server's certificate caused is logged as a warning (each reason at most once per
/// [`WARN_EVERY`]): the client sees a failed connection, and nothing else on this side would.
pub fn tls_incoming(
    plain: impl Stream<Item = io::Result<Admitted>> + Send + 'static,
    tls: Arc<crate::tls::ServerTls>,
) -> impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<Admitted>>> + Send + 'static {
    type Done = (SocketAddr, Arc<Metrics>, io::Result<tokio_rustls::server::TlsStream<Admitted>>);
    type Handshake = Pin<Box<dyn Future<Output = Done> + Send>>;
    let plain: Pin<Box<dyn Stream<Item = io::Result<Admitted>> + Send>> = Box::pin(plain);
    let handshakes: futures_util::stream::FuturesUnordered<Handshake> = futures_util::stream::FuturesUnordered::new();
    let state = (plain, tls, handshakes, false, HandshakeWarnings::default());
    futures_util::stream::unfold(state, |(mut plain, tls, mut handshakes, mut ended, mut warnings)| async move {
        use futures_util::StreamExt;
        loop {
            tokio::select! {
                next = plain.next(), if !ended => match next {
                    Some(Ok(conn)) => {
                        let (tls, peer, metrics) = (tls.clone(), conn.peer, conn.metrics.clone());
                        handshakes.push(Box::pin(async move { (peer, metrics, tls.accept(conn).await) }));
                    }
                    Some(Err(e)) => return Some((Err(e), (plain, tls, handshakes, ended, warnings))),
                    None => ended = true,
                },
                Some((peer, metrics, done)) = handshakes.next(), if !handshakes.is_empty() => match done {
                    Ok(stream) => return Some((Ok(stream), (plain, tls, handshakes, ended, warnings))),
                    Err(e) => {
                        let failure = handshake_failure(&e);
                        metrics.tls_handshake_failed(failure);
                        warnings.failed(failure, peer, &e);
                    }
                },
                else => return None,
            }
        }
    })
}

/// Why a TLS handshake failed: `s3net_tls_handshakes_failed_total`'s `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// None sent where `server.tls.client_ca` requires one, or one it does not vouch for.
    ClientCertificate,
    /// The client sent an alert: it refused this server's certificate.
    RejectedByClient,
    /// What came was not a TLS handshake this server speaks.
    Protocol,
    /// The client hung up.
    Closed,
    /// Not done within `server.handshake_timeout_s`.
    Timeout,
}

impl HandshakeFailure {
    /// Every reason, each exported from the start on a server with TLS.
    pub const ALL: [HandshakeFailure; 5] = [Self::ClientCertificate, Self::RejectedByClient, Self::Protocol, Self::Closed, Self::Timeout];

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientCertificate => "client_certificate",
            Self::RejectedByClient => "rejected_by_client",
            Self::Protocol => "protocol",
            Self::Closed => "closed",
            Self::Timeout => "timeout",
        }
    }
}

/// Why the handshake that ended in `e` failed, from what tokio-rustls hands back: rustls's
/// error inside the I/O error, the socket's own errors, or [`crate::tls`]'s timeout.
pub fn handshake_failure(e: &io::Error) -> HandshakeFailure {
    if e.kind() == io::ErrorKind::TimedOut {
        return HandshakeFailure::Timeout;
    }
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)) => HandshakeFailure::ClientCertificate,
        Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::RejectedByClient,
        Some(_) => HandshakeFailure::Protocol,
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        ) =>
        {
            HandshakeFailure::Closed
        }
        None => HandshakeFailure::Protocol,
    }
}

/// The TLS handshakes' warnings: the failures a certificate caused, each reason at most once
/// per [`WARN_EVERY`] (a client retrying with an expired certificate would otherwise log at
/// its retry rate); the others at debug level (port scanners, clients hanging up).
#[derive(Default)]
struct HandshakeWarnings {
    client_certificate: Quiet,
    rejected_by_client: Quiet,
}

impl HandshakeWarnings {
    fn failed(&mut self, failure: HandshakeFailure, peer: SocketAddr, e: &io::Error) {
        let reason = failure.label();
        let (quiet, what) = match failure {
            HandshakeFailure::ClientCertificate => (&mut self.client_certificate, "the client's certificate was refused"),
            HandshakeFailure::RejectedByClient => (&mut self.rejected_by_client, "the client refused this server's certificate"),
            HandshakeFailure::Protocol | HandshakeFailure::Closed | HandshakeFailure::Timeout => {
                debug!(client.address = %peer.ip(), client.port = peer.port(), reason, "TLS handshake failed: {e}");
                return;
            }
        };
        if let Some(unlogged) = quiet.tick() {
            warn!(client.address = %peer.ip(), client.port = peer.port(), reason, unlogged, "TLS handshake failed: {what}: {e}");
        }
    }
}

/// Accepts connections from `listener` for as long as the stream is polled, admitting each one
/// that finds room under `limit` and closing the others (see the module's doc). Errors of
/// `accept` itself are logged and never end the stream.
pub fn incoming(
    listener: TcpListener,
    limit: ConnectionLimit,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<Admitted>> + Send + 'static {
    let warnings = Warnings::default();
    futures_util::stream::unfold(
        (listener, limit, metrics, warnings),
        |(listener, limit, metrics, mut warnings)| async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => match limit.slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            // As tonic's own listener does: a gRPC message or event goes out
                            // when it is written, not after the previous one's ACK.
                            let _ = tcp.set_nodelay(true);
                            let deadline = Box::pin(tokio::time::sleep(limit.handshake));
                            let idle = limit.idle.map(|t| IdleClock::new(t, peer, &limit.live));
                            let conn = Admitted {
                                tcp,
                                _slot: slot,
                                greeting: Some((GREETING_BYTES, deadline)),
                                peer,
                                metrics: metrics.clone(),
                                idle,
                            };
                            return Some((Ok(conn), (listener, limit, metrics, warnings)));
                        }
                        Err(_) => {
                            drop(tcp);
                            metrics.connection_refused();
                            warnings.refused(peer, limit.max);
                        }
                    },
                    Err(e) => {
                        if !about_one_connection(&e) {
                            warnings.accept_failed(&e);
                            accept_pause().await;
                        }
                    }
                }
            }
        },
    )
}

/// Whether an error of `accept` concerns only the connection it was accepting (which the
/// peer gave up on): the next `accept` may succeed at once. Any other (out of file
/// descriptors, of memory) would come back at once, so an accept loop pauses
/// [`accept_pause`] after it instead of spinning on it.
pub fn about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}

/// See [`about_one_connection`].
pub async fn accept_pause() {
    tokio::time::sleep(ACCEPT_PAUSE).await;
}

/// The accept loop's warnings, each kind at most once per [`WARN_EVERY`] (owned by the one
/// task that accepts).
#[derive(Default)]
struct Warnings {
    refused: Quiet,
    failed: Quiet,
}

/// When a warning was last logged, and how many were not logged since.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    unlogged: u64,
}

impl Quiet {
    /// Whether to log now, and how many went unlogged before this one.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl Warnings {
    fn refused(&mut self, peer: SocketAddr, max: usize) {
        if let Some(unlogged) = self.refused.tick() {
            warn!(
                client.address = %peer.ip(),
                client.port = peer.port(),
                max_connections = max,
                refused_unlogged = unlogged,
                "connection refused: server.max_connections are open"
            );
        }
    }

    fn accept_failed(&mut self, e: &io::Error) {
        if let Some(unlogged) = self.failed.tick() {
            warn!(error = %e, failed_unlogged = unlogged, "cannot accept connections");
        }
    }
}

impl Connected for Admitted {
    // The same as a plain listener's, so that `Request::remote_addr` (the RPC spans' client
    // address) finds it, with or without TLS.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if let Some(clock) = &mut this.idle {
                    if got > 0 {
                        clock.last_read = Instant::now();
                    }
                }
                if let Some((left, _)) = &mut this.greeting {
                    *left = left.saturating_sub(got);
                    if *left == 0 {
                        this.greeting = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if let Some((_, deadline)) = &mut this.greeting {
                    // Waiting for more: the deadline wakes this read if nothing comes in time.
                    if deadline.as_mut().poll(cx).is_ready() {
                        debug!(client = %this.peer, "connection closed: it sent no HTTP/2 or TLS handshake within server.handshake_timeout_s");
                        this.metrics.connection_timed_out();
                        // Once: the connection is done with.
                        this.greeting = None;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no handshake within server.handshake_timeout_s",
                        )));
                    }
                    return Poll::Pending;
                }
                if let Some(clock) = &mut this.idle {
                    if clock.expired(cx) {
                        debug!(client = %this.peer, "connection closed: no call on it for server.max_connection_idle_s");
                        this.metrics.connection_idle_closed();
                        // Once: the end of its input, which closes the connection.
                        this.idle = None;
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The client's address, from tonic's connection info (plain TCP, or TCP under TLS).
pub(crate) fn peer(ext: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|t| t.get_ref().remote_addr()))
}

/// A service whose calls count as open on their connection (see the module's doc) from the
/// moment the service is called until their response has been sent or dropped.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    limit: ConnectionLimit,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, limit: ConnectionLimit) -> Self {
        Tracked { inner, limit }
    }
}

impl<S: NamedService> NamedService for Tracked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<Body>> for Tracked<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let open = peer(req.extensions()).and_then(|p| self.limit.call_opened(p));
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(match open {
                // Boxed first: tonic's body is Unpin, whatever the inner service's.
                Some(open) => response.map(|body| Body::new(CountedBody { inner: Body::new(body), _open: open })),
                None => response.map(Body::new),
            })
        })
    }
}

/// A response body that keeps its call counted open until it is dropped.
struct CountedBody {
    inner: Body,
    _open: OpenCall,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons come from what tokio-rustls hands back: rustls's error inside an
    /// `InvalidData` I/O error, the socket's own errors, or the handshake timeout's.
    #[test]
    fn handshake_failures_are_told_apart() {
        use rustls::{AlertDescription, CertificateError, Error as Tls};
        let tls = |e: Tls| io::Error::new(io::ErrorKind::InvalidData, e);
        let reason = |e: &io::Error| handshake_failure(e).label();
        assert_eq!(reason(&tls(Tls::NoCertificatesPresented)), "client_certificate");
        assert_eq!(reason(&tls(Tls::InvalidCertificate(CertificateError::Expired))), "client_certificate");
        assert_eq!(reason(&tls(Tls::InvalidCertificate(CertificateError::UnknownIssuer))), "client_certificate");
        assert_eq!(reason(&tls(Tls::AlertReceived(AlertDescription::UnknownCA))), "rejected_by_client");
        assert_eq!(reason(&tls(Tls::AlertReceived(AlertDescription::CertificateExpired))), "rejected_by_client");
        assert_eq!(reason(&tls(Tls::InvalidMessage(rustls::InvalidMessage::InvalidContentType))), "protocol");
        assert_eq!(reason(&io::Error::from(io::ErrorKind::UnexpectedEof)), "closed");
        assert_eq!(reason(&io::Error::from(io::ErrorKind::ConnectionReset)), "closed");
        assert_eq!(reason(&io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")), "timeout");
        assert_eq!(reason(&io::Error::other("something else")), "protocol");
        let labels: Vec<&str> = HandshakeFailure::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(labels, ["client_certificate", "rejected_by_client", "protocol", "closed", "timeout"]);
    }

    #[test]
    fn quiet_logs_once_per_period_and_counts_the_rest() {
        let mut q = Quiet::default();
        assert_eq!(q.tick(), Some(0));
        assert_eq!(q.tick(), None);
        assert_eq!(q.tick(), None);
        q.last = Some(Instant::now() - WARN_EVERY);
        assert_eq!(q.tick(), Some(2));
        assert_eq!(q.tick(), None);
    }
}
