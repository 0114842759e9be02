//! Momentum SGD over every parameter of a fit in a few multi-tensor launches
//! (`csrc/runtime.cpp`).

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::ffi::status;
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
