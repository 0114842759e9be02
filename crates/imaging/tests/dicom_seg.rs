//! DICOM Segmentation output: what it references and copies from its source, read back with
//! dicom-object and with this crate's own decoder (which reads 1-bit pixel data).

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use s3net_imaging::*;

fn data(rel: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn read(bytes: &[u8]) -> DefaultDicomObject {
    OpenFileOptions::new().read_preamble(ReadPreamble::Never).from_reader(&bytes[128..]).unwrap()
}

fn write(obj: DefaultDicomObject) -> Vec<u8> {
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn string(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_string()
}

fn item(obj: &InMemDicomObject, sequence: Tag) -> &InMemDicomObject {
    &obj.element(sequence).unwrap().items().unwrap()[0]
}

const ALGORITHM: Algorithm = Algorithm { version: "0.1.0", parameters: "{\"iterations\":50}" };

/// A mask of the source's size: its pixels above their mean.
fn mask_of(bytes: &[u8], frame: u32) -> (u32, u32, Vec<bool>) {
    let d = decode(bytes, &DecodeOptions { frame, ..Default::default() }).unwrap();
    let mean = d.samples.iter().sum::<f32>() / d.samples.len() as f32;
    let n = (d.width * d.height) as usize;
    (d.width, d.height, d.samples[..n].iter().map(|&v| v > mean).collect())
}

/// Our decoder reads the Segmentation's 1-bit frame back as 0/255: the mask, bit for bit.
fn assert_pixels_are(seg: &[u8], w: u32, h: u32, mask: &[bool]) {
    let d = decode(seg, &DecodeOptions::default()).unwrap();
    assert_eq!((d.width, d.height, d.channels), (w, h, 1));
    let back: Vec<bool> = d.samples.iter().map(|&v| v > 0.0).collect();
    assert_eq!(back, mask);
    assert!(mask.iter().any(|&m| m) && mask.iter().any(|&m| !m), "a mask with both values");
}

#[test]
fn a_ct_slice_segmentation_is_filed_with_its_source_and_placed_on_it() {
    let bytes = data("dicom/CT_small.dcm");
    let source_obj = read(&bytes);
    let (w, h, mask) = mask_of(&bytes, 0);
    let source = dicom_source(&bytes, 0).unwrap();
    assert!(source.is_placed());
    assert_eq!(source.size(), (w, h));
    let seg = encode_segmentation(&source, w, h, &mask, &ALGORITHM).unwrap();
    assert_pixels_are(&seg, w, h, &mask);

    let obj = read(&seg);
    assert_eq!(obj.meta().media_storage_sop_class_uid().trim_end_matches('\0'), SEGMENTATION_SOP_CLASS);
    assert_eq!(string(&obj, tags::SOP_CLASS_UID), SEGMENTATION_SOP_CLASS);
    assert_eq!(string(&obj, tags::MODALITY), "SEG");
    assert_eq!(string(&obj, tags::SEGMENTATION_TYPE), "BINARY");
    assert_eq!(string(&obj, tags::PRESENTATION_LUT_SHAPE), "IDENTITY");
    assert_eq!(obj.element(tags::BITS_ALLOCATED).unwrap().to_int::<u16>().unwrap(), 1);
    // Same patient and study, a new series and instance.
    for tag in [tags::PATIENT_NAME, tags::PATIENT_ID, tags::STUDY_INSTANCE_UID, tags::STUDY_DATE, tags::FRAME_OF_REFERENCE_UID, tags::SPECIFIC_CHARACTER_SET] {
        assert_eq!(string(&obj, tag), string(&source_obj, tag), "{tag}");
    }
    for tag in [tags::SERIES_INSTANCE_UID, tags::SOP_INSTANCE_UID] {
        assert_ne!(string(&obj, tag), string(&source_obj, tag), "{tag}");
    }
    assert_eq!(string(&obj, tags::INSTANCE_NUMBER), string(&source_obj, tags::INSTANCE_NUMBER));
    // Another slice of the series (here the same one again, losslessly compressed): a new
    // instance in the same Segmentation series. Another series: another one.
    let again = data("dicom/CT_small_jpegls.dcm");
    let again = read(&encode_segmentation(&dicom_source(&again, 0).unwrap(), w, h, &mask, &ALGORITHM).unwrap());
    assert_eq!(string(&again, tags::SERIES_INSTANCE_UID), string(&obj, tags::SERIES_INSTANCE_UID));
    assert_ne!(string(&again, tags::SOP_INSTANCE_UID), string(&obj, tags::SOP_INSTANCE_UID));
    let mr = data("dicom/MR_small.dcm");
    let (mw, mh, mr_mask) = mask_of(&mr, 0);
    let other = read(&encode_segmentation(&dicom_source(&mr, 0).unwrap(), mw, mh, &mr_mask, &ALGORITHM).unwrap());
    assert_ne!(string(&other, tags::SERIES_INSTANCE_UID), string(&obj, tags::SERIES_INSTANCE_UID));
    assert_eq!(string(&obj, tags::SOP_INSTANCE_UID), obj.meta().media_storage_sop_instance_uid().trim_end_matches('\0'));
    // The source instance, referenced from the frame and from the series.
    let per_frame = item(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let derivation = item(per_frame, tags::DERIVATION_IMAGE_SEQUENCE);
    let source_image = item(derivation, tags::SOURCE_IMAGE_SEQUENCE);
    assert_eq!(string(source_image, tags::REFERENCED_SOP_INSTANCE_UID), string(&source_obj, tags::SOP_INSTANCE_UID));
    assert_eq!(string(source_image, tags::REFERENCED_SOP_CLASS_UID), string(&source_obj, tags::SOP_CLASS_UID));
    assert!(source_image.element(tags::REFERENCED_FRAME_NUMBER).is_err(), "a single-frame source has no frame number");
    assert_eq!(string(item(derivation, tags::DERIVATION_CODE_SEQUENCE), tags::CODE_VALUE), "113076");
    assert_eq!(string(source_image, tags::SPATIAL_LOCATIONS_PRESERVED), "YES");
    let series = item(&obj, tags::REFERENCED_SERIES_SEQUENCE);
    assert_eq!(string(series, tags::SERIES_INSTANCE_UID), string(&source_obj, tags::SERIES_INSTANCE_UID));
    assert_eq!(string(item(series, tags::REFERENCED_INSTANCE_SEQUENCE), tags::REFERENCED_SOP_INSTANCE_UID), string(&source_obj, tags::SOP_INSTANCE_UID));
    // Placed where the slice is: its position, orientation and spacing.
    let position = item(per_frame, tags::PLANE_POSITION_SEQUENCE);
    assert_eq!(string(position, tags::IMAGE_POSITION_PATIENT), string(&source_obj, tags::IMAGE_POSITION_PATIENT));
    let shared = item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    assert_eq!(string(item(shared, tags::PLANE_ORIENTATION_SEQUENCE), tags::IMAGE_ORIENTATION_PATIENT), string(&source_obj, tags::IMAGE_ORIENTATION_PATIENT));
    let measures = item(shared, tags::PIXEL_MEASURES_SEQUENCE);
    assert_eq!(string(measures, tags::PIXEL_SPACING), string(&source_obj, tags::PIXEL_SPACING));
    assert_eq!(string(measures, tags::SLICE_THICKNESS), string(&source_obj, tags::SLICE_THICKNESS));
    // Indexed by segment and position; segment 1 is the foreground, made automatically.
    let content = item(per_frame, tags::FRAME_CONTENT_SEQUENCE);
    assert_eq!(content.element(tags::DIMENSION_INDEX_VALUES).unwrap().to_multi_int::<u32>().unwrap(), vec![1, 1]);
    assert_eq!(obj.element(tags::DIMENSION_INDEX_SEQUENCE).unwrap().items().unwrap().len(), 2);
    let segment = item(&obj, tags::SEGMENT_SEQUENCE);
    assert_eq!(string(segment, tags::SEGMENT_LABEL), "Foreground");
    assert_eq!(string(segment, tags::SEGMENT_ALGORITHM_TYPE), "AUTOMATIC");
    let algorithm = item(segment, tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE);
    assert_eq!(string(algorithm, tags::ALGORITHM_PARAMETERS), ALGORITHM.parameters);
    assert_eq!(string(&obj, tags::SOFTWARE_VERSIONS), "0.1.0");
    // Nothing else of the source: not its modality's attributes, not its pixels' description.
    for tag in [tags::KVP, tags::RESCALE_INTERCEPT, tags::WINDOW_CENTER, tags::IMAGE_POSITION_PATIENT] {
        assert!(obj.element(tag).is_err(), "{tag} copied");
    }
}

#[test]
fn an_image_without_a_frame_of_reference_is_referenced_but_not_placed() {
    // A secondary capture (no frame of reference), whose patient name is UTF-8 (ISO_IR 192).
    let bytes = data("dicom/SC_rgb_rle.dcm");
    let source_obj = read(&bytes);
    let (w, h, mask) = mask_of(&bytes, 0);
    let source = dicom_source(&bytes, 0).unwrap();
    assert!(!source.is_placed());
    let seg = encode_segmentation(&source, w, h, &mask, &ALGORITHM).unwrap();
    assert_pixels_are(&seg, w, h, &mask);
    let obj = read(&seg);
    assert_eq!(string(&obj, tags::PATIENT_NAME), string(&source_obj, tags::PATIENT_NAME));
    assert_eq!(string(&obj, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
    let per_frame = item(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    assert!(per_frame.element(tags::PLANE_POSITION_SEQUENCE).is_err());
    assert!(obj.element(tags::FRAME_OF_REFERENCE_UID).is_err());
    let content = item(per_frame, tags::FRAME_CONTENT_SEQUENCE);
    assert_eq!(content.element(tags::DIMENSION_INDEX_VALUES).unwrap().to_multi_int::<u32>().unwrap(), vec![1]);
    assert_eq!(obj.element(tags::DIMENSION_INDEX_SEQUENCE).unwrap().items().unwrap().len(), 1);
    // Type 2 attributes the source lacks are there, empty; so is Patient Orientation, which an
    // unplaced image must carry (type 2C: dciodvfy calls its absence an error).
    assert!(obj.element(tags::ACCESSION_NUMBER).is_ok());
    assert!(obj.element(tags::PATIENT_ORIENTATION).unwrap().to_str().unwrap().is_empty());
    // A source's own Patient Orientation is the Segmentation's: the same rows and columns.
    let mut oriented = read(&bytes);
    oriented.put(DataElement::new(tags::PATIENT_ORIENTATION, VR::CS, dicom_core::dicom_value!(Strs, ["A", "F"])));
    let oriented = write(oriented);
    let seg = encode_segmentation(&dicom_source(&oriented, 0).unwrap(), w, h, &mask, &ALGORITHM).unwrap();
    assert_eq!(read(&seg).element(tags::PATIENT_ORIENTATION).unwrap().to_multi_str().unwrap().to_vec(), ["A", "F"]);
    // A placed one has none: its plane orientation says it.
    let ct = data("dicom/CT_small.dcm");
    let (w, h, mask) = mask_of(&ct, 0);
    let seg = encode_segmentation(&dicom_source(&ct, 0).unwrap(), w, h, &mask, &ALGORITHM).unwrap();
    assert!(read(&seg).element(tags::PATIENT_ORIENTATION).is_err());
}

#[test]
fn a_latin_1_patient_name_is_written_as_latin_1() {
    let mut obj = read(&data("dicom/CT_small.dcm"));
    obj.put(DataElement::new(tags::SPECIFIC_CHARACTER_SET, VR::CS, PrimitiveValue::from("ISO_IR 100")));
    obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Müller^Jürgen")));
    let bytes = write(obj);
    let (w, h, mask) = mask_of(&bytes, 0);
    let seg = encode_segmentation(&dicom_source(&bytes, 0).unwrap(), w, h, &mask, &ALGORITHM).unwrap();
    assert_eq!(string(&read(&seg), tags::PATIENT_NAME), "Müller^Jürgen");
    assert!(seg.windows(6).any(|b| b == b"M\xfcller"), "not in Latin-1");
}

#[test]
fn a_multi_frame_sources_frame_is_referenced_with_its_own_position() {
    let mut obj = read(&data("dicom/CT_small_enhanced_3frames.dcm"));
    let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    obj.put(text(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3.4"));
    obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4.5"));
    obj.put(text(tags::FRAME_OF_REFERENCE_UID, VR::UI, "1.2.3.4.6"));
    // Each frame 2.5 mm below the one before, in the per-frame groups; one orientation, shared.
    let mut frames: Vec<InMemDicomObject> =
        obj.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap().to_vec();
    for (i, f) in frames.iter_mut().enumerate() {
        let position = InMemDicomObject::from_element_iter([text(tags::IMAGE_POSITION_PATIENT, VR::DS, &format!("-16\\-16\\{}", -2.5 * i as f64))]);
        f.put(DataElement::new(tags::PLANE_POSITION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![position])));
    }
    obj.put(DataElement::new(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, VR::SQ, DataSetSequence::from(frames)));
    let mut shared = obj.element(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap()[0].clone();
    let orientation = InMemDicomObject::from_element_iter([text(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0")]);
    shared.put(DataElement::new(tags::PLANE_ORIENTATION_SEQUENCE, VR::SQ, DataSetSequence::from(vec![orientation])));
    obj.put(DataElement::new(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, VR::SQ, DataSetSequence::from(vec![shared])));
    let bytes = write(obj);

    let (w, h, mask) = mask_of(&bytes, 2);
    let source = dicom_source(&bytes, 2).unwrap();
    assert!(source.is_placed());
    let seg = encode_segmentation(&source, w, h, &mask, &ALGORITHM).unwrap();
    assert_pixels_are(&seg, w, h, &mask);
    let seg = read(&seg);
    let per_frame = item(&seg, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
    let source_image = item(item(per_frame, tags::DERIVATION_IMAGE_SEQUENCE), tags::SOURCE_IMAGE_SEQUENCE);
    assert_eq!(string(source_image, tags::REFERENCED_FRAME_NUMBER), "3");
    let position = item(per_frame, tags::PLANE_POSITION_SEQUENCE).element(tags::IMAGE_POSITION_PATIENT).unwrap();
    assert_eq!(position.to_multi_float64().unwrap(), vec![-16.0, -16.0, -5.0]);
    let shared = item(&seg, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    assert_eq!(string(item(shared, tags::PIXEL_MEASURES_SEQUENCE), tags::PIXEL_SPACING), "0.5\\0.75");
    assert!(matches!(dicom_source(&bytes, 3), Err(ImagingError::FrameOutOfRange { frame: 3, frames: 3, .. })));
}

#[test]
fn sources_a_segmentation_cannot_reference_are_refused_by_name() {
    let source_bytes = data("dicom/CT_small.dcm");
    for (tag, name) in [
        (tags::SOP_INSTANCE_UID, "SOP Instance UID"),
        (tags::STUDY_INSTANCE_UID, "Study Instance UID"),
        (tags::SERIES_INSTANCE_UID, "Series Instance UID"),
    ] {
        let mut obj = read(&source_bytes);
        obj.remove_element(tag);
        let e = dicom_source(&write(obj), 0).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ImagingError::NotSegmentable { .. }) && text.contains(name), "{text}");
        assert!(!text.contains("CompressedSamples"), "patient name leaked: {text}");
    }
    let mut obj = read(&source_bytes);
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("1.2.CompressedSamples")));
    let text = dicom_source(&write(obj), 0).unwrap_err().to_string();
    assert!(text.contains("SOP Instance UID is not a valid UID") && !text.contains("CompressedSamples"), "{text}");
    // Not a DICOM file at all.
    assert!(dicom_source(b"\x89PNG\r\n\x1a\n", 0).is_err());
    // A mask of another size.
    let source = dicom_source(&source_bytes, 0).unwrap();
    let e = encode_segmentation(&source, 64, 32, &[false; 64 * 32], &ALGORITHM).unwrap_err();
    assert!(e.to_string().contains("64×32"), "{e}");
    // Its Debug shows no patient attribute.
    assert!(!format!("{source:?}").contains("CompressedSamples"));
}

#[test]
fn the_clusters_are_a_segmentation_of_their_own_one_segment_each() {
    let bytes = data("dicom/CT_small.dcm");
    let d = decode(&bytes, &DecodeOptions::default()).unwrap();
    // Three clusters by intensity, numbered 0.. as the result's label map is.
    let labels = LabelMap {
        width: d.width,
        height: d.height,
        data: d.samples.iter().map(|&v| if v < -200.0 { 0 } else if v < 40.0 { 1 } else { 2 }).collect(),
    };
    let source = dicom_source(&bytes, 0).unwrap();
    let seg = encode_cluster_segmentation(&source, &labels, &ALGORITHM).unwrap();
    for frame in 0..3u32 {
        let back = decode(&seg, &DecodeOptions { frame, ..Default::default() }).unwrap();
        let want: Vec<bool> = labels.data.iter().map(|&l| u32::from(l) == frame).collect();
        assert_eq!(back.samples.iter().map(|&v| v > 0.0).collect::<Vec<_>>(), want, "cluster {frame}");
    }
    let obj = read(&seg);
    assert_eq!(string(&obj, tags::NUMBER_OF_FRAMES), "3");
    assert_eq!(string(&obj, tags::SERIES_DESCRIPTION), "S3-Net clusters");
    let segments = obj.element(tags::SEGMENT_SEQUENCE).unwrap().items().unwrap();
    let names: Vec<String> = segments.iter().map(|s| string(s, tags::SEGMENT_LABEL)).collect();
    assert_eq!(names, ["Cluster 0", "Cluster 1", "Cluster 2"]);
    let frames = obj.element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().items().unwrap();
    for (i, f) in frames.iter().enumerate() {
        let number = item(f, tags::SEGMENT_IDENTIFICATION_SEQUENCE).element(tags::REFERENCED_SEGMENT_NUMBER).unwrap();
        assert_eq!(number.to_int::<usize>().unwrap(), i + 1);
        let index = item(f, tags::FRAME_CONTENT_SEQUENCE).element(tags::DIMENSION_INDEX_VALUES).unwrap();
        assert_eq!(index.to_multi_int::<usize>().unwrap(), vec![i + 1, 1]);
    }
    // A series of its own, beside the foreground's.
    let (w, h, mask) = mask_of(&bytes, 0);
    let foreground = read(&encode_segmentation(&source, w, h, &mask, &ALGORITHM).unwrap());
    assert_ne!(string(&obj, tags::SERIES_INSTANCE_UID), string(&foreground, tags::SERIES_INSTANCE_UID));
    assert_eq!(string(&obj, tags::STUDY_INSTANCE_UID), string(&foreground, tags::STUDY_INSTANCE_UID));
}
