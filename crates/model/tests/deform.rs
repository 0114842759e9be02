//! deform_conv2d against torchvision's golden values (forward and every gradient), and its
//! gradients against finite differences in float64.

use s3net_model::deform::{deform_conv2d, ConvGeometry};
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{check_finite_differences, check_per_image_weights, Forward, Geo};

fn tensor_ops(x: &Tensor, off: &Tensor, mask: Option<&Tensor>, w: &Tensor, b: Option<&Tensor>, g: Geo) -> Tensor {
    let geo = ConvGeometry { stride: g.0, padding: g.1, dilation: g.2 };
    deform_conv2d(x, off, mask, w, b, geo).unwrap()
}

fn check_against_golden(device: Device, kind: Kind, tol: f64) {
    checks::check_against_golden(&tensor_ops, device, kind, tol, Forward::Absolute);
}

/// Per-image kernels (one network per image of a batch) equal separate calls.
#[test]
fn per_image_weights_match_separate_calls() {
    check_per_image_weights(&tensor_ops, Device::Cpu, Kind::Double, 1e-12);
    check_per_image_weights(&tensor_ops, Device::Cpu, Kind::Float, 1e-5);
}

#[test]
fn matches_torchvision_float64_cpu() {
    check_against_golden(Device::Cpu, Kind::Double, 1e-9);
}

#[test]
fn matches_torchvision_float32_cpu() {
    check_against_golden(Device::Cpu, Kind::Float, 2e-4);
}

#[test]
fn matches_torchvision_on_cuda_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    check_against_golden(cuda, Kind::Double, 1e-9);
    check_against_golden(cuda, Kind::Float, 2e-4);
}

/// Central differences of sum(out · g) against autograd, every input, float64.
#[test]
fn gradients_match_finite_differences() {
    tch::manual_seed(3);
    let opts = (Kind::Double, Device::Cpu);
    let geo = ConvGeometry { stride: (1, 2), padding: (1, 1), dilation: (2, 1) };
    let x = Tensor::randn([1, 2, 5, 6], opts).set_requires_grad(true);
    let (ho, wo) = (3, 3);
    let off = (Tensor::randn([1, 18, ho, wo], opts) * 1.3).set_requires_grad(true);
    let mask = Tensor::rand([1, 9, ho, wo], opts).set_requires_grad(true);
    let w = Tensor::randn([2, 2, 3, 3], opts).set_requires_grad(true);
    let b = Tensor::randn([2], opts).set_requires_grad(true);
    let f = |t: &[Tensor]| deform_conv2d(&t[0], &t[1], Some(&t[2]), &t[3], Some(&t[4]), geo).unwrap();
    let y = f(&[&x, &off, &mask, &w, &b].map(|t| t.shallow_clone()));
    assert_eq!(y.size(), [1, 2, ho, wo]);
    let g = Tensor::randn(y.size().as_slice(), opts);
    (&y * &g).sum(Kind::Double).backward();
    check_finite_differences(&[&x, &off, &mask, &w, &b], &g, 1e-5, &f);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([1, 2, 5, 5], o);
    let w = Tensor::zeros([3, 2, 3, 3], o);
    let off = Tensor::zeros([1, 18, 5, 5], o);
    assert!(deform_conv2d(&x, &off, None, &w, None, ConvGeometry::same(3)).is_ok());
    let bad_off = Tensor::zeros([1, 17, 5, 5], o);
    let e = deform_conv2d(&x, &bad_off, None, &w, None, ConvGeometry::same(3)).unwrap_err();
    assert!(e.to_string().contains("offset"), "{e}");
    let bad_w = Tensor::zeros([3, 4, 3, 3], o);
    assert!(deform_conv2d(&x, &off, None, &bad_w, None, ConvGeometry::same(3)).is_err());
    assert!(deform_conv2d(&Tensor::zeros([2, 5, 5], o), &off, None, &w, None, ConvGeometry::same(3)).is_err());
    let tiny = Tensor::zeros([1, 2, 1, 1], o);
    assert!(deform_conv2d(&tiny, &off, None, &w, None, ConvGeometry::default()).is_err());
}

/// bfloat16 operands are sampled in float32 (in bfloat16 a position near the image side is off
/// by a pixel or more): the output is float32's, rounded once.
#[test]
fn bfloat16_samples_in_float32() {
    tch::manual_seed(21);
    let o = (Kind::Float, Device::Cpu);
    let round = |t: Tensor| t.to_kind(Kind::BFloat16);
    let x = round(Tensor::randn([1, 4, 200, 200], o));
    let off = round(Tensor::randn([1, 18, 200, 200], o) * 2.0);
    let m = round(Tensor::rand([1, 9, 200, 200], o));
    let (w, b) = (round(Tensor::randn([4, 4, 3, 3], o) * 0.2), round(Tensor::randn([4], o)));
    let g = ((1, 1), (1, 1), (1, 1));
    let half = tensor_ops(&x, &off, Some(&m), &w, Some(&b), g);
    assert_eq!(half.kind(), Kind::BFloat16);
    let f = |t: &Tensor| t.to_kind(Kind::Float);
    let full = tensor_ops(&f(&x), &f(&off), Some(&f(&m)), &f(&w), Some(&f(&b)), g);
    assert!(half.equal(&full.to_kind(Kind::BFloat16)));
}
