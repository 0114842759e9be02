//! The `s3net serve` and `s3net client …` subcommands, for the `s3net` binary to mount.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::config::Config;
use crate::pb::{self, job_event::Event, segmenter_client::SegmenterClient};
use crate::reload::{self, Hangups, Reloader};
use crate::server::Server;
use crate::telemetry::Telemetry;

/// `s3net serve`: run the gRPC service until SIGTERM or SIGINT.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in the README; S3NET__SECTION__KEY variables override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Listen address HOST:PORT [default: 127.0.0.1:50051].
    #[arg(long)]
    pub addr: Option<String>,
    /// CPU workers [default: 1 without CUDA, 0 with].
    #[arg(long)]
    pub cpu_workers: Option<usize>,
    /// Workers per CUDA device [default: 2].
    #[arg(long)]
    pub gpu_workers_per_device: Option<usize>,
    /// Jobs a CPU worker trains together [default: 1].
    #[arg(long)]
    pub cpu_batch: Option<usize>,
    /// Jobs a GPU worker trains together [default: 16].
    #[arg(long)]
    pub gpu_batch: Option<usize>,
    /// libtorch intra-op threads [default: cores / CPU workers].
    #[arg(long)]
    pub torch_threads: Option<usize>,
    /// Jobs that may wait in the queue [default: 64].
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Prometheus endpoint HOST:PORT, "" to disable [default: 127.0.0.1:9464].
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Export traces to this OTLP/gRPC collector, e.g. http://otel-collector:4317 [default: off].
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Print the effective configuration (defaults, file, S3NET__… variables and these flags)
    /// as TOML, the token redacted, and exit; an invalid one exits 1 naming the key.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// The configuration: defaults, file, environment, then these flags.
    pub fn config(&self) -> Result<Config> {
        let mut o: Vec<(&str, String)> = Vec::new();
        if let Some(v) = &self.addr {
            o.push(("server.addr", v.clone()));
        }
        if let Some(v) = self.cpu_workers {
            o.push(("workers.cpu_workers", v.to_string()));
        }
        if let Some(v) = self.gpu_workers_per_device {
            o.push(("workers.gpu_workers_per_device", v.to_string()));
        }
        if let Some(v) = self.cpu_batch {
            o.push(("workers.cpu_batch", v.to_string()));
        }
        if let Some(v) = self.gpu_batch {
            o.push(("workers.gpu_batch", v.to_string()));
        }
        if let Some(v) = self.torch_threads {
            o.push(("workers.torch_threads", v.to_string()));
        }
        if let Some(v) = self.queue_capacity {
            o.push(("queue.capacity", v.to_string()));
        }
        if self.log_json {
            o.push(("log.format", "json".into()));
        }
        if let Some(v) = &self.metrics_listen {
            o.push(("metrics.listen", v.clone()));
        }
        if let Some(v) = &self.otlp_endpoint {
            o.push(("telemetry.otlp_endpoint", v.clone()));
        }
        Config::load(self.config.as_deref(), &o)
    }
}

