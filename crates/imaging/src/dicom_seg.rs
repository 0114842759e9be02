//! The foreground mask as a DICOM Segmentation object (PS3.3 A.51, binary), for a PACS.
//!
//! A mask PNG is of no use to a PACS: it cannot file it under the patient, and a viewer cannot
//! lay it over the slice it came from. A Segmentation instance can: it carries the source's
//! patient and study, a new series in that study, a reference to the source instance (and
//! frame), and, where the source has them, the frame of reference and the plane's position and
//! orientation, so that a viewer places it on the slice.
//!
//! Two pure steps, so that the server keeps only the few attributes it needs while the fit runs
//! (not the whole upload): [`dicom_source`] reads them from the source file's header, and
//! [`encode_segmentation`] writes the Segmentation once the mask exists.

use std::fmt;

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::header::{HasLength, Header};
use dicom_core::{dicom_value, DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::{InMemDicomObject, InMemElement};
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder};

use crate::dicom::{frame_attribute, geometry, open, pixel_spacing};
use crate::{DecodeOptions, ImagingError};

/// Segmentation Storage.
pub const SEGMENTATION_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";
/// This implementation's class UID (a UUID-derived root, PS3.5 B.2): constant, so that a PACS
/// can tell which software wrote a file.
const IMPLEMENTATION_CLASS_UID: &str = "2.25.215497069380316154880815734939813466883";

/// The source's attributes a Segmentation copies, in the order of the modules that hold them:
/// Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study, Frame of
/// Reference (dropped again when its UID is not one). Only
/// these are copied (and only with plain values): nothing else of the source reaches the new
/// object.
const COPIED: [Tag; 32] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_SEX,
    tags::OTHER_PATIENT_NAMES,
    tags::PATIENT_COMMENTS,
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::CLINICAL_TRIAL_SPONSOR_NAME,
    tags::CLINICAL_TRIAL_PROTOCOL_ID,
    tags::CLINICAL_TRIAL_PROTOCOL_NAME,
    tags::CLINICAL_TRIAL_SITE_ID,
    tags::CLINICAL_TRIAL_SITE_NAME,
    tags::CLINICAL_TRIAL_SUBJECT_ID,
    tags::CLINICAL_TRIAL_SUBJECT_READING_ID,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::CLINICAL_TRIAL_TIME_POINT_ID,
    tags::CLINICAL_TRIAL_TIME_POINT_DESCRIPTION,
    tags::FRAME_OF_REFERENCE_UID,
    tags::POSITION_REFERENCE_INDICATOR,
];

/// Attributes of type 2 in the modules above: present in every Segmentation, empty where the
/// source lacks them.
const REQUIRED_EMPTY: [(Tag, VR); 9] = [
    (tags::PATIENT_NAME, VR::PN),
    (tags::PATIENT_ID, VR::LO),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::PATIENT_SEX, VR::CS),
    (tags::STUDY_DATE, VR::DA),
    (tags::STUDY_TIME, VR::TM),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::STUDY_ID, VR::SH),
    (tags::ACCESSION_NUMBER, VR::SH),
];

/// What a Segmentation needs of its source image: read by [`dicom_source`], kept while the fit
/// runs, written by [`encode_segmentation`].
///
/// It holds patient-identifying attributes, so its `Debug` shows none of them: it may reach a
/// log.
#[derive(Clone, PartialEq)]
pub struct DicomSource {
    /// The elements of [`COPIED`] the source has, verbatim.
    copied: Vec<InMemElement>,
    sop_class_uid: String,
    sop_instance_uid: String,
    series_instance_uid: String,
    /// Instance Number (0020,0013), when the source has one: the Segmentation takes it, so that
    /// a viewer sorts a series' Segmentations as it sorts their slices.
    instance_number: Option<u32>,
    /// 1-based, for a multi-frame source; None for a single frame.
    frame_number: Option<u32>,
    rows: u32,
    columns: u32,
    /// The frame's Pixel Spacing and Slice Thickness, when given (written only together).
    pixel_spacing: Option<InMemElement>,
    slice_thickness: Option<InMemElement>,
    /// The frame's Image Position and Orientation (Patient), kept only with a Frame of
    /// Reference UID (without one they place the plane in no known space).
    image_position: Option<InMemElement>,
    image_orientation: Option<InMemElement>,
    /// The source's Patient Orientation (0020,0020), the directions of its rows and columns
    /// (two values such as `A\F`), when it has a plain one: an unplaced Segmentation must carry
    /// the attribute (type 2C), and the pixel grid is the source's.
    patient_orientation: Option<InMemElement>,
}

