//! Logs and traces: one `tracing` subscriber for the process, with log lines (text or JSON)
//! and, when `telemetry.otlp_endpoint` is set, the same spans exported over OTLP/gRPC.
//!
//! The RPC and job spans are plain `tracing` spans; `tracing-opentelemetry` turns them into
//! OpenTelemetry spans. A caller's W3C `traceparent` becomes the RPC span's parent
//! ([`set_remote_parent`]); a job carries the context of the RPC that created it
//! ([`TraceContext`]) to the worker thread, so its span is that RPC's child; a later
//! `WatchJob` starts its own trace and links to the job's.
//!
//! Only spans of this crate are exported (never tonic's, hyper's or the exporter's own, which
//! would feed back into themselves), and they carry identifiers, sizes, counts and outcomes:
//! nothing from the image or its DICOM header.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::Config;

/// The installed subscriber's exporter, if any; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process-wide subscriber: log lines as `log.format` says (filtered by
    /// `log.filter`, or `RUST_LOG`) and, when `telemetry.otlp_endpoint` is set, an OTLP
    /// exporter of this crate's spans. Without an endpoint, no exporter and no thread exist.
    ///
    /// Must run inside a Tokio runtime when exporting (the tonic channel lives on it), and only
    /// once per process: a second call keeps the first subscriber, and fails if it was asked
    /// to export (its spans would silently go nowhere otherwise).
    pub fn init(cfg: &Config) -> Result<Telemetry> {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.filter));
        // Colour only for a person at a terminal; log files and collectors get plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let logs = if cfg.log.format == "json" {
            fmt.json().boxed()
        } else {
            fmt.with_ansi(ansi).boxed()
        }
        .with_filter(filter);

        let provider = cfg
            .telemetry
            .endpoint()
            .map(|e| tracer_provider(e, cfg))
            .transpose()?;
        let otel = provider.as_ref().map(|p| {
            let tracer = p.tracer("s3net-server");
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("s3net_server", tracing::Level::INFO),
                )
        });
        let installed = tracing_subscriber::registry()
            .with(logs)
            .with(otel)
            .try_init();
        if installed.is_err() && provider.is_some() {
            anyhow::bail!("a tracing subscriber is already installed; cannot export traces");
        }
        if let Some(e) = cfg.telemetry.endpoint() {
            tracing::info!(
                endpoint = e,
                sample_ratio = cfg.telemetry.sample_ratio,
                "exporting traces over OTLP"
            );
        }
        Ok(Telemetry { provider })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter (at most a few seconds when the
    /// collector is unreachable). Call it after the server has stopped.
    pub async fn shutdown(self) {
        let Some(p) = self.provider else { return };
        // Blocking: it waits for the export thread, whose requests run on this runtime.
        let flush = tokio::task::spawn_blocking(move || p.shutdown());
        match tokio::time::timeout(Duration::from_secs(10), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export did not finish"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export did not finish"),
            Err(_) => tracing::warn!("trace export still busy after 10 s; giving up"),
        }
    }
}

fn tracer_provider(endpoint: &str, cfg: &Config) -> Result<SdkTracerProvider> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5));
    if endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
    }
    let exporter = exporter
        .build()
        .with_context(|| format!("telemetry.otlp_endpoint {endpoint:?}"))?;
    let resource = Resource::builder()
        .with_service_name(cfg.telemetry.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.telemetry.sample_ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// gRPC request metadata as an OpenTelemetry carrier.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes the caller's `traceparent` (and `tracestate`) the parent of an RPC's span. Without
/// one, or without an exporter, the span stays a root (or nothing happens).
pub fn set_remote_parent(span: &tracing::Span, meta: &tonic::metadata::MetadataMap) {
    let cx = TraceContextPropagator::new().extract(&Metadata(meta));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Records a failed RPC on its span: the gRPC code always, an error status for the codes
/// that mean the server failed (OpenTelemetry's rule for gRPC servers), not the caller.
pub fn record_status(span: &tracing::Span, status: &tonic::Status) {
    use tonic::Code;
    span.record("rpc.grpc.status_code", status.code() as i64);
    if matches!(
        status.code(),
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.record("otel.status_code", "error");
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of the RPC that created a job, as text:
/// it travels with the job to the worker that runs it (and could go into a shared queue
/// backend as it is). Empty when no spans are exported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext(HashMap<String, String>);

impl TraceContext {
    /// The context of the current span.
    pub fn current() -> TraceContext {
        let mut carrier = HashMap::new();
        let cx = tracing::Span::current().context();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        }
        TraceContext(carrier)
    }

    /// Whether it names a span.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts this context into an outgoing call's metadata (`traceparent`, `tracestate`): a
    /// call one replica forwards to another stays in its caller's trace.
    pub fn insert_into(&self, meta: &mut tonic::metadata::MetadataMap) {
        for (k, v) in &self.0 {
            if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::AsciiMetadataKey>(), v.parse()) {
                meta.insert(k, v);
            }
        }
    }

    /// Makes this context the parent of `span` (a job's span).
    pub fn set_parent_of(&self, span: &tracing::Span) {
        if let Some(cx) = self.context() {
            let _ = span.set_parent(cx);
        }
    }

    /// Adds a link from `span` to this context (a later RPC about the same job).
    pub fn link_from(&self, span: &tracing::Span) {
        if let Some(cx) = self.context() {
            span.add_link_with_attributes(
                cx.span().span_context().clone(),
                vec![KeyValue::new("s3net.link", "job")],
            );
        }
    }

    fn context(&self) -> Option<opentelemetry::Context> {
        if self.0.is_empty() {
            return None;
        }
        let cx = TraceContextPropagator::new().extract(&self.0);
        cx.span().span_context().is_valid().then_some(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_context_without_an_exporter() {
        // No OpenTelemetry layer is installed in unit tests: nothing to carry, nothing to do.
        let span = tracing::info_span!("rpc");
        let _e = span.enter();
        let t = TraceContext::current();
        assert!(t.is_empty());
        t.set_parent_of(&span);
        t.link_from(&span);
        let mut meta = tonic::metadata::MetadataMap::new();
        meta.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        set_remote_parent(&span, &meta);
        let got = TraceContextPropagator::new().extract(&Metadata(&meta));
        assert_eq!(
            got.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }
}
