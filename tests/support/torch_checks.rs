//! Checks shared by the convolution tests of `s3net-model` and `s3net-ops` (pulled in with
//! `#[path = "../../../tests/support/torch_checks.rs"] mod checks;`): the torchvision golden
//! file, comparisons in float64 on the CPU, and gradients against central differences.
#![allow(dead_code)] // each test file uses a different part

use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The GPU for a test's CUDA cases, or None (saying so) where there is none: CUDA cases skip
/// rather than fail on machines without a GPU.
pub fn cuda_device() -> Option<Device> {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: CUDA cases skipped");
        return None;
    }
    Some(Device::Cuda(0))
}

/// [`cuda_device`] where this build also carries s3net-ops' CUDA kernels (nvcc was found when
/// it was compiled), or None, saying which is missing.
pub fn cuda_with_kernels() -> Option<Device> {
    let device = cuda_device()?;
    if !s3net_ops::cuda_compiled() {
        eprintln!("CUDA device present but this build has no CUDA kernel: CUDA cases skipped");
        return None;
    }
    Some(device)
}

/// Runs `body` on the CPU emulation of the CUDA kernels (`s3net_ops::emulated_cuda`) and checks
/// that the kernels ran in it, not only the CPU ops: a test of the kernels' logic where no GPU
/// is.
pub fn on_emulated_kernels<R>(body: impl FnOnce() -> R) -> R {
    let before = s3net_ops::emulated_launches();
    let r = s3net_ops::emulated_cuda(body);
    assert!(s3net_ops::emulated_launches() > before, "the emulated kernels did not run");
    r
}

/// Runs this test binary again in a child process with each environment variable of `vars` set
/// to "1" (settings the ops read once per process), on the tests whose names contain one of
/// `filters`, one thread; asserts that it passed and that its output contains `expect`. The
/// child itself sees the variables set: a test calling this should do its own check there and
/// return.
pub fn rerun_with_env(vars: &[&str], filters: &[&str], expect: &str) {
    let set: Vec<(&str, &str)> = vars.iter().map(|v| (*v, "1")).collect();
    rerun_with(&set, filters, expect);
}

/// [`rerun_with_env`] with each variable set to its own value.
#[allow(dead_code)] // each test file that includes this module uses its own part of it
pub fn rerun_with(vars: &[(&str, &str)], filters: &[&str], expect: &str) {
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe);
    child.args(filters).args(["--test-threads", "1"]);
    child.envs(vars.iter().copied());
    let o = child.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains(expect), "{vars:?}: {out}{}", String::from_utf8_lossy(&o.stderr));
}

/// A test file's emulated and CUDA tests again with the depthwise kernels' column layout
/// (`S3NET_DW_COLUMNS=1`, read once per process; see `s3net_ops::depthwise_columns`), in a child
/// process; in that child (the variable set) it checks that the layout is on. For a test named
/// `column_layout_cuda_and_emulated`.
pub fn rerun_with_depthwise_columns() {
    if std::env::var_os("S3NET_DW_COLUMNS").is_some() {
        assert!(s3net_ops::depthwise_columns(), "S3NET_DW_COLUMNS=1 did not switch the layout");
        return; // this is the child
    }
    rerun_with_env(&["S3NET_DW_COLUMNS"], &["emulated_cuda", "cuda_", "column_layout"], "emulated_cuda_kernels_match_libtorch ... ok");
}

/// Stride, padding, dilation.
pub type Geo = ((i64, i64), (i64, i64), (i64, i64));

/// `deform_conv2d(input, offset, mask, weight, bias, geometry)` under test.
pub type DeformFn<'a> = &'a dyn Fn(&Tensor, &Tensor, Option<&Tensor>, &Tensor, Option<&Tensor>, Geo) -> Tensor;

pub fn max_abs(t: &Tensor) -> f64 {
    f64::try_from(t.abs().max().to_kind(Kind::Double)).unwrap()
}

/// Asserts that `a` is within `tol` · max(1, max |b|) of the reference `b` everywhere; the
/// message names `what`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let scale = max_abs(b).max(1.0);
    let e = max_abs_diff(a, b);
    assert!(e <= tol * scale, "{what} differs by {e} (scale {scale})");
}

/// Largest elementwise difference, computed in float64 on the CPU whatever the operands.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    max_abs(&(cpu(a) - cpu(b)))
}

/// A tensor of the golden file (`{"shape": [...], "data": [...]}`, float64), or None for null.
pub fn tensor(v: &Value) -> Option<Tensor> {
    if v.is_null() {
        return None;
    }
    let shape: Vec<i64> = v["shape"].as_array()?.iter().map(|x| x.as_i64().unwrap()).collect();
    let data: Vec<f64> = v["data"].as_array()?.iter().map(|x| x.as_f64().unwrap()).collect();
    Some(Tensor::from_slice(&data).view(shape.as_slice()))
}

pub fn pair(v: &Value) -> (i64, i64) {
    (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
}

/// The torchvision golden values (`tools/make_deform_golden.py`). DEFORM_GOLDEN points elsewhere
/// when a test binary built here runs on another machine (the GPU check).
pub fn golden() -> Value {
    let path = std::env::var("DEFORM_GOLDEN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/data/deform_golden.json").into()
    });
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// How the forward difference is bounded: by `tol`, or by `tol · max(1, |expected|)`.
#[derive(Clone, Copy)]
pub enum Forward {
    Absolute,
    Relative,
}

