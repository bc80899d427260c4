"""The decode thread: the next batch's ``stage`` (nvImageCodec's decode call) off the GPU thread.

Why: with images decoded on the card, the GPU thread's host work per batch was the next batch's decode
call (nvImageCodec parses the JPEGs, feeds the hardware decoder and waits for it: 13-15 ms per 128
images of 640x480 on an H100) plus the engines' enqueue (5-7 ms). That sits just under the device's
own ~22 ms per batch of ResNet-50 fp32, so a slower host made the thread, not the card, the bound
(docs/benchmarks.md, run 19: 0.80-0.92x the ceiling between identical runs), and it is over the 15.5 ms
of fp16 (0.74x). Here the decode call runs on a second thread while the GPU thread enqueues this batch
and waits for the one before; nvImageCodec's call holds no GIL while it decodes.

Why that keeps the design's promise (one owner of the device): the rule exists so that every CUDA call
happens in the one primary context. This thread makes that context current (``helper_context``) and
calls nvImageCodec only, which already runs CUDA from threads of its own in that context; it calls no
method of the runtime, creates no stream and no buffer of ours, and touches no batch row (the GPU thread
writes rows, orders the resize after the decode stream, runs the engines and releases the images).
Buffers ``stage`` might need from the runtime are reserved on the GPU thread before each job.

One job at a time: the GPU thread submits a batch once the batch before has its rows written, and takes
the result before it writes this one, so a job never overlaps the ``write`` of an earlier batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from worker import log
from worker.engines.base import DeviceRuntime
from worker.gpu.requests import DeviceDecoder

_STOP = None


class DecodeAhead:
    """Runs ``decoder.stage`` for the GPU thread on a thread of its own (``gpu_decode_thread``)."""

    def __init__(self, decoder: DeviceDecoder, runtime: DeviceRuntime,
                 on_stage: Callable[[float], None] | None = None) -> None:
        self._decoder = decoder
        self._runtime = runtime
        self._on_stage = on_stage  # told each job's seconds (the GPU thread's phase counter)
        self._jobs: queue.SimpleQueue[tuple[Sequence[Any], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="gpu-decode", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._log = log.get("gpu")

    def start(self) -> None:
        """Start the thread; raises what making the context current there raised."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def submit(self, items: Sequence[Any]) -> Future:
        """On the GPU thread: reserve what ``stage`` may need from the runtime, then queue the job. The
        future gives the decoder's staged batch, or what ``stage`` raised."""
        self._decoder.reserve()
        future: Future = Future()
        self._jobs.put((items, future))
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand, then leave (its context popped). Idempotent."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._log.error("gpu decode thread did not stop in time", timeout_s=timeout)

    def _main(self) -> None:
        try:
            with self._runtime.helper_context():
                self._started.set()
                self._serve()
        except BaseException as exc:  # noqa: BLE001 - taking the context: start() raises it on the GPU thread
            if self._started.is_set():  # not the context: a bug in the loop itself, loud
                self._log.error("gpu decode thread failed", error=f"{type(exc).__name__}: {exc}")
                raise
            self._start_error = exc
            self._started.set()

    def _serve(self) -> None:
        """Jobs until the stop mark; what a job raises goes to its future, never out of here."""
        while (job := self._jobs.get()) is not _STOP:
            items, future = job
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                future.set_result(self._decoder.stage(items))
            except BaseException as exc:  # noqa: BLE001 - the GPU thread decides what it means
                future.set_exception(exc)
            finally:
                if self._on_stage is not None:
                    self._on_stage(time.perf_counter() - started)
