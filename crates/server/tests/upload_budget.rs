//! Requests in transit share `server.max_upload_bytes_in_flight` from their messages' first
//! bytes: a burst of large unary requests is refused at each message's length prefix, before
//! the server collects it. The server runs as a child process, so its peak memory is its own
//! and not the client's copies of the requests.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use s3net_server::cli::wait_serving;
use s3net_server::pb::{self, upload_chunk::Part};
use tonic::Code;

/// The server process of the tests below (this test binary, run again).
#[test]
#[ignore = "started as a child process by the tests of this file"]
fn serve_child() {
    serve_if_child();
}

const MIB: usize = 1 << 20;

struct ServerProcess {
    child: Child,
    url: String,
    metrics: std::net::SocketAddr,
    /// Its log: JSON lines.
    log: tempfile::NamedTempFile,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process with 48 MiB for requests in transit, messages of up to 32 MiB and uploads
/// of up to 16 MiB.
fn serve() -> ServerProcess {
    let port = free_port();
    let metrics = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["serve_child", "--exact", "--ignored", "--nocapture"])
        .env("S3NET_SERVE_CHILD", "1")
        .env("S3NET__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("S3NET__SERVER__MAX_MESSAGE_BYTES", (32 * MIB).to_string())
        .env("S3NET__SERVER__MAX_UPLOAD_BYTES", (16 * MIB).to_string())
        .env("S3NET__SERVER__MAX_UPLOAD_BYTES_IN_FLIGHT", (48 * MIB).to_string())
        .env("S3NET__SERVER__SHUTDOWN_GRACE_S", "1")
        .env("S3NET__WORKERS__CPU_WORKERS", "1")
        .env("S3NET__WORKERS__TORCH_THREADS", "1")
        .env("S3NET__METRICS__LISTEN", format!("127.0.0.1:{metrics}"))
        .env("S3NET__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    ServerProcess { child, url: format!("http://127.0.0.1:{port}"), metrics: format!("127.0.0.1:{metrics}").parse().unwrap(), log }
}

/// An upload that announces `total` bytes and sends nothing more until `tx` is dropped.
async fn held_upload(c: &Client, total: usize) -> (tokio::sync::mpsc::Sender<pb::UploadChunk>, tokio::task::JoinHandle<Result<tonic::Response<tonic::Streaming<pb::JobEvent>>, tonic::Status>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = pb::UploadHeader { options: Some(quick()), total_bytes: total as u64 };
    tx.send(pb::UploadChunk { part: Some(Part::Header(header)) }).await.unwrap();
    let mut c = c.clone();
    let call = tokio::spawn(async move { c.segment_upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    (tx, call)
}

#[test]
fn large_unary_requests_are_refused_before_they_are_collected() {
    let server = serve();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_serving(&plain_conn(&server.url), Duration::from_secs(60))).unwrap();
    rt.block_on(async {
        let c = client(&server.url).await;
        // Two uploads announce 16 MiB each and wait: 32 of the 48 MiB are held.
        let (a, a_call) = held_upload(&c, 16 * MIB).await;
        let (b, b_call) = held_upload(&c, 16 * MIB).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = scrape(server.metrics).await;
        assert_series(
            &m,
            &[
                ("s3net_upload_memory_bytes", (32 * MIB) as f64),
                ("s3net_upload_memory_limit_bytes", (48 * MIB) as f64),
            ],
        );

        // Sixteen requests of 24 MiB each, half Segment and half SubmitJob, at once: each
        // message is more than the 16 MiB left. (The bytes are not an image: a request that
        // got through would be INVALID_ARGUMENT instead.)
        let junk = vec![0x5au8; 24 * MIB];
        let before = peak_rss(&server.child.id().to_string());
        let calls: Vec<_> = (0..16)
            .map(|i| {
                let mut c = c.clone();
                let image = junk.clone();
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        c.segment(pb::SegmentRequest { image, options: Some(quick()) }).await.map(|_| ())
                    } else {
                        c.submit_job(pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: String::new() }).await.map(|_| ())
                    }
                })
            })
            .collect();
        for call in calls {
            let err = call.await.unwrap().expect_err("over the budget");
            assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
            assert_eq!(
                err.message(),
                "uploads in progress hold 32.0 MiB of the 48.0 MiB the server allows \
                 (server.max_upload_bytes_in_flight), and this one needs 24.0 MiB more; retry in about 1 s"
            );
            assert_eq!(err.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        }
        let grew = peak_rss(&server.child.id().to_string()).saturating_sub(before);
        eprintln!("the refused burst of 16 × 24 MiB raised the server's peak by {} MiB", grew >> 20);
        // At most hyper's 1 MiB flow-control window per connection arrives unasked (one
        // connection here), against 384 MiB if each message were collected first.
        assert!(grew < 48 * MIB as u64, "the refused burst raised the server's peak by {} MiB", grew >> 20);

        // An upload whose one chunk is larger than what is left (its header took 1 KiB) is
        // refused at that chunk's prefix, mid-stream.
        let mut c2 = c.clone();
        let chunks = vec![
            pb::UploadChunk { part: Some(Part::Header(pb::UploadHeader { options: Some(quick()), total_bytes: 0 })) },
            pb::UploadChunk { part: Some(Part::Data(vec![1u8; 16 * MIB])) },
        ];
        let err = c2.segment_upload(tokio_stream::iter(chunks)).await.expect_err("over the budget");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().starts_with("uploads in progress hold 32.0 MiB of the 48.0 MiB"), "{}", err.message());
        assert!(err.message().contains("and this one needs 16.0 MiB more"), "{}", err.message());

        let m = scrape(server.metrics).await;
        assert_series(&m, &[("s3net_rejected_total{reason=\"upload_memory\"}", 17.0)]);
        // Each refusal is logged with the method and the client's address.
        let log = std::fs::read_to_string(server.log.path()).unwrap();
        let refused: Vec<&str> = log.lines().filter(|l| l.contains("request refused while it arrived")).collect();
        assert_eq!(refused.len(), 17, "{log}");
        for method in ["/s3net.v1.Segmenter/Segment", "/s3net.v1.Segmenter/SubmitJob", "/s3net.v1.Segmenter/SegmentUpload"] {
            assert!(
                refused.iter().any(|l| l.contains(&format!("\"method\":\"{method}\"")) && l.contains("\"client\":\"127.0.0.1:") && l.contains("\"reason\":\"upload_memory\"")),
                "no refusal of {method} with the client's address: {refused:?}"
            );
        }

        // A message larger than the server takes at all is INVALID_ARGUMENT at its prefix,
        // budget full or not: retrying it could never help.
        let err = c2
            .segment(pb::SegmentRequest { image: vec![0u8; 33 * MIB], options: Some(quick()) })
            .await
            .expect_err("too large");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(
                "a message of 33.0 MiB is more than this server takes in one (server.max_message_bytes: 32.0 MiB); \
                 send large images with SegmentUpload, in chunks smaller than that"
            ),
            "{}",
            err.message()
        );

