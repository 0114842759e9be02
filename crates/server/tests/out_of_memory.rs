//! Through the service: a worker whose batch runs out of memory fails none of its jobs. They
//! start over in smaller stacks, report `attempt` 2 in their progress, complete, and
//! `s3net_jobs_restarted_total` counts them.
//!
//! The out-of-memory is real (`tests/support/address_space.rs`): the address space of this test
//! process is capped at the idle server's plus 70 % of what a stack of four jobs adds (measured
//! first, uncapped), so that the stack of four a `cpu_batch = 4` worker builds cannot allocate
//! its activations while a stack of two can. This file is its own test binary: the cap holds for the
//! whole process.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use s3net_server::pb::{self, job_event::Event};

#[path = "../../../tests/support/address_space.rs"]
mod address_space;
use address_space::{cap_address_space, mmap_large_allocations, vm};

/// 256 × 256 with 16 features: a stack of four grows the address space by about 570 MB, so the
/// cap leaves a stack of two about 115 MB to spare. At 128 × 128 (143 MB for four, 29 MB to
/// spare) glibc kept up to 92 MB of address space mapped after a failed stack (even with one
/// arena), and the stack of two and then the jobs alone failed in 1 run of 8; 13 of 13
/// passed at this size, 5 of them beside a busy core.
fn options(seed: u64) -> pb::Options {
    pb::Options {
        iterations: Some(4),
        size: Some(256),
        features: Some(16),
        seed: Some(seed),
        ..quick()
    }
}

/// Streams `n` jobs through Segment so that the worker stacks them all at once: they queue
/// behind a running job of another network shape, which is cancelled once they are all
/// queued, right after `ready` (which may cap the address space). Returns every job's events.
async fn run_together(c: &Client, metrics: SocketAddr, n: u64, ready: impl FnOnce()) -> Vec<Vec<Event>> {
    let blocker = submit_running(&mut c.clone(), disk(32, 32), slow()).await;
    let tasks: Vec<_> = (0..n)
        .map(|seed| {
            let mut c = c.clone();
            tokio::spawn(async move { segment_events(&mut c, disk(256, 256), options(seed)).await })
        })
        .collect();
    while value(&scrape(metrics).await, "s3net_queue_depth") < n as f64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ready();
    c.clone().cancel_job(pb::CancelJobRequest { job_id: blocker }).await.expect("cancel");
    let mut events = Vec::new();
    for t in tasks {
        events.push(t.await.expect("job task"));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_batch_out_of_memory_start_over_and_complete() {
    mmap_large_allocations();
    // One CPU worker that trains up to four jobs at once.
    let mut cfg = config();
    cfg.workers.cpu_batch = Some(4);
    let (server, url) = start(cfg).await;
    let c = client(&url).await;
    let addr = server.metrics_addr().expect("metrics enabled");

    // Warm-up: the worker's allocator arenas, and what libtorch keeps per shape (oneDNN
    // primitives) for stacks of two and four, which stays resident. Then the address space a
    // stack of four jobs needs beyond the idle server's: its activations.
    run_together(&c, addr, 2, || ()).await.iter().for_each(|e| drop(completed(e)));
    run_together(&c, addr, 4, || ()).await.iter().for_each(|e| drop(completed(e)));
    let mut idle = 0;
    run_together(&c, addr, 4, || idle = vm("VmSize:")).await.iter().for_each(|e| drop(completed(e)));
    let four = vm("VmPeak:").saturating_sub(idle);
    assert!(four > 0, "four jobs grew no address space");
    assert_eq!(value(&scrape(addr).await, "s3net_jobs_restarted_total"), 0.0);

    // Capped at 70 % of that: a stack of four cannot allocate its activations; one of two can.
    let mut cap = 0;
    let events = run_together(&c, addr, 4, || {
        cap = vm("VmSize:") + four * 7 / 10;
        cap_address_space(Some(cap));
    })
    .await;
    cap_address_space(None);

    let m = scrape(addr).await;
    let restarted = value(&m, "s3net_jobs_restarted_total");
    assert!(
        restarted >= 2.0,
        "no batch ran out of memory under a cap of {} MB ({} MB for four jobs)",
        cap >> 20,
        four >> 20
    );
    let mut started_over = 0;
    for (i, e) in events.iter().enumerate() {
        let r = completed(e);
        assert_eq!(r.iterations, 4, "job {i}");
        // (attempt, step) of every progress report: attempts never go back, and each starts
        // at step 1 (a stack that fails at its first step leaves no report of attempt 1).
        let steps: Vec<(u32, u32)> = e
            .iter()
            .filter_map(|ev| match ev {
                Event::Progress(p) => Some((p.attempt, p.iteration)),
                _ => None,
            })
            .collect();
        let ok = steps.windows(2).all(|w| w[1] == (w[0].0, w[0].1 + 1) || (w[1].0 > w[0].0 && w[1].1 == 1));
        assert!(ok && steps.first().map(|s| s.1) == Some(1), "job {i}: (attempt, step) {steps:?}");
        started_over += steps.last().map_or(0, |s| s.0 - 1);
    }
    assert_eq!(started_over as f64, restarted, "starts over reported in progress and counted");
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"completed\"}"), 14.0);
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"cancelled\"}"), 4.0, "the four blockers");
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"failed\"}"), 0.0);
    // The worker goes on: a job after the failure completes.
    quick_job_completes(&mut c.clone()).await;

    // A job that cannot train even alone (512², about four times a 256² job) under the same
    // cap fails by itself, as RESOURCE_EXHAUSTED saying so; then the worker goes on.
    cap_address_space(Some(vm("VmSize:") + four * 7 / 10));
    let big = pb::Options { size: Some(512), ..options(9) };
    let events = segment_events(&mut c.clone(), disk(256, 256), big).await;
    cap_address_space(None);
    match events.last() {
        Some(Event::Failed(f)) => {
            assert_eq!(f.code, tonic::Code::ResourceExhausted as i32, "{f:?}");
            assert!(f.message.starts_with("out of memory: ") && f.message.contains("smaller size"), "{f:?}");
        }
        other => panic!("expected the lone 512² job to fail, got {other:?}"),
    }
    let m = scrape(addr).await;
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"failed\"}"), 1.0);
    quick_job_completes(&mut c.clone()).await;
}
