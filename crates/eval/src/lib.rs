//! Segmentation metrics and the three evaluation protocols.
//!
//! * DSC = 2|A∩G| / (|A|+|G|), HM = (|A∪G| − |A∩G|) / |A∪G|, XOR = (|A∪G| − |A∩G|) / |G|,
//!   all ×100 as the paper prints them.
//! * **paper** — the authors' evaluation: the cluster most frequent inside the ground truth,
//!   multiplied by the ground truth dilated twice with a 5×5 square. It uses the ground truth
//!   twice; we report it only to compare with the paper's table.
//! * **oracle** — the single cluster with the best Dice, uncropped: an honest ceiling for
//!   one-cluster answers.
//! * **auto** — the product's own foreground mask, chosen without ground truth.
//!
//! Everything here is a pure function of flat row-major buffers.

use serde::Serialize;

/// DSC, HM and XOR, ×100.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Scores {
    pub dsc: f64,
    pub hm: f64,
    pub xor: f64,
}

/// Scores of a predicted mask against the ground truth (same length).
///
/// Conventions for empty sets: both empty is a perfect match; an empty ground truth with a
/// non-empty prediction has XOR measured against one pixel.
pub fn scores(pred: &[bool], gt: &[bool]) -> Scores {
    assert_eq!(pred.len(), gt.len(), "prediction and ground truth differ in size");
    let (mut inter, mut a, mut g) = (0u64, 0u64, 0u64);
    for (&p, &t) in pred.iter().zip(gt) {
        inter += (p && t) as u64;
        a += p as u64;
        g += t as u64;
    }
    let union = a + g - inter;
    if union == 0 {
        return Scores { dsc: 100.0, hm: 0.0, xor: 0.0 };
    }
    let diff = (union - inter) as f64;
    Scores {
        dsc: 200.0 * inter as f64 / (a + g) as f64,
        hm: 100.0 * diff / union as f64,
        xor: 100.0 * diff / g.max(1) as f64,
    }
}

/// Binary dilation with a `k × k` square (k odd), zero outside the image: the paper
/// protocol's crop. The same function the foreground rule uses, from `s3net-imaging`.
pub use s3net_imaging::dilate_square;

/// The label most frequent inside the ground truth (ties: the lower label); `None` if the
/// ground truth is empty.
pub fn majority_label_inside(labels: &[u16], gt: &[bool]) -> Option<u16> {
    let mut counts = std::collections::BTreeMap::<u16, u64>::new();
    for (&l, &t) in labels.iter().zip(gt) {
        if t {
            *counts.entry(l).or_default() += 1;
        }
    }
    counts.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(l, _)| l)
}

/// The authors' protocol (see the crate docs).
pub fn paper_protocol(labels: &[u16], gt: &[bool], w: usize, h: usize) -> Scores {
    let Some(c) = majority_label_inside(labels, gt) else {
        return scores(&vec![false; gt.len()], gt);
    };
    let crop = dilate_square(&dilate_square(gt, w, h, 5), w, h, 5);
    let pred: Vec<bool> = labels.iter().zip(&crop).map(|(&l, &k)| l == c && k).collect();
    scores(&pred, gt)
}

/// The best single cluster by Dice, uncropped. Returns the scores and the cluster.
pub fn oracle_protocol(labels: &[u16], gt: &[bool]) -> (Scores, u16) {
    let max = labels.iter().copied().max().unwrap_or(0);
    (0..=max)
        .map(|c| {
            let pred: Vec<bool> = labels.iter().map(|&l| l == c).collect();
            (scores(&pred, gt), c)
        })
        .max_by(|a, b| a.0.dsc.total_cmp(&b.0.dsc))
        .unwrap_or((Scores::default(), 0))
}

/// Mean of each metric over images.
pub fn mean(all: &[Scores]) -> Scores {
    let n = all.len().max(1) as f64;
    Scores {
        dsc: all.iter().map(|s| s.dsc).sum::<f64>() / n,
        hm: all.iter().map(|s| s.hm).sum::<f64>() / n,
        xor: all.iter().map(|s| s.xor).sum::<f64>() / n,
    }
}

/// Median of a list (mean of the middle two for even lengths); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_their_definitions() {
        // A = 4 pixels, G = 4 pixels, overlap 2.
        let a = [true, true, true, true, false, false];
        let g = [false, false, true, true, true, true];
        let s = scores(&a, &g);
        assert!((s.dsc - 50.0).abs() < 1e-9);
        assert!((s.hm - 100.0 * 4.0 / 6.0).abs() < 1e-9);
        assert!((s.xor - 100.0).abs() < 1e-9);
        let p = scores(&g, &g);
        assert_eq!((p.dsc, p.hm, p.xor), (100.0, 0.0, 0.0));
        let e = scores(&[false; 3], &[false; 3]);
        assert_eq!(e.dsc, 100.0);
    }

    #[test]
    fn dilation_grows_a_point_to_a_square() {
        let (w, h) = (9, 9);
        let mut m = vec![false; w * h];
        m[4 * w + 4] = true;
        let d = dilate_square(&m, w, h, 5);
        assert_eq!(d.iter().filter(|&&v| v).count(), 25);
        let d2 = dilate_square(&d, w, h, 5);
        assert_eq!(d2.iter().filter(|&&v| v).count(), 81);
        // At a corner the square is clipped by the image.
        let mut c = vec![false; w * h];
        c[0] = true;
        assert_eq!(dilate_square(&c, w, h, 5).iter().filter(|&&v| v).count(), 9);
    }

    #[test]
    fn protocols_pick_the_expected_clusters() {
        // 1-D image of width 10: GT covers 3..7; label 1 covers 2..8 (leaks 2 pixels).
        let (w, h) = (10, 1);
        let gt: Vec<bool> = (0..10).map(|i| (3..7).contains(&i)).collect();
        let labels: Vec<u16> = (0..10).map(|i| if (2..8).contains(&i) { 1 } else { 0 }).collect();
        let (o, c) = oracle_protocol(&labels, &gt);
        assert_eq!(c, 1);
        assert!((o.dsc - 80.0).abs() < 1e-9);
        // The paper protocol crops the leak with the dilated GT (which reaches 2 px around it
        // twice), so it scores the same here; a far leak would be erased.
        let p = paper_protocol(&labels, &gt, w, h);
        assert!((p.dsc - 80.0).abs() < 1e-9);
        let far: Vec<u16> = (0..10).map(|i| if (3..7).contains(&i) || i == 9 { 1 } else { 0 }).collect();
        let gt_small: Vec<bool> = (0..10).map(|i| i == 3).collect();
        let labels_far: Vec<u16> = far.to_vec();
        let p = paper_protocol(&labels_far, &gt_small, w, h);
        let o = oracle_protocol(&labels_far, &gt_small).0;
        assert!(p.dsc > o.dsc);
        assert_eq!(majority_label_inside(&labels, &[false; 10]), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
