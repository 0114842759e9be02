//! The per-image self-supervised fit: train a fresh network on one image until its argmax
//! clustering settles, then read the clusters off at the image's own resolution.
//!
//! The loop knows nothing of gRPC or files: it takes an [`Image`], options, a progress callback
//! and a cancellation flag, and returns label maps. [`fit`] trains one image; a [`Batch`]
//! trains many at once in one stack of networks, each job as if alone.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3net_imaging::{Image, LabelMap};
use s3net_ops::{CudaGraph, HostCopy};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::affine::{Affine, Transform};
use crate::loss;
use crate::net::{select_models, S3Net};
use crate::options::{AffineGradient, FitOptions, Kernels, Upsample};
use crate::rng::SplitMix64;
use crate::ModelError;

/// The value of each loss term (already weighted terms sum to `total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossTerms {
    pub total: f64,
    pub ce: f64,
    pub affine: f64,
    pub spatial: f64,
}

/// What the progress callback sees after each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// 1-based step just finished (of this attempt).
    pub iteration: usize,
    pub max_iterations: usize,
    pub losses: LossTerms,
    /// Clusters in use in the argmax map of this step.
    pub labels: usize,
    /// Since this attempt began.
    pub elapsed: Duration,
    /// 1 for the job's first start, one more each time it started over: because the stack it
    /// trained in failed (see [`Batch`]), or with another seed because its foreground came out
    /// empty (see [`crate::segment`]); steps count from 1 again with each attempt.
    pub attempt: usize,
}

/// The result of a fit.
#[derive(Debug, Clone)]
pub struct FitOutput {
    /// Labels at the original resolution, renumbered 0..n−1 by decreasing pixel count; every
    /// label below `n_labels` occurs.
    pub labels: LabelMap,
    /// The same clusters on the S×S grid the network ran on (same numbering; a cluster too
    /// small to survive the resize to the original size appears here only, numbered ≥ n_labels).
    pub grid_labels: LabelMap,
    /// The input as the network saw it, as the foreground rule reads it: S×S, in [0, 1]; a
    /// grey image's values, a colour photograph's channel mean or blue channel
    /// ([`crate::foreground::rule_intensity`]).
    pub grid_intensity: Vec<f32>,
    pub n_labels: usize,
    pub iterations: usize,
    pub losses: LossTerms,
    pub fit_seconds: f64,
    /// The libtorch device it ran on, e.g. "cpu" or "cuda:0".
    pub device: String,
    /// The attempt that produced it (see [`Progress::attempt`]).
    pub attempt: usize,
}

/// Fits S3-Net to one image.
///
/// `progress` is called after every step; `cancel` is checked before every step and makes the
/// fit return [`ModelError::Cancelled`]. Errors raised inside libtorch (including CUDA out of
/// memory) come back as [`ModelError::Torch`]; they never unwind into the caller.
///
/// This is a [`Batch`] of one: the same loop trains one network or many. The image is shared,
/// not copied: a [`Batch`] keeps its jobs' images, and a copy of a large one was 4 bytes a
/// pixel and channel more (1.2 GB for a 10000² colour image).
pub fn fit(
    image: &Arc<Image>,
    opts: &FitOptions,
    device: Device,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<FitOutput, ModelError> {
    fit_as(image, opts, device, 1, progress, cancel)
}

/// [`fit`] as the given attempt (see [`Progress::attempt`]).
pub(crate) fn fit_as(
    image: &Arc<Image>,
    opts: &FitOptions,
    device: Device,
    attempt: usize,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<FitOutput, ModelError> {
    let mut batch = Batch::new(device);
    let job = FitJob {
        image: image.clone(),
        opts: opts.clone(),
        progress: Box::new(|p: &Progress| progress(p)),
        cancel: Box::new(|| cancel.load(Ordering::Relaxed)),
    };
    batch.add_attempt((), job, attempt).map_err(|(_, e)| e)?;
    loop {
        if let Some((_, r)) = batch.step().pop() {
            return r;
        }
    }
}

/// Runs `f`, turning a libtorch panic into [`ModelError::OutOfMemory`] or [`ModelError::Torch`]
/// with its first readable line.
fn catch_torch<R>(f: impl FnOnce() -> Result<R, ModelError>) -> Result<R, ModelError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(ModelError::from_torch(panic_message(&*payload).unwrap_or("unknown libtorch failure"))),
    }
}

/// The text of a panic's payload (what `panic!` and tch's failures carry), if it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}

/// `f` with gradient tracking off, back on as before even when `f` panics.
///
/// Why not `tch::no_grad`: it sets the thread's grad mode back only if `f` returns, and
/// libtorch's failures (out of memory, above all) arrive as panics that [`catch_torch`] turns
/// into errors. A stack that ran out of memory in a forward-only pass left its worker thread
/// with grad mode off, and every later fit on it failed ("element 0 of tensors does not
/// require grad") or trained nothing. The guard's drop runs on unwinding too.
pub(crate) fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}

/// libtorch errors arrive as a panic message (or a `TchError`) wrapping the C++ message and its
/// backtrace; keep only the part a user can read.
pub(crate) fn first_line(msg: &str) -> String {
    let msg = msg.trim();
    let msg = msg.split_once("Torch(\"").map_or(msg, |(_, rest)| rest);
    let cut = ["Exception raised from", "frame #0"].iter().filter_map(|m| msg.find(m)).min().unwrap_or(msg.len());
    let msg = msg[..cut].replace("\\n", " ");
    msg.trim().trim_end_matches("\")").trim().to_string()
}

fn check_image(image: &Image) -> Result<(), ModelError> {
    let (w, h, c) = (image.width as usize, image.height as usize, image.channels as usize);
    if w == 0 || h == 0 {
        return Err(ModelError::InvalidArgument(format!("image is {w}×{h} pixels: nothing to segment")));
    }
    if c != 1 && c != 3 {
        return Err(ModelError::InvalidArgument(format!("image has {c} channels; expected 1 or 3")));
    }
    if image.data.len() != w * h * c {
        return Err(ModelError::InvalidArgument(format!(
            "image buffer holds {} values, expected {c}×{h}×{w}",
            image.data.len()
        )));
    }
    Ok(())
}

