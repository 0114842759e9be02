//! End-to-end tests of the gRPC service: real server on 127.0.0.1:0, real tonic client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use s3net_server::pb::{self, job_event::Event, JobState};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_for_each_format() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let grey =
        image::DynamicImage::ImageLuma8(image::load_from_memory(&disk(40, 30)).unwrap().to_luma8());
    let rgb = image::DynamicImage::ImageRgb8(grey.to_rgb8());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("png", disk(40, 30)),
        ("jpeg", encode(rgb.clone(), image::ImageFormat::Jpeg)),
        ("bmp", encode(rgb.clone(), image::ImageFormat::Bmp)),
        ("tiff", encode(grey.clone(), image::ImageFormat::Tiff)),
        ("ph2", data("ph2/IMD002.png")),
        ("lung16", data("lung/ID_0000_Z_0142.png")),
        ("ct", data("dicom/CT_small.dcm")),
        ("mr", data("dicom/MR_small.dcm")),
        ("rgb-jpeg-dicom", data("dicom/SC_rgb_jpeg_dcmtk.dcm")),
        // Compressed as PACS archives often store them (GDCM, tools/make_dicom_codecs.py).
        ("ct-jpeg-2000", data("dicom/CT_small_j2k.dcm")),
        ("ct-jpeg-lossless", data("dicom/CT_small_jpeg_lossless.dcm")),
        // JPEG XL Lossless (libjxl), the newest transfer syntax.
        ("ct-jpeg-xl", data("dicom/CT_small_jxl.dcm")),
        // Deflated Explicit VR Little Endian (DCMTK's dcmconv +td).
        ("ct-deflated", data("dicom/CT_small_deflated.dcm")),
        // 12-bit lossy JPEG (JPEG Extended, process 4), as older archives hold CT.
        ("ct-jpeg-12-bit", data("dicom/CT_small_jpeg12_2frames.dcm")),
        ("rgb-rle-dicom", data("dicom/SC_rgb_rle.dcm")),
        ("ybr-422-dicom", data("dicom/SC_ybr_full_422_uncompressed.dcm")),
        ("ultrasound-palette", data("dicom/US_palette.dcm")),
        ("ultrasound-segmented-palette", data("dicom/US_segmented_palette.dcm")),
        ("enhanced-ct-frame-0", data("dicom/CT_small_enhanced_3frames.dcm")),
        // X-rays windowed as their files say: a VOI LUT Sequence's curve, a sigmoid.
        ("x-ray-voi-table", data("dicom/DX_voi_lut.dcm")),
        ("x-ray-voi-sigmoid", data("dicom/DX_sigmoid.dcm")),
        // Stored 96×72 with Exif orientation 6: segmented as shown, 72×96.
        ("exif-jpeg", data("raster/IMD002-exif6.jpg")),
        // Page 0 of a two-page TIFF (its page 1, signed 32-bit HU, is `frame: 1` below).
        ("tiff-page-0", data("raster/two-pages.tif")),
    ];
    for (name, bytes) in cases {
        let want = s3net_imaging::decode(&bytes, &Default::default()).unwrap();
        let r = completed(&segment_events(&mut c, bytes, quick()).await);
        assert_eq!((r.width, r.height), (want.width, want.height), "{name}");
        let labels = s3net_imaging::decode(&r.labels_png, &Default::default()).unwrap();
        assert_eq!(
            (labels.width, labels.height),
            (want.width, want.height),
            "{name}"
        );
        let (mw, mh, mask) = s3net_imaging::decode_mask(&r.mask_png).unwrap();
        assert_eq!((mw, mh), (want.width, want.height), "{name}");
        let fg = mask.iter().filter(|&&m| m).count() as f64 / mask.len() as f64;
        assert!((fg - r.foreground_fraction).abs() < 1e-9, "{name}");
        assert!(
            r.labels_used >= 1 && r.labels_used <= 8,
            "{name}: {} labels",
            r.labels_used
        );
        assert_eq!(r.clusters.len() as u32, r.labels_used, "{name}");
        let pixels: u64 = r.clusters.iter().map(|c| c.pixel_count).sum();
        assert_eq!(pixels, want.width as u64 * want.height as u64, "{name}");
        for cl in &r.clusters {
            let b = cl.bbox.unwrap();
            assert!(
                b.x + b.width <= want.width && b.y + b.height <= want.height,
                "{name}"
            );
            assert!((0.0..=1.0).contains(&cl.mean_intensity), "{name}");
        }
        let o = r.options.unwrap();
        assert_eq!(
            (o.iterations, o.size, o.features, o.preset.as_str()),
            (3, 32, 8, "default"),
            "{name}"
        );
        assert!(r.iterations >= 1 && r.iterations <= 3);
        let t = r.timings.unwrap();
        assert!(
            t.total_seconds >= t.fit_seconds && t.fit_seconds > 0.0,
            "{name}"
        );
        assert_eq!(r.device, "cpu");
        // The file's own window (DICOM), when it has one, is the one applied and reported.
        let want_window = want
            .window
            .filter(|w| w.is_valid())
            .map(|w| (w.center, w.width));
        assert_eq!(o.window.map(|w| (w.center, w.width)), want_window, "{name}");
        let want_function = want.given_window(None).map_or("", |(_, f)| f.name());
        assert_eq!(o.window_function, want_function, "{name}");
        match name {
            "x-ray-voi-table" => assert_eq!(want_function, "TABLE"),
            "x-ray-voi-sigmoid" => assert_eq!(want_function, "SIGMOID"),
            "mr" => assert_eq!(want_function, "LINEAR"),
            "ct" | "ph2" => assert_eq!(want_function, ""),
            _ => {}
        }
        assert_eq!(o.orientation, u32::from(want.orientation), "{name}");
        // The file's pixel spacing, and the mask's area with it; neither for other formats.
        let spacing = want.dicom.as_ref().and_then(|d| d.pixel_spacing_mm);
        assert_eq!(r.pixel_spacing.map(|s| [s.row_mm, s.column_mm]), spacing, "{name}");
        let fg_pixels = mask.iter().filter(|&&m| m).count() as f64;
        assert_eq!(r.foreground_area_mm2, spacing.map(|[a, b]| fg_pixels * a * b), "{name}");
        if name == "ct" {
            assert_eq!(spacing, Some([0.661468, 0.661468]));
        }
        if name == "exif-jpeg" {
            assert_eq!((r.width, r.height, o.orientation), (72, 96, 6));
        }
    }
    // `frame` picks a TIFF's page: page 1 is a 64×64 CT slice in signed 32-bit HU.
    let page1 = pb::Options { frame: 1, ..quick() };
    let r = completed(&segment_events(&mut c, data("raster/two-pages.tif"), page1).await);
    assert_eq!((r.width, r.height), (64, 64));
    server.shutdown().await.unwrap();
}

