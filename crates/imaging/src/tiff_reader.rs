//! TIFF: the pages after the first, and the sample formats the `image` crate does not read.
//!
//! Why a second TIFF path: research and hospital pipelines write what they hold. A CT slice in
//! Hounsfield units is a signed 16-bit array (`tifffile.imwrite("ct.tif", hu.astype(np.int16))`),
//! ImageJ saves 32-bit float, and a stack of slices is one multi-page TIFF. The `image` crate
//! reads unsigned 8- and 16-bit samples (and float RGB) of the first page only, so these came
//! back "unsupported". Here the `tiff` crate reads them in their own units, like a DICOM's
//! rescaled values, and the request's `frame` picks the page. What the `image` crate reads on
//! the first page still goes through it, as before.

use std::io::Cursor;

use tiff::decoder::{Decoder, DecodingResult, Limits as TiffLimits};
use tiff::tags::Tag;
use tiff::{ColorType, TiffError};

use crate::{check_dims, raster, DecodeOptions, Decoded, Format, Header, ImageKind, ImagingError};

/// SampleFormat (339): 1 unsigned integer, 2 signed integer, 3 IEEE float.
const UINT: u16 = 1;
const IEEE_FLOAT: u16 = 3;

/// A TIFF decoder over bytes in memory.
type PageDecoder<'a> = Decoder<Cursor<&'a [u8]>>;

/// A decoder at page `opts.frame`, its size checked against the limits.
fn open_page<'a>(bytes: &'a [u8], opts: &DecodeOptions) -> Result<(PageDecoder<'a>, u32, u32), ImagingError> {
    let limits = &opts.limits;
    let mut buffers = TiffLimits::default();
    // Room for the largest allowed image, 4 samples of 8 bytes a pixel; the pixel count itself
    // is checked against `limits` from the header before anything is read.
    buffers.decoding_buffer_size = usize::try_from(limits.max_pixels.saturating_mul(32)).unwrap_or(usize::MAX);
    let mut dec = Decoder::new(Cursor::new(bytes)).map_err(tiff_error)?.with_limits(buffers);
    for page in 1..=opts.frame {
        if !dec.more_images() {
            return Err(ImagingError::FrameOutOfRange { format: Format::Tiff, frame: opts.frame, frames: page });
        }
        dec.next_image().map_err(tiff_error)?;
    }
    let (width, height) = dec.dimensions().map_err(tiff_error)?;
    check_dims(u64::from(width), u64::from(height), limits)?;
    Ok((dec, width, height))
}

/// The size and channels of page `opts.frame`, and the pages of the file (see
/// [`crate::probe`]; the pages after it are counted by reading their directories only).
pub(crate) fn probe_tiff(bytes: &[u8], opts: &DecodeOptions) -> Result<Header, ImagingError> {
    let (mut dec, width, height) = open_page(bytes, opts)?;
    let channels = match dec.colortype().map_err(tiff_error)? {
        ColorType::Gray(_) | ColorType::GrayA(_) => 1,
        _ => 3,
    };
    let mut frames = opts.frame + 1;
    while dec.more_images() {
        dec.next_image().map_err(tiff_error)?;
        frames += 1;
    }
    Ok(Header { format: Format::Tiff, width, height, channels, frames })
}

pub(crate) fn decode_tiff(bytes: &[u8], opts: &DecodeOptions) -> Result<Decoded, ImagingError> {
    let limits = &opts.limits;
    let (mut dec, width, height) = open_page(bytes, opts)?;
    let color = dec.colortype().map_err(tiff_error)?;
    let sample_format = first_value(&mut dec, Tag::SampleFormat)?.unwrap_or(UINT);
    if opts.frame == 0 && image_crate_reads(color, sample_format) {
        return raster::decode_raster(bytes, Format::Tiff, limits);
    }

    let unsupported = |reason: String| ImagingError::Unsupported { format: Format::Tiff, reason };
    let (samples_per_pixel, bits) = match color {
        ColorType::Gray(b) => (1, b),
        ColorType::GrayA(b) => (2, b),
        ColorType::RGB(b) => (3, b),
        ColorType::RGBA(b) => (4, b),
        other => return Err(unsupported(format!("{other:?} pixels on page {} (grey, grey+alpha, RGB and RGBA are read)", opts.frame))),
    };
    if !matches!(bits, 8 | 16 | 32 | 64) {
        return Err(unsupported(format!("{bits}-bit samples on page {} (8, 16, 32 and 64 bits are read)", opts.frame)));
    }
    if samples_per_pixel > 1 && first_value(&mut dec, Tag::PlanarConfiguration)? == Some(2) {
        return Err(unsupported("colour stored as separate planes (PlanarConfiguration 2)".into()));
    }
    let orientation = first_value(&mut dec, Tag::Orientation)?.filter(|o| (1..=8).contains(o)).unwrap_or(1) as u8;

    let values = widen(dec.read_image().map_err(tiff_error)?);
    let (w, h) = (width as usize, height as usize);
    if values.len() < w * h * samples_per_pixel {
        return Err(ImagingError::Malformed {
            format: Format::Tiff,
            reason: "the decoder returned fewer samples than the header announced".into(),
        });
    }
    // WhiteIsZero grey (0 for white) comes back turned round by the `tiff` crate, so larger is
    // brighter here as everywhere.
    let samples = raster::planar(&values, samples_per_pixel, w, h);
    drop(values);
    let channels: u8 = if samples_per_pixel >= 3 { 3 } else { 1 };
    let (samples, width, height) = orient_planar(samples, usize::from(channels), w, h, orientation);
    Ok(Decoded {
        width: width as u32,
        height: height as u32,
        channels,
        samples,
        format: Format::Tiff,
        bit_depth: bits,
        kind: if channels == 1 { ImageKind::Grey } else { ImageKind::Colour },
        window: None,
        window_function: crate::WindowFunction::Linear,
        dicom: None,
        orientation,
    })
}

