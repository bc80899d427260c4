"""Wires the stages: consume → decode pool → GPU thread → publish → offsets → commit.

One asyncio task per in-flight message carries it through every stage; the number of such tasks is
bounded by ``max_in_flight`` (backpressure pauses the partitions), so every queue between stages is
bounded too. A message is finished only when the broker acknowledged its result or its DLQ record;
only finished offsets are committed.

Commit order (``commit``), as in Quix Streams:
  1. take, per assigned partition, the end of the contiguous finished prefix (OffsetTracker);
  2. every result below it was already acknowledged by the broker (finish() is called after the ack),
     so nothing needs flushing for it; on shutdown the producer is flushed anyway first;
  3. commit those positions (next offset to read), bounded in time; never backwards; a failed or timed
     out commit is retried on the next interval and never counted as done.

Revoke (``_on_revoked``, awaited by aiokafka before it rejoins, so before any other member can own the
partitions): no new records for them (aiokafka returns none during a rebalance) → wait up to
``rebalance_timeout_s`` for their in-flight messages → cancel the rest (left uncommitted, redone by the
next owner) → flush the producer, so that no record of ours for them lands after we let go → commit →
forget them (their generation ends: a late ``finish`` cannot touch a later ownership).

Shutdown (SIGTERM/SIGINT, or the end of a replay): stop fetching → wait up to ``drain_timeout_s`` for
in-flight messages → cancel the rest (logged as cut, left uncommitted) → flush the producer → commit →
leave the group → stop the GPU thread. A second signal exits at once, committing nothing more. A fatal
error (dead GPU thread, crashed stage task) takes the same path without the wait and exits non-zero.

Broker trouble: the clients are started with retries and backoff (the worker waits for a broker that is
not there yet instead of crash-looping); a probe with its own timeout marks readiness false while the
broker does not answer; publishing retries with backoff; commits are bounded and retried. Nothing of it
spins: every retry sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker import log
from worker.errors import PoisonMessage, RetriableError, WorkerError
from worker.flow.consume import Backpressure, LivePlan, Plan, RebalanceHooks
from worker.flow.decode import decode_message
from worker.flow.gpu import GpuThread, InferenceRequest
from worker.flow.offsets import OffsetTracker
from worker.flow.publish import (Publisher, RecordTooLarge, Source, dlq_record, dlq_record_without_value,
                                 result_record)
from worker.health import HealthState
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.settings import Settings

BROKER_TIMEOUT_S = 5.0  # one probe, one commit or one flush waits this long for a broker that stalls
PROBE_INTERVAL_S = 1.0


class Worker:
    def __init__(self, settings: Settings, pipeline: PipelineSpec, gpu: GpuThread,
                 metrics: Metrics | None = None, plan: Plan | None = None,
                 health: HealthState | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.gpu = gpu
        self.metrics = metrics or Metrics()
        self.plan = plan or LivePlan(settings.input_topic, settings.group_id)
        self._throttle = getattr(self.plan, "throttle", None)  # optional Plan hook: replay --rate
        self.health = health or HealthState()
        self.tracker = OffsetTracker()
        self.backpressure = Backpressure(settings.max_in_flight, settings.resume_threshold)
        self.exit_code = 0
        self.counts = {"consumed": 0, "published": 0, "dead_lettered": 0, "failed": 0}
        self._tasks: set[asyncio.Task] = set()
        self._tasks_by_tp: dict[TopicPartition, set[asyncio.Task]] = {}
        self._revoking: set[TopicPartition] = set()
        self._stop = asyncio.Event()
        self._signals = 0
        self._fatal: BaseException | None = None
        self._log = log.get("worker")

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self._install_signals()
        self._new_clients()
        stages: list[asyncio.Task] = []
        try:
            if await self._connect():
                await self.plan.attach(self.consumer, RebalanceHooks(self._on_revoked, self._on_assigned))
                for name, coro in (("consume", self._consume_loop()), ("commit", self._commit_loop()),
                                   ("probe", self._probe_loop()), ("heartbeat", self._heartbeat_loop())):
                    task = asyncio.create_task(coro, name=name)
                    task.add_done_callback(self._stage_done)
                    stages.append(task)
                await self._stop.wait()
        except KafkaError as exc:
            self.fail(exc)
        finally:
            await self._shutdown(stages)
        return self.exit_code

    def _new_clients(self) -> None:
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            group_id=self.plan.group_id, client_id=s.client_id, enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset, session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms, fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes, fetch_max_wait_ms=s.fetch_max_wait_ms,
            **s.kafka_common())
        self.publisher = Publisher(
            AIOKafkaProducer(client_id=s.client_id, acks="all", linger_ms=s.producer_linger_ms,
                             max_request_size=s.producer_max_request_size, max_batch_size=1 << 20,
                             **s.kafka_common()),
            s.producer_max_pending, on_broker_trouble=self._broker_trouble)

    async def _connect(self, backoff: tuple[float, float] = (0.5, 10.0)) -> bool:
        """Start producer and consumer, retrying with backoff while the broker is unreachable or stalls
        (not ready meanwhile). Returns False if a stop came first."""
        delay = backoff[0]
        while True:
            try:
                await asyncio.wait_for(self.publisher.start(), timeout=30)
                await asyncio.wait_for(self.consumer.start(), timeout=30)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                self._broker_trouble(True)
                self._log.warning("broker unreachable; retrying", error=f"{type(exc).__name__}: {exc}",
                                  bootstrap_servers=self.settings.bootstrap_servers, retry_in_s=delay)
            else:
                self._broker_trouble(False)
                return True
            await self._close_clients()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            if self._stop.is_set():
                return False
            delay = min(delay * 2, backoff[1])
            self._new_clients()  # aiokafka clients are not restartable after a failed start

    async def _close_clients(self) -> None:
        for closer in (self.consumer.stop, self.publisher.stop):
            try:
                await asyncio.wait_for(closer(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - closing must go on
                self._log.warning("close failed", error=f"{type(exc).__name__}: {exc}")

    def request_stop(self) -> None:
        self._stop.set()

    def fail(self, exc: BaseException) -> None:
        """A fatal error: stop without draining, exit non-zero. Safe to call from any thread."""
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
        for task in stages:
            if task.get_name() == "consume":
                task.cancel()
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
        try:
            await asyncio.wait_for(self.publisher.flush(), timeout=10)
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._log.warning("producer flush failed", error=f"{type(exc).__name__}: {exc}")
        await self.commit()
        for task in stages:
            task.cancel()
        await asyncio.gather(*stages, return_exceptions=True)
        await self._close_clients()
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
                out.setdefault(f"{tp.topic}:{tp.partition}", []).append(getattr(task, "offset", -1))
        return {k: sorted(v) for k, v in out.items()}

    # --- consume -------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        while True:
            in_flight = self.tracker.in_flight()
            flip = self.backpressure.update(in_flight)
            if flip is not None:
                self._apply_pause()
                self._log.info("backpressure", action=flip, in_flight=in_flight)
            room = self.backpressure.room(in_flight)
            batches = await self.consumer.getmany(timeout_ms=100, max_records=max(1, room))
            for tp, messages in batches.items():
                for msg in messages:
                    if not self.plan.accept(tp, msg.offset):
                        continue
                    if self._throttle is not None:
                        await self._throttle(1)
                    self._start_message(tp, msg)
            self.metrics.in_flight.set(self.tracker.in_flight())
            if self.plan.complete(self._positions()):
                self._log.info("plan complete")
                self.request_stop()
                return

    def _start_message(self, tp: TopicPartition, msg: Any) -> asyncio.Task | None:
        """Start one message's task, unless its partition is no longer ours (a revoke ran while the
        loop awaited) or the tracker says the offset is already in flight or committed."""
        if tp in self._revoking or tp not in self.consumer.assignment():
            return None
        generation = self.tracker.start(tp, msg.offset)
        if generation is None:
            return None
        self.counts["consumed"] += 1
        self.metrics.consumed.inc()
        task = asyncio.create_task(self._handle(tp, msg, generation))
        task.offset = msg.offset  # type: ignore[attr-defined] - for the log of what a drain or revoke cut
        self._tasks.add(task)
        owned = self._tasks_by_tp.setdefault(tp, set())
        owned.add(task)

        def _done(t: asyncio.Task) -> None:
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

    # --- one message, every stage --------------------------------------------------------
    async def _handle(self, tp: TopicPartition, msg: Any, generation: int | None = None) -> None:
        s = self.settings
        consumed_at = time.monotonic()
        source = Source(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key)
        where = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        try:
            try:
                decoded = await self._loop.run_in_executor(
                    self._decode_pool, decode_message, msg.value, msg.headers, self.pipeline,
                    s.max_bytes, s.max_pixels, s.decoder == "cpu-reduced")
                self.metrics.decode_seconds.observe(decoded.decode_s)
                future = self._loop.create_future()
                self.gpu.submit(InferenceRequest(decoded.inputs, future, self._loop, where))
                result = await future
            except PoisonMessage as exc:
                await self._dead_letter(source, msg, exc, where)
            else:
                self.metrics.queue_seconds.observe(result.queue_s)
                record = result_record(
                    source, self.pipeline, result.outputs,
                    image={"width": decoded.width, "height": decoded.height, "format": decoded.format},
                    correlation_id=decoded.correlation_id, batch_size=result.batch_size,
                    timings_s={"decode": decoded.decode_s, "queue": result.queue_s,
                               "inference": result.inference_s, "end_to_end": time.monotonic() - consumed_at})
                try:
                    await self.publisher.publish(s.output_topic, record)
                except RecordTooLarge as exc:
                    # The result can never be sent (huge model outputs): the input goes to the DLQ instead.
                    await self._dead_letter(source, msg, PoisonMessage(str(exc), reason="result_too_large"), where)
                else:
                    self.metrics.published.inc()
                    self.counts["published"] += 1
            self.metrics.end_to_end_seconds.observe(time.monotonic() - consumed_at)
            self.tracker.finish(tp, msg.offset, generation)
        except RetriableError as exc:
            # Not finished, so never committed: a restart redoes it. Device errors also stop the worker.
            self.counts["failed"] += 1
            self.metrics.failed.labels(type(exc).__name__).inc()
            self._log.error("message failed (retriable; offset left uncommitted)", error=str(exc), **where)
        except asyncio.CancelledError:
            raise
        except WorkerError as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must stop the worker, not skip the message
            self._log.exception("unexpected error handling message", **where)
            self.fail(exc)

    async def _dead_letter(self, source: Source, msg: Any, exc: PoisonMessage, where: dict) -> None:
        """Publish the DLQ record; if the original value makes it too large to send, send it without."""
        self._log.warning("dead-lettering message", reason=exc.reason, error=str(exc), **where)
        dlq = self.settings.dlq_topic
        try:
            await self.publisher.publish(dlq, dlq_record(source, msg.value, msg.headers, exc))
        except RecordTooLarge as refused:
            self._log.warning("DLQ record too large; sending it without the original value",
                              value_bytes=len(msg.value or b""), **where)
            await self.publisher.publish(dlq, dlq_record_without_value(source, msg.value, msg.headers, exc,
                                                                       refused))
        self.metrics.dead_lettered.labels(exc.reason).inc()
        self.counts["dead_lettered"] += 1

    # --- commit and rebalance ------------------------------------------------------------
    async def commit(self, partitions: set[TopicPartition] | None = None) -> bool:
        """Commit the finished prefix of each assigned partition (of ``partitions`` if given).

        Bounded in time: a stalled broker must not hold a revoke or a shutdown past its grace period.
        Returns False when the commit failed or timed out; those positions are tried again next time.
        """
        assigned = self.consumer.assignment()
        scope = assigned if partitions is None else (partitions & assigned)
        positions = self.tracker.to_commit(scope)
        if not positions:
            return True
        try:
            await asyncio.wait_for(self.consumer.commit(positions), timeout=BROKER_TIMEOUT_S)
        except (KafkaError, asyncio.TimeoutError) as exc:
            self.metrics.commit_failures.inc()
            self._log.warning("commit failed; will retry", error=f"{type(exc).__name__}: {exc}",
                              positions={f"{tp.topic}:{tp.partition}": o for tp, o in positions.items()})
            return False
        self.tracker.mark_committed(positions)
        self.metrics.commits.inc()
        self._log.debug("committed", positions={f"{tp.topic}:{tp.partition}": o for tp, o in positions.items()})
        return True

    async def _heartbeat_loop(self) -> None:
        """Proof of a responsive event loop for /healthz, independent of broker round trips."""
        while True:
            self.health.loop_beat()
            await asyncio.sleep(1.0)

    async def _commit_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            await self.commit()

    async def _probe_loop(self) -> None:
        """Readiness's "broker reachable": a round trip with its own timeout, apart from the commits (a
        commit waits for a coordinator for as long as it takes; readiness must turn false meanwhile)."""
        while True:
            await self._refresh_lag()
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _refresh_lag(self) -> None:
        """Lag per partition and a broker round trip: what readiness calls "broker reachable"."""
        try:
            await asyncio.wait_for(self._lag_round_trip(), timeout=BROKER_TIMEOUT_S)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            if self.health.broker_ok:
                self._log.warning("broker unreachable", error=f"{type(exc).__name__}: {exc}" if str(exc)
                                  else type(exc).__name__, timeout_s=BROKER_TIMEOUT_S)
            self._broker_trouble(True)
        else:
            if not self.health.broker_ok:
                self._log.info("broker reachable again")
            self._broker_trouble(False)

    async def _lag_round_trip(self) -> None:
        assigned = list(self.consumer.assignment())
        if not assigned:
            await self.consumer.topics()
            return
        ends = await self.consumer.end_offsets(assigned)
        for tp, end in ends.items():
            pos = self.tracker.committable(tp)
            committed = pos if pos is not None else await self.consumer.committed(tp) or 0
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - committed))

    def _broker_trouble(self, trouble: bool) -> None:
        self.health.broker_ok = not trouble

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
            self.health.joined = True
            if self.backpressure.paused and assigned:
                self.consumer.pause(*assigned)  # aiokafka forgets pauses on reassignment
            self._log.info("partitions assigned",
                           partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        except Exception as exc:  # noqa: BLE001
            self._log.exception("partition assignment hook failed")
            self.fail(exc)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            await self._release(revoked)
        except Exception as exc:  # noqa: BLE001 - aiokafka would log it and rejoin half-released
            self._log.exception("partition revoke hook failed")
            self.fail(exc)
        finally:
            self._revoking -= revoked

    async def _release(self, revoked: set[TopicPartition]) -> None:
        """Wait (bounded) for the revoked partitions' in-flight work, cut the rest, flush, commit, let go.

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
        self.metrics.rebalances.labels("revoked").inc()
        self._revoking |= revoked
        tasks = set().union(*(self._tasks_by_tp.get(tp, set()) for tp in revoked)) if revoked else set()
        if tasks:
            _, tasks = await asyncio.wait(tasks, timeout=self.settings.rebalance_timeout_s)
        cut = self._describe(tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if revoked:
            try:
                await asyncio.wait_for(self.publisher.flush(), timeout=BROKER_TIMEOUT_S)
            except (KafkaError, asyncio.TimeoutError) as exc:
                self._log.warning("producer flush on revoke failed", error=f"{type(exc).__name__}: {exc}")
        await self.commit(revoked)
        for tp in revoked:
            self.tracker.forget(tp)
            self._tasks_by_tp.pop(tp, None)
        self._log.info("partitions revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
                       unfinished_left_uncommitted=sum(len(v) for v in cut.values()), cut_offsets=cut or None)
