"""Fixtures of the deployment tests (helpers in deploy_common.py and promql_support.py)."""

from __future__ import annotations

import pytest

from deploy_common import binary_available


@pytest.fixture(scope="session")
def exported_series():
    """The series a running server exports (promql_support.running_server_series): one
    server for every test that needs them."""
    if not binary_available():
        pytest.skip("target/release/s3net not built")
    from promql_support import running_server_series

    return running_server_series()
