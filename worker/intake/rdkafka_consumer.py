"""The live intake's consumer on librdkafka (confluent-kafka), behind the aiokafka calls the worker makes.

Why: aiokafka reads and parses fetch responses in Python on the intake's event loop; with 76 KB images
that is most of the loop's CPU per message (docs/benchmarks.md, "Where the intake's event loop spends its
time"). librdkafka fetches, decompresses, checks CRCs and parses on its own native threads; the loop only
takes finished messages off its queue. ``kafka_consumer=librdkafka`` selects it for a live intake; a replay
(manual assignment, bounded ranges) and exactly-once (transactions bound to aiokafka's group membership)
keep aiokafka.

Threads. ``consume()`` blocks, so it runs on a thread of its own (the poller), and so do pause and resume
(queued there: they can block); offset lookups run on the default executor, and commits
from a second thread (one at a time: a sync commit has no timeout of its own, and a stalled broker must
not pile up threads). Both are daemon threads: a close that hangs on a dead broker cannot hold the
process's exit.

Rebalances. librdkafka runs the rebalance callbacks inside ``consume()`` on the poller thread and lets the
partitions go when the callback returns. The callback hands the worker's async hook to the event loop and
blocks until it is done, so a revoke drains, flushes and commits before anyone else can own the
partitions: what aiokafka's awaited listener gives. An assignment is applied before its hook runs; a
pause the hook asks for runs on the poll thread right after the callback returns. The eager protocol and the round-robin assignor, as
aiokafka's defaults.

The assignment is kept here as a frozen set of aiokafka ``TopicPartition`` (the worker asks for it per
message); records come out as ``Fetched``, with the attributes of aiokafka's ``ConsumerRecord`` that the
worker reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from worker import log
from worker.errors import ConfigError, FatalError
from worker.intake.commit import BROKER_TIMEOUT_S  # offset and metadata lookups wait as long as commits and probes

CONNECT_TIMEOUT_S = 10.0  # start(): a metadata round trip, as aiokafka's start() makes one


class RdKafkaError(KafkaError):
    """A librdkafka failure, as the aiokafka error the worker's handlers expect."""


