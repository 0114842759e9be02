//! pointwise_conv2d (a stack of independent 1×1 convolutions) against libtorch's
//! conv2d(groups = M): forward and every gradient, float64, float32 and bfloat16, on the CPU
//! and (when present) CUDA; planes whose pixel count spans several reduction chunks, with a
//! remainder; the CPU kernel's register tiles with leftover outputs and pixels, in each of
//! its instruction sets. And `pointwise_conv2d_then` (a residual added, a gate applied)
//! against the conv followed by libtorch's add or multiply: the same bits.

use s3net_ops::{pointwise_conv2d, pointwise_conv2d_then, Then};
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
    // On the CPU the 1×1 kernel's register tiles (8 or 4 outputs, 8 or 16 pixels) meet whole
    // tiles, leftover outputs and leftover pixels of a 128-pixel block: the network's 32 → 32
    // and 96 → 32 (whose input gradient is 32 → 96) at 13×37, 9409 pixels (a last block of 65).
    // Its weight gradient's tiles (4 × 4 or 2 × 4 output × input channels, a vector of pixels)
    // meet leftover channels (3, 5, 6, 9, 13), a leftover of pixels below a vector, stretches
    // of 2048 pixels and, from 2048 pixels on, one range per thread.
    for (n, m, c, o, h, w) in [
        (1, 1, 4, 3, 9, 7),
        (2, 3, 5, 5, 8, 8),
        (2, 4, 6, 2, 5, 3),
        (1, 2, 3, 4, 70, 70),
        (2, 2, 8, 8, 256, 256),
        (1, 2, 3, 2, 100, 100),
        (1, 2, 2, 3, 97, 97),
        (1, 3, 2, 2, 1, 1),
        (1, 1, 32, 32, 13, 37),
        (2, 2, 96, 32, 13, 37),
        (1, 1, 9, 13, 97, 97),
    ] {
        compare(dev, n, m, c, o, h, w, Kind::Double, 1e-10);
        compare(dev, n, m, c, o, h, w, Kind::Float, 1e-4);
        // GEMMs add in float32 and round each result to bfloat16 once (the weight gradient
        // after its whole sum), the forward's product and its bias each: a few times 2⁻⁹.
        compare(dev, n, m, c, o, h, w, Kind::BFloat16, 1.0 / 128.0);
    }
}

#[test]
fn matches_grouped_conv_on_cpu() {
    tch::manual_seed(11);
    shapes(Device::Cpu);
}

