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
        let image = load_image(&a.images.join(name), window)?;
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
        let seg = segment_one(&image, &opts, device, name)?;
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
        rows.push(Row { name: name.clone(), grid, full, labels: seg.fit.n_labels, iterations: seg.fit.iterations, fit_seconds: seg.fit.fit_seconds });
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
        "mean DSC over {} images (grid {s}×{s}): paper {:.1}  oracle {:.1}  auto {:.1}  merge-ceiling {:.1} | full-res oracle {:.1} auto {:.1} | median {:.2} s/fit, {} iterations",
        rows.len(),
        p("paper"),
        p("oracle"),
        p("auto"),
        p("merge_ceiling"),
        summary["full_resolution"]["oracle"]["dsc"].as_f64().unwrap_or(f64::NAN),
        summary["full_resolution"]["auto"]["dsc"].as_f64().unwrap_or(f64::NAN),
        fit_med,
        it_med
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
