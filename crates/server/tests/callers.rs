//! Named callers (`[server.callers]`) through a real server on loopback: each token names its
//! caller, a caller sees and manages its own jobs only (an operator all), its idempotency keys
//! are its own, and `max_active_jobs` bounds its queued and running jobs without touching the
//! other callers' room.

mod common;

use std::time::{Duration, Instant};

use common::*;
use s3net_server::config::CallerConfig;
use s3net_server::pb;
use tonic::{Code, Request};

const CLINIC: &str = "clinic-token";
const RESEARCH: &str = "research-token";
const OPS: &str = "ops-token";

fn as_caller<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn callers_config() -> s3net_server::Config {
    let mut cfg = config();
    let caller = |token: &str, max_active_jobs, operator| CallerConfig { token: token.into(), max_active_jobs, operator, ..Default::default() };
    cfg.server.callers.insert("clinic".into(), caller(CLINIC, 0, false));
    cfg.server.callers.insert("research".into(), CallerConfig { max_priority: Some(0), ..caller(RESEARCH, 1, false) });
    cfg.server.callers.insert("ops".into(), caller(OPS, 0, true));
    cfg
}

fn submit_as(image: Vec<u8>, options: pb::Options, key: &str, token: &str) -> Request<pb::SubmitJobRequest> {
    as_caller(pb::SubmitJobRequest { image, options: Some(options), idempotency_key: key.into() }, token)
}

async fn list_as(c: &mut Client, token: &str) -> Vec<(String, String)> {
    let r = c.list_jobs(as_caller(pb::ListJobsRequest::default(), token)).await.expect("list").into_inner();
    let mut v: Vec<(String, String)> = r.jobs.into_iter().map(|j| (j.job_id, j.caller)).collect();
    v.sort();
    v
}