/// The image as a `(1, C, S, S)` tensor: antialiased bilinear when shrinking, bilinear when
/// enlarging; grey repeated to 3 channels when asked.
pub fn prepare_input(image: &Image, opts: &FitOptions, device: Device) -> Tensor {
    let (w, h, c) = (image.width as i64, image.height as i64, image.channels as i64);
    assert_eq!(image.data.len() as i64, c * h * w, "image buffer and size disagree");
    // The image is read in place, not copied into a tensor first: the copy was 4 bytes a pixel
    // and channel more at the image's full size (1.2 GB for a 10000² colour image) for a resize
    // that keeps none of it. SAFETY: `image.data` holds exactly c·h·w f32 values (checked
    // above), is only read, and outlives `x`: every tensor this function returns is made by
    // `clamp` below, which writes new storage, and `x` and its views are dropped here.
    let x = unsafe {
        Tensor::from_blob(image.data.as_ptr().cast::<u8>(), &[1, c, h, w], &[c * h * w, h * w, w, 1], Kind::Float, Device::Cpu)
    };
    let x = x.to_device(device);
    let s = opts.size;
    let x = if h == s && w == s {
        x
    } else if h >= s && w >= s {
        x.internal_upsample_bilinear2d_aa([s, s], false, None, None)
    } else {
        x.upsample_bilinear2d([s, s], false, None, None)
    };
    let x = x.clamp(0.0, 1.0);
    let x = if c == 1 && opts.grey_channels == 3 { x.repeat([1, 3, 1, 1]) } else { x };
    match opts.kernels {
        Kernels::Fused => x,
        Kernels::TensorOps => channels_last(&x),
    }
}

/// The same tensor stored NHWC. With libtorch's own depthwise convolutions (oneDNN) the trunk
/// runs about twice as fast on channels-last activations here; our fused kernels prefer NCHW.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// One image to fit, as handed to a [`Batch`].
pub struct FitJob<'a> {
    pub image: Arc<Image>,
    pub opts: FitOptions,
    /// Called after every step of this job.
    pub progress: Box<dyn FnMut(&Progress) + 'a>,
    /// Polled before every step; `true` takes this job (alone) out with [`ModelError::Cancelled`].
    pub cancel: Box<dyn Fn() -> bool + 'a>,
}

/// A job inside a batch: its network is block `j` of the stack when it sits at `slots[j]`.
struct Slot<'a, T> {
    tag: T,
    job: FitJob<'a>,
    /// The prepared input, `(1, C, S, S)`.
    x: Tensor,
    /// The job's own stream of random transforms.
    rng: SplitMix64,
    /// Steps whose results were read.
    iterations: usize,
    /// Steps queued, read or not.
    launched: usize,
    /// Unique within the batch: names the slot in a [`Launched`] step after others left.
    id: u64,
    start: Instant,
    /// See [`Progress::attempt`].
    attempt: usize,
}

/// A job waiting for room in the stack: one of a stack that failed, to start over, or one that
/// could not join.
struct Waiting<'a, T> {
    tag: T,
    job: FitJob<'a>,
    /// The attempt it starts as.
    attempt: usize,
}

/// The most networks a batch stacks after a stack of `failed` failed: half of that at first,
/// one more for every job that completes since, never `failed` again.
#[derive(Debug, Clone, Copy)]
struct StackLimit {
    now: usize,
    failed: usize,
}

/// Several fits trained as one: M networks of the same shape stacked into one (see
/// [`S3Net::stack`]), one forward, one backward and one SGD step for all of them per step.
///
/// Why: a single 256² fit leaves a GPU mostly idle (its step is a few hundred small kernel
/// launches), so M fits in one stack cost little more per step than one. Each job keeps its
/// own weights, seed, transforms, iteration budget, early stop, progress and cancellation, and
/// gets the same result as fitted alone (up to floating-point summation order on a GPU). Jobs
/// join between steps ([`add`](Self::add)) and leave as soon as they finish, so a worker can
/// keep the stack full from its queue.
///
/// On a GPU the host is what limits a small stack, so there each step is queued before the
/// previous one's results are read ([`set_pipelined`](Self::set_pipelined)), and a stack of up
/// to 64 (see [`set_cuda_graph_max_models`]) that stays unchanged replays its step as a CUDA
/// graph ([`set_cuda_graphs`](Self::set_cuda_graphs)). A batch holds
/// [`CudaGraph::outside_capture`] while it queues steps and adds, drops or reads out jobs, so
/// that no other batch's capture runs meanwhile.
///
/// A libtorch failure of a stack of several jobs (out of GPU memory, typically, once the stack
/// has grown) fails none of them: they start over from their seeds in stacks of at most half
/// as many (see [`limit`](Self::limit)), so each ends as if it had been fitted alone. Only a
/// job that fails on its own fails.
///
/// `T` is the caller's handle for a job; it comes back with the job's outcome.
pub struct Batch<'a, T> {
    device: Device,
    slots: Vec<Slot<'a, T>>,
    /// Jobs waiting for room under `limit`, in order.
    waiting: VecDeque<Waiting<'a, T>>,
    limit: Option<StackLimit>,
    /// Jobs started over since this batch was made.
    restarts: u64,
    net: Option<S3Net>,
    velocity: Vec<Tensor>,
    /// The slots' inputs side by side, `(1, M·C, S, S)`; rebuilt when the membership changes.
    inputs: Option<Tensor>,
    /// The last step's transforms, grid side and grids: a fixed transform (the default 90°
    /// rotation) needs its grid built once, not every step.
    grids: Option<(Vec<Affine>, i64, Transform)>,
    /// A step queued but not read yet (see [`set_pipelined`](Self::set_pipelined)).
    pending: Option<Launched>,
    pipelined: bool,
    next_id: u64,
    /// The captured step of the current stack, if any (see `run_step`).
    graph: Option<StepGraph>,
    /// Eager steps since the stack or its transforms last changed.
    steady: usize,
    cuda_graphs: bool,
    /// The largest stack captured into a graph: the process's when this batch was made
    /// ([`set_cuda_graph_max_models`]).
    graph_max_models: i64,
}

/// A step queued on the device whose statistics have not been read back yet.
struct Launched {
    /// The slots it trained, by [`Slot::id`], in stack order.
    ids: Vec<u64>,
    /// `(M, K, S, S)` detached.
    response: Tensor,
    /// `(M, S, S)` argmax.
    target: Tensor,
    /// `(M, 5)` on its way to the host: total, ce, affine, spatial, labels in use.
    stats: HostCopy,
}

