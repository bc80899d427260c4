"""Publish stage: result and dead-letter records, and the producer that must acknowledge them.

``result_record`` and ``dlq_record`` are pure (record = value, key, headers). ``Publisher`` wraps the
aiokafka producer with a bound on unacknowledged records and retries with backoff while the broker is
away, because a message only counts as done, and its offset as committable, once the broker has
acknowledged its result or its DLQ record.

A record that can never be sent (over ``producer_max_request_size`` or the broker's message size limit)
is not retried: it raises ``RecordTooLarge`` so the caller can send something smaller instead (a DLQ
record without the original value) rather than hold the partition's offsets back forever.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from worker import __version__, log
from worker.errors import WorkerError
from worker.models.postprocess import postprocess
from worker.models.spec import PipelineSpec

Headers = list[tuple[str, bytes]]
HOST = socket.gethostname()
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


class RecordTooLarge(WorkerError):
    """The producer or the broker refuses a record for its size: retrying the same record cannot help."""


@dataclass(frozen=True)
class Source:
    """Where a message came from; every output names it, so consumers can deduplicate on it."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None

    def headers(self) -> Headers:
        return [("source-topic", self.topic.encode()), ("source-partition", str(self.partition).encode()),
                ("source-offset", str(self.offset).encode()), ("source-timestamp", str(self.timestamp).encode())]

    def where(self) -> str:
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"


@dataclass(frozen=True)
class Record:
    value: bytes
    key: bytes | None
    headers: Headers


def result_record(source: Source, pipeline: PipelineSpec, outputs: Sequence[dict[str, Any]], *,
                  image: dict[str, Any], correlation_id: str | None, timings_s: dict[str, float],
                  batch_size: int, postprocessed: Sequence[dict[str, Any]] | None = None) -> Record:
    """The JSON result of one image: each model's post-processed outputs, source and timings.
    ``postprocessed`` (per model, from ``postprocess_batch`` on the GPU thread) skips ``postprocess``."""
    if postprocessed is None:
        postprocessed = [postprocess(out, spec) for spec, out in zip(pipeline.models, outputs)]
    doc = {
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset,
                   "timestamp": source.timestamp},
        "correlation_id": correlation_id,
        "image": image,
        "models": {
            spec.name: {"version": spec.version, "outputs": post}
            for spec, post in zip(pipeline.models, postprocessed)
        },
        "timings_ms": {name: round(seconds * 1000.0, 3) for name, seconds in timings_s.items()},
        "batch_size": batch_size,
        "worker": {"version": __version__, "host": HOST, "pid": os.getpid()},
    }
    headers = [("content-type", b"application/json"), *source.headers()]
    if correlation_id is not None:
        headers.append(("correlation-id", correlation_id.encode()))
    return Record(orjson.dumps(doc), source.key, headers)


def dlq_record(source: Source, value: bytes | None, original_headers: Sequence[tuple[str, bytes]] | None,
               error: BaseException) -> Record:
    """The original value and key, unchanged, with why it failed in headers (original headers kept)."""
    reason = getattr(error, "reason", type(error).__name__)
    headers = [
        *(original_headers or ()),
        ("error-class", type(error).__name__.encode()),
        ("error-reason", str(reason).encode()),
        ("error-message", str(error).encode("utf-8", "replace")[:4000]),
        *source.headers(),
        ("worker-version", __version__.encode()),
        ("worker-host", HOST.encode()),
    ]
    return Record(value or b"", source.key, headers)


def dlq_record_without_value(source: Source, value: bytes | None,
                             original_headers: Sequence[tuple[str, bytes]] | None, error: BaseException,
                             refused: BaseException) -> Record:
    """The DLQ record when the original value itself is too large to be sent: headers only, and a
    ``dlq-value-omitted`` header that says so (the input is still in its topic at source-offset)."""
    record = dlq_record(source, None, original_headers, error)
    note = f"{len(value or b'')} bytes; the record with it was refused: {type(refused).__name__}: {refused}"
    return Record(b"", record.key, [*record.headers, ("dlq-value-omitted", note.encode("utf-8", "replace")[:1000])])


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, max_pending: int,
                 on_broker_trouble: Callable[[bool], None] | None = None,
                 backoff_s: tuple[float, float] = (0.2, 10.0)) -> None:
        self._producer = producer
        self._slots = asyncio.Semaphore(max_pending)
        self._on_trouble = on_broker_trouble
        self._backoff = backoff_s
        self._closing = False
        self._log = log.get("publish")

    async def start(self) -> None:
        await self._producer.start()

    async def publish(self, topic: str, record: Record) -> None:
        """Send and wait for the broker's acknowledgement, retrying with backoff while it fails.

        Only returns once acknowledged: a message is never counted done on a failed send. Gives up
        (raising) only when the worker is closing, so that the offset stays uncommitted, or with
        ``RecordTooLarge`` for a record that no retry can deliver.
        """
        delay = self._backoff[0]
        while True:
            try:
                async with self._slots:
                    ack = await self._producer.send(topic, record.value, key=record.key,
                                                    headers=record.headers)
                    # Shielded: cancelling this message's task (revoke, drain cut) must not cancel the
                    # producer's own delivery future, which aiokafka still resolves.
                    await asyncio.shield(ack)
                if self._on_trouble is not None:
                    self._on_trouble(False)
                return
            except _TOO_LARGE as exc:
                raise RecordTooLarge(f"record of {len(record.value)} bytes for {topic} refused: "
                                     f"{type(exc).__name__}: {exc}") from exc
            except KafkaError as exc:
                if self._closing:
                    raise
                if self._on_trouble is not None:
                    self._on_trouble(True)
                self._log.warning("publish failed; retrying", topic=topic, error=f"{type(exc).__name__}: {exc}",
                                  retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])

    async def flush(self) -> None:
        await self._producer.flush()

    async def stop(self) -> None:
        self._closing = True
        try:
            await self._producer.stop()
        except (KafkaError, WorkerError) as exc:
            self._log.warning("producer stop failed", error=str(exc))
