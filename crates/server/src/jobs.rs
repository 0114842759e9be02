//! The job queue and job store, behind one small trait.
//!
//! [`JobQueue`] is everything the RPC layer and the workers need from "where jobs live": submit
//! (with capacity and idempotency), take the next job for a device, publish events, watch, get,
//! cancel, list, drain. [`MemoryQueue`] keeps it all in this process; a shared backend (so that
//! many replicas serve one queue) implements the same trait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use s3net_imaging::{DicomSource, Image};
use s3net_model::{DeviceSpec, FitOptions, StepCost};
use tokio::sync::broadcast;

use crate::callers::Caller;
use crate::fair::Turns;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::pb::{self, job_event::Event, JobState};
use crate::telemetry::TraceContext;

/// A decoded image and everything needed to fit it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub image: Arc<Image>,
    pub options: FitOptions,
    /// The requested device; a worker only takes jobs its own device satisfies.
    pub device: DeviceSpec,
    pub priority: i32,
    /// What the result reports as applied.
    pub applied: pb::AppliedOptions,
    /// Idempotency key and a fingerprint of the image and options.
    pub idempotency: Option<(String, [u8; 32])>,
    /// The trace context of the RPC that created the job: its span's parent.
    pub trace: TraceContext,
    /// The image's pixel spacing in mm ([rows, columns]), when its file gives one.
    pub pixel_spacing: Option<[f64; 2]>,
    /// The DICOM Segmentations asked for (`Options.dicom_seg`, `.dicom_seg_clusters`), with
    /// what they need of the source.
    pub dicom_seg: Option<DicomOutputs>,
    /// The queue budget held for this job since before its image was decoded
    /// ([`JobQueue::reserve`]); submitting the job takes it over.
    pub reservation: Option<Arc<Reservation>>,
    /// What its image was, for the job's span and log lines.
    pub input: InputSummary,
    /// Who submitted it: the job is theirs to see, and counts against their
    /// `max_active_jobs` (see `crate::callers`).
    pub caller: Caller,
}

/// What a job's image was, as its file said: fields of the job's span, so that an operator
/// reading a failed or slow fit sees what came in. Nothing that identifies a patient: the
/// format, and for DICOM the modality and the transfer syntax.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputSummary {
    /// `png`, `jpeg`, `bmp`, `tiff` or `dicom`.
    pub format: String,
    /// Modality (0008,0060), e.g. `CT`, when the DICOM file gives a well-formed one.
    pub modality: Option<String>,
    /// Transfer Syntax UID of a DICOM file.
    pub transfer_syntax: Option<String>,
    /// Frames (pages) of the file, of which the job fits one (`Header::frames`).
    pub frames: u32,
}

impl InputSummary {
    /// The summary of a decoded image.
    pub fn of(d: &s3net_imaging::Decoded) -> InputSummary {
        InputSummary {
            format: d.format.to_string(),
            modality: d.dicom.as_ref().and_then(|i| i.modality.clone()),
            transfer_syntax: d.dicom.as_ref().map(|i| i.transfer_syntax.clone()),
            frames: 1,
        }
    }
}

/// The DICOM Segmentations a job's result is to carry, and what they need of its source image.
#[derive(Debug, Clone)]
pub struct DicomOutputs {
    pub source: Arc<DicomSource>,
    /// The foreground mask's (`mask_dicom`).
    pub foreground: bool,
    /// The cluster map's (`labels_dicom`).
    pub clusters: bool,
}

/// Bytes of the queue's image-memory budget held for a request from before its image is
/// decoded until its job is submitted (or the request fails: the drop gives them back).
///
/// Why: a decode holds a few times the decoded image's size while it runs. Checked only at
/// submit, the budget let any number of requests decode at once and be refused afterwards (12
/// concurrent 6000×6000 grey PNGs against a 64 MB budget: the server's peak went from 0.36 to
/// 3.7 GB, for eleven refusals); a burst of the largest images allowed would have taken the
/// whole machine. Reserved from the image's headers, the budget bounds the decodes too.
#[derive(Debug)]
pub struct Reservation {
    bytes: AtomicUsize,
    pending: Arc<AtomicUsize>,
}

impl Reservation {
    /// The bytes still held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Takes the bytes over (they become the job's own); the drop then gives nothing back.
    fn take(&self) -> usize {
        let b = self.bytes.swap(0, Ordering::SeqCst);
        self.pending.fetch_sub(b, Ordering::SeqCst);
        b
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending.fetch_sub(*self.bytes.get_mut(), Ordering::SeqCst);
    }
}

/// The answer to [`JobQueue::submit`].
#[derive(Debug, Clone)]
pub struct Submitted {
    pub id: String,
    /// The idempotency key matched an existing job.
    pub existing: bool,
    pub state: JobState,
    pub position: u32,
}

/// A job handed to a worker.
#[derive(Debug)]
pub struct Claimed {
    pub id: String,
    pub job: NewJob,
    /// Raised by cancellation; the fit checks it before every step.
    pub cancel: Arc<AtomicBool>,
    /// How long it waited in the queue.
    pub queued_for: Duration,
    pub submitted: Instant,
}

/// What [`JobQueue::take`] found.
#[derive(Debug)]
pub enum Take {
    Job(Box<Claimed>),
    /// Nothing for this device within the timeout.
    Idle,
    /// The queue is closed: the worker should exit.
    Closed,
}

/// A job's events so far, and a receiver for the ones to come (no gap, no duplicate between them).
#[derive(Debug)]
pub struct Watch {
    pub replay: Vec<pb::JobEvent>,
    /// `None` when the job has already finished (the replay then ends with its outcome).
    pub live: Option<broadcast::Receiver<pb::JobEvent>>,
    /// The trace context of the RPC that created the job, for the watcher's span to link to.
    pub trace: TraceContext,
}

/// How many jobs wait and run right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: usize,
    pub running: usize,
    /// Bytes of the image-memory budget held: the queued jobs' decoded images and the
    /// reservations of those being decoded.
    pub image_bytes: usize,
    /// That budget (`queue.max_queued_bytes`).
    pub image_bytes_limit: usize,
}

/// Where jobs wait, run and are kept. Methods never block the async runtime for long, except
/// [`JobQueue::take`], which only worker threads call.
pub trait JobQueue: Send + Sync + 'static {
    /// Holds `bytes` (a decoded image's, from its headers) of the queued-image budget for a
    /// request of `caller` about to decode it, or refuses it now, as [`JobQueue::submit`]
    /// would refuse the job. A request whose idempotency key names a job already gets an empty
    /// reservation.
    fn reserve(&self, bytes: usize, key: &str, caller: &Caller) -> Result<Reservation, ServiceError>;
    /// Queues a job, or returns the job its idempotency key already names. Refused when the
    /// queue is full, or its caller has `max_active_jobs` queued and running already.
    fn submit(&self, job: NewJob) -> Result<Submitted, ServiceError>;
    /// The job idempotency key `key` of caller `caller` names here (each caller's keys are its
    /// own), as [`JobQueue::submit`] would return it for a request of `fingerprint`
    /// (`AlreadyExists` for another one); `None` when the key names no job here. Answers while
    /// draining too: the job is still here to be watched.
    fn find_key(&self, caller: &str, key: &str, fingerprint: &[u8; 32]) -> Result<Option<Submitted>, ServiceError>;
    /// The caller that submitted job `id`, while the queue knows the job.
    fn owner(&self, id: &str) -> Option<Arc<str>>;
    /// The next job a worker on `device` can run, by priority then arrival; waits up to `timeout`.
    /// `accept` is asked about that next job only: when it says no, nothing is taken (a job
    /// behind it is never taken first, so no job waits behind later ones for long).
    fn take(&self, device: DeviceSpec, timeout: Duration, accept: &dyn Fn(&NewJob) -> bool) -> Take;
    /// Records and broadcasts an event of a running job (Started, Progress, or its outcome).
    /// A `Cancelled` outcome with an empty reason gets the reason the cancellation gave.
    fn publish(&self, id: &str, event: Event);
    fn watch(&self, id: &str) -> Result<Watch, ServiceError>;
    fn get(&self, id: &str) -> Result<pb::Job, ServiceError>;
    /// Cancels a queued job now or flags a running one; returns the state after the call.
    fn cancel(&self, id: &str, reason: &str) -> Result<JobState, ServiceError>;
    /// Newest first, results without their images; only `owner`'s jobs when given.
    fn list(&self, state: Option<JobState>, limit: usize, owner: Option<&str>) -> Vec<pb::Job>;
    /// Refuses new work from now on ([`ServiceError::Draining`]).
    fn drain(&self);
    /// Cancels every queued and running job because the server stops: their outcomes say
    /// `retryable` (the same request may be sent again; our clients' Segment calls do).
    fn cancel_all(&self, reason: &str);
    /// [`JobQueue::cancel_all`] for the jobs not started yet.
    fn cancel_queued(&self, reason: &str);
    /// Queued plus running jobs.
    fn active(&self) -> usize;
    /// What a worker's warm-up measured a step to cost on its device: until a fit has ended,
    /// the hints given to refused callers go by it.
    fn warmed_up(&self, cost: StepCost);
    /// Queued and running jobs, separately (for the metrics).
    fn stats(&self) -> QueueStats;
    /// Wakes the workers and makes [`JobQueue::take`] return [`Take::Closed`].
    fn close(&self);
}

