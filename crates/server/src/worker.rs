//! Worker threads: each takes jobs for its device from the queue and runs the engine.
//!
//! Fits are blocking and CPU/GPU heavy, so they run on plain OS threads, never on the async
//! runtime. Each worker trains up to `batch` jobs together as one `s3net_model::Batch`; the
//! concurrency bound is workers × batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3net_imaging::{encode_cluster_segmentation, encode_labels_png, encode_mask_png, encode_segmentation, Algorithm, Image};
use s3net_model::{refit_options, Batch, DeviceSpec, FitJob, FitOptions, ModelError, Progress, Segmentation};
use tracing::{info, info_span, warn};

use crate::error::ServiceError;
use crate::jobs::{Claimed, DicomOutputs, JobQueue, NewJob, Take};
use crate::metrics::Metrics;
use crate::pb::{self, job_event::Event};

/// One worker: a name for events and logs, the device it runs fits on, and how many jobs it
/// trains together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlot {
    pub name: String,
    pub device: DeviceSpec,
    /// Jobs trained as one batch (a stack of networks, see `s3net_model::Batch`); 1 runs one
    /// job at a time.
    pub batch: usize,
}

/// The worker slots for a machine with `cuda_devices` GPUs.
pub fn plan(
    cpu_workers: Option<usize>,
    gpu_per_device: Option<usize>,
    cuda_devices: usize,
    cpu_batch: usize,
    gpu_batch: usize,
) -> Vec<WorkerSlot> {
    let mut slots = Vec::new();
    for d in 0..cuda_devices {
        for i in 0..gpu_per_device.unwrap_or(2) {
            slots.push(WorkerSlot {
                name: format!("cuda:{d}-{i}"),
                device: DeviceSpec::Cuda(d),
                batch: gpu_batch.max(1),
            });
        }
    }
    let cpu = cpu_workers.unwrap_or(if cuda_devices == 0 { 1 } else { 0 });
    for i in 0..cpu {
        slots.push(WorkerSlot {
            name: format!("cpu-{i}"),
            device: DeviceSpec::Cpu,
            batch: cpu_batch.max(1),
        });
    }
    slots
}

/// Starts one thread per slot; they exit once the queue is closed and their jobs are done.
/// `refits`: how many times a job whose foreground comes out empty is fitted again with another
/// seed (`s3net_model::refit_options`). With `warming`, each worker first warms its device up
/// (`s3net_model::warm_up`) and then counts itself off.
pub fn spawn(
    queue: Arc<dyn JobQueue>,
    slots: &[WorkerSlot],
    progress_interval: Duration,
    refits: usize,
    metrics: Arc<Metrics>,
    warming: Option<&Warming>,
) -> Vec<std::thread::JoinHandle<()>> {
    slots
        .iter()
        .map(|slot| {
            let (queue, slot, metrics) = (queue.clone(), slot.clone(), metrics.clone());
            let mut warm = warming.map(|w| Warm(w.clone()));
            std::thread::Builder::new()
                .name(format!("s3net-{}", slot.name))
                .spawn(move || {
                    supervise(&slot.name, RESTART_PAUSE, || serve(&queue, &slot, progress_interval, refits, &metrics, &mut warm))
                })
                .expect("cannot spawn a worker thread")
        })
        .collect()
}

/// The workers still warming up, and the options they warm up with. Why a count: the server
/// reports ready (health SERVING) only once every worker can run a job at full speed.
#[derive(Clone, Debug)]
pub struct Warming {
    left: Arc<tokio::sync::watch::Sender<usize>>,
    opts: Arc<FitOptions>,
}

impl Warming {
    /// `workers` workers, none warm yet, to warm up with `opts` (those of a job that sets none).
    pub fn new(workers: usize, opts: FitOptions) -> Self {
        Warming { left: Arc::new(tokio::sync::watch::Sender::new(workers)), opts: Arc::new(opts) }
    }

