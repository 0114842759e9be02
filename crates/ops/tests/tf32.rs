//! set_cudnn_tf32: the setting reads back as set, starts at libtorch's default (TF32 on), and
//! on a GPU it reaches cuDNN: with TF32 off a float32 convolution matches float64 to float32's
//! rounding. Its own test binary: the setting is the whole process's.

use s3net_ops::set_cudnn_tf32;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;

/// Largest difference between a float32 convolution on `dev` and the float64 one on the CPU,
/// relative to the largest output.
fn conv_error(dev: Device) -> f64 {
    tch::manual_seed(7);
    let x = Tensor::randn([1, 64, 48, 48], (Kind::Double, Device::Cpu));
    let w = Tensor::randn([64, 64, 3, 3], (Kind::Double, Device::Cpu));
    let exact = x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    let got = x.to_kind(Kind::Float).to(dev).conv2d(&w.to_kind(Kind::Float).to(dev), None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    let diff = (got.to(Device::Cpu).to_kind(Kind::Double) - &exact).abs().max().double_value(&[]);
    diff / exact.abs().max().double_value(&[])
}

/// One test, not two: the setting is the process's, and tests run on threads side by side.
#[test]
fn the_setting_reads_back_and_reaches_cuda_convolutions() {
    let was = set_cudnn_tf32(false);
    assert!(was, "libtorch lets cuDNN use TF32 by default");
    assert!(!set_cudnn_tf32(true), "off was not kept");
    assert!(set_cudnn_tf32(true), "on was not kept");
    let Some(cuda) = checks::cuda_device() else { return };
    let tf32 = conv_error(cuda);
    set_cudnn_tf32(false);
    let full = conv_error(cuda);
    set_cudnn_tf32(true);
    eprintln!("float32 convolution against float64, relative: TF32 {tf32:.1e}, full {full:.1e}");
    // 576 products a sum: float32 rounding stays near 1e-7 of the largest output, TF32's near 1e-4.
    assert!(full < 1e-5, "with TF32 off the convolution is off by {full:.1e} (TF32 on: {tf32:.1e})");
}
