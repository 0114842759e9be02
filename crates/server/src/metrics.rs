//! Prometheus metrics: what an operator needs to size and scale the service (queue depth and
//! waits, fit durations, busy workers, refusals, GPU memory), served as text on their own port.
//!
//! Every number is updated where the thing happens (the queue, the workers, the RPC layer);
//! the gauges that describe a state (queue depth, GPU memory) are read when scraped, so they
//! are never stale. One [`Metrics`] per [`crate::Server`], not a global registry: several
//! servers in one process (the tests) keep separate counts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use s3net_model::DeviceSpec;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::connections::{ConnectionLimit, HandshakeFailure};
use crate::jobs::JobQueue;
use crate::uploads::UploadBudget;

/// Job outcomes as counted by `s3net_jobs_total{outcome}`.
pub const OUTCOMES: [&str; 3] = ["completed", "failed", "cancelled"];

/// Refusal reasons as counted by `s3net_rejected_total{reason}`.
pub const REJECT_REASONS: [&str; 11] = [
    "invalid_argument",
    "queue_full",
    "queue_memory",
    "upload_memory",
    "caller_quota",
    "caller_share",
    "stalled",
    "draining",
    "unauthenticated",
    "permission_denied",
    "already_exists",
];

/// Outcomes of a reload as counted by `s3net_config_reloads_total{outcome}`.
pub const RELOAD_OUTCOMES: [&str; 2] = ["applied", "refused"];

