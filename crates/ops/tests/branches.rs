//! depthwise_branches (the I-LKA block's three depthwise convs, concatenated per network)
//! against libtorch: three conv2d(groups = C) and a cat, network by network; forward and every
//! gradient, on the CPU and on a GPU (the kernels writing into the concatenation either way),
//! float64, float32 and bfloat16; only some gradients asked for; error cases.

use s3net_ops::{depthwise_branches, Branch};
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::assert_close;

/// The I-LKA block's branches: (kernel size, dilation).
const ILKA: [(i64, i64); 3] = [(3, 1), (5, 2), (7, 3)];

/// The reference: libtorch's depthwise convs, joined network by network.
fn reference(x: &Tensor, p: &[(Tensor, Tensor)], geo: [(i64, i64); 3], m: i64) -> Tensor {
    let c = x.size()[1];
    let parts: Vec<Tensor> = p
        .iter()
        .zip(geo)
        .map(|((w, b), (k, d))| {
            let pad = d * (k - 1) / 2;
            let y = x.conv2d(w, Some(b), [1, 1], [pad, pad], [d, d], c);
            let s = y.size();
            y.reshape([s[0], m, s[1] / m, s[2], s[3]])
        })
        .collect();
    let y = Tensor::cat(&parts, 2);
    let s = y.size();
    y.reshape([s[0], s[1] * s[2], s[3], s[4]])
}

/// Ours and the reference on identical leaves (the reference in float64 on a GPU and for
/// bfloat16), compared relative to max(1, |reference|).
fn compare(dev: Device, shape: [i64; 4], m: i64, geo: [(i64, i64); 3], kind: Kind, tol: f64) {
    let c = shape[1];
    let ref_kind = if dev.is_cuda() || kind == Kind::BFloat16 { Kind::Double } else { kind };
    let draw = |s: &[i64]| Tensor::randn(s, (Kind::Double, dev)).to_kind(kind).to_kind(Kind::Double);
    let x0 = draw(&shape);
    let p0: Vec<(Tensor, Tensor)> = geo.iter().map(|&(k, _)| (draw(&[c, 1, k, k]), draw(&[c]))).collect();
    let leaf = |t: &Tensor, kind: Kind| t.to_kind(kind).copy().set_requires_grad(true);
    let (x1, x2) = (leaf(&x0, kind), leaf(&x0, ref_kind));
    let p1: Vec<(Tensor, Tensor)> = p0.iter().map(|(w, b)| (leaf(w, kind), leaf(b, kind))).collect();
    let p2: Vec<(Tensor, Tensor)> = p0.iter().map(|(w, b)| (leaf(w, ref_kind), leaf(b, ref_kind))).collect();
    let br = |i: usize| Branch { weight: &p1[i].0, bias: &p1[i].1, dilation: geo[i].1 };
    let y1 = depthwise_branches(&x1, [br(0), br(1), br(2)], m).unwrap();
    let y2 = reference(&x2, &p2, geo, m);
    let tag = format!("{dev:?} {shape:?} M={m} {geo:?} {kind:?}");
    assert_eq!(y1.size(), y2.size(), "{tag}");
    assert_eq!(y1.kind(), kind, "{tag}");
    assert_close(&format!("{tag}: forward"), &y1, &y2, tol);
    let g = draw(y2.size().as_slice());
    (&y1 * g.to_kind(kind)).sum(kind).backward();
    (&y2 * g.to_kind(ref_kind)).sum(ref_kind).backward();
    let mut pairs = vec![("grad_input".to_string(), x1.grad(), x2.grad())];
    for i in 0..3 {
        pairs.push((format!("branch {i} grad_weight"), p1[i].0.grad(), p2[i].0.grad()));
        pairs.push((format!("branch {i} grad_bias"), p1[i].1.grad(), p2[i].1.grad()));
    }
    for (name, a, b) in pairs {
        assert_close(&format!("{tag}: {name}"), &a, &b, tol);
    }
}

/// Shapes: one network; stacks of 2 and 3 (image and rotated copy); planes smaller than a
/// tile, than the kernel span, and cut by the tiles' edges.
fn shapes(dev: Device, kind: Kind, tol: f64) {
    for (shape, m) in [([1, 4, 32, 40], 1), ([2, 6, 33, 17], 2), ([2, 9, 5, 70], 3), ([1, 2, 1, 1], 2), ([2, 3, 70, 3], 1)] {
        compare(dev, shape, m, ILKA, kind, tol);
    }
    // Another set of geometries, one without a compiled specialisation.
    compare(dev, [2, 4, 20, 24], 2, [(5, 1), (1, 1), (9, 2)], kind, tol);
}

#[test]
fn matches_libtorch_on_cpu() {
    tch::manual_seed(21);
    shapes(Device::Cpu, Kind::Double, 1e-10);
    shapes(Device::Cpu, Kind::Float, 1e-4);
    // bfloat16 on the CPU: computed on a float32 copy and rounded back once, as
    // depthwise_conv2d does.
    compare(Device::Cpu, [2, 6, 33, 17], 2, ILKA, Kind::BFloat16, 1.0 / 128.0);
}

