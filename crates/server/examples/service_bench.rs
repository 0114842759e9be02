//! Service overhead benchmark: an in-process server on loopback and real gRPC clients.
//!
//! `cargo run --release -p s3net-server --example service_bench [-- --runs N --workers W --threads T --per-client J]`
//!
//! * round-trip latency p50/p99 of a 1-iteration job on a 64×64 image, and the part of it
//!   that is not the fit (decode, queue, events, PNG encoding, transport);
//! * throughput and peak memory with 8 and 32 concurrent clients on 256×256 images;
//! * 160 clients at once against a queue with room for 32, on a fresh server and after 8
//!   fits: the refused retry after the server's hint; throughput, and how often they were
//!   refused (`--burst-only 1` runs these alone);
//! * resident memory after each quarter of 1000 one-step jobs (`--soak-only 1` alone);
//! * a bulk caller's 48 clients sending 3 jobs each and a clinic's 8 jobs one after another,
//!   with and without the bulk caller's `max_active_jobs` and the clinic's priority
//!   (`--callers-only 1` alone);
//! * the cost of progress streaming (every step vs. none) on a 20-step fit;
//! * the time to upload 32 MiB over a link with a round trip of 10 and 40 ms (a proxy that
//!   delays every byte), with HTTP/2 windows of 1 MiB (hyper's default) and 8 MiB (ours).
//!
//! Prints a Markdown table. Peak memory is the process's VmHWM (server and clients together).

use std::time::{Duration, Instant};

