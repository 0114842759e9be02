"""TLS, mutual TLS and the bearer token against a server that requires all three.

The certificates are made by `pyclient_support.make_pki` with `cryptography`: a CA, a server
certificate for 127.0.0.1/localhost and a client certificate, all signed by that CA.
"""

from __future__ import annotations

import grpc
import pytest

from pyclient_support import DATA, FAST, make_pki, start_server
from s3net_client import AsyncClient, Client, S3NetError, Unauthenticated, Unavailable

TOKEN = "s3cr3t-test-token"


def _mutual_tls(pki) -> dict:
    """The server's settings for mutual TLS with the test PKI."""
    return {
        "S3NET__SERVER__TLS__CERT": str(pki["server_cert"]),
        "S3NET__SERVER__TLS__KEY": str(pki["server_key"]),
        "S3NET__SERVER__TLS__CLIENT_CA": str(pki["ca"]),
    }


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    s = start_server("--cpu-workers", "1", env={**_mutual_tls(pki), "S3NET__SERVER__AUTH_TOKEN": TOKEN})
    yield s, pki
    s.stop()


def _client(secure, cls=Client, **overrides):
    s, pki = secure
    kwargs = dict(
        ca=pki["ca"],
        cert=pki["client_cert"],
        key=pki["client_key"],
        token=TOKEN,
        timeout=60,
        retries=0,
    )
    kwargs.update(overrides)
    return cls(s.addr, **kwargs)


def test_mtls_with_token(secure) -> None:
    with _client(secure) as client:
        r = client.segment(DATA / "dicom" / "CT_small.dcm", **FAST)
        assert r.labels.shape == (128, 128)
        sub = client.submit(DATA / "dicom" / "CT_small.dcm", **FAST)
        assert client.wait(sub.job_id).job_id == sub.job_id
    # PEM bytes work as well as paths, and "localhost" matches the certificate's DNS name.
    s, pki = secure
    port = s.addr.rsplit(":", 1)[1]
    with Client(
        f"https://localhost:{port}",
        ca=pki["ca"].read_bytes(),
        cert=pki["client_cert"].read_bytes(),
        key=pki["client_key"].read_bytes(),
        token=TOKEN,
        retries=0,
    ) as client:
        assert client.get(sub.job_id).result is not None


def test_wrong_or_missing_token(secure) -> None:
    for token in ("wrong", None):
        with _client(secure, token=token) as client:
            with pytest.raises(Unauthenticated) as e:
                client.segment(DATA / "dicom" / "CT_small.dcm", **FAST)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in e.value.details
            with pytest.raises(Unauthenticated):
                client.list_jobs()


def test_without_client_certificate_or_trust(secure) -> None:
    # No client certificate: the server ends the handshake.
    with _client(secure, cert=None, key=None) as client:
        with pytest.raises(S3NetError) as e:
            client.list_jobs(timeout=10)
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # The system roots do not trust the test CA.
    s, _ = secure
    with Client(f"https://{s.addr}", token=TOKEN, retries=0) as client:
        with pytest.raises(Unavailable):
            client.list_jobs(timeout=10)


def test_async_client_over_mtls(secure) -> None:
    import asyncio

    async def main() -> None:
        async with _client(secure, cls=AsyncClient) as client:
            r = await client.segment(DATA / "dicom" / "CT_small.dcm", **FAST)
            assert r.mask.shape == (128, 128)
        async with _client(secure, cls=AsyncClient, token="wrong") as client:
            with pytest.raises(Unauthenticated):
                await client.list_jobs()

    asyncio.run(main())


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="both cert= and key="):
        Client("localhost:1", cert=b"x")
    with pytest.raises(ValueError, match="cannot read the CA bundle"):
        Client("localhost:1", ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="contradicts"):
        Client("localhost:1", tls=False, ca=b"x")


def test_a_client_certificate_names_the_caller(tmp_path_factory) -> None:
    """Under mutual TLS the certificate's common name ("s3net test client") names the caller
    `pacs` (server.callers.pacs.certificate_names): no token needed, and its jobs are its own."""
    pki = make_pki(tmp_path_factory.mktemp("pki-callers"))
    s = start_server(
        "--cpu-workers",
        "1",
        env={
            **_mutual_tls(pki),
            "S3NET__SERVER__CALLERS__PACS__CERTIFICATE_NAMES": "s3net test client",
            "S3NET__SERVER__CALLERS__OPS__TOKEN": "ops-token",
            "S3NET__SERVER__CALLERS__OPS__OPERATOR": "true",
        },
    )
    try:
        with Client(s.addr, ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"], retries=0) as client:
            sub = client.submit(DATA / "dicom" / "CT_small.dcm", **FAST)
            client.wait(sub.job_id)
            assert client.get(sub.job_id).caller == "pacs"
            assert [j.job_id for j in client.list_jobs()] == [sub.job_id]
        # Another certificate's holder (a DICOM node's) is no caller without a token; with the
        # operator's token it sees the job, and whose it is.
        with Client(s.addr, ca=pki["ca"], cert=pki["bridge_cert"], key=pki["bridge_key"], retries=0) as client:
            with pytest.raises(Unauthenticated) as e:
                client.list_jobs()
            assert "no client certificate that names a caller" in e.value.details
        with Client(s.addr, ca=pki["ca"], cert=pki["bridge_cert"], key=pki["bridge_key"], token="ops-token", retries=0) as client:
            assert [(j.job_id, j.caller) for j in client.list_jobs()] == [(sub.job_id, "pacs")]
    finally:
        s.stop()
