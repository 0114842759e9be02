//! CudaGraph: a capture runs nothing until replayed, each replay reads the inputs' current
//! values, and a failed capture leaves the thread able to carry on.

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
