//! deform_conv2d against torchvision's golden values (forward and every gradient), against a
//! tensor-op reference on larger multi-tile cases, finite differences in float64, error cases.

use s3net_ops::deform_conv2d;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{check_finite_differences, check_per_image_weights, max_abs, max_abs_diff, Forward, Geo};

fn fused(x: &Tensor, off: &Tensor, mask: Option<&Tensor>, w: &Tensor, b: Option<&Tensor>, g: Geo) -> Tensor {
    deform_conv2d(x, off, mask, w, b, g.0, g.1, g.2).unwrap()
}

fn check_against_golden(device: Device, kind: Kind, tol: f64) {
    checks::check_against_golden(&fused, device, kind, tol, Forward::Relative);
}

#[test]
fn matches_torchvision_float64() {
    check_against_golden(Device::Cpu, Kind::Double, 1e-9);
}

#[test]
fn matches_torchvision_float32() {
    check_against_golden(Device::Cpu, Kind::Float, 2e-4);
}

#[test]
fn cuda_matches_torchvision_float64() {
    if let Some(d) = checks::cuda_with_kernels() {
        check_against_golden(d, Kind::Double, 1e-9);
    }
}

#[test]
fn cuda_matches_torchvision_float32() {
    if let Some(d) = checks::cuda_with_kernels() {
        // TF32 is off for float32 matmuls in libtorch by default, so float32 tolerances hold.
        check_against_golden(d, Kind::Float, 2e-4);
    }
}

/// Tensor-op reference (the model's grid_sampler_2d formulation, autograd for the backward).
fn reference(
    x: &Tensor,
    off: &Tensor,
    mask: Option<&Tensor>,
    w: &Tensor,
    b: Option<&Tensor>,
    g: Geo,
) -> Tensor {
    let ((sh, sw), (ph, pw), (dh, dw)) = g;
    let (n, c, h, wd) = x.size4().unwrap();
    let (o, _, kh, kw) = w.size4().unwrap();
    let ho = (h + 2 * ph - (dh * (kh - 1) + 1)) / sh + 1;
    let wo = (wd + 2 * pw - (dw * (kw - 1) + 1)) / sw + 1;
    assert!(h > 1 && wd > 1, "reference needs H, W > 1");
    let k = kh * kw;
    let opts = (off.kind(), off.device());
    let taps = Tensor::arange(k, opts);
    let ti = taps.divide_scalar_mode(kw, "floor");
    let tj = taps.remainder(kw);
    let base_y = (ti * dh - ph).view([k, 1, 1]) + (Tensor::arange(ho, opts) * sh).view([1, ho, 1]);
    let base_x = (tj * dw - pw).view([k, 1, 1]) + (Tensor::arange(wo, opts) * sw).view([1, 1, wo]);
    let offv = off.view([n, k, 2, ho, wo]);
    let y = offv.select(2, 0) + base_y;
    let xx = offv.select(2, 1) + base_x;
    let gy = y * (2.0 / (h - 1) as f64) - 1.0;
    let gx = xx * (2.0 / (wd - 1) as f64) - 1.0;
    let grid = Tensor::stack(&[gx, gy], -1).view([n, k * ho, wo, 2]);
    let sampled = x.grid_sampler_2d(&grid, 0, 0, true).view([n, c, k, ho, wo]);
    let cols = match mask {
        Some(m) => sampled * m.view([n, 1, k, ho, wo]),
        None => sampled,
    };
    let out = w
        .view([o, c * k])
        .matmul(&cols.view([n, c * k, ho * wo]))
        .view([n, o, ho, wo]);
    match b {
        Some(b) => out + b.view([1, o, 1, 1]),
        None => out,
    }
}

