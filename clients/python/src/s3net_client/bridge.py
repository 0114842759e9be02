"""``s3net-pacs-bridge``: a DICOM node between a PACS and s3net.

A PACS (or a modality, or a router) sends images to it by C-STORE, as it would to any DICOM
node; each is segmented by an s3net server with ``dicom_seg=True`` and its Segmentation (with
``--clusters``, the cluster map's too) is stored to a destination node by C-STORE, where it is
filed beside its source. The C-STORE of an image is answered at once, before its fit: a PACS
would otherwise time out on a queue of fits. It answers C-ECHO, so a PACS's "test the node"
works. Needs pynetdicom (``pip install 's3net-client[dicom]'``)::

    s3net-pacs-bridge --port 11112 --ae-title S3NET --addr localhost:50051 \\
        --destination ORTHANC@pacs.example.org:4242 --concurrency 4

Images the service refuses (a structured report, a format it does not read) are logged and
counted, never retried. An image whose server could not be reached (down, full, restarting),
or whose destination could not take its Segmentations, is kept and tried again, after
``--retry-interval`` seconds and then twice as long each time, for up to ``--retry-for``
seconds; Segmentations already made are kept with it, so only their C-STORE is repeated.
Ctrl-C or SIGTERM stops taking images and ends after the fits in progress. A multi-frame
image is segmented on its first frame, or with ``--all-frames`` on each.

With ``--spool DIR`` each image is written to DIR before its C-STORE is answered and removed
once its Segmentations are stored: images that were waiting when the bridge stopped or
crashed, or were kept for a retry, are taken up again when a bridge starts on that folder, so
none that a PACS was told is stored is lost. Without a spool they are held in memory, and an
image waiting when the bridge stops is lost (the log says how many).

TLS: ``--ca``/``--cert``/``--key`` secure the gRPC connection to the server, as for
``s3net-client``. ``--dicom-tls-cert``/``--dicom-tls-key`` make the DICOM port speak TLS only
(DICOM's secure transport connection profile), ``--dicom-tls-ca`` then requires callers to
present a certificate it signed, and ``--destination-tls`` stores over TLS too, checking the
destination's certificate against ``--dicom-tls-ca``.
"""

from __future__ import annotations

import argparse
import heapq
import http.server
import io
import itertools
import logging
import os
import queue
import shutil
import signal
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ._core import bearer_args
from .client import Client
from .errors import Aborted, Cancelled, DeadlineExceeded, ResourceExhausted, S3NetError, Unavailable

log = logging.getLogger("s3net_client.bridge")

#: Transfer syntaxes it accepts images in: the uncompressed ones, and every compressed one the
#: service decodes (see the README, "Inputs").
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

#: How long a caller has for its TLS handshake (then its association is dropped).
HANDSHAKE_TIMEOUT = 30.0

#: How often a destination is tried within one attempt to store an image's Segmentations,
#: before the image is kept for a later retry.
CONNECT_ATTEMPTS = 3


@dataclass(frozen=True)
class Node:
    """A DICOM node: its AE title, host and port (``AE@host:port`` on the command line)."""

    ae_title: str
    host: str
    port: int

    @staticmethod
    def parse(text: str) -> "Node":
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            node = Node(ae_title, host, int(port))
        except ValueError:
            raise ValueError(f"expected AE@HOST:PORT, got {text!r}") from None
        if not 0 < len(ae_title) <= 16:
            raise ValueError(f"an AE title has 1 to 16 characters, got {ae_title!r}")
        return node

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def transient(e: S3NetError) -> bool:
    """Whether a failed segment call may succeed later unchanged: the server was unreachable,
    full or too slow, or shut down mid-job; not a refusal of the image."""
    if isinstance(e, Cancelled):
        return e.retryable
    return isinstance(e, (Unavailable, ResourceExhausted, DeadlineExceeded, Aborted))