    /// Resolves once no worker is warming up.
    pub async fn done(&self) {
        let mut rx = self.left.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// How many workers are still warming up.
    pub fn left(&self) -> usize {
        *self.left.borrow()
    }
}

/// One worker's place in [`Warming`], given up when dropped: after its warm-up, when its device
/// cannot be used, or when its thread ends in any other way, so the count always reaches zero.
struct Warm(Warming);

impl Drop for Warm {
    fn drop(&mut self) {
        self.0.left.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Warms `device` up for `slot` with `opts` (see `s3net_model::warm_up`; stacks of jobs only
/// where the slot makes them) and tells `queue` and `metrics` what a step cost; a failure is
/// logged and the worker goes on: its jobs then fail or succeed on their own.
fn warm_up(queue: &Arc<dyn JobQueue>, metrics: &Metrics, slot: &WorkerSlot, device: tch::Device, opts: &FitOptions) {
    match std::panic::catch_unwind(|| s3net_model::warm_up(device, opts, slot.batch > 1)) {
        Ok(Ok(w)) => {
            let step_s = w.cost.step_s(opts.size);
            info!(worker = %slot.name, seconds = w.took.as_secs_f64(), step_seconds = step_s, grid = opts.size, "worker warmed up");
            queue.warmed_up(w.cost);
            metrics.warmed_up(slot.device, step_s);
        }
        Ok(Err(e)) => warn!(worker = %slot.name, error = %e, "the warm-up failed; the worker takes jobs anyway"),
        Err(p) => {
            let what = s3net_model::panic_message(&*p).unwrap_or("");
            warn!(worker = %slot.name, panic = what, "the warm-up panicked; the worker takes jobs anyway");
        }
    }
}

/// How long a worker waits before it starts again after a panic (see [`supervise`]).
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs a worker's loop until it returns (the queue closed); a panic that unwinds out of it —
/// a bug outside the places that catch one per step or per job — is logged, and the loop
/// starts again after `pause`, so the server keeps its workers. The jobs the loop held fail
/// with INTERNAL as they are dropped (see [`Running`]'s Drop), and its gauges give back their
/// share.
fn supervise(name: &str, pause: Duration, mut body: impl FnMut()) {
    loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut body)) {
            Ok(()) => return,
            Err(p) => {
                let what = s3net_model::panic_message(&*p).unwrap_or("");
                tracing::error!(worker = name, panic = what, "the worker panicked; its jobs failed; it starts again in {:?}", pause);
                std::thread::sleep(pause);
            }
        }
    }
}

/// A worker's share of `s3net_jobs_training`, given back when it is dropped (also when a
/// panic unwinds through the worker).
struct Training<'a> {
    metrics: &'a Metrics,
    device: DeviceSpec,
    now: i64,
}

impl Training<'_> {
    fn set(&mut self, jobs: usize) {
        self.metrics.jobs_training(self.device, jobs as i64 - self.now);
        self.now = jobs as i64;
    }
}

impl Drop for Training<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// A job in a worker's batch, with what its outcome needs.
struct Running {
    claimed: Claimed,
    /// The job's span, a child of the RPC that created it; it ends when the job does.
    span: tracing::Span,
    started: Instant,
    /// Fits made again because the foreground came out empty (`s3net_model::refit_options`).
    refits: usize,
    /// Where its outcome goes; [`finish`] publishes it, else dropping it does (see Drop).
    queue: Arc<dyn JobQueue>,
    published: bool,
}

impl Running {
    fn new(queue: &Arc<dyn JobQueue>, claimed: Claimed, span: tracing::Span) -> Running {
        Running { claimed, span, started: Instant::now(), refits: 0, queue: queue.clone(), published: false }
    }
}

impl Drop for Running {
    /// A job dropped without an outcome (a panic that unwound through the worker, a finisher
    /// thread gone) fails with INTERNAL instead of staying "running" for ever: its client
    /// would wait until its deadline, and a shutdown for ever, for an outcome no one would
    /// publish. (The first outcome published is the one that counts; a later one is ignored.)
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let why = if std::thread::panicking() {
            "the server failed while it handled this job (a panic; see the server's log); submit it again"
        } else {
            "the server dropped this job without an outcome (a fault; see the server's log); submit it again"
        };
        let event = failed(&self.span, ServiceError::Internal(why.into()));
        self.queue.publish(&self.claimed.id, event);
    }
}

