//! DICOM Part 10 through `dicom-object` (parsing) and `dicom-pixeldata` (codecs).
//!
//! The crates are used only to parse the data set and to turn (possibly
//! compressed) pixel data into raw native-endian samples; the interpretation of
//! those samples (bits stored, sign, rescale, MONOCHROME1, colour layout) is done
//! here, so that every case is checked and errors stay free of element values.

use dicom_core::header::HasLength;
use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, OpenFileOptions, ReadError};
use dicom_pixeldata::{
    PhotometricInterpretation, PixelDecoder, PixelRepresentation, PlanarConfiguration,
};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::dicom_guard;
use crate::{
    check_dims, DecodeOptions, Decoded, DicomInfo, Format, Header, ImageKind, ImagingError,
    Window, WindowFunction,
};

const F: Format = Format::Dicom;

fn malformed(reason: &str) -> ImagingError {
    ImagingError::Malformed {
        format: F,
        reason: reason.to_string(),
    }
}

fn unsupported(reason: String) -> ImagingError {
    ImagingError::Unsupported { format: F, reason }
}

/// Keeps a UID only if it looks like one (digits and dots), so that nothing else
/// from the file can reach a message.
fn clean_uid(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    if !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        uid.to_string()
    } else {
        "(malformed UID)".to_string()
    }
}

/// The data set, after the guards against hostile lengths; up to the pixel data (not read)
/// when `until_pixels`. A deflated one is inflated first (see [`dicom_guard::inflate`]), and
/// its file meta then says Explicit VR Little Endian (`dicom_guard::transfer_syntax` gives the
/// file's own).
pub(crate) fn open(bytes: &[u8], until_pixels: bool) -> Result<DefaultDicomObject, ImagingError> {
    let body = bytes
        .get(128..)
        .ok_or_else(|| malformed("shorter than the 128-byte preamble"))?;
    let inflated = dicom_guard::inflate(body)?;
    let body = inflated.as_deref().unwrap_or(body);
    dicom_guard::check_element_lengths(body)?;
    let mut options = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
    if until_pixels {
        options = options.read_until(tags::PIXEL_DATA);
    }
    options.from_reader(body).map_err(read_error)
}

/// Rows and Columns (checked against the limits) and Number of Frames (with `opts.frame`
/// among them).
pub(crate) fn geometry(obj: &DefaultDicomObject, opts: &DecodeOptions) -> Result<(u32, u32, u32), ImagingError> {
    let rows = required_u32(obj, tags::ROWS, "Rows")?;
    let cols = required_u32(obj, tags::COLUMNS, "Columns")?;
    check_dims(u64::from(cols), u64::from(rows), &opts.limits)?;
    let frames = optional_u32(obj, tags::NUMBER_OF_FRAMES)?.unwrap_or(1).max(1);
    if opts.frame >= frames {
        return Err(ImagingError::FrameOutOfRange {
            format: Format::Dicom,
            frame: opts.frame,
            frames,
        });
    }
    Ok((rows, cols, frames))
}

/// Rows, Columns, Samples per Pixel and the frame check, from the data set up to the pixel
/// data, which is not read (see [`crate::probe`]).
pub(crate) fn probe_dicom(bytes: &[u8], opts: &DecodeOptions) -> Result<Header, ImagingError> {
    let obj = open(bytes, true)?;
    let (rows, cols, frames) = geometry(&obj, opts)?;
    let samples = optional_u32(&obj, tags::SAMPLES_PER_PIXEL)?.unwrap_or(1);
    // A PALETTE COLOR image stores one index per pixel and decodes to RGB through its tables:
    // counted as one channel, an ultrasound's queue budget was a third of its decode.
    let palette = code_string(&obj, tags::PHOTOMETRIC_INTERPRETATION).as_deref() == Some("PALETTE COLOR");
    Ok(Header {
        format: Format::Dicom,
        width: cols,
        height: rows,
        channels: if samples >= 3 || palette { 3 } else { 1 },
        frames,
    })
}

/// Transfer syntaxes decoded by codecs that change a colour image's samples or need checks of
/// their own (see where they are used).
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const JPEG_2000_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
const JPEG_2000: &str = "1.2.840.10008.1.2.4.91";
/// High-Throughput JPEG 2000: lossless, lossless with RPCL progression, and lossy.
const HTJ2K: [&str; 3] = ["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"];
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";
/// JPEG XL: lossless, JPEG recompression, and lossy (2024).
const JPEG_XL: [&str; 3] = ["1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112"];
const EXPLICIT_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";

/// A transfer syntax's name for a message, or its UID where the registry does not know it.
fn transfer_syntax_name(uid: &str) -> String {
    TransferSyntaxRegistry.get(uid).map_or_else(|| uid.to_string(), |ts| ts.name().to_string())
}

