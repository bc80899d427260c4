"""What the local broker delivers to one consumer with no processing: the Kafka ceiling of the bench, and
the CPU floor of an intake.

Reads a topic the bench already filled, with the worker's fetch settings, and counts records; nothing
is decoded. If this is near the worker's throughput, the broker (or the client), not the worker, is the
bound of that run.

Each client the intake can read with (aiokafka, librdkafka) reads the topic alone in a fresh process, and
that process's CPU (every thread: librdkafka's native ones too) from its first record to its last, per
record, is the least an intake with that client can spend per message on this host: issue 11 asks for
<= 0.1 ms for the whole intake, so a floor near or above that says the target is out of reach with that
client, whatever the worker does around it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
import uuid

from worker.settings import Settings

CLIENTS = ("aiokafka", "librdkafka")


async def broker_read_capacity(settings: Settings, bootstrap: str, topic: str, expected: int,
                               timeout_s: float = 120.0) -> dict:
    """The aiokafka reading (the bench's broker ceiling, as before) with every client's floor beside it."""
    loop = asyncio.get_running_loop()
    by_client = {}
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for client in CLIENTS:
            by_client[client] = await loop.run_in_executor(pool, read_alone, client, settings, bootstrap, topic,
                                                           expected, timeout_s)
    return {**by_client["aiokafka"], "clients": by_client}


def read_alone(client: str, settings: Settings, bootstrap: str, topic: str, expected: int, timeout_s: float) -> dict:
    """In a fresh process: read ``expected`` records of ``topic`` with ``client``, nothing else running."""
    read = _read_aiokafka if client == "aiokafka" else _read_librdkafka
    got, first_batch, nbytes, wall, cpu = read(settings, bootstrap, topic, expected, timeout_s)
    counted = max(got - first_batch, 1)
    return {"client": client, "records": got, "wall_s": wall, "records_per_s": (got - first_batch) / wall,
            "mb_per_s": nbytes / wall / 1e6,
            # the records after the first poll's, over the CPU they took: what one message costs the client
            "cpu_ms_per_message": round(cpu * 1000 / counted, 4), "check_crcs": bool(settings.check_crcs)}


class _Clock:
    """The read's start (its first poll with records, whose records are not counted) and its CPU."""

    def __init__(self) -> None:
        self.first = 0.0
        self.first_cpu = 0.0
        self.first_batch = 0

    def start(self, n: int) -> None:
        if not self.first:
            self.first, self.first_cpu, self.first_batch = time.monotonic(), time.process_time(), n

    def stop(self) -> tuple[float, float]:
        if not self.first:
            return 1e-9, 0.0
        return max(time.monotonic() - self.first, 1e-9), time.process_time() - self.first_cpu


def _read_aiokafka(settings: Settings, bootstrap: str, topic: str, expected: int, timeout_s: float):
    from aiokafka import AIOKafkaConsumer

    async def read():
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                    enable_auto_commit=False, fetch_max_bytes=settings.fetch_max_bytes,
                                    max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
                                    fetch_max_wait_ms=settings.fetch_max_wait_ms, check_crcs=settings.check_crcs)
        await consumer.start()
        clock, got, nbytes = _Clock(), 0, 0
        try:
            deadline = time.monotonic() + timeout_s
            while got < expected and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=100, max_records=settings.max_in_flight)).values():
                    clock.start(len(records))
                    got += len(records)
                    nbytes += sum(len(r.value or b"") for r in records)
            wall, cpu = clock.stop()
        finally:
            await consumer.stop()
        return got, clock.first_batch, nbytes, wall, cpu

    return asyncio.run(read())


def _read_librdkafka(settings: Settings, bootstrap: str, topic: str, expected: int, timeout_s: float):
    """The intake's librdkafka configuration (worker.intake.rdkafka_consumer.config), every partition
    assigned from the start, ``consume`` in batches of ``max_in_flight`` (on a topic already full each one
    fills at once: the intake's own polls take what is queued, RdKafkaConsumer._consume)."""
    import confluent_kafka

    from worker.intake.rdkafka_consumer import config

    conf = {**config(settings.replace(bootstrap_servers=bootstrap), f"bench-floor-{uuid.uuid4().hex[:8]}"),
            "auto.offset.reset": "earliest"}
    consumer = confluent_kafka.Consumer(conf)
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                         for p in partitions])
        clock, got, nbytes = _Clock(), 0, 0
        deadline = time.monotonic() + timeout_s
        while got < expected and time.monotonic() < deadline:
            messages = [m for m in consumer.consume(max(1, settings.max_in_flight), 0.1) if m.error() is None]
            if messages:
                clock.start(len(messages))
            got += len(messages)
            nbytes += sum(len(m.value() or b"") for m in messages)
        wall, cpu = clock.stop()
    finally:
        consumer.close()
    return got, clock.first_batch, nbytes, wall, cpu
