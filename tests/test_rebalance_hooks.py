"""The intake's rebalance hooks (worker.intake.rebalance): a revoke waits, flushes and commits; a lost
assignment (the librdkafka consumer's session timed out) cuts at once and commits nothing.

Plain calls on a stand-in worker; the hooks against real brokers are in tests/test_faults.py (broker
stopped, second worker joining and leaving) and tests/test_rdkafka_consumer.py.
"""

from __future__ import annotations

import asyncio
import types

import pytest
from aiokafka import TopicPartition

from worker.app import Worker
from worker.metrics import Metrics
from worker.policy.offsets import OffsetTracker

TP = TopicPartition("images", 0)


def _worker(calls: list[str]) -> types.SimpleNamespace:
    async def flush() -> None:
        calls.append("flush")

    async def commit(partitions) -> bool:
        calls.append(f"commit {sorted(tp.partition for tp in partitions)}")
        return True

    worker = types.SimpleNamespace(
        metrics=Metrics(), tracker=OffsetTracker(), _revoking=set(), _tasks_by_tp={}, exactly_once=False,
        settings=types.SimpleNamespace(rebalance_timeout_s=3600.0), publisher=types.SimpleNamespace(flush=flush),
        committer=types.SimpleNamespace(forget_lag=lambda tps: calls.append("forget lag")),
        _describe=lambda tasks: {"images:0": [7]} if tasks else {}, commit=commit, _drop_held=lambda tps: None,
        fail=lambda exc: calls.append(f"fail {exc}"),
        _log=types.SimpleNamespace(info=lambda event, **kw: calls.append(event), warning=lambda *a, **k: None,
                                   exception=lambda *a, **k: None))
    for name in ("_on_revoked", "_release"):  # the hooks call each other through self
        setattr(worker, name, types.MethodType(getattr(Worker, name), worker))
    return worker


def _kinds(worker) -> dict[str, float]:
    return {s.labels["kind"]: s.value for m in worker.metrics.registry.collect() if m.name == "worker_rebalances"
            for s in m.samples if s.name.endswith("_total")}


@pytest.mark.timeout(60)  # a hook that waited for the work would wait rebalance_timeout_s, an hour
async def test_a_lost_assignment_cuts_its_work_at_once_and_commits_nothing():
    calls: list[str] = []
    worker = _worker(calls)
    running = asyncio.create_task(asyncio.sleep(7200))  # a message still being inferred
    worker._tasks_by_tp[TP] = {running}
    worker.tracker.start(TP, 7, 0)
    await Worker._on_lost(worker, {TP})
    assert running.cancelled()
    assert calls == ["forget lag", "partitions lost"]  # no flush, no commit
    assert worker.tracker.in_flight() == 0 and TP not in worker._tasks_by_tp and not worker._revoking
    assert _kinds(worker) == {"lost": 1.0}


async def test_a_revoke_waits_for_its_work_then_flushes_and_commits():
    calls: list[str] = []
    worker = _worker(calls)
    finishing = asyncio.create_task(asyncio.sleep(0.2))
    worker._tasks_by_tp[TP] = {finishing}
    await Worker._on_revoked(worker, {TP})
    assert finishing.done() and not finishing.cancelled()
    assert calls == ["flush", "commit [0]", "forget lag", "partitions revoked"]
    assert _kinds(worker) == {"revoked": 1.0}
