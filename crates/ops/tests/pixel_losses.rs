//! pixel_losses (per-image cross-entropy and continuity, one pass each way) against the same
//! terms written with libtorch's ops in float64, image by image: values, the argmax target,
//! the gradient of any mix of the two terms; a given target with ignored pixels and an image
//! with none valid; ties; float64, float32 and bfloat16; an image alone and in a batch; on the
//! CPU and, where present and switched on, on a GPU; error cases.

use s3net_ops::{pixel_losses, PixelLosses};
use tch::{Device, Kind, Reduction, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{assert_close, max_abs_diff};

const IGNORE: i64 = -100;

/// The two terms of one image `(1, K, H, W)` with libtorch's ops: mean cross-entropy over the
/// valid pixels (0 without any) and the mean L1 of vertical plus horizontal differences.
fn reference_one(x: &Tensor, target: &Tensor) -> (Tensor, Tensor) {
    let valid = i64::try_from(target.ne(IGNORE).sum(Kind::Int64)).unwrap();
    let ce = if valid == 0 {
        x.sum(Kind::Double) * 0.0
    } else {
        x.cross_entropy_loss(target, None::<Tensor>, Reduction::Mean, IGNORE, 0.0)
    };
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    let dy = x.narrow(2, 1, h - 1) - x.narrow(2, 0, h - 1);
    let dx = x.narrow(3, 1, w - 1) - x.narrow(3, 0, w - 1);
    (ce, dy.abs().mean(Kind::Double) + dx.abs().mean(Kind::Double))
}

/// Per image, in float64: (ce (M), continuity (M), the target used).
fn reference(x: &Tensor, target: Option<&Tensor>) -> (Tensor, Tensor, Tensor) {
    let t = match target {
        Some(t) => t.shallow_clone(),
        None => x.detach().argmax(1, false),
    };
    let m = x.size()[0];
    let (ce, co): (Vec<Tensor>, Vec<Tensor>) = (0..m).map(|i| reference_one(&x.narrow(0, i, 1), &t.narrow(0, i, 1))).unzip();
    (Tensor::stack(&ce, 0), Tensor::stack(&co, 0), t)
}

/// Logits exactly representable in `kind`, as float64.
fn logits(shape: [i64; 4], kind: Kind, dev: Device) -> Tensor {
    (Tensor::randn(shape, (Kind::Double, dev)) * 3.0).to_kind(kind).to_kind(Kind::Double)
}

/// The op in `kind` against the float64 reference: values, target, and the gradient of
/// Σ_m a_m·ce_m + b_m·continuity_m for random a, b.
fn compare(dev: Device, x0: &Tensor, target: Option<&Tensor>, kind: Kind, tol: f64) {
    let m = x0.size()[0];
    let tag = format!("{dev:?} {:?} {kind:?} target {}", x0.size(), target.is_some());
    let x1 = x0.to_kind(kind).copy().set_requires_grad(true);
    let x2 = x0.to_kind(Kind::Double).copy().set_requires_grad(true);
    let PixelLosses { ce, continuity, target: t1 } = pixel_losses(&x1, target, true).unwrap();
    let co = continuity.expect("continuity was asked for");
    let (rce, rco, t2) = reference(&x2, target);
    let sums = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    assert_eq!((ce.kind(), co.kind(), t1.kind()), (sums, sums, Kind::Int64), "{tag}");
    assert_eq!(ce.size(), [m], "{tag}");
    assert_eq!(max_abs_diff(&t1, &t2), 0.0, "{tag}: target");
    assert_close(&format!("{tag}: ce"), &ce, &rce, tol);
    assert_close(&format!("{tag}: continuity"), &co, &rco, tol);
    let a = Tensor::rand([m], (Kind::Double, dev)) + 0.5;
    let b = Tensor::rand([m], (Kind::Double, dev)) * 4.0;
    ((&ce * a.to_kind(sums)).sum(sums) + (&co * b.to_kind(sums)).sum(sums)).backward();
    ((&rce * &a).sum(Kind::Double) + (&rco * &b).sum(Kind::Double)).backward();
    let (g1, g2) = (x1.grad(), x2.grad());
    assert_eq!(g1.kind(), kind, "{tag}: gradient");
    // The gradient's entries are small (1/pixels); compare relative to its largest.
    let scale = checks::max_abs(&g2);
    assert!(max_abs_diff(&g1, &g2) <= tol * scale, "{tag}: gradient differs by {} (largest {scale})", max_abs_diff(&g1, &g2));
}

/// A target of the logits' argmax with a band of ignored pixels, and image 1 wholly ignored.
fn target_with_holes(x: &Tensor) -> Tensor {
    let t = x.argmax(1, false).fmod(3);
    let _ = t.narrow(2, 1, 2).fill_(IGNORE);
    if x.size()[0] > 1 {
        let _ = t.narrow(0, 1, 1).fill_(IGNORE);
    }
    t
}

fn cases(dev: Device, kind: Kind, tol: f64) {
    for shape in [[1, 4, 6, 5], [3, 5, 7, 9], [2, 32, 64, 64], [2, 3, 2, 300], [1, 1, 3, 3]] {
        let x = logits(shape, kind, dev);
        compare(dev, &x, None, kind, tol);
        compare(dev, &x, Some(&target_with_holes(&x)), kind, tol);
    }
}

#[test]
fn matches_libtorch_on_cpu() {
    tch::manual_seed(41);
    cases(Device::Cpu, Kind::Double, 1e-10);
    cases(Device::Cpu, Kind::Float, 1e-5);
    // bfloat16 logits are read exactly; the sums are float32 and the gradient rounded once.
    cases(Device::Cpu, Kind::BFloat16, 1.0 / 128.0);
}

/// The CPU kernel's baseline x86-64 loops (the AVX2 ones run above wherever the CPU has it):
/// the comparison again in a child process with `S3OPS_NO_AVX2=1`, which the kernels read once.
#[test]
fn baseline_loops_match_libtorch_too() {
    if std::env::var_os("S3OPS_NO_AVX2").is_some() {
        return; // this is the child
    }
    checks::rerun_with_env(&["S3OPS_NO_AVX2"], &["matches_libtorch_on_cpu", "--exact"], "1 passed");
}

/// Ties go to the first maximum, as argmax; a pixel whose channels are all equal costs log K.
#[test]
fn ties_take_the_first_maximum() {
    // Channel 0 then channel 1 of a 2×2 image: three tied pixels, then channel 1 ahead.
    let x = Tensor::from_slice(&[1.0f32, 5.0, 2.0, 0.0, 1.0, 5.0, 2.0, 2.0]).view([1, 2, 2, 2]);
    let out = pixel_losses(&x, None, false).unwrap();
    let (_, _, want) = reference(&x.to_kind(Kind::Double), None);
    assert_eq!(max_abs_diff(&out.target, &want), 0.0);
    assert_eq!(Vec::<i64>::try_from(out.target.flatten(0, -1)).unwrap(), [0, 0, 0, 1]);
    assert!(out.continuity.is_none());
    let flat = Tensor::zeros([1, 7, 2, 2], (Kind::Float, Device::Cpu));
    let out = pixel_losses(&flat, None, false).unwrap();
    assert_eq!(i64::try_from(out.target.abs().sum(Kind::Int64)).unwrap(), 0);
    let ce = f64::try_from(&out.ce.squeeze()).unwrap();
    assert!((ce - 7f64.ln()).abs() < 1e-6, "{ce}");
}

/// An image gives the same bits alone and at any place in a batch: the fit's batches must
/// train each network exactly as alone.
#[test]
fn an_image_alone_and_in_a_batch_agree_bit_for_bit() {
    tch::manual_seed(42);
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = logits([4, 8, 33, 40], kind, Device::Cpu).to_kind(kind);
        let all = x.copy().set_requires_grad(true);
        let out = pixel_losses(&all, None, true).unwrap();
        (out.ce.sum(Kind::Float) + out.continuity.as_ref().unwrap().sum(Kind::Float) * 3.0).backward();
        for i in 0..4 {
            let one = x.narrow(0, i, 1).copy().set_requires_grad(true);
            let o = pixel_losses(&one, None, true).unwrap();
            (o.ce.sum(Kind::Float) + o.continuity.as_ref().unwrap().sum(Kind::Float) * 3.0).backward();
            assert!(o.ce.equal(&out.ce.narrow(0, i, 1)), "{kind:?} image {i}: ce");
            assert!(o.continuity.unwrap().equal(&out.continuity.as_ref().unwrap().narrow(0, i, 1)), "{kind:?} image {i}");
            assert!(one.grad().equal(&all.grad().narrow(0, i, 1)), "{kind:?} image {i}: gradient");
        }
    }
}

