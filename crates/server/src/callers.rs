//! Who is calling: the bearer token of a call names its caller, and the caller decides what
//! the call may see and how much it may queue.
//!
//! Why: one s3net often serves several clients at once — a PACS bridge that segments each new
//! study for the clinic, a research pipeline that sends a whole archive. With one shared token
//! they are indistinguishable: the archive fills the queue and the clinic's next study is
//! refused (a queue of 64 holds 64 research slices as well as any), any client can list and
//! cancel every other's jobs, and the logs cannot say who sent what. Named callers
//! (`[server.callers.NAME]`, each with its own token) give each job an owner: a caller sees,
//! watches, reads and cancels its own jobs only (an `operator` sees all), its idempotency keys
//! are its own, and `max_active_jobs` bounds what it may have queued and running at once, so a
//! bulk client is paced by its retry hints while the others keep their room.
//!
//! [`Callers`] is the check every Segmenter call passes (a tonic interceptor): it finds the
//! caller by its token, or under mutual TLS by the names in its verified client certificate
//! (`certificate_names`), and leaves a [`Caller`] in the request's extensions for the
//! handlers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::config::CallerConfig;
use crate::metrics::Metrics;

/// The caller name of `server.auth_token`: the service's own token, shared by its replicas
/// and its operators, which sees every job and has no quota.
pub const SERVICE: &str = "service";

/// The header a replica puts on a call it forwards for a caller that has no token (one its
/// client certificate named, at the first replica): the caller's name. Believed only beside
/// the service's own token (`server.auth_token`), which the replicas alone hold.
pub const ON_BEHALF_OF: &str = "s3net-on-behalf-of";

/// The caller of a request, as its token named it. Its `Debug` leaves the token out: jobs
/// carry their caller, and a job may be printed.
#[derive(Clone)]
pub struct Caller {
    /// `[server.callers]`'s name, [`SERVICE`] for `server.auth_token`, empty when the server
    /// asks for no token (everyone is the same anonymous caller then).
    pub name: Arc<str>,
    /// Jobs it may have queued and running at once (0: no limit).
    pub max_active_jobs: u32,
    /// Whether it sees and manages every caller's jobs.
    pub operator: bool,
    /// The highest queue priority its jobs get (`None`: any).
    pub max_priority: Option<i32>,
    /// Its share of the workers against other callers' (`queue.fair_share`; at least 1).
    pub weight: u32,
    /// The `authorization` value the call came with: a call forwarded to another replica
    /// carries it, so that the replica that holds the job knows the same caller. `None` for a
    /// caller its certificate named: forwarded with the service's token and [`ON_BEHALF_OF`].
    pub bearer: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("max_active_jobs", &self.max_active_jobs)
            .field("operator", &self.operator)
            .field("max_priority", &self.max_priority)
            .field("weight", &self.weight)
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Caller {
    /// The caller of a server that asks for no token: sees everything, no quota.
    pub fn anonymous() -> Caller {
        Caller { name: Arc::from(""), max_active_jobs: 0, operator: true, max_priority: None, weight: 1, bearer: None }
    }

    /// A caller named `name` with no limits and no rights beyond its own jobs (the
    /// configuration's fields fill in the rest).
    pub fn named(name: &str) -> Caller {
        Caller { name: Arc::from(name), operator: false, ..Caller::anonymous() }
    }

    /// The caller a request carries (left by [`Callers`]); anonymous for a service served
    /// without the check (tests that run the bare service).
    pub fn of<T>(req: &Request<T>) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or_else(Caller::anonymous)
    }

    /// This caller without its token: what a job keeps of who submitted it (only forwarded
    /// calls need the token, and a job need not hold a secret for its lifetime).
    pub fn owner(&self) -> Caller {
        Caller { bearer: None, ..self.clone() }
    }

    /// Whether this caller may see and act on a job `owner` submitted.
    pub fn may_see(&self, owner: &str) -> bool {
        self.operator || *self.name == *owner
    }

    /// The priority a job of this caller that asks for `asked` gets: at most its
    /// `max_priority`. Why: a priority puts a job before every job of a lower one, so a bulk
    /// client that asked for a high one would go before the clinic's studies again.
    pub fn priority(&self, asked: i32) -> i32 {
        self.max_priority.map_or(asked, |m| asked.min(m))
    }

    /// The owner whose jobs a listing shows: `None` (all) for an operator.
    pub fn listing(&self) -> Option<&str> {
        (!self.operator).then_some(&*self.name)
    }
}

