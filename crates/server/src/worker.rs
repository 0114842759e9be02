//! Worker threads: each takes jobs for its device from the queue and runs the engine.
//!
//! Fits are blocking and CPU/GPU heavy, so they run on plain OS threads, never on the async
//! runtime; the number of threads is the concurrency bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use s3net_imaging::{encode_labels_png, encode_mask_png, Image};
use s3net_model::{DeviceSpec, ModelError, Progress, Segmentation};
use tracing::{info, info_span, warn};

use crate::error::ServiceError;
use crate::jobs::{Claimed, JobQueue, Take};
use crate::metrics::Metrics;
use crate::pb::{self, job_event::Event};

/// One worker: a name for events and logs, and the device it runs fits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlot {
    pub name: String,
    pub device: DeviceSpec,
}

/// The worker slots for a machine with `cuda_devices` GPUs.
pub fn plan(
    cpu_workers: Option<usize>,
    gpu_per_device: Option<usize>,
    cuda_devices: usize,
) -> Vec<WorkerSlot> {
    let mut slots = Vec::new();
    for d in 0..cuda_devices {
        for i in 0..gpu_per_device.unwrap_or(2) {
            slots.push(WorkerSlot {
                name: format!("cuda:{d}-{i}"),
                device: DeviceSpec::Cuda(d),
            });
        }
    }
    let cpu = cpu_workers.unwrap_or(if cuda_devices == 0 { 1 } else { 0 });
    for i in 0..cpu {
        slots.push(WorkerSlot {
            name: format!("cpu-{i}"),
            device: DeviceSpec::Cpu,
        });
    }
    slots
}

/// Starts one thread per slot; they exit once the queue is closed.
pub fn spawn(
    queue: Arc<dyn JobQueue>,
    slots: &[WorkerSlot],
    progress_interval: Duration,
    metrics: Arc<Metrics>,
) -> Vec<std::thread::JoinHandle<()>> {
    slots
        .iter()
        .map(|slot| {
            let (queue, slot, metrics) = (queue.clone(), slot.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("s3net-{}", slot.name))
                .spawn(move || loop {
                    match queue.take(slot.device, Duration::from_secs(1)) {
                        Take::Job(job) => run(&*queue, &slot, *job, progress_interval, &metrics),
                        Take::Idle => continue,
                        Take::Closed => break,
                    }
                })
                .expect("cannot spawn a worker thread")
        })
        .collect()
}

/// Runs one job in its span (a child of the RPC that created it), then publishes its outcome
/// once the span has ended, so that a trace shows the job finished when the caller hears it.
fn run(
    queue: &dyn JobQueue,
    slot: &WorkerSlot,
    c: Claimed,
    progress_interval: Duration,
    metrics: &Metrics,
) {
    let img = &c.job.image;
    let o = &c.job.options;
    // Identifiers, sizes, counts and the outcome: never anything read from the image.
    // Integers as i64: OpenTelemetry has no unsigned attribute (u64 would become text).
    let span = info_span!(
        "job",
        job_id = %c.id,
        worker = %slot.name,
        device = %slot.device,
        width = img.width as i64,
        height = img.height as i64,
        channels = img.channels as i64,
        preset = %o.preset,
        size = o.size,
        max_iterations = o.iterations as i64,
        priority = c.job.priority,
        queued_s = c.queued_for.as_secs_f64(),
        iterations = tracing::field::Empty,
        labels = tracing::field::Empty,
        fit_s = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    c.job.trace.set_parent_of(&span);
    let busy = metrics.worker_busy(slot.device);
    let event = span.in_scope(|| fit(queue, slot, &c, progress_interval, metrics, &span));
    // Metrics and trace are complete by the time a client hears the outcome.
    drop(busy);
    drop(span);
    queue.publish(&c.id, event);
}

fn fit(
    queue: &dyn JobQueue,
    slot: &WorkerSlot,
    c: &Claimed,
    progress_interval: Duration,
    metrics: &Metrics,
    span: &tracing::Span,
) -> Event {
    let img = &c.job.image;
    info!("job started");
    queue.publish(
        &c.id,
        Event::Started(pb::Started {
            worker: slot.name.clone(),
            device: slot.device.to_string(),
        }),
    );

    let mut last: Option<Instant> = None;
    let mut on_progress = |p: &Progress| {
        let due = last.is_none_or(|t| t.elapsed() >= progress_interval)
            || p.iteration >= p.max_iterations;
        if due {
            last = Some(Instant::now());
            queue.publish(&c.id, Event::Progress(progress(p)));
        }
    };
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s3net_model::segment(
            img,
            &c.job.options,
            slot.device,
            &mut on_progress,
            &c.cancel,
        )
    }));
    match outcome {
        Ok(Ok(seg)) => {
            let fit_s = started.elapsed().as_secs_f64();
            span.record("iterations", seg.fit.iterations as i64);
            span.record("labels", seg.fit.n_labels as i64);
            span.record("fit_s", fit_s);
            span.record("outcome", "completed");
            metrics.fit_completed(fit_s, seg.fit.iterations);
            let mut r = result(img, &seg, c.job.applied.clone());
            r.timings = Some(pb::Timings {
                queued_seconds: c.queued_for.as_secs_f64(),
                fit_seconds: fit_s,
                total_seconds: c.submitted.elapsed().as_secs_f64(),
            });
            info!(labels = seg.fit.n_labels, fit_s, "job completed");
            Event::Completed(pb::Completed { result: Some(r) })
        }
        Ok(Err(ModelError::Cancelled)) => {
            span.record("outcome", "cancelled");
            info!("job cancelled");
            Event::Cancelled(pb::Cancelled {
                reason: String::new(),
            })
        }
        Ok(Err(e)) => failed(span, ServiceError::from(e)),
        Err(_) => failed(span, ServiceError::Internal("the fit panicked".into())),
    }
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

/// The result message: PNGs, per-cluster statistics and the applied options.
fn result(img: &Image, seg: &Segmentation, applied: pb::AppliedOptions) -> pb::SegmentationResult {
    let labels = &seg.fit.labels;
    let fg = seg.mask.iter().filter(|&&m| m).count() as f64 / seg.mask.len().max(1) as f64;
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
    fn worker_plan_per_device() {
        let names = |v: Vec<WorkerSlot>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(plan(None, None, 0)), ["cpu-0"]);
        assert_eq!(
            names(plan(None, None, 2)),
            ["cuda:0-0", "cuda:0-1", "cuda:1-0", "cuda:1-1"]
        );
        assert_eq!(names(plan(Some(1), Some(1), 1)), ["cuda:0-0", "cpu-0"]);
        assert_eq!(
            plan(Some(2), Some(3), 0)
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
