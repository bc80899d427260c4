"""The seams between the GPU thread and what runs the models.

``DeviceRuntime`` is the device the GPU thread owns: on a CUDA machine the primary context, one stream
and the buffers (worker.engines.cuda); on a CPU-only machine a stand-in with the same shape
(``CpuRuntime``), so the GPU thread is the same code in both places.

``InferenceEngine`` is one model on that device, in Polygraphy's activate / infer / deactivate shape.
Inference is split into ``enqueue`` (queue copies and kernels on the runtime's stream, return a
collector) and the collector (read outputs after the runtime synchronised), so that a pipeline of
several models costs one synchronisation per batch.

Every method of both is called on the GPU thread only, except ``helper_context`` (the decode thread's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from worker.models.spec import ModelSpec

Outputs = dict[str, np.ndarray]
Collector = Callable[[], Outputs]
# Host buffers that a queued copy reads or writes come in this many sets, used in turn by successive
# batches: the GPU thread has at most this many batches queued on the stream (gpu_batches_in_flight).
HOST_SETS = 2


class DeviceRuntime(Protocol):
    kind: str  # "cuda" or "cpu"
    device_name: str

    def start(self) -> None:
        """Take the device for this thread (context, stream). Called once, first, on the GPU thread."""

    def stop(self) -> None:
        """Release everything ``start`` took, after every engine was deactivated."""

    def synchronize(self) -> None:
        """Wait for all work queued on the stream."""

    def batch_done(self) -> object:
        """A marker of everything queued on the stream so far (CUDA: an event recorded now)."""

    def wait_batch(self, done: object) -> None:
        """Wait until the work before ``done`` (from ``batch_done``) has run; later work may still run."""

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A reusable host array for batch assembly (page-locked on CUDA, so copies run async)."""

    def memory_in_use(self) -> int:
        """Bytes of device memory in use (0 where unknown)."""

    def helper_context(self) -> AbstractContextManager[None]:
        """On a helper thread of the GPU process (the decode thread, worker.gpu.decode_ahead): the
        runtime's context current there while the block runs. The one method not for the GPU thread."""


class InferenceEngine(Protocol):
    spec: ModelSpec

    def activate(self, runtime: DeviceRuntime, max_batch_size: int) -> None:
        """Load the model and allocate buffers for up to ``max_batch_size`` images."""

    def enqueue(self, batch: np.ndarray) -> Collector:
        """Queue inference of ``batch`` (uint8, N x H x W x C, pre-processed on the CPU).

        Returns a callable that gives the outputs (host arrays, leading dimension N) once the runtime
        has synchronised. Arrays may be views of reused buffers: copy what must outlive the batch. Up to
        ``HOST_SETS`` enqueued batches may be waiting at once, so host outputs come in that many sets.
        """

    def deactivate(self) -> None:
        """Free everything ``activate`` allocated."""


class CpuRuntime:
    """The runtime of a machine without a usable GPU: ONNX Runtime's CPU provider on the GPU thread."""

    kind = "cpu"
    device_name = "cpu"
    stream_handle = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def batch_done(self) -> None:  # engines run in ``enqueue`` here: a batch is done once enqueued
        return None

    def wait_batch(self, done: object) -> None:
        pass

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def memory_in_use(self) -> int:
        return 0

    def helper_context(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()
