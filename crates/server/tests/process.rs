//! `run_serve` as a real process: configured from S3NET__… variables, stopped by SIGTERM, its
//! callers reloaded from its file on SIGHUP.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use s3net_server::cli::wait_serving;
use s3net_server::pb::{self, job_event::Event};

/// The server process of the tests below (this test binary, run again).
#[test]
#[ignore = "started as a child process by the tests of this file"]
fn serve_child() {
    serve_if_child();
}

/// `s3net serve` as a child process with `grace_s` of shutdown grace, its log (JSON lines)
/// piped; returns it and its URL.
fn serve(grace_s: u32) -> (std::process::Child, String) {
    serve_with(grace_s, None)
}

/// [`serve`], with `--config file`.
fn serve_with(grace_s: u32, file: Option<&std::path::Path>) -> (std::process::Child, String) {
    let port = free_port();
    let mut command = Command::new(std::env::current_exe().unwrap());
    if let Some(f) = file {
        command.env("S3NET_SERVE_CHILD_CONFIG", f);
    }
    let child = command
        .args(["serve_child", "--exact", "--ignored", "--nocapture"])
        .env("S3NET_SERVE_CHILD", "1")
        .env("S3NET__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("S3NET__SERVER__SHUTDOWN_GRACE_S", grace_s.to_string())
        .env("S3NET__WORKERS__CPU_WORKERS", "1")
        .env("S3NET__WORKERS__TORCH_THREADS", "1")
        .env("S3NET__LOG__FORMAT", "json")
        .env("S3NET__METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, format!("http://127.0.0.1:{port}"))
}

fn sigterm(child: &std::process::Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

/// Reads a watched job's events to the end, which must be its cancellation by the shutdown,
/// then waits for the server to exit 0; returns its log.
fn cancelled_at_shutdown(
    rt: &tokio::runtime::Runtime,
    mut events: tonic::Streaming<pb::JobEvent>,
    child: std::process::Child,
) -> String {
    let mut last = None;
    while let Ok(Some(e)) = rt.block_on(events.message()) {
        last = e.event;
    }
    match last {
        Some(Event::Cancelled(c)) => assert_eq!((c.reason.as_str(), c.retryable), ("server shutting down", true)),
        other => panic!("{other:?}"),
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);
    log
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let (child, url) = serve(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = plain_conn(&url);
    rt.block_on(wait_serving(&conn, Duration::from_secs(60)))
        .unwrap();
    let mut c = rt.block_on(client(&url));
    let id = rt.block_on(submit_running(&mut c, disk(48, 48), slow()));
    let w = rt
        .block_on(c.watch_job(pb::WatchJobRequest { job_id: id.clone() }))
        .unwrap()
        .into_inner();
    sigterm(&child);
    let log = cancelled_at_shutdown(&rt, w, child);
    // JSON lines with the job's span fields.
    assert!(
        log.lines()
            .any(|l| l.starts_with('{') && l.contains(&id) && l.contains("job cancelled")),
        "{log}"
    );
    assert!(log.contains("\"stopped\""), "{log}");
}

#[test]
fn a_second_sigterm_cancels_at_once() {
    let (child, url) = serve(600);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_serving(&plain_conn(&url), Duration::from_secs(60))).unwrap();
    let mut c = rt.block_on(client(&url));
    let id = rt.block_on(submit_running(&mut c, disk(48, 48), slow()));
    let w = rt.block_on(c.watch_job(pb::WatchJobRequest { job_id: id.clone() })).unwrap().into_inner();
    sigterm(&child);
    // Draining, with 600 s of grace: the job goes on.
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    sigterm(&child);
    let log = cancelled_at_shutdown(&rt, w, child);
    assert!(t.elapsed() < Duration::from_secs(30), "stopped {:?} after the second signal", t.elapsed());
    assert!(log.contains("asked again to stop; cancelling now"), "{log}");
}

/// [`serve_with`] `file`, once it serves; with a runtime to call it from.
fn serve_ready(file: &std::path::Path) -> (std::process::Child, String, tokio::runtime::Runtime) {
    let (child, url) = serve_with(1, Some(file));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_serving(&plain_conn(&url), Duration::from_secs(60))).unwrap();
    (child, url, rt)
}

/// `ListJobs` on `url` with `token`: `Ok` when the server takes the token.
fn list_with(rt: &tokio::runtime::Runtime, url: &str, token: &str) -> anyhow::Result<()> {
    let conn = s3net_server::cli::ConnectArgs { token: Some(token.into()), ..plain_conn(url) };
    rt.block_on(async { conn.client().await?.list_jobs(pb::ListJobsRequest::default()).await.map(drop).map_err(anyhow::Error::from) })
}

/// Waits (30 s at most) until `list` takes `token`: a reload's moment is the server's.
fn wait_accepted(list: &dyn Fn(&str) -> anyhow::Result<()>, token: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while list(token).is_err() {
        assert!(std::time::Instant::now() < until, "the token {token} never worked");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGHUP loads the file again and puts its callers in force: the rotated token works and the
/// old one does not, the queue and the server go on; an invalid file is logged and changes
/// nothing.
#[test]
fn sighup_reloads_the_callers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3net.toml");
    let callers = |token: &str| format!("[server.callers.pacs]\ntoken = \"{token}\"\n");
    std::fs::write(&file, callers("first-token")).unwrap();
    let (child, url, rt) = serve_ready(&file);
    let list = |token: &str| list_with(&rt, &url, token);
    list("first-token").expect("the file's token");
    let hangup = || assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());

    std::fs::write(&file, callers("second-token")).unwrap();
    hangup();
    wait_accepted(&list, "second-token");
    assert!(list("first-token").is_err(), "the old token is refused");

    // A caller without a token or certificate names: not reloaded, the last set stays.
    std::fs::write(&file, "[server.callers.pacs]\nmax_active_jobs = 2\n").unwrap();
    hangup();
    std::thread::sleep(Duration::from_millis(500));
    list("second-token").expect("still in force");

    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);
    assert!(log.contains("[server.callers] reloaded") && log.contains("\"changed\":\"[\\\"pacs\\\"]\""), "{log}");
    assert!(log.contains("configuration not reloaded on SIGHUP") && log.contains("server.callers.pacs needs a token"), "{log}");
    assert!(!log.contains("second-token") && !log.contains("first-token"), "no token in the log: {log}");
}

/// `server.reload_interval_s`: a token rotated in its file (as a Kubernetes Secret volume
/// does it, a new file renamed over the old) is in force within the interval, with no signal
/// and no restart; the token never reaches the log.
#[test]
fn a_rotated_token_file_is_reloaded_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (file, token) = (dir.path().join("s3net.toml"), dir.path().join("pacs-token"));
    let rotate = |content: &str| {
        let next = dir.path().join("next");
        std::fs::write(&next, content).unwrap();
        std::fs::rename(&next, &token).unwrap();
    };
    rotate("first-token\n");
    std::fs::write(&file, format!("[server]\nreload_interval_s = 1\n[server.callers.pacs]\ntoken_file = {token:?}\n")).unwrap();
    let (child, url, rt) = serve_ready(&file);
    let list = |token: &str| list_with(&rt, &url, token);
    list("first-token").expect("the file's token");

    rotate("second-token\n");
    wait_accepted(&list, "second-token");
    assert!(list("first-token").is_err(), "the old token is refused");

    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);
    assert!(log.contains("the configuration changed: reloading [server.callers]") && log.contains("\"changed\":\"[\\\"pacs\\\"]\""), "{log}");
    assert_eq!(log.matches("[server.callers] reloaded").count(), 1, "one reload for one change: {log}");
    assert!(!log.contains("second-token") && !log.contains("first-token"), "no token in the log: {log}");
}
