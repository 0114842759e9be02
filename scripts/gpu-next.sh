#!/usr/bin/env bash
# The next GPU check that README "Not done yet" plans, as one device call: carry the bundle
# (`make gpu-bundle`, then the device tool's carry [".gpu.tar.xz"]) and run, from the
# repository root of the device's copy,
#
#   bash scripts/gpu-next.sh
#
# Four parts under limits of their own (scripts/gpu-parts.sh; about 7.5 minutes in all, what a
# session has left of its 15 minutes of device time after one call): the CUDA tests of what
# changed (full float32 for the batched-vs-alone case, cuDNN's TF32 setting, the deformable
# conv's batched loads, a stack of six as a graph) and of the two binaries the last call's 60 s
# cut off; this build's bfloat16 batched fits of 16, 32 and 64 networks against stacks of up to
# 64 replayed as CUDA graphs and the batched loads, each and both; the server with 160 jobs and
# graphs for its stacks of 16; what bounds each of our kernels with the batched loads (ncu).
# Its results come back as all.tgz and one log per part; docs/gpu-checks/ keeps them with a summary.
exec bash "$(dirname "$0")/gpu-parts.sh" \
  'tests 100 TEST_BINS="model-batch-test ops-tf32-test ops-deform-test ops-sgd-test ops-pointwise-test" STEPS=tests' \
  'ab 190 AB_BASE="./s3net-deform-batched ./s3net-graphs-64 ./s3net-graphs-64-batched" AB_BATCH=16,32,64 AB_PRECISIONS=bfloat16 STEPS=ab' \
  'serve 70 S3NET_GRAPH_MAX_MODELS=64 JOB_SEEDS="1 2 3 4 5 6 7 8" STEPS=serve' \
  'kernels 70 S3NET_DEFORM_BATCHED_LOADS=1 PROFILE_ARGS="--precision bfloat16" STEPS=kernels'
