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
//! * [`options`] — every knob, and the presets; [`warm`] — a worker's warm-up before its first job

pub mod affine;
pub mod deform;
pub mod fit;
pub mod foreground;
pub mod loss;
pub mod net;
pub mod options;
pub mod rng;
pub mod warm;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use fit::{fit, panic_message, set_cuda_graph_max_models, set_cuda_graphs, Batch, FitJob, FitOutput, LossTerms, Progress};
pub use warm::{warm_up, StepCost, WarmUp};
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
    /// The device ran out of memory for this fit alone (libtorch's message: CUDA's "out of
    /// memory", the CPU allocator's "can't allocate memory"). Apart from [`ModelError::Torch`]
    /// because it is not a fault: the job is too large for what the device has free now.
    #[error("out of memory: {0}; ask for a smaller size or fewer features, or retry when the device is less busy")]
    OutOfMemory(String),
    /// libtorch raised an error (a kernel failure, a shape error, …).
    #[error("libtorch error: {0}")]
    Torch(String),
}

impl ModelError {
    /// A libtorch failure from its message: [`ModelError::OutOfMemory`] when it says so, else
    /// [`ModelError::Torch`]; the message cut to its first readable line.
    pub fn from_torch(msg: &str) -> ModelError {
        let line = fit::first_line(msg);
        let lower = line.to_ascii_lowercase();
        if ["out of memory", "can't allocate memory", "cannot allocate memory"].iter().any(|m| lower.contains(m)) {
            ModelError::OutOfMemory(line)
        } else {
            ModelError::Torch(line)
        }
    }
}

impl From<s3net_ops::OpError> for ModelError {
    fn from(e: s3net_ops::OpError) -> Self {
        ModelError::from_torch(&e.0)
    }
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        ModelError::from_torch(&e.to_string())
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
    /// Fits made before this one because their foreground came out empty (see
    /// [`refit_options`]).
    pub refits: usize,
}

/// Fits the image and selects its foreground: the one call the CLI and the service make. A fit
/// whose foreground comes out empty is made again with another seed, [`FOREGROUND_REFITS`]
/// times at most (see [`refit_options`]); its progress then counts as the next attempt.
pub fn segment(
    image: &Arc<Image>,
    opts: &FitOptions,
    device: DeviceSpec,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Segmentation, ModelError> {
    segment_with(image, opts, device, FOREGROUND_REFITS, progress, cancel)
}

/// [`segment`] with at most `max_refits` refits: 0 makes exactly one fit (what a benchmark
/// times).
pub fn segment_with(
    image: &Arc<Image>,
    opts: &FitOptions,
    device: DeviceSpec,
    max_refits: usize,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<Segmentation, ModelError> {
    let dev = device.resolve()?;
    let (mut o, mut attempt, mut refits) = (opts.clone(), 1, 0);
    loop {
        let fit = fit::fit_as(image, &o, dev, attempt, progress, cancel)?;
        let mut seg = Segmentation::of(image, fit);
        seg.refits = refits;
        match refit_options(&seg, opts, refits, max_refits) {
            Some(next) => {
                tracing::info!(seed = next.seed, attempt = attempt + 1, "the foreground came out empty; fitting again with another seed");
                (o, attempt, refits) = (next, attempt + 1, refits + 1);
            }
            None => return Ok(seg),
        }
    }
}

/// How many times [`segment`] (and, unless configured otherwise, the service) fits an image
/// whose foreground comes out empty again, each time with another seed. Why: a fit can merge
/// the object with its surroundings (a lung slice's fit merged its lungs with other tissue in
/// two of seven GPU runs, leaving the foreground rule nothing to pick, while the other runs
/// found both lungs); an empty mask is the one failure the service can see without ground
/// truth. Once, because an image may truly have no dark object inside it (a slice below the
/// lungs), and that costs a second fit.
pub const FOREGROUND_REFITS: usize = 1;

/// The options of the next fit of an image whose segmentation `seg` came out with an empty
/// foreground after `refits` refits: `opts` (the job's own) with the seed of refit
/// `refits + 1`; `None` when the foreground is not empty or `max_refits` are used up. A pure
/// function of its arguments, so the same request gives the same result every time.
pub fn refit_options(seg: &Segmentation, opts: &FitOptions, refits: usize, max_refits: usize) -> Option<FitOptions> {
    if refits >= max_refits || seg.grid_mask.iter().any(|&f| f) {
        return None;
    }
    // An odd constant unrelated to SplitMix64's increment: seed + k·increment would give the
    // same weight stream shifted by k draws.
    const STEP: u64 = 0xD1B5_4A32_D192_ED03;
    let seed = opts.seed.wrapping_add(STEP.wrapping_mul(refits as u64 + 1));
    Some(FitOptions { seed, ..opts.clone() })
}

impl Segmentation {
    /// The foreground of a finished fit of `image` (e.g. one that came out of a [`Batch`]).
    pub fn of(image: &Image, fit: FitOutput) -> Segmentation {
        let grid_mask = foreground::select(&fit.grid_labels, &fit.grid_intensity, image.kind);
        let (gw, gh) = (fit.grid_labels.width, fit.grid_labels.height);
        let mask = foreground::full_mask(&grid_mask, gw, gh, &fit.grid_intensity, image);
        Segmentation { fit, mask, grid_mask, refits: 0 }
    }
}
