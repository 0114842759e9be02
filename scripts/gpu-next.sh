#!/usr/bin/env bash
# The next GPU check that README "Not done yet" plans, as one device call: carry the bundle
# (`make gpu-bundle`, then the device tool's carry [".gpu.tar.xz"]) and run, from the
# repository root of the device's copy,
#
#   bash scripts/gpu-next.sh
#
# Five parts under limits of their own (scripts/gpu-parts.sh; about 9 minutes in all, within a
# session's 15 of device time with the machine's start): the CUDA tests; the batched fits of
# this build against the kernels in waiting and the unfused epilogues; what bounds each of our
# kernels (ncu, bfloat16); the server with 160 jobs; an operator-level trace (bfloat16). Its
# results come back as all.tgz and one log per part; docs/gpu-checks/ keeps them with a summary.
exec bash "$(dirname "$0")/gpu-parts.sh" \
  'tests 60 STEPS=tests' \
  'ab 150 AB_BASE="./s3net-deform-tiled ./s3net-unfused-epilogues" STEPS=ab' \
  'kernels 150 PROFILE_ARGS="--precision bfloat16" STEPS=kernels' \
  'serve 120 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'trace 60 TRACE_ARGS="--precision bfloat16" STEPS=trace'
