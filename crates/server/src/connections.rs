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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// The open connections, counted against their bound. Cloned into the metrics, which read it
/// when scraped.
#[derive(Clone, Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a new connection has to send its first [`GREETING_BYTES`] bytes.
    handshake: Duration,
}

impl ConnectionLimit {
    pub fn new(max: usize, handshake: Duration) -> ConnectionLimit {
        ConnectionLimit { slots: Arc::new(Semaphore::new(max)), max, handshake }
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
                            let conn = Admitted { tcp, _slot: slot, greeting: Some((GREETING_BYTES, deadline)), peer, metrics: metrics.clone() };
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
        let Some((left, deadline)) = &mut this.greeting else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                *left = left.saturating_sub(buf.filled().len() - before);
                if *left == 0 {
                    this.greeting = None;
                }
                Poll::Ready(Ok(()))
            }
            // Waiting for more: the deadline wakes this read if nothing comes in time.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                debug!(client = %this.peer, "connection closed: it sent no HTTP/2 or TLS handshake within server.handshake_timeout_s");
                this.metrics.connection_timed_out();
                // Once: the connection is done with.
                this.greeting = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no handshake within server.handshake_timeout_s",
                )))
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

#[cfg(test)]
mod tests {
    use super::*;

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
