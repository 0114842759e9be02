"""``s3net-pacs-bridge``: a DICOM node between a PACS and s3net.

A PACS (or a modality, or a router) sends images to it by C-STORE, as it would to any DICOM
node; each is segmented by an s3net server with ``dicom_seg=True`` and its Segmentation (with
``--clusters``, the cluster map's too) is stored to a destination node by C-STORE, where it is
filed beside its source. The C-STORE of an image is answered at once, before its fit: a PACS
would otherwise time out on a queue of fits. Needs pynetdicom (``pip install
's3net-client[dicom]'``)::

    s3net-pacs-bridge --port 11112 --ae-title S3NET --addr localhost:50051 \\
        --destination ORTHANC@pacs.example.org:4242 --concurrency 4

Images the service refuses (a structured report, a format it does not read) are logged and
counted, never retried; a destination that cannot be reached is retried a few times, then the
Segmentation is dropped with an error in the log. Ctrl-C or SIGTERM stops taking images and
ends after the fits in progress.

With ``--spool DIR`` each image is written to DIR before its C-STORE is answered and removed
once its Segmentations are stored: images that were waiting when the bridge stopped or
crashed, or whose server or destination could not be reached, are taken up again when a
bridge starts on that folder, so none that a PACS was told is stored is lost.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

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


def transient(e: S3NetError) -> bool:
    """Whether a failed segment call may succeed later unchanged: the server was unreachable,
    full or too slow, or shut down mid-job; not a refusal of the image."""
    if isinstance(e, Cancelled):
        return e.retryable
    return isinstance(e, (Unavailable, ResourceExhausted, DeadlineExceeded, Aborted))


class Bridge:
    """Receives images by C-STORE on ``port`` as ``ae_title``, segments each with ``client``'s
    server (``options``: fit options, as ``Client.segment`` takes them) and stores the
    Segmentations to ``destination``. ``start`` returns once it listens; ``stop`` ends it
    after the fits in progress. ``received``, ``stored`` and ``failed`` count images.

    At most ``max_pending`` images wait for a fit: past that a C-STORE is answered "out of
    resources" (0xA700), which a PACS retries later, instead of the bridge holding every image
    a PACS sends at once.

    With ``spool`` (a folder), each image is written there before its C-STORE is answered and
    removed once its Segmentations are stored, or once the service refused it for good; one
    whose server or destination could not be reached stays (``deferred`` counts them), and
    ``start`` takes up whatever the folder holds."""

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
    ) -> None:
        try:
            from pynetdicom import AE, evt
            from pynetdicom.presentation import AllStoragePresentationContexts
        except ImportError:
            raise RuntimeError("the PACS bridge needs pynetdicom: pip install 's3net-client[dicom]'") from None
        self.client, self.destination = client, destination
        self.clusters, self.options = clusters, dict(options or {})
        self.received = self.stored = self.failed = self.deferred = 0
        self._lock = threading.Lock()
        self._work: "queue.Queue[Union[bytes, Path, None]]" = queue.Queue(maxsize=max(1, max_pending))
        self._spool = Path(spool) if spool is not None else None
        if self._spool is not None:
            self._spool.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()
        self._workers = [threading.Thread(target=self._run, daemon=True, name=f"s3net-bridge-{i}") for i in range(max(1, concurrency))]
        self._ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self._address = (host, port)
        self._handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server: Any = None

    def start(self) -> "Bridge":
        for w in self._workers:
            w.start()
        if self._spool is not None:
            # A .part file is an image whose C-STORE was never answered (the bridge died while
            # writing it): its PACS still has it and will send it again.
            for part in self._spool.glob("*.part"):
                part.unlink(missing_ok=True)
            left = sorted(self._spool.glob("*.dcm"))
            if left:
                log.info("%d image(s) left in %s: taken up again", len(left), self._spool)
                # Fed as the workers make room, before any new image can be refused for it.
                threading.Thread(target=lambda: [self._work.put(p) for p in left], daemon=True).start()
        self._server = self._ae.start_server(self._address, block=False, evt_handlers=self._handlers)
        log.info("listening on %s:%d as %s; Segmentations to %s", *self._address, self._ae.ae_title, self.destination)
        return self

    def stop(self) -> None:
        """Stops listening, then waits for the images received to be segmented and stored."""
        if self._server is None:
            return  # never started
        self._server.shutdown()
        self._server = None
        for _ in self._workers:
            self._work.put(None)  # after the images waiting: each worker ends on one
        for w in self._workers:
            w.join()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _on_store(self, event: Any) -> int:
        # Answered before the fit: the image is kept as the Part 10 file it arrived as (on disk
        # first, with a spool: a success tells the PACS it may forget the image).
        if self._work.full():
            log.warning("%d images wait for a fit already: C-STORE refused (out of resources)", self._work.maxsize)
            return 0xA700
        image: Union[bytes, Path] = bytes(event.encoded_dataset(include_meta=True))
        if self._spool is not None:
            path = self._spool / f"{time.time_ns()}-{os.getpid()}-{next(self._names)}.dcm"
            part = path.with_suffix(".part")
            with open(part, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
            image = path
        try:
            self._work.put_nowait(image)
        except queue.Full:  # filled meanwhile: the file stays for the next start
            log.warning("%d images wait for a fit already: C-STORE refused (out of resources)", self._work.maxsize)
            if isinstance(image, Path):
                image.unlink()
            return 0xA700
        self._count("received")
        return 0x0000

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            try:
                self._process(item)
            except Exception:  # a worker must outlive any one image
                log.exception("an image could not be handled")
                self._count("failed")

    def _process(self, item: Union[bytes, Path]) -> None:
        spooled = item if isinstance(item, Path) else None
        image = spooled.read_bytes() if spooled is not None else item
        try:
            result = self.client.segment(image, dicom_seg=True, dicom_seg_clusters=self.clusters, **self.options)
        except S3NetError as e:
            if transient(e) and spooled is not None:
                self._settle(spooled, "deferred")
                log.warning("not segmented now (%s): kept in the spool", e)
            else:
                self._settle(spooled, "failed", remove=True)
                log.warning("not segmented: %s", e)
            return
        segmentations = [result.mask_dicom] + ([result.labels_dicom] if self.clusters else [])
        if self._send(segmentations):
            self._settle(spooled, "stored", remove=True)
            log.info("job %s: %d Segmentation(s) stored to %s", result.job_id, len(segmentations), self.destination.ae_title)
        else:
            self._settle(spooled, "deferred" if spooled is not None else "failed")

    def _settle(self, spooled: Optional[Path], outcome: str, remove: bool = False) -> None:
        """Counts an image's outcome; removes its spool file when it is done with for good."""
        if remove and spooled is not None:
            spooled.unlink(missing_ok=True)
        self._count(outcome)

    def _send(self, segmentations: List[bytes], attempts: int = 3) -> bool:
        """C-STOREs `segmentations` to the destination; whether it stored them all."""
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage

        d = self.destination
        for attempt in range(attempts):
            ae = AE(ae_title=self._ae.ae_title)
            ae.add_requested_context(SegmentationStorage, "1.2.840.10008.1.2.1")
            association = ae.associate(d.host, d.port, ae_title=d.ae_title)
            if association.is_established:
                try:
                    statuses = [association.send_c_store(pydicom.dcmread(io.BytesIO(s))) for s in segmentations]
                finally:
                    association.release()
                if all(s is not None and s.Status == 0x0000 for s in statuses):
                    return True
                log.error("%s refused a Segmentation: %s", d.ae_title, [getattr(s, "Status", None) for s in statuses])
                return False
            log.warning("cannot reach %s (attempt %d of %d)", d, attempt + 1, attempts)
            time.sleep(1.0 * (attempt + 1))
        log.error("%s cannot be reached", d)
        return False


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="s3net-pacs-bridge", description=__doc__.split("\n\n")[1])
    p.add_argument("--addr", default=os.environ.get("S3NET_ADDR", "127.0.0.1:50051"), help="s3net server HOST:PORT [$S3NET_ADDR]")
    p.add_argument("--token", default=None, help="bearer token [$S3NET_TOKEN]")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112)")
    p.add_argument("--ae-title", default="S3NET", help="this node's AE title (default S3NET)")
    p.add_argument("--destination", required=True, type=Node.parse, help="where Segmentations go: AE@HOST:PORT")
    p.add_argument("--clusters", action="store_true", help="also store the cluster map's Segmentation")
    p.add_argument("--concurrency", type=int, default=2, help="fits in flight (default 2)")
    p.add_argument("--max-pending", type=int, default=64, help="images waiting for a fit before C-STOREs are refused (default 64)")
    p.add_argument("--spool", type=Path, help="folder that keeps each image until its Segmentations are stored")
    p.add_argument("--iterations", type=int, help="maximum SGD steps (unset: the server's)")
    p.add_argument("--size", type=int, help="grid side (unset: the server's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = {k: v for k, v in (("iterations", args.iterations), ("size", args.size)) if v is not None}
    stopping = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stopping.set())
    with Client(args.addr, token=args.token or os.environ.get("S3NET_TOKEN")) as client:
        bridge = Bridge(
            client, args.destination, ae_title=args.ae_title, host=args.host, port=args.port,
            clusters=args.clusters, concurrency=args.concurrency, max_pending=args.max_pending,
            spool=args.spool, options=options,
        ).start()
        stopping.wait()
        log.info("stopping: finishing the fits in progress")
        bridge.stop()
    log.info("received %d, stored %d, failed %d, deferred %d", bridge.received, bridge.stored, bridge.failed, bridge.deferred)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