/// Limits of the in-process queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub capacity: usize,
    pub retention: Duration,
    pub retention_bytes: usize,
    /// Memory budget for the decoded images of queued jobs, in bytes; a job that would exceed
    /// it is refused like a full queue (unless the queue is empty).
    pub queued_bytes: usize,
    /// Number of workers, to estimate the retry hint.
    pub workers: usize,
    /// Whether the callers of one priority take turns (`queue.fair_share`, see [`crate::fair`]).
    pub fair_share: bool,
    /// The most of `capacity` one named caller may hold queued (`queue.max_caller_share`).
    pub caller_share: f64,
}

/// The in-process [`JobQueue`]: one mutex, one condition variable for the workers.
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    wake: Condvar,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
    /// Bytes held by [`Reservation`]s: images being decoded. Raised only under the lock.
    pending: Arc<AtomicUsize>,
    /// What every job id ends with: empty, or `@` and this replica's address in a cluster
    /// (see [`MemoryQueue::with_id_suffix`]).
    id_suffix: String,
}

struct Entry {
    state: JobState,
    priority: i32,
    /// Its start and end tags among the callers' turns (see [`crate::fair`]); 0 without
    /// `fair_share`.
    tags: (f64, f64),
    seq: u64,
    /// Present while queued; moved to the worker on take.
    job: Option<NewJob>,
    device: DeviceSpec,
    cancel: Arc<AtomicBool>,
    /// Why it was asked to stop, for the outcome its worker reports (set once).
    cancel_reason: Option<pb::Cancelled>,
    /// The idempotency key, scoped to the caller (see [`scoped_key`]), and its fingerprint.
    key: Option<(String, [u8; 32])>,
    /// Who submitted it.
    caller: Arc<str>,
    trace: TraceContext,
    width: u32,
    height: u32,
    submitted: Instant,
    submitted_at: f64,
    started_at: f64,
    finished_at: f64,
    finished: Option<Instant>,
    started: Option<pb::Started>,
    progress: Option<pb::Progress>,
    outcome: Option<Event>,
    result_bytes: usize,
    tx: Option<broadcast::Sender<pb::JobEvent>>,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Entry>,
    /// Queued ids in the order workers take them: priority descending, then the callers'
    /// turns (see [`crate::fair`]; every tag 0 without `fair_share`), then arrival.
    queue: Vec<String>,
    keys: HashMap<String, String>,
    /// Finished ids, oldest first.
    finished: VecDeque<String>,
    retained_bytes: usize,
    /// Decoded image bytes held by queued jobs.
    queued_bytes: usize,
    expired: HashSet<String>,
    expired_order: VecDeque<String>,
    seq: u64,
    running: usize,
    draining: bool,
    closed: bool,
    /// Moving average of fit durations, for the retry hint.
    mean_fit_s: f64,
    /// Fits that went into `mean_fit_s` (see `MemoryQueue::learn_fit`).
    fits_seen: u32,
    /// When the last refused caller was told to come back (see `MemoryQueue::retry_after_s`).
    promised: Option<Instant>,
    /// The same for each named caller refused for its `max_active_jobs` (see
    /// `MemoryQueue::caller_retry_after_s`).
    caller_promised: HashMap<Arc<str>, Instant>,
    /// Queued and running jobs per caller (`max_active_jobs`); counted as jobs are submitted
    /// and finish, so that a submission does not walk every job the queue keeps.
    active: HashMap<Arc<str>, usize>,
    /// The callers' turns (`queue.fair_share`).
    turns: Turns,
    /// The mean of the workers' warm-up step costs (see `JobQueue::warmed_up`), and how many.
    step_cost: Option<StepCost>,
    costs_seen: u32,
}

const EXPIRED_MEMORY: usize = 100_000;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn event(id: &str, e: Event) -> pb::JobEvent {
    pb::JobEvent {
        job_id: id.to_string(),
        event: Some(e),
    }
}

/// Whether an event ends a job's stream.
pub fn is_outcome(e: &Event) -> bool {
    matches!(
        e,
        Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_)
    )
}

fn device_serves(worker: DeviceSpec, wanted: DeviceSpec) -> bool {
    wanted == DeviceSpec::Auto || wanted == worker
}

impl MemoryQueue {
    pub fn new(limits: QueueLimits) -> Self {
        Self::with_metrics(limits, Arc::new(Metrics::default()))
    }

    /// A queue that counts outcomes and queue waits into `metrics` (the server's).
    pub fn with_metrics(limits: QueueLimits, metrics: Arc<Metrics>) -> Self {
        MemoryQueue {
            inner: Mutex::new(Inner {
                mean_fit_s: 1.0,
                ..Default::default()
            }),
            wake: Condvar::new(),
            limits,
            metrics,
            pending: Arc::new(AtomicUsize::new(0)),
            id_suffix: String::new(),
        }
    }

    /// Job ids that end with `suffix`: in a cluster, `@` and this replica's address, so that
    /// any replica can tell where a job lives (`crate::cluster`).
    pub fn with_id_suffix(mut self, suffix: String) -> Self {
        self.id_suffix = suffix;
        self
    }

    /// Seconds after which a refused caller may find room, and that caller's place in line.
    ///
    /// Room comes at the rate jobs end: the jobs running at once over the mean fit (Little's
    /// law; not per worker: a GPU worker stacks many jobs into one batch, each taking longer
    /// than alone, and counting one per worker overstated the wait by the stacks' size: an
    /// H200 with 64 jobs queued behind two stacks of 16 hinted 33 s; at its 7 images/s they
    /// run in 9). Each refused caller is given the next such opening after the last one
    /// promised, so callers refused together come back one opening apart, not all at once:
    /// told the time the whole queue takes to run, 127 clients refused together came back
    /// together, 32 found room, the rest were refused again, and the worker waited between
    /// the waves (a CPU server after 8 fits of 0.2 s, 160 clients at once, a queue of 32:
    /// 4.2 jobs/s against 5.5 without refusals; README, "Refusals and retry hints"). Before
    /// any fit has ended, the fit's time is the workers' warm-up measure of a step times the
    /// queued jobs' steps (see [`MemoryQueue::expected_fit_s`]). Without that either (no
    /// warm-up), it is a guess of 1 s, and then every caller is told the time the jobs ahead
    /// take by that guess, since a line of promises spaced by a wrong guess would hold them all
    /// to it.
    fn retry_after_s(&self, inner: &mut Inner) -> u64 {
        let at_once = inner.running.max(self.limits.workers).max(1) as f64;
        let Some(fit_s) = Self::expected_fit_s(inner) else {
            let ahead = (inner.queue.len() + inner.running) as f64;
            return (ahead * inner.mean_fit_s / at_once).ceil().max(1.0) as u64;
        };
        let opening = fit_s / at_once;
        let now = Instant::now();
        let after = inner.promised.filter(|&p| p > now).unwrap_or(now);
        let at = after + Duration::from_secs_f64(opening.clamp(0.0, 3600.0));
        inner.promised = Some(at);
        (at - now).as_secs_f64().ceil().max(1.0) as u64
    }

