//! The server's configuration: one typed struct, from defaults, an optional TOML file,
//! `S3NET__SECTION__KEY` environment variables and command-line flags, in that order of
//! increasing precedence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Everything `s3net serve` can be told. `Config::default()` is the embedded default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub queue: QueueConfig,
    pub workers: WorkersConfig,
    pub defaults: DefaultsConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address. Loopback by default: exposing the service is a deliberate choice.
    pub addr: String,
    /// Largest gRPC message accepted or sent, in bytes (tonic's own default is 4 MiB, too
    /// small for a CT slice with its DICOM header or a dermoscopy photo).
    pub max_message_bytes: usize,
    /// Largest image accepted by SegmentUpload (sum of its chunks), in bytes.
    pub max_upload_bytes: usize,
    /// Bytes all requests together may hold while they are received and until their images
    /// are decoded: each gRPC message from its first bytes on (its length prefix), and a
    /// SegmentUpload's image from its header's `total_bytes` (or as the chunks arrive); one
    /// more is RESOURCE_EXHAUSTED. At least `max_upload_bytes + max_message_bytes`.
    pub max_upload_bytes_in_flight: usize,
    /// Minimum time between two Progress events of one job, in milliseconds (0: every step).
    pub progress_interval_ms: u64,
    /// On SIGTERM/SIGINT, how long running jobs may go on before they are cancelled.
    pub shutdown_grace_s: u64,
    /// On SIGTERM/SIGINT, cancel the jobs that have not started at once (as retryable: our
    /// clients send them again, to another replica) instead of letting them wait through the
    /// grace for a worker. For several replicas, whose others take them at once; a lone server
    /// had better run what it can before it stops.
    pub shutdown_cancels_queued: bool,
    /// Seconds between HTTP/2 pings on a connection (0: none). A client that stops answering
    /// (power lost, network cut, no FIN or RST ever sent) is disconnected after
    /// `keepalive_timeout_s` more, and the jobs its streams own are cancelled.
    pub keepalive_interval_s: u64,
    /// Seconds to wait for a ping's answer before closing the connection.
    pub keepalive_timeout_s: u64,
    /// Seconds a request that has not been received whole may send nothing before it is
    /// dropped (DEADLINE_EXCEEDED) and the bytes it held of `max_upload_bytes_in_flight` given
    /// back (0: no limit). Why: a client that hangs with its connection open still answers the
    /// keepalive pings, so without it a stuck upload holds its share of the budget for ever.
    pub request_idle_timeout_s: u64,
    /// Connections that may be open at once; one more is closed as soon as it is accepted
    /// (its client sees UNAVAILABLE and retries). Why: each connection may hold memory outside
    /// `max_upload_bytes_in_flight` (data the server has not read yet, up to
    /// `http2_window_bytes`, and its streams' state), so this bounds what clients can pin.
    pub max_connections: usize,
    /// Seconds a new connection has to send its first bytes (HTTP/2's preface, or TLS's
    /// ClientHello) and, with TLS, to finish the TLS handshake; else it is closed. Why: under
    /// `max_connections`, silent sockets (a port scanner's, a stuck client's) would otherwise
    /// hold their places for ever.
    pub handshake_timeout_s: u64,
    /// Seconds a connection may stay open with no call on it (0: for ever); then it is closed,
    /// and its client connects again for its next call (gRPC clients do so on their own). Why:
    /// under `max_connections`, a connection that has made its handshake and then idles (a
    /// pipeline between batches, a client that leaks channels) holds a place that a working
    /// client may need, and HTTP/2 pings keep it alive for ever. A call in progress, however
    /// long (a Segment call lasts as long as its job, a WatchJob as long as it follows one),
    /// keeps its connection open.
    pub max_connection_idle_s: u64,
    /// Seconds after which a connection is asked to end (HTTP/2 GOAWAY; 0: never): its open
    /// calls go on, and the client makes its next calls on a new connection. Why: gRPC clients
    /// keep one connection for as long as it lives, so replicas added by a scale-out (the HPA
    /// in deploy/k8s) would get no calls from the clients already connected; a new connection
    /// re-resolves the service's addresses and spreads them again.
    pub max_connection_age_s: u64,
    /// Seconds a connection past `max_connection_age_s` may keep its open calls before it is
    /// closed under them (0: as long as they last; a Segment call lasts as long as its job).
    pub max_connection_age_grace_s: u64,
    /// Bytes a client may send on a connection, and on each of its calls, before the server
    /// has read them (HTTP/2's initial connection and stream windows). Why: a client can send
    /// no faster than one window per round trip, so hyper's default of 1 MiB capped an upload
    /// at about 25 MiB/s over a 40 ms link whatever its bandwidth; the window should cover the
    /// clients' bandwidth × round trip (8 MiB: 1 Gbit/s up to about 65 ms). It is also what a
    /// connection can make the server buffer before its requests are read (and, for a request
    /// refused at its first bytes, discard).
    pub http2_window_bytes: u32,
    /// Concurrent calls (HTTP/2 streams) one connection may have open; a client's further
    /// calls wait in the client until one ends. Bounds the state a single connection can make
    /// the server keep (a few KiB per stream).
    pub max_streams_per_connection: u32,
    /// When set, every Segmenter call must carry `authorization: Bearer <token>`: this one
    /// or a caller's. Its calls are the caller `service` (`crate::callers::SERVICE`), which
    /// sees every job; the replicas of a cluster share it.
    pub auth_token: Option<String>,
    /// A file holding `auth_token` instead (surrounding whitespace left out), e.g. a key of a
    /// Kubernetes Secret mounted as a volume, read at start and at each reload. Its first line
    /// is the token this replica sends to the others; further lines are tokens accepted as the
    /// service's too. Why: the replicas of a cluster call each other with it, so rotating it
    /// replica by replica needs a time when every replica accepts both the old and the new.
    pub auth_token_file: Option<PathBuf>,
    /// The tokens of `auth_token_file`'s further lines ([`Config::load`] fills them in).
    #[serde(skip)]
    pub auth_tokens_accepted: Vec<String>,
    pub tls: Option<TlsConfig>,
    /// A digest of the TLS files' contents (`[server.tls]`'s and `cluster.ca`) as
    /// [`Config::load`] found them: a renewed certificate changes the configuration, which a
    /// reload then puts in force. Not the contents themselves: a configuration may be printed.
    #[serde(skip)]
    pub tls_files: Option<[u8; 32]>,
    /// Named callers, each with its own bearer token (`[server.callers.NAME]`): a job belongs
    /// to the caller that submitted it, who alone (with the operators) may see it, and each
    /// caller's queued and running jobs can be bounded (see `crate::callers`). Empty: one
    /// token or none, as `auth_token` says.
    pub callers: BTreeMap<String, CallerConfig>,
    /// Seconds between two looks at the configuration (its file, the variables and flags, the
    /// token files, the TLS files); when what they load differs from the last seen, the callers,
    /// `auth_token` and `[server.tls]`'s files are reloaded as on `SIGHUP` (0: on `SIGHUP`
    /// only). Why: a token rotated in a mounted Kubernetes Secret, a renewed certificate or an
    /// edited ConfigMap reaches the pod's files, but no process there gets a signal, and a
    /// restart would lose the queue.
    pub reload_interval_s: u64,
}

