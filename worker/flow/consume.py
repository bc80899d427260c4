"""Consume stage: what to read (a plan), when to stop reading (backpressure), and rebalance hooks.

The fetch loop itself lives in worker.app, which owns the consumer; here are the pieces it is made of:

- ``Backpressure``: pure pause/resume policy with a high and a low water mark. Pausing (rather than not
  polling) keeps the group membership alive: aiokafka evicts a member whose ``getmany`` calls stop for
  ``max_poll_interval_ms``.
- ``LivePlan``: the live worker subscribes to the input topic as a group member. A replay uses another
  plan (worker.replay.ReplayPlan: manual assignment, bounded ranges, optional rate limit) with the same
  three methods, so both run the same pipeline.
- ``RebalanceHooks``: aiokafka's listener, forwarding to the worker, which drains and commits on revoke.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition


class Backpressure:
    def __init__(self, high: int, low: int) -> None:
        self.high = high
        self.low = min(low, high)
        self.paused = False

    def update(self, in_flight: int) -> str | None:
        """Return "pause" or "resume" when the state flips, else None."""
        if not self.paused and in_flight >= self.high:
            self.paused = True
            return "pause"
        if self.paused and in_flight <= self.low:
            self.paused = False
            return "resume"
        return None

    def room(self, in_flight: int) -> int:
        """How many more records one fetch may return without overshooting the high mark."""
        return max(0, self.high - in_flight)


class Plan(Protocol):
    """What to consume and when the work is over. A plan may also define ``async def throttle(n)``,
    which the consume loop awaits before each accepted message starts (a rate limit: replay --rate)."""

    group_id: str

    async def attach(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        """Subscribe or assign, and position the consumer."""

    def accept(self, tp: TopicPartition, offset: int) -> bool:
        """Whether a fetched record is part of the work (a replay drops records past its end)."""

    def complete(self, positions: dict[TopicPartition, int | None]) -> bool:
        """Whether the work is over, given each partition's committable position."""


class LivePlan:
    def __init__(self, topic: str, group_id: str) -> None:
        self.topic = topic
        self.group_id = group_id

    async def attach(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        consumer.subscribe([self.topic], listener=listener)

    def accept(self, tp: TopicPartition, offset: int) -> bool:
        return True

    def complete(self, positions: dict[TopicPartition, int | None]) -> bool:
        return False  # a live worker runs until told to stop


Hook = Callable[[set[TopicPartition]], Awaitable[Any]]


class RebalanceHooks(ConsumerRebalanceListener):
    """aiokafka awaits these before it rejoins, so the revoke hook can drain and commit in time."""

    def __init__(self, on_revoked: Hook, on_assigned: Hook) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(set(assigned))
