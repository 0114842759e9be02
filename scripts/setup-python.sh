#!/usr/bin/env bash
# Idempotent Python test environment: a venv at $S3NET_CACHE/py (default ~/.cache/s3net/py) with
# scripts/requirements-test.txt and the client (pip install -e clients/python). A stamp keyed on
# the hash of those files makes re-runs a no-op until one of them changes. Prints the venv path.
set -euo pipefail
CACHE="${S3NET_CACHE:-$HOME/.cache/s3net}"
VENV="$CACHE/py"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
REQ="$ROOT/scripts/requirements-test.txt"
PROJECT="$ROOT/clients/python/pyproject.toml"

# The editable install points at this checkout, so the checkout's path is part of the key.
key="$(cat "$REQ" "$PROJECT" <(echo "$ROOT") | sha256sum | cut -c1-16)"
stamp="$VENV/.s3net-$key"
if [ ! -f "$stamp" ]; then
  mkdir -p "$CACHE"
  # One installer at a time per machine (CI and a developer shell may both run this).
  exec 9>"$CACHE/.lock-py"
  flock 9
  if [ ! -f "$stamp" ]; then
    echo "setup-python: installing the test environment into $VENV" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" -r "$REQ"
    "${pip[@]}" -e "$ROOT/clients/python"
    rm -f "$VENV"/.s3net-*
    touch "$stamp"
  fi
fi
echo "$VENV"
