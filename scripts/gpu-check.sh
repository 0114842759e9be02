#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU and PyTorch 2.11.0 in its python3 but no
# Rust, from the folder scripts/gpu-bundle.sh filled (.gpu/): the CUDA test cases, the fit and
# deformable-conv benchmarks, the server with 40 PH2 jobs and its metrics, accuracy on the dev
# data on the GPU, and (PROFILE=1) a per-kernel profile of a batched step with ncu.
#
# Results go to $OUT (default ./gpu-check-out): cuda-tests.txt, bench.txt, server*.txt,
# eval-*.json, ncu-*.txt, and a short digest on stdout. The server step ends with a run capped
# at 8 % of the GPU's memory (workers.gpu_memory_fraction), where batches run out of memory.
# Steps, run in the order given: STEPS="tests bf16 server bench eval tf32" (the default: the
# CUDA tests first, so a call cut short by its time limit still brings them back) plus
# "profile" with PROFILE=1, and on request "splitk" (batched fits in each --split-k layout),
# "serve" (the server's default run only, float32 and bfloat16 jobs), "evalbf16" (the eval
# with bfloat16 activations alone), "grid" (batched fits on 128² and 192² grids, where the
# dev data's accuracy nearly holds on the CPU: see the README's "Smaller grids"), "ab" (this
# build's batched fits against an earlier binary's, ./s3net-base, alternately), "evalab" (their accuracy over seeds) and "trace" (an
# operator-level trace of a batch's steps: kernels charged to the ops that launched them)
# and "kernels" (ncu's sections and stall reasons for each of our own kernels: what bounds it)
# (PROFILE_ARGS adds `s3net bench fit` flags to the profiled run, e.g. "--precision bfloat16").
# "tf32" repeats the fit benches and the eval with cuBLAS's matmuls in TF32
# (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1; cuDNN's convolutions run in TF32 by default either way),
# and "bf16" the fit benches, the server and the eval with bfloat16 activations
# (--precision bfloat16), to weigh speed against accuracy.
set -u
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
# PACK=1: everything goes into one archive, $OUT/gpu-check.tgz, written when the script ends,
# also on TERM or INT once the command then running has returned (the device tool brings back
# only a handful of files).
if [ "${PACK:-0}" = 1 ]; then
  PACK_TO=$OUT
  OUT=$(mktemp -d)
  trap 'tar czf "$PACK_TO/gpu-check.tgz" -C "$OUT" .' EXIT
  trap 'exit 143' TERM INT
