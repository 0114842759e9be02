//! Warming a worker's thread and device up before it takes jobs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;

use crate::fit::{Batch, FitJob};
use crate::options::{FitOptions, Precision};
use crate::{Image, ImageKind, ModelError};

/// Runs a few steps of small fits with `opts` on `device`, on the calling thread, through the
/// paths jobs take: a lone network and (with `stacks`) a stack of two, on a grey and a colour
/// image, in `opts`' number format and, on a GPU, in the other one too; returns how long that
/// took.
///
/// Why: the first steps on a fresh thread and device pay for everything done once: CUDA loads
/// each kernel at its first launch, cuBLAS and cuDNN make their handles and pick algorithms,
/// the thread gets its stream, the allocators grow to the grid's sizes, oneDNN builds its
/// primitives on the CPU. On an H200 the first job of each GPU worker took about a second over
/// its time for that while twenty jobs queued behind it (2026-11-28). A server runs this in
/// each worker, with the options a job that sets none gets, before it reports ready, so no
/// client's job pays it.
pub fn warm_up(device: Device, opts: &FitOptions, stacks: bool) -> Result<Duration, ModelError> {
    let t = Instant::now();
    let mut precisions = vec![opts.precision];
    if device.is_cuda() {
        let other = if opts.precision == Precision::Float32 { Precision::Bfloat16 } else { Precision::Float32 };
        precisions.push(other);
    }
    for precision in precisions {
        let o = |iterations| FitOptions { iterations, min_labels: 0, precision, seed: 1, ..opts.clone() };
        if stacks {
            // A lone network for two steps, then a second joins: a stack of two for two more.
            run(device, vec![(0, job(1, o(4))), (2, job(1, o(2)))])?;
        } else {
            run(device, vec![(0, job(1, o(2)))])?;
        }
        run(device, vec![(0, job(3, o(2)))])?;
    }
    Ok(t.elapsed())
}

/// Steps one batch on `device` until every job ended; `jobs`: (the step it joins before, job).
fn run(device: Device, jobs: Vec<(usize, FitJob<'static>)>) -> Result<(), ModelError> {
    let mut batch: Batch<'static, ()> = Batch::new(device);
    let mut jobs: Vec<Option<(usize, FitJob<'static>)>> = jobs.into_iter().map(Some).collect();
    let mut step = 0;
    loop {
        for slot in jobs.iter_mut() {
            if slot.as_ref().is_some_and(|(at, _)| *at == step) {
                if let Some((_, job)) = slot.take() {
                    batch.add((), job).map_err(|(_, e)| e)?;
                }
            }
        }
        if batch.is_empty() && jobs.iter().all(Option::is_none) {
            return Ok(());
        }
        for (_, outcome) in batch.step() {
            outcome?;
        }
        step += 1;
    }
}

/// A 48×40 image of a disc on a textured background with `channels` channels: something for
/// the clustering to find, so the fit takes its usual branches.
fn job(channels: u8, opts: FitOptions) -> FitJob<'static> {
    let (w, h) = (48u32, 40u32);
    let n = (w * h) as usize;
    let mut data = vec![0f32; n * channels as usize];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
            let v = if fx * fx + fy * fy < 0.06 { 0.3 } else { 0.7 } + 0.05 * ((x * 5 + y * 3) % 7) as f32 / 7.0;
            for c in 0..channels as usize {
                data[c * n + (y * w + x) as usize] = v - 0.05 * c as f32;
            }
        }
    }
    let kind = if channels == 1 { ImageKind::Grey } else { ImageKind::Colour };
    FitJob {
        image: Arc::new(Image { width: w, height: h, channels, data, kind }),
        opts,
        progress: Box::new(|_| {}),
        cancel: Box::new(|| false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The warm-up runs its fits to the end on the CPU, lone and stacked (a GPU runs it in the
    /// server whenever a GPU check starts one).
    #[test]
    fn warms_the_cpu_up() {
        let opts = FitOptions { size: 32, features: 8, ..FitOptions::default() };
        for stacks in [false, true] {
            assert!(warm_up(Device::Cpu, &opts, stacks).unwrap() > Duration::ZERO);
        }
    }
}