/// Seconds since 1970, for the timestamp gauges.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabel {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabel {
    caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerOutcomeLabel {
    caller: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// Adds `delta` to a per-device gauge.
fn add(gauge: &Family<DeviceLabel, Gauge>, device: DeviceSpec, delta: i64) {
    let l = DeviceLabel {
        device: device.to_string(),
    };
    gauge.get_or_create(&l).inc_by(delta);
}

/// The service's metrics, all named `s3net_…`.
pub struct Metrics {
    registry: Registry,
    queue_depth: Gauge,
    queue_memory: Gauge,
    queue_memory_limit: Gauge,
    upload_memory: Gauge,
    upload_memory_limit: Gauge,
    /// Read when scraped (see [`Metrics::watch_uploads`]).
    uploads: std::sync::OnceLock<UploadBudget>,
    connections: Gauge,
    connections_limit: Gauge,
    connections_refused: Counter,
    connections_timed_out: Counter,
    connections_idle_closed: Counter,
    /// Read when scraped (see [`Metrics::watch_connections`]).
    connection_limit: std::sync::OnceLock<ConnectionLimit>,
    jobs: Family<OutcomeLabel, Counter>,
    caller_submitted: Family<CallerLabel, Counter>,
    caller_jobs: Family<CallerOutcomeLabel, Counter>,
    queue_wait: Histogram,
    fit_seconds: Histogram,
    fit_iterations: Histogram,
    workers_active: Family<DeviceLabel, Gauge>,
    jobs_training: Family<DeviceLabel, Gauge>,
    jobs_finishing: Family<DeviceLabel, Gauge>,
    warm_up_step: Family<DeviceLabel, Gauge<f64, AtomicU64>>,
    rejected: Family<ReasonLabel, Counter>,
    restarted: Counter,
    refitted: Counter,
    forwarded: Family<ForwardLabel, Counter>,
    reloads: Family<OutcomeLabel, Counter>,
    reload_ok: Gauge,
    reload_ok_at: Gauge<f64, AtomicU64>,
    certificates: Family<CertificateLabel, Gauge<f64, AtomicU64>>,
    tls_handshakes_failed: Family<ReasonLabel, Counter>,
    gpu_used: Family<DeviceLabel, Gauge>,
    gpu_total: Family<DeviceLabel, Gauge>,
    gpu: Option<GpuMemory>,
}

impl Default for Metrics {
    /// Metrics for a server without workers or GPUs (a queue used on its own).
    fn default() -> Self {
        Metrics::new(0, &[])
    }
}

impl Metrics {
    /// Registers every metric; `workers` are the devices of the worker threads (one entry per
    /// thread). GPU memory is reported only when a worker runs on CUDA and NVML loads.
    pub fn new(capacity: usize, workers: &[DeviceSpec]) -> Metrics {
        let mut registry = Registry::with_prefix("s3net");
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting for a worker",
            queue_depth.clone(),
        );
        let queue_capacity = Gauge::<i64>::default();
        queue_capacity.set(capacity as i64);
        registry.register(
            "queue_capacity",
            "Jobs that may wait before new work is refused (queue.capacity)",
            queue_capacity,
        );
        // The two memory budgets that refuse requests (reasons queue_memory, upload_memory):
        // how close to them a replica runs.
        let (queue_memory, queue_memory_limit) = (Gauge::default(), Gauge::default());
        registry.register(
            "queue_memory_bytes",
            "Decoded images held by the queue's memory budget: queued jobs' and those being decoded",
            queue_memory.clone(),
        );
        registry.register(
            "queue_memory_limit_bytes",
            "The queue's memory budget (queue.max_queued_bytes)",
            queue_memory_limit.clone(),
        );
        let (upload_memory, upload_memory_limit) = (Gauge::default(), Gauge::default());
        registry.register(
            "upload_memory_bytes",
            "Bytes held by requests being received, until their images are decoded",
            upload_memory.clone(),
        );
        registry.register(
            "upload_memory_limit_bytes",
            "The budget of requests being received (server.max_upload_bytes_in_flight)",
            upload_memory_limit.clone(),
        );
        // Connections are bounded too (crates/server/src/connections.rs).
        let (connections, connections_limit) = (Gauge::default(), Gauge::default());
        registry.register("connections", "Open client connections", connections.clone());
        registry.register(
            "connections_limit",
            "Connections that may be open at once (server.max_connections)",
            connections_limit.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed as soon as they were accepted because server.max_connections \
             were open",
            connections_refused.clone(),
        );
        let connections_timed_out = Counter::default();
        registry.register(
            "connections_timed_out",
            "Connections closed because they sent no HTTP/2 preface (or TLS ClientHello) within \
             server.handshake_timeout_s",
            connections_timed_out.clone(),
        );
        let connections_idle_closed = Counter::default();
        registry.register(
            "connections_idle_closed",
            "Connections closed because no call was open on them for \
             server.max_connection_idle_s",
            connections_idle_closed.clone(),
        );
        let jobs = Family::<OutcomeLabel, Counter>::default();
        for o in OUTCOMES {
            let _ = jobs.get_or_create(&OutcomeLabel { outcome: o.into() });
        }
        registry.register("jobs", "Finished jobs by outcome", jobs.clone());
        // 10 ms … ~45 min: a free worker answers at once, a long queue in minutes.
        let queue_wait = Histogram::new(exponential_buckets(0.01, 2.5, 14));
        registry.register(
            "queue_wait_seconds",
            "Time jobs waited in the queue before a worker took them",
            queue_wait.clone(),
        );
        // 50 ms … ~1.5 h: a tiny CPU fit up to a large image with the paper's settings.
        let fit_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 17));
        registry.register(
            "fit_seconds",
            "Duration of completed fits",
            fit_seconds.clone(),
        );
        let fit_iterations = Histogram::new([
            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0,
        ]);
        registry.register(
            "fit_iterations",
            "SGD steps of completed fits (early stops end below the maximum)",
            fit_iterations.clone(),
        );
        let workers_active = Family::<DeviceLabel, Gauge>::default();
        let workers_total = Family::<DeviceLabel, Gauge>::default();
        let jobs_training = Family::<DeviceLabel, Gauge>::default();
        let jobs_finishing = Family::<DeviceLabel, Gauge>::default();
        for d in workers {
            let l = DeviceLabel {
                device: d.to_string(),
            };
            workers_total.get_or_create(&l).inc();
            let _ = workers_active.get_or_create(&l);
            let _ = jobs_training.get_or_create(&l);
            let _ = jobs_finishing.get_or_create(&l);
        }
        registry.register(
            "jobs_training",
            "Jobs being fitted now, per device (a worker trains up to workers.*_batch at once)",
            jobs_training.clone(),
        );
        registry.register(
            "jobs_finishing",
            "Jobs whose fit ended and whose foreground and result are being made at the image's \
             size (each worker's finisher thread), per device",
            jobs_finishing.clone(),
        );
        registry.register(
            "workers_active",
            "Workers running a fit, per device",
            workers_active.clone(),
        );
        registry.register(
            "workers",
            "Configured worker threads, per device",
            workers_total.clone(),
        );
        let warm_up_step = Family::<DeviceLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "warm_up_step_seconds",
            "Seconds per SGD step of a lone fit on the default grid, as the device's workers \
             measured it warming up (the last one's)",
            warm_up_step.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        for r in REJECT_REASONS {
            let _ = rejected.get_or_create(&ReasonLabel { reason: r.into() });
        }
        registry.register(
            "rejected",
            "Requests refused before a job was queued, by reason",
            rejected.clone(),
        );
        let caller_submitted = Family::<CallerLabel, Counter>::default();
        registry.register(
            "caller_jobs_submitted",
            "Jobs queued, per named caller (server.callers; server.auth_token's is \"service\")",
            caller_submitted.clone(),
        );
        let caller_jobs = Family::<CallerOutcomeLabel, Counter>::default();
        registry.register(
            "caller_jobs",
            "Jobs finished, per named caller and outcome (completed, failed, cancelled); \
             submitted less finished is what a caller has queued and running",
            caller_jobs.clone(),
        );
        let restarted = Counter::default();
        registry.register(
            "jobs_restarted",
            "Jobs started over because the stack they trained in failed (e.g. out of GPU memory); \
             they train again in smaller stacks",
            restarted.clone(),
        );
        let refitted = Counter::default();
        registry.register(
            "jobs_refitted",
            "Fits made again with another seed because the job's foreground came out empty",
            refitted.clone(),
        );
        let forwarded = Family::<ForwardLabel, Counter>::default();
        registry.register(
            "forwarded_calls",
            "Calls about another replica's job forwarded to it (cluster.peers), by method and the \
             gRPC code they ended with",
            forwarded.clone(),
        );
        // As Prometheus reports its own (prometheus_config_last_reload_successful): a file
        // left invalid is ignored, which the log says once; an alert should say it until mended.
        let reloads = Family::<OutcomeLabel, Counter>::default();
        for o in RELOAD_OUTCOMES {
            let _ = reloads.get_or_create(&OutcomeLabel { outcome: o.into() });
        }
        registry.register(
            "config_reloads",
            "Reloads of [server.callers] (on SIGHUP, or when server.reload_interval_s found the \
             configuration changed), by outcome: applied, or refused (the configuration did not \
             load or was invalid, and the callers in force stayed)",
            reloads.clone(),
        );
        let reload_ok = Gauge::default();
        reload_ok.set(1);
        registry.register(
            "config_last_reload_successful",
            "1 when the last reload was applied (or none was tried since the start), 0 when it \
             was refused: the configuration on disk is not the one in force",
            reload_ok.clone(),
        );
        let reload_ok_at = Gauge::<f64, AtomicU64>::default();
        reload_ok_at.set(unix_now());
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the callers in force were loaded (the start, or the last applied reload), in \
             seconds since 1970",
            reload_ok_at.clone(),
        );
        // A certificate that expires under a running server ends its TLS calls (or the
        // replicas' calls to each other): a renewal that did not happen, or did not reach the
        // server's files, must be seen before.
        let certificates = Family::<CertificateLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the earliest certificate of each PEM file the server has loaded (at start or \
             at the last reload) expires, in seconds since 1970: server (server.tls.cert's \
             chain), client_ca (server.tls.client_ca), cluster_ca (cluster.ca); present with TLS only",
            certificates.clone(),
        );
        // A client whose certificate expired, or that does not trust this server's, fails
        // before any call: nothing else of the service sees it.
        let tls_handshakes_failed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "tls_handshakes_failed",
            "TLS handshakes that failed, by reason: client_certificate (none, or one \
             server.tls.client_ca does not vouch for: expired, another CA), rejected_by_client (the \
             client refused this server's certificate: expired, another name, a CA it does not \
             trust), protocol (not TLS, e.g. plain gRPC to a TLS port), closed (the client hung up), \
             timeout (not done within server.handshake_timeout_s); present with TLS only",
            tls_handshakes_failed.clone(),
        );
        let gpu = GpuMemory::open(workers);
        let gpu_used = Family::<DeviceLabel, Gauge>::default();
        let gpu_total = Family::<DeviceLabel, Gauge>::default();
        if gpu.is_some() {
            registry.register(
                "gpu_memory_used_bytes",
                "GPU memory in use on the device (all processes), from NVML",
                gpu_used.clone(),
            );
            registry.register(
                "gpu_memory_total_bytes",
                "GPU memory installed on the device, from NVML",
                gpu_total.clone(),
            );
        }
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version of the running s3net",
            build,
        );
        Metrics {
            registry,
            queue_depth,
            queue_memory,
            queue_memory_limit,
            upload_memory,
            upload_memory_limit,
            uploads: std::sync::OnceLock::new(),
            connections,
            connections_limit,
            connections_refused,
            connections_timed_out,
            connections_idle_closed,
            connection_limit: std::sync::OnceLock::new(),
            jobs,
            caller_submitted,
            caller_jobs,
            queue_wait,
            fit_seconds,
            fit_iterations,
            workers_active,
            jobs_training,
            jobs_finishing,
            warm_up_step,
            rejected,
            restarted,
            refitted,
            forwarded,
            reloads,
            reload_ok,
            reload_ok_at,
            certificates,
            tls_handshakes_failed,
            gpu_used,
            gpu_total,
            gpu,
        }
    }

    /// The earliest certificate of each PEM file loaded (`(which, at)`: server, client_ca,
    /// cluster_ca; seconds since 1970), in place of those loaded before (a file a reload left
    /// out is no longer reported).
    pub fn certificates_expire(&self, expiries: &[(&str, i64)]) {
        self.certificates.clear();
        for (which, at) in expiries {
            self.certificates.get_or_create(&CertificateLabel { certificate: (*which).into() }).set(*at as f64);
        }
    }

    /// The server serves TLS: every reason of `s3net_tls_handshakes_failed_total` is exported
    /// from now on, at 0 until one happens (a rate over a series that appears only with its
    /// first failure misses that failure).
    pub fn serving_tls(&self) {
        for failure in HandshakeFailure::ALL {
            let _ = self.tls_handshakes_failed.get_or_create(&ReasonLabel { reason: failure.label().into() });
        }
    }

    /// A TLS handshake failed, for `failure`.
    pub fn tls_handshake_failed(&self, failure: HandshakeFailure) {
        self.tls_handshakes_failed.get_or_create(&ReasonLabel { reason: failure.label().into() }).inc();
    }

    /// A reload of the callers was applied (`true`) or refused.
    pub fn config_reloaded(&self, applied: bool) {
        let outcome = RELOAD_OUTCOMES[usize::from(!applied)];
        self.reloads.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
        self.reload_ok.set(i64::from(applied));
        if applied {
            self.reload_ok_at.set(unix_now());
        }
    }

    /// A job reached its outcome (`completed`, `failed` or `cancelled`); `caller` submitted it
    /// (empty: a server without tokens, whose callers are not told apart).
    pub fn job_finished(&self, outcome: &str, caller: &str) {
        self.jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
        if !caller.is_empty() {
            self.caller_jobs.get_or_create(&CallerOutcomeLabel { caller: caller.into(), outcome: outcome.into() }).inc();
        }
    }

    /// A job of `caller` was queued (nothing is counted for the anonymous caller).
    pub fn job_submitted(&self, caller: &str) {
        if !caller.is_empty() {
            self.caller_submitted.get_or_create(&CallerLabel { caller: caller.into() }).inc();
        }
    }

    /// A worker took a job that waited `wait`.
    pub fn job_taken(&self, wait: Duration) {
        self.queue_wait.observe(wait.as_secs_f64());
    }

    /// A fit completed.
    pub fn fit_completed(&self, seconds: f64, iterations: usize) {
        self.fit_seconds.observe(seconds);
        self.fit_iterations.observe(iterations as f64);
    }

    /// A worker on `device` now trains `delta` more (or fewer) jobs.
    pub fn jobs_training(&self, device: DeviceSpec, delta: i64) {
        add(&self.jobs_training, device, delta);
    }

    /// `delta` more (or fewer) jobs of a worker on `device` wait for, or are in, its finisher.
    pub fn jobs_finishing(&self, device: DeviceSpec, delta: i64) {
        add(&self.jobs_finishing, device, delta);
    }

    /// A worker on `device` warmed up and measured `step_s` seconds per step of a lone fit on
    /// the default grid. Why an operator wants it: a device slower than it should be (a
    /// throttled CPU, a GPU shared with another process) shows here at start, before its jobs.
    pub fn warmed_up(&self, device: DeviceSpec, step_s: f64) {
        self.warm_up_step.get_or_create(&DeviceLabel { device: device.to_string() }).set(step_s);
    }

    /// Marks a worker on `device` busy until the returned guard drops (also on a panic).
    pub fn worker_busy(&self, device: DeviceSpec) -> BusyWorker {
        let g = self.workers_active.get_or_create(&DeviceLabel {
            device: device.to_string(),
        });
        g.inc();
        BusyWorker(g.clone())
    }

    /// `n` jobs started over after their stack failed.
    pub fn jobs_restarted(&self, n: u64) {
        self.restarted.inc_by(n);
    }

    /// A job's fit is made again because its foreground came out empty.
    pub fn job_refitted(&self) {
        self.refitted.inc();
    }

    /// A call about another replica's job was forwarded to it and ended with `code`.
    pub fn forwarded(&self, method: &str, code: tonic::Code) {
        let code = format!("{code:?}");
        self.forwarded.get_or_create(&ForwardLabel { method: method.into(), code }).inc();
    }

    /// A request was refused before it became a job; `reason` is one of [`REJECT_REASONS`]
    /// (see `ServiceError::reason`).
    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Reports what `budget` holds (read when scraped) as `s3net_upload_memory_bytes`. Set
    /// once, by the server that owns the budget.
    pub fn watch_uploads(&self, budget: UploadBudget) {
        self.upload_memory_limit.set(budget.limit_bytes() as i64);
        let _ = self.uploads.set(budget);
    }

    /// Reports the connections open under `limit` (read when scraped) as `s3net_connections`.
    /// Set once, by the server that accepts them.
    pub fn watch_connections(&self, limit: ConnectionLimit) {
        self.connections_limit.set(limit.max() as i64);
        let _ = self.connection_limit.set(limit);
    }

    /// A connection was closed on arrival: `server.max_connections` were open.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A connection was closed for saying nothing within `server.handshake_timeout_s`.
    pub fn connection_timed_out(&self) {
        self.connections_timed_out.inc();
    }

    /// A connection was closed with no call open on it for `server.max_connection_idle_s`.
    pub fn connection_idle_closed(&self) {
        self.connections_idle_closed.inc();
    }

    /// The exposition, after reading the state gauges. `openmetrics` picks the OpenMetrics
    /// text format, else the Prometheus text format 0.0.4.
    pub fn render(&self, queue: &dyn JobQueue, openmetrics: bool) -> String {
        let stats = queue.stats();
        self.queue_depth.set(stats.queued as i64);
        self.queue_memory.set(stats.image_bytes as i64);
        self.queue_memory_limit.set(stats.image_bytes_limit as i64);
        if let Some(u) = self.uploads.get() {
            self.upload_memory.set(u.held_bytes() as i64);
        }
        if let Some(c) = self.connection_limit.get() {
            self.connections.set(c.open() as i64);
        }
        if let Some(gpu) = &self.gpu {
            for (device, mem) in gpu.read() {
                let l = DeviceLabel { device };
                match mem {
                    Some((used, total)) => {
                        self.gpu_used.get_or_create(&l).set(used as i64);
                        self.gpu_total.get_or_create(&l).set(total as i64);
                    }
                    // A device NVML stopped answering for: no stale value.
                    None => {
                        self.gpu_used.remove(&l);
                        self.gpu_total.remove(&l);
                    }
                }
            }
        }
        let mut out = String::with_capacity(8 << 10);
        let r = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        // Writing to a String cannot fail.
        debug_assert!(r.is_ok());
        out
    }
}