/// Larger cases (several tiles per image, N = 2, two threads, offsets that cross tile and
/// image borders) against the reference: forward and all five gradients.
fn compare_with_reference(device: Device, kind: Kind, tol: f64) {
    tch::set_num_threads(2);
    tch::manual_seed(11);
    // Random values drawn on the CPU, then moved: every device checks the same inputs.
    let opts = (kind, Device::Cpu);
    // Input shape, output channels, kernel, geometry, with mask, with bias.
    type Case = ([i64; 4], i64, (i64, i64), Geo, bool, bool);
    let cases: [Case; 4] = [
        (
            [2, 5, 37, 41],
            6,
            (3, 3),
            ((1, 1), (1, 1), (1, 1)),
            true,
            true,
        ),
        (
            [1, 8, 64, 48],
            4,
            (3, 3),
            ((1, 1), (2, 2), (2, 2)),
            true,
            false,
        ),
        (
            [2, 3, 30, 33],
            5,
            (5, 3),
            ((2, 1), (2, 1), (1, 2)),
            false,
            true,
        ),
        (
            [1, 16, 50, 50],
            16,
            (3, 3),
            ((1, 1), (1, 1), (1, 1)),
            true,
            true,
        ),
    ];
    for (shape, o, (kh, kw), g, with_mask, with_bias) in cases {
        let [n, c, h, w] = shape;
        let ((sh, sw), (ph, pw), (dh, dw)) = g;
        let ho = (h + 2 * ph - (dh * (kh - 1) + 1)) / sh + 1;
        let wo = (w + 2 * pw - (dw * (kw - 1) + 1)) / sw + 1;
        let k = kh * kw;
        let x0 = Tensor::randn([n, c, h, w], opts);
        // The sampling positions are integers plus these offsets. Bilinear sampling has no
        // derivative on the integer grid lines, and the reference's float32 round trip
        // through grid_sample's [-1, 1] coordinates moves a position lying within ~1e-6 of a
        // line to its other side: then its offset gradient is that of the neighbouring cell
        // (seen in ~5 % of random draws). Offsets are kept 1e-3 away from the lines.
        let off0 = Tensor::randn([n, 2 * k, ho, wo], opts) * 3.0;
        let near_line = (&off0 - off0.round()).abs().lt(1e-3).to_kind(kind);
        let off0 = &off0 + near_line * 2e-3;
        let m0 = Tensor::rand([n, k, ho, wo], opts);
        let w0 = Tensor::randn([o, c, kh, kw], opts) * 0.3;
        let b0 = Tensor::randn([o], opts);
        let leaves = || [&x0, &off0, &m0, &w0, &b0].map(|t| t.to_device(device).copy().set_requires_grad(true));
        let [x1, off1, m1, w1, b1] = leaves();
        let [x2, off2, m2, w2, b2] = leaves();
        let y1 = deform_conv2d(
            &x1,
            &off1,
            with_mask.then_some(&m1),
            &w1,
            with_bias.then_some(&b1),
            g.0,
            g.1,
            g.2,
        )
        .unwrap();
        let y2 = reference(
            &x2,
            &off2,
            with_mask.then_some(&m2),
            &w2,
            with_bias.then_some(&b2),
            g,
        );
        let tag = format!("{shape:?} o={o} k={kh}x{kw} {g:?} {kind:?}");
        let e = max_abs_diff(&y1, &y2);
        assert!(
            e < tol * max_abs(&y2).max(1.0),
            "{tag}: forward differs by {e}"
        );
        let go = Tensor::randn(y2.size().as_slice(), opts).to_device(device);
        (&y1 * &go).sum(kind).backward();
        (&y2 * &go).sum(kind).backward();
        let mut pairs = vec![
            ("input", &x1, &x2),
            ("offset", &off1, &off2),
            ("weight", &w1, &w2),
        ];
        if with_mask {
            pairs.push(("mask", &m1, &m2));
        }
        if with_bias {
            pairs.push(("bias", &b1, &b2));
        }
        for (name, a, b) in pairs {
            let (ga, gb) = (a.grad(), b.grad());
            let e = max_abs_diff(&ga, &gb);
            let scale = max_abs(&gb).max(1.0);
            assert!(
                e < tol * scale,
                "{tag}: grad {name} differs by {e} (scale {scale})"
            );
        }
        if !with_mask {
            assert!(!m1.grad().defined());
        }
    }
}

#[test]
fn matches_reference_on_larger_cases_float64() {
    compare_with_reference(Device::Cpu, Kind::Double, 1e-9);
}

#[test]
fn matches_reference_on_larger_cases_float32() {
    compare_with_reference(Device::Cpu, Kind::Float, 2e-4);
}

#[test]
fn cuda_matches_reference_on_larger_cases() {
    if let Some(d) = checks::cuda_with_kernels() {
        compare_with_reference(d, Kind::Double, 1e-9);
        compare_with_reference(d, Kind::Float, 2e-4);
    }
}

/// The CUDA kernels (and the bias kernels the op adds its bias with) on the CPU emulation
/// (s3net_ops::emulated_cuda): torchvision's golden values, the larger cases against the
/// reference, finite differences, and bfloat16 features against the CPU kernel in float32.
#[test]
fn emulated_cuda_kernels_match() {
    checks::on_emulated_kernels(|| {
        check_against_golden(Device::Cpu, Kind::Double, 1e-9);
        check_against_golden(Device::Cpu, Kind::Float, 2e-4);
        compare_with_reference(Device::Cpu, Kind::Double, 1e-9);
        compare_with_reference(Device::Cpu, Kind::Float, 2e-4);
        finite_differences(Device::Cpu);
    });
    compare_bfloat16_at(Device::Cpu, 2, 3, true, 37, true);
    compare_bfloat16_at(Device::Cpu, 1, 8, false, 64, true);
}

