"""The DICOM Segmentations stored into a real PACS, Orthanc, over the DICOM network (C-STORE),
found there by a query (C-FIND) and read back: what a PACS-side bridge does with
``mask_dicom`` and ``labels_dicom``; and the client's own bridge (``s3net-pacs-bridge``)
between Orthanc and a server, end to end. Orthanc runs here as a child process with a config of
its own (storage in a temporary folder, loopback ports); where it is not installed the tests
skip and say so (`.ci/run` installs Debian's package where apt can)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import grpc
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from pyclient_support import DATA, FAST, REPO, make_pki, start_server, wait_until
from s3net_client import Client
from s3net_client.errors import Unavailable
from s3net_client.bridge import Bridge, Node

# Debian installs it in /usr/sbin, which a user's PATH may not hold.
ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
CT = DATA / "dicom" / "CT_small.dcm"

pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed; CI installs it where apt can")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, http: int, dicom: int, bridge: int) -> None:
        self.http, self.dicom, self.bridge = http, dicom, bridge

    def get(self, path: str):
        return self.post(path, None)

    def post(self, path: str, body, method: Optional[str] = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = r.read()
        return json.loads(answer) if r.headers.get_content_type() == "application/json" else answer

    def empty(self) -> None:
        """Deletes every study: each test starts from an empty PACS."""
        for study in self.get("/studies"):
            self.post(f"/studies/{study}", None, method="DELETE")


@contextlib.contextmanager
def run_orthanc(home: Path, bridge: int, tls: Optional[Dict[str, Path]] = None) -> Iterator[Orthanc]:
    """An Orthanc on loopback ports with its storage in `home`, which knows the bridge under
    test as its modality "bridge" (AE S3NET on port `bridge`). With `tls` (from `make_pki`)
    its DICOM port speaks TLS only, requires a certificate signed by the test CA, and it sends
    to the bridge over TLS."""
    http, dicom = free_port(), free_port()
    modality: Any = ["S3NET", "127.0.0.1", bridge]
    config: Dict[str, Any] = {
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
        "DicomAlwaysAllowEcho": True,
        "Plugins": [],
    }
    if tls is not None:
        modality = {"AET": "S3NET", "Host": "127.0.0.1", "Port": bridge, "UseDicomTls": True}
        config.update(
            DicomTlsEnabled=True,
            DicomTlsCertificate=str(tls["orthanc_cert"]),
            DicomTlsPrivateKey=str(tls["orthanc_key"]),
            DicomTlsTrustedCertificates=str(tls["ca"]),
            DicomTlsRemoteCertificateRequired=True,
        )
    # The bridge under test, which Orthanc sends images to.
    config["DicomModalities"] = {"bridge": modality}
    (home / "orthanc.json").write_text(json.dumps(config))
    log = open(home / "orthanc.log", "wb")
    process = subprocess.Popen([ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    pacs = Orthanc(http, dicom, bridge)

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


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), free_port()) as pacs:
        yield pacs


def c_store(port: int, datasets, calling: str = "S3NET", called: str = "S3NET") -> list:
    """C-STOREs each data set to the node on `port` (AE `called`) from AE `calling`, in one
    association; their statuses."""
    ae = AE(ae_title=calling)
    for sop_class in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(sop_class)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established, f"no association with {called}"
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
    orthanc.empty()
    r = client.segment(CT, dicom_seg=True, dicom_seg_clusters=True, **FAST)
    source = pydicom.dcmread(CT)
    mask, labels = (pydicom.dcmread(io.BytesIO(b)) for b in (r.mask_dicom, r.labels_dicom))
    # The PACS accepts all three (status 0x0000, Success).
    assert c_store(orthanc.dicom, [source, mask, labels], called="ORTHANC") == [0x0000, 0x0000, 0x0000]
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


def test_the_bridge_segments_what_a_pacs_sends_it_and_stores_the_segmentations_back(
    server, orthanc: Orthanc
) -> None:
    """Orthanc sends a CT slice and an MR slice to `s3net-pacs-bridge` (its DICOM modality
    "bridge") by C-STORE; the bridge has the server segment each and stores both
    Segmentations of each back into Orthanc, where they join their source's study. Something
    the service cannot segment (an instance without pixel data) is counted as failed and the
    bridge goes on."""
    orthanc.empty()
    with Client(server.addr) as client:
        bridge = Bridge(
            client, Node("ORTHANC", "127.0.0.1", orthanc.dicom), ae_title="S3NET", host="127.0.0.1",
            port=orthanc.bridge, clusters=True, options=FAST,
        ).start()
        try:
            sources = {}
            for name in ("CT_small", "MR_small"):
                uploaded = orthanc.post("/instances", (DATA / "dicom" / f"{name}.dcm").read_bytes())
                sources[name] = uploaded
                job = orthanc.post("/modalities/bridge/store", uploaded["ID"].encode())
                assert job.get("FailedInstancesCount", 0) == 0, job

            def both_segmented() -> bool:
                studies = [orthanc.get(f"/studies/{s['ParentStudy']}") for s in sources.values()]
                return all(len(study["Series"]) == 3 for study in studies)

            wait_until(both_segmented, timeout=120)
            for name, uploaded in sources.items():
                source = pydicom.dcmread(DATA / "dicom" / f"{name}.dcm")
                study = orthanc.get(f"/studies/{uploaded['ParentStudy']}")
                series = [orthanc.get(f"/series/{s}") for s in study["Series"]]
                segs = [s for s in series if s["MainDicomTags"]["Modality"] == "SEG"]
                assert len(segs) == 2, name
                for seg_series in segs:
                    (instance,) = seg_series["Instances"]
                    seg = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance}/file")))
                    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID, name
            # A structured report (made by Orthanc), no pixel data: not an image to segment.
            report = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11", "Modality": "SR", "PatientName": "NO^PIXELS"}
            empty = orthanc.post("/tools/create-dicom", json.dumps({"Tags": report}).encode())
            orthanc.post("/modalities/bridge/store", empty["ID"].encode())
            wait_until(lambda: bridge.failed == 1, timeout=60)
        finally:
            bridge.stop()
        assert (bridge.received, bridge.stored, bridge.failed) == (3, 2, 1)


def test_the_bridge_refuses_images_past_its_pending_bound_for_the_pacs_to_retry(
    server, orthanc: Orthanc
) -> None:
    """Sent more images at once than it lets wait (here 1, one fit at a time), the bridge
    answers the extra C-STOREs "out of resources" (0xA700), which a PACS retries later, and
    segments and stores every image it accepted."""
    orthanc.empty()
    ct = pydicom.dcmread(CT)
    with Client(server.addr) as client:
        bridge = Bridge(
            client, Node("ORTHANC", "127.0.0.1", orthanc.dicom), host="127.0.0.1", port=orthanc.bridge,
            # Fits of about a second: the six C-STOREs all arrive during the first.
            concurrency=1, max_pending=1, options=dict(size=64, iterations=100, min_labels=0, seed=7),
        ).start()
        try:
            statuses = c_store(orthanc.bridge, [ct] * 6, calling="PACS")
        finally:
            bridge.stop()
    assert set(statuses) == {0x0000, 0xA700}, statuses
    accepted = statuses.count(0x0000)
    assert (bridge.received, bridge.stored, bridge.failed) == (accepted, accepted, 0)


def test_a_spooled_bridge_loses_nothing_a_pacs_was_told_is_stored(server, orthanc: Orthanc, tmp_path) -> None:
    """With a spool, an image is on disk before its C-STORE is answered. A bridge whose s3net
    server cannot be reached keeps the images it took (deferred, still in the spool); a bridge
    started later on the same spool, with a server, takes them up, and their Segmentations
    reach the PACS; the spool is then empty (a half-written image, whose C-STORE was never
    answered, is removed: its PACS sends it again)."""
    orthanc.empty()
    spool = tmp_path / "spool"
    destination = Node("ORTHANC", "127.0.0.1", orthanc.dicom)
    sources = [DATA / "dicom" / f"{n}.dcm" for n in ("CT_small", "MR_small")]
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as nowhere:
        down = Bridge(nowhere, destination, host="127.0.0.1", port=orthanc.bridge, spool=spool, options=FAST).start()
        try:
            for path in sources:
                uploaded = orthanc.post("/instances", path.read_bytes())
                orthanc.post("/modalities/bridge/store", uploaded["ID"].encode())
            wait_until(lambda: down.deferred == 2, timeout=60)
        finally:
            down.stop()
    assert (down.received, down.stored, down.failed, down.deferred) == (2, 0, 0, 2)
    assert len(list(spool.glob("*.dcm"))) == 2
    # What a bridge that died while writing an image leaves: never answered, so not kept.
    (spool / "1-2-3.part").write_bytes(b"half an image")
    with Client(server.addr) as client:
        up = Bridge(client, destination, host="127.0.0.1", port=orthanc.bridge, spool=spool, options=FAST).start()
        try:
            wait_until(lambda: up.stored == 2, timeout=120)
        finally:
            up.stop()
    assert list(spool.iterdir()) == []
    seg_series = [s for s in map(lambda i: orthanc.get(f"/series/{i}"), orthanc.get("/series")) if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(seg_series) == 2


def echo(port: int, calling: str, tls=None) -> Optional[int]:
    """A C-ECHO to the bridge on `port` from AE `calling`: its status, or None if the
    association was refused or failed."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title="S3NET", tls_args=tls)
    if not association.is_established:
        return None
    try:
        return association.send_c_echo().Status
    finally:
        association.release()


