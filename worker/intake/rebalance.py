"""Rebalance hooks of the intake: assigned and revoked partitions (a part of Worker).

A mixin of ``worker.app.Worker``. aiokafka awaits these before it rejoins, so a revoke drains, flushes
and commits before any other member can own the partitions; an exception here is fatal (aiokafka would
only log it and rejoin half-released). ``_release`` says the order, step by step.
"""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from worker.intake.commit import BROKER_TIMEOUT_S


class RebalanceMixin:
    """Needs from Worker: settings, metrics, tracker, publisher, committer, consumer, backpressure, health,
    exactly_once, commit, fail, _tasks_by_tp, _revoking, _drop_held, _describe, _log."""

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """aiokafka only logs a listener's exception and carries on: here it is fatal instead."""
        try:
            self.metrics.rebalances.labels("assigned").inc()
            for tp in assigned:
                # A new ownership: no state of an earlier one may survive (revoke forgets, but a lost
                # membership can skip straight here on some paths).
                leftover = self._tasks_by_tp.get(tp, set())
                for task in leftover:
                    task.cancel()
                self.tracker.forget(tp)
                if self.exactly_once:
                    self.publisher.forget(tp)
            self._drop_held(assigned)
            self.health.joined = True
            if self.backpressure.paused and assigned:
                self.consumer.pause(*assigned)  # aiokafka forgets pauses on reassignment
            self._log.info("partitions assigned",
                           partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        except Exception as exc:  # noqa: BLE001
            self._log.exception("partition assignment hook failed")
            self.fail(exc)

    async def _on_revoked(self, revoked: set[TopicPartition], lost: bool = False) -> None:
        try:
            self._drop_held(revoked)  # fetched, never started: the next owner reads them again
            await self._release(revoked, lost)
        except Exception as exc:  # noqa: BLE001 - aiokafka would log it and rejoin half-released
            self._log.exception("partition revoke hook failed")
            self.fail(exc)
        finally:
            self._revoking -= revoked

    async def _on_lost(self, lost: set[TopicPartition]) -> None:
        """The membership is gone (the librdkafka consumer's session timed out; aiokafka has no such
        call): the partitions may have another owner already, and a commit of ours would be refused."""
        await self._on_revoked(lost, lost=True)

    async def _release(self, revoked: set[TopicPartition], lost: bool = False) -> None:
        """Wait (bounded) for the revoked partitions' in-flight work, cut the rest, flush, commit, let go.
        ``lost``: steps 1, 3 and 6 only (cut at once, no flush, no commit), the membership being gone.

        1. no new work for them: aiokafka returns no records during a rebalance, and ``_start_message``
           refuses partitions in ``_revoking`` (the consume loop may sit in an await with a fetched batch);
        2. wait up to ``rebalance_timeout_s`` for their message tasks;
        3. cancel what is still running: those offsets stay uncommitted and the next owner redoes them;
        4. flush the producer (bounded), so that every record of ours for these partitions is on the
           broker before we let go: after the rebalance none of ours can land behind the next owner's
           commits;
        5. commit the finished prefix (bounded);
        6. forget them: their generation ends, so a late ``finish`` cannot move a later ownership.
        """
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc()
        self._revoking |= revoked
        tasks = set().union(*(self._tasks_by_tp.get(tp, set()) for tp in revoked)) if revoked else set()
        if tasks and not lost:
            _, tasks = await asyncio.wait(tasks, timeout=self.settings.rebalance_timeout_s)
        cut = self._describe(tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if revoked and not lost:
            try:
                await asyncio.wait_for(self.publisher.flush(), timeout=BROKER_TIMEOUT_S)
            except (KafkaError, asyncio.TimeoutError) as exc:
                self._log.warning("producer flush on revoke failed", error=f"{type(exc).__name__}: {exc}")
        if not lost:
            await self.commit(revoked)
        self.committer.forget_lag(revoked)
        for tp in revoked:
            self.tracker.forget(tp)
            if self.exactly_once:
                self.publisher.forget(tp)
            self._tasks_by_tp.pop(tp, None)
        self._log.info("partitions lost" if lost else "partitions revoked",
                       partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
                       unfinished_left_uncommitted=sum(len(v) for v in cut.values()), cut_offsets=cut or None)
