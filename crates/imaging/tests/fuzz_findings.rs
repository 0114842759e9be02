//! Inputs the fuzzer (`fuzz/`, `make fuzz`) found to break a decoder, kept as plain tests so
//! that CI (stable Rust, no libFuzzer) holds every fix: each is refused by name, quickly, and
//! without a large allocation (what libFuzzer reported as out-of-memory would, in a server,
//! be the kernel's OOM killer ending every job).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use s3net_imaging::*;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(live, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// (file under tests/data/fuzz, what the error must say).
const FINDINGS: [(&str, &str); 2] = [
    // GDCMJ2K_TextGBR.dcm with Pixel Representation's VR turned from US into SL (2 bytes, not
    // a multiple of 4): dicom-parser fell out of step and allocated and zero-filled 4 GiB.
    ("dicom-sl-short-value.dcm", "element (0028,0103) of VR SL has a length of 2 bytes, not a multiple of 4"),
    // JPEG2000.dcm with an item delimiter (FFFE,E00D) turned into (FFFE,000D) of length
    // 0xE0000000: dicom-parser read it as an element of that length and allocated 3.5 GiB.
    ("dicom-item-tag-length.dcm", "the tag (FFFE,000D) is not an item or a delimiter"),
];

/// One test, so no other test's allocations share the peak.
#[test]
fn every_finding_is_refused_by_name_without_a_large_allocation() {
    for (name, says) in FINDINGS {
        let bytes = data(&format!("fuzz/{name}"));
        let opts = DecodeOptions::default();
        let base = LIVE.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let results = [
            probe(&bytes, &opts).map(|_| ()),
            decode(&bytes, &opts).map(|_| ()),
            dicom_source(&bytes, 0).map(|_| ()),
        ];
        let peak = PEAK.load(Ordering::SeqCst) - base;
        assert!(peak < 16 << 20, "{name}: {} MiB allocated at once", peak >> 20);
        assert!(t.elapsed().as_secs() < 5, "{name}: {:?}", t.elapsed());
        for r in results {
            let e = r.expect_err(name).to_string();
            assert!(e.contains(says), "{name}: {e}");
        }
    }
}
