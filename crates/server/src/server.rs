//! Starting and stopping the service: workers, queue, tonic server, health, reflection, and
//! the metrics endpoint.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::callers::{Callers, CallersChange};
use crate::cluster::Cluster;
use crate::tls::ServerTls;
use crate::config::{ClusterConfig, Config, TlsConfig};
use crate::connections::{ConnectionLimit, Tracked};
use crate::jobs::{JobQueue, MemoryQueue, QueueLimits};
use crate::metrics::{Metrics, MetricsEndpoint};
use crate::pb::segmenter_server::SegmenterServer;
use crate::service::SegmenterService;
use crate::uploads::{Budgeted, UploadBudget};
use crate::worker::{self, Warming, WorkerSlot};

/// When the earliest certificate in a PEM bundle expires (seconds since 1970): a chain stops
/// verifying when any of its certificates does. `None` when it holds no certificate that
/// parses (the TLS setup reports that itself).
pub fn earliest_expiry(pem: &[u8]) -> Option<i64> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(|p| p.ok())
        .filter_map(|p| p.parse_x509().ok().map(|c| c.validity().not_after.timestamp()))
        .min()
}

/// Puts the expiry of the certificates in the PEM files the server has loaded, `tls`'s and,
/// in a cluster, `cluster.ca`, into the metrics (in place of those loaded before), and warns of
/// one that has expired or expires within 30 days: a renewal that did not happen, or did not
/// reach this server's files.
fn watch_expiry(metrics: &Metrics, tls: &TlsConfig, cluster: &ClusterConfig) {
    let mut files = vec![("server", tls.cert.as_path())];
    files.extend(tls.client_ca.as_deref().map(|p| ("client_ca", p)));
    files.extend(cluster.ca.as_deref().filter(|_| cluster.enabled()).map(|p| ("cluster_ca", p)));
    let now = crate::metrics::unix_now() as i64;
    let found: Vec<(&str, &std::path::Path, i64)> =
        files.into_iter().filter_map(|(name, path)| Some((name, path, earliest_expiry(&std::fs::read(path).ok()?)?))).collect();
    metrics.certificates_expire(&found.iter().map(|(name, _, at)| (*name, *at)).collect::<Vec<_>>());
    for (name, path, at) in found {
        let days = (at - now) / 86_400;
        if at <= now {
            warn!(certificate = name, file = %path.display(), "a certificate of {} has expired: TLS calls that need it fail until it is renewed", path.display());
        } else if days < 30 {
            warn!(certificate = name, file = %path.display(), days, "a certificate of {} expires in {days} days: renew it (a renewed file is served after SIGHUP, or at the next look with server.reload_interval_s)", path.display());
        }
    }
}

/// What to say when the service listens beyond loopback unprotected: without TLS, whatever
/// crosses the network (images, results, the token) can be read on the way; without a token or
/// client certificates, whoever reaches the port can send images and read every result. Inside
/// a container or pod that may be intended, with the network itself closed off; the warning
/// says what is missing either way.
pub fn exposure_warning(addr: SocketAddr, tls: bool, client_certificates: bool, token: bool) -> Option<String> {
    if addr.ip().is_loopback() {
        return None;
    }
    let missing = match (tls, client_certificates || token) {
        (true, true) => return None,
        (false, false) => "without TLS and without a token (server.tls, server.auth_token): anyone who reaches it may send images and read results, in plain text",
        (false, true) => "without TLS (server.tls): the token, the images and the results cross the network in plain text",
        (true, false) => "without a token or client certificates (server.auth_token, server.tls.client_ca): anyone who reaches it may send images and read results",
    };
    Some(format!("listening beyond loopback {missing}"))
}

