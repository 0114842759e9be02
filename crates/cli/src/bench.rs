//! `s3net bench fit`, `s3net bench deform`, `s3net bench depthwise`, `s3net bench losses` and
//! `s3net bench foreground`: medians after a warm-up, printed as JSON.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use s3net_eval::median;
use s3net_imaging::{Image, ImageKind};
use s3net_model::deform::{deform_conv2d, ConvGeometry};
use s3net_model::options::Precision;
use s3net_model::DeviceSpec;
use serde_json::json;
use tch::{Kind, Tensor};

use crate::fitargs::FitArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Seconds per SGD step and per whole fit on a synthetic image.
    Fit(Box<FitBench>),
    /// Forward and forward+backward time of the deformable convolution.
    Deform(OpBench),
    /// Forward and forward+backward time of the I-LKA depthwise convolutions: our kernels
    /// against libtorch's grouped convolution, at the network's four kernel geometries.
    Depthwise(OpBench),
    /// Forward and forward+backward time of the per-pixel loss terms on a 1×K×S×S map
    /// (`--channels` K): the fused op (`s3net_ops::pixel_losses`) against the same terms in
    /// libtorch's ops, for the response map (cross-entropy against its argmax, and continuity)
    /// and for the auxiliary map (cross-entropy against a given target).
    Losses(OpBench),
    /// Time of the foreground rule at the image's own resolution (`Segmentation::of` of a
    /// fit's output) on synthetic grey and colour images of several sides: the CPU work a
    /// server's finisher thread does for each job, beside the fit.
    Foreground(ForegroundBench),
}

#[derive(Args, Debug)]
pub struct ForegroundBench {
    /// Image sides, e.g. `--sides 512,2048,4096`.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,4096")]
    pub sides: Vec<u32>,
    /// The grid the fit ran on.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Print only the JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FitBench {
    /// Timed fits (after one warm-up fit).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Use an RGB image (default) or a grey one.
    #[arg(long)]
    pub grey: bool,
    /// Also measure throughput with this many fits running at once (one thread each, as the
    /// server's workers do), e.g. `--concurrency 1,4,8`. Each thread runs `--repeats` fits.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Also measure throughput with this many fits trained as one batch (a stack of networks,
    /// as a server worker with `batch = N` does), e.g. `--batch 8,16,32`. Each batch size runs
    /// `--repeats` batches after a warm-up one, on `--batch-workers` threads at once.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Threads each running their own batches, for `--batch`.
    #[arg(long, default_value_t = 1)]
    pub batch_workers: usize,
    /// Only the `--batch` and `--concurrency` runs, no lone fits: for a profiler that counts
    /// kernel launches from the start, so its window lands in a batch (`PROFILE=1` in
    /// scripts/gpu-check.sh).
    #[arg(long, hide = true)]
    pub batch_only: bool,
    /// How the weight gradients' long reductions read their chunks: `auto` (the default:
    /// strided for bfloat16, copied for float32), `copied`, `strided` (in place, one GEMM
    /// launch per image) or `kernel` (our own, one launch): for timing them on a GPU
    /// (`s3net_ops::SplitK`).
    #[arg(long, value_enum, default_value_t = SplitLayout::Auto, hide = true)]
    pub split_k: SplitLayout,
    /// Writes an operator-level trace (Chrome JSON: every aten op and autograd node with its
    /// shapes, and on a GPU every kernel linked to its op; `s3net_ops::Trace`) of steps
    /// TRACE_FROM..TRACE_FROM+3 of the first batch of the largest `--batch` size (a warm-up
    /// batch, run without CUDA graphs so that each kernel keeps its op), then goes on.
    /// `scripts/trace-summary.py FILE` adds up the GPU (or CPU) time per op.
    #[arg(long, hide = true)]
    pub trace: Option<std::path::PathBuf>,
    /// The first traced step (see `--trace`).
    #[arg(long, default_value_t = 5, hide = true)]
    pub trace_from: usize,
    /// Runs the `--batch` fits on the CPU through the GPU's code paths, the CUDA kernels
    /// emulated (`s3net_ops::emulated_cuda`): with `--trace`, the ops a GPU step runs (its
    /// copies and casts among them) traced on a machine without a GPU. Slow; not a timing.
    #[arg(long, hide = true)]
    pub emulate_cuda: bool,
    #[command(flatten)]
    pub fit: FitArgs,
}

