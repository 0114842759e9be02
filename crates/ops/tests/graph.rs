//! CudaGraph: a capture runs nothing until replayed, each replay reads the inputs' current
//! values, a failed capture leaves the thread able to carry on, and dropped graphs give their
//! memory back.

use s3net_ops::{CudaGraph, OpError};
use tch::{Device, Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;

fn cuda() -> Option<usize> {
    checks::cuda_with_kernels()?;
    // Captures need a stream other than the default one.
    s3net_ops::use_pool_stream(0).unwrap();
    Some(0)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap()
}

#[test]
fn cuda_replays_follow_the_inputs() {
    let Some(d) = cuda() else { return };
    let x = Tensor::from_slice(&[1f32, 2., 3.]).to_device(Device::Cuda(d));
    let acc = Tensor::zeros([3], (Kind::Float, Device::Cuda(d)));
    let (graph, y) = CudaGraph::capture(d, || -> Result<Tensor, OpError> {
        let mut a = acc.shallow_clone();
        let _ = a.g_add_(&x);
        Ok(&x * 2.0 + 1.0)
    })
    .unwrap();
    // Captured, not run.
    assert_eq!(values(&acc), [0., 0., 0.]);
    graph.replay().unwrap();
    assert_eq!(values(&y), [3., 5., 7.]);
    let mut x2 = x.shallow_clone();
    let _ = x2.fill_(10.0);
    graph.replay().unwrap();
    assert_eq!(values(&y), [21., 21., 21.]);
    assert_eq!(values(&acc), [11., 12., 13.]);
}

#[test]
fn cuda_failed_captures_leave_the_thread_working() {
    let Some(d) = cuda() else { return };
    let x = Tensor::ones([4], (Kind::Float, Device::Cuda(d)));
    // Reading a value back synchronises: not allowed while capturing.
    let synced = CudaGraph::capture(d, || -> Result<f64, OpError> {
        f64::try_from((&x * 3.0).sum(Kind::Float)).map_err(|e| OpError(e.to_string()))
    });
    assert!(synced.is_err());
    // The body's own error comes back as it was.
    let refused = CudaGraph::capture(d, || -> Result<(), OpError> {
        let _ = &x + 1.0;
        Err(OpError("no".into()))
    });
    assert_eq!(refused.err().map(|e| e.0), Some("no".to_string()));
    // A backward (run by libtorch's autograd thread) inside a failed capture: backward passes
    // afterwards work.
    let w = Tensor::ones([4], (Kind::Float, Device::Cuda(d))).set_requires_grad(true);
    (&w * 1.0).sum(Kind::Float).backward();
    let failed = CudaGraph::capture(d, || -> Result<f64, OpError> {
        (&w * 2.0).sum(Kind::Float).backward();
        f64::try_from(w.grad().sum(Kind::Float)).map_err(|e| OpError(e.to_string()))
    });
    assert!(failed.is_err());
    let mut g = w.grad();
    let _ = g.zero_();
    (&w * 3.0).sum(Kind::Float).backward();
    assert_eq!(values(&w.grad()), [3., 3., 3., 3.]);
    // Plain work runs again, and so does a new capture.
    assert_eq!(values(&(&x + 1.0)), [2., 2., 2., 2.]);
    let (g, y) = CudaGraph::capture(d, || -> Result<Tensor, OpError> { Ok(&x * 5.0) }).unwrap();
    g.replay().unwrap();
    assert_eq!(values(&y), [5., 5., 5., 5.]);
}

/// Dropped graphs hand their memory pool back to the GPU, abandoned captures' too. Why: a
/// worker drops its graph whenever its stack of jobs changes, and libtorch keeps a dropped
/// graph's pool cached until an allocation runs out of memory (two workers once held 63–69 GB
/// of an H100 that way); a capture that failed kept its pool for the life of the process.
#[test]
fn cuda_dropped_graphs_give_their_memory_back() {
    let Some(d) = cuda() else { return };
    const MB: u64 = 1 << 20;
    // 64 MB from the capturing graph's pool, and as much again for the sum.
    let big = || Tensor::zeros([16 * MB as i64], (Kind::Float, Device::Cuda(d))) + 1.0;
    let reserved = || s3net_ops::cuda_reserved_bytes(d).unwrap();
    let before = reserved();
    for _ in 0..10 {
        let (g, y) = CudaGraph::capture(d, || -> Result<Tensor, OpError> { Ok(big()) }).unwrap();
        g.replay().unwrap();
        drop(y);
        drop(g);
    }
    let replayed = reserved();
    for _ in 0..10 {
        let failed = CudaGraph::capture(d, || -> Result<f64, OpError> {
            f64::try_from(big().sum(Kind::Float)).map_err(|e| OpError(e.to_string()))
        });
        assert!(failed.is_err());
    }
    let failed = reserved();
    // Each round would keep at least 64 MB; allow one round's worth plus small blocks.
    let grew = |now: u64| now.saturating_sub(before) / MB;
    assert!(grew(replayed) <= 160, "10 dropped graphs left {} MB reserved", grew(replayed));
    assert!(grew(failed) <= 160, "10 failed captures left {} MB reserved", grew(failed));
    // The thread still works.
    assert_eq!(values(&(Tensor::ones([2], (Kind::Float, Device::Cuda(d))) * 2.0)), [2., 2.]);
}
