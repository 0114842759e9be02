#!/usr/bin/env bash
# The next GPU check that README "Not done yet" plans, as one device call: carry the bundle
# (`make gpu-bundle`, then the device tool's carry [".gpu.tar.xz"]) and run, from the
# repository root of the device's copy,
#
#   bash scripts/gpu-next.sh
#
# Five parts under limits of their own (scripts/gpu-parts.sh; about 9.5 minutes in all, within a
# session's 15 of device time with the machine's start): every CUDA test; this build's batched
# fits against CUDA graphs for stacks of up to 4 only, the library's default until 2026-11-30
# (+5–7 % for graphs up to 64 then, bfloat16 only: here both formats, on another card), and
# against the momentum-SGD step as one kernel of ours (S3NET_FUSED_SGD=1, in waiting); the
# server with 160 jobs under its default (graphs up to 4 jobs) and with graphs up to 64 (one
# run each on 2026-11-30 put 64 4–6 % lower; these two are the same machine, minutes apart);
# an operator-level bfloat16 trace (its batch runs without graphs, so that each kernel is
# charged to the op that launched it).
# Its results come back as all.tgz and one log per part; docs/gpu-checks/ keeps them with a summary.
exec bash "$(dirname "$0")/gpu-parts.sh" \
  'tests 120 STEPS=tests' \
  'ab 200 AB_BASE="./s3net-graphs-4 ./s3net-fused-sgd" AB_BATCH=16,32,64 STEPS=ab' \
  'serve 80 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'serve64 80 S3NET__WORKERS__CUDA_GRAPH_MAX_JOBS=64 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'trace 60 TRACE_ARGS="--precision bfloat16" STEPS=trace'
