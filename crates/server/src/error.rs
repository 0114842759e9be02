//! The service's errors and their one mapping to gRPC status codes.

use s3net_imaging::ImagingError;
use s3net_model::ModelError;
use tonic::{Code, Status};

/// Everything an RPC or a job can fail with.
///
/// Each variant maps to exactly one gRPC code in [`ServiceError::code`]; the same code goes
/// into a job's `Failed` event, so a streamed failure and a unary one read alike.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The image could not be decoded (its message never carries patient data).
    #[error("{0}")]
    Imaging(#[from] ImagingError),
    /// The engine refused or failed the fit. An invalid option reads as the engine's reason
    /// alone: the gRPC code already says INVALID_ARGUMENT ("INVALID_ARGUMENT: size must be in
    /// 16..=1024, got 0", not "… invalid argument: size …").
    #[error("{}", model_message(.0))]
    Model(#[from] ModelError),
    /// A request field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller has `max_active_jobs` queued and running already (see `crate::callers`).
    #[error(
        "caller '{caller}' has {active} jobs queued or running, its limit \
         (server.callers.{caller}.max_active_jobs = {limit}); retry in about {retry_after_s} s"
    )]
    CallerQuota { caller: String, active: usize, limit: usize, retry_after_s: u64 },
    /// The caller holds its share of the queue's places already (see `queue.max_caller_share`).
    #[error(
        "caller '{caller}' holds {queued} of the queue's {capacity} places, as many as one caller may \
         while others may need room (queue.max_caller_share); retry in about {retry_after_s} s"
    )]
    CallerShare { caller: String, queued: usize, capacity: usize, retry_after_s: u64 },
    /// The job belongs to another caller, and this one is not an operator.
    #[error(
        "job '{0}' was submitted by another caller: only that caller and the operators \
         (server.callers.NAME.operator) may watch, read or cancel it"
    )]
    PermissionDenied(String),
    /// The queue holds `capacity` jobs already.
    #[error("queue is full ({waiting} jobs waiting); retry in about {retry_after_s} s")]
    QueueFull { waiting: usize, retry_after_s: u64 },
    /// The decoded images of the queued jobs and of those being decoded, with this one, would
    /// pass the queue's memory budget.
    #[error(
        "queue memory is full: this image needs {} decoded, and queued and arriving images hold \
         {} of the {} budget (queue.max_queued_bytes); retry in about {retry_after_s} s",
        size(*image_bytes), size(*held_bytes), size(*budget_bytes)
    )]
    QueueMemory { image_bytes: u64, held_bytes: u64, budget_bytes: u64, retry_after_s: u64 },
    /// The uploads in progress hold the bytes the server lets them hold.
    #[error(
        "uploads in progress hold {} of the {} the server allows \
         (server.max_upload_bytes_in_flight), and this one needs {} more; retry in about \
         {retry_after_s} s",
        size(*held_bytes), size(*budget_bytes), size(*need_bytes)
    )]
    UploadsFull { need_bytes: u64, held_bytes: u64, budget_bytes: u64, retry_after_s: u64 },
    /// A gRPC message larger than the server takes in one (`server.max_message_bytes`): refused
    /// at its length prefix, before the budget, so that a client is not told to retry what can
    /// never fit.
    #[error(
        "a message of {} is more than this server takes in one (server.max_message_bytes: {}); \
         send large images with SegmentUpload, in chunks smaller than that",
        size(*bytes), size(*limit)
    )]
    MessageTooLarge { bytes: u64, limit: u64 },
    /// A request stopped sending before it was received whole: dropped, so that the budget it
    /// held (`UploadsFull`) is not held for ever by a client that hangs with its connection
    /// open (its HTTP/2 layer still answers the keepalive pings).
    #[error(
        "no bytes of the request arrived for {idle_s} s (server.request_idle_timeout_s): it was \
         dropped and what it held given back"
    )]
    Stalled { idle_s: u64 },
    /// The server is shutting down and takes no new work.
    #[error("server is shutting down; retry on another replica")]
    Draining,
    /// No such job id.
    #[error("unknown job '{0}'")]
    NotFound(String),
    /// The job existed but its result was evicted.
    #[error("job '{id}' expired: finished results are kept for {retention_s} s (or less under memory pressure)")]
    Expired { id: String, retention_s: u64 },
    /// An idempotency key reused with a different image or options.
    #[error("idempotency key '{key}' is already used by job '{job_id}' with a different image or options")]
    AlreadyExists { key: String, job_id: String },
    /// The job was cancelled; the reason says by whom.
    #[error("job cancelled: {0}")]
    Cancelled(String),
    /// The job id names a replica that is not among the service's replicas now
    /// (`cluster.peers`): scaled down or replaced, and its jobs gone with it. Nothing is sent
    /// to an address outside that list (the call would carry the server's token there).
    #[error(
        "{about} was taken by replica {replica}, which is not one of this service's replicas \
         now (cluster.peers): it was scaled down or replaced, and its jobs went with it"
    )]
    ReplicaGone { about: String, replica: String },
    /// The replica that holds the job is listed but could not be reached: retry.
    #[error("cannot reach replica {replica}, which holds {about}: {error}; retry")]
    ReplicaUnreachable { about: String, replica: String, error: String },
    /// No job of this idempotency key here (the answer of a replica asked whether it holds
    /// one; see `crate::cluster`).
    #[error("no job of idempotency key '{0}' here")]
    KeyNotHeld(String),
    /// Another replica's refusal of a call made on this one's behalf, passed on as it came
    /// (its code and message).
    #[error("{}", .0.message())]
    Relayed(Status),
    /// A bug or an unexpected failure (e.g. a panic in a worker).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A size in a message, in binary units as the configuration counts them: whole KiB (rounded