        // The held uploads give their bytes back when they end; then the same 24 MiB message
        // is taken in and read (it is no image), and a real image is segmented.
        drop((a, b));
        for call in [a_call, b_call] {
            let _ = call.await.unwrap();
        }
        let mut c = c.clone();
        let mut tries = 0;
        let err = loop {
            let err = c.segment(pb::SegmentRequest { image: junk.clone(), options: Some(quick()) }).await.expect_err("not an image");
            // The ended uploads' bytes come back when the server has seen their streams end.
            if err.code() == Code::ResourceExhausted && tries < 50 {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            break err;
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        // Refused by the service once read: logged in the call's span, with the client.
        let log = std::fs::read_to_string(server.log.path()).unwrap();
        let refused = log
            .lines()
            .find(|l| l.contains("\"message\":\"request refused\"") && l.contains("\"otel.name\":\"s3net.v1.Segmenter/Segment\""))
            .unwrap_or_else(|| panic!("no refusal logged: {log}"));
        assert!(refused.contains("\"client.address\":\"127.0.0.1\"") && refused.contains("\"reason\":\"invalid_argument\"") && refused.contains("\"error\":\"unrecognised image format"), "{refused}");
        quick_job_completes(&mut c).await;

        // Calls abandoned by their client part-way (whenever the abort lands: before, during
        // or after the message is sent) leave nothing held.
        for wait_ms in [0, 5, 20, 80] {
            let (mut c, image) = (c.clone(), junk.clone());
            let call = tokio::spawn(async move { c.submit_job(pb::SubmitJobRequest { image, options: Some(quick()), idempotency_key: String::new() }).await });
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            call.abort();
        }
        let mut held = f64::NAN;
        for _ in 0..100 {
            held = value(&scrape(server.metrics).await, "s3net_upload_memory_bytes");
            if held == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(held, 0.0, "abandoned calls still hold bytes");
    });
}
