"""The intake's producer on librdkafka (confluent-kafka), behind the aiokafka producer calls that
``worker.intake.publish.Publisher`` makes.

Why: with the librdkafka consumer, publishing the results was the largest part left of the intake event
loop's CPU per message (a quarter: aiokafka builds record batches, produce requests and reads their
answers in Python on the loop; docs/benchmarks.md). librdkafka does all of that on its own threads; the
loop only hands each record over (``produce``, a copy into librdkafka's queue) and resolves one future
per batch when its acks are in. ``kafka_producer=librdkafka`` selects it (not with exactly-once, whose
transactions stay aiokafka's).

Threads. ``produce`` is called on the event loop; a thread of ours ("rdkafka-acks") polls the producer,
which runs the delivery callbacks there, and hands the finished records to the loop in one
``call_soon_threadsafe`` per poll, not one per record. confluent-kafka serialises callers of a Consumer,
not of a Producer (``produce`` does not wait for a ``poll`` in progress), so the loop never waits on that
thread. Nothing else calls ``poll`` or ``flush``: ``flush`` here waits, on the loop, for every record
produced so far to be acknowledged or refused.

What Publisher relies on is kept: the same partition for a key as aiokafka (librdkafka's
``murmur2_random`` is the Java client's murmur2, as aiokafka's partitioner; a batch's partition is chosen
by Publisher with aiokafka's partitioner and given explicitly), ``send`` gives a future of the ack,
refusals arrive as aiokafka's errors (``rdkafka_common.as_aiokafka``: too large, unknown topic, no
authorisation, timeouts), and a failed delivery is not retried here beyond librdkafka's own retries
within ``message.timeout.ms``: Publisher retries, judges and dead-letters exactly as with aiokafka.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from aiokafka import errors as E
from aiokafka.partitioner import DefaultPartitioner

from worker import log
from worker.intake.rdkafka_common import as_aiokafka, connection_config, new_client, reach_broker, text

CONNECT_TIMEOUT_S = 10.0  # start(): a metadata round trip, as aiokafka's start() makes one
METADATA_TIMEOUT_S = 5.0
PARTITIONS_FRESH_S = 5.0  # a topic's partitions (and which have a leader) are asked for again after this
# A record not acknowledged within this long fails (librdkafka retries inside it): Publisher then judges
# and retries, so a broker outage shows as failures, as with aiokafka (its request timeout is 40 s).
DELIVERY_TIMEOUT_MS = 10_000
RECORD_OVERHEAD = 70  # bytes a record adds to a batch beyond its key, value and headers (an upper bound)


def config(settings: Any, compression: str | None) -> dict[str, Any]:
    """librdkafka's configuration for the intake's producer (pure): what the aiokafka producer gets."""
    return {
        **connection_config(settings),
        "acks": "all",
        "linger.ms": settings.producer_linger_ms,
        "message.max.bytes": settings.producer_max_request_size,
        "batch.size": 1 << 20,
        "compression.type": compression or "none",
        "partitioner": "murmur2_random",  # keyed: the Java client's (and aiokafka's) murmur2; no key: random
        "message.timeout.ms": DELIVERY_TIMEOUT_MS,
        # Publisher bounds unacknowledged records itself (producer_max_pending); this only must not be lower
        "queue.buffering.max.messages": max(100_000, 2 * settings.producer_max_pending),
    }


class _Batch:
    """aiokafka's batch builder face: ``append`` returns None once the batch is full (by bytes)."""

    __slots__ = ("records", "size", "limit")

    def __init__(self, limit: int) -> None:
        self.records: list[tuple[bytes | None, bytes | None, Any]] = []
        self.size = 0
        self.limit = limit

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: Any) -> bool | None:
        del timestamp  # the broker's time, as aiokafka with timestamp=None
        n = RECORD_OVERHEAD + len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers or ())
        if self.size + n > self.limit:
            return None  # a record too large even alone: Publisher sends it by itself and judges the refusal
        self.records.append((key, value, headers))
        self.size += n
        return True