/// Runs the server until SIGTERM/SIGINT, then drains it (a second signal cuts the grace period
/// short) and flushes the traces; returns once it has stopped. On SIGHUP, and every
/// `server.reload_interval_s` when it changed, it loads the configuration again (file,
/// variables, flags, token files) and puts its `[server.callers]` in force ([`crate::reload`]);
/// an invalid one is logged and changes nothing.
pub fn run_serve(args: ServeArgs) -> Result<()> {
    let cfg = args.config()?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let telemetry = Telemetry::init(&cfg)?;
        let served = async {
            // Caught from before the start (a warm-up takes seconds): SIGHUP's default action
            // would end the process, and a reload sent meanwhile is then done once serving.
            let hangups = Hangups::catch();
            let server = Server::start(&cfg).await?;
            let interval = (cfg.server.reload_interval_s > 0).then(|| Duration::from_secs(cfg.server.reload_interval_s));
            let reloads = reload::run(&server, Reloader::new(|| args.config(), cfg.clone()), hangups, interval);
            tokio::select! { _ = shutdown_signal() => {}, _ = reloads => {} }
            // A second signal cancels the running jobs at once instead of after the grace
            // period (they still end cleanly: their clients hear "cancelled").
            server.shutdown_or(shutdown_signal()).await
        }
        .await;
        if let Err(e) = &served {
            tracing::error!("{e:#}");
        }
        telemetry.shutdown().await;
        served
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// `--addr`'s default: `$S3NET_ADDR` (as the Python client and the PACS bridge read it), else
/// the local server's default address.
fn default_addr() -> String {
    std::env::var("S3NET_ADDR").ok().filter(|a| !a.is_empty()).unwrap_or_else(|| "http://127.0.0.1:50051".into())
}

/// How to reach the server.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Server URL, or HOST:PORT as the Python client and the PACS bridge take it (https://,
    /// --ca or --cert for TLS) [default: $S3NET_ADDR, else http://127.0.0.1:50051].
    #[arg(long, default_value_t = default_addr(), hide_default_value = true)]
    pub addr: String,
    /// Bearer token, when the server requires one [default: $S3NET_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// A file holding the bearer token instead (one line), so that it is in no command line
    /// that `ps` shows [default: $S3NET_TOKEN_FILE].
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle to verify the server with (TLS).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

/// Fit options sent with a request; unset ones take the server-side preset values.
#[derive(Args, Debug, Clone, Default)]
pub struct RemoteFitArgs {
    /// default | paper | reference
    #[arg(long)]
    pub preset: Option<String>,
    /// Maximum SGD steps.
    #[arg(long)]
    pub iterations: Option<u32>,
    /// Early stop at this many labels (0 disables).
    #[arg(long)]
    pub min_labels: Option<u32>,
    /// Side of the square grid the network runs on.
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto | cpu | cuda:N
    #[arg(long)]
    pub device: Option<String>,
    /// Intensity window "CENTER,WIDTH" in the image's units (e.g. HU for CT).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Feature channels F (= clusters K).
    #[arg(long)]
    pub features: Option<u32>,
    /// Queue priority (higher runs first).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Frame of a multi-frame DICOM.
    #[arg(long, default_value_t = 0)]
    pub frame: u32,
    /// float32 | bfloat16: the number format of the network's activations.
    #[arg(long)]
    pub precision: Option<String>,
    /// Also write the mask as a DICOM Segmentation, STEM.seg.dcm (DICOM inputs only), for a
    /// PACS to store next to the source.
    #[arg(long)]
    pub dicom_seg: bool,
    /// Also write the cluster map as a DICOM Segmentation, STEM.labels.seg.dcm (one segment per
    /// cluster; DICOM inputs only).
    #[arg(long)]
    pub dicom_seg_clusters: bool,
    /// Learning rate of the free offsets and mask, a multiple of the preset's (3000 lets them
    /// learn: a better mask on the PH2 photographs, a worse best single cluster).
    #[arg(long)]
    pub offset_lr: Option<f64>,
}

impl RemoteFitArgs {
    pub fn options(&self) -> Result<pb::Options> {
        let window = self
            .window
            .as_deref()
            .map(|s| {
                s.parse::<s3net_imaging::Window>()
                    .with_context(|| format!("bad --window '{s}' (expected CENTER,WIDTH)"))
            })
            .transpose()?
            .map(|w| pb::Window {
                center: w.center,
                width: w.width,
            });
        Ok(pb::Options {
            preset: self.preset.clone().unwrap_or_default(),
            iterations: self.iterations,
            min_labels: self.min_labels,
            size: self.size,
            seed: self.seed,
            device: self.device.clone().unwrap_or_default(),
            window,
            priority: self.priority,
            features: self.features,
            frame: self.frame,
            precision: self.precision.clone().unwrap_or_default(),
            dicom_seg: self.dicom_seg,
            dicom_seg_clusters: self.dicom_seg_clusters,
            offset_lr: self.offset_lr,
        })
    }
}

/// `STEM.frameN`, N zero-padded to the digits of the last frame's number, so that a folder's
/// files sort in frame order: the names `--all-frames` writes (`s3net segment` and `s3net
/// client segment`, and the Python client's command).
pub fn frame_stem(stem: &str, frame: u32, frames: u32) -> String {
    let digits = frames.saturating_sub(1).max(1).to_string().len();
    format!("{stem}.frame{frame:0digits$}")
}

/// How `s3net client segment` calls: each image sent (in one message or in chunks), its events
/// followed to the result; refused calls and a job its server cancelled while shutting down
/// are sent again within `retry`.
struct Segmentation<'a> {
    client: &'a Client,
    upload: bool,
    deadline: Option<Duration>,
    retry: &'a RetryArgs,
}

