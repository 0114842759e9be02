//! A worker with `batch > 1` trains queued jobs together (continuous batching): they join a
//! running job on the one worker, each gets the result it would get alone, a job of another
//! network shape waits for the batch to drain, cancelling one job of a batch leaves the others
//! alone.

mod common;

use std::time::Duration;

use common::*;
use s3net_server::pb::{self, JobState};

/// Labels of a result as 16-bit values.
fn labels(r: &pb::SegmentationResult) -> Vec<u16> {
    image::load_from_memory(&r.labels_png)
        .expect("labels PNG")
        .to_luma16()
        .into_raw()
}

fn job_options(seed: u64) -> pb::Options {
    pb::Options {
        iterations: Some(6),
        seed: Some(seed),
        ..quick()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_train_together_each_as_if_alone() {
    let mut cfg = config();
    cfg.workers.cpu_batch = Some(5);
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    // A long job runs on the only worker; four jobs of its network shape join its batch, then
    // a job of another shape queues behind them.
    let long = submit_running(&mut c, disk(32, 32), pb::Options { iterations: Some(1000), ..job_options(9) }).await;
    let sizes = [(40, 30), (32, 32), (28, 44), (36, 36)];
    let mut ids = Vec::new();
    for (i, &(w, h)) in sizes.iter().enumerate() {
        ids.push(submit(&mut c, disk(w, h), job_options(i as u64)).await);
    }
    let other = submit(&mut c, disk(30, 30), pb::Options { features: Some(6), ..job_options(5) }).await;

    let mut jobs = Vec::new();
    for id in &ids {
        jobs.push(wait_final(&mut c, id, Duration::from_secs(60)).await);
    }
    for j in &jobs {
        assert_eq!(j.state, JobState::Completed as i32, "{:?}", j.failure);
    }
    // One worker, and the long job still runs: the four ran in its batch, beside it.
    let l = c.get_job(pb::GetJobRequest { job_id: long.clone() }).await.unwrap().into_inner();
    assert_eq!(l.state, JobState::Running as i32, "the long job should still be running");
    assert!(jobs.iter().all(|j| j.started_at >= l.started_at));
    // The job of another shape is not taken into the batch, nor does a later job overtake it.
    let o = c.get_job(pb::GetJobRequest { job_id: other.clone() }).await.unwrap().into_inner();
    assert_eq!(o.state, JobState::Queued as i32, "another shape must wait for the batch to drain");

    // Cancelling the long job leaves the batch empty; then the other shape runs.
    c.cancel_job(pb::CancelJobRequest { job_id: long.clone() }).await.unwrap();
    let l = wait_final(&mut c, &long, Duration::from_secs(30)).await;
    assert_eq!(l.state, JobState::Cancelled as i32);
    let o = wait_final(&mut c, &other, Duration::from_secs(60)).await;
    assert_eq!(o.state, JobState::Completed as i32, "{:?}", o.failure);
    assert!(o.started_at >= l.finished_at - 1e-3, "ran inside a batch of another shape");
    assert_eq!(o.result.as_ref().unwrap().options.as_ref().unwrap().features, 6);

    // Each batched result is the one the job gets alone (a one-job-at-a-time server).
    let (alone_server, alone_url) = start(config()).await;
    let mut a = client(&alone_url).await;
    for (i, (&(w, h), j)) in sizes.iter().zip(&jobs).enumerate() {
        let alone = completed(&segment_events(&mut a, disk(w, h), job_options(i as u64)).await);
        let batched = j.result.as_ref().unwrap();
        assert_eq!((batched.width, batched.height), (w, h));
        assert_eq!(batched.iterations, alone.iterations, "job {i}");
        let (x, y) = (labels(batched), labels(&alone));
        let same = x.iter().zip(&y).filter(|(p, q)| p == q).count() as f64 / x.len() as f64;
        assert!(same >= 0.98, "job {i}: only {:.1} % of the labels agree", 100.0 * same);
    }
    alone_server.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

#[test]
fn batch_of_zero_is_a_configuration_error() {
    let mut cfg = config();
    cfg.workers.gpu_batch = Some(0);
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("workers.cpu_batch and workers.gpu_batch must be at least 1"), "{e}");
}

#[test]
fn gpu_memory_fraction_must_be_a_fraction() {
    for (f, ok) in [(0.25, true), (1.0, true), (0.0, false), (1.5, false), (f64::NAN, false)] {
        let mut cfg = config();
        cfg.workers.gpu_memory_fraction = Some(f);
        match cfg.validate() {
            Ok(()) => assert!(ok, "{f} accepted"),
            Err(e) => {
                assert!(!ok, "{f} refused: {e}");
                assert!(e.to_string().contains("workers.gpu_memory_fraction must be in (0, 1]"), "{e}");
            }
        }
    }
}

/// A job's foreground and result are made at the image's own resolution on the worker's
/// finisher thread: meanwhile the other jobs of its stack go on training. Here a
/// 16-megapixel scan ends beside a long job; the long job's steps go on between the scan's
/// last step and its result (on one thread, as before, they stopped for that whole time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_does_not_hold_up_its_stack() {
    use s3net_server::pb::job_event::Event;
    use std::time::Instant;
    let mut cfg = config();
    cfg.workers.cpu_batch = Some(2);
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let long = submit_running(&mut c, disk(32, 32), pb::Options { iterations: Some(1000), ..job_options(9) }).await;
    // Every step of the long job, stamped as it arrives.
    let mut watch = c.watch_job(pb::WatchJobRequest { job_id: long.clone() }).await.unwrap().into_inner();
    let steps = tokio::spawn(async move {
        let mut at = Vec::new();
        while let Ok(Some(e)) = watch.message().await {
            if matches!(e.event, Some(Event::Progress(_))) {
                at.push(Instant::now());
            }
        }
        at
    });
    let mut s = c
        .segment(pb::SegmentRequest { image: disk(4000, 4000), options: Some(job_options(1)) })
        .await
        .unwrap()
        .into_inner();
    let (mut last_step, mut done) = (None, None);
    while let Some(e) = s.message().await.unwrap() {
        match e.event {
            Some(Event::Progress(_)) => last_step = Some(Instant::now()),
            Some(Event::Completed(c)) => {
                assert_eq!(c.result.unwrap().width, 4000);
                done = Some(Instant::now());
            }
            other => assert!(matches!(other, Some(Event::Queued(_) | Event::Started(_))), "{other:?}"),
        }
    }
    let (last_step, done) = (last_step.expect("steps"), done.expect("a result"));
    c.cancel_job(pb::CancelJobRequest { job_id: long.clone() }).await.unwrap();
    let steps = steps.await.unwrap();
    let between = steps.iter().filter(|&&t| t > last_step && t < done).count();
    eprintln!("the long job made {between} steps in the {:?} between the scan's last step and its result", done - last_step);
    assert!(
        between >= 3,
        "the long job made {between} steps in the {:?} between the scan's last step and its result",
        done - last_step
    );
    server.shutdown().await.unwrap();
}