/// What a worker hands its finisher thread: a fit that ended (its foreground is still to be
/// found), or a segmentation that only needs its result made and published. Failures and
/// cancellations are published by the worker itself: they cost nothing to make, and so a
/// cancelled job's outcome is out before the worker takes the next job.
enum Ended {
    Fit(Running, s3net_model::FitOutput),
    Segmented(Running, Segmentation),
}

/// What the finisher answers for each [`Ended`]: the outcome is published, or the job is to be
/// fitted again with these options (its foreground came out empty).
enum Back {
    Published,
    Refit(Box<(Running, Segmentation, FitOptions)>),
}

/// The worker loop: keep up to `slot.batch` jobs training together, taking queued jobs that
/// fit the batch between steps (continuous batching), and hand each ended job to the worker's
/// finisher thread, which finds its foreground and publishes its outcome. An idle worker waits
/// for the next job; a busy one never waits for more.
///
/// Why a finisher: the foreground rule and the result's PNGs work on the image at its own
/// resolution, on the CPU (`s3net bench foreground`: 6 ms for a 512² scan, 0.2 s at 4096² on
/// this repository's CPU, more for the cluster statistics and under load). Done on the
/// worker's thread, that time held up every other job of its stack, and on a GPU left the
/// device idle. (The labels' read-off at full size stays in the batch's step: it needs the
/// response on the device.)
///
/// `warm`: this worker's place among those warming up, taken (and given up) by its first run.
fn serve(queue: &Arc<dyn JobQueue>, slot: &WorkerSlot, progress_interval: Duration, refits: usize, metrics: &Arc<Metrics>, warm: &mut Option<Warm>) {
    let device = match slot.device.resolve() {
        Ok(d) => d,
        Err(e) => {
            drop(warm.take());
            return refuse_all(queue, slot, &e.to_string(), metrics);
        }
    };
    if let Some(w) = warm.take() {
        warm_up(queue, metrics, slot, device, &w.0.opts);
        drop(w);
    }
    let (to_finisher, ended) = std::sync::mpsc::channel::<Ended>();
    let (answer, back) = std::sync::mpsc::channel::<Back>();
    let finisher = {
        let (metrics, device_spec) = (metrics.clone(), slot.device);
        std::thread::Builder::new()
            .name(format!("s3net-{}-finish", slot.name))
            .spawn(move || finish_all(ended, answer, refits, &metrics, device_spec))
            .expect("cannot spawn a finisher thread")
    };
    // Jobs handed to the finisher that it has not answered for yet.
    let mut in_flight = 0usize;
    let hand = |in_flight: &mut usize, e: Ended| {
        *in_flight += 1;
        metrics.jobs_finishing(slot.device, 1);
        // The finisher lives as long as this loop; a send can only fail if it panicked.
        if to_finisher.send(e).is_err() {
            *in_flight -= 1;
            metrics.jobs_finishing(slot.device, -1);
            warn!(worker = %slot.name, "the finisher thread is gone; a job handed to it failed");
        }
    };
    let mut batch: Batch<'static, Running> = Batch::new(device);
    let mut busy = None;
    let mut closed = false;
    // This worker's share of s3net_jobs_training.
    let mut training = Training { metrics, device: slot.device, now: 0 };
    let mut report = |len: usize| training.set(len);
    let mut restarts = 0;
    loop {
        // The finisher's answers: published outcomes, and jobs to fit again. With nothing else
        // to do but wait for them (the queue closed), wait for them.
        let mut answers: Vec<Back> = back.try_iter().collect();
        if answers.is_empty() && closed && batch.is_empty() && in_flight > 0 {
            match back.recv() {
                Ok(a) => answers.push(a),
                Err(_) => {
                    // Only if the finisher thread itself died: nothing more will come back.
                    warn!(worker = %slot.name, jobs = in_flight, "the finisher thread is gone; the jobs it held failed");
                    in_flight = 0;
                }
            }
        }
        for a in answers {
            in_flight -= 1;
            if let Back::Refit(job) = a {
                let (r, seg, next) = *job;
                if let Some(e) = refit(queue, &mut batch, r, seg, next, progress_interval, metrics) {
                    hand(&mut in_flight, e);
                }
            }
        }
        // After a stack failed (out of GPU memory, say), the batch's own limit keeps this
        // worker's stacks below the size that failed.
        let room = slot.batch.min(batch.limit().unwrap_or(usize::MAX));
        while !closed && batch.len() < room {
            // Idle, a worker waits for a job; but not long while the finisher may hand one back.
            let wait = match (batch.is_empty(), in_flight) {
                (false, _) => Duration::ZERO,
                (true, 0) => Duration::from_secs(1),
                (true, _) => Duration::from_millis(10),
            };
            let fits = |j: &NewJob| batch.accepts(&j.options, &j.image);
            match queue.take(slot.device, wait, &fits) {
                Take::Job(c) => admit(queue, slot, &mut batch, *c, progress_interval, metrics),
                Take::Idle => break,
                Take::Closed => closed = true,
            }
        }
        if batch.is_empty() {
            if closed && in_flight == 0 {
                break;
            }
            continue;
        }
        busy.get_or_insert_with(|| metrics.worker_busy(slot.device));
        report(batch.len());
        let ended: Vec<(Running, Result<s3net_model::FitOutput, ServiceError>)> =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch.step())) {
                Ok(ended) => ended.into_iter().map(|(r, o)| (r, o.map_err(ServiceError::from))).collect(),
                Err(_) => {
                    let e = || Err(ServiceError::Internal("the fit panicked".into()));
                    batch.drain().into_iter().map(|r| (r, e())).collect()
                }
            };
        // The gauges are current by the time a client hears an outcome.
        report(batch.len());
        metrics.jobs_restarted(batch.restarts() - restarts);
        restarts = batch.restarts();
        if batch.is_empty() {
            busy = None;
        }
        for (r, outcome) in ended {
            match outcome {
                Ok(fit) => hand(&mut in_flight, Ended::Fit(r, fit)),
                Err(e) => finish(r, Err(e), metrics),
            }
        }
    }
    drop(to_finisher);
    if finisher.join().is_err() {
        warn!(worker = %slot.name, "the finisher thread panicked");
    }
}