/// One named caller (`[server.callers.NAME]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    /// Its bearer token (`authorization: Bearer <token>`); may be empty when
    /// `certificate_names` names it.
    #[serde(default)]
    pub token: String,
    /// A file holding its tokens instead of `token`, one per line (surrounding whitespace and
    /// blank lines left out): read at start and at each reload, so that a token rotated in the
    /// file (a mounted Kubernetes Secret's key) is put in force by `SIGHUP` or
    /// `server.reload_interval_s`. Several lines are several tokens of this one caller, each
    /// accepted: a new token added beside the old one while the clients move over, the old
    /// line removed after, is a rotation no call notices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The tokens read from `token_file` ([`Config::load`] fills them in; never written out).
    #[serde(skip)]
    pub file_tokens: Vec<String>,
    /// Names its client certificate carries under mutual TLS (`server.tls.client_ca`): a
    /// call whose verified certificate has one of them as its subject's common name or as a
    /// subject alternative name (DNS name, URI, e-mail address) is this caller's, without a
    /// token. Why: where a hospital's PKI already issues each system its certificate, a
    /// second secret per client is one more thing to rotate and to leak.
    /// In a `S3NET__SERVER__CALLERS__NAME__CERTIFICATE_NAMES` variable: comma-separated.
    #[serde(default, deserialize_with = "names_or_list")]
    pub certificate_names: Vec<String>,
    /// Jobs it may have queued and running at once; one more is RESOURCE_EXHAUSTED with a
    /// retry hint (0: no limit but the queue's).
    #[serde(default)]
    pub max_active_jobs: u32,
    /// Sees, watches, reads and cancels every caller's jobs, not only its own.
    #[serde(default)]
    pub operator: bool,
    /// The highest queue priority its jobs get: a request asking for more runs at this one
    /// (its result's applied options say so). Unset: any.
    #[serde(default)]
    pub max_priority: Option<i32>,
    /// Its share of the workers against the other callers' when jobs of several wait at one
    /// priority (`queue.fair_share`): each of its jobs counts as its work (steps × grid
    /// pixels) divided by this weight, and the caller given the least work so far goes next.
    /// 1 to 1000; unset: 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A list from a file, or from an environment variable one string of comma-separated names