impl Segmentation<'_> {
    async fn run(&self, image: &[u8], options: &pb::Options, show: Show) -> Result<pb::SegmentationResult> {
        let (client, upload, deadline, retry) = (self.client, self.upload, self.deadline, self.retry);
        let mut resubmitted = 0;
        loop {
            let stream = retry
                .run(|| {
                    let (mut client, options) = (client.clone(), options.clone());
                    async move {
                        if upload || image.len() > 48 << 20 {
                            let mut chunks = vec![pb::UploadChunk {
                                part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
                                    options: Some(options),
                                    total_bytes: image.len() as u64,
                                })),
                            }];
                            chunks.extend(image.chunks(1 << 20).map(|c| pb::UploadChunk {
                                part: Some(pb::upload_chunk::Part::Data(c.to_vec())),
                            }));
                            client.segment_upload(with_deadline(tokio_stream::iter(chunks), deadline)).await
                        } else {
                            let request = pb::SegmentRequest { image: image.to_vec(), options: Some(options) };
                            client.segment(with_deadline(request, deadline)).await
                        }
                    }
                })
                .await;
            let events = follow_events(stream.map_err(status_error)?.into_inner(), show);
            let outcome = match deadline {
                // The server ends the stream at the deadline; this is for a server that
                // stopped answering altogether.
                Some(d) => tokio::time::timeout(d + Duration::from_secs(5), events)
                    .await
                    .map_err(|_| anyhow::anyhow!("DeadlineExceeded: no outcome within {:.1} s (--timeout)", d.as_secs_f64()))?,
                None => events.await,
            };
            match outcome {
                Err(e) if e.is::<ServerShutDown>() => {
                    let Some(wait) = retry.delay(resubmitted, &Status::unavailable(e.to_string())) else { return Err(e) };
                    if show != Show::Nothing {
                        eprintln!("{e}; sending the image again in {:.1} s", wait.as_secs_f64());
                    }
                    tokio::time::sleep(wait).await;
                    resubmitted += 1;
                }
                other => return other,
            }
        }
    }
}

/// `s3net client …`
#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Segment images remotely and write STEM.labels.png, STEM.mask.png and STEM.json for each.
    Segment {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Image files (PNG, JPEG, BMP, TIFF, DICOM); with several, up to --concurrency fits in
        /// flight at once, and a failed one does not stop the others.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// With several files: how many fits to keep in flight at once (a GPU server trains the
        /// jobs waiting together, so a series goes faster with several).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Upload in chunks (SegmentUpload) instead of one message.
        #[arg(long)]
        upload: bool,
        /// Seconds the call may take, its fit included (the gRPC deadline: the server cancels
        /// the job when they pass, and the command fails with DeadlineExceeded). Unset: none.
        #[arg(long)]
        timeout: Option<f64>,
        /// Segment every frame of a multi-frame DICOM (page of a TIFF), one job each after
        /// the other (frame 0's result says how many), written as STEM.frameN.*.
        #[arg(long, conflicts_with = "frame")]
        all_frames: bool,
        #[command(flatten)]
        retry: RetryArgs,
        #[command(flatten)]
        fit: RemoteFitArgs,
    },
    /// Queue an image as an asynchronous job and print its id.
    Submit {
        #[command(flatten)]
        conn: ConnectArgs,
        file: PathBuf,
        /// Idempotency key: resubmitting with it returns the same job.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        retry: RetryArgs,
        #[command(flatten)]
        fit: RemoteFitArgs,
    },
    /// Follow a job's events until it finishes.
    Watch {
        #[command(flatten)]
        conn: ConnectArgs,
        job_id: String,
    },
    /// Print a job's state; with --out, write its result files (JOB_ID.labels.png, …).
    Get {
        #[command(flatten)]
        conn: ConnectArgs,
        job_id: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Cancel a job.
    Cancel {
        #[command(flatten)]
        conn: ConnectArgs,
        job_id: String,
    },
    /// List the jobs the server knows.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Check grpc.health.v1 (exits non-zero unless SERVING).
    Health {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Service name; empty for the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
}

/// How `segment` and `submit` retry a refusal the server made before it did anything:
/// RESOURCE_EXHAUSTED (queue full, a memory budget full) no sooner than its `retry-after` hint,
/// and UNAVAILABLE (a server draining or restarting, or its connection failed: see
/// [`connection_failed`]), with exponential backoff and jitter. As the Python client does; a
/// refused request queued nothing, and `submit` sends an idempotency key, so a retry runs no
/// job twice.
#[derive(Args, Debug, Clone)]
pub struct RetryArgs {
    /// Retries after such a refusal (0: none).
    #[arg(long, default_value_t = RetryArgs::default().retries)]
    pub retries: u32,
    /// First backoff in seconds, doubled each retry up to 30 s.
    #[arg(long, default_value_t = RetryArgs::default().backoff)]
    pub backoff: f64,
}

impl Default for RetryArgs {
    fn default() -> Self {
        RetryArgs { retries: 3, backoff: 0.5 }
    }
}

impl RetryArgs {
    /// The wait before retry `attempt + 1` after `status`, or None to give up.
    pub fn delay(&self, attempt: u32, status: &Status) -> Option<Duration> {
        let retried = matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::Unavailable)
            || connection_failed(status);
        if attempt >= self.retries || !retried {
            return None;
        }
        // Jitter in [0.5, 1) from the clock: enough to spread clients refused together.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let jitter = 0.5 + 0.5 * f64::from(nanos % 1000) / 1000.0;
        let backoff = (self.backoff.max(0.0) * 2f64.powi(attempt as i32)).min(30.0) * jitter;
        let hint = status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        Some(Duration::from_secs_f64(backoff.max(hint)))
    }

    /// Runs `call` until it is not refused as above, saying each retry on stderr.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await {
                Err(s) => match self.delay(attempt, &s) {
                    Some(wait) => {
                        attempt += 1;
                        eprintln!(
                            "{}; retry {attempt} of {} in {:.1} s",
                            describe(&s),
                            self.retries,
                            wait.as_secs_f64()
                        );
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(s),
                },
                ok => return ok,
            }
        }
    }
}

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A Segmenter client with the token interceptor.
pub type Client = SegmenterClient<InterceptedService<Channel, TokenInterceptor>>;

