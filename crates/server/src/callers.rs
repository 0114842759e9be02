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
//! caller by its token and leaves a [`Caller`] in the request's extensions for the handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::config::CallerConfig;
use crate::metrics::Metrics;

/// The caller name of `server.auth_token`: the service's own token, shared by its replicas
/// and its operators, which sees every job and has no quota.
pub const SERVICE: &str = "service";

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
    /// carries it, so that the replica that holds the job knows the same caller.
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

/// The token check of every Segmenter call: a no-op without tokens; with them, the call's
/// `authorization: Bearer …` must be `server.auth_token` or one of `[server.callers]`'s, and
/// its [`Caller`] goes into the request's extensions.
#[derive(Clone)]
pub struct Callers {
    /// Token → caller (without its `bearer`, which each call fills in).
    tokens: Arc<Vec<(Vec<u8>, Caller)>>,
    metrics: Arc<Metrics>,
}

impl Callers {
    /// The check for `server.auth_token` and `server.callers`.
    pub fn new(service_token: Option<&str>, callers: &BTreeMap<String, CallerConfig>, metrics: Arc<Metrics>) -> Callers {
        let mut tokens = Vec::new();
        if let Some(t) = service_token {
            tokens.push((t.as_bytes().to_vec(), Caller { operator: true, ..Caller::named(SERVICE) }));
        }
        for (name, c) in callers {
            let caller = Caller {
                max_active_jobs: c.max_active_jobs,
                operator: c.operator,
                max_priority: c.max_priority,
                weight: c.weight.max(1),
                ..Caller::named(name)
            };
            tokens.push((c.token.as_bytes().to_vec(), caller));
        }
        Callers { tokens: Arc::new(tokens), metrics }
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
}

impl tonic::service::Interceptor for Callers {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(req);
        }
        let header = req.metadata().get("authorization").cloned();
        let given = header.as_ref().and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given.and_then(|g| self.find(g.as_bytes())) {
            Some(c) => {
                let caller = Caller { bearer: header, ..c.clone() };
                req.extensions_mut().insert(caller);
                Ok(req)
            }
            None => {
                self.metrics.rejected("unauthenticated");
                Err(Status::unauthenticated("missing or wrong bearer token"))
            }
        }
    }
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
        Callers::new(Some("s-token"), &m, Arc::new(Metrics::default()))
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

    #[test]
    fn without_tokens_everyone_is_the_anonymous_operator() {
        let mut c = Callers::new(None, &BTreeMap::new(), Arc::new(Metrics::default()));
        let a = call(&mut c, None).unwrap();
        assert!(a.name.is_empty() && a.operator && a.max_active_jobs == 0);
        assert!(a.may_see("anyone") && a.listing().is_none());
        let r = Caller::named("research");
        assert_eq!(r.priority(10), 10);
        assert!(r.may_see("research") && !r.may_see("clinic") && !r.may_see(""));
        assert_eq!(r.listing(), Some("research"));
    }
}