/// (the loader parses lists only for keys it knows by name, and a caller's name is not known).
fn names_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Names::deserialize(d)? {
        Names::One(s) => s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        Names::Many(v) => v,
    })
}

impl CallerConfig {
    /// Every token that names this caller: `token`, or the lines of `token_file`.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.token.as_str()).filter(|t| !t.is_empty()).chain(self.file_tokens.iter().map(String::as_str))
    }
}

impl Default for CallerConfig {
    fn default() -> Self {
        CallerConfig { token: String::new(), token_file: None, file_tokens: Vec::new(), certificate_names: Vec::new(), max_active_jobs: 0, operator: false, max_priority: None, weight: 1 }
    }
}

impl ServerConfig {
    /// Every token of the caller `service`: `auth_token` (the one sent to the other replicas)
    /// and `auth_tokens_accepted`.
    pub fn service_tokens(&self) -> Vec<&str> {
        self.auth_token.iter().chain(&self.auth_tokens_accepted).map(String::as_str).collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:50051".into(),
            max_message_bytes: 64 << 20,
            max_upload_bytes: 256 << 20,
            max_upload_bytes_in_flight: 1 << 30,
            progress_interval_ms: 100,
            shutdown_grace_s: 30,
            shutdown_cancels_queued: false,
            keepalive_interval_s: 30,
            keepalive_timeout_s: 20,
            request_idle_timeout_s: 60,
            max_connections: 256,
            handshake_timeout_s: 10,
            max_connection_idle_s: 600,
            max_connection_age_s: 0,
            max_connection_age_grace_s: 0,
            max_streams_per_connection: 256,
            http2_window_bytes: 8 << 20,
            auth_token: None,
            auth_token_file: None,
            auth_tokens_accepted: Vec::new(),
            tls: None,
            tls_files: None,
            callers: BTreeMap::new(),
            reload_interval_s: 0,
        }
    }
}

