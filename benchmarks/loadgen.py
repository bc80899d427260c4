"""Load generation for the end-to-end runs, in child processes.

The collector (reads results and dead letters) and the rate-limited producer run in their own processes
so that they do not take the worker's interpreter lock or event loop: the worker process then runs as it
does in production. Times are ``time.monotonic()``, which on Linux is one system-wide clock
(CLOCK_MONOTONIC), so send times in one process and receive times in another are comparable.

Message keys are the input's index (``b"17"``); the worker copies the key onto the result and the DLQ
record, which is how a result is matched to its send time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from typing import Any

from benchmarks.gaps import Gaps

_CTX = multiprocessing.get_context("spawn")
REREAD_AFTER_S = 2.0  # the collector reads its topics again from the start after this long with nothing new
MAX_REREADS = 5


def start(target: Any, *args: Any) -> Any:
    proc = _CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def new_event() -> Any:
    return _CTX.Event()


def new_counter() -> Any:
    """A shared integer a child updates as it goes (the collector's count, read when a run fails)."""
    return _CTX.Value("q", 0)


async def join(proc: Any, timeout_s: float) -> None:
    """Wait for a child without blocking the event loop (the worker may be running on it)."""
    deadline = time.monotonic() + timeout_s
    while proc.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        raise TimeoutError(f"bench child process {proc.name} did not finish within {timeout_s:.0f} s")
    if proc.exitcode != 0:
        raise RuntimeError(f"bench child process {proc.name} exited with {proc.exitcode}")


# --- collector --------------------------------------------------------------------------------------

def collector_main(bootstrap: str, output_topic: str, dlq_topic: str, expected: int, out_path: str,
                   ready: Any, timeout_s: float, progress: Any = None, seek_gaps: bool = True) -> None:
    """``seek_gaps``: the topics' offsets are contiguous (not so for transactional producers, whose
    commit markers take offsets), so a hole is a record not yet seen (benchmarks/gaps.py)."""
    collected = asyncio.run(_collect(bootstrap, output_topic, dlq_topic, expected, ready, timeout_s, progress,
                                     seek_gaps))
    with open(out_path, "w") as f:
        json.dump(collected, f)


async def _collect(bootstrap: str, output_topic: str, dlq_topic: str, expected: int, ready: Any,
                   timeout_s: float, progress: Any = None, seek_gaps: bool = True) -> dict:
    from aiokafka import AIOKafkaConsumer

    topics = [t for t in (output_topic, dlq_topic) if t]  # no dlq_topic: the broker's own round trip
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    raw: list[tuple[bytes, bool, float, bytes]] = []
    seen: set[bytes] = set()
    gaps = Gaps()  # offsets taken per partition; holes below the highest are sought back shortly
    duplicates = rereads = found_after_reread = 0
    try:
        await consumer.getmany(timeout_ms=50)  # joins the topics' partitions before saying ready
        ready.set()
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            if len(seen) and now - last_new > REREAD_AFTER_S and rereads < MAX_REREADS:
                # the backstop of the seeks below (benchmarks/gaps.py): a record passed in the last
                # batch of a partition leaves no hole below a higher offset; reading again from the start
                # finds it (records already taken are skipped by offset, not counted as duplicates)
                rereads += 1
                await consumer.seek_to_beginning()
                last_new = now
            for tp, records in batches.items():
                for rec in records:
                    if not gaps.take(tp, rec.offset):
                        continue
                    last_new = now
                    key = rec.key or b""
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    found_after_reread += rereads > 0
                    raw.append((key, tp.topic == dlq_topic, now, rec.value if tp.topic != dlq_topic else b""))
            for tp, offset in gaps.seeks(now) if seek_gaps else ():
                consumer.seek(tp, offset)
            if progress is not None:
                progress.value = len(seen)  # a run that stalls says how far it got
    finally:
        await consumer.stop()
    rows = []
    for key, dead, recv_t, value in raw:  # parsed after the clock stopped mattering
        row = {"key": int(key or -1), "dlq": dead, "recv_t": recv_t}
        if not dead:
            doc = json.loads(value)
            row["batch_size"] = doc.get("batch_size")
            row["timings_ms"] = doc.get("timings_ms", {})
        rows.append(row)
    return {"rows": rows, "duplicates": duplicates, "expected": expected, "rereads": rereads,
            "served_late": gaps.filled, "offsets_given_up": gaps.given_up,
            "found_after_reread": found_after_reread}


# --- rate-limited producer ---------------------------------------------------------------------------

def producer_main(bootstrap: str, topic: str, distinct: list[bytes], count: int, rate: float, partitions: int,
                  out_path: str, go: Any) -> None:
    sent_t = produce_at_rate(bootstrap, topic, distinct, count, rate, partitions, go)
    with open(out_path, "w") as f:
        json.dump({"sent_t": sent_t, "rate": rate}, f)


def produce_at_rate(bootstrap: str, topic: str, distinct: list[bytes], count: int, rate: float, partitions: int,
                    go: Any, delivery_timeout_s: float = 60.0) -> list[float]:
    """Send ``count`` messages at ``rate`` per second on an absolute schedule (a late send does not
    push the later ones back), recording each send time.

    With librdkafka (confluent-kafka), as most real producers: its own threads batch, send and take the
    acks, so the Python loop here only schedules. An aiokafka producer in one process could not keep up
    with images (H100 host, run 22: 2,413 of 2,637 per second asked for, 76 KB each, ~200 MB/s), and the
    records it had not sent yet counted as the worker's latency."""
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    # linger 0: each record goes out as soon as it is produced (what "send time" means here); acks from
    # every in-sync replica, as the worker's own producer
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 0,
                         "message.max.bytes": 10_485_760, "queue.buffering.max.kbytes": 1_048_576,
                         "log_level": 3})
    sent_t = [0.0] * count
    while not go.is_set():
        time.sleep(0.01)
    t0 = time.monotonic() + 0.05
    for i in range(count):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent_t[i] = time.monotonic()
        while True:
            try:
                producer.produce(topic, distinct[i % len(distinct)], key=str(i).encode(), partition=i % partitions,
                                 on_delivery=delivered)
                break
            except BufferError:  # librdkafka's queue is full: serve acks until there is room
                producer.poll(0.005)
        producer.poll(0)
    left = producer.flush(delivery_timeout_s)
    if left or errors:
        raise KafkaException(f"rate producer: {left} records not delivered, {len(errors)} failed "
                             f"(first: {errors[:1]})")
    return sent_t