/// Only the cross-entropy in the loss: the continuity's (zero) gradient adds nothing, and an
/// unused continuity output is fine.
#[test]
fn either_term_alone_takes_its_own_gradient() {
    tch::manual_seed(43);
    let x0 = logits([2, 6, 10, 12], Kind::Double, Device::Cpu);
    for (wce, wco) in [(1.0, 0.0), (0.0, 1.0)] {
        let x1 = x0.copy().set_requires_grad(true);
        let x2 = x0.copy().set_requires_grad(true);
        let o = pixel_losses(&x1, None, true).unwrap();
        let l = if wce > 0.0 { o.ce.sum(Kind::Double) } else { o.continuity.unwrap().sum(Kind::Double) };
        l.backward();
        let (ce, co, _) = reference(&x2, None);
        (ce.sum(Kind::Double) * wce + co.sum(Kind::Double) * wco).backward();
        assert_close(&format!("weights {wce} {wco}"), &x1.grad(), &x2.grad(), 1e-12);
    }
}

/// The same on a GPU, when one is present (the CUDA kernel on, as by default); the float32 CUDA
/// results against the CPU's as well.
#[test]
fn cuda_matches_libtorch_when_present() {
    let Some(cuda) = checks::cuda_with_kernels() else { return };
    s3net_ops::set_cuda_pixel_losses(true);
    tch::manual_seed(44);
    cases(cuda, Kind::Double, 1e-10);
    cases(cuda, Kind::Float, 1e-5);
    cases(cuda, Kind::BFloat16, 1.0 / 128.0);
    let x = logits([3, 32, 256, 256], Kind::Float, cuda).to_kind(Kind::Float);
    let (a, b) = (pixel_losses(&x, None, true).unwrap(), pixel_losses(&x.to_device(Device::Cpu), None, true).unwrap());
    assert_eq!(max_abs_diff(&a.target, &b.target), 0.0);
    assert_close("CUDA vs CPU ce", &a.ce, &b.ce, 1e-5);
    assert_close("CUDA vs CPU continuity", &a.continuity.unwrap(), &b.continuity.unwrap(), 1e-5);
}