/// TLS with the server's certificate; mutual TLS when `client_ca` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Which queue and job store: only "memory" (in-process) for now.
    pub backend: String,
    /// Jobs that may wait for a worker; one more is RESOURCE_EXHAUSTED.
    pub capacity: usize,
    /// How long finished jobs (and their results) are kept, in seconds.
    pub retention_s: u64,
    /// Memory budget for kept results, in bytes; the oldest are evicted first when exceeded.
    pub retention_bytes: usize,
    /// Memory budget for the decoded images of queued jobs (4 bytes per sample), in bytes;
    /// beyond it new work is RESOURCE_EXHAUSTED like a full queue.
    pub max_queued_bytes: usize,
    /// Among queued jobs of one priority, the callers take turns by the work each has been
    /// given over its weight (`server.callers.NAME.weight`; start-time fair queueing, see
    /// `crate::fair`), each caller's own in arrival order; false: arrival order alone. Why: a
    /// caller that queued 60 jobs would otherwise hold every worker until they all ran, and
    /// another caller's one study would wait behind them. One caller (no named callers) is
    /// arrival order either way.
    pub fair_share: bool,
    /// The most of the queue's places one named caller may hold (a fraction of `capacity`;
    /// 1: no bound but the queue's). Why: turns put another caller's job first once it is
    /// queued, but a queue one caller filled refuses everyone else's; this keeps room for them
    /// without a `max_active_jobs` for each caller. Not for the anonymous caller or
    /// `server.auth_token`'s (each the only caller of its server).
    pub max_caller_share: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: "memory".into(),
            capacity: 64,
            retention_s: 600,
            retention_bytes: 256 << 20,
            max_queued_bytes: 2 << 30,
            fair_share: true,
            max_caller_share: 0.75,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersConfig {
    /// CPU workers. Unset: 1 when no CUDA device is present, else 0.
    pub cpu_workers: Option<usize>,
    /// Workers per CUDA device (unset: 2). Ignored without CUDA.
    pub gpu_workers_per_device: Option<usize>,
    /// Jobs a CPU worker trains together as one batch (unset: 1). A CPU is busy with one fit
    /// already, so batching buys it little.
    pub cpu_batch: Option<usize>,
    /// Jobs a GPU worker trains together as one batch (unset: 16): one stack of networks, one
    /// step for all. Only queued jobs with the same network shape join; a lone job runs alone.
    pub gpu_batch: Option<usize>,
    /// Whether GPU workers replay a stack's steps (a lone job's, or up to `cuda_graph_max_jobs`
    /// jobs') as CUDA graphs once the stack is steady (unset: true; process-wide, see
    /// `s3net_model::set_cuda_graphs`). Off queues every kernel one by one; same results.
    pub cuda_graphs: Option<bool>,
    /// The largest stack of jobs a GPU worker replays as a CUDA graph (unset: 4; process-wide,
    /// see `s3net_model::set_cuda_graph_max_models`). A stack changes whenever one of its jobs
    /// ends or another joins, and each change costs a new capture: with 160 jobs in stacks of
    /// 16 the server's steady rate was 4–6 % lower with graphs up to 64 than up to 4 (one run
    /// each on an H200), while steady batches (`s3net bench fit`) gain 5–7 % from them.
    pub cuda_graph_max_jobs: Option<usize>,
    /// The most of each GPU's memory this process may hold, in (0, 1] (unset: all of it). A
    /// batch that would need more starts its jobs over in smaller stacks. For a GPU shared
    /// with other services.
    pub gpu_memory_fraction: Option<f64>,
    /// How many times a job whose foreground comes out empty is fitted again, each time with
    /// another seed (unset: 1; 0 never). An empty mask is the one failed fit the service can
    /// see without ground truth; an image with truly nothing to find costs one more fit.
    pub foreground_refits: Option<usize>,
    /// libtorch intra-op threads (process-wide). Unset: the CPU cores divided among the CPU workers.
    pub torch_threads: Option<usize>,
    /// The most host memory one job may need, by its options' estimate
    /// (`FitOptions::host_memory_estimate`), for a server with CPU workers to take it, in bytes;
    /// a larger job is refused with INVALID_ARGUMENT before it is queued. Unset: see
    /// [`WorkersConfig::cpu_job_bytes`]. Why: a CPU fit that needs more memory than the host
    /// has is not an error but the kernel's out-of-memory killer, which ends the server and
    /// every job in it.
    pub max_job_bytes: Option<u64>,
    /// Whether each worker first runs a few steps of tiny fits on its device
    /// (`s3net_model::warm_up`), with health NOT_SERVING until every worker has (unset: true).
    /// Why: the first steps on a fresh thread and GPU load every kernel and make cuBLAS's and
    /// cuDNN's handles; without it the first jobs of each worker pay about a second for that
    /// on a GPU (0.1 s on a CPU) while others queue behind them. Jobs that arrive meanwhile
    /// are queued.
    pub warm_up: Option<bool>,
}

/// The process's own memory before any job: libtorch loaded, the server running (measured
/// 0.55 GB, rounded up).
const RUNTIME_BYTES: u64 = 600 << 20;

impl WorkersConfig {
    /// The memory budget of one job on a CPU worker: `max_job_bytes` when set; else four
    /// fifths of `host_bytes` (the machine's memory or its cgroup's limit, whichever is
    /// smaller: [`host_memory_bytes`]), less the runtime's 0.6 GB, shared among the jobs the
    /// CPU workers may run at once (`cpu_workers × cpu_batch`). The fifth left over is for the
    /// queued images, the kept results and the rest of the machine. `None` without either.
    pub fn cpu_job_bytes(&self, cpu_workers: usize, host_bytes: Option<u64>) -> Option<u64> {
        if self.max_job_bytes.is_some() {
            return self.max_job_bytes;
        }
        let jobs = (cpu_workers.max(1) * self.cpu_batch.unwrap_or(1).max(1)) as u64;
        host_bytes.map(|h| (h / 5 * 4).saturating_sub(RUNTIME_BYTES) / jobs)
    }
}

