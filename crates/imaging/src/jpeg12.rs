//! 12-bit lossy JPEG (ISO 10918-1 sequential DCT, Huffman coded: DICOM's JPEG Extended,
//! process 4), greyscale.
//!
//! Why our own: `jpeg-decoder` (dicom-pixeldata's lossy JPEG codec) reads 8-bit samples only,
//! and older CT and MR archives hold many images compressed this way. The decoder is small
//! because DICOM's use is narrow: one component, one sequential scan, Huffman tables, optional
//! restart intervals. Everything else (colour, progressive, arithmetic coding, hierarchical)
//! is refused by name. Every length and index is checked: it reads untrusted bytes.

use crate::{Format, ImagingError};

fn malformed(reason: &str) -> ImagingError {
    ImagingError::Malformed { format: Format::Dicom, reason: format!("12-bit JPEG: {reason}") }
}

fn unsupported(reason: &str) -> ImagingError {
    ImagingError::Unsupported { format: Format::Dicom, reason: format!("12-bit lossy JPEG {reason}") }
}

/// Position in the block of each coefficient in the order the stream sends them.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// A Huffman table as ISO 10918-1 F.2.2.3 decodes it: per code length, the largest code and
/// where that length's symbols start.
#[derive(Clone)]
struct Huffman {
    /// Largest code of each length 1..=16 (-1 when there is none).
    max_code: [i32; 17],
    /// Index in `symbols` of the first code of each length, minus that code.
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], symbols: Vec<u8>) -> Result<Huffman, ImagingError> {
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let (mut code, mut k) = (0i32, 0i32);
        for len in 1..=16 {
            let n = i32::from(counts[len - 1]);
            if n > 0 {
                offset[len] = k - code;
                code += n;
                k += n;
                max_code[len] = code - 1;
                if code > 1 << len {
                    return Err(malformed("a Huffman table has more codes than its lengths allow"));
                }
            }
            code <<= 1;
        }
        Ok(Huffman { max_code, offset, symbols })
    }
}

/// The entropy-coded bytes of a scan, read bit by bit: stuffed zero bytes skipped, and a marker
/// ending the data (past it, zero bits; too many of them is a truncated scan).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u32,
    count: u32,
    /// The marker that ended the data, when one was reached.
    marker: Option<u8>,
    /// Zero bits made up after the data ended.
    padding: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Bits<'a> {
        Bits { data, pos, acc: 0, count: 0, marker: None, padding: 0 }
    }

    fn fill(&mut self) {
        while self.count <= 24 {
            let byte = if self.marker.is_some() || self.pos >= self.data.len() {
                self.padding += 8;
                0
            } else {
                let b = self.data[self.pos];
                if b == 0xFF {
                    match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            self.pos += 2;
                            0xFF
                        }
                        Some(0xFF) => {
                            // Fill bytes before a marker.
                            self.pos += 1;
                            continue;
                        }
                        Some(&m) => {
                            self.marker = Some(m);
                            self.padding += 8;
                            0
                        }
                        None => {
                            self.pos += 1;
                            self.padding += 8;
                            0
                        }
                    }
                } else {
                    self.pos += 1;
                    b
                }
            };
            self.acc |= u32::from(byte) << (24 - self.count);
            self.count += 8;
        }
    }

    fn bits(&mut self, n: u32) -> Result<u32, ImagingError> {
        if n == 0 {
            return Ok(0);
        }
        self.fill();
        // Up to two bytes of padding are a scan's last code's; more means the data is cut.
        if self.padding > 16 + 32 {
            return Err(malformed("the compressed data ends before the image does"));
        }
        let v = self.acc >> (32 - n);
        self.acc <<= n;
        self.count -= n;
        Ok(v)
    }

    fn decode(&mut self, table: &Huffman) -> Result<u8, ImagingError> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | self.bits(1)? as i32;
            if code <= table.max_code[len] {
                let i = (code + table.offset[len]) as usize;
                return table.symbols.get(i).copied().ok_or_else(|| malformed("a Huffman code names no symbol"));
            }
        }
        Err(malformed("a Huffman code is not in its table"))
    }

    /// An `s`-bit magnitude category's value (ISO 10918-1 F.2.2.1, EXTEND).
    fn receive_extend(&mut self, s: u8) -> Result<i32, ImagingError> {
        if s == 0 {
            return Ok(0);
        }
        if s > 16 {
            return Err(malformed("a coefficient's size category is over 16 bits"));
        }
        let v = self.bits(u32::from(s))? as i32;
        Ok(if v < 1 << (s - 1) { v - (1 << s) + 1 } else { v })
    }

    /// Moves past the restart marker expected next. The bits left of the interval's last byte
    /// are padding; the data reader never reads past a marker, so `pos` is at it (or, for data
    /// with junk before it, before it: skipped).
    fn restart(&mut self, expected: u8) -> Result<(), ImagingError> {
        self.acc = 0;
        self.count = 0;
        self.padding = 0;
        self.marker = None;
        while self.pos + 1 < self.data.len() && !(self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1])) {
            self.pos += 1;
        }
        match self.data.get(self.pos + 1) {
            Some(&m) if m == 0xD0 + expected => {
                self.pos += 2;
                Ok(())
            }
            _ => Err(malformed("a restart marker is missing or out of order")),
        }
    }
}

