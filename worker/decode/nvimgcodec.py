"""GPU image decoding (``decoder=nvimgcodec``): JPEGs decoded by nvJPEG on the GPU thread, resized on the
device straight into every model's input rows. No decoded pixel crosses PCIe or touches the GIL.

Why: CPU decoding bounds a ResNet-50 worker on a 16-core H200 machine (OpenCV 4.9-6.2k images/s on 16
threads against a 7k images/s inference ceiling, see docs/benchmarks.md), and 16 decode threads
compete with the event loop and the GPU thread for the GIL.

Per batch, on the GPU thread, but for step 1 of the next full batch, which runs on the GPU process's decode
thread (worker.gpu.decode_ahead, ``gpu_decode_thread``) with the same primary context current there:

1. ``Decoder.decode`` of NVIDIA's nvImageCodec over every request's bytes, with our decode stream as its
   ``cuda_stream``: it decodes on its own streams (the hardware JPEG engine of A100/H100/H200 or CUDA
   nvJPEG, with its CPU threads doing Huffman decoding; CPU codecs for other formats) and makes our
   stream wait for the results. Images come back RGB, interleaved, in device memory; EXIF orientation
   is applied, as OpenCV does on the CPU path.
2. Per model, one launch of ``resize_rows`` (worker.decode.resize_kernel) on our stream, writing
   batch row j of the model's device input (``engine.device_input``) from image j.
3. The engines run on those rows (``enqueue_resident``), and the GPU thread's one synchronise covers
   decode, resize and inference.

What goes where (so that both decoders give the same verdicts, and the same DLQ reasons):

- complete JPEGs (``worker.decode.message.gpu_decodable``) come as bytes (in the GPU process, views of
  their ring slot: ``_views``) and are decoded here;
- everything else (PNG, BMP, TIFF, WebP, truncated JPEGs) was decoded by OpenCV in the decode pool,
  as with ``decoder=cpu``, and comes as rows: copied into its batch row from the host;
- a JPEG nvImageCodec cannot parse or decode is decoded by OpenCV on this thread (rare), exactly as
  ``decoder=cpu`` would; OpenCV's verdict decides whether it is poison.

At start-up, if nvImageCodec, NVRTC or a CUDA device is missing, the worker logs why and decodes on the
CPU (``cpu-reduced``) instead: see worker.gpu.thread.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker import log
from worker.choices import NvImageCodecBackend
from worker.engines.base import HOST_SETS
from worker.engines.cuda import cuda_error_name, cuda_errors, device_error
from worker.decode.resize_kernel import SOURCE_DTYPE, ResizeKernel, fill_sources
from worker.errors import ConfigError, PoisonMessage, UndecodableImage
from worker.decode.message import Encoded, decode_encoded, size_mismatch
from worker.models.spec import PipelineSpec
from worker.settings import GPU_DECODERS

_log = log.get(__name__)


def import_nvimgcodec() -> Any:
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        raise ConfigError(f"decoder=nvimgcodec needs NVIDIA's nvImageCodec: pip install the gpu-decode extra "
                          f"(nvidia-nvimgcodec-cu13[nvjpeg]) ({exc})") from None
    return nvimgcodec


_BACKEND_KINDS = {NvImageCodecBackend.HARDWARE: "HW_GPU_ONLY", NvImageCodecBackend.CUDA: "GPU_ONLY"}


def decoder_kwargs(nv: Any, backend: str = NvImageCodecBackend.DEFAULT, options: str = "") -> dict[str, Any]:
    """``nvimgcodec.Decoder``'s keyword arguments for a ``nvimgcodec_backend`` setting and an options
    string (pure, given the module). Why it is a setting: on the H200, decode and inference took turns on
    the card (docs/benchmarks.md, "decode and inference on one card"); the hardware JPEG engines use no
    SMs, and nvJPEG's per-batch buffers come from cudaMalloc/cudaFree unless preallocated (a cudaFree
    waits for the whole device), which the options string can ask for."""
    out: dict[str, Any] = {}
    kind = _BACKEND_KINDS.get(NvImageCodecBackend.parse(backend, "nvimgcodec_backend"))
    if kind is not None:  # default: no list, every backend allowed
        out["backends"] = [nv.Backend(getattr(nv.BackendKind, kind))]
    if options:
        out["options"] = options
    return out


def decoded_size_problem(encoded: Encoded, shape: Sequence[int]) -> str:
    """Why a decoded image of ``shape`` (H, W, C) does not match its header, or "" when it does."""
    mismatch = size_mismatch(encoded.info, int(shape[0]), int(shape[1]))
    if mismatch:
        return mismatch
    if len(shape) != 3 or int(shape[2]) != 3:
        return f"{encoded.format}: nvImageCodec gave shape {tuple(shape)}, expected H x W x 3 RGB"
    return ""


@dataclass
class Staged:
    """A batch decoded but not yet written into rows (see ``NvImageCodecDecoder.stage``)."""

    kept: list[int] = field(default_factory=list)  # item indices, in row order
    rejected: list[tuple[int, PoisonMessage]] = field(default_factory=list)
    sources: list[tuple[int, int, int, int]] = field(default_factory=list)  # device images: ptr, pitch, h, w
    host_rows: int = 0  # rows 0..host_rows-1: decoded on the CPU, already in ``pinned``
    pinned: list[np.ndarray] | None = None  # per model, pinned rows (from the decoder's pool) until ``release``
    images: list[Any] = field(default_factory=list)  # nvImageCodec images, alive until ``release``
    fallbacks: int = 0  # JPEGs nvImageCodec could not decode, decoded by OpenCV instead
    host_s: float = 0.0
    # Seconds of ``stage``'s steps (code streams, nvImageCodec's call, the per-image loop, CPU rows), and
    # the calling thread's own CPU over all of them ("cpu"): for the GPU thread's early-batch log, where
    # wall time far above that CPU is time the thread waited (for the GIL, the CPU, or the device).
    steps: dict[str, float] = field(default_factory=dict)
    on_card: bool = False  # nvImageCodec decoded some of it on the decode stream (``write`` orders after it)


def warm_up_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A baseline JPEG (4:2:0, quality 90) of uniform noise, the same every time: its bitstream is near
    the largest a JPEG of that size has, unlike a smooth test pattern's (for the decoder's warm-up)."""
    import cv2

    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ConfigError("OpenCV could not encode the decoder's warm-up JPEG")
    return jpeg.tobytes()