    /// Seconds a fit takes, by the best the queue knows: the mean of the fits that ended (see
    /// [`MemoryQueue::learn_fit`]); before any has, the mean over the queued jobs of their
    /// steps at the warm-up's cost of a step on their grid; `None` without either.
    ///
    /// Why the queued jobs' own steps and grids: a fresh CPU server whose warm-up measured
    /// 0.15 s a step on the default 256² grid would otherwise have told callers of five-step
    /// 64² jobs to wait out 50 such steps.
    fn expected_fit_s(inner: &Inner) -> Option<f64> {
        if inner.fits_seen > 0 {
            return Some(inner.mean_fit_s);
        }
        let cost = inner.step_cost?;
        let (n, total) = inner
            .queue
            .iter()
            .filter_map(|id| inner.jobs.get(id)?.job.as_ref())
            .fold((0usize, 0.0), |(n, t), j| (n + 1, t + cost.fit_s(j.options.iterations, j.options.size)));
        (n > 0).then(|| total / n as f64)
    }

    /// Adds a finished fit's seconds to the mean the retry hint uses: the plain mean of the
    /// fits so far for the first five, a moving average (weight 0.2) after. Why not the moving
    /// average from the start: it began at a guess of 1 s, which the first fits' real time
    /// replaced only slowly. A fresh CPU server with 160 clients at once and 5-step jobs of
    /// 0.2 s hinted 33 s, then still 11 s after eight fits, while its queue of 32 ran dry in
    /// 7 s and its worker waited (README, "Refusals and retry hints").
    fn learn_fit(inner: &mut Inner, seconds: f64) {
        inner.fits_seen = inner.fits_seen.saturating_add(1);
        let weight = (1.0 / f64::from(inner.fits_seen)).max(0.2);
        inner.mean_fit_s += weight * (seconds - inner.mean_fit_s);
    }

    /// Refuses `bytes` more when the queued images, those being decoded (`pending`, less the
    /// request's own) and these would pass the budget. One job is always let in when nothing
    /// else is queued or decoding, however large (within the decode limits), so no image is
    /// refused for ever.
    fn check_budget(&self, inner: &mut Inner, pending: usize, bytes: usize) -> Result<(), ServiceError> {
        let busy = !inner.queue.is_empty() || pending > 0;
        let held = inner.queued_bytes + pending;
        if busy && held + bytes > self.limits.queued_bytes {
            return Err(ServiceError::QueueMemory {
                image_bytes: bytes as u64,
                held_bytes: held as u64,
                budget_bytes: self.limits.queued_bytes as u64,
                retry_after_s: self.retry_after_s(inner),
            });
        }
        Ok(())
    }

    /// Seconds after which `caller`, refused for its `max_active_jobs`, may have room: when
    /// its first job should end (a running one in half a fit, on average; else its first
    /// queued one, after the jobs ahead of it and its own fit), each of its refused clients one
    /// opening (a fit over the jobs running at once) after the last one promised, as
    /// [`MemoryQueue::retry_after_s`] spaces a full queue's. Why not that hint itself: room in
    /// the queue is not what this caller waits for, and its refusals would have pushed the
    /// promises to the callers refused for a full queue later and later.
    fn caller_retry_after_s(&self, inner: &mut Inner, caller: &Arc<str>) -> u64 {
        let at_once = inner.running.max(self.limits.workers).max(1) as f64;
        let fit_s = Self::expected_fit_s(inner).unwrap_or(inner.mean_fit_s).clamp(0.0, 3600.0);
        let opening = Duration::from_secs_f64(fit_s / at_once);
        let mine = |e: &Entry| *e.caller == **caller;
        let first_end = if inner.jobs.values().any(|e| mine(e) && e.state == JobState::Running) {
            fit_s / 2.0
        } else {
            let ahead = inner.queue.iter().position(|id| inner.jobs.get(id).is_some_and(mine)).unwrap_or(0);
            (ahead as f64 + 1.0) * opening.as_secs_f64() + fit_s
        };
        let now = Instant::now();
        let first = now + Duration::from_secs_f64(first_end);
        let at = match inner.caller_promised.get(caller) {
            Some(&p) if p + opening > first => p + opening,
            _ => first,
        };
        inner.caller_promised.insert(caller.clone(), at);
        (at - now).as_secs_f64().ceil().max(1.0) as u64
    }

    /// Refuses a job of `caller` when it has `max_active_jobs` queued and running already,
    /// with [`MemoryQueue::caller_retry_after_s`]'s hint.
    fn check_caller(&self, inner: &mut Inner, caller: &Caller) -> Result<(), ServiceError> {
        let limit = caller.max_active_jobs as usize;
        if limit == 0 {
            return Ok(());
        }
        let active = inner.active.get(&caller.name).copied().unwrap_or(0);
        if active < limit {
            return Ok(());
        }
        Err(ServiceError::CallerQuota {
            caller: caller.name.to_string(),
            active,
            limit,
            retry_after_s: self.caller_retry_after_s(inner, &caller.name),
        })
    }

