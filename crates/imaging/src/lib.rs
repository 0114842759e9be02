//! Decoding of 2D medical and photographic images into floating-point planes.
//!
//! The segmentation service receives arbitrary user uploads, so this crate is the
//! trust boundary for pixel data: every decoder here takes a byte slice, never a file
//! name, and every malformed, truncated or hostile input comes back as an
//! [`ImagingError`] rather than a panic or an unbounded allocation.
//!
//! The pipeline is two pure steps, kept apart so that callers can inspect the native
//! values (Hounsfield units, raw 16-bit values…) before choosing a display window:
//!
//! 1. [`decode`]: bytes → [`Decoded`], samples in the image's *native units*
//!    (0..255, 0..65535, or rescaled DICOM values), planar C×H×W.
//! 2. [`normalize`]: [`Decoded`] → [`Image`], values windowed into `[0, 1]`.
//!
//! [`load`] does both. The output side ([`encode_labels_png`], [`encode_mask_png`],
//! [`decode_mask`], [`resize_mask_nearest`]) handles label maps and binary masks.
//!
//! Supported formats: PNG, JPEG, BMP, TIFF (through the `image` crate; TIFF pages after the
//! first and sample formats it does not read through the `tiff` crate) and DICOM
//! Part 10 (through `dicom-object` / `dicom-pixeldata`, Rust codecs and CharLS for JPEG-LS; see
//! `DICOM.md` and [`decode`] for the transfer syntaxes that decode).

mod dicom;
mod dicom_guard;
mod dicom_seg;
mod jpeg12;
mod jpegxl;
mod masks;
mod raster;
mod tiff_reader;
mod window;

use std::fmt;

pub use masks::{
    decode_mask, dilate_square, encode_grey_png16, encode_labels_png, encode_mask_png,
    resize_mask_nearest,
};
pub use dicom_seg::{dicom_source, encode_cluster_segmentation, encode_segmentation, Algorithm, DicomSource, SEGMENTATION_SOP_CLASS};
pub use window::{auto_window, auto_window_percentiles};

/// A container format recognised from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Png,
    Jpeg,
    Bmp,
    Tiff,
    /// DICOM Part 10 file: 128-byte preamble followed by `DICM`.
    Dicom,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Png => "png",
            Format::Jpeg => "jpeg",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
            Format::Dicom => "dicom",
        })
    }
}

/// Identifies the format from magic bytes only.
///
/// File names and MIME types sent by clients are not trusted: a mislabelled upload
/// must still decode (or fail) according to what it really is.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        Some(Format::Dicom)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"BM") {
        Some(Format::Bmp)
    } else if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        Some(Format::Tiff)
    } else {
        None
    }
}

/// Size limits checked against the header *before* any pixel buffer is allocated,
/// so that a 100-byte file claiming to be 100000×100000 pixels fails in microseconds
/// instead of exhausting memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum width and maximum height, each.
    pub max_side: u32,
    /// Maximum width × height.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 16384,
            max_pixels: 100_000_000,
        }
    }
}

/// Options for [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeOptions {
    pub limits: Limits,
    /// Which frame of a multi-frame DICOM, or page of a multi-page TIFF, to decode
    /// (0-based). Ignored by the other formats, which hold one image.
    pub frame: u32,
}

/// Whether an image is greyscale (1 channel) or colour (3 channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Grey,
    Colour,
}

/// A linear display window, in the image's native units.
///
/// Values at `center - width/2` map to 0 and values at `center + width/2` map to 1.
/// The text form `"C,W"` (e.g. `"-600,1500"` for a lung window) is what users type
/// on the command line and in requests, so it is the `FromStr`/`Display` format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
}

impl Window {
    /// Builds a window, rejecting the values for which windowing is undefined
    /// (non-finite numbers, width ≤ 0).
    pub fn new(center: f64, width: f64) -> Result<Window, ImagingError> {
        let w = Window { center, width };
        match w.problem() {
            None => Ok(w),
            Some(reason) => Err(ImagingError::InvalidWindow {
                input: w.to_string(),
                reason,
            }),
        }
    }

