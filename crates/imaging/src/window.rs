//! Automatic windowing and window application.

use crate::{Window, WindowFunction};

/// Number of histogram bins used to locate a percentile before the exact selection.
const BINS: usize = 4096;

/// A robust automatic window covering the 0.5th to 99.5th percentile of the samples.
///
/// Percentiles rather than min/max, because a handful of extreme pixels (metal in
/// a CT, a burnt-in annotation, padding of −2048 outside the scan circle) would
/// otherwise squeeze the anatomy into a few grey levels. Non-finite samples are
/// ignored. A flat image (or one with no finite sample) gets a width of 1.0 so the
/// window stays valid.
pub fn auto_window(samples: &[f32]) -> Window {
    auto_window_percentiles(samples, 0.5, 99.5)
}

/// [`auto_window`] with explicit percentiles (0–100, `low_pct <= high_pct`; swapped
/// if given the other way round, clamped into 0–100).
///
/// Each percentile is the exact order statistic at rank `round(p/100 × (n−1))`,
/// found in O(n) with a histogram pass followed by a selection inside a single bin,
/// so that 100-megapixel images are never fully sorted.
pub fn auto_window_percentiles(samples: &[f32], low_pct: f64, high_pct: f64) -> Window {
    let clamp = |p: f64| if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
    let (mut lo_p, mut hi_p) = (clamp(low_pct), clamp(high_pct));
    if lo_p > hi_p {
        std::mem::swap(&mut lo_p, &mut hi_p);
    }

    let mut n: usize = 0;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in samples.iter().filter(|v| v.is_finite()) {
        n += 1;
        min = min.min(v);
        max = max.max(v);
    }
    if n == 0 {
        return Window {
            center: 0.0,
            width: 1.0,
        };
    }
    if min == max {
        return Window {
            center: f64::from(min),
            width: 1.0,
        };
    }

    let rank = |p: f64| ((p / 100.0) * (n - 1) as f64).round() as usize;
    let ranks = [rank(lo_p).min(n - 1), rank(hi_p).min(n - 1)];
    let [lo, hi] = select_ranks(samples, n, min, max, ranks);
    let (lo, hi) = (f64::from(lo), f64::from(hi));
    if hi > lo {
        Window {
            center: (lo + hi) / 2.0,
            width: hi - lo,
        }
    } else {
        Window {
            center: lo,
            width: 1.0,
        }
    }
}

/// Finds the values at two ranks among the `n` finite samples in `[min, max]`.
fn select_ranks(samples: &[f32], n: usize, min: f32, max: f32, ranks: [usize; 2]) -> [f32; 2] {
    let (min64, span) = (f64::from(min), f64::from(max) - f64::from(min));
    let scale = BINS as f64 / span;
    // Monotonic in v, so the bins partition the sorted order.
    let bin = |v: f32| (((f64::from(v) - min64) * scale) as usize).min(BINS - 1);

    let mut hist = vec![0usize; BINS];
    for &v in samples.iter().filter(|v| v.is_finite()) {
        hist[bin(v)] += 1;
    }
    // For each rank: the bin holding it and its rank inside that bin.
    let locate = |r: usize| {
        let mut before = 0;
        for (b, &count) in hist.iter().enumerate() {
            if r < before + count {
                return (b, r - before);
            }
            before += count;
        }
        (BINS - 1, hist[BINS - 1].saturating_sub(1))
    };
    let targets = [locate(ranks[0]), locate(ranks[1])];

    let mut out = [min, max];
    for (i, &(b, r)) in targets.iter().enumerate() {
        let mut in_bin: Vec<f32> = samples
            .iter()
            .copied()
            .filter(|v| v.is_finite() && bin(*v) == b)
            .collect();
        if in_bin.is_empty() {
            continue;
        }
        let r = r.min(in_bin.len() - 1);
        let (_, v, _) = in_bin.select_nth_unstable_by(r, f32::total_cmp);
        out[i] = *v;
    }
    debug_assert!(n > 0);
    out
}

/// Windowing into `[0, 1]` by `function` (see [`WindowFunction`]); NaN maps to 0.
pub(crate) fn apply_window(samples: &[f32], w: Window, function: &WindowFunction) -> Vec<f32> {
    let mut out = samples.to_vec();
    apply_window_in_place(&mut out, w, function);
    out
}

