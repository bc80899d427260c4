"""Consume stage: what to read (a plan), when to stop reading (backpressure), and rebalance hooks.

The fetch loop itself lives in worker.app, which owns the consumer; here are the pieces it is made of:

- ``Backpressure``: pure pause/resume policy with a high and a low water mark for each of three bounds
  (``Load``): messages in flight, their value bytes, and the offset tracker's uncommitted span. It pauses
  when any one reaches its high mark and resumes when all are at or below their low marks (half the high
  one). ``admits`` decides whether one fetched message may start under the byte bound. Pausing (rather
  than not polling) keeps the group membership alive: aiokafka evicts a member whose ``getmany`` calls
  stop for ``max_poll_interval_ms``.
- ``ProgressClock``: time that counts against ``message_deadline_s``: it stands still while the broker
  is away or publishing is stalled (retried for as long as that lasts, by design).
- ``LivePlan``: the live worker subscribes to the input topic as a group member. A replay uses another
  plan (worker.replay.ReplayPlan: manual assignment, bounded ranges, optional rate limit) with the same
  three methods, so both run the same pipeline.
- ``RebalanceHooks``: aiokafka's listener, forwarding to the worker, which drains and commits on revoke.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition


@dataclass(frozen=True)
class Load:
    """What one intake holds now. ``messages``: started and not finished (the offset tracker's in-flight
    count). ``bytes``: value bytes of consumed messages not finished (started, or fetched and waiting
    for room). ``span``: finished messages the offset tracker keeps behind an unfinished lower offset."""

    messages: int = 0
    bytes: int = 0
    span: int = 0


class Backpressure:
    def __init__(self, high: int, low: int, high_bytes: int = 0, high_span: int = 0) -> None:
        self.high = high
        self.low = min(low, high)
        self.high_bytes = high_bytes  # 0: no byte bound
        self.low_bytes = high_bytes // 2
        self.high_span = high_span  # 0: no span bound
        self.low_span = high_span // 2
        self.paused = False
        self.reason = ""  # the bound that paused, or keeps it paused: messages, bytes or span

    def update(self, load: Load | int) -> str | None:
        """Return "pause" or "resume" when the state flips, else None (an int is a message count)."""
        if isinstance(load, int):
            load = Load(load)
        if not self.paused:
            reason = self.over(load)
            if reason:
                self.paused, self.reason = True, reason
                return "pause"
            return None
        holding = self.holding(load)
        if not holding:
            self.paused, self.reason = False, ""
            return "resume"
        self.reason = holding  # what keeps it paused now
        return None

    def holding(self, load: Load) -> str:
        """The first bound ``load`` is above the low mark of ("" if none: a paused consumer resumes)."""
        if load.messages > self.low:
            return "messages"
        if self.high_bytes and load.bytes > self.low_bytes:
            return "bytes"
        if self.high_span and load.span > self.low_span:
            return "span"
        return ""

    def over(self, load: Load) -> str:
        """The first bound ``load`` reaches ("" if none)."""
        if load.messages >= self.high:
            return "messages"
        if self.high_bytes and load.bytes >= self.high_bytes:
            return "bytes"
        if self.high_span and load.span >= self.high_span:
            return "span"
        return ""

    def room(self, in_flight: int) -> int:
        """How many more records one fetch may return without overshooting the high mark."""
        return max(0, self.high - in_flight)

    def admits(self, started: Load, size: int) -> bool:
        """Whether a fetched message of ``size`` value bytes may start, given what is started already:
        under the message bound, and its bytes fit under the byte bound, or no bytes are in flight at
        all (a message larger than the whole bound still goes through, alone: waiting for room that
        can never come would stop the worker for good)."""
        if started.messages >= self.high:
            return False
        if not self.high_bytes or started.bytes == 0:
            return True
        return started.bytes + size <= self.high_bytes


class ProgressClock:
    """Seconds during which the worker could make progress: it runs only while ``running`` (broker
    reachable, publishing not stalled) at each reading. Readings come often (every message start and
    every heartbeat), so a stretch is counted or not by the state at its end."""

    def __init__(self, now: float) -> None:
        self._last = now
        self.value = 0.0

    def read(self, now: float, running: bool) -> float:
        if running and now > self._last:
            self.value += now - self._last
        self._last = max(self._last, now)
        return self.value


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
    """aiokafka awaits these before it rejoins, so the revoke hook can drain and commit in time. A lost
    assignment (the librdkafka consumer's session timed out; aiokafka has no such call) goes to
    ``on_lost`` where given, else to ``on_revoked``."""

    def __init__(self, on_revoked: Hook, on_assigned: Hook, on_lost: Hook | None = None) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._on_lost = on_lost or on_revoked

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(set(assigned))

    async def on_partitions_lost(self, lost: Any) -> None:
        await self._on_lost(set(lost))
