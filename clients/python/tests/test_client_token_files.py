"""Tokens in files, rotated under running programs: a real server whose caller's token file it
looks at every second (``server.reload_interval_s``), a Python client that reads its token from
a file, and a rotation done the way a Kubernetes Secret's files change (a new file renamed over
the old) with no call failing: the new token added beside the old on the server, the client's
file changed, the old token removed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from pyclient_support import BIN, REPO, start_server, wait_until
from s3net_client import Client, S3NetError, Unauthenticated


def _write(path: Path, text: str) -> None:
    """Replaces ``path`` at once, as the kubelet swaps a Secret volume's files."""
    tmp = path.with_name(path.name + ".next")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@pytest.fixture()
def files(tmp_path):
    server_file, client_file = tmp_path / "server-pacs", tmp_path / "client-token"
    _write(server_file, "old-secret\n")
    _write(client_file, "old-secret\n")
    return server_file, client_file


@pytest.fixture()
def server(files):
    env = {"S3NET__SERVER__CALLERS__PACS__TOKEN_FILE": str(files[0]), "S3NET__SERVER__RELOAD_INTERVAL_S": "1"}
    s = start_server("--cpu-workers", "1", env=env)
    yield s
    s.stop()


def _accepted(addr: str, token: str) -> bool:
    with Client(addr, token=token, retries=0, timeout=30) as c:
        try:
            c.list_jobs()
            return True
        except Unauthenticated:
            return False


def test_a_token_is_rotated_without_a_failed_call(server, files) -> None:
    server_file, client_file = files
    calls, failures, stop = [0], [], threading.Event()

    def keep_calling(client: Client) -> None:
        while not stop.is_set():
            try:
                client.list_jobs()
                calls[0] += 1
            except S3NetError as e:  # pragma: no cover - what the test is about
                failures.append(e)

    with Client(server.addr, token_file=client_file, retries=0, timeout=30) as client:
        caller = threading.Thread(target=keep_calling, args=(client,))
        caller.start()
        try:
            # 1. The new token beside the old one, on the server.
            _write(server_file, "old-secret\nnew-secret\n")
            wait_until(lambda: _accepted(server.addr, "new-secret"), timeout=30)
            # 2. The client moves over: its next calls send the new token.
            before = calls[0]
            _write(client_file, "new-secret\n")
            wait_until(lambda: calls[0] > before + 20, timeout=30)
            assert client._settings.metadata == (("authorization", "Bearer new-secret"),)
            # 3. The old token removed.
            _write(server_file, "new-secret\n")
            wait_until(lambda: not _accepted(server.addr, "old-secret"), timeout=30)
            before = calls[0]
            wait_until(lambda: calls[0] > before + 20, timeout=30)
        finally:
            stop.set()
            caller.join()
    assert not failures, failures[:3]
    assert any("[server.callers] reloaded" in line for line in server.log)
    assert not any("secret" in line for line in server.log), "no token in the server's log"


def test_a_token_file_gone_keeps_the_last_token(server, files) -> None:
    _, client_file = files
    with Client(server.addr, token_file=client_file, retries=0, timeout=30) as client:
        client.list_jobs()
        client_file.unlink()
        with pytest.warns(RuntimeWarning, match=r"token file .*client-token: cannot read it .*sending the token read before"):
            client.list_jobs()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.list_jobs()  # said once, not at every call
        _write(client_file, "old-secret")
        client.list_jobs()


def test_bad_token_files_are_refused_naming_them(tmp_path) -> None:
    for content, why in (("", "empty"), ("a-secret\nb-secret\n", "2 lines, a client sends one token"), (b"\xff\xfe", "not UTF-8 text")):
        f = tmp_path / "token"
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=why) as e:
            Client("127.0.0.1:1", token_file=f)
        assert str(f) in str(e.value) and "secret" not in str(e.value).replace(str(f), "")
    with pytest.raises(ValueError, match="cannot read it"):
        Client("127.0.0.1:1", token_file=tmp_path / "missing")
    f.write_text("t")
    with pytest.raises(ValueError, match="give the token one way"):
        Client("127.0.0.1:1", token="t", token_file=f)


def test_both_command_lines_take_a_token_file(server, files) -> None:
    _, client_file = files
    env = {k: v for k, v in os.environ.items() if k not in ("S3NET_TOKEN", "S3NET_TOKEN_FILE")}
    env["PYTHONPATH"] = str(REPO / "clients" / "python" / "src")
    python = [sys.executable, "-m", "s3net_client.cli", "list", "--addr", server.addr]
    rust = [str(BIN), "client", "list", "--addr", f"http://{server.addr}"]
    for cmd in (python, rust):
        p = subprocess.run([*cmd, "--token-file", str(client_file)], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        p = subprocess.run(cmd, env={**env, "S3NET_TOKEN_FILE": str(client_file)}, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        p = subprocess.run(cmd, env={**env, "S3NET_TOKEN_FILE": str(client_file), "S3NET_TOKEN": "old-secret"}, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "S3NET_TOKEN and S3NET_TOKEN_FILE are both set" in p.stderr, p.stderr
        p = subprocess.run([*cmd, "--token-file", str(client_file) + ".missing"], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "cannot read it" in p.stderr, p.stderr


def test_the_bridge_takes_a_token_file(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")}
    bridge = [sys.executable, "-m", "s3net_client.bridge", "--addr", "127.0.0.1:1", "--destination", "PACS@127.0.0.1:1"]
    p = subprocess.run([*bridge, "--token", "t", "--token-file", str(tmp_path / "f")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--token and --token-file: give the token one way" in p.stderr, p.stderr
    p = subprocess.run([*bridge, "--token-file", str(tmp_path / "missing")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "token file" in p.stderr and "missing: cannot read it" in p.stderr, p.stderr