/// On the CUDA path the forward keeps its columns for the weight gradient only when the weight
/// requires one, and builds them chunk by chunk otherwise: each gradient asked for alone (so
/// with and without kept columns) equals the same gradient asked for with all the others, on
/// the emulation of the kernels, for a shared kernel and per-image kernels.
#[test]
fn emulated_each_gradient_alone() {
    checks::on_emulated_kernels(|| {
        for per_image in [false, true] {
            tch::manual_seed(21);
            let o = (Kind::Double, Device::Cpu);
            let (n, c) = (2, 3);
            let x = Tensor::randn([n, c, 9, 9], o);
            let off = Tensor::randn([n, 18, 9, 9], o) * 1.5;
            let m = Tensor::rand([n, 9, 9, 9], o);
            let (w, b) = if per_image {
                (Tensor::randn([n, 4, c, 3, 3], o), Tensor::randn([n, 4], o))
            } else {
                (Tensor::randn([4, c, 3, 3], o), Tensor::randn([4], o))
            };
            let go = Tensor::randn([n, 4, 9, 9], o);
            let leaves = [&x, &off, &m, &w, &b];
            let grads = |wanted: &[usize]| {
                let ls: Vec<Tensor> = leaves.iter().enumerate().map(|(i, t)| t.copy().set_requires_grad(wanted.contains(&i))).collect();
                let y = deform_conv2d(&ls[0], &ls[1], Some(&ls[2]), &ls[3], Some(&ls[4]), (1, 1), (1, 1), (1, 1)).unwrap();
                (&y * &go).sum(Kind::Double).backward();
                ls.iter().map(|t| t.grad()).collect::<Vec<_>>()
            };
            let all = grads(&[0, 1, 2, 3, 4]);
            for (i, name) in ["input", "offset", "mask", "weight", "bias"].iter().enumerate() {
                let alone = grads(&[i]);
                for (j, g) in alone.iter().enumerate() {
                    assert_eq!(g.defined(), i == j, "{name} alone: gradient {j} defined: {}", g.defined());
                }
                let e = max_abs_diff(&alone[i], &all[i]);
                assert!(e < 1e-12, "per-image weights {per_image}: the {name} gradient alone differs by {e}");
            }
        }
    });
}

/// The network's own shapes, the CUDA kernel against the CPU kernel, forward and every
/// gradient, float32: 1×64×256×256 with one kernel (3×3, padding 1, offsets of a few pixels,
/// mask), and a stack's 3 images × 16 channels with a kernel per image. At 256² the weight
/// gradient's reduction over pixels is split into chunks on the GPU.
#[test]
fn cuda_matches_cpu_at_network_size() {
    let Some(dev) = checks::cuda_with_kernels() else { return };
    compare_with_cpu_at(dev, 1, 64, false);
    compare_with_cpu_at(dev, 3, 16, true);
}

fn compare_with_cpu_at(dev: Device, n: i64, c: i64, per_image: bool) {
    tch::manual_seed(5);
    let o = (Kind::Float, Device::Cpu);
    let x0 = Tensor::randn([n, c, 256, 256], o);
    let off0 = Tensor::randn([n, 18, 256, 256], o) * 2.0;
    let m0 = Tensor::rand([n, 9, 256, 256], o);
    let (w0, b0) = if per_image {
        (Tensor::randn([n, c, c, 3, 3], o) * 0.05, Tensor::randn([n, c], o))
    } else {
        (Tensor::randn([c, c, 3, 3], o) * 0.05, Tensor::randn([c], o))
    };
    let go = Tensor::randn([n, c, 256, 256], o);
    let run = |d: Device| {
        // A fresh leaf per device (to_device on the CPU would hand back the original tensor).
        let [x, off, m, w, b] = [&x0, &off0, &m0, &w0, &b0].map(|t| t.to_device(d).copy().set_requires_grad(true));
        let y = deform_conv2d(&x, &off, Some(&m), &w, Some(&b), (1, 1), (1, 1), (1, 1)).unwrap();
        (&y * go.to_device(d)).sum(Kind::Float).backward();
        [y, x.grad(), off.grad(), m.grad(), w.grad(), b.grad()].map(|t| t.to_device(Device::Cpu))
    };
    let (cpu, gpu) = (run(Device::Cpu), run(dev));
    for (name, (a, b)) in ["output", "input", "offset", "mask", "weight", "bias"].iter().zip(cpu.iter().zip(gpu.iter())) {
        let e = max_abs_diff(a, b);
        let scale = max_abs(a).max(1.0);
        assert!(e < 1e-3 * scale, "{n}×{c}, per-image weights {per_image}: {name}: CUDA differs from CPU by {e} (scale {scale})");
    }
}

