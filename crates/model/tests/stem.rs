//! A stack's stem as im2col's columns and a stacked 1×1 conv (`S3NET_STEM_COLUMNS`,
//! `s3net_ops::set_stem_columns`) against the grouped convolution it replaces, on the
//! emulation of the GPU's paths: the trunk's output and the stem's weight and bias gradients
//! agree up to the order of the sums, in float32 and bfloat16 activations. Its own test binary:
//! the switch is the process's.

use s3net_model::net::S3Net;
use s3net_model::options::{Kernels, OffsetMode, Precision};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;
use checks::{max_abs, max_abs_diff};

/// Held by each test: the switch is the process's, and tests run side by side.
static SWITCH: Mutex<()> = Mutex::new(());

/// Three networks of 8 features stacked, on 3-channel 20×24 inputs.
fn stack(precision: Precision) -> S3Net {
    stack_on(Device::Cpu, precision)
}

fn stack_on(dev: Device, precision: Precision) -> S3Net {
    let net = |seed| S3Net::new(seed, dev, 3, 8, 1, OffsetMode::Free, 24, Kernels::Fused, precision);
    let mut s = net(1);
    s.stack(net(2));
    s.stack(net(3));
    s
}

/// The trunk's output (float32) and the stem's weight and bias gradients, and how many kernels
/// the emulation ran, with the stem as columns or not (CPU tensors: on the emulation).
fn trunk(net: &S3Net, x: &Tensor, go: &Tensor, columns: bool) -> ([Tensor; 3], u64) {
    s3net_ops::set_stem_columns(columns);
    for p in net.parameters() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let before = s3net_ops::emulated_launches();
    let pass = || {
        let h = net.trunk(x).to_kind(Kind::Float);
        (&h * go).sum(Kind::Float).backward();
        h
    };
    let h = if x.device() == Device::Cpu { s3net_ops::emulated_cuda(pass) } else { pass() };
    let launches = s3net_ops::emulated_launches() - before;
    let p = net.parameters();
    let host = |t: Tensor| t.to_device(Device::Cpu);
    ([host(h.detach()), host(p[0].grad().copy()), host(p[1].grad().copy())], launches)
}

/// Largest difference relative to `scale`.
fn max_rel(a: &Tensor, b: &Tensor, scale: f64) -> f64 {
    max_abs_diff(a, b) / scale.max(1e-12)
}

/// Float32: the same up to the order of the sums. bfloat16: each path rounds on its own (libtorch's
/// grouped convolution and our GEMM round their products and sums differently, and the
/// difference grows through the blocks' BatchNorms), so each is measured against the float32
/// result of the same networks, and the columns must be no further from it than the grouped
/// convolution is (with a margin of 1.5×).
#[test]
fn emulated_stem_columns_match_the_grouped_conv() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let x = Tensor::rand([1, 9, 20, 24], (Kind::Float, Device::Cpu));
    let go = Tensor::randn([1, 24, 20, 24], (Kind::Float, Device::Cpu));
    let f32_net = stack(Precision::Float32);
    let (reference, n_grouped) = trunk(&f32_net, &x, &go, false);
    let (columns, n_columns) = trunk(&f32_net, &x, &go, true);
    assert!(n_columns > n_grouped, "the columns' GEMM did not run on the emulated kernels ({n_columns} launches against {n_grouped})");
    // The stem's BatchNorm takes out each channel's mean, so the bias's true gradient is 0 and
    // what is computed is rounding: it is measured against the weight gradient's scale.
    let scales = [max_abs(&reference[0]), max_abs(&reference[1]), max_abs(&reference[1])];
    let names = ["trunk output", "stem weight gradient", "stem bias gradient"];
    for i in 0..3 {
        let r = max_rel(&reference[i], &columns[i], scales[i]);
        assert!(r < 1e-4, "float32: the {} differs by {r:.1e} of its largest value", names[i]);
    }
    let bf16_net = stack(Precision::Bfloat16);
    let (grouped, _) = trunk(&bf16_net, &x, &go, false);
    let (columns, _) = trunk(&bf16_net, &x, &go, true);
    for i in 0..2 {
        let (g, c) = (max_rel(&reference[i], &grouped[i], scales[i]), max_rel(&reference[i], &columns[i], scales[i]));
        eprintln!("bfloat16 {} against float32: grouped {g:.1e}, columns {c:.1e}", names[i]);
        assert!(c <= 1.5 * g + 1e-3, "bfloat16: the columns' {} is {c:.1e} from float32's, the grouped conv's {g:.1e}", names[i]);
    }
    s3net_ops::set_stem_columns(false);
}

#[test]
fn a_lone_network_and_the_cpu_keep_the_convolution() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    // One network (cuDNN does well with a plain conv), and a stack off the GPU's paths.
    tch::manual_seed(6);
    let lone = S3Net::new(1, Device::Cpu, 3, 8, 1, OffsetMode::Free, 24, Kernels::Fused, Precision::Float32);
    let x = Tensor::rand([1, 3, 20, 24], (Kind::Float, Device::Cpu));
    let go = Tensor::randn([1, 8, 20, 24], (Kind::Float, Device::Cpu));
    let (a, n_off) = trunk(&lone, &x, &go, false);
    let (b, n_on) = trunk(&lone, &x, &go, true);
    assert_eq!(n_on, n_off, "a lone network's stem ran differently");
    assert!(a.iter().zip(&b).all(|(a, b)| a.equal(b)));
    s3net_ops::set_stem_columns(false);
}

/// The same on a GPU when present, float32 (TF32 off for cuDNN's grouped convolution, so that
/// both sides sum in full float32): within 1e-4.
#[test]
fn cuda_stem_columns_match_the_grouped_conv() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = checks::cuda_device() else { return };
    let tf32 = s3net_ops::set_cudnn_tf32(false);
    tch::manual_seed(7);
    let x = Tensor::rand([1, 9, 20, 24], (Kind::Float, dev));
    let go = Tensor::randn([1, 24, 20, 24], (Kind::Float, dev));
    let net = stack_on(dev, Precision::Float32);
    let (grouped, _) = trunk(&net, &x, &go, false);
    let (columns, _) = trunk(&net, &x, &go, true);
    s3net_ops::set_stem_columns(false);
    s3net_ops::set_cudnn_tf32(tf32);
    let scales = [max_abs(&grouped[0]), max_abs(&grouped[1]), max_abs(&grouped[1])];
    for (i, name) in ["trunk output", "stem weight gradient", "stem bias gradient"].iter().enumerate() {
        let r = max_rel(&grouped[i], &columns[i], scales[i]);
        assert!(r < 1e-4, "CUDA float32: the {name} differs by {r:.1e} of its largest value");
    }
}