/// The check of every Segmenter call: a no-op without tokens and certificate names; with
/// them, the call's `authorization: Bearer …` must be `server.auth_token` or one of
/// `[server.callers]`'s, or its client certificate must carry one of a caller's
/// `certificate_names`, and its [`Caller`] goes into the request's extensions. Its clones share
/// one table of callers, which [`Callers::replace`] swaps (`SIGHUP`).
#[derive(Clone)]
pub struct Callers {
    table: Arc<RwLock<Arc<Table>>>,
    metrics: Arc<Metrics>,
}

/// What the check knows, as one value: a reload swaps it whole, so a call never sees half of
/// an old table and half of a new one.
struct Table {
    /// Token → caller (without its `bearer`, which each call fills in).
    tokens: Vec<(Vec<u8>, Caller)>,
    /// Certificate name, lowercased → caller.
    certificates: HashMap<String, Caller>,
    /// Every named caller by name, for the calls replicas forward [`ON_BEHALF_OF`] one.
    by_name: HashMap<String, Caller>,
    /// The configuration it was made of, what the next [`Callers::replace`] tells changes by.
    configs: BTreeMap<String, CallerConfig>,
}

/// What a [`Callers::replace`] changed, by caller name (tokens are not shown, only whether
/// something of a caller changed).
#[derive(Debug, Default, PartialEq)]
pub struct CallersChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Callers {
    /// The check for the service's tokens (`server.auth_token` and the others its file
    /// holds, see [`crate::config::ServerConfig::service_tokens`]) and `server.callers`.
    pub fn new(service_tokens: &[&str], callers: &BTreeMap<String, CallerConfig>, metrics: Arc<Metrics>) -> Callers {
        let table = Table::new(service_tokens, callers);
        Callers { table: Arc::new(RwLock::new(Arc::new(table))), metrics }
    }

    /// Puts `callers` in place of the named callers, for every call from now on: a token
    /// rotated, a caller added, removed or given other limits, without a restart (and so
    /// without losing the queue); `service_tokens` likewise (the caller `service`, listed as
    /// changed when they did). Jobs keep the caller they were submitted by; a removed caller's
    /// jobs are still there for the operators.
    pub fn replace(&self, service_tokens: &[&str], callers: &BTreeMap<String, CallerConfig>) -> CallersChange {
        let table = Arc::new(Table::new(service_tokens, callers));
        let old = std::mem::replace(&mut *self.table.write().unwrap_or_else(|p| p.into_inner()), table.clone());
        let before = &old.configs;
        let mut change = CallersChange::default();
        if table.service_tokens() != old.service_tokens() {
            change.changed.push(SERVICE.to_string());
        }
        for (name, c) in callers {
            match before.get(name) {
                None => change.added.push(name.clone()),
                Some(b) if b != c => change.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        change.removed = before.keys().filter(|n| !callers.contains_key(*n)).cloned().collect();
        change
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Table {
    fn new(service_tokens: &[&str], callers: &BTreeMap<String, CallerConfig>) -> Table {
        let mut tokens = Vec::new();
        for t in service_tokens {
            tokens.push((t.as_bytes().to_vec(), Caller { operator: true, ..Caller::named(SERVICE) }));
        }
        let (mut certificates, mut by_name) = (HashMap::new(), HashMap::new());
        for (name, c) in callers {
            let caller = Caller {
                max_active_jobs: c.max_active_jobs,
                operator: c.operator,
                max_priority: c.max_priority,
                weight: c.weight.max(1),
                ..Caller::named(name)
            };
            for token in c.tokens() {
                tokens.push((token.as_bytes().to_vec(), caller.clone()));
            }
            for n in &c.certificate_names {
                certificates.insert(n.to_ascii_lowercase(), caller.clone());
            }
            by_name.insert(name.clone(), caller);
        }
        Table { tokens, certificates, by_name, configs: callers.clone() }
    }

    /// The service's tokens, in order (what a replace compares).
    fn service_tokens(&self) -> Vec<&[u8]> {
        self.tokens.iter().filter(|(_, c)| *c.name == *SERVICE).map(|(t, _)| t.as_slice()).collect()
    }

    /// Whether every call passes as the anonymous caller: no token, no certificate name.
    fn open(&self) -> bool {
        self.tokens.is_empty() && self.certificates.is_empty()
    }

    /// The caller whose token `given` is. Every token is compared, each in constant time, so
    /// that neither the time nor the order of the list tells a guesser anything.
    fn find(&self, given: &[u8]) -> Option<&Caller> {
        let mut found = None;
        for (token, caller) in self.tokens.iter() {
            if constant_time_eq(given, token) && found.is_none() {
                found = Some(caller);
            }
        }
        found
    }

    /// The caller the client certificate of `req` names (its first, the client's own, as
    /// the TLS handshake verified it against `server.tls.client_ca`): `Ok(None)` without a
    /// certificate or when none of its names is a caller's; an error when its names are two
    /// callers'.
    fn by_certificate<T>(&self, req: &Request<T>) -> Result<Option<&Caller>, String> {
        if self.certificates.is_empty() {
            return Ok(None);
        }
        let Some(certs) = req.peer_certs() else { return Ok(None) };
        let Some(leaf) = certs.first() else { return Ok(None) };
        let mut found: Option<&Caller> = None;
        for name in certificate_names(leaf.as_ref()) {
            if let Some(c) = self.certificates.get(&name.to_ascii_lowercase()) {
                match found {
                    Some(f) if f.name != c.name => {
                        return Err(format!("the client certificate names two callers, '{}' and '{}' (server.callers.NAME.certificate_names)", f.name, c.name));
                    }
                    _ => found = Some(c),
                }
            }
        }
        Ok(found)
    }

    /// Who `req` is, or why it is refused.
    fn identify<T>(&self, req: &Request<T>) -> Result<Caller, String> {
        let by_certificate = self.by_certificate(req)?;
        let header = req.metadata().get("authorization");
        let Some(header) = header else {
            return match by_certificate {
                Some(c) => Ok(c.clone()),
                None if self.certificates.is_empty() => Err("missing or wrong bearer token".into()),
                None => Err("missing or wrong bearer token, and no client certificate that names a caller (server.callers.NAME.certificate_names)".into()),
            };
        };
        let given = header.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));
        let Some(by_token) = given.and_then(|g| self.find(g.as_bytes())) else {
            return Err("missing or wrong bearer token".into());
        };
        if *by_token.name == *SERVICE {
            if let Some(v) = req.metadata().get(ON_BEHALF_OF) {
                let name = v.to_str().unwrap_or("");
                return match self.by_name.get(name) {
                    Some(c) => Ok(c.clone()),
                    None => Err(format!("a call forwarded on behalf of caller {name:?}, which this replica does not know: every replica needs the same server.callers")),
                };
            }
            return Ok(Caller { bearer: Some(header.clone()), ..by_token.clone() });
        }
        if let Some(c) = by_certificate {
            if c.name != by_token.name {
                return Err(format!(
                    "the client certificate is caller '{}''s and the bearer token caller '{}''s: one call, one caller",
                    c.name, by_token.name
                ));
            }
        }
        Ok(Caller { bearer: Some(header.clone()), ..by_token.clone() })
    }
}

impl tonic::service::Interceptor for Callers {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let table = self.table();
        if table.open() {
            return Ok(req);
        }
        match table.identify(&req) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Ok(req)
            }
            Err(why) => {
                self.metrics.rejected("unauthenticated");
                Err(Status::unauthenticated(why))
            }
        }
    }
}