/// A CT stored compressed, losslessly (JPEG 2000, HTJ2K, JPEG lossless, JPEG-LS, RLE), is the same image: with
/// the same seed its fit gives the labels and the mask of the uncompressed file, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losslessly_compressed_ct_segments_like_its_source() {
    let (_s, url) = start(config()).await;
    let mut c = client(&url).await;
    let o = pb::Options { seed: Some(11), iterations: Some(5), size: Some(64), ..quick() };
    let source = completed(&segment_events(&mut c, data("dicom/CT_small.dcm"), o.clone()).await);
    for name in ["CT_small_j2k", "CT_small_htj2k", "CT_small_jpeg_lossless", "CT_small_jpegls", "CT_small_rle"] {
        let r = completed(&segment_events(&mut c, data(&format!("dicom/{name}.dcm")), o.clone()).await);
        assert!(r.labels_png == source.labels_png && r.mask_png == source.mask_png, "{name}");
        assert_eq!(r.foreground_area_mm2.map(|a| a.round()), source.foreground_area_mm2.map(|a| a.round()), "{name}");
    }
}

/// `dicom_seg`: the mask also comes back as a DICOM Segmentation of the source, which this
/// crate's decoder reads back as the mask PNG's pixels; not asked, not sent, nor in ListJobs;
/// asked of an image it cannot reference, refused by name before anything is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dicom_input_comes_back_as_a_segmentation_for_its_pacs() {
    use dicom_dictionary_std::tags;
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let seg = pb::Options { dicom_seg: true, ..quick() };
    for name in ["CT_small", "CT_small_jpegls", "SC_rgb_rle", "US_palette"] {
        let r = completed(&segment_events(&mut c, data(&format!("dicom/{name}.dcm")), seg.clone()).await);
        let (w, h, mask) = s3net_imaging::decode_mask(&r.mask_png).unwrap();
        let back = s3net_imaging::decode(&r.mask_dicom, &Default::default()).unwrap();
        assert_eq!((back.width, back.height), (w, h), "{name}");
        assert_eq!(back.samples.iter().map(|&v| v > 0.0).collect::<Vec<_>>(), mask, "{name}");
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Never)
            .from_reader(&r.mask_dicom[128..])
            .unwrap();
        let text = |tag| obj.element(tag).unwrap().to_str().unwrap().trim_end_matches('\0').to_string();
        assert_eq!(text(tags::SOP_CLASS_UID), s3net_imaging::SEGMENTATION_SOP_CLASS, "{name}");
        // The fit's options are recorded with the algorithm.
        let options = r.options.as_ref().unwrap().options_json.clone();
        let segment = &obj.element(tags::SEGMENT_SEQUENCE).unwrap().items().unwrap()[0];
        let algorithm = &segment.element(tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE).unwrap().items().unwrap()[0];
        assert_eq!(algorithm.element(tags::ALGORITHM_PARAMETERS).unwrap().to_str().unwrap().trim_end(), options.trim_end(), "{name}");
    }
    // Not asked: not sent.
    let r = completed(&segment_events(&mut c, data("dicom/CT_small.dcm"), quick()).await);
    assert!(r.mask_dicom.is_empty() && r.labels_dicom.is_empty());
    // The clusters: one frame per cluster, each the label map's pixels of its label.
    let clusters = pb::Options { dicom_seg_clusters: true, ..quick() };
    let r = completed(&segment_events(&mut c, data("dicom/CT_small.dcm"), clusters).await);
    assert!(r.mask_dicom.is_empty());
    let labels = s3net_imaging::decode(&r.labels_png, &Default::default()).unwrap();
    for label in 0..r.labels_used {
        let frame = s3net_imaging::decode(&r.labels_dicom, &s3net_imaging::DecodeOptions { frame: label, ..Default::default() }).unwrap();
        let want: Vec<bool> = labels.samples.iter().map(|&v| v == label as f32).collect();
        assert_eq!(frame.samples.iter().map(|&v| v > 0.0).collect::<Vec<_>>(), want, "cluster {label}");
    }
    // Kept with the job for GetJob; left out of ListJobs, as the PNGs are.
    let id = submit(&mut c, data("dicom/MR_small.dcm"), seg.clone()).await;
    let job = wait_final(&mut c, &id, Duration::from_secs(60)).await;
    assert!(!job.result.unwrap().mask_dicom.is_empty());
    let listed = c.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(listed.iter().filter_map(|j| j.result.as_ref()).all(|r| r.mask_dicom.is_empty() && r.labels_dicom.is_empty() && r.mask_png.is_empty()));
    // Refused by name: a PNG, a DICOM file without the UIDs to reference.
    let err = c.segment(pb::SegmentRequest { image: disk(32, 32), options: Some(seg.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("DICOM Segmentation") && err.message().contains("PNG"), "{err:?}");
    let enhanced = pb::Options { frame: 2, ..seg.clone() };
    let err = c.segment(pb::SegmentRequest { image: data("dicom/CT_small_enhanced_3frames.dcm"), options: Some(enhanced) }).await.unwrap_err();
    assert!(err.code() == Code::InvalidArgument && err.message().contains("no Study Instance UID"), "{err:?}");
    let mut no_uid = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(&data("dicom/CT_small.dcm")[128..])
        .unwrap();
    no_uid.remove_element(tags::SERIES_INSTANCE_UID);
    let mut bytes = Vec::new();
    no_uid.write_all(&mut bytes).unwrap();
    let err = c.submit_job(pb::SubmitJobRequest { image: bytes.clone(), options: Some(seg.clone()), idempotency_key: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("Series Instance UID") && !err.message().contains("CompressedSamples"), "{err:?}");
    // Without dicom_seg the same file is fine; an idempotency key tells the two requests apart.
    let keyed = |dicom_seg| pb::SubmitJobRequest {
        image: data("dicom/CT_small.dcm"),
        options: Some(pb::Options { dicom_seg, ..quick() }),
        idempotency_key: "seg-or-not".into(),
    };
    c.submit_job(keyed(false)).await.unwrap();
    let err = c.submit_job(keyed(true)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let events = segment_events(
        &mut c,
        disk(32, 32),
        pb::Options {
            iterations: Some(4),
            ..quick()
        },
    )
    .await;
    assert!(matches!(events[0], Event::Queued(_)), "{events:?}");
    assert!(
        matches!(&events[1], Event::Started(s) if s.worker == "cpu-0" && s.device == "cpu"),
        "{events:?}"
    );
    let steps: Vec<u32> = events[2..events.len() - 1]
        .iter()
        .map(|e| match e {
            Event::Progress(p) => {
                assert_eq!(p.max_iterations, 4);
                assert!(p.losses.unwrap().total.is_finite());
                p.iteration
            }
            other => panic!("expected Progress, got {other:?}"),
        })
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );
    completed(&events);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_upload_in_chunks() {
    use pb::upload_chunk::Part;
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let image = data("dicom/CT_small.dcm");
    let mut chunks = vec![pb::UploadChunk {
        part: Some(Part::Header(pb::UploadHeader {
            options: Some(quick()),
            total_bytes: image.len() as u64,
        })),
    }];
    chunks.extend(image.chunks(1000).map(|b| pb::UploadChunk {
        part: Some(Part::Data(b.to_vec())),
    }));
    let mut s = c
        .segment_upload(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    let last = last_event(&mut s).await;
    let Some(Event::Completed(done)) = last else {
        panic!("{last:?}")
    };
    assert_eq!(done.result.unwrap().width, 128);

    // Data before the header is refused.
    let bad = vec![pb::UploadChunk {
        part: Some(Part::Data(image[..100].to_vec())),
    }];
    let err = c.segment_upload(tokio_stream::iter(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("header"), "{}", err.message());
    server.shutdown().await.unwrap();
}

/// SegmentUpload calls together hold at most `server.max_upload_bytes_in_flight`: a call that
/// announces more than is left, or whose chunks grow past it, is RESOURCE_EXHAUSTED; the bytes
/// come back when a call's image has been taken in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_flight_are_bounded() {
    use pb::upload_chunk::Part;
    let mut cfg = config();
    cfg.server.max_upload_bytes = 64 << 10;
    cfg.server.max_message_bytes = 32 << 10;
    cfg.server.max_upload_bytes_in_flight = 100 << 10;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let image = data("dicom/CT_small.dcm"); // 39 kB
    let header = |total: usize| pb::UploadChunk {
        part: Some(Part::Header(pb::UploadHeader { options: Some(quick()), total_bytes: total as u64 })),
    };
    let chunk = |b: &[u8]| pb::UploadChunk { part: Some(Part::Data(b.to_vec())) };
    let whole = |total: usize| {
        let mut v = vec![header(total)];
        v.extend(image.chunks(1000).map(chunk));
        v
    };

    // A announces 64 KiB and sends its first kilobyte, then waits: it holds 64 of the 100 KiB.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(header(64 << 10)).await.unwrap();
    tx.send(chunk(&image[..1000])).await.unwrap();
    let mut a = c.clone();
    let a = tokio::spawn(async move { a.segment_upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // B announces its 39 kB: more than the 35 KiB left. (What is held then also counts B's
    // chunks that have arrived behind its header, however many that is.)
    let err = c.segment_upload(tokio_stream::iter(whole(image.len()))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().starts_with("uploads in progress hold "), "{}", err.message());
    assert!(err.message().contains(" KiB of the 100 KiB the server allows (server.max_upload_bytes_in_flight)"), "{}", err.message());
    assert!(err.metadata().get("retry-after").is_some());
    // C does not announce a size: refused when its chunks pass what is left.
    let err = c.segment_upload(tokio_stream::iter(whole(0))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // A sends the rest and completes; then B's upload is taken.
    for b in image[1000..].chunks(1000) {
        tx.send(chunk(b)).await.unwrap();
    }
    drop(tx);
    let mut events = a.await.unwrap().expect("A's upload is taken").into_inner();
    while events.message().await.unwrap().is_some() {}
    let mut events = c.segment_upload(tokio_stream::iter(whole(image.len()))).await.expect("room again").into_inner();
    let last = last_event(&mut events).await;
    assert!(matches!(last, Some(Event::Completed(_))), "{last:?}");
    // Small chunks of an unannounced upload hold what they add up to, not a KiB each (39 kB in
    // 100-byte pieces would otherwise claim 390 KiB).
    let mut small = vec![header(0)];
    small.extend(image.chunks(100).map(chunk));
    let mut events = c.segment_upload(tokio_stream::iter(small)).await.expect("fits").into_inner();
    while events.message().await.unwrap().is_some() {}
    server.shutdown().await.unwrap();
}

/// An upload that stops sending with its connection open (a hung client: its HTTP/2 layer
/// still answers pings) is dropped after `server.request_idle_timeout_s`, and the bytes it held
/// come back; one that keeps sending is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_dropped_and_gives_its_bytes_back() {
    use pb::upload_chunk::Part;
    let mut cfg = config();
    cfg.server.request_idle_timeout_s = 1;
    let (server, url) = start(cfg).await;
    let metrics = server.metrics_addr().unwrap();
    let mut c = client(&url).await;
    let image = data("dicom/CT_small.dcm");
    let header = pb::UploadChunk {
        part: Some(Part::Header(pb::UploadHeader { options: Some(quick()), total_bytes: image.len() as u64 })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header.clone()).await.unwrap();
    tx.send(pb::UploadChunk { part: Some(Part::Data(image[..1000].to_vec())) }).await.unwrap();
    let started = std::time::Instant::now();
    let mut stalled = c.clone();
    let call = tokio::spawn(async move { stalled.segment_upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(value(&scrape(metrics).await, "s3net_upload_memory_bytes") >= image.len() as f64);
    let err = call.await.unwrap().expect_err("stalled");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        err.message(),
        "no bytes of the request arrived for 1 s (server.request_idle_timeout_s): it was dropped and what it held given back"
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    let m = scrape(metrics).await;
    assert_series(&m, &[("s3net_upload_memory_bytes", 0.0), ("s3net_rejected_total{reason=\"stalled\"}", 1.0)]);
    drop(tx);

    // Chunks 0.4 s apart for 2 s in all: slow, never idle for 1 s; completes.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header).await.unwrap();
    let mut slow = c.clone();
    let call = tokio::spawn(async move { slow.segment_upload(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    for piece in image.chunks(image.len().div_ceil(5)) {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        tx.send(pb::UploadChunk { part: Some(Part::Data(piece.to_vec())) }).await.unwrap();
    }
    drop(tx);
    let mut events = call.await.unwrap().expect("taken").into_inner();
    let last = last_event(&mut events).await;
    assert!(matches!(last, Some(Event::Completed(_))), "{last:?}");
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_job_joining_late_replays_then_follows() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    // Join a running job: the replay starts with Started and the stream ends with the outcome.
    let id = submit_running(
        &mut c,
        disk(32, 32),
        pb::Options {
            iterations: Some(60),
            ..slow()
        },
    )
    .await;
    let mut w = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = w.message().await.unwrap() {
        assert_eq!(e.job_id, id);
        events.push(e.event.unwrap());
    }
    assert!(matches!(events[0], Event::Started(_)), "{:?}", events[0]);
    assert!(matches!(events[1], Event::Progress(_)));
    let r = completed(&events);
    assert_eq!(r.width, 32);

    // Join a finished job: the replay alone, ending with Completed.
    let mut w = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = w.message().await.unwrap() {
        events.push(e.event.unwrap());
    }
    assert_eq!(events.len(), 3, "{events:?}");
    completed(&events);

    let j = c
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Completed as i32);
    assert_eq!(j.result.unwrap().width, 32);
    let list = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list
        .jobs
        .iter()
        .any(|j| j.job_id == id && j.result.as_ref().is_some_and(|r| r.labels_png.is_empty())));
    let err = c
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("unknown job"), "{}", err.message());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let submit = |image: Vec<u8>, key: &str| pb::SubmitJobRequest {
        image,
        options: Some(quick()),
        idempotency_key: key.into(),
    };
    let a = c
        .submit_job(submit(disk(30, 30), "k1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!a.existing);
    let b = c
        .submit_job(submit(disk(30, 30), "k1"))
        .await
        .unwrap()
        .into_inner();
    assert!(b.existing);
    assert_eq!(a.job_id, b.job_id);
    let err = c.submit_job(submit(disk(31, 30), "k1")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&a.job_id), "{}", err.message());
    // Another key is another job.
    let d = c
        .submit_job(submit(disk(30, 30), "k2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(d.job_id, a.job_id);
    // A finished job still answers to its key.
    wait_final(&mut c, &a.job_id, Duration::from_secs(30)).await;
    let e = c
        .submit_job(submit(disk(30, 30), "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (e.job_id.as_str(), e.existing, e.state),
        (a.job_id.as_str(), true, JobState::Completed as i32)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_job_frees_the_worker() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let id = submit_running(&mut c, disk(48, 48), slow()).await;
    let t = Instant::now();
    let state = c
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .state;
    assert_eq!(state, JobState::Running as i32);
    let j = wait_final(&mut c, &id, Duration::from_secs(10)).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    let why = j.cancellation.unwrap();
    assert_eq!((why.reason.as_str(), why.retryable), ("cancelled by CancelJob", false), "the caller's cancel: not to be sent again");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Watching the cancelled job ends with Cancelled.
    let mut w = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let last = last_event(&mut w).await;
    assert!(matches!(last, Some(Event::Cancelled(_))), "{last:?}");
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_worker() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let (s, id) = segment_running(&mut c, disk(48, 48), slow()).await;
    drop(s);
    let j = wait_final(&mut c, &id, Duration::from_secs(10)).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    assert_eq!(j.cancellation.map(|c| (c.reason, c.retryable)), Some(("client disconnected".into(), false)));
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

/// A TCP proxy to `target` that forwards both ways until `freeze` is set, then forwards
/// nothing and closes nothing: a client whose machine lost power or network.
async fn freezing_proxy(target: std::net::SocketAddr, freeze: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w) in [(Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>, Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>), (Box::new(ro), Box::new(wi))] {
                let freeze = freeze.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    let mut held = Vec::new();
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if freeze.load(Ordering::SeqCst) {
                            held.push((r, w)); // keep both ends open, forward nothing
                            std::future::pending::<()>().await;
                            unreachable!();
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    addr
}

/// A client that vanishes without closing its connection (no FIN, no RST) is found by the
/// server's HTTP/2 pings: its connection is closed after `keepalive_timeout_s` and the job its
/// `Segment` stream owned is cancelled, instead of running on for a client that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_found_by_keepalive() {
    let mut cfg = config();
    cfg.server.keepalive_interval_s = 1;
    cfg.server.keepalive_timeout_s = 1;
    let (server, url) = start(cfg).await;
    let freeze = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = freezing_proxy(server.local_addr(), freeze.clone()).await;
    let mut far = client(&format!("http://{proxy}")).await;
    let (s, id) = segment_running(&mut far, disk(48, 48), slow()).await;
    freeze.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut c = client(&url).await;
    let j = wait_final(&mut c, &id, Duration::from_secs(20)).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    assert_eq!(j.cancellation.unwrap().reason, "client disconnected");
    drop(s);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_while_queued_cancels_the_job() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let mut s = c
        .segment(pb::SegmentRequest {
            image: disk(32, 32),
            options: Some(quick()),
        })
        .await
        .unwrap()
        .into_inner();
    let e = s.message().await.unwrap().unwrap();
    assert!(
        matches!(e.event, Some(Event::Queued(pb::Queued { position: 0 }))),
        "{e:?}"
    );
    drop(s);
    let j = wait_final(&mut c, &e.job_id, Duration::from_secs(10)).await;
    assert_eq!(
        (j.state, j.started_at),
        (JobState::Cancelled as i32, 0.0),
        "cancelled before it ran"
    );
    assert_eq!(j.cancellation.unwrap().reason, "client disconnected");
    c.cancel_job(pb::CancelJobRequest { job_id: running })
        .await
        .unwrap();
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_frees_the_worker() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let mut req = tonic::Request::new(pb::SegmentRequest {
        image: disk(48, 48),
        options: Some(slow()),
    });
    req.set_timeout(Duration::from_millis(700));
    let t = Instant::now();
    let mut s = c.segment(req).await.unwrap().into_inner();
    let mut id = String::new();
    let err = loop {
        match s.message().await {
            Ok(Some(e)) => id = e.job_id,
            Ok(None) => panic!("stream ended without the deadline"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let j = wait_final(&mut c, &id, Duration::from_secs(10)).await;
    assert_eq!(j.state, JobState::Cancelled as i32);
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted_at_once() {
    let mut cfg = config();
    cfg.queue.capacity = 1;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let submit = || pb::SubmitJobRequest {
        image: disk(32, 32),
        options: Some(quick()),
        idempotency_key: String::new(),
    };
    let queued = c.submit_job(submit()).await.unwrap().into_inner();
    assert_eq!(
        (queued.state, queued.queue_position),
        (JobState::Queued as i32, 0)
    );
    let t = Instant::now();
    let err = c.submit_job(submit()).await.unwrap_err();
    // At once, not once the running job (1000 steps: far longer) has made room.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry in"), "{}", err.message());
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // Segment is refused the same way.
    let err = c
        .segment(pb::SegmentRequest {
            image: disk(32, 32),
            options: Some(quick()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Cancelling the queued job makes room; cancelling the running one lets it run.
    c.cancel_job(pb::CancelJobRequest {
        job_id: queued.job_id.clone(),
    })
    .await
    .unwrap();
    let j = c
        .get_job(pb::GetJobRequest {
            job_id: queued.job_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state, JobState::Cancelled as i32);
    c.cancel_job(pb::CancelJobRequest { job_id: running })
        .await
        .unwrap();
    quick_job_completes(&mut c).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_invalid_argument_while_a_job_carries_on() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let id = submit_running(
        &mut c,
        disk(32, 32),
        pb::Options {
            iterations: Some(80),
            ..slow()
        },
    )
    .await;

    let png = disk(32, 32);
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    huge.extend(13u32.to_be_bytes());
    huge.extend(&ihdr);
    huge.extend(crc32(&ihdr).to_be_bytes());
    huge.extend([0u8; 64]);
    let jpeg = data("raster/IMD002-progressive.jpg");
    let ct = data("dicom/CT_small.dcm");
    let at = ct
        .windows(4)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .unwrap();
    let mut noise = vec![0u8; 5000];
    let mut x = 12345u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let cases: Vec<(&str, Vec<u8>, pb::Options, &str)> = vec![
        ("empty", vec![], quick(), "empty"),
        (
            "truncated png",
            png[..png.len() / 2].to_vec(),
            quick(),
            "png",
        ),
        ("huge png", huge, quick(), "100000×100000"),
        (
            "tiff page past the last",
            data("raster/two-pages.tif"),
            pb::Options { frame: 2, ..quick() },
            "the tiff file has 2 page(s)",
        ),
        (
            "truncated jpeg",
            jpeg[..jpeg.len() * 3 / 4].to_vec(),
            quick(),
            "jpeg data: the file is incomplete",
        ),
        ("random bytes", noise, quick(), "unrecognised image format"),
        (
            "dicom without pixels",
            ct[..at].to_vec(),
            quick(),
            "no pixel data",
        ),
        (
            "unknown preset",
            png.clone(),
            pb::Options {
                preset: "fastest".into(),
                ..quick()
            },
            "unknown preset 'fastest'",
        ),
        (
            "zero iterations",
            png.clone(),
            pb::Options {
                iterations: Some(0),
                ..quick()
            },
            "iterations must be",
        ),
        (
            "bad window",
            png.clone(),
            pb::Options {
                window: Some(pb::Window {
                    center: 0.0,
                    width: -1.0,
                }),
                ..quick()
            },
            "width",
        ),
        (
            "unknown precision",
            png.clone(),
            pb::Options {
                precision: "fp8".into(),
                ..quick()
            },
            "unknown precision 'fp8'",
        ),
        (
            "unknown device",
            png.clone(),
            pb::Options {
                device: "tpu".into(),
                ..quick()
            },
            "unknown device",
        ),
        (
            "absent gpu",
            png.clone(),
            pb::Options {
                device: "cuda:7".into(),
                ..quick()
            },
            "cuda:7",
        ),
        (
            "frame out of range",
            data("dicom/CT_small.dcm"),
            pb::Options {
                frame: 3,
                ..quick()
            },
            "frame 3",
        ),
    ];
    for (name, image, options, needle) in cases {
        let err = c
            .segment(pb::SegmentRequest {
                image: image.clone(),
                options: Some(options.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{name}: {:?} lacks {needle:?}",
            err.message()
        );
        let err = try_submit(&mut c, image, options).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name} (submit): {err:?}"
        );
    }
    let j = wait_final(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(j.state, JobState::Completed as i32);
    server.shutdown().await.unwrap();
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_get_their_own_results() {
    let mut cfg = config();
    cfg.workers.cpu_workers = Some(2);
    let (server, url) = start(cfg).await;
    let tasks: Vec<_> = (0..32u32)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut c = client(&url).await;
                let (w, h) = (20 + i, 52 - i);
                let events = segment_events(
                    &mut c,
                    disk(w, h),
                    pb::Options {
                        iterations: Some(2),
                        seed: Some(i as u64),
                        ..quick()
                    },
                )
                .await;
                let r = completed(&events);
                assert_eq!((r.width, r.height), (w, h), "client {i}");
                assert_eq!(r.options.unwrap().seed, i as u64);
                let id = match &events[0] {
                    Event::Queued(_) => "queued",
                    _ => "",
                };
                assert_eq!(id, "queued");
                r.width
            })
        })
        .collect();
    let mut widths = Vec::new();
    for t in tasks {
        widths.push(t.await.unwrap());
    }
    widths.sort();
    assert_eq!(widths, (20..52).collect::<Vec<_>>());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_then_cancels() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut cfg = config();
    cfg.server.shutdown_grace_s = 1;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status,
        1
    );
    assert_eq!(
        health
            .check(check("s3net.v1.Segmenter"))
            .await
            .unwrap()
            .into_inner()
            .status,
        1
    );

    let id = submit_running(&mut c, disk(48, 48), slow()).await;
    let mut w = c
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let t = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    // NOT_SERVING and UNAVAILABLE while the running job has its grace period.
    loop {
        if health.check(check("")).await.unwrap().into_inner().status == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        health
            .check(check("s3net.v1.Segmenter"))
            .await
            .unwrap()
            .into_inner()
            .status,
        2
    );
    let err = try_submit(&mut c, disk(32, 32), quick())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let mut last = None;
    while let Ok(Some(e)) = w.message().await {
        last = e.event;
    }
    match last {
        Some(Event::Cancelled(c)) => assert_eq!((c.reason.as_str(), c.retryable), ("server shutting down", true)),
        other => panic!("{other:?}"),
    }
    stopping.await.unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .is_err(),
        "still listening"
    );
}

/// DICOM Segmentations that could make the result larger than the server's messages are
/// refused before the fit, naming the sizes; within the limit they are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segmentations_that_could_outgrow_a_message_are_refused_first() {
    let mut cfg = config();
    // CT_small (39 KB) still fits a message; its 128² frames are 2 KiB each.
    cfg.server.max_message_bytes = 64 << 10;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let ct = data("dicom/CT_small.dcm");
    let many = pb::Options { dicom_seg: true, dicom_seg_clusters: true, features: Some(32), ..quick() };
    let err = c.segment(pb::SegmentRequest { image: ct.clone(), options: Some(many) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for needle in ["128×128", "66 KiB", "2 KiB frame", "32 clusters", "server.max_message_bytes, 64 KiB"] {
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    let fewer = pb::Options { dicom_seg: true, dicom_seg_clusters: true, features: Some(8), ..quick() };
    let r = completed(&segment_events(&mut c, ct, fewer).await);
    assert!(!r.mask_dicom.is_empty() && !r.labels_dicom.is_empty());
    server.shutdown().await.unwrap();
}

/// `server.shutdown_cancels_queued`: at shutdown the jobs not started are handed back at once
/// (cancelled as retryable, for clients to send to another replica) while the running one
/// keeps its grace; without it, a queued job waits through the grace (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_are_handed_back_at_once_when_configured() {
    let mut cfg = config();
    cfg.server.shutdown_grace_s = 5;
    cfg.server.shutdown_cancels_queued = true;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let queued = submit(&mut c, disk(40, 40), quick()).await;
    let t = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let job = wait_final(&mut c, &queued, Duration::from_secs(3)).await;
    let handed_back = t.elapsed();
    let why = job.cancellation.expect("cancelled");
    assert_eq!((why.reason.as_str(), why.retryable), ("server shutting down", true));
    // The running job is still in its grace meanwhile.
    let r = c.get_job(pb::GetJobRequest { job_id: running.clone() }).await.unwrap().into_inner();
    assert_eq!(r.state, JobState::Running as i32, "{handed_back:?}");
    assert!(handed_back < Duration::from_secs(2), "{handed_back:?}");
    stopping.await.unwrap().unwrap();
    assert!(t.elapsed() >= Duration::from_secs(4), "the running job had its grace: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire() {
    let mut cfg = config();
    cfg.queue.retention_s = 0;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let id = c
        .submit_job(pb::SubmitJobRequest {
            image: disk(32, 32),
            options: Some(quick()),
            idempotency_key: "x".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let until = Instant::now() + Duration::from_secs(30);
    let err = loop {
        match c.get_job(pb::GetJobRequest { job_id: id.clone() }).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(Instant::now() < until);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("expired"), "{}", err.message());
    // The key was forgotten with the job.
    let again = c
        .submit_job(pb::SubmitJobRequest {
            image: disk(33, 32),
            options: Some(quick()),
            idempotency_key: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existing);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_checked_when_configured() {
    let mut cfg = config();
    cfg.server.auth_token = Some("s3cret".into());
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let err = c
        .get_job(pb::GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::GetJobRequest { job_id: "x".into() });
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert_eq!(c.get_job(req).await.unwrap_err().code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

/// `s3net client segment` retries a full queue no sooner than the server's hint, and with
/// `--retries 0` reports it.
#[test]
fn cli_client_retries_a_full_queue() {
    use s3net_server::cli::{run_client, ClientCommand, RemoteFitArgs, RetryArgs};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = config();
    cfg.queue.capacity = 1;
    let (server, url) = rt.block_on(start(cfg));
    let mut c = rt.block_on(client(&url));
    let running = rt.block_on(submit_running(&mut c, disk(48, 48), slow()));
    let waiting = rt.block_on(submit(&mut c, disk(32, 32), slow()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scan.png");
    std::fs::write(&file, disk(36, 28)).unwrap();
    let segment = |retries: u32| ClientCommand::Segment {
        conn: plain_conn(&url),
        files: vec![file.clone()],
        concurrency: 4,
        out: dir.path().join("out"),
        upload: false,
        timeout: None,
        all_frames: false,
        retry: RetryArgs { retries, backoff: 0.05 },
        fit: RemoteFitArgs { iterations: Some(3), size: Some(32), features: Some(8), device: Some("cpu".into()), ..Default::default() },
    };
    let cmd = segment(0);
    let err = std::thread::spawn(move || run_client(cmd)).join().unwrap().unwrap_err();
    assert!(format!("{err:#}").starts_with(&format!("{}: ResourceExhausted: queue is full (1 jobs waiting); retry in about", file.display())), "{err:#}");

    // With retries it gets in once the queue has room, and not before the hint (at least 1 s).
    let cmd = segment(5);
    let started = std::time::Instant::now();
    let call = std::thread::spawn(move || run_client(cmd));
    std::thread::sleep(std::time::Duration::from_millis(300));
    for job_id in [waiting, running] {
        rt.block_on(c.cancel_job(pb::CancelJobRequest { job_id })).unwrap();
    }
    call.join().unwrap().expect("retried into the queue");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "{:?}", started.elapsed());
    assert!(dir.path().join("out/scan.mask.png").exists());
    rt.block_on(server.shutdown()).unwrap();
}

#[test]
fn cli_client_segment_writes_the_three_files() {
    use s3net_server::cli::{run_client, ClientCommand, RemoteFitArgs};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server, url) = rt.block_on(start(config()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scan.png");
    std::fs::write(&file, disk(36, 28)).unwrap();
    let conn = plain_conn(&url);
    let fit = RemoteFitArgs {
        iterations: Some(3),
        size: Some(32),
        features: Some(8),
        device: Some("cpu".into()),
        ..Default::default()
    };
    let out = dir.path().join("out");
    let cmd = ClientCommand::Segment {
        conn: conn.clone(),
        files: vec![file.clone()],
        concurrency: 4,
        out: out.clone(),
        upload: false,
        timeout: None,
        all_frames: false,
        retry: Default::default(),
        fit: fit.clone(),
    };
    // run_client builds its own runtime, so it runs on a plain thread.
    std::thread::spawn(move || run_client(cmd))
        .join()
        .unwrap()
        .unwrap();
    for f in ["scan.labels.png", "scan.mask.png", "scan.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("scan.json")).unwrap()).unwrap();
    assert_eq!(
        (report["width"].as_u64(), report["height"].as_u64()),
        (Some(36), Some(28))
    );
    assert_eq!(report["options"]["iterations"].as_u64(), Some(3));

    // Chunked upload gives the same files.
    let out2 = dir.path().join("out2");
    let cmd = ClientCommand::Segment {
        conn: conn.clone(),
        files: vec![file.clone()],
        concurrency: 4,
        out: out2.clone(),
        upload: true,
        timeout: None,
        all_frames: false,
        retry: Default::default(),
        fit: fit.clone(),
    };
    std::thread::spawn(move || run_client(cmd))
        .join()
        .unwrap()
        .unwrap();
    assert!(out2.join("scan.mask.png").exists());

    // Several files, two at a time: each good one's files written, the bad one reported, the
    // command failing with the count; nothing stops at the bad one.
    let (second, bad_too) = (dir.path().join("second.png"), dir.path().join("junk.png"));
    std::fs::write(&second, disk(30, 30)).unwrap();
    std::fs::write(&bad_too, b"not an image either").unwrap();
    let out3 = dir.path().join("out3");
    let many = |files: Vec<std::path::PathBuf>, out: &std::path::Path| ClientCommand::Segment {
        conn: conn.clone(),
        files,
        concurrency: 2,
        out: out.to_path_buf(),
        upload: false,
        timeout: None,
        all_frames: false,
        retry: Default::default(),
        fit: fit.clone(),
    };
    let cmd = many(vec![file.clone(), bad_too.clone(), second.clone()], &out3);
    let err = std::thread::spawn(move || run_client(cmd)).join().unwrap().unwrap_err();
    assert_eq!(format!("{err:#}"), "1 of 3 image(s) failed");
    for f in ["scan.labels.png", "scan.mask.png", "scan.json", "second.labels.png", "second.mask.png", "second.json"] {
        assert!(out3.join(f).exists(), "{f}");
    }
    assert!(!out3.join("junk.json").exists());
    // Two inputs with one stem would write the same files: refused before anything runs.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("scan.png"), disk(30, 30)).unwrap();
    let out4 = dir.path().join("out4");
    let cmd = many(vec![file.clone(), elsewhere.join("scan.png")], &out4);
    let err = std::thread::spawn(move || run_client(cmd)).join().unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("would both be written as"), "{err:#}");
    assert!(!out4.exists(), "nothing written");

    // A failure reads "FILE: Code: message".
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let cmd = ClientCommand::Segment {
        conn: conn.clone(),
        files: vec![bad.clone()],
        concurrency: 4,
        out: out.clone(),
        upload: false,
        timeout: None,
        all_frames: false,
        retry: Default::default(),
        fit,
    };
    let err = std::thread::spawn(move || run_client(cmd))
        .join()
        .unwrap()
        .unwrap_err();
    let said = format!("{err:#}");
    assert!(said.starts_with(&format!("{}: InvalidArgument: unrecognised image format", bad.display())), "{said}");

    // --timeout: the server cancels a fit that runs past the deadline, and the command says so
    // (a slow fit, 1000 steps, with 1 s).
    let cmd = ClientCommand::Segment {
        conn: conn.clone(),
        files: vec![file.clone()],
        concurrency: 4,
        out: out.clone(),
        upload: false,
        timeout: Some(1.0),
        all_frames: false,
        retry: Default::default(),
        fit: RemoteFitArgs { iterations: Some(1000), min_labels: Some(0), size: Some(64), ..Default::default() },
    };
    let t = std::time::Instant::now();
    let err = std::thread::spawn(move || run_client(cmd)).join().unwrap().unwrap_err();
    assert!(format!("{err:#}").contains(": DeadlineExceeded: deadline exceeded; the job was cancelled"), "{err:#}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    // The worker is free again.
    let mut c = rt.block_on(client(&url));
    rt.block_on(quick_job_completes(&mut c));

    let cmd = ClientCommand::Health {
        conn,
        service: String::new(),
    };
    std::thread::spawn(move || run_client(cmd))
        .join()
        .unwrap()
        .unwrap();
    rt.block_on(server.shutdown()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let submit = |priority| pb::SubmitJobRequest {
        image: disk(32, 32),
        options: Some(pb::Options {
            priority,
            ..quick()
        }),
        idempotency_key: String::new(),
    };
    let low = c.submit_job(submit(0)).await.unwrap().into_inner();
    let high = c.submit_job(submit(5)).await.unwrap().into_inner();
    assert_eq!((low.queue_position, high.queue_position), (0, 0));
    let low_now = c
        .get_job(pb::GetJobRequest {
            job_id: low.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(low_now.queue_position, 1);
    let listed = c
        .list_jobs(pb::ListJobsRequest {
            state: JobState::Queued as i32,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 2);
    c.cancel_job(pb::CancelJobRequest { job_id: running })
        .await
        .unwrap();
    let low = wait_final(&mut c, &low.job_id, Duration::from_secs(30)).await;
    let high = wait_final(&mut c, &high.job_id, Duration::from_secs(30)).await;
    assert!(
        high.started_at < low.started_at,
        "high {} low {}",
        high.started_at,
        low.started_at
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_throttled() {
    let mut cfg = config();
    cfg.server.progress_interval_ms = 60_000;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let events = segment_events(
        &mut c,
        disk(32, 32),
        pb::Options {
            iterations: Some(6),
            ..quick()
        },
    )
    .await;
    let steps: Vec<u32> = events
        .iter()
        .filter_map(|e| {
            if let Event::Progress(p) = e {
                Some(p.iteration)
            } else {
                None
            }
        })
        .collect();
    // Only the first and the last step get through a long interval.
    assert_eq!(steps, vec![1, 6]);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    use s3net_server::cli::ConnectArgs;
    use s3net_server::config::TlsConfig;
    let ca = TestCa::new();
    let (server_cert, server_key) = ca.issue("server", &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = ca.issue("client", &["client"]);
    let mut cfg = config();
    let cfg_cert = server_cert.clone();
    cfg.server.tls = Some(TlsConfig {
        cert: server_cert,
        key: server_key,
        client_ca: Some(ca.path("ca.pem")),
    });
    let (server, url) = start(cfg).await;
    // Every reason a handshake fails for is exported from the start, at 0.
    let failed = |m: &std::collections::HashMap<String, f64>, reason: &str| value(m, &format!("s3net_tls_handshakes_failed_total{{reason=\"{reason}\"}}"));
    let m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    for reason in ["client_certificate", "rejected_by_client", "protocol", "closed", "timeout"] {
        assert_eq!(failed(&m, reason), 0.0, "{reason}");
    }
    let https = url.replace("http://", "https://");
    let conn = ConnectArgs {
        addr: https.clone(),
        token: None,
        token_file: None,
        ca: Some(ca.path("ca.pem")),
        cert: Some(client_cert),
        key: Some(client_key),
    };
    let mut c = conn.client().await.unwrap();
    let err = c
        .get_job(pb::GetJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut s = c
        .segment(pb::SegmentRequest {
            image: disk(32, 32),
            options: Some(quick()),
        })
        .await
        .unwrap()
        .into_inner();
    let last = last_event(&mut s).await;
    assert!(matches!(last, Some(Event::Completed(_))), "{last:?}");
    // Without a client certificate the handshake or the call fails.
    let anonymous = ConnectArgs {
        cert: None,
        key: None,
        ..conn.clone()
    };
    let refused = async {
        anonymous
            .client()
            .await?
            .get_job(pb::GetJobRequest { job_id: "x".into() })
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    assert!(refused.is_err());
    // Plain text is refused too.
    let plain = ConnectArgs {
        addr: url.clone(),
        ca: None,
        cert: None,
        key: None,
        ..conn.clone()
    };
    let refused = async {
        plain
            .client()
            .await?
            .get_job(pb::GetJobRequest { job_id: "x".into() })
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    assert!(refused.is_err());
    // A client that does not trust this server's CA refuses its certificate.
    let other_ca = TestCa::new();
    let distrusting = ConnectArgs { ca: Some(other_ca.path("ca.pem")), ..conn.clone() };
    let refused = async { distrusting.client().await?.get_job(pb::GetJobRequest { job_id: "x".into() }).await.map_err(anyhow::Error::from) }.await;
    assert!(refused.is_err());
    // Each failure is counted by its reason (the server may count it just after the client
    // has given up).
    let mut m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    for _ in 0..50 {
        if ["client_certificate", "protocol", "rejected_by_client"].iter().all(|r| failed(&m, r) >= 1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        m = scrape(server.metrics_addr().expect("metrics endpoint")).await;
    }
    assert!(failed(&m, "client_certificate") >= 1.0, "no client certificate: {m:?}");
    assert!(failed(&m, "protocol") >= 1.0, "plain text to the TLS port: {m:?}");
    assert!(failed(&m, "rejected_by_client") >= 1.0, "a client trusting another CA: {m:?}");
    assert_eq!(failed(&m, "timeout"), 0.0);
    // The certificates' expiry, for an alert before they end the TLS calls.
    for (which, file) in [("server", cfg_cert.clone()), ("client_ca", ca.path("ca.pem"))] {
        let expected = s3net_server::server::earliest_expiry(&std::fs::read(&file).unwrap()).expect("a certificate");
        assert_eq!(value(&m, &format!("s3net_tls_certificate_expiry_timestamp_seconds{{certificate=\"{which}\"}}")), expected as f64, "{which}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let (server, url) = start(config()).await;
    let ch = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = s.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["s3net.v1.Segmenter", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_four_mib_fit_in_one_message() {
    // 1200×1200 RGB BMP ≈ 4.3 MB: over tonic's 4 MiB default, under the 64 MiB default here.
    let big = image::RgbImage::from_fn(1200, 1200, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let bmp = encode(image::DynamicImage::ImageRgb8(big), image::ImageFormat::Bmp);
    assert!(bmp.len() > 4 << 20);
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let r = completed(
        &segment_events(
            &mut c,
            bmp.clone(),
            pb::Options {
                iterations: Some(2),
                ..quick()
            },
        )
        .await,
    );
    assert_eq!((r.width, r.height), (1200, 1200));
    server.shutdown().await.unwrap();

    // A smaller configured limit refuses it.
    let mut cfg = config();
    cfg.server.max_message_bytes = 1 << 20;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let err = c
        .segment(pb::SegmentRequest {
            image: bmp,
            options: Some(quick()),
        })
        .await
        .unwrap_err();
    // Refused at the message's length prefix, naming the limit and the way round it (tonic's
    // own answer was OUT_OF_RANGE "decoded message length too large").
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("a message of 4.1 MiB is more than this server takes in one (server.max_message_bytes: 1.0 MiB)"),
        "{}",
        err.message()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_image_memory_is_bounded() {
    let mut cfg = config();
    cfg.queue.max_queued_bytes = 10_000;
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let running = submit_running(&mut c, disk(48, 48), slow()).await;
    let submit = |w| pb::SubmitJobRequest {
        image: disk(w, w),
        options: Some(quick()),
        idempotency_key: String::new(),
    };
    // 32×32 grey = 4 KiB of f32 samples: fits; another 40×40 (6.4 KB) would not.
    c.submit_job(submit(32)).await.unwrap();
    let err = c.submit_job(submit(40)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.metadata().get("retry-after").is_some());
    c.cancel_job(pb::CancelJobRequest { job_id: running })
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

/// A job whose options, or whose image, need more memory than a CPU worker may give one job
/// is refused before it is queued, naming the limit (on the CPU such a fit would end in the
/// kernel's out-of-memory killer, taking the server with it), and the server goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_too_large_for_the_cpu_memory_are_refused() {
    let mut cfg = config();
    cfg.workers.max_job_bytes = Some(1_000_000_000);
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let big = |device: &str| pb::Options { size: Some(1024), features: Some(256), device: device.into(), ..quick() };
    let cases = [
        // About 43.6 GB by the estimate, refused before the image is decoded.
        (disk(32, 32), big("cpu"), vec!["1024×1024 grid", "256 features", "43.6 GB"]),
        (disk(32, 32), big(""), vec!["1024×1024 grid", "256 features"]),
        // A small fit of a 49-megapixel image: about 1.24 GB with the image at full size.
        (disk(7000, 7000), quick(), vec!["32×32 grid", "of a 7000×7000 image", "smaller image"]),
    ];
    for (image, options, needles) in cases {
        let err = c
            .segment(pb::SegmentRequest { image: image.clone(), options: Some(options.clone()) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        for needle in needles.iter().chain(&["workers.max_job_bytes", "(1.0 GB"]) {
            assert!(err.message().contains(needle), "{:?} lacks {needle:?}", err.message());
        }
        let err = try_submit(&mut c, image, options).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    // The default 256² grid with 32 features: about 0.85 GB by the estimate, under the 1 GB.
    let fits = pb::Options { size: Some(256), features: Some(32), iterations: Some(1), ..quick() };
    let r = completed(&segment_events(&mut c, disk(32, 32), fits).await);
    assert_eq!((r.width, r.height), (32, 32));
    assert_eq!(c.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs.len(), 1);
    server.shutdown().await.unwrap();
}

/// A bfloat16 job runs, says so in its applied options, and gives a segmentation (an unknown
/// precision is among `bad_inputs_are_invalid_argument_while_a_job_carries_on`'s cases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bfloat16_jobs_run_and_say_so() {
    let (server, url) = start(config()).await;
    let mut c = client(&url).await;
    let o = pb::Options { precision: "bfloat16".into(), ..quick() };
    let r = completed(&segment_events(&mut c, data("ph2/IMD002.png"), o).await);
    let applied: serde_json::Value = serde_json::from_str(&r.options.unwrap().options_json).unwrap();
    assert_eq!(applied["precision"], "bfloat16");
    assert!(r.labels_used >= 1 && r.foreground_fraction > 0.0 && r.foreground_fraction < 1.0);
    server.shutdown().await.unwrap();
}

/// `[defaults]` fill the options a request leaves unset, a request's own values win, and the
/// result's applied options say what ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_defaults_apply_to_unset_options() {
    let mut cfg = config();
    cfg.defaults.size = Some(48);
    cfg.defaults.iterations = Some(2);
    cfg.defaults.precision = Some("bfloat16".into());
    let (server, url) = start(cfg).await;
    let mut c = client(&url).await;
    let unset = pb::Options { features: Some(8), min_labels: Some(0), device: "cpu".into(), ..Default::default() };
    let r = completed(&segment_events(&mut c, disk(40, 40), unset.clone()).await);
    let applied = r.options.unwrap();
    let json: serde_json::Value = serde_json::from_str(&applied.options_json).unwrap();
    assert_eq!((applied.size, applied.iterations, r.iterations, json["precision"].as_str()), (48, 2, 2, Some("bfloat16")));
    let asked = pb::Options { size: Some(32), iterations: Some(3), precision: "float32".into(), ..unset };
    let r = completed(&segment_events(&mut c, disk(40, 40), asked).await);
    let applied = r.options.unwrap();
    let json: serde_json::Value = serde_json::from_str(&applied.options_json).unwrap();
    assert_eq!((applied.size, applied.iterations, json["precision"].as_str()), (32, 3, Some("float32")));
    server.shutdown().await.unwrap();
}

/// `[server.tls]` renewed on disk (as cert-manager rewrites a Secret's files) is served from
/// the next connection on after a look at the configuration, with no restart; a key that does
/// not go with its certificate (files caught mid-rotation) is refused and the certificate in
/// force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    use s3net_server::cli::ConnectArgs;
    use s3net_server::reload::{Reload, Reloader, Trigger};
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"), dir.path().join("s3net.toml"));
    let install = |ca: &TestCa, stem: &str| {
        let (c, k) = ca.issue(stem, &["localhost", "127.0.0.1"]);
        std::fs::copy(k, &key).unwrap();
        std::fs::copy(c, &cert).unwrap();
    };
    install(&old_ca, "first");
    std::fs::write(&file, format!("[server.tls]\ncert = {cert:?}\nkey = {key:?}\n")).unwrap();
    let base = config();
    let load = || -> anyhow::Result<s3net_server::Config> {
        let loaded = s3net_server::Config::load(Some(&file), &[])?;
        let mut c = base.clone();
        (c.server.tls, c.server.tls_files) = (loaded.server.tls, loaded.server.tls_files);
        Ok(c)
    };
    let started = load().unwrap();
    let (server, url) = start(started.clone()).await;
    let mut reloader = Reloader::new(load, started);
    let https = url.replace("http://", "https://");
    let trusting = async |ca: &TestCa| {
        let conn = ConnectArgs { addr: https.clone(), ca: Some(ca.path("ca.pem")), ..plain_conn(&https) };
        conn.client().await?.list_jobs(pb::ListJobsRequest::default()).await.map(drop).map_err(anyhow::Error::from)
    };
    trusting(&old_ca).await.expect("the first certificate");
    assert!(trusting(&new_ca).await.is_err(), "not yet the renewed one");
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Unchanged);

    install(&new_ca, "renewed");
    assert!(matches!(reloader.look(&server, Trigger::Interval), Reload::Applied(_)));
    trusting(&new_ca).await.expect("the renewed certificate, no restart");
    assert!(trusting(&old_ca).await.is_err(), "the first one no longer served");
    let m = scrape(server.metrics_addr().unwrap()).await;
    let renewed = s3net_server::server::earliest_expiry(&std::fs::read(&cert).unwrap()).unwrap();
    assert_eq!(value(&m, "s3net_tls_certificate_expiry_timestamp_seconds{certificate=\"server\"}"), renewed as f64, "the renewed one's expiry");
    assert!(!m.keys().any(|k| k.contains("client_ca")), "no client CA, no series: {m:?}");

    // Caught mid-rotation: the next certificate beside the renewed one's key.
    let (next, _) = old_ca.issue("next", &["localhost", "127.0.0.1"]);
    std::fs::copy(next, &cert).unwrap();
    assert_eq!(reloader.look(&server, Trigger::Interval), Reload::Refused);
    trusting(&new_ca).await.expect("the renewed certificate stays");
    let m = scrape(server.metrics_addr().unwrap()).await;
    assert_series(&m, &[("s3net_config_last_reload_successful", 0.0)]);
    server.shutdown().await.unwrap();
}