impl ConnectArgs {
    /// `--addr` as a URL: as given when it names a scheme, else `HOST:PORT` with https:// when
    /// --ca or --cert asks for TLS and http:// otherwise. Before, a bare `HOST:PORT` (what
    /// `S3NET_ADDR` holds for the bridge, and what the Python client takes) failed with
    /// "invalid URL, scheme is missing".
    pub fn url(&self) -> String {
        if self.addr.contains("://") {
            return self.addr.clone();
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    pub async fn channel(&self) -> Result<Channel> {
        let url = self.url();
        // Pings while a call is open, as the Python client does: a server that froze or dropped
        // off the network fails the call as unavailable instead of leaving it waiting.
        let mut ep = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad --addr '{}'", self.addr))?
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        if self.ca.is_some() || self.cert.is_some() || url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(c), Some(k)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
            }
            ep = ep.tls_config(tls)?;
        }
        ep.connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))
    }

    /// The bearer token: `--token` or `--token-file`, else `$S3NET_TOKEN` or
    /// `$S3NET_TOKEN_FILE` (both set is an error, as both flags are).
    fn bearer_token(&self) -> Result<Option<String>> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (token, file) = match (&self.token, &self.token_file) {
            (None, None) => (env("S3NET_TOKEN"), env("S3NET_TOKEN_FILE").map(PathBuf::from)),
            (t, f) => (t.clone(), f.clone()),
        };
        match (token, file) {
            (Some(_), Some(_)) => anyhow::bail!("S3NET_TOKEN and S3NET_TOKEN_FILE are both set: give the token one way"),
            (Some(t), None) => Ok(Some(t)),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(&f).with_context(|| format!("token file {}: cannot read it", f.display()))?;
                let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                match lines.as_slice() {
                    [one] => Ok(Some(one.to_string())),
                    [] => anyhow::bail!("token file {}: empty", f.display()),
                    more => anyhow::bail!("token file {}: {} lines, a client sends one token", f.display(), more.len()),
                }
            }
            (None, None) => Ok(None),
        }
    }

    pub async fn client(&self) -> Result<Client> {
        let token = match self.bearer_token()? {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the token is not valid header text")?,
            ),
            None => None,
        };
        Ok(
            SegmenterClient::with_interceptor(self.channel().await?, TokenInterceptor(token))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
    }
}

use crate::config::read_file as read;

/// A gRPC status as the error the CLI prints: `InvalidArgument: message`.
pub fn status_error(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", describe(&s))
}

pub use crate::error::connection_failed;

/// "CODE: message", or for a failed connection "Unavailable: the connection failed: …" with
/// the transport's own account (tonic's message alone says "transport error").
fn describe(s: &Status) -> String {
    if let Some(why) = crate::error::connection_failure(s) {
        return format!("Unavailable: the connection failed: {why}");
    }
    format!("{:?}: {}", s.code(), s.message())
}