/// 8×8 inverse DCT basis: `BASIS[x][u]` = C(u)/2 · cos((2x+1)uπ/16).
fn basis() -> [[f32; 8]; 8] {
    let mut b = [[0f32; 8]; 8];
    for (x, row) in b.iter_mut().enumerate() {
        for (u, v) in row.iter_mut().enumerate() {
            let c = if u == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
            *v = (c / 2.0 * ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos()) as f32;
        }
    }
    b
}

/// Decodes one 12-bit greyscale lossy JPEG frame of `width` × `height` into samples of 0..4095,
/// row after row.
pub(crate) fn decode(data: &[u8], width: u32, height: u32) -> Result<Vec<u16>, ImagingError> {
    if data.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(malformed("the frame does not start with a JPEG start-of-image marker"));
    }
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac: [Option<Huffman>; 4] = [None, None, None, None];
    let mut frame: Option<(u32, u32, usize)> = None; // width, height, quantization table
    let mut restart_interval = 0usize;
    let mut pos = 2usize;
    loop {
        // The next marker, after any fill bytes.
        while data.get(pos) == Some(&0xFF) && data.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (data.get(pos), data.get(pos + 1)) else {
            return Err(malformed("a marker segment is missing where one must be"));
        };
        pos += 2;
        if marker == 0xD9 {
            return Err(malformed("the image ends before its scan"));
        }
        let len = match data.get(pos..pos + 2) {
            Some(l) => usize::from(u16::from_be_bytes([l[0], l[1]])),
            None => return Err(malformed("a marker segment is cut")),
        };
        let seg = data.get(pos + 2..pos + len).filter(|_| len >= 2).ok_or_else(|| malformed("a marker segment is cut"))?;
        pos += len;
        match marker {
            0xC0 | 0xC1 => {
                let [p, h1, h0, w1, w0, n, ..] = *seg else { return Err(malformed("a short frame header")) };
                if p != 12 {
                    return Err(unsupported(&format!("with {p}-bit samples is not decoded by this codec")));
                }
                if n != 1 {
                    return Err(unsupported(&format!("with {n} components is not supported (greyscale only)")));
                }
                let (w, h) = (u32::from(u16::from_be_bytes([w1, w0])), u32::from(u16::from_be_bytes([h1, h0])));
                if (w, h) != (width, height) {
                    return Err(malformed("the frame's size differs from Rows/Columns"));
                }
                let tq = usize::from(*seg.get(8).ok_or_else(|| malformed("a short frame header"))?);
                if tq > 3 {
                    return Err(malformed("a frame names a quantization table beyond 3"));
                }
                frame = Some((w, h, tq));
            }
            0xC2 | 0xC6 | 0xCA | 0xCE => return Err(unsupported("in progressive mode is not supported")),
            0xC3 | 0xC5 | 0xC7 | 0xC9..=0xCB | 0xCD | 0xCF => {
                return Err(unsupported("with arithmetic coding or hierarchical or lossless modes is not supported"))
            }
            0xC4 => {
                let mut s = seg;
                while !s.is_empty() {
                    let class_id = s[0];
                    let counts: [u8; 16] = s.get(1..17).and_then(|c| c.try_into().ok()).ok_or_else(|| malformed("a Huffman table is cut"))?;
                    let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let symbols = s.get(17..17 + n).ok_or_else(|| malformed("a Huffman table is cut"))?.to_vec();
                    let (class, id) = (class_id >> 4, usize::from(class_id & 15));
                    if class > 1 || id > 3 {
                        return Err(malformed("a Huffman table of an unknown class or number"));
                    }
                    let table = Huffman::new(&counts, symbols)?;
                    if class == 0 { dc[id] = Some(table) } else { ac[id] = Some(table) }
                    s = &s[17 + n..];
                }
            }
            0xDB => {
                let mut s = seg;
                while !s.is_empty() {
                    let (precision, id) = (s[0] >> 4, usize::from(s[0] & 15));
                    let size = if precision == 0 { 64 } else { 128 };
                    let values = s.get(1..1 + size).ok_or_else(|| malformed("a quantization table is cut"))?;
                    if id > 3 || precision > 1 {
                        return Err(malformed("a quantization table of an unknown precision or number"));
                    }
                    let mut q = [0u16; 64];
                    for (k, v) in q.iter_mut().enumerate() {
                        *v = if precision == 0 { u16::from(values[k]) } else { u16::from_be_bytes([values[2 * k], values[2 * k + 1]]) };
                    }
                    quant[id] = Some(q);
                    s = &s[1 + size..];
                }
            }
            0xDD => {
                let [r1, r0, ..] = *seg else { return Err(malformed("a short restart interval")) };
                restart_interval = usize::from(u16::from_be_bytes([r1, r0]));
            }
            0xDA => {
                let (w, h, tq) = frame.ok_or_else(|| malformed("a scan comes before its frame header"))?;
                let [ns, _, tables, ..] = *seg else { return Err(malformed("a short scan header")) };
                if ns != 1 {
                    return Err(malformed("a scan of a one-component image names several components"));
                }
                // Spectral selection and successive approximation do not apply to sequential
                // scans; some encoders write zeros there, which decoders ignore too.
                let q = quant[tq].ok_or_else(|| malformed("the quantization table the frame names is missing"))?;
                let dc = dc[usize::from(tables >> 4) & 3].clone().ok_or_else(|| malformed("the scan's DC Huffman table is missing"))?;
                let ac = ac[usize::from(tables & 15) & 3].clone().ok_or_else(|| malformed("the scan's AC Huffman table is missing"))?;
                return decode_scan(data, pos, (w, h), &q, (&dc, &ac), restart_interval);
            }
            // APPn, COM, DNL and the others: nothing this decoder needs.
            _ => {}
        }
    }
}

