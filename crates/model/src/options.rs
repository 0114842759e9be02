//! Fit options and the named presets.
//!
//! One plain struct holds every knob of a fit, so a job can record exactly what it applied.
//! Presets fill it; callers then override single fields (iterations, seed, …).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Named starting points for [`FitOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// What measured best on the dev data (see README, "Choosing the default"): the authors'
    /// weights with the continuity term, which has a gradient, in place of their inert one.
    #[default]
    Default,
    /// The paper's text: λ = 1.2 / 0.3 / 0.3, lr 0.36, Sobel spatial term, random affine.
    Paper,
    /// The authors' public code: λ = 3.5 / 0.2 / 4, lr 0.2, a fixed 90° rotation, free per-pixel
    /// deformable offsets (but with the affine and spatial terms computed properly).
    Reference,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Default, Preset::Paper, Preset::Reference];
    pub fn as_str(&self) -> &'static str {
        match self {
            Preset::Default => "default",
            Preset::Paper => "paper",
            Preset::Reference => "reference",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Preset {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL.into_iter().find(|p| p.as_str() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "unknown preset '{s}': expected one of default, paper, reference"
            ))
        })
    }
}

/// Which spatial-consistency term to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpatialLoss {
    /// Paper eq. 5: L1 between the Sobel-x, Sobel-y and mixed-xy responses of the softmax map.
    Sobel,
    /// L1 of horizontal and vertical differences of the response map (Kim & Kanezaki 2020).
    Continuity,
}

/// Which side of the affine-consistency term trains the network. Both ask the same thing: that
/// the clustering of a transformed image be the transformed clustering of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AffineGradient {
    /// The paper's: T(x) goes through the network with its gradient, and its auxiliary head's
    /// prediction is trained towards T(argmax response(x)). Each step runs the trunk's backward
    /// for x and for T(x).
    #[default]
    Transformed,
    /// T(x) goes through the network forward only (no gradient, no activations kept), and the
    /// auxiliary head's prediction on x is trained towards T⁻¹(argmax response(T(x))): one
    /// backward pass per step instead of two.
    Original,
}

/// Where the deformable convolution's offsets and mask come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetMode {
    /// Predicted from the features by a zero-initialised 3×3 conv (mask through a sigmoid).
    Predicted,
    /// The authors' free per-pixel parameters of shape (1, 2·9, S, S) and (1, 9, S, S).
    Free,
}

/// How the S×S response map becomes a label map at the original resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upsample {
    /// Bilinear upsampling of the logits of the used clusters, argmax at full size.
    Logits,
    /// Nearest-neighbour upsampling of the S×S label map.
    Nearest,
}

/// Which implementation runs the depthwise and deformable convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// Our C++ kernels (crate `s3net-ops`) on CPU; libtorch's own depthwise conv on CUDA.
    Fused,
    /// libtorch tensor ops only: the test oracle and a fallback.
    TensorOps,
}

/// The number format of the activations (parameters, their gradients and the SGD update stay
/// float32 either way).
///
/// bfloat16 halves the bytes every feature map moves through memory, which is where a GPU's
/// time goes in a stack of fits (README, "Batching jobs"); its 8-bit mantissa is the price.
/// The loss terms always run in float32, on the response map cast back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Float32,
    Bfloat16,
}

impl FromStr for Precision {
    type Err = ModelError;
    /// "float32" (or empty: the default) or "bfloat16".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "float32" => Ok(Precision::Float32),
            "bfloat16" => Ok(Precision::Bfloat16),
            _ => Err(ModelError::InvalidArgument(format!(
                "unknown precision '{s}': expected float32 or bfloat16"
            ))),
        }
    }
}

impl Precision {
    /// The libtorch kind of the activations.
    pub fn kind(&self) -> tch::Kind {
        match self {
            Precision::Float32 => tch::Kind::Float,
            Precision::Bfloat16 => tch::Kind::BFloat16,
        }
    }
}

/// Ranges of the random affine transform of the affine-consistency term.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AffineRange {
    /// Rotation drawn uniformly in ±degrees.
    pub rotation_deg: f64,
    /// Isotropic scale drawn uniformly in [min, max].
    pub scale: (f64, f64),
    /// Shear drawn uniformly in ±degrees.
    pub shear_deg: f64,
    /// Translation drawn uniformly in ±fraction of the image side.
    pub translate: f64,
    /// Use a fixed 90° rotation instead of random draws (the authors' setting).
    pub rot90: bool,
}

/// Weights of the joint loss λ1·L_ce + λ2·L_at + λ3·L_s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub ce: f64,
    pub affine: f64,
    pub spatial: f64,
}