/// up) below 1 MiB, else MiB or GiB with one decimal ("64 KiB", "23.9 MiB", "1.0 GiB").
pub fn size(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b < MIB => format!("{} KiB", b.div_ceil(KIB)),
        b if b < GIB => format!("{:.1} MiB", b as f64 / MIB as f64),
        b => format!("{:.1} GiB", b as f64 / GIB as f64),
    }
}

fn model_message(e: &ModelError) -> String {
    match e {
        ModelError::InvalidArgument(m) => m.clone(),
        e => e.to_string(),
    }
}

impl ServiceError {
    /// The gRPC code of this error: the one place that decides it.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::Imaging(ImagingError::Internal(_)) => Code::Internal,
            ServiceError::Imaging(_) | ServiceError::InvalidArgument(_) | ServiceError::MessageTooLarge { .. } => {
                Code::InvalidArgument
            }
            ServiceError::Model(m) => match m {
                ModelError::InvalidArgument(_) => Code::InvalidArgument,
                ModelError::Cancelled => Code::Cancelled,
                ModelError::Diverged { .. } => Code::Aborted,
                // Too large for what the device has free now: a smaller job, or a later
                // retry, may fit. Not a fault of the service.
                ModelError::OutOfMemory(_) => Code::ResourceExhausted,
                ModelError::Torch(_) => Code::Internal,
            },
            ServiceError::QueueFull { .. }
            | ServiceError::QueueMemory { .. }
            | ServiceError::UploadsFull { .. }
            | ServiceError::CallerQuota { .. }
            | ServiceError::CallerShare { .. } => Code::ResourceExhausted,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Stalled { .. } => Code::DeadlineExceeded,
            ServiceError::Draining | ServiceError::ReplicaUnreachable { .. } => Code::Unavailable,
            ServiceError::NotFound(_)
            | ServiceError::Expired { .. }
            | ServiceError::ReplicaGone { .. }
            | ServiceError::KeyNotHeld(_) => Code::NotFound,
            ServiceError::Relayed(s) => s.code(),
            ServiceError::AlreadyExists { .. } => Code::AlreadyExists,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::Internal(_) => Code::Internal,
        }
    }
}

