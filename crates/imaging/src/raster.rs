//! PNG, JPEG, BMP and TIFF through the `image` crate.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

use crate::{check_dims, Decoded, Format, Header, ImageKind, ImagingError, Limits};

/// The `image` crate's decoder for these bytes, having read their header only, the size
/// checked against the limits (a PNG's from its IHDR first, whatever follows it).
fn header_decoder<'a>(bytes: &'a [u8], format: Format, limits: &Limits) -> Result<impl ImageDecoder + 'a, ImagingError> {
    let image_format = match format {
        Format::Png => ImageFormat::Png,
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Bmp => ImageFormat::Bmp,
        Format::Tiff => ImageFormat::Tiff,
        Format::Dicom => {
            return Err(ImagingError::Unsupported {
                format,
                reason: "DICOM is not a raster format".into(),
            })
        }
    };
    // PNG: the IHDR sits at a fixed offset, so the size check costs nothing and
    // happens before the decoder even starts.
    if format == Format::Png {
        if let Some((w, h)) = png_ihdr_size(bytes) {
            check_dims(u64::from(w), u64::from(h), limits)?;
        }
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut image_limits = image::Limits::default();
    // Room for the largest allowed RGBA16 buffer plus decoder scratch space; the
    // per-side and pixel-count limits are checked below with clearer messages.
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(image_limits);
    let decoder = reader.into_decoder().map_err(|e| image_error(e, format))?;
    let (width, height) = decoder.dimensions();
    check_dims(u64::from(width), u64::from(height), limits)?;
    Ok(decoder)
}

/// The size and channels of a PNG, JPEG or BMP from its header (see [`crate::probe`]).
pub(crate) fn probe_raster(bytes: &[u8], format: Format, limits: &Limits) -> Result<Header, ImagingError> {
    let decoder = header_decoder(bytes, format, limits)?;
    let (width, height) = decoder.dimensions();
    let channels = if decoder.color_type().channel_count() >= 3 { 3 } else { 1 };
    Ok(Header { format, width, height, channels, frames: 1 })
}

pub(crate) fn decode_raster(
    bytes: &[u8],
    format: Format,
    limits: &Limits,
) -> Result<Decoded, ImagingError> {
    if format == Format::Jpeg {
        jpeg_reaches_end(bytes).map_err(|reason| ImagingError::Malformed { format, reason })?;
    }
    let mut decoder = header_decoder(bytes, format, limits)?;
    // A camera's JPEG (or a TIFF, a PNG with eXIf) may store its pixels turned and say so in
    // an orientation tag, which every viewer applies: the image is turned the same way here,
    // so the label map and mask lie over the picture the clinician sees. An unreadable tag is
    // no orientation, as for a viewer.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(e, format))?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width(), img.height());

    let (w, h) = (width as usize, height as usize);
    let (channels, bit_depth, samples) = match &img {
        DynamicImage::ImageLuma8(b) => (1, 8, planar(b.as_raw(), 1, w, h)),
        DynamicImage::ImageLumaA8(b) => (1, 8, planar(b.as_raw(), 2, w, h)),
        DynamicImage::ImageRgb8(b) => (3, 8, planar(b.as_raw(), 3, w, h)),
        DynamicImage::ImageRgba8(b) => (3, 8, planar(b.as_raw(), 4, w, h)),
        DynamicImage::ImageLuma16(b) => (1, 16, planar(b.as_raw(), 1, w, h)),
        DynamicImage::ImageLumaA16(b) => (1, 16, planar(b.as_raw(), 2, w, h)),
        DynamicImage::ImageRgb16(b) => (3, 16, planar(b.as_raw(), 3, w, h)),
        DynamicImage::ImageRgba16(b) => (3, 16, planar(b.as_raw(), 4, w, h)),
        DynamicImage::ImageRgb32F(b) => (3, 32, planar(b.as_raw(), 3, w, h)),
        DynamicImage::ImageRgba32F(b) => (3, 32, planar(b.as_raw(), 4, w, h)),
        other => (3, 16, planar(other.to_rgb16().as_raw(), 3, w, h)),
    };
    if samples.len() != channels as usize * w * h {
        return Err(ImagingError::Malformed {
            format,
            reason: "the decoder returned fewer pixels than the header announced".into(),
        });
    }
    Ok(Decoded {
        width,
        height,
        channels,
        samples,
        format,
        bit_depth,
        kind: if channels == 1 {
            ImageKind::Grey
        } else {
            ImageKind::Colour
        },
        window: None,
        window_function: crate::WindowFunction::Linear,
        dicom: None,
        orientation: orientation.to_exif(),
    })
}