pub(crate) fn decode_dicom(bytes: &[u8], opts: &DecodeOptions) -> Result<Decoded, ImagingError> {
    let mut obj = open(bytes, false)?;
    let ts_uid = clean_uid(obj.meta().transfer_syntax());
    // What the file says, for its description (a deflated one's data set is read inflated);
    // the parser's where the guard's walk of the file meta finds none.
    let file_ts = match bytes.get(128..).map_or("", dicom_guard::transfer_syntax) {
        "" => ts_uid.clone(),
        ts => clean_uid(ts),
    };
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(ImagingError::NoPixelData);
    }
    let (rows, cols, frames) = geometry(&obj, opts)?;
    match TransferSyntaxRegistry.get(&ts_uid) {
        Some(ts) if ts.can_decode_all() => {}
        // Decoded here (`jpegxl`), not by a codec of the registry.
        Some(_) if JPEG_XL.contains(&ts_uid.as_str()) => {}
        Some(ts) => {
            return Err(ImagingError::UnsupportedTransferSyntax {
                uid: ts_uid,
                name: ts.name().to_string(),
            })
        }
        None => {
            return Err(ImagingError::UnsupportedTransferSyntax {
                uid: ts_uid,
                name: "unknown transfer syntax".into(),
            })
        }
    }
    let file_pi = match code_string(&obj, tags::PHOTOMETRIC_INTERPRETATION).map(|s| PhotometricInterpretation::from(s.as_str())) {
        Some(PhotometricInterpretation::Other(_)) | None => "unrecognised".to_string(),
        Some(p) => p.as_str().to_string(),
    };

    let lossy_jpeg = matches!(ts_uid.as_str(), JPEG_BASELINE | JPEG_EXTENDED);
    // Codecs that give RGB whatever colour space they stored (JPEG's YCbCr, JPEG XL's).
    let codec_gives_rgb = lossy_jpeg || JPEG_XL.contains(&ts_uid.as_str());
    let bits_allocated = optional_u32(&obj, tags::BITS_ALLOCATED)?.unwrap_or(8);
    let encapsulated = matches!(obj.element_opt(tags::PIXEL_DATA).ok().flatten().map(|e| e.value()), Some(Value::PixelSequence(_)));
    if file_pi == "YBR_FULL_422" && !codec_gives_rgb && encapsulated {
        // Only a JPEG or JPEG XL codec undoes YBR_FULL_422's halved chroma (and here, for
        // native data).
        return Err(unsupported(format!(
            "photometric interpretation YBR_FULL_422 is supported in JPEG- or JPEG XL-compressed and uncompressed files only, not in {}",
            transfer_syntax_name(&ts_uid)
        )));
    }
    let palette = (file_pi == "PALETTE COLOR").then(|| Palette::read(&obj)).transpose()?;
    if ts_uid == RLE_LOSSLESS && bits_allocated > 16 {
        return Err(unsupported(format!("RLE Lossless with Bits Allocated {bits_allocated} is not supported (8 or 16)")));
    }
    let frame = check_and_repair_fragments(&mut obj, &ts_uid, &file_pi, (rows, cols, frames), bits_allocated, opts.frame)?;
    let frame = if file_pi == "YBR_FULL_422" && !encapsulated { expand_ybr_full_422(&mut obj, (rows, cols, frames), bits_allocated, frame)? } else { frame };
    let (slope, intercept) = rescale(&obj, opts.frame)?;
    let signed_pixels = optional_u32(&obj, tags::PIXEL_REPRESENTATION)? == Some(1);
    // A Modality LUT Sequence stands in for Rescale Slope/Intercept, where a file has it and
    // not them.
    let has_rescale = frame_attribute(&obj, opts.frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tags::RESCALE_SLOPE).is_some();
    let modality_lut = if has_rescale { None } else { lut(&obj, opts.frame, tags::MODALITY_LUT_SEQUENCE, signed_pixels, true) };
    let (file_window, file_window_function) = voi(&obj, opts.frame, signed_pixels);
    // Presentation LUT Shape INVERSE: a MONOCHROME2 image shown inverted, as MONOCHROME1 is
    // (for MONOCHROME1 it is the usual declaration, not a second inversion).
    let inverse = code_string(&obj, tags::PRESENTATION_LUT_SHAPE).as_deref() == Some("INVERSE");
    let modality = code_string(&obj, tags::MODALITY).filter(|s| {
        !s.is_empty()
            && s.len() <= 16
            && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b' ')
    });

    let pixels = obj.decode_pixel_data_frame(frame).map_err(|_| {
        malformed("the pixel data could not be decoded (corrupt, truncated or inconsistent with the image attributes)")
    })?;

    let (w, h) = (pixels.columns(), pixels.rows());
    if (w, h) != (cols, rows) {
        return Err(malformed("decoded pixel data does not match Rows/Columns"));
    }
    let spp = pixels.samples_per_pixel();
    let bits_allocated = pixels.bits_allocated();
    let bits_stored = pixels.bits_stored();
    let high_bit = pixels.high_bit();
    let signed = pixels.pixel_representation() == PixelRepresentation::Signed;
    let planar = pixels.planar_configuration() == PlanarConfiguration::PixelFirst;
    let pi = pixels.photometric_interpretation().clone();

    // Sample layout.
    let (bytes_per_sample, eff_bits, shift) = match bits_allocated {
        // 1-bit data arrives expanded to one byte per pixel, 0 or 255.
        1 => (1usize, 8u16, 0u16),
        8 | 16 | 32 => {
            if bits_stored == 0
                || bits_stored > bits_allocated
                || high_bit >= bits_allocated
                || high_bit + 1 < bits_stored
            {
                return Err(malformed(
                    "Bits Stored / High Bit are inconsistent with Bits Allocated",
                ));
            }
            (
                usize::from(bits_allocated / 8),
                bits_stored,
                high_bit + 1 - bits_stored,
            )
        }
        other => {
            return Err(unsupported(format!(
                "Bits Allocated of {other} is not supported (1, 8, 16 or 32)"
            )))
        }
    };
    let channels: u8 = match (&pi, spp) {
        (PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2, 1) => 1,
        (PhotometricInterpretation::Rgb | PhotometricInterpretation::YbrFull, 3) => 3,
        (PhotometricInterpretation::PaletteColor, 1) if palette.is_some() => 3,
        (PhotometricInterpretation::Other(_), _) => {
            return Err(unsupported(
                "the photometric interpretation is not recognised".into(),
            ))
        }
        (p, s) => {
            return Err(unsupported(format!(
                "photometric interpretation {} with {s} sample(s) per pixel is not supported \
                 (supported: MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, PALETTE COLOR)",
                p.as_str()
            )))
        }
    };

    // Whether a colour image's decoded samples are YBR_FULL. dicom-pixeldata calls the output
    // of every codec RGB, but only the lossy JPEG codec converts (JPEG's own YCbCr, which a
    // DICOM file calls YBR_FULL or YBR_FULL_422); RLE, lossless JPEG and JPEG 2000 without its
    // colour transform give the samples as the file stores them, and for those the file's
    // YBR_FULL still holds. (JPEG 2000's own transforms, YBR_RCT and YBR_ICT, are undone by its
    // codec.)
    let ybr = pi == PhotometricInterpretation::YbrFull
        || (file_pi == "YBR_FULL" && !codec_gives_rgb);
    let px = w as usize * h as usize;
    let n = px * usize::from(channels);
    let raw = pixels.frame_data(0).map_err(|_| {
        malformed("the pixel data is shorter than Rows × Columns × Samples per Pixel")
    })?;
    let stored = if palette.is_some() { px } else { n };
    if raw.len() < stored * bytes_per_sample {
        return Err(malformed(
            "the pixel data is shorter than Rows × Columns × Samples per Pixel",
        ));
    }
    let words_swapped = ts_uid == EXPLICIT_BIG_ENDIAN && bytes_per_sample == 4;
    let read = |i: usize| -> f64 {
        let o = i * bytes_per_sample;
        let v: u32 = match bytes_per_sample {
            1 => u32::from(raw[o]),
            2 => u32::from(u16::from_ne_bytes([raw[o], raw[o + 1]])),
            _ => u32::from_ne_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]),
        };
        // 32-bit samples of a big-endian file arrive with their two 16-bit halves swapped
        // (the data set's words are turned to this machine's order, not its samples).
        let v = if words_swapped { v.rotate_left(16) } else { v };
        let v = v >> shift;
        let mask = if eff_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << eff_bits) - 1
        };
        let v = v & mask;
        if signed && (v >> (eff_bits - 1)) & 1 == 1 {
            f64::from(v) - 2f64.powi(i32::from(eff_bits))
        } else {
            f64::from(v)
        }
    };

    let (mut window, mut window_function) = (None, WindowFunction::Linear);
    let samples: Vec<f32> = if channels == 1 {
        let mut s: Vec<f32> = match &modality_lut {
            Some(lut) => (0..px).map(|i| lut.map(read(i)) as f32).collect(),
            None => (0..px).map(|i| (read(i) * slope + intercept) as f32).collect(),
        };
        window = file_window;
        window_function = file_window_function;
        if pi == PhotometricInterpretation::Monochrome1 || inverse {
            // Invert within the frame's own range, so values stay in the same units'
            // span and higher means brighter, like every other image.
            let (mn, mx) = s
                .iter()
                .filter(|v| v.is_finite())
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            if mn.is_finite() {
                let sum = f64::from(mn) + f64::from(mx);
                for v in &mut s {
                    *v = (sum - f64::from(*v)) as f32;
                }
                window = window.map(|w| Window {
                    center: sum - w.center,
                    width: w.width,
                });
                // A sigmoid turns with its center; a table's value v is now sum − v, so it is
                // read backwards from the other end, and gives the inverse grey.
                if let WindowFunction::Table { first, grey } = &mut window_function {
                    *first = sum - (*first + grey.len() as f64 - 1.0);
                    grey.reverse();
                    grey.iter_mut().for_each(|g| *g = 1.0 - *g);
                }
            }
        }
        s
    } else if let Some(palette) = &palette {
        let mut out = vec![0.0f32; n];
        for i in 0..px {
            for (c, v) in palette.rgb(read(i)).into_iter().enumerate() {
                out[c * px + i] = v as f32;
            }
        }
        out
    } else {
        let mut out = vec![0.0f32; n];
        for i in 0..px {
            let mut rgb = [0.0f64; 3];
            for (c, value) in rgb.iter_mut().enumerate() {
                *value = read(if planar { c * px + i } else { i * 3 + c });
            }
            if ybr {
                rgb = ybr_full_to_rgb(rgb, eff_bits);
            }
            for c in 0..3 {
                out[c * px + i] = rgb[c] as f32;
            }
        }
        out
    };

    Ok(Decoded {
        width: w,
        height: h,
        channels,
        samples,
        format: F,
        bit_depth: if bits_allocated == 1 || palette.is_some() {
            8
        } else {
            bits_allocated as u8
        },
        kind: if channels == 1 {
            ImageKind::Grey
        } else {
            ImageKind::Colour
        },
        window,
        window_function,
        dicom: Some(DicomInfo {
            modality,
            photometric: file_pi,
            transfer_syntax: file_ts,
            frames,
            bits_stored,
            pixel_spacing_mm: pixel_spacing(&obj, opts.frame),
        }),
        orientation: 1,
    })
}

