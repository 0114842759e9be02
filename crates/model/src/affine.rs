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

    /// The transform that undoes this one: where `self` moves a pixel from p to q, the inverse
    /// moves it from q back to p. (Output p samples A·p + t, so q samples A⁻¹·q − A⁻¹·t.) A
    /// transform that flattens the plane has no inverse; the ranges `draw` takes never give one.
    pub fn inverse(&self) -> Affine {
        let [a, b, tx, c, d, ty] = self.0;
        let det = a * d - b * c;
        let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
        Affine([ia, ib, -(ia * tx + ib * ty), ic, id, -(ic * tx + id * ty)])
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
    /// Sampling grids `(M, S, S, 2)`, one per network, and those of their inverses (`back`).
    Warp { grid: Tensor, back: Tensor },
    /// Every network's transform is [`Affine::QUARTER_TURN`].
    QuarterTurn,
}

impl Transform {
    /// The transforms `ts` of a stack's networks, for `S × S` images on `like`'s device.
    /// A warp's inverse grids come with it, whichever side of the affine term will use them:
    /// one more small grid per new draw, against a step's work.
    pub fn new(ts: &[Affine], like: &Tensor) -> Transform {
        if !ts.is_empty() && ts.iter().all(|t| *t == Affine::QUARTER_TURN) {
            Transform::QuarterTurn
        } else {
            let back = Affine::grids(&ts.iter().map(Affine::inverse).collect::<Vec<_>>(), like);
            Transform::Warp { grid: Affine::grids(ts, like), back }
        }
    }

    /// The same transform, sharing the grids' storage.
    pub fn shallow_clone(&self) -> Transform {
        match self {
            Transform::Warp { grid, back } => Transform::Warp { grid: grid.shallow_clone(), back: back.shallow_clone() },
            Transform::QuarterTurn => Transform::QuarterTurn,
        }
    }

    /// `x (M, C, S, S)`, image j moved by network j's transform, zeros outside.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match self {
            Transform::Warp { grid, .. } => warp(x, grid),
            Transform::QuarterTurn => x.rot90(1, [2, 3]),
        }
    }

    /// The clustering of the moved images moved back: from their response `(M, K, S, S)`, the
    /// argmax of the response moved by each inverse transform `(M, S, S)`, [`IGNORE`] where the
    /// source lies outside the image. Pixel p of an image then holds the label that the moved
    /// copy gave the point p was moved to. Only the response: a warp takes the argmax after
    /// moving it, and a quarter turn's argmax moves exactly, so no caller's argmax is needed.
    pub fn move_labels_back(&self, response: &Tensor) -> Tensor {
        match self {
            Transform::Warp { back, .. } => warp_labels(response, back),
            Transform::QuarterTurn => channel_argmax(response).rot90(-1, [1, 2]),
        }
    }

    /// The clustering moved: from the response `(M, K, S, S)` and its argmax `labels (M, S, S)`,
    /// the argmax of the moved response, [`IGNORE`] where the source lies outside the image.
    pub fn move_labels(&self, response: &Tensor, labels: &Tensor) -> Tensor {
        match self {
            Transform::Warp { grid, .. } => warp_labels(response, grid),
            Transform::QuarterTurn => labels.rot90(1, [1, 2]),
        }
    }
}

/// `t.argmax(1, false)` for `(M, K, S, S)`, through `s3net_ops::argmax_channels`: on the CPU
/// libtorch's argmax over the strided channel axis took 3 % of a step (and 1.4 s of a 4000²
/// scan's read-off at full size, `fit::read_labels`).
pub(crate) fn channel_argmax(t: &Tensor) -> Tensor {
    s3net_ops::argmax_channels(t).unwrap_or_else(|_| t.argmax(1, false))
}

