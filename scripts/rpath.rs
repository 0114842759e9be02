// Shared by the build scripts of every crate that links libtorch (`include!`d, then called):
// * an rpath to the real libtorch folder (the `.libtorch` link resolved), so binaries and tests
//   run without LD_LIBRARY_PATH (and one to the CUDA runtime of the PyPI wheel, nvidia/cu13/lib,
//   which the CUDA kernels of s3net-ops link);
// * libtorch_cuda linked with --no-as-needed when present: nothing references its symbols
//   directly, so the linker would drop it and CUDA would silently be unavailable at run time.
fn libtorch_link_args() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        // site-packages/torch/lib → site-packages/nvidia/cu13/lib
        if let Some(cu) = lib.parent().and_then(|t| t.parent()).map(|sp| sp.join("nvidia/cu13/lib")) {
            if cu.exists() {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cu.display());
            }
        }
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-L{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
