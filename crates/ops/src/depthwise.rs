//! Depthwise convolution and the I-LKA block's three parallel depthwise branches
//! (`csrc/depthwise.cpp`, `csrc/depthwise_cuda.cu`).

use std::ffi::{c_char, c_void};

use tch::{Device, Tensor};

use crate::args::{check_floats, check_kernel_device};
use crate::ffi::{finish, ptr};
use crate::switches::{switch, Switch};
use crate::{cuda_compiled, OpError};

extern "C" {
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
}

/// Depthwise 2-D convolution, stride 1: `input (N, C, H, W)`, `weight (C, 1, k, k)`,
/// `bias (C)`; output `(N, C, H + 2p − d(k−1), W + 2p − d(k−1))`.
///
/// float32 and float64; bfloat16 too, added in float32 and rounded once (the CUDA kernel reads
/// and writes bfloat16 itself, the CPU kernel works on a float32 copy; float16 is copied on
/// both). On CPU this runs the C++ kernel, on CUDA (when [`cuda_compiled`](crate::cuda_compiled)) the CUDA kernel,
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
