//! Momentum SGD over every parameter of a fit in a few multi-tensor launches
//! (`csrc/runtime.cpp`).

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::ffi::status;
use crate::switches::{switch, Switch};
use crate::OpError;

extern "C" {
    fn s3ops_sgd_step(
        params: *const *const c_void,
        velocity: *const *const c_void,
        n: i64,
        lr: f64,
        momentum: f64,
        err: *mut *mut c_char,
    ) -> i32;
}

/// One momentum-SGD step, PyTorch's rule without dampening or weight decay:
/// `v = momentum·v + grad; p −= lr·v`, then every gradient is dropped (left undefined), so
/// that the next backward writes it afresh rather than adding it to zeros (PyTorch's
/// `zero_grad(set_to_none=True)`; the same values, one fill and one add fewer per parameter).
/// Parameters whose gradient is undefined are skipped.
///
/// The arithmetic is the same, element for element, as the obvious per-tensor loop; it runs
/// as libtorch's multi-tensor (`_foreach_`) kernels because on a GPU the loop's ~300 tiny
/// launches per step cost more than the step's convolutions, or, with [`fused_sgd`] on, as
/// one kernel of ours.
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

/// Whether [`sgd_step`] on a GPU runs as one kernel of ours (`csrc/sgd_cuda.cu`: each value of
/// a parameter, its velocity and gradient read and written once, in one launch for up to 48
/// parameters) rather than libtorch's four multi-tensor passes and a temporary. Why: those took
/// 1.9 % of a 16-network bfloat16 step's GPU time on an H200 (2026-11-30), most of it the free
/// offsets (18 planes of 256² per network), and one pass reads and writes half as many values
/// (5 a parameter value against 10) in one launch. The same four roundings in the same order, so the same bits (tested on the
/// emulation). Off until a GPU has timed it: `S3NET_FUSED_SGD=1` (read once) or
/// [`set_fused_sgd`] turns it on; float32 and float64 contiguous parameters only (anything
/// else, and every CPU fit, keeps libtorch's ops).
pub fn fused_sgd() -> bool {
    switch(Switch::FusedSgd, None)
}

/// Turns [`fused_sgd`] on or off for this process (overrides the environment).
pub fn set_fused_sgd(on: bool) {
    switch(Switch::FusedSgd, Some(on));
}
