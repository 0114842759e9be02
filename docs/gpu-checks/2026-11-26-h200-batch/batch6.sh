#!/usr/bin/env bash
# GPU check for issue #5, part 2: batched fits (a stack of networks per step).
set -u
cd "$(dirname "$0")"
SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$SP/torch/lib:$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
T=$OUT/cuda-tests.txt
t() { echo "### $*" >> $T; timeout 90 "$@" >> $T 2>&1; echo "rc=$?" >> $T; }
export DEFORM_GOLDEN=golden/deform_golden.json
t ./ops-deform-test --test-threads 1 cuda
t ./ops-sgd-test cuda
t ./model-batch-test cuda
S3NET_POINTWISE=matmul t ./model-batch-test cuda
t ./model-fit-test cuda
grep -E "^###|^test |test result|rc=|panicked" $T
B=$OUT/bench.txt
run() { echo "### $*" >> $B; timeout 100 "$@" >> $B 2>&1; echo "rc=$?" >> $B; }
run ./s3net bench fit --device cuda --repeats 5
run ./s3net bench fit --device cuda --repeats 1 --batch 1,8,16,32,64
S3NET_POINTWISE=matmul run ./s3net bench fit --device cuda --repeats 1 --batch 8,16,32,64
run ./s3net bench fit --device cuda --repeats 1 --batch 16,32 --batch-workers 2
run ./s3net bench fit --device cuda --repeats 1 --features 64 --batch 16
grep -E "###|seconds_per_iteration_median|seconds_per_fit_median|\"batch\"|images_per_second|seconds_per_step|workers|rc=" $B
nvidia-smi --query-gpu=memory.used --format=csv >> $OUT/gpu.txt
