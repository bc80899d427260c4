"""Micro-batching policy: a batch closes when it is full or when its oldest item has waited long enough.

Pure logic on an injected clock (``now`` arguments), so the GPU thread's timing rules are unit-tested
with a fake clock rather than timed. The same rule as Triton's dynamic batcher with
``max_queue_delay_microseconds``: never hold a request longer than ``max_wait`` for company.

With ``kind`` (a function of the item), a batch is "full" when the items of one kind fill it, and such a
batch holds that kind only; a batch closed by the deadline takes the oldest items whatever their kind, as
without ``kind``. So kinds are kept apart only where it costs no batch size and no extra wait. Why: on the
GPU thread a batch with any JPEG decoded on the card waits for the inference before it inside
nvImageCodec, while a batch of CPU-decoded rows does not (docs/benchmarks.md, runs 10-13).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_batch_size: int, max_wait_s: float,
                 kind: Callable[[T], Hashable] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self._kind = kind
        self._items: deque[tuple[T, float]] = deque()
        self._counts: Counter[Hashable] = Counter()  # items per kind (with ``kind``)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float) -> None:
        self._items.append((item, now))
        if self._kind is not None:
            self._counts[self._kind(item)] += 1

    def full(self) -> bool:
        """A full batch can be taken now (of one kind, with ``kind``)."""
        if self._kind is None:
            return len(self._items) >= self.max_batch_size
        return any(n >= self.max_batch_size for n in self._counts.values())

    def deadline(self) -> float | None:
        """When the oldest waiting item must be sent, or None if nothing waits."""
        return self._items[0][1] + self.max_wait_s if self._items else None

    def ready(self, now: float) -> bool:
        if self.full():
            return True
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def time_left(self, now: float) -> float | None:
        """How long the GPU thread may block waiting for more items (None: no limit, nothing waits)."""
        if self.full():
            return 0.0
        deadline = self.deadline()
        return None if deadline is None else max(0.0, deadline - now)

    def take(self) -> list[tuple[T, float]]:
        """Remove and return the next batch with each item's arrival time: a full batch of one kind (the
        kind whose oldest item came first) if there is one, else the oldest items, oldest first."""
        n = min(len(self._items), self.max_batch_size)
        full = [k for k, c in self._counts.items() if c >= self.max_batch_size] if self._kind is not None else []
        if not full:
            batch = [self._items.popleft() for _ in range(n)]
        else:
            kind = self._kind
            assert kind is not None
            first = next(k for item, _ in self._items if (k := kind(item)) in full)
            batch, rest = [], deque()
            for entry in self._items:
                if len(batch) < n and kind(entry[0]) == first:
                    batch.append(entry)
                else:
                    rest.append(entry)
            self._items = rest
        if self._kind is not None:
            self._counts.subtract(self._kind(item) for item, _ in batch)
        return batch