impl fmt::Debug for DicomSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DicomSource")
            .field("sop_class_uid", &self.sop_class_uid)
            .field("frame_number", &self.frame_number)
            .field("rows", &self.rows)
            .field("columns", &self.columns)
            .field("placed", &self.image_position.is_some())
            .finish_non_exhaustive()
    }
}

impl DicomSource {
    /// Rows and Columns of the source: a mask written against it must have this size.
    pub fn size(&self) -> (u32, u32) {
        (self.columns, self.rows)
    }

    /// Whether the Segmentation will carry the plane's position and orientation in the
    /// patient (the source has a Frame of Reference and both attributes).
    pub fn is_placed(&self) -> bool {
        self.image_position.is_some() && self.image_orientation.is_some()
    }
}

/// Who made the segmentation, recorded in the Segmentation's equipment and algorithm
/// attributes.
#[derive(Debug, Clone, Copy)]
pub struct Algorithm<'a> {
    /// Software Versions and Algorithm Version, e.g. the crate's version.
    pub version: &'a str,
    /// Algorithm Parameters (LT): the fit's options, as JSON. Cut at 10240 characters.
    pub parameters: &'a str,
}

fn not_segmentable(reason: impl Into<String>) -> ImagingError {
    ImagingError::NotSegmentable { reason: reason.into() }
}

/// A UID the source must have, checked as a UID (digits and dots, at most 64 characters):
/// it goes into the new object as a reference.
fn required_uid(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<String, ImagingError> {
    let value = obj
        .element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default();
    if value.is_empty() {
        return Err(not_segmentable(format!("the source has no {name}, which the Segmentation must reference")));
    }
    if !is_uid(&value) {
        return Err(not_segmentable(format!("the source's {name} is not a valid UID")));
    }
    Ok(value)
}

fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && (c == "0" || !c.starts_with('0')))
}

/// An element with a plain value (not a sequence, not pixel data).
fn plain(e: &InMemElement) -> bool {
    e.value().primitive().is_some()
}

