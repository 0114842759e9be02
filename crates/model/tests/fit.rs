//! The fit loop on tiny images: determinism, progress, cancellation, early stop, options,
//! resolution of the outputs, and the fused kernels against the tensor-op oracle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use s3net_imaging::{Image, ImageKind};
use s3net_model::options::{Kernels, OffsetMode, Precision};
use s3net_model::{fit, refit_options, segment, DeviceSpec, FitOptions, ModelError, Preset, Progress, Segmentation};
use tch::Device;

/// A dark blob on a brighter textured background, `w × h`, RGB or grey.
fn blob(w: u32, h: u32, grey: bool) -> Arc<Image> {
    let c = if grey { 1 } else { 3 };
    let n = (w * h) as usize;
    let mut data = vec![0f32; n * c];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
            let inside = fx * fx + fy * fy < 0.06;
            let v = if inside { 0.25 } else { 0.75 } + 0.05 * ((x * 7 + y * 3) % 5) as f32 / 5.0;
            for ch in 0..c {
                data[ch * n + (y * w + x) as usize] = v - 0.05 * ch as f32;
            }
        }
    }
    Arc::new(Image { width: w, height: h, channels: c as u8, data, kind: if grey { ImageKind::Grey } else { ImageKind::Colour } })
}

fn tiny(preset: Preset) -> FitOptions {
    FitOptions { size: 32, features: 8, iterations: 4, min_labels: 0, ..FitOptions::preset(preset) }
}

fn no_progress() -> impl FnMut(&Progress) {
    |_: &Progress| {}
}

#[test]
fn same_seed_same_labels_on_cpu() {
    let img = blob(40, 30, false);
    let opts = tiny(Preset::Default);
    let never = AtomicBool::new(false);
    let a = fit(&img, &opts, Device::Cpu, &mut no_progress(), &never).unwrap();
    let b = fit(&img, &opts, Device::Cpu, &mut no_progress(), &never).unwrap();
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.grid_labels, b.grid_labels);
    assert_eq!(a.losses, b.losses);
}

