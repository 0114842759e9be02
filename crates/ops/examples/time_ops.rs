//! Timings of the C++ kernels against libtorch at 1×64×256×256, float32, 2 threads.
//!
//! `CARGO_TARGET_DIR=/work/target-ops cargo run --release -p s3net-ops --example time_ops`
//! Optional args: `dw` or `deform` to run one half only; `deform C REPS` for C channels and
//! REPS timed runs (e.g. `deform 32 40` under `perf record`); `dwparts C` for the depthwise
//! kernels' three passes (forward, input gradient, weight gradient) apart, C channels.

use std::time::Instant;

use s3net_ops::{deform_conv2d, depthwise_conv2d};
use tch::{Device, Kind, Tensor};

/// Median wall time (ms) of `reps` runs of `f` after one warm-up.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn depthwise() {
    let opts = (Kind::Float, Device::Cpu);
    let (c, h, w) = (64, 256, 256);
    println!("depthwise 1x{c}x{h}x{w} float32 (median ms)        ours fwd | torch fwd | ours f+b | torch f+b | torch CL f+b");
    // The first row also pays process warm-up (allocator, thread pool, oneDNN); it is repeated
    // at the end for a warm number.
    for (k, p, d) in [(5, 2, 1), (3, 1, 1), (5, 4, 2), (7, 9, 3), (5, 2, 1)] {
        let x = Tensor::randn([1, c, h, w], opts);
        let wt = Tensor::randn([c, 1, k, k], opts);
        let b = Tensor::randn([c], opts);
        let ours_f = time_ms(7, || {
            tch::no_grad(|| {
                let _ = depthwise_conv2d(&x, &wt, Some(&b), p, d).unwrap();
            })
        });
        let torch_f = time_ms(5, || {
            tch::no_grad(|| {
                let _ = x.conv2d(&wt, Some(&b), [1, 1], [p, p], [d, d], c);
            })
        });
        let ours_fb = time_ms(5, || {
            let (x, wt, b) = (leaf(&x), leaf(&wt), leaf(&b));
            depthwise_conv2d(&x, &wt, Some(&b), p, d)
                .unwrap()
                .sum(Kind::Float)
                .backward();
        });
        let torch_fb = time_ms(3, || {
            let (x, wt, b) = (leaf(&x), leaf(&wt), leaf(&b));
            x.conv2d(&wt, Some(&b), [1, 1], [p, p], [d, d], c)
                .sum(Kind::Float)
                .backward();
        });
        let xcl = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        let torch_cl_fb = time_ms(3, || {
            let (x, wt, b) = (leaf(&xcl), leaf(&wt), leaf(&b));
            x.conv2d(&wt, Some(&b), [1, 1], [p, p], [d, d], c)
                .sum(Kind::Float)
                .backward();
        });
        println!(
            "  k={k} p={p} d={d}                               {ours_f:8.2} | {torch_f:9.2} | {ours_fb:8.2} | {torch_fb:9.2} | {torch_cl_fb:9.2}"
        );
    }
}

/// Each depthwise geometry's forward, input-gradient and weight-gradient passes timed apart
/// (a backward with only the input, or only the weight, requiring grad), 1×c×256².
fn depthwise_parts(c: i64) {
    let opts = (Kind::Float, Device::Cpu);
    println!("depthwise 1x{c}x256x256 float32 (median ms)   fwd | input grad (f+b) | weight grad (f+b)");
    for (k, p, d) in [(5, 2, 1), (3, 1, 1), (5, 4, 2), (7, 9, 3)] {
        let x = Tensor::randn([1, c, 256, 256], opts);
        let wt = Tensor::randn([c, 1, k, k], opts);
        let fwd = time_ms(9, || {
            tch::no_grad(|| {
                let _ = depthwise_conv2d(&x, &wt, None, p, d).unwrap();
            })
        });
        let gi = time_ms(9, || {
            depthwise_conv2d(&leaf(&x), &wt, None, p, d).unwrap().sum(Kind::Float).backward();
        });
        let gw = time_ms(9, || {
            depthwise_conv2d(&x, &leaf(&wt), None, p, d).unwrap().sum(Kind::Float).backward();
        });
        println!("  k={k} p={p} d={d}                       {fwd:6.2} | {gi:16.2} | {gw:17.2}");
    }
}

/// `c`: input and output channels (64: the shape; the default network has 32).
/// `reps`: timed runs per figure (raise it to profile the op with `perf record`).
fn deform(c: i64, reps: usize) {
    let opts = (Kind::Float, Device::Cpu);
    let (o, h, w) = (c, 256, 256);
    tch::manual_seed(0);
    let x = Tensor::randn([1, c, h, w], opts);
    let off = Tensor::randn([1, 18, h, w], opts) * 2.0;
    let mask = Tensor::rand([1, 9, h, w], opts);
    let wt = Tensor::randn([o, c, 3, 3], opts) * 0.05;
    let b = Tensor::randn([o], opts);
    let g = ((1, 1), (1, 1), (1, 1));
    let fwd = time_ms(reps, || {
        tch::no_grad(|| {
            let _ = deform_conv2d(&x, &off, Some(&mask), &wt, Some(&b), g.0, g.1, g.2).unwrap();
        })
    });
    let fb = time_ms(reps, || {
        let (x, off, mask, wt, b) = (leaf(&x), leaf(&off), leaf(&mask), leaf(&wt), leaf(&b));
        deform_conv2d(&x, &off, Some(&mask), &wt, Some(&b), g.0, g.1, g.2)
            .unwrap()
            .sum(Kind::Float)
            .backward();
    });
    let conv_fb = time_ms(5, || {
        let (x, wt, b) = (leaf(&x), leaf(&wt), leaf(&b));
        x.conv2d(&wt, Some(&b), [1, 1], [1, 1], [1, 1], 1)
            .sum(Kind::Float)
            .backward();
    });
    println!(
        "deform 1x{c}x{h}x{w} -> {o}, 3x3, pad 1, offsets ~N(0,2), with mask, float32 (median ms)"
    );
    println!("  ours fwd {fwd:.1} | ours fwd+bwd {fb:.1} | (plain torch conv2d 3x3 fwd+bwd for scale: {conv_fb:.1})");
}

fn main() {
    tch::set_num_threads(2);
    let which = std::env::args().nth(1).unwrap_or_default();
    println!("threads: {}", tch::get_num_threads());
    if which.is_empty() || which == "dw" {
        depthwise();
    }
    if which == "dwparts" {
        depthwise_parts(std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(32));
    }
    if which.is_empty() || which == "deform" {
        let arg = |i: usize, default: usize| {
            std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
        };
        deform(arg(2, 64) as i64, arg(3, 5));
    }
}
