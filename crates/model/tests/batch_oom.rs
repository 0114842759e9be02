//! A stack that runs out of memory fails none of its jobs: they start over in smaller stacks
//! and each ends as if it had been fitted alone.
//!
//! The out-of-memory is real (`tests/support/address_space.rs`): the process's address space is
//! capped so that a stack of four networks cannot allocate its activations while a stack of
//! two can, and libtorch's allocator fails as it would on a full GPU. The cap holds for the
//! whole process, hence this file's own test binary, whose tests take turns.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use s3net_imaging::{Image, ImageKind};
use s3net_model::{fit, Batch, FitJob, FitOptions, FitOutput, LossTerms, ModelError, Preset, Progress};
use tch::Device;

#[path = "../../../tests/support/address_space.rs"]
mod address_space;
use address_space::{cap_address_space, mmap_large_allocations, vm};

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

/// F = 32: with F = 16 a stack of four grew the address space by only about 145 MB, and in
/// clean clones the capped stack of two often failed too (limit 1): two of three runs of the
/// code before the affine term's one-backward default, and one clean-clone CI run after it.
/// With F = 32 the same old clone passed four runs of four.
fn opts(seed: u64) -> FitOptions {
    FitOptions { size: 128, features: 32, iterations: 3, min_labels: 0, seed, ..FitOptions::preset(Preset::Default) }
}

/// One test at a time (the cap is the whole process's), large allocations through mmap.
fn exclusive() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    mmap_large_allocations();
    turn
}

/// The fit of `seed` alone: per-step losses and outcome.
fn alone(img: &Image, seed: u64) -> (Vec<LossTerms>, FitOutput) {
    let mut steps = Vec::new();
    let out = fit(&std::sync::Arc::new(img.clone()), &opts(seed), Device::Cpu, &mut |p: &Progress| steps.push(p.losses), &AtomicBool::new(false)).unwrap();
    (steps, out)
}

/// Same steps, losses within 1e-4 at the first step and 1e-3 later (an argmax near-tie that
/// flips one target pixel moves them by up to about 6e-4; see `tests/batch.rs`'s `CPU`),
/// labels ≥ 99 % equal.
fn assert_as_alone(name: &str, a: &(Vec<LossTerms>, FitOutput), b: &Outcome) {
    let out = b.1.as_ref().unwrap_or_else(|e| panic!("{name} failed: {e}"));
    assert_eq!(a.0.len(), b.0.len(), "{name}: steps of its last start");
    for (s, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        for (u, v) in [(x.total, y.total), (x.ce, y.ce), (x.affine, y.affine), (x.spatial, y.spatial)] {
            let t = if s == 0 { 1e-4 } else { 1e-3 };
            assert!((u - v).abs() <= t * (1.0 + u.abs()), "{name} step {}: alone {x:?}, batched {y:?}", s + 1);
        }
    }
    let same = a.1.labels.data.iter().zip(&out.labels.data).filter(|(p, q)| p == q).count();
    assert!(same as f64 >= 0.99 * a.1.labels.data.len() as f64, "{name}: labels differ from the fit alone");
}

/// A job's per-step losses (of its last attempt), its outcome and the attempts it took.
type Outcome = (Vec<LossTerms>, Result<FitOutput, ModelError>, usize);

/// Job index, attempt, step and losses of one progress report.
type Progressed = mpsc::Sender<(usize, usize, usize, LossTerms)>;

/// Job `i` of seed `seed`, reporting its progress to `tx`.
fn job(img: &Image, i: usize, seed: u64, tx: &Progressed) -> FitJob<'static> {
    let tx = tx.clone();
    FitJob {
        image: Arc::new(img.clone()),
        opts: opts(seed),
        progress: Box::new(move |p: &Progress| tx.send((i, p.attempt, p.iteration, p.losses)).unwrap()),
        cancel: Box::new(|| false),
    }
}

/// Runs every job in one batch until all have ended; returns each job's outcome and the batch.
fn run(img: &Image, seeds: &[u64]) -> (Vec<Outcome>, Batch<'static, usize>) {
    let (tx, rx) = mpsc::channel();
    let mut batch: Batch<usize> = Batch::new(Device::Cpu);
    for (i, &seed) in seeds.iter().enumerate() {
        batch.add(i, job(img, i, seed, &tx)).map_err(|(_, e)| e).unwrap();
    }
    drain(batch, seeds.len(), tx, rx)
}

/// Steps `batch` until it is empty; collects the outcomes of its `n` jobs.
fn drain(
    mut batch: Batch<'static, usize>,
    n: usize,
    tx: Progressed,
    rx: mpsc::Receiver<(usize, usize, usize, LossTerms)>,
) -> (Vec<Outcome>, Batch<'static, usize>) {
    let mut results: Vec<Option<Result<FitOutput, ModelError>>> = (0..n).map(|_| None).collect();
    let mut calls = 0;
    while !batch.is_empty() {
        for (i, r) in batch.step() {
            results[i] = Some(r);
        }
        calls += 1;
        assert!(calls < 100, "the batch never finished");
    }
    drop(tx);
    let mut steps: Vec<Vec<LossTerms>> = (0..n).map(|_| Vec::new()).collect();
    let mut attempts = vec![0; n];
    for (i, attempt, iteration, l) in rx.iter() {
        assert!(attempt >= attempts[i], "job {i}: attempt {attempt} after {}", attempts[i]);
        if attempt > attempts[i] {
            assert_eq!(iteration, 1, "job {i}: attempt {attempt} starts at step 1");
            attempts[i] = attempt;
            steps[i].clear();
        }
        steps[i].push(l);
    }
    let outcomes = steps.into_iter().zip(results).zip(attempts).map(|((s, r), a)| (s, r.unwrap(), a));
    (outcomes.collect(), batch)
}