/// Whether the `image` crate reads this first page (its TIFF decoder's list, 0.25): unsigned
/// 1-, 8- and 16-bit grey, grey+alpha, RGB, RGBA and CMYK, and 32-bit float RGB(A).
fn image_crate_reads(color: ColorType, sample_format: u16) -> bool {
    matches!(
        (color, sample_format),
        (ColorType::Gray(1 | 8 | 16) | ColorType::GrayA(8 | 16) | ColorType::RGB(8 | 16) | ColorType::RGBA(8 | 16) | ColorType::CMYK(8 | 16), UINT)
            | (ColorType::RGB(32) | ColorType::RGBA(32), IEEE_FLOAT)
    )
}

/// The first value of a tag of this page, if present.
fn first_value(dec: &mut PageDecoder<'_>, tag: Tag) -> Result<Option<u16>, ImagingError> {
    Ok(dec.find_tag_unsigned_vec::<u16>(tag).map_err(tiff_error)?.and_then(|v| v.first().copied()))
}

/// Every sample as f32, in its own units. 32-bit integers above 2²⁴ and 64-bit values lose
/// their last bits, which a display window of them never shows.
fn widen(data: DecodingResult) -> Vec<f32> {
    fn all<T: Copy>(v: Vec<T>, f: impl Fn(T) -> f32) -> Vec<f32> {
        v.into_iter().map(f).collect()
    }
    match data {
        DecodingResult::U8(v) => all(v, f32::from),
        DecodingResult::U16(v) => all(v, f32::from),
        DecodingResult::U32(v) => all(v, |x| x as f32),
        DecodingResult::U64(v) => all(v, |x| x as f32),
        DecodingResult::I8(v) => all(v, f32::from),
        DecodingResult::I16(v) => all(v, f32::from),
        DecodingResult::I32(v) => all(v, |x| x as f32),
        DecodingResult::I64(v) => all(v, |x| x as f32),
        DecodingResult::F16(v) => all(v, |x| x.to_f32()),
        DecodingResult::F32(v) => v,
        DecodingResult::F64(v) => all(v, |x| x as f32),
    }
}

/// Planar samples `(c, h, w)` turned as EXIF orientation `o` (1–8) says, as viewers show them:
/// the samples and the new width and height.
pub(crate) fn orient_planar(samples: Vec<f32>, c: usize, w: usize, h: usize, o: u8) -> (Vec<f32>, usize, usize) {
    if !(2..=8).contains(&o) {
        return (samples, w, h);
    }
    let swap = o >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = vec![0.0f32; samples.len()];
    for ch in 0..c {
        let (src, dst) = (&samples[ch * w * h..(ch + 1) * w * h], &mut out[ch * w * h..(ch + 1) * w * h]);
        for y in 0..oh {
            for x in 0..ow {
                // The stored pixel shown at (x, y).
                let (sx, sy) = match o {
                    2 => (w - 1 - x, y),         // mirrored left-right
                    3 => (w - 1 - x, h - 1 - y), // turned 180°
                    4 => (x, h - 1 - y),         // mirrored top-bottom
                    5 => (y, x),                 // transposed
                    6 => (y, h - 1 - x),         // turned 90° clockwise
                    7 => (w - 1 - y, h - 1 - x), // transversed
                    _ => (w - 1 - y, x),         // 8: turned 90° counter-clockwise
                };
                dst[y * ow + x] = src[sy * w + sx];
            }
        }
    }
    (out, ow, oh)
}

fn tiff_error(e: TiffError) -> ImagingError {
    match e {
        TiffError::UnsupportedError(u) => ImagingError::Unsupported { format: Format::Tiff, reason: u.to_string() },
        TiffError::LimitsExceeded => ImagingError::Unsupported {
            format: Format::Tiff,
            reason: "decoding would need more memory than allowed".into(),
        },
        other => ImagingError::Malformed { format: Format::Tiff, reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use image::metadata::Orientation;
    use image::{DynamicImage, ImageBuffer, Luma};

    use super::orient_planar;

    /// The same pixels where the `image` crate puts them for each of the eight orientations,
    /// on a 5×3 image of distinct values, in two channels.
    #[test]
    fn orient_planar_matches_the_image_crate() {
        let (w, h) = (5usize, 3usize);
        let stored: Vec<f32> = (0..2 * w * h).map(|i| i as f32).collect();
        for o in 1..=8u8 {
            let (got, ow, oh) = orient_planar(stored.clone(), 2, w, h, o);
            for c in 0..2 {
                let plane = ImageBuffer::<Luma<u16>, _>::from_fn(w as u32, h as u32, |x, y| Luma([stored[c * w * h + y as usize * w + x as usize] as u16]));
                let mut img = DynamicImage::ImageLuma16(plane);
                img.apply_orientation(Orientation::from_exif(o).unwrap());
                assert_eq!((img.width() as usize, img.height() as usize), (ow, oh), "orientation {o}");
                let want: Vec<f32> = img.to_luma16().as_raw().iter().map(|&v| f32::from(v)).collect();
                assert_eq!(&got[c * w * h..(c + 1) * w * h], want.as_slice(), "orientation {o}, channel {c}");
            }
        }
    }
}