/// Everything a fit needs to know besides the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitOptions {
    pub preset: Preset,
    /// Feature channels F, also the number of clusters K.
    pub features: i64,
    /// Number of I-LKA blocks.
    pub blocks: usize,
    /// Maximum SGD steps.
    pub iterations: usize,
    /// Early stop once at most this many labels are in use (after 5 steps); 0 disables it.
    pub min_labels: usize,
    /// Side of the square grid the network runs on.
    pub size: i64,
    pub seed: u64,
    pub lr: f64,
    pub momentum: f64,
    pub weights: LossWeights,
    pub spatial: SpatialLoss,
    pub affine: AffineRange,
    pub offsets: OffsetMode,
    /// Grey images feed 1 channel, or are repeated to 3.
    pub grey_channels: i64,
    pub upsample: Upsample,
    pub kernels: Kernels,
    /// Activations in float32 (default) or bfloat16.
    #[serde(default)]
    pub precision: Precision,
    /// Which side of the affine-consistency term carries its gradient. (Options recorded before
    /// the field existed were all `transformed`.)
    #[serde(default)]
    pub affine_gradient: AffineGradient,
    /// The learning rate of the free offsets and mask (`offsets = free`), as a multiple of
    /// `lr`. Each of them belongs to one pixel, whose share of the losses (means over the S²
    /// pixels) is 1/S² of them: at 1 they hardly move (under 0.005 pixel in 50 steps at 256²),
    /// and the deformable conv samples a plain 3×3 grid. Ignored with predicted offsets, whose
    /// conv weights serve every pixel. (Options recorded before the field existed had 1.)
    #[serde(default = "unit")]
    pub offset_lr: f64,
}

fn unit() -> f64 {
    1.0
}

impl Default for FitOptions {
    fn default() -> Self {
        Self::preset(Preset::Default)
    }
}

impl FitOptions {
    /// The options of a named preset.
    pub fn preset(preset: Preset) -> Self {
        let random_affine = AffineRange {
            rotation_deg: 30.0,
            scale: (0.8, 1.2),
            shear_deg: 10.0,
            translate: 0.1,
            rot90: false,
        };
        let base = FitOptions {
            preset,
            features: 64,
            blocks: 2,
            iterations: 50,
            min_labels: 3,
            size: 256,
            seed: 0,
            lr: 0.36,
            momentum: 0.9,
            weights: LossWeights { ce: 1.2, affine: 0.3, spatial: 0.3 },
            spatial: SpatialLoss::Sobel,
            affine: random_affine,
            offsets: OffsetMode::Predicted,
            grey_channels: 1,
            upsample: Upsample::Logits,
            kernels: Kernels::Fused,
            precision: Precision::Float32,
            affine_gradient: AffineGradient::Transformed,
            offset_lr: 1.0,
        };
        match preset {
            Preset::Paper => base,
            Preset::Reference => FitOptions {
                lr: 0.2,
                weights: LossWeights { ce: 3.5, affine: 0.2, spatial: 4.0 },
                affine: AffineRange { rot90: true, ..random_affine },
                offsets: OffsetMode::Free,
                grey_channels: 3,
                ..base
            },
            // Measured on the dev data (README, "Choosing the default"): the authors' weights
            // and learning rate with the continuity term in place of eq. 5, the fixed 90°
            // rotation and free per-pixel offsets gave the best single-cluster Dice on PH2
            // (81.3 vs 72.9 with predicted offsets and random affines) at equal lung scores.
            // F = 32 rather than 64: the same Dice within seed noise over three seeds (PH2
            // oracle 77.9 vs 78.4, auto 88.0 vs 87.5; lung auto 96.0 vs 95.7) at 2.3× less
            // time per step on the CPU. The affine term trains the network on x, with T(x)
            // forward only: one backward pass per step, 10–15 % less time per CPU step, the same
            // Dice over three seeds (README, "Choosing the default").
            Preset::Default => FitOptions {
                features: 32,
                lr: 0.2,
                weights: LossWeights { ce: 3.5, affine: 0.2, spatial: 4.0 },
                spatial: SpatialLoss::Continuity,
                affine: AffineRange { rot90: true, ..random_affine },
                offsets: OffsetMode::Free,
                grey_channels: 3,
                affine_gradient: AffineGradient::Original,
                ..base
            },
        }
    }