    /// Whether this window can be applied (finite values and a positive width).
    pub fn is_valid(&self) -> bool {
        self.problem().is_none()
    }

    fn problem(&self) -> Option<&'static str> {
        if !self.center.is_finite() || !self.width.is_finite() {
            Some("center and width must both be finite numbers")
        } else if self.width <= 0.0 {
            Some("width must be greater than 0")
        } else {
            None
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.center, self.width)
    }
}

impl std::str::FromStr for Window {
    type Err = ImagingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(64).collect();
        let err = |reason| ImagingError::InvalidWindow {
            input: shown.clone(),
            reason,
        };
        let mut parts = s.split(',');
        let (c, w) = match (parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(w), None) => (c.trim(), w.trim()),
            _ => {
                return Err(err(
                    "expected \"CENTER,WIDTH\", two numbers separated by a comma",
                ))
            }
        };
        let center: f64 = c.parse().map_err(|_| err("the center is not a number"))?;
        let width: f64 = w.parse().map_err(|_| err("the width is not a number"))?;
        let window = Window { center, width };
        match window.problem() {
            None => Ok(window),
            Some(reason) => Err(err(reason)),
        }
    }
}

/// How a DICOM file's own window maps its values to grey (VOI LUT Function (0028,1056), or the
/// curve of a VOI LUT Sequence). Why: an X-ray's vendor curve or a mammogram's sigmoid is the
/// contrast its modality meant; a straight ramp over the same range is another image. Only the
/// file's window has a shape: a window asked for in a request is linear.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum WindowFunction {
    /// `center - width/2` to black, `center + width/2` to white (LINEAR and LINEAR_EXACT alike:
    /// their half-value offsets are below a grey level of a 16-bit range).
    #[default]
    Linear,
    /// `1 / (1 + exp(-4 (x - center) / width))` (PS3.3 C.11.2.1.3.1).
    Sigmoid,
    /// A VOI LUT Sequence's table: value `first + i` (and values between it and the next)
    /// takes `grey[i]`; values before `first` the first entry, values past the end the last.
    /// The entries are stretched to [0, 1] over the table's own smallest and largest (what a
    /// segmentation needs is the curve's shape, not the display's brightness; many files
    /// declare 16 output bits for 12-bit data).
    Table { first: f64, grey: Vec<f32> },
}

impl WindowFunction {
    /// Its name as a result reports it: `"LINEAR"`, `"SIGMOID"` or `"TABLE"`.
    pub fn name(&self) -> &'static str {
        match self {
            WindowFunction::Linear => "LINEAR",
            WindowFunction::Sigmoid => "SIGMOID",
            WindowFunction::Table { .. } => "TABLE",
        }
    }
}

/// The few DICOM attributes worth reporting to a caller.
///
/// Deliberately carries no patient-identifying attribute (names, IDs, dates,
/// institution, UIDs of studies/series/instances…): this struct may be logged or
/// returned to clients.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomInfo {
    /// Modality (0008,0060), e.g. `"CT"`, when present and well-formed.
    pub modality: Option<String>,
    /// Photometric interpretation as stored in the file (e.g. `"MONOCHROME2"`,
    /// `"YBR_FULL_422"`); `"unrecognised"` for non-standard values.
    pub photometric: String,
    /// Transfer syntax UID from the file meta group, e.g. `"1.2.840.10008.1.2.1"`.
    pub transfer_syntax: String,
    /// Number of frames in the file (1 for single-frame objects).
    pub frames: u32,
    /// Bits Stored (0028,0101).
    pub bits_stored: u16,
    /// Pixel Spacing (0028,0030) in mm, [between rows, between columns], when the file gives
    /// it: what turns pixel counts into areas.
    pub pixel_spacing_mm: Option<[f64; 2]>,
}