/// bfloat16 features with float32 positions, mask, kernel and bias (what the network hands
/// the op with bfloat16 activations): on a GPU the columns and the GEMMs stay bfloat16, so the
/// result is the float32 one on the same (rounded) features within bfloat16's rounding; the
/// output and the input gradient come back bfloat16, every other gradient float32. On the CPU
/// the op computes on a float32 copy.
#[test]
fn cuda_bfloat16_features_when_present() {
    compare_bfloat16_at(Device::Cpu, 1, 8, false, 64, false);
    let Some(dev) = checks::cuda_with_kernels() else { return };
    compare_bfloat16_at(dev, 1, 64, false, 256, false);
    compare_bfloat16_at(dev, 3, 16, true, 256, false);
    compare_bfloat16_at(dev, 2, 3, true, 37, false);
}

/// `emulate`: the bfloat16 run on the CPU emulation of the CUDA kernels (the float32 one on
/// the CPU kernel).
fn compare_bfloat16_at(dev: Device, n: i64, c: i64, per_image: bool, size: i64, emulate: bool) {
    tch::manual_seed(15);
    let o = (Kind::Float, Device::Cpu);
    let x0 = Tensor::randn([n, c, size, size], o).to_kind(Kind::BFloat16).to_kind(Kind::Float);
    let off0 = Tensor::randn([n, 18, size, size], o) * 2.0;
    let m0 = Tensor::rand([n, 9, size, size], o);
    let (w0, b0) = if per_image {
        (Tensor::randn([n, c, c, 3, 3], o) * 0.05, Tensor::randn([n, c], o))
    } else {
        (Tensor::randn([c, c, 3, 3], o) * 0.05, Tensor::randn([c], o))
    };
    let go = Tensor::randn([n, c, size, size], o).to_kind(Kind::BFloat16).to_kind(Kind::Float);
    let run = |d: Device, features: Kind| {
        let x = x0.to_device(d).to_kind(features).copy().set_requires_grad(true);
        let [off, m, w, b] = [&off0, &m0, &w0, &b0].map(|t| t.to_device(d).copy().set_requires_grad(true));
        let y = deform_conv2d(&x, &off, Some(&m), &w, Some(&b), (1, 1), (1, 1), (1, 1)).unwrap();
        assert_eq!(y.kind(), features);
        (&y.to_kind(Kind::Float) * go.to_device(d)).sum(Kind::Float).backward();
        assert_eq!(x.grad().kind(), features);
        for t in [&off, &m, &w, &b] {
            assert_eq!(t.grad().kind(), Kind::Float);
        }
        [y, x.grad(), off.grad(), m.grad(), w.grad(), b.grad()].map(|t| t.to_device(Device::Cpu).to_kind(Kind::Float))
    };
    let want = run(Device::Cpu, Kind::Float);
    let got = if emulate { checks::on_emulated_kernels(|| run(dev, Kind::BFloat16)) } else { run(dev, Kind::BFloat16) };
    for (name, (a, b)) in ["output", "input", "offset", "mask", "weight", "bias"].iter().zip(want.iter().zip(got.iter())) {
        let e = max_abs_diff(a, b);
        let scale = max_abs(a).max(1.0);
        assert!(e < 2e-2 * scale, "{dev:?} {n}×{c}×{size}², per-image weights {per_image}: {name}: bfloat16 differs from float32 by {e} (scale {scale})");
    }
}

/// Central differences of sum(out · g) against autograd, every input, float64.
#[test]
fn gradients_match_finite_differences() {
    finite_differences(Device::Cpu);
}

#[test]
fn cuda_gradients_match_finite_differences() {
    if let Some(d) = checks::cuda_with_kernels() {
        finite_differences(d);
    }
}

fn finite_differences(device: Device) {
    tch::manual_seed(3);
    let opts = (Kind::Double, device);
    let g = ((1, 2), (1, 1), (2, 1));
    let x = Tensor::randn([1, 2, 5, 6], opts).set_requires_grad(true);
    let (ho, wo) = (3, 3);
    let off = (Tensor::randn([1, 18, ho, wo], opts) * 1.3).set_requires_grad(true);
    let mask = Tensor::rand([1, 9, ho, wo], opts).set_requires_grad(true);
    let w = Tensor::randn([2, 2, 3, 3], opts).set_requires_grad(true);
    let b = Tensor::randn([2], opts).set_requires_grad(true);
    let f = |t: &[Tensor]| fused(&t[0], &t[1], Some(&t[2]), &t[3], Some(&t[4]), g);
    let y = f(&[&x, &off, &mask, &w, &b].map(|t| t.shallow_clone()));
    assert_eq!(y.size(), [1, 2, ho, wo]);
    let go = Tensor::randn(y.size().as_slice(), opts);
    (&y * &go).sum(Kind::Double).backward();
    check_finite_differences(&[&x, &off, &mask, &w, &b], &go, 1e-5, &f);
}

#[test]
fn per_image_weights_match_separate_calls_cpu() {
    check_per_image_weights(&fused, Device::Cpu, Kind::Double, 1e-12);
    check_per_image_weights(&fused, Device::Cpu, Kind::Float, 1e-5);
}

