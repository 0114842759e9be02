"""DICOM Segmentation output (``dicom_seg=True``), read by highdicom, a reader independent of
the server's writer: what a PACS-side bridge would store and a viewer would lay over the
source slice."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pyclient_support import BIN, DATA, FAST, REPO
from s3net_client import Client, InvalidArgument

CT = DATA / "dicom" / "CT_small.dcm"


def read_seg(data: bytes) -> hd.seg.Segmentation:
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(data)))


def test_a_ct_slices_mask_comes_back_filed_and_placed_on_its_slice(client: Client) -> None:
    r = client.segment(CT, dicom_seg=True, **FAST)
    source = pydicom.dcmread(CT)
    seg = read_seg(r.mask_dicom)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    # Filed with its source: same patient and study, a series of its own.
    assert (seg.PatientName, seg.PatientID) == (source.PatientName, source.PatientID)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    # One segment, made by an automatic algorithm, whose parameters are the fit's options.
    (segment,) = seg.SegmentSequence
    assert (segment.SegmentNumber, segment.SegmentLabel) == (1, "Foreground")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    parameters = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert json.loads(parameters) == r.options.all and r.options.all["iterations"] == 2
    # The mask, pixel for pixel, indexed by the source instance.
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), r.mask)
    # Placed on the source slice: same frame of reference, position, orientation, spacing.
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    volume = seg.get_volume()
    assert volume.spatial_shape == (1, 128, 128)
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in source.ImagePositionPatient])
    row, column = (float(v) for v in source.PixelSpacing)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, 1]), row)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, 2]), column)


def test_the_clusters_come_back_as_a_segmentation_of_their_own(client: Client) -> None:
    r = client.segment(CT, dicom_seg=True, dicom_seg_clusters=True, **FAST)
    source = pydicom.dcmread(CT)
    clusters, foreground = read_seg(r.labels_dicom), read_seg(r.mask_dicom)
    assert clusters.SeriesInstanceUID not in (foreground.SeriesInstanceUID, source.SeriesInstanceUID)
    assert clusters.StudyInstanceUID == source.StudyInstanceUID
    assert [s.SegmentLabel for s in clusters.SegmentSequence] == [
        f"Cluster {label}" for label in range(r.labels_used)
    ]
    # Each cluster's segment is the label map's pixels of that label; they do not overlap.
    numbers = list(range(1, r.labels_used + 1))
    pixels = clusters.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=numbers)
    for label in range(r.labels_used):
        np.testing.assert_array_equal(pixels[0, :, :, label].astype(bool), r.labels == label)
    assert clusters.SegmentsOverlap == "NO"
    # Either may be asked alone.
    alone = client.segment(CT, dicom_seg_clusters=True, **FAST)
    assert alone.labels_dicom and alone.mask_dicom == b""


def test_a_secondary_capture_is_referenced_but_not_placed(client: Client) -> None:
    path = DATA / "dicom" / "SC_rgb_rle.dcm"
    r = client.segment(path, dicom_seg=True, **FAST)
    source = pydicom.dcmread(path)
    seg = read_seg(r.mask_dicom)
    assert "FrameOfReferenceUID" not in seg and seg.PatientName == source.PatientName
    pixels = seg.get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[1], ignore_spatial_locations=True
    )
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), r.mask)


def test_not_asked_not_sent_and_refused_for_other_formats(client: Client) -> None:
    assert client.segment(CT, **FAST).mask_dicom == b""
    with pytest.raises(InvalidArgument, match="DICOM Segmentation.*this image is PNG"):
        client.segment(DATA / "ph2" / "IMD002.png", dicom_seg=True, **FAST)
    with pytest.raises(InvalidArgument, match="dicom_seg_clusters asks for the clusters as a DICOM"):
        client.segment(DATA / "ph2" / "IMD002.png", dicom_seg_clusters=True, **FAST)


def test_both_clis_and_the_local_segment_write_it(server, tmp_path: Path) -> None:
    fit = ["--size", "64", "--iterations", "2", "--seed", "7", "--dicom-seg", "--dicom-seg-clusters"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
    env.pop("S3NET_TOKEN", None)
    runs = {
        "py": [sys.executable, "-m", "s3net_client.cli", "segment", "--addr", server.addr],
        "rust": [str(BIN), "client", "segment", "--addr", f"http://{server.addr}"],
        "local": [str(BIN), "segment", "--device", "cpu"],
    }
    masks = {}
    for name, command in runs.items():
        out = tmp_path / name
        subprocess.run(
            [*command, str(CT), "--out", str(out), *fit],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        assert sorted(f.name for f in out.iterdir()) == [
            "CT_small.json",
            "CT_small.labels.png",
            "CT_small.labels.seg.dcm",
            "CT_small.mask.png",
            "CT_small.seg.dcm",
        ], name
        masks[name] = pydicom.dcmread(out / "CT_small.seg.dcm").pixel_array
    np.testing.assert_array_equal(masks["py"], masks["rust"])  # same seed, same fit
    np.testing.assert_array_equal(masks["py"], masks["local"])
    png = tmp_path / "not-dicom"
    p = subprocess.run(
        [*runs["local"], str(DATA / "ph2" / "IMD002.png"), "--out", str(png), *fit],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "--dicom-seg needs a DICOM input" in p.stderr, p.stderr


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed; CI installs it where apt can")
def test_dciodvfy_finds_no_error_in_either_segmentation(client: Client, tmp_path: Path) -> None:
    """David Clunie's validator of DICOM objects against the standard's IOD tables, on both
    Segmentations of a CT (placed on its slice), an MR, an X-ray, an ultrasound palette image
    and a secondary capture (neither placed: they carry Patient Orientation instead). Warnings
    are the source's (a zero Patient's Weight, Study Date missing for a DICOMDIR)."""
    for name in ("CT_small", "MR_small", "DX_voi_lut", "US_palette", "SC_rgb_jpeg_dcmtk"):
        r = client.segment(DATA / "dicom" / f"{name}.dcm", dicom_seg=True, dicom_seg_clusters=True, **FAST)
        for kind, data in (("seg", r.mask_dicom), ("labels.seg", r.labels_dicom)):
            path = tmp_path / f"{name}.{kind}.dcm"
            path.write_bytes(data)
            out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
            said = (out.stdout + out.stderr).splitlines()
            assert "Segmentation" in said, f"{path.name}: {said}"
            errors = [line for line in said if line.startswith("Error")]
            assert not errors, f"{path.name}: {errors}"
