//! What a fit asks of a GPU beyond the ops (`csrc/runtime.cpp`): per-thread streams, a cap on
//! libtorch's caching allocator, copies to the host that do not wait for later work, and CUDA
//! graphs.

use std::ffi::{c_char, c_void};
use std::sync::{RwLock, RwLockReadGuard};

use tch::{Device, Tensor};

use crate::ffi::{finish, owned, status, take_error};
use crate::OpError;

extern "C" {
    fn s3ops_cuda_set_stream(device: i64, pool: i32, err: *mut *mut c_char) -> i32;
    fn s3ops_cuda_set_memory_fraction(device: i64, fraction: f64, err: *mut *mut c_char) -> i32;
    fn s3ops_cuda_reserved_bytes(device: i64, out: *mut i64, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_start(src: *const c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_wait(handle: *mut c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_host_copy_free(handle: *mut c_void);
    fn s3ops_graph_begin(device: i64, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_end(handle: *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_abort(handle: *mut c_void);
    fn s3ops_graph_replay(handle: *mut c_void, err: *mut *mut c_char) -> i32;
    fn s3ops_graph_free(handle: *mut c_void);
    fn s3ops_cudnn_tf32(set: i32) -> i32;
}

/// Lets cuDNN's float32 convolutions round through TF32 (`true`, libtorch's default) or not,
/// process-wide; returns the setting it replaced. Why: a test comparing two float32 paths that
/// sum in different orders (a stack of networks as grouped convolutions against each network
/// alone) sees TF32's rounding (2⁻¹¹ relative) grow over steps into label flips, which hides
/// whether the two paths agree; in full float32 only their order of summation differs.
/// Production keeps libtorch's default.
pub fn set_cudnn_tf32(on: bool) -> bool {
    // SAFETY: sets and reads a process-wide setting of libtorch.
    unsafe { s3ops_cudnn_tf32(i32::from(on)) == 1 }
}

pub(crate) fn set_stream(device: usize, pool: bool) -> Result<(), OpError> {
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