/// The CPU 1×1 kernel's AVX2 and baseline x86-64 loops (the AVX-512 one runs above wherever
/// the CPU has it): the comparisons (and the epilogues') again in child processes with
/// `S3OPS_NO_AVX512=1` and with `S3OPS_NO_AVX2=1`, which the kernels read once.
#[test]
fn narrower_loops_match_grouped_conv_too() {
    if std::env::var_os("S3OPS_NO_AVX512").is_some() || std::env::var_os("S3OPS_NO_AVX2").is_some() {
        return; // this is a child
    }
    for var in ["S3OPS_NO_AVX512", "S3OPS_NO_AVX2"] {
        checks::rerun_with_env(&[var], &["matches_grouped_conv_on_cpu", "--exact"], "1 passed");
        // The epilogues' stores in each instruction set's tiles.
        checks::rerun_with_env(&[var], &["epilogues_are_the_add_and_multiply_they_replace", "--exact"], "1 passed");
    }
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

/// bfloat16's weight gradient is rounded once, after the whole sum (over pixels, the split's
/// chunks and the images) has been formed in float32, not chunk by chunk. The data make the
/// difference large: in each image the output gradient flips sign every 1024 pixels (one
/// chunk of the split reduction at 256²), so the chunks' sums, about ±1500, cancel to a few
/// dozen; rounding each chunk to bfloat16 (a step of 8 there) would move the result by about
/// ±20, while one rounding moves it by at most half a step of the result itself.
#[test]
fn bfloat16_weight_gradient_is_rounded_once() {
    rounded_once();
}

/// Every layout of the split reduction (see `set_split_k`; the other tests run the default,
/// which picks by number format) gives the same results: every shape and kind again, the
/// network's size on CUDA, and the rounding case. Our own kernel (`SplitK::Kernel`) runs on
/// CUDA tensors and, here, on the emulation of the kernels (a plain CPU tensor takes the
/// default's choice). The switch is process-wide, so this binary's other tests may run either
/// way meanwhile; they must pass either way.
#[test]
fn every_split_layout_matches() {
    use s3net_ops::SplitK;
    for layout in [SplitK::Strided, SplitK::Copied, SplitK::Kernel] {
        s3net_ops::set_split_k(layout);
        tch::manual_seed(15);
        shapes(Device::Cpu);
        if layout == SplitK::Kernel {
            checks::on_emulated_kernels(|| {
                shapes(Device::Cpu);
                rounded_once_on(Device::Cpu);
            });
        }
        if let Some(cuda) = checks::cuda_device() {
            shapes(cuda);
            compare(cuda, 2, 16, 32, 32, 256, 256, Kind::Float, 1e-4);
            compare(cuda, 2, 16, 32, 32, 256, 256, Kind::BFloat16, 1.0 / 128.0);
        }
        rounded_once();
    }
    // The kernel did run: the emulation launches it on top of the bias kernels the other
    // layouts launch too.
    let launches = |layout| {
        s3net_ops::set_split_k(layout);
        let before = s3net_ops::emulated_launches();
        s3net_ops::emulated_cuda(|| rounded_once_on(Device::Cpu));
        s3net_ops::emulated_launches() - before
    };
    let (kernel, strided) = (launches(SplitK::Kernel), launches(SplitK::Strided));
    assert!(kernel > strided, "the split kernel did not run: {kernel} launches against {strided}");
    s3net_ops::set_split_k(SplitK::Auto);
}

fn rounded_once() {
    let devices = [Some(Device::Cpu), checks::cuda_device()];
    for dev in devices.into_iter().flatten() {
        rounded_once_on(dev);
    }
}

fn rounded_once_on(dev: Device) {
    tch::manual_seed(14);
    let (n, m, c, o, side) = (2, 2, 3, 2, 256);
    let x = (Tensor::rand([n, m * c, side, side], (Kind::Float, dev)) + 1.0).to_kind(Kind::BFloat16);
    let w = Tensor::randn([m * o, c, 1, 1], (Kind::Float, dev)).to_kind(Kind::BFloat16).set_requires_grad(true);
    let y = pointwise_conv2d(&x, &w, None, m).unwrap();
    // +1 / −1 by chunk of 1024 pixels (4 rows), the same for every channel and image.
    let sign = Tensor::arange(side * side, (Kind::Int64, dev)).divide_scalar_mode(1024, "floor").remainder(2) * -2 + 1;
    let go = sign.view([1, 1, side, side]).expand([n, m * o, side, side], false).to_kind(Kind::BFloat16);
    (&y * &go).sum(Kind::Float).backward();
    // Reference: the exact sum in float64 over the same bfloat16 values.
    let (x64, go64) = (x.to_kind(Kind::Double).view([n, m, c, -1]), go.to_kind(Kind::Double).view([n, m, o, -1]));
    let want = go64.matmul(&x64.transpose(2, 3)).sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
    let got = w.grad().to_kind(Kind::Double).view([m, o, c]);
    let (want, got) = (want.to_device(Device::Cpu), got.to_device(Device::Cpu));
    for (g, e) in Vec::<f64>::try_from(got.flatten(0, -1)).unwrap().into_iter().zip(Vec::<f64>::try_from(want.flatten(0, -1)).unwrap()) {
        // Half a bfloat16 step of the exact value (8 significant bits), plus float32's own
        // rounding of a 131072-term sum.
        let half_step = 2f64.powi(e.abs().log2().floor() as i32 - 8);
        assert!((g - e).abs() <= half_step * 1.01 + 1e-3, "{dev:?}: weight gradient {g}, exact sum {e}");
    }
}

/// `pointwise_conv2d_then` on `dev` in `kind` against `pointwise_conv2d` followed by libtorch's
/// `r + y` or `u * y` on the same leaves: the output and every gradient (input, weight, bias,
/// and the residual's or gate's) with the same bits.
fn then_matches(dev: Device, kind: Kind, (n, m, c, o, h, w): (i64, i64, i64, i64, i64, i64), gate: bool) {
    let draw = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, dev)).to_kind(kind);
    let (x0, w0, b0, r0) = (draw(&[n, m * c, h, w]), draw(&[m * o, c, 1, 1]), draw(&[m * o]), draw(&[n, m * o, h, w]));
    let leaves = || [&x0, &w0, &b0, &r0].map(|t| t.copy().set_requires_grad(true));
    let ([x1, w1, b1, r1], [x2, w2, b2, r2]) = (leaves(), leaves());
    let then = if gate { Then::Gate(&r1) } else { Then::Residual(&r1) };
    let y1 = pointwise_conv2d_then(&x1, &w1, Some(&b1), m, Some(then)).unwrap();
    let conv = pointwise_conv2d(&x2, &w2, Some(&b2), m).unwrap();
    let y2 = if gate { &r2 * conv } else { &r2 + conv };
    let tag = format!("{dev:?} {kind:?} N={n} M={m} C={c} O={o} {h}x{w} {}", if gate { "gate" } else { "residual" });
    assert!(y1.equal(&y2), "{tag}: forward differs by {}", max_abs_diff(&y1, &y2));
    let g = draw(&y2.size());
    (&y1 * &g).sum(Kind::Float).backward();
    (&y2 * &g).sum(Kind::Float).backward();
    for (name, a, b) in [("input", &x1, &x2), ("weight", &w1, &w2), ("bias", &b1, &b2), ("other", &r1, &r2)] {
        let (ga, gb) = (a.grad(), b.grad());
        assert!(ga.equal(&gb), "{tag}: the {name}'s gradient differs by {}", max_abs_diff(&ga, &gb));
    }
}