/// `--split-k`: the layout of the weight gradients' split reductions (`s3net_ops::SplitK`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitLayout {
    Auto,
    Copied,
    Strided,
    Kernel,
}

impl From<SplitLayout> for s3net_ops::SplitK {
    fn from(l: SplitLayout) -> Self {
        match l {
            SplitLayout::Auto => Self::Auto,
            SplitLayout::Copied => Self::Copied,
            SplitLayout::Strided => Self::Strided,
            SplitLayout::Kernel => Self::Kernel,
        }
    }
}

/// One op on a random 1×channels×size×size input.
#[derive(Args, Debug)]
pub struct OpBench {
    #[arg(long, default_value_t = 256)]
    pub size: i64,
    /// Feature channels (64: the deformable-conv shape; the default network has 32).
    #[arg(long, default_value_t = 64)]
    pub channels: i64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// float32 | bfloat16: the number format of every operand.
    #[arg(long, default_value = "float32")]
    pub precision: String,
    /// Print only the JSON object.
    #[arg(long)]
    pub json: bool,
    /// `bench deform` only: the standard deviation, in pixels, of the random offsets (2, a few
    /// pixels, as the shape has them; 0.01 samples as a fit does, whose free offsets
    /// stay under 0.01 pixel).
    #[arg(long, default_value_t = 2.0)]
    pub offset_std: f64,
}

impl OpBench {
    /// The device and the operands' (kind, device).
    fn tensor_options(&self) -> Result<(tch::Device, (Kind, tch::Device))> {
        let dev = self.device.parse::<DeviceSpec>()?.resolve()?;
        Ok((dev, (self.precision.parse::<Precision>()?.kind(), dev)))
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Fit(b) => fit(*b),
        BenchCommand::Deform(b) => deform(b),
        BenchCommand::Depthwise(b) => depthwise(b),
        BenchCommand::Losses(b) => losses(b),
        BenchCommand::Foreground(b) => foreground(b),
    }
}

/// A synthetic scan of side `side`: a bright body on dark air with two dark lungs and a little
/// texture, grey or colour, and the fit output a `size`² grid would give it (three clusters:
/// air, body, lungs, read off the downscaled image).
fn scan(side: u32, size: u32, kind: ImageKind) -> (Image, s3net_model::FitOutput) {
    let level = |x: f32, y: f32| {
        let (u, v) = (x - 0.5, y - 0.5);
        let body = (u / 0.45).powi(2) + (v / 0.38).powi(2) < 1.0;
        let lung = |cx: f32| ((u - cx) / 0.13).powi(2) + (v / 0.22).powi(2) < 1.0;
        if !body { 0.05 } else if lung(-0.18) || lung(0.18) { 0.15 } else { 0.7 }
    };
    let texture = |i: usize| ((i * 2_654_435_761) % 97) as f32 / 97.0 * 0.06;
    let n = (side * side) as usize;
    let plane: Vec<f32> = (0..n).map(|i| level((i % side as usize) as f32 / side as f32, (i / side as usize) as f32 / side as f32) + texture(i)).collect();
    let (channels, data) = match kind {
        ImageKind::Grey => (1, plane),
        ImageKind::Colour => (3, plane.iter().chain(&plane).chain(&plane).copied().collect()),
    };
    let image = Image { width: side, height: side, channels, data, kind };
    let g = size as usize;
    let grid_intensity: Vec<f32> = (0..g * g).map(|i| level((i % g) as f32 / g as f32, (i / g) as f32 / g as f32)).collect();
    let grid = s3net_model::LabelMap {
        width: size,
        height: size,
        data: grid_intensity.iter().map(|&v| if v < 0.1 { 0 } else if v < 0.5 { 2 } else { 1 }).collect(),
    };
    let labels = s3net_model::fit::nearest(&grid, side, side);
    let fit = s3net_model::FitOutput {
        labels,
        grid_labels: grid,
        grid_intensity,
        n_labels: 3,
        iterations: 50,
        losses: Default::default(),
        fit_seconds: 0.0,
        device: "cpu".into(),
        attempt: 1,
    };
    (image, fit)
}