fn decode_scan(
    data: &[u8],
    pos: usize,
    (width, height): (u32, u32),
    q: &[u16; 64],
    (dc, ac): (&Huffman, &Huffman),
    restart_interval: usize,
) -> Result<Vec<u16>, ImagingError> {
    let (bw, bh) = (width.div_ceil(8) as usize, height.div_ceil(8) as usize);
    let (w, h) = (width as usize, height as usize);
    let mut out = vec![0u16; w * h];
    let basis = basis();
    let mut bits = Bits::new(data, pos);
    // i64 and f32 from here: hostile data must not overflow (its image is garbage, not a panic).
    let mut prediction = 0i64;
    let mut restarts = 0u8;
    for block in 0..bw * bh {
        if restart_interval > 0 && block > 0 && block % restart_interval == 0 {
            bits.restart(restarts)?;
            restarts = (restarts + 1) % 8;
            prediction = 0;
        }
        let mut coef = [0f32; 64];
        let s = bits.decode(dc)?;
        prediction = prediction.saturating_add(i64::from(bits.receive_extend(s)?));
        coef[0] = prediction as f32 * f32::from(q[0]);
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(ac)?;
            let (r, s) = (usize::from(rs >> 4), rs & 15);
            if s == 0 {
                if r != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += r;
            if k > 63 {
                return Err(malformed("a block has more than 64 coefficients"));
            }
            coef[ZIGZAG[k]] = bits.receive_extend(s)? as f32 * f32::from(q[k]);
            k += 1;
        }
        // Rows, then columns, of the separable inverse DCT.
        let mut tmp = [0f32; 64];
        for v in 0..8 {
            for x in 0..8 {
                tmp[v * 8 + x] = (0..8).map(|u| basis[x][u] * coef[v * 8 + u]).sum();
            }
        }
        let (bx, by) = (block % bw * 8, block / bw * 8);
        for y in 0..8 {
            if by + y >= h {
                break;
            }
            for x in 0..8 {
                if bx + x >= w {
                    break;
                }
                let value: f32 = (0..8).map(|v| basis[y][v] * tmp[v * 8 + x]).sum();
                out[(by + y) * w + bx + x] = (value.round() + 2048.0).clamp(0.0, 4095.0) as u16;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basis_inverts_the_forward_dct() {
        // A constant block: only its DC coefficient, 8 × the value, comes back as the value.
        let b = basis();
        let dc = 8.0 * 100.0;
        for x in 0..8 {
            for y in 0..8 {
                let v = b[x][0] * b[y][0] * dc;
                assert!((v - 100.0).abs() < 1e-3, "{v}");
            }
        }
    }

    #[test]
    fn extend_gives_negative_and_positive_values() {
        // Category 3: 000..011 are -7..-4, 100..111 are 4..7.
        let data = [0b0001_1100, 0x00];
        let mut bits = Bits::new(&data, 0);
        assert_eq!(bits.receive_extend(3).unwrap(), -7);
        assert_eq!(bits.receive_extend(3).unwrap(), 7);
    }

    /// A 16×8 image of two DC-only blocks, a restart marker between them: each block's DC
    /// difference is +10 (× its quantizer 8 = 80: the value 10 over the whole block, 2058),
    /// so the second comes out right only if the restart reset the DC prediction; each block's
    /// 9 bits are padded with ones to the byte, as encoders do before a marker.
    fn restarted(second_marker: &[u8]) -> Vec<u8> {
        let mut f = vec![0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x43, 0x00];
        f.extend([8u8; 64]);
        f.extend([0xFF, 0xC1, 0x00, 0x0B, 12, 0, 8, 0, 16, 1, 1, 0x11, 0]);
        let mut dc_counts = [0u8; 16];
        dc_counts[2] = 2; // "000" → category 0, "001" → category 4
        let mut ac_counts = [0u8; 16];
        ac_counts[1] = 1; // "00" → end of block
        f.extend([0xFF, 0xC4, 0x00, 0x27, 0x00]);
        f.extend(dc_counts);
        f.extend([0, 4, 0x10]);
        f.extend(ac_counts);
        f.extend([0x00]);
        f.extend([0xFF, 0xDD, 0x00, 0x04, 0x00, 0x01]);
        f.extend([0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0]);
        // "001" "1010" "00", then seven padding ones.
        f.extend([0b0011_0100, 0b0111_1111]);
        f.extend(second_marker);
        f.extend([0b0011_0100, 0b0111_1111, 0xFF, 0xD9]);
        f
    }

    #[test]
    fn restart_markers_reset_the_prediction() {
        assert_eq!(decode(&restarted(&[0xFF, 0xD0]), 16, 8).unwrap(), vec![2058; 128]);
        let e = decode(&restarted(&[0xFF, 0xD3]), 16, 8).unwrap_err().to_string();
        assert!(e.contains("restart marker"), "{e}");
        let e = decode(&restarted(&[]), 16, 8).unwrap_err().to_string();
        assert!(e.contains("restart marker"), "{e}");
    }

    #[test]
    fn refuses_what_it_does_not_decode() {
        let frame = |precision: u8, components: u8| {
            let mut f = vec![0xFF, 0xD8, 0xFF, 0xC1, 0, 8 + 3 * components, precision, 0, 8, 0, 8, components];
            for c in 0..components {
                f.extend([c + 1, 0x11, 0]);
            }
            f
        };
        let e = decode(&frame(12, 3), 8, 8).unwrap_err().to_string();
        assert!(e.contains("3 components"), "{e}");
        let e = decode(&frame(8, 1), 8, 8).unwrap_err().to_string();
        assert!(e.contains("8-bit"), "{e}");
        let e = decode(&frame(12, 1), 16, 8).unwrap_err().to_string();
        assert!(e.contains("size"), "{e}");
        let e = decode(&frame(12, 1), 8, 8).unwrap_err().to_string();
        assert!(e.contains("marker segment"), "{e}");
        assert!(decode(b"\xFF\xD8\xFF\xC2\x00\x02", 8, 8).unwrap_err().to_string().contains("progressive"));
        assert!(decode(b"not a jpeg", 8, 8).is_err());
    }
}
