//! depthwise_conv2d against libtorch's conv2d(groups = C): forward and every gradient, float64
//! and float32, the network's four geometries and odd shapes; finite differences; error cases.

use s3net_ops::depthwise_conv2d;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{check_finite_differences, max_abs, max_abs_diff};

/// Our op and libtorch's on identical leaves; forward and all three gradients compared with a
/// tolerance relative to max(1, |reference|).
fn compare(shape: [i64; 4], k: i64, p: i64, d: i64, kind: Kind, tol: f64, with_bias: bool) {
    compare_on(Device::Cpu, shape, k, p, d, kind, tol, with_bias)
}

#[allow(clippy::too_many_arguments)]
fn compare_on(dev: Device, shape: [i64; 4], k: i64, p: i64, d: i64, kind: Kind, tol: f64, with_bias: bool) {
    let opts = (kind, dev);
    let c = shape[1];
    let x0 = Tensor::randn(shape, opts);
    let w0 = Tensor::randn([c, 1, k, k], opts);
    let b0 = Tensor::randn([c], opts);
    // On a GPU the reference runs in float64: libtorch's float32 CUDA convolutions may round
    // through TF32, far coarser than our kernel. A bfloat16 op is compared with float64 on the
    // same (rounded) values.
    let ref_kind = if dev.is_cuda() || kind == Kind::BFloat16 { Kind::Double } else { kind };
    let leaves = |kind: Kind| {
        (
            x0.to_kind(kind).copy().set_requires_grad(true),
            w0.to_kind(kind).copy().set_requires_grad(true),
            b0.to_kind(kind).copy().set_requires_grad(true),
        )
    };
    let (x1, w1, b1) = leaves(kind);
    let (x2, w2, b2) = leaves(ref_kind);
    let y1 = depthwise_conv2d(&x1, &w1, with_bias.then_some(&b1), p, d).unwrap();
    let y2 = x2.conv2d(&w2, with_bias.then_some(&b2), [1, 1], [p, p], [d, d], c);
    let tag = format!("{dev:?} {shape:?} k={k} p={p} d={d} {kind:?} bias={with_bias}");
    assert_eq!(y1.size(), y2.size(), "{tag}");
    assert_eq!(y1.kind(), kind, "{tag}");
    let scale = max_abs(&y2).max(1.0);
    let e = max_abs_diff(&y1, &y2);
    assert!(e <= tol * scale, "{tag}: forward differs by {e}");
    let g = Tensor::randn(y2.size().as_slice(), opts);
    (&y1 * &g).sum(kind).backward();
    (&y2 * &g.to_kind(ref_kind)).sum(ref_kind).backward();
    let mut pairs = vec![("grad_input", &x1, &x2), ("grad_weight", &w1, &w2)];
    if with_bias {
        pairs.push(("grad_bias", &b1, &b2));
    }
    for (name, a, b) in pairs {
        let (ga, gb) = (a.grad(), b.grad());
        let scale = max_abs(&gb).max(1.0);
        let e = max_abs_diff(&ga, &gb);
        assert!(
            e <= tol * scale,
            "{tag}: {name} differs by {e} (scale {scale})"
        );
    }
}

const GEOMETRIES: [(i64, i64, i64); 4] = [(5, 2, 1), (3, 1, 1), (5, 4, 2), (7, 9, 3)];

/// The network's four geometries on two small shapes, with and without bias, in `kind`.
fn network_geometries(seed: i64, kind: Kind, tol: f64) {
    tch::manual_seed(seed);
    for (k, p, d) in GEOMETRIES {
        compare([1, 4, 32, 40], k, p, d, kind, tol, true);
        compare([2, 3, 33, 17], k, p, d, kind, tol, false);
    }
}

#[test]
fn network_geometries_float64() {
    network_geometries(1, Kind::Double, 1e-10);
}

#[test]
fn network_geometries_float32() {
    network_geometries(2, Kind::Float, 1e-4);
}

/// bfloat16 activations are computed in float32 and rounded once (the CPU widens them, the CUDA
/// kernels read the 16-bit values themselves), so the forward and each gradient stay within
/// bfloat16's rounding (2⁻⁹ relative) of float64 on the same values.
const BF16_TOL: f64 = 1.0 / 256.0;

#[test]
fn network_geometries_bfloat16() {
    network_geometries(8, Kind::BFloat16, BF16_TOL);
}