/// Reads what a Segmentation of frame `frame` (0-based) of a DICOM file needs, from the data
/// set up to its pixel data (which is not read). Fails, naming what is missing, for a file a
/// Segmentation cannot reference: one without SOP Class, SOP Instance, Study or Series
/// Instance UID.
pub fn dicom_source(bytes: &[u8], frame: u32) -> Result<DicomSource, ImagingError> {
    let obj = open(bytes, true)?;
    let sop_class_uid = required_uid(&obj, tags::SOP_CLASS_UID, "SOP Class UID")?;
    let sop_instance_uid = required_uid(&obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?;
    required_uid(&obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?;
    let series_instance_uid = required_uid(&obj, tags::SERIES_INSTANCE_UID, "Series Instance UID")?;
    let (rows, columns, frames) = geometry(&obj, &DecodeOptions { frame, ..Default::default() })?;
    let copied: Vec<InMemElement> = COPIED
        .iter()
        .filter_map(|&tag| obj.element_opt(tag).ok().flatten())
        .filter(|e| plain(e))
        .cloned()
        .collect();
    let has_frame_of_reference = copied
        .iter()
        .any(|e| e.tag() == tags::FRAME_OF_REFERENCE_UID && e.to_str().is_ok_and(|s| is_uid(s.trim_end_matches(['\0', ' ']))));
    let of_frame = |group, tag| frame_attribute(&obj, frame, group, tag).filter(|e| plain(e) && !e.is_empty()).cloned();
    let placed = |group, tag| if has_frame_of_reference { of_frame(group, tag) } else { None };
    let image_position = placed(tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
        .filter(|e| e.to_multi_float64().is_ok_and(|v| v.len() == 3 && v.iter().all(|x| x.is_finite())));
    let image_orientation = placed(tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
        .filter(|e| e.to_multi_float64().is_ok_and(|v| v.len() == 6 && v.iter().all(|x| x.is_finite())));
    Ok(DicomSource {
        copied: if has_frame_of_reference {
            copied
        } else {
            copied.into_iter().filter(|e| e.tag() != tags::FRAME_OF_REFERENCE_UID && e.tag() != tags::POSITION_REFERENCE_INDICATOR).collect()
        },
        sop_class_uid,
        sop_instance_uid,
        series_instance_uid,
        instance_number: obj.element_opt(tags::INSTANCE_NUMBER).ok().flatten().and_then(|e| e.to_int::<u32>().ok()),
        frame_number: (frames > 1).then_some(frame + 1),
        rows,
        columns,
        // As the decoder takes it (two positive numbers), kept as the file writes it.
        pixel_spacing: pixel_spacing(&obj, frame).and(of_frame(tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)),
        slice_thickness: of_frame(tags::PIXEL_MEASURES_SEQUENCE, tags::SLICE_THICKNESS)
            .filter(|e| e.to_float64().is_ok_and(|x| x.is_finite() && x > 0.0)),
        image_position: image_position.filter(|_| image_orientation.is_some()),
        image_orientation,
        patient_orientation: obj
            .element_opt(tags::PATIENT_ORIENTATION)
            .ok()
            .flatten()
            .filter(|e| plain(e) && e.to_multi_str().is_ok_and(|v| v.len() == 2))
            .cloned(),
    })
}

/// A new UID under 2.25 (PS3.5 B.2): 128 random bits in decimal, unique without a registered
/// root.
fn new_uid() -> Result<String, ImagingError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ImagingError::Internal(format!("no random source for a UID: {e}")))?;
    Ok(format!("2.25.{}", u128::from_be_bytes(bytes)))
}

/// The Series Instance UID of this version's Segmentations of kind `kind` (foreground,
/// clusters) of source series `source_series`:
/// a 2.25 UID made of the first 128 bits of a SHA-256 of both. Why derived, not random: a CT
/// series arrives one slice per request, and each slice's Segmentation must land in one series
/// (a viewer shows one series per UID, not 300), with no request knowing of the others; a
/// new version's Segmentations form a series of their own beside the old one.
fn series_uid_for(source_series: &str, version: &str, kind: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("s3net {version} DICOM Segmentation ({kind}) of series {source_series}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// Date (YYYYMMDD) and time (HHMMSS) in UTC of `unix_seconds`.
fn dicom_date_time(unix_seconds: u64) -> (String, String) {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar, eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60),
    )
}

fn str_element(tag: Tag, vr: VR, value: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn item(elements: impl IntoIterator<Item = InMemElement>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A Code Sequence Macro item.
fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    item([
        str_element(tags::CODE_VALUE, VR::SH, value),
        str_element(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        str_element(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// `frames` frames of `pixels` bits (pixel `i` of frame `f` set when `set(f, i)`) in the
/// order DICOM packs them: pixel after pixel, the first in each byte's lowest bit, with no
/// padding at row or frame ends; the whole padded to an even length.
fn pack_bits(frames: usize, pixels: usize, set: impl Fn(usize, usize) -> bool) -> Vec<u8> {
    let mut out = vec![0u8; pack_bits_len(frames * pixels)];
    for f in 0..frames {
        for i in (0..pixels).filter(|&i| set(f, i)) {
            let bit = f * pixels + i;
            out[bit / 8] |= 1 << (bit % 8);
        }
    }
    out
}

/// What one kind of Segmentation holds and how it is filed.
struct Kind {
    /// Series Description, Series Number, Content Label, Content Description.
    series: (&'static str, &'static str, &'static str, &'static str),
    /// Part of what its series UID is derived from (see `series_uid_for`).
    name: &'static str,
}

const FOREGROUND: Kind = Kind {
    series: ("S3-Net foreground", "1000", "S3NET_FOREGROUND", "Foreground of a self-supervised clustering (S3-Net)"),
    name: "foreground",
};

const CLUSTERS: Kind = Kind {
    series: ("S3-Net clusters", "1001", "S3NET_CLUSTERS", "Clusters of a self-supervised clustering (S3-Net)"),
    name: "clusters",
};

/// The mask (`width` × `height`, row after row, true = foreground) as a DICOM Segmentation
/// Part 10 file: binary, one segment ("Foreground", made by an automatic algorithm), in the
/// source's study, in a series of its own shared by every Segmentation of the source's series
/// (see `series_uid_for`), referencing the source instance (and frame).
///
/// Fails when the mask is not the source's size.
pub fn encode_segmentation(
    source: &DicomSource,
    width: u32,
    height: u32,
    mask: &[bool],
    algorithm: &Algorithm<'_>,
) -> Result<Vec<u8>, ImagingError> {
    if mask.len() as u64 != u64::from(width) * u64::from(height) {
        return Err(not_segmentable(format!("the mask has {} pixels, not {width}×{height}", mask.len())));
    }
    encode(source, (width, height), &FOREGROUND, &["Foreground".to_string()], |_, i| mask[i], algorithm)
}

/// The label map (clusters numbered 0.. by decreasing area, as the result's PNG has them) as a
/// DICOM Segmentation like [`encode_segmentation`]'s, in a series of its own beside it: one
/// segment per cluster ("Cluster 0", …; segment number = label + 1), which do not overlap.
///
/// Fails when the map is not the source's size.
pub fn encode_cluster_segmentation(
    source: &DicomSource,
    labels: &crate::LabelMap,
    algorithm: &Algorithm<'_>,
) -> Result<Vec<u8>, ImagingError> {
    let (w, h) = (labels.width, labels.height);
    if labels.data.len() as u64 != u64::from(w) * u64::from(h) {
        return Err(not_segmentable(format!("the label map has {} pixels, not {w}×{h}", labels.data.len())));
    }
    let clusters = labels.data.iter().copied().max().map_or(0, |m| usize::from(m) + 1);
    let names: Vec<String> = (0..clusters).map(|l| format!("Cluster {l}")).collect();
    encode(source, (w, h), &CLUSTERS, &names, |frame, i| usize::from(labels.data[i]) == frame, algorithm)
}

/// A Segmentation of `source` of one frame per segment (`segments`, their labels), pixel `i`
/// of frame `f` (0-based) set when `set(f, i)`.
fn encode(
    source: &DicomSource,
    (width, height): (u32, u32),
    kind: &Kind,
    segments: &[String],
    set: impl Fn(usize, usize) -> bool,
    algorithm: &Algorithm<'_>,
) -> Result<Vec<u8>, ImagingError> {
    if (width, height) != source.size() {
        return Err(not_segmentable(format!(
            "the mask is {width}×{height} but the source image is {}×{}",
            source.columns, source.rows
        )));
    }
    if segments.is_empty() || segments.len() > usize::from(u16::MAX) {
        return Err(not_segmentable(format!("{} segments", segments.len())));
    }
    let (description, series_number, content_label, content_description) = kind.series;
    let sop_instance_uid = new_uid()?;
    let series_instance_uid = series_uid_for(&source.series_instance_uid, algorithm.version, kind.name);
    let dimension_organization_uid = new_uid()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (date, time) = dicom_date_time(now);
    let pixels = width as usize * height as usize;

    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr) in REQUIRED_EMPTY {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
    }
    for e in &source.copied {
        obj.put(e.clone());
    }
    let put = |obj: &mut InMemDicomObject, tag, vr, value: &str| {
        obj.put(str_element(tag, vr, value));
    };
    obj.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, dicom_value!(Strs, ["DERIVED", "PRIMARY"])));
    put(&mut obj, tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put(&mut obj, tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    put(&mut obj, tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_SOP_CLASS);
    put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, &sop_instance_uid);
    put(&mut obj, tags::SERIES_DATE, VR::DA, &date);
    put(&mut obj, tags::SERIES_TIME, VR::TM, &time);
    put(&mut obj, tags::CONTENT_DATE, VR::DA, &date);
    put(&mut obj, tags::CONTENT_TIME, VR::TM, &time);
    put(&mut obj, tags::MODALITY, VR::CS, "SEG");
    put(&mut obj, tags::MANUFACTURER, VR::LO, "s3net");
    put(&mut obj, tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH, "+0000");
    put(&mut obj, tags::SERIES_DESCRIPTION, VR::LO, description);
    put(&mut obj, tags::MANUFACTURER_MODEL_NAME, VR::LO, "s3net");
    put(&mut obj, tags::DEVICE_SERIAL_NUMBER, VR::LO, "s3net");
    put(&mut obj, tags::SOFTWARE_VERSIONS, VR::LO, algorithm.version);
    put(&mut obj, tags::SERIES_INSTANCE_UID, VR::UI, &series_instance_uid);
    put(&mut obj, tags::SERIES_NUMBER, VR::IS, series_number);
    put(&mut obj, tags::INSTANCE_NUMBER, VR::IS, &source.instance_number.unwrap_or(1).to_string());
    obj.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)));
    put(&mut obj, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    // Said, as highdicom says it: a reader that honours the shape shows set pixels bright.
    put(&mut obj, tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY");
    put(&mut obj, tags::NUMBER_OF_FRAMES, VR::IS, &segments.len().to_string());
    for (tag, value) in [
        (tags::ROWS, height as u16),
        (tags::COLUMNS, width as u16),
        (tags::BITS_ALLOCATED, 1),
        (tags::BITS_STORED, 1),
        (tags::HIGH_BIT, 0),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
    }
    if !source.is_placed() {
        // Type 2C: where no plane orientation says where rows and columns run, this does (or
        // says, empty, that it is not known).
        obj.put(source.patient_orientation.clone().unwrap_or_else(|| DataElement::new(tags::PATIENT_ORIENTATION, VR::CS, PrimitiveValue::Empty)));
    }
    put(&mut obj, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    put(&mut obj, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    put(&mut obj, tags::CONTENT_LABEL, VR::CS, content_label);
    put(&mut obj, tags::CONTENT_DESCRIPTION, VR::LO, content_description);
    obj.put(DataElement::new(tags::CONTENT_CREATOR_NAME, VR::PN, PrimitiveValue::Empty));
    // The foreground is one segment, and clusters partition the image.
    put(&mut obj, tags::SEGMENTS_OVERLAP, VR::CS, "NO");

    let parameters: String = algorithm.parameters.chars().take(10_240).collect();
    let algorithm_identification = item([
        sequence(tags::ALGORITHM_FAMILY_CODE_SEQUENCE, vec![code("123109", "DCM", "Artificial Intelligence")]),
        str_element(tags::ALGORITHM_NAME, VR::LO, "S3-Net"),
        str_element(tags::ALGORITHM_VERSION, VR::LO, algorithm.version),
        str_element(tags::ALGORITHM_PARAMETERS, VR::LT, &parameters),
    ]);
    let segment = |number: u16, label: &str| {
        item([
            sequence(tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, vec![code("85756007", "SCT", "Tissue")]),
            DataElement::new(tags::SEGMENT_NUMBER, VR::US, PrimitiveValue::from(number)),
            str_element(tags::SEGMENT_LABEL, VR::LO, label),
            sequence(tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE, vec![algorithm_identification.clone()]),
            str_element(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
            str_element(tags::SEGMENT_ALGORITHM_NAME, VR::LO, "S3-Net"),
            sequence(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![code("85756007", "SCT", "Tissue")]),
        ])
    };
    let numbered = || segments.iter().enumerate().map(|(i, label)| (i as u16 + 1, label));
    obj.put(sequence(tags::SEGMENT_SEQUENCE, numbered().map(|(n, label)| segment(n, label)).collect()));

    // Multi-frame Dimension: frames are indexed by segment, and by position where there is one.
    obj.put(sequence(
        tags::DIMENSION_ORGANIZATION_SEQUENCE,
        vec![item([str_element(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dimension_organization_uid)])],
    ));
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        item([
            str_element(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dimension_organization_uid),
            DataElement::new(tags::DIMENSION_INDEX_POINTER, VR::AT, dicom_value!(Tags, [pointer])),
            DataElement::new(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, dicom_value!(Tags, [group])),
            str_element(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };
    let mut dimensions = vec![dimension(tags::REFERENCED_SEGMENT_NUMBER, tags::SEGMENT_IDENTIFICATION_SEQUENCE, "ReferencedSegmentNumber")];
    if source.is_placed() {
        dimensions.push(dimension(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "ImagePositionPatient"));
    }
    obj.put(sequence(tags::DIMENSION_INDEX_SEQUENCE, dimensions));

    // Shared functional groups: the source frame's pixel measures and plane orientation.
    let mut shared = InMemDicomObject::new_empty();
    // Both or neither: readers (highdicom among them) take a Pixel Measures item only whole.
    if let (Some(spacing), Some(thickness)) = (&source.pixel_spacing, &source.slice_thickness) {
        shared.put(sequence(tags::PIXEL_MEASURES_SEQUENCE, vec![item([spacing.clone(), thickness.clone()])]));
    }
    if let (Some(orientation), true) = (&source.image_orientation, source.is_placed()) {
        shared.put(sequence(tags::PLANE_ORIENTATION_SEQUENCE, vec![item([orientation.clone()])]));
    }
    obj.put(sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));

    // A frame per segment: derived from the source (image and frame), at its position.
    let mut referenced = vec![
        str_element(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &source.sop_class_uid),
        str_element(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &source.sop_instance_uid),
    ];
    if let Some(n) = source.frame_number {
        referenced.push(str_element(tags::REFERENCED_FRAME_NUMBER, VR::IS, &n.to_string()));
    }
    let mut source_image = item(referenced.clone());
    // The mask is on the source frame's own pixel grid.
    source_image.put(str_element(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"));
    source_image.put(sequence(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code("121322", "DCM", "Source image for image processing operation")],
    ));
    let derivation = item([
        sequence(tags::DERIVATION_CODE_SEQUENCE, vec![code("113076", "DCM", "Segmentation")]),
        sequence(tags::SOURCE_IMAGE_SEQUENCE, vec![source_image]),
    ]);
    let frame = |number: u16| {
        let index: Vec<u32> = if source.is_placed() { vec![u32::from(number), 1] } else { vec![u32::from(number)] };
        let mut per_frame = item([
            sequence(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation.clone()]),
            sequence(
                tags::FRAME_CONTENT_SEQUENCE,
                vec![item([DataElement::new(tags::DIMENSION_INDEX_VALUES, VR::UL, PrimitiveValue::U32(index.into()))])],
            ),
            sequence(
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                vec![item([DataElement::new(tags::REFERENCED_SEGMENT_NUMBER, VR::US, PrimitiveValue::from(number))])],
            ),
        ]);
        if let (Some(position), true) = (&source.image_position, source.is_placed()) {
            per_frame.put(sequence(tags::PLANE_POSITION_SEQUENCE, vec![item([position.clone()])]));
        }
        per_frame
    };
    obj.put(sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, numbered().map(|(n, _)| frame(n)).collect()));

    // Common Instance Reference: the source's series and instance.
    obj.put(sequence(
        tags::REFERENCED_SERIES_SEQUENCE,
        vec![item([
            sequence(tags::REFERENCED_INSTANCE_SEQUENCE, vec![item(referenced.into_iter().take(2))]),
            str_element(tags::SERIES_INSTANCE_UID, VR::UI, &source.series_instance_uid),
        ])],
    ));

    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(dicom_core::smallvec::SmallVec::from_vec(pack_bits(segments.len(), pixels, &set))),
    ));

    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(SEGMENTATION_SOP_CLASS)
        .media_storage_sop_instance_uid(sop_instance_uid.as_str())
        .transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(format!("S3NET_{}", algorithm.version).chars().take(16).collect::<String>())
        .build()
        .map_err(|e| ImagingError::Internal(format!("cannot build the Segmentation's file meta group: {e}")))?;
    let mut out = Vec::with_capacity(pack_bits_len(segments.len() * pixels) + 8192);
    obj.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(|e| ImagingError::Internal(format!("cannot write the Segmentation: {e}")))?;
    Ok(out)
}

fn pack_bits_len(pixels: usize) -> usize {
    pixels.div_ceil(8).next_multiple_of(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_the_civil_calendar_in_utc() {
        assert_eq!(dicom_date_time(0), ("19700101".into(), "000000".into()));
        // 2026-11-28 11:00:12 UTC.
        assert_eq!(dicom_date_time(1_795_863_612), ("20261128".into(), "110012".into()));
        // A leap day.
        assert_eq!(dicom_date_time(951_782_400 + 86_399), ("20000229".into(), "235959".into()));
    }

    #[test]
    fn bits_are_packed_lowest_first_without_row_padding() {
        let mask = [true, false, false, false, false, false, false, false, false, true, true];
        assert_eq!(pack_bits(1, 11, |_, i| mask[i]), vec![0b0000_0001, 0b0000_0110]);
        assert_eq!(pack_bits(1, 9, |_, _| true).len(), 2);
        assert_eq!(pack_bits(1, 17, |_, _| true).len(), 4, "padded to an even length");
        // Frames follow each other bit after bit: frame 1 of 5-pixel frames starts at bit 5.
        assert_eq!(pack_bits(2, 5, |f, i| f == 1 && i == 0), vec![0b0010_0000, 0]);
        assert_eq!(pack_bits_len(17), 4);
    }

    #[test]
    fn uids_are_uids() {
        let a = new_uid().unwrap();
        assert!(a.starts_with("2.25.") && is_uid(&a), "{a}");
        let series = series_uid_for("1.2.3", "0.1.0", "foreground");
        assert!(is_uid(&series) && series == series_uid_for("1.2.3", "0.1.0", "foreground"), "{series}");
        assert_ne!(series, series_uid_for("1.2.4", "0.1.0", "foreground"));
        assert_ne!(series, series_uid_for("1.2.3", "0.2.0", "foreground"));
        assert_ne!(series, series_uid_for("1.2.3", "0.1.0", "clusters"));
        assert_ne!(a, new_uid().unwrap());
        assert!(is_uid(IMPLEMENTATION_CLASS_UID));
        assert!(!is_uid("1.02.3") && !is_uid("1..2") && !is_uid("1.2a") && !is_uid(""));
    }
}