/// The finisher of one worker: for each ended fit, the foreground (`Segmentation::of`, at the
/// image's own resolution) and either a refit handed back (`s3net_model::refit_options`) or
/// the result made and published; for each segmentation, its result. Answers every job on
/// `back`; ends when the worker drops its side of `ended`. `s3net_jobs_finishing` counts a job
/// down before its outcome is published, so the gauge is current when a client hears it.
fn finish_all(
    ended: std::sync::mpsc::Receiver<Ended>,
    back: std::sync::mpsc::Sender<Back>,
    max_refits: usize,
    metrics: &Metrics,
    device: DeviceSpec,
) {
    for e in ended {
        // Counted down once per job, also when a panic comes after the count.
        let counted = std::cell::Cell::new(false);
        let done = || {
            if !counted.replace(true) {
                metrics.jobs_finishing(device, -1);
            }
        };
        // A panic here (a bug in the foreground rule, say) fails this job alone, as its
        // `Running` is dropped (see its Drop), and the finisher goes on with the next.
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match e {
            Ended::Fit(r, fit) => {
                let mut seg = r.span.in_scope(|| Segmentation::of(&r.claimed.job.image, fit));
                seg.refits = r.refits;
                match refit_options(&seg, &r.claimed.job.options, r.refits, max_refits) {
                    Some(next) => {
                        done();
                        Back::Refit(Box::new((r, seg, next)))
                    }
                    None => {
                        done();
                        finish(r, Ok(seg), metrics);
                        Back::Published
                    }
                }
            }
            Ended::Segmented(r, seg) => {
                done();
                finish(r, Ok(seg), metrics);
                Back::Published
            }
        }))
        .unwrap_or_else(|_| {
            done();
            Back::Published
        });
        // Nobody to answer (the worker's loop panicked): the result is out all the same, and a
        // refit that cannot happen fails as its job is dropped.
        let _ = back.send(answer);
    }
}

/// A worker whose device does not exist fails every job it takes, saying why.
fn refuse_all(queue: &Arc<dyn JobQueue>, slot: &WorkerSlot, why: &str, metrics: &Metrics) {
    warn!(worker = %slot.name, error = why, "worker cannot use its device");
    loop {
        match queue.take(slot.device, Duration::from_secs(1), &|_| true) {
            Take::Job(c) => {
                let span = job_span(slot, &c);
                let running = Running::new(queue, *c, span);
                let e = ServiceError::from(ModelError::InvalidArgument(why.to_string()));
                finish(running, Err(e), metrics);
            }
            Take::Idle => continue,
            Take::Closed => return,
        }
    }
}

