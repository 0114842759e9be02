//! pointwise_conv2d (a stack of independent 1×1 convolutions) against libtorch's
//! conv2d(groups = M): forward and every gradient, float64, float32 and bfloat16, on the CPU
//! and (when present) CUDA; planes whose pixel count spans several reduction chunks, with a
//! remainder.

use s3net_ops::pointwise_conv2d;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{max_abs, max_abs_diff};

/// Our op in `kind` and libtorch's in float64 on identical leaves; forward and all three
/// gradients compared with a tolerance relative to max(1, |reference|).
#[allow(clippy::too_many_arguments)]
fn compare(dev: Device, n: i64, m: i64, c: i64, o: i64, h: i64, w: i64, kind: Kind, tol: f64) {
    // bfloat16 is compared with float64 on the same (rounded) values.
    let draw = |shape: &[i64]| {
        let t = Tensor::randn(shape, (Kind::Double, dev));
        if kind == Kind::BFloat16 { t.to_kind(kind).to_kind(Kind::Double) } else { t }
    };
    let (x0, w0, b0) = (draw(&[n, m * c, h, w]), draw(&[m * o, c, 1, 1]), draw(&[m * o]));
    let leaves = |kind: Kind| {
        (
            x0.to_kind(kind).copy().set_requires_grad(true),
            w0.to_kind(kind).copy().set_requires_grad(true),
            b0.to_kind(kind).copy().set_requires_grad(true),
        )
    };
    let (x1, w1, b1) = leaves(kind);
    let (x2, w2, b2) = leaves(Kind::Double);
    let y1 = pointwise_conv2d(&x1, &w1, Some(&b1), m).unwrap();
    let y2 = x2.conv2d(&w2, Some(&b2), [1, 1], [0, 0], [1, 1], m);
    let tag = format!("{dev:?} N={n} M={m} C={c} O={o} {h}x{w} {kind:?}");
    assert_eq!(y1.size(), y2.size(), "{tag}");
    assert_eq!(y1.kind(), kind, "{tag}");
    let e = max_abs_diff(&y1, &y2);
    assert!(e <= tol * max_abs(&y2).max(1.0), "{tag}: forward differs by {e}");
    let g = draw(y2.size().as_slice());
    (&y1 * g.to_kind(kind)).sum(kind).backward();
    (&y2 * &g).sum(Kind::Double).backward();
    for (name, a, b) in [("grad_input", &x1, &x2), ("grad_weight", &w1, &w2), ("grad_bias", &b1, &b2)] {
        let (ga, gb) = (a.grad(), b.grad());
        let e = max_abs_diff(&ga, &gb);
        assert!(e <= tol * max_abs(&gb).max(1.0), "{tag}: {name} differs by {e}");
    }
}

fn shapes(dev: Device) {
    // (N, M, C, O, H, W): one network; a stack; the mix's 3F → F; 70×70 (one chunk); 256²
    // (64 chunks of 1024 pixels); 100² (10 of 1000); 97² (no divisor in range: one chunk); a
    // single pixel.
    for (n, m, c, o, h, w) in
        [(1, 1, 4, 3, 9, 7), (2, 3, 5, 5, 8, 8), (2, 4, 6, 2, 5, 3), (1, 2, 3, 4, 70, 70), (2, 2, 8, 8, 256, 256), (1, 2, 3, 2, 100, 100), (1, 2, 2, 3, 97, 97), (1, 3, 2, 2, 1, 1)]
    {
        compare(dev, n, m, c, o, h, w, Kind::Double, 1e-10);
        compare(dev, n, m, c, o, h, w, Kind::Float, 1e-4);
        // GEMMs add in float32 and round each product (and each chunk of the split weight
        // gradient) to bfloat16 once: a few times bfloat16's 2⁻⁹.
        compare(dev, n, m, c, o, h, w, Kind::BFloat16, 1.0 / 128.0);
    }
}

#[test]
fn matches_grouped_conv_on_cpu() {
    tch::manual_seed(11);
    shapes(Device::Cpu);
}

#[test]
fn matches_grouped_conv_on_cuda_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(12);
    shapes(cuda);
    // The network's size: 16 networks of F = 32, image and rotated copy.
    compare(cuda, 2, 16, 32, 32, 256, 256, Kind::Float, 1e-4);
    compare(cuda, 2, 16, 32, 32, 256, 256, Kind::BFloat16, 1.0 / 128.0);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([1, 6, 4, 4], o);
    let w = Tensor::zeros([4, 3, 1, 1], o);
    assert!(pointwise_conv2d(&x, &w, None, 2).is_ok());
    for (x, w, m) in [
        (&x, &w, 0),                                 // no networks
        (&x, &w, 4),                                 // 6 channels do not split into 4
        (&x, &Tensor::zeros([4, 2, 1, 1], o), 2),    // wrong input channels per network
        (&x, &Tensor::zeros([4, 3, 3, 3], o), 2),    // not 1×1
        (&x, &Tensor::zeros([3, 3, 1, 1], o), 2),    // outputs do not split into 2
        (&Tensor::zeros([6, 4, 4], o), &w, 2),       // 3-D input
    ] {
        let e = pointwise_conv2d(x, w, None, m).unwrap_err();
        assert!(e.to_string().contains("pointwise_conv2d"), "{e}");
    }
    assert!(pointwise_conv2d(&x, &w, Some(&Tensor::zeros([5], o)), 2).is_err());
    assert!(pointwise_conv2d(&x, &w.to_kind(Kind::Double), None, 2).is_err());
    let xi = Tensor::zeros([1, 6, 4, 4], (Kind::Int, Device::Cpu));
    assert!(pointwise_conv2d(&xi, &w, None, 2).unwrap_err().to_string().contains("float"));
}
