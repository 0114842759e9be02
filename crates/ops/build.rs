//! Compiles the ops' C++ (`csrc/*.cpp`: one file per op, `common.h` what they share; one
//! translation unit, `csrc/ops.cpp`) against the libtorch headers and links it into this crate,
//! and, when a CUDA compiler is found, the CUDA kernels (`csrc/*_cuda.cu`) with nvcc for sm_80
//! and sm_90 (plus PTX for newer GPUs), on threads of their own beside the host compiler.
//!
//! Flags are deliberately portable: `-O3` without `-march`, so the library runs on any x86-64.
//! The hot loops get AVX2/FMA clones selected at run time inside the C++ (`__builtin_cpu_supports`).
//! `-fopenmp` is required because `at::parallel_for` is an inline template that expands to
//! `#pragma omp parallel` in this libtorch build (ATen's parallel backend is OpenMP); the OpenMP
//! runtime is libtorch's own `libgomp.so.1` at run time (found through the rpath below).
//!
//! nvcc is looked up in `$S3OPS_NVCC`, then next to the PyPI torch (`nvidia/cu13/bin/nvcc`, from
//! the `nvidia-cuda-nvcc` wheel that `scripts/setup-torch.sh` installs), then `$CUDA_HOME/bin`
//! and `PATH`. `S3OPS_NO_CUDA=1` builds the CPU kernels only. Without nvcc the crate still
//! builds; the fused op then declines CUDA tensors with a clear error and the engine falls back
//! to its tensor-op implementation there.
//!
//! The CUDA sources are also built by the host compiler on `csrc/simt.h`'s CPU emulation of
//! their kernels, always: the tests run the ops' CUDA paths through it where no GPU is.

use std::path::{Path, PathBuf};
use std::process::Command;

include!("../../scripts/rpath.rs");

/// The CUDA toolkit pieces: nvcc, and the include / lib folders of the CUDA runtime that
/// libtorch itself loads (so the kernels and libtorch share one runtime).
struct Cuda {
    nvcc: PathBuf,
    include: PathBuf,
    lib: PathBuf,
}

fn find_cuda(libtorch: &Path) -> Option<Cuda> {
    println!("cargo:rerun-if-env-changed=S3OPS_NO_CUDA");
    println!("cargo:rerun-if-env-changed=S3OPS_NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("S3OPS_NO_CUDA").is_some_and(|v| v != "0") {
        return None;
    }
    // The PyPI layout: site-packages/torch (= libtorch) beside site-packages/nvidia/cu13.
    let wheel = libtorch.parent().map(|p| p.join("nvidia/cu13"));
    let runtime = wheel.clone().filter(|w| w.join("include/cuda_runtime_api.h").exists());
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("S3OPS_NVCC") {
        candidates.push(PathBuf::from(v));
    }
    if let Some(w) = &wheel {
        candidates.push(w.join("bin/nvcc"));
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(h).join("bin/nvcc"));
    }
    candidates.push(PathBuf::from("nvcc"));
    let nvcc = candidates.into_iter().find(|c| {
        Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
    })?;
    // Headers and runtime: those of the torch wheel when present, else the toolkit's own.
    let root = match runtime {
        Some(r) => r,
        None => nvcc.canonicalize().ok()?.parent()?.parent()?.to_path_buf(),
    };
    let lib = [root.join("lib"), root.join("lib64")].into_iter().find(|l| l.exists())?;
    Some(Cuda { nvcc, include: root.join("include"), lib })
}

/// Compiles each CUDA source to an object file linked into the crate's library, on cargo's
/// `NUM_JOBS` less one threads (at least one): the host compiler has the remaining job meanwhile.
fn compile_cuda(cuda: &Cuda, out: &Path) -> Vec<PathBuf> {
    let jobs = std::env::var("NUM_JOBS").ok().and_then(|j| j.parse::<usize>().ok()).unwrap_or(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.saturating_sub(1).clamp(1, CUDA_SOURCES.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(src) = CUDA_SOURCES.get(i) else { break };
                nvcc(cuda, src, &cuda_object(out, src));
            });
        }
    });
    CUDA_SOURCES.iter().map(|src| cuda_object(out, src)).collect()
}

fn cuda_object(out: &Path, src: &str) -> PathBuf {
    let stem = Path::new(src).file_stem().expect("a file name").to_string_lossy();
    out.join(format!("{stem}.o"))
}

