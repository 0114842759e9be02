//! Replicas that answer for each other's jobs.
//!
//! A job lives in the memory of the replica that took it. A client's later calls about it
//! (`WatchJob`, `GetJob`, `CancelJob`) may reach another replica: a `round_robin` channel
//! spreads its calls over them, and a connection made again — after
//! `server.max_connection_age_s`, or a network blip — lands on any of them. Without help those
//! calls would say NOT_FOUND for a job that is running fine one pod away.
//!
//! With `[cluster]` configured, every job id ends with the address of its replica
//! (`3f9c0a7be41d2c55@10.1.2.3:50051`), and a replica asked about another's job forwards the
//! call there, as the same client would have made it: the same deadline, the caller's trace,
//! the caller's token (the service's for a caller without one; see `crate::callers`). Only to an address that `cluster.peers` resolves to: the id comes from
//! the client, and the call carries the token, so an id naming any other address is NOT_FOUND
//! and nothing is sent (else a client could make the server hand its token to a host of the
//! client's choosing). A `SubmitJob` with an idempotency key goes to the key's own replica
//! ([`Cluster::key_home`]), so that a submission sent again finds its job wherever it lands.
//! A forwarded call is marked, and a replica never forwards a marked call
//! again, so two replicas that disagree about an address cannot bounce a call between them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};
use tracing::warn;

use crate::callers::Caller;
use crate::config::{ClusterConfig, TlsConfig};
use crate::error::ServiceError;
use crate::pb::segmenter_client::SegmenterClient;
use crate::telemetry::TraceContext;

/// The metadata key that marks a call one replica forwarded to another (its value: the
/// forwarding replica's address, for the logs).
pub const FORWARDED_BY: &str = "s3net-forwarded-by";

/// The metadata key that makes a forwarded `SubmitJob` a question, not a submission: "do you
/// hold the job of this idempotency key, for a request of this fingerprint?" (its value: the
/// fingerprint in hex). The replica asked answers from its own jobs only, as `SubmitJob` would
/// for a known key (`existing`, or ALREADY_EXISTS for another request), and NOT_FOUND when it
/// holds none; it queues nothing and asks nobody else. See [`Cluster::key_home`] for why.
pub const KEY_LOOKUP: &str = "s3net-key-lookup";

/// How long a resolution of `cluster.peers` is trusted before an id naming an address
/// outside it makes the server look again, and the least time between two lookups.
/// Why both: pods come and go (a new one's jobs must be reachable within seconds), but ids
/// naming unknown addresses are the client's to choose, and must not make the server hammer
/// its DNS.
const FRESH: Duration = Duration::from_secs(5);
const RELOOK: Duration = Duration::from_secs(1);

/// This replica's place among the others: its own address, theirs, and a channel to each.
pub struct Cluster {
    me: SocketAddr,
    peers: Vec<String>,
    known: Mutex<Known>,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    /// The last health check of each replica a key's job was sent to, and when.
    health: Mutex<HashMap<SocketAddr, (Instant, bool)>>,
    /// The service's token sent to the other replicas; a reload replaces it ([`Cluster::set_token`]).
    token: RwLock<Option<String>>,
    /// TLS to the other replicas (with this replica's certificate where they ask for one); a
    /// reload of `[server.tls]` replaces it ([`Cluster::install_tls`]).
    tls: RwLock<Option<ClientTlsConfig>>,
    connect_timeout: Duration,
    max_message_bytes: usize,
}

/// TLS to the other replicas: `cluster.ca` verifies them, and where they ask for a client
/// certificate (`server.tls.client_ca`), this replica's own is it. None without `server.tls`.
fn client_tls(cfg: &ClusterConfig, peers: &[String], server_tls: Option<&TlsConfig>) -> Result<Option<ClientTlsConfig>> {
    let Some(server) = server_tls else { return Ok(None) };
    let read = crate::config::read_file;
    let ca = cfg.ca.as_deref().context("cluster.ca is required with server.tls")?;
    let name = match &cfg.server_name {
        Some(n) => n.clone(),
        None => host_of(&peers[0]).to_string(),
    };
    let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)).domain_name(name);
    if server.client_ca.is_some() {
        // The other replicas ask for a client certificate: ours.
        t = t.identity(Identity::from_pem(read(&server.cert)?, read(&server.key)?));
    }
    Ok(Some(t))
}

/// The addresses `cluster.peers` resolved to.
#[derive(Default)]
struct Known {
    addrs: HashSet<SocketAddr>,
    /// When they were resolved.
    at: Option<Instant>,
    /// When a lookup was last tried, and why it failed if it did (no name resolved).
    tried: Option<Instant>,
    failure: Option<String>,
}