/// Rows wider than one register-blocked chunk of the CPU kernels, whole chunks and a ragged
/// last chunk, and the network's 256² planes.
#[test]
fn wide_rows_float32_and_float64() {
    tch::manual_seed(5);
    for (k, p, d) in GEOMETRIES {
        compare([1, 2, 9, 300], k, p, d, Kind::Double, 1e-10, true);
        compare([2, 1, 7, 129], k, p, d, Kind::Float, 1e-4, true);
        compare([1, 3, 256, 256], k, p, d, Kind::Float, 1e-4, true);
    }
}

#[test]
fn odd_shapes_float64() {
    tch::manual_seed(3);
    for (k, p, d) in GEOMETRIES {
        // Images smaller than the kernel span, single rows/columns, H != W, N = 2.
        for shape in [
            [2, 2, 3, 5],
            [1, 3, 1, 1],
            [2, 1, 1, 9],
            [1, 2, 8, 1],
            [2, 5, 6, 11],
        ] {
            compare(shape, k, p, d, Kind::Double, 1e-10, true);
        }
    }
    // Even kernels, no padding, padding larger than the span, other dilations.
    for (k, p, d) in [
        (2, 0, 1),
        (4, 1, 1),
        (4, 3, 2),
        (1, 0, 1),
        (1, 2, 1),
        (3, 0, 1),
        (6, 5, 2),
        (9, 4, 1),
        (3, 7, 1),
    ] {
        for shape in [[1, 3, 10, 12], [2, 2, 5, 4]] {
            let span = d * (k - 1);
            if shape[2] + 2 * p - span < 1 || shape[3] + 2 * p - span < 1 {
                continue;
            }
            compare(shape, k, p, d, Kind::Double, 1e-10, true);
        }
    }
}

#[test]
fn non_contiguous_input() {
    tch::manual_seed(4);
    let x = Tensor::randn([1, 16, 12, 12], (Kind::Double, Device::Cpu));
    let xl = x.contiguous_format_like_channels_last();
    let w = Tensor::randn([16, 1, 3, 3], (Kind::Double, Device::Cpu));
    let a = depthwise_conv2d(&xl, &w, None, 1, 1).unwrap();
    let b = x.conv2d::<Tensor>(&w, None, [1, 1], [1, 1], [1, 1], 16);
    assert!(max_abs_diff(&a, &b) < 1e-10);
}

trait ChannelsLast {
    fn contiguous_format_like_channels_last(&self) -> Tensor;
}
impl ChannelsLast for Tensor {
    fn contiguous_format_like_channels_last(&self) -> Tensor {
        // (N, H, W, C) storage viewed as (N, C, H, W).
        self.permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2])
    }
}

/// Central differences of sum(out · g) against autograd, float64, every input element.
#[test]
fn gradients_match_finite_differences() {
    tch::manual_seed(5);
    let opts = (Kind::Double, Device::Cpu);
    let (k, p, d) = (3, 2, 2);
    let x = Tensor::randn([2, 2, 5, 6], opts).set_requires_grad(true);
    let w = Tensor::randn([2, 1, k, k], opts).set_requires_grad(true);
    let b = Tensor::randn([2], opts).set_requires_grad(true);
    let f = |t: &[Tensor]| depthwise_conv2d(&t[0], &t[1], Some(&t[2]), p, d).unwrap();
    let y = f(&[&x, &w, &b].map(|t| t.shallow_clone()));
    let g = Tensor::randn(y.size().as_slice(), opts);
    (&y * &g).sum(Kind::Double).backward();
    check_finite_differences(&[&x, &w, &b], &g, 1e-6, &f);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([1, 4, 8, 8], o);
    let w = Tensor::zeros([4, 1, 3, 3], o);
    assert!(depthwise_conv2d(&x, &w, None, 1, 1).is_ok());
    // Wrong shapes.
    assert!(depthwise_conv2d(&Tensor::zeros([4, 8, 8], o), &w, None, 1, 1).is_err());
    assert!(depthwise_conv2d(&x, &Tensor::zeros([3, 1, 3, 3], o), None, 1, 1).is_err());
    assert!(depthwise_conv2d(&x, &Tensor::zeros([4, 2, 3, 3], o), None, 1, 1).is_err());
    assert!(depthwise_conv2d(&x, &Tensor::zeros([4, 1, 3, 2], o), None, 1, 1).is_err());
    assert!(depthwise_conv2d(&x, &w, Some(&Tensor::zeros([5], o)), 1, 1).is_err());
    // Kernel span larger than the padded image; bad padding/dilation.
    let e = depthwise_conv2d(&Tensor::zeros([1, 4, 2, 2], o), &w, None, 0, 1).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    assert!(depthwise_conv2d(&x, &w, None, -1, 1).is_err());
    assert!(depthwise_conv2d(&x, &w, None, 1, 0).is_err());
    // Wrong dtypes.
    let xi = Tensor::zeros([1, 4, 8, 8], (Kind::Int, Device::Cpu));
    let e = depthwise_conv2d(&xi, &w, None, 1, 1).unwrap_err();
    assert!(e.to_string().contains("float"), "{e}");
    assert!(depthwise_conv2d(&x, &w.to_kind(Kind::Double), None, 1, 1).is_err());
    assert!(depthwise_conv2d(&x, &w.to_kind(Kind::Int64), None, 1, 1).is_err());
    // Mismatched devices (only testable with a GPU).
    if tch::Cuda::is_available() {
        assert!(depthwise_conv2d(&x, &w.to_device(Device::Cuda(0)), None, 1, 1).is_err());
    }
}