/// Checks an encapsulated (compressed) frame's codec header against the data set before its
/// codec sees it, and mends what real encoders write that the codecs would misread (see
/// `dicom_guard`): lossless JPEG's quantization-table selectors, RGB lossy JPEG without a
/// colour marker. A 12-bit lossy JPEG frame, which no codec of dicom-pixeldata reads, is
/// decoded here (`jpeg12`) and put in the data set as native pixel data, alone. Returns the
/// index the requested `frame` has then (0 after such a decode). Nothing to do for native pixel
/// data.
fn check_and_repair_fragments(
    obj: &mut DefaultDicomObject,
    ts_uid: &str,
    file_pi: &str,
    (rows, cols, frames): (u32, u32, u32),
    bits_allocated: u32,
    frame: u32,
) -> Result<u32, ImagingError> {
    let lossy_jpeg = matches!(ts_uid, JPEG_BASELINE | JPEG_EXTENDED);
    let samples = optional_u32(obj, tags::SAMPLES_PER_PIXEL)?.unwrap_or(1) as usize;
    let Some(Value::PixelSequence(seq)) = obj.element_opt(tags::PIXEL_DATA).ok().flatten().map(|e| e.value()) else {
        return Ok(frame);
    };
    let j2k = matches!(ts_uid, JPEG_2000_LOSSLESS | JPEG_2000) || HTJ2K.contains(&ts_uid);
    dicom_guard::check_fragments(seq.fragments(), rows, cols, j2k)?;
    if ts_uid == RLE_LOSSLESS {
        dicom_guard::check_rle_fragments(seq.fragments(), rows, cols, samples * bits_allocated.div_ceil(8) as usize)?;
    }
    if let Some(bits) = dicom_guard::jpeg_precision_over_8(seq.fragments()).filter(|_| lossy_jpeg) {
        if bits != 12 || bits_allocated != 16 || samples != 1 {
            return Err(unsupported(format!(
                "{bits}-bit lossy JPEG with {samples} sample(s) of {bits_allocated} bits is not supported \
                 (12-bit greyscale in 16-bit samples and 8-bit lossy JPEG are)"
            )));
        }
        let data = frame_bytes(seq, frames, frame)?;
        let samples = crate::jpeg12::decode(&data, cols, rows)?;
        return Ok(put_native_frame(obj, DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(samples.into()))));
    }
    if JPEG_XL.contains(&ts_uid) {
        // Decoded here (`jpegxl`), as 12-bit lossy JPEG is, into native samples of this frame.
        if !matches!(bits_allocated, 8 | 16) || !matches!(samples, 1 | 3) {
            return Err(unsupported(format!("JPEG XL with {samples} sample(s) of {bits_allocated} bits is not supported (1 or 3 of 8 or 16)")));
        }
        let bits_stored = optional_u32(obj, tags::BITS_STORED)?.unwrap_or(bits_allocated).clamp(1, bits_allocated);
        let data = frame_bytes(seq, frames, frame)?;
        let decoded = crate::jpegxl::decode(&data, cols, rows, samples, (1u32 << bits_stored) - 1)?;
        let pixels = if bits_allocated == 8 {
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(decoded.into_iter().map(|v| v as u8).collect()))
        } else {
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(decoded.into()))
        };
        if samples == 3 {
            obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("RGB")));
            obj.put(DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, PrimitiveValue::from(0u16)));
        }
        return Ok(put_native_frame(obj, pixels));
    }
    let cleared = dicom_guard::lossless_jpeg_tables_cleared(seq.fragments());
    let fragments = cleared.as_deref().unwrap_or(seq.fragments());
    let marked = (lossy_jpeg && file_pi == "RGB")
        .then(|| dicom_guard::rgb_jpeg_marked(fragments, seq.offset_table()))
        .flatten();
    let repaired = match (marked, cleared) {
        (Some((table, fragments)), _) => PixelFragmentSequence::new(table, fragments),
        (None, Some(fragments)) => PixelFragmentSequence::new(seq.offset_table().to_vec(), fragments),
        (None, None) => return Ok(frame),
    };
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(repaired)));
    Ok(frame)
}

