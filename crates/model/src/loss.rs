//! The loss terms of the joint objective λ1·L_ce + λ2·L_at + λ3·L_s. Each is a pure function of
//! tensors that keeps its gradient path (the authors' spatial term had none).

use tch::{Kind, Reduction, Tensor};

use crate::options::{Kernels, SpatialLoss};

/// Label value ignored by the cross-entropy terms (pixels a transform moved outside the image).
pub const IGNORE: i64 = -100;

/// Cross-entropy of the response map `(N, K, H, W)` against its own argmax. Returns the loss and
/// the (detached) argmax target `(N, H, W)`.
pub fn self_ce(response: &Tensor) -> (Tensor, Tensor) {
    let target = response.detach().argmax(1, false);
    let loss = response.cross_entropy_loss(&target, None::<Tensor>, Reduction::Mean, IGNORE, 0.0);
    (loss, target)
}

/// Cross-entropy of `logits` against `target`, ignoring [`IGNORE`] pixels. Zero if every pixel
/// is ignored.
pub fn masked_ce(logits: &Tensor, target: &Tensor) -> Tensor {
    let valid = target.ne(IGNORE).sum(Kind::Int64);
    if i64::try_from(&valid).unwrap_or(0) == 0 {
        return logits.sum(Kind::Float) * 0.0;
    }
    logits.cross_entropy_loss(target, None::<Tensor>, Reduction::Mean, IGNORE, 0.0)
}

/// Paper eq. 5: Sobel-x, Sobel-y and mixed (dx = dy = 1) responses X, Y, XY of the softmax
/// map, then the mean L1 of X−Y, X−XY and Y−XY over pixels and channels.
pub fn sobel_spatial(response: &Tensor) -> Tensor {
    let p = response.softmax(1, Kind::Float);
    let k = p.size()[1];
    let dev = p.device();
    let kern = |v: [f32; 9]| Tensor::from_slice(&v).to_device(dev).view([1, 1, 3, 3]).expand([k, 1, 3, 3], false).contiguous();
    let sx = kern([-1., 0., 1., -2., 0., 2., -1., 0., 1.]);
    let sy = kern([-1., -2., -1., 0., 0., 0., 1., 2., 1.]);
    let sxy = kern([1., 0., -1., 0., 0., 0., -1., 0., 1.]);
    let conv = |w: &Tensor| p.conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], k);
    let (x, y, xy) = (conv(&sx), conv(&sy), conv(&sxy));
    (&x - &y).abs().mean(Kind::Float) + (&x - &xy).abs().mean(Kind::Float) + (&y - &xy).abs().mean(Kind::Float)
}

/// L1 of vertical and horizontal neighbour differences of the response map.
pub fn continuity(response: &Tensor) -> Tensor {
    let s = response.size();
    let (h, w) = (s[2], s[3]);
    let dy = response.narrow(2, 1, h - 1) - response.narrow(2, 0, h - 1);
    let dx = response.narrow(3, 1, w - 1) - response.narrow(3, 0, w - 1);
    dy.abs().mean(Kind::Float) + dx.abs().mean(Kind::Float)
}

// ---------------------------------------------------------------------------------------------
// Per image of a batch. A batch of N images (one per stacked network) needs each image's own
// loss value, to report it and to weight nothing across jobs. For N = 1 these run exactly the
// single-image functions above, operation for operation, so a fit alone gives bit-for-bit the
// results it always gave (and that the README's accuracy figures were measured with).
// ---------------------------------------------------------------------------------------------

/// [`self_ce`] per image: `(N,)` losses and the `(N, H, W)` argmax target.
pub fn self_ce_each(response: &Tensor) -> (Tensor, Tensor) {
    if response.size()[0] == 1 {
        let (loss, target) = self_ce(response);
        return (loss.reshape([1]), target);
    }
    let target = response.detach().argmax(1, false);
    let ce = response.cross_entropy_loss(&target, None::<Tensor>, Reduction::None, IGNORE, 0.0);
    (ce.mean_dim([1, 2].as_slice(), false, Kind::Float), target)
}

/// [`masked_ce`] per image: `(N,)`; an image whose pixels are all ignored contributes zero.
///
/// A lone image on the CPU goes through [`masked_ce`] (bit for bit as always). On a GPU every
/// image takes the per-image form, because `masked_ce`'s test for "all ignored" reads a count
/// back to the host, which stalls the queue in the middle of every step.
pub fn masked_ce_each(logits: &Tensor, target: &Tensor) -> Tensor {
    if logits.size()[0] == 1 && !s3net_ops::gpu_paths(logits.device()) {
        return masked_ce(logits, target).reshape([1]);
    }
    let ce = logits.cross_entropy_loss(target, None::<Tensor>, Reduction::None, IGNORE, 0.0);
    let valid = target.ne(IGNORE).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float).clamp_min(1.0);
    ce.sum_dim_intlist([1, 2].as_slice(), false, Kind::Float) / valid
}

