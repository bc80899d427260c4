"""Which offsets are safe to commit: per partition, the end of the contiguous finished prefix.

Messages finish out of order (batches mix partitions, DLQ records are acknowledged on their own
schedule), but Kafka commits one number per partition meaning "everything below this is done". So the
tracker remembers, per partition, every offset handed out and not yet finished; the committable
position is the lowest unfinished offset, or one past the highest offset seen when none is pending.

Pure logic: no asyncio, no Kafka. ``Partition`` is any hashable key (aiokafka's TopicPartition).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

Partition = Hashable


@dataclass
class _PartitionState:
    pending: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # pending offsets, lazily pruned
    next_offset: int | None = None  # one past the highest offset started
    committed: int | None = None  # last position handed to the broker
    base: int | None = None  # first offset started: the position we began at, nothing to commit


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[Partition, _PartitionState] = {}

    # --- message life cycle --------------------------------------------------------------
    def start(self, tp: Partition, offset: int) -> None:
        """A message was consumed and is now in flight."""
        st = self._parts.setdefault(tp, _PartitionState())
        if offset in st.pending:
            return
        if st.committed is not None and offset < st.committed:
            # Re-delivery below the committed position (e.g. a seek back): already done.
            return
        if st.base is None:
            st.base = offset
        st.pending.add(offset)
        heapq.heappush(st.heap, offset)
        if st.next_offset is None or offset + 1 > st.next_offset:
            st.next_offset = offset + 1

    def finish(self, tp: Partition, offset: int) -> None:
        """The message's result or DLQ record was acknowledged by the broker."""
        st = self._parts.get(tp)
        if st is not None:
            st.pending.discard(offset)

    # --- queries -------------------------------------------------------------------------
    def in_flight(self, tp: Partition | None = None) -> int:
        if tp is not None:
            st = self._parts.get(tp)
            return len(st.pending) if st else 0
        return sum(len(st.pending) for st in self._parts.values())

    def committable(self, tp: Partition) -> int | None:
        """The offset to commit for ``tp`` (next message to read), or None if nothing finished."""
        st = self._parts.get(tp)
        if st is None or st.next_offset is None:
            return None
        while st.heap and st.heap[0] not in st.pending:
            heapq.heappop(st.heap)
        return st.heap[0] if st.heap else st.next_offset

    def to_commit(self, partitions: object = None) -> dict[Partition, int]:
        """Positions that moved forward since the last ``mark_committed``; never backwards."""
        out = {}
        for tp, st in self._parts.items():
            if partitions is not None and tp not in partitions:  # type: ignore[operator]
                continue
            pos = self.committable(tp)
            floor = st.committed if st.committed is not None else st.base
            if pos is not None and (floor is None or pos > floor):
                out[tp] = pos
        return out

    def mark_committed(self, positions: dict[Partition, int]) -> None:
        for tp, pos in positions.items():
            st = self._parts.setdefault(tp, _PartitionState())
            if st.committed is None or pos > st.committed:
                st.committed = pos

    def forget(self, tp: Partition) -> None:
        """The partition was revoked: drop its state (a later owner starts from the broker)."""
        self._parts.pop(tp, None)

    def partitions(self) -> list[Partition]:
        return list(self._parts)
