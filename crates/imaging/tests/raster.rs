//! PNG/JPEG/BMP/TIFF decoding, limits, hostile input, windows, masks.

use std::io::Cursor;

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use s3net_imaging::*;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn dec(bytes: &[u8]) -> Result<Decoded, ImagingError> {
    decode(bytes, &DecodeOptions::default())
}

fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

/// A 3×2 test pattern, value = f(x, y, c).
fn pattern(x: u32, y: u32, c: u32) -> u32 {
    10 + 40 * x + 7 * y + 3 * c
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut c = (body.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(body);
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(body);
    c.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    c
}

/// A PNG whose IHDR (valid CRC) claims the given size, followed by a truncated IDAT.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend_from_slice(&1000u32.to_be_bytes());
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&[0x78, 0x9C, 0x01, 0x02]);
    png
}

#[test]
fn sniffs_magic_bytes_only() {
    assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Some(Format::Png));
    assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
    assert_eq!(sniff(b"BM\0\0"), Some(Format::Bmp));
    assert_eq!(sniff(b"II*\0"), Some(Format::Tiff));
    assert_eq!(sniff(b"MM\0*"), Some(Format::Tiff));
    let mut dcm = vec![0u8; 128];
    dcm.extend_from_slice(b"DICM");
    assert_eq!(sniff(&dcm), Some(Format::Dicom));
    assert_eq!(sniff(b"GIF89a"), None);
    assert_eq!(sniff(b""), None);
    assert_eq!(sniff(&data("dicom/CT_small.dcm")), Some(Format::Dicom));
    assert_eq!(sniff(&data("ph2/IMD002.png")), Some(Format::Png));
    assert_eq!(Format::Jpeg.to_string(), "jpeg");
    assert_eq!(Format::Dicom.to_string(), "dicom");
}

#[test]
fn empty_and_unknown() {
    let e = dec(b"").unwrap_err();
    assert_eq!(e, ImagingError::EmptyInput);
    assert!(e.to_string().starts_with("empty input"));
    let e = dec(b"GIF89a......").unwrap_err();
    assert_eq!(e, ImagingError::UnknownFormat);
    for name in ["PNG", "JPEG", "BMP", "TIFF", "DICOM"] {
        assert!(e.to_string().contains(name), "{e}");
    }
}

