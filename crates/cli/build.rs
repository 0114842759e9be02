// Give this crate's binaries and test binaries an rpath to libtorch (scripts/rpath.rs).
include!("../../scripts/rpath.rs");

fn main() {
    libtorch_link_args();
}
