"""``s3net-client``: the Python client from the shell, mirroring ``s3net client``.

    s3net-client segment scan.png --out results/ --iterations 20
    s3net-client submit scan.png            # prints the job id
    s3net-client watch JOB_ID | get JOB_ID [--out DIR] | cancel JOB_ID | list

Failures print ``CODE: message`` on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._convert import OPTION_NAMES
from ._core import bearer_args
from .client import Client
from .errors import S3NetError
from .results import Cancelled, Completed, Failed, Job, JobEvent, Progress, Queued, Started


def _window(text: str) -> tuple:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTER,WIDTH, got {text!r}") from None
    return center, width


def _parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("connection")
    g.add_argument(
        "--addr",
        default=os.environ.get("S3NET_ADDR", "127.0.0.1:50051"),
        help="server HOST:PORT, https:// for TLS [$S3NET_ADDR, else 127.0.0.1:50051]",
    )
    g.add_argument("--token", default=None, help="bearer token [$S3NET_TOKEN]")
    g.add_argument(
        "--token-file",
        default=None,
        help="file holding the bearer token, read again when it changes [$S3NET_TOKEN_FILE]",
    )
    g.add_argument("--ca", type=Path, help="PEM CA bundle to verify the server with (TLS)")
    g.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    g.add_argument("--key", type=Path, help="PEM client key (mutual TLS)")
    g.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    g.add_argument(
        "--retries", type=int, default=3, help="retries on UNAVAILABLE/RESOURCE_EXHAUSTED"
    )

    fit = argparse.ArgumentParser(add_help=False)
    f = fit.add_argument_group("fit options (unset: the server's preset values)")
    f.add_argument("--preset", help="default | paper | reference")
    f.add_argument("--iterations", type=int, help="maximum SGD steps")
    f.add_argument("--min-labels", type=int, help="early stop at this many labels (0 disables)")
    f.add_argument("--size", type=int, help="side of the square grid the network runs on")
    f.add_argument("--seed", type=int)
    f.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    f.add_argument(
        "--window",
        type=_window,
        help="intensity window CENTER,WIDTH in native units, e.g. --window=-600,1500 (HU)",
    )
    f.add_argument("--priority", type=int, help="queue priority, higher first")
    f.add_argument("--features", type=int, help="feature channels = clusters")
    f.add_argument("--frame", type=int, help="frame of a multi-frame DICOM or page of a multi-page TIFF (0-based)")
    f.add_argument(
        "--precision", choices=["float32", "bfloat16"], help="number format of the activations"
    )
    f.add_argument(
        "--dicom-seg",
        action="store_const",
        const=True,
        help="also write the mask as a DICOM Segmentation, STEM.seg.dcm (DICOM inputs only)",
    )
    f.add_argument(
        "--dicom-seg-clusters",
        action="store_const",
        const=True,
        help="also write the cluster map as a DICOM Segmentation, STEM.labels.seg.dcm",
    )
    f.add_argument(
        "--offset-lr",
        type=float,
        help="learning rate of the free offsets and mask, a multiple of the preset's "
        "(3000 lets them learn: a better mask on dermoscopy, a worse best single cluster)",
    )

    p = argparse.ArgumentParser(
        prog="s3net-client", description="Segment images with an s3net server (the Python client)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "segment",
        parents=[conn, fit],
        help="segment images, write STEM.labels.png, STEM.mask.png, STEM.json for each",
    )
    s.add_argument("file", type=Path, nargs="+")
    s.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="with several files: how many fits to keep in flight at once (default 4)",
    )
    s.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    s.add_argument("--upload", action="store_true", help="use the chunked SegmentUpload call")
    s.add_argument(
        "--all-frames",
        action="store_true",
        help="segment every frame of a multi-frame DICOM (page of a TIFF), one fit each, "
        "written as STEM.frameN.*; not with --frame",
    )
    s = sub.add_parser("submit", parents=[conn, fit], help="queue an image, print the job id")
    s.add_argument("file", type=Path)
    s.add_argument("--idempotency-key")
    s = sub.add_parser("watch", parents=[conn], help="follow a job's events until it finishes")
    s.add_argument("job_id")
    s = sub.add_parser("get", parents=[conn], help="print a job's state; --out writes its result")
    s.add_argument("job_id")
    s.add_argument("--out", type=Path)
    s = sub.add_parser("cancel", parents=[conn], help="cancel a job")
    s.add_argument("job_id")
    s = sub.add_parser("list", parents=[conn], help="list the jobs the server knows")
    s.add_argument("--state", help="queued | running | completed | failed | cancelled")
    return p


def _fit_options(a: argparse.Namespace) -> Dict[str, Any]:
    return {k: getattr(a, k) for k in OPTION_NAMES if getattr(a, k) is not None}


def _describe(ev: JobEvent) -> Optional[str]:
    if isinstance(ev, Queued):
        return f"job {ev.job_id} queued at position {ev.position}"
    if isinstance(ev, Started):
        return f"job {ev.job_id} started on {ev.worker} ({ev.device})"
    if isinstance(ev, Progress):
        again = f" (attempt {ev.attempt})" if ev.attempt > 1 else ""
        return (
            f"step {ev.iteration}/{ev.max_iterations} labels {ev.labels} "
            f"loss {ev.losses.total:.3f}{again}"
        )
    if isinstance(ev, Completed):
        r = ev.result
        return f"job {ev.job_id} completed: {r.labels_used} labels, {r.iterations} iterations"
    if isinstance(ev, Failed):
        return f"job {ev.job_id} failed: {ev.code.name}: {ev.message}"
    if isinstance(ev, Cancelled):
        return f"job {ev.job_id} cancelled: {ev.reason}"
    return None


def _report(path: Path, r: Any, out: Path, frame: Optional[int] = None) -> None:
    """Writes a result as STEM.* (STEM.frameN.* for a frame of several) and prints its line."""
    which = "" if frame is None else f" frame {frame} of {r.frames}"
    r.save(out, path.stem if frame is None else frame_stem(path.stem, frame, r.frames))
    print(
        f"{path}{which}: {r.labels_used} labels, {r.iterations} iterations, "
        f"{r.timings.fit_seconds:.2f} s on {r.device}",
        flush=True,
    )


def frame_stem(stem: str, frame: int, frames: int) -> str:
    """STEM.frameN, N zero-padded to the digits of the last frame's number (as ``s3net
    segment --all-frames`` names them), so that a folder's files sort in frame order."""
    return f"{stem}.frame{frame:0{len(str(max(frames - 1, 1)))}d}"


