//! TIFF pages and sample formats beyond the `image` crate's: signed and 32/64-bit integers,
//! float grey, WhiteIsZero, the Orientation tag on them, and `frame` picking the page.

use std::io::Cursor;

use s3net_imaging::*;
use tiff::encoder::{colortype, TiffEncoder};
use tiff::tags::Tag;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn page(frame: u32) -> DecodeOptions {
    DecodeOptions { frame, ..Default::default() }
}

/// Writes one page into the encoder.
type Page<'a> = &'a dyn Fn(&mut TiffEncoder<&mut Cursor<Vec<u8>>>);

/// A TIFF of one or more pages, each written by `pages[i]` into the encoder.
fn tiff_file(pages: &[Page]) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    {
        let mut enc = TiffEncoder::new(&mut out).unwrap();
        for p in pages {
            p(&mut enc);
        }
    }
    out.into_inner()
}

/// A CT slice in Hounsfield units as a signed 16-bit TIFF, the way `tifffile` writes an
/// `int16` array, reads back in its own units, and windows to the same image as the 16-bit PNG
/// of the same slice (HU + 1024): the automatic window moves with the values.
#[test]
fn signed_16_bit_hounsfield_units() {
    let png = decode(&data("lung/ID_0000_Z_0142.png"), &Default::default()).unwrap();
    let hu: Vec<i16> = png.samples.iter().map(|&v| (v - 1024.0) as i16).collect();
    assert!(hu.iter().any(|&v| v < -900) && hu.iter().any(|&v| v > 0), "a real CT range");
    let file = tiff_file(&[&|e| e.write_image::<colortype::GrayI16>(png.width, png.height, &hu).unwrap()]);
    let d = decode(&file, &Default::default()).unwrap();
    assert_eq!((d.width, d.height, d.channels, d.bit_depth, d.kind, d.format), (512, 512, 1, 16, ImageKind::Grey, Format::Tiff));
    assert!(d.samples.iter().zip(&hu).all(|(&a, &b)| a == f32::from(b)));
    let (a, b) = (normalize(&d, None), normalize(&png, None));
    let worst = a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");
    // An explicit window is in Hounsfield units.
    let lung = normalize(&d, Some(Window { center: -600.0, width: 1500.0 }));
    let i = hu.iter().position(|&v| v == -600).expect("a pixel at -600 HU");
    assert!((lung.data[i] - 0.5).abs() < 1e-6);
}

/// 32-bit float (ImageJ), float64, unsigned and signed 32-bit and signed 8-bit grey: the values
/// as stored; a NaN stays NaN (and becomes 0 when windowed).
#[test]
fn integer_and_float_grey_of_every_width() {
    let (w, h) = (7u32, 5u32);
    let n = (w * h) as usize;
    let ramp = |i: usize| i as f64 * 3.5 - 40.0;
    let f32s: Vec<f32> = (0..n).map(|i| if i == 3 { f32::NAN } else { ramp(i) as f32 }).collect();
    let f64s: Vec<f64> = (0..n).map(ramp).collect();
    let u32s: Vec<u32> = (0..n).map(|i| 70_000 + i as u32).collect();
    let i32s: Vec<i32> = (0..n).map(|i| i as i32 * 1000 - 9000).collect();
    let i8s: Vec<i8> = (0..n).map(|i| i as i8 - 20).collect();
    let cases: Vec<(&str, Vec<u8>, Vec<f32>, u8)> = vec![
        ("f32", tiff_file(&[&|e| e.write_image::<colortype::Gray32Float>(w, h, &f32s).unwrap()]), f32s.clone(), 32),
        ("f64", tiff_file(&[&|e| e.write_image::<colortype::Gray64Float>(w, h, &f64s).unwrap()]), f64s.iter().map(|&v| v as f32).collect(), 64),
        ("u32", tiff_file(&[&|e| e.write_image::<colortype::Gray32>(w, h, &u32s).unwrap()]), u32s.iter().map(|&v| v as f32).collect(), 32),
        ("i32", tiff_file(&[&|e| e.write_image::<colortype::GrayI32>(w, h, &i32s).unwrap()]), i32s.iter().map(|&v| v as f32).collect(), 32),
        ("i8", tiff_file(&[&|e| e.write_image::<colortype::GrayI8>(w, h, &i8s).unwrap()]), i8s.iter().map(|&v| f32::from(v)).collect(), 8),
    ];
    for (name, file, want, bits) in cases {
        let d = decode(&file, &Default::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((d.width, d.height, d.channels, d.bit_depth), (w, h, 1, bits), "{name}");
        for (i, (&got, &want)) in d.samples.iter().zip(&want).enumerate() {
            assert!(got == want || (got.is_nan() && want.is_nan()), "{name} sample {i}: {got} vs {want}");
        }
        let img = normalize(&d, None);
        assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)), "{name}");
    }
}

