//! Cheap structural checks run before the DICOM crates see the data.
//!
//! `dicom-parser` allocates *and zero-fills* a buffer of an element's declared
//! length before reading it, and `jpeg-decoder` allocates from the dimensions in
//! the JPEG header, not from Rows/Columns. A 300-byte upload declaring a 4 GiB
//! element or a 65535×65535 JPEG would therefore cost gigabytes and seconds. These
//! walks reject such files first, so every allocation stays bounded by the input
//! size or by the checked image limits.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use crate::{Format, ImagingError};

const UNDEFINED: u32 = 0xFFFF_FFFF;
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const EXPLICIT_LE: &[u8; 20] = b"1.2.840.10008.1.2.1\0";

/// The most a deflated data set may inflate to (64 MiB). Why a fixed bound: its declared
/// lengths cannot be checked before it is inflated, and deflate reaches 1000:1, so a 1 MB
/// upload could otherwise become a gigabyte. The standard meant the syntax for data sets with
/// no or small pixel data; this holds a 4096² 16-bit image or 250 frames of a 512² one.
pub(crate) const MAX_INFLATED: usize = 64 << 20;

fn bad(reason: &str) -> ImagingError {
    ImagingError::Malformed {
        format: Format::Dicom,
        reason: reason.to_string(),
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    big: bool,
}

impl Cursor<'_> {
    fn u16(&self, at: usize) -> Option<u16> {
        let s = self.b.get(at..at + 2)?;
        Some(if self.big {
            u16::from_be_bytes([s[0], s[1]])
        } else {
            u16::from_le_bytes([s[0], s[1]])
        })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let s = self.b.get(at..at + 4)?;
        let a = [s[0], s[1], s[2], s[3]];
        Some(if self.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }
}

/// Explicit-VR header: (VR, value length, header length).
fn explicit_header(c: &Cursor, pos: usize) -> Option<(VR, u32, usize)> {
    let code = c.b.get(pos + 4..pos + 6)?;
    let vr = VR::from_binary([code[0], code[1]]).unwrap_or(VR::UN);
    // Same split as dicom-encoding's explicit VR decoders (PS3.5 7.1.2).
    let short = matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::AT
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::FL
            | VR::FD
            | VR::IS
            | VR::LO
            | VR::LT
            | VR::PN
            | VR::SH
            | VR::SL
            | VR::SS
            | VR::ST
            | VR::TM
            | VR::UI
            | VR::UL
            | VR::US
    );
    if short {
        Some((vr, u32::from(c.u16(pos + 6)?), 8))
    } else {
        Some((vr, c.u32(pos + 8)?, 12))
    }
}

/// The file meta group of `body` (which starts at the `DICM` magic; always explicit VR little
/// endian): each element's offset, header length and value length, in order, up to the first
/// header that cannot be read (left for the parser to report). Fails for an element longer
/// than the file.
fn meta_elements(body: &[u8]) -> Result<Vec<(usize, usize, usize)>, ImagingError> {
    let meta = Cursor { b: body, big: false };
    let mut pos = 4;
    let mut out = Vec::new();
    while meta.u16(pos) == Some(0x0002) {
        let Some((_, len, hdr)) = explicit_header(&meta, pos) else { break };
        let end = (pos + hdr)
            .checked_add(len as usize)
            .filter(|&e| len != UNDEFINED && e <= body.len())
            .ok_or_else(|| bad("a file meta element is longer than the file"))?;
        out.push((pos, hdr, len as usize));
        pos = end;
    }
    Ok(out)
}

/// The Transfer Syntax UID among the file meta `elements` of `body`, padding removed; empty
/// where there is none.
fn transfer_syntax_of<'a>(body: &'a [u8], elements: &[(usize, usize, usize)]) -> &'a str {
    let c = Cursor { b: body, big: false };
    elements
        .iter()
        .find(|&&(pos, _, _)| c.u16(pos + 2) == Some(0x0010))
        .and_then(|&(pos, hdr, len)| std::str::from_utf8(&body[pos + hdr..pos + hdr + len]).ok())
        .map_or("", |s| s.trim_end_matches(['\0', ' ']))
}