/// The largest health check or reflection request read (see where it is used).
const SMALL_REQUEST_BYTES: usize = 4 << 10;

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    queue: Arc<dyn JobQueue>,
    health: HealthReporter,
    workers: Vec<std::thread::JoinHandle<()>>,
    slots: Vec<WorkerSlot>,
    stop: oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
    /// `server.shutdown_cancels_queued`.
    cancel_queued: bool,
    metrics: Option<MetricsEndpoint>,
    /// Turned true when the server stops: ends the event streams relayed from other replicas.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Set before the drain reports NOT_SERVING, so the end of the workers' warm-up does not
    /// report SERVING after it (see [`serving_once_warm`]).
    draining: Arc<AtomicBool>,
    /// The check of every call, whose callers [`Server::reload_callers`] replaces.
    callers: Callers,
    /// The configuration it started with.
    started: Config,
    /// The counts behind `/metrics` (the reloads are counted here).
    counts: Arc<Metrics>,
    /// The other replicas, whose forwarded calls carry the service's token (a reload swaps it).
    cluster: Option<Arc<Cluster>>,
    /// `[server.tls]`, whose certificate a reload replaces.
    tls: Option<Arc<ServerTls>>,
    /// The digest of the TLS files in force ([`crate::config::ServerConfig::tls_files`]).
    tls_files: std::sync::Mutex<Option<[u8; 32]>>,
}

/// Sets the health of the server as a whole ("") and of the Segmenter service.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    match status {
        ServingStatus::Serving => health.set_serving::<SegmenterServer<SegmenterService>>().await,
        _ => health.set_not_serving::<SegmenterServer<SegmenterService>>().await,
    }
    health.set_service_status("", status).await;
}

/// Reports SERVING once every worker has warmed up, unless the server began to drain
/// meanwhile. `draining` is read again after the write: a drain that reported NOT_SERVING
/// between the first read and the write set the flag before it, and is restored.
async fn serving_once_warm(warming: Warming, health: HealthReporter, draining: Arc<AtomicBool>) {
    warming.done().await;
    if draining.load(Ordering::SeqCst) {
        return;
    }
    set_health(&health, ServingStatus::Serving).await;
    if draining.load(Ordering::SeqCst) {
        set_health(&health, ServingStatus::NotServing).await;
    } else {
        info!("every worker warmed up: serving");
    }
}

/// Renewed TLS files as loaded by a reload, before they are installed.
struct RenewedTls {
    served: Arc<rustls::ServerConfig>,
    /// For the replicas' calls to each other (None without a cluster).
    cluster: Option<Option<tonic::transport::ClientTlsConfig>>,
}

/// Puts `from`'s callers, service tokens and, where both have TLS, its TLS files into `into`:
/// what a reload changes (turning TLS on or off takes a restart).
fn take_reloadable(into: &mut Config, from: &Config) {
    into.server.callers = from.server.callers.clone();
    into.server.auth_token = from.server.auth_token.clone();
    into.server.auth_token_file = from.server.auth_token_file.clone();
    into.server.auth_tokens_accepted = from.server.auth_tokens_accepted.clone();
    if into.server.tls.is_some() && from.server.tls.is_some() {
        into.server.tls = from.server.tls.clone();
        into.server.tls_files = from.server.tls_files;
    }
}

