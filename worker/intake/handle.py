"""One message through every stage: decode pool → GPU thread → result (or DLQ record) acknowledged.

``MessageHandler.handle`` is the body of the asyncio task the worker starts per consumed message. It
returns only after the broker acknowledged the message's result or DLQ record, and only then marks
the offset finished in the tracker; every other way out leaves it unfinished, so never committed:

- a ``PoisonMessage`` (bad input, or a model failing on it alone) → DLQ record, then finished;
- a ``RetriableError`` (device error) → counted and logged, left unfinished: a restart redoes it;
- any other ``WorkerError`` or an unexpected exception → ``fail``: the worker stops, non-zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from aiokafka import TopicPartition

from worker import log
from worker.errors import PoisonMessage, RetriableError, WorkerError
from worker.decode.message import (Decoded, Encoded, decode_encoded, decode_message, gpu_decodable, inspect_message,
                                is_envelope)
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest
from worker.policy.offsets import OffsetTracker
from worker.intake.publish import (Publisher, RecordTooLarge, Source, dlq_record, dlq_record_without_value,
                                 result_record)
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.settings import Settings


HYBRID_QUEUE_PER_THREAD = 4


class MessageHandler:
    def __init__(self, settings: Settings, pipeline: PipelineSpec, gpu: GpuThread, publisher: Publisher,
                 tracker: OffsetTracker, metrics: Metrics, counts: dict[str, int], decode_pool: Executor,
                 fail: Callable[[BaseException], None]) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.gpu = gpu
        self.publisher = publisher
        self.tracker = tracker
        self.metrics = metrics
        self.counts = counts
        self.decode_pool = decode_pool
        self.fail = fail
        # decoder=nvimgcodec falls back to cpu-reduced where the GPU thread could not start a decoder
        self._reduced = settings.decoder in ("cpu-reduced", "nvimgcodec", "hybrid")
        # decoder=hybrid: a JPEG is decoded here while the pool has room, else on the card. The card's JPEG
        # decode shares the SMs with inference (measured on an H200: decode beside ResNet-50 adds ~6 ms per
        # 128 images to the batch), so each image a CPU core decodes is card time won. Room: a few queued
        # per thread (a decode takes 1-3 ms), so that the threads stay busy between polls; the rest of a
        # poll goes to the card at once.
        self._cpu_slots = settings.decode_threads * HYBRID_QUEUE_PER_THREAD if settings.decoder == "hybrid" else 0
        self._cpu_busy = 0
        self._log = log.get("worker")

    async def handle(self, tp: TopicPartition, msg: Any, generation: int | None = None) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        consumed_at = time.monotonic()
        source = Source(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key)
        where = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        try:
            try:
                decoded: Decoded | Encoded
                future = loop.create_future()
                if self.gpu.decodes_on_device:
                    decoded = await self.check(msg)
                    if gpu_decodable(decoded) and self._cpu_busy >= self._cpu_slots:
                        request = InferenceRequest(None, future, loop, where, encoded=decoded)
                    else:  # OpenCV in the pool, as decoder=cpu; the GPU thread copies the rows in
                        self._cpu_busy += 1
                        try:
                            inputs = await self.in_pool(decode_encoded, decoded, self.pipeline, s.max_bytes,
                                                        s.max_pixels)
                        finally:
                            self._cpu_busy -= 1
                        request = InferenceRequest(inputs, future, loop, where)
                else:
                    decoded = await self.in_pool(decode_message, msg.value, msg.headers, self.pipeline,
                                                 s.max_bytes, s.max_pixels, self._reduced, s.max_jpeg_scans)
                    request = InferenceRequest(decoded.inputs, future, loop, where)
                self.metrics.decode_seconds.observe(decoded.decode_s)
                await self.gpu.put(request)
                result = await future
            except PoisonMessage as exc:
                await self.dead_letter(source, msg, exc, where)
            else:
                self.metrics.queue_seconds.observe(result.queue_s)
                record = result_record(
                    source, self.pipeline, result.outputs,
                    image={"width": decoded.width, "height": decoded.height, "format": decoded.format},
                    correlation_id=decoded.correlation_id, batch_size=result.batch_size,
                    postprocessed=result.postprocessed,
                    timings_s={"decode": decoded.decode_s, "queue": result.queue_s,
                               "inference": result.inference_s, "end_to_end": time.monotonic() - consumed_at})
                try:
                    await self.publisher.publish(s.output_topic, record)
                except RecordTooLarge as exc:
                    # The result can never be sent (huge model outputs): the input goes to the DLQ instead.
                    await self.dead_letter(source, msg, PoisonMessage(str(exc), reason="result_too_large"), where)
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

    async def in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.metrics.decode_queue_depth.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)
        finally:
            self.metrics.decode_queue_depth.dec()

    async def check(self, msg: Any) -> Encoded:
        """Header checks before the GPU thread decodes: ~8 us for a raw image, done right here on the
        event loop (a pool round trip costs more than that); a JSON envelope (base64 of up to max_bytes)
        goes to the pool."""
        s = self.settings
        if is_envelope(msg.value, msg.headers):
            return await self.in_pool(inspect_message, msg.value, msg.headers, s.max_bytes, s.max_pixels,
                                      s.max_jpeg_scans)
        return inspect_message(msg.value, msg.headers, s.max_bytes, s.max_pixels, s.max_jpeg_scans)

    async def dead_letter(self, source: Source, msg: Any, exc: PoisonMessage, where: dict) -> None:
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
