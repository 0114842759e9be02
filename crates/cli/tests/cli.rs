//! The `s3net` binary end to end on real test images: outputs, reports and clear failures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FAST: [&str; 6] = ["--iterations", "2", "--size", "32", "--features", "8"];

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(rel)
}

fn s3net(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_s3net")).args(args).output().expect("run s3net")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("s3net-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[1..4], b"PNG", "{} is not a PNG", path.display());
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

#[test]
fn segment_writes_labels_mask_and_report_at_original_size() {
    let out = tmpdir("segment");
    // The Exif JPEG is stored 96×72 and shown (and segmented) turned a quarter clockwise.
    let cases = [
        ("ph2/IMD002.png", "IMD002", (765, 572), 1),
        ("lung/ID_0000_Z_0142.png", "ID_0000_Z_0142", (512, 512), 1),
        ("dicom/CT_small.dcm", "CT_small", (128, 128), 1),
        ("raster/IMD002-exif6.jpg", "IMD002-exif6", (72, 96), 6),
    ];
    for (rel, stem, size, orientation) in cases {
        let img = data(rel);
        let mut args = vec!["segment", img.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu"];
        args.extend(FAST);
        let o = s3net(&args);
        assert!(o.status.success(), "{rel}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&out.join(format!("{stem}.labels.png"))), size);
        assert_eq!(png_size(&out.join(format!("{stem}.mask.png"))), size);
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("{stem}.json"))).unwrap()).unwrap();
        assert_eq!(report["iterations"], 2);
        assert_eq!(report["orientation"], orientation);
        // A DICOM's pixel spacing, and the mask's area in mm² with it; null for the others.
        if rel.ends_with(".dcm") {
            assert_eq!(report["pixel_spacing_mm"], serde_json::json!([0.661468, 0.661468]));
            assert!(report["foreground_area_mm2"].as_f64().unwrap() >= 0.0);
        } else {
            assert!(report["pixel_spacing_mm"].is_null() && report["foreground_area_mm2"].is_null(), "{rel}");
        }
        assert!(report["labels_used"].as_u64().unwrap() >= 1);
        assert_eq!(report["options"]["size"], 32);
        assert!(report["losses"]["total"].as_f64().unwrap().is_finite());
        // The service's result message, so the same keys as `s3net client segment` writes.
        assert!(report["refits"].as_u64().unwrap() <= 1, "{rel}: refits {}", report["refits"]);
        let clusters = report["clusters"].as_array().unwrap();
        let pixels: u64 = clusters.iter().map(|c| c["pixels"].as_u64().unwrap()).sum();
        assert_eq!(pixels, size.0 as u64 * size.1 as u64, "{rel}: the clusters cover the image");
        assert_eq!(report["timings"]["queued_seconds"], 0.0);
        assert_eq!(report["timings"]["fit_seconds"], report["fit_seconds"]);
        assert_eq!(report["options"]["size"], 32);
        // None of these has a window of its own.
        assert!(report["window"].is_null(), "{rel}: {}", report["window"]);
    }
    // The window applied is reported: a DICOM file's own with its function, or the one asked for.
    let img = data("dicom/DX_sigmoid.dcm");
    for (window, want) in [(None, (2000.0, 1500.0, "SIGMOID")), (Some("100,50"), (100.0, 50.0, "LINEAR"))] {
        let mut args = vec!["segment", img.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu"];
        args.extend(FAST);
        args.extend(window.map(|w| ["--window", w]).into_iter().flatten());
        let o = s3net(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("DX_sigmoid.json")).unwrap()).unwrap();
        assert_eq!(report["window"], serde_json::json!({"center": want.0, "width": want.1, "function": want.2}));
    }
}

/// `--frame` picks the page of a multi-page TIFF (here a 96×72 photo, then a 64×64 CT slice in
/// signed 32-bit Hounsfield units); past the last page it fails naming the page count.
/// A 16-bit grey PNG of a bright disk on a dark field: nothing dark lies inside anything, so
/// the foreground rule finds nothing whatever the clusters (as `crates/model/tests/fit.rs`'s).
fn bright_disk_png(side: u32) -> Vec<u8> {
    let values: Vec<u16> = (0..side * side)
        .map(|p| {
            let (fx, fy) = ((p % side) as f32 / side as f32 - 0.5, (p / side) as f32 / side as f32 - 0.5);
            let v = if fx * fx + fy * fy < 0.09 { 0.8 } else { 0.15 } + 0.04 * ((p * 7) % 5) as f32 / 5.0;
            (v * 65535.0) as u16
        })
        .collect();
    s3net_imaging::encode_grey_png16(side, side, &values)
}