async fn final_as(c: &mut Client, id: &str, token: &str) -> pb::Job {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.get_job(as_caller(pb::GetJobRequest { job_id: id.into() }, token)).await.expect("get").into_inner();
        if j.state >= pb::JobState::Completed as i32 {
            return j;
        }
        assert!(Instant::now() < until, "job {id} not finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_sees_its_own_jobs_and_keeps_its_room() {
    let (server, url) = start(callers_config()).await;
    let mut c = client(&url).await;

    // No token, or one nobody has: refused before anything is read.
    for token in [None, Some("nobody")] {
        let m = pb::ListJobsRequest::default();
        let r = match token {
            Some(t) => c.list_jobs(as_caller(m, t)).await,
            None => c.list_jobs(m).await,
        };
        assert_eq!(r.unwrap_err().code(), Code::Unauthenticated, "{token:?}");
    }

    // Research's one job runs on the only worker; a second one is over its quota.
    let research_job = c.submit_job(submit_as(disk(48, 48), slow(), "", RESEARCH)).await.unwrap().into_inner().job_id;
    // Taken by the worker before anything else is queued (on a busy machine its thread may
    // take a moment): the operator's cancellation below is of a running job.
    let until = Instant::now() + Duration::from_secs(30);
    while c.get_job(as_caller(pb::GetJobRequest { job_id: research_job.clone() }, RESEARCH)).await.unwrap().into_inner().state != pb::JobState::Running as i32 {
        assert!(Instant::now() < until, "research's job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let over = c.submit_job(submit_as(disk(40, 40), quick(), "", RESEARCH)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert!(
        over.message().starts_with("caller 'research' has 1 jobs queued or running, its limit (server.callers.research.max_active_jobs = 1); retry in about"),
        "{}",
        over.message()
    );
    assert!(over.metadata().get("retry-after").is_some(), "a hint comes with it");
    let seg = c.segment(as_caller(pb::SegmentRequest { image: disk(40, 40), options: Some(quick()) }, RESEARCH)).await;
    assert_eq!(seg.unwrap_err().code(), Code::ResourceExhausted, "a Segment call counts the same");

    // The clinic is not held back by research's quota.
    let clinic_job = c.submit_job(submit_as(disk(36, 36), quick(), "study-1", CLINIC)).await.unwrap().into_inner().job_id;

    // Research may not look at, follow or cancel the clinic's job; the clinic may not touch
    // research's either.
    let denied = |r: Result<(), tonic::Status>| {
        let s = r.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
        assert!(s.message().contains("was submitted by another caller"), "{}", s.message());
    };
    denied(c.get_job(as_caller(pb::GetJobRequest { job_id: clinic_job.clone() }, RESEARCH)).await.map(drop));
    denied(c.cancel_job(as_caller(pb::CancelJobRequest { job_id: clinic_job.clone() }, RESEARCH)).await.map(drop));
    denied(c.watch_job(as_caller(pb::WatchJobRequest { job_id: clinic_job.clone() }, RESEARCH)).await.map(drop));
    denied(c.cancel_job(as_caller(pb::CancelJobRequest { job_id: research_job.clone() }, CLINIC)).await.map(drop));
    // An unknown id is still NOT_FOUND, whoever asks.
    let unknown = c.get_job(as_caller(pb::GetJobRequest { job_id: "0123456789abcdef".into() }, RESEARCH)).await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);

    // Each lists its own; the operator lists both, with their callers.
    assert_eq!(list_as(&mut c, RESEARCH).await, vec![(research_job.clone(), "research".to_string())]);
    assert_eq!(list_as(&mut c, CLINIC).await, vec![(clinic_job.clone(), "clinic".to_string())]);
    let mut both = vec![(research_job.clone(), "research".to_string()), (clinic_job.clone(), "clinic".to_string())];
    both.sort();
    assert_eq!(list_as(&mut c, OPS).await, both);

    // The same idempotency key from another caller is another job (another image, too).
    let theirs = c.submit_job(submit_as(disk(44, 44), quick(), "study-1", OPS)).await.unwrap().into_inner();
    assert!(!theirs.existing && theirs.job_id != clinic_job);
    let again = c.submit_job(submit_as(disk(36, 36), quick(), "study-1", CLINIC)).await.unwrap().into_inner();
    assert!(again.existing && again.job_id == clinic_job, "the clinic's own key still finds its job");

    // The operator cancels research's job: the clinic's runs, and research has room again.
    let state = c.cancel_job(as_caller(pb::CancelJobRequest { job_id: research_job.clone() }, OPS)).await.unwrap().into_inner().state;
    assert_eq!(state, pb::JobState::Running as i32);
    assert_eq!(final_as(&mut c, &research_job, RESEARCH).await.state, pb::JobState::Cancelled as i32);
    let done = final_as(&mut c, &clinic_job, CLINIC).await;
    assert_eq!(done.state, pb::JobState::Completed as i32);
    assert_eq!(done.caller, "clinic");
    // Asking for priority 50, research gets its max_priority (0), as its result says.
    let urgent = pb::Options { priority: 50, ..quick() };
    let next = c.submit_job(submit_as(disk(40, 40), urgent, "", RESEARCH)).await.expect("room again").into_inner().job_id;
    let done = final_as(&mut c, &next, RESEARCH).await;
    assert_eq!(done.state, pb::JobState::Completed as i32);
    assert_eq!(done.result.and_then(|r| r.options).map(|o| o.priority), Some(0));

    // Counted for the operator: refusals by reason, jobs by caller.
    let m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    assert_series(
        &m,
        &[
            ("s3net_rejected_total{reason=\"caller_quota\"}", 2.0),
            ("s3net_rejected_total{reason=\"permission_denied\"}", 4.0),
            ("s3net_rejected_total{reason=\"unauthenticated\"}", 2.0),
            ("s3net_caller_jobs_submitted_total{caller=\"research\"}", 2.0),
            ("s3net_caller_jobs_submitted_total{caller=\"clinic\"}", 1.0),
            ("s3net_caller_jobs_submitted_total{caller=\"ops\"}", 1.0),
            ("s3net_caller_jobs_total{caller=\"research\",outcome=\"cancelled\"}", 1.0),
            ("s3net_caller_jobs_total{caller=\"research\",outcome=\"completed\"}", 1.0),
            ("s3net_caller_jobs_total{caller=\"clinic\",outcome=\"completed\"}", 1.0),
        ],
    );
    server.shutdown().await.unwrap();
}

/// The service's own token (`server.auth_token`) beside named callers: its caller is
/// `service`, which sees every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_token_is_an_operator() {
    let mut cfg = callers_config();
    cfg.server.auth_token = Some("service-token".into());
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let mine = c.submit_job(submit_as(disk(36, 36), quick(), "", "service-token")).await.unwrap().into_inner().job_id;
    let theirs = c.submit_job(submit_as(disk(36, 36), quick(), "", CLINIC)).await.unwrap().into_inner().job_id;
    assert_eq!(final_as(&mut c, &theirs, "service-token").await.caller, "clinic");
    assert_eq!(final_as(&mut c, &mine, "service-token").await.caller, "service");
    let denied = c.get_job(as_caller(pb::GetJobRequest { job_id: mine }, CLINIC)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    server.shutdown().await.unwrap();
}

/// With the callers taking turns (`queue.fair_share`, the default), the clinic's one job is the
/// next a worker takes even behind research's queued jobs, and SubmitJob says so (place 0);
/// research's own jobs keep their arrival order. In arrival order (`fair_share = false`) the
/// clinic's job waits behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_take_turns_for_the_worker() {
    for fair in [true, false] {
        let mut cfg = callers_config();
        cfg.queue.fair_share = fair;
        cfg.server.callers.get_mut("research").unwrap().max_active_jobs = 0;
        let (server, url) = start(cfg).await;
        let mut c = client(&url).await;
        // Research's first job holds the only worker until the operator cancels it.
        let first = c.submit_job(submit_as(disk(48, 48), slow(), "", RESEARCH)).await.unwrap().into_inner().job_id;
        let until = Instant::now() + Duration::from_secs(30);
        while final_state(&mut c, &first).await != pb::JobState::Running as i32 {
            assert!(Instant::now() < until, "research's first job never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut queued = Vec::new();
        for i in 0..3 {
            let r = c.submit_job(submit_as(disk(40, 40), quick(), "", RESEARCH)).await.unwrap().into_inner();
            assert_eq!(r.queue_position, i, "research's own jobs in arrival order");
            queued.push(r.job_id);
        }
        let clinic = c.submit_job(submit_as(disk(36, 36), quick(), "", CLINIC)).await.unwrap().into_inner();
        assert_eq!(clinic.queue_position, if fair { 0 } else { 3 }, "fair_share = {fair}");
        c.cancel_job(as_caller(pb::CancelJobRequest { job_id: first }, OPS)).await.unwrap();
        let clinic_started = final_as(&mut c, &clinic.job_id, CLINIC).await.started_at;
        let mut research_started = Vec::new();
        for id in &queued {
            research_started.push(final_as(&mut c, id, RESEARCH).await.started_at);
        }
        assert!(research_started.windows(2).all(|w| w[0] <= w[1]), "{research_started:?}");
        if fair {
            assert!(clinic_started <= research_started[0], "the clinic's job went first: {clinic_started} vs {research_started:?}");
        } else {
            assert!(clinic_started >= research_started[2], "arrival order: {clinic_started} vs {research_started:?}");
        }
        server.shutdown().await.unwrap();
    }
}

async fn final_state(c: &mut Client, id: &str) -> i32 {
    c.get_job(as_caller(pb::GetJobRequest { job_id: id.into() }, OPS)).await.expect("get").into_inner().state
}

/// Under mutual TLS a client certificate names its caller (`certificate_names`: its common
/// name or a subject alternative name), without a token; a token beside it must be the same
/// caller's; a certificate that names nobody needs a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_its_caller() {
    use s3net_server::cli::ConnectArgs;
    use s3net_server::config::TlsConfig;
    let ca = TestCa::new();
    let (cert, key) = ca.issue("server", &["localhost", "127.0.0.1"]);
    let mut cfg = callers_config();
    cfg.server.tls = Some(TlsConfig { cert, key, client_ca: Some(ca.path("ca.pem")) });
    cfg.server.callers.insert(
        "pacs".into(),
        CallerConfig { certificate_names: vec!["pacs-bridge.hospital.example".into()], ..Default::default() },
    );
    cfg.server.callers.get_mut("research").unwrap().certificate_names = vec!["Research Pipeline".into()];
    cfg.validate().expect("a valid configuration");
    let (server, url) = start(cfg).await;
    let https = url.replace("http://", "https://");
    let as_holder = |stem: &str, cn: Option<&str>, names: &[&str], token: Option<&str>| {
        let (cert, key) = ca.issue_to(stem, cn, names);
        ConnectArgs { addr: https.clone(), token: token.map(str::to_string), token_file: None, ca: Some(ca.path("ca.pem")), cert: Some(cert), key: Some(key) }
    };
    let pacs = as_holder("pacs", Some("PACS Bridge"), &["pacs-bridge.hospital.example"], None);
    let research = as_holder("research", Some("Research Pipeline"), &["research-host"], None);
    let stranger = as_holder("stranger", None, &["stranger"], None);

    let mut p = pacs.client().await.unwrap();
    let submit = |image| pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: String::new() };
    let pacs_job = p.submit_job(submit(disk(36, 36))).await.unwrap().into_inner().job_id;
    let mut r = research.client().await.unwrap();
    let research_job = r.submit_job(submit(disk(40, 40))).await.unwrap().into_inner().job_id;
    let own = |l: pb::ListJobsResponse| l.jobs.into_iter().map(|j| (j.job_id, j.caller)).collect::<Vec<_>>();
    assert_eq!(own(p.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()), vec![(pacs_job.clone(), "pacs".to_string())]);
    assert_eq!(own(r.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()), vec![(research_job.clone(), "research".to_string())]);
    let e = r.get_job(pb::GetJobRequest { job_id: pacs_job.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Research's token beside its own certificate is fine; beside the bridge's it is refused.
    let mut rt = ConnectArgs { token: Some(RESEARCH.into()), ..research.clone() }.client().await.unwrap();
    assert_eq!(rt.get_job(pb::GetJobRequest { job_id: research_job.clone() }).await.unwrap().into_inner().caller, "research");
    let mut mixed = ConnectArgs { token: Some(RESEARCH.into()), ..pacs.clone() }.client().await.unwrap();
    let e = mixed.list_jobs(pb::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(e.message(), "the client certificate is caller 'pacs''s and the bearer token caller 'research''s: one call, one caller");

    // A certificate that names nobody: refused without a token, its token's caller with one.
    let e = stranger.client().await.unwrap().list_jobs(pb::ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("no client certificate that names a caller"), "{}", e.message());
    let mut ops = ConnectArgs { token: Some(OPS.into()), ..stranger.clone() }.client().await.unwrap();
    let mut all = own(ops.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner());
    all.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(all, vec![(pacs_job.clone(), "pacs".to_string()), (research_job.clone(), "research".to_string())]);
    assert_eq!(final_as_over(&mut p, &pacs_job).await.state, pb::JobState::Completed as i32);
    server.shutdown().await.unwrap();
}

async fn final_as_over(c: &mut s3net_server::cli::Client, id: &str) -> pb::Job {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.get_job(pb::GetJobRequest { job_id: id.into() }).await.expect("get").into_inner();
        if j.state >= pb::JobState::Completed as i32 {
            return j;
        }
        assert!(Instant::now() < until, "job {id} not finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Server::reload_callers` (what `s3net serve` does on SIGHUP): a rotated token works at
/// once and the old one no longer does, a removed caller's job stays for the operators, new
/// limits apply to the next submission, and an invalid set changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_replaced_without_a_restart() {
    let cfg = callers_config();
    let (server, url) = start(cfg.clone()).await;
    let mut c = client(&url).await;
    let clinic_job = c.submit_job(submit_as(disk(36, 36), quick(), "", CLINIC)).await.unwrap().into_inner().job_id;
    assert_eq!(final_as(&mut c, &clinic_job, CLINIC).await.state, pb::JobState::Completed as i32);

    let mut next = cfg.clone();
    next.server.callers.remove("clinic");
    let research = next.server.callers.get_mut("research").unwrap();
    research.token = "research-token-2".into();
    research.max_active_jobs = 0;
    let change = server.reload_callers(&next).expect("a valid set");
    assert_eq!((change.removed, change.changed), (vec!["clinic".to_string()], vec!["research".to_string()]));
    for gone in [RESEARCH, CLINIC] {
        let e = c.list_jobs(as_caller(pb::ListJobsRequest::default(), gone)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{gone}");
    }
    // research's limit was 1; now none: two jobs at once.
    let slow_one = c.submit_job(submit_as(disk(48, 48), slow(), "", "research-token-2")).await.expect("the new token").into_inner().job_id;
    c.submit_job(submit_as(disk(40, 40), quick(), "", "research-token-2")).await.expect("no limit any more");
    let all = list_as(&mut c, OPS).await;
    assert!(all.contains(&(clinic_job.clone(), "clinic".to_string())), "the removed caller's job is kept: {all:?}");

    let mut bad = next.clone();
    bad.server.callers.get_mut("ops").unwrap().token = "research-token-2".into();
    let e = server.reload_callers(&bad).unwrap_err();
    assert!(format!("{e:#}").contains("[server.callers] not reloaded: server.callers.research.token is the same as server.callers.ops.token"), "{e:#}");
    assert_eq!(list_as(&mut c, OPS).await.len(), 3, "the valid set stays in force");
    c.cancel_job(as_caller(pb::CancelJobRequest { job_id: slow_one }, OPS)).await.unwrap();
    server.shutdown().await.unwrap();
}

/// `queue.max_caller_share`: a caller with no `max_active_jobs` still leaves room in the
/// queue for the others; its refusal says why and when to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_does_not_fill_the_queue() {
    let mut cfg = callers_config();
    cfg.queue.capacity = 4;
    cfg.queue.max_caller_share = 0.5;
    cfg.server.callers.get_mut("research").unwrap().max_active_jobs = 0;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let mut research = Vec::new();
    for _ in 0..3 {
        // The first runs (and leaves the queue), two wait.
        research.push(c.submit_job(submit_as(disk(48, 48), slow(), "", RESEARCH)).await.unwrap().into_inner().job_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = c.submit_job(submit_as(disk(40, 40), quick(), "", RESEARCH)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().starts_with("caller 'research' holds 2 of the queue's 4 places, as many as one caller may while others may need room (queue.max_caller_share); retry in about"),
        "{}",
        e.message()
    );
    assert!(e.metadata().get("retry-after").is_some());
    let clinic = c.submit_job(submit_as(disk(36, 36), quick(), "", CLINIC)).await.expect("room for the clinic").into_inner();
    assert_eq!(clinic.queue_position, 0, "and its turn first");
    for id in research {
        c.cancel_job(as_caller(pb::CancelJobRequest { job_id: id }, OPS)).await.unwrap();
    }
    assert_eq!(final_as(&mut c, &clinic.job_id, CLINIC).await.state, pb::JobState::Completed as i32);
    let m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    assert_series(&m, &[("s3net_rejected_total{reason=\"caller_share\"}", 1.0)]);
    server.shutdown().await.unwrap();
}

/// `crate::reload`: a token rotated in its file is put in force at the next look, with no
/// signal; a look that finds nothing changed does nothing; a file gone missing is refused
/// once (not at every look), shown by `s3net_config_last_reload_successful`, and the callers in
/// force stay until a valid one comes back; two lines are two tokens of the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_put_in_force() {
    use s3net_server::reload::{Reload, Reloader, Trigger};
    let dir = tempfile::tempdir().unwrap();
    let (file, token) = (dir.path().join("s3net.toml"), dir.path().join("pacs"));
    std::fs::write(&file, format!("[server.callers.pacs]\ntoken_file = {token:?}\n")).unwrap();
    // As a Kubernetes volume swaps a Secret's files: a new file renamed over the old.
    let rotate = |content: &str| {
        let next = dir.path().join("next");
        std::fs::write(&next, content).unwrap();
        std::fs::rename(&next, &token).unwrap();
    };
    rotate("first-token\n");
    let base = config();
    let load = || -> anyhow::Result<s3net_server::Config> {
        let loaded = s3net_server::Config::load(Some(&file), &[])?;
        Ok(s3net_server::Config { server: s3net_server::config::ServerConfig { callers: loaded.server.callers, ..base.server.clone() }, ..base.clone() })
    };
    let started = load().unwrap();
    let (server, url) = start(started.clone()).await;
    let mut reloader = Reloader::new(load, started);
    let mut c = client(&url).await;
    let mut works = async |token: &str| c.list_jobs(as_caller(pb::ListJobsRequest::default(), token)).await.map(|_| ()).map_err(|e| e.code());
    works("first-token").await.expect("the file's token");
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Unchanged);

    rotate("second-token\n");
    let change = s3net_server::callers::CallersChange { changed: vec!["pacs".into()], ..Default::default() };
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Applied(change));
    works("second-token").await.expect("the rotated token");
    assert_eq!(works("first-token").await, Err(Code::Unauthenticated));
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Unchanged);

    std::fs::remove_file(&token).unwrap();
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Refused);
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Unchanged, "refused once, not at every look");
    works("second-token").await.expect("the callers in force stay");
    let m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    assert_series(&m, &[
        ("s3net_config_reloads_total{outcome=\"applied\"}", 1.0),
        ("s3net_config_reloads_total{outcome=\"refused\"}", 1.0),
        ("s3net_config_last_reload_successful", 0.0),
    ]);
    assert_eq!(reloader.look(&server, Trigger::Hangup), Reload::Refused, "a signal asks again");

    // A rotation no client notices: the new token beside the old while the clients move over,
    // then the old one removed.
    rotate("second-token\nthird-token\n");
    assert!(matches!(reloader.look(&server, Trigger::Interval), Reload::Applied(_)));
    works("second-token").await.expect("the old token, still");
    works("third-token").await.expect("and the new one");
    rotate("third-token");
    assert!(matches!(reloader.look(&server, Trigger::Interval), Reload::Applied(_)));
    works("third-token").await.expect("the new token");
    assert_eq!(works("second-token").await, Err(Code::Unauthenticated), "the old one removed");
    assert_eq!(reloader.look(&server, Trigger::Hangup), Reload::Applied(Default::default()), "a signal reloads whatever changed");
    let m = scrape(server.metrics_addr().unwrap()).await;
    assert_series(&m, &[
        ("s3net_config_reloads_total{outcome=\"applied\"}", 4.0),
        ("s3net_config_reloads_total{outcome=\"refused\"}", 2.0),
        ("s3net_config_last_reload_successful", 1.0),
    ]);
    assert!(value(&m, "s3net_config_last_reload_success_timestamp_seconds") > 1.7e9);
    server.shutdown().await.unwrap();
}
