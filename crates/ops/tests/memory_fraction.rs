//! set_cuda_memory_fraction: a fraction outside (0, 1] is refused, naming it; on a GPU the cap
//! holds (beyond it an allocation fails as out of memory, below it one works). Its own test
//! binary: the cap is the whole process's.

use s3net_ops::set_cuda_memory_fraction;
use tch::{Kind, Tensor};

#[path = "../../../tests/support/torch_checks.rs"]
mod checks;

#[test]
fn fractions_outside_zero_to_one_are_refused() {
    for f in [0.0, -0.5, 1.5, f64::NAN] {
        let e = set_cuda_memory_fraction(0, f).unwrap_err();
        assert!(e.to_string().contains("memory fraction must be in (0, 1]"), "{f}: {e}");
    }
}

#[test]
fn cuda_allocations_beyond_the_fraction_fail() {
    let Some(device) = checks::cuda_with_kernels() else { return };
    // 1 % of any GPU made so far is well below 4 GB.
    set_cuda_memory_fraction(0, 0.01).unwrap();
    let big = Tensor::f_zeros([1 << 30], (Kind::Float, device));
    let small = Tensor::f_zeros([1 << 18], (Kind::Float, device));
    set_cuda_memory_fraction(0, 1.0).unwrap();
    let e = big.expect_err("4 GB allocated under a 1 % cap");
    assert!(e.to_string().to_lowercase().contains("out of memory"), "{e}");
    assert!(small.is_ok(), "1 MB refused under the cap");
    assert!(Tensor::f_zeros([1 << 30], (Kind::Float, device)).is_ok(), "the cap was not lifted");
}
