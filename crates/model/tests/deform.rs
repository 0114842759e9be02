//! deform_conv2d against torchvision's golden values (forward and every gradient), and its
//! gradients against finite differences in float64.

use s3net_model::deform::{deform_conv2d, ConvGeometry};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn tensor(v: &Value) -> Option<Tensor> {
    if v.is_null() {
        return None;
    }
    let shape: Vec<i64> = v["shape"].as_array()?.iter().map(|x| x.as_i64().unwrap()).collect();
    let data: Vec<f64> = v["data"].as_array()?.iter().map(|x| x.as_f64().unwrap()).collect();
    Some(Tensor::from_slice(&data).view(shape.as_slice()))
}

fn pair(v: &Value) -> (i64, i64) {
    (v[0].as_i64().unwrap(), v[1].as_i64().unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

fn golden() -> Value {
    // DEFORM_GOLDEN lets a test binary built here run on another machine (the GPU check).
    let path = std::env::var("DEFORM_GOLDEN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/deform_golden.json").to_string());
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn check_against_golden(device: Device, kind: Kind, tol: f64) {
    let g = golden();
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let leaf = |k: &str| tensor(&case[k]).map(|t| t.to_kind(kind).to_device(device).set_requires_grad(true));
        let (x, off, mask, w, b) = (leaf("input").unwrap(), leaf("offset").unwrap(), leaf("mask"), leaf("weight").unwrap(), leaf("bias"));
        let geo = ConvGeometry { stride: pair(&case["stride"]), padding: pair(&case["padding"]), dilation: pair(&case["dilation"]) };
        let y = deform_conv2d(&x, &off, mask.as_ref(), &w, b.as_ref(), geo).unwrap();
        let want = tensor(&case["output"]).unwrap().to_kind(kind).to_device(device);
        let d = max_abs_diff(&y, &want);
        assert!(d < tol, "{name}: forward differs by {d}");
        let go = tensor(&case["grad_output"]).unwrap().to_kind(kind).to_device(device);
        (&y * &go).sum(kind).backward();
        let grads: [(&str, Option<&Tensor>); 5] =
            [("grad_input", Some(&x)), ("grad_offset", Some(&off)), ("grad_mask", mask.as_ref()), ("grad_weight", Some(&w)), ("grad_bias", b.as_ref())];
        for (key, t) in grads {
            let Some(t) = t else { continue };
            let want = tensor(&case[key]).unwrap().to_kind(kind).to_device(device);
            let d = max_abs_diff(&t.grad(), &want);
            let scale = f64::try_from(want.abs().max()).unwrap().max(1.0);
            assert!(d < tol * scale, "{name}: {key} differs by {d} (scale {scale})");
        }
    }
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
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    check_against_golden(Device::Cuda(0), Kind::Double, 1e-9);
    check_against_golden(Device::Cuda(0), Kind::Float, 2e-4);
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
    let f = |x: &Tensor, off: &Tensor, mask: &Tensor, w: &Tensor, b: &Tensor| deform_conv2d(x, off, Some(mask), w, Some(b), geo).unwrap();
    let y = f(&x, &off, &mask, &w, &b);
    assert_eq!(y.size(), [1, 2, ho, wo]);
    let g = Tensor::randn(y.size().as_slice(), opts);
    (&y * &g).sum(Kind::Double).backward();
    let eps = 1e-6;
    let inputs = [&x, &off, &mask, &w, &b];
    for (which, t) in inputs.iter().enumerate() {
        let analytic = t.grad();
        let n = t.numel() as i64;
        for i in 0..n {
            let eval = |delta: f64| -> f64 {
                tch::no_grad(|| {
                    let mut ts: Vec<Tensor> = inputs.iter().map(|t| t.detach().copy()).collect();
                    let flat = ts[which].view([-1]);
                    let _ = flat.get(i).g_add_scalar_(delta);
                    let y = f(&ts[0], &ts[1], &ts[2], &ts[3], &ts[4]);
                    let _ = &mut ts;
                    f64::try_from((&y * &g).sum(Kind::Double)).unwrap()
                })
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let a = f64::try_from(analytic.view([-1]).get(i)).unwrap();
            assert!((numeric - a).abs() < 1e-5 * (1.0 + a.abs()), "input {which}, element {i}: numeric {numeric} vs autograd {a}");
        }
    }
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
