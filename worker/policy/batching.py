"""Micro-batching policy: a batch closes when it is full or when its oldest item has waited long enough.

Pure logic on an injected clock (``now`` arguments), so the GPU thread's timing rules are unit-tested
with a fake clock rather than timed. The same rule as Triton's dynamic batcher with
``max_queue_delay_microseconds``: never hold a request longer than ``max_wait`` for company.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._items: deque[tuple[T, float]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        self._items.append((item, now))

    def deadline(self) -> float | None:
        """When the oldest waiting item must be sent, or None if nothing waits."""
        return self._items[0][1] + self.max_wait_s if self._items else None

    def ready(self, now: float) -> bool:
        if len(self._items) >= self.max_batch_size:
            return True
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def time_left(self, now: float) -> float | None:
        """How long the GPU thread may block waiting for more items (None: no limit, nothing waits)."""
        if len(self._items) >= self.max_batch_size:
            return 0.0
        deadline = self.deadline()
        return None if deadline is None else max(0.0, deadline - now)

    def take(self) -> list[tuple[T, float]]:
        """Remove and return the next batch (oldest first) with each item's arrival time."""
        n = min(len(self._items), self.max_batch_size)
        return [self._items.popleft() for _ in range(n)]