/// A file the configuration or a flag names (a PEM certificate, key or CA bundle), with its
/// path in the error.
pub fn read_file(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// The memory this process may use: the machine's (`MemTotal`), or its cgroup's limit
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`) when that is smaller, as in a container.
/// `None` where neither can be read (not Linux).
pub fn host_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// Replicas that answer for each other's jobs (`crate::cluster`); off while `peers` is empty.
/// Why: a job lives in the memory of the replica that took it, but a client's later calls
/// about it (WatchJob, GetJob, CancelJob) can reach another replica: a `round_robin` channel
/// spreads its calls, and a connection made again (after `server.max_connection_age_s`, say)
/// lands anywhere. With this set, each job id names its replica and the others forward such
/// calls to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// HOST:PORT names whose addresses are the service's replicas (this one included), e.g. a
    /// headless Kubernetes Service that lists every pod, ready or not. A call is forwarded
    /// only to an address these resolve to: a job id names an address, and the server sends
    /// its token there. Empty: no cluster.
    pub peers: Vec<String>,
    /// The address the other replicas reach this one at, as `peers` resolves it: an IP (the
    /// listening port is added) or IP:PORT. In Kubernetes, the pod's IP. Required with `peers`.
    pub advertise_addr: String,
    /// PEM CA bundle that signed the replicas' server certificates; required with
    /// `[server.tls]` (the replicas then talk TLS, and present `server.tls.cert` as their client
    /// certificate when `server.tls.client_ca` is set).
    pub ca: Option<PathBuf>,
    /// The name the replicas' certificates carry (they are reached by IP). Unset: the host of
    /// the first `peers` entry.
    pub server_name: Option<String>,
    /// Seconds to connect to a replica before the forwarded call is UNAVAILABLE.
    pub connect_timeout_s: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { peers: Vec::new(), advertise_addr: String::new(), ca: None, server_name: None, connect_timeout_s: 2 }
    }
}

impl ClusterConfig {
    /// Whether replicas forward calls to each other.
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty()
    }

    /// This replica's address for the others: `advertise_addr`, with `port` (the listening
    /// one) when it names an IP alone.
    pub fn advertised(&self, port: u16) -> Result<std::net::SocketAddr> {
        let a = self.advertise_addr.trim();
        if let Ok(ip) = a.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
            return Ok(std::net::SocketAddr::new(ip, port));
        }
        a.parse().map_err(|_| {
            anyhow::anyhow!(
                "cluster.advertise_addr must be an IP address or IP:PORT (e.g. the pod's IP), got {a:?}"
            )
        })
    }
}

/// Fit options for the requests that leave them unset; a key unset here leaves the preset's
/// value. Why: a site sets its policy once — bfloat16 activations on a GPU server for
/// throughput, a smaller grid, fewer steps — rather than in every client. A request's own
/// value always wins, and its result's applied options say what ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultsConfig {
    /// "default", "paper" or "reference".
    pub preset: Option<String>,
    pub iterations: Option<u32>,
    pub min_labels: Option<u32>,
    pub size: Option<u32>,
    pub features: Option<u32>,
    /// "float32" or "bfloat16".
    pub precision: Option<String>,
    /// The free offsets' learning rate as a multiple of the preset's (`FitOptions::offset_lr`)
    /// for requests that do not set `offset_lr`: 3000 trades single-cluster Dice for a better
    /// returned mask (README, "Choosing the default").
    pub offset_lr: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: String,
    /// A tracing `EnvFilter` directive; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

/// The Prometheus endpoint. It has its own port so that scraping never competes with (or needs
/// the credentials of) the gRPC listener, and so that it can stay on an internal interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// HOST:PORT of `GET /metrics` (Prometheus text format); empty disables the endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// Distributed tracing. Off unless an endpoint is set: then no exporter and no background
/// thread exist at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317` (`https://` for TLS with the
    /// system's roots). Unset or empty: no trace export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Fraction of new traces recorded, 0.0 to 1.0; a caller's sampled `traceparent` is
    /// always followed.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "s3net".into(),
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// The collector to export to: `None` when unset or blank (so that an empty
    /// `S3NET__TELEMETRY__OTLP_ENDPOINT` switches export off).
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }
}

impl MetricsConfig {
    /// The endpoint's address, `None` when disabled.
    pub fn listen(&self) -> Option<&str> {
        Some(self.listen.trim()).filter(|l| !l.is_empty())
    }
}

