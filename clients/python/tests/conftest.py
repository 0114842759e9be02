"""Fixtures of the client tests (helpers in pyclient_support.py, a name no other suite uses)."""

from __future__ import annotations

from typing import Iterator

import pytest

from pyclient_support import Server, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The shared default server: one CPU worker, queue of 64."""
    s = start_server("--cpu-workers", "1")
    yield s
    s.stop()


@pytest.fixture()
def client(server: Server):
    from s3net_client import Client

    with Client(server.addr, timeout=120) as c:
        yield c