/// The Transfer Syntax UID of the file meta group of `body` (from the `DICM` magic), padding
/// removed; empty where there is none or the group cannot be read.
pub(crate) fn transfer_syntax(body: &[u8]) -> &str {
    meta_elements(body).map_or("", |elements| transfer_syntax_of(body, &elements))
}

/// For a file (`body`, from the `DICM` magic) in Deflated Explicit VR Little Endian: the same
/// file with its data set inflated and its file meta saying Explicit VR Little Endian, which
/// the length checks and the parser then read as any other file. None for other syntaxes.
/// Fails, naming why, for a data set that inflates past [`MAX_INFLATED`] (it stops there) or
/// that is not a raw deflate stream (PS3.5 A.5: no zlib header).
pub(crate) fn inflate(body: &[u8]) -> Result<Option<Vec<u8>>, ImagingError> {
    use std::io::Read;
    // A file meta that cannot be walked is left for `check_element_lengths` to report.
    let Ok(elements) = meta_elements(body) else { return Ok(None) };
    if transfer_syntax_of(body, &elements) != DEFLATED {
        return Ok(None);
    }
    let c = Cursor { b: body, big: false };
    // The file meta, its transfer syntax rewritten and its group length made to match.
    let mut out = b"DICM".to_vec();
    let mut group_length_at = None;
    for &(pos, hdr, len) in &elements {
        match c.u16(pos + 2) {
            Some(0x0010) => {
                out.extend_from_slice(&body[pos..pos + 6]);
                out.extend_from_slice(&(EXPLICIT_LE.len() as u16).to_le_bytes());
                out.extend_from_slice(EXPLICIT_LE);
            }
            Some(0x0000) if hdr == 8 && len == 4 => {
                out.extend_from_slice(&body[pos..pos + 8]);
                group_length_at = Some(out.len());
                out.extend_from_slice(&[0; 4]);
            }
            _ => out.extend_from_slice(&body[pos..pos + hdr + len]),
        }
    }
    if let Some(at) = group_length_at {
        let length = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&length.to_le_bytes());
    }
    let meta_end = elements.last().map_or(4, |&(pos, hdr, len)| pos + hdr + len);
    let meta_len = out.len();
    flate2::read::DeflateDecoder::new(&body[meta_end..])
        .take(MAX_INFLATED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| bad("the deflated data set cannot be inflated (corrupt or truncated, or not raw deflate)"))?;
    if out.len() - meta_len > MAX_INFLATED {
        return Err(ImagingError::Unsupported {
            format: Format::Dicom,
            reason: format!("a deflated data set that inflates past {} MiB is not supported", MAX_INFLATED >> 20),
        });
    }
    Ok(Some(out))
}

/// The size of one value of a binary VR with fixed-size values, whose length must be a
/// multiple of it (PS3.5 6.2).
///
/// Why it is checked: dicom-parser reads `length / width` values and then counts `length`
/// bytes as read, so a 2-byte SL value leaves its stream 2 bytes short of where it counts
/// itself. Everything after is read out of step: the fuzzer (`fuzz/`) turned one such element
/// in a 30 KB file into an element length of 0xFFFF0000, which the parser then allocated and
/// zero-filled (4 GiB) before finding the file too short.
fn value_width(vr: VR) -> Option<u32> {
    match vr {
        VR::SS | VR::US | VR::OW => Some(2),
        VR::SL | VR::UL | VR::FL | VR::AT | VR::OF | VR::OL => Some(4),
        VR::FD | VR::SV | VR::UV | VR::OD | VR::OV => Some(8),
        _ => None,
    }
}

