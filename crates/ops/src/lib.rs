//! Fast kernels for s3net, written in C++ against libtorch (`csrc/<op>.cpp`, one file per op)
//! and CUDA (`csrc/<op>_cuda.cu`, built when nvcc is found; see `build.rs`). Each op's Rust
//! side is the module of the same name.
//!
//! * [`depthwise_conv2d`] — stride-1 depthwise convolution with padding and dilation, on CPU
//!   and (when [`cuda_compiled`]) CUDA.
//! * [`deform_conv2d`] — modulated deformable convolution (DCNv2) with exactly the semantics of
//!   `torchvision.ops.deform_conv2d`, on CPU and (when [`cuda_compiled`]) CUDA.
//! * [`depthwise_branches`] — the I-LKA block's three parallel depthwise convolutions,
//!   concatenated, as one op (no concatenation's copies).
//! * [`pointwise_conv2d`] — a stack of independent 1×1 convolutions with a GPU-friendly weight
//!   gradient, and a CPU kernel on NCHW planes (no layout reorders);
//!   [`pointwise_conv2d_then`] the same with a residual added or a gate applied in the same
//!   pass.
//! * [`plane_norm`] — BatchNorm with each image's own statistics.
//! * [`argmax_channels`] — the argmax over the channel axis (a fit's clustering).
//! * [`pixel_losses`] — per image, cross-entropy against a target or the map's own argmax and
//!   the continuity term, with their gradient, in one pass each way.
//! * [`sgd_step`] — momentum SGD over all parameters in a few multi-tensor launches.
//! * [`use_pool_stream`] / [`use_default_stream`] — per-thread CUDA streams, so concurrent
//!   fits on one GPU overlap.
//! * [`Trace`] — libtorch's operator-level profiler, kernels linked to their ops.
//! * [`HostCopy`] — a copy to the host that does not wait for work queued after it.
//! * [`CudaGraph`] — capture a step's kernels once, replay them with one call.
//! * [`emulated_cuda`] — the ops' CUDA paths run on CPU tensors, their kernels emulated on the
//!   CPU, for testing the kernels where no GPU is.
//!
//! Each op is a `torch::autograd::Function` with its own backward, so gradients flow through it
//! with tch's ordinary `backward()`. Every C++ exception is caught at the C boundary and comes
//! back as an [`OpError`]; nothing here panics or aborts on bad arguments.

mod args;
mod cuda;
mod deform;
mod depthwise;
mod emulation;
mod ffi;
mod losses;
mod norm;
mod pointwise;
mod sgd;
mod switches;
mod trace;

pub use cuda::{cuda_reserved_bytes, set_cuda_memory_fraction, set_cudnn_tf32, use_default_stream, use_pool_stream, CudaGraph, HostCopy};
pub use deform::{check_deform_args, deform_conv2d};
pub use depthwise::{depthwise_branches, depthwise_columns, depthwise_conv2d, set_depthwise_columns, Branch};
pub use emulation::{cuda_compiled, emulated_cuda, emulated_launches, emulating_cuda, gpu_paths};
pub use losses::{argmax_channels, cuda_pixel_losses, pixel_losses, set_cuda_pixel_losses, PixelLosses};
pub use norm::plane_norm;
pub use pointwise::{fused_epilogues, pointwise_conv2d, pointwise_conv2d_then, set_fused_epilogues, set_split_k, set_split_k_kernel, set_stem_columns, split_k_kernel, stem_columns, SplitK, Then};
pub use sgd::{fused_sgd, set_fused_sgd, sgd_step};
pub use trace::Trace;

/// Error from a C++ kernel (or from argument validation).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpError(pub String);
