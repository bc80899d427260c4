"""What travels to and from the GPU thread: a request (one image), its result, the device decoder's
interface, and resolving futures on the event loop that waits for them (asyncio futures are not
thread-safe: every resolution goes through ``loop.call_soon_threadsafe``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker.engines.base import DeviceRuntime, InferenceEngine, Outputs
from worker.errors import DeviceError, PoisonMessage


@dataclass
class InferenceRequest:
    """One image on its way through the GPU thread: ``inputs`` holds one uint8 HWC array per model
    (decoded on the CPU), or ``encoded`` the checked bytes the GPU thread decodes (decoder=nvimgcodec)."""

    inputs: Sequence[np.ndarray] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    context: dict[str, Any] = field(default_factory=dict)  # topic/partition/offset, for logs
    enqueued_at: float = 0.0
    encoded: Any = None  # worker.decode.message.Encoded


class DeviceDecoder(Protocol):
    """Decodes images on the GPU thread into the engines' device input rows (worker.decode.nvimgcodec).
    Items are Encoded images, or the per-model rows the pool already decoded (not JPEG)."""

    def warm_up(self, batches: int = 1) -> None:
        """Before the worker is ready: ``batches`` full batches decoded, all alive at once, so that the
        first real batches allocate nothing."""

    def reserve(self) -> None:
        """On the GPU thread, before ``stage`` runs on the decode thread: the runtime buffers it may need."""

    def stage(self, items: Sequence[Any]) -> Any:
        """Decode, touching no batch row: may run while the stream still executes the previous batch."""

    def write(self, staged: Any) -> tuple[list[int], list[tuple[int, PoisonMessage]]]:
        """Queue the staged images into rows 0..k-1; returns (item indices in row order; rejected)."""

    def release(self, staged: Any) -> None:
        """After the stream synchronised: the staged images' buffers may be reused."""

    def close(self) -> None: ...


DecoderFactory = Callable[[DeviceRuntime, Sequence[InferenceEngine], int], DeviceDecoder]


@dataclass
class InferenceResult:
    outputs: list[Outputs]  # one dict per model, arrays without the batch dimension
    queue_s: float
    inference_s: float
    batch_size: int
    postprocessed: list[dict[str, Any]] | None = None  # per model, JSON-ready (postprocess_batch)


def as_device_error(exc: BaseException) -> DeviceError | None:
    """``exc`` as a DeviceError when it is a CUDA failure (engines mostly raise DeviceError already;
    this catches what slipped through as a plain exception), else None: a model error."""
    if isinstance(exc, DeviceError):
        return exc
    from worker.engines.cuda import cuda_error_name  # no CUDA import: a message parser

    name = cuda_error_name(str(exc))
    return DeviceError(f"device failure ({name}): {exc}", cuda_error=name) if name else None


def resolve(fut: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # cancelled while the GPU worked on it (e.g. shutdown)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def decoder_items(requests: Sequence[InferenceRequest]) -> list[Any]:
    """Encoded images go to the device decoder as bytes; those the pool decoded (not JPEG) as rows."""
    return [req.encoded if req.encoded is not None else req.inputs for req in requests]


def resolve_all(resolved: list[tuple[asyncio.Future, Any]]) -> None:
    for fut, result in resolved:
        resolve(fut, result)
