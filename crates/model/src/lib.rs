//! S3-Net: self-supervised segmentation of a single image.
//!
//! A small CNN is trained from scratch on one image for a few dozen SGD steps; its K-channel
//! response map is clustered by argmax and the network learns to agree with its own argmax,
//! with affine- and spatial-consistency terms (Karimijafarbigloo et al., ICCV 2023 CVAMD,
//! arXiv 2309.00143). [`segment`] is the one call a service needs: it fits, then picks a
//! foreground mask without any ground truth.
//!
//! * [`deform`] — the modulated deformable convolution (torchvision semantics)
//! * [`net`] — the network; [`loss`] — the loss terms; [`affine`] — random transforms
//! * [`fit`] — the training loop, for one image or a [`Batch`] of many; [`foreground`] — the ground-truth-free foreground rule
//! * [`options`] — every knob, and the presets

pub mod affine;
pub mod deform;
pub mod fit;
pub mod foreground;
pub mod loss;
pub mod net;
pub mod options;
pub mod rng;

use std::sync::atomic::AtomicBool;

pub use fit::{fit, set_cuda_graphs, Batch, FitJob, FitOutput, LossTerms, Progress};
pub use options::{cuda_device_count, set_cuda_memory_fraction, DeviceSpec, FitOptions, Preset};
pub use s3net_imaging::{Image, ImageKind, LabelMap};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The caller asked for something that cannot work (bad option, bad shape).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The cancellation flag was raised.
    #[error("fit cancelled")]
    Cancelled,
    /// The loss became NaN or infinite.
    #[error("fit diverged at iteration {iteration} (loss is not finite); try a lower learning rate")]
    Diverged { iteration: usize },
    /// libtorch raised an error (CUDA out of memory, a kernel failure, …).
    #[error("libtorch error: {0}")]
    Torch(String),
}

impl From<s3net_ops::OpError> for ModelError {
    fn from(e: s3net_ops::OpError) -> Self {
        ModelError::Torch(fit::first_line(&e.0))
    }
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        ModelError::Torch(fit::first_line(&e.to_string()))
    }
}

/// Tunes glibc's allocator for repeated fits; call once at process start.
///
/// A fit allocates and frees 16–50 MB activation buffers hundreds of times. By default glibc
/// serves these with fresh `mmap`s and returns them on `free`, so every step pays millions of
/// page faults zeroing new pages (measured: ~10 % of a CPU step). Keeping such blocks in the
/// heap and not trimming it makes the memory reusable. RSS then stays at its peak, which a
/// long-running service reaches after its first fit anyway.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 512 << 20);
    }
}

/// A fit plus the foreground mask chosen from its clusters.
#[derive(Debug, Clone)]
pub struct Segmentation {
    pub fit: FitOutput,
    /// Foreground at the original resolution, row-major.
    pub mask: Vec<bool>,
    /// Foreground on the S×S grid the network ran on.
    pub grid_mask: Vec<bool>,
}

/// Fits the image and selects its foreground: the one call the CLI and the service make.
pub fn segment(
    image: &Image,
    opts: &FitOptions,
    device: DeviceSpec,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Segmentation, ModelError> {
    let dev = device.resolve()?;
    let fit = fit(image, opts, dev, progress, cancel)?;
    Ok(Segmentation::of(image, fit))
}

impl Segmentation {
    /// The foreground of a finished fit of `image` (e.g. one that came out of a [`Batch`]).
    pub fn of(image: &Image, fit: FitOutput) -> Segmentation {
        let grid_mask = foreground::select(&fit.grid_labels, &fit.grid_intensity, image.kind);
        let (gw, gh) = (fit.grid_labels.width, fit.grid_labels.height);
        let mask = foreground::upsample_mask(&grid_mask, gw, gh, image.width, image.height);
        Segmentation { fit, mask, grid_mask }
    }
}