/// One network and a stack; the CPU kernel's leftover outputs and pixels (13×37); the mix's
/// 96 → 32; planes of 63 values (the GPU kernels' element path) and of 64 (their vectors).
const THEN_SHAPES: [(i64, i64, i64, i64, i64, i64); 5] =
    [(1, 1, 4, 3, 9, 7), (2, 3, 5, 5, 8, 8), (1, 1, 32, 32, 13, 37), (2, 2, 96, 32, 13, 37), (1, 2, 8, 8, 64, 64)];

#[test]
fn epilogues_are_the_add_and_multiply_they_replace() {
    tch::manual_seed(21);
    // float32 and float64 take the CPU kernel; bfloat16 on the CPU libtorch's GEMM and ops.
    for kind in [Kind::Double, Kind::Float, Kind::BFloat16] {
        for shape in THEN_SHAPES {
            for gate in [false, true] {
                then_matches(Device::Cpu, kind, shape, gate);
            }
        }
    }
    if let Some(cuda) = checks::cuda_device() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for shape in THEN_SHAPES.into_iter().chain([(2, 16, 32, 32, 256, 256)]) {
                for gate in [false, true] {
                    then_matches(cuda, kind, shape, gate);
                }
            }
        }
    }
}

/// The same on the GPU's code path with the kernels emulated: the bias kernel's residual and
/// gate modes (vectors and single values) and the gate's gradient kernel, which did run (one
/// launch more than the conv and libtorch's multiply).
#[test]
fn emulated_cuda_epilogues() {
    tch::manual_seed(22);
    checks::on_emulated_kernels(|| {
        for kind in [Kind::Float, Kind::BFloat16] {
            for shape in THEN_SHAPES {
                for gate in [false, true] {
                    then_matches(Device::Cpu, kind, shape, gate);
                }
            }
        }
    });
    let launches = |fused: bool| {
        let before = s3net_ops::emulated_launches();
        s3net_ops::emulated_cuda(|| {
            let (x, w, b, u) = (Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu)), Tensor::randn([4, 2, 1, 1], (Kind::Float, Device::Cpu)).set_requires_grad(true), Tensor::randn([4], (Kind::Float, Device::Cpu)), Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true));
            let y = if fused {
                pointwise_conv2d_then(&x, &w, Some(&b), 2, Some(Then::Gate(&u))).unwrap()
            } else {
                &u * pointwise_conv2d(&x, &w, Some(&b), 2).unwrap()
            };
            y.sum(Kind::Float).backward();
        });
        s3net_ops::emulated_launches() - before
    };
    assert_eq!(launches(true), launches(false) + 1, "the gate's gradient kernel did not run");
}

#[test]
fn epilogue_arguments_are_checked() {
    let x = Tensor::randn([1, 4, 5, 5], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([6, 2, 1, 1], (Kind::Float, Device::Cpu));
    let wrong = Tensor::randn([1, 4, 5, 5], (Kind::Float, Device::Cpu));
    let e = pointwise_conv2d_then(&x, &w, None, 2, Some(Then::Residual(&wrong))).unwrap_err().to_string();
    assert!(e.contains("residual must be shaped like the output [1, 6, 5, 5], got [1, 4, 5, 5]"), "{e}");
    let other_kind = Tensor::randn([1, 6, 5, 5], (Kind::Double, Device::Cpu));
    let e = pointwise_conv2d_then(&x, &w, None, 2, Some(Then::Gate(&other_kind))).unwrap_err().to_string();
    assert!(e.contains("gate"), "{e}");
}