class Fetched:
    """One consumed record: the attributes of aiokafka's ConsumerRecord that the worker reads."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "timestamp_type", "key", "value", "headers")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, timestamp_type: int,
                 key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.timestamp_type = timestamp_type
        self.key = key
        self.value = value
        self.headers = headers


def config(settings: Any, group_id: str) -> dict[str, Any]:
    """librdkafka's configuration for a live intake (pure): the same options the aiokafka consumer gets."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "group.id": group_id,
        "enable.auto.commit": False,  # the worker commits its finished prefix itself
        "enable.auto.offset.store": False,
        "auto.offset.reset": str(settings.auto_offset_reset),
        "session.timeout.ms": settings.session_timeout_ms,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "fetch.max.bytes": settings.fetch_max_bytes,
        "max.partition.fetch.bytes": settings.max_partition_fetch_bytes,
        "fetch.wait.max.ms": settings.fetch_max_wait_ms,
        # librdkafka requires a response to fit; its default (100 MB) unless fetch_max_bytes is larger
        "receive.message.max.bytes": max(100_000_000, settings.fetch_max_bytes + 512),
        # its prefetch queue: about one fetch's worth (its default is 64 MB per consumer, whatever the bounds)
        "queued.max.messages.kbytes": max(1024, min(2_097_151, settings.fetch_max_bytes // 1024)),
        "check.crcs": bool(settings.check_crcs),
        "isolation.level": "read_uncommitted",  # as the aiokafka consumer for at-least-once
        "partition.assignment.strategy": "roundrobin",  # aiokafka's default: a group may mix both clients
        "enable.partition.eof": False,
        "security.protocol": str(settings.security_protocol),
    }
    if settings.security_protocol.uses_tls:
        for key, value in (("ssl.ca.location", settings.ssl_cafile), ("ssl.certificate.location", settings.ssl_certfile),
                           ("ssl.key.location", settings.ssl_keyfile), ("ssl.key.password", settings.ssl_keyfile_password)):
            if value:
                conf[key] = value
    if settings.security_protocol.uses_sasl:
        conf["sasl.mechanism"] = str(settings.sasl_mechanism)
        conf["sasl.username"] = settings.sasl_username
        conf["sasl.password"] = settings.sasl_password
    return conf


class _Thread:
    """One daemon thread running submitted calls in order (a ThreadPoolExecutor's threads are joined at
    exit, so one stuck in a broker call would hold the process)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> asyncio.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, call))
        return asyncio.wrap_future(future)

    def post(self, call: Callable[[], Any], on_error: Callable[[BaseException], None]) -> None:
        """Run ``call`` in turn without waiting for it; what it raises goes to ``on_error`` (on this thread)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.add_done_callback(lambda f: f.exception() is not None and on_error(f.exception()))
        self._calls.put((future, call))

    def close(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue  # its waiter gave up (a timed-out commit): do not send it late
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)


class _Logs:
    """librdkafka's log lines through the worker's structured log (by default they go raw to stderr)."""

    def __init__(self, logger: Any) -> None:
        self._log = logger

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        if level >= logging.WARNING:
            self._log.warning("librdkafka", message=text)
        else:
            self._log.debug("librdkafka", message=text)


class RdKafkaConsumer:
    """aiokafka's AIOKafkaConsumer calls that worker.app, .commit and .rebalance make, on librdkafka."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self._conf = dict(conf)
        self._consumer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: _Thread | None = None
        self._committer: _Thread | None = None
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._listener: Any = None
        self._closing = False
        self._fatal: BaseException | None = None
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        self._log = log.get("worker.rdkafka")

    # --- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        import confluent_kafka

        self._loop = asyncio.get_running_loop()
        conf = {**self._conf, "error_cb": self._on_error, "logger": _Logs(self._log)}
        try:
            self._consumer = confluent_kafka.Consumer(conf)
        except confluent_kafka.KafkaException as exc:  # librdkafka checks its configuration here
            raise ConfigError(f"kafka_consumer=librdkafka: librdkafka refused the configuration: {_text(exc)}") from None
        self._poller = _Thread("rdkafka-poll")
        self._committer = _Thread("rdkafka-commit")
        try:  # reach a broker, so the worker's connect loop retries while none answers
            await self._poller.submit(lambda: self._consumer.list_topics(timeout=CONNECT_TIMEOUT_S))
        except confluent_kafka.KafkaException as exc:
            raise KafkaConnectionError(f"librdkafka: no broker answered at {self._conf['bootstrap.servers']}: "
                                       f"{_text(exc)}") from None

    async def stop(self) -> None:
        """Leave the group and close (after any poll in progress: both run on the poller thread). The
        worker has drained and committed by now, so the revoke that closing brings runs no hook."""
        if self._consumer is None or self._poller is None:
            return
        self._closing = True
        try:
            await self._poller.submit(self._consumer.close)
        finally:
            self._poller.close()
            if self._committer is not None:
                self._committer.close()

    def subscribe(self, topics: Iterable[str], listener: Any) -> None:
        self._listener = listener
        self._consumer.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)

    # --- consuming -----------------------------------------------------------------------------
    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Fetched]]:
        if self._fatal is not None:
            raise self._fatal
        n = max(1, max_records or 500)
        messages = await self._poller.submit(lambda: self._consumer.consume(n, timeout_ms / 1000.0))
        out: dict[TopicPartition, list[Fetched]] = {}
        for m in messages:
            error = m.error()
            if error is not None:
                self._message_error(error, m)
                continue
            topic, partition = m.topic(), m.partition()
            tp = self._tp(topic, partition)
            kind, ts = m.timestamp()
            out.setdefault(tp, []).append(
                Fetched(topic, partition, m.offset(), ts, kind, m.key(), m.value(), m.headers() or []))
        return out

    def assignment(self) -> frozenset[TopicPartition]:
        return self._assigned

    def pause(self, *partitions: TopicPartition) -> None:
        self._pause_resume("pause", partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._pause_resume("resume", partitions)

    def _pause_resume(self, what: str, partitions: Iterable[TopicPartition]) -> None:
        """Queued on the poll thread, in order with the polls, never run on the event loop: librdkafka's
        pause and resume wait for its own threads while holding the GIL, and those may be waiting for a
        rebalance callback that waits for the event loop (a deadlock seen with a lost session and on a
        rebalance during shutdown). Until it runs, a poll may still return records of these partitions:
        the worker holds what does not fit (backpressure's byte bound), as with any fetched record."""
        owned = [tp for tp in partitions if tp in self._assigned]
        if owned:
            native = _native(owned)
            self._poller.post(lambda: getattr(self._consumer, what)(native), self._pause_failed)

    def _pause_failed(self, exc: BaseException) -> None:
        self._log.warning("pause/resume failed", error=f"{type(exc).__name__}: {exc}")

    # --- offsets -------------------------------------------------------------------------------
    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these positions (next offsets to read) and wait for the broker's answer."""
        import confluent_kafka

        native = _native(offsets, offsets)
        try:
            answered = await self._committer.submit(lambda: self._consumer.commit(offsets=native, asynchronous=False))
        except confluent_kafka.KafkaException as exc:
            raise RdKafkaError(f"commit failed: {_text(exc)}") from None
        failed = [f"{p.topic}:{p.partition}: {p.error.str()}" for p in answered or () if p.error is not None]
        if failed:
            raise RdKafkaError("commit failed for " + "; ".join(failed))

    async def committed(self, tp: TopicPartition) -> int | None:
        found = await self._lookup(lambda: self._consumer.committed(_native([tp]), timeout=BROKER_TIMEOUT_S))
        offset = found[0].offset if found else -1
        return offset if offset >= 0 else None

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        wanted = list(partitions)

        def ends() -> dict[TopicPartition, int]:
            return {tp: self._consumer.get_watermark_offsets(_native([tp])[0], timeout=BROKER_TIMEOUT_S)[1]
                    for tp in wanted}
        return await self._lookup(ends)

    def highwater(self, tp: TopicPartition) -> int | None:
        """The high watermark of the partition's last fetch (no round trip)."""
        try:
            _, high = self._consumer.get_watermark_offsets(_native([tp])[0], cached=True)
        except Exception:  # noqa: BLE001 - not fetched yet
            return None
        return high if high is not None and high >= 0 else None

    async def topics(self) -> set[str]:
        metadata = await self._lookup(lambda: self._consumer.list_topics(timeout=BROKER_TIMEOUT_S))
        return set(metadata.topics)

    async def _lookup(self, call: Callable[[], Any]) -> Any:
        """A bounded broker round trip on the default executor (it has its own timeout)."""
        import confluent_kafka

        try:
            return await asyncio.get_running_loop().run_in_executor(None, call)
        except confluent_kafka.KafkaException as exc:
            raise RdKafkaError(_text(exc)) from None

    # --- callbacks (librdkafka's threads) --------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """On the poller thread, inside consume(): apply the assignment, then run the worker's hook."""
        consumer.assign(partitions)
        self._assigned = frozenset(self._tp(p.topic, p.partition) for p in partitions)
        if not self._closing and self._listener is not None:
            self._hook(self._listener.on_partitions_assigned, set(self._assigned))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """On the poller thread, inside consume() (or close()): run the worker's hook (drain, flush,
        commit) to its end, then let the partitions go."""
        revoked = {self._tp(p.topic, p.partition) for p in partitions}
        try:
            if not self._closing and self._listener is not None:
                self._hook(self._listener.on_partitions_revoked, revoked)
        finally:
            self._assigned = frozenset(self._assigned - revoked)
            consumer.unassign()

    def _hook(self, hook: Callable[[set[TopicPartition]], Any], partitions: set[TopicPartition]) -> None:
        """Run an async hook on the event loop and wait for it (the worker's hooks turn their own
        failures into a fatal stop; anything else that escapes is fatal here)."""
        try:
            asyncio.run_coroutine_threadsafe(hook(partitions), self._loop).result()
        except Exception as exc:  # noqa: BLE001 - raised at the next getmany
            self._fatal = exc

    def _on_error(self, error: Any) -> None:
        """librdkafka's client-level errors (served inside consume()): fatal ones stop the worker, the
        rest are logged (it reconnects by itself; the worker's probe marks readiness meanwhile)."""
        if error.fatal():
            self._fatal = FatalError(f"librdkafka fatal error: {error.str()}")
            return
        self._log.warning("kafka client error", error=error.str(), code=error.name())

    def _message_error(self, error: Any, message: Any) -> None:
        """An error in place of a record. A corrupt or undecodable batch stops the worker, as with aiokafka
        (librdkafka would go on past it: its records would be lost); a topic that does not exist yet is
        waited for; transient broker errors are logged."""
        import confluent_kafka

        code = error.code()
        where = f"topic={message.topic()} partition={message.partition()} offset={message.offset()}"
        if code == confluent_kafka.KafkaError._PARTITION_EOF:
            return
        if error.fatal() or code in (confluent_kafka.KafkaError._BAD_MSG, confluent_kafka.KafkaError._BAD_COMPRESSION,
                                     confluent_kafka.KafkaError.INVALID_MSG,
                                     confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                     confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED):
            raise RdKafkaError(f"cannot consume ({where}): {error.name()}: {error.str()}")
        self._log.warning("consume error; retrying", error=error.str(), code=error.name(), where=where)

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        key = (topic, partition)
        tp = self._tps.get(key)
        if tp is None:
            tp = self._tps[key] = TopicPartition(topic, partition)
        return tp


def _native(partitions: Iterable[TopicPartition], offsets: dict[TopicPartition, int] | None = None) -> list[Any]:
    import confluent_kafka

    if offsets is None:
        return [confluent_kafka.TopicPartition(tp.topic, tp.partition) for tp in partitions]
    return [confluent_kafka.TopicPartition(tp.topic, tp.partition, offsets[tp]) for tp in partitions]


def _text(exc: BaseException) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if hasattr(error, "str") else str(exc)
