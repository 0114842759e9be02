//! Traces for real: a small OTLP/gRPC trace receiver (the collector's `TraceService`) and the
//! real `s3net serve` as a child process exporting to it; requests carry W3C `traceparent`
//! metadata. The spans must arrive (flushed on SIGTERM) with the caller's trace id and parent,
//! the job span under its RPC span, a later WatchJob linked to the job's trace, and no patient
//! data anywhere in them.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use s3net_server::cli::wait_serving;
use s3net_server::pb::{self, job_event::Event};
use s3net_server::telemetry::Telemetry;
use tonic::{Request, Response, Status};

/// Keeps every export request it receives.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The server process of `spans_reach_the_collector` (this test binary, run again).
#[test]
#[ignore = "started as a child process by spans_reach_the_collector"]
fn serve_child() {
    serve_if_child();
}


fn with_traceparent<T>(msg: T, trace: &str, parent: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    r
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn str_attr<'a>(s: &'a Span, key: &str) -> &'a str {
    match attr(&s.attributes, key) {
        Some(Value::StringValue(v)) => v,
        other => panic!("span {}: {key} = {other:?}", s.name),
    }
}

fn int_attr(s: &Span, key: &str) -> i64 {
    match attr(&s.attributes, key) {
        Some(Value::IntValue(v)) => *v,
        other => panic!("span {}: {key} = {other:?}", s.name),
    }
}

/// The values of the patient attributes `CT_small.dcm` carries (read with dicom-object).
fn patient_values(file: &std::path::Path) -> Vec<String> {
    use dicom_dictionary_std::tags;
    let obj = dicom_object::open_file(file).expect("open the DICOM file");
    let mut v = Vec::new();
    for tag in [
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_ADDRESS,
    ] {
        if let Ok(e) = obj.element(tag) {
            if let Ok(s) = e.to_str() {
                let s = s.trim().trim_end_matches('\0').to_string();
                if s.len() >= 3 {
                    // A person name's parts too ("Family^Given").
                    v.extend(s.split('^').filter(|p| p.len() >= 3).map(String::from));
                    v.push(s);
                }
            }
        }
    }
    v
}

