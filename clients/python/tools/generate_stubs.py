"""Regenerates the gRPC stubs in src/s3net_client/_pb/ from proto/s3net/v1/s3net.proto.

The stubs are committed so that `pip install ./clients/python` needs no code generator;
tests/test_stubs.py runs this into a temporary folder and fails when the committed copy is
stale. Run it after editing the proto:

    python clients/python/tools/generate_stubs.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = "s3net/v1/s3net.proto"
DEFAULT_OUT = HERE.parent / "src" / "s3net_client" / "_pb"
# The files this script owns in the output folder.
GENERATED = ("s3net_pb2.py", "s3net_pb2.pyi", "s3net_pb2_grpc.py")


def generate(out: Path) -> None:
    """Writes the three generated files into `out` (a flat folder inside the package)."""
    from grpc_tools import protoc  # only needed here, not at run time

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO}")
        src = Path(tmp) / Path(PROTO).parent
        for name in GENERATED:
            text = (src / name).read_text()
            # protoc writes an absolute import of the proto's package path (`s3net.v1`), which
            # does not exist once the files live inside s3net_client; make it relative.
            text = text.replace("from s3net.v1 import s3net_pb2 as", "from . import s3net_pb2 as")
            (out / name).write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    generate(p.parse_args().out)
    print(f"stubs written to {p.parse_args().out}", file=sys.stderr)


if __name__ == "__main__":
    main()