/// Uncompressed YBR_FULL_422 (each two neighbouring pixels of a row stored as Y₁ Y₂ Cb Cr, the
/// chroma shared) widened to YBR_FULL, one Cb Cr per pixel, for frame `frame` alone: the
/// decoder's codecs read only full-chroma native data, and the YBR_FULL path converts it to
/// RGB. Returns the frame's index then (0). 8-bit samples, interleaved, with an even number of
/// columns, as PS3.3 C.7.6.3.1.2 has them; anything else is refused by name.
fn expand_ybr_full_422(obj: &mut DefaultDicomObject, (rows, cols, frames): (u32, u32, u32), bits_allocated: u32, frame: u32) -> Result<u32, ImagingError> {
    if bits_allocated != 8 || optional_u32(obj, tags::SAMPLES_PER_PIXEL)? != Some(3) {
        return Err(unsupported(format!(
            "uncompressed YBR_FULL_422 is supported with 3 samples of 8 bits, not {} of {bits_allocated}",
            optional_u32(obj, tags::SAMPLES_PER_PIXEL)?.unwrap_or(1)
        )));
    }
    if optional_u32(obj, tags::PLANAR_CONFIGURATION)?.unwrap_or(0) != 0 || cols % 2 != 0 {
        return Err(malformed("uncompressed YBR_FULL_422 needs interleaved samples (Planar Configuration 0) and an even number of Columns"));
    }
    let (row_bytes, rows) = (cols as usize * 2, rows as usize);
    let frame_len = row_bytes * rows;
    let pixel_data = obj.element(tags::PIXEL_DATA).map_err(|_| malformed("the Pixel Data is missing"))?.to_bytes().map_err(|_| malformed("the Pixel Data is not a byte string"))?;
    let start = frame as usize * frame_len;
    let stored = pixel_data
        .get(start..start + frame_len)
        .filter(|_| frame < frames)
        .ok_or_else(|| malformed("the pixel data is shorter than Rows × Columns × 2 bytes per frame, as YBR_FULL_422 stores them"))?;
    let mut full = Vec::with_capacity(frame_len / 2 * 3);
    for pair in stored.chunks_exact(4) {
        let [y1, y2, cb, cr] = [pair[0], pair[1], pair[2], pair[3]];
        full.extend_from_slice(&[y1, cb, cr, y2, cb, cr]);
    }
    obj.put(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("YBR_FULL")));
    Ok(put_native_frame(obj, DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(full.into()))))
}

