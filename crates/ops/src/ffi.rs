//! The C boundary: tensors cross as `at::Tensor*`, results come back as new tensors or handles
//! the caller owns, errors as strdup'd messages turned into [`OpError`](crate::OpError) here.

use std::ffi::{c_char, c_void, CStr};

use tch::Tensor;

use crate::OpError;

extern "C" {
    fn s3ops_free_err(e: *mut c_char);
}

pub(crate) fn ptr(t: Option<&Tensor>) -> *const c_void {
    t.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void)
}

/// Turns the (status, err) pair of a C call that returns nothing into a `Result`.
pub(crate) fn status(rc: i32, err: *mut c_char, fallback: &str) -> Result<(), OpError> {
    if rc == 0 {
        return Ok(());
    }
    Err(take_error(err, fallback))
}

/// Turns the (status, out, err) triple of a C call into a `Result`.
pub(crate) fn finish(rc: i32, out: *mut c_void, err: *mut c_char) -> Result<Tensor, OpError> {
    let out = owned(rc, out, err, "C++ kernel failed without a message")?;
    // SAFETY: `out` is a fresh `new at::Tensor(...)`, which tch owns (and deletes) from now on.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// The object a C call handed over in `out` (a tensor, a copy, a graph), or its error.
pub(crate) fn owned(rc: i32, out: *mut c_void, err: *mut c_char, fallback: &str) -> Result<*mut c_void, OpError> {
    if rc == 0 && !out.is_null() {
        return Ok(out);
    }
    Err(take_error(err, fallback))
}

/// The C side's error message (a strdup'd string, freed here), or `fallback` when it gave none.
pub(crate) fn take_error(err: *mut c_char, fallback: &str) -> OpError {
    if err.is_null() {
        return OpError(fallback.to_string());
    }
    // SAFETY: `err` is a NUL-terminated string from strdup, freed right after the copy.
    let s = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { s3ops_free_err(err) };
    OpError(s)
}
