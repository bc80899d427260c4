"""The records of one partition from one poll, through every stage: decode pool → GPU → results (or DLQ
records) acknowledged.

``MessageHandler.handle_batch`` is the body of the asyncio task the worker starts per partition per poll
(issue 11, "per poll, not per record": one task, one pool submission per decode thread, one produce batch
per output partition and their acks awaited together, instead of a task, a pool round trip, a send and
an ack wait per record; on the demo pipeline that was most of the event loop's CPU per message). Each
record still has its own outcome, and a record's offset is marked finished in the tracker only after
the broker acknowledged its result or DLQ record; every other way out leaves it unfinished, so never
committed:

- a ``PoisonMessage`` (bad input, or a model failing on it alone) → DLQ record, then finished;
- a ``RetriableError`` (device error) → counted and logged, left unfinished: a restart redoes it;
- any other ``WorkerError`` or an unexpected exception → ``fail``: the worker stops, non-zero.

A cancelled batch (drain cut, revoke) leaves every record of it not yet finished unfinished; batches
never mix partitions, so a cut on revoke touches only the partitions let go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
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
from worker.intake.publish import Publisher, RecordTooLarge, publish_each
from worker.intake.records import Record, Source, dlq_record, dlq_record_without_value, result_record
from worker.intake.pool import chunks, run_each
from worker.metrics import Metrics
from worker.models.spec import PipelineSpec
from worker.settings import Settings



class _Answers:
    """The GPU's answers to one batch as they come (a callback per record's future, not an
    ``asyncio.wait`` over all of them per wake-up), and a wake-up when the hand-over ends."""

    __slots__ = ("jobs", "event", "_by_future")

    def __init__(self) -> None:
        self.jobs: list[Job] = []  # answered, not yet taken
        self.event = asyncio.Event()
        self._by_future: dict[asyncio.Future, Job] = {}

    def watch(self, job: Job) -> None:
        self._by_future[job.future] = job  # type: ignore[index]
        job.future.add_done_callback(self._arrived)  # type: ignore[union-attr]

    def _arrived(self, future: asyncio.Future) -> None:
        self.jobs.append(self._by_future.pop(future))
        self.event.set()

    def wake(self, _future: asyncio.Future) -> None:
        self.event.set()


class Job:
    """One record's way through a batch."""

    __slots__ = ("msg", "generation", "answers", "where", "decoded", "future", "result", "error")

    def __init__(self, msg: Any, generation: int | None, answers: _Answers | None = None) -> None:
        self.msg = msg
        self.generation = generation
        self.answers = answers
        self.where = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        self.decoded: Decoded | Encoded | None = None
        self.future: asyncio.Future | None = None  # the GPU's answer
        self.result: Any = None
        self.error: BaseException | None = None  # PoisonMessage or RetriableError: this record only

    def source(self) -> Source:
        m = self.msg
        return Source(m.topic, m.partition, m.offset, m.timestamp, m.key)


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
        self._reduced = settings.cpu_decode_reduced
        # decoder=hybrid: a JPEG is decoded here while the pool has room, else on the card. The card's JPEG
        # decode adds GPU time to its batch (H100: ~3 ms per 128 images with 8 hardware queues, ~1 with 32;
        # docs/benchmarks.md runs 14 and 18), so each image a CPU core decodes is card time won. Room: queued per
        # thread (a decode takes 1-3 ms), so that the threads stay busy between polls; the rest of a
        # poll goes to the card at once.
        self._cpu_slots = (settings.decode_threads * settings.hybrid_queue_per_thread
                           if settings.decoder == "hybrid" else 0)
        self._cpu_busy = 0
        # hybrid_card_below: under it the GPU process has no backlog of this intake's images, so the card's
        # JPEG decoder (idle otherwise below the peak) takes them and the CPU is spared; over it, as above
        self._card_below = settings.hybrid_card_below if settings.decoder == "hybrid" else 0
        self._threads = max(1, settings.decode_threads)
        self._log = log.get("worker")

    async def handle(self, tp: TopicPartition, msg: Any, generation: int | None = None) -> None:
        await self.handle_batch(tp, [(msg, generation)])

    async def handle_batch(self, tp: TopicPartition, items: Sequence[tuple[Any, int | None]]) -> None:
        consumed_at = time.monotonic()
        answers = _Answers()
        jobs = [Job(msg, generation, answers) for msg, generation in items]
        # Handing over and publishing run side by side: a poll can bring more records than the ring has
        # slots, and the first records' results must not wait until the last ones found room (with a long
        # max_wait_ms that held results back for several GPU batches). Results are published as they come,
        # a group per wake-up (the GPU answers a batch at once), each group on its own: one record the GPU
        # never answers, or one group whose ack is slow, must not hold its batch-mates back.
        handing = asyncio.ensure_future(self._check_and_put(jobs) if self.gpu.decodes_on_device
                                        else self._decode_and_put(jobs))
        handing.add_done_callback(answers.wake)
        publishing: list[asyncio.Future] = []
        try:
            try:
                expected, arrived = None, 0  # answers to wait for: known once every record is handed over
                while expected is None or arrived < expected:
                    await answers.event.wait()
                    answers.event.clear()
                    group, answers.jobs = answers.jobs, []
                    if group:
                        for job in group:
                            try:
                                job.result = job.future.result()  # type: ignore[union-attr]
                            except (PoisonMessage, RetriableError) as exc:
                                job.error = exc
                        group.sort(key=lambda j: j.msg.offset)
                        publishing.append(asyncio.ensure_future(self._publish(tp, group, consumed_at)))
                        arrived += len(group)
                    if expected is None and handing.done():
                        handing.result()  # what stopped the hand-over stops the batch
                        expected = sum(1 for j in jobs if j.future is not None)
                        failed = [j for j in jobs if j.future is None]  # poison (or retriable) before the GPU
                        if failed:
                            publishing.append(asyncio.ensure_future(self._publish(tp, failed, consumed_at)))
                await asyncio.gather(*publishing)
            finally:
                handing.cancel()  # a cut batch (drain, revoke) or a failure cuts its hand-over and groups too
                for task in publishing:
                    task.cancel()
        except asyncio.CancelledError:
            raise
        except WorkerError as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must stop the worker, not skip the message
            self._log.exception("unexpected error handling messages", topic=tp.topic, partition=tp.partition,
                                offsets=[j.msg.offset for j in jobs])
            self.fail(exc)

    # --- to the GPU ------------------------------------------------------------------------
    async def _decode_and_put(self, jobs: list[Job]) -> None:
        """Decode on the CPU: one pool submission per decode thread (not per record), each chunk handed
        to the GPU as soon as it is decoded."""
        s = self.settings
        args = (self.pipeline, s.max_bytes, s.max_pixels, self._reduced, s.max_jpeg_scans)
        for part, future in self._in_chunks(decode_message, jobs, lambda j: (j.msg.value, j.msg.headers, *args)):
            for job, out in zip(part, await future):
                if isinstance(out, BaseException):
                    self._failed_decode(job, out)
                    continue
                job.decoded = out
                await self._put(job, InferenceRequest(out.inputs, None, None, job.where))  # type: ignore[arg-type]

    def _in_chunks(self, fn: Callable[..., Any], jobs: list[Job], args_of: Callable[[Job], tuple[Any, ...]]
                   ) -> list[tuple[list[Job], asyncio.Future]]:
        """``fn(*args_of(job))`` for every job in the decode pool, one submission per decode thread (a
        chunk of jobs each, in order), not one per record; each future gives its chunk's results or
        exceptions (``run_each``)."""
        return [(part, self._submit(run_each, fn, [args_of(j) for j in part])) for part in chunks(jobs, self._threads)]

    async def _check_and_put(self, jobs: list[Job]) -> None:
        """The GPU decodes: header checks here (a JSON envelope in the pool), the bytes to the GPU; with
        decoder=hybrid a JPEG is decoded here instead while a decode thread is free (with hybrid_card_below,
        only while the GPU process has a backlog of this intake's images)."""
        s = self.settings
        on_cpu: list[Job] = []
        try:
            for job in jobs:
                try:
                    encoded = await self._check(job.msg)
                except (PoisonMessage, RetriableError) as exc:
                    job.error = exc
                    continue
                job.decoded = encoded
                if gpu_decodable(encoded) and (self._cpu_busy >= self._cpu_slots or self._no_gpu_backlog()):
                    to_card = InferenceRequest(None, None, None, job.where, encoded=encoded)  # type: ignore[arg-type]
                    await self._put(job, to_card)
                else:  # OpenCV in the pool; the GPU thread copies the rows in
                    self._cpu_busy += 1
                    on_cpu.append(job)
        except BaseException:  # cut (revoke, drain) or failed before the pool got them: their room back
            self._cpu_freed(len(on_cpu))
            raise
        # A JPEG here is hybrid's CPU share: decoded downscaled (cpu-reduced), the cheap way; other formats
        # full size, as decoder=cpu would. In chunks, as _decode_and_put; a chunk's room frees when it ends.
        submitted = self._in_chunks(decode_encoded, on_cpu, lambda j: (j.decoded, self.pipeline, s.max_bytes,
                                                                       s.max_pixels, gpu_decodable(j.decoded)))
        for part, future in submitted:
            future.add_done_callback(lambda _f, n=len(part): self._cpu_freed(n))
        for part, future in submitted:
            for job, out in zip(part, await future):
                if isinstance(out, BaseException):
                    self._failed_decode(job, out)
                    continue
                await self._put(job, InferenceRequest(out, None, None, job.where))  # type: ignore[arg-type]

    def _no_gpu_backlog(self) -> bool:
        """hybrid_card_below is set and fewer of this intake's images than that wait at the GPU process."""
        return self._card_below > 0 and self.gpu.queue_depth() < self._card_below

    async def _check(self, msg: Any) -> Encoded:
        """Header checks before the GPU thread decodes: ~8 us for a raw image, done right here on the
        event loop (a pool round trip costs more than that); a JSON envelope (base64 of up to max_bytes)
        goes to the pool."""
        s = self.settings
        if is_envelope(msg.value, msg.headers):
            return await self._submit(inspect_message, msg.value, msg.headers, s.max_bytes, s.max_pixels,
                                      s.max_jpeg_scans)
        return inspect_message(msg.value, msg.headers, s.max_bytes, s.max_pixels, s.max_jpeg_scans)

    def _failed_decode(self, job: Job, exc: BaseException) -> None:
        if not isinstance(exc, (PoisonMessage, RetriableError)):
            raise exc  # a bug or a fatal error: handle_batch stops the worker
        job.error = exc

    async def _put(self, job: Job, request: InferenceRequest) -> None:
        loop = asyncio.get_running_loop()
        request.future = job.future = loop.create_future()
        request.loop = loop
        if job.answers is not None:
            job.answers.watch(job)
        self.metrics.decode_seconds.observe(job.decoded.decode_s)  # type: ignore[union-attr]
        await self.gpu.put(request)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        self.metrics.decode_queue_depth.inc()
        future = asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)
        future.add_done_callback(self._depth_dec)
        return future

    def _depth_dec(self, _future: asyncio.Future) -> None:
        self.metrics.decode_queue_depth.dec()

    def _cpu_freed(self, n: int) -> None:
        self._cpu_busy -= n

    # --- results -----------------------------------------------------------------------------
    async def _publish(self, tp: TopicPartition, jobs: list[Job], consumed_at: float) -> None:
        """Results of the batch as one group (their acks awaited together), then the DLQ records; each
        record's offset finished after its own acknowledgement."""
        s = self.settings
        now = time.monotonic()
        done: list[Job] = []
        results: list[Job] = []
        records: list[Record] = []
        for job in jobs:
            if job.result is not None:
                records.append(self._result(job, now - consumed_at))
                results.append(job)
            elif isinstance(job.error, RetriableError):
                # Not finished, so never committed: a restart redoes it. Device errors also stop the worker.
                self.counts["failed"] += 1
                self.metrics.failed.labels(type(job.error).__name__).inc()
                self._log.error("message failed (retriable; offset left uncommitted)", error=str(job.error),
                                **job.where)
        if records:
            refused = await publish_all(self.publisher, s.output_topic, records)
            published = 0
            for job, too_large in zip(results, refused):
                if too_large is not None:
                    # The result can never be sent (huge model outputs): the input goes to the DLQ instead.
                    job.error = PoisonMessage(str(too_large), reason="result_too_large")
                else:
                    published += 1
                    done.append(job)
            self.metrics.published.inc(published)
            self.counts["published"] += published
        for job in jobs:
            if isinstance(job.error, PoisonMessage):
                await self.dead_letter(job.source(), job.msg, job.error, job.where)
                done.append(job)
        end = time.monotonic()
        for job in done:
            self.metrics.end_to_end_seconds.observe(end - consumed_at)
            self.tracker.finish(tp, job.msg.offset, job.generation)

    def _result(self, job: Job, elapsed_s: float) -> Record:
        result, decoded = job.result, job.decoded
        assert decoded is not None
        self.metrics.queue_seconds.observe(result.queue_s)
        return result_record(
            job.source(), self.pipeline, result.outputs,
            image={"width": decoded.width, "height": decoded.height, "format": decoded.format},
            correlation_id=decoded.correlation_id, batch_size=result.batch_size,
            postprocessed=result.postprocessed,
            timings_s={"decode": decoded.decode_s, "queue": result.queue_s,
                       "inference": result.inference_s, "end_to_end": elapsed_s})

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


async def publish_all(publisher: Any, topic: str, records: list[Record]) -> list[RecordTooLarge | None]:
    """``publisher.publish_many`` where the publisher has it (test doubles may have only ``publish``)."""
    many = getattr(publisher, "publish_many", None)
    if many is not None:
        return await many(topic, records)
    return await publish_each(publisher, topic, records)