fn nvcc(cuda: &Cuda, src: &str, obj: &Path) {
    let status = Command::new(&cuda.nvcc)
        .args(["-c", src, "-o"])
        .arg(obj)
        .args(["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-w"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .args(["-gencode", "arch=compute_90,code=compute_90"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cuda.nvcc.display()));
    assert!(status.success(), "nvcc failed on {src}");
}

/// The ops' C++, one file per op (`common.cpp`: the host side of the kernels several of them
/// share), compiled against libtorch as one translation unit, `csrc/ops.cpp`, which includes
/// them all (see there why).
const CPP_SOURCES: [&str; 7] = [
    "csrc/common.cpp",
    "csrc/deform.cpp",
    "csrc/depthwise.cpp",
    "csrc/losses.cpp",
    "csrc/norm.cpp",
    "csrc/pointwise.cpp",
    "csrc/runtime.cpp",
];

const CUDA_SOURCES: [&str; 7] = [
    "csrc/bias_cuda.cu",
    "csrc/deform_cuda.cu",
    "csrc/depthwise_cuda.cu",
    "csrc/losses_cuda.cu",
    "csrc/norm_cuda.cu",
    "csrc/sgd_cuda.cu",
    "csrc/split_k_cuda.cu",
];

/// The same CUDA sources built by the host C++ compiler on `csrc/simt.h`, which runs their
/// kernels on the CPU (entry points `s3ops_simt_*`): what the tests exercise the kernels with
/// on a machine without a GPU, whether or not nvcc is here. Each source is its own translation
/// unit (their file-local names repeat), reached through a one-line wrapper, and finds simt.h
/// where it includes `<cuda_runtime.h>`.
fn compile_simt(out: &Path) {
    let dir = out.join("simt");
    std::fs::create_dir_all(&dir).expect("OUT_DIR is writable");
    let csrc = std::fs::canonicalize("csrc").expect("csrc exists");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        // Rewritten only when different, so the objects are not rebuilt for nothing.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).expect("OUT_DIR is writable");
        }
        path
    };
    write("cuda_runtime.h", format!("#include \"{}\"\n", csrc.join("simt.h").display()));
    let mut build = cc::Build::new();
    build.cpp(true).include(&dir).flag("-std=c++17").flag("-fPIC").flag("-w").opt_level(2).debug(false);
    for src in CUDA_SOURCES {
        let stem = Path::new(src).file_stem().expect("a file name").to_string_lossy();
        let abs = csrc.join(Path::new(src).file_name().expect("a file name"));
        build.file(write(&format!("simt_{stem}.cpp"), format!("#include \"{}\"\n", abs.display())));
    }
    build.compile("s3net_simt");
}

fn main() {
    libtorch_link_args();
    for src in CPP_SOURCES.iter().chain(&["csrc/ops.cpp", "csrc/common.h"]) {
        println!("cargo:rerun-if-changed={src}");
    }
    println!("cargo:rerun-if-changed=csrc/kernel_dims.h");
    println!("cargo:rerun-if-changed=csrc/cuda_common.cuh");
    println!("cargo:rerun-if-changed=csrc/kernel_entries.h");
    println!("cargo:rerun-if-changed=csrc/simt.h");
    for src in CUDA_SOURCES {
        println!("cargo:rerun-if-changed={src}");
    }
    let libtorch = std::env::var("LIBTORCH")
        .expect("LIBTORCH must point at libtorch (see .cargo/config.toml)");
    let libtorch = std::fs::canonicalize(&libtorch).unwrap_or_else(|_| PathBuf::from(&libtorch));
    let include = libtorch.join("include");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/ops.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag("-fPIC")
        // Floating-point compares may not trap: lets gcc turn the kernels' conditional selects
        // (clamps, argmax, signs) into vector blends. Values are unchanged (no reassociation,
        // no fast-math); only the FP exception flags' bookkeeping is given up.
        .flag("-fno-trapping-math")
        .flag("-w")
        .opt_level(3)
        .debug(false);
    let cuda = find_cuda(&libtorch).filter(|_| libtorch.join("lib/libc10_cuda.so").exists());
    if let Some(cuda) = &cuda {
        build.define("S3OPS_CUDA", "1").include(&cuda.include);
    }
    // nvcc on threads of its own while the host compiler builds the ops and the emulated
    // kernels: nvcc is most of this crate's build time (the depthwise kernels alone 25 s here).
    std::thread::scope(|s| {
        let nvcc = cuda.as_ref().map(|cuda| s.spawn(|| compile_cuda(cuda, &out)));
        let ops = build.compile_intermediates();
        compile_simt(&out);
        let kernels = nvcc.map(|t| t.join().expect("an nvcc thread panicked")).unwrap_or_default();
        let mut lib = cc::Build::new();
        lib.cpp(true).objects(ops).objects(kernels).compile("s3net_ops");
    });
    // OpenMP runtime: resolved at run time to libtorch's bundled libgomp.so.1 (same soname).
    println!("cargo:rustc-link-lib=dylib=gomp");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    if let Some(cuda) = &cuda {
        // libtorch's own CUDA runtime, stream API and graphs; the rpath to both folders comes
        // from scripts/rpath.rs in every binary's build script.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-search=native={}", cuda.lib.display());
        if cuda.lib.join("libcudart.so").exists() {
            println!("cargo:rustc-link-lib=dylib=cudart");
        } else {
            println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
        }
    }
}
