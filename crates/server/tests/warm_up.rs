//! Through the service: with `workers.warm_up` (the default) health reports NOT_SERVING while
//! the workers warm their devices up (`s3net_model::warm_up`), then SERVING; a job submitted
//! meanwhile waits in the queue and completes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use s3net_server::pb;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_the_workers_are_warm() {
    let mut cfg = config();
    cfg.workers.warm_up = None; // the default: on
    let (server, url) = start(cfg).await;
    let ch = tonic::transport::Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(ch);
    let mut status = async |service: &str| {
        let r = health.check(HealthCheckRequest { service: service.into() }).await;
        r.expect("health check").into_inner().status
    };
    // The warm-up takes about 0.1 s here; the first checks come within milliseconds.
    assert_eq!(status("").await, NOT_SERVING);
    assert_eq!(status("s3net.v1.Segmenter").await, NOT_SERVING);

    // A job submitted now waits for its worker's warm-up, then runs.
    let mut c = client(&url).await;
    let id = submit(&mut c, disk(24, 20), quick()).await;

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match status("").await {
            SERVING => break,
            s => assert_eq!(s, NOT_SERVING, "only NOT_SERVING comes before SERVING"),
        }
        assert!(Instant::now() < until, "still NOT_SERVING after 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status("s3net.v1.Segmenter").await, SERVING);
    // What the warm-up measured a step to take, for the operator.
    let m = scrape(server.metrics_addr().expect("metrics")).await;
    let step = value(&m, r#"s3net_warm_up_step_seconds{device="cpu"}"#);
    assert!(step > 0.0 && step < 60.0, "{step} s a step");
    let j = wait_final(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(j.state, pb::JobState::Completed as i32);

    server.shutdown().await.unwrap();
}

/// The hint of a full queue before any fit has ended: from the warm-up's measure of a step,
/// times the queued job's steps on its grid; without a warm-up, the jobs ahead at a guessed
/// 1 s each (a running job and a queued one: 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_servers_retry_hint_comes_from_the_warm_up() {
    for warm_up in [false, true] {
        let mut cfg = config();
        cfg.workers.warm_up = Some(warm_up);
        cfg.queue.capacity = 1;
        let (server, url) = start(cfg).await;
        let mut c = client(&url).await;
        // 1000 steps on a 64² grid each: no fit ends during the test.
        let running = submit_running(&mut c, disk(48, 48), slow()).await;
        let queued = submit(&mut c, disk(48, 48), slow()).await;
        let req = pb::SubmitJobRequest { image: disk(32, 32), options: Some(quick()), idempotency_key: String::new() };
        let err = c.submit_job(req).await.expect_err("the queue is full");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        let hint: u64 = err.metadata().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).expect("a retry-after hint");
        if warm_up {
            // 1000 of the warm-up's 64² steps (its own width, F = 32, on one thread): seconds
            // on any CPU, more than the guess's 2.
            assert!((3..3600).contains(&hint), "{hint} s");
        } else {
            assert_eq!(hint, 2, "the guess: two jobs ahead at 1 s");
        }
        for id in [queued, running] {
            c.cancel_job(pb::CancelJobRequest { job_id: id.clone() }).await.expect("cancel");
            wait_final(&mut c, &id, Duration::from_secs(30)).await;
        }
        server.shutdown().await.unwrap();
    }
}