def seg_series(pacs: Orthanc) -> list:
    return [s for s in (pacs.get(f"/series/{i}") for i in pacs.get("/series")) if s["MainDicomTags"]["Modality"] == "SEG"]


def seg_instances(pacs: Orthanc) -> int:
    return sum(len(s["Instances"]) for s in seg_series(pacs))


def metrics_of(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers.get_content_type() == "text/plain"
        return r.read().decode()


def test_the_bridge_answers_echo_takes_only_the_ae_titles_it_allows_and_shows_its_counters(
    server, orthanc: Orthanc
) -> None:
    """A PACS administrator's first step with a new node is "echo" (C-ECHO): the bridge
    answers it. With an allow-list of calling AE titles, an association from any other is
    refused (counted), and those allowed are served as before. Its counters are served in
    Prometheus's format."""
    orthanc.empty()
    with Client(server.addr) as client:
        bridge = Bridge(
            client, Node("ORTHANC", "127.0.0.1", orthanc.dicom), host="127.0.0.1", port=orthanc.bridge,
            allowed=["ORTHANC", "PACS"], options=FAST,
        ).start()
        metrics = bridge.serve_metrics("127.0.0.1", 0)
        try:
            # Orthanc's own "test this modality" (its AE is allowed): HTTP 200, else an error.
            assert orthanc.post("/modalities/bridge/echo", b"{}") == {}
            assert echo(orthanc.bridge, "PACS") == 0x0000
            assert echo(orthanc.bridge, "STRANGER") is None
            wait_until(lambda: bridge.rejected == 1)
            assert c_store(orthanc.bridge, [pydicom.dcmread(CT)], calling="PACS") == [0x0000]
            wait_until(lambda: bridge.stored == 1, timeout=120)
            text = metrics_of(metrics.server_address[1])
            for line in (
                's3net_bridge_images_total{outcome="received"} 1',
                's3net_bridge_images_total{outcome="stored"} 1',
                's3net_bridge_images_total{outcome="failed"} 0',
                "s3net_bridge_rejected_associations_total 1",
                "s3net_bridge_waiting 0",
                "s3net_bridge_in_flight 0",
                "s3net_bridge_max_pending 64",
            ):
                assert line in text.splitlines(), (line, text)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics.server_address[1]}/other", timeout=10)
            assert e.value.code == 404
        finally:
            metrics.shutdown()
            bridge.stop()
    assert len(seg_series(orthanc)) == 1