/// [`continuity`] per image: `(N,)`.
pub fn continuity_each(response: &Tensor) -> Tensor {
    if response.size()[0] == 1 {
        return continuity(response).reshape([1]);
    }
    let s = response.size();
    let (h, w) = (s[2], s[3]);
    let dy = response.narrow(2, 1, h - 1) - response.narrow(2, 0, h - 1);
    let dx = response.narrow(3, 1, w - 1) - response.narrow(3, 0, w - 1);
    let per = |t: Tensor| t.abs().mean_dim([1, 2, 3].as_slice(), false, Kind::Float);
    per(dy) + per(dx)
}

/// [`sobel_spatial`] per image: `(N,)`.
pub fn sobel_spatial_each(response: &Tensor) -> Tensor {
    let n = response.size()[0];
    if n == 1 {
        return sobel_spatial(response).reshape([1]);
    }
    Tensor::cat(&(0..n).map(|i| sobel_spatial(&response.narrow(0, i, 1)).reshape([1])).collect::<Vec<_>>(), 0)
}

// ---------------------------------------------------------------------------------------------
// The fit's entry points: the fused op where it runs, the functions above otherwise.
// ---------------------------------------------------------------------------------------------

/// The response map's terms per image of a stack `(M, K, H, W)`: [`self_ce_each`] and the
/// spatial term asked for (`None`: none), with the argmax target. With the fused kernels and
/// the continuity term (or none) this is `s3net_ops::pixel_losses` (one pass over the map each
/// way instead of about 25; 16-bit maps read as they are); otherwise, or where the op declines
/// (CUDA, until its kernel has run on a GPU), the functions above on one float32 copy of the
/// map, so that the terms' gradients add in float32 and are rounded once.
pub fn response_terms(response: &Tensor, spatial: Option<SpatialLoss>, kernels: Kernels) -> (Tensor, Option<Tensor>, Tensor) {
    if kernels == Kernels::Fused && spatial != Some(SpatialLoss::Sobel) {
        if let Ok(o) = s3net_ops::pixel_losses(response, None, spatial.is_some()) {
            return (o.ce, o.continuity, o.target);
        }
    }
    let r = response.to_kind(Kind::Float);
    let (ce, target) = self_ce_each(&r);
    let sp = spatial.map(|s| match s {
        SpatialLoss::Sobel => sobel_spatial_each(&r),
        SpatialLoss::Continuity => continuity_each(&r),
    });
    (ce, sp, target)
}

/// [`masked_ce_each`] of `logits (M, K, H, W)` against `target (M, H, W)`, through
/// `s3net_ops::pixel_losses` with the fused kernels (see [`response_terms`]).
pub fn moved_ce(logits: &Tensor, target: &Tensor, kernels: Kernels) -> Tensor {
    if kernels == Kernels::Fused {
        if let Ok(o) = s3net_ops::pixel_losses(logits, Some(target), false) {
            return o.ce;
        }
    }
    masked_ce_each(&logits.to_kind(Kind::Float), target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max()).unwrap()
    }

    /// The fit's entry points give the same terms and gradients with the fused op as with the
    /// tensor-op functions, for every spatial choice, in float32 and bfloat16 (the response
    /// map as the network hands it over).
    #[test]
    fn fused_and_tensor_op_terms_agree() {
        tch::manual_seed(5);
        for kind in [Kind::Float, Kind::BFloat16] {
            let x = (Tensor::randn([3, 6, 22, 22], (Kind::Float, Device::Cpu)) * 2.0).to_kind(kind);
            let moved = x.argmax(1, false).rot90(1, [1, 2]);
            for spatial in [None, Some(SpatialLoss::Continuity), Some(SpatialLoss::Sobel)] {
                let run = |kernels: Kernels| {
                    let r = x.copy().set_requires_grad(true);
                    let (ce, sp, target) = response_terms(&r, spatial, kernels);
                    let at = moved_ce(&r, &moved, kernels);
                    assert_eq!(sp.is_some(), spatial.is_some());
                    let total = &ce * 1.5 + sp.as_ref().map_or_else(|| ce.zeros_like(), |s| s * 4.0) + &at * 0.2;
                    total.sum(Kind::Float).backward();
                    (ce, sp, at, target, r.grad())
                };
                let (a, b) = (run(Kernels::Fused), run(Kernels::TensorOps));
                let tag = format!("{kind:?} {spatial:?}");
                assert!(a.3.equal(&b.3), "{tag}: target");
                assert!(max_diff(&a.0, &b.0) < 1e-5, "{tag}: ce");
                assert!(max_diff(&a.2, &b.2) < 1e-5, "{tag}: affine term");
                if let (Some(s1), Some(s2)) = (&a.1, &b.1) {
                    assert!(max_diff(s1, s2) < 1e-5, "{tag}: spatial");
                }
                assert_eq!(a.4.kind(), kind, "{tag}");
                let scale = f64::try_from(b.4.abs().max().to_kind(Kind::Double)).unwrap();
                let tol = if kind == Kind::Float { 1e-5 } else { 1.0 / 64.0 };
                assert!(max_diff(&a.4, &b.4) <= tol * scale, "{tag}: gradient {} of {scale}", max_diff(&a.4, &b.4));
            }
        }
    }
}