class NvImageCodecDecoder:
    """Decodes batches of ``Encoded`` images into the engines' device input rows (GPU thread only, but
    ``stage``, which the decode thread may run)."""

    # JPEGs reach the GPU process as views of their intake's ring slot (worker.gpu.link), valid until the
    # request is answered, which is after its batch ran. ``warm_up`` sets this when this nvImageCodec makes a
    # code stream over such a buffer and decodes the warm-up batches through it; otherwise (and before
    # the warm-up) each JPEG is copied into a bytes object first, as the link itself did until run 25.
    _views = False

    def __init__(self, runtime: Any, engines: Sequence[Any], max_batch: int, pipeline: PipelineSpec,
                 max_bytes: int, max_pixels: int, backend: str = "default", options: str = "") -> None:
        nvimgcodec = import_nvimgcodec()
        if runtime.kind != "cuda":
            raise ConfigError("decoder=nvimgcodec needs a CUDA device; this runtime is the CPU")
        self.runtime, self.engines, self.max_batch = runtime, list(engines), max_batch
        self.pipeline, self.max_bytes, self.max_pixels = pipeline, max_bytes, max_pixels
        self.fallbacks = 0
        self._nv = nvimgcodec
        self._kernel = ResizeKernel(runtime)
        kwargs = decoder_kwargs(nvimgcodec, backend, options)
        with cuda_errors("creating the nvImageCodec decoder", runtime.device_name):
            try:
                self._decoder = nvimgcodec.Decoder(device_id=runtime.device_index, **kwargs)
            except RuntimeError as exc:
                if cuda_error_name(str(exc)):
                    raise
                # e.g. "Could not create decoder. Code: 7": nvImageCodec 0.9 on an H200 with backend=cuda
                # (GPU_ONLY); the GPU thread then says so and decodes on the CPU
                raise ConfigError(f"nvImageCodec could not create a decoder with nvimgcodec_backend={backend} "
                                  f"options={options!r} on {runtime.device_name}: {exc}") from exc
        self.backend, self.options = str(backend), options
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               sample_format=nvimgcodec.SampleFormat.I_RGB)
        # One descriptor table per model (placement depends on the model's input size): pinned host
        # rows filled per batch and copied on the stream before the launch that reads them. Two sets,
        # used in turn: the previous batch's copy may still be queued when the next batch is written
        # (the GPU thread's batches in flight). The device tables are one: the stream orders them.
        self._tables = itertools.cycle([[runtime.host_buffer((max_batch,), SOURCE_DTYPE) for _ in self.engines]
                                        for _ in range(HOST_SETS)])
        self._device_tables = [runtime.device_buffer(max_batch * SOURCE_DTYPE.itemsize, f"resize table {i}")
                               for i in range(len(self.engines))]
        # Pinned row sets for images decoded on the CPU (the intakes' pools, OpenCV fallbacks): ``stage``
        # copies them in while the device still runs the previous batch, ``write`` sends each model's
        # rows in one copy. A set belongs to one Staged batch until ``release`` (a prefetched batch and
        # the running one each hold one), so a pending copy never reads rows being refilled.
        self._pinned_free: list[list[np.ndarray]] = []
        # Decoded images must outlive the kernels that read them: a Staged batch holds them until the
        # GPU thread has synchronised and calls ``release``; released images go back to nvImageCodec
        # as buffers to reuse instead of allocating (and freeing) per batch.
        self._free: list[Any] = []
        self._pool_batches = 2  # batches of images the pool keeps (warm_up raises it to what can be alive)
        # ``stage`` may run on the GPU process's decode thread (worker.gpu.decode_ahead) while the GPU
        # thread releases an earlier batch: the two pools above change under this lock.
        self._pools = threading.Lock()
        # One ``stage`` at a time (nvImageCodec's decoder is not for concurrent calls): the GPU thread's own
        # (a batch the decode thread failed, items retried one by one) waits for the decode thread's job.
        self._staging = threading.Lock()
        self._last: Staged | None = None

    def warm_up(self, batches: int = 1) -> None:
        """``batches`` full batches through decode and resize before the worker reports ready, all alive at
        once: as many as the GPU thread holds at its busiest (its batches in flight and the prefetched one).
        A batch's decoded images stay allocated until the stream is done with it, so each batch alive at
        once needs its own; allocated here, they go back to the pool, and the first real batches reuse them
        instead of allocating on the hot path (on an H200 one of the first real batches took 100-370 ms
        against ~22 ms, and the run's first results came 0.15-0.3 s late: docs/benchmarks.md, run 22). A
        pinned row set per batch (images decoded on the CPU: decoder=hybrid, OpenCV fallbacks) likewise.

        The JPEG is high-entropy (noise, quality 90): its bitstream is larger than a typical 640x480 photo's,
        so the hardware decoder's bitstream buffers grow here rather than under the first real batch. A
        kernel that cannot run here fails start-up, not the first real batch."""
        data = warm_up_jpeg()
        batches = max(1, batches)
        self._pool_batches = max(self._pool_batches, batches)
        self._views = self._takes_views(data)
        try:
            self._warm_up(data, batches)
        except ConfigError as exc:
            if not self._views:
                raise
            # It made the code streams but could not decode through them: copy as before (and say so)
            _log.warning("nvimgcodec_views_refused", error=str(exc))
            self._views, self.fallbacks = False, 0
            self._warm_up(data, batches)
        self._log_ready()

    def _takes_views(self, data: bytes) -> bool:
        """Whether this nvImageCodec makes a code stream over a memoryview (pybind11 refuses a type an
        overload does not take with TypeError; anything else it raises means the same here)."""
        try:
            self._nv.CodeStream(memoryview(data))
        except Exception as exc:  # noqa: BLE001 - then each JPEG is copied into bytes first
            _log.info("nvimgcodec_views_not_taken", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _warm_up(self, data: bytes, batches: int) -> None:
        from worker.decode.headers import sniff

        item = Encoded(memoryview(data) if self._views else data, sniff(data), None, 0.0)
        staged: list[Staged] = []
        try:
            for _ in range(batches):
                staged.append(self.stage([item] * self.max_batch))
                _, rejected = self.write(staged[-1])
                if rejected or self.fallbacks:
                    raise ConfigError(f"nvImageCodec could not decode a plain baseline JPEG at start-up "
                                      f"(rejected: {[str(e) for _, e in rejected][:1]}, "
                                      f"fallbacks: {self.fallbacks})")
            self.runtime.synchronize()
        except BaseException:
            with contextlib.suppress(BaseException):  # kernels may still read the images: let them finish first
                self.runtime.synchronize()
            raise
        finally:
            for s in staged:
                self.release(s)
        with self._pools:
            missing = batches - len(self._pinned_free)
        pinned = [self._new_pinned() for _ in range(missing)]  # runtime calls outside the lock, as in reserve()
        with self._pools:
            self._pinned_free.extend(pinned)

    def _log_ready(self) -> None:
        _log.info("gpu_decoder_ready", decoder="nvimgcodec", version=getattr(self._nv, "__version__", "?"),
                  backend=self.backend, options=self.options, jpegs_in_place=self._views,
                  max_batch=self.max_batch, models=[e.spec.name for e in self.engines])

    def close(self) -> None:
        self._free = []
        self._last = None
        for buf in self._device_tables:
            self.runtime.free(buf)
        self._device_tables = []
        self._decoder = None

    def decode(self, items: Sequence[Encoded | Sequence[np.ndarray]]
               ) -> tuple[list[int], list[tuple[int, PoisonMessage]]]:
        """``stage`` then ``write``, for callers that synchronise between calls (warm-up, bench, tests):
        the previous call's images are released first, so their buffers are reused."""
        if self._last is not None:
            self.release(self._last)
        self._last = self.stage(items)
        return self.write(self._last)

    def reserve(self) -> None:
        """On the GPU thread, before ``stage`` runs on the decode thread: a pinned row set is free for it
        (allocating one is a runtime call, which only the GPU thread makes)."""
        with self._pools:
            if self._pinned_free:
                return
        pinned = self._new_pinned()
        with self._pools:
            self._pinned_free.append(pinned)

    def _new_pinned(self) -> list[np.ndarray]:
        return [self.runtime.host_buffer((self.max_batch, *e.spec.preprocess.hwc_shape), np.uint8)
                for e in self.engines]

    def stage(self, items: Sequence[Encoded | Sequence[np.ndarray]]) -> Staged:
        """Decode the Encoded ``items`` with nvImageCodec (device images, on the decode stream), OpenCV
        for what it cannot; touches no batch row, so it may run while the stream still executes the
        previous batch. The other items (one pre-processed array per model, decoded by the pool) and
        OpenCV's fallbacks are copied into pinned rows here, ahead of the device ones.

        Calls no runtime method when a pinned row set is free (``reserve``): so it may run on the
        decode thread, with the runtime's context current there (``helper_context``)."""
        with self._staging:
            return self._stage(items)

    def _stage(self, items: Sequence[Encoded | Sequence[np.ndarray]]) -> Staged:
        started, cpu = time.perf_counter(), time.thread_time()
        streams: list[Any] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            if not isinstance(item, Encoded):
                continue
            try:
                data = item.data
                if isinstance(data, memoryview) and not self._views:
                    data = bytes(data)  # this nvImageCodec takes no views (``warm_up``)
                streams.append(self._nv.CodeStream(data))
                positions.append(i)
            except Exception:  # noqa: BLE001 - nvImageCodec cannot parse it; OpenCV decides below
                pass
        images: list[Any] = [None] * len(items)
        staged = Staged()
        t_streams = time.perf_counter()
        if streams:
            for i, image in zip(positions, self._decode_streams(streams)):
                images[i] = image
            staged.on_card = True
        t_decoded = time.perf_counter()
        host: list[tuple[int, Sequence[np.ndarray]]] = []  # (item, per-model arrays) decoded on the CPU
        gpu: list[tuple[int, tuple[int, int, int, int]]] = []  # (item, device image)
        for i, (item, image) in enumerate(zip(items, images)):
            if not isinstance(item, Encoded):
                host.append((i, item))
                continue
            if image is not None:
                staged.images.append(image)
                # One call per image for shape, pitch and pointer: each property of an nvImageCodec image drops
                # and retakes the GIL, and a retake can wait for another thread's switch interval (5 ms)
                cai = image.__cuda_array_interface__
                shape = tuple(cai["shape"])
                problem = decoded_size_problem(item, shape)
                if problem:
                    staged.rejected.append((i, UndecodableImage(problem)))
                    continue
                pitch = (cai.get("strides") or (shape[1] * 3, 3, 1))[0]
                gpu.append((i, (int(cai["data"][0]), int(pitch), int(shape[0]), int(shape[1]))))
                continue
            try:  # nvImageCodec could not: OpenCV, exactly as decoder=cpu would (same verdict, same reason)
                arrays = decode_encoded(item, self.pipeline, self.max_bytes, self.max_pixels)
            except PoisonMessage as exc:
                staged.rejected.append((i, exc))
                continue
            self.fallbacks += 1
            staged.fallbacks += 1
            host.append((i, arrays))
        t_images = time.perf_counter()
        # Rows: the CPU-decoded images first (one copy per model), then the device-decoded ones.
        staged.kept = [i for i, _ in host] + [i for i, _ in gpu]
        staged.sources = [src for _, src in gpu]
        if host:
            with self._pools:
                pinned = self._pinned_free.pop() if self._pinned_free else None
            staged.pinned = pinned if pinned is not None else self._new_pinned()
            try:
                for row, (_, arrays) in enumerate(host):
                    for e, pinned in enumerate(staged.pinned):
                        np.copyto(pinned[row], arrays[e].reshape(pinned[row].shape))
            except BaseException:
                self.release(staged)  # the row set goes back to the pool
                raise
            staged.host_rows = len(host)
        ended = time.perf_counter()
        staged.host_s = ended - started
        staged.steps = {"streams": t_streams - started, "nvimgcodec": t_decoded - t_streams,
                        "images": t_images - t_decoded, "rows": ended - t_images, "cpu": time.thread_time() - cpu}
        return staged

    def write(self, staged: Staged) -> tuple[list[int], list[tuple[int, PoisonMessage]]]:
        """Queue the copy of the CPU-decoded rows (rows 0..h-1, one copy per model) and the resize of the
        device images (the rows after them) into every model's input rows. Returns (the item index of each
        row 0..k-1, CPU-decoded items first, each group in item order; rejected)."""
        h = staged.host_rows
        gpu_rows = list(range(h, h + len(staged.sources)))
        if staged.on_card and getattr(self.runtime, "decode_stream_handle", 0):
            # The resize reads what the decode stream wrote. The event is recorded here, on the GPU
            # thread, not in ``stage`` (the decode thread calls no runtime method): everything of this
            # batch's decode was queued on the decode stream when ``stage`` returned, so the event covers
            # it. The decode thread's next job is submitted only after this ``write``, so the event covers
            # nothing later; only a batch retried item by item on this thread while a job runs may make
            # the resize wait for part of that job too: a wait too long, never too short.
            self.runtime.wait_for(self.runtime.decode_done())
        tables = next(self._tables)
        for e, engine in enumerate(self.engines):
            pre = engine.spec.preprocess
            if staged.sources:
                filled = fill_sources(tables[e], staged.sources, gpu_rows, pre)
                self.runtime.to_device(self._device_tables[e].ptr, filled.view(np.uint8), "resize table")
                self._kernel.launch(self._device_tables[e].ptr, len(staged.sources), engine.device_input, pre)
            if h:
                assert staged.pinned is not None
                self.runtime.to_device(engine.device_input, staged.pinned[e][:h], "host-decoded images")
        _log.debug("gpu_decode_queued", images=len(staged.kept) + len(staged.rejected), on_gpu=len(staged.sources),
                   host_rows=h, rejected=len(staged.rejected),
                   stage_ms=round(staged.host_s * 1000, 3))
        return staged.kept, staged.rejected

    def release(self, staged: Staged) -> None:
        """The stream has run everything that read ``staged``'s images (the caller waited for the batch):
        their device buffers go back to the pool that ``stage`` hands nvImageCodec for reuse. Only then:
        nvJPEG's hardware decode writes its outputs when it is called, not in stream order (reported
        against nvJPEG 12.3-13.2 in pytorch/torchcodec#1634), so a stream-ordered hand-back would not
        keep it from overwriting rows a queued resize still reads."""
        with self._pools:
            self._free.extend(staged.images)
            del self._free[: max(0, len(self._free) - self._pool_batches * self.max_batch)]
            if staged.pinned is not None:
                self._pinned_free.append(staged.pinned)
        staged.images = []
        staged.pinned = None

    def _decode_streams(self, streams: list[Any]) -> list[Any]:
        """nvImageCodec over the batch; None where an image failed. Reuses released images' buffers."""
        reuse = None
        with self._pools:
            if len(self._free) >= len(streams):  # buffers of batches the stream has finished with
                reuse, self._free = self._free[:len(streams)], self._free[len(streams):]
        for attempt in (reuse, None) if reuse is not None else (None,):
            try:
                return list(self._decoder.decode(streams, images=attempt, params=self._params,
                                                 cuda_stream=self._decode_stream()))
            except Exception as exc:  # a CUDA failure is fatal, anything else falls back
                if cuda_error_name(str(exc)):
                    raise device_error(exc, "decoding a batch with nvImageCodec", self.runtime.device_name) from exc
                _log.warning("nvimgcodec_batch_failed", error=str(exc), images=len(streams),
                             reused_buffers=attempt is not None)
        return [None] * len(streams)

    def _decode_stream(self) -> int:
        """The runtime's decode stream where it has one (CUDA), else its only stream."""
        return getattr(self.runtime, "decode_stream_handle", 0) or self.runtime.stream_handle


def decoder_factory(settings: Any, pipeline: PipelineSpec) -> Any:
    """The GpuThread's ``device_decoder`` factory for ``settings.decoder``, or None (CPU decoding)."""
    if settings.decoder not in GPU_DECODERS:
        return None

    def make(runtime: Any, engines: Sequence[Any], max_batch: int) -> NvImageCodecDecoder:
        return NvImageCodecDecoder(runtime, engines, max_batch, pipeline, settings.max_bytes, settings.max_pixels,
                                   settings.nvimgcodec_backend, settings.nvimgcodec_options)

    return make