/// Interleaved pixels with `n_in` channels → planar with 1 (from grey, grey+alpha)
/// or 3 (from RGB, RGBA) channels; alpha is dropped.
pub(crate) fn planar<T: Copy + Into<f32>>(raw: &[T], n_in: usize, w: usize, h: usize) -> Vec<f32> {
    let n_out = if n_in >= 3 { 3 } else { 1 };
    let px = w * h;
    if raw.len() < px * n_in {
        return Vec::new();
    }
    let mut out = vec![0.0f32; px * n_out];
    for (i, p) in raw.chunks_exact(n_in).take(px).enumerate() {
        for c in 0..n_out {
            out[c * px + i] = p[c].into();
        }
    }
    out
}

/// Whether a JPEG stream runs to its end-of-image marker (FF D9), walking the marker segments
/// by their lengths and each scan's entropy-coded data to the marker after it.
///
/// Why: the JPEG decoder is lenient. Cut anywhere after its headers (an interrupted copy, an
/// upload that lost its tail), a file still decoded, its missing rows grey, and the service
/// segmented an image that is not the patient's: this walk refuses it first, as libjpeg's
/// "premature end of JPEG file" and Pillow's "image file is truncated" do. It judges nothing
/// else (bytes after the end marker, odd segments): the decoder does.
pub(crate) fn jpeg_reaches_end(b: &[u8]) -> Result<(), String> {
    let cut = |at: usize, inside: &str| -> Result<(), String> {
        Err(format!(
            "the file is incomplete: its {at} bytes end {inside}, before the end-of-image \
             marker (FF D9)"
        ))
    };
    let mut i = 2; // after SOI
    loop {
        // The next marker: 0xFF, any fill bytes, then its code (stray bytes before it are the
        // decoder's business).
        match b.get(i..).and_then(|rest| rest.iter().position(|&x| x == 0xFF)) {
            Some(skip) => i += skip,
            None => return cut(b.len(), "between segments"),
        }
        while b.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = b.get(i) else {
            return cut(b.len(), "at a marker");
        };
        i += 1;
        match code {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => continue, // markers without a length
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
            return cut(b.len(), "in a segment's length");
        };
        if len < 2 {
            return Ok(()); // not a length: not a cut file; the decoder reports it
        }
        i += len;
        if i > b.len() {
            return cut(b.len(), &format!("inside a segment (marker FF {code:02X})"));
        }
        if code == 0xDA {
            // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte), a restart marker
            // or fill; any other code is the marker after the scan.
            loop {
                match b[i..].iter().position(|&x| x == 0xFF) {
                    Some(skip) => i += skip,
                    None => return cut(b.len(), "inside the compressed image data"),
                }
                match b.get(i + 1) {
                    None => return cut(b.len(), "inside the compressed image data"),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Width and height from a PNG's IHDR chunk, if the data is long enough to hold it.
fn png_ihdr_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let ihdr = bytes.get(8..24)?;
    if &ihdr[4..8] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([ihdr[8], ihdr[9], ihdr[10], ihdr[11]]);
    let h = u32::from_be_bytes([ihdr[12], ihdr[13], ihdr[14], ihdr[15]]);
    Some((w, h))
}

fn image_error(e: ImageError, format: Format) -> ImagingError {
    match e {
        ImageError::Limits(l) => ImagingError::Unsupported {
            format,
            reason: format!("decoding would need more memory than allowed ({l})"),
        },
        ImageError::Unsupported(u) => ImagingError::Unsupported {
            format,
            reason: u.to_string(),
        },
        other => ImagingError::Malformed {
            format,
            reason: other.to_string(),
        },
    }
}