/// Held by the tests that change the split reductions' layout (process-wide: the other tests
/// may run either way meanwhile, and must pass either way), so that each runs the layout it set.
static SPLIT_LAYOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn cuda_per_image_weights_match_separate_calls() {
    if let Some(d) = checks::cuda_with_kernels() {
        check_per_image_weights(&fused, d, Kind::Double, 1e-12);
        check_per_image_weights(&fused, d, Kind::Float, 1e-5);
        // The split weight gradient read in place rather than copied, and by our own kernel.
        let _layout = SPLIT_LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
        for layout in [s3net_ops::SplitK::Strided, s3net_ops::SplitK::Kernel] {
            s3net_ops::set_split_k(layout);
            check_per_image_weights(&fused, d, Kind::Double, 1e-12);
            check_per_image_weights(&fused, d, Kind::Float, 1e-5);
        }
        s3net_ops::set_split_k(s3net_ops::SplitK::Auto);
    }
}

/// The weight gradient's reduction over 100² pixels is split into 10 chunks (fewer than 8192
/// pixels are not), whose products our own kernel forms (`SplitK::Kernel`, on the emulation of
/// the kernels here): every gradient against the CPU kernel, one kernel and one per image,
/// float64 and float32, and the split kernel seen to launch.
#[test]
fn emulated_split_kernel_matches_cpu() {
    let _layout = SPLIT_LAYOUT.lock().unwrap_or_else(|e| e.into_inner());
    // The inputs are drawn once per case and copied into fresh leaves for each run (another
    // test may draw from libtorch's generator meanwhile).
    let draw = |per_image: bool, kind: Kind| {
        tch::manual_seed(23);
        let o = (kind, Device::Cpu);
        let (n, c, side) = (2, 5, 100);
        let (w, b) = if per_image {
            (Tensor::randn([n, 4, c, 3, 3], o) * 0.3, Tensor::randn([n, 4], o))
        } else {
            (Tensor::randn([4, c, 3, 3], o) * 0.3, Tensor::randn([4], o))
        };
        let x = Tensor::randn([n, c, side, side], o);
        let off = Tensor::randn([n, 18, side, side], o) * 1.5;
        let m = Tensor::rand([n, 9, side, side], o);
        let go = Tensor::randn([n, 4, side, side], o);
        [x, off, m, w, b, go]
    };
    let run = |inputs: &[Tensor; 6], emulate: bool| {
        let [x, off, m, w, b] = [0, 1, 2, 3, 4].map(|i| inputs[i].copy().set_requires_grad(true));
        let pass = || {
            let y = deform_conv2d(&x, &off, Some(&m), &w, Some(&b), (1, 1), (1, 1), (1, 1)).unwrap();
            (&y * &inputs[5]).sum(y.kind()).backward();
            y
        };
        let y = if emulate { s3net_ops::emulated_cuda(pass) } else { pass() };
        [y, x.grad(), off.grad(), m.grad(), w.grad(), b.grad()]
    };
    s3net_ops::set_split_k(s3net_ops::SplitK::Kernel);
    for per_image in [false, true] {
        for (kind, tol) in [(Kind::Double, 1e-10), (Kind::Float, 1e-4)] {
            let inputs = draw(per_image, kind);
            let (cpu, emulated) = (run(&inputs, false), run(&inputs, true));
            for (name, (a, e)) in ["output", "input", "offset", "mask", "weight", "bias"].iter().zip(cpu.iter().zip(emulated.iter())) {
                let d = max_abs_diff(a, e);
                assert!(d <= tol * max_abs(a).max(1.0), "per-image {per_image} {kind:?} {name}: differs by {d}");
            }
        }
    }
    let inputs = draw(true, Kind::Float);
    let launches = |layout| {
        s3net_ops::set_split_k(layout);
        let before = s3net_ops::emulated_launches();
        let _ = run(&inputs, true);
        s3net_ops::emulated_launches() - before
    };
    let (kernel, strided) = (launches(s3net_ops::SplitK::Kernel), launches(s3net_ops::SplitK::Strided));
    s3net_ops::set_split_k(s3net_ops::SplitK::Auto);
    assert!(kernel > strided, "the split kernel did not run: {kernel} launches against {strided}");
}

