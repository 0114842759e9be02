//! Compiles the service's proto with a vendored protoc (no system protoc needed), emits the
//! file descriptor set that server reflection serves, and gives the test binaries an rpath to
//! libtorch.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    libtorch_rpath();
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs the protoc named by PROTOC.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("s3net/v1/s3net.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("s3net_v1_descriptor.bin"))
        .compile_protos(&[proto], &[root])?;
    Ok(())
}

// The body of scripts/rpath.rs (which other crates `include!` as their `main`):
// * an rpath to the real libtorch folder (the `.libtorch` link resolved), so binaries and tests
//   run without LD_LIBRARY_PATH;
// * libtorch_cuda linked with --no-as-needed when present: nothing references its symbols
//   directly, so the linker would drop it and CUDA would silently be unavailable at run time.
fn libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-L{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
