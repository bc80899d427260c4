"""Decode capacity: images per second through the decode stage alone (``decode_message``: header checks,
JPEG decode, colour conversion and resize for every model of the pipeline), on 1 thread and on N."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from worker.flow.decode import decode_message
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
