//! The per-image self-supervised fit: train a fresh network on one image until its argmax
//! clustering settles, then read the clusters off at the image's own resolution.
//!
//! The loop knows nothing of gRPC or files: it takes an [`Image`], options, a progress callback
//! and a cancellation flag, and returns label maps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use s3net_imaging::{Image, LabelMap};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::affine::{inside, warp, Affine};
use crate::loss::{continuity, masked_ce, self_ce, sobel_spatial, IGNORE};
use crate::net::S3Net;
use crate::options::{FitOptions, Kernels, SpatialLoss, Upsample};
use crate::rng::SplitMix64;
use crate::ModelError;

/// The value of each loss term (already weighted terms sum to `total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossTerms {
    pub total: f64,
    pub ce: f64,
    pub affine: f64,
    pub spatial: f64,
}

/// What the progress callback sees after each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// 1-based step just finished.
    pub iteration: usize,
    pub max_iterations: usize,
    pub losses: LossTerms,
    /// Clusters in use in the argmax map of this step.
    pub labels: usize,
    pub elapsed: Duration,
}

/// The result of a fit.
#[derive(Debug, Clone)]
pub struct FitOutput {
    /// Labels at the original resolution, renumbered 0..n−1 by decreasing pixel count; every
    /// label below `n_labels` occurs.
    pub labels: LabelMap,
    /// The same clusters on the S×S grid the network ran on (same numbering; a cluster too
    /// small to survive the resize to the original size appears here only, numbered ≥ n_labels).
    pub grid_labels: LabelMap,
    /// The input as the network saw it: S×S, grey (channel mean), in [0, 1].
    pub grid_intensity: Vec<f32>,
    pub n_labels: usize,
    pub iterations: usize,
    pub losses: LossTerms,
    pub fit_seconds: f64,
    /// The libtorch device it ran on, e.g. "cpu" or "cuda:0".
    pub device: String,
}

/// Fits S3-Net to one image.
///
/// `progress` is called after every step; `cancel` is checked before every step and makes the
/// fit return [`ModelError::Cancelled`]. Errors raised inside libtorch (including CUDA out of
/// memory) come back as [`ModelError::Torch`]; they never unwind into the caller.
pub fn fit(
    image: &Image,
    opts: &FitOptions,
    device: Device,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<FitOutput, ModelError> {
    opts.validate()?;
    check_image(image)?;
    let run = std::panic::AssertUnwindSafe(|| fit_inner(image, opts, device, progress, cancel));
    match std::panic::catch_unwind(run) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown libtorch failure");
            Err(ModelError::Torch(first_line(msg)))
        }
    }
}

/// libtorch errors arrive as a panic message wrapping the C++ message and its backtrace; keep
/// only the part a user can read.
fn first_line(msg: &str) -> String {
    let msg = msg.trim();
    let msg = msg.split_once("Torch(\"").map_or(msg, |(_, rest)| rest);
    let cut = msg.find("Exception raised from").unwrap_or(msg.len());
    let msg = msg[..cut].replace("\\n", " ");
    msg.trim().trim_end_matches("\")").trim().to_string()
}

fn check_image(image: &Image) -> Result<(), ModelError> {
    let (w, h, c) = (image.width as usize, image.height as usize, image.channels as usize);
    if w == 0 || h == 0 {
        return Err(ModelError::InvalidArgument(format!("image is {w}×{h} pixels: nothing to segment")));
    }
    if c != 1 && c != 3 {
        return Err(ModelError::InvalidArgument(format!("image has {c} channels; expected 1 or 3")));
    }
    if image.data.len() != w * h * c {
        return Err(ModelError::InvalidArgument(format!(
            "image buffer holds {} values, expected {c}×{h}×{w}",
            image.data.len()
        )));
    }
    Ok(())
}

/// The image as a `(1, C, S, S)` tensor: antialiased bilinear when shrinking, bilinear when
/// enlarging; grey repeated to 3 channels when asked.
pub fn prepare_input(image: &Image, opts: &FitOptions, device: Device) -> Tensor {
    let (w, h, c) = (image.width as i64, image.height as i64, image.channels as i64);
    let x = Tensor::from_slice(&image.data).view([1, c, h, w]).to_device(device);
    let s = opts.size;
    let x = if h == s && w == s {
        x
    } else if h >= s && w >= s {
        x.internal_upsample_bilinear2d_aa([s, s], false, None, None)
    } else {
        x.upsample_bilinear2d([s, s], false, None, None)
    };
    let x = x.clamp(0.0, 1.0);
    let x = if c == 1 && opts.grey_channels == 3 { x.repeat([1, 3, 1, 1]) } else { x };
    match opts.kernels {
        Kernels::Fused => x,
        Kernels::TensorOps => channels_last(&x),
    }
}

/// The same tensor stored NHWC. With libtorch's own depthwise convolutions (oneDNN) the trunk
/// runs about twice as fast on channels-last activations here; our fused kernels prefer NCHW.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

