#!/usr/bin/env bash
# Coverage-guided fuzzing of the decoders (fuzz/, cargo-fuzz + libFuzzer): `make fuzz`.
# Installs what it needs once (a nightly toolchain, cargo-fuzz), seeds fuzz/corpus/decode
# from tests/data and fuzz/seeds, and runs the `decode` target for FUZZ_SECONDS (default 600)
# on FUZZ_JOBS processes (default 1). Findings land in fuzz/artifacts/decode/; replay one with
# `cargo +nightly fuzz run decode -O fuzz/artifacts/decode/<file>`, then make it a test in
# crates/imaging/tests. Not part of `make test`: it needs nightly and its time is open-ended.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-600}
jobs=${FUZZ_JOBS:-1}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

corpus=fuzz/corpus/decode
mkdir -p "$corpus"
# Seeds: every image test file (the DICOM codecs, raster and TIFF layouts) and the small
# raster files of fuzz/seeds; the corpus keeps what earlier runs found.
cp -n tests/data/dicom/*.dcm tests/data/raster/* fuzz/seeds/* "$corpus"/

cd fuzz
# -O: release with debug assertions. Inputs up to 64 KiB (the seeds are at most 40 KB); a
# 10 s timeout and a 3 GiB memory limit make a hang or an allocation bomb a finding.
exec cargo +nightly fuzz run decode -O --jobs "$jobs" -- \
  -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=3072 -print_final_stats=1