/// Puts `pixels`, one frame decoded here (12-bit lossy JPEG, JPEG XL) or widened (YBR_FULL_422),
/// in `obj` as its only frame of native pixel data, in explicit VR little endian, so that the
/// rest of the decoder reads it as any uncompressed image. Returns that frame's index (0).
fn put_native_frame(obj: &mut DefaultDicomObject, pixels: InMemElement) -> u32 {
    obj.put(pixels);
    obj.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from("1")));
    obj.meta_mut().set_transfer_syntax(&dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN);
    0
}

/// The compressed bytes of frame `frame` of `frames`: all the fragments of a single frame, the
/// frame's own fragment when there is one per frame, else the fragments the Basic Offset Table
/// gives it.
fn frame_bytes(seq: &PixelFragmentSequence<Vec<u8>>, frames: u32, frame: u32) -> Result<Vec<u8>, ImagingError> {
    let fragments = seq.fragments();
    if frames == 1 {
        return Ok(fragments.concat());
    }
    if fragments.len() == frames as usize {
        return Ok(fragments[frame as usize].clone());
    }
    let table = seq.offset_table();
    if table.len() != frames as usize {
        return Err(malformed("the fragments of a multi-frame image cannot be told apart (no Basic Offset Table)"));
    }
    let (start, end) = (u64::from(table[frame as usize]), table.get(frame as usize + 1).map_or(u64::MAX, |&o| u64::from(o)));
    // Each fragment is an item: an 8-byte header, then its bytes.
    let mut at = 0u64;
    let mut out = Vec::new();
    for f in fragments {
        if at >= start && at < end {
            out.extend_from_slice(f);
        }
        at += 8 + f.len() as u64;
    }
    if out.is_empty() {
        return Err(malformed("the Basic Offset Table names no fragment for the frame"));
    }
    Ok(out)
}

