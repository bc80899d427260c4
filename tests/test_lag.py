"""`worker_consumer_lag_messages`: labelled by consumer group, only for owned partitions (issue 12).

A fake consumer stands in for aiokafka: the probe's lag round trip, the revoke hook's removal, the
pruning of partitions lost without a revoke, and the end taken from the fetch's high watermark where
the broker's end offset is short (the embedded tansu broker) are all plain calls.
"""

from __future__ import annotations

import types

from aiokafka import TopicPartition

from worker.app import Worker
from worker.intake.commit import Committer, lag
from worker.policy.offsets import OffsetTracker
from worker.health import HealthState
from worker.metrics import Metrics

T0, T1 = TopicPartition("images", 0), TopicPartition("images", 1)


class _Consumer:
    def __init__(self, assigned, ends, committed, highwater=None):
        self.assigned, self.ends, self._committed = set(assigned), ends, committed
        self._highwater = highwater or {}

    def assignment(self):
        return set(self.assigned)

    async def end_offsets(self, tps):
        return {tp: self.ends[tp] for tp in tps}

    async def committed(self, tp):
        return self._committed.get(tp)

    def highwater(self, tp):
        assert tp in self.assigned  # aiokafka asserts it too
        return self._highwater.get(tp)

    async def topics(self):
        return {"images"}

    async def commit(self, positions):
        pass


def _lag(metrics: Metrics, group: str, tp: TopicPartition) -> float | None:
    return metrics.registry.get_sample_value("worker_consumer_lag_messages",
                                             {"group": group, "topic": tp.topic, "partition": str(tp.partition)})


def _series(metrics: Metrics) -> set[tuple[str, str]]:
    return {(s.labels["group"], s.labels["partition"]) for m in metrics.registry.collect()
            if m.name == "worker_consumer_lag_messages" for s in m.samples}


def test_lag_takes_the_larger_end():
    assert lag(100, None, 40) == 60
    assert lag(21, 30, 20) == 10  # tansu: end offsets short, the fetch's high watermark right
    assert lag(100, 90, 100) == 0 and lag(5, None, 9) == 0


async def test_series_per_group_and_removed_on_revoke():
    metrics = Metrics()
    consumer = _Consumer({T0, T1}, {T0: 100, T1: 21}, {T0: 40, T1: 20}, highwater={T1: 30})
    live = Committer(lambda: consumer, OffsetTracker(), metrics, HealthState(), group="live")
    replay_consumer = _Consumer({T0}, {T0: 100}, {T0: 10})
    replay = Committer(lambda: replay_consumer, OffsetTracker(), metrics, HealthState(), group="live-replay-ab")
    await live.probe()
    await replay.probe()
    assert (_lag(metrics, "live", T0), _lag(metrics, "live", T1), _lag(metrics, "live-replay-ab", T0)) == (60, 10, 90)

    consumer.assigned = {T0}  # the revoke hook runs with the revoked partitions
    live.forget_lag({T1})
    assert _series(metrics) == {("live", "0"), ("live-replay-ab", "0")}
    live.forget_lag({T1})  # twice: no error
    await live.probe()
    assert _series(metrics) == {("live", "0"), ("live-replay-ab", "0")}


async def test_partitions_lost_without_a_revoke_are_pruned_at_the_next_probe():
    metrics = Metrics()
    consumer = _Consumer({T0, T1}, {T0: 10, T1: 10}, {T0: 5, T1: 5})
    committer = Committer(lambda: consumer, OffsetTracker(), metrics, HealthState(), group="g")
    await committer.probe()
    assert _series(metrics) == {("g", "0"), ("g", "1")}
    consumer.assigned = set()  # a lost membership: straight to an empty assignment
    await committer.probe()
    assert _series(metrics) == set()


async def test_the_workers_revoke_hook_removes_the_series():
    metrics = Metrics()
    consumer = _Consumer({T0, T1}, {T0: 10, T1: 10}, {T0: 5, T1: 5})
    tracker = OffsetTracker()
    committer = Committer(lambda: consumer, tracker, metrics, HealthState(), group="g")
    await committer.probe()

    async def flush():
        pass

    worker = types.SimpleNamespace(
        metrics=metrics, committer=committer, tracker=tracker, _revoking=set(), _tasks_by_tp={}, exactly_once=False,
        settings=types.SimpleNamespace(rebalance_timeout_s=1.0), publisher=types.SimpleNamespace(flush=flush),
        _describe=lambda tasks: {}, commit=committer.commit,
        _log=types.SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None))
    consumer.assigned = {T0}
    await Worker._release(worker, {T1})
    assert _series(metrics) == {("g", "0")}