#[test]
fn progress_is_reported_every_step_and_labels_come_back_at_original_size() {
    let img = blob(40, 24, false);
    let opts = tiny(Preset::Default);
    let mut seen = Vec::new();
    let out = fit(&img, &opts, Device::Cpu, &mut |p: &Progress| seen.push(*p), &AtomicBool::new(false)).unwrap();
    assert_eq!(seen.iter().map(|p| p.iteration).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(seen.iter().all(|p| p.max_iterations == 4 && p.labels >= 1 && p.losses.total.is_finite()));
    assert_eq!(out.iterations, 4);
    assert_eq!((out.labels.width, out.labels.height), (40, 24));
    assert_eq!(out.labels.data.len(), 40 * 24);
    assert_eq!((out.grid_labels.width, out.grid_labels.height), (32, 32));
    assert!(out.labels.data.iter().all(|&l| (l as usize) < out.n_labels.max(1)));
    // Renumbered by decreasing pixel count on the grid.
    let count = |l: u16| out.grid_labels.data.iter().filter(|&&v| v == l).count();
    for l in 1..out.n_labels as u16 {
        assert!(count(l - 1) >= count(l), "label {l} is larger than label {}", l - 1);
    }
    assert_eq!(out.device, "cpu");
}

#[test]
fn cancellation_stops_before_the_next_step() {
    let img = blob(32, 32, false);
    let opts = FitOptions { iterations: 50, ..tiny(Preset::Default) };
    let cancel = AtomicBool::new(true);
    assert!(matches!(fit(&img, &opts, Device::Cpu, &mut no_progress(), &cancel), Err(ModelError::Cancelled)));
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let r = fit(&img, &opts, Device::Cpu, &mut |p: &Progress| {
        steps = p.iteration;
        if p.iteration == 2 {
            cancel.store(true, Ordering::Relaxed);
        }
    }, &cancel);
    assert!(matches!(r, Err(ModelError::Cancelled)));
    assert_eq!(steps, 2);
}

#[test]
fn early_stop_after_five_steps_once_few_labels_remain() {
    let img = blob(32, 32, false);
    // With min_labels = K every step qualifies, so the fit stops at the 5-step minimum.
    let opts = FitOptions { iterations: 20, min_labels: 8, ..tiny(Preset::Default) };
    let out = fit(&img, &opts, Device::Cpu, &mut no_progress(), &AtomicBool::new(false)).unwrap();
    assert_eq!(out.iterations, 5);
    let opts = FitOptions { iterations: 7, min_labels: 0, ..opts };
    let out = fit(&img, &opts, Device::Cpu, &mut no_progress(), &AtomicBool::new(false)).unwrap();
    assert_eq!(out.iterations, 7);
}

#[test]
fn every_preset_runs_on_grey_and_colour() {
    for preset in Preset::ALL {
        for grey in [false, true] {
            let img = blob(36, 28, grey);
            let seg = segment(&img, &tiny(preset), DeviceSpec::Cpu, &mut no_progress(), &AtomicBool::new(false))
                .unwrap_or_else(|e| panic!("{preset} grey={grey}: {e}"));
            assert_eq!(seg.mask.len(), 36 * 28);
            assert_eq!(seg.grid_mask.len(), 32 * 32);
        }
    }
    assert_eq!(FitOptions::preset(Preset::Reference).offsets, OffsetMode::Free);
}

#[test]
fn the_foreground_of_a_dark_blob_is_the_blob() {
    let img = blob(48, 48, false);
    let truth: Vec<bool> = (0..48 * 48)
        .map(|p| {
            let (fx, fy) = ((p % 48) as f32 / 48.0 - 0.5, (p / 48) as f32 / 48.0 - 0.5);
            fx * fx + fy * fy < 0.06
        })
        .collect();
    for precision in [Precision::Float32, Precision::Bfloat16] {
        let opts = FitOptions { iterations: 10, precision, ..tiny(Preset::Default) };
        let seg = segment(&img, &opts, DeviceSpec::Cpu, &mut no_progress(), &AtomicBool::new(false)).unwrap();
        let s = s3net_eval_like_dice(&seg.mask, &truth);
        assert!(s > 0.8, "{precision:?}: dice {s}");
        assert_eq!((seg.refits, seg.fit.attempt), (0, 1), "a foreground was found: one fit");
    }
}

/// A grey scan larger than the grid gets its mask's border decided at full resolution
/// (foreground rule, step 4): closer to the blob than the grid mask upsampled, and exactly what
/// `foreground::full_mask` gives; a colour photograph's mask is the grid mask upsampled.
#[test]
fn a_grey_scans_border_is_decided_at_full_resolution() {
    use s3net_model::foreground;
    let n = 128;
    let truth: Vec<bool> = (0..n * n)
        .map(|p| {
            let (fx, fy) = ((p % n) as f32 / n as f32 - 0.5, (p / n) as f32 / n as f32 - 0.5);
            fx * fx + fy * fy < 0.06
        })
        .collect();
    let opts = FitOptions { iterations: 10, ..tiny(Preset::Default) };
    for grey in [true, false] {
        let img = blob(n as u32, n as u32, grey);
        let seg = segment(&img, &opts, DeviceSpec::Cpu, &mut no_progress(), &AtomicBool::new(false)).unwrap();
        let up = foreground::upsample_mask(&seg.grid_mask, 32, 32, n as u32, n as u32);
        if grey {
            let full = foreground::full_mask(&seg.grid_mask, 32, 32, &seg.fit.grid_intensity, &img);
            assert_eq!(seg.mask, full);
            let (snapped, coarse) = (s3net_eval_like_dice(&seg.mask, &truth), s3net_eval_like_dice(&up, &truth));
            assert!(snapped > 0.97 && snapped > coarse, "grey: dice {snapped} at full resolution, {coarse} upsampled");
        } else {
            assert_eq!(seg.mask, up, "colour: the grid mask upsampled");
        }
    }
}

/// A bright disk on a dark field (grey): nothing dark lies inside anything, so the foreground
/// rule finds nothing whatever the clusters.
fn bright_disk(w: u32, h: u32) -> Arc<Image> {
    let data = (0..w * h)
        .map(|p| {
            let (fx, fy) = ((p % w) as f32 / w as f32 - 0.5, (p / w) as f32 / h as f32 - 0.5);
            let v = if fx * fx + fy * fy < 0.09 { 0.8 } else { 0.15 };
            v + 0.04 * ((p * 7) % 5) as f32 / 5.0
        })
        .collect();
    Arc::new(Image { width: w, height: h, channels: 1, data, kind: ImageKind::Grey })
}

/// `segment` fits an image whose foreground comes out empty once more, with the seed
/// `refit_options` gives, as attempt 2 with its steps counted from 1 again; then it returns
/// that fit, empty or not.
#[test]
fn an_empty_foreground_is_fitted_again_once_with_another_seed() {
    let img = bright_disk(40, 40);
    let opts = tiny(Preset::Default);
    let never = AtomicBool::new(false);
    let mut seen = Vec::new();
    let seg = segment(&img, &opts, DeviceSpec::Cpu, &mut |p: &Progress| seen.push((p.attempt, p.iteration)), &never).unwrap();
    assert!(seg.mask.iter().all(|&f| !f) && seg.grid_mask.iter().all(|&f| !f));
    assert_eq!((seg.refits, seg.fit.attempt), (1, 2));
    assert_eq!(seen, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]);

    // The refit is the fit with refit_options' seed: the job's options but the seed.
    let first = Segmentation::of(&img, fit(&img, &opts, Device::Cpu, &mut no_progress(), &never).unwrap());
    let again = refit_options(&first, &opts, 0, 1).expect("an empty foreground is refitted");
    assert_ne!(again.seed, opts.seed);
    assert_eq!(FitOptions { seed: opts.seed, ..again.clone() }, opts);
    assert_eq!(refit_options(&first, &opts, 0, 1), Some(again.clone()), "a pure function");
    let second = fit(&img, &again, Device::Cpu, &mut no_progress(), &never).unwrap();
    assert_eq!(second.grid_labels, seg.fit.grid_labels);
    // Used up, or none allowed.
    assert_eq!(refit_options(&first, &opts, 1, 1), None);
    assert_eq!(refit_options(&first, &opts, 0, 0), None);
}