#[test]
fn a_stack_out_of_memory_starts_its_jobs_over_in_smaller_stacks() {
    let _turn = exclusive();
    let img = image(128);
    let seeds = [0, 1, 2, 3];
    let alone: Vec<_> = seeds.iter().map(|&s| alone(&img, s)).collect();

    // Warm-up: what libtorch keeps per shape (oneDNN primitives) for stacks of two and four,
    // which stays resident. Without it the capped run made the four's caches itself, and
    // they could leave too little room for the two (a clean-clone CI run: limit 1). Then what
    // a stack of four needs on top of what the process holds between fits: its activations.
    for warm in [&[7, 8][..], &[7, 8, 9, 10]] {
        let (w, _) = run(&img, warm);
        assert!(w.iter().all(|(_, r, _)| r.is_ok()), "an uncapped warm-up stack failed");
    }
    let before = vm("VmSize:");
    let (four_run, _) = run(&img, &[11, 12, 13, 14]);
    assert!(four_run.iter().all(|(_, r, _)| r.is_ok()), "an uncapped stack of four failed");
    let four = vm("VmPeak:").saturating_sub(before);
    assert!(four > 0, "a stack of four grew no address space");

    // Capped at 70 % of that (as crates/server/tests/out_of_memory.rs): room for a stack of
    // two, not for one of four.
    let cap = vm("VmSize:") + four * 7 / 10;
    cap_address_space(Some(cap));
    let (got, batch) = run(&img, &seeds);
    cap_address_space(None);

    assert!(
        batch.restarts() >= 4,
        "the stack of four did not run out of memory under a cap of {} MB ({} MB for a stack of four): {} restarts",
        cap >> 20,
        four >> 20,
        batch.restarts()
    );
    let limit = batch.limit().expect("a failed stack sets a limit");
    assert!((2..4).contains(&limit), "limit {limit} after a stack of four failed and jobs completed");
    for (i, (a, b)) in alone.iter().zip(&got).enumerate() {
        assert_as_alone(&format!("job {i}"), a, b);
        assert!(b.2 >= 2, "job {i} reported attempt {} after its stack failed", b.2);
    }
}

#[test]
fn a_job_without_memory_to_join_waits_for_room() {
    let _turn = exclusive();
    let img = image(128);
    let reference = alone(&img, 5);
    let (tx, rx) = mpsc::channel();
    let mut batch: Batch<usize> = Batch::new(Device::Cpu);
    for (i, seed) in [(0, 3), (1, 4)] {
        batch.add(i, job(&img, i, seed, &tx)).map_err(|(_, e)| e).unwrap();
    }
    assert!(batch.step().is_empty());
    // No address space left but three scattered 512 KB holes: enough for the job's input
    // (3 × 128² floats), not for its network's free offsets (18 × 128² floats in one piece).
    cap_address_space(Some(vm("VmSize:")));
    let mut filler = Vec::with_capacity(1 << 12); // at most 512 MB
    while filler.len() < filler.capacity() {
        // SAFETY: plain malloc; every block is freed below.
        let block = unsafe { libc::malloc(128 << 10) };
        if block.is_null() {
            break;
        }
        filler.push(block);
    }
    let n = filler.len();
    let holes: Vec<usize> = if n < 16 { Vec::new() } else { [n / 4, n / 2, 3 * n / 4].iter().flat_map(|&h| h..h + 4).collect() };
    for &h in &holes {
        // SAFETY: allocated above, freed once.
        unsafe { libc::free(filler[h]) };
    }
    let joined = batch.add(2, job(&img, 2, 5, &tx));
    for (i, &block) in filler.iter().enumerate() {
        if !holes.contains(&i) {
            // SAFETY: allocated above, freed once.
            unsafe { libc::free(block) };
        }
    }
    cap_address_space(None);
    assert!(n >= 16, "only {n} blocks of 128 KB filled the address space");
    assert!(joined.is_ok(), "a job that could not join was failed instead of waiting");
    assert_eq!((batch.len(), batch.limit()), (3, Some(2)), "the job waits; the stack keeps its size");
    let (got, batch) = drain(batch, 3, tx, rx);
    assert!(got[..2].iter().all(|(_, r, _)| r.is_ok()));
    assert_as_alone("the job that waited", &reference, &got[2]);
    assert_eq!(got.iter().map(|o| o.2).collect::<Vec<_>>(), [1, 1, 1], "nobody started over");
    assert_eq!(batch.restarts(), 0, "nothing started over");
}