/// The argmax of `response` warped along `grid` (in float32 whatever the activations' format),
/// [`IGNORE`] where the source lies outside the image.
fn warp_labels(response: &Tensor, grid: &Tensor) -> Tensor {
    let moved = channel_argmax(&warp(&response.to_kind(Kind::Float), grid));
    moved.where_self(&inside(grid), &Tensor::full([], IGNORE, (Kind::Int64, response.device())))
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
            let want = Transform::Warp { back: grid.shallow_clone(), grid }.move_labels(&x, &labels);
            let same = f64::try_from(turn.move_labels(&x, &labels).eq_tensor(&want).to_kind(Kind::Float).mean(Kind::Float)).unwrap();
            assert!(same > 0.999, "side {s}: {same} of the labels agree");
        }
        // Any other transform in the stack: warps.
        let x = Tensor::zeros([2, 1, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(Transform::new(&[Affine::QUARTER_TURN, Affine::IDENTITY], &x), Transform::Warp { .. }));
    }

    /// `inverse` undoes a transform: composed either way the matrix is the identity, for the
    /// quarter turn and for random draws.
    #[test]
    fn inverse_undoes_the_transform() {
        let mut rng = SplitMix64::new(5);
        let range = crate::options::FitOptions::preset(crate::options::Preset::Paper).affine;
        let mut ts = vec![Affine::QUARTER_TURN, Affine::IDENTITY];
        ts.extend((0..20).map(|_| Affine::draw(&mut rng, &range)));
        let compose = |p: &Affine, q: &Affine| {
            // p after q: x ↦ P(Q x + tq) + tp.
            let ([a, b, tx, c, d, ty], [e, f, ux, g, h, uy]) = (p.0, q.0);
            [a * e + b * g, a * f + b * h, a * ux + b * uy + tx, c * e + d * g, c * f + d * h, c * ux + d * uy + ty]
        };
        for t in &ts {
            for m in [compose(t, &t.inverse()), compose(&t.inverse(), t)] {
                for (x, y) in m.iter().zip(Affine::IDENTITY.0) {
                    assert!((x - y).abs() < 1e-12, "{t:?}: {m:?}");
                }
            }
        }
        assert_eq!(Affine::QUARTER_TURN.inverse(), Affine([0.0, 1.0, 0.0, -1.0, 0.0, 0.0]));
    }

    /// Labels moved by a transform and moved back land where they started: exactly for the
    /// quarter turn; for random warps, wherever the round trip stays inside the image (up to
    /// the bilinear sampling of label-constant regions' edges), the rest ignored.
    #[test]
    fn labels_moved_back_land_where_they_started() {
        let s = 48;
        // Smooth blobs, so that one pixel's interpolation error moves few argmaxes.
        let yy = Tensor::arange(s, (Kind::Float, Device::Cpu)).view([s, 1]).expand([s, s], false);
        let xx = yy.transpose(0, 1);
        let planes: Vec<Tensor> = (0..4)
            .map(|i| {
                let (cx, cy) = (10.0 + 9.0 * i as f64, 40.0 - 8.0 * i as f64);
                -((&xx - cx).square() + (&yy - cy).square()) / 200.0
            })
            .collect();
        let r = Tensor::stack(&planes, 0).unsqueeze(0).repeat([3, 1, 1, 1]);
        let labels = r.argmax(1, false);

        let turn = Transform::new(&[Affine::QUARTER_TURN; 3], &r);
        let moved = turn.apply(&r);
        let back = turn.move_labels_back(&moved);
        assert!(bool::try_from(back.eq_tensor(&labels).all()).unwrap());

        let mut rng = SplitMix64::new(9);
        let range = crate::options::FitOptions::preset(crate::options::Preset::Paper).affine;
        let ts: Vec<Affine> = (0..3).map(|_| Affine::draw(&mut rng, &range)).collect();
        let warp = Transform::new(&ts, &r);
        let moved = warp.apply(&r);
        let back = warp.move_labels_back(&moved);
        let kept = back.ne(IGNORE);
        let n_kept = f64::try_from(kept.to_kind(Kind::Float).mean(Kind::Float)).unwrap();
        assert!(n_kept > 0.5 && n_kept < 1.0, "{n_kept} of the pixels kept");
        // Every kept pixel's round trip stays inside; the ones ignored did leave.
        let agree = back.eq_tensor(&labels).logical_and(&kept).to_kind(Kind::Float).sum(Kind::Float);
        let frac = f64::try_from(agree / kept.to_kind(Kind::Float).sum(Kind::Float)).unwrap();
        assert!(frac > 0.97, "{frac} of the kept labels came back");
        // And the forward move is its mirror: moved forward, the labels of x land on T(x).
        let fwd = warp.move_labels(&r, &labels);
        let there = fwd.eq_tensor(&moved.argmax(1, false)).logical_and(&fwd.ne(IGNORE)).to_kind(Kind::Float).sum(Kind::Float);
        let frac = f64::try_from(there / fwd.ne(IGNORE).to_kind(Kind::Float).sum(Kind::Float)).unwrap();
        assert!(frac > 0.99, "{frac}");
    }
}
