//! What clients can make the server hold outside the byte budget of requests: connections
//! beyond `server.max_connections` are closed on arrival (and counted and logged), one
//! connection has at most `server.max_streams_per_connection` calls open, and health checks
//! and reflection queries are read only up to a few KiB each. The server runs as a child
//! process, so its memory is its own.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use s3net_server::cli::{wait_serving, RetryArgs};
use s3net_server::pb::{self, job_event::Event};
use tokio::io::AsyncReadExt;

/// The server process of the tests below (this test binary, run again).
#[test]
#[ignore = "started as a child process by the tests of this file"]
fn serve_child() {
    serve_if_child();
}

const MIB: u64 = 1 << 20;

struct ServerProcess {
    child: Child,
    addr: String,
    metrics: std::net::SocketAddr,
    /// Its log: JSON lines.
    log: tempfile::NamedTempFile,
}

impl ServerProcess {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn rss(&self) -> u64 {
        rss(&self.child.id().to_string())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process with the defaults but for `env` (`S3NET__…` settings).
fn serve(env: &[(&str, &str)]) -> ServerProcess {
    let (port, metrics) = (free_port(), free_port());
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["serve_child", "--exact", "--ignored", "--nocapture"])
        .env("S3NET_SERVE_CHILD", "1")
        .env("S3NET__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("S3NET__WORKERS__CPU_WORKERS", "1")
        .env("S3NET__WORKERS__TORCH_THREADS", "1")
        .env("S3NET__METRICS__LISTEN", format!("127.0.0.1:{metrics}"))
        .env("S3NET__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let server = ServerProcess {
        child: cmd.spawn().unwrap(),
        addr: format!("127.0.0.1:{port}"),
        metrics: format!("127.0.0.1:{metrics}").parse().unwrap(),
        log,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_serving(&plain_conn(&server.url()), Duration::from_secs(60))).unwrap();
    server
}

/// A raw HTTP/2 connection: the calls below stop part-way, which no gRPC client does.
///
/// Returned once the server's first SETTINGS have arrived: until then h2 knows no limit of
/// open streams and would open calls beyond the server's, which the server refuses
/// (REFUSED_STREAM) instead of the client queueing them.
async fn h2_connection(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let send = send.ready().await.unwrap();
    // The server tells the client its limit of open calls (server.max_streams_per_connection)
    // in its first SETTINGS.
    let deadline = Instant::now() + Duration::from_secs(10);
    while send.current_max_send_streams() != 256 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(send.current_max_send_streams(), 256, "the server's SETTINGS within 10 s");
    send
}

/// Starts a call of `path` whose message announces `announced` bytes and sends `sent` of them,
/// then nothing more while the returned stream is kept. (Over the server's limit of open
/// streams, h2 queues the call in the client.)
async fn partial_call(
    send: &h2::client::SendRequest<bytes::Bytes>,
    addr: &str,
    path: &str,
    announced: usize,
    sent: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.clone().ready().await.unwrap().send_request(req, false).unwrap();
    let mut data = vec![0u8; 5 + sent];
    data[1..5].copy_from_slice(&(announced as u32).to_be_bytes());
    body.send_data(bytes::Bytes::from(data), false).unwrap();
    (response, body)
}

/// The gRPC status of a finished call's response (its headers, or its trailers).
async fn grpc_status(response: h2::client::ResponseFuture) -> Option<(String, String)> {
    let response = response.await.ok()?;
    let read = |h: &http::HeaderMap| {
        let v = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        v("grpc-status").map(|s| (s, v("grpc-message").unwrap_or_default()))
    };
    if let Some(s) = read(response.headers()) {
        return Some(s);
    }
    let mut body = response.into_body();
    while let Some(d) = body.data().await {
        let _ = d.ok()?;
    }
    body.trailers().await.ok()?.as_ref().and_then(read)
}

/// The metrics once `s3net_connections` is `want` (or after 10 s): the server lets a connection
/// go when it sees its client close it.
async fn connections_open(server: &ServerProcess, want: f64) -> std::collections::HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(server.metrics).await;
        if value(&m, "s3net_connections") == want || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn unfinished_health_and_reflection_calls_hold_little() {
    let server = serve(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let before = server.rss();
        // (h2_connection checks the server's limit of open calls per connection.)
        let send = h2_connection(&server.addr).await;

        // A message announced as 4 MiB (tonic's default limit) to the health check or to
        // reflection is refused at its length prefix: 100 of them once held 400 MB.
        let paths = ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"];
        let mut calls = Vec::new();
        for i in 0..100 {
            calls.push(partial_call(&send, &server.addr, paths[i % 2], (4 << 20) - 10, 64 << 10).await);
        }
        for (i, (response, _body)) in calls.into_iter().enumerate() {
            let (code, message) = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
                .await
                .expect("an answer before the message is complete")
                .expect("a gRPC status");
            if i % 2 == 0 {
                // OUT_OF_RANGE: tonic's own refusal of a message over a service's limit.
                assert_eq!(code, "11", "{message}");
                assert!(message.contains("4096"), "{message}");
            }
            // (Reflection ends its stream of answers when a request cannot be read.)
        }
        let grew = server.rss().saturating_sub(before);
        assert!(grew < 32 * MIB, "100 refused calls left the server {} MiB larger", grew >> 20);

        // Calls that announce what fits and stop short wait, each holding what it sent; the
        // server has at most 256 open on a connection (the client queues the rest). Eight
        // connections with 300 such calls each:
        let before = server.rss();
        let mut held = Vec::new();
        for _ in 0..8 {
            let send = h2_connection(&server.addr).await;
            for i in 0..300 {
                held.push(partial_call(&send, &server.addr, paths[i % 2], 4 << 10, (4 << 10) - 100).await);
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let grew = server.rss().saturating_sub(before);
        eprintln!("8 connections of 300 unfinished small calls: the server grew by {} KiB", grew >> 10);
        assert!(grew < 8 * 8 * MIB, "the server grew by {} MiB", grew >> 20);
        // The waiting calls do not stop the server from answering others.
        let mut c = client(&server.url()).await;
        quick_job_completes(&mut c).await;
    });
}

#[test]
fn connections_beyond_the_limit_are_closed_on_arrival() {
    let server = serve(&[("S3NET__SERVER__MAX_CONNECTIONS", "4")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Connections are let go by the server when their clients close them; wait for the
        // readiness probe's.
        assert_series(&connections_open(&server, 0.0).await, &[("s3net_connections", 0.0), ("s3net_connections_limit", 4.0)]);

        // Four clients are served.
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut c = client(&server.url()).await;
            quick_job_completes(&mut c).await;
            clients.push(c);
        }
        assert_series(&connections_open(&server, 4.0).await, &[("s3net_connections", 4.0), ("s3net_connections_refused_total", 0.0)]);

        // A fifth is closed before it is read: its call fails at once. (gRPC's C core, the
        // Python client's, says UNAVAILABLE; tonic says CANCELLED or UNKNOWN with a transport
        // error as the source, which `s3net client` retries as it does UNAVAILABLE.)
        let t = Instant::now();
        let fifth = tonic::transport::Channel::from_shared(server.url()).unwrap().connect_lazy();
        let err = tonic_health::pb::health_client::HealthClient::new(fifth)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .expect_err("no room");
        assert!(RetryArgs::default().delay(0, &err).is_some(), "not retried: {err:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "the refusal took {:?}", t.elapsed());
        // Raw connections beyond the limit see their end at once, too.
        for _ in 0..20 {
            let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
                .await
                .expect("closed at once");
            assert!(matches!(n, Ok(0) | Err(_)), "the server spoke to a connection over its limit: {n:?}");
        }
        let m = scrape(server.metrics).await;
        let refused = value(&m, "s3net_connections_refused_total");
        assert!(refused >= 21.0, "{refused} refused");
        assert_eq!(value(&m, "s3net_connections"), 4.0);

        // The refusals are logged once, with the client's address and a count of the rest
        // after ten seconds; the four clients were never disturbed.
        let log = std::fs::read_to_string(server.log.path()).unwrap();
        let warned: Vec<&str> = log.lines().filter(|l| l.contains("connection refused: server.max_connections are open")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        assert!(warned[0].contains("\"client.address\":\"127.0.0.1\"") && warned[0].contains("\"max_connections\":4"), "{}", warned[0]);
        for c in &mut clients {
            quick_job_completes(c).await;
        }

        // One client leaves; the next gets in.
        drop(clients.pop());
        connections_open(&server, 3.0).await;
        let mut c = client(&server.url()).await;
        quick_job_completes(&mut c).await;
    });
}


#[test]
fn a_connection_that_says_nothing_is_closed_after_the_handshake_timeout() {
    let server = serve(&[("S3NET__SERVER__MAX_CONNECTIONS", "1"), ("S3NET__SERVER__HANDSHAKE_TIMEOUT_S", "1")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A silent socket, and one that stops inside HTTP/2's preface: each holds the only
        // place for a second, then is closed.
        assert_series(&connections_open(&server, 0.0).await, &[("s3net_connections", 0.0)]);
        for greeting in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
            let t = Instant::now();
            let mut tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tcp, greeting).await.unwrap();
            // (The server sends its SETTINGS at once; then the connection ends.)
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await.expect("closed");
            let waited = t.elapsed();
            assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "closed after {waited:?}");
        }
        // A client that has connected and then idles keeps its connection past the timeout.
        let mut c = client(&server.url()).await;
        quick_job_completes(&mut c).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        quick_job_completes(&mut c).await;
        let m = scrape(server.metrics).await;
        assert_series(
            &m,
            &[("s3net_connections", 1.0), ("s3net_connections_refused_total", 0.0), ("s3net_connections_timed_out_total", 2.0)],
        );
    });
}

/// CPU seconds a process has used (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn out_of_file_descriptors_the_server_waits_instead_of_spinning() {
    let server = serve(&[]);
    let pid = server.child.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_series(&connections_open(&server, 0.0).await, &[("s3net_connections", 0.0)]);
        // Room for 4 more descriptors than the server has open now.
        let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
        let mut was = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let limit = |new: *const libc::rlimit, old: *mut libc::rlimit| {
            let set = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, new, old) };
            assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
        };
        limit(std::ptr::null(), &mut was);
        limit(&libc::rlimit { rlim_cur: open + 4, rlim_max: was.rlim_max }, std::ptr::null_mut());
        // Twelve connections: the ones beyond the limit wait in the kernel's backlog, and
        // every accept fails (EMFILE) until a descriptor is free.
        let mut socks = Vec::new();
        for _ in 0..12 {
            socks.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = cpu_seconds(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu_seconds(pid) - before;
        eprintln!("the server used {used:.2} s of CPU in 2 s out of file descriptors");
        assert!(used < 0.5, "the server spun: {used:.2} s of CPU in 2 s");
        let log = std::fs::read_to_string(server.log.path()).unwrap();
        let warned = log.lines().filter(|l| l.contains("cannot accept connections")).count();
        assert_eq!(warned, 1, "{log}");
        // Descriptors free again: the server serves.
        drop(socks);
        limit(&was, std::ptr::null_mut());
        let mut c = client(&server.url()).await;
        quick_job_completes(&mut c).await;
    });
}

