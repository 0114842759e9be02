//! Replicas that answer for each other's jobs (`[cluster]`): real servers on loopback ports,
//! calls about one replica's job made to another.

mod common;

use std::time::Duration;

use common::*;
use s3net_server::cli::{Client as TokenClient, ConnectArgs};
use s3net_server::cluster::FORWARDED_BY;
use s3net_server::pb::{self, job_event::Event, JobState};
use s3net_server::{Config, Server};
use tonic::Code;

const TOKEN: &str = "s3cret";

/// A replica listening on `port`, one of `peers`, with the shared token.
fn replica(port: u16, peers: &[u16]) -> Config {
    let mut c = config();
    c.server.addr = format!("127.0.0.1:{port}");
    c.server.auth_token = Some(TOKEN.into());
    c.cluster.peers = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    c.cluster.advertise_addr = "127.0.0.1".into();
    c
}

fn conn(url: &str) -> ConnectArgs {
    ConnectArgs { token: Some(TOKEN.into()), ..plain_conn(url) }
}

/// Replicas A and B of one cluster, a client of each, and A's port.
async fn two_replicas() -> (Server, TokenClient, Server, TokenClient, u16) {
    let (pa, pb_) = (free_port(), free_port());
    let (a, url_a) = start(replica(pa, &[pa, pb_])).await;
    let (b, url_b) = start(replica(pb_, &[pa, pb_])).await;
    (a, conn(&url_a).client().await.unwrap(), b, conn(&url_b).client().await.unwrap(), pa)
}

