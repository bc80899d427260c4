"""The CUDA device runtime: the primary context, one stream and every buffer, owned by the GPU thread.

Why the primary context: the CUDA runtime API, which ONNX Runtime and TensorRT use, always works in the
device's *primary* context (since CUDA 12, ``cudaSetDevice`` makes it current). ``pycuda.autoinit`` and
``Device.make_context`` create a second, separate context; a stream or buffer made there and handed to
ONNX Runtime or TensorRT is foreign to the context they run in ("invalid resource handle", illegal
address). So ``start`` retains the primary context and pushes it once on the calling thread, and the
stream, allocations and pinned buffers are all made in it. docs/cuda-contexts.md tells the whole story.

Every method must run on the thread that called ``start`` (the GPU thread); they check it.
``stop`` undoes ``start`` in reverse: synchronise the stream, free device and pinned buffers, destroy
the stream, pop the context, release (detach) it. Nothing is left on pycuda's context stack, so the
interpreter's exit never prints "context stack was not empty".

pycuda errors carry only a message ("cuMemAlloc failed: out of memory"); ``cuda_error_name`` turns that
(and ONNX Runtime's "CUDA failure 2: out of memory") into the CUDA error name, and ``cuda_errors``
re-raises it as ``DeviceError(message, cuda_error=NAME)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker import log
from worker.engines.base import HOST_SETS
from worker.errors import DeviceError

_log = log.get(__name__)

# cuGetErrorString texts of the errors a worker meets in practice, for when libcuda cannot be asked.
_DRIVER_TEXTS = {
    "out of memory": "CUDA_ERROR_OUT_OF_MEMORY",
    "an illegal memory access was encountered": "CUDA_ERROR_ILLEGAL_ADDRESS",
    "unspecified launch failure": "CUDA_ERROR_LAUNCH_FAILED",
    "invalid resource handle": "CUDA_ERROR_INVALID_HANDLE",
    "invalid device context": "CUDA_ERROR_INVALID_CONTEXT",
    "context is destroyed": "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    "invalid argument": "CUDA_ERROR_INVALID_VALUE",
    "misaligned address": "CUDA_ERROR_MISALIGNED_ADDRESS",
    "device-side assert triggered": "CUDA_ERROR_ASSERT",
    "an illegal instruction was encountered": "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "the launch timed out and was terminated": "CUDA_ERROR_LAUNCH_TIMEOUT",
    "too many resources requested for launch": "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    "no CUDA-capable device is detected": "CUDA_ERROR_NO_DEVICE",
    "invalid device ordinal": "CUDA_ERROR_INVALID_DEVICE",
    "initialization error": "CUDA_ERROR_NOT_INITIALIZED",
    "unknown error": "CUDA_ERROR_UNKNOWN",
}
_AMBIGUOUS_TEXTS = frozenset({"invalid argument", "unknown error", "initialization error"})
# CUDA runtime error codes, as ONNX Runtime prints them ("CUDA failure 2: out of memory").
_RUNTIME_CODES = {
    1: "cudaErrorInvalidValue",
    2: "cudaErrorMemoryAllocation",
    3: "cudaErrorInitializationError",
    100: "cudaErrorNoDevice",
    101: "cudaErrorInvalidDevice",
    201: "cudaErrorDeviceUninitialized",
    400: "cudaErrorInvalidResourceHandle",
    700: "cudaErrorIllegalAddress",
    701: "cudaErrorLaunchOutOfResources",
    702: "cudaErrorLaunchTimeout",
    709: "cudaErrorContextIsDestroyed",
    710: "cudaErrorAssert",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    719: "cudaErrorLaunchFailure",
    999: "cudaErrorUnknown",
}
_NAME_IN_TEXT = re.compile(r"\b(CUDA_ERROR_[A-Z_]+|cudaError[A-Za-z]+|CUBLAS_STATUS_[A-Z_]+|CUDNN_STATUS_[A-Z_]+)\b")
_ORT_FAILURE = re.compile(r"CUDA failure (\d+)")
_OOM_ADVICE = "lower max_batch_size, or run fewer models or workers on this GPU"
_driver_texts: dict[str, str] | None = None


def _driver_error_texts() -> dict[str, str]:
    """cuGetErrorString text -> cuGetErrorName for every code the installed driver knows."""
    global _driver_texts
    if _driver_texts is None:
        table = dict(_DRIVER_TEXTS)
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL("libcuda.so.1")
            text, name = ctypes.c_char_p(), ctypes.c_char_p()
            for code in range(1, 1000):
                if (lib.cuGetErrorString(code, ctypes.byref(text)) == 0 and text.value
                        and lib.cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value):
                    table[text.value.decode()] = name.value.decode()
        _driver_texts = table
    return _driver_texts


def cuda_error_name(text: str) -> str:
    """The CUDA error name in a pycuda / ONNX Runtime / TensorRT message, or "" if it shows none."""
    found = _NAME_IN_TEXT.search(text)
    if found:
        return found.group(1)
    code = _ORT_FAILURE.search(text)
    if code and int(code.group(1)) in _RUNTIME_CODES:
        return _RUNTIME_CODES[int(code.group(1))]
    if "Failed to allocate memory" in text:  # ONNX Runtime's arena when cudaMalloc fails
        return "cudaErrorMemoryAllocation"
    # pycuda: "<routine> failed: <cuGetErrorString text>"
    tail = text.split(" failed: ", 1)[1].strip() if " failed: " in text else text
    texts = _driver_error_texts()
    if tail in texts:
        return texts[tail]
    # Anywhere in a longer message, only phrases no model error would use: "invalid argument" or
    # "unknown error" inside an ONNX Runtime shape error must not turn a poison input into a device
    # failure (which stops the worker and, after the restart, meets the same input again).
    return next((name for message, name in _DRIVER_TEXTS.items()
                 if message not in _AMBIGUOUS_TEXTS and message in text), "")


def is_out_of_memory(name: str) -> bool:
    return name in ("CUDA_ERROR_OUT_OF_MEMORY", "cudaErrorMemoryAllocation")


def device_error(exc: BaseException, what: str, device: str = "") -> DeviceError:
    """``exc`` (from pycuda, ONNX Runtime or TensorRT) as a DeviceError naming the CUDA error."""
    name = cuda_error_name(str(exc))
    where = f" on {device}" if device else ""
    advice = f"; {_OOM_ADVICE}" if is_out_of_memory(name) else ""
    return DeviceError(f"CUDA error {name or '(unnamed)'} while {what}{where}: {exc}{advice}", cuda_error=name)


@contextlib.contextmanager
def cuda_errors(what: str, device: str = "") -> Iterator[None]:
    """Turn pycuda's errors inside the block into DeviceError with the CUDA error name."""
    try:
        yield
    except DeviceError:
        raise
    except Exception as exc:
        try:
            import pycuda.driver as cuda
        except ImportError:  # only pycuda raises inside these blocks
            raise exc from None
        if isinstance(exc, cuda.Error):
            raise device_error(exc, what, device) from exc
        raise


