# s3net — two commands do everything on a fresh machine: `make run` and `make test`.
# Every target runs the idempotent libtorch set-up first (PyTorch 2.11.0 from PyPI into
# $(S3NET_CACHE), default ~/.cache/s3net; a few minutes once per machine, a no-op afterwards).

CARGO ?= cargo
BIN := target/release/s3net
SHARED ?= ../shared/data
# The Python test venv (scripts/setup-python.sh): the client and the pinned test requirements.
PY ?= $(or $(S3NET_CACHE),$(HOME)/.cache/s3net)/py

.PHONY: setup setup-python build run test bench eval golden gpu-bundle fuzz sass clean-cache

setup:
	@bash scripts/setup-torch.sh >/dev/null

setup-python:
	@bash scripts/setup-python.sh >/dev/null

build: setup
	$(CARGO) build --release --locked -p s3net-cli

## Start the server on the embedded default (127.0.0.1:50051, in-process queue, CPU or GPU by detection).
run: build
	$(BIN) serve

## All tests (release profile: libtorch code is far too slow unoptimised), then the Python
## client's and the deployment's pytest suites against the release binary (folders that exist).
test: setup setup-python
	$(CARGO) test --release --locked --workspace
	$(CARGO) build --release --locked -p s3net-cli
	PYTHONDONTWRITEBYTECODE=1 $(PY)/bin/python -m pytest -q -p no:cacheprovider $(wildcard clients/python/tests deploy/tests scripts/tests)

## What a GPU check carries to a machine with a GPU but no Rust → .gpu/ and .gpu.tar.xz (README, "GPU checks").
gpu-bundle: setup
	SHARED=$(SHARED) bash scripts/gpu-bundle.sh

## Benchmarks → BENCHMARKS.md (machine and date included).
bench: build
	bash scripts/bench.sh

## Accuracy on the shared dev data (PH2 and lung), default preset, reports under eval-out/.
eval: build
	mkdir -p eval-out
	$(BIN) eval --images $(SHARED)/ph2-dev/images --masks $(SHARED)/ph2-dev/masks --report eval-out/ph2.json
	$(BIN) eval --images $(SHARED)/lung-dev/images --masks $(SHARED)/lung-dev/masks --report eval-out/lung.json

## Coverage-guided fuzzing of the decoders (nightly + cargo-fuzz, installed once): FUZZ_SECONDS (600), FUZZ_JOBS (1).
fuzz: setup
	bash scripts/fuzz.sh

## What the CUDA kernels compile to (registers, spills, instruction mix), no GPU needed.
sass: setup
	bash scripts/sass.sh

## Regenerate the deformable-conv golden values with torchvision (needs network for pip).
golden: setup
	$$HOME/.cache/s3net/torch-2.11.0/bin/python -m pip install -q torchvision==0.26.0 numpy
	$$HOME/.cache/s3net/torch-2.11.0/bin/python tools/make_deform_golden.py