/// A request carrying `deadline` as its gRPC timeout, if there is one.
fn with_deadline<T>(message: T, deadline: Option<Duration>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(d) = deadline {
        req.set_timeout(d);
    }
    req
}

/// A key no other submission uses: 128 bits from the process's random hasher keys and the
/// clock.
fn fresh_key() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u128(nanos);
    a.write_u32(std::process::id());
    let b = std::collections::hash_map::RandomState::new().hash_one(nanos);
    format!("s3net-client-{:016x}{:016x}", a.finish(), b)
}

/// One file of `s3net client segment`: what every file's fits share.
struct SegmentFile<'a> {
    call: Segmentation<'a>,
    out: &'a Path,
    all_frames: bool,
    options: &'a pb::Options,
}

impl SegmentFile<'_> {
    /// Segments `file` (each of its frames with `all_frames`, one after the other) into
    /// `out/stem.*`, with a summary line per fit: printed as each fit ends when `show` shows
    /// events (a lone file), else returned for the caller to print in the files' order. An error
    /// names the file (and frame): "FILE: InvalidArgument: …".
    async fn run(&self, file: &Path, stem: &str, show: Show) -> Result<Vec<String>> {
        let image = read(file)?;
        let mut options = self.options.clone();
        let (mut frame, mut frames, mut lines) = (options.frame, 1, Vec::new());
        loop {
            options.frame = frame;
            let result = self.call.run(&image, &options, show).await.with_context(|| match frames {
                1 => file.display().to_string(),
                n => format!("{} frame {frame} of {n}", file.display()),
            })?;
            frames = if self.all_frames { result.frames.max(1) } else { frames };
            let (stem, which) = match frames {
                1 => (stem.to_string(), String::new()),
                n => (frame_stem(stem, frame, n), format!(" frame {frame} of {n}")),
            };
            write_result(self.out, &stem, &result)?;
            let line = format!(
                "{}{which}: {} labels, {} iterations, {:.2} s on {}",
                file.display(),
                result.labels_used,
                result.iterations,
                result.timings.map(|t| t.fit_seconds).unwrap_or(0.0),
                result.device
            );
            match show {
                Show::Nothing => lines.push(line),
                Show::Steps | Show::Milestones => println!("{line}"),
            }
            frame += 1;
            if frame >= frames {
                return Ok(lines);
            }
        }
    }
}

/// The stem each input's outputs are written under (`out/STEM.labels.png`, …): its file name
/// without the extension. Two inputs with one stem (`a/IM1.dcm`, `b/IM1.dcm`) would write the
/// same files, the second over the first: an error naming both, before anything runs.
pub fn output_stems(files: &[PathBuf], out: &Path) -> Result<Vec<String>> {
    let stems: Vec<String> =
        files.iter().map(|f| f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())).collect();
    let mut first = std::collections::HashMap::new();
    for (file, stem) in files.iter().zip(&stems) {
        if let Some(other) = first.insert(stem.as_str(), file) {
            anyhow::bail!(
                "{} and {} would both be written as {}: segment them into different --out folders",
                other.display(),
                file.display(),
                out.join(format!("{stem}.*")).display()
            );
        }
    }
    Ok(stems)
}

fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

/// Runs one client command.
pub fn run_client(cmd: ClientCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(client_main(cmd))
}