impl Launched {
    /// Waits for this step's statistics (and only for them: a step queued after it keeps
    /// running): per job total, ce, affine, spatial, labels in use.
    fn read(&self) -> Result<Vec<[f32; 5]>, ModelError> {
        let stats = self.stats.wait()?;
        let flat = Vec::<f32>::try_from(stats.flatten(0, -1))?;
        Ok(flat.chunks_exact(5).map(|c| [c[0], c[1], c[2], c[3], c[4]]).collect())
    }
}

impl<'a, T> Batch<'a, T> {
    /// An empty batch on `device`, pipelined on a GPU (see [`set_pipelined`](Self::set_pipelined)).
    /// A batch stays on the thread that made it (it is not `Send`), so that thread gets its own
    /// CUDA stream here, once.
    pub fn new(device: Device) -> Self {
        if let Device::Cuda(i) = device {
            own_stream(i);
        }
        Batch {
            device,
            slots: Vec::new(),
            waiting: VecDeque::new(),
            limit: None,
            restarts: 0,
            net: None,
            velocity: Vec::new(),
            inputs: None,
            grids: None,
            pending: None,
            pipelined: s3net_ops::gpu_paths(device),
            next_id: 0,
            graph: None,
            steady: 0,
            cuda_graphs: device.is_cuda() && CUDA_GRAPHS.load(Ordering::Relaxed),
            graph_max_models: graph_max_models(),
        }
    }

