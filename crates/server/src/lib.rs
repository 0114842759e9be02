//! The S3-Net gRPC service (`s3net serve`) and its small client (`s3net client …`).
//!
//! One self-supervised fit per uploaded image, run as a job on a bounded priority queue by a
//! pool of worker threads (per CUDA device, or on the CPU). Clients stream a job's events
//! (queued, started, progress, outcome); asynchronous jobs can be submitted, watched, fetched
//! and cancelled. The fit itself is `s3net_model::segment`; this crate never touches tensors.
//!
//! * [`pb`] — the generated `s3net.v1` messages and service (see `proto/s3net/v1/s3net.proto`)
//! * [`server::Server`] — start and gracefully stop a server
//! * [`jobs::JobQueue`] — the queue and job store interface, [`jobs::MemoryQueue`] the default
//! * [`error::ServiceError`] — every failure, mapped to a gRPC code in one place
//! * [`config::Config`] — the typed configuration
//! * [`uploads`] — the byte budget of requests being received
//! * [`connections`] — the accept loop and its bound on open connections
//! * [`metrics`] — Prometheus metrics and their `/metrics` endpoint
//! * [`telemetry`] — log lines and OpenTelemetry traces (OTLP export, `traceparent`)
//! * [`cluster`] — replicas that forward calls about each other's jobs
//! * [`callers`] — who calls: bearer tokens, each job's owner, per-caller quotas
//! * [`cli`] — `serve` and `client` subcommands for the `s3net` binary

pub mod callers;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod error;
pub mod fair;
pub mod jobs;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
pub mod uploads;
pub mod worker;

/// The generated `s3net.v1` protocol.
pub mod pb {
    tonic::include_proto!("s3net.v1");
    /// The encoded descriptors of `s3net.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("s3net_v1_descriptor");
}

pub use config::Config;
pub use error::ServiceError;
pub use server::Server;
