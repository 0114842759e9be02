#!/usr/bin/env bash
# Idempotent libtorch set-up: installs PyTorch 2.11.0 from PyPI into a fixed cache folder (once per
# machine) and points the workspace's `.libtorch` link at it. Cargo reads LIBTORCH=.libtorch from
# .cargo/config.toml; the binaries get an rpath to the real folder (see crates/*/build.rs).
set -euo pipefail
TORCH_VERSION=2.11.0
# nvcc for the CUDA kernels of crates/ops, matching the CUDA 13.0 runtime the torch wheel ships
# (nvvm and crt pinned too: left free, pip picks newer ones whose PTX this ptxas rejects).
NVCC_PKGS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88"
CACHE="${S3NET_CACHE:-$HOME/.cache/s3net}"
VENV="$CACHE/torch-$TORCH_VERSION"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

mkdir -p "$CACHE"
stamp="$VENV/.s3net-ok"
if [ ! -f "$stamp" ]; then
  # One installer at a time per machine (CI and a developer shell may both run this).
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -f "$stamp" ]; then
    echo "setup-torch: installing torch==$TORCH_VERSION into $VENV (about 5 GB, once per machine)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    got="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
    if [ "$got" != "$TORCH_VERSION" ]; then
      echo "setup-torch: expected torch $TORCH_VERSION, found $got" >&2; exit 1
    fi
    touch "$stamp"
  fi
fi
nvcc_stamp="$VENV/.s3net-nvcc-ok"
if [ ! -f "$nvcc_stamp" ] && [ -z "${S3OPS_NO_CUDA:-}" ]; then
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -f "$nvcc_stamp" ]; then
    echo "setup-torch: installing nvcc ($NVCC_PKGS) into $VENV" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check $NVCC_PKGS
    touch "$nvcc_stamp"
  fi
fi
# CMake for the JPEG-LS codec (CharLS, C++) that crates/imaging builds; Cargo finds it through
# the `.cmake` link (CMAKE in .cargo/config.toml), so no system CMake is needed.
cmake_stamp="$VENV/.s3net-cmake-ok"
if [ ! -f "$cmake_stamp" ]; then
  exec 9>"$CACHE/.lock"
  flock 9
  if [ ! -f "$cmake_stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "cmake==3.31.6"
    touch "$cmake_stamp"
  fi
fi
if [ "$(readlink "$ROOT/.cmake" 2>/dev/null || true)" != "$VENV/bin/cmake" ]; then
  ln -sfn "$VENV/bin/cmake" "$ROOT/.cmake"
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
torch_dir="$site/torch"
[ -f "$torch_dir/lib/libtorch_cpu.so" ] || { echo "setup-torch: $torch_dir/lib/libtorch_cpu.so missing" >&2; exit 1; }
if [ "$(readlink "$ROOT/.libtorch" 2>/dev/null || true)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" "$ROOT/.libtorch"
fi
echo "$VENV"