def _segment_all_frames(client: Client, paths: List[Path], a: argparse.Namespace, upload: Optional[bool]) -> int:
    """Every frame of each file, one fit each (``Client.segment_frames``: frame 0 first, whose
    result says how many the file has, then the others, ``--concurrency`` at once). Failures
    are printed and counted; the rest go on."""
    fits = failed = 0
    for path in paths:
        try:
            for frame, outcome in client.segment_frames(path, concurrency=a.concurrency, upload=upload, **_fit_options(a)):
                fits += 1
                if isinstance(outcome, Exception):
                    failed += 1
                    print(f"error: {path} frame {frame}: {outcome}", file=sys.stderr)
                else:
                    _report(path, outcome, a.out, frame if outcome.frames > 1 else None)
        except Exception as e:  # frame 0's: how many frames the file has is not known
            fits += 1
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr)
    if failed:
        print(f"{failed} of {fits} fit(s) failed", file=sys.stderr)
        return 1
    return 0


def _job_line(j: Job) -> str:
    line = f"{j.job_id} {j.state.name} {j.width}x{j.height}"
    if j.progress is not None:
        line += f" step {j.progress.iteration}/{j.progress.max_iterations}"
    if j.failure is not None:
        line += f" {j.failure.code.name}: {j.failure.message}"
    if j.cancellation is not None:
        line += f" ({j.cancellation.reason})"
    if j.caller:
        line += f" by {j.caller}"
    return line


def _run(a: argparse.Namespace) -> int:
    client = Client(
        a.addr,
        **bearer_args(a.token, a.token_file),
        ca=a.ca,
        cert=a.cert,
        key=a.key,
        timeout=a.timeout,
        retries=a.retries,
    )
    with client:
        if a.command == "segment":
            if sys.stderr.isatty():
                progress: Any = True
            else:
                # Logs get the milestones, not one line per step.
                def progress(ev: JobEvent) -> None:
                    if isinstance(ev, (Queued, Started)):
                        print(_describe(ev), file=sys.stderr)

            upload = True if a.upload else None
            if a.all_frames:
                return _segment_all_frames(client, a.file, a, upload)
            if len(a.file) == 1:
                (path,) = a.file
                r = client.segment(path, progress=progress, upload=upload, **_fit_options(a))
                _report(path, r, a.out)
            else:
                failed = 0
                outcomes = client.segment_many(
                    a.file,
                    concurrency=a.concurrency,
                    progress=sys.stderr.isatty(),
                    upload=upload,
                    **_fit_options(a),
                )
                for path, outcome in outcomes:
                    if isinstance(outcome, Exception):
                        failed += 1
                        print(f"error: {path}: {outcome}", file=sys.stderr)
                    else:
                        _report(path, outcome, a.out)
                if failed:
                    print(f"{failed} of {len(a.file)} image(s) failed", file=sys.stderr)
                    return 1
        elif a.command == "submit":
            sub = client.submit(a.file, idempotency_key=a.idempotency_key, **_fit_options(a))
            print(sub.job_id)
        elif a.command == "watch":
            for ev in client.watch(a.job_id):
                text = _describe(ev)
                if text:
                    print(text, flush=True)
                if isinstance(ev, Failed):
                    return 1
                if isinstance(ev, Cancelled):
                    return 1
        elif a.command == "get":
            job = client.get(a.job_id)
            print(_job_line(job))
            if a.out is not None and job.result is not None:
                job.result.save(a.out, a.job_id)
        elif a.command == "cancel":
            print(client.cancel(a.job_id).name)
        elif a.command == "list":
            jobs = client.list_jobs(a.state)
            for job in jobs:
                print(_job_line(job))
            if jobs.unreachable_replicas:
                missing = ", ".join(jobs.unreachable_replicas)
                print(
                    f"warning: no answer from replica(s) {missing}: their jobs are missing from this list",
                    file=sys.stderr,
                )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "all_frames", False) and args.frame is not None:
        parser.error("--all-frames cannot be used with --frame")  # exits 2, before connecting
    if args.command == "segment":
        # Two inputs with one stem would write the same files, the second over the first.
        first: dict = {}
        for path in args.file:
            other = first.setdefault(path.stem, path)
            if other is not path:
                print(
                    f"error: {other} and {path} would both be written as {args.out / (path.stem + '.*')}: "
                    "segment them into different --out folders",
                    file=sys.stderr,
                )
                return 1
    try:
        return _run(args)
    except S3NetError as e:
        print(e, file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
