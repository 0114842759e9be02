//! Placeholder, replaced below.
use s3net_imaging::{ImageKind, LabelMap};
pub fn select(labels: &LabelMap, _intensity: &[f32], _kind: ImageKind) -> Vec<bool> { labels.data.iter().map(|&l| l == 1).collect() }
pub fn upsample_mask(m: &[bool], w: u32, h: u32, nw: u32, nh: u32) -> Vec<bool> {
    let mut out = Vec::with_capacity((nw * nh) as usize);
    for y in 0..nh as u64 { let sy = (y * h as u64 / nh as u64) as usize; for x in 0..nw as u64 { let sx = (x * w as u64 / nw as u64) as usize; out.push(m[sy * w as usize + sx]); } }
    out
}
