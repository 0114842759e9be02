#!/usr/bin/env bash
# The next GPU check that README "Not done yet" plans, as one device call: carry the bundle
# (`make gpu-bundle`, then the device tool's carry [".gpu.tar.xz"]) and run, from the
# repository root of the device's copy,
#
#   bash scripts/gpu-next.sh
#
# Five parts under limits of their own (scripts/gpu-parts.sh; about 8 minutes in all, within a
# session's 15 of device time with the machine's start): every CUDA test; this build's batched
# fits against CUDA graphs for stacks of up to 4 only, the library's default until 2026-11-30
# (+5–7 % for graphs up to 64 then: again, bfloat16, on another card), and against the two
# changes in waiting: the momentum-SGD step as one kernel of ours
# (S3NET_FUSED_SGD=1) and a stack's stem as columns and a 1×1 conv (S3NET_STEM_COLUMNS=1); the
# server with 160 jobs under its default (graphs up to 4 jobs) and with graphs up to 64 (one
# run each on 2026-11-30 put 64 4–6 % lower; these two are the same machine, minutes apart);
# an operator-level bfloat16 trace (its batch runs without graphs, so that each kernel is
# charged to the op that launched it).
# Its results come back as all.tgz and one log per part; docs/gpu-checks/ keeps them with a summary.
exec bash "$(dirname "$0")/gpu-parts.sh" \
  'tests 110 STEPS=tests' \
  'ab 150 AB_BASE="./s3net-graphs-4 ./s3net-fused-sgd ./s3net-stem-columns" AB_BATCH=16,32,64 AB_PRECISIONS=bfloat16 STEPS=ab' \
  'serve 75 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'serve64 75 S3NET__WORKERS__CUDA_GRAPH_MAX_JOBS=64 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'trace 50 TRACE_ARGS="--precision bfloat16" STEPS=trace'
