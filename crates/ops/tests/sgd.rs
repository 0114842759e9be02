//! sgd_step against the per-tensor loop it replaces: bit for bit, on CPU (and CUDA if present).

use s3net_ops::sgd_step;
use tch::{Device, Kind, Tensor};

/// Three steps of the plain loop and of `sgd_step` from the same start must agree exactly.
fn matches_the_loop(device: Device) {
    tch::manual_seed(2);
    let shapes: [&[i64]; 4] = [&[8, 3, 3, 3], &[8], &[1, 18, 5, 5], &[4, 8, 1, 1]];
    let start: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, device))).collect();
    let leaves = || -> Vec<Tensor> { start.iter().map(|t| t.copy().set_requires_grad(true)).collect() };
    let (a, b) = (leaves(), leaves());
    let mut va: Vec<Tensor> = a.iter().map(|p| p.zeros_like()).collect();
    let vb: Vec<Tensor> = b.iter().map(|p| p.zeros_like()).collect();
    let (lr, momentum) = (0.2, 0.9);
    // A loss that leaves the last parameter without a gradient: it must be skipped.
    let loss = |p: &[Tensor]| p[0].pow_tensor_scalar(2).sum(Kind::Float) + p[1].sin().sum(Kind::Float) + p[2].exp().mean(Kind::Float);
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
        sgd_step(&refs, &vb, lr, momentum).unwrap();
        // Gradients are dropped for the next backward, which then starts from nothing.
        assert!(b.iter().all(|p| !p.grad().defined()), "a gradient survived the step");
    }
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        assert!(x.equal(y), "parameter {i} differs from the loop");
    }
    assert!(b[3].equal(&start[3]), "a parameter without gradient must not move");
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

#[test]
fn mismatched_lists_are_errors() {
    let p = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let e = sgd_step(&[&p], &[], 0.1, 0.9).unwrap_err();
    assert!(e.0.contains("1 parameters but 0 velocity"), "{}", e.0);
    p.sum(Kind::Float).backward();
    let e = sgd_step(&[&p], &[Tensor::zeros([3], (Kind::Float, Device::Cpu))], 0.1, 0.9).unwrap_err();
    assert!(e.0.contains("velocity 0 has shape"), "{}", e.0);
}
