//! deform_conv2d against torchvision's golden values (forward and every gradient), against a
//! tensor-op reference on larger multi-tile cases, finite differences in float64, error cases.

use s3net_ops::deform_conv2d;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

type Geo = ((i64, i64), (i64, i64), (i64, i64));

fn tensor(v: &Value) -> Option<Tensor> {
    if v.is_null() {
        return None;
    }
    let shape: Vec<i64> = v["shape"]
        .as_array()?
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let data: Vec<f64> = v["data"]
        .as_array()?
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    Some(Tensor::from_slice(&data).view(shape.as_slice()))
}

fn pair(v: &Value) -> (i64, i64) {
    (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
}

fn max_abs(t: &Tensor) -> f64 {
    f64::try_from(t.abs().max().to_kind(Kind::Double)).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    max_abs(&(a.to_kind(Kind::Double) - b.to_kind(Kind::Double)))
}

fn golden() -> Value {
    // One golden file for both implementations (tools/make_deform_golden.py writes it).
    // DEFORM_GOLDEN points elsewhere when the test binary runs on another machine (GPU checks).
    let path = std::env::var("DEFORM_GOLDEN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data/deform_golden.json").into()
    });
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The CUDA device to test on, or None (with a message) where there is none or this build has
/// no CUDA kernel.
fn cuda() -> Option<Device> {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: CUDA cases skipped");
        return None;
    }
    if !s3net_ops::cuda_compiled() {
        eprintln!("CUDA device present but this build has no CUDA kernel: CUDA cases skipped");
        return None;
    }
    Some(Device::Cuda(0))
}

fn check_against_golden(device: Device, kind: Kind, tol: f64) {
    let g = golden();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let leaf = |k: &str| {
            tensor(&case[k]).map(|t| t.to_kind(kind).to_device(device).set_requires_grad(true))
        };
        let (x, off, mask, w, b) = (
            leaf("input").unwrap(),
            leaf("offset").unwrap(),
            leaf("mask"),
            leaf("weight").unwrap(),
            leaf("bias"),
        );
        let (s, p, d) = (
            pair(&case["stride"]),
            pair(&case["padding"]),
            pair(&case["dilation"]),
        );
        let y = deform_conv2d(&x, &off, mask.as_ref(), &w, b.as_ref(), s, p, d).unwrap();
        let want = tensor(&case["output"]).unwrap();
        let scale = max_abs(&want).max(1.0);
        let e = max_abs_diff(&y.to_device(Device::Cpu), &want);
        assert!(e < tol * scale, "{name}: forward differs by {e}");
        let go = tensor(&case["grad_output"]).unwrap().to_kind(kind).to_device(device);
        (&y * &go).sum(kind).backward();
        let grads: [(&str, Option<&Tensor>); 5] = [
            ("grad_input", Some(&x)),
            ("grad_offset", Some(&off)),
            ("grad_mask", mask.as_ref()),
            ("grad_weight", Some(&w)),
            ("grad_bias", b.as_ref()),
        ];
        for (key, t) in grads {
            let Some(t) = t else { continue };
            let want = tensor(&case[key]).unwrap();
            let e = max_abs_diff(&t.grad().to_device(Device::Cpu), &want);
            let scale = max_abs(&want).max(1.0);
            assert!(
                e < tol * scale,
                "{name}: {key} differs by {e} (scale {scale})"
            );
        }
    }
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
    if let Some(d) = cuda() {
        check_against_golden(d, Kind::Double, 1e-9);
    }
}

#[test]
fn cuda_matches_torchvision_float32() {
    if let Some(d) = cuda() {
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
    let cases: [([i64; 4], i64, (i64, i64), Geo, bool, bool); 4] = [
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
        let off0 = Tensor::randn([n, 2 * k, ho, wo], opts) * 3.0;
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
    if let Some(d) = cuda() {
        compare_with_reference(d, Kind::Double, 1e-9);
        compare_with_reference(d, Kind::Float, 2e-4);
    }
}

/// The network's own shape (1×64×256×256, 3×3, padding 1, offsets of a few pixels, mask):
/// the CUDA kernel against the CPU kernel, forward and every gradient, float32.
#[test]
fn cuda_matches_cpu_at_network_size() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(5);
    let o = (Kind::Float, Device::Cpu);
    let x0 = Tensor::randn([1, 64, 256, 256], o);
    let off0 = Tensor::randn([1, 18, 256, 256], o) * 2.0;
    let m0 = Tensor::rand([1, 9, 256, 256], o);
    let w0 = Tensor::randn([64, 64, 3, 3], o) * 0.05;
    let b0 = Tensor::randn([64], o);
    let go = Tensor::randn([1, 64, 256, 256], o);
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
        assert!(e < 1e-3 * scale, "{name}: CUDA differs from CPU by {e} (scale {scale})");
    }
}

/// Central differences of sum(out · g) against autograd, every input, float64.
#[test]
fn gradients_match_finite_differences() {
    finite_differences(Device::Cpu);
}

#[test]
fn cuda_gradients_match_finite_differences() {
    if let Some(d) = cuda() {
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
    let f = |x: &Tensor, off: &Tensor, mask: &Tensor, w: &Tensor, b: &Tensor| {
        deform_conv2d(x, off, Some(mask), w, Some(b), g.0, g.1, g.2).unwrap()
    };
    let y = f(&x, &off, &mask, &w, &b);
    assert_eq!(y.size(), [1, 2, ho, wo]);
    let go = Tensor::randn(y.size().as_slice(), opts);
    (&y * &go).sum(Kind::Double).backward();
    let eps = 1e-6;
    let inputs = [&x, &off, &mask, &w, &b];
    for (which, t) in inputs.iter().enumerate() {
        let analytic = t.grad();
        for i in 0..t.numel() as i64 {
            let eval = |delta: f64| -> f64 {
                tch::no_grad(|| {
                    let ts: Vec<Tensor> = inputs.iter().map(|t| t.detach().copy()).collect();
                    let _ = ts[which].view([-1]).get(i).g_add_scalar_(delta);
                    let y = f(&ts[0], &ts[1], &ts[2], &ts[3], &ts[4]);
                    f64::try_from((&y * &go).sum(Kind::Double)).unwrap()
                })
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let a = f64::try_from(analytic.view([-1]).get(i)).unwrap();
            assert!(
                (numeric - a).abs() < 1e-5 * (1.0 + a.abs()),
                "input {which}, element {i}: numeric {numeric} vs autograd {a}"
            );
        }
    }
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
