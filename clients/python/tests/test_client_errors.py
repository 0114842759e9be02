"""Every status code the protocol says the server answers has its own exception class."""

from __future__ import annotations

import re

import grpc

import s3net_client
from pyclient_support import REPO
from s3net_client.errors import make_error


def test_every_status_the_proto_lists_has_its_exception() -> None:
    text = (REPO / "proto" / "s3net" / "v1" / "s3net.proto").read_text()
    block = text.split("// Status codes used by every RPC")[1].split('syntax = "proto3"')[0]
    codes = re.findall(r"^//   ([A-Z_]+) ", block, re.M)
    assert len(codes) >= 10, codes  # the parse found the list
    for name in codes:
        err = make_error(getattr(grpc.StatusCode, name), "details")
        assert type(err) is not s3net_client.S3NetError, f"{name} has no exception class"
        assert err.code == getattr(grpc.StatusCode, name)
        # Exported from the package, for `except s3net_client.<Name>`.
        assert getattr(s3net_client, type(err).__name__) is type(err)