    /// Refuses a job of a named `caller` that holds `queue.max_caller_share` of the queue's
    /// places already, with [`MemoryQueue::caller_retry_after_s`]'s hint (when its first job
    /// should end; its first queued one is taken before that). The anonymous caller and the
    /// service's token are each the only caller of their server: not bounded.
    fn check_share(&self, inner: &mut Inner, caller: &Caller) -> Result<(), ServiceError> {
        let capacity = self.limits.capacity;
        let places = ((capacity as f64 * self.limits.caller_share).floor() as usize).max(1);
        if places >= capacity || caller.name.is_empty() || *caller.name == *crate::callers::SERVICE {
            return Ok(());
        }
        let queued = inner.queue.iter().filter(|id| inner.jobs.get(*id).is_some_and(|e| e.caller == caller.name)).count();
        if queued < places {
            return Ok(());
        }
        Err(ServiceError::CallerShare {
            caller: caller.name.to_string(),
            queued,
            capacity,
            retry_after_s: self.caller_retry_after_s(inner, &caller.name),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than refusing all further work would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn evict(&self, inner: &mut Inner) {
        let now = Instant::now();
        while let Some(id) = inner.finished.front().cloned() {
            let old = inner
                .jobs
                .get(&id)
                .and_then(|e| e.finished)
                .is_none_or(|t| now.duration_since(t) >= self.limits.retention);
            if !old && inner.retained_bytes <= self.limits.retention_bytes {
                break;
            }
            inner.finished.pop_front();
            if let Some(e) = inner.jobs.remove(&id) {
                inner.retained_bytes = inner.retained_bytes.saturating_sub(e.result_bytes);
                if let Some((k, _)) = e.key {
                    if inner.keys.get(&k) == Some(&id) {
                        inner.keys.remove(&k);
                    }
                }
            }
            inner.expired.insert(id.clone());
            inner.expired_order.push_back(id);
            if inner.expired_order.len() > EXPIRED_MEMORY {
                if let Some(old) = inner.expired_order.pop_front() {
                    inner.expired.remove(&old);
                }
            }
        }
    }

    fn missing(&self, inner: &Inner, id: &str) -> ServiceError {
        if inner.expired.contains(id) {
            ServiceError::Expired {
                id: id.to_string(),
                retention_s: self.limits.retention.as_secs(),
            }
        } else {
            ServiceError::NotFound(id.to_string())
        }
    }

    /// Cancels a queued job at once (its outcome `why`), or asks a running one to stop at its
    /// next step (its worker's outcome says `why`, the first reason it was given).
    fn cancel_as(&self, id: &str, why: pb::Cancelled) -> Result<JobState, ServiceError> {
        let mut inner = self.lock();
        let Some(e) = inner.jobs.get_mut(id) else {
            return Err(self.missing(&inner, id));
        };
        match e.state {
            JobState::Queued => {
                let bytes = e.job.as_ref().map_or(0, image_bytes);
                inner.queued_bytes = inner.queued_bytes.saturating_sub(bytes);
                inner.queue.retain(|q| q != id);
                // Its one outcome line (a job that ran gets it from its worker).
                tracing::info!(job_id = %id, reason = why.reason, "job cancelled while queued");
                self.finish(&mut inner, id, Event::Cancelled(why));
                Ok(JobState::Cancelled)
            }
            JobState::Running => {
                if e.cancel_reason.is_none() {
                    e.cancel_reason = Some(why);
                }
                e.cancel.store(true, Ordering::SeqCst);
                Ok(JobState::Running)
            }
            s => Ok(s),
        }
    }

    /// Cancels the jobs `which` picks as `retryable` (the server is stopping).
    fn cancel_retryable(&self, reason: &str, which: impl Fn(&Entry) -> bool) {
        let ids: Vec<String> = {
            let inner = self.lock();
            inner.jobs.iter().filter(|(_, e)| which(e)).map(|(id, _)| id.clone()).collect()
        };
        for id in ids {
            let _ = self.cancel_as(&id, pb::Cancelled { reason: reason.to_string(), retryable: true });
        }
    }

    /// Sets the outcome of a job, broadcasts it and closes its channel.
    fn finish(&self, inner: &mut Inner, id: &str, outcome: Event) {
        let Some(e) = inner.jobs.get_mut(id) else {
            return;
        };
        if e.outcome.is_some() {
            return;
        }
        let was_running = e.state == JobState::Running;
        let (caller, tags) = (e.caller.clone(), e.tags);
        let outcome = match outcome {
            Event::Cancelled(c) if c.reason.is_empty() => Event::Cancelled(
                e.cancel_reason.clone().unwrap_or_else(|| pb::Cancelled { reason: "cancelled".into(), retryable: false }),
            ),
            o => o,
        };
        e.state = match &outcome {
            Event::Completed(_) => JobState::Completed,
            Event::Failed(_) => JobState::Failed,
            _ => JobState::Cancelled,
        };
        let outcome_name = match e.state {
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            _ => "cancelled",
        };
        self.metrics.job_finished(outcome_name, &e.caller);
        let fit_s = match &outcome {
            Event::Completed(c) => c
                .result
                .as_ref()
                .and_then(|r| r.timings)
                .map(|t| t.fit_seconds),
            _ => None,
        };
        e.result_bytes = outcome_size(&outcome);
        e.finished = Some(Instant::now());
        e.finished_at = unix_now();
        e.job = None;
        if let Some(tx) = e.tx.take() {
            let _ = tx.send(event(id, outcome.clone()));
        }
        e.outcome = Some(outcome);
        let bytes = e.result_bytes;
        if was_running {
            inner.running = inner.running.saturating_sub(1);
        }
        if !was_running {
            inner.turns.withdrawn(&caller, tags);
        }
        if inner.queue.is_empty() && inner.running == 0 {
            inner.turns.idle();
        }
        if let Some(n) = inner.active.get_mut(&caller) {
            *n -= 1;
            if *n == 0 {
                inner.active.remove(&caller);
            }
        }
        if let Some(s) = fit_s {
            Self::learn_fit(inner, s);
        }
        inner.retained_bytes += bytes;
        inner.finished.push_back(id.to_string());
        self.evict(inner);
    }

    fn snapshot(inner: &Inner, id: &str, e: &Entry) -> pb::Job {
        let mut job = pb::Job {
            job_id: id.to_string(),
            state: e.state as i32,
            queue_position: inner.queue.iter().position(|q| q == id).unwrap_or(0) as u32,
            submitted_at: e.submitted_at,
            started_at: e.started_at,
            finished_at: e.finished_at,
            width: e.width,
            height: e.height,
            progress: e.progress,
            caller: e.caller.to_string(),
            ..Default::default()
        };
        match &e.outcome {
            Some(Event::Completed(c)) => job.result = c.result.clone(),
            Some(Event::Failed(f)) => job.failure = Some(f.clone()),
            Some(Event::Cancelled(c)) => job.cancellation = Some(c.clone()),
            _ => {}
        }
        job
    }
}

fn image_bytes(job: &NewJob) -> usize {
    job.image.data.len() * std::mem::size_of::<f32>()
}

fn outcome_size(e: &Event) -> usize {
    match e {
        Event::Completed(c) => c.encoded_len(),
        _ => 256,
    }
}

fn job_id(seq: u64) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seq.to_le_bytes());
    h.update(unix_now().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let d = h.finalize();
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The queue's key for `caller`'s idempotency key `key`: each named caller's keys are its own,
/// so that two clients that happen to use the same key (a study's UID) never meet. The
/// anonymous caller's and the service token's (never both on one server) stay as they were
/// before named callers, so that replicas of both versions find each other's keys during a
/// rolling upgrade.
fn scoped_key(caller: &str, key: &str) -> String {
    if caller.is_empty() || caller == crate::callers::SERVICE {
        key.to_string()
    } else {
        format!("{caller}\u{0}{key}")
    }
}

/// The job `caller`'s key `key` names, as a submission of `fingerprint` gets it (see
/// [`JobQueue::find_key`]).
fn keyed(inner: &Inner, caller: &str, key: &str, fingerprint: &[u8; 32]) -> Result<Option<Submitted>, ServiceError> {
    let Some(id) = inner.keys.get(&scoped_key(caller, key)) else { return Ok(None) };
    let Some(e) = inner.jobs.get(id) else { return Ok(None) };
    if e.key.as_ref().map(|k| &k.1) != Some(fingerprint) {
        return Err(ServiceError::AlreadyExists { key: key.to_string(), job_id: id.clone() });
    }
    let position = inner.queue.iter().position(|q| q == id).unwrap_or(0) as u32;
    Ok(Some(Submitted { id: id.clone(), existing: true, state: e.state, position }))
}

impl JobQueue for MemoryQueue {
    fn reserve(&self, bytes: usize, key: &str, caller: &Caller) -> Result<Reservation, ServiceError> {
        let mut inner = self.lock();
        if inner.draining || inner.closed {
            return Err(ServiceError::Draining);
        }
        let empty = || Reservation { bytes: AtomicUsize::new(0), pending: self.pending.clone() };
        if !key.is_empty() && inner.keys.contains_key(&scoped_key(&caller.name, key)) {
            return Ok(empty());
        }
        self.check_caller(&mut inner, caller)?;
        self.check_share(&mut inner, caller)?;
        if inner.queue.len() >= self.limits.capacity {
            return Err(ServiceError::QueueFull {
                waiting: inner.queue.len(),
                retry_after_s: self.retry_after_s(&mut inner),
            });
        }
        self.check_budget(&mut inner, self.pending.load(Ordering::SeqCst), bytes)?;
        self.pending.fetch_add(bytes, Ordering::SeqCst);
        Ok(Reservation { bytes: AtomicUsize::new(bytes), pending: self.pending.clone() })
    }

    fn submit(&self, job: NewJob) -> Result<Submitted, ServiceError> {
        let mut inner = self.lock();
        if inner.draining || inner.closed {
            return Err(ServiceError::Draining);
        }
        self.evict(&mut inner);
        if let Some((key, fp)) = &job.idempotency {
            if let Some(existing) = keyed(&inner, &job.caller.name, key, fp)? {
                return Ok(existing);
            }
        }
        self.check_caller(&mut inner, &job.caller)?;
        self.check_share(&mut inner, &job.caller)?;
        let bytes = image_bytes(&job);
        if inner.queue.len() >= self.limits.capacity {
            return Err(ServiceError::QueueFull {
                waiting: inner.queue.len(),
                retry_after_s: self.retry_after_s(&mut inner),
            });
        }
        let own = job.reservation.as_ref().map_or(0, |r| r.bytes());
        let others = self.pending.load(Ordering::SeqCst).saturating_sub(own);
        self.check_budget(&mut inner, others, bytes)?;
        if let Some(r) = &job.reservation {
            r.take();
        }
        inner.seq += 1;
        let seq = inner.seq;
        let mut id = job_id(seq) + &self.id_suffix;
        while inner.jobs.contains_key(&id) || inner.expired.contains(&id) {
            id = job_id(seq ^ rand_bits()) + &self.id_suffix;
        }
        let (tx, _) = broadcast::channel(64);
        inner.queued_bytes += bytes;
        let priority = job.priority;
        let tags = if self.limits.fair_share {
            inner.turns.tag(&job.caller.name, job.options.iterations, job.options.size, job.caller.weight)
        } else {
            (0.0, 0.0)
        };
        let tag = tags.0;
        let caller_name = job.caller.name.clone();
        let key = job.idempotency.as_ref().map(|(k, fp)| (scoped_key(&caller_name, k), *fp));
        if let Some((key, _)) = &key {
            inner.keys.insert(key.clone(), id.clone());
        }
        let entry = Entry {
            state: JobState::Queued,
            priority,
            tags,
            seq,
            device: job.device,
            cancel: Arc::new(AtomicBool::new(false)),
            cancel_reason: None,
            key,
            caller: job.caller.name.clone(),
            trace: job.trace.clone(),
            width: job.image.width,
            height: job.image.height,
            submitted: Instant::now(),
            submitted_at: unix_now(),
            started_at: 0.0,
            finished_at: 0.0,
            finished: None,
            started: None,
            progress: None,
            outcome: None,
            result_bytes: 0,
            tx: Some(tx),
            job: Some(job),
        };
        inner.jobs.insert(id.clone(), entry);
        let position = inner
            .queue
            .iter()
            .position(|q| inner.jobs.get(q).is_some_and(|e| e.priority < priority || (e.priority == priority && e.tags.0 > tag)))
            .unwrap_or(inner.queue.len());
        inner.queue.insert(position, id.clone());
        *inner.active.entry(caller_name.clone()).or_default() += 1;
        drop(inner);
        self.metrics.job_submitted(&caller_name);
        self.wake.notify_all();
        Ok(Submitted {
            id,
            existing: false,
            state: JobState::Queued,
            position: position as u32,
        })
    }

    fn find_key(&self, caller: &str, key: &str, fingerprint: &[u8; 32]) -> Result<Option<Submitted>, ServiceError> {
        let mut inner = self.lock();
        self.evict(&mut inner);
        keyed(&inner, caller, key, fingerprint)
    }

    fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.lock().jobs.get(id).map(|e| e.caller.clone())
    }

    fn take(&self, device: DeviceSpec, timeout: Duration, accept: &dyn Fn(&NewJob) -> bool) -> Take {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if inner.closed {
                return Take::Closed;
            }
            let found = inner
                .queue
                .iter()
                .position(|id| {
                    inner
                        .jobs
                        .get(id)
                        .is_some_and(|e| device_serves(device, e.device))
                })
                .filter(|&i| {
                    inner.jobs.get(&inner.queue[i]).and_then(|e| e.job.as_ref()).is_some_and(accept)
                });
            if let Some(i) = found {
                let id = inner.queue.remove(i);
                let Some(e) = inner.jobs.get_mut(&id) else {
                    continue;
                };
                let Some(job) = e.job.take() else { continue };
                e.state = JobState::Running;
                e.started_at = unix_now();
                let tag = e.tags.0;
                let claimed = Claimed {
                    id,
                    cancel: e.cancel.clone(),
                    queued_for: e.submitted.elapsed(),
                    submitted: e.submitted,
                    job,
                };
                inner.running += 1;
                inner.turns.taken(tag);
                inner.queued_bytes = inner.queued_bytes.saturating_sub(image_bytes(&claimed.job));
                self.metrics.job_taken(claimed.queued_for);
                return Take::Job(Box::new(claimed));
            }
            let now = Instant::now();
            if now >= deadline {
                return Take::Idle;
            }
            inner = self
                .wake
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn publish(&self, id: &str, ev: Event) {
        let mut inner = self.lock();
        if is_outcome(&ev) {
            self.finish(&mut inner, id, ev);
            return;
        }
        let Some(e) = inner.jobs.get_mut(id) else {
            return;
        };
        if e.outcome.is_some() {
            return;
        }
        match &ev {
            Event::Started(s) => e.started = Some(s.clone()),
            Event::Progress(p) => e.progress = Some(*p),
            _ => {}
        }
        if let Some(tx) = &e.tx {
            let _ = tx.send(event(id, ev));
        }
    }

    fn watch(&self, id: &str) -> Result<Watch, ServiceError> {
        let inner = self.lock();
        let Some(e) = inner.jobs.get(id) else {
            return Err(self.missing(&inner, id));
        };
        let mut replay = Vec::new();
        if e.state == JobState::Queued {
            let position = inner.queue.iter().position(|q| q == id).unwrap_or(0) as u32;
            replay.push(event(id, Event::Queued(pb::Queued { position })));
        }
        if let Some(s) = &e.started {
            replay.push(event(id, Event::Started(s.clone())));
        }
        if let Some(p) = e.progress {
            replay.push(event(id, Event::Progress(p)));
        }
        if let Some(o) = &e.outcome {
            replay.push(event(id, o.clone()));
        }
        Ok(Watch {
            replay,
            live: e.tx.as_ref().map(|tx| tx.subscribe()),
            trace: e.trace.clone(),
        })
    }

    fn get(&self, id: &str) -> Result<pb::Job, ServiceError> {
        let mut inner = self.lock();
        self.evict(&mut inner);
        match inner.jobs.get(id) {
            Some(e) => Ok(Self::snapshot(&inner, id, e)),
            None => Err(self.missing(&inner, id)),
        }
    }

    fn cancel(&self, id: &str, reason: &str) -> Result<JobState, ServiceError> {
        self.cancel_as(id, pb::Cancelled { reason: reason.to_string(), retryable: false })
    }

    fn list(&self, state: Option<JobState>, limit: usize, owner: Option<&str>) -> Vec<pb::Job> {
        let mut inner = self.lock();
        self.evict(&mut inner);
        let mut v: Vec<(&String, &Entry)> = inner
            .jobs
            .iter()
            .filter(|(_, e)| state.is_none_or(|s| e.state == s) && owner.is_none_or(|o| *e.caller == *o))
            .collect();
        v.sort_by_key(|(_, e)| std::cmp::Reverse(e.seq));
        v.into_iter()
            .take(limit)
            .map(|(id, e)| {
                let mut j = Self::snapshot(&inner, id, e);
                if let Some(r) = &mut j.result {
                    r.labels_png.clear();
                    r.mask_png.clear();
                    r.mask_dicom.clear();
                    r.labels_dicom.clear();
                }
                j
            })
            .collect()
    }

    fn drain(&self) {
        self.lock().draining = true;
    }

    fn cancel_all(&self, reason: &str) {
        self.cancel_retryable(reason, |e| e.outcome.is_none());
    }

    fn cancel_queued(&self, reason: &str) {
        self.cancel_retryable(reason, |e| e.state == JobState::Queued);
    }

    fn active(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + inner.running
    }

    fn warmed_up(&self, cost: StepCost) {
        let mut inner = self.lock();
        inner.costs_seen = inner.costs_seen.saturating_add(1);
        let weight = 1.0 / f64::from(inner.costs_seen);
        let mean = inner.step_cost.get_or_insert(cost);
        mean.fixed_s += weight * (cost.fixed_s - mean.fixed_s);
        mean.per_pixel_s += weight * (cost.per_pixel_s - mean.per_pixel_s);
    }

    fn stats(&self) -> QueueStats {
        let inner = self.lock();
        QueueStats {
            queued: inner.queue.len(),
            running: inner.running,
            image_bytes: inner.queued_bytes + self.pending.load(Ordering::SeqCst),
            image_bytes_limit: self.limits.queued_bytes,
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

fn rand_bits() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3net_imaging::ImageKind;

    fn job(priority: i32, device: DeviceSpec, key: Option<&str>) -> NewJob {
        let image = Image {
            width: 4,
            height: 4,
            channels: 1,
            data: vec![0.5; 16],
            kind: ImageKind::Grey,
        };
        NewJob {
            image: Arc::new(image),
            options: FitOptions::default(),
            device,
            priority,
            applied: pb::AppliedOptions::default(),
            idempotency: key.map(|k| (k.to_string(), [7; 32])),
            trace: TraceContext::default(),
            pixel_spacing: None,
            dicom_seg: None,
            reservation: None,
            input: InputSummary::default(),
            caller: Caller::anonymous(),
        }
    }

    fn q_limits() -> QueueLimits {
        QueueLimits {
            capacity: 8,
            retention: Duration::from_secs(60),
            retention_bytes: 1 << 20,
            queued_bytes: 1 << 20,
            workers: 1,
            fair_share: true,
            caller_share: 1.0,
        }
    }

    fn queue(retention: Duration, retention_bytes: usize) -> MemoryQueue {
        MemoryQueue::new(QueueLimits { retention, retention_bytes, ..q_limits() })
    }

    fn complete(q: &MemoryQueue, id: &str, png_bytes: usize) {
        let result = pb::SegmentationResult {
            labels_png: vec![1; png_bytes],
            ..Default::default()
        };
        q.publish(
            id,
            Event::Completed(pb::Completed {
                result: Some(result),
            }),
        );
    }

    fn take_id(q: &MemoryQueue, device: DeviceSpec) -> Option<String> {
        match q.take(device, Duration::ZERO, &|_| true) {
            Take::Job(c) => Some(c.id),
            _ => None,
        }
    }

    /// The retry hint of a full queue counts every job a worker runs at once (a GPU worker's
    /// stack), not one per worker.
    #[test]
    fn retry_hint_follows_the_jobs_running_at_once() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        for _ in 0..8 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        let hint = full_queue_hint;
        // One worker, nothing running yet, a mean fit of 1 s: 8 jobs ahead, 8 s.
        assert_eq!(hint(&q), 8);
        // The worker stacks four of them: 4 queued + 4 running finish four at a time.
        for _ in 0..4 {
            take_id(&q, DeviceSpec::Cpu).unwrap();
        }
        for _ in 0..4 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        assert_eq!(hint(&q), 3); // 12 ahead, 4 at once, 1 s each
    }

    /// Ends the next queued job on `q`'s worker as a completed fit of `seconds`.
    fn end_fit(q: &MemoryQueue, seconds: f64) {
        let id = take_id(q, DeviceSpec::Cpu).expect("a queued job");
        let timings = pb::Timings { fit_seconds: seconds, ..Default::default() };
        let result = pb::SegmentationResult { timings: Some(timings), ..Default::default() };
        q.publish(&id, Event::Completed(pb::Completed { result: Some(result) }));
    }

    fn full_queue_hint(q: &MemoryQueue) -> u64 {
        match q.submit(job(0, DeviceSpec::Auto, None)) {
            Err(ServiceError::QueueFull { retry_after_s, .. }) => retry_after_s,
            other => panic!("expected a full queue, got {:?}", other.map(|s| s.id)),
        }
    }

    /// The hint's mean fit is the first fit's time as soon as one ends (not a fifth of the way
    /// from the 1 s guess to it), then follows the fits as a moving average.
    #[test]
    fn retry_hint_learns_the_fit_time_from_the_first_fits() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let mean = |q: &MemoryQueue| q.lock().mean_fit_s;
        for _ in 0..8 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        assert_eq!(mean(&q), 1.0, "the guess");
        end_fit(&q, 4.0);
        assert_eq!(mean(&q), 4.0, "the first fit's 4 s, not 0.8·1 + 0.2·4");
        end_fit(&q, 2.0);
        assert_eq!(mean(&q), 3.0, "their mean");
        for _ in 0..3 {
            end_fit(&q, 3.0);
        }
        end_fit(&q, 8.0); // the sixth: weight 0.2
        assert!((mean(&q) - 4.0).abs() < 1e-12, "{}", mean(&q));
    }

    /// Callers refused together are told to come back one opening apart (the mean fit over
    /// the jobs running at once), each after the last one promised; before any fit has ended,
    /// all of them the time the jobs ahead take by the 1 s guess.
    #[test]
    fn retry_hints_space_callers_refused_together() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        for _ in 0..8 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        let cold: Vec<u64> = (0..4).map(|_| full_queue_hint(&q)).collect();
        assert_eq!(cold, [8, 8, 8, 8], "no fit ended: the queue's time by the guess, for everyone");
        end_fit(&q, 1.2);
        q.submit(job(0, DeviceSpec::Auto, None)).expect("the ended job's place");
        let warm: Vec<u64> = (0..5).map(|_| full_queue_hint(&q)).collect();
        assert_eq!(warm, [2, 3, 4, 5, 6], "1.2 s apart, rounded up");
        // A stack of four running: openings come four times as often, after those promised.
        let q = queue(Duration::from_secs(60), 1 << 20);
        for _ in 0..8 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        end_fit(&q, 1.2);
        for _ in 0..4 {
            take_id(&q, DeviceSpec::Cpu).unwrap();
        }
        for _ in 0..5 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        let stacked: Vec<u64> = (0..5).map(|_| full_queue_hint(&q)).collect();
        assert_eq!(stacked, [1, 1, 1, 2, 2], "0.3 s apart");
    }

    /// Before any fit has ended, the workers' warm-up cost of a step, over the queued jobs'
    /// own steps and grids, spaces the refused callers; the fits that end take over from it.
    #[test]
    fn a_fresh_queue_spaces_refused_callers_by_the_warm_up() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let small = |iterations, size| NewJob {
            options: FitOptions { iterations, size, ..FitOptions::default() },
            ..job(0, DeviceSpec::Auto, None)
        };
        for _ in 0..4 {
            q.submit(small(5, 64)).unwrap();
            q.submit(small(10, 128)).unwrap();
        }
        // Two workers measured 0.1 and 0.3 s of fixed cost, 2e-6 and 4e-6 s a pixel: 0.2 +
        // 3e-6·S² a step. Five steps at 64² take 1.06 s, ten at 128² 2.49 s: 1.78 s apart.
        q.warmed_up(StepCost { fixed_s: 0.1, per_pixel_s: 2e-6 });
        q.warmed_up(StepCost { fixed_s: 0.3, per_pixel_s: 4e-6 });
        let fresh: Vec<u64> = (0..4).map(|_| full_queue_hint(&q)).collect();
        assert_eq!(fresh, [2, 4, 6, 8], "1.78 s apart, rounded up");
        // The first fit's time replaces the estimate; its promises start after those made.
        end_fit(&q, 0.5);
        q.submit(small(5, 64)).expect("the ended job's place");
        let hint = full_queue_hint(&q);
        assert_eq!(hint, 8, "after the 7.1 s promised, 0.5 s on");
    }

    #[test]
    fn priority_then_arrival_and_device_routing() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let a = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        let gpu = q.submit(job(9, DeviceSpec::Cuda(0), None)).unwrap().id;
        let b = q.submit(job(0, DeviceSpec::Cpu, None)).unwrap().id;
        let c = q.submit(job(3, DeviceSpec::Auto, None)).unwrap();
        assert_eq!(c.position, 1, "after the priority-9 job");
        // A CPU worker skips the CUDA job.
        assert_eq!(take_id(&q, DeviceSpec::Cpu).as_deref(), Some(c.id.as_str()));
        assert_eq!(take_id(&q, DeviceSpec::Cpu).as_deref(), Some(a.as_str()));
        assert_eq!(
            take_id(&q, DeviceSpec::Cuda(0)).as_deref(),
            Some(gpu.as_str())
        );
        assert_eq!(
            take_id(&q, DeviceSpec::Cuda(0)),
            None,
            "the CPU-only job stays for a CPU worker"
        );
        assert_eq!(take_id(&q, DeviceSpec::Cpu).as_deref(), Some(b.as_str()));
        assert_eq!(q.active(), 4);
        q.close();
        assert!(matches!(
            q.take(DeviceSpec::Cpu, Duration::from_secs(5), &|_| true),
            Take::Closed
        ));
    }

