//! `s3net segment IMAGE... --out DIR`

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use s3net_imaging::{DecodeOptions, Format, Image, Window};
use s3net_server::cli::frame_stem;
use s3net_server::jobs::DicomOutputs;
use s3net_model::{DeviceSpec, FitOptions, Progress, Segmentation};

use crate::fitargs::FitArgs;

#[derive(Args, Debug)]
pub struct SegmentArgs {
    /// Image files (PNG, JPEG, BMP, TIFF, DICOM; the format is read from the bytes).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Frame of a multi-frame DICOM, or page of a multi-page TIFF (0-based), for every image.
    #[arg(long, default_value_t = 0, conflicts_with = "all_frames")]
    pub frame: u32,
    /// Segment every frame of a multi-frame DICOM (every page of a TIFF), one fit each, written
    /// as STEM.frameN.* (N zero-padded to the file's frame count); single-frame files as
    /// without it.
    #[arg(long)]
    pub all_frames: bool,
    /// Also write the mask as a DICOM Segmentation, STEM.seg.dcm, referencing its source (DICOM
    /// inputs only), for a PACS to store next to it.
    #[arg(long)]
    pub dicom_seg: bool,
    /// Also write the cluster map as a DICOM Segmentation, STEM.labels.seg.dcm (one segment
    /// per cluster; DICOM inputs only).
    #[arg(long)]
    pub dicom_seg_clusters: bool,
    #[command(flatten)]
    pub fit: FitArgs,
}

/// An image read for a fit, with what its file said about its geometry.
pub struct Loaded {
    /// Shared with the fit, which keeps it (not copied: see `s3net_model::fit::fit`).
    pub image: Arc<Image>,
    /// The EXIF orientation (1–8) the decoder applied (`Decoded::orientation`).
    pub orientation: u8,
    /// DICOM Pixel Spacing in mm, [rows, columns], when the file gives it.
    pub pixel_spacing_mm: Option<[f64; 2]>,
    /// The window applied: the one asked for, else the file's (a DICOM's Window Center/Width or
    /// VOI LUT), with the name of its function (`WindowFunction::name`).
    pub window: Option<(Window, &'static str)>,
    /// The DICOM Segmentations asked for, with what they need of the file.
    pub dicom_seg: Option<DicomOutputs>,
}

/// Reads and decodes an image file (`frame`: of a multi-frame DICOM or multi-page TIFF), with
/// the path in every error; with `dicom_seg`, also what a DICOM Segmentation of it needs (an
/// error for a file of another format, or one a Segmentation cannot reference): `dicom_seg`
/// is (the foreground's, the clusters').
pub fn load_image(path: &Path, frame: u32, window: Option<Window>, (foreground, clusters): (bool, bool)) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dicom_seg = match (foreground || clusters, s3net_imaging::sniff(&bytes)) {
        (false, _) => None,
        (true, Some(Format::Dicom)) => Some(DicomOutputs {
            source: Arc::new(s3net_imaging::dicom_source(&bytes, frame).with_context(|| format!("a DICOM Segmentation of {}", path.display()))?),
            foreground,
            clusters,
        }),
        (true, format) => anyhow::bail!(
            "{} needs a DICOM input, to reference it; {} is {}",
            if foreground { "--dicom-seg" } else { "--dicom-seg-clusters" },
            path.display(),
            format.map_or("not an image format this tool reads".into(), |f| f.to_string().to_uppercase())
        ),
    };
    let opts = DecodeOptions { frame, ..Default::default() };
    let decoded = s3net_imaging::decode(&bytes, &opts).with_context(|| format!("cannot decode {}", path.display()))?;
    let (orientation, pixel_spacing_mm) = (decoded.orientation, decoded.dicom.as_ref().and_then(|d| d.pixel_spacing_mm));
    let applied = decoded.given_window(window).map(|(w, f)| (w, f.name()));
    Ok(Loaded { image: Arc::new(decoded.into_image(window)), orientation, pixel_spacing_mm, window: applied, dicom_seg })
}

