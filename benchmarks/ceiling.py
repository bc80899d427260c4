"""The ceiling: the pipeline's engines alone, and the GPU thread alone.

``engine_ceiling`` runs on its own thread, which takes the device the way the GPU thread does (the same
``create_runtime`` / ``create_engine`` / ``activate`` / ``enqueue`` / ``synchronize`` calls) and then runs
batch after batch of already pre-processed images. It measures, for every batch size asked:

- ``engine_api``: per batch, ``enqueue`` of every model and one ``synchronize``, from the runtime's host
  batch buffer (pinned on CUDA): on CUDA that includes the uint8 host-to-device copy and the copy of the
  outputs back; on the CPU the provider reads the buffer in place.
- ``device_resident`` (CUDA with ONNX Runtime engines only): the batch was copied to the engine's device
  input buffer once and stays bound there; per batch, ``run_with_iobinding`` of every model and one
  ``synchronize``, outputs left on the device. This is "inference only, inputs already on the device".

``gpu_thread_ceiling`` runs the real ``GpuThread`` on pre-decoded requests (no Kafka, no decode): it adds
batch assembly into the pinned buffer, the per-image copy of outputs and the hand-back to the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.own_thread import on_own_thread
from worker.engines import create_engine, create_runtime
from worker.decode.nvimgcodec import decoder_factory
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.settings import Settings

CEILING_DEFINITIONS = {
    "cpu": ("inputs already in the host batch buffer: the uint8 NxHxWxC batch sits in the runtime's host "
            "buffer and ONNX Runtime's CPU provider reads it in place; layout and normalisation run inside "
            "the graph; per batch one session.run per model"),
    "cuda:device_resident": ("inputs already on the device: the uint8 batch was copied once into the engine's "
                             "device input buffer and stays bound there (ONNX Runtime IO binding); per batch "
                             "run_with_iobinding of every model and one stream synchronize; outputs stay in "
                             "device memory; no host<->device copies"),
    "cuda:engine_api": ("from the pinned host batch buffer through the engine API: per batch engine.enqueue of "
                        "every model (uint8 host->device copy, kernels, outputs copied back to pinned memory) "
                        "and one synchronize; what the GPU thread does per batch minus batch assembly"),
}

Inputs = Sequence[tuple[np.ndarray, ...]]  # per image: one uint8 HWC array per model


def _time_loop(step: Callable[[], None], sync: Callable[[], None], min_s: float, min_iters: int,
               max_iters: int = 100_000) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + min_s
    while len(times) < min_iters or (time.perf_counter() < end and len(times) < max_iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def _summary(times: list[float], n: int) -> dict:
    arr = np.array(times)
    return {"batch_size": n, "iterations": len(times), "images_per_s": n * len(times) / float(arr.sum()),
            "batch_ms_p50": float(np.median(arr) * 1000), "batch_ms_min": float(arr.min() * 1000)}


def _device_resident_runner(engine: Any, runtime: Any) -> Callable[[], None] | None:
    """run_with_iobinding on the binding ``enqueue`` left pointing at device buffers, or None where the
    engine has no such path (CPU runtime, TensorRT)."""
    cuda = getattr(engine, "_cuda", None)
    if cuda is None or not hasattr(cuda, "binding"):
        return None
    from worker.engines.onnxruntime import run_bound

    return lambda: run_bound(cuda.session, cuda.binding, cuda.run_options, f"model {engine.spec.name}", runtime)


def _new_shape_cost(engines: Sequence[Any], runtime: Any, sizes: Sequence[int]) -> list[dict]:
    """First and second run of batch shapes the engines were never run at (bypassing their buckets):
    what a batch of an unseen size costs on the hot path when nothing pads it."""
    out = []
    for n in sizes:
        cudas = [getattr(e, "_cuda", None) for e in engines]
        if not all(c is not None and hasattr(c, "_bind") for c in cudas):
            return out
        times = []
        for _ in range(2):
            t = time.perf_counter()
            for e, c in zip(engines, cudas):
                c._bind(n)
                _device_resident_runner(e, runtime)()
            runtime.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        out.append({"batch_size": n, "first_ms": times[0], "second_ms": times[1]})
    return out


def engine_ceiling(settings: Settings, pipeline: PipelineSpec, inputs: Inputs, batch_sizes: Sequence[int],
                   min_s: float = 2.0, min_iters: int = 5, warmup: int = 3) -> dict:
    """Measure every batch size, each on engines activated for it; runs on a thread of its own."""
    return on_own_thread(lambda: _engine_ceiling(settings, pipeline, inputs, batch_sizes, min_s, min_iters,
                                                 warmup), "bench-ceiling")


def _engine_ceiling(settings: Settings, pipeline: PipelineSpec, inputs: Inputs, batch_sizes: Sequence[int],
                    min_s: float, min_iters: int, warmup: int) -> dict:
    """Each batch size on engines activated for exactly that size: engines sized for a larger batch would
    time the padding. One session each (ort_batch_shapes=max), whatever the worker runs with: with pow2
    the worker runs a full batch on the same single-shape session, and the sessions of smaller buckets
    would only slow the measurement's start."""
    settings = settings.replace(ort_batch_shapes="max")
    runtime = create_runtime(settings)
    runtime.start()
    try:
        results: dict[str, list[dict]] = {"engine_api": [], "device_resident": []}
        for n in sorted(set(batch_sizes)):
            _measure_at(settings, pipeline, inputs, runtime, n, results, min_s, min_iters, warmup,
                        last=n == max(batch_sizes))
        if not results["device_resident"]:
            del results["device_resident"]
        kind = runtime.kind
        return {"runtime": kind, "device": runtime.device_name,
                "gpu_name": getattr(runtime, "gpu_name", "") or runtime.device_name,
                "definitions": {k: v for k, v in CEILING_DEFINITIONS.items() if k.split(":")[0] == kind},
                **results}
    finally:
        runtime.stop()