use s3net_server::cli::RetryArgs;
use s3net_server::pb::{self, job_event::Event, segmenter_client::SegmenterClient};
use s3net_server::{Config, Server};
use tonic::transport::Channel;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn image(side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(side, side, |x, y| {
        let (dx, dy) = (x as f64 - side as f64 / 2.0, y as f64 - side as f64 / 2.0);
        let inside = dx * dx + dy * dy < (side as f64 / 3.0).powi(2);
        image::Luma([if inside { 190 } else { 50 } + ((x * 7 + y * 13) % 23) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

fn options(iterations: u32) -> pb::Options {
    pb::Options {
        iterations: Some(iterations),
        size: Some(64),
        min_labels: Some(0),
        device: "cpu".into(),
        ..Default::default()
    }
}

/// One Segment call: (round trip, fit seconds reported by the server, events received).
async fn segment(
    c: &mut SegmenterClient<Channel>,
    img: Vec<u8>,
    o: pb::Options,
) -> (Duration, f64, usize) {
    let (d, fit, n, _) = segment_retrying(c, img, o, None, None).await;
    (d, fit, n)
}

/// [`segment`], the call sent again after each refusal `retry` allows (as `s3net client`
/// does: no sooner than the server's `retry-after` hint), as the caller of `token`; also
/// returns the refusals.
async fn segment_retrying(
    c: &mut SegmenterClient<Channel>,
    img: Vec<u8>,
    o: pb::Options,
    retry: Option<&RetryArgs>,
    token: Option<&str>,
) -> (Duration, f64, usize, u32) {
    let t = Instant::now();
    let mut refused = 0;
    let mut s = loop {
        let mut req = tonic::Request::new(pb::SegmentRequest { image: img.clone(), options: Some(o.clone()) });
        if let Some(t) = token {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("token"));
        }
        let call = c.segment(req).await;
        match (call, retry) {
            (Ok(s), _) => break s.into_inner(),
            (Err(e), Some(r)) => {
                let wait = r.delay(refused, &e).unwrap_or_else(|| panic!("segment: {e}"));
                refused += 1;
                tokio::time::sleep(wait).await;
            }
            (Err(e), None) => panic!("segment: {e}"),
        }
    };
    let (mut fit, mut n) = (0.0, 0);
    while let Some(e) = s.message().await.expect("stream") {
        n += 1;
        match e.event {
            Some(Event::Completed(c)) => {
                fit = c
                    .result
                    .and_then(|r| r.timings)
                    .map_or(0.0, |t| t.fit_seconds)
            }
            Some(Event::Failed(f)) => panic!("{}", f.message),
            _ => {}
        }
    }
    (t.elapsed(), fit, n, refused)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A memory line of /proc/self/status, in MiB.
fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Memory over many jobs: 4 clients send 1000 one-step jobs on 64×64 images, a quarter at a
/// time, to a server that keeps finished results for 5 s (so that what it keeps stops
/// growing); the process's resident memory (server and clients) after the first quarter and
/// its growth after each of the others. A leak of a job's memory shows as growth.
async fn soak(workers: usize) {
    let (clients, quarter) = (4usize, 250usize);
    let (server, url) = start_with(workers, 100, |c| c.queue.retention_s = 5).await;
    let img = image(64);
    let mut rss = Vec::new();
    for _ in 0..4 {
        let tasks: Vec<_> = (0..clients)
            .map(|k| {
                let (url, img) = (url.clone(), img.clone());
                tokio::spawn(async move {
                    let mut c = client(&url).await;
                    for _ in (k..quarter).step_by(clients) {
                        segment(&mut c, img.clone(), options(1)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client");
        }
        rss.push(rss_mib());
    }
    // Growth from the first quarter on: the process's resident memory also holds what the
    // servers of the rows before left with the allocator.
    let growth: Vec<String> = rss[1..].iter().map(|r| format!("{:+.0}", r - rss[0])).collect();
    println!(
        "| {} one-step 64×64 jobs by {clients} clients, results kept 5 s: the process's resident memory after the first {quarter}, then its growth after {} / {} / {} | {:.0} MiB, then {} MiB |",
        4 * quarter,
        2 * quarter,
        3 * quarter,
        4 * quarter,
        rss[0],
        growth.join(" / ")
    );
    server.shutdown().await.expect("shutdown");
}

async fn start(workers: usize, progress_ms: u64) -> (Server, String) {
    start_with(workers, progress_ms, |_| {}).await
}

async fn start_with(workers: usize, progress_ms: u64, set: impl FnOnce(&mut Config)) -> (Server, String) {
    let mut c = Config::default();
    c.workers.torch_threads = Some(arg("--threads", 1));
    c.server.addr = "127.0.0.1:0".into();
    c.metrics.listen = String::new();
    c.server.progress_interval_ms = progress_ms;
    c.workers.cpu_workers = Some(workers);
    c.queue.capacity = 256;
    set(&mut c);
    let s = Server::start(&c).await.expect("server");
    let url = format!("http://{}", s.local_addr());
    serving(&url).await;
    (s, url)
}

/// Waits until the server reports SERVING, i.e. its workers have warmed up: a job sent
/// before waits for that, which would count the warm-up into the first rows' throughput (it
/// did from the warm-up's arrival until 2026-11-29: 8 clients 3.0 jobs/s instead of 5).
async fn serving(url: &str) {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let ch = Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect");
    let mut health = HealthClient::new(ch);
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let r = health.check(HealthCheckRequest { service: String::new() }).await.expect("health check");
        if r.into_inner().status == ServingStatus::Serving as i32 {
            return;
        }
        assert!(Instant::now() < until, "not SERVING after 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client(url: &str) -> SegmenterClient<Channel> {
    SegmenterClient::new(
        Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .expect("connect"),
    )
}

/// A TCP proxy to `upstream` that delays every byte by half of `rtt` each way, with no cap on
/// bandwidth: a long link, on loopback. Returns its address.
async fn delay_proxy(upstream: std::net::SocketAddr, rtt: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until((at + delay).into()).await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        });
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy");
    let addr = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
            tokio::spawn(pipe(cr, sw, rtt / 2));
            tokio::spawn(pipe(sr, cw, rtt / 2));
        }
    });
    addr
}

/// Seconds to send a 32 MiB `SubmitJob` (bytes that are no image: refused with
/// INVALID_ARGUMENT as soon as they are all received, so the time is the transfer's) through
/// a link of `rtt`, to a server with an HTTP/2 window of `window` bytes; median of `runs`.
async fn upload_seconds(window: u32, rtt: Duration, runs: usize) -> f64 {
    let (server, _) = start_with(1, 100, |c| c.server.http2_window_bytes = window).await;
    let proxy = delay_proxy(server.local_addr(), rtt).await;
    let mut c = client(&format!("http://{proxy}")).await.max_encoding_message_size(usize::MAX);
    let bytes: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut v = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let r = c.submit_job(pb::SubmitJobRequest { image: bytes.clone(), ..Default::default() }).await;
        assert_eq!(r.expect_err("not an image").code(), tonic::Code::InvalidArgument);
        if i > 0 {
            v.push(t.elapsed().as_secs_f64()); // the first one is the warm-up
        }
    }
    server.shutdown().await.expect("shutdown");
    pct(&mut v, 0.5)
}

/// 160 clients at once where 32 jobs may wait, on a server that has first run `warm` fits one
/// after another (its retry hint's mean fit learnt from them; 0: a fresh server's guess). The
/// others are refused with RESOURCE_EXHAUSTED and a retry hint, wait it out and come back, as
/// `s3net client` does: the hint is good if the worker never runs dry meanwhile (the jobs per
/// second match the rows of 8 and 32 clients) and nobody is refused over and over.
async fn burst(workers: usize, warm: usize) {
    let (clients, room) = (160usize, 32usize);
    let (server, url) = start_with(workers, 100, |c| c.queue.capacity = room).await;
    let mut c = client(&url).await;
    for _ in 0..warm {
        segment(&mut c, image(256), options(5)).await;
    }
    let retry = RetryArgs { retries: 50, backoff: 0.5 };
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (url, retry) = (url.clone(), retry.clone());
            tokio::spawn(async move {
                let mut c = client(&url).await;
                segment_retrying(&mut c, image(256), options(5), Some(&retry), None).await.3
            })
        })
        .collect();
    let mut refused = Vec::new();
    for t in tasks {
        refused.push(t.await.expect("client"));
    }
    let s = t.elapsed().as_secs_f64();
    let (total, most) = (refused.iter().sum::<u32>(), refused.iter().copied().max().unwrap_or(0));
    let again = refused.iter().filter(|&&r| r > 1).count();
    let server_was = if warm == 0 { "a fresh server".to_string() } else { format!("after {warm} fits") };
    println!(
        "| {clients} clients × 1 job at once, queue of {room}, {server_was}, the refused retrying after the server's hint | {:.2} jobs/s, all {clients} done; {total} refusals, {again} clients refused more than once (at most {most} times) |",
        clients as f64 / s
    );
    server.shutdown().await.expect("shutdown");
}

/// Two callers of one server (`[server.callers]`): a bulk pipeline of 48 clients, each sending
/// 3 jobs one after another and retrying after the server's hints, keeps a queue with room for
/// 32 full; half a second in, a clinic sends 8 jobs one after another, as a PACS bridge sends a
/// study's slices. Without a limit the clinic's jobs are refused until a place opens and then
/// wait behind the bulk jobs; with the bulk caller's `max_active_jobs` the queue has room and a
/// clinic job waits behind at most that many, and with a higher priority for the running job
/// only; with the callers taking turns (`queue.fair_share`, the default) a clinic job that got
/// in is the next one a worker takes, and in arrival order it waits behind the queue. Last, the
/// bulk pipeline as it should be sent to such a server: 4 clients of 36 jobs, as many as its
/// limit, never refused. The clinic's time per job (from its first attempt to its result) and
/// its refusals, and when the bulk caller's last job ended.
async fn callers(workers: usize, (bulk, per_bulk): (usize, usize), bulk_limit: u32, clinic_priority: i32, fair: bool, share: f64) {
    use s3net_server::config::CallerConfig;
    let (clinic_jobs, room) = (8usize, 32usize);
    let (server, url) = start_with(workers, 100, |c| {
        c.queue.capacity = room;
        c.queue.fair_share = fair;
        c.queue.max_caller_share = share;
        c.server.callers.insert("research".into(), CallerConfig { token: "r".into(), max_active_jobs: bulk_limit, ..Default::default() });
        c.server.callers.insert("clinic".into(), CallerConfig { token: "c".into(), ..Default::default() });
    })
    .await;
    let mut c = client(&url).await;
    for _ in 0..4 {
        segment_retrying(&mut c, image(256), options(5), None, Some("c")).await;
    }
    let retry = RetryArgs { retries: 1000, backoff: 0.5 };
    let t = Instant::now();
    let tasks: Vec<_> = (0..bulk)
        .map(|_| {
            let (url, retry) = (url.clone(), retry.clone());
            tokio::spawn(async move {
                let mut c = client(&url).await;
                for _ in 0..per_bulk {
                    segment_retrying(&mut c, image(256), options(5), Some(&retry), Some("r")).await;
                }
                t.elapsed().as_secs_f64()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut waits, mut refused) = (Vec::new(), 0);
    let urgent = pb::Options { priority: clinic_priority, ..options(5) };
    for _ in 0..clinic_jobs {
        let (d, _, _, r) = segment_retrying(&mut c, image(256), urgent.clone(), Some(&retry), Some("c")).await;
        waits.push(d.as_secs_f64());
        refused += r;
    }
    let mut bulk_done: f64 = 0.0;
    for task in tasks {
        bulk_done = bulk_done.max(task.await.expect("client"));
    }
    let mut limit = if bulk_limit == 0 { "no per-caller limit".to_string() } else { format!("the bulk caller's max_active_jobs = {bulk_limit}") };
    if clinic_priority != 0 {
        limit += &format!(", the clinic's priority {clinic_priority}");
    }
    limit += if fair { ", callers taking turns" } else { ", arrival order (queue.fair_share = false)" };
    limit += &if share < 1.0 { format!(", one caller at most {share} of the queue") } else { ", no share of the queue".to_string() };
    println!(
        "| a bulk caller's {bulk} clients × {per_bulk} jobs and a clinic's {clinic_jobs} jobs one after another, queue of {room}, 256×256, 5 steps, {limit} | clinic: {:.2} s a job (median; longest {:.2} s), {refused} refusals; the bulk caller's last job done after {bulk_done:.1} s |",
        pct(&mut waits.clone(), 0.5),
        waits.iter().copied().fold(0.0, f64::max),
    );
    server.shutdown().await.expect("shutdown");
}

/// [`callers`]' cases: the bulk clients × their jobs, its `max_active_jobs`, the clinic's
/// priority, whether the callers take turns, the most of the queue one caller may hold.
type CallerCase = ((usize, usize), u32, i32, bool, f64);
const CALLER_CASES: [CallerCase; 7] = [
    ((48, 3), 0, 0, false, 1.0),
    ((48, 3), 0, 0, true, 1.0),
    ((48, 3), 0, 0, true, 0.75),
    ((48, 3), 4, 0, false, 1.0),
    ((48, 3), 4, 0, true, 0.75),
    ((48, 3), 0, 10, true, 0.75),
    ((4, 36), 4, 10, true, 0.75),
];

#[tokio::main]
async fn main() {
    s3net_model::tune_allocator();
    let runs = arg("--runs", 50);
    let workers = arg("--workers", 1);
    println!("| measurement | value |\n|---|---|");
    if arg("--burst-only", 0) == 1 {
        for warm in [0, 8] {
            burst(workers, warm).await;
        }
        return;
    }
    if arg("--soak-only", 0) == 1 {
        soak(workers).await;
        return;
    }
    if arg("--callers-only", 0) == 1 {
        for (bulk, limit, priority, fair, share) in CALLER_CASES {
            callers(workers, bulk, limit, priority, fair, share).await;
        }
        return;
    }

    // Latency of a 1-iteration job on 64×64.
    let (server, url) = start(workers, 100).await;
    let mut c = client(&url).await;
    let img = image(64);
    segment(&mut c, img.clone(), options(1)).await; // warm-up
    let (mut rt, mut over) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (d, fit, _) = segment(&mut c, img.clone(), options(1)).await;
        rt.push(d.as_secs_f64() * 1e3);
        over.push((d.as_secs_f64() - fit) * 1e3);
    }
    println!(
        "| round trip, 1 step, 64×64, p50 / p99 ({runs} runs) | {:.1} / {:.1} ms |",
        pct(&mut rt, 0.5),
        pct(&mut rt, 0.99)
    );
    println!(
        "| of which not the fit, p50 / p99 | {:.1} / {:.1} ms |",
        pct(&mut over, 0.5),
        pct(&mut over, 0.99)
    );
    server.shutdown().await.expect("shutdown");

    // Throughput with concurrent clients on 256×256.
    for clients in [8usize, 32] {
        let (server, url) = start(workers, 100).await;
        let per_client = arg("--per-client", 1);
        let t = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let mut c = client(&url).await;
                    for _ in 0..per_client {
                        segment(&mut c, image(256), options(5)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client");
        }
        let jobs = clients * per_client;
        let s = t.elapsed().as_secs_f64();
        println!(
            "| {clients} clients × {per_client} jobs, 256×256, 5 steps, {workers} worker(s) | {:.2} jobs/s, peak RSS {:.0} MiB |",
            jobs as f64 / s,
            peak_rss_mib()
        );
        server.shutdown().await.expect("shutdown");
    }

    // A burst past the queue, on a fresh server and on one that has run a few fits.
    for warm in [0, 8] {
        burst(workers, warm).await;
    }

    soak(workers).await;

    for (bulk, limit, priority, fair, share) in CALLER_CASES {
        callers(workers, bulk, limit, priority, fair, share).await;
    }

    // Progress streaming: every step vs. none, 20 steps.
    for (label, ms) in [("every step", 0u64), ("none", 3_600_000)] {
        let (server, url) = start(workers, ms).await;
        let mut c = client(&url).await;
        segment(&mut c, img.clone(), options(20)).await;
        let (mut v, mut events) = (Vec::new(), 0);
        for _ in 0..runs.min(20) {
            let (d, _, n) = segment(&mut c, img.clone(), options(20)).await;
            v.push(d.as_secs_f64() * 1e3);
            events = n;
        }
        println!(
            "| 20 steps, 64×64, progress {label} ({events} events), p50 | {:.1} ms |",
            pct(&mut v, 0.5)
        );
        server.shutdown().await.expect("shutdown");
    }

    // Uploads over a long link: the HTTP/2 window allows one window per round trip.
    for rtt_ms in [10u64, 40] {
        let rtt = Duration::from_millis(rtt_ms);
        let (before, now) = (upload_seconds(1 << 20, rtt, 5).await, upload_seconds(8 << 20, rtt, 5).await);
        println!(
            "| upload of 32 MiB over a {rtt_ms} ms round trip, median of 5: HTTP/2 window 1 MiB (hyper's default) / 8 MiB (`server.http2_window_bytes`) | {before:.2} s / {now:.2} s ({:.0} / {:.0} MiB/s, {:.1}× faster) |",
            32.0 / before,
            32.0 / now,
            before / now
        );
    }
}
