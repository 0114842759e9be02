//! Fast kernels for s3net, written in C++ against libtorch (`csrc/ops.cpp`) and CUDA
//! (`csrc/*_cuda.cu`, built when nvcc is found; see `build.rs`).
//!
//! * [`depthwise_conv2d`] — stride-1 depthwise convolution with padding and dilation, on CPU
//!   and (when [`cuda_compiled`]) CUDA.
//! * [`deform_conv2d`] — modulated deformable convolution (DCNv2) with exactly the semantics of
//!   `torchvision.ops.deform_conv2d`, on CPU and (when [`cuda_compiled`]) CUDA.
//! * [`depthwise_branches`] — the I-LKA block's three parallel depthwise convolutions,
//!   concatenated, as one op (no concatenation's copies).
//! * [`pointwise_conv2d`] — a stack of independent 1×1 convolutions with a GPU-friendly weight
//!   gradient, and a CPU kernel on NCHW planes (no layout reorders);
//!   [`pointwise_conv2d_then`] the same with a residual added or a gate applied in the same
//!   pass.
//! * [`plane_norm`] — BatchNorm with each image's own statistics.
//! * [`argmax_channels`] — the argmax over the channel axis (a fit's clustering).
//! * [`pixel_losses`] — per image, cross-entropy against a target or the map's own argmax and
//!   the continuity term, with their gradient, in one pass each way.
//! * [`sgd_step`] — momentum SGD over all parameters in a few multi-tensor launches.
//! * [`use_pool_stream`] / [`use_default_stream`] — per-thread CUDA streams, so concurrent
//!   fits on one GPU overlap.
//! * [`Trace`] — libtorch's operator-level profiler, kernels linked to their ops.
//! * [`HostCopy`] — a copy to the host that does not wait for work queued after it.
//! * [`CudaGraph`] — capture a step's kernels once, replay them with one call.
//! * [`emulated_cuda`] — the ops' CUDA paths run on CPU tensors, their kernels emulated on the
//!   CPU, for testing the kernels where no GPU is.
//!
//! Each op is a `torch::autograd::Function` with its own backward, so gradients flow through it
//! with tch's ordinary `backward()`. Every C++ exception is caught at the C boundary and comes
//! back as an [`OpError`]; nothing here panics or aborts on bad arguments.

use std::ffi::{c_char, c_void, CStr};
use std::sync::{RwLock, RwLockReadGuard};

use tch::{Device, Kind, Tensor};

/// Error from a C++ kernel (or from argument validation).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);

