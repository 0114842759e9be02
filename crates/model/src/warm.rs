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

/// A warm-up job on [`test_card`] with `channels` channels (1 or 3).
fn job(channels: u8, opts: FitOptions) -> FitJob<'static> {
    FitJob {
        image: Arc::new(test_card(48, channels == 1)),
        opts,
        progress: Box::new(|_| {}),
        cancel: Box::new(|| false),
    }
}

/// A deterministic test card, `size`² pixels, grey or colour: a dark disc with soft edges on a
/// textured background, something for the clustering to find, so a fit takes its usual
/// branches. The warm-up's input, and `s3net bench fit`'s.
pub fn test_card(size: u32, grey: bool) -> Image {
    let c = if grey { 1 } else { 3 };
    let n = (size * size) as usize;
    let mut data = vec![0f32; n * c];
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 / size as f32 - 0.5, y as f32 / size as f32 - 0.45);
            let r = (fx * fx + fy * fy).sqrt();
            let disc = 1.0 / (1.0 + ((r - 0.25) * 40.0).exp());
            let tex = 0.05 * ((x as f32 * 0.3).sin() * (y as f32 * 0.2).cos());
            for ch in 0..c {
                let base = 0.8 - 0.1 * ch as f32;
                data[ch * n + (y * size + x) as usize] = (base - 0.55 * disc + tex).clamp(0.0, 1.0);
            }
        }
    }
    let kind = if grey { ImageKind::Grey } else { ImageKind::Colour };
    Image { width: size, height: size, channels: c as u8, data, kind }
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