/// Checks that every declared element and item length fits in the bytes that
/// follow it. `body` starts at the `DICM` magic. Truncated headers are left for
/// the parser to report.
pub(crate) fn check_element_lengths(body: &[u8]) -> Result<(), ImagingError> {
    let elements = meta_elements(body)?;
    let mut pos = elements.last().map_or(4, |&(at, hdr, len)| at + hdr + len);
    let (explicit, big) = match transfer_syntax_of(body, &elements) {
        "1.2.840.10008.1.2" => (false, false),
        "1.2.840.10008.1.2.2" => (true, true),
        // Deflated data cannot be checked without inflating it: [`inflate`] does that first,
        // and dicom-object (its deflate codec not enabled) refuses what reaches it deflated.
        DEFLATED => return Ok(()),
        _ => (true, false),
    };
    let c = Cursor { b: body, big };
    let mut in_pixel_sequence = false;
    while pos < body.len() {
        let (Some(group), Some(element)) = (c.u16(pos), c.u16(pos + 2)) else {
            return Ok(());
        };
        let tag = Tag(group, element);
        let fits = |hdr: usize, len: u32| len as usize <= body.len().saturating_sub(pos + hdr);

        if group == 0xFFFE {
            // Item, item delimiter, sequence delimiter: tag + 4-byte length.
            let Some(len) = c.u32(pos + 4) else {
                return Ok(());
            };
            match element {
                0xE000 if len != UNDEFINED => {
                    if !fits(8, len) {
                        return Err(bad("a sequence item is longer than the file"));
                    }
                    // Pixel fragments are opaque bytes; other items hold elements.
                    pos += 8 + if in_pixel_sequence { len as usize } else { 0 };
                }
                0xE000 => pos += 8,
                // Delimiters have no value (PS3.5 7.5). dicom-parser reads any other tag of
                // this group, or a delimiter where it expects an element, as an element of
                // that length: a 3 KB file with (FFFE,000D) of length 0xE0000000 made it
                // allocate 3.5 GiB (found by fuzzing).
                0xE00D | 0xE0DD if len == 0 => {
                    in_pixel_sequence &= element != 0xE0DD;
                    pos += 8;
                }
                0xE00D | 0xE0DD => return Err(bad(&format!("the delimiter (FFFE,{element:04X}) has a length of {len} bytes, not 0"))),
                _ => {
                    return Err(bad(&format!(
                        "the tag (FFFE,{element:04X}) is not an item or a delimiter, the only tags of group FFFE"
                    )))
                }
            }
            continue;
        }

        let (vr, len, hdr) = if explicit {
            let Some(h) = explicit_header(&c, pos) else {
                return Ok(());
            };
            h
        } else {
            let Some(len) = c.u32(pos + 4) else {
                return Ok(());
            };
            let vr = StandardDataDictionary
                .by_tag(tag)
                .map(|e| e.vr().relaxed())
                .unwrap_or(VR::UN);
            (vr, len, 8)
        };
        if len == UNDEFINED {
            if explicit && vr == VR::UN {
                return Err(bad(
                    "elements of unknown VR with undefined length are not supported",
                ));
            }
            if tag == PIXEL_DATA {
                in_pixel_sequence = true;
            }
            // A sequence (or encapsulated pixel data): walk into it.
            pos += hdr;
            continue;
        }
        if !fits(hdr, len) {
            return Err(bad(
                "an element's declared length runs past the end of the file",
            ));
        }
        if let Some(width) = value_width(vr).filter(|w| len % w != 0) {
            return Err(bad(&format!(
                "element ({group:04X},{element:04X}) of VR {vr} has a length of {len} bytes, not a multiple of {width}"
            )));
        }
        pos += hdr + if vr == VR::SQ { 0 } else { len as usize };
    }
    Ok(())
}

/// What the header of a JPEG stream starting at SOI says, up to its first SOF segment.
struct JpegHeader {
    /// The SOF marker (0xC0–0xCF, or JPEG-LS's 0xF7) and the offset of its length field.
    sof: (u8, usize),
    /// A JFIF APP0 segment came first (it means YCbCr), or an Adobe APP14 one (it names the
    /// colour transform).
    jfif: bool,
    adobe: bool,
}

