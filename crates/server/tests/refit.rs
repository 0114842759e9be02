//! Through the service: a job whose foreground comes out empty is fitted again with another
//! seed (`workers.foreground_refits`), streams that fit's progress as attempt 2 from step 1,
//! completes with its result, and `s3net_jobs_refitted_total` counts it; a job whose
//! foreground is found is fitted once, and `foreground_refits = 0` never refits.

mod common;

use common::*;
use s3net_server::pb::{self, job_event::Event};

/// (attempt, step) of every progress report.
fn steps(events: &[Event]) -> Vec<(u32, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some((p.attempt, p.iteration)),
            _ => None,
        })
        .collect()
}

/// A dark disk on a bright textured field, RGB: a lesion-like foreground.
fn dark_disk(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
        let v = if fx * fx + fy * fy < 0.06 { 60 } else { 190 } + ((x * 7 + y * 3) % 5) as u8 * 3;
        image::Rgb([v, v - 10, v - 20])
    });
    encode(image::DynamicImage::ImageRgb8(img), image::ImageFormat::Png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_foreground_is_fitted_again_once() {
    let mut cfg = config();
    cfg.workers.foreground_refits = Some(1);
    let (server, url) = start(cfg).await;
    let addr = server.metrics_addr().expect("metrics enabled");
    let mut c = client(&url).await;

    // `disk` is a bright disk on a dark field: nothing dark inside anything, nothing to pick.
    let e = segment_events(&mut c, disk(32, 32), quick()).await;
    let r = completed(&e);
    assert_eq!(steps(&e), [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]);
    assert_eq!(r.foreground_fraction, 0.0, "nothing to find the second time either");
    assert_eq!(r.iterations, 3);
    let m = scrape(addr).await;
    assert_eq!(value(&m, "s3net_jobs_refitted_total"), 1.0);
    assert_eq!(value(&m, "s3net_jobs_total{outcome=\"completed\"}"), 1.0);

    // A foreground found: one fit.
    let opts = pb::Options { iterations: Some(10), ..quick() };
    let e = segment_events(&mut c, dark_disk(48, 48), opts).await;
    let r = completed(&e);
    assert!(r.foreground_fraction > 0.05, "{}", r.foreground_fraction);
    assert!(steps(&e).iter().all(|s| s.0 == 1), "{:?}", steps(&e));
    assert_eq!(value(&scrape(addr).await, "s3net_jobs_refitted_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refits_when_configured_so() {
    let (server, url) = start(config()).await; // the test config: foreground_refits = 0
    let addr = server.metrics_addr().expect("metrics enabled");
    let e = segment_events(&mut client(&url).await, disk(32, 32), quick()).await;
    assert_eq!(completed(&e).foreground_fraction, 0.0);
    assert_eq!(steps(&e), [(1, 1), (1, 2), (1, 3)]);
    assert_eq!(value(&scrape(addr).await, "s3net_jobs_refitted_total"), 0.0);
}

/// In a worker that stacks jobs, a refit joins the stack like a new job: each of three jobs
/// submitted together (two with nothing to find) gets the steps of its own fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refits_join_a_stack() {
    let mut cfg = config();
    cfg.workers.foreground_refits = Some(1);
    cfg.workers.cpu_batch = Some(3);
    let (server, url) = start(cfg).await;
    let addr = server.metrics_addr().expect("metrics enabled");
    let c = client(&url).await;
    let opts = |seed| pb::Options { iterations: Some(6), seed: Some(seed), ..quick() };
    let jobs: Vec<_> = [disk(32, 32), dark_disk(32, 32), disk(32, 32)]
        .into_iter()
        .enumerate()
        .map(|(i, img)| {
            let mut c = c.clone();
            tokio::spawn(async move { segment_events(&mut c, img, opts(i as u64)).await })
        })
        .collect();
    let mut refits = 0;
    for (i, j) in jobs.into_iter().enumerate() {
        let e = j.await.expect("job task");
        let r = completed(&e);
        let s = steps(&e);
        let attempts = s.last().expect("progress").0;
        let expect: Vec<(u32, u32)> = (1..=attempts).flat_map(|a| (1..=6).map(move |k| (a, k))).collect();
        assert_eq!(s, expect, "job {i}");
        assert_eq!(attempts == 2, r.foreground_fraction == 0.0, "job {i}: refitted iff nothing was found");
        refits += attempts - 1;
    }
    assert_eq!(refits, 2, "both bright disks, not the dark one");
    assert_eq!(value(&scrape(addr).await, "s3net_jobs_refitted_total"), 2.0);
}