    /// Whether stacks on a GPU run their steps as CUDA graph replays once they are steady
    /// (default: on for a GPU unless [`set_cuda_graphs`] turned it off; see `run_step`).
    /// Results are the same up to floating-point summation order.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on && self.device.is_cuda();
        if !self.cuda_graphs {
            self.forget_graph();
        }
    }

    /// Whether [`step`](Self::step) queues the following step before it reads the results of
    /// its own. Results are the same either way; only the timing differs.
    ///
    /// Why: the host must read every step's losses and label counts to know whether a job has
    /// ended, and on a GPU the host then spends a few milliseconds queueing the next step's
    /// few hundred kernels while the GPU idles: a third of a lone fit's time on an H100.
    /// Queued one step ahead, the GPU always has work. The price is one step computed in vain
    /// when a job stops early. On the CPU, where a step runs while it is queued, that step is
    /// all there is to it, so the default is off there.
    pub fn set_pipelined(&mut self, on: bool) {
        self.pipelined = on;
    }

    /// Whether the current stack's steps run as replays of a CUDA graph.
    pub fn replays_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// Jobs in the batch: training, or waiting for room (see [`limit`](Self::limit)).
    pub fn len(&self) -> usize {
        self.slots.len() + self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.waiting.is_empty()
    }

    /// The most jobs the batch stacks at once since a stack failed; `None` if none has. A caller
    /// that keeps the batch full should not add jobs beyond it: they would wait inside.
    ///
    /// Why: a stack's memory grows with its size, and a stack that ran out of it would again.
    /// The limit starts at half the failed size and grows by one with every job that completes,
    /// up to one below the failed size, so a worker finds the largest stack that fits.
    pub fn limit(&self) -> Option<usize> {
        self.limit.map(|l| l.now)
    }

    /// Jobs started over after their stack failed, since this batch was made.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Whether a job with these options and this image can join: an empty batch takes any; a
    /// running one takes jobs whose networks have the same shape and whose training differs
    /// only in seed, iteration budget, early stop and upsampling.
    pub fn accepts(&self, opts: &FitOptions, image: &Image) -> bool {
        let member = self.slots.first().map(|s| &s.job).or(self.waiting.front().map(|r| &r.job));
        member.is_none_or(|j| batch_key(&j.opts, &j.image) == batch_key(opts, image))
    }

    /// Adds a job; it trains from the next [`step`](Self::step). Invalid options or images, a
    /// job that does not fit this batch (see [`accepts`](Self::accepts)) and, in an empty batch,
    /// libtorch failures (e.g. out of memory) give the job back with the reason; the batch is
    /// unchanged. A job that cannot join a running stack for a libtorch failure is not at
    /// fault: it waits inside the batch, and the stack's [`limit`](Self::limit) becomes its
    /// current size, until a job ends and makes room.
    pub fn add(&mut self, tag: T, job: FitJob<'a>) -> Result<(), (T, ModelError)> {
        self.join(tag, job, 1)
    }

    /// [`add`](Self::add) for a job that starts over as the given attempt (its progress and
    /// result say so): e.g. refitted with another seed after its foreground came out empty.
    pub fn add_attempt(&mut self, tag: T, job: FitJob<'a>, attempt: usize) -> Result<(), (T, ModelError)> {
        self.join(tag, job, attempt.max(1))
    }

    /// [`add`](Self::add) as the given attempt.
    fn join(&mut self, tag: T, job: FitJob<'a>, attempt: usize) -> Result<(), (T, ModelError)> {
        if let Err(e) = job.opts.validate().and_then(|_| check_image(&job.image)) {
            return Err((tag, e));
        }
        if !self.accepts(&job.opts, &job.image) {
            let e = ModelError::InvalidArgument("job options differ from the batch's".into());
            return Err((tag, e));
        }
        let device = self.device;
        let joined = catch_torch(|| {
            let _shared = CudaGraph::outside_capture(device);
            let o = &job.opts;
            let x = prepare_input(&job.image, o, device);
            let net = S3Net::new(o.seed, device, x.size()[1], o.features, o.blocks, o.offsets, o.size, o.kernels, o.precision);
            let fresh: Vec<Tensor> = net.parameters().iter().map(|p| p.zeros_like()).collect();
            // Everything that can fail comes before the batch changes.
            match self.net.as_mut() {
                None => {
                    self.net = Some(net);
                    self.velocity = fresh;
                }
                Some(old) => {
                    let v = no_grad(|| self.velocity.iter().zip(&fresh).map(|(a, b)| Tensor::cat(&[a, b], 0)).collect());
                    old.stack(net);
                    self.velocity = v;
                }
            }
            Ok(x)
        });
        let x = match joined {
            Ok(x) => x,
            Err(e) if !self.slots.is_empty() => {
                let now = self.slots.len();
                tracing::warn!(jobs = now, error = %e, "a job could not join a stack of {now}; it waits for room");
                self.limit = Some(StackLimit { now, failed: now + 1 });
                self.waiting.push_back(Waiting { tag, job, attempt });
                return Ok(());
            }
            Err(e) => return Err((tag, e)),
        };
        self.inputs = None;
        self.forget_graph();
        // A separate stream for the transforms, so that changing the affine ranges never
        // changes the initial weights of the same seed.
        let rng = SplitMix64::new(job.opts.seed.wrapping_mul(0x9E37_79B9).wrapping_add(1));
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot { tag, job, x, rng, iterations: 0, launched: 0, id, start: Instant::now(), attempt });
        Ok(())
    }

    /// One SGD step of every job: its progress is reported, and the jobs that ended with it —
    /// finished, early-stopped, diverged or cancelled — are returned and removed from the
    /// batch. When pipelined, the step read here is the one queued by the previous call, and
    /// this call queues the next. A libtorch failure of a stack of several jobs sends them
    /// all back to the start, to train again from the next call in smaller stacks (their
    /// progress starts over from step 1); a job that fails alone ends with the error.
    pub fn step(&mut self) -> Vec<(T, Result<FitOutput, ModelError>)> {
        let mut ended = Vec::new();
        let cancelled: Vec<usize> = (0..self.slots.len()).filter(|&j| (self.slots[j].job.cancel)()).collect();
        for s in self.remove(&cancelled) {
            ended.push((s.tag, Err(ModelError::Cancelled)));
        }
        for r in std::mem::take(&mut self.waiting) {
            if (r.job.cancel)() {
                ended.push((r.tag, Err(ModelError::Cancelled)));
            } else {
                self.waiting.push_back(r);
            }
        }
        while self.slots.len() < self.limit.map_or(usize::MAX, |l| l.now) {
            let Some(r) = self.waiting.pop_front() else { break };
            if let Err((tag, e)) = self.join(r.tag, r.job, r.attempt) {
                ended.push((tag, Err(e)));
            }
        }
        if self.slots.is_empty() {
            return ended;
        }
        let read = catch_torch(|| {
            let current = match self.pending.take() {
                Some(p) => p,
                None => self.launch()?,
            };
            // The next step goes in the queue before this one is read, unless every job is
            // known to end with this one.
            if self.pipelined && self.slots.iter().any(|s| s.launched < s.job.opts.iterations) {
                self.pending = Some(self.launch()?);
            }
            let stats = current.read()?;
            Ok((current, stats))
        });
        let (out, stats) = match read {
            Ok(read) => read,
            Err(e) => {
                self.pending = None;
                let all: Vec<usize> = (0..self.slots.len()).collect();
                let failed = all.len();
                if failed == 1 {
                    if let Some(s) = self.remove(&all).pop() {
                        ended.push((s.tag, Err(e)));
                    }
                    return ended;
                }
                let msg = match e {
                    ModelError::Torch(m) | ModelError::OutOfMemory(m) => m,
                    other => other.to_string(),
                };
                let now = (failed / 2).max(1);
                tracing::warn!(jobs = failed, error = %msg, "a stack of {failed} jobs failed; they start over in stacks of at most {now}");
                self.limit = Some(StackLimit { now, failed });
                for s in self.remove(&all) {
                    self.waiting.push_back(Waiting { tag: s.tag, job: s.job, attempt: s.attempt + 1 });
                    self.restarts += 1;
                }
                return ended;
            }
        };
        let mut finished: Vec<(usize, Result<FitOutput, ModelError>)> = Vec::new();
        for (j, id) in out.ids.iter().enumerate() {
            // A job cancelled since the step was queued is gone already.
            let Some(pos) = self.slots.iter().position(|s| s.id == *id) else { continue };
            let slot = &mut self.slots[pos];
            let [total, ce, affine, spatial, labels] = stats[j].map(f64::from);
            let losses = LossTerms { total, ce, affine, spatial };
            let labels = labels as usize;
            slot.iterations += 1;
            let o = &slot.job.opts;
            (slot.job.progress)(&Progress {
                iteration: slot.iterations,
                max_iterations: o.iterations,
                losses,
                labels,
                elapsed: slot.start.elapsed(),
                attempt: slot.attempt,
            });
            let outcome = if !total.is_finite() {
                Some(Err(ModelError::Diverged { iteration: slot.iterations }))
            } else if slot.iterations >= o.iterations || (o.min_labels > 0 && slot.iterations >= 5 && labels <= o.min_labels) {
                Some(catch_torch(|| {
                    let _shared = CudaGraph::outside_capture(self.device);
                    output(slot, &out, j, losses, self.device)
                }))
            } else {
                None
            };
            if let Some(r) = outcome {
                finished.push((pos, r));
            }
        }
        if let Some(l) = self.limit.as_mut() {
            let completed = finished.iter().filter(|(_, r)| r.is_ok()).count();
            l.now = (l.now + completed).min(l.failed - 1).max(1);
        }
        finished.sort_by_key(|(pos, _)| *pos);
        let which: Vec<usize> = finished.iter().map(|(j, _)| *j).collect();
        let removed = self.remove(&which);
        for (s, (_, r)) in removed.into_iter().zip(finished) {
            ended.push((s.tag, r));
        }
        ended
    }

    /// Takes every job out of the batch, unfinished, and hands back their handles (e.g. to fail
    /// them after a panic outside libtorch).
    pub fn drain(&mut self) -> Vec<T> {
        let all: Vec<usize> = (0..self.slots.len()).collect();
        let mut tags: Vec<T> = self.remove(&all).into_iter().map(|s| s.tag).collect();
        tags.extend(self.waiting.drain(..).map(|r| r.tag));
        tags
    }

    /// Takes the slots at `which` (ascending) out of the batch and their networks out of the
    /// stack.
    fn remove(&mut self, which: &[usize]) -> Vec<Slot<'a, T>> {
        if which.is_empty() {
            return Vec::new();
        }
        let keep: Vec<i64> = (0..self.slots.len()).filter(|j| !which.contains(j)).map(|j| j as i64).collect();
        let m = self.slots.len() as i64;
        if keep.is_empty() {
            self.net = None;
            self.velocity.clear();
            self.pending = None;
        } else if let Some(net) = self.net.as_mut() {
            let _shared = CudaGraph::outside_capture(self.device);
            net.retain(&keep);
            self.velocity = self.velocity.iter().map(|v| select_models(v, m, &keep)).collect();
        }
        self.inputs = None;
        self.forget_graph();
        let mut out: Vec<Slot<'a, T>> = which.iter().rev().map(|&j| self.slots.remove(j)).collect();
        out.reverse();
        out
    }

    /// Queues one SGD step of every job in the stack and starts copying its statistics to the
    /// host; nothing here waits for the device.
    fn launch(&mut self) -> Result<Launched, ModelError> {
        let m = self.slots.len() as i64;
        let x = match &self.inputs {
            Some(x) => x.shallow_clone(),
            None => {
                let x = Tensor::cat(&self.slots.iter().map(|s| s.x.shallow_clone()).collect::<Vec<_>>(), 1);
                self.inputs = Some(x.shallow_clone());
                x
            }
        };
        // Every job of a batch shares these (see `batch_key`).
        let opts = self.slots[0].job.opts.clone();
        let grid = if opts.weights.affine > 0.0 {
            // Drawn for every job at every step, so that a job's transforms do not depend on
            // how its steps run.
            let ts: Vec<Affine> = self.slots.iter_mut().map(|s| Affine::draw(&mut s.rng, &s.job.opts.affine)).collect();
            match &self.grids {
                Some((last, s, g)) if *last == ts && *s == opts.size => Some(g.shallow_clone()),
                _ => {
                    let g = Transform::new(&ts, &self.slots[0].x);
                    self.grids = Some((ts, opts.size, g.shallow_clone()));
                    // The graph read the old grid.
                    self.forget_graph();
                    Some(g)
                }
            }
        } else {
            None
        };
        let ([response, target], stats) = self.run_step(&x, grid.as_ref(), &opts, m)?;
        let ids = self.slots.iter_mut().map(|s| {
            s.launched += 1;
            s.id
        });
        Ok(Launched { ids: ids.collect(), response, target, stats })
    }

    /// Runs (queues) the step's tensor work: eagerly, or as a replay of a CUDA graph of it.
    ///
    /// On a GPU a stack of up to [`GRAPH_MAX_MODELS`] networks (see [`set_cuda_graph_max_models`])
    /// whose membership and transforms have not changed for [`GRAPH_AFTER_STEPS`] steps is
    /// captured into a graph (the eager
    /// steps before warm libtorch up: gradients allocated, cuDNN and cuBLAS set up), and each
    /// step from then on is one replay. The replay writes the same output tensors every time,
    /// so the response and target are copied out for the step that reads them later. A capture
    /// that fails is logged and the batch stays eager.
    fn run_step(&mut self, x: &Tensor, grid: Option<&Transform>, opts: &FitOptions, m: i64) -> Result<([Tensor; 2], HostCopy), ModelError> {
        let net = self.net.as_ref().ok_or_else(|| ModelError::Torch("batch has no network".into()))?;
        let device = self.device;
        let replay = |g: &StepGraph| -> Result<([Tensor; 2], HostCopy), ModelError> {
            let _shared = CudaGraph::outside_capture(device);
            g.graph.replay()?;
            let [r, t, s] = &g.out;
            Ok(([r.copy(), t.copy()], HostCopy::start(s)?))
        };
        if let Some(g) = &self.graph {
            return replay(g);
        }
        if let (Device::Cuda(index), true) = (device, self.cuda_graphs) {
            if m <= self.graph_max_models && self.steady >= GRAPH_AFTER_STEPS {
                let velocity = &self.velocity;
                match CudaGraph::capture(index, || step_tensors(net, velocity, x, grid, opts, m, device)) {
                    Ok((graph, out)) => {
                        let g = StepGraph { out, graph };
                        let r = replay(&g);
                        self.graph = Some(g);
                        return r;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "CUDA graph capture failed; this batch goes on without graphs");
                        self.cuda_graphs = false;
                    }
                }
            }
        }
        self.steady += 1;
        let _shared = CudaGraph::outside_capture(device);
        let [r, t, s] = step_tensors(net, &self.velocity, x, grid, opts, m, device)?;
        Ok(([r, t], HostCopy::start(&s)?))
    }

    /// Drops the CUDA graph (the stack or its inputs changed) and restarts the count of steady
    /// steps.
    fn forget_graph(&mut self) {
        if self.graph.is_some() {
            let _shared = CudaGraph::outside_capture(self.device);
            self.graph = None;
        }
        self.steady = 0;
    }
}