/// The job's span: identifiers, sizes, counts and the outcome, never anything read from the
/// image. Integers as i64: OpenTelemetry has no unsigned attribute (u64 would become text).
fn job_span(slot: &WorkerSlot, c: &Claimed) -> tracing::Span {
    let (img, o, input) = (&c.job.image, &c.job.options, &c.job.input);
    let span = info_span!(
        "job",
        job_id = %c.id,
        worker = %slot.name,
        device = %slot.device,
        width = img.width as i64,
        height = img.height as i64,
        channels = img.channels as i64,
        format = input.format.as_str(),
        modality = input.modality.as_deref(),
        transfer_syntax = input.transfer_syntax.as_deref(),
        preset = %o.preset,
        size = o.size,
        max_iterations = o.iterations as i64,
        priority = c.job.priority,
        caller = (!c.job.caller.name.is_empty()).then_some(&*c.job.caller.name),
        queued_s = c.queued_for.as_secs_f64(),
        batch_jobs = tracing::field::Empty,
        iterations = tracing::field::Empty,
        labels = tracing::field::Empty,
        fit_s = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    c.job.trace.set_parent_of(&span);
    span
}

/// Starts a claimed job: its span and Started event, then into the batch (or straight to
/// its failure when the engine refuses it).
fn admit(
    queue: &Arc<dyn JobQueue>,
    slot: &WorkerSlot,
    batch: &mut Batch<'static, Running>,
    c: Claimed,
    progress_interval: Duration,
    metrics: &Metrics,
) {
    let span = job_span(slot, &c);
    span.record("batch_jobs", (batch.len() + 1) as i64);
    span.in_scope(|| info!("job started"));
    queue.publish(
        &c.id,
        Event::Started(pb::Started {
            worker: slot.name.clone(),
            device: slot.device.to_string(),
        }),
    );
    let job = fit_job(queue, &c, c.job.options.clone(), progress_interval);
    let running = Running::new(queue, c, span);
    if let Err((running, e)) = batch.add(running, job) {
        finish(running, Err(e.into()), metrics);
    }
}

/// The engine's side of a claimed job with these options: its image, progress events at most
/// every `progress_interval` (and the last step's), and its cancel flag.
fn fit_job(queue: &Arc<dyn JobQueue>, c: &Claimed, opts: FitOptions, progress_interval: Duration) -> FitJob<'static> {
    let (q, id, flag) = (queue.clone(), c.id.clone(), c.cancel.clone());
    let mut last: Option<Instant> = None;
    FitJob {
        image: c.job.image.clone(),
        opts,
        progress: Box::new(move |p: &Progress| {
            let due = last.is_none_or(|t| t.elapsed() >= progress_interval) || p.iteration >= p.max_iterations;
            if due {
                last = Some(Instant::now());
                q.publish(&id, Event::Progress(progress(p)));
            }
        }),
        cancel: Box::new(move || flag.load(Ordering::Relaxed)),
    }
}

/// A finished fit whose foreground came out empty goes back into the batch with the options
/// the finisher chose (`s3net_model::refit_options`, as `segment` does for a lone fit), as its
/// next attempt; if it cannot even start, the first fit's result stands and comes back to be
/// published.
fn refit(
    queue: &Arc<dyn JobQueue>,
    batch: &mut Batch<'static, Running>,
    mut r: Running,
    seg: Segmentation,
    next: FitOptions,
    progress_interval: Duration,
    metrics: &Metrics,
) -> Option<Ended> {
    let attempt = seg.fit.attempt + 1;
    r.span.in_scope(|| info!(seed = next.seed, attempt, "the foreground came out empty; fitting again with another seed"));
    let job = fit_job(queue, &r.claimed, next, progress_interval);
    r.refits += 1;
    match batch.add_attempt(r, job, attempt) {
        Ok(()) => {
            metrics.job_refitted();
            None
        }
        Err((r, _)) => Some(Ended::Segmented(r, seg)),
    }
}

