"""The GPU thread: the thread that owns the device and does its work (the optional decode thread,
worker.gpu.decode_ahead, only makes nvImageCodec's decode call, in the same primary context).

It owns the runtime (on CUDA: the primary context, pushed once, and one stream) and every engine,
micro-batches requests from all partitions, runs each batch through every model of the pipeline with
one synchronisation, and resolves each request's asyncio future on the event loop with
``call_soon_threadsafe`` (asyncio futures are not thread-safe).

Batches in flight (``batches_in_flight``, the setting ``gpu_batches_in_flight``): with 2, when the next
full batch is already waiting, it is written and queued on the stream *before* the thread waits for the
current one, so the device goes from one batch straight to the next instead of idling while this thread
collects results, hands them over and writes the next inputs (on the H200 that idle gap was ~10% of a
batch: docs/benchmarks.md). One stream orders it: the next batch's input copies and kernels run after
the current batch's kernels and output copies, so device buffers are shared; the host buffers a pending
copy reads or writes (pinned input rows, output rows, the decoder's resize tables) come in two sets,
used in turn. A batch waits for its own event, recorded after its last copy.

Failures: a device error fails the batch as retriable and stops the thread; any other exception from a
model is told apart, the input's fault from the engine's and from a bug, by worker.gpu.isolation (a mixin of
this class).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker import log
from worker.engines.base import HOST_SETS, Collector, DeviceRuntime, InferenceEngine, Outputs
from worker.errors import ConfigError, FatalError, WorkerError
from worker.gpu.decode_ahead import DecodeAhead
from worker.gpu.isolation import FailureIsolation
from worker.gpu.requests import DecoderFactory, DeviceDecoder, InferenceRequest, as_device_error, decoder_items, resolve
from worker.gpu.results import ResultPoster
from worker.metrics import Metrics
from worker.policy.batching import MicroBatcher

_STOP = object()
# The first batches after start-up are logged at info with where their time went: a slow one among them
# is a start-up cost the warm-up missed (docs/benchmarks.md, run 23: 60-417 ms against ~25 on an H100;
# run 24, from this log: nvImageCodec's call for the first full batch, 49-137 ms, not the device; run 25, from
# the decoder's steps: ~95 ms in one step while this thread's own CPU is 7-14 ms, so it waits, not works;
# run 26, the JPEGs no longer copied at the link: no step over 21 ms).
EARLY_BATCHES_LOGGED = 8


@dataclass
class _Launched:
    """A batch queued on the stream and not yet waited for."""

    requests: list[InferenceRequest]  # the requests of rows 0..n-1, in row order
    collectors: list[Collector]  # one per model: its outputs once ``done`` has passed
    staged: Any  # the device decoder's batch, released once the batch is finished; None without one
    started: float
    done: Any  # the runtime's event after the batch's last copy (None on the CPU runtime)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of this batch (_phase)


def decoded_on_card(request: InferenceRequest) -> bool:
    """The batcher's kind of a request: JPEG bytes the GPU thread decodes, or rows decoded on the CPU."""
    return request.encoded is not None


def batch_decoded(requests: Sequence[InferenceRequest]) -> str:
    """Where a batch's images were decoded, a metrics label: card, rows (by the intakes) or mixed."""
    on_card = sum(1 for req in requests if decoded_on_card(req))
    return "card" if on_card == len(requests) else "rows" if on_card == 0 else "mixed"


def batches_in_flight(setting: int, runtime: DeviceRuntime) -> int:
    """``gpu_batches_in_flight`` where the device runs batches while the host goes on (CUDA); 1 on the
    CPU runtime, whose models run inside ``enqueue``: a second batch in flight would only hold results back."""
    return setting if runtime.kind == "cuda" else 1


