//! Compiles the service's proto with a vendored protoc (no system protoc needed), emits the
//! file descriptor set that server reflection serves, and gives the test binaries an rpath to
//! libtorch.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    libtorch_link_args();
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

include!("../../scripts/rpath.rs");
