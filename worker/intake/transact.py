"""Exactly-once results (processing_guarantee=exactly-once): one Kafka transaction per commit cycle.

Each intake owns one transactional producer, its id derived from the consumer group, the host name (the
pod's name in Kubernetes) and the intake's index: stable across restarts of the same pod, so the
restarted intake's ``InitProducerId`` fences its killed predecessor and aborts the transaction that one
left open (docs/guarantees.md says what this fencing does not cover).

``TransactionalPublisher`` replaces the acknowledged send of ``Publisher``: a result or DLQ record is
*staged* (``worker.policy.transactions``) and the message counts as finished in the offset tracker; a
record the producer would refuse for its size raises ``RecordTooLarge`` at once, so the message handler
sends the smaller DLQ record instead, exactly as with at-least-once.

``TransactionalCommitter.commit``, the one commit cycle (interval, revoke, shutdown; serialised):
  1. take, per assigned partition, the end of the contiguous finished prefix (OffsetTracker) and the
     staged outputs below it, in offset order (``plan_transaction``); nothing moved: done;
  2. begin a transaction; produce those results and DLQ records; wait for every acknowledgement;
  3. add the input positions to it (``send_offsets_to_transaction``, the consumer group's offsets);
  4. commit it; only then mark the positions committed. No separate consumer offset commit exists.
Every step is bounded (the producer's transaction timeout in the interval loop, ``BROKER_TIMEOUT_S`` on
revoke and shutdown). Any failure, a timeout or a cut is fatal: the open transaction is aborted where
the producer still can, the worker stops non-zero, and the broker (or the restart's fencing) aborts
what is left: nothing of a failed cycle becomes visible to read_committed consumers, and the restart
redoes those messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka import errors as E
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.errors import ConfigError, FatalError
from worker.health import HealthState
from worker.intake.commit import BROKER_TIMEOUT_S, Committer, _names
from worker.intake.publish import _TOO_LARGE, Publisher, RecordTooLarge, publish_each
from worker.intake.records import HOST, Record
from worker.metrics import Metrics
from worker.policy.offsets import OffsetTracker
from worker.policy.transactions import StagedOutputs, plan_transaction

TRANSACTION_TIMEOUT_MS = 60_000  # the producer's; the broker aborts a transaction open this long
CYCLE_TIMEOUT_S = TRANSACTION_TIMEOUT_MS / 1000.0 - 5.0  # ours ends first, loudly

# What InitProducerId answers on a broker that cannot do transactions, or refuses this client them.
_NO_TRANSACTIONS = (E.UnsupportedVersionError, E.IncompatibleBrokerVersion, E.UnknownError,
                    E.InvalidRequestError, E.UnsupportedForMessageFormatError)
_NOT_ALLOWED = (E.TransactionalIdAuthorizationFailed, E.ClusterAuthorizationFailedError)


def transactional_id(group_id: str, intake_index: int, host: str = HOST) -> str:
    """``<group>.<host>.intake-<n>``: the same for a restart of the same pod (host name = pod name in
    Kubernetes), different for every intake and every pod of the group."""
    return f"{group_id}.{host}.intake-{intake_index}"


class TransactionalPublisher(Publisher):
    """Stages outputs for the next transaction instead of sending them; owns the transactional producer."""

    def __init__(self, producer: Any, max_request_size: int, cycle_at: int,
                 on_broker_trouble: Callable[[bool], None] | None = None) -> None:
        super().__init__(producer, max_pending=1, on_broker_trouble=on_broker_trouble)
        self.producer = producer
        self.staged = StagedOutputs()
        self._max_request_size = max_request_size
        self._cycle_at = max(1, cycle_at)
        self.wanted = asyncio.Event()  # enough is staged: the committer runs a cycle before its interval

    async def start(self) -> None:
        """Start the producer: connect, find the transaction coordinator, ``InitProducerId`` (which fences
        an earlier producer of our id and aborts its open transaction). A broker that answers but has no
        transactions is a ``ConfigError``; an unreachable one raises KafkaError (the caller retries)."""
        tid = getattr(getattr(self.producer, "_txn_manager", None), "transactional_id", None)
        try:
            await self.producer.start()
        except _NOT_ALLOWED as exc:
            raise ConfigError(
                f"processing_guarantee=exactly-once: the broker refuses transactional id {tid!r} "
                f"({type(exc).__name__}): grant this client's principal Write and Describe on TransactionalId "
                f"{tid!r} (a prefixed ACL on the group id covers every intake and pod), or use at-least-once"
            ) from exc
        except _NO_TRANSACTIONS as exc:
            raise ConfigError(
                f"processing_guarantee=exactly-once needs a broker with transactions, and this one "
                f"({self.producer.client._bootstrap_servers}) refused InitProducerId for transactional id {tid!r} "
                f"with {type(exc).__name__}: {exc} (the embedded tansu broker has no transactional producer; "
                f"Apache Kafka, Redpanda, MSK and Confluent do). Use --processing-guarantee at-least-once "
                f"or a broker with transactions") from exc

    async def publish(self, topic: str, record: Record) -> None:
        """Stage ``record`` for its input's transaction. Raises ``RecordTooLarge`` when the producer would
        refuse it (its own max_request_size), as an acknowledged send would."""
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
        if size > self._max_request_size:
            raise RecordTooLarge(f"record of {len(record.value)} bytes for {topic} refused: it is {size} bytes "
                                 f"serialised, over producer_max_request_size={self._max_request_size}")
        source = record.source
        if source is None:
            raise FatalError(f"a record for {topic} names no input: it cannot join the input's transaction")
        self.staged.stage(TopicPartition(source.topic, source.partition), source.offset, (topic, record))
        if len(self.staged) >= self._cycle_at:
            self.wanted.set()

    async def publish_many(self, topic: str, records: Any) -> list[RecordTooLarge | None]:
        """Stage each (``publish``): the batch is sent by the commit cycle, in its transaction."""
        return await publish_each(self, topic, records)

    async def flush(self) -> None:
        """Nothing is sent outside a commit cycle."""

    def forget(self, tp: TopicPartition) -> None:
        self.staged.forget(tp)


class TransactionalCommitter(Committer):
    """Commits by transaction (module docstring); the probe and the lag metric are ``Committer``'s."""

    def __init__(self, consumer: Callable[[], Any], publisher: Callable[[], TransactionalPublisher],
                 tracker: OffsetTracker, metrics: Metrics, health: HealthState, group: str,
                 fail: Callable[[BaseException], None]) -> None:
        super().__init__(consumer, tracker, metrics, health, group=group)
        self._publisher = publisher
        self._fail = fail
        self._lock = asyncio.Lock()
        self.failed: BaseException | None = None
        self.cycles = 0  # committed transactions

    async def commit(self, partitions: set[TopicPartition] | None = None, timeout_s: float = BROKER_TIMEOUT_S
                     ) -> bool:
        """One commit cycle over every assigned partition (revoke and shutdown commit all: a superset of
        what they ask for). Returns True when committed (or nothing moved), False after a failure, which
        has already stopped the worker."""
        async with self._lock:
            if self.failed is not None:
                return False
            txn = plan_transaction(self.tracker, self._publisher().staged, self._consumer().assignment())
            if not txn:
                return True
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._produce(txn), timeout=timeout_s)
            except asyncio.CancelledError as exc:
                self._failed(FatalError("a commit cycle was cut while its transaction was open (the worker "
                                        "was stopping); the broker aborts it"), exc)
                raise
            except Exception as exc:  # noqa: BLE001 - every failure of a cycle is fatal
                await self._abort()
                self._failed(self._explain(exc, timeout_s), exc)
                return False
            self.tracker.mark_committed(dict(txn.positions))
            self.metrics.commits.inc()
            self.cycles += 1
            self._log.debug("transaction committed", records=len(txn.outputs), positions=_names(dict(txn.positions)),
                            ms=round((time.monotonic() - started) * 1000.0, 1))
            return True

    async def _produce(self, txn: Any) -> None:
        producer = self._publisher().producer
        await producer.begin_transaction()
        acks = []
        for _tp, _offset, (topic, record) in txn.outputs:
            acks.append(await producer.send(topic, record.value, key=record.key, headers=record.headers))
        for ack in acks:
            await ack  # a refused batch is not part of the transaction: it must not be committed without it
        await producer.send_offsets_to_transaction(dict(txn.positions), self.group)
        await producer.commit_transaction()

    async def _abort(self) -> None:
        producer = self._publisher().producer
        try:
            await asyncio.wait_for(producer.abort_transaction(), timeout=BROKER_TIMEOUT_S)
            self._log.warning("transaction aborted")
        except BaseException as exc:  # noqa: BLE001 - fenced, dead sender, or it was committing: nothing to do
            self._log.warning("transaction abort impossible; the broker aborts it when it times out or the "
                              "restart fences it", error=f"{type(exc).__name__}: {exc}")

    def _explain(self, exc: BaseException, timeout_s: float) -> FatalError:
        if isinstance(exc, asyncio.TimeoutError):
            return FatalError(f"a transaction did not commit within {timeout_s:g} s (broker unreachable or the "
                              f"transaction coordinator stalled); the worker stops and the restart redoes it")
        if isinstance(exc, E.ProducerFenced):
            return FatalError("this intake's transactional producer was fenced: another producer with the same "
                              "transactional id started (a second worker with the same group on this host, or "
                              "the broker timed the transaction out); stopping, nothing of it is committed")
        if isinstance(exc, _TOO_LARGE):
            return FatalError(f"the broker refused a record of the transaction for its size ({type(exc).__name__}): "
                              f"set producer_max_request_size at or below the broker's message.max.bytes so such "
                              f"records are found before the transaction and dead-lettered")
        return FatalError(f"transaction failed: {type(exc).__name__}: {exc}")

    def _failed(self, error: FatalError, cause: BaseException) -> None:
        self.failed = error
        self.metrics.commit_failures.inc()
        self._log.error("transaction failed; stopping", error=str(error), cause=f"{type(cause).__name__}: {cause}")
        self._fail(error)

    async def commit_loop(self, interval_s: float) -> None:
        """A cycle every ``interval_s``, or sooner once ``cycle_at`` outputs are staged (so the interval is
        not what bounds throughput); after a cycle that moved nothing, the full interval."""
        idle = False
        while self.failed is None:
            wanted = self._publisher().wanted
            if idle:
                await asyncio.sleep(interval_s)
            elif not wanted.is_set():
                try:
                    await asyncio.wait_for(wanted.wait(), timeout=interval_s)
                except asyncio.TimeoutError:
                    pass
            wanted.clear()
            before = self.cycles
            await self.commit(timeout_s=CYCLE_TIMEOUT_S)
            idle = self.cycles == before