fn jpeg_header(b: &[u8]) -> Option<JpegHeader> {
    if b.get(0..2)? != [0xFF, 0xD8] {
        return None;
    }
    let (mut pos, mut jfif, mut adobe) = (2, false, false);
    loop {
        if *b.get(pos)? != 0xFF {
            return None;
        }
        while *b.get(pos)? == 0xFF {
            pos += 1;
        }
        let marker = *b.get(pos)?;
        pos += 1;
        match marker {
            0xD0..=0xD7 | 0x01 => continue,
            0xD9 | 0xDA => return None,
            _ => {}
        }
        // SOF0–SOF15, and JPEG-LS's SOF55 (same layout).
        if (matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)) || marker == 0xF7 {
            return Some(JpegHeader { sof: (marker, pos), jfif, adobe });
        }
        jfif |= marker == 0xE0 && b.get(pos + 2..pos + 7) == Some(b"JFIF\0");
        adobe |= marker == 0xEE && b.get(pos + 2..pos + 7) == Some(b"Adobe");
        pos += usize::from(u16::from_be_bytes([*b.get(pos)?, *b.get(pos + 1)?]));
    }
}

/// The first SOF segment of a JPEG (or JPEG-LS) stream starting at SOI: its marker and the
/// offset of its length field.
fn jpeg_sof(b: &[u8]) -> Option<(u8, usize)> {
    jpeg_header(b).map(|h| h.sof)
}

/// The sample precision of the first lossy JPEG frame among the fragments, when it is more than
/// 8 bits (12-bit JPEG Extended, which `jpeg-decoder` cannot decode).
pub(crate) fn jpeg_precision_over_8(fragments: &[Vec<u8>]) -> Option<u8> {
    fragments.iter().find_map(|f| {
        let (marker, pos) = jpeg_sof(f)?;
        let bits = *f.get(pos + 2)?;
        (!matches!(marker, 0xC3 | 0xC7 | 0xCB | 0xCF | 0xF7) && bits > 8).then_some(bits)
    })
}

/// Width and height from the first SOF segment of a JPEG stream starting at SOI.
fn jpeg_frame_size(b: &[u8]) -> Option<(u32, u32)> {
    let (_, pos) = jpeg_sof(b)?;
    let h = u16::from_be_bytes([*b.get(pos + 3)?, *b.get(pos + 4)?]);
    let w = u16::from_be_bytes([*b.get(pos + 5)?, *b.get(pos + 6)?]);
    Some((u32::from(w), u32::from(h)))
}

/// What a JPEG 2000 codestream's SIZ segment declares.
struct J2kSize {
    width: u64,
    height: u64,
    components: u16,
    tiles: u64,
    /// Every component's subsampling factors are at least 1.
    sampling_ok: bool,
}