/// The CUDA kernels' logic, and the op's host code around them, on the CPU emulation
/// (s3net_ops::emulated_cuda): the same cases, so a kernel that has not yet met a GPU is at
/// least known to compute the right thing.
#[test]
fn emulated_cuda_kernels_match_libtorch() {
    tch::manual_seed(45);
    s3net_ops::set_cuda_pixel_losses(true); // as on a GPU by default
    let before = s3net_ops::emulated_launches();
    checks::on_emulated_kernels(|| {
        cases(Device::Cpu, Kind::Double, 1e-10);
        cases(Device::Cpu, Kind::Float, 1e-5);
        cases(Device::Cpu, Kind::BFloat16, 1.0 / 128.0);
    });
    // Forward and backward of each of 5 shapes × 2 targets × 3 types.
    assert_eq!(s3net_ops::emulated_launches() - before, 60);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([2, 3, 4, 4], o);
    let e = pixel_losses(&Tensor::zeros([3, 4, 4], o), None, false).unwrap_err().0;
    assert!(e.contains("logits must be 4-D"), "{e}");
    let e = pixel_losses(&x.to_kind(Kind::Int64), None, false).unwrap_err().0;
    assert!(e.contains("float32, float64 or bfloat16"), "{e}");
    let e = pixel_losses(&x, Some(&Tensor::zeros([2, 4, 5], (Kind::Int64, Device::Cpu))), false).unwrap_err().0;
    assert!(e.contains("target must be (2, 4, 4)"), "{e}");
    let e = pixel_losses(&x, Some(&Tensor::zeros([2, 4, 4], o)), false).unwrap_err().0;
    assert!(e.contains("target must be int64"), "{e}");
    let e = pixel_losses(&Tensor::zeros([1, 3, 1, 8], o), None, true).unwrap_err().0;
    assert!(e.contains("at least 2×2 pixels"), "{e}");
    let e = pixel_losses(&Tensor::zeros([1, 0, 4, 4], o), None, false).unwrap_err().0;
    assert!(e.contains("need a channel and a pixel"), "{e}");
    // One row is fine without the continuity term.
    assert!(pixel_losses(&Tensor::zeros([1, 3, 1, 8], o), None, false).is_ok());
}
