//! A stack that runs out of memory fails none of its jobs: they start over in smaller stacks
//! and each ends as if it had been fitted alone.
//!
//! The out-of-memory is real: the process's address space is capped (RLIMIT_AS) so that a
//! stack of four networks cannot allocate its activations while a stack of two can, and
//! libtorch's allocator fails as it would on a full GPU. Large allocations are made to go
//! through mmap (and back on free), so the address space tracks the live tensors. The cap
//! holds for the whole process, hence this file's own test binary with a single test.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;

use s3net_imaging::{Image, ImageKind};
use s3net_model::{fit, Batch, FitJob, FitOptions, FitOutput, LossTerms, ModelError, Preset, Progress};
use tch::Device;

/// A bright square on a shaded background, three channels.
fn image(side: u32) -> Image {
    let n = (side * side) as usize;
    let mut data = vec![0f32; 3 * n];
    for y in 0..side {
        for x in 0..side {
            let inside = (side / 4..3 * side / 4).contains(&x) && (side / 3..3 * side / 4).contains(&y);
            let v = if inside { 0.8 } else { 0.2 + 0.3 * x as f32 / side as f32 };
            for c in 0..3 {
                data[c * n + (y * side + x) as usize] = v - 0.05 * c as f32;
            }
        }
    }
    Image { width: side, height: side, channels: 3, data, kind: ImageKind::Colour }
}

fn opts(seed: u64) -> FitOptions {
    FitOptions { size: 128, features: 16, iterations: 3, min_labels: 0, seed, ..FitOptions::preset(Preset::Default) }
}

/// A field of /proc/self/status in bytes (VmSize: address space now; VmPeak: its maximum).
fn vm(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn set_soft_address_limit(bytes: libc::rlim_t) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut lim), 0);
        lim.rlim_cur = bytes.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
    }
}

/// A job's per-step losses (of its last start) and its outcome.
type Outcome = (Vec<LossTerms>, Result<FitOutput, ModelError>);

/// Runs every job in one batch until all have ended; returns each job's outcome and the batch.
fn run<'a>(img: &Image, seeds: &[u64]) -> (Vec<Outcome>, Batch<'a, usize>) {
    let (tx, rx) = mpsc::channel::<(usize, usize, LossTerms)>();
    let mut batch: Batch<usize> = Batch::new(Device::Cpu);
    for (i, &seed) in seeds.iter().enumerate() {
        let tx = tx.clone();
        let job = FitJob {
            image: Arc::new(img.clone()),
            opts: opts(seed),
            progress: Box::new(move |p: &Progress| tx.send((i, p.iteration, p.losses)).unwrap()),
            cancel: Box::new(|| false),
        };
        batch.add(i, job).map_err(|(_, e)| e).unwrap();
    }
    let mut results: Vec<Option<Result<FitOutput, ModelError>>> = seeds.iter().map(|_| None).collect();
    let mut calls = 0;
    while !batch.is_empty() {
        for (i, r) in batch.step() {
            results[i] = Some(r);
        }
        calls += 1;
        assert!(calls < 100, "the batch never finished");
    }
    drop(tx);
    let mut steps: Vec<Vec<LossTerms>> = seeds.iter().map(|_| Vec::new()).collect();
    for (i, iteration, l) in rx.iter() {
        if iteration == 1 {
            steps[i].clear(); // a start over reports from step 1 again
        }
        steps[i].push(l);
    }
    (steps.into_iter().zip(results).map(|(s, r)| (s, r.unwrap())).collect(), batch)
}

#[test]
fn a_stack_out_of_memory_starts_its_jobs_over_in_smaller_stacks() {
    // SAFETY: allocator parameters only; set before this test allocates anything large.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    let img = image(128);
    let seeds = [0, 1, 2, 3];
    let alone: Vec<(Vec<LossTerms>, FitOutput)> = seeds
        .iter()
        .map(|&s| {
            let mut steps = Vec::new();
            let out = fit(&img, &opts(s), Device::Cpu, &mut |p: &Progress| steps.push(p.losses), &AtomicBool::new(false)).unwrap();
            (steps, out)
        })
        .collect();

    // What a stack of two needs on top of what the process holds between fits.
    let before = vm("VmSize:");
    let (pair, _) = run(&img, &[7, 8]);
    assert!(pair.iter().all(|(_, r)| r.is_ok()), "an uncapped stack of two failed");
    let two = vm("VmPeak:").saturating_sub(before);
    assert!(two > 0, "a stack of two grew no address space");

    // Room for a stack of two, with a quarter to spare, not for one of four.
    let cap = vm("VmSize:") + two + two / 4;
    set_soft_address_limit(cap as libc::rlim_t);
    let (got, batch) = run(&img, &seeds);
    set_soft_address_limit(libc::RLIM_INFINITY);

    assert!(
        batch.restarts() >= 4,
        "the stack of four did not run out of memory under a cap of {} MB ({} MB for a stack of two): {} restarts",
        cap >> 20,
        two >> 20,
        batch.restarts()
    );
    let limit = batch.limit().expect("a failed stack sets a limit");
    assert!((2..4).contains(&limit), "limit {limit} after a stack of four failed and jobs completed");
    for (i, ((a_steps, a_out), (b_steps, b_out))) in alone.iter().zip(&got).enumerate() {
        let b_out = b_out.as_ref().unwrap_or_else(|e| panic!("job {i} failed: {e}"));
        assert_eq!(a_steps.len(), b_steps.len(), "job {i}: steps of its last start");
        for (s, (x, y)) in a_steps.iter().zip(b_steps).enumerate() {
            for (u, v) in [(x.total, y.total), (x.ce, y.ce), (x.affine, y.affine), (x.spatial, y.spatial)] {
                assert!((u - v).abs() <= 1e-4 * (1.0 + u.abs()), "job {i} step {}: alone {x:?}, restarted {y:?}", s + 1);
            }
        }
        let same = a_out.labels.data.iter().zip(&b_out.labels.data).filter(|(p, q)| p == q).count();
        assert!(same as f64 >= 0.99 * a_out.labels.data.len() as f64, "job {i}: labels differ from the fit alone");
    }
}
