//! Everything the service does with an upload's bytes before the fit: the headers-only probe,
//! the decode (with the frame the probe says exists), the DICOM Segmentation's source reading
//! and the normalisation. Any panic (the decoders' own `catch_unwind` guard included: libFuzzer's
//! panic hook aborts first), hang, crash or broken invariant here is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use s3net_imaging::{decode, dicom_source, normalize, probe, DecodeOptions, Limits};

fuzz_target!(|bytes: &[u8]| {
    // Smaller limits than the service's, so that a header claiming a large image costs the
    // fuzzer milliseconds, not seconds; the checks are the same code.
    let limits = Limits { max_side: 4096, max_pixels: 4 << 20 };
    let opts = DecodeOptions { limits, frame: 0 };
    let header = probe(bytes, &opts);
    let decoded = decode(bytes, &opts);
    if let (Ok(h), Ok(d)) = (&header, &decoded) {
        // The probe promises what the decode gives: the queue's memory budget trusts it.
        assert!(u64::from(d.width) * u64::from(d.height) * u64::from(d.channels) * 4 <= h.image_bytes(),
            "probe said {h:?}, decode gave {}×{}×{}", d.width, d.height, d.channels);
    }
    if let Ok(d) = &decoded {
        assert_eq!(d.samples.len(), d.width as usize * d.height as usize * usize::from(d.channels));
        let image = normalize(d, None);
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)), "normalised values outside [0, 1]");
    }
    if let Ok(h) = &header {
        if h.frames > 1 {
            let _ = decode(bytes, &DecodeOptions { limits, frame: h.frames - 1 });
        }
    }
    let _ = dicom_source(bytes, 0);
});
