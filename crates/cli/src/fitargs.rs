//! Fit options shared by `segment`, `eval` and `bench`.

use anyhow::{Context, Result};
use clap::Args;
use s3net_imaging::Window;
use s3net_model::options::{AffineGradient, Kernels, OffsetMode, SpatialLoss, Upsample};
use s3net_model::{DeviceSpec, FitOptions, Preset};

#[derive(Args, Debug, Clone)]
pub struct FitArgs {
    /// default | paper | reference
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// Maximum SGD steps.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Early stop at this many labels (0 disables).
    #[arg(long)]
    pub min_labels: Option<usize>,
    /// Side of the square grid the network runs on.
    #[arg(long)]
    pub size: Option<i64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// auto | cpu | cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Intensity window "CENTER,WIDTH" in the image's units (e.g. HU for CT).
    #[arg(long, allow_hyphen_values = true)]
    pub window: Option<String>,
    /// Feature channels F (= clusters K).
    #[arg(long)]
    pub features: Option<i64>,
    /// float32 | bfloat16: the number format of the network's activations.
    #[arg(long)]
    pub precision: Option<String>,
    // Tuning knobs, hidden from --help's first screen but documented in the README.
    #[arg(long, hide = true)]
    pub lr: Option<f64>,
    /// The free offsets' and mask's learning rate as a multiple of --lr.
    #[arg(long, hide = true)]
    pub offset_lr: Option<f64>,
    #[arg(long, hide = true)]
    pub blocks: Option<usize>,
    #[arg(long, hide = true)]
    pub w_ce: Option<f64>,
    #[arg(long, hide = true)]
    pub w_affine: Option<f64>,
    #[arg(long, hide = true)]
    pub w_spatial: Option<f64>,
    /// sobel | continuity
    #[arg(long, hide = true)]
    pub spatial: Option<String>,
    #[arg(long, hide = true)]
    pub grey_channels: Option<i64>,
    /// logits | nearest
    #[arg(long, hide = true)]
    pub upsample: Option<String>,
    /// predicted | free
    #[arg(long, hide = true)]
    pub offsets: Option<String>,
    /// Use the fixed 90° rotation (true) or random affine draws (false).
    #[arg(long, hide = true)]
    pub rot90: Option<bool>,
    /// fused | tensor_ops
    #[arg(long, hide = true)]
    pub kernels: Option<String>,
    /// transformed | original: which side of the affine-consistency term carries its gradient.
    #[arg(long, hide = true)]
    pub affine_gradient: Option<String>,
}

impl FitArgs {
    /// The options of the preset with every given flag applied, validated.
    pub fn options(&self) -> Result<FitOptions> {
        let preset: Preset = self.preset.parse()?;
        let mut o = FitOptions::preset(preset);
        if let Some(v) = self.iterations { o.iterations = v; }
        if let Some(v) = self.min_labels { o.min_labels = v; }
        if let Some(v) = self.size { o.size = v; }
        if let Some(v) = self.seed { o.seed = v; }
        if let Some(v) = self.features { o.features = v; }
        if let Some(v) = self.lr { o.lr = v; }
        if let Some(v) = self.offset_lr { o.offset_lr = v; }
        if let Some(v) = self.blocks { o.blocks = v; }
        if let Some(v) = self.w_ce { o.weights.ce = v; }
        if let Some(v) = self.w_affine { o.weights.affine = v; }
        if let Some(v) = self.w_spatial { o.weights.spatial = v; }
        if let Some(v) = self.grey_channels { o.grey_channels = v; }
        if let Some(v) = self.rot90 { o.affine.rot90 = v; }
        if let Some(s) = &self.kernels {
            o.kernels = match s.as_str() {
                "fused" => Kernels::Fused,
                "tensor_ops" => Kernels::TensorOps,
                _ => anyhow::bail!("unknown --kernels '{s}': expected fused or tensor_ops"),
            };
        }
        if let Some(s) = &self.precision {
            o.precision = s.parse()?;
        }
        if let Some(s) = &self.spatial {
            o.spatial = match s.as_str() {
                "sobel" => SpatialLoss::Sobel,
                "continuity" => SpatialLoss::Continuity,
                _ => anyhow::bail!("unknown --spatial '{s}': expected sobel or continuity"),
            };
        }
        if let Some(s) = &self.upsample {
            o.upsample = match s.as_str() {
                "logits" => Upsample::Logits,
                "nearest" => Upsample::Nearest,
                _ => anyhow::bail!("unknown --upsample '{s}': expected logits or nearest"),
            };
        }
        if let Some(s) = &self.affine_gradient {
            o.affine_gradient = match s.as_str() {
                "transformed" => AffineGradient::Transformed,
                "original" => AffineGradient::Original,
                _ => anyhow::bail!("unknown --affine-gradient '{s}': expected transformed or original"),
            };
        }
        if let Some(s) = &self.offsets {
            o.offsets = match s.as_str() {
                "predicted" => OffsetMode::Predicted,
                "free" => OffsetMode::Free,
                _ => anyhow::bail!("unknown --offsets '{s}': expected predicted or free"),
            };
        }
        o.validate()?;
        Ok(o)
    }

    pub fn device(&self) -> Result<DeviceSpec> {
        Ok(self.device.parse()?)
    }

    pub fn window(&self) -> Result<Option<Window>> {
        self.window
            .as_deref()
            .map(|s| s.parse::<Window>().with_context(|| format!("bad --window '{s}' (expected CENTER,WIDTH, e.g. -600,1500)")))
            .transpose()
    }
}
