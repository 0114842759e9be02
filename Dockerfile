# syntax=docker/dockerfile:1
#
# s3net gRPC service image (README, "### Deployment").
#
#   docker build -t s3net:0.1.0 .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 s3net:0.1.0
#   docker run --rm --gpus all -p 127.0.0.1:50051:50051 s3net:0.1.0      # NVIDIA Container Toolkit
#
# Two stages:
#   build    Rust toolchain + PyTorch 2.11.0 from PyPI (scripts/setup-torch.sh, the same script
#            `make` runs; it also brings the wheel's nvcc when crates/ops has CUDA kernels) +
#            `cargo build --release --locked -p s3net-cli`.
#   runtime  debian:bookworm-slim + the s3net binary + libtorch's shared libraries (torch/lib)
#            and the CUDA libraries of the nvidia-* wheels they load. No Python, no headers.
#
# Why no CUDA base image: the PyTorch wheels bundle the CUDA user-space libraries (cuBLAS,
# cuDNN, ...). Only the driver (libcuda.so.1) comes from the host; the NVIDIA Container Toolkit
# mounts it when the container is started with a GPU. Without a GPU the service runs on the CPU.
#
# Library paths: every binary gets an rpath (RUNPATH) to the canonical torch/lib folder of the
# build stage, and to nvidia/cu13/lib when present (scripts/rpath.rs); torch's own libraries
# find the CUDA wheels through `$ORIGIN/../../nvidia/...`. The runtime stage therefore keeps
# torch/lib and nvidia/*/lib at the SAME absolute paths as in the build stage
# (S3NET_CACHE=/opt/s3net below): no LD_LIBRARY_PATH is needed, and the build fails if the
# RUNPATH and the copied folders disagree.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build

# python3-venv: scripts/setup-torch.sh installs torch into a venv (Debian's python3 is 3.11).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*

# The torch venv lives at /opt/s3net/torch-2.11.0: this path ends up in the binary's rpath.
ENV S3NET_CACHE=/opt/s3net \
    CARGO_TERM_COLOR=never
WORKDIR /src

# PyTorch first, in its own layer (about 5 GB): source changes do not re-download it.
COPY scripts/setup-torch.sh scripts/setup-torch.sh
RUN bash scripts/setup-torch.sh

COPY . .
# Re-run (a no-op apart from the `.libtorch` link, which .dockerignore keeps out of the context)
# and build. The cargo registry and target folder are BuildKit cache mounts, so the binary is
# copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash scripts/setup-torch.sh \
 && cargo build --release --locked -p s3net-cli \
 && install -D -m 0755 target/release/s3net /out/bin/s3net

# Stage the runtime libraries under /out with their absolute paths kept (cp --parents):
# torch/lib (minus the Python bindings) and the lib folders of the nvidia-* wheels (minus static
# archives). Then check that the binary's RUNPATH points into what was staged. (Paths are given
# relative to / because coreutils 9.1's `cp -a --parents /abs/path` fails outside /.)
RUN set -eu; \
    site="$("$S3NET_CACHE/torch-2.11.0/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    cd /; \
    rel="${site#/}"; \
    cp -a --parents "$rel/torch/lib" /out/; \
    rm -f "/out/$rel/torch/lib/libtorch_python.so" "/out/$rel/torch/lib/libshm.so"; \
    for lib in $(find "$rel/nvidia" -mindepth 2 -maxdepth 2 -type d -name lib); do \
      cp -a --parents "$lib" /out/; \
    done; \
    find /out -name '*.a' -delete; \
    rpath="$(readelf -d /out/bin/s3net | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')"; \
    echo "s3net RUNPATH: $rpath"; \
    case ":$rpath:" in *":$site/torch/lib:"*) ;; *) echo "RUNPATH lacks $site/torch/lib" >&2; exit 1;; esac; \
    for dir in $(echo "$rpath" | tr ':' ' '); do \
      test -d "/out$dir" || { echo "RUNPATH entry $dir is not staged" >&2; exit 1; }; \
    done; \
    test -f "/out$site/torch/lib/libtorch_cpu.so"

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates: TLS to an OTLP collector over https. libstdc++6, libgcc-s1 and zlib1g (the
# other system libraries libtorch needs) are already part of the slim image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 s3net \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/s3net --create-home \
      --shell /usr/sbin/nologin s3net

# Same absolute paths as in the build stage (see the top of this file).
COPY --from=build /out/opt/ /opt/
COPY --from=build /out/bin/s3net /usr/local/bin/s3net

# Fails the build here, not at run time, if a library cannot be found.
RUN s3net --version

# Configuration: S3NET__SECTION__KEY variables (compose and Kubernetes add a TOML file with
# `serve --config FILE`; the variables override the file).
# The image listens on all interfaces inside its network namespace; publish the ports on the
# host deliberately (README: TLS and a token before exposing it).
ENV S3NET__SERVER__ADDR=0.0.0.0:50051 \
    S3NET__METRICS__LISTEN=0.0.0.0:9464 \
    S3NET__LOG__FORMAT=json \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/s3net

# 50051 gRPC (s3net.v1.Segmenter, grpc.health.v1, reflection), 9464 Prometheus /metrics.
EXPOSE 50051 9464

# Numeric user, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/s3net

# grpc.health.v1 Check through the binary's own client (no grpc_health_probe needed): exits
# non-zero unless SERVING, so the container turns unhealthy while it drains on SIGTERM.
# With TLS enabled, override it (e.g. add --ca and use https://) in compose or `docker run`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["s3net", "client", "health", "--addr", "http://127.0.0.1:50051"]

# SIGTERM (Docker's default stop signal) drains: health NOT_SERVING, new work UNAVAILABLE,
# running jobs get server.shutdown_grace_s (30 s). Give `docker stop -t 40` or more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["s3net"]
CMD ["serve"]
