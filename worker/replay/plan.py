"""Layer 3 of a replay: ``ReplayPlan``, the worker's ``Plan`` for a bounded range."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker import log
from worker.policy.rate import RateLimiter
from worker.replay.ranges import PartitionRange



class ReplayPlan:
    """Manual assignment under the replay group; done when every partition's position reached its end."""

    def __init__(self, topic: str, ranges: dict[int, PartitionRange], group_id: str,
                 rate: float | None = None) -> None:
        self.topic = topic
        self.group_id = group_id
        self.ranges = {TopicPartition(topic, p): r for p, r in sorted(ranges.items())}
        self.limiter = RateLimiter(rate) if rate else None
        self.resume_from: dict[TopicPartition, int] = {}  # where this run starts, after earlier runs' commits
        self.attached_at: float | None = None
        self.finished = False
        self._consumer: AIOKafkaConsumer | None = None
        self._passed: set[TopicPartition] = set()  # a record at or past the end was seen
        self._last: dict[TopicPartition, int] = {}  # highest accepted offset
        self._log = log.get("replay", group_id=group_id)

    def __getstate__(self) -> dict:
        """Pickled into the replay's intake process: without the logger and the consumer (process-local)."""
        state = dict(self.__dict__)
        state["_log"] = None
        state["_consumer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._log = log.get("replay", group_id=self.group_id)

    @property
    def total(self) -> int:
        """Offsets this run still has to cover (the whole range minus what earlier runs committed)."""
        return sum(r.end - self.resume_from.get(tp, r.start) for tp, r in self.ranges.items())

    @property
    def already_done(self) -> int:
        return sum(self.resume_from.get(tp, r.start) - r.start for tp, r in self.ranges.items())

    async def attach(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        tps = list(self.ranges)
        # Read the commits before assign(): assign + seek then run without an await in between, so
        # aiokafka's own committed-offset refresh cannot move the position we chose.
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        for tp, done in zip(tps, committed):
            r = self.ranges[tp]
            if done is not None and done > r.end:
                self._log.warning("replay group already committed past this range's end; nothing to do here "
                                  "(pass a new --replay-group or --run-id to process it again)",
                                  partition=tp.partition, committed=done, end=r.end)
            self.resume_from[tp] = min(r.end, max(r.start, done or 0))
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self.resume_from[tp])
        finished = [tp for tp in tps if self.resume_from[tp] >= self.ranges[tp].end]
        if finished:
            consumer.pause(*finished)  # nothing to fetch there
        self._consumer = consumer
        self.attached_at = time.monotonic()
        self._log.info("replay attached", total=self.total, already_done=self.already_done,
                       ranges={tp.partition: [self.resume_from[tp], r.end] for tp, r in self.ranges.items()})
        # No group rebalance with manual assignment: tell the worker itself (metrics, readiness).
        await listener.on_partitions_assigned(set(tps))

    def accept(self, tp: TopicPartition, offset: int) -> bool:
        r = self.ranges.get(tp)
        if r is None:
            return False
        if offset >= r.end:
            if tp not in self._passed:
                self._passed.add(tp)
                self._log.debug("partition reached its end", partition=tp.partition, end=r.end)
            if self._consumer is not None:
                self._consumer.pause(tp)  # stop fetching past the end (a backpressure resume may undo it)
            return False
        if offset < self.resume_from.get(tp, r.start):
            return False
        self._last[tp] = max(offset, self._last.get(tp, offset))
        return True

    def partition_done(self, tp: TopicPartition, position: int | None) -> bool:
        end = self.ranges[tp].end
        if self.resume_from.get(tp, self.ranges[tp].start) >= end or (position is not None and position >= end):
            return True
        # Offsets missing at the end of the range (compaction, transaction markers) are never delivered:
        # once a record past the end was seen, the partition is done when everything accepted is finished.
        if tp in self._passed:
            return tp not in self._last or (position is not None and position > self._last[tp])
        return False

    def complete(self, positions: dict[TopicPartition, int | None]) -> bool:
        if all(self.partition_done(tp, positions.get(tp)) for tp in self.ranges):
            self.finished = True
        return self.finished

    async def throttle(self, n: int) -> None:
        """Awaited by the consume loop before each message starts (``--rate``)."""
        if self.limiter is not None:
            await self.limiter.acquire(n)

