//! `s3net eval --images DIR --masks DIR`: fit every image and score it three ways.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use s3net_eval::{mean, median, oracle_protocol, paper_protocol, scores, Scores};
use s3net_imaging::{decode_mask, resize_mask_nearest};
use serde::Serialize;
use serde_json::json;

use crate::fitargs::FitArgs;
use crate::segment::{load_image, segment_one};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Folder of images.
    #[arg(long)]
    pub images: PathBuf,
    /// Folder of ground-truth masks with the same file names.
    #[arg(long)]
    pub masks: PathBuf,
    /// Evaluate only the first N images (by name).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Also save each image's grid label map and grid intensity here (for rule tuning).
    #[arg(long, hide = true)]
    pub dump: Option<PathBuf>,
    /// Skip fitting: re-score label maps saved earlier with --dump (tunes the foreground rule
    /// without refitting).
    #[arg(long, hide = true)]
    pub from_dump: Option<PathBuf>,
    #[command(flatten)]
    pub fit: FitArgs,
}

#[derive(Serialize)]
struct Row {
    name: String,
    grid: Protocols,
    full: FullRes,
    labels: usize,
    iterations: usize,
    fit_seconds: f64,
    /// Fits made again because the foreground came out empty (`s3net_model::refit_options`).
    refits: usize,
}

#[derive(Serialize, Clone, Copy)]
struct Protocols {
    paper: Scores,
    oracle: Scores,
    auto: Scores,
    /// Union of the clusters lying mostly inside the ground truth: a ceiling for merging rules.
    merge_ceiling: Scores,
}

