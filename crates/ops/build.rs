//! Compiles `csrc/ops.cpp` against the libtorch headers and links it into this crate.
//!
//! Flags are deliberately portable: `-O3` without `-march`, so the library runs on any x86-64.
//! The hot loops get AVX2/FMA clones selected at run time inside the C++ (`__builtin_cpu_supports`).
//! `-fopenmp` is required because `at::parallel_for` is an inline template that expands to
//! `#pragma omp parallel` in this libtorch build (ATen's parallel backend is OpenMP); the OpenMP
//! runtime is libtorch's own `libgomp.so.1` at run time (found through the rpath below).

use std::path::PathBuf;

include!("../../scripts/rpath.rs");

fn main() {
    libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/ops.cpp");
    let libtorch = std::env::var("LIBTORCH")
        .expect("LIBTORCH must point at libtorch (see .cargo/config.toml)");
    let libtorch = std::fs::canonicalize(&libtorch).unwrap_or_else(|_| PathBuf::from(&libtorch));
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/ops.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag("-fPIC")
        .flag("-w")
        .opt_level(3)
        .debug(false)
        .compile("s3net_ops");
    // OpenMP runtime: resolved at run time to libtorch's bundled libgomp.so.1 (same soname).
    println!("cargo:rustc-link-lib=dylib=gomp");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
}
