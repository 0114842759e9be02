"""The committed gRPC stubs match what the pinned grpcio-tools generates from the proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pyclient_support import REPO

PY = REPO / "clients" / "python"


def test_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_stubs", PY / "tools" / "generate_stubs.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = PY / "src" / "s3net_client" / "_pb"
    stale = [n for n in gen.GENERATED if (tmp_path / n).read_text() != (committed / n).read_text()]
    assert not stale, (
        f"{', '.join(stale)} out of date with proto/: run "
        "`python clients/python/tools/generate_stubs.py` and commit the result"
    )