/// A PALETTE COLOR image's lookup tables: each stored value, an index, names an RGB colour.
struct Palette {
    /// The stored value of the tables' first entry (values below it take the first, values
    /// beyond the last entry the last).
    first: i64,
    /// Red, green and blue entries, 8-bit (16-bit tables give their high bytes, as viewers
    /// show them).
    tables: [Vec<u8>; 3],
}

impl Palette {
    /// The tables of `obj` (Red/Green/Blue Palette Color Lookup Table Descriptor and Data).
    fn read(obj: &DefaultDicomObject) -> Result<Palette, ImagingError> {
        let missing = || malformed("a PALETTE COLOR lookup table is missing or malformed");
        let mut first = 0;
        let mut tables: [Vec<u8>; 3] = Default::default();
        let colours = [
            (tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR, tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA, tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA),
            (tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR, tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA, tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA),
            (tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR, tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA, tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA),
        ];
        for (table, (descriptor, data, segmented)) in tables.iter_mut().zip(colours) {
            let d = obj.element_opt(descriptor).ok().flatten().ok_or_else(missing)?;
            let d = d.to_multi_int::<i64>().map_err(|_| missing())?;
            let [entries, start, bits] = d[..] else { return Err(missing()) };
            // 0 entries means 65536 (the count does not fit the descriptor's 16 bits); the
            // first mapped value may be written as unsigned where it is meant signed.
            let entries = if entries == 0 { 65536 } else { (entries & 0xFFFF) as usize };
            first = start;
            if let Some(e) = obj.element_opt(segmented).ok().flatten() {
                // Segmented (PS3.3 C.7.9.2): 16-bit entries in 16-bit words, 8-bit ones in bytes.
                let values: Vec<u32> = match bits {
                    16 => e.to_multi_int::<u16>().map_err(|_| missing())?.into_iter().map(u32::from).collect(),
                    8 => e.to_bytes().map_err(|_| missing())?.iter().map(|&b| u32::from(b)).collect(),
                    _ => return Err(missing()),
                };
                let expanded = expand_segmented(&values, bits == 8, entries)?;
                *table = expanded.iter().map(|&v| if bits == 16 { (v >> 8) as u8 } else { v as u8 }).collect();
                continue;
            }
            let words = obj.element_opt(data).ok().flatten().ok_or_else(missing)?;
            let words = words.to_multi_int::<u16>().map_err(|_| missing())?;
            *table = match bits {
                16 if words.len() >= entries => words[..entries].iter().map(|w| (w >> 8) as u8).collect(),
                // 8-bit entries: one per 16-bit word, or two packed in each.
                8 if words.len() >= entries => words[..entries].iter().map(|w| (w & 0xFF) as u8).collect(),
                8 if words.len() * 2 >= entries => words.iter().flat_map(|w| w.to_le_bytes()).take(entries).collect(),
                _ => return Err(missing()),
            };
        }
        Ok(Palette { first, tables })
    }

    fn rgb(&self, value: f64) -> [f64; 3] {
        self.tables.each_ref().map(|t| {
            let i = (value as i64 - self.first).clamp(0, t.len() as i64 - 1) as usize;
            f64::from(t[i])
        })
    }
}

/// A segmented palette table (PS3.3 C.7.9.2) expanded to its `entries` values. Segments: discrete
/// (0, n, then n values), linear (1, n, y₁: n values from the last one towards y₁, the last
/// being y₁, rounded half to even, as pydicom does) and indirect (2, n, then a 32-bit offset,
/// two 16-bit words low first or four bytes little-endian for 8-bit tables: the n segments
/// found at that index of the data again, as pydicom reads it; not nested). Fails, naming why, for a table that is not of its
/// declared length or cannot be expanded, and stops at `entries` values: a few bytes of
/// segments can describe millions.
fn expand_segmented(data: &[u32], bytes: bool, entries: usize) -> Result<Vec<u32>, ImagingError> {
    fn expand(data: &[u32], at: usize, segments: Option<usize>, bytes: bool, nested: bool, out: &mut Vec<u32>, entries: usize) -> Result<(), ImagingError> {
        let bad = |why: &str| malformed(&format!("a segmented PALETTE COLOR lookup table {why}"));
        let mut at = at;
        let mut read = 0;
        // `at + 1 <`: a trailing pad value is not a segment (every segment is longer than two).
        while at + 1 < data.len() && segments.is_none_or(|n| read < n) {
            let (opcode, n) = (data[at], data[at + 1] as usize);
            at += 2;
            match opcode {
                0 => {
                    let values = data.get(at..at + n).ok_or_else(|| bad("runs past its data"))?;
                    out.extend_from_slice(values);
                    at += n;
                }
                1 => {
                    let y0 = f64::from(*out.last().ok_or_else(|| bad("starts with a linear segment"))?);
                    let y1 = f64::from(*data.get(at).ok_or_else(|| bad("runs past its data"))?);
                    at += 1;
                    let start = y0 + (y1 - y0) / n.max(1) as f64;
                    let delta = if n > 1 { (y1 - start) / (n - 1) as f64 } else { 0.0 };
                    for k in 0..n.min(entries + 1) {
                        let v = if k + 1 == n { y1 } else { start + k as f64 * delta };
                        out.push(v.round_ties_even() as u32);
                    }
                }
                2 if !nested => {
                    if out.is_empty() {
                        return Err(bad("starts with an indirect segment"));
                    }
                    let offset = if bytes {
                        let b = data.get(at..at + 4).ok_or_else(|| bad("runs past its data"))?;
                        at += 4;
                        (b[3] << 24 | b[2] << 16 | b[1] << 8 | b[0]) as usize
                    } else {
                        let w = data.get(at..at + 2).ok_or_else(|| bad("runs past its data"))?;
                        at += 2;
                        (w[1] << 16 | w[0]) as usize
                    };
                    expand(data, offset, Some(n), bytes, true, out, entries)?;
                }
                2 => return Err(bad("has an indirect segment within an indirect one")),
                _ => return Err(bad("has a segment of unknown type")),
            }
            read += 1;
            if out.len() > entries {
                return Err(bad(&format!("expands past the {entries} entries its descriptor declares")));
            }
        }
        Ok(())
    }
    let mut out = Vec::with_capacity(entries);
    expand(data, 0, None, bytes, false, &mut out, entries)?;
    if out.len() != entries {
        return Err(malformed(&format!(
            "a segmented PALETTE COLOR lookup table expands to {} entries, not the {entries} its descriptor declares",
            out.len()
        )));
    }
    Ok(out)
}