impl ServiceError {
    /// Why a request was refused, as `s3net_rejected_total{reason}` counts it: the gRPC code's
    /// name in snake case, except `queue_full`, `queue_memory`, `upload_memory`,
    /// `caller_quota` and `caller_share` (RESOURCE_EXHAUSTED), `stalled` (DEADLINE_EXCEEDED) and `draining`
    /// (UNAVAILABLE), which say what to do about it.
    pub fn reason(&self) -> &'static str {
        match self {
            ServiceError::QueueFull { .. } => "queue_full",
            ServiceError::QueueMemory { .. } => "queue_memory",
            ServiceError::UploadsFull { .. } => "upload_memory",
            ServiceError::CallerQuota { .. } => "caller_quota",
            ServiceError::CallerShare { .. } => "caller_share",
            ServiceError::Stalled { .. } => "stalled",
            ServiceError::Draining => "draining",
            e => code_reason(e.code()),
        }
    }
}

/// The `reason` label of a refused request with this gRPC code (see [`ServiceError::reason`]).
pub fn code_reason(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::ResourceExhausted => "queue_full",
        Code::Unavailable => "draining",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::AlreadyExists => "already_exists",
        Code::NotFound => "not_found",
        Code::Cancelled => "cancelled",
        Code::Aborted => "aborted",
        Code::Internal => "internal",
        _ => "other",
    }
}