fn foreground(b: ForegroundBench) -> Result<()> {
    let mut out = serde_json::Map::new();
    for (name, kind) in [("grey", ImageKind::Grey), ("colour", ImageKind::Colour)] {
        let mut by_side = serde_json::Map::new();
        for &side in &b.sides {
            let (image, fit) = scan(side, b.size, kind);
            let (mut rule, mut png) = (Vec::new(), Vec::new());
            let mut found = 0;
            for rep in 0..=b.repeats {
                let fit = fit.clone();
                let t0 = Instant::now();
                let seg = s3net_model::Segmentation::of(&image, fit);
                let t1 = Instant::now();
                // The result's two PNGs, as the service sends them.
                std::hint::black_box((s3net_imaging::encode_labels_png(&seg.fit.labels), s3net_imaging::encode_mask_png(side, side, &seg.mask)));
                if rep > 0 {
                    rule.push((t1 - t0).as_secs_f64() * 1e3);
                    png.push(t1.elapsed().as_secs_f64() * 1e3);
                }
                found = seg.mask.iter().filter(|&&m| m).count();
            }
            anyhow::ensure!(found > 0, "the {name} {side}² scan's foreground came out empty");
            let (rule, png) = (median(&rule), median(&png));
            by_side.insert(side.to_string(), json!({ "rule_ms": rule, "png_ms": png, "megapixels": (side as f64).powi(2) / 1e6 }));
            if !b.json {
                eprintln!("{name} {side}²: foreground rule {rule:.1} ms, PNGs {png:.1} ms");
            }
        }
        out.insert(name.into(), by_side.into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// Medians of an op's runs, in milliseconds (the JSON keys of every op benchmark).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct OpTiming {
    forward_ms: f64,
    forward_backward_ms: f64,
}

impl std::ops::AddAssign for OpTiming {
    fn add_assign(&mut self, o: OpTiming) {
        self.forward_ms += o.forward_ms;
        self.forward_backward_ms += o.forward_backward_ms;
    }
}

/// Medians of `repeats` runs after a warm-up: the op's forward alone (no autograd graph), and
/// forward plus the backward of its sum. `sync` waits for the device.
fn time_op(op: &Op, repeats: usize, sync: &dyn Fn()) -> Result<OpTiming> {
    let (mut fwd, mut fb) = (Vec::new(), Vec::new());
    for rep in 0..=repeats {
        sync();
        let t0 = Instant::now();
        drop(tch::no_grad(op)?);
        sync();
        let t_f = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        op()?.sum(Kind::Float).backward();
        sync();
        let t_fb = t1.elapsed().as_secs_f64() * 1e3;
        if rep > 0 {
            fwd.push(t_f);
            fb.push(t_fb);
        }
    }
    Ok(OpTiming { forward_ms: median(&fwd), forward_backward_ms: median(&fb) })
}

/// Waits for `dev` (a no-op on the CPU), so that timings cover the work, not its queueing.
fn device_sync(dev: tch::Device) -> impl Fn() {
    move || {
        if let tch::Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

fn fit(b: FitBench) -> Result<()> {
    let mut opts = b.fit.options()?;
    // Time every step: no early stop.
    opts.min_labels = 0;
    let device: DeviceSpec = b.fit.device()?;
    let resolved = device.resolve()?;
    if b.emulate_cuda && resolved != tch::Device::Cpu {
        anyhow::bail!("--emulate-cuda runs the GPU's code paths on the CPU: use it with --device cpu");
    }
    let image = Arc::new(s3net_model::warm::test_card(opts.size as u32, b.grey));
    s3net_ops::set_split_k(b.split_k.into());
    let (per_fit, per_iter, dev_name) = if b.batch_only {
        (Vec::new(), Vec::new(), s3net_model::fit::device_name(resolved))
    } else {
        lone_fits(&image, &opts, device, b.repeats)?
    };
    // On a GPU, the same fits with every kernel queued one by one, for the ratio in one run.
    let eager = if resolved.is_cuda() && !b.batch_only {
        s3net_model::set_cuda_graphs(false);
        let r = lone_fits(&image, &opts, device, b.repeats);
        s3net_model::set_cuda_graphs(true);
        let (per_fit, per_iter, _) = r?;
        json!({
            "seconds_per_iteration_median": median(&per_iter),
            "seconds_per_fit_median": median(&per_fit),
        })
    } else {
        serde_json::Value::Null
    };
    let mut throughput = Vec::new();
    for &n in &b.concurrency {
        throughput.push(concurrent(&image, &opts, device, n.max(1), b.repeats.max(1))?);
    }
    let mut batched = Vec::new();
    let largest = b.batch.iter().copied().max();
    for &n in &b.batch {
        let trace = b.trace.as_deref().filter(|_| Some(n) == largest).map(|p| (p, b.trace_from));
        batched.push(batch(&image, &opts, device, n.max(1), b.batch_workers.max(1), b.repeats.max(1), trace, b.emulate_cuda)?);
    }
    let out = json!({
        "device": dev_name,
        "threads": tch::get_num_threads(),
        "size": opts.size,
        "features": opts.features,
        "iterations": opts.iterations,
        "preset": opts.preset,
        "split_k": b.split_k.to_possible_value().map(|v| v.get_name().to_owned()),
        "seconds_per_iteration_median": median(&per_iter),
        "seconds_per_fit_median": median(&per_fit),
        "fits_per_second": 1.0 / median(&per_fit),
        "without_cuda_graphs": eager,
        "repeats": b.repeats,
        "concurrent": throughput,
        "batched": batched,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// One warm-up fit, then `repeats` timed ones of the image, one after another: the seconds of
/// each fit (segmentation included, never a refit), of each step, and the device's name.
fn lone_fits(image: &Arc<Image>, opts: &s3net_model::FitOptions, device: DeviceSpec, repeats: usize) -> Result<(Vec<f64>, Vec<f64>, String)> {
    let cancel = AtomicBool::new(false);
    let (mut per_fit, mut per_iter, mut dev_name) = (Vec::new(), Vec::new(), String::new());
    for rep in 0..=repeats {
        // Step time = the gap between consecutive progress reports, so set-up (weights, input
        // resize) and read-out (labels at full size, foreground) are not counted as steps.
        let mut marks = Vec::new();
        let t0 = Instant::now();
        let r = s3net_model::segment_with(image, opts, device, 0, &mut |p| marks.push(p.elapsed.as_secs_f64()), &cancel)?;
        let secs = t0.elapsed().as_secs_f64();
        dev_name = r.fit.device.clone();
        if rep > 0 {
            per_fit.push(secs);
            per_iter.extend(marks.windows(2).map(|w| w[1] - w[0]));
        }
    }
    Ok((per_fit, per_iter, dev_name))
}

/// Runs `job(thread, round)` on `threads` threads at once: each thread first runs round 0 as a
/// warm-up, then all start together on rounds 1..=repeats. Returns the wall time of the timed
/// rounds and every sample they returned.
fn on_threads(threads: usize, repeats: usize, job: &(dyn Fn(usize, usize) -> Result<Vec<f64>> + Sync)) -> Result<(f64, Vec<f64>)> {
    let barrier = std::sync::Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Vec<f64>> {
                    let warm = job(t, 0);
                    // Wait even after a failure, or the other threads would wait forever.
                    barrier.wait();
                    warm?;
                    let mut samples = Vec::new();
                    for r in 1..=repeats {
                        samples.extend(job(t, r)?);
                    }
                    Ok(samples)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))??);
        }
        Ok((t0.elapsed().as_secs_f64(), all))
    })
}

/// `n` threads each run `repeats` fits of the same image at once (after one warm-up fit each);
/// images per second = all fits / wall time.
fn concurrent(image: &Arc<Image>, opts: &s3net_model::FitOptions, device: DeviceSpec, n: usize, repeats: usize) -> Result<serde_json::Value> {
    let cancel = AtomicBool::new(false);
    let (wall, per_fit) = on_threads(n, repeats, &|_, _| {
        let t0 = Instant::now();
        s3net_model::segment_with(image, opts, device, 0, &mut |_| {}, &cancel)?;
        Ok(vec![t0.elapsed().as_secs_f64()])
    })?;
    Ok(json!({
        "fits_at_once": n,
        "fits": n * repeats,
        "wall_seconds": wall,
        "images_per_second": (n * repeats) as f64 / wall,
        "seconds_per_fit_median": median(&per_fit),
    }))
}

/// `workers` threads each train `repeats` batches of `n` fits of the image (seeds 0..n), after
/// one warm-up batch each; images per second = all fits / wall time. `trace`: a file and a
/// first step; the first thread's warm-up batch writes an operator-level trace of three steps
/// from there (see `--trace`), without CUDA graphs. `emulate`: on the CPU through the GPU's
/// code paths (see `--emulate-cuda`).
#[allow(clippy::too_many_arguments)]
fn batch(image: &Image, opts: &s3net_model::FitOptions, device: DeviceSpec, n: usize, workers: usize, repeats: usize, trace: Option<(&std::path::Path, usize)>, emulate: bool) -> Result<serde_json::Value> {
    let dev = device.resolve()?;
    let image = Arc::new(image.clone());
    // One batch to the end: the seconds of each of its steps.
    let one_batch = |w: usize, r: usize| -> Result<Vec<f64>> {
        let mut b: s3net_model::Batch<usize> = s3net_model::Batch::new(dev);
        let trace = trace.filter(|_| w == 0 && r == 0);
        if trace.is_some() {
            // A graph's replay is one launch to the profiler, its kernels charged to no op: the
            // traced batch queues its kernels one by one so each op keeps its name.
            b.set_cuda_graphs(false);
        }
        for i in 0..n {
            let job = s3net_model::FitJob {
                image: image.clone(),
                opts: s3net_model::FitOptions { seed: (1000 * w + 100 * r + i) as u64, ..opts.clone() },
                progress: Box::new(|_| {}),
                cancel: Box::new(|| false),
            };
            b.add(i, job).map_err(|(_, e)| e)?;
        }
        let mut steps = Vec::new();
        let mut tracing = None;
        // Everything queued is on the device before the profiler stops and flushes.
        let sync = || {
            if let tch::Device::Cuda(i) = dev {
                tch::Cuda::synchronize(i as i64);
            }
        };
        while !b.is_empty() {
            if let Some((path, from)) = trace {
                if steps.len() == from {
                    tracing = Some(s3net_ops::Trace::start(dev.is_cuda())?);
                } else if steps.len() == from + 3 {
                    if let Some(t) = tracing.take() {
                        sync();
                        t.stop(path)?;
                    }
                }
            }
            let t0 = Instant::now();
            for (_, r) in b.step() {
                r?;
            }
            steps.push(t0.elapsed().as_secs_f64());
        }
        if let (Some(t), Some((path, _))) = (tracing.take(), trace) {
            sync();
            t.stop(path)?;
        }
        Ok(steps)
    };
    let (wall, steps) = on_threads(workers, repeats, &|w, r| if emulate { s3net_ops::emulated_cuda(|| one_batch(w, r)) } else { one_batch(w, r) })?;
    let fits = n * workers * repeats;
    Ok(json!({
        "batch": n,
        "workers": workers,
        "fits": fits,
        "wall_seconds": wall,
        "images_per_second": fits as f64 / wall,
        "seconds_per_step_median": median(&steps),
        "seconds_per_batch": wall / (workers * repeats) as f64,
    }))
}

fn deform(b: OpBench) -> Result<()> {
    let (dev, o) = b.tensor_options()?;
    let (c, s) = (b.channels, b.size);
    tch::manual_seed(0);
    let x = Tensor::randn([1, c, s, s], o).set_requires_grad(true);
    let off = (Tensor::randn([1, 18, s, s], o) * b.offset_std).set_requires_grad(true);
    let mask = Tensor::rand([1, 9, s, s], o).set_requires_grad(true);
    let w = (Tensor::randn([c, c, 3, 3], o) * 0.05).set_requires_grad(true);
    let bias = Tensor::zeros([c], o).set_requires_grad(true);
    let sync = device_sync(dev);
    let tensor_ops: Op = Box::new(|| Ok(deform_conv2d(&x, &off, Some(&mask), &w, Some(&bias), ConvGeometry::same(3))?));
    let fused: Op = Box::new(|| Ok(s3net_ops::deform_conv2d(&x, &off, Some(&mask), &w, Some(&bias), (1, 1), (1, 1), (1, 1))?));
    let time = |op: &Op| time_op(op, b.repeats, &sync);
    let fused_result = match time(&fused) {
        Ok(v) => json!(v),
        // A build without the CUDA kernel: report why instead of a number.
        Err(e) => json!({ "unavailable": e.to_string() }),
    };
    let out = json!({
        "fused": fused_result,
        "tensor_ops": time(&tensor_ops)?,
        "device": format!("{dev:?}"),
        "fused_cuda_kernel_built": s3net_ops::cuda_compiled(),
        "shape": { "input": [1, c, s, s], "kernel": [3, 3], "padding": 1, "offset_std": b.offset_std },
    });
    print_op_bench(out, "deformable conv", &b)
}

/// Prints an op benchmark's JSON, with the threads and repeats it ran with (and a heading on
/// stderr unless `--json`).
fn print_op_bench(mut out: serde_json::Value, what: &str, b: &OpBench) -> Result<()> {
    out["threads"] = json!(tch::get_num_threads());
    out["repeats"] = json!(b.repeats);
    out["precision"] = json!(b.precision);
    if !b.json {
        eprintln!("{what}, medians of {} runs after a warm-up:", b.repeats);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The I-LKA's depthwise convolutions (kernel, dilation; 'same' padding) on 1×C×S×S.
fn depthwise(b: OpBench) -> Result<()> {
    let (dev, o) = b.tensor_options()?;
    let (c, s) = (b.channels, b.size);
    tch::manual_seed(0);
    let sync = device_sync(dev);
    let x = Tensor::randn([1, c, s, s], o).set_requires_grad(true);
    let mut rows = Vec::new();
    let (mut ours_total, mut libtorch_total) = (OpTiming::default(), OpTiming::default());
    for (k, d) in [(5, 1), (3, 1), (5, 2), (7, 3)] {
        let p = d * (k - 1) / 2;
        let w = (Tensor::randn([c, 1, k, k], o) * 0.1).set_requires_grad(true);
        let bias = Tensor::zeros([c], o).set_requires_grad(true);
        let ours: Op = Box::new(|| Ok(s3net_ops::depthwise_conv2d(&x, &w, Some(&bias), p, d)?));
        let libtorch: Op = Box::new(|| Ok(x.conv2d(&w, Some(&bias), [1, 1], [p, p], [d, d], c)));
        let (a, l) = (time_op(&ours, b.repeats, &sync)?, time_op(&libtorch, b.repeats, &sync)?);
        ours_total += a;
        libtorch_total += l;
        rows.push(json!({ "kernel": k, "dilation": d, "padding": p, "ours": a, "libtorch": l }));
    }
    // The block's three parallel branches (the last three geometries) as one op, against the
    // same three convs of ours joined by a cat.
    let branch_params: Vec<(Tensor, Tensor, i64)> = [(3, 1), (5, 2), (7, 3)]
        .iter()
        .map(|&(k, d)| ((Tensor::randn([c, 1, k, k], o) * 0.1).set_requires_grad(true), Tensor::zeros([c], o).set_requires_grad(true), d))
        .collect();
    let joined: Op = Box::new(|| {
        let branch = |i: usize| s3net_ops::Branch { weight: &branch_params[i].0, bias: &branch_params[i].1, dilation: branch_params[i].2 };
        Ok(s3net_ops::depthwise_branches(&x, [branch(0), branch(1), branch(2)], 1)?)
    });
    let three: Op = Box::new(|| {
        let parts = branch_params
            .iter()
            .map(|(w, bias, d)| {
                let p = d * (w.size()[2] - 1) / 2;
                s3net_ops::depthwise_conv2d(&x, w, Some(bias), p, *d)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(&parts, 1))
    });
    let out = json!({
        "geometries": rows,
        "total": { "ours": ours_total, "libtorch": libtorch_total },
        "branches": { "one_op": time_op(&joined, b.repeats, &sync)?, "three_and_cat": time_op(&three, b.repeats, &sync)? },
        "device": format!("{dev:?}"),
        "shape": { "input": [1, c, s, s] },
        // The CUDA kernels' layout (S3NET_DW_COLUMNS; the CPU kernels have one).
        "cuda_layout": if s3net_ops::depthwise_columns() { "columns" } else { "strips" },
    });
    print_op_bench(out, "depthwise convs", &b)
}

/// The loss terms of one fit step on a random 1×K×S×S map: ours and libtorch's.
fn losses(b: OpBench) -> Result<()> {
    use s3net_model::loss;
    let (dev, o) = b.tensor_options()?;
    let (k, s) = (b.channels, b.size);
    tch::manual_seed(0);
    let sync = device_sync(dev);
    let x = (Tensor::randn([1, k, s, s], o) * 3.0).set_requires_grad(true);
    // The affine term's target: the clustering turned a quarter.
    let target = x.detach().argmax(1, false).rot90(1, [1, 2]);
    let response: Op = Box::new(|| {
        let l = s3net_ops::pixel_losses(&x, None, true)?;
        Ok(l.ce + l.continuity.unwrap_or_else(|| Tensor::zeros([1], (Kind::Float, dev))))
    });
    let response_libtorch: Op = Box::new(|| {
        let r = x.to_kind(Kind::Float);
        Ok(loss::self_ce_each(&r).0 + loss::continuity_each(&r))
    });
    let moved: Op = Box::new(|| Ok(s3net_ops::pixel_losses(&x, Some(&target), false)?.ce));
    let moved_libtorch: Op = Box::new(|| Ok(loss::masked_ce_each(&x.to_kind(Kind::Float), &target)));
    let time = |op: &Op| match time_op(op, b.repeats, &sync) {
        Ok(v) => json!(v),
        // The CUDA kernel switched off or not built: say why instead of a number.
        Err(e) => json!({ "unavailable": e.to_string() }),
    };
    // The turned copy's clustering: an argmax, no gradient.
    let argmax_ms = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let mut runs = Vec::new();
        for rep in 0..=b.repeats {
            sync();
            let t0 = Instant::now();
            drop(f()?);
            sync();
            if rep > 0 {
                runs.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(median(&runs))
    };
    let labels = x.detach();
    let out = json!({
        "response_terms": { "fused": time(&response), "libtorch": time(&response_libtorch) },
        "moved_ce": { "fused": time(&moved), "libtorch": time(&moved_libtorch) },
        "argmax_ms": {
            "ours": argmax_ms(&|| Ok(s3net_ops::argmax_channels(&labels)?))?,
            "libtorch": argmax_ms(&|| Ok(labels.argmax(1, false)))?,
        },
        "device": format!("{dev:?}"),
        "shape": { "input": [1, k, s, s] },
    });
    print_op_bench(out, "loss terms", &b)
}
