// Give this crate's test binaries an rpath to libtorch so they run without LD_LIBRARY_PATH.
include!("../../scripts/rpath.rs");