/// The tokens in `path` (`key` names the setting in errors), one per line, each without its
/// surrounding whitespace (a file written by `echo` or `kubectl create secret --from-file`
/// ends with a newline), blank lines and repeats left out; at least one. No token ever appears
/// in an error.
fn read_tokens(key: &str, path: &Path) -> Result<Vec<String>> {
    // A token is a line; anything this long is the wrong file, not to be held in memory.
    const MAX: u64 = 64 << 10;
    let len = std::fs::metadata(path).with_context(|| format!("{key}: cannot read {}", path.display()))?.len();
    anyhow::ensure!(len <= MAX, "{key}: {} holds {len} bytes, more than a token ({MAX} at most)", path.display());
    let bytes = std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{key}: {} is not UTF-8 text", path.display()))?;
    let mut tokens: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !tokens.iter().any(|t| t == line) {
            tokens.push(line.to_string());
        }
    }
    anyhow::ensure!(!tokens.is_empty(), "{key}: {} is empty", path.display());
    Ok(tokens)
}

/// Whether `s` looks like HOST:PORT (`[v6]:PORT` included); names are resolved at bind time.
fn is_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok()
                && !host.is_empty()
                && !host.contains([':', '/', ' ', '[', ']'])
        }
        None => false,
    }
}

impl Config {
    /// Defaults, then `file` (if given, it must exist), then `S3NET__…` variables, then
    /// `overrides` (dotted keys, e.g. `("server.addr", "0.0.0.0:50051")`).
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config> {
        // Missing keys take the serde defaults above.
        let mut b = config::Config::builder();
        if let Some(f) = file {
            anyhow::ensure!(f.exists(), "config file {} does not exist", f.display());
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("S3NET")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // S3NET__CLUSTER__PEERS="a:50051,b:50051"
                .list_separator(",")
                .with_list_parse_key("cluster.peers"),
        );
        for (k, v) in overrides {
            b = b.set_override(*k, v.clone())?;
        }
        let mut c: Config = b
            .build()?
            .try_deserialize()
            .context("invalid configuration")?;
        c.read_token_files()?;
        c.server.tls_files = c.tls_files();
        c.validate()?;
        Ok(c)
    }

