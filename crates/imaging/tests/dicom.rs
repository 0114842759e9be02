//! DICOM decoding: the real pydicom test files plus synthetic objects written in
//! memory with dicom-object, covering the sample layouts that the files don't.

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use s3net_imaging::*;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn dec(bytes: &[u8]) -> Result<Decoded, ImagingError> {
    decode(bytes, &DecodeOptions::default())
}

/// Copies of `full` with bytes changed at random (xorshift from `seed`) at or after `from`:
/// `changes(k)` of them in the k-th copy. What the "never a panic" tests feed the decoder.
fn damaged<'a>(full: &'a [u8], from: usize, seed: u64, changes: impl Fn(usize) -> usize + 'a) -> impl Iterator<Item = Vec<u8>> + 'a {
    let mut state = seed;
    (0..).map(move |k| {
        let mut bytes = full.to_vec();
        for _ in 0..changes(k) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = from + (state as usize) % (bytes.len() - from);
            bytes[i] = (state >> 40) as u8;
        }
        bytes
    })
}

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const PATIENT: &str = "SECRETNAME^JOHN";

enum Pixels {
    None,
    U8(Vec<u8>),
    U16(Vec<u16>),
    Fragments(Vec<Vec<u8>>),
}

struct Spec {
    ts: &'static str,
    rows: u16,
    cols: u16,
    spp: u16,
    pi: &'static str,
    bits_allocated: u16,
    bits_stored: u16,
    high_bit: u16,
    signed: bool,
    planar: Option<u16>,
    frames: Option<&'static str>,
    rescale: Option<(&'static str, &'static str)>,
    window: Option<(&'static str, &'static str)>,
    pixels: Pixels,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            ts: EXPLICIT_LE,
            rows: 2,
            cols: 3,
            spp: 1,
            pi: "MONOCHROME2",
            bits_allocated: 16,
            bits_stored: 16,
            high_bit: 15,
            signed: false,
            planar: None,
            frames: None,
            rescale: None,
            window: None,
            pixels: Pixels::U16(vec![0, 1, 2, 3, 4, 5]),
        }
    }
}

fn us(tag: dicom_core::Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(v))
}

fn text(tag: dicom_core::Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn build(spec: Spec) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.5.1.4.1.1.7",
    ));
    obj.put(text(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        "1.2.826.0.1.3680043.2.1125.1",
    ));
    obj.put(text(tags::PATIENT_NAME, VR::PN, PATIENT));
    obj.put(text(tags::PATIENT_ID, VR::LO, "ID-998877"));
    obj.put(text(tags::MODALITY, VR::CS, "OT"));
    obj.put(us(tags::SAMPLES_PER_PIXEL, spec.spp));
    obj.put(text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, spec.pi));
    if let Some(p) = spec.planar {
        obj.put(us(tags::PLANAR_CONFIGURATION, p));
    }
    if let Some(f) = spec.frames {
        obj.put(text(tags::NUMBER_OF_FRAMES, VR::IS, f));
    }
    obj.put(us(tags::ROWS, spec.rows));
    obj.put(us(tags::COLUMNS, spec.cols));
    obj.put(us(tags::BITS_ALLOCATED, spec.bits_allocated));
    obj.put(us(tags::BITS_STORED, spec.bits_stored));
    obj.put(us(tags::HIGH_BIT, spec.high_bit));
    obj.put(us(tags::PIXEL_REPRESENTATION, u16::from(spec.signed)));
    if let Some((c, w)) = spec.window {
        obj.put(text(tags::WINDOW_CENTER, VR::DS, c));
        obj.put(text(tags::WINDOW_WIDTH, VR::DS, w));
    }
    if let Some((i, s)) = spec.rescale {
        obj.put(text(tags::RESCALE_INTERCEPT, VR::DS, i));
        obj.put(text(tags::RESCALE_SLOPE, VR::DS, s));
    }
    match spec.pixels {
        Pixels::None => {}
        Pixels::U8(v) => {
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PrimitiveValue::from(v),
            ));
        }
        Pixels::U16(v) => {
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(v.into()),
            ));
        }
        Pixels::Fragments(f) => {
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PixelFragmentSequence::new_fragments(f),
            ));
        }
    }
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(spec.ts))
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

/// Error messages and DicomInfo must never carry patient-identifying values.
fn assert_private(text: &str) {
    assert!(!text.contains("SECRETNAME"), "patient name leaked: {text}");
    assert!(!text.contains("998877"), "patient ID leaked: {text}");
}