async fn client_main(cmd: ClientCommand) -> Result<()> {
    match cmd {
        ClientCommand::Segment {
            conn,
            files,
            concurrency,
            out,
            upload,
            timeout,
            all_frames,
            retry,
            fit,
        } => {
            let deadline = match timeout {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                Some(t) => anyhow::bail!("--timeout must be a positive number of seconds, got {t}"),
            };
            anyhow::ensure!(concurrency >= 1, "--concurrency must be at least 1");
            let options = fit.options()?;
            let stems = output_stems(&files, &out)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let client = conn.client().await?;
            let call = Segmentation { client: &client, upload, deadline, retry: &retry };
            let one = SegmentFile { call, out: &out, all_frames, options: &options };
            if let [file] = files.as_slice() {
                // One image: its events on stderr and its lines (a frame's each) as they come, its
                // error as the command's.
                one.run(file, &stems[0], Show::Milestones).await?;
                return Ok(());
            }
            // Several: each image's lines in the order given, as its fits end; a failure is
            // reported and the others go on.
            use futures_util::StreamExt;
            let one = &one;
            let mut outcomes = futures_util::stream::iter(files.iter().zip(&stems))
                .map(|(file, stem)| async move { one.run(file, stem, Show::Nothing).await })
                .buffered(concurrency);
            let mut failed = 0;
            while let Some(outcome) = outcomes.next().await {
                match outcome {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        failed += 1;
                        eprintln!("error: {e:#}");
                    }
                }
            }
            anyhow::ensure!(failed == 0, "{failed} of {} image(s) failed", files.len());
            Ok(())
        }
        ClientCommand::Submit {
            conn,
            file,
            idempotency_key,
            retry,
            fit,
        } => {
            let client = conn.client().await?;
            // A retry after a failed connection must not queue the job twice: the server may
            // have queued it before the connection failed.
            let idempotency_key = idempotency_key.unwrap_or_else(fresh_key);
            let request = pb::SubmitJobRequest {
                image: read(&file)?,
                options: Some(fit.options()?),
                idempotency_key,
            };
            let r = retry
                .run(|| {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.submit_job(request).await }
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", r.job_id);
            Ok(())
        }
        ClientCommand::Watch { conn, job_id } => {
            let s = conn
                .client()
                .await?
                .watch_job(pb::WatchJobRequest { job_id })
                .await
                .map_err(status_error)?;
            follow_events(s.into_inner(), Show::Steps).await.map(|_| ())
        }
        ClientCommand::Get { conn, job_id, out } => {
            let j = conn
                .client()
                .await?
                .get_job(pb::GetJobRequest {
                    job_id: job_id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_job(&j);
            if let (Some(out), Some(r)) = (out, &j.result) {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("cannot create {}", out.display()))?;
                write_result(&out, &job_id, r)?;
            }
            Ok(())
        }
        ClientCommand::Cancel { conn, job_id } => {
            let r = conn
                .client()
                .await?
                .cancel_job(pb::CancelJobRequest { job_id })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", state_name(r.state));
            Ok(())
        }
        ClientCommand::List { conn } => {
            let r = conn
                .client()
                .await?
                .list_jobs(pb::ListJobsRequest::default())
                .await
                .map_err(status_error)?
                .into_inner();
            r.jobs.iter().for_each(print_job);
            if !r.unreachable_replicas.is_empty() {
                eprintln!(
                    "warning: no answer from replica(s) {}: their jobs are missing from this list",
                    r.unreachable_replicas.join(", ")
                );
            }
            Ok(())
        }
        ClientCommand::Health { conn, service } => {
            use tonic_health::pb::{
                health_check_response::ServingStatus, health_client::HealthClient,
                HealthCheckRequest,
            };
            let mut h = HealthClient::new(conn.channel().await?);
            let r = h
                .check(HealthCheckRequest { service })
                .await
                .map_err(status_error)?
                .into_inner();
            let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
            println!("{}", status.as_str_name());
            anyhow::ensure!(status == ServingStatus::Serving, "server is not serving");
            Ok(())
        }
    }
}

fn state_name(s: i32) -> &'static str {
    pb::JobState::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn print_job(j: &pb::Job) {
    let mut line = format!(
        "{} {} {}x{}",
        j.job_id,
        state_name(j.state),
        j.width,
        j.height
    );
    if let Some(p) = &j.progress {
        line += &format!(" step {}/{}", p.iteration, p.max_iterations);
    }
    if let Some(f) = &j.failure {
        line += &format!(" {}: {}", code_name(f.code), f.message);
    }
    if let Some(c) = &j.cancellation {
        line += &format!(" ({})", c.reason);
    }
    if !j.caller.is_empty() {
        line += &format!(" by {}", j.caller);
    }
    println!("{line}");
}

/// A job its server cancelled because it was shutting down (`Cancelled.retryable`): nothing of it
/// was kept, and the same request may be sent again.
#[derive(Debug, thiserror::Error)]
#[error("Cancelled: {0} (nothing of the job was kept: the same request may be sent again)")]
pub struct ServerShutDown(pub String);

/// Which of a job's events [`follow_events`] shows on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// Queued, started, and every step (on a terminal, one line redrawn).
    Steps,
    /// Queued and started; the steps only on a terminal (a log gets the milestones).
    Milestones,
    /// Nothing: several jobs at once, whose lines would interleave.
    Nothing,
}