/// `frame` picks the page of a multi-page TIFF (a stack of slices), whatever each page holds;
/// past the last page it is FrameOutOfRange with the page count.
#[test]
fn frame_picks_the_page() {
    let (w, h) = (6u32, 4u32);
    let grey: Vec<u8> = (0..24).map(|i| i * 10).collect();
    let hu: Vec<i16> = (0..24).map(|i| i * 100 - 1000).collect();
    let rgb: Vec<u16> = (0..72).map(|i| i * 900).collect();
    let file = tiff_file(&[
        &|e| e.write_image::<colortype::Gray8>(w, h, &grey).unwrap(),
        &|e| e.write_image::<colortype::GrayI16>(w, h, &hu).unwrap(),
        &|e| e.write_image::<colortype::RGB16>(w, h, &rgb).unwrap(),
    ]);
    let p0 = decode(&file, &page(0)).unwrap();
    assert_eq!((p0.channels, p0.bit_depth), (1, 8));
    assert!(p0.samples.iter().zip(&grey).all(|(&a, &b)| a == f32::from(b)));
    let p1 = decode(&file, &page(1)).unwrap();
    assert_eq!((p1.channels, p1.bit_depth), (1, 16));
    assert!(p1.samples.iter().zip(&hu).all(|(&a, &b)| a == f32::from(b)));
    let p2 = decode(&file, &page(2)).unwrap();
    assert_eq!((p2.channels, p2.bit_depth, p2.kind), (3, 16, ImageKind::Colour));
    // Planar: channel c of pixel i is rgb[3 i + c].
    for i in 0..24 {
        for c in 0..3 {
            assert_eq!(p2.samples[c * 24 + i], f32::from(rgb[3 * i + c]));
        }
    }
    match decode(&file, &page(3)) {
        Err(e @ ImagingError::FrameOutOfRange { format: Format::Tiff, frame: 3, frames: 3 }) => {
            assert_eq!(e.to_string(), "frame 3 was requested but the tiff file has 3 page(s), numbered from 0");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(decode(&file, &page(u32::MAX)), Err(ImagingError::FrameOutOfRange { frames: 3, .. })));
}

/// WhiteIsZero grey is turned round (larger is brighter everywhere here), and an Orientation
/// tag on such a page is applied as on the first page of an ordinary TIFF.
#[test]
fn white_is_zero_and_orientation_on_own_pages() {
    let (w, h) = (3u32, 2u32);
    let v: Vec<u16> = vec![0, 100, 200, 300, 400, 65535];
    let file = tiff_file(&[
        &|e| e.write_image::<colortype::Gray8>(1, 1, &[0u8]).unwrap(),
        &|e| {
            let mut img = e.new_image::<colortype::Gray16>(w, h).unwrap();
            img.encoder().write_tag(Tag::PhotometricInterpretation, 0u16).unwrap();
            img.write_data(&v).unwrap();
        },
        &|e| {
            let mut img = e.new_image::<colortype::GrayI16>(w, h).unwrap();
            img.encoder().write_tag(Tag::Orientation, 6u16).unwrap();
            img.write_data(&[1i16, 2, 3, 4, 5, 6]).unwrap();
        },
    ]);
    let d = decode(&file, &page(1)).unwrap();
    let want: Vec<f32> = v.iter().map(|&x| f32::from(65535 - x)).collect();
    assert_eq!(d.samples, want);
    // Stored rows [1 2 3] [4 5 6], turned 90° clockwise: rows [4 1] [5 2] [6 3].
    let d = decode(&file, &page(2)).unwrap();
    assert_eq!((d.width, d.height, d.orientation), (2, 3, 6));
    assert_eq!(d.samples, vec![4.0, 1.0, 5.0, 2.0, 6.0, 3.0]);
}

/// What no path reads is refused by name, not by a decoder's internal type code.
#[test]
fn unreadable_pages_say_what_they_hold() {
    let cmyk: Vec<u8> = vec![1; 4 * 4];
    let file = tiff_file(&[
        &|e| e.write_image::<colortype::Gray8>(1, 1, &[0u8]).unwrap(),
        &|e| e.write_image::<colortype::CMYK8>(2, 2, &cmyk).unwrap(),
    ]);
    let e = decode(&file, &page(1)).unwrap_err();
    assert!(matches!(e, ImagingError::Unsupported { format: Format::Tiff, .. }), "{e:?}");
    assert!(e.to_string().contains("CMYK") && e.to_string().contains("page 1"), "{e}");
}
