"""What the GPU thread does when a batch raises: tell the input's fault from the engine's and from a bug.

- ``DeviceError`` (a CUDA error): every request of the batch fails as retriable and the thread stops
  (``on_fatal``), so the process exits non-zero without committing those offsets.
- any other exception from a model: the batch is retried item by item, once (``_isolate``). Only an input
  that fails alone while the engine demonstrably works becomes ``ModelRejectedInput`` (poison, to the DLQ);
  an engine that fails a known-good input too, or every input of a batch, raises ``EngineFailure``, and an
  exception that is a bug (``TypeError``, ``AttributeError``, ...) a ``FatalError``: the thread stops, nothing
  of the batch is dead-lettered or committed.

A mixin of ``GpuThread`` (worker.gpu.thread): it runs items through the thread's own ``_process`` and the
warm-up input through ``_infer``, on the GPU thread, with nothing else in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from worker.errors import EngineFailure, FatalError, ModelRejectedInput
from worker.gpu.requests import InferenceRequest, InferenceResult, as_device_error, resolve

# Exceptions that say the code (or the host) is wrong, not the input: fatal wherever they come from.
_NOT_THE_INPUT = (TypeError, AttributeError, NameError, LookupError, AssertionError, ImportError,
                  NotImplementedError, RecursionError, MemoryError)


class FailureIsolation:
    """The GPU thread's verdicts on a failed batch (see the module docstring)."""

    engines: list[Any]
    _host_sets: list[list[np.ndarray]]
    _log: Any
    _clock: Callable[[], float]
    _infer: Callable[[Sequence[np.ndarray]], Any]
    _process: Callable[[list[InferenceRequest]], tuple[list[InferenceRequest], list[Any]]]

    def _failed(self, requests: list[InferenceRequest], exc: BaseException) -> None:
        """A batch raised: a device error fails it (retriable) and stops the thread, anything else is
        told apart by running its items one by one."""
        device_error = as_device_error(exc)
        if device_error is not None:
            self._fail_batch(requests, device_error, exc)
        self._isolate(requests, exc)

    def _isolate(self, requests: list[InferenceRequest], batch_error: BaseException) -> None:
        """A model raised on the batch: retry each item alone, once, to tell the input's fault from the
        engine's.

        - an item that runs alone gets its result;
        - if one ran, the engine works: each item that failed alone is rejected (ModelRejectedInput, DLQ);
        - if none ran, the warm-up input (a zero row per model, through ``enqueue`` as at start-up) goes
          through the engines. Fails too: the engine is broken, ``EngineFailure``. Passes: a single
          failed input is rejected; two or more that all fail alone are the engine's fault as well (a
          model that fails every decoded, correctly sized input of a batch is not meeting bad inputs);
        - a bug (``_NOT_THE_INPUT``) is fatal wherever it comes from;
        - a device error stops the thread as in ``_run_batch``.
        Whatever is fatal resolves every unresolved request of the batch with the error (the handler
        then stops the worker: nothing dead-lettered, nothing committed) and raises it into ``_fail``.
        """
        self._log.warning("batch failed; retrying items one by one", size=len(requests),
                          error=f"{type(batch_error).__name__}: {batch_error}")
        if isinstance(batch_error, _NOT_THE_INPUT):
            self._fail_batch(requests, self._bug(batch_error), batch_error)
        failed: list[tuple[InferenceRequest, BaseException]] = []
        ran_any = False
        for i, req in enumerate(requests):
            try:
                ran, outputs = self._process([req])
            except BaseException as exc:  # noqa: BLE001 - classified below
                unresolved = [r for r, _ in failed] + requests[i:]
                device_error = as_device_error(exc)
                if device_error is not None:
                    self._fail_batch(unresolved, device_error, exc)
                if isinstance(exc, _NOT_THE_INPUT):
                    self._fail_batch(unresolved, self._bug(exc), exc)
                failed.append((req, exc))
                continue
            if not ran:  # the decoder rejected it, and resolved it
                continue
            ran_any = True
            per_model = [{name: np.array(arr[0]) for name, arr in out.items()} for out in outputs]
            req.loop.call_soon_threadsafe(
                resolve, req.future, InferenceResult(per_model, self._clock() - req.enqueued_at, 0.0, 1))
        if not failed:
            return
        if not ran_any:
            self._judge_engine(failed)  # raises when the engine, not the input, is at fault
        for req, exc in failed:
            error = ModelRejectedInput(f"model {self._model_names()} failed on this input alone: "
                                       f"{type(exc).__name__}: {exc}")
            self._log.warning("model rejected input", error=str(error), **req.context)
            req.loop.call_soon_threadsafe(resolve, req.future, None, error)

    def _judge_engine(self, failed: list[tuple[InferenceRequest, BaseException]]) -> None:
        """No item of the batch ran alone: raise EngineFailure (or the canary's DeviceError) unless a
        known-good input runs and only one input failed."""
        canary = self._canary()
        requests = [req for req, _ in failed]
        first = failed[0][1]
        if canary is not None:
            device_error = as_device_error(canary)
            if device_error is not None:
                self._fail_batch(requests, device_error, canary)
            why = f"a known-good input (the warm-up's zero rows) fails too: {type(canary).__name__}: {canary}"
        elif len(failed) > 1:
            why = f"all {len(failed)} inputs of the batch failed alone, while a known-good input runs"
        else:
            return
        error = EngineFailure(f"model {self._model_names()} is failing, not its inputs: {why}; first input's "
                              f"error: {type(first).__name__}: {first}. Nothing of the batch is dead-lettered "
                              f"or committed; the worker stops (check the engine, the device and the model)")
        self._log.error("engine failure", error=str(error), inputs=[req.context for req in requests])
        self._fail_batch(requests, error, canary or first)

    def _canary(self) -> BaseException | None:
        """The warm-up input through the engines, as ``_warm_up`` runs it: None if it runs, else what it
        raised. With a device decoder too: ``enqueue`` of host rows is the engines' own input path, the
        one warm-up proved, and a zero row is a valid image for any model."""
        try:
            batch = [buf[:1] for buf in self._host_sets[0]]  # nothing in flight: see _isolate
            for b in batch:
                b.fill(0)
            self._infer(batch)
        except BaseException as exc:  # noqa: BLE001 - the verdict is the caller's
            return exc
        return None

    def _bug(self, exc: BaseException) -> FatalError:
        return FatalError(f"bug on the GPU thread running model {self._model_names()}: "
                          f"{type(exc).__name__}: {exc}")

    def _model_names(self) -> str:
        return "+".join(e.spec.name for e in self.engines)

    @staticmethod
    def _fail_batch(requests: Sequence[InferenceRequest], error: BaseException, cause: BaseException) -> None:
        """Resolve every request with ``error`` (none is left waiting on a thread about to stop), then
        raise it: ``_main`` hands it to ``_fail``."""
        for req in requests:
            req.loop.call_soon_threadsafe(resolve, req.future, None, error)
        raise error from cause
