//! plane_norm (BatchNorm with each image's own statistics) against libtorch's BatchNorm run on
//! each image alone: forward and the three gradients, on the CPU and on a GPU (its own
//! kernels), float64, float32 and bfloat16, planes that are and are not whole 16-byte vectors,
//! a large mean, planes of one value; error cases.

use s3net_ops::plane_norm;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{assert_close, max_abs_diff};

/// BatchNorm in training mode, image by image, in float64.
fn reference(x: &Tensor, g: &Tensor, b: &Tensor) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .map(|i| x.narrow(0, i, 1).batch_norm(Some(g), Some(b), None::<&Tensor>, None::<&Tensor>, true, 0.1, 1e-5, false))
        .collect();
    Tensor::cat(&parts, 0)
}

fn compare(dev: Device, shape: [i64; 4], kind: Kind, offset: f64, tol: f64) {
    let c = shape[1];
    let params = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    let x0 = (Tensor::randn(shape, (Kind::Double, dev)) * 2.0 + offset).to_kind(kind).to_kind(Kind::Double);
    let g0 = Tensor::randn([c], (Kind::Double, dev));
    let b0 = Tensor::randn([c], (Kind::Double, dev));
    let leaf = |t: &Tensor, k: Kind| t.to_kind(k).copy().set_requires_grad(true);
    let (x1, g1, b1) = (leaf(&x0, kind), leaf(&g0, params), leaf(&b0, params));
    let (x2, g2, b2) = (leaf(&x0, Kind::Double), leaf(&g0, Kind::Double), leaf(&b0, Kind::Double));
    let y1 = plane_norm(&x1, &g1, &b1, 1e-5).unwrap();
    let y2 = reference(&x2, &g2, &b2);
    let tag = format!("{dev:?} {shape:?} {kind:?} offset {offset}");
    assert_eq!(y1.kind(), kind, "{tag}");
    assert_close(&format!("{tag}: forward"), &y1, &y2, tol);
    let go = Tensor::randn(shape, (Kind::Double, dev)).to_kind(kind).to_kind(Kind::Double);
    (&y1 * go.to_kind(kind)).sum(Kind::Float).backward();
    (&y2 * &go).sum(Kind::Double).backward();
    for (name, a, b) in [("grad_input", &x1, &x2), ("grad_gamma", &g1, &g2), ("grad_beta", &b1, &b2)] {
        let (ga, gb) = (a.grad(), b.grad());
        assert_eq!(ga.kind(), a.kind(), "{tag}: {name}");
        assert_close(&format!("{tag}: {name}"), &ga, &gb, tol);
    }
}

fn shapes(dev: Device, kind: Kind, tol: f64) {
    for shape in [[1, 3, 16, 16], [2, 5, 9, 7], [2, 64, 256, 256], [3, 2, 1, 2], [1, 4, 5, 200], [2, 3, 1, 1]] {
        compare(dev, shape, kind, 0.0, tol);
    }
    // A mean far from zero: the variance must not cancel away.
    compare(dev, [2, 3, 64, 64], kind, 100.0, tol);
}

#[test]
fn matches_batch_norm_on_cpu() {
    tch::manual_seed(31);
    shapes(Device::Cpu, Kind::Double, 1e-10);
    shapes(Device::Cpu, Kind::Float, 1e-4);
}

#[test]
fn cuda_matches_batch_norm_when_present() {
    let Some(cuda) = checks::cuda_with_kernels() else { return };
    tch::manual_seed(32);
    shapes(cuda, Kind::Double, 1e-10);
    shapes(cuda, Kind::Float, 1e-4);
}

/// bfloat16 planes in and out (γ, β and their gradients float32); sums in float32, each value
/// rounded once.
#[test]
fn cuda_bfloat16_when_present() {
    let Some(cuda) = checks::cuda_with_kernels() else { return };
    tch::manual_seed(33);
    shapes(cuda, Kind::BFloat16, 1.0 / 64.0);
}

/// The kernels and PlaneNormFn's host code on the CPU emulation (s3net_ops::emulated_cuda).
#[test]
fn emulated_cuda_kernels_match_batch_norm() {
    tch::manual_seed(34);
    checks::on_emulated_kernels(|| {
        shapes(Device::Cpu, Kind::Double, 1e-10);
        shapes(Device::Cpu, Kind::Float, 1e-4);
        shapes(Device::Cpu, Kind::BFloat16, 1.0 / 64.0);
    });
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([1, 3, 4, 4], o);
    let (g, b) = (Tensor::ones([3], o), Tensor::zeros([3], o));
    let e = plane_norm(&x, &Tensor::ones([4], o), &b, 1e-5).unwrap_err().0;
    assert!(e.contains("gamma and beta must be (3)"), "{e}");
    let e = plane_norm(&Tensor::zeros([3, 4, 4], o), &g, &b, 1e-5).unwrap_err().0;
    assert!(e.contains("input must be 4-D"), "{e}");
    let e = plane_norm(&x, &g.to_kind(Kind::Double), &b, 1e-5).unwrap_err().0;
    assert!(e.contains("gamma is Double but the input is Float"), "{e}");
    let e = plane_norm(&x, &g, &b, 0.0).unwrap_err().0;
    assert!(e.contains("eps must be positive"), "{e}");
    // One value per plane: it is its own mean, so the result is β.
    let b3 = Tensor::from_slice(&[1f32, 2., 3.]);
    let y = plane_norm(&Tensor::randn([2, 3, 1, 1], o), &g, &b3, 1e-5).unwrap();
    let e = max_abs_diff(&y, &b3.view([1, 3, 1, 1]).expand([2, 3, 1, 1], false));
    assert!(e < 1e-3, "{e}"); // libtorch computes x·(γ/σ) + (β − mean·γ/σ): rounding
}