#[test]
fn a_connection_past_its_age_is_asked_to_end() {
    let server = serve(&[("S3NET__SERVER__MAX_CONNECTION_AGE_S", "1")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Instant::now();
        let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        // An idle connection: GOAWAY after a second, and then it ends.
        let ended = tokio::time::timeout(Duration::from_secs(10), conn).await.expect("the connection ended");
        assert!(ended.is_ok(), "{ended:?}");
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "ended after {waited:?}");
        assert!(send.ready().await.is_err(), "no new calls on it");
        // A tonic client moves to a new connection by itself.
        let mut c = client(&server.url()).await;
        for _ in 0..4 {
            quick_job_completes(&mut c).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

#[test]
fn a_client_may_send_a_window_of_data_before_the_server_reads_it() {
    // What a call may send at once (server.http2_window_bytes, for the connection and for each
    // call): an upload's speed is at most one window per round trip.
    for (env, window) in [(None, 8 << 20), (Some("2097152"), 2 << 20)] {
        let env: Vec<(&str, &str)> = env.map(|w| ("S3NET__SERVER__HTTP2_WINDOW_BYTES", w)).into_iter().collect();
        let server = serve(&env);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            // (h2's client would buffer at most 400 KiB of a call's data.)
            let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
            let (send, conn) = h2::client::Builder::new().max_send_buffer_size(64 << 20).handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            let (_response, mut body) = partial_call(&send, &server.addr, "/s3net.v1.Segmenter/SubmitJob", 60 << 20, 0).await;
            body.reserve_capacity(60 << 20);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut granted = 0;
            // The message's 5-byte prefix went first.
            let window = window - 5;
            while granted < window && Instant::now() < deadline {
                let next = tokio::time::timeout(Duration::from_millis(100), std::future::poll_fn(|cx| body.poll_capacity(cx))).await;
                if let Ok(Some(Ok(n))) = next {
                    granted = n;
                }
            }
            assert_eq!(granted, window, "bytes the call may send unasked");
        });
    }
}

#[test]
fn a_connection_with_no_call_open_is_closed_after_the_idle_timeout() {
    let server = serve(&[("S3NET__SERVER__MAX_CONNECTION_IDLE_S", "1"), ("S3NET__SERVER__KEEPALIVE_INTERVAL_S", "1")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_series(&connections_open(&server, 0.0).await, &[("s3net_connections", 0.0)]);
        // A raw HTTP/2 connection that makes no call, though it answers the server's pings
        // (one a second here): closed after its idle second, between two pings.
        let t = Instant::now();
        let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        let (_send, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        tokio::time::timeout(Duration::from_secs(15), conn).await.expect("the connection ended").unwrap().ok();
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(6), "ended after {waited:?}");

        // A call with nothing to say for longer than that keeps its connection: a WatchJob of a
        // job queued behind another (the one worker busy), on the connection of client `y`.
        let mut x = client(&server.url()).await;
        let a = submit_running(&mut x, disk(64, 64), slow()).await;
        let mut y = client(&server.url()).await;
        let b = submit(&mut y, disk(64, 64), slow()).await;
        let mut watch = y.watch_job(pb::WatchJobRequest { job_id: b.clone() }).await.expect("watch").into_inner();
        let first = watch.message().await.expect("an event").expect("the stream goes on");
        assert!(matches!(first.event, Some(Event::Queued(_))), "{first:?}");
        tokio::time::sleep(Duration::from_secs(4)).await;
        // `x` made no call for 4 s: its connection was closed, and its channel connects again
        // by itself.
        assert_eq!(value(&scrape(server.metrics).await, "s3net_connections_idle_closed_total"), 2.0);
        x.cancel_job(pb::CancelJobRequest { job_id: a.clone() }).await.expect("cancel on a new connection");
        // `b` starts: `y`'s stream, open all along, goes on.
        let started = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(e) = watch.message().await.expect("the watch stream, uninterrupted") {
                if matches!(e.event, Some(Event::Progress(_))) {
                    return true;
                }
            }
            false
        })
        .await
        .expect("b ran within 60 s");
        assert!(started, "the watch stream ended before b ran");
        y.cancel_job(pb::CancelJobRequest { job_id: b }).await.expect("cancel");
        quick_job_completes(&mut y).await;
    });
}
