//! The byte budget of requests being received (`server.max_upload_bytes_in_flight`).
//!
//! Why: the queue's memory budget starts at an image's headers, but before a handler sees its
//! request, tonic collects the whole gRPC message (up to `server.max_message_bytes`, 64 MiB),
//! and a `SegmentUpload` call then collects up to `server.max_upload_bytes`. Without a bound, a
//! burst of large requests takes any amount of memory before anything refuses one.
//!
//! How: every Segmenter request's body passes through [`Budgeted`], which reads the 5-byte
//! prefix of each gRPC message as it arrives (a flag and the message's length) and takes that
//! many bytes from the shared [`UploadBudget`] *before* the message's bytes are collected; one
//! that does not fit ends the request with `RESOURCE_EXHAUSTED` (reason `upload_memory`). So a
//! refused request costs at most what HTTP/2 flow control lets a connection send unasked
//! (`server.http2_window_bytes`), and only until it arrives: it is discarded then. The server
//! accepts no compressed messages, so a prefix's length is what its message takes once
//! collected. What a request holds lives in its [`UploadHold`],
//! which the handler finds in the request's extensions: a unary call takes it and keeps it
//! until its image is decoded; `SegmentUpload` adds the image it assembles
//! ([`UploadHold::claim`]) and gives back each message it has copied out
//! ([`UploadHold::consume`]).
//!
//! A request that stops sending before it has been received whole is dropped after
//! `server.request_idle_timeout_s` without a byte (`DEADLINE_EXCEEDED`, reason `stalled`): a
//! client that hangs with its connection open still answers the keepalive pings, and would
//! otherwise hold its share of the budget for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

use crate::connections::peer;
use crate::error::ServiceError;
use crate::metrics::Metrics;

/// The bytes all requests being received may hold together, counted in whole KiB (a semaphore
/// has at most `u32::MAX` permits to a call).
#[derive(Clone)]
pub struct UploadBudget {
    permits: Arc<Semaphore>,
    kib: u32,
}

impl UploadBudget {
    pub fn new(bytes: usize) -> Self {
        let kib = (bytes / 1024).min(Semaphore::MAX_PERMITS).min(u32::MAX as usize) as u32;
        UploadBudget { permits: Arc::new(Semaphore::new(kib as usize)), kib }
    }

    /// Bytes held now, in whole KiB (`s3net_upload_memory_bytes`).
    pub fn held_bytes(&self) -> u64 {
        (u64::from(self.kib) - self.permits.available_permits() as u64) * 1024
    }

    /// The budget, in whole KiB.
    pub fn limit_bytes(&self) -> u64 {
        u64::from(self.kib) * 1024
    }

    /// Raises what `held` holds to `bytes` (never lowers it), or refuses without taking any.
    fn raise(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> Result<(), ServiceError> {
        let want = bytes.div_ceil(1024).min(u32::MAX as usize) as u32;
        let have = held.as_ref().map_or(0, |h| h.num_permits()) as u32;
        let Some(kib) = want.checked_sub(have).filter(|&k| k > 0) else { return Ok(()) };
        match self.permits.clone().try_acquire_many_owned(kib) {
            Ok(p) => {
                match held {
                    Some(h) => h.merge(p),
                    None => *held = Some(p),
                }
                Ok(())
            }
            Err(_) => Err(ServiceError::UploadsFull {
                need_bytes: u64::from(kib) * 1024,
                held_bytes: self.held_bytes(),
                budget_bytes: self.limit_bytes(),
                retry_after_s: 1,
            }),
        }
    }
}

/// What one request holds of the [`UploadBudget`]: the most it has needed so far, where it
/// needs the image its handler assembles (`claim`) plus the message bytes received and not yet
/// copied out (`received - consumed`). Shared by the request's body and its handler; given
/// back when the last of them lets go (or at [`UploadHold::take`]'s permit's drop).
#[derive(Clone)]
pub struct UploadHold(Arc<Mutex<HoldState>>);

struct HoldState {
    budget: UploadBudget,
    permit: Option<OwnedSemaphorePermit>,
    claim: usize,
    received: usize,
    consumed: usize,
}

impl HoldState {
    fn raise(&mut self) -> Result<(), ServiceError> {
        let need = self.claim.saturating_add(self.received.saturating_sub(self.consumed));
        self.budget.raise(&mut self.permit, need)
    }
}

impl UploadHold {
    pub fn new(budget: UploadBudget) -> Self {
        UploadHold(Arc::new(Mutex::new(HoldState { budget, permit: None, claim: 0, received: 0, consumed: 0 })))
    }

    fn state(&self) -> MutexGuard<'_, HoldState> {
        // A panic elsewhere while holding it leaves plain numbers behind: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message of `len` bytes has begun to arrive: hold it too, or refuse the request.
    pub fn receive(&self, len: usize) -> Result<(), ServiceError> {
        let mut s = self.state();
        s.received = s.received.saturating_add(len);
        s.raise()
    }

