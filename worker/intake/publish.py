"""Publish stage: the producer that must acknowledge every result and dead-letter record.

The records themselves are built in ``worker.intake.records`` (pure). ``Publisher`` wraps the
aiokafka producer with a bound on unacknowledged records and retries with backoff while the broker is
away, because a message only counts as done, and its offset as committable, once the broker has
acknowledged its result or its DLQ record.

A record that can never be sent (over ``producer_max_request_size`` or the broker's message size limit)
is not retried: it raises ``RecordTooLarge`` so the caller can send something smaller instead (a DLQ
record without the original value) rather than hold the partition's offsets back forever.

Other failures are told apart (``classify``): retriable ones (broker away, leader moving, timeouts) are
retried for as long as they last, and after ``STALL_AFTER_S`` without an acknowledgement the worker is
marked not ready (``on_stalled``); permanent ones (invalid topic name, no authorisation, ...) raise
``PublishFailed``, fatal; a topic that stays missing for ``STALL_AFTER_S`` is permanent too.
``check_topics`` finds the same at start-up, before anything is consumed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from worker import log
from worker.errors import PublishFailed, UnwritableTopic, WorkerError
from worker.intake.partitions import by_partition
from worker.intake.records import Record

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
# Publish trouble that lasts this long without an acknowledgement marks the worker not ready; a topic
# missing for this long is given up on (fatal). Also how long start-up waits for a topic being created.
STALL_AFTER_S = 30.0
TOPIC_CHECK_TIMEOUT_S = 5.0  # one metadata round trip of check_topics / of the reason for a missing topic
DESCRIBE_CACHE_S = 1.0  # concurrent publishes to a missing topic share one metadata answer for this long

E = kafka_errors
# Refusals that no retry changes: configuration (topic name, ACLs, versions), or a closed producer.
_PERMANENT = (E.InvalidTopicError, E.TopicAuthorizationFailedError, E.ClusterAuthorizationFailedError,
              E.TransactionalIdAuthorizationFailed, E.AuthenticationFailedError, E.SaslAuthenticationFailed,
              E.AuthenticationMethodNotSupported, E.UnsupportedVersionError, E.IncompatibleBrokerVersion,
              E.UnsupportedForMessageFormatError, E.InvalidRequiredAcksError, E.UnsupportedCodecError,
              E.KafkaConfigurationError, E.ProducerClosed, E.ProducerFenced)
# Not flagged retriable by aiokafka, yet what an unreachable or busy broker gives: retried.
_TRANSIENT = (E.KafkaTimeoutError, E.KafkaConnectionError, E.KafkaUnavailableError, E.QuotaViolationError,
              E.BrokerNotAvailableError, E.ReplicaNotAvailableError, E.RequestTimedOutError, E.UnknownError)
_ADVICE = {
    E.InvalidTopicError: "fix the topic setting (output_topic / dlq_topic) and restart",
    E.TopicAuthorizationFailedError: "grant this client's principal Write and Describe on the topic",
    E.ClusterAuthorizationFailedError: "grant this client's principal the cluster permissions a producer needs",
    E.UnknownTopicOrPartitionError: "create the topic (this broker does not create it on first use) or fix "
                                    "the topic setting, then restart",
}
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]+")


def topic_name_problem(topic: str) -> str:
    """Why Kafka would refuse ``topic`` as a name (its own rules: 1 to 249 of ``[A-Za-z0-9._-]``, not
    ``.`` or ``..``), or "" for a legal name."""
    if not topic or topic in (".", ".."):
        return f"{topic!r} is not a valid topic name"
    if len(topic) > 249:
        return f"a topic name of {len(topic)} characters is not valid (at most 249)"
    if not _LEGAL_TOPIC.fullmatch(topic):
        return f"{topic!r} is not a valid topic name (only letters, digits, '.', '_' and '-')"
    return ""


def classify(exc: BaseException) -> str:
    """What a failed send means: "permanent" (raise), "missing" (the topic or partition is unknown:
    retried, and permanent once it lasts ``STALL_AFTER_S``) or "retriable" (retry, not ready after the
    bound). Unknown errors retry: an outage must not stop the worker, and a stall shows in readiness."""
    if isinstance(exc, E.UnknownTopicOrPartitionError):
        return "missing"
    if isinstance(exc, _PERMANENT):
        return "permanent"
    if getattr(exc, "retriable", False) or isinstance(exc, _TRANSIENT):
        return "retriable"
    if isinstance(exc, E.BrokerResponseError):  # the broker refused, for a reason a retry does not change
        return "permanent"
    return "retriable"


async def topic_error(producer: AIOKafkaProducer, topic: str) -> type[KafkaError] | None:
    """The broker's own answer for ``topic``, from a metadata request of our own (the producer's metadata
    cache only logs it and then times out as "unknown topic"): None when the topic has partitions, else
    the error class (UnknownTopicOrPartitionError: missing, not auto-created; InvalidTopicError;
    TopicAuthorizationFailedError; LeaderNotAvailableError: being created). Raises KafkaError when no
    broker answers."""
    from aiokafka.protocol.metadata import MetadataRequest

    own = getattr(producer, "topic_error", None)  # kafka_producer=librdkafka asks through its own client
    if own is not None:
        return await own(topic)
    client = producer.client
    node = client.get_random_node()
    if node is None:
        raise E.KafkaConnectionError("no broker known to ask for topic metadata")
    response = await client.send(node, MetadataRequest([topic]))
    for data in response.topics:  # (error_code, name, [is_internal,] partitions)
        if data[1] == topic:
            error = E.for_code(data[0])
            if error is E.NoError:
                return None if data[-1] else E.LeaderNotAvailableError
            return error
    return E.UnknownTopicOrPartitionError


async def placement(producer: Any, topic: str) -> tuple[list[int], list[int]]:
    """The topic's partitions and those available now, from the producer's metadata (aiokafka's cache, or
    kafka_producer=librdkafka's own ``placement``)."""
    own = getattr(producer, "placement", None)
    if own is not None:
        return await own(topic)
    partitions = sorted(await producer.partitions_for(topic))
    return partitions, list(producer.client.cluster.available_partitions_for_topic(topic) or ())


class RecordTooLarge(WorkerError):
    """The producer or the broker refuses a record for its size: retrying the same record cannot help."""


async def publish_each(publisher: Any, topic: str, records: Sequence[Record]) -> list[RecordTooLarge | None]:
    """``publisher.publish`` of each record in turn: per record None once it is published (or staged), or
    the ``RecordTooLarge`` it raised. For publishers that send one record at a time (test doubles, the
    transactional publisher, which stages records for its commit cycle)."""
    out: list[RecordTooLarge | None] = []
    for record in records:
        try:
            await publisher.publish(topic, record)
            out.append(None)
        except RecordTooLarge as exc:
            out.append(exc)
    return out


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, max_pending: int,
                 on_broker_trouble: Callable[[bool], None] | None = None,
                 backoff_s: tuple[float, float] = (0.2, 10.0), stall_after_s: float = STALL_AFTER_S,
                 on_stalled: Callable[[bool], None] | None = None) -> None:
        self._producer = producer
        self._slots = asyncio.Semaphore(max_pending)
        self._on_trouble = on_broker_trouble
        # Told True once publishing has failed for ``stall_after_s`` without an acknowledgement, False
        # at the next acknowledgement (readiness; the broker probe alone stays green while a topic
        # cannot be written).
        self.on_stalled = on_stalled
        self._backoff = backoff_s
        self._stall_after = stall_after_s
        self._failing_since: float | None = None  # first failure since the last acknowledgement
        self._stalled = False
        self._missing_since: dict[str, float] = {}
        self._described: dict[str, tuple[float, tuple[str, str, type[BaseException]]]] = {}
        self._closing = False
        self._log = log.get("publish")

    async def start(self) -> None:
        await self._producer.start()

    async def check_topics(self, topics: Sequence[str], missing_for_s: float | None = None) -> None:
        """Before anything is consumed: each topic has a legal name, exists (waiting up to
        ``missing_for_s`` for one being created) and may be described. Raises ``UnwritableTopic``
        naming the topic otherwise; a broker that does not answer raises KafkaError or TimeoutError
        (the caller retries). Write permission itself shows only on the first send (then fatal too)."""
        wait_s = self._stall_after if missing_for_s is None else missing_for_s
        for topic in dict.fromkeys(topics):
            problem = topic_name_problem(topic)
            if problem:
                raise UnwritableTopic(topic, problem, _ADVICE[E.InvalidTopicError])
            deadline = time.monotonic() + wait_s
            while True:
                error = await asyncio.wait_for(topic_error(self._producer, topic), TOPIC_CHECK_TIMEOUT_S)
                if error is None:
                    # The producer's own metadata for it now, not at the first send: aiokafka's first send to a
                    # topic it does not track waits for a lookup of its own (topic_error asked on the side),
                    # which the first results of a run (or after a restart) would pay.
                    await asyncio.wait_for(placement(self._producer, topic), TOPIC_CHECK_TIMEOUT_S)
                    break
                waiting = error in (E.UnknownTopicOrPartitionError, E.LeaderNotAvailableError)
                if waiting and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                reason = (f"it does not exist (still missing after {wait_s:g} s)" if waiting
                          else f"the broker says {error.__name__}")
                raise UnwritableTopic(topic, reason, _ADVICE.get(error, "fix the configuration and restart"))

    async def publish(self, topic: str, record: Record) -> None:
        """Send and wait for the broker's acknowledgement, retrying with backoff while it fails.

        Only returns once acknowledged: a message is never counted done on a failed send. Gives up
        (raising) only when the worker is closing, so that the offset stays uncommitted; with
        ``RecordTooLarge`` for a record that no retry can deliver; or with ``PublishFailed`` (fatal)
        when the topic can never be written (``classify``).
        """
        delay = self._backoff[0]
        while True:
            attempt_at = time.monotonic()
            try:
                async with self._slots:
                    ack = await self._producer.send(topic, record.value, key=record.key,
                                                    headers=record.headers)
                    # Shielded: cancelling this message's task (revoke, drain cut) must not cancel the
                    # producer's own delivery future, which aiokafka still resolves.
                    await asyncio.shield(ack)
                if self._on_trouble is not None:
                    self._on_trouble(False)
                self._acknowledged(topic)
                return
            except _TOO_LARGE as exc:
                raise RecordTooLarge(f"record of {len(record.value)} bytes for {topic} refused: "
                                     f"{type(exc).__name__}: {exc}") from exc
            except KafkaError as exc:
                if self._closing:
                    raise
                if self._on_trouble is not None:
                    self._on_trouble(True)
                await self._judge(topic, exc, attempt_at)  # raises PublishFailed when it is permanent
                self._log.warning("publish failed; retrying", topic=topic, error=f"{type(exc).__name__}: {exc}",
                                  retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])

    async def publish_many(self, topic: str, records: Sequence[Record]) -> list[RecordTooLarge | None]:
        """``publish`` of each record, by produce batches: the records grouped by the partition the
        producer's partitioner gives each (``by_partition``), one ``send_batch`` per group and the acks
        awaited together (one future per batch, not one send, future and await per record: issue 11).
        Returns, per record, None once acknowledged or the ``RecordTooLarge`` that ``publish`` raised.

        Any failure of a batch (broker away, a record too large for it, ...) sends its records again one
        by one through ``publish``, which retries, judges and refuses exactly as for a single record;
        a batch that reached the broker before failing may so be written twice (at-least-once, as a
        retried single send). While publishing is failing, records go that way from the start."""
        out: list[RecordTooLarge | None] = [None] * len(records)
        alone: list[int] = []
        sent: list[tuple[asyncio.Future, list[int]]] = []
        if self._failing_since is not None or self._closing:
            alone = list(range(len(records)))
        else:
            try:
                await self._send_batches(topic, records, sent, alone)
            except KafkaError:
                placed = {i for _, idx in sent for i in idx}
                alone = sorted(set(range(len(records))) - placed)
        if sent:
            acked = False
            for future, idx in sent:
                try:
                    await future
                    acked = True
                except KafkaError:
                    alone.extend(idx)
            if acked:
                if self._on_trouble is not None:
                    self._on_trouble(False)
                self._acknowledged(topic)

        async def one(i: int) -> None:
            try:
                await self.publish(topic, records[i])
            except RecordTooLarge as exc:
                out[i] = exc
        if alone:
            await asyncio.gather(*(one(i) for i in sorted(alone)))
        return out

    async def _send_batches(self, topic: str, records: Sequence[Record], sent: list[tuple[asyncio.Future, list[int]]],
                            alone: list[int]) -> None:
        """Queue ``records`` in produce batches, appending (ack future, record indices) to ``sent``; a
        record that does not fit in a batch of its own goes to ``alone`` (``publish`` judges it)."""
        producer = self._producer
        partitions, available = await placement(producer, topic)
        groups = by_partition([r.key for r in records], producer._partitioner, partitions, available)
        for partition, indices in groups.items():
            batch, members = producer.create_batch(), []
            for i in indices:
                r = records[i]
                if batch.append(timestamp=None, key=r.key, value=r.value, headers=r.headers) is not None:
                    members.append(i)
                    continue
                if members:  # full: send it, start the next
                    await self._send_batch(topic, partition, batch, members, sent)
                    batch, members = producer.create_batch(), []
                    if batch.append(timestamp=None, key=r.key, value=r.value, headers=r.headers) is not None:
                        members.append(i)
                        continue
                alone.append(i)
            if members:
                await self._send_batch(topic, partition, batch, members, sent)

    async def _send_batch(self, topic: str, partition: int, batch: Any, members: list[int],
                          sent: list[tuple[asyncio.Future, list[int]]]) -> None:
        for _ in members:  # the same bound on unacknowledged records as ``publish``
            await self._slots.acquire()
        try:
            future = await self._producer.send_batch(batch, topic, partition=partition)
        except BaseException:
            for _ in members:
                self._slots.release()
            raise
        # Released when the ack (or a failure, or a cut of the waiting task) resolves the future, however
        # the caller ends.
        future.add_done_callback(lambda _f, n=len(members): self._release(n))
        sent.append((future, members))

    def _release(self, n: int) -> None:
        for _ in range(n):
            self._slots.release()

    async def _judge(self, topic: str, exc: KafkaError, attempt_at: float) -> None:
        kind, why, cause = classify(exc), f"{type(exc).__name__}: {exc}", type(exc)
        if kind == "missing":
            kind, why, cause = await self._why_missing(topic, why)
        if kind == "permanent":
            failure = PublishFailed(topic, why, _ADVICE.get(cause, "retrying cannot help; fix the "
                                                            "configuration and restart"))
            self._log.error("publish failed for good", topic=topic, error=str(failure))
            raise failure from exc
        now = time.monotonic()
        if kind == "missing":
            since = self._missing_since.setdefault(topic, attempt_at)
            if now - since >= self._stall_after:
                failure = PublishFailed(topic, f"it does not exist (missing for {now - since:.1f} s)",
                                        _ADVICE[E.UnknownTopicOrPartitionError])
                self._log.error("publish failed for good", topic=topic, error=str(failure))
                raise failure from exc
        if self._failing_since is None:
            self._failing_since = attempt_at
        if not self._stalled and now - self._failing_since >= self._stall_after:
            self._stalled = True
            self._log.error("publishing stalled; not ready until the broker acknowledges again", topic=topic,
                            failing_for_s=round(now - self._failing_since, 1), error=why)
            if self.on_stalled is not None:
                self.on_stalled(True)

    async def _why_missing(self, topic: str, why: str) -> tuple[str, str, type[BaseException]]:
        """An unknown topic: ask the broker why (the producer only times out), at most once a second per
        topic. Invalid or unauthorised: permanent; missing or being created: missing; it exists (a
        leader moving) or no answer: retriable."""
        now = time.monotonic()
        cached = self._described.get(topic)
        if cached is not None and now - cached[0] < DESCRIBE_CACHE_S:
            return cached[1]
        missing = E.UnknownTopicOrPartitionError
        verdict: tuple[str, str, type[BaseException]]
        problem = topic_name_problem(topic)
        if problem:
            verdict = ("permanent", problem, E.InvalidTopicError)
        else:
            try:
                error = await asyncio.wait_for(topic_error(self._producer, topic), TOPIC_CHECK_TIMEOUT_S)
            except (KafkaError, asyncio.TimeoutError, OSError) as exc:
                verdict = ("retriable", f"{why} (metadata request failed too: {type(exc).__name__}: {exc})", missing)
            else:
                if error is None:
                    verdict = ("retriable", why, missing)
                elif error in (missing, E.LeaderNotAvailableError):
                    verdict = ("missing", f"{why} (the broker says {error.__name__})", missing)
                else:
                    verdict = (classify(error()), f"the broker says {error.__name__}", error)
        self._described[topic] = (now, verdict)
        return verdict

    def _acknowledged(self, topic: str) -> None:
        self._failing_since = None
        self._missing_since.pop(topic, None)
        if self._stalled:
            self._stalled = False
            self._log.info("publishing again")
            if self.on_stalled is not None:
                self.on_stalled(False)

    async def flush(self) -> None:
        await self._producer.flush()

    async def stop(self) -> None:
        self._closing = True
        try:
            await self._producer.stop()
        except (KafkaError, WorkerError) as exc:
            self._log.warning("producer stop failed", error=str(exc))