/// A decoded image in its native units.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub width: u32,
    pub height: u32,
    /// 1 (grey) or 3 (RGB). Alpha is dropped; grey+alpha gives 1.
    pub channels: u8,
    /// Planar C×H×W, in native units: 0..255 for 8-bit, 0..65535 for 16-bit,
    /// rescaled (Hounsfield-like) units for DICOM after Rescale Slope/Intercept.
    pub samples: Vec<f32>,
    pub format: Format,
    /// Bits per sample of the container: 8 or 16 for raster images (32 for float
    /// TIFFs); Bits Allocated for DICOM (8, 16 or 32; 1-bit DICOM is expanded to 8).
    pub bit_depth: u8,
    pub kind: ImageKind,
    /// The file's own display window (DICOM Window Center/Width, first value, or a VOI LUT
    /// Sequence's input range), in the same units as `samples`.
    pub window: Option<Window>,
    /// How `window` maps values to grey: [`WindowFunction::Linear`] but for a DICOM file that
    /// says otherwise.
    pub window_function: WindowFunction,
    pub dicom: Option<DicomInfo>,
    /// The EXIF orientation (1–8) the file carried (JPEG's Exif, TIFF's Orientation tag, PNG's
    /// eXIf) and that has been applied: `width`, `height` and `samples` are the image as viewers
    /// show it, turned or flipped from how the file stores it. 1 when there was none, and for
    /// DICOM, whose pixel rows are what the scanner acquired.
    pub orientation: u8,
}

/// A normalised image ready for the model: planar C×H×W, values in `[0, 1]`.
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub channels: u8,
    pub data: Vec<f32>,
    pub kind: ImageKind,
}

/// A label map (e.g. a segmentation result), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u16>,
}

/// Everything that can go wrong while decoding.
///
/// Messages never echo DICOM element values: errors from the DICOM crates are
/// replaced by fixed descriptions, because their text can contain attribute
/// values (patient names, IDs…), and error messages end up in logs and responses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ImagingError {
    #[error("empty input: no bytes to decode")]
    EmptyInput,
    #[error(
        "unrecognised image format: the data does not start with the signature of a \
         supported format (PNG, JPEG, BMP, TIFF, or DICOM Part 10 with \"DICM\" at offset 128)"
    )]
    UnknownFormat,
    #[error("image is {width}×{height} pixels, larger than the limit of {max_side} per side")]
    TooLarge {
        width: u64,
        height: u64,
        max_side: u32,
    },
    #[error(
        "image is {width}×{height} = {pixels} pixels, more than the limit of {max_pixels} pixels"
    )]
    TooManyPixels {
        width: u64,
        height: u64,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("image has zero size ({width}×{height} pixels)")]
    ZeroSize { width: u64, height: u64 },
    #[error("malformed or truncated {format} data: {reason}")]
    Malformed { format: Format, reason: String },
    #[error("unsupported {format} content: {reason}")]
    Unsupported { format: Format, reason: String },
    #[error("DICOM file has no pixel data")]
    NoPixelData,
    /// `frame` of a multi-frame DICOM, or page of a multi-page TIFF.
    #[error(
        "frame {frame} was requested but the {format} file has {frames} {}, numbered from 0",
        if *.format == Format::Tiff { "page(s)" } else { "frame(s)" }
    )]
    FrameOutOfRange {
        format: Format,
        frame: u32,
        frames: u32,
    },
    #[error(
        "DICOM transfer syntax {uid} ({name}) cannot be decoded; supported: implicit/explicit \
         VR little endian, explicit VR big endian, JPEG baseline/extended/lossless, RLE lossless, \
         JPEG-LS, JPEG 2000 (also High-Throughput)"
    )]
    UnsupportedTransferSyntax { uid: String, name: String },
    #[error("invalid window {input:?}: {reason}")]
    InvalidWindow { input: String, reason: &'static str },
    #[error(
        "the {format} decoder failed unexpectedly on this input (the file is probably malformed)"
    )]
    DecoderPanicked { format: Format },
    /// A DICOM Segmentation was asked of an image it cannot be made for (see
    /// [`dicom_source`]).
    #[error("cannot make a DICOM Segmentation of this image: {reason}")]
    NotSegmentable { reason: String },
    /// A failure of this crate or of a library under it, not of the input (e.g. the DICOM
    /// writer failing on an object this crate built).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Checks header dimensions against `limits`, before anything is allocated.
