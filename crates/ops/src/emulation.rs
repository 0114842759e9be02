//! Which code paths the ops take: whether this build has CUDA kernels, and the CPU emulation of
//! those kernels (`csrc/simt.h`) that lets the tests run them where no GPU is.

use tch::Device;

extern "C" {
    fn s3ops_set_simt(on: i32) -> i32;
    fn s3ops_simt_launches() -> u64;
    fn s3ops_simt_on() -> i32;
    fn s3ops_cuda_compiled() -> i32;
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
