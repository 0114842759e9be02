//! Random affine transforms for the affine-consistency term.

use tch::{Kind, Tensor};

use crate::loss::IGNORE;
use crate::options::AffineRange;
use crate::rng::SplitMix64;

/// A 2×3 matrix in normalised coordinates ([-1, 1] spans the image), mapping each *output*
/// pixel to where it samples the input — the convention of `affine_grid`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [f64; 6]);

impl Affine {
    pub const IDENTITY: Affine = Affine([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    /// The fixed 90° rotation (`rot90`): output pixel (i, j) reads input pixel (j, S−1−i).
    pub const QUARTER_TURN: Affine = Affine([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]);

    /// Draws rotation · shear · scale plus a translation from the ranges (or the fixed 90°
    /// rotation when `range.rot90`).
    pub fn draw(rng: &mut SplitMix64, range: &AffineRange) -> Affine {
        if range.rot90 {
            return Affine::QUARTER_TURN;
        }
        let rot = rng.uniform(-range.rotation_deg, range.rotation_deg).to_radians();
        let shear = rng.uniform(-range.shear_deg, range.shear_deg).to_radians();
        let s = if range.scale.0 < range.scale.1 { rng.uniform(range.scale.0, range.scale.1) } else { range.scale.0 };
        let tx = rng.uniform(-range.translate, range.translate) * 2.0;
        let ty = rng.uniform(-range.translate, range.translate) * 2.0;
        let (c, n) = (rot.cos(), rot.sin());
        let sh = shear.tan();
        // R · [[1, sh], [0, 1]] · s
        let a = [c * s, (c * sh - n) * s, n * s, (n * sh + c) * s];
        Affine([a[0], a[1], tx, a[2], a[3], ty])
    }

    /// The sampling grid `(1, S, S, 2)` for an `S × S` image on `x`'s device.
    pub fn grid(&self, like: &Tensor) -> Tensor {
        Affine::grids(&[*self], like)
    }

    /// The sampling grids `(M, S, S, 2)` of M transforms at once (one copy to the device, one
    /// kernel), for `S × S` images on `like`'s device.
    pub fn grids(ts: &[Affine], like: &Tensor) -> Tensor {
        let size = like.size();
        let m = ts.len() as i64;
        let flat: Vec<f64> = ts.iter().flat_map(|t| t.0).collect();
        let theta = Tensor::from_slice(&flat).to_kind(Kind::Float).to_device(like.device()).view([m, 2, 3]);
        Tensor::affine_grid_generator(&theta, [m, size[1], size[2], size[3]], false)
    }
}

/// How the affine-consistency term moves a stack's images and clusterings: bilinear warps along
/// sampling grids, or, when every network's transform is the quarter turn (the default
/// preset's), the turn itself. A quarter turn is a permutation of pixels, so it is exact (the
/// warp along its grid samples positions off by about 10⁻⁵ pixel, blending in that much of a
/// neighbour), and the clustering's argmax can be turned instead of the response map it comes
/// from.
/// On a GPU the warp of a 16-network response map, and the argmax after it, took about 3 % of
/// a step (H100 profile, docs/gpu-checks/2026-11-27-h100-fusions).
pub enum Transform {
    /// Sampling grids `(M, S, S, 2)`, one per network.
    Warp(Tensor),
    /// Every network's transform is [`Affine::QUARTER_TURN`].
    QuarterTurn,
}

impl Transform {
    /// The transforms `ts` of a stack's networks, for `S × S` images on `like`'s device.
    pub fn new(ts: &[Affine], like: &Tensor) -> Transform {
        if !ts.is_empty() && ts.iter().all(|t| *t == Affine::QUARTER_TURN) {
            Transform::QuarterTurn
        } else {
            Transform::Warp(Affine::grids(ts, like))
        }
    }

    /// The same transform, sharing the grid's storage.
    pub fn shallow_clone(&self) -> Transform {
        match self {
            Transform::Warp(g) => Transform::Warp(g.shallow_clone()),
            Transform::QuarterTurn => Transform::QuarterTurn,
        }
    }

    /// `x (M, C, S, S)`, image j moved by network j's transform, zeros outside.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match self {
            Transform::Warp(g) => warp(x, g),
            Transform::QuarterTurn => x.rot90(1, [2, 3]),
        }
    }

    /// The clustering moved: from the response `(M, K, S, S)` and its argmax `labels (M, S, S)`,
    /// the argmax of the moved response, [`IGNORE`] where the source lies outside the image.
    pub fn move_labels(&self, response: &Tensor, labels: &Tensor) -> Tensor {
        match self {
            Transform::Warp(g) => {
                // Warped in float32 whatever the activations' format.
                let moved = warp(&response.to_kind(Kind::Float), g).argmax(1, false);
                moved.where_self(&inside(g), &Tensor::full([], IGNORE, (Kind::Int64, response.device())))
            }
            Transform::QuarterTurn => labels.rot90(1, [1, 2]),
        }
    }
}

/// Bilinear warp of `(1, C, S, S)` along `grid`, zeros outside.
pub fn warp(x: &Tensor, grid: &Tensor) -> Tensor {
    x.grid_sampler(grid, 0, 0, false)
}

/// `(1, S, S)` boolean: output pixels whose source lies inside the image.
pub fn inside(grid: &Tensor) -> Tensor {
    grid.abs().le(1.0).all_dim(-1, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The quarter turn moves every pixel where the warp along its grid samples it: the
    /// grid's positions are off by about 10⁻⁵ pixel (exact on a small power-of-two side), so
    /// the warp blends in that much of a neighbour and the turn does not; the labels it turns
    /// are the argmax of the warped response but at near-ties.
    #[test]
    fn quarter_turn_is_the_warp() {
        tch::manual_seed(3);
        for s in [8, 256, 7] {
            let x = Tensor::randn([3, 5, s, s], (Kind::Float, Device::Cpu));
            let ts = [Affine::QUARTER_TURN; 3];
            let grid = Affine::grids(&ts, &x);
            let turn = Transform::new(&ts, &x);
            assert!(matches!(turn, Transform::QuarterTurn));
            let (a, b) = (warp(&x, &grid), turn.apply(&x));
            let e = f64::try_from((&a - &b).abs().max()).unwrap();
            assert!(e < 1e-3, "side {s}: {e}");
            if s == 8 {
                assert_eq!(e, 0.0, "side {s}");
            }
            let labels = x.argmax(1, false);
            let want = Transform::Warp(grid).move_labels(&x, &labels);
            let same = f64::try_from(turn.move_labels(&x, &labels).eq_tensor(&want).to_kind(Kind::Float).mean(Kind::Float)).unwrap();
            assert!(same > 0.999, "side {s}: {same} of the labels agree");
        }
        // Any other transform in the stack: warps.
        let x = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(Transform::new(&[Affine::QUARTER_TURN, Affine::IDENTITY], &x), Transform::Warp(_)));
    }
}
