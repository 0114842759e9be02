//! sgd_step against the per-tensor loop it replaces: bit for bit, on CPU (and CUDA if present),
//! through libtorch's multi-tensor ops and through our fused kernel (`S3NET_FUSED_SGD`, on the
//! emulation and on CUDA).

use s3net_ops::{emulated_cuda, emulated_launches, set_fused_sgd, sgd_step};
use tch::{Device, Kind, Tensor};

/// Three steps of the plain loop and of `sgd_step` from the same start must agree exactly.
fn matches_the_loop(device: Device) {
    matches_the_loop_with(device, Kind::Float, &[&[8, 3, 3, 3], &[8], &[1, 18, 5, 5], &[4, 8, 1, 1]], false);
}

/// [`matches_the_loop`] for parameters of `shapes` in `kind`, `sgd_step` run on the emulated
/// kernels when `emulate` (the loop and the backward stay on the CPU's own ops). The loss
/// leaves the last parameter without a gradient.
fn matches_the_loop_with(device: Device, kind: Kind, shapes: &[&[i64]], emulate: bool) {
    tch::manual_seed(2);
    let start: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (kind, device))).collect();
    let leaves = || -> Vec<Tensor> { start.iter().map(|t| t.copy().set_requires_grad(true)).collect() };
    let (a, b) = (leaves(), leaves());
    let mut va: Vec<Tensor> = a.iter().map(|p| p.zeros_like()).collect();
    let vb: Vec<Tensor> = b.iter().map(|p| p.zeros_like()).collect();
    let (lr, momentum) = (0.2, 0.9);
    // A loss that leaves the last parameter without a gradient: it must be skipped.
    let last = shapes.len() - 1;
    let loss = |p: &[Tensor]| {
        let mut l = p[0].pow_tensor_scalar(2).sum(kind) + p[1].sin().sum(kind);
        for q in &p[2..last] {
            l += q.exp().mean(kind);
        }
        l
    };
    for _ in 0..3 {
        for p in &a {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss(&a).backward();
        tch::no_grad(|| {
            for (p, v) in a.iter().zip(va.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = v.g_mul_scalar_(momentum).g_add_(&g);
                let _ = p.shallow_clone().g_sub_(&(&*v * lr));
            }
        });
        loss(&b).backward();
        let refs: Vec<&Tensor> = b.iter().collect();
        if emulate {
            let before = emulated_launches();
            emulated_cuda(|| sgd_step(&refs, &vb, lr, momentum)).unwrap();
            let fused = matches!(kind, Kind::Float | Kind::Double);
            assert_eq!(emulated_launches() > before, fused, "the fused kernel ran for {kind:?}: {}", !fused);
        } else {
            sgd_step(&refs, &vb, lr, momentum).unwrap();
        }
        // Gradients are dropped for the next backward, which then starts from nothing.
        assert!(b.iter().all(|p| !p.grad().defined()), "a gradient survived the step");
    }
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        assert!(x.equal(y), "parameter {i} differs from the loop");
    }
    assert!(b[last].equal(&start[last]), "a parameter without gradient must not move");
}

#[test]
fn sgd_step_matches_the_loop_cpu() {
    matches_the_loop(Device::Cpu);
}

#[test]
fn cuda_sgd_step_matches_the_loop() {
    if tch::Cuda::is_available() {
        matches_the_loop(Device::Cuda(0));
    } else {
        eprintln!("no CUDA device: CUDA case skipped");
    }
}

/// The fused kernel (`S3NET_FUSED_SGD`), on the emulation: 100 parameters (three launches of
/// at most 48), sizes around its 1024 values a block, float32 and float64 the same bits as
/// the loop; bfloat16 parameters, which it does not take, through libtorch's ops as before.
/// Turning the switch on here is safe for the other tests of this binary: both ways give the
/// same bits.
#[test]
fn fused_kernel_matches_the_loop_emulated() {
    set_fused_sgd(true);
    let sizes: Vec<Vec<i64>> = (0..100).map(|i| vec![[1, 3, 1023, 1024, 1025, 2049, 7][i % 7] + (i / 7) as i64]).collect();
    let shapes: Vec<&[i64]> = sizes.iter().map(Vec::as_slice).collect();
    for kind in [Kind::Float, Kind::Double, Kind::BFloat16] {
        matches_the_loop_with(Device::Cpu, kind, &shapes, true);
    }
}

#[test]
fn cuda_fused_kernel_matches_the_loop() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: CUDA case skipped");
        return;
    }
    set_fused_sgd(true);
    let sizes: Vec<Vec<i64>> = (0..100).map(|i| vec![[1, 3, 1023, 1024, 1025, 2049, 7][i % 7] + (i / 7) as i64]).collect();
    let shapes: Vec<&[i64]> = sizes.iter().map(Vec::as_slice).collect();
    for kind in [Kind::Float, Kind::Double] {
        matches_the_loop_with(Device::Cuda(0), kind, &shapes, false);
    }
    matches_the_loop(Device::Cuda(0));
}

#[test]
fn mismatched_lists_are_errors() {
    let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let e = sgd_step(&[&p], &[], 0.1, 0.9).unwrap_err();
    assert!(e.0.contains("1 parameters but 0 velocity"), "{}", e.0);
    p.sum(Kind::Float).backward();
    let e = sgd_step(&[&p], &[Tensor::zeros([3], (Kind::Float, Device::Cpu))], 0.1, 0.9).unwrap_err();
    assert!(e.0.contains("velocity 0 has shape"), "{}", e.0);
}