impl Server {
    /// Binds `cfg.server.addr` (port 0 picks a free one), starts the workers and serves.
    pub async fn start(cfg: &Config) -> Result<Server> {
        cfg.validate()?;
        let cuda = s3net_model::cuda_device_count();
        let slots = worker::plan(
            cfg.workers.cpu_workers,
            cfg.workers.gpu_workers_per_device,
            cuda,
            cfg.workers.cpu_batch.unwrap_or(1),
            cfg.workers.gpu_batch.unwrap_or(16),
        );
        s3net_model::set_cuda_graphs(cfg.workers.cuda_graphs.unwrap_or(true));
        s3net_model::set_cuda_graph_max_models(cfg.workers.cuda_graph_max_jobs.unwrap_or(4));
        if let Some(f) = cfg.workers.gpu_memory_fraction {
            for d in 0..cuda {
                s3net_model::set_cuda_memory_fraction(d, f)
                    .map_err(|e| anyhow::anyhow!("workers.gpu_memory_fraction on cuda:{d}: {e}"))?;
            }
        }
        anyhow::ensure!(
            !slots.is_empty(),
            "no workers configured (workers.cpu_workers = 0 and no CUDA device)"
        );
        let cpu_slots = slots
            .iter()
            .filter(|s| s.device == s3net_model::DeviceSpec::Cpu)
            .count();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let threads = cfg
            .workers
            .torch_threads
            .unwrap_or((cores / cpu_slots.max(1)).max(1));
        tch::set_num_threads(threads as i32);

        let devices: Vec<_> = slots.iter().map(|s| s.device).collect();
        // Only CPU workers can be killed by a job too large for the host's memory (a GPU that
        // runs out fails the job with an error, see the batch's restarts).
        let cpu_job_bytes = (cpu_slots > 0)
            .then(|| cfg.workers.cpu_job_bytes(cpu_slots, crate::config::host_memory_bytes()))
            .flatten();
        if let Some(b) = cpu_job_bytes {
            info!(max_job_bytes = b, "CPU workers take jobs estimated to need at most {:.1} GB each", b as f64 / 1e9);
        }
        let metrics = Arc::new(Metrics::new(cfg.queue.capacity, &devices));
        // Bound first: a taken port fails fast, and a cluster's job ids carry the port.
        let listener = tokio::net::TcpListener::bind(&cfg.server.addr)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.server.addr))?;
        let addr = listener.local_addr()?;
        let cluster = Cluster::new(
            &cfg.cluster,
            addr.port(),
            cfg.server.auth_token.as_deref(),
            cfg.server.tls.as_ref(),
            cfg.server.max_message_bytes,
        )?
        .map(Arc::new);
        if let Some(c) = &cluster {
            info!(advertise = %c.me(), peers = ?cfg.cluster.peers, "calls about other replicas' jobs are forwarded to them");
        }
        let id_suffix = cluster.as_ref().map(|c| c.id_suffix()).unwrap_or_default();
        let stopping = tokio::sync::watch::Sender::new(false);
        let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::with_metrics(
            QueueLimits {
                capacity: cfg.queue.capacity,
                retention: Duration::from_secs(cfg.queue.retention_s),
                retention_bytes: cfg.queue.retention_bytes,
                queued_bytes: cfg.queue.max_queued_bytes,
                workers: slots.len(),
                fair_share: cfg.queue.fair_share,
                caller_share: cfg.queue.max_caller_share,
            },
            metrics.clone(),
        ).with_id_suffix(id_suffix));
        // Bound before the workers start, so that a taken port fails fast and cleanly.
        let metrics_endpoint = match cfg.metrics.listen() {
            Some(l) => Some(MetricsEndpoint::start(l, metrics.clone(), queue.clone()).await?),
            None => None,
        };
        // The workers warm up with the options of a job that sets none.
        let warming = cfg.workers.warm_up.unwrap_or(true).then(|| {
            let opts = crate::service::fit_options(&Default::default(), &cfg.defaults).unwrap_or_default();
            Warming::new(slots.len(), opts)
        });
        let draining = Arc::new(AtomicBool::new(false));
        let workers = worker::spawn(
            queue.clone(),
            &slots,
            Duration::from_millis(cfg.server.progress_interval_ms),
            cfg.workers.foreground_refits.unwrap_or(s3net_model::FOREGROUND_REFITS),
            metrics.clone(),
            warming.as_ref(),
        );

        // Health checks and reflection queries are a few bytes; tonic would collect up to its
        // default 4 MiB for each, outside the byte budget of requests (one connection of 100
        // calls that stopped just short of that held 400 MB of the server's memory).
        let (health, health_service) = tonic_health::server::health_reporter();
        let health_service = health_service.max_decoding_message_size(SMALL_REQUEST_BYTES);
        match warming {
            None => set_health(&health, ServingStatus::Serving).await,
            Some(w) => {
                set_health(&health, ServingStatus::NotServing).await;
                tokio::spawn(serving_once_warm(w, health.clone(), draining.clone()));
            }
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("cannot build the reflection service")?
            .max_decoding_message_size(SMALL_REQUEST_BYTES);

        let max = cfg.server.max_message_bytes;
        let uploads = UploadBudget::new(cfg.server.max_upload_bytes_in_flight);
        metrics.watch_uploads(uploads.clone());
        let segmenter = SegmenterServer::new(SegmenterService::new(
            queue.clone(),
            devices,
            cfg.server.max_upload_bytes,
            metrics.clone(),
        )
        .with_cpu_job_bytes(cpu_job_bytes)
        .with_upload_budget(uploads.clone())
        .with_defaults(cfg.defaults.clone())
        .with_max_message_bytes(max)
        .with_cluster(cluster.clone(), stopping.subscribe()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        let auth = Callers::new(&cfg.server.service_tokens(), &cfg.server.callers, metrics.clone());
        // Outside the token check, whose refusal reads no body: a caller without the token
        // holds nothing of the budget.
        let idle = (cfg.server.request_idle_timeout_s > 0).then(|| Duration::from_secs(cfg.server.request_idle_timeout_s));
        let segmenter = Budgeted::new(InterceptedService::new(segmenter, auth.clone()), uploads, metrics.clone(), max, idle);

        // A new connection's time to say something (crates/server/src/connections.rs).
        let handshake = Duration::from_secs(cfg.server.handshake_timeout_s);
        // HTTP/2 pings find the clients that vanished without closing their connection: their
        // streams, and the jobs those own, would otherwise live until TCP gave up on them.
        let keepalive = (cfg.server.keepalive_interval_s > 0).then(|| Duration::from_secs(cfg.server.keepalive_interval_s));
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(cfg.server.max_streams_per_connection)
            .initial_stream_window_size(cfg.server.http2_window_bytes)
            .initial_connection_window_size(cfg.server.http2_window_bytes)
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(Duration::from_secs(cfg.server.keepalive_timeout_s.max(1))));
        if cfg.server.max_connection_age_s > 0 {
            builder = builder.max_connection_age(Duration::from_secs(cfg.server.max_connection_age_s));
            if cfg.server.max_connection_age_grace_s > 0 {
                builder = builder.max_connection_age_grace(Duration::from_secs(cfg.server.max_connection_age_grace_s));
            }
        }
        // Our own TLS rather than tonic's, so that a reload can replace the certificate.
        let tls = cfg.server.tls.as_ref().map(|t| ServerTls::new(t, handshake)).transpose()?.map(Arc::new);
        if let Some(tls) = &cfg.server.tls {
            watch_expiry(&metrics, tls, &cfg.cluster);
            metrics.serving_tls();
        }
        let idle = (cfg.server.max_connection_idle_s > 0).then(|| Duration::from_secs(cfg.server.max_connection_idle_s));
        let connections = ConnectionLimit::new(cfg.server.max_connections, handshake).with_idle_timeout(idle);
        metrics.watch_connections(connections.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        // Every call counts as open on its connection while it runs (the idle timeout).
        let router = builder
            .add_service(Tracked::new(health_service, connections.clone()))
            .add_service(Tracked::new(reflection, connections.clone()))
            .add_service(Tracked::new(segmenter, connections.clone()));
        let incoming = crate::connections::incoming(listener, connections, metrics.clone());
        let stopped = async {
            let _ = stopped.await;
        };
        let serving = match &tls {
            Some(t) => tokio::spawn(router.serve_with_incoming_shutdown(crate::connections::tls_incoming(incoming, t.clone()), stopped)),
            None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped)),
        };
        let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        info!(%addr, workers = ?names, torch_threads = threads, "s3net serving");
        let mtls = cfg.server.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if let Some(w) = exposure_warning(addr, tls.is_some(), mtls, cfg.server.auth_token.is_some() || !cfg.server.callers.is_empty()) {
            warn!(%addr, "{w}");
        }
        Ok(Server {
            addr,
            queue,
            health,
            workers,
            slots,
            stop,
            serving,
            grace: Duration::from_secs(cfg.server.shutdown_grace_s),
            cancel_queued: cfg.server.shutdown_cancels_queued,
            metrics: metrics_endpoint,
            stopping,
            draining,
            callers: auth,
            started: cfg.clone(),
            counts: metrics,
            cluster,
            tls,
            tls_files: std::sync::Mutex::new(cfg.server.tls_files),
        })
    }

    /// Puts `cfg`'s named callers (`[server.callers]`), the service's tokens
    /// (`server.auth_token`, or its file's lines) and `[server.tls]`'s files in place of the
    /// running ones, for every call and new connection from now on (`s3net serve` does it on
    /// `SIGHUP`): a leaked token rotated, a caller added or given other limits, a renewed
    /// certificate served, without a restart, so without losing the queue; the replicas'
    /// forwarded calls carry the new service token and certificate. They are checked as at
    /// start; an invalid set, or TLS files that do not load, change nothing (turning TLS on or
    /// off takes a restart).
    /// Every other setting takes effect at the next start only: when `cfg` changes one, the
    /// log says so.
    /// Counted in `s3net_config_reloads_total` either way (see [`crate::reload`], which calls
    /// it on `SIGHUP` and when the configuration's files change).
    pub fn reload_callers(&self, cfg: &Config) -> Result<CallersChange> {
        let (merged, renewed) = match self.prepare_reload(cfg) {
            Ok(prepared) => prepared,
            Err(e) => {
                self.reload_refused();
                return Err(e);
            }
        };
        self.counts.config_reloaded(true);
        if let (Some(r), Some(tls), Some(new)) = (renewed, &self.tls, &merged.server.tls) {
            tls.install(r.served);
            if let (Some(c), Some(t)) = (&self.cluster, r.cluster) {
                c.install_tls(t);
            }
            *self.tls_files.lock().unwrap_or_else(|p| p.into_inner()) = merged.server.tls_files;
            watch_expiry(&self.counts, new, &merged.cluster);
            info!(cert = %new.cert.display(), "[server.tls] reloaded: new connections get its certificate");
        }
        let change = self.callers.replace(&merged.server.service_tokens(), &cfg.server.callers);
        if let Some(c) = &self.cluster {
            c.set_token(merged.server.auth_token.as_deref());
        }
        info!(
            callers = cfg.server.callers.len(),
            added = ?change.added,
            removed = ?change.removed,
            changed = ?change.changed,
            "[server.callers] reloaded"
        );
        let mut others = cfg.clone();
        take_reloadable(&mut others, &self.started);
        if others != self.started {
            warn!("the configuration changes settings other than [server.callers], server.auth_token and [server.tls]'s files: they take effect at the next start, not on reload");
        }
        Ok(change)
    }

    /// The running configuration with `cfg`'s reloadable settings, checked, and, when the TLS
    /// files changed, what they load (both the certificate served and the one the replicas call
    /// each other with), all before anything is put in force: a file missing mid-rotation
    /// changes nothing. Unchanged TLS files are not read again.
    fn prepare_reload(&self, cfg: &Config) -> Result<(Config, Option<RenewedTls>)> {
        let mut merged = self.started.clone();
        take_reloadable(&mut merged, cfg);
        merged.validate().context("[server.callers] not reloaded")?;
        let in_force = *self.tls_files.lock().unwrap_or_else(|p| p.into_inner());
        let changed = merged.server.tls_files.is_none() || merged.server.tls_files != in_force;
        let renewed = match (&self.tls, &merged.server.tls) {
            (Some(_), Some(new)) if changed => {
                let load = || -> Result<RenewedTls> {
                    let cluster = self.cluster.as_ref().map(|c| c.load_tls(&merged.cluster, Some(new))).transpose()?;
                    Ok(RenewedTls { served: ServerTls::load(new)?, cluster })
                };
                Some(load().context("[server.tls] not reloaded")?)
            }
            _ => None,
        };
        Ok((merged, renewed))
    }

    /// Counts a reload refused before [`Server::reload_callers`] (a configuration that did not
    /// load).
    pub(crate) fn reload_refused(&self) {
        self.counts.config_reloaded(false);
    }

    /// The address of the `/metrics` endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsEndpoint::local_addr)
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The workers this server runs.
    pub fn workers(&self) -> &[WorkerSlot] {
        &self.slots
    }

    /// Drains and stops: health NOT_SERVING and new work UNAVAILABLE at once, then running and
    /// queued jobs get the grace period (queued ones are cancelled at once with
    /// `server.shutdown_cancels_queued`), then the rest is cancelled and the server stops.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown_or(std::future::pending()).await
    }

    /// [`shutdown`](Self::shutdown), with the grace period cut short when `hurry` completes
    /// (`s3net serve`: a second SIGTERM or Ctrl-C, from an operator who will not wait).
    pub async fn shutdown_or(self, hurry: impl std::future::Future<Output = ()>) -> Result<()> {
        info!(
            grace_s = self.grace.as_secs_f64(),
            active = self.queue.active(),
            "draining"
        );
        self.draining.store(true, Ordering::SeqCst);
        set_health(&self.health, ServingStatus::NotServing).await;
        self.queue.drain();
        if self.cancel_queued {
            self.queue.cancel_queued("server shutting down");
        }
        let until = Instant::now() + self.grace;
        let drained = async {
            while self.queue.active() > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let hurried = tokio::select! {
            _ = drained => false,
            _ = hurry => true,
        };
        if self.queue.active() > 0 {
            let why = if hurried { "asked again to stop; cancelling now" } else { "grace period over; cancelling" };
            info!(active = self.queue.active(), "{why}");
            self.queue.cancel_all("server shutting down");
        }
        // Cancelled fits stop at their next iteration.
        while self.queue.active() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.queue.close();
        // The streams relayed from other replicas end now, each with a word on why.
        self.stopping.send_replace(true);
        let workers = self.workers;
        tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join())))
            .await?;
        // Let the event streams deliver their outcome before the connections close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.serving).await {
            Ok(r) => r?.context("server error")?,
            Err(_) => info!("connections still open after 5 s; stopping anyway"),
        }
        // Scrapable until the end, so that the last outcomes are seen.
        if let Some(m) = self.metrics {
            m.stop().await;
        }
        info!("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bundle's expiry is its earliest certificate's: a chain stops verifying with it.
    #[test]
    fn a_bundle_expires_with_its_earliest_certificate() {
        let cert = |year| {
            let mut p = rcgen::CertificateParams::new(vec!["s3net".to_string()]).unwrap();
            p.not_after = rcgen::date_time_ymd(year, 1, 1);
            p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
        };
        let at = |year: i32| (year as i64 - 1970) * 365 * 86_400 + (1970..year).filter(|y| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)).count() as i64 * 86_400;
        assert_eq!(earliest_expiry(cert(2030).as_bytes()), Some(at(2030)));
        let chain = format!("{}{}{}", cert(2031), cert(2028), cert(2035));
        assert_eq!(earliest_expiry(chain.as_bytes()), Some(at(2028)));
        assert_eq!(earliest_expiry(b"not a certificate"), None);
        assert_eq!(earliest_expiry(b""), None);
    }

    #[test]
    fn exposure_is_warned_about_beyond_loopback_only() {
        let (lo, all): (SocketAddr, SocketAddr) = ("127.0.0.1:50051".parse().unwrap(), "0.0.0.0:50051".parse().unwrap());
        let v6: SocketAddr = "[::1]:50051".parse().unwrap();
        assert_eq!(exposure_warning(lo, false, false, false), None);
        assert_eq!(exposure_warning(v6, false, false, false), None);
        assert!(exposure_warning(all, false, false, false).unwrap().contains("without TLS and without a token"));
        assert!(exposure_warning(all, false, false, true).unwrap().contains("in plain text"));
        assert!(exposure_warning(all, true, false, false).unwrap().contains("without a token or client certificates"));
        assert_eq!(exposure_warning(all, true, false, true), None);
        assert_eq!(exposure_warning(all, true, true, false), None);
    }
}
