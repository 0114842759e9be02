//! `probe` reads what `decode` will give from the headers alone.

use s3net_imaging::*;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Every image under tests/data (DICOM in every codec, raster, TIFF), every frame or page of
/// each: the same format, size (up to an orientation's quarter turn) and channels as the
/// decode, and the image bytes a queue counts. (A list of a dozen files missed PALETTE COLOR:
/// the probe said one channel for an image that decodes to three, found by `fuzz/`.)
#[test]
fn probe_agrees_with_decode() {
    // Test files whose decode is refused by name (their own tests say why).
    const REFUSED: [&str; 1] = ["dicom/SC_rgb_rle_32bit.dcm"];
    let root = format!("{}/../../tests/data", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = Vec::new();
    for dir in ["dicom", "raster", "ph2", "lung"] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if [".dcm", ".png", ".jpg", ".tif", ".bmp"].iter().any(|e| name.ends_with(e)) {
                files.push(format!("{dir}/{name}"));
            }
        }
    }
    files.sort();
    let (mut checked, mut frames_checked) = (0, 0);
    for rel in &files {
        let bytes = data(rel);
        let frames = probe(&bytes, &DecodeOptions::default()).map_or(1, |h| h.frames);
        for frame in 0..frames {
            let opts = DecodeOptions { frame, ..Default::default() };
            let h = probe(&bytes, &opts).unwrap_or_else(|e| panic!("{rel}: {e}"));
            let d = match decode(&bytes, &opts) {
                Err(e) if REFUSED.contains(&rel.as_str()) => {
                    eprintln!("{rel}: refused, as it should be ({e})");
                    continue;
                }
                other => other.unwrap_or_else(|e| panic!("{rel} frame {frame}: {e}")),
            };
            let size = if d.orientation >= 5 { (d.height, d.width) } else { (d.width, d.height) };
            assert_eq!((h.format, (h.width, h.height), h.channels), (d.format, size, d.channels), "{rel} frame {frame}");
            assert_eq!(h.image_bytes(), normalize(&d, None).data.len() as u64 * 4, "{rel} frame {frame}");
            frames_checked += 1;
        }
        checked += 1;
    }
    assert!(checked >= 50 && frames_checked > checked, "{checked} files, {frames_checked} frames");
}

/// The frames or pages a file has, whichever one was asked for: what a caller that segments
/// every frame loops over.
#[test]
fn probe_counts_frames_and_pages() {
    let files = [
        ("ph2/IMD002.png", 0, 1),
        ("raster/IMD002-progressive.jpg", 0, 1),
        ("dicom/CT_small.dcm", 0, 1),
        ("dicom/CT_small_enhanced_3frames.dcm", 0, 3),
        ("dicom/CT_small_enhanced_3frames.dcm", 2, 3),
        ("dicom/CT_small_jpeg12_2frames.dcm", 1, 2),
        ("raster/IMD002-grey-orient8.tif", 0, 1),
        ("raster/two-pages.tif", 0, 2),
        ("raster/two-pages.tif", 1, 2),
    ];
    for (rel, frame, frames) in files {
        let h = probe(&data(rel), &DecodeOptions { frame, ..Default::default() }).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(h.frames, frames, "{rel} frame {frame}");
    }
}

/// The errors a header shows come from the probe, before any pixel is decoded.
#[test]
fn probe_refuses_what_the_headers_show() {
    assert_eq!(probe(b"", &Default::default()), Err(ImagingError::EmptyInput));
    assert_eq!(probe(b"hello", &Default::default()), Err(ImagingError::UnknownFormat));
    let small = DecodeOptions { limits: Limits { max_side: 100, max_pixels: 10_000 }, ..Default::default() };
    assert!(matches!(probe(&data("ph2/IMD002.png"), &small), Err(ImagingError::TooLarge { .. })));
    assert!(matches!(probe(&data("dicom/CT_small.dcm"), &small), Err(ImagingError::TooLarge { .. })));
    let third = DecodeOptions { frame: 2, ..Default::default() };
    assert!(matches!(probe(&data("raster/two-pages.tif"), &third), Err(ImagingError::FrameOutOfRange { frames: 2, .. })));
    assert!(matches!(probe(&data("dicom/CT_small.dcm"), &third), Err(ImagingError::FrameOutOfRange { frames: 1, .. })));
    let png = data("ph2/IMD002.png");
    for cut in [9, 20, 30] {
        assert!(probe(&png[..cut], &Default::default()).is_err(), "cut at {cut}");
    }
}
