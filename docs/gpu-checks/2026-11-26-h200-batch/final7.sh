#!/usr/bin/env bash
# GPU check for issue #5, part 3: CUDA tests of the batch engine, fit benches with the final
# defaults, and the server's GPU workers batching real jobs end to end (with the GPU memory
# metric).
set -u
cd "$(dirname "$0")"
SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$SP/torch/lib:$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
T=$OUT/cuda-tests.txt
t() { echo "### $*" >> $T; timeout 60 "$@" >> $T 2>&1; echo "rc=$?" >> $T; }
export DEFORM_GOLDEN=golden/deform_golden.json
t ./ops-deform-test --test-threads 1 cuda
t ./ops-sgd-test cuda
t ./model-batch-test cuda
t ./model-fit-test cuda
grep -E "^###|test result|rc=|panicked" $T
B=$OUT/bench.txt
run() { echo "### $*" >> $B; timeout 75 "$@" >> $B 2>&1; echo "rc=$?" >> $B; }
run ./s3net bench fit --device cuda --repeats 5
run ./s3net bench fit --device cuda --repeats 1 --batch 8,16,32
run ./s3net bench fit --device cuda --repeats 1 --batch 16 --batch-workers 2
grep -E "###|seconds_per_iteration_median|seconds_per_fit_median|\"batch\"|images_per_second|seconds_per_step|rc=" $B
# The server: 40 PH2 jobs (20 images x 2 seeds), default options, GPU workers batching.
S=$OUT/server.txt
serve_run() {
  echo "### serve $*" >> $S
  ./s3net serve --addr 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 "$@" > $OUT/serve-log.txt 2>&1 &
  local pid=$!
  for i in $(seq 60); do ./s3net client health > /dev/null 2>&1 && break; sleep 0.5; done
  local t0=$(date +%s.%N); : > ids.txt
  local n=0
  for seed in 1 2; do for f in ${IMGS:-ph2-dev/images/*}; do n=$((n+1)); ./s3net client submit "$f" --seed $seed ${EXTRA:-} > id-$n.txt 2>>$S & done; done
  wait $(jobs -p | grep -vx "$pid"); cat id-*.txt > ids.txt; rm -f id-*.txt
  local w=()
  for id in $(cat ids.txt); do (timeout 120 ./s3net client watch $id > /dev/null 2>&1 && touch ok-$id) & w+=($!); done
  wait "${w[@]}"
  local t1=$(date +%s.%N)
  local n=$(wc -l < ids.txt); local ok=$(ls ok-* 2>/dev/null | wc -l)
  python3 -c "print('jobs', $n, 'completed', $ok, 'wall_s', round($t1-$t0,2), 'images_per_s', round($n/($t1-$t0),2))" >> $S
  python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())" | grep -E "^s3net_(gpu_memory|workers|fit_seconds_(count|sum)|jobs_total)" >> $S
  kill -TERM $pid; wait $pid; echo "serve rc=$?" >> $S; rm -f ok-*
}
serve_run
serve_run --gpu-batch 1
cat $S
tail -5 $OUT/serve-log.txt
