//! HostCopy: the copy holds the values the tensor had when it was started, whatever is queued
//! after it, on the CPU and on a GPU.

use s3net_ops::HostCopy;
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;

fn snapshot_survives_later_work(device: Device) {
    let t = Tensor::arange(12, (Kind::Float, device)).view([3, 4]);
    let copy = HostCopy::start(&t.transpose(0, 1)).unwrap();
    // Work queued after the copy (on a GPU: on the same stream, still running when it lands).
    let mut t2 = t.shallow_clone();
    for _ in 0..20 {
        let _ = t2.g_add_scalar_(1.0);
    }
    let host = copy.wait().unwrap();
    assert_eq!(host.device(), Device::Cpu);
    assert_eq!(host.size(), [4, 3]);
    let want = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]).transpose(0, 1);
    assert_eq!(Vec::<f32>::try_from(host.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(want.contiguous().flatten(0, -1)).unwrap());
    assert_eq!(f64::try_from(t.sum(Kind::Float)).unwrap(), 66.0 + 12.0 * 20.0);
}

#[test]
fn cpu_copy_is_a_snapshot() {
    snapshot_survives_later_work(Device::Cpu);
}

#[test]
fn cuda_copy_is_a_snapshot() {
    if let Some(cuda) = checks::cuda_with_kernels() {
        snapshot_survives_later_work(cuda);
    }
}

/// A copy that is never waited for is freed cleanly.
#[test]
fn dropped_copy_is_freed() {
    let t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
    drop(HostCopy::start(&t).unwrap());
    if let Some(cuda) = checks::cuda_with_kernels() {
        drop(HostCopy::start(&t.to_device(cuda)).unwrap());
    }
}