impl<T> Drop for Batch<'_, T> {
    /// A graph is dropped under the capture gate, like every other change to GPU memory a
    /// batch makes: dropping it hands its memory pool back, which must not run beside another
    /// batch's capture.
    fn drop(&mut self) {
        self.forget_graph();
    }
}

static CUDA_GRAPHS: AtomicBool = AtomicBool::new(true);

/// Whether batches made from now on (every fit runs in one) replay the steps of small steady
/// stacks on a GPU as CUDA graphs; on by default. Off is for comparison and as an operator's
/// way out (`workers.cuda_graphs`); results are the same either way.
pub fn set_cuda_graphs(on: bool) {
    CUDA_GRAPHS.store(on, Ordering::Relaxed);
}

/// Stacks up to this many networks are captured into CUDA graphs (see `Batch::run_step`),
/// unless [`set_cuda_graph_max_models`] or the environment's `S3NET_GRAPH_MAX_MODELS` (read
/// once, for the GPU check's binaries) says otherwise. Why 64 and not the 4 it was: a step of
/// a stack launches about 600 kernels however many networks it holds, and eager ones kept an
/// H200 busy only 86 % of a 16-network bfloat16 step.
/// Replayed as graphs, stacks of 16, 32 and 64 ran 7.3, 5.6 and 4.9 % more images per second
/// (2026-11-30, `docs/gpu-checks/2026-11-30-h200-kernels/`); 64 is the largest timed.
const GRAPH_MAX_MODELS: i64 = 64;

/// The process's graph limit once set (-1: not set, see [`graph_max_models`]).
static GRAPH_MAX_SET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);

/// The largest stack that batches made from now on capture into a CUDA graph (default 64, see
/// `GRAPH_MAX_MODELS`; 0: none, not even a lone job). Why a setting: a stack that changes every
/// few steps (a server whose jobs end and start) recaptures its graph each time, and the
/// server's steady rate with 160 jobs was 4–6 % lower with graphs up to 64 than up to 4 (one
/// run each, H200, 2026-11-30), so the server passes its own (`workers.cuda_graph_max_jobs`).
pub fn set_cuda_graph_max_models(n: usize) {
    GRAPH_MAX_SET.store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
}

