"""Which finished results form the next transaction (processing_guarantee=exactly-once).

With exactly-once, a message's output (its result, or its DLQ record) is not sent when it is ready:
outside a transaction nothing may be written. It is *staged* here, under its input's partition and
offset, and the ``OffsetTracker`` marks the offset finished. Messages finish out of order (micro-batches,
DLQ records, partitions mixed), but a transaction commits one position per partition, meaning "every
offset below is done, and its output is in this transaction or an earlier one". So a transaction takes,
per partition, exactly the staged outputs below the tracker's committable position (the end of the
contiguous finished prefix, ``OffsetTracker.to_commit``), in offset order; whatever is staged above it
waits for the offsets below to finish, and goes in a later transaction together with them.

Pure logic: no asyncio, no Kafka. ``Partition`` is any hashable key (aiokafka's TopicPartition); an
output is any object (worker.intake.transact uses (topic, Record)).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

Partition = Hashable


@dataclass(frozen=True)
class Transaction:
    """One commit cycle's content: the outputs to produce, in (partition, offset) order, and the input
    positions (next offset to read, per partition) committed with them."""

    outputs: tuple[tuple[Partition, int, Any], ...]  # (input partition, input offset, output)
    positions: Mapping[Partition, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.positions)


class StagedOutputs:
    """Outputs of finished messages, waiting for their transaction."""

    def __init__(self) -> None:
        self._parts: dict[Partition, dict[int, list[Any]]] = {}
        self._count = 0

    def stage(self, tp: Partition, offset: int, output: Any) -> None:
        """``output`` belongs to the input at ``tp``/``offset`` (a message may stage more than one: a result
        refused for its size is replaced by a DLQ record before the offset finishes, never after)."""
        self._parts.setdefault(tp, {}).setdefault(offset, []).append(output)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def take(self, positions: Mapping[Partition, int]) -> Transaction:
        """Remove and return, per partition of ``positions``, every staged output of an offset below its
        position, ordered by partition and offset; what is staged at or above a position stays."""
        outputs: list[tuple[Partition, int, Any]] = []
        for tp in sorted(positions):  # TopicPartition is a tuple: (topic, partition) order
            staged = self._parts.get(tp)
            if not staged:
                continue
            below = sorted(o for o in staged if o < positions[tp])
            for offset in below:
                for output in staged.pop(offset):
                    outputs.append((tp, offset, output))
                    self._count -= 1
            if not staged:
                del self._parts[tp]
        return Transaction(tuple(outputs), dict(positions))

    def forget(self, tp: Partition) -> int:
        """The partition is no longer ours (revoke) or ours anew (assign): its staged outputs go (the next
        owner redoes their messages from the committed position). Returns how many went."""
        staged = self._parts.pop(tp, {})
        gone = sum(len(v) for v in staged.values())
        self._count -= gone
        return gone


def plan_transaction(tracker: Any, staged: StagedOutputs, partitions: object = None) -> Transaction:
    """The next transaction: the tracker's forward-moving committable positions (of ``partitions``, or
    all) and the staged outputs below them. Empty (falsy) when no position moved."""
    positions = tracker.to_commit(partitions)
    if not positions:
        return Transaction(())
    return staged.take(positions)