/// The names a certificate (DER) carries: its subject's common names and its subject
/// alternative names that are DNS names, URIs or e-mail addresses. Empty when it does not
/// parse (it was verified by the TLS handshake, so it does).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut names: Vec<String> = cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) = n {
                names.push(s.to_string());
            }
        }
    }
    names
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn callers() -> Callers {
        let mut m = BTreeMap::new();
        m.insert("clinic".to_string(), CallerConfig { token: "c-token".into(), weight: 3, ..Default::default() });
        m.insert("research".to_string(), CallerConfig { token: "r-token".into(), max_active_jobs: 4, max_priority: Some(-1), ..Default::default() });
        Callers::new(&["s-token"], &m, Arc::new(Metrics::default()))
    }

    fn call(c: &mut Callers, token: Option<&str>) -> Result<Caller, Status> {
        let mut req = Request::new(());
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        c.call(req).map(|r| Caller::of(&r))
    }

    #[test]
    fn each_token_names_its_caller() {
        let mut c = callers();
        let r = call(&mut c, Some("r-token")).unwrap();
        assert_eq!((&*r.name, r.max_active_jobs, r.operator), ("research", 4, false));
        assert_eq!((r.priority(10), r.priority(-5)), (-1, -5), "at most its max_priority");
        assert_eq!(r.bearer.as_ref().unwrap(), "Bearer r-token");
        assert!(!format!("{r:?}").contains("r-token"), "{r:?}");
        assert!(r.owner().bearer.is_none());
        let clinic = call(&mut c, Some("c-token")).unwrap();
        assert_eq!((&*clinic.name, clinic.weight, r.weight), ("clinic", 3, 1));
        let s = call(&mut c, Some("s-token")).unwrap();
        assert_eq!((&*s.name, s.operator), (SERVICE, true));
        for bad in [None, Some("r-toke"), Some("r-tokenx"), Some("")] {
            assert_eq!(call(&mut c, bad).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    /// A replica forwards a certificate's caller's call with the service's token and the
    /// caller's name; the name is believed beside that token only.
    #[test]
    fn a_forwarded_call_names_its_caller_beside_the_service_token() {
        let mut c = callers();
        let forwarded = |c: &mut Callers, token: &str, name: &str| {
            let mut req = Request::new(());
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            req.metadata_mut().insert(ON_BEHALF_OF, name.parse().unwrap());
            c.call(req).map(|r| Caller::of(&r))
        };
        let r = forwarded(&mut c, "s-token", "research").unwrap();
        assert_eq!((&*r.name, r.max_active_jobs, r.operator), ("research", 4, false));
        assert!(r.bearer.is_none(), "forwarded on again the same way");
        let e = forwarded(&mut c, "s-token", "nobody").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("\"nobody\", which this replica does not know"), "{}", e.message());
        assert_eq!(&*forwarded(&mut c, "c-token", "research").unwrap().name, "clinic", "only the service's token may name another");
    }

    /// The names a certificate carries: its common name, its DNS, URI and e-mail alternative
    /// names (not its IP addresses).
    #[test]
    fn a_certificates_names_are_its_common_name_and_alternative_names() {
        use rcgen::{CertificateParams, DnType, KeyPair, SanType};
        let mut p = CertificateParams::new(vec!["pacs-bridge.hospital.example".to_string(), "10.1.2.3".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "PACS Bridge 01");
        p.subject_alt_names.push(SanType::URI("spiffe://hospital.example/pacs".try_into().unwrap()));
        p.subject_alt_names.push(SanType::Rfc822Name("pacs@hospital.example".try_into().unwrap()));
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let mut names = certificate_names(cert.der());
        names.sort();
        assert_eq!(names, ["PACS Bridge 01", "pacs-bridge.hospital.example", "pacs@hospital.example", "spiffe://hospital.example/pacs"]);
        assert!(certificate_names(b"not a certificate").is_empty());
    }

    /// A replaced table is what every clone of the check sees from its next call on; the
    /// service token stays unless replaced too; the change names callers, not tokens.
    #[test]
    fn replacing_the_callers_rotates_their_tokens_for_every_clone() {
        let c = callers();
        let mut serving = c.clone();
        let mut after = c.table().configs.clone();
        after.get_mut("research").unwrap().token = "r-token-2".into();
        after.remove("clinic");
        after.insert("ris".into(), CallerConfig { token: "ris-token".into(), ..Default::default() });
        let change = c.replace(&["s-token"], &after);
        assert_eq!(change, CallersChange { added: vec!["ris".into()], removed: vec!["clinic".into()], changed: vec!["research".into()] });
        assert!(!format!("{change:?}").contains("token"), "{change:?}");
        for gone in ["r-token", "c-token"] {
            assert_eq!(call(&mut serving, Some(gone)).unwrap_err().code(), tonic::Code::Unauthenticated, "{gone}");
        }
        assert_eq!(&*call(&mut serving, Some("r-token-2")).unwrap().name, "research");
        assert_eq!(&*call(&mut serving, Some("ris-token")).unwrap().name, "ris");
        assert_eq!(&*call(&mut serving, Some("s-token")).unwrap().name, SERVICE);
        // The service's tokens: the one sent to the other replicas and one more accepted, as
        // in the middle of a rotation; the change names the caller `service`.
        let change = c.replace(&["s-token-2", "s-token"], &after);
        assert_eq!(change, CallersChange { changed: vec![SERVICE.into()], ..Default::default() });
        for token in ["s-token", "s-token-2"] {
            assert_eq!(&*call(&mut serving, Some(token)).unwrap().name, SERVICE, "{token}");
        }
        // No callers and no service token: every call is the anonymous caller again.
        assert_eq!(c.replace(&[], &BTreeMap::new()).removed, ["research", "ris"]);
        assert!(call(&mut serving, None).unwrap().name.is_empty());
    }

    #[test]
    fn without_tokens_everyone_is_the_anonymous_operator() {
        let mut c = Callers::new(&[], &BTreeMap::new(), Arc::new(Metrics::default()));
        let a = call(&mut c, None).unwrap();
        assert!(a.name.is_empty() && a.operator && a.max_active_jobs == 0);
        assert!(a.may_see("anyone") && a.listing().is_none());
        let r = Caller::named("research");
        assert_eq!(r.priority(10), 10);
        assert!(r.may_see("research") && !r.may_see("clinic") && !r.may_see(""));
        assert_eq!(r.listing(), Some("research"));
    }
}