#[test]
fn spans_reach_the_collector() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let received = Receiver::default();
    let collector = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        addr
    });

    let port = free_port();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["serve_child", "--exact", "--ignored", "--nocapture"])
        .env("S3NET_SERVE_CHILD", "1")
        .env("S3NET__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("S3NET__SERVER__SHUTDOWN_GRACE_S", "5")
        .env("S3NET__WORKERS__CPU_WORKERS", "1")
        .env("S3NET__WORKERS__TORCH_THREADS", "1")
        .env("S3NET__METRICS__LISTEN", "")
        .env(
            "S3NET__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{collector}"),
        )
        .env("S3NET__TELEMETRY__SERVICE_NAME", "s3net-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Only the configuration above decides: the default export delay (5 s) leaves the spans
    // buffered until the shutdown flush.
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let conn = plain_conn(&url);
    rt.block_on(wait_serving(&conn, Duration::from_secs(60)))
        .unwrap();
    let dicom = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/dicom/CT_small.dcm");
    let phi = patient_values(&dicom);
    assert!(
        phi.iter().any(|v| v.contains("CompressedSamples")) && phi.iter().any(|v| v == "1CT1"),
        "the test file should carry patient data: {phi:?}"
    );

    // Trace 1: Segment with the caller's context.
    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    // Trace 2: SubmitJob; trace 3: a later WatchJob of that job; trace 4: a refused request.
    let (t2, p2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let (t3, p3) = ("11111111111111111111111111111111", "2222222222222222");
    let (t4, p4) = ("33333333333333333333333333333333", "4444444444444444");
    let (id1, iterations1, id2) = rt.block_on(async {
        let mut c = client(&url).await;
        let req = pb::SegmentRequest {
            image: std::fs::read(&dicom).unwrap(),
            options: Some(quick()),
        };
        let mut s = c
            .segment(with_traceparent(req, t1, p1))
            .await
            .unwrap()
            .into_inner();
        let (mut id1, mut iterations1) = (String::new(), 0);
        while let Some(e) = s.message().await.unwrap() {
            id1 = e.job_id;
            if let Some(Event::Completed(done)) = e.event {
                iterations1 = done.result.unwrap().iterations;
            }
        }
        assert!(iterations1 > 0, "the job completed");

        let req = pb::SubmitJobRequest {
            image: disk(40, 30),
            options: Some(quick()),
            idempotency_key: String::new(),
        };
        let id2 = c
            .submit_job(with_traceparent(req, t2, p2))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        wait_final(&mut c, &id2, Duration::from_secs(60)).await;
        let req = pb::WatchJobRequest {
            job_id: id2.clone(),
        };
        let mut w = c
            .watch_job(with_traceparent(req, t3, p3))
            .await
            .unwrap()
            .into_inner();
        while w.message().await.unwrap().is_some() {}

        let req = pb::SegmentRequest {
            image: b"not an image".to_vec(),
            options: Some(quick()),
        };
        let err = c.segment(with_traceparent(req, t4, p4)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        (id1, iterations1, id2)
    });

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);

    let requests = received.0.lock().unwrap().clone();
    assert!(!requests.is_empty(), "no spans exported\n{log}");
    let mut spans: Vec<Span> = Vec::new();
    for r in &requests {
        for rs in &r.resource_spans {
            let res = rs.resource.as_ref().expect("a resource");
            assert!(
                matches!(attr(&res.attributes, "service.name"), Some(Value::StringValue(s)) if s == "s3net-test"),
                "{:?}",
                res.attributes
            );
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let find = |name: &str, trace: &str| -> &Span {
        spans
            .iter()
            .find(|s| s.name == name && hex(&s.trace_id) == trace)
            .unwrap_or_else(|| {
                let have: Vec<_> = spans
                    .iter()
                    .map(|s| (s.name.as_str(), hex(&s.trace_id)))
                    .collect();
                panic!("no span {name} in trace {trace}; have {have:?}")
            })
    };

    // The Segment RPC: a server span under the caller's span, in the caller's trace.
    let rpc = find("s3net.v1.Segmenter/Segment", t1);
    assert_eq!(hex(&rpc.parent_span_id), p1);
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(str_attr(rpc, "rpc.system"), "grpc");
    assert_eq!(str_attr(rpc, "rpc.service"), "s3net.v1.Segmenter");
    assert_eq!(str_attr(rpc, "rpc.method"), "Segment");
    assert_eq!(str_attr(rpc, "client.address"), "127.0.0.1");
    assert!(int_attr(rpc, "client.port") > 0);
    assert_eq!(str_attr(rpc, "job_id"), id1);
    // Its job: a child of that RPC, with what an operator needs to know about the fit.
    let job = find("job", t1);
    assert_eq!(hex(&job.parent_span_id), hex(&rpc.span_id));
    assert_eq!(str_attr(job, "job_id"), id1);
    assert_eq!(str_attr(job, "outcome"), "completed");
    assert_eq!(str_attr(job, "device"), "cpu");
    assert_eq!(str_attr(job, "worker"), "cpu-0");
    assert_eq!(str_attr(job, "preset"), "default");
    assert_eq!(
        (int_attr(job, "width"), int_attr(job, "height")),
        (128, 128)
    );
    // What came in: a DICOM CT, uncompressed (nothing of the patient).
    assert_eq!(
        (str_attr(job, "format"), str_attr(job, "modality"), str_attr(job, "transfer_syntax")),
        ("dicom", "CT", "1.2.840.10008.1.2.1")
    );
    assert_eq!(int_attr(job, "iterations"), iterations1 as i64);
    assert_eq!(int_attr(job, "max_iterations"), 3);
    assert_eq!(int_attr(job, "size"), 32);
    assert!(int_attr(job, "labels") >= 1);
    assert!(matches!(attr(&job.attributes, "fit_s"), Some(Value::DoubleValue(s)) if *s > 0.0));
    assert!(matches!(attr(&job.attributes, "queued_s"), Some(Value::DoubleValue(s)) if *s >= 0.0));
    assert!(
        rpc.start_time_unix_nano <= job.start_time_unix_nano
            && job.end_time_unix_nano <= rpc.end_time_unix_nano,
        "the job runs within the streaming call"
    );
    assert!(
        job.events.iter().any(|e| e.name == "job completed"),
        "the outcome line is a span event: {:?}",
        job.events
    );

    // SubmitJob and its job in trace 2; the later WatchJob in its own trace 3, linked to it.
    let submit = find("s3net.v1.Segmenter/SubmitJob", t2);
    assert_eq!(hex(&submit.parent_span_id), p2);
    let job2 = find("job", t2);
    assert_eq!(hex(&job2.parent_span_id), hex(&submit.span_id));
    assert_eq!(str_attr(job2, "job_id"), id2);
    // A PNG: its format, and no DICOM fields.
    assert_eq!(str_attr(job2, "format"), "png");
    assert!(attr(&job2.attributes, "modality").is_none() && attr(&job2.attributes, "transfer_syntax").is_none());
    let watch = find("s3net.v1.Segmenter/WatchJob", t3);
    assert_eq!(hex(&watch.parent_span_id), p3);
    assert!(
        watch
            .links
            .iter()
            .any(|l| hex(&l.trace_id) == t2 && hex(&l.span_id) == hex(&submit.span_id)),
        "WatchJob links to the span that created the job: {:?}",
        watch.links
    );

    // A refused request: the gRPC code on its span, not an error of the server's.
    let refused = find("s3net.v1.Segmenter/Segment", t4);
    assert_eq!(int_attr(refused, "rpc.grpc.status_code"), 3);
    assert_ne!(refused.status.as_ref().map(|s| s.code), Some(2));
    assert!(spans
        .iter()
        .all(|s| hex(&s.trace_id) != t4 || s.name != "job"));

    // No patient value anywhere: names, attributes, events, links, resources.
    let everything = format!("{requests:?}");
    for v in &phi {
        assert!(!everything.contains(v.as_str()), "{v:?} was exported");
    }
}

#[test]
fn no_exporter_without_an_endpoint() {
    let cfg = s3net_server::Config::default();
    assert_eq!(cfg.telemetry.endpoint(), None);
    let t = Telemetry::init(&cfg).unwrap();
    assert!(!t.exporting());
    // Not even its thread.
    let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !threads.iter().any(|n| n.starts_with("OpenTelemetry")),
        "{threads:?}"
    );
}