/// Whether a call failed in its connection rather than in the server: the server closed or
/// reset it (a connection over `server.max_connections`, a restart) or the network dropped it.
/// tonic says CANCELLED or UNKNOWN "transport error" then, with the transport error as the
/// status's source, where gRPC's C core (the Python client's) says UNAVAILABLE.
pub fn connection_failed(s: &Status) -> bool {
    std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

/// The transport's own account of a failed connection (its chain of errors, "a: b: c"), or
/// `None` for a status the other side sent. Why: tonic's message alone says "transport error".
pub fn connection_failure(s: &Status) -> Option<String> {
    if !connection_failed(s) {
        return None;
    }
    let mut why = Vec::new();
    let mut e = std::error::Error::source(s);
    while let Some(err) = e {
        why.push(err.to_string());
        e = err.source();
    }
    Some(why.join(": "))
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        if let ServiceError::Relayed(s) = e {
            return s;
        }
        let mut status = Status::new(e.code(), e.to_string());
        if let ServiceError::QueueFull { retry_after_s, .. }
        | ServiceError::QueueMemory { retry_after_s, .. }
        | ServiceError::UploadsFull { retry_after_s, .. }
        | ServiceError::CallerQuota { retry_after_s, .. }
        | ServiceError::CallerShare { retry_after_s, .. } = e
        {
            if let Ok(v) = retry_after_s.to_string().parse() {
                status.metadata_mut().insert("retry-after", v);
            }
        }
        // The limit, machine-readable: a client may send the image again in smaller pieces.
        if let ServiceError::MessageTooLarge { limit, .. } = e {
            if let Ok(v) = limit.to_string().parse() {
                status.metadata_mut().insert("max-message-bytes", v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An invalid option's message is the engine's reason alone (the code says the rest); other
    /// engine errors keep their own words.
    #[test]
    fn an_invalid_option_reads_as_its_reason() {
        let e: ServiceError = ModelError::InvalidArgument("size must be in 16..=1024, got 0".into()).into();
        let status = Status::from(e);
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "size must be in 16..=1024, got 0"));
        let e: ServiceError = ModelError::Cancelled.into();
        assert_eq!(e.to_string(), "fit cancelled");
    }

    #[test]
    fn each_error_has_its_code() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (ImagingError::EmptyInput.into(), Code::InvalidArgument),
            (
                ModelError::InvalidArgument("x".into()).into(),
                Code::InvalidArgument,
            ),
            (ModelError::Cancelled.into(), Code::Cancelled),
            (
                ModelError::Torch("CUDA error: an illegal memory access was encountered".into()).into(),
                Code::Internal,
            ),
            (
                ModelError::from_torch("CUDA out of memory. Tried to allocate 2.00 GiB").into(),
                Code::ResourceExhausted,
            ),
            (
                ModelError::from_torch("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes").into(),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::QueueFull {
                    waiting: 3,
                    retry_after_s: 7,
                },
                Code::ResourceExhausted,
            ),
            (ServiceError::Stalled { idle_s: 60 }, Code::DeadlineExceeded),
            (ServiceError::CallerQuota { caller: "research".into(), active: 4, limit: 4, retry_after_s: 3 }, Code::ResourceExhausted),
            (ServiceError::CallerShare { caller: "research".into(), queued: 48, capacity: 64, retry_after_s: 3 }, Code::ResourceExhausted),
            (ServiceError::PermissionDenied("j".into()), Code::PermissionDenied),
            (ServiceError::MessageTooLarge { bytes: 70 << 20, limit: 64 << 20 }, Code::InvalidArgument),
            (ServiceError::Draining, Code::Unavailable),
            (ServiceError::NotFound("j".into()), Code::NotFound),
            (ServiceError::KeyNotHeld("k".into()), Code::NotFound),
            (ServiceError::Relayed(Status::already_exists("key 'k' is used by job 'j@10.0.0.9:50051'")), Code::AlreadyExists),
            (ServiceError::ReplicaGone { about: "job 'j@10.0.0.9:50051'".into(), replica: "10.0.0.9:50051".into() }, Code::NotFound),
            (
                ServiceError::ReplicaUnreachable { about: "job 'j'".into(), replica: "10.0.0.9:50051".into(), error: "refused".into() },
                Code::Unavailable,
            ),
            (
                ServiceError::Expired {
                    id: "j".into(),
                    retention_s: 1,
                },
                Code::NotFound,
            ),
            (
                ServiceError::AlreadyExists {
                    key: "k".into(),
                    job_id: "j".into(),
                },
                Code::AlreadyExists,
            ),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
        let s = Status::from(ServiceError::QueueFull {
            waiting: 3,
            retry_after_s: 7,
        });
        assert_eq!(s.metadata().get("retry-after").unwrap(), "7");
        assert_eq!(ServiceError::Draining.reason(), "draining");
        assert_eq!(ServiceError::Stalled { idle_s: 60 }.reason(), "stalled");
        let quota = ServiceError::CallerQuota { caller: "research".into(), active: 4, limit: 4, retry_after_s: 3 };
        assert_eq!(quota.reason(), "caller_quota");
        assert_eq!(
            quota.to_string(),
            "caller 'research' has 4 jobs queued or running, its limit (server.callers.research.max_active_jobs = 4); retry in about 3 s"
        );
        assert_eq!(Status::from(quota).metadata().get("retry-after").unwrap(), "3");
        let share = ServiceError::CallerShare { caller: "research".into(), queued: 48, capacity: 64, retry_after_s: 5 };
        assert_eq!(share.reason(), "caller_share");
        assert_eq!(
            share.to_string(),
            "caller 'research' holds 48 of the queue's 64 places, as many as one caller may while others may need room (queue.max_caller_share); retry in about 5 s"
        );
        assert_eq!(Status::from(share).metadata().get("retry-after").unwrap(), "5");
        assert_eq!(ServiceError::PermissionDenied("j".into()).reason(), "permission_denied");
        let big = Status::from(ServiceError::MessageTooLarge { bytes: 70 << 20, limit: 64 << 20 });
        assert_eq!(big.metadata().get("max-message-bytes").unwrap(), "67108864");
        assert_eq!(
            ServiceError::InvalidArgument("x".into()).reason(),
            "invalid_argument"
        );
        assert_eq!(
            ServiceError::from(ImagingError::EmptyInput).reason(),
            "invalid_argument"
        );
        assert!(s.message().contains("retry in about 7 s"));
    }

    #[test]
    fn sizes_read_in_binary_units() {
        let cases = [(0, "0 KiB"), (1, "1 KiB"), (100 << 10, "100 KiB"), ((1 << 20) - 1, "1024 KiB"), (1 << 20, "1.0 MiB"), ((24 << 20) + 30, "24.0 MiB"), (62_500_000, "59.6 MiB"), (1 << 30, "1.0 GiB"), (2 << 30, "2.0 GiB")];
        for (bytes, text) in cases {
            assert_eq!(size(bytes), text, "{bytes}");
        }
        let e = ServiceError::UploadsFull { need_bytes: 200 << 20, held_bytes: 900 << 20, budget_bytes: 1 << 30, retry_after_s: 1 };
        assert_eq!(
            e.to_string(),
            "uploads in progress hold 900.0 MiB of the 1.0 GiB the server allows (server.max_upload_bytes_in_flight), and this one needs 200.0 MiB more; retry in about 1 s"
        );
    }
}
