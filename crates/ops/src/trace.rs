//! libtorch's operator-level profiler, for finding which op a GPU kernel belongs to.

use std::ffi::c_char;

use crate::ffi::status;
use crate::OpError;

extern "C" {
    fn s3ops_trace_start(cuda: i32, err: *mut *mut c_char) -> i32;
    fn s3ops_trace_stop(path: *const c_char, err: *mut *mut c_char) -> i32;
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
