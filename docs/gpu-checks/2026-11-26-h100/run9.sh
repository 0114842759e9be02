#!/usr/bin/env bash
# GPU check 1 of this session: own CUDA depthwise kernels — CUDA tests, fit benches, and a
# per-kernel profile (ncu) of batched steps.
set -u
cd "$(dirname "$0")"
SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$SP/torch/lib:$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
T=$OUT/cuda-tests.txt
t() { echo "### $*" >> $T; timeout 90 "$@" >> $T 2>&1; echo "rc=$?" >> $T; }
export DEFORM_GOLDEN=golden/deform_golden.json
t ./ops-depthwise-test --test-threads 1
t ./ops-deform-test --test-threads 1 cuda
t ./model-batch-test cuda
t ./model-fit-test cuda
grep -E "^###|test result|rc=|panicked|differs|FAILED" $T | head -40
B=$OUT/bench.txt
run() { echo "### $*" >> $B; timeout 90 "$@" >> $B 2>&1; echo "rc=$?" >> $B; }
run ./s3net bench fit --device cuda --repeats 5
run ./s3net bench fit --device cuda --repeats 1 --batch 16,32
run ./s3net bench deform --size 256 --channels 32 --device cuda --json
grep -E "###|seconds_per_iteration_median|seconds_per_fit_median|\"batch\"|images_per_second|seconds_per_step|rc=|forward" $B
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
timeout 200 $NCU --metrics gpu__time_duration.sum --csv --clock-control none --cache-control none \
  --launch-skip 4000 --launch-count 1500 ./s3net bench fit --device cuda --repeats 1 --batch 16 \
  > $OUT/ncu16.csv 2> $OUT/ncu16.err; echo "ncu rc=$?"
python3 - <<'PY'
import csv, collections, os
rows = list(csv.reader(open(os.environ['OUT'] + '/ncu16.csv')))
hdr = next((i for i, r in enumerate(rows) if 'Kernel Name' in r), None)
if hdr is None:
    print('no ncu table'); raise SystemExit
h = rows[hdr]; ki, vi, ui = h.index('Kernel Name'), h.index('Metric Value'), h.index('Metric Unit')
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[hdr + 1:]:
    if len(r) <= vi: continue
    v = float(r[vi].replace(',', '')); u = r[ui]
    v = v / 1e3 if u == 'nsecond' else v if u == 'usecond' else v * 1e3
    name = r[ki][:90]; tot[name] += v; cnt[name] += 1
s = sum(tot.values()); print('total us', round(s), 'kernels', sum(cnt.values()))
for n, v in tot.most_common(30): print(f'{v/s*100:5.1f}% {v:10.0f}us n={cnt[n]:4d} {n}')
PY