/// The SIZ segment of the JPEG 2000 codestream `b` starts with (SOC, then SIZ, as DICOM stores
/// a frame), or of the one in the JP2 file it starts with (which some encoders write).
fn j2k_size(b: &[u8]) -> Option<J2kSize> {
    const SOC_SIZ: [u8; 4] = [0xFF, 0x4F, 0xFF, 0x51];
    const JP2: [u8; 8] = [0, 0, 0, 0x0C, 0x6A, 0x50, 0x20, 0x20];
    // Not anywhere else: compressed data may hold these bytes too.
    let at = if b.starts_with(&SOC_SIZ) {
        2
    } else if b.starts_with(&JP2) {
        b.windows(4).take(1 << 16).position(|w| w == SOC_SIZ)? + 2
    } else {
        return None;
    };
    let u16_at = |o: usize| Some(u16::from_be_bytes(b.get(at + o..at + o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u64::from(u32::from_be_bytes(b.get(at + o..at + o + 4)?.try_into().ok()?)));
    let (x, y, x0, y0) = (u32_at(6)?, u32_at(10)?, u32_at(14)?, u32_at(18)?);
    let (tw, th, tx0, ty0) = (u32_at(22)?, u32_at(26)?, u32_at(30)?, u32_at(34)?);
    let components = u16_at(38)?;
    let mut sampling_ok = true;
    for c in 0..usize::from(components.min(16)) {
        let (dx, dy) = (*b.get(at + 41 + 3 * c)?, *b.get(at + 42 + 3 * c)?);
        sampling_ok &= dx >= 1 && dy >= 1;
    }
    if x <= x0 || y <= y0 || tw == 0 || th == 0 || tx0 > x0 || ty0 > y0 {
        return Some(J2kSize { width: 0, height: 0, components, tiles: 0, sampling_ok: false });
    }
    let tiles = (x - tx0).div_ceil(tw) * (y - ty0).div_ceil(th);
    Some(J2kSize { width: x - x0, height: y - y0, components, tiles, sampling_ok })
}

/// The most tiles a JPEG 2000 codestream may declare. Why: the codec sets up every tile's
/// coding parameters before it decodes any (a few KiB each), so a tiny codestream declaring
/// 1×1-pixel tiles over a large image would cost gigabytes; real files use one tile, or tiles
/// of hundreds of pixels (a 16384² image in 256² tiles has 4096).
const MAX_J2K_TILES: u64 = 4096;

/// Rejects encapsulated frames whose codec header declares more than the data set does: a
/// JPEG, JPEG-LS or JPEG 2000 image larger than Rows × Columns (the codec would allocate for it, then
/// fail or overrun), a JPEG 2000 codestream with more than 4 components, more than
/// [`MAX_J2K_TILES`] tiles, or a zero size or subsampling, or JPEG 2000 data (`j2k`: its
/// transfer syntax) without a codestream.
pub(crate) fn check_fragments(fragments: &[Vec<u8>], rows: u32, cols: u32, j2k: bool) -> Result<(), ImagingError> {
    // The fragments joined, made only for a JPEG header that runs past its fragment's end
    // (each frame's header is read from its own fragment otherwise: joining them all copied a
    // multi-frame file's whole pixel data on every decode).
    let mut all: Option<Vec<u8>> = None;
    let mut start = 0;
    for f in fragments {
        if f.starts_with(&[0xFF, 0xD8]) {
            let size = jpeg_frame_size(f)
                .or_else(|| jpeg_frame_size(&all.get_or_insert_with(|| fragments.concat())[start..]));
            if let Some((w, h)) = size {
                if w > cols || h > rows {
                    return Err(bad(&format!(
                        "the embedded JPEG is {w}×{h} pixels but Rows/Columns say {cols}×{rows}"
                    )));
                }
            }
        }
        start += f.len();
    }
    if !j2k {
        return Ok(());
    }
    // Every frame's codestream starts a fragment, its SIZ segment (a few dozen bytes) with it.
    let mut found = false;
    for f in fragments {
        let Some(siz) = j2k_size(f) else { continue };
        found = true;
        let (w, h) = (siz.width, siz.height);
        if w > u64::from(cols) || h > u64::from(rows) {
            return Err(bad(&format!(
                "the embedded JPEG 2000 image is {w}×{h} pixels but Rows/Columns say {cols}×{rows}"
            )));
        }
        if w == 0 || h == 0 || !siz.sampling_ok {
            return Err(bad("the embedded JPEG 2000 codestream declares an empty image or a zero subsampling"));
        }
        if !(1..=4).contains(&siz.components) {
            return Err(bad(&format!("the embedded JPEG 2000 codestream has {} components (1 to 4 allowed)", siz.components)));
        }
        if siz.tiles > MAX_J2K_TILES {
            return Err(bad(&format!(
                "the embedded JPEG 2000 codestream is cut into {} tiles (at most {MAX_J2K_TILES} allowed)",
                siz.tiles
            )));
        }
    }
    if !found {
        return Err(bad("the pixel data holds no JPEG 2000 codestream"));
    }
    Ok(())
}

/// Rejects RLE Lossless frames (one fragment each) that do not hold `segments` segments
/// (samples per pixel × bytes per sample) each decoding to at least `rows` × `cols` bytes,
/// or whose header or runs point past the fragment. Why: dicom-rs's RLE decoder indexes and
/// unwraps without checking, and panics on such data (the panic is caught, but it is a bug's
/// path, and it was reached by a single changed byte in most damaged files tried).
pub(crate) fn check_rle_fragments(fragments: &[Vec<u8>], rows: u32, cols: u32, segments: usize) -> Result<(), ImagingError> {
    let need = u64::from(rows) * u64::from(cols);
    for f in fragments {
        let word = |i: usize| f.get(4 * i..4 * i + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let count = word(0).ok_or_else(|| bad("an RLE frame is shorter than its 64-byte header"))?;
        if f.len() < 64 || count < segments || count > 15 {
            return Err(bad(&format!(
                "an RLE frame has {count} segments where the image needs {segments} (1 to 15 allowed)"
            )));
        }
        let mut offsets: Vec<usize> = (1..=count).filter_map(word).collect();
        offsets.push(f.len());
        if offsets[0] < 64 || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("an RLE frame's segment offsets are out of order or past its end"));
        }
        for w in offsets.windows(2).take(segments) {
            if packbits_len(&f[w[0]..w[1]], need) < need {
                return Err(bad("an RLE segment decodes to fewer bytes than Rows × Columns, or a run in it is cut short"));
            }
        }
    }
    Ok(())
}

/// Bytes a PackBits segment decodes to, counted up to `enough` and only over runs whose bytes
/// are all there (a run cut short ends the count).
fn packbits_len(seg: &[u8], enough: u64) -> u64 {
    let (mut out, mut i) = (0u64, 0usize);
    while out < enough && i < seg.len() {
        let n = seg[i] as i8;
        i += 1;
        match n {
            0..=127 => {
                let len = n as usize + 1;
                if i + len > seg.len() {
                    return out;
                }
                i += len;
                out += len as u64;
            }
            -128 => {}
            _ => {
                if i >= seg.len() {
                    return out;
                }
                i += 1;
                out += (1 - i64::from(n)) as u64;
            }
        }
    }
    out
}

/// The fragments with the quantization-table selectors of their lossless JPEG frames (SOF3,
/// SOF7, SOF11, SOF15) set to 0, or `None` when none names another table. Why: lossless JPEG
/// has no quantization, and the standard says the selector shall be 0, but the IJG-based
/// encoders that GDCM and DCMTK use write 1 for a colour image's second and third
/// components, which `jpeg-decoder` refuses ("invalid quantization table index 1").
pub(crate) fn lossless_jpeg_tables_cleared(fragments: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
    let mut out: Option<Vec<Vec<u8>>> = None;
    for (i, f) in fragments.iter().enumerate() {
        let Some((marker, pos)) = jpeg_sof(f) else { continue };
        if !matches!(marker, 0xC3 | 0xC7 | 0xCB | 0xCF) {
            continue;
        }
        let Some(&n) = f.get(pos + 7) else { continue };
        let selectors: Vec<usize> = (0..usize::from(n)).map(|c| pos + 8 + 3 * c + 2).filter(|&at| at < f.len()).collect();
        if selectors.iter().all(|&at| f[at] == 0) {
            continue;
        }
        let frags = out.get_or_insert_with(|| fragments.to_vec());
        for at in selectors {
            frags[i][at] = 0;
        }
    }
    out
}

/// An Adobe APP14 segment saying "no colour transform" (transform flag 0).
const APP14_NO_TRANSFORM: [u8; 16] = [0xFF, 0xEE, 0, 14, b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 0];

/// The fragments of a lossy JPEG image whose data set says RGB, with an Adobe APP14 segment
/// saying "no colour transform" inserted after SOI where the stream says nothing of its colour
/// (no JFIF or Adobe segment, component ids other than 1, 2, 3), and the offset table moved to
/// match; `None` when no fragment needs it. Why: DICOM's RGB means the JPEG was compressed
/// without a colour transform, but `jpeg-decoder`, told nothing, takes three components for
/// YCbCr (a whole-slide tile came out with colours up to 137 off).
pub(crate) fn rgb_jpeg_marked(fragments: &[Vec<u8>], table: &[u32]) -> Option<(Vec<u32>, Vec<Vec<u8>>)> {
    let mut out: Option<(Vec<u32>, Vec<Vec<u8>>)> = None;
    let mut at = 0u64; // where fragment i's item starts, from the first fragment's
    for (i, f) in fragments.iter().enumerate() {
        let start = at;
        at += 8 + f.len() as u64;
        let Some(h) = jpeg_header(f) else { continue };
        let (marker, pos) = h.sof;
        let ids: Vec<u8> = (0..3).filter_map(|c| f.get(pos + 8 + 3 * c).copied()).collect();
        let three = f.get(pos + 7) == Some(&3);
        if h.jfif || h.adobe || !three || ids == [1, 2, 3] || !matches!(marker, 0xC0 | 0xC1) {
            continue;
        }
        let (t, frags) = out.get_or_insert_with(|| (table.to_vec(), fragments.to_vec()));
        frags[i].splice(2..2, APP14_NO_TRANSFORM);
        for e in t.iter_mut() {
            if u64::from(*e) > start {
                *e += APP14_NO_TRANSFORM.len() as u32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG frame header is read from its own fragment, or across the next ones when it runs
    /// past its fragment's end.
    #[test]
    fn jpeg_headers_are_read_within_and_across_fragments() {
        // SOI, then an SOF0 of 60000×60000 with one component.
        let jpeg = [0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0xEA, 0x60, 0xEA, 0x60, 1, 1, 0x11, 0].to_vec();
        let whole = check_fragments(std::slice::from_ref(&jpeg), 512, 512, false).unwrap_err();
        let split = check_fragments(&[jpeg[..6].to_vec(), jpeg[6..].to_vec()], 512, 512, false).unwrap_err();
        for e in [whole, split] {
            assert!(e.to_string().contains("60000×60000 pixels but Rows/Columns say 512×512"), "{e}");
        }
        assert!(check_fragments(&[jpeg[..6].to_vec(), jpeg[6..].to_vec()], 60000, 60000, false).is_ok());
    }

    /// `DICM`, a file meta of explicit VR little endian, then `data`.
    fn explicit_le(data: &[u8]) -> Vec<u8> {
        let mut b = b"DICM\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\0".to_vec();
        b.extend_from_slice(data);
        b
    }

    /// Where dicom-parser would read out of step or take a length for an element's, the walk
    /// refuses by name: a fixed-width value of a length that is not a multiple of its size, a
    /// delimiter with a length, a tag of group FFFE that is neither an item nor a delimiter.
    /// What is well formed passes.
    #[test]
    fn elements_the_parser_would_misread_are_refused() {
        // (0028,0103) US 2 bytes; a sequence (0008,1115) of undefined length holding one item
        // of undefined length with (0008,1150) UI, then the item and sequence delimiters.
        let good: Vec<u8> = [
            &b"\x28\x00\x03\x01US\x02\x00\x00\x00"[..],
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff",
            b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
            b"\x08\x00\x50\x11UI\x02\x001\0",
            b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",
            b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
        ]
        .concat();
        assert_eq!(check_element_lengths(&explicit_le(&good)), Ok(()));
        let cases: [(&[u8], &[u8], &str); 5] = [
            (b"\x28\x00\x03\x01US", b"\x28\x00\x03\x01SL", "element (0028,0103) of VR SL has a length of 2 bytes, not a multiple of 4"),
            (b"US\x02\x00\x00\x00", b"US\x03\x00\x00\x00", "VR US has a length of 3 bytes, not a multiple of 2"),
            (b"\x0d\xe0\x00\x00\x00\x00", b"\x0d\xe0\x00\x00\x00\xe0", "the delimiter (FFFE,E00D) has a length of 3758096384 bytes, not 0"),
            (b"\xdd\xe0\x00\x00\x00\x00", b"\xdd\xe0\x04\x00\x00\x00", "the delimiter (FFFE,E0DD) has a length of 4 bytes, not 0"),
            (b"\x0d\xe0\x00\x00\x00\x00", b"\x0d\x00\x00\x00\x00\xe0", "the tag (FFFE,000D) is not an item or a delimiter"),
        ];
        for (from, to, says) in cases {
            let at = good.windows(from.len()).position(|w| w == from).unwrap();
            let mut bad = good.clone();
            bad[at..at + to.len()].copy_from_slice(to);
            let e = check_element_lengths(&explicit_le(&bad)).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