/// A one-line progress display on stderr, only when stderr is a terminal.
pub fn progress_printer(name: String) -> impl FnMut(&Progress) {
    let tty = std::io::stderr().is_terminal();
    move |p: &Progress| {
        if tty {
            let width = 30;
            let done = p.iteration * width / p.max_iterations.max(1);
            eprint!(
                "\r{name} [{}{}] {}/{} labels {:>2} loss {:.3} ",
                "#".repeat(done),
                " ".repeat(width - done),
                p.iteration,
                p.max_iterations,
                p.labels,
                p.losses.total
            );
            let _ = std::io::stderr().flush();
        }
    }
}

/// Fits one image with progress display.
pub fn segment_one(image: &Arc<Image>, opts: &FitOptions, device: DeviceSpec, name: &str) -> Result<Segmentation> {
    let cancel = AtomicBool::new(false);
    let mut show = progress_printer(name.to_string());
    let r = s3net_model::segment(image, opts, device, &mut show, &cancel);
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    Ok(r?)
}

pub fn run(a: SegmentArgs) -> Result<()> {
    let opts = a.fit.options()?;
    let device = a.fit.device()?;
    let window = a.fit.window()?;
    // Two inputs with one stem would write the same files: refused before any fit.
    let stems = s3net_server::cli::output_stems(&a.images, &a.out)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let dicom_seg = (a.dicom_seg, a.dicom_seg_clusters);
    let (mut fits, mut failures) = (0, 0);
    let mut report = |r: Result<String>| {
        fits += 1;
        match r {
            Ok(summary) => println!("{summary}"),
            Err(e) => {
                failures += 1;
                eprintln!("error: {e:#}");
            }
        }
    };
    for (path, stem) in a.images.iter().zip(stems) {
        if !a.all_frames {
            report(segment_file(path, &a.out, &stem, (a.frame, None), dicom_seg, &opts, device, window));
            continue;
        }
        match frame_count(path) {
            Ok(1) => report(segment_file(path, &a.out, &stem, (0, Some(1)), dicom_seg, &opts, device, window)),
            Ok(frames) => {
                for frame in 0..frames {
                    let stem = frame_stem(&stem, frame, frames);
                    report(segment_file(path, &a.out, &stem, (frame, Some(frames)), dicom_seg, &opts, device, window));
                }
            }
            Err(e) => report(Err(e)),
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} of {fits} fit(s) failed");
    }
    Ok(())
}

/// The frames (pages) of an image file, from its headers.
fn frame_count(path: &Path) -> Result<u32> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header = s3net_imaging::probe(&bytes, &DecodeOptions::default()).with_context(|| format!("cannot decode {}", path.display()))?;
    Ok(header.frames)
}

