//! A stack's 1×1 convolutions, with a residual or a gate folded in, and how the weight
//! gradients' long reductions are split (`csrc/pointwise.cpp`, `csrc/split_k_cuda.cu`).

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::args::check_floats;
use crate::ffi::{finish, ptr};
use crate::switches::{switch, Switch};
use crate::OpError;

extern "C" {
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
    fn s3ops_set_split_k(mode: i32);
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

/// Whether the model runs a stack's stem on a GPU as im2col's columns and a stacked 1×1 conv
/// ([`pointwise_conv2d`]: one batched GEMM forward, the split weight gradient backward) rather
/// than cuDNN's grouped convolution. Why: cuDNN ran the stem's grouped 3×3 conv (3 channels
/// in, 32 out per network) as one legacy implicit-GEMM launch per network, 16 µs each: 0.5 ms
/// of a 16-network bfloat16 step's forward passes and 0.2 ms of its backward, about 4 % of its
/// GPU time on an H200 (2026-11-30), where the columns are 27 values a pixel and the GEMM reads
/// and writes little more than the output. The same sums in another order (tested on the
/// emulation, `crates/model/tests/stem.rs`). Off until a GPU has timed it:
/// `S3NET_STEM_COLUMNS=1` (read once) or [`set_stem_columns`] turns it on; read by the model
/// (this op does as told).
pub fn stem_columns() -> bool {
    switch(Switch::StemColumns, None)
}

/// Turns [`stem_columns`] on or off for this process (overrides the environment).
pub fn set_stem_columns(on: bool) {
    switch(Switch::StemColumns, Some(on));
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
    /// emulation ([`emulated_cuda`](crate::emulated_cuda)); other operands take `Auto`'s choice.
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
