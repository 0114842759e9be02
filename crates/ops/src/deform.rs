//! Modulated deformable convolution (DCNv2), torchvision's semantics (`csrc/deform.cpp`,
//! `csrc/deform_cuda.cu`). The engine's tensor-op version, its test oracle and fallback, is
//! `s3net_model`'s `deform` module.

use std::ffi::{c_char, c_void};

use tch::{Kind, Tensor};

use crate::args::{check_float, check_kernel_device};
use crate::ffi::{finish, ptr};
use crate::OpError;

extern "C" {
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
/// CPU always; CUDA when [`cuda_compiled`](crate::cuda_compiled) (otherwise CUDA tensors give an error and callers
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