/// Decrements `s3net_workers_active` when the fit is over.
pub struct BusyWorker(Gauge);

impl Drop for BusyWorker {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// GPU memory through NVML, loaded at run time: no NVIDIA driver, no metric, no error.
struct GpuMemory {
    nvml: nvml_wrapper::Nvml,
    /// `cuda:N` as libtorch numbers it, and how NVML finds that device.
    devices: Vec<(String, NvmlDevice)>,
}

enum NvmlDevice {
    Index(u32),
    Uuid(String),
}

impl GpuMemory {
    fn open(workers: &[DeviceSpec]) -> Option<GpuMemory> {
        let mut cuda: Vec<usize> = workers
            .iter()
            .filter_map(|d| match d {
                DeviceSpec::Cuda(i) => Some(*i),
                _ => None,
            })
            .collect();
        if cuda.is_empty() {
            return None;
        }
        cuda.sort_unstable();
        cuda.dedup();
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                info!(error = %e, "NVML not available; no GPU memory metric");
                return None;
            }
        };
        // CUDA numbers the devices it may see; NVML sees them all. CUDA_VISIBLE_DEVICES maps
        // one to the other (by index or UUID). Without it, both use the same order when
        // CUDA_DEVICE_ORDER=PCI_BUS_ID (advisable on hosts with mixed GPU models).
        let visible: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
        let devices = cuda
            .into_iter()
            .filter_map(|i| {
                let how = match &visible {
                    None => NvmlDevice::Index(i as u32),
                    Some(v) => {
                        let s = v.get(i)?;
                        match s.parse::<u32>() {
                            Ok(n) => NvmlDevice::Index(n),
                            Err(_) if s.starts_with("GPU-") || s.starts_with("MIG-") => {
                                NvmlDevice::Uuid(s.clone())
                            }
                            Err(_) => return None,
                        }
                    }
                };
                Some((format!("cuda:{i}"), how))
            })
            .collect();
        Some(GpuMemory { nvml, devices })
    }

    /// (device label, Some((used, total)) or None when NVML fails for it).
    fn read(&self) -> Vec<(String, Option<(u64, u64)>)> {
        self.devices
            .iter()
            .map(|(label, how)| {
                let dev = match how {
                    NvmlDevice::Index(n) => self.nvml.device_by_index(*n),
                    NvmlDevice::Uuid(u) => self.nvml.device_by_uuid(u.as_str()),
                };
                let mem = dev
                    .and_then(|d| d.memory_info())
                    .map(|m| (m.used, m.total))
                    .map_err(|e| debug!(device = %label, error = %e, "NVML memory query failed"))
                    .ok();
                (label.clone(), mem)
            })
            .collect()
    }
}

