#!/usr/bin/env bash
# Packs what a GPU check carries to a machine that has a GPU and PyTorch 2.11.0 but no Rust
# (the lent check machines): the release binary, the test binaries with CUDA cases, the
# torchvision golden file, the dev images and scripts/gpu-check.sh, stripped, into .gpu/
# (about 157 MB) and .gpu.tar.xz (about 47 MB on 2026-11-29: each test binary carries the ops'
# CUDA objects, about 8 MB stripped; a device call carries 64 MiB at most). Run there: `tar xf .gpu.tar.xz && bash
# .gpu/gpu-check.sh` (see README, "GPU checks").
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
out=.gpu
mkdir -p "$out/golden"
cargo build --release --locked -p s3net-cli
cp target/release/s3net "$out/s3net"
# The test binaries of the crates with CUDA cases, named <crate>-<test>-test.
cargo test --release --locked -p s3net-ops -p s3net-model --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if "test" not in t["kind"]:
        continue
    crate = m["manifest_path"].split("/")[-2]  # crates/<crate>/Cargo.toml
    name = crate + "-" + t["name"].replace("s3net_", "") + "-test"
    # Tests with no CUDA case stay here: the bundle must fit the 64 MiB a device call carries.
    if name in ("model-batch_oom-test",):
        continue
    shutil.copy(m["executable"], sys.argv[1] + "/" + name)
    print(name)
' "$out"
strip "$out/s3net" "$out"/*-test
cp crates/model/tests/data/deform_golden.json "$out/golden/"
cp scripts/gpu-check.sh scripts/trace-summary.py scripts/ab-summary.py scripts/ncu-summary.py \
  scripts/serve-steady.py "$out/"
# This build with each kernel choice of the environment the other way from its default, as a
# binary of its own for the steps that compare binaries (AB_BASE="./s3net-libtorch-losses
# ./s3net-cublas-split ./s3net-dw-columns ./s3net-unfused-epilogues ./s3net-graphs-4
# ./s3net-fused-sgd ./s3net-stem-columns"
# STEPS="ab evalab"): the loss terms as libtorch's ops (S3NET_CUDA_PIXEL_LOSSES=0), cuBLAS's
# copied chunk products for float32 split reductions (S3NET_SPLIT_K_KERNEL=0), the depthwise
# kernels' column layout (S3NET_DW_COLUMNS=1; 1.4 % slower in bfloat16 on an H200,
# 2026-11-28), the I-LKA block's gate and residual add as ops of their own after the 1×1 convs
# (S3NET_FUSED_EPILOGUES=0; 0.98–1.00 of the fused epilogues' speed on an H200, 2026-11-30),
# CUDA graphs for stacks of up to 4 networks only, the default until 2026-11-30
# (S3NET_GRAPH_MAX_MODELS=4; 0.93–0.95 of the graphs for stacks of up to 64 then), the
# momentum-SGD step as one kernel of ours (S3NET_FUSED_SGD=1; not timed yet), and a stack's
# stem as im2col's columns and a stacked 1×1 conv (S3NET_STEM_COLUMNS=1; not timed yet).
wrapper() {  # name, then the environment it sets
  local name=$1; shift
  printf '#!/bin/sh\n%s exec "$(dirname "$0")/s3net" "$@"\n' "$*" > "$out/$name"
  chmod +x "$out/$name"
}
rm -f "$out"/s3net-*  # wrappers of earlier bundles
wrapper s3net-libtorch-losses S3NET_CUDA_PIXEL_LOSSES=0
wrapper s3net-cublas-split S3NET_SPLIT_K_KERNEL=0
wrapper s3net-dw-columns S3NET_DW_COLUMNS=1
wrapper s3net-unfused-epilogues S3NET_FUSED_EPILOGUES=0
wrapper s3net-graphs-4 S3NET_GRAPH_MAX_MODELS=4
wrapper s3net-fused-sgd S3NET_FUSED_SGD=1
wrapper s3net-stem-columns S3NET_STEM_COLUMNS=1
# This build with the affine term's gradient through T(x), as the default preset had it before
# it took the one backward pass (`--affine-gradient transformed`, a flag of `bench fit` and
# `eval`: for the ab and evalab steps only).
printf '#!/bin/sh\nexec "$(dirname "$0")/s3net" "$@" --affine-gradient transformed\n' > "$out/s3net-transformed"
chmod +x "$out/s3net-transformed"
for d in ph2-dev lung-dev; do
  if [ -d "$out/$d" ]; then continue; fi
  if [ -d "$SHARED/$d" ]; then
    cp -r "$SHARED/$d" "$out/$d"
  else
    echo "note: no $SHARED/$d; the check's server and eval steps need $out/$d (images/, masks/)" >&2
  fi
done
# The folder outgrew the 64 MiB a device call carries with the working tree (65 MiB with the
# bfloat16 kernels: each test binary links the CUDA kernels); the binaries compress about 3×.
# Carry .gpu.tar.xz and unpack it there: `tar xf .gpu.tar.xz && bash .gpu/gpu-check.sh`.
tar -cf - "$out" | xz -T2 -6 > "$out.tar.xz"
du -sh "$out" "$out.tar.xz"