/// Fits frame `frame` of `path` and writes its outputs as `stem`. `frames`: the file's frame
/// count when the caller already read it (`--all-frames`, whose summary lines name the frame),
/// else None and it is read here, for the report.
#[allow(clippy::too_many_arguments)]
fn segment_file(
    path: &Path,
    out: &Path,
    stem: &str,
    (frame, frames): (u32, Option<u32>),
    dicom_seg: (bool, bool),
    opts: &FitOptions,
    device: DeviceSpec,
    window: Option<Window>,
) -> Result<String> {
    let loaded = load_image(path, frame, window, dicom_seg)?;
    let image = &loaded.image;
    if let Some(w) = memory_warning(opts, device, image, s3net_server::config::host_memory_bytes()) {
        eprintln!("warning: {}: {w}", path.display());
    }
    let all_frames = frames.is_some();
    let frames = match frames {
        Some(n) => n,
        None => frame_count(path)?,
    };
    // Every attempt's time, with the foreground's read-off: what the service reports as a job's
    // fit time (a refit made this file's fit take twice the last attempt's seconds).
    let started = std::time::Instant::now();
    let seg = segment_one(image, opts, device, stem).with_context(|| format!("fit failed for {}", path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    write_outputs(out, stem, &loaded, &seg, opts, device, frames, seconds)?;
    Ok(format!(
        "{}{}: {} labels, {} iterations, {:.2} s on {}",
        path.display(),
        if all_frames && frames > 1 { format!(" frame {frame} of {frames}") } else { String::new() },
        seg.fit.n_labels,
        seg.fit.iterations,
        seconds,
        seg.fit.device
    ))
}

/// A warning when a CPU fit of `image` with `opts` may need more memory than the host has
/// (`host_bytes`): the service refuses such a job, but here the user decides. Why warn at all:
/// a fit that runs out ends in the kernel's out-of-memory killer, whose only trace is "Killed".
/// The estimate is an upper one (`FitOptions::host_memory_estimate`: up to about 3× what the
/// measured fits took), so this warns only beyond the host's whole memory.
pub fn memory_warning(opts: &FitOptions, device: DeviceSpec, image: &Image, host_bytes: Option<u64>) -> Option<String> {
    let on_cpu = device.resolve().map(|d| d == tch::Device::Cpu).unwrap_or(false);
    let need = opts.host_memory_estimate(image.width as u64 * image.height as u64);
    let host = host_bytes?;
    (on_cpu && need > host).then(|| {
        format!(
            "{} may need up to about {:.1} GB of memory, and this machine has {:.1} GB: if it is \
             killed, use a smaller --size or --features, or a GPU",
            opts.describe(Some((image.width, image.height))),
            need as f64 / 1e9,
            host as f64 / 1e9
        )
    })
}

/// Writes STEM.labels.png, STEM.mask.png, STEM.json (and STEM.seg.dcm with a DICOM source
/// asked for one; `frames`: the file's frame count, for the report) from the result message the service
/// would send for this fit (`s3net_server::worker::segmentation_result`), through the writer
/// `s3net client segment` uses: a local and a remote segmentation report the same keys.
/// `seconds`: the segmentation's time, every attempt included (the report's fit and total time).
#[allow(clippy::too_many_arguments)]
pub fn write_outputs(out: &Path, stem: &str, loaded: &Loaded, seg: &Segmentation, opts: &FitOptions, device: DeviceSpec, frames: u32, seconds: f64) -> Result<()> {
    let applied = s3net_server::service::applied_options(opts, device, loaded.window, 0, loaded.orientation);
    let dicom = loaded
        .dicom_seg
        .as_ref()
        .map(|out| s3net_server::worker::dicom_segmentations(out, &loaded.image, seg, &applied))
        .transpose()?;
    let mut result = s3net_server::worker::segmentation_result(&loaded.image, seg, applied, loaded.pixel_spacing_mm);
    (result.mask_dicom, result.labels_dicom) = dicom.unwrap_or_default();
    result.frames = frames;
    result.timings = Some(s3net_server::pb::Timings {
        queued_seconds: 0.0,
        fit_seconds: seconds,
        total_seconds: seconds,
    });
    s3net_server::cli::write_result(out, stem, &result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_when_a_cpu_fit_may_not_fit_the_host() {
        let image = Image { width: 512, height: 512, channels: 1, data: vec![0.0; 512 * 512], kind: s3net_imaging::ImageKind::Grey };
        let big = FitOptions { size: 1024, features: 256, ..FitOptions::default() };
        let w = memory_warning(&big, DeviceSpec::Cpu, &image, Some(16 << 30)).expect("a warning");
        for needle in ["1024×1024 grid", "256 features", "512×512 image", "43.6 GB", "17.2 GB", "--size"] {
            assert!(w.contains(needle), "{w:?} lacks {needle:?}");
        }
        assert_eq!(memory_warning(&FitOptions::default(), DeviceSpec::Cpu, &image, Some(16 << 30)), None);
        assert_eq!(memory_warning(&big, DeviceSpec::Cpu, &image, None), None, "unknown host memory: no guess");
    }
}
