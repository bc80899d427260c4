"""Engines and the device runtime they share, created from the settings.

Nothing here imports CUDA, pycuda or TensorRT at module level: a machine without a GPU imports
``worker.engines`` and gets the CPU runtime.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from worker import log
from worker.engines.base import CpuRuntime, DeviceRuntime, InferenceEngine
from worker.errors import ConfigError
from worker.models.spec import ModelSpec

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["CpuRuntime", "DeviceRuntime", "InferenceEngine", "create_engine", "create_runtime", "cuda_unusable"]

_log = log.get(__name__)


def cuda_unusable(device_index: int = 0) -> str:
    """Why CUDA cannot be used for ``device_index`` here, or "" when it can.

    Only ``cuInit`` and device queries run: no context is created on the calling thread.
    """
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return f"pycuda is not importable ({exc}); install the gpu extra"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises RuntimeError or cuda.Error subclasses here
        return f"the CUDA driver did not initialise: {exc}"
    if count == 0:
        return "the CUDA driver sees no device"
    if not 0 <= device_index < count:
        return f"gpu_device_index={device_index} but the CUDA driver sees {count} device(s) (0..{count - 1})"
    return ""


MAX_CONNECTIONS_VAR = "CUDA_DEVICE_MAX_CONNECTIONS"


def set_cuda_connections(connections: int) -> str | None:
    """Before the CUDA driver starts in this process: how many hardware work queues its contexts get
    (``cuda_max_connections``; the driver's default is 8). Streams beyond that share queues, and work on
    streams that share one runs in submission order. nvImageCodec decodes on 14 streams of its own; with 8
    queues some of them share ours, and its decode waited for the whole inference queued before it (CUPTI
    trace, docs/benchmarks.md run 18). The operator's own variable wins. Returns the value in effect."""
    if connections > 0 and MAX_CONNECTIONS_VAR not in os.environ:
        os.environ[MAX_CONNECTIONS_VAR] = str(connections)
    return os.environ.get(MAX_CONNECTIONS_VAR)


def create_runtime(settings: Settings) -> DeviceRuntime:
    """The device runtime for ``settings.device``: auto (CUDA if usable, else CPU), cuda, or cpu."""
    if settings.device == "cpu":
        return CpuRuntime()
    set_cuda_connections(settings.cuda_max_connections)  # before cuInit below: read when the driver starts
    why = cuda_unusable(settings.gpu_device_index)
    if not why:
        from worker.engines.cuda import CudaRuntime

        return CudaRuntime(settings.gpu_device_index)
    if settings.device == "cuda":
        raise ConfigError(f"device=cuda but CUDA is not usable: {why}")
    _log.warning("cuda_unavailable_using_cpu", reason=why)
    return CpuRuntime()


def create_engine(spec: ModelSpec, settings: Settings) -> InferenceEngine:
    """The engine of ``spec.backend``; nothing is loaded until ``activate``."""
    if spec.backend == "onnxruntime":
        from worker.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, settings)
    if spec.backend == "tensorrt":
        if settings.device == "cpu":
            raise ConfigError(f"model {spec.name}: backend=tensorrt needs device=cuda or auto on a GPU, "
                              "not device=cpu; use backend=onnxruntime for CPU runs")
        from worker.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(spec, settings)
    raise ConfigError(f"model {spec.name}: unknown backend {spec.backend!r}")