    /// Rejects values that cannot work, with a message naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidArgument(m));
        if !(2..=256).contains(&self.features) {
            return bad(format!("features must be in 2..=256, got {}", self.features));
        }
        if self.blocks > 8 {
            return bad(format!("blocks must be at most 8, got {}", self.blocks));
        }
        if !(1..=1000).contains(&self.iterations) {
            return bad(format!("iterations must be in 1..=1000, got {}", self.iterations));
        }
        if self.min_labels as i64 > self.features {
            return bad(format!(
                "min_labels ({}) cannot exceed the number of clusters ({})",
                self.min_labels, self.features
            ));
        }
        if !(16..=1024).contains(&self.size) {
            return bad(format!("size must be in 16..=1024, got {}", self.size));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return bad(format!("lr must be in (0, 10], got {}", self.lr));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.offset_lr.is_finite() && self.offset_lr > 0.0 && self.offset_lr <= 1e6) {
            return bad(format!("offset_lr must be in (0, 1e6], got {}", self.offset_lr));
        }
        let w = self.weights;
        for (name, v) in [("ce", w.ce), ("affine", w.affine), ("spatial", w.spatial)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("loss weight {name} must be finite and >= 0, got {v}"));
            }
        }
        let a = self.affine;
        if !(a.scale.0 > 0.0 && a.scale.0 <= a.scale.1 && a.scale.1.is_finite()) {
            return bad(format!("affine scale range must be 0 < min <= max, got {:?}", a.scale));
        }
        if !(a.rotation_deg.is_finite() && a.shear_deg.is_finite() && a.translate.is_finite()) {
            return bad("affine ranges must be finite".into());
        }
        if self.precision == Precision::Bfloat16 && self.kernels == Kernels::TensorOps {
            // Measured: with libtorch's own bfloat16 convolutions the CPU fit's loss became NaN
            // within 10 steps in 6 of 8 runs; with the fused kernels (which add in float32) it
            // did not.
            return bad("precision bfloat16 needs kernels = fused (libtorch's bfloat16 convolutions diverged)".into());
        }
        if self.grey_channels != 1 && self.grey_channels != 3 {
            return bad(format!("grey_channels must be 1 or 3, got {}", self.grey_channels));
        }
        Ok(())
    }

    /// How a message about a job's size names it: "a fit on a S×S grid with F features", and
    /// " of a W×H image" when the image is known (the service's refusal and the CLI's warning
    /// about [`host_memory_estimate`](Self::host_memory_estimate)).
    pub fn describe(&self, image: Option<(u32, u32)>) -> String {
        let of = image.map_or(String::new(), |(w, h)| format!(" of a {w}×{h} image"));
        format!("a fit on a {0}×{0} grid with {1} features{of}", self.size, self.features)
    }

    /// About how much host memory one fit with these options of an image of `pixels` pixels
    /// (width × height; 0 for the fit alone) adds while it runs on the CPU, in bytes: an upper
    /// estimate, not a prediction.
    ///
    /// Why: the options a request may set span three orders of magnitude of memory (a 1024²
    /// grid with 256 features needs tens of GB), and on Linux a CPU fit that takes more than
    /// the machine has is not an error libtorch can report: the kernel's out-of-memory killer
    /// ends the whole process, every other job with it. A server compares this estimate with
    /// its budget before it queues a job (README, "The service").
    ///
    /// Measured (peak RSS of `s3net segment --iterations 3` less the 0.55 GB of a process
    /// that has loaded libtorch, 2-core EPYC, 2026-11-27): the default preset in float32 takes
    /// about S²·(128 + 128·F) bytes plus a fixed 0.2–0.6 GB (F = 32: 0.48 GB at 256²,
    /// 1.11 at 512², 4.53 at 1024²; 512² with F = 128: 4.37 GB); the affine term's gradient
    /// through T(x) (the paper preset) about twice that, bfloat16 activations about 0.7 of it.
    /// The image at its own resolution (decoded samples, the label map read off at full size,
    /// the foreground rule's full-resolution pass, the output PNGs) took 7–18 bytes per pixel
    /// more (2026-11-28, after its copies were removed: 12–33 before): 16-bit grey 0.48 GB at
    /// 5000² and 1.14 GB at 10000² all told, 8-bit colour 0.71 and 1.75 GB. The estimate is
    /// S²·(128 + 128·F) plus 0.4 GB, scaled for those and for the blocks, plus 12 bytes per
    /// pixel, with a quarter more on top: 1.1 to 2.9 times each measured fit.
    pub fn host_memory_estimate(&self, pixels: u64) -> u64 {
        let grid = (self.size * self.size) as f64;
        let per_pixel = 128.0 + 128.0 * self.features as f64;
        let mut bytes = grid * per_pixel * (self.blocks as f64 + 2.0) / 4.0;
        if self.affine_gradient == AffineGradient::Transformed && self.weights.affine > 0.0 {
            bytes *= 2.0;
        }
        if self.precision == Precision::Bfloat16 {
            bytes *= 0.75;
        }
        (1.25 * (bytes + 0.4e9 + 12.0 * pixels as f64)) as u64
    }
}

