//! The Prometheus endpoint, scraped over real HTTP while a real server runs real jobs: one
//! completed, one cancelled while it runs, one refused as invalid, one refused as queue full.

mod common;

use std::time::Duration;

use common::*;
use s3net_server::pb::{self, JobState};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let mut cfg = config();
    cfg.queue.capacity = 1;
    let (server, url) = start(cfg).await;
    let addr = server.metrics_addr().expect("metrics enabled");
    let mut c = client(&url).await;

    let m = scrape(addr).await;
    assert_eq!(value(&m, "s3net_queue_capacity"), 1.0);
    assert_eq!(value(&m, "s3net_queue_depth"), 0.0);
    assert_eq!(value(&m, "s3net_workers{device=\"cpu\"}"), 1.0);
    assert_eq!(value(&m, "s3net_workers_active{device=\"cpu\"}"), 0.0);
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"completed\"}"), 0.0);
    assert_eq!(value(&m, "s3net_jobs_restarted_total"), 0.0);
    assert_eq!(value(&m, "s3net_jobs_refitted_total"), 0.0);
    // No reload tried: the callers in force are the start's.
    assert_eq!(value(&m, "s3net_config_last_reload_successful"), 1.0);
    assert_eq!(value(&m, "s3net_config_reloads_total{outcome=\"refused\"}"), 0.0);
    // The memory budgets: empty, with their limits (queue.max_queued_bytes and
    // server.max_upload_bytes_in_flight).
    assert_series(
        &m,
        &[
            ("s3net_queue_memory_bytes", 0.0),
            ("s3net_queue_memory_limit_bytes", (2u64 << 30) as f64),
            ("s3net_upload_memory_bytes", 0.0),
            ("s3net_upload_memory_limit_bytes", (1u64 << 30) as f64),
        ],
    );
    let version = format!(
        "s3net_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&m, &version), 1.0);
    // This machine's workers run on the CPU: no GPU, no GPU metric.
    assert!(server
        .workers()
        .iter()
        .all(|w| w.device == s3net_model::DeviceSpec::Cpu));
    assert!(!m.keys().any(|k| k.starts_with("s3net_gpu_memory")));

    // 1. Completed.
    let first = completed(&segment_events(&mut c, disk(32, 32), quick()).await);
    // 2. A long job runs; a second waits (the queue's one place); a third is refused.
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let waiting = submit(&mut c, disk(32, 32), quick()).await;
    let full = try_submit(&mut c, disk(32, 32), quick())
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    // 3. Refused as invalid.
    let bad = c
        .segment(pb::SegmentRequest {
            image: b"not an image".to_vec(),
            options: Some(quick()),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let m = scrape(addr).await;
    assert_series(
        &m,
        &[
            ("s3net_queue_depth", 1.0),
            // The waiting job's decoded 32×32 grey image, as f32.
            ("s3net_queue_memory_bytes", 4096.0),
            ("s3net_upload_memory_bytes", 0.0),
            ("s3net_workers_active{device=\"cpu\"}", 1.0),
            ("s3net_jobs_training{device=\"cpu\"}", 1.0),
            ("s3net_jobs_finishing{device=\"cpu\"}", 0.0),
            ("s3net_rejected_total{reason=\"queue_full\"}", 1.0),
            ("s3net_rejected_total{reason=\"invalid_argument\"}", 1.0),
            ("s3net_jobs_total{outcome=\"completed\"}", 1.0),
            ("s3net_queue_wait_seconds_count", 2.0),
        ],
    );

    // 4. Cancelled while running; then the waiting job runs and completes.
    c.cancel_job(pb::CancelJobRequest {
        job_id: running.clone(),
    })
    .await
    .unwrap();
    let j = wait_final(&mut c, &running, Duration::from_secs(60)).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    let j = wait_final(&mut c, &waiting, Duration::from_secs(60)).await;
    assert_eq!(j.state, JobState::Completed as i32);
    let second = j.result.unwrap();

    let m = scrape(addr).await;
    // Every job a worker took waited some time; completed fits only are timed and counted.
    assert_series(
        &m,
        &[
            ("s3net_jobs_total{outcome=\"completed\"}", 2.0),
            ("s3net_jobs_total{outcome=\"cancelled\"}", 1.0),
            ("s3net_jobs_total{outcome=\"failed\"}", 0.0),
            ("s3net_rejected_total{reason=\"queue_full\"}", 1.0),
            ("s3net_rejected_total{reason=\"invalid_argument\"}", 1.0),
            ("s3net_queue_depth", 0.0),
            ("s3net_queue_memory_bytes", 0.0),
            ("s3net_workers_active{device=\"cpu\"}", 0.0),
            ("s3net_jobs_training{device=\"cpu\"}", 0.0),
            ("s3net_jobs_finishing{device=\"cpu\"}", 0.0),
            ("s3net_queue_wait_seconds_count", 3.0),
            ("s3net_fit_seconds_count", 2.0),
        ],
    );
    let fit_s = first.timings.unwrap().fit_seconds + second.timings.unwrap().fit_seconds;
    assert!((value(&m, "s3net_fit_seconds_sum") - fit_s).abs() < 0.05 * fit_s + 0.01);
    assert_eq!(value(&m, "s3net_fit_iterations_count"), 2.0);
    assert_eq!(
        value(&m, "s3net_fit_iterations_sum"),
        (first.iterations + second.iterations) as f64
    );
    assert_eq!(
        value(&m, "s3net_fit_iterations_bucket{le=\"+Inf\"}"),
        2.0,
        "histograms have their buckets"
    );

    // The endpoint itself: OpenMetrics on request, 404 elsewhere, GET only.
    let (head, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("s3net_jobs_total{outcome=\"completed\"} 2"));
    let (head, _) = http(
        addr,
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    let (head, _) = http(addr, "nonsense\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Still serving after all that.
    assert_eq!(scrape(addr).await.len(), m.len());

    server.shutdown().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the endpoint closes with the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_without_the_token_are_counted() {
    let mut cfg = config();
    cfg.server.auth_token = Some("secret".into());
    let (server, url) = start(cfg).await;
    let addr = server.metrics_addr().unwrap();
    let mut c = client(&url).await;
    let e = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let m = scrape(addr).await;
    assert_eq!(
        value(&m, "s3net_rejected_total{reason=\"unauthenticated\"}"),
        1.0
    );
    assert_eq!(value(&m, "s3net_rejected_total{reason=\"draining\"}"), 0.0);
    server.shutdown().await.unwrap();

    // Disabled: no endpoint at all.
    let mut cfg = config();
    cfg.metrics.listen = String::new();
    let (server, _) = start(cfg).await;
    assert_eq!(server.metrics_addr(), None);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config();
    cfg.metrics.listen = taken.local_addr().unwrap().to_string();
    let err = s3net_server::Server::start(&cfg)
        .await
        .err()
        .expect("the port is taken");
    let msg = format!("{err:#}");
    assert!(msg.contains("metrics.listen"), "{msg}");
}
