//! BatchNorm with each image's own statistics (`csrc/norm.cpp`, `csrc/norm_cuda.cu`).

use std::ffi::{c_char, c_void};

use tch::{Kind, Tensor};

use crate::args::check_float;
use crate::ffi::{finish, ptr};
use crate::OpError;

extern "C" {
    fn s3ops_plane_norm(
        input: *const c_void,
        gamma: *const c_void,
        beta: *const c_void,
        eps: f64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
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