/// The backward computes what is asked for: the input's gradient alone (weights and biases
/// frozen), or the parameters' alone (an input without gradient), each as libtorch's.
#[test]
fn only_the_gradients_asked_for_on_cpu() {
    tch::manual_seed(26);
    let (shape, m) = ([2, 6, 19, 23], 2);
    let c = shape[1];
    let x0 = Tensor::randn(shape, (Kind::Double, Device::Cpu));
    let p0: Vec<(Tensor, Tensor)> = ILKA.iter().map(|&(k, _)| (Tensor::randn([c, 1, k, k], (Kind::Double, Device::Cpu)), Tensor::randn([c], (Kind::Double, Device::Cpu)))).collect();
    let g = Tensor::randn([shape[0], 3 * c, shape[2], shape[3]], (Kind::Double, Device::Cpu));
    for input_grad in [true, false] {
        let leaf = |t: &Tensor, on: bool| t.copy().set_requires_grad(on);
        let (x1, x2) = (leaf(&x0, input_grad), leaf(&x0, input_grad));
        let p1: Vec<(Tensor, Tensor)> = p0.iter().map(|(w, b)| (leaf(w, !input_grad), leaf(b, !input_grad))).collect();
        let p2: Vec<(Tensor, Tensor)> = p0.iter().map(|(w, b)| (leaf(w, !input_grad), leaf(b, !input_grad))).collect();
        let br = |i: usize| Branch { weight: &p1[i].0, bias: &p1[i].1, dilation: ILKA[i].1 };
        (depthwise_branches(&x1, [br(0), br(1), br(2)], m).unwrap() * &g).sum(Kind::Double).backward();
        (reference(&x2, &p2, ILKA, m) * &g).sum(Kind::Double).backward();
        if input_grad {
            assert_close("grad_input alone", &x1.grad(), &x2.grad(), 1e-10);
            assert!(!p1[0].0.grad().defined(), "a frozen weight got a gradient");
        } else {
            assert!(!x1.grad().defined(), "an input without gradient got one");
            for i in 0..3 {
                assert_close(&format!("branch {i} grad_weight alone"), &p1[i].0.grad(), &p2[i].0.grad(), 1e-10);
                assert_close(&format!("branch {i} grad_bias alone"), &p1[i].1.grad(), &p2[i].1.grad(), 1e-10);
            }
        }
    }
}

#[test]
fn cuda_matches_libtorch_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(22);
    shapes(cuda, Kind::Double, 1e-10);
    shapes(cuda, Kind::Float, 1e-4);
    // The network's size: 4 networks of F = 32, image and rotated copy.
    compare(cuda, [2, 128, 256, 256], 4, ILKA, Kind::Float, 1e-4);
}

/// bfloat16 in, bfloat16 out; sums in float32, each output rounded once (the input gradient
/// after each of its three parts: a few times 2⁻⁹).
#[test]
fn cuda_bfloat16_when_present() {
    let Some(cuda) = checks::cuda_with_kernels() else { return };
    tch::manual_seed(23);
    shapes(cuda, Kind::BFloat16, 1.0 / 128.0);
    compare(cuda, [2, 64, 256, 256], 2, ILKA, Kind::BFloat16, 1.0 / 128.0);
}

/// The kernels and BranchesFn's host code on the CPU emulation (s3net_ops::emulated_cuda).
#[test]
fn emulated_cuda_kernels_match_libtorch() {
    tch::manual_seed(25);
    checks::on_emulated_kernels(|| {
        shapes(Device::Cpu, Kind::Double, 1e-10);
        shapes(Device::Cpu, Kind::Float, 1e-4);
        shapes(Device::Cpu, Kind::BFloat16, 1.0 / 128.0);
    });
}

/// A span too wide for the kernels' shared memory: that branch, and so the op, takes
/// libtorch's path on a GPU, with the same result.
#[test]
fn cuda_wide_span_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(24);
    compare(cuda, [1, 4, 64, 64], 2, [(3, 1), (5, 2), (7, 15)], Kind::Double, 1e-10);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let x = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let w3 = Tensor::zeros([4, 1, 3, 3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let ok = Branch { weight: &w3, bias: &b, dilation: 1 };
    let err = |branches: [Branch<'_>; 3], input: &Tensor, m: i64| depthwise_branches(input, branches, m).unwrap_err().to_string();

    let w2 = Tensor::zeros([4, 1, 2, 2], (Kind::Float, Device::Cpu));
    let e = err([ok, Branch { weight: &w2, ..ok }, ok], &x, 1);
    assert!(e.contains("branch 1 needs an odd kernel size"), "{e}");
    let e = err([ok, ok, Branch { dilation: 0, ..ok }], &x, 1);
    assert!(e.contains("branch 2 needs an odd kernel size and dilation >= 1"), "{e}");
    let e = err([ok, ok, ok], &x, 3);
    assert!(e.contains("input must be (N, M·C, H, W) with M = 3"), "{e}");
    let e = err([ok, ok, ok], &x, 0);
    assert!(e.contains("need at least one network"), "{e}");
    let b5 = Tensor::zeros([5], (Kind::Float, Device::Cpu));
    let e = err([Branch { bias: &b5, ..ok }, ok, ok], &x, 1);
    assert!(e.contains("bias must be (4)"), "{e}");
    let wd = Tensor::zeros([4, 1, 3, 3], (Kind::Double, Device::Cpu));
    let e = err([ok, Branch { weight: &wd, ..ok }, ok], &x, 1);
    assert!(e.contains("weight is Double but the input is Float"), "{e}");
    let x3 = Tensor::zeros([4, 8, 8], (Kind::Float, Device::Cpu));
    let e = err([ok, ok, ok], &x3, 1);
    assert!(e.contains("must be"), "{e}");
    // A kernel wider than the plane with its 'same' padding still fits; a 1×1 plane too.
    let tiny = Tensor::zeros([1, 4, 1, 1], (Kind::Float, Device::Cpu));
    assert_eq!(depthwise_branches(&tiny, [ok, ok, ok], 2).unwrap().size(), [1, 12, 1, 1]);
}

/// The kernels' column layout (`S3NET_DW_COLUMNS=1`, read once; see
/// `s3net_ops::depthwise_columns`): this file's emulated and CUDA tests again, in a child
/// process with it on.
#[test]
fn column_layout_cuda_and_emulated() {
    checks::rerun_with_depthwise_columns();
}