/// An empty batch goes through (no work for the kernel, output of the right shape).
#[test]
fn zero_sized_batches_work() {
    let o = (Kind::Double, Device::Cpu);
    let y = depthwise_conv2d(
        &Tensor::zeros([0, 3, 8, 8], o),
        &Tensor::zeros([3, 1, 3, 3], o),
        None,
        1,
        1,
    )
    .unwrap();
    assert_eq!(y.size(), [0, 3, 8, 8]);
}

/// The CUDA kernels against libtorch's CUDA conv2d, forward and every gradient: the network's
/// geometries at its real size (a stack of 4 networks, image and rotated copy), odd shapes
/// (planes smaller than a tile or than the kernel span, padding that makes the input
/// gradient's negative), a kernel size without a compiled specialisation, and a span too wide
/// for shared memory (libtorch's path).
#[test]
fn cuda_matches_libtorch_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(7);
    for (k, p, d) in GEOMETRIES {
        compare_on(cuda, [2, 128, 256, 256], k, p, d, Kind::Float, 1e-4, true);
        compare_on(cuda, [2, 3, 33, 70], k, p, d, Kind::Double, 1e-10, false);
        for shape in [[2, 2, 3, 5], [1, 3, 1, 1], [2, 1, 1, 9], [1, 2, 8, 1], [2, 5, 6, 11]] {
            compare_on(cuda, shape, k, p, d, Kind::Double, 1e-10, true);
        }
    }
    for (k, p, d) in [(1, 2, 1), (2, 0, 1), (4, 3, 2), (9, 16, 4), (3, 7, 1), (7, 45, 15)] {
        for shape in [[1, 3, 40, 36], [2, 2, 5, 4]] {
            let span = d * (k - 1);
            if shape[2] + 2 * p - span < 1 || shape[3] + 2 * p - span < 1 {
                continue;
            }
            compare_on(cuda, shape, k, p, d, Kind::Double, 1e-10, true);
            compare_on(cuda, shape, k, p, d, Kind::Float, 1e-4, true);
        }
    }
}

/// The CUDA kernels' bfloat16 path: the network's planes, tiles cut by the plane's edges, and
/// a span too wide for shared memory (libtorch's bfloat16 convolution).
#[test]
fn cuda_bfloat16_when_present() {
    let Some(cuda) = checks::cuda_with_kernels() else { return };
    tch::manual_seed(9);
    for (k, p, d) in GEOMETRIES {
        compare_on(cuda, [2, 64, 256, 256], k, p, d, Kind::BFloat16, BF16_TOL, true);
        for shape in [[2, 2, 3, 5], [1, 3, 1, 1], [2, 5, 6, 11], [1, 3, 40, 36]] {
            compare_on(cuda, shape, k, p, d, Kind::BFloat16, BF16_TOL, true);
        }
    }
    compare_on(cuda, [1, 3, 40, 36], 7, 45, 15, Kind::BFloat16, BF16_TOL, true);
}

/// The CUDA kernels on the CPU emulation (s3net_ops::emulated_cuda), so their logic is tested
/// where no GPU is: the network's geometries on planes of 2×2 tiles (and 2 weight-gradient
/// blocks down a column), odd shapes, bfloat16, and kernel sizes without a compiled
/// specialisation.
#[test]
fn emulated_cuda_kernels_match_libtorch() {
    tch::manual_seed(10);
    checks::on_emulated_kernels(|| {
        for (k, p, d) in GEOMETRIES {
            compare_on(Device::Cpu, [1, 2, 140, 70], k, p, d, Kind::Float, 1e-4, true);
            for shape in [[2, 2, 3, 5], [1, 3, 1, 1], [2, 1, 1, 9], [1, 2, 8, 1]] {
                compare_on(Device::Cpu, shape, k, p, d, Kind::Double, 1e-10, true);
            }
            compare_on(Device::Cpu, [1, 3, 40, 36], k, p, d, Kind::BFloat16, BF16_TOL, true);
        }
        for (k, p, d) in [(1, 2, 1), (2, 0, 1), (4, 3, 2), (3, 7, 1)] {
            compare_on(Device::Cpu, [2, 2, 5, 4], k, p, d, Kind::Double, 1e-10, true);
            compare_on(Device::Cpu, [1, 3, 40, 36], k, p, d, Kind::Float, 1e-4, false);
        }
    });
}

