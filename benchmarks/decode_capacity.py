"""Decode capacity: images per second through the decode stage alone (``decode_message``: header checks,
JPEG decode, colour conversion and resize for every model of the pipeline), on 1 thread and on N; and,
for decoder=nvimgcodec, nvImageCodec + the resize kernel into device rows, per batch (``threads`` 0)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from benchmarks.own_thread import on_own_thread
from worker.decode.message import decode_message, inspect_message
from worker.models.spec import PipelineSpec
from worker.settings import Settings


def decode_capacity(images: Sequence[bytes], pipeline: PipelineSpec, settings: Settings,
                    threads: Sequence[int], decoders: Sequence[str] = ("cpu", "cpu-reduced"),
                    per_thread: int = 150) -> list[dict]:
    rows = []
    for decoder in decoders:
        reduced = decoder == "cpu-reduced"

        def one(i: int, reduced: bool = reduced) -> None:
            decode_message(images[i % len(images)], None, pipeline, settings.max_bytes, settings.max_pixels, reduced)

        for t in sorted(set(threads)):
            n = per_thread * t
            with ThreadPoolExecutor(t, thread_name_prefix="bench-decode") as pool:
                list(pool.map(one, range(min(n, 4 * t))))  # warm-up: threads started, caches filled
                started = time.perf_counter()
                list(pool.map(one, range(n), chunksize=8))
                wall = time.perf_counter() - started
            rows.append({"decoder": decoder, "threads": t, "images": n, "images_per_s": n / wall})
    return rows


def device_decode_capacity(images: Sequence[bytes], pipeline: PipelineSpec, settings: Settings, batch: int,
                           min_s: float = 2.0) -> list[dict]:
    """decoder=nvimgcodec alone: batches of ``batch`` images decoded by nvImageCodec and resized into
    device rows for every model, one synchronize per batch (what the GPU thread adds per batch before
    inference). Runs on a thread of its own that takes the device like the GPU thread."""
    return [on_own_thread(lambda: _device_decode(images, pipeline, settings, batch, min_s), "bench-gpu-decode")]


def _device_decode(images: Sequence[bytes], pipeline: PipelineSpec, settings: Settings, batch: int,
                   min_s: float) -> dict:
    from worker.engines import create_runtime
    from worker.decode.nvimgcodec import NvImageCodecDecoder

    runtime = create_runtime(settings.replace(device="cuda"))
    runtime.start()
    try:
        rows = [runtime.device_buffer(batch * int(np.prod(m.preprocess.hwc_shape)), f"{m.name} rows")
                for m in pipeline.models]
        engines = [SimpleNamespace(spec=m, device_input=buf.ptr) for m, buf in zip(pipeline.models, rows)]
        decoder = NvImageCodecDecoder(runtime, engines, batch, pipeline, settings.max_bytes, settings.max_pixels)
        encoded = [inspect_message(b, None, settings.max_bytes, settings.max_pixels) for b in images]
        batches = [[encoded[(k * batch + j) % len(encoded)] for j in range(batch)] for k in range(8)]
        try:
            decoder.warm_up()
            count, started = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - started < min_s:
                kept, rejected = decoder.decode(batches[(count // batch) % len(batches)])
                runtime.synchronize()
                count += batch
            wall = time.perf_counter() - started
            return {"decoder": "nvimgcodec", "threads": 0, "batch_size": batch, "images": count,
                    "images_per_s": count / wall, "fallbacks": decoder.fallbacks, "rejected": len(rejected)}
        finally:
            decoder.close()
    finally:
        runtime.stop()
