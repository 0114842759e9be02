//! Label maps and binary masks: PNG output, mask input, nearest-neighbour resizing.

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::{decode, DecodeOptions, ImagingError, LabelMap};

/// Encodes a label map as a greyscale PNG: 8-bit when every label is below 256
/// (the common case, and what most viewers show best), 16-bit otherwise.
///
/// Never fails: `data` shorter than `width × height` is padded with label 0 and
/// extra values are ignored; a map with a zero side encodes as an empty `Vec`,
/// since PNG cannot represent it.
pub fn encode_labels_png(labels: &LabelMap) -> Vec<u8> {
    let px = labels.width as usize * labels.height as usize;
    let value = |i: usize| labels.data.get(i).copied().unwrap_or(0);
    if (0..px).all(|i| value(i) < 256) {
        let buf: Vec<u8> = (0..px).map(|i| value(i) as u8).collect();
        encode_png(labels.width, labels.height, &buf, ExtendedColorType::L8)
    } else {
        let grey: Vec<u16> = (0..px).map(value).collect();
        encode_grey_png16(labels.width, labels.height, &grey)
    }
}

/// Encodes a 16-bit greyscale PNG (row-major values). Same padding rules as
/// [`encode_labels_png`]. Useful for writing label maps with many labels and for
/// building 16-bit test images.
pub fn encode_grey_png16(width: u32, height: u32, values: &[u16]) -> Vec<u8> {
    let px = width as usize * height as usize;
    // PngEncoder takes native-endian 16-bit samples and swaps to big endian itself.
    let buf: Vec<u8> = (0..px)
        .flat_map(|i| values.get(i).copied().unwrap_or(0).to_ne_bytes())
        .collect();
    encode_png(width, height, &buf, ExtendedColorType::L16)
}

/// Encodes a binary mask as an 8-bit greyscale PNG with 0 for background and 255
/// for foreground, the convention of the ground-truth masks. Same padding rules as
/// [`encode_labels_png`] (missing pixels are background).
pub fn encode_mask_png(width: u32, height: u32, mask: &[bool]) -> Vec<u8> {
    let px = width as usize * height as usize;
    let buf: Vec<u8> = (0..px)
        .map(|i| {
            if mask.get(i).copied().unwrap_or(false) {
                255
            } else {
                0
            }
        })
        .collect();
    encode_png(width, height, &buf, ExtendedColorType::L8)
}

fn encode_png(width: u32, height: u32, buf: &[u8], colour: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    if width == 0 || height == 0 {
        return out;
    }
    match PngEncoder::new(&mut out).write_image(buf, width, height, colour) {
        Ok(()) => out,
        // Only reachable for dimensions PNG cannot hold; documented as empty output.
        Err(_) => Vec::new(),
    }
}

/// Decodes a mask from any supported image, returning `(width, height, mask)` with
/// the mask row-major.
///
/// A pixel is foreground when its grey value (mean of the channels for colour
/// images) is greater than half the image's maximum value. Using the image's own
/// maximum rather than the type's makes 0/1 masks work as well as 0/255 and
/// 0/65535 ones; an all-zero image is all background.
pub fn decode_mask(bytes: &[u8]) -> Result<(u32, u32, Vec<bool>), ImagingError> {
    let d = decode(bytes, &DecodeOptions::default())?;
    let px = d.width as usize * d.height as usize;
    let c = usize::from(d.channels.max(1));
    let grey: Vec<f32> = (0..px)
        .map(|i| {
            (0..c)
                .map(|k| d.samples.get(k * px + i).copied().unwrap_or(0.0))
                .sum::<f32>()
                / c as f32
        })
        .collect();
    let max = grey
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let threshold = max / 2.0;
    let mask = grey.iter().map(|&v| max > 0.0 && v > threshold).collect();
    Ok((d.width, d.height, mask))
}

/// Resizes a row-major mask with nearest-neighbour sampling, using exactly the
/// index mapping of PyTorch's `F.interpolate(mode="nearest")`, so that masks
/// resized here line up pixel for pixel with tensors resized by the model:
/// `src = min(floor(dst × (in / out)), in − 1)`, with the scale computed in `f32`
/// as PyTorch does (and its shortcuts for equal size and exact 2× upscaling).
///
/// Out-of-range reads (a `mask` shorter than `w × h`, or `w`/`h` of 0) count as
/// background.
pub fn resize_mask_nearest(w: u32, h: u32, mask: &[bool], nw: u32, nh: u32) -> Vec<bool> {
    let xs: Vec<usize> = (0..nw).map(|x| nearest_index(x, w, nw)).collect();
    let mut out = Vec::with_capacity(nw as usize * nh as usize);
    for y in 0..nh {
        let sy = nearest_index(y, h, nh);
        for &sx in &xs {
            let inside = (sx as u32) < w && (sy as u32) < h;
            out.push(inside && mask.get(sy * w as usize + sx).copied().unwrap_or(false));
        }
    }
    out
}

