//! Argument checks the ops share, so that they reject the same inputs with the same messages
//! before anything crosses into C++.

use tch::{Device, Kind, Tensor};

use crate::{cuda_compiled, OpError};

/// An op's error for a device it has no kernel on: CUDA in a build without nvcc (callers fall
/// back to libtorch's ops then), or a device other than the CPU and CUDA.
pub(crate) fn check_kernel_device(name: &str, device: Device) -> Result<(), OpError> {
    if device.is_cuda() && !cuda_compiled() {
        return Err(OpError(format!(
            "{name}: this build has no CUDA kernel (nvcc was not found when it was compiled)"
        )));
    }
    if device != Device::Cpu && !device.is_cuda() {
        return Err(OpError(format!("{name}: unsupported device {device:?}")));
    }
    Ok(())
}

/// Checks the input and every operand given (`None` skipped) with [`check_float`] against the
/// input's dtype and device, in order.
pub(crate) fn check_floats(name: &str, input: &Tensor, operands: &[(&str, Option<&Tensor>)]) -> Result<(), OpError> {
    let (kind, device) = (input.kind(), input.device());
    check_float(name, "input", input, kind, device)?;
    for (what, t) in operands {
        if let Some(t) = t {
            check_float(name, what, t, kind, device)?;
        }
    }
    Ok(())
}

pub(crate) fn check_float(
    name: &str,
    what: &str,
    t: &Tensor,
    kind: Kind,
    device: Device,
) -> Result<(), OpError> {
    if !matches!(t.kind(), Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half) {
        return Err(OpError(format!(
            "{name}: {what} must be float32, float64, bfloat16 or float16, got {:?}",
            t.kind()
        )));
    }
    if t.kind() != kind {
        return Err(OpError(format!(
            "{name}: {what} is {:?} but the input is {kind:?}",
            t.kind()
        )));
    }
    if t.device() != device {
        return Err(OpError(format!(
            "{name}: {what} is on {:?} but the input is on {device:?}",
            t.device()
        )));
    }
    Ok(())
}