    fn caller(name: &str, max_active_jobs: u32) -> Caller {
        Caller { max_active_jobs, ..Caller::named(name) }
    }

    fn job_of(who: &Caller, key: Option<&str>) -> NewJob {
        NewJob { caller: who.clone(), ..job(0, DeviceSpec::Auto, key) }
    }

    /// A caller with `max_active_jobs` queued and running is refused, with a hint, until one of
    /// its jobs ends; other callers are not. A key it used already is still found.
    #[test]
    fn a_callers_active_jobs_are_bounded() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let (research, clinic) = (caller("research", 2), caller("clinic", 0));
        let first = q.submit(job_of(&research, Some("k1"))).unwrap().id;
        let _second = q.submit(job_of(&research, None)).unwrap();
        let Take::Job(running) = q.take(DeviceSpec::Cpu, Duration::ZERO, &|_| true) else { panic!("no job") };
        assert_eq!(running.id, first, "a running job counts too");
        for refused in [q.submit(job_of(&research, None)).map(|s| s.id), q.reserve(64, "", &research).map(|_| String::new())] {
            match refused {
                Err(ServiceError::CallerQuota { caller, active: 2, limit: 2, retry_after_s }) => {
                    assert_eq!(caller, "research");
                    assert!(retry_after_s >= 1);
                }
                other => panic!("expected the caller's quota, got {other:?}"),
            }
        }
        // The same request sent again finds its job: not a new one, so not refused.
        assert!(q.submit(job_of(&research, Some("k1"))).unwrap().existing);
        for _ in 0..3 {
            q.submit(job_of(&clinic, None)).expect("another caller keeps its room");
        }
        q.submit(job(0, DeviceSpec::Auto, None)).expect("the anonymous caller has no quota");
        complete(&q, &first, 10);
        q.submit(job_of(&research, None)).expect("one of its jobs ended: room again");
        assert!(matches!(q.submit(job_of(&research, None)), Err(ServiceError::CallerQuota { .. })));
    }

    /// A caller over its quota is told when its first job should end, its refused clients one
    /// opening apart; the full queue's promises are not moved by it.
    #[test]
    fn a_caller_over_its_quota_is_told_when_its_own_jobs_end() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let research = caller("research", 1);
        {
            let mut inner = q.lock();
            inner.mean_fit_s = 4.0;
            inner.fits_seen = 10;
        }
        let queued = q.submit(job_of(&research, None)).unwrap().id;
        let hint = |q: &MemoryQueue| match q.submit(job_of(&research, None)) {
            Err(ServiceError::CallerQuota { retry_after_s, .. }) => retry_after_s,
            other => panic!("expected the caller's quota, got {other:?}"),
        };
        // Its job is first in line: one opening (4 s, one worker) to start, 4 s to fit.
        assert_eq!(hint(&q), 8);
        assert_eq!(hint(&q), 12, "the next refused client: one opening later");
        assert!(q.lock().promised.is_none(), "the full queue's promises are its own");
        // Once its job runs: half a fit, on average (after the promises already made).
        let Take::Job(c) = q.take(DeviceSpec::Cpu, Duration::ZERO, &|_| true) else { panic!("no job") };
        assert_eq!(c.id, queued);
        q.lock().caller_promised.clear();
        assert_eq!(hint(&q), 2);
    }

    fn ids_in_line(q: &MemoryQueue) -> Vec<String> {
        q.lock().queue.clone()
    }

    /// Within a priority the callers take turns: a caller with nothing queued is next, even
    /// when another has a backlog and nothing is running (one worker between jobs); each
    /// caller's jobs keep their arrival order, a submission is told its place, and a higher
    /// priority still goes first. Without `fair_share`: arrival order.
    #[test]
    fn callers_take_turns_within_a_priority() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let (research, clinic) = (caller("research", 0), caller("clinic", 0));
        let r: Vec<String> = (0..4).map(|_| q.submit(job_of(&research, None)).unwrap().id).collect();
        assert_eq!(take_id(&q, DeviceSpec::Cpu).as_deref(), Some(r[0].as_str()));
        complete(&q, &r[0], 10);
        let c1 = q.submit(job_of(&clinic, None)).unwrap();
        assert_eq!(c1.position, 0, "nothing running, research's backlog queued: the clinic is next");
        let c2 = q.submit(job_of(&clinic, None)).unwrap();
        assert_eq!(c2.position, 2, "then one each, research's next having come first");
        assert_eq!(ids_in_line(&q), vec![c1.id.clone(), r[1].clone(), c2.id.clone(), r[2].clone(), r[3].clone()]);
        assert_eq!(q.get(&c2.id).unwrap().queue_position, 2);
        let urgent = q.submit(NewJob { priority: 5, ..job_of(&research, None) }).unwrap();
        assert_eq!(urgent.position, 0, "a priority goes before any turn");
        for want in [&urgent.id, &c1.id, &r[1], &c2.id, &r[2], &r[3]] {
            assert_eq!(take_id(&q, DeviceSpec::Cpu).as_deref(), Some(want.as_str()));
        }
        // While research's jobs run, its work is remembered: the clinic goes first.
        let (r5, c3) = (q.submit(job_of(&research, None)).unwrap().id, q.submit(job_of(&clinic, None)).unwrap().id);
        assert_eq!(ids_in_line(&q), vec![c3.clone(), r5.clone()]);
        for id in [&urgent.id, &c1.id, &r[1], &c2.id, &r[2], &r[3]] {
            complete(&q, id, 10);
        }
        q.cancel(&r5, "test").unwrap();
        q.cancel(&c3, "test").unwrap();
        // An idle server starts everyone afresh: arrival order among newcomers.
        let again: Vec<String> = [&research, &clinic, &research].iter().map(|c| q.submit(job_of(c, None)).unwrap().id).collect();
        assert_eq!(ids_in_line(&q), again);

        let q = MemoryQueue::new(QueueLimits { fair_share: false, ..q_limits() });
        let ids: Vec<String> = [&research, &research, &clinic].iter().map(|c| q.submit(job_of(c, None)).unwrap().id).collect();
        assert_eq!(ids_in_line(&q), ids, "queue.fair_share = false: arrival order");
    }

    /// A named caller holds at most `max_caller_share` of the queue's places, so that a queue
    /// it filled still has room for the others; the anonymous and service callers are not
    /// bounded; a running job frees a place.
    #[test]
    fn one_caller_keeps_room_in_the_queue_for_the_others() {
        let q = MemoryQueue::new(QueueLimits { caller_share: 0.75, ..q_limits() });
        let (research, clinic) = (caller("research", 0), caller("clinic", 0));
        for _ in 0..6 {
            q.submit(job_of(&research, None)).expect("6 of 8 places");
        }
        for refused in [q.submit(job_of(&research, None)).map(drop), q.reserve(64, "", &research).map(drop)] {
            match refused {
                Err(ServiceError::CallerShare { caller, queued: 6, capacity: 8, retry_after_s }) => {
                    assert_eq!(caller, "research");
                    assert!(retry_after_s >= 1);
                }
                other => panic!("expected the caller's share, got {other:?}"),
            }
        }
        q.submit(job_of(&clinic, None)).expect("room for another caller");
        take_id(&q, DeviceSpec::Cpu).expect("a job runs");
        q.submit(job_of(&research, None)).expect("its running job left the queue: a place again");
        let q = MemoryQueue::new(QueueLimits { caller_share: 0.75, ..q_limits() });
        for who in [Caller::anonymous(), Caller::named(crate::callers::SERVICE)] {
            for _ in 0..4 {
                q.submit(job_of(&who, None)).expect("not bounded by a share");
            }
        }
        assert!(matches!(q.submit(job(0, DeviceSpec::Auto, None)), Err(ServiceError::QueueFull { .. })));
    }

    /// Each caller's idempotency keys are its own; listings and owners follow the callers.
    #[test]
    fn callers_keep_their_keys_and_jobs_apart() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let (a, b) = (caller("a", 0), caller("b", 0));
        let ja = q.submit(job_of(&a, Some("study-1"))).unwrap();
        let jb = q.submit(NewJob { idempotency: Some(("study-1".into(), [9; 32])), ..job_of(&b, None) }).unwrap();
        assert!(!jb.existing && ja.id != jb.id, "b's key is not a's, even for another image");
        assert_eq!(q.find_key("a", "study-1", &[7; 32]).unwrap().unwrap().id, ja.id);
        assert_eq!(q.find_key("b", "study-1", &[9; 32]).unwrap().unwrap().id, jb.id);
        assert!(q.find_key("c", "study-1", &[7; 32]).unwrap().is_none());
        assert!(q.find_key("", "study-1", &[7; 32]).unwrap().is_none());
        assert_eq!(q.owner(&ja.id).as_deref(), Some("a"));
        assert_eq!(q.owner("nope"), None);
        let ids = |owner| q.list(None, 10, owner).into_iter().map(|j| (j.job_id, j.caller)).collect::<Vec<_>>();
        assert_eq!(ids(Some("b")), vec![(jb.id.clone(), "b".to_string())]);
        assert_eq!(ids(None).len(), 2);
        assert!(ids(Some("c")).is_empty());
        assert_eq!(q.get(&ja.id).unwrap().caller, "a");
    }

    /// A batching worker asks whether the next job fits its batch: when not, nothing is
    /// taken, not even a later job that would fit (it must not overtake the first).
    #[test]
    fn take_asks_about_the_next_job_only() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let first = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        let _second = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        let never = |_: &NewJob| false;
        assert!(matches!(q.take(DeviceSpec::Cpu, Duration::ZERO, &never), Take::Idle));
        match q.take(DeviceSpec::Cpu, Duration::ZERO, &|_| true) {
            Take::Job(c) => assert_eq!(c.id, first),
            other => panic!("expected the first job, got {other:?}"),
        }
        assert_eq!(q.stats().queued, 1);
    }

    /// A key's job is found without a new job (another replica's question, or a retry before
    /// its image is decoded), also while draining; another request's fingerprint is refused.
    #[test]
    fn keys_are_found_as_a_submission_would_find_them() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        assert!(q.find_key("", "k", &[7; 32]).unwrap().is_none());
        let first = q.submit(job(0, DeviceSpec::Auto, Some("k"))).unwrap();
        q.drain();
        let found = q.find_key("", "k", &[7; 32]).unwrap().expect("the key's job");
        assert_eq!((found.id.as_str(), found.existing, found.state), (first.id.as_str(), true, JobState::Queued));
        let e = q.find_key("", "k", &[8; 32]).unwrap_err();
        assert!(matches!(&e, ServiceError::AlreadyExists { job_id, .. } if *job_id == first.id), "{e}");
        assert!(q.find_key("", "other", &[7; 32]).unwrap().is_none());
        assert_eq!(q.stats().queued, 1);
    }

    #[test]
    fn memory_budget_evicts_the_oldest_results_first() {
        let q = queue(Duration::from_secs(3600), 2500);
        let ids: Vec<String> = (0..3)
            .map(|_| q.submit(job(0, DeviceSpec::Auto, Some("k"))).unwrap().id)
            .collect();
        assert!(
            ids.iter().all(|i| i == &ids[0]),
            "same key, same fingerprint: one job"
        );
        let second = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        assert_eq!(
            take_id(&q, DeviceSpec::Cpu).as_deref(),
            Some(ids[0].as_str())
        );
        assert_eq!(
            take_id(&q, DeviceSpec::Cpu).as_deref(),
            Some(second.as_str())
        );
        complete(&q, &ids[0], 1000);
        complete(&q, &second, 1000);
        assert_eq!(q.get(&ids[0]).unwrap().state, JobState::Completed as i32);
        let third = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        take_id(&q, DeviceSpec::Cpu);
        complete(&q, &third, 1000);
        // 3 × ~1000 bytes > 2500: the first result went.
        let err = q.get(&ids[0]).unwrap_err();
        assert!(matches!(err, ServiceError::Expired { .. }), "{err:?}");
        assert!(err.to_string().contains("expired"));
        assert!(q.get(&second).is_ok() && q.get(&third).is_ok());
        assert!(matches!(
            q.get("nope").unwrap_err(),
            ServiceError::NotFound(_)
        ));
        // The key went with its job.
        assert_ne!(
            q.submit(job(0, DeviceSpec::Auto, Some("k"))).unwrap().id,
            ids[0]
        );
    }

    #[test]
    fn watch_replays_without_gaps_and_ends_with_the_outcome() {
        let q = queue(Duration::from_secs(60), 1 << 20);
        let id = q.submit(job(0, DeviceSpec::Auto, None)).unwrap().id;
        let w = q.watch(&id).unwrap();
        assert!(matches!(
            w.replay[..],
            [pb::JobEvent {
                event: Some(Event::Queued(_)),
                ..
            }]
        ));
        let mut live = w.live.unwrap();
        take_id(&q, DeviceSpec::Cpu);
        q.publish(
            &id,
            Event::Started(pb::Started {
                worker: "w".into(),
                device: "cpu".into(),
            }),
        );
        q.publish(
            &id,
            Event::Progress(pb::Progress {
                iteration: 1,
                ..Default::default()
            }),
        );
        assert_eq!(q.cancel(&id, "test").unwrap(), JobState::Running);
        q.publish(&id, Event::Cancelled(pb::Cancelled::default()));
        let mut got = Vec::new();
        while let Ok(e) = live.try_recv() {
            got.push(e.event.unwrap());
        }
        assert!(
            matches!(got[..], [Event::Started(_), Event::Progress(_), Event::Cancelled(ref c)] if c.reason == "test"),
            "{got:?}"
        );
        let late = q.watch(&id).unwrap();
        assert!(late.live.is_none());
        assert_eq!(late.replay.len(), 3);
        assert_eq!(q.active(), 0);
    }

    /// Reservations hold the budget from before the decode: a second one that would pass it is
    /// refused while the first is held, the drop gives the bytes back, a submit takes its own
    /// over (not counted twice), and a known idempotency key needs none.
    #[test]
    fn reservations_hold_the_budget_until_submit_or_drop() {
        // The budget: 1 MiB; each test job's image is 64 bytes.
        let q = queue(Duration::from_secs(60), 1 << 20);
        let first = q.reserve(700_000, "", &Caller::anonymous()).expect("nothing queued: always let in");
        assert_eq!(q.pending.load(Ordering::SeqCst), 700_000);
        match q.reserve(400_000, "", &Caller::anonymous()) {
            Err(ServiceError::QueueMemory { image_bytes: 400_000, held_bytes: 700_000, budget_bytes: 1_048_576, .. }) => {}
            other => panic!("{other:?}"),
        }
        let small = q.reserve(300_000, "", &Caller::anonymous()).expect("fits beside the first");
        drop(first);
        assert_eq!(q.pending.load(Ordering::SeqCst), 300_000);

        // Submitting with its reservation: the job's bytes are queued, the reservation is spent.
        let r = Arc::new(q.reserve(64, "k", &Caller::anonymous()).unwrap());
        let id = q.submit(NewJob { reservation: Some(r.clone()), ..job(0, DeviceSpec::Auto, Some("k")) }).unwrap().id;
        assert_eq!((r.bytes(), q.pending.load(Ordering::SeqCst), q.lock().queued_bytes), (0, 300_000, 64));
        drop(r);
        assert_eq!(q.pending.load(Ordering::SeqCst), 300_000, "a spent reservation gives nothing back");
        // The same key again: its job exists, so no budget is held for it.
        let again = q.reserve(1 << 30, "k", &Caller::anonymous()).expect("an existing key is never refused");
        assert_eq!(again.bytes(), 0);
        assert_eq!(q.submit(job(0, DeviceSpec::Auto, Some("k"))).unwrap().id, id);
        drop(small);
        assert_eq!(q.pending.load(Ordering::SeqCst), 0);

        // Capacity is checked at reservation too.
        for _ in 0..7 {
            q.submit(job(0, DeviceSpec::Auto, None)).unwrap();
        }
        assert!(matches!(q.reserve(64, "", &Caller::anonymous()), Err(ServiceError::QueueFull { waiting: 8, .. })));
        q.drain();
        assert!(matches!(q.reserve(64, "", &Caller::anonymous()), Err(ServiceError::Draining)));
    }
}
