#!/usr/bin/env bash
# One device call of the GPU check in parts: unpacks the carried bundle archives (.gpu.tar.xz,
# then any .gpu-*.tar.xz beside it, e.g. earlier binaries to compare with), then runs
# .gpu/gpu-check.sh once per part, each under a time limit of its own, and after each part
# packs every part's results so far into $OUT/all.tgz. Why: a call cut short by its limit then
# still brings back the parts that ended, and the device tool brings back only eight files
# (here: driver.log, all.tgz and one log per part, so at most six parts).
#
#   bash scripts/gpu-parts.sh 'tests 60 STEPS=tests' \
#     'ab 150 AB_ROUNDS=2 AB_BASE=./s3net-base STEPS=ab' 'grid 45 STEPS=grid'
#
# A part: its name, its seconds, then the environment of gpu-check.sh (shell words, so
# AB_BASE="./a ./b" works inside the quotes). Run from the repository root of the device's copy.
set -u
R=${OUT:-$PWD/gpu-parts-out}
mkdir -p "$R"
parts=$(mktemp -d)
T0=$(date +%s)
tar xf .gpu.tar.xz || exit 1
for extra in .gpu-*.tar.xz; do
  [ -e "$extra" ] && tar xf "$extra"
done
cd .gpu || exit 1
log() { echo "$* at $(($(date +%s) - T0)) s" >> "$R/driver.log"; }
for spec in "$@"; do
  eval "set -- $spec"
  name=$1 secs=$2
  shift 2
  log "part $name: $*"
  env OUT="$parts/$name" "$@" timeout -k 5 "$secs" bash ./gpu-check.sh > "$R/$name.log" 2>&1
  log "part $name rc=$?"
  # What the limit cut short: the check's own `timeout` runs in process groups of their own.
  pkill -f '^\./s3net' ; pkill -f -- '-test --test-threads'
  tar czf "$R/all.tgz" -C "$parts" .
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$R/driver.log" 2>&1
log "done"
