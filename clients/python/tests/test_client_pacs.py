"""The DICOM Segmentations stored into a real PACS, Orthanc, over the DICOM network (C-STORE),
found there by a query (C-FIND) and read back: what a PACS-side bridge does with
``mask_dicom`` and ``labels_dicom``. Orthanc runs here as a child process with a config of its
own (storage in a temporary folder, loopback ports); where it is not installed the test skips
and says so (`.ci/run` installs Debian's package where apt can)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from typing import Iterator

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage, StudyRootQueryRetrieveInformationModelFind

from pyclient_support import DATA, FAST, wait_until
from s3net_client import Client

# Debian installs it in /usr/sbin, which a user's PATH may not hold.
ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
CT = DATA / "dicom" / "CT_small.dcm"

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed; CI installs it where apt can")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, http: int, dicom: int) -> None:
        self.http, self.dicom = http, dicom

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    home = tmp_path_factory.mktemp("orthanc")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "s3net-test",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "Plugins": [],
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = open(home / "orthanc.log", "wb")
    process = subprocess.Popen([ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    pacs = Orthanc(http, dicom)

    def up() -> bool:
        try:
            return pacs.get("/system")["DicomAet"] == "ORTHANC"
        except OSError:
            return False

    try:
        wait_until(up, timeout=30)
        yield pacs
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def store(pacs: Orthanc, datasets) -> list:
    """C-STORE each data set in one association; their statuses."""
    ae = AE(ae_title="S3NET")
    for sop_class in (CTImageStorage, SegmentationStorage):
        ae.add_requested_context(sop_class)
    association = ae.associate("127.0.0.1", pacs.dicom, ae_title="ORTHANC")
    assert association.is_established, "no association with Orthanc"
    try:
        return [association.send_c_store(ds).Status for ds in datasets]
    finally:
        association.release()


def find_series(pacs: Orthanc, study_uid: str, modality: str) -> list:
    """C-FIND at series level: the Series Instance UIDs of `modality` in the study."""
    ae = AE(ae_title="S3NET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.Modality = modality
    query.SeriesInstanceUID = ""
    query.SeriesDescription = ""
    association = ae.associate("127.0.0.1", pacs.dicom, ae_title="ORTHANC")
    assert association.is_established
    found = []
    try:
        for status, identifier in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.append((identifier.SeriesInstanceUID, identifier.SeriesDescription))
    finally:
        association.release()
    return found


def test_both_segmentations_are_stored_into_a_pacs_beside_their_source_and_found_there(
    client: Client, orthanc: Orthanc
) -> None:
    r = client.segment(CT, dicom_seg=True, dicom_seg_clusters=True, **FAST)
    source = pydicom.dcmread(CT)
    mask, labels = (pydicom.dcmread(io.BytesIO(b)) for b in (r.mask_dicom, r.labels_dicom))
    # The PACS accepts all three (status 0x0000, Success).
    assert store(orthanc, [source, mask, labels]) == [0x0000, 0x0000, 0x0000]
    # Filed in the source's study, each Segmentation a series of its own.
    studies = orthanc.get("/studies")
    assert len(studies) == 1
    study = orthanc.get(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID
    series = [orthanc.get(f"/series/{s}")["MainDicomTags"] for s in study["Series"]]
    assert sorted(s["Modality"] for s in series) == ["CT", "SEG", "SEG"]
    # A query finds them, as a viewer or a bridge would.
    found = find_series(orthanc, source.StudyInstanceUID, "SEG")
    assert sorted(uid for uid, _ in found) == sorted([mask.SeriesInstanceUID, labels.SeriesInstanceUID])
    # Read back: the same objects, pixels and references.
    for sent in (mask, labels):
        (instance,) = [
            i for i in orthanc.get("/instances") if orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == sent.SOPInstanceUID
        ]
        back = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance}/file")))
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert back.PixelData == sent.PixelData and back.NumberOfFrames == sent.NumberOfFrames
        assert back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert len(back.SegmentSequence) == len(sent.SegmentSequence)