#[test]
fn huge_png_header_fails_fast() {
    let png = png_header(100_000, 100_000);
    let t = std::time::Instant::now();
    let e = dec(&png).unwrap_err();
    // Decoding it would mean 10¹⁰ pixels: minutes, or out of memory. (The bound leaves room for
    // a loaded 2-core CI machine.)
    assert!(t.elapsed().as_millis() < 2000, "{:?}", t.elapsed());
    assert_eq!(
        e.to_string(),
        "image is 100000×100000 pixels, larger than the limit of 16384 per side"
    );

    // Within the side limit but too many pixels.
    let e = dec(&png_header(16_000, 16_000)).unwrap_err();
    assert!(
        matches!(
            e,
            ImagingError::TooManyPixels {
                pixels: 256_000_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("100000000"), "{e}");

    // Custom limits.
    let opts = DecodeOptions {
        limits: Limits {
            max_side: 2,
            max_pixels: 100,
        },
        frame: 0,
    };
    let img = DynamicImage::ImageLuma8(ImageBuffer::from_fn(3, 2, |x, y| {
        Luma([pattern(x, y, 0) as u8])
    }));
    let e = decode(&encode(&img, ImageFormat::Png), &opts).unwrap_err();
    assert!(matches!(
        e,
        ImagingError::TooLarge {
            width: 3,
            height: 2,
            max_side: 2
        }
    ));
    let e = decode(&encode(&img, ImageFormat::Bmp), &opts).unwrap_err();
    assert!(matches!(
        e,
        ImagingError::TooLarge {
            width: 3,
            height: 2,
            max_side: 2
        }
    ));
}

#[test]
fn zero_sized_png_is_an_error() {
    let e = dec(&png_header(0, 10)).unwrap_err();
    assert_eq!(
        e,
        ImagingError::ZeroSize {
            width: 0,
            height: 10
        }
    );
}

fn check_grey(d: &Decoded, format: Format, bit_depth: u8, scale: u32) {
    assert_eq!((d.width, d.height, d.channels), (3, 2, 1), "{format}");
    assert_eq!(
        (d.format, d.bit_depth, d.kind),
        (format, bit_depth, ImageKind::Grey)
    );
    let want: Vec<f32> = (0..2)
        .flat_map(|y| (0..3).map(move |x| (pattern(x, y, 0) * scale) as f32))
        .collect();
    assert_eq!(d.samples, want, "{format} {bit_depth}-bit");
}

fn check_rgb(d: &Decoded, format: Format, bit_depth: u8, scale: u32, tol: f32) {
    assert_eq!((d.width, d.height, d.channels), (3, 2, 3), "{format}");
    assert_eq!(
        (d.format, d.bit_depth, d.kind),
        (format, bit_depth, ImageKind::Colour)
    );
    for c in 0..3 {
        for y in 0..2 {
            for x in 0..3 {
                let got = d.samples[(c * 6 + y * 3 + x) as usize];
                let want = (pattern(x, y, c) * scale) as f32;
                assert!(
                    (got - want).abs() <= tol,
                    "{format} c{c} ({x},{y}): {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn generated_images_decode_planar_in_native_units() {
    let l8 = DynamicImage::ImageLuma8(ImageBuffer::from_fn(3, 2, |x, y| {
        Luma([pattern(x, y, 0) as u8])
    }));
    let la8 = DynamicImage::ImageLumaA8(ImageBuffer::from_fn(3, 2, |x, y| {
        LumaA([pattern(x, y, 0) as u8, 7])
    }));
    let l16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(3, 2, |x, y| {
        Luma([(pattern(x, y, 0) * 257) as u16])
    }));
    let rgb8 = DynamicImage::ImageRgb8(ImageBuffer::from_fn(3, 2, |x, y| {
        Rgb([
            pattern(x, y, 0) as u8,
            pattern(x, y, 1) as u8,
            pattern(x, y, 2) as u8,
        ])
    }));
    let rgba8 = DynamicImage::ImageRgba8(ImageBuffer::from_fn(3, 2, |x, y| {
        Rgba([
            pattern(x, y, 0) as u8,
            pattern(x, y, 1) as u8,
            pattern(x, y, 2) as u8,
            0,
        ])
    }));
    let rgb16 = DynamicImage::ImageRgb16(ImageBuffer::from_fn(3, 2, |x, y| {
        Rgb([
            (pattern(x, y, 0) * 257) as u16,
            (pattern(x, y, 1) * 257) as u16,
            (pattern(x, y, 2) * 257) as u16,
        ])
    }));

    check_grey(
        &dec(&encode(&l8, ImageFormat::Png)).unwrap(),
        Format::Png,
        8,
        1,
    );
    check_grey(
        &dec(&encode(&la8, ImageFormat::Png)).unwrap(),
        Format::Png,
        8,
        1,
    );
    check_grey(
        &dec(&encode(&l16, ImageFormat::Png)).unwrap(),
        Format::Png,
        16,
        257,
    );
    check_rgb(
        &dec(&encode(&rgb8, ImageFormat::Png)).unwrap(),
        Format::Png,
        8,
        1,
        0.0,
    );
    check_rgb(
        &dec(&encode(&rgba8, ImageFormat::Png)).unwrap(),
        Format::Png,
        8,
        1,
        0.0,
    );
    check_rgb(
        &dec(&encode(&rgb16, ImageFormat::Png)).unwrap(),
        Format::Png,
        16,
        257,
        0.0,
    );

    check_rgb(
        &dec(&encode(&rgb8, ImageFormat::Bmp)).unwrap(),
        Format::Bmp,
        8,
        1,
        0.0,
    );
    check_grey(
        &dec(&encode(&l8, ImageFormat::Tiff)).unwrap(),
        Format::Tiff,
        8,
        1,
    );
    check_grey(
        &dec(&encode(&l16, ImageFormat::Tiff)).unwrap(),
        Format::Tiff,
        16,
        257,
    );
    check_rgb(
        &dec(&encode(&rgb8, ImageFormat::Tiff)).unwrap(),
        Format::Tiff,
        8,
        1,
        0.0,
    );
    check_rgb(
        &dec(&encode(&rgb16, ImageFormat::Tiff)).unwrap(),
        Format::Tiff,
        16,
        257,
        0.0,
    );

    // JPEG is lossy: a flat image keeps its value closely.
    let flat = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(16, 16, Rgb([200, 100, 50])));
    let d = dec(&encode(&flat, ImageFormat::Jpeg)).unwrap();
    assert_eq!(
        (d.format, d.channels, d.bit_depth, d.kind),
        (Format::Jpeg, 3, 8, ImageKind::Colour)
    );
    for (c, want) in [200.0, 100.0, 50.0].iter().enumerate() {
        assert!((d.samples[c * 256 + 37] - want).abs() <= 3.0);
    }
    let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(8, 8, Luma([90])));
    let d = dec(&encode(&grey, ImageFormat::Jpeg)).unwrap();
    assert_eq!((d.channels, d.kind), (1, ImageKind::Grey));
    assert!((d.samples[10] - 90.0).abs() <= 2.0);
}

#[test]
fn real_ph2_and_lung_pngs() {
    let d = dec(&data("ph2/IMD002.png")).unwrap();
    assert_eq!(
        (d.width, d.height, d.channels, d.bit_depth),
        (765, 572, 3, 8)
    );
    assert_eq!(d.samples.len(), 3 * 765 * 572);
    // 8-bit photo without an explicit window: plain /255.
    let img = normalize(&d, None);
    assert_eq!(img.data[1000], d.samples[1000] / 255.0);
    assert_eq!((img.channels, img.kind), (3, ImageKind::Colour));

    let d = dec(&data("lung/ID_0000_Z_0142.png")).unwrap();
    assert_eq!(
        (d.width, d.height, d.channels, d.bit_depth),
        (512, 512, 1, 16)
    );
    assert_eq!(d.window, None);
    let max = d.samples.iter().copied().fold(0.0f32, f32::max);
    assert!(
        max > 1024.0 && max <= 65535.0,
        "value = HU + 1024, got max {max}"
    );
    // 16-bit: auto window; every value lands in [0, 1] and both ends are used.
    let img = load(
        &data("lung/ID_0000_Z_0142.png"),
        &DecodeOptions::default(),
        None,
    )
    .unwrap();
    assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(img.data.contains(&0.0) && img.data.contains(&1.0));
    // An explicit window in the file's units (HU + 1024) wins.
    let w = Window {
        center: -600.0 + 1024.0,
        width: 1500.0,
    };
    let img = normalize(&d, Some(w));
    let v = d.samples[300];
    let want = ((f64::from(v) - (w.center - 750.0)) / 1500.0).clamp(0.0, 1.0) as f32;
    assert_eq!(img.data[300], want);
}

#[test]
fn window_precedence() {
    let mut d = Decoded {
        width: 2,
        height: 1,
        channels: 1,
        samples: vec![0.0, 100.0],
        format: Format::Dicom,
        bit_depth: 16,
        kind: ImageKind::Grey,
        window: Some(Window {
            center: 100.0,
            width: 100.0,
        }),
        window_function: WindowFunction::Linear,
        dicom: None,
        orientation: 1,
    };
    assert_eq!(
        normalize(
            &d,
            Some(Window {
                center: 50.0,
                width: 100.0
            })
        )
        .data,
        vec![0.0, 1.0]
    );
    assert_eq!(normalize(&d, None).data, vec![0.0, 0.5]);
    // An invalid explicit window falls through to the next rule.
    assert_eq!(
        normalize(
            &d,
            Some(Window {
                center: 0.0,
                width: 0.0
            })
        )
        .data,
        vec![0.0, 0.5]
    );
    d.window = None;
    // 16-bit: auto window (0..100 here).
    assert_eq!(normalize(&d, None).data, vec![0.0, 1.0]);
    d.format = Format::Png;
    d.bit_depth = 8;
    assert_eq!(normalize(&d, None).data, vec![0.0, 100.0 / 255.0]);
}

#[test]
fn window_parsing() {
    let w: Window = "-600,1500".parse().unwrap();
    assert_eq!(
        w,
        Window {
            center: -600.0,
            width: 1500.0
        }
    );
    assert_eq!(w.to_string(), "-600,1500");
    assert_eq!(
        " 40 , 400 ".parse::<Window>().unwrap(),
        Window {
            center: 40.0,
            width: 400.0
        }
    );
    assert_eq!("2.5,0.5".parse::<Window>().unwrap().to_string(), "2.5,0.5");
    for bad in [
        "abc", "1", "1,0", "1,-5", "nan,3", "3,inf", "1,2,3", "", ",",
    ] {
        let e = bad.parse::<Window>().unwrap_err();
        assert!(
            matches!(e, ImagingError::InvalidWindow { .. }),
            "{bad}: {e}"
        );
    }
    assert!("1,0"
        .parse::<Window>()
        .unwrap_err()
        .to_string()
        .contains("width must be greater than 0"));
    assert!("nan,3"
        .parse::<Window>()
        .unwrap_err()
        .to_string()
        .contains("finite"));
    assert!(Window::new(1.0, -1.0).is_err());
}

#[test]
fn truncated_pngs_are_errors() {
    let full = data("ph2/IMD002.mask.png");
    for cut in (0..full.len() - 12)
        .step_by(97)
        .chain([1, 7, 8, 20, 33, 40])
    {
        assert!(dec(&full[..cut]).is_err(), "cut at {cut}");
    }
    // A PNG cut inside IDAT.
    let e = dec(&full[..full.len() / 2]).unwrap_err();
    assert!(
        matches!(
            e,
            ImagingError::Malformed {
                format: Format::Png,
                ..
            }
        ),
        "{e}"
    );
    // The same for a 16-bit PNG, TIFF and JPEG.
    let lung = data("lung/ID_0000_Z_0142.png");
    assert!(dec(&lung[..lung.len() / 3]).is_err());
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(64, 64, |x, y| {
        Rgb([x as u8, y as u8, 7])
    }));
    for fmt in [ImageFormat::Tiff, ImageFormat::Jpeg, ImageFormat::Bmp] {
        let b = encode(&img, fmt);
        for cut in [2, 8, 30, b.len() / 4, b.len() / 2, b.len() - 1] {
            assert!(dec(&b[..cut]).is_err(), "{fmt:?} cut at {cut} of {}", b.len());
        }
    }
}

/// A JPEG cut anywhere is refused, though its decoder would fill the missing rows with grey:
/// baseline, progressive (several scans) and with restart markers, cut at every byte.
#[test]
fn truncated_jpegs_are_errors() {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 24, |x, y| {
        Rgb([(x * 6) as u8, (y * 9) as u8, (x ^ y) as u8])
    }));
    let files = [
        ("baseline", encode(&img, ImageFormat::Jpeg)),
        ("progressive", data("raster/IMD002-progressive.jpg")),
        ("restart markers", data("raster/IMD002-restart.jpg")),
        ("EXIF", data("raster/IMD002-exif6.jpg")),
    ];
    for (what, full) in files {
        let d = dec(&full).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(d.format, Format::Jpeg);
        // Bytes after the end marker (some cameras append data) are not a cut.
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"\0\0trailer");
        assert!(dec(&trailing).is_ok(), "{what} with bytes after its end");
        for cut in 3..full.len() {
            match dec(&full[..cut]) {
                Err(ImagingError::Malformed { format: Format::Jpeg, .. }) => {}
                other => panic!("{what} cut at {cut} of {}: {other:?}", full.len()),
            }
        }
        let e = dec(&full[..full.len() * 2 / 3]).unwrap_err().to_string();
        assert!(e.contains("before the end-of-image marker") && e.contains("incomplete"), "{e}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut state = 0x853C49E6748FEA9Bu64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut dicm = vec![0u8; 128];
    dicm.extend_from_slice(b"DICM");
    let prefixes: [&[u8]; 8] = [
        b"",
        b"\x89PNG\r\n\x1a\n",
        &[0xFF, 0xD8, 0xFF],
        b"BM",
        b"II*\0",
        b"MM\0*",
        b"II+\0",
        &dicm,
    ];
    for prefix in prefixes {
        for len in [0usize, 1, 5, 17, 64, 300, 4096] {
            for _ in 0..20 {
                let mut b = prefix.to_vec();
                b.extend((0..len).map(|_| next() as u8));
                let _ = dec(&b);
                let _ = probe(&b, &DecodeOptions::default());
                let _ = decode_mask(&b);
            }
        }
    }
    // Valid headers followed by garbage.
    let png = png_header(64, 64);
    for _ in 0..50 {
        let mut b = png.clone();
        b.extend((0..200).map(|_| next() as u8));
        assert!(dec(&b).is_err());
    }
}

#[test]
fn masks_round_trip() {
    let mask = vec![true, false, false, true, true, false];
    let png = encode_mask_png(3, 2, &mask);
    let d = dec(&png).unwrap();
    assert_eq!((d.channels, d.bit_depth), (1, 8));
    assert_eq!(d.samples, vec![255.0, 0.0, 0.0, 255.0, 255.0, 0.0]);
    assert_eq!(decode_mask(&png).unwrap(), (3, 2, mask.clone()));

    // 0/1 masks work too (threshold is half of the image's own maximum).
    let ones = encode_labels_png(&LabelMap {
        width: 3,
        height: 2,
        data: vec![1, 0, 0, 1, 1, 0],
    });
    assert_eq!(decode_mask(&ones).unwrap().2, mask);
    // All background stays all background.
    let zeros = encode_mask_png(2, 2, &[false; 4]);
    assert_eq!(decode_mask(&zeros).unwrap().2, vec![false; 4]);

    let (w, h, m) = decode_mask(&data("ph2/IMD002.mask.png")).unwrap();
    assert_eq!((w, h, m.len()), (765, 572, 765 * 572));
    let fg = m.iter().filter(|&&b| b).count();
    assert!(
        fg > 1000 && fg < m.len() - 1000,
        "lesion mask foreground {fg}"
    );
    let (w, h, m) = decode_mask(&data("lung/ID_0000_Z_0142.mask.png")).unwrap();
    assert_eq!((w, h), (512, 512));
    assert!(m.iter().any(|&b| b));
}

#[test]
fn label_maps_pick_bit_depth() {
    let small = LabelMap {
        width: 2,
        height: 2,
        data: vec![0, 1, 2, 255],
    };
    let d = dec(&encode_labels_png(&small)).unwrap();
    assert_eq!(d.bit_depth, 8);
    assert_eq!(d.samples, vec![0.0, 1.0, 2.0, 255.0]);

    let big = LabelMap {
        width: 2,
        height: 2,
        data: vec![0, 1, 300, 65535],
    };
    let d = dec(&encode_labels_png(&big)).unwrap();
    assert_eq!(d.bit_depth, 16);
    assert_eq!(d.samples, vec![0.0, 1.0, 300.0, 65535.0]);

    let d = dec(&encode_grey_png16(3, 1, &[1, 2, 40000])).unwrap();
    assert_eq!(d.samples, vec![1.0, 2.0, 40000.0]);

    assert!(encode_labels_png(&LabelMap {
        width: 0,
        height: 5,
        data: vec![]
    })
    .is_empty());
    // Short data is padded with background rather than panicking.
    let d = dec(&encode_labels_png(&LabelMap {
        width: 2,
        height: 2,
        data: vec![5],
    }))
    .unwrap();
    assert_eq!(d.samples, vec![5.0, 0.0, 0.0, 0.0]);
}

#[test]
fn nearest_resize_matches_pytorch() {
    // 2×2 -> 4×4 (exact 2x), 4×4 -> 2×2 (src = 2·dst), identity, and 5 -> 3.
    let m = vec![true, false, false, true];
    let up = resize_mask_nearest(2, 2, &m, 4, 4);
    assert_eq!(
        up,
        vec![
            true, true, false, false, //
            true, true, false, false, //
            false, false, true, true, //
            false, false, true, true,
        ]
    );
    assert_eq!(resize_mask_nearest(4, 4, &up, 2, 2), m);
    assert_eq!(resize_mask_nearest(2, 2, &m, 2, 2), m);
    let row: Vec<bool> = (0..5).map(|i| i == 3).collect();
    // torch: F.interpolate(x, size=3, mode="nearest") takes columns [0, 1, 3].
    assert_eq!(
        resize_mask_nearest(5, 1, &row, 3, 1),
        vec![false, false, true]
    );
    // Degenerate inputs never panic.
    assert_eq!(resize_mask_nearest(0, 0, &[], 2, 2), vec![false; 4]);
    assert_eq!(
        resize_mask_nearest(3, 3, &[true], 2, 2),
        vec![true, false, false, false]
    );
    assert!(resize_mask_nearest(3, 3, &[true; 9], 0, 5).is_empty());
}

/// `bytes` with the JPEG segment that starts with marker FF `code` left out.
fn without_jpeg_segment(bytes: &[u8], code: u8) -> Vec<u8> {
    let mut i = 2;
    while bytes[i] == 0xFF && bytes[i + 1] != code {
        i += 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
    }
    assert_eq!(bytes[i + 1], code, "no FF {code:02X} segment before the first non-segment");
    let end = i + 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
    [&bytes[..i], &bytes[end..]].concat()
}

/// Pixel (x, y), channel c, of a planar decoded image.
fn at(d: &Decoded, c: usize, x: usize, y: usize) -> f32 {
    let (w, h) = (d.width as usize, d.height as usize);
    d.samples[c * w * h + y * w + x]
}

/// A camera JPEG whose Exif says "turned 90° clockwise" (6) and a TIFF whose Orientation tag
/// says "turned 90° counter-clockwise" (8) come out turned, as viewers show them: the same
/// pixels as the file without its tag, rotated, with width and height swapped.
#[test]
fn orientation_tags_are_applied() {
    let exif = data("raster/IMD002-exif6.jpg");
    let turned = dec(&exif).unwrap();
    let stored = dec(&without_jpeg_segment(&exif, 0xE1)).unwrap();
    assert_eq!((stored.width, stored.height, stored.orientation), (96, 72, 1));
    assert_eq!((turned.width, turned.height, turned.orientation), (72, 96, 6));
    for c in 0..3 {
        for y in 0..96 {
            for x in 0..72 {
                // Clockwise: the stored image's last row becomes the first column.
                assert_eq!(at(&turned, c, x, y), at(&stored, c, y, 71 - x), "({x}, {y}, {c})");
            }
        }
    }

    let tiff = data("raster/IMD002-grey-orient8.tif");
    // The Orientation entry (tag 0x0112, SHORT, count 1, value 8), little-endian, set to 1.
    let entry = [0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x00];
    let pos = tiff.windows(entry.len()).position(|w| w == entry).expect("the orientation entry");
    let mut plain = tiff.clone();
    plain[pos + 8] = 1;
    let (turned, stored) = (dec(&tiff).unwrap(), dec(&plain).unwrap());
    assert_eq!((stored.width, stored.height, stored.orientation, stored.channels), (96, 72, 1, 1));
    assert_eq!((turned.width, turned.height, turned.orientation), (72, 96, 8));
    for y in 0..96 {
        for x in 0..72 {
            // Counter-clockwise: the stored image's last column becomes the first row.
            assert_eq!(at(&turned, 0, x, y), at(&stored, 0, 95 - y, x), "({x}, {y})");
        }
    }
}
