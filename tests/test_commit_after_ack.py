"""Offsets move only after the broker acknowledged the result (component test on the real broker).

The worker's producer is swapped for one whose acknowledgements never arrive; the consumer side is
real. The worker consumes and infers everything, yet the group's committed offsets must not move, on
the commit interval or at shutdown. Then the same messages are processed by a normal worker.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.helpers import produce
from tests.test_end_to_end import lossless_images, run_until
from tests.kafka_broker import both_brokers
from worker.broker import create_topics
from worker.intake import publish
from worker.service import serve


async def committed(settings, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(settings.input_topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


@both_brokers
async def test_no_commit_before_ack(settings, monkeypatch):
    settings = settings.replace(drain_timeout_s=0.5, commit_interval_ms=100)
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.output_topic, 2),
                                                    (settings.dlq_topic, 1)])
    blobs, _ = lossless_images(20)
    await produce(settings.bootstrap_servers, settings.input_topic, blobs, 2)

    never = asyncio.Event()
    sends = []

    async def publish_without_ack(self, topic, record):  # the broker "never answers"
        sends.append(topic)
        await never.wait()

    async def publish_many_without_ack(self, topic, records):  # results go out as batches (issue 11)
        sends.extend(topic for _ in records)
        await never.wait()

    monkeypatch.setattr(publish.Publisher, "publish", publish_without_ack)
    monkeypatch.setattr(publish.Publisher, "publish_many", publish_many_without_ack)
    workers: list = []
    task = asyncio.create_task(serve(settings, worker_out=workers))
    while len(sends) < 20:  # every message decoded, inferred and handed to the producer
        await asyncio.sleep(0.05)
        assert not task.done(), "worker stopped early"
    await asyncio.sleep(0.5)  # several commit intervals pass
    assert await workers[0].commit() is True  # nothing to commit is not a failure
    workers[0].request_stop()
    assert await task == 0
    assert await committed(settings, 2) == {0: None, 1: None}

    # With acknowledgements back, the same group processes all 20 and commits past them.
    monkeypatch.undo()
    (records,), worker, code = await run_until(settings, {settings.output_topic: 20})
    assert code == 0 and len(records) == 20
    assert await committed(settings, 2) == {0: 10, 1: 10}
