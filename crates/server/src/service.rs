//! The `s3net.v1.Segmenter` RPCs: request checking, decoding, and event streams over a
//! [`JobQueue`]. No fitting happens here; the workers do it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use s3net_imaging::{DecodeOptions, Format, Header, Window};
use s3net_model::{DeviceSpec, FitOptions, Preset};
use sha2::Digest;
use prost::Message as _;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn, Instrument};

use crate::callers::Caller;
use crate::cluster::{self, Cluster};
use crate::config::DefaultsConfig;
use crate::error::ServiceError;
use crate::jobs::{is_outcome, DicomOutputs, InputSummary, JobQueue, NewJob, Submitted, Watch};
use crate::metrics::Metrics;
use crate::pb::{self, job_event::Event, segmenter_client::SegmenterClient, segmenter_server::Segmenter, JobState};
use crate::telemetry::{record_status, TraceContext};
use crate::uploads::{UploadBudget, UploadHold};

/// The span of one Segmenter RPC: named `s3net.v1.Segmenter/<Method>` for OpenTelemetry, with
/// the caller's `traceparent` as its parent and the gRPC semantic-convention attributes, the
/// client's address among them (on every log line of the call: who sent what was refused).
/// Extra fields (`job_id`, `bytes`) follow the request.
macro_rules! rpc_span {
    ($method:literal, $req:expr $(, $($fields:tt)*)?) => {{
        let span = tracing::info_span!(
            "rpc",
            otel.name = concat!("s3net.v1.Segmenter/", $method),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
            client.address = tracing::field::Empty,
            client.port = tracing::field::Empty,
            caller = tracing::field::Empty,
            $($($fields)*)?
        );
        if let Some(c) = $req.extensions().get::<crate::callers::Caller>().filter(|c| !c.name.is_empty()) {
            span.record("caller", &*c.name);
        }
        if let Some(peer) = $req.remote_addr() {
            span.record("client.address", peer.ip().to_string());
            span.record("client.port", i64::from(peer.port()));
        }
        crate::telemetry::set_remote_parent(&span, $req.metadata());
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.set_attribute("rpc.system", "grpc");
            span.set_attribute("rpc.service", "s3net.v1.Segmenter");
            span.set_attribute("rpc.method", $method);
        }
        span
    }};
}

/// A stream of job events as tonic sends it.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

/// The Segmenter service: validates and decodes requests, queues jobs, streams their events.
pub struct SegmenterService {
    queue: Arc<dyn JobQueue>,
    /// The devices the workers run on: a job asking for another one is refused up front.
    devices: Vec<DeviceSpec>,
    max_upload_bytes: usize,
    /// The bytes requests may hold together while they are received and until their images
    /// are decoded (see [`Self::with_upload_budget`]).
    uploads: UploadBudget,
    metrics: Arc<Metrics>,
    /// The most host memory one job may need on a CPU worker (see [`Self::with_cpu_job_bytes`]).
    cpu_job_bytes: Option<u64>,
    /// The largest message sent (see [`Self::with_max_message_bytes`]).
    max_message_bytes: Option<usize>,
    /// Fit options for the fields a request leaves unset (see [`Self::with_defaults`]).
    defaults: DefaultsConfig,
    /// The other replicas, to which calls about their jobs go (see [`Self::with_cluster`]).
    cluster: Option<Arc<Cluster>>,
    /// Becomes true when the server stops: the streams it relays from other replicas end.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// A request checked by [`SegmenterService::admit`], its image not yet decoded.
struct Admitted {
    image: Vec<u8>,
    o: pb::Options,
    fit: FitOptions,
    device: DeviceSpec,
    window: Option<Window>,
    idempotency: Option<(String, [u8; 32])>,
    /// The image's size and type from its headers (`s3net_imaging::probe`).
    header: Header,
}

impl SegmenterService {
    pub fn new(
        queue: Arc<dyn JobQueue>,
        devices: Vec<DeviceSpec>,
        max_upload_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        SegmenterService {
            queue,
            devices,
            max_upload_bytes,
            uploads: UploadBudget::new(4 * max_upload_bytes),
            metrics,
            cpu_job_bytes: None,
            max_message_bytes: None,
            defaults: DefaultsConfig::default(),
            cluster: None,
            stopping: tokio::sync::watch::channel(false).1,
        }
    }

    /// Forwards `WatchJob`, `GetJob` and `CancelJob` calls about another replica's job to it
    /// (`crate::cluster`; the queue's ids must carry this cluster's suffix).
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.cluster = cluster;
        self.stopping = stopping;
        self
    }

