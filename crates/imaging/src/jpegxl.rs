//! JPEG XL frames of DICOM's JPEG XL transfer syntaxes (1.2.840.10008.1.2.4.110–112, 2024),
//! decoded by jxl-oxide (pure Rust) into the frame's native samples.
//!
//! Why not dicom-pixeldata's JPEG XL adapter: it writes jxl-oxide's 16-bit output, which
//! stretches every sample to the full 16-bit range (a 12-bit CT would come out ×16, and then be
//! cut to its 12 stored bits), and it decodes whatever size the codestream declares. Here the
//! codestream's size is checked against Rows and Columns as soon as its header is read, the
//! decoder's allocations are capped, and samples are scaled back to the codestream's own bit
//! depth.

use jxl_oxide::{AllocTracker, InitializeResult, JxlImage};

use crate::{Format, ImagingError};

fn malformed(reason: String) -> ImagingError {
    ImagingError::Malformed { format: Format::Dicom, reason }
}

/// What the decoder may allocate beyond the frame's own samples: its working buffers are a few
/// float planes of the frame, and this covers them with room to spare for small frames.
const SLACK_BYTES: usize = 64 << 20;

/// Frame `data` (one JPEG XL codestream or container) as native samples, row-major and
/// interleaved: `cols` × `rows` × `samples` values, each scaled to the codestream's own bit
/// depth (a 12-bit lossless CT gives its stored values exactly) and clamped to `max`, the
/// largest value the DICOM container holds. Fails, naming why, for a codestream of another
/// size or number of colour channels than the data set says, one that needs more memory than
/// a few float planes of its frame, or one that cannot be decoded.
pub(crate) fn decode(data: &[u8], cols: u32, rows: u32, samples: usize, max: u32) -> Result<Vec<u16>, ImagingError> {
    let planes = cols as usize * rows as usize * samples.max(1);
    let tracker = AllocTracker::with_limit(planes.saturating_mul(4 * 8).saturating_add(SLACK_BYTES));
    let mut uninit = JxlImage::builder().alloc_tracker(tracker).build_uninit();
    let corrupt = |what: &str| malformed(format!("the JPEG XL codestream {what} (corrupt, truncated or not JPEG XL)"));
    uninit.feed_bytes(data).map_err(|_| corrupt("cannot be read"))?;
    let mut image = match uninit.try_init().map_err(|_| corrupt("header cannot be read"))? {
        InitializeResult::Initialized(image) => image,
        InitializeResult::NeedMoreData(_) => return Err(corrupt("header is incomplete")),
    };
    let (width, height) = (image.width(), image.height());
    if (width, height) != (cols, rows) {
        return Err(malformed(format!("the JPEG XL image is {width}×{height} pixels but Rows/Columns say {rows}×{cols}")));
    }
    let grey = image.image_header().metadata.grayscale();
    if (grey && samples != 1) || (!grey && samples != 3) {
        return Err(malformed(format!(
            "the JPEG XL image has {} colour channel(s) but Samples per Pixel says {samples}",
            if grey { 1 } else { 3 }
        )));
    }
    image.finalize().map_err(|_| corrupt("is truncated"))?;
    let bits = image.image_header().metadata.bit_depth.bits_per_sample().clamp(1, 16);
    let frame = image.render_frame(0).map_err(|_| corrupt("cannot be decoded"))?;
    let mut stream = frame.stream_no_alpha();
    if stream.channels() as usize != samples {
        return Err(corrupt("decodes to an unexpected number of channels"));
    }
    let mut grey_levels = vec![0f32; planes];
    if stream.write_to_buffer(&mut grey_levels) != planes {
        return Err(corrupt("decodes to fewer samples than its size"));
    }
    let scale = f64::from((1u32 << bits) - 1);
    Ok(grey_levels
        .into_iter()
        .map(|v| (f64::from(v) * scale).round().clamp(0.0, f64::from(max)) as u16)
        .collect())
}