/// YBR_FULL (JPEG-style full-range YCbCr) to RGB, clamped to the sample range.
fn ybr_full_to_rgb([y, cb, cr]: [f64; 3], bits: u16) -> [f64; 3] {
    let max = 2f64.powi(i32::from(bits)) - 1.0;
    let mid = (max + 1.0) / 2.0;
    let (cb, cr) = (cb - mid, cr - mid);
    let r = y + 1.402 * cr;
    let g = y - 0.344136 * cb - 0.714136 * cr;
    let b = y + 1.772 * cb;
    [r.clamp(0.0, max), g.clamp(0.0, max), b.clamp(0.0, max)]
}

fn read_error(e: ReadError) -> ImagingError {
    match e {
        ReadError::ReadUnrecognizedTransferSyntax { uid, .. } => {
            ImagingError::UnsupportedTransferSyntax {
                uid: clean_uid(&uid),
                name: "unknown transfer syntax".into(),
            }
        }
        ReadError::ReadUnsupportedTransferSyntax { uid, name, .. }
        | ReadError::ReadUnsupportedTransferSyntaxWithSuggestion { uid, name, .. } => {
            ImagingError::UnsupportedTransferSyntax {
                uid: clean_uid(uid),
                name: name.to_string(),
            }
        }
        _ => malformed("the DICOM data set could not be parsed (corrupt or truncated file)"),
    }
}

/// A text attribute (a code string: Photometric Interpretation, Modality, …) without its
/// trailing padding; None when absent or not text.
fn code_string(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    Some(e.to_str().ok()?.trim_end_matches(['\0', ' ']).to_string())
}

fn optional_u32(obj: &DefaultDicomObject, tag: Tag) -> Result<Option<u32>, ImagingError> {
    match obj.element_opt(tag).ok().flatten() {
        None => Ok(None),
        Some(e) if e.is_empty() => Ok(None),
        Some(e) => e
            .to_int::<u32>()
            .map(Some)
            .map_err(|_| malformed("an image attribute holds an invalid number")),
    }
}

