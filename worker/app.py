"""Wires the stages: consume → decode pool → GPU thread → publish → offsets → commit.

One asyncio task per in-flight message carries it through every stage; the number of such tasks is
bounded by ``max_in_flight`` (backpressure pauses the partitions), so every queue between stages is
bounded too. A message is finished only when the broker acknowledged its result or its DLQ record;
only finished offsets are committed.

Commit order (``commit``), as in Quix Streams:
  1. take, per assigned partition, the end of the contiguous finished prefix (OffsetTracker);
  2. every result below it was already acknowledged by the broker (finish() is called after the ack),
     so nothing needs flushing for it; on shutdown the producer is flushed anyway first;
  3. commit those positions (next offset to read); never backwards; a failed commit is retried on the
     next interval and never counted as done.

Shutdown (SIGTERM/SIGINT, or the end of a replay): stop fetching → wait up to ``drain_timeout_s`` for
in-flight messages → cancel the rest (logged as cut, left uncommitted) → flush the producer → commit →
leave the group → stop the GPU thread. A second signal exits at once, committing nothing more. A fatal
error (dead GPU thread, crashed stage task) takes the same path without the wait and exits non-zero.
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
from worker.flow.publish import Publisher, Source, dlq_record, result_record
from worker.health import HealthState
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.settings import Settings


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
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._signals = 0
        self._fatal: BaseException | None = None
        self._log = log.get("worker")

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
        self.consumer = AIOKafkaConsumer(
            group_id=self.plan.group_id, client_id=s.client_id, enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset, session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms, fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes, **s.kafka_common())
        self.publisher = Publisher(
            AIOKafkaProducer(client_id=s.client_id, acks="all", linger_ms=s.producer_linger_ms,
                             max_request_size=s.producer_max_request_size, max_batch_size=1 << 20,
                             **s.kafka_common()),
            s.producer_max_pending, on_broker_trouble=self._broker_trouble)
        self._install_signals()
        stages: list[asyncio.Task] = []
        try:
            await self.publisher.start()
            await self.consumer.start()
            await self.plan.attach(self.consumer, RebalanceHooks(self._on_revoked, self._on_assigned))
            self.health.broker_ok = True
            for name, coro in (("consume", self._consume_loop()), ("commit", self._commit_loop()),
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
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())

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
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._log.info("drained", finished=len(done), cut=len(pending), drain_timeout_s=timeout)
        try:
            await asyncio.wait_for(self.publisher.flush(), timeout=10)
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._log.warning("producer flush failed", error=str(exc))
        await self.commit()
        for task in stages:
            task.cancel()
        await asyncio.gather(*stages, return_exceptions=True)
        for closer in (self.consumer.stop, self.publisher.stop):
            try:
                await asyncio.wait_for(closer(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - closing must go on
                self._log.warning("close failed", error=f"{type(exc).__name__}: {exc}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await self._loop.run_in_executor(None, self.gpu.stop)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._log.info("stopped", exit_code=self.exit_code, **self.counts)

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
                    self.tracker.start(tp, msg.offset)
                    self.counts["consumed"] += 1
                    self.metrics.consumed.inc()
                    task = asyncio.create_task(self._handle(tp, msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            self.metrics.in_flight.set(self.tracker.in_flight())
            if self.plan.complete(self._positions()):
                self._log.info("plan complete")
                self.request_stop()
                return

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
    async def _handle(self, tp: TopicPartition, msg: Any) -> None:
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
                self._log.warning("dead-lettering message", reason=exc.reason, error=str(exc), **where)
                await self.publisher.publish(s.dlq_topic, dlq_record(source, msg.value, msg.headers, exc))
                self.metrics.dead_lettered.labels(exc.reason).inc()
                self.counts["dead_lettered"] += 1
            else:
                self.metrics.queue_seconds.observe(result.queue_s)
                record = result_record(
                    source, self.pipeline, result.outputs,
                    image={"width": decoded.width, "height": decoded.height, "format": decoded.format},
                    correlation_id=decoded.correlation_id, batch_size=result.batch_size,
                    timings_s={"decode": decoded.decode_s, "queue": result.queue_s,
                               "inference": result.inference_s, "end_to_end": time.monotonic() - consumed_at})
                await self.publisher.publish(s.output_topic, record)
                self.metrics.published.inc()
                self.counts["published"] += 1
            self.metrics.end_to_end_seconds.observe(time.monotonic() - consumed_at)
            self.tracker.finish(tp, msg.offset)
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
        finally:
            self._progress.set()

    # --- commit and rebalance ------------------------------------------------------------
    async def commit(self, partitions: set[TopicPartition] | None = None) -> bool:
        assigned = self.consumer.assignment()
        scope = assigned if partitions is None else (partitions & assigned)
        positions = self.tracker.to_commit(scope)
        if not positions:
            return True
        try:
            await self.consumer.commit(positions)
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            self._log.warning("commit failed; will retry", error=f"{type(exc).__name__}: {exc}")
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
            await self._refresh_lag()

    async def _refresh_lag(self) -> None:
        """Lag per partition and a broker round trip: what readiness calls "broker reachable"."""
        assigned = list(self.consumer.assignment())
        try:
            if assigned:
                ends = await asyncio.wait_for(self.consumer.end_offsets(assigned), timeout=5)
                for tp, end in ends.items():
                    pos = self.tracker.committable(tp)
                    committed = pos if pos is not None else await self.consumer.committed(tp) or 0
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - committed))
            else:
                await asyncio.wait_for(self.consumer.topics(), timeout=5)
            self._broker_trouble(False)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            self._broker_trouble(True)
            self._log.warning("broker unreachable", error=f"{type(exc).__name__}: {exc}")

    def _broker_trouble(self, trouble: bool) -> None:
        self.health.broker_ok = not trouble

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assigned").inc()
        self.health.joined = True
        if self.backpressure.paused and assigned:
            self.consumer.pause(*assigned)  # aiokafka forgets pauses on reassignment
        self._log.info("partitions assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Wait (bounded) for the revoked partitions' in-flight work, commit it, then let go."""
        self.metrics.rebalances.labels("revoked").inc()
        deadline = time.monotonic() + self.settings.rebalance_timeout_s
        while any(self.tracker.in_flight(tp) for tp in revoked) and time.monotonic() < deadline:
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        cut = sum(self.tracker.in_flight(tp) for tp in revoked)
        await self.commit(revoked)
        for tp in revoked:
            self.tracker.forget(tp)
        self._log.info("partitions revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
                       unfinished_left_uncommitted=cut)
