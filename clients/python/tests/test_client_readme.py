"""The Python examples of the README's "Python client" section (and of the package's own
README) run as written, against a real server, from a folder laid out like the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from PIL import Image

from pyclient_support import DATA, REPO


def python_blocks(markdown: str) -> List[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def section(markdown: str, title: str) -> str:
    start = markdown.index(f"\n{title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else None]


def run_example(code: str, server, cwd: Path) -> str:
    (cwd / "tests").symlink_to(REPO / "tests")
    code = code.replace("localhost:50051", server.addr)
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, f"example failed:\n{code}\n{p.stderr}"
    return p.stdout


README = (REPO / "README.md").read_text()
EXAMPLES = python_blocks(section(README, "## Python client"))


def test_the_section_has_examples() -> None:
    assert len(EXAMPLES) >= 3
    assert "tests/data/ph2/IMD002.png" in EXAMPLES[0]


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example(server, tmp_path: Path, index: int) -> None:
    out = run_example(EXAMPLES[index], server, tmp_path)
    if index == 0:
        with Image.open(DATA / "ph2" / "IMD002.png") as img:
            size = img.size
        with Image.open(tmp_path / "IMD002.mask.png") as mask:
            assert mask.size == size
        assert {p.name for p in (tmp_path / "out").iterdir()} == {
            "IMD002.labels.png",
            "IMD002.mask.png",
            "IMD002.json",
        }
        assert "clusters" in out and "foreground" in out
    assert out.strip()


def test_package_readme_example(server, tmp_path: Path) -> None:
    text = (REPO / "clients" / "python" / "README.md").read_text()
    (code,) = python_blocks(text)
    assert "(" in run_example(code, server, tmp_path)