/// The running `/metrics` endpoint; [`MetricsEndpoint::stop`] closes it.
pub struct MetricsEndpoint {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsEndpoint {
    /// Binds `listen` and serves `GET /metrics` over HTTP/1.1 (hyper, which tonic already
    /// brings) until stopped.
    pub async fn start(
        listen: &str,
        metrics: Arc<Metrics>,
        queue: Arc<dyn JobQueue>,
    ) -> anyhow::Result<MetricsEndpoint> {
        use anyhow::Context;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (metrics.listen)"))?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Dropping the set at the end aborts the connections still open.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    r = listener.accept() => {
                        let stream = match r {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                // Out of file descriptors, say: not again at once.
                                if !crate::connections::about_one_connection(&e) {
                                    debug!(error = %e, "metrics endpoint: cannot accept connections");
                                    crate::connections::accept_pause().await;
                                }
                                continue;
                            }
                        };
                        let (metrics, queue) = (metrics.clone(), queue.clone());
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let reply = respond(&req, &metrics, &*queue);
                                async move { Ok::<_, Infallible>(reply) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .timer(hyper_util::rt::TokioTimer::new())
                                .header_read_timeout(Duration::from_secs(10))
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        info!(%addr, "metrics on http://{addr}/metrics");
        Ok(MetricsEndpoint { addr, stop, task })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes open connections.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn respond<B>(req: &Request<B>, metrics: &Metrics, queue: &dyn JobQueue) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = code;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = metrics.render(queue, openmetrics);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if openmetrics {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        }),
    );
    r
}