def dicom_tls(
    cert: Union[str, Path, None], key: Union[str, Path, None], ca: Union[str, Path, None]
) -> Tuple[Optional[ssl.SSLContext], ssl.SSLContext]:
    """The TLS contexts of DICOM's secure transport: the one the bridge's port serves with
    (None without ``cert``; with ``ca``, callers must present a certificate it signed) and
    the one it stores to a destination with (the destination's certificate checked against
    ``ca``, else the system's roots; ``cert`` presented, as most PACS ask for one). A file that
    cannot be read raises ``ValueError`` naming it."""
    if (cert is None) != (key is None):
        raise ValueError("--dicom-tls-cert and --dicom-tls-key go together")
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
        if cert is not None:
            client.load_cert_chain(str(cert), str(key))
        server = None
        if cert is not None:
            server = _HandshakeInAssociation(ssl.PROTOCOL_TLS_SERVER)
            server.minimum_version = ssl.TLSVersion.TLSv1_2  # as DICOM's BCP 195 profiles ask
            server.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
            server.load_cert_chain(str(cert), str(key))
            if ca is not None:
                server.load_verify_locations(cafile=str(ca))
                server.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"DICOM TLS: cannot load {cert if cert else ca}: {e}") from None
    return server, client


class _HandshakeInAssociation(ssl.SSLContext):
    """A server context whose handshakes happen in each association's thread, not in the
    accept loop. pynetdicom wraps an accepted socket with the handshake done at once, in the
    thread that accepts them all: one caller that connects and sends nothing (a port scanner,
    a misconfigured node) would stop the bridge from taking any association, for ever."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args: Any, **kwargs: Any):  # type: ignore[override]
        sock.settimeout(HANDSHAKE_TIMEOUT)
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


@dataclass(order=True)
class _Image:
    """An image the bridge holds until its Segmentations are stored: in memory, or as a file
    in the spool. Ordered by when it is due, for the retry heap."""

    due: float
    seq: int
    data: Union[bytes, Path] = field(compare=False)
    uid: str = field(compare=False, default="?")
    #: Made by the service, not yet stored (the destination could not take them).
    segmentations: Optional[List[bytes]] = field(compare=False, default=None)
    #: With ``all_frames``: the Segmentations of the frames segmented so far, so that a retry
    #: after a transient failure goes on from the next frame (a spooled image's are also kept
    #: on disk, ``NAME.frames/F/``, so a bridge started again on its spool goes on too).
    frames_made: List[List[bytes]] = field(compare=False, default_factory=list)
    received: float = field(compare=False, default_factory=time.monotonic)
    tries: int = field(compare=False, default=0)

    @property
    def spooled(self) -> Optional[Path]:
        return self.data if isinstance(self.data, Path) else None


class _Outbound:
    """The association to the destination, kept open for ``keep`` seconds after its last
    C-STORE, so that the images of a series share one instead of negotiating one each (with
    ``destination_tls``, a TLS handshake each). The bridge's workers take turns on it: a store
    takes milliseconds, a fit about a second. A kept association the destination closed
    meanwhile (a PACS closes idle ones after its own timeout) is replaced at once, and the
    Segmentations it did not answer for are sent again on the new one."""

    def __init__(self, node: "Node", ae_title: str, tls: Optional[ssl.SSLContext], keep: float) -> None:
        self.node, self.ae_title, self.keep = node, ae_title, keep
        self._tls = (tls, node.host) if tls is not None else None
        self._lock = threading.Lock()
        self._association: Any = None
        self._timer: Optional[threading.Timer] = None  # one at a time, while an association is kept
        self._last = 0.0  # when the last store ended (time.monotonic)
        self.associations = 0  # associations established so far

    def store(self, datasets: List[Any]) -> Optional[List[Optional[int]]]:
        """C-STOREs ``datasets``; their status codes (None: no answer), or None when no
        association could be established."""
        with self._lock:
            reused = self._association is not None and self._association.is_established
            association = self._association if reused else self._open()
            if association is None:
                return None
            codes = [getattr(association.send_c_store(ds), "Status", None) for ds in datasets]
            if reused and any(c is None for c in codes) and not association.is_established:
                # Closed by the destination while it was kept: once more on a new one.
                log.info("the kept association to %s was closed; associating again", self.node.ae_title)
                association = self._open()
                if association is not None:
                    for i, ds in enumerate(datasets):
                        if codes[i] is None:
                            codes[i] = getattr(association.send_c_store(ds), "Status", None)
            self._last = time.monotonic()
            if self._association is not None and self._association.is_established and self.keep > 0:
                if self._timer is None:
                    self._arm(self.keep)
            else:
                self._release()
            return codes

    def close(self) -> None:
        """Releases the kept association, if any."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._release()

    def _open(self) -> Any:
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage

        self._release()
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(SegmentationStorage, "1.2.840.10008.1.2.1")
        association = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, tls_args=self._tls)
        if not association.is_established:
            return None
        self.associations += 1
        self._association = association
        return association

    def _release(self) -> None:
        if self._association is not None and self._association.is_established:
            self._association.release()
        self._association = None

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._release_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _release_if_idle(self) -> None:
        """Releases the association once it has been idle ``keep`` seconds; a store since the
        timer was armed sets it again for the rest of that time."""
        with self._lock:
            self._timer = None
            idle = time.monotonic() - self._last
            if idle >= self.keep:
                self._release()
            elif self._association is not None:
                self._arm(self.keep - idle)


