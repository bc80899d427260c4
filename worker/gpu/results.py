"""The post thread of the GPU process: a finished batch's outputs -> one result per request.

The GPU thread copies a batch's outputs off the engines' buffers and hands them here; top-k and softmax
(vectorised over the batch), the per-image results and the resolutions run on this thread while the
GPU thread stages and runs the next batch (it waits in CUDA calls with the GIL released). A failure
here is a bug: every request of the batch fails with a ``FatalError`` and ``error`` is set, which the
GPU thread raises at its next turn, so the worker stops loudly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

from worker import log
from worker.engines.base import InferenceEngine, Outputs
from worker.errors import FatalError
from worker.gpu.requests import InferenceRequest, InferenceResult, resolve, resolve_all
from worker.models.postprocess import postprocess_batch

_STOP = object()


class ResultPoster:
    def __init__(self, engines: Sequence[InferenceEngine]) -> None:
        self.engines = list(engines)
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="gpu-post", daemon=True)
        self._log = log.get("gpu")

    def start(self) -> None:
        self._thread.start()

    def put(self, requests: list[InferenceRequest], copies: list[Outputs], started: float, elapsed: float) -> None:
        self._queue.put((requests, copies, started, elapsed))

    def stop(self) -> None:
        """Resolve what was handed over, then end (the GPU thread calls it before its teardown)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            requests, copies, started, elapsed = item
            try:
                self.resolve_batch(requests, copies, started, elapsed)
            except BaseException as exc:  # noqa: BLE001 - a bug: fatal, and nothing of the batch hangs
                error = FatalError(f"post-processing a batch failed: {type(exc).__name__}: {exc}")
                for req in requests:
                    req.loop.call_soon_threadsafe(resolve, req.future, None, error)
                self.error = error

    def resolve_batch(self, requests: list[InferenceRequest], copies: list[Outputs], started: float,
                      elapsed: float) -> None:
        """Post-process the batch and resolve each request, one callback per event loop (the
        self-pipe write of call_soon_threadsafe drops the GIL: per image, one more wait for it)."""
        n = len(requests)
        post = self.postprocess(copies)
        by_loop: dict[Any, list[tuple[Any, InferenceResult]]] = {}
        for j, req in enumerate(requests):
            per_model = [{name: arr[j] for name, arr in out.items()} for out in copies]
            result = InferenceResult(per_model, queue_s=started - req.enqueued_at, inference_s=elapsed,
                                     batch_size=n, postprocessed=[p[j] for p in post] if post else None)
            by_loop.setdefault(req.loop, []).append((req.future, result))
        for loop, resolved in by_loop.items():
            loop.call_soon_threadsafe(resolve_all, resolved)

    def postprocess(self, outputs: list[Outputs]) -> list[list[dict[str, Any]]] | None:
        """Per model, every image's JSON-ready outputs, vectorised over the batch (top-k and softmax of a
        128 x 1000 batch in a few NumPy calls). None when it fails: each result is then post-processed
        alone where it is encoded (the link, or the handler), which reports the error there."""
        try:
            return [postprocess_batch(out, engine.spec) for out, engine in zip(outputs, self.engines)]
        except Exception as exc:  # noqa: BLE001 - surfaced by the per-result path
            self._log.debug("batch postprocess failed; per result instead", error=str(exc))
            return None