pub(crate) fn check_dims(width: u64, height: u64, limits: &Limits) -> Result<(), ImagingError> {
    if width == 0 || height == 0 {
        return Err(ImagingError::ZeroSize { width, height });
    }
    if width > u64::from(limits.max_side) || height > u64::from(limits.max_side) {
        return Err(ImagingError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    let pixels = width.saturating_mul(height);
    if pixels > limits.max_pixels {
        return Err(ImagingError::TooManyPixels {
            width,
            height,
            pixels,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Runs a third-party decoder, turning a panic inside it into an error.
///
/// The decoders are well tested, but they parse hostile input; a bug in one of them
/// must cost one request, not the whole server thread.
pub(crate) fn guard<T>(
    format: Format,
    f: impl FnOnce() -> Result<T, ImagingError>,
) -> Result<T, ImagingError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or(Err(ImagingError::DecoderPanicked { format }))
}

/// What decoding an image would give, read from its headers alone: the format and the
/// size of the image (as stored: an orientation tag may swap width and height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// 1 (grey) or 3 (colour), as [`Decoded::channels`].
    pub channels: u8,
    /// Frames of a multi-frame DICOM (Number of Frames), pages of a TIFF, else 1: what
    /// [`DecodeOptions::frame`] may pick from (0-based).
    pub frames: u32,
}

impl Header {
    /// Bytes of the normalised image ([`Image::data`], 4 per sample), the unit of a service's
    /// queue budget. A decode holds about twice to three times this while it runs (the
    /// decoder's buffer, then the native-unit samples beside it).
    pub fn image_bytes(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * u64::from(self.channels) * 4
    }
}

/// Reads an image's headers without decoding its pixels: the format, the size (checked
/// against `opts.limits`) and the channels, for `opts.frame` of a multi-frame file.
///
/// Why: a service must know what an image will cost before it decodes it. A decode holds a
/// few times the image's size, and a burst of large images decoded at once, to be refused by
/// the queue's memory budget afterwards, took the memory the budget was there to protect (12
/// concurrent 6000×6000 grey PNGs of 1 MB each took a server from 0.36 to 3.7 GB). This costs
/// a header parse: microseconds for raster formats, a parse of the data set up to the pixel
/// data for DICOM. The decode can still fail on what the headers do not show.
pub fn probe(bytes: &[u8], opts: &DecodeOptions) -> Result<Header, ImagingError> {
    if bytes.is_empty() {
        return Err(ImagingError::EmptyInput);
    }
    match sniff(bytes) {
        None => Err(ImagingError::UnknownFormat),
        Some(Format::Dicom) => guard(Format::Dicom, || dicom::probe_dicom(bytes, opts)),
        Some(Format::Tiff) => guard(Format::Tiff, || tiff_reader::probe_tiff(bytes, opts)),
        Some(format) => guard(format, || raster::probe_raster(bytes, format, &opts.limits)),
    }
}

/// Decodes any supported image from memory.
///
/// The format comes from [`sniff`]. Limits are checked against the header before
/// pixel buffers are allocated. For DICOM, samples are rescaled with Rescale
/// Slope/Intercept (defaults 1/0), MONOCHROME1 is inverted so that higher always
/// means brighter, `YBR_FULL` is converted to RGB, and frame `opts.frame` is picked.
///
/// DICOM transfer syntaxes that decode (Rust codecs, but CharLS for JPEG-LS): implicit VR little endian
/// (1.2.840.10008.1.2), explicit VR little endian (1.2.840.10008.1.2.1), explicit VR
/// big endian (1.2.840.10008.1.2.2), JPEG baseline (…1.2.4.50), JPEG extended
/// (…1.2.4.51), JPEG lossless (…1.2.4.57, …1.2.4.70), RLE lossless (…1.2.5), JPEG-LS
/// (…1.2.4.80, …1.2.4.81; CharLS, the one C++ codec) and JPEG 2000 (…1.2.4.90, …1.2.4.91,
/// and High-Throughput, …1.2.4.201–203), JPEG XL (…1.2.4.110–112, jxl-oxide), and deflated
/// explicit VR little endian (…1.2.1.99, inflated first, at most 64 MiB). Video syntaxes
/// return [`ImagingError::UnsupportedTransferSyntax`] (see `DICOM.md`).
pub fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<Decoded, ImagingError> {
    if bytes.is_empty() {
        return Err(ImagingError::EmptyInput);
    }
    match sniff(bytes) {
        None => Err(ImagingError::UnknownFormat),
        Some(Format::Dicom) => guard(Format::Dicom, || dicom::decode_dicom(bytes, opts)),
        Some(Format::Tiff) => guard(Format::Tiff, || tiff_reader::decode_tiff(bytes, opts)),
        Some(format) => guard(format, || {
            raster::decode_raster(bytes, format, &opts.limits)
        }),
    }
}

/// Maps native samples into `[0, 1]`.
///
/// Window precedence, first match wins:
/// 1. the explicit `window` argument;
/// 2. the file's own window (DICOM Window Center/Width);
/// 3. plain `/255` for 8-bit non-DICOM images (photographs are display-ready);
/// 4. [`auto_window`].
///
/// A window that is not [`Window::is_valid`] is skipped in favour of the next rule,
/// since this function cannot fail. Values clamp to `[0, 1]`; NaN samples become 0.
/// MONOCHROME1 needs no special case: [`decode`] already inverted it.
pub fn normalize(decoded: &Decoded, window: Option<Window>) -> Image {
    Image {
        width: decoded.width,
        height: decoded.height,
        channels: decoded.channels,
        data: {
            let (w, f) = decoded.window_for(window);
            window::apply_window(&decoded.samples, w, f)
        },
        kind: decoded.kind,
    }
}

impl Decoded {
    /// The window a result reports as applied and how it maps values to grey: `asked` when
    /// valid (linear), else the file's (a DICOM's Window Center/Width or VOI LUT, with its
    /// [`WindowFunction`]); None when [`normalize`] picks one itself (8-bit range, or
    /// [`auto_window`]).
    pub fn given_window(&self, asked: Option<Window>) -> Option<(Window, &WindowFunction)> {
        match asked.filter(Window::is_valid) {
            Some(w) => Some((w, &WindowFunction::Linear)),
            None => self.window.filter(Window::is_valid).map(|w| (w, &self.window_function)),
        }
    }

    /// The window [`normalize`] applies and its function: [`Self::given_window`], else the full
    /// 8-bit range for 8-bit rasters, else [`auto_window`] (linear, those two).
    fn window_for(&self, asked: Option<Window>) -> (Window, &WindowFunction) {
        match self.given_window(asked) {
            Some(given) => given,
            None if self.format != Format::Dicom && self.bit_depth == 8 => (Window { center: 127.5, width: 255.0 }, &WindowFunction::Linear),
            None => (auto_window(&self.samples), &WindowFunction::Linear),
        }
    }

    /// [`normalize`], windowing the samples in their own buffer. Why: `normalize` holds the
    /// decoded samples and the image together, two image-sized f32 buffers (2.4 GB for a
    /// 10000² colour image); read what else the caller needs from the `Decoded` first.
    pub fn into_image(mut self, window: Option<Window>) -> Image {
        let (w, f) = self.window_for(window);
        let f = f.clone();
        window::apply_window_in_place(&mut self.samples, w, &f);
        Image { width: self.width, height: self.height, channels: self.channels, data: self.samples, kind: self.kind }
    }
}

/// [`decode`] followed by [`normalize`].
pub fn load(
    bytes: &[u8],
    opts: &DecodeOptions,
    window: Option<Window>,
) -> Result<Image, ImagingError> {
    decode(bytes, opts).map(|d| d.into_image(window))
}