fn fit_inner(
    image: &Image,
    opts: &FitOptions,
    device: Device,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<FitOutput, ModelError> {
    let start = Instant::now();
    if let Device::Cuda(i) = device {
        own_stream(i);
    }
    let x = prepare_input(image, opts, device);
    let cin = x.size()[1];
    let net = S3Net::new(opts.seed, device, cin, opts.features, opts.blocks, opts.offsets, opts.size, opts.kernels);
    let params = net.parameters();
    let mut velocity: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
    // A separate stream for the transforms, so that changing the affine ranges never changes
    // the initial weights of the same seed.
    let mut rng = SplitMix64::new(opts.seed.wrapping_mul(0x9E37_79B9).wrapping_add(1));
    let w = opts.weights;
    let use_affine = w.affine > 0.0;

    let mut last_target = Tensor::new();
    let mut last_response = Tensor::new();
    let mut losses = LossTerms::default();
    let mut iterations = 0;
    let mut labels_used = 0;
    for it in 0..opts.iterations {
        if cancel.load(Ordering::Relaxed) {
            return Err(ModelError::Cancelled);
        }
        let (response, aux_t, grid) = if use_affine {
            let t = Affine::draw(&mut rng, &opts.affine);
            let grid = t.grid(&x);
            let xt = warp(&x, &grid);
            // Two batch-1 passes rather than one batch of 2: each pass keeps its working set
            // inside the CPU's last-level cache (measured ~1.5x faster) and BatchNorm sees the
            // statistics of one image, as in the authors' code.
            let response = net.response(&net.trunk(&x));
            let aux_t = net.aux(&net.trunk(&xt));
            (response, Some(aux_t), Some(grid))
        } else {
            (net.response(&net.trunk(&x)), None, None)
        };

        let (l_ce, target) = self_ce(&response);
        let l_sp = if w.spatial > 0.0 {
            match opts.spatial {
                SpatialLoss::Sobel => sobel_spatial(&response),
                SpatialLoss::Continuity => continuity(&response),
            }
        } else {
            Tensor::zeros([], (Kind::Float, device))
        };
        let l_at = match (aux_t, grid) {
            (Some(aux_t), Some(grid)) => {
                // Target: the clustering of x, moved by the same transform, argmax after the warp.
                let moved = warp(&response.detach(), &grid).argmax(1, false);
                let target_t = moved.where_self(&inside(&grid), &Tensor::full([], IGNORE, (Kind::Int64, device)));
                masked_ce(&aux_t, &target_t)
            }
            _ => Tensor::zeros([], (Kind::Float, device)),
        };
        let total = &l_ce * w.ce + &l_at * w.affine + &l_sp * w.spatial;

        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        total.backward();
        tch::no_grad(|| {
            for (p, v) in params.iter().zip(velocity.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = v.g_mul_scalar_(opts.momentum).g_add_(&g);
                let mut p = p.shallow_clone();
                let _ = p.g_sub_(&(&*v * opts.lr));
            }
        });

        labels_used = count_labels(&target, opts.features);
        losses = LossTerms {
            total: f64::try_from(&total).unwrap_or(f64::NAN),
            ce: f64::try_from(&l_ce).unwrap_or(f64::NAN),
            affine: f64::try_from(&l_at).unwrap_or(f64::NAN),
            spatial: f64::try_from(&l_sp).unwrap_or(f64::NAN),
        };
        iterations = it + 1;
        progress(&Progress {
            iteration: iterations,
            max_iterations: opts.iterations,
            losses,
            labels: labels_used,
            elapsed: start.elapsed(),
        });
        last_target = target;
        last_response = response.detach();
        if !losses.total.is_finite() {
            return Err(ModelError::Diverged { iteration: iterations });
        }
        if opts.min_labels > 0 && iterations >= 5 && labels_used <= opts.min_labels {
            break;
        }
    }

    let (grid_labels, labels, n) = read_labels(&last_response, &last_target, image, opts);
    let grid_intensity = Vec::<f32>::try_from(
        x.mean_dim(1, false, Kind::Float).flatten(0, -1).to_device(Device::Cpu),
    )
    .map_err(|e| ModelError::Torch(e.to_string()))?;
    let _ = labels_used;
    Ok(FitOutput {
        labels,
        grid_labels,
        grid_intensity,
        n_labels: n,
        iterations,
        losses,
        fit_seconds: start.elapsed().as_secs_f64(),
        device: device_name(device),
    })
}

thread_local! {
    /// CUDA devices on which this thread already queues on a stream of its own.
    static OWN_STREAM: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives the calling thread a CUDA stream of its own on `device`, once: concurrent fits on
/// one GPU (one per worker thread) then overlap rather than serialise on the default stream.
/// Once per thread, not per fit, because libtorch's caching allocator reuses freed memory only
/// on the stream that freed it.
fn own_stream(device: usize) {
    OWN_STREAM.with(|set| {
        let mut set = set.borrow_mut();
        if !set.contains(&device) && s3net_ops::use_pool_stream(device).is_ok() {
            set.push(device);
        }
    });
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

fn count_labels(target: &Tensor, k: i64) -> usize {
    let counts = target.flatten(0, -1).bincount(None::<Tensor>, k);
    i64::try_from(counts.gt(0).sum(Kind::Int64)).unwrap_or(0) as usize
}

/// Grid and full-resolution label maps and the number of labels in the full-resolution map.
///
/// Labels are numbered by decreasing pixel count on the grid, clusters present at full
/// resolution first: a tiny cluster can vanish when the logits are upsampled, and the returned
/// map must hold exactly labels 0..n−1. Such a cluster keeps a number ≥ n on the grid only.
fn read_labels(response: &Tensor, target: &Tensor, image: &Image, opts: &FitOptions) -> (LabelMap, LabelMap, usize) {
    let k = opts.features;
    let counts = Vec::<i64>::try_from(target.flatten(0, -1).bincount(None::<Tensor>, k).to_device(Device::Cpu))
        .unwrap_or_default();
    let mut used: Vec<i64> = (0..k).filter(|&i| counts.get(i as usize).copied().unwrap_or(0) > 0).collect();
    used.sort_by_key(|&i| std::cmp::Reverse(counts[i as usize]));
    let raw_grid = Vec::<i64>::try_from(target.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default();
    let s = opts.size as u32;

    let (w0, h0) = (image.width as i64, image.height as i64);
    let same_size = w0 == opts.size && h0 == opts.size;
    // Logit upsampling holds n_used × H × W floats; beyond ~64M values fall back to nearest.
    let logits_ok = opts.upsample == Upsample::Logits && (used.len() as i64) * h0 * w0 <= 64 << 20;
    // Full-resolution map as raw cluster indices.
    let raw_full: Vec<i64> = if same_size {
        raw_grid.clone()
    } else if logits_ok {
        let idx = Tensor::from_slice(&used).to_device(response.device());
        let sel = response.index_select(1, &idx);
        let up = sel.upsample_bilinear2d([h0, w0], false, None, None).argmax(1, false);
        // `up` indexes into `used`.
        let up = Vec::<i64>::try_from(up.flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default();
        up.iter().map(|&i| used[i as usize]).collect()
    } else {
        let g = LabelMap { width: s, height: s, data: raw_grid.iter().map(|&i| i as u16).collect() };
        nearest(&g, w0 as u32, h0 as u32).data.iter().map(|&i| i as i64).collect()
    };
    let mut present = vec![false; k as usize];
    for &i in &raw_full {
        present[i as usize] = true;
    }
    // Present clusters first (stable: by grid count within each group).
    used.sort_by_key(|&i| !present[i as usize]);
    let n = used.iter().filter(|&&i| present[i as usize]).count();
    let mut rank = vec![0u16; k as usize];
    for (r, &i) in used.iter().enumerate() {
        rank[i as usize] = r as u16;
    }
    let grid = LabelMap { width: s, height: s, data: raw_grid.iter().map(|&i| rank[i as usize]).collect() };
    let full = LabelMap { width: w0 as u32, height: h0 as u32, data: raw_full.iter().map(|&i| rank[i as usize]).collect() };
    (grid, full, n)
}

/// Nearest-neighbour resize of a label map (PyTorch's `nearest` index rule).
pub fn nearest(m: &LabelMap, w: u32, h: u32) -> LabelMap {
    let mut data = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h as u64 {
        let sy = (y * m.height as u64 / h as u64) as usize;
        for x in 0..w as u64 {
            let sx = (x * m.width as u64 / w as u64) as usize;
            data.push(m.data[sy * m.width as usize + sx]);
        }
    }
    LabelMap { width: w, height: h, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3net_imaging::ImageKind;

    /// A one-pixel cluster on a 4×4 grid vanishes when the logits are resized to the 2×2
    /// image: the label count and numbering follow the returned map, not the grid.
    #[test]
    fn clusters_lost_in_the_resize_are_not_counted() {
        let opts = FitOptions { size: 4, features: 3, ..FitOptions::default() };
        let mut r = vec![0f32; 3 * 16];
        for y in 0..4 {
            for x in 0..4 {
                r[if x < 2 { 0 } else { 16 } + y * 4 + x] = 1.0;
            }
        }
        r[2 * 16] = 1.01; // cluster 2 wins pixel (0, 0) only
        let response = Tensor::from_slice(&r).view([1, 3, 4, 4]);
        let target = response.argmax(1, false);
        let image = Image { width: 2, height: 2, channels: 1, data: vec![0.5; 4], kind: ImageKind::Grey };
        let (grid, full, n) = read_labels(&response, &target, &image, &opts);
        assert_eq!(n, 2);
        let mut seen: Vec<u16> = full.data.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, vec![0, 1]);
        // On the grid the lost cluster keeps a number of its own, after the present ones.
        assert_eq!(grid.data[0], 2);
        assert_eq!(grid.data[1], full.data[0]);
    }
}