/// Records a job's outcome in its span and the metrics, ends the span, then publishes the
/// outcome to the job's queue: a trace shows the job finished when the caller hears it.
fn finish(mut r: Running, outcome: Result<Segmentation, ServiceError>, metrics: &Metrics) {
    let (c, span) = (&r.claimed, &r.span);
    let img = &c.job.image;
    let event = span.in_scope(|| match outcome {
        Ok(seg) => {
            let (mask_dicom, labels_dicom) = match c.job.dicom_seg.as_ref().map(|out| dicom_segmentations(out, img, &seg, &c.job.applied)) {
                Some(Err(e)) => return failed(span, e),
                Some(Ok(files)) => files,
                None => Default::default(),
            };
            let fit_s = r.started.elapsed().as_secs_f64();
            span.record("iterations", seg.fit.iterations as i64);
            span.record("labels", seg.fit.n_labels as i64);
            span.record("fit_s", fit_s);
            span.record("outcome", "completed");
            metrics.fit_completed(fit_s, seg.fit.iterations);
            let mut res = segmentation_result(img, &seg, c.job.applied.clone(), c.job.pixel_spacing);
            res.mask_dicom = mask_dicom;
            res.labels_dicom = labels_dicom;
            res.frames = c.job.input.frames;
            res.timings = Some(pb::Timings {
                queued_seconds: c.queued_for.as_secs_f64(),
                fit_seconds: fit_s,
                total_seconds: c.submitted.elapsed().as_secs_f64(),
            });
            info!(labels = seg.fit.n_labels, fit_s, "job completed");
            Event::Completed(pb::Completed { result: Some(res) })
        }
        Err(ServiceError::Model(ModelError::Cancelled)) => {
            span.record("outcome", "cancelled");
            info!("job cancelled");
            Event::Cancelled(pb::Cancelled::default())
        }
        Err(e) => failed(span, e),
    });
    let (id, queue) = (r.claimed.id.clone(), r.queue.clone());
    r.published = true;
    drop(r);
    queue.publish(&id, event);
}

fn failed(span: &tracing::Span, e: ServiceError) -> Event {
    span.record("outcome", "failed");
    span.record("otel.status_code", "error");
    warn!(error = %e, "job failed");
    Event::Failed(pb::Failed {
        code: e.code() as i32,
        message: e.to_string(),
    })
}

fn progress(p: &Progress) -> pb::Progress {
    pb::Progress {
        iteration: p.iteration as u32,
        max_iterations: p.max_iterations as u32,
        losses: Some(losses(&p.losses)),
        labels: p.labels as u32,
        elapsed_seconds: p.elapsed.as_secs_f64(),
        attempt: p.attempt as u32,
    }
}

fn losses(l: &s3net_model::LossTerms) -> pb::LossTerms {
    pb::LossTerms {
        total: l.total,
        ce: l.ce,
        affine: l.affine,
        spatial: l.spatial,
    }
}

/// The DICOM Segmentations `out` asks for (`Options.dicom_seg`, `.dicom_seg_clusters`): the
/// foreground mask's and the cluster map's (each empty when not asked for), their algorithm
/// parameters the fit's options as the result reports them (`applied`).
pub fn dicom_segmentations(out: &DicomOutputs, img: &Image, seg: &Segmentation, applied: &pb::AppliedOptions) -> Result<(Vec<u8>, Vec<u8>), ServiceError> {
    let algorithm = Algorithm { version: env!("CARGO_PKG_VERSION"), parameters: &applied.options_json };
    let mask = if out.foreground { encode_segmentation(&out.source, img.width, img.height, &seg.mask, &algorithm)? } else { Vec::new() };
    let labels = if out.clusters { encode_cluster_segmentation(&out.source, &seg.fit.labels, &algorithm)? } else { Vec::new() };
    Ok((mask, labels))
}

