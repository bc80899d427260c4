"""The live intake's consumer on librdkafka (confluent-kafka), behind the aiokafka calls the worker makes.

Why: aiokafka reads and parses fetch responses in Python on the intake's event loop; with 76 KB images
that is most of the loop's CPU per message (docs/benchmarks.md, "Where the intake's event loop spends its
time"). librdkafka fetches, decompresses, checks CRCs and parses on its own native threads; the loop only
takes finished messages off its queue. ``kafka_consumer=librdkafka`` selects it for a live intake; a replay
(manual assignment, bounded ranges) and exactly-once (transactions bound to aiokafka's group membership)
keep aiokafka.

One thread calls the consumer ("rdkafka-poll", worker.intake.rdkafka_owner). confluent-kafka lets one
caller at a time into a Consumer: a call from another thread waits, with no timeout, until the one in
progress returns, and that may be a ``consume()`` running a rebalance callback that waits for the event
loop. Calls from the loop or a second thread so stalled or deadlocked the worker (CI: a sync commit held
the consumer for a whole broker stall; the cached high watermark, read on the loop, waited on a callback
that waited on the loop). So every call, consume, pause, resume, commit, close, is queued to that thread, in order, and
nothing else touches the handle. Commits are synchronous there: while the broker does not answer one,
polls wait behind it (nothing could be fetched meanwhile anyway), and a commit the worker stopped
waiting for before it started is never sent. Offset and metadata lookups go through an admin client of
their own, each bounded by its request timeout.

Rebalances. librdkafka runs the rebalance callbacks inside ``consume()`` on the owner thread and lets
the partitions go when the callback returns. The callback hands the worker's async hook to the event loop
and, until it is done, runs on its own thread the calls the hook makes (the commit of a revoke, the pause
of an assignment: re-entrant calls, which confluent-kafka admits): so a revoke drains, flushes and commits
before anyone else can own the partitions, what aiokafka's awaited listener gives. A lost assignment
(the session timed out) runs the worker's lost hook, which does not commit: the membership is gone. An
assignment is applied, and resumed (librdkafka would keep a pause from before the rebalance; aiokafka
does not), before its hook runs. The eager protocol and the round-robin assignor, as aiokafka's
defaults.

Backpressure. librdkafka's ``pause()`` drops what it has prefetched for the partitions (up to
``queued.max.messages.kbytes``) and ``resume()`` fetches it all again from the application's position.
The worker pauses its whole assignment at every backpressure
high mark and resumes at the low mark (every second or so when the GPU is the bound), so each cycle threw
away up to one fetch of images and left the intake without records while they came again (a 2-CPU VM: 250-
450 ms without results every second; an H100: the GPU idle a third of the time, docs/benchmarks.md). A pause
of the whole assignment is therefore a hold here: ``getmany`` returns nothing and does not poll, and
librdkafka's bounded queue (``queued.max.messages.kbytes``) stops its fetching by itself. Rebalance
callbacks run only inside a poll, and librdkafka leaves the group after ``max.poll.interval.ms`` without
one, so a hold that lasts ``hold_limit_s`` becomes librdkafka's pause and polling goes on. A pause of some
partitions only is librdkafka's at once.

The assignment is kept here as a frozen set of aiokafka ``TopicPartition`` (the worker asks for it per
message); records come out as ``Fetched``, with the attributes of aiokafka's ``ConsumerRecord`` that the
worker reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from worker import log
from worker.errors import FatalError
from worker.intake.rdkafka_common import connection_config, new_client, reach_broker, text
from worker.intake.rdkafka_owner import Owner
from worker.intake.commit import BROKER_TIMEOUT_S  # offset and metadata lookups wait as long as commits and probes

CONNECT_TIMEOUT_S = 10.0  # start(): a metadata round trip, as aiokafka's start() makes one
HOLD_LIMIT_S = 5.0  # longest a pause of the whole assignment is held without polling (module doc)


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
    return {
        **connection_config(settings),
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
        # when that queue is full (the worker's in-flight bound holds records back), librdkafka postpones the
        # partition's next fetch by this long (default 1000 ms), so a worker that caught up could find the
        # queue empty and wait out the rest: with the pause (module doc), what starved the GPU in run 23
        # (docs/benchmarks.md). A short recheck costs a wake-up per 10 ms while full.
        "fetch.queue.backoff.ms": 10,
        "check.crcs": bool(settings.check_crcs),
        "isolation.level": "read_uncommitted",  # as the aiokafka consumer for at-least-once
        "partition.assignment.strategy": "roundrobin",  # aiokafka's default: a group may mix both clients
        "enable.partition.eof": False,
    }


def admin_config(conf: dict[str, Any]) -> dict[str, Any]:
    """The lookups' admin client: the consumer's connection and security settings, nothing of its group.
    Quiet: nothing polls it, so it neither logs (librdkafka would write raw lines to stderr) nor queues
    error events; a lookup that fails says why to its caller."""
    shared = {k: v for k, v in conf.items()
              if k in ("bootstrap.servers", "client.id", "security.protocol") or k.startswith(("ssl.", "sasl."))}
    return {**shared, "log_level": 0}


class RdKafkaConsumer:
    """aiokafka's AIOKafkaConsumer calls that worker.app, .commit and .rebalance make, on librdkafka."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self._conf = dict(conf)
        self._consumer: Any = None
        self._admin: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owner: Owner | None = None
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._highwater: dict[TopicPartition, int] = {}  # of the last fetch, read on the owner thread
        self._listener: Any = None
        self._closing = False
        self._fatal: BaseException | None = None
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        # backpressure (module doc), on the loop but reset by an assignment: the assignment held without
        # polling and since when, and the partitions paused in librdkafka (a hold there once it holds them all)
        self._hold: frozenset[TopicPartition] | None = None
        self._hold_since = 0.0
        self._paused: set[TopicPartition] = set()
        # below librdkafka's limit between polls, whatever the settings say
        self.hold_limit_s = min(HOLD_LIMIT_S, int(conf.get("max.poll.interval.ms", 300_000)) / 2000.0)
        self._log = log.get("worker.rdkafka")

    # --- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        import confluent_kafka
        from confluent_kafka.admin import AdminClient

        self._loop = asyncio.get_running_loop()
        self._consumer = new_client(confluent_kafka.Consumer, self._conf, "kafka_consumer", self._on_error, self._log)
        self._admin = new_client(AdminClient, admin_config(self._conf), "kafka_consumer")
        self._owner = Owner("rdkafka-poll")
        await reach_broker(lambda t: self._owner.submit(lambda: self._consumer.list_topics(timeout=t)),
                           self._conf, CONNECT_TIMEOUT_S)

    async def stop(self) -> None:
        """Leave the group and close (after any poll in progress). The worker has drained and committed
        by now, so the revoke that closing brings runs no hook."""
        if self._consumer is None or self._owner is None:
            return
        self._closing = True
        try:
            await self._owner.submit(self._consumer.close, reentrant=False)
        finally:
            self._owner.close()

    def subscribe(self, topics: Iterable[str], listener: Any) -> None:
        self._listener = listener
        wanted = list(topics)
        self._owner.post(lambda: self._consumer.subscribe(wanted, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                                          on_lost=self._on_lost), self._subscribe_failed)

    def _subscribe_failed(self, exc: BaseException) -> None:
        self._fatal = RdKafkaError(f"subscribe failed: {text(exc)}")

    # --- consuming -----------------------------------------------------------------------------
    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Fetched]]:
        if self._fatal is not None:
            raise self._fatal
        if self._hold is not None and not self._hold <= self._paused:
            if time.monotonic() - self._hold_since < self.hold_limit_s:
                await asyncio.sleep(timeout_ms / 1000.0)
                return {}
            # held long enough: librdkafka's pause, and polls again (for the callbacks inside them)
            self._pause_resume("pause", self._hold)
        n = max(1, max_records or 500)
        messages = await self._owner.submit(lambda: self._consume(n, timeout_ms / 1000.0), reentrant=False)
        if self._fatal is not None:  # a hook failed inside this poll
            raise self._fatal
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

    def _consume(self, n: int, timeout_s: float) -> list[Any]:
        """On the owner thread: one poll, and the high watermarks its fetches brought (no round trip).

        A poll answers as aiokafka's ``getmany`` does, which the worker is built around: whatever is queued
        now (up to ``n``); with nothing queued, the first record to come within ``timeout_s`` and what came
        with it. librdkafka's own batch call instead waits until all ``n`` are there or the whole timeout
        has passed, so below the peak (room for hundreds, a few queued) every record waited up to the
        worker's poll timeout (100 ms) before it was even started."""
        messages = self._consumer.consume(n, 0)
        if not messages and timeout_s > 0:
            messages = self._consumer.consume(1, timeout_s)
            if messages and n > 1:
                messages.extend(self._consumer.consume(n - 1, 0))
        for key in {(m.topic(), m.partition()) for m in messages if m.error() is None}:
            try:
                _, high = self._consumer.get_watermark_offsets(_native([self._tp(*key)])[0], cached=True)
            except Exception:  # noqa: BLE001 - not known yet
                continue
            if high is not None and high >= 0:
                self._highwater[self._tp(*key)] = high
        return messages

    def assignment(self) -> frozenset[TopicPartition]:
        return self._assigned

    def pause(self, *partitions: TopicPartition) -> None:
        """The whole assignment: held (no polls, librdkafka keeps its queue); some partitions: paused."""
        owned = frozenset(tp for tp in partitions if tp in self._assigned)
        if owned and owned == self._assigned:
            if self._hold != owned:
                self._hold, self._hold_since = owned, time.monotonic()
            return
        self._pause_resume("pause", owned)

    def resume(self, *partitions: TopicPartition) -> None:
        if self._hold is not None and self._hold & set(partitions):
            self._hold = None
        self._pause_resume("resume", self._paused & set(partitions))

    def _pause_resume(self, what: str, partitions: Iterable[TopicPartition]) -> None:
        """Queued on the owner thread, in order with the polls. Until it runs, a poll may still return
        records of these partitions: the worker holds what does not fit (backpressure's byte bound), as
        with any fetched record. Only a paused partition is resumed: librdkafka's resume restarts the
        fetching from the application's position, dropping its queue."""
        owned = [tp for tp in partitions if tp in self._assigned]
        if owned:
            (self._paused.update if what == "pause" else self._paused.difference_update)(owned)
            native = _native(owned)
            self._owner.post(lambda: getattr(self._consumer, what)(native), self._call_failed)

    def _call_failed(self, exc: BaseException) -> None:
        self._log.warning("librdkafka call failed", error=f"{type(exc).__name__}: {exc}")

    # --- offsets -------------------------------------------------------------------------------
    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these positions (next offsets to read) and wait for the broker's answer (the caller
        bounds the wait). Synchronous on the owner thread: inside a rebalance callback that is the only
        way to have the answer before the partitions go, and elsewhere it holds the polls for one round
        trip (librdkafka keeps fetching meanwhile); while the broker does not answer no poll could
        bring anything anyway, and the commits the worker gave up on meanwhile are never sent."""
        import confluent_kafka

        native = _native(offsets, offsets)
        try:
            answer = await self._owner.submit(lambda: self._consumer.commit(offsets=native, asynchronous=False))
        except confluent_kafka.KafkaException as exc:
            raise RdKafkaError(f"commit failed: {text(exc)}") from None
        failed = [f"{p.topic}:{p.partition}: {p.error.str()}" for p in answer or () if p.error is not None]
        if failed:
            raise RdKafkaError("commit failed for " + "; ".join(failed))

    async def committed(self, tp: TopicPartition) -> int | None:
        from confluent_kafka import ConsumerGroupTopicPartitions

        group = self._conf["group.id"]
        request = [ConsumerGroupTopicPartitions(group, _native([tp]))]
        answer = await self._admin_call(lambda: self._admin.list_consumer_group_offsets(
            request, request_timeout=BROKER_TIMEOUT_S)[group])
        found = answer.topic_partitions
        offset = found[0].offset if found else -1
        return offset if offset >= 0 else None

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        from confluent_kafka.admin import OffsetSpec

        wanted = list(partitions)
        if not wanted:
            return {}
        futures = await self._admin_call(lambda: self._admin.list_offsets(
            {n: OffsetSpec.latest() for n in _native(wanted)}, request_timeout=BROKER_TIMEOUT_S))
        by_key = {(tp.topic, tp.partition): tp for tp in wanted}
        answers = await asyncio.gather(*(self._admin_call(lambda f=f: f) for f in futures.values()))
        return {by_key[(n.topic, n.partition)]: a.offset for n, a in zip(futures, answers)}

    def highwater(self, tp: TopicPartition) -> int | None:
        """The high watermark of the partition's last fetch (no round trip)."""
        return self._highwater.get(tp)

    async def topics(self) -> set[str]:
        metadata = await self._admin_call(lambda: asyncio.get_running_loop().run_in_executor(
            None, lambda: self._admin.list_topics(timeout=BROKER_TIMEOUT_S)))
        return set(metadata.topics)

    async def _admin_call(self, start: Callable[[], Any]) -> Any:
        """A lookup through the admin client, never the consumer's handle (bounded by its request
        timeout): what ``start()`` returns, awaited if it is a future."""
        import confluent_kafka

        try:
            started = start()
            if isinstance(started, concurrent.futures.Future):
                return await asyncio.wrap_future(started)
            return await started if asyncio.isfuture(started) or asyncio.iscoroutine(started) else started
        except confluent_kafka.KafkaException as exc:
            raise RdKafkaError(text(exc)) from None

    # --- callbacks (the owner thread, inside consume()) ------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Apply the assignment, resumed, then run the worker's hook."""
        consumer.assign(partitions)
        self._assigned = frozenset(self._tp(p.topic, p.partition) for p in partitions)
        # librdkafka keeps a partition's pause across unassign and assign; aiokafka, whose semantics the
        # worker relies on, starts a new assignment unpaused (the hook pauses it again while backpressure
        # holds). Without this a pause from before a rebalance outlives it, and a worker that is no longer
        # paused waits forever for records.
        if partitions:
            consumer.resume(partitions)
        # so is any hold (the loop waits for this poll; the hook, which may hold again, runs after this)
        self._hold, self._paused = None, set()
        if not self._closing and self._listener is not None:
            self._hook(self._listener.on_partitions_assigned, set(self._assigned))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Run the worker's hook (drain, flush, commit) to its end, then let the partitions go."""
        self._let_go(consumer, partitions, "on_partitions_revoked")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        """The membership is gone (session timed out): the worker's lost hook, which does not commit
        (no commit of a lost member is accepted); a listener without one gets the revoke hook. The
        partitions leave the assignment first, so no periodic commit or new work touches them."""
        if hasattr(self._listener, "on_partitions_lost"):
            self._assigned = frozenset(self._assigned - {self._tp(p.topic, p.partition) for p in partitions})
            self._let_go(consumer, partitions, "on_partitions_lost")
        else:
            self._let_go(consumer, partitions, "on_partitions_revoked")

    def _let_go(self, consumer: Any, partitions: list[Any], hook: str) -> None:
        revoked = {self._tp(p.topic, p.partition) for p in partitions}
        try:
            if not self._closing and self._listener is not None:
                self._hook(getattr(self._listener, hook), revoked)
        finally:
            self._assigned = frozenset(self._assigned - revoked)
            for tp in revoked:
                self._highwater.pop(tp, None)
            consumer.unassign()

    def _hook(self, hook: Callable[[set[TopicPartition]], Any], partitions: set[TopicPartition]) -> None:
        """Run an async hook on the event loop; meanwhile run here the calls it makes (``serve_until``).
        The worker's hooks turn their own failures into a fatal stop; anything else that escapes is
        fatal here."""
        done = asyncio.run_coroutine_threadsafe(hook(partitions), self._loop)
        self._owner.serve_until(done)
        try:
            done.result()
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