def _measure_at(settings: Settings, pipeline: PipelineSpec, inputs: Inputs, runtime: Any, n: int,
                results: dict[str, Any], min_s: float, min_iters: int, warmup: int, last: bool) -> None:
    engines = [create_engine(spec, settings) for spec in pipeline.models]
    activated = []
    try:
        for engine in engines:
            engine.activate(runtime, n)
            activated.append(engine)
        host = [runtime.host_buffer((n, *spec.preprocess.hwc_shape), np.uint8) for spec in pipeline.models]
        for j in range(n):  # real decoded images, not zeros
            for i, buf in enumerate(host):
                buf[j] = inputs[j % len(inputs)][i]

        def step() -> None:
            collectors = [e.enqueue(b) for e, b in zip(engines, host)]
            runtime.synchronize()
            for collect in collectors:
                collect()

        for _ in range(warmup):
            step()
        results["engine_api"].append(_summary(_time_loop(step, lambda: None, min_s, min_iters), n))
        if runtime.kind == "cuda":
            step()  # leaves every binding at n rows, on the device buffers
            runners = [_device_resident_runner(e, runtime) for e in engines]
            if all(r is not None for r in runners):
                def device_step() -> None:
                    for r in runners:
                        r()
                for _ in range(warmup):
                    device_step()
                    runtime.synchronize()
                results["device_resident"].append(
                    _summary(_time_loop(device_step, runtime.synchronize, min_s, min_iters), n))
            if last:
                results["new_shape"] = _new_shape_cost(engines, runtime, [k for k in (3, 77) if k <= n])
    finally:
        try:
            runtime.synchronize()
        finally:
            for engine in reversed(activated):
                engine.deactivate()


async def _metrics_caught_up(metrics: Metrics, images: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (metrics.registry.get_sample_value("worker_batch_size_sum") or 0) < images and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


async def gpu_thread_ceiling(settings: Settings, pipeline: PipelineSpec, inputs: Inputs, count: int,
                             encoded: Sequence[Any] = (), rows: bool = False) -> dict:
    """The real GpuThread fed ``count`` requests at once: full batches, no Kafka. Pre-decoded images, or,
    with ``encoded`` (decoder=nvimgcodec), checked JPEG bytes that the GPU thread decodes itself; with
    ``rows`` too, the GPU decoder is running but every request brings rows decoded on the CPU (what
    decoder=hybrid's intake-decoded share costs the GPU process)."""
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    runtime = create_runtime(settings)
    engines = [create_engine(spec, settings) for spec in pipeline.models]
    gpu = GpuThread.for_settings(settings, runtime, engines, decoder_factory(settings, pipeline) if encoded else None,
                                 metrics=metrics)
    await gpu.start()

    def request(j: int, fut: asyncio.Future) -> InferenceRequest:
        if gpu.decodes_on_device and not rows:
            return InferenceRequest(None, fut, loop, encoded=encoded[j % len(encoded)])
        return InferenceRequest(inputs[j % len(inputs)], fut, loop)

    try:
        # one round first, so that the clock starts on a warm thread
        warm = [loop.create_future() for _ in range(settings.max_batch_size)]
        for j, fut in enumerate(warm):
            gpu.submit(request(j, fut))
        await asyncio.gather(*warm)
        await _metrics_caught_up(metrics, len(warm))  # the GPU thread records a batch after resolving it
        batches0, images0 = gpu.batches, gpu.images
        busy0 = metrics.registry.get_sample_value("worker_inference_seconds_sum") or 0.0
        futures = [loop.create_future() for _ in range(count)]
        started = time.perf_counter()
        for j, fut in enumerate(futures):
            gpu.submit(request(j, fut))
        await asyncio.gather(*futures)
        wall = time.perf_counter() - started
        await _metrics_caught_up(metrics, len(warm) + count)
        busy = (metrics.registry.get_sample_value("worker_inference_seconds_sum") or 0.0) - busy0
        batches = gpu.batches - batches0
        phases = {ph: metrics.registry.get_sample_value("worker_gpu_phase_seconds_total", {"phase": ph})
                  for ph in ("decode", "enqueue", "prefetch", "decode_wait", "decode_thread", "wait")}
        return {"count": count, "images_per_s": count / wall, "wall_s": wall, "batches": batches,
                "gpu_phases_s": {k: round(v, 3) for k, v in phases.items() if v is not None},
                "mean_batch_size": (gpu.images - images0) / max(1, batches),
                "busy_fraction": busy / wall, "decodes_on_device": gpu.decodes_on_device}
    finally:
        await loop.run_in_executor(None, gpu.stop)