/// Every golden case on `device` in `kind`: the forward and the five gradients; gradients
/// within `tol · max(1, |expected|)`.
pub fn check_against_golden(conv: DeformFn, device: Device, kind: Kind, tol: f64, forward: Forward) {
    let g = golden();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let leaf = |k: &str| tensor(&case[k]).map(|t| t.to_kind(kind).to_device(device).set_requires_grad(true));
        let (x, off, mask, w, b) = (leaf("input").unwrap(), leaf("offset").unwrap(), leaf("mask"), leaf("weight").unwrap(), leaf("bias"));
        let geo = (pair(&case["stride"]), pair(&case["padding"]), pair(&case["dilation"]));
        let y = conv(&x, &off, mask.as_ref(), &w, b.as_ref(), geo);
        let want = tensor(&case["output"]).unwrap();
        let bound = match forward {
            Forward::Absolute => tol,
            Forward::Relative => tol * max_abs(&want).max(1.0),
        };
        let e = max_abs_diff(&y, &want);
        assert!(e < bound, "{name}: forward differs by {e}");
        let go = tensor(&case["grad_output"]).unwrap().to_kind(kind).to_device(device);
        (&y * &go).sum(kind).backward();
        let grads: [(&str, Option<&Tensor>); 5] =
            [("grad_input", Some(&x)), ("grad_offset", Some(&off)), ("grad_mask", mask.as_ref()), ("grad_weight", Some(&w)), ("grad_bias", b.as_ref())];
        for (key, t) in grads {
            let Some(t) = t else { continue };
            let want = tensor(&case[key]).unwrap();
            let e = max_abs_diff(&t.grad(), &want);
            let scale = max_abs(&want).max(1.0);
            assert!(e < tol * scale, "{name}: {key} differs by {e} (scale {scale})");
        }
    }
}

/// Central differences (step 1e-6) of sum(f(inputs) · go) against the autograd gradients of the
/// leaves `inputs` (float64, already backpropagated with `go`), for every element of every
/// input: |numeric − analytic| < tol · (1 + |analytic|).
pub fn check_finite_differences(inputs: &[&Tensor], go: &Tensor, tol: f64, f: &dyn Fn(&[Tensor]) -> Tensor) {
    let eps = 1e-6;
    for (which, t) in inputs.iter().enumerate() {
        let analytic = t.grad();
        for i in 0..t.numel() as i64 {
            let eval = |delta: f64| -> f64 {
                tch::no_grad(|| {
                    let ts: Vec<Tensor> = inputs.iter().map(|t| t.detach().copy()).collect();
                    let _ = ts[which].view([-1]).get(i).g_add_scalar_(delta);
                    f64::try_from((&f(&ts) * go).sum(Kind::Double)).unwrap()
                })
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let a = f64::try_from(analytic.view([-1]).get(i)).unwrap();
            assert!(
                (numeric - a).abs() < tol * (1.0 + a.abs()),
                "input {which}, element {i}: numeric {numeric} vs autograd {a}"
            );
        }
    }
}

/// Per-image weights (N, O, C, kh, kw): the same as N separate calls, each image with its own
/// kernel, forward and every gradient. The engine trains N networks in one batch this way.
pub fn check_per_image_weights(conv: DeformFn, device: Device, kind: Kind, tol: f64) {
    tch::manual_seed(11);
    let o = (kind, device);
    let (n, c, oc, h, w) = (3, 4, 5, 9, 11);
    let leaf = |t: Tensor| t.set_requires_grad(true);
    let x = leaf(Tensor::randn([n, c, h, w], o));
    let off = leaf(Tensor::randn([n, 18, h, w], o) * 1.5);
    let m = leaf(Tensor::rand([n, 9, h, w], o));
    let wt = leaf(Tensor::randn([n, oc, c, 3, 3], o) * 0.3);
    let b = leaf(Tensor::randn([n, oc], o));
    let go = Tensor::randn([n, oc, h, w], o);
    let g = ((1, 1), (1, 1), (1, 1));
    let y = conv(&x, &off, Some(&m), &wt, Some(&b), g);
    (&y * &go).sum(kind).backward();
    for i in 0..n {
        let pick = |t: &Tensor| t.detach().narrow(0, i, 1).copy().set_requires_grad(true);
        let (xi, offi, mi) = (pick(&x), pick(&off), pick(&m));
        let wi = wt.detach().select(0, i).copy().set_requires_grad(true);
        let bi = b.detach().select(0, i).copy().set_requires_grad(true);
        let yi = conv(&xi, &offi, Some(&mi), &wi, Some(&bi), g);
        (&yi * go.narrow(0, i, 1)).sum(kind).backward();
        let pairs = [
            ("output", y.narrow(0, i, 1), yi),
            ("input", x.grad().narrow(0, i, 1), xi.grad()),
            ("offset", off.grad().narrow(0, i, 1), offi.grad()),
            ("mask", m.grad().narrow(0, i, 1), mi.grad()),
            ("weight", wt.grad().select(0, i), wi.grad()),
            ("bias", b.grad().select(0, i), bi.grad()),
        ];
        for (name, a, e) in pairs {
            let d = max_abs_diff(&a, &e);
            assert!(d <= tol * max_abs(&e).max(1.0), "image {i} {name}: differs by {d}");
        }
    }
}