#[derive(Serialize, Clone, Copy)]
struct FullRes {
    oracle: Scores,
    auto: Scores,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let opts = a.fit.options()?;
    let device = a.fit.device()?;
    let window = a.fit.window()?;
    let mut names: Vec<String> = std::fs::read_dir(&a.images)
        .with_context(|| format!("cannot list {}", a.images.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if let Some(n) = a.limit {
        names.truncate(n);
    }
    anyhow::ensure!(!names.is_empty(), "no images in {}", a.images.display());
    let s = opts.size as u32;
    let mut rows = Vec::new();
    println!("{:<22} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>4} {:>4} {:>6}", "image", "paper", "oracle", "auto", "merge", "oracleF", "autoF", "lab", "it", "sec");
    for name in &names {
        let image = load_image(&a.images.join(name), 0, window, (false, false))?.image;
        let mpath = a.masks.join(name);
        let mbytes = std::fs::read(&mpath).with_context(|| format!("cannot read mask {}", mpath.display()))?;
        let (mw, mh, gt) = decode_mask(&mbytes).with_context(|| format!("cannot decode mask {}", mpath.display()))?;
        anyhow::ensure!(
            (mw, mh) == (image.width, image.height),
            "mask {} is {mw}×{mh} but the image is {}×{}",
            mpath.display(),
            image.width,
            image.height
        );
        let seg = match &a.from_dump {
            Some(dir) => dump::load(dir, name, &image)?,
            None => segment_one(&image, &opts, device, name)?,
        };
        if let Some(dir) = &a.dump {
            dump::save(dir, name, &seg)?;
        }
        let gt_grid = resize_mask_nearest(mw, mh, &gt, s, s);
        let gl = &seg.fit.grid_labels.data;
        let grid = Protocols {
            paper: paper_protocol(gl, &gt_grid, s as usize, s as usize),
            oracle: oracle_protocol(gl, &gt_grid).0,
            auto: scores(&seg.grid_mask, &gt_grid),
            merge_ceiling: scores(&merge_ceiling(gl, &gt_grid), &gt_grid),
        };
        let full = FullRes { oracle: oracle_protocol(&seg.fit.labels.data, &gt).0, auto: scores(&seg.mask, &gt) };
        println!(
            "{:<22} {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1} | {:>4} {:>4} {:>6.1}",
            name, grid.paper.dsc, grid.oracle.dsc, grid.auto.dsc, grid.merge_ceiling.dsc, full.oracle.dsc, full.auto.dsc, seg.fit.n_labels, seg.fit.iterations, seg.fit.fit_seconds
        );
        rows.push(Row { name: name.clone(), grid, full, labels: seg.fit.n_labels, iterations: seg.fit.iterations, fit_seconds: seg.fit.fit_seconds, refits: seg.refits });
    }
    let pick = |f: fn(&Row) -> Scores| mean(&rows.iter().map(f).collect::<Vec<_>>());
    let summary = json!({
        "paper": pick(|r| r.grid.paper),
        "oracle": pick(|r| r.grid.oracle),
        "auto": pick(|r| r.grid.auto),
        "merge_ceiling": pick(|r| r.grid.merge_ceiling),
        "full_resolution": { "oracle": pick(|r| r.full.oracle), "auto": pick(|r| r.full.auto) },
    });
    let fit_med = median(&rows.iter().map(|r| r.fit_seconds).collect::<Vec<_>>());
    let it_med = median(&rows.iter().map(|r| r.iterations as f64).collect::<Vec<_>>());
    let p = |k: &str| summary[k]["dsc"].as_f64().unwrap_or(f64::NAN);
    println!(
        "mean DSC over {} images (grid {s}×{s}): paper {:.1}  oracle {:.1}  auto {:.1}  merge-ceiling {:.1} | full-res oracle {:.1} auto {:.1} | median {:.2} s/fit, {} iterations, {} refitted",
        rows.len(),
        p("paper"),
        p("oracle"),
        p("auto"),
        p("merge_ceiling"),
        summary["full_resolution"]["oracle"]["dsc"].as_f64().unwrap_or(f64::NAN),
        summary["full_resolution"]["auto"]["dsc"].as_f64().unwrap_or(f64::NAN),
        fit_med,
        it_med,
        rows.iter().filter(|r| r.refits > 0).count()
    );
    if let Some(path) = &a.report {
        let report = json!({
            "summary": summary,
            "fit_seconds_median": fit_med,
            "iterations_median": it_med,
            "options": opts,
            "images": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

mod dump {
    //! Grid label maps and intensities saved as 16-bit PNGs, reloaded to re-run the foreground
    //! rule alone.
    use std::path::Path;

    use anyhow::{Context, Result};
    use s3net_imaging::{decode, encode_grey_png16, encode_labels_png, DecodeOptions, Image, LabelMap};
    use s3net_model::{foreground, FitOutput, LossTerms, Segmentation};

    pub fn save(dir: &Path, name: &str, seg: &Segmentation) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let g = &seg.fit.grid_labels;
        std::fs::write(dir.join(format!("{name}.labels.png")), encode_labels_png(g))?;
        let q: Vec<u16> = seg.fit.grid_intensity.iter().map(|&v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16).collect();
        std::fs::write(dir.join(format!("{name}.intensity.png")), encode_grey_png16(g.width, g.height, &q))?;
        std::fs::write(dir.join(format!("{name}.auto.png")), s3net_imaging::encode_mask_png(g.width, g.height, &seg.grid_mask))?;
        Ok(())
    }

    pub fn load(dir: &Path, name: &str, image: &Image) -> Result<Segmentation> {
        let read = |suffix: &str| -> Result<s3net_imaging::Decoded> {
            let p = dir.join(format!("{name}.{suffix}.png"));
            let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            Ok(decode(&bytes, &DecodeOptions::default())?)
        };
        let l = read("labels")?;
        let labels = LabelMap { width: l.width, height: l.height, data: l.samples.iter().map(|&v| v as u16).collect() };
        let i = read("intensity")?;
        let scale = if i.bit_depth > 8 { 65535.0 } else { 255.0 };
        let intensity: Vec<f32> = i.samples.iter().map(|&v| v / scale).collect();
        let grid_mask = foreground::select(&labels, &intensity, image.kind);
        let mask = foreground::full_mask(&grid_mask, labels.width, labels.height, &intensity, image);
        let full = s3net_model::fit::nearest(&labels, image.width, image.height);
        let n_labels = labels.data.iter().copied().max().map_or(0, |m| m as usize + 1);
        let fit = FitOutput { labels: full, grid_labels: labels, grid_intensity: intensity, n_labels, iterations: 0, losses: LossTerms::default(), fit_seconds: 0.0, device: "dump".into(), attempt: 1 };
        Ok(Segmentation { fit, mask, grid_mask, refits: 0 })
    }
}

/// Clusters with more than half their pixels inside the ground truth, united.
fn merge_ceiling(labels: &[u16], gt: &[bool]) -> Vec<bool> {
    let n = labels.iter().copied().max().unwrap_or(0) as usize + 1;
    let mut inside = vec![0u64; n];
    let mut total = vec![0u64; n];
    for (&l, &g) in labels.iter().zip(gt) {
        total[l as usize] += 1;
        inside[l as usize] += g as u64;
    }
    labels.iter().map(|&l| 2 * inside[l as usize] > total[l as usize]).collect()
}
