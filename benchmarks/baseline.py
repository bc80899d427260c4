"""The per-message baseline: the loop a first version of such a worker usually is.

    for each message: consume one -> decode -> infer one (batch of 1) -> produce its result and wait for
    the broker's ack -> commit its offset

Same decode stage, same engines (batch size 1) and same result record as the worker; one thread, which
owns the device runtime and runs the asyncio loop the Kafka clients live on, so inference blocks the loop
exactly as it does in such code.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from benchmarks.corpus import Topics, preload
from benchmarks.own_thread import on_own_thread
from benchmarks.end_to_end import percentiles
from worker.engines import create_engine, create_runtime
from worker.decode.message import decode_message
from worker.intake.records import Source, result_record
from worker.models.spec import PipelineSpec
from worker.settings import Settings


def baseline(settings: Settings, pipeline: PipelineSpec, bootstrap: str, images: list[bytes],
             partitions: int, timeout_s: float = 600.0) -> dict:
    def main() -> dict:
        runtime = create_runtime(settings)
        engines = [create_engine(spec, settings) for spec in pipeline.models]
        runtime.start()
        activated = []
        try:
            for engine in engines:
                engine.activate(runtime, 1)
                activated.append(engine)
            return asyncio.run(_loop(settings, pipeline, bootstrap, images, partitions, runtime, engines, timeout_s))
        finally:
            for engine in reversed(activated):
                engine.deactivate()
            runtime.stop()

    return on_own_thread(main, "bench-baseline")


async def _loop(settings: Settings, pipeline: PipelineSpec, bootstrap: str, images: list[bytes], partitions: int,
                runtime, engines, timeout_s: float) -> dict:
    topics = Topics.fresh("baseline")
    await topics.create(bootstrap, partitions)
    await preload(bootstrap, topics.input, images, partitions)
    s = settings
    consumer = AIOKafkaConsumer(topics.input, bootstrap_servers=bootstrap, group_id=topics.group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                session_timeout_ms=s.session_timeout_ms, fetch_max_wait_ms=s.fetch_max_wait_ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=s.producer_max_request_size)
    await consumer.start()
    await producer.start()
    latencies: list[float] = []
    published = 0
    dead = 0
    first = last = 0.0
    try:
        deadline = time.monotonic() + timeout_s
        while published + dead < len(images) and time.monotonic() < deadline:
            msg = await consumer.getone()
            t0 = time.monotonic()
            first = first or t0
            decoded = decode_message(msg.value, msg.headers, pipeline, s.max_bytes, s.max_pixels,
                                     s.decoder == "cpu-reduced")
            t_decoded = time.monotonic()
            collectors = [e.enqueue(np.ascontiguousarray(x[None])) for e, x in zip(engines, decoded.inputs)]
            runtime.synchronize()
            outputs = [{k: np.array(v[0]) for k, v in c().items()} for c in collectors]
            t_inferred = time.monotonic()
            source = Source(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key)
            record = result_record(source, pipeline, outputs,
                                   image={"width": decoded.width, "height": decoded.height, "format": decoded.format},
                                   correlation_id=decoded.correlation_id, batch_size=1,
                                   timings_s={"decode": t_decoded - t0, "inference": t_inferred - t_decoded,
                                              "end_to_end": time.monotonic() - t0})
            await producer.send_and_wait(topics.output, record.value, key=record.key, headers=record.headers)
            await consumer.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})
            last = time.monotonic()
            latencies.append((last - t0) * 1000)
            published += 1
    finally:
        await producer.stop()
        await consumer.stop()
    wall = max(last - first, 1e-9)
    return {"count": len(images), "results": published, "dead_lettered": dead,
            "missing": len(images) - published - dead, "wall_s": wall,
            "images_per_s": (published - 1) / wall if published > 1 else 0.0,
            "latency_ms": percentiles(latencies),
            "latency_kind": "consumed -> result acked and offset committed"}
