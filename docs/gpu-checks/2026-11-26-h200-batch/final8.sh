#!/usr/bin/env bash
set -u
cd "$(dirname "$0")"
SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$SP/torch/lib:$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
timeout 60 ./model-batch-test cuda 2>&1 | grep -E "test result|panicked|alone" | tee $OUT/cuda-tests.txt
timeout 60 ./s3net bench fit --device cuda --repeats 1 --batch 16,32 > $OUT/bench.txt 2>&1; grep -E "\"batch\"|images_per_second|seconds_per_step|per_fit_median" $OUT/bench.txt
sed -n '/^S=\$OUT/,$p' final7.sh | sed 's/^serve_run$/serve_run --gpu-batch 16/; s/^serve_run --gpu-batch 1$//' > srv8.sh
source srv8.sh