/// The result message: PNGs, per-cluster statistics and the applied options; with the pixel
/// spacing, the foreground's area. Also what `s3net segment` writes (through
/// [`crate::cli::write_result`]), so that a local and a remote segmentation report alike.
pub fn segmentation_result(img: &Image, seg: &Segmentation, applied: pb::AppliedOptions, spacing: Option<[f64; 2]>) -> pb::SegmentationResult {
    let labels = &seg.fit.labels;
    let fg_pixels = seg.mask.iter().filter(|&&m| m).count() as f64;
    let fg = fg_pixels / seg.mask.len().max(1) as f64;
    pb::SegmentationResult {
        labels_png: encode_labels_png(labels),
        mask_png: encode_mask_png(img.width, img.height, &seg.mask),
        width: img.width,
        height: img.height,
        labels_used: seg.fit.n_labels as u32,
        clusters: cluster_stats(img, labels),
        iterations: seg.fit.iterations as u32,
        losses: Some(losses(&seg.fit.losses)),
        timings: None,
        options: Some(applied),
        device: seg.fit.device.clone(),
        foreground_fraction: fg,
        pixel_spacing: spacing.map(|[row_mm, column_mm]| pb::PixelSpacing { row_mm, column_mm }),
        foreground_area_mm2: spacing.map(|[r, c]| fg_pixels * r * c),
        refits: seg.refits as u32,
        frames: 1,
        mask_dicom: Vec::new(),
        labels_dicom: Vec::new(),
    }
}