def test_the_bridge_retries_while_it_runs_and_keeps_made_segmentations_for_their_destination(
    server, orthanc: Orthanc, tmp_path
) -> None:
    """(1) The s3net server is down when an image arrives and comes up later: the bridge,
    still running, tries again and stores the image's Segmentation. (2) The destination is
    down: the Segmentation, made once, is kept in the spool beside its image, and a bridge
    started later on that spool stores it with no s3net server at all (no second fit)."""
    orthanc.empty()
    ct = pydicom.dcmread(CT)
    destination = Node("ORTHANC", "127.0.0.1", orthanc.dicom)
    port = free_port()
    late = None
    with Client(f"127.0.0.1:{port}", retries=0, timeout=30) as client:
        bridge = Bridge(client, destination, host="127.0.0.1", port=orthanc.bridge, retry_interval=0.5, options=FAST).start()
        try:
            assert c_store(orthanc.bridge, [ct], calling="PACS") == [0x0000]
            wait_until(lambda: bridge.deferred >= 2, timeout=60)  # tried, and tried again
            assert bridge.stored == 0 and bridge.waiting == 1
            late = start_server("--cpu-workers", "1", "--addr", f"127.0.0.1:{port}")
            wait_until(lambda: bridge.stored == 1, timeout=120)
        finally:
            bridge.stop()
            if late is not None:
                late.stop()
    assert (bridge.received, bridge.stored, bridge.failed, bridge.waiting) == (1, 1, 0, 0)
    assert seg_instances(orthanc) == 1

    spool = tmp_path / "spool"
    with Client(server.addr) as client:
        down = Bridge(
            client, Node("ORTHANC", "127.0.0.1", free_port()), host="127.0.0.1", port=orthanc.bridge,
            spool=spool, retry_interval=600, options=FAST,
        ).start()
        try:
            assert c_store(orthanc.bridge, [ct], calling="PACS") == [0x0000]
            wait_until(lambda: down.deferred == 1, timeout=120)
        finally:
            down.stop()
    (image,) = spool.glob("*.dcm")
    (seg,) = (spool / f"{image.stem}.segs").glob("*.dcm")
    assert pydicom.dcmread(seg).Modality == "SEG"
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as nowhere:
        up = Bridge(nowhere, destination, host="127.0.0.1", port=orthanc.bridge, spool=spool, options=FAST).start()
        try:
            wait_until(lambda: up.stored == 1, timeout=60)
        finally:
            up.stop()
    assert (up.failed, up.deferred) == (0, 0)
    assert list(spool.iterdir()) == []
    assert seg_instances(orthanc) == 2  # the slice's Segmentation series, with both fits' instances


