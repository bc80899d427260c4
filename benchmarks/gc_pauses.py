"""Garbage-collector pauses in this process while a run is measured: every collection holds the GIL, so
a long one stalls the event loop, the decode threads' Python parts and the GPU thread's batch at once."""

from __future__ import annotations

import gc
import time
from typing import Self


class GcPauses:
    def __init__(self) -> None:
        self._started = 0.0
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.setdefault(info["generation"], []).append(time.perf_counter() - self._started)

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        out = {}
        for gen, values in sorted(self.pauses.items()):
            out[f"gen{gen}"] = {"count": len(values), "total_ms": round(sum(values) * 1000, 3),
                                "max_ms": round(max(values, default=0.0) * 1000, 3)}
        return out