/// Pixel count, bounding box and mean normalised intensity of each label.
pub fn cluster_stats(img: &Image, labels: &s3net_model::LabelMap) -> Vec<pb::ClusterStats> {
    let n = labels
        .data
        .iter()
        .map(|&l| l as usize + 1)
        .max()
        .unwrap_or(0);
    let (w, plane) = (
        labels.width as usize,
        (labels.width * labels.height) as usize,
    );
    let channels = img.channels.max(1) as usize;
    let same_size = img.width == labels.width
        && img.height == labels.height
        && img.data.len() == plane * channels;
    let mut count = vec![0u64; n];
    let mut sum = vec![0f64; n];
    let mut bbox = vec![(u32::MAX, u32::MAX, 0u32, 0u32); n];
    for (i, &l) in labels.data.iter().enumerate() {
        let l = l as usize;
        count[l] += 1;
        if same_size {
            sum[l] += (0..channels)
                .map(|c| img.data[c * plane + i] as f64)
                .sum::<f64>()
                / channels as f64;
        }
        let (x, y) = ((i % w) as u32, (i / w) as u32);
        let b = &mut bbox[l];
        *b = (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y));
    }
    (0..n)
        .filter(|&l| count[l] > 0)
        .map(|l| {
            let b = bbox[l];
            pb::ClusterStats {
                label: l as u32,
                pixel_count: count[l],
                bbox: Some(pb::BoundingBox {
                    x: b.0,
                    y: b.1,
                    width: b.2 - b.0 + 1,
                    height: b.3 - b.1 + 1,
                }),
                mean_intensity: sum[l] / count[l] as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_loop_that_panics_starts_again() {
        let mut runs = 0;
        supervise("test", Duration::ZERO, || {
            runs += 1;
            if runs < 3 {
                panic!("a bug, run {runs}");
            }
        });
        assert_eq!(runs, 3);
    }

    fn tiny_job() -> NewJob {
        let image = Image { width: 4, height: 4, channels: 1, data: vec![0.5; 16], kind: s3net_imaging::ImageKind::Grey };
        NewJob {
            image: Arc::new(image),
            options: FitOptions::default(),
            device: DeviceSpec::Cpu,
            priority: 0,
            applied: pb::AppliedOptions::default(),
            idempotency: None,
            trace: Default::default(),
            pixel_spacing: None,
            dicom_seg: None,
            reservation: None,
            input: Default::default(),
            caller: crate::callers::Caller::anonymous(),
        }
    }

    /// Every worker counts itself off the warm-up: one that warmed its device up and one whose
    /// device cannot be used (no such GPU), so a server never stays NOT_SERVING for ever.
    #[test]
    fn every_worker_counts_itself_off_the_warm_up() {
        use crate::jobs::{MemoryQueue, QueueLimits};
        let limits = QueueLimits { capacity: 4, retention: Duration::from_secs(60), retention_bytes: 1 << 20, queued_bytes: 1 << 20, workers: 2, fair_share: true, caller_share: 1.0 };
        let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new(limits));
        let slot = |name: &str, device| WorkerSlot { name: name.into(), device, batch: 1 };
        let slots = [slot("cpu-0", DeviceSpec::Cpu), slot("cuda:99-0", DeviceSpec::Cuda(99))];
        let small = FitOptions { size: 32, features: 8, ..FitOptions::default() };
        let warming = Warming::new(slots.len(), small);
        let threads = spawn(queue.clone(), &slots, Duration::ZERO, 0, Arc::new(Metrics::default()), Some(&warming));
        let deadline = Instant::now() + Duration::from_secs(120);
        while warming.left() > 0 {
            assert!(Instant::now() < deadline, "{} workers still warming up", warming.left());
            std::thread::sleep(Duration::from_millis(10));
        }
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(warming.done());
        queue.close();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_job_dropped_without_an_outcome_fails_instead_of_running_for_ever() {
        use crate::jobs::{MemoryQueue, QueueLimits};
        use crate::pb::JobState;
        let limits = QueueLimits { capacity: 4, retention: Duration::from_secs(60), retention_bytes: 1 << 20, queued_bytes: 1 << 20, workers: 1, fair_share: true, caller_share: 1.0 };
        let queue: Arc<dyn JobQueue> = Arc::new(MemoryQueue::new(limits));
        let take = || match queue.take(DeviceSpec::Cpu, Duration::from_secs(1), &|_| true) {
            Take::Job(c) => *c,
            _ => panic!("no job"),
        };
        let id = queue.submit(tiny_job()).unwrap().id;
        let r = Running::new(&queue, take(), tracing::Span::none());
        assert_eq!(queue.active(), 1);
        // Dropped as a panic drops it, unwinding through the worker.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = r;
            panic!("a bug in the worker");
        }));
        assert_eq!(queue.active(), 0, "the job still counts as running");
        let j = queue.get(&id).unwrap();
        assert_eq!(j.state, JobState::Failed as i32);
        let f = j.failure.unwrap();
        assert_eq!(f.code, tonic::Code::Internal as i32);
        assert!(f.message.contains("a panic"), "{}", f.message);

        // A job finished the normal way keeps its own outcome.
        let id = queue.submit(tiny_job()).unwrap().id;
        let r = Running::new(&queue, take(), tracing::Span::none());
        finish(r, Err(ServiceError::Model(ModelError::Cancelled)), &Metrics::default());
        assert_eq!(queue.get(&id).unwrap().state, JobState::Cancelled as i32);
        assert_eq!(queue.active(), 0);
    }

    #[test]
    fn worker_plan_per_device() {
        let names = |v: Vec<WorkerSlot>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(plan(None, None, 0, 1, 16)), ["cpu-0"]);
        assert_eq!(
            names(plan(None, None, 2, 1, 16)),
            ["cuda:0-0", "cuda:0-1", "cuda:1-0", "cuda:1-1"]
        );
        let mixed = plan(Some(1), Some(1), 1, 2, 16);
        assert_eq!(names(mixed.clone()), ["cuda:0-0", "cpu-0"]);
        assert_eq!(mixed.iter().map(|s| s.batch).collect::<Vec<_>>(), [16, 2]);
        assert_eq!(
            plan(Some(2), Some(3), 0, 0, 0)
                .iter()
                .filter(|s| s.device == DeviceSpec::Cpu)
                .count(),
            2
        );
    }

    #[test]
    fn cluster_statistics() {
        let img = Image {
            width: 3,
            height: 2,
            channels: 1,
            data: vec![0.0, 0.0, 1.0, 0.0, 1.0, 1.0],
            kind: s3net_imaging::ImageKind::Grey,
        };
        let labels = s3net_model::LabelMap {
            width: 3,
            height: 2,
            data: vec![0, 0, 1, 0, 1, 1],
        };
        let s = cluster_stats(&img, &labels);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].pixel_count, s[0].mean_intensity), (3, 0.0));
        assert_eq!(
            s[0].bbox,
            Some(pb::BoundingBox {
                x: 0,
                y: 0,
                width: 2,
                height: 2
            })
        );
        assert_eq!((s[1].pixel_count, s[1].mean_intensity), (3, 1.0));
        assert_eq!(
            s[1].bbox,
            Some(pb::BoundingBox {
                x: 1,
                y: 0,
                width: 2,
                height: 2
            })
        );
    }
}