class GpuThread(FailureIsolation):
    def __init__(self, runtime: DeviceRuntime, engines: Sequence[InferenceEngine], max_batch_size: int,
                 max_wait_ms: float, metrics: Metrics | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, warmup: bool = True,
                 device_decoder: DecoderFactory | None = None, batches_in_flight: int = 1,
                 batches_by_decoder: bool = False, decode_thread: bool = False) -> None:
        if not 1 <= batches_in_flight <= HOST_SETS:
            raise ConfigError(f"gpu_batches_in_flight must be 1..{HOST_SETS}, got {batches_in_flight}")
        self.runtime = runtime
        self.batches_in_flight = batches_in_flight
        self._launched: deque[_Launched] = deque()  # oldest first
        self._last_finished = 0.0  # clock when the last batch was finished
        self._decoder_factory = device_decoder
        # Set on the thread at start-up when images are decoded on the device; read by the handler
        # (after ``start``) to choose between sending bytes and decoding in the pool.
        self.device_decoder: DeviceDecoder | None = None
        self.decodes_on_device = False
        # prefetched batch and its decode: the decoder's staged batch, None, or the decode thread's Future
        self._next: tuple[list[InferenceRequest], Any] | None = None
        self._decode_thread = decode_thread  # gpu_decode_thread: the next batch's decode off this thread
        self._ahead: DecodeAhead | None = None
        self._stopping = False
        self.engines = list(engines)
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.warmup = warmup
        self._clock = clock
        # batches_by_decoder (gpu_batches_by_decoder): a full batch keeps card-decoded JPEGs and CPU-decoded
        # rows apart (worker.policy.batching says why); a batch the deadline closes mixes them as before
        self._batcher: MicroBatcher[InferenceRequest] = MicroBatcher(
            max_batch_size, max_wait_ms / 1000.0, kind=decoded_on_card if batches_by_decoder else None)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="gpu", daemon=True)
        self._poster = ResultPoster(self.engines)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.fatal_error: BaseException | None = None
        self.heartbeat = clock()
        self.batches = 0
        self.images = 0
        self._log = log.get("gpu")

    @classmethod
    def for_settings(cls, settings: Any, runtime: DeviceRuntime, engines: Sequence[InferenceEngine],
                     device_decoder: DecoderFactory | None, **kw: Any) -> GpuThread:
        """The GPU thread as ``settings`` (worker.settings.Settings) configure it; ``kw``: metrics, on_fatal."""
        return cls(runtime, engines, settings.max_batch_size, settings.max_wait_ms, device_decoder=device_decoder,
                   batches_in_flight=batches_in_flight(settings.gpu_batches_in_flight, runtime),
                   batches_by_decoder=settings.gpu_batches_by_decoder,
                   decode_thread=settings.gpu_decode_thread, **kw)

    # --- called from the event loop ------------------------------------------------------
    async def start(self) -> None:
        """Start the thread and wait (off the loop) until every model is loaded and warmed up."""
        await asyncio.get_running_loop().run_in_executor(None, self.start_blocking)

    def start_blocking(self) -> None:
        """Start the thread and wait until every model is loaded and warmed up (the GPU process)."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    async def put(self, request: InferenceRequest) -> None:
        """The handler's way in (the same call as the intake's ``GpuClient.put``)."""
        self.submit(request)

    def submit(self, request: InferenceRequest) -> None:
        if self.fatal_error is not None:
            # The thread's own verdict where it is fatal already (EngineFailure, a bug): a message submitted
            # after the failure stops the worker with the same error as the failure itself, whichever
            # reaches the event loop first. A device error is retriable for its batch, fatal from now on.
            if isinstance(self.fatal_error, FatalError):
                raise self.fatal_error
            raise FatalError(f"GPU thread has stopped: {self.fatal_error}")
        request.enqueued_at = self._clock()
        self._queue.put(request)

    def queue_depth(self) -> int:
        staged = self._next
        return self._queue.qsize() + len(self._batcher) + (len(staged[0]) if staged is not None else 0)

    def alive(self) -> bool:
        return self._thread.is_alive() and self.fatal_error is None

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then tear down the device in reverse order (blocking: call off-loop)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.error("gpu thread did not stop in time", timeout_s=timeout)

    # --- the thread ----------------------------------------------------------------------
    def _main(self) -> None:
        activated: list[InferenceEngine] = []
        started = False
        try:
            self.runtime.start()
            started = True
            for engine in self.engines:
                engine.activate(self.runtime, self.max_batch_size)
                activated.append(engine)
            # pinned input rows for images decoded on the CPU: one set per batch that can be in flight
            self._host_sets = [[self.runtime.host_buffer((self.max_batch_size, *e.spec.preprocess.hwc_shape),
                                                         np.uint8) for e in self.engines]
                               for _ in range(self.batches_in_flight)]
            self._host_turns = itertools.cycle(self._host_sets)  # the set the next CPU-decoded batch uses
            if self.warmup:
                self._warm_up()
            if self._decoder_factory is not None:
                self._start_decoder()
            if self.device_decoder is not None and self._decode_thread:
                self._ahead = DecodeAhead(self.device_decoder, self.runtime,
                                          on_stage=lambda seconds: self._phase("decode_thread", seconds))
                self._ahead.start()
        except BaseException as exc:  # noqa: BLE001 - reported to start() and re-raised there
            self._startup_error = exc if isinstance(exc, WorkerError) else FatalError(
                f"model start-up failed: {type(exc).__name__}: {exc}")
            self._teardown(activated, started)  # before start() raises: the device is released by then
            self._ready.set()
            return
        self.decodes_on_device = self.device_decoder is not None
        if self.metrics is not None:  # an operator sees a silent fall back to CPU decoding here
            self.metrics.gpu_decoding.set(1 if self.decodes_on_device else 0)
        self._log.info("gpu thread ready", device=self.runtime.device_name, kind=self.runtime.kind,
                       models=[e.spec.name for e in self.engines], max_batch_size=self.max_batch_size,
                       decodes_on_device=self.decodes_on_device)
        self._ready.set()
        self._poster.start()
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead GPU thread must take the process down
            self._fail(exc)
        finally:
            self._poster.stop()  # what the device finished is resolved before stop() returns
            self._teardown(activated, started)

    def _start_decoder(self) -> None:
        """Images decoded on the device if the factory can make a decoder here; otherwise (no
        nvImageCodec, no NVRTC, a CPU runtime) say why and leave decoding to the CPU pool. A CUDA
        failure is no reason to fall back: it propagates and start-up fails."""
        assert self._decoder_factory is not None
        decoder = None
        try:
            decoder = self._decoder_factory(self.runtime, self.engines, self.max_batch_size)
            if self.warmup:  # every batch that can be alive at once: those in flight and the prefetched one
                decoder.warm_up(self.batches_in_flight + 1)
        except ConfigError as exc:
            self._log.warning("gpu decoding unavailable; images are decoded on the CPU (cpu-reduced)",
                              reason=str(exc))
            if decoder is not None:
                decoder.close()
            return
        self.device_decoder = decoder

    def _warm_up(self) -> None:
        """Run the smallest and largest batch once so that allocations and kernel selection happen
        before the worker reports ready, not on the first real messages."""
        for n in sorted({1, self.max_batch_size}):
            batch = [buf[:n] for buf in self._host_sets[0]]
            for b in batch:
                b.fill(0)
            self._infer(batch)

    def _loop(self) -> None:
        while True:
            if self._poster.error is not None:
                raise self._poster.error
            self.heartbeat = self._clock()
            if self.metrics is not None:
                self.metrics.gpu_queue_depth.set(self.queue_depth())
            if self._next is not None:  # taken (and decoded) while the previous batch ran: runs now
                requests, staged = self._next
                self._next = None
                self._run_batch(requests, self._clock(), self._decoded_ahead(staged))
                continue
            if self._launched:  # nothing ready to follow it: its results go out before we wait for input
                self._finish_launched()
                continue
            if self._stopping and not len(self._batcher) and self._queue.empty():
                return
            timeout = self._batcher.time_left(self._clock())
            try:
                item = self._queue.get(timeout=1.0 if timeout is None else timeout)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    self._stopping = True
                else:
                    self._batcher.add(item, item.enqueued_at)
                if self._batcher.full():
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            now = self._clock()
            if self._batcher.ready(now) or (self._stopping and len(self._batcher)):
                self._run_batch([req for req, _ in self._batcher.take()], now)

    def _infer(self, batches: Sequence[np.ndarray]) -> list[Outputs]:
        """Host rows through every model, waited for (warm-up and the canary: nothing else in flight)."""
        collectors = [engine.enqueue(batch) for engine, batch in zip(self.engines, batches)]
        self.runtime.synchronize()  # one synchronisation per batch, whatever the number of models
        return [collect() for collect in collectors]

    def _assemble(self, requests: Sequence[InferenceRequest]) -> list[np.ndarray]:
        """Copy each request's image into a set of (pinned) batch buffers, row by row. The sets take
        turns: the previous batch's copy from the other set may still be queued on the stream.

        A plain memcpy through memoryviews, holding the GIL: NumPy's ``buf[j] = image`` drops and retakes
        the GIL for every image, and with the decode threads busy each retake can wait up to a switch
        interval (5 ms). Measured on 2 cores with 4 decode threads, 61 images of 224x224x3: p95 5-6 ms
        with NumPy, 0.4-0.5 ms this way; the same without contention (0.3 ms).
        """
        n = len(requests)
        host = next(self._host_turns)
        for i, buf in enumerate(host):
            flat = memoryview(buf.reshape(-1)).cast("B")  # pinned buffers are C-contiguous
            step = buf[0].nbytes
            for j, req in enumerate(requests):
                image = req.inputs[i]
                if image.nbytes != step or image.dtype != np.uint8:
                    raise ValueError(f"model {self.engines[i].spec.name}: input {image.shape} {image.dtype} "
                                     f"does not fit a batch row {buf.shape[1:]} uint8")
                flat[j * step:(j + 1) * step] = memoryview(np.ascontiguousarray(image)).cast("B")
        return [buf[:n] for buf in host]

    def _launch(self, requests: list[InferenceRequest], staged: Any = None,
                ahead: bool = False) -> _Launched | None:
        """Queue the batch's inputs and every model on the stream, without waiting for the device.
        Requests whose images the device decoder rejected are resolved here with their PoisonMessage (to
        the DLQ) and left out; None when none is left.

        With a device decoder, ``staged`` is this batch already decoded (taken by ``_prefetch`` while the
        previous batch ran); nvImageCodec's host work and its decode stream then overlap inference. ``ahead``
        (``_run_batch``): once this batch's rows are written, the next full batch goes to the decode thread,
        whose decode then runs while this thread queues the models (``enqueue_resident``: 4-7 ms per batch
        of ResNet-50 in ONNX Runtime) and waits for the batch before."""
        started = self._clock()
        phases: dict[str, float] = {}
        decoder = self.device_decoder
        if decoder is None:
            collectors = [engine.enqueue(batch) for engine, batch in zip(self.engines, self._assemble(requests))]
            self._phase("enqueue", self._clock() - started, phases)
            return _Launched(requests, collectors, None, started, self.runtime.batch_done(), phases)
        if staged is None:
            staged = decoder.stage(decoder_items(requests))
        t1 = self._clock()
        self._phase("decode", t1 - started, phases)
        try:
            kept, rejected = decoder.write(staged)
            if ahead and self._ahead is not None:
                self._prefetch()
            fallbacks = getattr(staged, "fallbacks", 0)
            if self.metrics is not None and fallbacks:
                self.metrics.gpu_decode_fallbacks.inc(fallbacks)
            for i, error in rejected:
                req = requests[i]
                self._log.warning("image rejected by the gpu decoder", reason=error.reason, error=str(error),
                                  **req.context)
                req.loop.call_soon_threadsafe(resolve, req.future, None, error)
            ran = [requests[i] for i in kept]
            if not ran:
                self.runtime.synchronize()  # rare: let what the decoder queued finish before release
                decoder.release(staged)
                return None
            collectors = [engine.enqueue_resident(len(ran)) for engine in self.engines]
            self._phase("enqueue", self._clock() - t1, phases)
            return _Launched(ran, collectors, staged, started, self.runtime.batch_done(), phases)
        except BaseException:
            with contextlib.suppress(BaseException):  # kernels may still read the images: wait first
                self.runtime.synchronize()
            decoder.release(staged)
            raise

    def _finish(self, batch: _Launched) -> list[Outputs]:
        """Wait for the batch on the device and collect its outputs; its decoded images are then free."""
        t = self._clock()
        try:
            self.runtime.wait_batch(batch.done)
            self._phase("wait", self._clock() - t, batch.phases)
            return [collect() for collect in batch.collectors]
        except BaseException:
            with contextlib.suppress(BaseException):
                self.runtime.synchronize()
            raise
        finally:
            if batch.staged is not None and self.device_decoder is not None:
                self.device_decoder.release(batch.staged)

    def _process(self, requests: list[InferenceRequest]) -> tuple[list[InferenceRequest], list[Outputs]]:
        """One batch launched and waited for (``_isolate``'s items: nothing else is in flight then).
        Returns the requests that ran, in row order, and their outputs."""
        batch = self._launch(requests)
        if batch is None:
            return [], []
        return batch.requests, self._finish(batch)

    def _phase(self, name: str, seconds: float, batch: dict[str, float] | None = None) -> None:
        """Where a batch's time goes on this thread (host decode, enqueue, prefetch, waiting for the
        device): the bench reads the totals to tell host-bound from device-bound; ``batch`` (a batch's
        own phases) keeps it for the early-batch log."""
        if batch is not None:
            batch[name] = batch.get(name, 0.0) + seconds
        if self.metrics is not None:
            self.metrics.gpu_phase_seconds.labels(name).inc(seconds)

    def _prefetch(self) -> None:
        """If a full batch is already waiting, take it (and decode it, with a device decoder) now: it is
        launched next, at once, behind the batches in flight."""
        if self._next is not None or (self.device_decoder is None and self.batches_in_flight == 1):
            return
        while not self._batcher.full():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                continue
            self._batcher.add(item, item.enqueued_at)
        if not self._batcher.full():
            return
        requests = [req for req, _ in self._batcher.take()]
        staged = None
        if self._ahead is not None:  # decoded on the decode thread while this one goes on
            staged = self._ahead.submit(decoder_items(requests))
        elif self.device_decoder is not None:
            try:
                staged = self.device_decoder.stage(decoder_items(requests))
            except Exception as exc:  # noqa: BLE001 - decoded again, with errors handled, when the batch runs
                self._log.debug("prefetch decode failed; the batch decodes when it runs", error=str(exc))
        self._next = (requests, staged)

    def _decoded_ahead(self, staged: Any) -> Any:
        """A prefetched batch's decode: the decode thread's result, waited for here, or None where it
        raised (the batch is then decoded again when it runs, on this thread, where each error is
        classified: a device error stops the thread, an image nvImageCodec cannot take goes to OpenCV)."""
        if not isinstance(staged, Future):
            return staged
        t = self._clock()
        try:
            return staged.result()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self._log.debug("decode thread failed on the batch; it decodes when it runs", error=str(exc))
            return None
        finally:
            self._phase("decode_wait", self._clock() - t)

    def _run_batch(self, requests: list[InferenceRequest], now: float, staged: Any = None) -> None:
        """Launch the batch, take the next one if it is waiting, then finish the batches launched before:
        all of them, or all but this one when the next follows at once and more than one may be in flight
        (the device then runs this one while this thread hands over the previous one's results)."""
        try:
            batch = self._launch(requests, staged, ahead=True)
        except BaseException as exc:  # noqa: BLE001 - classified below
            try:
                self._finish_launched()  # launched before it: their outcome does not depend on this failure
            except BaseException as later:
                error = later if isinstance(later, WorkerError) else FatalError(f"GPU thread failed: {later}")
                for req in requests:  # the device failed under the earlier batch: this one fails with it
                    req.loop.call_soon_threadsafe(resolve, req.future, None, error)
                raise
            self._failed(requests, exc)
            return
        if batch is not None:
            self._launched.append(batch)
        t = self._clock()
        self._prefetch()
        self._phase("prefetch", self._clock() - t)
        keep = self.batches_in_flight - 1 if self._next is not None else 0
        self._finish_launched(keep)

    def _finish_launched(self, keep: int = 0) -> None:
        """Finish launched batches, oldest first, until ``keep`` are left in flight."""
        while len(self._launched) > keep:
            batch = self._launched.popleft()
            try:
                outputs = self._finish(batch)
            except BaseException as exc:  # noqa: BLE001 - classified below
                if as_device_error(exc) is None:
                    self._finish_launched()  # _isolate runs items alone: nothing may be in flight then
                self._failed(batch.requests, exc)
                continue
            self._post(batch, outputs)

    def _post(self, batch: _Launched, outputs: list[Outputs]) -> None:
        requests = batch.requests
        n = len(requests)
        # The batch's own time: from its launch, or from when the batch before it finished if it was
        # queued behind that one (two in flight), to now. Summed over batches it is the time the thread
        # had a batch on the device, never counted twice (the bench's busy fraction, the batch time of
        # its latency bound).
        now = self._clock()
        elapsed = now - max(batch.started, self._last_finished)
        self._last_finished = now
        # Copy once per output (collectors may return views of buffers reused by a later batch), then
        # hand the batch to the post thread: top-k, one result per image and the resolutions run there
        # while this thread stages and runs the next batch (it waits in CUDA calls with the GIL released).
        copies = [{name: np.array(arr) for name, arr in out.items()} for out in outputs]
        self._poster.put(requests, copies, batch.started, elapsed)
        # Book-keeping last: whatever it raises, no request of this batch is left waiting.
        self.batches += 1
        self.images += n
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
            self.metrics.inference_seconds.observe(elapsed)
            decoded = batch_decoded(requests)
            self.metrics.gpu_batches_decoded.labels(decoded).inc()
            self.metrics.gpu_batch_seconds.labels(decoded).inc(elapsed)
            self.metrics.gpu_memory.set(self.runtime.memory_in_use())
        oldest_wait = max(batch.started - r.enqueued_at for r in requests)
        (self._log.info if self.batches <= EARLY_BATCHES_LOGGED else self._log.debug)(
            "batch", number=self.batches, size=n, decoded=batch_decoded(requests),
            wait_ms=round(oldest_wait * 1000, 3), inference_ms=round(elapsed * 1000, 3),
            phases_ms={k: round(v * 1000, 3) for k, v in batch.phases.items()},
            # the device decoder's own steps of this batch's decode (worker.decode.nvimgcodec.Staged.steps)
            decode_steps_ms={k: round(v * 1000, 3) for k, v in (getattr(batch.staged, "steps", None) or {}).items()})

    def _fail(self, exc: BaseException) -> None:
        self.fatal_error = exc
        # Fail everything still queued so that no coroutine waits for a thread that is gone; first,
        # before anything that could itself raise (a log call with a broken stream, say).
        pending = []
        while len(self._batcher):
            pending.extend(req for req, _ in self._batcher.take())
        if self._next is not None:
            requests, staged = self._next
            if isinstance(staged, Future):
                staged.cancel()  # not started yet: never decoded; running: finishes and is dropped
            pending.extend(requests)
            self._next = None
        while self._launched:  # queued on the device, never finished (already resolved ones stay as they are)
            pending.extend(self._launched.popleft().requests)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                pending.append(item)
        # Logged before anyone is told: an intake that learns of it stops the worker, and the supervisor
        # may end this process before a later line is written (CI: the line was missing once).
        name = getattr(exc, "cuda_error", "")
        self._log.error("gpu thread failed", error=f"{type(exc).__name__}: {exc}", cuda_error=name or None)
        error = exc if isinstance(exc, WorkerError) else FatalError(f"GPU thread failed: {exc}")
        for req in pending:
            req.loop.call_soon_threadsafe(resolve, req.future, None, error)
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _teardown(self, activated: list[InferenceEngine], started: bool) -> None:
        """Reverse order of start: the decode thread, sync the stream, the decoder, engines last-in
        first-out, then the runtime."""
        if self._ahead is not None:
            self._ahead.stop()  # its job in hand finishes first; its context is popped before the runtime stops
        try:
            if started:
                self.runtime.synchronize()
        except BaseException as exc:  # noqa: BLE001 - still release what we can
            self._log.error("stream synchronize failed at teardown", error=str(exc))
        if self.device_decoder is not None:
            try:
                self.device_decoder.close()  # kept as an attribute: its counters stay readable
            except BaseException as exc:  # noqa: BLE001
                self._log.error("gpu decoder close failed", error=str(exc))
        for engine in reversed(activated):
            try:
                engine.deactivate()
            except BaseException as exc:  # noqa: BLE001
                self._log.error("engine deactivate failed", model=engine.spec.name, error=str(exc))
        # Cyclic garbage holding device memory (nvImageCodec images referenced from a traceback, say)
        # must go now, with the context current on this thread: collected later on another thread, after
        # the context is gone, its free crashes the process (seen in a GPU test as a segfault in gc).
        gc.collect()
        if started:
            try:
                self.runtime.stop()
            except BaseException as exc:  # noqa: BLE001
                self._log.error("runtime stop failed", error=str(exc))