/// Per-image weights must come with one kernel per image and a per-image bias.
#[test]
fn per_image_weight_shapes_are_checked() {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([2, 3, 6, 6], o);
    let off = Tensor::zeros([2, 18, 6, 6], o);
    let run = |w: &Tensor, b: Option<&Tensor>| {
        deform_conv2d(&x, &off, None, w, b, (1, 1), (1, 1), (1, 1)).map(|_| ()).unwrap_err().0
    };
    let e = run(&Tensor::zeros([3, 4, 3, 3, 3], o), None);
    assert!(e.contains("3 kernels but the input has 2 images"), "{e}");
    let e = run(&Tensor::zeros([2, 4, 3, 3, 3], o), Some(&Tensor::zeros([4], o)));
    assert!(e.contains("bias must be [2, 4]"), "{e}");
    assert!(deform_conv2d(&x, &off, None, &Tensor::zeros([2, 4, 3, 3, 3], o), Some(&Tensor::zeros([2, 4], o)), (1, 1), (1, 1), (1, 1)).is_ok());
}

/// Only the inputs that require grad get one; the rest stay undefined.
#[test]
fn partial_requires_grad() {
    let opts = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([1, 2, 6, 6], opts);
    let off = Tensor::randn([1, 18, 6, 6], opts).set_requires_grad(true);
    let w = Tensor::randn([3, 2, 3, 3], opts);
    let y = deform_conv2d(&x, &off, None, &w, None, (1, 1), (1, 1), (1, 1)).unwrap();
    y.sum(Kind::Double).backward();
    assert!(off.grad().defined());
    assert!(!x.grad().defined());
    // No input requires grad: the output does not either.
    let y = deform_conv2d(&x, &off.detach(), None, &w, None, (1, 1), (1, 1), (1, 1)).unwrap();
    assert!(!y.requires_grad());
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let o = (Kind::Float, Device::Cpu);
    let s = ((1, 1), (1, 1), (1, 1));
    let x = Tensor::zeros([1, 2, 5, 5], o);
    let w = Tensor::zeros([3, 2, 3, 3], o);
    let off = Tensor::zeros([1, 18, 5, 5], o);
    let m = Tensor::zeros([1, 9, 5, 5], o);
    assert!(deform_conv2d(&x, &off, Some(&m), &w, None, s.0, s.1, s.2).is_ok());
    let bad_off = Tensor::zeros([1, 17, 5, 5], o);
    let e = deform_conv2d(&x, &bad_off, None, &w, None, s.0, s.1, s.2).unwrap_err();
    assert!(e.to_string().contains("offset"), "{e}");
    assert!(deform_conv2d(
        &x,
        &off,
        Some(&Tensor::zeros([1, 8, 5, 5], o)),
        &w,
        None,
        s.0,
        s.1,
        s.2
    )
    .is_err());
    assert!(deform_conv2d(
        &x,
        &off,
        None,
        &Tensor::zeros([3, 4, 3, 3], o),
        None,
        s.0,
        s.1,
        s.2
    )
    .is_err());
    assert!(deform_conv2d(
        &x,
        &off,
        None,
        &w,
        Some(&Tensor::zeros([2], o)),
        s.0,
        s.1,
        s.2
    )
    .is_err());
    assert!(deform_conv2d(
        &Tensor::zeros([2, 5, 5], o),
        &off,
        None,
        &w,
        None,
        s.0,
        s.1,
        s.2
    )
    .is_err());
    let tiny = Tensor::zeros([1, 2, 1, 1], o);
    assert!(deform_conv2d(&tiny, &off, None, &w, None, (1, 1), (0, 0), (1, 1)).is_err());
    assert!(deform_conv2d(&x, &off, None, &w, None, (0, 1), (1, 1), (1, 1)).is_err());
    assert!(deform_conv2d(&x, &off, None, &w, None, (1, 1), (-1, 1), (1, 1)).is_err());
    // Dtypes: integer input, mixed float kinds.
    let e = deform_conv2d(&x.to_kind(Kind::Int), &off, None, &w, None, s.0, s.1, s.2).unwrap_err();
    assert!(e.to_string().contains("float"), "{e}");
    assert!(deform_conv2d(
        &x,
        &off.to_kind(Kind::Double),
        None,
        &w,
        None,
        s.0,
        s.1,
        s.2
    )
    .is_err());
    assert!(deform_conv2d(
        &x,
        &off,
        Some(&m.to_kind(Kind::Int64)),
        &w,
        None,
        s.0,
        s.1,
        s.2
    )
    .is_err());
    if tch::Cuda::is_available() {
        let e = deform_conv2d(
            &x,
            &off.to_device(Device::Cuda(0)),
            None,
            &w,
            None,
            s.0,
            s.1,
            s.2,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Cuda"), "{e}");
        let c = Device::Cuda(0);
        let e = deform_conv2d(
            &x.to_device(c),
            &off.to_device(c),
            None,
            &w.to_device(c),
            None,
            s.0,
            s.1,
            s.2,
        )
        ;
        if s3net_ops::cuda_compiled() {
            assert!(e.is_ok(), "{e:?}");
        } else {
            assert!(e.unwrap_err().to_string().contains("no CUDA kernel"));
        }
    }
}

/// A 1-pixel-wide image and an empty batch go through without special cases.
#[test]
fn degenerate_shapes() {
    let o = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([1, 2, 1, 5], o);
    let off = Tensor::randn([1, 6, 1, 5], o);
    let w = Tensor::randn([2, 2, 1, 3], o);
    let y = deform_conv2d(&x, &off, None, &w, None, (1, 1), (0, 1), (1, 1)).unwrap();
    assert_eq!(y.size(), [1, 2, 1, 5]);
    let y = deform_conv2d(
        &Tensor::zeros([0, 2, 5, 5], o),
        &Tensor::zeros([0, 18, 5, 5], o),
        None,
        &Tensor::zeros([3, 2, 3, 3], o),
        None,
        (1, 1),
        (1, 1),
        (1, 1),
    )
    .unwrap();
    assert_eq!(y.size(), [0, 3, 5, 5]);
}

/// bfloat16 operands are computed on a float32 copy and the result rounded once: forward and
/// every gradient within bfloat16's rounding of float64 on the same (rounded) values, on the
/// CPU and, when present, CUDA.
#[test]
fn bfloat16_is_float32_rounded_once() {
    let mut devices = vec![Device::Cpu];
    devices.extend(checks::cuda_with_kernels());
    for dev in devices {
        tch::manual_seed(13);
        let round = |t: Tensor| t.to_kind(Kind::BFloat16).to_device(dev);
        let (n, c) = (2, 8);
        let x0 = round(Tensor::randn([n, c, 40, 36], (Kind::Float, Device::Cpu)));
        let off0 = round(Tensor::randn([n, 18, 40, 36], (Kind::Float, Device::Cpu)) * 2.0);
        let m0 = round(Tensor::rand([n, 9, 40, 36], (Kind::Float, Device::Cpu)));
        let w0 = round(Tensor::randn([c, c, 3, 3], (Kind::Float, Device::Cpu)) * 0.1);
        let b0 = round(Tensor::randn([c], (Kind::Float, Device::Cpu)));
        let go = round(Tensor::randn([n, c, 40, 36], (Kind::Float, Device::Cpu)));
        let run = |kind: Kind| {
            let [x, off, m, w, b] = [&x0, &off0, &m0, &w0, &b0].map(|t| t.to_kind(kind).copy().set_requires_grad(true));
            let y = deform_conv2d(&x, &off, Some(&m), &w, Some(&b), (1, 1), (1, 1), (1, 1)).unwrap();
            assert_eq!(y.kind(), kind);
            (&y.to_kind(Kind::Double) * go.to_kind(Kind::Double)).sum(Kind::Double).backward();
            [y, x.grad(), off.grad(), m.grad(), w.grad(), b.grad()]
        };
        let (half, reference) = (run(Kind::BFloat16), run(Kind::Double));
        for (name, (a, b)) in ["output", "input", "offset", "mask", "weight", "bias"].iter().zip(half.iter().zip(reference.iter())) {
            assert_eq!(a.kind(), Kind::BFloat16, "{dev:?} {name}");
            let (e, scale) = (max_abs_diff(a, b), max_abs(b).max(1.0));
            assert!(e <= scale / 128.0, "{dev:?} {name}: bfloat16 differs by {e} (scale {scale})");
        }
    }
}

/// torchvision's bilinear sample of plane `x` (H×W, row-major) at (y, x): 0 at or beyond −1 and
/// H (W), corners outside the plane count 0. NaN positions sample 0 too (torchvision leaves them
/// undefined).
fn bilinear(p: &[f64], h: usize, w: usize, y: f64, x: f64) -> f64 {
    if y.is_nan() || x.is_nan() || y <= -1.0 || y >= h as f64 || x <= -1.0 || x >= w as f64 {
        return 0.0;
    }
    let (yf, xf) = (y.floor(), x.floor());
    let (ly, lx) = (y - yf, x - xf);
    let at = |r: f64, c: f64| {
        if r < 0.0 || c < 0.0 || r > (h - 1) as f64 || c > (w - 1) as f64 { 0.0 } else { p[r as usize * w + c as usize] }
    };
    (1.0 - ly) * (1.0 - lx) * at(yf, xf) + (1.0 - ly) * lx * at(yf, xf + 1.0) + ly * (1.0 - lx) * at(yf + 1.0, xf) + ly * lx * at(yf + 1.0, xf + 1.0)
}

/// Samples exactly on the plane's edges and at −1, H, W, beyond, at ±1e9 and NaN: the forward
/// against a scalar reference (float64), and every gradient finite and 0 for a NaN sample's
/// offsets and mask. The geometry runs as branch-free vector code, where such values take the
/// same selects as any other.
#[test]
fn samples_on_and_beyond_the_edges() {
    edge_samples();
}

/// The same edge samples through the CUDA kernels, on their emulation: a NaN position read
/// garbage corner indices there before (2026-11-28), and the backward added to them.
#[test]
fn emulated_samples_on_and_beyond_the_edges() {
    checks::on_emulated_kernels(edge_samples);
}

fn edge_samples() {
    let (c, h, w, o) = (3usize, 5usize, 6usize, 2usize);
    let opts = (Kind::Double, Device::Cpu);
    tch::manual_seed(21);
    let x = Tensor::randn([1, c as i64, h as i64, w as i64], opts);
    let wt = Tensor::randn([o as i64, c as i64, 3, 3], opts);
    let mask = Tensor::rand([1, 9, h as i64, w as i64], opts);
    let special = [-1e9, -2.0, -1.0, -0.5, 0.0, 0.25, 1.0, (h - 1) as f64, h as f64 - 0.5, h as f64, w as f64 - 1.0, w as f64, 7.5, 1e9, f64::NAN];
    // Sample positions drawn from `special` (a fixed pseudo-random pattern), turned into offsets.
    let (mut ys, mut xs) = (vec![0.0; 9 * h * w], vec![0.0; 9 * h * w]);
    let mut off = vec![0.0; 18 * h * w];
    for kk in 0..9 {
        for p in 0..h * w {
            let e = kk * h * w + p;
            let (y, x_) = (special[(e * 7 + 3) % special.len()], special[(e * 11 + 5) % special.len()]);
            ys[e] = y;
            xs[e] = x_;
            let (base_y, base_x) = ((p / w) as f64 - 1.0 + (kk / 3) as f64, (p % w) as f64 - 1.0 + (kk % 3) as f64);
            off[2 * kk * h * w + p] = y - base_y;
            off[(2 * kk + 1) * h * w + p] = x_ - base_x;
        }
    }
    let off = Tensor::from_slice(&off).view([1, 18, h as i64, w as i64]);
    let [xg, offg, mg, wg] = [&x, &off, &mask, &wt].map(|t| t.copy().set_requires_grad(true));
    let y = deform_conv2d(&xg, &offg, Some(&mg), &wg, None, (1, 1), (1, 1), (1, 1)).unwrap();
    // Scalar reference of the forward.
    let xv: Vec<f64> = Vec::try_from(x.flatten(0, -1)).unwrap();
    let wv: Vec<f64> = Vec::try_from(wt.flatten(0, -1)).unwrap();
    let mv: Vec<f64> = Vec::try_from(mask.flatten(0, -1)).unwrap();
    let mut expect = vec![0.0; o * h * w];
    for oc in 0..o {
        for kk in 0..9 {
            for p in 0..h * w {
                let e = kk * h * w + p;
                for ci in 0..c {
                    let s = bilinear(&xv[ci * h * w..(ci + 1) * h * w], h, w, ys[e], xs[e]);
                    expect[oc * h * w + p] += wv[(oc * c + ci) * 9 + kk] * mv[e] * s;
                }
            }
        }
    }
    let expect = Tensor::from_slice(&expect).view([1, o as i64, h as i64, w as i64]);
    let e = max_abs_diff(&y, &expect);
    assert!(e < 1e-12, "forward differs from the scalar reference by {e}");
    y.sum(Kind::Double).backward();
    for (name, g) in [("input", xg.grad()), ("offset", offg.grad()), ("mask", mg.grad()), ("weight", wg.grad())] {
        assert!(bool::try_from(g.isfinite().all()).unwrap(), "{name} gradient not finite");
    }
    let (go, gm) = (offg.grad(), mg.grad());
    for kk in 0..9 {
        for p in 0..h * w {
            let e = kk * h * w + p;
            if ys[e].is_nan() || xs[e].is_nan() {
                let (r, col) = ((p / w) as i64, (p % w) as i64);
                for g in [go.get(0).get(2 * kk as i64), go.get(0).get(2 * kk as i64 + 1), gm.get(0).get(kk as i64)] {
                    assert_eq!(g.double_value(&[r, col]), 0.0, "NaN sample {e}: a non-zero gradient");
                }
            }
        }
    }
}

/// The CPU geometry's AVX2 and baseline x86-64 copies (the AVX-512 one runs above wherever the
/// CPU has it): golden values, the larger cases and the edge samples again in child processes
/// with `S3OPS_NO_AVX512=1` and with `S3OPS_NO_AVX2=1`, which the kernels read once.
#[test]
fn narrower_loops_match_too() {
    if std::env::var_os("S3OPS_NO_AVX512").is_some() || std::env::var_os("S3OPS_NO_AVX2").is_some() {
        return; // this is a child
    }
    for var in ["S3OPS_NO_AVX512", "S3OPS_NO_AVX2"] {
        checks::rerun_with_env(&[var], &["matches_torchvision_float64", "matches_torchvision_float32", "matches_reference_on_larger_cases_float32", "samples_on_and_beyond_the_edges", "--exact"], "4 passed");
    }
}
