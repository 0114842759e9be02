//! Random affine transforms for the affine-consistency term.

use tch::{Kind, Tensor};

use crate::options::AffineRange;
use crate::rng::SplitMix64;

/// A 2×3 matrix in normalised coordinates ([-1, 1] spans the image), mapping each *output*
/// pixel to where it samples the input — the convention of `affine_grid`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [f64; 6]);

impl Affine {
    pub const IDENTITY: Affine = Affine([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);

    /// Draws rotation · shear · scale plus a translation from the ranges (or the fixed 90°
    /// rotation when `range.rot90`).
    pub fn draw(rng: &mut SplitMix64, range: &AffineRange) -> Affine {
        if range.rot90 {
            return Affine([0.0, -1.0, 0.0, 1.0, 0.0, 0.0]);
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

/// Bilinear warp of `(1, C, S, S)` along `grid`, zeros outside.
pub fn warp(x: &Tensor, grid: &Tensor) -> Tensor {
    x.grid_sampler(grid, 0, 0, false)
}

/// `(1, S, S)` boolean: output pixels whose source lies inside the image.
pub fn inside(grid: &Tensor) -> Tensor {
    grid.abs().le(1.0).all_dim(-1, false)
}