/// The first step's losses are one function of the same weights whatever the number format of
/// the activations: bfloat16 agrees with float32 to its rounding (2⁻⁹ relative per value; a
/// few such errors through the network), on the CPU and, when present, on CUDA with its own
/// bfloat16 depthwise kernels. Every preset, so both offset modes and spatial terms run.
#[test]
fn bfloat16_losses_follow_float32() {
    let img = blob(32, 32, false);
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        for preset in Preset::ALL {
            let base = FitOptions { iterations: 1, ..tiny(preset) };
            let first = |precision: Precision| {
                let mut l = Vec::new();
                let o = FitOptions { precision, ..base.clone() };
                fit(&img, &o, device, &mut |p: &Progress| l.push(p.losses), &AtomicBool::new(false)).unwrap();
                l[0]
            };
            let (a, b) = (first(Precision::Bfloat16), first(Precision::Float32));
            for (x, y) in [(a.total, b.total), (a.ce, b.ce), (a.affine, b.affine), (a.spatial, b.spatial)] {
                assert!(x.is_finite() && (x - y).abs() <= 0.03 * y.abs() + 1e-3, "{device:?} {preset}: {a:?} vs {b:?}");
            }
        }
    }
}

fn s3net_eval_like_dice(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count() as f64;
    2.0 * inter / (a.iter().filter(|&&x| x).count() + b.iter().filter(|&&x| x).count()) as f64
}

#[test]
fn fused_kernels_agree_with_tensor_ops() {
    let img = blob(32, 32, false);
    for offsets in [OffsetMode::Predicted, OffsetMode::Free] {
        // One step: the losses of the first forward pass are the same function of the same
        // weights. (Later steps are not comparable: argmax targets flip on float noise.)
        let base = FitOptions { iterations: 1, offsets, ..tiny(Preset::Default) };
        let mut la = Vec::new();
        let mut lb = Vec::new();
        fit(&img, &FitOptions { kernels: Kernels::Fused, ..base.clone() }, Device::Cpu, &mut |p: &Progress| la.push(p.losses), &AtomicBool::new(false)).unwrap();
        fit(&img, &FitOptions { kernels: Kernels::TensorOps, ..base }, Device::Cpu, &mut |p: &Progress| lb.push(p.losses), &AtomicBool::new(false)).unwrap();
        assert_eq!(la.len(), 1);
        for (a, b) in la.iter().zip(&lb) {
            for (x, y) in [(a.total, b.total), (a.ce, b.ce), (a.affine, b.affine), (a.spatial, b.spatial)] {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{offsets:?}: {a:?} vs {b:?}");
            }
        }
    }
}

#[test]
fn bad_options_and_images_are_invalid_arguments() {
    let img = blob(16, 16, false);
    let never = AtomicBool::new(false);
    let check = |o: FitOptions, word: &str| {
        let e = fit(&img, &o, Device::Cpu, &mut no_progress(), &never).unwrap_err();
        assert!(matches!(e, ModelError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains(word), "'{e}' should mention {word}");
    };
    check(FitOptions { iterations: 0, ..tiny(Preset::Default) }, "iterations");
    check(FitOptions { size: 4, ..tiny(Preset::Default) }, "size");
    check(FitOptions { lr: f64::NAN, ..tiny(Preset::Default) }, "lr");
    check(FitOptions { offset_lr: 0.0, ..tiny(Preset::Default) }, "offset_lr");
    check(FitOptions { offset_lr: f64::INFINITY, ..tiny(Preset::Default) }, "offset_lr");
    check(FitOptions { min_labels: 99, ..tiny(Preset::Default) }, "min_labels");
    check(FitOptions { precision: Precision::Bfloat16, kernels: Kernels::TensorOps, ..tiny(Preset::Default) }, "bfloat16");
    let broken = Arc::new(Image { data: vec![0.0; 5], ..(*blob(16, 16, false)).clone() });
    let e = fit(&broken, &tiny(Preset::Default), Device::Cpu, &mut no_progress(), &never).unwrap_err();
    assert!(e.to_string().contains("buffer"), "{e}");
    let empty = Arc::new(Image { width: 0, height: 0, channels: 3, data: vec![], kind: ImageKind::Colour });
    assert!(fit(&empty, &tiny(Preset::Default), Device::Cpu, &mut no_progress(), &never).is_err());
    assert!("gpu7".parse::<DeviceSpec>().is_err());
    assert!("fast".parse::<Preset>().unwrap_err().to_string().contains("default, paper, reference"));
    assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
}

#[test]
fn cuda_fit_when_present() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device");
        return;
    }
    let img = blob(40, 30, false);
    let out = fit(&img, &tiny(Preset::Default), Device::Cuda(0), &mut no_progress(), &AtomicBool::new(false)).unwrap();
    assert_eq!(out.device, "cuda:0");
    assert_eq!(out.labels.data.len(), 40 * 30);
}