fn graph_max_models() -> i64 {
    let set = GRAPH_MAX_SET.load(Ordering::Relaxed);
    if set >= 0 {
        return set;
    }
    static ENV: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| std::env::var("S3NET_GRAPH_MAX_MODELS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(GRAPH_MAX_MODELS))
}

/// Eager steps of an unchanged stack before its capture.
const GRAPH_AFTER_STEPS: usize = 2;

/// A captured step and the tensors each replay rewrites: response, target, statistics.
struct StepGraph {
    out: [Tensor; 3],
    graph: CudaGraph,
}

/// One training step of a stack of `m` networks on the inputs `x` `(1, M·C, S, S)`: forward,
/// the three loss terms per network, backward and the SGD update. Returns the detached
/// response `(M, K, S, S)`, its argmax `(M, S, S)` and per network `(M, 5)`: total, ce, affine,
/// spatial, labels in use. `grid` moves the images for the affine term (None without it).
/// It never reads a value back to the host, so that it can be captured into a CUDA graph.
fn step_tensors(
    net: &S3Net,
    velocity: &[Tensor],
    x: &Tensor,
    grid: Option<&Transform>,
    opts: &FitOptions,
    m: i64,
    device: Device,
) -> Result<[Tensor; 3], ModelError> {
    let (k, size) = (opts.features, opts.size);
    let c = x.size()[1] / m;
    let w = opts.weights;
    // The images moved by the affine term's transforms, T(x).
    let moved = |grid: &Transform| grid.apply(&x.reshape([m, c, size, size])).reshape([1, m * c, size, size]);
    let (response, at) = match grid {
        Some(grid) if opts.affine_gradient == AffineGradient::Original => {
            // T(x) forward only: its clustering, moved back, is what the auxiliary head
            // predicts on x. Its activations are dropped as each op ends; one backward pass.
            let xt = moved(grid);
            let back = no_grad(|| {
                grid.move_labels_back(&net.response(&net.trunk(&xt)).reshape([m, k, size, size]))
            });
            let f = net.trunk(x);
            (net.response(&f), Some(AffinePrediction::OnX { aux: net.aux(&f), target: back }))
        }
        Some(grid) => {
            let xt = moved(grid);
            if s3net_ops::gpu_paths(device) {
                // On a GPU, one pass over the image and its transformed copy as a batch of two
                // (BatchNorm still normalises each on its own): half the kernel launches.
                // Split, not narrowed twice: a narrow's backward writes a zero tensor of the
                // whole batch and copies its half in, and the two are then added; a split's
                // backward joins the two halves once.
                let f = net.trunk(&Tensor::cat(&[x, &xt], 0)).split(1, 0);
                (net.response(&f[0]), Some(AffinePrediction::OnMoved(net.aux(&f[1]))))
            } else {
                // Two batch-1 passes rather than one batch of 2: each pass keeps its working
                // set inside the CPU's last-level cache (measured ~1.5x faster).
                (net.response(&net.trunk(x)), Some(AffinePrediction::OnMoved(net.aux(&net.trunk(&xt)))))
            }
        }
        None => (net.response(&net.trunk(x)), None),
    };

    // The maps come in the activations' format; the loss terms add in float32 either way.
    let r = response.reshape([m, k, size, size]);
    let spatial = (w.spatial > 0.0).then_some(opts.spatial);
    let (l_ce, l_sp, target) = loss::response_terms(&r, spatial, opts.kernels);
    let zeros = || Tensor::zeros([m], (Kind::Float, device));
    let l_sp = l_sp.unwrap_or_else(zeros);
    let l_at = match (at, grid) {
        (Some(AffinePrediction::OnX { aux, target }), _) => loss::moved_ce(&aux.reshape([m, k, size, size]), &target, opts.kernels),
        (Some(AffinePrediction::OnMoved(aux_t)), Some(grid)) => {
            // Target: the clustering of x, moved by the same transform.
            let target_t = grid.move_labels(&r.detach(), &target);
            loss::moved_ce(&aux_t.reshape([m, k, size, size]), &target_t, opts.kernels)
        }
        _ => zeros(),
    };
    // Per job; their sum trains each network on its own loss alone.
    let total = &l_ce * w.ce + &l_at * w.affine + &l_sp * w.spatial;
    total.sum(Kind::Float).backward();
    sgd_step(net, velocity, opts)?;

    let labels = labels_in_use(&target, k);
    let stats = Tensor::stack(&[&total, &l_ce, &l_at, &l_sp, &labels.to_kind(Kind::Float)], 1).detach();
    Ok([r.detach(), target, stats])
}

/// One momentum-SGD step of every parameter at `lr`, the free offsets and mask at
/// `lr · offset_lr` (two groups of multi-tensor launches; one when their rate is the same).
fn sgd_step(net: &S3Net, velocity: &[Tensor], opts: &FitOptions) -> Result<(), ModelError> {
    let params = net.parameters();
    let Some(own) = net.free_sampling_params().filter(|_| opts.offset_lr != 1.0) else {
        return Ok(s3net_ops::sgd_step(&params, velocity, opts.lr, opts.momentum)?);
    };
    let (mut rest, mut rest_v, mut sampling, mut sampling_v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (p, v)) in params.into_iter().zip(velocity).enumerate() {
        if own.contains(&i) {
            sampling.push(p);
            sampling_v.push(v.shallow_clone());
        } else {
            rest.push(p);
            rest_v.push(v.shallow_clone());
        }
    }
    s3net_ops::sgd_step(&rest, &rest_v, opts.lr, opts.momentum)?;
    Ok(s3net_ops::sgd_step(&sampling, &sampling_v, opts.lr * opts.offset_lr, opts.momentum)?)
}

/// The affine term's prediction: the auxiliary head's output on T(x), whose target (the
/// response's clustering moved by T) comes after the response's loss terms; or its output on x
/// with the target already computed from T(x)'s forward-only pass.
enum AffinePrediction {
    OnMoved(Tensor),
    OnX { aux: Tensor, target: Tensor },
}

/// What two jobs must share to train in one stack: everything but the seed, the iteration
/// budget, the early stop and the upsampling; and the network's input channels.
fn batch_key(opts: &FitOptions, image: &Image) -> (FitOptions, i64) {
    let o = FitOptions { seed: 0, iterations: 1, min_labels: 0, upsample: Upsample::Logits, ..opts.clone() };
    let c = image.channels as i64;
    (o, if c == 1 { opts.grey_channels } else { c })
}

/// Clusters in use per image of the `(M, S, S)` argmax map: `(M,)` int64. A scatter rather than
/// `bincount`, which on CUDA reads the maximum back to the host (a sync per step).
fn labels_in_use(target: &Tensor, k: i64) -> Tensor {
    let m = target.size()[0];
    let shift = (Tensor::arange(m, (Kind::Int64, target.device())) * k).view([m, 1, 1]);
    let idx = (target + shift).flatten(0, -1);
    let counts = Tensor::zeros([m * k], (Kind::Int64, target.device())).scatter_add(0, &idx, &idx.ones_like());
    counts.view([m, k]).gt(0).sum_dim_intlist([1].as_slice(), false, Kind::Int64)
}

/// What the foreground rule reads of the input `x` (1×C×S×S, in [0, 1]): its channel mean,
/// or for a colour photograph that or its blue channel ([`crate::foreground::rule_intensity`]).
fn rule_intensity(x: &Tensor, kind: s3net_imaging::ImageKind) -> Result<Vec<f32>, ModelError> {
    let plane = |t: Tensor| Vec::<f32>::try_from(t.flatten(0, -1).to_device(Device::Cpu));
    let grey = plane(x.mean_dim(1, false, Kind::Float))?;
    let blue = match kind == s3net_imaging::ImageKind::Colour && x.size().get(1) == Some(&3) {
        true => Some(plane(x.select(1, 2).to_kind(Kind::Float))?),
        false => None,
    };
    Ok(crate::foreground::rule_intensity(grey, blue))
}

/// The result of slot `j` from the step that finished it.
fn output<T>(slot: &Slot<'_, T>, out: &Launched, j: usize, losses: LossTerms, device: Device) -> Result<FitOutput, ModelError> {
    let j = j as i64;
    let (image, opts) = (&*slot.job.image, &slot.job.opts);
    let (grid_labels, labels, n) = read_labels(&out.response.narrow(0, j, 1), &out.target.narrow(0, j, 1), image, opts);
    let grid_intensity = rule_intensity(&slot.x, image.kind)?;
    Ok(FitOutput {
        labels,
        grid_labels,
        grid_intensity,
        n_labels: n,
        iterations: slot.iterations,
        losses,
        fit_seconds: slot.start.elapsed().as_secs_f64(),
        device: device_name(device),
        attempt: slot.attempt,
    })
}

thread_local! {
    /// CUDA devices on which this thread already queues on a stream of its own.
    static OWN_STREAM: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives the calling thread a CUDA stream of its own on `device`, once: concurrent fits on
/// one GPU (one per worker thread) then overlap rather than serialise on the default stream.
/// Once per thread, not per fit, because libtorch's caching allocator reuses freed memory only
/// on the stream that freed it.
fn own_stream(device: usize) {
    OWN_STREAM.with(|set| {
        let mut set = set.borrow_mut();
        if !set.contains(&device) && s3net_ops::use_pool_stream(device).is_ok() {
            set.push(device);
        }
    });
}

/// A device as `FitOutput::device` names it, e.g. "cpu" or "cuda:0".
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

/// Grid and full-resolution label maps and the number of labels in the full-resolution map.
///
/// Labels are numbered by decreasing pixel count on the grid, clusters present at full
/// resolution first: a tiny cluster can vanish when the logits are upsampled, and the returned
/// map must hold exactly labels 0..n−1. Such a cluster keeps a number ≥ n on the grid only.
fn read_labels(response: &Tensor, target: &Tensor, image: &Image, opts: &FitOptions) -> (LabelMap, LabelMap, usize) {
    let k = opts.features;
    let counts = Vec::<i64>::try_from(target.flatten(0, -1).bincount(None::<Tensor>, k).to_device(Device::Cpu))
        .unwrap_or_default();
    let mut used: Vec<i64> = (0..k).filter(|&i| counts.get(i as usize).copied().unwrap_or(0) > 0).collect();
    used.sort_by_key(|&i| std::cmp::Reverse(counts[i as usize]));
    let raw_grid = Vec::<i64>::try_from(target.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default();
    let s = opts.size as u32;

    let (w0, h0) = (image.width as i64, image.height as i64);
    let same_size = w0 == opts.size && h0 == opts.size;
    // Logit upsampling holds n_used × H × W floats; beyond ~64M values fall back to nearest.
    let logits_ok = opts.upsample == Upsample::Logits && (used.len() as i64) * h0 * w0 <= 64 << 20;
    // Full-resolution map as raw cluster indices, in the u16 of the final map (k ≤ 256): an
    // i64 map at the image's size was 8 bytes a pixel, 800 MB at 10000².
    let raw_full: Vec<u16> = if same_size {
        raw_grid.iter().map(|&i| i as u16).collect()
    } else if logits_ok {
        let idx = Tensor::from_slice(&used).to_device(response.device());
        // (The response is in the activations' format; upsampled in float32 whatever it is.)
        let sel = response.index_select(1, &idx).to_kind(Kind::Float);
        let up = crate::affine::channel_argmax(&sel.upsample_bilinear2d([h0, w0], false, None, None));
        // `up` indexes into `used`.
        let up = Vec::<i64>::try_from(up.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default();
        up.iter().map(|&i| used[i as usize] as u16).collect()
    } else {
        let g = LabelMap { width: s, height: s, data: raw_grid.iter().map(|&i| i as u16).collect() };
        nearest(&g, w0 as u32, h0 as u32).data
    };
    let mut present = vec![false; k as usize];
    for &i in &raw_full {
        present[i as usize] = true;
    }
    // Present clusters first (stable: by grid count within each group).
    used.sort_by_key(|&i| !present[i as usize]);
    let n = used.iter().filter(|&&i| present[i as usize]).count();
    let mut rank = vec![0u16; k as usize];
    for (r, &i) in used.iter().enumerate() {
        rank[i as usize] = r as u16;
    }
    let grid = LabelMap { width: s, height: s, data: raw_grid.iter().map(|&i| rank[i as usize]).collect() };
    let mut data = raw_full;
    for i in &mut data {
        *i = rank[*i as usize];
    }
    let full = LabelMap { width: w0 as u32, height: h0 as u32, data };
    (grid, full, n)
}

/// Nearest-neighbour resize of a label map (PyTorch's `nearest` index rule).
pub fn nearest(m: &LabelMap, w: u32, h: u32) -> LabelMap {
    let mut data = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h as u64 {
        let sy = (y * m.height as u64 / h as u64) as usize;
        for x in 0..w as u64 {
            let sx = (x * m.width as u64 / w as u64) as usize;
            data.push(m.data[sy * m.width as usize + sx]);
        }
    }
    LabelMap { width: w, height: h, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3net_imaging::ImageKind;
    use crate::options::OffsetMode;

    /// What a client reads of a libtorch failure: the message, not the C++ backtrace after it,
    /// in either of libtorch's two formats.
    #[test]
    fn libtorch_messages_lose_their_backtrace() {
        let oom = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: \
                   you tried to allocate 1048576 bytes. Error code 12 (Cannot allocate memory)\n\
                   frame #0: c10::ThrowEnforceNotMet(char const*, int) + 0x6a (0x7f in libc10.so)\n\
                   frame #1: c10::alloc_cpu(unsigned long) + 0x365";
        assert_eq!(
            super::first_line(oom),
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: \
             you tried to allocate 1048576 bytes. Error code 12 (Cannot allocate memory)"
        );
        let check = "Torch(\"shape mismatch: [1, 3] vs [2]\\nException raised from foo at bar.cpp:12\")";
        assert_eq!(super::first_line(check), "shape mismatch: [1, 3] vs [2]");
        // Out of memory is told apart from other failures, on the CPU and on CUDA.
        assert!(matches!(ModelError::from_torch(oom), ModelError::OutOfMemory(m) if !m.contains("frame #0")));
        let cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB";
        assert!(matches!(ModelError::from_torch(cuda), ModelError::OutOfMemory(_)));
        assert!(matches!(ModelError::from_torch(check), ModelError::Torch(m) if m == "shape mismatch: [1, 3] vs [2]"));
    }

    /// A libtorch failure inside a forward-only section (here a shape error, as an
    /// out-of-memory would arrive) leaves the thread's grad mode on, and the thread's next fit
    /// trains: before, every later fit of the worker failed with "element 0 of tensors does
    /// not require grad".
    #[test]
    fn a_failure_without_gradients_leaves_them_on() {
        let failed = catch_torch(|| {
            // A product of mismatched shapes: libtorch's error arrives as a panic.
            let _ = no_grad(|| Tensor::ones([2], (Kind::Float, Device::Cpu)).matmul(&Tensor::ones([3], (Kind::Float, Device::Cpu))));
            Ok(())
        });
        assert!(matches!(failed, Err(ModelError::Torch(_))), "{failed:?}");
        let x = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!((&x * 2.0).requires_grad(), "grad mode stayed off after the failure");

        let image = Arc::new(Image { width: 16, height: 16, channels: 1, data: (0..256).map(|i| (i % 16) as f32 / 16.0).collect(), kind: ImageKind::Grey });
        let opts = FitOptions { size: 16, features: 4, iterations: 2, min_labels: 0, ..FitOptions::default() };
        let out = fit(&image, &opts, Device::Cpu, &mut |_| (), &std::sync::atomic::AtomicBool::new(false));
        assert!(out.is_ok(), "a fit after the failure: {:?}", out.err());
    }

    /// The free offsets and mask take `lr · offset_lr`, every other parameter `lr`: after one
    /// step from zero velocity on the same gradients, the offsets and mask have moved
    /// `offset_lr` times as far as with 1, and the rest exactly as far.
    #[test]
    fn free_offsets_train_at_their_own_rate() {
        let base = FitOptions { size: 16, features: 4, offset_lr: 1.0, ..FitOptions::default() };
        assert_eq!(base.offsets, OffsetMode::Free);
        let x = Tensor::rand([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let moved = |offset_lr: f64| {
            let opts = FitOptions { offset_lr, ..base.clone() };
            let net = S3Net::new(7, Device::Cpu, 3, 4, opts.blocks, opts.offsets, 16, opts.kernels, opts.precision);
            let before: Vec<Tensor> = net.parameters().iter().map(|p| p.detach().copy()).collect();
            let velocity: Vec<Tensor> = net.parameters().iter().map(|p| p.zeros_like()).collect();
            // Non-zero gradients everywhere: a loss that reads every output of the trunk and
            // the response (the offsets' gradient is not zero from the first step).
            let out = net.response(&net.trunk(&x));
            (&out * &out).sum(Kind::Float).backward();
            sgd_step(&net, &velocity, &opts).unwrap();
            let own = net.free_sampling_params().unwrap();
            let deltas: Vec<Tensor> = net.parameters().iter().zip(&before).map(|(p, b)| p.detach() - b).collect();
            (deltas, own)
        };
        let ((d1, own), (d1000, _)) = (moved(1.0), moved(1000.0));
        assert_eq!(own.len(), 2);
        for (i, (a, b)) in d1.iter().zip(&d1000).enumerate() {
            let scale = if own.contains(&i) { 1000.0 } else { 1.0 };
            let gap = (a * scale - b).abs().max().double_value(&[]);
            let size = a.abs().max().double_value(&[]) * scale;
            // (Biases before a BatchNorm get no gradient and stay put.)
            assert!(size > 0.0 || !own.contains(&i), "free sampling parameter {i} did not move");
            assert!(gap <= 1e-5 * size, "parameter {i}: moved {gap} away from {scale}× the step at 1 (largest {size})");
        }
    }

    /// A one-pixel cluster on a 4×4 grid vanishes when the logits are resized to the 2×2
    /// image: the label count and numbering follow the returned map, not the grid.
    #[test]
    fn clusters_lost_in_the_resize_are_not_counted() {
        let opts = FitOptions { size: 4, features: 3, ..FitOptions::default() };
        let mut r = vec![0f32; 3 * 16];
        for y in 0..4 {
            for x in 0..4 {
                r[if x < 2 { 0 } else { 16 } + y * 4 + x] = 1.0;
            }
        }
        r[2 * 16] = 1.01; // cluster 2 wins pixel (0, 0) only
        let response = Tensor::from_slice(&r).view([1, 3, 4, 4]);
        let target = response.argmax(1, false);
        let image = Image { width: 2, height: 2, channels: 1, data: vec![0.5; 4], kind: ImageKind::Grey };
        let (grid, full, n) = read_labels(&response, &target, &image, &opts);
        assert_eq!(n, 2);
        let mut seen: Vec<u16> = full.data.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, vec![0, 1]);
        // On the grid the lost cluster keeps a number of its own, after the present ones.
        assert_eq!(grid.data[0], 2);
        assert_eq!(grid.data[1], full.data[0]);
    }
}