fi
STEPS=${STEPS:-tests bf16 server bench eval tf32}
[ "${PROFILE:-0}" = 1 ] && STEPS="$STEPS profile"
SP=$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')
export LD_LIBRARY_PATH=$SP/torch/lib:$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
export DEFORM_GOLDEN=golden/deform_golden.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step_tests() {
  T=$OUT/cuda-tests.txt; : > "$T"
  # TEST_BINS: only these test binaries, in this order (e.g. "model-batch-test ops-tf32-test").
  local bins=(./*-test)
  [ -n "${TEST_BINS:-}" ] && read -r -a bins <<< "$(printf './%s ' $TEST_BINS)"
  for t in "${bins[@]}"; do
    # Every test whose name says cuda or bfloat16 (the bfloat16 ones run on the CPU and, when
    # present, CUDA), plus all of ops-depthwise/pointwise (their CUDA cases compare against
    # libtorch and skip nothing on a GPU); not the CPU emulation of the kernels (make test runs
    # it), except inside column_layout_cuda_and_emulated's child.
    case $t in
      *depthwise-test|*pointwise-test) filter=() ;;
      *) filter=(cuda bfloat16) ;;
    esac
    echo "### $t ${filter[*]}" >> "$T"
    timeout 120 "$t" --test-threads 1 "${filter[@]}" --skip emulated_ >> "$T" 2>&1
    echo "rc=$?" >> "$T"
  done
  grep -E "^###|test result|rc=|panicked" "$T"
}

step_bench() {
  B=$OUT/bench.txt; : > "$B"
  run() { echo "### $*" >> "$B"; timeout 120 "$@" >> "$B" 2>&1; echo "rc=$?" >> "$B"; }
  run ./s3net bench fit --device cuda --repeats 5
  run ./s3net bench fit --device cuda --repeats 2 --batch 4,16,32 --concurrency 2,4
  run ./s3net bench deform --size 256 --channels 32 --device cuda --json
  # With a fit's offsets (under 0.01 pixel) rather than the default's few pixels.
  run ./s3net bench deform --size 256 --channels 32 --offset-std 0.01 --device cuda --json
  run ./s3net bench depthwise --size 256 --channels 32 --device cuda --json
  # The depthwise kernels' column layout (off by default: 1.4 % slower fits on an H200).
  run env S3NET_DW_COLUMNS=1 ./s3net bench depthwise --size 256 --channels 32 --device cuda --json
  # The loss terms: pixel_losses' CUDA kernel against the same terms in libtorch's ops.
  run ./s3net bench losses --size 256 --channels 32 --device cuda --json
  grep -E "###|seconds_per_fit_median|without_cuda_graphs|\"batch\"|fits_at_once|images_per_second|seconds_per_step|forward|split_k|unavailable|rc=" "$B"
}

serve_jobs() {  # tag, then extra `s3net serve` flags
  # 40 PH2 jobs (20 images x 2 seeds), default options, submitted at once by 40 clients; wall
  # time from the first submit to the last outcome, then the metrics and any job failure from
  # the server's log. JOB_IMAGES, JOB_SEEDS and JOB_ARGS change the jobs (e.g. a quick try on a
  # CPU: JOB_IMAGES=ph2-dev/images/IMD002.png JOB_ARGS="--iterations 2"; JOB_SEEDS="1 2 3 4 5 6
  # 7 8": 160 jobs, where 40 leave the stacks' filling and draining a large share of the wall
  # time).
  local tag=$1; shift
  local S=$OUT/server$tag.txt log=$OUT/serve-log$tag.txt work
  : > "$S"; work=$(mktemp -d)
  # The queue holds every job of the run (its default 64 places turned 80 jobs' last 16 away
  # for the retry hint's wait: 2026-11-28).
  S3NET__QUEUE__CAPACITY=${S3NET__QUEUE__CAPACITY:-1024} \
    ./s3net serve --addr 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 "$@" > "$log" 2>&1 &
  local pid=$!
  # SERVING once every worker has warmed up (workers.warm_up): the clock starts after that.
  for _ in $(seq 60); do ./s3net client health > /dev/null 2>&1 && break; sleep 0.5; done
  grep -h "worker warmed up" "$log" | sed 's/.*worker=/warm-up: worker=/' >> "$S"
  local t0 t1 n=0 ok subs=() watchers=()
  t0=$(date +%s.%N)
  for seed in ${JOB_SEEDS:-1 2}; do
    for f in ${JOB_IMAGES:-ph2-dev/images/*}; do
      n=$((n + 1)); ./s3net client submit "$f" --seed $seed ${JOB_ARGS:-} > "$work/id-$n" 2>> "$S" & subs+=($!)
    done
  done
  wait "${subs[@]}"
  for id in $(cat "$work"/id-*); do
    (timeout 180 ./s3net client watch "$id" > /dev/null 2>&1 && touch "$work/ok-$id") & watchers+=($!)
  done
  wait "${watchers[@]}"
  t1=$(date +%s.%N)
  ok=$(ls "$work"/ok-* 2> /dev/null | wc -l)
  echo "### serve $*" >> "$S"
  python3 -c "print('jobs', $n, 'completed', $ok, 'wall_s', round($t1 - $t0, 2), 'images_per_s', round($n / ($t1 - $t0), 2))" >> "$S"
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())" |
    grep -E "^s3net_(gpu_memory|workers|fit_seconds_(count|sum)|jobs_total|jobs_restarted)" >> "$S"
  kill -TERM $pid; wait $pid; echo "serve rc=$?" >> "$S"
  grep -E "WARN|ERROR" "$log" | cut -c1-400 | head -5 >> "$S"
  # The rate of the run's middle, without the first stacks' 50 steps and the last ones' draining.
  python3 serve-steady.py "$log" >> "$S"
  rm -rf "$work"
  cat "$S"
}

step_server() {
  # The defaults (2 GPU workers, gpu_batch 16), then stacks of at most 4 jobs twice: two
  # workers capturing and replaying CUDA graphs side by side, each more often than with 16.
  serve_jobs "" ${SERVE_ARGS:-}
  serve_jobs -b4 --gpu-batch 4
  serve_jobs -b4-again --gpu-batch 4
  # Batches out of GPU memory: 8 % of the GPU for two workers stacking up to 16 jobs (about
  # 0.75 GB each). Every job should complete; s3net_jobs_restarted_total counts the starts over.
  S3NET__WORKERS__GPU_MEMORY_FRACTION=0.08 serve_jobs -oom
}

step_serve() {
  # A quick look at the server alone: the defaults, float32 then bfloat16 jobs.
  serve_jobs ""
  JOB_ARGS="--precision bfloat16" serve_jobs -bf16
}

evaluate() {  # tag, then extra `s3net eval` flags; EVAL_BIN: the binary (default ./s3net)
  local tag=$1; shift
  for d in ph2-dev lung-dev; do
    timeout 300 "${EVAL_BIN:-./s3net}" eval --device cuda --images $d/images --masks $d/masks "$@" \
      --report "$OUT/eval$tag-$d.json" > "$OUT/eval$tag-$d.txt" 2>&1
    echo "eval$tag $d rc=$?: $(grep '^mean' "$OUT/eval$tag-$d.txt")"
  done
}
step_eval() { evaluate ""; }
step_evalbf16() { evaluate -bf16 --precision bfloat16; }

step_tf32() {
  export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
  B=$OUT/bench-tf32.txt; : > "$B"
  for args in "--repeats 5" "--repeats 1 --batch 16,32 --concurrency 2"; do
    echo "### tf32 bench fit $args" >> "$B"
    timeout 120 ./s3net bench fit --device cuda $args >> "$B" 2>&1; echo "rc=$?" >> "$B"
  done
  grep -E "###|seconds_per_fit_median|\"batch\"|images_per_second|seconds_per_step|rc=" "$B"
  evaluate -tf32
  unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE
}

step_bf16() {
  B=$OUT/bench-bf16.txt; : > "$B"
  for args in "--repeats 5" "--repeats 1 --batch 16,32 --concurrency 2"; do
    echo "### bf16 bench fit $args" >> "$B"
    timeout 120 ./s3net bench fit --device cuda --precision bfloat16 $args >> "$B" 2>&1; echo "rc=$?" >> "$B"
  done
  for op in depthwise deform; do
    echo "### bf16 bench $op" >> "$B"
    timeout 120 ./s3net bench $op --size 256 --channels 32 --device cuda --precision bfloat16 --json >> "$B" 2>&1
    echo "rc=$?" >> "$B"
  done
  grep -E "###|seconds_per_fit_median|\"batch\"|images_per_second|seconds_per_step|forward|split_k|rc=" "$B"
  JOB_ARGS="--precision bfloat16" serve_jobs -bf16
  evaluate -bf16 --precision bfloat16
}

step_grid() {
  # Batched fits on smaller grids (GRID_SIZES, default "128 192"; GRID_BIN, default ./s3net),
  # float32 and bfloat16: what a deployment that accepts the accuracy of a coarser grid gains.
  B=$OUT/bench-grid.txt; : > "$B"
  local size p
  for size in ${GRID_SIZES:-128 192}; do
    for p in float32 bfloat16; do
      echo "### grid $size $p" >> "$B"
      timeout 120 "${GRID_BIN:-./s3net}" bench fit --device cuda --repeats 1 --batch 16,32,64 \
        --batch-only --size "$size" --precision $p >> "$B" 2>&1; echo "rc=$?" >> "$B"
    done
  done
  grep -E "###|\"batch\"|images_per_second|seconds_per_step|rc=" "$B"
}

step_splitk() {
  # The default layout of the split weight-gradient reductions (auto: copied for float32,
  # strided for bfloat16) against the other one, in both number formats, batched fits only.
  B=$OUT/bench-splitk.txt; : > "$B"
  for p in float32 bfloat16; do
    other=strided; [ $p = bfloat16 ] && other=copied
    for sk in auto $other; do
      echo "### splitk $p $sk" >> "$B"
      timeout 120 ./s3net bench fit --device cuda --repeats 2 --batch 16,32 --precision $p \
        --split-k $sk >> "$B" 2>&1; echo "rc=$?" >> "$B"
    done
  done
  grep -E "###|\"batch\"|images_per_second|rc=" "$B"
}

# The binaries to compare, into `bins`: the executable ones of the space-separated paths in $1
# (each missing one named on stderr, for step $2), then this build's ./s3net.
compared() {
  bins=()
  local b
  for b in $1; do
    if [ -x "$b" ]; then bins+=("$b"); else echo "step $2: no $b to compare with" >&2; fi
  done
  bins+=(./s3net)
}

step_ab() {
  # This build against earlier ones on the same card: AB_BASE (default ./s3net-base, carried
  # beside the bundle; several paths separated by spaces) and ./s3net run the batched fits
  # alternately, AB_ROUNDS times, in float32 and bfloat16 (AB_PRECISIONS), 16 and 32 networks
  # a batch (AB_BATCH; AB_ARGS: other `s3net bench fit` flags).
  local bins
  compared "${AB_BASE:-./s3net-base}" ab
  [ ${#bins[@]} -gt 1 ] || return
  B=$OUT/bench-ab.txt; : > "$B"
  for round in $(seq "${AB_ROUNDS:-2}"); do
    for p in ${AB_PRECISIONS:-float32 bfloat16}; do
      for bin in "${bins[@]}"; do
        echo "### ab round $round $p $bin" >> "$B"
        timeout 120 "$bin" bench fit --device cuda --repeats 1 --batch "${AB_BATCH:-16,32}" --batch-only \
          --precision $p ${AB_ARGS:-} >> "$B" 2>&1; echo "rc=$?" >> "$B"
      done
    done
  done
  grep -E "###|\"batch\"|images_per_second|seconds_per_step|rc=" "$B"
  python3 ab-summary.py "$B" | tee "$OUT/bench-ab-summary.txt"
}

step_evalab() {
  # Accuracy of this build against earlier ones (EVAL_BASE, else AB_BASE) on the dev data, seeds
  # EVAL_SEEDS (default 0 1 2), with EVAL_ARGS (e.g. "--precision bfloat16"): a change that
  # only reorders sums or rounds differently should move nothing beyond the seeds' spread.
  local bins b seed
  compared "${EVAL_BASE:-${AB_BASE:-./s3net-base}}" evalab
  for seed in ${EVAL_SEEDS:-0 1 2}; do
    for b in "${bins[@]}"; do
      EVAL_BIN=$b evaluate "ab-$(basename "$b")-seed$seed" --seed "$seed" ${EVAL_ARGS:-}
    done
  done
}

step_trace() {
  # An operator-level trace (libtorch's Kineto profiler) of three steps of a 16-network batch:
  # every kernel charged to the op that launched it and the autograd node it ran in, which the
  # ncu profile cannot tell (TRACE_ARGS: more `s3net bench fit` flags, e.g. "--precision
  # bfloat16"). trace-summary.txt adds it up; trace.json.gz opens in Perfetto.
  timeout 240 ./s3net bench fit --device cuda --repeats 1 --batch 16 --batch-only \
    --trace "$OUT/trace.json" ${TRACE_ARGS:-} > "$OUT/trace-bench.txt" 2>&1
  echo "trace rc=$?"
  python3 trace-summary.py "$OUT/trace.json" > "$OUT/trace-summary.txt" 2>&1
  gzip -f "$OUT/trace.json"
  head -45 "$OUT/trace-summary.txt"
}

step_profile() {
  # Kernels of a 16-network batch's steps: the bench runs the batch only (--batch-only: a
  # fixed skip count once landed in the lone fits' launches instead), skips its first ~20
  # steps (about 400 launches a step), then times 1200 launches.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)
  timeout 240 "$NCU" --metrics gpu__time_duration.sum --csv --clock-control none --cache-control none \
    --launch-skip "${PROFILE_SKIP:-8000}" --launch-count 1200 \
    ./s3net bench fit --device cuda --repeats 1 --batch 16 --batch-only ${PROFILE_ARGS:-} > "$OUT/ncu-batch16.csv" 2> "$OUT/ncu.err"
  python3 - "$OUT/ncu-batch16.csv" > "$OUT/ncu-batch16.txt" << 'PY'
import csv, collections, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next(i for i, r in enumerate(rows) if 'Kernel Name' in r)
h = rows[hdr]
ki, vi, ui = h.index('Kernel Name'), h.index('Metric Value'), h.index('Metric Unit')
scale = {'ns': 1e-3, 'nsecond': 1e-3, 'us': 1.0, 'usecond': 1.0, 'ms': 1e3, 'msecond': 1e3}
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[hdr + 1:]:
    if len(r) > vi:
        name = r[ki][:100]
        tot[name] += float(r[vi].replace(',', '')) * scale[r[ui]]
        cnt[name] += 1
s = sum(tot.values())
print(f'# {sum(cnt.values())} launches, {s / 1e3:.1f} ms of GPU time')
for n, v in tot.most_common(40):
    print(f'{v / s * 100:5.1f}% {v:9.0f} us  n={cnt[n]:4d}  {n}')
PY
  head -20 "$OUT/ncu-batch16.txt"
}

step_kernels() {
  # What bounds each of our own kernels: ncu's Speed Of Light, occupancy, launch, compute,
  # memory and warp-state sections plus the warps' stall reasons, for KERNELS_COUNT (default
  # 60, about a step's worth) launches of the kernels named in KERNELS_REGEX, after skipping
  # KERNELS_SKIP (default 900, about 20 steps) of them, in a 16-network batch (PROFILE_ARGS:
  # more `s3net bench fit` flags, e.g. "--precision bfloat16"). The timing profile above says
  # where the time goes; this says why, per kernel. kernels.txt is ncu-summary.py's table
  # (one line per kernel), kernels.csv.gz the whole report. Each launch is replayed once per
  # group of counters: a few seconds per kernel.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)
  local regex=${KERNELS_REGEX:-correlate_|weight_grad_|im2col|col2im|plane_|bias_|gate_grad|losses_|stats_|chunk_products}
  local sections=(--section SpeedOfLight --section Occupancy --section LaunchStats
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats)
  local stalls=(--metrics 'regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$')
  profile_kernels() {
    timeout "${KERNELS_SECS:-240}" "$NCU" --csv --page details --clock-control none \
      --kernel-name "regex:$regex" --launch-skip "${KERNELS_SKIP:-900}" \
      --launch-count "${KERNELS_COUNT:-60}" "${sections[@]}" "$@" \
      ./s3net bench fit --device cuda --repeats 1 --batch 16 --batch-only ${PROFILE_ARGS:-} \
      > "$OUT/kernels.csv" 2> "$OUT/kernels.err"
  }
  profile_kernels "${stalls[@]}"
  echo "kernels rc=$?"
  if ! grep -q '"Metric Name"' "$OUT/kernels.csv"; then
    # This ncu refused the stall metrics' pattern: the sections alone.
    echo "no table with the stall metrics ($(tail -1 "$OUT/kernels.err")); again without them"
    mv "$OUT/kernels.err" "$OUT/kernels-stalls.err"
    profile_kernels
    echo "kernels rc=$?"
  fi
  python3 ncu-summary.py "$OUT/kernels.csv" > "$OUT/kernels.txt" 2>&1
  gzip -f "$OUT/kernels.csv"
  cut -c1-220 "$OUT/kernels.txt" | head -25
}

for step in $STEPS; do
  if declare -F "step_$step" > /dev/null; then
    echo "=== $step ($(date +%T))"
    "step_$step"
  else
    echo "unknown step '$step' (steps: tests bf16 server serve bench eval evalbf16 tf32 splitk grid ab evalab trace profile)" >&2
  fi
done