/// An image whose foreground comes out empty is fitted again (see the README, "The foreground
/// rule"); its report's fit and total time are one measurement of the whole segmentation, both
/// fits, as the service reports a job's (before, the last fit's alone), and the summary line
/// says the same seconds.
#[test]
fn a_refitted_image_reports_the_time_of_both_fits() {
    let out = tmpdir("refit");
    let img = out.join("disk.png");
    std::fs::write(&img, bright_disk_png(40)).unwrap();
    let mut args = vec!["segment", img.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu"];
    args.extend(["--iterations", "4", "--size", "32", "--features", "8", "--min-labels", "0"]);
    let o = s3net(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("disk.json")).unwrap()).unwrap();
    assert_eq!(report["refits"], 1, "the disk's empty foreground is fitted again");
    assert_eq!(report["foreground_fraction"], 0.0);
    let seconds = report["timings"]["fit_seconds"].as_f64().unwrap();
    assert_eq!(report["timings"]["total_seconds"].as_f64(), Some(seconds));
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains(&format!("{seconds:.2} s on cpu")), "the summary line says {seconds:.2} s: {line}");
}

#[test]
fn frame_picks_a_tiff_page() {
    let out = tmpdir("frame");
    let tif = data("raster/two-pages.tif");
    for (frame, size) in [("0", (96, 72)), ("1", (64, 64))] {
        let mut args = vec!["segment", tif.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--frame", frame];
        args.extend(FAST);
        let o = s3net(&args);
        assert!(o.status.success(), "frame {frame}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&out.join("two-pages.mask.png")), size, "frame {frame}");
    }
    let o = s3net(&["segment", tif.to_str().unwrap(), "--out", out.to_str().unwrap(), "--frame", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("frame 2 was requested but the tiff file has 2 page(s)"), "{err}");
}

/// `--all-frames` fits every page of a TIFF and every frame of an enhanced CT, each written as
/// STEM.frameN.*, with a DICOM Segmentation per frame referencing that frame; a single-frame
/// file keeps its plain names; it cannot be combined with `--frame`.
#[test]
fn all_frames_segments_every_frame_and_page() {
    let out = tmpdir("all-frames");
    let (tif, ct, png) = (data("raster/two-pages.tif"), data("dicom/CT_small_enhanced_3frames.dcm"), data("ph2/IMD002.png"));
    let mut args = vec!["segment", tif.to_str().unwrap(), png.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--all-frames"];
    args.extend(FAST);
    let o = s3net(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("two-pages.tif frame 1 of 2:"), "{said}");
    assert_eq!(png_size(&out.join("two-pages.frame0.mask.png")), (96, 72));
    assert_eq!(png_size(&out.join("two-pages.frame1.mask.png")), (64, 64));
    assert!(out.join("IMD002.mask.png").is_file() && !out.join("two-pages.mask.png").exists());
    // The enhanced CT was made without a study and series, which a Segmentation must reference:
    // its frames are segmented, and the Segmentations refused, one error per frame.
    let mut args = vec!["segment", ct.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu", "--all-frames"];
    args.extend(FAST);
    let o = s3net(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in 0..3 {
        assert!(out.join(format!("CT_small_enhanced_3frames.frame{f}.labels.png")).is_file(), "frame {f}");
    }
    let mut args = vec!["segment", ct.to_str().unwrap(), "--out", out.to_str().unwrap(), "--all-frames", "--dicom-seg"];
    args.extend(FAST);
    let o = s3net(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.matches("Study Instance UID").count() == 3 && err.contains("3 of 3 fit(s) failed"), "{err}");
    let o = s3net(&["segment", tif.to_str().unwrap(), "--out", out.to_str().unwrap(), "--all-frames", "--frame", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot be used with"), "{err}");
}

#[test]
fn eval_writes_a_report_with_all_three_protocols() {
    let dir = tmpdir("eval");
    let (images, masks) = (dir.join("images"), dir.join("masks"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    std::fs::copy(data("ph2/IMD002.png"), images.join("IMD002.png")).unwrap();
    std::fs::copy(data("ph2/IMD002.mask.png"), masks.join("IMD002.png")).unwrap();
    let report = dir.join("report.json");
    let mut args = vec!["eval", "--images", images.to_str().unwrap(), "--masks", masks.to_str().unwrap(), "--report", report.to_str().unwrap(), "--device", "cpu"];
    args.extend(FAST);
    let o = s3net(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for p in ["paper", "oracle", "auto"] {
        for m in ["dsc", "hm", "xor"] {
            assert!(r["summary"][p][m].as_f64().is_some(), "summary.{p}.{m} missing");
        }
    }
    assert!(r["summary"]["full_resolution"]["auto"]["dsc"].as_f64().is_some());
    assert_eq!(r["images"].as_array().unwrap().len(), 1);
    assert!(r["fit_seconds_median"].as_f64().unwrap() > 0.0);
    assert_eq!(r["iterations_median"], 2.0);
}

/// A PNG whose header claims `w × h` pixels, followed by a truncated IDAT.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend(13u32.to_be_bytes());
    v.extend(&ihdr);
    v.extend(crc32(&ihdr).to_be_bytes());
    v.extend(100u32.to_be_bytes());
    v.extend(b"IDAT\x78\x9c");
    v
}

#[test]
fn bad_inputs_fail_clearly_with_a_non_zero_exit() {
    let dir = tmpdir("bad");
    let out = dir.join("out");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let huge = write("huge.png", &png_header(100_000, 100_000));
    let zero = write("zero.png", &png_header(0, 0));
    let noise = write("noise.bin", &(0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>());
    let empty = write("empty.png", b"");
    let jpeg = std::fs::read(data("raster/IMD002-progressive.jpg")).unwrap();
    let cut = write("cut.jpg", &jpeg[..jpeg.len() / 2]);
    let missing = dir.join("missing.png");
    let cases: [(&Path, &str); 6] =
        [(&huge, "100000"), (&zero, "zero"), (&noise, "format"), (&empty, "empty"), (&cut, "incomplete"), (&missing, "cannot read")];
    for (path, word) in cases {
        let o = s3net(&["segment", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--iterations", "1"]);
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!o.status.success(), "{} should fail", path.display());
        assert!(err.contains(word), "{}: stderr should mention '{word}': {err}", path.display());
        assert!(!err.contains("panicked"), "{}: {err}", path.display());
    }
    let img = data("ph2/IMD002.png");
    for (flag, value, word) in [("--window", "abc", "window"), ("--preset", "fast", "preset"), ("--device", "tpu", "device"), ("--iterations", "0", "iterations")] {
        let o = s3net(&["segment", img.to_str().unwrap(), "--out", out.to_str().unwrap(), flag, value]);
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(!o.status.success(), "{flag} {value} should fail");
        assert!(err.contains(word), "{flag} {value}: {err}");
    }
}

/// `bench fit --trace` writes libtorch's operator-level trace of a batch's steps (here on the
/// CPU: every aten op with its shapes), and `scripts/trace-summary.py` adds it up per op.
#[test]
fn bench_fit_writes_an_operator_trace() {
    let dir = tmpdir("trace");
    let trace = dir.join("trace.json");
    let o = s3net(&["bench", "fit", "--repeats", "1", "--batch", "2", "--batch-only", "--trace", trace.to_str().unwrap(), "--trace-from", "1", "--iterations", "5", "--size", "32", "--features", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).expect("the trace was written")).expect("the trace is JSON");
    let ops: Vec<&str> = t["traceEvents"].as_array().unwrap().iter().filter(|e| e["cat"] == "cpu_op").filter_map(|e| e["name"].as_str()).collect();
    // A libtorch op's backward (the stem's convolution), one of our ops' autograd nodes (the
    // CPU BatchNorm, ours since 2026-11-27), the SGD update's multi-tensor op, and our ops' own
    // scopes (RECORD_FUNCTION in their C entry points, `csrc/<op>.cpp`), which a GPU trace charges their forward kernels to.
    let ours = ["s3net::plane_norm", "s3net::depthwise_branches", "s3net::deform_conv2d", "s3net::pointwise_conv2d", "s3net::pixel_losses", "s3net::sgd_step"];
    for name in ["aten::convolution_backward", "torch::autograd::CppNode<s3ops::(anonymous namespace)::PlaneNormFn>", "aten::_foreach_add_"].into_iter().chain(ours) {
        assert!(ops.contains(&name), "{name} missing from the trace's {} ops", ops.len());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/trace-summary.py");
    // Which ops rank first depends on the machine's timing (a clean-clone CI run once ranked
    // four forward ops and a GELU above every backward op), so the top 5 is only counted, and
    // the backward op's autograd node is looked for in the whole list.
    let summary = |top: &str| {
        let s = Command::new("python3").arg(&script).arg(&trace).arg("--top").arg(top).output()?;
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&s.stdout).into_owned())
    };
    match summary("5") {
        Ok(text) => {
            assert!(text.starts_with("# CPU self time of each op"), "{text}");
            assert_eq!(text.lines().filter(|l| l.contains("% ") && l.contains(" us  n=")).count(), 5, "{text}");
            let all = summary("1000").expect("python3 ran once already");
            assert!(all.contains("aten::convolution_backward  [ConvolutionBackward0]"), "{all}");
        }
        Err(e) => eprintln!("no python3 ({e}): trace-summary.py not run"),
    }
}

/// `bench losses` times the fused loss terms and libtorch's on a small map: both present,
/// positive, in the JSON object `make bench` reads.
#[test]
fn bench_losses_reports_both_implementations() {
    let o = s3net(&["bench", "losses", "--size", "32", "--channels", "8", "--repeats", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for terms in ["response_terms", "moved_ce"] {
        for which in ["fused", "libtorch"] {
            for key in ["forward_ms", "forward_backward_ms"] {
                let t = v[terms][which][key].as_f64().unwrap_or_else(|| panic!("{terms}.{which}.{key} in {v}"));
                assert!(t > 0.0, "{terms}.{which}.{key} = {t}");
            }
        }
    }
    assert_eq!(v["shape"]["input"], serde_json::json!([1, 8, 32, 32]));
}

#[test]
fn serve_takes_the_global_threads_flag() {
    // `s3net --threads 1 serve …` (the flag every subcommand takes) sets the server's libtorch
    // threads; it used to be overridden by workers.torch_threads' default, cores / workers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_s3net"))
        .args(["--threads", "1", "serve", "--metrics-listen", "", "--cpu-workers", "1"])
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    while !log.contains("s3net serving") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
    }
    // The client reaches it by a bare HOST:PORT, as the Python client and the bridge take
    // it, given as --addr or in $S3NET_ADDR (SERVING, or NOT_SERVING while the worker warms
    // up: either way it connected).
    let bare = format!("127.0.0.1:{port}");
    let health = [
        Command::new(env!("CARGO_BIN_EXE_s3net")).args(["client", "health", "--addr", &bare]).env_remove("S3NET_ADDR").output(),
        Command::new(env!("CARGO_BIN_EXE_s3net")).args(["client", "health"]).env("S3NET_ADDR", &bare).output(),
    ];
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("torch_threads=1"), "{log}");
    for out in health {
        let out = out.unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("SERVING"), "{said}");
    }
}

#[test]
fn serve_prints_its_effective_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_s3net"))
        .args(["serve", "--print-config", "--gpu-batch", "4"])
        .env("S3NET__SERVER__MAX_CONNECTIONS", "7")
        .env("S3NET__SERVER__AUTH_TOKEN", "secret-token")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("max_connections = 7") && text.contains("gpu_batch = 4"), "{text}");
    assert!(!text.contains("secret-token") && text.contains("auth_token = \"<redacted>\""), "{text}");
    // An invalid setting is named, with a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_s3net"))
        .args(["serve", "--print-config"])
        .env("S3NET__SERVER__MAX_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.max_connections"), "{:?}", out);
}
