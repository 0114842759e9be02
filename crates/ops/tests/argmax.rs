//! argmax_channels against libtorch's `argmax(1)`: the same labels to the last pixel, ties
//! (the first maximum) and NaNs (a NaN beats any number) included, on the CPU kernel (float32,
//! float64, bfloat16; its AVX2 and baseline loops), on layouts it must copy first, on
//! libtorch's path (other types, the emulated GPU paths, a GPU) and for bad shapes.

use s3net_ops::argmax_channels;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;

/// Values drawn from a handful of integers, so that most pixels have tied maxima.
fn tied(shape: &[i64], kind: Kind, dev: Device) -> Tensor {
    Tensor::randint(4, shape, (Kind::Int64, dev)).to_kind(kind)
}

fn same_as_libtorch(x: &Tensor, tag: &str) {
    let ours = argmax_channels(x).unwrap();
    let theirs = x.argmax(1, false);
    assert_eq!(ours.kind(), Kind::Int64, "{tag}");
    assert_eq!(ours.size(), theirs.size(), "{tag}");
    assert!(ours.equal(&theirs), "{tag}: labels differ at {} pixels", ours.ne_tensor(&theirs).sum(Kind::Int64).int64_value(&[]));
}

fn cases(dev: Device, kinds: &[Kind]) {
    // A fit's map; pixel counts that are not whole chunks; one channel; one pixel.
    let shapes: [&[i64]; 6] = [&[1, 32, 256, 256], &[2, 5, 33, 37], &[3, 1, 8, 8], &[1, 7, 1, 1], &[2, 3, 40, 30], &[1, 300, 3, 5]];
    for &kind in kinds {
        for shape in shapes {
            same_as_libtorch(&Tensor::randn(shape, (Kind::Float, dev)).to_kind(kind), &format!("{dev:?} {kind:?} {shape:?} random"));
            same_as_libtorch(&tied(shape, kind, dev), &format!("{dev:?} {kind:?} {shape:?} ties"));
        }
        // NaNs: alone, several in one pixel, after and before a larger number.
        let x = Tensor::randn([2, 6, 9, 11], (Kind::Float, dev)).to_kind(kind);
        let nan = Tensor::full([], f64::NAN, (kind, dev));
        let mask = Tensor::rand([2, 6, 9, 11], (Kind::Float, dev)).lt(0.15);
        same_as_libtorch(&x.where_self(&mask.logical_not(), &nan), &format!("{dev:?} {kind:?} NaNs"));
        // Channels-last storage and a strided view: copied to the kernel's layout first.
        let cl = tied(&[2, 8, 16, 12], kind, dev).permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        same_as_libtorch(&cl, &format!("{dev:?} {kind:?} channels-last"));
        let view = tied(&[2, 8, 16, 12], kind, dev).narrow(1, 2, 5).narrow(3, 1, 9);
        same_as_libtorch(&view, &format!("{dev:?} {kind:?} view"));
    }
}

#[test]
fn matches_libtorch_on_cpu() {
    tch::manual_seed(41);
    cases(Device::Cpu, &[Kind::Float, Kind::Double, Kind::BFloat16]);
    // Types without our kernel go to libtorch's.
    cases(Device::Cpu, &[Kind::Half]);
    same_as_libtorch(&Tensor::randint(9, [2, 4, 5, 5], (Kind::Int64, Device::Cpu)), "int64");
    // An empty batch.
    assert_eq!(argmax_channels(&Tensor::zeros([0, 3, 4, 4], (Kind::Float, Device::Cpu))).unwrap().size(), [0, 4, 4]);
}

/// The CPU kernel's baseline x86-64 loop (the AVX2 one runs above wherever the CPU has it):
/// the comparison again in a child process with `S3OPS_NO_AVX2=1`, which the kernels read once.
#[test]
fn baseline_loop_matches_libtorch_too() {
    if std::env::var_os("S3OPS_NO_AVX2").is_some() {
        return; // this is the child
    }
    checks::rerun_with_env(&["S3OPS_NO_AVX2"], &["matches_libtorch_on_cpu", "--exact"], "1 passed");
}

/// Inside the emulated GPU paths the op is libtorch's argmax, as on a GPU.
#[test]
fn emulated_gpu_paths_take_libtorch() {
    tch::manual_seed(42);
    s3net_ops::emulated_cuda(|| cases(Device::Cpu, &[Kind::Float, Kind::BFloat16]));
}

#[test]
fn cuda_matches_libtorch_when_present() {
    let Some(cuda) = checks::cuda_device() else { return };
    tch::manual_seed(43);
    cases(cuda, &[Kind::Float, Kind::BFloat16]);
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let e = argmax_channels(&Tensor::zeros([3, 4, 4], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("input must be 4-D (N, K, H, W)"), "{e}");
    let e = argmax_channels(&Tensor::zeros([1, 0, 4, 4], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("input has no channels"), "{e}");
}
