"""Result and dead-letter records (pure): value, key and headers of what the intake publishes.

Every record names its input (``Source``: topic, partition, offset, timestamp) in headers, and a result
in its JSON too, so a consumer of the output topics can deduplicate on it (at-least-once). A DLQ record
keeps the original value, key and headers unchanged and says why in ``error-*`` headers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker import __version__
from worker.models.postprocess import postprocess
from worker.models.spec import PipelineSpec

Headers = list[tuple[str, bytes]]
HOST = socket.gethostname()


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
    source: Source | None = None  # the input it is for (exactly-once stages it under that offset)


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
    return Record(orjson.dumps(doc), source.key, headers, source)


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
    return Record(value or b"", source.key, headers, source)


def dlq_record_without_value(source: Source, value: bytes | None,
                             original_headers: Sequence[tuple[str, bytes]] | None, error: BaseException,
                             refused: BaseException) -> Record:
    """The DLQ record when the original value itself is too large to be sent: headers only, and a
    ``dlq-value-omitted`` header that says so (the input is still in its topic at source-offset)."""
    record = dlq_record(source, None, original_headers, error)
    note = f"{len(value or b'')} bytes; the record with it was refused: {type(refused).__name__}: {refused}"
    return Record(b"", record.key, [*record.headers, ("dlq-value-omitted", note.encode("utf-8", "replace")[:1000])],
                  source)