class _Acks:
    """The loop's future for one send or one batch: resolved when every record of it is acknowledged,
    failed with the first refusal. Its delivery callback runs on the acks thread."""

    __slots__ = ("future", "left", "error", "_done")

    def __init__(self, future: asyncio.Future, count: int, done: collections.deque) -> None:
        self.future = future
        self.left = count
        self.error: Any = None
        self._done = done

    def __call__(self, error: Any, _message: Any) -> None:  # on the acks thread
        self._done.append((self, error))


class RdKafkaProducer:
    """The AIOKafkaProducer calls Publisher makes (start, send, create_batch, send_batch, partitions,
    flush, stop), on librdkafka."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self._conf = dict(conf)
        self._producer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: collections.deque = collections.deque()  # (acks, error) from delivery callbacks
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._unacked = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._partitions: dict[str, tuple[float, list[int], list[int]]] = {}
        self._partitioner = DefaultPartitioner()
        # a record over message.max.bytes fills no batch: sent alone, refused alone (no batch-mate resent)
        self._max_batch = min(int(self._conf.get("batch.size", 1 << 20)), int(self._conf.get("message.max.bytes", 1 << 20)))
        self._log = log.get("worker.rdkafka")

    # --- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        import confluent_kafka

        self._loop = asyncio.get_running_loop()
        self._producer = new_client(confluent_kafka.Producer, self._conf, "kafka_producer", self._on_error, self._log)
        await reach_broker(lambda t: self._loop.run_in_executor(None, lambda: self._producer.list_topics(timeout=t)),
                           self._conf, CONNECT_TIMEOUT_S)
        self._thread = threading.Thread(target=self._serve_acks, name="rdkafka-acks", daemon=True)
        self._thread.start()

    async def flush(self) -> None:
        """Until every record produced so far is acknowledged or refused (the acks thread serves them)."""
        await self._idle.wait()

    async def stop(self) -> None:
        """Flushed by the caller first (bounded); what is still queued fails with ProducerClosed."""
        if self._producer is None:
            return
        self._stopping.set()
        if self._thread is not None:
            await self._loop.run_in_executor(None, self._thread.join)  # type: ignore[union-attr]
        producer, self._producer = self._producer, None
        await self._loop.run_in_executor(None, lambda: _close(producer))  # type: ignore[union-attr]
        self._settle()  # the records purged at close: their futures fail

    # --- sending -------------------------------------------------------------------------------
    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int | None = None,
                   timestamp_ms: int | None = None, headers: Any = None) -> asyncio.Future:
        """Queue one record; the returned future resolves with its acknowledgement (as aiokafka's)."""
        del timestamp_ms
        acks = self._acks(1)
        self._produce(topic, key, value, headers, -1 if partition is None else partition, acks, 1)
        return acks.future

    def create_batch(self) -> _Batch:
        return _Batch(self._max_batch)

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> asyncio.Future:
        acks = self._acks(len(batch.records))
        for i, (key, value, headers) in enumerate(batch.records):
            if not self._produce(topic, key, value, headers, partition, acks, len(batch.records) - i):
                break  # the batch has failed: its other records are not sent
        return acks.future

    def _acks(self, count: int) -> _Acks:
        if self._producer is None:
            raise E.ProducerClosed()
        return _Acks(self._loop.create_future(), count, self._done)  # type: ignore[union-attr]

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any, partition: int,
                 acks: _Acks, not_yet: int) -> bool:
        """One record into librdkafka's queue; a refusal here fails the whole send (``not_yet``: the
        records of it not produced, this one included, which will never be acknowledged): False."""
        import confluent_kafka

        try:
            self._producer.produce(topic, value, key, partition=partition, headers=headers, on_delivery=acks)
        except BufferError:  # its queue is full: the broker is slow or away; Publisher retries
            self._refused(acks, not_yet, E.KafkaTimeoutError("librdkafka's send queue is full"))
        except confluent_kafka.KafkaException as exc:
            self._refused(acks, not_yet, as_aiokafka(exc.args[0]))
        else:
            self._unacked += 1
            self._idle.clear()
            return True
        return False

    def _refused(self, acks: _Acks, not_yet: int, error: E.KafkaError) -> None:
        acks.left -= not_yet
        if acks.error is None:
            acks.error = error
        self._finish(acks)

    # --- acknowledgements ----------------------------------------------------------------------
    def _serve_acks(self) -> None:
        """The acks thread: poll (delivery callbacks run here), then wake the loop once for them all."""
        while not self._stopping.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # noqa: BLE001 - this thread ending would leave every later ack unseen
                self._log.exception("librdkafka producer poll failed; polling on")
                self._stopping.wait(0.1)
            if self._done:
                self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._settle)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _settle(self) -> None:
        """On the loop: the records the acks thread saw delivered or refused."""
        with self._wake_lock:
            self._wake_pending = False
        done = self._done
        while done:
            acks, error = done.popleft()
            self._unacked -= 1
            acks.left -= 1
            if error is not None and acks.error is None:
                acks.error = as_aiokafka(error)
            self._finish(acks)
        if self._unacked <= 0:
            self._idle.set()

    @staticmethod
    def _finish(acks: _Acks) -> None:
        if acks.left <= 0 and not acks.future.done():
            if acks.error is not None:
                acks.future.set_exception(acks.error)
            else:
                acks.future.set_result(None)

    # --- partitions ----------------------------------------------------------------------------
    async def placement(self, topic: str) -> tuple[list[int], list[int]]:
        """The topic's partitions and those with a leader now (Publisher places a batch's records with
        aiokafka's partitioner on them), from metadata at most ``PARTITIONS_FRESH_S`` old."""
        cached = self._partitions.get(topic)
        if cached is not None and time.monotonic() - cached[0] < PARTITIONS_FRESH_S:
            return cached[1], cached[2]
        error, partitions, available = await self._metadata(topic)
        if error is not None:
            raise error("no partitions known for topic " + topic)
        self._partitions[topic] = (time.monotonic(), partitions, available)
        return partitions, available

    async def topic_error(self, topic: str) -> type[E.KafkaError] | None:
        """The broker's own answer for ``topic`` (worker.intake.publish.topic_error's): None when it has
        partitions, else the error class. Raises KafkaError when no broker answers."""
        error, _partitions, _available = await self._metadata(topic)
        return error

    async def _metadata(self, topic: str) -> tuple[type[E.KafkaError] | None, list[int], list[int]]:
        import confluent_kafka

        try:
            meta = await self._loop.run_in_executor(  # type: ignore[union-attr]
                None, lambda: self._producer.list_topics(topic, timeout=METADATA_TIMEOUT_S))
        except confluent_kafka.KafkaException as exc:
            raise E.KafkaConnectionError(f"librdkafka: topic metadata for {topic}: {text(exc)}") from None
        info = meta.topics.get(topic)
        if info is None:
            return E.UnknownTopicOrPartitionError, [], []
        if info.error is not None:  # LEADER_NOT_AVAILABLE (being created) stays itself: a broker code
            return type(as_aiokafka(info.error)), [], []
        if not info.partitions:
            return E.LeaderNotAvailableError, [], []
        partitions = sorted(info.partitions)
        return None, partitions, [p for p in partitions if info.partitions[p].leader >= 0]

    def _on_error(self, error: Any) -> None:
        """librdkafka's client-level errors (broker down, ...): logged; it reconnects by itself, and the
        records waiting meanwhile fail after ``DELIVERY_TIMEOUT_MS`` for Publisher to judge."""
        self._log.warning("kafka producer error", error=error.str(), code=error.name())


def _close(producer: Any) -> None:
    """Drop what is still queued (its delivery callbacks report it purged) and let librdkafka go."""
    try:
        producer.purge()
        producer.poll(0)
    except Exception:  # noqa: BLE001 - closing goes on whatever the client says
        pass
    close = getattr(producer, "close", None)
    if close is not None:
        close()