extern "C" {
    fn s3ops_free_err(e: *mut c_char);
    fn s3ops_depthwise_conv2d(
        input: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        pad: i64,
        dil: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_depthwise_branches(
        input: *const c_void,
        weights: *const *const c_void,
        biases: *const *const c_void,
        geometry: *const i64,
        models: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn s3ops_pointwise_conv2d(
        input: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        models: i64,
        other: *const c_void,
        then: i32,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn s3ops_deform_conv2d(
        input: *const c_void,
        offset: *const c_void,
        mask: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        geometry: *const i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_plane_norm(
        input: *const c_void,
        gamma: *const c_void,
        beta: *const c_void,
        eps: f64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_argmax_channels(input: *const c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_pixel_losses(
        logits: *const c_void,
        target: *const c_void,
        continuity: i32,
        outs: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_sgd_step(
        params: *const *const c_void,
        velocity: *const *const c_void,
        n: i64,
        lr: f64,
        momentum: f64,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_cuda_compiled() -> i32;
    fn s3ops_set_simt(on: i32) -> i32;
    fn s3ops_simt_launches() -> u64;
    fn s3ops_simt_on() -> i32;
    fn s3ops_switch(which: i32, set: i32) -> i32;
    fn s3ops_cuda_set_stream(device: i64, pool: i32, err: *mut *mut c_char) -> i32;
    fn s3ops_cuda_set_memory_fraction(device: i64, fraction: f64, err: *mut *mut c_char) -> i32;
    fn s3ops_cuda_reserved_bytes(device: i64, out: *mut i64, err: *mut *mut c_char) -> i32;
    fn s3ops_set_split_k(mode: i32);
    fn s3ops_trace_start(cuda: i32, err: *mut *mut c_char) -> i32;
    fn s3ops_trace_stop(path: *const c_char, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_start(src: *const c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_wait(handle: *mut c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_free(handle: *mut c_void);
    fn s3ops_graph_begin(device: i64, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_end(handle: *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_abort(handle: *mut c_void);
    fn s3ops_graph_replay(handle: *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_free(handle: *mut c_void);
}

/// Runs `body` with the ops' CUDA code paths taken for CPU tensors on this thread: the same host
/// code as on a GPU (the argument checks, the layouts, the scratch buffers, the sums of the
/// kernels' partial results), calling the CUDA kernels of `csrc/*_cuda.cu` built for the CPU on
/// `csrc/simt.h`'s emulation: a block's threads run as fibers, one after another up to each
/// barrier, in an order that exposes a missing `__syncthreads`; dynamic shared memory starts
/// as NaN; barriers the threads of a block reach at different places, shuffles over partial
/// warps and launches the GPU would refuse come back as errors.
///
/// Why: most machines this code is worked on have no GPU, and a kernel whose logic was never
/// run is not known to be right. The emulation is slow (a fiber switch per thread and
/// barrier) and says nothing about speed or about races between blocks; a GPU check still
/// decides. Only this thread is affected (other threads, and this one after `body`, run as
/// before), also when `body` panics. For tests.
pub fn emulated_cuda<R>(body: impl FnOnce() -> R) -> R {
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: sets a thread-local flag.
            unsafe { s3ops_set_simt(self.0) };
        }
    }
    // SAFETY: sets a thread-local flag.
    let _restore = Restore(unsafe { s3ops_set_simt(1) });
    body()
}

/// Whether this thread is inside [`emulated_cuda`]: code above the ops that has a GPU path of its
/// own (the model's stacked 1×1 convs, its one trunk pass over an image and its turned copy)
/// asks this too, so that a whole fit can run its GPU paths on the CPU.
pub fn emulating_cuda() -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { s3ops_simt_on() != 0 }
}

/// Whether `device` takes the GPU code paths: a CUDA device, or the CPU inside
/// [`emulated_cuda`].
pub fn gpu_paths(device: Device) -> bool {
    device.is_cuda() || (device == Device::Cpu && emulating_cuda())
}

/// How many kernels this thread has run on the emulation of [`emulated_cuda`] so far: lets a
/// test check that the kernels, not the CPU ops, computed what it compares.
pub fn emulated_launches() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { s3ops_simt_launches() }
}

/// Whether this build carries the CUDA kernels (nvcc was found when it was compiled).
pub fn cuda_compiled() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { s3ops_cuda_compiled() != 0 }
}

fn set_stream(device: usize, pool: bool) -> Result<(), OpError> {
    let mut err = std::ptr::null_mut();
    // SAFETY: plain values in, an owned message out on failure.
    let rc = unsafe { s3ops_cuda_set_stream(device as i64, pool as i32, &mut err) };
    status(rc, err, "setting the CUDA stream failed")
}

/// Makes the calling thread queue its CUDA work on `cuda:device` on a stream of libtorch's
/// pool rather than the device's default stream. libtorch keeps the current stream per thread,
/// so fits running on different threads of one GPU then overlap instead of serialising.
pub fn use_pool_stream(device: usize) -> Result<(), OpError> {
    set_stream(device, true)
}

/// Puts the calling thread back on the default stream of `cuda:device`.
pub fn use_default_stream(device: usize) -> Result<(), OpError> {
    set_stream(device, false)
}

/// Caps the memory libtorch's caching allocator may hold on `cuda:device` at `fraction` (in
/// (0, 1]) of the device's memory, for the whole process; an allocation beyond it fails as
/// out of memory. Why: a GPU shared with other services must keep their share free.
pub fn set_cuda_memory_fraction(device: usize, fraction: f64) -> Result<(), OpError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(OpError(format!("memory fraction must be in (0, 1], got {fraction}")));
    }
    let mut err = std::ptr::null_mut();
    // SAFETY: plain values in, an owned message out on failure.
    let rc = unsafe { s3ops_cuda_set_memory_fraction(device as i64, fraction, &mut err) };
    status(rc, err, "setting the CUDA memory fraction failed")
}

/// How the long reductions of the weight gradients ([`pointwise_conv2d`]'s, and the
/// deformable conv's on CUDA) read their chunks. A weight gradient sums over every pixel into
/// a tiny result, so the sum is cut into chunks whose products run side by side. Same results
/// up to summation order. Why a choice: which is faster depends on the GPU and the number
/// format (see [`set_split_k`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitK {
    /// `Strided` for 16-bit operands, `Kernel` for the rest (`Copied` where
    /// [`split_k_kernel`] is off): the fastest for each on an H200 (batched fits: bfloat16
    /// strided 6 % faster than copied and 10–12 % faster than the kernel; float32 strided 3 %
    /// slower than copied, the kernel 5–6 % faster).
    #[default]
    Auto,
    /// The operands are copied into chunk-major order and one batched GEMM runs every chunk of
    /// every image: one launch, two copies.
    Copied,
    /// One batched GEMM per image reads its chunks in place: no copies, a launch per image.
    Strided,
    /// Our own kernel (`csrc/split_k_cuda.cu`) runs every chunk of every image in one launch,
    /// reading the operands in place: float32, float64 and bfloat16 on a GPU or on the
    /// emulation ([`emulated_cuda`]); other operands take `Auto`'s choice.
    Kernel,
}

/// Sets the [`SplitK`] layout for the whole process from now on. Why a switch: the GPU check
/// times the layouts against each other (`s3net bench fit --split-k`), and tests run both.
pub fn set_split_k(layout: SplitK) {
    let mode = match layout {
        SplitK::Auto => 0,
        SplitK::Copied => 1,
        SplitK::Strided => 2,
        SplitK::Kernel => 3,
    };
    // SAFETY: a plain value in; the C side stores it in an atomic.
    unsafe { s3ops_set_split_k(mode) }
}

/// Bytes of GPU memory libtorch's caching allocator holds on `cuda:device` for this process,
/// in use or cached. Why: what a dropped CUDA graph leaves behind shows up here and not in the
/// tensors still alive.
pub fn cuda_reserved_bytes(device: usize) -> Result<u64, OpError> {
    let (mut out, mut err) = (0i64, std::ptr::null_mut());
    // SAFETY: plain values in, a number or an owned message out.
    let rc = unsafe { s3ops_cuda_reserved_bytes(device as i64, &mut out, &mut err) };
    status(rc, err, "reading the CUDA allocator's statistics failed")?;
    Ok(out.max(0) as u64)
}

/// A copy of a tensor to host memory, queued on the current CUDA stream when the tensor is on a
/// GPU, to be collected later with [`wait`](Self::wait).
///
/// Why: a fit reads every step's losses and label counts back to decide whether a job has
/// ended, and a plain copy (`to_device(Cpu)`) waits for *everything* queued on the stream. A
/// copy started right after a step and collected after the next step has been queued lets the
/// GPU run that next step while the host reads this one, instead of idling while the host
/// queues a few hundred kernels. For a CPU tensor the copy is made at once.
pub struct HostCopy(*mut c_void);

impl HostCopy {
    /// Starts copying `t` (any device, any layout) to host memory.
    pub fn start(t: &Tensor) -> Result<HostCopy, OpError> {
        let (mut out, mut err) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: a valid tensor in; an owned handle or an owned message out.
        let rc = unsafe { s3ops_host_copy_start(t.as_ptr() as *const c_void, &mut out, &mut err) };
        owned(rc, out, err, "starting a copy to the host failed").map(HostCopy)
    }

    /// Waits until the copy has landed and returns it as a CPU tensor.
    pub fn wait(&self) -> Result<Tensor, OpError> {
        let (mut out, mut err) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: `self.0` is a live handle from `start`, freed only by `Drop`.
        let rc = unsafe { s3ops_host_copy_wait(self.0, &mut out, &mut err) };
        finish(rc, out, err)
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // SAFETY: the handle came from `start` and is freed exactly once, here.
        unsafe { s3ops_host_copy_free(self.0) }
    }
}

/// A CUDA graph: the kernels one closure queued on the calling thread's current stream,
/// recorded once and then replayed with one call.
///
/// Why: a step of a lone 256² fit is a few hundred small kernels, and on an H100 queueing them
/// one by one (libtorch's dispatch, autograd, the launch itself) takes the host longer than the
/// GPU needs to run them. A replay queues the whole step at once.
///
/// What the closure queues must not synchronise with the host (no reading values back), and
/// every tensor it reads or writes must stay alive and in place while the graph lives: a replay
/// reads and writes the same memory as the capture did. Tensors the closure creates live in the
/// graph's own memory pool and are overwritten by each replay.
pub struct CudaGraph(*mut c_void);

/// Held exclusively by a capture, shared by everything else that queues GPU work (see
/// [`CudaGraph::outside_capture`]).
static CAPTURE_GATE: RwLock<()> = RwLock::new(());

impl CudaGraph {
    /// A guard to hold while queueing work on `device` (None on the CPU) in a process that may
    /// capture graphs: no capture runs while one is held, and a capture waits for them all.
    /// Never hold it across [`capture`](Self::capture), which would wait for itself.
    ///
    /// Why: all threads share libtorch's autograd thread for a device, which runs a captured
    /// backward pass next to other threads' backward passes, and work another thread queues
    /// meanwhile can invalidate the capture (seen with two GPU workers: one capture in ~40
    /// failed). Captures are rare, and steps hold the guard for the milliseconds their queueing
    /// takes.
    pub fn outside_capture(device: Device) -> Option<RwLockReadGuard<'static, ()>> {
        device.is_cuda().then(|| CAPTURE_GATE.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Captures what `body` queues on `cuda:device` (the calling thread's current stream there,
    /// which must not be the default stream) without running it: call [`replay`](Self::replay)
    /// to run it, the first time included. If `body` fails or panics, or the capture is
    /// invalid, the capture is abandoned, the thread can carry on as before, and the error
    /// comes back (a panic is resumed). Other threads' work waits meanwhile (see
    /// [`outside_capture`](Self::outside_capture)).
    pub fn capture<R, E: From<OpError>>(device: usize, body: impl FnOnce() -> Result<R, E>) -> Result<(CudaGraph, R), E> {
        let _alone = CAPTURE_GATE.write().unwrap_or_else(|p| p.into_inner());
        let (mut handle, mut err) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: plain values in; an owned handle or an owned message out.
        let rc = unsafe { s3ops_graph_begin(device as i64, &mut handle, &mut err) };
        let graph = CudaGraph(owned(rc, handle, err, "starting a CUDA graph capture failed")?);
        let abort = |g: &CudaGraph| {
            // SAFETY: a live handle whose capture has begun and not ended.
            unsafe { s3ops_graph_abort(g.0) }
        };
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                abort(&graph);
                return Err(e);
            }
            Err(payload) => {
                abort(&graph);
                drop(graph);
                std::panic::resume_unwind(payload);
            }
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle whose capture has begun.
        let rc = unsafe { s3ops_graph_end(graph.0, &mut err) };
        if rc != 0 {
            let e = take_error(err, "ending a CUDA graph capture failed");
            abort(&graph);
            return Err(e.into());
        }
        Ok((graph, r))
    }

    /// Queues the captured work on the stream it was captured on.
    pub fn replay(&self) -> Result<(), OpError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle whose capture ended successfully.
        let rc = unsafe { s3ops_graph_replay(self.0, &mut err) };
        status(rc, err, "replaying a CUDA graph failed")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the handle came from `s3ops_graph_begin` and is freed exactly once, here.
        unsafe { s3ops_graph_free(self.0) }
    }
}

fn ptr(t: Option<&Tensor>) -> *const c_void {
    t.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void)
}

/// Turns the (status, err) pair of a C call that returns nothing into a `Result`.
fn status(rc: i32, err: *mut c_char, fallback: &str) -> Result<(), OpError> {
    if rc == 0 {
        return Ok(());
    }
    Err(take_error(err, fallback))
}

/// Turns the (status, out, err) triple of a C call into a `Result`.
fn finish(rc: i32, out: *mut c_void, err: *mut c_char) -> Result<Tensor, OpError> {
    let out = owned(rc, out, err, "C++ kernel failed without a message")?;
    // SAFETY: `out` is a fresh `new at::Tensor(...)`, which tch owns (and deletes) from now on.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// The object a C call handed over in `out` (a tensor, a copy, a graph), or its error.
fn owned(rc: i32, out: *mut c_void, err: *mut c_char, fallback: &str) -> Result<*mut c_void, OpError> {
    if rc == 0 && !out.is_null() {
        return Ok(out);
    }
    Err(take_error(err, fallback))
}

/// The C side's error message (a strdup'd string, freed here), or `fallback` when it gave none.
fn take_error(err: *mut c_char, fallback: &str) -> OpError {
    if err.is_null() {
        return OpError(fallback.to_string());
    }
    // SAFETY: `err` is a NUL-terminated string from strdup, freed right after the copy.
    let s = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { s3ops_free_err(err) };
    OpError(s)
}

/// An op's error for a device it has no kernel on: CUDA in a build without nvcc (callers fall
/// back to libtorch's ops then), or a device other than the CPU and CUDA.
fn check_kernel_device(name: &str, device: Device) -> Result<(), OpError> {
    if device.is_cuda() && !cuda_compiled() {
        return Err(OpError(format!(
            "{name}: this build has no CUDA kernel (nvcc was not found when it was compiled)"
        )));
    }
    if device != Device::Cpu && !device.is_cuda() {
        return Err(OpError(format!("{name}: unsupported device {device:?}")));
    }
    Ok(())
}

/// Checks the input and every operand given (`None` skipped) with [`check_float`] against the
/// input's dtype and device, in order.
fn check_floats(name: &str, input: &Tensor, operands: &[(&str, Option<&Tensor>)]) -> Result<(), OpError> {
    let (kind, device) = (input.kind(), input.device());
    check_float(name, "input", input, kind, device)?;
    for (what, t) in operands {
        if let Some(t) = t {
            check_float(name, what, t, kind, device)?;
        }
    }
    Ok(())
}

fn check_float(
    name: &str,
    what: &str,
    t: &Tensor,
    kind: Kind,
    device: Device,
) -> Result<(), OpError> {
    if !matches!(t.kind(), Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half) {
        return Err(OpError(format!(
            "{name}: {what} must be float32, float64, bfloat16 or float16, got {:?}",
            t.kind()
        )));
    }
    if t.kind() != kind {
        return Err(OpError(format!(
            "{name}: {what} is {:?} but the input is {kind:?}",
            t.kind()
        )));
    }
    if t.device() != device {
        return Err(OpError(format!(
            "{name}: {what} is on {:?} but the input is on {device:?}",
            t.device()
        )));
    }
    Ok(())
}

/// Depthwise 2-D convolution, stride 1: `input (N, C, H, W)`, `weight (C, 1, k, k)`,
/// `bias (C)`; output `(N, C, H + 2p − d(k−1), W + 2p − d(k−1))`.
///
/// float32 and float64; bfloat16 too, added in float32 and rounded once (the CUDA kernel reads
/// and writes bfloat16 itself, the CPU kernel works on a float32 copy; float16 is copied on
/// both). On CPU this runs the C++ kernel, on CUDA (when [`cuda_compiled`]) the CUDA kernel,
/// each with its own backward. A CUDA build without nvcc, or a dilated kernel too wide for one
/// block's shared memory (span (k−1)·d beyond about 44 in float32 and bfloat16, 12 in
/// float64; the network's widest is 18), calls
/// libtorch's `conv2d(…, groups = C)` instead.
pub fn depthwise_conv2d(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: i64,
    dilation: i64,
) -> Result<Tensor, OpError> {
    const NAME: &str = "depthwise_conv2d";
    check_floats(NAME, input, &[("weight", Some(weight)), ("bias", bias)])?;
    let device = input.device();
    let [_, c, h, w] = input.size()[..] else {
        return Err(OpError(format!(
            "{NAME}: input must be 4-D (N, C, H, W), got {:?}",
            input.size()
        )));
    };
    let [wc, 1, k, k2] = weight.size()[..] else {
        return Err(OpError(format!(
            "{NAME}: weight must be (C, 1, k, k), got {:?}",
            weight.size()
        )));
    };
    if wc != c || k != k2 || k < 1 {
        return Err(OpError(format!(
            "{NAME}: weight must be ({c}, 1, k, k), got {:?}",
            weight.size()
        )));
    }
    if let Some(b) = bias {
        if b.size() != [c] {
            return Err(OpError(format!(
                "{NAME}: bias must be [{c}], got {:?}",
                b.size()
            )));
        }
    }
    if padding < 0 || dilation < 1 {
        return Err(OpError(format!(
            "{NAME}: need padding >= 0 and dilation >= 1, got {padding}, {dilation}"
        )));
    }
    let span = dilation * (k - 1);
    if h + 2 * padding - span < 1 || w + 2 * padding - span < 1 {
        return Err(OpError(format!(
            "{NAME}: kernel {k}x{k} with dilation {dilation} and padding {padding} does not fit a {h}x{w} input"
        )));
    }
    if device.is_cuda() && !cuda_compiled() {
        return input
            .f_conv2d(
                weight,
                bias,
                [1, 1],
                [padding, padding],
                [dilation, dilation],
                c,
            )
            .map_err(|e| OpError(format!("{NAME}: {e}")));
    }
    if device != Device::Cpu && !device.is_cuda() {
        return Err(OpError(format!("{NAME}: unsupported device {device:?}")));
    }
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call; the C side copies what it keeps.
    let rc = unsafe {
        s3ops_depthwise_conv2d(
            ptr(Some(input)),
            ptr(Some(weight)),
            ptr(bias),
            padding,
            dilation,
            &mut out,
            &mut err,
        )
    };
    finish(rc, out, err)
}

/// libtorch's operator-level profiler (Kineto, what `torch.profiler` drives), for finding
/// which op a GPU kernel belongs to: [`Trace::start`] records every aten op and autograd node
/// from then on (input shapes and types included, on every thread) and, with `cuda`, every
/// CUDA kernel linked to the op that launched it; [`Trace::stop`] writes the Chrome trace
/// (JSON, viewable in Perfetto; `scripts/trace-summary.py` adds it up per op). One at a time
/// per process. Dropped without [`Trace::stop`], it stops and writes nothing.
pub struct Trace {
    running: bool,
}

impl Trace {
    /// Starts recording.
    pub fn start(cuda: bool) -> Result<Trace, OpError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: no pointers cross but the error string, freed by `status`.
        let rc = unsafe { s3ops_trace_start(cuda as i32, &mut err) };
        status(rc, err, "trace: the profiler did not start")?;
        Ok(Trace { running: true })
    }

    /// Stops recording and writes the trace to `path`.
    pub fn stop(mut self, path: &std::path::Path) -> Result<(), OpError> {
        let path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| OpError(format!("trace: path {} holds a NUL byte", path.display())))?;
        self.running = false;
        let mut err = std::ptr::null_mut();
        // SAFETY: `path` is a NUL-terminated string alive for the call.
        let rc = unsafe { s3ops_trace_stop(path.as_ptr(), &mut err) };
        status(rc, err, "trace: the profiler did not stop")
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if self.running {
            let mut err = std::ptr::null_mut();
            // SAFETY: a null path writes nothing; the error string is freed by `status`.
            let rc = unsafe { s3ops_trace_stop(std::ptr::null(), &mut err) };
            let _ = status(rc, err, "");
        }
    }
}

/// One depthwise branch of [`depthwise_branches`]: weight `(C, 1, k, k)`, bias `(C)` and
/// dilation; the padding is the 'same' one, `dilation·(k−1)/2`.
#[derive(Clone, Copy)]
pub struct Branch<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub dilation: i64,
}

/// Three stride-1 'same' depthwise convolutions of one input, concatenated per network: for a
/// stack of `models` networks, `input (N, M·c, H, W)` → `(N, M·3c, H, W)`, network j's 3c
/// channels holding branch 0's c outputs of its channels, then branch 1's, then branch 2's.
/// The I-LKA block's parallel branches; the same as concatenating three
/// [`depthwise_conv2d`]s network by network.
///
/// Why one op: the branches' kernels write straight into their slices of the concatenation
/// and read their gradients from them, and the input's gradient is summed by the kernels; as
/// three ops, a concatenation and autograd's sums, a 16-network GPU step copied and added
/// several hundred MB per block for nothing, and on the CPU the forward took half as long
/// again (`s3net bench depthwise`'s `branches`). On CUDA in float32, float64 and bfloat16 when
/// every branch fits the kernels (see [`depthwise_conv2d`]); on the CPU in float32 and float64,
/// 16-bit inputs widened once and the result rounded once; for other shapes on a GPU this *is*
/// the three ops and the concatenation. A CUDA build without nvcc gives an error (callers use
/// libtorch's convolutions then).
pub fn depthwise_branches(input: &Tensor, branches: [Branch<'_>; 3], models: i64) -> Result<Tensor, OpError> {
    const NAME: &str = "depthwise_branches";
    let operands: Vec<(&str, Option<&Tensor>)> = branches.iter().flat_map(|b| [("weight", Some(b.weight)), ("bias", Some(b.bias))]).collect();
    check_floats(NAME, input, &operands)?;
    let mut geometry = [0i64; 6];
    for (i, b) in branches.iter().enumerate() {
        let k = b.weight.size().get(2).copied().unwrap_or(0);
        if b.dilation < 1 || k < 1 || k % 2 == 0 {
            return Err(OpError(format!(
                "{NAME}: branch {i} needs an odd kernel size and dilation >= 1, got {:?} and {}",
                b.weight.size(),
                b.dilation
            )));
        }
        geometry[2 * i] = b.dilation * (k - 1) / 2;
        geometry[2 * i + 1] = b.dilation;
    }
    check_kernel_device(NAME, input.device())?;
    let w: Vec<*const c_void> = branches.iter().map(|b| ptr(Some(b.weight))).collect();
    let bias: Vec<*const c_void> = branches.iter().map(|b| ptr(Some(b.bias))).collect();
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call; the C side checks shapes and copies
    // what it keeps.
    let rc = unsafe {
        s3ops_depthwise_branches(ptr(Some(input)), w.as_ptr(), bias.as_ptr(), geometry.as_ptr(), models, &mut out, &mut err)
    };
    finish(rc, out, err)
}

/// A stack of `models` independent 1×1 convolutions, as one op: `input (N, M·C, H, W)`, network
/// j reading channels `j·C..(j+1)·C`; `weight (M·O, C, 1, 1)`, `bias (M·O)`; output
/// `(N, M·O, H, W)`. The same as `conv2d(…, groups = M)`, float32, float64 and the 16-bit
/// floats (libtorch's GEMMs, the split weight gradient's chunks summed in float32), CPU and
/// CUDA.
///
/// Why: on a GPU the forward is one batched GEMM, and the backward splits the weight
/// gradient's reduction over pixels into chunks. Its products have a tiny result (O × C) and a
/// 65 536-long reduction; as one GEMM per network cuBLAS spent a third of a 16-network step on
/// them. On the CPU (float32, float64; any M, a lone network too) the forward and the input
/// gradient run our kernel on the NCHW planes as they are: oneDNN's convolution reordered
/// every map into its blocked layout and back, which cost more than the convolutions
/// themselves (README "Speed").
pub fn pointwise_conv2d(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, models: i64) -> Result<Tensor, OpError> {
    pointwise_conv2d_then(input, weight, bias, models, None)
}

/// What [`pointwise_conv2d_then`] does with the convolution `y` before returning it.
#[derive(Clone, Copy, Debug)]
pub enum Then<'a> {
    /// `r + y`: a residual connection (the I-LKA block's `x + pw2(…)`).
    Residual(&'a Tensor),
    /// `u · y`: a gate (the I-LKA block's attention, `u · mix(…)`).
    Gate(&'a Tensor),
}

/// [`pointwise_conv2d`], then `then`, as one op: the same values, bit for bit, as the
/// convolution followed by libtorch's add or multiply (`r + y`, `u * y`), and their gradients.
/// The tensor `then` names is shaped like the output, in its dtype and on its device.
///
/// Why: the add and the multiply were passes of their own over the block's feature maps,
/// forward and backward; here the CPU kernel applies them as it writes each output vector, and
/// on a GPU the bias kernel that follows the batched GEMM does, one pass for both (and one
/// kernel for the gate's two gradients). Off with the environment variable
/// `S3NET_FUSED_EPILOGUES=0` or [`set_fused_epilogues`], for the model (this op does as told).
pub fn pointwise_conv2d_then(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, models: i64, then: Option<Then>) -> Result<Tensor, OpError> {
    const NAME: &str = "pointwise_conv2d";
    let (other, code, what) = match then {
        None => (None, 0, ""),
        Some(Then::Residual(r)) => (Some(r), 1, "residual"),
        Some(Then::Gate(u)) => (Some(u), 2, "gate"),
    };
    check_floats(NAME, input, &[("weight", Some(weight)), ("bias", bias), (what, other)])?;
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call; the C side checks shapes and copies
    // what it keeps.
    let rc = unsafe {
        s3ops_pointwise_conv2d(ptr(Some(input)), ptr(Some(weight)), ptr(bias), models, ptr(other), code, &mut out, &mut err)
    };
    finish(rc, out, err)
}

/// Modulated deformable convolution with exactly `torchvision.ops.deform_conv2d`'s semantics.
///
/// * `input`  — `(N, C, H, W)`
/// * `offset` — `(N, 2·kh·kw, Ho, Wo)`, interleaved `(dy, dx)` per tap `k = i·kw + j`
/// * `mask`   — `(N, kh·kw, Ho, Wo)` or `None`
/// * `weight` — `(O, C, kh, kw)`; `bias` — `(O)` or `None`
/// * or, per image, `weight` — `(N, O, C, kh, kw)` and `bias` — `(N, O)`: image `n` is
///   convolved with its own kernel. This is how the engine trains N independent networks in
///   one batch (one launch sequence for N jobs on a GPU).
///
/// Returns `(N, O, Ho, Wo)` with `Ho = (H + 2·ph − (dh·(kh−1) + 1)) / sh + 1` (same for W).
/// CPU always; CUDA when [`cuda_compiled`] (otherwise CUDA tensors give an error and callers
/// fall back to a tensor-op version). float32 and float64. A 16-bit input may come with
/// 16-bit or float32 offsets, mask, weight and bias; the result has the input's type. On CUDA
/// bfloat16 features stay bfloat16 — the sampled columns and their gradient are bfloat16 and
/// the GEMMs run on them, adding in float32 — while the sampling positions, the mask and every
/// gradient but the input's are computed in float32 (in bfloat16 a position near the image's
/// side would be off by a pixel or more). Elsewhere 16-bit operands are computed on float32
/// copies and the result rounded back.
#[allow(clippy::too_many_arguments)]
pub fn deform_conv2d(
    input: &Tensor,
    offset: &Tensor,
    mask: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (i64, i64),
    padding: (i64, i64),
    dilation: (i64, i64),
) -> Result<Tensor, OpError> {
    const NAME: &str = "deform_conv2d";
    check_deform_args(input, offset, mask, weight, bias, stride, padding, dilation)?;
    check_kernel_device(NAME, input.device())?;
    let geometry = [
        stride.0, stride.1, padding.0, padding.1, dilation.0, dilation.1,
    ];
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: as in `depthwise_conv2d`.
    let rc = unsafe {
        s3ops_deform_conv2d(
            ptr(Some(input)),
            ptr(Some(offset)),
            ptr(mask),
            ptr(Some(weight)),
            ptr(bias),
            geometry.as_ptr(),
            &mut out,
            &mut err,
        )
    };
    finish(rc, out, err)
}

/// BatchNorm in training mode with each image's own statistics: every (image, channel) plane
/// of `input (N, C, H, W)` is normalised by its mean and biased variance, then scaled by
/// `gamma[c]` and shifted by `beta[c]` (`(C)` each, float32; float64 for a float64 input). For
/// N = 1 exactly BatchNorm; for N > 1 what BatchNorm gives each image alone (the network runs an
/// image and its transformed copy as one batch). The result has the input's type.
///
/// Why: on a GPU libtorch's BatchNorm over these planes (one block per plane, 2-byte loads)
/// took 9–10 % of a 16-network bfloat16 step; here the sums and the normalisation are
/// vectorised passes over (chunk, plane) blocks (CUDA, float32, float64 and bfloat16). Anywhere
/// else this is libtorch's `batch_norm` over the N·C planes as channels.
pub fn plane_norm(input: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor, OpError> {
    const NAME: &str = "plane_norm";
    check_float(NAME, "input", input, input.kind(), input.device())?;
    let params = if input.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    check_float(NAME, "gamma", gamma, params, input.device())?;
    check_float(NAME, "beta", beta, params, input.device())?;
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call; the C side checks shapes and copies
    // what it keeps.
    let rc = unsafe { s3ops_plane_norm(ptr(Some(input)), ptr(Some(gamma)), ptr(Some(beta)), eps, &mut out, &mut err) };
    finish(rc, out, err)
}

/// The argmax over the channels of `input (N, K, H, W)`: `(N, H, W)` int64, the first maximum
/// on ties, a NaN beating any number — exactly `input.argmax(1, false)`, for any device and
/// type.
///
/// Why: a fit's turned copy is clustered by this argmax every step, and libtorch's CPU argmax
/// over the strided channel axis took 9 ms of a 0.3 s step for a 1×32×256² map; our CPU kernel
/// (float32, float64, bfloat16) reads each channel once in a vectorised loop. Other devices
/// and types (and [`emulated_cuda`]'s GPU paths) get libtorch's argmax.
pub fn argmax_channels(input: &Tensor) -> Result<Tensor, OpError> {
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointer is valid for the call; the C side checks the shape.
    let rc = unsafe { s3ops_argmax_channels(ptr(Some(input)), &mut out, &mut err) };
    finish(rc, out, err)
}

/// What [`pixel_losses`] gives per image of a map of logits `(M, K, H, W)`.
#[derive(Debug)]
pub struct PixelLosses {
    /// `(M,)`: mean cross-entropy over the image's valid pixels (zero if it has none).
    pub ce: Tensor,
    /// `(M,)`: mean |vertical neighbour difference| + mean |horizontal neighbour difference|
    /// over every channel; `None` unless asked for.
    pub continuity: Option<Tensor>,
    /// `(M, H, W)` int64: the target the cross-entropy used (the argmax when none was given),
    /// detached.
    pub target: Tensor,
}

/// The per-pixel loss terms of a fit, per image of `logits (M, K, H, W)` (float32, float64 or
/// bfloat16; the results in float32, float64 for float64): cross-entropy against `target`
/// `(M, H, W)` int64, pixels whose target lies outside `0..K` (such as the fit's ignore label)
/// left out, or against the logits' own argmax when `target` is `None` (first maximum on ties,
/// like `argmax`); and, with `continuity`, the mean L1 of neighbour differences. Gradients flow
/// to `logits` from both.
///
/// Why one op: libtorch runs these terms as about 25 passes over the map (argmax, log_softmax,
/// the NLL's backward fill, the differences, their slices' backward fills and copies, the adds
/// of the gradients); here each direction reads the map once (and the backward writes its
/// gradient once). 16-bit logits are read as they are and added in float32, so the map need not
/// be widened first. Sums are per row, the rows added in order: the same value for an image
/// alone or in any batch, whatever the thread count.
///
/// On CUDA (and inside [`emulated_cuda`], as on CUDA) it runs only when [`cuda_pixel_losses`]
/// says so (see there); otherwise it declines with an error and the caller's tensor-op losses
/// run.
pub fn pixel_losses(logits: &Tensor, target: Option<&Tensor>, continuity: bool) -> Result<PixelLosses, OpError> {
    if gpu_paths(logits.device()) && !cuda_pixel_losses() {
        return Err(OpError("pixel_losses: the CUDA kernel is off (S3NET_CUDA_PIXEL_LOSSES=0 or set_cuda_pixel_losses)".into()));
    }
    let mut outs = [std::ptr::null_mut(); 3];
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointers are valid for the call; the C side checks dtypes, shapes and
    // devices, and hands over new tensors in `outs` (or none, with a message).
    let rc = unsafe { s3ops_pixel_losses(ptr(Some(logits)), ptr(target), continuity as i32, outs.as_mut_ptr(), &mut err) };
    if rc != 0 {
        return Err(take_error(err, "pixel_losses failed without a message"));
    }
    // SAFETY: each non-null entry is a fresh `new at::Tensor(...)`, which tch owns from now on.
    let take = |p: *mut c_void| (!p.is_null()).then(|| unsafe { Tensor::from_ptr(p as *mut _) });
    let [ce, co, t] = outs.map(take);
    match (ce, t) {
        (Some(ce), Some(target)) => Ok(PixelLosses { ce, continuity: co, target }),
        _ => Err(OpError("pixel_losses returned no tensors".into())),
    }
}

/// Whether [`pixel_losses`] runs its CUDA kernel: yes unless switched off, by the environment
/// variable `S3NET_CUDA_PIXEL_LOSSES=0` (read once) or [`set_cuda_pixel_losses`]; the losses
/// then run as libtorch's ops. On by default since it passed its tests on an H200 and made
/// batched fits 13 % faster in bfloat16 and 8 % in float32 there (2026-11-28). CPU tensors
/// always take the op.
pub fn cuda_pixel_losses() -> bool {
    switch(Switch::PixelLosses, None)
}

/// Whether the depthwise CUDA kernels of the I-LKA block's geometries (3×3, 5×5, 5×5 dilated 2,
/// 7×7 dilated 3) give each thread 16 outputs down a column instead of 4 outputs in each of 4
/// rows: a kernel column's values, read once from shared memory, then serve all its rows, 2.8×
/// fewer shared-memory read cycles per multiply-add in the 7×7 one, which bound the strips
/// (`csrc/depthwise_cuda.cu`). Off by default: timed on an H200 (2026-11-28) it made batched
/// fits 1.4 % slower in bfloat16 and no faster in float32 (the strips' shared-memory reads were
/// not what bound the step after all); the environment variable `S3NET_DW_COLUMNS=1` (read
/// once) or [`set_depthwise_columns`] turns it on. The same values up to rounding (sums in
/// another order).
pub fn depthwise_columns() -> bool {
    switch(Switch::DwColumns, None)
}

/// Turns the column layout of the depthwise CUDA kernels on or off for this process (see
/// [`depthwise_columns`]; overrides the environment).
pub fn set_depthwise_columns(on: bool) {
    switch(Switch::DwColumns, Some(on));
}

/// Whether [`SplitK::Auto`] picks our own kernel for the weight gradients' split reductions
/// ([`SplitK::Kernel`]) of 32- and 64-bit operands (16-bit ones keep cuBLAS's strided chunk
/// products). On unless `S3NET_SPLIT_K_KERNEL=0` or [`set_split_k_kernel`]: on an H200
/// (2026-11-28) it made batched float32 fits 5–6 % faster than cuBLAS's copied layout, and
/// bfloat16 ones 10–12 % slower than the strided one.
pub fn split_k_kernel() -> bool {
    switch(Switch::SplitKKernel, None)
}

/// Turns [`split_k_kernel`] on or off for this process (overrides the environment).
pub fn set_split_k_kernel(on: bool) {
    switch(Switch::SplitKKernel, Some(on));
}

/// Whether the deformable conv's backward on a GPU sums the input gradient per tile of outputs
/// in shared memory and adds each tile's input region to global memory once
/// (`csrc/deform_cuda.cu`, `col2im_tiled_kernel`), rather than with four global atomics per
/// column value (36 per input value for a 3×3 kernel): those atomics were 8 % of a 16-network
/// bfloat16 step on an H100, about what its L2 sustains, and a fit's free offsets stay far
/// under a pixel, so nearly every sample lands in its tile's region. The offset and mask
/// gradients come from the same kernel. Off until a GPU has timed it: the environment variable
/// `S3NET_DEFORM_TILED=1` (read once) or [`set_deform_tiled`] turns it on. The same values up
/// to rounding (sums in another order). Geometries whose region does not fit shared memory
/// (a dilation in the tens) keep the atomics.
pub fn deform_tiled() -> bool {
    switch(Switch::DeformTiled, None)
}

/// Turns [`deform_tiled`] on or off for this process (overrides the environment).
pub fn set_deform_tiled(on: bool) {
    switch(Switch::DeformTiled, Some(on));
}

/// Whether the model folds the I-LKA block's gate and residual add into the 1×1 convs before
/// them ([`pointwise_conv2d_then`]) where those run as our op (every 1×1 conv on the CPU in
/// float32 and float64, a stack's on a GPU). On unless `S3NET_FUSED_EPILOGUES=0` or
/// [`set_fused_epilogues`]: the same bits either way, one pass fewer over the block's maps
/// for each (README, "Speed").
pub fn fused_epilogues() -> bool {
    switch(Switch::FusedEpilogues, None)
}

/// Turns [`fused_epilogues`] on or off for this process (overrides the environment).
pub fn set_fused_epilogues(on: bool) {
    switch(Switch::FusedEpilogues, Some(on));
}

/// The process-wide kernel choices (ops.cpp's `g_switches`, in its order): each at its default
/// unless its environment variable is "1" (on) or "0" (off), read at first use, or set.
#[derive(Clone, Copy)]
enum Switch {
    PixelLosses = 0,
    DwColumns = 1,
    SplitKKernel = 2,
    DeformTiled = 3,
    FusedEpilogues = 4,
}

/// Reads a [`Switch`], setting it first when `set` says so.
fn switch(which: Switch, set: Option<bool>) -> bool {
    // SAFETY: reads (and sets) a process-wide atomic; the index is one of ops.cpp's.
    unsafe { s3ops_switch(which as i32, set.map_or(-1, i32::from)) == 1 }
}

/// Turns [`pixel_losses`]'s CUDA kernel on or off for this process (overrides the environment).
pub fn set_cuda_pixel_losses(on: bool) {
    switch(Switch::PixelLosses, Some(on));
}

/// One momentum-SGD step, PyTorch's rule without dampening or weight decay:
/// `v = momentum·v + grad; p −= lr·v`, then every gradient is dropped (left undefined), so
/// that the next backward writes it afresh rather than adding it to zeros (PyTorch's
/// `zero_grad(set_to_none=True)`; the same values, one fill and one add fewer per parameter).
/// Parameters whose gradient is undefined are skipped.
///
/// The arithmetic is the same, element for element, as the obvious per-tensor loop; it runs
/// as libtorch's multi-tensor (`_foreach_`) kernels because on a GPU the loop's ~300 tiny
/// launches per step cost more than the step's convolutions.
pub fn sgd_step(params: &[&Tensor], velocity: &[Tensor], lr: f64, momentum: f64) -> Result<(), OpError> {
    if params.len() != velocity.len() {
        return Err(OpError(format!(
            "sgd_step: {} parameters but {} velocity buffers",
            params.len(),
            velocity.len()
        )));
    }
    let p: Vec<*const c_void> = params.iter().map(|t| t.as_ptr() as *const c_void).collect();
    let v: Vec<*const c_void> = velocity.iter().map(|t| t.as_ptr() as *const c_void).collect();
    let mut err = std::ptr::null_mut();
    // SAFETY: both pointer arrays hold `len` valid tensors for the duration of the call.
    let rc = unsafe { s3ops_sgd_step(p.as_ptr(), v.as_ptr(), p.len() as i64, lr, momentum, &mut err) };
    status(rc, err, "sgd_step failed")
}

/// Validates the arguments of a deformable convolution (dtypes, devices, shapes, geometry) and
/// returns the output size `(Ho, Wo)`. Shared by the fused kernel and the engine's tensor-op
/// version, so both reject the same inputs with the same messages.
#[allow(clippy::too_many_arguments)]
pub fn check_deform_args(
    input: &Tensor,
    offset: &Tensor,
    mask: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: (i64, i64),
    padding: (i64, i64),
    dilation: (i64, i64),
) -> Result<(i64, i64), OpError> {
    const NAME: &str = "deform_conv2d";
    check_float(NAME, "input", input, input.kind(), input.device())?;
    // With 16-bit features the other operands may be float32 (the network's positions,
    // mask and kernel are); otherwise they have the input's type.
    for (what, t) in [("offset", Some(offset)), ("weight", Some(weight)), ("mask", mask), ("bias", bias)] {
        if let Some(t) = t {
            let kind = if matches!(input.kind(), Kind::BFloat16 | Kind::Half) && t.kind() == Kind::Float { Kind::Float } else { input.kind() };
            check_float(NAME, what, t, kind, input.device())?;
        }
    }
    let [n, c, h, w] = input.size()[..] else {
        return Err(OpError(format!(
            "{NAME}: input must be 4-D (N, C, H, W), got {:?}",
            input.size()
        )));
    };
    let (per_image, o, wc, kh, kw) = match weight.size()[..] {
        [o, wc, kh, kw] => (false, o, wc, kh, kw),
        [wn, o, wc, kh, kw] if wn == n => (true, o, wc, kh, kw),
        [wn, ..] if weight.dim() == 5 => {
            return Err(OpError(format!(
                "{NAME}: per-image weight has {wn} kernels but the input has {n} images"
            )))
        }
        _ => {
            return Err(OpError(format!(
                "{NAME}: weight must be (O, C, kh, kw), or (N, O, C, kh, kw) per image, got {:?}",
                weight.size()
            )))
        }
    };
    if wc != c {
        return Err(OpError(format!(
            "{NAME}: weight has {wc} input channels but the input has {c}"
        )));
    }
    if kh < 1 || kw < 1 {
        return Err(OpError(format!("{NAME}: empty kernel {kh}x{kw}")));
    }
    if stride.0 < 1
        || stride.1 < 1
        || dilation.0 < 1
        || dilation.1 < 1
        || padding.0 < 0
        || padding.1 < 0
    {
        return Err(OpError(format!(
            "{NAME}: need stride >= 1, dilation >= 1, padding >= 0; got {stride:?}, {dilation:?}, {padding:?}"
        )));
    }
    let ho = (h + 2 * padding.0 - (dilation.0 * (kh - 1) + 1)) / stride.0 + 1;
    let wo = (w + 2 * padding.1 - (dilation.1 * (kw - 1) + 1)) / stride.1 + 1;
    if h + 2 * padding.0 - (dilation.0 * (kh - 1) + 1) < 0
        || w + 2 * padding.1 - (dilation.1 * (kw - 1) + 1) < 0
    {
        return Err(OpError(format!(
            "{NAME}: kernel {kh}x{kw} does not fit a {h}x{w} input"
        )));
    }
    let k = kh * kw;
    if offset.size() != [n, 2 * k, ho, wo] {
        return Err(OpError(format!(
            "{NAME}: offset must be {:?}, got {:?}",
            [n, 2 * k, ho, wo],
            offset.size()
        )));
    }
    if let Some(m) = mask {
        if m.size() != [n, k, ho, wo] {
            return Err(OpError(format!(
                "{NAME}: mask must be {:?}, got {:?}",
                [n, k, ho, wo],
                m.size()
            )));
        }
    }
    if let Some(b) = bias {
        let want = if per_image { vec![n, o] } else { vec![o] };
        if b.size() != want {
            return Err(OpError(format!(
                "{NAME}: bias must be {want:?}, got {:?}",
                b.size()
            )));
        }
    }
    Ok((ho, wo))
}
