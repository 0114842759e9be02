#!/usr/bin/env bash
# F = 16 against the F = 32 CPU reports of docs/eval/2026-11-26-cpu-bf16 (float32, seeds 0-3).
cd /work/main
D=/work/shared/data; [ -d $D ] || D=../shared/data
for seed in 0 1 2 3; do
  for d in lung-dev ph2-dev; do
    ./target/release/s3net eval --images $D/$d/images --masks $D/$d/masks --features 16 --seed $seed \
      --report /tmp/f16/$d-f16-seed$seed.json > /tmp/f16/$d-f16-seed$seed.txt 2>&1
    echo "$d seed $seed: $(grep '^mean' /tmp/f16/$d-f16-seed$seed.txt)"
  done
done
echo ALLDONE