/// Where a fit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeviceSpec {
    /// The first CUDA device when one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" | "" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    ModelError::InvalidArgument(format!(
                        "unknown device '{s}': expected auto, cpu or cuda:N"
                    ))
                }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Resolves to a libtorch device, failing clearly when the asked GPU does not exist.
    pub fn resolve(&self) -> Result<tch::Device, ModelError> {
        match *self {
            DeviceSpec::Auto => Ok(tch::Device::cuda_if_available()),
            DeviceSpec::Cpu => Ok(tch::Device::Cpu),
            DeviceSpec::Cuda(i) => {
                let n = tch::Cuda::device_count() as usize;
                if i < n {
                    Ok(tch::Device::Cuda(i))
                } else {
                    Err(ModelError::InvalidArgument(format!(
                        "device cuda:{i} requested but {n} CUDA device(s) are available"
                    )))
                }
            }
        }
    }
}

/// Number of CUDA devices libtorch sees (0 on a CPU-only machine).
pub fn cuda_device_count() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// Caps the memory this process's fits may hold on `cuda:device` at `fraction` (in (0, 1]) of
/// the device's memory; beyond it an allocation fails as out of memory, and a batch then
/// starts its jobs over in smaller stacks (see [`crate::Batch`]). For a GPU shared with other
/// services.
pub fn set_cuda_memory_fraction(device: usize, fraction: f64) -> Result<(), crate::ModelError> {
    Ok(s3net_ops::set_cuda_memory_fraction(device, fraction)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate covers every fit measured for it, with a tenth to spare (peak RSS of
    /// `s3net segment --iterations 3` less the 0.55 GB of a process with libtorch loaded, this
    /// repository's 2-core EPYC, 2026-11-27), without being more than 3 times any of them.
    #[test]
    fn host_memory_estimate_covers_the_measured_fits() {
        let base = 0.55e9;
        let default = FitOptions::default();
        let paper = FitOptions::preset(Preset::Paper);
        let bf16 = FitOptions { precision: Precision::Bfloat16, ..default.clone() };
        // (options, size, features, peak RSS in kB), all of the 765×572 PH2 image IMD002
        let measured: [(&FitOptions, i64, i64, f64); 15] = [
            (&default, 256, 32, 1_007_404.0),
            (&default, 256, 64, 1_501_260.0),
            (&default, 256, 128, 1_626_004.0),
            (&default, 512, 32, 1_619_360.0),
            (&default, 512, 64, 2_773_716.0),
            (&default, 512, 128, 4_802_720.0),
            (&default, 768, 32, 3_084_840.0),
            (&default, 768, 64, 5_283_276.0),
            (&default, 1024, 32, 4_959_556.0),
            (&default, 128, 256, 1_417_324.0),
            (&default, 256, 256, 2_786_332.0),
            (&bf16, 256, 32, 866_744.0),
            (&bf16, 512, 64, 1_995_596.0),
            (&paper, 256, 32, 1_327_048.0),
            (&paper, 512, 64, 4_646_992.0),
        ];
        for (o, size, features, kb) in measured {
            let o = FitOptions { size, features, ..o.clone() };
            let used = kb * 1024.0 - base;
            let est = o.host_memory_estimate(765 * 572) as f64;
            assert!(est >= 1.1 * used && est <= 2.5 * used, "{:?} {size}² F {features}: estimate {est:e} for {used:e}", o.preset);
        }
        // Large images at the default options, fitted for one step: (side, peak RSS in kB).
        // Colour (8-bit RGB) and 16-bit grey PNGs, `s3net segment --iterations 1`, 2026-11-28
        // (before the image's copies were removed: 1_532_604, 1_311_128, 4_172_688, 2_541_716).
        for (side, kb) in [(5000, 1_229_884.0), (5000, 1_001_812.0), (10_000, 2_246_304.0), (10_000, 1_647_064.0)] {
            let used = kb * 1024.0 - base;
            let est = default.host_memory_estimate(side * side) as f64;
            assert!(est >= 1.1 * used && est <= 3.0 * used, "{side}²: estimate {est:e} for {used:e}");
        }
    }

    #[test]
    fn host_memory_estimate_grows_with_what_costs_memory() {
        let o = FitOptions::default();
        let with = |f: &dyn Fn(&mut FitOptions)| {
            let mut p = o.clone();
            f(&mut p);
            p.host_memory_estimate(512 * 512)
        };
        let e = o.host_memory_estimate(512 * 512);
        // A 10000² image adds more than a gigabyte (1.1–1.75 GB measured, grey and colour).
        assert!(o.host_memory_estimate(10_000 * 10_000) > o.host_memory_estimate(0) + 1_000_000_000);
        assert!(o.host_memory_estimate(0) < e);
        assert!(with(&|p| p.size = 512) > 2 * e);
        assert!(with(&|p| p.features = 64) > e);
        assert!(with(&|p| p.blocks = 4) > e);
        assert!(with(&|p| p.precision = Precision::Bfloat16) < e);
        // 1024² with 256 features: far beyond most hosts.
        assert!(with(&|p| {
            p.size = 1024;
            p.features = 256
        }) > 40_000_000_000);
    }
}