/// Submits `image` through `c`: the job's id.
async fn submit_via(c: &mut TokenClient, image: Vec<u8>, options: pb::Options) -> String {
    let r = pb::SubmitJobRequest { image, options: Some(options), idempotency_key: String::new() };
    c.submit_job(r).await.unwrap().into_inner().job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_about_a_job_reach_its_replica_through_any_other() {
    let (a, mut ca, b, mut cb, pa) = two_replicas().await;

    // A's job, as its id says.
    let id = submit_via(&mut ca, disk(48, 48), slow()).await;
    assert!(id.ends_with(&format!("@127.0.0.1:{pa}")), "{id}");

    // Watched through B: the replay and the live events, from A.
    let mut w = cb.watch_job(pb::WatchJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    loop {
        let e = w.message().await.unwrap().expect("the stream goes on");
        assert_eq!(e.job_id, id);
        if matches!(e.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let j = cb.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!((j.job_id.as_str(), j.state), (id.as_str(), JobState::Running as i32));
    assert_eq!((j.width, j.height), (48, 48));
    // B lists the jobs of every replica: A's one.
    let listed = cb.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    let ids: Vec<&str> = listed.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!((ids, listed.unreachable_replicas.len()), (vec![id.as_str()], 0));

    // Cancelled through B: A's job ends, and B's watch says so.
    let state = cb.cancel_job(pb::CancelJobRequest { job_id: id.clone() }).await.unwrap().into_inner().state;
    assert!(state == JobState::Running as i32 || state == JobState::Cancelled as i32, "{state}");
    let last = last_event(&mut w).await;
    assert!(matches!(&last, Some(Event::Cancelled(c)) if c.reason.contains("CancelJob")), "{last:?}");
    let j = ca.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(j.state, JobState::Cancelled as i32);

    // A completed job's result, fetched through B, is A's.
    let done = submit_via(&mut ca, disk(40, 40), quick()).await;
    let mut w = cb.watch_job(pb::WatchJobRequest { job_id: done.clone() }).await.unwrap().into_inner();
    let last = last_event(&mut w).await;
    assert!(matches!(last, Some(Event::Completed(_))), "{last:?}");
    let via_b = cb.get_job(pb::GetJobRequest { job_id: done.clone() }).await.unwrap().into_inner();
    let via_a = ca.get_job(pb::GetJobRequest { job_id: done.clone() }).await.unwrap().into_inner();
    assert_eq!(via_b, via_a);
    assert!(via_b.result.is_some_and(|r| !r.mask_png.is_empty()));

    // An unknown id of A's is A's answer, through B.
    let missing = format!("0123456789abcdef@127.0.0.1:{pa}");
    let e = cb.get_job(pb::GetJobRequest { job_id: missing.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("unknown job"), "{e:?}");

    let m = scrape(b.metrics_addr().unwrap()).await;
    assert_series(
        &m,
        &[
            ("s3net_forwarded_calls_total{method=\"WatchJob\",code=\"Ok\"}", 2.0),
            ("s3net_forwarded_calls_total{method=\"GetJob\",code=\"Ok\"}", 2.0),
            ("s3net_forwarded_calls_total{method=\"GetJob\",code=\"NotFound\"}", 1.0),
            ("s3net_forwarded_calls_total{method=\"CancelJob\",code=\"Ok\"}", 1.0),
        ],
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_listed_replicas_are_ever_called() {
    // Something listening that is not a replica: an id naming it must not make the server
    // connect there (the call would carry the token).
    let stranger = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stranger_addr = stranger.local_addr().unwrap();
    // A replica that is listed but down.
    let (pb_, down) = (free_port(), free_port());
    let (b, url_b) = start(replica(pb_, &[pb_, down])).await;
    let mut cb = conn(&url_b).client().await.unwrap();

    let forged = format!("0123456789abcdef@{stranger_addr}");
    let e = cb.get_job(pb::GetJobRequest { job_id: forged.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&format!("replica {stranger_addr}, which is not one of this service's replicas")), "{e:?}");
    let e = cb.cancel_job(pb::CancelJobRequest { job_id: forged.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = cb.watch_job(pb::WatchJobRequest { job_id: forged }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let called = tokio::time::timeout(Duration::from_millis(500), stranger.accept()).await;
    assert!(called.is_err(), "the server connected to {stranger_addr}");

    let e = cb.get_job(pb::GetJobRequest { job_id: format!("0123456789abcdef@127.0.0.1:{down}") }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().starts_with(&format!("cannot reach replica 127.0.0.1:{down}, which holds job")), "{e:?}");

    // A call marked as forwarded is answered here, never sent on.
    let mut req = tonic::Request::new(pb::GetJobRequest { job_id: format!("0123456789abcdef@127.0.0.1:{down}") });
    req.metadata_mut().insert(FORWARDED_BY, "127.0.0.9:1".parse().unwrap());
    let e = cb.get_job(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("unknown job"), "{e:?}");

    // Its own jobs stay its own, and a plain id (no replica) is looked up here.
    let id = submit_via(&mut cb, disk(40, 40), quick()).await;
    assert!(id.ends_with(&format!("@127.0.0.1:{pb_}")), "{id}");
    let e = cb.get_job(pb::GetJobRequest { job_id: "0123456789abcdef".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Keys whose replica is the one that is down are queued here: none is refused.
    for i in 0..8 {
        let r = pb::SubmitJobRequest { image: disk(40, 40), options: Some(quick()), idempotency_key: format!("study-{i}") };
        let id = cb.submit_job(r).await.unwrap().into_inner().job_id;
        assert!(id.ends_with(&format!("@127.0.0.1:{pb_}")), "{id}");
    }
    // The list is B's jobs, and says whose are missing.
    let listed = cb.list_jobs(pb::ListJobsRequest { state: 0, limit: 5 }).await.unwrap().into_inner();
    assert_eq!(listed.unreachable_replicas, [format!("127.0.0.1:{down}")]);
    assert_eq!(listed.jobs.len(), 5);
    assert!(listed.jobs.iter().all(|j| j.job_id.ends_with(&format!("@127.0.0.1:{pb_}"))), "{listed:?}");
    assert!(listed.jobs.windows(2).all(|w| w[0].submitted_at >= w[1].submitted_at), "newest first");
    let m = scrape(b.metrics_addr().unwrap()).await;
    assert_series(&m, &[("s3net_forwarded_calls_total{method=\"GetJob\",code=\"Unavailable\"}", 1.0)]);
    assert!(!m.keys().any(|k| k.contains("SubmitJob")), "nothing was sent to the replica that is down");
    // Each new key was looked for there first: it could not answer, and the job was queued here.
    assert_series(&m, &[("s3net_forwarded_calls_total{method=\"KeyLookup\",code=\"Unavailable\"}", 8.0)]);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_with_mutual_tls_forward_over_tls() {
    use s3net_server::config::TlsConfig;
    let ca = TestCa::new();
    // One certificate for every replica, as a Kubernetes secret would hold it: the name the
    // replicas are reached by (cluster.server_name), and no other.
    let (cert, key) = ca.issue("server", &["s3net-peers"]);
    let tls = TlsConfig { cert, key, client_ca: Some(ca.path("ca.pem")) };
    let (pa, pb_) = (free_port(), free_port());
    let with_tls = |port| {
        let mut c = replica(port, &[pa, pb_]);
        c.server.tls = Some(tls.clone());
        c.cluster.ca = Some(ca.path("ca.pem"));
        c.cluster.server_name = Some("s3net-peers".into());
        // Two callers known by their certificates alone.
        for (name, cert_name) in [("pacs", "pacs-bridge"), ("other", "other-system")] {
            let caller = s3net_server::config::CallerConfig { certificate_names: vec![cert_name.into()], ..Default::default() };
            c.server.callers.insert(name.into(), caller);
        }
        c
    };
    let (a, _) = start(with_tls(pa)).await;
    let (b, _) = start(with_tls(pb_)).await;
    // A client of the replicas' own kind: their certificate, the name in it.
    let connect = |port: u16| {
        let read = |name: &str| std::fs::read(ca.path(name)).unwrap();
        let id = tonic::transport::Identity::from_pem(read("server.pem"), read("server.key"));
        let root = tonic::transport::Certificate::from_pem(read("ca.pem"));
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(root).identity(id).domain_name("s3net-peers");
        async move {
            let ch = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let token: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse().unwrap();
            pb::segmenter_client::SegmenterClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", token.clone());
                Ok(r)
            })
        }
    };
    let mut ca_client = connect(pa).await;
    let mut cb = connect(pb_).await;
    let submit = pb::SubmitJobRequest { image: disk(40, 40), options: Some(quick()), idempotency_key: String::new() };
    let id = ca_client.submit_job(submit).await.unwrap().into_inner().job_id;
    let mut w = cb.watch_job(pb::WatchJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    let last = last_event(&mut w).await;
    assert!(matches!(last, Some(Event::Completed(_))), "{last:?}");
    let j = cb.get_job(pb::GetJobRequest { job_id: id }).await.unwrap().into_inner();
    assert_eq!(j.state, JobState::Completed as i32);

    // A caller its certificate names, no token: B forwards its calls about A's job on its
    // behalf (the service's token and its name), so A knows it as the caller it is.
    let holder = |stem: &str, port: u16| {
        let (cert, key) = ca.issue(stem, &[if stem == "pacs" { "pacs-bridge" } else { "other-system" }]);
        let id = tonic::transport::Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap());
        let root = tonic::transport::Certificate::from_pem(std::fs::read(ca.path("ca.pem")).unwrap());
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(root).identity(id).domain_name("s3net-peers");
        async move {
            let ch = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap();
            pb::segmenter_client::SegmenterClient::new(ch.connect().await.unwrap())
        }
    };
    let mut pacs_a = holder("pacs", pa).await;
    let mut pacs_b = holder("pacs", pb_).await;
    let mut other_b = holder("other", pb_).await;
    let submit = pb::SubmitJobRequest { image: disk(40, 40), options: Some(quick()), idempotency_key: String::new() };
    let id = pacs_a.submit_job(submit).await.unwrap().into_inner().job_id;
    assert!(id.ends_with(&format!(":{pa}")), "{id}");
    let mut w = pacs_b.watch_job(pb::WatchJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert!(matches!(last_event(&mut w).await, Some(Event::Completed(_))));
    assert_eq!(pacs_b.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner().caller, "pacs");
    let listed = pacs_b.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), vec![id.as_str()], "its own jobs of every replica");
    let e = other_b.get_job(pb::GetJobRequest { job_id: id }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_ends_the_streams_it_relays() {
    let (a, mut ca, b, mut cb, _) = two_replicas().await;
    let id = submit_via(&mut ca, disk(48, 48), slow()).await;
    let mut w = cb.watch_job(pb::WatchJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    while !matches!(w.message().await.unwrap().and_then(|e| e.event), Some(Event::Progress(_))) {}
    // B stops: its relay ends at once with a word on why, and A's job goes on.
    let t = std::time::Instant::now();
    let stopped = tokio::spawn(b.shutdown());
    let e = loop {
        match w.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the relay ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().starts_with("this replica is shutting down; watch job"), "{e:?}");
    stopped.await.unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(4), "B took {:?} to stop", t.elapsed());
    let j = ca.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(j.state, JobState::Running as i32);
    ca.cancel_job(pb::CancelJobRequest { job_id: id }).await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_finds_its_job_whichever_replica_is_asked() {
    let (a, mut ca, b, mut cb, _) = two_replicas().await;
    let request = |key: &str, image: Vec<u8>| pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: key.into() };
    let mut homes = std::collections::HashSet::new();
    for i in 0..12 {
        let key = format!("study-{i}");
        let first = ca.submit_job(request(&key, disk(40, 40))).await.unwrap().into_inner();
        let again = cb.submit_job(request(&key, disk(40, 40))).await.unwrap().into_inner();
        assert!(!first.existing && again.existing, "{key}: {first:?} {again:?}");
        assert_eq!(first.job_id, again.job_id, "{key}");
        // A different image under the same key is refused, through either replica.
        for c in [&mut ca, &mut cb] {
            let e = c.submit_job(request(&key, disk(44, 44))).await.unwrap_err();
            assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        }
        homes.insert(first.job_id.rsplit_once('@').unwrap().1.to_string());
    }
    // Each key has its replica, and the keys are shared out between the two.
    assert_eq!(homes.len(), 2, "{homes:?}");
    let (ma, mb) = (scrape(a.metrics_addr().unwrap()).await, scrape(b.metrics_addr().unwrap()).await);
    let sent = |m: &std::collections::HashMap<String, f64>, code: &str| {
        m.get(&format!("s3net_forwarded_calls_total{{method=\"SubmitJob\",code=\"{code}\"}}")).copied().unwrap_or(0.0)
    };
    // Each key went through the replica that is not its own twice (once new, once with
    // another image), and its other submissions stayed home: 12 × 2 forwarded in all.
    assert_eq!(sent(&ma, "Ok") + sent(&mb, "Ok") + sent(&ma, "AlreadyExists") + sent(&mb, "AlreadyExists"), 24.0);
    // Each key's home asked the other replica about it once, when it was new there; a key it
    // held was answered without asking.
    let looked = |m: &std::collections::HashMap<String, f64>, code: &str| {
        m.get(&format!("s3net_forwarded_calls_total{{method=\"KeyLookup\",code=\"{code}\"}}")).copied().unwrap_or(0.0)
    };
    assert_eq!(looked(&ma, "NotFound") + looked(&mb, "NotFound"), 12.0);
    assert!(!ma.keys().chain(mb.keys()).any(|k| k.contains("KeyLookup") && !k.contains("NotFound")), "{ma:?} {mb:?}");
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reached_under_two_addresses_lists_its_jobs_once() {
    // Listening on every interface, and listed as 127.0.0.2 too (a peers list that names a
    // replica twice): its list must not hold its jobs twice.
    let p = free_port();
    let mut c = replica(p, &[p]);
    c.server.addr = format!("0.0.0.0:{p}");
    c.cluster.peers.push(format!("127.0.0.2:{p}"));
    let (s, _) = start(c).await;
    let mut client = conn(&format!("http://127.0.0.1:{p}")).client().await.unwrap();
    let id = submit_via(&mut client, disk(40, 40), quick()).await;
    let listed = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    let ids: Vec<&str> = listed.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!((ids, listed.unreachable_replicas.len()), (vec![id.as_str()], 0));
    let m = scrape(s.metrics_addr().unwrap()).await;
    assert_series(&m, &[("s3net_forwarded_calls_total{method=\"ListJobs\",code=\"Ok\"}", 1.0)]);
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_found_where_their_jobs_are_after_a_replica_joins() {
    // A scale-out: B is listed but not up yet, so A queues every key's job, those of B's keys
    // too. Then B comes up and becomes the home of its keys, whose jobs stay on A.
    let (pa, pb_) = (free_port(), free_port());
    let (a, url_a) = start(replica(pa, &[pa, pb_])).await;
    let mut ca = conn(&url_a).client().await.unwrap();
    let request = |key: &str, image: Vec<u8>| pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: key.into() };
    let mut ids = Vec::new();
    for i in 0..12 {
        let sub = ca.submit_job(request(&format!("study-{i}"), disk(40, 40))).await.unwrap().into_inner();
        assert!(!sub.existing && sub.job_id.ends_with(&format!("@127.0.0.1:{pa}")), "{sub:?}");
        ids.push(sub.job_id);
    }
    let (b, url_b) = start(replica(pb_, &[pa, pb_])).await;
    let mut cb = conn(&url_b).client().await.unwrap();
    // A's last health check of B (when it was down) is trusted for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Sent again through either replica, each key finds its job on A: none is queued twice.
    for (i, id) in ids.iter().enumerate() {
        let key = format!("study-{i}");
        for c in [&mut cb, &mut ca] {
            let again = c.submit_job(request(&key, disk(40, 40))).await.unwrap().into_inner();
            assert!(again.existing, "{key}: {again:?}");
            assert_eq!(&again.job_id, id, "{key}");
        }
        // Another image under the key is refused, naming A's job.
        let e = cb.submit_job(request(&key, disk(44, 44))).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains(id.as_str()), "{e:?}");
    }
    let listed = cb.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.jobs.len(), 12, "{listed:?}");
    assert!(listed.jobs.iter().all(|j| j.job_id.ends_with(&format!("@127.0.0.1:{pa}"))), "{listed:?}");

    // B is the home of some of the keys, and found their jobs by asking A; a call that asks
    // is not one a client can make B forward on (it is answered from B's own jobs).
    let m = scrape(b.metrics_addr().unwrap()).await;
    let found = m.get("s3net_forwarded_calls_total{method=\"KeyLookup\",code=\"Ok\"}").copied().unwrap_or(0.0);
    assert!(found >= 2.0, "{m:?}");
    let mut ask = tonic::Request::new(pb::SubmitJobRequest { image: Vec::new(), options: None, idempotency_key: "study-0".into() });
    ask.metadata_mut().insert(FORWARDED_BY, "127.0.0.9:1".parse().unwrap());
    s3net_server::cluster::Cluster::ask_for_key(&mut ask, &[0; 32]);
    let e = cb.submit_job(ask).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("no job of idempotency key 'study-0' here"), "{e:?}");
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Named callers in a cluster: a forwarded call carries its caller's own token, so the replica
/// that holds the job knows the caller as the first one did. A caller lists its own jobs of
/// every replica, is PERMISSION_DENIED another's wherever it asks, and its idempotency keys
/// are its own on every replica; an operator sees and cancels all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_are_known_on_every_replica() {
    use s3net_server::config::CallerConfig;
    let (pa, pb_) = (free_port(), free_port());
    let with_callers = |port| {
        let mut c = replica(port, &[pa, pb_]);
        c.server.auth_token = None;
        for (name, token, operator) in [("clinic", "c-tok", false), ("research", "r-tok", false), ("ops", "o-tok", true)] {
            c.server.callers.insert(name.into(), CallerConfig { token: token.into(), operator, ..Default::default() });
        }
        c
    };
    let (a, url_a) = start(with_callers(pa)).await;
    let (b, url_b) = start(with_callers(pb_)).await;
    let as_caller = |url: &str, token: &str| ConnectArgs { token: Some(token.into()), ..plain_conn(url) };
    let mut clinic_a = as_caller(&url_a, "c-tok").client().await.unwrap();
    let mut research_a = as_caller(&url_a, "r-tok").client().await.unwrap();
    let mut research_b = as_caller(&url_b, "r-tok").client().await.unwrap();
    let mut ops_b = as_caller(&url_b, "o-tok").client().await.unwrap();

    let clinic_job = submit_via(&mut clinic_a, disk(48, 48), slow()).await;
    let research_on_a = submit_via(&mut research_a, disk(40, 40), quick()).await;
    let research_on_b = submit_via(&mut research_b, disk(40, 40), quick()).await;
    assert!(clinic_job.ends_with(&format!(":{pa}")) && research_on_b.ends_with(&format!(":{pb_}")));

    // Through B, about A's jobs: the clinic's is refused by A, which knows the caller.
    for e in [
        research_b.get_job(pb::GetJobRequest { job_id: clinic_job.clone() }).await.map(drop).unwrap_err(),
        research_b.cancel_job(pb::CancelJobRequest { job_id: clinic_job.clone() }).await.map(drop).unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    let own = research_b.get_job(pb::GetJobRequest { job_id: research_on_a.clone() }).await.unwrap().into_inner();
    assert_eq!(own.caller, "research");

    let listed = |l: pb::ListJobsResponse| {
        assert!(l.unreachable_replicas.is_empty());
        let mut v: Vec<String> = l.jobs.into_iter().map(|j| j.job_id).collect();
        v.sort();
        v
    };
    let mut mine = vec![research_on_a.clone(), research_on_b.clone()];
    mine.sort();
    assert_eq!(listed(research_b.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()), mine);
    assert_eq!(listed(ops_b.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()).len(), 3);

    // One key, two callers, two images: two jobs, whichever replica each key's home is.
    let keyed = |image| pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: "study-7".into() };
    let first = clinic_a.submit_job(keyed(disk(36, 36))).await.unwrap().into_inner();
    let second = research_b.submit_job(keyed(disk(44, 44))).await.unwrap().into_inner();
    assert!(!first.existing && !second.existing && first.job_id != second.job_id, "{first:?} {second:?}");
    let again = research_a.submit_job(keyed(disk(44, 44))).await.unwrap().into_inner();
    assert!(again.existing && again.job_id == second.job_id, "{again:?}");

    // The operator cancels the clinic's job through B.
    ops_b.cancel_job(pb::CancelJobRequest { job_id: clinic_job.clone() }).await.unwrap();
    let mut w = clinic_a.watch_job(pb::WatchJobRequest { job_id: clinic_job.clone() }).await.unwrap().into_inner();
    assert!(matches!(last_event(&mut w).await, Some(Event::Cancelled(_))));
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// `server.auth_token` reloaded on every replica, one step at a time as a rotation goes (each
/// replica accepting both tokens, then sending the new one, then accepting it alone): the calls
/// about a job on the other replica keep working throughout, and the old token ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_token_is_rotated_replica_by_replica() {
    const NEXT: &str = "s3cret-2";
    let (pa, pb_) = (free_port(), free_port());
    let (a, url_a) = start(replica(pa, &[pa, pb_])).await;
    let (b, url_b) = start(replica(pb_, &[pa, pb_])).await;
    let id = submit_via(&mut conn(&url_a).client().await.unwrap(), disk(40, 40), quick()).await;
    let via_b = async |token: &str| {
        let mut c = ConnectArgs { token: Some(token.into()), ..plain_conn(&url_b) }.client().await.unwrap();
        c.get_job(pb::GetJobRequest { job_id: id.clone() }).await.map(|r| r.into_inner().job_id).map_err(|e| e.code())
    };
    assert_eq!(via_b(NEXT).await, Err(Code::Unauthenticated));
    for (sent, also) in [(TOKEN, Some(NEXT)), (NEXT, Some(TOKEN)), (NEXT, None)] {
        for (replica_, port) in [(&a, pa), (&b, pb_)] {
            let mut c = replica(port, &[pa, pb_]);
            c.server.auth_token = Some(sent.into());
            c.server.auth_tokens_accepted = also.iter().map(|t| t.to_string()).collect();
            assert_eq!(replica_.reload_callers(&c).expect("a valid set").changed, ["service"]);
        }
        let step = format!("{sent} sent, {also:?} also");
        assert_eq!(via_b(NEXT).await.as_deref(), Ok(id.as_str()), "the new token, forwarded to A ({step})");
        match also {
            Some(_) => assert_eq!(via_b(TOKEN).await.as_deref(), Ok(id.as_str()), "the old token, still ({step})"),
            None => assert_eq!(via_b(TOKEN).await, Err(Code::Unauthenticated), "the old token ended"),
        }
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