/// Binary dilation of a row-major `w × h` mask with a `k × k` square (k odd), zero outside
/// the image: a pixel is set when any pixel within k / 2 of it in both directions is. Two
/// separable passes of a sliding count, so the cost does not grow with k (the foreground rule
/// runs it on full-resolution masks, the evaluation on ground truths). The vertical pass keeps
/// one count per column and walks the rows in order: walked column by column, every read was
/// a row apart, and on a 10000² mask that pass alone took a fifth of `s3net segment`'s time.
pub fn dilate_square(mask: &[bool], w: usize, h: usize, k: usize) -> Vec<bool> {
    assert_eq!(mask.len(), w * h, "mask is not w × h");
    let r = k / 2;
    // Along each row.
    let mut rows = vec![false; w * h];
    for (src, out) in mask.chunks_exact(w.max(1)).zip(rows.chunks_exact_mut(w.max(1))) {
        let mut count: usize = src[..w.min(r + 1)].iter().map(|&v| v as usize).sum();
        for i in 0..w {
            out[i] = count > 0;
            if i + r + 1 < w {
                count += src[i + r + 1] as usize;
            }
            if i >= r {
                count -= src[i - r] as usize;
            }
        }
    }
    // Down each column, all columns at once, a row at a time.
    let mut out = vec![false; w * h];
    let mut count = vec![0u32; w];
    let row = |y: usize| &rows[y * w..(y + 1) * w];
    for y in 0..h.min(r + 1) {
        count.iter_mut().zip(row(y)).for_each(|(c, &v)| *c += v as u32);
    }
    for y in 0..h {
        out[y * w..(y + 1) * w].iter_mut().zip(&count).for_each(|(o, &c)| *o = c > 0);
        if y + r + 1 < h {
            count.iter_mut().zip(row(y + r + 1)).for_each(|(c, &v)| *c += v as u32);
        }
        if y >= r {
            count.iter_mut().zip(row(y - r)).for_each(|(c, &v)| *c -= v as u32);
        }
    }
    out
}

/// PyTorch's `nearest_idx` (aten/src/ATen/native/UpSample.h).
fn nearest_index(dst: u32, input: u32, output: u32) -> usize {
    if output == input {
        dst as usize
    } else if output == 2 * input {
        (dst >> 1) as usize
    } else {
        let scale = input as f32 / output as f32;
        let src = (dst as f32 * scale).floor() as usize;
        src.min((input as usize).saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sliding counts against the definition, pixel by pixel: sparse masks with set pixels
    /// on the edges and corners, squares from 1×1 to wider than the image.
    #[test]
    fn dilate_square_matches_its_definition() {
        for (w, h, seed) in [(23, 17, 0), (23, 17, 1), (23, 17, 2), (23, 17, 3), (1, 9, 0), (9, 1, 1), (1, 1, 0), (40, 3, 2)] {
            let mask: Vec<bool> = (0..w * h)
                .map(|p| {
                    let (x, y) = (p % w, p / w);
                    x == 0 && y == 3 || x == w - 1 && y == h - 1 || (p as u32 * 2654435761u32).rotate_left(seed) % 29 == 0
                })
                .collect();
            for k in [1, 3, 5, 9, 41] {
                let r = (k / 2) as isize;
                let want: Vec<bool> = (0..w * h)
                    .map(|p| {
                        let (x, y) = ((p % w) as isize, (p / w) as isize);
                        (-r..=r).any(|dy| {
                            (-r..=r).any(|dx| {
                                let (xx, yy) = (x + dx, y + dy);
                                xx >= 0 && yy >= 0 && xx < w as isize && yy < h as isize && mask[yy as usize * w + xx as usize]
                            })
                        })
                    })
                    .collect();
                assert_eq!(dilate_square(&mask, w, h, k), want, "{w}×{h}, seed {seed}, k {k}");
            }
        }
    }

    #[test]
    fn nearest_matches_pytorch_examples() {
        // F.interpolate(torch.arange(5.)[None,None], size=3, mode="nearest") -> [0, 1, 3]
        assert_eq!(
            (0..3).map(|d| nearest_index(d, 5, 3)).collect::<Vec<_>>(),
            vec![0, 1, 3]
        );
        // size 5 -> 8: [0, 0, 1, 1, 2, 3, 3, 4]
        assert_eq!(
            (0..8).map(|d| nearest_index(d, 5, 8)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 3, 3, 4]
        );
        // exact 2x upscale
        assert_eq!(
            (0..6).map(|d| nearest_index(d, 3, 6)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1, 2, 2]
        );
    }
}
