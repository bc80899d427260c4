"""The intake's Kafka clients: made, connected with retries, and closed within bounds (a part of Worker).

A mixin of ``worker.app.Worker``: the consumer (aiokafka's, or with ``kafka_consumer=librdkafka`` and a
live plan the one in worker.intake.rdkafka_consumer) and the publisher (a plain one, or with exactly-once a
transactional one) are made here (``_new_clients``, again after a failed start: aiokafka clients are not
restartable), started with retries and backoff while the broker is unreachable (``_connect``: the worker
waits for a broker instead of crash-looping, a SIGTERM meanwhile ends it at once), and closed with every
wait bounded (``_bounded``), since shutdown must go on whatever the broker does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from worker import codecs
from worker.choices import KafkaConsumer, KafkaProducer
from worker.errors import ConfigError, FatalError
from worker.intake.consume import LivePlan
from worker.intake.publish import Publisher
from worker.intake.transact import TRANSACTION_TIMEOUT_MS, TransactionalPublisher, transactional_id


class ClientsMixin:
    """Needs from Worker: settings, plan, exactly_once, health, fail, _stop, _broker_trouble, _log."""

    def _new_clients(self) -> None:
        s = self.settings
        self.consumer = self._new_consumer()
        if self.exactly_once:
            self.publisher = self._transactional_publisher()
            return
        self.publisher = Publisher(self._new_producer(), s.producer_max_pending, on_broker_trouble=self._broker_trouble)

    def _new_producer(self) -> Any:
        """aiokafka's producer, or with kafka_producer=librdkafka the one on librdkafka."""
        s = self.settings
        compression = codecs.producer_compression(s.output_compression)
        if s.kafka_producer is KafkaProducer.LIBRDKAFKA:
            from worker.intake import rdkafka_producer

            return rdkafka_producer.RdKafkaProducer(rdkafka_producer.config(s, compression))
        return AIOKafkaProducer(client_id=s.client_id, acks="all", linger_ms=s.producer_linger_ms,
                                max_request_size=s.producer_max_request_size, max_batch_size=1 << 20,
                                compression_type=compression, **s.kafka_common())

    def _new_consumer(self) -> Any:
        """aiokafka's consumer, or with kafka_consumer=librdkafka and a live plan the one on librdkafka
        (a replay assigns partitions by hand and seeks: that stays aiokafka's)."""
        s = self.settings
        if s.kafka_consumer is KafkaConsumer.LIBRDKAFKA and isinstance(self.plan, LivePlan):
            from worker.intake import rdkafka_consumer

            return rdkafka_consumer.RdKafkaConsumer(rdkafka_consumer.config(s, self.plan.group_id))
        return AIOKafkaConsumer(
            group_id=self.plan.group_id, client_id=s.client_id, enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset, session_timeout_ms=s.session_timeout_ms,
            max_poll_interval_ms=s.max_poll_interval_ms, fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes, fetch_max_wait_ms=s.fetch_max_wait_ms,
            check_crcs=s.check_crcs,
            isolation_level="read_committed" if self.exactly_once else "read_uncommitted",
            **s.kafka_common())

    def _transactional_publisher(self) -> TransactionalPublisher:
        s = self.settings
        producer = AIOKafkaProducer(
            client_id=s.client_id, acks="all", enable_idempotence=True, linger_ms=s.producer_linger_ms,
            transactional_id=transactional_id(self.plan.group_id, self.intake_index),
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, max_request_size=s.producer_max_request_size,
            max_batch_size=1 << 20, compression_type=codecs.producer_compression(s.output_compression),
            **s.kafka_common())
        # A cycle before the interval once half of max_in_flight waits in it: staged outputs count as in
        # flight (a message is finished when its transaction commits), so the interval must not cap throughput.
        return TransactionalPublisher(producer, s.producer_max_request_size, cycle_at=s.max_in_flight // 2,
                                      on_broker_trouble=self._broker_trouble)

    async def _connect(self, backoff: tuple[float, float] = (0.5, 10.0)) -> bool:
        """Start producer and consumer, retrying with backoff while the broker is unreachable or stalls
        (not ready meanwhile), and check that the output and DLQ topics can be written. Returns False
        if a stop came first, or after ``fail`` when a topic cannot be written (nothing consumed)."""
        delay = backoff[0]
        while True:
            try:
                if not await self._unless_stopped(self._start_clients()):
                    return False  # a signal while connecting: nothing was consumed, nothing to drain
            except (FatalError, ConfigError) as exc:  # UnwritableTopic; no transactions: no retry helps
                self.fail(exc)
                return False
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

    async def _start_clients(self) -> None:
        await asyncio.wait_for(self.publisher.start(), timeout=30)
        await asyncio.wait_for(self.consumer.start(), timeout=30)
        check = getattr(self.publisher, "check_topics", None)  # test doubles may have none
        if check is not None:
            await check([self.settings.output_topic, self.settings.dlq_topic])
        self.publisher.on_stalled = self.health.publish_stalled

    async def _unless_stopped(self, coro: Awaitable[Any]) -> bool:
        """Await ``coro`` unless a stop comes first (a connection attempt to a broker that stalls can take
        30 s, a SIGTERM must not wait for it): then cancel it and return False. Its errors propagate."""
        attempt = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if attempt.done():
            attempt.result()
            return True
        attempt.cancel()
        await asyncio.wait({attempt}, timeout=5)
        if attempt.done() and not attempt.cancelled() and attempt.exception() is not None:
            self._log.info("connection attempt ended by the stop", error=repr(attempt.exception()))
        return False

    async def _bounded(self, what: str, coro: Awaitable[Any], timeout: float) -> bool:
        """Await ``coro`` for at most ``timeout`` s on a path that must go on (shutdown, closing clients):
        a failure or a timeout is logged, not raised. So is a CancelledError that comes out of the
        awaited code while this task is not being cancelled: aiokafka 0.14's ``consumer.stop()`` during
        a broker outage re-raises the one of its own fetch task (cancelled while sleeping its retry
        backoff), which used to end a SIGTERM in a traceback and exit 1."""
        try:
            await asyncio.wait_for(coro, timeout=timeout)
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled: not ours to swallow
            self._log.warning(f"{what} failed",
                              error="the client re-raised the cancellation of one of its own tasks")
        except Exception as exc:  # noqa: BLE001 - the path must go on
            self._log.warning(f"{what} failed", error=f"{type(exc).__name__}: {exc}")
        return False

    async def _close_clients(self) -> None:
        if not await self._bounded("consumer close", self.consumer.stop(), 10):
            # It stopped half way (before closing its connections): close them, bounded too.
            client = getattr(self.consumer, "_client", None)
            if client is not None:
                await self._bounded("consumer connections close", client.close(), 5)
        await self._bounded("producer close", self.publisher.stop(), 10)
