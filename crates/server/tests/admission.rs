//! The queue's image-memory budget is held from the image's headers, before its decode: a burst
//! of large images is refused without decoding them. Alone in its test binary, so the process's
//! peak memory is this test's.

mod common;

use common::*;
use s3net_server::pb;
use tonic::Code;

/// A smooth grey picture: a few hundred kB of PNG for many megabytes of pixels.
fn smooth_png(side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(side, side, |x, y| image::Luma([((x / 40 + y / 25) % 200) as u8 + 20]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_images_is_refused_before_decoding() {
    let mut cfg = config();
    cfg.queue.max_queued_bytes = 32 << 20;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    // The worker busy, one small job waiting: the queue is not empty.
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let waiting = submit(&mut c, disk(32, 32), quick()).await;

    // 4000×4000 grey: 64 MB as the queue counts it, and a decode holds more than twice that
    // while it runs; twelve at once decoded first would have added well over a gigabyte here.
    let big = smooth_png(4000);
    let before = peak_rss("self");
    let calls = (0..12).map(|_| {
        let mut c = c.clone();
        let image = big.clone();
        tokio::spawn(async move {
            c.submit_job(pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: String::new() }).await
        })
    });
    for call in calls.collect::<Vec<_>>() {
        let err = call.await.unwrap().expect_err("over the budget");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().starts_with("queue memory is full: this image needs 61.0 MiB decoded"), "{}", err.message());
        assert!(err.message().contains("of the 32.0 MiB budget (queue.max_queued_bytes)"), "{}", err.message());
        assert!(err.metadata().get("retry-after").is_some());
    }
    let grew = peak_rss("self").saturating_sub(before);
    eprintln!("the refused burst raised the peak by {} MB", grew >> 20);
    assert!(grew < 300 << 20, "the refused burst raised the peak by {} MB", grew >> 20);

    // Every reservation was given back: an image of most of the budget still fits.
    let fits = smooth_png(2600); // 27 MB of the 32, beside the waiting 4 kB
    let ok = c.submit_job(pb::SubmitJobRequest { image: fits, options: Some(quick()), idempotency_key: String::new() }).await;
    let id = ok.expect("fits the budget").into_inner().job_id;
    for job_id in [running, waiting, id] {
        c.cancel_job(pb::CancelJobRequest { job_id }).await.unwrap();
    }
    server.shutdown().await.unwrap();
}