/// Shows a job's events on stderr (as `show` says) and returns its result, or its failure as an
/// error ([`ServerShutDown`] for a job its server gave up while shutting down).
pub async fn follow_events(mut s: tonic::Streaming<pb::JobEvent>, show: Show) -> Result<pb::SegmentationResult> {
    let tty = std::io::stderr().is_terminal() && show != Show::Nothing;
    while let Some(ev) = s.message().await.map_err(status_error)? {
        match ev.event {
            Some(Event::Queued(q)) if show != Show::Nothing => {
                eprintln!("job {} queued at position {}", ev.job_id, q.position)
            }
            Some(Event::Started(st)) if show != Show::Nothing => {
                eprintln!("job {} started on {} ({})", ev.job_id, st.worker, st.device)
            }
            Some(Event::Progress(p)) => {
                let loss = p.losses.map(|l| l.total).unwrap_or(0.0);
                // A job that started over (its batch failed) says so.
                let again = if p.attempt > 1 {
                    format!(" (attempt {})", p.attempt)
                } else {
                    String::new()
                };
                if tty {
                    eprint!(
                        "\rstep {}/{} labels {:>2} loss {:.3}{again} ",
                        p.iteration, p.max_iterations, p.labels, loss
                    );
                    let _ = std::io::stderr().flush();
                } else if show == Show::Steps {
                    eprintln!(
                        "step {}/{} labels {} loss {:.3}{again}",
                        p.iteration, p.max_iterations, p.labels, loss
                    );
                }
            }
            Some(Event::Completed(c)) => {
                if tty {
                    eprintln!();
                }
                return c.result.context("Completed event without a result");
            }
            Some(Event::Failed(f)) => anyhow::bail!("{}: {}", code_name(f.code), f.message),
            Some(Event::Cancelled(c)) if c.retryable => return Err(ServerShutDown(c.reason).into()),
            Some(Event::Cancelled(c)) => anyhow::bail!("Cancelled: {}", c.reason),
            Some(Event::Queued(_) | Event::Started(_)) | None => {}
        }
    }
    anyhow::bail!("Unavailable: the event stream ended without an outcome")
}