    /// The handler has copied a message of `len` bytes (its encoded length) out of tonic's
    /// buffer: those bytes are counted in its claim from now on.
    pub fn consume(&self, len: usize) {
        let mut s = self.state();
        s.consumed = s.consumed.saturating_add(len);
    }

    /// The handler holds `bytes` of its own (an upload's announced size, or what it has
    /// assembled so far): hold them, or refuse the request.
    pub fn claim(&self, bytes: usize) -> Result<(), ServiceError> {
        let mut s = self.state();
        s.claim = bytes;
        s.raise()
    }

    /// Takes what the request holds, for a unary handler to keep until its image is decoded.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.state().permit.take()
    }
}

/// A Segmenter service whose request bodies are charged to an [`UploadBudget`] as they arrive
/// (see the module's doc). Each request gets its own [`UploadHold`] in its extensions.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    rules: Arc<Rules>,
}

/// What every request body of a [`Budgeted`] service is held to; one per service.
struct Rules {
    budget: UploadBudget,
    metrics: Arc<Metrics>,
    /// How long a body may send nothing before it ends; `None`: for ever.
    idle: Option<Duration>,
    /// The largest message the service decodes.
    max_message: usize,
}

impl<S> Budgeted<S> {
    /// `max_message`: the largest message the service decodes (`server.max_message_bytes`);
    /// a longer one is refused at its prefix, as INVALID_ARGUMENT, before the budget is asked.
    /// `idle`: a request whose body sends nothing for that long before it ends is dropped
    /// (see the module's doc); `None` waits for ever.
    pub fn new(inner: S, budget: UploadBudget, metrics: Arc<Metrics>, max_message: usize, idle: Option<Duration>) -> Self {
        Budgeted { inner, rules: Arc::new(Rules { budget, metrics, idle, max_message }) }
    }
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower_service::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let hold = UploadHold::new(self.rules.budget.clone());
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(hold.clone());
        // The caller, for the log line of a refusal, which comes before any RPC span exists
        // (the URI's clone shares its bytes).
        let caller = (parts.uri.clone(), peer(&parts.extensions));
        let body = Body::new(ChargedBody::new(body, hold, self.rules.clone(), caller));
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// A request body that charges each gRPC message's length to its [`UploadHold`] when the
/// message's 5-byte prefix has arrived, before tonic collects the message.
struct ChargedBody {
    inner: Body,
    hold: UploadHold,
    rules: Arc<Rules>,
    /// The request's URI and the client's address, for the log.
    caller: (http::Uri, Option<std::net::SocketAddr>),
    /// The prefix read so far (it may be split across frames).
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    left: usize,
    /// When the body's silence runs out: set when it starts waiting (one timer per body, reset
    /// for each wait), cleared when a frame arrives.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl ChargedBody {
    fn new(inner: Body, hold: UploadHold, rules: Arc<Rules>, caller: (http::Uri, Option<std::net::SocketAddr>)) -> Self {
        ChargedBody { inner, hold, rules, caller, prefix: [0; 5], prefix_len: 0, left: 0, stall: None, waiting: false }
    }

    /// Counts and turns a refusal into the status that ends the request.
    fn refuse(&self, e: ServiceError) -> Status {
        self.rules.metrics.rejected(e.reason());
        let (uri, peer) = &self.caller;
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::info!(method = uri.path(), client = %peer, reason = e.reason(), "request refused while it arrived: {e}");
        e.into()
    }

    /// Whether the body has now been silent for the idle limit, arming the timer when a wait
    /// begins.
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let idle = self.rules.idle?;
        if !self.waiting {
            self.waiting = true;
            let until = tokio::time::Instant::now() + idle;
            match &mut self.stall {
                Some(s) => s.as_mut().reset(until),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(until))),
            }
        }
        let stall = self.stall.as_mut()?;
        stall.as_mut().poll(cx).is_ready().then_some(idle)
    }

    /// Walks one frame's bytes through the message framing, charging each new message.
    fn charge(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]) as usize;
                self.left = len;
                let limit = self.rules.max_message;
                if len > limit {
                    return Err(self.refuse(ServiceError::MessageTooLarge { bytes: len as u64, limit: limit as u64 }));
                }
                if let Err(e) = self.hold.receive(len) {
                    return Err(self.refuse(e));
                }
            }
        }
        Ok(())
    }
}

