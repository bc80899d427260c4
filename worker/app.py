"""Wires the stages: consume → decode pool → GPU thread → publish → offsets → commit.

One asyncio task per partition per poll carries that poll's records of the partition through every
stage (worker.intake.handle: per poll, not per record); the messages in flight are bounded by
``max_in_flight``, their value bytes by ``max_in_flight_bytes``, and the finished entries the
offset tracker keeps behind an unfinished offset by ``max_uncommitted_span`` (backpressure pauses the
partitions at any of them), so every queue between stages is bounded too. A message unfinished past
``message_deadline_s`` (of progress time: not while the broker is away) is a fatal error. A message is
finished only when the broker acknowledged its result or its DLQ record; only finished offsets are
committed.

The stages of one message live in worker.intake.handle; commits (and their order) and the broker probe
in worker.intake.commit; the Kafka clients (made, connected with retries, closed within bounds) in
worker.intake.clients; the rebalance hooks in worker.intake.rebalance (both mixins of ``Worker``). This
module is the life cycle around them.

Revoke (``_on_revoked``, awaited by aiokafka before it rejoins, so before any other member can own the
partitions): no new records for them (aiokafka returns none during a rebalance) → wait up to
``rebalance_timeout_s`` for their in-flight messages → cancel the rest (left uncommitted, redone by the
next owner) → flush the producer, so that no record of ours for them lands after we let go → commit →
forget them (their generation ends: a late ``finish`` cannot touch a later ownership). A lost
assignment (``_on_lost``: the librdkafka consumer's session timed out, the membership is gone) cuts
their in-flight messages at once and commits nothing: no commit of a lost member is accepted.

Shutdown (SIGTERM/SIGINT, or the end of a replay; a stop while still connecting ends the attempt at
once and only closes the clients): stop fetching → wait up to ``drain_timeout_s`` for
in-flight messages → cancel the rest (logged as cut, left uncommitted) → flush the producer → commit →
leave the group → stop the GPU thread. A second signal exits at once, committing nothing more. A fatal
error (dead GPU thread, crashed stage task) takes the same path without the wait and exits non-zero.

Exactly-once (``processing_guarantee``): the same life cycle, with commits that are transactions of the
finished prefix's results and its offsets (worker.intake.transact); a revoke and the shutdown end with
one, and a message counts as in flight until its transaction commits.

Broker trouble: the clients are started with retries and backoff (the worker waits for a broker that is
not there yet instead of crash-looping); a probe with its own timeout marks readiness false while the
broker does not answer; publishing retries with backoff; commits are bounded and retried. Nothing of it
spins: every retry sleeps.
"""

from __future__ import annotations

import asyncio
import time
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from worker import codecs, log
from worker.intake.commit import BROKER_TIMEOUT_S, Committer
from worker.errors import FatalError
from worker.intake.consume import Backpressure, LivePlan, Load, Plan, ProgressClock, RebalanceHooks
from worker.gpu.thread import GpuThread
from worker.intake.handle import MessageHandler
from worker.intake.pool import decode_pool
from worker.policy.offsets import OffsetTracker
from worker.health import HealthState
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.intake.clients import ClientsMixin
from worker.intake.rebalance import RebalanceMixin
from worker.intake.transact import TransactionalCommitter
from worker.settings import ProcessingGuarantee, Settings

HEARTBEAT_S = 1.0  # the loop's beat for /healthz, and how often message_deadline_s is checked