/// Writes STEM.labels.png, STEM.mask.png, STEM.json and, with DICOM Segmentations in the
/// result, STEM.seg.dcm (the mask's) and STEM.labels.seg.dcm (the clusters'): for `s3net client segment` and for
/// `s3net segment`, which builds the same result message locally, so both report alike.
pub fn write_result(out: &Path, stem: &str, r: &pb::SegmentationResult) -> Result<()> {
    let write = |name: String, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
    };
    write(format!("{stem}.labels.png"), &r.labels_png)?;
    write(format!("{stem}.mask.png"), &r.mask_png)?;
    if !r.mask_dicom.is_empty() {
        write(format!("{stem}.seg.dcm"), &r.mask_dicom)?;
    }
    if !r.labels_dicom.is_empty() {
        write(format!("{stem}.labels.seg.dcm"), &r.labels_dicom)?;
    }
    let l = r.losses.unwrap_or_default();
    let t = r.timings.unwrap_or_default();
    let options: serde_json::Value = r
        .options
        .as_ref()
        .and_then(|o| serde_json::from_str(&o.options_json).ok())
        .unwrap_or(serde_json::Value::Null);
    let clusters: Vec<_> = r
        .clusters
        .iter()
        .map(|c| {
            let b = c.bbox.unwrap_or_default();
            json!({"label": c.label, "pixels": c.pixel_count, "bbox": [b.x, b.y, b.width, b.height], "mean_intensity": c.mean_intensity})
        })
        .collect();
    // 0 from a server older than the field: it applied no orientation.
    let orientation = r.options.as_ref().map_or(1, |o| o.orientation.max(1));
    // The window applied (the request's, or the DICOM file's with its function), null if none.
    let window = r.options.as_ref().and_then(|o| {
        let w = o.window?;
        Some(json!({"center": w.center, "width": w.width, "function": o.window_function}))
    });
    let report = json!({
        "width": r.width,
        "height": r.height,
        "orientation": orientation,
        "window": window,
        "pixel_spacing_mm": r.pixel_spacing.map(|s| [s.row_mm, s.column_mm]),
        "foreground_area_mm2": r.foreground_area_mm2,
        "labels_used": r.labels_used,
        "iterations": r.iterations,
        "losses": {"total": l.total, "ce": l.ce, "affine": l.affine, "spatial": l.spatial},
        "fit_seconds": t.fit_seconds,
        "device": r.device,
        "refits": r.refits,
        "frames": r.frames.max(1),
        "foreground_fraction": r.foreground_fraction,
        "options": options,
        "clusters": clusters,
        "timings": {"queued_seconds": t.queued_seconds, "fit_seconds": t.fit_seconds, "total_seconds": t.total_seconds},
    });
    write(
        format!("{stem}.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )
}

/// Waits up to `timeout` for a server to answer health checks (for scripts and tests).
pub async fn wait_serving(conn: &ConnectArgs, timeout: Duration) -> Result<()> {
    let until = std::time::Instant::now() + timeout;
    loop {
        let ok = async {
            let mut h = tonic_health::pb::health_client::HealthClient::new(conn.channel().await?);
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(r.into_inner().status == 1)
        }
        .await;
        if matches!(ok, Ok(true)) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "server at {} not serving after {timeout:?}",
            conn.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_stems_sort_in_frame_order() {
        assert_eq!(frame_stem("ct", 0, 2), "ct.frame0");
        assert_eq!(frame_stem("ct", 7, 10), "ct.frame7");
        assert_eq!(frame_stem("ct", 7, 11), "ct.frame07");
        assert_eq!(frame_stem("ct", 120, 300), "ct.frame120");
        assert_eq!(frame_stem("ct", 5, 300), "ct.frame005");
    }

    /// `--addr` takes HOST:PORT as the Python client does: http://, or https:// when a CA or a
    /// client certificate asks for TLS; a URL as it is.
    #[test]
    fn bare_addresses_get_a_scheme() {
        let args = |addr: &str, ca: Option<&str>| ConnectArgs { addr: addr.into(), token: None, token_file: None, ca: ca.map(PathBuf::from), cert: None, key: None };
        assert_eq!(args("127.0.0.1:50051", None).url(), "http://127.0.0.1:50051");
        assert_eq!(args("s3net.example.org:50051", Some("ca.pem")).url(), "https://s3net.example.org:50051");
        assert_eq!(args("[::1]:50051", None).url(), "http://[::1]:50051");
        assert_eq!(args("https://s3net:50051", None).url(), "https://s3net:50051");
        assert_eq!(args("http://s3net:50051", Some("ca.pem")).url(), "http://s3net:50051", "a URL is taken as written");
    }

    /// `--token-file`: the file's one line, trimmed; an empty or several-line file, or none,
    /// is an error naming it (and not the token).
    #[test]
    fn a_token_file_holds_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let with = |content: Option<&str>| {
            let path = dir.path().join("token");
            let _ = std::fs::remove_file(&path);
            if let Some(c) = content {
                std::fs::write(&path, c).unwrap();
            }
            let args = ConnectArgs { addr: "127.0.0.1:1".into(), token: None, token_file: Some(path), ca: None, cert: None, key: None };
            args.bearer_token().map_err(|e| format!("{e:#}"))
        };
        assert_eq!(with(Some("  the-secret \n\n")).unwrap().as_deref(), Some("the-secret"));
        for (content, why) in [(Some(" \n"), "empty"), (Some("a-secret\nb-secret\n"), "2 lines, a client sends one token"), (None, "cannot read it")] {
            let e = with(content).unwrap_err();
            assert!(e.starts_with("token file ") && e.contains(why) && !e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn fresh_keys_differ() {
        let keys: std::collections::HashSet<String> = (0..1000).map(|_| fresh_key()).collect();
        assert_eq!(keys.len(), 1000);
    }

    #[test]
    fn retries_wait_for_the_hint_and_back_off() {
        let r = RetryArgs { retries: 3, backoff: 0.5 };
        let mut full = Status::resource_exhausted("queue is full");
        full.metadata_mut().insert("retry-after", "4".parse().unwrap());
        assert_eq!(r.delay(0, &full), Some(Duration::from_secs(4)), "never sooner than the hint");
        let down = Status::unavailable("draining");
        for attempt in 0..3 {
            let d = r.delay(attempt, &down).expect("retried").as_secs_f64();
            let full_wait = 0.5 * 2f64.powi(attempt as i32);
            assert!((0.5 * full_wait..=full_wait).contains(&d), "attempt {attempt}: {d}");
        }
        assert_eq!(r.delay(3, &down), None, "three retries, no more");
        assert_eq!(r.delay(0, &Status::invalid_argument("not an image")), None);
        assert_eq!(r.delay(0, &Status::deadline_exceeded("stalled")), None);
        // CANCELLED and UNKNOWN are retried only with a transport error as their source
        // (tests/connections.rs makes real ones).
        assert_eq!(r.delay(0, &Status::cancelled("the caller gave up")), None);
        assert_eq!(r.delay(0, &Status::unknown("a bug")), None);
        let far = RetryArgs { retries: 20, backoff: 0.5 };
        assert!(far.delay(15, &down).unwrap() <= Duration::from_secs(30));
    }
}