/// [`apply_window`] over the samples' own buffer (no second image-sized buffer).
pub(crate) fn apply_window_in_place(samples: &mut [f32], w: Window, function: &WindowFunction) {
    // One loop per function, each with its own closure inlined (no call per pixel).
    fn map(samples: &mut [f32], grey: impl Fn(f64) -> f64) {
        for v in samples {
            let x = grey(f64::from(*v)) as f32;
            *v = if x.is_nan() || v.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        }
    }
    match function {
        WindowFunction::Linear => {
            let lo = w.center - w.width / 2.0;
            let inv = 1.0 / w.width;
            map(samples, |x| (x - lo) * inv)
        }
        WindowFunction::Sigmoid => {
            let k = -4.0 / w.width;
            map(samples, |x| 1.0 / (1.0 + (k * (x - w.center)).exp()))
        }
        WindowFunction::Table { first, grey } if !grey.is_empty() => {
            let last = (grey.len() - 1) as f64;
            map(samples, |x| f64::from(grey[(x - first).floor().clamp(0.0, last) as usize]))
        }
        WindowFunction::Table { .. } => map(samples, |_| 0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(samples: &[f32], p: f64) -> f32 {
        let mut v: Vec<f32> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f32::total_cmp);
        v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
    }

    #[test]
    fn matches_sorting_on_pseudo_random_data() {
        let mut state = 12345u64;
        let mut samples = Vec::new();
        for i in 0..50_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = ((state >> 33) as f32 / (1u64 << 31) as f32) * 3000.0 - 1000.0;
            samples.push(if i % 1000 == 0 { 1e6 } else { x });
        }
        samples.push(f32::NAN);
        let w = auto_window(&samples);
        let (lo, hi) = (exact(&samples, 0.5), exact(&samples, 99.5));
        assert_eq!(w.center, (f64::from(lo) + f64::from(hi)) / 2.0);
        assert_eq!(w.width, f64::from(hi) - f64::from(lo));
        // The outliers at 1e6 are excluded.
        assert!(w.center + w.width / 2.0 < 2001.0);
    }

    #[test]
    fn concentrated_values() {
        let mut samples = vec![0.0f32; 10_000];
        samples[0] = -5.0;
        samples[1] = 1e9;
        let w = auto_window(&samples);
        assert_eq!(
            w,
            Window {
                center: 0.0,
                width: 1.0
            }
        );
        let w = auto_window_percentiles(&samples, 0.0, 100.0);
        assert_eq!(w.center, (1e9f32 as f64 - 5.0) / 2.0);
    }

    #[test]
    fn degenerate() {
        assert_eq!(
            auto_window(&[]),
            Window {
                center: 0.0,
                width: 1.0
            }
        );
        assert_eq!(
            auto_window(&[f32::NAN]),
            Window {
                center: 0.0,
                width: 1.0
            }
        );
        assert_eq!(
            auto_window(&[7.0; 100]),
            Window {
                center: 7.0,
                width: 1.0
            }
        );
    }

    #[test]
    fn applies_and_clamps() {
        let w = Window { center: 50.0, width: 100.0 };
        let out = apply_window(&[-10.0, 0.0, 50.0, 100.0, 200.0, f32::NAN], w, &WindowFunction::Linear);
        assert_eq!(out, vec![0.0, 0.0, 0.5, 1.0, 1.0, 0.0]);
        // The sigmoid: one half at the center, 1/(1+e²) a half-width below it.
        let out = apply_window(&[50.0, 0.0, 100.0, f32::NAN], w, &WindowFunction::Sigmoid);
        let e2 = (1.0 / (1.0 + 2f64.exp())) as f32;
        assert_eq!(out, vec![0.5, e2, 1.0 - e2, 0.0]);
        // A table from 10: below it its first entry, past it its last, between entries the lower.
        let table = WindowFunction::Table { first: 10.0, grey: vec![0.0, 0.25, 1.0] };
        let out = apply_window(&[-5.0, 10.0, 11.0, 11.9, 12.0, 99.0, f32::NAN], w, &table);
        assert_eq!(out, vec![0.0, 0.0, 0.25, 0.25, 1.0, 1.0, 0.0]);
    }
}