fn required_u32(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<u32, ImagingError> {
    optional_u32(obj, tag)?
        .ok_or_else(|| malformed(&format!("the required attribute {name} is missing")))
}

/// Attribute `tag` of frame `frame`, looked up where an enhanced multi-frame object (Enhanced
/// CT, MR, …) keeps it: in functional group `group` of that frame (Per-Frame Functional Groups
/// Sequence), else of all frames (Shared Functional Groups Sequence), else in the data set
/// itself, as classic objects have it. Why: such objects have no top-level Rescale, Window or
/// Pixel Spacing, and their frames may each have their own.
pub(crate) fn frame_attribute(obj: &DefaultDicomObject, frame: u32, group: Tag, tag: Tag) -> Option<&InMemElement> {
    let in_groups = |sequence: Tag, item: usize| {
        let functional = obj.element_opt(sequence).ok()??.items()?.get(item)?;
        functional.element_opt(group).ok()??.items()?.first()?.element_opt(tag).ok()?
    };
    in_groups(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, frame as usize)
        .or_else(|| in_groups(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0))
        .or_else(|| obj.element_opt(tag).ok().flatten())
}

/// Pixel Spacing (0028,0030) of frame `frame`: the rows' and the columns' spacing in mm, when
/// the file gives two positive numbers. Imager Pixel Spacing (at the detector of a projection
/// radiograph, not in the patient) is not taken for it.
pub(crate) fn pixel_spacing(obj: &DefaultDicomObject, frame: u32) -> Option<[f64; 2]> {
    let e = frame_attribute(obj, frame, tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)?;
    match e.to_multi_float64().ok()?.as_slice() {
        [r, c, ..] if r.is_finite() && c.is_finite() && *r > 0.0 && *c > 0.0 => Some([*r, *c]),
        _ => None,
    }
}

fn first_f64(e: Option<&InMemElement>) -> Option<f64> {
    e?.to_multi_float64().ok()?.first().copied()
}

/// Rescale Slope and Intercept of frame `frame` (1 and 0 when absent).
fn rescale(obj: &DefaultDicomObject, frame: u32) -> Result<(f64, f64), ImagingError> {
    let of = |tag| first_f64(frame_attribute(obj, frame, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, tag));
    let slope = of(tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = of(tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    if !slope.is_finite() || !intercept.is_finite() || slope == 0.0 {
        return Err(malformed(
            "Rescale Slope/Intercept are not finite numbers with a non-zero slope",
        ));
    }
    Ok((slope, intercept))
}

/// The first item of a Modality or VOI LUT Sequence (`sequence`) of frame `frame`: its LUT
/// Descriptor (entries, the first value mapped, read as signed for `signed` data) and, with
/// `with_data`, its LUT Data. None for one that is absent or inconsistent (its data not of the
/// entries it declares).
fn lut(obj: &DefaultDicomObject, frame: u32, sequence: Tag, signed: bool, with_data: bool) -> Option<Lut> {
    let group = if sequence == tags::VOILUT_SEQUENCE { tags::FRAME_VOILUT_SEQUENCE } else { tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE };
    let item = frame_attribute(obj, frame, group, sequence)?.items()?.first()?;
    let descriptor = item.element_opt(tags::LUT_DESCRIPTOR).ok()??.to_multi_int::<i64>().ok()?;
    let [entries, first, ..] = descriptor[..] else { return None };
    let entries = if entries == 0 { 65536 } else { entries };
    let first = if signed && first >= 32768 { first - 65536 } else { first };
    if !(1..=65536).contains(&entries) {
        return None;
    }
    let data = if with_data {
        let data = item.element_opt(tags::LUT_DATA).ok()??.to_multi_int::<u32>().ok()?;
        if data.len() != entries as usize {
            return None;
        }
        data.into_iter().map(f64::from).collect()
    } else {
        Vec::new()
    };
    Some(Lut { entries, first, data })
}

/// A lookup table (see [`lut`]).
struct Lut {
    entries: i64,
    /// The stored value the first entry maps; values below it take the first entry, values
    /// past the last the last.
    first: i64,
    data: Vec<f64>,
}

impl Lut {
    fn map(&self, value: f64) -> f64 {
        let i = (value as i64).saturating_sub(self.first).clamp(0, self.entries - 1) as usize;
        self.data.get(i).copied().unwrap_or(0.0)
    }
}

/// The file's own window of frame `frame` and how it maps values to grey: Window Center/Width
/// with its VOI LUT Function (SIGMOID, else linear); else a VOI LUT Sequence's table over its
/// input range (a linear window over that range where the table's data are missing, of
/// another length than it declares, or flat); else none. Where a file has both, the window
/// is taken, as most viewers show first.
fn voi(obj: &DefaultDicomObject, frame: u32, signed: bool) -> (Option<Window>, WindowFunction) {
    if let Some(w) = file_window(obj, frame) {
        let function = frame_attribute(obj, frame, tags::FRAME_VOILUT_SEQUENCE, tags::VOILUT_FUNCTION)
            .and_then(|e| e.to_str().ok().map(|s| s.trim_end_matches(['\0', ' ']) == "SIGMOID"));
        return (Some(w), if function == Some(true) { WindowFunction::Sigmoid } else { WindowFunction::Linear });
    }
    let Some(lut) = lut(obj, frame, tags::VOILUT_SEQUENCE, signed, true).or_else(|| lut(obj, frame, tags::VOILUT_SEQUENCE, signed, false)) else {
        return (None, WindowFunction::Linear);
    };
    let window = Window::new(lut.first as f64 + lut.entries as f64 / 2.0, lut.entries as f64).ok();
    let (lo, hi) = lut.data.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if lut.data.is_empty() || hi <= lo {
        return (window, WindowFunction::Linear);
    }
    let grey = lut.data.iter().map(|&v| ((v - lo) / (hi - lo)) as f32).collect();
    (window, WindowFunction::Table { first: lut.first as f64, grey })
}

/// The first Window Center/Width of frame `frame`, in rescaled units.
fn file_window(obj: &DefaultDicomObject, frame: u32) -> Option<Window> {
    let of = |tag| first_f64(frame_attribute(obj, frame, tags::FRAME_VOILUT_SEQUENCE, tag));
    Window::new(of(tags::WINDOW_CENTER)?, of(tags::WINDOW_WIDTH)?).ok()
}
