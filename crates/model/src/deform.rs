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

use tch::Tensor;

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

    fn out_size(&self, h: i64, w: i64, kh: i64, kw: i64) -> (i64, i64) {
        let ho = (h + 2 * self.padding.0 - (self.dilation.0 * (kh - 1) + 1)) / self.stride.0 + 1;
        let wo = (w + 2 * self.padding.1 - (self.dilation.1 * (kw - 1) + 1)) / self.stride.1 + 1;
        (ho, wo)
    }
}

/// Modulated deformable convolution with torchvision's semantics.
///
/// * `input`  — `(N, C, H, W)`
/// * `offset` — `(N, 2·kh·kw, Ho, Wo)`, interleaved `(dy, dx)` per tap
/// * `mask`   — `(N, kh·kw, Ho, Wo)` or `None` (all ones: DCNv1)
/// * `weight` — `(O, C, kh, kw)`; `bias` — `(O)` or `None`
///
/// Returns `(N, O, Ho, Wo)`. Shapes are checked and reported as [`ModelError::InvalidArgument`].
/// Offset groups and weight groups other than 1 are not supported (the network uses neither).
pub fn deform_conv2d(
    input: &Tensor,
    offset: &Tensor,
    mask: Option<&Tensor>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: ConvGeometry,
) -> Result<Tensor, ModelError> {
    let bad = |msg: String| Err(ModelError::InvalidArgument(format!("deform_conv2d: {msg}")));
    let (n, c, h, w) = match input.size()[..] {
        [n, c, h, w] => (n, c, h, w),
        ref s => return bad(format!("input must be 4-D (N, C, H, W), got {s:?}")),
    };
    let (o, wc, kh, kw) = match weight.size()[..] {
        [o, wc, kh, kw] => (o, wc, kh, kw),
        ref s => return bad(format!("weight must be 4-D (O, C, kh, kw), got {s:?}")),
    };
    if wc != c {
        return bad(format!("weight has {wc} input channels but the input has {c}"));
    }
    let g = geometry;
    if g.stride.0 < 1 || g.stride.1 < 1 || g.dilation.0 < 1 || g.dilation.1 < 1 {
        return bad(format!("stride and dilation must be >= 1, got {g:?}"));
    }
    if g.padding.0 < 0 || g.padding.1 < 0 {
        return bad(format!("padding must be >= 0, got {:?}", g.padding));
    }
    let (ho, wo) = g.out_size(h, w, kh, kw);
    if ho < 1 || wo < 1 {
        return bad(format!("kernel {kh}x{kw} does not fit a {h}x{w} input with {g:?}"));
    }
    let k = kh * kw;
    if offset.size() != [n, 2 * k, ho, wo] {
        return bad(format!("offset must be {:?}, got {:?}", [n, 2 * k, ho, wo], offset.size()));
    }
    if let Some(m) = mask {
        if m.size() != [n, k, ho, wo] {
            return bad(format!("mask must be {:?}, got {:?}", [n, k, ho, wo], m.size()));
        }
    }
    if let Some(b) = bias {
        if b.size() != [o] {
            return bad(format!("bias must be [{o}], got {:?}", b.size()));
        }
    }

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
    let out = weight.reshape([o, c * k]).matmul(&cols.reshape([n, c * k, ho * wo]));
    let out = out.view([n, o, ho, wo]);
    Ok(match bias {
        Some(b) => out + b.view([1, o, 1, 1]),
        None => out,
    })
}