    /// Forwards `method`'s call about `about` ("job '…'") to the replica `to` names (`message`, the
    /// caller's remaining `deadline`, the `caller` it is made for), counts it, and records it on
    /// the call's `span`.
    #[allow(clippy::too_many_arguments)]
    async fn forward<M, R, F, Fut>(
        &self,
        span: &tracing::Span,
        method: &'static str,
        (cluster, owner): (&Cluster, std::net::SocketAddr),
        about: &str,
        (message, caller): (M, &Caller),
        deadline: Option<Duration>,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(SegmenterClient<tonic::transport::Channel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        span.record("forwarded_to", owner.to_string());
        let r = async {
            let c = cluster.client(owner, about).await.map_err(Status::from)?;
            call(c, cluster.request(message, deadline, caller)).await.map_err(|s| cluster::failure(owner, about, s))
        }
        .instrument(span.clone())
        .await;
        forwarded(span, &self.metrics, method, r)
    }

    /// The job another replica holds for idempotency key `key` and a request of `fingerprint`
    /// (`Relayed` ALREADY_EXISTS when it holds one for another request), asked of every other
    /// replica at once ([`cluster::KEY_LOOKUP`]); `None` when none holds it. A replica that
    /// does not answer in time is passed over, with a warning: its share of the keys is
    /// rarely the one asked about, and a submission is not refused for it.
    async fn find_key_elsewhere(
        &self,
        c: &Cluster,
        (key, caller): (&str, &Caller),
        fingerprint: &[u8; 32],
        deadline: Option<Duration>,
        span: &tracing::Span,
    ) -> Result<Option<Submitted>, ServiceError> {
        // Within half of what is left of the caller's deadline (the other half is the
        // decode's and the queue's), and at most a few seconds.
        let wait = Some(deadline.map_or(KEY_WAIT, |d| d.mul_f64(0.5).min(KEY_WAIT)));
        let about = format!("the job of idempotency key '{key}'");
        let calls = c.others().await.into_iter().map(|addr| {
            let m = pb::SubmitJobRequest { image: Vec::new(), options: None, idempotency_key: key.to_string() };
            let about = &about;
            async move {
                let ask = |mut cl: SegmenterClient<tonic::transport::Channel>, mut q: Request<pb::SubmitJobRequest>| async move {
                    Cluster::ask_for_key(&mut q, fingerprint);
                    cl.submit_job(q).await
                };
                (addr, self.forward(span, "KeyLookup", (c, addr), about, (m, caller), wait, ask).await)
            }
        });
        let mut found = None;
        for (addr, out) in futures_util::future::join_all(calls).await {
            match out {
                Ok(r) => {
                    let r = r.into_inner();
                    let state = JobState::try_from(r.state).unwrap_or(JobState::Unspecified);
                    // Two replicas holding one key (each queued it while the other could
                    // not be asked): the same one every time.
                    if found.as_ref().is_none_or(|f: &Submitted| r.job_id < f.id) {
                        found = Some(Submitted { id: r.job_id, existing: true, state, position: r.queue_position });
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Err(ServiceError::Relayed(s)),
                Err(s) => span.in_scope(|| {
                    warn!(replica = %addr, code = ?s.code(), error = s.message(), "cannot tell whether this replica holds the idempotency key's job; queued here unless another does")
                }),
            }
        }
        Ok(found)
    }

    /// Refuses a call of `caller` about job `id` when the job is another caller's and `caller`
    /// is no operator (see `crate::callers`): counted and logged as a refusal, in `span`. An id
    /// this queue does not know passes, for the queue to answer NOT_FOUND or expired.
    fn check_owner(&self, span: &tracing::Span, caller: &Caller, id: &str) -> Result<(), Status> {
        match self.queue.owner(id) {
            Some(owner) if !caller.may_see(&owner) => {
                let status = self.refuse(span, ServiceError::PermissionDenied(id.to_string()));
                record_status(span, &status);
                Err(status)
            }
            _ => Ok(()),
        }
    }

    /// The cluster and the replica that holds job `id`, when that is another one.
    fn elsewhere(&self, id: &str, meta: &tonic::metadata::MetadataMap) -> Option<(&Cluster, std::net::SocketAddr)> {
        let c = self.cluster.as_deref()?;
        c.elsewhere(id, meta).map(|owner| (c, owner))
    }

    /// The budget this service's requests share with the [`Budgeted`] wrapper that charges
    /// their bodies as they arrive (`server.max_upload_bytes_in_flight`). Why: see
    /// [`crate::uploads`]. Without the wrapper (the service served bare), unary requests hold
    /// nothing until their handler runs, and a `SegmentUpload` holds its image.
    ///
    /// [`Budgeted`]: crate::uploads::Budgeted
    pub fn with_upload_budget(mut self, budget: UploadBudget) -> Self {
        self.uploads = budget;
        self
    }

    /// The request's [`UploadHold`]: the one its body is charged to, or a new one where the
    /// service runs without the wrapper.
    fn upload_hold<T>(&self, req: &Request<T>) -> UploadHold {
        req.extensions().get::<UploadHold>().cloned().unwrap_or_else(|| UploadHold::new(self.uploads.clone()))
    }

    /// The server's fit options for the fields a request leaves unset (`[defaults]`); each
    /// one unset there leaves the preset's.
    pub fn with_defaults(mut self, defaults: DefaultsConfig) -> Self {
        self.defaults = defaults;
        self
    }

    /// The largest message this server sends (`server.max_message_bytes`): a result asked with
    /// DICOM Segmentations that could outgrow it is refused before it queues (see `admit`).
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    /// Refuses, before it is queued, a job that may run on a CPU worker and whose options'
    /// memory estimate (`FitOptions::host_memory_estimate`) exceeds `bytes`: on the CPU, a fit
    /// larger than the host's memory ends in the kernel's out-of-memory killer, which takes
    /// the whole server with it. `None` (the default) checks nothing.
    pub fn with_cpu_job_bytes(mut self, bytes: Option<u64>) -> Self {
        self.cpu_job_bytes = bytes;
        self
    }

    /// Whether a job of these options, asking for `device`, fits the CPU workers' memory
    /// budget (always, where no CPU worker could take it). Checked twice, both before the image
    /// is decoded: for the fit alone (`image` None, so options too large on their own are named
    /// as such), then with the image's size from its headers.
    fn check_memory(&self, fit: &FitOptions, device: DeviceSpec, image: Option<(u32, u32)>) -> Result<(), ServiceError> {
        let Some(budget) = self.cpu_job_bytes else { return Ok(()) };
        let cpu = self.devices.contains(&DeviceSpec::Cpu);
        let on_cpu = device == DeviceSpec::Cpu || (device == DeviceSpec::Auto && cpu);
        let (w, h) = image.unwrap_or((0, 0));
        let need = fit.host_memory_estimate(w as u64 * h as u64);
        if !on_cpu || need <= budget {
            return Ok(());
        }
        let gb = |b: u64| b as f64 / 1e9;
        let gpu = self.devices.iter().find(|d| matches!(d, DeviceSpec::Cuda(_)));
        let or_gpu = gpu.map_or(String::new(), |d| format!(", or ask for device {d}"));
        let or_image = if image.is_some() { ", or send a smaller image" } else { "" };
        Err(ServiceError::InvalidArgument(format!(
            "{} needs about {:.1} GB of memory on a CPU worker, more than this server allows one \
             job ({:.1} GB, workers.max_job_bytes); ask for a smaller size or fewer \
             features{or_image}{or_gpu}",
            fit.describe(image),
            gb(need),
            gb(budget),
        )))
    }

    /// A request refused before it became a job: counted by reason and logged in the call's
    /// `span` (with the client's address: an operator who sees `s3net_rejected_total` rise can
    /// tell who sent what), then its status.
    fn refuse(&self, span: &tracing::Span, e: ServiceError) -> Status {
        let reason = e.reason();
        self.metrics.rejected(reason);
        let status: Status = e.into();
        span.in_scope(|| info!(reason, code = ?status.code(), error = status.message(), "request refused"));
        status
    }

    /// Checks the options, decodes the image (on the blocking pool: it is CPU work) and builds the job.
    async fn prepare(
        &self,
        image: Vec<u8>,
        options: Option<pb::Options>,
        caller: &Caller,
    ) -> Result<NewJob, ServiceError> {
        let admitted = self.admit(image, options, "").await?;
        self.load(admitted, caller).await
    }

    /// A request's options checked, its image's headers read and its idempotency fingerprint
    /// made, before anything is decoded: a request whose key names a job already needs no
    /// decode at all. The fingerprint (a SHA-256 of the whole image, tens of milliseconds for
    /// a large one) and the probe run in one trip to the blocking pool, off the runtime's threads.
    async fn admit(&self, image: Vec<u8>, options: Option<pb::Options>, key: &str) -> Result<Admitted, ServiceError> {
        let o = options.unwrap_or_default();
        let fit = fit_options(&o, &self.defaults)?;
        let device: DeviceSpec = o.device.parse()?;
        if !self
            .devices
            .iter()
            .any(|&d| device == DeviceSpec::Auto || d == device)
        {
            let have: Vec<String> = self.devices.iter().map(|d| d.to_string()).collect();
            return Err(ServiceError::InvalidArgument(format!(
                "device {device} requested but this server's workers run on: {}",
                if have.is_empty() {
                    "nothing".into()
                } else {
                    have.join(", ")
                }
            )));
        }
        self.check_memory(&fit, device, None)?;
        let window = o
            .window
            .map(|w| Window::new(w.center, w.width))
            .transpose()?;
        let decode = DecodeOptions {
            frame: o.frame,
            ..Default::default()
        };
        // Everything the fingerprint covers besides the image, made here where `o` is.
        let described = (!key.is_empty()).then(|| {
            let mut d = serde_json::to_vec(&fit).unwrap_or_default();
            d.extend_from_slice(format!("{device}|{window:?}|{}|{}|{}|{}", o.frame, o.priority, o.dicom_seg, o.dicom_seg_clusters).as_bytes());
            (key.to_string(), d)
        });
        let (image, header, idempotency) = tokio::task::spawn_blocking(move || {
            let idempotency = described.map(|(key, described)| {
                let mut h = sha2::Sha256::new();
                h.update(&image);
                h.update(&described);
                (key, <[u8; 32]>::from(h.finalize()))
            });
            let header = s3net_imaging::probe(&image, &decode);
            (image, header, idempotency)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("decoder task failed: {e}")))?;
        let header = header?;
        if (o.dicom_seg || o.dicom_seg_clusters) && header.format != Format::Dicom {
            let (option, what) = if o.dicom_seg { ("dicom_seg", "the mask") } else { ("dicom_seg_clusters", "the clusters") };
            return Err(ServiceError::InvalidArgument(format!(
                "{option} asks for {what} as a DICOM Segmentation, which must reference a DICOM \
                 source image; this image is {}",
                header.format.to_string().to_uppercase()
            )));
        }
        self.check_segmentation_size(&o, &fit, &header)?;
        Ok(Admitted { image, o, fit, device, window, idempotency, header })
    }

    /// Refuses DICOM Segmentations that could make the result larger than a message may be:
    /// its Completed event could not be sent, and the fit would be lost. A Segmentation holds
    /// a 1-bit frame of the image per segment: one for the foreground, up to `features` for the
    /// clusters. Refused above half the limit, leaving the rest for the PNGs.
    fn check_segmentation_size(&self, o: &pb::Options, fit: &FitOptions, header: &Header) -> Result<(), ServiceError> {
        let Some(max) = self.max_message_bytes else { return Ok(()) };
        let frame = (u64::from(header.width) * u64::from(header.height)).div_ceil(8);
        let frames = u64::from(o.dicom_seg) + if o.dicom_seg_clusters { fit.features.max(0) as u64 } else { 0 };
        let bytes = frame * frames;
        if bytes > max as u64 / 2 {
            return Err(ServiceError::InvalidArgument(format!(
                "the DICOM Segmentations asked for a {}×{} image could take {} (a {} frame for the \
                 foreground{}), more than half of this server's largest message \
                 (server.max_message_bytes, {}): ask for fewer features or without \
                 dicom_seg_clusters, or raise the limit",
                header.width,
                header.height,
                crate::error::size(bytes),
                crate::error::size(frame),
                if o.dicom_seg_clusters { format!(" and each of up to {} clusters", fit.features) } else { String::new() },
                crate::error::size(max as u64),
            )));
        }
        Ok(())
    }

    /// An admitted request's bytes reserved from the queue's budget and its image decoded
    /// (on the blocking pool): the job to submit.
    async fn load(&self, a: Admitted, caller: &Caller) -> Result<NewJob, ServiceError> {
        let Admitted { image, o, fit, device, window, idempotency, header } = a;
        let key = idempotency.as_ref().map_or("", |(k, _)| k.as_str());
        let decode = DecodeOptions {
            frame: o.frame,
            ..Default::default()
        };
        // What the image will cost, from its headers: refused for the fit's memory or the
        // queue's budget before a decode spends a few times its size (see `Reservation`).
        self.check_memory(&fit, device, Some((header.width, header.height)))?;
        let reservation = self.queue.reserve(usize::try_from(header.image_bytes()).unwrap_or(usize::MAX), key, caller)?;
        let (foreground, clusters) = (o.dicom_seg, o.dicom_seg_clusters);
        let (image, applied_window, orientation, pixel_spacing, source, input) = tokio::task::spawn_blocking(move || {
            // Read first: a file the Segmentation cannot reference is refused before its decode.
            let source = (foreground || clusters).then(|| s3net_imaging::dicom_source(&image, decode.frame)).transpose()?;
            let d = s3net_imaging::decode(&image, &decode)?;
            let applied = d.given_window(window).map(|(w, f)| (w, f.name()));
            let spacing = d.dicom.as_ref().and_then(|i| i.pixel_spacing_mm);
            let orientation = d.orientation;
            let input = InputSummary { frames: header.frames, ..InputSummary::of(&d) };
            Ok::<_, ServiceError>((d.into_image(window), applied, orientation, spacing, source.map(Arc::new), input))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("decoder task failed: {e}")))??;
        // At most the caller's `max_priority`; the result says what ran.
        let priority = caller.priority(o.priority);
        let applied = applied_options(&fit, device, applied_window, priority, orientation);
        Ok(NewJob {
            image: Arc::new(image),
            options: fit,
            device,
            priority,
            applied,
            idempotency,
            trace: TraceContext::current(),
            pixel_spacing,
            dicom_seg: source.map(|source| DicomOutputs { source, foreground, clusters }),
            reservation: Some(Arc::new(reservation)),
            input,
            caller: caller.owner(),
        })
    }

    /// Queues a job for a streaming call and follows it; the job is this call's to cancel.
    ///
    /// `span` is the RPC's: it follows the stream, so it lasts as long as the call.
    async fn run_owned(
        &self,
        image: Vec<u8>,
        options: Option<pb::Options>,
        (deadline, caller): (Option<Duration>, &Caller),
        span: tracing::Span,
    ) -> Result<EventStream, ServiceError> {
        let job = self.prepare(image, options, caller).await?;
        let sub = self.queue.submit(job)?;
        tracing::Span::current().record("job_id", sub.id.as_str());
        info!(job_id = %sub.id, position = sub.position, "job queued");
        let mut watch = self.queue.watch(&sub.id)?;
        // A worker may have taken the job already: the caller still sees it was queued first.
        if !matches!(
            watch.replay.first().and_then(|e| e.event.as_ref()),
            Some(Event::Queued(_))
        ) {
            let queued = Event::Queued(pb::Queued {
                position: sub.position,
            });
            watch.replay.insert(
                0,
                pb::JobEvent {
                    job_id: sub.id.clone(),
                    event: Some(queued),
                },
            );
        }
        Ok(follow(
            self.queue.clone(),
            sub.id,
            watch,
            true,
            deadline,
            span,
        ))
    }
}

/// What a result says was applied: the fit options, the device asked for, the window used (the
/// request's or the file's, with the name of its [`s3net_imaging::WindowFunction`]), and the
/// orientation the decoder applied. Also built by `s3net segment` for its report.
pub fn applied_options(fit: &FitOptions, device: DeviceSpec, window: Option<(Window, &str)>, priority: i32, orientation: u8) -> pb::AppliedOptions {
    pb::AppliedOptions {
        preset: fit.preset.to_string(),
        iterations: fit.iterations as u32,
        min_labels: fit.min_labels as u32,
        size: fit.size as u32,
        seed: fit.seed,
        features: fit.features as u32,
        device: device.to_string(),
        window: window.map(|(w, _)| pb::Window { center: w.center, width: w.width }),
        window_function: window.map(|(_, f)| f.to_string()).unwrap_or_default(),
        priority,
        options_json: serde_json::to_string(fit).unwrap_or_default(),
        orientation: u32::from(orientation),
    }
}

/// The options of a request: its preset's, with the server's `defaults` for the fields the
/// request leaves unset and its own values for the fields it sets; validated.
pub(crate) fn fit_options(o: &pb::Options, defaults: &DefaultsConfig) -> Result<FitOptions, ServiceError> {
    let or_default = |asked: &str, default: &Option<String>| {
        let asked = asked.trim();
        if asked.is_empty() { default.clone().unwrap_or_default() } else { asked.to_string() }
    };
    let preset = or_default(&o.preset, &defaults.preset);
    let preset: Preset = if preset.is_empty() { Preset::Default } else { preset.parse()? };
    let mut f = FitOptions::preset(preset);
    if let Some(v) = o.iterations.or(defaults.iterations) {
        f.iterations = v as usize;
    }
    if let Some(v) = o.min_labels.or(defaults.min_labels) {
        f.min_labels = v as usize;
    }
    if let Some(v) = o.size.or(defaults.size) {
        f.size = v as i64;
    }
    if let Some(v) = o.seed {
        f.seed = v;
    }
    if let Some(v) = o.features.or(defaults.features) {
        f.features = v as i64;
    }
    f.precision = or_default(&o.precision, &defaults.precision).parse()?;
    if let Some(v) = o.offset_lr.or(defaults.offset_lr) {
        f.offset_lr = v;
    }
    f.validate()?;
    Ok(f)
}

/// Streams a job's events to a client: the replay, then the live events until the outcome.
///
/// For an `owned` job (Segment, SegmentUpload) the client going away or the deadline passing
/// cancels the job; a watcher (WatchJob) leaving changes nothing. The stream runs in the RPC's
/// `span`, which ends with it.
fn follow(
    queue: Arc<dyn JobQueue>,
    id: String,
    watch: Watch,
    owned: bool,
    deadline: Option<Duration>,
    span: tracing::Span,
) -> EventStream {
    let (tx, rx) = mpsc::channel::<Result<pb::JobEvent, Status>>(16);
    tokio::spawn(async move {
        let gone = |reason: &str| {
            if owned {
                let _ = queue.cancel(&id, reason);
            }
        };
        for ev in watch.replay {
            let end = ev.event.as_ref().is_some_and(is_outcome);
            if tx.send(Ok(ev)).await.is_err() {
                return gone("client disconnected");
            }
            if end {
                return;
            }
        }
        let Some(mut live) = watch.live else { return };
        let sleep = tokio::time::sleep(deadline.unwrap_or(Duration::from_secs(u32::MAX as u64)));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                r = live.recv() => match r {
                    Ok(ev) => {
                        let end = ev.event.as_ref().is_some_and(is_outcome);
                        if tx.send(Ok(ev)).await.is_err() {
                            return gone("client disconnected");
                        }
                        if end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        // The outcome was sent while we lagged: read it from the store.
                        if let Some(ev) = queue.get(&id).ok().and_then(|j| outcome_event(&j)) {
                            let _ = tx.send(Ok(ev)).await;
                        }
                        return;
                    }
                },
                _ = tx.closed() => return gone("client disconnected"),
                _ = &mut sleep, if deadline.is_some() => {
                    gone("deadline exceeded");
                    let status = Status::deadline_exceeded("deadline exceeded; the job was cancelled");
                    record_status(&tracing::Span::current(), &status);
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    }.instrument(span));
    Box::pin(ReceiverStream::new(rx))
}

fn outcome_event(j: &pb::Job) -> Option<pb::JobEvent> {
    let e = match JobState::try_from(j.state).ok()? {
        JobState::Completed => Event::Completed(pb::Completed {
            result: j.result.clone(),
        }),
        JobState::Failed => Event::Failed(j.failure.clone().unwrap_or_default()),
        JobState::Cancelled => Event::Cancelled(j.cancellation.clone().unwrap_or_default()),
        _ => return None,
    };
    Some(pb::JobEvent {
        job_id: j.job_id.clone(),
        event: Some(e),
    })
}

/// The events of another replica's job as they come from it (`crate::cluster`). A connection
/// lost under them ends the stream with UNAVAILABLE naming that replica; so does this server
/// stopping (`stopping` turning true), which would otherwise wait for the other replica's job
/// and then cut the connection.
fn relay(
    mut events: Streaming<pb::JobEvent>,
    owner: std::net::SocketAddr,
    id: String,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    span: tracing::Span,
) -> EventStream {
    let (tx, rx) = mpsc::channel::<Result<pb::JobEvent, Status>>(16);
    tokio::spawn(
        async move {
            let stop = async {
                if stopping.wait_for(|s| *s).await.is_err() {
                    // No server to stop (a service served bare): never.
                    std::future::pending::<()>().await;
                }
            };
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    ev = events.message() => {
                        let ev = match ev {
                            Ok(Some(ev)) => Ok(ev),
                            Ok(None) => return,
                            Err(s) => Err(cluster::failure(owner, &format!("job '{id}'"), s)),
                        };
                        let end = ev.is_err();
                        if tx.send(ev).await.is_err() || end {
                            return;
                        }
                    }
                    _ = &mut stop => {
                        let msg = format!(
                            "this replica is shutting down; watch job '{id}' again (any replica takes the call)"
                        );
                        let _ = tx.send(Err(Status::unavailable(msg))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        }
        .instrument(span),
    );
    Box::pin(ReceiverStream::new(rx))
}

/// The end of a call forwarded to another replica (`crate::cluster`): counted by its gRPC
/// code, and a failure recorded on the call's span.
fn forwarded<T>(span: &tracing::Span, metrics: &Metrics, method: &'static str, r: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    match &r {
        Ok(_) => metrics.forwarded(method, tonic::Code::Ok),
        Err(s) => {
            metrics.forwarded(method, s.code());
            record_status(span, s);
            span.in_scope(|| info!(code = ?s.code(), error = s.message(), "forwarded call failed"));
        }
    }
    r
}

/// The `grpc-timeout` header as a duration (e.g. `"250m"` = 250 ms).
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl Segmenter for SegmenterService {
    type SegmentStream = EventStream;
    type SegmentUploadStream = EventStream;
    type WatchJobStream = EventStream;

    async fn segment(
        &self,
        req: Request<pb::SegmentRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let span = rpc_span!(
            "Segment",
            req,
            bytes = req.get_ref().image.len() as i64,
            job_id = tracing::field::Empty
        );
        // The message's bytes, held since they began to arrive, until its image is decoded.
        let held = self.upload_hold(&req).take();
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let events = self
            .run_owned(r.image, r.options, (deadline, &caller), span.clone())
            .instrument(span.clone())
            .await;
        drop(held);
        match events {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => {
                let status = self.refuse(&span, e);
                record_status(&span, &status);
                Err(status)
            }
        }
    }

    async fn segment_upload(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<EventStream>, Status> {
        use pb::upload_chunk::Part;
        let deadline = grpc_timeout(req.metadata());
        let span = rpc_span!(
            "SegmentUpload",
            req,
            bytes = tracing::field::Empty,
            job_id = tracing::field::Empty
        );
        // What this call holds of the upload budget: each message from its prefix on (charged
        // by the body), then the image assembled from them; given back when the image has been
        // decoded (or the call ends).
        let hold = self.upload_hold(&req);
        let caller = Caller::of(&req);
        let mut chunks = req.into_inner();
        let stream = async {
            let first = match chunks.next().await {
                Some(Ok(c)) => c,
                // The client's stream failed, or the budget refused its message (counted
                // where it was refused): not a refusal to count here.
                Some(Err(s)) => return Err(s),
                None => pb::UploadChunk::default(),
            };
            hold.consume(first.encoded_len());
            let Some(Part::Header(header)) = first.part else {
                return Err(self.refuse(&span, ServiceError::InvalidArgument(
                    "the first UploadChunk must carry the header".into(),
                )));
            };
            let too_big = |n: u64| {
                ServiceError::InvalidArgument(format!(
                    "upload of {n} bytes exceeds the server's limit of {} bytes",
                    self.max_upload_bytes
                ))
            };
            if header.total_bytes > self.max_upload_bytes as u64 {
                return Err(self.refuse(&span, too_big(header.total_bytes)));
            }
            // The announced size now (the image's buffer is allocated at once), any more as
            // it arrives.
            let total = header.total_bytes as usize;
            hold.claim(total).map_err(|e| self.refuse(&span, e))?;
            let mut image = Vec::with_capacity(total);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                hold.consume(chunk.encoded_len());
                match chunk.part {
                    Some(Part::Data(d)) => {
                        if image.len() + d.len() > self.max_upload_bytes {
                            return Err(self.refuse(&span, too_big((image.len() + d.len()) as u64)));
                        }
                        hold.claim(total.max(image.len() + d.len())).map_err(|e| self.refuse(&span, e))?;
                        image.extend_from_slice(&d);
                    }
                    Some(Part::Header(_)) => {
                        return Err(self.refuse(&span, ServiceError::InvalidArgument(
                            "only the first UploadChunk may carry a header".into(),
                        )))
                    }
                    None => {}
                }
            }
            tracing::Span::current().record("bytes", image.len() as i64);
            let events = self
                .run_owned(image, header.options, (deadline, &caller), tracing::Span::current())
                .await
                .map_err(|e| self.refuse(&span, e));
            drop(hold.take());
            events
        }
        .instrument(span.clone())
        .await
        .inspect_err(|s| record_status(&span, s))?;
        Ok(Response::new(stream))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let span = rpc_span!(
            "SubmitJob",
            req,
            bytes = req.get_ref().image.len() as i64,
            job_id = tracing::field::Empty,
            forwarded_to = tracing::field::Empty
        );
        // The message's bytes, held since they began to arrive, until its image is decoded
        // (or, sent on to the replica that keeps its idempotency key, until that one answers).
        let held = self.upload_hold(&req).take();
        let caller = Caller::of(&req);
        let home = match self.cluster.as_deref() {
            // In the call's span: a warning of the resolver's names the call.
            Some(c) => c.key_home(&req.get_ref().idempotency_key, req.metadata()).instrument(span.clone()).await.map(|h| (c, h)),
            None => None,
        };
        if let Some(to) = home {
            let deadline = grpc_timeout(req.metadata());
            let r = req.into_inner();
            let about = format!("the job of idempotency key '{}'", r.idempotency_key);
            let out = self.forward(&span, "SubmitJob", to, &about, (r, &caller), deadline, |mut c, r| async move { c.submit_job(r).await }).await;
            drop(held);
            if let Ok(sub) = &out {
                span.record("job_id", sub.get_ref().job_id.as_str());
            }
            return out;
        }
        let deadline = grpc_timeout(req.metadata());
        let lookup = Cluster::key_lookup(req.metadata());
        let r = req.into_inner();
        if let Some(fingerprint) = lookup {
            // Another replica asks whether the key's job is here: answered from this queue only.
            drop(held);
            let _in = span.enter();
            return match self.queue.find_key(&caller.name, &r.idempotency_key, &fingerprint) {
                Ok(Some(sub)) => Ok(Response::new(submitted(sub))),
                Ok(None) => Err(ServiceError::KeyNotHeld(r.idempotency_key).into()),
                Err(e) => Err(e.into()),
            };
        }
        async {
            let admitted = self.admit(r.image, r.options, &r.idempotency_key).await?;
            if let Some((key, fingerprint)) = &admitted.idempotency {
                let found = match self.queue.find_key(&caller.name, key, fingerprint)? {
                    Some(sub) => Some(sub),
                    None => match self.cluster.as_deref() {
                        Some(c) => self.find_key_elsewhere(c, (key, &caller), fingerprint, deadline, &span).await?,
                        None => None,
                    },
                };
                if let Some(sub) = found {
                    tracing::Span::current().record("job_id", sub.id.as_str());
                    info!(existing = true, "job submitted");
                    return Ok(Response::new(submitted(sub)));
                }
            }
            let job = self.load(admitted, &caller).await;
            drop(held);
            let job = job?;
            let sub = self.queue.submit(job)?;
            tracing::Span::current().record("job_id", sub.id.as_str());
            info!(
                existing = sub.existing,
                position = sub.position,
                "job submitted"
            );
            Ok(Response::new(submitted(sub)))
        }
        .instrument(span.clone())
        .await
        .map_err(|e: ServiceError| {
            let status = self.refuse(&span, e);
            record_status(&span, &status);
            status
        })
    }

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let span = rpc_span!("WatchJob", req, job_id = %req.get_ref().job_id, forwarded_to = tracing::field::Empty);
        let caller = Caller::of(&req);
        if let Some((cluster, owner)) = self.elsewhere(&req.get_ref().job_id, req.metadata()) {
            let deadline = grpc_timeout(req.metadata());
            let id = req.into_inner().job_id;
            let m = pb::WatchJobRequest { job_id: id.clone() };
            let about = format!("job '{id}'");
            let r = self.forward(&span, "WatchJob", (cluster, owner), &about, (m, &caller), deadline, |mut c, r| async move { c.watch_job(r).await });
            let r = r.await?;
            return Ok(Response::new(relay(r.into_inner(), owner, id, self.stopping.clone(), span)));
        }
        let id = req.into_inner().job_id;
        self.check_owner(&span, &caller, &id)?;
        let watch = self.queue.watch(&id).map_err(|e| {
            let status = Status::from(e);
            record_status(&span, &status);
            status
        })?;
        // Its own trace (the watcher's), linked to the one that created the job.
        watch.trace.link_from(&span);
        Ok(Response::new(follow(
            self.queue.clone(),
            id,
            watch,
            false,
            None,
            span,
        )))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let span = rpc_span!("GetJob", req, job_id = %req.get_ref().job_id, forwarded_to = tracing::field::Empty);
        let caller = Caller::of(&req);
        if let Some((cluster, owner)) = self.elsewhere(&req.get_ref().job_id, req.metadata()) {
            let deadline = grpc_timeout(req.metadata());
            let m = req.into_inner();
            let about = format!("job '{}'", m.job_id);
            return self.forward(&span, "GetJob", (cluster, owner), &about, (m, &caller), deadline, |mut c, r| async move { c.get_job(r).await }).await;
        }
        let id = req.into_inner().job_id;
        self.check_owner(&span, &caller, &id)?;
        let _in = span.enter();
        Ok(Response::new(self.queue.get(&id)?))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let span = rpc_span!("CancelJob", req, job_id = %req.get_ref().job_id, forwarded_to = tracing::field::Empty);
        let caller = Caller::of(&req);
        if let Some((cluster, owner)) = self.elsewhere(&req.get_ref().job_id, req.metadata()) {
            let deadline = grpc_timeout(req.metadata());
            let m = req.into_inner();
            let about = format!("job '{}'", m.job_id);
            return self.forward(&span, "CancelJob", (cluster, owner), &about, (m, &caller), deadline, |mut c, r| async move { c.cancel_job(r).await }).await;
        }
        let id = req.into_inner().job_id;
        self.check_owner(&span, &caller, &id)?;
        let _in = span.enter();
        let state = self.queue.cancel(&id, "cancelled by CancelJob")?;
        info!(job_id = %id, "cancel requested");
        Ok(Response::new(pb::CancelJobResponse {
            state: state as i32,
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let span = rpc_span!("ListJobs", req);
        let deadline = grpc_timeout(req.metadata());
        // The other replicas' lists too, unless this call was sent here by one of them.
        let cluster = self.cluster.as_deref().filter(|_| !req.metadata().contains_key(cluster::FORWARDED_BY));
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let state = match JobState::try_from(r.state) {
            Ok(JobState::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => {
                return Err(
                    ServiceError::InvalidArgument(format!("unknown job state {}", r.state)).into(),
                )
            }
        };
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        // A caller's own jobs only, unless it is an operator (see `crate::callers`); the
        // other replicas, asked with its token, show it the same.
        let mut jobs = self.queue.list(state, limit, caller.listing());
        let mut unreachable_replicas = Vec::new();
        if let Some(c) = cluster {
            // Within the caller's deadline (what is left of it when the answers come back),
            // and at most a few seconds: a replica that hangs costs its share of the list,
            // not the whole call.
            let wait = Some(deadline.map_or(LIST_WAIT, |d| d.mul_f64(0.8).min(LIST_WAIT)));
            let calls = c.others().await.into_iter().map(|addr| {
                let m = pb::ListJobsRequest { state: r.state, limit: limit as u32 };
                let (span, caller) = (&span, &caller);
                async move {
                    let out = self.forward(span, "ListJobs", (c, addr), "its list of jobs", (m, caller), wait, |mut cl, q| async move { cl.list_jobs(q).await });
                    (addr, out.await)
                }
            });
            for (addr, out) in futures_util::future::join_all(calls).await {
                match out {
                    Ok(l) => jobs.extend(l.into_inner().jobs),
                    Err(_) => unreachable_replicas.push(addr.to_string()),
                }
            }
            // Once each, should a replica be reached under two addresses (its own among them).
            let mut seen = std::collections::HashSet::new();
            jobs.retain(|j| seen.insert(j.job_id.clone()));
            jobs.sort_by(|a, b| b.submitted_at.total_cmp(&a.submitted_at));
            jobs.truncate(limit);
        }
        Ok(Response::new(pb::ListJobsResponse { jobs, unreachable_replicas }))
    }
}

/// The longest a clustered `ListJobs` waits for the other replicas' lists.
const LIST_WAIT: Duration = Duration::from_secs(5);

/// The longest a keyed `SubmitJob` waits for the other replicas to say whether they hold its
/// key (see [`SegmenterService::find_key_elsewhere`]).
const KEY_WAIT: Duration = Duration::from_secs(2);

/// A submission's answer.
fn submitted(sub: Submitted) -> pb::SubmitJobResponse {
    pb::SubmitJobResponse { job_id: sub.id, existing: sub.existing, state: sub.state as i32, queue_position: sub.position }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3net_model::options::Precision;

    #[test]
    fn grpc_timeout_header() {
        let t = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("5u"), Some(Duration::from_micros(5)));
        assert_eq!(t("x"), None);
        assert_eq!(t("10"), None);
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn options_apply_over_the_preset() {
        let o = pb::Options {
            preset: "paper".into(),
            iterations: Some(7),
            size: Some(64),
            features: Some(12),
            ..Default::default()
        };
        let f = fit_options(&o, &DefaultsConfig::default()).unwrap();
        assert_eq!(
            (f.preset, f.iterations, f.size, f.features),
            (Preset::Paper, 7, 64, 12)
        );
        assert_eq!(f.lr, FitOptions::preset(Preset::Paper).lr);
        let e = fit_options(
            &pb::Options {
                size: Some(8),
                ..Default::default()
            },
            &DefaultsConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("size must be in 16..=1024"), "{e}");
    }

    #[test]
    fn server_defaults_fill_what_the_request_leaves_unset() {
        let d = DefaultsConfig {
            preset: Some("paper".into()),
            iterations: Some(9),
            size: Some(128),
            precision: Some("bfloat16".into()),
            ..Default::default()
        };
        let f = fit_options(&pb::Options::default(), &d).unwrap();
        assert_eq!((f.preset, f.iterations, f.size, f.precision), (Preset::Paper, 9, 128, Precision::Bfloat16));
        assert_eq!((f.features, f.min_labels), (FitOptions::preset(Preset::Paper).features, FitOptions::preset(Preset::Paper).min_labels));
        let asked = pb::Options {
            preset: "default".into(),
            iterations: Some(3),
            size: Some(64),
            precision: "float32".into(),
            ..Default::default()
        };
        let f = fit_options(&asked, &d).unwrap();
        assert_eq!((f.preset, f.iterations, f.size, f.precision), (Preset::Default, 3, 64, Precision::Float32), "the request wins");
        let bad = DefaultsConfig { size: Some(8), ..Default::default() };
        assert!(fit_options(&pb::Options::default(), &bad).unwrap_err().to_string().contains("size must be in 16..=1024"));
        // The free offsets' rate: the request's, else the server's, else the preset's.
        assert_eq!(fit_options(&asked, &d).unwrap().offset_lr, 1.0);
        let moving = DefaultsConfig { offset_lr: Some(3000.0), ..Default::default() };
        let f = fit_options(&asked, &moving).unwrap();
        assert_eq!(f.offset_lr, 3000.0);
        let own = pb::Options { offset_lr: Some(30.0), ..asked.clone() };
        assert_eq!(fit_options(&own, &moving).unwrap().offset_lr, 30.0, "the request wins");
        assert_eq!(fit_options(&own, &d).unwrap().offset_lr, 30.0);
        for v in [0.0, -2.0, 2e6, f64::NAN, f64::INFINITY] {
            let e = fit_options(&pb::Options { offset_lr: Some(v), ..Default::default() }, &d).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{v}: {e:?}");
            assert!(e.to_string().contains("offset_lr must be in (0, 1e6]"), "{v}: {e}");
        }
        // What ran is in the result's applied options.
        let json = applied_options(&f, DeviceSpec::Cpu, None, 0, 1).options_json;
        assert!(json.contains("\"offset_lr\":3000.0"), "{json}");
        let bad = DefaultsConfig { offset_lr: Some(-1.0), ..Default::default() };
        assert!(fit_options(&pb::Options::default(), &bad).unwrap_err().to_string().contains("offset_lr must be in (0, 1e6]"));
    }

    #[test]
    fn precision_is_float32_unless_asked() {
        let with = |p: &str| fit_options(&pb::Options { precision: p.into(), ..Default::default() }, &DefaultsConfig::default());
        assert_eq!(with("").unwrap().precision, Precision::Float32);
        assert_eq!(with("float32").unwrap().precision, Precision::Float32);
        assert_eq!(with("bfloat16").unwrap().precision, Precision::Bfloat16);
        let e = with("fp8").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("unknown precision 'fp8'"), "{e}");
    }
}