def _segs_dir(image: Path) -> Path:
    return image.with_suffix(".segs")


def _frames_dir(image: Path) -> Path:
    """Where a spooled multi-frame image's Segmentations are kept frame by frame (``F/``, one
    folder per frame, renamed into place whole) until every frame is made."""
    return image.with_suffix(".frames")


def _write_folder(final: Path, files: List[bytes]) -> None:
    """Writes `files` as 0.dcm, 1.dcm, … into the folder `final`, all or none: into
    ``final.part`` first (synced), then renamed; an existing `final` is kept as it is."""
    if final.is_dir():
        return
    part = final.with_name(final.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    for i, data in enumerate(files):
        with open(part / f"{i}.dcm", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(part, final)


def _read_folder(folder: Path) -> List[bytes]:
    """The files `_write_folder` wrote, in their order."""
    files = [p for p in folder.glob("*.dcm") if p.stem.isdigit()]
    return [p.read_bytes() for p in sorted(files, key=lambda p: int(p.stem))]


def _frames_made(image: Path) -> List[List[bytes]]:
    """The Segmentations a spooled image's frames 0, 1, … were kept with, up to the first
    frame not kept (a frame folder still ``.part`` was not written whole: made again)."""
    folder, made = _frames_dir(image), []
    while (folder / str(len(made))).is_dir():
        made.append(_read_folder(folder / str(len(made))))
    return made


class Bridge:
    """Receives images by C-STORE on ``port`` as ``ae_title``, segments each with ``client``'s
    server (``options``: fit options, as ``Client.segment`` takes them) and stores the
    Segmentations to ``destination``. ``start`` returns once it listens; ``stop`` ends it
    after the fits in progress.

    Counters: ``received``, ``stored``, ``failed`` (refused by the service or the
    destination, or given up after ``retry_for`` seconds), ``deferred`` (times an image was
    kept for a retry), ``refused`` (C-STOREs answered "out of resources"), ``rejected``
    (associations refused: a calling AE title not in ``allowed``). ``metrics_text()`` gives
    them, and the images waiting and in flight, in Prometheus's text format.

    At most ``max_pending`` images wait (for a fit, or for a retry): past that a C-STORE is
    answered "out of resources" (0xA700), which a PACS retries later, instead of the bridge
    holding every image a PACS sends at once, or every image of an outage.

    With ``spool`` (a folder), each image is written there before its C-STORE is answered and
    removed once its Segmentations are stored, or once the service refused it for good; one
    kept for a retry stays there with its Segmentations, if made, and ``start`` takes up
    whatever the folder holds.

    ``scp_tls`` (an ``ssl.SSLContext``, see ``dicom_tls``) makes the port speak TLS only;
    ``destination_tls`` stores over TLS. The association to the destination stays open
    ``keep_association`` seconds after a store, for the next image's (0: one per image). ``allowed`` (AE titles) refuses associations from
    any other calling AE.

    A multi-frame image (an enhanced CT or MR volume, a cine loop) is segmented on its first
    frame, or with ``all_frames`` on every frame, one job and one Segmentation each (all in
    the source's Segmentation series, each referencing its frame); a transient failure on a
    frame is retried from that frame, the frames before it kept."""

    def __init__(
        self,
        client: Client,
        destination: Node,
        *,
        ae_title: str = "S3NET",
        host: str = "0.0.0.0",
        port: int = 11112,
        clusters: bool = False,
        concurrency: int = 2,
        max_pending: int = 64,
        spool: Union[str, Path, None] = None,
        options: Optional[Dict[str, Any]] = None,
        retry_interval: float = 30.0,
        retry_for: float = 86400.0,
        allowed: Optional[List[str]] = None,
        scp_tls: Optional[ssl.SSLContext] = None,
        destination_tls: Optional[ssl.SSLContext] = None,
        all_frames: bool = False,
        keep_association: float = 5.0,
    ) -> None:
        try:
            from pynetdicom import AE, evt
            from pynetdicom.presentation import AllStoragePresentationContexts
            from pynetdicom.sop_class import Verification
        except ImportError:
            raise RuntimeError("the PACS bridge needs pynetdicom: pip install 's3net-client[dicom]'") from None
        self.client, self.destination = client, destination
        self.clusters, self.options, self.all_frames = clusters, dict(options or {}), all_frames
        self.retry_interval, self.retry_for = retry_interval, retry_for
        self.received = self.stored = self.failed = self.deferred = self.refused = self.rejected = 0
        self._lock = threading.Lock()
        self._max_pending = max(1, max_pending)
        self._waiting = 0  # queued for a worker, or held for a retry
        self._in_flight = 0
        self._work: "queue.Queue[Optional[_Image]]" = queue.Queue()
        self._retry: List[_Image] = []  # a heap, by due time
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._spool = Path(spool) if spool is not None else None
        if self._spool is not None:
            self._spool.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()
        self._workers = [threading.Thread(target=self._run, daemon=True, name=f"s3net-bridge-{i}") for i in range(max(1, concurrency))]
        self._scheduler = threading.Thread(target=self._schedule, daemon=True, name="s3net-bridge-retry")
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        if allowed:
            self._ae.require_calling_aet = list(allowed)
        self._address = (host, port)
        self._scp_tls, self._destination_tls = scp_tls, destination_tls
        self._outbound = _Outbound(destination, ae_title, destination_tls, keep_association)
        self._handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        self._server: Any = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> "Bridge":
        """Listens, and starts the workers; raises ``OSError`` (with nothing started) if the
        port cannot be bound."""
        left = self._take_up_spool() if self._spool is not None else []
        self._server = self._ae.start_server(
            self._address, block=False, evt_handlers=self._handlers, ssl_context=self._scp_tls
        )
        for image in left:
            self._work.put(image)
        with self._lock:
            self._waiting += len(left)
        for w in self._workers:
            w.start()
        self._scheduler.start()
        log.info(
            "listening on %s:%d as %s%s; Segmentations to %s%s",
            *self._address, self._ae.ae_title, " (TLS)" if self._scp_tls else "",
            self.destination, " (TLS)" if self._destination_tls else "",
        )
        return self

    def stop(self) -> None:
        """Stops listening, then waits for the images queued to be segmented and stored; the
        ones held for a retry stay in the spool (without one, they are lost: logged)."""
        if self._server is None:
            return  # never started
        self._server.shutdown()
        self._server = None
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        self._scheduler.join()
        for _ in self._workers:
            self._work.put(None)  # after the images queued: each worker ends on one
        for w in self._workers:
            w.join()
        self._outbound.close()
        kept = [i for i in self._retry if i.spooled is not None]
        lost = len(self._retry) - len(kept)
        if kept:
            log.info("%d image(s) kept in %s for the next start", len(kept), self._spool)
        if lost:
            log.error("%d image(s) held for a retry are lost (a spool, --spool, keeps them)", lost)

    def _take_up_spool(self) -> List[_Image]:
        """What a bridge that stopped or crashed left in the spool, as images to process."""
        assert self._spool is not None
        # A .part file is an image whose C-STORE was never answered (the bridge died while
        # writing it): its PACS still has it and will send it again. A .segs.part folder is
        # Segmentations not all written: made again; so is a frame's in a .frames folder.
        for part in self._spool.glob("*.part"):
            if part.is_dir():
                shutil.rmtree(part, ignore_errors=True)
            else:
                part.unlink(missing_ok=True)
        for part in self._spool.glob("*.frames/*.part"):
            shutil.rmtree(part, ignore_errors=True)
        for made in [*self._spool.glob("*.segs"), *self._spool.glob("*.frames")]:
            # Its image was stored, then the bridge died; or its frames' were all kept.
            if not made.with_suffix(".dcm").exists() or (made.suffix == ".frames" and _segs_dir(made).is_dir()):
                shutil.rmtree(made, ignore_errors=True)
        left = []
        for path in sorted(self._spool.glob("*.dcm")):
            segs_dir = _segs_dir(path)
            segs = _read_folder(segs_dir) if segs_dir.is_dir() else None
            image = _Image(0.0, next(self._names), path, _uid_of(path), segs or None)
            image.received = _received(path)
            if image.segmentations is None:
                image.frames_made = _frames_made(path)
            left.append(image)
        if left:
            ready = sum(1 for i in left if i.segmentations)
            partly = sum(1 for i in left if i.frames_made)
            log.info(
                "%d image(s) left in %s taken up again (%d with their Segmentations made, %d with some of their frames')",
                len(left), self._spool, ready, partly,
            )
        return left

    # -- DICOM handlers (pynetdicom's threads) ------------------------------------------------

    def _on_rejected(self, event: Any) -> None:
        self._count("rejected")
        log.warning("association from %s refused: calling AE title %r not allowed", event.assoc.requestor.address, event.assoc.requestor.ae_title)

    def _on_store(self, event: Any) -> int:
        # Answered before the fit: the image is kept as the Part 10 file it arrived as (on disk
        # first, with a spool: a success tells the PACS it may forget the image).
        with self._lock:
            if self._waiting >= self._max_pending:
                self.refused += 1
                log.warning("%d images wait already: C-STORE refused (out of resources)", self._waiting)
                return 0xA700
            self._waiting += 1  # its place, taken before the file is written
        try:
            data: Union[bytes, Path] = bytes(event.encoded_dataset(include_meta=True))
            uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
            if self._spool is not None:
                path = self._spool / f"{time.time_ns()}-{os.getpid()}-{next(self._names)}.dcm"
                part = path.with_suffix(".part")
                with open(part, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, path)
                data = path
        except Exception:
            with self._lock:
                self._waiting -= 1
            log.exception("an image could not be kept: C-STORE refused (out of resources)")
            return 0xA700
        self._count("received")
        log.info("received %s from %s", uid, event.assoc.requestor.ae_title)
        self._work.put(_Image(0.0, next(self._names), data, uid))
        return 0x0000

    # -- workers ------------------------------------------------------------------------------

    def _run(self) -> None:
        while (image := self._work.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._in_flight += 1
            try:
                self._process(image)
            except Exception:  # a worker must outlive any one image
                log.exception("image %s could not be handled", image.uid)
                self._done(image, "failed")
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _process(self, image: _Image) -> None:
        image.tries += 1
        if image.segmentations is None:
            data = image.spooled.read_bytes() if image.spooled is not None else image.data
            frames = _frame_count(data) if self.all_frames else 1
            del image.frames_made[frames:]  # kept by a bridge that segmented more frames
            for frame in range(len(image.frames_made), frames):
                try:
                    result = self.client.segment(
                        data, dicom_seg=True, dicom_seg_clusters=self.clusters,
                        **({**self.options, "frame": frame} if frames > 1 else self.options),
                    )
                except S3NetError as e:
                    if transient(e):
                        self._later(image, f"not segmented now ({e})")
                    else:
                        log.warning("image %s not segmented: %s", image.uid, e)
                        self._done(image, "failed")
                    return
                made = [result.mask_dicom] + ([result.labels_dicom] if self.clusters else [])
                if image.spooled is not None and frames > 1:
                    try:
                        _frames_dir(image.spooled).mkdir(exist_ok=True)
                        _write_folder(_frames_dir(image.spooled) / str(frame), made)
                    except OSError as e:  # kept in memory still; only a restart would redo it
                        log.warning("image %s: frame %d's Segmentations not kept in the spool: %s", image.uid, frame + 1, e)
                image.frames_made.append(made)
                log.info("image %s%s: job %s done", image.uid, f" frame {frame + 1} of {frames}" if frames > 1 else "", result.job_id)
            image.segmentations = [seg for made in image.frames_made for seg in made]
            image.frames_made = []
        outcome = self._send(image.segmentations)
        if outcome == "stored":
            log.info("image %s: %d Segmentation(s) stored to %s", image.uid, len(image.segmentations), self.destination.ae_title)
            self._done(image, "stored")
        elif outcome == "later":
            if image.spooled is not None:
                self._keep_segmentations(image.spooled, image.segmentations)
            self._later(image, f"Segmentations not stored to {self.destination} now")
        else:
            self._done(image, "failed")

    def _done(self, image: _Image, outcome: str) -> None:
        """Counts an image's outcome and lets go of it (its spool file, its Segmentations)."""
        if image.spooled is not None:
            image.spooled.unlink(missing_ok=True)  # first: an image whose file is gone is done
            shutil.rmtree(_segs_dir(image.spooled), ignore_errors=True)
            shutil.rmtree(_frames_dir(image.spooled), ignore_errors=True)
        self._count(outcome)

    def _later(self, image: _Image, why: str) -> None:
        """Holds an image for a retry, after `retry_interval` doubled for each try before, or
        gives up on it past `retry_for` seconds since it arrived."""
        if time.monotonic() - image.received > self.retry_for:
            log.error("image %s: %s; given up after %d tries over %.0f s", image.uid, why, image.tries, self.retry_for)
            self._done(image, "failed")
            return
        delay = self.retry_interval * 2 ** min(image.tries - 1, 4)
        image.due = time.monotonic() + delay
        log.warning("image %s: %s; tried again in %.3g s%s", image.uid, why, delay, " (kept in the spool)" if image.spooled else "")
        with self._lock:
            self.deferred += 1
            self._waiting += 1
            heapq.heappush(self._retry, image)
            self._wake.notify_all()

    def _schedule(self) -> None:
        """Moves each image held for a retry back into the queue once it is due."""
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                while self._retry and self._retry[0].due <= now:
                    self._work.put(heapq.heappop(self._retry))
                self._wake.wait(timeout=(self._retry[0].due - now) if self._retry else None)

    def _keep_segmentations(self, image: Path, segmentations: List[bytes]) -> None:
        """Writes an image's Segmentations beside it in the spool, all or none (a folder
        renamed into place), so a retry after a restart only stores them. They supersede the
        image's frame by frame copies."""
        _write_folder(_segs_dir(image), segmentations)
        shutil.rmtree(_frames_dir(image), ignore_errors=True)

    def _send(self, segmentations: List[bytes]) -> str:
        """C-STOREs `segmentations` to the destination: "stored", "later" (unreachable, busy,
        or the connection dropped) or "failed" (a refusal of the data)."""
        import pydicom

        d = self.destination
        datasets = [pydicom.dcmread(io.BytesIO(s)) for s in segmentations]
        for attempt in range(CONNECT_ATTEMPTS):
            codes = self._outbound.store(datasets)
            if codes is not None:
                if all(c == 0x0000 for c in codes):
                    return "stored"
                # No answer (the connection dropped) or "out of resources" (0xA7xx): try later.
                if all(c is None or c == 0x0000 or (c & 0xFF00) == 0xA700 for c in codes):
                    log.warning("%s did not take every Segmentation now: %s", d.ae_title, [_hex(c) for c in codes])
                    return "later"
                log.error("%s refused a Segmentation: %s", d.ae_title, [_hex(c) for c in codes])
                return "failed"
            log.warning("cannot reach %s (attempt %d of %d)", d, attempt + 1, CONNECT_ATTEMPTS)
            if attempt + 1 < CONNECT_ATTEMPTS:
                time.sleep(1.0 * (attempt + 1))
        return "later"

    # -- counters -----------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    @property
    def waiting(self) -> int:
        """Images queued for a worker or held for a retry (bounded by ``max_pending``)."""
        return self._waiting

    def metrics_text(self) -> str:
        """The counters in Prometheus's text exposition format."""
        with self._lock:
            images = {k: getattr(self, k) for k in ("received", "stored", "failed")}
            values = dict(
                deferred=self.deferred, refused=self.refused, rejected=self.rejected,
                waiting=self._waiting, held=len(self._retry), in_flight=self._in_flight,
                associations=self._outbound.associations,
            )
        lines = [
            "# HELP s3net_bridge_images_total Images received by C-STORE, and what became of them.",
            "# TYPE s3net_bridge_images_total counter",
            *(f's3net_bridge_images_total{{outcome="{k}"}} {v}' for k, v in images.items()),
            "# HELP s3net_bridge_retries_total Times an image was kept for a retry (server or destination unreachable).",
            "# TYPE s3net_bridge_retries_total counter",
            f"s3net_bridge_retries_total {values['deferred']}",
            "# HELP s3net_bridge_refused_total C-STOREs answered out of resources (0xA700): max-pending images were waiting.",
            "# TYPE s3net_bridge_refused_total counter",
            f"s3net_bridge_refused_total {values['refused']}",
            "# HELP s3net_bridge_rejected_associations_total Associations refused: calling AE title not allowed.",
            "# TYPE s3net_bridge_rejected_associations_total counter",
            f"s3net_bridge_rejected_associations_total {values['rejected']}",
            "# HELP s3net_bridge_destination_associations_total Associations established to the destination (kept open between images: --keep-association).",
            "# TYPE s3net_bridge_destination_associations_total counter",
            f"s3net_bridge_destination_associations_total {values['associations']}",
            "# HELP s3net_bridge_waiting Images waiting for a fit or a retry.",
            "# TYPE s3net_bridge_waiting gauge",
            f"s3net_bridge_waiting {values['waiting']}",
            "# HELP s3net_bridge_held_for_retry Images held until their retry is due.",
            "# TYPE s3net_bridge_held_for_retry gauge",
            f"s3net_bridge_held_for_retry {values['held']}",
            "# HELP s3net_bridge_in_flight Images being segmented or stored now.",
            "# TYPE s3net_bridge_in_flight gauge",
            f"s3net_bridge_in_flight {values['in_flight']}",
            "# HELP s3net_bridge_max_pending The bound on waiting images.",
            "# TYPE s3net_bridge_max_pending gauge",
            f"s3net_bridge_max_pending {self._max_pending}",
        ]
        return "\n".join(lines) + "\n"

    def serve_metrics(self, host: str, port: int) -> http.server.ThreadingHTTPServer:
        """Serves ``metrics_text()`` at ``http://host:port/metrics`` on a thread of its own;
        the returned server's ``shutdown()`` ends it."""
        bridge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = bridge.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line
                pass

        server = http.server.ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name="s3net-bridge-metrics").start()
        return server


def _received(path: Path) -> float:
    """When a spooled image arrived, on ``time.monotonic``'s clock: its file's name starts with
    the wall-clock time it was written (nanoseconds), so ``retry_for`` counts from its arrival,
    not from the bridge's last start (a bridge restarted daily would otherwise keep an image
    its destination never takes for ever). Now, for a name that does not say."""
    try:
        written = int(path.name.split("-", 1)[0]) / 1e9
    except ValueError:
        return time.monotonic()
    return time.monotonic() - max(0.0, time.time() - written)


def _uid_of(path: Path) -> str:
    """An image file's SOP Instance UID, for the log ("?" if unreadable)."""
    try:
        import pydicom

        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:
        return "?"


def _frame_count(data: bytes) -> int:
    """An image's Number of Frames (1 if absent or unreadable: the service then says why)."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except Exception:
        return 1


def _hex(code: Optional[int]) -> str:
    return "no answer" if code is None else f"0x{code:04X}"


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type for a fit option that must be above 0: refused at start rather than by
    the server for every image (the server checks the upper bounds, naming the option)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    return parse


def _host_port(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Optional[List[str]] = None) -> int:
    about = __doc__.split("\n\n")[1].replace("``", "").rstrip(":")
    p = argparse.ArgumentParser(prog="s3net-pacs-bridge", description=about)
    g = p.add_argument_group("s3net server")
    g.add_argument("--addr", default=os.environ.get("S3NET_ADDR", "127.0.0.1:50051"), help="s3net server HOST:PORT, https:// for TLS [$S3NET_ADDR]")
    g.add_argument("--token", default=None, help="bearer token [$S3NET_TOKEN]")
    g.add_argument("--token-file", default=None, help="file holding the bearer token, read again when it changes (a rotated Secret) [$S3NET_TOKEN_FILE]")
    g.add_argument("--ca", type=Path, help="PEM CA bundle to verify the server with (TLS)")
    g.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    g.add_argument("--key", type=Path, help="PEM client key (mutual TLS)")
    g.add_argument("--iterations", type=_positive(int), help="maximum SGD steps (unset: the server's)")
    g.add_argument("--size", type=_positive(int), help="grid side (unset: the server's)")
    g.add_argument("--priority", type=int, help="queue priority of the bridge's jobs: higher runs first (default 0)")
    g.add_argument("--preset", help="default | paper | reference (unset: the server's)")
    g.add_argument("--features", type=_positive(int), help="feature channels = clusters (unset: the server's)")
    g.add_argument("--precision", choices=["float32", "bfloat16"], help="number format of the activations (unset: the server's)")
    g.add_argument("--offset-lr", type=_positive(float), help="learning rate of the free offsets and mask, a multiple of the preset's (unset: the server's)")
    d = p.add_argument_group("DICOM")
    d.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    d.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112)")
    d.add_argument("--ae-title", default="S3NET", help="this node's AE title (default S3NET)")
    d.add_argument("--allow", action="append", metavar="AE", help="accept associations only from this calling AE title (repeatable; default any)")
    d.add_argument("--destination", required=True, type=Node.parse, help="where Segmentations go: AE@HOST:PORT")
    d.add_argument("--clusters", action="store_true", help="also store the cluster map's Segmentation")
    d.add_argument("--all-frames", action="store_true", help="segment every frame of a multi-frame image (one job each), not only the first")
    d.add_argument("--dicom-tls-cert", type=Path, help="PEM certificate of this node: its port speaks TLS only")
    d.add_argument("--dicom-tls-key", type=Path, help="PEM key of that certificate")
    d.add_argument("--dicom-tls-ca", type=Path, help="PEM CAs: callers must present a certificate they signed; checks the destination's")
    d.add_argument("--destination-tls", action="store_true", help="store to the destination over TLS")
    d.add_argument("--keep-association", type=float, default=5.0, metavar="S", help="seconds the association to the destination stays open after a store, for the next image's (default 5; 0: one per image)")
    q = p.add_argument_group("queue")
    q.add_argument("--concurrency", type=int, default=2, help="fits in flight (default 2)")
    q.add_argument("--max-pending", type=int, default=64, help="images waiting (for a fit or a retry) before C-STOREs are refused (default 64)")
    q.add_argument("--spool", type=Path, help="folder that keeps each image until its Segmentations are stored")
    q.add_argument("--retry-interval", type=float, default=30.0, help="seconds before an image whose server or destination was unreachable is tried again, doubling up to 16x (default 30)")
    q.add_argument("--retry-for", type=float, default=86400.0, help="seconds after which such an image is given up (default 86400)")
    metrics_env = os.environ.get("S3NET_BRIDGE_METRICS_LISTEN") or None
    q.add_argument("--metrics-listen", type=_host_port, metavar="HOST:PORT",
                   default=metrics_env,  # a string default goes through `type` too: a bad one is a usage error
                   help="serve Prometheus metrics at http://HOST:PORT/metrics [$S3NET_BRIDGE_METRICS_LISTEN]")
    p.add_argument("--verbose", action="store_true", help="log pynetdicom's lines on each association and message too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.verbose:  # a line per association and message drowns the bridge's own
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        scp_tls, client_tls = dicom_tls(args.dicom_tls_cert, args.dicom_tls_key, args.dicom_tls_ca)
    except ValueError as e:
        p.error(str(e))
    fit = ("iterations", "size", "priority", "preset", "features", "precision", "offset_lr")
    options = {k: getattr(args, k) for k in fit if getattr(args, k) is not None}
    stopping = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stopping.set())
    try:
        client = Client(args.addr, **bearer_args(args.token, args.token_file), ca=args.ca, cert=args.cert, key=args.key)
    except ValueError as e:
        p.error(str(e))
    with client:
        bridge = Bridge(
            client, args.destination, ae_title=args.ae_title, host=args.host, port=args.port,
            clusters=args.clusters, concurrency=args.concurrency, max_pending=args.max_pending,
            spool=args.spool, options=options, retry_interval=args.retry_interval,
            retry_for=args.retry_for, allowed=args.allow, scp_tls=scp_tls,
            destination_tls=client_tls if args.destination_tls else None, all_frames=args.all_frames,
            keep_association=args.keep_association,
        )
        try:
            metrics = bridge.serve_metrics(*args.metrics_listen) if args.metrics_listen else None
            bridge.start()
        except OSError as e:  # a port in use, an address not this host's
            log.error("cannot listen: %s", e)
            return 1
        stopping.wait()
        log.info("stopping: finishing the fits in progress")
        bridge.stop()
        if metrics is not None:
            metrics.shutdown()
    log.info(
        "received %d, stored %d, failed %d, retries %d, refused %d",
        bridge.received, bridge.stored, bridge.failed, bridge.deferred, bridge.refused,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
