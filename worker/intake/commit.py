"""Commits and the broker probe: what is finished goes to the broker, and readiness knows whether it
answers.

Commit order (``Committer.commit``), as in Quix Streams:
  1. take, per assigned partition, the end of the contiguous finished prefix (OffsetTracker);
  2. every result below it was already acknowledged by the broker (finish() is called after the ack),
     so nothing needs flushing for it; on revoke and shutdown the producer is flushed anyway first;
  3. commit those positions (next offset to read), bounded in time; never backwards; a failed or timed
     out commit is retried on the next interval and never counted as done.

The probe is a round trip with its own timeout, apart from the commits: a commit waits for a group
coordinator for as long as it takes, and readiness must turn false meanwhile. It also measures lag, per
consumer group and owned partition: the end is the larger of the broker's end offset and the high
watermark of our last fetch (the embedded tansu broker answers end offsets with the start of the last
record batch + 1, but its fetches carry the true high watermark); a partition's series goes when the
partition does (``forget_lag`` on revoke, and any left over at the next probe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker import log
from worker.policy.offsets import OffsetTracker
from worker.health import HealthState
from worker.metrics import Metrics

BROKER_TIMEOUT_S = 5.0  # one probe, one commit or one flush waits this long for a broker that stalls
PROBE_INTERVAL_S = 1.0


def _names(positions: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}:{tp.partition}": o for tp, o in positions.items()}


def lag(end: int, highwater: int | None, committed: int) -> int:
    """Messages behind: the end is the larger of the broker's end offset and the last fetch's high watermark."""
    return max(0, max(end, highwater or 0) - committed)


class Committer:
    def __init__(self, consumer: Callable[[], AIOKafkaConsumer], tracker: OffsetTracker, metrics: Metrics,
                 health: HealthState, group: str = "") -> None:
        self._consumer = consumer  # a getter: the worker replaces its clients while it connects
        self.tracker = tracker
        self.metrics = metrics
        self.health = health
        self.group = group  # the lag metric's label
        self._lag_series: set[TopicPartition] = set()
        self._log = log.get("worker")

    async def commit(self, partitions: set[TopicPartition] | None = None) -> bool:
        """Commit the finished prefix of each assigned partition (of ``partitions`` if given).

        Bounded in time: a stalled broker must not hold a revoke or a shutdown past its grace period.
        Returns False when the commit failed or timed out; those positions are tried again next time.
        """
        consumer = self._consumer()
        assigned = consumer.assignment()
        scope = assigned if partitions is None else (partitions & assigned)
        positions = self.tracker.to_commit(scope)
        if not positions:
            return True
        try:
            await asyncio.wait_for(consumer.commit(positions), timeout=BROKER_TIMEOUT_S)
        except (KafkaError, asyncio.TimeoutError) as exc:
            self.metrics.commit_failures.inc()
            self._log.warning("commit failed; will retry", error=f"{type(exc).__name__}: {exc}",
                              positions=_names(positions))
            return False
        self.tracker.mark_committed(positions)
        self.metrics.commits.inc()
        self._log.debug("committed", positions=_names(positions))
        return True

    async def commit_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.commit()

    async def probe_loop(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def probe(self) -> None:
        """One broker round trip (end offsets of our partitions, for lag) with its own timeout."""
        try:
            await asyncio.wait_for(self._lag_round_trip(), timeout=BROKER_TIMEOUT_S)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            self.health.broker_state(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        else:
            self.health.broker_state(True)

    def forget_lag(self, partitions: set[TopicPartition]) -> None:
        """Remove the lag series of partitions no longer ours (revoked)."""
        for tp in partitions & self._lag_series:
            self.metrics.drop_lag(self.group, tp.topic, tp.partition)
        self._lag_series -= partitions

    async def _lag_round_trip(self) -> None:
        consumer = self._consumer()
        assigned = list(consumer.assignment())
        self.forget_lag(self._lag_series - set(assigned))  # a lost membership skips the revoke hook
        if not assigned:
            await consumer.topics()
            return
        ends = await consumer.end_offsets(assigned)
        for tp, end in ends.items():
            pos = self.tracker.committable(tp)
            committed = pos if pos is not None else await consumer.committed(tp) or 0
            if tp not in consumer.assignment():
                continue  # revoked while we asked: no series for it
            self.metrics.set_lag(self.group, tp.topic, tp.partition, lag(end, consumer.highwater(tp), committed))
            self._lag_series.add(tp)