#[test]
fn cuda_matches_cpu_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(6);
    let x = Tensor::randn([1, 8, 20, 24], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([8, 1, 7, 7], (Kind::Float, Device::Cpu));
    let a = depthwise_conv2d(&x, &w, None, 9, 3).unwrap();
    let b = depthwise_conv2d(&x.to_device(cuda), &w.to_device(cuda), None, 9, 3).unwrap();
    assert!(max_abs_diff(&a, &b.to_device(Device::Cpu)) < 1e-3);
}

/// bfloat16 outputs are the float32 result rounded once, to nearest with ties to even, as
/// libtorch rounds (the CUDA kernels do it themselves, on raw bits): with a kernel that only
/// passes the input through (1×1, or 3×3 with only its centre tap), `x + bias` must come out
/// exactly as `(x + bias)` in float32 cast to bfloat16 — ties both ways, the largest finite
/// value rounding up to infinity, infinities and NaN; then random values through the 3×3 kernel.
#[test]
fn bfloat16_rounds_to_nearest_even() {
    let devices = [Some(Device::Cpu), checks::cuda_with_kernels()];
    let bf = |v: &[f32]| Tensor::from_slice(v).to_kind(Kind::BFloat16);
    let max = f32::from_bits(0x7f7f_0000); // largest finite bfloat16
    let (tie, step) = (2f32.powi(-8), 2f32.powi(-7));
    #[rustfmt::skip]
    let cases: [(f32, f32); 10] = [
        (1.0, tie), (1.0 + step, tie), (-1.0 - step, -tie), (3.0, 3.0 * tie),
        (max, 2f32.powi(119)), (-max, -(2f32.powi(119))),
        (f32::INFINITY, 1.0), (f32::NEG_INFINITY, -1.0), (f32::NAN, 0.0), (0.1, 1e-3),
    ];
    let (xs, bs): (Vec<f32>, Vec<f32>) = cases.iter().copied().unzip();
    let c = cases.len() as i64;
    for dev in devices.into_iter().flatten() {
        let (x, b) = (bf(&xs).view([1, c, 1, 1]).to_device(dev), bf(&bs).to_device(dev));
        let w = Tensor::ones([c, 1, 1, 1], (Kind::BFloat16, dev));
        let y = depthwise_conv2d(&x, &w, Some(&b), 0, 1).unwrap();
        let want = (x.to_kind(Kind::Float) + b.to_kind(Kind::Float).view([1, c, 1, 1])).to_kind(Kind::BFloat16);
        assert_same_bfloat16(&y, &want, &format!("{dev:?} 1×1 special values"));

        tch::manual_seed(13);
        let x = Tensor::randn([2, 3, 37, 45], (Kind::Float, dev)).to_kind(Kind::BFloat16);
        let b = (Tensor::randn([3], (Kind::Float, dev)) * 0.01).to_kind(Kind::BFloat16);
        let w = Tensor::zeros([3, 1, 3, 3], (Kind::BFloat16, dev));
        let _ = w.narrow(2, 1, 1).narrow(3, 1, 1).fill_(1.0);
        let y = depthwise_conv2d(&x, &w, Some(&b), 1, 1).unwrap();
        let want = (x.to_kind(Kind::Float) + b.to_kind(Kind::Float).view([1, 3, 1, 1])).to_kind(Kind::BFloat16);
        assert_same_bfloat16(&y, &want, &format!("{dev:?} 3×3 centre tap"));
    }
}

/// Equal values (NaN where the other is NaN), compared on the CPU.
fn assert_same_bfloat16(got: &Tensor, want: &Tensor, tag: &str) {
    assert_eq!(got.kind(), Kind::BFloat16, "{tag}");
    let cpu = |t: &Tensor| Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap();
    for (i, (g, w)) in cpu(got).into_iter().zip(cpu(want)).enumerate() {
        assert!(g == w || (g.is_nan() && w.is_nan()), "{tag}: element {i} is {g}, want {w}");
    }
}

/// The kernels' column layout (`S3NET_DW_COLUMNS=1`, read once; see
/// `s3net_ops::depthwise_columns`): this file's emulated and CUDA tests again, in a child
/// process with it on.
#[test]
fn column_layout_cuda_and_emulated() {
    checks::rerun_with_depthwise_columns();
}
