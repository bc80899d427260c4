"""What the local broker delivers to one consumer with no processing: the Kafka ceiling of the bench.

Reads a topic the bench already filled, with the worker's fetch settings, and counts records; nothing
is decoded. If this is near the worker's throughput, the broker (or the client), not the worker, is the
bound of that run.
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer

from worker.settings import Settings


async def broker_read_capacity(settings: Settings, bootstrap: str, topic: str, expected: int,
                               timeout_s: float = 120.0) -> dict:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_bytes=settings.fetch_max_bytes,
                                max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
                                fetch_max_wait_ms=settings.fetch_max_wait_ms)
    await consumer.start()
    got = 0
    nbytes = 0
    first = 0.0
    first_batch = 0  # records that arrived with the clock's start: not counted in the rate
    try:
        deadline = time.monotonic() + timeout_s
        while got < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100, max_records=settings.max_in_flight)).values():
                if not first:
                    first, first_batch = time.monotonic(), len(records)
                got += len(records)
                nbytes += sum(len(r.value or b"") for r in records)
        wall = max(time.monotonic() - first, 1e-9)
    finally:
        await consumer.stop()
    return {"records": got, "wall_s": wall, "records_per_s": (got - first_batch) / wall, "mb_per_s": nbytes / wall / 1e6}