impl Cluster {
    /// The cluster of this replica, listening on `port`; `None` when `cluster.peers` is empty.
    /// `token` is the service's own (`server.auth_token`), which every replica shares; with
    /// `server_tls`, the replicas talk TLS, verified by `cluster.ca`.
    pub fn new(
        cfg: &ClusterConfig,
        port: u16,
        token: Option<&str>,
        server_tls: Option<&TlsConfig>,
        max_message_bytes: usize,
    ) -> Result<Option<Cluster>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let me = cfg.advertised(port)?;
        let peers: Vec<String> = cfg.peers.iter().map(|p| p.trim().to_string()).collect();
        let tls = RwLock::new(client_tls(cfg, &peers, server_tls)?);
        Ok(Some(Cluster {
            me,
            peers,
            known: Mutex::new(Known::default()),
            channels: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            token: RwLock::new(token.map(str::to_string)),
            tls,
            connect_timeout: Duration::from_secs(cfg.connect_timeout_s.max(1)),
            max_message_bytes,
        }))
    }

    /// This replica's address, as the others reach it.
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// What this replica's job ids end with: `@` and its address.
    pub fn id_suffix(&self) -> String {
        format!("@{}", self.me)
    }

    /// The other replica that holds job `id`, if the id names one; `None` when the job, if it
    /// exists, is this replica's (its own suffix, or an id without a replica's address), or
    /// when the call was forwarded here already.
    pub fn elsewhere(&self, id: &str, meta: &MetadataMap) -> Option<SocketAddr> {
        if meta.contains_key(FORWARDED_BY) {
            return None;
        }
        let (_, addr) = id.rsplit_once('@')?;
        let addr: SocketAddr = addr.parse().ok()?;
        (addr != self.me).then_some(addr)
    }

    /// A client of replica `owner`, for a call about `about` ("job '…'", the words of an
    /// error): `ReplicaGone` unless `cluster.peers` resolves to `owner` (looked up again when
    /// the last lookup is stale).
    pub async fn client(&self, owner: SocketAddr, about: &str) -> Result<SegmenterClient<Channel>, ServiceError> {
        match self.is_peer(owner).await {
            Ok(true) => {}
            Ok(false) => return Err(ServiceError::ReplicaGone { about: about.to_string(), replica: owner.to_string() }),
            Err(why) => {
                let error = format!("cannot resolve cluster.peers ({why})");
                return Err(ServiceError::ReplicaUnreachable { about: about.to_string(), replica: owner.to_string(), error });
            }
        }
        let channel = self.channel(owner).map_err(|e| ServiceError::ReplicaUnreachable {
            about: about.to_string(),
            replica: owner.to_string(),
            error: e.to_string(),
        })?;
        Ok(SegmenterClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// The TLS to call the other replicas with `server_tls`'s certificate and `cfg`'s CA (a
    /// reload of renewed certificates), for [`Cluster::install_tls`]; an error names the file.
    pub fn load_tls(&self, cfg: &ClusterConfig, server_tls: Option<&TlsConfig>) -> Result<Option<ClientTlsConfig>> {
        client_tls(cfg, &self.peers, server_tls)
    }

    /// Calls the other replicas with `tls` from now on: the channels made with the old one are
    /// dropped, and the next call to each replica connects anew.
    pub fn install_tls(&self, tls: Option<ClientTlsConfig>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The channel to replica `addr`, made on first use (it connects when a call needs it).
    fn channel(&self, addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&addr) {
            return Ok(c.clone());
        }
        let c = self.endpoint(addr)?.connect_lazy();
        channels.insert(addr, c.clone());
        Ok(c)
    }

    /// The other replicas, as `cluster.peers` resolves now (looked up again when stale).
    pub async fn others(&self) -> Vec<SocketAddr> {
        // The replica itself is always among them; asking refreshes a stale list.
        let _ = self.is_peer(self.me).await;
        let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<SocketAddr> = k.addrs.iter().copied().filter(|a| *a != self.me).collect();
        v.sort();
        v
    }

    /// The replica that keeps idempotency key `key`, when that is another one and it takes
    /// new work now; `None` when the key is empty, the call was forwarded here already, the
    /// key is this replica's, or its replica is down or draining (this one queues the job then).
    ///
    /// Why: a key is known only to the replica that took its job, so a submission sent again
    /// with the same key (a retry whose answer was lost, a bridge that restarted) must reach
    /// that replica to find it. Each key has one home among the replicas, the same whichever
    /// replica asks: the highest of a hash of key and address (rendezvous hashing), so a
    /// replica that comes or goes moves only its own share of the keys. That share's jobs stay
    /// where they were taken (a new replica becomes the home of keys whose jobs the others
    /// hold; a home that was down or draining left its keys' jobs where they arrived), so a
    /// replica about to queue a keyed job whose key it does not hold asks the others first
    /// ([`KEY_LOOKUP`]).
    pub async fn key_home(&self, key: &str, meta: &MetadataMap) -> Option<SocketAddr> {
        if key.is_empty() || meta.contains_key(FORWARDED_BY) {
            return None;
        }
        let mut members = self.others().await;
        members.push(self.me);
        let home = members.into_iter().max_by_key(|a| (rendezvous(key, *a), *a))?;
        if home == self.me || !self.serving(home).await {
            return None;
        }
        Some(home)
    }

    /// Whether replica `addr` answers its health check with SERVING (asked at most once a
    /// second per replica). Checked before an image is sent to it: a replica that is down or
    /// draining would refuse the image only after receiving it.
    async fn serving(&self, addr: SocketAddr) -> bool {
        if let Some((at, ok)) = self.health.lock().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            if at.elapsed() < RELOOK {
                return *ok;
            }
        }
        let ok = match self.channel(addr) {
            Ok(ch) => {
                use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
                let mut health = HealthClient::new(ch);
                let check = health.check(HealthCheckRequest { service: String::new() });
                matches!(
                    tokio::time::timeout(self.connect_timeout, check).await,
                    Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
                )
            }
            Err(_) => false,
        };
        self.health.lock().unwrap_or_else(|e| e.into_inner()).insert(addr, (Instant::now(), ok));
        ok
    }

    fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint, tonic::transport::Error> {
        let tls = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // A replica that vanished without a word (node lost) fails the calls it holds
            // within about 20 s, not when TCP gives up.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(false);
        if let Some(t) = tls {
            e = e.tls_config(t)?;
        }
        Ok(e)
    }

    /// Whether `cluster.peers` resolves to `addr`; an error when it cannot be told (no name
    /// resolves, and the last addresses known do not hold `addr`): a resolver that fails must
    /// not make a live job look gone.
    async fn is_peer(&self, addr: SocketAddr) -> Result<bool, String> {
        let look = {
            let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if k.addrs.contains(&addr) && k.at.is_some_and(|t| t.elapsed() < FRESH) {
                return Ok(true);
            }
            k.tried.is_none_or(|t| t.elapsed() >= RELOOK)
        };
        if look {
            let found = self.resolve().await;
            let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            k.tried = Some(Instant::now());
            match found {
                Ok(addrs) => {
                    // Channels to the replicas that left, and what was known of their health, go
                    // with them.
                    self.channels.lock().unwrap_or_else(|e| e.into_inner()).retain(|a, _| addrs.contains(a));
                    self.health.lock().unwrap_or_else(|e| e.into_inner()).retain(|a, _| addrs.contains(a));
                    k.addrs = addrs;
                    k.at = k.tried;
                    k.failure = None;
                }
                Err(why) => k.failure = Some(why),
            }
        }
        let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match &k.failure {
            _ if k.addrs.contains(&addr) => Ok(true),
            Some(why) => Err(why.clone()),
            None => Ok(false),
        }
    }

    /// Every address the `peers` names stand for now. A name that does not resolve is
    /// skipped with a warning while another does; none resolving is an error.
    async fn resolve(&self) -> Result<HashSet<SocketAddr>, String> {
        let mut all = HashSet::new();
        let mut failures = Vec::new();
        for p in &self.peers {
            let why = match tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host(p.as_str())).await {
                Ok(Ok(addrs)) => {
                    all.extend(addrs);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer from the resolver".to_string(),
            };
            warn!(peer = %p, "cluster.peers: cannot resolve: {why}");
            failures.push(format!("{p}: {why}"));
        }
        if all.is_empty() && !failures.is_empty() {
            return Err(failures.join("; "));
        }
        Ok(all)
    }

    /// Sends `token` as the service's from now on (a reload of `server.auth_token`).
    pub fn set_token(&self, token: Option<&str>) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = token.map(str::to_string);
    }

    /// `message` as a call forwarded from this replica for `caller`: the caller's remaining
    /// deadline, the current span's trace context, the caller's own token (the replica that
    /// answers then knows the same caller, whose jobs alone it may show; the service's token
    /// for a caller without one) and the mark of a forwarded call.
    pub fn request<T>(&self, message: T, deadline: Option<Duration>, caller: &Caller) -> Request<T> {
        let mut req = Request::new(message);
        if let Some(d) = deadline {
            req.set_timeout(d);
        }
        let meta = req.metadata_mut();
        TraceContext::current().insert_into(meta);
        if let Some(b) = &caller.bearer {
            meta.insert("authorization", b.clone());
        } else if let Some(t) = &*self.token.read().unwrap_or_else(|p| p.into_inner()) {
            if let Ok(v) = MetadataValue::try_from(format!("Bearer {t}")) {
                meta.insert("authorization", v);
            }
            // A caller without a token of its own (its client certificate named it here): the
            // service's token, and who it is for.
            if !caller.name.is_empty() && *caller.name != *crate::callers::SERVICE {
                if let Ok(v) = MetadataValue::try_from(&*caller.name) {
                    meta.insert(crate::callers::ON_BEHALF_OF, v);
                }
            }
        }
        if let Ok(v) = MetadataValue::try_from(self.me.to_string()) {
            meta.insert(FORWARDED_BY, v);
        }
        req
    }

    /// The fingerprint a key lookup asks about ([`KEY_LOOKUP`]), when `meta` makes the call one:
    /// forwarded by a replica, with a well-formed fingerprint.
    pub fn key_lookup(meta: &MetadataMap) -> Option<[u8; 32]> {
        if !meta.contains_key(FORWARDED_BY) {
            return None;
        }
        let hex = meta.get(KEY_LOOKUP)?.to_str().ok()?;
        let mut fp = [0u8; 32];
        if hex.len() != 64 {
            return None;
        }
        for (i, b) in fp.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(fp)
    }

    /// Makes the forwarded `SubmitJob` `req` a lookup of its key for a request of `fingerprint`.
    pub fn ask_for_key<T>(req: &mut Request<T>, fingerprint: &[u8; 32]) {
        let hex: String = fingerprint.iter().map(|b| format!("{b:02x}")).collect();
        if let Ok(v) = MetadataValue::try_from(hex) {
            req.metadata_mut().insert(KEY_LOOKUP, v);
        }
    }
}

