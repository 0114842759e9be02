//! A real server on an ephemeral loopback port and a real tonic client, tiny images and fits.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use s3net_server::pb::{self, job_event::Event, segmenter_client::SegmenterClient};
use s3net_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub type Client = SegmenterClient<Channel>;

/// A free loopback port (bound, read, released) for a server started as a child process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Plain-text connection settings for `url`: no token, no TLS.
pub fn plain_conn(url: &str) -> s3net_server::cli::ConnectArgs {
    s3net_server::cli::ConnectArgs {
        addr: url.to_string(),
        token: None,
        token_file: None,
        ca: None,
        cert: None,
        key: None,
    }
}

/// The body of a test binary's `serve_child` test: when started as a child process with
/// S3NET_SERVE_CHILD set, run `s3net serve` from the environment's configuration and exit
/// with 0 (clean shutdown) or 3.
pub fn serve_if_child() {
    if std::env::var_os("S3NET_SERVE_CHILD").is_some() {
        let args = s3net_server::cli::ServeArgs { config: std::env::var_os("S3NET_SERVE_CHILD_CONFIG").map(Into::into), ..Default::default() };
        let r = s3net_server::cli::run_serve(args);
        if let Err(e) = &r {
            eprintln!("serve failed: {e:#}");
        }
        std::process::exit(if r.is_ok() { 0 } else { 3 });
    }
}

/// A test configuration: one CPU worker with one libtorch thread, every progress step streamed.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.addr = "127.0.0.1:0".into();
    c.server.progress_interval_ms = 0;
    c.server.shutdown_grace_s = 1;
    c.workers.cpu_workers = Some(1);
    c.workers.torch_threads = Some(1);
    // `disk` is a bright disk on a dark field: nothing dark inside anything, so its foreground
    // is empty, and by default every such job would be fitted twice (tests/refit.rs covers that).
    c.workers.foreground_refits = Some(0);
    // The workers' warm-up (0.1 s each here) would hold every test server NOT_SERVING for its
    // while; tests/warm_up.rs covers it.
    c.workers.warm_up = Some(false);
    // Many servers run at once in a test binary: each gets its own metrics port.
    c.metrics.listen = "127.0.0.1:0".into();
    c
}

pub async fn start(c: Config) -> (Server, String) {
    let server = Server::start(&c).await.expect("server starts");
    let url = format!("http://{}", server.local_addr());
    (server, url)
}

pub async fn client(url: &str) -> Client {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    SegmenterClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Fast fit options: 3 steps on a 32×32 grid with 8 clusters.
pub fn quick() -> pb::Options {
    pb::Options {
        iterations: Some(3),
        size: Some(32),
        features: Some(8),
        min_labels: Some(0),
        device: "cpu".into(),
        ..Default::default()
    }
}

/// A fit long enough to be cancelled while it runs (seconds), still 8 clusters on 32×32.
pub fn slow() -> pb::Options {
    pb::Options {
        iterations: Some(1000),
        size: Some(64),
        ..quick()
    }
}

/// A grey disk on a darker background, with some texture.
pub fn disk(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f64 - w as f64 / 2.0, y as f64 - h as f64 / 2.0);
        let r = (w.min(h) as f64) / 3.0;
        let base = if dx * dx + dy * dy < r * r { 200 } else { 40 };
        image::Luma([base + ((x * 7 + y * 13) % 17) as u8])
    });
    encode(
        image::DynamicImage::ImageLuma8(img),
        image::ImageFormat::Png,
    )
}

pub fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

pub fn data(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The last event of a job's stream, read to its end (panics on a status error).
pub async fn last_event(s: &mut tonic::Streaming<pb::JobEvent>) -> Option<Event> {
    let mut last = None;
    while let Some(e) = s.message().await.expect("stream") {
        last = e.event;
    }
    last
}

/// A process's peak resident memory so far (VmHWM), in bytes: `pid` "self" for this one.
pub fn peak_rss(pid: &str) -> u64 {
    memory_status(pid, "VmHWM")
}

/// A process's resident memory now (VmRSS), in bytes.
pub fn rss(pid: &str) -> u64 {
    memory_status(pid, "VmRSS")
}

/// A line of `/proc/PID/status` given in kB, in bytes.
fn memory_status(pid: &str, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("a {key} line"));
    kb * 1024
}

/// Runs Segment and collects every event (panics on a status error).
pub async fn segment_events(c: &mut Client, image: Vec<u8>, options: pb::Options) -> Vec<Event> {
    let mut s = c
        .segment(pb::SegmentRequest {
            image,
            options: Some(options),
        })
        .await
        .expect("segment accepted")
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = s.message().await.expect("stream") {
        events.push(e.event.expect("event set"));
    }
    events
}