#[test]
fn ct_small_in_hounsfield_units() {
    let d = dec(&data("dicom/CT_small.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels), (128, 128, 1));
    assert_eq!(d.format, Format::Dicom);
    assert_eq!(d.kind, ImageKind::Grey);
    assert_eq!(d.bit_depth, 16);
    assert_eq!(d.samples.len(), 128 * 128);
    // Stored value 175 at (0,0), Rescale Intercept −1024.
    assert_eq!(d.samples[0], 175.0 - 1024.0);
    let min = d.samples.iter().copied().fold(f32::INFINITY, f32::min);
    let max = d.samples.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(
        (-1024.0..-800.0).contains(&min),
        "darkest pixel should be air/lung in HU, got {min}"
    );
    assert!(
        max > 500.0 && max < 3072.0,
        "brightest pixel should be bone in HU, got {max}"
    );
    let info = d.dicom.clone().unwrap();
    assert_eq!(info.modality.as_deref(), Some("CT"));
    assert_eq!(info.photometric, "MONOCHROME2");
    assert_eq!(info.transfer_syntax, EXPLICIT_LE);
    assert_eq!(info.frames, 1);
    assert_eq!(info.bits_stored, 16);
    // Pixel Spacing "0.661468\0.661468".
    assert_eq!(info.pixel_spacing_mm, Some([0.661468, 0.661468]));
    assert_private(&format!("{info:?}"));

    // No window in the file: normalisation uses the automatic one.
    let img = normalize(&d, None);
    assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let lung: Window = "-600,1500".parse().unwrap();
    let img = normalize(&d, Some(lung));
    let expected = ((175.0 - 1024.0) - (-600.0 - 750.0)) / 1500.0;
    assert!((img.data[0] - expected as f32).abs() < 1e-6);
}

#[test]
fn mr_small_has_its_window() {
    let d = dec(&data("dicom/MR_small.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels), (64, 64, 1));
    assert_eq!(
        d.window,
        Some(Window {
            center: 600.0,
            width: 1600.0
        })
    );
    assert_eq!(d.dicom.as_ref().unwrap().modality.as_deref(), Some("MR"));
    assert_eq!(d.dicom.as_ref().unwrap().pixel_spacing_mm, Some([0.3125, 0.3125]));
    // The file's window is used when no explicit window is given.
    let img = normalize(&d, None);
    let v = d.samples[0];
    let expected = ((v as f64 - (600.0 - 800.0)) / 1600.0).clamp(0.0, 1.0) as f32;
    assert!((img.data[0] - expected).abs() < 1e-6);
}

#[test]
fn rgb_jpeg_baseline() {
    let d = dec(&data("dicom/SC_rgb_jpeg_dcmtk.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels), (100, 100, 3));
    assert_eq!(d.kind, ImageKind::Colour);
    assert_eq!(d.bit_depth, 8);
    let info = d.dicom.as_ref().unwrap();
    assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2.4.50");
    assert_eq!(info.photometric, "YBR_FULL");
    // Horizontal colour bands: red, green, blue, black, grey, white (lossy, ±2).
    let px = 100 * 100;
    let rgb = |y: usize| {
        let i = y * 100 + 50;
        [d.samples[i], d.samples[px + i], d.samples[2 * px + i]]
    };
    for (y, want) in [
        (5, [255., 0., 0.]),
        (25, [0., 255., 0.]),
        (45, [0., 0., 255.]),
        (65, [0., 0., 0.]),
        (95, [255., 255., 255.]),
    ] {
        let got = rgb(y);
        for c in 0..3 {
            assert!(
                (got[c] - want[c]).abs() <= 6.0,
                "row {y}: got {got:?}, want {want:?}"
            );
        }
    }
    // 8-bit DICOM without a window: auto window, not /255 (the rule is for photos).
    let img = load(
        &data("dicom/SC_rgb_jpeg_dcmtk.dcm"),
        &DecodeOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(img.channels, 3);
    assert_eq!(img.data.len(), 3 * px);
}

#[test]
fn frame_out_of_range_and_limits() {
    let ct = data("dicom/CT_small.dcm");
    let err = decode(
        &ct,
        &DecodeOptions {
            frame: 1,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        err,
        ImagingError::FrameOutOfRange {
            format: Format::Dicom,
            frame: 1,
            frames: 1
        }
    );
    assert!(err.to_string().contains("frame 1"));

    let small = DecodeOptions {
        limits: Limits {
            max_side: 100,
            max_pixels: 1_000_000,
        },
        frame: 0,
    };
    let err = decode(&ct, &small).unwrap_err();
    assert!(
        matches!(
            err,
            ImagingError::TooLarge {
                width: 128,
                height: 128,
                max_side: 100
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "image is 128×128 pixels, larger than the limit of 100 per side"
    );

    let few = DecodeOptions {
        limits: Limits {
            max_side: 1000,
            max_pixels: 10_000,
        },
        frame: 0,
    };
    assert!(matches!(
        decode(&ct, &few).unwrap_err(),
        ImagingError::TooManyPixels { .. }
    ));
}

#[test]
fn no_pixel_data() {
    let bytes = build(Spec {
        pixels: Pixels::None,
        ..Default::default()
    });
    let err = dec(&bytes).unwrap_err();
    assert_eq!(err, ImagingError::NoPixelData);
    assert_eq!(err.to_string(), "DICOM file has no pixel data");

    // A real file cut right before its Pixel Data element.
    let ct = data("dicom/CT_small.dcm");
    let at = ct
        .windows(4)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .unwrap();
    assert_eq!(dec(&ct[..at]).unwrap_err(), ImagingError::NoPixelData);
}

#[test]
fn truncated_and_corrupted_dicom_never_panics() {
    for name in [
        "dicom/CT_small.dcm",
        "dicom/MR_small.dcm",
        "dicom/SC_rgb_jpeg_dcmtk.dcm",
        "dicom/CT_small_j2k.dcm",
        "dicom/CT_small_rle.dcm",
        "dicom/SC_rgb_jpeg_lossless.dcm",
        "dicom/SC_jpeg_no_color_transform.dcm",
        "dicom/GDCMJ2K_TextGBR.dcm",
        "dicom/US_palette.dcm",
        "dicom/CT_small_enhanced_3frames.dcm",
    ] {
        let full = data(name);
        let mut cut = 0;
        while cut < full.len() {
            if let Err(e) = dec(&full[..cut]) {
                assert_private(&e.to_string());
            }
            cut += if cut < 1024 { 7 } else { 997 };
        }
        // Flip bytes all over the file.
        for bytes in damaged(&full, 132, 0x9E3779B97F4A7C15, |_| 8).take(200) {
            let _ = dec(&bytes);
        }
    }
}

#[test]
fn errors_do_not_leak_patient_data() {
    let cases = [
        Spec {
            pixels: Pixels::None,
            ..Default::default()
        },
        Spec {
            pixels: Pixels::U16(vec![1, 2]),
            ..Default::default()
        },
        Spec {
            pi: "PALETTE COLOR",
            ..Default::default()
        },
        Spec {
            pi: "SECRETNAME",
            ..Default::default()
        },
        Spec {
            bits_stored: 17,
            ..Default::default()
        },
        Spec {
            rescale: Some(("0", "0")),
            ..Default::default()
        },
        Spec {
            frames: Some("2"),
            ..Default::default()
        },
        Spec {
            ts: "1.2.840.10008.1.2.4.90",
            pixels: Pixels::Fragments(vec![vec![0; 16]]),
            ..Default::default()
        },
    ];
    for spec in cases {
        let bytes = build(spec);
        match dec(&bytes) {
            Ok(d) => assert_private(&format!("{d:?}")),
            Err(e) => {
                assert_private(&e.to_string());
                assert_private(&format!("{e:?}"));
            }
        }
    }
}

#[test]
fn unsupported_transfer_syntax() {
    // Video (MPEG-2).
    let bytes = build(Spec {
        ts: "1.2.840.10008.1.2.4.100",
        pixels: Pixels::Fragments(vec![vec![0, 0, 1, 0xB3, 0, 0]]),
        ..Default::default()
    });
    let err = dec(&bytes).unwrap_err();
    assert!(matches!(&err, ImagingError::UnsupportedTransferSyntax { uid, .. } if uid == "1.2.840.10008.1.2.4.100"), "{err}");
    assert!(err.to_string().contains("JPEG-LS, JPEG 2000 (also High-Throughput)"), "the supported ones are named: {err}");
}

/// Compressed files written by GDCM from the uncompressed ones (tools/make_dicom_codecs.py):
/// the lossless ones give exactly their source's samples, in HU for the CT.
#[test]
fn compressed_files_decode_to_their_sources_samples() {
    let ct = dec(&data("dicom/CT_small.dcm")).unwrap();
    for (name, ts) in [
        ("CT_small_jpeg_lossless", "1.2.840.10008.1.2.4.70"),
        ("CT_small_rle", "1.2.840.10008.1.2.5"),
        ("CT_small_j2k", "1.2.840.10008.1.2.4.90"),
        ("CT_small_jpegls", "1.2.840.10008.1.2.4.80"),
        ("CT_small_htj2k", "1.2.840.10008.1.2.4.201"),
    ] {
        let d = dec(&data(&format!("dicom/{name}.dcm"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((d.width, d.height, d.channels, d.bit_depth), (128, 128, 1, 16), "{name}");
        assert!(d.samples == ct.samples, "{name}: the samples differ from CT_small's");
        let info = d.dicom.unwrap();
        assert_eq!(info.transfer_syntax, ts, "{name}");
        // (GDCM writes the spacing back as 0.661467999999999.)
        let [r, c] = info.pixel_spacing_mm.unwrap();
        assert!((r - 0.661468).abs() < 1e-9 && (c - 0.661468).abs() < 1e-9, "{name}");
    }
    // JPEG-LS as CharLS wrote it (pydicom's test file): MR_small's samples.
    let mr = dec(&data("dicom/MR_small.dcm")).unwrap();
    let d = dec(&data("dicom/MR_small_jpeg_ls_lossless.dcm")).unwrap();
    assert!(d.samples == mr.samples && d.window == mr.window);
    // Lossy JPEG 2000 (the irreversible wavelet, 20:1): close, in HU.
    let d = dec(&data("dicom/CT_small_j2k_lossy.dcm")).unwrap();
    let n = ct.samples.len() as f64;
    let rms = (d.samples.iter().zip(&ct.samples).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>() / n).sqrt();
    let mean = ct.samples.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    eprintln!("lossy JPEG 2000: {rms:.1} HU rms error");
    assert!(rms > 0.0 && rms < 30.0, "{rms} HU rms (mean {mean:.0} HU)");

    // Colour, stored as YBR_FULL (RLE, lossless JPEG, JPEG 2000 without its colour transform)
    // or RGB: the colours of the JPEG baseline source (±2 for the two decoders' rounding).
    let sc = dec(&data("dicom/SC_rgb_jpeg_dcmtk.dcm")).unwrap();
    for name in ["SC_rgb_rle", "SC_rgb_jpeg_lossless", "SC_rgb_j2k", "SC_rgb_j2k_rgb"] {
        let d = dec(&data(&format!("dicom/{name}.dcm"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((d.width, d.height, d.channels, d.kind), (100, 100, 3, ImageKind::Colour), "{name}");
        let worst = d.samples.iter().zip(&sc.samples).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 2.0, "{name}: a sample is {worst} away from the source's");
    }
}

/// A JPEG 2000 codestream is checked against the data set before the codec sees it, and so is
/// a JPEG-LS frame header.
#[test]
fn jpeg_2000_headers_are_checked_first() {
    let mut jls = data("dicom/CT_small_jpegls.dcm");
    let sof = jls.windows(2).position(|w| w == [0xFF, 0xF7]).unwrap();
    jls[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let err = dec(&jls).unwrap_err();
    assert!(err.to_string().contains("60000×60000"), "{err}");

    let j2k = data("dicom/CT_small_j2k.dcm");
    let siz = j2k.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51]).unwrap() + 2;
    let patched = |at: usize, bytes: &[u8]| {
        let mut d = j2k.clone();
        d[siz + at..siz + at + bytes.len()].copy_from_slice(bytes);
        d
    };
    let t = std::time::Instant::now();
    // 60000×60000 (Xsiz, Ysiz).
    let err = dec(&patched(6, &[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60])).unwrap_err();
    assert!(err.to_string().contains("JPEG 2000 image is 60000×60000 pixels but Rows/Columns say 128×128"), "{err}");
    // 1×1-pixel tiles: 16384 of them.
    let err = dec(&patched(22, &[0, 0, 0, 1, 0, 0, 0, 1])).unwrap_err();
    assert!(err.to_string().contains("16384 tiles"), "{err}");
    // A zero subsampling.
    let err = dec(&patched(41, &[0])).unwrap_err();
    assert!(err.to_string().contains("zero subsampling"), "{err}");
    // (Decoding any of them would take far longer; the bound leaves room for a loaded machine.)
    assert!(t.elapsed().as_millis() < 2000, "{:?}", t.elapsed());
    // JPEG 2000's transfer syntax, and no codestream.
    let bytes = build(Spec {
        ts: "1.2.840.10008.1.2.4.90",
        pixels: Pixels::Fragments(vec![vec![0x12; 64]]),
        ..Default::default()
    });
    let err = dec(&bytes).unwrap_err();
    assert!(err.to_string().contains("no JPEG 2000 codestream"), "{err}");
}

/// Damage inside the compressed pixel data, where the codecs read: an error or an image, never
/// a panic, and quickly.
#[test]
fn damaged_compressed_pixel_data_never_panics() {
    for name in ["CT_small_j2k", "CT_small_j2k_lossy", "CT_small_htj2k", "CT_small_rle", "CT_small_jpeg_lossless", "CT_small_jpegls", "SC_rgb_j2k", "SC_rgb_jpeg_lossless", "SC_rgb_rle", "CT_small_jpeg12_2frames", "JPGExtended", "CT_small_jxl", "CT_small_jxl_lossy", "SC_rgb_jxl"] {
        let full = data(&format!("dicom/{name}.dcm"));
        // The pixel data element's value: the last (7FE0,0010) tag.
        let from = full.windows(4).rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00]).unwrap() + 12;
        let (mut failed, t) = (0, std::time::Instant::now());
        for (round, bytes) in damaged(&full, from, 0x2545F4914F6CDD1D, |round| 1 + round % 4).take(300).enumerate() {
            match dec(&bytes) {
                Err(ImagingError::DecoderPanicked { .. }) => panic!("{name}: the codec panicked (round {round})"),
                Err(e) => {
                    assert_private(&e.to_string());
                    failed += 1;
                }
                Ok(d) => assert_eq!(d.samples.len(), (d.width * d.height) as usize * usize::from(d.channels)),
            }
        }
        eprintln!("{name}: 300 damaged copies, {failed} refused, {:?}", t.elapsed());
        assert!(t.elapsed().as_secs() < 60, "{name}: {:?}", t.elapsed());
    }
}

#[test]
fn implicit_vr_signed_rescaled_with_window() {
    // 12 bits stored in 16, signed: 0x0FFF is −1, 0x0800 is −2048; high garbage bits ignored.
    let bytes = build(Spec {
        ts: IMPLICIT_LE,
        bits_stored: 12,
        high_bit: 11,
        signed: true,
        rescale: Some(("-1024", "2")),
        window: Some(("40\\50", "400\\500")),
        pixels: Pixels::U16(vec![0, 1, 0x0FFF, 0x0800, 0xF7FF, 0xF001]),
        ..Default::default()
    });
    let d = dec(&bytes).unwrap();
    assert_eq!(d.dicom.as_ref().unwrap().transfer_syntax, IMPLICIT_LE);
    assert_eq!(d.dicom.as_ref().unwrap().bits_stored, 12);
    let stored = [0.0, 1.0, -1.0, -2048.0, 2047.0, 1.0];
    let want: Vec<f32> = stored.iter().map(|s| (s * 2.0 - 1024.0) as f32).collect();
    assert_eq!(d.samples, want);
    assert_eq!(
        d.window,
        Some(Window {
            center: 40.0,
            width: 400.0
        })
    );
}

#[test]
fn monochrome1_is_inverted_with_its_window() {
    let bytes = build(Spec {
        pi: "MONOCHROME1",
        bits_allocated: 8,
        bits_stored: 8,
        high_bit: 7,
        window: Some(("20", "10")),
        pixels: Pixels::U8(vec![10, 20, 30, 40, 50, 60]),
        ..Default::default()
    });
    let d = dec(&bytes).unwrap();
    assert_eq!(d.samples, vec![60.0, 50.0, 40.0, 30.0, 20.0, 10.0]);
    // min + max = 70, so the window centre 20 becomes 50.
    assert_eq!(
        d.window,
        Some(Window {
            center: 50.0,
            width: 10.0
        })
    );
    assert_eq!(d.dicom.as_ref().unwrap().photometric, "MONOCHROME1");
    assert_eq!(d.bit_depth, 8);
}

#[test]
fn rgb_interleaved_and_planar_and_ybr() {
    let interleaved = build(Spec {
        spp: 3,
        pi: "RGB",
        bits_allocated: 8,
        bits_stored: 8,
        high_bit: 7,
        planar: Some(0),
        rows: 1,
        cols: 2,
        pixels: Pixels::U8(vec![1, 2, 3, 4, 5, 6]),
        ..Default::default()
    });
    let d = dec(&interleaved).unwrap();
    assert_eq!((d.channels, d.kind), (3, ImageKind::Colour));
    assert_eq!(d.samples, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);

    let planar = build(Spec {
        spp: 3,
        pi: "RGB",
        bits_allocated: 8,
        bits_stored: 8,
        high_bit: 7,
        planar: Some(1),
        rows: 1,
        cols: 2,
        pixels: Pixels::U8(vec![1, 4, 2, 5, 3, 6]),
        ..Default::default()
    });
    assert_eq!(
        dec(&planar).unwrap().samples,
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );

    // YBR_FULL: (Y, 128, 128) is grey Y; pure red is (76, 85, 255).
    let ybr = build(Spec {
        spp: 3,
        pi: "YBR_FULL",
        bits_allocated: 8,
        bits_stored: 8,
        high_bit: 7,
        planar: Some(0),
        rows: 1,
        cols: 2,
        pixels: Pixels::U8(vec![100, 128, 128, 76, 85, 255]),
        ..Default::default()
    });
    let d = dec(&ybr).unwrap();
    assert_eq!(d.dicom.as_ref().unwrap().photometric, "YBR_FULL");
    let got: Vec<f32> = d.samples.iter().map(|v| v.round()).collect();
    assert_eq!(got[0], 100.0);
    assert_eq!(got[2], 100.0);
    assert_eq!(got[4], 100.0);
    assert!(
        (got[1] - 255.0).abs() <= 2.0 && got[3] <= 2.0 && got[5] <= 2.0,
        "{got:?}"
    );
}

#[test]
fn multi_frame_selects_frame() {
    let bytes = build(Spec {
        frames: Some("3"),
        rows: 1,
        cols: 2,
        pixels: Pixels::U16(vec![1, 2, 3, 4, 5, 6]),
        ..Default::default()
    });
    for f in 0..3u32 {
        let d = decode(
            &bytes,
            &DecodeOptions {
                frame: f,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(d.samples, vec![(2 * f + 1) as f32, (2 * f + 2) as f32]);
        assert_eq!(d.dicom.as_ref().unwrap().frames, 3);
    }
    assert_eq!(
        decode(
            &bytes,
            &DecodeOptions {
                frame: 3,
                ..Default::default()
            }
        )
        .unwrap_err(),
        ImagingError::FrameOutOfRange {
            format: Format::Dicom,
            frame: 3,
            frames: 3
        }
    );
}

#[test]
fn explicit_big_endian() {
    {
        let ts = "1.2.840.10008.1.2.2";
        let bytes = build(Spec {
            ts,
            signed: true,
            pixels: Pixels::U16(vec![0, 1, 2, 1000, 0xFFFF, 0x8000]),
            ..Default::default()
        });
        let d = dec(&bytes).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert_eq!(
            d.samples,
            vec![0.0, 1.0, 2.0, 1000.0, -1.0, -32768.0],
            "{ts}"
        );
        assert_eq!(d.dicom.as_ref().unwrap().transfer_syntax, ts);
    }
}

#[test]
fn short_pixel_data_is_an_error() {
    let bytes = build(Spec {
        pixels: Pixels::U16(vec![1, 2]),
        ..Default::default()
    });
    let err = dec(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            ImagingError::Malformed {
                format: Format::Dicom,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn declared_lengths_beyond_the_file_fail_fast() {
    // Patient Name claiming 4 GiB in a tiny file: must fail without allocating it.
    let mut bytes = build(Spec::default());
    let at = bytes
        .windows(4)
        .position(|w| w == [0x10, 0x00, 0x10, 0x00])
        .unwrap();
    // explicit VR: tag(4) "PN"(2) len(2) -> turn it into an OB with a 4-byte length.
    let mut evil = bytes[..at].to_vec();
    evil.extend_from_slice(&[
        0x10, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
    ]);
    evil.extend_from_slice(&[0u8; 64]);
    let t = std::time::Instant::now();
    let err = dec(&evil).unwrap_err();
    assert!(t.elapsed().as_millis() < 2000, "took {:?}", t.elapsed());
    assert!(
        matches!(
            err,
            ImagingError::Malformed {
                format: Format::Dicom,
                ..
            }
        ),
        "{err}"
    );

    // Corrupting the real files must stay fast too.
    bytes = data("dicom/CT_small.dcm");
    let t = std::time::Instant::now();
    for b in damaged(&bytes, 132, 0x2545F4914F6CDD1D, |_| 8).take(100) {
        let _ = dec(&b);
    }
    assert!(
        t.elapsed().as_secs() < 5,
        "100 corrupted files took {:?}",
        t.elapsed()
    );
}

#[test]
fn jpeg_header_larger_than_rows_columns_is_rejected() {
    let jpeg = data("dicom/SC_rgb_jpeg_dcmtk.dcm");
    let mut d = jpeg.clone();
    // Find the SOF0 segment (FF C0) and claim 60000×60000.
    let sof = d.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    d[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let t = std::time::Instant::now();
    let err = dec(&d).unwrap_err();
    assert!(t.elapsed().as_millis() < 2000, "{:?}", t.elapsed());
    assert!(err.to_string().contains("60000×60000"), "{err}");
}

/// `plain` (explicit VR little endian, as `build` writes it) in Deflated Explicit VR Little
/// Endian: the meta's transfer syntax relabelled, the data set after it raw-deflated (or left
/// as it is, without `deflate`).
fn relabel_deflated(plain: &[u8], deflate: bool) -> Vec<u8> {
    let uid = b"1.2.840.10008.1.2.1\0";
    let at = plain.windows(uid.len()).position(|w| w == uid).unwrap();
    let mut d = plain[..at - 2].to_vec();
    d.extend_from_slice(&22u16.to_le_bytes());
    d.extend_from_slice(b"1.2.840.10008.1.2.1.99");
    // The meta group length (0002,0000) UL at offset 140 counts what follows it.
    let gl = u32::from_le_bytes([plain[140], plain[141], plain[142], plain[143]]);
    let meta_end = 144 + gl as usize;
    d.extend_from_slice(&plain[at + uid.len()..meta_end]);
    d[140..144].copy_from_slice(&(gl + 2).to_le_bytes());
    if deflate {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, &plain[meta_end..]).unwrap();
        d.extend_from_slice(&z.finish().unwrap());
    } else {
        d.extend_from_slice(&plain[meta_end..]);
    }
    d
}

/// Deflated Explicit VR Little Endian: inflated (at most 64 MiB) before the length checks and
/// the parser see the data set. DCMTK's `dcmconv +td` of CT_small gives exactly its samples;
/// pydicom's own deflated test file gives what pydicom reads.
#[test]
fn deflated_data_sets_are_inflated_within_a_bound() {
    let ct = dec(&data("dicom/CT_small.dcm")).unwrap();
    let bytes = data("dicom/CT_small_deflated.dcm");
    let d = dec(&bytes).unwrap();
    assert!(d.samples == ct.samples && d.window == ct.window);
    assert_eq!(d.dicom.as_ref().unwrap().transfer_syntax, "1.2.840.10008.1.2.1.99");
    assert_eq!(probe(&bytes, &DecodeOptions::default()).unwrap(), probe(&data("dicom/CT_small.dcm"), &DecodeOptions::default()).unwrap());
    assert_eq!(dicom_source(&bytes, 0).unwrap().size(), (128, 128));
    // pydicom's image_dfl.dcm (512² 8-bit): its sum and three pixels as pydicom 3 reads them.
    let d = dec(&data("dicom/image_dfl.dcm")).unwrap();
    assert_eq!((d.width, d.height), (512, 512));
    assert_eq!(d.samples.iter().map(|&v| v as u64).sum::<u64>(), 33322688);
    assert_eq!([d.samples[0], d.samples[256 * 512 + 256], d.samples[100 * 512 + 400]], [213.0, 65.0, 70.0]);
    // Ours, through the same path: the synthetic 2×3 image.
    let plain = build(Spec::default());
    assert_eq!(dec(&relabel_deflated(&plain, true)).unwrap().samples, dec(&plain).unwrap().samples);
    // Said to be deflated but not: refused by name.
    let err = dec(&relabel_deflated(&plain, false)).unwrap_err();
    assert!(err.to_string().contains("deflated data set cannot be inflated"), "{err}");
    // A bomb: 65 MiB of pixel data in 65 KB. Refused once 64 MiB are inflated, not held whole.
    let big = build(Spec { rows: 4096, cols: 8200, pixels: Pixels::U16(vec![0; 4096 * 8200]), ..Spec::default() });
    let bomb = relabel_deflated(&big, true);
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    let err = dec(&bomb).unwrap_err();
    assert!(err.to_string().contains("a deflated data set that inflates past 64 MiB is not supported"), "{err}");
    let err = probe(&bomb, &DecodeOptions::default()).unwrap_err();
    assert!(matches!(err, ImagingError::Unsupported { .. }), "{err}");
    // Damaged deflate streams: an error or an image, never a panic (which `decode` would turn
    // into DecoderPanicked).
    for b in damaged(&bytes, 400, 0x9E3779B97F4A7C15, |_| 4).take(300) {
        if let Err(e) = dec(&b) {
            assert!(!matches!(e, ImagingError::DecoderPanicked { .. }), "{e}");
        }
    }
}

/// Files other toolkits wrote, from pydicom's test set (MIT): read as pydicom 3.0 reads them.
#[test]
fn files_from_other_toolkits_read_as_pydicom_reads_them() {
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    // JPEG 2000, irreversible, signed samples (NEMA WG04's NM1_J2KI, edited).
    let d = dec(&data("dicom/JPEG2000.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels), (256, 1024, 1));
    let min = d.samples.iter().copied().fold(f32::INFINITY, f32::min);
    let max = d.samples.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!((sum(&d.samples), min, max), (3527976.0, -30.0, 245.0));
    // JPEG 2000 with its reversible colour transform (YBR_RCT), from GDCM: undone by the codec.
    let d = dec(&data("dicom/GDCMJ2K_TextGBR.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels), (400, 400, 3));
    let px = 400 * 400;
    let planes: Vec<f64> = (0..3).map(|c| sum(&d.samples[c * px..(c + 1) * px])).collect();
    assert_eq!(planes, [19605686.0, 20227141.0, 19896396.0]);
    // An RGB JPEG with no colour marker at all (a whole-slide tile): RGB, as DICOM says (it
    // came out up to 137 off when taken for YCbCr). pydicom's sums of its planes, ±1 a pixel
    // at most for the two decoders' rounding.
    let d = dec(&data("dicom/SC_jpeg_no_color_transform.dcm")).unwrap();
    let px = 256 * 256;
    for (c, want) in [15989165.0, 15989249.0, 15988353.0].into_iter().enumerate() {
        let got = sum(&d.samples[c * px..(c + 1) * px]);
        assert!((got - want).abs() < 300.0, "plane {c}: {got} against {want}");
    }
    // 32-bit samples, big endian as little endian (the dose grid of an RT Dose).
    let le = dec(&data("dicom/rtdose_1frame.dcm")).unwrap();
    let be = dec(&data("dicom/rtdose_expb_1frame.dcm")).unwrap();
    assert!(be.samples == le.samples);
    assert_eq!(le.samples.iter().copied().fold(0.0f32, f32::max), 1254000.0);
    // What cannot be read is named.
    let e = dec(&data("dicom/SC_rgb_rle_32bit.dcm")).unwrap_err();
    assert!(e.to_string().contains("RLE Lossless with Bits Allocated 32 is not supported"), "{e}");
}

/// Uncompressed YBR_FULL_422 (two pixels' Y, then their shared Cb and Cr): pydicom's test file
/// gives the RGB pydicom 3 gives (tools/make_dicom_display.py), to within the two converters'
/// rounding; what the layout cannot be is refused by name.
#[test]
fn uncompressed_ybr_full_422() {
    let bytes = data("dicom/SC_ybr_full_422_uncompressed.dcm");
    let d = dec(&bytes).unwrap();
    assert_eq!((d.width, d.height, d.channels, d.kind), (100, 100, 3, ImageKind::Colour));
    assert_eq!(d.dicom.as_ref().unwrap().photometric, "YBR_FULL_422");
    let r = dec(&data("dicom/SC_ybr_full_422_uncompressed.pydicom.png")).unwrap();
    let max = d.samples.iter().zip(&r.samples).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    eprintln!("at most {max} from pydicom's RGB");
    assert!(max <= 1.0, "{max}");
    // The same bytes with an odd number of columns, planar, or 16-bit, or too few of them:
    // refused, not misread.
    for (tag, value, says) in [
        (tags::COLUMNS, PrimitiveValue::from(99u16), "an even number of Columns"),
        (tags::PLANAR_CONFIGURATION, PrimitiveValue::from(1u16), "Planar Configuration 0"),
        (tags::BITS_ALLOCATED, PrimitiveValue::from(16u16), "3 samples of 8 bits, not 3 of 16"),
    ] {
        let e = dec(&with_elements(&bytes, vec![DataElement::new(tag, VR::US, value)])).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
    }
    let short = DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(vec![0u8; 1000].into()));
    let e = dec(&with_elements(&bytes, vec![short])).unwrap_err();
    assert!(e.to_string().contains("shorter than"), "{e}");
}

/// 12-bit lossy JPEG (JPEG Extended, process 4; our decoder, `jpeg12.rs`) against libjpeg-turbo
/// 3's decode of the same frames (tools/make_dicom_jpeg12.py): libjpeg-turbo from IJG's codec,
/// pydicom's JPGExtended.dcm from another encoder, and the same image with a scan header that
/// says Se = 0 (JPEG-lossy.dcm), which sequential decoders ignore.
#[test]
fn twelve_bit_lossy_jpeg_decodes_as_libjpeg_turbo_does() {
    for (file, frame, reference, intercept) in [
        ("CT_small_jpeg12_2frames", 0, "CT_small_jpeg12_2frames.frame0", -1024.0),
        ("CT_small_jpeg12_2frames", 1, "CT_small_jpeg12_2frames.frame1", -1024.0),
        ("JPGExtended", 0, "JPGExtended.frame0", 0.0),
        ("JPEG-lossy", 0, "JPGExtended.frame0", 0.0),
    ] {
        let d = decode(&data(&format!("dicom/{file}.dcm")), &DecodeOptions { frame, ..Default::default() }).unwrap();
        let r = dec(&data(&format!("dicom/{reference}.libjpeg.png"))).unwrap();
        assert_eq!((d.width, d.height, d.channels), (r.width, r.height, 1), "{file}");
        let diff: Vec<f32> = d.samples.iter().zip(&r.samples).map(|(a, b)| (a - intercept - b).abs()).collect();
        let max = diff.iter().copied().fold(0.0, f32::max);
        let off = diff.iter().filter(|&&x| x > 0.0).count();
        eprintln!("{file} frame {frame}: max {max}, {off} of {} samples differ", diff.len());
        assert!(max <= 1.0, "{file} frame {frame}: {max}");
        assert_eq!(d.dicom.as_ref().unwrap().transfer_syntax, "1.2.840.10008.1.2.4.51");
    }
    // Lossy, but the slice: within a few HU of the uncompressed CT (the second frame is it
    // upside down).
    let ct = dec(&data("dicom/CT_small.dcm")).unwrap();
    for frame in 0..2 {
        let d = decode(&data("dicom/CT_small_jpeg12_2frames.dcm"), &DecodeOptions { frame, ..Default::default() }).unwrap();
        let mean = (0..128 * 128)
            .map(|i| {
                let (y, x) = (i / 128, i % 128);
                let y = if frame == 0 { y } else { 127 - y };
                f64::from((d.samples[i] - ct.samples[y * 128 + x]).abs())
            })
            .sum::<f64>()
            / (128.0 * 128.0);
        assert!(mean < 10.0, "frame {frame}: {mean} HU off on average");
        eprintln!("frame {frame}: {mean:.2} HU off on average");
    }
}

/// An Enhanced CT (tools/make_dicom_codecs.py): its Rescale and Window are in each frame's
/// functional group, its Pixel Spacing in the shared one. Each frame stores the same image with
/// its own intercept, so each decodes to the same Hounsfield units, with its own window.
#[test]
fn enhanced_multi_frame_attributes_come_from_the_functional_groups() {
    let ct = dec(&data("dicom/CT_small.dcm")).unwrap();
    let hu: Vec<f32> = (0..64 * 64).map(|i| ct.samples[(i / 64) * 2 * 128 + (i % 64) * 2]).collect();
    let bytes = data("dicom/CT_small_enhanced_3frames.dcm");
    for (frame, (center, width)) in [(40.0, 400.0), (-600.0, 1500.0), (300.0, 1500.0)].into_iter().enumerate() {
        let d = decode(&bytes, &DecodeOptions { frame: frame as u32, ..Default::default() }).unwrap();
        assert_eq!((d.width, d.height), (64, 64));
        assert!(d.samples == hu, "frame {frame}: not CT_small's Hounsfield units");
        assert_eq!(d.window, Some(Window { center, width }), "frame {frame}");
        let info = d.dicom.unwrap();
        assert_eq!((info.frames, info.pixel_spacing_mm), (3, Some([0.5, 0.75])), "frame {frame}");
    }
}

/// PALETTE COLOR (an ultrasound's, cut from pydicom's example; tools/make_dicom_codecs.py): each
/// index through its lookup tables, to the high bytes of pydicom's colours.
#[test]
fn palette_colour_goes_through_its_lookup_tables() {
    let d = dec(&data("dicom/US_palette.dcm")).unwrap();
    assert_eq!((d.width, d.height, d.channels, d.kind, d.bit_depth), (200, 120, 3, ImageKind::Colour, 8));
    let px = 200 * 120;
    let planes: Vec<f64> = (0..3).map(|c| d.samples[c * px..(c + 1) * px].iter().map(|&v| f64::from(v)).sum()).collect();
    assert_eq!(planes, [678328.0, 980097.0, 1367323.0]);
    assert_eq!(d.dicom.unwrap().photometric, "PALETTE COLOR");
}

/// Segmented PALETTE COLOR tables (discrete, linear and indirect segments;
/// tools/make_dicom_display.py) give pydicom 3's colours, high bytes, exactly; tables that do
/// not expand to their declared length, or cannot be expanded, are refused by name.
#[test]
fn segmented_palette_tables_are_expanded() {
    let bytes = data("dicom/US_segmented_palette.dcm");
    let d = dec(&bytes).unwrap();
    assert_eq!((d.width, d.height, d.channels), (96, 96, 3));
    let r = dec(&data("dicom/US_segmented_palette.pydicom.png")).unwrap();
    assert!(d.samples == r.samples, "not pydicom's colours");
    let red = |segments: &[u16]| {
        let words: Vec<u8> = segments.iter().flat_map(|w| w.to_le_bytes()).collect();
        with_elements(&bytes, vec![DataElement::new(tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA, VR::OW, PrimitiveValue::U8(words.into()))])
    };
    for (segments, says) in [
        (vec![0, 3, 1, 2, 3], "expands to 3 entries, not the 256"),
        (vec![0, 3, 1, 2, 3, 1, 300, 9], "expands past the 256 entries"),
        (vec![1, 256, 9], "starts with a linear segment"),
        (vec![2, 1, 0, 0], "starts with an indirect segment"),
        (vec![0, 1, 5, 2, 1, 3, 0], "indirect segment within an indirect one"),
        (vec![0, 1, 5, 7, 1, 1], "segment of unknown type"),
        (vec![0, 300, 1], "runs past its data"),
    ] {
        let e = dec(&red(&segments)).unwrap_err();
        assert!(e.to_string().contains(says), "{segments:?}: {e}");
    }
    // A few words can describe many entries (a linear segment of 65535): expansion stops past
    // the declared count.
    let e = dec(&red(&[0, 1, 0, 1, 65535, 9])).unwrap_err();
    assert!(e.to_string().contains("expands past"), "{e}");
}

/// `bytes` with `elements` added (sequences of one item each, given as their elements).
fn with_elements(bytes: &[u8], elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&bytes[128..])
        .unwrap();
    for e in elements {
        obj.put(e);
    }
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn lut_sequence(tag: dicom_core::Tag, descriptor: [u16; 3], data: Option<Vec<u16>>) -> DataElement<InMemDicomObject> {
    let mut item = InMemDicomObject::new_empty();
    item.put(DataElement::new(tags::LUT_DESCRIPTOR, VR::US, PrimitiveValue::U16(descriptor.to_vec().into())));
    if let Some(d) = data {
        item.put(DataElement::new(tags::LUT_DATA, VR::US, PrimitiveValue::U16(d.into())));
    }
    DataElement::new(tag, VR::SQ, dicom_core::value::DataSetSequence::from(vec![item]))
}

/// The LUTs a DICOM file may carry instead of, or beside, Rescale and Window: a Modality LUT
/// Sequence maps the stored values (values outside its range take its end entries), a VOI LUT
/// Sequence's input range is the window where Window Center/Width are absent, and Presentation
/// LUT Shape INVERSE shows a MONOCHROME2 image inverted.
#[test]
fn modality_voi_and_presentation_luts() {
    let plain = build(Spec::default()); // 2×3, values 0..5
    let modality = with_elements(&plain, vec![lut_sequence(tags::MODALITY_LUT_SEQUENCE, [4, 1, 16], Some(vec![100, 200, 300, 400]))]);
    assert_eq!(dec(&modality).unwrap().samples, [100.0, 100.0, 200.0, 300.0, 400.0, 400.0]);
    // Rescale Slope/Intercept, where present, win (the two may not be used together).
    let both = with_elements(
        &build(Spec { rescale: Some(("-10", "2")), ..Spec::default() }),
        vec![lut_sequence(tags::MODALITY_LUT_SEQUENCE, [4, 1, 16], Some(vec![100, 200, 300, 400]))],
    );
    assert_eq!(dec(&both).unwrap().samples, [-10.0, -8.0, -6.0, -4.0, -2.0, 0.0]);
    // A LUT whose data are not of the length it declares is ignored.
    let short = with_elements(&plain, vec![lut_sequence(tags::MODALITY_LUT_SEQUENCE, [4, 1, 16], Some(vec![100, 200]))]);
    assert_eq!(dec(&short).unwrap().samples, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // The VOI LUT's input range: 1000 values from 200; without its data, a linear window over it.
    let voi = with_elements(&plain, vec![lut_sequence(tags::VOILUT_SEQUENCE, [1000, 200, 12], None)]);
    let d = dec(&voi).unwrap();
    assert_eq!((d.window, &d.window_function), (Some(Window { center: 700.0, width: 1000.0 }), &WindowFunction::Linear));
    // With data, its curve, stretched over its own range: values 1..4 to 10, 40, 20, 30.
    let table = with_elements(&plain, vec![lut_sequence(tags::VOILUT_SEQUENCE, [4, 1, 16], Some(vec![10, 40, 20, 30]))]);
    let d = dec(&table).unwrap();
    assert_eq!(d.window_function, WindowFunction::Table { first: 1.0, grey: vec![0.0, 1.0, 1.0 / 3.0, 2.0 / 3.0] });
    assert_eq!(d.given_window(None).map(|(_, f)| f.name()), Some("TABLE"));
    assert_eq!(normalize(&d, None).data, [0.0, 0.0, 1.0, 1.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0]);
    // A window asked for is linear, whatever the file's function.
    let asked = Window { center: 2.5, width: 5.0 };
    assert_eq!(d.given_window(Some(asked)).map(|(_, f)| f.name()), Some("LINEAR"));
    assert_eq!(normalize(&d, Some(asked)).data, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
    // A flat table, or one of another length than declared: a linear window over its range.
    for data in [vec![7, 7, 7, 7], vec![10, 40]] {
        let d = dec(&with_elements(&plain, vec![lut_sequence(tags::VOILUT_SEQUENCE, [4, 1, 16], Some(data))])).unwrap();
        assert_eq!((d.window, &d.window_function), (Some(Window { center: 3.0, width: 4.0 }), &WindowFunction::Linear));
    }
    // MONOCHROME1 (or INVERSE): the table read backwards and its greys inverted.
    let mono1 = with_elements(
        &build(Spec { pi: "MONOCHROME1", ..Spec::default() }),
        vec![lut_sequence(tags::VOILUT_SEQUENCE, [4, 1, 16], Some(vec![10, 40, 20, 30]))],
    );
    let grey = normalize(&dec(&mono1).unwrap(), None).data;
    let want = [1.0, 1.0, 0.0, 2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
    assert!(grey.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{grey:?}");
    // VOI LUT Function SIGMOID goes with Window Center/Width; LINEAR_EXACT is linear.
    let sigmoid = with_elements(
        &build(Spec { window: Some(("2", "4")), ..Spec::default() }),
        vec![text(tags::VOILUT_FUNCTION, VR::CS, "SIGMOID")],
    );
    let d = dec(&sigmoid).unwrap();
    assert_eq!(d.window_function, WindowFunction::Sigmoid);
    assert_eq!(normalize(&d, None).data[2], 0.5);
    let exact = with_elements(
        &build(Spec { window: Some(("2", "4")), ..Spec::default() }),
        vec![text(tags::VOILUT_FUNCTION, VR::CS, "LINEAR_EXACT")],
    );
    assert_eq!(dec(&exact).unwrap().window_function, WindowFunction::Linear);
    // Window Center/Width win over it.
    let windowed = with_elements(
        &build(Spec { window: Some(("40", "400")), ..Spec::default() }),
        vec![lut_sequence(tags::VOILUT_SEQUENCE, [1000, 200, 12], None)],
    );
    assert_eq!(dec(&windowed).unwrap().window, Some(Window { center: 40.0, width: 400.0 }));
    // INVERSE: inverted within the image's range, as MONOCHROME1 is.
    let inverse = with_elements(&plain, vec![text(tags::PRESENTATION_LUT_SHAPE, VR::CS, "INVERSE")]);
    assert_eq!(dec(&inverse).unwrap().samples, [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
    let identity = with_elements(&plain, vec![text(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY")]);
    assert_eq!(dec(&identity).unwrap().samples, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

/// X-ray files with a VOI LUT Sequence's curve (on MONOCHROME2 and MONOCHROME1 data) and with
/// VOI LUT Function SIGMOID (`tools/make_dicom_display.py`) give the greys pydicom's
/// `apply_voi_lut` gives, stretched to 0..1 as documented (references: 16-bit PNGs).
#[test]
fn voi_lut_curves_and_sigmoid_match_pydicom() {
    for (file, function) in [("DX_voi_lut", "TABLE"), ("DX_voi_lut_mono1", "TABLE"), ("DX_sigmoid", "SIGMOID")] {
        let d = dec(&data(&format!("dicom/{file}.dcm"))).unwrap();
        assert_eq!(d.given_window(None).map(|(_, f)| f.name()), Some(function), "{file}");
        let grey = d.into_image(None).data;
        let r = dec(&data(&format!("dicom/{file}.voi.png"))).unwrap();
        assert_eq!(grey.len(), r.samples.len(), "{file}");
        let max = grey.iter().zip(&r.samples).map(|(a, b)| (a - b / 65535.0).abs()).fold(0.0, f32::max);
        eprintln!("{file}: at most {max:e} from pydicom's grey");
        assert!(max <= 1.0 / 65535.0, "{file}: {max}");
    }
}

/// JPEG XL (DICOM's transfer syntaxes of 2024; libjxl's codestreams, tools/make_dicom_jpegxl.py):
/// lossless gives exactly its source's samples, 12-bit grey over two frames and 8-bit RGB; lossy
/// is within one level of libjxl's own decode; a codestream of another size than Rows/Columns
/// is refused by name (damaged ones: `damaged_compressed_pixel_data_never_panics`).
#[test]
fn jpeg_xl_decodes() {
    let ct = dec(&data("dicom/CT_small.dcm")).unwrap();
    let bytes = data("dicom/CT_small_jxl.dcm");
    for frame in 0..2 {
        let d = decode(&bytes, &DecodeOptions { frame, ..Default::default() }).unwrap();
        let flipped = |i: usize| if frame == 0 { i } else { (127 - i / 128) * 128 + i % 128 };
        assert!((0..128 * 128).all(|i| d.samples[i] == ct.samples[flipped(i)]), "frame {frame}");
        assert_eq!(d.dicom.as_ref().unwrap().transfer_syntax, "1.2.840.10008.1.2.4.110");
    }
    // SC_rgb_rle's YBR_FULL samples as pydicom turned them to RGB (rounded, where ours are
    // not): within half a level of ours.
    let rgb = dec(&data("dicom/SC_rgb_rle.dcm")).unwrap();
    let d = dec(&data("dicom/SC_rgb_jxl.dcm")).unwrap();
    assert_eq!((d.channels, d.kind), (3, ImageKind::Colour));
    let max = d.samples.iter().zip(&rgb.samples).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(max <= 0.5 && d.samples.iter().all(|v| v.fract() == 0.0), "{max}");
    // Lossy: libjxl's decode of the same codestream, as a 16-bit PNG of the stored values.
    let d = dec(&data("dicom/CT_small_jxl_lossy.dcm")).unwrap();
    let r = dec(&data("dicom/CT_small_jxl_lossy.libjxl.png")).unwrap();
    let intercept = -1024.0;
    let max = d.samples.iter().zip(&r.samples).map(|(a, b)| (a - intercept - b).abs()).fold(0.0, f32::max);
    eprintln!("lossy JPEG XL: at most {max} from libjxl's decode");
    assert!(max <= 1.0, "{max}");
    // Rows/Columns that are not the codestream's.
    let e = dec(&with_elements(&bytes, vec![us(tags::ROWS, 64)])).unwrap_err();
    assert!(e.to_string().contains("the JPEG XL image is 128×128 pixels but Rows/Columns say 64×128"), "{e}");
    // Damaged codestreams: in `damaged_compressed_pixel_data_never_panics`.
}
