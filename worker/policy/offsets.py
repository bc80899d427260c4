"""Which offsets are safe to commit: per partition, the end of the contiguous finished prefix.

Messages finish out of order (batches mix partitions, DLQ records are acknowledged on their own
schedule), but Kafka commits one number per partition meaning "everything below this is done". So the
tracker remembers, per partition, every offset handed out and not yet finished; the committable
position is the lowest unfinished offset, or one past the highest offset seen when none is pending.

Ownership of a partition comes and goes with rebalances, and work started under one ownership may still
be running when the partition comes back to us. So each partition's state has a *generation*: ``start``
returns it, ``finish`` must present it, and ``forget`` (on revoke) ends it. A task from an earlier
ownership that finishes late can then neither mark an offset of the new ownership done nor move its
committable position.

Two quantities bound what a stuck message costs (worker.app turns them into backpressure and a fatal
error): the *uncommitted span* (``span``), the finished entries kept behind a partition's lowest unfinished
offset (they wait in the heap until it finishes: without a bound, a message that never finishes lets it
grow by every message consumed after it), and the *oldest* unfinished message (``oldest``), stamped by
``start`` with the caller's clock.

Pure logic: no asyncio, no Kafka. ``Partition`` is any hashable key (aiokafka's TopicPartition).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

Partition = Hashable


class InFlight(NamedTuple):
    """One unfinished message: where it is and when ``start`` saw it (the caller's clock)."""

    partition: Partition
    offset: int
    started_at: float


@dataclass
class _PartitionState:
    pending: dict[int, float] = field(default_factory=dict)  # unfinished offset -> started_at
    heap: list[int] = field(default_factory=list)  # started offsets, finished ones pruned from the top only
    next_offset: int | None = None  # one past the highest offset started
    committed: int | None = None  # last position handed to the broker
    base: int | None = None  # first offset started: the position we began at, nothing to commit
    generation: int = 0  # which ownership of the partition this state belongs to


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[Partition, _PartitionState] = {}
        self._generations = 0

    # --- message life cycle --------------------------------------------------------------
    def start(self, tp: Partition, offset: int, now: float = 0.0) -> int | None:
        """A message was consumed and is now in flight (since ``now``, any clock the caller also gives
        ``oldest``'s reader). Returns the partition's generation, to hand back to ``finish``; or None
        when the offset must not be processed again (it is in flight already, or below the position
        committed by this ownership: a re-delivery of finished work)."""
        st = self._parts.get(tp)
        if st is None:
            self._generations += 1
            st = self._parts[tp] = _PartitionState(generation=self._generations)
        if offset in st.pending:
            return None
        if st.committed is not None and offset < st.committed:
            return None
        if st.base is None:
            st.base = offset
        st.pending[offset] = now
        heapq.heappush(st.heap, offset)
        if st.next_offset is None or offset + 1 > st.next_offset:
            st.next_offset = offset + 1
        return st.generation

    def finish(self, tp: Partition, offset: int, generation: int | None = None) -> bool:
        """The message's result or DLQ record was acknowledged by the broker. With ``generation`` (from
        ``start``), a finish from an ownership that has ended is ignored; returns whether it counted."""
        st = self._parts.get(tp)
        if st is None or (generation is not None and generation != st.generation) or offset not in st.pending:
            return False
        del st.pending[offset]
        return True

    def generation(self, tp: Partition) -> int | None:
        st = self._parts.get(tp)
        return st.generation if st else None

    # --- queries -------------------------------------------------------------------------
    def in_flight(self, tp: Partition | None = None) -> int:
        if tp is not None:
            st = self._parts.get(tp)
            return len(st.pending) if st else 0
        return sum(len(st.pending) for st in self._parts.values())

    def span(self, tp: Partition | None = None) -> int:
        """The uncommitted span: finished messages whose entries wait behind an unfinished lower offset
        of the same partition (of ``tp``, or of all partitions). 0 when every partition's finished work
        is a contiguous prefix."""
        parts = self._parts.values() if tp is None else [st for st in (self._parts.get(tp),) if st]
        total = 0
        for st in parts:
            self._prune(st)
            total += len(st.heap) - len(st.pending)
        return total

    def oldest(self) -> InFlight | None:
        """The unfinished message started longest ago (by ``start``'s ``now``), or None."""
        found: InFlight | None = None
        for tp, st in self._parts.items():
            for offset, started_at in st.pending.items():
                if found is None or started_at < found.started_at:
                    found = InFlight(tp, offset, started_at)
        return found

    @staticmethod
    def _prune(st: _PartitionState) -> None:
        while st.heap and st.heap[0] not in st.pending:
            heapq.heappop(st.heap)

    def committable(self, tp: Partition) -> int | None:
        """The offset to commit for ``tp`` (next message to read), or None if nothing finished."""
        st = self._parts.get(tp)
        if st is None or st.next_offset is None:
            return None
        self._prune(st)
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
        """The partition was revoked: drop its state and end its generation (a later owner, us included,
        starts from the broker's committed position with a new generation)."""
        self._parts.pop(tp, None)

    def partitions(self) -> list[Partition]:
        return list(self._parts)