@dataclass
class DeviceBuffer:
    """Device memory owned by the runtime: ``ptr`` for bindings, freed by ``CudaRuntime.free``."""

    ptr: int
    nbytes: int
    label: str
    allocation: Any = None


class CudaRuntime:
    """One GPU for one thread: primary context pushed once, one non-default stream, tracked buffers."""

    kind = "cuda"

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self.device_name = f"cuda:{device_index}"
        self.gpu_name = ""
        self.compute_capability: tuple[int, int] = (0, 0)
        self.stream_handle = 0
        self.stream: Any = None
        # A second stream of the same context for JPEG decoding (nvJPEG's hardware engine): the next
        # batch decodes there while this batch's kernels run on ``stream``; an event orders the resize
        # of each batch after its decode (``decode_done``). Same thread, same context: still one owner.
        self.decode_stream_handle = 0
        self.decode_stream: Any = None
        self._cuda: Any = None
        self._context: Any = None
        self._thread: int | None = None
        self._device_buffers: dict[int, DeviceBuffer] = {}
        self._host_buffers: list[np.ndarray] = []
        self._staging: dict[tuple, np.ndarray] = {}
        self._staging_turns: dict[tuple, Iterator[int]] = {}
        self._memory_in_use = 0

    # --- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        import pycuda.driver as cuda

        if self._thread is not None:
            raise RuntimeError("CudaRuntime.start called twice")
        self._cuda = cuda
        with cuda_errors("taking the primary context", self.device_name):
            cuda.init()
            device = cuda.Device(self.device_index)
            self._context = device.retain_primary_context()
            self._context.push()
            self._thread = threading.get_ident()
            try:
                self.stream = cuda.Stream()
                self.decode_stream = cuda.Stream()
            except Exception:
                self.stream = self.decode_stream = None
                self._release_context()
                raise
        self.stream_handle = int(self.stream.handle)
        self.decode_stream_handle = int(self.decode_stream.handle)
        self.compute_capability = tuple(device.compute_capability())  # type: ignore[assignment]
        self.gpu_name = device.name()
        self.device_name = f"{self.gpu_name} (cuda:{self.device_index}, sm_{''.join(map(str, self.compute_capability))})"
        free, total = cuda.mem_get_info()
        self._memory_in_use = total - free
        _log.info("cuda_runtime_started", device=self.device_name, stream=hex(self.stream_handle),
                  free_mib=free >> 20, total_mib=total >> 20)

    def stop(self) -> None:
        """Reverse of ``start``; idempotent. Errors are logged, and the context is released regardless."""
        if self._thread is None:
            return
        self._check_thread()
        try:
            with cuda_errors("synchronising the stream at stop", self.device_name):
                self.decode_stream.synchronize()
                self.stream.synchronize()
        except DeviceError as exc:
            _log.error("cuda_stop_sync_failed", error=str(exc), cuda_error=exc.cuda_error)
        for buf in list(self._device_buffers.values()):
            try:
                self.free(buf)
            except DeviceError as exc:  # after a sticky CUDA error every call fails; release the rest anyway
                _log.error("cuda_free_failed", buffer=buf.label, error=str(exc), cuda_error=exc.cuda_error)
        for arr in self._host_buffers:
            with contextlib.suppress(Exception):
                arr.base.free()
        self._host_buffers.clear()
        self._staging.clear()
        self.stream = self.decode_stream = None  # cuStreamDestroy runs now, while the context is current
        self.stream_handle = self.decode_stream_handle = 0
        self._release_context()
        _log.info("cuda_runtime_stopped", device=self.device_name)

    @contextlib.contextmanager
    def helper_context(self) -> Iterator[None]:
        """Make this runtime's primary context current on the calling helper thread (the GPU process's
        decode thread: worker.gpu.decode_ahead) for as long as the block runs, then pop it.

        Why a helper may: the rule that one thread does the GPU work exists to keep every CUDA call in
        the one primary context (a second context is what breaks ONNX Runtime and TensorRT beside each
        other). nvImageCodec already calls CUDA from threads of its own, in that same primary context;
        a helper that only calls nvImageCodec, with this context current, adds no new context, stream
        or buffer. The helper calls no method of this runtime: those stay on the GPU thread."""
        if self._context is None:
            raise RuntimeError("CudaRuntime.helper_context before start() or after stop()")
        if threading.get_ident() == self._thread:
            raise RuntimeError("CudaRuntime.helper_context is for a helper thread, not the GPU thread")
        with cuda_errors("making the primary context current on the decode thread", self.device_name):
            self._context.push()
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # after a sticky CUDA error the pop still leaves the stack
                self._cuda.Context.pop()

    def _release_context(self) -> None:
        with contextlib.suppress(Exception):
            self._cuda.Context.pop()
        with contextlib.suppress(Exception):
            self._context.detach()
        self._context = None
        self._thread = None

    # --- stream and memory -----------------------------------------------------------------
    def synchronize(self) -> None:
        self._check_thread()
        with cuda_errors("running the batch (stream synchronize)", self.device_name):
            self.stream.synchronize()

    def batch_done(self) -> Any:
        """An event recorded on the main stream now, after a batch's last output copy: waiting for it
        waits for that batch only, not for the next one queued behind it (``wait_batch``)."""
        return self._record(self.stream, "recording the batch event")

    def wait_batch(self, done: Any) -> None:
        self._check_thread()
        with cuda_errors("running the batch (event synchronize)", self.device_name):
            done.synchronize()

    def decode_done(self) -> Any:
        """An event recorded on the decode stream now: what was queued there so far (a batch's JPEG
        decode) must finish before the work ``wait_for`` orders after it."""
        return self._record(self.decode_stream, "recording the decode event")

    def _record(self, stream: Any, what: str) -> Any:
        self._check_thread()
        with cuda_errors(what, self.device_name):
            event = self._cuda.Event(self._cuda.event_flags.DISABLE_TIMING)
            event.record(stream)
        return event

    def wait_for(self, event: Any) -> None:
        """Work queued on the main stream from now on waits for ``event`` (no host wait)."""
        self._check_thread()
        with cuda_errors("ordering the batch after its decode", self.device_name):
            self.stream.wait_for_event(event)

    def device_buffer(self, nbytes: int, label: str = "") -> DeviceBuffer:
        """Allocate ``nbytes`` of device memory, tracked so that ``stop`` frees what engines forgot."""
        self._check_thread()
        nbytes = max(int(nbytes), 1)
        try:
            allocation = self._cuda.mem_alloc(nbytes)
        except self._cuda.Error as exc:
            free, total = self._cuda.mem_get_info()
            raise device_error(exc, f"allocating {nbytes / 2**20:.1f} MiB for {label or 'a buffer'} "
                                    f"({free / 2**20:.0f} MiB of {total / 2**20:.0f} MiB free)",
                               self.device_name) from exc
        buf = DeviceBuffer(int(allocation), nbytes, label, allocation)
        self._device_buffers[buf.ptr] = buf
        return buf

    def free(self, buf: DeviceBuffer) -> None:
        self._check_thread()
        if self._device_buffers.pop(buf.ptr, None) is not None and buf.allocation is not None:
            with cuda_errors(f"freeing {buf.label}", self.device_name):
                buf.allocation.free()
            buf.allocation = None

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A page-locked host array, so that copies from and to it run asynchronously on the stream."""
        self._check_thread()
        with cuda_errors(f"allocating pinned host memory {tuple(shape)} {np.dtype(dtype)}", self.device_name):
            arr = self._cuda.pagelocked_empty(tuple(shape), dtype)
        self._host_buffers.append(arr)
        return arr

    def is_pinned(self, arr: np.ndarray) -> bool:
        """True when ``arr`` is a contiguous view inside one of our page-locked buffers."""
        if not arr.flags.c_contiguous:
            return False
        start = arr.__array_interface__["data"][0]
        for buf in self._host_buffers:
            base = buf.__array_interface__["data"][0]
            if base <= start and start + arr.nbytes <= base + buf.nbytes:
                return True
        return False

    def to_device(self, dst: int, src: np.ndarray, what: str = "input") -> None:
        """Queue a host-to-device copy on our stream; unpinned ``src`` goes through a pinned staging copy."""
        self._check_thread()
        if not self.is_pinned(src):
            # HOST_SETS staging buffers per kind of copy, used in turn: the previous batch's copy from the
            # other one may still be queued (the GPU thread's batches in flight)
            kind = (what, src.dtype.str)
            turns = self._staging_turns.setdefault(kind, itertools.cycle(range(HOST_SETS)))
            key = (*kind, next(turns))
            stage = self._staging.get(key)
            if stage is None or stage.nbytes < src.nbytes:
                stage = self.host_buffer((src.nbytes,), np.uint8)
                self._staging[key] = stage
            view = stage[: src.nbytes].view(src.dtype).reshape(src.shape)
            np.copyto(view, src)
            src = view
        with cuda_errors(f"copying the {what} to the device", self.device_name):
            self._cuda.memcpy_htod_async(dst, src, self.stream)

    def to_host(self, dst: np.ndarray, src: int, what: str = "output") -> None:
        """Queue a device-to-host copy into ``dst`` (one of our pinned buffers) on our stream."""
        self._check_thread()
        with cuda_errors(f"copying the {what} to the host", self.device_name):
            self._cuda.memcpy_dtoh_async(dst, src, self.stream)

    def memory_in_use(self) -> int:
        """Device memory in use (all processes). Measured on the GPU thread, where the context is
        current; other threads (probes, metrics on the event loop) get the last measurement."""
        if self._thread is None:
            return 0
        if threading.get_ident() == self._thread:
            free, total = self._cuda.mem_get_info()
            self._memory_in_use = int(total - free)
        return self._memory_in_use

    def buffers_in_use(self) -> int:
        return sum(b.nbytes for b in self._device_buffers.values())

    def _check_thread(self) -> None:
        if self._thread is None:
            raise RuntimeError("CudaRuntime used before start() or after stop()")
        if threading.get_ident() != self._thread:
            raise RuntimeError("CudaRuntime used from a thread other than the GPU thread that started it")
