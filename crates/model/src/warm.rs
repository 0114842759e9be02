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
/// took and what a step cost (see [`StepCost`]).
///
/// Why: the first steps on a fresh thread and device pay for everything done once: CUDA loads
/// each kernel at its first launch, cuBLAS and cuDNN make their handles and pick algorithms,
/// the thread gets its stream, the allocators grow to the grid's sizes, oneDNN builds its
/// primitives on the CPU. On an H200 the first job of each GPU worker took about a second over
/// its time for that while twenty jobs queued behind it (2026-11-28). A server runs this in
/// each worker, with the options a job that sets none gets, before it reports ready, so no
/// client's job pays it.
pub fn warm_up(device: Device, opts: &FitOptions, stacks: bool) -> Result<WarmUp, ModelError> {
    let t = Instant::now();
    let mut precisions = vec![opts.precision];
    if device.is_cuda() {
        let other = if opts.precision == Precision::Float32 { Precision::Bfloat16 } else { Precision::Float32 };
        precisions.push(other);
    }
    let o = |iterations, precision, size| FitOptions { iterations, min_labels: 0, precision, seed: 1, size, ..opts.clone() };
    // Seconds per step of a lone fit of `steps` steps on a colour image (set-up and read-out
    // included: a job's fit time includes them too).
    let lone = |steps, size| -> Result<f64, ModelError> {
        let t = Instant::now();
        run(device, vec![(0, job(3, o(steps, opts.precision, size)))])?;
        Ok(t.elapsed().as_secs_f64() / steps as f64)
    };
    let mut at_grid = None;
    for precision in precisions {
        if stacks {
            // A lone network for two steps, then a second joins: a stack of two for two more.
            run(device, vec![(0, job(1, o(4, precision, opts.size))), (2, job(1, o(2, precision, opts.size)))])?;
        } else {
            run(device, vec![(0, job(1, o(2, precision, opts.size)))])?;
        }
        if at_grid.is_none() {
            // The grid's paths are warm by now: this lone fit is timed as a job's would be.
            at_grid = Some(lone(STEPS, opts.size)?);
        } else {
            run(device, vec![(0, job(3, o(2, precision, opts.size)))])?;
        }
    }
    // The same on a quarter of the grid, once to warm its shapes up and once timed: two sizes
    // tell a step's fixed cost from its cost per pixel.
    let small = (opts.size / 4).max(16).min(opts.size);
    lone(STEPS, small)?;
    let cost = StepCost::through((opts.size, at_grid.unwrap_or(0.0)), (small, lone(STEPS, small)?));
    Ok(WarmUp { took: t.elapsed(), cost })
}

/// Steps of each timed warm-up fit.
const STEPS: usize = 2;

/// What [`warm_up`] did: how long it took, and what a step cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmUp {
    pub took: Duration,
    pub cost: StepCost,
}

/// Seconds per SGD step of a lone fit on a `side`² grid, as `fixed_s + per_pixel_s · side²`,
/// measured by the warm-up on two grid sizes with the warm-up's options (a job that sets none).
///
/// Why: a server that has not finished a fit yet has nothing else to go by when it tells a
/// refused caller when to come back. A guess of a second per fit told 127 callers refused
/// together by a fresh CPU server to come back in 33 s, when its queue of 32 five-step 64²
/// jobs ran dry in 7 s (README, "Refusals and retry hints"). Measured warm, lone, with the
/// fits' set-up and read-out spread over their steps; a fit that stops early takes less, and
/// one in a GPU's stack longer (the queue learns from the fits that end).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub fixed_s: f64,
    pub per_pixel_s: f64,
}

impl StepCost {
    /// The line through two (grid side, seconds per step) measurements, neither part below
    /// zero (timing noise can make the smaller grid's step the slower).
    pub fn through((side_a, step_a): (i64, f64), (side_b, step_b): (i64, f64)) -> Self {
        let (pa, pb) = ((side_a * side_a) as f64, (side_b * side_b) as f64);
        let per_pixel_s = if pa == pb { step_a.max(step_b) / pa.max(1.0) } else { ((step_a - step_b) / (pa - pb)).max(0.0) };
        let fixed_s = if pa == pb { 0.0 } else { (step_b - per_pixel_s * pb).max(0.0) };
        StepCost { fixed_s, per_pixel_s }
    }

    /// Seconds one step of a lone fit on a `side`² grid takes by this cost.
    pub fn step_s(&self, side: i64) -> f64 {
        self.fixed_s + self.per_pixel_s * (side * side) as f64
    }

    /// Seconds a lone fit of `iterations` steps on a `side`² grid takes by this cost.
    pub fn fit_s(&self, iterations: usize, side: i64) -> f64 {
        iterations as f64 * self.step_s(side)
    }
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
            let w = warm_up(Device::Cpu, &opts, stacks).unwrap();
            assert!(w.took > Duration::ZERO);
            let c = w.cost;
            assert!(c.fixed_s >= 0.0 && c.per_pixel_s >= 0.0 && c.fit_s(1, 32) > 0.0, "{c:?}");
        }
    }

    /// The cost's line goes through both measurements, or as near as it can without a part
    /// below zero.
    #[test]
    fn a_step_costs_a_fixed_part_and_a_part_per_pixel() {
        let c = StepCost::through((256, 0.15), (64, 0.03));
        let per_px = 0.12 / (65536.0 - 4096.0);
        assert!((c.per_pixel_s - per_px).abs() < 1e-15 && (c.fixed_s - (0.03 - per_px * 4096.0)).abs() < 1e-12, "{c:?}");
        assert!((c.fit_s(10, 256) - 1.5).abs() < 1e-9 && (c.fit_s(5, 64) - 0.15).abs() < 1e-9);
        // Noise made the small grid slower: its time for every size.
        assert_eq!(StepCost::through((256, 0.02), (64, 0.03)), StepCost { fixed_s: 0.03, per_pixel_s: 0.0 });
        // A steep line through the origin stays there.
        assert_eq!(StepCost::through((100, 0.1), (50, 0.01)).fixed_s, 0.0);
        // One size: all of it per pixel.
        assert_eq!(StepCost::through((16, 0.0256), (16, 0.0256)), StepCost { fixed_s: 0.0, per_pixel_s: 0.0001 });
    }
}