    /// The digest of [`ServerConfig::tls_files`]: each file's bytes, or why it could not be
    /// read (the server's start or the reload reports that, naming the file).
    fn tls_files(&self) -> Option<[u8; 32]> {
        use sha2::Digest;
        let tls = self.server.tls.as_ref()?;
        let mut h = sha2::Sha256::new();
        for path in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref(), self.cluster.ca.as_ref()].into_iter().flatten() {
            match std::fs::read(path) {
                Ok(bytes) => h.update(sha2::Sha256::digest(&bytes)),
                Err(e) => h.update(format!("{}: {e}", path.display()).as_bytes()),
            }
        }
        Some(h.finalize().into())
    }

    /// Reads `server.auth_token_file` into `server.auth_token` (its first line) and
    /// `server.auth_tokens_accepted` (the others), and each
    /// `server.callers.NAME.token_file` into its `file_tokens`; the token beside a file must be
    /// unset: one place for one secret.
    fn read_token_files(&mut self) -> Result<()> {
        if let Some(path) = &self.server.auth_token_file {
            anyhow::ensure!(
                self.server.auth_token.is_none(),
                "server.auth_token and server.auth_token_file are both set: give the token one way"
            );
            let mut tokens = read_tokens("server.auth_token_file", path)?.into_iter();
            self.server.auth_token = tokens.next();
            self.server.auth_tokens_accepted = tokens.collect();
        }
        for (name, c) in self.server.callers.iter_mut() {
            if let Some(path) = &c.token_file {
                anyhow::ensure!(
                    c.token.is_empty(),
                    "server.callers.{name}.token and server.callers.{name}.token_file are both set: give the token one way"
                );
                c.file_tokens = read_tokens(&format!("server.callers.{name}.token_file"), path)?;
            }
        }
        Ok(())
    }

    /// The configuration as a TOML file that loads back to it, every key that has a value
    /// written out (the unset ones, which the server decides at start, left out), the tokens
    /// replaced by `"<redacted>"` and `"<redacted server.callers.NAME.token>"` and those read
    /// from files left out (the files are named; `s3net serve
    /// --print-config`). Why: the effective
    /// settings come from defaults, a file, `S3NET__…` variables and flags; an operator who
    /// wonders which one won needs to see the result, without a secret in the terminal.
    pub fn to_toml(&self) -> Result<String> {
        let mut c = self.clone();
        if c.server.auth_token_file.is_some() {
            c.server.auth_token = None;
        } else if c.server.auth_token.is_some() {
            c.server.auth_token = Some("<redacted>".into());
        }
        // Each its own placeholder: a file with two equal tokens would not load.
        for (name, caller) in c.server.callers.iter_mut() {
            if !caller.token.is_empty() {
                caller.token = format!("<redacted server.callers.{name}.token>");
            }
        }
        toml::to_string(&c).context("cannot write the configuration as TOML")
    }

    /// Rejects settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.queue.backend == "memory",
            "queue.backend: only \"memory\" is available, got {:?}",
            self.queue.backend
        );
        anyhow::ensure!(
            self.server.max_message_bytes >= 1024,
            "server.max_message_bytes must be at least 1024"
        );
        // 0 would refuse every job as "queue is full (0 jobs waiting)", retry hint and all.
        anyhow::ensure!(self.queue.capacity >= 1, "queue.capacity must be at least 1 (jobs waiting for a worker)");
        anyhow::ensure!(
            self.server.max_upload_bytes_in_flight
                >= self.server.max_upload_bytes.saturating_add(self.server.max_message_bytes),
            "server.max_upload_bytes_in_flight ({}) must be at least server.max_upload_bytes + \
             server.max_message_bytes ({} + {}): else the largest upload allowed, with the \
             message in transit, could never be received",
            self.server.max_upload_bytes_in_flight,
            self.server.max_upload_bytes,
            self.server.max_message_bytes
        );
        anyhow::ensure!(
            self.server.max_connections >= 1 && self.server.max_streams_per_connection >= 1,
            "server.max_connections and server.max_streams_per_connection must be at least 1"
        );
        anyhow::ensure!(
            (65_535..=(1 << 31) - 1).contains(&self.server.http2_window_bytes),
            "server.http2_window_bytes must be in 65535..=2147483647 (HTTP/2's smallest and largest window), got {}",
            self.server.http2_window_bytes
        );
        anyhow::ensure!(self.server.handshake_timeout_s >= 1, "server.handshake_timeout_s must be at least 1");
        anyhow::ensure!(
            matches!(self.log.format.as_str(), "text" | "json"),
            "log.format must be \"text\" or \"json\""
        );
        anyhow::ensure!(
            self.workers.torch_threads != Some(0),
            "workers.torch_threads must be at least 1"
        );
        anyhow::ensure!(
            self.workers.cpu_batch != Some(0) && self.workers.gpu_batch != Some(0),
            "workers.cpu_batch and workers.gpu_batch must be at least 1"
        );
        crate::service::fit_options(&crate::pb::Options::default(), &self.defaults)
            .map_err(|e| anyhow::anyhow!("defaults: {e}"))?;
        anyhow::ensure!(
            self.workers.max_job_bytes != Some(0),
            "workers.max_job_bytes must be at least 1 (unset it for the automatic budget)"
        );
        if let Some(f) = self.workers.gpu_memory_fraction {
            anyhow::ensure!(
                f > 0.0 && f <= 1.0,
                "workers.gpu_memory_fraction must be in (0, 1], got {f}"
            );
        }
        if let Some(l) = self.metrics.listen() {
            anyhow::ensure!(
                is_host_port(l),
                "metrics.listen must be HOST:PORT (or empty to disable), got {l:?}"
            );
        }
        if let Some(e) = self.telemetry.endpoint() {
            let ok = e
                .parse::<tonic::codegen::http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
                .and_then(|u| u.host().map(|h| !h.is_empty()))
                .unwrap_or(false);
            anyhow::ensure!(
                ok,
                "telemetry.otlp_endpoint must be an http:// or https:// URL such as \
                 \"http://otel-collector:4317\", got {e:?}"
            );
        }
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.telemetry.sample_ratio),
            "telemetry.sample_ratio must be between 0.0 and 1.0, got {}",
            self.telemetry.sample_ratio
        );
        anyhow::ensure!(
            !self.telemetry.service_name.trim().is_empty(),
            "telemetry.service_name must not be empty"
        );
        anyhow::ensure!(
            self.queue.max_caller_share > 0.0 && self.queue.max_caller_share <= 1.0,
            "queue.max_caller_share must be above 0 and at most 1, got {}",
            self.queue.max_caller_share
        );
        self.validate_callers()?;
        self.validate_cluster()
    }

    /// Caller names that read the same in a TOML file and in `S3NET__SERVER__CALLERS__NAME__…`
    /// variables (which the loader lowercases), tokens that name one caller each.
    fn validate_callers(&self) -> Result<()> {
        let mut tokens: Vec<(&str, &str)> = self.server.service_tokens().into_iter().map(|t| (crate::callers::SERVICE, t)).collect();
        let mut cert_names: Vec<(&str, &str)> = Vec::new();
        for (name, c) in &self.server.callers {
            let well_formed = name.chars().next().is_some_and(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-');
            anyhow::ensure!(
                well_formed,
                "server.callers: a caller's name must be lowercase letters, digits, '_' and '-', \
                 starting with a letter or digit, got {name:?}"
            );
            anyhow::ensure!(
                name != crate::callers::SERVICE,
                "server.callers: \"{}\" is the name of server.auth_token's caller; choose another",
                crate::callers::SERVICE
            );
            anyhow::ensure!(
                c.token.is_empty() || !c.token.trim().is_empty(),
                "server.callers.{name}.token must not be empty (leave it out where certificate_names names the caller)"
            );
            anyhow::ensure!(
                c.tokens().next().is_some() || !c.certificate_names.is_empty(),
                "server.callers.{name} needs a token (server.callers.{name}.token or .token_file) or the names of its client certificate (server.callers.{name}.certificate_names)"
            );
            anyhow::ensure!(
                c.certificate_names.is_empty() || self.server.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
                "server.callers.{name}.certificate_names needs mutual TLS (server.tls.client_ca): without it no client certificate is asked for"
            );
            for cert_name in &c.certificate_names {
                anyhow::ensure!(!cert_name.trim().is_empty(), "server.callers.{name}.certificate_names: a name must not be empty");
                if let Some((other, _)) = cert_names.iter().find(|(_, n)| n.eq_ignore_ascii_case(cert_name)) {
                    anyhow::bail!(
                        "server.callers.{name}.certificate_names and server.callers.{other}.certificate_names both hold {cert_name:?}: a certificate name must name one caller"
                    );
                }
                cert_names.push((name, cert_name));
            }
            anyhow::ensure!(
                (1..=1000).contains(&c.weight),
                "server.callers.{name}.weight must be between 1 and 1000, got {}",
                c.weight
            );
            for token in c.tokens() {
                if let Some((other, _)) = tokens.iter().find(|(_, t)| *t == token) {
                    let from_file = |n: &str| self.server.callers.get(n).is_some_and(|o| o.token_file.is_some());
                    let key = |n: &str| match self.server.callers.get(n) {
                        None if self.server.auth_token_file.is_some() => "server.auth_token_file".to_string(),
                        None => "server.auth_token".to_string(),
                        Some(_) if from_file(n) => format!("server.callers.{n}.token_file"),
                        Some(_) => format!("server.callers.{n}.token"),
                    };
                    let service_file = *other == crate::callers::SERVICE && self.server.auth_token_file.is_some();
                    let same = if from_file(name) || from_file(other) || service_file { "holds the same token as" } else { "is the same as" };
                    anyhow::bail!("{} {same} {}: each token must name one caller", key(name), key(other));
                }
                tokens.push((name, token));
            }
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<()> {
        let c = &self.cluster;
        if !c.enabled() {
            anyhow::ensure!(
                c.advertise_addr.trim().is_empty(),
                "cluster.advertise_addr is set but cluster.peers is empty: list the replicas' \
                 HOST:PORT names (or unset both)"
            );
            return Ok(());
        }
        for p in &c.peers {
            anyhow::ensure!(is_host_port(p.trim()), "cluster.peers entries must be HOST:PORT, got {p:?}");
        }
        anyhow::ensure!(
            !c.advertise_addr.trim().is_empty(),
            "cluster.peers is set, so cluster.advertise_addr must say where the other replicas \
             reach this one (an IP, e.g. the pod's, or IP:PORT)"
        );
        let me = c.advertised(1)?;
        anyhow::ensure!(
            !me.ip().is_unspecified(),
            "cluster.advertise_addr must be this replica's own address, not {}",
            me.ip()
        );
        anyhow::ensure!(c.connect_timeout_s >= 1, "cluster.connect_timeout_s must be at least 1");
        anyhow::ensure!(
            self.server.tls.is_none() || c.ca.is_some(),
            "server.tls is set, so the replicas talk TLS to each other: cluster.ca must name the \
             PEM CA bundle that signed their certificates"
        );
        if let Some((name, _)) = self.server.callers.iter().find(|(_, k)| !k.certificate_names.is_empty()) {
            anyhow::ensure!(
                self.server.auth_token.is_some(),
                "server.callers.{name}.certificate_names in a cluster needs server.auth_token: a replica forwards a \
                 certificate's caller's calls with it, naming the caller (its certificate stays with the first replica)"
            );
        }
        Ok(())
    }
}
