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

/// Checks that every declared element and item length fits in the bytes that
/// follow it. `body` starts at the `DICM` magic. Truncated headers are left for
/// the parser to report.
pub(crate) fn check_element_lengths(body: &[u8]) -> Result<(), ImagingError> {
    let meta = Cursor {
        b: body,
        big: false,
    };
    let mut pos = 4;
    let mut ts: &[u8] = b"";
    // File meta group: always explicit VR little endian.
    while meta.u16(pos) == Some(0x0002) {
        let Some((_, len, hdr)) = explicit_header(&meta, pos) else {
            return Ok(());
        };
        let start = pos + hdr;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| len != UNDEFINED && e <= body.len());
        let Some(end) = end else {
            return Err(bad("a file meta element is longer than the file"));
        };
        if meta.u16(pos + 2) == Some(0x0010) {
            ts = &body[start..end];
        }
        pos = end;
    }
    let ts = std::str::from_utf8(ts)
        .unwrap_or("")
        .trim_end_matches(['\0', ' ']);
    let (explicit, big) = match ts {
        "1.2.840.10008.1.2" => (false, false),
        "1.2.840.10008.1.2.2" => (true, true),
        // Deflated data cannot be checked without inflating it; the deflate codec
        // is not enabled, so dicom-object rejects it before reading any element.
        "1.2.840.10008.1.2.1.99" => return Ok(()),
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
                0xE0DD => {
                    in_pixel_sequence = false;
                    pos += 8;
                }
                _ => pos += 8,
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
        pos += hdr + if vr == VR::SQ { 0 } else { len as usize };
    }
    Ok(())
}

/// Width and height from the first SOF segment of a JPEG stream starting at SOI.
fn jpeg_frame_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.get(0..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut pos = 2;
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
        let len = usize::from(u16::from_be_bytes([*b.get(pos)?, *b.get(pos + 1)?]));
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let h = u16::from_be_bytes([*b.get(pos + 3)?, *b.get(pos + 4)?]);
            let w = u16::from_be_bytes([*b.get(pos + 5)?, *b.get(pos + 6)?]);
            return Some((u32::from(w), u32::from(h)));
        }
        pos += len;
    }
}

/// Rejects encapsulated JPEG streams whose frame header is larger than
/// Rows × Columns (the codec would allocate, then fail or overrun).
pub(crate) fn check_jpeg_fragments(
    fragments: &[Vec<u8>],
    rows: u32,
    cols: u32,
) -> Result<(), ImagingError> {
    let all: Vec<u8> = fragments.concat();
    let mut start = 0;
    for f in fragments {
        if f.starts_with(&[0xFF, 0xD8]) {
            if let Some((w, h)) = jpeg_frame_size(&all[start..]) {
                if w > cols || h > rows {
                    return Err(bad(&format!(
                        "the embedded JPEG is {w}×{h} pixels but Rows/Columns say {cols}×{rows}"
                    )));
                }
            }
        }
        start += f.len();
    }
    Ok(())
}