def test_the_bridge_command_over_dicom_tls_and_mutual_tls_to_its_server(tmp_path) -> None:
    """`s3net-pacs-bridge` as an integrator runs it, everything encrypted: a TLS Orthanc that
    requires client certificates echoes the bridge and sends it a CT slice over TLS; the
    bridge has a server that requires mutual TLS and a token segment it, and stores the
    Segmentation back into Orthanc over TLS. A plain association to the bridge fails. SIGTERM
    ends it with its counts."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    token = "bridge-test-token"
    secure = start_server(
        "--cpu-workers", "1",
        env={
            "S3NET__SERVER__TLS__CERT": str(pki["server_cert"]),
            "S3NET__SERVER__TLS__KEY": str(pki["server_key"]),
            "S3NET__SERVER__TLS__CLIENT_CA": str(pki["ca"]),
            "S3NET__SERVER__AUTH_TOKEN": token,
        },
    )
    bridge_port, metrics_port = free_port(), free_port()
    (tmp_path / "orthanc").mkdir()
    try:
        with run_orthanc(tmp_path / "orthanc", bridge_port, tls=pki) as pacs:
            log = open(tmp_path / "bridge.log", "w+")
            command = [
                sys.executable, "-m", "s3net_client.bridge",
                "--addr", secure.addr, "--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]),
                "--key", str(pki["client_key"]), "--host", "127.0.0.1", "--port", str(bridge_port),
                "--destination", f"ORTHANC@127.0.0.1:{pacs.dicom}", "--allow", "ORTHANC",
                "--dicom-tls-cert", str(pki["bridge_cert"]), "--dicom-tls-key", str(pki["bridge_key"]),
                "--dicom-tls-ca", str(pki["ca"]), "--destination-tls",
                "--metrics-listen", f"127.0.0.1:{metrics_port}", "--size", "64", "--iterations", "2",
            ]
            env = {**os.environ, "S3NET_TOKEN": token, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
            bridge = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            silent: Optional[socket.socket] = None
            try:

                def listening() -> bool:
                    try:
                        return "s3net_bridge_waiting 0" in metrics_of(metrics_port)
                    except OSError:
                        assert bridge.poll() is None, "the bridge exited"
                        return False

                wait_until(listening, timeout=30)
                # A caller that connects and says nothing holds up no one (TLS handshakes
                # happen in each association's thread, not in the one that accepts them).
                silent = socket.create_connection(("127.0.0.1", bridge_port))
                assert pacs.post("/modalities/bridge/echo", b"{}") == {}
                uploaded = pacs.post("/instances", CT.read_bytes())
                job = pacs.post("/modalities/bridge/store", uploaded["ID"].encode())
                assert job.get("FailedInstancesCount", 0) == 0, job
                wait_until(lambda: len(seg_series(pacs)) == 1, timeout=120)
                (seg,) = seg_series(pacs)[0]["Instances"]
                seg = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{seg}/file")))
                referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
                assert referenced.ReferencedSOPInstanceUID == pydicom.dcmread(CT).SOPInstanceUID
                # Without TLS, or over TLS without a certificate the CA signed, no association;
                # with one, an echo.
                assert echo(bridge_port, "ORTHANC") is None
                anonymous = ssl.create_default_context(cafile=str(pki["ca"]))
                assert echo(bridge_port, "ORTHANC", tls=(anonymous, "127.0.0.1")) is None
                signed = ssl.create_default_context(cafile=str(pki["ca"]))
                signed.load_cert_chain(str(pki["orthanc_cert"]), str(pki["orthanc_key"]))
                assert echo(bridge_port, "ORTHANC", tls=(signed, "127.0.0.1")) == 0x0000
                # Counted once its C-STORE is answered, which Orthanc files first.
                wait_until(lambda: 's3net_bridge_images_total{outcome="stored"} 1' in metrics_of(metrics_port))
            finally:
                if silent is not None:
                    silent.close()
                bridge.send_signal(signal.SIGTERM)
                rc = bridge.wait(timeout=60)
            log.seek(0)
            output = log.read()
            assert rc == 0, output
            assert "listening on 127.0.0.1:%d as S3NET (TLS)" % bridge_port in output, output
            assert "received 1, stored 1, failed 0" in output, output
    finally:
        secure.stop()


def three_frames() -> pydicom.Dataset:
    """The enhanced CT of three frames, in a study and series of its own (the test file was
    made without them, which a PACS would not take either)."""
    volume = pydicom.dcmread(DATA / "dicom" / "CT_small_enhanced_3frames.dcm")
    volume.StudyInstanceUID = pydicom.uid.generate_uid()
    volume.SeriesInstanceUID = pydicom.uid.generate_uid()
    return volume


def bridge_until(client: Any, orthanc: Orthanc, volume: Optional[pydicom.Dataset], done: Any = None, **options: Any) -> Bridge:
    """Sends `volume` (None: nothing, e.g. for a bridge that takes up its spool) to a bridge
    with `all_frames` that stores into `orthanc`, and stops the bridge once `done(bridge)`
    (default: one image stored or failed); the stopped bridge."""
    bridge = Bridge(
        client, Node("ORTHANC", "127.0.0.1", orthanc.dicom), host="127.0.0.1", port=orthanc.bridge,
        all_frames=True, options=FAST, **options,
    ).start()
    try:
        if volume is not None:
            assert c_store(orthanc.bridge, [volume], calling="PACS") == [0x0000]
        wait_until(lambda: (done or (lambda b: b.stored + b.failed == 1))(bridge), timeout=120)
    finally:
        bridge.stop()
    return bridge


def test_the_bridge_segments_every_frame_of_a_multi_frame_image_when_asked(server, orthanc: Orthanc) -> None:
    """An enhanced CT of three frames sent to a bridge with `all_frames`: three jobs, and three
    Segmentations in Orthanc, in one series, each referencing its frame of the source."""
    orthanc.empty()
    volume = three_frames()
    with Client(server.addr) as client:
        assert bridge_until(client, orthanc, volume).stored == 1
    (series,) = seg_series(orthanc)
    frames = []
    for instance in series["Instances"]:
        seg = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance}/file")))
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == volume.SOPInstanceUID
        # The segment's frame is derived from the source's frame it names.
        derived = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert derived.ReferencedSOPInstanceUID == volume.SOPInstanceUID
        frames.append(int(derived.ReferencedFrameNumber))
    assert sorted(frames) == [1, 2, 3]


class _FailsOnce:
    """The bridge's client, failing the first call for `frame` with UNAVAILABLE (as a server
    that went away mid-volume would) and counting the calls per frame; the rest go to the real
    client and server."""

    def __init__(self, client: Client, frame: int) -> None:
        self.client, self.frame, self.calls = client, frame, Counter()

    def segment(self, data: Any, **kw: Any) -> Any:
        frame = kw.get("frame", 0)
        self.calls[frame] += 1
        if frame == self.frame and self.calls[frame] == 1:
            raise Unavailable("the server went away", code=grpc.StatusCode.UNAVAILABLE)
        return self.client.segment(data, **kw)


def test_a_multi_frame_image_is_retried_from_the_frame_that_failed(server, orthanc: Orthanc) -> None:
    """With `all_frames`, a transient failure on the second of three frames: the retry goes on
    from that frame, keeping the first frame's Segmentation (three fits, not four), and all
    three are stored."""
    orthanc.empty()
    with Client(server.addr) as real:
        client = _FailsOnce(real, frame=1)
        bridge = bridge_until(client, orthanc, three_frames(), retry_interval=0.2)
        assert (bridge.stored, bridge.deferred) == (1, 1)
    assert client.calls == Counter({0: 1, 1: 2, 2: 1})
    (series,) = seg_series(orthanc)
    assert len(series["Instances"]) == 3


def test_a_bridge_started_again_on_its_spool_goes_on_from_the_frame_that_failed(server, orthanc: Orthanc, tmp_path) -> None:
    """With `all_frames` and a spool, each frame's Segmentation is kept on disk as it is made:
    a bridge stopped after the second of three frames failed leaves the first frame's in the
    spool, and a bridge started again on it fits only the other two (a frame's folder left
    half-written is made again), stores all three, and leaves the spool empty."""
    orthanc.empty()
    spool = tmp_path / "spool"
    with Client(server.addr) as real:
        first = _FailsOnce(real, frame=1)
        bridge_until(first, orthanc, three_frames(), lambda b: b.deferred == 1, spool=spool, retry_interval=600)
        assert first.calls == Counter({0: 1, 1: 1})
        (image,) = spool.glob("*.dcm")
        frames = spool / f"{image.stem}.frames"
        assert sorted(p.name for p in frames.iterdir()) == ["0"]
        assert len(list((frames / "0").glob("*.dcm"))) == 1
        # What a bridge that died while keeping frame 1 would leave: not whole, so not taken.
        (frames / "1.part").mkdir()
        (frames / "1.part" / "0.dcm").write_bytes(b"half a Segmentation")
        again = _FailsOnce(real, frame=-1)
        assert bridge_until(again, orthanc, None, spool=spool).stored == 1
    assert again.calls == Counter({1: 1, 2: 1})
    assert list(spool.iterdir()) == []
    (series,) = seg_series(orthanc)
    assert len(series["Instances"]) == 3


def test_a_spool_that_cannot_keep_a_frame_does_not_lose_the_image(server, orthanc: Orthanc, tmp_path, monkeypatch, caplog) -> None:
    """Keeping a frame's Segmentations in the spool fails (a full disk, say): the frames made
    stay in memory, the image is still stored whole, and the log says what was not kept."""
    import s3net_client.bridge as bridge_module

    def full(*_args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bridge_module, "_write_folder", full)
    orthanc.empty()
    with Client(server.addr) as client:
        assert bridge_until(client, orthanc, three_frames(), spool=tmp_path / "spool").stored == 1
    (series,) = seg_series(orthanc)
    assert len(series["Instances"]) == 3
    assert "frame 1's Segmentations not kept in the spool: [Errno 28] No space left on device" in caplog.text
    assert list((tmp_path / "spool").iterdir()) == []


class Destination:
    """A pynetdicom storage SCP as the bridge's destination: counts the associations it
    accepts and the Segmentations it stores, and closes an association that sends nothing
    for `idle` seconds, as a PACS does."""

    def __init__(self, idle: float) -> None:
        from pynetdicom import evt
        from pynetdicom.sop_class import SegmentationStorage

        self.accepted = self.stored = 0
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SegmentationStorage)
        ae.network_timeout = idle

        def accepted(_event: Any) -> None:
            self.accepted += 1

        def store(_event: Any) -> int:
            self.stored += 1
            return 0x0000

        self.port = free_port()
        handlers = [(evt.EVT_ACCEPTED, accepted), (evt.EVT_C_STORE, store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        self._server.shutdown()


def test_the_bridge_keeps_its_association_to_the_destination_between_images(server) -> None:
    """(1) Three images sent one after another: their Segmentations go over one association
    (kept open `keep_association` seconds after each store), counted in the metrics. (2) A
    destination that closes the kept association when idle: the next image's Segmentation goes
    over a new one at once, without a retry. (3) `keep_association=0`: one association per
    image, as before it was kept."""
    ct = pydicom.dcmread(CT)
    patient, hasty = Destination(idle=60), Destination(idle=1)
    try:
        with Client(server.addr) as client:
            for destination, keep in ((patient, 30.0), (hasty, 30.0), (patient, 0.0)):
                port = free_port()
                bridge = Bridge(
                    client, Node("DEST", "127.0.0.1", destination.port), host="127.0.0.1", port=port,
                    keep_association=keep, options=FAST,
                ).start()
                before = destination.accepted
                try:
                    for n in (1, 2, 3) if destination is patient else (1, 2):
                        if destination is hasty and n == 2:
                            time.sleep(3)  # the destination closes the idle association
                        assert c_store(port, [ct], calling="PACS") == [0x0000]
                        wait_until(lambda: bridge.stored == n, timeout=120)
                    made = destination.accepted - before
                    if destination is patient and keep > 0:
                        assert made == 1
                        assert "s3net_bridge_destination_associations_total 1\n" in bridge.metrics_text()
                    else:
                        assert made == bridge.stored, (keep, made)
                    assert bridge.deferred == 0 and bridge.failed == 0
                finally:
                    bridge.stop()
        assert (patient.stored, hasty.stored) == (6, 2)
    finally:
        patient.stop()
        hasty.stop()


def test_a_spooled_images_retry_clock_counts_from_its_arrival_not_from_the_start(tmp_path) -> None:
    """An image left in the spool two days ago (its file's name says when it came) is given up
    at its first failed try by a bridge started now with a day's `retry_for`; one that came a
    minute ago is kept for a retry."""
    spool = tmp_path / "spool"
    spool.mkdir()
    now = time.time_ns()
    old, recent = spool / f"{now - 2 * 86400 * 10**9}-1-0.dcm", spool / f"{now - 60 * 10**9}-1-1.dcm"
    for path in (old, recent):
        shutil.copy(CT, path)
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as nowhere:
        bridge = Bridge(
            nowhere, Node("DEST", "127.0.0.1", free_port()), host="127.0.0.1", port=free_port(),
            spool=spool, retry_interval=600, retry_for=86400, options=FAST,
        ).start()
        try:
            wait_until(lambda: bridge.failed == 1 and bridge.deferred == 1, timeout=60)
        finally:
            bridge.stop()
    assert not old.exists() and recent.exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--offset-lr", "0", "argument --offset-lr: must be above 0, got '0'"),
        ("--offset-lr", "nan", "argument --offset-lr: must be above 0, got 'nan'"),
        ("--features", "-3", "argument --features: must be above 0, got '-3'"),
        ("--iterations", "many", "argument --iterations: expected a number, got 'many'"),
        ("--precision", "fp8", "argument --precision: invalid choice: 'fp8'"),
    ],
)
def test_the_bridge_command_refuses_a_bad_fit_option_at_start(flag: str, value: str, message: str, capsys) -> None:
    """A fit option no server would take stops the command at start (exit 2, naming it),
    rather than failing every image the bridge is sent."""
    from s3net_client.bridge import main

    with pytest.raises(SystemExit) as e:
        main(["--destination", "PACS@127.0.0.1:104", flag, value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