class Worker(ClientsMixin, RebalanceMixin):
    def __init__(self, settings: Settings, pipeline: PipelineSpec, gpu: GpuThread,
                 metrics: Metrics | None = None, plan: Plan | None = None,
                 health: HealthState | None = None, intake_index: int = 1,
                 before_join: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.settings = settings
        # awaited once the clients are connected, before the consumer subscribes (joins its group); what it
        # returns is not used: an intake process waits there for the pod's other intakes
        # (worker.intake.process.join_together)
        self._before_join = before_join
        self.intake_index = intake_index  # part of the transactional id (exactly-once)
        self.exactly_once = settings.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
        self.pipeline = pipeline
        self.gpu = gpu
        self.metrics = metrics or Metrics()
        self.plan = plan or LivePlan(settings.input_topic, settings.group_id)
        self._throttle = getattr(self.plan, "throttle", None)  # optional Plan hook: replay --rate
        self.health = health or HealthState()
        self.tracker = OffsetTracker()
        self.backpressure = Backpressure(settings.max_in_flight, settings.resume_threshold,
                                         settings.max_in_flight_bytes, settings.uncommitted_span_bound)
        self._held: deque[tuple[TopicPartition, Any]] = deque()  # fetched, waiting for byte room (FIFO)
        self._held_bytes = 0
        self.in_flight_bytes = 0  # value bytes of live message tasks
        self.peak_in_flight_bytes = 0
        self._clock = ProgressClock(time.monotonic())  # what message_deadline_s counts
        self._connected = False
        self.exit_code = 0
        self.counts = {"consumed": 0, "published": 0, "dead_lettered": 0, "failed": 0}
        self._tasks: set[asyncio.Task] = set()
        self._tasks_by_tp: dict[TopicPartition, set[asyncio.Task]] = {}
        # started (in the tracker) and not yet in a task: launched as one task per partition (_launch)
        self._starting: dict[TopicPartition, list[tuple[Any, int]]] = {}
        self._revoking: set[TopicPartition] = set()
        self._stop = asyncio.Event()
        self._signals = 0
        self._fatal: BaseException | None = None
        if self.exactly_once:  # commits are transactions of results and offsets (worker.intake.transact)
            self.committer: Committer = TransactionalCommitter(
                lambda: self.consumer, lambda: self.publisher, self.tracker, self.metrics, self.health,
                self.plan.group_id, self.fail)
        else:
            self.committer = Committer(lambda: self.consumer, self.tracker, self.metrics, self.health,
                                       group=self.plan.group_id)
        self._log = log.get("worker")

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._decode_pool = decode_pool(self.settings.decode_threads, self.settings.decode_nice)
        self._install_signals()
        self._new_clients()
        stages: list[asyncio.Task] = []
        try:
            if await self._connect() and (self._before_join is None
                                          or await self._unless_stopped(self._before_join())):
                self._connected = True
                self.handler = MessageHandler(self.settings, self.pipeline, self.gpu, self.publisher,
                                              self.tracker, self.metrics, self.counts, self._decode_pool,
                                              self.fail)
                hooks = RebalanceHooks(self._on_revoked, self._on_assigned, self._on_lost)
                await self.plan.attach(self.consumer, hooks)
                interval = self.settings.commit_interval_ms / 1000.0
                for name, coro in (("consume", self._consume_loop()),
                                   ("commit", self.committer.commit_loop(interval)),
                                   ("probe", self.committer.probe_loop()),
                                   ("heartbeat", self._heartbeat_loop())):
                    task = asyncio.create_task(coro, name=name)
                    task.add_done_callback(self._stage_done)
                    stages.append(task)
                await self._stop.wait()
        except KafkaError as exc:
            self.fail(exc)
        finally:
            await self._shutdown(stages)
        return self.exit_code

    def request_stop(self) -> None:
        self._stop.set()

    def fail(self, exc: BaseException) -> None:
        """A fatal error: stop without draining, exit non-zero. Safe to call from any thread."""
        exc = codecs.explain(exc)  # an undecompressable input batch: say what to install
        def _set() -> None:
            if self._fatal is None:
                self._fatal = exc
                self.exit_code = 1
                self._log.error("fatal error; stopping", error=f"{type(exc).__name__}: {exc}")
            self._stop.set()
        try:
            if asyncio.get_running_loop() is self._loop:
                _set()
                return
        except RuntimeError:
            pass
        self._loop.call_soon_threadsafe(_set)

    def _stage_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("stage crashed", stage=task.get_name(), error=f"{type(exc).__name__}: {exc}")
            self.fail(exc)

    def _install_signals(self) -> None:
        def on_signal(signum: int) -> None:
            self._signals += 1
            if self._signals > 1:
                self._log.error("second signal: exiting now without committing unfinished work",
                                in_flight=self.tracker.in_flight())
                os._exit(130)
            self._log.info("signal received; draining", signal=signal.Signals(signum).name,
                           in_flight=self.tracker.in_flight())
            self.request_stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, on_signal, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests run workers in threads)
                pass

    async def _shutdown(self, stages: list[asyncio.Task]) -> None:
        """The bounded waits, in order (docs/deploy.md adds them up for the pod's grace period): drain
        ``drain_timeout_s`` (0.5 s after a fatal error), cancelled tasks 5 s, producer flush 10 s, commit
        5 s, consumer close 10 s (+ 5 s when it stops half way), producer close 10 s."""
        for task in stages:
            if task.get_name() == "consume":
                task.cancel()
        if not self._connected:  # stopped (or failed) while connecting: nothing consumed, nothing to commit
            await self._close_clients()
            await self._finish_shutdown()
            return
        if self._held:
            self._log.info("fetched messages not started; left uncommitted", count=len(self._held),
                           bytes=self._held_bytes)
            self._held.clear()
            self._held_bytes = 0
        timeout = 0.5 if self._fatal is not None else self.settings.drain_timeout_s
        pending = set(self._tasks)
        done: set[asyncio.Task] = set()
        if pending:
            done, pending = await asyncio.wait(pending, timeout=timeout)
        cut = self._describe(pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._log.info("drained", finished=len(done), cut=len(pending), cut_offsets=cut or None,
                       drain_timeout_s=timeout)
        await self._bounded("producer flush", self.publisher.flush(), 10)
        await self._bounded("final commit", self.commit(), BROKER_TIMEOUT_S + 1)
        for task in stages:
            task.cancel()
        await asyncio.gather(*stages, return_exceptions=True)
        await self._close_clients()
        await self._finish_shutdown()

    async def _finish_shutdown(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await self._loop.run_in_executor(None, self.gpu.stop)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._log.info("stopped", exit_code=self.exit_code, **self.counts)

    def _describe(self, tasks: set[asyncio.Task]) -> dict[str, list[int]]:
        """{"topic:partition": [offsets]} of message tasks, for the log of what was cut."""
        out: dict[str, list[int]] = {}
        for tp, owned in self._tasks_by_tp.items():
            for task in owned & tasks:
                out.setdefault(f"{tp.topic}:{tp.partition}", []).extend(getattr(task, "offsets", ()))
        return {k: sorted(v) for k, v in out.items()}

    # --- consume -------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        """Poll, start what fits, pause at any bound (``Backpressure``), keep polling while paused.

        A poll returns up to the message room, whatever their bytes: a fetched message whose bytes do not
        fit under ``max_in_flight_bytes`` waits in ``_held`` (first in, first out, so each partition's
        offsets still start in order) and counts towards the pause, which stops more fetching; it starts
        as room comes, or alone when nothing else is in flight."""
        while True:
            self._start_held()
            self._launch()
            load = self._load()
            flip = self.backpressure.update(load)
            if flip is not None:
                self._apply_pause()
                self._log.info("backpressure", action=flip, bound=self.backpressure.reason or None,
                               in_flight=load.messages, in_flight_bytes=load.bytes, uncommitted_span=load.span)
            room = self.backpressure.room(load.messages) if not self._held else 0
            polled_at = time.monotonic()
            batches = await self.consumer.getmany(timeout_ms=20 if self._held else 100, max_records=max(1, room))
            self.metrics.poll_wait_seconds.inc(time.monotonic() - polled_at)
            self.metrics.poll_records.observe(sum(len(m) for m in batches.values()))
            for tp, messages in batches.items():
                for msg in messages:
                    if not self.plan.accept(tp, msg.offset):
                        continue
                    if self._throttle is not None:
                        self._launch()  # nothing started waits in _starting across an await
                        await self._throttle(1)
                    self._offer(tp, msg)
            self._launch()
            self._set_gauges()
            if self.plan.complete(self._positions()):
                self._log.info("plan complete")
                self.request_stop()
                return

    def _load(self) -> Load:
        staged = len(self.publisher.staged) if self.exactly_once else 0  # finished, not yet committed
        return Load(self.tracker.in_flight() + staged, self.in_flight_bytes + self._held_bytes, self.tracker.span())

    def _started(self) -> Load:
        return Load(self.tracker.in_flight(), self.in_flight_bytes)

    def _offer(self, tp: TopicPartition, msg: Any) -> None:
        """Start a fetched message now if it fits (and none waits before it), else hold it."""
        size = _size(msg)
        if not self._held and self.backpressure.admits(self._started(), size):
            self._start_message(tp, msg)
            return
        self._held.append((tp, msg))
        self._held_bytes += size

    def _start_held(self) -> None:
        while self._held:
            tp, msg = self._held[0]
            size = _size(msg)
            if not self.backpressure.admits(self._started(), size):
                return
            self._held.popleft()
            self._held_bytes -= size
            self._start_message(tp, msg)

    def _drop_held(self, partitions: set[TopicPartition]) -> None:
        """Forget held messages of partitions we let go (revoke) or own anew (assign: the broker
        delivers again from the committed position). Never of a partition that stays ours: the
        consumer's position is past them, nobody would deliver them again."""
        if not any(tp in partitions for tp, _ in self._held):
            return
        kept = deque((tp, m) for tp, m in self._held if tp not in partitions)
        self._held = kept
        self._held_bytes = sum(_size(m) for _, m in kept)

    def _set_gauges(self) -> None:
        self.metrics.in_flight.set(self.tracker.in_flight())
        self.metrics.in_flight_bytes.set(self.in_flight_bytes)
        self.metrics.waiting_bytes.set(self._held_bytes)
        self.metrics.uncommitted_span.set(self.tracker.span())

    def _start_message(self, tp: TopicPartition, msg: Any) -> bool:
        """Start one message, unless its partition is no longer ours (a revoke ran while the loop
        awaited) or the tracker says the offset is already in flight or committed. It joins its
        partition's batch of this poll, which ``_launch`` turns into a task before the loop awaits."""
        if tp in self._revoking or tp not in self.consumer.assignment():
            return False
        generation = self.tracker.start(tp, msg.offset, self._progress())
        if generation is None:
            return False
        size = _size(msg)
        self.in_flight_bytes += size
        self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, self.in_flight_bytes)
        self._starting.setdefault(tp, []).append((msg, generation))
        return True

    def _launch(self) -> None:
        """One task per partition for the messages started since the last launch."""
        if not self._starting:
            return
        starting, self._starting = self._starting, {}
        n = 0
        for tp, items in starting.items():
            n += len(items)
            self._start_task(tp, items)
        self.counts["consumed"] += n
        self.metrics.consumed.inc(n)

    def _start_task(self, tp: TopicPartition, items: list[tuple[Any, int]]) -> asyncio.Task:
        size = sum(_size(m) for m, _ in items)
        task = asyncio.create_task(self.handler.handle_batch(tp, items))
        task.offsets = [m.offset for m, _ in items]  # type: ignore[attr-defined] - for the log of what was cut
        self._tasks.add(task)
        owned = self._tasks_by_tp.setdefault(tp, set())
        owned.add(task)

        def _done(t: asyncio.Task) -> None:
            # The messages' bytes go with their task, however it ended (finished, failed, cut).
            self.in_flight_bytes -= size
            self._tasks.discard(t)
            owned.discard(t)
        task.add_done_callback(_done)
        return task

    def _positions(self) -> dict[TopicPartition, int | None]:
        return {tp: self.tracker.committable(tp) for tp in self.consumer.assignment()}

    def _apply_pause(self) -> None:
        assigned = list(self.consumer.assignment())
        if self.backpressure.paused:
            self.consumer.pause(*assigned)
        else:
            self.consumer.resume(*assigned)
        self.metrics.paused.set(1 if self.backpressure.paused else 0)

    # --- commit and rebalance ------------------------------------------------------------
    async def commit(self, partitions: set[TopicPartition] | None = None) -> bool:
        return await self.committer.commit(partitions)

    async def _heartbeat_loop(self) -> None:
        """Proof of a responsive event loop for /healthz, independent of broker round trips; and the
        check of ``message_deadline_s``."""
        while True:
            self.health.loop_beat()
            self._check_deadline()
            await asyncio.sleep(HEARTBEAT_S)

    def _progress(self) -> float:
        """The progress clock: stands still while the broker is away or publishing is stalled, which the
        worker waits out by design (retries with backoff), so an outage does not trip the deadline."""
        return self._clock.read(time.monotonic(), self.health.broker_ok and self.health.publishing)

    def _check_deadline(self) -> None:
        """A message unfinished for ``message_deadline_s`` of progress time is a fatal error: nothing at
        or past its offset can be committed, and the span bound has paused its partitions by now."""
        oldest = self.tracker.oldest()
        age = self._progress() - oldest.started_at if oldest is not None else 0.0
        self.metrics.oldest_in_flight.set(age)
        self.metrics.uncommitted_span.set(self.tracker.span())
        limit = self.settings.message_deadline_s
        if oldest is None or not limit or age <= limit or self._fatal is not None:
            return
        tp = oldest.partition
        where = f"topic={getattr(tp, 'topic', tp)} partition={getattr(tp, 'partition', '?')} offset={oldest.offset}"
        self._log.error("message past its deadline", topic=getattr(tp, "topic", None),
                        partition=getattr(tp, "partition", None), offset=oldest.offset, age_s=round(age, 1),
                        message_deadline_s=limit, uncommitted_span=self.tracker.span(tp))
        self.fail(FatalError(
            f"message unfinished for {age:.0f}s, past message_deadline_s={limit:g} ({where}); nothing at or "
            f"past this offset can be committed, so the worker stops and the restart redoes it (a lost GPU "
            f"reply or a hung stage; raise message_deadline_s if such messages are legitimately slow)"))

    def _broker_trouble(self, trouble: bool) -> None:
        self.health.broker_state(not trouble)


def _size(msg: Any) -> int:
    """The bytes a message holds while in flight: its value (keys and headers are small)."""
    value = getattr(msg, "value", None)
    return len(value) if value else 0
