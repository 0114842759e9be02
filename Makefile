# s3net — two commands do everything on a fresh machine: `make run` and `make test`.
# Every target runs the idempotent libtorch set-up first (PyTorch 2.11.0 from PyPI into
# $(S3NET_CACHE), default ~/.cache/s3net; a few minutes once per machine, a no-op afterwards).

CARGO ?= cargo
BIN := target/release/s3net
SHARED ?= ../shared/data

.PHONY: setup build run test bench eval golden clean-cache

setup:
	@bash scripts/setup-torch.sh >/dev/null

build: setup
	$(CARGO) build --release --locked -p s3net-cli

## Start the server on the embedded default (127.0.0.1:50051, in-process queue, CPU or GPU by detection).
run: build
	$(BIN) serve

## All tests (release profile: libtorch code is far too slow unoptimised).
test: setup
	$(CARGO) test --release --locked --workspace

## Benchmarks → BENCHMARKS.md (machine and date included).
bench: build
	bash scripts/bench.sh

## Accuracy on the shared dev data (PH2 and lung), default preset, reports under eval-out/.
eval: build
	mkdir -p eval-out
	$(BIN) eval --images $(SHARED)/ph2-dev/images --masks $(SHARED)/ph2-dev/masks --report eval-out/ph2.json
	$(BIN) eval --images $(SHARED)/lung-dev/images --masks $(SHARED)/lung-dev/masks --report eval-out/lung.json

## Regenerate the deformable-conv golden values with torchvision (needs network for pip).
golden: setup
	$$HOME/.cache/s3net/torch-2.11.0/bin/python -m pip install -q torchvision==0.26.0 numpy
	$$HOME/.cache/s3net/torch-2.11.0/bin/python tools/make_deform_golden.py