impl HttpBody for ChargedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) else {
            if let Some(idle) = this.silent_too_long(cx) {
                this.waiting = false;
                return Poll::Ready(Some(Err(this.refuse(ServiceError::Stalled { idle_s: idle.as_secs() }))));
            }
            return Poll::Pending;
        };
        // Something arrived: the next wait starts now.
        this.waiting = false;
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                if let Err(status) = this.charge(data) {
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
        Poll::Ready(frame)
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

    fn framed(messages: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for &len in messages {
            out.push(0);
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, len));
        }
        out
    }

    fn rules(budget: &UploadBudget, idle: Option<Duration>) -> Arc<Rules> {
        Arc::new(Rules { budget: budget.clone(), metrics: Arc::new(Metrics::new(4, &[])), idle, max_message: usize::MAX })
    }

    fn caller() -> (http::Uri, Option<std::net::SocketAddr>) {
        (http::Uri::from_static("/s3net.v1.Segmenter/Segment"), None)
    }

    fn body(budget: &UploadBudget) -> ChargedBody {
        ChargedBody::new(Body::empty(), UploadHold::new(budget.clone()), rules(budget, None), caller())
    }

    /// Messages are charged at their prefix, wherever the frames cut them.
    #[test]
    fn prefixes_split_across_frames_are_charged() {
        let bytes = framed(&[3000, 0, 5000]);
        for cut in [1usize, 2, 4, 5, 6, 3004, 3005, 3007, 3009, 3010, 4000] {
            let budget = UploadBudget::new(1 << 20);
            let mut b = body(&budget);
            b.charge(&bytes[..cut]).unwrap();
            let first = if cut >= 5 { 3000usize.div_ceil(1024) * 1024 } else { 0 };
            let expect = if cut >= 3015 { 8000usize.div_ceil(1024) * 1024 } else { first };
            assert_eq!(budget.held_bytes(), expect as u64, "after {cut} bytes");
            b.charge(&bytes[cut..]).unwrap();
            assert_eq!(budget.held_bytes(), 8192, "cut at {cut}");
            drop(b);
            assert_eq!(budget.held_bytes(), 0, "given back with the body");
        }
    }

    /// A body that keeps sending is never stalled, however long it takes in all; one that stops
    /// is ended with DEADLINE_EXCEEDED after `idle`, and what it held is given back.
    #[tokio::test]
    async fn a_body_that_stops_sending_is_ended() {
        use http_body_util::BodyExt;
        let budget = UploadBudget::new(1 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, Status>>(4);
        let inner = Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let mut body = ChargedBody::new(inner, UploadHold::new(budget.clone()), rules(&budget, Some(Duration::from_millis(500))), caller());
        let bytes = framed(&[4000]);
        let feeder = tokio::spawn(async move {
            for piece in bytes.chunks(500) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(Ok(Frame::data(bytes::Bytes::copy_from_slice(piece)))).await.unwrap();
            }
            // Then nothing more, and the stream stays open.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        let started = std::time::Instant::now();
        let mut got = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got += f.into_data().map_or(0, |d| d.len()),
                Some(Err(e)) => break e,
                None => panic!("ended without an error"),
            }
        };
        assert_eq!(got, 4005, "every frame sent was passed on");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.message().starts_with("no bytes of the request arrived for 0 s"), "{}", err.message());
        assert!(started.elapsed() >= Duration::from_millis(1300), "{:?}", started.elapsed());
        assert_eq!(budget.held_bytes(), 4096, "held until the body is dropped");
        drop(body);
        assert_eq!(budget.held_bytes(), 0);
        feeder.abort();
    }

    /// A message that does not fit is refused at its prefix and nothing more is taken; the
    /// handler's claim and what it copies out count as the module's doc says.
    #[test]
    fn refusal_and_claims() {
        let budget = UploadBudget::new(10 << 10);
        let mut a = body(&budget);
        a.charge(&framed(&[6 << 10])[..5]).unwrap();
        let mut b = body(&budget);
        let e = b.charge(&framed(&[5 << 10])[..5]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().starts_with("uploads in progress hold 6 KiB of the 10 KiB the server allows (server.max_upload_bytes_in_flight), and this one needs 5 KiB more"), "{}", e.message());
        assert_eq!(budget.held_bytes(), 6 << 10);

        let hold = UploadHold::new(budget.clone());
        hold.receive(1000).unwrap();
        hold.claim(2048).unwrap(); // 2048 + 1000 -> 3 KiB
        assert_eq!(budget.held_bytes(), 9 << 10);
        hold.consume(1000);
        hold.claim(3072).unwrap(); // 3 KiB: no more
        assert_eq!(budget.held_bytes(), 9 << 10);
        assert!(hold.receive(1025).is_err(), "3 KiB + 1025 B needs 5 KiB, 4 are left");
        let permit = hold.take().expect("held");
        assert_eq!(permit.num_permits(), 3);
        drop((a, hold));
        assert_eq!(budget.held_bytes(), 3 << 10);
        drop(permit);
        assert_eq!(budget.held_bytes(), 0);
    }
}
