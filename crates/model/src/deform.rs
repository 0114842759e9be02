//! Modulated deformable convolution (DCNv2), built from libtorch tensor ops.
//!
//! libtorch ships no deformable convolution, so we own one. The semantics are exactly those of
//! `torchvision.ops.deform_conv2d`: for output pixel `(ho, wo)` and kernel tap `k = (i, j)`, the
//! input is sampled at
//!
//! ```text
//! y = ho·stride_h − pad_h + i·dil_h + offset[2k]      (dy first)
//! x = wo·stride_w − pad_w + j·dil_w + offset[2k + 1]  (then dx)
//! ```
//!
//! by bilinear interpolation in which every corner outside the image reads zero, multiplied by
//! `mask[k]`, and the sampled columns are contracted with the weight.
//!
//! Why `grid_sampler_2d`: with `align_corners = true` and zero padding it implements precisely
//! that per-corner bilinear rule, and libtorch gives it a vectorised, multi-threaded forward
//! *and* backward (input and grid). The whole op is then one sampling pass producing a
//! `C × K` column buffer, one broadcast multiply by the mask and one GEMM — autograd supplies
//! the backward for input, offset, mask, weight and bias. It runs on CPU and CUDA alike.

use tch::{Kind, Tensor};

use crate::ModelError;

/// Stride, padding and dilation of a 2-D convolution, `(height, width)` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub stride: (i64, i64),
    pub padding: (i64, i64),
    pub dilation: (i64, i64),
}

impl Default for ConvGeometry {
    fn default() -> Self {
        Self { stride: (1, 1), padding: (0, 0), dilation: (1, 1) }
    }
}

impl ConvGeometry {
    /// The "same"-size geometry of a `k × k` kernel with stride 1.
    pub fn same(k: i64) -> Self {
        Self { stride: (1, 1), padding: (k / 2, k / 2), dilation: (1, 1) }
    }
}

/// Modulated deformable convolution with torchvision's semantics.
///
/// * `input`  — `(N, C, H, W)`
/// * `offset` — `(N, 2·kh·kw, Ho, Wo)`, interleaved `(dy, dx)` per tap
/// * `mask`   — `(N, kh·kw, Ho, Wo)` or `None` (all ones: DCNv1)
/// * `weight` — `(O, C, kh, kw)`; `bias` — `(O)` or `None`
/// * or per image: `weight` — `(N, O, C, kh, kw)`, `bias` — `(N, O)` (N independent networks)
///
/// Returns `(N, O, Ho, Wo)`. Arguments are checked by `s3net_ops::check_deform_args` (the same
/// rules as the fused kernel) and reported as [`ModelError::InvalidArgument`].
/// Offset groups and weight groups are not supported (the network uses neither).
pub fn deform_conv2d(
    input: &Tensor,
    offset: &Tensor,
    mask: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: ConvGeometry,
) -> Result<Tensor, ModelError> {
    // 16-bit activations are computed in float32, as the fused op does: in bfloat16 the
    // sampling positions (pixel indices up to the image side) would be off by whole pixels.
    if matches!(input.kind(), Kind::BFloat16 | Kind::Half) {
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let (m, b) = (mask.map(f), bias.map(f));
        let out = deform_conv2d(&f(input), &f(offset), m.as_ref(), &f(weight), b.as_ref(), geometry)?;
        return Ok(out.to_kind(input.kind()));
    }
    let g = geometry;
    let (ho, wo) = s3net_ops::check_deform_args(input, offset, mask, weight, bias, g.stride, g.padding, g.dilation)
        .map_err(|e| ModelError::InvalidArgument(e.0))?;
    let (n, c, h, w) = input.size4()?;
    let per_image = weight.dim() == 5;
    let ws = weight.size();
    let (o, kh, kw) = (ws[ws.len() - 4], ws[ws.len() - 2], ws[ws.len() - 1]);
    let k = kh * kw;

    // grid_sampler maps normalised [-1, 1] onto [0, size-1]; a side of length 1 would divide by
    // zero. Zero-padding the bottom/right edge changes nothing: outside samples read zero anyway.
    let (input, h, w) = {
        let ph = if h == 1 { 1 } else { 0 };
        let pw = if w == 1 { 1 } else { 0 };
        if ph + pw > 0 {
            (input.constant_pad_nd([0, pw, 0, ph]), h + ph, w + pw)
        } else {
            (input.shallow_clone(), h, w)
        }
    };

    let opts = (offset.kind(), offset.device());
    // Base sampling positions per tap: (K, Ho, 1) for y and (K, 1, Wo) for x.
    let taps = Tensor::arange(k, opts);
    let ti = taps.divide_scalar_mode(kw, "floor");
    let tj = taps.remainder(kw);
    let base_y = (ti * g.dilation.0 - g.padding.0).view([k, 1, 1])
        + (Tensor::arange(ho, opts) * g.stride.0).view([1, ho, 1]);
    let base_x = (tj * g.dilation.1 - g.padding.1).view([k, 1, 1])
        + (Tensor::arange(wo, opts) * g.stride.1).view([1, 1, wo]);

    let off = offset.view([n, k, 2, ho, wo]);
    let y = off.select(2, 0) + base_y; // (N, K, Ho, Wo)
    let x = off.select(2, 1) + base_x;
    // Normalise for align_corners = true: -1 ↦ pixel 0, +1 ↦ pixel size-1.
    let gy = y * (2.0 / (h - 1) as f64) - 1.0;
    let gx = x * (2.0 / (w - 1) as f64) - 1.0;
    let grid = Tensor::stack(&[gx, gy], -1).view([n, k * ho, wo, 2]);

    // (N, C, K·Ho, Wo): bilinear, zeros outside, align_corners.
    let sampled = input.grid_sampler_2d(&grid, 0, 0, true).view([n, c, k, ho, wo]);
    let cols = match mask {
        Some(m) => sampled * m.view([n, 1, k, ho, wo]),
        None => sampled,
    };
    // (O, C·K) or (N, O, C·K), broadcast against (N, C·K, Ho·Wo).
    let w2 = if per_image { weight.reshape([n, o, c * k]) } else { weight.reshape([o, c * k]) };
    let out = w2.matmul(&cols.reshape([n, c * k, ho * wo]));
    let out = out.view([n, o, ho, wo]);
    Ok(match bias {
        Some(b) => out + b.view([if per_image { n } else { 1 }, o, 1, 1]),
        None => out,
    })
}
