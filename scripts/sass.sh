#!/usr/bin/env bash
# `make sass`: what our CUDA kernels compile to, without a GPU — registers and spills per
# kernel (ptxas) and its static instruction mix (cuobjdump's SASS), one line per kernel in
# sass-out/summary.md (scripts/sass-summary.py says why). Uses the PyPI nvcc that setup-torch.sh
# installs; fetches cuobjdump and nvdisasm (PyPI wheels, a few MB) into the cache once.
# SASS_ARCH=sm_80 reads the A100 code instead of the H100/H200 code; SASS_MATCH=depthwise keeps
# the kernels whose name contains it.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${S3NET_CACHE:-$HOME/.cache/s3net}"
VENV="$CACHE/torch-2.11.0"
ARCH="${SASS_ARCH:-sm_90}"
DISASM_VERSION=13.5.37
NVCC="${S3OPS_NVCC:-$(ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -1)}"
[ -x "$NVCC" ] || { echo "sass: no nvcc (run make setup, or set S3OPS_NVCC)" >&2; exit 1; }
TOOLS="$CACHE/cuda-disasm-$DISASM_VERSION"
if [ ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]; then
  echo "sass: fetching cuobjdump and nvdisasm $DISASM_VERSION into $TOOLS" >&2
  tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" \
    "nvidia-cuda-cuobjdump==$DISASM_VERSION" "nvidia-cuda-nvdisasm==$DISASM_VERSION"
  mkdir -p "$TOOLS"
  for w in "$tmp"/*.whl; do "$VENV/bin/python" -m zipfile -e "$w" "$TOOLS"; done
  chmod +x "$TOOLS"/nvidia/cu13/bin/*
  rm -rf "$tmp"
fi
export PATH="$TOOLS/nvidia/cu13/bin:$PATH"
OUT=sass-out
mkdir -p "$OUT"
pairs=()
for src in crates/ops/csrc/*_cuda.cu; do
  stem="$(basename "$src" .cu)"
  echo "sass: $src ($ARCH)" >&2
  "$NVCC" -O3 -std=c++17 -w -arch="$ARCH" -Xptxas -v -c "$src" -o "$OUT/$stem.o" 2> "$OUT/$stem.ptxas"
  cuobjdump -sass "$OUT/$stem.o" > "$OUT/$stem.sass"
  pairs+=("$OUT/$stem.ptxas" "$OUT/$stem.sass")
done
python3 scripts/sass-summary.py --match "${SASS_MATCH:-}" "${pairs[@]}" > "$OUT/summary.md"
cat "$OUT/summary.md"