/// A forwarded call's failure as its caller should see it: the other replica's own status as
/// it is, except a connection that failed (or was lost under a stream), which is
/// `ReplicaUnreachable`, naming the replica.
pub fn failure(owner: SocketAddr, about: &str, s: Status) -> Status {
    match crate::error::connection_failure(&s) {
        Some(error) => ServiceError::ReplicaUnreachable { about: about.to_string(), replica: owner.to_string(), error }.into(),
        None => s,
    }
}

/// The score of replica `addr` for idempotency key `key` (see [`Cluster::key_home`]).
fn rendezvous(key: &str, addr: SocketAddr) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(addr.to_string().as_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

/// The host part of HOST:PORT (`[v6]:PORT` without its brackets).
fn host_of(host_port: &str) -> &str {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(advertise: &str, peers: &[&str]) -> Cluster {
        let cfg = ClusterConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            advertise_addr: advertise.into(),
            ..ClusterConfig::default()
        };
        Cluster::new(&cfg, 50051, Some("secret"), None, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn ids_name_their_replica() {
        let c = cluster("10.0.0.1", &["s3net-peers:50051"]);
        assert_eq!(c.id_suffix(), "@10.0.0.1:50051");
        let none = MetadataMap::new();
        assert_eq!(c.elsewhere("abc@10.0.0.1:50051", &none), None);
        assert_eq!(c.elsewhere("abc", &none), None);
        assert_eq!(c.elsewhere("abc@nonsense", &none), None);
        assert_eq!(c.elsewhere("abc@10.0.0.2:50051", &none), Some("10.0.0.2:50051".parse().unwrap()));
        let v6 = cluster("fd00::1", &["s3net-peers:50051"]);
        assert_eq!(v6.id_suffix(), "@[fd00::1]:50051");
        assert_eq!(v6.elsewhere("abc@[fd00::2]:50051", &none), Some("[fd00::2]:50051".parse().unwrap()));
        // A forwarded call is answered here, whatever its id says.
        let mut forwarded = MetadataMap::new();
        forwarded.insert(FORWARDED_BY, "10.0.0.3:50051".parse().unwrap());
        assert_eq!(c.elsewhere("abc@10.0.0.2:50051", &forwarded), None);
    }

    #[test]
    fn a_forwarded_call_carries_the_token_the_deadline_and_the_mark() {
        let c = cluster("10.0.0.1:6000", &["s3net-peers:50051"]);
        let r = c.request((), Some(Duration::from_millis(1500)), &Caller::anonymous());
        let m = r.metadata();
        assert_eq!(m.get("authorization").unwrap(), "Bearer secret");
        assert_eq!(m.get(FORWARDED_BY).unwrap(), "10.0.0.1:6000");
        assert!(m.get("grpc-timeout").is_some());
        // A named caller's call goes on with its own token: the other replica knows it too.
        let research = Caller { bearer: Some("Bearer r-token".parse().unwrap()), ..Caller::anonymous() };
        let r = c.request((), None, &research);
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer r-token");
        assert!(r.metadata().get(crate::callers::ON_BEHALF_OF).is_none());
        // One its certificate named has no token: the service's, and its name.
        let r = c.request((), None, &Caller::named("pacs"));
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer secret");
        assert_eq!(r.metadata().get(crate::callers::ON_BEHALF_OF).unwrap(), "pacs");
        // A reload's new service token, from the next call on.
        c.set_token(Some("secret-2"));
        let r = c.request((), None, &Caller::named("pacs"));
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer secret-2");
    }

    #[test]
    fn a_key_lookup_is_a_forwarded_call_with_a_fingerprint() {
        let fp: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let c = cluster("10.0.0.1", &["s3net-peers:50051"]);
        let mut r = c.request((), None, &Caller::anonymous());
        Cluster::ask_for_key(&mut r, &fp);
        assert_eq!(Cluster::key_lookup(r.metadata()), Some(fp));
        // Not forwarded (a client's own header), or malformed: a plain submission.
        let mut m = r.metadata().clone();
        m.remove(FORWARDED_BY);
        assert_eq!(Cluster::key_lookup(&m), None);
        for bad in ["00", "zz".repeat(32).as_str(), &"0".repeat(65)] {
            let mut m = r.metadata().clone();
            m.insert(KEY_LOOKUP, bad.parse().unwrap());
            assert_eq!(Cluster::key_lookup(&m), None, "{bad}");
        }
    }

    #[test]
    fn each_key_has_one_home_and_a_replica_moves_only_its_share() {
        let addrs: Vec<SocketAddr> = (1..=4).map(|i| format!("10.0.0.{i}:50051").parse().unwrap()).collect();
        let home = |key: &str, members: &[SocketAddr]| *members.iter().max_by_key(|a| (rendezvous(key, **a), **a)).unwrap();
        let keys: Vec<String> = (0..400).map(|i| format!("study-{i}")).collect();
        let mut per = HashMap::new();
        for k in &keys {
            *per.entry(home(k, &addrs)).or_insert(0) += 1;
        }
        assert!(per.values().all(|n| (60..=140).contains(n)), "{per:?}");
        // Without the fourth replica, only its keys move.
        for k in &keys {
            let before = home(k, &addrs);
            if before != addrs[3] {
                assert_eq!(home(k, &addrs[..3]), before, "{k}");
            }
        }
    }

    #[test]
    fn hosts_of_peer_names() {
        assert_eq!(host_of("s3net-peers.s3net.svc:50051"), "s3net-peers.s3net.svc");
        assert_eq!(host_of("[fd00::1]:50051"), "fd00::1");
    }

    #[tokio::test]
    async fn only_the_listed_replicas_are_called() {
        let c = cluster("127.0.0.1", &["localhost:7001", "127.0.0.2:7002"]);
        assert_eq!(c.is_peer("127.0.0.1:7001".parse().unwrap()).await, Ok(true));
        assert_eq!(c.is_peer("127.0.0.2:7002".parse().unwrap()).await, Ok(true));
        assert_eq!(c.is_peer("127.0.0.1:7002".parse().unwrap()).await, Ok(false));
        let e = c.client("192.0.2.7:50051".parse().unwrap(), "job 'abc@192.0.2.7:50051'").await.unwrap_err();
        assert!(matches!(e, ServiceError::ReplicaGone { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_resolver_that_fails_makes_no_job_look_gone() {
        let c = cluster("127.0.0.1", &["no-such-replica.invalid:7001"]);
        let e = c.client("127.0.0.1:7001".parse().unwrap(), "job 'abc@127.0.0.1:7001'").await.unwrap_err();
        assert!(matches!(e, ServiceError::ReplicaUnreachable { .. }), "{e}");
        assert!(e.to_string().contains("cannot resolve cluster.peers (no-such-replica.invalid:7001: "), "{e}");
    }
}
