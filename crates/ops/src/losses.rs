//! A fit's per-pixel loss terms as one op, and the channel argmax that clusters a map
//! (`csrc/losses.cpp`, `csrc/losses_cuda.cu`).

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::ffi::{finish, ptr, take_error};
use crate::switches::{switch, Switch};
use crate::{gpu_paths, OpError};

extern "C" {
    fn s3ops_pixel_losses(
        logits: *const c_void,
        target: *const c_void,
        continuity: i32,
        outs: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> i32;
    fn s3ops_argmax_channels(input: *const c_void, out: *mut *mut c_void, err: *mut *mut c_char) -> i32;
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
/// On CUDA (and inside [`emulated_cuda`](crate::emulated_cuda), as on CUDA) it runs only when [`cuda_pixel_losses`]
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

/// Turns [`pixel_losses`]'s CUDA kernel on or off for this process (overrides the environment).
pub fn set_cuda_pixel_losses(on: bool) {
    switch(Switch::PixelLosses, Some(on));
}

/// The argmax over the channels of `input (N, K, H, W)`: `(N, H, W)` int64, the first maximum
/// on ties, a NaN beating any number — exactly `input.argmax(1, false)`, for any device and
/// type.
///
/// Why: a fit's turned copy is clustered by this argmax every step, and libtorch's CPU argmax
/// over the strided channel axis took 9 ms of a 0.3 s step for a 1×32×256² map; our CPU kernel
/// (float32, float64, bfloat16) reads each channel once in a vectorised loop. Other devices
/// and types (and [`emulated_cuda`](crate::emulated_cuda)'s GPU paths) get libtorch's argmax.
pub fn argmax_channels(input: &Tensor) -> Result<Tensor, OpError> {
    let mut out = std::ptr::null_mut();
    let mut err = std::ptr::null_mut();
    // SAFETY: the tensor pointer is valid for the call; the C side checks the shape.
    let rc = unsafe { s3ops_argmax_channels(ptr(Some(input)), &mut out, &mut err) };
    finish(rc, out, err)
}