pub fn completed(events: &[Event]) -> pb::SegmentationResult {
    match events.last() {
        Some(Event::Completed(c)) => c.result.clone().expect("result"),
        other => panic!("expected Completed last, got {other:?}"),
    }
}

/// Submits a job (no idempotency key): its id, or the status that refused it.
pub async fn try_submit(
    c: &mut Client,
    image: Vec<u8>,
    options: pb::Options,
) -> Result<String, tonic::Status> {
    let r = c
        .submit_job(pb::SubmitJobRequest {
            image,
            options: Some(options),
            idempotency_key: String::new(),
        })
        .await?;
    Ok(r.into_inner().job_id)
}

/// Submits a job (no idempotency key) and returns its id.
pub async fn submit(c: &mut Client, image: Vec<u8>, options: pb::Options) -> String {
    try_submit(c, image, options).await.expect("submit")
}

/// Submits and waits until the job runs (its first Progress event), returning its id.
/// Starts a `Segment` call and reads its events until the first Progress: the stream (which
/// owns the job) and the job's id.
pub async fn segment_running(c: &mut Client, image: Vec<u8>, options: pb::Options) -> (tonic::Streaming<pb::JobEvent>, String) {
    let mut s = c
        .segment(pb::SegmentRequest { image, options: Some(options) })
        .await
        .expect("segment")
        .into_inner();
    loop {
        let e = s.message().await.expect("an event").expect("the stream goes on");
        if matches!(e.event, Some(Event::Progress(_))) {
            return (s, e.job_id);
        }
    }
}

pub async fn submit_running(c: &mut Client, image: Vec<u8>, options: pb::Options) -> String {
    let id = submit(c, image, options).await;
    let mut w = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    while let Some(e) = w.message().await.expect("watch stream") {
        if matches!(e.event, Some(Event::Progress(_))) {
            return id;
        }
    }
    panic!("job {id} ended before running");
}

/// Polls GetJob until the job reaches a final state.
pub async fn wait_final(c: &mut Client, id: &str, timeout: Duration) -> pb::Job {
    let until = Instant::now() + timeout;
    loop {
        let j = c
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .expect("get")
            .into_inner();
        if j.state >= pb::JobState::Completed as i32 {
            return j;
        }
        assert!(
            Instant::now() < until,
            "job {id} still in state {} after {timeout:?}",
            j.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Segments a tiny image and checks it completes: proves a worker is free.
pub async fn quick_job_completes(c: &mut Client) {
    let t = Instant::now();
    let r = completed(&segment_events(c, disk(24, 20), quick()).await);
    assert_eq!((r.width, r.height), (24, 20));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "quick job took {:?}",
        t.elapsed()
    );
}

// ---- The Prometheus endpoint -------------------------------------------------------------

/// One HTTP/1.1 request; returns (status line and headers, body).
pub async fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8(out).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (head.to_string(), body.to_string())
}

pub async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (head, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse(&body)
}

/// Prometheus text format: `name{labels} value` per sample, comments skipped.
pub fn parse(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v = value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_string(), v)
        })
        .collect()
}

pub fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        let mut names: Vec<_> = m.keys().collect();
        names.sort();
        panic!("no {series}; have {names:?}")
    })
}

/// Each series has its expected value (named in the failure).
pub fn assert_series(m: &HashMap<String, f64>, expected: &[(&str, f64)]) {
    for &(series, want) in expected {
        assert_eq!(value(m, series), want, "{series}");
    }
}

/// A throwaway certificate authority whose PEM files go into a temporary folder.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
}

impl TestCa {
    /// A new CA; its certificate is `ca.pem` in [`TestCa::dir`].
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let ca = TestCa { dir: tempfile::tempdir().unwrap(), key, cert };
        ca.write("ca.pem", ca.cert.pem());
        ca
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, pem: String) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, pem).unwrap();
        p
    }

    /// A certificate for `names`, signed by this CA: the paths of `{stem}.pem` and `{stem}.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_to(stem, None, names)
    }

    /// [`TestCa::issue`] with a subject common name, as a hospital PKI's client certificates
    /// often carry their system's name.
    pub fn issue_to(&self, stem: &str, common_name: Option<&str>, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(cn) = common_name {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (self.write(&format!("{stem}.pem"), cert.pem()), self.write(&format!("{stem}.key"), key.serialize_pem()))
    }
}
